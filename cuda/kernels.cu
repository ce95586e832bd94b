// The device kernels of kernels.hpp and their launchers. The per-element
// arithmetic comes from cuda/internal/codec_math.hpp and xxh3.hpp, shared
// with the host tests. Compiled with --fmad=false and IEEE division (see
// CMakeLists.txt) so that fp32 results match engine/codec.cpp bit for bit.
#include "cuda/internal/codec_math.hpp"
#include "cuda/internal/cuda_check.hpp"
#include "cuda/internal/offset_scan.hpp"
#include "cuda/internal/xxh3.hpp"
#include "cuda/kernels.hpp"
#include "engine/block_key.hpp"
#include "engine/checksum.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

namespace kvfleet::cuda {

namespace {

using engine::codec;
using engine::dtype;
using internal::lanes_per_group;

constexpr unsigned threads = 256;

struct ptr_pair {
  const std::byte* src;
  std::byte* dst;
};

// Batches travel in the launch's parameters (up to 32 KiB on sm_70+ with
// CUDA 12.1+), so a launch needs no upload and no synchronization.
struct codec_params {
  ptr_pair jobs[max_blocks_per_launch];
  std::uint32_t groups;
};

struct copy_entry {
  const std::byte* src;
  std::byte* dst;
  std::size_t bytes;
};

struct copy_params {
  copy_entry jobs[max_blocks_per_launch];
};

// Gather and scatter move blocks of one size between scattered pool offsets
// and a contiguous buffer, so a job is one offset: in 16-byte words (32
// bits) when every address is 16-byte aligned and the pool's words fit 32
// bits, else in bytes (64 bits). A launch carries 8184 or 4092 blocks
// (the parameters stay under the 32,764 bytes CUDA 12.1+ accepts on sm_70
// and later): fewer launches, fewer launch tails, and a 32 KiB block is a
// few microseconds of work. Measured on an H100 (32 KiB blocks, random
// order): 94% of a device-to-device cudaMemcpy with word offsets, 92% with
// byte offsets, 70% through copy_blocks' 1024 24-byte jobs per launch.
template <typename Offset> struct gather_params {
  static constexpr std::size_t capacity =
      (32760 - 3 * sizeof(std::uint64_t)) / sizeof(Offset);
  const std::byte* src;
  std::byte* dst;
  std::uint64_t block_bytes;
  Offset offsets[capacity];
};
static_assert(sizeof(gather_params<std::uint32_t>) < 32764);
static_assert(sizeof(gather_params<std::uint64_t>) < 32764);

struct checksum_params {
  checksum_job jobs[max_blocks_per_launch];
  std::uint64_t* out;
};

template <codec C> struct traits;
template <> struct traits<codec::fp8> {
  static constexpr float qmax = internal::qmax_fp8;
  static constexpr unsigned lane_bytes = 8; // payload bytes per thread
};
template <> struct traits<codec::int8> {
  static constexpr float qmax = internal::qmax_int8;
  static constexpr unsigned lane_bytes = 8;
};
template <> struct traits<codec::int4> {
  static constexpr float qmax = internal::qmax_int4;
  static constexpr unsigned lane_bytes = 4;
};

template <dtype T>
constexpr std::uint32_t inf_bits = T == dtype::fp16 ? 0x7c00U : 0x7f80U;

template <dtype T, kernel_path P>
__device__ __forceinline__ float widen(std::uint16_t h) {
  if constexpr (T == dtype::bf16) {
    return internal::bf16_to_f32(h);
  } else if constexpr (P == kernel_path::hardware) {
    return __half2float(__ushort_as_half(h));
  } else {
    return internal::half_to_f32(h);
  }
}

template <dtype T, kernel_path P>
__device__ __forceinline__ std::uint16_t narrow(float x) {
  if constexpr (P == kernel_path::hardware) {
    if constexpr (T == dtype::fp16)
      return __half_as_ushort(__float2half_rn(x));
    else
      return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  } else {
    if constexpr (T == dtype::fp16)
      return internal::f32_to_half(x);
    else
      return internal::f32_to_bf16(x);
  }
}

template <kernel_path P>
__device__ __forceinline__ std::uint32_t to_e4m3(float v) {
  if constexpr (P == kernel_path::hardware)
    return static_cast<std::uint32_t>(
        __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
  else
    return internal::f32_to_e4m3_in_range(v);
}

template <kernel_path P>
__device__ __forceinline__ float from_e4m3(std::uint32_t b) {
  if constexpr (P == kernel_path::hardware) {
    const __half_raw h =
        __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3);
    return __half2float(__half(h));
  } else {
    return internal::e4m3_to_f32(static_cast<std::uint8_t>(b));
  }
}

__device__ __forceinline__ void unpack8(const uint4 v, std::uint16_t (&h)[8]) {
  const std::uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    h[2 * i] = static_cast<std::uint16_t>(w[i] & 0xffffU);
    h[2 * i + 1] = static_cast<std::uint16_t>(w[i] >> 16);
  }
}

__device__ __forceinline__ uint4 pack8(const std::uint16_t (&h)[8]) {
  uint4 v;
  v.x = h[0] | (static_cast<std::uint32_t>(h[1]) << 16);
  v.y = h[2] | (static_cast<std::uint32_t>(h[3]) << 16);
  v.z = h[4] | (static_cast<std::uint32_t>(h[5]) << 16);
  v.w = h[6] | (static_cast<std::uint32_t>(h[7]) << 16);
  return v;
}

// The hardware encoder's helpers. On the H200 (4.2 TB/s) the encoder ran
// out of instruction issue before memory bandwidth: per 16-byte load it
// spent about 40 instructions finding the absmax element by element and
// about 50 clamping and packing. These work on two elements per 32-bit
// word and pack bytes with PRMT.

// Each 16-bit lane's magnitude (the sign bit cleared).
__device__ __forceinline__ std::uint32_t magnitudes(std::uint32_t w) {
  return w & 0x7fff7fffU;
}

// All ones in each 16-bit lane whose magnitude `m` is an inf or NaN
// (m >= inf): m <= 0x7fff and 0x8000 - inf <= 0x0400, so the sum sets bit
// 15 of a lane exactly then and never carries into the next lane.
__device__ __forceinline__ std::uint32_t nonfinite_lanes(std::uint32_t m,
                                                         std::uint32_t inf) {
  const std::uint32_t top = (m + (0x8000U - inf) * 0x00010001U) & 0x80008000U;
  return (top >> 15) * 0xffffU;
}

// The larger 16-bit lane of `m`.
__device__ __forceinline__ std::uint32_t lane_max(std::uint32_t m) {
  return max(m & 0xffffU, m >> 16);
}

// A word's two elements as fp32 (exact), the low lane first.
template <dtype T> __device__ __forceinline__ float2 widen2(std::uint32_t w) {
  if constexpr (T == dtype::fp16) {
    __half2 h;
    std::memcpy(&h, &w, sizeof h);
    return __half22float2(h);
  } else {
    return make_float2(__uint_as_float(w << 16),
                       __uint_as_float(w & 0xffff0000U));
  }
}

// Byte 0 of each of a, b, c, d, in that order from the low byte.
__device__ __forceinline__ std::uint32_t
bytes4(std::uint32_t a, std::uint32_t b, std::uint32_t c, std::uint32_t d) {
  return __byte_perm(__byte_perm(a, b, 0x0040U), __byte_perm(c, d, 0x0040U),
                     0x5410U);
}

// The hardware path's encoder body for one thread's 8 elements (`w`, 4
// words, already finite-or-zeroed) at scale inverse `inv`: the same bytes
// as the element-by-element code of encode_kernel. int8 and int4 skip its
// clamp to +-qmax: |x| <= amax and inv = RN(1 / RN(amax / qmax)), so
// |x * inv| <= qmax * (1 + 2^-22) < qmax + 0.5 and rounding never leaves
// the range (inv is 0 when the scale is).
template <codec C, dtype T>
__device__ __forceinline__ void encode_words(const std::uint32_t (&w)[4],
                                             float inv, std::byte* out,
                                             bool payload8) {
  float x[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = widen2<T>(w[i]);
    x[2 * i] = internal::mul_rn(f.x, inv);
    x[2 * i + 1] = internal::mul_rn(f.y, inv);
  }
  if constexpr (C == codec::int4) {
    std::uint32_t pair[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const auto lo = static_cast<std::uint32_t>(__float2int_rn(x[2 * i]));
      const auto hi = static_cast<std::uint32_t>(__float2int_rn(x[2 * i + 1]));
      pair[i] = (lo & 0x0fU) | (hi << 4); // byte 0: two nibbles
    }
    *reinterpret_cast<std::uint32_t*>(out) =
        bytes4(pair[0], pair[1], pair[2], pair[3]);
  } else {
    std::uint32_t v[2];
    if constexpr (C == codec::fp8) {
      std::uint32_t two[4]; // x.x in the low byte
#pragma unroll
      for (int i = 0; i < 4; ++i)
        two[i] = __nv_cvt_float2_to_fp8x2(make_float2(x[2 * i], x[2 * i + 1]),
                                          __NV_SATFINITE, __NV_E4M3);
      v[0] = two[0] | (two[1] << 16);
      v[1] = two[2] | (two[3] << 16);
    } else {
      std::uint32_t q[8];
#pragma unroll
      for (int i = 0; i < 8; ++i)
        q[i] = static_cast<std::uint32_t>(__float2int_rn(x[i]));
      v[0] = bytes4(q[0], q[1], q[2], q[3]);
      v[1] = bytes4(q[4], q[5], q[6], q[7]);
    }
    if (payload8) {
      *reinterpret_cast<uint2*>(out) = make_uint2(v[0], v[1]);
    } else {
      reinterpret_cast<std::uint32_t*>(out)[0] = v[0];
      reinterpret_cast<std::uint32_t*>(out)[1] = v[1];
    }
  }
}

// One thread per 8 elements, 8 threads per group of 64; a warp walks 4
// groups per step. The loop bound is warp-uniform so the absmax shuffles
// always see whole 8-lane groups.
template <codec C, dtype T, kernel_path P>
__global__ void __launch_bounds__(threads)
    encode_kernel(const __grid_constant__ codec_params p) {
  const ptr_pair job = p.jobs[blockIdx.y];
  const std::uint32_t groups = p.groups;
  const std::uint64_t total = std::uint64_t{groups} * lanes_per_group;
  const std::uint64_t stride = std::uint64_t{gridDim.x} * blockDim.x;
  const unsigned lane = threadIdx.x & 31U;
  const auto* src = reinterpret_cast<const uint4*>(job.src);
  auto* scales = reinterpret_cast<float*>(job.dst);
  std::byte* payload = job.dst + std::size_t{groups} * sizeof(float);
  const bool payload8 = (reinterpret_cast<std::uintptr_t>(payload) & 7U) == 0;
  for (std::uint64_t base =
           std::uint64_t{blockIdx.x} * blockDim.x + (threadIdx.x & ~31U);
       base < total; base += stride) {
    const std::uint64_t t = base + lane;
    const bool valid = t < total;
    const uint4 in = valid ? __ldg(src + t) : make_uint4(0, 0, 0, 0);
    std::uint32_t amax = 0;
    [[maybe_unused]] std::uint16_t h[8];
    [[maybe_unused]] std::uint32_t w[4] = {in.x, in.y, in.z, in.w};
    if constexpr (P == kernel_path::hardware) {
      // Lane-wise maximum of the magnitudes (sm_90 has it in hardware);
      // only a thread that met an inf or NaN zeroes them and looks again.
      std::uint32_t m[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        m[i] = magnitudes(w[i]);
      amax =
          lane_max(__vimax3_u16x2(__vimax3_u16x2(m[0], m[1], m[2]), m[3], 0U));
      if (amax >= inf_bits<T>) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const std::uint32_t bad = nonfinite_lanes(m[i], inf_bits<T>);
          w[i] &= ~bad;
          m[i] &= ~bad;
        }
        amax = lane_max(
            __vimax3_u16x2(__vimax3_u16x2(m[0], m[1], m[2]), m[3], 0U));
      }
    } else {
      unpack8(in, h);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        h[i] = internal::finite_or_zero(h[i], inf_bits<T>);
        amax = max(amax, internal::magnitude(h[i]));
      }
    }
    amax = max(amax, __shfl_xor_sync(0xffffffffU, amax, 1));
    amax = max(amax, __shfl_xor_sync(0xffffffffU, amax, 2));
    amax = max(amax, __shfl_xor_sync(0xffffffffU, amax, 4));
    if (!valid)
      continue;
    const auto amax_h = static_cast<std::uint16_t>(amax);
    const float amax_f = widen<T, P>(amax_h); // exact either way
    const float scale = internal::scale_of(amax_f, traits<C>::qmax);
    const float inv = internal::inv_of(scale);
    const std::uint64_t g = t >> 3;
    if ((t & 7U) == 0)
      scales[g] = scale;
    std::byte* out = payload + t * traits<C>::lane_bytes;
    if constexpr (P == kernel_path::hardware) {
      encode_words<C, T>(w, inv, out, payload8);
    } else if constexpr (C == codec::int4) {
      std::uint32_t w = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const std::int32_t q =
            internal::quantize_int(widen<T, P>(h[i]), inv, 7);
        w |= (static_cast<std::uint32_t>(q) & 0x0fU) << (4 * i);
      }
      *reinterpret_cast<std::uint32_t*>(out) = w;
    } else {
      std::uint32_t w[2] = {0, 0};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float x = widen<T, P>(h[i]);
        std::uint32_t b = 0;
        if constexpr (C == codec::fp8)
          b = to_e4m3<P>(internal::mul_rn(x, inv));
        else
          b = static_cast<std::uint32_t>(internal::quantize_int(x, inv, 127)) &
              0xffU;
        w[i / 4] |= b << (8 * (i % 4));
      }
      if (payload8) {
        *reinterpret_cast<uint2*>(out) = make_uint2(w[0], w[1]);
      } else {
        reinterpret_cast<std::uint32_t*>(out)[0] = w[0];
        reinterpret_cast<std::uint32_t*>(out)[1] = w[1];
      }
    }
  }
}

