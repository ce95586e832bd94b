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
  /// expiry past the clock's range is its last tick: never). The embedded
  /// store refuses an entry larger than its whole byte bound
  /// (errc::invalid_argument; an older value of the key is dropped).
  [[nodiscard]] virtual result<void> set(const std::string& key,
                                         const std::string& value,
                                         engine::nanos ttl,
                                         engine::nanos now) = 0;
  /// Whether calls block on I/O (the cache actor then runs detached).
  [[nodiscard]] virtual bool blocking() const noexcept { return false; }
};

/// Bounded by entry count and by bytes: each entry counts its key, its
/// value and `entry_overhead_bytes` of bookkeeping, and the least recently
/// used go while either bound is passed. Query keys may be whole prompts:
/// 100,000 keys of 8 KiB held 1.6 GB before the byte bound (the key was
/// also kept twice, once in the map and once in the use order).
class embedded_query_store final : public query_store {
public:
  /// Bookkeeping counted per entry (map node, use-order node, expiry).
  static constexpr std::size_t entry_overhead_bytes = 128;

  explicit embedded_query_store(std::size_t max_entries = 100'000,
                                std::size_t max_bytes = std::size_t{256} << 20)
      : max_entries_(max_entries == 0 ? 1 : max_entries),
        max_bytes_(max_bytes) {}

  [[nodiscard]] result<std::optional<std::string>>
  get(const std::string& key, engine::nanos now) override;
  [[nodiscard]] result<void> set(const std::string& key,
                                 const std::string& value, engine::nanos ttl,
                                 engine::nanos now) override;

  [[nodiscard]] std::size_t size() const noexcept { return entries_.size(); }
  /// What the entries count against max_bytes.
  [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }
  [[nodiscard]] std::uint64_t expirations() const noexcept {
    return expirations_;
  }

private:
  struct entry {
    std::string value;
    engine::nanos expires_at{0};
    std::list<const std::string*>::iterator lru;
  };
  using map = std::unordered_map<std::string, entry>;
  [[nodiscard]] static std::size_t cost(const std::string& key,
                                        const std::string& value) noexcept {
    return key.size() + value.size() + entry_overhead_bytes;
  }
  void erase(map::iterator it) noexcept;

  std::size_t max_entries_;
  std::size_t max_bytes_;
  std::size_t bytes_ = 0;
  map entries_;
  /// The map's keys (their nodes do not move), front = most recent.
  std::list<const std::string*> lru_;
  std::uint64_t expirations_ = 0;
};

} // namespace kvfleet::actors
