#include "actors/redis_query_store.hpp"

#include "actors/config_checks.hpp"
#include "engine/host_resolver.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <poll.h>
#include <pthread.h>
#include <sys/time.h>

namespace kvfleet::actors {
namespace {

bool all_digits(std::string_view s) {
  if (s.empty())
    return false;
  for (char c : s)
    if (std::isdigit(static_cast<unsigned char>(c)) == 0)
      return false;
  return true;
}

/// The port `s` names: all digits, in 1..65535; nullopt otherwise.
std::optional<std::uint16_t> port_number(std::string_view s) {
  unsigned value = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (!all_digits(s) || ec != std::errc{} || end != s.data() + s.size() ||
      value == 0 || value > 65535)
    return std::nullopt;
  return static_cast<std::uint16_t>(value);
}

/// `url` with whatever sits between "://" and the last '@' replaced by
/// "***", so no message shows a password. The last '@' of the whole URL,
/// not of the part before the first '/': a password with a '/' left
/// unencoded puts that '/' before the '@', and the rest of the password
/// would show. Without a scheme before it (a mistyped one, "redis:/u:pw@h",
/// or a "://" inside the password or after the '@') all before the last '@'
/// is hidden, the scheme too. Without any '@', a ':' in the host part
/// followed by anything but a port number may be a password whose host was
/// left out ("redis://user:secret"): all that follows that ':' is hidden
/// unless the whole is a well-formed host:port[/db] (a '/' in a password
/// may be unencoded, and a password may be digits); with no "://" either,
/// all after the first ':'. An IPv6 host's brackets are skipped first (all
/// after "://" hidden when the ']' is missing).
std::string without_credentials(std::string_view url) {
  const auto at = url.rfind('@');
  if (at == std::string_view::npos) {
    const auto scheme_end = url.find("://");
    if (scheme_end == std::string_view::npos) {
      // No telling the parts apart ("redis:/u:pw"): all after the first ':'.
      const auto colon = url.find(':');
      return colon == std::string_view::npos
                 ? std::string(url)
                 : std::string(url.substr(0, colon + 1)) + "***";
    }
    const auto host = scheme_end + 3;
    auto after_host = host;
    if (host < url.size() && url[host] == '[') { // an IPv6 address's colons
      const auto close = url.find(']', host);
      if (close == std::string_view::npos) // no telling where it ends
        return std::string(url.substr(0, host)) + "***";
      after_host = close + 1;
    }
    const auto end = std::min(url.find('/', after_host), url.size());
    const auto colon = url.find(':', after_host);
    if (colon == std::string_view::npos || colon >= end)
      return std::string(url);
    // Shown only as a whole well-formed host:port[/db]; anything else after
    // the ':' may be a password (a '/' in it unencoded, digits only), so
    // all of it is hidden.
    const auto port = url.substr(colon + 1, end - colon - 1);
    const auto db = end < url.size() ? url.substr(end + 1) : std::string_view{};
    const bool well_formed = colon > host && port_number(port).has_value() &&
                             (db.empty() || all_digits(db));
    if (well_formed)
      return std::string(url);
    return std::string(url.substr(0, colon + 1)) + "***";
  }
  const auto scheme_end = url.find("://");
  const bool scheme =
      scheme_end != std::string_view::npos && scheme_end < at &&
      std::all_of(url.begin(), url.begin() + scheme_end, [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '+' ||
               c == '-' || c == '.';
      });
  const auto start = scheme ? scheme_end + 3 : 0;
  return std::string(url.substr(0, start)) + "***" +
         std::string(url.substr(at));
}

unexpected<error> url_error(std::string_view url, std::string_view why) {
  // Control characters shown as \xHH: a NUL would cut the message short
  // wherever it is printed as a C string.
  std::string shown;
  for (const char c : without_credentials(url)) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      constexpr char digits[] = "0123456789abcdef";
      shown += "\\x";
      shown += digits[u >> 4];
      shown += digits[u & 0xf];
    } else {
      shown += c;
    }
  }
  return make_error(errc::parse_error,
                    "bad Redis URL '" + shown + "': " + std::string(why));
}

/// Decodes %XX escapes; nullopt on a malformed one.
std::optional<std::string> percent_decode(std::string_view s) {
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9')
      return c - '0';
    if (c >= 'a' && c <= 'f')
      return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
      return c - 'A' + 10;
    return -1;
  };
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out.push_back(s[i]);
      continue;
    }
    if (i + 2 >= s.size())
      return std::nullopt;
    const int hi = hex(s[i + 1]);
    const int lo = hex(s[i + 2]);
    if (hi < 0 || lo < 0)
      return std::nullopt;
    out.push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return out;
}

