#pragma once
/// The prefetch actor: learns query -> next-query transitions (a
/// transition_model, bounded) from the requests the balancer answers and,
/// after each one, prefetches the most likely next query at low priority
/// when the model's confidence reaches `threshold`.
///
/// A query is named by kv_request::query, or by its last block key when
/// that is empty; the prefetcher remembers the last request seen for each
/// query (at most `max_known` of them and `max_known_keys` keys in all,
/// the least recently seen forgotten first) so it can replay it.
/// Useful and wasted (prefetch_tracker.hpp): a prefetch is useful when
/// its query's next request (before or after the prefetch's answer) found
/// what it prefetched: it was served by the engine that answered the
/// prefetch with every block it shares with the prefetch matched from
/// cache, or, with a query-result cache in front, it was answered from that
/// cache, which stored the prefetch's computed answer. It is wasted when
/// that request did not (another engine served it, a shared block was
/// computed again, or the cache answered a prefetch that only stored
/// blocks), or when the engine that answered it reports one of its blocks
/// evicted first (block events relayed by the balancer, which also reports
/// an engine that stops as evicting every block its index gave it; a block
/// several outstanding prefetches share wastes each). Evictions by other
/// engines do not count. Failed: the balancer answered it with an error (no
/// engine, its request timeout), so nothing was prefetched and the next
/// prediction may send it again (failed also when its query was requested
/// before that error). Cached: the query-result cache answered it from its
/// store, or with the reply of a request of its query already on its way
/// there (a user's, which the prefetch joined: kv_reply::joined), so the
/// result was there, or coming anyway, and nothing needed prefetching.
/// Redundant: the engine that answered it found every block cached already
/// and computed none (through the cache too), so it prefetched nothing, and
/// its query finding those blocks later is no use of it. At most
/// `max_outstanding` prefetches are tracked: one more forgets the oldest
/// still outstanding, and a resolved prefetch leaves nothing behind.
///
/// With a query-result cache (`front`, as kvfleet::node composes them),
/// prefetches go through it as (query_atom, kv_request) when their request
/// has a query key, and the prefetcher also learns from the requests the
/// cache answers without the balancer (its hits and the requests that
/// joined another's computation, which it reports to its listeners), so
/// transitions through cached queries are seen and a cached query is not
/// computed again.
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
#include "engine/block_key.hpp"
#include "engine/result.hpp"

#include <cstddef>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

namespace kvfleet::actors {

struct prefetch_config {
  transition_config model{};
  double threshold = 0.5;
  /// Queries whose last request is kept to replay it (the least recently
  /// seen go first), at most max_known of them, max_known_keys block
  /// keys (16 bytes each: 64 MiB by default) and max_known_query_bytes of
  /// query strings in all; a request of more keys or a longer query than
  /// that is not kept.
  std::size_t max_known = 100'000;
  std::size_t max_known_keys = 4'000'000;
  std::size_t max_known_query_bytes = 64u << 20;
  /// Prefetches tracked until their query's request settles them, at
  /// most max_outstanding of them holding max_tracked_keys block keys in
  /// all (prefetch_tracker).
  std::size_t max_outstanding = 10'000;
  std::size_t max_tracked_keys = 250'000; ///< ~256 bytes each: 64 MB
};

/// What the prefetcher's model and tracker know a query by: the query
/// itself up to 64 bytes; a longer one (a whole prompt used as its key) by a
/// 65-byte digest of it (XXH3-128), so that their memory is bounded by the
/// counts whatever the queries' length, and a query of 64 bytes or fewer is
/// never taken for a digest.
[[nodiscard]] std::string prefetch_query_id(const std::string& query);
inline constexpr std::size_t prefetch_query_id_max_bytes = 64;

/// What they know a request without a query by: its last block key's 32
/// hex digits between '@'s, padded with '@' to 65 bytes, so that it is
/// never a query's id (before, the bare hex digits were, for the query of
/// those 32 characters, and the two shared one history).
[[nodiscard]] std::string prefetch_key_query_id(const engine::block_key& last);

/// errc::invalid_argument naming the option when `config` makes no sense:
/// a threshold or model decay outside [0, 1], a negative or non-finite
/// model min_count, max_known, max_known_keys, max_known_query_bytes,
/// max_outstanding or max_tracked_keys of 0.
[[nodiscard]] result<void> validate(const prefetch_config& config);

/// Spawns the prefetcher and subscribes it to `balancer` and, when given,
/// to the query-result cache `front` (spawn_query_cache's, over the same
/// balancer), which its prefetches then go through.
/// Errors: validate(config)'s; nothing is spawned then.
[[nodiscard]] result<caf::actor> spawn_prefetcher(caf::actor_system& sys,
                                                  prefetch_config config,
                                                  caf::actor balancer,
                                                  caf::actor front = {});

} // namespace kvfleet::actors
