// The checks every kernel call runs before launching; none of these calls
// reaches the GPU, so they run without one.
#include "cuda/internal/offset_scan.hpp"
#include "cuda/internal/staging_ring.hpp"
#include "cuda/kernels.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <vector>

namespace kvfleet::cuda {
namespace {

using engine::codec;
using engine::dtype;

// Fake device addresses: validation never dereferences them.
std::byte* fake(std::uintptr_t a) {
  return reinterpret_cast<std::byte*>(a);
}

constexpr std::size_t elements = 4096;

codec_job good_encode(codec c) {
  return {fake(0x10000), 2 * elements, fake(0x100000),
          engine::encoded_size(c, elements)};
}

TEST(kernel_validation_test, a_good_batch_passes) {
  for (codec c : {codec::none, codec::fp8, codec::int8, codec::int4}) {
    const codec_job enc = good_encode(c);
    EXPECT_TRUE(
        validate::codec_batch(c, dtype::fp16, elements, {&enc, 1}, true));
    const codec_job dec{enc.dst, enc.dst_bytes, fake(0x10000), 2 * elements};
    EXPECT_TRUE(
        validate::codec_batch(c, dtype::bf16, elements, {&dec, 1}, false));
  }
}

TEST(kernel_validation_test,
     an_unknown_codec_or_dtype_is_refused_before_launch) {
  const codec_job j = good_encode(codec::int8);
  auto r = encode_blocks(static_cast<codec>(9), dtype::fp16, elements, {&j, 1});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::unknown_codec);
  auto d = decode_blocks(codec::int8, static_cast<dtype>(7), elements, {&j, 1});
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().code, errc::invalid_argument);
}

TEST(kernel_validation_test,
     a_block_of_the_wrong_size_is_refused_before_launch) {
  codec_job j = good_encode(codec::int4);
  j.src_bytes -= 2; // one element short
  auto r = encode_blocks(codec::int4, dtype::fp16, elements, {&j, 1});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::wrong_value_size);
  EXPECT_NE(r.error().message.find("block 0"), std::string::npos)
      << r.error().message;

  j = good_encode(codec::int4);
  j.dst_bytes -= 1; // destination too small
  r = encode_blocks(codec::int4, dtype::fp16, elements, {&j, 1});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::wrong_value_size);

  // Decoding int8 bytes as int4: the source size gives it away.
  const codec_job as8 = good_encode(codec::int8);
  const codec_job dec{as8.dst, as8.dst_bytes, fake(0x10000), 2 * elements};
  r = decode_blocks(codec::int4, dtype::fp16, elements, {&dec, 1});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::wrong_value_size);

  // Not a whole number of groups.
  r = encode_blocks(codec::int8, dtype::fp16, 100, {&j, 1});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::wrong_value_size);
}

TEST(kernel_validation_test, an_element_count_whose_size_wraps_is_refused) {
  // 2^63 elements are 2^64 bytes of fp16: computed in 64 bits that is 0,
  // and so is the size of the same block under codec::none. A batch that
  // claims 0-byte buffers for it must not pass as a copy of nothing.
  const std::size_t huge = std::size_t{1} << 63;
  const codec_job j{fake(0x10000), 0, fake(0x100000), 0};
  for (const bool encode : {true, false}) {
    auto r =
        validate::codec_batch(codec::none, dtype::fp16, huge, {&j, 1}, encode);
    ASSERT_FALSE(r) << encode;
    EXPECT_EQ(r.error().code, errc::value_too_large);
  }
  auto r = encode_blocks(codec::none, dtype::fp16, huge, {&j, 1});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::value_too_large);
  // The largest count whose sizes fit is judged on the sizes as usual.
  const std::size_t most = std::numeric_limits<std::size_t>::max() / 2 /
                           engine::codec_group_size * engine::codec_group_size;
  r = validate::codec_batch(codec::int8, dtype::fp16, most, {&j, 1}, true);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::wrong_value_size);
}

TEST(kernel_validation_test,
     null_misaligned_and_overlapping_blocks_are_refused) {
  codec_job j = good_encode(codec::fp8);
  j.src = nullptr;
  EXPECT_EQ(
      encode_blocks(codec::fp8, dtype::fp16, elements, {&j, 1}).error().code,
      errc::invalid_argument);
  j = good_encode(codec::fp8);
  j.src = fake(0x10008); // fp16 side needs 16 bytes
  EXPECT_EQ(
      encode_blocks(codec::fp8, dtype::fp16, elements, {&j, 1}).error().code,
      errc::invalid_argument);
  j = good_encode(codec::fp8);
  j.dst = fake(0x10002); // scales need 4 bytes, and it overlaps the source
  EXPECT_FALSE(encode_blocks(codec::fp8, dtype::fp16, elements, {&j, 1}));
  j = good_encode(codec::fp8);
  j.dst = fake(0x10000 + 1024);
  EXPECT_EQ(
      encode_blocks(codec::fp8, dtype::fp16, elements, {&j, 1}).error().code,
      errc::invalid_argument);
}

