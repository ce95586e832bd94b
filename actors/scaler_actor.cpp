#include "actors/scaler_actor.hpp"

#include "actors/caf_error.hpp"
#include "actors/config_checks.hpp"
#include "actors/messages.hpp"
#include "actors/stray_messages.hpp"

#include <algorithm>
#include <exception>
#include <iostream>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>

namespace kvfleet::actors {
namespace {

/// A replica change sent to the balancer and not answered yet.
struct open_change {
  scale_action action = scale_action::hold;
  bool timed_out = false; ///< counted unanswered
};

struct scaler_state {
  std::optional<scaler_policy> policy;
  scaler_actor_config config;
  caf::actor balancer;
  engine::nanos last_p95{0};
  /// balancer_stats::given_up when last read: engines lost before it are
  /// counted already.
  std::uint64_t given_up_seen = 0;
  bool balancer_silent = false;    ///< the last stats request failed
  bool bad_latency_logged = false; ///< a negative latency was dropped
  /// A stats request is on its way: a periodic evaluation waits for it
  /// instead of sending another (a stalled balancer would otherwise get one
  /// per interval and answer them together, and the evaluations behind
  /// them would meet `sustain` within moments, not intervals).
  bool stats_pending = false;
  /// Replica changes (spawn, retire) sent and not answered yet, by number:
  /// each waits for its answer however late (the balancer answers every
  /// request, also when it stops), and is timed out on the scaler's own
  /// timer (timeout_atom) after balancer_timeout.
  std::unordered_map<std::uint64_t, open_change> changes;
  std::uint64_t next_change = 0;
  /// Of `changes`, those not timed out yet.
  std::uint32_t changes_open = 0;
  std::uint64_t answered_late = 0;
  /// Stats requests sent so far (the next one's number).
  std::uint64_t stats_sent = 0;
  /// Set when a replica change went unanswered: the number of the first
  /// stats request sent after that. The balancer reads its mailbox in
  /// order, so its answer to that request already includes the change if
  /// the balancer made it at all, and the count is taken from it.
  std::optional<std::uint64_t> resync_from;
  static inline const char* name = "kvfleet.scaler";
};

using scaler_actor = caf::stateful_actor<scaler_state>;

/// How long the scaler waits for the balancer to answer (a replica change
/// or its stats).
constexpr std::chrono::seconds balancer_timeout{10};

engine::nanos now(scaler_actor* self) {
  return std::chrono::duration_cast<engine::nanos>(
      self->clock().now().time_since_epoch());
}

void log_decision(const scale_decision& d) {
  std::clog
      << "kvfleet scaler: " << to_string(d.action) << " (p95 "
      << std::chrono::duration_cast<std::chrono::milliseconds>(d.p95).count()
      << " ms; replicas " << d.replicas << ", capacity " << d.capacity_tokens
      << " tokens)"
      << (d.below_min ? ": replacing lost replicas up to min_replicas" : "")
      << "\n";
}

/// The balancer did not carry out `a` (no free slot, the last live engine,
/// or no answer): the policy's count goes back to what runs.
void refused(scaler_actor* self, scale_action a, const caf::error& err) {
  self->state.policy->refused(a);
  std::clog << "kvfleet scaler: " << to_string(a)
            << " refused by the balancer (" << from_caf_error(err).describe()
            << "); replicas " << self->state.policy->replicas() << "\n";
}

/// The balancer did not answer `a` in time. It may be slow rather than
/// unwilling and still carry the change out, so the count is not undone
/// (undoing it could under-count as wrongly as keeping it may over-count):
/// it is re-read from the first stats asked for from now on.
void unanswered(scaler_actor* self, scale_action a) {
  auto& st = self->state;
  st.policy->change_unanswered();
  st.resync_from = st.stats_sent;
  std::clog << "kvfleet scaler: no answer from the balancer to " << to_string(a)
            << " in " << balancer_timeout.count()
            << " s; it may still carry it out, so replicas ("
            << st.policy->replicas()
            << ") are re-read from its stats, and decisions hold until it "
               "answers\n";
}

/// The balancer answered replica change `id` (`err` when with an error).
/// In time, an error is a refusal. After it was counted unanswered, the
/// answer says what the change came to (a replica that took longer than
/// balancer_timeout to open may still have failed, or come up): the count
/// is re-read from the first stats asked for from now on, which include
/// it, whatever the resync in between read.
void change_answered(scaler_actor* self, std::uint64_t id,
                     const caf::error* err) {
  auto& st = self->state;
  auto it = st.changes.find(id);
  if (it == st.changes.end())
    return;
  const auto [a, timed_out] = it->second;
  st.changes.erase(it);
  st.policy->change_done(now(self), err == nullptr);
  if (!timed_out) {
    --st.changes_open;
    if (err != nullptr)
      refused(self, a, *err);
    return;
  }
  ++st.answered_late;
  if (err != nullptr)
    st.policy->refused_late(a);
  st.resync_from = st.stats_sent;
  std::clog << "kvfleet scaler: the balancer answered " << to_string(a)
            << " late ("
            << (err != nullptr ? from_caf_error(*err).describe()
                               : std::string{"done"})
            << "); replicas are re-read from its stats\n";
}

/// Asks the balancer for the replica change `a` (replica_atom or
/// retire_atom as `atom`). No CAF timeout: its answer would be dropped
/// after it, and a replica slow to open is still answered later
/// (change_answered); the scaler's own timer counts it unanswered first.
template <class Atom>
void change_replicas(scaler_actor* self, scale_action a, Atom atom) {
  auto& st = self->state;
  const auto id = st.next_change++;
  st.changes.emplace(id, open_change{a, false});
  ++st.changes_open;
  st.policy->change_started();
  self->request(st.balancer, caf::infinite, atom)
      .then([=](std::uint32_t) { change_answered(self, id, nullptr); },
            [=](caf::error& err) { change_answered(self, id, &err); });
  self->delayed_send(self, balancer_timeout, timeout_atom::value, id);
}

void evaluate(scaler_actor* self) {
  auto& st = self->state;
  auto d = st.policy->evaluate(now(self));
  st.last_p95 = d.p95;
  switch (d.action) {
  case scale_action::hold:
    return;
  case scale_action::spawn_replica:
    change_replicas(self, d.action, replica_atom::value);
    break;
  case scale_action::retire_replica:
    change_replicas(self, d.action, retire_atom::value);
    break;
  case scale_action::grow_capacity:
  case scale_action::shrink_capacity:
    self->send(st.balancer, capacity_atom::value, d.capacity_tokens);
    break;
  }
  if (!st.config.on_decision) {
    log_decision(d);
    return;
  }
  // The host's callback: an exception from it is logged, not the scaler's
  // end (autoscaling stopped for good, silently); the decision stands.
  try {
    st.config.on_decision(d);
  } catch (const std::exception& ex) {
    std::clog << "kvfleet scaler: on_decision threw: " << ex.what() << "\n";
    log_decision(d);
  } catch (...) {
    std::clog << "kvfleet scaler: on_decision threw an exception not derived "
                 "from std::exception\n";
    log_decision(d);
  }
}

/// Counts the engines the balancer gave up since the last look as lost
/// replicas and, after an unanswered replica change, takes the count from
/// the balancer; then decides.
void sync_and_evaluate(scaler_actor* self) {
  const auto seq = self->state.stats_sent++;
  self->state.stats_pending = true;
  self->request(self->state.balancer, balancer_timeout, stats_atom::value)
      .then(
          [=](const balancer_stats& bs) {
            auto& st = self->state;
            st.stats_pending = false;
            st.balancer_silent = false;
            for (; st.given_up_seen < bs.given_up; ++st.given_up_seen) {
              st.policy->replica_lost();
              std::clog << "kvfleet scaler: the balancer gave up an engine; "
                           "replicas "
                        << st.policy->replicas() << "\n";
            }
            // A change sent after this request is not in `bs` yet: wait
            // for a later answer then.
            if (st.resync_from && seq >= *st.resync_from &&
                st.changes_open == 0) {
              st.resync_from.reset();
              if (st.policy->resync(bs.engines))
                std::clog << "kvfleet scaler: replicas re-read from the "
                             "balancer: "
                          << st.policy->replicas() << "\n";
            }
            evaluate(self);
          },
          [=](caf::error& err) {
            auto& st = self->state;
            st.stats_pending = false;
            if (!st.balancer_silent)
              std::clog << "kvfleet scaler: no stats from the balancer ("
                        << from_caf_error(err).describe()
                        << "); deciding on replicas " << st.policy->replicas()
                        << "\n";
            st.balancer_silent = true;
            evaluate(self);
          });
}

/// Records how long `req` took when it is served traffic: not a prefetch,
/// and at sample_priority or above. Warm queries and prefetches run at low
/// priority behind the served requests; their waits would otherwise push
/// the p95 up and spawn replicas for work nobody waits for.
void sample(scaler_actor* self, const kv_request& req, std::int64_t latency) {
  auto& st = self->state;
  if (req.prefetch || req.prio < st.config.sample_priority)
    return;
  // The balancer measures none below 0; one from elsewhere is dropped, and
  // said once.
  if (auto ok = st.policy->record(now(self), engine::nanos{latency});
      !ok && !st.bad_latency_logged) {
    st.bad_latency_logged = true;
    std::clog << "kvfleet scaler: dropped a sample: " << ok.error().describe()
              << "\n";
  }
}

caf::behavior scaler_behavior(scaler_actor* self, scaler_actor_config config,
                              caf::actor balancer, scaler_policy policy) {
  auto& st = self->state;
  st.policy.emplace(std::move(policy));
  st.config = std::move(config);
  st.balancer = balancer;
  self->send(balancer, listen_atom::value, caf::actor{self});
  self->delayed_send(self, st.config.interval, evaluate_atom::value, true);
  handle_stray_messages(self, "scaler");
  return {
      [=](observe_atom, const kv_request& req, const kv_reply&,
          std::int64_t latency) { sample(self, req, latency); },
      // A request the balancer timed out: its wait is a sample too, else
      // a fleet whose requests all time out would look idle. At least just
      // above the target: nobody got its reply in time, and a balancer
      // request_timeout (or a node call deadline) at or below the target
      // made every timeout read as fast, so such a fleet never grew and
      // could even shrink.
      [=](latency_atom, const kv_request& req, std::int64_t latency) {
        const auto above =
            engine::nanos{self->state.config.policy.target}.count() + 1;
        sample(self, req, std::max(latency, above));
      },
      [=](const block_events&) {},
      [=](evaluate_atom, bool periodic) {
        // The periodic timer is the scaler's own: one from outside would
        // start a second chain.
        if (periodic && !sent_by_itself(self))
          return;
        if (!periodic || !self->state.stats_pending)
          sync_and_evaluate(self);
        if (periodic)
          self->delayed_send(self, self->state.config.interval,
                             evaluate_atom::value, true);
      },
      [=](evaluate_atom) { sync_and_evaluate(self); },
      [=](timeout_atom, std::uint64_t id) {
        // The scaler's own timer only: one from outside would count an
        // answer still on its way as missing.
        if (!sent_by_itself(self))
          return;
        auto& s = self->state;
        auto it = s.changes.find(id);
        if (it == s.changes.end() || it->second.timed_out)
          return; // answered in time
        it->second.timed_out = true;
        --s.changes_open;
        unanswered(self, it->second.action);
      },
      [=](stats_atom) -> caf::result<scaler_stats> {
        const auto& p = *self->state.policy;
        scaler_stats out;
        for (std::size_t i = 0; i < scale_action_count; ++i)
          out.actions.push_back(p.count(static_cast<scale_action>(i)));
        out.replicas = p.replicas();
        out.capacity_tokens = p.capacity_tokens();
        out.last_p95_ns = self->state.last_p95.count();
        out.refused = p.refusals();
        out.lost = p.losses();
        out.unanswered = p.unanswered();
        out.answered_late = self->state.answered_late;
        out.replaced = p.replacements();
        return out;
      },
  };
}

} // namespace

result<void> validate(const scaler_actor_config& config) {
  if (auto ok = validate(config.policy); !ok)
    return ok;
  // Zero would re-arm the evaluation timer at once, forever (a busy loop).
  if (auto ok = check_duration("scaler_actor_config.interval", config.interval);
      !ok)
    return ok;
  if (auto ok = validate_replicas(config.policy, config.initial_replicas,
                                  "scaler_actor_config.initial_replicas");
      !ok)
    return ok;
  if (auto ok = engine::check_priority(config.sample_priority); !ok)
    return make_error(errc::invalid_argument,
                      "scaler_actor_config.sample_priority: " +
                          ok.error().message);
  return validate_capacity(config.policy, config.initial_capacity_tokens,
                           "scaler_actor_config.initial_capacity_tokens");
}

result<caf::actor> spawn_scaler(caf::actor_system& sys,
                                scaler_actor_config config,
                                caf::actor balancer) {
  if (auto ok = validate(config); !ok)
    return unexpected<error>{ok.error()};
  if (auto ok = check_balancer(balancer, "spawn_scaler"); !ok)
    return unexpected<error>{ok.error()};
  // Built here, so a bad configuration is the caller's error value and never
  // reaches the actor.
  auto policy = scaler_policy::create(config.policy, config.initial_replicas,
                                      config.initial_capacity_tokens);
  if (!policy)
    return unexpected<error>{policy.error()};
  return sys.spawn(scaler_behavior, std::move(config), std::move(balancer),
                   std::move(*policy));
}

} // namespace kvfleet::actors
