#pragma once
/// Branchless bit-level conversions between fp32 and the 16- and 8-bit float
/// formats of the codecs (fp16, bf16, fp8 e4m3).
///
/// Every function is straight-line integer and fp32 code with selects instead
/// of branches, so that loops over a group of elements auto-vectorize on any
/// x86-64 level (SSE2 up) and give the same bits on every path. The results
/// are exact IEEE conversions: round to nearest even, subnormals kept. They
/// REQUIRE the default fp32 environment (round to nearest, no flush to zero),
/// which is what C++ programs run in unless they change it.
///
/// Thread safety: pure functions.

#include <bit>
#include <cstdint>

namespace kvfleet::engine::internal {

// Signed 32-bit views keep the comparisons below to the signed compares that
// SSE2 has (there is no unsigned 32-bit compare before AVX-512). Every value
// compared is a float's bits without the sign, so it fits in 31 bits.
[[gnu::always_inline]] inline std::int32_t abs_bits(float f) noexcept {
  return static_cast<std::int32_t>(std::bit_cast<std::uint32_t>(f) &
                                   0x7fffffffU);
}

[[gnu::always_inline]] inline float from_bits(std::int32_t bits) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits));
}

/// `c ? a : b` as bit masks. A plain `?:` lets GCC sink the fp32 operation
/// that computes only one of the arms into a branch, and then refuse to
/// if-convert it back because fp32 adds may trap: the loop would not
/// vectorize.
[[gnu::always_inline]] inline std::int32_t select(bool c, std::int32_t a,
                                                  std::int32_t b) noexcept {
  const std::int32_t m = -static_cast<std::int32_t>(c);
  return (a & m) | (b & ~m);
}

// ---------------------------------------------------------------- fp16

/// fp16 bits -> fp32, exact. NaN payloads are kept bit for bit.
[[gnu::always_inline]] inline float
half_bits_to_float(std::uint16_t h) noexcept {
  const std::int32_t em = h & 0x7fff;
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000) << 16;
  // Normal: move the fields into place and rebias the exponent (127 - 15).
  const std::int32_t normal = (em << 13) + (112 << 23);
  // Subnormal (and zero): m * 2^-24, both steps exact in fp32.
  const std::int32_t sub =
      std::bit_cast<std::int32_t>(static_cast<float>(em) * 0x1p-24F);
  // Infinity and NaN: all-ones exponent, mantissa kept.
  const std::int32_t special = (em << 13) | 0x7f800000;
  std::int32_t r = select(em < 0x0400, sub, normal);
  r = select(em >= 0x7c00, special, r);
  return std::bit_cast<float>(static_cast<std::uint32_t>(r) | sign);
}

/// fp32 -> fp16 bits, round to nearest even. Magnitudes from 65520 up
/// become infinity; a NaN stays a NaN of the same sign, quieted, keeping the
/// top 9 payload bits (what x86 F16C and CUDA do).
[[gnu::always_inline]] inline std::uint16_t
float_to_half_bits(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (u >> 16) & 0x8000U;
  const std::int32_t a = abs_bits(f);
  // Below 2^-14 the result is subnormal: adding 0.5 (whose ulp is 2^-24, the
  // fp16 subnormal step) lets the fp32 adder do the rounding.
  const std::int32_t sub =
      std::bit_cast<std::int32_t>(from_bits(a) + 0.5F) - 0x3f000000;
  // Normal: rebias (15 - 127), then round the 13 dropped bits to nearest
  // even; a carry out of the mantissa correctly bumps the exponent, up to
  // infinity.
  const std::int32_t normal =
      (a - (112 << 23) + 0x0fff + ((a >> 13) & 1)) >> 13;
  const std::int32_t nan = 0x7e00 | ((a >> 13) & 0x03ff);
  std::int32_t r = select(a < (113 << 23), sub, normal);
  r = select(a >= (143 << 23), 0x7c00, r); // |f| >= 2^16: infinity
  r = select(a > 0x7f800000, nan, r);
  return static_cast<std::uint16_t>(static_cast<std::uint32_t>(r) | sign);
}

// ---------------------------------------------------------------- bf16

/// bf16 bits -> fp32, exact (bf16 is the top half of an fp32).
[[gnu::always_inline]] inline float
bf16_bits_to_float(std::uint16_t h) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
}

