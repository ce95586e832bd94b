#pragma once
/// Time source injected into engine objects, so tests advance time instead
/// of sleeping. Times are nanoseconds on a monotonic scale.

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

/// Clock that moves only when told to. Not thread-safe.
class manual_clock final : public clock_source {
public:
  explicit manual_clock(nanos start = nanos{0}) : now_(start) {}
  [[nodiscard]] nanos now() const noexcept override { return now_; }
  void advance(nanos d) noexcept { now_ += d; }
  void set(nanos t) noexcept { now_ = t; }

private:
  nanos now_;
};

} // namespace kvfleet::engine
