// An unchanged engine::block_store over the device backend: the same puts,
// reads, codecs and demotions as on the host, bytes equal.
#include "cuda/backend_factory.hpp"
#include "cuda/device_backend.hpp"
#include "cuda/internal/test_support.hpp"
#include "engine/block_store.hpp"
#include "engine/checksum.hpp"
#include "engine/clock.hpp"

#include <chrono>
#include <random>

namespace kvfleet::cuda {
namespace {

engine::namespace_spec spec() {
  engine::namespace_spec s;
  s.model = "gpu-test";
  s.layers = 2;
  s.kv_heads = 2;
  s.head_dim = 64;
  s.block_tokens = 32; // 2*2*2*32*64*2 = 32 KiB blocks
  return s;
}

std::vector<std::byte> value_for(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0F, 1.0F);
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; i += 2) {
    const std::uint16_t h = engine::float_to_half(normal(rng));
    std::memcpy(v.data() + i, &h, 2);
  }
  return v;
}

TEST(device_store_test, puts_and_reads_round_trip_on_the_gpu_like_on_the_host) {
  KVFLEET_REQUIRE_DEVICE();
  engine::store_config cfg;
  auto dev = device_memory_backend::create(std::size_t{64} << 20);
  ASSERT_TRUE(dev) << dev.error().describe();
  cfg.capacity_bytes = (*dev)->size();
  auto gpu = engine::block_store::create(cfg, std::move(*dev));
  auto cpu = engine::block_store::create(cfg);
  ASSERT_TRUE(gpu && cpu);
  const auto s = spec();
  auto gns = (*gpu)->register_namespace(s);
  auto cns = (*cpu)->register_namespace(s);
  ASSERT_TRUE(gns && cns);
  for (std::uint64_t i = 0; i < 64; ++i) {
    const auto v = value_for(s.value_bytes(), i);
    const engine::block_key key{i + 1, 9};
    engine::put_options opt;
    opt.codec_override = static_cast<engine::codec>(i % 4);
    for (auto* st : {gpu->get(), cpu->get()}) {
      const engine::ns_id ns = st == gpu->get() ? *gns : *cns;
      auto h = st->reserve(ns, key, {}, opt);
      ASSERT_TRUE(h) << h.error().describe();
      ASSERT_TRUE(st->write(*h, v));
      ASSERT_TRUE(st->commit(*h));
    }
    auto gl = (*gpu)->acquire(*gns, key);
    auto cl = (*cpu)->acquire(*cns, key);
    ASSERT_TRUE(gl && cl);
    std::vector<std::byte> a(s.value_bytes());
    std::vector<std::byte> b(s.value_bytes());
    ASSERT_TRUE((*gpu)->read(*gl, a));
    ASSERT_TRUE((*cpu)->read(*cl, b));
    EXPECT_EQ(a, b) << "block " << i;
    (*gpu)->check_invariants();
  }
}

/// Collects finished demotions until none is in flight (the copies run on
/// the GPU in real time: bounded by a deadline, not a sleep).
void settle(engine::block_store& store) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (store.tier_bytes_in_flight() > 0 &&
         std::chrono::steady_clock::now() < deadline)
    store.poll_tier();
  ASSERT_EQ(store.tier_bytes_in_flight(), 0U) << "demotions did not finish";
}

