#pragma once
/// KV value codecs, CPU reference implementation.
///
/// A value is a flat array of `n` fp16 or bf16 elements (n a multiple of
/// `codec_group_size`). Quantized codecs keep one fp32 scale per group of
/// `codec_group_size` consecutive elements, symmetric around zero:
///   encoded = [n / group fp32 scales, little-endian][payload]
///   fp8  payload: n bytes, e4m3 (bias 7, no infinities, max 448) of x * inv
///   int8 payload: n bytes, two's complement in [-127, 127]
///   int4 payload: n / 2 bytes, two values per byte in [-7, 7], element 2i in
///                 the low nibble
/// scale = absmax / qmax (qmax 448, 127, 7); a group of zeros has scale 0 and
/// decodes to zeros. Quantization multiplies by inv = 1.0f / scale and rounds
/// half to even. All arithmetic is fp32 with no fused multiply-add, so the GPU
/// kernels (cuda/) can be bit-exact with this code.
///
/// Exact rules (what a bit-exact implementation must do):
///   encode, per group:
///     x      = the element widened to fp32; infinities and NaNs become +0
///              (they are left out of absmax and stored as 0)
///     scale  = absmax / qmax, then 0 if below FLT_MIN, so that 1 / scale
///              stays finite and nothing runs on subnormals: the group is
///              stored as zeros (only reachable from bf16 groups with absmax
///              below qmax * FLT_MIN, between ~8e-38 and ~5e-36)
///     inv    = scale > 0 ? 1.0f / scale : 0
///     int8/int4: q = clamp(nearbyint(x * inv), -qmax, qmax) in the default
///              round-half-even mode (the clamp never fires: |x * inv| <=
///              qmax * (1 + 2^-21))
///     fp8:   e4m3 of x * inv, rounded to nearest even (never above 448
///              after rounding, so saturation never fires)
///   decode:  fp32 q * scale (q the integer or the e4m3 value), rounded to
///            nearest even into fp16/bf16. Scales are not validated; a NaN
///            result (only from an fp8 NaN code or a non-finite scale, neither
///            of which encode writes) is written as the canonical NaN 0x7fff.
///   none:    a byte copy in both directions, dtype only checked.
/// Sizes: encode needs a whole number of groups (2 * 64 bytes) and decode a
/// whole number of encoded groups; destinations may be larger than needed
/// (the rest is left untouched) and must not overlap the source.
/// encoded_size() rounds a partial group up to a whole one, is 0 for an
/// unknown codec and SIZE_MAX for a size past what a size_t holds.
/// Element arrays are in host byte order and the encoding
/// little-endian; the code requires a little-endian host (static_assert).
/// CPU paths: a portable one, and AVX2 + F16C chosen at run time when the
/// CPU has them (engine/internal/codec_isa.hpp); both give the same bytes.
/// Element conversions: half/bf16 -> fp32 keep NaN bits as they are; fp32 ->
/// half/bf16 keep a NaN's sign and top payload bits and set the quiet bit
/// (as F16C does); both e4m3 NaN codes widen to the canonical fp32 NaN
/// 0x7fffffff. relative_l2_error() is NaN for arrays of different or odd
/// sizes or an unknown dtype, or holding a NaN element, and +inf when only
/// `a` is all zeros or an element differs by an infinity; equal elements,
/// infinities included, add no error (before, an infinity in both made the
/// result NaN).
///
/// Thread safety: pure functions.

#include "engine/kv_namespace.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace kvfleet::engine {

/// Storage codecs, ordered from most to least precise.
enum class codec : std::uint8_t { none = 0, fp8 = 1, int8 = 2, int4 = 3 };

inline constexpr std::size_t codec_count = 4;
/// Elements per quantization group.
inline constexpr std::size_t codec_group_size = 64;

[[nodiscard]] std::string_view to_string(codec c) noexcept;
/// Accepts "none", "fp16", "bf16" (all meaning none), "fp8", "int8", "int4".
[[nodiscard]] result<codec> parse_codec(std::string_view name);
/// True for a value inside the enum's range.
[[nodiscard]] bool is_valid(codec c) noexcept;

/// Bytes of `elements` elements stored under `c` (scales included); SIZE_MAX
/// when that does not fit a size_t (no buffer is that large, so a check
/// against it fails instead of passing on a wrapped, small size).
[[nodiscard]] std::size_t encoded_size(codec c, std::size_t elements) noexcept;

/// Encodes `src` (elements of type `t`, 2 bytes each) into `dst`. REQUIRES
/// nothing: a size that is not a whole number of groups, a `dst` smaller than
/// encoded_size() or an unknown codec is an error. Returns bytes written.
[[nodiscard]] result<std::size_t> encode(codec c, dtype t,
                                         std::span<const std::byte> src,
                                         std::span<std::byte> dst);

/// Decodes `src` (encoded_size(c, n) bytes) into n elements of type `t` in
/// `dst` (2 * n bytes). Returns bytes written.
[[nodiscard]] result<std::size_t> decode(codec c, dtype t,
                                         std::span<const std::byte> src,
                                         std::span<std::byte> dst);

/// Relative L2 error ||a - b|| / ||a|| of two arrays of `t` elements, in
/// double precision (0 when both are zero).
[[nodiscard]] double relative_l2_error(dtype t, std::span<const std::byte> a,
                                       std::span<const std::byte> b);

/// fp32 <-> fp16/bf16 element conversions used by the codecs (round to
/// nearest even, NaN kept NaN, overflow to infinity).
[[nodiscard]] float half_to_float(std::uint16_t h) noexcept;
[[nodiscard]] std::uint16_t float_to_half(float f) noexcept;
[[nodiscard]] float bf16_to_float(std::uint16_t h) noexcept;
[[nodiscard]] std::uint16_t float_to_bf16(float f) noexcept;
/// fp8 e4m3 (OCP "E4M3FN"): saturates to +-448, NaN maps to 0x7f.
[[nodiscard]] float e4m3_to_float(std::uint8_t v) noexcept;
[[nodiscard]] std::uint8_t float_to_e4m3(float f) noexcept;

} // namespace kvfleet::engine
