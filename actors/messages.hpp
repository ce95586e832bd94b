#pragma once
/// Message types and atoms of the actor layer, and the project's one CAF
/// type-id block. Every file that sends or handles these messages includes
/// this header; CAF_ENABLE_TYPE_ID_CHECKS (set for the kvfleet_actors target
/// and its users) turns a message type without a type id into a compile
/// error. Register the block once per actor system with
/// `cfg.add_message_types<caf::id_block::kvfleet>()` (node does).
///
/// All messages are plain values (default- and copy-constructible, with an
/// `inspect` overload so CAF can print and serialize them).

#include "engine/block_key.hpp"
#include "engine/eviction_policy.hpp"

#include <cstdint>
#include <string>
#include <vector>

#include <caf/meta/type_name.hpp>
#include <caf/type_id.hpp>

namespace kvfleet::engine {

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, block_key& x) {
  return f(caf::meta::type_name("block_key"), x.hi, x.lo);
}

} // namespace kvfleet::engine

namespace kvfleet::actors {

/// One inference request: a prompt as chained block keys of the fleet's
/// namespace. `query` names the request for the query-result cache and the
/// prefetcher. Empty: the prefetcher takes the last block key for it, and
/// the request is not cached (node::process_request sends it straight to
/// the balancer; the query cache answers it errc::invalid_argument).
struct kv_request {
  std::uint64_t id = 0;
  std::uint64_t session = 0;
  std::string query;
  /// One key per full block of the prompt: input_tokens / block_tokens of
  /// them, no more and no fewer (errc::misaligned_tokens otherwise).
  std::vector<engine::block_key> keys;
  std::uint32_t input_tokens = 0; ///< prompt length, a partial block included
  engine::priority prio = engine::priority::normal;
  bool pin = false;      ///< pin the blocks it stores (warming)
  bool prefetch = false; ///< issued by the prefetcher
  /// When nobody waits for the reply any more, in nanoseconds of the actor
  /// system's clock (its time_since_epoch); 0: no deadline. The balancer
  /// sets it on the copy it sends an engine (its request_timeout, when it
  /// answers the caller errc::timeout; an earlier one the request carries,
  /// a pinning node call's, stays; the prefetcher clears it on the
  /// requests it replays); an engine that reaches the request
  /// at or after it answers errc::timeout without processing it, and one
  /// that finishes a pinning request at or after it takes back the pins
  /// the request added and answers errc::timeout too
  /// (engine_stats::expired). One process's clock: not for another.
  std::int64_t deadline_ns = 0;

  friend bool operator==(const kv_request&, const kv_request&) = default;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_request& x) {
  return f(caf::meta::type_name("kv_request"), x.id, x.session, x.query, x.keys,
           x.input_tokens, x.prio, x.pin, x.prefetch, x.deadline_ns);
}

/// What processing one request did.
struct kv_reply {
  std::uint64_t id = 0;
  std::uint32_t engine = 0; ///< slot of the engine that served it
  std::uint64_t matched_blocks = 0;
  std::uint64_t computed_blocks = 0;
  std::uint64_t matched_tokens = 0;  ///< prompt tokens served from cache
  std::uint64_t computed_tokens = 0; ///< prompt tokens the producer computed
  bool from_query_cache = false;
  /// Of computed_blocks, those the engine did not cache (no room: its pool
  /// full of pinned, leased or chained blocks; or another put of one still
  /// open: engine::process_result::uncached_blocks). Not kept by the
  /// query-result cache's store: 0 in a reply from it.
  std::uint64_t uncached_blocks = 0;
  /// The query-result cache answered it with the reply of another request
  /// of its query, whose computation it joined (without going to an engine
  /// itself, or before its own request was answered): that request did the
  /// work (query_cache_actor.hpp).
  bool joined = false;
  /// Of matched_blocks, those the engine brought back into memory for this
  /// request, from its memory tier or its disk (engine::process_result's
  /// tier_blocks + disk_blocks): work done, although none was computed.
  /// Not kept by the query-result cache's store: 0 in a reply from it.
  std::uint64_t promoted_blocks = 0;
  /// Of matched_blocks, the leading ones the engine found in memory, before
  /// any it brought back (engine::process_result::memory_blocks). Not kept
  /// by the query-result cache's store: 0 in a reply from it.
  std::uint64_t memory_blocks = 0;
  /// How many block_events its engine had published when it replied
  /// (block_events::seq of the last one): the balancer indexes the
  /// request's keys from the reply only when it has applied no later
  /// events of that engine, which say what became of them. Not kept by the
  /// query-result cache's store.
  std::uint64_t events_published = 0;
  /// Its engine's pinned bytes in memory when it replied (block_events::
  /// pinned_bytes): the balancer learns of a pinning request's pins with
  /// its reply, not only from the block_events its engine sends after the
  /// batch (a retire in between took that engine, pins and all). Not kept
  /// by the query-result cache's store.
  std::uint64_t pinned_bytes = 0;

