#pragma once
// A cudaMalloc'd buffer for tests and benchmarks (cuda/ only).

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <vector>

namespace kvfleet::cuda::internal {

class device_buffer {
public:
  explicit device_buffer(std::size_t bytes) : bytes_(bytes) {
    if (cudaMalloc(&p_, bytes == 0 ? 1 : bytes) != cudaSuccess) {
      std::fprintf(stderr, "device_buffer: cudaMalloc(%zu) failed\n", bytes);
      std::abort();
    }
  }
  ~device_buffer() { (void)cudaFree(p_); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;

  [[nodiscard]] std::byte* data() const noexcept {
    return static_cast<std::byte*>(p_);
  }
  [[nodiscard]] std::size_t size() const noexcept { return bytes_; }
  void upload(std::span<const std::byte> src, std::size_t at = 0) {
    (void)cudaMemcpy(data() + at, src.data(), src.size(),
                     cudaMemcpyHostToDevice);
  }
  [[nodiscard]] std::vector<std::byte> download(std::size_t at,
                                                std::size_t n) const {
    std::vector<std::byte> v(n);
    (void)cudaMemcpy(v.data(), data() + at, n, cudaMemcpyDeviceToHost);
    return v;
  }
  void fill(int value) { (void)cudaMemset(p_, value, bytes_); }

private:
  void* p_ = nullptr;
  std::size_t bytes_;
};

} // namespace kvfleet::cuda::internal
