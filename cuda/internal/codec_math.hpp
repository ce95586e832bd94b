#pragma once
/// The codec arithmetic of the GPU kernels, element by element, written once
/// for host and device (see hd.hpp). It follows engine/codec.hpp's exact
/// rules: non-finite inputs become +0 and are left out of absmax; scale =
/// absmax / qmax, 0 below FLT_MIN; inv = 1 / scale (IEEE division);
/// int8/int4 round x * inv half to even and clamp; fp8 is e4m3 of x * inv
/// rounded to nearest even; decode is q * scale rounded into fp16/bf16, NaN
/// results written as the canonical NaN. The host tests compare these
/// functions, compiled by the host compiler, with engine::encode/decode bit
/// for bit; the device tests compare the kernels with engine::encode/decode.
/// All functions are pure.

#include "cuda/internal/hd.hpp"

#include <cstdint>

namespace kvfleet::cuda::internal {

inline constexpr int group_elements = 64;
/// Elements one thread handles: a group is 8 lanes of 8 elements, so one
/// thread reads 16 bytes of fp16/bf16.
inline constexpr int lane_elements = 8;
inline constexpr int lanes_per_group = group_elements / lane_elements;

KVFLEET_HD std::uint32_t select_u32(bool c, std::uint32_t a, std::uint32_t b) {
  return c ? a : b;
}

/// Raw 16-bit element with infinities and NaNs replaced by +0.
/// `inf_bits` is 0x7c00 for fp16, 0x7f80 for bf16.
KVFLEET_HD std::uint16_t finite_or_zero(std::uint16_t h,
                                        std::uint32_t inf_bits) {
  return (h & 0x7fffU) < inf_bits ? h : std::uint16_t{0};
}

/// Magnitude bits of a finite-or-zeroed element (orders like the value).
KVFLEET_HD std::uint32_t magnitude(std::uint16_t h) {
  return h & 0x7fffU;
}

/// fp16 bits -> fp32, exact (bit level; NaN payloads kept).
KVFLEET_HD float half_to_f32(std::uint16_t h) {
  const std::uint32_t em = h & 0x7fffU;
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000U) << 16;
  std::uint32_t r = 0;
  if (em >= 0x7c00U)
    r = (em << 13) | 0x7f800000U;
  else if (em < 0x0400U)
    r = f32_bits(static_cast<float>(em) * 0x1p-24F); // exact
  else
    r = (em << 13) + (112U << 23);
  return bits_f32(r | sign);
}

/// bf16 bits -> fp32, exact.
KVFLEET_HD float bf16_to_f32(std::uint16_t h) {
  return bits_f32(static_cast<std::uint32_t>(h) << 16);
}

/// fp32 -> fp16 bits, round to nearest even, overflow to infinity; NaN
/// quieted keeping the sign and top 9 payload bits.
KVFLEET_HD std::uint16_t f32_to_half(float f) {
  const std::uint32_t u = f32_bits(f);
  const std::uint32_t sign = (u >> 16) & 0x8000U;
  const std::uint32_t a = u & 0x7fffffffU;
  std::uint32_t r = 0;
  if (a > 0x7f800000U)
    r = 0x7e00U | ((a >> 13) & 0x03ffU);
  else if (a >= (143U << 23))
    r = 0x7c00U;
  else if (a < (113U << 23))
    r = f32_bits(bits_f32(a) + 0.5F) - 0x3f000000U;
  else
    r = (a - (112U << 23) + 0x0fffU + ((a >> 13) & 1U)) >> 13;
  return static_cast<std::uint16_t>(r | sign);
}

/// fp32 -> bf16 bits, round to nearest even; NaN quieted, sign and top
/// payload bits kept.
KVFLEET_HD std::uint16_t f32_to_bf16(float f) {
  const std::uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffU) > 0x7f800000U)
    return static_cast<std::uint16_t>((u >> 16) | 0x0040U);
  return static_cast<std::uint16_t>((u + 0x7fffU + ((u >> 16) & 1U)) >> 16);
}

