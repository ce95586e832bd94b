#include "actors/warmer_actor.hpp"

#include "actors/caf_error.hpp"
#include "actors/messages.hpp"
#include "actors/owed_reply.hpp"
#include "actors/stray_messages.hpp"
#include "engine/block_key.hpp"
#include "engine/kv_namespace.hpp"

#include <algorithm>
#include <cmath>
#include <deque>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <utility>

#include <caf/actor_system.hpp>
#include <caf/duration.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/response_promise.hpp>
#include <caf/stateful_actor.hpp>

namespace kvfleet::actors {

std::vector<std::vector<std::size_t>>
select_chains(const std::vector<warm_item>& items, std::size_t n) {
  std::vector<std::size_t> idx(items.size());
  std::iota(idx.begin(), idx.end(), std::size_t{0});
  // A NaN frequency (unknown) ranks below every number: compared with `>`
  // it would tie with everything, which is no ordering at all, and a NaN
  // item could be picked ahead of the hottest query.
  std::stable_sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) {
    const double fa = items[a].frequency;
    const double fb = items[b].frequency;
    if (std::isnan(fa))
      return false;
    return std::isnan(fb) || fa > fb;
  });
  // The same blocks twice (whatever the queries are called, and whatever
  // their input_tokens: only full blocks are cached, so those are the
  // same blocks) are one query, warmed once at its highest rank: a copy
  // warmed at the same time could be routed to another engine and pin its
  // blocks there too, which an unpin of the first engine leaves pinned.
  // And a query whose blocks lead another selected one's (a chat's earlier
  // turn, a system prompt) is warmed by that one: the longer request
  // stores, and pins, its blocks too. So each chain is sent once, the
  // longest selected, at the rank of the first query of it selected; its
  // shorter queries are kept to be sent if it fails.
  const auto keys_less = [&](std::size_t a, std::size_t b) {
    return items[a].request.keys < items[b].request.keys;
  };
  std::set<std::size_t, decltype(keys_less)> seen(keys_less);
  // The longest query of each chain -> the chain's place in `out`. None
  // leads another (a shorter query may lead two of them: it is kept in the
  // one sorting first by keys; the chains share its blocks, as siblings
  // share a prefix).
  std::map<std::size_t, std::size_t, decltype(keys_less)> chains(keys_less);
  const auto leads = [&](std::size_t a, std::size_t b) {
    const auto& x = items[a].request.keys;
    const auto& y = items[b].request.keys;
    return x.size() <= y.size() && std::equal(x.begin(), x.end(), y.begin());
  };
  std::vector<std::vector<std::size_t>> out;
  std::size_t queries = 0;
  for (const std::size_t i : idx) {
    if (queries >= n)
      break;
    if (!seen.insert(i).second)
      continue; // the same blocks again: not another query
    ++queries;
    // A chain that `i` leads sorts right after it; one that leads `i`
    // right before it (between the two, each would lead `i` too, and no
    // chain leads another).
    auto after = chains.lower_bound(i);
    if (after != chains.end() && leads(i, after->first)) {
      out[after->second].push_back(i); // warmed by a longer query
      continue;
    }
    if (after != chains.begin()) {
      auto before = std::prev(after);
      if (leads(before->first, i)) {
        const auto at = before->second;
        chains.erase(before);
        out[at].push_back(i); // `i` warms that one's blocks too, at its rank
        chains.emplace(i, at);
        continue;
      }
    }
    chains.emplace(i, out.size());
    out.push_back({i});
  }
  // Longest first: the order they are tried in.
  for (auto& chain : out)
    std::stable_sort(
        chain.begin(), chain.end(), [&](std::size_t a, std::size_t b) {
          return items[a].request.keys.size() > items[b].request.keys.size();
        });
  return out;
}

std::vector<std::size_t> select_top(const std::vector<warm_item>& items,
                                    std::size_t n) {
  std::vector<std::size_t> out;
  for (const auto& chain : select_chains(items, n))
    out.push_back(chain.front());
  return out;
}

