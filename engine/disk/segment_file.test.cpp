#include "engine/disk/segment_file.hpp"

#include "engine/checksum.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <unistd.h>

namespace kvfleet::engine {
namespace {

class segment_file_test : public ::testing::Test {
protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kvfleet-segment-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  record_header header(std::uint64_t i, std::span<const std::byte> payload) {
    record_header h;
    h.c = codec::int8;
    h.size = payload.size();
    h.key = block_key{i, i + 100};
    h.ns = ns_fingerprint{1, 2};
    h.checksum = block_checksum(payload);
    return h;
  }

  static std::vector<std::byte> payload(std::size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::vector<std::byte> v(n);
    for (auto& b : v)
      b = static_cast<std::byte>(rng());
    return v;
  }

  std::string dir_;
};

TEST_F(segment_file_test, mapped_reads_return_what_was_appended) {
  auto seg = segment_file::create(dir_, 1);
  ASSERT_TRUE(seg.has_value()) << seg.error().describe();
  std::vector<std::uint64_t> offsets;
  for (unsigned i = 0; i < 20; ++i) {
    const auto p = payload(1000 + 37 * i, i);
    auto off = seg->append(header(i, p), p, {}, nullptr);
    ASSERT_TRUE(off.has_value());
    offsets.push_back(*off);
    // Read every record so far: the mapping grows with the file.
    for (unsigned j = 0; j <= i; ++j) {
      const auto want = payload(1000 + 37 * j, j);
      std::vector<std::byte> got(want.size());
      auto h = seg->read(offsets[j], block_key{j, j + 100}, got);
      ASSERT_TRUE(h.has_value()) << h.error().describe();
      EXPECT_EQ(got, want);
    }
  }
  // Asking for the wrong key or size is a mismatch, never another block.
  std::vector<std::byte> got(1000);
  EXPECT_EQ(seg->read(offsets[0], block_key{5, 105}, got).error().code,
            errc::checksum_mismatch);
  std::vector<std::byte> wrong_size(999);
  EXPECT_EQ(seg->read(offsets[0], block_key{0, 100}, wrong_size).error().code,
            errc::checksum_mismatch);
}

TEST_F(segment_file_test, an_io_error_under_the_mapping_is_an_error_value) {
  auto seg = segment_file::create(dir_, 1);
  ASSERT_TRUE(seg.has_value());
  const auto p = payload(64 * 1024, 3);
  auto off = seg->append(header(1, p), p, {}, nullptr);
  ASSERT_TRUE(off.has_value());
  std::vector<std::byte> got(p.size());
  ASSERT_TRUE(seg->read(*off, block_key{1, 101}, got).has_value());
  // Cut the file behind the segment's back: touching the mapped pages past
  // the new end raises SIGBUS, exactly as a failing disk would.
  ASSERT_EQ(::truncate(seg->path().c_str(), 4096), 0);
  auto r = seg->read(*off, block_key{1, 101}, got);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, errc::io_error);
  EXPECT_EQ(got, std::vector<std::byte>(p.size())); // nothing half-copied
  // The same without the checksum (a promotion's read, verified on use):
  // a plain copy, around which the handler's jump was not armed in an
  // optimised build (the process died of the SIGBUS).
  auto unverified = seg->read(*off, block_key{1, 101}, got, false);
  ASSERT_FALSE(unverified.has_value());
  EXPECT_EQ(unverified.error().code, errc::io_error);
  // The process and the thread go on: a fresh segment still works.
  auto seg2 = segment_file::create(dir_, 2);
  ASSERT_TRUE(seg2.has_value());
  auto off2 = seg2->append(header(2, p), p, {}, nullptr);
  ASSERT_TRUE(off2.has_value());
  ASSERT_TRUE(seg2->read(*off2, block_key{2, 102}, got).has_value());
  EXPECT_EQ(got, p);
}

TEST_F(segment_file_test, sync_directory_syncs_or_names_the_directory) {
  EXPECT_TRUE(sync_directory(dir_).has_value());
  const std::string missing = dir_ + "/nope";
  auto r = sync_directory(missing);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, errc::io_error);
  EXPECT_NE(r.error().message.find(missing), std::string::npos)
      << r.error().message;
}

} // namespace
} // namespace kvfleet::engine
