#include "engine/memory_backend.hpp"

#include "engine/checksum.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <system_error>

namespace kvfleet::engine {

result<std::unique_ptr<host_memory_backend>>
host_memory_backend::create(std::size_t bytes) {
  if (bytes == 0)
    return make_error(errc::zero_capacity, "host arena of zero bytes");
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    return make_error(
        errc::out_of_memory,
        "cannot map " + std::to_string(bytes) +
            " bytes of host memory: " + std::generic_category().message(errno));
  // Huge pages cut TLB misses (failure is harmless); then fault the whole
  // arena in up front so no put pays for a page fault.
  (void)::madvise(p, bytes, MADV_HUGEPAGE);
  auto* bytes_p = static_cast<volatile unsigned char*>(p);
  const long page = ::sysconf(_SC_PAGESIZE);
  const auto step = static_cast<std::size_t>(page > 0 ? page : 4096);
  for (std::size_t off = 0; off < bytes; off += step)
    bytes_p[off] = 0;
  return std::unique_ptr<host_memory_backend>(
      new host_memory_backend(static_cast<std::byte*>(p), bytes));
}

host_memory_backend::~host_memory_backend() {
  ::munmap(data_, size_);
}

result<void> host_memory_backend::write(std::size_t offset,
                                        std::span<const std::byte> src) {
  if (offset > size_ || src.size() > size_ - offset)
    return make_error(errc::invalid_argument, "host arena write out of bounds");
  std::memcpy(data_ + offset, src.data(), src.size());
  return {};
}

result<void> host_memory_backend::read(std::size_t offset,
                                       std::span<std::byte> dst) const {
  if (offset > size_ || dst.size() > size_ - offset)
    return make_error(errc::invalid_argument, "host arena read out of bounds");
  std::memcpy(dst.data(), data_ + offset, dst.size());
  return {};
}

result<std::uint64_t> host_memory_backend::checksum(std::size_t offset,
                                                    std::size_t len) const {
  if (offset > size_ || len > size_ - offset)
    return make_error(errc::invalid_argument,
                      "host arena checksum out of bounds");
  return block_checksum({data_ + offset, len});
}

} // namespace kvfleet::engine
