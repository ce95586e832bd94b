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

progress_bar::~progress_bar() {
  finish();
  if (ticker_.joinable())
    ticker_.join();
}

void progress_bar::update(std::size_t done, std::size_t total,
                          const std::string& label) {
  if (!enabled_)
    return;
  if (total == 0) {
    phase(label);
    return;
  }
  std::unique_lock lock(mu_);
  done_ = std::min(done, total);
  total_ = total;
  if (label_ != label)
    label_ = label;
  draw_if_due(lock);
}

void progress_bar::phase(const std::string& label) {
  if (!enabled_)
    return;
  std::unique_lock lock(mu_);
  done_ = 0;
  total_ = 0;
  label_ = label;
  phase_start_ = clock_.now();
  draw_if_due(lock);
}

void progress_bar::tick() {
  if (!enabled_)
    return;
  std::unique_lock lock(mu_);
  draw_if_due(lock);
}

void progress_bar::start_ticking() {
  if (!enabled_ || ticker_.joinable())
    return;
  ticker_ = std::thread([this] {
    std::unique_lock lock(mu_);
    while (!finished_) {
      wake_.wait_for(lock, redraw_every);
      draw_if_due(lock);
    }
  });
}

void progress_bar::draw_if_due(std::unique_lock<std::mutex>& /*lock*/) {
  if (finished_ || label_.empty())
    return;
  const engine::nanos now = clock_.now();
  if (now - start_ < quiet_for)
    return;
  if (drawn_ && now - last_draw_ < redraw_every)
    return;
  last_draw_ = now;
  std::string line;
  if (total_ == 0) {
    const auto seconds =
        std::chrono::duration_cast<std::chrono::seconds>(now - phase_start_);
    line = label_ + " ... " + std::to_string(seconds.count()) + " s";
  } else {
    const std::size_t filled = done_ * bar_cells / total_;
    const double percent =
        100.0 * static_cast<double>(done_) / static_cast<double>(total_);
    char pct[16];
    std::snprintf(pct, sizeof pct, "%5.1f%%", percent);
    line = "[" + std::string(filled, '#') +
           std::string(bar_cells - filled, '.') + "] " + pct + " " + label_;
  }
  const std::size_t width = line.size();
  if (width < width_)
    line.append(width_ - width, ' ');
  width_ = width;
  out_ << '\r' << line << std::flush;
  drawn_ = true;
}

void progress_bar::erase_locked() {
  if (!drawn_)
    return;
  out_ << '\r' << std::string(width_, ' ') << '\r' << std::flush;
  drawn_ = false;
  width_ = 0;
}

void progress_bar::print(std::string_view text) {
  std::lock_guard lock(mu_);
  erase_locked();
  out_ << text << std::flush;
}

void progress_bar::finish() {
  {
    std::lock_guard lock(mu_);
    finished_ = true;
    erase_locked();
  }
  wake_.notify_all();
}

bool progress_bar::drawn() const {
  std::lock_guard lock(mu_);
  return drawn_;
}

} // namespace kvfleet::bench
