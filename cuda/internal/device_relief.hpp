#pragma once
// The machinery behind device_memory_relief_per_engine(): the record the
// engines sharing a GPU keep of each other's arenas, and the hook made over
// an injected view of the devices, so device-free tests can make host
// stores share a pretend GPU. Includes no CUDA header.

#include "cuda/backend_factory.hpp"
#include "cuda/device.hpp"
#include "cuda/memory_manager.hpp"
#include "engine/block_store.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>

namespace kvfleet::cuda::internal {

/// Each device engine's last reading of its arena (capacity, used bytes),
/// by slot. Thread-safe: the relief
/// hook runs on every engine's own actor thread and they all share one
/// record, so a mutex guards it (held only to copy a few numbers; nothing
/// blocks under it). A record is as fresh as its engine's last call.
class device_readings {
public:
  /// Records engine `slot`'s arena on `device` (r.pool_capacity,
  /// r.pool_used) and returns `r` with the other engines on `device`
  /// filled in: the free and used parts of their arenas as last recorded.
  [[nodiscard]] memory_reading share(int device, std::uint32_t slot,
                                     memory_reading r) {
    std::lock_guard lock{mutex_};
    engines_[slot] = {device, r.pool_capacity, r.pool_used};
    r.other_arenas_free = 0;
    r.other_pools_used = 0;
    for (const auto& [other, e] : engines_) {
      if (other == slot || e.device != device)
        continue;
      const std::size_t used = e.used < e.capacity ? e.used : e.capacity;
      r.other_arenas_free += e.capacity - used;
      r.other_pools_used += used;
    }
    return r;
  }

  /// After engine `slot`'s relief: its arena now holds `used` bytes.
  void settle(int device, std::uint32_t slot, std::size_t capacity,
              std::size_t used) {
    std::lock_guard lock{mutex_};
    engines_[slot] = {device, capacity, used};
  }

private:
  struct arena {
    int device = 0;
    std::size_t capacity = 0;
    std::size_t used = 0;
  };
  std::mutex mutex_;
  std::map<std::uint32_t, arena> engines_; // by slot
};

/// How the hook sees the machine. device_memory_relief_per_engine() passes
/// the real one: cudaGetDeviceCount's count, cudaMemGetInfo, and "the
/// store's arena is not host memory".
struct device_view {
  std::uint32_t devices = 0;
  std::function<result<device_memory_info>(int device)> memory;
  std::function<bool(const engine::block_store& store)> on_device;
};

/// device_memory_relief_per_engine() over `view`.
[[nodiscard]] result<relief_hook>
device_memory_relief(const memory_manager_config& config, log_sink log,
                     device_view view);

} // namespace kvfleet::cuda::internal
