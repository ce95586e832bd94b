// NCCL on one GPU: one rank sends a batch of blocks to itself; a rank that
// never joins and a receive that no send answers are bounded by the
// transport's timeouts.
#include "cuda/nccl_transport.hpp"
#include "cuda/internal/device_buffer.hpp"
#include "cuda/internal/test_support.hpp"

#include <chrono>
#include <random>

namespace kvfleet::cuda {
namespace {

using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

/// NCCL, or why the test is skipped (a failure with KVFLEET_REQUIRE_GPU=1).
#define KVFLEET_LOAD_NCCL(lib)                                                 \
  auto lib = nccl_library::load();                                             \
  if (!lib) {                                                                  \
    if (testing::require_gpu())                                                \
      FAIL() << lib.error().describe();                                        \
    GTEST_SKIP() << "NCCL not loadable: " << lib.error().describe();           \
  }

TEST(nccl_transport_test, one_rank_sends_a_batch_of_blocks_to_itself) {
  KVFLEET_REQUIRE_DEVICE();
  KVFLEET_LOAD_NCCL(lib);
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

TEST(nccl_transport_test, timeouts_out_of_range_are_refused) {
  KVFLEET_REQUIRE_DEVICE();
  KVFLEET_LOAD_NCCL(lib);
  auto id = (*lib)->make_id();
  ASSERT_TRUE(id) << id.error().describe();
  for (const nccl_timeouts t : {nccl_timeouts{0ms, 1s}, nccl_timeouts{1s, 0ms},
                                nccl_timeouts{25h, 1s}}) {
    auto r = nccl_transport::create(*lib, *id, 1, 0, 0, t);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, errc::invalid_argument);
    EXPECT_NE(r.error().message.find("at most 24 h"), std::string::npos)
        << r.error().message;
  }
}

// Rank 0 of two, and rank 1 never comes: the join is a timeout after about
// the join timeout, not a thread held forever (before, ncclCommInitRank
// blocked until every rank had joined).
TEST(nccl_transport_test, a_rank_that_never_joins_is_a_timeout) {
  KVFLEET_REQUIRE_DEVICE();
  KVFLEET_LOAD_NCCL(lib);
  auto id = (*lib)->make_id();
  ASSERT_TRUE(id) << id.error().describe();
  const auto start = steady::now();
  auto t = nccl_transport::create(*lib, *id, 2, 0, 0, {1s, 1s});
  const auto took = steady::now() - start;
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error().code, errc::timeout) << t.error().describe();
  EXPECT_NE(t.error().message.find("not every rank joined"), std::string::npos)
      << t.error().message;
  EXPECT_NE(t.error().message.find("within 1000 ms"), std::string::npos)
      << t.error().message;
  EXPECT_GE(took, 1s);
  EXPECT_LT(took, 30s) << "the abort did not end the join";
}

// An exchange NCCL cannot finish: one rank receiving from itself with no
// send. NCCL 2.28 on an H100 refuses it at the group's end
// (ncclInvalidUsage, reported through the communicator); a build that
// queued it instead would leave the receive waiting, which the exchange
// timeout ends. Either way the call returns an error, the communicator is
// aborted, later exchanges are refused, and a new transport works (the
// abort left nothing behind on the device). Before, the exchange waited in
// cudaStreamSynchronize with no bound.
TEST(nccl_transport_test,
     an_exchange_nccl_cannot_finish_aborts_the_communicator) {
  KVFLEET_REQUIRE_DEVICE();
  KVFLEET_LOAD_NCCL(lib);
  auto id = (*lib)->make_id();
  ASSERT_TRUE(id) << id.error().describe();
  auto t = nccl_transport::create(*lib, *id, 1, 0, 0, {60s, 500ms});
  ASSERT_TRUE(t) << t.error().describe();
  constexpr std::size_t block = 4096;
  internal::device_buffer buf(2 * block);
  const recv_block lonely{buf.data(), block};
  const auto start = steady::now();
  auto r = (*t)->exchange(0, {}, {&lonely, 1});
  const auto took = steady::now() - start;
  ASSERT_FALSE(r);
  if (r.error().code == errc::timeout) {
    EXPECT_NE(r.error().message.find("not finished within 500 ms"),
              std::string::npos)
        << r.error().message;
    EXPECT_GE(took, 500ms);
  } else {
    EXPECT_EQ(r.error().code, errc::backend_error) << r.error().describe();
    EXPECT_NE(r.error().message.find("ncclGroupEnd"), std::string::npos)
        << r.error().message;
  }
  EXPECT_NE(r.error().message.find("the communicator was aborted"),
            std::string::npos)
      << r.error().message;
  EXPECT_LT(took, 30s);
  const send_block out{buf.data() + block, block};
  auto again = (*t)->exchange(0, {&out, 1}, {&lonely, 1});
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, errc::unavailable) << again.error().describe();

