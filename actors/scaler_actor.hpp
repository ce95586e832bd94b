#pragma once
/// The scaler actor: feeds request latencies into a scaler_policy
/// (scaler_policy.hpp) and carries out its decisions on the balancer:
/// spawn_replica -> (replica_atom), retire_replica -> (retire_atom),
/// grow/shrink_capacity -> (capacity_atom, tokens).
///
/// Messages:
///   (observe_atom, kv_request, kv_reply, int64 latency_ns)  a sample (the
///       balancer sends these to its listeners) of served traffic only:
///       a request below `sample_priority` (normal: the warmer's and the
///       prefetcher's, at low priority, and background work) or a
///       prefetch is ignored, since nobody waits for it and it must not
///       drive decisions meant for the requests that are waited for
///   (latency_atom, kv_request, int64 latency_ns)  a sample of a request
///       the balancer timed out (the time it waited, or 1 ns above the
///       target when it waited less: a request_timeout at or below the
///       target would otherwise make every timeout read as fast), so a
///       fleet whose requests time out does not look idle (the same
///       requests count)
///   (evaluate_atom)  decides (also runs every `interval`): first asks the
///       balancer for its balancer_stats and counts every engine it gave up
///       since the last time (`given_up`: failed after max_restarts) as a
///       lost replica (scaler_policy::replica_lost), then decides. Should
///       the balancer not answer in 10 s, it decides on the count it has
///       (one line on std::clog the first time in a row).
///   (stats_atom)     -> scaler_stats
/// Every decision that acts is passed to `on_decision` (default: one line
/// on std::clog; an exception it throws is logged with the decision, and
/// the scaler goes on) and counted. A replica change the balancer answers with
/// an error (the last live engine, no free slot, a replica that did not
/// start) is undone in the policy's count (scaler_policy::refused) and
/// logged on std::clog and counted (`scaler_stats::refused`), so the count
/// never drifts from the fleet (nor past max_replicas). One the balancer
/// does not answer in 10 s is no refusal (a slow balancer may still carry
/// it out): it is logged and counted (`scaler_stats::unanswered`), not
/// undone, and the count is then set from `balancer_stats::engines` of the
/// first stats asked for after the timeout (the balancer reads its mailbox
/// in order, so that answer includes the change if it was made at all).
/// The scaler still waits for the answer (its request has no CAF timeout;
/// its own timer counts it unanswered): the balancer answers a replica
/// once it is ready or its open failed, which for a large arena or
/// directory may be later than 10 s. A late answer is logged and counted
/// (`scaler_stats::answered_late`) and the count re-read again from the
/// next stats, so a replica that opened for longer than 10 s and then
/// failed is not counted (before, it stayed in the count for good). Until
/// the balancer answers a replica change, every evaluation holds (its
/// replica may still be opening), and the answer of a change made starts
/// the cooldown again and clears the latency window
/// (scaler_policy::change_done), so that the next decision sees only
/// latencies measured since it took effect (before, the cooldown ran from
/// the decision: a replica that took longer than the cooldown to open left
/// the next decisions reading latencies from before it served, and they
/// spawned more). A balancer that never answers therefore stops the
/// scaler's decisions (the line logged after the 10 s says so).
/// `initial_replicas` are
/// the engines the balancer started with: spawn the scaler with its
/// balancer, since every engine the balancer has given up since its start
/// counts as lost (`scaler_stats::lost`). While fewer than min_replicas
/// are counted, each evaluation outside the cooldown spawns one more,
/// whatever the latency (scale_decision::below_min, logged, counted in
/// `scaler_stats::replaced`), so lost engines never leave the fleet below
/// its floor for good; except after a refused spawn while p95 is above the
/// target and the capacity below its cap, when the capacity grows first
/// (scaler_policy.hpp).

#include "actors/scaler_policy.hpp"
#include "engine/eviction_policy.hpp"

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
  /// The lowest priority whose requests' latencies are samples: warming
  /// and prefetching run at low priority and may wait long without anyone
  /// waiting for them. A host app that serves its traffic at low priority
  /// lowers this to count it.
  engine::priority sample_priority = engine::priority::normal;
  std::function<void(const scale_decision&)> on_decision;
};

/// errc::invalid_argument naming the option when `config` breaks an
/// invariant: validate(config.policy)'s, an `interval` that is not
/// positive (the evaluation timer would spin) or is above 24 hours,
/// `initial_replicas` above
/// max_replicas (below min_replicas is allowed: the scaler spawns up to
/// it), a `sample_priority` that is none of the five, and an
/// `initial_capacity_tokens`
/// outside the policy's [min_capacity_tokens, max_capacity_tokens] (the
/// engines' budget, which the scaler counts from; rejected, not clamped, so
/// the two agree).
[[nodiscard]] result<void> validate(const scaler_actor_config& config);

/// Spawns the scaler and subscribes it to `balancer`'s request samples.
/// Errors: validate(config)'s; nothing is spawned then.
[[nodiscard]] result<caf::actor> spawn_scaler(caf::actor_system& sys,
                                              scaler_actor_config config,
                                              caf::actor balancer);

} // namespace kvfleet::actors
