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
  std::string id(max_bytes + 1, '#');
  id.replace(1, 32, hex);
  return id;
}

} // namespace kvfleet::actors
