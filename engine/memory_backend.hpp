#pragma once
/// Memory backends: where a block pool's bytes live.
///
/// A backend owns one contiguous arena. The pool hands out offsets into it;
/// the store moves bytes in and out through the backend, so the same engine
/// runs on host memory or (cuda/) on a GPU. Not thread-safe: one owner.

#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string_view>

namespace kvfleet::engine {

class memory_backend {
public:
  virtual ~memory_backend() = default;
  memory_backend() = default;
  memory_backend(const memory_backend&) = delete;
  memory_backend& operator=(const memory_backend&) = delete;

  /// "host", "cuda:0", ...
  [[nodiscard]] virtual std::string_view name() const noexcept = 0;
  /// Arena size in bytes.
  [[nodiscard]] virtual std::size_t size() const noexcept = 0;
  /// The arena's host address, or nullptr when the host cannot address it.
  [[nodiscard]] virtual std::byte* host_data() noexcept = 0;
  /// Copies `src` into the arena at `offset`. REQUIRES: in bounds.
  [[nodiscard]] virtual result<void> write(std::size_t offset,
                                           std::span<const std::byte> src) = 0;
  /// Copies arena bytes at `offset` into `dst`. REQUIRES: in bounds.
  [[nodiscard]] virtual result<void> read(std::size_t offset,
                                          std::span<std::byte> dst) const = 0;
  /// Checksum (engine/checksum.hpp) of `len` arena bytes at `offset`.
  [[nodiscard]] virtual result<std::uint64_t>
  checksum(std::size_t offset, std::size_t len) const = 0;
  /// Whether copy_within() works. The store moves blocks inside the arena
  /// (slab compaction, engine/README.md "Space management") only then.
  [[nodiscard]] virtual bool can_copy_within() const noexcept { return false; }
  /// Copies `len` arena bytes at `src` to `dst` (the ranges do not overlap),
  /// without leaving the arena. REQUIRES: in bounds. The default, for a
  /// backend that cannot, is errc::unavailable.
  [[nodiscard]] virtual result<void>
  copy_within(std::size_t dst, std::size_t src, std::size_t len);
};

/// Bytes of host memory this process can still populate before the kernel
/// would have to kill something: the smaller of /proc/meminfo's
/// MemAvailable and the room left under the memory limits of the process's
/// cgroup and its ancestors (v2 memory.max, v1 memory.limit_in_bytes).
/// nullopt when none can be read.
[[nodiscard]] std::optional<std::size_t> host_memory_available();

/// Host-memory arena: page-aligned, populated at creation (so puts never
/// page-fault), transparent huge pages advised.
class host_memory_backend final : public memory_backend {
public:
  /// Allocates `bytes` of host memory. Zero bytes is errc::zero_capacity;
  /// a failed allocation is errc::out_of_memory, and so is an arena larger
  /// than host_memory_available(): populating it would wake the kernel's
  /// OOM killer (Linux maps more than it has, then kills a process when the
  /// pages are touched), so it is refused before anything is mapped.
  [[nodiscard]] static result<std::unique_ptr<host_memory_backend>>
  create(std::size_t bytes);
  ~host_memory_backend() override;

  [[nodiscard]] std::string_view name() const noexcept override {
    return "host";
  }
  [[nodiscard]] std::size_t size() const noexcept override { return size_; }
  [[nodiscard]] std::byte* host_data() noexcept override { return data_; }
  [[nodiscard]] result<void> write(std::size_t offset,
                                   std::span<const std::byte> src) override;
  [[nodiscard]] result<void> read(std::size_t offset,
                                  std::span<std::byte> dst) const override;
  [[nodiscard]] result<std::uint64_t> checksum(std::size_t offset,
                                               std::size_t len) const override;
  [[nodiscard]] bool can_copy_within() const noexcept override { return true; }
  [[nodiscard]] result<void> copy_within(std::size_t dst, std::size_t src,
                                         std::size_t len) override;

private:
  host_memory_backend(std::byte* data, std::size_t size)
      : data_(data), size_(size) {}
  std::byte* data_;
  std::size_t size_;
};

} // namespace kvfleet::engine
