#include "actors/balancer_actor.hpp"

#include "actors/caf_error.hpp"
#include "actors/config_checks.hpp"
#include "actors/listeners.hpp"
#include "actors/messages.hpp"
#include "actors/owed_reply.hpp"
#include "actors/prioritized.hpp"
#include "actors/stray_messages.hpp"
#include "engine/host_error.hpp"

#include <algorithm>
#include <cstdio>
#include <deque>
#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/response_promise.hpp>
#include <caf/send.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/system_messages.hpp>

namespace kvfleet::actors {
namespace {

/// Why an engine was started: what a start that fails is called, and
/// what follows it.
enum class start_kind : std::uint8_t { initial, restart, replica };

struct slot_info {
  caf::actor engine;
  std::uint64_t generation = 0; ///< bumps at every (re)start
  std::uint64_t routed = 0;
  /// Restarts in a row (restart_or_give_up).
  std::uint32_t restarts = 0;
  /// When its engine began taking requests (now_ns), or -1 while it has
  /// none that does: how long it ran before it failed.
  std::int64_t up_since_ns = -1;
  bool retiring = false;
  bool retired = false;
  /// Its engine failed after max_restarts restarts: like a retired slot,
  /// free for the next replica.
  bool given_up = false;
  /// Given up, or its replica failed to start: its device or directory may
  /// be broken, so a replica that fails in it is tried once more elsewhere
  /// (add_engine). Cleared by a start that succeeds.
  bool suspect = false;
  /// balancer_state::starts when its engine was last asked for (0: never):
  /// of the free slots whose last start failed, the one tried longest ago
  /// goes first (choose_slot).
  std::uint64_t last_start = 0;
  /// Its engine is a replica opening its store in a slot that was suspect:
  /// should the open fail too, the replica is tried once more in another
  /// slot (open_failed), as one whose factory fails there is (add_engine).
  bool retry_elsewhere = false;
  /// Its engine makes its store (started_engine::opening) and has not
  /// answered ready_atom yet: the slot stays down.
  bool opening = false;
  /// Its engine has a disk tier (started_engine::disk): retired, it
  /// persists before it exits.
  bool disk = false;
  /// Its retired engine was asked persist_atom and has not answered yet.
  bool persisting = false;
  start_kind kind = start_kind::initial; ///< of the engine's start
  /// block_events::seq of the last events of its engine applied to the
  /// index (0 at its start).
  std::uint64_t events_applied = 0;
  /// Its engine's pinned bytes, as its last block_events or a pinning
  /// request's reply said, and its blocks whose disk copy holds pins (0 at
  /// its start and once it is gone).
  std::uint64_t pinned_bytes = 0;
  std::uint64_t pinned_on_disk = 0;
  /// Its engine has told what pins it holds: at once for one without a
  /// disk tier (it starts with none), at its first block_events for one
  /// with (it may recover pinned copies; it tells a new listener at once).
  bool pins_known = false;
  [[nodiscard]] bool holds_pins() const noexcept {
    return !pins_known || pinned_bytes > 0 || pinned_on_disk > 0;
  }
  /// The replica_atom that started it, while it opens.
  owed_reply replica;
};

/// A request forwarded to an engine and not yet answered: a process call,
/// or a lookup (`request` null). Calls are kept in dispatch order; every
/// call gets the same timeout, so their deadlines are in that order too and
/// one timer (for the oldest open call) serves them all, instead of one CAF
/// timer per request. A lookup counts in no engine's load (routing weighs
/// process calls only) and its timeout tells the listeners nothing (it is
/// no request of the served traffic the scaler samples).
struct open_call {
  std::int64_t deadline_ns = 0;
  owed_reply promise; ///< answers request_receiver_down if the balancer stops
  std::uint32_t slot = 0;
  std::uint64_t generation = 0;
  bool open = true;
  /// The request (shared with the reply handlers) and when the balancer
  /// first received it: a timeout tells the listeners how long it waited.
  /// Null for a lookup.
  std::shared_ptr<const kv_request> request;
  std::int64_t started = 0;
};

struct balancer_state {
  balancer_config config;
  engine_factory make_engine;
  router route;
  std::vector<slot_info> slots;
  std::vector<caf::actor> listeners;
  std::shared_ptr<std::vector<caf::actor>> owned =
      std::make_shared<std::vector<caf::actor>>(); ///< engines to stop at exit
  std::uint64_t timeouts = 0;
  std::uint64_t rerouted = 0;
  std::uint64_t restarts = 0;
  std::uint64_t rejected = 0;
  std::uint64_t given_up = 0;
  std::uint64_t starts = 0; ///< engine starts asked of the factory
  /// `starts` of the start in the last slot a replica's retry added that
  /// failed or still opens (0: none yet): a new slot's turn among the
  /// failed free slots (choose_slot).
  std::uint64_t last_growth = 0;
  /// The slot a replica's retry added last, while its start is not known
  /// to have succeeded, and last_growth before it: while it opens it
  /// counts as tried (last_growth is its start), so replicas retried
  /// meanwhile add no slot of their own; a start that works puts back
  /// `growth_before`.
  std::optional<std::uint32_t> growth_slot;
  std::uint64_t growth_before = 0;
  /// The last capacity_atom's token budget: engines spawned or restarted
  /// after it get it too. Empty: the factory's own.
  std::optional<std::uint32_t> capacity_tokens;
  std::deque<open_call> calls;
  std::uint64_t first_call = 0; ///< sequence number of calls.front()
  /// Calls that timed out while their engine still works on them, by
  /// sequence number: each keeps its engine's load (slot, generation) until
  /// the engine answers or is gone, so a stuck engine does not read as idle.
  std::unordered_map<std::uint64_t, std::pair<std::uint32_t, std::uint64_t>>
      late;
  bool sweep_pending = false; ///< a sweep_atom is on its way
  /// The sweep on its way times out calls whose deadline is at or before
  /// this: every answer the engines sent before then is ahead of it in the
  /// mailbox, since it was queued at that time or later.
  std::int64_t sweep_due_ns = 0;
  /// The sweep's first message (normal priority) came, and its second
  /// (urgent) is on its way: only then does it time calls out.
  bool sweep_barrier = false;
  static inline const char* name = "kvfleet.balancer";
};

using balancer_actor = caf::stateful_actor<balancer_state>;

std::int64_t now_ns(balancer_actor* self) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             self->clock().now().time_since_epoch())
      .count();
}

