#include "engine/codec.hpp"

#include "engine/internal/codec_isa.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numbers>
#include <string>
#include <tuple>
#include <vector>

namespace kvfleet::engine {
namespace {

using bytes = std::vector<std::byte>;

constexpr float inf = std::numeric_limits<float>::infinity();
constexpr float qnan = std::numeric_limits<float>::quiet_NaN();

// ------------------------------------------------------------ test data

/// splitmix64: a tiny generator whose output is the same with every
/// standard library, unlike std::normal_distribution.
class rng {
public:
  explicit rng(std::uint64_t seed) : state_(seed) {}

  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  std::uint32_t next32() { return static_cast<std::uint32_t>(next() >> 32); }
  /// Uniform in (0, 1].
  double uniform() { return static_cast<double>((next() >> 11) + 1) * 0x1p-53; }
  /// Standard normal (Box-Muller).
  float normal() {
    const double r = std::sqrt(-2.0 * std::log(uniform()));
    return static_cast<float>(r * std::cos(2.0 * std::numbers::pi * uniform()));
  }

private:
  std::uint64_t state_;
};

std::uint16_t to_raw(dtype t, float f) {
  return t == dtype::fp16 ? float_to_half(f) : float_to_bf16(f);
}

float from_raw(dtype t, std::uint16_t h) {
  return t == dtype::fp16 ? half_to_float(h) : bf16_to_float(h);
}

bytes raw_from_bits(const std::vector<std::uint16_t>& v) {
  bytes out(2 * v.size());
  if (!v.empty())
    std::memcpy(out.data(), v.data(), out.size());
  return out;
}

std::vector<std::uint16_t> bits_from_raw(const bytes& b) {
  std::vector<std::uint16_t> v(b.size() / 2);
  if (!v.empty())
    std::memcpy(v.data(), b.data(), 2 * v.size());
  return v;
}

bytes raw_from_floats(dtype t, const std::vector<float>& v) {
  std::vector<std::uint16_t> bits;
  bits.reserve(v.size());
  for (float f : v)
    bits.push_back(to_raw(t, f));
  return raw_from_bits(bits);
}

std::vector<float> floats_from_raw(dtype t, const bytes& b) {
  std::vector<float> v;
  for (std::uint16_t h : bits_from_raw(b))
    v.push_back(from_raw(t, h));
  return v;
}

bytes normal_values(dtype t, std::size_t n, std::uint64_t seed) {
  rng r(seed);
  std::vector<float> v(n);
  for (float& f : v)
    f = r.normal();
  return raw_from_floats(t, v);
}

bytes encode_or_die(codec c, dtype t, const bytes& src) {
  bytes out(encoded_size(c, src.size() / 2));
  auto n = encode(c, t, src, out);
  EXPECT_TRUE(n.has_value()) << n.error().describe();
  EXPECT_EQ(n.value_or(0), out.size());
  return out;
}

bytes decode_or_die(codec c, dtype t, const bytes& enc, std::size_t n) {
  bytes out(2 * n);
  auto written = decode(c, t, enc, out);
  EXPECT_TRUE(written.has_value()) << written.error().describe();
  EXPECT_EQ(written.value_or(0), out.size());
  return out;
}

std::uint32_t float_bits(float f) {
  return std::bit_cast<std::uint32_t>(f);
}

// ------------------------------------------------------------ conversions

TEST(codec, half_fixed_vectors) {
  EXPECT_EQ(half_to_float(0x3c00), 1.0F);
  EXPECT_EQ(half_to_float(0xc000), -2.0F);
  EXPECT_EQ(half_to_float(0x7bff), 65504.0F);
  EXPECT_EQ(half_to_float(0x0001), 0x1p-24F);        // smallest subnormal
  EXPECT_EQ(half_to_float(0x03ff), 1023 * 0x1p-24F); // largest subnormal
  EXPECT_EQ(half_to_float(0x0400), 0x1p-14F);        // smallest normal
  EXPECT_EQ(half_to_float(0x7c00), inf);
  EXPECT_EQ(half_to_float(0xfc00), -inf);
  EXPECT_EQ(float_bits(half_to_float(0x8000)), 0x80000000U);
  EXPECT_TRUE(std::isnan(half_to_float(0x7e00)));
  EXPECT_TRUE(std::isnan(half_to_float(0x7c01))); // signalling NaN
  EXPECT_TRUE(std::signbit(half_to_float(0xfe00)));

  EXPECT_EQ(float_to_half(1.0F), 0x3c00);
  EXPECT_EQ(float_to_half(-2.0F), 0xc000);
  EXPECT_EQ(float_to_half(65504.0F), 0x7bff);
  EXPECT_EQ(float_to_half(0x1p-24F), 0x0001);
  EXPECT_EQ(float_to_half(0x1p-14F), 0x0400);
  EXPECT_EQ(float_to_half(-0.0F), 0x8000);
  EXPECT_EQ(float_to_half(inf), 0x7c00);
  EXPECT_EQ(float_to_half(-inf), 0xfc00);
  EXPECT_EQ(float_to_half(std::numeric_limits<float>::max()), 0x7c00);
  // Round to nearest, ties to even.
  EXPECT_EQ(float_to_half(1.0F + 0x1p-11F), 0x3c00);            // tie, down
  EXPECT_EQ(float_to_half(1.0F + 3 * 0x1p-11F), 0x3c02);        // tie, up
  EXPECT_EQ(float_to_half(1.0F + 0x1p-11F + 0x1p-20F), 0x3c01); // above tie
  EXPECT_EQ(float_to_half(65519.0F), 0x7bff);
  EXPECT_EQ(float_to_half(65520.0F), 0x7c00); // tie between max and 2^16
  EXPECT_EQ(float_to_half(0x1p-25F), 0x0000); // tie between 0 and 2^-24
  EXPECT_EQ(float_to_half(0x1.000002p-25F), 0x0001);
  EXPECT_EQ(float_to_half(3 * 0x1p-25F), 0x0002); // tie to even subnormal
  EXPECT_EQ(float_to_half(0x1.ffep-15F),
            0x0400); // subnormal rounds up to normal
  EXPECT_EQ(float_to_half(1e-10F), 0x0000);
  EXPECT_EQ(float_to_half(-1e-10F), 0x8000);
  // NaN stays NaN, sign kept, quieted.
  const std::uint16_t n = float_to_half(qnan);
  EXPECT_EQ(n & 0x7c00, 0x7c00);
  EXPECT_NE(n & 0x03ff, 0);
  EXPECT_EQ(float_to_half(-qnan) & 0x8000, 0x8000);
  EXPECT_EQ(float_to_half(std::bit_cast<float>(0x7f800001U)) & 0x7e00, 0x7e00);
}

TEST(codec, bf16_fixed_vectors) {
  EXPECT_EQ(bf16_to_float(0x3f80), 1.0F);
  EXPECT_EQ(bf16_to_float(0xc000), -2.0F);
  EXPECT_EQ(bf16_to_float(0x7f7f), 0x1.fep127F);
  EXPECT_EQ(bf16_to_float(0x0001), 0x1p-133F); // smallest subnormal
  EXPECT_EQ(bf16_to_float(0x7f80), inf);
  EXPECT_TRUE(std::isnan(bf16_to_float(0x7fc0)));

  EXPECT_EQ(float_to_bf16(1.0F), 0x3f80);
  EXPECT_EQ(float_to_bf16(-2.0F), 0xc000);
  EXPECT_EQ(float_to_bf16(0x1p-133F), 0x0001);
  EXPECT_EQ(float_to_bf16(1.0F + 0x1p-8F), 0x3f80);     // tie, down
  EXPECT_EQ(float_to_bf16(1.0F + 3 * 0x1p-8F), 0x3f82); // tie, up
  EXPECT_EQ(float_to_bf16(1.0F + 0x1p-8F + 0x1p-20F), 0x3f81);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(float_to_bf16(-inf), 0xff80);
  EXPECT_EQ(float_to_bf16(0x1p-149F), 0x0000); // below half the smallest
  // A NaN whose payload is only in the dropped bits must not become inf.
  const std::uint16_t n = float_to_bf16(std::bit_cast<float>(0x7f800001U));
  EXPECT_EQ(n & 0x7f80, 0x7f80);
  EXPECT_NE(n & 0x007f, 0);
  EXPECT_EQ(float_to_bf16(-qnan) & 0x8000, 0x8000);
}

TEST(codec, e4m3_fixed_vectors) {
  EXPECT_EQ(e4m3_to_float(0x38), 1.0F);
  EXPECT_EQ(e4m3_to_float(0xc0), -2.0F);
  EXPECT_EQ(e4m3_to_float(0x7e), 448.0F);
  EXPECT_EQ(e4m3_to_float(0xfe), -448.0F);
  EXPECT_EQ(e4m3_to_float(0x01), 0x1p-9F); // smallest subnormal
  EXPECT_EQ(e4m3_to_float(0x07), 7 * 0x1p-9F);
  EXPECT_EQ(e4m3_to_float(0x08), 0x1p-6F); // smallest normal
  EXPECT_EQ(float_bits(e4m3_to_float(0x80)), 0x80000000U);
  EXPECT_TRUE(std::isnan(e4m3_to_float(0x7f)));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0xff)));

  EXPECT_EQ(float_to_e4m3(1.0F), 0x38);
  EXPECT_EQ(float_to_e4m3(-2.0F), 0xc0);
  EXPECT_EQ(float_to_e4m3(448.0F), 0x7e);
  EXPECT_EQ(float_to_e4m3(0x1p-9F), 0x01);
  EXPECT_EQ(float_to_e4m3(-0.0F), 0x80);
  // Round to nearest, ties to even.
  EXPECT_EQ(float_to_e4m3(1.0625F), 0x38);       // tie between 1 and 1.125
  EXPECT_EQ(float_to_e4m3(1.1875F), 0x3a);       // tie between 1.125 and 1.25
  EXPECT_EQ(float_to_e4m3(0x1p-10F), 0x00);      // tie between 0 and 2^-9
  EXPECT_EQ(float_to_e4m3(3 * 0x1p-10F), 0x02);  // tie to even subnormal
  EXPECT_EQ(float_to_e4m3(15 * 0x1p-10F), 0x08); // subnormal up to normal
  // Saturation, no infinities; NaN maps to 0x7f.
  EXPECT_EQ(float_to_e4m3(460.0F), 0x7e);
  EXPECT_EQ(float_to_e4m3(464.0F), 0x7e);
  EXPECT_EQ(float_to_e4m3(500.0F), 0x7e);
  EXPECT_EQ(float_to_e4m3(1e30F), 0x7e);
  EXPECT_EQ(float_to_e4m3(-1e30F), 0xfe);
  EXPECT_EQ(float_to_e4m3(inf), 0x7e);
  EXPECT_EQ(float_to_e4m3(-inf), 0xfe);
  EXPECT_EQ(float_to_e4m3(qnan), 0x7f);
  EXPECT_EQ(float_to_e4m3(-qnan), 0x7f);
}

