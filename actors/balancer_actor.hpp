#pragma once
/// The load-balancer actor, which is also the engines' supervisor.
///
/// It spawns the engine actors through `make_engine`, monitors them and
/// routes each request with a `router` (router.hpp: round robin, least
/// loaded by in-flight count / capacity weight (started_engine::weight, set
/// by the factory), or kv-aware with a prefix index fed by the engines'
/// block events and by their replies: a reply puts the request's keys in
/// the index as its engine's before the caller sees it (all but the
/// uncached ones, its last), so the caller's next request of the same
/// prompt finds them even while the engine's events are still on their
/// way; not when events the engine published after the reply were applied
/// first (kv_reply::events_published), which say what became of them).
///
/// Messages:
///   (process_atom, kv_request)   -> kv_reply, or an error:
///       request_timeout when the engine does not answer within
///       `request_timeout`; errc::unavailable "no engine available" when none
///       is live. A request whose engine died before answering is retried once
///       on another engine, with request_timeout counted again from the
///       retry: a caller whose engine died just before the deadline may wait
///       up to about twice request_timeout (size its own limits for that).
///       Timeouts are the balancer's own: requests wait in
///       dispatch order with one timer for the oldest (not one CAF timer per
///       request, which cost about a third of the throughput), so each still
///       times out at its deadline; a reply after it is dropped (one the
///       engine sent before it, queued behind the timer while the balancer
///       was busy, still answers its caller). The
///       engine's copy carries that deadline (kv_request::deadline_ns), or
///       the request's own when that comes first (a pinning node call's):
///       an engine that comes to the request at or after it answers it
///       unprocessed (engine_stats::expired), so work nobody waits for (a
///       prefetch or warm query queued behind served traffic) is not done,
///       nor its blocks pinned, after its caller was told it timed out; one
///       the engine had begun before is finished, and if it pins, its new
///       pins are taken back and it is answered errc::timeout too. An
///       engine's errc::timeout at or after the earlier of the two
///       deadlines is a timeout like the timer's, counted once. A request
///       timed out still counts in its engine's load until the engine
///       answers it (or is gone): least-loaded and kv-aware routing do not
///       take a stuck engine for an idle one. A retiring engine does not
///       wait for such requests: it exits once those still awaited are
///       answered.
///       Every request is answered: a request the balancer still holds when
///       it stops gets request_receiver_down, as does one sent after. So a
///       caller needs no CAF timeout of its own, and is faster without one
///       (each wakes CAF's clock thread; kvfleet-actors-bench measures both).
///   (lookup_atom, vector<block_key>) -> uint64  asks the live engine the
///       index names for the longest prefix (the lowest live slot when the
///       index knows nothing; a retiring engine only when none is live).
///       Timed like a process request: request_timeout when the engine does
///       not answer within `request_timeout` (a reply after it is dropped),
///       request_receiver_down when the balancer stops first, so a caller
///       needs no CAF timeout of its own here either; the engine's own
///       error otherwise; one whose engine is gone (request_receiver_down)
///       is asked once of another engine, as a process request is
///       rerouted. A lookup counts in no engine's load and
///       tells the listeners nothing, not even its timeout. (Before, it was
///       delegated to the engine and waited as long as the engine did.)
///   (engine_atom, uint32 slot)   -> actor  the live engine of a slot;
///       errc::not_found when the slot has no engine or its engine is still
///       opening its store (a restart or a new replica: what was sent to it
///       waited for its open, past the caller's timeout; before, it was
///       answered), errc::unavailable
///       when its engine is being retired: it exits once its requests are
///       answered, and a block put or pinned there would go with it
///   (engine_atom, uint32 slot, bool retiring_too) -> actor  the same, but
///       with retiring_too a retiring engine too, until it has exited (to
///       read its blocks, or persist them)
///   (replica_atom)               -> uint32 live engines after adding one
///       (in the slot of a retired or given-up engine when there is one);
///       errc::unavailable when all router::max_slots (64) slots are in use;
///       the factory's error when the replica does not start (its slot is
///       free again, and no retry comes later; one that fails in a free
///       slot whose last start failed too is tried once more in another
///       slot first). A replica that makes its store itself
///       (started_engine::opening) is answered once it is ready, or with
///       its open's error (after the same one retry elsewhere); the
///       balancer goes on routing meanwhile.
///   (retire_atom)                -> uint32 live engines after draining one
///       (a live one: not opening, nor found gone by a failed request; the
///       highest slot whose engine holds no pinned blocks, in memory or on
///       its disk, as its latest block_events (or a pinning request's
///       reply) said (an engine with a disk tier that has sent none yet
///       counts as holding some), and works on no pinning request; with pins on
///       every one, the engine with a disk tier holding the fewest pinned
///       bytes, which persists them for the next engine in its slot; with none,
///       errc::busy and nothing retired: the pins would go with it): it takes
///       no new requests and exits once its requests are answered; its slot is
///       then free for the next replica. An engine with a disk tier
///       (started_engine::disk) is first asked persist_atom, so a later engine
///       in its slot recovers the blocks it held in memory: it gets
///       `retire_persist_timeout` for its disk, the balancer waits for its
///       answer (a response handler, never blocking) at most that plus
///       `request_timeout`, and tells it to exit on the answer, an error (one
///       line on stderr: what was only in its memory is lost) or the timeout.
///       Its slot stays taken until it has exited, so the next engine there
///       never finds the directory locked.
///   (capacity_atom, uint32 tokens)  forwarded to every engine (no reply),
///       and remembered: every engine spawned or restarted later gets it
///       before any request
///   (stats_atom)                 -> balancer_stats (messages.hpp says
///       what a free slot reads)
///   (listen_atom, actor)         (no reply; once per listener, which is
///       forgotten when it stops) the listener gets
///       (observe_atom, kv_request, kv_reply, int64 latency_ns) after each
///       answered request, (latency_atom, kv_request, int64 latency_ns)
///       after each request that timed out (how long it waited since the
///       balancer received it), and the block_events of each slot's current
///       engine (those of any other sender are dropped); when an
///       engine stops (fails, or retires), one block_events of its slot
///       evicting every key the prefix index gave it, since its store
///       went with it without reporting any eviction
/// Anything else gets sec::unexpected_message back.
///
/// Supervision: an engine that fails (down_msg) is marked down at once (the
/// router skips it and forgets its index entries) and respawned after
/// `restart_delay`, with nothing in memory (an engine with a disk tier
/// recovers what its directory holds); it rejoins the rotation when the new
/// actor is up (started_engine::opening: when it answered ready_atom, its
/// store made off the balancer's thread).
/// A slot's engine is restarted at most `max_restarts` times in a row, and
/// a start whose factory fails (the first start of a slot included) is
/// retried after `restart_delay` as one of those restarts: a slot gets at
/// most max_restarts + 1 factory calls in a row. An engine that then runs
/// for `restart_window` (from the time it took requests) before it fails
/// starts the count again, so an engine that fails once a day is not given
/// up after max_restarts days (0: never, the count is for the slot's
/// life). When its engine fails (stops, or its start fails) with no
/// restarts left it is given up (one line on stderr): the slot is freed
/// like a retired engine's, so the next replica takes it, and stats count
/// it in `given_up`, no longer as a slot in use.

