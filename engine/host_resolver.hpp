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
/// is answered at once, without a thread.
///
/// Shared by the modules that open connections by name: actors' Redis
/// query store and cuda's TCP block transport. It lives in engine because
/// both may include engine and neither may include the other; engine
/// itself does not use it.
///
/// Thread safety: resolve() may be called from several threads at once
/// (cuda's TCP transport keeps one resolver for the process); callers of
/// the same host share its lookup and its answer.

#include "engine/result.hpp"

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvfleet::engine {

/// What a lookup found: numeric addresses ("127.0.0.1", "::1") in the
/// system's order, or why none (a message for people).
using host_lookup_result = result<std::vector<std::string>>;

/// Looks a name up, blocking: the system resolver by default
/// (getaddrinfo, SOCK_STREAM, any family).
using host_lookup_fn =
    std::function<host_lookup_result(const std::string& host)>;

/// The system resolver: getaddrinfo, numeric results; errc::not_found
/// naming `host` and saying why (gai_strerror) when it finds nothing.
[[nodiscard]] host_lookup_result system_host_lookup(const std::string& host);

class host_resolver {
public:
  explicit host_resolver(host_lookup_fn fn = system_host_lookup);
  ~host_resolver();
  host_resolver(const host_resolver&) = delete;
  host_resolver& operator=(const host_resolver&) = delete;

  /// The addresses of `host`, waiting at most `timeout` for the lookup.
  /// Errors: the lookup's own (errc::not_found for a name that does not
  /// resolve), errc::timeout "cannot resolve '<host>' within N ms" when it
  /// is still running, errc::unavailable when no helper thread can be
  /// started. REQUIRES: timeout >= 0.
  [[nodiscard]] host_lookup_result resolve(const std::string& host,
                                           std::chrono::milliseconds timeout);

  struct lookup; ///< one lookup's state, shared with its helper thread

private:
  host_lookup_fn lookup_;
  std::mutex mutex_; ///< guards pending_
  /// Per host, the lookup in progress, or finished with nobody back yet
  /// for its answer (its callers stopped waiting): the next call for the
  /// host takes it. Finished ones are dropped once max_kept hosts are
  /// kept.
  std::unordered_map<std::string, std::shared_ptr<lookup>> pending_;
  static constexpr std::size_t max_kept = 64;
};

} // namespace kvfleet::engine
