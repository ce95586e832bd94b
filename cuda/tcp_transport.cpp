#include "cuda/tcp_transport.hpp"

#include "cuda/internal/tcp_socket.hpp"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace kvfleet::cuda {

using internal::recv_all;
using internal::send_all;
using internal::sizes_digest;

namespace {

/// A frame's first 4 bytes, which also name the wire version: "KVF4"
/// (little-endian) since a side confirms the blocks it received and waits
/// for the confirmation of those it sent; "KVF3" (every side confirmed
/// every frame, empty ones too) was version 3, "KVF2" (frames carry what
/// their sender expects back, no confirmation) version 2, "KVFB" 1.
constexpr std::uint32_t magic = 0x3446564bU;    // "KVF4"
constexpr std::uint32_t magic_v3 = 0x3346564bU; // "KVF3"
constexpr std::uint32_t magic_v2 = 0x3246564bU; // "KVF2"
constexpr std::uint32_t magic_v1 = 0x4246564bU; // "KVFB"
/// What a side that received blocks sends once it has the peer's whole
/// frame; a side that sent blocks succeeds only when the peer's arrives
/// (its 4 bytes follow the peer's frame in the stream).
constexpr std::uint32_t received_mark = 0x6146564bU; // "KVFa"
/// magic, block count, the sizes' digest, expected count, expected sizes'
/// digest.
constexpr std::size_t header_bytes = 4 + 4 + 8 + 4 + 8;

unexpected<error> sys_error(std::string_view call) {
  return make_error(errc::io_error, std::string(call) + ": " +
                                        std::generic_category().message(errno));
}

using steady = internal::tcp_clock;

/// Longest timeout a caller may set; also keeps poll()'s int milliseconds
/// from wrapping.
constexpr std::chrono::milliseconds max_timeout = std::chrono::hours(24);

result<void> check_timeout(std::string_view what, std::chrono::milliseconds t,
                           bool zero_ok) {
  if ((zero_ok ? t.count() < 0 : t.count() <= 0) || t > max_timeout)
    return make_error(errc::invalid_argument,
                      std::string(what) + " must be " +
                          (zero_ok ? "0 ms or more" : "above 0 ms") +
                          " and at most 24 h (got " +
                          std::to_string(t.count()) + " ms)");
  return {};
}

void set_nodelay(int fd) {
  // connect()'s sockets are non-blocking and accept()'s are not; it makes
  // no difference: every call that moves bytes waits in poll() against the
  // exchange's deadline, then takes only what is ready (MSG_DONTWAIT).
  const int one = 1;
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/// Waits until `fd` is ready for `events` or `deadline` passes: false on
/// the deadline, an error when poll() fails. Polls at least once, so a
/// deadline already passed still takes what is ready now.
result<bool> wait_ready(int fd, short events, steady::time_point deadline) {
  for (;;) {
    const auto left = std::max(
        std::chrono::milliseconds(0),
        std::chrono::ceil<std::chrono::milliseconds>(deadline - steady::now()));
    pollfd p{fd, events, 0};
    const int rc = ::poll(&p, 1, static_cast<int>(left.count()));
    if (rc > 0)
      return true; // readable, writable, or an error recv/send will report
    if (rc < 0 && errno != EINTR)
      return sys_error("tcp poll");
    if (rc == 0 && steady::now() >= deadline)
      return false;
  }
}

/// Connects a non-blocking socket to `a` before `deadline`: its
/// descriptor, or why not (errc::timeout: the deadline passed first).
result<int> connect_one(const addrinfo& a, steady::time_point deadline) {
  const int fd = ::socket(
      a.ai_family, a.ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a.ai_protocol);
  if (fd < 0)
    return sys_error("socket");
  set_nodelay(fd);
  int err = 0;
  if (::connect(fd, a.ai_addr, a.ai_addrlen) != 0) {
    err = errno;
    // A non-blocking connect goes on in the background after EINTR too.
    if (err == EINPROGRESS || err == EINTR) {
      auto ready = wait_ready(fd, POLLOUT, deadline);
      if (!ready || !*ready) {
        ::close(fd);
        if (!ready)
          return unexpected<error>(ready.error());
        return make_error(errc::timeout, "timed out");
      }
      socklen_t len = sizeof err;
      if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
        err = errno;
    }
  }
  if (err == 0) {
    // Nothing listening on a local port in the ephemeral range: the
    // connect can pick that same port as its own and open to itself (TCP
    // simultaneous open), and every exchange would then read back what it
    // sent.
    if (internal::is_connected_to_itself(fd)) {
      ::close(fd);
      return make_error(errc::io_error,
                        "connected to itself: nothing listens there");
    }
    return fd;
  }
  ::close(fd);
  return make_error(errc::io_error, std::generic_category().message(err));
}

struct addrinfo_deleter {
  void operator()(addrinfo* a) const noexcept { ::freeaddrinfo(a); }
};

/// The resolver's numeric addresses as one getaddrinfo list for
/// connect_first or bind_and_listen, in the resolver's order: `nodes` are
/// copies of the entries of the lists `owned` holds, relinked (link() once
/// filled).
struct numeric_addresses {
  std::vector<std::unique_ptr<addrinfo, addrinfo_deleter>> owned;
  std::vector<addrinfo> nodes;

  const addrinfo* link() {
    for (std::size_t i = 0; i < nodes.size(); ++i)
      nodes[i].ai_next = i + 1 < nodes.size() ? &nodes[i + 1] : nullptr;
    return nodes.empty() ? nullptr : nodes.data();
  }
};

/// Adds `addresses` (numeric: getaddrinfo looks nothing up) with port
/// `service` to `out`; errc::io_error naming `op` and `where` for one that
/// is not numeric (only a test's fake lookup can give one).
result<void> add_numeric(const std::vector<std::string>& addresses,
                         const std::string& service, std::string_view op,
                         std::string_view where, numeric_addresses& out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
  for (const std::string& a : addresses) {
    addrinfo* res = nullptr;
    if (const int rc = ::getaddrinfo(a.c_str(), service.c_str(), &hints, &res);
        rc != 0)
      return make_error(errc::io_error, std::string(op) + "(" +
                                            std::string(where) +
                                            "): the name lookup gave '" + a +
                                            "': " + ::gai_strerror(rc));
    out.owned.emplace_back(res);
    for (const addrinfo* r = res; r != nullptr; r = r->ai_next)
      out.nodes.push_back(*r);
  }
  return {};
}

/// Block sizes go over the wire this many at a time, so a frame's header
/// takes a fixed 32 KiB of stack on each side whatever its block count
/// (allocating it whole could fail for a large batch, and throw on the
/// sender's thread).
constexpr std::size_t sizes_per_piece = 4096;

void put_le(std::byte* out, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i)
    out[i] = static_cast<std::byte>((v >> (8 * i)) & 0xffU);
}

std::uint64_t get_le(const std::byte* p, int bytes) {
  std::uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i)
    v = (v << 8) | std::to_integer<std::uint64_t>(p[i]);
  return v;
}

