// Decision logic of the actor layer, driven without CAF.
#include "actors/batch_accumulator.hpp"
#include "actors/caf_error.hpp"
#include "actors/config_checks.hpp"
#include "actors/lane_queue.hpp"
#include "actors/memory_manager.hpp"
#include "actors/prefetch_actor.hpp"
#include "actors/prefetch_tracker.hpp"
#include "actors/query_store.hpp"
#include "actors/router.hpp"
#include "actors/scaler_policy.hpp"
#include "actors/transition_model.hpp"

#include <caf/sec.hpp>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace kvfleet::actors {
namespace {

using namespace std::chrono_literals;
using engine::block_key;
using engine::priority;

TEST(LaneQueue, HigherPriorityFirstFifoWithinPriority) {
  lane_queue<int> q;
  q.push(priority::low, 1);
  q.push(priority::critical, 2);
  q.push(priority::normal, 3);
  q.push(priority::critical, 4);
  q.push(priority::background, 5);
  std::vector<int> out;
  while (auto x = q.pop())
    out.push_back(*x);
  EXPECT_EQ(out, (std::vector<int>{2, 4, 3, 1, 5}));
  EXPECT_TRUE(q.empty());
}

TEST(LaneQueue, RemoveIfTakesMatchesAnywhereAndKeepsTheRestInOrder) {
  // Odd items go, from the front, the middle and the back of their lanes;
  // the even ones stay in order. (Before, only the front of each lane up
  // to the first that stayed was taken: 3 and 7 stayed.)
  lane_queue<int> q;
  for (int i : {1, 2, 3, 4})
    q.push(priority::low, i);
  for (int i : {6, 7, 9})
    q.push(priority::high, i);
  const auto gone = q.remove_if([](int x) { return x % 2 == 1; });
  EXPECT_EQ(gone, (std::vector<int>{7, 9, 1, 3}));
  EXPECT_EQ(q.size(), 3U);
  EXPECT_EQ(q.size(priority::low), 2U);
  std::vector<int> out;
  while (auto x = q.pop())
    out.push_back(*x);
  EXPECT_EQ(out, (std::vector<int>{6, 2, 4}));
}

TEST(BatchAccumulator, ClosesAtMaxSize) {
  batch_accumulator<int> b{batch_config{3, 100ms}};
  EXPECT_FALSE(b.add(priority::normal, 1));
  EXPECT_TRUE(b.take_opened());
  EXPECT_FALSE(b.take_opened());
  EXPECT_FALSE(b.add(priority::normal, 2));
  EXPECT_TRUE(b.add(priority::high, 3));
  auto batch = b.take();
  EXPECT_EQ(batch, (std::vector<int>{3, 1, 2}));
  EXPECT_EQ(b.pending(), 0U);
}

TEST(BatchAccumulator, StaleTimerIsIgnored) {
  batch_accumulator<int> b{batch_config{2, 100ms}};
  b.add(priority::normal, 1);
  auto gen = b.generation();
  EXPECT_TRUE(b.timer_current(gen));
  b.add(priority::normal, 2);
  (void)b.take(); // closed full before the timer fired
  EXPECT_FALSE(b.timer_current(gen));
  b.add(priority::normal, 3);
  EXPECT_TRUE(b.take_opened());
  EXPECT_TRUE(b.timer_current(b.generation()));
}

TEST(BatchAccumulator, TokenBudgetClosesAndSplits) {
  batch_accumulator<int> b{batch_config{20, 100ms}, 1000};
  EXPECT_FALSE(b.add(priority::normal, 1, 600));
  EXPECT_TRUE(b.add(priority::normal, 2, 600));
  auto first = b.take();
  EXPECT_EQ(first, std::vector<int>{1}); // 1200 tokens do not fit 1000
  EXPECT_TRUE(b.take_opened());          // the left-over opens a batch
  EXPECT_EQ(b.take(), std::vector<int>{2});
}

TEST(BatchAccumulator, DeadlineIsTheOldestPendingArrivalPlusTheTimeout) {
  batch_accumulator<int> b{batch_config{20, 100ms}, 100};
  EXPECT_FALSE(b.deadline().has_value());
  b.add(priority::low, 1, 16, engine::nanos{0});
  EXPECT_EQ(b.deadline(), engine::nanos{100ms});
  b.add(priority::critical, 2, 96, engine::nanos{90ms}); // full
  EXPECT_EQ(b.deadline(), engine::nanos{100ms});
  EXPECT_EQ(b.take(), std::vector<int>{2});
  EXPECT_TRUE(b.take_opened());
  // The left-over keeps its arrival: not 100 ms from this close.
  EXPECT_EQ(b.deadline(), engine::nanos{100ms});
  EXPECT_EQ(b.take(), std::vector<int>{1});
  EXPECT_FALSE(b.deadline().has_value());
}

std::vector<block_key> keys(std::uint64_t group, std::size_t n) {
  std::vector<block_key> out;
  for (std::size_t i = 0; i < n; ++i)
    out.push_back(block_key{group, i + 1});
  return out;
}

/// The router for `c`; a configuration create() rejects fails the test.
router make_router(const router_config& c) {
  auto r = router::create(c);
  EXPECT_TRUE(r.has_value()) << r.error().describe();
  return r.has_value() ? std::move(*r) : router{};
}

TEST(Router, RoundRobinSkipsDownSlots) {
  auto r = make_router(router_config{routing_policy::round_robin});
  for (int i = 0; i < 3; ++i)
    EXPECT_TRUE(r.add_slot().has_value());
  r.set_up(1, false);
  std::vector<std::uint32_t> picks;
  for (int i = 0; i < 4; ++i)
    picks.push_back(r.pick({})->slot);
  EXPECT_EQ(picks, (std::vector<std::uint32_t>{0, 2, 0, 2}));
}

TEST(Router, KvAwareTiesTakeTurnsAndANewPrefixGoesWhereThereIsRoom) {
  // Sequential requests (each finished before the next) with distinct
  // prefixes: every engine is idle at each pick. kv_aware spreads the new
  // prefixes over the engines, so each holds a third of the blocks.
  // (Before, every tie went to slot 0: it took all 300 requests and held
  // every block, the others' memory unused.) least_loaded keeps its rule,
  // the lowest slot. On a tie of scores, kv_aware takes the engine holding
  // the request's prefix: slot 1, one request in flight and 4 blocks held
  // (1 - 4 x 0.25 = 0), over slot 0, idle and holding nothing (0).
  for (const auto policy :
       {routing_policy::least_loaded, routing_policy::kv_aware}) {
    SCOPED_TRACE(to_string(policy));
    auto r = make_router(router_config{policy});
    for (int i = 0; i < 3; ++i)
      ASSERT_TRUE(r.add_slot().has_value());
    std::array<std::size_t, 3> picks{};
    for (std::uint64_t i = 0; i < 300; ++i) {
      const auto k = keys(i + 1, 8);
      const auto p = r.pick(k);
      ASSERT_TRUE(p.has_value());
      ++picks[p->slot];
      r.started(p->slot);
      r.stored(p->slot, k);
      r.finished(p->slot);
    }
    const bool kv = policy == routing_policy::kv_aware;
    for (std::uint32_t s = 0; s < 3; ++s) {
      EXPECT_EQ(picks[s], kv ? 100U : s == 0 ? 300U : 0U) << s;
      EXPECT_EQ(r.keys_held(s), kv ? 800U : s == 0 ? 2400U : 0U) << s;
    }
  }
  auto r = make_router(router_config{routing_policy::kv_aware});
  for (int i = 0; i < 2; ++i)
    ASSERT_TRUE(r.add_slot().has_value());
  const auto k = keys(77, 4);
  r.stored(1, k);
  r.started(1);
  const auto p = r.pick(k);
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->slot, 1U);
  EXPECT_EQ(p->expected_hit_blocks, 4U);
}

TEST(Router, LeastLoadedDividesByWeightUnderSkew) {
  auto r = make_router(router_config{routing_policy::least_loaded});
  EXPECT_TRUE(r.add_slot(1.0).has_value());
  EXPECT_TRUE(r.add_slot(4.0).has_value()); // four times the capacity
  for (int i = 0; i < 3; ++i)
    r.started(0);
  for (int i = 0; i < 8; ++i)
    r.started(1);
  // loads: 3/1 = 3 vs 8/4 = 2
  EXPECT_EQ(r.pick({})->slot, 1U);
  r.started(1);
  r.started(1);
  r.started(1);
  r.started(1); // 12/4 = 3 ties: lowest slot
  EXPECT_EQ(r.pick({})->slot, 0U);
  r.set_up(0, false);
  EXPECT_EQ(r.pick({})->slot, 1U);
  r.set_up(1, false);
  EXPECT_FALSE(r.pick({}).has_value());
}

TEST(Router, KvAwarePrefersPrefixHolderUntilBacklogMargin) {
  router_config c{routing_policy::kv_aware};
  c.credit_per_block = 0.5;
  c.max_credit = 4.0;
  c.backlog_margin = 2;
  auto r = make_router(c);
  EXPECT_TRUE(r.add_slot().has_value());
  EXPECT_TRUE(r.add_slot().has_value());
  auto k = keys(7, 8);
  r.stored(1, std::span{k}.first(6));
  auto p = r.pick(k);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->slot, 1U);
  EXPECT_EQ(p->expected_hit_blocks, 6U);
  EXPECT_EQ(r.held_prefix(1, k), 6U);
  // Within the margin the credit (3.0) outweighs the backlog.
  r.started(1);
  r.started(1);
  EXPECT_EQ(r.pick(k)->slot, 1U);
  // Backlog 3 > 0 + margin 2: credit gone, the idle engine wins.
  r.started(1);
  EXPECT_EQ(r.pick(k)->slot, 0U);
  // Eviction events update the index.
  r.finished(1);
  r.finished(1);
  r.finished(1);
  r.evicted(1, std::span{k}.first(1));
  EXPECT_EQ(r.held_prefix(1, k), 0U);
  EXPECT_EQ(r.pick(k)->slot, 0U);
}

TEST(Router, TheBacklogMarginIsOverTheLeastLoadedEngines) {
  // Weights 8, 1, 8. Slot 0 is the least loaded (8 / 8 = 1) with a backlog
  // of 8; slot 1 has the smallest backlog (3, load 3); slot 2 holds the
  // prefix (credit 3), backlog 10 (load 1.25): within 8 + margin 2 of the
  // least loaded engine's, so it keeps its credit and wins. (Before, the
  // margin was over the smallest backlog, 3, and slot 0 won.)
  router_config c{routing_policy::kv_aware};
  c.credit_per_block = 0.5;
  c.backlog_margin = 2;
  auto r = make_router(c);
  EXPECT_TRUE(r.add_slot(8.0).has_value());
  EXPECT_TRUE(r.add_slot(1.0).has_value());
  EXPECT_TRUE(r.add_slot(8.0).has_value());
  auto k = keys(7, 6);
  r.stored(2, k);
  for (int i = 0; i < 8; ++i)
    r.started(0);
  for (int i = 0; i < 3; ++i)
    r.started(1);
  for (int i = 0; i < 10; ++i)
    r.started(2);
  EXPECT_EQ(r.pick(k)->slot, 2U);
  r.started(2); // 11 > 8 + 2: the credit goes
  EXPECT_EQ(r.pick(k)->slot, 0U);
}

TEST(Router, TheBacklogMarginIsScaledToTheEnginesWeight) {
  // Weights 8 and 1. Slot 0 holds the prefix (credit 4) with 9 requests
  // (load 1.125), slot 1 holds nothing with 1 (load 1): at the least
  // loaded engine's load slot 0 would hold 8, and 9 is within the margin
  // of 4, so it keeps its credit. (Before, raw backlogs were compared,
  // 9 > 1 + 4, and the request went to the engine holding nothing.) Past
  // 8 + 4 requests, the credit goes.
  router_config c{routing_policy::kv_aware};
  auto r = make_router(c);
  EXPECT_TRUE(r.add_slot(8.0).has_value());
  EXPECT_TRUE(r.add_slot(1.0).has_value());
  auto k = keys(7, 16);
  r.stored(0, k);
  for (int i = 0; i < 9; ++i)
    r.started(0);
  r.started(1);
  EXPECT_EQ(r.pick(k)->slot, 0U);
  for (int i = 0; i < 3; ++i)
    r.started(0);
  EXPECT_EQ(r.pick(k)->slot, 0U); // 12: at the margin
  r.started(0);                   // 13 > 8 + 4
  EXPECT_EQ(r.pick(k)->slot, 1U);
}

