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

TEST(prefetch_ledger, judged_by_the_sessions_next_request) {
  prefetch_ledger l;
  const auto a = chain(1, 3);
  const auto b = chain(2, 2);
  const auto c = chain(3, 4);
  const auto d = chain(4, 2);
  EXPECT_TRUE(l.issued(1, a));
  EXPECT_TRUE(l.issued(2, b));
  EXPECT_TRUE(l.issued(3, c));
  EXPECT_TRUE(l.issued(4, d));
  EXPECT_FALSE(l.issued(5, {}));
  l.redundant();
  EXPECT_EQ(l.prefetches(), 4U);
  EXPECT_EQ(l.redundant_count(), 1U);
  // Another session's request matching a's chain is no use of it (before,
  // any request's was: a shared system prompt counted again and again).
  l.request(9, chain(1, 5));
  EXPECT_EQ(l.useful(), 0U);
  // Session 1's next request matches a's whole chain (and more): useful.
  l.request(1, chain(1, 5));
  EXPECT_EQ(l.useful(), 1U);
  // Session 3's next request matches part of c only: wasted.
  l.request(3, std::span<const engine::block_key>(c).first(2));
  EXPECT_EQ(l.wasted(), 1U);
  // b's last block is evicted before session 2 comes back: wasted, and its
  // request later changes nothing.
  std::unordered_set<engine::block_key, engine::block_key_hash> gone{b.back()};
  l.check_evicted(
      [&](const engine::block_key& k) { return gone.count(k) == 0; });
  EXPECT_EQ(l.wasted(), 2U);
  l.request(2, b);
  EXPECT_EQ(l.useful(), 1U);
  // Session 4 ends: unused.
  l.ended(4);
  EXPECT_EQ(l.unused(), 1U);
  EXPECT_EQ(l.outstanding(), 0U);
  // A second prefetch for a session with one outstanding: the first is
  // wasted; the replay's end leaves the second unused.
  EXPECT_TRUE(l.issued(6, a));
  EXPECT_TRUE(l.issued(6, b));
  EXPECT_EQ(l.wasted(), 3U);
  l.finish();
  EXPECT_EQ(l.unused(), 2U);
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

/// tiny()'s chat requests.
result<std::vector<engine::workload_request>> tiny_chat() {
  engine::workload_options wo;
  wo.requests = tiny().base.requests;
  return engine::generate_workload("chat", wo);
}

TEST(prefetch_mode, chat_replay_accounts_every_prefetch) {
  const prefetch_options o = tiny();
  const auto reqs = tiny_chat();
  ASSERT_TRUE(reqs);
  auto r = run_prefetch(o, *reqs, "chat");
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_GT(r->prefetches, 0U);
  EXPECT_EQ(r->useful + r->wasted + r->unused, r->prefetches);
  // Every prediction ends one way.
  EXPECT_EQ(r->untimed + r->overtaken + r->unfired + r->redundant +
                r->prefetches,
            r->predictions);
  EXPECT_DOUBLE_EQ(r->used_fraction, static_cast<double>(r->useful) /
                                         static_cast<double>(r->prefetches));
  auto again = run_prefetch(o, *reqs, "chat");
  ASSERT_TRUE(again);
  EXPECT_EQ(to_json(*r), to_json(*again));
  const auto j = nlohmann::json::parse(to_json(*r));
  for (const char* k :
       {"prefetch_at", "untimed", "overtaken", "unfired", "redundant",
        "prefetches", "useful", "wasted", "unused", "used_fraction",
        "token_hit_ratio", "baseline_token_hit_ratio"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_NE(to_table(*r).find("useful"), std::string::npos);
}

TEST(prefetch_mode, a_prefetch_right_after_its_request_fetches_nothing) {
  // The prefix a session's next round starts with is this request's: all
  // in memory right after it. Every such prefetch is redundant, none is
  // judged (before, each counted useful when any later request matched it).
  prefetch_options o = tiny();
  o.prefetch_at = 0.0;
  const auto reqs = tiny_chat();
  ASSERT_TRUE(reqs);
  auto r = run_prefetch(o, *reqs, "chat");
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_GT(r->redundant, 0U);
  EXPECT_EQ(r->prefetches, 0U);
  EXPECT_EQ(r->useful, 0U);
  EXPECT_EQ(r->overtaken, 0U);
  // --max-round up to 2^32 - 1: the gap table grows with the rounds seen
  // (it was sized by --max-round: 2^32 - 1 wrapped to an empty table and
  // wrote past it).
  o.prefetch_at = 0.5;
  o.max_round = std::numeric_limits<std::uint32_t>::max();
  auto huge = run_prefetch(o, *reqs, "chat");
  ASSERT_TRUE(huge) << huge.error().describe();
  EXPECT_GT(huge->predictions, 0U);
  o.max_round = 16;
  o.prefetch_at = 1.5;
  auto bad = run_prefetch(o, *reqs, "chat");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, errc::invalid_argument);
}

TEST(prefetch_mode, the_replay_evicts_as_the_engine_actor_does) {
  // The lowest request priority first, as the engine actor's store: the
  // blocks a prefetch brings back at low priority go before the served
  // requests' ones. (Before, the replay evicted by the policy alone, and
  // read 24% of the prefetches used on chat where the engine used 11%.)
  prefetch_options o;
  auto cfg = replay_store_config(o, 64);
  ASSERT_TRUE(cfg.has_value()) << cfg.error().describe();
  EXPECT_TRUE(cfg->lowest_priority_first);
  EXPECT_EQ(cfg->policy, o.eviction);
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
  EXPECT_DOUBLE_EQ(cmd->prefetch.prefetch_at, 0.5); // the default
  for (const auto& [value, ok] :
       {std::pair{"0", true}, std::pair{"0.9", true}, std::pair{"1.5", false},
        std::pair{"-1", false}}) {
    std::vector<std::string_view> at{
        "prefetch", "--workload",    "chat", "--capacity-fraction",
        "0.25",     "--prefetch-at", value};
    const auto r = parse_command_line(at);
    EXPECT_EQ(r.has_value(), ok) << value;
    if (ok) {
      EXPECT_DOUBLE_EQ(r->prefetch.prefetch_at, std::stod(value));
    }
  }
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
