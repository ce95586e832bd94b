#include "actors/prefetch_actor.hpp"

#include "actors/caf_error.hpp"
#include "actors/digest_key.hpp"
#include "actors/messages.hpp"
#include "actors/prefetch_tracker.hpp"
#include "actors/stray_messages.hpp"

#include <cmath>
#include <cstdio>
#include <iterator>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>

#include <caf/actor_system.hpp>
#include <caf/duration.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>

namespace kvfleet::actors {
namespace {

struct prefetch_state {
  prefetch_config config;
  std::optional<transition_model> model;
  caf::actor balancer;
  caf::actor front; ///< the query-result cache, when prefetches go through it
  /// The last request seen of each query, to replay it; least recently
  /// seen first in `known_order`, evicted past max_known queries or
  /// max_known_keys block keys in all.
  struct known_query {
    kv_request request;
    std::list<std::string>::iterator order;
  };
  std::unordered_map<std::string, known_query> known; ///< by query id
  std::list<std::string> known_order;
  std::size_t known_keys = 0;
  std::size_t known_query_bytes = 0;
  std::optional<prefetch_tracker> outstanding;
  prefetch_stats stats;
  std::uint64_t next_id = 1ULL << 62;
  static inline const char* name = "kvfleet.prefetcher";
};

using prefetch_actor = caf::stateful_actor<prefetch_state>;

/// The request's query id (prefetch_query_id): its query's, or its last
/// block key's when it has none (prefetch_key_query_id).
std::string query_of(const kv_request& r) {
  if (!r.query.empty())
    return prefetch_query_id(r.query);
  return r.keys.empty() ? std::string{} : prefetch_key_query_id(r.keys.back());
}

void forget(
    prefetch_state& st,
    std::unordered_map<std::string, prefetch_state::known_query>::iterator it) {
  st.known_keys -= it->second.request.keys.size();
  st.known_query_bytes -= it->second.request.query.size();
  st.known_order.erase(it->second.order);
  st.known.erase(it);
}

void remember(prefetch_state& st, const std::string& q, const kv_request& r) {
  auto it = st.known.find(q);
  if (r.keys.size() > st.config.max_known_keys ||
      r.query.size() > st.config.max_known_query_bytes) {
    // More than the whole bound: not kept (nor an older request of its
    // query), and nothing else goes for it.
    if (it != st.known.end())
      forget(st, it);
    return;
  }
  if (it == st.known.end()) {
    st.known_order.push_back(q);
    it = st.known
             .emplace(q,
                      prefetch_state::known_query{
                          r, std::prev(st.known_order.end())})
             .first;
  } else {
    st.known_keys -= it->second.request.keys.size();
    st.known_query_bytes -= it->second.request.query.size();
    it->second.request = r;
    // Seen again: the most recent (before, first seen went first, so a
    // hot query was forgotten as often as a one-off).
    st.known_order.splice(st.known_order.end(), st.known_order,
                          it->second.order);
  }
  st.known_keys += r.keys.size();
  st.known_query_bytes += r.query.size();
  while (!st.known_order.empty() &&
         (st.known.size() > st.config.max_known ||
          st.known_keys > st.config.max_known_keys ||
          st.known_query_bytes > st.config.max_known_query_bytes))
    forget(st, st.known.find(st.known_order.front()));
}

/// Counts what the tracker made of a prefetch.
void count(prefetch_stats& stats, prefetch_tracker::outcome out) {
  if (out == prefetch_tracker::outcome::useful)
    ++stats.useful;
  else if (out == prefetch_tracker::outcome::wasted)
    ++stats.wasted;
}

void issue(prefetch_actor* self, const std::string& q) {
  auto& st = self->state;
  auto it = st.known.find(q);
  if (it == st.known.end())
    return;
  const auto id = st.next_id;
  // The tracker refuses a query whose prefetch is still outstanding: it is
  // not prefetched twice.
  if (!st.outstanding->add(q, it->second.request.keys, id))
    return;
  ++st.next_id;
  kv_request req = it->second.request;
  req.id = id;
  req.prio = engine::priority::low;
  req.prefetch = true;
  req.pin = false;
  // The deadline of the request it was learnt from (a pinning node call's)
  // has long passed: the balancer gives it its own.
  req.deadline_ns = 0;
  ++st.stats.issued;
  // Through the query-result cache when there is one (and the query has a
  // key there): a result it holds answers the prefetch from its store, with
  // no engine work, and a computed one is stored there for the query's
  // next request. A prefetch the balancer could not carry out (no engine,
  // its timeout), or one the cache answered from its store, prefetched
  // nothing: it is no longer outstanding, so the next prediction may send
  // it again. So did one that joined a request of its query already on its
  // way in the cache (a user's, say): that request computed the result, and
  // would have without the prefetch, so it counts cached, not useful or
  // wasted. One whose query was requested before its reply is judged at the
  // reply.
  const bool via_front = st.front && !req.query.empty();
  auto on_reply = [self, q, id, via_front](const kv_reply& rep) {
    auto& s = self->state;
    if (rep.from_query_cache || rep.joined) {
      if (s.outstanding->discard(q, id))
        ++s.stats.cached;
      return;
    }
    // Through the result cache, its answer is stored there for the query,
    // unless the engine could not cache every block it computed (the cache
    // stores no such reply): then only the engine holds what it did.
    const bool stored = via_front && rep.uncached_blocks == 0;
    // The engine found every block in memory already: the prefetch did no
    // work, so its query finding the blocks later owes it nothing (it would
    // have found them without it). Not when it brought blocks back from
    // the memory tier or disk (work, though nothing was computed), nor
    // when the result cache stored its answer for the query.
    if (rep.computed_blocks == 0 && rep.promoted_blocks == 0 && !stored) {
      if (s.outstanding->discard(q, id))
        ++s.stats.redundant;
      return;
    }
    // Its leading blocks found in memory (before any brought back): a
    // request sharing no more than those got nothing from it.
    count(s.stats, s.outstanding->answered(q, id, rep.engine, stored,
                                           rep.memory_blocks));
  };
  auto on_error = [self, q, id](caf::error&) {
    if (self->state.outstanding->discard(q, id))
      ++self->state.stats.failed;
  };
  if (via_front)
    self->request(st.front, caf::infinite, query_atom::value, std::move(req))
        .then(std::move(on_reply), std::move(on_error));
  else
    self->request(st.balancer, caf::infinite, process_atom::value,
                  std::move(req))
        .then(std::move(on_reply), std::move(on_error));
}

/// The model and the tracker travel to the actor in shared_ptrs because
/// spawn arguments are copied (a tracker is move-only); the actor takes them
/// on start.
caf::behavior prefetch_behavior(prefetch_actor* self, prefetch_config config,
                                caf::actor balancer, caf::actor front,
                                std::shared_ptr<transition_model> model,
                                std::shared_ptr<prefetch_tracker> tracker) {
  auto& st = self->state;
  st.config = config;
  st.model.emplace(std::move(*model));
  st.outstanding.emplace(std::move(*tracker));
  st.balancer = balancer;
  st.front = front;
  self->send(balancer, listen_atom::value, caf::actor{self});
  // The cache reports the requests it answers without the balancer (hits,
  // and requests that joined another's computation): user traffic too.
  if (front)
    self->send(front, listen_atom::value, caf::actor{self});
  handle_stray_messages(self, "prefetcher");
  return {
      [=](observe_atom, const kv_request& req, const kv_reply& rep,
          std::int64_t) {
        auto& s = self->state;
        // Served traffic only, as the scaler samples: not its own
        // prefetches, nor warm queries and background work (low and
        // background priority), whose order (a warm list's) is no user's
        // and would be learned as transitions, set off prefetches and mark
        // prefetches used.
        if (req.prefetch || req.prio < engine::priority::normal)
          return;
        auto q = query_of(req);
        if (q.empty())
          return;
        ++s.stats.observed;
        // A request that joined another's computation in the result
        // cache (joined) got that request's reply, the prefetch's when
        // that one was its query's prefetch: answered by the cache, as a
        // hit is, not by an engine whose reply describes the prefetch's
        // work.
        count(s.stats,
              s.outstanding->used(q, req.keys,
                                  {rep.engine, rep.matched_blocks,
                                   rep.from_query_cache || rep.joined}));
        remember(s, q, req);
        s.model->observe(req.session, q);
        // Not the query itself (cached just now): the likeliest other one,
        // which a repeat ahead of it would otherwise hide.
        auto p = s.model->predict_other(req.session, q);
        if (p && p->confidence >= s.config.threshold)
          issue(self, p->query);
      },
      [](latency_atom, const kv_request&, std::int64_t) {
        // A timed-out request: no transition is learned from it.
      },
      [=](const block_events& ev) {
        auto& s = self->state;
        for (const auto& k : ev.evicted)
          s.stats.wasted += s.outstanding->evicted(ev.engine, k).size();
      },
      [=](stats_atom) -> caf::result<prefetch_stats> {
        auto out = self->state.stats;
        out.forgotten = self->state.outstanding->forgotten();
        out.outstanding = self->state.outstanding->size();
        out.tracked_queries = self->state.model->query_count();
        return out;
      },
  };
}

} // namespace

result<void> validate(const prefetch_config& config) {
  const auto bad = [](const std::string& what) -> result<void> {
    return make_error(errc::invalid_argument, "prefetch_config." + what);
  };
  // Written so that NaN fails each range check.
  if (!(config.threshold >= 0.0 && config.threshold <= 1.0))
    return bad("threshold must be in [0, 1], not " +
               std::to_string(config.threshold));
  if (auto ok = validate(config.model, "prefetch_config.model."); !ok)
    return ok;
  if (config.max_known == 0)
    return bad("max_known must be at least 1");
  if (config.max_known_keys == 0)
    return bad("max_known_keys must be at least 1");
  if (config.max_known_query_bytes == 0)
    return bad("max_known_query_bytes must be at least 1");
  if (config.max_outstanding == 0)
    return bad("max_outstanding must be at least 1");
  if (config.max_tracked_keys == 0)
    return bad("max_tracked_keys must be at least 1");
  return {};
}

std::string prefetch_query_id(const std::string& query) {
  // 65 bytes for a longer one: no query kept as itself (64 bytes at most)
  // is one.
  return digest_long_key(query, prefetch_query_id_max_bytes);
}

std::string prefetch_key_query_id(const engine::block_key& last) {
  // '@', 32 hex digits, '@' up to 65 bytes: longer than any query kept as
  // itself, and a digest of a longer one starts with '#'.
  return padded_hex_id('@', last.to_hex(), prefetch_query_id_max_bytes);
}

result<caf::actor> spawn_prefetcher(caf::actor_system& sys,
                                    prefetch_config config, caf::actor balancer,
                                    caf::actor front) {
  if (auto ok = validate(config); !ok)
    return unexpected<error>{ok.error()};
  if (auto ok = check_balancer(balancer, "spawn_prefetcher"); !ok)
    return unexpected<error>{ok.error()};
  auto tracker =
      prefetch_tracker::create(config.max_outstanding, config.max_tracked_keys);
  if (!tracker)
    return unexpected<error>{tracker.error()};
  auto model = transition_model::create(config.model);
  if (!model)
    return unexpected<error>{model.error()};
  return sys.spawn(prefetch_behavior, std::move(config), std::move(balancer),
                   std::move(front),
                   std::make_shared<transition_model>(std::move(*model)),
                   std::make_shared<prefetch_tracker>(std::move(*tracker)));
}

} // namespace kvfleet::actors
