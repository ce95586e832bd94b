#pragma once
/// Query-result storage behind the query-result cache: get and set with a
/// time to live. `embedded_query_store` (the default) keeps entries in
/// process, bounded (least recently used go first) and expires them at
/// their TTL against the injected time; `redis_query_store`
/// (redis_query_store.hpp) keeps them in Redis.
/// Not thread-safe: each store is owned by one actor.

#include "engine/clock.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <unordered_map>

namespace kvfleet::actors {

class query_store {
public:
  virtual ~query_store() = default;
  /// The value stored under `key`, nullopt when absent or expired; an
  /// error (not a miss) when the backend fails (the embedded store never
  /// does).
  [[nodiscard]] virtual result<std::optional<std::string>>
  get(const std::string& key, engine::nanos now) = 0;
  /// Stores `value` under `key`, expiring `ttl` after `now` (ttl > 0; an
  /// expiry past the clock's range is its last tick: never).
  [[nodiscard]] virtual result<void> set(const std::string& key,
                                         const std::string& value,
                                         engine::nanos ttl,
                                         engine::nanos now) = 0;
  /// Whether calls block on I/O (the cache actor then runs detached).
  [[nodiscard]] virtual bool blocking() const noexcept { return false; }
};

class embedded_query_store final : public query_store {
public:
  explicit embedded_query_store(std::size_t max_entries = 100'000)
      : max_entries_(max_entries == 0 ? 1 : max_entries) {}

  [[nodiscard]] result<std::optional<std::string>>
  get(const std::string& key, engine::nanos now) override;
  [[nodiscard]] result<void> set(const std::string& key,
                                 const std::string& value, engine::nanos ttl,
                                 engine::nanos now) override;

  [[nodiscard]] std::size_t size() const noexcept { return entries_.size(); }
  [[nodiscard]] std::uint64_t expirations() const noexcept {
    return expirations_;
  }

private:
  struct entry {
    std::string value;
    engine::nanos expires_at{0};
    std::list<std::string>::iterator lru;
  };
  std::size_t max_entries_;
  std::unordered_map<std::string, entry> entries_;
  std::list<std::string> lru_; ///< front = most recent
  std::uint64_t expirations_ = 0;
};

} // namespace kvfleet::actors
