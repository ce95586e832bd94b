#include "actors/node.hpp"

#include "actors/caf_error.hpp"
#include "actors/config_checks.hpp"
#include "actors/prioritized.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <caf/actor_cast.hpp>
#include <caf/actor_clock.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/after.hpp>
#include <caf/blocking_actor.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/message_id.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <caf/system_messages.hpp>
#include <caf/weak_intrusive_ptr.hpp>

namespace kvfleet {

/// The blocking actors that host calls borrow, one call at a time each
/// (node.hpp says why). The mutex guards `idle_` only.
class node_askers {
public:
  explicit node_askers(caf::actor_system& sys) : sys_(sys) {}

  /// An idle actor, or a new one when every one is in a call.
  [[nodiscard]] std::unique_ptr<caf::scoped_actor> take() {
    {
      std::lock_guard lock{mutex_};
      if (!idle_.empty()) {
        auto a = std::move(idle_.back());
        idle_.pop_back();
        return a;
      }
    }
    return std::make_unique<caf::scoped_actor>(sys_);
  }

  /// REQUIRES: `a` read the reply of every request it sent, so nothing is
  /// on its way to it.
  void give_back(std::unique_ptr<caf::scoped_actor> a) {
    std::lock_guard lock{mutex_};
    idle_.push_back(std::move(a));
  }

private:
  caf::actor_system& sys_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<caf::scoped_actor>> idle_;
};

/// Every engine the node's factory started (restarts and replicas too),
/// for stop() to wait for. The balancer calls the factory on its thread
/// (which spawns them; they make their stores themselves);
/// the mutex guards the list between it and stop(). Weak references, so
/// engines long gone leave nothing behind but their slot in the list until
/// the next add.
class node_engines {
public:
  void add(const caf::actor& engine) {
    std::lock_guard lock{mutex_};
    std::erase_if(engines_, [](const caf::weak_actor_ptr& w) {
      return w.lock() == nullptr;
    });
    engines_.push_back(caf::actor_cast<caf::weak_actor_ptr>(engine));
  }

