#pragma once
// Binary min-heap of entry ids with a key per id and O(log n) update and
// erase by id. Storage is sized by reserve(); push() does not allocate
// below that size.

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

  void reserve(std::size_t ids) {
    if (pos_.size() < ids) {
      pos_.resize(ids, npos);
      keys_.resize(ids);
    }
    heap_.reserve(ids);
  }
  [[nodiscard]] bool contains(std::uint32_t id) const noexcept {
    return id < pos_.size() && pos_[id] != npos;
  }
  [[nodiscard]] bool empty() const noexcept { return heap_.empty(); }
  [[nodiscard]] std::size_t size() const noexcept { return heap_.size(); }
  [[nodiscard]] std::uint32_t top() const noexcept { return heap_.front(); }

  /// Inserts `id` or, when present, changes its key.
  void set(std::uint32_t id, score key) {
    if (id >= pos_.size())
      reserve(std::max<std::size_t>(id + 1, 2 * pos_.size()));
    keys_[id] = key;
    if (pos_[id] == npos) {
      pos_[id] = static_cast<std::uint32_t>(heap_.size());
      heap_.push_back(id);
      up(pos_[id]);
    } else {
      const std::uint32_t p = pos_[id];
      up(p);
      down(pos_[id]);
    }
  }
  void erase(std::uint32_t id) noexcept {
    if (!contains(id))
      return;
    const std::uint32_t p = pos_[id];
    const std::uint32_t last = heap_.back();
    heap_.pop_back();
    pos_[id] = npos;
    if (last == id)
      return;
    heap_[p] = last;
    pos_[last] = p;
    up(p);
    down(pos_[last]);
  }
  [[nodiscard]] const score& key(std::uint32_t id) const noexcept {
    return keys_[id];
  }
  void check_invariants() const {
    for (std::size_t i = 0; i < heap_.size(); ++i) {
      KVFLEET_CHECK(pos_[heap_[i]] == i, "heap position mismatch");
      if (i > 0)
        KVFLEET_CHECK(!(keys_[heap_[i]] < keys_[heap_[(i - 1) / 2]]),
                      "heap order broken");
    }
  }

private:
  void up(std::uint32_t p) noexcept {
    const std::uint32_t id = heap_[p];
    while (p > 0) {
      const std::uint32_t parent = (p - 1) / 2;
      if (!(keys_[id] < keys_[heap_[parent]]))
        break;
      heap_[p] = heap_[parent];
      pos_[heap_[p]] = p;
      p = parent;
    }
    heap_[p] = id;
    pos_[id] = p;
  }
  void down(std::uint32_t p) noexcept {
    const std::uint32_t id = heap_[p];
    const auto n = static_cast<std::uint32_t>(heap_.size());
    while (true) {
      std::uint32_t child = 2 * p + 1;
      if (child >= n)
        break;
      if (child + 1 < n && keys_[heap_[child + 1]] < keys_[heap_[child]])
        ++child;
      if (!(keys_[heap_[child]] < keys_[id]))
        break;
      heap_[p] = heap_[child];
      pos_[heap_[p]] = p;
      p = child;
    }
    heap_[p] = id;
    pos_[id] = p;
  }

  std::vector<std::uint32_t> heap_;
  std::vector<std::uint32_t> pos_;
  std::vector<score> keys_;
};

} // namespace kvfleet::engine::internal
