#pragma once
/// CUDA and NCCL failures as kvfleet error values.
///
/// Every failing CUDA runtime or NCCL call becomes an `error` whose message
/// names the call and the code, e.g. "cudaMalloc(1073741824 bytes):
/// cudaErrorMemoryAllocation (2): out of memory". Includes no CUDA header.
/// Thread safety: pure functions.

#include "engine/result.hpp"

#include <string>
#include <string_view>

namespace kvfleet::cuda {

/// "CALL: NAME (CODE): TEXT" as an error of code `code_kind`
/// (errc::backend_error unless said otherwise).
[[nodiscard]] error format_call_error(std::string_view call, int code,
                                      std::string_view name,
                                      std::string_view text,
                                      errc code_kind = errc::backend_error);

/// The error for a failed CUDA runtime call returning `code` (a cudaError_t
/// value): the name and text come from the CUDA runtime. An allocation
/// failure (cudaErrorMemoryAllocation) is errc::out_of_memory.
[[nodiscard]] error cuda_call_error(std::string_view call, int code);

} // namespace kvfleet::cuda
