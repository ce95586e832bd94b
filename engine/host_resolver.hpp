#pragma once
/// `host_resolver`: a host name's addresses within a time bound.
/// getaddrinfo() has no timeout of its own: a slow or unreachable DNS
/// server holds the caller for the resolver's whole timeout (seconds, times
/// its attempts). The resolver runs each lookup on a detached helper thread
/// and waits for it at most the caller's timeout; a lookup still running
/// then is left to finish on its own (it owns everything it touches), and
/// the next call for the same host, from any thread, waits for that
/// lookup instead of starting another, so a DNS that stays slow costs at
/// most one helper thread per host name and resolver. A numeric address
/// is answered at once, without a thread. An answer that comes when
/// nobody is waiting for it any more is kept for the next call for that
/// host only while it is younger than the resolver's `max_age` (30 s by
/// default): an older one is dropped and the name looked up again, so a
/// changed DNS answer is not missed because a lookup was left hours ago.
///
/// Shared by the modules that open connections by name: actors' Redis
/// query store and cuda's TCP block transport. It lives in engine because
/// both may include engine and neither may include the other; engine
/// itself does not use it.
///
/// Thread safety: resolve() may be called from several threads at once
/// (cuda's TCP transport keeps one resolver for the process); callers of
/// the same host share its lookup and its answer.

#include "engine/clock.hpp"
#include "engine/result.hpp"

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace kvfleet::engine {

/// What a lookup found: numeric addresses ("127.0.0.1", "::1") in the
/// system's order, or why none (a message for people).
using host_lookup_result = result<std::vector<std::string>>;

/// Looks a name up, blocking: the system resolver by default
/// (getaddrinfo, SOCK_STREAM, any family). Each helper thread runs a copy
/// of it and may outlive the resolver, so a custom function must own what
/// it uses (capture by value or shared_ptr, never a reference or a raw
/// `this`). REQUIRES: safe to call from any thread.
using host_lookup_fn =
    std::function<host_lookup_result(const std::string& host)>;

/// The system resolver: getaddrinfo, numeric results; errc::not_found
/// naming `host` and saying why (gai_strerror) when it finds nothing.
[[nodiscard]] host_lookup_result system_host_lookup(const std::string& host);

/// The resolver's time: a monotonic clock, read on the callers' threads and
/// on the lookups' helper threads, which keep a copy of it and may outlive
/// the resolver (a function, not a clock_source reference, so a test's
/// clock can be shared with them). REQUIRES: safe to call from any thread,
/// and does not throw (it is read where an exception ends the process).
using host_clock_fn = std::function<nanos()>;

/// `host` as messages show it: at most its first 64 bytes (then "..."),
/// a NUL as "\0".
[[nodiscard]] std::string printable_host(std::string_view host);

/// The steady clock (steady_clock_source).
[[nodiscard]] nanos steady_host_clock() noexcept;

class host_resolver {
public:
  /// The longest host resolve() takes: a DNS name has at most 253
  /// characters, 254 written with its trailing dot.
  static constexpr std::size_t max_host_bytes = 254;
  /// How long an answer that nobody waited for is kept for the next call.
  static constexpr std::chrono::seconds default_max_age{30};

  /// A resolver looking names up with `fn`. An answer that arrives after
  /// its callers stopped waiting is served to the next call for its host
  /// while its age, on `clock`, from when the lookup finished, is below
  /// `max_age`; from `max_age` on it is dropped and that call starts a new
  /// lookup (0 or less: such answers are never served). Answers a caller
  /// waited for are always served. An empty `fn` or `clock` is the
  /// default one.
  explicit host_resolver(host_lookup_fn fn = system_host_lookup,
                         nanos max_age = default_max_age,
                         host_clock_fn clock = steady_host_clock);
  ~host_resolver();
  host_resolver(const host_resolver&) = delete;
  host_resolver& operator=(const host_resolver&) = delete;

  /// The addresses of `host`, waiting at most `timeout` for the lookup.
  /// Errors: errc::invalid_argument for a host that is empty, longer than
  /// max_host_bytes or holds a NUL (it was cut at the NUL), before any
  /// lookup; the lookup's own
  /// (errc::not_found for a name that does not resolve), errc::timeout "cannot
  /// resolve '<host>' within N ms" when it is still running, errc::unavailable
  /// when no helper thread can be started. REQUIRES: timeout >= 0; one
  /// above max_wait waits max_wait. A lookup function that throws is
  /// errc::unavailable saying so, whatever it throws.
  [[nodiscard]] host_lookup_result resolve(const std::string& host,
                                           std::chrono::milliseconds timeout);
  /// The longest resolve() waits: 100 years.
  static constexpr std::chrono::milliseconds max_wait{100ull * 365 * 24 * 3600 *
                                                      1000};

  struct lookup; ///< one lookup's state, shared with its helper thread

private:
  host_lookup_fn lookup_;
  nanos max_age_;
  host_clock_fn clock_;
  std::mutex mutex_; ///< guards pending_
  /// Per host, the lookup in progress, or finished with nobody back yet
  /// for its answer (its callers stopped waiting): the next call for the
  /// host takes it if it is younger than max_age_, else drops it. Finished
  /// ones are dropped once max_kept hosts are kept.
  std::unordered_map<std::string, std::shared_ptr<lookup>> pending_;
  static constexpr std::size_t max_kept = 64;
};

} // namespace kvfleet::engine
