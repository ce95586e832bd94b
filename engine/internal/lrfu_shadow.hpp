#pragma once
// One half-life of the adaptive eviction policy simulated on a sample of the
// keys: a small LRFU cache that counts its hits, so the policy can see which
// half-life would have hit more on the current workload (set dueling, see
// eviction_policy.cpp).
//
// Its storage is fixed: a node array, a binary min-heap of the nodes by
// score (internal::indexed_heap) and an open-addressing map from key to
// node (linear probing, backward-shift deletion, at most half full), all
// sized by reserve(). reference() holds at most `capacity` + 1 blocks at
// once (the new block before the eviction it may cause) and does not
// allocate while that fits what reserve() sized; past it the storage
// doubles. It used to be a std::unordered_map and a std::set, which
// allocated a node at every reference of a sampled key, against the
// store's promise of no allocation on put and get. The decisions are the
// same: the victim is the smallest (score, key), as the set's first
// element was, and the arithmetic is the same, so hits and evictions
// match exactly. Not thread-safe.

#include "engine/internal/check.hpp"
#include "engine/internal/indexed_heap.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace kvfleet::engine::internal {

class lrfu_shadow {
public:
  explicit lrfu_shadow(double half_life_factor) : factor_(half_life_factor) {}

  /// Room for `blocks` blocks at once without allocating.
  void reserve(std::size_t blocks) {
    if (blocks <= nodes_.size())
      return;
    const std::size_t old = nodes_.size();
    nodes_.resize(blocks);
    free_.reserve(blocks);
    // Highest id first on the stack, so the lowest free id is used next.
    for (std::size_t id = blocks; id-- > old;)
      free_.push_back(static_cast<std::uint32_t>(id));
    heap_.reserve(blocks, 0);
    std::size_t want = 16;
    while (want < 2 * blocks)
      want *= 2;
    if (want > buckets_.size())
      rehash(want);
  }

  /// One reference of sampled key `key` at tick `t`; `capacity` blocks.
  void reference(std::uint64_t key, double t, std::size_t resident,
                 std::size_t capacity, double log_prior) {
    const double h =
        factor_ * static_cast<double>(std::max<std::size_t>(resident, 64));
    std::uint32_t id = find(key);
    if (id != npos) {
      hits_ += 1.0;
      node& n = nodes_[id];
      const double decayed = std::exp2(n.log_c - (t - n.last) / h);
      n.log_c = std::log2(1.0 + decayed);
    } else {
      if (free_.empty())
        reserve(std::max<std::size_t>(16, 2 * nodes_.size()));
      id = free_.back();
      free_.pop_back();
      nodes_[id] = node{key, log_prior, t};
      insert(key, id);
    }
    node& n = nodes_[id];
    n.last = t;
    heap_.set(id, 0, score{n.log_c + t / h, key});
    while (heap_.size() > capacity) {
      const std::uint32_t victim = heap_.top(0);
      heap_.erase(victim);
      erase(nodes_[victim].key);
      free_.push_back(victim);
    }
  }
  [[nodiscard]] double hits() const noexcept { return hits_; }
  void decay() noexcept { hits_ *= 0.5; }
  [[nodiscard]] double factor() const noexcept { return factor_; }
  /// Blocks held.
  [[nodiscard]] std::size_t size() const noexcept { return heap_.size(); }
  [[nodiscard]] bool contains(std::uint64_t key) const noexcept {
    return find(key) != npos;
  }
  /// Blocks held without allocating.
  [[nodiscard]] std::size_t reserved() const noexcept { return nodes_.size(); }

  void check_invariants() const {
    heap_.check_invariants();
    KVFLEET_CHECK(size_ == heap_.size(), "shadow map and heap differ");
    KVFLEET_CHECK(size_ + free_.size() == nodes_.size(),
                  "shadow node lost or counted twice");
    for (const std::uint32_t id : free_)
      KVFLEET_CHECK(!heap_.contains(id), "free shadow node in the heap");
    for (std::size_t i = 0; i < buckets_.size(); ++i) {
      const bucket& b = buckets_[i];
      if (b.node == npos)
        continue;
      KVFLEET_CHECK(heap_.contains(b.node), "shadow map names a free node");
      KVFLEET_CHECK(nodes_[b.node].key == b.key, "shadow map key mismatch");
      KVFLEET_CHECK(find(b.key) == b.node, "shadow key unreachable");
    }
  }

private:
  static constexpr std::uint32_t npos =
      std::numeric_limits<std::uint32_t>::max();

  struct node {
    std::uint64_t key = 0;
    double log_c = 0;
    double last = 0;
  };
  struct bucket {
    std::uint64_t key = 0;
    std::uint32_t node = npos;
  };

  /// The key's first bucket. Sampled keys share their low bits (the
  /// policy takes those whose hash is a multiple of its sample rate), so
  /// the bucket comes from the top bits of a multiply (Fibonacci hashing).
  [[nodiscard]] std::size_t home(std::uint64_t key) const noexcept {
    return static_cast<std::size_t>((key * 0x9e3779b97f4a7c15ULL) >> shift_);
  }
  [[nodiscard]] std::uint32_t find(std::uint64_t key) const noexcept {
    if (buckets_.empty())
      return npos;
    for (std::size_t i = home(key);; i = (i + 1) & mask_) {
      const bucket& b = buckets_[i];
      if (b.node == npos || b.key == key)
        return b.node;
    }
  }
  /// REQUIRES: key absent, a free bucket (the table is kept half empty).
  void insert(std::uint64_t key, std::uint32_t id) noexcept {
    place(key, id);
    ++size_;
  }
  void place(std::uint64_t key, std::uint32_t id) noexcept {
    std::size_t i = home(key);
    while (buckets_[i].node != npos)
      i = (i + 1) & mask_;
    buckets_[i] = bucket{key, id};
  }
  /// REQUIRES: key present.
  void erase(std::uint64_t key) noexcept {
    std::size_t hole = home(key);
    while (buckets_[hole].key != key || buckets_[hole].node == npos)
      hole = (hole + 1) & mask_;
    // Backward shift: pull the later members of the probe run into the
    // hole, so no tombstones slow the probes down.
    for (std::size_t j = (hole + 1) & mask_; buckets_[j].node != npos;
         j = (j + 1) & mask_) {
      const std::size_t h = home(buckets_[j].key);
      const bool between =
          hole <= j ? (hole < h && h <= j) : (hole < h || h <= j);
      if (!between) {
        buckets_[hole] = buckets_[j];
        hole = j;
      }
    }
    buckets_[hole] = bucket{};
    --size_;
  }
  void rehash(std::size_t n) {
    std::vector<bucket> old(n);
    old.swap(buckets_);
    mask_ = n - 1;
    shift_ = 64 - static_cast<unsigned>(std::countr_zero(n));
    for (const bucket& b : old)
      if (b.node != npos)
        place(b.key, b.node);
  }

  double factor_;
  double hits_ = 0;
  std::vector<node> nodes_;
  std::vector<std::uint32_t> free_; ///< ids of the nodes not held
  indexed_heap heap_;               ///< held nodes by (score, key)
  std::vector<bucket> buckets_;     ///< key -> node
  std::size_t mask_ = 0;
  unsigned shift_ = 64; ///< 64 - log2(buckets)
  std::size_t size_ = 0;
};

} // namespace kvfleet::engine::internal
