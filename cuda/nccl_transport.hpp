#pragma once
/// The NCCL block transport: batches of blocks between device pools of
/// engines on GPUs, one ncclSend/ncclRecv per block inside one NCCL group,
/// on the transport's own stream. Ranks 0..nranks-1 share an nccl_id made
/// by one of them (nccl_library::make_id) and sent to the others out of
/// band. A single GPU can be tested with one rank sending to itself.
/// Includes no CUDA or NCCL header. Not thread-safe: one caller at a time.

#include "cuda/block_transport.hpp"
#include "cuda/nccl_library.hpp"

#include <memory>

namespace kvfleet::cuda {

class nccl_transport final : public block_transport {
public:
  /// Joins communicator `id` as `rank` of `nranks` on `device`
  /// (ncclCommInitRank: blocks until every rank has joined).
  [[nodiscard]] static result<std::unique_ptr<nccl_transport>>
  create(std::shared_ptr<const nccl_library> lib, const nccl_id& id, int nranks,
         int rank, int device = 0);
  ~nccl_transport() override;

  [[nodiscard]] std::string_view name() const noexcept override {
    return "nccl";
  }
  [[nodiscard]] bool device_memory() const noexcept override { return true; }
  /// Device pointers. Waits for the group to finish on the transport's
  /// stream; an NCCL or CUDA failure is an error naming the call and code.
  [[nodiscard]] result<void> exchange(int peer, std::span<const send_block> out,
                                      std::span<const recv_block> in) override;

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int nranks() const noexcept { return nranks_; }

private:
  nccl_transport() = default;
  std::shared_ptr<const nccl_library> lib_;
  void* comm_ = nullptr;   // ncclComm_t
  void* stream_ = nullptr; // cudaStream_t
  int nranks_ = 0;
  int rank_ = 0;
  int device_ = 0;
};

} // namespace kvfleet::cuda
