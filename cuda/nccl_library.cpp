#include "cuda/nccl_library.hpp"

#include "cuda/cuda_error.hpp"
#include "cuda/internal/nccl_api.hpp"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace kvfleet::cuda {

namespace {

const char* name_of(int code) {
  switch (code) {
  case ncclSuccess:
    return "ncclSuccess";
  case ncclUnhandledCudaError:
    return "ncclUnhandledCudaError";
  case ncclSystemError:
    return "ncclSystemError";
  case ncclInternalError:
    return "ncclInternalError";
  case ncclInvalidArgument:
    return "ncclInvalidArgument";
  case ncclInvalidUsage:
    return "ncclInvalidUsage";
  case ncclRemoteError:
    return "ncclRemoteError";
  case ncclInProgress:
    return "ncclInProgress";
  default:
    return "ncclUnknownResult";
  }
}

/// NCCL 2.14: the first with ncclCommInitRankConfig.
constexpr int min_version = 21400;

template <class F> bool bind(void* handle, const char* sym, F& out) {
  void* p = ::dlsym(handle, sym);
  if (p == nullptr)
    return false;
  static_assert(sizeof(F) == sizeof(void*));
  std::memcpy(&out, &p, sizeof p); // object to function pointer (POSIX)
  return true;
}

} // namespace

error nccl_call_error(const nccl_library& lib, std::string_view call,
                      int code) {
  const char* text =
      lib.fns().get_error_string != nullptr
          ? lib.fns().get_error_string(static_cast<ncclResult_t>(code))
          : nullptr;
  return format_call_error(call, code, name_of(code),
                           text != nullptr ? text : "");
}

// NCCL stays loaded once loaded: ncclGetUniqueId starts a bootstrap
// thread that waits for the ranks to connect and outlives every object
// here when they never do (an id made and not used, a join that timed
// out). dlclose() unmapped the code under that thread, which crashed the
// process (seen on an H200: a test that made an id it did not use died
// with SIGSEGV when its nccl_library went).
nccl_library::~nccl_library() = default;

result<std::shared_ptr<const nccl_library>>
nccl_library::load(const std::string& path) {
  std::vector<std::string> tries;
  if (!path.empty()) {
    tries.push_back(path);
  } else if (const char* env = std::getenv("KVFLEET_NCCL_LIBRARY");
             env != nullptr && *env != 0) {
    tries.emplace_back(env);
  } else {
    tries = {"libnccl.so.2", "libnccl.so"};
  }
  std::string why;
  void* handle = nullptr;
  std::string loaded;
  for (const std::string& p : tries) {
    handle = ::dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle != nullptr) {
      loaded = p;
      break;
    }
    const char* e = ::dlerror();
    if (!why.empty())
      why += "; ";
    why += "dlopen(" + p + "): " + (e != nullptr ? e : "unknown error");
  }
  if (handle == nullptr)
    return make_error(errc::backend_error, "cannot load NCCL: " + why);
  // Until an id is made no NCCL thread runs, so a load that fails here
  // closes what it opened (before, each failed load kept it mapped).
  struct close_unless_kept {
    void* handle;
    bool keep = false;
    ~close_unless_kept() {
      if (!keep)
        (void)::dlclose(handle);
    }
  } closer{handle};
  std::shared_ptr<nccl_library> lib(new nccl_library());
  lib->handle_ = handle;
  lib->path_ = loaded;
  lib->api_ = std::make_unique<api>();
  api& a = *lib->api_;
  // The version first: an NCCL older than 2.14 lacks
  // ncclCommInitRankConfig, and said only that the symbol was missing.
  if (bind(handle, "ncclGetVersion", a.get_version)) {
    int v = 0;
    if (const ncclResult_t r = a.get_version(&v); r != ncclSuccess)
      return unexpected<error>(nccl_call_error(*lib, "ncclGetVersion", r));
    if (v < min_version) {
      // 2.9 and later: major * 10000 + minor * 100 + patch; before,
      // major * 1000 + minor * 100 + patch.
      const int major = v >= 10000 ? v / 10000 : v / 1000;
      const int minor = v >= 10000 ? v % 10000 / 100 : v % 1000 / 100;
      return make_error(errc::backend_error,
                        "NCCL " + std::to_string(major) + "." +
                            std::to_string(minor) + "." +
                            std::to_string(v % 100) + " at " + loaded +
                            " (version code " + std::to_string(v) +
                            "); kvfleet needs 2.14 or newer "
                            "(ncclCommInitRankConfig)");
    }
    lib->version_ = v;
  }
  const std::pair<const char*, bool> bound[] = {
      {"ncclGetVersion", a.get_version != nullptr},
      {"ncclGetUniqueId", bind(handle, "ncclGetUniqueId", a.get_unique_id)},
      {"ncclCommInitRankConfig",
       bind(handle, "ncclCommInitRankConfig", a.comm_init_rank_config)},
      {"ncclCommDestroy", bind(handle, "ncclCommDestroy", a.comm_destroy)},
      {"ncclCommAbort", bind(handle, "ncclCommAbort", a.comm_abort)},
      {"ncclCommGetAsyncError",
       bind(handle, "ncclCommGetAsyncError", a.comm_get_async_error)},
      {"ncclSend", bind(handle, "ncclSend", a.send)},
      {"ncclRecv", bind(handle, "ncclRecv", a.recv)},
      {"ncclGroupStart", bind(handle, "ncclGroupStart", a.group_start)},
      {"ncclGroupEnd", bind(handle, "ncclGroupEnd", a.group_end)},
      {"ncclGetErrorString",
       bind(handle, "ncclGetErrorString", a.get_error_string)},
  };
  for (const auto& [sym, ok] : bound) {
    if (ok)
      continue;
    // Looked up again for dlerror()'s text: the lookups above ran in one
    // go, and each overwrote the previous one's error.
    (void)::dlerror();
    (void)::dlsym(handle, sym);
    const char* e = ::dlerror();
    return make_error(errc::backend_error,
                      "dlsym(" + loaded + ", " + sym +
                          "): " + (e != nullptr ? e : "symbol not found"));
  }
  closer.keep = true;
  return std::shared_ptr<const nccl_library>(std::move(lib));
}

result<nccl_id> nccl_library::make_id() const {
  ncclUniqueId id{};
  if (const ncclResult_t r = api_->get_unique_id(&id); r != ncclSuccess)
    return unexpected<error>(nccl_call_error(*this, "ncclGetUniqueId", r));
  static_assert(sizeof(id) == sizeof(nccl_id::bytes));
  nccl_id out;
  std::memcpy(out.bytes.data(), &id, sizeof id);
  return out;
}

} // namespace kvfleet::cuda
