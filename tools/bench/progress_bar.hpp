#pragma once
/// A one-line progress bar for long simulations.
///
/// Nothing is drawn during the first second, so short runs stay quiet; after
/// that the line is redrawn (carriage return, no newline) at most ten times
/// a second, and finish() erases it. Draw it only on a terminal: the owner
/// decides (`enabled`), and it never writes to the stream that carries
/// results. Time comes from an injected clock. Not thread-safe.

#include "engine/clock.hpp"

#include <cstddef>
#include <iosfwd>
#include <string>

namespace kvfleet::bench {

class progress_bar {
public:
  progress_bar(std::ostream& out, bool enabled,
               const engine::clock_source& clock =
                   engine::steady_clock_source::instance());
  ~progress_bar() { finish(); }
  progress_bar(const progress_bar&) = delete;
  progress_bar& operator=(const progress_bar&) = delete;

  /// `done` of `total` steps are complete; `label` names the current phase.
  void update(std::size_t done, std::size_t total, const std::string& label);
  /// Erases the line if one was drawn.
  void finish();
  [[nodiscard]] bool drawn() const noexcept { return drawn_; }

private:
  std::ostream& out_;
  bool enabled_;
  const engine::clock_source& clock_;
  engine::nanos start_;
  engine::nanos last_draw_{0};
  std::size_t width_ = 0; ///< characters of the last line drawn
  bool drawn_ = false;
};

} // namespace kvfleet::bench
