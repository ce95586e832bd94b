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
/// Commands: `SET`, `GETRANGE`, `EXISTS` (and `AUTH`, `SELECT` on a new
/// connection): an ACL user needs `+set +getrange +exists`, and `+select`
/// for a database other than 0; a NOPERM reply's error says so.
///
/// Entries: `SET <prefix><key> <value> PX <ttl ms>`, read with
/// `GETRANGE <prefix><key> 0 <max_value_bytes>` and `EXISTS <prefix><key>`
/// (a key longer than 256 bytes as a 257-byte digest, redis_key()) in one
/// pipeline (no GET: a value of MiBs that another program stored
/// under a key would time out every read of it, and each timeout backs off
/// every key). The value is stored byte for byte as the cache hands it over
/// (the versioned reply encoding of query_cache_actor.hpp, under 100
/// bytes); set refuses one longer than `max_value_bytes` (1 KiB), and get
/// takes a longer one for another program's: an error value (not a
/// connection-level failure, so no backoff), which the cache counts and
/// overwrites with its own entry, as it does a key of another type (a
/// WRONGTYPE error reply). Expiry is Redis's own
/// clock: the `now` argument of get/set only times the reconnect backoff
/// (below), so an injected clock does not move Redis entries.
///
/// Failures are error values, never exceptions: a Redis error reply, an
/// unreachable server or a timed-out command is errc::backend_error whose
/// message names Redis's error. A get that fails returns that error (not a
/// miss); the cache actor counts it in `store_errors` and computes the
/// request as on a miss. After a connection-level failure (connect, AUTH
/// or SELECT failed, a command got no answer) the connection is dropped,
/// and calls within `reconnect_after` (1 s) of the failure fail at once
/// with backend_error, without touching the network: a Redis that is down
/// or stalled would otherwise cost every call its connect or command
/// timeout, one after the other on the cache actor's thread. The first
/// call after that connects again, so a restarted server is used again
/// without intervention. A command that finds its connection closed by
/// the server after it had answered (end of stream: Redis's idle
/// `timeout`, a proxy's idle limit, CLIENT KILL, a restart) starts no
/// backoff: the call connects again at once and retries the command, once
/// (the commands are idempotent), so the closed connection costs no call
/// (a server that is really down then fails that connect and backs off). Time
/// here is the `now` the caller passes (the cache actor's clock); it is used
/// for nothing else.
///
/// Blocking: calls block the calling thread, each connect at most
/// `connect_timeout` and each command at most `command_timeout` (default
/// 50 ms); a new connection's AUTH and SELECT are commands too, so a call
/// that connects takes at most connect_timeout + 3 x command_timeout, and
/// one that finds its connection closed by the server and retries on a new
/// one (above) connect_timeout + 4 x command_timeout. The
/// command timeout bounds the whole command, from writing it to the last byte
/// of its reply (the socket is non-blocking and polled up to that deadline),
/// not each read: a server that trickles a reply slower than that fails the
/// command like a stalled one ("no complete reply within N ms", a
/// connection-level failure). The connect timeout bounds the whole connect:
/// resolving a host name (on a helper thread, engine/host_resolver.hpp, since
/// getaddrinfo has no timeout; a slow DNS fails the connect with "cannot
/// resolve '<host>' within N ms" and is backed off from like a refused connect)
/// and the TCP connect to each of its addresses in turn, with whatever time is
/// left. hiredis is given the numeric addresses; messages name the host.
/// `blocking()` is true, so the cache actor that owns the store runs detached
/// (on its own thread) and never stalls the scheduler's workers. Not
/// thread-safe: owned by one actor. SIGPIPE from a write to a closed connection
/// is blocked on the calling thread during each command and discarded, so a
/// server going away cannot kill the process.

#include "actors/digest_key.hpp"
#include "actors/query_store.hpp"
#include "engine/result.hpp"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

struct redisContext;

namespace kvfleet::engine {
class host_resolver;
} // namespace kvfleet::engine

