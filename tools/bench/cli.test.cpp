#include "tools/bench/cli.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <initializer_list>
#include <string_view>
#include <utility>
#include <vector>

namespace kvfleet::bench {
namespace {

using engine::policy_kind;

result<command> parse(std::initializer_list<std::string_view> args) {
  const std::vector<std::string_view> v(args);
  return parse_command_line(v);
}

// Expects a usage error whose message contains `needle`.
void expect_usage_error(std::initializer_list<std::string_view> args,
                        std::string_view needle) {
  auto cmd = parse(args);
  ASSERT_FALSE(cmd) << "expected an error containing '" << needle << "'";
  EXPECT_TRUE(is_usage_error(cmd.error())) << cmd.error().describe();
  EXPECT_NE(cmd.error().message.find(needle), std::string::npos)
      << cmd.error().message;
}

TEST(bench_cli, defaults) {
  auto cmd =
      parse({"engine", "--workload", "chat", "--capacity-fraction", "0.25"});
  ASSERT_TRUE(cmd) << cmd.error().describe();
  EXPECT_EQ(cmd->kind, command_kind::engine);
  const engine_options& o = cmd->engine;
  EXPECT_EQ(o.workload, "chat");
  EXPECT_TRUE(o.trace_path.empty());
  ASSERT_TRUE(o.capacity_fraction.has_value());
  EXPECT_DOUBLE_EQ(*o.capacity_fraction, 0.25);
  EXPECT_FALSE(o.capacity_blocks.has_value());
  EXPECT_EQ(o.policies, (std::vector<policy_kind>{
                            policy_kind::lru, policy_kind::lfu,
                            policy_kind::adaptive, policy_kind::belady}));
  EXPECT_FALSE(o.json);
  EXPECT_EQ(o.block_tokens, 512U);
  EXPECT_EQ(o.requests, 0U);
  EXPECT_EQ(o.seed, 42U);
  EXPECT_EQ(o.on_bad_line, engine::bad_line_action::reject);
  EXPECT_FALSE(o.compression);
  EXPECT_EQ(o.layout.layers, 1U);
  EXPECT_EQ(o.layout.kv_heads, 1U);
  EXPECT_EQ(o.layout.head_dim, 8U);
  EXPECT_DOUBLE_EQ(o.high_watermark, 0.9);
  EXPECT_DOUBLE_EQ(o.low_watermark, 0.8);
  EXPECT_DOUBLE_EQ(o.prefill_us_per_token, 20.0);
  EXPECT_TRUE(o.progress);
  // The default layout makes a 512-token block 16 KiB.
  EXPECT_EQ(bench_namespace(o).value_bytes(), 16U * 1024U);
}

TEST(bench_cli, every_option) {
  auto cmd = parse({"engine",
                    "--trace=t.jsonl",
                    "--capacity-blocks",
                    "100",
                    "--policies",
                    "belady,lru,adaptive",
                    "--json",
                    "--block-tokens=256",
                    "--requests",
                    "50",
                    "--seed",
                    "7",
                    "--on-bad-line",
                    "skip",
                    "--compression=on",
                    "--layout",
                    "2,4,16",
                    "--high-watermark",
                    "0.95",
                    "--low-watermark=0.5",
                    "--prefill-us-per-token",
                    "12.5",
                    "--no-progress"});
  ASSERT_TRUE(cmd) << cmd.error().describe();
  const engine_options& o = cmd->engine;
  EXPECT_EQ(o.trace_path, "t.jsonl");
  EXPECT_TRUE(o.workload.empty());
  ASSERT_TRUE(o.capacity_blocks.has_value());
  EXPECT_EQ(*o.capacity_blocks, 100U);
  EXPECT_EQ(o.policies,
            (std::vector<policy_kind>{policy_kind::belady, policy_kind::lru,
                                      policy_kind::adaptive}));
  EXPECT_TRUE(o.json);
  EXPECT_EQ(o.block_tokens, 256U);
  EXPECT_EQ(o.requests, 50U);
  EXPECT_EQ(o.seed, 7U);
  EXPECT_EQ(o.on_bad_line, engine::bad_line_action::skip);
  EXPECT_TRUE(o.compression);
  EXPECT_EQ(o.layout.layers, 2U);
  EXPECT_EQ(o.layout.kv_heads, 4U);
  EXPECT_EQ(o.layout.head_dim, 16U);
  EXPECT_DOUBLE_EQ(o.high_watermark, 0.95);
  EXPECT_DOUBLE_EQ(o.low_watermark, 0.5);
  EXPECT_DOUBLE_EQ(o.prefill_us_per_token, 12.5);
  EXPECT_FALSE(o.progress);
}

TEST(bench_cli, help) {
  for (auto args : {std::initializer_list<std::string_view>{"--help"},
                    std::initializer_list<std::string_view>{"-h"}}) {
    auto cmd = parse(args);
    ASSERT_TRUE(cmd);
    EXPECT_EQ(cmd->kind, command_kind::help);
  }
  auto cmd = parse({"engine", "--workload", "nope", "--help"});
  ASSERT_TRUE(cmd) << "help wins over a later-detected mistake";
  EXPECT_EQ(cmd->kind, command_kind::engine_help);
  cmd = parse({"engine", "-h"});
  ASSERT_TRUE(cmd);
  EXPECT_EQ(cmd->kind, command_kind::engine_help);
}

TEST(bench_cli, help_documents_every_option_and_only_the_engine_mode) {
  for (std::string_view opt :
       {"--workload", "--trace", "--capacity-fraction", "--capacity-blocks",
        "--policies", "--json", "--block-tokens", "--requests", "--seed",
        "--on-bad-line", "--compression", "--layout", "--high-watermark",
        "--low-watermark", "--prefill-us-per-token", "--no-progress",
        "--disk-dir", "--disk-capacity-blocks"})
    EXPECT_NE(engine_help().find(opt), std::string_view::npos) << opt;
  EXPECT_NE(main_help().find("engine"), std::string_view::npos);
}

TEST(bench_cli,
     a_capacity_after_a_layout_too_large_to_size_is_the_layouts_error) {
  // The block's byte count wraps to 0 in 64 bits: sizing the capacity's
  // limit by it divided by zero (SIGFPE) before the layout was refused.
  const std::vector<std::vector<std::string_view>> lines = {
      {"engine", "--workload", "chat", "--layout", "2097152,2097152,2097152",
       "--capacity-blocks", "10"},
      {"engine", "--workload", "chat", "--layout", "2097152,2097152,2097152",
       "--capacity-fraction", "0.5", "--disk-dir", "/tmp",
       "--disk-capacity-blocks", "10"}};
  for (const auto& line : lines) {
    const auto cmd = parse_command_line(line);
    ASSERT_FALSE(cmd.has_value()) << line.back();
    EXPECT_NE(cmd.error().message.find("a block would hold"), std::string::npos)
        << cmd.error().message;
  }
}

TEST(bench_cli, disk_options) {
  auto cmd = parse({"engine", "--workload", "chat", "--capacity-blocks", "9",
                    "--disk-dir", "/tmp", "--disk-capacity-blocks", "50"});
  ASSERT_TRUE(cmd.has_value()) << cmd.error().describe();
  EXPECT_EQ(cmd->engine.disk_dir, "/tmp");
  EXPECT_EQ(cmd->engine.disk_capacity_blocks, 50U);
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks", "9",
                      "--disk-capacity-blocks", "0"},
                     "--disk-capacity-blocks must be at least 1");
  // Without --disk-dir there is no disk tier to size: the run would go on
  // without one and the capacity would be silently ignored.
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks", "9",
                      "--disk-capacity-blocks", "50"},
                     "--disk-capacity-blocks needs --disk-dir");
}