/// Why the engine of a start of `kind` (an initial engine's or a
/// restart's) that failed with `why` is restarted or given up, for the
/// give-up log line.
std::string start_failed(start_kind kind, const error& why) {
  return (kind == start_kind::restart ? "its restart failed: "
                                      : "its start failed: ") +
         why.describe();
}

/// What the caller of a replica_atom whose replica failed with `why` gets.
error replica_failed(const error& why) {
  return error{why.code, "the new replica did not start: " + why.message};
}

/// The engine of `slot` (generation `generation`) answered ready_atom: its
/// store is made, and the slot takes requests. The replica_atom that
/// started it, if any, is answered now.
void engine_ready(balancer_actor* self, std::uint32_t slot,
                  std::uint64_t generation) {
  auto& st = self->state;
  auto& info = st.slots[slot];
  if (info.generation != generation || !info.opening)
    return; // that engine is gone already
  info.opening = false;
  info.retry_elsewhere = false;
  if (st.growth_slot == slot) { // a new slot that worked: no failed turn
    st.last_growth = st.growth_before;
    st.growth_slot.reset();
  }
  info.up_since_ns = now_ns(self);
  st.route.set_up(slot, true);
  if (info.replica.pending())
    info.replica.deliver(static_cast<std::uint32_t>(st.route.live_slots()));
  info.replica = owed_reply{};
}

/// The host's engine factory for `slot`, with an exception it throws (the
/// host's own code: bad_alloc, a std::system_error from a thread it
/// starts) turned into an error value: a failed start like any other,
/// instead of the balancer's end, which stopped every engine.
result<started_engine> make_engine_for(balancer_actor* self,
                                       std::uint32_t slot) {
  try {
    return self->state.make_engine(self->system(), slot);
  } catch (...) {
    return unexpected<error>{current_exception_error(
        "the engine factory threw for slot " + std::to_string(slot))};
  }
}

/// Starts (or restarts) the engine of `slot`. Errors: the factory's
/// (make_engine_for).
result<void> start_engine(balancer_actor* self, std::uint32_t slot,
                          start_kind kind) {
  auto& st = self->state;
  st.slots[slot].last_start = ++st.starts;
  auto started = make_engine_for(self, slot);
  if (!started)
    return unexpected<error>{started.error()};
  // A failed start, as a factory's error is. (Before, monitoring the null
  // actor crashed the process.)
  if (!started->actor)
    return make_error(errc::invalid_argument,
                      "the engine factory returned no actor for slot " +
                          std::to_string(slot) +
                          " (a started_engine with a null actor); a factory "
                          "that cannot start an engine returns an error");
  if (!st.route.set_weight(slot, started->weight)) {
    self->send_exit(started->actor, caf::exit_reason::user_shutdown);
    return make_error(errc::invalid_argument,
                      "the engine factory gave slot " + std::to_string(slot) +
                          " capacity weight " +
                          std::to_string(started->weight) +
                          "; it must be finite and > 0");
  }
  auto& info = st.slots[slot];
  info.engine = std::move(started->actor);
  info.kind = kind;
  info.opening = started->opening;
  info.disk = started->disk;
  info.persisting = false;
  info.events_applied = 0;
  info.pinned_bytes = 0;
  info.pinned_on_disk = 0;
  info.pins_known = !info.disk;
  ++info.generation;
  self->monitor(info.engine);
  st.owned->push_back(info.engine);
  // Urgent, so no request (an urgent one included) reaches the engine
  // before its budget.
  if (st.capacity_tokens)
    self->send<caf::message_priority::high>(info.engine, capacity_atom::value,
                                            *st.capacity_tokens);
  if (info.opening) {
    // Asked before listen_atom, so the slot is up when the engine's first
    // block_events (the keys it recovered) arrive: the router keeps no
    // keys of a slot that is down.
    const auto generation = info.generation;
    self->request(info.engine, caf::infinite, ready_atom::value)
        .then([=](bool) { engine_ready(self, slot, generation); },
              [](caf::error&) {
                // The engine stopped before it was ready: the down handler
                // has its exit reason (the open's error) and reports it.
              });
  }
  self->send(info.engine, listen_atom::value, caf::actor{self});
  info.up_since_ns = -1;
  if (!info.opening) {
    info.up_since_ns = now_ns(self);
    st.route.set_up(slot, true);
  }
  return {};
}

/// The engine of `slot` failed (`why`) and may not be restarted again: the
/// slot is freed like a retired one (the router forgets it and add_slot
/// hands it out again). Logged once, here.
void give_up(balancer_actor* self, std::uint32_t slot, const std::string& why) {
  auto& s = self->state;
  auto& info = s.slots[slot];
  info.given_up = true;
  info.suspect = true;
  ++s.given_up;
  s.route.remove_slot(slot);
  std::fprintf(stderr,
               "kvfleet: balancer: engine slot %u given up after %u "
               "restart(s) (max_restarts %u): %s; the slot is free for the "
               "next replica\n",
               static_cast<unsigned>(slot),
               static_cast<unsigned>(info.restarts),
               static_cast<unsigned>(s.config.max_restarts), why.c_str());
}

/// The engine of `slot` is gone: it stopped, or a start failed (`why`).
/// A restart is scheduled while the slot has restarts left (a start that
/// fails used one up too, so a factory that always fails ends here, not in
/// an endless retry loop, and logged with `why`); else the slot is given
/// up. An engine that took requests for restart_window before it failed
/// gets the slot's whole count again.
void restart_or_give_up(balancer_actor* self, std::uint32_t slot,
                        const std::string& why) {
  auto& s = self->state;
  auto& info = s.slots[slot];
  const auto window = std::chrono::nanoseconds{s.config.restart_window}.count();
  if (window > 0 && info.up_since_ns >= 0 &&
      now_ns(self) - info.up_since_ns >= window)
    info.restarts = 0;
  info.up_since_ns = -1;
  if (info.restarts >= s.config.max_restarts) {
    give_up(self, slot, why);
    return;
  }
  ++info.restarts;
  ++s.restarts;
  // Each restart is logged with its reason, not only the last one (the
  // give-up): an engine that keeps failing and recovering shows up here.
  std::fprintf(stderr,
               "kvfleet: balancer: engine slot %u: %s; restart %u of %u in "
               "%lld ms (requests go to the other engines meanwhile)\n",
               static_cast<unsigned>(slot), why.c_str(),
               static_cast<unsigned>(info.restarts),
               static_cast<unsigned>(s.config.max_restarts),
               static_cast<long long>(s.config.restart_delay.count()));
  self->delayed_send(self, s.config.restart_delay, restart_atom::value, slot);
}

