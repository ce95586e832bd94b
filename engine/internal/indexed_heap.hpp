#pragma once
// Binary min-heaps of entry ids, one per level, with a key per id and
// O(log n) update and erase by id. An id is in at most one level's heap;
// the levels share the per-id storage. reserve() sizes that storage and
// one level's heap: set() of an id below that size into that level does
// not allocate, and the other levels grow as they fill (a heap never
// shrinks, so each allocates only until it reaches its largest size).

#include "engine/internal/check.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace kvfleet::engine::internal {

/// Lexicographic eviction score: the smallest is evicted first.
struct score {
  double major = 0;
  std::uint64_t minor = 0;
  friend bool operator<(const score& a, const score& b) noexcept {
    return a.major < b.major || (a.major == b.major && a.minor < b.minor);
  }
};

class indexed_heap {
public:
  static constexpr std::uint32_t npos =
      std::numeric_limits<std::uint32_t>::max();

  /// REQUIRES: 1 <= levels <= 256.
  explicit indexed_heap(std::size_t levels = 1) : heaps_(levels) {}

  /// Sizes the per-id storage for ids below `ids` and room for all of
  /// them in `level`'s heap (the level most ids are in). Only one level:
  /// an id is in one heap at a time, so room for every id in every level
  /// would cost 4 bytes per id per extra level for nothing.
  /// REQUIRES: level < levels().
  void reserve(std::size_t ids, std::size_t level) {
    grow(ids);
    heaps_[level].reserve(ids);
  }
  [[nodiscard]] bool contains(std::uint32_t id) const noexcept {
    return id < pos_.size() && pos_[id] != npos;
  }
  [[nodiscard]] std::size_t levels() const noexcept { return heaps_.size(); }
  /// REQUIRES: contains(id).
  [[nodiscard]] std::size_t level(std::uint32_t id) const noexcept {
    return level_[id];
  }
  /// Ids `level`'s heap holds without allocating.
  [[nodiscard]] std::size_t capacity(std::size_t level) const noexcept {
    return heaps_[level].capacity();
  }
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] bool empty(std::size_t level) const noexcept {
    return heaps_[level].empty();
  }
  [[nodiscard]] std::size_t size(std::size_t level) const noexcept {
    return heaps_[level].size();
  }
  /// The smallest key of `level`. REQUIRES: !empty(level).
  [[nodiscard]] std::uint32_t top(std::size_t level) const noexcept {
    return heaps_[level].front();
  }
  /// The smallest key of all levels, on a tie the lowest level's.
  /// REQUIRES: !empty(). O(levels).
  [[nodiscard]] std::uint32_t top() const noexcept {
    std::uint32_t best = npos;
    for (const auto& h : heaps_)
      if (!h.empty() && (best == npos || keys_[h.front()] < keys_[best]))
        best = h.front();
    return best;
  }

  /// Inserts `id` into `level` or, when present, changes its key and moves
  /// it to `level`.
  void set(std::uint32_t id, std::size_t level, score key) {
    if (id >= pos_.size())
      grow(std::max<std::size_t>(id + 1, 2 * pos_.size()));
    if (pos_[id] != npos && level_[id] != level)
      erase(id);
    keys_[id] = key;
    std::vector<std::uint32_t>& h = heaps_[level];
    if (pos_[id] == npos) {
      // The push first: when it cannot allocate (bad_alloc), the id is
      // left out, not recorded at a position past the heap's end, which a
      // later erase() would write through.
      h.push_back(id);
      level_[id] = static_cast<std::uint8_t>(level);
      pos_[id] = static_cast<std::uint32_t>(h.size() - 1);
      ++size_;
      up(h, pos_[id]);
    } else {
      const std::uint32_t p = pos_[id];
      up(h, p);
      down(h, pos_[id]);
    }
  }
  void erase(std::uint32_t id) noexcept {
    if (!contains(id))
      return;
    std::vector<std::uint32_t>& h = heaps_[level_[id]];
    const std::uint32_t p = pos_[id];
    const std::uint32_t last = h.back();
    h.pop_back();
    --size_;
    pos_[id] = npos;
    if (last == id)
      return;
    h[p] = last;
    pos_[last] = p;
    up(h, p);
    down(h, pos_[last]);
  }
  [[nodiscard]] const score& key(std::uint32_t id) const noexcept {
    return keys_[id];
  }
  void check_invariants() const {
    std::size_t total = 0;
    for (std::size_t l = 0; l < heaps_.size(); ++l) {
      const auto& h = heaps_[l];
      total += h.size();
      for (std::size_t i = 0; i < h.size(); ++i) {
        KVFLEET_CHECK(pos_[h[i]] == i, "heap position mismatch");
        KVFLEET_CHECK(level_[h[i]] == l, "heap level mismatch");
        if (i > 0)
          KVFLEET_CHECK(!(keys_[h[i]] < keys_[h[(i - 1) / 2]]),
                        "heap order broken");
      }
    }
    KVFLEET_CHECK(total == size_, "heap size mismatch");
  }

private:
  void grow(std::size_t ids) {
    // pos_ last: its size says which ids have room (contains(), push()),
    // so a failed allocation leaves no id with room in one array only.
    if (keys_.size() < ids)
      keys_.resize(ids);
    if (level_.size() < ids)
      level_.resize(ids, 0);
    if (pos_.size() < ids)
      pos_.resize(ids, npos);
  }
  void up(std::vector<std::uint32_t>& h, std::uint32_t p) noexcept {
    const std::uint32_t id = h[p];
    while (p > 0) {
      const std::uint32_t parent = (p - 1) / 2;
      if (!(keys_[id] < keys_[h[parent]]))
        break;
      h[p] = h[parent];
      pos_[h[p]] = p;
      p = parent;
    }
    h[p] = id;
    pos_[id] = p;
  }
  void down(std::vector<std::uint32_t>& h, std::uint32_t p) noexcept {
    const std::uint32_t id = h[p];
    const auto n = static_cast<std::uint32_t>(h.size());
    while (true) {
      std::uint32_t child = 2 * p + 1;
      if (child >= n)
        break;
      if (child + 1 < n && keys_[h[child + 1]] < keys_[h[child]])
        ++child;
      if (!(keys_[h[child]] < keys_[id]))
        break;
      h[p] = h[child];
      pos_[h[p]] = p;
      p = child;
    }
    h[p] = id;
    pos_[id] = p;
  }

  std::vector<std::vector<std::uint32_t>> heaps_;
  std::vector<std::uint32_t> pos_;
  std::vector<std::uint8_t> level_;
  std::vector<score> keys_;
  std::size_t size_ = 0;
};

} // namespace kvfleet::engine::internal
