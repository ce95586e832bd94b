#include "actors/query_cache_actor.hpp"

#include "actors/caf_error.hpp"
#include "actors/config_checks.hpp"
#include "actors/listeners.hpp"
#include "actors/messages.hpp"
#include "actors/owed_reply.hpp"
#include "actors/prioritized.hpp"
#include "actors/router.hpp"
#include "actors/stray_messages.hpp"
#include "engine/block_key.hpp"
#include "engine/eviction_policy.hpp"

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <limits>
#include <locale>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/duration.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/response_promise.hpp>
#include <caf/stateful_actor.hpp>

namespace kvfleet::actors {

// Both in the classic locale: the encoding is shared between processes
// (Redis), and a host's global locale with digit grouping ("1,234") would
// write entries that a process without it cannot read, and the other way.
std::string encode_reply(const kv_reply& r) {
  std::ostringstream out;
  out.imbue(std::locale::classic());
  out << "v1 " << r.engine << ' ' << r.matched_blocks << ' '
      << r.computed_blocks << ' ' << r.matched_tokens << ' '
      << r.computed_tokens;
  return out.str();
}

namespace {

/// One field of an entry: the digits of an unsigned number and nothing
/// else (no sign, no space, no grouping; std::from_chars ignores locales).
template <class T> bool parse_field(std::string_view text, T& out) {
  if (text.empty())
    return false;
  const auto [end, ec] =
      std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc{} && end == text.data() + text.size();
}

} // namespace

bool decode_reply(const std::string& s, kv_reply& out) {
  // Exactly what encode_reply writes: "v1" and five numbers, one space
  // apart. Anything else (a corrupt entry, another program's value under
  // the prefix) is not a reply: a negative number would otherwise wrap to
  // a huge count, and trailing text would pass unseen.
  std::string_view rest = s;
  std::string_view fields[6];
  for (std::size_t i = 0; i < 6; ++i) {
    const auto sp = rest.find(' ');
    if ((sp == std::string_view::npos) != (i == 5))
      return false;
    fields[i] = rest.substr(0, sp);
    rest =
        sp == std::string_view::npos ? std::string_view{} : rest.substr(sp + 1);
  }
  kv_reply r = out;
  if (fields[0] != "v1" || !parse_field(fields[1], r.engine) ||
      !parse_field(fields[2], r.matched_blocks) ||
      !parse_field(fields[3], r.computed_blocks) ||
      !parse_field(fields[4], r.matched_tokens) ||
      !parse_field(fields[5], r.computed_tokens))
    return false;
  // Well-formed but impossible (another program's value): no engine slot
  // at or above router::max_slots, and a request's tokens are one
  // uint32 (input_tokens), its blocks at most one per token, so neither
  // sum exceeds that (nor, checked first, overflows).
  constexpr std::uint64_t most = std::numeric_limits<std::uint32_t>::max();
  if (r.engine >= router::max_slots || r.matched_blocks > most ||
      r.computed_blocks > most - r.matched_blocks || r.matched_tokens > most ||
      r.computed_tokens > most - r.matched_tokens)
    return false;
  out = r;
  return true;
}

namespace {

/// A query on its way to the balancer. The first reply answers every
/// waiter; a reply of an earlier round (the key was answered and asked
/// again since) is ignored.
struct waiter {
  std::uint64_t id = 0;
  owed_reply promise;
  /// A joiner not sent to the balancer, kept while the cache has listeners
  /// (reported to them with the reply that answers it), and when it came.
  std::optional<kv_request> joined;
  engine::nanos arrived{0};
  /// Its caller's session, priority and deadline (kv_request::deadline_ns;
  /// 0: none), for a request sent again for it.
  std::uint64_t session = 0;
  engine::priority prio = engine::priority::normal;
  std::int64_t deadline_ns = 0;
  /// A request was sent again for it once (at most once per waiter).
  bool retried = false;
};

/// A request of a round on its way to the balancer.
struct sent_request {
  engine::priority prio = engine::priority::normal;
  std::int64_t deadline_ns = 0; ///< its caller's; 0: none

  friend bool operator==(const sent_request&, const sent_request&) = default;
};

struct pending_query {
  std::vector<waiter> waiters;
  /// Requests to the balancer still open: a failed one no longer counts,
  /// so a joiner is measured against what is on its way.
  std::vector<sent_request> open;
  /// The round's first request: its keys and tokens, for a request sent
  /// again for waiters a timeout was not theirs.
  kv_request sample;
  /// The requests of the round that timed out since the last was sent:
  /// whether one had no deadline (it ended at the balancer's own
  /// request_timeout, as every waiter's own request would), else the
  /// latest of their deadlines.
  bool timed_out_without_deadline = false;
  std::int64_t timed_out_latest_deadline = 0;
  std::uint64_t round = 0;
  /// The block and token counts of the round's requests: one of the key
  /// with other counts is another prompt, which the round's reply does not
  /// answer.
  std::size_t blocks = 0;
  std::uint32_t tokens = 0;

