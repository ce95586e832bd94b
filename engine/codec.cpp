#include "engine/codec.hpp"

#include "engine/internal/codec_isa.hpp"
#include "engine/internal/half.hpp"

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KVFLEET_CODEC_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define KVFLEET_CODEC_X86 0
#endif

namespace kvfleet::engine {

// The encoded format is little-endian and element arrays are read in host
// order; every platform kvfleet builds for (x86-64, aarch64) is
// little-endian, so plain copies of scales are the format.
static_assert(std::endian::native == std::endian::little,
              "codec.cpp assumes a little-endian host");

namespace {

constexpr std::size_t group = codec_group_size;
constexpr std::size_t raw_group_bytes = 2 * group;
constexpr std::size_t scale_bytes = sizeof(float);

/// Payload bytes of one group under `c` (scale excluded).
constexpr std::size_t payload_bytes(codec c) noexcept {
  switch (c) {
  case codec::none:
    return raw_group_bytes;
  case codec::fp8:
  case codec::int8:
    return group;
  case codec::int4:
    return group / 2;
  }
  return 0;
}

/// Bytes of one encoded group, scale included.
constexpr std::size_t encoded_group_bytes(codec c) noexcept {
  return c == codec::none ? raw_group_bytes : scale_bytes + payload_bytes(c);
}

constexpr bool is_valid_dtype(dtype t) noexcept {
  return t == dtype::fp16 || t == dtype::bf16;
}

template <codec C> constexpr float qmax = 0.0F;
template <> constexpr float qmax<codec::fp8> = internal::e4m3_max;
template <> constexpr float qmax<codec::int8> = 127.0F;
template <> constexpr float qmax<codec::int4> = 7.0F;

// ------------------------------------------------------------ group kernels
//
// The kernels are fixed-size loops over one group of 64 elements, branchless,
// split into passes that each auto-vectorize: absmax on the raw 16-bit
// patterns, widening to fp32, quantization and packing. They are written once
// and instantiated per instruction-set path (`Isa`); a path only swaps the
// fp16 <-> fp32 conversions, which are exact either way, so every path gives
// the same bytes.

/// Reads element `i` of a raw array (host order, unaligned).
[[gnu::always_inline]] inline std::uint16_t load_u16(const std::byte* p,
                                                     std::size_t i) noexcept {
  std::uint16_t v = 0;
  std::memcpy(&v, p + 2 * i, sizeof v);
  return v;
}

[[gnu::always_inline]] inline void store_u16(std::byte* p, std::size_t i,
                                             std::uint16_t v) noexcept {
  std::memcpy(p + 2 * i, &v, sizeof v);
}

/// Bits of +infinity in `T`: the magnitude bits of every non-finite value
/// compare at or above it.
template <dtype T>
constexpr std::int16_t inf_bits = T == dtype::fp16 ? 0x7c00 : 0x7f80;

/// Raw element with infinities and NaNs replaced by +0.
template <dtype T>
[[gnu::always_inline]] inline std::uint16_t
finite_or_zero(std::uint16_t h) noexcept {
  const std::int32_t a = h & 0x7fff;
  return static_cast<std::uint16_t>(internal::select(a < inf_bits<T>, h, 0));
}

/// Largest finite magnitude of one group. For non-negative floats the bit
/// patterns order like the values, so this is a 16-bit integer max (signed,
/// because SSE2 has no unsigned one).
template <dtype T>
[[gnu::always_inline]] inline float
group_absmax(const std::byte* src) noexcept {
  std::int16_t amax = 0;
  for (std::size_t i = 0; i < group; ++i) {
    const auto a = static_cast<std::int16_t>(load_u16(src, i) & 0x7fff);
    amax = std::max(amax, a < inf_bits<T> ? a : std::int16_t{0});
  }
  const auto bits = static_cast<std::uint16_t>(amax);
  return T == dtype::fp16 ? internal::half_bits_to_float(bits)
                          : internal::bf16_bits_to_float(bits);
}

/// Portable path: bit-level conversions, vectorized by the compiler.
struct generic_isa {
  /// One group of fp16 as fp32, non-finite elements as +0.
  [[gnu::always_inline]] static void widen_half(const std::byte* src,
                                                float* x) noexcept {
    for (std::size_t i = 0; i < group; ++i)
      x[i] = internal::half_bits_to_float(
          finite_or_zero<dtype::fp16>(load_u16(src, i)));
  }
  /// One group of fp32 rounded to fp16.
  [[gnu::always_inline]] static void narrow_half(const float* x,
                                                 std::byte* dst) noexcept {
    for (std::size_t i = 0; i < group; ++i)
      store_u16(dst, i, internal::float_to_half_bits(x[i]));
  }
};

#if KVFLEET_CODEC_X86
/// AVX2 path: F16C converts fp16 <-> fp32 in one instruction per 8 lanes.
/// vcvtps2ph with immediate rounding 0 rounds to nearest even whatever MXCSR
/// says, and quiets NaNs keeping the top payload bits, exactly like
/// float_to_half_bits. (Not always_inline: GCC refuses to force AVX code
/// into the target-neutral templates around it; it inlines these anyway
/// once those are inlined into the AVX2 entry points.)
struct avx2_f16c_isa {
  [[gnu::target("avx2,f16c")]] static void widen_half(const std::byte* src,
                                                      float* x) noexcept {
    const __m128i magnitude = _mm_set1_epi16(0x7fff);
    const __m128i inf = _mm_set1_epi16(inf_bits<dtype::fp16>);
    for (std::size_t i = 0; i < group; i += 8) {
      __m128i v =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
      const __m128i finite = _mm_cmpgt_epi16(inf, _mm_and_si128(v, magnitude));
      v = _mm_and_si128(v, finite);
      _mm256_storeu_ps(x + i, _mm256_cvtph_ps(v));
    }
  }
  [[gnu::target("avx2,f16c")]] static void
  narrow_half(const float* x, std::byte* dst) noexcept {
    for (std::size_t i = 0; i < group; i += 8) {
      const __m128i v =
          _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), v);
    }
  }
};
#endif

