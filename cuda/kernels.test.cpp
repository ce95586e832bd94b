// The kernels on a GPU against the engine's CPU reference: codecs element
// by element (bit-exact), gather/scatter, checksums.
#include "cuda/kernels.hpp"
#include "cuda/internal/cuda_check.hpp"
#include "cuda/internal/device_buffer.hpp"
#include "cuda/internal/test_support.hpp"
#include "engine/checksum.hpp"
#include "engine/codec.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

namespace kvfleet::cuda {
namespace {

using engine::codec;
using engine::dtype;
using internal::device_buffer;

std::vector<std::byte> values(dtype t, std::size_t elements,
                              std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0F, 1.0F);
  std::uniform_int_distribution<std::uint32_t> any(0, 0xffff);
  std::vector<std::uint16_t> v(elements);
  for (std::size_t g = 0; g < elements / 64; ++g) {
    const std::uint32_t kind = any(rng) % 10;
    const float mag = std::ldexp(1.0F, static_cast<int>(any(rng) % 40) - 20);
    for (std::size_t i = 0; i < 64; ++i) {
      const float x = normal(rng) * mag;
      std::uint16_t h = t == dtype::fp16 ? engine::float_to_half(x)
                                         : engine::float_to_bf16(x);
      if (kind == 0)
        h = static_cast<std::uint16_t>(any(rng));
      if (kind == 1 && i % 7 == 0)
        h = t == dtype::fp16 ? 0x7c00 : 0x7f80;
      if (kind == 2 && i % 5 == 0)
        h = t == dtype::fp16 ? 0x7e01 : 0xffc1;
      if (kind == 3)
        h = static_cast<std::uint16_t>(any(rng) & 0x83ff);
      if (kind == 4)
        h = 0;
      if (kind == 5 && t == dtype::bf16)
        h = static_cast<std::uint16_t>(0x0080 + (any(rng) & 0x7f));
      v[g * 64 + i] = h;
    }
  }
  std::vector<std::byte> out(2 * elements);
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

void sync_ok() {
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess)
      << cudaGetErrorString(cudaGetLastError());
}

class kernels_codec_test
    : public ::testing::TestWithParam<std::tuple<codec, dtype, kernel_path>> {};

TEST_P(kernels_codec_test,
       encode_and_decode_match_the_cpu_reference_element_by_element) {
  KVFLEET_REQUIRE_DEVICE();
  const auto [c, t, path] = GetParam();
  // Several blocks, one with an odd group count (4-byte aligned payload).
  for (const std::size_t elements :
       {std::size_t{64 * 1001}, std::size_t{131072}}) {
    constexpr std::size_t blocks = 3;
    const std::size_t raw = 2 * elements;
    const std::size_t enc = engine::encoded_size(c, elements);
    const std::size_t enc_slot = (enc + 255) / 256 * 256;
    device_buffer in(blocks * raw);
    device_buffer mid(blocks * enc_slot);
    device_buffer out(blocks * raw);
    mid.fill(0xa5); // poison: every byte must be written
    out.fill(0xa5);
    std::vector<std::vector<std::byte>> host;
    std::vector<codec_job> ejobs;
    std::vector<codec_job> djobs;
    for (std::size_t b = 0; b < blocks; ++b) {
      host.push_back(
          values(t, elements, static_cast<std::uint32_t>(b * 31 + elements)));
      in.upload(host.back(), b * raw);
      ejobs.push_back(
          {in.data() + b * raw, raw, mid.data() + b * enc_slot, enc});
      djobs.push_back(
          {mid.data() + b * enc_slot, enc, out.data() + b * raw, raw});
    }
    ASSERT_TRUE(encode_blocks(c, t, elements, ejobs, {}, path));
    ASSERT_TRUE(decode_blocks(c, t, elements, djobs, {}, path));
    sync_ok();
    for (std::size_t b = 0; b < blocks; ++b) {
      std::vector<std::byte> want(enc);
      ASSERT_TRUE(engine::encode(c, t, host[b], want));
      const auto got = mid.download(b * enc_slot, enc);
      for (std::size_t i = 0; i < enc; ++i)
        ASSERT_EQ(got[i], want[i]) << "encoded byte " << i << " of block " << b
                                   << ", " << elements << " elements";
      std::vector<std::byte> want_dec(raw);
      ASSERT_TRUE(engine::decode(c, t, want, want_dec));
      const auto got_dec = out.download(b * raw, raw);
      for (std::size_t i = 0; i < raw; i += 2)
        ASSERT_TRUE(got_dec[i] == want_dec[i] &&
                    got_dec[i + 1] == want_dec[i + 1])
            << "decoded element " << i / 2 << " of block " << b;
    }
  }
}

TEST_P(kernels_codec_test, decoding_arbitrary_bytes_matches_the_cpu_reference) {
  KVFLEET_REQUIRE_DEVICE();
  const auto [c, t, path] = GetParam();
  constexpr std::size_t elements = 64 * 257;
  const std::size_t enc = engine::encoded_size(c, elements);
  std::mt19937 rng(5);
  std::vector<std::byte> junk(enc);
  for (auto& b : junk)
    b = static_cast<std::byte>(rng() & 0xffU);
  for (std::size_t g = 0; g < elements / 64; g += 3) {
    const float s = g % 2 == 0 ? INFINITY : NAN;
    std::memcpy(junk.data() + 4 * g, &s, 4);
  }
  device_buffer src(enc);
  device_buffer dst(2 * elements);
  src.upload(junk);
  const codec_job j{src.data(), enc, dst.data(), 2 * elements};
  ASSERT_TRUE(decode_blocks(c, t, elements, {&j, 1}, {}, path));
  sync_ok();
  std::vector<std::byte> want(2 * elements);
  ASSERT_TRUE(engine::decode(c, t, junk, want));
  EXPECT_EQ(dst.download(0, 2 * elements), want);
}

INSTANTIATE_TEST_SUITE_P(
    all, kernels_codec_test,
    ::testing::Combine(::testing::Values(codec::fp8, codec::int8, codec::int4),
                       ::testing::Values(dtype::fp16, dtype::bf16),
                       ::testing::Values(kernel_path::hardware,
                                         kernel_path::portable)),
    [](const auto& p) {
      return std::string(engine::to_string(std::get<0>(p.param))) + "_" +
             std::string(engine::to_string(std::get<1>(p.param))) +
             (std::get<2>(p.param) == kernel_path::hardware ? "_hardware"
                                                            : "_portable");
    });

TEST(kernels_test, codec_none_is_a_copy) {
  KVFLEET_REQUIRE_DEVICE();
  constexpr std::size_t elements = 4096;
  const auto v = values(dtype::fp16, elements, 3);
  device_buffer a(v.size());
  device_buffer b(v.size());
  a.upload(v);
  const codec_job j{a.data(), v.size(), b.data(), v.size()};
  ASSERT_TRUE(encode_blocks(codec::none, dtype::fp16, elements, {&j, 1}));
  sync_ok();
  EXPECT_EQ(b.download(0, v.size()), v);
}

/// Gathers `count` of `slots` blocks of `block` bytes, slot s at
/// s * stride + skew, in random order, checks them, scatters them back into
/// a cleared pool and checks that every gathered slot came back.
void gather_scatter_round_trip(std::size_t block, std::size_t stride,
                               std::size_t skew, std::size_t slots,
                               std::size_t count) {
  std::vector<std::byte> pool_host(slots * stride + skew);
  std::mt19937 rng(11);
  for (auto& x : pool_host)
    x = static_cast<std::byte>(rng() & 0xffU);
  device_buffer pool(pool_host.size());
  pool.upload(pool_host);
  std::vector<std::size_t> order(slots);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  order.resize(count);
  std::vector<std::size_t> offsets;
  for (std::size_t s : order)
    offsets.push_back(s * stride + skew);
  device_buffer packed(order.size() * block);
  ASSERT_TRUE(gather_blocks({pool.data(), pool.size()}, offsets, block,
                            {packed.data(), packed.size()}));
  sync_ok();
  const auto got = packed.download(0, packed.size());
  for (std::size_t i = 0; i < order.size(); ++i)
    ASSERT_EQ(0, std::memcmp(got.data() + i * block,
                             pool_host.data() + offsets[i], block))
        << "block " << i;
  pool.fill(0);
  ASSERT_TRUE(scatter_blocks({packed.data(), packed.size()}, offsets, block,
                             {pool.data(), pool.size()}));
  sync_ok();
  const auto back = pool.download(0, pool.size());
  for (std::size_t o : offsets)
    ASSERT_EQ(0, std::memcmp(back.data() + o, pool_host.data() + o, block))
        << "offset " << o;
}

TEST(kernels_test, gather_and_scatter_in_random_order_round_trip) {
  KVFLEET_REQUIRE_DEVICE();
  gather_scatter_round_trip(32768, 32768, 0, 3000, 2500);
}

TEST(kernels_test, gather_and_scatter_batches_span_several_launches) {
  KVFLEET_REQUIRE_DEVICE();
  // 9000 blocks: more than one launch's 8184 word offsets.
  gather_scatter_round_trip(4096, 4096, 0, 10000, 9000);
}

TEST(kernels_test, gather_and_scatter_of_unaligned_blocks_take_the_byte_path) {
  KVFLEET_REQUIRE_DEVICE();
  gather_scatter_round_trip(1000, 1003, 1, 400, 300);
}

TEST(kernels_test, gather_and_scatter_of_large_blocks_use_several_ctas_each) {
  KVFLEET_REQUIRE_DEVICE();
  gather_scatter_round_trip(std::size_t{1} << 20, std::size_t{1} << 20, 0, 40,
                            30);
}

TEST(kernels_test, unaligned_copies_take_the_byte_path_and_are_exact) {
  KVFLEET_REQUIRE_DEVICE();
  std::vector<std::byte> h(10000);
  for (std::size_t i = 0; i < h.size(); ++i)
    h[i] = static_cast<std::byte>(i * 7);
  device_buffer a(h.size());
  device_buffer b(h.size());
  a.upload(h);
  b.fill(0);
  const copy_job j{a.data() + 3, b.data() + 5, 9000};
  ASSERT_TRUE(copy_blocks({&j, 1}));
  sync_ok();
  const auto got = b.download(5, 9000);
  EXPECT_EQ(0, std::memcmp(got.data(), h.data() + 3, 9000));
}

TEST(kernels_test, device_checksums_match_the_host) {
  KVFLEET_REQUIRE_DEVICE();
  const std::vector<std::size_t> sizes{0,
                                       1,
                                       17,
                                       240,
                                       241,
                                       4095,
                                       4096,
                                       4097,
                                       32768,
                                       262144 + 100,
                                       std::size_t{3} << 20};
  std::size_t total = 0;
  for (std::size_t n : sizes)
    total += n + 256;
  std::vector<std::byte> h(total);
  std::mt19937 rng(21);
  for (auto& x : h)
    x = static_cast<std::byte>(rng() & 0xffU);
  device_buffer d(total);
  d.upload(h);
  device_buffer out(8 * sizes.size());
  std::vector<checksum_job> jobs;
  std::vector<std::uint64_t> want;
  std::size_t at = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const std::size_t off = at + (i % 3); // odd starts too
    jobs.push_back({d.data() + off, sizes[i]});
    want.push_back(engine::block_checksum({h.data() + off, sizes[i]}));
    at += sizes[i] + 256;
  }
  ASSERT_TRUE(
      checksum_blocks(jobs, reinterpret_cast<std::uint64_t*>(out.data())));
  sync_ok();
  const auto got_bytes = out.download(0, 8 * sizes.size());
  std::vector<std::uint64_t> got(sizes.size());
  std::memcpy(got.data(), got_bytes.data(), got_bytes.size());
  EXPECT_EQ(got, want);
}

