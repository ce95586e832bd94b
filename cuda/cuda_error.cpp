#include "cuda/cuda_error.hpp"

#include <cuda_runtime_api.h>

namespace kvfleet::cuda {

error format_call_error(std::string_view call, int code, std::string_view name,
                        std::string_view text, errc code_kind) {
  std::string m(call);
  m += ": ";
  m += name.empty() ? std::string_view("unknown error") : name;
  m += " (" + std::to_string(code) + ")";
  if (!text.empty()) {
    m += ": ";
    m += text;
  }
  return error{code_kind, std::move(m)};
}

error cuda_call_error(std::string_view call, int code) {
  const auto e = static_cast<cudaError_t>(code);
  const char* name = cudaGetErrorName(e);
  const char* text = cudaGetErrorString(e);
  return format_call_error(
      call, code, name != nullptr ? name : "", text != nullptr ? text : "",
      e == cudaErrorMemoryAllocation ? errc::out_of_memory
                                     : errc::backend_error);
}

} // namespace kvfleet::cuda
