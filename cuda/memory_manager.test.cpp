// The GPU memory manager's decisions, driven by readings (no device needed),
// acting on a host-memory store.
#include "cuda/memory_manager.hpp"

#include "engine/block_key.hpp"
#include "engine/block_store.hpp"
#include "engine/testing/fake_memory_tier.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kvfleet::cuda {
namespace {

constexpr std::size_t gib = std::size_t{1} << 30;

TEST(memory_manager_test, the_arena_s_free_part_does_not_count_as_used) {
  auto m = gpu_memory_manager::create();
  ASSERT_TRUE(m);
  memory_reading r{80 * gib, 4 * gib, 60 * gib, 30 * gib}; // driver: 95% used
  // 76 GiB used, 30 of the arena free: 46 GiB really used.
  EXPECT_NEAR(gpu_memory_manager::usage(r), 46.0 / 80.0, 1e-9);
  EXPECT_EQ(m->excess(r), 0U);
  r.pool_used = 60 * gib; // the arena is full: 76 / 80 = 0.95
  EXPECT_EQ(m->excess(r),
            76 * gib - static_cast<std::size_t>(0.8 * 80.0 *
                                                static_cast<double>(gib)));
}

TEST(memory_manager_test, bad_thresholds_are_refused) {
  EXPECT_FALSE(gpu_memory_manager::create({1.5, 0.8}));
  EXPECT_FALSE(gpu_memory_manager::create({0.8, 0.9}));
  EXPECT_FALSE(gpu_memory_manager::create({0.9, 0.0}));
  EXPECT_TRUE(gpu_memory_manager::create({0.95, 0.85}));
}

class memory_manager_store_test : public ::testing::Test {
protected:
  void SetUp() override {
    engine::store_config cfg;
    cfg.capacity_bytes = 8 << 20;
    cfg.policy = engine::policy_kind::priority;
    cfg.adaptive_compression = false;
    auto s = engine::block_store::create(cfg);
    ASSERT_TRUE(s) << s.error().describe();
    store = std::move(*s);
    engine::namespace_spec spec;
    spec.model = "m";
    spec.layers = 1;
    spec.kv_heads = 1;
    spec.head_dim = 64;
    spec.block_tokens = 64; // 8 KiB of fp16 per block (2 * 64 * 64 * 2)
    auto id = store->register_namespace(spec);
    ASSERT_TRUE(id);
    ns = *id;
    value.assign(spec.value_bytes(), std::byte{1});
    // Independent chains (each block a root), alternating priorities.
    for (std::uint64_t i = 0; i < 200; ++i) {
      const engine::block_key key{i + 1, 7};
      engine::put_options opt;
      opt.prio = i % 2 == 0 ? engine::priority::low : engine::priority::high;
      auto h = store->reserve(ns, key, {}, opt);
      ASSERT_TRUE(h) << h.error().describe();
      ASSERT_TRUE(store->write(*h, value));
      ASSERT_TRUE(store->commit(*h));
      keys.push_back(key);
    }
  }
  std::unique_ptr<engine::block_store> store;
  engine::ns_id ns;
  std::vector<std::byte> value;
  std::vector<engine::block_key> keys;
};

TEST_F(memory_manager_store_test,
       above_the_threshold_low_priority_blocks_go_first) {
  auto m = gpu_memory_manager::create();
  ASSERT_TRUE(m);
  const std::size_t used_before = store->used_bytes();
  // A device whose memory is 95% used, the pool's part of it full.
  memory_reading r{16 << 20, 0, store->capacity_bytes(),
                   store->capacity_bytes()};
  r.device_free = r.device_total / 20;
  const std::size_t excess = m->excess(r);
  ASSERT_GT(excess, 0U);
  const relief done = m->relieve(r, *store);
  EXPECT_EQ(done.demoted, 0U);
  EXPECT_GE(done.evicted, std::min(excess, used_before));
  store->check_invariants();
  std::size_t low_left = 0;
  std::size_t high_left = 0;
  for (std::size_t i = 0; i < keys.size(); ++i)
    if (store->contains(ns, keys[i]))
      (i % 2 == 0 ? low_left : high_left) += 1;
  // Evicting ~excess bytes never touches a high-priority block while low
  // ones remain.
  if (low_left > 0) {
    EXPECT_EQ(high_left, 100U);
  }
}

TEST_F(memory_manager_store_test,
       a_demoter_that_moves_blocks_is_not_followed_by_eviction) {
  auto m = gpu_memory_manager::create();
  ASSERT_TRUE(m);
  memory_reading r{16 << 20, 0, store->capacity_bytes(),
                   store->capacity_bytes()};
  const std::size_t excess = m->excess(r);
  const std::size_t blocks = store->block_count();
  std::size_t asked = 0;
  relief done = m->relieve(r, *store, [&](std::size_t bytes) {
    asked = bytes;
    return bytes / 2;
  });
  EXPECT_EQ(asked, excess);
  EXPECT_EQ(done.demoted, excess / 2);
  EXPECT_EQ(done.evicted, 0U) << "the rest waits for the tier";
  EXPECT_EQ(store->block_count(), blocks);

  // Bytes already on their way count as freed: only the rest is asked for,
  // and with copies in flight a demoter that moves nothing evicts nothing.
  r.in_flight = excess / 4;
  done = m->relieve(r, *store, [&](std::size_t bytes) {
    asked = bytes;
    return std::size_t{0};
  });
  EXPECT_EQ(asked, excess - excess / 4);
  EXPECT_EQ(done.evicted, 0U);
  EXPECT_EQ(store->block_count(), blocks);
  r.in_flight = excess;
  done = m->relieve(r, *store, [&](std::size_t) -> std::size_t {
    ADD_FAILURE() << "everything is in flight already";
    return 0;
  });
  EXPECT_EQ(done.demoted + done.evicted, 0U);
}

TEST_F(memory_manager_store_test,
       a_demoter_that_can_move_nothing_leaves_it_to_eviction) {
  auto m = gpu_memory_manager::create();
  ASSERT_TRUE(m);
  const memory_reading r{16 << 20, 0, store->capacity_bytes(),
                         store->capacity_bytes()};
  const std::size_t excess = m->excess(r);
  const std::size_t used = store->used_bytes();
  const relief done =
      m->relieve(r, *store, [](std::size_t) { return std::size_t{0}; });
  EXPECT_EQ(done.demoted, 0U);
  EXPECT_GE(done.evicted, std::min(excess, used));
  store->check_invariants();
}

TEST_F(memory_manager_store_test,
       the_engine_hook_demotes_to_the_store_s_tier_before_it_evicts) {
  ASSERT_TRUE(store->host_addressable());
  engine::testing::fake_memory_tier* tier = nullptr;
  auto attached =
      store->attach_tier([&](engine::memory_backend& arena)
                             -> result<std::unique_ptr<engine::memory_tier>> {
        auto t = std::make_unique<engine::testing::fake_memory_tier>(
            arena.host_data(), store->capacity_bytes());
        tier = t.get();
        return std::unique_ptr<engine::memory_tier>(std::move(t));
      });
  ASSERT_TRUE(attached && *attached);
  auto hook = device_memory_relief_per_engine({0.3, 0.2});
  ASSERT_TRUE(hook);
  const std::size_t cap = store->capacity_bytes();
  const std::size_t blocks = store->block_count();
  const std::size_t started = (*hook)(0, *store);
  EXPECT_GT(started, 0U);
  EXPECT_GT(store->tier_bytes_in_flight(), 0U);
  EXPECT_EQ(store->block_count(), blocks) << "nothing evicted, nothing gone";
  EXPECT_EQ(store->stats().evictions, 0U);
  // Copies running: the next call starts nothing more and evicts nothing.
  EXPECT_EQ((*hook)(0, *store), 0U);
  // The copies finish; the next call collects them and the pool is below
  // the target with every block still in the engine.
  tier->finish_demotions();
  (void)(*hook)(0, *store);
  EXPECT_LE(store->used_bytes(), cap * 2 / 10);
  EXPECT_EQ(store->stats().evictions, 0U);
  EXPECT_EQ(store->block_count() + store->tier_block_count(), blocks);
  for (const auto& k : keys)
    EXPECT_TRUE(store->contains(ns, k) || store->in_tier(ns, k));
  store->check_invariants();
}

TEST_F(memory_manager_store_test, below_the_threshold_nothing_happens) {
  auto m = gpu_memory_manager::create();
  ASSERT_TRUE(m);
  const memory_reading r{gib, gib / 2, store->capacity_bytes(),
                         store->used_bytes()};
  const std::size_t blocks = store->block_count();
  const relief done = m->relieve(r, *store, [](std::size_t) -> std::size_t {
    ADD_FAILURE() << "demoter called below the threshold";
    return 0;
  });
  EXPECT_EQ(done.excess, 0U);
  EXPECT_EQ(store->block_count(), blocks);
}

TEST_F(memory_manager_store_test,
       the_engine_hook_relieves_a_host_pool_by_its_own_accounting) {
  // The fixture's 200 blocks take 40% of the pool (the store itself keeps
  // it below its 0.9 watermark): relieve above 0.3, down to 0.2.
  std::vector<std::string> lines;
  auto hook = device_memory_relief_per_engine(
      {0.3, 0.2}, [&](std::string_view l) { lines.emplace_back(l); });
  ASSERT_TRUE(hook) << hook.error().describe();
  const std::size_t cap = store->capacity_bytes();
  ASSERT_GT(store->used_bytes(), cap * 3 / 10);
  const std::size_t freed = (*hook)(0, *store);
  EXPECT_GT(freed, 0U);
  EXPECT_LE(store->used_bytes(), cap * 2 / 10);
  store->check_invariants();
  // Below the threshold now: nothing more.
  EXPECT_EQ((*hook)(0, *store), 0U);
  EXPECT_TRUE(lines.empty());

  auto bad = device_memory_relief_per_engine({0.5, 0.9});
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, errc::invalid_argument);
}

} // namespace
} // namespace kvfleet::cuda