template <codec C, dtype T, kernel_path P>
__global__ void __launch_bounds__(threads)
    decode_kernel(const __grid_constant__ codec_params p) {
  const ptr_pair job = p.jobs[blockIdx.y];
  const std::uint32_t groups = p.groups;
  const std::uint64_t total = std::uint64_t{groups} * lanes_per_group;
  const std::uint64_t stride = std::uint64_t{gridDim.x} * blockDim.x;
  const auto* scales = reinterpret_cast<const float*>(job.src);
  const std::byte* payload = job.src + std::size_t{groups} * sizeof(float);
  const bool payload8 = (reinterpret_cast<std::uintptr_t>(payload) & 7U) == 0;
  auto* dst = reinterpret_cast<uint4*>(job.dst);
  for (std::uint64_t t = std::uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
       t < total; t += stride) {
    const float scale = __ldg(scales + (t >> 3));
    const std::byte* in = payload + t * traits<C>::lane_bytes;
    float x[8];
    if constexpr (C == codec::int4) {
      const std::uint32_t w = __ldg(reinterpret_cast<const std::uint32_t*>(in));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const std::uint32_t b = (w >> (8 * i)) & 0xffU;
        x[2 * i] =
            internal::mul_rn(static_cast<float>(internal::int4_lo(b)), scale);
        x[2 * i + 1] =
            internal::mul_rn(static_cast<float>(internal::int4_hi(b)), scale);
      }
    } else {
      std::uint32_t w[2];
      if (payload8) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(in));
        w[0] = v.x;
        w[1] = v.y;
      } else {
        w[0] = __ldg(reinterpret_cast<const std::uint32_t*>(in));
        w[1] = __ldg(reinterpret_cast<const std::uint32_t*>(in) + 1);
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const std::uint32_t b = (w[i / 4] >> (8 * (i % 4))) & 0xffU;
        float v = 0.0F;
        if constexpr (C == codec::fp8)
          v = from_e4m3<P>(b);
        else
          v = static_cast<float>(
              static_cast<std::int8_t>(static_cast<std::uint8_t>(b)));
        x[i] = internal::mul_rn(v, scale);
      }
    }
    std::uint16_t h[8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
      h[i] = narrow<T, P>(internal::canonical(x[i]));
    dst[t] = pack8(h);
  }
}

