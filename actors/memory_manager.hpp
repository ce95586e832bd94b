#pragma once
/// The memory manager's rule: when a pool's usage passes `threshold`
/// (default 0.9) of its capacity, free down to `target` (default 0.8).
/// The engine actor applies it to its store after every batch with
/// block_store::evict_bytes, which evicts the lowest request priority
/// first in every policy's order and never touches pinned or leased blocks.
/// The pool is the engine's arena: host memory, or device memory for an
/// engine on a GPU (engine_actor_config::make_backend); the rule reads the
/// pool's own accounting.

#include <cstddef>

namespace kvfleet::actors {

struct memory_pressure_config {
  double threshold = 0.9;
  double target = 0.8;
};

/// Bytes to free from a pool using `used` of `capacity` bytes; 0 when the
/// pool is not above the threshold.
[[nodiscard]] inline std::size_t bytes_to_free(const memory_pressure_config& c,
                                               std::size_t used,
                                               std::size_t capacity) noexcept {
  if (capacity == 0)
    return 0;
  const auto cap = static_cast<double>(capacity);
  if (static_cast<double>(used) <= c.threshold * cap)
    return 0;
  const auto keep = static_cast<std::size_t>(c.target * cap);
  return used > keep ? used - keep : 0;
}

} // namespace kvfleet::actors