/// One group of raw elements as fp32, non-finite elements as +0.
template <class Isa, dtype T>
[[gnu::always_inline]] inline void widen(const std::byte* src,
                                         float* x) noexcept {
  if constexpr (T == dtype::fp16) {
    Isa::widen_half(src, x);
  } else {
    for (std::size_t i = 0; i < group; ++i)
      x[i] = internal::bf16_bits_to_float(
          finite_or_zero<dtype::bf16>(load_u16(src, i)));
  }
}

/// One group of fp32 rounded to `T`.
template <class Isa, dtype T>
[[gnu::always_inline]] inline void narrow(const float* x,
                                          std::byte* dst) noexcept {
  if constexpr (T == dtype::fp16) {
    Isa::narrow_half(x, dst);
  } else {
    for (std::size_t i = 0; i < group; ++i)
      store_u16(dst, i, internal::float_to_bf16_bits(x[i]));
  }
}

/// nearbyint(v) in the default rounding mode, as an int, for |v| < 2^22:
/// adding 1.5 * 2^23 leaves no fraction bits, so the fp32 adder rounds half
/// to even and the integer sits in the low mantissa bits. Unlike nearbyint
/// this vectorizes without SSE4.1.
[[gnu::always_inline]] inline std::int32_t round_even(float v) noexcept {
  constexpr float magic = 0x1.8p23F;
  return std::bit_cast<std::int32_t>(v + magic) - 0x4b400000;
}

/// Integer quantization: clamp(nearbyint(x * inv), -qmax, qmax). Given how
/// inv is computed, |x * inv| <= qmax * (1 + 2^-21), so the clamp never
/// fires; it is kept so that nothing can wrap.
template <codec C>
[[gnu::always_inline]] inline std::int32_t quantize(float x,
                                                    float inv) noexcept {
  constexpr auto m = static_cast<std::int32_t>(qmax<C>);
  return std::min(std::max(round_even(x * inv), -m), m);
}

