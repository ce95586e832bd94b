#pragma once
/// kvfleet::node: the actor layer composed in one process, and the
/// in-process API a host application uses.
///
/// A node spawns, on the caller's actor system: `engines` engine actors
/// (one per GPU with `engine.make_backend` = cuda::device_backend_per_engine,
/// else one per CPU shard on host memory), the balancer that
/// routes to and supervises them, the warmer, and, when enabled, the
/// query-result cache, the scaler and the prefetcher.
///
/// Calls block the calling thread until the answer arrives (or
/// `call_timeout` passes: errc::timeout; a call made of several requests,
/// such as put_block's find-engine, reserve, write and commit, has
/// `call_timeout` for all of them together), so call them from host threads,
/// never from inside an actor; CAF programs message `balancer()` instead.
/// Thread safety: every call may be made from any thread concurrently.
/// Each call borrows one of the node's blocking actors (a caf::scoped_actor
/// serves one thread at a time) and gives it back; making one per call cost
/// about a fifth of a call from a host thread (kvfleet-actors-bench). A
/// mutex guards only the list of idle ones, held to take or return one; it
/// keeps at most as many as requests were on their way at once (persist
/// asks every engine at once, each from an actor of its own, so that no
/// engine's answer draws out the wait for another's). A call that times
/// out discards its actor, so its late reply goes nowhere. Two more mutexes:
/// one guards the list of engines the balancer started (its thread adds,
/// stop() reads), one lets one stop() run at a time. A node holds actors
/// of its actor system: destroy it before the system.

#include "actors/balancer_actor.hpp"
#include "actors/engine_actor.hpp"
#include "actors/messages.hpp"
#include "actors/prefetch_actor.hpp"
#include "actors/query_cache_actor.hpp"
#include "actors/scaler_actor.hpp"
#include "actors/warmer_actor.hpp"
#include "engine/result.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

namespace kvfleet {

class node_askers;
class node_engines;

struct node_config {
  std::uint32_t engines = 2;
  /// Every engine's; slot is set per engine, and snapshot_keys, when
  /// unset, to each engine's share of the router's index out of the most
  /// engines the node runs at once: balancer.routing.max_index_keys /
  /// scaler->policy.max_replicas with a scaler, else / engines; an engine
  /// in a slot at or past that count (a replica asked of the balancer
  /// directly) gets 0. The snapshots of all engines then fit the index.
  actors::engine_actor_config engine{};
  actors::balancer_config balancer{}; ///< initial_engines is set from `engines`
  actors::warmer_config warmer{};
  bool query_cache = true;
  /// `cache.redis_url` empty: embedded store; else the Redis backend,
  /// whose keys are `cache.redis.key_prefix` + query_key_scope(engine.ns)
  /// + the query: nodes of one model share results, nodes of another do
  /// not. `cache.block_tokens` is set to `engine.ns.block_tokens`.
  actors::query_cache_config cache{};
  std::optional<actors::scaler_actor_config> scaler; ///< off by default
  std::optional<actors::prefetch_config> prefetch;   ///< off by default
  std::chrono::milliseconds call_timeout{30'000};
};

/// errc::invalid_argument naming the option when `config` breaks an
/// invariant: engines 0 or above router::max_slots (64), a call_timeout
/// that is not positive or is above 24 hours, what validate() rejects in
/// the engine, balancer
/// or warmer configuration, with the scaler
/// on more engines than its max_replicas or an `engine.capacity_tokens`
/// outside the scaler's
/// [min_capacity_tokens, max_capacity_tokens] (engines start with it and
/// the scaler counts from it, so both must agree; it is rejected rather
/// than clamped so the configured budget is the one engines run with), or
/// what validate() rejects in the routing, scaler or (when on) query-cache
/// or prefetch configuration.
[[nodiscard]] result<void> validate(const node_config& config);

/// What a node puts after the Redis key prefix: the namespace's
/// fingerprint in 32 hex digits and a colon ("<hi><lo>:"), so the same
/// query string under another model (another prompt) is another key.
[[nodiscard]] std::string query_key_scope(const engine::namespace_spec& ns);

class node {
public:
  /// Registers kvfleet's message types and sets the scheduler for `threads`
  /// worker threads (scheduler.policy=sharing, max-threads). Call on the
  /// config before creating the actor system.
  static void configure(caf::actor_system_config& cfg, std::size_t threads);

