#pragma once
/// A one-line progress bar for long simulations.
///
/// Nothing is drawn during the first second, so short runs stay quiet; after
/// that the line is redrawn (carriage return, no newline) at most ten times
/// a second, and finish() erases it. Draw it only on a terminal: the owner
/// decides (`enabled`), and it never writes to the stream that carries
/// results. Time comes from an injected clock.
///
/// A step of unknown length (generating a workload, creating a store) is a
/// phase(): its label and the seconds it has taken so far. Nothing calls
/// update() while such a step runs, so start_ticking() starts a thread that
/// redraws the line (tick()) every tenth of a second until finish(); the
/// mutex is there for that thread alone. Without it, calls redraw only.

#include "engine/clock.hpp"

#include <condition_variable>
#include <cstddef>
#include <iosfwd>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>

namespace kvfleet::bench {

class progress_bar {
public:
  progress_bar(std::ostream& out, bool enabled,
               const engine::clock_source& clock =
                   engine::steady_clock_source::instance());
  /// finish(), and stops the ticking thread.
  ~progress_bar();
  progress_bar(const progress_bar&) = delete;
  progress_bar& operator=(const progress_bar&) = delete;

  /// `done` of `total` steps are complete; `label` names the current phase.
  /// A `total` of 0 is phase(label).
  void update(std::size_t done, std::size_t total, const std::string& label);
  /// A step of unknown length named `label` starts now.
  void phase(const std::string& label);
  /// Redraws the line if it is due (what the ticking thread calls).
  void tick();
  /// Starts the thread that calls tick(); nothing when disabled.
  void start_ticking();
  /// Writes `text` to the bar's stream with the line erased first, under
  /// the bar's lock, so the ticking thread cannot draw into it; the next
  /// update, phase or tick draws the line again.
  void print(std::string_view text);
  /// Erases the line if one was drawn; nothing is drawn after it.
  void finish();
  [[nodiscard]] bool drawn() const;

private:
  void draw_if_due(std::unique_lock<std::mutex>& lock);
  void erase_locked();

  std::ostream& out_;
  const bool enabled_;
  const engine::clock_source& clock_;
  const engine::nanos start_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::size_t done_ = 0;
  std::size_t total_ = 0; ///< 0: a phase
  std::string label_;
  engine::nanos phase_start_{0};
  engine::nanos last_draw_{0};
  std::size_t width_ = 0; ///< characters of the last line drawn
  bool drawn_ = false;
  bool finished_ = false;
  std::thread ticker_;
};

} // namespace kvfleet::bench
