#include "actors/digest_key.hpp"

#include <xxhash.h>

#include <cstdio>

namespace kvfleet::actors {

std::string digest_long_key(const std::string& key, std::size_t max_bytes) {
  if (key.size() <= max_bytes)
    return key;
  const XXH128_hash_t h = XXH3_128bits(key.data(), key.size());
  char hex[33];
  std::snprintf(hex, sizeof hex, "%016llx%016llx",
                static_cast<unsigned long long>(h.high64),
                static_cast<unsigned long long>(h.low64));
  return padded_hex_id('#', std::string_view(hex, 32), max_bytes);
}

std::string padded_hex_id(char marker, std::string_view hex32,
                          std::size_t max_bytes) {
  std::string id(max_bytes + 1, marker);
  id.replace(1, hex32.size(), hex32);
  return id;
}

} // namespace kvfleet::actors
