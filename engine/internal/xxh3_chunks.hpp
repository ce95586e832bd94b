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

} // namespace kvfleet::engine::internal
