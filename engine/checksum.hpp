#pragma once
/// Block checksums.
///
/// A block's checksum is a two-level XXH3-64 (fixed seed): the value is cut
/// into chunks of `checksum_chunk_bytes` (the last may be shorter), each
/// chunk is hashed, and the checksum is the hash of the little-endian array
/// of chunk hashes. Chunks let a GPU hash a block in parallel and let the host
/// fuse hashing with a copy while a chunk is in L1. Pure functions; the
/// fastest XXH3 kernel the CPU supports is picked once at first use.

#include <cstddef>
#include <cstdint>
#include <span>

namespace kvfleet::engine {

inline constexpr std::size_t checksum_chunk_bytes = 4096;

/// Checksum of `data`.
[[nodiscard]] std::uint64_t block_checksum(std::span<const std::byte> data);

/// Copies `src` into the cache (`dst`, same size, no overlap) and returns the
/// checksum of the bytes, each chunk loaded once for both where the CPU has
/// AVX2 (else hashed, then copied from L1).
[[nodiscard]] std::uint64_t
copy_in_with_checksum(std::span<std::byte> dst, std::span<const std::byte> src);

/// Copies `src` out of the cache into `dst` (same size, no overlap) and
/// returns the checksum of the bytes, reading each byte once: chunks are
/// prefetched into L2 two ahead, and with AVX2 each 64-byte stripe is
/// stored and hashed from the same load.
[[nodiscard]] std::uint64_t
copy_out_with_checksum(std::span<std::byte> dst,
                       std::span<const std::byte> src);

} // namespace kvfleet::engine
