#include "tools/bench/interrupt.hpp"

#include <atomic>
#include <string>

namespace kvfleet::bench {

namespace {
// Lock-free, so storing to it is async-signal-safe.
std::atomic<int> requested{0};
static_assert(std::atomic<int>::is_always_lock_free);
} // namespace

void request_interrupt(int signal) noexcept {
  // The first signal names the stop: a SIGINT after a SIGTERM (the second
  // signal's handler is still installed) does not turn 143 into 130.
  int none = 0;
  requested.compare_exchange_strong(none, signal, std::memory_order_relaxed);
}

int interrupt_signal() noexcept {
  return requested.load(std::memory_order_relaxed);
}

void clear_interrupt() noexcept {
  requested.store(0, std::memory_order_relaxed);
}

unexpected<error> interrupted_error(std::size_t done, std::size_t total) {
  return make_error(errc::unavailable, "interrupted after " +
                                           std::to_string(done) + " of " +
                                           std::to_string(total) + " requests");
}

std::function<bool()> stop_on_interrupt() {
  return [] { return interrupt_requested(); };
}

unexpected<error> interrupted_while(std::string_view what) {
  return make_error(errc::unavailable,
                    "interrupted while " + std::string(what));
}

unexpected<error> stopped_or_failed(const error& e, std::string_view what) {
  if (e.code == errc::unavailable)
    return interrupted_while(what);
  return unexpected<error>{e};
}

} // namespace kvfleet::bench