  /// The engines that may still run.
  [[nodiscard]] std::vector<caf::actor> alive() {
    std::lock_guard lock{mutex_};
    std::vector<caf::actor> out;
    for (const auto& w : engines_)
      if (auto strong = w.lock())
        out.push_back(caf::actor_cast<caf::actor>(std::move(strong)));
    return out;
  }

private:
  std::mutex mutex_;
  std::vector<caf::weak_actor_ptr> engines_;
};

std::string query_key_scope(const engine::namespace_spec& ns) {
  const engine::ns_fingerprint fp = ns.fingerprint();
  char hex[34];
  std::snprintf(hex, sizeof hex,
                "%016llx%016llx:", static_cast<unsigned long long>(fp.hi),
                static_cast<unsigned long long>(fp.lo));
  return hex;
}

namespace {

using actors::from_caf_error;
using actors::request_at;

/// A request on its way from an actor borrowed from `askers`; wait()
/// reads its reply. Each has an actor of its own, which gets no other
/// message, so several can be on their way at once (persist asks every
/// engine) and waiting for one never meets another's reply. That keeps a
/// wait within its deadline: CAF 0.17's blocking receive starts its relative
/// `after` again whenever a message arrives, also one it skips
/// (blocking_actor::receive_impl), so one actor that waited for several
/// replies in turn waited up to a whole timeout more for each reply that
/// came while it waited for another.
template <class T> class pending_reply {
public:
  /// Sends `xs` to `dest` in the mailbox category of `prio`
  /// (prioritized.hpp). REQUIRES: `dest` is valid.
  template <class... Ts>
  pending_reply(node_askers& askers, engine::priority prio,
                const caf::actor& dest, Ts&&... xs)
      : askers_(&askers), actor_(askers.take()) {
    // No CAF request timeout: the clock delivers its message after the
    // reply too, where it would wait unread in a mailbox that later calls
    // reuse (one per call). wait() waits against a deadline of its own
    // instead, as response_handle::receive does without one, and no clock
    // is involved.
    id_ = request_at(actor_->ptr(), prio, dest, caf::infinite,
                     std::forward<Ts>(xs)...)
              .id();
  }

  /// The reply, or errc::timeout when none came by `deadline` (a reply
  /// already there is read also after it).
  [[nodiscard]] result<T> wait(std::chrono::steady_clock::time_point deadline) {
    const auto d = deadline - std::chrono::steady_clock::now();
    const auto left = d <= std::chrono::steady_clock::duration::zero()
                          ? std::chrono::milliseconds::zero()
                          : std::chrono::ceil<std::chrono::milliseconds>(d);
    std::optional<result<T>> out;
    bool timed_out = false;
    caf::blocking_actor::accept_one_cond one;
    (*actor_)->varargs_receive(
        one, id_, [&](T& x) { out.emplace(std::move(x)); },
        [&](caf::error& e) {
          out.emplace(unexpected<error>{from_caf_error(e)});
        },
        caf::after(left) >>
            [&] {
              timed_out = true;
              out.emplace(make_error(errc::timeout, "request timed out"));
            });
    // A timed-out actor's reply may still come: it goes with the actor.
    if (!timed_out)
      askers_->give_back(std::move(actor_));
    return std::move(*out);
  }

private:
  node_askers* askers_;
  std::unique_ptr<caf::scoped_actor> actor_;
  caf::message_id id_;
};

/// One blocking request from a host thread, in the mailbox category of
/// `prio` (prioritized.hpp), on a borrowed actor.
template <class T, class... Ts>
result<T> ask_at(node_askers& askers, engine::priority prio,
                 const caf::actor& dest, std::chrono::milliseconds timeout,
                 Ts&&... xs) {
  if (!dest)
    return make_error(errc::invalid_argument, "actor not running");
  // The call's deadline passed in an earlier step (call_deadline).
  if (timeout <= std::chrono::milliseconds::zero())
    return make_error(errc::timeout, "request timed out");
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  return pending_reply<T>{askers, prio, dest, std::forward<Ts>(xs)...}.wait(
      deadline);
}

/// Stops `actors` and waits for them (their down messages, on `self`) until
/// `deadline`; returns how many were still running then. An engine that
/// is down has closed its store, so its memory and disk directory are free.
std::size_t stop_and_wait(caf::scoped_actor& self,
                          const std::vector<caf::actor>& actors,
                          std::chrono::steady_clock::time_point deadline) {
  for (const auto& a : actors)
    self->monitor(a);
  for (const auto& a : actors)
    self->send_exit(a, caf::exit_reason::user_shutdown);
  std::size_t down = 0;
  bool late = false;
  while (down < actors.size() && !late) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    self->receive([&](const caf::down_msg&) { ++down; },
                  caf::after(std::max(left, std::chrono::milliseconds{0})) >>
                      [&] { late = true; });
  }
  return actors.size() - down;
}

/// `e`, once the engines `started` (by node::start, before it failed)
/// are stopped and gone, so their memory and disk directories are free for
/// a start retried at once; it says so when some were still stopping after
/// `timeout`.
error stopped_engines(caf::actor_system& sys,
                      const std::vector<caf::actor>& started,
                      std::chrono::milliseconds timeout, error e) {
  caf::scoped_actor self{sys};
  const auto late =
      stop_and_wait(self, started, std::chrono::steady_clock::now() + timeout);
  if (late != 0)
    e.message += " (" + std::to_string(late) +
                 " engine(s) started before it were still stopping after "
                 "call_timeout)";
  return e;
}

/// The deadline of one node call: a call made of several requests (find
/// the engine, then reserve, write and commit on it) waits for all of them
/// together against call_timeout, not call_timeout each.
class call_deadline {
public:
  explicit call_deadline(std::chrono::milliseconds budget)
      : at_(std::chrono::steady_clock::now() + budget) {}

