#include "tools/bench/next_use_oracle.hpp"

#include "tools/bench/engine_mode.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <vector>

namespace kvfleet::bench {
namespace {

constexpr std::uint32_t block = 512;
const engine::ns_fingerprint fp{1, 2};

// One request per entry; each request is a chain of full blocks with these
// hash ids.
std::vector<engine::workload_request>
requests(const std::vector<std::vector<std::uint64_t>>& chains) {
  std::vector<engine::workload_request> out;
  for (const auto& ids : chains) {
    engine::workload_request r;
    r.input_length = static_cast<std::uint32_t>(ids.size()) * block;
    r.hash_ids = ids;
    out.push_back(r);
  }
  return out;
}

// Options for an exact capacity: eviction only when full, one block at a time.
engine_options exact_options(engine::policy_kind policy) {
  engine_options o;
  o.workload = "hand-made";
  o.capacity_blocks = 0;
  o.policies = {policy};
  o.high_watermark = 1.0;
  o.low_watermark = 1.0;
  return o;
}

// Textbook Belady (MIN) over single-block accesses: hits with `capacity`.
std::size_t reference_min_hits(const std::vector<std::uint64_t>& seq,
                               std::size_t capacity) {
  std::vector<std::uint64_t> cache;
  std::size_t hits = 0;
  for (std::size_t t = 0; t < seq.size(); ++t) {
    if (std::find(cache.begin(), cache.end(), seq[t]) != cache.end()) {
      ++hits;
      continue;
    }
    if (cache.size() == capacity) {
      const auto next = [&](std::uint64_t id) {
        for (std::size_t u = t + 1; u < seq.size(); ++u)
          if (seq[u] == id)
            return u;
        return seq.size();
      };
      const auto victim = std::max_element(
          cache.begin(), cache.end(),
          [&](std::uint64_t a, std::uint64_t b) { return next(a) < next(b); });
      cache.erase(victim);
    }
    cache.push_back(seq[t]);
  }
  return hits;
}

std::size_t store_hits(engine::policy_kind policy,
                       const std::vector<std::uint64_t>& seq,
                       std::size_t capacity) {
  std::vector<std::vector<std::uint64_t>> chains;
  for (std::uint64_t id : seq)
    chains.push_back({id});
  const auto reqs = requests(chains);
  const auto opts = exact_options(policy);
  const request_keys keys =
      make_request_keys(reqs, bench_namespace(opts).fingerprint(), block);
  auto res = simulate_policy(opts, policy, keys, capacity);
  EXPECT_TRUE(res) << res.error().describe();
  return res ? res->matched_blocks : 0;
}

TEST(next_use_oracle, answers_the_next_request_that_uses_the_key) {
  // Requests: [a b] [a c] [d] [a b] ; positions 0 1 | 2 3 | 4 | 5 6.
  const auto reqs = requests({{1, 2}, {1, 3}, {4}, {1, 2}});
  const request_keys keys = make_request_keys(reqs, fp, block);
  ASSERT_EQ(keys.keys.size(), 7U);
  const engine::block_key a = keys.keys[0];
  const engine::block_key ab = keys.keys[1];
  const engine::block_key ac = keys.keys[3];
  const engine::block_key d = keys.keys[4];
  EXPECT_EQ(keys.keys[2], a);
  EXPECT_EQ(keys.keys[5], a);
  EXPECT_EQ(keys.keys[6], ab);

  next_use_oracle oracle(keys);
  oracle.begin_request(0);
  EXPECT_EQ(oracle.next_use(a), 2U);
  EXPECT_EQ(oracle.next_use(ab), 6U);
  EXPECT_EQ(oracle.next_use(a), 2U) << "asking twice changes nothing";
  oracle.begin_request(1);
  EXPECT_EQ(oracle.next_use(a), 5U);
  EXPECT_EQ(oracle.next_use(ac), next_use_oracle::never);
  oracle.begin_request(2);
  EXPECT_EQ(oracle.next_use(d), next_use_oracle::never);
  EXPECT_EQ(oracle.next_use(ab), 6U);
  oracle.begin_request(3);
  EXPECT_EQ(oracle.next_use(a), next_use_oracle::never);
  EXPECT_EQ(oracle.next_use(ab), next_use_oracle::never);
  EXPECT_EQ(oracle.next_use(engine::block_key{9, 9}), next_use_oracle::never);
}

TEST(next_use_oracle, keys_follow_the_chain_and_only_full_blocks) {
  engine::workload_request r;
  r.input_length = 2 * block + 100; // two full blocks and a partial one
  r.hash_ids = {7, 8, 9};
  engine::workload_request shorter;
  shorter.input_length = 5 * block; // more tokens than ids: ids limit it
  shorter.hash_ids = {7};
  const std::vector<engine::workload_request> reqs{r, shorter};
  const request_keys keys = make_request_keys(reqs, fp, block);
  ASSERT_EQ(keys.size(), 2U);
  ASSERT_EQ(keys.of(0).size(), 2U);
  ASSERT_EQ(keys.of(1).size(), 1U);
  const engine::block_key k0 = engine::chain_key_from_id({}, fp, 7);
  EXPECT_EQ(keys.of(0)[0], k0);
  EXPECT_EQ(keys.of(0)[1], engine::chain_key_from_id(k0, fp, 8));
  EXPECT_EQ(keys.of(1)[0], k0);
  EXPECT_EQ(keys.input_tokens[0], 2 * block + 100);
}

// A stop predicate that says stop from its `stop_at`-th call on, and
// counts its calls.
struct counting_stop {
  std::size_t stop_at;
  std::size_t calls = 0;
  std::function<bool()> fn() {
    return [this] { return ++calls >= stop_at; };
  }
};

// 3,000 requests of 4 full blocks: 12,000 keys, three polls of 4,096.
std::vector<engine::workload_request> many_requests() {
  std::vector<std::vector<std::uint64_t>> chains;
  for (std::uint64_t i = 0; i < 3'000; ++i)
    chains.push_back({i % 7, i, i + 1, i + 2});
  return requests(chains);
}

TEST(request_keys, stop_ends_making_keys_within_a_few_thousand_keys) {
  // Computing the keys of 5,000,000 chat requests took tens of seconds
  // with nothing asking the stop flag.
  const auto reqs = many_requests();
  counting_stop stop{2};
  const auto got = make_request_keys(reqs, fp, block, stop.fn());
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::unavailable);
  // Asked at key 0 and key 4,096 (request 1,024), which said stop.
  EXPECT_EQ(got.error().message, "stopped after 1024 of 3000 requests");
  EXPECT_EQ(stop.calls, 2U);

  counting_stop never{std::numeric_limits<std::size_t>::max()};
  const auto all = make_request_keys(reqs, fp, block, never.fn());
  ASSERT_TRUE(all.has_value());
  EXPECT_EQ(never.calls, 3U); // keys 0, 4,096 and 8,192
  const request_keys plain = make_request_keys(reqs, fp, block);
  EXPECT_EQ(all->keys, plain.keys);
  EXPECT_EQ(all->offsets, plain.offsets);
  EXPECT_EQ(all->input_tokens, plain.input_tokens);
}

TEST(next_use_oracle, stop_ends_the_build_within_a_few_thousand_positions) {
  const auto reqs = many_requests();
  const request_keys keys = make_request_keys(reqs, fp, block);
  counting_stop stop{2};
  const auto got = next_use_oracle::build(keys, stop.fn());
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::unavailable);
  EXPECT_EQ(stop.calls, 2U);

