#pragma once
// A ring of byte ranges over a staging buffer: regions are acquired in
// order and released in the same order (batches on one stream finish in
// order). Pure bookkeeping, no CUDA. Not thread-safe.

#include <cstddef>
#include <deque>
#include <optional>

namespace kvfleet::cuda::internal {

class staging_ring {
public:
  struct region {
    std::size_t offset = 0;
    std::size_t bytes = 0; // bytes consumed from the ring (padding included)
  };

  explicit staging_ring(std::size_t capacity) : capacity_(capacity) {}

  /// A contiguous region of `n` bytes (256-byte aligned), or nothing when
  /// the ring has no room now. A region of 0 bytes (an empty batch) takes
  /// nothing and is not tracked: releasing or giving it back changes
  /// nothing, so it can never stand for the oldest live region.
  std::optional<region> acquire(std::size_t n) {
    if (n > capacity_)
      return std::nullopt; // also keeps the rounding below from wrapping
    n = (n + 255) / 256 * 256;
    if (n > capacity_)
      return std::nullopt;
    if (n == 0)
      return region{0, 0};
    if (used_ == 0)
      head_ = tail_ = 0;
    // Free space: [tail_, capacity_) then [0, head_) when tail_ >= head_
    // (or the ring is empty), else [tail_, head_).
    if (used_ == 0 || tail_ > head_) {
      if (capacity_ - tail_ >= n)
        return take(tail_, n, n);
      if (head_ >= n) { // wrap: the end of the buffer is skipped
        const std::size_t skipped = capacity_ - tail_;
        return take(0, n, n + skipped);
      }
      return std::nullopt;
    }
    if (head_ - tail_ >= n)
      return take(tail_, n, n);
    return std::nullopt;
  }

  /// Releases the oldest region. REQUIRES: `r` is the oldest acquired.
  void release(region r) {
    if (r.bytes == 0)
      return; // empty: never tracked
    used_ -= r.bytes;
    starts_.pop_front();
    head_ = starts_.empty() ? 0 : starts_.front();
    if (used_ == 0)
      head_ = tail_ = 0;
  }

  /// Returns the newest region unused (its batch failed before anything
  /// waited on it), so a failed batch does not hold staging until a release
  /// that never comes. False, changing nothing, when `r` is not the newest.
  bool give_back(region r) {
    if (r.bytes == 0)
      return true; // empty: never tracked
    if (starts_.empty() || starts_.back() != r.offset || r.bytes > used_)
      return false;
    starts_.pop_back();
    used_ -= r.bytes;
    tail_ = (tail_ + capacity_ - r.bytes) % capacity_;
    head_ = starts_.empty() ? 0 : starts_.front();
    if (used_ == 0)
      head_ = tail_ = 0;
    return true;
  }

  [[nodiscard]] std::size_t used() const noexcept { return used_; }

private:
  std::optional<region> take(std::size_t at, std::size_t n,
                             std::size_t consumed) {
    tail_ = at + n;
    used_ += consumed;
    starts_.push_back(at);
    if (starts_.size() == 1)
      head_ = at;
    return region{at, consumed};
  }

  std::size_t capacity_;
  std::size_t head_ = 0; // start of the oldest region
  std::size_t tail_ = 0; // end of the newest region
  std::size_t used_ = 0;
  std::deque<std::size_t>
      starts_; // start offsets of live regions, oldest first
};

} // namespace kvfleet::cuda::internal