TEST(device_store_test, blocks_move_to_pinned_host_memory_and_back_on_a_hit) {
  KVFLEET_REQUIRE_DEVICE();
  engine::store_config cfg;
  auto dev = device_memory_backend::create(std::size_t{64} << 20);
  ASSERT_TRUE(dev) << dev.error().describe();
  auto gpu = engine::block_store::create(cfg, std::move(*dev));
  ASSERT_TRUE(gpu) << gpu.error().describe();
  engine::block_store& store = **gpu;
  std::vector<std::string> lines;
  // Staging of 1 MiB: 512 KiB per batch, so 64 blocks of 32 KiB take
  // several batches each way.
  auto attached = store.attach_tier(
      host_tier_per_engine({std::size_t{8} << 20, std::size_t{1} << 20},
                           [&](std::string_view l) { lines.emplace_back(l); }));
  ASSERT_TRUE(attached) << attached.error().describe();
  ASSERT_TRUE(*attached) << (lines.empty() ? "" : lines.front());
  ASSERT_NE(store.tier(), nullptr);
  EXPECT_EQ(store.tier()->name(), "pinned host");
  const auto s = spec();
  auto ns = store.register_namespace(s);
  ASSERT_TRUE(ns);
  // Four chains of 16 blocks, mixed codecs, random values.
  std::vector<std::vector<engine::block_key>> chains(4);
  std::vector<std::vector<std::vector<std::byte>>> values(4);
  for (std::uint64_t c = 0; c < chains.size(); ++c) {
    engine::block_key parent{};
    for (std::uint64_t i = 0; i < 16; ++i) {
      const engine::block_key key{c * 100 + i + 1, 77};
      engine::put_options opt;
      opt.codec_override = static_cast<engine::codec>((c + i) % 4);
      const auto v = value_for(s.value_bytes(), c * 100 + i);
      auto h = store.reserve(*ns, key, parent, opt);
      ASSERT_TRUE(h) << h.error().describe();
      ASSERT_TRUE(store.write(*h, v));
      ASSERT_TRUE(store.commit(*h));
      chains[c].push_back(key);
      values[c].push_back(v);
      parent = key;
    }
  }
  // What each block decodes to on the device now: the bytes to get back.
  auto decoded = [&](const engine::block_key& key) {
    std::vector<std::byte> out(s.value_bytes());
    auto lease = store.acquire(*ns, key);
    EXPECT_TRUE(lease) << key.to_hex();
    if (lease) {
      EXPECT_TRUE(store.read(*lease, out));
    }
    return out;
  };
  std::vector<std::vector<std::vector<std::byte>>> want(4);
  for (std::size_t c = 0; c < chains.size(); ++c)
    for (const auto& k : chains[c])
      want[c].push_back(decoded(k));

  // The staging takes 512 KiB per direction: a call starts what fits and
  // stops at "busy" without an error; the memory manager calls again
  // after the next batch. Here: call, let the copies finish, call again.
  int calls = 0;
  while (store.used_bytes() > 0 && calls < 64) {
    ++calls;
    auto started = store.demote_to_tier(store.used_bytes());
    ASSERT_TRUE(started) << started.error().describe();
    ASSERT_GT(*started, 0U);
    settle(store);
    store.check_invariants();
  }
  EXPECT_GT(calls, 1) << "1.2 MB of blocks through 512 KiB of staging";
  EXPECT_EQ(store.used_bytes(), 0U);
  EXPECT_EQ(store.tier_block_count(), 64U);
  EXPECT_EQ(store.stats().tier_failures, 0U);

  engine::synthetic_producer producer;
  for (std::size_t c = 0; c < chains.size(); ++c) {
    auto r = store.process(*ns, chains[c], chains[c].size() * s.block_tokens,
                           producer);
    ASSERT_TRUE(r) << r.error().describe();
    EXPECT_EQ(r->tier_blocks, 16U);
    EXPECT_EQ(r->computed_blocks, 0U);
    for (std::size_t i = 0; i < chains[c].size(); ++i)
      EXPECT_EQ(decoded(chains[c][i]), want[c][i])
          << "chain " << c << " block " << i;
  }
  EXPECT_EQ(store.tier_block_count(), 0U);
  EXPECT_EQ(store.tier()->used_bytes(), 0U);
  store.check_invariants();
}

TEST(device_store_test,
     pinned_memory_refused_leaves_the_engine_without_a_tier) {
  KVFLEET_REQUIRE_DEVICE();
  auto dev = device_memory_backend::create(std::size_t{8} << 20);
  ASSERT_TRUE(dev) << dev.error().describe();
  engine::store_config cfg;
  auto gpu = engine::block_store::create(cfg, std::move(*dev));
  ASSERT_TRUE(gpu);
  std::vector<std::string> lines;
  // A petabyte of pinned host memory: refused by the driver.
  auto attached = (*gpu)->attach_tier(
      host_tier_per_engine({std::size_t{1} << 50, std::size_t{1} << 20},
                           [&](std::string_view l) { lines.emplace_back(l); }));
  ASSERT_TRUE(attached) << attached.error().describe();
  EXPECT_FALSE(*attached);
  EXPECT_EQ((*gpu)->tier(), nullptr);
  ASSERT_EQ(lines.size(), 1U);
  EXPECT_NE(lines[0].find("no pinned host tier"), std::string::npos)
      << lines[0];
}

TEST(device_store_test, a_host_arena_gets_no_pinned_tier) {
  KVFLEET_REQUIRE_DEVICE();
  engine::store_config cfg;
  cfg.capacity_bytes = std::size_t{1} << 20;
  auto host = engine::block_store::create(cfg);
  ASSERT_TRUE(host);
  auto attached = (*host)->attach_tier(
      host_tier_per_engine({std::size_t{1} << 20, std::size_t{1} << 20}));
  ASSERT_TRUE(attached);
  EXPECT_FALSE(*attached);
}

TEST(device_store_test,
     the_backend_checksum_runs_on_the_device_and_matches_the_host) {
  KVFLEET_REQUIRE_DEVICE();
  auto dev = device_memory_backend::create(std::size_t{8} << 20);
  ASSERT_TRUE(dev) << dev.error().describe();
  const auto v = value_for(100000, 3);
  ASSERT_TRUE((*dev)->write(4096, v));
  auto sum = (*dev)->checksum(4096, v.size());
  ASSERT_TRUE(sum) << sum.error().describe();
  EXPECT_EQ(*sum, engine::block_checksum(v));
  std::vector<std::byte> back(v.size());
  ASSERT_TRUE((*dev)->read(4096, back));
  EXPECT_EQ(back, v);
  EXPECT_FALSE((*dev)->write((*dev)->size() - 10, v));
}