TEST(kernels_test, a_failed_runtime_call_does_not_linger_for_the_next_launch) {
  KVFLEET_REQUIRE_DEVICE();
  // No device 1 << 20: the failure comes back as a value, and the thread's
  // last error is clear afterwards, so the next launch's check does not
  // report it again (a refused cudaHostAlloc once read as "launch of
  // checksum kernel: out of memory").
  auto r = internal::check(cudaSetDevice(1 << 20), "cudaSetDevice(1 << 20)");
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(cudaPeekAtLastError(), cudaSuccess);
  ASSERT_TRUE(internal::use_device(0).has_value());
  device_buffer a(4096);
  std::uint64_t* sums = nullptr;
  ASSERT_EQ(cudaMalloc(&sums, 8), cudaSuccess);
  const checksum_job j{a.data(), 4096};
  EXPECT_TRUE(checksum_blocks({&j, 1}, sums).has_value());
  sync_ok();
  (void)cudaFree(sums);
}

TEST(kernels_test, a_refused_call_leaves_no_cuda_error_behind) {
  KVFLEET_REQUIRE_DEVICE();
  device_buffer a(4096);
  const codec_job j{a.data(), 100, a.data(), 100};
  EXPECT_FALSE(encode_blocks(codec::int8, dtype::fp16, 64, {&j, 1}));
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

} // namespace
} // namespace kvfleet::cuda
