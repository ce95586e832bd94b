#pragma once
/// Hash index from block key to entry id: open addressing with linear
/// probing and backward-shift deletion (no tombstones), power-of-two table
/// kept at most half full. Keys made by chain_key are uniform hashes, but a
/// host may store blocks under keys of its own (sequential ids, say), which
/// would fill one long run of buckets and make every erase walk it: the
/// bucket is therefore the top bits of both halves multiplied by a 64-bit
/// odd constant (Fibonacci hashing), one multiply per probe start.
/// find() never allocates; insert() allocates only when the table grows,
/// which reserve() avoids. Not thread-safe.

#include "engine/block_key.hpp"

#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace kvfleet::engine {

class block_index {
public:
  static constexpr std::uint32_t npos =
      std::numeric_limits<std::uint32_t>::max();

  block_index() { rehash(16); }

  /// Sizes the table for `n` keys without further growth.
  void reserve(std::size_t n) {
    std::size_t want = 16;
    while (want < 2 * n)
      want *= 2;
    if (want > buckets_.size())
      rehash(want);
  }

  /// Entry id of `key`, or npos.
  [[nodiscard]] std::uint32_t find(const block_key& key) const noexcept {
    std::size_t i = home(key);
    while (true) {
      const bucket& b = buckets_[i];
      if (b.value == npos)
        return npos;
      if (b.key == key)
        return b.value;
      i = (i + 1) & mask_;
    }
  }

  /// Adds `key` -> `value`. REQUIRES: key absent, value != npos.
  void insert(const block_key& key, std::uint32_t value) {
    if (2 * (size_ + 1) > buckets_.size())
      rehash(buckets_.size() * 2);
    place(key, value);
    ++size_;
  }

  /// Removes `key`; returns false when it was absent.
  bool erase(const block_key& key) noexcept {
    std::size_t i = home(key);
    while (true) {
      if (buckets_[i].value == npos)
        return false;
      if (buckets_[i].key == key)
        break;
      i = (i + 1) & mask_;
    }
    // Backward-shift: pull later members of the probe run into the hole.
    std::size_t hole = i;
    std::size_t j = i;
    while (true) {
      j = (j + 1) & mask_;
      if (buckets_[j].value == npos)
        break;
      const std::size_t h = home(buckets_[j].key);
      // Move j into the hole when its home is not in (hole, j] cyclically.
      const bool between =
          hole <= j ? (hole < h && h <= j) : (hole < h || h <= j);
      if (!between) {
        buckets_[hole] = buckets_[j];
        hole = j;
      }
    }
    buckets_[hole] = bucket{};
    --size_;
    return true;
  }

  [[nodiscard]] std::size_t size() const noexcept { return size_; }

private:
  struct bucket {
    block_key key{};
    std::uint32_t value = npos;
  };

  /// The key's first bucket.
  [[nodiscard]] std::size_t home(const block_key& key) const noexcept {
    const std::uint64_t mixed =
        (key.lo ^ ((key.hi << 32) | (key.hi >> 32))) * 0x9e3779b97f4a7c15ULL;
    return static_cast<std::size_t>(mixed >> shift_);
  }

  void place(const block_key& key, std::uint32_t value) noexcept {
    std::size_t i = home(key);
    while (buckets_[i].value != npos)
      i = (i + 1) & mask_;
    buckets_[i] = bucket{key, value};
  }

  void rehash(std::size_t n) {
    // The new buckets first: when they cannot be allocated, the index is
    // as it was (before, the old ones were moved out first, and a failed
    // allocation left it empty with its old mask).
    std::vector<bucket> old(n, bucket{});
    old.swap(buckets_);
    mask_ = n - 1;
    shift_ = 64 - static_cast<unsigned>(std::countr_zero(n));
    for (const bucket& b : old)
      if (b.value != npos)
        place(b.key, b.value);
  }

  std::vector<bucket> buckets_;
  std::size_t mask_ = 0;
  unsigned shift_ = 64; ///< 64 - log2(buckets)
  std::size_t size_ = 0;
};

} // namespace kvfleet::engine
