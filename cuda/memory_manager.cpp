#include "cuda/memory_manager.hpp"

#include "cuda/device.hpp"

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <set>
#include <string>

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
  r.in_flight = store.tier_bytes_in_flight();
  return r;
}

memory_reading
gpu_memory_manager::read_pool(const engine::block_store& store) noexcept {
  memory_reading r;
  r.pool_capacity = store.capacity_bytes();
  r.pool_used = store.used_bytes();
  r.in_flight = store.tier_bytes_in_flight();
  // The arena is all allocated, as on a device: usage() then subtracts
  // its free part and sees exactly the pool's used bytes.
  r.device_total = r.pool_capacity;
  r.device_free = 0;
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
  // Bytes being demoted leave when their copies finish: count them freed.
  std::size_t left = out.excess - std::min(r.in_flight, out.excess);
  if (left > 0 && demote) {
    out.demoted = std::min(demote(left), left);
    // While the tier takes blocks, the rest waits for the next call rather
    // than being evicted; only a tier that can take nothing, with nothing
    // on its way, leaves eviction to do it.
    if (out.demoted > 0 || r.in_flight > 0)
      return out;
  }
  if (left > 0)
    out.evicted = store.evict_bytes(left);
  return out;
}

result<relief_hook>
device_memory_relief_per_engine(const memory_manager_config& config,
                                log_sink log) {
  auto manager = gpu_memory_manager::create(config);
  if (!manager)
    return unexpected<error>(manager.error());
  auto count = device_count();
  const auto devices = static_cast<std::uint32_t>(count ? *count : 0);
  // Engines whose device could not be read, so each logs once. The hook
  // is called from each engine's own actor: the set is shared.
  struct logged_slots {
    std::mutex mutex;
    std::set<std::uint32_t> slots;
  };
  auto logged = std::make_shared<logged_slots>();
  return relief_hook{
      [m = *manager, devices, log = std::move(log),
       logged](std::uint32_t slot, engine::block_store& store) -> std::size_t {
        store.poll_tier(); // finished demotions free their slots first
        memory_reading r = gpu_memory_manager::read_pool(store);
        if (!store.host_addressable() && devices > 0) {
          const auto device = static_cast<int>(slot % devices);
          if (auto dev = gpu_memory_manager::read(device, store)) {
            r = *dev;
          } else {
            std::lock_guard lock{logged->mutex};
            if (logged->slots.insert(slot).second) {
              write_log(log, "kvfleet: engine " + std::to_string(slot) +
                                 ": cannot read device memory (" +
                                 dev.error().message +
                                 "); memory pressure from its pool alone");
            }
          }
        }
        gpu_memory_manager::demoter demote;
        if (store.tier() != nullptr)
          demote = [&store](std::size_t bytes) {
            return store.demote_to_tier(bytes).value_or(0);
          };
        const relief done = m.relieve(r, store, demote);
        return done.demoted + done.evicted;
      }};
}

} // namespace kvfleet::cuda