TEST(bench_cli, mode_errors) {
  expect_usage_error({}, "no mode");
  expect_usage_error({"replay"}, "unknown mode 'replay'");
  expect_usage_error({"--json"}, "unknown option '--json'");
}

TEST(bench_cli, option_errors) {
  expect_usage_error(
      {"engine", "--workload", "chat", "--capacity-blocks", "5", "--bogus"},
      "unknown option '--bogus'");
  expect_usage_error(
      {"engine", "--workload", "chat", "--capacity-blocks", "5", "stray"},
      "unexpected argument 'stray'");
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks"},
                     "--capacity-blocks needs a value");
  expect_usage_error({"engine", "--workload=chat", "--workload=chat",
                      "--capacity-blocks", "5"},
                     "given twice");
  expect_usage_error(
      {"engine", "--workload", "chat", "--capacity-blocks", "5", "--json=yes"},
      "takes no value");
}

TEST(bench_cli, unknown_workload_lists_the_valid_ones) {
  auto cmd =
      parse({"engine", "--workload", "chitchat", "--capacity-blocks", "5"});
  ASSERT_FALSE(cmd);
  EXPECT_TRUE(is_usage_error(cmd.error()));
  for (std::string_view name : engine::workload_names())
    EXPECT_NE(cmd.error().message.find(name), std::string::npos) << name;
}