TEST(codec, every_finite_value_round_trips_through_fp32) {
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    if ((h & 0x7fff) <= 0x7c00) {
      ASSERT_EQ(float_to_half(half_to_float(bits)), bits) << std::hex << h;
    } else {
      ASSERT_TRUE(std::isnan(half_to_float(bits))) << std::hex << h;
    }
    if ((h & 0x7fff) <= 0x7f80) {
      ASSERT_EQ(float_to_bf16(bf16_to_float(bits)), bits) << std::hex << h;
    } else {
      ASSERT_TRUE(std::isnan(bf16_to_float(bits))) << std::hex << h;
    }
  }
  for (std::uint32_t v = 0; v <= 0xff; ++v) {
    const auto bits = static_cast<std::uint8_t>(v);
    if ((v & 0x7f) != 0x7f) {
      ASSERT_EQ(float_to_e4m3(e4m3_to_float(bits)), bits) << std::hex << v;
    }
  }
}

/// Independent reference: the nearest of a format's sorted non-negative
/// values, ties to the even code, computed in double.
struct reference_format {
  std::vector<double> values; // ascending
  std::vector<std::uint32_t> codes;
  double overflow_at; // magnitudes >= this map to `overflow_code`
  std::uint32_t overflow_code;
  std::uint32_t sign_bit;

