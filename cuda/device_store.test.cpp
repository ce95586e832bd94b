// An unchanged engine::block_store over the device backend: the same puts,
// reads, codecs and demotions as on the host, bytes equal.
#include "cuda/device_backend.hpp"
#include "cuda/internal/test_support.hpp"
#include "engine/block_store.hpp"
#include "engine/checksum.hpp"

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

} // namespace
} // namespace kvfleet::cuda