  /// Spawns the node's actors. Every one of the `engines` initial engines
  /// starts on the caller's thread, one after the other (an engine with a
  /// disk tier opens and recovers its directory here). Errors:
  /// validate(config)'s, then the query-cache store's (bad
  /// `cache.redis_url`: errc::parse_error; no engine has started then, so
  /// no disk directory was opened), then the first engine that does not
  /// start, with its error's code and a message naming it ("engine 1 did
  /// not start: ..."; bad capacity or namespace, its disk tier's: a
  /// directory missing, locked by another engine (errc::busy) or bad, the
  /// error names it). The engines started before it are then stopped and
  /// waited for (at most `call_timeout`), so a start retried on the same
  /// directories finds them free. An unreachable Redis is not an error
  /// here: the store connects on its first call. Engines started later
  /// (the balancer's restarts, the scaler's replicas) make their stores
  /// (memory arena, tiers, disk tier) themselves, on threads of their own
  /// (store_open::on_engine), not on the balancer's thread nor on a
  /// scheduler worker: the balancer
  /// routes to the other engines meanwhile, and one whose store is not
  /// made is a failed start with that error (balancer_actor.hpp,
  /// started_engine).
  [[nodiscard]] static result<std::unique_ptr<node>>
  start(caf::actor_system& sys, node_config config);
  ~node();
  node(const node&) = delete;
  node& operator=(const node&) = delete;

  /// Processes one request: through the query-result cache when it is on
  /// and the request has a query key, else straight to the balancer.
  [[nodiscard]] result<actors::kv_reply>
  process_request(const actors::kv_request& req);
  /// Longest cached prefix of `keys` on the engine the index points at
  /// (blocks on its disk tier included: a request would match them too).
  [[nodiscard]] result<std::uint64_t>
  lookup(const std::vector<engine::block_key>& keys);
  /// Two-phase put of one block on engine `slot`: reserve, write, commit.
  /// Each message goes in the mailbox category of `put.prio`
  /// (prioritized.hpp: high and critical as urgent), as process_request's
  /// request does; get_block, pin and unpin carry no priority and go as
  /// normal ones. Its parent must be cached on the engine: in its memory, its
  /// memory tier or its disk tier (brought back into memory for it). The
  /// put carries this call's deadline (put_request::deadline_ns, or the
  /// caller's own when that is sooner), a tenth of call_timeout (at most
  /// 50 ms) before the call stops waiting, as a pinning process_request
  /// does: the engine refuses a reserve, write or commit that reaches it
  /// later, and aborts the put then if it is still open, so a call that
  /// timed out does not leave its key busy. A commit the engine took just
  /// before that deadline whose reply is later than the margin still takes
  /// effect (a retry then finds the block cached).
  [[nodiscard]] result<void> put_block(std::uint32_t slot,
                                       const actors::put_request& put,
                                       const std::vector<std::uint8_t>& value);
  /// The decoded value of a block on engine `slot`, in its memory, memory
  /// tier or disk tier (a block only on disk is brought back into memory,
  /// as pin() brings it back; the engine waits for the read). Its checksum
  /// is verified: a damaged block is errc::checksum_mismatch, and dropped.
  [[nodiscard]] result<std::vector<std::uint8_t>>
  get_block(std::uint32_t slot, const engine::block_key& key);
  /// put_block and pin refuse a slot whose engine is being retired
  /// (errc::unavailable): it exits once its requests are answered, and the
  /// block would go with it. get_block, unpin and engine_stats reach it
  /// until it has exited. A slot whose engine is still opening its store (a
  /// restart or a new replica) has no live engine yet: errc::not_found for
  /// every block call, as for a free slot. A pin or unpin that times out
  /// (errc::timeout) may still take effect at the engine when it gets to it,
  /// and pins nest: a retried pin may hold two. Nothing undoes it behind the
  /// caller's back (an unpin for a pin that never landed could take another
  /// holder's): a caller that retried a timed-out pin unpins once more when it
  /// is done (an unpin too many answers errc::invalid_argument, "not pinned").
  /// The same holds for warm() with pin, whose timed-out queries count failed,
  /// for a query its engine had begun when the balancer timed it out (one
  /// still queued then is not processed: engine_stats::expired).
  [[nodiscard]] result<void> pin(std::uint32_t slot,
                                 const engine::block_key& key);
  [[nodiscard]] result<void> unpin(std::uint32_t slot,
                                   const engine::block_key& key);
  /// Warms the top `top_n` queries by expected frequency (see warmer_actor:
  /// top_n 0, errc::invalid_argument; an item of a negative or infinite
  /// frequency is malformed).
  [[nodiscard]] result<actors::warm_report>
  warm(const std::vector<actors::warm_item>& items, std::uint32_t top_n = 100,
       bool pin = false);
  /// What warm() reports after each request it sent is answered: how many
  /// are (`done`) of how many it sent or will send (`total`: one per chain
  /// of selected queries, one more for each shorter query sent after a
  /// longer one of its chain failed).
  using warm_progress =
      std::function<void(std::uint64_t done, std::uint64_t total)>;
  /// warm() that calls `on_progress` on the calling thread, in order, once
  /// per answered query, before it returns (a null `on_progress`: as
  /// warm()). A warm that takes longer than `call_timeout` returns
  /// errc::timeout and reports no more progress; the warmer goes on with
  /// the job. An exception `on_progress` throws leaves warm() as it is (the
  /// warmer goes on with the job then too).
  [[nodiscard]] result<actors::warm_report>
  warm(const std::vector<actors::warm_item>& items, std::uint32_t top_n,
       bool pin, const warm_progress& on_progress);
  [[nodiscard]] result<actors::balancer_stats> stats();
  [[nodiscard]] result<actors::engine_stats> engine_stats(std::uint32_t slot);