/// Sends `out` as one frame whose header also says what this side expects
/// back (`in`). The header goes first, in a send of its own, then
/// `header_out` (when given) is set, sent or not: at the start of an
/// exchange the socket holds nothing of an earlier one, so those 28 bytes
/// never wait for the peer to read.
result<void> send_batch(int fd, std::span<const send_block> out,
                        std::span<const recv_block> in,
                        steady::time_point deadline,
                        std::atomic<bool>* header_out = nullptr) {
  std::array<std::byte, 8 * sizes_per_piece> piece;
  put_le(piece.data(), magic, 4);
  put_le(piece.data() + 4, out.size(), 4);
  put_le(piece.data() + 8, sizes_digest(out), 8);
  put_le(piece.data() + 16, in.size(), 4);
  put_le(piece.data() + 20, sizes_digest(in), 8);
  auto r = send_all(fd, piece.data(), header_bytes, deadline);
  if (header_out != nullptr) {
    header_out->store(true);
    header_out->notify_all();
  }
  if (!r)
    return r;
  std::size_t used = 0;
  for (const send_block& b : out) {
    if (used == piece.size()) {
      if (r = send_all(fd, piece.data(), used, deadline); !r)
        return r;
      used = 0;
    }
    put_le(piece.data() + used, b.bytes, 8);
    used += 8;
  }
  if (r = send_all(fd, piece.data(), used, deadline); !r)
    return r;
  for (const send_block& b : out)
    if (r = send_all(fd, b.data, b.bytes, deadline); !r)
      return r;
  return {};
}