TEST(Router, AHugeBacklogMarginDoesNotWrap) {
  // min backlog 1 + margin 2^32-1 must not wrap to 0 and withdraw the
  // prefix holder's credit.
  router_config c{routing_policy::kv_aware};
  c.credit_per_block = 0.5;
  c.backlog_margin = std::numeric_limits<std::uint32_t>::max();
  auto r = make_router(c);
  EXPECT_TRUE(r.add_slot().has_value());
  EXPECT_TRUE(r.add_slot().has_value());
  auto k = keys(7, 6);
  r.stored(1, k);
  r.started(0);
  r.started(1);
  r.started(1);
  EXPECT_EQ(r.pick(k)->slot, 1U); // 2 - 3.0 credit beats 1
}

TEST(Router, SlotGoingDownForgetsItsBlocks) {
  auto r = make_router(router_config{routing_policy::kv_aware});
  EXPECT_TRUE(r.add_slot().has_value());
  EXPECT_TRUE(r.add_slot().has_value());
  auto k = keys(1, 4);
  r.stored(1, k);
  r.stored(0, std::span{k}.first(1)); // held by both
  auto held = r.keys_of(1);
  std::sort(held.begin(), held.end());
  EXPECT_EQ(held, k);
  EXPECT_EQ(r.keys_of(0), std::vector<block_key>{k[0]});
  r.set_up(1, false);
  EXPECT_TRUE(r.keys_of(1).empty());
  EXPECT_EQ(r.keys_of(0), std::vector<block_key>{k[0]});
  EXPECT_EQ(r.held_prefix(1, k), 0U);
  EXPECT_EQ(r.pick(k)->slot, 0U);
  r.set_up(1, true);
  EXPECT_EQ(r.index_size(), 1U); // slot 0's claim on k[0] only
}

TEST(Router, IndexIsBounded) {
  router_config c{routing_policy::kv_aware};
  c.max_index_keys = 10;
  auto r = make_router(c);
  EXPECT_TRUE(r.add_slot().has_value());
  auto k = keys(3, 50);
  r.stored(0, k);
  EXPECT_LE(r.index_size(), 10U);
}

/// Whether the index says `slot` holds `k`.
bool holds(const router& r, std::uint32_t slot, const block_key& k) {
  return r.held_prefix(slot, std::span{&k, 1}) == 1;
}

TEST(Router, FullIndexDropsTheLeastRecentlyUsedKeys) {
  router_config c{routing_policy::kv_aware};
  c.max_index_keys = 10;
  auto r = make_router(c);
  EXPECT_TRUE(r.add_slot().has_value());
  EXPECT_TRUE(r.add_slot().has_value());
  auto old = keys(1, 10);
  for (const auto& k : old)
    r.stored(0, std::span{&k, 1}); // old[0] the oldest
  // Used again: old[0] and old[1] matched by a routed request, old[2]
  // stored again (by the other engine).
  auto picked = r.pick(std::span{old}.first(2));
  ASSERT_TRUE(picked.has_value());
  EXPECT_EQ(picked->expected_hit_blocks, 2U);
  r.stored(1, std::span{old}.subspan(2, 1));
  r.stored(0, keys(2, 3));
  EXPECT_EQ(r.index_size(), 10U);
  for (std::size_t i = 0; i < old.size(); ++i) {
    const bool untouched_oldest = i >= 3 && i < 6;
    EXPECT_EQ(holds(r, 0, old[i]), !untouched_oldest) << "old[" << i << "]";
  }
  EXPECT_TRUE(holds(r, 1, old[2]));
  EXPECT_EQ(r.held_prefix(0, keys(2, 3)), 3U);
}

TEST(Router, FullIndexKeepsAPrefixsLeadingBlocksLongest) {
  router_config c{routing_policy::kv_aware};
  c.max_index_keys = 10;
  auto r = make_router(c);
  EXPECT_TRUE(r.add_slot().has_value());
  auto chain = keys(1, 10);
  r.stored(0, chain); // one call: chain[0] the most recent of them
  r.stored(0, keys(2, 2));
  EXPECT_EQ(r.index_size(), 10U);
  EXPECT_EQ(r.held_prefix(0, chain), 8U);
  // A request matching the first 3 makes them the most recent; the next
  // stored keys take the rest of the chain's places from its end.
  (void)r.pick(std::span{chain}.first(3));
  r.stored(0, keys(3, 6));
  EXPECT_EQ(r.held_prefix(0, chain), 3U);
  EXPECT_EQ(r.held_prefix(0, keys(2, 2)), 1U); // keys(2, 2)[1] was older
}

TEST(Router, AStoredCallLongerThanTheIndexKeepsItsLeadingKeys) {
  // max_index_keys 2 and one call storing A, B, C: C is not indexed, so
  // the prefix keeps A and B. (Before, C replaced B, the call's own key
  // just used, leaving A and C: a held prefix of 1 and a key no request
  // reaches.)
  router_config c{routing_policy::kv_aware};
  c.max_index_keys = 2;
  auto r = make_router(c);
  EXPECT_TRUE(r.add_slot().has_value());
  const auto abc = keys(1, 3);
  r.stored(0, abc);
  EXPECT_EQ(r.index_size(), 2U);
  EXPECT_EQ(r.held_prefix(0, abc), 2U);
  EXPECT_FALSE(holds(r, 0, abc[2]));
  // A prefix's leading blocks outlast its later ones: new keys replace B
  // first, then A.
  const auto d = keys(2, 1);
  r.stored(0, d);
  EXPECT_EQ(r.held_prefix(0, abc), 1U);
  EXPECT_TRUE(holds(r, 0, d[0]));
  const auto e = keys(3, 1);
  r.stored(0, e);
  EXPECT_EQ(r.held_prefix(0, abc), 0U);
  EXPECT_TRUE(holds(r, 0, d[0]));
  EXPECT_TRUE(holds(r, 0, e[0]));
  // Over a full index of other keys, a long call replaces them, then
  // keeps its own leading keys.
  const auto chain = keys(4, 5);
  r.stored(0, chain);
  EXPECT_EQ(r.index_size(), 2U);
  EXPECT_EQ(r.held_prefix(0, chain), 2U);
  EXPECT_FALSE(holds(r, 0, d[0]));
  EXPECT_FALSE(holds(r, 0, e[0]));
}

/// A plain model of the index's use order for Router.IndexMatchesAPlainModel:
/// a vector, most recent first, where a call's keys move to the front in
/// their order (`m`: how many the call placed so far).
struct plain_index {
  std::size_t bound;
  std::vector<std::pair<block_key, std::uint64_t>> order;
  std::size_t m = 0;

  void begin_call() { m = 0; }
  std::size_t find(const block_key& k) const {
    for (std::size_t i = 0; i < order.size(); ++i)
      if (order[i].first == k)
        return i;
    return order.size();
  }
  /// Marks `k` used (adding it when missing) and returns its place;
  /// order.size() when it is not indexed.
  std::size_t use(const block_key& k, bool add) {
    auto i = find(k);
    if (i == order.size()) {
      if (!add)
        return i;
      if (order.size() >= bound) {
        if (m >= order.size())
          return order.size(); // every entry is this call's: k not indexed
        order.pop_back();
      }
      order.insert(order.begin() + static_cast<std::ptrdiff_t>(m), {k, 0});
      return m++;
    }
    // Used earlier in this call: it moves to the call's last place.
    const std::size_t to = i < m ? m - 1 : m;
    auto e = order[i];
    order.erase(order.begin() + static_cast<std::ptrdiff_t>(i));
    order.insert(order.begin() + static_cast<std::ptrdiff_t>(to), e);
    if (i >= m)
      ++m;
    return to;
  }
  void drop_bit(const block_key& k, std::uint64_t bit) {
    auto i = find(k);
    if (i == order.size())
      return;
    order[i].second &= ~bit;
    if (order[i].second == 0)
      order.erase(order.begin() + static_cast<std::ptrdiff_t>(i));
  }
};

/// Random stores, evictions, picks and slots going down, fixed seed: the
/// router's index, `max_index_keys` long, holds the keys and engines the
/// plain model does. Calls carry 1 to 6 keys.
void expect_index_matches_a_plain_model(std::size_t max_index_keys) {
  router_config c{routing_policy::kv_aware};
  c.max_index_keys = max_index_keys;
  auto r = make_router(c);
  for (int s = 0; s < 3; ++s)
    EXPECT_TRUE(r.add_slot().has_value());
  plain_index model{c.max_index_keys, {}, 0};
  std::mt19937_64 rng{7};
  const auto some_keys = [&] {
    std::vector<block_key> out(1 + rng() % 6);
    for (auto& k : out)
      k = block_key{rng() % 4, 1 + rng() % 12};
    return out;
  };
  for (int step = 0; step < 5000; ++step) {
    const auto slot = static_cast<std::uint32_t>(rng() % 3);
    const std::uint64_t bit = std::uint64_t{1} << slot;
    const auto ks = some_keys();
    switch (rng() % 9) {
    case 0:
    case 1:
    case 5:
      r.stored(slot, ks);
      model.begin_call();
      for (const auto& k : ks)
        if (auto i = model.use(k, true); i < model.order.size())
          model.order[i].second |= bit;
      break;
    case 2:
    case 3:
      r.evicted(slot, ks);
      for (const auto& k : ks)
        model.drop_bit(k, bit);
      break;
    case 4: { // down and back: the slot's entries are forgotten
      r.set_up(slot, false);
      r.set_up(slot, true);
      std::vector<block_key> all;
      for (const auto& e : model.order)
        all.push_back(e.first);
      for (const auto& k : all)
        model.drop_bit(k, bit);
      break;
    }
    default: {
      // Every slot is up: a key counts as used while some slot's matched
      // prefix reaches it.
      (void)r.pick(ks);
      model.begin_call();
      std::uint64_t alive = 0b111;
      for (const auto& k : ks) {
        auto i = model.find(k);
        const std::uint64_t has =
            i == model.order.size() ? 0 : model.order[i].second;
        if ((has & alive) != 0)
          model.use(k, false);
        alive &= has;
        if (alive == 0)
          break;
      }
    }
    }
    ASSERT_EQ(r.index_size(), model.order.size()) << "step " << step;
    for (std::uint32_t s = 0; s < 3; ++s) {
      auto held = r.keys_of(s);
      std::vector<block_key> want;
      for (const auto& [k, engines] : model.order)
        if ((engines >> s) & 1U)
          want.push_back(k);
      std::sort(held.begin(), held.end());
      std::sort(want.begin(), want.end());
      ASSERT_EQ(held, want) << "slot " << s << ", step " << step;
      // The count that spares forget() and keys_of() a walk of the index
      // for a slot holding nothing.
      ASSERT_EQ(r.keys_held(s), want.size())
          << "slot " << s << ", step " << step;
    }
  }
}

TEST(Router, IndexMatchesAPlainModel) {
  expect_index_matches_a_plain_model(24);
}

TEST(Router, AnIndexShorterThanACallMatchesAPlainModel) {
  // Stored calls of more new keys than the index holds, whose later keys
  // find every entry used by the call itself.
  expect_index_matches_a_plain_model(4);
}

TEST(Router, RemovedSlotsAreReusedAndSlotsAreBounded) {
  auto r = make_router(router_config{routing_policy::kv_aware});
  for (std::uint32_t i = 0; i < router::max_slots; ++i)
    ASSERT_EQ(r.add_slot().value(), i);
  EXPECT_FALSE(r.add_slot().has_value());
  auto k = keys(1, 4);
  r.stored(5, k);
  r.started(5);
  r.remove_slot(5);
  EXPECT_EQ(r.live_slots(), router::max_slots - 1);
  EXPECT_EQ(r.index_size(), 0U);
  EXPECT_EQ(r.add_slot().value(), 5U);
  EXPECT_TRUE(r.is_up(5));
  EXPECT_EQ(r.in_flight(5), 0U);
  EXPECT_EQ(r.held_prefix(5, k), 0U);
  EXPECT_EQ(r.slot_count(), router::max_slots);
  EXPECT_FALSE(r.add_slot().has_value());
}

