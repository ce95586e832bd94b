#include "tools/bench/progress_bar.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ostream>

namespace kvfleet::bench {

namespace {
constexpr engine::nanos quiet_for = std::chrono::seconds{1};
constexpr engine::nanos redraw_every = std::chrono::milliseconds{100};
constexpr std::size_t bar_cells = 30;
} // namespace

progress_bar::progress_bar(std::ostream& out, bool enabled,
                           const engine::clock_source& clock)
    : out_(out), enabled_(enabled), clock_(clock), start_(clock.now()) {}

void progress_bar::update(std::size_t done, std::size_t total,
                          const std::string& label) {
  if (!enabled_ || total == 0)
    return;
  const engine::nanos now = clock_.now();
  if (now - start_ < quiet_for)
    return;
  if (drawn_ && now - last_draw_ < redraw_every)
    return;
  last_draw_ = now;
  done = std::min(done, total);
  const std::size_t filled = done * bar_cells / total;
  const double percent =
      100.0 * static_cast<double>(done) / static_cast<double>(total);
  char pct[16];
  std::snprintf(pct, sizeof pct, "%5.1f%%", percent);
  std::string line = "[" + std::string(filled, '#') +
                     std::string(bar_cells - filled, '.') + "] " + pct + " " +
                     label;
  const std::size_t width = line.size();
  if (width < width_)
    line.append(width_ - width, ' ');
  width_ = width;
  out_ << '\r' << line << std::flush;
  drawn_ = true;
}

void progress_bar::finish() {
  if (!drawn_)
    return;
  out_ << '\r' << std::string(width_, ' ') << '\r' << std::flush;
  drawn_ = false;
  width_ = 0;
}

} // namespace kvfleet::bench