namespace {

struct warm_job {
  /// Per chain of selected queries (select_chains), the requests to try,
  /// longest first: each sent when the one before it failed.
  std::vector<std::vector<kv_request>> chains;
  std::size_t next = 0;     ///< the next chain to start
  std::size_t finished = 0; ///< chains warmed, or failed at their last try
  std::size_t done = 0;     ///< requests answered
  warm_report report;
  caf::actor progress;
  /// Held by the warmer's queue while queries of the job wait and by the
  /// pending requests' handlers: when the warmer stops mid-job they go, and
  /// the caller gets request_receiver_down.
  owed_reply promise;
};

struct warmer_state {
  warmer_config config;
  caf::actor balancer;
  /// The jobs with queries not sent yet, oldest first: a job's queries go
  /// after those of the jobs before it.
  std::deque<std::shared_ptr<warm_job>> waiting;
  /// Warm queries sent and not answered yet, of all jobs together: at most
  /// config.parallelism (one job each bounded alone, N jobs sent N times
  /// that).
  std::size_t in_flight = 0;
  static inline const char* name = "kvfleet.warmer";
};

using warmer_actor = caf::stateful_actor<warmer_state>;

void send_query(warmer_actor* self, const std::shared_ptr<warm_job>& job,
                std::size_t chain, std::size_t attempt);

/// Starts the waiting jobs' chains, oldest job first, while fewer than
/// config.parallelism queries are in flight.
void launch(warmer_actor* self) {
  auto& st = self->state;
  while (st.in_flight < st.config.parallelism && !st.waiting.empty()) {
    auto job = st.waiting.front();
    if (job->next + 1 >= job->chains.size()) // its last chain
      st.waiting.pop_front();
    send_query(self, job, job->next++, 0);
  }
}

/// Sends try `attempt` of `job`'s chain `chain`. A try that fails with an
/// error is followed by the chain's next, shorter, query in its place (one
/// in flight all the same): the hot query a longer, colder one of its chain
/// stood for is still warmed when that one is refused (its pins past the
/// pinned limit) or fails. Not one answered with blocks it could not cache
/// (its leading blocks are cached, and pinned if asked: a shorter query
/// would pin them again).
void send_query(warmer_actor* self, const std::shared_ptr<warm_job>& job,
                std::size_t chain, std::size_t attempt) {
  auto req = std::move(job->chains[chain][attempt]);
  ++self->state.in_flight;
  // `retryable`: a failure a shorter query may not meet. Not a reply with
  // blocks computed but not cached: its leading blocks are cached (and, if
  // pinning, pinned), so a shorter query of the chain would find them and
  // pin them a second time, which one unpin would not undo.
  auto finish_one = [=](const caf::error* err, std::uint64_t computed,
                        bool retryable) {
    --self->state.in_flight;
    ++job->done;
    const bool retry =
        err != nullptr && retryable && attempt + 1 < job->chains[chain].size();
    if (err == nullptr) {
      ++job->report.warmed;
      job->report.computed_tokens += computed;
    } else {
      ++job->report.failed;
      if (job->report.first_error.empty())
        job->report.first_error = from_caf_error(*err).describe();
    }
    if (retry) {
      ++job->report.requested;
      ++job->report.shortened;
    } else {
      ++job->finished;
    }
    if (job->progress)
      self->send(job->progress, progress_atom::value,
                 static_cast<std::uint64_t>(job->done), job->report.requested);
    if (retry) {
      send_query(self, job, chain, attempt + 1);
      return;
    }
    if (job->finished == job->chains.size())
      job->promise.deliver(job->report);
    launch(self);
  };
  // No timer of our own: the balancer answers every request, at the latest
  // with its own request_timeout.
  self->request(self->state.balancer, caf::infinite, process_atom::value,
                std::move(req))
      .then(
          [=](const kv_reply& rep) {
            // Computed but not (all) cached: nothing warm to show for it.
            if (rep.uncached_blocks > 0) {
              const auto err = to_caf_error(error{
                  errc::out_of_memory,
                  std::to_string(rep.uncached_blocks) + " of " +
                      std::to_string(rep.matched_blocks + rep.computed_blocks) +
                      " blocks were computed but not cached (the engine had "
                      "no room for them, its pool full of pinned, leased or "
                      "chained blocks, or another put of one was open)"});
              finish_one(&err, rep.computed_tokens, false);
              return;
            }
            finish_one(nullptr, rep.computed_tokens, true);
          },
          [=](caf::error& err) { finish_one(&err, 0, true); });
}

caf::behavior warmer_behavior(warmer_actor* self, warmer_config config,
                              caf::actor balancer) {
  self->state.config = config;
  self->state.balancer = std::move(balancer);
  handle_stray_messages(self, "warmer");
  return {
      [=](warm_atom, const std::vector<warm_item>& items, std::uint32_t top_n,
          bool pin, const caf::actor& progress) -> caf::result<warm_report> {
        // Asking for none is a caller's mistake, not a warm-up that did
        // nothing.
        if (top_n == 0)
          return to_caf_error(
              error{errc::invalid_argument, "warm: top_n must be at least 1"});
        auto job = std::make_shared<warm_job>();
        // Malformed items are refused first: in the selection they could
        // replace a valid query of the same leading keys, then fail. Keys
        // no block can have always; a key count that does not fit the
        // tokens when the engines' block size is known; a frequency that
        // is negative or infinite (no expected frequency: a "never" marker
        // would be warmed, and pinned; NaN, unknown, ranks last).
        const auto bt = self->state.config.block_tokens;
        const auto check = [bt](const warm_item& item) -> result<void> {
          const double f = item.frequency;
          if (std::isinf(f) || f < 0)
            return make_error(errc::invalid_argument,
                              "frequency " + std::to_string(f) +
                                  " is not a finite number >= 0");
          const auto& r = item.request;
          if (auto ok = engine::check_request_keys(r.keys); !ok)
            return ok;
          if (bt > 0)
            return engine::check_block_keys(r.keys.size(), r.input_tokens, bt);
          return {};
        };
        std::vector<warm_item> valid;
        const std::vector<warm_item>* pick = &items;
        for (std::size_t i = 0; i < items.size(); ++i) {
          auto ok = check(items[i]);
          if (ok) {
            if (pick == &valid)
              valid.push_back(items[i]);
            continue;
          }
          if (pick != &valid) { // the first malformed one: copy the rest
            valid.assign(items.begin(),
                         items.begin() + static_cast<std::ptrdiff_t>(i));
            pick = &valid;
          }
          ++job->report.malformed;
          if (job->report.first_error.empty())
            job->report.first_error =
                "warm item " + std::to_string(i) + ": " + ok.error().describe();
        }
        for (const auto& chain : select_chains(*pick, top_n)) {
          auto& tries = job->chains.emplace_back();
          for (const auto i : chain) {
            auto req = (*pick)[i].request;
            req.prio = engine::priority::low;
            req.pin = pin;
            tries.push_back(std::move(req));
          }
        }
        job->report.requested = job->chains.size();
        job->progress = progress;
        if (job->chains.empty())
          return job->report;
        auto promise = self->make_response_promise();
        job->promise = owed_reply{promise};
        // Its queries wait behind those of the jobs before it: the bound
        // is the warmer's, not each job's.
        self->state.waiting.push_back(std::move(job));
        launch(self);
        return promise;
      },
  };
}

} // namespace

result<void> validate(const warmer_config& config) {
  if (config.parallelism == 0)
    return make_error(errc::invalid_argument,
                      "warmer_config.parallelism must be at least 1");
  return {};
}

result<caf::actor> spawn_warmer(caf::actor_system& sys, warmer_config config,
                                caf::actor balancer) {
  if (auto ok = validate(config); !ok)
    return unexpected<error>{ok.error()};
  if (auto ok = check_balancer(balancer, "spawn_warmer"); !ok)
    return unexpected<error>{ok.error()};
  return sys.spawn(warmer_behavior, std::move(config), std::move(balancer));
}

} // namespace kvfleet::actors