TEST(Router, WeightsSlotNumbersAndPoliciesOutsideTheirRanges) {
  auto r = make_router(router_config{routing_policy::kv_aware});
  // A weight that is not finite and > 0 is an error (before, taken as 1
  // by add_slot and ignored by set_weight).
  for (const double bad :
       {0.0, -5.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    auto slot = r.add_slot(bad);
    ASSERT_FALSE(slot.has_value()) << bad;
    EXPECT_EQ(slot.error().code, errc::invalid_argument);
    EXPECT_NE(slot.error().message.find("weight"), std::string::npos);
  }
  EXPECT_EQ(r.slot_count(), 0U);
  // A tiny weight makes a busy slot's score infinite: still picked when it
  // is the only live one (before, pick found none).
  ASSERT_EQ(r.add_slot(1e-320).value(), 0U);
  r.started(0);
  auto k = keys(1, 4);
  ASSERT_TRUE(r.pick(k).has_value());
  EXPECT_EQ(r.pick(k)->slot, 0U);
  EXPECT_FALSE(r.set_weight(0, std::nan("")).has_value());
  EXPECT_TRUE(r.set_weight(0, 2.0).has_value());
  // Slot numbers past the slots hold nothing: no shift past 64 bits (before,
  // evicted(64) cleared slot 0's keys).
  r.stored(0, k);
  ASSERT_EQ(r.held_prefix(0, k), 4U);
  r.evicted(64, k);
  r.evicted(1000, k);
  EXPECT_EQ(r.held_prefix(0, k), 4U);
  EXPECT_EQ(r.held_prefix(64, k), 0U);
  EXPECT_TRUE(r.keys_of(64).empty());
  EXPECT_EQ(r.keys_of(0).size(), 4U);
  // A policy that is none of the three (before, routed as least_loaded).
  router_config c;
  c.policy = static_cast<routing_policy>(99);
  auto ok = validate(c);
  ASSERT_FALSE(ok.has_value());
  EXPECT_NE(ok.error().message.find("router_config.policy 99"),
            std::string::npos)
      << ok.error().message;
}

TEST(Router, RejectsAnEmptyIndexBoundAsAnErrorValue) {
  router_config c{routing_policy::kv_aware};
  EXPECT_TRUE(validate(c).has_value());
  c.max_index_keys = 0; // stored() would erase begin() of an empty map
  auto ok = validate(c);
  ASSERT_FALSE(ok.has_value());
  EXPECT_EQ(ok.error().code, errc::invalid_argument);
  // A router built from it is the same error value, not an abort.
  auto r = router::create(c);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, errc::invalid_argument);
  EXPECT_NE(r.error().message.find("max_index_keys"), std::string::npos)
      << r.error().message;
}

TEST(Router, RejectsCreditsThatWouldMisrouteAsErrorValues) {
  const std::pair<void (*)(router_config&), const char*> cases[] = {
      {[](router_config& c) { c.credit_per_block = std::nan(""); },
       "router_config.credit_per_block"},
      {[](router_config& c) { c.credit_per_block = -0.25; },
       "router_config.credit_per_block"},
      {[](router_config& c) {
         c.credit_per_block = std::numeric_limits<double>::infinity();
       },
       "router_config.credit_per_block"},
      {[](router_config& c) { c.max_credit = -1.0; },
       "router_config.max_credit"},
      {[](router_config& c) { c.overload_credit_factor = 1.5; },
       "router_config.overload_credit_factor"},
      {[](router_config& c) { c.overload_credit_factor = -0.1; },
       "router_config.overload_credit_factor"},
  };
  for (const auto& [edit, name] : cases) {
    router_config c{routing_policy::kv_aware};
    edit(c);
    auto r = router::create(c);
    ASSERT_FALSE(r.has_value()) << name;
    EXPECT_EQ(r.error().code, errc::invalid_argument);
    EXPECT_NE(r.error().message.find(name), std::string::npos)
        << r.error().message;
  }
  // The ends of each range are accepted.
  router_config edges{routing_policy::kv_aware};
  edges.credit_per_block = 0.0;
  edges.max_credit = 0.0;
  edges.overload_credit_factor = 1.0;
  EXPECT_TRUE(validate(edges).has_value());
}

TEST(ConfigChecks, DurationsAreBoundedOnBothSides) {
  EXPECT_TRUE(check_duration("x", 1ns).has_value());
  EXPECT_TRUE(check_duration("x", std::chrono::hours{24}).has_value());
  EXPECT_TRUE(check_duration("x", 0ms, true).has_value());
  EXPECT_FALSE(check_duration("x", 0ms).has_value());
  EXPECT_FALSE(check_duration("x", -1ms, true).has_value());
  EXPECT_FALSE(check_duration("x", std::chrono::hours{24} + 1ns).has_value());
  // "No timeout" written as the type's largest value would wrap to -1 ms
  // once converted to the clock's nanoseconds.
  auto never = check_duration("node_config.call_timeout",
                              std::chrono::milliseconds::max());
  ASSERT_FALSE(never.has_value());
  EXPECT_EQ(never.error().code, errc::invalid_argument);
  EXPECT_EQ(never.error().message,
            "node_config.call_timeout must be positive and at most 24 h, not " +
                std::to_string(std::chrono::milliseconds::max().count()) +
                " ms");
  EXPECT_FALSE(check_duration("x", std::chrono::seconds::max(), false,
                              std::chrono::hours{24 * 365})
                   .has_value());
  EXPECT_TRUE(check_duration("x", std::chrono::hours{24 * 365}, false,
                             std::chrono::hours{24 * 365})
                  .has_value());
}

TEST(ConfigChecks, RangesHonourTheirEndsAndRefuseNaN) {
  using end = end_point;
  EXPECT_TRUE(check_range("f", 0.0, 0.0, end::closed, 1.0, end::open));
  EXPECT_FALSE(check_range("f", 1.0, 0.0, end::closed, 1.0, end::open));
  EXPECT_FALSE(check_range("f", 0.0, 0.0, end::open, 1.0, end::closed));
  EXPECT_TRUE(check_range("f", 1.0, 0.0, end::open, 1.0, end::closed));
  EXPECT_FALSE(
      check_range("f", std::nan(""), 0.0, end::closed, 1.0, end::closed));
  EXPECT_TRUE(check_range("f", 1e300, 1.0, end::open, unbounded, end::open));
  auto inf = check_range("g", std::numeric_limits<double>::infinity(), 1.0,
                         end::open, unbounded, end::open);
  ASSERT_FALSE(inf.has_value());
  EXPECT_EQ(inf.error().message, "g must be finite and above 1, not inf");
  auto nan = check_range("f", std::nan(""), 0.0, end::closed, 1.0, end::open);
  ASSERT_FALSE(nan.has_value());
  EXPECT_EQ(nan.error().message, "f must be in [0, 1), not nan");
}

TEST(Router, ParsesPolicyNames) {
  EXPECT_EQ(*parse_routing_policy("kv_aware"), routing_policy::kv_aware);
  EXPECT_FALSE(parse_routing_policy("random").has_value());
}

scaler_config fast_scaler() {
  scaler_config c;
  c.target = 500ms;
  c.window = 10s;
  c.cooldown = 60s;
  c.min_samples = 5;
  c.sustain = 2;
  c.min_replicas = 1;
  c.max_replicas = 2;
  return c;
}

/// The policy for `c`; a configuration create() rejects fails the test
/// (value() throws).
scaler_policy make_scaler(const scaler_config& c, std::uint32_t replicas,
                          std::uint32_t capacity_tokens) {
  auto s = scaler_policy::create(c, replicas, capacity_tokens);
  EXPECT_TRUE(s.has_value()) << s.error().describe();
  return std::move(s).value();
}

void feed(scaler_policy& s, engine::nanos at, engine::nanos latency,
          int n = 10) {
  for (int i = 0; i < n; ++i)
    ASSERT_TRUE(s.record(at, latency));
}

/// Steps `s` from time 0 one cooldown of fast_scaler() (60 s) at a time:
/// each step feeds 10 samples of a latency and evaluates.
struct cooldown_steps {
  scaler_policy& s;
  engine::nanos t{0};
  scale_action operator()(engine::nanos latency) {
    t += 61s;
    feed(s, t, latency);
    return s.evaluate(t).action;
  }
};

TEST(ScalerPolicy, CountsEveryDecisionHoldsTooAndRefusesANegativeLatency) {
  auto s = make_scaler(fast_scaler(), 1, 4096);
  engine::nanos t{0};
  // A negative latency would pull the p95 below every real one.
  auto bad = s.record(t, -5ns);
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code, errc::invalid_argument);
  EXPECT_EQ(s.kept_samples(), 0U);
  feed(s, t, 800ms);
  EXPECT_EQ(s.evaluate(t).action, scale_action::hold); // sustain: 1 of 2
  t += 1s;
  feed(s, t, 800ms);
  EXPECT_EQ(s.evaluate(t).action, scale_action::spawn_replica);
  t += 1s;
  EXPECT_EQ(s.evaluate(t).action, scale_action::hold); // cooldown
  // Counted, holds too (before, count(hold) stayed 0); only actions are
  // logged, so the log is not flooded with holds.
  EXPECT_EQ(s.count(scale_action::hold), 2U);
  EXPECT_EQ(s.count(scale_action::spawn_replica), 1U);
  EXPECT_EQ(s.log().size(), 1U);
}

TEST(ScalerPolicy, ScalesUpAboveTargetThenGrowsCapacityRespectingCooldown) {
  auto s = make_scaler(fast_scaler(), 1, 4096);
  engine::nanos t{0};
  feed(s, t, 800ms);
  EXPECT_EQ(s.evaluate(t).action, scale_action::hold); // sustain: 1 of 2
  t += 1s;
  feed(s, t, 800ms);
  EXPECT_EQ(s.evaluate(t).action, scale_action::spawn_replica);
  EXPECT_EQ(s.replicas(), 2U);
  // Cooldown: no decision for 60 s, however slow.
  for (int i = 0; i < 5; ++i) {
    t += 10s;
    feed(s, t, 900ms);
    EXPECT_EQ(s.evaluate(t).action, scale_action::hold);
  }
  t += 11s;
  feed(s, t, 900ms);
  s.evaluate(t);
  t += 1s;
  feed(s, t, 900ms);
  auto d = s.evaluate(t);
  EXPECT_EQ(d.action, scale_action::grow_capacity); // max replicas reached
  EXPECT_EQ(s.capacity_tokens(), 6144U);
  EXPECT_EQ(s.count(scale_action::spawn_replica), 1U);
  EXPECT_EQ(s.count(scale_action::grow_capacity), 1U);
  EXPECT_EQ(s.log().size(), 2U);
}

TEST(ScalerPolicy, HoldsWhileAChangeIsUnansweredAndCoolsDownFromItsAnswer) {
  // A spawn at 1 s is answered at 100 s (its replica opened that long):
  // every evaluation in between holds, also past the 60 s cooldown, and the
  // answer starts the cooldown again and clears the window, so the next
  // decision comes 60 s after it, on latencies measured since. A refused
  // answer leaves the cooldown as it was.
  auto s = make_scaler(fast_scaler(), 1, 4096);
  engine::nanos t{0};
  feed(s, t, 800ms);
  s.evaluate(t);
  t += 1s;
  feed(s, t, 800ms);
  ASSERT_EQ(s.evaluate(t).action, scale_action::spawn_replica);
  s.change_started();
  EXPECT_TRUE(s.change_pending());
  while (t < 99s) {
    t += 1s;
    feed(s, t, 900ms);
    EXPECT_EQ(s.evaluate(t).action, scale_action::hold) << t.count();
  }
  t += 1s;
  s.change_done(t, true);
  EXPECT_FALSE(s.change_pending());
  EXPECT_EQ(s.window_requests(t), 0U) << "cleared at the answer";
  EXPECT_TRUE(s.in_cooldown(t + 59s));
  EXPECT_FALSE(s.in_cooldown(t + 60s));
  const engine::nanos answered = t;
  while (t < answered + 60s) {
    feed(s, t, 900ms);
    EXPECT_EQ(s.evaluate(t).action, scale_action::hold) << t.count();
    t += 1s;
  }
  feed(s, t, 900ms);
  s.evaluate(t);
  t += 1s;
  feed(s, t, 900ms);
  EXPECT_EQ(s.evaluate(t).action, scale_action::grow_capacity);

  // Refused: no new cooldown from the answer.
  auto r = make_scaler(fast_scaler(), 1, 4096);
  engine::nanos u{0};
  feed(r, u, 800ms);
  r.evaluate(u);
  u += 1s;
  feed(r, u, 800ms);
  ASSERT_EQ(r.evaluate(u).action, scale_action::spawn_replica);
  r.change_started();
  u += 30s;
  r.refused(scale_action::spawn_replica);
  r.change_done(u, false);
  EXPECT_FALSE(r.change_pending());
  EXPECT_FALSE(r.in_cooldown(61s));
}

