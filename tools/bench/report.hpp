#pragma once
/// Output of `kvfleet-bench engine`, `routing` and `prefetch`: one JSON
/// object or a table.
/// Thread safety: free functions on values.

#include "tools/bench/engine_mode.hpp"
#include "tools/bench/prefetch_mode.hpp"
#include "tools/bench/routing_mode.hpp"

#include <iosfwd>
#include <string>

namespace kvfleet::bench {

/// The report as one JSON object:
/// {"workload", "requests", "block_tokens", "working_set_blocks",
///  "capacity_blocks", "results": [{"policy", "token_hit_ratio",
///  "block_hit_ratio", "p50_us", "p95_us", "p99_us", "prefill_saved_s"}]};
/// with a disk tier each result adds "memory_token_hit_ratio",
/// "disk_token_hit_ratio", "spills", "spill_failures",
/// "spills_refused_full", "spills_refused_capacity", "spills_refused_busy",
/// "spill_errors" and "disk_full".
[[nodiscard]] std::string to_json(const engine_report& report);

/// The report as a human-readable table, ending with a newline.
[[nodiscard]] std::string to_table(const engine_report& report);

/// The routing report as one JSON object: the engine report's fields plus
/// "engines" and "rate_scale" ("capacity_blocks" is per engine), and per
/// policy "p95_queue", "mean_queue", "max_queue", "max_engine_share",
/// "engine_requests", "stale_routes".
[[nodiscard]] std::string to_json(const routing_report& report);
[[nodiscard]] std::string to_table(const routing_report& report);

/// The prefetch report as one flat JSON object (see prefetch_report).
[[nodiscard]] std::string to_json(const prefetch_report& report);
[[nodiscard]] std::string to_table(const prefetch_report& report);

} // namespace kvfleet::bench