timeval to_timeval(std::chrono::milliseconds ms) {
  timeval tv{};
  tv.tv_sec = static_cast<decltype(tv.tv_sec)>(ms.count() / 1000);
  tv.tv_usec = static_cast<decltype(tv.tv_usec)>((ms.count() % 1000) * 1000);
  return tv;
}

/// Blocks SIGPIPE on this thread while hiredis writes, then discards one
/// raised meanwhile: a write to a connection the server closed must end in
/// EPIPE (an error value), not in the default action (process exit).
class sigpipe_guard {
public:
  sigpipe_guard() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    sigset_t pending;
    sigemptyset(&pending);
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
  }
  ~sigpipe_guard() {
    if (!was_pending_) {
      sigset_t pending;
      sigemptyset(&pending);
      sigpending(&pending);
      if (sigismember(&pending, SIGPIPE) == 1) {
        timespec zero{};
        (void)sigtimedwait(&pipe_, nullptr, &zero);
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  sigpipe_guard(const sigpipe_guard&) = delete;
  sigpipe_guard& operator=(const sigpipe_guard&) = delete;

private:
  sigset_t pipe_{};
  sigset_t old_{};
  bool was_pending_ = false;
};

struct reply_deleter {
  void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using reply_ptr = std::unique_ptr<redisReply, reply_deleter>;

} // namespace

result<redis_endpoint> parse_redis_url(std::string_view url) {
  constexpr std::string_view scheme = "redis://";
  if (url.substr(0, 9) == "rediss://")
    return url_error(url, "TLS (rediss://) is not supported");
  if (url.substr(0, scheme.size()) != scheme)
    return url_error(url, "scheme must be redis://");
  // A NUL would end the host where hiredis reads it (redis://h\0x reached
  // host "h"); a space or another control character is never part of a
  // host, port or database, and the credentials carry them %-encoded.
  if (std::any_of(url.begin(), url.end(), [](char c) {
        const auto u = static_cast<unsigned char>(c);
        return u <= 0x20 || u == 0x7f;
      }))
    return url_error(url, "spaces and control characters (NUL included) are "
                          "not allowed; %-encode them in the credentials");
  auto rest = url.substr(scheme.size());
  // Credentials end at the last '@'; a '/', '?' or '#' before it belongs
  // to them, unencoded (a '@' cannot follow the host).
  if (const auto at = rest.rfind('@');
      at != std::string_view::npos &&
      rest.substr(0, at).find_first_of("/?#") != std::string_view::npos)
    return url_error(url, "percent-encode '/', '?' and '#' in the "
                          "credentials (%2F, %3F, %23)");
  if (rest.find_first_of("?#") != std::string_view::npos)
    return url_error(url, "query strings and fragments are not supported");
  auto slash = rest.find('/');
  auto authority = rest.substr(0, slash);
  redis_endpoint ep;
  if (auto at = authority.rfind('@'); at != std::string_view::npos) {
    const auto userinfo = authority.substr(0, at);
    authority = authority.substr(at + 1);
    const auto colon = userinfo.find(':');
    if (colon == std::string_view::npos)
      return url_error(url, "credentials must be user:password or :password");
    auto user = percent_decode(userinfo.substr(0, colon));
    auto password = percent_decode(userinfo.substr(colon + 1));
    if (!user || !password)
      return url_error(url, "bad %-escape in the credentials");
    if (password->empty())
      return url_error(url, "empty password");
    ep.user = std::move(*user);
    ep.password = std::move(*password);
  }
  std::string_view port;
  bool has_port = false;
  if (!authority.empty() && authority.front() == '[') {
    auto close = authority.find(']');
    if (close == std::string_view::npos)
      return url_error(url, "unterminated '[' in host");
    ep.host = std::string(authority.substr(1, close - 1));
    auto after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':')
        return url_error(url, "unexpected text after ']'");
      port = after.substr(1);
      has_port = true;
    }
  } else {
    auto colon = authority.find(':');
    if (colon != std::string_view::npos &&
        authority.find(':', colon + 1) != std::string_view::npos)
      return url_error(url, "an IPv6 host must be in brackets");
    ep.host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) {
      port = authority.substr(colon + 1);
      has_port = true;
    }
  }
  if (ep.host.empty())
    return url_error(url, "empty host (a Unix socket path is not supported: "
                          "give host[:port])");
  if (has_port) {
    const auto number = port_number(port);
    if (!number)
      return url_error(url, "port must be a number in 1..65535");
    ep.port = *number;
  }
  if (slash != std::string_view::npos) {
    auto db = rest.substr(slash + 1);
    if (!db.empty()) {
      std::uint32_t value = 0;
      auto [end, ec] = std::from_chars(db.data(), db.data() + db.size(), value);
      if (!all_digits(db) || ec != std::errc{} || end != db.data() + db.size())
        return url_error(url, "database must be a non-negative number");
      ep.db = value;
    }
  }
  return ep;
}

