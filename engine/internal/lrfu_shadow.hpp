#pragma once
// One half-life of the adaptive eviction policy simulated on a sample of the
// keys: a small LRFU cache that counts its hits, so the policy can see which
// half-life would have hit more on the current workload (set dueling, see
// eviction_policy.cpp).
//
// Its storage is fixed: a node array, a binary min-heap of the nodes by
// score (internal::indexed_heap) and the store's own hash index
// (block_index, the sampled key as a block key's low half) from key to node,
// all sized by reserve(). reference() holds at most `capacity` + 1 blocks at
// once (the new block before the eviction it may cause) and does not
// allocate while that fits what reserve() sized; past it the storage
// doubles. It used to be a std::unordered_map and a std::set, which
// allocated a node at every reference of a sampled key, against the
// store's promise of no allocation on put and get. The decisions are the
// same: the victim is the smallest (score, key), as the set's first
// element was, and the arithmetic is the same, so hits and evictions
// match exactly. Not thread-safe.

#include "engine/block_index.hpp"
#include "engine/internal/check.hpp"
#include "engine/internal/indexed_heap.hpp"

#include <algorithm>
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
    // Everything that can fail to allocate before nodes_ grows: its size
    // says which ids exist, and each new one must be on the free stack.
    const std::size_t old = nodes_.size();
    free_.reserve(blocks);
    heap_.reserve(blocks, 0);
    index_.reserve(blocks);
    nodes_.resize(blocks);
    // Highest id first on the stack, so the lowest free id is used next.
    for (std::size_t id = blocks; id-- > old;)
      free_.push_back(static_cast<std::uint32_t>(id));
  }

  /// One reference of sampled key `key` at tick `t`; `capacity` blocks.
  void reference(std::uint64_t key, double t, std::size_t capacity,
                 double log_prior) {
    const double h = factor_ * basis_;
    std::uint32_t id = index_.find(as_block(key));
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
      index_.insert(as_block(key), id);
    }
    node& n = nodes_[id];
    n.last = t;
    heap_.set(id, 0, score{n.log_c + t / h, key});
    while (heap_.size() > capacity) {
      const std::uint32_t victim = heap_.top(0);
      heap_.erase(victim);
      index_.erase(as_block(nodes_[victim].key));
      free_.push_back(victim);
    }
  }
  /// The half-life is factor() x `basis` blocks from now on: every held
  /// block's score is retaken under it (the policy's own basis, so both
  /// rank alike; adaptive_policy in eviction_policy.cpp).
  void rebase(double basis) {
    basis_ = basis;
    const double h = factor_ * basis_;
    for (std::uint32_t id = 0; id < nodes_.size(); ++id)
      if (heap_.contains(id)) {
        const node& n = nodes_[id];
        heap_.set(id, 0, score{n.log_c + n.last / h, n.key});
      }
  }
  [[nodiscard]] double hits() const noexcept { return hits_; }
  void decay() noexcept { hits_ *= 0.5; }
  [[nodiscard]] double factor() const noexcept { return factor_; }
  /// Blocks held.
  [[nodiscard]] std::size_t size() const noexcept { return heap_.size(); }
  [[nodiscard]] bool contains(std::uint64_t key) const noexcept {
    return index_.find(as_block(key)) != npos;
  }
  /// Blocks held without allocating.
  [[nodiscard]] std::size_t reserved() const noexcept { return nodes_.size(); }

  void check_invariants() const {
    heap_.check_invariants();
    KVFLEET_CHECK(index_.size() == heap_.size(), "shadow map and heap differ");
    KVFLEET_CHECK(heap_.size() + free_.size() == nodes_.size(),
                  "shadow node lost or counted twice");
    for (const std::uint32_t id : free_)
      KVFLEET_CHECK(!heap_.contains(id), "free shadow node in the heap");
    for (std::uint32_t id = 0; id < nodes_.size(); ++id)
      if (heap_.contains(id))
        KVFLEET_CHECK(index_.find(as_block(nodes_[id].key)) == id,
                      "shadow key unreachable");
  }

private:
  static constexpr std::uint32_t npos =
      std::numeric_limits<std::uint32_t>::max();

  struct node {
    std::uint64_t key = 0;
    double log_c = 0;
    double last = 0;
  };
  /// A sampled key as the index's key: its low half (the index's bucket
  /// is then the top bits of the key times a 64-bit odd constant, which
  /// spreads sampled keys, all multiples of the sample rate).
  [[nodiscard]] static block_key as_block(std::uint64_t key) noexcept {
    return block_key{0, key};
  }

  double factor_;
  double basis_ = 64; ///< blocks; rebase()
  double hits_ = 0;
  std::vector<node> nodes_;
  std::vector<std::uint32_t> free_; ///< ids of the nodes not held
  indexed_heap heap_;               ///< held nodes by (score, key)
  block_index index_;               ///< key -> node
};

} // namespace kvfleet::engine::internal
