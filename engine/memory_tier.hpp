#pragma once
/// A memory tier below a block store's arena and above its disk tier: in
/// practice pinned host memory under a GPU arena (cuda/pinned_host_tier.hpp
/// implements it over cuda::host_tier). The store demotes cold blocks into
/// it in the background and promotes them back on a hit
/// (block_store::attach_tier).
///
/// The tier only moves bytes. Slots are named by their offset in the
/// store's arena (the memory_backend the tier was made for); a block's
/// place in the tier is an opaque tier_place. Copies are asynchronous: a
/// batch returns a ticket at once, poll() says whether it has finished
/// without waiting, wait() waits. The store keeps a demoted block's slot
/// until its demotion's ticket has finished, and a promotion's slot and
/// place until its ticket has finished.
///
/// Errors: no staging room for a batch is errc::busy (retry after
/// polling), no room in the tier errc::out_of_memory (release places
/// first), a failed copy an error naming the call. A tier checks its
/// staging first: errc::out_of_memory means the batch would go through
/// now if the tier had the room, so the store drops tier blocks for it
/// only then.
///
/// Thread safety: none; the store's owner calls everything.

#include "engine/memory_backend.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

namespace kvfleet::engine {

/// Identifies one batch of copies.
struct tier_ticket {
  std::uint64_t value = 0;
};

/// Where a block lives in the tier (the tier's own bookkeeping).
struct tier_place {
  std::size_t offset = 0;
  std::size_t bytes = 0;
  std::uint64_t extent = 0; ///< the tier's id of the copy it came with
};

/// One block to copy out of the arena.
struct tier_demotion {
  std::size_t arena_offset = 0;
  std::size_t bytes = 0;
};

/// One block to copy back into the arena.
struct tier_promotion {
  tier_place place;
  std::size_t arena_offset = 0;
};

class memory_tier {
public:
  virtual ~memory_tier() = default;

  /// "pinned host", ...
  [[nodiscard]] virtual std::string_view name() const noexcept = 0;
  /// Starts copying each job's bytes out of the arena; `places` receives
  /// one place per job, in order.
  [[nodiscard]] virtual result<tier_ticket>
  demote(std::span<const tier_demotion> jobs,
         std::vector<tier_place>& places) = 0;
  /// Starts copying each job's place into its arena slot.
  [[nodiscard]] virtual result<tier_ticket>
  promote(std::span<const tier_promotion> jobs) = 0;
  /// True when the batch has finished (never waits).
  [[nodiscard]] virtual result<bool> poll(tier_ticket t) = 0;
  [[nodiscard]] virtual result<void> wait(tier_ticket t) = 0;
  /// Frees a place (no copy of it may be in flight).
  virtual void release(const tier_place& p) = 0;
  /// A place's bytes when the host can address the tier (pinned host
  /// memory can), else null: the store spills a block dropped from the tier
  /// to its disk tier from here.
  [[nodiscard]] virtual const std::byte*
  host_bytes(const tier_place& p) const noexcept = 0;
  [[nodiscard]] virtual std::size_t capacity_bytes() const noexcept = 0;
  [[nodiscard]] virtual std::size_t used_bytes() const noexcept = 0;
  /// Bytes one demote() call can take at most (its staging).
  [[nodiscard]] virtual std::size_t max_batch_bytes() const noexcept = 0;
};

/// Makes a tier for a store's arena: block_store::attach_tier calls it with
/// the store's memory backend. Returning null means "no tier for this
/// arena" (e.g. a host arena under a factory made for device arenas).
using memory_tier_factory =
    std::function<result<std::unique_ptr<memory_tier>>(memory_backend& arena)>;

} // namespace kvfleet::engine
