#pragma once
/// `redis_query_store`: the query-result store kept in a Redis server
/// (hiredis, Debian's libhiredis-dev), selected by a configured
/// `redis://[[user]:password@]host[:port][/db]` URL.
///
/// With a password in the URL every new connection first sends
/// `AUTH <password>` (no user: the `default` user) or
/// `AUTH <user> <password>` (Redis 6 ACL users). The password never
/// appears in an error message: messages show the URL with its
/// credentials replaced by `***`.
///
/// Entries: `SET <prefix><key> <value> PX <ttl ms>` and `GET <prefix><key>`.
/// The value is stored byte for byte as the cache hands it over (the
/// versioned reply encoding of query_cache_actor.hpp). Expiry is Redis's own
/// clock: the `now` argument of get/set is not used, so an injected clock
/// does not move Redis entries.
///
/// Failures are error values, never exceptions: a Redis error reply, an
/// unreachable server or a timed-out command is errc::backend_error whose
/// message names Redis's error. A get that fails returns that error (not a
/// miss); the cache actor counts it in `store_errors` and computes the
/// request as on a miss. After a connection-level failure the connection is
/// dropped and the next call connects again, so a restarted server is used
/// again without intervention.
///
/// Blocking: hiredis's synchronous API blocks the calling thread, each
/// connect at most `connect_timeout` and each command at most
/// `command_timeout` (default 50 ms). `blocking()` is true, so the cache
/// actor that owns the store runs detached (on its own thread) and never
/// stalls the scheduler's workers.
/// Not thread-safe: owned by one actor. SIGPIPE from a write to a closed
/// connection is blocked on the calling thread during each command and
/// discarded, so a server going away cannot kill the process.

#include "actors/query_store.hpp"
#include "engine/result.hpp"

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

struct redisContext;

namespace kvfleet::actors {

struct redis_query_store_config {
  /// redis://[[user]:password@]host[:port][/db]; port 6379, db 0 by
  /// default. Percent-encode `@ : / ? # %` inside user and password.
  std::string url;
  std::string key_prefix = "kvfleet:q:";
  std::chrono::milliseconds connect_timeout{200};
  std::chrono::milliseconds command_timeout{50};
};

/// Where a Redis URL points.
struct redis_endpoint {
  std::string host;
  std::uint16_t port = 6379;
  std::uint32_t db = 0;
  std::string user;     ///< empty: AUTH with the password alone
  std::string password; ///< empty: no AUTH

  friend bool operator==(const redis_endpoint&,
                         const redis_endpoint&) = default;
};

/// Parses `redis://[[user]:password@]host[:port][/db]` (an IPv6 host in
/// brackets; user and password percent-decoded). Errors: errc::parse_error
/// saying what is wrong (scheme, empty host, port not in 1..65535, db not
/// a number, credentials without a password or with a bad %-escape, query
/// strings), with the credentials in the quoted URL replaced by `***`.
[[nodiscard]] result<redis_endpoint> parse_redis_url(std::string_view url);

class redis_query_store final : public query_store {
public:
  /// Parses the URL and checks the options; does not connect (the first
  /// call does), so a node starts while its Redis is still coming up.
  /// Errors: parse_error (bad URL), invalid_argument (non-positive timeout).
  [[nodiscard]] static result<std::unique_ptr<redis_query_store>>
  open(redis_query_store_config config);
  ~redis_query_store() override;
  redis_query_store(const redis_query_store&) = delete;
  redis_query_store& operator=(const redis_query_store&) = delete;

  /// GET: the value, nullopt when absent or expired, backend_error when
  /// Redis cannot be reached or answers with an error.
  [[nodiscard]] result<std::optional<std::string>>
  get(const std::string& key, engine::nanos now) override;
  /// SET ... PX: `ttl` rounded up to whole milliseconds. invalid_argument
  /// when ttl <= 0, backend_error as for get.
  [[nodiscard]] result<void> set(const std::string& key,
                                 const std::string& value, engine::nanos ttl,
                                 engine::nanos now) override;
  [[nodiscard]] bool blocking() const noexcept override { return true; }

  [[nodiscard]] const redis_endpoint& endpoint() const noexcept {
    return endpoint_;
  }
  /// The Redis key an entry is stored under (prefix + key).
  [[nodiscard]] std::string redis_key(const std::string& key) const {
    return config_.key_prefix + key;
  }
  /// Whether a connection is open now (dropped after a failure).
  [[nodiscard]] bool connected() const noexcept { return ctx_ != nullptr; }

private:
  redis_query_store(redis_query_store_config config, redis_endpoint ep);
  /// Connects (and SELECTs the db) when not connected.
  [[nodiscard]] result<void> ensure_connected();
  void disconnect() noexcept;

  redis_query_store_config config_;
  redis_endpoint endpoint_;
  redisContext* ctx_ = nullptr; ///< owned; null while disconnected
};

} // namespace kvfleet::actors