TEST(bench_cli,
     without_a_capacity_each_mode_takes_a_quarter_of_the_working_set) {
  // The routing command gives none; it was a usage error.
  for (const auto mode : {"engine", "routing", "prefetch"}) {
    std::vector<std::string_view> args{mode, "--workload", "chat"};
    const auto cmd = parse_command_line(args);
    ASSERT_TRUE(cmd.has_value()) << mode << ": " << cmd.error().describe();
    const engine_options& o = cmd->kind == command_kind::engine ? cmd->engine
                              : cmd->kind == command_kind::routing
                                  ? cmd->routing.base
                                  : cmd->prefetch.base;
    ASSERT_TRUE(o.capacity_fraction.has_value()) << mode;
    EXPECT_DOUBLE_EQ(*o.capacity_fraction, 0.25) << mode;
    EXPECT_FALSE(o.capacity_blocks.has_value()) << mode;
  }
  std::vector<std::string_view> blocks{"routing", "--workload", "chat",
                                       "--capacity-blocks", "9"};
  const auto cmd = parse_command_line(blocks);
  ASSERT_TRUE(cmd.has_value());
  EXPECT_FALSE(cmd->routing.base.capacity_fraction.has_value());
  EXPECT_EQ(cmd->routing.base.capacity_blocks, 9U);
}

TEST(bench_cli, input_and_capacity_are_exclusive_and_required) {
  expect_usage_error({"engine", "--capacity-blocks", "5"}, "give a workload");
  expect_usage_error({"engine", "--workload", "chat", "--trace", "t",
                      "--capacity-blocks", "5"},
                     "not both");
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks", "5",
                      "--capacity-fraction", "0.5"},
                     "not both");
}

TEST(bench_cli, bad_values) {
  const auto base = [](std::string_view opt, std::string_view value,
                       std::string_view needle) {
    expect_usage_error({"engine", "--workload", "chat", "--capacity-fraction",
                        "0.5", opt, value},
                       needle);
  };
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks", "0"},
                     "capacity 0");
  expect_usage_error(
      {"engine", "--workload", "chat", "--capacity-fraction", "0"},
      "capacity 0");
  expect_usage_error(
      {"engine", "--workload", "chat", "--capacity-fraction", "-1"},
      "capacity 0");
  expect_usage_error(
      {"engine", "--workload", "chat", "--capacity-fraction", "nan"},
      "needs a number");
  expect_usage_error(
      {"engine", "--workload", "chat", "--capacity-blocks", "-3"},
      "non-negative integer");
  base("--policies", "lru,mru", "unknown eviction policy 'mru'");
  base("--policies", "lru,,lfu", "comma-separated");
  base("--policies", "lru,lru", "listed twice");
  // Every request replayed is of normal priority: `priority` would be lru
  // under another name. Prefetch mode, whose prefetches are of low
  // priority, takes it.
  base("--policies", "lru,priority", "repeat lru's figures");
  expect_usage_error(
      {"routing", "--workload", "chat", "--eviction", "priority"},
      "option --eviction: policy 'priority'");
  {
    auto cmd =
        parse({"prefetch", "--workload", "chat", "--eviction", "priority"});
    ASSERT_TRUE(cmd) << cmd.error().describe();
    EXPECT_EQ(cmd->prefetch.eviction, policy_kind::priority);
  }
  base("--prefill-us-per-token", "1e7", "at most 1000000");
  base("--block-tokens", "0", "at least 1");
  base("--block-tokens", "12x", "non-negative integer");
  base("--requests", "0", "--requests must be in");
  base("--seed", "", "non-negative integer");
  base("--seed", "18446744073709551616", "--seed is too large");
  // The option's own limit, not its type's (4294967295 before).
  base("--block-tokens", "99999999999",
       "--block-tokens is too large: '99999999999' (at most 33554432 with "
       "--layout 1,1,8");
  base("--on-bad-line", "ignore", "skip or reject");
  base("--compression", "yes", "on or off");
  base("--layout", "1,1", "three positive integers");
  base("--layout", "1,0,8", "three positive integers");
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks", "5",
                      "--layout", "1,1,1", "--block-tokens", "16"},
                     "codec group size");
  base("--high-watermark", "1.5", "watermarks");
  base("--low-watermark", "0.95", "watermarks");
  base("--low-watermark", "0", "watermarks");
  base("--prefill-us-per-token", "-1", "must not be negative");
  // The values as given, not std::to_string's "0.000000".
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks", "5",
                      "--low-watermark", "1e-7", "--high-watermark", "1e-8"},
                     "(got low 1e-07, high 1e-08)");
}