TEST(ScalerPolicy, ItsDecisionLogKeepsOnlyTheRecentOnes) {
  // No cooldown: load swinging between slow and fast scales up and down at
  // every second evaluation, for as long as the scaler runs. Its log keeps
  // the latest max_log decisions; its counts keep them all.
  auto c = fast_scaler();
  c.cooldown = 0s;
  c.sustain = 1;
  auto s = make_scaler(c, 1, 4096);
  engine::nanos t{0};
  constexpr int rounds = 3000;
  for (int i = 0; i < rounds; ++i) {
    t += 20s; // the last round's samples leave the window
    feed(s, t, i % 2 == 0 ? 900ms : 10ms);
    ASSERT_NE(s.evaluate(t).action, scale_action::hold) << i;
  }
  EXPECT_EQ(s.count(scale_action::spawn_replica) +
                s.count(scale_action::retire_replica),
            static_cast<std::uint64_t>(rounds));
  const std::size_t kept = s.log().size();
  EXPECT_EQ(kept, 1024U); // scaler_policy::max_log
  EXPECT_EQ(s.log().back().at, t);
  EXPECT_EQ(s.log().front().at, t - 20s * static_cast<std::int64_t>(kept - 1));
}

TEST(ScalerPolicy, CapacityCapsAt16384AndFloorsAt2048) {
  auto c = fast_scaler();
  c.max_replicas = 1;
  c.cooldown = 0s;
  auto s = make_scaler(c, 1, 12000);
  engine::nanos t{0};
  for (int i = 0; i < 4; ++i) {
    t += 1s;
    feed(s, t, 2s);
    s.evaluate(t);
  }
  EXPECT_EQ(s.capacity_tokens(), 16384U);
  for (int i = 0; i < 40; ++i) {
    t += 1s;
    feed(s, t, 10ms);
    s.evaluate(t);
  }
  EXPECT_EQ(s.capacity_tokens(), 2048U);
}

TEST(ScalerPolicy, EveryCapacityDecisionChangesTheCapacity) {
  // A factor close to 1 on a small budget rounds back to the same size:
  // each decision still moves it by at least one token.
  auto c = fast_scaler();
  c.max_replicas = 1;
  c.cooldown = 0s;
  c.min_capacity_tokens = 8;
  c.max_capacity_tokens = 12;
  c.grow_factor = 1.01;
  c.shrink_factor = 0.99;
  auto s = make_scaler(c, 1, 10);
  engine::nanos t{0};
  for (int i = 0; i < 2; ++i) {
    t += 1s;
    feed(s, t, 2s);
    s.evaluate(t);
  }
  EXPECT_EQ(s.count(scale_action::grow_capacity), 1U);
  EXPECT_EQ(s.capacity_tokens(), 11U);
  for (int i = 0; i < 2; ++i) {
    t += 1s;
    feed(s, t, 10ms);
    s.evaluate(t);
  }
  EXPECT_EQ(s.count(scale_action::shrink_capacity), 1U);
  EXPECT_EQ(s.capacity_tokens(), 10U);
}

TEST(ScalerPolicy, ScalesDownBelowPointThreeTargetHoldsInBand) {
  auto s = make_scaler(fast_scaler(), 2, 4096);
  engine::nanos t{0};
  // 200 ms is inside the band [150 ms, 500 ms]: hold.
  for (int i = 0; i < 4; ++i) {
    t += 1s;
    feed(s, t, 200ms);
    EXPECT_EQ(s.evaluate(t).action, scale_action::hold);
  }
  t += 20s; // old samples leave the window
  feed(s, t, 100ms);
  EXPECT_EQ(s.evaluate(t).action, scale_action::hold);
  t += 1s;
  feed(s, t, 100ms);
  EXPECT_EQ(s.evaluate(t).action, scale_action::retire_replica);
  EXPECT_EQ(s.replicas(), 1U);
  t += 61s;
  feed(s, t, 100ms);
  s.evaluate(t);
  t += 1s;
  feed(s, t, 100ms);
  EXPECT_EQ(s.evaluate(t).action, scale_action::shrink_capacity);
  EXPECT_EQ(s.capacity_tokens(), 3277U);
}

TEST(ScalerPolicy, RejectsConfigurationsThatBreakInvariantsAsErrorValues) {
  EXPECT_TRUE(validate(fast_scaler()).has_value());
  struct bad_case {
    const char* what;
    void (*edit)(scaler_config&);
  };
  const bad_case cases[] = {
      {"sustain", [](scaler_config& c) { c.sustain = 0; }},
      // Any latency is above a target of 0: it would scale up for good.
      {"scaler_config.target", [](scaler_config& c) { c.target = 0s; }},
      {"scaler_config.target",
       [](scaler_config& c) { c.target = engine::nanos::max(); }},
      // The band below the target would reach above it.
      {"scaler_config.low_fraction",
       [](scaler_config& c) { c.low_fraction = 1.0; }},
      {"scaler_config.low_fraction",
       [](scaler_config& c) { c.low_fraction = std::nan(""); }},
      {"scaler_config.low_fraction",
       [](scaler_config& c) { c.low_fraction = -0.1; }},
      {"scaler_config.window", [](scaler_config& c) { c.window = 0s; }},
      {"scaler_config.window",
       [](scaler_config& c) { c.window = std::chrono::hours{25}; }},
      {"scaler_config.cooldown", [](scaler_config& c) { c.cooldown = -1s; }},
      // A grow that shrinks, or a shrink that grows past the bounds.
      {"scaler_config.grow_factor",
       [](scaler_config& c) { c.grow_factor = 1.0; }},
      {"scaler_config.grow_factor",
       [](scaler_config& c) { c.grow_factor = 0.5; }},
      {"scaler_config.grow_factor",
       [](scaler_config& c) { c.grow_factor = std::nan(""); }},
      {"scaler_config.shrink_factor",
       [](scaler_config& c) { c.shrink_factor = 1.5; }},
      {"scaler_config.shrink_factor",
       [](scaler_config& c) { c.shrink_factor = 0.0; }},
      {"min_capacity_tokens",
       [](scaler_config& c) {
         c.min_capacity_tokens = 4096;
         c.max_capacity_tokens = 2048;
       }},
      // An engine reads a budget of 0 as no limit: a shrink to 0 lifted it.
      {"scaler_config.min_capacity_tokens must be at least 1",
       [](scaler_config& c) { c.min_capacity_tokens = 0; }},
      {"min_replicas",
       [](scaler_config& c) {
         c.min_replicas = 3;
         c.max_replicas = 2;
       }},
      // The balancer never retires its last live engine: every scale-down
      // would be that refused retire, never a shrink.
      {"scaler_config.min_replicas must be at least 1",
       [](scaler_config& c) { c.min_replicas = 0; }},
  };
  for (const auto& bc : cases) {
    auto c = fast_scaler();
    bc.edit(c);
    auto ok = validate(c);
    ASSERT_FALSE(ok.has_value()) << bc.what;
    EXPECT_EQ(ok.error().code, errc::invalid_argument);
    EXPECT_NE(ok.error().message.find(bc.what), std::string::npos)
        << ok.error().message;
    // A policy built from it is the same error value, not an abort.
    auto s = scaler_policy::create(c, 1, 4096);
    ASSERT_FALSE(s.has_value()) << bc.what;
    EXPECT_EQ(s.error().code, errc::invalid_argument);
    EXPECT_NE(s.error().message.find(bc.what), std::string::npos)
        << s.error().message;
  }
}

TEST(ScalerPolicy, RejectsAStartingCapacityOutsideItsRange) {
  // The scaler counts from the engines' budget: clamping it into the range
  // would leave the two disagreeing from the first decision.
  const auto c = fast_scaler(); // [2048, 16384]
  for (std::uint32_t tokens : {1000U, 2047U, 16385U}) {
    auto s = scaler_policy::create(c, 1, tokens);
    ASSERT_FALSE(s.has_value()) << tokens << " became " << s->capacity_tokens();
    EXPECT_EQ(s.error().code, errc::invalid_argument);
    EXPECT_NE(
        s.error().message.find("capacity_tokens (" + std::to_string(tokens) +
                               ") is outside the scaler's range [2048, 16384]"),
        std::string::npos)
        << s.error().message;
  }
  for (std::uint32_t tokens : {2048U, 16384U})
    EXPECT_EQ(make_scaler(c, 1, tokens).capacity_tokens(), tokens);
}

TEST(ScalerPolicy, ARefusedReplicaChangeIsUndone) {
  auto c = fast_scaler();
  c.sustain = 1;
  auto s = make_scaler(c, 1, 4096);
  feed(s, engine::nanos{0}, 800ms);
  EXPECT_EQ(s.evaluate(engine::nanos{0}).action, scale_action::spawn_replica);
  EXPECT_EQ(s.replicas(), 2U);
  s.refused(scale_action::spawn_replica); // e.g. no free engine slot
  EXPECT_EQ(s.replicas(), 1U);
  auto down = make_scaler(c, 2, 4096);
  feed(down, engine::nanos{0}, 10ms);
  EXPECT_EQ(down.evaluate(engine::nanos{0}).action,
            scale_action::retire_replica);
  down.refused(scale_action::retire_replica); // the last live engine
  EXPECT_EQ(down.replicas(), 2U);
  EXPECT_EQ(s.refusals(), 1U);
  EXPECT_EQ(down.refusals(), 1U);
}

TEST(ScalerPolicy, AfterARefusedReplicaChangeItChangesTheCapacity) {
  // A factory that cannot start an engine (no device left) refuses every
  // spawn: the scale-ups after the first refusal grow the capacity to its
  // cap, then a spawn is tried again. A retire the balancer refuses (its
  // last live engine) turns the scale-downs to shrinking the same way.
  // (Before, the same refused change was decided at every cooldown and
  // the capacity never moved.)
  auto c = fast_scaler(); // max_replicas 2, cooldown 60 s
  c.sustain = 1;
  c.max_capacity_tokens = 6144;
  auto s = make_scaler(c, 1, 4096);
  cooldown_steps next{s};
  ASSERT_EQ(next(800ms), scale_action::spawn_replica);
  s.refused(scale_action::spawn_replica);
  EXPECT_EQ(next(800ms), scale_action::grow_capacity);
  EXPECT_EQ(s.capacity_tokens(), 6144U);
  EXPECT_EQ(next(800ms), scale_action::spawn_replica) << "capacity at cap";
  EXPECT_EQ(s.replicas(), 2U);
  // Down: the balancer refuses to retire its last live engine.
  ASSERT_EQ(next(10ms), scale_action::retire_replica);
  s.refused(scale_action::retire_replica);
  for (std::uint32_t tokens : {4915U, 3932U, 3146U, 2517U, 2048U}) {
    EXPECT_EQ(next(10ms), scale_action::shrink_capacity);
    EXPECT_EQ(s.capacity_tokens(), tokens);
  }
  EXPECT_EQ(next(10ms), scale_action::retire_replica) << "capacity at floor";
  EXPECT_EQ(s.replicas(), 1U);
  EXPECT_EQ(s.refusals(), 2U);
}

