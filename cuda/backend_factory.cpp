#include "cuda/backend_factory.hpp"

#include "cuda/device.hpp"
#include "cuda/internal/device_arena.hpp"
#include "engine/memory_backend.hpp"

#include <cstdio>
#include <string>
#include <utility>

namespace kvfleet::cuda {

void write_log(const log_sink& log, std::string_view line) {
  if (log)
    log(line);
  else
    std::fprintf(stderr, "%.*s\n", static_cast<int>(line.size()), line.data());
}

namespace {

/// Host memory of `bytes` because device memory could not be had: `why`.
result<std::unique_ptr<engine::memory_backend>>
host_instead(std::size_t bytes, const std::string& why, const log_sink& log) {
  auto host = engine::host_memory_backend::create(bytes);
  if (!host)
    return unexpected<error>(host.error());
  write_log(log, "kvfleet: no device memory for the block pool (" + why +
                     "); using " + std::to_string(bytes) +
                     " bytes of host memory instead");
  return std::unique_ptr<engine::memory_backend>(std::move(*host));
}

} // namespace

result<std::unique_ptr<engine::memory_backend>>
create_memory_backend(std::size_t bytes, int device, const log_sink& log) {
  if (bytes == 0)
    return make_error(errc::zero_capacity, "block pool of zero bytes");
  auto dev = internal::create_device_arena(bytes, device);
  if (dev)
    return std::move(*dev);
  return host_instead(bytes, dev.error().message, log);
}

backend_factory device_backend_per_engine(log_sink log) {
  auto count = device_count();
  const int devices = count ? *count : 0;
  std::string no_device = count ? std::string() : count.error().message;
  return [devices, no_device = std::move(no_device),
          log = std::move(log)](std::uint32_t slot, std::size_t bytes)
             -> result<std::unique_ptr<engine::memory_backend>> {
    const std::string prefix = "engine " + std::to_string(slot) + ": ";
    const log_sink slot_log = [&](std::string_view line) {
      write_log(log, prefix + std::string(line));
    };
    if (bytes == 0)
      return make_error(errc::zero_capacity, "block pool of zero bytes");
    if (devices <= 0)
      return host_instead(bytes, no_device, slot_log);
    const auto device =
        static_cast<int>(slot % static_cast<std::uint32_t>(devices));
    return create_memory_backend(bytes, device, slot_log);
  };
}

engine::memory_tier_factory host_tier_per_engine(host_tier_options options,
                                                 log_sink log) {
  return [options, log = std::move(log)](engine::memory_backend& arena)
             -> result<std::unique_ptr<engine::memory_tier>> {
    if (options.host_bytes == 0 || options.staging_bytes == 0)
      return make_error(errc::invalid_argument,
                        "a host tier needs host and staging bytes");
    auto tier = internal::create_host_tier(arena, options.host_bytes,
                                           options.staging_bytes);
    if (tier)
      return tier;
    write_log(log, "kvfleet: " + std::string(arena.name()) +
                       ": no pinned host tier (" + tier.error().message +
                       "); blocks under memory pressure are evicted instead");
    return std::unique_ptr<engine::memory_tier>{};
  };
}

} // namespace kvfleet::cuda
