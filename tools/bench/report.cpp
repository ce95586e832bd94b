#include "tools/bench/report.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>

namespace kvfleet::bench {

std::string to_json(const engine_report& report) {
  nlohmann::ordered_json results = nlohmann::ordered_json::array();
  for (const policy_result& r : report.results) {
    nlohmann::ordered_json j;
    j["policy"] = std::string(engine::to_string(r.policy));
    j["token_hit_ratio"] = r.token_hit_ratio;
    j["block_hit_ratio"] = r.block_hit_ratio;
    j["p50_us"] = r.p50_us;
    j["p95_us"] = r.p95_us;
    j["p99_us"] = r.p99_us;
    j["prefill_saved_s"] = r.prefill_saved_s;
    if (r.disk) {
      j["memory_token_hit_ratio"] = r.token_hit_ratio - r.disk_token_hit_ratio;
      j["disk_token_hit_ratio"] = r.disk_token_hit_ratio;
      j["spills"] = r.spills;
    }
    results.push_back(std::move(j));
  }
  nlohmann::ordered_json j;
  j["workload"] = report.workload;
  j["requests"] = report.requests;
  j["block_tokens"] = report.block_tokens;
  j["working_set_blocks"] = report.working_set_blocks;
  j["capacity_blocks"] = report.capacity_blocks;
  j["results"] = std::move(results);
  return j.dump(2) + "\n";
}

std::string to_table(const engine_report& report) {
  std::string out;
  out += (report.from_trace ? "trace " : "workload ") + report.workload + ": " +
         std::to_string(report.requests) + " requests, " +
         std::to_string(report.block_tokens) + " tokens per block\n";
  const double pct = report.working_set_blocks == 0
                         ? 0.0
                         : 100.0 * static_cast<double>(report.capacity_blocks) /
                               static_cast<double>(report.working_set_blocks);
  // snprintf with literal formats: a line never comes near the buffer size.
  char line[256];
  std::snprintf(line, sizeof line,
                "working set %zu blocks, capacity %zu blocks (%.1f%%)\n",
                report.working_set_blocks, report.capacity_blocks, pct);
  out += line;
  std::snprintf(line, sizeof line, "%-10s %10s %10s %10s %10s %10s %16s\n",
                "policy", "token hit", "block hit", "p50 us", "p95 us",
                "p99 us", "prefill saved s");
  out += line;
  for (const policy_result& r : report.results) {
    const std::string name(engine::to_string(r.policy));
    std::snprintf(line, sizeof line,
                  "%-10s %9.2f%% %9.2f%% %10.1f %10.1f %10.1f %16.1f\n",
                  name.c_str(), 100.0 * r.token_hit_ratio,
                  100.0 * r.block_hit_ratio, r.p50_us, r.p95_us, r.p99_us,
                  r.prefill_saved_s);
    out += line;
  }
  for (const policy_result& r : report.results) {
    if (!r.disk)
      continue;
    const std::string name(engine::to_string(r.policy));
    std::snprintf(line, sizeof line,
                  "%-10s hits by tier: memory %.2f%%, disk %.2f%% of input "
                  "tokens; %llu blocks spilled\n",
                  name.c_str(),
                  100.0 * (r.token_hit_ratio - r.disk_token_hit_ratio),
                  100.0 * r.disk_token_hit_ratio,
                  static_cast<unsigned long long>(r.spills));
    out += line;
  }
  return out;
}

} // namespace kvfleet::bench