/// The slot of a replica that did not start: free again, as a retired
/// slot is, so that no engine the caller was told failed comes up later.
void free_replica_slot(balancer_actor* self, std::uint32_t slot) {
  auto& st = self->state;
  if (st.growth_slot == slot) // a slot a retry added failed
    st.growth_slot.reset();   // last_growth stays its start
  self->state.slots[slot].retired = true;
  self->state.slots[slot].suspect = true;
  self->state.route.remove_slot(slot);
}

/// Starts an engine in `slot`, just taken from the router. A failed start
/// is retried like a restart when `retry` (the balancer's initial
/// engines); otherwise (a replica asked for now) the slot is freed again
/// and the factory's error returned (free_replica_slot).
result<std::uint32_t> start_in_slot(balancer_actor* self, std::uint32_t slot,
                                    bool retry) {
  auto& st = self->state;
  if (slot == st.slots.size()) {
    st.slots.emplace_back();
  } else {
    // A freed slot. Its generation keeps counting, so a late answer to
    // a call of the old engine never releases the new engine's load.
    auto& info = st.slots[slot];
    info.routed = 0;
    info.restarts = 0;
    info.retiring = false;
    info.retired = false;
    info.given_up = false;
  }
  st.slots[slot].retry_elsewhere = false;
  st.route.set_up(slot, false);
  const auto kind = retry ? start_kind::initial : start_kind::replica;
  if (auto ok = start_engine(self, slot, kind); !ok) {
    if (!retry) {
      free_replica_slot(self, slot);
      return unexpected<error>{replica_failed(ok.error())};
    }
    restart_or_give_up(self, slot, start_failed(kind, ok.error()));
    return slot;
  }
  // Started (one opening its store may still fail: open_failed marks it
  // again).
  st.slots[slot].suspect = false;
  if (st.growth_slot == slot && !st.slots[slot].opening) {
    st.last_growth = st.growth_before; // a new slot that worked
    st.growth_slot.reset();
  }
  return slot;
}

/// The slot a replica starts in: a free slot (its engine retired or was
/// given up) whose last start did not fail, the lowest first; else a free
/// slot whose last start failed, the one tried longest ago first (so each
/// gets its turn: before, the lowest always went first, and with two
/// broken ones no replica got past them); else a new slot.
///
/// `failed` is the free slot a replica just failed in (a retry): it is
/// never taken. The retry goes to a free slot whose last start did not
/// fail; else it takes turns between the other free slots whose last
/// start failed and a new slot, the one tried longest ago first (a new
/// slot counting as tried when the start in the last one a retry added
/// failed, or while that one still opens its store: then no other is
/// added, and with no other free slot the retry has none; a tie goes to
/// the free slot): however many free slots are broken (a bad device or
/// directory for each), a replica reaches a new one within a round of
/// them, and an outage in which every start fails adds a slot once per
/// round through the failed ones, not one per failure or per replica
/// asked for while one opens (at most router::max_slots in all).
/// errc::unavailable when all router::max_slots are in use, or for a
/// retry with no slot to take.
result<std::uint32_t> choose_slot(balancer_state& st,
                                  std::optional<std::uint32_t> failed) {
  const auto count = static_cast<std::uint32_t>(st.route.slot_count());
  std::optional<std::uint32_t> oldest_suspect;
  for (std::uint32_t i = 0; i < count; ++i) {
    if (i == failed || !st.route.is_removed(i))
      continue;
    const bool suspect = i < st.slots.size() && st.slots[i].suspect;
    if (!suspect)
      return st.route.take_slot(i);
    if (!oldest_suspect ||
        st.slots[i].last_start < st.slots[*oldest_suspect].last_start)
      oldest_suspect = i;
  }
  const bool room = count < router::max_slots;
  // A slot a retry added still opens: that is the new slot's turn, taken.
  const bool growing = st.growth_slot && *st.growth_slot < st.slots.size() &&
                       st.slots[*st.growth_slot].opening;
  const bool new_turn = failed && room && !growing &&
                        (!oldest_suspect ||
                         st.last_growth < st.slots[*oldest_suspect].last_start);
  if (oldest_suspect && !new_turn)
    return st.route.take_slot(*oldest_suspect);
  if (failed && room && growing)
    return make_error(errc::unavailable,
                      "no other free slot, and the new slot " +
                          std::to_string(*st.growth_slot) +
                          " another replica is tried in still opens");
  auto slot = st.route.take_slot(count);
  if (slot && failed) {
    // Tried from now on (its start is the next): should it open on its
    // own, another replica's retry meanwhile adds no slot.
    if (!st.growth_slot)
      st.growth_before = st.last_growth;
    st.growth_slot = *slot;
    st.last_growth = st.starts + 1;
  }
  return slot;
}