#include "actors/router.hpp"

#include <chrono>
#include <cstdint>
#include <functional>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

namespace kvfleet::actors {

struct balancer_config {
  router_config routing{};
  std::chrono::milliseconds request_timeout{5'000};
  std::chrono::milliseconds restart_delay{100};
  /// Restarts per slot in a row, failed starts included; then the slot is
  /// given up.
  std::uint32_t max_restarts = 100;
  /// An engine that ran this long before it failed starts its slot's
  /// restart count again (0: the count is never reset).
  std::chrono::milliseconds restart_window{600'000};
  /// How long a retired engine with a disk tier may take to persist its
  /// cached blocks before it exits (persist_atom's timeout; the balancer
  /// waits at most this plus request_timeout for the answer).
  std::chrono::milliseconds retire_persist_timeout{30'000};
  std::uint32_t initial_engines = 1;
};

/// An engine an engine_factory started.
struct started_engine {
  caf::actor actor;
  /// The engine still makes its store (memory arena, tiers, disk tier)
  /// itself (spawn_engine_actor with store_open::on_engine). The
  /// balancer then asks it ready_atom and routes nothing to its slot until
  /// it answers (least_loaded would pick the idle newcomer first, and each
  /// request would wait there for the whole open); a replica_atom is
  /// answered then too. An engine that stops before it answers (its open
  /// failed: the error is its exit reason) is a start that failed, with
  /// that error. One stopped from outside before it answers (killed, an
  /// exception: an exit reason that is no kvfleet error) is a failed start
  /// too, said as such: the replica's error (errc::unavailable) and the
  /// give-up line say it stopped while opening, with its exit reason.
  /// False: it takes requests at once, and costs no extra message.
  bool opening = false;
  /// The engine has a disk tier (engine_actor_config::make_disk): retired,
  /// it persists its cached blocks before it exits (retire_atom above).
  /// False: it is told to exit once drained, with no extra message.
  bool disk = false;
  /// Its capacity weight: least_loaded and kv_aware score it by its
  /// in-flight count divided by this (router.hpp), so an engine of weight 2
  /// takes twice the requests of one of weight 1 before it counts as
  /// equally loaded. Set for each start (a restart may give another). One
  /// that is not finite and > 0 is a failed start with
  /// errc::invalid_argument; the engine is told to exit.
  double weight = 1.0;
};

/// `engine` as a started_engine that takes requests at once, or its error.
[[nodiscard]] result<started_engine> started_now(result<caf::actor> engine);

/// Spawns the engine of `slot` (fresh: nothing in memory; with a disk tier,
/// engine_actor_config::make_disk, it reopens the slot's directory). An
/// exception it throws is a failed start like an error it returns
/// (errc::out_of_memory for bad_alloc, else errc::backend_error naming the
/// slot and what() ), not the balancer's end.
using engine_factory = std::function<result<started_engine>(
    caf::actor_system&, std::uint32_t slot)>;

/// errc::invalid_argument naming the option when `config` makes no sense:
/// what validate(config.routing) rejects, a request_timeout that is not
/// positive, a negative restart_delay, a retire_persist_timeout that is not
/// positive, any of them above 24 hours
/// (max_config_duration, config_checks.hpp), or more initial_engines than
/// router::max_slots.
[[nodiscard]] result<void> validate(const balancer_config& config);

/// Spawns the balancer, which spawns `config.initial_engines` engines.
/// Errors: validate(config)'s; nothing is spawned then.
[[nodiscard]] result<caf::actor> spawn_balancer(caf::actor_system& sys,
                                                balancer_config config,
                                                engine_factory make_engine);

} // namespace kvfleet::actors