TEST(ScalerPolicy, ARefusedReplacementTurnsToCapacityWhenLatencyAsks) {
  // Below min_replicas (an engine given up) with every spawn refused (no
  // device left): while p95 is above the target the capacity grows; at
  // low latency, or once the capacity is at its cap, the replacement is
  // tried again. (Before, the same refused replacement was decided at
  // every cooldown and the capacity never moved.)
  auto c = fast_scaler(); // max_replicas 2, cooldown 60 s
  c.sustain = 1;
  c.min_replicas = 2;
  c.max_capacity_tokens = 6144;
  auto s = make_scaler(c, 2, 4096);
  s.replica_lost();
  engine::nanos t{0};
  const auto next = [&](engine::nanos latency) {
    t += 61s;
    feed(s, t, latency, 30);
    return s.evaluate(t);
  };
  auto d = next(800ms);
  ASSERT_EQ(d.action, scale_action::spawn_replica);
  EXPECT_TRUE(d.below_min);
  s.refused(scale_action::spawn_replica);
  d = next(800ms);
  EXPECT_EQ(d.action, scale_action::grow_capacity);
  EXPECT_EQ(s.capacity_tokens(), 6144U);
  d = next(800ms); // at the cap: the replacement again
  EXPECT_EQ(d.action, scale_action::spawn_replica);
  EXPECT_TRUE(d.below_min);
  s.refused(scale_action::spawn_replica);
  d = next(200ms); // in the band: the floor is restored whatever
  EXPECT_EQ(d.action, scale_action::spawn_replica);
  EXPECT_TRUE(d.below_min);
  EXPECT_EQ(s.replicas(), 2U);
}

TEST(ScalerPolicy, ASpawnRefusedLateTurnsTheNextScaleUpToCapacity) {
  // The balancer answered the spawn with an error only after the scaler's
  // timeout (a factory slow to fail): the count waits for the resync, and
  // the next scale-up grows the capacity as after a refusal in time.
  auto c = fast_scaler(); // max_replicas 2
  c.sustain = 1;
  auto s = make_scaler(c, 1, 4096);
  engine::nanos t{0};
  feed(s, t, 800ms);
  ASSERT_EQ(s.evaluate(t).action, scale_action::spawn_replica);
  s.change_unanswered();
  s.refused_late(scale_action::spawn_replica);
  EXPECT_EQ(s.replicas(), 2U) << "left to the resync";
  EXPECT_TRUE(s.resync(1));
  t += 61s;
  feed(s, t, 800ms);
  EXPECT_EQ(s.evaluate(t).action, scale_action::grow_capacity);
}

TEST(ScalerPolicy, AReplicaChangeTheOtherWayEndsARefusalsTurnToCapacity) {
  // A retire refused (the balancer's last live engine, say while another
  // restarts), then the fleet grows: the next scale-down retires again. And
  // a spawn refused (no device), then a replica retired: the next scale-up
  // spawns again. (Before, each refusal turned every later change its way
  // to the capacity until the capacity hit its bound: from 16384 tokens,
  // ten shrinks, one per cooldown, before any replica was retired.)
  auto c = fast_scaler(); // cooldown 60 s
  c.sustain = 1;
  c.max_replicas = 3;
  auto s = make_scaler(c, 2, 16384);
  cooldown_steps next{s};
  ASSERT_EQ(next(10ms), scale_action::retire_replica);
  s.refused(scale_action::retire_replica);
  ASSERT_EQ(next(800ms), scale_action::spawn_replica);
  EXPECT_EQ(s.replicas(), 3U);
  EXPECT_EQ(next(10ms), scale_action::retire_replica);
  EXPECT_EQ(s.capacity_tokens(), 16384U);

  auto up = make_scaler(c, 2, 4096);
  cooldown_steps up_next{up};
  ASSERT_EQ(up_next(800ms), scale_action::spawn_replica);
  up.refused(scale_action::spawn_replica);
  ASSERT_EQ(up_next(10ms), scale_action::retire_replica);
  EXPECT_EQ(up_next(800ms), scale_action::spawn_replica);
  EXPECT_EQ(up.capacity_tokens(), 4096U);

  // Both refused, the one the other had cleared too: both refusals stand,
  // so the capacity moves (a spawn and a retire refused at every cooldown
  // is the loop refused() ends).
  auto both = make_scaler(c, 2, 8192);
  cooldown_steps both_next{both};
  ASSERT_EQ(both_next(800ms), scale_action::spawn_replica);
  both.refused(scale_action::spawn_replica);
  ASSERT_EQ(both_next(10ms), scale_action::retire_replica);
  both.refused(scale_action::retire_replica);
  EXPECT_EQ(both_next(800ms), scale_action::grow_capacity);
  EXPECT_EQ(both_next(10ms), scale_action::shrink_capacity);
}

TEST(ScalerPolicy, ASampleSeenEarlierThanTheNewestLeavesTheWindowInItsTime) {
  // Samples at 100 s, then some stamped 95 s and 80 s (clocks that
  // disagree): those of 80 s are out of the window already, and those of
  // 95 s leave it at 105 s, before those of 100 s. (Before, each went to the
  // back and stayed until the 100 s ones left: a p95 of 900 ms at 107 s.)
  // One stamped far ahead (1000 s) does not keep later ones out.
  auto c = fast_scaler(); // window 10 s
  auto s = make_scaler(c, 1, 4096);
  feed(s, 100s, 100ms, 20);
  feed(s, 95s, 900ms, 20);
  feed(s, 80s, 900ms, 5);
  EXPECT_EQ(s.window_requests(104s), 40U);
  EXPECT_EQ(s.p95(104s), 900ms);
  EXPECT_EQ(s.window_requests(107s), 20U);
  EXPECT_EQ(s.p95(107s), 100ms);
  EXPECT_EQ(s.window_requests(111s), 0U);
  feed(s, 1000s, 100ms, 1);
  feed(s, 120s, 900ms, 20);
  EXPECT_EQ(s.window_requests(125s), 21U);
  EXPECT_EQ(s.p95(125s), 900ms);
}

TEST(ScalerPolicy, ALostReplicaLowersTheCountSoTheNextScaleUpSpawns) {
  auto c = fast_scaler();
  c.sustain = 1;
  c.max_replicas = 2;
  auto s = make_scaler(c, 2, 4096);
  s.replica_lost(); // the balancer gave an engine up
  EXPECT_EQ(s.replicas(), 1U);
  EXPECT_EQ(s.losses(), 1U);
  feed(s, engine::nanos{0}, 800ms);
  EXPECT_EQ(s.evaluate(engine::nanos{0}).action, scale_action::spawn_replica);
  EXPECT_EQ(s.replicas(), 2U);
}

TEST(ScalerPolicy, RestoresMinReplicasAfterALossRespectingCooldown) {
  auto c = fast_scaler(); // cooldown 60 s
  c.min_replicas = 2;
  c.max_replicas = 3;
  auto s = make_scaler(c, 2, 4096);
  engine::nanos t{0};
  EXPECT_EQ(s.evaluate(t).action, scale_action::hold);
  s.replica_lost();
  t += 1s; // no latency sample at all: the floor comes first
  auto d = s.evaluate(t);
  EXPECT_EQ(d.action, scale_action::spawn_replica);
  EXPECT_TRUE(d.below_min);
  EXPECT_EQ(d.replicas, 2U);
  s.replica_lost();
  t += 30s;
  EXPECT_EQ(s.evaluate(t).action, scale_action::hold); // in the cooldown
  EXPECT_EQ(s.replicas(), 1U);
  t += 31s;
  d = s.evaluate(t);
  EXPECT_EQ(d.action, scale_action::spawn_replica);
  EXPECT_TRUE(d.below_min);
  EXPECT_EQ(s.replicas(), 2U);
  EXPECT_EQ(s.replacements(), 2U);
  EXPECT_EQ(s.count(scale_action::spawn_replica), 2U);
  EXPECT_EQ(s.losses(), 2U);
  // A latency-driven spawn is not a replacement.
  t += 61s;
  feed(s, t, 800ms);
  s.evaluate(t);
  t += 1s;
  feed(s, t, 800ms);
  d = s.evaluate(t);
  EXPECT_EQ(d.action, scale_action::spawn_replica);
  EXPECT_FALSE(d.below_min);
  EXPECT_EQ(s.replacements(), 2U);
}

TEST(ScalerPolicy, ABusyWindowKeepsBoundedSamplesAndItsP95) {
  // 200,000 requests in one window, every 10th of them slow (10%), then
  // every 50th (2%), then every 16th (a period that keeping every 2^k-th
  // request would alias with): the window keeps at most max_samples
  // latencies, each weighing for the requests it stands for, and still
  // reads the p95 the requests have. Before, it kept one per request,
  // without bound.
  auto c = fast_scaler();
  c.window = 100s;
  for (const int slow_every : {10, 50, 16}) {
    auto s = make_scaler(c, 1, 4096);
    constexpr int n = 200'000;
    for (int i = 0; i < n; ++i) {
      const engine::nanos at = std::chrono::microseconds{i};
      ASSERT_TRUE(s.record(at, (i % slow_every == 0) ? 2s : 10ms));
      ASSERT_LE(s.kept_samples(), scaler_policy::max_samples);
    }
    const engine::nanos end = std::chrono::microseconds{n};
    // An estimate once sampled: within 2%.
    EXPECT_NEAR(static_cast<double>(s.window_requests(end)), n, n * 0.02);
    EXPECT_EQ(s.p95(end),
              slow_every == 50 ? engine::nanos{10ms} : engine::nanos{2s})
        << slow_every;
    // The window moves on: old samples leave with their weights.
    const engine::nanos later = end + 100s - 1ms;
    ASSERT_TRUE(s.record(later, 10ms));
    EXPECT_LT(s.window_requests(later), static_cast<std::uint64_t>(n) / 50);
  }
}

