#include "tools/bench/progress_bar.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <sstream>

namespace kvfleet::bench {
namespace {

using namespace std::chrono_literals;

TEST(progress_bar, quiet_for_the_first_second) {
  engine::manual_clock clock;
  std::ostringstream out;
  progress_bar bar(out, true, clock);
  bar.update(1, 10, "lru");
  clock.advance(999ms);
  bar.update(5, 10, "lru");
  EXPECT_TRUE(out.str().empty());
  bar.finish();
  EXPECT_TRUE(out.str().empty());
}

TEST(progress_bar, draws_after_a_second_and_erases_itself) {
  engine::manual_clock clock;
  std::ostringstream out;
  progress_bar bar(out, true, clock);
  clock.advance(1500ms);
  bar.update(5, 10, "lfu (2/4)");
  EXPECT_TRUE(bar.drawn());
  EXPECT_NE(out.str().find("50.0%"), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("lfu (2/4)"), std::string::npos);
  EXPECT_EQ(out.str().find('\n'), std::string::npos) << "one line, redrawn";
  const std::size_t after_first = out.str().size();
  clock.advance(10ms);
  bar.update(6, 10, "lfu (2/4)");
  EXPECT_EQ(out.str().size(), after_first) << "redraws are throttled";
  clock.advance(200ms);
  bar.update(7, 10, "lfu (2/4)");
  EXPECT_GT(out.str().size(), after_first);
  bar.finish();
  EXPECT_FALSE(bar.drawn());
  EXPECT_EQ(out.str().back(), '\r');
}

// A step of unknown length shows its label and the seconds it has run;
// tick() (the ticking thread's call) redraws it while no update comes, so
// a store's creation or a workload's generation is not a silent stretch.
// Before, nothing was drawn until the first request was replayed.
TEST(progress_bar, a_phase_is_drawn_by_ticks_with_its_seconds) {
  engine::manual_clock clock;
  std::ostringstream out;
  progress_bar bar(out, true, clock);
  bar.phase("generating the workload");
  clock.advance(1500ms);
  EXPECT_TRUE(out.str().empty()) << "no call, no draw";
  bar.tick();
  EXPECT_NE(out.str().find("generating the workload ... 1 s"),
            std::string::npos)
      << out.str();
  clock.advance(2s);
  bar.tick();
  EXPECT_NE(out.str().find("generating the workload ... 3 s"),
            std::string::npos)
      << out.str();
  // A total of 0 is a phase too; then the bar of a pass replaces it.
  bar.update(0, 0, "lru (1/2): setting up");
  clock.advance(200ms);
  bar.tick();
  EXPECT_NE(out.str().find("lru (1/2): setting up ... 0 s"), std::string::npos);
  clock.advance(200ms);
  bar.update(5, 10, "lru (1/2)");
  EXPECT_NE(out.str().find("50.0% lru (1/2)"), std::string::npos);
  // print() erases the line before its text; the next draw brings it back.
  bar.print("a warning\n");
  EXPECT_FALSE(bar.drawn());
  const std::string printed = out.str();
  ASSERT_GE(printed.size(), 11U);
  EXPECT_EQ(printed.substr(printed.size() - 11), "\ra warning\n");
  clock.advance(200ms);
  bar.tick();
  EXPECT_TRUE(bar.drawn());
  bar.finish();
  const auto size = out.str().size();
  clock.advance(200ms);
  bar.tick();
  bar.update(6, 10, "lru (1/2)");
  EXPECT_EQ(out.str().size(), size) << "nothing is drawn after finish()";
}

// The ticking thread starts and stops with the bar (the destructor joins
// it); disabled, none starts.
TEST(progress_bar, the_ticking_thread_stops_with_the_bar) {
  std::ostringstream out;
  {
    progress_bar bar(out, true);
    bar.start_ticking();
    bar.start_ticking(); // once
    bar.phase("setting up");
  }
  // Disabled: nothing drawn, however long it lives.
  std::ostringstream quiet;
  progress_bar off(quiet, false);
  off.start_ticking();
  off.phase("x");
  off.tick();
  EXPECT_TRUE(quiet.str().empty());
}

TEST(progress_bar, disabled_draws_nothing) {
  engine::manual_clock clock;
  std::ostringstream out;
  progress_bar bar(out, false, clock);
  clock.advance(5s);
  bar.update(5, 10, "lru");
  bar.finish();
  EXPECT_TRUE(out.str().empty());
}

} // namespace
} // namespace kvfleet::bench