  /// The time left, rounded up to milliseconds; zero once it passed.
  [[nodiscard]] std::chrono::milliseconds left() const {
    const auto d = at_ - std::chrono::steady_clock::now();
    if (d <= std::chrono::steady_clock::duration::zero())
      return std::chrono::milliseconds::zero();
    return std::chrono::ceil<std::chrono::milliseconds>(d);
  }

private:
  std::chrono::steady_clock::time_point at_;
};

template <class T, class... Ts>
result<T> ask(node_askers& askers, const caf::actor& dest,
              std::chrono::milliseconds timeout, Ts&&... xs) {
  return ask_at<T>(askers, engine::priority::normal, dest, timeout,
                   std::forward<Ts>(xs)...);
}

result<void> ask_void_at(node_askers& askers, engine::priority prio,
                         const caf::actor& dest,
                         std::chrono::milliseconds timeout, auto&&... xs) {
  auto r = ask_at<bool>(askers, prio, dest, timeout,
                        std::forward<decltype(xs)>(xs)...);
  if (!r)
    return unexpected<error>{r.error()};
  return {};
}

result<void> ask_void(node_askers& askers, const caf::actor& dest,
                      std::chrono::milliseconds timeout, auto&&... xs) {
  return ask_void_at(askers, engine::priority::normal, dest, timeout,
                     std::forward<decltype(xs)>(xs)...);
}

/// caf::anon_send in the mailbox category of `prio` (prioritized.hpp).
template <class... Ts>
void anon_send_at(engine::priority prio, const caf::actor& dest, Ts&&... xs) {
  if (actors::mailbox_priority(prio) == caf::message_priority::high)
    caf::anon_send<caf::message_priority::high>(dest, std::forward<Ts>(xs)...);
  else
    caf::anon_send(dest, std::forward<Ts>(xs)...);
}

} // namespace

result<void> validate(const node_config& config) {
  if (config.engines == 0 || config.engines > actors::router::max_slots)
    return make_error(errc::invalid_argument,
                      "node_config.engines must be 1 to " +
                          std::to_string(actors::router::max_slots) +
                          " (the router's slots), got " +
                          std::to_string(config.engines));
  if (auto ok = actors::check_duration("node_config.call_timeout",
                                       config.call_timeout);
      !ok)
    return ok;
  if (auto ok = actors::validate(config.engine); !ok)
    return ok;
  // node::start sets initial_engines from `engines`, checked above.
  auto balancer = config.balancer;
  balancer.initial_engines = config.engines;
  if (auto ok = actors::validate(balancer); !ok)
    return ok;
  if (auto ok = actors::validate(config.warmer); !ok)
    return ok;
  if (config.scaler) {
    const auto& p = config.scaler->policy;
    if (auto ok = actors::validate(p); !ok)
      return ok;
    // The balancer runs at most router::max_slots engines: a larger bound
    // could never be reached (each replica past it refused) and would
    // shrink every engine's share of the prefix index for nothing.
    if (p.max_replicas > actors::router::max_slots)
      return make_error(
          errc::invalid_argument,
          "node_config.scaler.policy.max_replicas (" +
              std::to_string(p.max_replicas) + ") is above the router's " +
              std::to_string(actors::router::max_slots) + " engine slots");
    // The scaler counts the engines as its replicas and never retires below
    // min_replicas (it spawns up to it), but more than max_replicas from the
    // start would break its bound.
    if (auto ok =
            actors::validate_replicas(p, config.engines, "node_config.engines");
        !ok)
      return ok;
    // The scaler starts counting from the engines' budget (node::start
    // passes it as initial_capacity_tokens): named here as the option the
    // caller set.
    if (auto ok =
            actors::validate_capacity(p, config.engine.capacity_tokens,
                                      "node_config.engine.capacity_tokens");
        !ok)
      return ok;
    // The rest of the scaler's own options (interval, sample_priority), as
    // node::start passes them, before any engine starts.
    auto sc = *config.scaler;
    sc.initial_replicas = config.engines;
    sc.initial_capacity_tokens = config.engine.capacity_tokens;
    if (auto ok = actors::validate(sc); !ok)
      return ok;
  }
  if (config.query_cache)
    if (auto ok = actors::validate(config.cache); !ok)
      return ok;
  if (config.prefetch)
    if (auto ok = actors::validate(*config.prefetch); !ok)
      return ok;
  return {};
}

void node::configure(caf::actor_system_config& cfg, std::size_t threads) {
  cfg.add_message_types<caf::id_block::kvfleet>();
  cfg.set("scheduler.policy", caf::atom("sharing"));
  cfg.set("scheduler.max-threads", threads == 0 ? std::size_t{1} : threads);
}

node::node(caf::actor_system& sys, node_config config)
    : sys_(&sys), config_(std::move(config)),
      askers_(std::make_unique<node_askers>(sys)),
      engines_(std::make_shared<node_engines>()) {}

node::~node() {
  if (stopped_.load(std::memory_order_acquire))
    return;
  for (auto* a : {&prefetcher_, &scaler_, &cache_, &warmer_, &balancer_})
    if (*a)
      caf::anon_send_exit(*a, caf::exit_reason::user_shutdown);
}