/// Quantizes one group of fp32 and writes its payload. |x * inv| stays
/// within qmax * (1 + 2^-21) (see quantize), inside the domain of
/// float_to_e4m3_bits_in_range, so fp8 needs no saturation select.
template <codec C>
[[gnu::always_inline]] inline void encode_payload(const float* x, float inv,
                                                  std::byte* out) noexcept {
  if constexpr (C == codec::fp8) {
    for (std::size_t i = 0; i < group; ++i)
      out[i] = std::byte{internal::float_to_e4m3_bits_in_range(x[i] * inv)};
  } else if constexpr (C == codec::int8) {
    for (std::size_t i = 0; i < group; ++i)
      out[i] = static_cast<std::byte>(quantize<C>(x[i], inv));
  } else {
    static_assert(C == codec::int4);
    for (std::size_t i = 0; i < group / 2; ++i) {
      const auto lo = static_cast<std::uint32_t>(quantize<C>(x[2 * i], inv));
      const auto hi =
          static_cast<std::uint32_t>(quantize<C>(x[2 * i + 1], inv));
      out[i] = static_cast<std::byte>((lo & 0x0fU) | (hi << 4));
    }
  }
}

/// Dequantizes one group's payload to fp32.
template <codec C>
[[gnu::always_inline]] inline void
decode_payload(const std::byte* in, float scale, float* x) noexcept {
  if constexpr (C == codec::fp8) {
    for (std::size_t i = 0; i < group; ++i)
      x[i] =
          internal::e4m3_bits_to_float(std::to_integer<std::uint8_t>(in[i])) *
          scale;
  } else if constexpr (C == codec::int8) {
    for (std::size_t i = 0; i < group; ++i)
      x[i] = static_cast<float>(static_cast<std::int8_t>(in[i])) * scale;
  } else {
    static_assert(C == codec::int4);
    for (std::size_t i = 0; i < group / 2; ++i) {
      // Sign-extend each nibble through an int8 arithmetic shift.
      const auto b = std::to_integer<std::uint8_t>(in[i]);
      const int lo = static_cast<std::int8_t>(b << 4) >> 4;
      const int hi = static_cast<std::int8_t>(b) >> 4;
      x[2 * i] = static_cast<float>(lo) * scale;
      x[2 * i + 1] = static_cast<float>(hi) * scale;
    }
  }
}

/// The group scale: absmax / qmax, or 0 when that is below FLT_MIN (a zero
/// group, or a bf16 one under qmax * FLT_MIN), so that 1 / scale stays
/// finite; such a group is stored as zeros.
template <codec C>
[[gnu::always_inline]] inline float scale_of(float amax) noexcept {
  const float scale = amax / qmax<C>;
  return scale >= FLT_MIN ? scale : 0.0F;
}

/// Groups per batch: the scales of a batch are computed first, so that
/// their divisions overlap instead of sitting on each group's critical
/// path. 16 groups of input (2 KiB) stay in L1 for the second pass.
constexpr std::size_t batch = 16;

template <class Isa, codec C, dtype T>
[[gnu::always_inline]] inline void encode_groups(const std::byte* src,
                                                 std::byte* dst,
                                                 std::size_t groups) noexcept {
  std::byte* payload = dst + groups * scale_bytes;
  for (std::size_t g0 = 0; g0 < groups; g0 += batch) {
    const std::size_t n = std::min(batch, groups - g0);
    const std::byte* in = src + g0 * raw_group_bytes;
    float scale[batch];
    float inv[batch];
    for (std::size_t b = 0; b < n; ++b) {
      scale[b] = scale_of<C>(group_absmax<T>(in + b * raw_group_bytes));
      inv[b] = scale[b] > 0.0F ? 1.0F / scale[b] : 0.0F;
    }
    std::memcpy(dst + g0 * scale_bytes, scale, n * scale_bytes);
    for (std::size_t b = 0; b < n; ++b) {
      alignas(32) float x[group];
      widen<Isa, T>(in + b * raw_group_bytes, x);
      encode_payload<C>(x, inv[b], payload + (g0 + b) * payload_bytes(C));
    }
  }
}

