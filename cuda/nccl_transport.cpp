#include "cuda/nccl_transport.hpp"

#include "cuda/internal/cuda_check.hpp"
#include "cuda/internal/nccl_api.hpp"

#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <thread>

namespace kvfleet::cuda {

namespace {

using steady = std::chrono::steady_clock;
constexpr std::chrono::milliseconds max_timeout = std::chrono::hours(24);

std::string ms(std::chrono::milliseconds t) {
  return std::to_string(t.count()) + " ms";
}

/// Between two polls of a copy in flight: yields first (a batch that is
/// nearly done), then sleeps 100 us so a long wait costs no core.
void pause_poll(int& polls) {
  if (++polls < 64)
    std::this_thread::yield();
  else
    std::this_thread::sleep_for(std::chrono::microseconds(100));
}

/// Polls a non-blocking communicator until it leaves ncclInProgress (its
/// initialisation, or a group end), at most until `deadline`: its state
/// then (ncclSuccess, an error, or ncclInProgress when time ran out).
result<ncclResult_t> settle(const nccl_library& lib, ncclComm_t comm,
                            steady::time_point deadline) {
  int polls = 0;
  for (;;) {
    ncclResult_t state = ncclSuccess;
    if (const ncclResult_t r = lib.fns().comm_get_async_error(comm, &state);
        r != ncclSuccess)
      return unexpected<error>(
          nccl_call_error(lib, "ncclCommGetAsyncError", r));
    if (state != ncclInProgress || steady::now() >= deadline)
      return state;
    pause_poll(polls);
  }
}

} // namespace

result<std::unique_ptr<nccl_transport>>
nccl_transport::create(std::shared_ptr<const nccl_library> lib,
                       const nccl_id& id, int nranks, int rank, int device,
                       nccl_timeouts timeouts) {
  if (!lib)
    return make_error(errc::invalid_argument,
                      "nccl_transport: no NCCL library");
  if (nranks <= 0 || rank < 0 || rank >= nranks)
    return make_error(errc::invalid_argument,
                      "nccl_transport: rank " + std::to_string(rank) + " of " +
                          std::to_string(nranks));
  for (const auto& [what, t] : {std::pair{"join", timeouts.join},
                                std::pair{"exchange", timeouts.exchange}})
    if (t.count() <= 0 || t > max_timeout)
      return make_error(errc::invalid_argument,
                        std::string("nccl_transport: the ") + what +
                            " timeout must be above 0 ms and at most 24 h "
                            "(got " +
                            ms(t) + ")");
  if (auto r = internal::use_device(device); !r)
    return unexpected<error>(r.error());
  const steady::time_point deadline = steady::now() + timeouts.join;
  std::unique_ptr<nccl_transport> t(new nccl_transport());
  t->lib_ = std::move(lib);
  t->nranks_ = nranks;
  t->rank_ = rank;
  t->device_ = device;
  t->timeouts_ = timeouts;
  cudaStream_t s = nullptr;
  KVFLEET_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking),
                   "cudaStreamCreateWithFlags");
  t->stream_ = s;
  ncclUniqueId uid{};
  std::memcpy(&uid, id.bytes.data(), sizeof uid);
  const auto& f = t->lib_->fns();
  // Non-blocking: ncclCommInitRankConfig returns at once (ncclInProgress)
  // and the communicator is polled, so a rank that never joins costs the
  // timeout, not the thread.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const ncclResult_t started =
      f.comm_init_rank_config(&comm, nranks, uid, rank, &config);
  if (started != ncclSuccess && started != ncclInProgress) {
    if (comm != nullptr)
      (void)f.comm_abort(comm);
    return unexpected<error>(
        nccl_call_error(*t->lib_, "ncclCommInitRankConfig", started));
  }
  const auto state = settle(*t->lib_, comm, deadline);
  if (state && *state == ncclSuccess) {
    t->comm_ = comm;
    return t;
  }
  (void)f.comm_abort(comm);
  if (!state)
    return unexpected<error>(state.error());
  if (*state == ncclInProgress)
    return make_error(errc::timeout,
                      "nccl_transport: rank " + std::to_string(rank) + " of " +
                          std::to_string(nranks) +
                          ": not every rank joined the communicator within " +
                          ms(timeouts.join) + "; it was aborted");
  return unexpected<error>(nccl_call_error(
      *t->lib_, "ncclCommInitRankConfig (while joining)", *state));
}