/// This CTA's share (grid-stride over blockIdx.x) of copying `bytes` from
/// src to dst: 16-byte words with Unroll loads in flight per thread when
/// `vec` (both pointers and the size 16-byte aligned), else bytes.
/// Streaming: the data is read once, so loads and stores bypass what the
/// caches keep (__ldcs/__stcs); else read-only loads (__ldg).
template <unsigned Unroll, bool Streaming>
__device__ __forceinline__ void copy_range(const std::byte* src, std::byte* dst,
                                           std::size_t bytes, bool vec) {
  if (vec) {
    const auto* s = reinterpret_cast<const uint4*>(src);
    auto* d = reinterpret_cast<uint4*>(dst);
    const std::size_t n = bytes / 16;
    const std::size_t step = std::size_t{gridDim.x} * blockDim.x * Unroll;
    for (std::size_t i =
             std::size_t{blockIdx.x} * blockDim.x * Unroll + threadIdx.x;
         i < n; i += step) {
      uint4 v[Unroll];
#pragma unroll
      for (unsigned k = 0; k < Unroll; ++k) {
        const std::size_t j = i + k * blockDim.x;
        if (j < n)
          v[k] = Streaming ? __ldcs(s + j) : __ldg(s + j);
      }
#pragma unroll
      for (unsigned k = 0; k < Unroll; ++k) {
        const std::size_t j = i + k * blockDim.x;
        if (j < n) {
          if constexpr (Streaming)
            __stcs(d + j, v[k]);
          else
            d[j] = v[k];
        }
      }
    }
  } else {
    const std::size_t step = std::size_t{gridDim.x} * blockDim.x;
    for (std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x;
         i < bytes; i += step)
      dst[i] = src[i];
  }
}

