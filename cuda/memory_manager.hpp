#pragma once
/// GPU memory manager: watches a device's memory against a threshold and,
/// above it, frees low-priority blocks first (demoting them to a host tier
/// when the owner gives a demoter, evicting them otherwise).
///
/// Device use counts what cudaMemGetInfo reports as used, minus the part
/// of the block pool's arena that holds no block (the arena is allocated up
/// front, so the driver sees all of it as used; the pool's own accounting
/// says how much is really taken). Above `threshold` (0.9) of the device,
/// relieve() frees down to `target` (0.8), counting bytes already being
/// demoted as freed: through the demoter when there is one (a store's
/// memory tier: the copies run in the background and free their slots when
/// they finish), and by engine::block_store::evict_bytes (lowest priority
/// first, pinned and leased blocks kept) only when there is no demoter or
/// it can move nothing and nothing is on its way. Includes no CUDA header.
/// Not thread-safe: the store's owner calls it (an actor's periodic tick).

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
};

struct memory_manager_config {
  double threshold = 0.9; ///< act above this fraction of device memory
  double target = 0.8;    ///< and free down to this fraction
};

/// What one relieve() did.
struct relief {
  std::size_t excess = 0;  ///< bytes above target when it started
  std::size_t demoted = 0; ///< bytes the demoter moved out
  std::size_t evicted = 0; ///< bytes evicted from the store
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
  /// arena is assumed to live on `device`).
  [[nodiscard]] static result<memory_reading>
  read(int device, const engine::block_store& store);
  /// `store`'s pool alone, as if it were the whole device: for an engine
  /// on host memory, and when a device cannot be read.
  [[nodiscard]] static memory_reading
  read_pool(const engine::block_store& store) noexcept;

  /// Fraction of the device in use, not counting the arena's free part.
  [[nodiscard]] static double usage(const memory_reading& r) noexcept;
  /// Bytes to free to reach the target; 0 at or below the threshold.
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
[[nodiscard]] result<relief_hook>
device_memory_relief_per_engine(const memory_manager_config& config = {},
                                log_sink log = {});

} // namespace kvfleet::cuda