/// Receives the peer's frame into `in`. From the peer's fixed-size header,
/// before reading anything more, it checks what the peer sends against
/// `in` ("tcp recv: ..." mismatches) and what the peer expects against
/// `out`, what this side sends ("tcp send: ..."); then every size exactly.
/// errc::wrong_value_size for any mismatch, and only for these.
result<void> recv_batch(int fd, std::span<const recv_block> in,
                        std::span<const send_block> out,
                        steady::time_point deadline) {
  std::array<std::byte, 8 * sizes_per_piece> piece;
  // The magic and count first: a version 1 peer's empty frame is 8 bytes.
  if (auto r = recv_all(fd, piece.data(), 8, deadline); !r)
    return r;
  if (const auto m = get_le(piece.data(), 4); m != magic)
    return make_error(errc::parse_error,
                      m == magic_v1 || m == magic_v2 || m == magic_v3
                          ? std::string("tcp recv: the peer speaks wire "
                                        "version ") +
                                (m == magic_v1   ? "1"
                                 : m == magic_v2 ? "2"
                                                 : "3") +
                                " (an older kvfleet); both ends need version 4"
                          : std::string("tcp recv: not a kvfleet block batch"));
  if (auto r = recv_all(fd, piece.data() + 8, header_bytes - 8, deadline); !r)
    return r;
  const std::uint64_t count = get_le(piece.data() + 4, 4);
  const std::uint64_t expected = get_le(piece.data() + 16, 4);
  if (count != in.size())
    return make_error(errc::wrong_value_size,
                      "tcp recv: peer sent " + std::to_string(count) +
                          " blocks, expected " + std::to_string(in.size()));
  if (get_le(piece.data() + 8, 8) != sizes_digest(in))
    return make_error(errc::wrong_value_size,
                      "tcp recv: peer sent blocks of other sizes than the " +
                          std::to_string(in.size()) + " expected");
  if (expected != out.size())
    return make_error(errc::wrong_value_size,
                      "tcp send: peer expected " + std::to_string(expected) +
                          " blocks, sent " + std::to_string(out.size()));
  if (get_le(piece.data() + 20, 8) != sizes_digest(out))
    return make_error(
        errc::wrong_value_size,
        "tcp send: peer expected blocks of other sizes than the " +
            std::to_string(out.size()) + " sent");
  for (std::size_t first = 0; first < in.size(); first += sizes_per_piece) {
    const std::size_t n = std::min(sizes_per_piece, in.size() - first);
    if (auto r = recv_all(fd, piece.data(), 8 * n, deadline); !r)
      return r;
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint64_t bytes = get_le(piece.data() + 8 * i, 8);
      if (bytes != in[first + i].bytes)
        return make_error(errc::wrong_value_size,
                          "tcp recv: block " + std::to_string(first + i) +
                              " has " + std::to_string(bytes) +
                              " bytes, expected " +
                              std::to_string(in[first + i].bytes));
    }
  }
  for (const recv_block& b : in)
    if (auto r = recv_all(fd, b.data, b.bytes, deadline); !r)
      return r;
  return {};
}

/// Before each step of a transfer: errc::io_error "timed out" once
/// `deadline` has passed, even with the socket ready (a peer that streams
/// or drains steadily keeps it ready, and would stretch the exchange for
/// as long as it goes on), else waits until the socket is ready.
result<void> wait_in_time(int fd, short events, steady::time_point deadline,
                          std::string_view what) {
  const auto timed_out = [what] {
    return make_error(errc::io_error, std::string(what) + ": timed out");
  };
  if (steady::now() >= deadline)
    return timed_out();
  auto ready = wait_ready(fd, events, deadline);
  if (!ready)
    return unexpected<error>(ready.error());
  if (!*ready)
    return timed_out();
  return {};
}

} // namespace

