#pragma once
/// Choosing an engine's block-pool memory at start-up: device memory when a
/// GPU can give it, host memory otherwise. Built in every configuration:
/// without CUDA (KVFLEET_CUDA=OFF, or no nvcc found when kvfleet was
/// configured) every request for device memory falls back to host memory
/// with a log line that says the build has no CUDA. Includes no CUDA header.
/// Thread safety: the functions may be called from any thread; a returned
/// backend has one owner.

#include "engine/memory_backend.hpp"
#include "engine/memory_tier.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>

namespace kvfleet::cuda {

/// Receives one-line log messages.
using log_sink = std::function<void(std::string_view)>;

/// Sends `line` to `log`, or to stderr when `log` is empty.
void write_log(const log_sink& log, std::string_view line);

/// The block pool's backend for start-up: device memory on `device`, or,
/// when that cannot be had (no driver, no device, not enough memory, a
/// build without CUDA), a host backend of the same size, with one line
/// through `log` (stderr when empty) saying why. Errors: zero bytes is
/// errc::zero_capacity (nothing logged); otherwise only when the host
/// backend fails too.
[[nodiscard]] result<std::unique_ptr<engine::memory_backend>>
create_memory_backend(std::size_t bytes, int device = 0,
                      const log_sink& log = {});

/// Makes the backend of engine `slot`, `bytes` long.
using backend_factory =
    std::function<result<std::unique_ptr<engine::memory_backend>>(
        std::uint32_t slot, std::size_t bytes)>;

/// One engine per GPU: engine `slot` gets device memory on GPU
/// `slot % device_count()` (counted once, here), so N engines on G GPUs
/// share them round-robin; with no usable device, host memory. Every
/// fallback to host memory logs its one line through `log`, naming the
/// slot. The result is copyable and may be called from any thread.
[[nodiscard]] backend_factory device_backend_per_engine(log_sink log = {});

/// Sizes of each device engine's pinned host tier.
struct host_tier_options {
  std::size_t host_bytes = 0;                        ///< pinned host memory
  std::size_t staging_bytes = std::size_t{64} << 20; ///< device, per engine
};

/// The memory tier of each engine (actors::engine_actor_config::make_tier,
/// engine::block_store::attach_tier): a pinned host tier
/// (pinned_host_tier.hpp) of `options.host_bytes` under an engine whose
/// pool is device memory; none under host memory, and none in a build
/// without CUDA. When the tier cannot be made (pinned memory refused, ...)
/// the engine runs without one, with one line through `log` saying why.
/// Zero host bytes is errc::invalid_argument when the factory is called.
[[nodiscard]] engine::memory_tier_factory
host_tier_per_engine(host_tier_options options, log_sink log = {});

} // namespace kvfleet::cuda
