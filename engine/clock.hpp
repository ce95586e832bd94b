#pragma once
/// Time source injected into engine objects, so tests advance time instead
/// of sleeping. Times are nanoseconds on a monotonic scale.

#include <atomic>
#include <chrono>
#include <cstdint>

namespace kvfleet::engine {

using nanos = std::chrono::nanoseconds;

/// Abstract monotonic clock. Implementations must be safe to call from the
/// thread that owns the engine; `steady_clock_source` is thread-safe.
class clock_source {
public:
  virtual ~clock_source() = default;
  [[nodiscard]] virtual nanos now() const noexcept = 0;
};

/// Wall-time monotonic clock (std::chrono::steady_clock).
class steady_clock_source final : public clock_source {
public:
  [[nodiscard]] nanos now() const noexcept override {
    return std::chrono::duration_cast<nanos>(
        std::chrono::steady_clock::now().time_since_epoch());
  }
  /// A process-wide instance.
  static const steady_clock_source& instance() noexcept {
    static const steady_clock_source clock;
    return clock;
  }
};

/// Clock that moves only when told to. Thread-safe (a component with its
/// own thread, like the disk tier, may read it while a test advances it).
class manual_clock final : public clock_source {
public:
  explicit manual_clock(nanos start = nanos{0}) : now_(start.count()) {}
  [[nodiscard]] nanos now() const noexcept override {
    return nanos{now_.load(std::memory_order_acquire)};
  }
  void advance(nanos d) noexcept {
    now_.fetch_add(d.count(), std::memory_order_acq_rel);
  }
  void set(nanos t) noexcept {
    now_.store(t.count(), std::memory_order_release);
  }

private:
  std::atomic<std::int64_t> now_;
};

} // namespace kvfleet::engine
