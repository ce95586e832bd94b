#include "tools/bench/report.hpp"
#include "tools/bench/cli.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>

namespace kvfleet::bench {

namespace {

// The fields every mode's per-policy result shares, in the order the
// engine-mode JSON shape fixes.
template <class Result>
void put_common(nlohmann::ordered_json& j, const Result& r) {
  j["token_hit_ratio"] = r.token_hit_ratio;
  j["block_hit_ratio"] = r.block_hit_ratio;
  j["p50_us"] = r.p50_us;
  j["p95_us"] = r.p95_us;
  j["p99_us"] = r.p99_us;
  j["prefill_saved_s"] = r.prefill_saved_s;
}

// The JSON text of `j`. A trace's label is its path, which may be any bytes:
// bytes that are not UTF-8 become U+FFFD instead of an exception.
std::string dump(const nlohmann::ordered_json& j) {
  return j.dump(2, ' ', false,
                nlohmann::ordered_json::error_handler_t::replace) +
         "\n";
}

// "workload chat: 20000 requests, 512 tokens per block"
template <class Report> std::string headline(const Report& report) {
  // printable(): a trace path may hold a newline or terminal escapes.
  return (report.from_trace ? "trace " : "workload ") +
         printable(report.workload) + ": " + std::to_string(report.requests) +
         " requests, " + std::to_string(report.block_tokens) +
         " tokens per block\n";
}

} // namespace

std::string to_json(const engine_report& report) {
  nlohmann::ordered_json results = nlohmann::ordered_json::array();
  for (const policy_result& r : report.results) {
    nlohmann::ordered_json j;
    j["policy"] = std::string(engine::to_string(r.policy));
    put_common(j, r);
    if (r.disk) {
      j["memory_token_hit_ratio"] = r.token_hit_ratio - r.disk_token_hit_ratio;
      j["disk_token_hit_ratio"] = r.disk_token_hit_ratio;
      j["spills"] = r.spills;
      // Busy refusals included; failed_spills() (the rest) nonzero: the
      // disk figures are not valid (the program says so and exits 1).
      j["spill_failures"] = r.spill_failures;
      j["spills_refused_full"] = r.spills_refused_full;
      j["spills_refused_capacity"] = r.spills_refused_capacity;
      j["spills_refused_busy"] = r.spills_refused_busy;
      j["spill_errors"] = r.spill_errors;
      j["disk_full"] = r.disk_full;
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
  return dump(j);
}

std::string to_table(const engine_report& report) {
  std::string out = headline(report);
  const double pct = report.working_set_blocks == 0
                         ? 0.0
                         : 100.0 * static_cast<double>(report.capacity_blocks) /
                               static_cast<double>(report.working_set_blocks);
  // snprintf with literal formats: a line never comes near the buffer size
  // (the longest, the spill line, is under 300 bytes with 20-digit counts).
  char line[512];
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
    if (r.spill_failures == 0)
      continue;
    // Refusals while the disk was behind are load shedding: reported, but
    // they leave the figures valid (failed_spills).
    std::snprintf(
        line, sizeof line,
        "%-10s %llu spills refused or failed (file system full "
        "%llu, capacity pinned %llu, disk behind %llu, write "
        "errors %llu)%s%s\n",
        name.c_str(), static_cast<unsigned long long>(r.spill_failures),
        static_cast<unsigned long long>(r.spills_refused_full),
        static_cast<unsigned long long>(r.spills_refused_capacity),
        static_cast<unsigned long long>(r.spills_refused_busy),
        static_cast<unsigned long long>(r.spill_errors),
        r.disk_full ? ", the file system is full" : "",
        failed_spills(r) == 0 ? "" : ": the disk figures are not valid");
    out += line;
  }
  return out;
}

std::string to_json(const routing_report& report) {
  nlohmann::ordered_json results = nlohmann::ordered_json::array();
  for (const routing_result& r : report.results) {
    nlohmann::ordered_json j;
    j["policy"] = std::string(actors::to_string(r.policy));
    put_common(j, r);
    j["p95_queue"] = r.p95_queue;
    j["mean_queue"] = r.mean_queue;
    j["max_queue"] = r.max_queue;
    j["max_engine_share"] = r.max_engine_share;
    j["engine_requests"] = r.engine_requests;
    j["stale_routes"] = r.stale_routes;
    results.push_back(std::move(j));
  }
  nlohmann::ordered_json j;
  j["workload"] = report.workload;
  j["requests"] = report.requests;
  j["block_tokens"] = report.block_tokens;
  j["working_set_blocks"] = report.working_set_blocks;
  j["engines"] = report.engines;
  j["capacity_blocks"] = report.capacity_blocks;
  j["rate_scale"] = report.rate_scale;
  j["results"] = std::move(results);
  return dump(j);
}

std::string to_table(const routing_report& report) {
  std::string out = headline(report);
  char line[256];
  std::snprintf(line, sizeof line,
                "working set %zu blocks; %u engines of %zu blocks each; "
                "arrival rate x%.3g\n",
                report.working_set_blocks, report.engines,
                report.capacity_blocks, report.rate_scale);
  out += line;
  std::snprintf(line, sizeof line,
                "%-13s %9s %9s %10s %10s %10s %9s %9s %9s %8s\n", "policy",
                "token hit", "block hit", "p50 us", "p95 us", "p99 us",
                "p95 queue", "mean q", "max share", "saved s");
  out += line;
  for (const routing_result& r : report.results) {
    const std::string name(actors::to_string(r.policy));
    std::snprintf(line, sizeof line,
                  "%-13s %8.2f%% %8.2f%% %10.0f %10.0f %10.0f %9.0f %9.2f "
                  "%8.1f%% %8.1f\n",
                  name.c_str(), 100.0 * r.token_hit_ratio,
                  100.0 * r.block_hit_ratio, r.p50_us, r.p95_us, r.p99_us,
                  r.p95_queue, r.mean_queue, 100.0 * r.max_engine_share,
                  r.prefill_saved_s);
    out += line;
  }
  return out;
}

std::string to_json(const prefetch_report& report) {
  nlohmann::ordered_json j;
  j["workload"] = report.workload;
  j["requests"] = report.requests;
  j["block_tokens"] = report.block_tokens;
  j["working_set_blocks"] = report.working_set_blocks;
  j["capacity_blocks"] = report.capacity_blocks;
  j["eviction"] = std::string(engine::to_string(report.eviction));
  j["threshold"] = report.threshold;
  j["prefetch_at"] = report.prefetch_at;
  j["predictions"] = report.predictions;
  j["untimed"] = report.untimed;
  j["overtaken"] = report.overtaken;
  j["unfired"] = report.unfired;
  j["redundant"] = report.redundant;
  j["prefetches"] = report.prefetches;
  j["useful"] = report.useful;
  j["wasted"] = report.wasted;
  j["unused"] = report.unused;
  j["used_fraction"] = report.used_fraction;
  j["token_hit_ratio"] = report.token_hit_ratio;
  j["baseline_token_hit_ratio"] = report.baseline_token_hit_ratio;
  return dump(j);
}

std::string to_table(const prefetch_report& report) {
  // The label apart: a trace path may be longer than the line, and may
  // hold a newline or terminal escapes (printable()).
  std::string out = "workload " + printable(report.workload);
  char line[512];
  std::snprintf(line, sizeof line,
                ": %zu requests; capacity %zu of %zu blocks; "
                "eviction %s; threshold %g\n",
                report.requests, report.capacity_blocks,
                report.working_set_blocks,
                std::string(engine::to_string(report.eviction)).c_str(),
                report.threshold);
  out += line;
  std::snprintf(line, sizeof line,
                "predictions %llu: untimed (no gap seen yet) %llu, "
                "overtaken by the request %llu, never fired (session or "
                "replay ended) %llu, redundant (all in memory) %llu; "
                "prefetch at %.2f of the mean gap\n",
                static_cast<unsigned long long>(report.predictions),
                static_cast<unsigned long long>(report.untimed),
                static_cast<unsigned long long>(report.overtaken),
                static_cast<unsigned long long>(report.unfired),
                static_cast<unsigned long long>(report.redundant),
                report.prefetch_at);
  out += line;
  std::snprintf(line, sizeof line,
                "prefetches %llu: useful %llu, wasted (evicted first or not "
                "used by the next round) %llu, unused (session or replay "
                "ended) %llu; used %.1f%%\n",
                static_cast<unsigned long long>(report.prefetches),
                static_cast<unsigned long long>(report.useful),
                static_cast<unsigned long long>(report.wasted),
                static_cast<unsigned long long>(report.unused),
                100.0 * report.used_fraction);
  out += line;
  std::snprintf(line, sizeof line,
                "token hit ratio with prefetch %.2f%%, without %.2f%%\n",
                100.0 * report.token_hit_ratio,
                100.0 * report.baseline_token_hit_ratio);
  out += line;
  return out;
}

} // namespace kvfleet::bench
