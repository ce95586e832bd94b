#pragma once
/// Requests that carry a kvfleet priority into CAF's mailboxes.
///
/// A CAF mailbox has two categories: urgent messages are taken before
/// normal ones. Requests of priority high and critical travel as urgent,
/// the rest as normal, so a critical request does not wait behind a full
/// mailbox of normal ones at the balancer, the query cache or an engine.
/// (Inside an engine the batcher's five lanes order all five priorities.)

#include "engine/eviction_policy.hpp"

#include <utility>

#include <caf/duration.hpp>
#include <caf/message_priority.hpp>

namespace kvfleet::actors {

/// The mailbox category for requests of priority `p`.
[[nodiscard]] constexpr caf::message_priority
mailbox_priority(engine::priority p) noexcept {
  // A value above critical (a cast from a number) is refused where it
  // arrives; until then it jumps no queue.
  return p >= engine::priority::high && p <= engine::priority::critical
             ? caf::message_priority::high
             : caf::message_priority::normal;
}

/// self->request(dest, timeout, xs...) in the mailbox category of `p`.
/// `timeout` is a std::chrono duration, caf::duration or caf::infinite.
/// It is made a caf::duration here: CAF 0.17's request overload for
/// std::chrono durations forwards without its priority argument, so every
/// such request went out normal.
template <class Self, class Handle, class Timeout, class... Ts>
auto request_at(Self* self, engine::priority p, const Handle& dest,
                const Timeout& timeout, Ts&&... xs) {
  const caf::duration t{timeout};
  if (mailbox_priority(p) == caf::message_priority::high)
    return self->template request<caf::message_priority::high>(
        dest, t, std::forward<Ts>(xs)...);
  return self->template request<caf::message_priority::normal>(
      dest, t, std::forward<Ts>(xs)...);
}

} // namespace kvfleet::actors
