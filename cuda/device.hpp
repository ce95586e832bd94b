#pragma once
/// Which CUDA devices this process can use. Includes no CUDA header.
/// Thread safety: safe to call from any thread.

#include "engine/result.hpp"

#include <cstddef>
#include <string>

namespace kvfleet::cuda {

/// Number of usable CUDA devices. No driver or no device is an error value
/// naming cudaGetDeviceCount and its code ("no CUDA device" in tests' skip
/// messages); zero devices is errc::not_found.
[[nodiscard]] result<int> device_count();

struct device_memory_info {
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
};

/// cudaMemGetInfo for `device`.
[[nodiscard]] result<device_memory_info> memory_info(int device);

/// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)".
[[nodiscard]] result<std::string> describe_device(int device);

} // namespace kvfleet::cuda