  counting_stop never{std::numeric_limits<std::size_t>::max()};
  auto built = next_use_oracle::build(keys, never.fn());
  ASSERT_TRUE(built.has_value());
  EXPECT_EQ(never.calls, 3U); // positions 0, 4,096 and 8,192 from the end
  next_use_oracle plain(keys);
  for (std::size_t r = 0; r < keys.size(); r += 97) {
    built->begin_request(r);
    plain.begin_request(r);
    for (const engine::block_key& k : keys.of(r))
      EXPECT_EQ(built->next_use(k), plain.next_use(k));
  }
}

TEST(belady_in_the_store, gets_the_known_optimum_with_two_blocks) {
  // A B C A B D A B C D with room for two blocks: the optimum keeps A for
  // requests 4 and 7 and D for request 10, 3 hits; LRU gets none.
  const std::vector<std::uint64_t> seq{1, 2, 3, 1, 2, 4, 1, 2, 3, 4};
  EXPECT_EQ(reference_min_hits(seq, 2), 3U);
  EXPECT_EQ(store_hits(engine::policy_kind::belady, seq, 2), 3U);
  EXPECT_EQ(store_hits(engine::policy_kind::lru, seq, 2), 0U);
}

TEST(belady_in_the_store, matches_textbook_min_on_random_sequences) {
  std::mt19937_64 rng(12345);
  for (int round = 0; round < 10; ++round) {
    std::vector<std::uint64_t> seq(200);
    for (auto& id : seq)
      id = 1 + rng() % 12;
    for (std::size_t capacity : {1U, 3U, 5U}) {
      const std::size_t best = reference_min_hits(seq, capacity);
      EXPECT_EQ(store_hits(engine::policy_kind::belady, seq, capacity), best)
          << "round " << round << " capacity " << capacity;
      for (auto other : {engine::policy_kind::lru, engine::policy_kind::lfu,
                         engine::policy_kind::adaptive})
        EXPECT_LE(store_hits(other, seq, capacity), best);
    }
  }
}

TEST(belady_in_the_store, keeps_a_shared_prefix_chain) {
  // Two-block chains sharing their first block, three blocks of room. The
  // first block (1) is reused by every request; belady never loses it.
  const auto reqs = requests({{1, 2}, {1, 3}, {1, 4}, {1, 2}, {1, 3}, {1, 4}});
  const auto opts = exact_options(engine::policy_kind::belady);
  const request_keys keys =
      make_request_keys(reqs, bench_namespace(opts).fingerprint(), block);
  auto res = simulate_policy(opts, engine::policy_kind::belady, keys, 3);
  ASSERT_TRUE(res) << res.error().describe();
  // Request 1 misses both blocks; requests 2..6 hit block 1; with room for
  // two leaves beside it, belady keeps 2 for request 4 or 3 for request 5
  // and so on: the optimum over these leaves is 2 more hits.
  EXPECT_EQ(res->matched_blocks, 5U + 2U);
}

} // namespace
} // namespace kvfleet::bench