namespace internal {

bool is_connected_to_itself(int fd) {
  sockaddr_storage self_addr{};
  sockaddr_storage peer_addr{};
  socklen_t self_len = sizeof self_addr;
  socklen_t peer_len = sizeof peer_addr;
  return ::getsockname(fd, reinterpret_cast<sockaddr*>(&self_addr),
                       &self_len) == 0 &&
         ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer_addr),
                       &peer_len) == 0 &&
         self_len == peer_len &&
         std::memcmp(&self_addr, &peer_addr, self_len) == 0;
}

result<void> send_all(int fd, const std::byte* p, std::size_t n,
                      steady::time_point deadline) {
  while (n > 0) {
    if (auto ready = wait_in_time(fd, POLLOUT, deadline, "tcp send"); !ready)
      return ready;
    const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
        continue;
      return sys_error("tcp send");
    }
    p += k;
    n -= static_cast<std::size_t>(k);
  }
  return {};
}

result<void> recv_all(int fd, std::byte* p, std::size_t n,
                      steady::time_point deadline) {
  while (n > 0) {
    if (auto ready = wait_in_time(fd, POLLIN, deadline, "tcp recv"); !ready)
      return ready;
    const ssize_t k = ::recv(fd, p, n, MSG_DONTWAIT);
    if (k == 0)
      return make_error(errc::io_error, "tcp recv: peer closed the connection");
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
        continue;
      return sys_error("tcp recv");
    }
    p += k;
    n -= static_cast<std::size_t>(k);
  }
  return {};
}

result<int> bind_and_listen(const addrinfo* addresses, std::string_view where) {
  unexpected<error> last = make_error(errc::io_error, "no address");
  for (const addrinfo* a = addresses; a != nullptr; a = a->ai_next) {
    // Non-blocking: accept() waits in poll, never in accept4, where a
    // connection another thread took first would hold it for good.
    const int fd =
        ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                 a->ai_protocol);
    if (fd < 0) {
      last = sys_error("socket");
      continue;
    }
    const int one = 1;
    (void)::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 16) == 0)
      return fd;
    last = sys_error("tcp bind/listen(" + std::string(where) + ")");
    ::close(fd);
  }
  return last;
}

result<int> connect_first(const addrinfo* addresses,
                          std::chrono::milliseconds timeout,
                          std::string_view where, steady::time_point start) {
  // One deadline for every address: a name with several addresses that
  // cannot answer must not take `timeout` once for each.
  const steady::time_point deadline = start + timeout;
  std::size_t total = 0;
  for (const addrinfo* a = addresses; a != nullptr; a = a->ai_next)
    ++total;
  std::size_t tried = 0;
  std::string why = "no address";
  bool out_of_time = false;
  for (const addrinfo* a = addresses; a != nullptr; a = a->ai_next) {
    if (steady::now() >= deadline) {
      out_of_time = true;
      break;
    }
    ++tried;
    auto fd = connect_one(*a, deadline);
    if (fd)
      return *fd;
    why = fd.error().message;
    out_of_time = fd.error().code == errc::timeout;
  }
  if (out_of_time)
    why = "timed out after " + std::to_string(timeout.count()) + " ms";
  if (total > 1)
    why += " (tried " + std::to_string(tried) + " of " + std::to_string(total) +
           " addresses)";
  return make_error(errc::io_error,
                    "tcp connect(" + std::string(where) + "): " + why);
}

/// The numeric addresses of `host` with port `service`, looked up through
/// `resolver` within `timeout`, added to `out`, for `op` ("tcp connect",
/// "tcp listen"); `on_timeout` when the lookup is still running then.
result<void> resolve_into(const std::string& host, const std::string& service,
                          std::chrono::milliseconds timeout,
                          engine::host_resolver& resolver, std::string_view op,
                          error on_timeout, numeric_addresses& out) {
  const std::string where = engine::printable_host(host) + ":" + service;
  auto found = resolver.resolve(host, timeout);
  if (!found) {
    const error& e = found.error();
    if (e.code == errc::timeout)
      return unexpected<error>(std::move(on_timeout));
    // A host the resolver refuses (empty, too long, with a NUL) is the
    // caller's input: invalid_argument, not the network's io_error.
    const errc code =
        e.code == errc::unavailable || e.code == errc::invalid_argument
            ? e.code
            : errc::io_error;
    return make_error(code, std::string(op) + "(" + where + "): " + e.message);
  }
  return add_numeric(*found, service, op, where, out);
}

