#pragma once
/// The one seam between the backend factory (built in every configuration)
/// and the device backend (built only with CUDA): a device arena of `bytes`
/// on `device`, as an engine memory backend. With CUDA it is
/// device_memory_backend::create; without CUDA (no_cuda.cpp) it is always
/// errc::unavailable saying so.

#include "engine/memory_backend.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <memory>

namespace kvfleet::cuda::internal {

[[nodiscard]] result<std::unique_ptr<engine::memory_backend>>
create_device_arena(std::size_t bytes, int device);

} // namespace kvfleet::cuda::internal
