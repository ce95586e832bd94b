#include "engine/host_resolver.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <condition_variable>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <utility>

namespace kvfleet::engine {

struct host_resolver::lookup {
  explicit lookup(std::string h) : host(std::move(h)) {}
  const std::string host;
  std::mutex mutex;
  std::condition_variable done_cv;
  std::optional<host_lookup_result> done; ///< set once, under `mutex`
  nanos done_at{0}; ///< when `done` was set (the resolver's clock)
};

namespace {

bool is_numeric(const std::string& host) {
  in6_addr v6{};
  in_addr v4{};
  return ::inet_pton(AF_INET, host.c_str(), &v4) == 1 ||
         ::inet_pton(AF_INET6, host.c_str(), &v6) == 1;
}

} // namespace

std::string printable_host(std::string_view host) {
  std::string out;
  for (const char c : host.substr(0, 64))
    out += c == '\0' ? std::string("\\0") : std::string(1, c);
  if (host.size() > 64)
    out += "...";
  return out;
}

host_lookup_result system_host_lookup(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (const int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &res);
      rc != 0)
    return make_error(errc::not_found, "cannot resolve '" +
                                           printable_host(host) +
                                           "': " + ::gai_strerror(rc));
  std::vector<std::string> out;
  for (const addrinfo* a = res; a != nullptr; a = a->ai_next) {
    char text[NI_MAXHOST];
    if (::getnameinfo(a->ai_addr, a->ai_addrlen, text, sizeof text, nullptr, 0,
                      NI_NUMERICHOST) == 0)
      out.emplace_back(text);
  }
  ::freeaddrinfo(res);
  if (out.empty())
    return make_error(errc::not_found, "cannot resolve '" +
                                           printable_host(host) +
                                           "': no address");
  return out;
}

nanos steady_host_clock() noexcept {
  return steady_clock_source::instance().now();
}

host_resolver::host_resolver(host_lookup_fn fn, nanos max_age,
                             host_clock_fn clock)
    : lookup_(fn ? std::move(fn) : host_lookup_fn{system_host_lookup}),
      max_age_(max_age),
      clock_(clock ? std::move(clock) : host_clock_fn{steady_host_clock}) {}

host_resolver::~host_resolver() = default;

host_lookup_result host_resolver::resolve(const std::string& host,
                                          std::chrono::milliseconds timeout) {
  // Checked here, not by the lookup: getaddrinfo reads a C string, so a
  // host with a NUL was cut at it (and connected to what came before).
  if (host.empty())
    return make_error(errc::invalid_argument, "empty host name");
  if (host.size() > max_host_bytes)
    return make_error(errc::invalid_argument,
                      "host name of " + std::to_string(host.size()) +
                          " bytes (at most " + std::to_string(max_host_bytes) +
                          "): '" + printable_host(host) + "'");
  if (host.find('\0') != std::string::npos)
    return make_error(errc::invalid_argument, "host name holds a NUL byte: '" +
                                                  printable_host(host) + "'");
  if (is_numeric(host))
    return std::vector<std::string>{host};
  std::shared_ptr<lookup> l;
  {
    const std::lock_guard<std::mutex> guard(mutex_);
    // Answers nobody came back for stay until their host is asked again
    // (served then only while younger than max_age_); past max_kept hosts
    // the finished ones go (their threads are gone).
    // Lock order: the resolver's mutex, then a lookup's; a helper thread
    // takes only its lookup's.
    if (pending_.size() >= max_kept)
      std::erase_if(pending_, [&](const auto& entry) {
        const std::lock_guard<std::mutex> done_guard(entry.second->mutex);
        return entry.second->done.has_value();
      });
    if (const auto it = pending_.find(host); it != pending_.end()) {
      bool stale = false;
      {
        const std::lock_guard<std::mutex> done_guard(it->second->mutex);
        stale = it->second->done.has_value() &&
                clock_() - it->second->done_at >= max_age_;
      }
      // An answer left this long ago may no longer be the name's: drop it
      // and look the name up again.
      if (stale)
        pending_.erase(it);
      else
        l = it->second;
    }
    if (!l) {
      l = std::make_shared<lookup>(host);
      try {
        std::thread([l, fn = lookup_, clock = clock_] {
          host_lookup_result r = make_error(errc::unavailable, "not looked up");
          try {
            r = fn(l->host);
          } catch (const std::exception& e) { // bad_alloc, say: never escapes
            r = make_error(errc::unavailable,
                           "cannot resolve '" + l->host + "': " + e.what());
          } catch (...) { // a lookup of the caller's throwing anything else
            r = make_error(errc::unavailable,
                           "cannot resolve '" + l->host +
                               "': the lookup threw an exception that is "
                               "not a std::exception");
          }
          const std::lock_guard<std::mutex> lock(l->mutex);
          // Stamped under the lookup's mutex: whoever sees the answer sees
          // its time.
          l->done_at = clock();
          l->done.emplace(std::move(r));
          l->done_cv.notify_all();
        }).detach();
      } catch (const std::exception& e) { // system_error: no thread
        return make_error(errc::unavailable,
                          "cannot resolve '" + printable_host(host) +
                              "': no helper thread: " + e.what());
      }
      pending_.emplace(host, l);
    }
  }
  std::unique_lock<std::mutex> lock(l->mutex);
  // wait_for converts to the clock's nanoseconds: past ~292 years that
  // overflowed and a caller waiting "for ever" timed out at once.
  const auto wait = std::min<std::chrono::milliseconds>(timeout, max_wait);
  if (!l->done_cv.wait_for(lock, wait, [&] { return l->done.has_value(); }))
    return make_error(errc::timeout,
                      "cannot resolve '" + printable_host(host) + "' within " +
                          std::to_string(timeout.count()) + " ms");
  host_lookup_result r = *l->done; // a copy: other callers may share it
  lock.unlock();
  const std::lock_guard<std::mutex> guard(mutex_);
  if (const auto it = pending_.find(host);
      it != pending_.end() && it->second == l)
    pending_.erase(it);
  return r;
}

} // namespace kvfleet::engine