  std::uint32_t round(float f) const {
    const double a = std::fabs(static_cast<double>(f));
    const std::uint32_t sign = std::signbit(f) ? sign_bit : 0U;
    if (a >= overflow_at)
      return overflow_code | sign;
    const auto it = std::lower_bound(values.begin(), values.end(), a);
    const auto hi = static_cast<std::size_t>(it - values.begin());
    if (hi == values.size())
      return overflow_code | sign;
    if (values[hi] == a || hi == 0)
      return codes[hi] | sign;
    const double dlo = a - values[hi - 1];
    const double dhi = values[hi] - a;
    if (dlo < dhi)
      return codes[hi - 1] | sign;
    if (dhi < dlo)
      return codes[hi] | sign;
    return ((codes[hi] & 1U) == 0 ? codes[hi] : codes[hi - 1]) | sign;
  }
};

reference_format half_reference() {
  reference_format r;
  for (std::uint32_t h = 0; h < 0x7c00; ++h) {
    r.values.push_back(
        static_cast<double>(half_to_float(static_cast<std::uint16_t>(h))));
    r.codes.push_back(h);
  }
  r.values.push_back(65536.0); // where infinity would be
  r.codes.push_back(0x7c00);
  r.overflow_at = 65536.0;
  r.overflow_code = 0x7c00;
  r.sign_bit = 0x8000;
  return r;
}

reference_format bf16_reference() {
  reference_format r;
  for (std::uint32_t h = 0; h < 0x7f80; ++h) {
    r.values.push_back(
        static_cast<double>(bf16_to_float(static_cast<std::uint16_t>(h))));
    r.codes.push_back(h);
  }
  r.values.push_back(0x1p128);
  r.codes.push_back(0x7f80);
  r.overflow_at = 0x1p128;
  r.overflow_code = 0x7f80;
  r.sign_bit = 0x8000;
  return r;
}

