#pragma once
/// Holds a disk tier's I/O thread inside one of its test hooks (tests
/// only), so that a test can queue requests behind it deterministically:
/// once armed, the next call of the hook blocks until open() is called.

#include "engine/disk/segment_file.hpp"

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

namespace kvfleet::engine::testing {

class io_gate {
public:
  /// A disk_tier_config write fault (e.g. write_fault_for_testing) that
  /// passes every write, holding the first one after arm() until open().
  static segment_file::write_fault hook(std::shared_ptr<io_gate> g) {
    return [g] {
      g->pass();
      return 0;
    };
  }
  /// The next call of the hook blocks (also while an earlier one is held:
  /// that one is let through by open()).
  void arm() {
    std::lock_guard lk(mu_);
    armed_ = true;
    entered_ = false;
  }
  /// Waits, with a bound, until the I/O thread is held in the hook.
  [[nodiscard]] bool wait_entered() {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, std::chrono::seconds(60), [&] { return entered_; });
  }
  /// Lets the held I/O thread through. Call it after wait_entered(): a
  /// call that is not held yet blocks when it comes.
  void open() {
    {
      std::lock_guard lk(mu_);
      held_ = false;
    }
    cv_.notify_all();
  }

private:
  void pass() {
    std::unique_lock lk(mu_);
    if (!armed_)
      return;
    armed_ = false;
    entered_ = true;
    held_ = true;
    cv_.notify_all();
    cv_.wait(lk, [&] { return !held_; });
  }

  std::mutex mu_;
  std::condition_variable cv_;
  bool armed_ = false;
  bool entered_ = false;
  bool held_ = false;
};

/// Opens `g` after 10 s unless dismissed first (destroyed): a test whose
/// code would wait for an I/O held at the gate fails then, instead of
/// hanging.
class gate_watchdog {
public:
  explicit gate_watchdog(std::shared_ptr<io_gate> g)
      : thread_([this, g] {
          std::unique_lock lk(mu_);
          if (!cv_.wait_for(lk, std::chrono::seconds(10),
                            [&] { return done_; }))
            g->open();
        }) {}
  ~gate_watchdog() {
    {
      std::lock_guard lk(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  gate_watchdog(const gate_watchdog&) = delete;
  gate_watchdog& operator=(const gate_watchdog&) = delete;

private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

} // namespace kvfleet::engine::testing
