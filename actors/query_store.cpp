#include "actors/query_store.hpp"

namespace kvfleet::actors {

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
    it->second.expires_at = now + ttl;
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    return {};
  }
  if (entries_.size() >= max_entries_) {
    entries_.erase(lru_.back());
    lru_.pop_back();
  }
  lru_.push_front(key);
  entries_.emplace(key, entry{value, now + ttl, lru_.begin()});
  return {};
}

} // namespace kvfleet::actors
