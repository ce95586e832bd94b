// The device's XXH3 (cuda/internal/xxh3.hpp), compiled for the host,
// against libxxhash, and the device checksum's two-level scheme against
// engine::block_checksum.
#include "cuda/internal/xxh3.hpp"
#include "engine/block_key.hpp"
#include "engine/checksum.hpp"

#include <gtest/gtest.h>
#include <xxhash.h>

#include <random>
#include <vector>

namespace kvfleet::cuda::internal {
namespace {

std::vector<std::uint8_t> random_bytes(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::uint8_t> v(n);
  for (auto& b : v)
    b = static_cast<std::uint8_t>(rng() & 0xffU);
  return v;
}

TEST(xxh3_test, matches_libxxhash_for_every_length_up_to_5000) {
  const auto data = random_bytes(5000 + 8, 1);
  for (const std::uint64_t seed :
       {engine::hash_seed, std::uint64_t{0}, std::uint64_t{0x123456789}}) {
    std::uint8_t ds[xxh3_secret_bytes];
    xxh3_derive_secret(ds, xxh3_default_secret, seed);
    for (std::size_t len = 0; len <= 5000; ++len) {
      // An odd start checks the unaligned reads too.
      const std::uint8_t* p = data.data() + (len % 3);
      ASSERT_EQ(xxh3_64(p, len, seed, xxh3_default_secret, ds),
                XXH3_64bits_withSeed(p, len, seed))
          << "length " << len << " seed " << seed;
    }
  }
}

TEST(xxh3_test, the_two_level_checksum_matches_the_engine) {
  std::uint8_t ds[xxh3_secret_bytes];
  xxh3_derive_secret(ds, xxh3_default_secret, engine::hash_seed);
  for (const std::size_t n :
       {0UL, 1UL, 4095UL, 4096UL, 4097UL, 32768UL, 262144UL + 100UL}) {
    const auto data = random_bytes(n, static_cast<std::uint32_t>(n));
    std::vector<std::uint8_t> hashes;
    for (std::size_t off = 0; off < n; off += engine::checksum_chunk_bytes) {
      const std::size_t len = std::min(engine::checksum_chunk_bytes, n - off);
      std::uint8_t h[8];
      xxh_write64(h, xxh3_64(data.data() + off, len, engine::hash_seed,
                             xxh3_default_secret, ds));
      hashes.insert(hashes.end(), h, h + 8);
    }
    const std::uint64_t got =
        xxh3_64(hashes.data(), hashes.size(), engine::hash_seed,
                xxh3_default_secret, ds);
    EXPECT_EQ(got, engine::block_checksum(
                       {reinterpret_cast<const std::byte*>(data.data()), n}))
        << n << " bytes";
  }
}

} // namespace
} // namespace kvfleet::cuda::internal
