#include "engine/internal/xxh3_chunks.hpp"

#define XXH_INLINE_ALL
#define XXH_VECTOR XXH_AVX512
#include <xxhash.h>

namespace kvfleet::engine::internal {

std::uint64_t xxh3_avx512(const void* data, std::size_t len,
                          std::uint64_t seed) {
  return XXH3_64bits_withSeed(data, len, seed);
}

} // namespace kvfleet::engine::internal
