#include "tools/bench/app.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <initializer_list>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace kvfleet::bench {
namespace {

struct outcome {
  int status = -1;
  std::string out;
  std::string err;
};

outcome run(std::initializer_list<std::string_view> args) {
  const std::vector<std::string_view> v(args);
  std::ostringstream out;
  std::ostringstream err;
  outcome o;
  o.status = run_app(v, out, err, /*err_is_terminal=*/true);
  o.out = out.str();
  o.err = err.str();
  return o;
}

TEST(bench_app, help_goes_to_stdout) {
  auto o = run({"--help"});
  EXPECT_EQ(o.status, exit_ok);
  EXPECT_NE(o.out.find("kvfleet-bench engine"), std::string::npos);
  EXPECT_TRUE(o.err.empty());
  o = run({"engine", "--help"});
  EXPECT_EQ(o.status, exit_ok);
  EXPECT_NE(o.out.find("--capacity-fraction"), std::string::npos);
}

TEST(bench_app, json_run_prints_only_json_on_stdout) {
  auto o =
      run({"engine", "--workload", "shared-prefix", "--requests", "100",
           "--capacity-fraction", "0.3", "--policies", "lru,belady", "--json"});
  ASSERT_EQ(o.status, exit_ok) << o.err;
  const nlohmann::json j = nlohmann::json::parse(o.out);
  EXPECT_EQ(j.at("workload"), "shared-prefix");
  EXPECT_EQ(j.at("requests"), 100);
  EXPECT_GT(j.at("capacity_blocks").get<std::size_t>(), 0U);
  ASSERT_EQ(j.at("results").size(), 2U);
  EXPECT_EQ(j.at("results")[0].at("policy"), "lru");
  EXPECT_EQ(j.at("results")[1].at("policy"), "belady");
}

TEST(bench_app, table_run) {
  auto o = run({"engine", "--workload", "chat", "--requests", "100",
                "--capacity-blocks", "50", "--policies", "adaptive"});
  ASSERT_EQ(o.status, exit_ok) << o.err;
  EXPECT_NE(o.out.find("capacity 50 blocks"), std::string::npos) << o.out;
  EXPECT_NE(o.out.find("adaptive"), std::string::npos) << o.out;
}

TEST(bench_app, usage_errors_exit_2_with_a_message_on_stderr) {
  for (auto args : {
           std::initializer_list<std::string_view>{},
           {"engine", "--workload", "chat", "--capacity-blocks", "5", "--x"},
           {"engine", "--workload", "nope", "--capacity-blocks", "5"},
           {"engine", "--workload", "chat", "--capacity-blocks", "5",
            "--policies", "fifo"},
           {"engine", "--workload", "chat", "--capacity-blocks", "0"},
           {"engine", "--capacity-blocks", "5"},
           {"engine", "--workload", "chat", "--trace", "t", "--capacity-blocks",
            "5"},
       }) {
    auto o = run(args);
    EXPECT_EQ(o.status, exit_usage_error) << o.err;
    EXPECT_TRUE(o.out.empty());
    EXPECT_NE(o.err.find("kvfleet-bench: "), std::string::npos);
  }
}

TEST(bench_app, fraction_that_rounds_to_zero_is_a_usage_error) {
  auto o = run({"engine", "--workload", "chat", "--requests", "10",
                "--capacity-fraction", "0.0001"});
  EXPECT_EQ(o.status, exit_usage_error);
  EXPECT_NE(o.err.find("capacity 0"), std::string::npos) << o.err;
}

TEST(bench_app, output_that_cannot_be_written_is_a_runtime_error) {
  // As stdout on a full disk: help and results alike must not exit 0.
  for (auto args : {
           std::initializer_list<std::string_view>{"--help"},
           {"engine", "--help"},
           {"routing", "-h"},
           {"prefetch", "--help"},
           {"engine", "--workload", "chat", "--requests", "20",
            "--capacity-blocks", "50", "--policies", "lru"},
       }) {
    const std::vector<std::string_view> v(args);
    std::ostringstream out;
    out.setstate(std::ios::badbit);
    std::ostringstream err;
    EXPECT_EQ(run_app(v, out, err, false), exit_runtime_error) << v[0];
    EXPECT_NE(err.str().find("kvfleet-bench: cannot write"), std::string::npos)
        << err.str();
  }
}

TEST(bench_app, missing_trace_is_a_runtime_error) {
  auto o = run({"engine", "--trace", "/nonexistent/kvfleet.jsonl",
                "--capacity-blocks", "5"});
  EXPECT_EQ(o.status, exit_runtime_error);
  EXPECT_NE(o.err.find("/nonexistent/kvfleet.jsonl"), std::string::npos)
      << o.err;
  EXPECT_TRUE(o.out.empty());
}

} // namespace
} // namespace kvfleet::bench