/// Starts an engine in a free slot (whose engine retired or was given up)
/// if there is one, else in a new slot (always a new one when `retry`);
/// see start_in_slot for a failed start. A replica that fails in a free
/// slot whose last start failed too is tried once more in another slot.
/// Errors: errc::unavailable when all router::max_slots slots are in use.
result<std::uint32_t> add_engine(balancer_actor* self, bool retry) {
  auto& st = self->state;
  // An initial engine takes a slot of its own: with max_restarts 0 a
  // failed first start gives its slot up at once, and reusing it asked the
  // factory for that slot again (the same device or directory) while the
  // next slot's was never tried.
  auto slot = retry ? st.route.add_slot(1.0, /*reuse=*/false)
                    : choose_slot(st, std::nullopt);
  if (!slot)
    return unexpected<error>{slot.error()};
  const bool was_suspect = *slot < st.slots.size() && st.slots[*slot].suspect;
  auto started = start_in_slot(self, *slot, retry);
  if (started && !retry && was_suspect && st.slots[*started].opening)
    st.slots[*started].retry_elsewhere = true; // its open may fail yet
  if (started || retry || !was_suspect)
    return started;
  // A replica that failed in a free slot whose last start failed too
  // (given up, or an earlier replica's): that slot's device or directory
  // may be broken, so it is tried once more in another slot (choose_slot);
  // never in that slot again, and with no other slot left the first
  // failure is the answer. (Before, every replica took that lowest free
  // slot and failed there, and the fleet could not grow back.)
  auto other = choose_slot(st, *slot);
  if (!other)
    return started;
  std::fprintf(stderr,
               "kvfleet: balancer: a replica did not start in free slot %u, "
               "whose last start had failed too (%s); trying slot %u\n",
               static_cast<unsigned>(*slot), started.error().describe().c_str(),
               static_cast<unsigned>(*other));
  return start_in_slot(self, *other, false);
}

/// The engine of `slot` stopped before it answered ready_atom, with exit
/// reason `reason`, so its start failed: a replica asked for is answered
/// with the error and its slot freed; another start is restarted or given
/// up, as a start whose factory fails. A kvfleet error is its open's own
/// (the store could not be made); any other reason means it was stopped
/// while it opened (killed from outside, an exception), and says so.
void open_failed(balancer_actor* self, std::uint32_t slot,
                 const caf::error& reason) {
  auto& info = self->state.slots[slot];
  info.opening = false;
  const bool own = is_kvfleet_error(reason);
  const auto stopped = [&] {
    return "stopped while it was still opening its store (exit reason: " +
           self->system().render(reason) + ")";
  };
  if (info.kind != start_kind::replica) {
    restart_or_give_up(self, slot,
                       own ? start_failed(info.kind, from_caf_error(reason))
                           : "its engine " + stopped());
    return;
  }
  free_replica_slot(self, slot);
  owed_reply promise = std::move(info.replica);
  info.replica = owed_reply{};
  error why = own ? replica_failed(from_caf_error(reason))
                  : error{errc::unavailable, "the new replica " + stopped()};
  // Only an open that failed (its own error): one stopped from outside
  // (killed, say) is answered as such.
  if (std::exchange(info.retry_elsewhere, false) && own) {
    // Its slot's last start had failed too: tried once more in another
    // free slot or a new one, as add_engine does when a factory fails
    // there (before, an open that failed there was the answer, so a
    // broken directory or device in the lowest free slot failed every
    // replica of a node, whose engines all open on their own thread).
    auto& st = self->state;
    if (auto other = choose_slot(st, slot)) {
      std::fprintf(stderr,
                   "kvfleet: balancer: a replica did not open in free slot "
                   "%u, whose last start had failed too (%s); trying slot "
                   "%u\n",
                   static_cast<unsigned>(slot), why.describe().c_str(),
                   static_cast<unsigned>(*other));
      // `info` may be gone: start_in_slot can add a slot.
      auto again = start_in_slot(self, *other, false);
      if (again) {
        if (st.slots[*again].opening) {
          st.slots[*again].replica = std::move(promise);
          return;
        }
        if (promise.pending())
          promise.deliver(static_cast<std::uint32_t>(st.route.live_slots()));
        return;
      }
      why = again.error();
    }
  }
  if (promise.pending())
    promise.deliver(to_caf_error(why));
}

/// What engine_atom answers for `slot` (balancer_actor.hpp).
caf::result<caf::actor> engine_of(const balancer_state& s, std::uint32_t slot,
                                  bool retiring_too) {
  if (slot >= s.slots.size() || !s.slots[slot].engine)
    return to_caf_error(error{errc::not_found, "no live engine in slot " +
                                                   std::to_string(slot)});
  // Not live yet: what is sent to it would wait for its open (a large
  // arena or disk directory: seconds), past a caller's timeout, and a put
  // reserved meanwhile would land after the caller gave up. It holds
  // nothing in memory, so persist skips it as it skips a free slot.
  if (s.slots[slot].opening)
    return to_caf_error(
        error{errc::not_found,
              "no live engine in slot " + std::to_string(slot) +
                  ": its engine is still opening its store (a restart or a new "
                  "replica); ask again once it is up"});
  if (s.slots[slot].retiring && !retiring_too)
    return to_caf_error(
        error{errc::unavailable,
              "the engine in slot " + std::to_string(slot) +
                  " is being retired: it exits once its requests are answered, "
                  "and what it is given now goes with it"});
  return s.slots[slot].engine;
}

/// Calls to the engine now in `slot` whose callers were told they timed
/// out (in the router's in-flight count until the engine answers them).
std::uint64_t timed_out_on(const balancer_state& s, std::uint32_t slot) {
  std::uint64_t n = 0;
  for (const auto& [seq, at] : s.late)
    if (at.first == slot && at.second == s.slots[slot].generation)
      ++n;
  return n;
}

/// A retiring engine exits once every call still waiting for it is
/// answered: calls already timed out do not hold it (no caller waits for
/// them, and an engine stuck on one would hold its slot forever).
void maybe_exit_retired(balancer_actor* self, std::uint32_t slot) {
  auto& s = self->state;
  auto& info = s.slots[slot];
  if (!info.retiring || !info.engine || info.persisting ||
      s.route.in_flight(slot) != timed_out_on(s, slot))
    return;
  if (!info.disk) {
    self->send_exit(info.engine, caf::exit_reason::user_shutdown);
    return;
  }
  // Its blocks in memory would go with it: a later engine in the slot
  // recovers only its directory. Persisted first, on the engine's own
  // thread; the slot stays taken until it exits (the down handler frees
  // it), so that engine never finds the directory locked.
  info.persisting = true;
  const auto& timeout = s.config.retire_persist_timeout;
  auto engine = info.engine;
  auto exit = [self, engine] {
    self->send_exit(engine, caf::exit_reason::user_shutdown);
  };
  self->request(engine, timeout + s.config.request_timeout, persist_atom::value,
                static_cast<std::uint64_t>(timeout.count()), true)
      .then([exit](std::uint64_t) { exit(); },
            [self, slot, exit](caf::error& e) {
              std::fprintf(stderr,
                           "kvfleet: balancer: retired engine slot %u did not "
                           "persist its blocks: %s; what it held only in "
                           "memory is lost\n",
                           static_cast<unsigned>(slot),
                           self->system().render(e).c_str());
              exit();
            });
}