reference_format e4m3_reference() {
  reference_format r;
  for (std::uint32_t v = 0; v < 0x7f; ++v) {
    r.values.push_back(
        static_cast<double>(e4m3_to_float(static_cast<std::uint8_t>(v))));
    r.codes.push_back(v);
  }
  r.overflow_at = 448.0; // saturating: everything from 448 up is 448
  r.overflow_code = 0x7e;
  r.sign_bit = 0x80;
  return r;
}

/// Random floats over every exponent, plus dense coverage of each format's
/// range, so that every rounding path is hit many times.
std::vector<float> conversion_probes() {
  rng r(7);
  std::vector<float> out;
  for (int i = 0; i < 200000; ++i) {
    const std::uint32_t bits = r.next32();
    const float f = std::bit_cast<float>(bits);
    if (!std::isnan(f))
      out.push_back(f);
  }
  for (int e = -30; e <= 20; ++e)
    for (int i = 0; i < 4000; ++i)
      out.push_back(std::ldexp(static_cast<float>(r.uniform()), e) *
                    ((r.next() & 1U) != 0 ? -1.0F : 1.0F));
  return out;
}

TEST(codec, conversions_match_a_nearest_value_reference) {
  const auto half = half_reference();
  const auto bf16 = bf16_reference();
  const auto e4m3 = e4m3_reference();
  for (float f : conversion_probes()) {
    ASSERT_EQ(float_to_half(f), half.round(f)) << f;
    ASSERT_EQ(float_to_bf16(f), bf16.round(f)) << f;
    ASSERT_EQ(float_to_e4m3(f), e4m3.round(f)) << f;
  }
}

// ------------------------------------------------------------ names

TEST(codec, names_round_trip) {
  for (std::size_t i = 0; i < codec_count; ++i) {
    const auto c = static_cast<codec>(i);
    EXPECT_TRUE(is_valid(c));
    auto parsed = parse_codec(to_string(c));
    ASSERT_TRUE(parsed.has_value()) << to_string(c);
    EXPECT_EQ(*parsed, c);
  }
  EXPECT_EQ(parse_codec("fp16").value_or(codec::int4), codec::none);
  EXPECT_EQ(parse_codec("bf16").value_or(codec::int4), codec::none);
  EXPECT_EQ(to_string(codec::int8), "int8");
}

TEST(codec, unknown_name_is_an_error) {
  auto r = parse_codec("int2");
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, errc::unknown_codec);
  EXPECT_NE(r.error().message.find("int2"), std::string::npos);
  EXPECT_NE(r.error().message.find("int8"), std::string::npos);
  EXPECT_FALSE(parse_codec("").has_value());
  EXPECT_FALSE(parse_codec("INT8").has_value());
}

TEST(codec, encoded_sizes) {
  EXPECT_EQ(encoded_size(codec::none, 64), 128U);
  EXPECT_EQ(encoded_size(codec::fp8, 64), 68U);
  EXPECT_EQ(encoded_size(codec::int8, 64), 68U);
  EXPECT_EQ(encoded_size(codec::int4, 64), 36U);
  EXPECT_EQ(encoded_size(codec::int8, 4096), 4096U + 64U * 4U);
  EXPECT_EQ(encoded_size(codec::int4, 4096), 2048U + 64U * 4U);
  EXPECT_EQ(encoded_size(codec::int4, 0), 0U);
  // Partial groups count as whole ones.
  EXPECT_EQ(encoded_size(codec::int8, 65), 2 * 68U);
  EXPECT_EQ(encoded_size(static_cast<codec>(9), 64), 0U);
  // Sizes past size_t saturate instead of wrapping: 2^63 fp16 elements
  // are 2^64 bytes (wrapped: 0). Counts in the last group before 2^64 are
  // 2^58 groups (rounding up wrapped them to 0 groups).
  constexpr std::size_t max = std::numeric_limits<std::size_t>::max();
  for (const std::size_t n : {max, max - codec_group_size + 2}) {
    EXPECT_EQ(encoded_size(codec::none, n), max);
    EXPECT_EQ(encoded_size(codec::fp8, n), max);
    EXPECT_EQ(encoded_size(codec::int8, n), max);
    EXPECT_EQ(encoded_size(codec::int4, n), (std::size_t{1} << 58) * 36U);
  }
  EXPECT_EQ(encoded_size(codec::none, std::size_t{1} << 63), max);
  EXPECT_EQ(encoded_size(codec::none, (std::size_t{1} << 63) - 64), max - 127);
  EXPECT_EQ(encoded_size(codec::int8, max / 68 * 64), max / 68 * 68);
  EXPECT_EQ(encoded_size(codec::int8, max / 68 * 64 + 1), max);
}

// ------------------------------------------------------------ errors

