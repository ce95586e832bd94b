#pragma once
/// Block checksums.
///
/// A block's checksum is a two-level XXH3-64 (fixed seed): the value is cut
/// into chunks of `checksum_chunk_bytes` (the last may be shorter), each
/// chunk is hashed, and the checksum is the hash of the little-endian array
/// of chunk hashes. Chunks let a GPU hash a block in parallel and let the host
/// fuse hashing with a copy while the chunk is in L1. Pure functions.

#include <cstddef>
#include <cstdint>
#include <span>

namespace kvfleet::engine {

inline constexpr std::size_t checksum_chunk_bytes = 4096;

/// Checksum of `data`.
[[nodiscard]] std::uint64_t block_checksum(std::span<const std::byte> data);

/// Copies `src` to `dst` (same size, not overlapping) and returns the
/// checksum of the bytes, reading each chunk once from memory.
[[nodiscard]] std::uint64_t copy_with_checksum(std::span<std::byte> dst,
                                               std::span<const std::byte> src);

} // namespace kvfleet::engine
