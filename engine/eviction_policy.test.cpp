#include "engine/eviction_policy.hpp"
#include "engine/testing/store_checks.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvfleet::engine {
namespace {

constexpr std::uint32_t ids = 64;
constexpr std::uint32_t npos = eviction_policy::npos;

/// Drives a policy with a seeded random history of inserts, hits (each at
/// a random priority), evictability changes and removals, and tracks what
/// the policy must hold.
struct replay {
  std::unique_ptr<eviction_policy> policy;
  std::array<bool, ids> live{};
  std::array<bool, ids> evictable{};
  std::array<priority, ids> prio{};
  std::uint64_t tick = 0;

  replay(policy_kind kind, std::uint32_t seed, std::size_t steps)
      : policy(make_policy(kind)) {
    policy->reserve(ids);
    std::mt19937 gen(seed);
    for (std::size_t i = 0; i < steps; ++i)
      step(gen);
  }

  void step(std::mt19937& gen) {
    const auto id = static_cast<std::uint32_t>(gen() % ids);
    const auto p = static_cast<priority>(gen() % priority_count);
    access_info info;
    info.tick = ++tick;
    info.prio = p;
    info.count = static_cast<std::uint32_t>(1 + gen() % 8);
    info.next_use = tick + gen() % 1000;
    info.resident_blocks = ids;
    info.key_hash = id * 0x9E3779B97F4A7C15ULL;
    switch (gen() % 4) {
    case 0: // insert, or a hit of a live block
      policy->on_access(id, info, !live[id]);
      live[id] = true;
      prio[id] = p;
      break;
    case 1:
    case 2: // becomes evictable or stops being so
      if (live[id]) {
        evictable[id] = !evictable[id];
        policy->set_evictable(id, evictable[id]);
      }
      break;
    default: // leaves
      if (live[id]) {
        policy->on_remove(id);
        live[id] = false;
        evictable[id] = false;
      }
    }
  }
};

class policy_priorities : public ::testing::TestWithParam<policy_kind> {};

TEST_P(policy_priorities, counts_follow_each_blocks_last_priority) {
  for (std::size_t steps = 0; steps <= 2000; steps += 125) {
    replay r(GetParam(), 7, steps);
    r.policy->check_invariants();
    std::array<std::size_t, priority_count> want{};
    std::size_t all = 0;
    for (std::uint32_t id = 0; id < ids; ++id)
      if (r.evictable[id]) {
        ++want[static_cast<std::size_t>(r.prio[id])];
        ++all;
      }
    EXPECT_EQ(r.policy->evictable_count(), all) << steps << " steps";
    for (std::size_t l = 0; l < priority_count; ++l) {
      EXPECT_EQ(r.policy->evictable_count(static_cast<priority>(l)), want[l])
          << steps << " steps, " << to_string(static_cast<priority>(l));
    }
  }
}

TEST_P(policy_priorities, victim_of_a_priority_is_the_first_of_it_in_order) {
  for (std::size_t steps = 0; steps <= 2000; steps += 125) {
    replay r(GetParam(), 11, steps);
    std::array<std::uint32_t, priority_count> first{};
    for (std::size_t l = 0; l < priority_count; ++l)
      first[l] = r.policy->victim(static_cast<priority>(l));
    // victim()'s whole order, taking each block out in turn.
    std::array<std::uint32_t, priority_count> want{};
    want.fill(npos);
    for (std::uint32_t v = r.policy->victim(); v != npos;
         v = r.policy->victim()) {
      ASSERT_TRUE(r.evictable[v]) << v << " is not evictable";
      auto& w = want[static_cast<std::size_t>(r.prio[v])];
      if (w == npos)
        w = v;
      r.policy->set_evictable(v, false);
      r.evictable[v] = false;
    }
    EXPECT_EQ(first, want) << steps << " steps";
    r.policy->check_invariants();
  }
}

/// Token-free store simulation over `policy`: `capacity` ids, room made
/// from 90% down to 80% as the store does (so the resident count the policy
/// sees moves between the two), `accesses` accesses to the keys `next_key`
/// gives. `on_access(i, hit)` hears each one, `after_hit(i, id)` each hit
/// once the policy has it.
struct no_after_hit {
  void operator()(std::uint64_t, std::uint32_t) const noexcept {}
};
template <class NextKey, class OnAccess, class AfterHit = no_after_hit>
void simulate_store(eviction_policy& policy, std::uint32_t capacity,
                    std::uint64_t accesses, NextKey next_key,
                    OnAccess on_access, AfterHit after_hit = {}) {
  policy.reserve(capacity);
  const std::size_t high = capacity * 9 / 10;
  const std::size_t low = capacity * 8 / 10;
  std::unordered_map<std::uint64_t, std::uint32_t> where;
  std::vector<std::uint64_t> key_of(capacity);
  std::vector<std::uint32_t> free_ids;
  for (std::uint32_t id = capacity; id-- > 0;)
    free_ids.push_back(id);
  for (std::uint64_t i = 0; i < accesses; ++i) {
    const std::uint64_t key = next_key();
    access_info info;
    info.tick = i + 1;
    info.key_hash = key * 0x9E3779B97F4A7C15ULL;
    if (auto it = where.find(key); it != where.end()) {
      on_access(i, true);
      info.resident_blocks = where.size();
      policy.on_access(it->second, info, false);
      after_hit(i, it->second);
      continue;
    }
    on_access(i, false);
    if (where.size() >= high)
      while (where.size() > low) {
        const auto victim = policy.victim();
        policy.on_remove(victim);
        where.erase(key_of[victim]);
        free_ids.push_back(victim);
      }
    const auto id = free_ids.back();
    free_ids.pop_back();
    where.emplace(key, id);
    key_of[id] = key;
    info.resident_blocks = where.size();
    policy.on_access(id, info, true);
    policy.set_evictable(id, true);
  }
}

/// simulate_store() with half the accesses to `hot` keys and half to keys
/// never seen again. Returns the hit ratio of the last quarter of
/// `accesses`.
double late_hit_ratio(policy_kind kind, std::uint32_t capacity,
                      std::uint64_t hot, std::uint64_t accesses) {
  auto policy = make_policy(kind);
  std::mt19937_64 gen(11);
  std::uint64_t fresh = hot;
  std::uint64_t hits = 0;
  std::uint64_t counted = 0;
  simulate_store(
      *policy, capacity, accesses,
      [&] { return gen() % 2 == 0 ? gen() % hot : fresh++; },
      [&](std::uint64_t i, bool hit) {
        if (i < accesses / 4 * 3)
          return;
        ++counted;
        hits += hit ? 1 : 0;
      });
  return static_cast<double>(hits) / static_cast<double>(counted);
}

// The adaptive policy's half-life is a multiple of the blocks resident.
// Before, it was the count at each access, which moves between the
// watermarks at every room-making: scores taken when the store was fuller
// ranked lower by a gap growing with time, and after a few hundred
// accesses per block the policy evicted hot blocks before one-off ones
// (here 0.05 of the accesses hit against LRU's 0.43).
TEST(adaptive_policy, keeps_hot_blocks_however_long_it_runs) {
  const double lru = late_hit_ratio(policy_kind::lru, 256, 75, 400'000);
  const double adaptive =
      late_hit_ratio(policy_kind::adaptive, 256, 75, 400'000);
  EXPECT_GT(lru, 0.3);
  EXPECT_GE(adaptive, lru) << "lru " << lru;
}

// simulate_store() with uniform accesses over 1.5 x `capacity` keys (the
// two half-lives hit alike, within noise). Returns the adaptive policy's
// full rescores after `accesses`.
std::uint64_t rescores_on_a_tie(std::uint32_t capacity,
                                std::uint64_t accesses) {
  auto policy = make_policy(policy_kind::adaptive);
  std::mt19937_64 gen(5);
  simulate_store(
      *policy, capacity, accesses,
      [&] { return gen() % (capacity + capacity / 2); },
      [](std::uint64_t, bool) {});
  return policy->full_rescores();
}

TEST(adaptive_policy, does_not_flap_between_half_lives_on_a_tie) {
  // Each switch of half-life retakes every block's score inside one
  // access: at 1,000,000 blocks a stall of 80-750 ms. On a tie the noise
  // passed the switch margin twice in a row often enough for a switch
  // every 70,000 accesses, whatever the store's size: 76 full rescores
  // here, about 20 of them the basis's while the store fills, and 24 now.
  EXPECT_LE(rescores_on_a_tie(4096, 4'000'000), 32U);
}

INSTANTIATE_TEST_SUITE_P(every_policy, policy_priorities,
                         ::testing::ValuesIn(testing::every_policy_kind),
                         testing::policy_param_name{});

} // namespace
TEST(adaptive_policy,
     the_block_accessed_at_a_half_life_switch_is_not_the_victim) {
  // Uniform accesses over 1.5x a store of 4,096 blocks: the duel switches
  // the half-life now and then, at an access, and retakes every score. The
  // block accessed then is scored under the new half-life too, so it is
  // never the victim right after. (Before, it kept the old one: 2 of 3
  // switches made the block just hit the next to go.)
  auto policy = make_policy(policy_kind::adaptive);
  constexpr std::uint32_t capacity = 4096;
  std::mt19937_64 gen(5);
  int switches = 0;
  std::uint64_t rescores = 0;
  bool settled = false;
  simulate_store(
      *policy, capacity, 4'000'000,
      [&] { return gen() % (capacity + capacity / 2); },
      [&](std::uint64_t, bool hit) {
        rescores = policy->full_rescores();
        // Once the store is full it evicts (the basis then moves only on
        // a switch).
        settled =
            settled || (!hit && policy->evictable_count() >= capacity * 9 / 10);
      },
      [&](std::uint64_t i, std::uint32_t id) {
        if (!settled || policy->full_rescores() == rescores)
          return;
        ++switches;
        EXPECT_NE(policy->victim(), id) << "access " << i;
      });
  EXPECT_GT(switches, 0) << "no switch to check";
}

} // namespace kvfleet::engine
