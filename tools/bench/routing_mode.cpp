#include "tools/bench/routing_mode.hpp"

#include "engine/block_store.hpp"
#include "engine/kv_producer.hpp"
#include "tools/bench/interrupt.hpp"

#include <algorithm>
#include <cmath>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <queue>
#include <unordered_set>
#include <utility>

namespace kvfleet::bench {

namespace {

double ratio(std::uint64_t part, std::uint64_t whole) {
  return whole == 0 ? 0.0
                    : static_cast<double>(part) / static_cast<double>(whole);
}

// Nearest-rank quantile of sorted values; 0 when empty.
template <class T> double quantile(const std::vector<T>& sorted, double q) {
  if (sorted.empty())
    return 0.0;
  const double rank = std::ceil(q * static_cast<double>(sorted.size()));
  const std::size_t i =
      rank < 1.0 ? 0
                 : std::min(sorted.size(), static_cast<std::size_t>(rank)) - 1;
  return static_cast<double>(sorted[i]);
}

/// Simulated times are int64 nanoseconds.
constexpr double max_sim_ns = 9.2e18;

std::int64_t to_ns(double us) {
  return static_cast<std::int64_t>(std::llround(us * 1e3));
}

struct sim_engine {
  std::unique_ptr<engine::block_store> store;
  engine::ns_id ns{};
  std::deque<std::size_t> waiting; ///< requests queued, not in service
  bool busy = false;
  std::size_t current = 0; ///< request in service when busy
  /// Keys reported stored to the router and not reported evicted since.
  std::unordered_set<engine::block_key, engine::block_key_hash> reported;
  /// From the store's on_block_event during a process(): blocks committed
  /// (reported when the request completes, as the engine actor reports
  /// them after its reply) and reported blocks removed (reported at once).
  std::vector<engine::block_key> stored;
  std::vector<engine::block_key> removed;
};

class simulation {
public:
  simulation(const routing_options& opts, actors::routing_policy policy,
             const request_keys& keys, std::span<const std::int64_t> arrival)
      : opts_(opts), policy_(policy), keys_(keys), arrival_(arrival),
        producer_(engine::nanos{to_ns(opts.base.prefill_us_per_token)}),
        overhead_ns_(to_ns(opts.service_overhead_us)) {
    out_.policy = policy;
  }

  result<void> init(std::size_t capacity_blocks) {
    actors::router_config rc = opts_.router;
    rc.policy = policy_;
    auto route = actors::router::create(rc);
    if (!route)
      return unexpected<error>(route.error());
    router_ = std::move(*route);
    auto cfg = make_store_config(opts_.base, opts_.eviction, capacity_blocks);
    if (!cfg)
      return unexpected<error>(cfg.error());
    // The engine actor's eviction rule (engine_actor.cpp, open_store_parts):
    // the lowest request priority first. Every request here is of normal
    // priority, so it changes nothing but where room is made (a put's own
    // partition and partitions over their share give first).
    cfg->lowest_priority_first = true;
    engine::namespace_options ns_opts;
    ns_opts.adaptive_compression = opts_.base.compression;
    engines_.resize(opts_.engines);
    for (auto& e : engines_) {
      cfg->on_block_event = [&e](engine::block_event ev,
                                 const engine::block_key& k) {
        if (ev == engine::block_event::stored) {
          e.stored.push_back(k);
        } else if (e.reported.erase(k) != 0) {
          e.removed.push_back(k);
        } else {
          // Stored and gone before the router heard of it.
          std::erase(e.stored, k);
        }
      };
      auto store = create_store(*cfg, capacity_blocks);
      if (!store)
        return unexpected<error>(store.error());
      e.store = std::move(*store);
      auto ns =
          e.store->register_namespace(bench_namespace(opts_.base), ns_opts);
      if (!ns)
        return unexpected<error>(ns.error());
      e.ns = *ns;
      if (auto slot = router_.add_slot(); !slot)
        return unexpected<error>(slot.error());
    }
    out_.engine_requests.assign(opts_.engines, 0);
    latency_ns_.assign(keys_.size(), 0);
    expected_hit_.assign(keys_.size(), 0);
    return {};
  }