TEST(codec, unknown_codec_value_is_an_error) {
  const auto bad = static_cast<codec>(9);
  EXPECT_FALSE(is_valid(bad));
  EXPECT_EQ(to_string(bad), "unknown");
  bytes src(128);
  bytes dst(1024);
  auto e = encode(bad, dtype::fp16, src, dst);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, errc::unknown_codec);
  EXPECT_NE(e.error().message.find('9'), std::string::npos);
  auto d = decode(bad, dtype::fp16, src, dst);
  ASSERT_FALSE(d.has_value());
  EXPECT_EQ(d.error().code, errc::unknown_codec);
}

TEST(codec, unknown_dtype_value_is_an_error) {
  bytes src(128);
  bytes dst(1024);
  auto e = encode(codec::int8, static_cast<dtype>(7), src, dst);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, errc::invalid_argument);
  EXPECT_NE(e.error().message.find('7'), std::string::npos);
  auto d = decode(codec::none, static_cast<dtype>(7), src, dst);
  ASSERT_FALSE(d.has_value());
  EXPECT_EQ(d.error().code, errc::invalid_argument);
}

TEST(codec, unsupported_path_is_an_error) {
  bytes src(128);
  bytes dst(1024);
  auto e = internal::encode_with(static_cast<internal::codec_isa>(5),
                                 codec::int8, dtype::fp16, src, dst);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, errc::invalid_argument);
}

// ------------------------------------------------------------ contract

/// The same contract for every codec and element type.
class codec_contract
    : public ::testing::TestWithParam<std::tuple<codec, dtype>> {
protected:
  codec c() const { return std::get<0>(GetParam()); }
  dtype t() const { return std::get<1>(GetParam()); }
  bool quantized() const { return c() != codec::none; }

  /// Tight bounds on N(0, 1) data: about 1.2x what the codecs measure on
  /// it (fp16 / bf16: fp8 0.0251 / 0.0252, int8 0.0059 / 0.0061, int4
  /// 0.1073 / 0.1073).
  double error_bound() const {
    switch (c()) {
    case codec::none:
      return 0.0;
    case codec::fp8:
      return 0.03;
    case codec::int8:
      return 0.0075;
    case codec::int4:
      return 0.125;
    }
    return 0.0;
  }
  /// The quantized code of a group's largest magnitude.
  std::uint32_t qmax_code() const {
    switch (c()) {
    case codec::fp8:
      return 0x7e;
    case codec::int8:
      return 127;
    case codec::int4:
      return 7;
    case codec::none:
      break;
    }
    return 0;
  }
};

TEST_P(codec_contract, round_trip_error_is_bounded) {
  constexpr std::size_t n = std::size_t{64} * 1024;
  const bytes src = normal_values(t(), n, 42);
  const bytes enc = encode_or_die(c(), t(), src);
  const bytes back = decode_or_die(c(), t(), enc, n);
  const double err = relative_l2_error(t(), src, back);
  EXPECT_LE(err, error_bound());
  if (quantized()) {
    EXPECT_GT(err, 0.0);
    // A bound far above the real error would no longer catch regressions.
    EXPECT_GT(err, error_bound() / 1.5);
  } else {
    EXPECT_EQ(back, src);
    EXPECT_EQ(enc, src);
  }
}

TEST_P(codec_contract, sizes_and_return_values) {
  for (std::size_t groups : {0U, 1U, 3U, 17U, 40U}) {
    const std::size_t n = groups * codec_group_size;
    const bytes src = normal_values(t(), n, groups);
    // A larger destination is fine; only encoded_size bytes are written.
    bytes enc(encoded_size(c(), n) + 8, std::byte{0xab});
    auto e = encode(c(), t(), src, enc);
    ASSERT_TRUE(e.has_value()) << e.error().describe();
    EXPECT_EQ(*e, encoded_size(c(), n));
    for (std::size_t i = *e; i < enc.size(); ++i)
      EXPECT_EQ(enc[i], std::byte{0xab});
    enc.resize(*e);
    bytes back(2 * n + 8, std::byte{0xcd});
    auto d = decode(c(), t(), enc, back);
    ASSERT_TRUE(d.has_value()) << d.error().describe();
    EXPECT_EQ(*d, 2 * n);
    for (std::size_t i = *d; i < back.size(); ++i)
      EXPECT_EQ(back[i], std::byte{0xcd});
  }
}

TEST_P(codec_contract, zero_group_decodes_to_zeros) {
  const bytes src(codec_group_size * 2 * 3); // +0 everywhere
  const bytes enc = encode_or_die(c(), t(), src);
  if (quantized()) {
    float scale = -1.0F;
    std::memcpy(&scale, enc.data(), sizeof scale);
    EXPECT_EQ(scale, 0.0F);
  }
  EXPECT_EQ(decode_or_die(c(), t(), enc, 3 * codec_group_size), src);
}