/// fp32 -> bf16 bits, round to nearest even, overflow to infinity; a NaN
/// stays a NaN of the same sign, quieted, keeping the top 6 payload bits.
[[gnu::always_inline]] inline std::uint16_t
float_to_bf16_bits(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t rounded = (u + 0x7fffU + ((u >> 16) & 1U)) >> 16;
  const std::uint32_t nan = (u >> 16) | 0x0040U;
  const std::int32_t r =
      select(abs_bits(f) > 0x7f800000, static_cast<std::int32_t>(nan),
             static_cast<std::int32_t>(rounded));
  return static_cast<std::uint16_t>(r);
}

// ---------------------------------------------------------------- fp8 e4m3

/// OCP FP8 E4M3FN: sign, 4 exponent bits (bias 7), 3 mantissa bits; no
/// infinities; 0x7f and 0xff are NaN; largest finite magnitude 448.
inline constexpr float e4m3_max = 448.0F;

/// The NaN that decoding writes for every NaN result: positive, all payload
/// bits set. It narrows to 0x7fff in both fp16 and bf16, what CUDA's
/// conversions give for any NaN, and being the only NaN operand of a
/// multiply it comes out unchanged whatever order the compiler picks.
inline constexpr std::int32_t canonical_nan_bits = 0x7fffffff;

/// e4m3 bits -> fp32, exact. Both NaN codes give the canonical NaN.
[[gnu::always_inline]] inline float
e4m3_bits_to_float(std::uint8_t v) noexcept {
  const std::int32_t em = v & 0x7f;
  const auto sign =
      static_cast<std::int32_t>(static_cast<std::uint32_t>(v & 0x80) << 24);
  const std::int32_t normal = (em << 20) + (120 << 23); // rebias 127 - 7
  const std::int32_t sub =
      std::bit_cast<std::int32_t>(static_cast<float>(em) * 0x1p-9F);
  const std::int32_t r = select(em < 0x08, sub, normal) | sign;
  return from_bits(select(em == 0x7f, canonical_nan_bits, r));
}

/// f, or the canonical NaN if f is a NaN.
[[gnu::always_inline]] inline float canonical_nan(float f) noexcept {
  return from_bits(select(abs_bits(f) > 0x7f800000, canonical_nan_bits,
                          std::bit_cast<std::int32_t>(f)));
}

/// fp32 -> e4m3 bits, round to nearest even, for |f| < 464 (where no
/// rounding reaches the NaN code) and f not NaN: the quantizers' domain,
/// without the saturation and NaN selects.
[[gnu::always_inline]] inline std::uint8_t
float_to_e4m3_bits_in_range(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::int32_t sign = static_cast<std::int32_t>((u >> 24) & 0x80U);
  const std::int32_t a = abs_bits(f);
  // Below 2^-6 the result is subnormal: adding 2^14 (ulp 2^-9, the e4m3
  // subnormal step) lets the fp32 adder round.
  const std::int32_t sub =
      std::bit_cast<std::int32_t>(from_bits(a) + 0x1p14F) - 0x46800000;
  // Normal: rebias (7 - 127) and round the 20 dropped bits to nearest even;
  // a carry out of the mantissa bumps the exponent. Below 464 nothing rounds
  // up into the NaN code 0x7f.
  const std::int32_t normal =
      (a - (120 << 23) + 0x7ffff + ((a >> 20) & 1)) >> 20;
  return static_cast<std::uint8_t>(select(a < (121 << 23), sub, normal) | sign);
}

/// fp32 -> e4m3 bits, round to nearest even. Magnitudes above 448 (infinity
/// included) saturate to +-448; NaN becomes 0x7f whatever its sign.
[[gnu::always_inline]] inline std::uint8_t
float_to_e4m3_bits(float f) noexcept {
  const std::int32_t a = abs_bits(f);
  const std::int32_t sign = static_cast<std::int32_t>(
      (std::bit_cast<std::uint32_t>(f) >> 24) & 0x80U);
  std::int32_t r = float_to_e4m3_bits_in_range(f);
  r = select(a > 0x43e00000, 0x7e | sign, r); // above 448: saturate
  r = select(a > 0x7f800000, 0x7f, r);
  return static_cast<std::uint8_t>(r);
}

} // namespace kvfleet::engine::internal