result<int> connect_host(const std::string& host, std::uint16_t port,
                         std::chrono::milliseconds timeout,
                         engine::host_resolver& resolver) {
  // One deadline for the lookup and the connects: getaddrinfo has no
  // timeout of its own, and a slow DNS must not hold the caller past it.
  const steady::time_point start = steady::now();
  const std::string service = std::to_string(port);
  const std::string where = engine::printable_host(host) + ":" + service;
  numeric_addresses addresses;
  if (auto ok = resolve_into(
          host, service, timeout, resolver, "tcp connect",
          error{errc::io_error, "tcp connect(" + where + "): timed out after " +
                                    std::to_string(timeout.count()) +
                                    " ms: the name lookup of '" +
                                    engine::printable_host(host) +
                                    "' took all of it"},
          addresses);
      !ok)
    return unexpected<error>(ok.error());
  return connect_first(addresses.link(), timeout, where, start);
}

result<int> listen_host(const std::string& host, std::uint16_t port,
                        std::chrono::milliseconds timeout,
                        engine::host_resolver& resolver) {
  // getaddrinfo has no timeout of its own: a bind name goes through the
  // resolver too, so a dead DNS cannot hold a listen without bound.
  const std::string service = std::to_string(port);
  const std::string where = engine::printable_host(host) + ":" + service;
  numeric_addresses addresses;
  if (auto ok = resolve_into(
          host, service, timeout, resolver, "tcp listen",
          error{errc::timeout,
                "tcp listen(" + where + "): the name lookup of '" +
                    engine::printable_host(host) + "' did not finish within " +
                    std::to_string(timeout.count()) + " ms"},
          addresses);
      !ok)
    return unexpected<error>(ok.error());
  return bind_and_listen(addresses.link(), where);
}

} // namespace internal

namespace {

/// Confirms the batches that moved, each way that carried one: tells the
/// peer its blocks arrived whole when this side received any (`got`), and
/// waits for the peer to say the same of this side's when it sent any
/// (`sent`): until then the batch is only in the socket buffers, and a
/// peer that times out, fails or closes before reading it has not
/// received it (before, the sender reported success for such a batch).
/// The frames agree on what moves (their headers), so the marks pair up:
/// a side that only received does not wait for one, and is done once it
/// has sent its own. Its own frame was sent in full first (the mark
/// follows it in the stream).
result<void> confirm_received(int fd, bool got, bool sent,
                              steady::time_point deadline) {
  std::array<std::byte, 4> mark;
  put_le(mark.data(), received_mark, 4);
  if (got) {
    if (auto r = internal::send_all(fd, mark.data(), mark.size(), deadline); !r)
      return r;
  }
  if (!sent)
    return {};
  if (auto r = internal::recv_all(fd, mark.data(), mark.size(), deadline); !r)
    return make_error(r.error().code,
                      "tcp exchange: the peer did not confirm it received "
                      "this side's batch (" +
                          r.error().message + ")");
  if (get_le(mark.data(), 4) != received_mark)
    return make_error(errc::parse_error,
                      "tcp exchange: the peer's confirmation is not one");
  return {};
}

} // namespace

namespace {

/// One resolver for the process (resolve() is thread-safe), for connects
/// and listens alike: a lookup that runs out of time keeps its helper
/// thread until getaddrinfo returns, and the next call for the same name
/// waits for it instead of starting another, so calls retried against a
/// dead DNS hold one thread per name, not one each.
engine::host_resolver& process_resolver() {
  static engine::host_resolver resolver;
  return resolver;
}

} // namespace

result<std::unique_ptr<tcp_transport>>
tcp_transport::connect(const std::string& host, std::uint16_t port,
                       std::chrono::milliseconds io_timeout) {
  if (auto ok = check_timeout("tcp connect: io_timeout", io_timeout, false);
      !ok)
    return unexpected<error>(ok.error());
  auto fd = internal::connect_host(host, port, io_timeout, process_resolver());
  if (!fd)
    return unexpected<error>(fd.error());
  return std::unique_ptr<tcp_transport>(new tcp_transport(*fd, io_timeout));
}

