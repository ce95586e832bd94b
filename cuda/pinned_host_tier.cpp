#include "cuda/pinned_host_tier.hpp"

#include "cuda/internal/device_arena.hpp"

#include <string>

namespace kvfleet::cuda {

result<std::unique_ptr<pinned_host_tier>>
pinned_host_tier::create(device_memory_backend& arena,
                         host_tier_config config) {
  config.device = arena.device();
  auto tier = host_tier::create(config);
  if (!tier)
    return unexpected<error>(tier.error());
  return std::unique_ptr<pinned_host_tier>(new pinned_host_tier(
      arena.device_data(), arena.size(), std::move(*tier)));
}

result<engine::tier_ticket>
pinned_host_tier::demote(std::span<const engine::tier_demotion> jobs,
                         std::vector<engine::tier_place>& places) {
  demote_jobs_.clear();
  for (const engine::tier_demotion& j : jobs) {
    if (j.arena_offset > arena_bytes_ ||
        j.bytes > arena_bytes_ - j.arena_offset)
      return make_error(errc::invalid_argument,
                        "demote: a block outside the arena");
    demote_jobs_.push_back({arena_ + j.arena_offset, j.bytes});
  }
  auto t = tier_->demote(demote_jobs_, blocks_);
  if (!t)
    return unexpected<error>(t.error());
  places.clear();
  for (const host_block& b : blocks_)
    places.push_back({b.offset, b.bytes, b.extent});
  return engine::tier_ticket{*t};
}

result<engine::tier_ticket>
pinned_host_tier::promote(std::span<const engine::tier_promotion> jobs) {
  promote_jobs_.clear();
  for (const engine::tier_promotion& j : jobs) {
    if (j.arena_offset > arena_bytes_ ||
        j.place.bytes > arena_bytes_ - j.arena_offset)
      return make_error(errc::invalid_argument,
                        "promote: a slot outside the arena");
    promote_jobs_.push_back({{j.place.offset, j.place.bytes, j.place.extent},
                             arena_ + j.arena_offset});
  }
  auto t = tier_->promote(promote_jobs_);
  if (!t)
    return unexpected<error>(t.error());
  return engine::tier_ticket{*t};
}

result<bool> pinned_host_tier::poll(engine::tier_ticket t) {
  return tier_->poll(t.value);
}

result<void> pinned_host_tier::wait(engine::tier_ticket t) {
  return tier_->wait(t.value);
}

void pinned_host_tier::release(const engine::tier_place& p) {
  tier_->release({p.offset, p.bytes, p.extent});
}

const std::byte*
pinned_host_tier::host_bytes(const engine::tier_place& p) const noexcept {
  return tier_->host_data() + p.offset;
}

std::size_t pinned_host_tier::capacity_bytes() const noexcept {
  return tier_->host_capacity();
}

std::size_t pinned_host_tier::used_bytes() const noexcept {
  return tier_->host_used();
}

std::size_t pinned_host_tier::max_batch_bytes() const noexcept {
  return tier_->max_batch_bytes();
}

result<std::unique_ptr<engine::memory_tier>>
internal::create_host_tier(engine::memory_backend& arena,
                           std::size_t host_bytes, std::size_t staging_bytes) {
  auto* device = dynamic_cast<device_memory_backend*>(&arena);
  if (device == nullptr)
    return std::unique_ptr<engine::memory_tier>{}; // host memory: no tier
  host_tier_config config;
  config.host_bytes = host_bytes;
  config.staging_bytes = staging_bytes;
  auto tier = pinned_host_tier::create(*device, config);
  if (!tier)
    return unexpected<error>(tier.error());
  return std::unique_ptr<engine::memory_tier>(std::move(*tier));
}

} // namespace kvfleet::cuda
