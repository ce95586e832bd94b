#include "actors/engine_actor.hpp"

#include "actors/caf_error.hpp"
#include "actors/config_checks.hpp"
#include "actors/listeners.hpp"
#include "actors/messages.hpp"
#include "actors/owed_reply.hpp"
#include "actors/prioritized.hpp"
#include "actors/stray_messages.hpp"
#include "engine/host_error.hpp"

#include <algorithm>
#include <deque>
#include <filesystem>
#include <new>
#include <optional>
#include <queue>
#include <stdexcept>
#include <string>
#include <system_error>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <caf/actor_cast.hpp>
#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/response_promise.hpp>
#include <caf/stateful_actor.hpp>

namespace kvfleet::actors {
namespace {

using key_vec = std::vector<engine::block_key>;

/// persist_atom's timeout, at most (so milliseconds -> nanoseconds cannot
/// overflow): 24 hours, the bound of every other duration.
constexpr std::uint64_t max_persist_ms = 24ull * 3600 * 1000;

/// The store's block events (engine::store_config::on_block_event) since
/// the actor last published them, in order. Shared by the store's callback
/// and the actor, which both run on the actor's thread.
struct event_log {
  /// Someone listens: set by each new listener, cleared when the last one
  /// has gone (stop_recording), so an engine nobody listens to builds no
  /// events for nobody.
  bool recording = false;
  std::vector<std::pair<engine::block_key, engine::block_event>> events;
};

/// What spawn_engine_actor hands the actor; moved out once at start.
/// With store_open::on_engine the store and producer are still empty: the
/// actor makes them (open_store) as its first act.
struct engine_parts {
  std::shared_ptr<event_log> log;
  engine_actor_config config;
  std::unique_ptr<engine::block_store> store;
  engine::ns_id ns;
  std::unique_ptr<engine::kv_producer> producer;
};

/// Keys a new listener's snapshot of the disk sends per block_events: a
/// directory of millions of blocks reaches the listener (and the balancer's
/// listeners, and the router) as many small messages, and the engine serves
/// the requests queued between two of them.
constexpr std::size_t snapshot_chunk_keys = 4096;

/// What a new listener has still to learn of the disk.
struct disk_snapshot {
  caf::actor listener;
  std::vector<engine::block_key> keys; ///< sent from the back
};

/// A request waiting in a batch. One dropped unanswered is answered
/// request_receiver_down (owed_reply.hpp): a balancer reroutes it at once
/// instead of waiting out its timeout.
struct pending_request {
  kv_request request;
  owed_reply promise;
};

/// What a request had before block_store::promote() read for it: its
/// leading blocks in memory, and how many blocks promote() brought back or
/// started reading for it. Its reply counts those of them found in memory
/// as promoted_blocks, as if process() had read them itself.
struct before_reads {
  std::size_t memory_blocks = 0;
  std::size_t promoted = 0;
  /// The leading blocks in memory when it was last deferred: deferred
  /// again only once that prefix grew (a read that keeps failing must not
  /// defer it for ever).
  std::size_t reached = 0;
  /// promote()'s hold token: what it brought back for the request stays
  /// in memory until serve() has answered it (block_store::release_held).
  std::uint64_t hold = 0;
};

/// A low or background request whose prefix goes on past memory to disk:
/// its disk reads were started (block_store::promote), or another
/// request's are reading its next block, and it waits for them off the
/// batch, so the requests after it are not held up by them.
struct deferred_request {
  pending_request p;
  before_reads before;
  /// The promote() chain it waits for (its own, or the one reading its
  /// next block): it is looked at again once the store has collected
  /// every chain up to it.
  std::uint64_t chain = 0;
};

struct engine_state {
  engine_actor_config config;
  std::unique_ptr<engine::block_store> store;
  engine::ns_id ns;
  std::unique_ptr<engine::kv_producer> producer;
  /// Over `producer`: a batch's missing blocks computed in one call.
  std::unique_ptr<engine::prefilled_producer> prefill;
  std::vector<engine::block_key> prefill_keys; ///< prefill_for's, reused
  /// prefill_for's requests and what it covered, reused (no allocation
  /// per batch once grown).
  std::vector<const kv_request*> prefill_reqs;
  std::vector<char> prefill_covered;
  std::uint64_t prefill_unused = 0;   ///< engine_stats::prefill_unused
  std::uint64_t prefill_failures = 0; ///< engine_stats::prefill_failures
  batch_accumulator<pending_request> batcher{batch_config{}};
  /// The batch generation an urgent close marker was sent for (0: none).
  std::uint64_t urgent_marker_gen = 0;
  /// An open put, and when its caller stops waiting
  /// (put_request::deadline_ns; time_point::max() for none).
  struct open_put {
    engine::put_handle handle;
    caf::actor_clock::time_point deadline;
    /// Its reserve time + put_timeout.
    caf::actor_clock::time_point timeout_at;
    /// Aborted at its deadline: kept, with no put, until timeout_at, so
    /// that a write or commit that comes after is told errc::timeout, not
    /// that the ticket is unknown.
    bool ended = false;
  };
  std::unordered_map<std::uint64_t, open_put> puts;
  std::uint64_t next_ticket = 1;
  /// Each put's expiry (reserve time + put_timeout, or its deadline when
  /// that comes first), soonest on top; one expire_puts_atom timer for the
  /// top. (Before, each put had its own CAF timer for the whole
  /// put_timeout, committed or not: about 285 bytes per put for 30 s, some
  /// 140 MB at one writer's rate.) A put's entry stays after it ends and is
  /// dropped when its time comes.
  using put_expiry = std::pair<caf::actor_clock::time_point, std::uint64_t>;
  std::priority_queue<put_expiry, std::vector<put_expiry>, std::greater<>>
      put_deadlines;
  /// When the soonest expire_puts_atom on its way arrives (none: nullopt).
  /// A put whose expiry comes before it sends one more; the later ones
  /// still arrive and find nothing due.
  std::optional<caf::actor_clock::time_point> put_expiry_at;
  std::uint64_t puts_expired = 0; ///< engine_stats::puts_expired
  std::vector<caf::actor> listeners;
  /// Snapshots being sent, one chunk per (listen_atom) message to itself;
  /// the front one's next chunk goes first.
  std::deque<disk_snapshot> snapshots;
  std::shared_ptr<event_log> log;
  std::unordered_set<engine::block_key, engine::block_key_hash>
      seen; ///< publish's
  std::uint64_t in_flight = 0;
  std::uint64_t requests = 0;
  std::uint64_t batches = 0;
  std::uint64_t pressure_evictions = 0;
  std::uint64_t expired = 0;   ///< engine_stats::expired
  std::uint64_t published = 0; ///< block_events sent (block_events::seq)
  /// block_events::pinned_bytes and pinned_on_disk of the last
  /// block_events made.
  std::uint64_t pinned_published = 0;
  std::uint64_t pinned_on_disk_published = 0;
  bool tier_poll_pending = false; ///< a poll_tier_atom is on its way
  /// Waiting for disk reads, in the order they were deferred (each is
  /// looked at on every pass: one waiting for an earlier chain can come
  /// after one waiting for a later chain).
  std::deque<deferred_request> deferred;
  bool disk_poll_pending = false;  ///< a poll_disk_atom is on its way
  std::uint64_t disk_deferred = 0; ///< engine_stats::disk_deferred
  std::uint64_t last_hold = 0;     ///< promote()'s hold tokens, the last one
  bool sweep_pending = false;      ///< a sweep_atom is on its way
  /// Its balancer retires it: it persisted its blocks (persist_atom with
  /// `retiring`) and exits next, so puts and pins are refused from then on
  /// (acked, they would be lost with it).
  bool retiring = false;
  static inline const char* name = "kvfleet.engine";
};

using engine_actor = caf::stateful_actor<engine_state>;

/// A priority outside engine::priority (a cast, a peer's message) would
/// outrank critical in every queue on its way, and its blocks would rank
/// above critical ones in eviction: such a request or put is refused.
std::optional<caf::error> bad_priority(engine::priority p) {
  if (auto ok = engine::check_priority(p); !ok)
    return to_caf_error(ok.error());
  return std::nullopt;
}

template <class T> caf::result<T> lift(result<T> r) {
  if (!r)
    return to_caf_error(r.error());
  return std::move(*r);
}

caf::result<bool> lift_void(const result<void>& r) {
  if (!r)
    return to_caf_error(r.error());
  return true;
}

/// Whether the engine still holds `key` though an event said it left:
/// with a disk tier, a block evicted from memory that was spilled (or
/// whose spill is still queued) and has not expired is on disk, and a
/// block the disk tier dropped may be in memory or the memory tier.
/// Without one, an event says it all.
bool still_held(engine_state& st, const engine::block_key& key) {
  return st.store->disk() != nullptr &&
         (st.store->on_disk(st.ns, key) || st.store->contains(st.ns, key) ||
          st.store->in_tier(st.ns, key));
}

/// Blocks whose disk copy holds pins (block_events::pinned_on_disk).
std::uint64_t pinned_on_disk(const engine_state& st) {
  const auto* disk = st.store->disk();
  return disk == nullptr ? 0 : disk->pinned_blocks();
}

/// Sends the listeners what the store (and its disk tier) reported since
/// the last call: each key once, as its last event left it (a block evicted
/// and stored again in between is reported stored), in the order of those
/// last events. A key the engine still holds (still_held: on disk) is
/// reported stored, not evicted: a request would find it there.
void publish(engine_actor* self) {
  auto& st = self->state;
  auto& log = st.log->events;
  if (auto* disk = st.store->disk(); disk != nullptr && st.log->recording)
    disk->drain_removed([&](const engine::block_key& key) {
      log.emplace_back(key, engine::block_event::removed);
    });
  const std::uint64_t pinned = st.store->pinned_bytes();
  const std::uint64_t on_disk = pinned_on_disk(st);
  if (log.empty() && pinned == st.pinned_published &&
      on_disk == st.pinned_on_disk_published)
    return;
  st.pinned_published = pinned;
  st.pinned_on_disk_published = on_disk;
  block_events out;
  out.engine = st.config.slot;
  out.pinned_bytes = pinned;
  out.pinned_on_disk = on_disk;
  // Only pins changed (a pin or unpin of a cached block): no key events, so
  // no new seq (a reply's events_published still says no later events).
  out.seq = log.empty() ? st.published : ++st.published;
  // clear() walks every bucket, and the buckets never shrink: after one
  // large publish (an expiry sweep, an eviction of most of the store) each
  // later one would cost that much. A set grown well past this publish's
  // size is dropped instead (it is reused while it fits).
  if (st.seen.bucket_count() > 4 * log.size() + 64)
    st.seen = {};
  else
    st.seen.clear();
  for (auto it = log.rbegin(); it != log.rend(); ++it)
    if (st.seen.insert(it->first).second)
      (it->second == engine::block_event::stored || still_held(st, it->first)
           ? out.stored
           : out.evicted)
          .push_back(it->first);
  log.clear();
  std::reverse(out.stored.begin(), out.stored.end());
  std::reverse(out.evicted.begin(), out.evicted.end());
  if (st.listeners.empty()) // all of them went: nobody to tell
    return;
  for (size_t i = 0; i + 1 < st.listeners.size(); ++i)
    self->send(st.listeners[i], out);
  self->send(st.listeners.back(), std::move(out));
}

void relieve_pressure(engine_state& st) {
  if (st.config.relieve) {
    if (st.config.relieve(st.config.slot, *st.store) > 0)
      ++st.pressure_evictions;
    return;
  }
  auto bytes = bytes_to_free(st.config.pressure, st.store->used_bytes(),
                             st.store->capacity_bytes());
  if (bytes > 0 && st.store->evict_bytes(bytes) > 0)
    ++st.pressure_evictions;
}

/// Whether process() takes `r` as far as prefill_for can tell: keys a
/// block can have, one per full block of its tokens.
bool prefillable(const kv_request& r, const engine::namespace_spec& spec) {
  return engine::check_request_keys(r.keys).has_value() &&
         engine::check_block_keys(r.keys.size(), r.input_tokens,
                                  spec.block_tokens)
             .has_value();
}

/// Computes, in one produce_batch() call (engine::prefilled_producer), the
/// blocks `reqs` (a batch, in the order they run) are about to compute:
/// each request's keys past the prefix found in memory, in the memory tier
/// or on disk, at most config.prefill_bytes of them in all. Left out: a
/// request past its deadline (answered unprocessed), one process() refuses
/// for its keys or token count, and, when `may_defer`, a low or background
/// one whose prefix goes on to disk (it may wait off the batch for those
/// reads). A request whose blocks do not fit what is left of the bound is
/// left out whole (a later, smaller one may fit). A block the estimate
/// misses, or one left out, is computed alone when process() asks for it.
/// Returns, per request, whether the call computed every block it is about to
/// compute: the time of that call does not count toward its turn (serve()).
/// finish_prefill() after the batch. The requests are st.prefill_reqs and
/// the result st.prefill_covered (reused: no allocation per batch once
/// grown).
const std::vector<char>& prefill_for(engine_state& st, std::int64_t now_ns,
                                     bool may_defer) {
  const auto& reqs = st.prefill_reqs;
  auto& covered = st.prefill_covered;
  covered.assign(reqs.size(), 0);
  if (st.config.prefill_bytes == 0 || reqs.empty())
    return covered;
  const auto spec = st.store->spec(st.ns);
  if (!spec)
    return covered;
  const std::size_t value_bytes = (*spec)->value_bytes();
  const std::size_t most = st.config.prefill_bytes / value_bytes;
  auto& keys = st.prefill_keys;
  keys.clear();
  for (std::size_t n = 0; n < reqs.size() && keys.size() < most; ++n) {
    const kv_request& r = *reqs[n];
    if ((r.deadline_ns != 0 && now_ns >= r.deadline_ns) ||
        !prefillable(r, **spec))
      continue;
    std::size_t first = 0;
    bool on_disk = false;
    for (; first < r.keys.size(); ++first) {
      const auto& k = r.keys[first];
      if (st.store->contains(st.ns, k) || st.store->in_tier(st.ns, k))
        continue;
      if (!st.store->on_disk(st.ns, k))
        break;
      on_disk = true;
    }
    if (first == r.keys.size() ||
        (may_defer && on_disk && r.prio <= engine::priority::low))
      continue;
    if (r.keys.size() - first > most - keys.size())
      continue; // past the bound: it computes alone, a smaller one may fit
    keys.insert(keys.end(), r.keys.begin() + static_cast<std::ptrdiff_t>(first),
                r.keys.end());
    covered[n] = 1;
  }
  if (keys.empty())
    return covered;
  if (!st.prefill->prefill(**spec, keys)) {
    ++st.prefill_failures; // each block is computed alone
    covered.assign(reqs.size(), 0);
  }
  return covered;
}

/// After a batch: counts the prefilled blocks no request took, and forgets
/// them.
void finish_prefill(engine_state& st) {
  st.prefill_unused += st.prefill->clear();
}

/// Why a put or pin is refused once the engine's balancer retires it.
error retiring_refusal() {
  return error{errc::unavailable,
               "this engine is being retired: it persisted its blocks and "
               "exits now, so it takes no more puts or pins (put the block on "
               "another engine)"};
}

result<kv_reply> run_one(engine_state& st, const kv_request& req) {
  // A request that pins, as a pin_atom: its pins would go with the engine,
  // acked to a caller that would unpin them on an engine that is gone.
  if (req.pin && st.retiring)
    return unexpected<error>{retiring_refusal()};
  engine::put_options opts;
  opts.prio = req.prio;
  opts.pin = req.pin;
  opts.request_tokens = req.input_tokens;
  auto r =
      st.store->process(st.ns, req.keys, req.input_tokens, *st.prefill, opts);
  if (!r)
    return unexpected<error>{r.error()};
  ++st.requests;
  kv_reply rep{req.id,
               st.config.slot,
               r->matched_blocks,
               r->computed_blocks,
               r->matched_tokens,
               r->computed_tokens,
               false,
               r->uncached_blocks};
  rep.promoted_blocks = r->tier_blocks + r->disk_blocks;
  rep.memory_blocks = r->memory_blocks;
  rep.events_published = st.published;
  rep.pinned_bytes = st.store->pinned_bytes();
  return rep;
}

/// While demotions are in flight, checks them again after
/// tier_poll_interval, so an idle engine still frees what they hold.
void watch_tier(engine_actor* self) {
  auto& st = self->state;
  if (st.tier_poll_pending || st.store->tier_bytes_in_flight() == 0)
    return;
  st.tier_poll_pending = true;
  self->delayed_send(self, st.config.tier_poll_interval, poll_tier_atom::value);
}

/// After requests, a put, a read or a pin changed the store: relieve memory
/// pressure, tell listeners, keep an eye on the tier copies that started.
void after_change(engine_actor* self) {
  relieve_pressure(self->state);
  publish(self);
  watch_tier(self);
}

/// Sends the front snapshot's next chunk of keys, those still on disk and
/// not expired now (one that left since was reported evicted, or stored
/// when it is in memory, by publish), and asks itself for the next one,
/// behind the messages queued meanwhile.
void send_snapshot_chunk(engine_actor* self) {
  auto& st = self->state;
  if (st.snapshots.empty() || st.store->disk() == nullptr)
    return;
  auto& snap = st.snapshots.front();
  const auto n = std::min(snap.keys.size(), snapshot_chunk_keys);
  const auto first = snap.keys.end() - static_cast<std::ptrdiff_t>(n);
  block_events out;
  out.engine = st.config.slot;
  out.pinned_bytes = st.store->pinned_bytes();
  out.pinned_on_disk = pinned_on_disk(st);
  std::copy_if(first, snap.keys.end(), std::back_inserter(out.stored),
               [&](const engine::block_key& key) {
                 return st.store->on_disk(st.ns, key);
               });
  snap.keys.erase(first, snap.keys.end());
  if (!out.stored.empty())
    self->send(snap.listener, std::move(out));
  if (snap.keys.empty())
    st.snapshots.pop_front();
  if (!st.snapshots.empty())
    self->send(self, listen_atom::value);
}

/// The last listener has gone: the store's events and the disk tier's
/// removals are no longer recorded (each change built a block_events that
/// publish threw away), and what was recorded for nobody is dropped. The
/// next listener starts recording again (listen_atom), as it arms the
/// expiry sweep again.
void stop_recording(engine_state& st) {
  st.log->recording = false;
  st.log->events.clear();
  if (auto* disk = st.store->disk())
    disk->record_removals(false); // drops the removals kept so far
}

/// While someone listens: every expire_interval, expired blocks leave
/// (engine::block_store::expire: memory and the memory tier at once, the
/// disk tier's queued) and the listeners hear of it, instead of believing
/// them held until something else removes them. Armed by each new
/// listener; a sweep that finds none left arms no next one.
void arm_sweep(engine_actor* self) {
  if (self->state.sweep_pending)
    return;
  self->state.sweep_pending = true;
  self->delayed_send(self, self->state.config.expire_interval,
                     sweep_atom::value);
}

void after_batch(engine_actor* self) {
  ++self->state.batches;
  after_change(self);
}

void close_batch(engine_actor* self);

/// The actor clock's now, as the batcher's arrival times.
engine::nanos arrival_time(engine_actor* self) {
  return std::chrono::duration_cast<engine::nanos>(
      self->clock().now().time_since_epoch());
}

/// When a batch has opened: arms what closes it. With close_when_idle,
/// that is a close message to itself now, behind every message already in
/// the mailbox; no timer, as a timer's message could only arrive behind it.
void arm_timer(engine_actor* self) {
  auto& st = self->state;
  auto& b = st.batcher;
  const bool opened = b.take_opened();
  if (b.config().close_when_idle) {
    // Behind what the mailbox holds: the batch takes in the requests
    // queued meanwhile. A batch holding a high or critical request closes
    // behind the urgent messages only (its marker is one, as that request
    // came; also when the request joins a batch whose normal marker is on
    // its way: the first marker to arrive closes it, and the other finds a
    // newer generation). Before, such a request waited for every normal
    // message queued before it, block calls that read from disk or a
    // persist among them.
    const auto top = b.top_priority();
    const bool urgent =
        top && mailbox_priority(*top) == caf::message_priority::high;
    if (urgent && st.urgent_marker_gen != b.generation()) {
      st.urgent_marker_gen = b.generation();
      self->send<caf::message_priority::high>(self, close_batch_atom::value,
                                              b.generation());
    } else if (opened && !urgent) {
      self->send(self, close_batch_atom::value, b.generation());
    }
    return;
  }
  if (!opened)
    return;
  // At the batch's deadline: its oldest request's arrival plus the timeout
  // (a request left over from the last batch keeps its arrival), not a
  // second timeout from the last close. The delay stays in
  // nanoseconds: cut to whole milliseconds, 1.5 ms closed batches after
  // 1 ms and anything below 1 ms at once.
  const auto deadline = b.deadline().value_or(arrival_time(self));
  const auto delay = std::max(engine::nanos{0}, deadline - arrival_time(self));
  self->delayed_send(self, delay, close_batch_atom::value, b.generation());
}

/// Answers `p`: errc::timeout unprocessed when its turn came at or after
/// its deadline, else process()'s reply or error. `before`: what it had in
/// memory before promote() read for it (defer_for_disk). `prefill_ns`: the
/// time its batch's produce_batch() call took, which computed its blocks
/// ahead and so does not count toward its turn (else a request whose
/// blocks were computed in time would be answered unprocessed, that work
/// thrown away).
void serve(engine_actor* self, pending_request& p,
           const std::optional<before_reads>& before = std::nullopt,
           std::int64_t prefill_ns = 0) {
  auto& st = self->state;
  // What promote() brought back for it was held until now; once answered,
  // it is cached as any block.
  struct release_hold {
    engine::block_store& store;
    std::uint64_t hold;
    ~release_hold() { store.release_held(hold); }
  } const hold_guard{*st.store, before ? before->hold : 0};
  const auto deadline = p.request.deadline_ns;
  if (deadline != 0 && arrival_time(self).count() - prefill_ns >= deadline) {
    ++st.expired;
    p.promise.deliver(to_caf_error(
        error{errc::timeout,
              "request " + std::to_string(p.request.id) +
                  " came to its turn after its deadline (when its caller "
                  "stopped waiting: the balancer's request_timeout, or a "
                  "node's call_timeout): not processed"}));
    --st.in_flight;
    return;
  }
  auto r = run_one(st, p.request);
  if (r && p.request.pin && deadline != 0 &&
      arrival_time(self).count() >= deadline) {
    // Finished after its caller was told it timed out: that caller holds
    // none of the pins it added and would never unpin them, which would
    // hold their memory for good (and across restarts, with a disk tier).
    // The blocks stay cached, unpinned.
    const auto unpinned = st.store->unpin_last_process();
    ++st.expired;
    p.promise.deliver(to_caf_error(error{
        errc::timeout, "request " + std::to_string(p.request.id) +
                           " finished after its deadline (when its caller "
                           "stopped waiting): the " +
                           std::to_string(unpinned) +
                           " pins it added were taken back"}));
    --st.in_flight;
    return;
  }
  if (r && before && r->memory_blocks > before->memory_blocks) {
    // What promote() brought back for it, found in memory now, counts as
    // process() would have counted it; more found there (another
    // request's reads of a shared chain) was found, not promoted.
    const auto own = std::min<std::uint64_t>(
        r->memory_blocks - before->memory_blocks, before->promoted);
    r->promoted_blocks += own;
    r->memory_blocks -= own;
  }
  if (r)
    p.promise.deliver(std::move(*r));
  else
    p.promise.deliver(to_caf_error(r.error()));
  --st.in_flight;
}

/// Collects the disk tier's answers after disk_poll_interval while
/// deferred requests wait for them.
void arm_disk_poll(engine_actor* self) {
  auto& st = self->state;
  if (st.disk_poll_pending || st.deferred.empty())
    return;
  st.disk_poll_pending = true;
  self->delayed_send(self, st.config.disk_poll_interval, poll_disk_atom::value);
}

/// What defer_for_disk did with a request.
struct deferral {
  bool deferred = false;
  /// Not deferred, but promote() brought blocks back for it (from the
  /// memory tier, or linked): serve() it with this, so its reply counts
  /// them as promoted.
  std::optional<before_reads> served_after;
};

/// Starts the reads of `p` and defers it when it is of low or background
/// priority and its prefix goes on past memory (and the memory tier's run
/// after it) to disk: process() would wait for those reads inside the
/// batch, and every request behind it, a critical one too, with it. The
/// reads are background work at the disk tier, so the demand reads of the
/// requests served meanwhile go first; a request of the same keys that
/// comes meanwhile makes them demand reads as it waits for them
/// (block_store's process(), disk_tier::expedite). A request of normal
/// priority and above reads inline. One whose next block another deferred
/// request is reading waits for that chain too; one whose reads could not
/// start otherwise (no room) is not deferred: process() waits as before.
/// `prior`: what it had before, when it was deferred already (its reply
/// counts the blocks brought back for it both times as promoted).
deferral
defer_for_disk(engine_actor* self, pending_request& p,
               const std::optional<before_reads>& prior = std::nullopt) {
  auto& st = self->state;
  const auto& req = p.request;
  if (st.store->disk() == nullptr || req.prio > engine::priority::low)
    return {};
  if (req.deadline_ns != 0 && arrival_time(self).count() >= req.deadline_ns)
    return {}; // serve() answers it unprocessed
  // Refused by process() anyway: nothing is read for it.
  if (!engine::check_request_keys(req.keys) ||
      !engine::check_block_keys(req.keys.size(), req.input_tokens,
                                st.config.ns.block_tokens))
    return {};
  std::size_t in_memory = 0;
  while (in_memory < req.keys.size() &&
         st.store->contains(st.ns, req.keys[in_memory]))
    ++in_memory;
  // Deferred before: again only when what it waited for moved its prefix
  // on (else the same read failed, say: process() takes it from here).
  if (prior && in_memory <= prior->reached)
    return deferral{false, prior};
  std::size_t next = in_memory;
  while (next < req.keys.size() && st.store->in_tier(st.ns, req.keys[next]))
    ++next;
  if (next == req.keys.size() || !st.store->on_disk(st.ns, req.keys[next]))
    return deferral{false, prior};
  engine::put_options opts;
  opts.prio = req.prio;
  opts.request_tokens = static_cast<std::uint32_t>(
      std::min<std::size_t>(req.input_tokens, 0xffffffffU));
  const auto chain_before = st.store->last_promotion_chain();
  // promote() counts the tier run it moved (at most next - in_memory: a
  // shorter one reads nothing from disk) and then the reads it started;
  // an error (no room to reserve into, say) moved nothing. What it brings
  // back is held for the request until serve() answers it: the batches
  // run meanwhile would evict it first (low priority goes first).
  const std::uint64_t hold = prior ? prior->hold : ++st.last_hold;
  const auto started = st.store->promote(st.ns, req.keys, opts, hold);
  const std::size_t moved = started ? *started : 0;
  const before_reads before =
      prior ? before_reads{prior->memory_blocks, prior->promoted + moved,
                           in_memory, hold}
            : before_reads{in_memory, moved, in_memory, hold};
  const auto chain = st.store->last_promotion_chain();
  std::optional<std::uint64_t> wait_for;
  if (moved > next - in_memory && chain && chain != chain_before) {
    wait_for = chain; // its own reads
  } else {
    // None of its own: the block memory now stops at may be on its way
    // already, read for an earlier request (two prefetches of one
    // prefix). It waits off the batch for that chain too, and finds those
    // blocks in memory (not promoted for it). Before, it was served in the
    // batch, where process() waited for those reads, and every request
    // behind it with it.
    std::size_t first = in_memory;
    while (first < req.keys.size() &&
           st.store->contains(st.ns, req.keys[first]))
      ++first;
    if (first < req.keys.size())
      wait_for = st.store->promotion_chain_of(req.keys[first]);
  }
  if (!wait_for) {
    // process() takes it from here, reading in its batch; a reply counts
    // the tier's copies promote() moved for it as promoted.
    if (moved == 0 && !prior) {
      st.store->release_held(hold); // a block it linked may be held
      return {};
    }
    if (moved == 0)
      return deferral{false, prior};
    return deferral{false, before};
  }
  ++st.disk_deferred;
  st.deferred.push_back(deferred_request{std::move(p), before, *wait_for});
  arm_disk_poll(self);
  return deferral{true, std::nullopt};
}

/// Whether the batcher holds a request above priority `p`: a deferred
/// request of priority `p` (low or background) waits for it, as it would
/// in its lanes (a background one for a queued low one too: before, only
/// a request above low held deferred ones back).
bool deferred_outranked(const engine_actor* self, engine::priority p) {
  const auto top = self->state.batcher.top_priority();
  return top && *top > p;
}

/// Collects the disk tier's answers and serves the deferred requests whose
/// reads have all landed (or failed: process() computes those blocks),
/// low before background, in order within each, at most a batch's
/// max_size of them: more ready ones wait for a poll sent behind the
/// mailbox, so a critical request that came meanwhile goes first. None
/// while the batcher holds a request above its priority (above low for a
/// low one, low and above for a background one): that batch runs first,
/// and its close serves them (before, a batch's leftover critical
/// requests waited behind up to max_size deferred low ones, each
/// computing what it missed; their promoted blocks are held until they
/// are served, so waiting costs no read). One whose prefix goes on to
/// disk past what it waited for is deferred again (defer_for_disk)
/// instead. One past its deadline is answered unprocessed at once.
void run_deferred(engine_actor* self) {
  auto& st = self->state;
  st.store->poll_disk();
  std::size_t served = 0;
  const std::size_t most =
      std::max<std::size_t>(st.batcher.config().max_size, 1);
  const auto now = arrival_time(self).count();
  bool more = false;
  std::vector<deferred_request> ready;
  std::size_t taken = 0;
  // Low before background, the lanes' order (only they are deferred:
  // defer_for_disk).
  for (const auto prio : {engine::priority::low, engine::priority::background})
    for (auto it = st.deferred.begin(); it != st.deferred.end();) {
      const auto deadline = it->p.request.deadline_ns;
      const bool late = deadline != 0 && now >= deadline;
      if (it->p.request.prio != prio && !late) {
        ++it;
        continue;
      }
      if (!late && (deferred_outranked(self, prio) || taken == most ||
                    !st.store->promotions_done_through(it->chain))) {
        // The batch that outranks it serves it at its close.
        more = more || (taken == most && !deferred_outranked(self, prio));
        ++it;
        continue;
      }
      ready.push_back(std::move(*it));
      it = st.deferred.erase(it);
      if (!late)
        ++taken;
    }
  // The blocks they miss past what landed, in one producer call, as a
  // batch's (a request whose prefix goes on to disk is left out: it may
  // be deferred again).
  st.prefill_reqs.clear();
  for (const auto& d : ready)
    st.prefill_reqs.push_back(&d.p.request);
  const auto& covered = prefill_for(st, now, true);
  const auto prefill_ns = arrival_time(self).count() - now;
  for (std::size_t i = 0; i < ready.size(); ++i) {
    auto& d = ready[i];
    // What it waited for has landed; the prefix may go on to disk after
    // it (a later run, or past another request's chain): those reads
    // start now and it waits off the batch again, rather than in
    // process(). (A late one is answered unprocessed.)
    auto again = defer_for_disk(self, d.p, d.before);
    if (again.deferred)
      continue;
    const auto deadline = d.p.request.deadline_ns;
    if (deadline == 0 || now < deadline)
      ++served;
    serve(self, d.p, again.served_after ? again.served_after : d.before,
          covered[i] ? prefill_ns : 0);
  }
  finish_prefill(st);
  // The poll landed reads (and may have evicted to make room): the
  // listeners hear of it, and pressure is relieved, whether or not a
  // request was served (every ready one may have been past its deadline).
  if (served > 0)
    after_batch(self);
  else
    after_change(self);
  // One poll on its way at a time (each arms the next): a timed one that a
  // request deferred again just armed serves the rest a little later.
  if (more && !st.disk_poll_pending) {
    st.disk_poll_pending = true;
    self->send(self, poll_disk_atom::value); // behind the mailbox
    return;
  }
  arm_disk_poll(self);
}

void close_batch(engine_actor* self) {
  auto& st = self->state;
  // What is left over may be a full batch already (a request that alone
  // reaches the token budget, or a budget cut below what was queued): it
  // runs now, not after another timeout. With close_when_idle it runs at
  // its own marker instead, behind what reached the mailbox meanwhile, so
  // a critical request that came during this batch joins the next one
  // rather than waiting for every batch the backlog makes.
  const bool at_marker = st.batcher.config().close_when_idle;
  // Requests past their deadline are answered now, unprocessed (serve()),
  // wherever they wait in their lanes: below a stream of full batches of
  // higher priorities they stayed queued, counted in in_flight (and in the
  // balancer's load for their engine) long after their callers had been
  // told of the timeout. A scan of what is queued, once per batch.
  const auto now = arrival_time(self).count();
  for (auto& p : st.batcher.take_if([now](const pending_request& p) {
         return p.request.deadline_ns != 0 && now >= p.request.deadline_ns;
       }))
    serve(self, p, std::nullopt);
  do {
    auto batch = st.batcher.take();
    if (batch.empty())
      break; // every request pending was past its deadline
    const auto start = arrival_time(self).count();
    st.prefill_reqs.clear();
    for (const auto& p : batch)
      st.prefill_reqs.push_back(&p.request);
    const auto& covered = prefill_for(st, start, true);
    const auto prefill_ns = arrival_time(self).count() - start;
    for (std::size_t i = 0; i < batch.size(); ++i) {
      auto& p = batch[i];
      auto d = defer_for_disk(self, p);
      if (!d.deferred)
        serve(self, p, d.served_after, covered[i] ? prefill_ns : 0);
    }
    finish_prefill(st);
    after_batch(self);
  } while (!at_marker && st.batcher.pending() > 0 && st.batcher.full());
  // The batch collected the disk tier's answers: deferred requests whose
  // reads have landed are served now, unless requests above their
  // priority are left in the batcher (run_deferred serves none then; the
  // close of their batch comes back here).
  if (!st.deferred.empty())
    run_deferred(self);
  arm_timer(self);
}

/// Makes `parts`' store as `parts.config` says: the block pool over
/// make_backend's memory (host memory when null: prefaulted, seconds for
/// GiBs), make_tier's tier when it gives one, make_disk's disk tier (its
/// open recovers the directory: as long as the directory is large), the
/// namespace, and the producer. The store reports its block events to
/// `parts.log` (also those promoted from disk; a block moved to the memory
/// tier is still the engine's), and a caller's own callback still runs.
/// Errors: the backend's, the store's (zero capacity, bad namespace), the
/// tier factory's, the disk tier's (engine/disk/README.md, "At open").
result<void> open_store_parts(engine_parts& parts) {
  const auto& config = parts.config;
  engine::store_config store_config = config.store;
  // The memory manager's rule, low priority first, also where the store
  // makes room itself: that path keeps the pool at or below its high
  // watermark (0.9), so the rule applied after a batch (above 0.9) alone
  // would hardly ever act, and a put's room would be made in the policy's
  // order, a critical request's blocks before a background one's.
  store_config.lowest_priority_first = true;
  store_config.on_block_event =
      [log = parts.log, own = config.store.on_block_event](
          engine::block_event ev, const engine::block_key& key) {
        if (own)
          own(ev, key);
        if (log->recording)
          log->events.emplace_back(key, ev);
      };
  auto store = [&]() -> result<std::unique_ptr<engine::block_store>> {
    if (!config.make_backend)
      return engine::block_store::create(store_config);
    auto backend =
        config.make_backend(config.slot, config.store.capacity_bytes);
    if (!backend)
      return unexpected<error>{backend.error()};
    return engine::block_store::create(store_config, std::move(*backend));
  }();
  if (!store)
    return unexpected<error>{store.error()};
  if (config.make_tier) {
    if (auto t = (*store)->attach_tier(config.make_tier); !t)
      return unexpected<error>{t.error()};
  }
  if (config.make_disk) {
    auto disk = config.make_disk(config.slot);
    if (!disk)
      return unexpected<error>{disk.error()};
    if (auto d = (*store)->attach_disk(std::move(*disk)); !d)
      return d;
  }
  auto ns = (*store)->register_namespace(config.ns, config.ns_options);
  if (!ns)
    return unexpected<error>{ns.error()};
  parts.store = std::move(*store);
  parts.ns = *ns;
  // A factory that gives no producer (a model that did not load, say) is
  // a failed start: before, the engine fell back to the synthetic
  // producer and cached and served made-up KV as the model's.
  if (!config.make_producer) {
    parts.producer = std::make_unique<engine::synthetic_producer>();
    return {};
  }
  parts.producer = config.make_producer();
  if (!parts.producer)
    return make_error(errc::invalid_argument,
                      "the engine of slot " + std::to_string(config.slot) +
                          ": make_producer gave no producer (a null "
                          "pointer); a factory that cannot make one "
                          "throws, and the engine does not start");
  return {};
}

/// open_store_parts, with an exception from a host's factory (make_backend,
/// make_tier, make_disk, make_producer: the host's code) turned into an
/// error value, as a producer's is: node::start and the engine's start
/// return errors, and the caller learns what threw.
result<void> open_store(engine_parts& parts) {
  try {
    return open_store_parts(parts);
  } catch (...) {
    return unexpected<error>{
        current_exception_error("opening the engine's store threw")};
  }
}

/// What a put or pin gets once the engine's balancer retires it.
caf::error retiring_error() {
  return to_caf_error(retiring_refusal());
}

/// When the caller of put `p` stops waiting (time_point::max() for none).
caf::actor_clock::time_point put_deadline(const put_request& p) {
  if (p.deadline_ns == 0)
    return caf::actor_clock::time_point::max();
  return caf::actor_clock::time_point{
      std::chrono::duration_cast<caf::actor_clock::time_point::duration>(
          std::chrono::nanoseconds{p.deadline_ns})};
}

/// What a reserve, write or commit of a put gets at or after its deadline.
caf::error put_past_deadline(const char* step) {
  return to_caf_error(error{
      errc::timeout, std::string{"put "} + step +
                         " arrived at or after the put's deadline "
                         "(put_request::deadline_ns): the put is not taken"});
}

/// Sends the expire_puts_atom for the soonest put expiry, unless one that
/// arrives no later is on its way.
void arm_put_expiry(engine_actor* self, caf::actor_clock::time_point now) {
  auto& s = self->state;
  if (s.put_deadlines.empty())
    return;
  const auto next = s.put_deadlines.top().first;
  if (s.put_expiry_at && *s.put_expiry_at <= next)
    return;
  s.put_expiry_at = next;
  self->delayed_send(self, next - now, expire_puts_atom::value);
}

/// Aborts open put `it`, past its deadline at `now`: it stays as ended
/// until its put_timeout (a write or commit of it is then errc::timeout,
/// an abort true), with an expiry for then (the caller arms its timer).
void end_put(engine_actor* self, decltype(engine_state::puts)::iterator it,
             caf::actor_clock::time_point now) {
  auto& s = self->state;
  // Counted only when the put was still open: one whose parent's abort
  // aborted it already (the store invalidates the children's handles) was
  // ended by its caller, not by the engine.
  if (s.store->abort(it->second.handle))
    ++s.puts_expired;
  if (now >= it->second.timeout_at) {
    s.puts.erase(it);
    return;
  }
  it->second.handle = engine::put_handle{};
  it->second.ended = true;
  s.put_deadlines.emplace(it->second.timeout_at, it->first);
}

/// A write or commit of put `it` at or after its deadline: the put, if
/// still open, is aborted, and the call refused (errc::timeout).
caf::error refuse_late_put(engine_actor* self,
                           decltype(engine_state::puts)::iterator it,
                           caf::actor_clock::time_point now, const char* step) {
  if (!it->second.ended) {
    end_put(self, it, now);
    arm_put_expiry(self, now);
  }
  return put_past_deadline(step);
}

/// persist_atom: every cached block written to the disk tier.
caf::result<std::uint64_t> persist(engine_actor* self,
                                   std::uint64_t timeout_ms) {
  auto r = self->state.store->persist(std::chrono::milliseconds(
      std::min<std::uint64_t>(timeout_ms, max_persist_ms)));
  publish(self);
  if (!r)
    return to_caf_error(r.error());
  return static_cast<std::uint64_t>(*r);
}

caf::behavior engine_behavior(engine_actor* self,
                              std::shared_ptr<engine_parts> parts) {
  auto& st = self->state;
  // store_open::on_engine: first, in the actor (on its own thread unless
  // own_thread says false), so whoever spawned it does not wait for the
  // arena or the disk, nor any other actor on a scheduler worker; messages sent
  // meanwhile wait in the mailbox. A store that does not open ends the
  // actor with its error, which its monitors' down_msg carries.
  if (!parts->store) {
    if (auto ok = open_store(*parts); !ok) {
      self->quit(to_caf_error(ok.error()));
      return {};
    }
  }
  st.config = std::move(parts->config);
  st.store = std::move(parts->store);
  st.ns = parts->ns;
  st.producer = std::move(parts->producer);
  st.prefill = std::make_unique<engine::prefilled_producer>(*st.producer);
  // max_size 1 closes each batch at its marker, whatever close_when_idle
  // says: every batch is full at its first request, so no timer would
  // close one, and closing it as it is read would run the requests in
  // the order they arrived, past the lanes (normal, low and background
  // share CAF's normal mailbox category: a background request read first
  // ran before a normal one queued behind it). At the marker, everything
  // queued by then is ranked first, and a lone request still runs at once.
  auto batch = st.config.batch;
  if (batch.max_size <= 1)
    batch.close_when_idle = true;
  st.batcher =
      batch_accumulator<pending_request>{batch, st.config.capacity_tokens};
  st.log = std::move(parts->log);
  handle_stray_messages(self, "engine");
  // The engine monitors its listeners only: one that went hears nothing
  // more.
  self->set_down_handler([=](caf::down_msg& dm) {
    if (drop_listener(self->state.listeners, dm.source) &&
        self->state.listeners.empty())
      stop_recording(self->state);
    // Its disk snapshot too (the front one's next chunk may be on its
    // way: the chunk pump finds the queue changed, which it copes with).
    auto& snaps = self->state.snapshots;
    snaps.erase(std::remove_if(snaps.begin(), snaps.end(),
                               [&](const disk_snapshot& d) {
                                 return d.listener.address() == dm.source;
                               }),
                snaps.end());
  });
  return {
      [=](process_atom, kv_request& req) -> caf::result<kv_reply> {
        auto& s = self->state;
        if (auto bad = bad_priority(req.prio))
          return std::move(*bad);
        auto promise = self->make_response_promise();
        ++s.in_flight;
        auto prio = req.prio;
        auto tokens = req.input_tokens;
        bool full = s.batcher.add(
            prio, pending_request{std::move(req), owed_reply{promise}}, tokens,
            arrival_time(self));
        // With close_when_idle, even a full batch waits for its close
        // marker, behind every request queued before the batch opened:
        // they are ranked with it, so a normal request behind 20
        // background ones runs first, not in the next batch (the batch
        // still takes at most max_size; the rest runs in the batches
        // after it, each at its own marker).
        if (s.batcher.config().close_when_idle || !full)
          arm_timer(self);
        else
          close_batch(self);
        return promise;
      },
      [=](sweep_atom) {
        if (!sent_by_itself(self))
          return;
        self->state.sweep_pending = false;
        // The sweep is for listeners: with the last one gone it stops (it
        // walked the store every expire_interval for nobody), and the next
        // listener arms it again.
        if (self->state.listeners.empty())
          return;
        self->state.store->expire();
        // The disk tier's expirations are reported at the next publish.
        publish(self);
        arm_sweep(self);
      },
      [=](poll_disk_atom) {
        if (!sent_by_itself(self))
          return;
        self->state.disk_poll_pending = false;
        run_deferred(self);
      },
      [=](poll_tier_atom) {
        if (!sent_by_itself(self))
          return;
        auto& s = self->state;
        s.tier_poll_pending = false;
        s.store->poll_tier();
        after_change(self);
      },
      [=](close_batch_atom, std::uint64_t gen) {
        // Its own marker or timer only: one from outside (generations are
        // easy to guess) would close a batch early.
        if (sent_by_itself(self) && self->state.batcher.timer_current(gen))
          close_batch(self);
      },
      [=](batch_atom, const std::vector<kv_request>& reqs)
          -> caf::result<std::vector<kv_reply>> {
        for (const auto& r : reqs)
          if (auto bad = bad_priority(r.prio))
            return std::move(*bad);
        std::vector<kv_reply> out;
        out.reserve(reqs.size());
        std::vector<std::size_t> order(reqs.size());
        for (std::size_t i = 0; i < order.size(); ++i)
          order[i] = i;
        std::stable_sort(order.begin(), order.end(),
                         [&](std::size_t a, std::size_t b) {
                           return reqs[a].prio > reqs[b].prio;
                         });
        out.resize(reqs.size());
        // Computed ahead only when process() takes every request as far
        // as can be told here (the first it refuses fails the batch, and
        // the work would be thrown away); nothing waits off this call for
        // disk reads, and deadlines are not looked at.
        if (const auto spec = self->state.store->spec(self->state.ns);
            spec &&
            std::all_of(reqs.begin(), reqs.end(), [&](const kv_request& r) {
              return prefillable(r, **spec);
            })) {
          auto& state = self->state;
          state.prefill_reqs.clear();
          for (auto i : order)
            state.prefill_reqs.push_back(&reqs[i]);
          (void)prefill_for(state, 0, false);
        }
        // The pins its requests added: one that fails fails the batch, and
        // its caller, told only of that, holds none of them to unpin.
        std::vector<engine::block_key> pinned;
        for (auto i : order) {
          auto r = run_one(self->state, reqs[i]);
          if (r && reqs[i].pin)
            self->state.store->last_process_pins(pinned);
          if (!r) {
            for (const auto& k : pinned)
              (void)self->state.store->unpin(self->state.ns, k);
            finish_prefill(self->state);
            after_batch(self);
            // Say which: the error stands for the whole batch.
            return to_caf_error(error{
                r.error().code, "request " + std::to_string(reqs[i].id) +
                                    " of the batch: " + r.error().message});
          }
          out[i] = *r;
        }
        finish_prefill(self->state);
        after_batch(self);
        return out;
      },
      [=](lookup_atom, const key_vec& keys) -> caf::result<std::uint64_t> {
        auto& s = self->state;
        // What a request would match: memory, the memory tier, and the
        // disk tier (a request promotes those blocks), in one walk that
        // the store counts as one lookup of that many block hits.
        auto t = s.store->lookup_tiers(s.ns, keys);
        if (!t)
          return to_caf_error(t.error());
        return static_cast<std::uint64_t>(t->memory + t->tier + t->disk);
      },
      [=](reserve_atom, const put_request& p) -> caf::result<std::uint64_t> {
        auto& s = self->state;
        if (auto bad = bad_priority(p.prio))
          return std::move(*bad);
        if (s.retiring)
          return retiring_error();
        const auto now = self->clock().now();
        const auto deadline = put_deadline(p);
        if (now >= deadline) {
          ++s.puts_expired;
          return put_past_deadline("reserve");
        }
        engine::put_options opts;
        opts.prio = p.prio;
        opts.pin = p.pin;
        opts.request_tokens = p.request_tokens;
        auto h = s.store->reserve(s.ns, p.key, p.parent, opts);
        // Making room for it may have evicted blocks (and a parent only on
        // disk came back): the listeners hear of it now, not at the next
        // request or sweep.
        after_change(self);
        if (!h)
          return to_caf_error(h.error());
        // Its parent read back from disk may have taken the reserve past
        // the deadline: the caller has given up on the ticket.
        const auto reserved = self->clock().now();
        if (reserved >= deadline) {
          (void)s.store->abort(*h);
          ++s.puts_expired;
          return put_past_deadline("reserve");
        }
        auto ticket = s.next_ticket++;
        const auto timeout_at = now + s.config.put_timeout;
        s.puts.emplace(ticket, engine_state::open_put{std::move(*h), deadline,
                                                      timeout_at, false});
        s.put_deadlines.emplace(std::min(timeout_at, deadline), ticket);
        arm_put_expiry(self, reserved);
        return ticket;
      },
      [=](write_atom, std::uint64_t ticket,
          const std::vector<std::uint8_t>& value) -> caf::result<bool> {
        auto& s = self->state;
        auto it = s.puts.find(ticket);
        if (it == s.puts.end())
          return to_caf_error(
              error{errc::invalid_handle, "unknown put ticket"});
        if (const auto now = self->clock().now();
            it->second.ended || now >= it->second.deadline)
          return refuse_late_put(self, it, now, "write");
        return lift_void(
            s.store->write(it->second.handle, std::as_bytes(std::span{value})));
      },
      [=](commit_atom, std::uint64_t ticket) -> caf::result<bool> {
        auto& s = self->state;
        auto it = s.puts.find(ticket);
        if (it == s.puts.end())
          return to_caf_error(
              error{errc::invalid_handle, "unknown put ticket"});
        if (const auto now = self->clock().now();
            it->second.ended || now >= it->second.deadline)
          return refuse_late_put(self, it, now, "commit");
        if (s.retiring) {
          (void)s.store->abort(it->second.handle);
          s.puts.erase(it);
          return retiring_error();
        }
        auto r = s.store->commit(it->second.handle);
        // The put stays open after these two (its parent is not committed
        // yet; no value written yet): erasing the ticket would drop the
        // handle, which aborts the put and every put chained on it.
        if (r || (r.error().code != errc::busy &&
                  r.error().code != errc::not_written))
          s.puts.erase(it);
        if (r)
          after_change(self);
        return lift_void(r);
      },
      [=](abort_atom, std::uint64_t ticket) -> caf::result<bool> {
        auto& s = self->state;
        auto it = s.puts.find(ticket);
        if (it == s.puts.end())
          return true; // already committed, aborted or expired
        if (it->second.ended) {
          s.puts.erase(it); // aborted at its deadline already
          return true;
        }
        auto r = s.store->abort(it->second.handle);
        s.puts.erase(it);
        // A put whose parent was aborted went with it: already aborted.
        if (!r && r.error().code == errc::invalid_handle)
          return true;
        return lift_void(r);
      },
      [=](expire_puts_atom) {
        if (!sent_by_itself(self))
          return;
        auto& s = self->state;
        const auto now = self->clock().now();
        if (s.put_expiry_at && *s.put_expiry_at <= now)
          s.put_expiry_at.reset();
        while (!s.put_deadlines.empty() && s.put_deadlines.top().first <= now) {
          // Committed or aborted since: gone from `puts` already.
          auto it = s.puts.find(s.put_deadlines.top().second);
          s.put_deadlines.pop();
          if (it == s.puts.end())
            continue;
          if (it->second.ended) {
            if (now >= it->second.timeout_at)
              s.puts.erase(it); // its put_timeout: forgotten
            continue;
          }
          end_put(self, it, now); // at its deadline, or its put_timeout
        }
        arm_put_expiry(self, now);
      },
      [=](read_atom, const engine::block_key& key)
          -> caf::result<std::vector<std::uint8_t>> {
        auto& s = self->state;
        auto lease = s.store->acquire(s.ns, key);
        if (!lease)
          return to_caf_error(lease.error());
        auto spec = s.store->spec(s.ns);
        std::vector<std::uint8_t> out((*spec)->value_bytes());
        auto r = s.store->read(*lease, std::as_writable_bytes(std::span{out}));
        lease->release(); // so pressure relief may take the block
        // A read of a block only on disk brought it back (making room may
        // have evicted others); a checksum failure dropped it.
        after_change(self);
        if (!r)
          return to_caf_error(r.error());
        return out;
      },
      [=](evict_atom, std::uint64_t bytes) -> caf::result<std::uint64_t> {
        auto freed =
            self->state.store->evict_bytes(static_cast<std::size_t>(bytes));
        publish(self);
        return static_cast<std::uint64_t>(freed);
      },
      // A pin of a block only on disk brings it back, as a read does.
      [=](pin_atom, const engine::block_key& key) -> caf::result<bool> {
        if (self->state.retiring)
          return retiring_error();
        auto r = self->state.store->pin(self->state.ns, key);
        if (r)
          after_change(self);
        return lift_void(r);
      },
      [=](unpin_atom, const engine::block_key& key) -> caf::result<bool> {
        auto r = self->state.store->unpin(self->state.ns, key);
        if (r)
          after_change(self);
        return lift_void(r);
      },
      [=](stats_atom) -> caf::result<engine_stats> {
        auto& s = self->state;
        // The disk tier's answers to spills are otherwise collected at the
        // next request, put or eviction: an idle engine would go on
        // counting its last spills written (disk_spills) that failed.
        // Never waits.
        if (s.store->disk() != nullptr) {
          s.store->poll_disk();
          publish(self);
        }
        const auto& ss = s.store->stats();
        engine_stats out;
        out.engine = s.config.slot;
        out.in_flight = s.in_flight;
        out.expired = s.expired;
        out.puts_expired = s.puts_expired;
        out.disk_deferred = s.disk_deferred;
        out.held_blocks = s.store->held_blocks();
        out.requests = s.requests;
        out.batches = s.batches;
        out.prefill_calls = s.prefill->batch_calls();
        out.prefilled_blocks = s.prefill->prefilled_blocks();
        out.prefill_unused = s.prefill_unused;
        out.prefill_failures = s.prefill_failures;
        out.produced_alone = s.prefill->alone();
        out.blocks = s.store->block_count();
        out.used_bytes = s.store->used_bytes();
        out.capacity_bytes = s.store->capacity_bytes();
        out.pinned_bytes = s.store->pinned_bytes();
        out.pin_held_bytes = s.store->pin_held_bytes();
        out.pinned_bytes_limit = s.store->pinned_bytes_limit();
        out.token_hits = ss.token_hits;
        out.token_misses = ss.token_misses;
        out.block_hits = ss.block_hits;
        out.block_misses = ss.block_misses;
        out.evictions = ss.evictions;
        out.pressure_evictions = s.pressure_evictions;
        out.listeners = static_cast<std::uint32_t>(s.listeners.size());
        out.capacity_tokens = s.config.capacity_tokens;
        out.memory = std::string(s.store->memory_name());
        if (const auto* tier = s.store->tier())
          out.tier = std::string(tier->name());
        out.tier_blocks = s.store->tier_block_count();
        out.tier_demotions = ss.tier_demotions;
        out.tier_hits = ss.tier_block_hits;
        out.tier_in_flight_bytes = s.store->tier_bytes_in_flight();
        if (auto* disk = s.store->disk()) {
          out.disk = true;
          out.disk_blocks = disk->stats().blocks;
        }
        out.disk_hits = ss.disk_block_hits;
        out.disk_spills = ss.spills;
        out.disk_spill_failures = ss.spill_failures;
        return out;
      },
      [=](persist_atom, std::uint64_t timeout_ms)
          -> caf::result<std::uint64_t> { return persist(self, timeout_ms); },
      [=](persist_atom, std::uint64_t timeout_ms,
          bool retiring) -> caf::result<std::uint64_t> {
        // Set first: the balancer exits the engine whether or not its
        // blocks could be written. Only from a listener (its balancer is
        // one): a guard against a mistaken sender, which would make the
        // engine refuse every later put and pin for good while the
        // balancer still routes to it; not a permission check (any actor
        // may become a listener).
        if (retiring) {
          const auto& ls = self->state.listeners;
          const auto from = caf::actor_cast<caf::actor>(self->current_sender());
          if (!from || std::find(ls.begin(), ls.end(), from) == ls.end())
            return to_caf_error(
                error{errc::invalid_argument,
                      "persist with `retiring` from an actor that is not "
                      "this engine's listener (its balancer retires it): "
                      "refused, nothing written"});
          self->state.retiring = true;
        }
        return persist(self, timeout_ms);
      },
      [=](capacity_atom, std::uint32_t tokens) {
        auto& s = self->state;
        s.config.capacity_tokens = tokens;
        s.batcher.set_max_tokens(tokens);
        // A budget cut below what is queued makes a full batch: it closes
        // now, as it would have when its last request came (with
        // close_when_idle, at its marker, which is on its way).
        if (!s.batcher.config().close_when_idle && s.batcher.pending() > 0 &&
            s.batcher.full())
          close_batch(self);
      },
      [=](ready_atom) -> caf::result<bool> {
        // Read after the disk open above, like every message.
        return true;
      },
      [=](listen_atom, const caf::actor& listener) {
        auto& s = self->state;
        // Once each, never itself, until it goes (listeners.hpp).
        if (!add_listener(self, s.listeners, listener))
          return;
        arm_sweep(self);
        s.log->recording = true;
        // A listener that comes while the engine holds pins learns of them
        // now, not at the next change (the balancer retires no engine
        // holding any); with a disk tier it always hears (none, or those
        // recovered with their copies): the balancer counts a disk
        // engine's pins unknown until then.
        const std::uint64_t pinned = s.store->pinned_bytes();
        const std::uint64_t on_disk = pinned_on_disk(s);
        if (pinned > 0 || on_disk > 0 || s.store->disk() != nullptr) {
          block_events pins;
          pins.engine = s.config.slot;
          pins.seq = s.published;
          pins.pinned_bytes = pinned;
          pins.pinned_on_disk = on_disk;
          self->send(listener, std::move(pins));
        }
        // With a disk tier, the listener learns what the engine holds
        // there (at its start: what it recovered from its directory), and
        // from now on what leaves it: at most snapshot_keys of the keys,
        // in chunks, the first one now.
        if (auto* disk = s.store->disk()) {
          disk->record_removals(true);
          auto keys = disk->keys();
          const auto most =
              s.config.snapshot_keys.value_or(default_snapshot_keys);
          if (keys.size() > most)
            keys.resize(most);
          if (keys.empty())
            return;
          s.snapshots.push_back({listener, std::move(keys)});
          if (s.snapshots.size() == 1) // else a chunk is on its way
            send_snapshot_chunk(self);
        }
      },
      [=](listen_atom) {
        if (sent_by_itself(self)) // the chunk pump, its own
          send_snapshot_chunk(self);
      },
  };
}

} // namespace

result<void> validate(const engine_actor_config& config) {
  const auto bad = [](const std::string& what) -> result<void> {
    return make_error(errc::invalid_argument, "engine_actor_config." + what);
  };
  if (config.batch.max_size == 0)
    return bad("batch.max_size must be at least 1 (1 runs each request "
               "alone)");
  if (auto ok = check_duration("engine_actor_config.batch.timeout",
                               config.batch.timeout);
      !ok)
    return ok;
  if (auto ok =
          check_duration("engine_actor_config.put_timeout", config.put_timeout);
      !ok)
    return ok;
  if (auto ok = check_duration("engine_actor_config.tier_poll_interval",
                               config.tier_poll_interval);
      !ok)
    return ok;
  if (auto ok = check_duration("engine_actor_config.disk_poll_interval",
                               config.disk_poll_interval);
      !ok)
    return ok;
  if (auto ok = check_duration("engine_actor_config.expire_interval",
                               config.expire_interval);
      !ok)
    return ok;
  // Written so that NaN fails the check.
  const auto& p = config.pressure;
  if (!(p.target > 0.0 && p.target <= p.threshold && p.threshold <= 1.0))
    return bad("pressure must satisfy 0 < target <= threshold <= 1, not "
               "target " +
               std::to_string(p.target) + " and threshold " +
               std::to_string(p.threshold));
  // Pinned blocks are what the rule cannot evict: pins allowed up to the
  // target could keep the pool over the threshold by themselves, and each
  // batch would then evict every unpinned block.
  if (!config.relieve && !(config.store.max_pinned_fraction < p.target))
    return bad("store.max_pinned_fraction (" +
               std::to_string(config.store.max_pinned_fraction) +
               ") must be below pressure.target (" + std::to_string(p.target) +
               "): pressure relief cannot evict pinned blocks, so pins up to "
               "the target would make it evict every unpinned block after "
               "each batch; lower the one or raise the other");
  if (config.make_disk && config.own_thread == false)
    return bad("own_thread must not be false with make_disk: the engine "
               "waits for its disk inside a request (and a persist), which "
               "would hold a scheduler worker");
  return {};
}

result<caf::actor> spawn_engine_actor(caf::actor_system& sys,
                                      const engine_actor_config& config,
                                      store_open open) {
  if (auto ok = validate(config); !ok)
    return unexpected<error>{ok.error()};
  auto parts = std::make_shared<engine_parts>();
  parts->config = config;
  parts->log = std::make_shared<event_log>();
  if (open == store_open::before_spawn) {
    if (auto ok = open_store(*parts); !ok)
      return unexpected<error>{ok.error()};
  }
  // Device memory or a disk tier: the engine waits for them inside a
  // request. Opened on the engine, its first act makes the whole store: a
  // host arena of GiBs is prefaulted for seconds, a device's allocated
  // (make_backend's memory is not known yet), so it runs on a thread of
  // its own then too, whatever its memory, or it would hold a scheduler
  // worker (and the balancer or scaler queued behind it) that long.
  const bool waits = config.make_disk != nullptr ||
                     open == store_open::on_engine ||
                     !parts->store->host_addressable();
  // CAF throws when it cannot make a detached actor's thread
  // (std::system_error) or allocate the actor: error values here, so
  // node::start stops the engines it started, and the balancer counts a
  // failed start.
  try {
    if (config.own_thread.value_or(waits))
      return sys.spawn<caf::detached>(engine_behavior, std::move(parts));
    return sys.spawn(engine_behavior, std::move(parts));
  } catch (const std::bad_alloc&) {
    return make_error(errc::out_of_memory,
                      "no host memory to spawn the engine actor of slot " +
                          std::to_string(config.slot));
  } catch (const std::system_error& ex) {
    return make_error(
        errc::unavailable,
        "cannot start the thread of the engine actor of slot " +
            std::to_string(config.slot) + ": " + ex.what() +
            " (CAF keeps counting the actor it could not start, so the actor "
            "system may not shut down cleanly after this: free threads or "
            "memory, then restart the process)");
  }
}

std::function<result<std::unique_ptr<engine::disk_tier>>(std::uint32_t slot)>
disk_tier_per_engine(engine::disk_tier_config config) {
  return [config = std::move(config)](
             std::uint32_t slot) -> result<std::unique_ptr<engine::disk_tier>> {
    if (config.directory.empty())
      return make_error(errc::invalid_argument,
                        "disk_tier_per_engine: the disk tier's directory is "
                        "empty");
    auto cfg = config;
    cfg.directory = config.directory + "/engine-" + std::to_string(slot);
    std::error_code ec;
    std::filesystem::create_directory(cfg.directory, ec);
    if (ec) {
      // The error_code overload: the other throws where the path cannot
      // even be examined (a name too long, a parent without permission),
      // and this call promises error values.
      std::error_code parent_ec;
      const bool parent_ok =
          std::filesystem::is_directory(config.directory, parent_ec);
      return make_error(errc::io_error,
                        "disk_tier_per_engine: cannot create " + cfg.directory +
                            ": " + ec.message() +
                            (parent_ok
                                 ? std::string{}
                                 : " (" + config.directory +
                                       " must be an existing directory)"));
    }
    return engine::disk_tier::open(std::move(cfg));
  };
}

} // namespace kvfleet::actors
