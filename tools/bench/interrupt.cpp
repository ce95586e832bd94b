#include "tools/bench/interrupt.hpp"

#include <signal.h>

#include <atomic>
#include <csignal>
#include <string>

namespace kvfleet::bench {

namespace {
// Lock-free, so storing to it is async-signal-safe.
std::atomic<int> requested{0};
static_assert(std::atomic<int>::is_always_lock_free);

constexpr int stop_signals[] = {SIGINT, SIGTERM};
// Which of stop_signals got the handler (written before it is installed).
volatile std::sig_atomic_t handled[2] = {0, 0};

extern "C" void on_stop_signal(int signal) {
  // Recorded first: sa_mask blocks the other stop signal in this thread
  // only, and another thread (the disk tier's) may run this handler for it
  // at the same time; whichever started first names the stop.
  request_interrupt(signal);
  // Both back to the default action (sigaction is async-signal-safe):
  // SA_RESETHAND alone reset only the signal that arrived, so after a
  // SIGINT a SIGTERM still only asked for a stop.
  for (std::size_t i = 0; i < 2; ++i) {
    if (handled[i] == 0)
      continue;
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    ::sigemptyset(&dfl.sa_mask);
    ::sigaction(stop_signals[i], &dfl, nullptr);
  }
}
} // namespace

void install_stop_handlers() noexcept {
  for (std::size_t i = 0; i < 2; ++i) {
    struct sigaction old {};
    if (::sigaction(stop_signals[i], nullptr, &old) == 0 &&
        old.sa_handler == SIG_IGN)
      continue;
    handled[i] = 1;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    // Both blocked while the handler runs: the other one, arriving before
    // the handler reset it, would otherwise run nested and be recorded
    // first (exit 143 for a run stopped by SIGINT). Blocked, it is
    // delivered after the handler, at its default action.
    ::sigemptyset(&sa.sa_mask);
    for (const int other : stop_signals)
      ::sigaddset(&sa.sa_mask, other);
    sa.sa_flags = static_cast<int>(SA_RESETHAND);
    ::sigaction(stop_signals[i], &sa, nullptr);
  }
}

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
