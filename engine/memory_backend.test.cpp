#include "engine/memory_backend.hpp"

#include "engine/internal/host_memory.hpp"

#include <gtest/gtest.h>

#include <cstddef>
#include <limits>
#include <string>

namespace kvfleet::engine {
namespace {

TEST(host_memory, reads_mem_available_from_meminfo) {
  EXPECT_EQ(detail::meminfo_available("MemTotal:       24554116 kB\n"
                                      "MemFree:         1000000 kB\n"
                                      "MemAvailable:   22308584 kB\n"
                                      "Buffers:          123 kB\n"),
            std::size_t{22308584} * 1024);
  EXPECT_FALSE(detail::meminfo_available("MemTotal: 1 kB\n").has_value());
  EXPECT_FALSE(detail::meminfo_available("MemAvailable: x kB\n").has_value());
  EXPECT_FALSE(detail::meminfo_available("MemAvailable: 12\n").has_value());
  EXPECT_FALSE(
      detail::meminfo_available("MemAvailable: 99999999999999999999 kB")
          .has_value());
}

TEST(host_memory, finds_the_memory_cgroup_of_either_version) {
  const std::string v1 = "9:name=systemd:/\n"
                         "4:memory,foo:/jobs/a1\n"
                         "1:cpu:/\n";
  EXPECT_EQ(detail::cgroup_path(v1, true), "/jobs/a1");
  EXPECT_FALSE(detail::cgroup_path(v1, false).has_value());
  const std::string v2 = "0::/user.slice/job\n";
  EXPECT_EQ(detail::cgroup_path(v2, false), "/user.slice/job");
  EXPECT_FALSE(detail::cgroup_path(v2, true).has_value());
  // "memoryx" is not "memory".
  EXPECT_FALSE(detail::cgroup_path("3:memoryx:/a\n", true).has_value());
}

TEST(host_memory, cgroup_room_is_limit_minus_usage_less_file_cache) {
  EXPECT_EQ(detail::cgroup_room("1000\n", "400\n", 0), 600U);
  EXPECT_EQ(detail::cgroup_room("1000", "1400", 0), 0U);
  // Page cache is charged to the cgroup but dropped before an OOM kill.
  EXPECT_EQ(detail::cgroup_room("1000", "900", 300), 400U);
  EXPECT_EQ(detail::cgroup_room("1000", "900", 5000), 1000U);
  EXPECT_FALSE(detail::cgroup_room("max\n", "400\n", 0).has_value());
  EXPECT_FALSE(detail::cgroup_room("1000", "", 0).has_value());
}

TEST(host_memory, reads_memory_stat_values) {
  const std::string stat = "anon 4096\n"
                           "file 9000\n"
                           "active_file 3000\n"
                           "inactive_file 5000\n"
                           "total_inactive_file 7\n";
  EXPECT_EQ(detail::stat_value(stat, "active_file"), 3000U);
  EXPECT_EQ(detail::stat_value(stat, "inactive_file"), 5000U);
  EXPECT_EQ(detail::stat_value(stat, "total_inactive_file"), 7U);
  EXPECT_FALSE(detail::stat_value(stat, "shmem").has_value());
  EXPECT_FALSE(detail::stat_value(stat, "file_").has_value());
}

TEST(host_memory, arenas_being_populated_count_against_the_room) {
  // 1000 bytes available: an arena of 600 is admitted; while it is still
  // unpopulated, MemAvailable still reads 1000, and a second arena of 600
  // must not be admitted against the same room (before, each arena was
  // checked alone, so two made at once both passed).
  detail::arena_admission a;
  const auto thousand = +[]() -> std::optional<std::size_t> { return 1000; };
  EXPECT_TRUE(a.admit(600, thousand).admitted);
  EXPECT_EQ(a.unpopulated(), 600U);
  const auto second = a.admit(600, thousand);
  EXPECT_FALSE(second.admitted);
  EXPECT_EQ(second.unpopulated, 600U);
  EXPECT_EQ(a.unpopulated(), 600U); // a refusal reserves nothing
  EXPECT_TRUE(a.admit(400, thousand).admitted);
  // Populated: the kernel's figure now holds the first arena.
  a.populated(600);
  a.populated(400);
  EXPECT_EQ(a.unpopulated(), 0U);
  const auto none_left = +[]() -> std::optional<std::size_t> { return 0; };
  EXPECT_FALSE(a.admit(1, none_left).admitted);
  // Unpopulated bytes above what the kernel reads: nothing fits.
  EXPECT_TRUE(a.admit(900, thousand).admitted);
  const auto less = +[]() -> std::optional<std::size_t> { return 500; };
  EXPECT_FALSE(a.admit(1, less).admitted);
  // Nothing readable: nothing to check against.
  const auto unknown = +[]() -> std::optional<std::size_t> { return {}; };
  EXPECT_TRUE(a.admit(1U << 30, unknown).admitted);
}

TEST(host_memory_backend, refuses_an_arena_larger_than_the_memory_available) {
  const auto available = host_memory_available();
  if (!available)
    GTEST_SKIP() << "/proc/meminfo and the memory cgroup are unreadable here";
  // Refused before anything is mapped: populating it would have the kernel
  // kill a process instead of failing.
  const std::size_t too_many =
      *available > std::numeric_limits<std::size_t>::max() / 2
          ? std::numeric_limits<std::size_t>::max()
          : *available * 2 + 1;
  auto got = host_memory_backend::create(too_many);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::out_of_memory);
  EXPECT_NE(got.error().message.find("more than the memory available"),
            std::string::npos)
      << got.error().message;

  auto small = host_memory_backend::create(std::size_t{1} << 20);
  ASSERT_TRUE(small.has_value()) << small.error().describe();
  EXPECT_EQ((*small)->size(), std::size_t{1} << 20);
}

} // namespace
} // namespace kvfleet::engine