result<std::unique_ptr<redis_query_store>>
redis_query_store::open(redis_query_store_config config) {
  auto ep = parse_redis_url(config.url);
  if (!ep)
    return unexpected<error>{ep.error()};
  // Bounded above too: reconnect_after is added to the clock's
  // nanoseconds (milliseconds::max() would wrap to -1 ms and never back
  // off), and hiredis takes the timeouts as a timeval.
  if (auto ok = check_duration("redis_query_store_config.connect_timeout",
                               config.connect_timeout);
      !ok)
    return unexpected<error>{ok.error()};
  if (auto ok = check_duration("redis_query_store_config.command_timeout",
                               config.command_timeout);
      !ok)
    return unexpected<error>{ok.error()};
  if (auto ok = check_duration("redis_query_store_config.reconnect_after",
                               config.reconnect_after, true);
      !ok)
    return unexpected<error>{ok.error()};
  // Without a prefix the query strings are raw Redis keys, and set would
  // overwrite whatever other applications keep under them.
  if (config.key_prefix.empty())
    return make_error(errc::invalid_argument,
                      "redis_query_store_config.key_prefix must not be empty: "
                      "without it query strings are raw Redis keys and the "
                      "cache would overwrite other applications' keys");
  if (config.max_value_bytes == 0 ||
      config.max_value_bytes > redis_query_store_config::max_value_bytes_limit)
    return make_error(
        errc::invalid_argument,
        "redis_query_store_config.max_value_bytes must be in 1.." +
            std::to_string(redis_query_store_config::max_value_bytes_limit) +
            ", not " + std::to_string(config.max_value_bytes));
  return std::unique_ptr<redis_query_store>{
      new redis_query_store(std::move(config), std::move(*ep))};
}

redis_query_store::redis_query_store(redis_query_store_config config,
                                     redis_endpoint ep)
    : config_(std::move(config)), endpoint_(std::move(ep)),
      resolver_(std::make_unique<engine::host_resolver>()) {}

redis_query_store::~redis_query_store() {
  disconnect();
}

void redis_query_store::disconnect() noexcept {
  if (ctx_ != nullptr)
    redisFree(ctx_);
  ctx_ = nullptr;
}

