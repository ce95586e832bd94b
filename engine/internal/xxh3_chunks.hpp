#pragma once
// Chunk hashing for checksum.cpp, built per instruction set (generic SSE2,
// AVX2, AVX-512). The hash values are identical; only the speed differs.

#include <cstddef>
#include <cstdint>

namespace kvfleet::engine::internal {

using chunk_hash_fn = std::uint64_t (*)(const void* data, std::size_t len,
                                        std::uint64_t seed);

std::uint64_t xxh3_generic(const void* data, std::size_t len,
                           std::uint64_t seed);
std::uint64_t xxh3_avx2(const void* data, std::size_t len, std::uint64_t seed);
std::uint64_t xxh3_avx512(const void* data, std::size_t len,
                          std::uint64_t seed);

/// Copies `len` bytes from `src` to `dst` (no overlap) and returns their
/// XXH3-64 with `seed`, the same value as xxh3_avx2(src, len, seed). Above
/// 240 bytes each 64-byte stripe is loaded once, stored to `dst` and hashed
/// from the same registers (XXH3's long-input loop, written out with a
/// store added); shorter inputs are copied and then hashed. AVX2 only.
std::uint64_t xxh3_avx2_copy(void* dst, const void* src, std::size_t len,
                             std::uint64_t seed);

} // namespace kvfleet::engine::internal