// Each thread moves 4 vectors of 16 bytes per step, all loads issued before
// the first store.
constexpr unsigned copy_unroll = 4;

__global__ void __launch_bounds__(threads)
    copy_kernel(const __grid_constant__ copy_params p) {
  const copy_entry job = p.jobs[blockIdx.y];
  const bool vec = ((reinterpret_cast<std::uintptr_t>(job.src) |
                     reinterpret_cast<std::uintptr_t>(job.dst) | job.bytes) &
                    15U) == 0;
  copy_range<copy_unroll, false>(job.src, job.dst, job.bytes, vec);
}

// 16-byte words each thread of a gather CTA moves per step (8: 32 KiB per
// CTA step, 128 bytes in flight per thread).
constexpr unsigned gather_unroll = 8;

// Block blockIdx.y of the batch: pool offset i to out + i * block_bytes
// (Scatter: the reverse). A 32-bit Offset counts 16-byte words and implies
// the vector path (every pointer, offset and the block size 16-byte
// aligned, checked on the host); a 64-bit one counts bytes, and Vec says
// whether the launch is aligned.
template <bool Scatter, typename Offset, bool Vec>
__global__ void __launch_bounds__(threads)
    gather_kernel(const __grid_constant__ gather_params<Offset> p) {
  const std::size_t bytes = p.block_bytes;
  const std::size_t pool_at = sizeof(Offset) == 4
                                  ? std::size_t{p.offsets[blockIdx.y]} * 16
                                  : std::size_t{p.offsets[blockIdx.y]};
  const std::size_t flat_at = std::size_t{blockIdx.y} * bytes;
  const std::byte* src = p.src + (Scatter ? flat_at : pool_at);
  std::byte* dst = p.dst + (Scatter ? pool_at : flat_at);
  copy_range<gather_unroll, true>(src, dst, bytes, Vec);
}

