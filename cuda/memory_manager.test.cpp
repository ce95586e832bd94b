// The GPU memory manager's decisions, driven by readings (no device needed),
// acting on a host-memory store.
#include "cuda/memory_manager.hpp"

#include "cuda/internal/device_relief.hpp"
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

// One 80 GiB GPU shared by engines A and B (slots 0 and 1 on a 1-GPU
// machine, device_backend_per_engine()), each with a 38 GiB arena, 1 GiB of
// context and staging besides: the driver reports 77 GiB used whatever the
// arenas hold.
memory_reading shared_gpu(std::size_t own_used, std::size_t other_used) {
  memory_reading r;
  r.device_total = 80 * gib;
  r.device_free = 3 * gib;
  r.pool_capacity = 38 * gib;
  r.pool_used = own_used;
  r.other_arenas_free = 38 * gib - other_used;
  r.other_pools_used = other_used;
  return r;
}

TEST(memory_manager_test, a_single_engine_s_reading_is_judged_as_before) {
  auto m = gpu_memory_manager::create();
  ASSERT_TRUE(m);
  // No other engine on the device: 77 GiB used less its arena's 1 free GiB.
  memory_reading r{80 * gib, 3 * gib, 38 * gib, 37 * gib};
  EXPECT_NEAR(gpu_memory_manager::usage(r), 76.0 / 80.0, 1e-9);
  EXPECT_EQ(m->excess(r), 12 * gib) << "all of the device's excess";
  // Something else holds most of the device: the pool frees all it has.
  r = {80 * gib, 2 * gib, 8 * gib, 5 * gib}; // 78 - 3 = 75 GiB used
  EXPECT_EQ(m->excess(r), 5 * gib);
  // Between the target and the threshold: nothing.
  r = {80 * gib, 10 * gib, 38 * gib, 37 * gib}; // 69 GiB used
  EXPECT_EQ(m->excess(r), 0U);
}

TEST(memory_manager_test, a_neighbour_s_empty_arena_is_not_counted_as_used) {
  auto m = gpu_memory_manager::create();
  ASSERT_TRUE(m);
  // A holds 37 GiB, B nothing: blocks fill 37 + 1 GiB of context, 38 of 80.
  const memory_reading a = shared_gpu(37 * gib, 0);
  const memory_reading b = shared_gpu(0, 37 * gib);
  EXPECT_NEAR(gpu_memory_manager::usage(a), 38.0 / 80.0, 1e-9);
  EXPECT_NEAR(gpu_memory_manager::usage(b), 38.0 / 80.0, 1e-9);
  EXPECT_EQ(m->excess(a), 0U);
  EXPECT_EQ(m->excess(b), 0U);
}

TEST(memory_manager_test,
     engines_over_the_threshold_together_free_the_device_excess_once) {
  auto m = gpu_memory_manager::create();
  ASSERT_TRUE(m);
  // Both hold 37 GiB: 77 - 2 free = 75 GiB used, 11 GiB above the target.
  const memory_reading a = shared_gpu(37 * gib, 37 * gib);
  const memory_reading b = shared_gpu(37 * gib, 37 * gib);
  EXPECT_NEAR(gpu_memory_manager::usage(a), 75.0 / 80.0, 1e-9);
  EXPECT_EQ(m->device_excess(a), 11 * gib);
  EXPECT_EQ(m->device_excess(b), 11 * gib);
  EXPECT_EQ(m->excess(a) + m->excess(b), 11 * gib);
  EXPECT_EQ(m->excess(a), m->excess(b));

  // Shares follow the pools: A 48 of 50 GiB, B 24 of 26, 1 GiB besides:
  // 73 GiB used, 9 above the target, A frees 6 and B 3.
  memory_reading c{80 * gib, 3 * gib, 50 * gib, 48 * gib};
  c.other_arenas_free = 2 * gib;
  c.other_pools_used = 24 * gib;
  memory_reading d{80 * gib, 3 * gib, 26 * gib, 24 * gib};
  d.other_arenas_free = 2 * gib;
  d.other_pools_used = 48 * gib;
  EXPECT_EQ(m->device_excess(c), 9 * gib);
  EXPECT_EQ(m->excess(c), 6 * gib);
  EXPECT_EQ(m->excess(d), 3 * gib);

  // Something else holds 70 GiB: 77 GiB used, 13 above the target, more
  // than both pools hold: each frees all it has, no more.
  memory_reading e{80 * gib, 1 * gib, 5 * gib, 4 * gib};
  e.other_arenas_free = 1 * gib;
  e.other_pools_used = 3 * gib;
  EXPECT_EQ(m->device_excess(e), 13 * gib);
  EXPECT_EQ(m->excess(e), 4 * gib);

  // A rounded share is rounded up, never above the device's excess.
  memory_reading f = shared_gpu(37 * gib, 37 * gib);
  f.pool_used = 37 * gib - 1;
  const memory_reading g = shared_gpu(37 * gib, 37 * gib - 1);
  EXPECT_GE(m->excess(f) + m->excess(g), m->device_excess(f));
  EXPECT_LE(m->excess(f) + m->excess(g), m->device_excess(f) + 2);
}

