#pragma once
/// The device memory backend: a block pool's arena in GPU memory, so that an
/// engine::block_store runs unchanged on a GPU.
///
/// One arena per GPU, from one cudaMalloc; the pool cuts it into slab slots
/// exactly as on the host (offsets into the arena). host_data() is null, so
/// the store moves bytes through write()/read() (synchronous cudaMemcpy on
/// the calling thread's current stream semantics: they return when the copy
/// is done). checksum() runs on the device (kernels.hpp). copy_within() is
/// a device-to-device copy, so the store compacts slabs in a device arena
/// as on the host. Includes no CUDA header. Not thread-safe: one owner,
/// like the store.

#include "engine/memory_backend.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

namespace kvfleet::cuda {

class device_memory_backend final : public engine::memory_backend {
public:
  /// Allocates `bytes` of device memory on `device` and zeroes it. Zero
  /// bytes is errc::zero_capacity; a CUDA failure (no driver, no device, out
  /// of memory) is an error naming the call and its code.
  [[nodiscard]] static result<std::unique_ptr<device_memory_backend>>
  create(std::size_t bytes, int device = 0);
  ~device_memory_backend() override;

  [[nodiscard]] std::string_view name() const noexcept override {
    return name_;
  }
  [[nodiscard]] std::size_t size() const noexcept override { return size_; }
  [[nodiscard]] std::byte* host_data() noexcept override { return nullptr; }
  [[nodiscard]] result<void> write(std::size_t offset,
                                   std::span<const std::byte> src) override;
  [[nodiscard]] result<void> read(std::size_t offset,
                                  std::span<std::byte> dst) const override;
  [[nodiscard]] result<std::uint64_t> checksum(std::size_t offset,
                                               std::size_t len) const override;
  [[nodiscard]] bool can_copy_within() const noexcept override { return true; }
  /// Returns when the bytes have landed (other streams may read them next).
  /// Overlapping ranges are errc::invalid_argument: a device copy between
  /// them is undefined.
  [[nodiscard]] result<void> copy_within(std::size_t dst, std::size_t src,
                                         std::size_t len) override;

  /// The arena's device address (for kernels, copies and transports).
  [[nodiscard]] std::byte* device_data() noexcept { return data_; }
  [[nodiscard]] int device() const noexcept { return device_; }

private:
  device_memory_backend(std::byte* data, std::size_t size, int device,
                        std::uint64_t* sum);
  std::byte* data_;
  std::size_t size_;
  int device_;
  std::uint64_t* sum_; // one device word for checksum()
  std::string name_;
};

} // namespace kvfleet::cuda