__constant__ std::uint8_t c_default_secret[internal::xxh3_secret_bytes] = {
    KVFLEET_XXH3_DEFAULT_SECRET};

// One CTA per block: its threads hash the 4 KiB chunks into shared memory,
// then one thread hashes the chunk hashes (engine/checksum.cpp's fold).
__global__ void __launch_bounds__(threads)
    checksum_kernel(const __grid_constant__ checksum_params p) {
  extern __shared__ std::uint64_t shared[];
  auto* ks = reinterpret_cast<std::uint8_t*>(shared);
  std::uint8_t* ds = ks + internal::xxh3_secret_bytes;
  auto* hashes = shared + 2 * internal::xxh3_secret_bytes / 8;
  for (unsigned i = threadIdx.x; i < internal::xxh3_secret_bytes;
       i += blockDim.x)
    ks[i] = c_default_secret[i];
  __syncthreads();
  if (threadIdx.x == 0)
    internal::xxh3_derive_secret(ds, ks, engine::hash_seed);
  __syncthreads();
  const checksum_job job = p.jobs[blockIdx.x];
  const auto* data = reinterpret_cast<const std::uint8_t*>(job.data);
  constexpr std::size_t chunk = engine::checksum_chunk_bytes;
  const std::size_t chunks = (job.bytes + chunk - 1) / chunk;
  for (std::size_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    const std::size_t left = job.bytes - c * chunk;
    const std::size_t n = left < chunk ? left : chunk;
    hashes[c] =
        internal::xxh3_64(data + c * chunk, n, engine::hash_seed, ks, ds);
  }
  __syncthreads();
  if (threadIdx.x == 0)
    p.out[blockIdx.x] =
        internal::xxh3_64(reinterpret_cast<const std::uint8_t*>(hashes),
                          chunks * 8, engine::hash_seed, ks, ds);
}