  friend bool operator==(const kv_reply&, const kv_reply&) = default;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_reply& x) {
  return f(caf::meta::type_name("kv_reply"), x.id, x.engine, x.matched_blocks,
           x.computed_blocks, x.matched_tokens, x.computed_tokens,
           x.from_query_cache, x.uncached_blocks, x.joined, x.promoted_blocks,
           x.memory_blocks, x.events_published, x.pinned_bytes);
}

/// Blocks an engine stored and evicted since its last report.
struct block_events {
  std::uint32_t engine = 0;
  std::vector<engine::block_key> stored;
  std::vector<engine::block_key> evicted;
  /// The engine's count of the block_events it published after its
  /// requests and block calls, this one included
  /// (kv_reply::events_published); 0 in a disk snapshot's chunks and in
  /// what the balancer makes up for an engine that is gone. A message
  /// that only reports a change of pinned_bytes (no keys) keeps the seq of
  /// the one before it.
  std::uint64_t seq = 0;
  /// The engine's pinned bytes in memory (engine::block_store::
  /// pinned_bytes) when it sent this; 0 in what the balancer makes up. The
  /// engine also sends a message with no keys when only this changed (a
  /// pin or unpin of a cached block), and one first to a new listener
  /// while it holds pins or has a disk tier (then also with none), so the
  /// balancer knows which engines hold pins when it retires one.
  std::uint64_t pinned_bytes = 0;
  /// Blocks whose copy on the engine's disk tier holds pins (disk_tier::
  /// pinned_blocks: written through with their pins, or recovered with
  /// them at the engine's start, when its memory holds none); reported
  /// as pinned_bytes is. Copies of every namespace count: pinned copies a
  /// directory kept from a namespace the engine no longer serves (a node
  /// restarted with another model) count for good, and keep the engine
  /// from being retired first.
  std::uint64_t pinned_on_disk = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, block_events& x) {
  return f(caf::meta::type_name("block_events"), x.engine, x.stored, x.evicted,
           x.seq, x.pinned_bytes, x.pinned_on_disk);
}

/// Phase one of a put through an engine actor.
struct put_request {
  engine::block_key key;
  engine::block_key parent; ///< null for the first block of a chain
  engine::priority prio = engine::priority::normal;
  bool pin = false;
  std::uint32_t request_tokens = 0;
  /// When its caller stops waiting, as kv_request::deadline_ns (the actor
  /// clock's nanoseconds since its epoch); 0: none. The engine refuses a
  /// reserve, write or commit of the put that arrives at or after it
  /// (errc::timeout, also for a step after the put was aborted at it, until
  /// its put_timeout; a reserve that its parent's disk read took past it
  /// is undone), and aborts the put then if it is still open, rather than
  /// at its put_timeout: a caller
  /// that gave up on a reservation it never heard of does not leave the
  /// key busy, and one that gave up on a pinning commit is not left with a
  /// pin it does not know of.
  std::int64_t deadline_ns = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, put_request& x) {
  return f(caf::meta::type_name("put_request"), x.key, x.parent, x.prio, x.pin,
           x.request_tokens, x.deadline_ns);
}

/// An engine actor's live state.
struct engine_stats {
  std::uint32_t engine = 0;
  std::uint64_t in_flight = 0; ///< requests received and not yet answered
  std::uint64_t requests = 0;  ///< requests processed without an error
  /// Requests answered errc::timeout unprocessed: their turn came at or
  /// after their deadline (kv_request::deadline_ns), when the balancer had
  /// answered their caller with a timeout already; and pinning requests
  /// that finished at or after it (processed, counted in `requests` too,
  /// their new pins taken back).
  std::uint64_t expired = 0;
  /// Puts aborted unfinished by the engine: open at their put_timeout, or
  /// at their put_request::deadline_ns, or refused at or after it.
  std::uint64_t puts_expired = 0;
  /// Times a low or background request waited off its batch for disk
  /// reads of its prefix (one that waits again, for reads further on,
  /// counts again; engine_actor.hpp, "Disk tier").
  std::uint64_t disk_deferred = 0;
  /// Blocks brought back for deferred requests that are held in memory
  /// until those requests are served (block_store::held_blocks).
  std::uint64_t held_blocks = 0;
  std::uint64_t batches = 0;
  /// The producer's batch calls (kv_producer::produce_batch, one per batch
  /// whose requests miss blocks, a pass serving deferred requests whose
  /// disk reads landed included), the blocks they computed, those of them
  /// no request took (its prefix found cached after all, a request that
  /// failed), and the blocks computed alone, each in a produce() call of
  /// its own (past engine_actor_config::prefill_bytes, or missed by the
  /// estimate).
  /// prefill_failures: batch calls that failed (those blocks were then
  /// computed alone).
  std::uint64_t prefill_calls = 0;
  std::uint64_t prefilled_blocks = 0;
  std::uint64_t prefill_unused = 0;
  std::uint64_t prefill_failures = 0;
  std::uint64_t produced_alone = 0;
  std::uint64_t blocks = 0;
  std::uint64_t used_bytes = 0;
  std::uint64_t capacity_bytes = 0;
  /// Bytes of pinned blocks; bytes pins hold (those and the blocks they
  /// chain from, block_store::pin_held_bytes()), and the most they may
  /// hold (store_config::max_pinned_fraction of capacity_bytes): a pin is
  /// refused when pin_held_bytes would pass it.
  std::uint64_t pinned_bytes = 0;
  std::uint64_t pin_held_bytes = 0;
  std::uint64_t pinned_bytes_limit = 0;
  std::uint64_t token_hits = 0;
  std::uint64_t token_misses = 0;
  std::uint64_t evictions = 0;
  std::uint64_t pressure_evictions = 0; ///< memory-manager runs that evicted
  std::uint32_t capacity_tokens = 0;
  std::string memory; ///< the block pool's backend: "host", "cuda:0", ...
  std::string tier;   ///< the memory tier under it ("pinned host"), or ""
  std::uint64_t tier_blocks = 0;    ///< blocks in the memory tier now
  std::uint64_t tier_demotions = 0; ///< blocks moved there so far
  std::uint64_t tier_hits = 0;      ///< blocks promoted back on a hit
  /// Device bytes whose copy to the tier has not been seen finished yet
  /// (they stay taken until then).
  std::uint64_t tier_in_flight_bytes = 0;
  bool disk = false;             ///< the engine has a disk tier
  std::uint64_t disk_blocks = 0; ///< blocks stored on disk now
  std::uint64_t disk_hits = 0;   ///< blocks promoted from disk on a hit
  std::uint64_t disk_spills = 0; ///< blocks written to disk, or in flight
  std::uint64_t disk_spill_failures = 0; ///< spills refused or failed
  /// Blocks found and not found by lookups and requests (the store's
  /// block_hits and block_misses: engine/README.md "Stats").
  std::uint64_t block_hits = 0;
  std::uint64_t block_misses = 0;
  std::uint32_t listeners = 0; ///< actors told its block events now
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, engine_stats& x) {
  return f(caf::meta::type_name("engine_stats"), x.engine, x.in_flight,
           x.requests, x.expired, x.puts_expired, x.disk_deferred,
           x.held_blocks, x.batches, x.prefill_calls, x.prefilled_blocks,
           x.prefill_unused, x.prefill_failures, x.produced_alone, x.blocks,
           x.used_bytes, x.capacity_bytes, x.pinned_bytes, x.pin_held_bytes,
           x.pinned_bytes_limit, x.token_hits, x.token_misses, x.evictions,
           x.pressure_evictions, x.capacity_tokens, x.memory, x.tier,
           x.tier_blocks, x.tier_demotions, x.tier_hits, x.tier_in_flight_bytes,
           x.disk, x.disk_blocks, x.disk_hits, x.disk_spills,
           x.disk_spill_failures, x.block_hits, x.block_misses, x.listeners);
}

/// The balancer's counters.
///
/// The per-slot vectors have one entry per slot ever used (the router's
/// slot_count: they never shrink). A free slot, whose engine retired or was
/// given up after max_restarts, reads up 0 and in_flight 0 and keeps its
/// last routed count until a replica takes the slot and its counts start
/// over. `live` counts the engines that take requests now (what
/// replica_atom and retire_atom answer); a slot whose engine is down and
/// waiting for its restart, or still opening its disk tier
/// (started_engine::opening), reads up 0 and counts in neither `live` nor
/// the free slots.
struct balancer_stats {
  /// Per slot, since an engine was added to it (the initial engine or a
  /// replica); its restarts keep counting.
  std::vector<std::uint64_t> routed;
  /// Per slot: requests sent to its engine that it has not answered yet,
  /// those whose caller already got a timeout included (the engine still
  /// works on them; routing weighs an engine by this count).
  std::vector<std::uint64_t> in_flight;
  std::vector<std::uint8_t> up; ///< 1 when live (up and not draining)
  /// Per slot: the capacity weight its engine's start gave it
  /// (started_engine::weight; a free slot keeps its last).
  std::vector<double> weight;
  /// Per slot: the pinned bytes its engine last reported (block_events::
  /// pinned_bytes, or a pinning request's reply; 0 for a free slot), and
  /// its blocks whose disk copy holds pins (block_events::pinned_on_disk).
  /// retire_atom prefers an engine with neither.
  std::vector<std::uint64_t> pinned_bytes;
  std::vector<std::uint64_t> pinned_on_disk;
  /// Requests answered with request_timeout: process calls and lookups.
  std::uint64_t timeouts = 0;
  /// Process requests and lookups retried after their engine went down.
  std::uint64_t rerouted = 0;
  /// Restarts scheduled (after an engine stopped or a start failed), all
  /// slots together.
  std::uint64_t restarts = 0;
  std::uint64_t rejected = 0; ///< no engine live: process calls and lookups
  std::uint64_t index_keys = 0;
  std::uint32_t live = 0; ///< engines taking requests
  /// Engines given up after max_restarts (their slots freed), ever.
  std::uint64_t given_up = 0;
  /// Engines the balancer keeps: the live ones, those down waiting for a
  /// restart and those opening their disk tier; not draining ones, nor
  /// free slots. What the scaler counts as its replicas.
  std::uint32_t engines = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, balancer_stats& x) {
  return f(caf::meta::type_name("balancer_stats"), x.routed, x.in_flight, x.up,
           x.weight, x.pinned_bytes, x.pinned_on_disk, x.timeouts, x.rerouted,
           x.restarts, x.rejected, x.index_keys, x.live, x.given_up, x.engines);
}

/// A query to warm with its expected frequency.
struct warm_item {
  kv_request request;
  double frequency = 0.0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, warm_item& x) {
  return f(caf::meta::type_name("warm_item"), x.request, x.frequency);
}

/// What a warm-up did.
struct warm_report {
  /// Requests sent for the top N queries: one per chain of them
  /// (select_chains), and one more for each in `shortened`.
  std::uint64_t requested = 0;
  std::uint64_t warmed = 0;
  std::uint64_t failed = 0;
  std::uint64_t computed_tokens = 0;
  /// Items refused before the selection: keys no block can have, a key
  /// count not fitting their tokens (warmer_config::block_tokens), a
  /// frequency negative or infinite; not in requested, so warmed + failed
  /// = requested.
  std::uint64_t malformed = 0;
  /// Requests that failed and were followed by a shorter selected query of
  /// their chain (counted failed; the shorter one is in requested too).
  std::uint64_t shortened = 0;
  /// Why the first query that failed did ("code: message", e.g.
  /// "timeout: request timed out"), or the first malformed item ("warm item
  /// <i>: ..."); empty when none failed and none was malformed.
  std::string first_error;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, warm_report& x) {
  return f(caf::meta::type_name("warm_report"), x.requested, x.warmed, x.failed,
           x.computed_tokens, x.malformed, x.shortened, x.first_error);
}

/// The prefetcher's counters.
struct prefetch_stats {
  std::uint64_t observed = 0;
  std::uint64_t issued = 0;
  /// Its query's request found what it prefetched: the blocks, on the
  /// engine that answered it, or its result, in the query-result cache.
  std::uint64_t useful = 0;
  /// Its blocks were evicted first, or its query's request did not find
  /// them (served elsewhere, computed again, or from the result cache).
  std::uint64_t wasted = 0;
  /// The balancer answered the prefetch with an error (no engine, its
  /// request timeout): nothing was prefetched, neither useful nor wasted,
  /// also when its query was requested before that answer.
  std::uint64_t failed = 0;
  /// The query-result cache answered it from its store, or with the reply
  /// of a request of its query already on its way there (it joined that
  /// computation): the query's result was there, or coming, anyway, nothing
  /// to prefetch (neither useful nor wasted).
  std::uint64_t cached = 0;
  /// The engine that answered it found every block in memory already
  /// (computed none, brought none back from its memory tier or disk), and
  /// it went straight to the balancer: it prefetched nothing (neither
  /// useful nor wasted, also when its query later finds those blocks).
  /// Through the result cache such a prefetch stored the query's answer
  /// there, and is judged as any other.
  std::uint64_t redundant = 0;
  /// Pushed out of the `max_outstanding` it tracks by newer prefetches
  /// before it was settled: never known useful or wasted. So issued =
  /// useful + wasted + failed + cached + redundant + forgotten +
  /// outstanding.
  std::uint64_t forgotten = 0;
  /// Issued and not settled yet (tracked now).
  std::uint64_t outstanding = 0;
  std::uint64_t tracked_queries = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, prefetch_stats& x) {
  return f(caf::meta::type_name("prefetch_stats"), x.observed, x.issued,
           x.useful, x.wasted, x.failed, x.cached, x.redundant, x.forgotten,
           x.outstanding, x.tracked_queries);
}

/// The scaler's counters (per scale_action) and current targets.
struct scaler_stats {
  /// Decisions, indexed by scale_action: every evaluation counts one, a
  /// hold too.
  std::vector<std::uint64_t> actions;
  std::uint32_t replicas = 0;
  std::uint32_t capacity_tokens = 0;
  std::int64_t last_p95_ns = 0;
  /// Replica changes the balancer refused (undone in `replicas`).
  std::uint64_t refused = 0;
  /// Replicas lost: engines the balancer gave up after max_restarts.
  std::uint64_t lost = 0;
  /// Replica changes the balancer did not answer in time: not undone (it
  /// may still carry them out); `replicas` is re-read from its stats.
  std::uint64_t unanswered = 0;
  /// Of those, the ones the balancer answered later (a replica that took
  /// long to open its store, say): `replicas` is re-read again then, so it
  /// follows what the change came to.
  std::uint64_t answered_late = 0;
  /// Replicas spawned to restore min_replicas (lost ones replaced), also
  /// in actions[spawn_replica].
  std::uint64_t replaced = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, scaler_stats& x) {
  return f(caf::meta::type_name("scaler_stats"), x.actions, x.replicas,
           x.capacity_tokens, x.last_p95_ns, x.refused, x.lost, x.unanswered,
           x.answered_late, x.replaced);
}

/// The query-result cache's counters.
struct query_cache_stats {
  std::uint64_t hits = 0;
  std::uint64_t misses = 0;
  std::uint64_t coalesced = 0; ///< misses that waited on a computation
  std::uint64_t store_errors = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, query_cache_stats& x) {
  return f(caf::meta::type_name("query_cache_stats"), x.hits, x.misses,
           x.coalesced, x.store_errors);
}

} // namespace kvfleet::actors