  /// Writes every engine's cached blocks (memory and memory tier) to
  /// its disk tier and waits for them, all engines at once, each at most
  /// `timeout` (finding the engines takes at most `call_timeout`, the wait
  /// for their answers at most `timeout` plus `call_timeout`, however many
  /// engines): a clean shutdown, so that a node
  /// started later on the same directories
  /// (`engine.make_disk` = actors::disk_tier_per_engine(...)) serves them.
  /// Returns how many cached blocks the disk tiers hold then, all engines
  /// together. A draining engine (retired by the scaler, still answering
  /// its last requests) is persisted like a live one; slots with no live
  /// engine at the call (waiting for a restart, free, or its engine still
  /// opening its store) hold nothing in memory and are skipped. An engine that
  /// stops before it answers (one that failed, or finished draining) counts as
  /// failed: what it held in memory is gone. An engine that fails does not stop
  /// the others: each is asked. Errors: errc::invalid_argument for a
  /// timeout that is not positive or is above 24 hours, or when the
  /// engines have no disk tier; else the first failed engine's error
  /// (errc::io_error when its disk did not finish in time), its message
  /// naming that engine, how many failed and the blocks the others hold.
  /// An engine serves nothing else while it persists (its requests wait,
  /// and may time out at the balancer): call it at shutdown, not under load.
  [[nodiscard]] result<std::uint64_t>
  persist(std::chrono::milliseconds timeout = std::chrono::seconds(60));
  /// Stops the node's actors and waits, at most `timeout`, until the
  /// balancer has stopped and then every engine it started (restarted
  /// ones, replicas and draining ones included: it may start one until it
  /// is gone), so that what they held (device memory, disk directories) is
  /// free when it returns: a node started on the same disk directories
  /// right after it opens them instead of finding them locked. Calls after
  /// it fail with errc::invalid_argument ("actor not running"); a call on
  /// another thread while it runs is answered, or fails so or as a call to
  /// a stopped actor (errc::unavailable). Stopping again returns at once
  /// when everything has stopped, and after a stop() that timed out waits
  /// again for what is still running (a second stop() on another thread
  /// runs after the first). The actor accessors below then name stopped
  /// actors. Errors:
  /// errc::invalid_argument for a timeout that is not positive or is above
  /// 24 hours; errc::timeout when the balancer or engines were still
  /// running at the deadline (they stop later). The destructor stops the
  /// node without waiting.
  [[nodiscard]] result<void>
  stop(std::chrono::milliseconds timeout = std::chrono::seconds(60));

  [[nodiscard]] const caf::actor& balancer() const noexcept {
    return balancer_;
  }
  [[nodiscard]] const caf::actor& query_cache() const noexcept {
    return cache_;
  }
  [[nodiscard]] const caf::actor& scaler() const noexcept { return scaler_; }
  [[nodiscard]] const caf::actor& prefetcher() const noexcept {
    return prefetcher_;
  }
  [[nodiscard]] const caf::actor& warmer() const noexcept { return warmer_; }

private:
  node(caf::actor_system& sys, node_config config);
  /// The engine of `slot`, asked of the balancer in the mailbox category of
  /// `prio` (the call's, where it has one). A retiring engine only when
  /// `retiring_too` (to read, unpin, or persist: not to put or pin a block,
  /// which would go with it; errc::unavailable then).
  [[nodiscard]] result<caf::actor>
  engine_at(std::uint32_t slot, std::chrono::milliseconds timeout,
            bool retiring_too,
            engine::priority prio = engine::priority::normal);
  /// The deadline a call starting now gives what it sends that must not
  /// take effect after the call stops waiting (a pinning request, a put):
  /// a tenth of call_timeout (at most 50 ms) before that, for the reply's
  /// way back; `own` (nanoseconds on the actor clock, 0: none) when sooner.
  [[nodiscard]] std::int64_t call_deadline_ns(std::int64_t own) const;
  /// `a`, or a null actor once stop() began (calls then fail with "actor
  /// not running").
  [[nodiscard]] const caf::actor& running(const caf::actor& a) const noexcept;

  caf::actor_system* sys_;
  node_config config_;
  std::unique_ptr<node_askers> askers_; ///< the calls' blocking actors
  /// Every engine the balancer started, for stop() to wait for.
  std::shared_ptr<node_engines> engines_;
  std::atomic<bool> stopped_{false};
  std::mutex stop_mutex_; ///< one stop() at a time
  caf::actor balancer_;
  caf::actor cache_;
  caf::actor scaler_;
  caf::actor prefetcher_;
  caf::actor warmer_;
};

} // namespace kvfleet
