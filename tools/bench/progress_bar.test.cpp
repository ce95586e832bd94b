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