template <class Isa, codec C, dtype T>
[[gnu::always_inline]] inline void decode_groups(const std::byte* src,
                                                 std::byte* dst,
                                                 std::size_t groups) noexcept {
  const std::byte* payload = src + groups * scale_bytes;
  for (std::size_t g = 0; g < groups; ++g) {
    float scale = 0.0F;
    std::memcpy(&scale, src + g * scale_bytes, scale_bytes);
    alignas(32) float x[group];
    decode_payload<C>(payload + g * payload_bytes(C), scale, x);
    // With a finite scale a NaN result can only come from an fp8 NaN code,
    // already canonical. A non-finite scale (never written by encode) can
    // make NaNs whose payload would depend on operand order: canonicalize.
    if (!(std::fabs(scale) <= FLT_MAX)) [[unlikely]] {
      for (std::size_t i = 0; i < group; ++i)
        x[i] = internal::canonical_nan(x[i]);
    }
    narrow<Isa, T>(x, dst + g * raw_group_bytes);
  }
}

// ------------------------------------------------------------ dispatch

using kernel_fn = void (*)(const std::byte*, std::byte*, std::size_t);

struct generic_kernels {
  template <bool Encode, codec C, dtype T>
  static void run(const std::byte* src, std::byte* dst,
                  std::size_t groups) noexcept {
    if constexpr (Encode)
      encode_groups<generic_isa, C, T>(src, dst, groups);
    else
      decode_groups<generic_isa, C, T>(src, dst, groups);
  }
};

#if KVFLEET_CODEC_X86
struct avx2_f16c_kernels {
  template <bool Encode, codec C, dtype T>
  [[gnu::target("avx2,f16c")]] static void
  run(const std::byte* src, std::byte* dst, std::size_t groups) noexcept {
    if constexpr (Encode)
      encode_groups<avx2_f16c_isa, C, T>(src, dst, groups);
    else
      decode_groups<avx2_f16c_isa, C, T>(src, dst, groups);
  }
};
#endif

template <class K, bool Encode> kernel_fn pick(codec c, dtype t) noexcept {
  const bool f16 = t == dtype::fp16;
  switch (c) {
  case codec::fp8:
    return f16 ? &K::template run<Encode, codec::fp8, dtype::fp16>
               : &K::template run<Encode, codec::fp8, dtype::bf16>;
  case codec::int8:
    return f16 ? &K::template run<Encode, codec::int8, dtype::fp16>
               : &K::template run<Encode, codec::int8, dtype::bf16>;
  case codec::int4:
    return f16 ? &K::template run<Encode, codec::int4, dtype::fp16>
               : &K::template run<Encode, codec::int4, dtype::bf16>;
  case codec::none:
    break;
  }
  return nullptr;
}

template <bool Encode>
kernel_fn kernel_for(internal::codec_isa isa, codec c, dtype t) noexcept {
  switch (isa) {
  case internal::codec_isa::generic:
    return pick<generic_kernels, Encode>(c, t);
  case internal::codec_isa::avx2_f16c:
#if KVFLEET_CODEC_X86
    return pick<avx2_f16c_kernels, Encode>(c, t);
#else
    break;
#endif
  }
  return nullptr;
}

bool cpu_has_avx2_f16c() noexcept {
#if KVFLEET_CODEC_X86
  // CPUID rather than __builtin_cpu_supports, which clang 14 lacks for f16c.
  static const bool has = [] {
    unsigned a = 0;
    unsigned b = 0;
    unsigned c = 0;
    unsigned d = 0;
    if (__get_cpuid(1, &a, &b, &c, &d) == 0)
      return false;
    const unsigned need1 = bit_OSXSAVE | bit_AVX | bit_F16C;
    if ((c & need1) != need1)
      return false;
    // The OS must save the YMM registers: XCR0 bits 1 (SSE) and 2 (AVX).
    unsigned xcr0_lo = 0;
    unsigned xcr0_hi = 0;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 0x6U) != 0x6U)
      return false;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0)
      return false;
    return (b & bit_AVX2) != 0;
  }();
  return has;
#else
  return false;
#endif
}

// ------------------------------------------------------------ validation

bool is_valid_isa(internal::codec_isa isa) noexcept {
  return static_cast<std::size_t>(isa) < internal::codec_isa_count;
}

