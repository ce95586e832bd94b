#pragma once
/// The engine actor: one per GPU, or per CPU shard when there is no GPU; it
/// is the single owner of one engine::block_store (the store is not
/// thread-safe; nothing else touches it).
///
/// Messages (every handler answers; an unknown message gets
/// sec::unexpected_message back):
///   (process_atom, kv_request)        -> kv_reply   through the batcher
///   (batch_atom, vector<kv_request>)  -> vector<kv_reply>  one engine call,
///       highest priority first; the first request that fails answers the
///       batch with its error ("request <id> of the batch: ..."), and the
///       requests run before it keep their effects but the pins they added
///       (their caller, told only of the error, holds none to unpin)
///   (lookup_atom, vector<block_key>)  -> uint64 matched leading blocks
///       (in memory, in the memory tier and, with a disk tier, on disk:
///       what a request would match)
///   (reserve_atom, put_request)       -> uint64 put ticket (phase one)
///   (write_atom, ticket, vector<uint8_t> value) -> true
///   (commit_atom, ticket)             -> true (phase two)
///   (abort_atom, ticket)              -> true
///   (read_atom, block_key)            -> vector<uint8_t> decoded value
///   (evict_atom, uint64 bytes)        -> uint64 bytes freed
///   (pin_atom | unpin_atom, block_key) -> true
///   (stats_atom)                      -> engine_stats (collects the disk
///       tier's answers first, so a spill that failed while the engine was
///       idle counts in disk_spill_failures, not disk_spills)
///   (persist_atom, uint64 timeout_ms) -> uint64 cached blocks on disk
///       (block_store::persist: a clean shutdown; needs a disk tier)
///   (persist_atom, uint64 timeout_ms, bool retiring) -> the same; with
///       `retiring` (its balancer retires it and exits it next) the engine
///       then refuses reserve_atom, commit_atom (the put is aborted),
///       pin_atom and a process or batch request that pins (before, such a
///       request was processed and pinned) with errc::unavailable, since
///       what it took now would be lost with it; reads, unpins and
///       everything else are served.
///       `retiring` from an actor that is not one of its listeners (the
///       balancer is) is errc::invalid_argument, and nothing is written
///   (capacity_atom, uint32 tokens)    prompt-token budget per batch (no
///       reply); one below what is queued closes the batch at once
///   (listen_atom, actor)              subscribe to block_events (no reply;
///       first one with no keys telling its pins, when it holds some or has
///       a disk tier; with a disk tier the next ones store the keys on disk:
///       at most `snapshot_keys`, 4096 per message, see "Events")
///   (ready_atom)                      -> true, once the engine reads its
///       mailbox: for one spawned with store_open::on_engine, once its
///       store (memory, tiers, disk) is made
/// Engine errors come back as caf::error (caf_error.hpp), converted once.
/// A request (process, batch) or put (reserve) whose priority is not one of
/// engine::priority's five is errc::invalid_argument: it would outrank
/// critical in every queue and in eviction.
///
/// Batching: process requests accumulate until `batch.max_size` requests
/// (default 20) or `capacity_tokens` prompt tokens are pending, or
/// `batch.timeout` (default 100 ms) after the first, whichever comes first;
/// the batch then runs in one turn of the actor, highest priority first:
/// first one kv_producer::produce_batch() call computes the blocks its
/// requests miss (past what memory, the memory tier and the disk hold, at
/// most `prefill_bytes` of values; not those of a request past its
/// deadline, of one with keys process() refuses, nor of a low one whose
/// prefix goes on to disk, which may wait off the batch for its reads),
/// then each request is one engine::block_store::process call, whose
/// produce() calls that prefill answers (engine::prefilled_producer; a
/// block it does not hold is computed alone). The time of that call does
/// not count toward a request's turn against its deadline. (Before, each
/// missing block was a produce() call of its own.) A request still queued
/// at a batch's close, past its deadline (kv_request::deadline_ns) and at
/// the front of its lane, whatever the lane, is answered errc::timeout
/// then, unprocessed (counted in engine_stats::expired; before, below a
/// stream of full batches of higher priorities it stayed queued, and
/// counted as load, until they stopped); one behind a request of a later
/// deadline, or of none, waits for that one to leave its lane. Requests a batch
/// leaves over (past the token budget) open the next one, which runs at once
/// when they fill it already. With `batch.close_when_idle` (on by default) a
/// batch also closes once the actor has read every message that was in its
/// mailbox when the batch opened: an idle engine answers a lone request at
/// once, a busy one still batches what is queued. max_size 1 runs each request
/// alone, always at that point (close_when_idle or not): the highest priority
/// queued by then first, so the five lanes order its requests too (before, it
/// ran each as it read it, and normal, low and background requests, which share
/// CAF's normal mailbox category, in the order they came).
///
/// Events: after each batch, put, read, pin, unpin, eviction, stats or
/// persist call, and every `expire_interval` while it has a listener, the
/// actor sends its listeners one block_events with the keys the store
/// reported stored and removed since the last one
/// (engine::store_config::on_block_event: computed, put or promoted from disk;
/// evicted, expired or dropped as corrupt; a block in the memory tier is still
/// the engine's), each key once as its last event left it. The cost is per
/// event, not per block held, and only while someone listens: the events
/// (and the disk tier's removals, disk_tier::record_removals) are recorded
/// from the first listener on, and no longer once the last one has gone
/// (what was recorded then is dropped); the next listener hears of what
/// changes after it came. With a disk tier a block on disk is the engine's
/// too: one evicted from memory that is on disk (or on its way there) is
/// reported stored, one the disk tier drops (its capacity eviction, expiry, a
/// corrupt block, a failed spill) or that expired there is reported evicted
/// unless memory or the memory tier has it, and a new listener first gets
/// one block_events with no keys telling its pins (block_events::
/// pinned_bytes, pinned_on_disk), then block_events storing the keys on
/// disk that have not expired (what the engine
/// recovered at its start), at most `snapshot_keys` of them, 4096 per message:
/// the engine sends the next chunk in a message to itself, so it serves the
/// requests queued in between, and one engine's large directory neither floods
/// its listeners nor takes more than its share of the balancer's index.
/// actors/README.md, "Block events".
///
/// Memory manager: after each batch, committed put, read, pin and unpin
/// (a read or pin of a block only on disk brings it back), usage above
/// `pressure.threshold` (0.9) of the pool evicts down to `pressure.target`,
/// lowest priority first (memory_manager.hpp); `relieve`, when set, decides
/// instead (a GPU engine's reads device memory as a whole). The store's own
/// room-making on a put (its high watermark) goes lowest priority first
/// too: the engine sets engine::store_config::lowest_priority_first, since
/// that path keeps the pool from passing 0.9 and would otherwise take a
/// critical request's blocks before a background one's. Copies to a memory
/// tier that relief started are checked every `tier_poll_interval` until they
/// finish, whether requests come or not.
///
/// Disk tier (`make_disk`): blocks evicted for space spill to the engine's
/// own directory, and a request whose prefix goes on past memory (and the
/// memory tier) continues from disk: for a request of normal priority and
/// above, the engine waits for those reads inside the batch (demand reads,
/// ahead of the tier's background work), so an engine with a disk tier runs
/// on a thread of its own by default (`own_thread`). A low or background
/// request (a prefetch, a warm query) whose prefix goes on past memory
/// (and the memory tier's run after it) to disk waits off its batch
/// instead: the engine starts its reads (engine::block_store::promote,
/// background reads at the disk tier, which a request of the same keys
/// that waits for them makes demand reads: disk_tier::expedite), serves
/// the requests after it, and collects the tier's answers after each batch
/// and every `disk_poll_interval` (serving at most a batch's max_size of
/// those ready per pass, the rest behind the mailbox, low before
/// background, and none while the batcher holds a request above low
/// priority: that batch's close serves them);
/// once its reads have landed (or failed: those blocks are computed) it is
/// processed, its reply counting the blocks its reads brought back in
/// `promoted_blocks` as process() would have (engine_stats::disk_deferred
/// counts each such wait). Before, a critical request that came during a
/// prefetch's reads waited for all of them. One whose next block is on
/// its way already, read for another deferred request (two prefetches of
/// one prefix), waits off its batch for that chain too, and finds those
/// blocks in memory (not promoted for it); one whose reads could not be
/// started otherwise (no room) is processed in its batch as before. Once
/// what a request waits for has landed, the reads of its prefix further on
/// disk (a later run, or past another request's chain) start and it waits
/// off the batch again, rather than in process(), as long as its prefix in
/// memory grew (a read that failed does not defer it again). The blocks that
/// landed are held (block_store::promote's hold) until it is served, so a
/// request served before it cannot evict them; while held they take memory
/// (engine_stats::held_blocks), for as long as higher priorities keep it
/// waiting, at most until its deadline. Left: process()
/// counts one more access of the blocks read for it than it would have inline
/// (LFU, compression coldness). The block calls reach it too: `read_atom` and
/// `pin_atom` of a block only on disk, and `reserve_atom` of a block whose
/// parent is only there (lookup_atom counted it), bring that block back and
/// wait for its read (engine::block_store::acquire, pin, reserve); `unpin_atom`
/// of a block pinned only on disk unpins it there. A block damaged on disk is
/// never returned by `read_atom`: it answers errc::checksum_mismatch and the
/// block is dropped. `persist_atom` writes every cached block there, so a
/// restart on the same directory finds them (the disk tier recovers its catalog
/// at open). The tier is closed when the actor stops: spills already queued are
/// written, blocks only in memory are not. Opening the tier (directory checks,
/// the SQLite catalog, cutting segments back: engine/disk/README.md, "At open")
/// takes as long as the directory is large, and so does making the pool's
/// memory (a host arena is prefaulted, a device arena allocated, a pinned host
/// tier registered): spawn_engine_actor does all of it on its caller
/// (store_open:: before_spawn) or, with store_open::on_engine, lets the actor
/// do it as its first act (on a thread of its own by default, see own_thread),
/// so the caller (the balancer, starting a restart or a replica) goes on at
/// once, and no scheduler worker is held while it does.
///
/// Open puts are aborted `put_timeout` after their reservation, or at their
/// caller's deadline (put_request::deadline_ns) when that is sooner; a
/// reserve, write or commit at or after that deadline is refused
/// (errc::timeout; a write or commit aborts the put).

