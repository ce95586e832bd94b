#include "tools/bench/routing_mode.hpp"

#include "tools/bench/cli.hpp"
#include "tools/bench/report.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <string_view>
#include <vector>

namespace kvfleet::bench {
namespace {

using actors::routing_policy;

result<command> parse(std::initializer_list<std::string_view> args) {
  const std::vector<std::string_view> v(args);
  return parse_command_line(v);
}

routing_options tiny_options() {
  routing_options o;
  o.base.workload = "shared-prefix";
  o.base.requests = 600;
  o.base.capacity_fraction = 0.5;
  o.rate_scale = 4.0;
  return o;
}

result<routing_report> run_tiny(const routing_options& o) {
  engine::workload_options wo;
  wo.requests = o.base.requests;
  auto reqs = engine::generate_workload(o.base.workload, wo);
  if (!reqs)
    return unexpected<error>(reqs.error());
  return run_routing(o, *reqs, o.base.workload);
}

TEST(routing_mode, kv_aware_hits_at_least_least_loaded_and_stats_are_sane) {
  const routing_options o = tiny_options();
  auto report = run_tiny(o);
  ASSERT_TRUE(report) << report.error().describe();
  ASSERT_EQ(report->results.size(), 3U);
  EXPECT_EQ(report->engines, 4U);
  for (const routing_result& r : report->results) {
    ASSERT_EQ(r.engine_requests.size(), 4U);
    const auto sum = std::accumulate(r.engine_requests.begin(),
                                     r.engine_requests.end(), std::uint64_t{0});
    EXPECT_EQ(sum, 600U);
    double shares = 0.0;
    for (auto n : r.engine_requests)
      shares += static_cast<double>(n) / 600.0;
    EXPECT_NEAR(shares, 1.0, 1e-12);
    EXPECT_GE(r.max_engine_share, 0.25);
    EXPECT_LE(r.max_engine_share, 1.0);
    EXPECT_GE(r.p95_queue, 0.0);
    EXPECT_LE(r.p95_queue, static_cast<double>(r.max_queue));
    EXPECT_LE(r.mean_queue, static_cast<double>(r.max_queue));
    EXPECT_LE(r.p50_us, r.p95_us);
    EXPECT_LE(r.p95_us, r.p99_us);
    EXPECT_GE(r.p50_us, o.service_overhead_us);
    EXPECT_GE(r.token_hit_ratio, 0.0);
    EXPECT_LE(r.token_hit_ratio, 1.0);
  }
  const routing_result& rr = report->results[0];
  const routing_result& ll = report->results[1];
  const routing_result& kv = report->results[2];
  EXPECT_EQ(rr.policy, routing_policy::round_robin);
  EXPECT_EQ(kv.policy, routing_policy::kv_aware);
  EXPECT_GE(kv.token_hit_ratio, ll.token_hit_ratio);
  // Round robin spreads requests exactly.
  EXPECT_LE(rr.max_engine_share, 151.0 / 600.0);
}

// The progress callback counts services started, to the last: with
// arrivals far faster than service most start after the last arrival, and
// the bar stopped where the arrivals ended (at 0-58% of the run). Each pass
// announces its set-up first (a total of 0).
TEST(routing_mode, progress_reaches_the_end_when_a_backlog_drains) {
  routing_options o = tiny_options();
  o.rate_scale = 1e6;
  o.policies = {routing_policy::round_robin};
  engine::workload_options wo;
  wo.requests = o.base.requests;
  auto reqs = engine::generate_workload(o.base.workload, wo);
  ASSERT_TRUE(reqs) << reqs.error().describe();
  std::vector<std::size_t> done;
  std::vector<std::string> phases;
  auto report = run_routing(
      o, *reqs, "progress",
      [&](std::size_t d, std::size_t total, const std::string& label) {
        if (total == 0) {
          phases.push_back(label);
          return;
        }
        EXPECT_EQ(total, 600U);
        done.push_back(d);
      });
  ASSERT_TRUE(report) << report.error().describe();
  ASSERT_FALSE(done.empty());
  EXPECT_EQ(done.back(), 600U);
  EXPECT_TRUE(std::is_sorted(done.begin(), done.end()));
  // Arrivals outrun service: when half the requests had arrived, far
  // fewer had started (the old count said 300 there).
  ASSERT_GT(done.size(), 300U);
  EXPECT_LT(done[299], 100U);
  EXPECT_NE(
      std::find(phases.begin(), phases.end(), "round_robin (1/1): setting up"),
      phases.end());
}

TEST(routing_mode, deterministic) {
  auto a = run_tiny(tiny_options());
  auto b = run_tiny(tiny_options());
  ASSERT_TRUE(a && b);
  EXPECT_EQ(to_json(*a), to_json(*b));
}

TEST(routing_mode, one_engine_queues_everything) {
  routing_options o = tiny_options();
  o.engines = 1;
  o.policies = {routing_policy::kv_aware};
  auto report = run_tiny(o);
  ASSERT_TRUE(report) << report.error().describe();
  EXPECT_DOUBLE_EQ(report->results[0].max_engine_share, 1.0);
}

TEST(routing_mode, only_the_time_between_arrivals_counts) {
  routing_options o = tiny_options();
  o.policies = {routing_policy::least_loaded};
  engine::workload_options wo;
  wo.requests = o.base.requests;
  auto reqs = engine::generate_workload(o.base.workload, wo);
  ASSERT_TRUE(reqs);
  // A trace stamped with epoch milliseconds, and slowed down ten
  // times: its nanoseconds from 1970 would not fit an int64.
  o.rate_scale = 0.1;
  auto slow = run_routing(o, *reqs, "slow");
  ASSERT_TRUE(slow) << slow.error().describe();
  for (auto& r : *reqs)
    r.timestamp_ms += 1'700'000'000'000;
  auto epoch = run_routing(o, *reqs, "epoch");
  ASSERT_TRUE(epoch) << epoch.error().describe();
  EXPECT_EQ(nlohmann::json::parse(to_json(*epoch))["results"],
            nlohmann::json::parse(to_json(*slow))["results"]);
  EXPECT_GE(epoch->results[0].p50_us, 0.0);
  // A gap the simulated clock cannot hold is an error, not a wrapped time.
  reqs->back().timestamp_ms = std::numeric_limits<std::uint64_t>::max() / 2;
  auto too_far = run_routing(o, *reqs, "too far");
  ASSERT_FALSE(too_far);
  EXPECT_NE(too_far.error().message.find("raise --rate-scale"),
            std::string::npos)
      << too_far.error().message;
  // The rate scale as given: std::to_string printed 1e-9 as "0.000000",
  // a value the option refuses.
  reqs->back().timestamp_ms = reqs->front().timestamp_ms + 1'000'000;
  o.rate_scale = 1e-9;
  auto tiny_rate = run_routing(o, *reqs, "tiny rate");
  ASSERT_FALSE(tiny_rate);
  EXPECT_NE(tiny_rate.error().message.find("with --rate-scale 1e-09,"),
            std::string::npos)
      << tiny_rate.error().message;
}

TEST(routing_mode, service_time_uses_the_per_token_cost_as_given) {
  // One request of 1024 prompt tokens, all computed, on an idle engine:
  // its latency is its service, 1024 x 1.5 ns. Rounded to whole
  // nanoseconds per token first it was 1024 x 2 ns.
  routing_options o;
  o.base.workload = "hand-made";
  o.base.capacity_blocks = 8;
  o.engines = 1;
  o.policies = {routing_policy::least_loaded};
  o.base.prefill_us_per_token = 0.0015;
  o.service_overhead_us = 0.0;
  std::vector<engine::workload_request> reqs(1);
  reqs[0].input_length = 1024;
  reqs[0].hash_ids = {1, 2};
  auto report = run_routing(o, reqs, "hand-made");
  ASSERT_TRUE(report) << report.error().describe();
  EXPECT_DOUBLE_EQ(report->results[0].p50_us, 1.536);
}

TEST(routing_mode, queue_lengths_and_latencies_of_a_hand_made_case) {
  // One engine; four requests of distinct prompts (all computed, 1,024
  // tokens, 1.024 us each) arrive at once, a fifth after they are done.
  // Each finds before it, queued or in service: 0, 1, 2, 3, then 0. So
  // p95_queue = 3 (nearest rank of five), mean 1.2, max 3; latencies
  // 1.024, 2.048, 3.072, 4.096, 1.024 us: p50 2.048, p95 4.096.
  routing_options o;
  o.base.workload = "hand-made";
  o.base.capacity_blocks = 64;
  o.engines = 1;
  o.base.prefill_us_per_token = 0.001;
  o.service_overhead_us = 0.0;
  std::vector<engine::workload_request> reqs(5);
  for (std::size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].input_length = 1024;
    reqs[i].hash_ids = {10 * i + 1, 10 * i + 2};
  }
  const request_keys keys = make_request_keys(
      reqs, bench_namespace(o.base).fingerprint(), o.base.block_tokens);
  const std::vector<std::int64_t> arrivals{0, 0, 0, 0, 1'000'000};
  for (const auto policy :
       {routing_policy::least_loaded, routing_policy::kv_aware}) {
    SCOPED_TRACE(to_string(policy));
    const auto r = simulate_routing(o, policy, keys, arrivals, 64);
    ASSERT_TRUE(r) << r.error().describe();
    EXPECT_DOUBLE_EQ(r->p95_queue, 3.0);
    EXPECT_DOUBLE_EQ(r->mean_queue, 1.2);
    EXPECT_EQ(r->max_queue, 3U);
    EXPECT_DOUBLE_EQ(r->p50_us, 2.048);
    EXPECT_DOUBLE_EQ(r->p95_us, 4.096);
    EXPECT_DOUBLE_EQ(r->token_hit_ratio, 0.0);
  }
}

TEST(routing_mode, arrivals_out_of_order_are_an_error) {
  // simulate_routing serves arrivals in the order given; one earlier than
  // its predecessor was served after it, with a latency counted from
  // before the request was sent, and the result looked valid.
  routing_options o;
  o.base.workload = "hand-made";
  o.base.capacity_blocks = 8;
  o.engines = 1;
  std::vector<engine::workload_request> reqs(2);
  for (auto& r : reqs) {
    r.input_length = 1024;
    r.hash_ids = {1, 2};
  }
  const request_keys keys = make_request_keys(
      reqs, bench_namespace(o.base).fingerprint(), o.base.block_tokens);
  const std::vector<std::int64_t> backwards{1'000'000, 0};
  auto r =
      simulate_routing(o, routing_policy::least_loaded, keys, backwards, 8);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::invalid_argument);
  EXPECT_NE(r.error().message.find("nondecreasing: request 1 arrives at 0 ns"),
            std::string::npos)
      << r.error().message;
  const std::vector<std::int64_t> forwards{0, 0};
  EXPECT_TRUE(
      simulate_routing(o, routing_policy::least_loaded, keys, forwards, 8));
}

