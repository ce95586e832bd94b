// Start-up without a usable GPU: the device backend's creation fails with an
// error value and create_memory_backend falls back to host memory with one
// log line. With a GPU, the device backend is used and nothing is logged.
#include "cuda/device_backend.hpp"
#include "cuda/backend_factory.hpp"
#include "cuda/device.hpp"
#include "engine/block_store.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kvfleet::cuda {
namespace {

TEST(device_backend_test, zero_bytes_is_an_error_value) {
  auto b = device_memory_backend::create(0);
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, errc::zero_capacity);
  std::vector<std::string> lines;
  auto any = create_memory_backend(
      0, 0, [&](std::string_view l) { lines.emplace_back(l); });
  ASSERT_FALSE(any);
  EXPECT_TRUE(lines.empty());
}

TEST(device_backend_test,
     start_up_falls_back_to_host_memory_with_one_log_line) {
  const bool have_gpu = static_cast<bool>(device_count());
  // Without a GPU any size fails on the device; with one, an impossible
  // size (1 PiB) does.
  const std::size_t bytes =
      have_gpu ? (std::size_t{1} << 50) : (std::size_t{8} << 20);
  if (have_gpu)
    GTEST_SKIP()
        << "a GPU is present: the 1 PiB case would map 1 PiB of host memory";
  auto dev = device_memory_backend::create(bytes);
  ASSERT_FALSE(dev);
  EXPECT_NE(dev.error().message.find("cuda"), std::string::npos)
      << dev.error().message;

  std::vector<std::string> lines;
  auto backend = create_memory_backend(
      bytes, 0, [&](std::string_view l) { lines.emplace_back(l); });
  ASSERT_TRUE(backend) << backend.error().describe();
  EXPECT_EQ((*backend)->name(), "host");
  EXPECT_EQ((*backend)->size(), bytes);
  ASSERT_EQ(lines.size(), 1U);
  EXPECT_NE(lines[0].find("no device memory for the block pool"),
            std::string::npos)
      << lines[0];
  EXPECT_NE(lines[0].find("host memory instead"), std::string::npos)
      << lines[0];

  // And the engine runs on it.
  engine::store_config cfg;
  auto store = engine::block_store::create(cfg, std::move(*backend));
  ASSERT_TRUE(store) << store.error().describe();
  (*store)->check_invariants();
}

TEST(device_backend_test, a_gpu_gives_the_device_backend_without_a_log_line) {
  if (!device_count())
    GTEST_SKIP() << "no CUDA device: " << device_count().error().describe();
  std::vector<std::string> lines;
  auto backend =
      create_memory_backend(std::size_t{64} << 20, 0,
                            [&](std::string_view l) { lines.emplace_back(l); });
  ASSERT_TRUE(backend) << backend.error().describe();
  EXPECT_EQ((*backend)->name(), "cuda:0");
  EXPECT_EQ((*backend)->host_data(), nullptr);
  EXPECT_TRUE(lines.empty());
}

} // namespace
} // namespace kvfleet::cuda
