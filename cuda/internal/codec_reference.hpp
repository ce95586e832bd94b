#pragma once
// Whole-block encode/decode written with codec_math.hpp's element functions
// in the kernels' order (absmax over a group, scale, inv, quantize, pack):
// what one kernel thread group computes, run on the host. The host tests
// compare it with engine::encode/decode; the GPU tests compare the kernels
// with engine::encode/decode directly.

#include "cuda/internal/codec_math.hpp"
#include "engine/codec.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace kvfleet::cuda::internal {

inline void reference_encode(engine::codec c, engine::dtype t,
                             std::span<const std::uint16_t> in,
                             std::span<std::byte> out) {
  const std::size_t groups = in.size() / group_elements;
  const std::uint32_t inf = t == engine::dtype::fp16 ? 0x7c00U : 0x7f80U;
  const float qmax = c == engine::codec::fp8    ? qmax_fp8
                     : c == engine::codec::int8 ? qmax_int8
                                                : qmax_int4;
  const std::size_t payload = c == engine::codec::int4 ? 32 : 64;
  for (std::size_t g = 0; g < groups; ++g) {
    std::uint16_t h[group_elements];
    std::uint32_t amax = 0;
    for (int i = 0; i < group_elements; ++i) {
      h[i] = finite_or_zero(
          in[g * group_elements + static_cast<std::size_t>(i)], inf);
      amax = amax > magnitude(h[i]) ? amax : magnitude(h[i]);
    }
    const auto a16 = static_cast<std::uint16_t>(amax);
    const float amax_f =
        t == engine::dtype::fp16 ? half_to_f32(a16) : bf16_to_f32(a16);
    const float scale = scale_of(amax_f, qmax);
    const float inv = inv_of(scale);
    std::memcpy(out.data() + 4 * g, &scale, 4);
    std::byte* p = out.data() + 4 * groups + payload * g;
    for (int i = 0; i < group_elements; ++i) {
      const float x =
          t == engine::dtype::fp16 ? half_to_f32(h[i]) : bf16_to_f32(h[i]);
      std::uint32_t b = 0;
      if (c == engine::codec::fp8)
        b = f32_to_e4m3_in_range(mul_rn(x, inv));
      else
        b = static_cast<std::uint32_t>(
            quantize_int(x, inv, static_cast<std::int32_t>(qmax)));
      if (c == engine::codec::int4) {
        const auto idx = static_cast<std::size_t>(i / 2);
        const std::uint32_t prev = std::to_integer<std::uint32_t>(p[idx]);
        p[idx] = static_cast<std::byte>(
            i % 2 == 0 ? (b & 0x0fU) : (prev | ((b & 0x0fU) << 4)));
      } else {
        p[i] = static_cast<std::byte>(b & 0xffU);
      }
    }
  }
}

inline void reference_decode(engine::codec c, engine::dtype t,
                             std::span<const std::byte> in,
                             std::span<std::uint16_t> out) {
  const std::size_t groups = out.size() / group_elements;
  const std::size_t payload = c == engine::codec::int4 ? 32 : 64;
  for (std::size_t g = 0; g < groups; ++g) {
    float scale = 0.0F;
    std::memcpy(&scale, in.data() + 4 * g, 4);
    const std::byte* p = in.data() + 4 * groups + payload * g;
    for (int i = 0; i < group_elements; ++i) {
      float v = 0.0F;
      if (c == engine::codec::int4) {
        const std::uint32_t b = std::to_integer<std::uint32_t>(p[i / 2]);
        v = static_cast<float>(i % 2 == 0 ? int4_lo(b) : int4_hi(b));
      } else if (c == engine::codec::int8) {
        v = static_cast<float>(
            static_cast<std::int8_t>(std::to_integer<std::uint8_t>(p[i])));
      } else {
        v = e4m3_to_f32(std::to_integer<std::uint8_t>(p[i]));
      }
      const float x = canonical(mul_rn(v, scale));
      out[g * group_elements + static_cast<std::size_t>(i)] =
          t == engine::dtype::fp16 ? f32_to_half(x) : f32_to_bf16(x);
    }
  }
}

} // namespace kvfleet::cuda::internal
