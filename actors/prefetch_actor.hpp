#pragma once
/// The prefetch actor: learns query -> next-query transitions (a
/// transition_model, bounded) from the requests the balancer answers and,
/// after each one, prefetches the most likely next query at low priority
/// when the model's confidence reaches `threshold`.
///
/// A query is named by kv_request::query, or by its last block key when
/// that is empty; the prefetcher remembers the last request seen for each
/// query (at most `max_known` of them) so it can replay it.
/// Useful and wasted: a prefetch is useful when the balancer answered it
/// and its query is requested, in either order, before any of the
/// prefetched blocks was evicted (a query requested first counts at the
/// prefetch's reply), wasted when an engine
/// reports one of them evicted first (block events relayed by the
/// balancer, which also reports an engine that stops as evicting every
/// block its index gave it; a block several outstanding prefetches share wastes
/// each), and failed when the balancer answers it with an error (no engine, its
/// request timeout): nothing was prefetched, so it is no longer
/// outstanding and the next prediction may send it again (failed, not
/// useful, also when its query was requested before that error). At most
/// `max_outstanding` prefetches are tracked (prefetch_tracker.hpp): one more
/// forgets the oldest still outstanding, and a resolved prefetch leaves nothing
/// behind.
///
/// Nothing waits for a prefetch's reply (the blocks it stores are the
/// point; the reply only settles its count), so it carries no CAF timeout:
/// the balancer answers it anyway, at the latest with its own
/// request_timeout.
///
/// Messages: (observe_atom, kv_request, kv_reply, int64), block_events,
/// (latency_atom, kv_request, int64) (a timed-out request: ignored),
/// (stats_atom) -> prefetch_stats.

#include "actors/transition_model.hpp"
#include "engine/result.hpp"

#include <cstddef>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

namespace kvfleet::actors {

struct prefetch_config {
  transition_config model{};
  double threshold = 0.5;
  std::size_t max_known = 100'000;
  std::size_t max_outstanding = 10'000;
};

/// errc::invalid_argument naming the option when `config` makes no sense:
/// a threshold or model decay outside [0, 1], a negative or non-finite
/// model min_count, max_known or max_outstanding of 0.
[[nodiscard]] result<void> validate(const prefetch_config& config);

/// Spawns the prefetcher and subscribes it to `balancer`.
/// Errors: validate(config)'s; nothing is spawned then.
[[nodiscard]] result<caf::actor> spawn_prefetcher(caf::actor_system& sys,
                                                  prefetch_config config,
                                                  caf::actor balancer);

} // namespace kvfleet::actors
