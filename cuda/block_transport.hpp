#pragma once
/// Moving batches of blocks between two engines: the interface that the
/// NCCL transport (GPU to GPU, device memory) and the TCP transport (any two
/// machines, host memory) both implement.
///
/// A batch is a list of byte ranges. The receiver names the ranges it
/// expects, of exactly the sizes the sender sends: the TCP transport checks
/// that and refuses a mismatch (errc::wrong_value_size), an empty side
/// included (it sends a frame of 0 blocks, so over TCP every exchange, even
/// an empty one, pairs with one of the peer's: tcp_transport.hpp); NCCL
/// cannot, so a mismatch there is the caller's bug. Calls block until
/// their batch has been sent and received: run them off an actor's thread. Not
/// thread-safe: one caller at a time per transport.

#include "engine/result.hpp"

#include <cstddef>
#include <span>
#include <string_view>

namespace kvfleet::cuda {

struct send_block {
  const std::byte* data = nullptr;
  std::size_t bytes = 0;
};

struct recv_block {
  std::byte* data = nullptr;
  std::size_t bytes = 0;
};

class block_transport {
public:
  virtual ~block_transport() = default;
  block_transport() = default;
  block_transport(const block_transport&) = delete;
  block_transport& operator=(const block_transport&) = delete;

  /// "nccl", "tcp".
  [[nodiscard]] virtual std::string_view name() const noexcept = 0;
  /// True when the blocks live in device memory (NCCL), false for host
  /// memory (TCP).
  [[nodiscard]] virtual bool device_memory() const noexcept = 0;
  /// Sends `out` to `peer` and receives `in` from it in one step (either
  /// may be empty); a rank may be its own peer. A receive block may not
  /// overlap a send block (both move at once; tcp refuses it with
  /// errc::invalid_argument).
  [[nodiscard]] virtual result<void>
  exchange(int peer, std::span<const send_block> out,
           std::span<const recv_block> in) = 0;

  [[nodiscard]] result<void> send(int peer,
                                  std::span<const send_block> blocks) {
    return exchange(peer, blocks, {});
  }
  [[nodiscard]] result<void> recv(int peer,
                                  std::span<const recv_block> blocks) {
    return exchange(peer, {}, blocks);
  }
};

} // namespace kvfleet::cuda
