#include "engine/internal/xxh3_chunks.hpp"

#define XXH_INLINE_ALL
#define XXH_VECTOR XXH_AVX2
#include <xxhash.h>

#include <immintrin.h>

#include <cstring>

// xxh3_avx2_copy uses XXH3's own building blocks (the seeded secret, the
// scramble, the final merge) from xxhash.h's inline implementation; their
// names and the long-input layout are those of the 0.8 series.
static_assert(XXH_VERSION_MAJOR == 0 && XXH_VERSION_MINOR == 8,
              "xxh3_avx2_copy follows XXH3's long-input loop of xxHash 0.8");

namespace kvfleet::engine::internal {

std::uint64_t xxh3_avx2(const void* data, std::size_t len, std::uint64_t seed) {
  return XXH3_64bits_withSeed(data, len, seed);
}

namespace {

/// XXH3's 64-byte stripe accumulation (XXH3_accumulate_512_avx2) that also
/// stores the stripe to `out`. The accumulators stay in registers: `out`
/// may alias anything, so they must not live behind a pointer.
__attribute__((always_inline)) inline void
accumulate_and_store(__m256i (&acc)[2], const unsigned char* in,
                     unsigned char* out, const unsigned char* secret) {
  for (int i = 0; i < 2; ++i) {
    const __m256i data =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in) + i);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out) + i, data);
    const __m256i key =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(secret) + i);
    const __m256i data_key = _mm256_xor_si256(data, key);
    const __m256i data_key_lo =
        _mm256_shuffle_epi32(data_key, _MM_SHUFFLE(0, 3, 0, 1));
    const __m256i product = _mm256_mul_epu32(data_key, data_key_lo);
    const __m256i swapped = _mm256_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
    acc[i] = _mm256_add_epi64(product, _mm256_add_epi64(acc[i], swapped));
  }
}

} // namespace

std::uint64_t xxh3_avx2_copy(void* dst, const void* src, std::size_t len,
                             std::uint64_t seed) {
  if (len <= XXH3_MIDSIZE_MAX) {
    std::memcpy(dst, src, len);
    return XXH3_64bits_withSeed(src, len, seed);
  }
  const auto* in = static_cast<const unsigned char*>(src);
  auto* out = static_cast<unsigned char*>(dst);
  constexpr std::size_t secret_size = XXH_SECRET_DEFAULT_SIZE;
  alignas(64) unsigned char seeded[secret_size];
  const unsigned char* secret = XXH3_kSecret;
  if (seed != 0) {
    XXH3_initCustomSecret_avx2(seeded, seed);
    secret = seeded;
  }
  alignas(64) xxh_u64 lanes[XXH_ACC_NB] = XXH3_INIT_ACC;
  auto* lane_vecs = reinterpret_cast<__m256i*>(lanes);
  __m256i acc[2] = {_mm256_load_si256(lane_vecs),
                    _mm256_load_si256(lane_vecs + 1)};
  constexpr std::size_t stripes_per_block =
      (secret_size - XXH_STRIPE_LEN) / XXH_SECRET_CONSUME_RATE;
  constexpr std::size_t block_len = XXH_STRIPE_LEN * stripes_per_block;
  const std::size_t blocks = (len - 1) / block_len;
  std::size_t done = 0;
  for (std::size_t b = 0; b < blocks; ++b) {
    for (std::size_t s = 0; s < stripes_per_block; ++s, done += XXH_STRIPE_LEN)
      accumulate_and_store(acc, in + done, out + done,
                           secret + s * XXH_SECRET_CONSUME_RATE);
    _mm256_store_si256(lane_vecs, acc[0]);
    _mm256_store_si256(lane_vecs + 1, acc[1]);
    XXH3_scrambleAcc_avx2(lanes, secret + secret_size - XXH_STRIPE_LEN);
    acc[0] = _mm256_load_si256(lane_vecs);
    acc[1] = _mm256_load_si256(lane_vecs + 1);
  }
  const std::size_t stripes = ((len - 1) - done) / XXH_STRIPE_LEN;
  for (std::size_t s = 0; s < stripes; ++s, done += XXH_STRIPE_LEN)
    accumulate_and_store(acc, in + done, out + done,
                         secret + s * XXH_SECRET_CONSUME_RATE);
  // XXH3's last stripe is the input's last 64 bytes, which may overlap the
  // stripes above: hash it whole, copy only the bytes not yet copied.
  alignas(32) unsigned char last[XXH_STRIPE_LEN];
  accumulate_and_store(acc, in + len - XXH_STRIPE_LEN, last,
                       secret + secret_size - XXH_STRIPE_LEN -
                           XXH_SECRET_LASTACC_START);
  std::memcpy(out + done, in + done, len - done);
  _mm256_store_si256(lane_vecs, acc[0]);
  _mm256_store_si256(lane_vecs + 1, acc[1]);
  return XXH3_mergeAccs(lanes, secret + XXH_SECRET_MERGEACCS_START,
                        static_cast<xxh_u64>(len) * XXH_PRIME64_1);
}

} // namespace kvfleet::engine::internal
