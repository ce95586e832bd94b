#pragma once
/// XXH3-64 with a seed, for host and device (see hd.hpp): the hash of
/// engine/checksum.hpp, which cuts a block into 4096-byte chunks, hashes each
/// with XXH3_64bits_withSeed(hash_seed) and hashes the little-endian array of
/// chunk hashes the same way. This is a scalar transcription of xxHash 0.8's
/// XXH3_64bits_withSeed (the default 192-byte secret; inputs above 240 bytes
/// use the secret derived from the seed, which callers pass in). The host
/// tests compare it with libxxhash for every length from 0 to 5000 bytes.
/// Pure functions.

#include "cuda/internal/hd.hpp"

#include <cstddef>
#include <cstdint>

namespace kvfleet::cuda::internal {

inline constexpr std::size_t xxh3_secret_bytes = 192;

/// xxHash's default secret (XXH3_kSecret), as a list for array initializers
/// (the kernels put it in __constant__ memory).
#define KVFLEET_XXH3_DEFAULT_SECRET                                            \
  0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c,      \
      0xf7, 0x21, 0xad, 0x1c, 0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb,  \
      0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e,  \
      0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,  \
      0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6,  \
      0x81, 0x3a, 0x26, 0x4c, 0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb,  \
      0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3, 0x71, 0x64, 0x48, 0x97,  \
      0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,  \
      0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7,  \
      0xc7, 0x0b, 0x4f, 0x1d, 0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31,  \
      0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, 0xea, 0xc5, 0xac, 0x83,  \
      0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,  \
      0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26,  \
      0x29, 0xd4, 0x68, 0x9e, 0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc,  \
      0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, 0x45, 0xcb, 0x3a, 0x8f,  \
      0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e

inline constexpr std::uint8_t xxh3_default_secret[xxh3_secret_bytes] = {
    KVFLEET_XXH3_DEFAULT_SECRET};

inline constexpr std::uint64_t xxh_prime32_1 = 0x9E3779B1U;
inline constexpr std::uint64_t xxh_prime32_2 = 0x85EBCA77U;
inline constexpr std::uint64_t xxh_prime32_3 = 0xC2B2AE3DU;
inline constexpr std::uint64_t xxh_prime64_1 = 0x9E3779B185EBCA87ULL;
inline constexpr std::uint64_t xxh_prime64_2 = 0xC2B2AE3D27D4EB4FULL;
inline constexpr std::uint64_t xxh_prime64_3 = 0x165667B19E3779F9ULL;
inline constexpr std::uint64_t xxh_prime64_4 = 0x85EBCA77C2B2AE63ULL;
inline constexpr std::uint64_t xxh_prime64_5 = 0x27D4EB2F165667C5ULL;

/// Little-endian loads from any address (the device faults on unaligned
/// wide loads, so an unaligned address is read byte by byte there).
KVFLEET_HD std::uint64_t xxh_read64(const std::uint8_t* p) {
#if defined(__CUDA_ARCH__)
  if ((reinterpret_cast<std::uintptr_t>(p) & 7U) == 0)
    return *reinterpret_cast<const std::uint64_t*>(p);
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i)
    v = (v << 8) | p[i];
  return v;
#else
  std::uint64_t v = 0;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}

KVFLEET_HD std::uint32_t xxh_read32(const std::uint8_t* p) {
#if defined(__CUDA_ARCH__)
  if ((reinterpret_cast<std::uintptr_t>(p) & 3U) == 0)
    return *reinterpret_cast<const std::uint32_t*>(p);
  std::uint32_t v = 0;
  for (int i = 3; i >= 0; --i)
    v = (v << 8) | p[i];
  return v;
#else
  std::uint32_t v = 0;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}

KVFLEET_HD void xxh_write64(std::uint8_t* p, std::uint64_t v) {
  for (int i = 0; i < 8; ++i)
    p[i] = static_cast<std::uint8_t>((v >> (8 * i)) & 0xffU);
}

KVFLEET_HD std::uint64_t xxh_rotl64(std::uint64_t x, unsigned r) {
  return (x << r) | (x >> (64U - r));
}

KVFLEET_HD std::uint32_t xxh_swap32(std::uint32_t x) {
  return ((x << 24) & 0xff000000U) | ((x << 8) & 0x00ff0000U) |
         ((x >> 8) & 0x0000ff00U) | ((x >> 24) & 0x000000ffU);
}