CAF_BEGIN_TYPE_ID_BLOCK(kvfleet, caf::first_custom_type_id)

CAF_ADD_TYPE_ID(kvfleet, (kvfleet::engine::block_key))
CAF_ADD_TYPE_ID(kvfleet, (std::vector<kvfleet::engine::block_key>))
CAF_ADD_TYPE_ID(kvfleet, (kvfleet::engine::priority))
CAF_ADD_TYPE_ID(kvfleet, (std::vector<std::uint8_t>))
CAF_ADD_TYPE_ID(kvfleet, (kvfleet::actors::kv_request))
CAF_ADD_TYPE_ID(kvfleet, (std::vector<kvfleet::actors::kv_request>))
CAF_ADD_TYPE_ID(kvfleet, (kvfleet::actors::kv_reply))
CAF_ADD_TYPE_ID(kvfleet, (std::vector<kvfleet::actors::kv_reply>))
CAF_ADD_TYPE_ID(kvfleet, (kvfleet::actors::block_events))
CAF_ADD_TYPE_ID(kvfleet, (kvfleet::actors::put_request))
CAF_ADD_TYPE_ID(kvfleet, (kvfleet::actors::engine_stats))
CAF_ADD_TYPE_ID(kvfleet, (kvfleet::actors::balancer_stats))
CAF_ADD_TYPE_ID(kvfleet, (kvfleet::actors::warm_item))
CAF_ADD_TYPE_ID(kvfleet, (std::vector<kvfleet::actors::warm_item>))
CAF_ADD_TYPE_ID(kvfleet, (kvfleet::actors::warm_report))
CAF_ADD_TYPE_ID(kvfleet, (kvfleet::actors::prefetch_stats))
CAF_ADD_TYPE_ID(kvfleet, (kvfleet::actors::scaler_stats))
CAF_ADD_TYPE_ID(kvfleet, (kvfleet::actors::query_cache_stats))