TEST_P(codec_contract, group_maximum_maps_to_qmax) {
  if (!quantized())
    GTEST_SKIP() << "none stores values as they are";
  rng r(3);
  std::vector<float> v(codec_group_size);
  for (float& f : v)
    f = r.normal();
  v[5] = -8.0F; // the group's absmax, exactly representable in fp16 and bf16
  const bytes enc = encode_or_die(c(), t(), raw_from_floats(t(), v));
  float scale = 0.0F;
  std::memcpy(&scale, enc.data(), sizeof scale);
  const float qmax = c() == codec::fp8    ? 448.0F
                     : c() == codec::int8 ? 127.0F
                                          : 7.0F;
  EXPECT_EQ(scale, 8.0F / qmax);
  const auto* payload = enc.data() + sizeof(float);
  std::uint32_t code = 0;
  if (c() == codec::int4)
    code =
        (std::to_integer<std::uint32_t>(payload[2]) >> 4) & 0xfU; // element 5
  else
    code = std::to_integer<std::uint32_t>(payload[5]);
  // -qmax: sign bit for fp8, two's complement for the integer codecs.
  const std::uint32_t expected = c() == codec::fp8    ? (0x80U | qmax_code())
                                 : c() == codec::int8 ? (256U - qmax_code())
                                                      : (16U - qmax_code());
  EXPECT_EQ(code, expected);
  // The extreme value survives the round trip exactly.
  const auto back =
      floats_from_raw(t(), decode_or_die(c(), t(), enc, codec_group_size));
  EXPECT_EQ(back[5], -8.0F);
}

TEST_P(codec_contract, non_finite_inputs) {
  // Zeros and +-1 (the absmax) survive every codec exactly.
  std::vector<float> v(2 * codec_group_size, 0.0F);
  v[0] = 1.0F;
  v[1] = -1.0F;
  v[3] = inf;
  v[4] = -inf;
  v[7] = qnan;
  std::fill(v.begin() + static_cast<std::ptrdiff_t>(codec_group_size), v.end(),
            -inf); // a group with nothing finite
  const bytes src = raw_from_floats(t(), v);
  const bytes enc = encode_or_die(c(), t(), src);
  const bytes raw_back = decode_or_die(c(), t(), enc, v.size());
  if (!quantized()) {
    EXPECT_EQ(raw_back, src); // passthrough keeps them
    return;
  }
  // Quantized codecs store non-finite elements as 0 and size the scale from
  // the finite ones only.
  const auto back = floats_from_raw(t(), raw_back);
  EXPECT_EQ(back[0], 1.0F);
  EXPECT_EQ(back[1], -1.0F);
  for (std::size_t i : {3U, 4U, 7U})
    EXPECT_EQ(back[i], 0.0F) << i;
  for (std::size_t i = codec_group_size; i < v.size(); ++i)
    EXPECT_EQ(back[i], 0.0F) << i;
}

TEST_P(codec_contract, wrong_sizes_are_errors) {
  const bytes src = normal_values(t(), 2 * codec_group_size, 1);
  const std::size_t need = encoded_size(c(), 2 * codec_group_size);
  bytes dst(need);

  // Source not a whole number of groups.
  auto e = encode(c(), t(), std::span(src).first(src.size() - 2), dst);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, errc::wrong_value_size);
  EXPECT_NE(e.error().message.find(std::to_string(src.size() - 2)),
            std::string::npos)
      << e.error().message;
  EXPECT_NE(e.error().message.find("128"), std::string::npos)
      << e.error().message;

  // Destination one byte short.
  e = encode(c(), t(), src, std::span(dst).first(need - 1));
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, errc::wrong_value_size);
  EXPECT_NE(e.error().message.find(std::to_string(need)), std::string::npos)
      << e.error().message;

  ASSERT_TRUE(encode(c(), t(), src, dst).has_value());
  bytes back(src.size());
  // Encoded source of the wrong size.
  bytes longer = dst;
  longer.push_back(std::byte{0});
  auto d = decode(c(), t(), longer, back);
  ASSERT_FALSE(d.has_value());
  EXPECT_EQ(d.error().code, errc::wrong_value_size);
  EXPECT_NE(d.error().message.find(std::to_string(longer.size())),
            std::string::npos)
      << d.error().message;
  // Destination one byte short.
  d = decode(c(), t(), dst, std::span(back).first(back.size() - 1));
  ASSERT_FALSE(d.has_value());
  EXPECT_EQ(d.error().code, errc::wrong_value_size);
  EXPECT_NE(d.error().message.find(std::to_string(back.size())),
            std::string::npos)
      << d.error().message;
}

