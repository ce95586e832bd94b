#include "cuda/host_tier.hpp"
#include "cuda/internal/device_buffer.hpp"
#include "cuda/internal/test_support.hpp"

#include <cuda_runtime.h>

#include <atomic>
#include <cstring>
#include <random>
#include <thread>

namespace kvfleet::cuda {
namespace {

TEST(host_tier_test, a_ticket_never_issued_is_an_invalid_handle) {
  KVFLEET_REQUIRE_DEVICE();
  auto tier =
      host_tier::create({0, std::size_t{1} << 20, std::size_t{1} << 20});
  ASSERT_TRUE(tier) << tier.error().describe();
  for (const copy_ticket t : {copy_ticket{0}, copy_ticket{1}}) {
    auto polled = (*tier)->poll(t);
    ASSERT_FALSE(polled) << t;
    EXPECT_EQ(polled.error().code, errc::invalid_handle);
    EXPECT_EQ((*tier)->wait(t).error().code, errc::invalid_handle);
  }
}

TEST(host_tier_test, blocks_demoted_to_pinned_memory_come_back_on_promotion) {
  KVFLEET_REQUIRE_DEVICE();
  auto tier =
      host_tier::create({0, std::size_t{16} << 20, std::size_t{8} << 20});
  ASSERT_TRUE(tier) << tier.error().describe();
  constexpr std::size_t block = 32768;
  constexpr std::size_t n = 40;
  internal::device_buffer pool(n * block);
  std::vector<std::byte> h(n * block);
  std::mt19937 rng(4);
  for (auto& b : h)
    b = static_cast<std::byte>(rng() & 0xffU);
  pool.upload(h);
  // Demote the odd slots (scattered), with one block of an odd size.
  std::vector<demote_job> jobs;
  std::vector<std::size_t> slots;
  for (std::size_t s = 1; s < n; s += 2) {
    jobs.push_back({pool.data() + s * block, s == 7 ? block - 100 : block});
    slots.push_back(s);
  }
  std::vector<host_block> placed;
  auto t = (*tier)->demote(jobs, placed);
  ASSERT_TRUE(t) << t.error().describe();
  ASSERT_TRUE((*tier)->wait(*t));
  ASSERT_EQ(placed.size(), jobs.size());
  for (std::size_t i = 0; i < placed.size(); ++i)
    ASSERT_EQ(0, std::memcmp((*tier)->host_data() + placed[i].offset,
                             h.data() + slots[i] * block, placed[i].bytes));
  // Promote them back, in reverse order, into a cleared pool.
  pool.fill(0);
  std::vector<promote_job> back;
  for (std::size_t i = placed.size(); i-- > 0;)
    back.push_back({placed[i], pool.data() + slots[i] * block});
  auto p = (*tier)->promote(back);
  ASSERT_TRUE(p) << p.error().describe();
  ASSERT_TRUE((*tier)->wait(*p));
  const auto got = pool.download(0, n * block);
  for (std::size_t i = 0; i < slots.size(); ++i)
    ASSERT_EQ(0, std::memcmp(got.data() + slots[i] * block,
                             h.data() + slots[i] * block, placed[i].bytes))
        << "slot " << slots[i];
  const std::size_t used = (*tier)->host_used();
  EXPECT_GT(used, 0U);
  for (const host_block& b : placed)
    (*tier)->release(b);
  EXPECT_EQ((*tier)->host_used(), 0U);
}

TEST(host_tier_test, a_full_host_arena_is_out_of_memory) {
  KVFLEET_REQUIRE_DEVICE();
  auto tier =
      host_tier::create({0, std::size_t{64} << 10, std::size_t{1} << 20});
  ASSERT_TRUE(tier);
  internal::device_buffer pool(std::size_t{128} << 10);
  const demote_job j{pool.data(), std::size_t{100} << 10};
  std::vector<host_block> placed;
  auto t = (*tier)->demote({&j, 1}, placed);
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error().code, errc::out_of_memory);
}

TEST(host_tier_test, full_staging_is_busy_before_a_full_host_arena) {
  KVFLEET_REQUIRE_DEVICE();
  // Holds the demote stream until released, so the first batch's staging
  // stays taken. Declared first, released (by `hold`) before the buffers
  // go: their destructors wait for the stream.
  std::atomic<bool> go{false};
  // 64 KiB of host arena, 64 KiB of staging per direction.
  auto tier =
      host_tier::create({0, std::size_t{64} << 10, std::size_t{128} << 10});
  ASSERT_TRUE(tier);
  internal::device_buffer pool(std::size_t{96} << 10);
  std::vector<host_block> placed;
  {
    // One demotion first: with lazy module loading (CUDA's default) the
    // first launch of the gather kernel waits for the device, which the
    // held stream below would never let go of.
    const demote_job warm{pool.data(), 4096};
    auto w = (*tier)->demote({&warm, 1}, placed);
    ASSERT_TRUE(w) << w.error().describe();
    ASSERT_TRUE((*tier)->wait(*w));
    (*tier)->release(placed[0]);
  }
  auto* s = static_cast<cudaStream_t>((*tier)->demote_stream().handle);
  ASSERT_EQ(cudaLaunchHostFunc(
                s,
                [](void* flag) {
                  while (!static_cast<std::atomic<bool>*>(flag)->load())
                    std::this_thread::yield();
                },
                &go),
            cudaSuccess);
  struct release_on_exit {
    std::atomic<bool>& flag;
    ~release_on_exit() { flag = true; }
  } hold{go};
  const demote_job first{pool.data(), std::size_t{48} << 10};
  auto t = (*tier)->demote({&first, 1}, placed);
  ASSERT_TRUE(t) << t.error().describe();
  // Neither the host arena (16 KiB left) nor the staging (16 KiB left)
  // has room for a second 48 KiB batch. Busy comes first: out_of_memory
  // makes the store drop tier blocks, for a batch that would still be
  // refused.
  const demote_job second{pool.data() + (std::size_t{48} << 10),
                          std::size_t{48} << 10};
  std::vector<host_block> more;
  auto b = (*tier)->demote({&second, 1}, more);
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, errc::busy) << b.error().describe();
  EXPECT_EQ((*tier)->host_used(), std::size_t{48} << 10);
  go = true;
  ASSERT_TRUE((*tier)->wait(*t));
  // Staging free, host arena still full: now out_of_memory, and the
  // refused batch left the staging free for the next one.
  b = (*tier)->demote({&second, 1}, more);
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, errc::out_of_memory) << b.error().describe();
  (*tier)->release(placed[0]);
  b = (*tier)->demote({&second, 1}, more);
  ASSERT_TRUE(b) << b.error().describe();
  ASSERT_TRUE((*tier)->wait(*b));
  (*tier)->release(more[0]);
  EXPECT_EQ((*tier)->host_used(), 0U);
}

