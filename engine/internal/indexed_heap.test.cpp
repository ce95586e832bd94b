#include "engine/internal/indexed_heap.hpp"
#include "engine/testing/heap_probe.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <new>
#include <random>
#include <utility>

namespace kvfleet::engine::internal {
namespace {

// reserve() gives room for every id to one level only: an id is in one
// level's heap at a time. Before, it reserved every level (4 bytes per id
// per level: the five priority levels of each of the store's three
// partition policies held 48 bytes per entry the store could never use).
TEST(indexed_heap, reserve_gives_room_in_one_level_only) {
  indexed_heap h(5);
  h.reserve(1000, 2);
  EXPECT_GE(h.capacity(2), 1000U);
  for (std::size_t l = 0; l < h.levels(); ++l) {
    if (l != 2) {
      EXPECT_EQ(h.capacity(l), 0U) << "level " << l;
    }
  }
}

// A set() whose heap cannot grow (bad_alloc) leaves the heap as it was.
// Before, it recorded the id at a position past the heap's end, and a
// later erase() of it wrote through that position.
TEST(indexed_heap, a_set_that_cannot_allocate_changes_nothing) {
  indexed_heap h(2);
  h.reserve(64, 0); // level 1 holds nothing yet: its first set() allocates
  h.set(3, 0, score{1, 0});
  bool threw = false;
  const bool came = testing::failing_allocation(0, [&] {
    try {
      h.set(7, 1, score{2, 0});
    } catch (const std::bad_alloc&) {
      threw = true;
    }
  });
  ASSERT_TRUE(came && threw);
  EXPECT_FALSE(h.contains(7));
  EXPECT_EQ(h.size(), 1U);
  h.check_invariants();
  h.erase(7); // not there: nothing to do
  h.set(7, 1, score{2, 0});
  EXPECT_TRUE(h.contains(7));
  h.check_invariants();
}

// The levels that were not reserved grow as they fill, and every level
// keeps its order: each top is the smallest key of its level (a reference
// map says which), under random inserts, moves between levels and erases.
TEST(indexed_heap, unreserved_levels_grow_and_keep_their_order) {
  constexpr std::uint32_t ids = 200;
  indexed_heap h(5);
  h.reserve(ids / 2, 2); // ids above it grow the per-id storage too
  std::map<std::uint32_t, std::pair<std::size_t, score>> ref;
  std::mt19937_64 rng(7);
  for (int step = 0; step < 5000; ++step) {
    const auto id = static_cast<std::uint32_t>(rng() % ids);
    if (rng() % 4 == 0) {
      h.erase(id);
      ref.erase(id);
    } else {
      const std::size_t level = rng() % h.levels();
      const score key{static_cast<double>(rng() % 50), rng() % 1000};
      h.set(id, level, key);
      ref[id] = {level, key};
    }
    h.check_invariants();
    ASSERT_EQ(h.size(), ref.size());
    for (std::size_t l = 0; l < h.levels(); ++l) {
      std::uint32_t best = indexed_heap::npos;
      std::size_t n = 0;
      for (const auto& [i, e] : ref) {
        if (e.first != l)
          continue;
        ++n;
        if (best == indexed_heap::npos || e.second < ref[best].second)
          best = i;
      }
      ASSERT_EQ(h.size(l), n);
      if (n > 0) {
        EXPECT_FALSE(h.key(best) < h.key(h.top(l)));
        EXPECT_FALSE(h.key(h.top(l)) < h.key(best));
      }
    }
  }
}

} // namespace
} // namespace kvfleet::engine::internal