/// Every instruction-set path gives the bytes of the portable one, on data
/// that exercises every conversion case: all 65536 bit patterns as input,
/// and decodes of random scales (tiny, huge, NaN) and payloads.
TEST_P(codec_contract, every_path_gives_the_same_bytes) {
  using internal::codec_isa;
  std::vector<std::uint16_t> all(65536);
  for (std::size_t i = 0; i < all.size(); ++i)
    all[i] = static_cast<std::uint16_t>(i * 40503U); // a permutation
  const bytes src = raw_from_bits(all);
  rng r(11);
  const std::size_t groups = 4096;
  bytes foreign(encoded_size(c(), groups * codec_group_size));
  for (auto& b : foreign)
    b = static_cast<std::byte>(r.next32());
  if (quantized()) {
    // Scales spread over the whole fp32 range, so that q * scale covers
    // subnormal, overflowing and NaN results.
    for (std::size_t g = 0; g < groups; ++g) {
      const float s =
          std::bit_cast<float>((r.next32() & 0x80000000U) |
                               static_cast<std::uint32_t>(
                                   (g * 0x7fffffffULL / groups) & 0x7fffffffU));
      std::memcpy(foreign.data() + 4 * g, &s, sizeof s);
    }
  }
  const auto run = [&](codec_isa isa, bytes& enc, bytes& dec, bytes& dec2) {
    enc.assign(encoded_size(c(), all.size()), std::byte{0});
    dec.assign(src.size(), std::byte{0});
    dec2.assign(2 * groups * codec_group_size, std::byte{0});
    ASSERT_TRUE(internal::encode_with(isa, c(), t(), src, enc).has_value());
    ASSERT_TRUE(internal::decode_with(isa, c(), t(), enc, dec).has_value());
    ASSERT_TRUE(
        internal::decode_with(isa, c(), t(), foreign, dec2).has_value());
  };
  bytes enc0, dec0, foreign0;
  run(codec_isa::generic, enc0, dec0, foreign0);
  bool compared = false;
  for (std::size_t i = 1; i < internal::codec_isa_count; ++i) {
    const auto isa = static_cast<codec_isa>(i);
    if (!internal::is_supported(isa))
      continue;
    bytes enc, dec, foreign_dec;
    run(isa, enc, dec, foreign_dec);
    EXPECT_EQ(enc, enc0) << internal::to_string(isa);
    EXPECT_EQ(dec, dec0) << internal::to_string(isa);
    EXPECT_EQ(foreign_dec, foreign0) << internal::to_string(isa);
    compared = true;
  }
  EXPECT_TRUE(internal::is_supported(internal::best_codec_isa()));
  if (!compared)
    GTEST_SKIP() << "only the generic path runs on this CPU";
}

INSTANTIATE_TEST_SUITE_P(
    codec, codec_contract,
    ::testing::Combine(::testing::Values(codec::none, codec::fp8, codec::int8,
                                         codec::int4),
                       ::testing::Values(dtype::fp16, dtype::bf16)),
    [](const ::testing::TestParamInfo<codec_contract::ParamType>& param) {
      return std::string(to_string(std::get<0>(param.param))) + "_" +
             std::string(to_string(std::get<1>(param.param)));
    });

// ------------------------------------------------------------ exact bytes

/// Hand-computed encodings: absmax equal to qmax makes scale and inv exactly
/// 1, so the payload shows the rounding (half to even) and packing rules.
TEST(codec, int8_golden_bytes) {
  std::vector<float> v(codec_group_size, 0.0F);
  const float in[] = {127.0F, -127.0F, 0.5F, 1.5F, 2.5F, -2.5F, 3.5F, -0.0F};
  std::copy(std::begin(in), std::end(in), v.begin());
  const bytes enc =
      encode_or_die(codec::int8, dtype::fp16, raw_from_floats(dtype::fp16, v));
  ASSERT_EQ(enc.size(), 68U);
  EXPECT_EQ(float_bits([&] {
              float s = 0;
              std::memcpy(&s, enc.data(), 4);
              return s;
            }()),
            float_bits(1.0F));
  const std::int8_t expect[] = {127, -127, 0, 2, 2, -2, 4, 0};
  for (std::size_t i = 0; i < std::size(expect); ++i)
    EXPECT_EQ(static_cast<std::int8_t>(enc[4 + i]), expect[i]) << i;
  // Little-endian scale bytes.
  EXPECT_EQ(enc[3], std::byte{0x3f});
  EXPECT_EQ(enc[2], std::byte{0x80});
}