void notify(balancer_actor* self, const kv_request& req, const kv_reply& rep,
            std::int64_t latency) {
  for (auto& l : self->state.listeners)
    self->send(l, observe_atom::value, req, rep, latency);
}

/// The engine of `slot` is gone (it stopped, or a request to it found it
/// down): the router routes around the slot and forgets what the index
/// gave it, and the listeners get block_events evicting those keys, since
/// its store went with it without reporting a single eviction (a
/// prefetcher would otherwise count a prefetch on it useful). Once per
/// engine: a slot that is down already has nothing more to tell.
void engine_gone(balancer_actor* self, std::uint32_t slot) {
  auto& s = self->state;
  // Its pins went with its memory; those on disk come back with the next
  // engine in its slot, which reports them.
  s.slots[slot].pinned_bytes = 0;
  s.slots[slot].pinned_on_disk = 0;
  if (!s.route.is_up(slot))
    return;
  if (!s.listeners.empty()) {
    block_events ev;
    ev.engine = slot;
    ev.evicted = s.route.keys_of(slot);
    if (!ev.evicted.empty())
      for (auto& l : s.listeners)
        self->send(l, ev);
  }
  s.route.set_up(slot, false);
}

/// Releases the call's slot (when that engine has not been restarted
/// since) and closes the call; the caller then answers its promise. A
/// process call closed by its timeout (`answered_by_engine` false) keeps
/// its load on the engine, which is still working on it, until
/// release_late(). A lookup holds no load to release.
owed_reply close_call(balancer_actor* self, open_call& c, std::uint64_t seq,
                      bool answered_by_engine = true) {
  auto& s = self->state;
  auto promise = std::move(c.promise);
  const auto slot = c.slot;
  c.open = false;
  if (c.request) { // a process call; a lookup holds no load
    if (!answered_by_engine)
      s.late.emplace(seq, std::pair{slot, c.generation});
    else if (s.slots[slot].generation == c.generation)
      s.route.finished(slot);
  }
  // `c` may be popped here: nothing below reads it.
  while (!s.calls.empty() && !s.calls.front().open) {
    s.calls.pop_front();
    ++s.first_call;
  }
  maybe_exit_retired(self, slot);
  return promise;
}

/// The engine answered call `seq` (a reply or an error) after its caller
/// was told it timed out: its load is released now.
void release_late(balancer_actor* self, std::uint64_t seq) {
  auto& s = self->state;
  const auto it = s.late.find(seq);
  if (it == s.late.end())
    return;
  const auto [slot, generation] = it->second;
  s.late.erase(it);
  if (s.slots[slot].generation != generation)
    return;
  s.route.finished(slot);
  maybe_exit_retired(self, slot);
}

/// The open call `seq`, or null when it was answered or timed out.
open_call* find_call(balancer_actor* self, std::uint64_t seq) {
  auto& s = self->state;
  if (seq < s.first_call || seq - s.first_call >= s.calls.size())
    return nullptr;
  auto& c = s.calls[seq - s.first_call];
  return c.open ? &c : nullptr;
}

/// Schedules a sweep at the oldest open call's deadline, unless one is
/// already on its way (it reschedules itself when it finds nothing due).
/// calls.front() is always open: close_call pops closed calls off the front.
void schedule_sweep(balancer_actor* self) {
  auto& s = self->state;
  if (s.sweep_pending || s.calls.empty())
    return;
  const auto now = now_ns(self);
  const auto wait =
      std::max<std::int64_t>(s.calls.front().deadline_ns - now, 0);
  s.sweep_pending = true;
  s.sweep_due_ns = now + wait;
  self->delayed_send(self, std::chrono::nanoseconds{wait}, sweep_atom::value);
}

/// Times out every open call whose deadline came by the time the sweep
/// was due (the oldest first). Calls whose deadlines passed since, while
/// the balancer was busy, may have answers queued behind this sweep, sent
/// in time: they get a sweep sent now, behind those answers, rather than
/// a timeout (before, a late sweep timed them out and dropped the answer:
/// a pinning request's caller heard "timeout" while its pins stayed).
void sweep(balancer_actor* self) {
  auto& s = self->state;
  s.sweep_pending = false;
  const auto now = now_ns(self);
  while (!s.calls.empty() && s.calls.front().deadline_ns <= s.sweep_due_ns) {
    ++s.timeouts;
    auto& c = s.calls.front();
    // A request that times out waited at least request_timeout: the
    // scaler must see it, or a fleet whose requests time out would look
    // idle to it (no reply, no sample).
    if (c.request)
      for (auto& l : s.listeners)
        self->send(l, latency_atom::value, *c.request, now - c.started);
    close_call(self, c, s.first_call, false)
        .deliver(caf::make_error(caf::sec::request_timeout));
  }
  if (!s.calls.empty() && s.calls.front().deadline_ns <= now) {
    s.sweep_pending = true;
    s.sweep_due_ns = now;
    self->send(self, sweep_atom::value); // behind the mailbox
    return;
  }
  schedule_sweep(self);
}