cudaStream_t raw(stream_ref s) {
  return static_cast<cudaStream_t>(s.handle);
}

result<void> launched(const char* kernel) {
  return internal::check(cudaGetLastError(),
                         std::string("launch of ") + kernel);
}

std::uint32_t grid_x(std::size_t work_items, std::size_t per_cta,
                     std::size_t jobs) {
  // Enough CTAs to cover a block, but not so many that a huge block makes a
  // launch of millions; each CTA loops (grid-stride) over the rest.
  const std::size_t want = (work_items + per_cta - 1) / per_cta;
  const std::size_t cap =
      std::max<std::size_t>(1, 8192 / std::max<std::size_t>(jobs, 1));
  return static_cast<std::uint32_t>(
      std::clamp<std::size_t>(want, 1, std::max<std::size_t>(cap, 1)));
}

using codec_kernel = void (*)(codec_params);

template <bool Encode, codec C, dtype T, kernel_path P> codec_kernel pick3() {
  if constexpr (Encode)
    return &encode_kernel<C, T, P>;
  else
    return &decode_kernel<C, T, P>;
}

template <bool Encode, codec C, dtype T> codec_kernel pick2(kernel_path p) {
  return p == kernel_path::hardware
             ? pick3<Encode, C, T, kernel_path::hardware>()
             : pick3<Encode, C, T, kernel_path::portable>();
}

template <bool Encode, codec C> codec_kernel pick1(dtype t, kernel_path p) {
  return t == dtype::fp16 ? pick2<Encode, C, dtype::fp16>(p)
                          : pick2<Encode, C, dtype::bf16>(p);
}

template <bool Encode> codec_kernel pick(codec c, dtype t, kernel_path p) {
  switch (c) {
  case codec::fp8:
    return pick1<Encode, codec::fp8>(t, p);
  case codec::int8:
    return pick1<Encode, codec::int8>(t, p);
  case codec::int4:
    return pick1<Encode, codec::int4>(t, p);
  case codec::none:
    break;
  }
  return nullptr;
}

