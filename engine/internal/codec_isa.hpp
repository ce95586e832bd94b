#pragma once
/// The instruction-set paths of the CPU codecs.
///
/// encode() and decode() run on the fastest path this CPU supports. Every
/// path gives the same bytes (exact IEEE conversions, the same fp32
/// operations in the same order); this header exists so that tests can check
/// exactly that and benchmarks can compare the paths.
///
/// Thread safety: pure functions.

#include "engine/codec.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace kvfleet::engine::internal {

enum class codec_isa : std::uint8_t {
  /// Portable C++, auto-vectorized for the build's target (SSE2 by default).
  generic = 0,
  /// x86-64 AVX2 with F16C for fp16 <-> fp32, chosen at run time.
  avx2_f16c = 1,
};

inline constexpr std::size_t codec_isa_count = 2;

[[nodiscard]] std::string_view to_string(codec_isa isa) noexcept;

/// True when this build has the path and this CPU can run it.
[[nodiscard]] bool is_supported(codec_isa isa) noexcept;

/// The path encode() and decode() use: the fastest supported one.
[[nodiscard]] codec_isa best_codec_isa() noexcept;

/// encode() on a chosen path; an unsupported path is errc::invalid_argument.
[[nodiscard]] result<std::size_t> encode_with(codec_isa isa, codec c, dtype t,
                                              std::span<const std::byte> src,
                                              std::span<std::byte> dst);

/// decode() on a chosen path; an unsupported path is errc::invalid_argument.
[[nodiscard]] result<std::size_t> decode_with(codec_isa isa, codec c, dtype t,
                                              std::span<const std::byte> src,
                                              std::span<std::byte> dst);

} // namespace kvfleet::engine::internal
