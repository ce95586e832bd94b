#pragma once
/// The one seam between the backend factory (built in every configuration)
/// and the device backend (built only with CUDA): a device arena of `bytes`
/// on `device`, as an engine memory backend. With CUDA it is
/// device_memory_backend::create; without CUDA (no_cuda.cpp) it is always
/// errc::unavailable saying so. Likewise create_host_tier: a pinned host
/// tier under a device arena (pinned_host_tier), none (null) under any
/// other arena, and always none without CUDA (there are no device arenas).

#include "engine/memory_backend.hpp"
#include "engine/memory_tier.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <memory>

namespace kvfleet::cuda::internal {

[[nodiscard]] result<std::unique_ptr<engine::memory_backend>>
create_device_arena(std::size_t bytes, int device);

[[nodiscard]] result<std::unique_ptr<engine::memory_tier>>
create_host_tier(engine::memory_backend& arena, std::size_t host_bytes,
                 std::size_t staging_bytes);

} // namespace kvfleet::cuda::internal