  [[nodiscard]] std::size_t unanswered() const noexcept { return open.size(); }
  /// Notes a request of the round sent to the balancer.
  void sent(const kv_request& r) { open.push_back({r.prio, r.deadline_ns}); }
  /// Notes that `r` failed (with a timeout when `timed_out`).
  void failed(const sent_request& r, bool timed_out) {
    if (auto at = std::find(open.begin(), open.end(), r); at != open.end())
      open.erase(at);
    if (!timed_out)
      return;
    timed_out_without_deadline =
        timed_out_without_deadline || r.deadline_ns == 0;
    timed_out_latest_deadline =
        std::max(timed_out_latest_deadline, r.deadline_ns);
  }
  /// Whether, every request of the round having ended (the last by a
  /// timeout), a waiter of deadline `deadline_ns` (0: none) gets one more:
  /// the requests that timed out each ran to its caller's deadline, which
  /// has passed at `now_ns`, and the waiter's is later and still to come.
  /// Not when one of them had no deadline: the balancer's own timeout
  /// ended it, which the waiter's own request would meet too.
  [[nodiscard]] bool outlasts(std::int64_t deadline_ns,
                              std::int64_t now_ns) const noexcept {
    if (timed_out_without_deadline || timed_out_latest_deadline == 0 ||
        now_ns < timed_out_latest_deadline)
      return false;
    return deadline_ns == 0 ||
           (deadline_ns > timed_out_latest_deadline && deadline_ns > now_ns);
  }
  /// Whether a request of `p` or higher is still on its way.
  [[nodiscard]] bool sent_at_least(engine::priority p) const noexcept {
    return std::any_of(open.begin(), open.end(),
                       [p](const sent_request& r) { return r.prio >= p; });
  }
  /// Whether `req` is the round's prompt: its block and token counts.
  [[nodiscard]] bool same_prompt(const kv_request& req) const noexcept {
    return blocks == req.keys.size() && tokens == req.input_tokens;
  }
};

struct cache_state {
  query_cache_config config;
  std::unique_ptr<query_store> store;
  caf::actor balancer;
  std::unordered_map<std::string, pending_query> waiting;
  std::uint64_t next_round = 0;
  query_cache_stats stats;
  std::vector<caf::actor> listeners; ///< listeners.hpp
  static inline const char* name = "kvfleet.query_cache";
};

using cache_actor = caf::stateful_actor<cache_state>;

engine::nanos now(cache_actor* self) {
  return std::chrono::duration_cast<engine::nanos>(
      self->clock().now().time_since_epoch());
}

/// Tells the listeners that the cache answered `req` with `rep` without the
/// balancer (which reports the requests it carries itself), `latency` ns
/// after it came.
void notify(cache_actor* self, const kv_request& req, const kv_reply& rep,
            engine::nanos latency) {
  for (auto& l : self->state.listeners)
    self->send(l, observe_atom::value, req, rep,
               static_cast<std::int64_t>(latency.count()));
}

/// Stores a computed reply of `key` for the TTL (call it after the reply
/// is delivered: with Redis it waits for the SET); a store error is
/// counted. A reply with blocks the engine computed but could not cache is
/// not stored: a hit on it would keep the query from the engines, which
/// never cache those blocks then, for the whole TTL.
void store_reply(cache_actor* self, const std::string& key,
                 const kv_reply& rep) {
  auto& s = self->state;
  if (rep.uncached_blocks > 0)
    return;
  if (!s.store->set(key, encode_reply(rep),
                    std::chrono::duration_cast<engine::nanos>(s.config.ttl),
                    now(self)))
    ++s.stats.store_errors;
}

/// Sends a request to the balancer on its own, joining no other of its key
/// (one that pins its blocks, or one of another block count than the miss
/// of its key on its way), and answers `promise` with its reply (stored
/// like a miss's) or its error.
void ask_balancer_alone(cache_actor* self, kv_request req,
                        const caf::response_promise& promise) {
  auto owed = std::make_shared<owed_reply>(promise);
  auto key = req.query;
  const auto prio = req.prio;
  request_at(self, prio, self->state.balancer, caf::infinite,
             process_atom::value, std::move(req))
      .then(
          [=](const kv_reply& rep) {
            owed->deliver(rep);
            store_reply(self, key, rep);
          },
          [=](caf::error& err) { owed->deliver(err); });
}

/// Sends `req` (a miss of `key` in `round`, from the round's waiter at
/// `sender`) to the balancer in its priority; its reply answers the round's
/// waiters unless another reply did already. Every waiter but the sender
/// gets it with kv_reply::joined set: another request did that work, one
/// that sent none of its own or one whose own request lost the race.
void ask_balancer(cache_actor* self, const std::string& key,
                  std::uint64_t round, std::size_t sender, kv_request req) {
  auto& s = self->state;
  const auto prio = req.prio;
  const sent_request sent{req.prio, req.deadline_ns};
  // No timer of our own: the balancer answers every request, at the latest
  // with its own request_timeout (one timer for all its calls), and another
  // CAF timer per miss would only wake CAF's clock thread for nothing.
  request_at(self, prio, s.balancer, caf::infinite, process_atom::value,
             std::move(req))
      .then(
          [=](const kv_reply& rep) {
            auto& s2 = self->state;
            auto it = s2.waiting.find(key);
            if (it == s2.waiting.end() || it->second.round != round)
              return; // answered already
            auto list = std::move(it->second.waiters);
            s2.waiting.erase(it);
            for (std::size_t i = 0; i < list.size(); ++i) {
              auto& w = list[i];
              auto copy = rep;
              copy.id = w.id;
              copy.joined = i != sender;
              if (w.joined)
                notify(self, *w.joined, copy, now(self) - w.arrived);
              w.promise.deliver(std::move(copy));
            }
            store_reply(self, key, rep);
          },
          [=](caf::error& err) {
            auto& s2 = self->state;
            auto it = s2.waiting.find(key);
            if (it == s2.waiting.end() || it->second.round != round)
              return;
            // Another request of the round may still succeed.
            auto& pending = it->second;
            pending.failed(sent, is_timeout(err));
            if (pending.unanswered() > 0)
              return;
            // Every request of the round has ended, the last by `err`. A
            // waiter that joined requests which timed out at their
            // callers' deadlines, with a later deadline of its own or none,
            // is not answered with that timeout: once per waiter, one more
            // request goes for those, in the highest priority among them
            // and with no deadline if one has none, else the latest.
            std::vector<waiter> keep;
            const auto t = now(self).count();
            if (is_timeout(err))
              for (auto& w : pending.waiters)
                if (!w.retried && pending.outlasts(w.deadline_ns, t))
                  keep.push_back(std::move(w));
            for (auto& w : pending.waiters)
              if (w.promise.pending())
                w.promise.deliver(err);
            if (keep.empty()) {
              s2.waiting.erase(it);
              return;
            }
            std::size_t first = 0;
            bool none = false;
            std::int64_t latest = 0;
            for (std::size_t i = 0; i < keep.size(); ++i) {
              if (keep[i].prio > keep[first].prio)
                first = i;
              none = none || keep[i].deadline_ns == 0;
              latest = std::max(latest, keep[i].deadline_ns);
            }
            // Each kept waiter as a request of its own (its session,
            // priority and deadline), for the listeners: the one sent is
            // reported by the balancer, the others by the reply's notify.
            const bool listening = !s2.listeners.empty();
            for (std::size_t i = 0; i < keep.size(); ++i) {
              auto& w = keep[i];
              w.retried = true;
              if (i == first || !listening) {
                w.joined.reset();
                continue;
              }
              if (!w.joined) {
                kv_request as_own = pending.sample;
                as_own.id = w.id;
                as_own.session = w.session;
                as_own.prio = w.prio;
                as_own.deadline_ns = w.deadline_ns;
                w.joined = std::move(as_own);
              }
            }
            kv_request again = pending.sample;
            again.id = keep[first].id;
            again.session = keep[first].session;
            again.prio = keep[first].prio;
            again.deadline_ns = none ? 0 : latest;
            pending.waiters = std::move(keep);
            pending.timed_out_without_deadline = false;
            pending.timed_out_latest_deadline = 0;
            pending.sent(again);
            ask_balancer(self, key, round, first, std::move(again));
          });
}

/// The store travels to the actor in a shared_ptr because spawn arguments are
/// copied; the actor takes sole ownership on start.
caf::behavior
cache_behavior(cache_actor* self, query_cache_config config,
               caf::actor balancer,
               std::shared_ptr<std::unique_ptr<query_store>> store) {
  auto& st = self->state;
  st.config = config;
  st.store = std::move(*store);
  st.balancer = balancer;
  handle_stray_messages(self, "query cache");
  // It monitors its listeners only.
  self->set_down_handler([=](caf::down_msg& dm) {
    drop_listener(self->state.listeners, dm.source);
  });
  return {
      [=](query_atom, kv_request& req) -> caf::result<kv_reply> {
        auto& s = self->state;
        if (req.query.empty())
          return to_caf_error(
              error{errc::invalid_argument, "request has no query key"});
        // Refused before it is answered from the store or joins another
        // request of its key: a bad priority or a key count that does not
        // fit its tokens would otherwise be answered (a hit), or become the
        // miss that others join and then fail them all with its refusal.
        if (auto ok = engine::check_priority(req.prio); !ok)
          return to_caf_error(ok.error());
        if (auto ok = engine::check_request_keys(req.keys); !ok)
          return to_caf_error(ok.error());
        if (s.config.block_tokens > 0)
          if (auto ok = engine::check_block_keys(
                  req.keys.size(), req.input_tokens, s.config.block_tokens);
              !ok)
            return to_caf_error(ok.error());
        // A request that pins its blocks (warming) must reach an engine: a
        // stored reply, or the reply of another request of its key, pinned
        // nothing, though the latter would read as computed for it.
        const auto alone = [&] {
          ++s.stats.misses;
          auto promise = self->make_response_promise();
          ask_balancer_alone(self, std::move(req), promise);
          return promise;
        };
        if (req.pin)
          return alone();
        // A key whose miss is on its way joins it without reading the
        // store (one GET fewer per joining request, a Redis round trip
        // each). An entry stored meanwhile (another node on the same
        // Redis, a pinning request of the key) is then a missed hit, not
        // a wrong reply: the joiner gets the miss's reply. Not when that
        // miss has another block or token count (another prompt under the
        // same query key: its reply is not this one's answer): the store
        // may hold this one's, and else it goes on its own.
        auto in_flight = s.waiting.find(req.query);
        const bool other_prompt_on_its_way =
            in_flight != s.waiting.end() && !in_flight->second.same_prompt(req);
        if (in_flight == s.waiting.end() || other_prompt_on_its_way) {
          auto got = s.store->get(req.query, now(self));
          if (!got)
            ++s.stats.store_errors;
          else if (got->has_value()) {
            kv_reply rep;
            if (!decode_reply(**got, rep))
              ++s.stats.store_errors; // one it cannot read: recomputed
            // A reply of as many blocks and tokens as the request has: one
            // of other counts answered another prompt under the same query
            // key (its blocks were never computed for this one, or its
            // token counts do not add up to this prompt's), so this request
            // is a miss, and its reply replaces that entry.
            else if (rep.matched_blocks + rep.computed_blocks ==
                         req.keys.size() &&
                     rep.matched_tokens + rep.computed_tokens ==
                         req.input_tokens) {
              ++s.stats.hits;
              rep.id = req.id;
              rep.from_query_cache = true;
              notify(self, req, rep, engine::nanos{0});
              return rep;
            }
          }
        }
        if (other_prompt_on_its_way)
          return alone();
        ++s.stats.misses;
        auto promise = self->make_response_promise();
        auto key = req.query;
        auto& pending =
            in_flight != s.waiting.end() ? in_flight->second : s.waiting[key];
        pending.waiters.push_back({req.id,
                                   owed_reply{promise},
                                   {},
                                   now(self),
                                   req.session,
                                   req.prio,
                                   req.deadline_ns,
                                   false});
        if (pending.waiters.size() > 1) {
          ++s.stats.coalesced;
          // A waiter of higher priority than every request on its way must
          // not wait behind lower-priority traffic: it goes too (also when
          // the higher-priority one sent before has failed meanwhile). Its
          // deadline does not matter here: one whose request times out
          // before its own deadline gets one more (above).
          if (pending.sent_at_least(req.prio)) {
            if (!s.listeners.empty()) {
              pending.waiters.back().joined = std::move(req);
              pending.waiters.back().arrived = now(self);
            }
            return promise;
          }
        } else {
          pending.round = ++s.next_round;
          pending.blocks = req.keys.size();
          pending.tokens = req.input_tokens;
          pending.sample = req;
        }
        pending.sent(req);
        ask_balancer(self, key, pending.round, pending.waiters.size() - 1,
                     std::move(req));
        return promise;
      },
      [=](stats_atom) -> caf::result<query_cache_stats> {
        return self->state.stats;
      },
      [=](listen_atom, const caf::actor& listener) {
        add_listener(self, self->state.listeners, listener);
      },
  };
}

} // namespace

result<void> validate(const query_cache_config& config) {
  // A year: an expiry time far past it would overflow the clock's
  // nanoseconds and lie in the past, so every entry would expire at once.
  if (auto ok = check_duration("query_cache_config.ttl", config.ttl, false,
                               std::chrono::hours{24 * 365});
      !ok)
    return ok;
  // The embedded store's bound: 0 would hold one entry (its constructor's
  // floor), which is no cache and not what was asked.
  if (config.redis_url.empty() && config.max_entries == 0)
    return make_error(errc::invalid_argument,
                      "query_cache_config.max_entries must be at least 1 "
                      "(turn the cache off with node_config.query_cache)");
  // Below one entry of an empty query, the store would hold nothing.
  constexpr std::size_t least_bytes =
      embedded_query_store::entry_overhead_bytes + max_encoded_reply_bytes;
  if (config.redis_url.empty() && config.max_bytes < least_bytes)
    return make_error(errc::invalid_argument,
                      "query_cache_config.max_bytes must be at least " +
                          std::to_string(least_bytes) +
                          " (one entry and its bookkeeping), not " +
                          std::to_string(config.max_bytes));
  // redis_url selects the store and replaces redis.url: a URL set only
  // there would be dropped in silence and the cache run in process. (The
  // URL is not quoted: it may hold a password.)
  if (!config.redis.url.empty() && config.redis.url != config.redis_url)
    return make_error(errc::invalid_argument,
                      "query_cache_config.redis.url is not used: the Redis "
                      "URL goes in query_cache_config.redis_url (empty: the "
                      "embedded store)");
  // Below the longest entry, some sets would fail for good (counted only).
  if (!config.redis_url.empty() &&
      config.redis.max_value_bytes < max_encoded_reply_bytes)
    return make_error(
        errc::invalid_argument,
        "query_cache_config.redis.max_value_bytes must be at least " +
            std::to_string(max_encoded_reply_bytes) +
            " (the cache's longest entry), not " +
            std::to_string(config.redis.max_value_bytes));
  return {};
}

result<std::unique_ptr<query_store>>
make_query_store(const query_cache_config& config) {
  if (auto ok = validate(config); !ok)
    return unexpected<error>{ok.error()};
  if (config.redis_url.empty())
    return std::unique_ptr<query_store>{std::make_unique<embedded_query_store>(
        config.max_entries, config.max_bytes)};
  auto rc = config.redis;
  rc.url = config.redis_url;
  auto store = redis_query_store::open(std::move(rc));
  if (!store)
    return unexpected<error>{store.error()};
  return std::unique_ptr<query_store>{std::move(*store)};
}

result<caf::actor> spawn_query_cache(caf::actor_system& sys,
                                     query_cache_config config,
                                     caf::actor balancer) {
  auto store = make_query_store(config);
  if (!store)
    return unexpected<error>{store.error()};
  return spawn_query_cache(sys, std::move(config), std::move(balancer),
                           std::move(*store));
}

result<caf::actor> spawn_query_cache(caf::actor_system& sys,
                                     query_cache_config config,
                                     caf::actor balancer,
                                     std::unique_ptr<query_store> store) {
  if (auto ok = validate(config); !ok)
    return unexpected<error>{ok.error()};
  if (auto ok = check_balancer(balancer, "spawn_query_cache"); !ok)
    return unexpected<error>{ok.error()};
  if (!store)
    return make_error(errc::invalid_argument,
                      "spawn_query_cache: the query store is null");
  bool detach = store->blocking();
  auto boxed = std::make_shared<std::unique_ptr<query_store>>(std::move(store));
  // CAF throws when it cannot make a detached actor's thread
  // (std::system_error) or allocate the actor: error values here, as
  // spawn_engine_actor's, so node::start stops what it started.
  try {
    if (detach)
      return sys.spawn<caf::detached>(cache_behavior, std::move(config),
                                      std::move(balancer), std::move(boxed));
    return sys.spawn(cache_behavior, std::move(config), std::move(balancer),
                     std::move(boxed));
  } catch (const std::bad_alloc&) {
    return make_error(errc::out_of_memory,
                      "no host memory to spawn the query cache actor");
  } catch (const std::system_error& ex) {
    return make_error(errc::unavailable,
                      std::string("cannot start the thread of the query "
                                  "cache actor (its Redis store blocks): ") +
                          ex.what());
  }
}

} // namespace kvfleet::actors
