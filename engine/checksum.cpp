#include "engine/checksum.hpp"

#include "engine/block_key.hpp"
#include "engine/internal/le.hpp"
#include "engine/internal/xxh3_chunks.hpp"

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cstring>

namespace kvfleet::engine {

namespace {

// Picked once by what the CPU has. All give the same hash values.
internal::chunk_hash_fn chunk_hash() {
  static const internal::chunk_hash_fn fn = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
      return &internal::xxh3_avx512;
    if (__builtin_cpu_supports("avx2"))
      return &internal::xxh3_avx2;
    return &internal::xxh3_generic;
  }();
  return fn;
}

// Copies one chunk and returns its hash: fused (one load of each byte for
// both) where the CPU has AVX2, else a hash then a copy from L1.
using chunk_copy_hash_fn = std::uint64_t (*)(void* dst, const void* src,
                                             std::size_t len,
                                             std::uint64_t seed);

std::uint64_t hash_then_copy(void* dst, const void* src, std::size_t len,
                             std::uint64_t seed) {
  const std::uint64_t h = chunk_hash()(src, len, seed);
  std::memcpy(dst, src, len);
  return h;
}

chunk_copy_hash_fn chunk_copy_hash() {
  static const chunk_copy_hash_fn fn = [] {
    if (__builtin_cpu_supports("avx2"))
      return &internal::xxh3_avx2_copy;
    return &hash_then_copy;
  }();
  return fn;
}

// How far ahead copy_out prefetches, and into L2 (prefetcht1), where the
// core can keep more misses in flight than in L1: a single core then reads
// the arena about as fast as memcpy does, and hashing overlaps the reads.
constexpr std::size_t prefetch_bytes = 2 * checksum_chunk_bytes;

// Asks for the 64-byte line at `p` to be brought into L2. An asm statement,
// not __builtin_prefetch: GCC 12 deletes a loop of builtin prefetches as
// free of side effects (it did so here, silently, until this was measured).
inline void prefetch_into_l2(const std::byte* p) noexcept {
#if defined(__x86_64__)
  asm volatile("prefetcht1 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Prefetches src[from, min(to, size)) line by line.
void prefetch_range(const std::byte* src, std::size_t from, std::size_t to,
                    std::size_t size) noexcept {
  const std::size_t end = std::min(to, size);
  for (std::size_t p = from; p < end; p += 64)
    prefetch_into_l2(src + p);
}

// Chunk hashes are folded in groups of this many before the final hash, so
// the fold needs no allocation for any block size.
constexpr std::size_t fold_batch = 64;

class folder {
public:
  folder() { XXH3_64bits_reset_withSeed(&state_, hash_seed); }
  void add(std::uint64_t h) {
    internal::store_le64(buf_.data() + fill_, h);
    fill_ += 8;
    if (fill_ == buf_.size())
      flush();
  }
  std::uint64_t finish() {
    flush();
    return XXH3_64bits_digest(&state_);
  }

private:
  void flush() {
    if (fill_ == 0)
      return;
    XXH3_64bits_update(&state_, buf_.data(), fill_);
    fill_ = 0;
  }
  XXH3_state_t state_{};
  std::array<unsigned char, fold_batch * 8> buf_{};
  std::size_t fill_ = 0;
};

} // namespace

std::uint64_t block_checksum(std::span<const std::byte> data) {
  const auto hash = chunk_hash();
  folder f;
  for (std::size_t off = 0; off < data.size(); off += checksum_chunk_bytes) {
    const std::size_t n = std::min(checksum_chunk_bytes, data.size() - off);
    f.add(hash(data.data() + off, n, hash_seed));
  }
  return f.finish();
}

std::uint64_t copy_in_with_checksum(std::span<std::byte> dst,
                                    std::span<const std::byte> src) {
  // Each chunk loaded once, stored and hashed from the same registers
  // (AVX2). Hashing the source and then streaming it out (non-temporal
  // stores) was 56% of memcpy's rate on a 2-core VM (README, Benchmarks);
  // fused, 96%, and it tracks memcpy wherever memcpy's own stores are
  // fast.
  const auto copy_hash = chunk_copy_hash();
  folder f;
  const std::size_t size = std::min(dst.size(), src.size());
  for (std::size_t off = 0; off < size; off += checksum_chunk_bytes) {
    const std::size_t n = std::min(checksum_chunk_bytes, size - off);
    f.add(copy_hash(dst.data() + off, src.data() + off, n, hash_seed));
  }
  return f.finish();
}

std::uint64_t copy_out_with_checksum(std::span<std::byte> dst,
                                     std::span<const std::byte> src) {
  const auto copy_hash = chunk_copy_hash();
  folder f;
  const std::size_t size = std::min(dst.size(), src.size());
  prefetch_range(src.data(), checksum_chunk_bytes, prefetch_bytes, size);
  for (std::size_t off = 0; off < size; off += checksum_chunk_bytes) {
    const std::size_t n = std::min(checksum_chunk_bytes, size - off);
    // Ask for the chunk `prefetch_bytes` ahead while this one is copied and
    // hashed.
    prefetch_range(src.data(), off + prefetch_bytes,
                   off + prefetch_bytes + checksum_chunk_bytes, size);
    f.add(copy_hash(dst.data() + off, src.data() + off, n, hash_seed));
  }
  return f.finish();
}

} // namespace kvfleet::engine
