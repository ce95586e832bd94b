#include "cuda/nccl_library.hpp"

#include <gtest/gtest.h>

#include <cstdlib>

namespace kvfleet::cuda {
namespace {

TEST(nccl_library_test,
     a_missing_library_is_an_error_naming_dlopen_and_the_path) {
  auto lib = nccl_library::load("/nonexistent/kvfleet/libnccl.so.2");
  ASSERT_FALSE(lib);
  EXPECT_EQ(lib.error().code, errc::backend_error);
  EXPECT_NE(
      lib.error().message.find("dlopen(/nonexistent/kvfleet/libnccl.so.2)"),
      std::string::npos)
      << lib.error().message;
}

TEST(nccl_library_test,
     a_library_without_the_symbols_is_an_error_naming_dlsym) {
  auto lib = nccl_library::load("libm.so.6");
  ASSERT_FALSE(lib);
  EXPECT_NE(lib.error().message.find("dlsym(libm.so.6, ncclGetVersion)"),
            std::string::npos)
      << lib.error().message;
  // dlerror()'s own text, as the header promises.
  EXPECT_NE(lib.error().message.find("undefined symbol: ncclGetVersion"),
            std::string::npos)
      << lib.error().message;
}

TEST(nccl_library_test, an_nccl_older_than_2_14_is_refused_naming_its_version) {
  // Before, it failed at its first missing symbol
  // (ncclCommInitRankConfig), saying neither its version nor the need.
  // Where tools/gpu-check carried it, else where the build made it.
  const char* carried = std::getenv("KVFLEET_OLD_NCCL_FOR_TESTS");
  auto lib = nccl_library::load(carried != nullptr && *carried != 0
                                    ? carried
                                    : KVFLEET_OLD_NCCL_FOR_TESTS);
  ASSERT_FALSE(lib) << "an NCCL 2.13 loaded";
  EXPECT_EQ(lib.error().code, errc::backend_error);
  EXPECT_NE(lib.error().message.find("NCCL 2.13.4 at "), std::string::npos)
      << lib.error().message;
  EXPECT_NE(lib.error().message.find("needs 2.14 or newer"), std::string::npos)
      << lib.error().message;
}

TEST(nccl_library_test, the_installed_nccl_loads_and_reports_its_version) {
  auto lib = nccl_library::load();
  if (!lib)
    GTEST_SKIP() << "NCCL not installed here: " << lib.error().describe();
  EXPECT_GE((*lib)->version(), 20000) << (*lib)->path();
}

} // namespace
} // namespace kvfleet::cuda
