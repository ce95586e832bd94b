#include "engine/kv_namespace.hpp"

#include "engine/block_key.hpp"
#include "engine/codec.hpp"
#include "engine/internal/le.hpp"

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include <array>
#include <cstdio>

namespace kvfleet::engine {
namespace {

// `value` (a whole number, possibly past 64 bits) without a fraction.
std::string whole_number_text(double value) {
  char buf[400];
  std::snprintf(buf, sizeof buf, "%.0f", value);
  return buf;
}

} // namespace

std::string_view to_string(dtype t) noexcept {
  switch (t) {
  case dtype::fp16:
    return "fp16";
  case dtype::bf16:
    return "bf16";
  }
  return "unknown";
}

result<dtype> parse_dtype(std::string_view name) {
  if (name == "fp16")
    return dtype::fp16;
  if (name == "bf16")
    return dtype::bf16;
  return make_error(errc::invalid_argument, "unknown dtype '" +
                                                std::string(name) +
                                                "' (expected fp16 or bf16)");
}

std::size_t namespace_spec::elements_per_block() const noexcept {
  return std::size_t{layers} * 2U * block_tokens * kv_heads * head_dim;
}

std::size_t namespace_spec::value_bytes() const noexcept {
  return elements_per_block() * 2U;
}

result<void> namespace_spec::validate() const {
  if (model.empty())
    return make_error(errc::invalid_argument, "namespace has no model id");
  if (layers == 0 || kv_heads == 0 || head_dim == 0 || block_tokens == 0)
    return make_error(errc::invalid_argument,
                      "namespace '" + model +
                          "': layers, kv_heads, head_dim and block_tokens "
                          "must all be positive");
  if (type != dtype::fp16 && type != dtype::bf16)
    return make_error(errc::invalid_argument,
                      "namespace '" + model + "': unknown dtype");
  constexpr std::size_t max_bytes = std::size_t{1} << 30;
  // Multiply in double so absurd dimensions cannot wrap around.
  const double bytes = static_cast<double>(layers) * 2.0 * block_tokens *
                       kv_heads * head_dim * 2.0;
  if (bytes > static_cast<double>(max_bytes))
    return make_error(errc::value_too_large,
                      "namespace '" + model + "': a block would hold " +
                          whole_number_text(bytes) +
                          " bytes, more than the 1 GiB limit");
  if (elements_per_block() % codec_group_size != 0)
    return make_error(errc::invalid_argument,
                      "namespace '" + model + "': elements per block (" +
                          std::to_string(elements_per_block()) +
                          ") must be a multiple of the codec group size " +
                          std::to_string(codec_group_size));
  return {};
}

ns_fingerprint namespace_spec::fingerprint() const noexcept {
  // Canonical serialization: a version byte, then each field little-endian,
  // the model id length-prefixed. Hashed as a stream rather than built in a
  // vector: this function is noexcept, so an allocation failure would end
  // the process.
  // Initialised first, as xxhash.h asks of a state on the stack: the
  // reset rebuilds its seeded secret only when the state's seed differs,
  // so stack bytes that read as this seed left another call's secret in
  // use, and inputs over 240 bytes hashed to another key.
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_128bits_reset_withSeed(&state, hash_seed);
  std::array<unsigned char, 9> head{};
  head[0] = 1;
  internal::store_le64(head.data() + 1, model.size());
  XXH3_128bits_update(&state, head.data(), head.size());
  XXH3_128bits_update(&state, model.data(), model.size());
  std::array<unsigned char, 25> tail{};
  internal::store_le32(tail.data(), layers);
  internal::store_le32(tail.data() + 4, kv_heads);
  internal::store_le32(tail.data() + 8, head_dim);
  tail[12] = static_cast<unsigned char>(type);
  internal::store_le32(tail.data() + 13, block_tokens);
  internal::store_le64(tail.data() + 17, tenant_salt);
  XXH3_128bits_update(&state, tail.data(), tail.size());
  const XXH128_hash_t h = XXH3_128bits_digest(&state);
  return ns_fingerprint{h.high64, h.low64};
}

result<void> check_block_keys(std::size_t key_count, std::size_t input_tokens,
                              std::uint32_t block_tokens) {
  if (block_tokens == 0)
    return make_error(errc::invalid_argument,
                      "check_block_keys: block_tokens is 0 (tokens per block "
                      "must be at least 1)");
  const std::size_t full = input_tokens / block_tokens;
  if (key_count == full)
    return {};
  return make_error(errc::misaligned_tokens,
                    std::to_string(key_count) + " block keys for a prompt of " +
                        std::to_string(input_tokens) + " tokens, which has " +
                        std::to_string(full) + " full block" +
                        (full == 1 ? "" : "s") + " of " +
                        std::to_string(block_tokens) + " tokens");
}

} // namespace kvfleet::engine
