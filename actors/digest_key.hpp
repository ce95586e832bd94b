#pragma once
/// Bounding the size of a key that may be a whole prompt (a query string
/// used as its own key): the prefetcher's model and tracker, and the Redis
/// query store's keys. No CAF.

#include <cstddef>
#include <string>
#include <string_view>

namespace kvfleet::actors {

/// `key` itself when it is at most `max_bytes` long; else its XXH3-128
/// digest as 32 hex digits between '#'s, padded with '#' to `max_bytes` + 1
/// bytes, so that no key kept as itself is ever taken for a digest. Two
/// longer keys with the same digest are taken for one (XXH3 is no
/// cryptographic hash: keys made to collide can be). REQUIRES: max_bytes >=
/// 33.
[[nodiscard]] std::string digest_long_key(const std::string& key,
                                          std::size_t max_bytes);

/// `hex32` (32 hex digits) between two `marker`s, padded with `marker` to
/// `max_bytes` + 1 bytes: an id longer than any key kept as itself.
/// REQUIRES: max_bytes >= 33.
[[nodiscard]] std::string padded_hex_id(char marker, std::string_view hex32,
                                        std::size_t max_bytes);

} // namespace kvfleet::actors
