#pragma once
// GoogleTest support for cuda/ tests: GPU tests skip with a reason when no
// device is present, and fail instead when KVFLEET_REQUIRE_GPU=1 (the GPU
// machine's check, tools/gpu-check).

#include "cuda/device.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace kvfleet::cuda::testing {

inline bool require_gpu() {
  const char* v = std::getenv("KVFLEET_REQUIRE_GPU");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

/// Empty when a device is usable, else why not.
inline std::string no_device_reason() {
  auto n = device_count();
  return n ? std::string() : n.error().describe();
}

} // namespace kvfleet::cuda::testing

/// First statement of a GPU test.
#define KVFLEET_REQUIRE_DEVICE()                                               \
  do {                                                                         \
    const std::string kvfleet_why_ =                                           \
        ::kvfleet::cuda::testing::no_device_reason();                          \
    if (!kvfleet_why_.empty()) {                                               \
      if (::kvfleet::cuda::testing::require_gpu())                             \
        FAIL() << "KVFLEET_REQUIRE_GPU=1 but no CUDA device: "                 \
               << kvfleet_why_;                                                \
      GTEST_SKIP() << "no CUDA device: " << kvfleet_why_;                      \
    }                                                                          \
  } while (false)