template <bool Encode>
result<void> run_codec(codec c, dtype t, std::size_t elements,
                       std::span<const codec_job> jobs, stream_ref stream,
                       kernel_path path) {
  if (auto ok = validate::codec_batch(c, t, elements, jobs, Encode); !ok)
    return ok;
  if (path != kernel_path::hardware && path != kernel_path::portable)
    return make_error(errc::invalid_argument, "unknown kernel path");
  if (jobs.empty())
    return {};
  if (c == codec::none) {
    std::vector<copy_job> copies(jobs.size());
    for (std::size_t i = 0; i < jobs.size(); ++i)
      copies[i] = {jobs[i].src, jobs[i].dst, 2 * elements};
    return copy_blocks(copies, stream);
  }
  const std::size_t groups = elements / engine::codec_group_size;
  if (groups > 0xffffffffU)
    return make_error(errc::value_too_large, "codec batch: block too large");
  const codec_kernel k = pick<Encode>(c, t, path);
  codec_params params{};
  params.groups = static_cast<std::uint32_t>(groups);
  for (std::size_t first = 0; first < jobs.size();
       first += max_blocks_per_launch) {
    const std::size_t n = std::min(max_blocks_per_launch, jobs.size() - first);
    for (std::size_t i = 0; i < n; ++i)
      params.jobs[i] = {jobs[first + i].src, jobs[first + i].dst};
    const dim3 grid(grid_x(groups * lanes_per_group, threads, n),
                    static_cast<unsigned>(n));
    k<<<grid, threads, 0, raw(stream)>>>(params);
    if (auto r = launched(Encode ? "encode kernel" : "decode kernel"); !r)
      return r;
  }
  return {};
}

/// Launches one offset width's gather_kernel over a validated batch;
/// `word` converts a byte offset to the kernel's unit.
template <bool Scatter, typename Offset, bool Vec>
result<void>
launch_gather(const std::byte* src, std::span<const std::size_t> offsets,
              std::size_t block_bytes, std::byte* dst, stream_ref stream) {
  using params_t = gather_params<Offset>;
  constexpr std::size_t capacity = params_t::capacity;
  const std::size_t per_cta =
      Vec ? std::size_t{threads} * gather_unroll * 16 : std::size_t{threads};
  const std::size_t x = (block_bytes + per_cta - 1) / per_cta;
  // 32 KiB: on the heap, not on a caller's stack; not zeroed (every field
  // a launch reads is written first).
  const auto params = std::make_unique_for_overwrite<params_t>();
  params->block_bytes = block_bytes;
  for (std::size_t first = 0; first < offsets.size(); first += capacity) {
    const std::size_t n = std::min(capacity, offsets.size() - first);
    for (std::size_t i = 0; i < n; ++i)
      params->offsets[i] = static_cast<Offset>(
          sizeof(Offset) == 4 ? offsets[first + i] / 16 : offsets[first + i]);
    // The flat side of this launch starts at block `first`.
    params->src = Scatter ? src + first * block_bytes : src;
    params->dst = Scatter ? dst : dst + first * block_bytes;
    const dim3 grid(static_cast<unsigned>(std::clamp<std::size_t>(
                        x, 1, std::max<std::size_t>(1, 16384 / n))),
                    static_cast<unsigned>(n));
    gather_kernel<Scatter, Offset, Vec>
        <<<grid, threads, 0, raw(stream)>>>(*params);
    if (auto r = launched(Scatter ? "scatter kernel" : "gather kernel"); !r)
      return r;
  }
  return {};
}

/// Gather (Scatter false: src is the pool) or scatter (true: dst is the
/// pool) over a validated batch, with the narrowest offsets that fit.
template <bool Scatter>
result<void>
run_gather(const std::byte* src, std::span<const std::size_t> offsets,
           const internal::offset_scan& scan, std::size_t block_bytes,
           std::byte* dst, stream_ref stream) {
  if (offsets.empty())
    return {};
  const bool vec =
      ((reinterpret_cast<std::uintptr_t>(src) |
        reinterpret_cast<std::uintptr_t>(dst) | block_bytes | scan.any_bits) &
       15U) == 0;
  // Word offsets fit 32 bits when every offset is below 2^36 (64 GiB).
  if (vec && (scan.any_bits >> 36) == 0)
    return launch_gather<Scatter, std::uint32_t, true>(
        src, offsets, block_bytes, dst, stream);
  if (vec)
    return launch_gather<Scatter, std::uint64_t, true>(
        src, offsets, block_bytes, dst, stream);
  return launch_gather<Scatter, std::uint64_t, false>(src, offsets, block_bytes,
                                                      dst, stream);
}

} // namespace