const caf::actor& node::running(const caf::actor& a) const noexcept {
  static const caf::actor none;
  return stopped_.load(std::memory_order_acquire) ? none : a;
}

result<std::unique_ptr<node>> node::start(caf::actor_system& sys,
                                          node_config config) {
  if (auto ok = validate(config); !ok)
    return unexpected<error>{ok.error()};
  // Unset, each engine's snapshot is its share of the router's index out
  // of the most engines the node runs at once (validate() checked both are
  // positive), so that the snapshots of all engines at once fit the index
  // and no engine's recovered directory flushes another's entries: the
  // scaler's max_replicas (at least `engines`, validate() checked) with a
  // scaler, else `engines`. An engine in a slot at or past that count (a
  // replica asked of the balancer directly, or one spawned while a retired
  // engine still holds its slot) gets none: its blocks reach the index as
  // requests use them. (Before, replicas got the initial engines' share,
  // and the shares could add up to more than the index holds.)
  const std::uint32_t most_engines =
      config.scaler
          ? std::max(config.engines, config.scaler->policy.max_replicas)
          : config.engines;
  const auto snapshot_keys_of =
      [set = config.engine.snapshot_keys, most_engines,
       share = config.balancer.routing.max_index_keys /
               most_engines](std::uint32_t slot) -> std::size_t {
    return set.value_or(slot < most_engines ? share : 0);
  };
  // Fail early on a bad query-cache store (redis_url), before any engine
  // starts: an engine told to stop releases its memory and its disk
  // directory only later, so a start retried at once with the URL fixed
  // would find the directory busy. (Making the store connects nothing.)
  std::unique_ptr<actors::query_store> query_store;
  // Nodes of one model share query results through one Redis; nodes of
  // another must not, since the same query string is another prompt under
  // another namespace: the namespace's fingerprint follows the configured
  // prefix. (An empty prefix stays empty, for the store to refuse.)
  if (config.query_cache && !config.cache.redis_url.empty() &&
      !config.cache.redis.key_prefix.empty())
    config.cache.redis.key_prefix += query_key_scope(config.engine.ns);
  if (config.query_cache) {
    auto store = actors::make_query_store(config.cache);
    if (!store)
      return unexpected<error>{store.error()};
    query_store = std::move(*store);
  }
  // And, with the engine's own error, on a bad engine configuration or a
  // disk directory that does not open (missing, locked by another engine,
  // bad): every initial engine starts here, and the balancer's first call
  // of the factory for its slot takes it (so its memory, possibly a whole
  // GPU's arena, is allocated once, not probed and allocated again). Had
  // the balancer started engines 1..N-1, such an engine would only be
  // restarted until it was given up. On an error the engines started
  // before it are stopped and waited for, so their directories are free
  // for a start retried at once.
  auto ready = std::make_shared<std::vector<caf::actor>>();
  for (std::uint32_t slot = 0; slot < config.engines; ++slot) {
    auto cfg = config.engine;
    cfg.slot = slot;
    cfg.snapshot_keys = snapshot_keys_of(slot);
    auto engine = actors::spawn_engine_actor(sys, cfg);
    if (!engine)
      return unexpected<error>{stopped_engines(
          sys, *ready, config.call_timeout,
          error{engine.error().code,
                "engine " + std::to_string(slot) +
                    " did not start: " + engine.error().message})};
    ready->push_back(std::move(*engine));
  }
  std::unique_ptr<node> n{new node(sys, std::move(config))};
  auto& c = n->config_;
  c.balancer.initial_engines = c.engines;
  auto engine_cfg = c.engine;
  for (const auto& e : *ready)
    n->engines_->add(e);
  // validate() checked every configuration below, so these spawns fail only
  // on a bug in it; the caller still gets that error as a value. Only the
  // balancer calls the factory, one call at a time.
  auto balancer = actors::spawn_balancer(
      sys, c.balancer,
      [engine_cfg, ready, engines = n->engines_,
       snapshot_keys_of](caf::actor_system& s,
                         std::uint32_t slot) -> result<actors::started_engine> {
        if (slot < ready->size() && (*ready)[slot]) {
          caf::actor a = std::move((*ready)[slot]);
          (*ready)[slot] = caf::actor{};
          return actors::started_engine{std::move(a), false,
                                        engine_cfg.make_disk != nullptr};
        }
        // A restart or a replica: its store (memory arena, tiers, disk
        // tier) is made by the engine, not on the balancer's thread,
        // which goes on routing to the other engines meanwhile
        // (started_engine::opening).
        auto cfg = engine_cfg;
        cfg.slot = slot;
        cfg.snapshot_keys = snapshot_keys_of(slot);
        auto engine =
            actors::spawn_engine_actor(s, cfg, actors::store_open::on_engine);
        if (!engine)
          return unexpected<error>{engine.error()};
        try {
          engines->add(*engine);
        } catch (const std::bad_alloc&) {
          // Not known to the node, it would run on unowned, its directory
          // locked against the slot's next start.
          caf::anon_send_exit(*engine, caf::exit_reason::user_shutdown);
          return make_error(errc::out_of_memory,
                            "no host memory to register the engine of slot " +
                                std::to_string(slot));
        }
        return actors::started_engine{std::move(*engine), true,
                                      cfg.make_disk != nullptr};
      });
  if (!balancer)
    return unexpected<error>{
        stopped_engines(sys, *ready, c.call_timeout, balancer.error())};
  n->balancer_ = std::move(*balancer);
  // From here on a failure stops what was spawned and waits for the
  // engines (as a start that fails before the balancer does), so a host
  // that starts again finds their disk directories unlocked; before, `n`'s
  // destructor only told the actors to exit.
  const auto failed = [&](const error& why) {
    (void)n->stop(c.call_timeout);
    return unexpected<error>{why};
  };
  // Items checked against the engines' block size, as the query cache's
  // requests are, unless the configuration says otherwise.
  auto wc = c.warmer;
  if (wc.block_tokens == 0)
    wc.block_tokens = c.engine.ns.block_tokens;
  auto warmer = actors::spawn_warmer(sys, wc, n->balancer_);
  if (!warmer)
    return failed(warmer.error());
  n->warmer_ = std::move(*warmer);
  if (c.query_cache) {
    // The cache refuses a request the engines would refuse before it is
    // answered from the store or joins another.
    auto cc = c.cache;
    cc.block_tokens = c.engine.ns.block_tokens;
    auto cache = actors::spawn_query_cache(sys, cc, n->balancer_,
                                           std::move(query_store));
    if (!cache)
      return failed(cache.error());
    n->cache_ = std::move(*cache);
  }
  if (c.scaler) {
    auto sc = *c.scaler;
    sc.initial_replicas = c.engines;
    sc.initial_capacity_tokens = c.engine.capacity_tokens;
    auto scaler = actors::spawn_scaler(sys, std::move(sc), n->balancer_);
    if (!scaler)
      return failed(scaler.error());
    n->scaler_ = std::move(*scaler);
  }
  if (c.prefetch) {
    // Its prefetches go through the query cache, when there is one, which
    // also reports the requests it answers without the balancer.
    auto prefetcher =
        actors::spawn_prefetcher(sys, *c.prefetch, n->balancer_, n->cache_);
    if (!prefetcher)
      return failed(prefetcher.error());
    n->prefetcher_ = std::move(*prefetcher);
  }
  return n;
}