TEST(device_store_test, copy_within_moves_bytes_inside_the_device_arena) {
  KVFLEET_REQUIRE_DEVICE();
  auto dev = device_memory_backend::create(std::size_t{8} << 20);
  ASSERT_TRUE(dev) << dev.error().describe();
  ASSERT_TRUE((*dev)->can_copy_within());
  const auto v = value_for(100000, 5);
  ASSERT_TRUE((*dev)->write(4096, v));
  const std::size_t to = std::size_t{4} << 20;
  auto moved = (*dev)->copy_within(to, 4096, v.size());
  ASSERT_TRUE(moved) << moved.error().describe();
  std::vector<std::byte> back(v.size());
  ASSERT_TRUE((*dev)->read(to, back));
  EXPECT_EQ(back, v);
  // Out of bounds, and overlapping ranges, are refused.
  const std::size_t size = (*dev)->size();
  EXPECT_EQ((*dev)->copy_within(size - 10, 0, 100).error().code,
            errc::invalid_argument);
  EXPECT_EQ((*dev)->copy_within(0, size - 10, 100).error().code,
            errc::invalid_argument);
  EXPECT_EQ((*dev)->copy_within(4096 + 50, 4096, 100).error().code,
            errc::invalid_argument);
  EXPECT_TRUE((*dev)->copy_within(0, 100, 0));
}

// Slab compaction in a device arena, the scenario of the engine's
// slab_compaction_test: blocks of 32 KiB fill 14 of 16 slabs, every other
// one expires, then blocks of 64 KiB (two a slab) need slabs. The store
// moves the 32 KiB blocks together on the device instead of evicting, and
// they read back intact. Before, a device arena had no copy_within(): the
// store evicted.
TEST(device_store_test, slabs_are_compacted_in_device_memory_without_eviction) {
  KVFLEET_REQUIRE_DEVICE();
  using namespace std::chrono_literals;
  constexpr std::size_t block = std::size_t{32} << 10;
  engine::manual_clock clock;
  engine::store_config cfg;
  cfg.capacity_bytes = 64 * block;
  cfg.slab_bytes = 4 * block;
  cfg.policy = engine::policy_kind::lru;
  cfg.adaptive_compression = false;
  cfg.clock = &clock;
  auto dev = device_memory_backend::create(cfg.capacity_bytes);
  ASSERT_TRUE(dev) << dev.error().describe();
  auto gpu = engine::block_store::create(cfg, std::move(*dev));
  ASSERT_TRUE(gpu) << gpu.error().describe();
  engine::block_store& store = **gpu;
  engine::namespace_options opts;
  opts.adaptive_compression = false;
  const auto s = spec();
  ASSERT_EQ(s.value_bytes(), block);
  auto ns = store.register_namespace(s, opts);
  ASSERT_TRUE(ns) << ns.error().describe();
  std::vector<engine::block_key> kept;
  std::vector<std::vector<std::byte>> kept_values;
  for (std::uint64_t i = 0; i < 56; ++i) {
    const engine::block_key key{i + 1, 5};
    const auto v = value_for(block, 1000 + i);
    engine::put_options opt;
    if (i % 2 == 0)
      opt.ttl = 1s;
    auto h = store.reserve(*ns, key, {}, opt);
    ASSERT_TRUE(h) << h.error().describe();
    ASSERT_TRUE(store.write(*h, v));
    ASSERT_TRUE(store.commit(*h));
    if (i % 2 == 1) {
      kept.push_back(key);
      kept_values.push_back(v);
    }
  }
  clock.advance(2s);
  ASSERT_EQ(store.expire(), 28U);
  auto wide = spec();
  wide.model = "gpu-test-wide";
  wide.head_dim = 128;
  ASSERT_EQ(wide.value_bytes(), 2 * block);
  auto wide_ns = store.register_namespace(wide, opts);
  ASSERT_TRUE(wide_ns) << wide_ns.error().describe();
  for (std::uint64_t i = 0; i < 12; ++i) {
    const engine::block_key key{i + 1, 6};
    auto h = store.reserve(*wide_ns, key, {});
    ASSERT_TRUE(h) << h.error().describe();
    ASSERT_TRUE(store.write(*h, value_for(2 * block, 2000 + i)));
    ASSERT_TRUE(store.commit(*h));
    store.check_invariants();
  }
  EXPECT_EQ(store.stats().evictions, 0U);
  EXPECT_EQ(store.stats().compacted_slabs, 4U);
  EXPECT_EQ(store.stats().moved_blocks, 8U);
  std::vector<std::byte> out(block);
  for (std::size_t i = 0; i < kept.size(); ++i) {
    auto lease = store.acquire(*ns, kept[i]);
    ASSERT_TRUE(lease) << kept[i].to_hex();
    ASSERT_TRUE(store.read(*lease, out));
    EXPECT_EQ(out, kept_values[i]) << "block " << i;
  }
}

} // namespace
} // namespace kvfleet::cuda
