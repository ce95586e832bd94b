#pragma once
/// engine::memory_tier over cuda::host_tier: pinned host memory under one
/// engine's device arena, so that block_store::demote_to_tier() moves cold
/// blocks off the GPU (gather kernel into device staging, one DMA) and a
/// hit brings them back (DMA into staging, scatter kernel), on the host
/// tier's own streams: a promotion never queues behind demotions, and
/// nothing waits for the GPU except wait().
///
/// Built with CUDA only; engines get one through host_tier_per_engine()
/// (backend_factory.hpp), which exists in every build. Includes no CUDA
/// header. Not thread-safe: the store's owner calls it.

#include "cuda/device_backend.hpp"
#include "cuda/host_tier.hpp"
#include "engine/memory_tier.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <memory>

namespace kvfleet::cuda {

class pinned_host_tier final : public engine::memory_tier {
public:
  /// A tier of `config.host_bytes` of pinned host memory (and
  /// `config.staging_bytes` of device staging) under `arena`'s device;
  /// config.device is taken from the arena. CUDA failures (pinned memory
  /// refused, ...) are errors naming the call.
  [[nodiscard]] static result<std::unique_ptr<pinned_host_tier>>
  create(device_memory_backend& arena, host_tier_config config);

  [[nodiscard]] std::string_view name() const noexcept override {
    return "pinned host";
  }
  [[nodiscard]] result<engine::tier_ticket>
  demote(std::span<const engine::tier_demotion> jobs,
         std::vector<engine::tier_place>& places) override;
  [[nodiscard]] result<engine::tier_ticket>
  promote(std::span<const engine::tier_promotion> jobs) override;
  [[nodiscard]] result<bool> poll(engine::tier_ticket t) override;
  [[nodiscard]] result<void> wait(engine::tier_ticket t) override;
  void release(const engine::tier_place& p) override;
  [[nodiscard]] const std::byte*
  host_bytes(const engine::tier_place& p) const noexcept override;
  [[nodiscard]] std::size_t capacity_bytes() const noexcept override;
  [[nodiscard]] std::size_t used_bytes() const noexcept override;
  [[nodiscard]] std::size_t max_batch_bytes() const noexcept override;

private:
  pinned_host_tier(std::byte* arena, std::size_t arena_bytes,
                   std::unique_ptr<host_tier> tier)
      : arena_(arena), arena_bytes_(arena_bytes), tier_(std::move(tier)) {}
  std::byte* arena_;
  std::size_t arena_bytes_;
  std::unique_ptr<host_tier> tier_;
  std::vector<demote_job> demote_jobs_; // reused
  std::vector<host_block> blocks_;
  std::vector<promote_job> promote_jobs_;
};

} // namespace kvfleet::cuda
