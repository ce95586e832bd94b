#pragma once
/// Namespaces: what a block means. A namespace fixes the model, the KV layout
/// and the block size; blocks of different namespaces never match because
/// the namespace's fingerprint is part of every block key.

#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace kvfleet::engine {

/// Element type of uncompressed KV values.
enum class dtype : std::uint8_t { fp16 = 0, bf16 = 1 };

[[nodiscard]] std::string_view to_string(dtype t) noexcept;
[[nodiscard]] result<dtype> parse_dtype(std::string_view name);

/// 128-bit fingerprint of a namespace spec (XXH3-128, fixed seed).
struct ns_fingerprint {
  std::uint64_t hi = 0;
  std::uint64_t lo = 0;
  friend bool operator==(const ns_fingerprint&,
                         const ns_fingerprint&) = default;
};

/// What a block means. Value layout: [layers][2][block_tokens][kv_heads]
/// [head_dim] elements of `type`.
struct namespace_spec {
  std::string model; ///< model id, e.g. "llama-3-8b"
  std::uint32_t layers = 0;
  std::uint32_t kv_heads = 0;
  std::uint32_t head_dim = 0;
  dtype type = dtype::fp16;
  std::uint32_t block_tokens = 0;
  std::uint64_t tenant_salt = 0; ///< separates tenants sharing a model

  /// Number of elements in one block's uncompressed value.
  [[nodiscard]] std::size_t elements_per_block() const noexcept;
  /// Bytes of one block's uncompressed value.
  [[nodiscard]] std::size_t value_bytes() const noexcept;
  /// Checks the spec: every dimension positive, a model id, element count a
  /// multiple of the codec group size, at most 1 GiB per block.
  [[nodiscard]] result<void> validate() const;
  /// Stable across processes and machines.
  [[nodiscard]] ns_fingerprint fingerprint() const noexcept;
};

/// A request of `input_tokens` prompt tokens names one key per full block
/// of `block_tokens`: errc::misaligned_tokens, saying how many it should
/// have, when `key_count` is any other number; errc::invalid_argument when
/// `block_tokens` is 0.
[[nodiscard]] result<void> check_block_keys(std::size_t key_count,
                                            std::size_t input_tokens,
                                            std::uint32_t block_tokens);

} // namespace kvfleet::engine
