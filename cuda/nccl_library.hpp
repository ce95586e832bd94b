#pragma once
/// NCCL, loaded at run time with dlopen, so that a binary built here runs
/// where libnccl lives elsewhere (or nowhere: then only the NCCL transport
/// is unavailable, with an error value saying why).
///
/// Search order: the path given, else $KVFLEET_NCCL_LIBRARY, else
/// "libnccl.so.2" and "libnccl.so" through the dynamic loader's path.
/// Transports share one loaded library; once loaded, NCCL stays loaded
/// until the process exits (never dlclose'd: ncclGetUniqueId starts a
/// thread that outlives every object here when the ranks never connect,
/// and unloading the code under it crashed the process). Includes no NCCL
/// header. Thread safety: a loaded library is immutable.

#include "engine/result.hpp"

#include <array>
#include <cstddef>
#include <memory>
#include <string>

namespace kvfleet::cuda {

/// An ncclUniqueId: made by one rank, sent to the others out of band.
struct nccl_id {
  std::array<std::byte, 128> bytes{};
};

class nccl_library {
public:
  /// Loads NCCL. A missing library or symbol is errc::backend_error naming
  /// dlopen/dlsym, the path and dlerror()'s text.
  [[nodiscard]] static result<std::shared_ptr<const nccl_library>>
  load(const std::string& path = {});
  ~nccl_library();
  nccl_library(const nccl_library&) = delete;
  nccl_library& operator=(const nccl_library&) = delete;

  /// NCCL's version code (e.g. 22803 for 2.28.3).
  [[nodiscard]] int version() const noexcept { return version_; }
  /// The path that was loaded.
  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  /// ncclGetUniqueId.
  [[nodiscard]] result<nccl_id> make_id() const;

  /// The NCCL entry points (cuda/internal use).
  struct api;
  [[nodiscard]] const api& fns() const noexcept { return *api_; }

private:
  nccl_library() = default;
  void* handle_ = nullptr;
  std::unique_ptr<api> api_;
  std::string path_;
  int version_ = 0;
};

/// "CALL: ncclXxx (CODE): TEXT" for an NCCL result code.
[[nodiscard]] error nccl_call_error(const nccl_library& lib,
                                    std::string_view call, int code);

} // namespace kvfleet::cuda
