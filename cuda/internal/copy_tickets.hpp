#pragma once
// Which batch tickets exist: copy_engine and host_tier number their
// batches 1, 2, 3, ... and keep the next number. Pure bookkeeping, no
// CUDA, so device-free tests check it. Thread-safe (a pure function).

#include "engine/result.hpp"

#include <cstdint>
#include <string>
#include <string_view>

namespace kvfleet::cuda::internal {

/// errc::invalid_handle, naming `who` ("copy_engine::poll"), when ticket
/// `t` was never issued: 0 (no batch has it) or `next` (the number the
/// next batch gets) and above. A finished ticket stays valid.
[[nodiscard]] inline result<void>
check_issued(std::uint64_t t, std::uint64_t next, std::string_view who) {
  if (t != 0 && t < next)
    return {};
  return make_error(
      errc::invalid_handle,
      std::string(who) + ": ticket " + std::to_string(t) +
          " was never issued (" +
          (next <= 1 ? std::string("none issued yet")
                     : "tickets 1 to " + std::to_string(next - 1) + " were") +
          ")");
}

} // namespace kvfleet::cuda::internal