result<actors::kv_reply> node::process_request(const actors::kv_request& req) {
  // A pinning request carries the call's deadline, a little before this
  // call stops waiting (a tenth of call_timeout, at most 50 ms, for the
  // reply's way back): an engine that comes to it later does not process
  // it, and one that finishes it later takes its pins back. Before, with a
  // call_timeout shorter than the balancer's request_timeout, one that
  // timed out here could still pin, and its caller would never unpin.
  // Only a pinning one: it never joins another caller's request in the
  // query cache, whose own caller may wait longer; others keep the
  // balancer's deadline alone.
  const auto send = [&](const actors::kv_request& r) {
    if (const auto& cache = running(cache_); cache && !r.query.empty())
      return ask_at<actors::kv_reply>(*askers_, r.prio, cache,
                                      config_.call_timeout,
                                      actors::query_atom::value, r);
    return ask_at<actors::kv_reply>(*askers_, r.prio, running(balancer_),
                                    config_.call_timeout,
                                    actors::process_atom::value, r);
  };
  if (!req.pin)
    return send(req);
  actors::kv_request r = req;
  r.deadline_ns = call_deadline_ns(r.deadline_ns);
  return send(r);
}

std::int64_t node::call_deadline_ns(std::int64_t own) const {
  const auto margin = std::min<std::chrono::milliseconds>(
      config_.call_timeout / 10, std::chrono::milliseconds{50});
  const std::int64_t until =
      std::chrono::duration_cast<std::chrono::nanoseconds>(
          (sys_->clock().now() + config_.call_timeout - margin)
              .time_since_epoch())
          .count();
  return own == 0 || own > until ? until : own;
}