nccl_transport::~nccl_transport() {
  (void)cudaSetDevice(device_);
  if (comm_ != nullptr)
    (void)lib_->fns().comm_destroy(static_cast<ncclComm_t>(comm_));
  if (stream_ != nullptr)
    (void)cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

error nccl_transport::abort_comm(errc code, int peer, std::string why) {
  const ncclResult_t r = lib_->fns().comm_abort(static_cast<ncclComm_t>(comm_));
  comm_ = nullptr;
  aborted_ = why;
  std::string msg = "nccl exchange with peer " + std::to_string(peer) + ": " +
                    why +
                    "; the communicator was aborted (make a new transport, "
                    "on every rank)";
  if (r != ncclSuccess)
    msg += "; the abort itself failed, so NCCL may hold its resources: " +
           nccl_call_error(*lib_, "ncclCommAbort", r).message;
  return error{code, std::move(msg)};
}

result<void> nccl_transport::exchange(int peer, std::span<const send_block> out,
                                      std::span<const recv_block> in) {
  if (comm_ == nullptr)
    return make_error(errc::unavailable,
                      "nccl exchange: the communicator was aborted (" +
                          aborted_ + "); make a new transport");
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
  const steady::time_point deadline = steady::now() + timeouts_.exchange;
  const auto& f = lib_->fns();
  auto comm = static_cast<ncclComm_t>(comm_);
  auto stream = static_cast<cudaStream_t>(stream_);
  // A non-blocking communicator may answer ncclInProgress: queued, not
  // failed.
  const auto ok = [](ncclResult_t r) {
    return r == ncclSuccess || r == ncclInProgress;
  };
  if (const ncclResult_t r = f.group_start(); !ok(r))
    return unexpected<error>(nccl_call_error(*lib_, "ncclGroupStart", r));
  ncclResult_t failed = ncclSuccess;
  const char* failed_call = "";
  for (const send_block& b : out) {
    if (b.bytes == 0)
      continue;
    if (const ncclResult_t r =
            f.send(b.data, b.bytes, ncclUint8, peer, comm, stream);
        !ok(r) && failed == ncclSuccess) {
      failed = r;
      failed_call = "ncclSend";
    }
  }
  for (const recv_block& b : in) {
    if (b.bytes == 0)
      continue;
    if (const ncclResult_t r =
            f.recv(b.data, b.bytes, ncclUint8, peer, comm, stream);
        !ok(r) && failed == ncclSuccess) {
      failed = r;
      failed_call = "ncclRecv";
    }
  }
  // The group is always closed, even after a failed call inside it. From
  // here on the group's other operations may be running: every failure
  // aborts the communicator, so none of them goes on reading or writing
  // the caller's blocks after the call returns, and the next exchange is
  // refused instead of joining a group in an unknown state.
  const ncclResult_t end = f.group_end();
  const auto broken = [&](const error& e) {
    return unexpected<error>(abort_comm(e.code, peer, e.message));
  };
  if (failed != ncclSuccess)
    return broken(nccl_call_error(*lib_, failed_call, failed));
  if (!ok(end))
    return broken(nccl_call_error(*lib_, "ncclGroupEnd", end));
  const std::string late = "not finished within " + ms(timeouts_.exchange);
  if (end == ncclInProgress) {
    const auto state = settle(*lib_, comm, deadline);
    if (!state)
      return broken(state.error());
    if (*state == ncclInProgress)
      return unexpected<error>(abort_comm(errc::timeout, peer, late));
    if (*state != ncclSuccess)
      return broken(nccl_call_error(*lib_, "ncclGroupEnd (async)", *state));
  }
  // The copies run on the transport's stream; a peer that never posts its
  // side (or died) leaves them waiting, so the stream is polled against the
  // deadline instead of synchronised, and the communicator is watched for
  // an error a peer reported meanwhile.
  // An error the communicator reports (a peer's, or its own), or none.
  const auto comm_error = [&]() -> std::optional<error> {
    ncclResult_t async = ncclSuccess;
    if (const ncclResult_t r = f.comm_get_async_error(comm, &async);
        r != ncclSuccess)
      return nccl_call_error(*lib_, "ncclCommGetAsyncError", r);
    if (async != ncclSuccess && async != ncclInProgress)
      return nccl_call_error(*lib_, "NCCL communicator (async)", async);
    return std::nullopt;
  };
  int polls = 0;
  for (;;) {
    const cudaError_t q = cudaStreamQuery(stream);
    if (q == cudaSuccess)
      break;
    if (q != cudaErrorNotReady)
      return broken(internal::check(q, "cudaStreamQuery(nccl stream)").error());
    if (auto e = comm_error())
      return broken(*e);
    if (steady::now() >= deadline)
      return unexpected<error>(abort_comm(errc::timeout, peer, late));
    pause_poll(polls);
  }
  if (auto e = comm_error())
    return broken(*e);
  return {};
}

} // namespace kvfleet::cuda