TEST(bench_cli, too_large_names_the_option_s_own_limit) {
  // Before, each said its type's limit: 18446744073709551615, 4294967295.
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks", "5",
                      "--requests", "99999999999999999999"},
                     "--requests is too large: '99999999999999999999' (at "
                     "most 5000000)");
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks", "5",
                      "--requests", "5000001"},
                     "(at most 5000000)");
  expect_usage_error({"routing", "--workload", "chat", "--capacity-blocks", "5",
                      "--engines", "4294967296"},
                     "--engines is too large: '4294967296' (at most 64)");
  // Inside uint32 but past the 1 GiB block: the same message, not the
  // namespace's.
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks", "5",
                      "--block-tokens", "33554436"},
                     "(at most 33554432 with --layout 1,1,8");
  // The limit follows --layout, wherever it stands on the line.
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks", "5",
                      "--block-tokens", "99999999999", "--layout", "1,1,16"},
                     "(at most 16777216 with --layout 1,1,16");
  auto most = parse({"engine", "--workload", "chat", "--capacity-blocks", "5",
                     "--block-tokens", "33554432"});
  ASSERT_TRUE(most) << most.error().describe();
  EXPECT_EQ(most->engine.block_tokens, 33554432U);
  // A capacity past 64-bit addresses: no machine could hold it.
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks",
                      "18446744073709551615"},
                     "(at most 1125899906842623 blocks of 16384 bytes: more "
                     "is past 64-bit addresses, which no machine has)");
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks",
                      "99999999999999999999999"},
                     "(at most 1125899906842623 blocks");
  expect_usage_error({"engine", "--workload", "chat", "--capacity-blocks", "5",
                      "--disk-dir", "/tmp", "--disk-capacity-blocks",
                      "99999999999999999999"},
                     "--disk-capacity-blocks is too large");
}

TEST(bench_cli, negative_zero_is_zero) {
  // -0 passed "must not be negative" and came out as -0.0 in the report.
  auto e = parse({"engine", "--workload", "chat", "--capacity-blocks", "5",
                  "--prefill-us-per-token", "-0", "--high-watermark", "1",
                  "--low-watermark", "1"});
  ASSERT_TRUE(e) << e.error().describe();
  EXPECT_EQ(e->engine.prefill_us_per_token, 0.0);
  EXPECT_FALSE(std::signbit(e->engine.prefill_us_per_token));
  auto r = parse({"routing", "--workload", "chat", "--capacity-blocks", "5",
                  "--service-overhead-us", "-0", "--max-credit", "-0.0"});
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_FALSE(std::signbit(r->routing.service_overhead_us));
  EXPECT_FALSE(std::signbit(r->routing.router.max_credit));
  auto p = parse({"prefetch", "--workload", "chat", "--capacity-blocks", "5",
                  "--threshold", "-0"});
  ASSERT_TRUE(p) << p.error().describe();
  EXPECT_FALSE(std::signbit(p->prefetch.threshold));
  auto f = parse({"engine", "--workload", "chat", "--capacity-fraction", "-0"});
  ASSERT_FALSE(f);
  EXPECT_NE(f.error().message.find("capacity 0"), std::string::npos);
}