result<std::uint64_t> node::lookup(const std::vector<engine::block_key>& keys) {
  return ask<std::uint64_t>(*askers_, running(balancer_), config_.call_timeout,
                            actors::lookup_atom::value, keys);
}

result<caf::actor> node::engine_at(std::uint32_t slot,
                                   std::chrono::milliseconds timeout,
                                   bool retiring_too, engine::priority prio) {
  return ask_at<caf::actor>(*askers_, prio, running(balancer_), timeout,
                            actors::engine_atom::value, slot, retiring_too);
}

result<void> node::put_block(std::uint32_t slot, const actors::put_request& put,
                             const std::vector<std::uint8_t>& value) {
  // Every message of the put travels at its priority, as process_request's
  // does: a critical put's reserve, write and commit do not wait behind a
  // mailbox of normal messages at the balancer or the engine (before, they
  // all went as normal ones). A priority outside the five goes as normal,
  // and the engine refuses the reserve.
  //
  // The put carries this call's deadline, as a pinning request does (a
  // little before this call stops waiting): the engine refuses a reserve,
  // write or commit that comes to it later, and aborts the put then if it
  // is still open. Before, a reservation whose reply came back after this
  // call had given up stayed open (its ticket known to no one) and kept
  // the key busy for the engine's whole put_timeout (30 s), and a pinning
  // commit that landed after it left a pin no caller knew of.
  const auto prio = put.prio;
  const call_deadline deadline{config_.call_timeout};
  actors::put_request p = put;
  p.deadline_ns = call_deadline_ns(put.deadline_ns);
  auto engine = engine_at(slot, deadline.left(), false, prio);
  if (!engine)
    return unexpected<error>{engine.error()};
  auto ticket = ask_at<std::uint64_t>(*askers_, prio, *engine, deadline.left(),
                                      actors::reserve_atom::value, p);
  if (!ticket)
    return unexpected<error>{ticket.error()};
  auto w = ask_void_at(*askers_, prio, *engine, deadline.left(),
                       actors::write_atom::value, *ticket, value);
  if (!w) {
    // No wait for it (the call's time may be up): the engine drops the
    // reservation now, or at its put_timeout if this never arrives.
    anon_send_at(prio, *engine, actors::abort_atom::value, *ticket);
    return w;
  }
  auto c = ask_void_at(*askers_, prio, *engine, deadline.left(),
                       actors::commit_atom::value, *ticket);
  // The engine keeps a put open after a commit refused as busy (its parent
  // is still being put) or not_written, for its holder to commit later, and
  // after a commit never sent (the call's time ran out in the write's last
  // millisecond: ask_at answers errc::timeout at once); this call holds it
  // no more, so a retry would find the key in progress until the engine's
  // put_timeout. So every failed commit is followed by an abort: one that
  // finds the put ended answers true, and it cannot overtake a commit sent
  // (the same mailbox category, in order), which then lands as a late
  // commit does.
  if (!c)
    anon_send_at(prio, *engine, actors::abort_atom::value, *ticket);
  return c;
}

result<std::vector<std::uint8_t>>
node::get_block(std::uint32_t slot, const engine::block_key& key) {
  const call_deadline deadline{config_.call_timeout};
  auto engine = engine_at(slot, deadline.left(), true);
  if (!engine)
    return unexpected<error>{engine.error()};
  return ask<std::vector<std::uint8_t>>(*askers_, *engine, deadline.left(),
                                        actors::read_atom::value, key);
}

result<void> node::pin(std::uint32_t slot, const engine::block_key& key) {
  const call_deadline deadline{config_.call_timeout};
  auto engine = engine_at(slot, deadline.left(), false);
  if (!engine)
    return unexpected<error>{engine.error()};
  return ask_void(*askers_, *engine, deadline.left(), actors::pin_atom::value,
                  key);
}

result<void> node::unpin(std::uint32_t slot, const engine::block_key& key) {
  const call_deadline deadline{config_.call_timeout};
  auto engine = engine_at(slot, deadline.left(), true);
  if (!engine)
    return unexpected<error>{engine.error()};
  return ask_void(*askers_, *engine, deadline.left(), actors::unpin_atom::value,
                  key);
}