  result<routing_result> run(const std::function<void(std::size_t)>& progress) {
    for (std::size_t r = 0; r < keys_.size(); ++r) {
      if (interrupt_requested())
        return interrupted_error(started_, keys_.size());
      const std::int64_t now = arrival_[r];
      while (!done_.empty() && done_.top().first <= now) {
        const auto [t, e] = done_.top();
        done_.pop();
        if (auto ok = complete(e, t); !ok)
          return unexpected<error>(ok.error());
      }
      const auto request = keys_.of(r);
      auto picked = router_.pick(request);
      if (!picked)
        return make_error(errc::invalid_argument, "no live engine");
      sim_engine& e = engines_[picked->slot];
      const auto queue_len =
          static_cast<std::uint32_t>(e.waiting.size() + (e.busy ? 1 : 0));
      queue_samples_.push_back(queue_len);
      expected_hit_[r] = picked->expected_hit_blocks;
      router_.started(picked->slot);
      ++out_.engine_requests[picked->slot];
      e.waiting.push_back(r);
      if (!e.busy)
        if (auto ok = start(picked->slot, now); !ok)
          return unexpected<error>(ok.error());
      // Progress counts services started, not arrivals: with arrivals
      // faster than service, most requests start in the loop below.
      if (progress)
        progress(started_);
    }
    while (!done_.empty()) {
      if (interrupt_requested())
        return interrupted_error(started_, keys_.size());
      const auto [t, e] = done_.top();
      done_.pop();
      if (auto ok = complete(e, t); !ok)
        return unexpected<error>(ok.error());
      if (progress)
        progress(started_);
    }
    finish();
    return out_;
  }

private:
  result<void> start(std::uint32_t slot, std::int64_t now) {
    sim_engine& e = engines_[slot];
    const std::size_t r = e.waiting.front();
    e.waiting.pop_front();
    e.busy = true;
    e.current = r;
    ++started_;
    engine::put_options put;
    put.request_tokens = keys_.input_tokens[r];
    const auto request = keys_.of(r);
    auto done =
        e.store->process(e.ns, request, keys_.input_tokens[r], producer_, put);
    if (!done)
      return make_error(done.error().code,
                        "request " + std::to_string(r) + " on engine " +
                            std::to_string(slot) + ": " + done.error().message);
    out_.input_tokens += keys_.input_tokens[r];
    out_.matched_tokens += done->matched_tokens;
    out_.full_blocks += request.size();
    out_.matched_blocks += done->matched_blocks;
    if (expected_hit_[r] > done->matched_blocks)
      ++out_.stale_routes;
    if (!e.removed.empty()) {
      router_.evicted(slot, e.removed);
      e.removed.clear();
    }
    const std::int64_t service =
        // From the per-token cost as given: rounded to whole nanoseconds
        // per token first, 0.0015 us took 2 ns a token (33% long).
        to_ns(static_cast<double>(done->computed_tokens) *
              opts_.base.prefill_us_per_token) +
        overhead_ns_;
    // Only a trace's input lengths come near it: its content is at fault
    // (exit status 1, as for any bad trace).
    if (service > std::numeric_limits<std::int64_t>::max() - now)
      return make_error(opts_.base.trace_path.empty() ? errc::invalid_argument
                                                      : errc::parse_error,
                        "request " + std::to_string(r) + " on engine " +
                            std::to_string(slot) +
                            " would end past the simulated clock's range "
                            "(about 290 years)");
    const std::int64_t end = now + service;
    latency_ns_[r] = end - arrival_[r];
    done_.emplace(end, slot);
    return {};
  }

  result<void> complete(std::uint32_t slot, std::int64_t now) {
    sim_engine& e = engines_[slot];
    router_.finished(slot);
    if (!e.stored.empty()) {
      e.reported.insert(e.stored.begin(), e.stored.end());
      router_.stored(slot, e.stored);
      e.stored.clear();
    }
    e.busy = false;
    if (!e.waiting.empty())
      return start(slot, now);
    return {};
  }