// Atoms: at most 10 characters, none equal to one of CAF's.
CAF_ADD_ATOM(kvfleet, kvfleet::actors, lookup_atom, "kv_lookup")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, process_atom, "kv_process")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, batch_atom, "kv_batch")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, reserve_atom, "kv_reserve")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, write_atom, "kv_write")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, commit_atom, "kv_commit")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, abort_atom, "kv_abort")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, read_atom, "kv_read")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, evict_atom, "kv_evict")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, pin_atom, "kv_pin")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, unpin_atom, "kv_unpin")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, stats_atom, "kv_stats")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, capacity_atom, "kv_cap")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, listen_atom, "kv_listen")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, close_batch_atom, "kv_close")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, restart_atom, "kv_restart")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, replica_atom, "kv_replica")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, retire_atom, "kv_retire")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, latency_atom, "kv_latency")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, evaluate_atom, "kv_eval")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, observe_atom, "kv_observe")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, warm_atom, "kv_warm")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, progress_atom, "kv_progres")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, query_atom, "kv_query")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, engine_atom, "kv_engine")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, sweep_atom, "kv_sweep")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, poll_tier_atom, "kv_poll")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, persist_atom, "kv_persist")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, ready_atom, "kv_ready")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, timeout_atom, "kv_timeout")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, expire_puts_atom, "kv_putexp")
CAF_ADD_ATOM(kvfleet, kvfleet::actors, poll_disk_atom, "kv_pdisk")

CAF_END_TYPE_ID_BLOCK(kvfleet)
