#include "engine/checksum.hpp"

#include "engine/block_key.hpp"
#include "engine/internal/le.hpp"

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cstring>

namespace kvfleet::engine {

namespace {

// Chunk hashes are folded in groups of this many before the final hash, so
// the fold needs no allocation for any block size.
constexpr std::size_t fold_batch = 64;

class folder {
public:
  folder() { XXH3_64bits_reset_withSeed(&state_, hash_seed); }
  void add(std::uint64_t h) {
    internal::store_le64(buf_.data() + fill_, h);
    fill_ += 8;
    if (fill_ == buf_.size()) flush();
  }
  std::uint64_t finish() {
    flush();
    return XXH3_64bits_digest(&state_);
  }

private:
  void flush() {
    if (fill_ == 0) return;
    XXH3_64bits_update(&state_, buf_.data(), fill_);
    fill_ = 0;
  }
  XXH3_state_t state_{};
  std::array<unsigned char, fold_batch * 8> buf_{};
  std::size_t fill_ = 0;
};

} // namespace

std::uint64_t block_checksum(std::span<const std::byte> data) {
  folder f;
  for (std::size_t off = 0; off < data.size(); off += checksum_chunk_bytes) {
    const std::size_t n = std::min(checksum_chunk_bytes, data.size() - off);
    f.add(XXH3_64bits_withSeed(data.data() + off, n, hash_seed));
  }
  return f.finish();
}

std::uint64_t copy_with_checksum(std::span<std::byte> dst,
                                 std::span<const std::byte> src) {
  folder f;
  const std::size_t size = std::min(dst.size(), src.size());
  for (std::size_t off = 0; off < size; off += checksum_chunk_bytes) {
    const std::size_t n = std::min(checksum_chunk_bytes, size - off);
    // Hash the source chunk (one trip to memory), then copy it from L1.
    f.add(XXH3_64bits_withSeed(src.data() + off, n, hash_seed));
    std::memcpy(dst.data() + off, src.data() + off, n);
  }
  return f.finish();
}

} // namespace kvfleet::engine
