#include "cuda/cuda_error.hpp"

#include <gtest/gtest.h>

namespace kvfleet::cuda {
namespace {

TEST(cuda_error_test, names_the_call_the_code_and_its_text) {
  const error e = format_call_error(
      "cudaMalloc(64 bytes)", 2, "cudaErrorMemoryAllocation", "out of memory");
  EXPECT_EQ(e.code, errc::backend_error);
  EXPECT_EQ(
      e.message,
      "cudaMalloc(64 bytes): cudaErrorMemoryAllocation (2): out of memory");
}

TEST(cuda_error_test, runtime_codes_get_their_names_without_a_device) {
  const error oom =
      cuda_call_error("cudaMalloc", 2); // cudaErrorMemoryAllocation
  EXPECT_EQ(oom.code, errc::out_of_memory);
  EXPECT_NE(oom.message.find("cudaMalloc: cudaErrorMemoryAllocation (2)"),
            std::string::npos)
      << oom.message;
  const error nodev =
      cuda_call_error("cudaGetDeviceCount", 100); // cudaErrorNoDevice
  EXPECT_EQ(nodev.code, errc::backend_error);
  EXPECT_NE(nodev.message.find("cudaErrorNoDevice (100)"), std::string::npos)
      << nodev.message;
}

TEST(cuda_error_test, an_unknown_code_still_names_the_call) {
  const error e = format_call_error("ncclSend", 99, "", "");
  EXPECT_EQ(e.message, "ncclSend: unknown error (99)");
}

} // namespace
} // namespace kvfleet::cuda
