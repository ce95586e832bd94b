#pragma once
/// The NCCL block transport: batches of blocks between device pools of
/// engines on GPUs, one ncclSend/ncclRecv per block inside one NCCL group,
/// on the transport's own stream. Ranks 0..nranks-1 share an nccl_id made
/// by one of them (nccl_library::make_id) and sent to the others out of
/// band. A single GPU can be tested with one rank sending to itself.
///
/// Every wait is bounded: the communicator is non-blocking (NCCL 2.14 or
/// newer: ncclCommInitRankConfig, ncclCommAbort), and joining it and each
/// exchange must finish within the transport's timeouts. A rank that never
/// joins, or a peer that dies or never posts its side of an exchange, is
/// errc::timeout, not a thread held forever: the communicator is aborted
/// (ncclCommAbort also stops the kernels waiting on the peer) and later
/// exchanges answer errc::unavailable (make a new transport, with a new
/// id, on every rank). Includes no CUDA or NCCL header. Not thread-safe:
/// one caller at a time.

#include "cuda/block_transport.hpp"
#include "cuda/nccl_library.hpp"

#include <chrono>
#include <memory>
#include <string>

namespace kvfleet::cuda {

/// How long an NCCL transport waits; each 1 ms to 24 h.
struct nccl_timeouts {
  /// For every rank to join the communicator. NCCL's set-up takes seconds
  /// on a large node (and tens under compute-sanitizer).
  std::chrono::milliseconds join = std::chrono::seconds(60);
  /// For one exchange, from its call to its last byte.
  std::chrono::milliseconds exchange = std::chrono::seconds(30);
};

class nccl_transport final : public block_transport {
public:
  /// Joins communicator `id` as `rank` of `nranks` on `device`, waiting
  /// until every rank has joined, at most `timeouts.join`: errc::timeout
  /// when a rank has not joined by then. A timeout out of range is
  /// errc::invalid_argument.
  [[nodiscard]] static result<std::unique_ptr<nccl_transport>>
  create(std::shared_ptr<const nccl_library> lib, const nccl_id& id, int nranks,
         int rank, int device = 0, nccl_timeouts timeouts = {});
  ~nccl_transport() override;

  [[nodiscard]] std::string_view name() const noexcept override {
    return "nccl";
  }
  [[nodiscard]] bool device_memory() const noexcept override { return true; }
  /// Device pointers. Waits for the group to finish on the transport's
  /// stream, at most `timeouts().exchange`: errc::timeout then, and the
  /// communicator is aborted (see above). An NCCL or CUDA failure is an
  /// error naming the call and code; one the communicator reports (NCCL
  /// refused the group, or a peer failed) aborts it too. After an abort,
  /// errc::unavailable.
  [[nodiscard]] result<void> exchange(int peer, std::span<const send_block> out,
                                      std::span<const recv_block> in) override;

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int nranks() const noexcept { return nranks_; }
  [[nodiscard]] const nccl_timeouts& timeouts() const noexcept {
    return timeouts_;
  }

private:
  nccl_transport() = default;
  /// Aborts the communicator for `why` and returns the error saying so.
  [[nodiscard]] error abort_comm(errc code, int peer, std::string why);
  std::shared_ptr<const nccl_library> lib_;
  void* comm_ = nullptr;   // ncclComm_t
  void* stream_ = nullptr; // cudaStream_t
  int nranks_ = 0;
  int rank_ = 0;
  int device_ = 0;
  nccl_timeouts timeouts_;
  std::string aborted_; // why the communicator was aborted; empty: it was not
};

} // namespace kvfleet::cuda