result<void> encode_blocks(codec c, dtype t, std::size_t elements,
                           std::span<const codec_job> jobs, stream_ref stream,
                           kernel_path path) {
  return run_codec<true>(c, t, elements, jobs, stream, path);
}

result<void> decode_blocks(codec c, dtype t, std::size_t elements,
                           std::span<const codec_job> jobs, stream_ref stream,
                           kernel_path path) {
  return run_codec<false>(c, t, elements, jobs, stream, path);
}

result<void> copy_blocks(std::span<const copy_job> jobs, stream_ref stream) {
  if (auto ok = validate::copy_batch(jobs); !ok)
    return ok;
  copy_params params{};
  for (std::size_t first = 0; first < jobs.size();
       first += max_blocks_per_launch) {
    const std::size_t n = std::min(max_blocks_per_launch, jobs.size() - first);
    std::size_t largest = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const copy_job& j = jobs[first + i];
      params.jobs[i] = {j.src, j.dst, j.bytes};
      largest = std::max(largest, j.bytes);
    }
    if (largest == 0)
      continue;
    // Work items: 16-byte words on the fast path; the byte path loops.
    const dim3 grid(grid_x((largest + 15) / 16, threads * copy_unroll, n),
                    static_cast<unsigned>(n));
    copy_kernel<<<grid, threads, 0, raw(stream)>>>(params);
    if (auto r = launched("copy kernel"); !r)
      return r;
  }
  return {};
}

result<void> gather_blocks(device_span pool,
                           std::span<const std::size_t> offsets,
                           std::size_t block_bytes, device_span out,
                           stream_ref stream) {
  const internal::offset_scan scan = internal::scan_offsets(
      offsets, internal::last_offset(pool.bytes, block_bytes));
  if (auto ok = validate::gather_batch(pool, offsets, block_bytes, out, scan);
      !ok)
    return ok;
  return run_gather<false>(pool.data, offsets, scan, block_bytes, out.data,
                           stream);
}

result<void> scatter_blocks(device_span in,
                            std::span<const std::size_t> offsets,
                            std::size_t block_bytes, device_span pool,
                            stream_ref stream) {
  const internal::offset_scan scan = internal::scan_offsets(
      offsets, internal::last_offset(pool.bytes, block_bytes));
  if (auto ok = validate::gather_batch(pool, offsets, block_bytes, in, scan);
      !ok)
    return ok;
  return run_gather<true>(in.data, offsets, scan, block_bytes, pool.data,
                          stream);
}

result<void> checksum_blocks(std::span<const checksum_job> jobs,
                             std::uint64_t* out, stream_ref stream) {
  if (auto ok = validate::checksum_batch(jobs, out); !ok)
    return ok;
  checksum_params params{};
  for (std::size_t first = 0; first < jobs.size();
       first += max_blocks_per_launch) {
    const std::size_t n = std::min(max_blocks_per_launch, jobs.size() - first);
    std::size_t largest = 0;
    for (std::size_t i = 0; i < n; ++i) {
      params.jobs[i] = jobs[first + i];
      largest = std::max(largest, jobs[first + i].bytes);
    }
    params.out = out + first;
    const std::size_t chunks = (largest + engine::checksum_chunk_bytes - 1) /
                               engine::checksum_chunk_bytes;
    const std::size_t smem = 2 * internal::xxh3_secret_bytes + 8 * chunks;
    checksum_kernel<<<static_cast<unsigned>(n), threads, smem, raw(stream)>>>(
        params);
    if (auto r = launched("checksum kernel"); !r)
      return r;
  }
  return {};
}

} // namespace kvfleet::cuda