TEST(ScalerPolicy, AfterABusySpellTheWindowIsExactAgainAtHalfItsBound) {
  // 30,000 requests in a 100 s window (sampled), then 8,000 per window:
  // once the busy spell's samples have left, every request is kept again.
  auto c = fast_scaler();
  c.window = 100s;
  auto s = make_scaler(c, 1, 4096);
  for (int i = 0; i < 30'000; ++i)
    ASSERT_TRUE(s.record(std::chrono::microseconds{i * 3'333}, 10ms));
  EXPECT_LT(s.kept_samples(), 30'000U);
  engine::nanos t = 100s;
  for (int i = 0; i < 16'000; ++i, t += 12'500us) // 8,000 per 100 s
    ASSERT_TRUE(s.record(t, 10ms));
  EXPECT_EQ(s.kept_samples(), s.window_requests(t));
  EXPECT_NEAR(static_cast<double>(s.window_requests(t)), 8'000, 1);
}

TEST(ScalerPolicy, AnIdleFleetHoldsUnlessMinSamplesIsZero) {
  auto c = fast_scaler(); // min_samples 5, sustain 2, replicas 1..2
  auto holds = make_scaler(c, 2, 4096);
  EXPECT_EQ(holds.evaluate(engine::nanos{0}).action, scale_action::hold);
  EXPECT_EQ(holds.evaluate(1s).action, scale_action::hold);
  c.min_samples = 0; // an empty window reads a p95 of 0: below the band
  auto idle = make_scaler(c, 2, 4096);
  EXPECT_EQ(idle.evaluate(engine::nanos{0}).action, scale_action::hold);
  EXPECT_EQ(idle.evaluate(1s).action, scale_action::retire_replica);
}

TEST(ScalerPolicy, TooFewSamplesHold) {
  auto s = make_scaler(fast_scaler(), 1, 4096);
  feed(s, engine::nanos{0}, 5s, 2);
  EXPECT_EQ(s.evaluate(engine::nanos{0}).action, scale_action::hold);
  EXPECT_EQ(s.evaluate(engine::nanos{0}).action, scale_action::hold);
}

/// A model of `c`, which must be valid.
transition_model model(const transition_config& c) {
  auto m = transition_model::create(c);
  EXPECT_TRUE(m.has_value()) << m.error().describe();
  return std::move(m).value();
}

/// A model keeping `top_k` successors per query that never ages them.
transition_model unaged_model(std::size_t top_k) {
  transition_config c;
  c.top_k = top_k;
  c.aging_interval = 0;
  return model(c);
}

TEST(TransitionModel, PredictsLearnedPattern) {
  auto m = model(transition_config{});
  for (std::uint64_t session = 1; session <= 5; ++session) {
    m.observe(session, "A");
    m.observe(session, "B");
  }
  m.observe(6, "A");
  m.observe(6, "C");
  auto p = m.predict("A");
  ASSERT_TRUE(p);
  EXPECT_EQ(p->query, "B");
  EXPECT_NEAR(p->confidence, 5.0 / 6.0, 1e-9);
  EXPECT_FALSE(m.predict("B").has_value());
}

TEST(TransitionModel, ARepeatIsATransitionLikeAnyOther) {
  // Session 7 asks A 100 times, then B once: B followed A in 1 of 100
  // transitions, overall and in the session (before, repeats were not
  // counted and B read confidence 1).
  auto m = model(transition_config{});
  for (int i = 0; i < 100; ++i)
    m.observe(7, "A");
  m.observe(7, "B");
  for (const auto& p : {m.predict("A"), m.predict(7, "A")}) {
    ASSERT_TRUE(p);
    EXPECT_EQ(p->query, "A");
    EXPECT_NEAR(p->confidence, 99.0 / 100.0, 1e-9);
  }
  // A query a session keeps coming back to learns that it repeats, not
  // only where the session went after it.
  auto r = model(transition_config{});
  for (std::uint64_t session = 1; session <= 5; ++session) {
    r.observe(session, "round:1");
    for (int i = 0; i < 3; ++i)
      r.observe(session, "round:2");
    r.observe(session, "end");
  }
  const auto p = r.predict("round:2");
  ASSERT_TRUE(p);
  EXPECT_EQ(p->query, "round:2");
  EXPECT_NEAR(p->confidence, 10.0 / 15.0, 1e-9);
  // Asked for another query than the repeat (a prefetcher's question),
  // the next likeliest, its confidence still out of every transition.
  for (const auto& o :
       {r.predict_other("round:2"), r.predict_other(3, "round:2")}) {
    ASSERT_TRUE(o);
    EXPECT_EQ(o->query, "end");
    EXPECT_NEAR(o->confidence, 5.0 / 15.0, 1e-9);
  }
  // Session 7's own table: A repeated 99 times, then B.
  const auto b = m.predict_other(7, "A");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->query, "B");
  EXPECT_NEAR(b->confidence, 1.0 / 100.0, 1e-9);
}

TEST(TransitionModel, SessionsDoNotCrossTalk) {
  auto m = model(transition_config{});
  m.observe(1, "A");
  m.observe(2, "X");
  m.observe(1, "B");
  EXPECT_EQ(m.predict("A")->query, "B");
  EXPECT_FALSE(m.predict("X").has_value());
}

TEST(TransitionModel, ASessionsOwnPatternWinsOnceItHasRecurred) {
  // Session 1 goes A -> B five times; sessions 2..9 go A -> C once each.
  // Overall C leads, but session 1 back at A gets B. A session that went
  // A -> B once (below session_min_count 2) gets the overall C. Aged
  // below the minimum, session 1's own count gives way too. (Before,
  // counts were overall only: session 1 got C.)
  transition_config c;
  c.aging_interval = 0;
  auto m = model(c);
  for (int i = 0; i < 5; ++i) {
    m.observe(1, "A");
    m.observe(1, "B");
  }
  for (std::uint64_t session = 2; session <= 9; ++session) {
    m.observe(session, "A");
    m.observe(session, "C");
  }
  m.observe(20, "A");
  m.observe(20, "B");
  const auto overall = m.predict("A");
  ASSERT_TRUE(overall);
  EXPECT_EQ(overall->query, "C");
  const auto own = m.predict(1, "A");
  ASSERT_TRUE(own);
  EXPECT_EQ(own->query, "B");
  EXPECT_TRUE(own->session);
  EXPECT_NEAR(own->confidence, 1.0, 1e-9);
  const auto once = m.predict(20, "A");
  ASSERT_TRUE(once);
  EXPECT_EQ(once->query, "C");
  EXPECT_FALSE(once->session);
  EXPECT_EQ(m.predict(99, "A")->query, "C") << "an unknown session";
  m.age(); // 5 -> 2.5: still its own
  EXPECT_EQ(m.predict(1, "A")->query, "B");
  m.age(); // 1.25: below 2
  EXPECT_EQ(m.predict(1, "A")->query, "C");
  // Session 0 is anonymous traffic, many users interleaved: A -> B twice
  // there is no one's habit.
  for (int i = 0; i < 2; ++i) {
    m.observe(0, "A");
    m.observe(0, "B");
  }
  EXPECT_FALSE(m.predict(0, "A")->session);
}

TEST(TransitionModel, ASessionKeepsTheLastQueriesItLeftOnly) {
  // session_queries 2: after A -> B twice, then C -> D and E -> F twice
  // each, A is the query it left least recently: forgotten there, so the
  // overall table answers (A -> X from other sessions three times).
  transition_config c;
  c.aging_interval = 0;
  c.session_queries = 2;
  auto m = model(c);
  for (std::uint64_t session = 10; session < 13; ++session) {
    m.observe(session, "A");
    m.observe(session, "X");
  }
  const std::vector<std::pair<std::string, std::string>> moves = {
      {"A", "B"}, {"C", "D"}, {"E", "F"}};
  for (const auto& [from, to] : moves)
    for (int i = 0; i < 2; ++i) {
      m.observe(1, from);
      m.observe(1, to);
    }
  EXPECT_EQ(m.predict(1, "A")->query, "X");
  EXPECT_EQ(m.predict(1, "C")->query, "D");
  EXPECT_EQ(m.predict(1, "E")->query, "F");
  // 0 keeps overall counts only.
  c.session_queries = 0;
  auto overall = model(c);
  for (int i = 0; i < 3; ++i) {
    overall.observe(1, "A");
    overall.observe(1, "B");
  }
  overall.observe(2, "A");
  overall.observe(2, "C");
  EXPECT_FALSE(overall.predict(2, "A")->session);
  c.session_min_count = std::nan("");
  EXPECT_FALSE(transition_model::create(c).has_value());
}

TEST(TransitionModel, ForgetsStalePatternsAndStaysBounded) {
  transition_config c;
  c.aging_interval = 0; // age by hand
  c.max_queries = 3;
  c.top_k = 2;
  auto m = model(c);
  for (int i = 0; i < 3; ++i) {
    m.observe(1, "A");
    m.observe(1, "B");
  }
  ASSERT_TRUE(m.predict("A"));
  for (int i = 0; i < 4; ++i)
    m.age(); // 3 x 0.5^4 < 0.5
  EXPECT_FALSE(m.predict("A").has_value());
  for (int i = 0; i < 10; ++i) {
    m.observe(2, "q" + std::to_string(i));
  }
  EXPECT_LE(m.query_count(), 3U);
}

TEST(TransitionModel, ConfidenceCountsSuccessorsNotKept) {
  // A -> B three times, then A -> 997 other queries once each: B stays the
  // strongest kept successor, but it followed A only 3 times in 1,000. The
  // confidence used to be taken over the kept successors only (3 of 4 with
  // top_k 2, always 1 with top_k 1), which passed any threshold.
  for (const std::size_t top_k : {1U, 2U, 4U}) {
    auto m = unaged_model(top_k);
    for (int i = 0; i < 3; ++i) {
      m.observe(1, "A");
      m.observe(1, "B");
    }
    for (int i = 0; i < 997; ++i) {
      m.observe(1, "A");
      m.observe(1, "x" + std::to_string(i));
    }
    // B, no heavy hitter, may have given its place to a one-off (which
    // surely followed A once): either way the confidence is what the
    // successor surely got of all 1,000.
    auto p = m.predict("A");
    ASSERT_TRUE(p) << top_k;
    const double sure = p->query == "B" ? 3.0 : 1.0;
    EXPECT_NEAR(p->confidence, sure / 1000.0, 1e-9) << top_k << p->query;
    // Aging scales the total with the counts, so the ratio stays.
    m.age();
    p = m.predict("A");
    ASSERT_TRUE(p) << top_k;
    EXPECT_NEAR(p->confidence, sure / 1000.0, 1e-9) << top_k;
  }
}

TEST(TransitionModel, ANewPatternTakesOverFromStrongOnesWithoutAging) {
  // Before, a successor came in only when the weakest kept one had a count
  // of 1 or less: after A -> B 100 times (top_k 1), A -> C was predicted
  // only after ~40,000 transitions, and never with B, D, E and F kept
  // (top_k 4) until aging brought them down. Now, with every slot (top_k
  // and the spare) taken, the newcomer takes the weakest's place and
  // count, as possible overcount: it is predicted at >= 0.5 once it surely
  // followed A as often as all the rest.
  struct start {
    std::size_t top_k;
    std::vector<std::pair<std::string, int>> seen;
    int total;  // transitions from A seen before C
    int needed; // A -> C transitions until C is predicted at >= 0.5
  };
  for (const auto& [top_k, seen, total, needed] :
       {start{1, {{"B", 100}, {"G", 10}}, 110, 110},
        start{4,
              {{"B", 10}, {"D", 10}, {"E", 10}, {"F", 10}, {"G", 10}},
              50,
              50}}) {
    auto m = unaged_model(top_k);
    for (const auto& [q, n] : seen)
      for (int i = 0; i < n; ++i) {
        m.observe(1, "A");
        m.observe(1, q);
      }
    for (int i = 1; i <= needed; ++i) {
      m.observe(1, "A");
      m.observe(1, "C");
      auto p = m.predict("A");
      ASSERT_TRUE(p) << top_k << " " << i;
      if (p->query == "C") {
        EXPECT_NEAR(p->confidence, i / (total + double(i)), 1e-9);
      }
      if (i < needed) {
        EXPECT_FALSE(p->query == "C" && p->confidence >= 0.5)
            << top_k << " " << i;
      }
    }
    auto p = m.predict("A");
    ASSERT_TRUE(p) << top_k;
    EXPECT_EQ(p->query, "C") << top_k;
    EXPECT_GE(p->confidence, 0.5) << top_k;
  }
}

TEST(TransitionModel, AStrayTransitionDoesNotDisplaceTheOnlyStrongSuccessor) {
  // top_k 1: A -> B 100 times, then one A -> C. B stays predicted at
  // 100 / 101 (the spare slot takes C); without it, C took B's only place,
  // and B, back at once, was predicted at 1 / 102 for ~100 transitions.
  auto m = unaged_model(1);
  for (int i = 0; i < 100; ++i) {
    m.observe(1, "A");
    m.observe(1, "B");
  }
  m.observe(1, "A");
  m.observe(1, "C");
  auto p = m.predict("A");
  ASSERT_TRUE(p);
  EXPECT_EQ(p->query, "B");
  EXPECT_NEAR(p->confidence, 100.0 / 101.0, 1e-9);
}

TEST(TransitionModel, TheLargestTopKIsUnbounded) {
  // top_k + 1 wrapped to 0 there: the first successor was written through
  // the end of an empty list.
  transition_config c;
  c.top_k = std::numeric_limits<std::size_t>::max();
  auto m = model(c);
  m.observe(1, "A");
  m.observe(1, "B");
  auto p = m.predict("A");
  ASSERT_TRUE(p);
  EXPECT_EQ(p->query, "B");
}

TEST(TransitionModel, OneOffsDoNotDisplaceAHeavyHitter) {
  // A successor that followed more than total / top_k of the transitions is
  // kept whatever the one-offs between (space-saving): B, 60% of A's
  // successors, stays predicted among 400 one-offs with top_k 2.
  auto m = unaged_model(2);
  for (int i = 0; i < 1000; ++i) {
    m.observe(1, "A");
    m.observe(1, i % 5 < 3 ? std::string("B") : "x" + std::to_string(i));
  }
  auto p = m.predict("A");
  ASSERT_TRUE(p);
  EXPECT_EQ(p->query, "B");
  EXPECT_NEAR(p->confidence, 0.6, 1e-9);
}

TEST(TransitionModel, CreateRefusesBoundsThatWereTakenAsOne) {
  const auto refused = [](transition_config c, std::string_view what) {
    auto m = transition_model::create(c);
    ASSERT_FALSE(m.has_value()) << what;
    EXPECT_EQ(m.error().code, errc::invalid_argument);
    EXPECT_NE(m.error().message.find(what), std::string::npos)
        << m.error().message;
  };
  transition_config c;
  c.top_k = 0;
  refused(c, "top_k");
  c = {};
  c.max_queries = 0;
  refused(c, "max_queries");
  c = {};
  c.max_sessions = 0;
  refused(c, "max_sessions");
  c = {};
  c.decay = std::numeric_limits<double>::quiet_NaN();
  refused(c, "decay");
  c = {};
  c.min_count = std::numeric_limits<double>::infinity();
  refused(c, "min_count");
  c = {};
  c.aging_interval = 0; // never ages by itself: allowed
  EXPECT_TRUE(transition_model::create(c).has_value());
}

/// A tracker of `max_outstanding` (>= 1) prefetches.
prefetch_tracker tracker(std::size_t max_outstanding) {
  auto t = prefetch_tracker::create(max_outstanding);
  EXPECT_TRUE(t.has_value()) << t.error().describe();
  return std::move(t).value();
}

using outcome = prefetch_tracker::outcome;
using served = prefetch_tracker::served;

/// Served by engine `engine` with `matched` leading blocks from cache.
served on(std::uint32_t engine, std::uint64_t matched) {
  return served{engine, matched, false};
}

/// A request over `keys`.
std::vector<block_key> req(std::initializer_list<block_key> keys) {
  return keys;
}

TEST(PrefetchTracker, TheKeysItHoldsAreBoundedToo) {
  // At most 5 keys in all: B's 3 push A's 3 out (forgotten); a prefetch
  // of 6 is refused. (Before, only the count was bounded: prefetches
  // sharing a long prefix held gigabytes.)
  auto made = prefetch_tracker::create(10, 5);
  ASSERT_TRUE(made.has_value());
  auto& t = *made;
  const std::vector<block_key> three = {block_key{1, 1}, block_key{1, 2},
                                        block_key{1, 3}};
  ASSERT_TRUE(t.add("A", three));
  ASSERT_TRUE(t.add("B", three)); // the same prefix
  EXPECT_FALSE(t.contains("A"));
  EXPECT_TRUE(t.contains("B"));
  EXPECT_EQ(t.keys_held(), 3U);
  EXPECT_EQ(t.forgotten(), 1U);
  auto big = t.add("C", std::vector<block_key>(6, block_key{2, 1}));
  ASSERT_FALSE(big.has_value());
  EXPECT_EQ(big.error().code, errc::invalid_argument);
  EXPECT_NE(big.error().message.find("max_keys"), std::string::npos);
  EXPECT_TRUE(t.contains("B")) << "a refused prefetch changes nothing";
  // B's blocks are still indexed by it: its engine's eviction wastes it.
  EXPECT_EQ(t.answered("B", 0, 0), outcome::pending);
  EXPECT_EQ(t.evicted(0, block_key{1, 2}), std::vector<std::string>{"B"});
  EXPECT_EQ(t.keys_held(), 0U);
  EXPECT_EQ(t.index_size(), 0U);
  auto none = prefetch_tracker::create(10, 0);
  ASSERT_FALSE(none.has_value());
  EXPECT_EQ(none.error().code, errc::invalid_argument);
}

TEST(PrefetchQueryId, LongQueriesAreKnownByAFixedSizeDigest) {
  const std::string short_q(64, 'q');
  EXPECT_EQ(prefetch_query_id(short_q), short_q);
  EXPECT_EQ(prefetch_query_id("hello"), "hello");
  const std::string long_a(10'000, 'a');
  std::string long_b = long_a;
  long_b.back() = 'b';
  const auto a = prefetch_query_id(long_a);
  EXPECT_EQ(a.size(), 65U) << "never the size of a query kept as itself";
  EXPECT_EQ(a, prefetch_query_id(long_a));
  EXPECT_NE(a, prefetch_query_id(long_b));
  EXPECT_EQ(prefetch_query_id(short_q + "x").size(), 65U);
}

TEST(PrefetchTracker, ResolvedPrefetchesLeaveNothingBehind) {
  auto t = tracker(4);
  for (std::uint64_t i = 0; i < 10'000; ++i) {
    const auto q = "q" + std::to_string(i % 7);
    const block_key k{i, 1};
    ASSERT_TRUE(t.add(q, {k}));
    if (i % 4 == 0) { // answered, then its query requested
      EXPECT_EQ(t.answered(q, 0, 0), outcome::pending);
      EXPECT_EQ(t.used(q, req({k}), on(0, 1)), outcome::useful);
    } else if (i % 4 == 2) { // its query requested, then answered
      EXPECT_EQ(t.used(q, req({k}), on(0, 1)), outcome::pending);
      EXPECT_EQ(t.answered(q, 0, 0), outcome::useful);
    } else {
      EXPECT_EQ(t.answered(q, 0, 3), outcome::pending);
      EXPECT_EQ(t.evicted(3, k), std::vector<std::string>{q});
    }
    ASSERT_EQ(t.size(), 0U);
    ASSERT_EQ(t.index_size(), 0U);
    ASSERT_LE(t.order_size(), 4U) << "after " << i + 1 << " prefetches";
  }
  EXPECT_EQ(t.order_size(), 0U);
}

TEST(PrefetchTracker, ARequestUsingOnlyBlocksCachedBeforeItIsNoUse) {
  // The prefetch of B found a, b in memory and computed c, d. B's next
  // request shares a, b only: it found what it would have found without
  // the prefetch, and c, d went unused. Wasted, in either order. (Before,
  // useful.) Sharing c as well, it is useful.
  const std::vector<block_key> prefetched{block_key{1, 1}, block_key{1, 2},
                                          block_key{1, 3}, block_key{1, 4}};
  const std::vector<block_key> two_shared{block_key{1, 1}, block_key{1, 2},
                                          block_key{9, 9}};
  const std::vector<block_key> three_shared{block_key{1, 1}, block_key{1, 2},
                                            block_key{1, 3}};
  for (const bool answered_first : {true, false}) {
    SCOPED_TRACE(answered_first ? "answered first" : "requested first");
    for (const auto* keys : {&two_shared, &three_shared}) {
      auto t = tracker(4);
      ASSERT_TRUE(t.add("B", prefetched));
      const auto want = keys == &two_shared ? outcome::wasted : outcome::useful;
      const auto how = on(0, keys == &three_shared ? 3 : 2);
      if (answered_first) {
        EXPECT_EQ(t.answered("B", 0, 0, false, 2), outcome::pending);
        EXPECT_EQ(t.used("B", *keys, how), want);
      } else {
        EXPECT_EQ(t.used("B", *keys, how), outcome::pending);
        EXPECT_EQ(t.answered("B", 0, 0, false, 2), want);
      }
    }
  }
}

TEST(PrefetchTracker, FullEvictsTheOldestOutstandingOne) {
  auto t = tracker(2);
  ASSERT_TRUE(t.add("B", {block_key{2, 1}}));
  EXPECT_EQ(t.answered("B", 0, 0), outcome::pending);
  EXPECT_EQ(t.used("B", req({block_key{2, 1}}), on(0, 1)), outcome::useful);
  ASSERT_TRUE(t.add("C", {block_key{3, 1}})); // oldest outstanding
  ASSERT_TRUE(t.add("B", {block_key{2, 1}}));
  ASSERT_TRUE(t.add("D", {block_key{4, 1}})); // full: C goes, not the newer B
  EXPECT_FALSE(t.contains("C"));
  EXPECT_TRUE(t.contains("B"));
  EXPECT_TRUE(t.contains("D"));
  EXPECT_EQ(t.forgotten(), 1U);
  EXPECT_EQ(t.answered("C", 0, 0), outcome::none);
  EXPECT_EQ(t.answered("B", 0, 0), outcome::pending);
  EXPECT_TRUE(t.evicted(0, block_key{3, 1}).empty());
  EXPECT_EQ(t.evicted(0, block_key{2, 1}), std::vector<std::string>{"B"});
  EXPECT_EQ(t.size(), 1U);
  EXPECT_EQ(t.order_size(), 1U);
}

TEST(PrefetchTracker, PrefetchesSharingABlockEachKeepTheirClaimOnIt) {
  // A and B share their first block (a common prefix).
  const block_key shared{1, 1};
  auto t = tracker(4);
  ASSERT_TRUE(t.add("A", {shared, block_key{2, 1}}));
  ASSERT_TRUE(t.add("B", {shared, block_key{3, 1}}));
  ASSERT_EQ(t.answered("A", 0, 0), outcome::pending);
  ASSERT_EQ(t.answered("B", 0, 0), outcome::pending);
  // Evicting the shared block wastes both, not only the later one.
  auto wasted = t.evicted(0, shared);
  std::sort(wasted.begin(), wasted.end());
  EXPECT_EQ(wasted, (std::vector<std::string>{"A", "B"}));
  EXPECT_EQ(t.size(), 0U);
  EXPECT_EQ(t.index_size(), 0U);
  // Resolving one leaves the other's claim on the shared block.
  ASSERT_TRUE(t.add("A", {shared, block_key{2, 1}}));
  ASSERT_TRUE(t.add("B", {shared, block_key{3, 1}}));
  ASSERT_EQ(t.answered("A", 0, 0), outcome::pending);
  ASSERT_EQ(t.answered("B", 0, 0), outcome::pending);
  EXPECT_EQ(t.used("B", req({shared, block_key{3, 1}}), on(0, 2)),
            outcome::useful);
  EXPECT_EQ(t.evicted(0, shared), std::vector<std::string>{"A"});
  // Wasted already: not useful as well.
  EXPECT_EQ(t.used("A", req({shared, block_key{2, 1}}), on(0, 2)),
            outcome::none);
  EXPECT_EQ(t.size(), 0U);
  EXPECT_EQ(t.index_size(), 0U);
  // A key listed twice in one prefetch is indexed once and dropped cleanly.
  ASSERT_TRUE(t.add("C", {shared, shared}));
  EXPECT_EQ(t.index_size(), 1U);
  ASSERT_EQ(t.answered("C", 0, 0), outcome::pending);
  EXPECT_EQ(t.evicted(0, shared), std::vector<std::string>{"C"});
  EXPECT_EQ(t.index_size(), 0U);
}

TEST(PrefetchTracker, OnlyTheEngineThatAnsweredAPrefetchWastesItByEvicting) {
  // Before, an eviction by any engine wasted it: with replicas holding the
  // same prefix, one replica's eviction wasted a prefetch another served.
  const block_key k{1, 1};
  auto t = tracker(4);
  ASSERT_TRUE(t.add("A", {k}, 5));
  // Reported before the answer: the prefetch may have stored the block
  // again after that eviction. Its query's request decides.
  EXPECT_TRUE(t.evicted(2, k).empty());
  EXPECT_EQ(t.answered("A", 5, 2), outcome::pending);
  EXPECT_TRUE(t.evicted(0, k).empty()); // another engine's copy
  EXPECT_TRUE(t.contains("A"));
  EXPECT_EQ(t.evicted(2, k), std::vector<std::string>{"A"});
  EXPECT_FALSE(t.contains("A"));
  // Evicted before the answer and gone for good: the request, which had
  // to compute it again, finds it wasted.
  ASSERT_TRUE(t.add("B", {k}, 6));
  EXPECT_TRUE(t.evicted(2, k).empty());
  EXPECT_EQ(t.answered("B", 6, 2), outcome::pending);
  EXPECT_EQ(t.used("B", req({k}), on(2, 0)), outcome::wasted);
}

TEST(PrefetchTracker, ItsQuerysRequestDecidesByHowItWasServed) {
  const block_key a{1, 1};
  const block_key b{2, 1};
  auto t = tracker(8);
  auto answered = [&](const std::string& q, std::uint32_t engine,
                      bool in_result_cache = false) {
    EXPECT_TRUE(t.add(q, {a, b}, 1));
    EXPECT_EQ(t.answered(q, 1, engine, in_result_cache), outcome::pending);
  };
  answered("same engine, all found", 1);
  EXPECT_EQ(
      t.used("same engine, all found", req({a, b, block_key{3, 1}}), on(1, 2)),
      outcome::useful);
  answered("another engine", 1);
  EXPECT_EQ(t.used("another engine", req({a, b}), on(0, 2)), outcome::wasted);
  answered("computed again", 1);
  EXPECT_EQ(t.used("computed again", req({a, b}), on(1, 1)), outcome::wasted);
  answered("shares nothing", 1);
  EXPECT_EQ(t.used("shares nothing", req({block_key{9, 9}}), on(1, 1)),
            outcome::wasted);
  // A shorter request needs only the blocks it shares.
  answered("shorter", 1);
  EXPECT_EQ(t.used("shorter", req({a}), on(1, 1)), outcome::useful);
  // Answered from the result cache: useful only when the prefetch's own
  // answer was stored there; then its blocks' evictions do not matter.
  answered("result stored", 1, true);
  EXPECT_TRUE(t.evicted(1, a).empty());
  EXPECT_EQ(t.used("result stored", req({a, b}), served{0, 0, true}),
            outcome::useful);
  answered("blocks only", 1);
  EXPECT_EQ(t.used("blocks only", req({a, b}), served{0, 0, true}),
            outcome::wasted);
  // Requested before the answer: the first request's verdict waits for it.
  ASSERT_TRUE(t.add("early", {a, b}, 7));
  EXPECT_EQ(t.used("early", req({a, b}), on(1, 0)), outcome::pending);
  EXPECT_EQ(t.used("early", req({a, b}), on(1, 2)), outcome::pending);
  EXPECT_EQ(t.answered("early", 7, 1), outcome::wasted); // the first one
  ASSERT_TRUE(t.add("early", {a, b}, 8));
  EXPECT_EQ(t.used("early", req({a, b}), on(1, 2)), outcome::pending);
  EXPECT_EQ(t.answered("early", 8, 0), outcome::wasted); // other engine
  ASSERT_TRUE(t.add("early", {a, b}, 9));
  EXPECT_EQ(t.used("early", req({a, b}), on(1, 2)), outcome::pending);
  EXPECT_EQ(t.answered("early", 9, 1), outcome::useful);
  // A second answer of one prefetch changes nothing.
  ASSERT_TRUE(t.add("twice", {a}, 3));
  EXPECT_EQ(t.answered("twice", 3, 1), outcome::pending);
  EXPECT_EQ(t.answered("twice", 3, 0), outcome::none);
  EXPECT_EQ(t.evicted(1, a), std::vector<std::string>{"twice"});
  EXPECT_EQ(t.size(), 0U);
  EXPECT_EQ(t.index_size(), 0U);
}

TEST(PrefetchTracker,
     ADiscardedPrefetchIsResolvedOnlyIfStillTheOutstandingOne) {
  const block_key k1{1, 1};
  const block_key k2{2, 1};
  auto t = tracker(4);
  ASSERT_TRUE(t.add("A", {k1}, 7));
  EXPECT_FALSE(t.discard("A", 8)); // not that prefetch
  EXPECT_TRUE(t.contains("A"));
  EXPECT_TRUE(t.discard("A", 7));
  EXPECT_FALSE(t.contains("A"));
  EXPECT_EQ(t.index_size(), 0U);
  EXPECT_EQ(t.order_size(), 0U);
  EXPECT_EQ(t.used("A", req({k1}), on(0, 1)), outcome::none); // neither
  EXPECT_TRUE(t.evicted(0, k1).empty());                      // nor wasted
  // A prefetch whose query was requested before its request failed: the
  // failure resolves it, never useful.
  ASSERT_TRUE(t.add("B", {k2}, 9));
  EXPECT_EQ(t.used("B", req({k2}), on(0, 1)), outcome::pending);
  EXPECT_TRUE(t.contains("B"));
  EXPECT_TRUE(t.discard("B", 9));
  EXPECT_FALSE(t.contains("B"));
  EXPECT_EQ(t.answered("B", 9, 0), outcome::none);
  // A discard of a resolved prefetch leaves a later one of the query alone.
  ASSERT_TRUE(t.add("B", {k2}, 10));
  EXPECT_EQ(t.answered("B", 10, 0), outcome::pending);
  EXPECT_EQ(t.used("B", req({k2}), on(0, 1)), outcome::useful);
  ASSERT_TRUE(t.add("B", {k2}, 11));
  EXPECT_FALSE(t.discard("B", 10));
  EXPECT_EQ(t.answered("B", 10, 0), outcome::none);
  EXPECT_TRUE(t.contains("B"));
  EXPECT_EQ(t.used("B", req({k2}), on(0, 1)), outcome::pending);
  EXPECT_EQ(t.answered("B", 11, 0), outcome::useful);
  EXPECT_FALSE(t.contains("B"));
}

TEST(PrefetchTracker, CreateRejectsRoomForNothing) {
  // Not quietly taken as 1.
  auto none = prefetch_tracker::create(0);
  ASSERT_FALSE(none.has_value());
  EXPECT_EQ(none.error().code, errc::invalid_argument);
  EXPECT_NE(none.error().message.find("max_outstanding"), std::string::npos)
      << none.error().describe();
  auto one = prefetch_tracker::create(1);
  ASSERT_TRUE(one.has_value()) << one.error().describe();
  ASSERT_TRUE(one->add("A", {block_key{1, 1}}));
  ASSERT_TRUE(one->add("B", {block_key{2, 1}})); // full: A goes
  EXPECT_FALSE(one->contains("A"));
  EXPECT_TRUE(one->contains("B"));
}

TEST(PrefetchTracker, AddingAnOutstandingQueryIsAnErrorAndChangesNothing) {
  auto t = tracker(3);
  ASSERT_TRUE(t.add("A", {block_key{1, 1}}));
  ASSERT_TRUE(t.add("B", {block_key{2, 1}}));
  auto again = t.add("A", {block_key{3, 1}});
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().code, errc::invalid_argument);
  EXPECT_NE(again.error().message.find("'A'"), std::string::npos)
      << again.error().describe();
  // The first prefetch of A is tracked as it was: its keys, its age, and
  // no second entry in the age order or the index.
  EXPECT_EQ(t.size(), 2U);
  EXPECT_EQ(t.order_size(), 2U);
  EXPECT_EQ(t.index_size(), 2U);
  EXPECT_EQ(t.answered("A", 0, 0), outcome::pending);
  EXPECT_TRUE(t.evicted(0, block_key{3, 1}).empty());
  ASSERT_TRUE(t.add("C", {block_key{4, 1}}));
  ASSERT_TRUE(t.add("D", {block_key{5, 1}})); // full: A, still the oldest
  EXPECT_FALSE(t.contains("A"));
  EXPECT_TRUE(t.contains("B"));
  EXPECT_TRUE(t.contains("C"));
  EXPECT_TRUE(t.evicted(0, block_key{1, 1}).empty()); // A left nothing
  EXPECT_EQ(t.size(), 3U);
  EXPECT_EQ(t.order_size(), 3U);
  EXPECT_EQ(t.index_size(), 3U);
}

TEST(EmbeddedQueryStore, ExpiresAtTtl) {
  embedded_query_store s;
  ASSERT_TRUE(s.set("q", "v", 3600s, engine::nanos{0}));
  auto before =
      s.get("q", std::chrono::duration_cast<engine::nanos>(3600s) - 1ns);
  ASSERT_TRUE(before);
  EXPECT_EQ(before->value_or(""), "v");
  auto at = s.get("q", std::chrono::duration_cast<engine::nanos>(3600s));
  ASSERT_TRUE(at);
  EXPECT_FALSE(at->has_value());
  EXPECT_EQ(s.expirations(), 1U);
  EXPECT_FALSE(s.set("q", "v", 0s, engine::nanos{0}));
}

TEST(EmbeddedQueryStore, ATtlPastTheClocksRangeNeverExpires) {
  // now + ttl would wrap negative: the entry used to expire at once.
  embedded_query_store s;
  const engine::nanos now = 3600s;
  ASSERT_TRUE(s.set("q", "v", engine::nanos::max(), now));
  auto got = s.get("q", now);
  ASSERT_TRUE(got);
  EXPECT_EQ(got->value_or(""), "v");
  ASSERT_TRUE(s.set("q", "w", engine::nanos::max() - 1ns, now + 1s));
  got = s.get("q", engine::nanos::max() - 1ns);
  ASSERT_TRUE(got);
  EXPECT_EQ(got->value_or(""), "w");
  EXPECT_EQ(s.expirations(), 0U);
}

TEST(EmbeddedQueryStore, BoundedLeastRecentlyUsedFirst) {
  embedded_query_store s{2};
  ASSERT_TRUE(s.set("a", "1", 10s, engine::nanos{0}));
  ASSERT_TRUE(s.set("b", "2", 10s, engine::nanos{0}));
  ASSERT_TRUE(s.get("a", engine::nanos{0})); // a is now more recent
  ASSERT_TRUE(s.set("c", "3", 10s, engine::nanos{0}));
  EXPECT_TRUE(s.get("a", engine::nanos{0})->has_value());
  EXPECT_FALSE(s.get("b", engine::nanos{0})->has_value());
  EXPECT_EQ(s.size(), 2U);
}

TEST(EmbeddedQueryStore, BoundedInBytesLeastRecentlyUsedFirst) {
  // Three entries of 1 KiB keys fit 3.5 KiB with their bookkeeping; the
  // fourth sends the least recently used one away (before, only the entry
  // count bounded the store, whatever the keys weighed).
  constexpr std::size_t each =
      1024 + 1 + embedded_query_store::entry_overhead_bytes;
  embedded_query_store s{100, 3 * each + each / 2};
  const auto key = [](char c) { return std::string(1024, c); };
  for (char c : {'a', 'b', 'c'})
    ASSERT_TRUE(s.set(key(c), "v", 10s, engine::nanos{0}));
  EXPECT_EQ(s.bytes(), 3 * each);
  ASSERT_TRUE(s.get(key('a'), engine::nanos{0})); // b is now the oldest
  ASSERT_TRUE(s.set(key('d'), "v", 10s, engine::nanos{0}));
  EXPECT_EQ(s.size(), 3U);
  EXPECT_EQ(s.bytes(), 3 * each);
  EXPECT_FALSE(s.get(key('b'), engine::nanos{0})->has_value());
  EXPECT_TRUE(s.get(key('a'), engine::nanos{0})->has_value());
  // A longer value for a key counts its new size: c, then a go.
  ASSERT_TRUE(
      s.set(key('d'), std::string(2 * each, 'v'), 10s, engine::nanos{0}));
  EXPECT_EQ(s.size(), 1U);
  EXPECT_LE(s.bytes(), 3 * each + each / 2);
  // An entry larger than the whole bound is refused, and drops the key's
  // older value (it would answer for the one refused).
  auto big = s.set(key('d'), std::string(4 * each, 'v'), 10s, engine::nanos{0});
  ASSERT_FALSE(big);
  EXPECT_EQ(big.error().code, errc::invalid_argument);
  EXPECT_FALSE(s.get(key('d'), engine::nanos{0})->has_value());
  EXPECT_EQ(s.bytes(), 0U);
  // Expiry gives the bytes back too.
  ASSERT_TRUE(s.set(key('e'), "v", 10s, engine::nanos{0}));
  EXPECT_FALSE(s.get(key('e'), engine::nanos{10s})->has_value());
  EXPECT_EQ(s.bytes(), 0U);
}

TEST(MemoryManager, FreesDownToTargetOnlyAboveThreshold) {
  memory_pressure_config c;
  EXPECT_EQ(bytes_to_free(c, 900, 1000), 0U);
  EXPECT_EQ(bytes_to_free(c, 950, 1000), 150U);
  EXPECT_EQ(bytes_to_free(c, 10, 0), 0U);
}

} // namespace
} // namespace kvfleet::actors

namespace kvfleet::actors {
namespace {

TEST(CafError, KvfleetErrorsRoundTripAndCafErrorsMapToTheirCodes) {
  for (errc c : {errc::invalid_argument, errc::not_found, errc::busy,
                 errc::timeout, errc::out_of_memory, errc::unavailable,
                 errc::checksum_mismatch, errc::backend_error}) {
    const kvfleet::error back = from_caf_error(to_caf_error({c, "why"}));
    EXPECT_EQ(back.code, c) << to_string(c);
    EXPECT_EQ(back.message, "why");
  }
  EXPECT_EQ(from_caf_error(caf::make_error(caf::sec::request_timeout)).code,
            errc::timeout);
  EXPECT_EQ(
      from_caf_error(caf::make_error(caf::sec::request_receiver_down)).code,
      errc::unavailable);
  EXPECT_EQ(from_caf_error(caf::make_error(caf::sec::unexpected_message)).code,
            errc::invalid_argument);
}

} // namespace
} // namespace kvfleet::actors
