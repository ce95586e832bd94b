#pragma once
/// Helpers for code compiled both by the host compiler and by nvcc for the
/// device: the kernels' arithmetic lives in headers built on these, so the
/// host tests run the very functions the kernels run (cuda/internal/*.test).
/// Includes no CUDA header; nvcc defines __CUDACC__ and provides the
/// intrinsics used under __CUDA_ARCH__.

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define KVFLEET_HD __host__ __device__ __forceinline__
#else
#define KVFLEET_HD inline
#endif

namespace kvfleet::cuda::internal {

KVFLEET_HD std::uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u = 0;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

KVFLEET_HD float bits_f32(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f = 0.0F;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

/// Bits of the fp32 NaN every NaN result is written as (the engine's
/// canonical NaN: positive, all payload bits set).
inline constexpr std::uint32_t canonical_nan_bits = 0x7fffffffU;

/// fp32 multiply rounded to nearest even, never fused with an add.
KVFLEET_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

/// IEEE fp32 division, rounded to nearest even.
KVFLEET_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

} // namespace kvfleet::cuda::internal
