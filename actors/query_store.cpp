#include "actors/query_store.hpp"

#include <limits>

namespace kvfleet::actors {
namespace {

/// `now + ttl` (ttl > 0), at most the clock's last tick: a sum past it
/// would wrap negative (undefined, in practice an expiry in the past), so
/// an entry meant to live longest would be gone at once.
engine::nanos expiry(engine::nanos now, engine::nanos ttl) noexcept {
  constexpr auto last = std::numeric_limits<engine::nanos::rep>::max();
  if (now.count() > 0 && ttl.count() > last - now.count())
    return engine::nanos{last};
  return now + ttl;
}

} // namespace

void embedded_query_store::erase(map::iterator it) noexcept {
  bytes_ -= cost(it->first, it->second.value);
  lru_.erase(it->second.lru);
  entries_.erase(it);
}

result<std::optional<std::string>>
embedded_query_store::get(const std::string& key, engine::nanos now) {
  auto it = entries_.find(key);
  if (it == entries_.end())
    return std::optional<std::string>{};
  if (now >= it->second.expires_at) {
    erase(it);
    ++expirations_;
    return std::optional<std::string>{};
  }
  lru_.splice(lru_.begin(), lru_, it->second.lru);
  return std::optional<std::string>{it->second.value};
}

result<void> embedded_query_store::set(const std::string& key,
                                       const std::string& value,
                                       engine::nanos ttl, engine::nanos now) {
  if (ttl <= engine::nanos{0})
    return make_error(errc::invalid_argument,
                      "query cache TTL must be positive");
  const std::size_t needed = cost(key, value);
  auto it = entries_.find(key);
  if (needed > max_bytes_) {
    if (it != entries_.end())
      erase(it); // its old value would answer for the one refused
    return make_error(errc::invalid_argument,
                      "query cache entry of " + std::to_string(needed) +
                          " bytes (key, value and bookkeeping) is larger "
                          "than the store's bound of " +
                          std::to_string(max_bytes_) + " bytes");
  }
  if (it != entries_.end()) {
    const std::size_t old = cost(key, it->second.value);
    it->second.value = value;
    bytes_ = bytes_ - old + needed;
    it->second.expires_at = expiry(now, ttl);
    lru_.splice(lru_.begin(), lru_, it->second.lru);
  } else {
    // The use-order node first: if the map's insert throws, it goes again
    // and nothing points at a node that is not there.
    lru_.push_front(nullptr);
    try {
      auto made =
          entries_.emplace(key, entry{value, expiry(now, ttl), lru_.begin()})
              .first;
      lru_.front() = &made->first;
    } catch (...) {
      lru_.pop_front();
      throw;
    }
    bytes_ += needed;
  }
  // The least recently used go, never the entry just set (it fits alone).
  while (entries_.size() > max_entries_ || bytes_ > max_bytes_)
    erase(entries_.find(*lru_.back()));
  return {};
}

} // namespace kvfleet::actors
