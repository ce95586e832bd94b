#pragma once
/// The scaler actor: feeds request latencies into a scaler_policy
/// (scaler_policy.hpp) and carries out its decisions on the balancer:
/// spawn_replica -> (replica_atom), retire_replica -> (retire_atom),
/// grow/shrink_capacity -> (capacity_atom, tokens).
///
/// Messages:
///   (observe_atom, kv_request, kv_reply, int64 latency_ns)  a sample (the
///       balancer sends these to its listeners; prefetches are ignored)
///   (evaluate_atom)  decides now (also runs every `interval`)
///   (stats_atom)     -> scaler_stats
/// Every decision that acts is passed to `on_decision` (default: one line
/// on std::clog) and counted. A replica change the balancer answers with
/// an error (the last live engine, no free slot, no answer in 10 s) is
/// undone in the policy's count (scaler_policy::refused) and logged on
/// std::clog, so the count never drifts from the fleet (nor past
/// max_replicas).

#include "actors/scaler_policy.hpp"

#include <chrono>
#include <cstdint>
#include <functional>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

namespace kvfleet::actors {

struct scaler_actor_config {
  scaler_config policy{};
  std::chrono::milliseconds interval{1'000};
  std::uint32_t initial_replicas = 1;
  std::uint32_t initial_capacity_tokens = 8192;
  std::function<void(const scale_decision&)> on_decision;
};

/// Spawns the scaler and subscribes it to `balancer`'s request samples.
[[nodiscard]] caf::actor spawn_scaler(caf::actor_system& sys,
                                      scaler_actor_config config,
                                      caf::actor balancer);

} // namespace kvfleet::actors
