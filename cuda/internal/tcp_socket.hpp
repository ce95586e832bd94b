#pragma once
// The socket steps under tcp_transport and tcp_listener, exposed so tests
// can drive them with a deadline already passed or a crafted address list,
// and the frame header's size digest, so tests can forge frames.
// Implemented in tcp_transport.cpp. Plain functions on a file descriptor;
// thread-safe as far as the descriptor is (one reader and one writer).

#include "engine/host_resolver.hpp"
#include "engine/result.hpp"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

struct addrinfo;

namespace kvfleet::cuda::internal {

using tcp_clock = std::chrono::steady_clock;

/// Sends all `n` bytes before `deadline` (the whole exchange's, so a peer
/// that drains a byte at a time, or steadily, cannot stretch it: once the
/// deadline has passed no more bytes move, ready or not). errc::io_error
/// when the deadline passes or the connection fails.
[[nodiscard]] result<void> send_all(int fd, const std::byte* p, std::size_t n,
                                    tcp_clock::time_point deadline);

/// Receives all `n` bytes before `deadline`; errc::io_error as send_all,
/// and when the peer closes the connection first.
[[nodiscard]] result<void> recv_all(int fd, std::byte* p, std::size_t n,
                                    tcp_clock::time_point deadline);

/// Whether the connected socket `fd` is connected to itself (its local and
/// peer addresses are equal): a connect to a local port nobody listens on
/// can pick that port as its own (TCP simultaneous open). connect_first
/// refuses such a connection.
[[nodiscard]] bool is_connected_to_itself(int fd);

/// A socket bound to the first of `addresses` (a getaddrinfo list) that
/// can be bound, and listening: its descriptor. When none can, the last
/// one's error (errc::io_error, naming `where`, "host:port").
[[nodiscard]] result<int> bind_and_listen(const addrinfo* addresses,
                                          std::string_view where);

/// A connected (non-blocking) socket to the first of `addresses` (a
/// getaddrinfo list) that accepts, all of them before `start + timeout`
/// together: each address gets what the ones before it left, and none is
/// tried once it has run out. A `start` before now counts the time since
/// against `timeout` (connect_host's name lookup). When none connects,
/// errc::io_error naming `where` ("host:port"): "timed out after N ms"
/// (N: `timeout`) when the time ran out, else the last address's error;
/// with several addresses, "(tried K of N addresses)".
[[nodiscard]] result<int>
connect_first(const addrinfo* addresses, std::chrono::milliseconds timeout,
              std::string_view where,
              tcp_clock::time_point start = tcp_clock::now());

/// tcp_transport::connect's socket, with the name looked up through
/// `resolver` (tests give it a fake lookup): a connected (non-blocking)
/// socket to host:port, the lookup and the connects to each of the name's
/// addresses within `timeout` together (connect_first gets what the lookup
/// left). A lookup still running when the time is up is errc::io_error
/// "tcp connect(host:port): timed out after N ms: the name lookup of
/// '<host>' took all of it" (the same code as a connect that runs out of
/// time); a name that does not resolve is errc::io_error with the
/// resolver's reason; no helper thread for the lookup is
/// errc::unavailable. REQUIRES: timeout > 0.
[[nodiscard]] result<int> connect_host(const std::string& host,
                                       std::uint16_t port,
                                       std::chrono::milliseconds timeout,
                                       engine::host_resolver& resolver);

/// tcp_listener::listen's socket, with the name looked up through
/// `resolver` (tests give it a fake lookup) within `timeout`: a socket bound
/// to the first of the name's addresses that can be bound, and listening
/// (bind_and_listen). A lookup still running when the time is up is
/// errc::timeout "tcp listen(host:port): the name lookup of '<host>' did
/// not finish within N ms"; a name that does not resolve is errc::io_error
/// with the resolver's reason; no helper thread for the lookup is
/// errc::unavailable. A numeric address needs no lookup. REQUIRES: timeout
/// > 0.
[[nodiscard]] result<int> listen_host(const std::string& host,
                                      std::uint16_t port,
                                      std::chrono::milliseconds timeout,
                                      engine::host_resolver& resolver);

/// A digest of a batch's block sizes (`Block::bytes`), in order; 0 for
/// none. A frame's header carries the one of the sizes it sends and the one
/// of the sizes its sender expects back, so each side finds a mismatch in
/// the peer's fixed-size header alone. Not a checksum against an attacker:
/// the receiver still checks every size exactly.
template <class Block>
[[nodiscard]] std::uint64_t sizes_digest(std::span<const Block> blocks) {
  std::uint64_t h = 0;
  for (const Block& b : blocks) {
    // splitmix64's finalizer over the running value and the next size.
    std::uint64_t z = (h ^ b.bytes) + 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    h = z ^ (z >> 31);
  }
  return h;
}

} // namespace kvfleet::cuda::internal