  auto id2 = (*lib)->make_id();
  ASSERT_TRUE(id2) << id2.error().describe();
  auto fresh = nccl_transport::create(*lib, *id2, 1, 0, 0, {60s, 30s});
  ASSERT_TRUE(fresh) << fresh.error().describe();
  std::vector<std::byte> h(block, std::byte{0x5a});
  buf.upload(h, block);
  auto ok = (*fresh)->exchange(0, {&out, 1}, {&lonely, 1});
  ASSERT_TRUE(ok) << ok.error().describe();
  EXPECT_EQ(buf.download(0, block), h);
}

// An exchange that runs past its timeout: 8 GiB sent to itself with an
// exchange timeout of 1 ms. At the 3.3 TB/s of an H100's memory (4.8 on
// an H200) the copy alone, 16 GiB read and written, takes about 5 ms (3.4
// on an H200), and NCCL's self-copy is slower than a plain copy. The
// deadline passes while NCCL's kernel is still copying: the exchange is a
// timeout, ncclCommAbort stops the kernel, later exchanges are refused,
// and a new transport works. Before, the exchange waited for the copy
// however long it took (cudaStreamSynchronize).
TEST(nccl_transport_test, an_exchange_past_its_timeout_is_aborted) {
  KVFLEET_REQUIRE_DEVICE();
  KVFLEET_LOAD_NCCL(lib);
  auto id = (*lib)->make_id();
  ASSERT_TRUE(id) << id.error().describe();
  auto t = nccl_transport::create(*lib, *id, 1, 0, 0, {60s, 1ms});
  ASSERT_TRUE(t) << t.error().describe();
  constexpr std::size_t block = std::size_t{256} << 20;
  constexpr std::size_t n = 32;
  internal::device_buffer src(n * block);
  internal::device_buffer dst(n * block);
  std::vector<send_block> out;
  std::vector<recv_block> in;
  for (std::size_t i = 0; i < n; ++i) {
    out.push_back({src.data() + i * block, block});
    in.push_back({dst.data() + i * block, block});
  }
  const auto start = steady::now();
  auto r = (*t)->exchange(0, out, in);
  const auto took = steady::now() - start;
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::timeout) << r.error().describe();
  EXPECT_NE(r.error().message.find("not finished within 1 ms; the "
                                   "communicator was aborted"),
            std::string::npos)
      << r.error().message;
  EXPECT_LT(took, 30s) << "the abort did not stop the copy";
  EXPECT_EQ((*t)->exchange(0, out, in).error().code, errc::unavailable);

  auto id2 = (*lib)->make_id();
  ASSERT_TRUE(id2) << id2.error().describe();
  auto fresh = nccl_transport::create(*lib, *id2, 1, 0, 0);
  ASSERT_TRUE(fresh) << fresh.error().describe();
  constexpr std::size_t small = 4096;
  std::vector<std::byte> h(small, std::byte{0x3c});
  src.upload(h);
  const send_block one_out{src.data(), small};
  const recv_block one_in{dst.data(), small};
  auto ok = (*fresh)->exchange(0, {&one_out, 1}, {&one_in, 1});
  ASSERT_TRUE(ok) << ok.error().describe();
  EXPECT_EQ(dst.download(0, small), h);
}

} // namespace
} // namespace kvfleet::cuda
