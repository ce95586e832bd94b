#pragma once
/// A host arena behind the memory_backend interface, for test backends
/// that change one behaviour of it (tests only: nothing in a library
/// includes it). name() is theirs; the rest forwards to a host arena.

#include "engine/memory_backend.hpp"

#include <memory>
#include <utility>

namespace kvfleet::engine::testing {

class host_wrapper : public memory_backend {
public:
  explicit host_wrapper(std::size_t bytes)
      : host_(std::move(*host_memory_backend::create(bytes))) {}
  [[nodiscard]] std::size_t size() const noexcept override {
    return host_->size();
  }
  [[nodiscard]] std::byte* host_data() noexcept override {
    return host_->host_data();
  }
  [[nodiscard]] result<void> write(std::size_t offset,
                                   std::span<const std::byte> src) override {
    return host_->write(offset, src);
  }
  [[nodiscard]] result<void> read(std::size_t offset,
                                  std::span<std::byte> dst) const override {
    return host_->read(offset, dst);
  }
  [[nodiscard]] result<std::uint64_t> checksum(std::size_t offset,
                                               std::size_t len) const override {
    return host_->checksum(offset, len);
  }

private:
  std::unique_ptr<host_memory_backend> host_;
};

} // namespace kvfleet::engine::testing