namespace {

std::string where(const redis_endpoint& ep) {
  return "Redis " + ep.host + ":" + std::to_string(ep.port);
}

/// One command: its name and arguments (at most 8 in all).
using command_args = std::initializer_list<std::string_view>;

/// Sets a connection-level error on `ctx`, as hiredis does for its own.
void set_context_error(redisContext* ctx, int type, const std::string& what) {
  ctx->err = type;
  std::snprintf(ctx->errstr, sizeof ctx->errstr, "%s", what.c_str());
}

/// Sends `commands` in one write and reads one reply to each, all within
/// `timeout` of the call: the write and every byte of every reply. (A
/// timeout per read would let a server that trickles its reply, one byte
/// within each timeout, hold the calling thread for as long as it likes.)
/// The replies read go to `replies`, in order. False on a connection-level
/// failure, with ctx->err and ctx->errstr saying what (REDIS_ERR_IO "no
/// complete reply within N ms" on the deadline); the context is then
/// unusable. REQUIRES: `ctx` is non-blocking (make_non_blocking).
bool run_pipeline(redisContext* ctx, std::span<const command_args> commands,
                  std::chrono::milliseconds timeout,
                  std::vector<reply_ptr>& replies) {
  using steady = std::chrono::steady_clock;
  const auto deadline = steady::now() + timeout;
  for (const command_args& args : commands) {
    std::array<const char*, 8> argv{};
    std::array<std::size_t, 8> lens{};
    std::size_t n = 0;
    for (auto a : args) {
      argv[n] = a.data();
      lens[n] = a.size();
      ++n;
    }
    if (redisAppendCommandArgv(ctx, static_cast<int>(n), argv.data(),
                               lens.data()) != REDIS_OK)
      return false;
  }
  sigpipe_guard guard;
  bool written = false;
  while (replies.size() < commands.size()) {
    // A reply may be complete in what was read already.
    void* raw = nullptr;
    if (redisGetReplyFromReader(ctx, &raw) != REDIS_OK)
      return false;
    if (raw != nullptr) {
      replies.emplace_back(static_cast<redisReply*>(raw));
      continue;
    }
    const auto left =
        std::chrono::ceil<std::chrono::milliseconds>(deadline - steady::now());
    if (left.count() <= 0) {
      set_context_error(ctx, REDIS_ERR_IO,
                        "no complete reply within " +
                            std::to_string(timeout.count()) + " ms");
      return false;
    }
    pollfd p{ctx->fd, static_cast<short>(written ? POLLIN : POLLOUT), 0};
    const int ready = ::poll(&p, 1, static_cast<int>(left.count()));
    if (ready < 0 && errno != EINTR) {
      set_context_error(ctx, REDIS_ERR_IO, std::strerror(errno));
      return false;
    }
    if (ready <= 0)
      continue; // the deadline is checked above
    if (!written) {
      int done = 0;
      if (redisBufferWrite(ctx, &done) != REDIS_OK)
        return false;
      written = done != 0;
    } else if (redisBufferRead(ctx) != REDIS_OK) {
      return false;
    }
  }
  return true;
}

/// Runs one command as run_pipeline does; null on a connection-level
/// failure.
reply_ptr run_command(redisContext* ctx, command_args args,
                      std::chrono::milliseconds timeout) {
  std::vector<reply_ptr> replies;
  const command_args one[] = {args};
  if (!run_pipeline(ctx, one, timeout, replies))
    return nullptr;
  return std::move(replies.front());
}

/// Turns a connected blocking context into a non-blocking one, so that
/// run_pipeline's reads and writes never wait (poll does, up to the
/// deadline). hiredis then takes EAGAIN as "try again", not as an error.
bool make_non_blocking(redisContext* ctx) {
  const int flags = ::fcntl(ctx->fd, F_GETFL);
  if (flags < 0 || ::fcntl(ctx->fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    set_context_error(ctx, REDIS_ERR_IO, std::strerror(errno));
    return false;
  }
  ctx->flags &= ~REDIS_BLOCK;
  return true;
}

} // namespace

error redis_query_store::failed(engine::nanos now, error e) {
  disconnect();
  backing_off_ = true;
  retry_at_ =
      now + std::chrono::duration_cast<engine::nanos>(config_.reconnect_after);
  last_failure_ = e.message;
  return e;
}

error redis_query_store::command_failed(engine::nanos now,
                                        std::string_view command,
                                        std::string_view said) {
  error e{errc::backend_error, where(endpoint_) + ": " + std::string(command) +
                                   " failed: " + ctx_->errstr};
  if (!said.empty())
    e.message += " (Redis said: " + std::string(said) + ")";
  if (ctx_->err != REDIS_ERR_EOF)
    return failed(now, std::move(e));
  // A server that closes a new connection before answering anything
  // (maxclients, protected mode, a proxy whose backend is down) would
  // otherwise cost every call a connect and a failure.
  if (!answered_) {
    e.message += " before answering any command";
    return failed(now, std::move(e));
  }
  // The server closed a connection that worked (its idle timeout, CLIENT
  // KILL, a restart): nothing says it is down or slow, so the next call
  // connects again at once. A server that is down then fails that connect
  // quickly and backs off.
  disconnect();
  e.message += " (the next call connects again)";
  return e;
}

bool redis_query_store::closed_while_idle() const noexcept {
  // The server closed a connection that had answered before this call (its
  // idle `timeout`, a proxy's idle limit, CLIENT KILL, a restart): the
  // command did not reach it, and the call connects again and retries
  // once (GETRANGE, EXISTS and SET are idempotent) rather than failing.
  return ctx_ != nullptr && ctx_->err == REDIS_ERR_EOF && answered_;
}

result<void>
redis_query_store::run_reconnecting(engine::nanos now, std::string_view command,
                                    const std::function<bool()>& attempt,
                                    const std::string* said) {
  for (bool first = true;; first = false) {
    const auto connects = connects_;
    if (auto c = ensure_connected(now); !c)
      return c;
    if (attempt())
      return {};
    const bool again = first && connects_ == connects && closed_while_idle();
    auto e = command_failed(now, command,
                            said != nullptr ? std::string_view{*said}
                                            : std::string_view{});
    if (!again)
      return unexpected<error>{std::move(e)};
  }
}

result<redisContext*> redis_query_store::connect_in_time() {
  using steady = std::chrono::steady_clock;
  // hiredis would resolve the name itself, with getaddrinfo and no bound:
  // resolve it here within the timeout and hand hiredis numeric addresses.
  const auto deadline = steady::now() + config_.connect_timeout;
  auto addresses = resolver_->resolve(endpoint_.host, config_.connect_timeout);
  if (!addresses)
    return make_error(errc::backend_error,
                      where(endpoint_) + ": " + addresses.error().message);
  std::string why = "no address";
  std::size_t tried = 0;
  for (const std::string& address : *addresses) {
    const auto left =
        std::chrono::ceil<std::chrono::milliseconds>(deadline - steady::now());
    if (left.count() <= 0) {
      why = "timed out after " +
            std::to_string(config_.connect_timeout.count()) + " ms";
      break;
    }
    ++tried;
    redisContext* c = nullptr;
    {
      sigpipe_guard guard;
      c = redisConnectWithTimeout(address.c_str(), endpoint_.port,
                                  to_timeval(left));
    }
    if (c == nullptr)
      return make_error(errc::backend_error,
                        where(endpoint_) + ": cannot allocate a connection");
    if (c->err == 0)
      return c;
    why = (address == endpoint_.host ? "" : address + ": ") + c->errstr;
    redisFree(c);
  }
  if (addresses->size() > 1)
    why += " (tried " + std::to_string(tried) + " of " +
           std::to_string(addresses->size()) + " addresses)";
  return make_error(errc::backend_error,
                    where(endpoint_) + ": connect failed: " + why);
}

result<void> redis_query_store::ensure_connected(engine::nanos now) {
  if (ctx_ != nullptr)
    return {};
  if (backing_off_ && now < retry_at_)
    return make_error(
        errc::backend_error,
        where(endpoint_) + ": not connected since a failure (" + last_failure_ +
            "); next attempt in " +
            std::to_string(
                std::chrono::ceil<std::chrono::milliseconds>(retry_at_ - now)
                    .count()) +
            " ms");
  ++connects_;
  auto c = connect_in_time();
  if (!c)
    return unexpected<error>{failed(now, std::move(c.error()))};
  if (!make_non_blocking(*c)) {
    std::string why = (*c)->errstr;
    redisFree(*c);
    return unexpected<error>{failed(
        now, error{errc::backend_error,
                   where(endpoint_) +
                       ": cannot make the socket non-blocking: " + why})};
  }
  ctx_ = *c;
  answered_ = false;
  if (!endpoint_.password.empty()) {
    auto r =
        endpoint_.user.empty()
            ? run_command(ctx_, {"AUTH", endpoint_.password},
                          config_.command_timeout)
            : run_command(ctx_, {"AUTH", endpoint_.user, endpoint_.password},
                          config_.command_timeout);
    if (!r || r->type == REDIS_REPLY_ERROR) {
      std::string why = r ? std::string(r->str, r->len) : ctx_->errstr;
      return unexpected<error>{failed(
          now,
          error{errc::backend_error,
                where(endpoint_) + ": AUTH" +
                    (endpoint_.user.empty() ? ""
                                            : " as '" + endpoint_.user + "'") +
                    " failed: " + why})};
    }
    answered_ = true;
  }
  if (endpoint_.db != 0) {
    auto db = std::to_string(endpoint_.db);
    auto r = run_command(ctx_, {"SELECT", db}, config_.command_timeout);
    if (!r || r->type == REDIS_REPLY_ERROR) {
      std::string why = r ? std::string(r->str, r->len) : ctx_->errstr;
      return unexpected<error>{
          failed(now, error{errc::backend_error,
                            where(endpoint_) + ": SELECT " + db + ": " + why})};
    }
    answered_ = true;
  }
  backing_off_ = false;
  return {};
}

namespace {

/// The text of an error reply to `commands`; a refusal by Redis's ACLs
/// says which commands the store's user needs.
std::string error_reply(std::string_view commands, const redisReply& r) {
  std::string text =
      std::string(commands) + " error reply: " + std::string(r.str, r.len);
  if (text.find("NOPERM") != std::string::npos)
    text += " (the store's Redis user needs +getrange +exists +set, and "
            "+select for a database other than 0)";
  return text;
}

} // namespace

result<std::optional<std::string>>
redis_query_store::get(const std::string& key, engine::nanos now) {
  // At most max_value_bytes + 1 bytes come back, whatever another program
  // stored under the key: a GET of a value of MiBs would time out, and a
  // timeout drops the connection and backs off every key. GETRANGE of a
  // missing key is "", as is an empty value: EXISTS, in the same pipeline,
  // tells them apart. (Redis runs the commands of one read back to back; a
  // key set or removed between the two can only make "" read as an empty
  // value or as missing.) A key of another type is a WRONGTYPE error
  // reply, as for GET.
  const auto redis = redis_key(key);
  const auto last = std::to_string(config_.max_value_bytes);
  const command_args commands[] = {{"GETRANGE", redis, "0", last},
                                   {"EXISTS", redis}};
  std::vector<reply_ptr> replies;
  // A first attempt cut off after some of its replies leaves them in
  // `replies`: the retry reads its own two, not one (one would stay unread
  // on the new connection, and every later command would read the one
  // before). An error reply read before the cut (Redis over maxclients
  // answers one, then closes) is what the failure quotes: before, it said
  // only that the server closed the connection.
  std::string said;
  if (auto ok = run_reconnecting(
          now, "GETRANGE/EXISTS",
          [&] {
            replies.clear();
            said.clear();
            if (run_pipeline(ctx_, commands, config_.command_timeout, replies))
              return true;
            for (const reply_ptr& r : replies)
              if (r->type == REDIS_REPLY_ERROR) {
                said.assign(r->str, r->len);
                break;
              }
            return false;
          },
          &said);
      !ok)
    return unexpected<error>{ok.error()};
  const redisReply& range = *replies[0];
  const redisReply& exists = *replies[1];
  answered_ = answered_ || range.type != REDIS_REPLY_ERROR ||
              exists.type != REDIS_REPLY_ERROR;
  // EXISTS refused (its ACL, say) would make every miss read as an empty
  // value.
  if (range.type == REDIS_REPLY_STRING && exists.type == REDIS_REPLY_ERROR)
    return make_error(errc::backend_error,
                      where(endpoint_) + ": " + error_reply("EXISTS", exists));
  switch (range.type) {
  case REDIS_REPLY_STRING:
    if (range.len > config_.max_value_bytes)
      return make_error(errc::backend_error,
                        where(endpoint_) + ": GETRANGE: a value longer than " +
                            last +
                            " bytes (max_value_bytes) is not this store's");
    if (range.len == 0 && exists.type == REDIS_REPLY_INTEGER &&
        exists.integer == 0)
      return std::optional<std::string>{};
    return std::optional<std::string>{std::string(range.str, range.len)};
  case REDIS_REPLY_ERROR:
    return make_error(errc::backend_error,
                      where(endpoint_) + ": " + error_reply("GETRANGE", range));
  default:
    return make_error(errc::backend_error,
                      where(endpoint_) + ": GETRANGE: unexpected reply type " +
                          std::to_string(range.type));
  }
}

result<void> redis_query_store::set(const std::string& key,
                                    const std::string& value, engine::nanos ttl,
                                    engine::nanos now) {
  if (ttl <= engine::nanos{0})
    return make_error(errc::invalid_argument,
                      "query cache TTL must be positive");
  // get reads no more than this back.
  if (value.size() > config_.max_value_bytes)
    return make_error(errc::value_too_large,
                      "query store value of " + std::to_string(value.size()) +
                          " bytes is longer than max_value_bytes (" +
                          std::to_string(config_.max_value_bytes) + ")");
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(ttl).count();
  auto ttl_ms = std::to_string(ms);
  reply_ptr r;
  if (auto ok = run_reconnecting(
          now, "SET",
          [&] {
            r = run_command(ctx_, {"SET", redis_key(key), value, "PX", ttl_ms},
                            config_.command_timeout);
            return r != nullptr;
          });
      !ok)
    return unexpected<error>(ok.error());
  answered_ = answered_ || r->type != REDIS_REPLY_ERROR;
  if (r->type == REDIS_REPLY_ERROR)
    return make_error(errc::backend_error,
                      where(endpoint_) + ": " + error_reply("SET", *r));
  if (r->type != REDIS_REPLY_STATUS)
    return make_error(errc::backend_error, where(endpoint_) +
                                               ": SET: unexpected reply type " +
                                               std::to_string(r->type));
  return {};
}

} // namespace kvfleet::actors