/// Routes `req` (first received at `started`) to an engine. Its deadline
/// is request_timeout from now, so a rerouted request gets a fresh one and
/// deadlines stay in call order.
void dispatch(balancer_actor* self, kv_request req, owed_reply promise,
              std::int64_t started, int attempt) {
  auto& st = self->state;
  auto pick = st.route.pick(req.keys);
  if (!pick) {
    ++st.rejected;
    promise.deliver(
        to_caf_error(error{errc::unavailable, "no engine available"}));
    return;
  }
  auto slot = pick->slot;
  const auto generation = st.slots[slot].generation;
  st.route.started(slot);
  ++st.slots[slot].routed;
  const auto seq = st.first_call + st.calls.size();
  // The request travels to the engine; one copy, shared by both callbacks
  // and the open call, stays here for the listeners and for a reroute.
  auto kept = std::make_shared<kv_request>(req);
  const auto deadline =
      now_ns(self) +
      std::chrono::nanoseconds{st.config.request_timeout}.count();
  st.calls.push_back(open_call{deadline, std::move(promise), slot, generation,
                               true, kept, started});
  // The engine's copy carries the deadline: one that comes to it later
  // answers without doing work nobody waits for (a prefetch or warm query
  // queued behind served traffic, say, which would otherwise still be
  // computed, and pinned, after its caller was told it timed out). One
  // the request carries that comes first (a node's call_timeout) stays.
  if (req.deadline_ns == 0 || req.deadline_ns > deadline)
    req.deadline_ns = deadline;
  const std::int64_t engine_deadline = req.deadline_ns;
  schedule_sweep(self);
  auto then = [=](kv_reply& rep) {
    auto* c = find_call(self, seq);
    if (c == nullptr) {
      release_late(self, seq); // timed out already: the caller knows
      return;
    }
    auto p = close_call(self, *c, seq);
    rep.engine = slot;
    // The reply says where the request's blocks are now: the index learns
    // it before the caller can send its next request, not only from the
    // engine's block events, which come after the reply (from an engine on
    // a thread of its own, after the caller's next request, which then
    // found no engine holding the prompt it had just cached). All its keys
    // but the uncached ones, which are its last (the engine caches none
    // after the first it cannot). Not when events the engine published
    // after the reply were applied already (an urgent reply waits behind
    // urgent messages while normal ones pass it): they say what became of
    // the blocks, evicted maybe, and the reply would undo that.
    if (auto& s = self->state;
        s.slots[slot].generation == generation &&
        s.slots[slot].events_applied <= rep.events_published) {
      const std::size_t n = kept->keys.size();
      const auto cached = n - static_cast<std::size_t>(std::min<std::uint64_t>(
                                  rep.uncached_blocks, n));
      s.route.stored(slot, std::span(kept->keys).first(cached));
      // A pinning request's pins count from now, not from the engine's
      // block_events after its batch (a retire read in between would take
      // it, pins and all). The larger: a later event may have told of
      // more; the next one says what it holds. Only a pinning request's: a
      // stale reply overtaken by the events of an unpin would bring back
      // pins that are gone.
      if (kept->pin)
        s.slots[slot].pinned_bytes =
            std::max(s.slots[slot].pinned_bytes, rep.pinned_bytes);
    }
    if (!self->state.listeners.empty())
      notify(self, *kept, rep, now_ns(self) - started);
    p.deliver(std::move(rep));
  };
  auto fail = [=](caf::error& err) {
    auto* c = find_call(self, seq);
    if (c == nullptr) {
      release_late(self, seq);
      return;
    }
    // The engine came to it at or after its deadline, before the sweep
    // did: a timeout as the sweep's, counted and told to the listeners
    // (the scaler) the same way, and the caller gets the sweep's error
    // (caf::sec::request_timeout), whichever comes first. Only past the
    // deadline (the engine read the same clock): a producer's own
    // errc::timeout before it is the engine's error, passed on as it is.
    // The engine's deadline: the request's own when it came first (a
    // pinning node call's); before, an expiry there was neither counted
    // nor reported.
    const bool expired = from_caf_error(err).code == errc::timeout &&
                         now_ns(self) >= engine_deadline;
    if (expired) {
      ++self->state.timeouts;
      for (auto& l : self->state.listeners)
        self->send(l, latency_atom::value, *kept, now_ns(self) - started);
      err = caf::make_error(caf::sec::request_timeout);
    }
    auto p = close_call(self, *c, seq);
    if (err == caf::sec::request_receiver_down && attempt == 0) {
      auto& s = self->state;
      ++s.rerouted;
      // The down_msg may not have arrived yet. (A restarted engine in the
      // slot is another one, and stays up.)
      if (s.slots[slot].generation == generation)
        engine_gone(self, slot);
      dispatch(self, std::move(*kept), std::move(p), started, 1);
      return;
    }
    p.deliver(std::move(err));
  };
  const auto prio = req.prio;
  request_at(self, prio, st.slots[slot].engine, caf::infinite,
             process_atom::value, std::move(req))
      .then(std::move(then), std::move(fail));
}

/// Sends a lookup to the engine that holds the longest prefix of `keys`.
/// Live engines first: a retiring one may be stopped already (it stops
/// once drained) and would answer request_receiver_down, and one a failed
/// request found down is gone; those are asked only when no live engine
/// is left. Never one still opening its store: it reads its mailbox only
/// once open, so the lookup would wait for that, past its timeout (as
/// engine_atom refuses it; before, with no live engine, a lookup went to
/// it). An engine that turns out to be gone (request_receiver_down) is
/// marked down and the lookup asked again once, of another engine, as a
/// process call is rerouted.
void dispatch_lookup(balancer_actor* self, std::vector<engine::block_key> keys,
                     owed_reply promise, int attempt) {
  auto& s = self->state;
  std::uint32_t best = 0;
  std::size_t best_held = 0;
  bool any = false;
  for (const bool live_only : {true, false}) {
    for (std::uint32_t slot = 0; slot < s.slots.size(); ++slot) {
      const auto& info = s.slots[slot];
      if (!info.engine || info.opening ||
          (live_only && (info.retiring || !s.route.is_up(slot))))
        continue;
      auto held = s.route.held_prefix(slot, keys);
      if (!any || held > best_held) {
        best = slot;
        best_held = held;
        any = true;
      }
    }
    if (any)
      break;
  }
  if (!any) {
    ++s.rejected;
    promise.deliver(
        to_caf_error(error{errc::unavailable, "no engine available"}));
    return;
  }
  // An open call like a process call's, not a delegation: the engine's
  // answer comes back here, so a lookup it does not answer within
  // request_timeout (busy with a long batch, stuck) times out as a request
  // does, and a caller with no timer of its own is not left waiting for
  // ever. A late answer finds the call gone and is dropped.
  const auto seq = s.first_call + s.calls.size();
  const auto generation = s.slots[best].generation;
  s.calls.push_back(open_call{
      now_ns(self) + std::chrono::nanoseconds{s.config.request_timeout}.count(),
      std::move(promise), best, generation, true, nullptr, 0});
  schedule_sweep(self);
  // A copy stays here for a second attempt (a lookup is a read: asking
  // again is safe).
  auto kept = attempt == 0
                  ? std::make_shared<std::vector<engine::block_key>>(keys)
                  : nullptr;
  self->request(s.slots[best].engine, caf::infinite, lookup_atom::value,
                std::move(keys))
      .then(
          [=](std::uint64_t matched) {
            if (auto* c = find_call(self, seq))
              close_call(self, *c, seq).deliver(matched);
          },
          [=](caf::error& err) {
            auto* c = find_call(self, seq);
            if (c == nullptr)
              return;
            auto p = close_call(self, *c, seq);
            if (err == caf::sec::request_receiver_down && kept) {
              auto& st = self->state;
              ++st.rerouted;
              // The down_msg may not have arrived yet. (A restarted engine
              // in the slot is another one, and stays up.)
              if (st.slots[best].generation == generation)
                engine_gone(self, best);
              dispatch_lookup(self, std::move(*kept), std::move(p), 1);
              return;
            }
            p.deliver(std::move(err));
          });
}