/// Checks what encode and decode share: the codec, the dtype and the path.
result<void> check_call(internal::codec_isa isa, codec c, dtype t) {
  if (!is_valid(c))
    return make_error(
        errc::unknown_codec,
        "unknown codec value " + std::to_string(static_cast<unsigned>(c)) +
            " (expected 0 to " + std::to_string(codec_count - 1) + ")");
  if (!is_valid_dtype(t))
    return make_error(errc::invalid_argument,
                      "unknown dtype value " +
                          std::to_string(static_cast<unsigned>(t)) +
                          " (expected 0 for fp16 or 1 for bf16)");
  if (!is_valid_isa(isa) || !internal::is_supported(isa))
    return make_error(errc::invalid_argument,
                      "codec path " + std::string(internal::to_string(isa)) +
                          " (value " +
                          std::to_string(static_cast<unsigned>(isa)) +
                          ") is not supported by this build and CPU");
  return {};
}

} // namespace

std::string_view to_string(codec c) noexcept {
  switch (c) {
  case codec::none:
    return "none";
  case codec::fp8:
    return "fp8";
  case codec::int8:
    return "int8";
  case codec::int4:
    return "int4";
  }
  return "unknown";
}

result<codec> parse_codec(std::string_view name) {
  if (name == "none" || name == "fp16" || name == "bf16")
    return codec::none;
  if (name == "fp8")
    return codec::fp8;
  if (name == "int8")
    return codec::int8;
  if (name == "int4")
    return codec::int4;
  return make_error(errc::unknown_codec,
                    "unknown codec '" + std::string(name) +
                        "' (expected none, fp16, bf16, fp8, int8 or int4)");
}

bool is_valid(codec c) noexcept {
  return static_cast<std::size_t>(c) < codec_count;
}

std::size_t encoded_size(codec c, std::size_t elements) noexcept {
  if (!is_valid(c))
    return 0;
  // Not (elements + group - 1) / group, which wraps for the last group - 1
  // values; a size past size_t saturates instead of wrapping to a small one.
  const std::size_t groups = elements / group + (elements % group != 0);
  const std::size_t per_group = encoded_group_bytes(c);
  if (groups > std::numeric_limits<std::size_t>::max() / per_group)
    return std::numeric_limits<std::size_t>::max();
  return groups * per_group;
}

result<std::size_t> encode(codec c, dtype t, std::span<const std::byte> src,
                           std::span<std::byte> dst) {
  return internal::encode_with(internal::best_codec_isa(), c, t, src, dst);
}

result<std::size_t> decode(codec c, dtype t, std::span<const std::byte> src,
                           std::span<std::byte> dst) {
  return internal::decode_with(internal::best_codec_isa(), c, t, src, dst);
}

double relative_l2_error(dtype t, std::span<const std::byte> a,
                         std::span<const std::byte> b) {
  if (!is_valid_dtype(t) || a.size() != b.size() || a.size() % 2 != 0)
    return std::numeric_limits<double>::quiet_NaN();
  double diff = 0.0;
  double norm = 0.0;
  for (std::size_t i = 0; i < a.size(); i += 2) {
    std::uint16_t ha = 0;
    std::uint16_t hb = 0;
    std::memcpy(&ha, a.data() + i, 2);
    std::memcpy(&hb, b.data() + i, 2);
    const auto xa = static_cast<double>(t == dtype::fp16
                                            ? internal::half_bits_to_float(ha)
                                            : internal::bf16_bits_to_float(ha));
    const auto xb = static_cast<double>(t == dtype::fp16
                                            ? internal::half_bits_to_float(hb)
                                            : internal::bf16_bits_to_float(hb));
    norm += xa * xa;
    // Equal elements add no error, infinities too (Inf - Inf is NaN).
    if (xa != xb)
      diff += (xa - xb) * (xa - xb);
  }
  if (std::isnan(diff) || std::isnan(norm))
    return std::numeric_limits<double>::quiet_NaN(); // a NaN element
  if (std::isinf(diff))
    return std::numeric_limits<double>::infinity();
  if (norm == 0.0)
    return diff == 0.0 ? 0.0 : std::numeric_limits<double>::infinity();
  return std::sqrt(diff / norm); // 0 when `a` holds an infinity
}