KVFLEET_HD std::uint64_t xxh_swap64(std::uint64_t x) {
  return (static_cast<std::uint64_t>(xxh_swap32(static_cast<std::uint32_t>(x)))
          << 32) |
         xxh_swap32(static_cast<std::uint32_t>(x >> 32));
}

/// Low 64 bits of the 128-bit product xor its high 64 bits.
KVFLEET_HD std::uint64_t xxh_mul128_fold64(std::uint64_t a, std::uint64_t b) {
#if defined(__CUDA_ARCH__)
  return (a * b) ^ __umul64hi(a, b);
#else
  __extension__ using u128 = unsigned __int128;
  const u128 p = static_cast<u128>(a) * b;
  return static_cast<std::uint64_t>(p) ^ static_cast<std::uint64_t>(p >> 64);
#endif
}

KVFLEET_HD std::uint64_t xxh3_avalanche(std::uint64_t h) {
  h ^= h >> 37;
  h *= 0x165667919E3779F9ULL;
  return h ^ (h >> 32);
}

KVFLEET_HD std::uint64_t xxh64_avalanche(std::uint64_t h) {
  h ^= h >> 33;
  h *= xxh_prime64_2;
  h ^= h >> 29;
  h *= xxh_prime64_3;
  return h ^ (h >> 32);
}

KVFLEET_HD std::uint64_t xxh3_rrmxmx(std::uint64_t h, std::uint64_t len) {
  h ^= xxh_rotl64(h, 49) ^ xxh_rotl64(h, 24);
  h *= 0x9FB21C651E98DF25ULL;
  h ^= (h >> 35) + len;
  h *= 0x9FB21C651E98DF25ULL;
  return h ^ (h >> 28);
}

KVFLEET_HD std::uint64_t xxh3_mix16(const std::uint8_t* in,
                                    const std::uint8_t* s, std::uint64_t seed) {
  return xxh_mul128_fold64(xxh_read64(in) ^ (xxh_read64(s) + seed),
                           xxh_read64(in + 8) ^ (xxh_read64(s + 8) - seed));
}

/// Inputs of 0 to 240 bytes, with the default secret `ks`.
KVFLEET_HD std::uint64_t xxh3_short(const std::uint8_t* in, std::size_t len,
                                    const std::uint8_t* ks,
                                    std::uint64_t seed) {
  const std::uint64_t n = len;
  if (len <= 16) {
    if (len > 8) {
      const std::uint64_t f1 =
          (xxh_read64(ks + 24) ^ xxh_read64(ks + 32)) + seed;
      const std::uint64_t f2 =
          (xxh_read64(ks + 40) ^ xxh_read64(ks + 48)) - seed;
      const std::uint64_t lo = xxh_read64(in) ^ f1;
      const std::uint64_t hi = xxh_read64(in + len - 8) ^ f2;
      return xxh3_avalanche(n + xxh_swap64(lo) + hi +
                            xxh_mul128_fold64(lo, hi));
    }
    if (len >= 4) {
      const std::uint64_t s = seed ^ (static_cast<std::uint64_t>(xxh_swap32(
                                          static_cast<std::uint32_t>(seed)))
                                      << 32);
      const std::uint64_t i1 = xxh_read32(in);
      const std::uint64_t i2 = xxh_read32(in + len - 4);
      const std::uint64_t flip = (xxh_read64(ks + 8) ^ xxh_read64(ks + 16)) - s;
      return xxh3_rrmxmx((i2 + (i1 << 32)) ^ flip, n);
    }
    if (len > 0) {
      const std::uint32_t c1 = in[0];
      const std::uint32_t c2 = in[len >> 1];
      const std::uint32_t c3 = in[len - 1];
      const std::uint32_t combined =
          (c1 << 16) | (c2 << 24) | c3 | (static_cast<std::uint32_t>(len) << 8);
      const std::uint64_t flip =
          static_cast<std::uint64_t>(xxh_read32(ks) ^ xxh_read32(ks + 4)) +
          seed;
      return xxh64_avalanche(combined ^ flip);
    }
    return xxh64_avalanche(seed ^ (xxh_read64(ks + 56) ^ xxh_read64(ks + 64)));
  }
  std::uint64_t acc = n * xxh_prime64_1;
  if (len <= 128) {
    if (len > 32) {
      if (len > 64) {
        if (len > 96) {
          acc += xxh3_mix16(in + 48, ks + 96, seed);
          acc += xxh3_mix16(in + len - 64, ks + 112, seed);
        }
        acc += xxh3_mix16(in + 32, ks + 64, seed);
        acc += xxh3_mix16(in + len - 48, ks + 80, seed);
      }
      acc += xxh3_mix16(in + 16, ks + 32, seed);
      acc += xxh3_mix16(in + len - 32, ks + 48, seed);
    }
    acc += xxh3_mix16(in, ks, seed);
    acc += xxh3_mix16(in + len - 16, ks + 16, seed);
    return xxh3_avalanche(acc);
  }
  // 129 to 240 bytes.
  const std::size_t rounds = len / 16;
  for (std::size_t i = 0; i < 8; ++i)
    acc += xxh3_mix16(in + 16 * i, ks + 16 * i, seed);
  acc = xxh3_avalanche(acc);
  for (std::size_t i = 8; i < rounds; ++i)
    acc += xxh3_mix16(in + 16 * i, ks + 16 * (i - 8) + 3, seed);
  acc += xxh3_mix16(in + len - 16, ks + 136 - 17, seed);
  return xxh3_avalanche(acc);
}

