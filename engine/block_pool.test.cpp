#include "engine/block_pool.hpp"
#include "engine/block_index.hpp"
#include "engine/testing/heap_probe.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvfleet::engine {
namespace {

TEST(block_pool, classes_share_slabs_and_return_them_when_empty) {
  auto pool = std::move(*block_pool::create(4 * 4096, 4096));
  const auto big = *pool.size_class_for(4096);
  const auto small = *pool.size_class_for(1000); // rounds up to 1024
  EXPECT_EQ(pool.slot_bytes(small), 1024U);
  EXPECT_EQ(*pool.size_class_for(1024), small);
  std::vector<slot_ref> bigs;
  for (int i = 0; i < 3; ++i)
    bigs.push_back(*pool.allocate(big));
  std::vector<slot_ref> smalls;
  for (int i = 0; i < 4; ++i)
    smalls.push_back(*pool.allocate(small));
  EXPECT_EQ(pool.free_slab_count(), 0U);
  EXPECT_EQ(pool.allocate(big).error().code, errc::out_of_memory);
  EXPECT_EQ(pool.allocate(small).error().code, errc::out_of_memory);
  for (auto s : smalls)
    pool.free(s);
  EXPECT_EQ(pool.free_slab_count(), 1U);
  EXPECT_TRUE(pool.allocate(big).has_value());
  pool.check_invariants();
  EXPECT_EQ(pool.used_bytes(), 4U * 4096);
}

// Four slabs: two half used by 1 KiB slots (owners 0..3), one full of
// 4 KiB slots, one free. The 1 KiB class can give a slab back: the sparse
// slab whose owners are all movable drains into the other one.
TEST(block_pool, a_sparse_slab_drains_into_its_class_and_goes_back) {
  auto pool = std::move(*block_pool::create(4 * 4096, 4096));
  const auto small = *pool.size_class_for(1024);
  const auto big = *pool.size_class_for(4096);
  std::vector<slot_ref> slots;
  for (std::uint32_t i = 0; i < 8; ++i) {
    slots.push_back(*pool.allocate(small));
    pool.set_owner(slots.back(), i);
  }
  ASSERT_TRUE(pool.allocate(big).has_value());
  for (std::uint32_t i = 0; i < 8; i += 2)
    pool.free(slots[i]); // owners 1, 3 in one slab, 5, 7 in the other
  pool.check_invariants();
  ASSERT_TRUE(pool.allocate(big).has_value()); // the free slab
  EXPECT_EQ(pool.free_slab_count(), 0U);
  // Owner 7 cannot move: the slab of 5 and 7 stays.
  const auto movable = [](std::uint32_t owner) { return owner != 7; };
  const std::uint32_t s = pool.reclaimable_slab(big, movable);
  ASSERT_EQ(s, slots[1].slab);
  EXPECT_EQ(pool.reclaimable_slab(small, movable), slot_ref::npos);
  // A move that fails stops the drain and loses nothing.
  int calls = 0;
  EXPECT_FALSE(pool.drain_slab(s, [&](slot_ref, slot_ref) {
    ++calls;
    return false;
  }));
  EXPECT_EQ(calls, 1);
  pool.check_invariants();
  EXPECT_EQ(pool.used_bytes(), 4U * 1024 + 2U * 4096);
  std::vector<std::pair<std::uint32_t, slot_ref>> moved;
  EXPECT_TRUE(pool.drain_slab(s, [&](slot_ref from, slot_ref to) {
    EXPECT_NE(to.slab, s);
    EXPECT_EQ(pool.owner(to), pool.owner(from));
    moved.emplace_back(pool.owner(from), to);
    return true;
  }));
  pool.check_invariants();
  ASSERT_EQ(moved.size(), 2U);
  EXPECT_EQ(moved[0].first, 1U);
  EXPECT_EQ(moved[1].first, 3U);
  EXPECT_EQ(pool.free_slab_count(), 1U);
  EXPECT_EQ(pool.used_bytes(), 4U * 1024 + 2U * 4096);
  EXPECT_TRUE(pool.allocate(big).has_value()); // the drained slab
}

TEST(block_pool, slots_do_not_overlap) {
  auto pool = std::move(*block_pool::create(64 * 1024, 8192));
  const std::vector<std::uint16_t> classes{*pool.size_class_for(256),
                                           *pool.size_class_for(3000),
                                           *pool.size_class_for(8192)};
  std::mt19937 rng(3);
  std::vector<slot_ref> live;
  for (int step = 0; step < 5000; ++step) {
    if (!live.empty() && rng() % 2 == 0) {
      const std::size_t i = rng() % live.size();
      pool.free(live[i]);
      live[i] = live.back();
      live.pop_back();
    } else if (auto s = pool.allocate(classes[rng() % 3])) {
      live.push_back(*s);
    }
    pool.check_invariants();
  }
  std::vector<std::pair<std::size_t, std::size_t>> ranges;
  for (auto s : live)
    ranges.emplace_back(pool.offset(s),
                        pool.offset(s) + pool.slot_bytes(s.size_class));
  std::sort(ranges.begin(), ranges.end());
  for (std::size_t i = 1; i < ranges.size(); ++i)
    EXPECT_LE(ranges[i - 1].second, ranges[i].first);
  for (auto& r : ranges)
    EXPECT_LE(r.second, pool.capacity_bytes());
}

TEST(block_pool, bad_sizes_are_errors) {
  EXPECT_EQ(block_pool::create(0, 4096).error().code, errc::zero_capacity);
  EXPECT_EQ(block_pool::create(4096, 8192).error().code,
            errc::invalid_argument);
  EXPECT_EQ(block_pool::create(4096, 10).error().code, errc::invalid_argument);
  auto pool = std::move(*block_pool::create(8192, 4096));
  EXPECT_EQ(pool.size_class_for(4097).error().code, errc::value_too_large);
  EXPECT_EQ(pool.size_class_for(0).error().code, errc::invalid_argument);
  EXPECT_EQ(pool.allocate(3).error().code, errc::invalid_argument);
}

TEST(block_pool, a_slab_holds_at_most_2_to_the_32_minus_1_slots) {
  // Slot indexes and counts are 32 bits. The pool only keeps books, so an
  // arena this large costs nothing here.
  constexpr std::size_t max_slab =
      block_pool::slot_alignment * std::size_t{0xffffffffU};
  constexpr std::size_t over = max_slab + block_pool::slot_alignment;
  auto too_big = block_pool::create(over, over);
  ASSERT_FALSE(too_big.has_value());
  EXPECT_EQ(too_big.error().code, errc::invalid_argument);
  EXPECT_NE(too_big.error().message.find(std::to_string(max_slab)),
            std::string::npos)
      << too_big.error().message;
  // 2^32 slots: the count the first allocation checked against wrapped to 0.
  EXPECT_FALSE(block_pool::create(std::size_t{1} << 40, std::size_t{1} << 40)
                   .has_value());

  auto pool = block_pool::create(2 * max_slab, max_slab);
  ASSERT_TRUE(pool.has_value()) << pool.error().describe();
  EXPECT_EQ(pool->slab_count(), 2U);
  // One slot per slab, so nothing sizes a free list of 2^32 entries.
  auto cls = pool->size_class_for(max_slab);
  ASSERT_TRUE(cls.has_value());
  auto a = pool->allocate(*cls);
  auto b = pool->allocate(*cls);
  ASSERT_TRUE(a.has_value() && b.has_value());
  EXPECT_EQ(pool->offset(*a) + pool->offset(*b), max_slab);
  EXPECT_FALSE(pool->can_allocate(*cls));
  pool->check_invariants();
  pool->free(*a);
  pool->free(*b);
  EXPECT_EQ(pool->used_bytes(), 0U);
  pool->check_invariants();
}

class block_index_keys : public ::testing::TestWithParam<int> {};

// Uniform keys (as chain_key makes them), keys with few distinct low bits,
// and a host's own sequential ids.
std::vector<block_key> index_test_keys(int kind, std::mt19937_64& rng) {
  std::vector<block_key> keys;
  for (std::uint64_t i = 0; i < 3000; ++i)
    keys.push_back(kind == 0   ? block_key{rng(), rng()}
                   : kind == 1 ? block_key{rng(), rng() & 0xfff}
                               : block_key{7, i + 1});
  return keys;
}
TEST(block_pool, no_heap_for_a_slab_free_list_is_an_error_and_loses_nothing) {
  KVFLEET_SKIP_IF_ADDRESS_SPACE_CANNOT_BE_CAPPED();
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // A slab of 2^31 slots of 256 B: its free list would take 8 GiB of heap,
  // which the child's address-space cap does not have. The pool only
  // keeps books, so the 512 GiB "arena" costs nothing.
  EXPECT_EXIT(
      {
        auto pool =
            block_pool::create(std::size_t{1} << 40, std::size_t{1} << 39);
        if (!pool)
          std::_Exit(10);
        auto cls = pool->size_class_for(block_pool::slot_alignment);
        if (!cls)
          std::_Exit(11);
        if (!testing::cap_address_space_at(std::size_t{64} << 20))
          std::_Exit(12);
        auto slot = pool->allocate(*cls);
        if (slot || slot.error().code != errc::out_of_memory)
          std::_Exit(13);
        // Nothing lost: both slabs are still free for a class that fits.
        if (pool->free_slab_count() != 2)
          std::_Exit(14);
        pool->check_invariants();
        std::_Exit(0);
      },
      ::testing::ExitedWithCode(0), "");
}

TEST_P(block_index_keys, matches_a_reference_map_under_random_operations) {
  block_index index;
  std::unordered_map<block_key, std::uint32_t, block_key_hash> ref;
  std::mt19937_64 rng(11);
  const std::vector<block_key> keys = index_test_keys(GetParam(), rng);
  for (int step = 0; step < 30000; ++step) {
    const auto& k = keys[rng() % keys.size()];
    if (rng() % 3 == 0) {
      EXPECT_EQ(index.erase(k), ref.erase(k) == 1);
    } else if (!ref.contains(k)) {
      const auto v = static_cast<std::uint32_t>(step);
      index.insert(k, v);
      ref[k] = v;
    }
    ASSERT_EQ(index.size(), ref.size());
  }
  for (const auto& k : keys) {
    auto it = ref.find(k);
    EXPECT_EQ(index.find(k), it == ref.end() ? block_index::npos : it->second);
  }
}
INSTANTIATE_TEST_SUITE_P(block_index, block_index_keys,
                         ::testing::Values(0, 1, 2));

} // namespace
} // namespace kvfleet::engine
