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

result<std::optional<std::string>>
embedded_query_store::get(const std::string& key, engine::nanos now) {
  auto it = entries_.find(key);
  if (it == entries_.end())
    return std::optional<std::string>{};
  if (now >= it->second.expires_at) {
    lru_.erase(it->second.lru);
    entries_.erase(it);
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
  auto it = entries_.find(key);
  if (it != entries_.end()) {
    it->second.value = value;
    it->second.expires_at = expiry(now, ttl);
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    return {};
  }
  if (entries_.size() >= max_entries_) {
    entries_.erase(lru_.back());
    lru_.pop_back();
  }
  lru_.push_front(key);
  entries_.emplace(key, entry{value, expiry(now, ttl), lru_.begin()});
  return {};
}

} // namespace kvfleet::actors
