#include "tools/bench/prefetch_mode.hpp"

#include "engine/block_store.hpp"
#include "engine/kv_producer.hpp"
#include "tools/bench/interrupt.hpp"
#include "tools/bench/request_keys.hpp"

#include <algorithm>
#include <cmath>
#include <deque>
#include <memory>
#include <optional>
#include <queue>
#include <tuple>
#include <unordered_map>
#include <utility>

namespace kvfleet::bench {

namespace {

constexpr std::string_view end_query = "end";

double ratio(std::uint64_t part, std::uint64_t whole) {
  return whole == 0 ? 0.0
                    : static_cast<double>(part) / static_cast<double>(whole);
}

struct replay_result {
  std::uint64_t input_tokens = 0;
  std::uint64_t matched_tokens = 0;
  std::uint64_t predictions = 0;
  std::uint64_t untimed = 0;
  std::uint64_t overtaken = 0;
  std::uint64_t unfired = 0;
  prefetch_ledger ledger;
};

/// A prefetch timed for later: of request `r`'s blocks, for its session.
struct due_prefetch {
  std::uint64_t at_ms = 0;
  std::uint64_t session = 0;
  std::size_t r = 0;
  friend bool operator>(const due_prefetch& a, const due_prefetch& b) {
    return std::tie(a.at_ms, a.session, a.r) >
           std::tie(b.at_ms, b.session, b.r);
  }
};

} // namespace

result<engine::store_config> replay_store_config(const prefetch_options& opts,
                                                 std::size_t capacity_blocks) {
  auto cfg = make_store_config(opts.base, opts.eviction, capacity_blocks);
  if (!cfg)
    return cfg;
  // The engine actor's eviction rule (engine_actor.cpp, open_store_parts):
  // the lowest request priority goes first, so a prefetch's blocks, put at
  // low priority, go before the served requests' ones until a request of
  // normal priority uses them. Before, the replay evicted by the policy
  // alone, and read 24% of the prefetches used where the engine would
  // have used 11%.
  cfg->lowest_priority_first = true;
  return cfg;
}

namespace {

// One replay; with `prefetch` false the model still learns but nothing is
// prefetched (the baseline).
result<replay_result> replay(const prefetch_options& opts,
                             std::span<const engine::workload_request> reqs,
                             const request_keys& keys,
                             std::size_t capacity_blocks, bool prefetch,
                             const std::function<void(std::size_t)>& progress) {
  auto cfg = replay_store_config(opts, capacity_blocks);
  if (!cfg)
    return unexpected<error>(cfg.error());
  auto store = create_store(*cfg, capacity_blocks);
  if (!store)
    return unexpected<error>(store.error());
  engine::namespace_options ns_opts;
  ns_opts.adaptive_compression = opts.base.compression;
  auto ns = (*store)->register_namespace(bench_namespace(opts.base), ns_opts);
  if (!ns)
    return unexpected<error>(ns.error());
  engine::synthetic_producer producer(engine::nanos{0});

  auto created = actors::transition_model::create(actors::transition_config{});
  if (!created)
    return unexpected<error>(created.error());
  actors::transition_model& model = *created;
  struct session_state {
    std::uint64_t rounds = 0;
    std::uint64_t last_ms = 0;
  };
  std::unordered_map<std::uint64_t, session_state> sessions;
  std::deque<std::pair<std::uint64_t, std::uint64_t>> idle; // (ms, session)
  const auto timeout_ms =
      static_cast<std::uint64_t>(std::llround(opts.session_timeout_s * 1e3));

  replay_result out;
  std::uint64_t evictions_seen = 0;
  const auto cached = [&](const engine::block_key& k) {
    return (*store)->contains(*ns, k);
  };
  const auto after_evictions = [&] {
    if ((*store)->stats().evictions != evictions_seen) {
      evictions_seen = (*store)->stats().evictions;
      out.ledger.check_evicted(cached);
    }
  };
  // Mean gap between a session's round k and its next (k capped as the
  // queries are), in ms: what the prefetcher knows of when it comes back.
  // Grown to the rounds seen (at most one a request), not sized by
  // --max-round, which may be anything up to 2^32 - 1.
  std::vector<double> gap_sum;
  std::vector<std::uint64_t> gap_count;
  std::priority_queue<due_prefetch, std::vector<due_prefetch>, std::greater<>>
      due;
  std::unordered_map<std::uint64_t, std::size_t> pending; // session -> r
  for (std::size_t r = 0; r < reqs.size(); ++r) {
    if (interrupt_requested())
      return interrupted_error(r, reqs.size());
    const engine::workload_request& req = reqs[r];
    // Prefetches due by this request's arrival run first, in time order.
    while (!due.empty() && due.top().at_ms <= req.timestamp_ms) {
      const due_prefetch d = due.top();
      due.pop();
      const auto it = pending.find(d.session);
      if (it == pending.end() || it->second != d.r)
        continue; // overtaken by the session's request
      pending.erase(it);
      engine::put_options low;
      low.request_tokens = keys.input_tokens[d.r];
      low.prio = engine::priority::low;
      const auto blocks = keys.of(d.r);
      auto warm =
          (*store)->process(*ns, blocks, keys.input_tokens[d.r], producer, low);
      if (!warm)
        return make_error(warm.error().code, "prefetch of request " +
                                                 std::to_string(d.r) + ": " +
                                                 warm.error().message);
      if (warm->computed_blocks - warm->uncached_blocks == 0)
        out.ledger.redundant(); // every block was there (or none fit)
      else
        out.ledger.issued(d.session, blocks);
      after_evictions();
    }
    // Sessions idle past the timeout are observed to end (online: only
    // what is known at this request's arrival).
    while (!idle.empty() &&
           idle.front().first + timeout_ms < req.timestamp_ms) {
      const auto [at, s] = idle.front();
      idle.pop_front();
      auto it = sessions.find(s);
      if (it != sessions.end() && it->second.last_ms == at) {
        model.observe(s, std::string(end_query));
        out.ledger.ended(s);
        out.unfired += pending.erase(s);
        sessions.erase(it);
      }
    }
    if (pending.erase(req.session) != 0)
      ++out.overtaken;
    const auto request = keys.of(r);
    engine::put_options put;
    put.request_tokens = keys.input_tokens[r];
    auto done =
        (*store)->process(*ns, request, keys.input_tokens[r], producer, put);
    if (!done)
      return make_error(done.error().code, "request " + std::to_string(r) +
                                               ": " + done.error().message);
    out.input_tokens += keys.input_tokens[r];
    out.matched_tokens += done->matched_tokens;
    out.ledger.request(req.session, request.first(done->matched_blocks));
    after_evictions();

    session_state& st = sessions[req.session];
    if (st.rounds > 0) {
      const auto k = std::min<std::uint64_t>(st.rounds, opts.max_round);
      if (k >= gap_sum.size()) {
        gap_sum.resize(k + 1, 0.0);
        gap_count.resize(k + 1, 0);
      }
      gap_sum[k] += static_cast<double>(req.timestamp_ms - st.last_ms);
      ++gap_count[k];
    }
    ++st.rounds;
    st.last_ms = req.timestamp_ms;
    idle.emplace_back(req.timestamp_ms, req.session);
    const std::string q = round_query(st.rounds, opts.max_round);
    model.observe(req.session, q);
    const auto next = model.predict(req.session, q);
    if (next && next->query != end_query &&
        next->confidence >= opts.threshold && !request.empty()) {
      ++out.predictions;
      const auto k = std::min<std::uint64_t>(st.rounds, opts.max_round);
      if (k >= gap_count.size() || gap_count[k] == 0) {
        ++out.untimed;
      } else if (prefetch) {
        const double mean = gap_sum[k] / static_cast<double>(gap_count[k]);
        due.push(due_prefetch{req.timestamp_ms +
                                  static_cast<std::uint64_t>(
                                      std::llround(opts.prefetch_at * mean)),
                              req.session, r});
        pending[req.session] = r;
      }
    }
    if (progress)
      progress(r + 1);
  }
  // One that came during the last request is one too: the run stops.
  if (interrupt_requested())
    return interrupted_error(reqs.size(), reqs.size());
  out.unfired += pending.size();
  out.ledger.finish();
  return out;
}

} // namespace

bool prefetch_ledger::issued(std::uint64_t session,
                             std::span<const engine::block_key> keys) {
  if (keys.empty())
    return false;
  const auto [it, fresh] = outstanding_.try_emplace(session, keys.back());
  if (!fresh) {
    ++wasted_; // the session's next request never came for it
    it->second = keys.back();
  }
  ++prefetches_;
  return true;
}

void prefetch_ledger::request(std::uint64_t session,
                              std::span<const engine::block_key> matched) {
  const auto it = outstanding_.find(session);
  if (it == outstanding_.end())
    return;
  if (std::find(matched.begin(), matched.end(), it->second) != matched.end())
    ++useful_;
  else
    ++wasted_;
  outstanding_.erase(it);
}

void prefetch_ledger::check_evicted(
    const std::function<bool(const engine::block_key&)>& cached) {
  for (auto it = outstanding_.begin(); it != outstanding_.end();) {
    if (cached(it->second)) {
      ++it;
    } else {
      ++wasted_;
      it = outstanding_.erase(it);
    }
  }
}

void prefetch_ledger::ended(std::uint64_t session) {
  if (outstanding_.erase(session) != 0)
    ++unused_;
}

void prefetch_ledger::finish() {
  unused_ += outstanding_.size();
  outstanding_.clear();
}

std::string round_query(std::uint64_t round, std::uint32_t max_round) {
  return "round:" + std::to_string(std::min<std::uint64_t>(round, max_round));
}

// run_prefetch without its out-of-memory guard.
static result<prefetch_report>
run_prefetch_unguarded(const prefetch_options& opts,
                       std::span<const engine::workload_request> reqs,
                       const std::string& workload,
                       const progress_fn& progress) {
  // Its milliseconds are rounded to an integer and added to timestamps:
  // out of range (or NaN) there is no such integer.
  if (!(opts.session_timeout_s >= 0.0 &&
        opts.session_timeout_s <= max_session_timeout_s))
    return make_error(errc::invalid_argument,
                      "prefetch_options.session_timeout_s must be in [0, "
                      "1e9] seconds (got " +
                          number_text(opts.session_timeout_s) + ")");
  if (!(opts.prefetch_at >= 0.0 && opts.prefetch_at <= 1.0))
    return make_error(errc::invalid_argument,
                      "prefetch_options.prefetch_at must be in [0, 1] (got " +
                          number_text(opts.prefetch_at) + ")");
  for (std::size_t r = 0; r < reqs.size(); ++r)
    if (reqs[r].session == 0)
      return make_error(errc::invalid_argument,
                        "prefetch mode needs sessions (the chat workload); "
                        "request " +
                            std::to_string(r) + " has none");
  prefetch_report report;
  report.workload = workload;
  report.requests = reqs.size();
  report.block_tokens = opts.base.block_tokens;
  report.eviction = opts.eviction;
  report.threshold = opts.threshold;
  report.prefetch_at = opts.prefetch_at;
  announce(progress, "counting the working set");
  auto ws = engine::working_set_blocks(reqs, opts.base.block_tokens,
                                       stop_on_interrupt());
  if (!ws)
    return stopped_or_failed(ws.error(), "counting the working set");
  report.working_set_blocks = *ws;
  auto cap = capacity_in_blocks(opts.base, report.working_set_blocks);
  if (!cap)
    return unexpected<error>(cap.error());
  report.capacity_blocks = *cap;

  std::vector<engine::workload_request> ordered(reqs.begin(), reqs.end());
  std::stable_sort(ordered.begin(), ordered.end(),
                   [](const auto& a, const auto& b) {
                     return a.timestamp_ms < b.timestamp_ms;
                   });
  // Copying and sorting millions of requests takes a second or two.
  if (interrupt_requested())
    return interrupted_while("sorting the requests");
  announce(progress, "computing the block keys");
  auto made =
      make_request_keys(ordered, bench_namespace(opts.base).fingerprint(),
                        opts.base.block_tokens, stop_on_interrupt());
  if (!made)
    return interrupted_while("computing the block keys");
  const request_keys keys = std::move(*made);
  for (std::size_t pass = 0; pass < 2; ++pass) {
    const bool with = pass == 0;
    const auto step = pass_progress(
        progress, with ? "with prefetch" : "baseline", pass, 2, keys.size());
    auto res = replay(opts, ordered, keys, report.capacity_blocks, with, step);
    if (!res)
      return unexpected<error>(res.error());
    if (with) {
      report.predictions = res->predictions;
      report.untimed = res->untimed;
      report.overtaken = res->overtaken;
      report.unfired = res->unfired;
      report.redundant = res->ledger.redundant_count();
      report.prefetches = res->ledger.prefetches();
      report.useful = res->ledger.useful();
      report.wasted = res->ledger.wasted();
      report.unused = res->ledger.unused();
      report.used_fraction = ratio(report.useful, report.prefetches);
      report.token_hit_ratio = ratio(res->matched_tokens, res->input_tokens);
    } else {
      report.baseline_token_hit_ratio =
          ratio(res->matched_tokens, res->input_tokens);
    }
  }
  return report;
}

result<prefetch_report>
run_prefetch(const prefetch_options& opts,
             std::span<const engine::workload_request> reqs,
             const std::string& workload, const progress_fn& progress) {
  return out_of_memory_as_error("prefetch mode", [&] {
    return run_prefetch_unguarded(opts, reqs, workload, progress);
  });
}

} // namespace kvfleet::bench