TEST(memory_manager_test, below_the_threshold_nothing_is_freed) {
  auto m = gpu_memory_manager::create();
  ASSERT_TRUE(m);
  // A has freed its share: 69.5 GiB used, below the threshold. B frees
  // nothing: no state kept across calls carries relief below the
  // threshold (a flag that did could stay set for good where pinned
  // blocks kept the device above the target, and every engine then
  // evicted each new block).
  memory_reading b = shared_gpu(37 * gib, 31 * gib + gib / 2);
  EXPECT_NEAR(gpu_memory_manager::usage(b), 69.5 / 80.0, 1e-9);
  EXPECT_EQ(m->device_excess(b), 0U);
  EXPECT_EQ(m->excess(b), 0U);
}

TEST(memory_manager_test, device_readings_share_what_is_on_the_same_device) {
  internal::device_readings rec;
  auto reading = [](std::size_t capacity, std::size_t used) {
    memory_reading r;
    r.pool_capacity = capacity;
    r.pool_used = used;
    return r;
  };
  // Slots 0 and 2 on GPU 0, slot 1 on GPU 1 (two GPUs, three engines).
  memory_reading r = rec.share(0, 0, reading(10, 4));
  EXPECT_EQ(r.other_arenas_free, 0U) << "alone so far";
  EXPECT_EQ(r.other_pools_used, 0U);
  (void)rec.share(1, 1, reading(100, 90));
  r = rec.share(0, 2, reading(20, 5));
  EXPECT_EQ(r.other_arenas_free, 6U) << "slot 0's, not slot 1's";
  EXPECT_EQ(r.other_pools_used, 4U);
  // Slot 2 freed 3 bytes.
  rec.settle(0, 2, 20, 2);
  r = rec.share(0, 0, reading(10, 4));
  EXPECT_EQ(r.other_arenas_free, 18U);
  EXPECT_EQ(r.other_pools_used, 2U);
  r = rec.share(1, 1, reading(100, 90));
  EXPECT_EQ(r.other_arenas_free, 0U) << "GPU 1 alone";
  EXPECT_EQ(r.other_pools_used, 0U);
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

/// Puts `blocks` blocks of 16 KiB into `store`.
void fill(engine::block_store& store, std::size_t blocks,
          std::uint64_t first = 1) {
  engine::namespace_spec spec;
  spec.model = "m";
  spec.layers = 1;
  spec.kv_heads = 1;
  spec.head_dim = 64;
  spec.block_tokens = 64;
  auto ns = store.register_namespace(spec);
  ASSERT_TRUE(ns);
  const std::vector<std::byte> value(spec.value_bytes(), std::byte{1});
  for (std::uint64_t i = 0; i < blocks; ++i) {
    auto h = store.reserve(*ns, engine::block_key{first + i, 9}, {}, {});
    ASSERT_TRUE(h && store.write(*h, value) && store.commit(*h));
  }
}

/// Engines A and B (slots 0 and 1), with empty stores over 8 MiB of host
/// memory, on one pretend GPU of 17 MiB whose driver counts both arenas
/// and 1 MiB besides as used, whatever the arenas hold.
struct shared_device {
  shared_device() : a(empty_store()), b(empty_store()) {}
  static std::unique_ptr<engine::block_store> empty_store() {
    engine::store_config cfg;
    cfg.capacity_bytes = 8 << 20;
    cfg.adaptive_compression = false;
    return std::move(engine::block_store::create(cfg).value());
  }
  internal::device_view view() const {
    internal::device_view v;
    v.devices = 1;
    v.memory = [this](int device) -> result<device_memory_info> {
      EXPECT_EQ(device, 0);
      return device_memory_info{total - driver_used(), total};
    };
    v.on_device = [](const engine::block_store&) { return true; };
    return v;
  }
  std::size_t driver_used() const {
    return a->capacity_bytes() + b->capacity_bytes() + (1 << 20);
  }
  /// What the blocks and the 1 MiB really take.
  std::size_t really_used() const {
    return a->used_bytes() + b->used_bytes() + (1 << 20);
  }
  std::unique_ptr<engine::block_store> a, b;
  std::size_t total = 17 << 20;
};

// The hooks relieve above 0.3 of the pretend GPU, down to 0.2.
constexpr memory_manager_config low_thresholds{0.3, 0.2};

TEST(memory_manager_hook_test,
     an_engine_sharing_a_gpu_with_an_empty_one_is_left_alone) {
  shared_device gpu;
  auto hook = internal::device_memory_relief(low_thresholds, {}, gpu.view());
  ASSERT_TRUE(hook) << hook.error().describe();
  // Each engine calls its hook after its first request; B has had one and
  // holds nothing (it may have been evicted, or its blocks left).
  EXPECT_EQ((*hook)(1, *gpu.b), 0U);
  fill(*gpu.a, 200); // 3.2 MiB of blocks: 4.2 MiB of 17 really used
  const std::size_t a_used = gpu.a->used_bytes();
  EXPECT_EQ((*hook)(0, *gpu.a), 0U) << "B's empty arena is not in use";
  EXPECT_EQ(gpu.a->used_bytes(), a_used);
  EXPECT_EQ((*hook)(1, *gpu.b), 0U);
}

TEST(memory_manager_hook_test, engines_sharing_a_gpu_free_its_excess_once) {
  shared_device gpu;
  auto hook = internal::device_memory_relief(low_thresholds, {}, gpu.view());
  ASSERT_TRUE(hook) << hook.error().describe();
  EXPECT_EQ((*hook)(0, *gpu.a), 0U);
  EXPECT_EQ((*hook)(1, *gpu.b), 0U);
  fill(*gpu.a, 200);
  fill(*gpu.b, 200); // 7.4 of 17 MiB really used, 4 MiB above the target
  const std::size_t block = gpu.a->used_bytes() / 200;
  const auto target =
      static_cast<std::size_t>(0.2 * static_cast<double>(gpu.total));
  const std::size_t excess = gpu.really_used() - target;
  ASSERT_GT(gpu.really_used(), gpu.total * 3 / 10);
  // They take turns, as their actors do, until neither frees more.
  std::size_t freed = 0;
  std::size_t calls = 0;
  for (int round = 0; round < 20; ++round) {
    const std::size_t now = (*hook)(0, *gpu.a) + (*hook)(1, *gpu.b);
    calls += 2;
    freed += now;
    if (now == 0)
      break;
  }
  const auto threshold =
      static_cast<std::size_t>(0.3 * static_cast<double>(gpu.total));
  EXPECT_LE(gpu.really_used(), threshold) << "below the threshold";
  EXPECT_GT(freed, 0U);
  // Not each engine all of it: at most the excess once, give or take a
  // block a call (shares are freed in whole blocks).
  EXPECT_LE(freed, excess + calls * block);
  EXPECT_LT(calls, 40U) << "done in a few turns";
  // Shared about evenly: both pools held as much.
  const std::size_t a_left = gpu.a->used_bytes();
  const std::size_t b_left = gpu.b->used_bytes();
  EXPECT_LE(a_left > b_left ? a_left - b_left : b_left - a_left, excess / 4);
  // Below the threshold, new blocks stay: nothing carries relief on.
  const std::size_t before = gpu.a->used_bytes();
  fill(*gpu.a, 2, 1000); // new keys
  ASSERT_GT(gpu.a->used_bytes(), before);
  ASSERT_LE(gpu.really_used(), threshold);
  EXPECT_EQ((*hook)(0, *gpu.a), 0U);
  EXPECT_EQ((*hook)(1, *gpu.b), 0U);
  gpu.a->check_invariants();
  gpu.b->check_invariants();
}

} // namespace
} // namespace kvfleet::cuda