KVFLEET_HD void xxh3_accumulate_stripe(std::uint64_t* acc,
                                       const std::uint8_t* in,
                                       const std::uint8_t* s) {
  for (int i = 0; i < 8; ++i) {
    const std::uint64_t v = xxh_read64(in + 8 * i);
    const std::uint64_t k = v ^ xxh_read64(s + 8 * i);
    acc[i ^ 1] += v;
    acc[i] += (k & 0xffffffffU) * (k >> 32);
  }
}

/// Inputs above 240 bytes, with the seed-derived secret `ds`.
KVFLEET_HD std::uint64_t xxh3_long(const std::uint8_t* in, std::size_t len,
                                   const std::uint8_t* ds) {
  constexpr std::size_t stripe = 64;
  constexpr std::size_t stripes_per_block = (xxh3_secret_bytes - stripe) / 8;
  constexpr std::size_t block = stripe * stripes_per_block;
  std::uint64_t acc[8] = {xxh_prime32_3, xxh_prime64_1, xxh_prime64_2,
                          xxh_prime64_3, xxh_prime64_4, xxh_prime32_2,
                          xxh_prime64_5, xxh_prime32_1};
  const std::size_t blocks = (len - 1) / block;
  for (std::size_t b = 0; b < blocks; ++b) {
    for (std::size_t st = 0; st < stripes_per_block; ++st)
      xxh3_accumulate_stripe(acc, in + b * block + st * stripe, ds + st * 8);
    const std::uint8_t* key = ds + xxh3_secret_bytes - stripe;
    for (int i = 0; i < 8; ++i) {
      std::uint64_t a = acc[i];
      a ^= a >> 47;
      a ^= xxh_read64(key + 8 * i);
      acc[i] = a * xxh_prime32_1;
    }
  }
  const std::size_t stripes = ((len - 1) - block * blocks) / stripe;
  for (std::size_t st = 0; st < stripes; ++st)
    xxh3_accumulate_stripe(acc, in + blocks * block + st * stripe, ds + st * 8);
  xxh3_accumulate_stripe(acc, in + len - stripe,
                         ds + xxh3_secret_bytes - stripe - 7);
  std::uint64_t r = static_cast<std::uint64_t>(len) * xxh_prime64_1;
  for (int i = 0; i < 4; ++i)
    r += xxh_mul128_fold64(acc[2 * i] ^ xxh_read64(ds + 11 + 16 * i),
                           acc[2 * i + 1] ^ xxh_read64(ds + 11 + 16 * i + 8));
  return xxh3_avalanche(r);
}

/// Writes the secret XXH3 derives from `seed` for long inputs, given the
/// default secret `ks`.
KVFLEET_HD void xxh3_derive_secret(std::uint8_t* out, const std::uint8_t* ks,
                                   std::uint64_t seed) {
  for (std::size_t i = 0; i < xxh3_secret_bytes / 16; ++i) {
    xxh_write64(out + 16 * i, xxh_read64(ks + 16 * i) + seed);
    xxh_write64(out + 16 * i + 8, xxh_read64(ks + 16 * i + 8) - seed);
  }
}

/// XXH3_64bits_withSeed(in, len, seed), given the default secret `ks` and
/// the secret `ds` derived from `seed` (xxh3_derive_secret).
KVFLEET_HD std::uint64_t xxh3_64(const std::uint8_t* in, std::size_t len,
                                 std::uint64_t seed, const std::uint8_t* ks,
                                 const std::uint8_t* ds) {
  return len <= 240 ? xxh3_short(in, len, ks, seed) : xxh3_long(in, len, ds);
}

} // namespace kvfleet::cuda::internal