caf::behavior balancer_behavior(balancer_actor* self, balancer_config config,
                                engine_factory make_engine, router route) {
  auto& st = self->state;
  st.config = config;
  st.make_engine = std::move(make_engine);
  st.route = std::move(route);
  // The balancer owns its engines: they stop with it. (Not links: a killed
  // engine would take a linked balancer down with it.) The functor runs
  // after the state is gone, so it holds its own list. Attached before the
  // first engine starts, so none outlives a balancer that ends while the
  // others start.
  self->attach_functor([owned = st.owned](const caf::error&) {
    for (auto& e : *owned)
      caf::anon_send_exit(e, caf::exit_reason::user_shutdown);
  });
  for (std::uint32_t i = 0; i < config.initial_engines; ++i) {
    if (auto slot = add_engine(self, true); !slot) {
      std::fprintf(stderr, "kvfleet: balancer: %s\n",
                   slot.error().describe().c_str());
      break;
    }
  }
  handle_stray_messages(self, "balancer");
  self->set_down_handler([=](caf::down_msg& dm) {
    auto& s = self->state;
    drop_listener(s.listeners, dm.source);
    for (std::uint32_t slot = 0; slot < s.slots.size(); ++slot) {
      auto& info = s.slots[slot];
      if (!info.engine || info.engine.address() != dm.source)
        continue;
      std::erase(*s.owned, info.engine);
      info.engine = caf::actor{};
      engine_gone(self, slot);
      if (info.opening) {
        open_failed(self, slot, dm.reason);
      } else if (info.retiring) {
        info.retired = true;
        s.route.remove_slot(slot); // free for the next replica
      } else {
        restart_or_give_up(self, slot,
                           "its engine stopped: " +
                               self->system().render(dm.reason));
      }
    }
  });
  return {
      [=](process_atom, kv_request& req) -> caf::result<kv_reply> {
        // Refused here, before it counts as routed or waits in a queue it
        // would jump (the engine refuses it too).
        if (auto ok = engine::check_priority(req.prio); !ok)
          return to_caf_error(ok.error());
        auto promise = self->make_response_promise();
        dispatch(self, std::move(req), owed_reply{promise}, now_ns(self), 0);
        return promise;
      },
      [=](sweep_atom) {
        // Its own timer only: one from anyone else would start a second
        // timer chain.
        if (!sent_by_itself(self))
          return;
        // Two messages, one in each mailbox category: the timer's (or a
        // deferred sweep's) normal one, then an urgent one sent from here.
        // Each category is read in order, so by the second every answer an
        // engine sent before the sweep was due has been read, an urgent
        // one (a high or critical request's) too, which the normal message
        // alone could overtake (CAF takes turns between the categories).
        auto& s = self->state;
        if (!s.sweep_barrier) {
          s.sweep_barrier = true;
          self->send<caf::message_priority::high>(self, sweep_atom::value);
          return;
        }
        s.sweep_barrier = false;
        sweep(self);
      },
      [=](restart_atom, std::uint32_t slot) {
        auto& s = self->state;
        // Its own restart timer only: one from anyone else would restart a
        // slot before its restart_delay and, when that start failed, begin
        // a second restart chain for it.
        if (!sent_by_itself(self) || slot >= s.slots.size() ||
            s.slots[slot].engine || s.slots[slot].retired ||
            s.slots[slot].given_up)
          return;
        if (auto ok = start_engine(self, slot, start_kind::restart); !ok)
          restart_or_give_up(self, slot,
                             start_failed(start_kind::restart, ok.error()));
      },
      [=](const block_events& ev) {
        auto& s = self->state;
        // Only the slot's current engine feeds the index: a late event of
        // an engine the slot had before (failed, or retired and the slot
        // reused) would credit the new, empty one. Nor does it reach the
        // listeners: the prefetcher would count its evictions against the
        // slot's current engine. (Before, every event was passed on.)
        if (ev.engine >= s.slots.size() || !s.slots[ev.engine].engine ||
            self->current_sender() != caf::actor_cast<caf::strong_actor_ptr>(
                                          s.slots[ev.engine].engine))
          return;
        s.route.stored(ev.engine, ev.stored);
        s.route.evicted(ev.engine, ev.evicted);
        auto& applied = s.slots[ev.engine].events_applied;
        applied = std::max(applied, ev.seq);
        // In order (one sender): the latest says what it holds now.
        s.slots[ev.engine].pinned_bytes = ev.pinned_bytes;
        s.slots[ev.engine].pinned_on_disk = ev.pinned_on_disk;
        s.slots[ev.engine].pins_known = true;
        for (auto& l : s.listeners)
          self->send(l, ev);
      },
      [=](lookup_atom,
          std::vector<engine::block_key>& keys) -> caf::result<std::uint64_t> {
        auto promise = self->make_response_promise();
        dispatch_lookup(self, std::move(keys), owed_reply{promise}, 0);
        return promise;
      },
      [=](engine_atom, std::uint32_t slot) -> caf::result<caf::actor> {
        return engine_of(self->state, slot, false);
      },
      [=](engine_atom, std::uint32_t slot,
          bool retiring_too) -> caf::result<caf::actor> {
        return engine_of(self->state, slot, retiring_too);
      },
      [=](replica_atom) -> caf::result<std::uint32_t> {
        auto slot = add_engine(self, false);
        if (!slot)
          return to_caf_error(slot.error());
        auto& info = self->state.slots[*slot];
        if (info.opening) {
          // Answered by engine_ready, or open_failed.
          auto promise = self->make_response_promise();
          info.replica = owed_reply{promise};
          return promise;
        }
        return static_cast<std::uint32_t>(self->state.route.live_slots());
      },
      [=](retire_atom) -> caf::result<std::uint32_t> {
        auto& s = self->state;
        if (s.route.live_slots() <= 1)
          return to_caf_error(
              error{errc::invalid_argument, "last live engine"});
        // A live engine only: not one still opening (it serves nothing
        // yet, and a replica asked for is waiting for it), nor one a failed
        // request found gone whose down message is still on its way
        // (retiring it would cancel its restart, drain nothing, and leave
        // the live engines as many as before). The highest slot whose
        // engine holds no pins and works on no pinning request (its pins
        // would land after the pick); with pins everywhere, the one with a
        // disk tier holding the fewest (it persists them with the rest,
        // for the next engine in its slot); without such an engine, none:
        // the pins of an engine without a disk tier would go with it, and
        // unpin calls to its slot would find no engine. (Before, the
        // highest live slot went, pins and all.)
        std::vector<std::uint8_t> pinning(s.slots.size(), 0);
        for (const auto& c : s.calls)
          if (c.open && c.request && c.request->pin &&
              c.generation == s.slots[c.slot].generation)
            pinning[c.slot] = 1;
        // Fewer pins; one whose pins are not known yet goes last.
        const auto fewer = [](const slot_info& a, const slot_info& b) {
          return std::tuple{!a.pins_known, a.pinned_bytes, a.pinned_on_disk} <
                 std::tuple{!b.pins_known, b.pinned_bytes, b.pinned_on_disk};
        };
        std::optional<std::uint32_t> pick;
        std::optional<std::uint32_t> pinned_disk;
        std::uint32_t candidates = 0;
        for (auto slot = static_cast<std::uint32_t>(s.slots.size());
             slot-- > 0;) {
          const auto& info = s.slots[slot];
          if (!info.engine || info.retiring || info.opening ||
              !s.route.is_up(slot))
            continue;
          ++candidates;
          if (!info.holds_pins() && pinning[slot] == 0) {
            pick = slot;
            break;
          }
          if (info.disk && (!pinned_disk || fewer(info, s.slots[*pinned_disk])))
            pinned_disk = slot;
        }
        if (!pick)
          pick = pinned_disk;
        if (pick) {
          s.slots[*pick].retiring = true;
          s.route.set_draining(*pick, true);
          maybe_exit_retired(self, *pick);
        } else if (candidates > 0) {
          return to_caf_error(error{
              errc::busy,
              "every live engine holds pinned blocks and has no disk tier to "
              "keep them: retiring one would take its pins with it; unpin "
              "them first"});
        }
        return static_cast<std::uint32_t>(s.route.live_slots());
      },
      [=](capacity_atom, std::uint32_t tokens) {
        self->state.capacity_tokens = tokens;
        for (auto& info : self->state.slots)
          if (info.engine)
            self->send(info.engine, capacity_atom::value, tokens);
      },
      [=](stats_atom) -> caf::result<balancer_stats> {
        const auto& s = self->state;
        balancer_stats out;
        for (std::uint32_t slot = 0; slot < s.slots.size(); ++slot) {
          out.routed.push_back(s.slots[slot].routed);
          out.in_flight.push_back(s.route.in_flight(slot));
          out.weight.push_back(s.route.weight(slot));
          out.pinned_bytes.push_back(s.slots[slot].pinned_bytes);
          out.pinned_on_disk.push_back(s.slots[slot].pinned_on_disk);
          out.up.push_back(
              s.route.is_up(slot) && !s.route.is_draining(slot) ? 1 : 0);
        }
        out.timeouts = s.timeouts;
        out.rerouted = s.rerouted;
        out.restarts = s.restarts;
        out.rejected = s.rejected;
        out.live = static_cast<std::uint32_t>(s.route.live_slots());
        out.given_up = s.given_up;
        for (const auto& info : s.slots)
          if (!info.retiring && !info.retired && !info.given_up)
            ++out.engines;
        out.index_keys = s.route.index_size();
        return out;
      },
      [=](listen_atom, const caf::actor& listener) {
        add_listener(self, self->state.listeners, listener); // listeners.hpp
      },
  };
}

} // namespace