  void finish() {
    out_.token_hit_ratio = ratio(out_.matched_tokens, out_.input_tokens);
    out_.block_hit_ratio = ratio(out_.matched_blocks, out_.full_blocks);
    out_.prefill_saved_s = static_cast<double>(out_.matched_tokens) *
                           opts_.base.prefill_us_per_token / 1e6;
    std::sort(latency_ns_.begin(), latency_ns_.end());
    out_.p50_us = quantile(latency_ns_, 0.50) / 1e3;
    out_.p95_us = quantile(latency_ns_, 0.95) / 1e3;
    out_.p99_us = quantile(latency_ns_, 0.99) / 1e3;
    if (!queue_samples_.empty()) {
      const double sum =
          std::accumulate(queue_samples_.begin(), queue_samples_.end(), 0.0);
      out_.mean_queue = sum / static_cast<double>(queue_samples_.size());
    }
    std::sort(queue_samples_.begin(), queue_samples_.end());
    out_.p95_queue = quantile(queue_samples_, 0.95);
    out_.max_queue = queue_samples_.empty() ? 0 : queue_samples_.back();
    const std::uint64_t most = *std::max_element(out_.engine_requests.begin(),
                                                 out_.engine_requests.end());
    out_.max_engine_share = ratio(most, keys_.size());
  }

  using event = std::pair<std::int64_t, std::uint32_t>; // (time, engine)