result<actors::warm_report>
node::warm(const std::vector<actors::warm_item>& items, std::uint32_t top_n,
           bool pin) {
  return ask<actors::warm_report>(
      *askers_, running(warmer_), config_.call_timeout,
      actors::warm_atom::value, items, top_n, pin, caf::actor{});
}

namespace {
/// What a warm's relay actor hands the thread of node::warm: the progress
/// reports, in order, then the outcome.
struct warm_events {
  std::mutex m;
  std::condition_variable cv;
  std::deque<std::pair<std::uint64_t, std::uint64_t>> progress;
  std::optional<result<actors::warm_report>> outcome;

  void report(std::uint64_t done, std::uint64_t total) {
    {
      const std::lock_guard lock(m);
      progress.emplace_back(done, total);
    }
    cv.notify_one();
  }
  void finish(result<actors::warm_report> r) {
    {
      const std::lock_guard lock(m);
      outcome.emplace(std::move(r));
    }
    cv.notify_one();
  }
};
} // namespace

result<actors::warm_report>
node::warm(const std::vector<actors::warm_item>& items, std::uint32_t top_n,
           bool pin, const warm_progress& on_progress) {
  if (!on_progress)
    return warm(items, top_n, pin);
  const caf::actor warmer = running(warmer_);
  if (!warmer)
    return make_error(errc::invalid_argument, "actor not running");
  const call_deadline deadline{config_.call_timeout};
  // The relay asks the warmer and takes its progress reports: the warmer
  // sends them before its reply, to the same actor, so they arrive first.
  // The calling thread runs the callback, not an actor's thread.
  auto events = std::make_shared<warm_events>();
  const caf::actor relay = sys_->spawn(
      [events, warmer, items, top_n, pin](caf::event_based_actor* self) {
        self->request(warmer, caf::infinite, actors::warm_atom::value, items,
                      top_n, pin, caf::actor_cast<caf::actor>(self))
            .then(
                [events, self](actors::warm_report& r) {
                  events->finish(std::move(r));
                  self->quit();
                },
                [events, self](caf::error& e) {
                  events->finish(unexpected<error>{from_caf_error(e)});
                  self->quit();
                });
        return caf::behavior{
            [events](actors::progress_atom, std::uint64_t done,
                     std::uint64_t total) { events->report(done, total); }};
      });
  std::unique_lock lock(events->m);
  for (;;) {
    while (!events->progress.empty()) {
      const auto [done, total] = events->progress.front();
      events->progress.pop_front();
      lock.unlock();
      try {
        on_progress(done, total);
      } catch (...) {
        // The host's exception is its own to handle; the relay goes now
        // rather than when the warmer answers.
        caf::anon_send_exit(relay, caf::exit_reason::user_shutdown);
        throw;
      }
      lock.lock();
    }
    if (events->outcome)
      return std::move(*events->outcome);
    const auto left = deadline.left();
    if (left == std::chrono::milliseconds::zero())
      break;
    events->cv.wait_for(lock, left, [&] {
      return !events->progress.empty() || events->outcome.has_value();
    });
  }
  lock.unlock();
  caf::anon_send_exit(relay, caf::exit_reason::user_shutdown);
  return make_error(errc::timeout, "request timed out");
}

result<actors::balancer_stats> node::stats() {
  return ask<actors::balancer_stats>(*askers_, running(balancer_),
                                     config_.call_timeout,
                                     actors::stats_atom::value);
}

result<actors::engine_stats> node::engine_stats(std::uint32_t slot) {
  const call_deadline deadline{config_.call_timeout};
  auto engine = engine_at(slot, deadline.left(), true);
  if (!engine)
    return unexpected<error>{engine.error()};
  return ask<actors::engine_stats>(*askers_, *engine, deadline.left(),
                                   actors::stats_atom::value);
}