/// e4m3 bits -> fp32, exact; both NaN codes give the canonical NaN.
KVFLEET_HD float e4m3_to_f32(std::uint8_t v) {
  const std::uint32_t em = v & 0x7fU;
  if (em == 0x7fU)
    return bits_f32(canonical_nan_bits);
  const std::uint32_t sign = static_cast<std::uint32_t>(v & 0x80U) << 24;
  const std::uint32_t r = em < 0x08U
                              ? f32_bits(static_cast<float>(em) * 0x1p-9F)
                              : (em << 20) + (120U << 23);
  return bits_f32(r | sign);
}

/// fp32 -> e4m3 bits, round to nearest even, for |f| < 464 and f not NaN
/// (the quantizer's domain: |x * inv| <= 448 * (1 + 2^-21)).
KVFLEET_HD std::uint8_t f32_to_e4m3_in_range(float f) {
  const std::uint32_t u = f32_bits(f);
  const std::uint32_t sign = (u >> 24) & 0x80U;
  const std::uint32_t a = u & 0x7fffffffU;
  std::uint32_t r = 0;
  if (a < (121U << 23))
    r = f32_bits(bits_f32(a) + 0x1p14F) - 0x46800000U;
  else
    r = (a - (120U << 23) + 0x7ffffU + ((a >> 20) & 1U)) >> 20;
  return static_cast<std::uint8_t>(r | sign);
}

/// The codecs' qmax.
inline constexpr float qmax_fp8 = 448.0F;
inline constexpr float qmax_int8 = 127.0F;
inline constexpr float qmax_int4 = 7.0F;
/// FLT_MIN, written out so that no <cfloat> is needed on the device.
inline constexpr float flt_min = 0x1p-126F;

/// Group scale from absmax: absmax / qmax, 0 below FLT_MIN.
KVFLEET_HD float scale_of(float amax, float qmax) {
  const float s = div_rn(amax, qmax);
  return s >= flt_min ? s : 0.0F;
}

/// 1 / scale, or 0 for a zero scale.
KVFLEET_HD float inv_of(float scale) {
  return scale > 0.0F ? div_rn(1.0F, scale) : 0.0F;
}

/// Round half to even to an int, for |v| < 2^22.
KVFLEET_HD std::int32_t round_even(float v) {
#if defined(__CUDA_ARCH__)
  return __float2int_rn(v);
#else
  const float r = v + 0x1.8p23F; // no fraction bits left: the adder rounds
  return static_cast<std::int32_t>(f32_bits(r)) - 0x4b400000;
#endif
}

/// clamp(nearbyint(x * inv), -qmax, qmax).
KVFLEET_HD std::int32_t quantize_int(float x, float inv, std::int32_t qmax) {
  const std::int32_t q = round_even(mul_rn(x, inv));
  return q < -qmax ? -qmax : (q > qmax ? qmax : q);
}

/// f, or the canonical NaN when f is a NaN.
KVFLEET_HD float canonical(float f) {
  return (f32_bits(f) & 0x7fffffffU) > 0x7f800000U
             ? bits_f32(canonical_nan_bits)
             : f;
}

/// Sign-extended low and high nibbles of an int4 byte (element 2i low).
KVFLEET_HD std::int32_t int4_lo(std::uint32_t b) {
  return static_cast<std::int32_t>(static_cast<std::int8_t>(
             static_cast<std::uint8_t>((b << 4) & 0xffU))) >>
         4;
}
KVFLEET_HD std::int32_t int4_hi(std::uint32_t b) {
  return static_cast<std::int32_t>(
             static_cast<std::int8_t>(static_cast<std::uint8_t>(b & 0xffU))) >>
         4;
}

/// True when a decode scale is finite (|scale| <= FLT_MAX).
KVFLEET_HD bool finite_scale(float scale) {
  return (f32_bits(scale) & 0x7fffffffU) < 0x7f800000U;
}

} // namespace kvfleet::cuda::internal
