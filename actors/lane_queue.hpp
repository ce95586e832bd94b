#pragma once
/// A FIFO queue with one lane per request priority: pop() takes the oldest
/// item of the highest non-empty lane, so a critical request never waits
/// behind a background one, and requests of one priority keep their order.
/// The engine actor's batcher (batch_accumulator) keeps its requests in
/// one. The balancer holds no queue (it routes each request as it comes;
/// mailboxes order by priority, prioritized.hpp), and the warmer's queue is
/// in frequency order, its requests all of one priority. Not thread-safe:
/// owned by one actor.

#include "engine/eviction_policy.hpp"

#include <array>
#include <cstddef>
#include <deque>
#include <optional>
#include <utility>
#include <vector>

namespace kvfleet::actors {

inline constexpr std::size_t priority_count = 5;

template <class T> class lane_queue {
public:
  void push(engine::priority prio, T item) {
    lanes_[index(prio)].push_back(std::move(item));
    ++size_;
  }

  /// The oldest item of the highest non-empty lane; nullopt when empty.
  std::optional<T> pop() {
    for (std::size_t i = priority_count; i-- > 0;) {
      auto& lane = lanes_[i];
      if (!lane.empty()) {
        std::optional<T> out{std::move(lane.front())};
        lane.pop_front();
        --size_;
        return out;
      }
    }
    return std::nullopt;
  }

  /// The item pop() would return next; null when empty.
  [[nodiscard]] const T* peek() const noexcept {
    for (std::size_t i = priority_count; i-- > 0;)
      if (!lanes_[i].empty())
        return &lanes_[i].front();
    return nullptr;
  }

  /// Removes and returns, lane by lane (highest first, oldest first in a
  /// lane), every item for which `pred` holds; the others keep their
  /// order. O(items). (Before, only the items at the front of each lane
  /// up to the first for which it did not hold: a request past its
  /// deadline behind one of a later deadline, or of none, stayed.)
  template <class Pred> std::vector<T> remove_if(Pred pred) {
    std::vector<T> out;
    for (std::size_t i = priority_count; i-- > 0;) {
      auto& lane = lanes_[i];
      auto keep = lane.begin();
      for (auto it = lane.begin(); it != lane.end(); ++it) {
        if (pred(std::as_const(*it))) {
          out.push_back(std::move(*it));
        } else {
          if (keep != it)
            *keep = std::move(*it);
          ++keep;
        }
      }
      size_ -= static_cast<std::size_t>(lane.end() - keep);
      lane.erase(keep, lane.end());
    }
    return out;
  }

  /// The least `key(front)` over the lanes' front items, each the oldest of
  /// its lane; nullopt when empty. With a key that grows in arrival order
  /// (an arrival time), that of the oldest item of all.
  template <class F>
  [[nodiscard]] auto min_front(F key) const
      -> std::optional<decltype(key(std::declval<const T&>()))> {
    std::optional<decltype(key(std::declval<const T&>()))> out;
    for (const auto& lane : lanes_)
      if (!lane.empty() && (!out || key(lane.front()) < *out))
        out = key(lane.front());
    return out;
  }

  /// The priority of the highest non-empty lane; nullopt when empty.
  [[nodiscard]] std::optional<engine::priority> top() const noexcept {
    for (std::size_t i = priority_count; i-- > 0;)
      if (!lanes_[i].empty())
        return static_cast<engine::priority>(i);
    return std::nullopt;
  }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
  [[nodiscard]] std::size_t size(engine::priority prio) const noexcept {
    return lanes_[index(prio)].size();
  }

private:
  static std::size_t index(engine::priority p) noexcept {
    auto i = static_cast<std::size_t>(p);
    return i < priority_count ? i : priority_count - 1;
  }
  std::array<std::deque<T>, priority_count> lanes_;
  std::size_t size_ = 0;
};

} // namespace kvfleet::actors
