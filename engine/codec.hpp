#pragma once
/// KV value codecs, CPU reference implementation.
///
/// A value is a flat array of `n` fp16 or bf16 elements (n a multiple of
/// `codec_group_size`). Quantized codecs keep one fp32 scale per group of
/// `codec_group_size` consecutive elements, symmetric around zero:
///   encoded = [n / group fp32 scales, little-endian][payload]
///   fp8  payload: n bytes, e4m3 (bias 7, no infinities, max 448), x / scale
///   int8 payload: n bytes, two's complement in [-127, 127]
///   int4 payload: n / 2 bytes, two values per byte in [-7, 7], element 2i in
///                 the low nibble
/// scale = absmax / qmax (qmax 448, 127, 7); a group of zeros has scale 0 and
/// decodes to zeros. Quantization multiplies by inv = 1.0f / scale and rounds
/// half to even. All arithmetic is fp32 with no fused multiply-add, so the GPU
/// kernels (cuda/) can be bit-exact with this code.
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

/// Bytes of `elements` elements stored under `c` (scales included).
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
