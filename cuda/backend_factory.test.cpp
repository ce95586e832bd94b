// The start-up backend factory, in every build: device memory when a GPU
// gives it, otherwise host memory with one log line that says why (no
// driver, no device, a bad device index, or a build without CUDA).
#include "cuda/backend_factory.hpp"
#include "cuda/device.hpp"
#include "cuda/internal/test_support.hpp"
#include "engine/block_store.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kvfleet::cuda {
namespace {

constexpr std::size_t mib = std::size_t{1} << 20;

TEST(backend_factory_test, zero_bytes_is_an_error_value_and_logs_nothing) {
  std::vector<std::string> lines;
  const log_sink log = [&](std::string_view l) { lines.emplace_back(l); };
  auto one = create_memory_backend(0, 0, log);
  ASSERT_FALSE(one);
  EXPECT_EQ(one.error().code, errc::zero_capacity);
  auto per_engine = device_backend_per_engine(log)(3, 0);
  ASSERT_FALSE(per_engine);
  EXPECT_EQ(per_engine.error().code, errc::zero_capacity);
  EXPECT_TRUE(lines.empty());
}

TEST(backend_factory_test, a_device_that_does_not_exist_falls_back_to_host) {
  // No machine has device 9999: the arena fails in every build (no CUDA,
  // no driver, or cudaSetDevice refusing the index).
  std::vector<std::string> lines;
  auto backend = create_memory_backend(
      8 * mib, 9999, [&](std::string_view l) { lines.emplace_back(l); });
  ASSERT_TRUE(backend) << backend.error().describe();
  EXPECT_EQ((*backend)->name(), "host");
  EXPECT_EQ((*backend)->size(), 8 * mib);
  ASSERT_EQ(lines.size(), 1U);
  EXPECT_NE(lines[0].find("no device memory for the block pool"),
            std::string::npos)
      << lines[0];
  EXPECT_NE(lines[0].find("8388608 bytes of host memory instead"),
            std::string::npos)
      << lines[0];
  // The engine runs on it.
  engine::store_config cfg;
  auto store = engine::block_store::create(cfg, std::move(*backend));
  ASSERT_TRUE(store) << store.error().describe();
  (*store)->check_invariants();
}

TEST(backend_factory_test, without_a_device_every_engine_gets_host_memory) {
  auto count = device_count();
  if (count)
    GTEST_SKIP() << *count << " CUDA device(s) present";
  std::vector<std::string> lines;
  auto make = device_backend_per_engine(
      [&](std::string_view l) { lines.emplace_back(l); });
  for (std::uint32_t slot = 0; slot < 3; ++slot) {
    auto b = make(slot, 4 * mib);
    ASSERT_TRUE(b) << b.error().describe();
    EXPECT_EQ((*b)->name(), "host");
    EXPECT_EQ((*b)->size(), 4 * mib);
  }
  ASSERT_EQ(lines.size(), 3U);
  for (std::uint32_t slot = 0; slot < 3; ++slot) {
    EXPECT_EQ(lines[slot].rfind("engine " + std::to_string(slot) + ": ", 0), 0U)
        << lines[slot];
    // The line carries device_count()'s reason.
    EXPECT_NE(lines[slot].find(count.error().message), std::string::npos)
        << lines[slot];
  }
  if (count.error().code == errc::unavailable) {
    EXPECT_NE(lines[0].find("built without CUDA"), std::string::npos)
        << lines[0];
    // Both ways a build ends up without CUDA are named: it used to say
    // "no nvcc" also where nvcc was there and KVFLEET_CUDA=OFF left it out.
    EXPECT_NE(lines[0].find("KVFLEET_CUDA=OFF"), std::string::npos) << lines[0];
  }
}

TEST(backend_factory_test, with_devices_engines_share_them_round_robin) {
  KVFLEET_REQUIRE_DEVICE();
  auto count = device_count();
  ASSERT_TRUE(count);
  std::vector<std::string> lines;
  auto make = device_backend_per_engine(
      [&](std::string_view l) { lines.emplace_back(l); });
  for (std::uint32_t slot = 0; slot < 2; ++slot) {
    auto b = make(slot, 16 * mib);
    ASSERT_TRUE(b) << b.error().describe();
    EXPECT_EQ((*b)->name(),
              "cuda:" +
                  std::to_string(slot % static_cast<std::uint32_t>(*count)));
    EXPECT_EQ((*b)->host_data(), nullptr);
  }
  EXPECT_TRUE(lines.empty());
}

TEST(backend_factory_test, host_memory_gets_no_tier_and_bad_sizes_are_refused) {
  auto host = engine::host_memory_backend::create(std::size_t{1} << 20);
  ASSERT_TRUE(host);
  std::vector<std::string> lines;
  auto make =
      host_tier_per_engine({std::size_t{1} << 20, std::size_t{1} << 20},
                           [&](std::string_view l) { lines.emplace_back(l); });
  auto tier = make(**host);
  ASSERT_TRUE(tier) << tier.error().describe();
  EXPECT_EQ(*tier, nullptr) << "a host arena needs no host tier";
  EXPECT_TRUE(lines.empty());
  auto zero = host_tier_per_engine({0, std::size_t{1} << 20})(**host);
  ASSERT_FALSE(zero);
  EXPECT_EQ(zero.error().code, errc::invalid_argument);
}

} // namespace
} // namespace kvfleet::cuda
