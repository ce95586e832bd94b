#include "engine/checksum.hpp"

#include "engine/block_key.hpp"
#include "engine/internal/xxh3_chunks.hpp"

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace kvfleet::engine {
namespace {

std::vector<std::byte> random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v)
    b = static_cast<std::byte>(rng());
  return v;
}

// The documented definition, written out independently of checksum.cpp.
std::uint64_t reference(const std::vector<std::byte>& data) {
  std::vector<unsigned char> hashes;
  for (std::size_t off = 0; off < data.size(); off += checksum_chunk_bytes) {
    const std::size_t n = std::min(checksum_chunk_bytes, data.size() - off);
    const std::uint64_t h =
        XXH3_64bits_withSeed(data.data() + off, n, hash_seed);
    for (int i = 0; i < 8; ++i)
      hashes.push_back(static_cast<unsigned char>(h >> (8 * i)));
  }
  return XXH3_64bits_withSeed(hashes.data(), hashes.size(), hash_seed);
}

TEST(checksum, matches_the_documented_definition_for_all_sizes) {
  for (std::size_t n : {0UL, 1UL, 100UL, 4096UL, 4097UL, 65536UL,
                        262144UL + 3UL, std::size_t{4096} * 130}) {
    const auto data = random_bytes(n, static_cast<unsigned>(n));
    EXPECT_EQ(block_checksum(data), reference(data)) << n;
  }
}

TEST(checksum, every_instruction_set_gives_the_same_hash) {
  const auto data = random_bytes(8192, 5);
  const auto expect = XXH3_64bits_withSeed(data.data(), data.size(), hash_seed);
  EXPECT_EQ(internal::xxh3_generic(data.data(), data.size(), hash_seed),
            expect);
  if (__builtin_cpu_supports("avx2")) {
    EXPECT_EQ(internal::xxh3_avx2(data.data(), data.size(), hash_seed), expect);
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
    EXPECT_EQ(internal::xxh3_avx512(data.data(), data.size(), hash_seed),
              expect);
  }
}

TEST(checksum, fused_copies_copy_and_hash) {
  for (std::size_t n : {10UL, 4096UL, 100000UL, 262144UL}) {
    const auto src = random_bytes(n, 9);
    std::vector<std::byte> in(n);
    std::vector<std::byte> out(n);
    EXPECT_EQ(copy_in_with_checksum(in, src), block_checksum(src));
    EXPECT_EQ(in, src);
    EXPECT_EQ(copy_out_with_checksum(out, in), block_checksum(src));
    EXPECT_EQ(out, src);
  }
}

TEST(checksum, detects_a_flipped_bit) {
  auto data = random_bytes(262144, 1);
  const auto before = block_checksum(data);
  data[123456] ^= std::byte{0x01};
  EXPECT_NE(block_checksum(data), before);
}

} // namespace
} // namespace kvfleet::engine
