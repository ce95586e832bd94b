#include "cuda/device_backend.hpp"

#include "cuda/internal/cuda_check.hpp"
#include "cuda/internal/device_arena.hpp"
#include "cuda/kernels.hpp"

namespace kvfleet::cuda {

result<std::unique_ptr<device_memory_backend>>
device_memory_backend::create(std::size_t bytes, int device) {
  if (bytes == 0)
    return make_error(errc::zero_capacity, "device arena of zero bytes");
  if (auto r = internal::use_device(device); !r)
    return unexpected<error>(r.error());
  void* p = nullptr;
  KVFLEET_CUDA_TRY(cudaMalloc(&p, bytes),
                   "cudaMalloc(" + std::to_string(bytes) + " bytes on device " +
                       std::to_string(device) + ")");
  void* sum = nullptr;
  if (auto r = internal::check(cudaMalloc(&sum, sizeof(std::uint64_t)),
                               "cudaMalloc");
      !r) {
    (void)cudaFree(p);
    return unexpected<error>(r.error());
  }
  // cudaMemset is asynchronous: wait for it, or a copy on a non-blocking
  // stream (a promotion into the new arena) could be zeroed after it.
  auto zeroed = internal::check(cudaMemset(p, 0, bytes), "cudaMemset");
  if (zeroed)
    zeroed = internal::check(cudaStreamSynchronize(nullptr),
                             "cudaStreamSynchronize(after cudaMemset)");
  if (!zeroed) {
    (void)cudaFree(sum);
    (void)cudaFree(p);
    return unexpected<error>(zeroed.error());
  }
  return std::unique_ptr<device_memory_backend>(
      new device_memory_backend(static_cast<std::byte*>(p), bytes, device,
                                static_cast<std::uint64_t*>(sum)));
}

device_memory_backend::device_memory_backend(std::byte* data, std::size_t size,
                                             int device, std::uint64_t* sum)
    : data_(data), size_(size), device_(device), sum_(sum),
      name_("cuda:" + std::to_string(device)) {}

device_memory_backend::~device_memory_backend() {
  (void)cudaSetDevice(device_);
  (void)cudaFree(sum_);
  (void)cudaFree(data_);
}

result<void> device_memory_backend::write(std::size_t offset,
                                          std::span<const std::byte> src) {
  if (offset > size_ || src.size() > size_ - offset)
    return make_error(errc::invalid_argument,
                      "device arena write out of bounds");
  if (auto r = internal::use_device(device_); !r)
    return r;
  KVFLEET_CUDA_TRY(cudaMemcpy(data_ + offset, src.data(), src.size(),
                              cudaMemcpyHostToDevice),
                   "cudaMemcpy(host to device)");
  // From pageable memory cudaMemcpy returns once the bytes are staged, not
  // when they have landed: the DMA may still be queued on the default
  // stream, which the non-blocking streams of the host tier, the copy
  // engine and NCCL do not wait for. Waiting here makes write() return
  // when the slot holds the bytes, as the header says.
  KVFLEET_CUDA_TRY(cudaStreamSynchronize(nullptr),
                   "cudaStreamSynchronize(after host to device)");
  return {};
}

result<void> device_memory_backend::read(std::size_t offset,
                                         std::span<std::byte> dst) const {
  if (offset > size_ || dst.size() > size_ - offset)
    return make_error(errc::invalid_argument,
                      "device arena read out of bounds");
  if (auto r = internal::use_device(device_); !r)
    return r;
  KVFLEET_CUDA_TRY(cudaMemcpy(dst.data(), data_ + offset, dst.size(),
                              cudaMemcpyDeviceToHost),
                   "cudaMemcpy(device to host)");
  return {};
}

result<void> device_memory_backend::copy_within(std::size_t dst,
                                                std::size_t src,
                                                std::size_t len) {
  if (src > size_ || len > size_ - src || dst > size_ || len > size_ - dst)
    return make_error(errc::invalid_argument,
                      "device arena copy out of bounds");
  if (len == 0)
    return {};
  if (src < dst + len && dst < src + len)
    return make_error(errc::invalid_argument,
                      "device arena copy between overlapping ranges");
  if (auto r = internal::use_device(device_); !r)
    return r;
  KVFLEET_CUDA_TRY(
      cudaMemcpy(data_ + dst, data_ + src, len, cudaMemcpyDeviceToDevice),
      "cudaMemcpy(device to device)");
  // A device-to-device cudaMemcpy may return before the copy ran; the
  // non-blocking streams of the host tier and NCCL, which may read the
  // destination next, do not wait for the default stream.
  KVFLEET_CUDA_TRY(cudaStreamSynchronize(nullptr),
                   "cudaStreamSynchronize(after device to device)");
  return {};
}

result<std::uint64_t> device_memory_backend::checksum(std::size_t offset,
                                                      std::size_t len) const {
  if (offset > size_ || len > size_ - offset)
    return make_error(errc::invalid_argument,
                      "device arena checksum out of bounds");
  if (auto r = internal::use_device(device_); !r)
    return unexpected<error>(r.error());
  const checksum_job job{data_ + offset, len};
  if (auto r = checksum_blocks({&job, 1}, sum_); !r)
    return unexpected<error>(r.error());
  std::uint64_t sum = 0;
  KVFLEET_CUDA_TRY(cudaMemcpy(&sum, sum_, sizeof sum, cudaMemcpyDeviceToHost),
                   "cudaMemcpy(checksum to host)");
  return sum;
}

result<std::unique_ptr<engine::memory_backend>>
internal::create_device_arena(std::size_t bytes, int device) {
  auto dev = device_memory_backend::create(bytes, device);
  if (!dev)
    return unexpected<error>(dev.error());
  return std::unique_ptr<engine::memory_backend>(std::move(*dev));
}

} // namespace kvfleet::cuda