TEST(bench_cli, values_and_help_by_position) {
  // -h where a value stands is that value, not a request for help.
  auto t = parse({"engine", "--trace", "-h", "--capacity-blocks", "5"});
  ASSERT_TRUE(t) << t.error().describe();
  EXPECT_EQ(t->kind, command_kind::engine);
  EXPECT_EQ(t->engine.trace_path, "-h");
  auto d = parse({"engine", "--workload", "chat", "--capacity-blocks", "5",
                  "--disk-dir", "-h"});
  ASSERT_TRUE(d) << d.error().describe();
  EXPECT_EQ(d->kind, command_kind::engine);
  EXPECT_EQ(d->engine.disk_dir, "-h");
  auto rs = parse({"routing", "--workload", "chat", "--capacity-blocks", "5",
                   "--rate-scale", "-h"});
  ASSERT_FALSE(rs);
  EXPECT_NE(rs.error().message.find("--rate-scale needs a number, got '-h'"),
            std::string::npos)
      << rs.error().message;
  // An option is never a value: "--json" was taken as the trace's name.
  expect_usage_error({"engine", "--trace", "--json", "--capacity-blocks", "5"},
                     "option --trace needs a value (a value that starts with "
                     "'--' is written --trace=VALUE)");
  expect_usage_error({"routing", "--workload", "chat", "--capacity-blocks", "5",
                      "--engines", "--json"},
                     "option --engines needs a value");
  auto eq = parse({"engine", "--trace=--json", "--capacity-blocks", "5"});
  ASSERT_TRUE(eq) << eq.error().describe();
  EXPECT_EQ(eq->engine.trace_path, "--json");
  // So `--trace --help` asks for help: --help is no value either.
  auto h = parse({"engine", "--trace", "--help"});
  ASSERT_TRUE(h);
  EXPECT_EQ(h->kind, command_kind::engine_help);
  // help MODE is MODE --help; the rest of a help line is ignored.
  const std::pair<std::vector<std::string_view>, command_kind> cases[] = {
      {{"help", "engine"}, command_kind::engine_help},
      {{"--help", "routing"}, command_kind::routing_help},
      {{"-h", "prefetch", "--bogus"}, command_kind::prefetch_help},
      {{"help"}, command_kind::help},
      {{"--help", "--garbage", "--bogus"}, command_kind::help},
      {{"engine", "--bogus", "-h"}, command_kind::engine_help},
      // An option the mode does not take takes no value either (before,
      // these were "unknown option" errors).
      {{"routing", "--disk-dir", "-h"}, command_kind::routing_help},
      {{"prefetch", "--trace", "-h"}, command_kind::prefetch_help},
      {{"prefetch", "--policies", "-h"}, command_kind::prefetch_help},
  };
  for (const auto& [args, kind] : cases) {
    auto cmd = parse_command_line(args);
    ASSERT_TRUE(cmd) << args[0];
    EXPECT_EQ(cmd->kind, kind) << args[0] << " " << args.size();
  }
  // A topic that is no mode is a usage error naming the modes (before, the
  // main help and exit 0).
  for (const std::string_view help : {"help", "--help", "-h"})
    expect_usage_error({help, "engnie"},
                       "no help on 'engnie': the modes are engine");
  // Raw in the message: the error printer escapes it, once.
  expect_usage_error({"help", "a\x1b"}, "no help on 'a\x1b'");
}

TEST(bench_cli, printable_escapes_control_bytes_and_bad_utf8) {
  EXPECT_EQ(printable("plain 'text'"), "plain 'text'");
  EXPECT_EQ(printable("cha\nt"), "cha\\nt");
  EXPECT_EQ(printable("a\r\tb\x01\x7f"), "a\\r\\tb\\x01\\x7f");
  EXPECT_EQ(printable(std::string_view("a\0b", 3)), "a\\x00b");
  // Valid UTF-8 stays; stray, truncated, overlong and surrogate bytes do not.
  EXPECT_EQ(printable("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"),
            "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
  EXPECT_EQ(printable("\xff\xc3"), "\\xff\\xc3");
  EXPECT_EQ(printable("\xc0\xaf"), "\\xc0\\xaf");
  // C1 controls are valid UTF-8 but move the cursor (CSI) or end the line
  // (NEL); a backslash is doubled so that escapes stay unambiguous.
  EXPECT_EQ(printable("1\xc2\x9b"
                      "2J\xc2\x85x"),
            "1\\xc2\\x9b2J\\xc2\\x85x");
  EXPECT_EQ(printable("\xc2\xa0"), "\xc2\xa0"); // U+00A0 is printable
  EXPECT_EQ(printable("a\\nb"), "a\\\\nb");
  EXPECT_EQ(printable("\xed\xa0\x80"), "\\xed\\xa0\\x80");
  EXPECT_EQ(printable("\xe2\x82"), "\\xe2\\x82");
}

TEST(bench_cli, number_text_is_the_shortest_round_trip) {
  EXPECT_EQ(number_text(0.25), "0.25");
  EXPECT_EQ(number_text(1e-9), "1e-09");
  EXPECT_EQ(number_text(4.0), "4");
  EXPECT_EQ(number_text(0.1), "0.1");
}

} // namespace
} // namespace kvfleet::bench
