#pragma once
/// Converts between kvfleet's error values and caf::error, once, at the
/// actor boundary.
///
/// A kvfleet::error travels as caf::error(packed code, category "kvfleet",
/// message{text}); CAF 0.17 error codes are 8 bits, so errc (1xx..5xx) is
/// packed as (code / 100) * 32 + code % 100. From CAF's own errors:
/// request_timeout becomes errc::timeout and request_receiver_down
/// errc::unavailable (the request may be retried), unexpected_message
/// errc::invalid_argument, anything else errc::backend_error; the message says
/// which.

#include "engine/result.hpp"

#include <caf/error.hpp>
#include <caf/fwd.hpp>

namespace kvfleet::actors {

[[nodiscard]] caf::error to_caf_error(const kvfleet::error& e);
[[nodiscard]] kvfleet::error from_caf_error(const caf::error& e);
/// Whether `e` is CAF's request timeout.
[[nodiscard]] bool is_timeout(const caf::error& e) noexcept;
/// Whether `e` carries a kvfleet::error (made by to_caf_error), not one of
/// CAF's own (an exit reason such as kill, a system error).
[[nodiscard]] bool is_kvfleet_error(const caf::error& e) noexcept;

/// errc::invalid_argument naming `spawn_fn` when `balancer` is null: an
/// actor spawned over no balancer would fail every request it sends, one
/// by one, instead of at its spawn.
[[nodiscard]] result<void> check_balancer(const caf::actor& balancer,
                                          const char* spawn_fn);

} // namespace kvfleet::actors
