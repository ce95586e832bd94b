// NCCL on one GPU: one rank sends a batch of blocks to itself.
#include "cuda/nccl_transport.hpp"
#include "cuda/internal/device_buffer.hpp"
#include "cuda/internal/test_support.hpp"

#include <random>

namespace kvfleet::cuda {
namespace {

TEST(nccl_transport_test, one_rank_sends_a_batch_of_blocks_to_itself) {
  KVFLEET_REQUIRE_DEVICE();
  auto lib = nccl_library::load();
  if (!lib) {
    if (testing::require_gpu())
      FAIL() << lib.error().describe();
    GTEST_SKIP() << "NCCL not loadable: " << lib.error().describe();
  }
  auto id = (*lib)->make_id();
  ASSERT_TRUE(id) << id.error().describe();
  auto t = nccl_transport::create(*lib, *id, 1, 0, 0);
  ASSERT_TRUE(t) << t.error().describe();
  constexpr std::size_t block = 32768;
  constexpr std::size_t n = 20;
  internal::device_buffer src(n * block);
  internal::device_buffer dst(n * block);
  std::vector<std::byte> h(n * block);
  std::mt19937 rng(8);
  for (auto& b : h)
    b = static_cast<std::byte>(rng() & 0xffU);
  src.upload(h);
  dst.fill(0);
  std::vector<send_block> out;
  std::vector<recv_block> in;
  for (std::size_t i = 0; i < n; ++i) {
    out.push_back({src.data() + i * block, block});
    in.push_back({dst.data() + (n - 1 - i) * block, block});
  }
  auto r = (*t)->exchange(0, out, in);
  ASSERT_TRUE(r) << r.error().describe();
  const auto got = dst.download(0, n * block);
  for (std::size_t i = 0; i < n; ++i)
    ASSERT_EQ(0, std::memcmp(got.data() + (n - 1 - i) * block,
                             h.data() + i * block, block));
  EXPECT_EQ((*t)->exchange(1, out, in).error().code, errc::invalid_argument);
}

} // namespace
} // namespace kvfleet::cuda
