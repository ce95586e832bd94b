// The CUDA entry points of a build without CUDA (KVFLEET_CUDA=OFF, or no
// nvcc found when kvfleet was configured): every one is an error value that
// says so, so that callers
// take their host-memory path (backend_factory.hpp) with a clear reason.
#include "cuda/device.hpp"
#include "cuda/internal/device_arena.hpp"

namespace kvfleet::cuda {
namespace {

error no_cuda(const char* call) {
  return error{errc::unavailable,
               std::string(call) +
                   ": kvfleet was built without CUDA (configured with "
                   "KVFLEET_CUDA=OFF, or no nvcc was found)"};
}

} // namespace

result<int> device_count() {
  return unexpected<error>(no_cuda("cudaGetDeviceCount"));
}

result<device_memory_info> memory_info(int) {
  return unexpected<error>(no_cuda("cudaMemGetInfo"));
}

result<std::string> describe_device(int) {
  return unexpected<error>(no_cuda("cudaGetDeviceProperties"));
}

result<std::unique_ptr<engine::memory_backend>>
internal::create_device_arena(std::size_t, int) {
  return unexpected<error>(no_cuda("cudaMalloc"));
}

result<std::unique_ptr<engine::memory_tier>>
internal::create_host_tier(engine::memory_backend&, std::size_t, std::size_t) {
  return std::unique_ptr<engine::memory_tier>{}; // no device arena exists
}

} // namespace kvfleet::cuda
