#pragma once
/// The TCP block transport: the same interface as the NCCL transport, over
/// one TCP connection between two machines without GPUs or NCCL (host
/// memory).
///
/// Wire format of a batch (wire version 4): "KVF4" (4 bytes), the block
/// count (u32 LE) and a digest of their sizes (u64 LE), the count of blocks
/// this side expects back (u32 LE) and a digest of their sizes (u64 LE; a
/// digest of no blocks is 0), each block's size (u64 LE), then the blocks'
/// bytes in order. A side that has received blocks sends "KVFa" (4 bytes)
/// once it has the peer's whole frame, and a side that sent blocks
/// succeeds only once the peer's "KVFa" has come: a batch that reached the
/// peer's socket buffers but that the peer never read (it timed out,
/// failed or closed first) is no success for the sender (errc::io_error
/// "the peer did not confirm ..."; one round trip more per exchange that
/// sends blocks; before, the sender reported success). A side that only
/// receives is done once it has sent its mark; with blocks both ways the
/// peer may still fail after it read this side's (its own mark late). Every
/// exchange (send, recv or both) sends one frame and receives one, an empty
/// side a frame of 0 blocks (28 bytes), so each exchange pairs with exactly one
/// of the peer's, even one with both sides empty (it waits for the peer's). A
/// batch of more than 2^32 - 1 blocks, to send or to receive, is refused before
/// anything moves (errc::value_too_large). The receiver checks the count and
/// every size against what it expects before reading any payload, so a peer can
/// never make it allocate or write out of bounds (sizes move 4,096 at a time
/// through a fixed buffer on each side: a header of any length allocates
/// nothing); a mismatch is errc::wrong_value_size, an empty side included:
/// blocks sent to a peer expecting none, or none sent to a peer expecting
/// some, fail the receiving side at once (no timeout, nothing left in the
/// stream, "tcp recv: ..."). The sending side fails in the same exchange
/// with errc::wrong_value_size too ("tcp send: peer expected ..."), from the
/// expectation in the peer's frame, which it reads anyway: no extra round
/// trip. Each side finds a mismatch in the other's 28-byte header, lets its
/// own header out and stops sending, so two large batches with a mismatch
/// end at once too (unless this side's previous batch is still undrained
/// in the socket's buffers, the peer not reading it: letting its own header
/// out then waits up to io_timeout). A version 1 peer ("KVFB" frames, without
/// expectations), a version 2 one ("KVF2", without the confirmation) or a
/// version 3 one ("KVF3", a confirmation of every frame) is
/// errc::parse_error naming the version (every earlier build; none is
/// deployed). Each exchange must finish within io_timeout (1 ms to 24
/// h) as a whole: once the deadline has passed no more bytes move, so a peer
/// trickling bytes, or streaming or draining them steadily, cannot stretch it
/// (on either side, partial writes included); a timeout or a closed peer is
/// errc::io_error. A failed exchange may leave the stream mid-frame, so it
/// shuts the connection down and later exchanges answer errc::unavailable
/// (connect again). `peer` must be 0 (the connected peer). Not thread-safe: one
/// caller at a time.

#include "cuda/block_transport.hpp"

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace kvfleet::cuda {

class tcp_transport final : public block_transport {
public:
  /// Connects to host:port (numeric IPv4 or IPv6 address or a host name)
  /// within io_timeout for the whole connect: looking the name up, then
  /// trying its addresses in turn with the time the lookup left, each
  /// getting what the ones before it left, none tried once it has run out.
  /// The lookup runs on a helper thread (engine/host_resolver.hpp:
  /// getaddrinfo has no timeout of its own), so a slow DNS cannot hold the
  /// caller past io_timeout; a lookup still running then is left to finish
  /// on its thread, and later connects to that name wait for it (one
  /// thread per name however many connects time out). A numeric address needs
  /// no lookup. A connect that runs out of time is errc::io_error saying "timed
  /// out after N ms" (and, for a name with several addresses, "tried K of N
  /// addresses"; when the lookup took all of it, "the name lookup of '<host>'
  /// took all of it"); a name that does not resolve is errc::io_error saying
  /// why; no helper thread, errc::unavailable.
  [[nodiscard]] static result<std::unique_ptr<tcp_transport>>
  connect(const std::string& host, std::uint16_t port,
          std::chrono::milliseconds io_timeout = std::chrono::seconds(30));
  ~tcp_transport() override;

  [[nodiscard]] std::string_view name() const noexcept override {
    return "tcp";
  }
  [[nodiscard]] bool device_memory() const noexcept override { return false; }
  [[nodiscard]] result<void> exchange(int peer, std::span<const send_block> out,
                                      std::span<const recv_block> in) override;

private:
  friend class tcp_listener;
  tcp_transport(int fd, std::chrono::milliseconds io_timeout)
      : fd_(fd), io_timeout_(io_timeout) {}
  int fd_;
  std::chrono::milliseconds io_timeout_;
  std::string broken_; ///< why an earlier exchange failed; empty: usable
};

/// Accepts tcp_transport connections.
class tcp_listener {
public:
  /// Listens on host:port (numeric IPv4 or IPv6 address or a host name):
  /// on the first of the host's addresses that can be bound (like connect,
  /// which tries each); when none can, the last one's error
  /// (errc::io_error). Port 0 picks a free port (see port()). A host name
  /// is looked up as connect looks one up, on a helper thread through the
  /// same process-wide resolver, within `lookup_timeout` (1 ms to 24 h,
  /// else errc::invalid_argument): a lookup still running then is
  /// errc::timeout "tcp listen(host:port): the name lookup of '<host>' did
  /// not finish within N ms" and finishes on its own thread (later listens
  /// and connects to that name wait for it); a name that does not resolve
  /// is errc::io_error saying why; no helper thread, errc::unavailable. A
  /// numeric address (the default) needs no lookup.
  [[nodiscard]] static result<tcp_listener>
  listen(const std::string& host = "127.0.0.1", std::uint16_t port = 0,
         std::chrono::milliseconds lookup_timeout = std::chrono::seconds(30));
  tcp_listener(tcp_listener&& other) noexcept
      : fd_(other.fd_), port_(other.port_) {
    other.fd_ = -1;
    other.port_ = 0;
  }
  tcp_listener& operator=(tcp_listener&&) = delete;
  ~tcp_listener();

  [[nodiscard]] std::uint16_t port() const noexcept { return port_; }
  /// Waits at most `timeout` (0 to 24 h; 0 takes only a connection already
  /// queued) for one connection. Several threads may accept on one listener
  /// at once: each gets its own connection or times out (one never waits
  /// for a connection another took). A moved-from listener is
  /// errc::unavailable at once.
  [[nodiscard]] result<std::unique_ptr<tcp_transport>>
  accept(std::chrono::milliseconds timeout = std::chrono::seconds(30),
         std::chrono::milliseconds io_timeout = std::chrono::seconds(30));

private:
  tcp_listener(int fd, std::uint16_t port) : fd_(fd), port_(port) {}
  int fd_;
  std::uint16_t port_;
};

} // namespace kvfleet::cuda
