#pragma once
/// Tiering between one GPU and pinned host memory: blocks are demoted from
/// device memory into a pinned host arena and promoted back on a hit,
/// asynchronously.
///
/// A demoted batch gets one contiguous extent of the host arena: its blocks
/// are gathered on the device into staging (one kernel), then moved by one
/// DMA. Promotion moves each run of host-contiguous blocks with one DMA into
/// device staging and scatters them to their slots with one kernel.
/// Demotion and promotion use separate streams and staging rings, so a
/// promotion (a request waiting on a hit) never queues behind demotions.
/// Nothing waits for the GPU except wait(); no room in staging is
/// errc::busy, no room in the host arena errc::out_of_memory.
///
/// Ownership: the caller keeps a demoted block's device slot until the
/// demotion's ticket is finished, and a promotion's destination until its
/// ticket is finished; release() a host block only when no promotion of it
/// is in flight. Includes no CUDA header. Not thread-safe: one owner.

#include "cuda/copy_engine.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace kvfleet::cuda {

struct host_tier_config {
  int device = 0;
  std::size_t host_bytes = 0; ///< pinned arena
  std::size_t staging_bytes = std::size_t{128}
                              << 20; ///< device, half per direction
};

/// A block's place in the host tier.
struct host_block {
  std::size_t offset = 0;
  std::size_t bytes = 0;
  /// Never reused: 64 bits do not wrap (32 did after 2^32 demote batches,
  /// and a reused id lost the live extent's record).
  std::uint64_t extent = 0;
};

struct demote_job {
  const std::byte* src = nullptr; ///< device memory
  std::size_t bytes = 0;
};

struct promote_job {
  host_block block;
  std::byte* dst = nullptr; ///< device memory
};

class host_tier {
public:
  [[nodiscard]] static result<std::unique_ptr<host_tier>>
  create(const host_tier_config& config);
  ~host_tier();
  host_tier(const host_tier&) = delete;
  host_tier& operator=(const host_tier&) = delete;

  /// Starts demoting `jobs`; `out` receives each block's host place.
  /// errc::busy when the staging is full of copies in flight (checked
  /// first), errc::out_of_memory when the host arena has no free extent
  /// for the batch.
  [[nodiscard]] result<copy_ticket> demote(std::span<const demote_job> jobs,
                                           std::vector<host_block>& out);
  /// Starts promoting `jobs` into device memory.
  [[nodiscard]] result<copy_ticket> promote(std::span<const promote_job> jobs);
  /// True when `t` is finished (collects finished batches, never waits);
  /// errc::invalid_handle for a ticket never issued (0, or one no call has
  /// returned yet).
  [[nodiscard]] result<bool> poll(copy_ticket t);
  /// Waits until `t` is finished; errc::invalid_handle as for poll().
  [[nodiscard]] result<void> wait(copy_ticket t);
  /// Frees a host block; its extent returns to the arena with its last block.
  void release(const host_block& b);

  /// The pinned arena (host address; tests read demoted bytes here).
  [[nodiscard]] const std::byte* host_data() const noexcept;
  [[nodiscard]] std::size_t host_capacity() const noexcept;
  [[nodiscard]] std::size_t host_used() const noexcept;
  /// Most bytes one demote() or promote() takes (half the staging; blocks
  /// count rounded up to 256 bytes).
  [[nodiscard]] std::size_t max_batch_bytes() const noexcept;
  [[nodiscard]] stream_ref demote_stream() const noexcept;
  [[nodiscard]] stream_ref promote_stream() const noexcept;

private:
  struct impl;
  explicit host_tier(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

} // namespace kvfleet::cuda