tcp_transport::~tcp_transport() {
  if (fd_ >= 0)
    ::close(fd_);
}

namespace {

/// errc::invalid_argument when a receive block overlaps a send block: the
/// two sides run on two threads at once (a receive into the bytes being
/// sent), so the peer would get a mix of old and new bytes. Sorted by
/// address, each range is checked against the furthest end of the other
/// kind before it: O(n log n).
result<void> no_send_receive_overlap(std::span<const send_block> out,
                                     std::span<const recv_block> in) {
  struct range {
    std::uintptr_t begin;
    std::uintptr_t end;
    bool receive;
  };
  std::vector<range> all;
  try {
    all.reserve(out.size() + in.size());
  } catch (const std::bad_alloc&) {
    return make_error(errc::out_of_memory,
                      "tcp exchange: no memory to check the blocks");
  }
  for (const send_block& b : out)
    if (b.bytes > 0) {
      const auto a = reinterpret_cast<std::uintptr_t>(b.data);
      all.push_back({a, a + b.bytes, false});
    }
  for (const recv_block& b : in)
    if (b.bytes > 0) {
      const auto a = reinterpret_cast<std::uintptr_t>(b.data);
      all.push_back({a, a + b.bytes, true});
    }
  std::sort(all.begin(), all.end(),
            [](const range& x, const range& y) { return x.begin < y.begin; });
  std::uintptr_t send_end = 0;
  std::uintptr_t recv_end = 0;
  for (const range& r : all) {
    if (r.begin < (r.receive ? send_end : recv_end))
      return make_error(errc::invalid_argument,
                        "tcp exchange: a receive block overlaps a send block "
                        "(they are copied at the same time): use separate "
                        "buffers");
    std::uintptr_t& end = r.receive ? recv_end : send_end;
    end = std::max(end, r.end);
  }
  return {};
}

} // namespace

result<void> tcp_transport::exchange(int peer, std::span<const send_block> out,
                                     std::span<const recv_block> in) {
  if (peer != 0)
    return make_error(errc::invalid_argument,
                      "tcp exchange: peer " + std::to_string(peer) +
                          " (a tcp transport has one peer, 0)");
  // The count on the wire is a u32; checked before anything reads the
  // blocks.
  constexpr std::size_t max_blocks = std::numeric_limits<std::uint32_t>::max();
  if (out.size() > max_blocks || in.size() > max_blocks)
    return make_error(
        errc::value_too_large,
        "tcp exchange: " +
            (out.size() > max_blocks
                 ? std::to_string(out.size()) + " blocks to send"
                 : std::to_string(in.size()) + " blocks to receive") +
            "; a batch has at most " + std::to_string(max_blocks));
  for (const send_block& b : out)
    if (b.data == nullptr && b.bytes > 0)
      return make_error(errc::invalid_argument,
                        "tcp exchange: null send block");
  for (const recv_block& b : in)
    if (b.data == nullptr && b.bytes > 0)
      return make_error(errc::invalid_argument,
                        "tcp exchange: null receive block");
  if (!out.empty() && !in.empty()) {
    if (auto ok = no_send_receive_overlap(out, in); !ok)
      return ok;
  }
  if (!broken_.empty())
    return make_error(errc::unavailable,
                      "tcp exchange: the connection broke in an earlier "
                      "exchange (" +
                          broken_ + "); connect again");
  // Every exchange sends a frame and receives one, an empty side one of 0
  // blocks, each saying what its sender expects back: a peer that sends
  // what this side does not expect (or nothing where it does) is a
  // mismatch at once, on both sides.
  const steady::time_point deadline = steady::now() + io_timeout_;
  result<void> r;
  if (out.empty()) {
    // An empty frame is 28 bytes: sent before receiving, without a helper
    // thread. It can wait only for the peer to read this side's previous
    // batch, which needs nothing more from this side.
    r = send_batch(fd_, out, in, deadline);
    if (r)
      r = recv_batch(fd_, in, out, deadline);
    if (r)
      r = confirm_received(fd_, !in.empty(), !out.empty(), deadline);
  } else {
    // Send on a helper thread while receiving, so that two peers
    // exchanging large batches cannot both block on full socket buffers,
    // and a peer that expects nothing refuses the batch at once.
    result<void> sent;
    std::atomic<bool> header_out{false};
    std::thread sender;
    try {
      sender = std::thread(
          [&] { sent = send_batch(fd_, out, in, deadline, &header_out); });
    } catch (const std::system_error& e) {
      return make_error(errc::unavailable,
                        std::string("tcp exchange: no sender thread: ") +
                            e.what());
    }
    r = recv_batch(fd_, in, out, deadline);
    if (!r) {
      // A mismatch shows in this side's header too (what it sends and
      // what it expects): once that header is out the peer finds it as
      // well, so both sides report it. Then the sender stops at once.
      if (r.error().code == errc::wrong_value_size)
        header_out.wait(false);
      ::shutdown(fd_, SHUT_RDWR);
    }
    sender.join();
    if (r)
      r = std::move(sent);
    if (r)
      r = confirm_received(fd_, !in.empty(), !out.empty(), deadline);
  }
  if (!r) {
    // A batch cut off part way leaves the stream mid-frame: the next read
    // would take payload for a header. Nothing more goes over it.
    broken_ = r.error().message;
    ::shutdown(fd_, SHUT_RDWR);
  }
  return r;
}