#include "actors/batch_accumulator.hpp"
#include "actors/memory_manager.hpp"
#include "actors/router.hpp"
#include "engine/block_store.hpp"
#include "engine/disk/disk_tier.hpp"
#include "engine/kv_producer.hpp"

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

namespace kvfleet::actors {

/// engine_actor_config::snapshot_keys when none is set and no node derived
/// one: one slot's share (router::max_slots) of the default
/// router_config::max_index_keys (2^20 / 64).
inline constexpr std::size_t default_snapshot_keys =
    router_config{}.max_index_keys / router::max_slots;

struct engine_actor_config {
  std::uint32_t slot = 0;
  engine::store_config store{};
  engine::namespace_spec ns{};
  engine::namespace_options ns_options{};
  batch_config batch{};
  /// Prompt tokens one batch may carry (a batch closes once its requests
  /// reach it; the scaler grows and shrinks it); 0: no token limit.
  std::uint32_t capacity_tokens = 8192;
  memory_pressure_config pressure{};
  /// The most bytes of block values computed for a batch in its one
  /// produce_batch() call (engine::prefilled_producer): the blocks its
  /// requests miss, in batch order, up to this; past it, and for blocks
  /// the estimate missed, the producer computes each block alone. 0: no
  /// batch call, every block alone.
  std::size_t prefill_bytes = std::size_t{64} << 20;
  std::chrono::milliseconds put_timeout{30'000};
  /// Makes the producer this engine computes missing blocks with; unset:
  /// a synthetic producer. One that returns null fails the engine's start
  /// (errc::invalid_argument), as one that throws does (its error), rather
  /// than serve synthetic KV as the model's.
  ///
  /// It, make_backend, make_tier and make_disk are called where the store
  /// is made (store_open): with store_open::on_engine on the engine's own
  /// thread, so several engines may call copies of them at once.
  std::function<std::unique_ptr<engine::kv_producer>()> make_producer;
  /// Makes the block pool's memory for engine `slot`, `bytes` =
  /// `store.capacity_bytes` long: one engine per GPU is
  /// cuda::device_backend_per_engine() (device memory on GPU slot % GPUs,
  /// host memory with a log line when there is none). Null: host memory.
  std::function<result<std::unique_ptr<engine::memory_backend>>(
      std::uint32_t slot, std::size_t bytes)>
      make_backend;
  /// Makes the memory tier under the pool (engine::block_store::attach_tier):
  /// a device engine's pinned host tier is
  /// cuda::host_tier_per_engine(); it returns none for host memory. Null:
  /// no tier. Blocks move there only through `relieve` (the GPU memory
  /// manager demotes to the tier before it evicts).
  engine::memory_tier_factory make_tier;
  /// While copies to the tier are in flight, the actor checks them this
  /// often even when no request comes, so an idle engine frees the device
  /// memory and staging they hold as soon as they finish.
  std::chrono::microseconds tier_poll_interval{1000};
  /// While low or background requests wait for their prefix's disk reads
  /// (see "Disk tier" above), the actor collects the disk tier's answers
  /// this often.
  std::chrono::microseconds disk_poll_interval{1000};
  /// While the actor has a listener, it removes expired blocks this often
  /// (engine::block_store::expire: memory, the memory tier, the disk tier)
  /// and publishes what left, so the listeners' index drops them within
  /// about this delay (the disk tier's within two). Each sweep walks the
  /// blocks in memory once; with no listener left, the sweeps stop.
  std::chrono::milliseconds expire_interval{1000};
  /// With a disk tier, a new listener first learns of at most this many of
  /// the keys on disk (an arbitrary subset; expired ones left out), so one
  /// restarted engine with a large directory takes at most its share of
  /// the balancer's index instead of flushing the other engines' entries.
  /// The rest reach the index as requests use them. Unset: kvfleet::node
  /// derives it from its router (node::start: max_index_keys over the most
  /// engines it runs at once, its scaler's max_replicas or its engines, and
  /// 0 for a slot past them, so the engines' snapshots add up to at most
  /// the index); an engine spawned without a node uses
  /// default_snapshot_keys. A value set here wins (0: no snapshot).
  std::optional<std::size_t> snapshot_keys;
  /// Frees memory under pressure after every batch, put, read, pin and
  /// unpin; returns the
  /// bytes freed. Null: the rule of memory_manager.hpp (`pressure`) on the
  /// pool's own accounting. One engine per GPU passes
  /// cuda::device_memory_relief_per_engine(), which also counts what else
  /// uses the device (cudaMemGetInfo).
  std::function<std::size_t(std::uint32_t slot, engine::block_store& store)>
      relieve;
  /// Opens the disk tier under engine `slot`'s store
  /// (engine::block_store::attach_disk); see "Disk tier" above.
  /// disk_tier_per_engine() gives each engine a directory of its own. Null:
  /// no disk tier (evicted blocks are gone).
  std::function<result<std::unique_ptr<engine::disk_tier>>(std::uint32_t slot)>
      make_disk;
  /// Run the actor on a thread of its own (caf::detached) instead of the
  /// scheduler's workers. Default (nullopt): its own thread exactly when
  /// the pool is device memory, the engine has a disk tier, or its store
  /// is made with store_open::on_engine, because the engine then waits for
  /// the device or the disk inside a request, or for its whole store (a
  /// host arena of GiBs is prefaulted for seconds) as its first act, and
  /// no scheduler worker may wait. (Before, an on_engine engine with
  /// neither make_backend nor make_disk made its host arena on a scheduler
  /// worker, stalling the balancer and scaler queued there.) Set false, an
  /// on_engine engine makes its store on a scheduler worker (the tests
  /// do, to run it under CAF's test_coordinator).
  std::optional<bool> own_thread;
};

/// A make_disk that opens engine `slot`'s disk tier in
/// `config.directory`/engine-<slot> (created when missing; config.directory
/// itself must exist), with `config`'s capacity and options for each engine.
/// An engine restarted on the same slot (by the balancer, or by a new node)
/// reopens the same directory and recovers what it holds. The directory is
/// locked while an engine has it open: another engine on the same directory,
/// in this process or another, fails to start (errc::busy) until the first
/// has stopped. Errors: errc::invalid_argument for an empty directory,
/// errc::io_error when the engine's directory cannot be created, then the
/// disk tier's own.
[[nodiscard]] std::function<
    result<std::unique_ptr<engine::disk_tier>>(std::uint32_t slot)>
disk_tier_per_engine(engine::disk_tier_config config);

/// errc::invalid_argument naming the option when `config` makes no sense:
/// batch.max_size 0 (1 runs each request alone), a batch.timeout,
/// put_timeout, tier_poll_interval or expire_interval that is not positive
/// or is above 24 hours (max_config_duration, config_checks.hpp), memory
/// pressure outside 0 < pressure.target <= pressure.threshold <= 1, a
/// store.max_pinned_fraction not below pressure.target (without `relieve`:
/// pins alone could keep the pool over the threshold, and relief would
/// evict every unpinned block after each batch; pinned blocks only: the
/// unpinned chain a pinned block holds is not counted), or
/// own_thread false with a make_disk (disk waits must not hold a scheduler
/// worker).
[[nodiscard]] result<void> validate(const engine_actor_config& config);

/// Where spawn_engine_actor makes the engine's store: its memory
/// (make_backend, or a prefaulted host arena), its memory tier (make_tier),
/// its disk tier (make_disk), its namespace and its producer.
enum class store_open : std::uint8_t {
  /// On the caller, before the actor is spawned: the store's errors are
  /// spawn_engine_actor's (node::start starts a node's initial engines so).
  before_spawn,
  /// In the actor, as its first act, on the actor's own thread (the
  /// default own_thread of such an engine, whatever its memory; own_thread
  /// false puts it on a scheduler worker): spawn_engine_actor
  /// returns without waiting for it, messages sent meanwhile wait in the
  /// mailbox, ready_atom is answered once the store is made, and a store
  /// that cannot be made stops the actor with that error as its exit
  /// reason (what its monitors' down_msg carries). The node's restarts and
  /// replicas start so (balancer_actor.hpp, started_engine::opening).
  on_engine,
};

/// Creates the store (over make_backend's memory when set, with make_tier's
/// tier when it gives one and make_disk's disk tier when set), registers
/// the namespace and spawns the actor; `open` says where the store is made.
/// Errors: validate(config)'s; with store_open::before_spawn also the
/// backend's, the tier factory's, the disk tier's (directory missing,
/// unwritable, full, locked, another version: engine/disk/README.md) and
/// the store's (zero capacity, bad namespace). Nothing is spawned then.
/// A spawn CAF cannot carry out is an error value too: errc::unavailable
/// when no thread can be made for an engine on a thread of its own (CAF
/// 0.17.6 then still counts the actor it could not start, so shutting the
/// actor system down may hang: restart the process), errc::out_of_memory
/// when the actor cannot be allocated.
[[nodiscard]] result<caf::actor>
spawn_engine_actor(caf::actor_system& sys, const engine_actor_config& config,
                   store_open open = store_open::before_spawn);

} // namespace kvfleet::actors
