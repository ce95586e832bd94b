#include "cuda/nccl_transport.hpp"

#include "cuda/internal/cuda_check.hpp"
#include "cuda/internal/nccl_api.hpp"

#include <cstring>

namespace kvfleet::cuda {

result<std::unique_ptr<nccl_transport>>
nccl_transport::create(std::shared_ptr<const nccl_library> lib,
                       const nccl_id& id, int nranks, int rank, int device) {
  if (!lib)
    return make_error(errc::invalid_argument,
                      "nccl_transport: no NCCL library");
  if (nranks <= 0 || rank < 0 || rank >= nranks)
    return make_error(errc::invalid_argument,
                      "nccl_transport: rank " + std::to_string(rank) + " of " +
                          std::to_string(nranks));
  if (auto r = internal::use_device(device); !r)
    return unexpected<error>(r.error());
  std::unique_ptr<nccl_transport> t(new nccl_transport());
  t->lib_ = std::move(lib);
  t->nranks_ = nranks;
  t->rank_ = rank;
  t->device_ = device;
  cudaStream_t s = nullptr;
  KVFLEET_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking),
                   "cudaStreamCreateWithFlags");
  t->stream_ = s;
  ncclUniqueId uid{};
  std::memcpy(&uid, id.bytes.data(), sizeof uid);
  ncclComm_t comm = nullptr;
  if (const ncclResult_t r =
          t->lib_->fns().comm_init_rank(&comm, nranks, uid, rank);
      r != ncclSuccess)
    return unexpected<error>(nccl_call_error(*t->lib_, "ncclCommInitRank", r));
  t->comm_ = comm;
  return t;
}

nccl_transport::~nccl_transport() {
  (void)cudaSetDevice(device_);
  if (comm_ != nullptr)
    (void)lib_->fns().comm_destroy(static_cast<ncclComm_t>(comm_));
  if (stream_ != nullptr)
    (void)cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

result<void> nccl_transport::exchange(int peer, std::span<const send_block> out,
                                      std::span<const recv_block> in) {
  if (peer < 0 || peer >= nranks_)
    return make_error(errc::invalid_argument,
                      "nccl exchange: peer " + std::to_string(peer) + " of " +
                          std::to_string(nranks_) + " ranks");
  for (const send_block& b : out)
    if (b.data == nullptr && b.bytes > 0)
      return make_error(errc::invalid_argument,
                        "nccl exchange: null send block");
  for (const recv_block& b : in)
    if (b.data == nullptr && b.bytes > 0)
      return make_error(errc::invalid_argument,
                        "nccl exchange: null receive block");
  if (auto r = internal::use_device(device_); !r)
    return r;
  const auto& f = lib_->fns();
  auto comm = static_cast<ncclComm_t>(comm_);
  auto stream = static_cast<cudaStream_t>(stream_);
  if (const ncclResult_t r = f.group_start(); r != ncclSuccess)
    return unexpected<error>(nccl_call_error(*lib_, "ncclGroupStart", r));
  ncclResult_t failed = ncclSuccess;
  const char* failed_call = "";
  for (const send_block& b : out) {
    if (b.bytes == 0)
      continue;
    if (const ncclResult_t r =
            f.send(b.data, b.bytes, ncclUint8, peer, comm, stream);
        r != ncclSuccess && failed == ncclSuccess) {
      failed = r;
      failed_call = "ncclSend";
    }
  }
  for (const recv_block& b : in) {
    if (b.bytes == 0)
      continue;
    if (const ncclResult_t r =
            f.recv(b.data, b.bytes, ncclUint8, peer, comm, stream);
        r != ncclSuccess && failed == ncclSuccess) {
      failed = r;
      failed_call = "ncclRecv";
    }
  }
  // The group is always closed, even after a failed call inside it.
  const ncclResult_t end = f.group_end();
  if (failed != ncclSuccess)
    return unexpected<error>(nccl_call_error(*lib_, failed_call, failed));
  if (end != ncclSuccess)
    return unexpected<error>(nccl_call_error(*lib_, "ncclGroupEnd", end));
  KVFLEET_CUDA_TRY(cudaStreamSynchronize(stream),
                   "cudaStreamSynchronize(nccl stream)");
  ncclResult_t async = ncclSuccess;
  if (const ncclResult_t r = f.comm_get_async_error(comm, &async);
      r != ncclSuccess)
    return unexpected<error>(
        nccl_call_error(*lib_, "ncclCommGetAsyncError", r));
  if (async != ncclSuccess)
    return unexpected<error>(
        nccl_call_error(*lib_, "NCCL communicator (async)", async));
  return {};
}

} // namespace kvfleet::cuda
