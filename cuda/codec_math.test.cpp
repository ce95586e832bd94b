// The kernels' arithmetic (cuda/internal/codec_math.hpp), compiled for the
// host, against the engine's CPU reference: bit for bit.
#include "cuda/internal/codec_math.hpp"
#include "cuda/internal/codec_reference.hpp"
#include "engine/codec.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace kvfleet::cuda::internal {
namespace {

using engine::codec;
using engine::dtype;

TEST(codec_math_test, element_conversions_match_the_engine_exhaustively) {
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    const auto v = static_cast<std::uint16_t>(h);
    ASSERT_EQ(f32_bits(half_to_f32(v)), f32_bits(engine::half_to_float(v)))
        << h;
    ASSERT_EQ(f32_bits(bf16_to_f32(v)), f32_bits(engine::bf16_to_float(v)))
        << h;
  }
  for (std::uint32_t b = 0; b < 256; ++b) {
    const auto v = static_cast<std::uint8_t>(b);
    ASSERT_EQ(f32_bits(e4m3_to_f32(v)), f32_bits(engine::e4m3_to_float(v)))
        << b;
  }
  // Every 2^-10 of the fp32 bit space plus its neighbours covers each
  // rounding case (ties, subnormals, overflow, NaN payloads).
  for (std::uint64_t u = 0; u <= 0xffffffffULL; u += 4093) {
    const auto bits = static_cast<std::uint32_t>(u);
    const float f = bits_f32(bits);
    ASSERT_EQ(f32_to_half(f), engine::float_to_half(f)) << std::hex << bits;
    ASSERT_EQ(f32_to_bf16(f), engine::float_to_bf16(f)) << std::hex << bits;
    if (!std::isnan(f) && std::fabs(f) < 464.0F) {
      ASSERT_EQ(f32_to_e4m3_in_range(f), engine::float_to_e4m3(f))
          << std::hex << bits;
    }
  }
}

// Random groups of fp16/bf16 bit patterns: normal values of many
// magnitudes, plus groups seeded with zeros, subnormals, infinities and
// NaNs, and tiny bf16 groups (scale below FLT_MIN).
std::vector<std::uint16_t> test_values(dtype t, std::size_t n,
                                       std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0F, 1.0F);
  std::uniform_int_distribution<int> kind(0, 9);
  std::uniform_int_distribution<std::uint32_t> any(0, 0xffff);
  std::vector<std::uint16_t> v(n);
  for (std::size_t g = 0; g < n / 64; ++g) {
    const int k = kind(rng);
    const float mag = std::ldexp(1.0F, static_cast<int>(any(rng) % 40) - 20);
    for (std::size_t i = 0; i < 64; ++i) {
      const float x = normal(rng) * mag;
      std::uint16_t h = t == dtype::fp16 ? engine::float_to_half(x)
                                         : engine::float_to_bf16(x);
      if (k == 0)
        h = static_cast<std::uint16_t>(any(rng)); // any pattern
      if (k == 1 && i % 7 == 0)
        h = t == dtype::fp16 ? 0x7c00 : 0x7f80;
      if (k == 2 && i % 5 == 0)
        h = t == dtype::fp16 ? 0x7e01 : 0xffc1;
      if (k == 3)
        h = static_cast<std::uint16_t>(any(rng) & 0x83ff); // fp16 subnormals
      if (k == 4)
        h = 0;
      if (k == 5 && t == dtype::bf16)
        h = static_cast<std::uint16_t>(0x0080 + (any(rng) & 0x7f));
      v[g * 64 + i] = h;
    }
  }
  return v;
}

class codec_math_codec_test
    : public ::testing::TestWithParam<std::tuple<codec, dtype>> {};

TEST_P(codec_math_codec_test, encode_and_decode_match_the_engine_bit_for_bit) {
  const auto [c, t] = GetParam();
  constexpr std::size_t n =
      64 * 1001; // odd group count: payload 4-byte aligned
  const auto values = test_values(
      t, n, 7U + static_cast<unsigned>(c) * 3U + static_cast<unsigned>(t));
  const std::span<const std::byte> raw(
      reinterpret_cast<const std::byte*>(values.data()), 2 * n);
  const std::size_t enc_bytes = engine::encoded_size(c, n);
  std::vector<std::byte> want(enc_bytes);
  std::vector<std::byte> got(enc_bytes);
  ASSERT_TRUE(engine::encode(c, t, raw, want));
  reference_encode(c, t, values, got);
  for (std::size_t i = 0; i < enc_bytes; ++i)
    ASSERT_EQ(got[i], want[i]) << "byte " << i;

  std::vector<std::uint16_t> dec_want(n);
  std::vector<std::uint16_t> dec_got(n);
  ASSERT_TRUE(engine::decode(
      c, t, want, {reinterpret_cast<std::byte*>(dec_want.data()), 2 * n}));
  reference_decode(c, t, want, dec_got);
  for (std::size_t i = 0; i < n; ++i)
    ASSERT_EQ(dec_got[i], dec_want[i]) << "element " << i;

  // Decoding arbitrary bytes (NaN codes, odd scales) also matches.
  std::mt19937 rng(99);
  std::vector<std::byte> junk(enc_bytes);
  for (auto& b : junk)
    b = static_cast<std::byte>(rng() & 0xffU);
  for (std::size_t g = 0; g < n / 64; g += 3) { // some infinite and NaN scales
    const float s = g % 2 == 0 ? INFINITY : NAN;
    std::memcpy(junk.data() + 4 * g, &s, 4);
  }
  ASSERT_TRUE(engine::decode(
      c, t, junk, {reinterpret_cast<std::byte*>(dec_want.data()), 2 * n}));
  reference_decode(c, t, junk, dec_got);
  for (std::size_t i = 0; i < n; ++i)
    ASSERT_EQ(dec_got[i], dec_want[i]) << "element " << i;
}

INSTANTIATE_TEST_SUITE_P(
    all, codec_math_codec_test,
    ::testing::Combine(::testing::Values(codec::fp8, codec::int8, codec::int4),
                       ::testing::Values(dtype::fp16, dtype::bf16)),
    [](const auto& p) {
      return std::string(engine::to_string(std::get<0>(p.param))) + "_" +
             std::string(engine::to_string(std::get<1>(p.param)));
    });

} // namespace
} // namespace kvfleet::cuda::internal