result<started_engine> started_now(result<caf::actor> engine) {
  if (!engine)
    return unexpected<error>{engine.error()};
  return started_engine{std::move(*engine), false};
}

result<void> validate(const balancer_config& config) {
  if (auto ok = validate(config.routing); !ok)
    return ok;
  // Zero would time every request out at once.
  if (auto ok = check_duration("balancer_config.request_timeout",
                               config.request_timeout);
      !ok)
    return ok;
  if (auto ok = check_duration("balancer_config.restart_delay",
                               config.restart_delay, true);
      !ok)
    return ok;
  if (auto ok = check_duration("balancer_config.restart_window",
                               config.restart_window, true);
      !ok)
    return ok;
  // Zero would give a retired engine's disk no time at all.
  if (auto ok = check_duration("balancer_config.retire_persist_timeout",
                               config.retire_persist_timeout);
      !ok)
    return ok;
  if (config.initial_engines > router::max_slots)
    return make_error(errc::invalid_argument,
                      "balancer_config.initial_engines must be at most " +
                          std::to_string(router::max_slots) + ", not " +
                          std::to_string(config.initial_engines));
  return {};
}

result<caf::actor> spawn_balancer(caf::actor_system& sys,
                                  balancer_config config,
                                  engine_factory make_engine) {
  if (auto ok = validate(config); !ok)
    return unexpected<error>{ok.error()};
  // Built here, so a bad routing configuration is the caller's error value
  // and never reaches the actor.
  auto route = router::create(config.routing);
  if (!route)
    return unexpected<error>{route.error()};
  return sys.spawn(balancer_behavior, std::move(config), std::move(make_engine),
                   std::move(*route));
}

} // namespace kvfleet::actors
