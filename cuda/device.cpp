#include "cuda/device.hpp"

#include "cuda/internal/cuda_check.hpp"

#include <cstdio>

namespace kvfleet::cuda {

result<int> device_count() {
  int n = 0;
  KVFLEET_CUDA_TRY(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
  if (n <= 0)
    return make_error(errc::not_found, "cudaGetDeviceCount: no CUDA device");
  return n;
}

result<device_memory_info> memory_info(int device) {
  if (auto r = internal::use_device(device); !r)
    return unexpected<error>(r.error());
  device_memory_info info;
  KVFLEET_CUDA_TRY(cudaMemGetInfo(&info.free_bytes, &info.total_bytes),
                   "cudaMemGetInfo");
  return info;
}

result<std::string> describe_device(int device) {
  cudaDeviceProp p{};
  KVFLEET_CUDA_TRY(cudaGetDeviceProperties(&p, device),
                   "cudaGetDeviceProperties(" + std::to_string(device) + ")");
  char buf[320];
  std::snprintf(buf, sizeof buf, "%.200s (sm_%d%d, %d SMs, %.1f GiB)", p.name,
                p.major, p.minor, p.multiProcessorCount,
                static_cast<double>(p.totalGlobalMem) / 1073741824.0);
  return std::string(buf);
}

} // namespace kvfleet::cuda