TEST(kernel_validation_test,
     a_bad_job_anywhere_in_the_batch_refuses_the_batch) {
  std::vector<codec_job> jobs;
  for (std::uintptr_t i = 0; i < 5; ++i)
    jobs.push_back({fake(0x1000000 * (i + 1)), 2 * elements,
                    fake(0x1000000 * (i + 1) + 0x100000),
                    engine::encoded_size(codec::int8, elements)});
  EXPECT_TRUE(
      validate::codec_batch(codec::int8, dtype::fp16, elements, jobs, true));
  jobs[3].src_bytes = 2 * elements + 128;
  auto r = encode_blocks(codec::int8, dtype::fp16, elements, jobs);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("block 3"), std::string::npos)
      << r.error().message;
}

TEST(kernel_validation_test, gather_and_scatter_check_every_range) {
  const device_span pool{fake(0x100000), 1 << 20};
  const device_span out{fake(0x1000000), 4 * 32768};
  std::vector<std::size_t> offsets{0, 65536, 32768, (1 << 20) - 32768};
  EXPECT_TRUE(validate::gather_batch(pool, offsets, 32768, out));
  offsets.push_back(0);
  auto r =
      gather_blocks(pool, offsets, 32768, out); // five blocks, room for four
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::wrong_value_size);
  offsets = {(1 << 20) - 32767};
  r = scatter_blocks(out, offsets, 32768, pool);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::invalid_argument);
  EXPECT_FALSE(gather_blocks(pool, {}, 0, out));
  // The message names the first block out of range; an offset near
  // SIZE_MAX does not wrap around into range.
  offsets = {0, 32768, SIZE_MAX - 100, (1 << 20) - 32768 + 1};
  r = validate::gather_batch(pool, offsets, 32768, out);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("block 2 "), std::string::npos)
      << r.error().message;
  // A block larger than the whole pool fits nowhere.
  const device_span big_out{fake(0x10000000), 4 << 20};
  offsets = {0};
  r = validate::gather_batch(pool, offsets, 2 << 20, big_out);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::invalid_argument);
}

TEST(kernel_validation_test, the_offset_scan_finds_every_offset_past_the_end) {
  using internal::scan_offsets;
  const std::size_t last = 1000;
  EXPECT_FALSE(scan_offsets({}, last).past_end);
  const std::vector<std::size_t> ok{0, 16, 1000, 512};
  const auto s = scan_offsets(ok, last);
  EXPECT_FALSE(s.past_end);
  EXPECT_EQ(s.any_bits, std::size_t{0 | 16 | 1000 | 512});
  for (const std::size_t bad :
       {std::size_t{1001}, std::size_t{1} << 40, std::size_t{1} << 63,
        (std::size_t{1} << 63) + 1000, SIZE_MAX}) {
    std::vector<std::size_t> v = ok;
    v.insert(v.begin() + 2, bad);
    EXPECT_TRUE(scan_offsets(v, last).past_end) << bad;
  }
  EXPECT_EQ(internal::last_offset(4096, 1024), 3072U);
  EXPECT_EQ(internal::last_offset(1024, 4096), 0U);
}

TEST(kernel_validation_test, copies_and_checksums_refuse_bad_arguments) {
  const copy_job overlap{fake(0x1000), fake(0x1800), 4096};
  EXPECT_EQ(copy_blocks({&overlap, 1}).error().code, errc::invalid_argument);
  const copy_job null_src{nullptr, fake(0x1000), 16};
  EXPECT_FALSE(copy_blocks({&null_src, 1}));
  const checksum_job huge{fake(0x1000), max_checksum_block_bytes + 1};
  std::uint64_t* out = reinterpret_cast<std::uint64_t*>(fake(0x8000));
  EXPECT_EQ(checksum_blocks({&huge, 1}, out).error().code,
            errc::value_too_large);
  const checksum_job ok{fake(0x1000), 4096};
  EXPECT_EQ(checksum_blocks({&ok, 1}, nullptr).error().code,
            errc::invalid_argument);
}

