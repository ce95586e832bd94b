#include "cuda/memory_manager.hpp"

#include "cuda/device.hpp"

#include <algorithm>
#include <cmath>

namespace kvfleet::cuda {

result<gpu_memory_manager>
gpu_memory_manager::create(const memory_manager_config& c) {
  if (!(c.threshold > 0.0 && c.threshold <= 1.0) || !(c.target > 0.0) ||
      c.target > c.threshold)
    return make_error(
        errc::invalid_argument,
        "memory manager: need 0 < target <= threshold <= 1 (got target " +
            std::to_string(c.target) + ", threshold " +
            std::to_string(c.threshold) + ")");
  return gpu_memory_manager(c);
}

result<memory_reading>
gpu_memory_manager::read(int device, const engine::block_store& store) {
  auto info = memory_info(device);
  if (!info)
    return unexpected<error>(info.error());
  memory_reading r;
  r.device_total = info->total_bytes;
  r.device_free = info->free_bytes;
  r.pool_capacity = store.capacity_bytes();
  r.pool_used = store.used_bytes();
  return r;
}

namespace {
std::size_t effective_used(const memory_reading& r) noexcept {
  const std::size_t used =
      r.device_total - std::min(r.device_free, r.device_total);
  const std::size_t arena_free =
      r.pool_capacity - std::min(r.pool_used, r.pool_capacity);
  return used - std::min(arena_free, used);
}
} // namespace

double gpu_memory_manager::usage(const memory_reading& r) noexcept {
  if (r.device_total == 0)
    return 0.0;
  return static_cast<double>(effective_used(r)) /
         static_cast<double>(r.device_total);
}

std::size_t gpu_memory_manager::excess(const memory_reading& r) const noexcept {
  if (usage(r) <= config_.threshold)
    return 0;
  const auto target = static_cast<std::size_t>(
      std::floor(config_.target * static_cast<double>(r.device_total)));
  const std::size_t used = effective_used(r);
  // Only the pool's blocks can be freed here.
  return std::min(used > target ? used - target : 0, r.pool_used);
}

relief gpu_memory_manager::relieve(const memory_reading& r,
                                   engine::block_store& store,
                                   const demoter& demote) const {
  relief out;
  out.excess = excess(r);
  std::size_t left = out.excess;
  if (left > 0 && demote) {
    out.demoted = std::min(demote(left), left);
    left -= out.demoted;
  }
  if (left > 0)
    out.evicted = store.evict_bytes(left);
  return out;
}

} // namespace kvfleet::cuda