result<std::uint64_t> node::persist(std::chrono::milliseconds timeout) {
  if (auto ok = actors::check_duration("node::persist timeout", timeout); !ok)
    return unexpected<error>{ok.error()};
  // Finding the engines takes at most call_timeout, all of them together.
  const call_deadline finding{config_.call_timeout};
  auto st = ask<actors::balancer_stats>(
      *askers_, running(balancer_), finding.left(), actors::stats_atom::value);
  if (!st)
    return unexpected<error>{st.error()};
  // Every engine is asked, also after one failed: a clean shutdown keeps
  // what it can, and one engine's full or slow disk must not cost the
  // others their blocks. All at once: each engine writes on its own
  // thread to its own directory, so the call takes about the slowest
  // engine's time, not the sum, and `timeout` bounds it as a whole.
  std::uint64_t blocks = 0;
  std::uint32_t asked = 0;
  std::uint32_t failed = 0;
  std::optional<error> first;
  const auto fail = [&](std::uint32_t slot, const error& e) {
    ++failed;
    if (!first)
      first =
          error{e.code, "engine " + std::to_string(slot) + ": " + e.message};
  };
  // Every slot's engine, a draining one too (the scaler retires it: it
  // takes no new requests but holds its blocks until it stops, and `up`
  // reads 0 for it). A slot with no engine (waiting for a restart, free)
  // is errc::not_found: it holds nothing in memory.
  std::vector<std::pair<std::uint32_t, caf::actor>> engines;
  for (std::uint32_t slot = 0; slot < st->up.size(); ++slot) {
    auto engine = engine_at(slot, finding.left(), true);
    if (engine) {
      engines.emplace_back(slot, std::move(*engine));
    } else if (engine.error().code != errc::not_found) {
      ++asked;
      fail(slot, engine.error());
    }
  }
  // One borrowed actor per engine (pending_reply), so the wait for one
  // engine's answer is not drawn out by the others' answers arriving
  // meanwhile: all of them end by one deadline. (With one actor for all,
  // each answer that came while it waited for another engine's started
  // that wait's timeout again: 2 engines, timeout and call_timeout 1 s,
  // returned after 3.75 s.) A reply that comes after the deadline goes
  // with its actor.
  std::vector<std::pair<std::uint32_t, pending_reply<std::uint64_t>>> replies;
  replies.reserve(engines.size());
  for (const auto& [slot, engine] : engines)
    replies.emplace_back(
        std::piecewise_construct, std::forward_as_tuple(slot),
        std::forward_as_tuple(*askers_, engine::priority::normal, engine,
                              actors::persist_atom::value,
                              static_cast<std::uint64_t>(timeout.count())));
  const auto deadline =
      std::chrono::steady_clock::now() + timeout + config_.call_timeout;
  for (auto& [slot, reply] : replies) {
    ++asked;
    if (auto n = reply.wait(deadline))
      blocks += *n;
    else
      fail(slot, n.error());
  }
  if (first)
    return make_error(first->code,
                      "node::persist: " + std::to_string(failed) + " of " +
                          std::to_string(asked) +
                          " engines failed (the others hold " +
                          std::to_string(blocks) +
                          " blocks on disk); the first: " + first->message);
  return blocks;
}

result<void> node::stop(std::chrono::milliseconds timeout) {
  if (auto ok = actors::check_duration("node::stop timeout", timeout); !ok)
    return ok;
  std::lock_guard lock{stop_mutex_};
  // From here on calls fail with "actor not running". The handles stay as
  // they are: calls on other threads read them. Stopping again goes
  // through the same steps: what has stopped answers at once, and what a
  // stop that timed out left running is waited for again.
  stopped_.store(true, std::memory_order_release);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  caf::scoped_actor self{*sys_};
  const auto stop_all = [&](const std::vector<caf::actor>& actors) {
    return stop_and_wait(self, actors, deadline);
  };
  for (auto* a : {&prefetcher_, &scaler_, &cache_, &warmer_})
    if (*a)
      self->send_exit(*a, caf::exit_reason::user_shutdown);
  // The balancer starts engines (restarts, replicas) until it is gone, so
  // the list of engines to wait for is complete only after it stopped. (It
  // stops its engines as it exits; a draining one too.)
  if (stop_all({balancer_}) > 0) {
    for (const auto& e : engines_->alive())
      self->send_exit(e, caf::exit_reason::user_shutdown);
    return make_error(errc::timeout,
                      "node::stop: the balancer was still running after " +
                          std::to_string(timeout.count()) +
                          " ms (its engines were told to stop)");
  }
  const auto engines = engines_->alive();
  if (const auto late = stop_all(engines); late > 0)
    return make_error(errc::timeout,
                      "node::stop: " + std::to_string(late) + " of " +
                          std::to_string(engines.size()) +
                          " engines were still running after " +
                          std::to_string(timeout.count()) + " ms");
  return {};
}

} // namespace kvfleet
