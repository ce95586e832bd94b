#include "cuda/memory_manager.hpp"

#include "cuda/device.hpp"
#include "cuda/internal/device_relief.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
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
  // Every arena on the device is allocated whole: the free parts of the
  // other engines' arenas are no more in use than the caller's.
  const std::size_t arenas_free =
      arena_free +
      std::min(r.other_arenas_free,
               std::numeric_limits<std::size_t>::max() - arena_free);
  return used - std::min(arenas_free, used);
}
} // namespace

double gpu_memory_manager::usage(const memory_reading& r) noexcept {
  if (r.device_total == 0)
    return 0.0;
  return static_cast<double>(effective_used(r)) /
         static_cast<double>(r.device_total);
}

std::size_t
gpu_memory_manager::device_excess(const memory_reading& r) const noexcept {
  const auto target = static_cast<std::size_t>(
      std::floor(config_.target * static_cast<double>(r.device_total)));
  const std::size_t used = effective_used(r);
  if (used <= target || usage(r) <= config_.threshold)
    return 0;
  return used - target;
}

std::size_t gpu_memory_manager::excess(const memory_reading& r) const noexcept {
  const std::size_t all = device_excess(r);
  if (all == 0 || r.pool_used == 0)
    return 0;
  std::size_t share = all;
  if (r.other_pools_used > 0) {
    // Each engine frees the part its pool holds of all the device's blocks,
    // so together they free the excess once. Rounded up: the shares add up
    // to at least the excess (eviction frees whole blocks anyway).
    const double pools = static_cast<double>(r.pool_used) +
                         static_cast<double>(r.other_pools_used);
    share = static_cast<std::size_t>(std::ceil(
        static_cast<double>(all) * (static_cast<double>(r.pool_used) / pools)));
  }
  // Only the pool's blocks can be freed here.
  return std::min({share, all, r.pool_used});
}

relief gpu_memory_manager::relieve(const memory_reading& r,
                                   engine::block_store& store,
                                   const demoter& demote) const {
  relief out;
  out.device_excess = device_excess(r);
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
internal::device_memory_relief(const memory_manager_config& config,
                               log_sink log, device_view view) {
  auto manager = gpu_memory_manager::create(config);
  if (!manager)
    return unexpected<error>(manager.error());
  // Engines whose device could not be read, so each logs once. The hook
  // is called from each engine's own actor: the set is shared.
  struct logged_slots {
    std::mutex mutex;
    std::set<std::uint32_t> slots;
  };
  auto logged = std::make_shared<logged_slots>();
  // The device engines' arenas, shared by every copy of the hook so that
  // engines on one GPU count each other's (device_readings).
  auto readings = std::make_shared<device_readings>();
  return relief_hook{[m = *manager, view = std::move(view),
                      log = std::move(log), logged,
                      readings](std::uint32_t slot,
                                engine::block_store& store) -> std::size_t {
    store.poll_tier(); // finished demotions free their slots first
    memory_reading r = gpu_memory_manager::read_pool(store);
    std::optional<int> device;
    if (view.devices > 0 && view.on_device(store)) {
      const auto d = static_cast<int>(slot % view.devices);
      if (auto info = view.memory(d)) {
        r.device_total = info->total_bytes;
        r.device_free = info->free_bytes;
        r = readings->share(d, slot, r);
        device = d;
      } else {
        std::lock_guard lock{logged->mutex};
        if (logged->slots.insert(slot).second) {
          write_log(log, "kvfleet: engine " + std::to_string(slot) +
                             ": cannot read device memory (" +
                             info.error().message +
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
    if (device) {
      readings->settle(*device, slot, store.capacity_bytes(),
                       store.used_bytes());
    }
    return done.demoted + done.evicted;
  }};
}

result<relief_hook>
device_memory_relief_per_engine(const memory_manager_config& config,
                                log_sink log) {
  auto count = device_count();
  internal::device_view view;
  view.devices = static_cast<std::uint32_t>(count ? *count : 0);
  view.memory = [](int device) { return memory_info(device); };
  view.on_device = [](const engine::block_store& store) {
    return !store.host_addressable();
  };
  return internal::device_memory_relief(config, std::move(log),
                                        std::move(view));
}

} // namespace kvfleet::cuda