TEST(staging_ring_test, regions_are_reused_in_order_and_wrap) {
  internal::staging_ring ring(4096);
  auto a = ring.acquire(1000); // 1024
  auto b = ring.acquire(2048);
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->offset, 0U);
  EXPECT_EQ(b->offset, 1024U);
  EXPECT_FALSE(ring.acquire(2048)); // only 1024 left at the end
  ring.release(*a);
  auto c = ring.acquire(1024); // fits at the end
  ASSERT_TRUE(c);
  EXPECT_EQ(c->offset, 3072U);
  auto d = ring.acquire(1024); // wraps to the freed start
  ASSERT_TRUE(d);
  EXPECT_EQ(d->offset, 0U);
  EXPECT_FALSE(ring.acquire(256));
  ring.release(*b);
  ring.release(*c);
  ring.release(*d);
  EXPECT_EQ(ring.used(), 0U);
  EXPECT_FALSE(ring.acquire(8192));
  // Sizes near 2^64 do not round up past zero into an empty region.
  EXPECT_FALSE(ring.acquire(SIZE_MAX));
  EXPECT_FALSE(ring.acquire(SIZE_MAX - 200));
  auto e = ring.acquire(4096);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->offset, 0U);
}

TEST(staging_ring_test, a_wrap_that_skips_the_end_accounts_for_it) {
  internal::staging_ring ring(4096);
  auto a = ring.acquire(3072);
  ring.release(*a);
  auto b = ring.acquire(2048); // empty ring resets to the start
  ASSERT_TRUE(b);
  EXPECT_EQ(b->offset, 0U);
  auto c = ring.acquire(1536); // 1536 at 2048
  ASSERT_TRUE(c);
  ring.release(*b);
  auto d = ring.acquire(1024); // 512 left at the end: wraps, skipping it
  ASSERT_TRUE(d);
  EXPECT_EQ(d->offset, 0U);
  EXPECT_EQ(d->bytes, 1024U + 512U);
  ring.release(*c);
  ring.release(*d);
  EXPECT_EQ(ring.used(), 0U);
}

TEST(staging_ring_test, empty_regions_never_hide_the_oldest_live_one) {
  // An empty batch (copy_engine::to_device({}), host_tier::promote({}))
  // takes a region of 0 bytes. Released in order with the others, it must
  // not leave the ring thinking its oldest data starts where the empty
  // region was.
  internal::staging_ring ring(4096);
  auto a = ring.acquire(1024);
  auto z1 = ring.acquire(0);
  auto z2 = ring.acquire(0);
  ASSERT_TRUE(a && z1 && z2);
  EXPECT_EQ(z1->bytes, 0U);
  ring.release(*a);
  auto b = ring.acquire(3584);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->offset, 0U);
  ring.release(*z1);
  // 512 bytes free at the end, none at the start (b holds it).
  auto c = ring.acquire(1024);
  if (c) {
    EXPECT_GE(c->offset, b->offset + b->bytes)
        << "region at " << c->offset << " overlaps b";
  }
  EXPECT_FALSE(c);
  ring.release(*z2);
  auto z3 = ring.acquire(0);
  ASSERT_TRUE(z3);
  EXPECT_TRUE(ring.give_back(*z3)); // an empty region gives back nothing
  EXPECT_EQ(ring.used(), 3584U);
  ring.release(*b);
  EXPECT_EQ(ring.used(), 0U);
  EXPECT_TRUE(ring.acquire(4096));
}

TEST(staging_ring_test, the_newest_region_of_a_failed_batch_can_be_given_back) {
  internal::staging_ring ring(4096);
  auto a = ring.acquire(1024);
  auto b = ring.acquire(2048);
  ASSERT_TRUE(a && b);
  EXPECT_FALSE(ring.give_back(*a)); // not the newest: nothing changes
  EXPECT_EQ(ring.used(), 3072U);
  EXPECT_TRUE(ring.give_back(*b));
  EXPECT_EQ(ring.used(), 1024U);
  auto c = ring.acquire(3072); // b's place is free again
  ASSERT_TRUE(c);
  EXPECT_EQ(c->offset, 1024U);
  ring.release(*a);
  // A region that wrapped round to the start.
  auto d = ring.acquire(512); // 1024 free at the start only
  ASSERT_TRUE(d);
  EXPECT_EQ(d->offset, 0U);
  EXPECT_TRUE(ring.give_back(*d));
  EXPECT_EQ(ring.used(), 3072U);
  ring.release(*c);
  EXPECT_EQ(ring.used(), 0U);
  // Every give-back and release leaves a ring that fills to capacity.
  auto e = ring.acquire(4096);
  ASSERT_TRUE(e);
  EXPECT_TRUE(ring.give_back(*e));
  EXPECT_TRUE(ring.acquire(4096));
}

} // namespace
} // namespace kvfleet::cuda
