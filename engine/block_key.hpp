#pragma once
/// Chained 128-bit block keys.
///
/// A request's tokens are cut into blocks of `block_tokens` tokens; only full
/// blocks get keys. key_i = XXH3-128(seed, key_{i-1} || ns || tokens of block
/// i), with key_{-1} = 0, all integers little-endian. The same tokens and
/// namespace give the same keys in every process on every machine.

#include "engine/kv_namespace.hpp"
#include "engine/result.hpp"

#include <compare>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace kvfleet::engine {

/// Fixed seed of every kvfleet hash. Changing it changes every key.
inline constexpr std::uint64_t hash_seed = 0x6b76666c65657431ULL; // "kvfleet1"

/// A block's identity. The all-zero key is reserved for "no parent".
struct block_key {
  std::uint64_t hi = 0;
  std::uint64_t lo = 0;
  friend auto operator<=>(const block_key&, const block_key&) = default;
  [[nodiscard]] bool is_null() const noexcept { return hi == 0 && lo == 0; }
  /// 32 lowercase hex digits, hi first.
  [[nodiscard]] std::string to_hex() const;
};

/// Key of one block given its parent's key (null for the first block).
[[nodiscard]] block_key chain_key(const block_key& parent,
                                  const ns_fingerprint& ns,
                                  std::span<const std::uint32_t> tokens);

/// Key of one block named by an opaque 64-bit id (trace replay: a trace's
/// hash id stands for the block's tokens).
[[nodiscard]] block_key chain_key_from_id(const block_key& parent,
                                          const ns_fingerprint& ns,
                                          std::uint64_t block_id);

/// Keys of every full block of `tokens`, in order, appended to `out`.
/// Trailing tokens that do not fill a block are ignored.
void chain_keys(const ns_fingerprint& ns, std::uint32_t block_tokens,
                std::span<const std::uint32_t> tokens,
                std::vector<block_key>& out);

/// A request's keys, first block first: errc::invalid_argument naming the
/// key when one is the all-zero key (reserved) or repeats the key before it
/// (a block cannot be its own parent). No block can have such a key, so a
/// request with one would be computed and not cached.
[[nodiscard]] result<void> check_request_keys(std::span<const block_key> keys);

/// Hash functor for unordered containers (the key is already uniform).
struct block_key_hash {
  std::size_t operator()(const block_key& k) const noexcept {
    return static_cast<std::size_t>(k.lo ^ (k.hi * 0x9e3779b97f4a7c15ULL));
  }
};

} // namespace kvfleet::engine