namespace kvfleet::actors {

/// A query key longer than this is stored under a digest of it
/// (redis_query_store::redis_key()).
inline constexpr std::size_t redis_raw_key_max_bytes = 256;

struct redis_query_store_config {
  /// redis://[[user]:password@]host[:port][/db]; port 6379, db 0 by
  /// default. Percent-encode `@ : / ? # %` inside user and password.
  std::string url;
  /// Put before every query key; not empty (open refuses it: query strings
  /// would be raw Redis keys, and set would overwrite other applications').
  std::string key_prefix = "kvfleet:q:";
  /// A whole connect: the host name's lookup and the TCP connects to its
  /// addresses together.
  std::chrono::milliseconds connect_timeout{200};
  /// A whole command: writing it and reading all of its reply.
  std::chrono::milliseconds command_timeout{50};
  /// After a connection-level failure, calls fail at once for this long
  /// before one connects again; 0: every call tries.
  std::chrono::milliseconds reconnect_after{1'000};
  /// The longest value set stores and get reads back; a longer one under a
  /// key is not this store's (get fails, keeping the connection).
  std::size_t max_value_bytes = 1024;
  /// Redis's own limit on a string.
  static constexpr std::size_t max_value_bytes_limit = 512U << 20;
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
/// a number, credentials without a password, with a bad %-escape or with
/// an unencoded '/', '?' or '#', query strings), with the credentials (up
/// to the URL's last '@') in the quoted URL replaced by `***`.
[[nodiscard]] result<redis_endpoint> parse_redis_url(std::string_view url);

class redis_query_store final : public query_store {
public:
  /// Parses the URL and checks the options; does not connect (the first
  /// call does), so a node starts while its Redis is still coming up.
  /// Errors: parse_error (bad URL), invalid_argument naming the option (a
  /// timeout that is not positive, a negative reconnect_after, any of them
  /// above 24 hours, max_value_bytes 0 or above max_value_bytes_limit, an
  /// empty key_prefix).
  [[nodiscard]] static result<std::unique_ptr<redis_query_store>>
  open(redis_query_store_config config);
  ~redis_query_store() override;
  redis_query_store(const redis_query_store&) = delete;
  redis_query_store& operator=(const redis_query_store&) = delete;

  /// The value, nullopt when absent or expired, backend_error when Redis
  /// cannot be reached, answers with an error (a key of another type:
  /// WRONGTYPE) or holds a value longer than max_value_bytes there.
  [[nodiscard]] result<std::optional<std::string>>
  get(const std::string& key, engine::nanos now) override;
  /// SET ... PX: `ttl` rounded up to whole milliseconds. invalid_argument
  /// when ttl <= 0, value_too_large when the value is longer than
  /// max_value_bytes, backend_error as for get.
  [[nodiscard]] result<void> set(const std::string& key,
                                 const std::string& value, engine::nanos ttl,
                                 engine::nanos now) override;
  [[nodiscard]] bool blocking() const noexcept override { return true; }

  [[nodiscard]] const redis_endpoint& endpoint() const noexcept {
    return endpoint_;
  }
  /// The Redis key an entry is stored under: prefix + key, or for a key
  /// longer than redis_raw_key_max_bytes (a whole prompt) prefix + a
  /// 257-byte digest of it (digest_long_key()), so that every command stays
  /// small. (Before, a key of some MiB took longer to send than the
  /// command timeout, which dropped the connection and failed every key for
  /// reconnect_after, again at each request of it.)
  [[nodiscard]] std::string redis_key(const std::string& key) const {
    return config_.key_prefix + digest_long_key(key, redis_raw_key_max_bytes);
  }
  /// Whether a connection is open now (dropped after a failure).
  [[nodiscard]] bool connected() const noexcept { return ctx_ != nullptr; }
  /// Connection attempts so far.
  [[nodiscard]] std::uint64_t connects() const noexcept { return connects_; }

private:
  redis_query_store(redis_query_store_config config, redis_endpoint ep);
  /// Connects (and SELECTs the db) when not connected, unless a failure
  /// less than reconnect_after before `now` says not to try yet.
  [[nodiscard]] result<void> ensure_connected(engine::nanos now);
  /// Resolves the host and connects to its addresses in turn, all within
  /// connect_timeout: a new context, or backend_error naming the host.
  [[nodiscard]] result<redisContext*> connect_in_time();
  void disconnect() noexcept;
  /// A connection-level failure at `now`: drops the connection and returns
  /// `e` (backend_error), remembered for the calls that wait out the
  /// backoff.
  [[nodiscard]] error failed(engine::nanos now, error e);
  /// A command that got no answer: failed(), except when the server closed
  /// a connection that had answered a command (EOF), which drops it
  /// without a backoff. A server that closes new connections before
  /// answering anything (maxclients, protected mode, a proxy without a
  /// backend) is backed off from like one that refuses them. `said`: the
  /// text of an error reply that came before the connection failed (Redis
  /// over maxclients or in protected mode answers one, then closes), which
  /// the message quotes.
  [[nodiscard]] error command_failed(engine::nanos now,
                                     std::string_view command,
                                     std::string_view said = {});
  /// The command that just got no answer found the connection closed by
  /// the server after it had answered (EOF): get and set then connect
  /// again and retry it once, in the same call, when this call did not
  /// make that connection.
  [[nodiscard]] bool closed_while_idle() const noexcept;
  /// Connects when needed and runs `attempt`, which sends a command on the
  /// connection and says whether all its replies came; once more on a new
  /// connection when the server had closed this one while idle
  /// (closed_while_idle) and this call did not make it. Errors:
  /// ensure_connected's, or command_failed's for `command`, quoting
  /// `*said` (an error reply `attempt` read before it failed) when given.
  [[nodiscard]] result<void>
  run_reconnecting(engine::nanos now, std::string_view command,
                   const std::function<bool()>& attempt,
                   const std::string* said = nullptr);

  redis_query_store_config config_;
  redis_endpoint endpoint_;
  std::unique_ptr<engine::host_resolver> resolver_;
  redisContext* ctx_ = nullptr; ///< owned; null while disconnected
  bool backing_off_ = false;    ///< the last connection-level call failed
  engine::nanos retry_at_{0};   ///< no connect before this (backing_off_)
  std::string last_failure_;    ///< its message
  std::uint64_t connects_ = 0;
  /// The open connection answered a command (AUTH, SELECT, GET or SET)
  /// with something other than an error reply.
  bool answered_ = false;
};

} // namespace kvfleet::actors