TEST(routing_mode, capacity_is_per_engine) {
  routing_options o = tiny_options();
  o.base.capacity_fraction = 0.25;
  auto n = engine_capacity_in_blocks(o, 1000);
  ASSERT_TRUE(n);
  EXPECT_EQ(*n, 63U); // round(250 / 4)
  o.base.capacity_fraction.reset();
  o.base.capacity_blocks = 7;
  EXPECT_EQ(*engine_capacity_in_blocks(o, 1000), 7U);
  o.base.capacity_blocks.reset();
  o.base.capacity_fraction = 0.001;
  auto zero = engine_capacity_in_blocks(o, 100);
  ASSERT_FALSE(zero);
  EXPECT_EQ(zero.error().code, errc::zero_capacity);
  // The fraction as given, not std::to_string's "0.001000".
  EXPECT_NE(zero.error().message.find("--capacity-fraction 0.001 of"),
            std::string::npos)
      << zero.error().message;
}

TEST(routing_mode, json_shape) {
  auto report = run_tiny(tiny_options());
  ASSERT_TRUE(report);
  const auto j = nlohmann::json::parse(to_json(*report));
  for (const char* k :
       {"workload", "requests", "block_tokens", "working_set_blocks", "engines",
        "capacity_blocks", "rate_scale", "results"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["workload"], "shared-prefix");
  ASSERT_EQ(j["results"].size(), 3U);
  EXPECT_EQ(j["results"][0]["policy"], "round_robin");
  EXPECT_EQ(j["results"][2]["policy"], "kv_aware");
  for (const auto& r : j["results"])
    for (const char* k :
         {"policy", "token_hit_ratio", "block_hit_ratio", "p50_us", "p95_us",
          "p99_us", "prefill_saved_s", "p95_queue", "max_engine_share"})
      EXPECT_TRUE(r.contains(k)) << k;
  const std::string table = to_table(*report);
  EXPECT_NE(table.find("kv_aware"), std::string::npos);
  EXPECT_NE(table.find("p95 queue"), std::string::npos);
}

TEST(routing_cli, defaults_and_options) {
  auto cmd =
      parse({"routing", "--workload", "chat", "--capacity-fraction", "0.25"});
  ASSERT_TRUE(cmd) << cmd.error().describe();
  EXPECT_EQ(cmd->kind, command_kind::routing);
  const routing_options& d = cmd->routing;
  EXPECT_EQ(d.engines, 4U);
  EXPECT_EQ(d.policies,
            (std::vector<routing_policy>{routing_policy::round_robin,
                                         routing_policy::least_loaded,
                                         routing_policy::kv_aware}));
  EXPECT_DOUBLE_EQ(d.rate_scale, 1.0);
  EXPECT_EQ(d.base.workload, "chat");

  cmd = parse({"routing",
               "--workload=shared-prefix",
               "--capacity-blocks",
               "100",
               "--engines",
               "8",
               "--policies",
               "kv_aware,least_loaded",
               "--rate-scale",
               "2.5",
               "--service-overhead-us",
               "50",
               "--credit-per-block",
               "0.5",
               "--max-credit",
               "8",
               "--backlog-margin",
               "2",
               "--overload-credit-factor",
               "0.5",
               "--eviction",
               "lru",
               "--json",
               "--no-progress"});
  ASSERT_TRUE(cmd) << cmd.error().describe();
  const routing_options& o = cmd->routing;
  EXPECT_EQ(o.engines, 8U);
  EXPECT_EQ(o.policies,
            (std::vector<routing_policy>{routing_policy::kv_aware,
                                         routing_policy::least_loaded}));
  EXPECT_DOUBLE_EQ(o.rate_scale, 2.5);
  EXPECT_DOUBLE_EQ(o.service_overhead_us, 50.0);
  EXPECT_DOUBLE_EQ(o.router.credit_per_block, 0.5);
  EXPECT_DOUBLE_EQ(o.router.max_credit, 8.0);
  EXPECT_EQ(o.router.backlog_margin, 2U);
  EXPECT_DOUBLE_EQ(o.router.overload_credit_factor, 0.5);
  EXPECT_EQ(o.eviction, engine::policy_kind::lru);
  EXPECT_TRUE(o.base.json);
  EXPECT_FALSE(o.base.progress);
  EXPECT_EQ(*o.base.capacity_blocks, 100U);
}

TEST(routing_cli, errors_and_help) {
  const auto bad = [](std::initializer_list<std::string_view> args,
                      std::string_view needle) {
    auto cmd = parse(args);
    ASSERT_FALSE(cmd) << needle;
    EXPECT_TRUE(is_usage_error(cmd.error()));
    EXPECT_NE(cmd.error().message.find(needle), std::string::npos)
        << cmd.error().message;
  };
  // Each option on an otherwise valid command line.
  const auto bad_option = [&bad](std::string_view opt, std::string_view value,
                                 std::string_view needle) {
    bad({"routing", "--workload", "chat", "--capacity-fraction", "0.2", opt,
         value},
        needle);
  };
  bad_option("--engines", "0", "--engines");
  bad_option("--engines", "65", "--engines");
  bad_option("--policies", "lru", "unknown routing policy");
  bad_option("--rate-scale", "0", "--rate-scale");
  bad_option("--overload-credit-factor", "1.5", "--overload-credit-factor");
  bad_option("--disk-dir", "/tmp", "unknown option '--disk-dir'");
  bad_option("--service-overhead-us", "2000000",
             "--service-overhead-us must be at most 1000000");
  bad_option("--prefill-us-per-token", "1e9",
             "--prefill-us-per-token must be at most 1000000");
  bad_option("--eviction", "belady",
             "belady needs to know every request ahead");
  bad({"nope"}, "modes: engine, routing, prefetch");
  auto help = parse({"routing", "--engines", "x", "--help"});
  ASSERT_TRUE(help);
  EXPECT_EQ(help->kind, command_kind::routing_help);
  EXPECT_NE(routing_help().find("p95_queue"), std::string_view::npos);
  EXPECT_NE(main_help().find("routing"), std::string_view::npos);
}

} // namespace
} // namespace kvfleet::bench
