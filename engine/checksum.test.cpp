#include "engine/checksum.hpp"

#include "engine/block_key.hpp"
#include "engine/internal/xxh3_chunks.hpp"

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <span>
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

TEST(checksum, the_fused_avx2_copy_copies_and_hashes_like_xxh3) {
  if (!__builtin_cpu_supports("avx2"))
    GTEST_SKIP() << "this CPU has no AVX2";
  const auto src = random_bytes(70000, 3);
  std::vector<std::byte> out(70000);
  // Around XXH3's thresholds (240: long inputs; 1024: one block of 16
  // stripes; 64: a stripe), odd sizes, and both alignments.
  for (std::size_t n :
       {1UL, 17UL, 240UL, 241UL, 255UL, 256UL, 1023UL, 1024UL, 1025UL, 1088UL,
        4095UL, 4096UL, 4097UL, 65536UL, 66001UL}) {
    for (std::size_t shift : {0UL, 3UL, 16UL}) {
      for (std::uint64_t seed : {std::uint64_t{0}, hash_seed}) {
        std::fill(out.begin(), out.end(), std::byte{0xee});
        const auto* from = src.data() + shift;
        auto* to = out.data() + 1 + shift;
        EXPECT_EQ(internal::xxh3_avx2_copy(to, from, n, seed),
                  XXH3_64bits_withSeed(from, n, seed))
            << n << " bytes, shift " << shift << ", seed " << seed;
        EXPECT_EQ(std::memcmp(to, from, n), 0) << n;
        EXPECT_EQ(out[shift], std::byte{0xee}) << "wrote before dst";
        EXPECT_EQ(to[n], std::byte{0xee}) << "wrote past dst";
      }
    }
  }
}

TEST(checksum, copy_out_checks_any_size_and_alignment) {
  const auto src = random_bytes(262144 + 4096 + 200, 4);
  std::vector<std::byte> out(src.size() + 64);
  for (std::size_t n : {0UL, 100UL, 4096UL, 4096UL * 3 + 100, 262144UL + 7}) {
    for (std::size_t shift : {0UL, 16UL, 33UL}) {
      const std::span<const std::byte> from(src.data() + shift, n);
      const std::span<std::byte> to(out.data() + (shift + 5) % 64, n);
      EXPECT_EQ(copy_out_with_checksum(to, from), block_checksum(from))
          << n << " bytes, shift " << shift;
      EXPECT_TRUE(std::equal(from.begin(), from.end(), to.begin())) << n;
    }
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
