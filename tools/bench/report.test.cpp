#include "tools/bench/report.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <string>

namespace kvfleet::bench {
namespace {

engine_report sample() {
  engine_report r;
  r.workload = "chat";
  r.requests = 20000;
  r.block_tokens = 512;
  r.working_set_blocks = 1000;
  r.capacity_blocks = 250;
  policy_result lru;
  lru.policy = engine::policy_kind::lru;
  lru.token_hit_ratio = 0.5;
  lru.block_hit_ratio = 0.25;
  lru.p50_us = 10.5;
  lru.p95_us = 20.0;
  lru.p99_us = 30.0;
  lru.prefill_saved_s = 123.25;
  policy_result belady = lru;
  belady.policy = engine::policy_kind::belady;
  belady.token_hit_ratio = 0.75;
  r.results = {lru, belady};
  return r;
}

TEST(bench_report, json_shape) {
  const nlohmann::json j = nlohmann::json::parse(to_json(sample()));
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j.at("workload"), "chat");
  EXPECT_EQ(j.at("capacity_blocks"), 250);
  EXPECT_EQ(j.at("working_set_blocks"), 1000);
  EXPECT_EQ(j.at("requests"), 20000);
  EXPECT_EQ(j.at("block_tokens"), 512);
  const auto& results = j.at("results");
  ASSERT_TRUE(results.is_array());
  ASSERT_EQ(results.size(), 2U);
  for (const auto& r : results) {
    ASSERT_TRUE(r.is_object());
    EXPECT_EQ(r.size(), 7U);
    EXPECT_TRUE(r.at("policy").is_string());
    for (const char* key : {"token_hit_ratio", "block_hit_ratio", "p50_us",
                            "p95_us", "p99_us", "prefill_saved_s"})
      EXPECT_TRUE(r.at(key).is_number()) << key;
  }
  EXPECT_EQ(results[0].at("policy"), "lru");
  EXPECT_EQ(results[1].at("policy"), "belady");
  EXPECT_DOUBLE_EQ(results[0].at("token_hit_ratio").get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(results[1].at("token_hit_ratio").get<double>(), 0.75);
  EXPECT_DOUBLE_EQ(results[0].at("block_hit_ratio").get<double>(), 0.25);
  EXPECT_DOUBLE_EQ(results[0].at("p50_us").get<double>(), 10.5);
  EXPECT_DOUBLE_EQ(results[0].at("prefill_saved_s").get<double>(), 123.25);
}

TEST(bench_report, table) {
  const std::string t = to_table(sample());
  EXPECT_NE(t.find("working set 1000 blocks, capacity 250 blocks (25.0%)"),
            std::string::npos)
      << t;
  for (const char* column : {"policy", "token hit", "block hit", "p50 us",
                             "p95 us", "p99 us", "prefill saved s"})
    EXPECT_NE(t.find(column), std::string::npos) << column;
  EXPECT_NE(t.find("lru"), std::string::npos);
  EXPECT_NE(t.find("50.00%"), std::string::npos) << t;
  EXPECT_NE(t.find("75.00%"), std::string::npos) << t;
  EXPECT_NE(t.find("123.2"), std::string::npos) << t;
  EXPECT_EQ(t.back(), '\n');
}

TEST(bench_report,
     the_table_calls_disk_figures_invalid_only_for_failed_spills) {
  engine_report r = sample();
  r.results.resize(1);
  policy_result& p = r.results[0];
  p.disk = true;
  p.spills = 100;
  p.spill_failures = 3;
  p.spills_refused_busy = 3; // only load shedding
  std::string t = to_table(r);
  EXPECT_NE(t.find("3 spills refused or failed"), std::string::npos) << t;
  EXPECT_EQ(t.find("not valid"), std::string::npos) << t;
  p.spill_failures = 4;
  p.spills_refused_full = 1;
  t = to_table(r);
  EXPECT_NE(t.find(": the disk figures are not valid"), std::string::npos) << t;
}

TEST(bench_report, json_of_a_trace_path_that_is_not_utf8) {
  // A trace's label is its path, and a Linux path is any bytes: Latin-1
  // "caf\xe9.jsonl" must not make --json throw (and abort the program).
  engine_report e = sample();
  e.workload = "/tmp/caf\xe9.jsonl";
  e.from_trace = true;
  std::string text;
  ASSERT_NO_THROW(text = to_json(e));
  nlohmann::json j = nlohmann::json::parse(text);
  EXPECT_EQ(j.at("workload"), "/tmp/caf\xef\xbf\xbd.jsonl"); // U+FFFD
  routing_report r;
  r.workload = e.workload;
  ASSERT_NO_THROW(text = to_json(r));
  EXPECT_EQ(nlohmann::json::parse(text).at("workload"),
            "/tmp/caf\xef\xbf\xbd.jsonl");
  prefetch_report p;
  p.workload = e.workload;
  ASSERT_NO_THROW(text = to_json(p));
  EXPECT_EQ(nlohmann::json::parse(text).at("workload"),
            "/tmp/caf\xef\xbf\xbd.jsonl");
}

TEST(bench_report, a_table_escapes_its_trace_path) {
  // The path is the table's first line: a newline in it split that line,
  // and an ESC went to the terminal raw.
  engine_report e = sample();
  e.workload = "/tmp/a\nb\x1b[31m.jsonl";
  e.from_trace = true;
  routing_report r;
  r.workload = e.workload;
  r.from_trace = true;
  prefetch_report p;
  p.workload = e.workload;
  for (const std::string& t : {to_table(e), to_table(r), to_table(p)}) {
    const std::string first = t.substr(0, t.find('\n'));
    EXPECT_NE(first.find("/tmp/a"), std::string::npos) << t;
    EXPECT_NE(first.find("b"), std::string::npos) << t;
    EXPECT_EQ(t.find('\x1b'), std::string::npos) << t;
  }
}

TEST(bench_report, a_prefetch_table_shows_the_threshold_as_given) {
  // Printed with two decimals, 0.005 read 0.01 and 0.125 read 0.12.
  prefetch_report p;
  p.workload = "chat";
  for (const double t : {0.005, 0.125, 0.5}) {
    p.threshold = t;
    char want[64];
    std::snprintf(want, sizeof want, "threshold %g\n", t);
    EXPECT_NE(to_table(p).find(want), std::string::npos) << to_table(p);
  }
}

} // namespace
} // namespace kvfleet::bench