result<tcp_listener>
tcp_listener::listen(const std::string& host, std::uint16_t port,
                     std::chrono::milliseconds lookup_timeout) {
  if (auto ok =
          check_timeout("tcp listen: lookup_timeout", lookup_timeout, false);
      !ok)
    return unexpected<error>(ok.error());
  auto bound_fd =
      internal::listen_host(host, port, lookup_timeout, process_resolver());
  if (!bound_fd)
    return unexpected<error>(bound_fd.error());
  const int fd = *bound_fd;
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    auto e = sys_error("getsockname");
    ::close(fd);
    return e;
  }
  std::uint16_t bound = 0;
  if (addr.ss_family == AF_INET)
    bound = ntohs(reinterpret_cast<const sockaddr_in*>(&addr)->sin_port);
  else
    bound = ntohs(reinterpret_cast<const sockaddr_in6*>(&addr)->sin6_port);
  return tcp_listener(fd, bound);
}

tcp_listener::~tcp_listener() {
  if (fd_ >= 0)
    ::close(fd_);
}

result<std::unique_ptr<tcp_transport>>
tcp_listener::accept(std::chrono::milliseconds timeout,
                     std::chrono::milliseconds io_timeout) {
  if (auto ok = check_timeout("tcp accept: timeout", timeout, true); !ok)
    return unexpected<error>(ok.error());
  if (auto ok = check_timeout("tcp accept: io_timeout", io_timeout, false); !ok)
    return unexpected<error>(ok.error());
  if (fd_ < 0)
    return make_error(errc::unavailable,
                      "tcp accept: this listener was moved from");
  // A zero timeout still polls once: a connection already queued is taken.
  // Another thread accepting on the listener may take the connection poll
  // saw (EAGAIN), or the peer may reset it while queued (ECONNABORTED):
  // wait again, against the same deadline.
  const auto deadline = steady::now() + timeout;
  for (;;) {
    auto ready = wait_ready(fd_, POLLIN, deadline);
    if (!ready)
      return unexpected<error>(ready.error());
    if (!*ready)
      return make_error(errc::io_error, "tcp accept: timed out");
    // The connection's own socket blocks (SOCK_NONBLOCK is not passed on).
    const int fd = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) {
      set_nodelay(fd);
      return std::unique_ptr<tcp_transport>(new tcp_transport(fd, io_timeout));
    }
    // Also the network errors accept(2) passes on for the connection it
    // dropped, which the man page says to treat like EAGAIN.
    switch (errno) {
    case EAGAIN:
#if EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
    case ECONNABORTED:
    case EINTR:
    case ENETDOWN:
    case EPROTO:
    case ENOPROTOOPT:
    case EHOSTDOWN:
    case ENONET:
    case EHOSTUNREACH:
    case EOPNOTSUPP:
    case ENETUNREACH:
      continue;
    default:
      return sys_error("accept");
    }
  }
}

} // namespace kvfleet::cuda