float half_to_float(std::uint16_t h) noexcept {
  return internal::half_bits_to_float(h);
}
std::uint16_t float_to_half(float f) noexcept {
  return internal::float_to_half_bits(f);
}
float bf16_to_float(std::uint16_t h) noexcept {
  return internal::bf16_bits_to_float(h);
}
std::uint16_t float_to_bf16(float f) noexcept {
  return internal::float_to_bf16_bits(f);
}
float e4m3_to_float(std::uint8_t v) noexcept {
  return internal::e4m3_bits_to_float(v);
}
std::uint8_t float_to_e4m3(float f) noexcept {
  return internal::float_to_e4m3_bits(f);
}

namespace internal {

std::string_view to_string(codec_isa isa) noexcept {
  switch (isa) {
  case codec_isa::generic:
    return "generic";
  case codec_isa::avx2_f16c:
    return "avx2_f16c";
  }
  return "unknown";
}

bool is_supported(codec_isa isa) noexcept {
  switch (isa) {
  case codec_isa::generic:
    return true;
  case codec_isa::avx2_f16c:
    return cpu_has_avx2_f16c();
  }
  return false;
}

codec_isa best_codec_isa() noexcept {
  return cpu_has_avx2_f16c() ? codec_isa::avx2_f16c : codec_isa::generic;
}

result<std::size_t> encode_with(codec_isa isa, codec c, dtype t,
                                std::span<const std::byte> src,
                                std::span<std::byte> dst) {
  if (auto ok = check_call(isa, c, t); !ok)
    return unexpected(ok.error());
  if (src.size() % raw_group_bytes != 0)
    return make_error(errc::wrong_value_size,
                      "encode: source of " + std::to_string(src.size()) +
                          " bytes is not a whole number of groups (expected a "
                          "multiple of " +
                          std::to_string(raw_group_bytes) + " bytes: " +
                          std::to_string(group) + " 2-byte elements)");
  const std::size_t groups = src.size() / raw_group_bytes;
  const std::size_t need = groups * encoded_group_bytes(c);
  if (dst.size() < need)
    return make_error(errc::wrong_value_size,
                      "encode: destination of " + std::to_string(dst.size()) +
                          " bytes is too small (expected at least " +
                          std::to_string(need) + " bytes for " +
                          std::to_string(groups * group) + " elements under " +
                          std::string(engine::to_string(c)) + ")");
  if (groups == 0)
    return std::size_t{0};
  if (c == codec::none)
    std::memcpy(dst.data(), src.data(), need);
  else
    kernel_for<true>(isa, c, t)(src.data(), dst.data(), groups);
  return need;
}

result<std::size_t> decode_with(codec_isa isa, codec c, dtype t,
                                std::span<const std::byte> src,
                                std::span<std::byte> dst) {
  if (auto ok = check_call(isa, c, t); !ok)
    return unexpected(ok.error());
  const std::size_t per_group = encoded_group_bytes(c);
  if (src.size() % per_group != 0)
    return make_error(errc::wrong_value_size,
                      "decode: source of " + std::to_string(src.size()) +
                          " bytes is not a whole number of " +
                          std::string(engine::to_string(c)) +
                          " groups (expected a multiple of " +
                          std::to_string(per_group) + " bytes)");
  const std::size_t groups = src.size() / per_group;
  const std::size_t need = groups * raw_group_bytes;
  if (dst.size() < need)
    return make_error(errc::wrong_value_size,
                      "decode: destination of " + std::to_string(dst.size()) +
                          " bytes is too small (expected at least " +
                          std::to_string(need) + " bytes for " +
                          std::to_string(groups * group) + " elements)");
  if (groups == 0)
    return std::size_t{0};
  if (c == codec::none)
    std::memcpy(dst.data(), src.data(), need);
  else
    kernel_for<false>(isa, c, t)(src.data(), dst.data(), groups);
  return need;
}

} // namespace internal

} // namespace kvfleet::engine
