#pragma once
/// The warmer: takes queries with expected frequencies, picks the top N
/// (default 100) by frequency (ties keep input order) and sends them to the
/// balancer at low priority, optionally pinning the blocks they store. At
/// most `parallelism` warm queries are in flight at once, all jobs
/// together: a job's queries wait behind those of the jobs before it (each
/// job used to send `parallelism` of its own, N jobs N times that).
///
///   (warm_atom, vector<warm_item>, uint32 top_n, bool pin, actor progress)
///       -> warm_report once every selected query was answered; `progress`
///       (may be null) gets (progress_atom, uint64 done, uint64 total) after
///       each one (total: the requests sent or to send so far, which grows
///       by one for each shorter query sent after a failed one). A caller
///       whose job the warmer holds when it stops gets
///       request_receiver_down (owed_reply.hpp), not silence. top_n 0 is
///       errc::invalid_argument (before, an empty report). An item whose
///       frequency is negative or infinite is refused as malformed
///       (before, warmed, and pinned, when it made the top N).
/// The warmer sets no CAF timeout of its own on its requests: the balancer
/// answers each one (balancer_actor.hpp), with request_timeout after its
/// `request_timeout`, and such a query counts as failed. A query that fails
/// counts in `failed`, and the report's `first_error` says why the first
/// one did (a bad request, no engine, the balancer's timeout). So does one
/// the engine computed but could not cache all of (kv_reply::
/// uncached_blocks: its pool full of pinned, leased or chained blocks, or
/// another put of one open; an out_of_memory error naming how many blocks,
/// the usual cause when warming): nothing warm to show for it. (Before, it
/// counted warmed.)

#include "engine/result.hpp"

#include <cstddef>
#include <vector>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

namespace kvfleet::actors {

struct warm_item;

struct warmer_config {
  /// Warm queries in flight at once, of all jobs together; at least 1.
  std::size_t parallelism = 8;
  /// The engines' tokens per block; when set (not 0), an item whose key
  /// count does not fit its input_tokens (engine::check_block_keys) is
  /// refused before the top N are picked (counted in `malformed`, its error
  /// the report's first_error if first), so it can neither take the place of
  /// a valid query with the same leading keys nor be the longer query of a
  /// chain and fail it. 0: key counts are not checked here (the engine
  /// refuses such a request when it comes, and a chain it led is not
  /// warmed). An item with a key no block can have (the all-zero key, a key
  /// repeating the one before it: engine::check_request_keys) is refused
  /// so whatever this is.
  std::uint32_t block_tokens = 0;
};

/// errc::invalid_argument naming the option when `config` makes no sense
/// (parallelism 0).
[[nodiscard]] result<void> validate(const warmer_config& config);

/// The top `n` queries by frequency, highest first, ties in input order, as
/// chains: an item whose frequency is NaN ranks below every other. Items
/// with the same keys (whatever their names and input_tokens: only full
/// blocks are cached, and the query's name changes nothing at the balancer)
/// are one query, counted once at its highest rank (a copy warmed at the
/// same time could go to another engine and pin its blocks there too). A
/// selected query whose keys lead another selected one's (a chat's earlier
/// turn) is in that one's chain, which is warmed by its longest query,
/// storing and pinning the others' blocks too, at the rank of the first
/// query of it selected. Each chain lists its queries longest first: the
/// warmer sends the first, and when a request fails with an error, the
/// next (a hot short query is still warmed when the longer, colder query
/// of its chain is refused, its pins past the pinned limit, or fails;
/// before, it went with it). Not after a reply with blocks the engine
/// could not cache (kv_reply::uncached_blocks): its leading blocks are
/// cached, and pinned when asked, and a shorter query would pin them
/// again. No chain's longest query leads another chain's, and there may
/// be fewer chains than the `n` queries they hold. Chains can share
/// leading blocks (a system prompt; or a selected query that leads two
/// chains' longest queries, kept in the one whose longest query sorts
/// first by keys): they are warmed in
/// parallel, so those blocks may be computed, and pinned, on more than one
/// engine.
[[nodiscard]] std::vector<std::vector<std::size_t>>
select_chains(const std::vector<warm_item>& items, std::size_t n);

/// The first (longest) query of each of select_chains(items, n).
[[nodiscard]] std::vector<std::size_t>
select_top(const std::vector<warm_item>& items, std::size_t n);

/// Errors: validate(config)'s; nothing is spawned then.
[[nodiscard]] result<caf::actor>
spawn_warmer(caf::actor_system& sys, warmer_config config, caf::actor balancer);

} // namespace kvfleet::actors