TEST(codec, int4_golden_bytes) {
  std::vector<float> v(codec_group_size, 0.0F);
  const float in[] = {7.0F, -7.0F, 0.5F, 1.5F, 2.5F, -3.5F, -6.5F, 0.0F};
  std::copy(std::begin(in), std::end(in), v.begin());
  const bytes enc =
      encode_or_die(codec::int4, dtype::bf16, raw_from_floats(dtype::bf16, v));
  ASSERT_EQ(enc.size(), 36U);
  // Element 2i in the low nibble: {7, -7} {0, 2} {2, -4} {-6, 0}.
  const std::uint8_t expect[] = {0x97, 0x20, 0xc2, 0x0a};
  for (std::size_t i = 0; i < std::size(expect); ++i)
    EXPECT_EQ(std::to_integer<std::uint8_t>(enc[4 + i]), expect[i]) << i;
}

TEST(codec, fp8_golden_bytes) {
  std::vector<float> v(codec_group_size, 0.0F);
  const float in[] = {448.0F, 1.0F, -2.0F, 1.0625F, 0x1p-9F, -0.0F};
  std::copy(std::begin(in), std::end(in), v.begin());
  const bytes enc =
      encode_or_die(codec::fp8, dtype::fp16, raw_from_floats(dtype::fp16, v));
  const std::uint8_t expect[] = {0x7e, 0x38, 0xc0, 0x38, 0x01, 0x80};
  for (std::size_t i = 0; i < std::size(expect); ++i)
    EXPECT_EQ(std::to_integer<std::uint8_t>(enc[4 + i]), expect[i]) << i;
}

TEST(codec, tiny_bf16_group_is_stored_as_zeros) {
  // absmax / qmax below FLT_MIN would make 1 / scale overflow.
  std::vector<float> v(codec_group_size, 0.0F);
  v[0] = 1e-38F; // absmax / 7 is already below FLT_MIN
  v[1] = -3e-39F;
  const bytes src = raw_from_floats(dtype::bf16, v);
  for (codec c : {codec::fp8, codec::int8, codec::int4}) {
    const bytes enc = encode_or_die(c, dtype::bf16, src);
    float scale = -1.0F;
    std::memcpy(&scale, enc.data(), sizeof scale);
    EXPECT_EQ(scale, 0.0F) << to_string(c);
    for (float f : floats_from_raw(
             dtype::bf16, decode_or_die(c, dtype::bf16, enc, v.size())))
      EXPECT_EQ(f, 0.0F) << to_string(c);
  }
}

TEST(codec, subnormal_fp16_groups_keep_their_scale) {
  std::vector<float> v(codec_group_size, 0.0F);
  v[0] = 0x1p-24F; // smallest fp16 subnormal
  v[1] = -0x1p-24F;
  const bytes src = raw_from_floats(dtype::fp16, v);
  for (codec c : {codec::fp8, codec::int8, codec::int4}) {
    const bytes back = decode_or_die(
        c, dtype::fp16, encode_or_die(c, dtype::fp16, src), v.size());
    EXPECT_EQ(back, src) << to_string(c);
  }
}

TEST(codec, relative_l2_error_definition) {
  const bytes a = raw_from_floats(dtype::fp16, {3.0F, 4.0F});
  const bytes b = raw_from_floats(dtype::fp16, {3.0F, 0.0F});
  const bytes zero = raw_from_floats(dtype::fp16, {0.0F, 0.0F});
  EXPECT_EQ(relative_l2_error(dtype::fp16, a, a), 0.0);
  EXPECT_DOUBLE_EQ(relative_l2_error(dtype::fp16, a, b), 0.8);
  EXPECT_EQ(relative_l2_error(dtype::fp16, zero, zero), 0.0);
  EXPECT_EQ(relative_l2_error(dtype::fp16, zero, a),
            std::numeric_limits<double>::infinity());
  EXPECT_TRUE(std::isnan(relative_l2_error(dtype::fp16, a, bytes(2))));
  EXPECT_TRUE(std::isnan(relative_l2_error(static_cast<dtype>(7), a, a)));
  // Non-finite elements (before, an infinity in both made it NaN).
  const float infinity = std::numeric_limits<float>::infinity();
  for (const dtype t : {dtype::fp16, dtype::bf16}) {
    const bytes with_inf = raw_from_floats(t, {infinity, 4.0F});
    const bytes other_tail = raw_from_floats(t, {infinity, 2.0F});
    const bytes finite = raw_from_floats(t, {1.0F, 4.0F});
    const bytes nan = raw_from_floats(t, {std::nanf(""), 4.0F});
    EXPECT_EQ(relative_l2_error(t, with_inf, with_inf), 0.0);
    EXPECT_EQ(relative_l2_error(t, with_inf, other_tail), 0.0)
        << "finite error over an infinite norm";
    EXPECT_EQ(relative_l2_error(t, finite, with_inf),
              std::numeric_limits<double>::infinity());
    EXPECT_EQ(relative_l2_error(t, with_inf, finite),
              std::numeric_limits<double>::infinity());
    EXPECT_TRUE(std::isnan(relative_l2_error(t, nan, nan)));
  }
}

} // namespace
} // namespace kvfleet::engine
