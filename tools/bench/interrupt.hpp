#pragma once
/// Stopping a run early (Ctrl-C, kill): main() routes SIGINT and SIGTERM to
/// request_interrupt(), and the replays check interrupt_requested() before
/// each request and return interrupted_error(). The long steps before a
/// replay (reading a trace, generating a workload, counting the working
/// set, computing keys, building the Belady oracle) ask
/// stop_on_interrupt()'s predicate every few thousand items and return
/// interrupted_while(). The run then unwinds like
/// any failed run, so what it made is removed (the --disk-dir subdirectory,
/// up to four times the memory capacity of segment files) instead of being
/// left behind by a process killed in the middle.
/// Thread safety: the flag is a lock-free atomic; request_interrupt() is
/// async-signal-safe.

#include "engine/result.hpp"

#include <cstddef>
#include <functional>
#include <string_view>

namespace kvfleet::bench {

/// Asks the running replay to stop; `signal` is the signal that asked. A
/// later request, before clear_interrupt(), changes nothing: the first
/// signal decides the exit status.
void request_interrupt(int signal) noexcept;

/// The signal that asked the replay to stop, or 0.
[[nodiscard]] int interrupt_signal() noexcept;

/// True once request_interrupt() was called (and not cleared).
[[nodiscard]] inline bool interrupt_requested() noexcept {
  return interrupt_signal() != 0;
}

/// Forgets a request (for tests).
void clear_interrupt() noexcept;

/// Routes SIGINT and SIGTERM to request_interrupt() (main() calls it
/// first), once: the first of either puts both back to their default
/// action, so a second signal of either kind ends the process at once (a
/// Ctrl-C followed by a service manager's SIGTERM, say). A signal ignored
/// at startup (a background job's SIGINT) stays ignored.
void install_stop_handlers() noexcept;

/// The error a replay returns when it stops for an interrupt after `done`
/// of `total` requests (errc::unavailable).
[[nodiscard]] unexpected<error> interrupted_error(std::size_t done,
                                                  std::size_t total);

/// A stop predicate for long set-up steps (engine::trace_options::stop,
/// engine::workload_options::stop, ...): interrupt_requested().
[[nodiscard]] std::function<bool()> stop_on_interrupt();

/// The error a run returns when it stops for an interrupt before or
/// between its replays: "interrupted while `what`" (errc::unavailable).
[[nodiscard]] unexpected<error> interrupted_while(std::string_view what);
/// What a stoppable step that failed with `e` returns: interrupted_while
/// when it was stopped (errc::unavailable), else `e` (out of memory, say).
[[nodiscard]] unexpected<error> stopped_or_failed(const error& e,
                                                  std::string_view what);

} // namespace kvfleet::bench
