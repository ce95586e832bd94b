#include "tools/bench/prefetch_mode.hpp"

#include "engine/block_key.hpp"
#include "engine/kv_namespace.hpp"
#include "tools/bench/cli.hpp"
#include "tools/bench/report.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <initializer_list>
#include <limits>
#include <string_view>
#include <unordered_set>
#include <vector>

namespace kvfleet::bench {
namespace {

std::vector<engine::block_key> chain(std::uint64_t salt, std::size_t n) {
  const engine::ns_fingerprint ns{};
  std::vector<engine::block_key> out;
  engine::block_key prev{};
  for (std::size_t i = 0; i < n; ++i) {
    prev = engine::chain_key_from_id(prev, ns, salt * 1000 + i);
    out.push_back(prev);
  }
  return out;
}

TEST(prefetch_ledger, hit_is_useful_eviction_is_wasted_rest_unused) {
  prefetch_ledger l;
  const auto a = chain(1, 3);
  const auto b = chain(2, 2);
  const auto c = chain(3, 4);
  EXPECT_TRUE(l.issued(a));
  EXPECT_TRUE(l.issued(b));
  EXPECT_TRUE(l.issued(c));
  EXPECT_FALSE(l.issued(a)); // still outstanding: not counted twice
  EXPECT_FALSE(l.issued({}));
  EXPECT_EQ(l.prefetches(), 3U);
  // A later request matches a's whole chain (and more): useful.
  auto longer = chain(1, 5);
  l.hit(longer);
  EXPECT_EQ(l.useful(), 1U);
  // A partial match of c is not a use.
  l.hit(std::span<const engine::block_key>(c).first(2));
  EXPECT_EQ(l.useful(), 1U);
  // b's last block is evicted before any use: wasted.
  std::unordered_set<engine::block_key, engine::block_key_hash> gone{b.back()};
  l.check_evicted(
      [&](const engine::block_key& k) { return gone.count(k) == 0; });
  EXPECT_EQ(l.wasted(), 1U);
  // A hit after eviction changes nothing.
  l.hit(b);
  EXPECT_EQ(l.useful(), 1U);
  EXPECT_EQ(l.outstanding(), 1U);
  l.finish();
  EXPECT_EQ(l.unused(), 1U);
  EXPECT_EQ(l.useful() + l.wasted() + l.unused(), l.prefetches());
}

TEST(prefetch_mode, round_query_caps) {
  EXPECT_EQ(round_query(1, 16), "round:1");
  EXPECT_EQ(round_query(40, 16), "round:16");
}

prefetch_options tiny() {
  prefetch_options o;
  o.base.workload = "chat";
  o.base.requests = 800;
  o.base.capacity_fraction = 0.25;
  return o;
}

TEST(prefetch_mode, chat_replay_accounts_every_prefetch) {
  const prefetch_options o = tiny();
  engine::workload_options wo;
  wo.requests = o.base.requests;
  auto reqs = engine::generate_workload("chat", wo);
  ASSERT_TRUE(reqs);
  auto r = run_prefetch(o, *reqs, "chat");
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_GT(r->prefetches, 0U);
  EXPECT_EQ(r->useful + r->wasted + r->unused, r->prefetches);
  EXPECT_LE(r->prefetches, r->predictions);
  EXPECT_DOUBLE_EQ(r->used_fraction, static_cast<double>(r->useful) /
                                         static_cast<double>(r->prefetches));
  auto again = run_prefetch(o, *reqs, "chat");
  ASSERT_TRUE(again);
  EXPECT_EQ(to_json(*r), to_json(*again));
  const auto j = nlohmann::json::parse(to_json(*r));
  for (const char* k :
       {"prefetches", "useful", "wasted", "unused", "used_fraction",
        "token_hit_ratio", "baseline_token_hit_ratio"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_NE(to_table(*r).find("useful"), std::string::npos);
}

TEST(prefetch_mode, needs_sessions) {
  engine::workload_options wo;
  wo.requests = 10;
  auto reqs = engine::generate_workload("no-reuse", wo);
  ASSERT_TRUE(reqs);
  auto r = run_prefetch(tiny(), *reqs, "no-reuse");
  ASSERT_FALSE(r);
}

TEST(prefetch_mode, a_session_timeout_out_of_range_is_refused) {
  // Milliseconds of it are added to request timestamps: a huge, negative
  // or non-finite value has no such count (llround of it is undefined).
  engine::workload_options wo;
  wo.requests = 10;
  auto reqs = engine::generate_workload("chat", wo);
  ASSERT_TRUE(reqs);
  for (const double t : {1e300, max_session_timeout_s * 2, -1.0,
                         std::numeric_limits<double>::infinity(),
                         std::numeric_limits<double>::quiet_NaN()}) {
    prefetch_options o = tiny();
    o.session_timeout_s = t;
    auto r = run_prefetch(o, *reqs, "chat");
    ASSERT_FALSE(r) << t;
    EXPECT_EQ(r.error().code, errc::invalid_argument) << t;
    EXPECT_NE(r.error().message.find("session_timeout_s"), std::string::npos)
        << r.error().message;
  }
}

TEST(prefetch_cli, a_huge_session_timeout_is_refused_naming_the_bound) {
  for (const std::string_view value : {"1e300", "1000000001"}) {
    std::vector<std::string_view> args{
        "prefetch", "--workload",          "chat", "--capacity-fraction",
        "0.25",     "--session-timeout-s", value};
    auto cmd = parse_command_line(args);
    ASSERT_FALSE(cmd) << value;
    EXPECT_TRUE(is_usage_error(cmd.error()));
    EXPECT_NE(cmd.error().message.find(
                  "--session-timeout-s must be at most 1000000000"),
              std::string::npos)
        << cmd.error().message;
  }
  std::vector<std::string_view> largest{
      "prefetch", "--workload",          "chat",      "--capacity-fraction",
      "0.25",     "--session-timeout-s", "1000000000"};
  auto ok = parse_command_line(largest);
  ASSERT_TRUE(ok) << ok.error().describe();
  EXPECT_DOUBLE_EQ(ok->prefetch.session_timeout_s, max_session_timeout_s);
}

TEST(prefetch_cli, parses_and_rejects) {
  std::vector<std::string_view> args{"prefetch", "--workload",
                                     "chat",     "--capacity-fraction",
                                     "0.25",     "--threshold",
                                     "0.7",      "--max-round",
                                     "8",        "--session-timeout-s",
                                     "120",      "--eviction",
                                     "lru",      "--json"};
  auto cmd = parse_command_line(args);
  ASSERT_TRUE(cmd) << cmd.error().describe();
  EXPECT_EQ(cmd->kind, command_kind::prefetch);
  EXPECT_DOUBLE_EQ(cmd->prefetch.threshold, 0.7);
  EXPECT_EQ(cmd->prefetch.max_round, 8U);
  EXPECT_DOUBLE_EQ(cmd->prefetch.session_timeout_s, 120.0);
  EXPECT_EQ(cmd->prefetch.eviction, engine::policy_kind::lru);
  EXPECT_TRUE(cmd->prefetch.base.json);

  std::vector<std::string_view> shared{
      "prefetch", "--workload", "shared-prefix", "--capacity-fraction", "0.25"};
  auto bad = parse_command_line(shared);
  ASSERT_FALSE(bad);
  EXPECT_TRUE(is_usage_error(bad.error()));
  std::vector<std::string_view> thr{
      "prefetch", "--workload",  "chat", "--capacity-fraction",
      "0.25",     "--threshold", "1.5"};
  EXPECT_FALSE(parse_command_line(thr));
  // Options prefetch mode would ignore are refused, not silently dropped.
  std::vector<std::string_view> cost{"prefetch", "--workload",
                                     "chat",     "--capacity-fraction",
                                     "0.25",     "--prefill-us-per-token",
                                     "999"};
  auto ignored = parse_command_line(cost);
  ASSERT_FALSE(ignored);
  EXPECT_NE(ignored.error().message.find("--prefill-us-per-token"),
            std::string::npos)
      << ignored.error().message;
  std::vector<std::string_view> belady{
      "prefetch", "--workload", "chat",  "--capacity-fraction",
      "0.25",     "--eviction", "belady"};
  auto bel = parse_command_line(belady);
  ASSERT_FALSE(bel);
  EXPECT_NE(bel.error().message.find("only engine mode"), std::string::npos)
      << bel.error().message;
  // Without a workload the message names the one this mode needs, not a
  // --trace it refuses.
  std::vector<std::string_view> none{"prefetch", "--capacity-fraction", "0.25"};
  auto no_input = parse_command_line(none);
  ASSERT_FALSE(no_input);
  EXPECT_TRUE(is_usage_error(no_input.error()));
  EXPECT_NE(no_input.error().message.find("--workload chat"), std::string::npos)
      << no_input.error().message;
  EXPECT_EQ(no_input.error().message.find("--trace"), std::string::npos)
      << no_input.error().message;
  std::vector<std::string_view> help{"prefetch", "-h"};
  auto h = parse_command_line(help);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->kind, command_kind::prefetch_help);
}

} // namespace
} // namespace kvfleet::bench
