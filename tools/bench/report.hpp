#pragma once
/// Output of `kvfleet-bench engine`: one JSON object or a table.
/// Thread safety: free functions on values.

#include "tools/bench/engine_mode.hpp"

#include <iosfwd>
#include <string>

namespace kvfleet::bench {

/// The report as one JSON object:
/// {"workload", "requests", "block_tokens", "working_set_blocks",
///  "capacity_blocks", "results": [{"policy", "token_hit_ratio",
///  "block_hit_ratio", "p50_us", "p95_us", "p99_us", "prefill_saved_s"}]}.
[[nodiscard]] std::string to_json(const engine_report& report);

/// The report as a human-readable table, ending with a newline.
[[nodiscard]] std::string to_table(const engine_report& report);

} // namespace kvfleet::bench
