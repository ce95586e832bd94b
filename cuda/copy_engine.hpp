#pragma once
/// The copy engine: asynchronous batches of block copies between host
/// memory and one GPU, and within the GPU.
///
/// It owns three non-blocking streams (upload, download, device), a pinned
/// host staging buffer split into an upload and a download ring, and one
/// event per batch in flight. A host-to-device batch is copied into upload
/// staging on the caller's thread and then enqueued as one DMA; a
/// device-to-host batch is one DMA into download staging, copied out to the
/// caller's buffers when poll() sees it finished; a device-to-device batch is
/// one launch of the copy kernel. No call waits for the GPU except wait():
/// when staging has no room, a call returns errc::busy and the caller polls.
///
/// Ownership: host buffers of a to_host() batch must stay valid until its
/// ticket is finished. Includes no CUDA header. Not thread-safe: one owner.

#include "cuda/kernels.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

namespace kvfleet::cuda {

struct copy_engine_config {
  int device = 0;
  /// Pinned staging, half for each direction; a batch must fit its half.
  std::size_t staging_bytes = std::size_t{64} << 20;
};

/// Identifies a batch; tickets increase from 1.
using copy_ticket = std::uint64_t;

struct upload_job {
  std::span<const std::byte> src; ///< host memory (pageable is fine)
  std::byte* dst = nullptr;       ///< device memory
};

struct download_job {
  const std::byte* src = nullptr; ///< device memory
  std::span<std::byte> dst;       ///< host memory, filled when finished
};

class copy_engine {
public:
  [[nodiscard]] static result<std::unique_ptr<copy_engine>>
  create(const copy_engine_config& config = {});
  ~copy_engine();
  copy_engine(const copy_engine&) = delete;
  copy_engine& operator=(const copy_engine&) = delete;

  /// Host to device. errc::busy when upload staging has no room now;
  /// errc::value_too_large when the batch can never fit.
  [[nodiscard]] result<copy_ticket> to_device(std::span<const upload_job> jobs);
  /// Device to host; the host buffers are written when the ticket finishes.
  [[nodiscard]] result<copy_ticket> to_host(std::span<const download_job> jobs);
  /// Device to device (copy kernel on the device stream).
  [[nodiscard]] result<copy_ticket> on_device(std::span<const copy_job> jobs);

  /// Collects finished batches without waiting. True when `t` is finished;
  /// errc::invalid_handle for a ticket never issued (0, or one no call has
  /// returned yet), which would otherwise read as finished or never finish.
  [[nodiscard]] result<bool> poll(copy_ticket t);
  /// Waits until `t` is finished; errc::invalid_handle as for poll().
  [[nodiscard]] result<void> wait(copy_ticket t);
  /// Batches not yet collected.
  [[nodiscard]] std::size_t in_flight() const noexcept;

  [[nodiscard]] stream_ref upload_stream() const noexcept;
  [[nodiscard]] stream_ref download_stream() const noexcept;
  [[nodiscard]] stream_ref device_stream() const noexcept;

private:
  struct impl;
  explicit copy_engine(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

} // namespace kvfleet::cuda