TEST(host_tier_test, an_empty_demotion_takes_nothing_even_from_a_full_arena) {
  KVFLEET_REQUIRE_DEVICE();
  auto tier =
      host_tier::create({0, std::size_t{64} << 10, std::size_t{1} << 20});
  ASSERT_TRUE(tier);
  internal::device_buffer pool(std::size_t{64} << 10);
  const demote_job all{pool.data(), std::size_t{64} << 10};
  std::vector<host_block> placed;
  auto t = (*tier)->demote({&all, 1}, placed);
  ASSERT_TRUE(t) << t.error().describe();
  ASSERT_EQ(placed.size(), 1U);
  // The arena is full; an empty batch needs none of it (it used to take
  // an extent of no blocks, which nothing ever released, or fail here).
  std::vector<host_block> none{{1, 2, 3}};
  auto e = (*tier)->demote({}, none);
  ASSERT_TRUE(e) << e.error().describe();
  EXPECT_TRUE(none.empty());
  EXPECT_GT(*e, *t);
  ASSERT_TRUE((*tier)->wait(*e));
  auto done = (*tier)->poll(*t); // stream order: the earlier batch too
  ASSERT_TRUE(done);
  EXPECT_TRUE(*done);
  (*tier)->release(placed[0]);
  EXPECT_EQ((*tier)->host_used(), 0U);
}

TEST(host_tier_test, sizes_near_2_64_are_refused_before_any_copy) {
  KVFLEET_REQUIRE_DEVICE();
  auto tier =
      host_tier::create({0, std::size_t{1} << 20, std::size_t{1} << 20});
  ASSERT_TRUE(tier);
  internal::device_buffer pool(4096);
  // Rounded up to the extent alignment, this size wrapped to 0 and passed.
  const demote_job huge{pool.data(), SIZE_MAX - 200};
  std::vector<host_block> placed;
  auto d = (*tier)->demote({&huge, 1}, placed);
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().code, errc::value_too_large);
  // offset + bytes wrapped below the arena's size.
  const promote_job wrapped{{SIZE_MAX - 1000, 2048, 0}, pool.data()};
  auto p = (*tier)->promote({&wrapped, 1});
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, errc::invalid_argument);
  // Nothing was taken: a real batch still goes through.
  const demote_job ok{pool.data(), 4096};
  auto t = (*tier)->demote({&ok, 1}, placed);
  ASSERT_TRUE(t) << t.error().describe();
  ASSERT_TRUE((*tier)->wait(*t));
  (*tier)->release(placed[0]);
  EXPECT_EQ((*tier)->host_used(), 0U);
  EXPECT_EQ(host_tier::create({0, 100, std::size_t{1} << 20}).error().code,
            errc::zero_capacity);
}

} // namespace
} // namespace kvfleet::cuda
