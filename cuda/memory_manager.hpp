#pragma once
/// GPU memory manager: watches a device's memory against a threshold and,
/// above it, frees low-priority blocks first (demoting them to a host tier
/// when the owner gives a demoter, evicting them otherwise).
///
/// Device use counts what cudaMemGetInfo reports as used, minus the part
/// of every block pool's arena on the device that holds no block (arenas
/// are allocated up front, so the driver sees all of them as used; each
/// pool's own accounting says how much is really taken): the caller's
/// arena and, when several engines share the device, the others' (as
/// their engines last reported them, memory_reading::other_arenas_free).
/// Above `threshold` (0.9) of the device, the engines free it down to
/// `target` (0.8) together: each frees its share of the device's excess,
/// in proportion to the bytes its pool holds, so that the device is
/// relieved once, not once per engine. relieve() frees the caller's share,
/// counting bytes already being demoted as freed: through the demoter when
/// there is one (a store's memory tier: the copies run in the background
/// and free their slots when they finish), and by
/// engine::block_store::evict_bytes (lowest priority first, pinned and
/// leased blocks kept) only when there is no demoter or it can move nothing
/// and nothing is on its way. Includes no CUDA header.
/// gpu_memory_manager is not thread-safe: the store's owner calls it (an
/// actor's periodic tick). The hook of device_memory_relief_per_engine() is
/// called from every engine's actor and shares the engines' readings under
/// a mutex (internal/device_relief.hpp).

#include "cuda/backend_factory.hpp"
#include "engine/block_store.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>

namespace kvfleet::cuda {

struct memory_reading {
  std::size_t device_total = 0;  ///< cudaMemGetInfo total
  std::size_t device_free = 0;   ///< cudaMemGetInfo free
  std::size_t pool_capacity = 0; ///< the store's arena on this device
  std::size_t pool_used = 0;     ///< bytes of the arena holding blocks
  std::size_t in_flight = 0;     ///< of pool_used, being demoted to the tier
  /// Bytes of the other engines' arenas on this device that hold no block.
  std::size_t other_arenas_free = 0;
  /// Bytes of the other engines' arenas on this device that hold blocks.
  std::size_t other_pools_used = 0;
};

struct memory_manager_config {
  double threshold = 0.9; ///< act above this fraction of device memory
  double target = 0.8;    ///< and free down to this fraction
};

/// What one relieve() did.
struct relief {
  std::size_t excess = 0;        ///< this engine's share (excess())
  std::size_t device_excess = 0; ///< bytes above target when it started
  std::size_t demoted = 0;       ///< bytes the demoter moved out
  std::size_t evicted = 0;       ///< bytes evicted from the store
};

class gpu_memory_manager {
public:
  /// Moves up to `bytes` of low-priority blocks out of device memory and
  /// returns how many bytes it freed.
  using demoter = std::function<std::size_t(std::size_t bytes)>;

  /// REQUIRES nothing: a threshold outside (0, 1] or a target above it is
  /// errc::invalid_argument.
  [[nodiscard]] static result<gpu_memory_manager>
  create(const memory_manager_config& config = {});

  /// cudaMemGetInfo on `device` plus `store`'s accounting (the store's
  /// arena is assumed to live on `device`; no other engine's arena is
  /// counted: device_memory_relief_per_engine() adds them).
  [[nodiscard]] static result<memory_reading>
  read(int device, const engine::block_store& store);
  /// `store`'s pool alone, as if it were the whole device: for an engine
  /// on host memory, and when a device cannot be read.
  [[nodiscard]] static memory_reading
  read_pool(const engine::block_store& store) noexcept;

  /// Fraction of the device in use, not counting the arenas' free parts
  /// (the caller's and r.other_arenas_free).
  [[nodiscard]] static double usage(const memory_reading& r) noexcept;
  /// Bytes the device is above the target: 0 at or below the threshold.
  [[nodiscard]] std::size_t
  device_excess(const memory_reading& r) const noexcept;
  /// The caller's share of device_excess(r): in proportion to r.pool_used
  /// among all the device's pools (r.pool_used + r.other_pools_used),
  /// rounded up, and at most r.pool_used (only the pool's blocks can be
  /// freed here). Alone on the device (no other pool holds anything): all
  /// of device_excess(r), at most r.pool_used.
  [[nodiscard]] std::size_t excess(const memory_reading& r) const noexcept;
  /// Frees excess(r) bytes, less r.in_flight: demoter first (when given),
  /// eviction only when the demoter moves nothing and nothing is in flight.
  relief relieve(const memory_reading& r, engine::block_store& store,
                 const demoter& demote = {}) const;

  [[nodiscard]] const memory_manager_config& config() const noexcept {
    return config_;
  }

private:
  explicit gpu_memory_manager(const memory_manager_config& c) : config_(c) {}
  memory_manager_config config_;
};

/// Frees memory of engine `slot`'s store when it is under pressure and
/// returns the bytes freed: the engine actor's hook
/// (actors::engine_actor_config::relieve), called after every batch.
using relief_hook =
    std::function<std::size_t(std::uint32_t slot, engine::block_store& store)>;

/// The hook for one engine per GPU, matching device_backend_per_engine():
/// an engine whose pool is device memory (on GPU `slot % GPUs`) reads that
/// device (cudaMemGetInfo and the pool's accounting, read()) and relieves
/// it, demoting to the store's memory tier when it has one
/// (host_tier_per_engine(); the hook also collects finished demotions); an
/// engine on host memory applies the same thresholds to its pool alone
/// (read_pool()). A device that cannot be read is relieved by its
/// pool for that call, with one log line per engine. Errors: thresholds as
/// for create().
///
/// Engines sharing a GPU (more engines than GPUs: slot k and k + GPUs):
/// the hooks made by one call share a record of each device engine's last
/// reading (its arena's capacity and used bytes, after its relief), so
/// each engine counts the other arenas' free parts as free and frees only
/// its share of the device's excess (gpu_memory_manager::excess). The
/// first engine's share may bring the device below the threshold: the
/// others then free nothing, and the device rests between the target and
/// the threshold (no state is kept across calls that could make engines
/// go on evicting below the threshold). Pass every engine on a
/// device the same hook (copies of it share the record). A record is as
/// old as its engine's last call: blocks that changed since (expired, or
/// demotions finished but not yet collected) show at the engine's next
/// call, and an engine that has not called the hook since it started has
/// none (its neighbours count all of its arena as used). An engine that
/// stopped keeps its record until an engine on the
/// same slot calls the hook: its arena's free part, gone from the driver's
/// count, is still subtracted (its neighbours read the device that much
/// lower) and its blocks still take part of the device's excess.
[[nodiscard]] result<relief_hook>
device_memory_relief_per_engine(const memory_manager_config& config = {},
                                log_sink log = {});

} // namespace kvfleet::cuda
