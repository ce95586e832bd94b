#pragma once
// Turning cudaError_t into result values inside cuda/ (.cpp and .cu files
// only; public headers include no CUDA header).

#include "cuda/cuda_error.hpp"
#include "engine/result.hpp"

#include <cuda_runtime_api.h>

#include <string_view>

namespace kvfleet::cuda::internal {

/// Success, or the error naming `call` and the code. A failed call also
/// leaves its code as the thread's "last error", where the next kernel
/// launch's check (cudaGetLastError) would find it and blame the launch:
/// a refused cudaHostAlloc then read as "launch of checksum kernel: out of
/// memory" on the H100. The error is reported here, as a value, so the
/// last error is reset (a sticky error stays: every later call returns it).
[[nodiscard]] inline result<void> check(cudaError_t code,
                                        std::string_view call) {
  if (code == cudaSuccess)
    return {};
  (void)cudaGetLastError();
  return unexpected<error>(cuda_call_error(call, static_cast<int>(code)));
}

/// Makes `device` current for the calling thread.
[[nodiscard]] inline result<void> use_device(int device) {
  return check(cudaSetDevice(device),
               "cudaSetDevice(" + std::to_string(device) + ")");
}

} // namespace kvfleet::cuda::internal

/// Returns the error from the enclosing function when a CUDA call fails.
#define KVFLEET_CUDA_TRY(expr, call)                                           \
  do {                                                                         \
    if (auto kvfleet_r_ = ::kvfleet::cuda::internal::check((expr), (call));    \
        !kvfleet_r_)                                                           \
      return ::kvfleet::unexpected<::kvfleet::error>(kvfleet_r_.error());      \
  } while (false)
