#pragma once
/// `kvfleet-bench routing`: a deterministic discrete-event simulation of N
/// engines behind the shipped router (actors::router), once per routing
/// policy.
///
/// Model (no threads, no CAF, no wall clock):
///   - every engine is an in-process engine::block_store with
///     capacity_blocks blocks (per engine) and a FIFO queue; it serves one
///     request at a time;
///   - request r arrives at (timestamp_ms - the first request's) /
///     rate_scale; the router picks an engine from its live load (queued +
///     in service, router::started / finished) and, for kv_aware, the
///     prefix credit of its index;
///   - when a request starts service the engine runs block_store::process()
///     on it; its service time is computed_tokens x prefill_us_per_token +
///     service_overhead_us, and it completes that much later;
///   - block events come from each store's store_config::on_block_event and
///     reach the router as the balancer actor relays them: the blocks a
///     process() committed are reported stored when the request completes
///     (the engine actor reports them after its reply; one committed and
///     removed again before that is never reported), and reported blocks
///     a process() removed are reported evicted right after it. The index
///     may be stale in between (a request already queued when its blocks
///     go costs only a miss, as in the real fleet; stale_routes counts
///     them).
///
/// Measures, per policy: hit ratios over all engines, latency (arrival to
/// completion, i.e. queueing + service, exact percentiles), prefill saved,
/// the queue length seen at every arrival on the engine the request was
/// routed to (queued + in service, before the request joins) with its p95
/// and mean, and each engine's share of the requests.
/// Thread safety: free functions; nothing shared between calls.

#include "actors/router.hpp"
#include "engine/result.hpp"
#include "engine/workload.hpp"
#include "tools/bench/cli.hpp"
#include "tools/bench/engine_mode.hpp"
#include "tools/bench/request_keys.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace kvfleet::bench {

/// What one routing policy achieved.
struct routing_result {
  actors::routing_policy policy = actors::routing_policy::least_loaded;
  double token_hit_ratio = 0.0; ///< matched_tokens / input_tokens
  double block_hit_ratio = 0.0; ///< matched_blocks / full_blocks
  double p50_us = 0.0;          ///< arrival-to-completion latency quantiles
  double p95_us = 0.0;
  double p99_us = 0.0;
  double prefill_saved_s = 0.0; ///< prefill cost of the matched tokens
  double p95_queue = 0.0;       ///< of the chosen engine's queue at arrival
  double mean_queue = 0.0;
  std::uint32_t max_queue = 0;
  double max_engine_share = 0.0; ///< largest fraction of requests one got
  std::vector<std::uint64_t> engine_requests; ///< requests per engine
  std::uint64_t input_tokens = 0;
  std::uint64_t matched_tokens = 0;
  std::uint64_t full_blocks = 0;
  std::uint64_t matched_blocks = 0;
  /// Requests the index promised more leading blocks than the engine had.
  std::uint64_t stale_routes = 0;
};

struct routing_report {
  std::string workload; ///< workload name or trace path
  bool from_trace = false;
  std::size_t requests = 0;
  std::uint32_t block_tokens = 0;
  std::size_t working_set_blocks = 0;
  std::uint32_t engines = 0;
  std::size_t capacity_blocks = 0; ///< per engine
  double rate_scale = 1.0;
  std::vector<routing_result> results; ///< in the order asked for
};

/// Capacity of ONE engine in blocks: opts.base.capacity_blocks, or
/// round(opts.base.capacity_fraction x working set / engines).
/// errc::zero_capacity when that is 0.
[[nodiscard]] result<std::size_t>
engine_capacity_in_blocks(const routing_options& opts,
                          std::size_t working_set_blocks);

/// Simulates `policy` over `keys`; `arrival_ns[r]` is request r's arrival
/// and must be nondecreasing (errc::invalid_argument naming the first
/// request that is not). `progress` (may be empty) is called after each
/// arrival with the number done.
[[nodiscard]] result<routing_result>
simulate_routing(const routing_options& opts, actors::routing_policy policy,
                 const request_keys& keys,
                 std::span<const std::int64_t> arrival_ns,
                 std::size_t capacity_blocks,
                 const std::function<void(std::size_t)>& progress = {});

/// Runs every policy of `opts` over `reqs`; `workload` labels the report.
/// Requests are replayed in timestamp order (a stable sort).
[[nodiscard]] result<routing_report>
run_routing(const routing_options& opts,
            std::span<const engine::workload_request> reqs,
            const std::string& workload, const progress_fn& progress = {});

} // namespace kvfleet::bench