  const routing_options& opts_;
  actors::routing_policy policy_;
  const request_keys& keys_;
  std::span<const std::int64_t> arrival_;
  actors::router router_;
  engine::synthetic_producer producer_;
  std::int64_t overhead_ns_;
  std::vector<sim_engine> engines_;
  std::priority_queue<event, std::vector<event>, std::greater<>> done_;
  std::vector<std::int64_t> latency_ns_;
  std::vector<std::uint32_t> queue_samples_;
  std::vector<std::size_t> expected_hit_;
  std::size_t started_ = 0; ///< requests whose service started
  routing_result out_;
};

} // namespace

result<std::size_t> engine_capacity_in_blocks(const routing_options& opts,
                                              std::size_t working_set_blocks) {
  if (opts.base.capacity_blocks) {
    if (*opts.base.capacity_blocks == 0)
      return make_error(errc::zero_capacity,
                        "capacity 0: --capacity-blocks must be at least 1");
    return *opts.base.capacity_blocks;
  }
  const double f = opts.base.capacity_fraction.value_or(0.0);
  const double n = std::round(f * static_cast<double>(working_set_blocks) /
                              static_cast<double>(std::max(1U, opts.engines)));
  if (!(n >= 1.0))
    return make_error(errc::zero_capacity,
                      "capacity 0: --capacity-fraction " + number_text(f) +
                          " of a working set of " +
                          std::to_string(working_set_blocks) + " blocks over " +
                          std::to_string(opts.engines) +
                          " engines rounds to 0 blocks per engine");
  const std::size_t slot = block_slot_bytes(bench_namespace(opts.base));
  const std::size_t most = std::numeric_limits<std::size_t>::max() / slot;
  if (n > static_cast<double>(most))
    return make_error(errc::value_too_large,
                      capacity_fraction_too_large(f, working_set_blocks,
                                                  opts.engines, most, slot));
  return static_cast<std::size_t>(n);
}

// simulate_routing without its out-of-memory guard.
static result<routing_result> simulate_routing_unguarded(
    const routing_options& opts, actors::routing_policy policy,
    const request_keys& keys, std::span<const std::int64_t> arrival_ns,
    std::size_t capacity_blocks,
    const std::function<void(std::size_t)>& progress) {
  if (opts.engines == 0 || opts.engines > actors::router::max_slots)
    return make_error(errc::invalid_argument,
                      "engines must be in [1, 64], got " +
                          std::to_string(opts.engines));
  if (arrival_ns.size() != keys.size())
    return make_error(errc::invalid_argument,
                      "one arrival time per request is needed");
  // The event loop serves arrivals in the order given: one earlier than
  // the one before would be served after it and its latency would count
  // time before it was sent.
  if (const auto it =
          std::is_sorted_until(arrival_ns.begin(), arrival_ns.end());
      it != arrival_ns.end())
    return make_error(errc::invalid_argument,
                      "arrival times must be nondecreasing: request " +
                          std::to_string(it - arrival_ns.begin()) +
                          " arrives at " + std::to_string(*it) +
                          " ns, before request " +
                          std::to_string(it - arrival_ns.begin() - 1) + " at " +
                          std::to_string(*(it - 1)) + " ns");
  simulation sim(opts, policy, keys, arrival_ns);
  if (auto ok = sim.init(capacity_blocks); !ok)
    return unexpected<error>(ok.error());
  return sim.run(progress);
}

result<routing_result>
simulate_routing(const routing_options& opts, actors::routing_policy policy,
                 const request_keys& keys,
                 std::span<const std::int64_t> arrival_ns,
                 std::size_t capacity_blocks,
                 const std::function<void(std::size_t)>& progress) {
  return out_of_memory_as_error("routing mode", [&] {
    return simulate_routing_unguarded(opts, policy, keys, arrival_ns,
                                      capacity_blocks, progress);
  });
}

// run_routing without its out-of-memory guard.
static result<routing_report> run_routing_unguarded(
    const routing_options& opts, std::span<const engine::workload_request> reqs,
    const std::string& workload, const progress_fn& progress) {
  routing_report report;
  report.workload = workload;
  report.from_trace = !opts.base.trace_path.empty();
  report.requests = reqs.size();
  report.block_tokens = opts.base.block_tokens;
  report.engines = opts.engines;
  report.rate_scale = opts.rate_scale;
  announce(progress, "counting the working set");
  auto ws = engine::working_set_blocks(reqs, opts.base.block_tokens,
                                       stop_on_interrupt());
  if (!ws)
    return stopped_or_failed(ws.error(), "counting the working set");
  report.working_set_blocks = *ws;
  auto cap = engine_capacity_in_blocks(opts, report.working_set_blocks);
  if (!cap)
    return unexpected<error>(cap.error());
  report.capacity_blocks = *cap;

  std::vector<engine::workload_request> ordered(reqs.begin(), reqs.end());
  std::stable_sort(ordered.begin(), ordered.end(),
                   [](const auto& a, const auto& b) {
                     return a.timestamp_ms < b.timestamp_ms;
                   });
  // Only the time between arrivals matters: count from the first request,
  // so traces stamped with epoch milliseconds fit the simulated clock.
  std::vector<std::int64_t> arrival;
  arrival.reserve(ordered.size());
  const std::uint64_t first =
      ordered.empty() ? 0 : ordered.front().timestamp_ms;
  for (const auto& r : ordered) {
    const double ns =
        static_cast<double>(r.timestamp_ms - first) * 1e6 / opts.rate_scale;
    // A trace's timestamps are its content (exit status 1, as for any bad
    // trace); a generated workload's only meet this with --rate-scale.
    if (!(ns < max_sim_ns))
      return make_error(report.from_trace ? errc::parse_error
                                          : errc::invalid_argument,
                        "a request " + std::to_string(r.timestamp_ms - first) +
                            " ms after the first, with --rate-scale " +
                            number_text(opts.rate_scale) +
                            ", arrives past the simulated clock's range "
                            "(about 290 years); raise --rate-scale");
    arrival.push_back(static_cast<std::int64_t>(std::llround(ns)));
  }
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
  for (std::size_t i = 0; i < opts.policies.size(); ++i) {
    const actors::routing_policy policy = opts.policies[i];
    const auto step = pass_progress(progress, actors::to_string(policy), i,
                                    opts.policies.size(), keys.size());
    auto res = simulate_routing(opts, policy, keys, arrival,
                                report.capacity_blocks, step);
    if (!res)
      return unexpected<error>(res.error());
    report.results.push_back(std::move(*res));
  }
  return report;
}

result<routing_report>
run_routing(const routing_options& opts,
            std::span<const engine::workload_request> reqs,
            const std::string& workload, const progress_fn& progress) {
  return out_of_memory_as_error("routing mode", [&] {
    return run_routing_unguarded(opts, reqs, workload, progress);
  });
}

} // namespace kvfleet::bench
