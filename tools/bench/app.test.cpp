#include "tools/bench/app.hpp"

#include "engine/disk/disk_tier.hpp"
#include "engine/testing/temp_dir.hpp"
#include "tools/bench/engine_mode.hpp"
#include "tools/bench/interrupt.hpp"
#include "tools/bench/prefetch_mode.hpp"
#include "tools/bench/routing_mode.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <numeric>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
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

TEST(bench_app, a_run_where_belady_is_beaten_says_so) {
  // Belady chooses within the partition the store picks, so a small store
  // can see lru above it: a note on stderr says belady is no bound there.
  // Where it leads, nothing is said.
  auto o =
      run({"engine", "--workload", "chat", "--requests", "800", "--seed", "424",
           "--capacity-blocks", "10", "--policies", "lru,belady", "--json"});
  ASSERT_EQ(o.status, exit_ok) << o.err;
  const nlohmann::json j = nlohmann::json::parse(o.out);
  ASSERT_GT(j.at("results")[0].at("token_hit_ratio").get<double>(),
            j.at("results")[1].at("token_hit_ratio").get<double>())
      << "the case no longer shows belady beaten";
  EXPECT_NE(o.err.find("belady's token hit ratio"), std::string::npos) << o.err;
  EXPECT_NE(o.err.find("is below lru "), std::string::npos) << o.err;
  o = run({"engine", "--workload", "shared-prefix", "--requests", "100",
           "--capacity-fraction", "0.3", "--policies", "lru,belady", "--json"});
  ASSERT_EQ(o.status, exit_ok) << o.err;
  EXPECT_EQ(o.err.find("belady's"), std::string::npos) << o.err;
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

#if !defined(__SANITIZE_ADDRESS__)
// Caps this process's address space a few MiB above what it maps now, so
// that the next large allocation throws std::bad_alloc. For death tests
// only: the cap stays for the rest of the process.
void cap_address_space() {
  std::ifstream statm("/proc/self/statm");
  std::size_t pages = 0;
  statm >> pages;
  rlimit lim{};
  lim.rlim_cur = pages * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)) +
                 (std::size_t{4} << 20);
  lim.rlim_max = lim.rlim_cur;
  if (::setrlimit(RLIMIT_AS, &lim) != 0)
    std::_Exit(90);
}

// Exit status of a death test's child: 0 when `r` is the out-of-memory
// error, 1 for another error, 2 for a success. An escaped std::bad_alloc
// aborts instead (SIGABRT), as the modes did before they caught it.
template <class R> int oom_status(const R& r) {
  if (r)
    return 2;
  std::fprintf(stderr, "%s\n", r.error().describe().c_str());
  return r.error().code == errc::out_of_memory &&
                 r.error().message.find("out of memory") != std::string::npos
             ? 0
             : 1;
}

#endif

TEST(bench_modes, out_of_memory_is_an_error_not_an_abort) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP()
      << "AddressSanitizer reserves address space; RLIMIT_AS breaks it";
#else
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // One request of 2^20 blocks: its keys (16 MiB) and the working set's
  // table do not fit the cap's few MiB, whatever the heap has free.
  std::vector<engine::workload_request> reqs(1);
  reqs[0].session = 1;
  reqs[0].input_length = std::uint32_t{512} << 20;
  reqs[0].hash_ids.resize(std::size_t{1} << 20);
  std::iota(reqs[0].hash_ids.begin(), reqs[0].hash_ids.end(), 1U);
  engine_options e;
  e.workload = "chat";
  e.capacity_blocks = 16;
  e.policies = {engine::policy_kind::lru};
  EXPECT_EXIT(
      {
        cap_address_space();
        std::_Exit(oom_status(run_engine(e, reqs, "chat")));
      },
      ::testing::ExitedWithCode(0), "");
  routing_options r;
  r.base = e;
  r.policies = {actors::routing_policy::least_loaded};
  EXPECT_EXIT(
      {
        cap_address_space();
        std::_Exit(oom_status(run_routing(r, reqs, "chat")));
      },
      ::testing::ExitedWithCode(0), "");
  prefetch_options p;
  p.base = e;
  EXPECT_EXIT(
      {
        cap_address_space();
        std::_Exit(oom_status(run_prefetch(p, reqs, "chat")));
      },
      ::testing::ExitedWithCode(0), "");
#endif
}

// Requests an interrupt for the scope, as main()'s signal handler would.
struct interrupted_scope {
  explicit interrupted_scope(int signal) { request_interrupt(signal); }
  ~interrupted_scope() { clear_interrupt(); }
  interrupted_scope(const interrupted_scope&) = delete;
  interrupted_scope& operator=(const interrupted_scope&) = delete;
};

// A progress callback that requests an interrupt after the first request
// of the replay, as a signal arriving mid-replay would.
progress_fn interrupt_after_first_request(int signal) {
  return [signal](std::size_t done, std::size_t, const std::string&) {
    if (done == 1)
      request_interrupt(signal);
  };
}

// `n` requests of the chat workload.
auto chat_requests(std::size_t n) {
  engine::workload_options wo;
  wo.requests = n;
  return engine::generate_workload("chat", wo);
}

// The chat workload through an lru store of 16 blocks.
engine_options small_lru_chat() {
  engine_options e;
  e.workload = "chat";
  e.capacity_blocks = 16;
  e.policies = {engine::policy_kind::lru};
  return e;
}

TEST(bench_modes, an_interrupted_run_stops_and_removes_its_disk_directory) {
  // Killed by SIGINT or SIGTERM in the middle, a run left its --disk-dir
  // subdirectory (up to 4 x the memory capacity of segment files) behind.
  const engine::testing::temp_dir scratch("kvfleet-bench-test-");
  ASSERT_TRUE(scratch.ok());
  const std::string tmpl = scratch.path();
  const auto reqs = chat_requests(50);
  ASSERT_TRUE(reqs) << reqs.error().describe();
  engine_options e = small_lru_chat();
  e.disk_dir = tmpl;
  {
    auto r =
        run_engine(e, *reqs, "chat", interrupt_after_first_request(SIGTERM));
    clear_interrupt();
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().message, "interrupted after 1 of 50 requests");
    routing_options ro;
    ro.base = e;
    ro.base.disk_dir.clear();
    auto rr =
        run_routing(ro, *reqs, "chat", interrupt_after_first_request(SIGTERM));
    clear_interrupt();
    ASSERT_FALSE(rr);
    EXPECT_NE(rr.error().message.find("interrupted after"), std::string::npos)
        << rr.error().message;
    prefetch_options po;
    po.base = ro.base;
    auto pr =
        run_prefetch(po, *reqs, "chat", interrupt_after_first_request(SIGTERM));
    clear_interrupt();
    ASSERT_FALSE(pr);
    EXPECT_EQ(pr.error().message, "interrupted after 1 of 50 requests");
  }
  EXPECT_TRUE(std::filesystem::is_empty(tmpl));
  auto again = run_engine(e, *reqs, "chat");
  EXPECT_TRUE(again) << "the flag is cleared: " << again.error().describe();
}

TEST(bench_modes, the_first_signal_names_the_stop) {
  // SIGTERM, then SIGINT before the run has unwound (Ctrl-C after a kill):
  // the run was stopped by SIGTERM and exits 143. (Before, the second
  // signal overwrote the first: 130.)
  interrupted_scope term(SIGTERM);
  request_interrupt(SIGINT);
  EXPECT_EQ(interrupt_signal(), SIGTERM);
}

TEST(bench_modes, a_second_signal_of_either_kind_ends_the_process) {
  // Ctrl-C, then a SIGTERM (a service manager's, say) while the run
  // unwinds or creates its store: the second ends the process at once.
  // (Before, only the signal that arrived went back to its default: the
  // other's handler only asked for a stop again.) Each case in a child
  // process, with both signals at their default action to begin with.
  const std::pair<int, int> orders[] = {{SIGINT, SIGTERM}, {SIGTERM, SIGINT}};
  for (const auto& [first, second] : orders) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::signal(SIGINT, SIG_DFL);
      ::signal(SIGTERM, SIG_DFL);
      install_stop_handlers();
      ::raise(first);
      if (interrupt_signal() != first)
        ::_exit(3);
      ::raise(second);
      ::_exit(0); // alive: the second signal was caught
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == second)
        << "first " << first << ", second " << second << ": status " << status;
  }
}

TEST(bench_modes, an_interrupt_during_the_last_request_stops_the_run_too) {
  // The replays asked only before each request: a signal during the last
  // one (or the disk tier's wait after it) printed the full results with
  // exit status 0.
  const auto at_the_end = [](std::size_t done, std::size_t total,
                             const std::string&) {
    if (total > 0 && done == total) // not a step's announcement (0 of 0)
      request_interrupt(SIGINT);
  };
  const auto reqs = chat_requests(50);
  ASSERT_TRUE(reqs) << reqs.error().describe();
  const engine_options e = small_lru_chat();
  auto r = run_engine(e, *reqs, "chat", at_the_end);
  clear_interrupt();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().message, "interrupted after 50 of 50 requests");
  prefetch_options po;
  po.base = e;
  auto pr = run_prefetch(po, *reqs, "chat", at_the_end);
  clear_interrupt();
  ASSERT_FALSE(pr);
  EXPECT_EQ(pr.error().message, "interrupted after 50 of 50 requests");
}

TEST(bench_modes, an_interrupt_before_the_replay_stops_the_set_up) {
  // Counting the working set and computing the keys of 5,000,000 chat
  // requests took tens of seconds, deaf to the flag: only the replay
  // asked it ("interrupted after 0 of ... requests" once set up).
  const auto reqs = chat_requests(50);
  ASSERT_TRUE(reqs) << reqs.error().describe();
  engine_options e = small_lru_chat();
  const interrupted_scope stop(SIGINT);
  const std::string want = "interrupted while counting the working set";
  auto r = run_engine(e, *reqs, "chat");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::unavailable);
  EXPECT_EQ(r.error().message, want);
  routing_options ro;
  ro.base = e;
  auto rr = run_routing(ro, *reqs, "chat");
  ASSERT_FALSE(rr);
  EXPECT_EQ(rr.error().message, want);
  prefetch_options po;
  po.base = e;
  auto pr = run_prefetch(po, *reqs, "chat");
  ASSERT_FALSE(pr);
  EXPECT_EQ(pr.error().message, want);
  // The workload itself is not made either.
  std::ostringstream diag;
  auto loaded = load_requests(e, diag);
  ASSERT_FALSE(loaded);
  EXPECT_EQ(loaded.error().message,
            "interrupted while generating workload 'chat'");
}

TEST(bench_app, an_interrupt_while_generating_exits_with_128_plus_the_signal) {
  for (const int signal : {SIGINT, SIGTERM}) {
    const interrupted_scope stop(signal);
    auto o = run({"engine", "--workload", "chat", "--requests", "20",
                  "--capacity-blocks", "50", "--policies", "lru"});
    EXPECT_EQ(o.status, 128 + signal);
    EXPECT_TRUE(o.out.empty()) << o.out;
    EXPECT_EQ(o.err,
              "kvfleet-bench: interrupted while generating workload 'chat'\n");
  }
}

TEST(bench_app, an_interrupted_trace_read_says_interrupted) {
  // The reader's own words were "trace file '...': read stopped after
  // line 0"; a stopped run now says "interrupted" whatever step it was in.
  // (The FIFO case, a stop seen only at the end, is the reader's test.)
  const engine::testing::temp_dir scratch("kvfleet-bench-test-");
  ASSERT_TRUE(scratch.ok());
  const std::string tmpl = scratch.path();
  const std::string dir = tmpl;
  const std::string path = dir + "/trace.jsonl";
  std::ofstream(path)
      << R"({"timestamp": 0, "input_length": 1024, "output_length": 1, )"
      << R"("hash_ids": [1, 2]})" << '\n';
  {
    const interrupted_scope stop(SIGINT);
    auto o = run({"engine", "--trace", path, "--capacity-blocks", "5"});
    EXPECT_EQ(o.status, 128 + SIGINT);
    EXPECT_TRUE(o.out.empty()) << o.out;
    EXPECT_EQ(o.err, "kvfleet-bench: interrupted while reading trace file '" +
                         path + "' (after line 0)\n");
  }
}

TEST(bench_app, an_error_is_one_line_whatever_the_value_holds) {
  auto o = run({"engine", "--workload", "cha\nt", "--capacity-blocks", "5"});
  EXPECT_EQ(o.status, exit_usage_error);
  EXPECT_EQ(o.err.find("kvfleet-bench: unknown workload 'cha\\nt'"), 0U)
      << o.err;
  EXPECT_EQ(std::count(o.err.begin(), o.err.end(), '\n'), 1) << o.err;
  auto bytes =
      run({"engine", "--workload", "\xff\x1b[31m", "--capacity-blocks", "5"});
  EXPECT_NE(bytes.err.find("'\\xff\\x1b[31m'"), std::string::npos) << bytes.err;
}

// A temporary file holding `text`, removed at scope exit.
class temp_file {
public:
  explicit temp_file(std::string_view text) {
    char tmpl[] = "/tmp/kvfleet-bench-test-XXXXXX";
    const int fd = ::mkstemp(tmpl);
    EXPECT_GE(fd, 0);
    ::close(fd);
    path_ = tmpl;
    std::ofstream(path_) << text;
  }
  ~temp_file() { std::remove(path_.c_str()); }
  temp_file(const temp_file&) = delete;
  temp_file& operator=(const temp_file&) = delete;
  [[nodiscard]] const std::string& path() const { return path_; }

private:
  std::string path_;
};

TEST(bench_app, a_trace_s_content_errors_are_runtime_errors) {
  // Timestamps 10 and 2^64 - 1: past the simulated clock. The trace is at
  // fault, not the command line: exit 1 (it was 2).
  const temp_file far(
      R"({"timestamp": 10, "input_length": 512, "output_length": 1, "hash_ids": [1]})"
      "\n"
      R"({"timestamp": 18446744073709551615, "input_length": 512, "output_length": 1, "hash_ids": [2]})"
      "\n");
  auto o = run({"routing", "--trace", far.path(), "--capacity-blocks", "4"});
  EXPECT_EQ(o.status, exit_runtime_error) << o.err;
  EXPECT_NE(o.err.find("arrives past the simulated clock's range"),
            std::string::npos)
      << o.err;
  // No request with a whole block: the trace's content too.
  const temp_file short_inputs(
      R"({"timestamp": 0, "input_length": 511, "output_length": 1, "hash_ids": [1]})"
      "\n");
  for (std::string_view mode : {"engine", "routing"}) {
    auto s =
        run({mode, "--trace", short_inputs.path(), "--capacity-blocks", "4"});
    EXPECT_EQ(s.status, exit_runtime_error) << mode << ": " << s.err;
    EXPECT_NE(s.err.find("no request has a whole block"), std::string::npos)
        << s.err;
  }
  // The same gap from a generated workload is the option's doing.
  auto w = run({"routing", "--workload", "chat", "--requests", "20",
                "--capacity-blocks", "4", "--rate-scale", "1e-300"});
  EXPECT_EQ(w.status, exit_usage_error) << w.err;
}

TEST(bench_app, capacity_errors_name_the_option_and_the_limit) {
  // It said only "capacity is too large".
  auto f = run({"engine", "--workload", "chat", "--requests", "20",
                "--capacity-fraction", "1e30"});
  EXPECT_EQ(f.status, exit_usage_error);
  EXPECT_NE(f.err.find("option --capacity-fraction is too large: 1e+30 of a "
                       "working set of "),
            std::string::npos)
      << f.err;
  EXPECT_NE(f.err.find("which no machine has (at most "), std::string::npos)
      << f.err;
  auto r = run({"routing", "--workload", "chat", "--requests", "20",
                "--capacity-fraction", "1e30"});
  EXPECT_EQ(r.status, exit_usage_error);
  EXPECT_NE(r.err.find("blocks over 4 engines is more than"), std::string::npos)
      << r.err;
  // Each of 4 engines gets a quarter of the fraction: the largest fraction
  // is 4 times engine mode's (it said engine mode's, and fractions above it
  // were taken).
  const auto most = [](const std::string& err) {
    const auto at = err.find("(at most ");
    return at == std::string::npos ? 0.0
                                   : std::strtod(err.c_str() + at + 9, nullptr);
  };
  ASSERT_GT(most(f.err), 0.0) << f.err;
  EXPECT_NEAR(most(r.err) / most(f.err), 4.0, 1e-3) << r.err;
}

// The test-only hook makes every write of the disk tier find the file
// system full (ENOSPC), as a --disk-dir that fills up does.
engine_options full_disk_options(const std::string& dir) {
  const std::vector<std::string_view> args{
      "engine",       "--workload",        "chat", "--requests",
      "300",          "--capacity-blocks", "20",   "--policies",
      "lru,lfu",      "--disk-dir",        dir,    "--json",
      "--no-progress"};
  auto cmd = parse_command_line(args);
  EXPECT_TRUE(cmd) << cmd.error().describe();
  engine_options o = cmd->engine;
  o.disk_config_for_testing = [](engine::disk_tier_config& c) {
    c.write_fault_for_testing = [] { return ENOSPC; };
    c.free_bytes_for_testing = [] { return std::uint64_t{0}; };
  };
  return o;
}

TEST(bench_app, a_disk_that_refuses_spills_is_reported_and_fails_the_run) {
  // A full file system gave "spills": 190 (8051 on a free one), invalid
  // disk hit ratios, nothing in the report and exit status 0.
  const engine::testing::temp_dir scratch("kvfleet-bench-test-");
  ASSERT_TRUE(scratch.ok());
  const std::string tmpl = scratch.path();
  std::ostringstream out;
  std::ostringstream err;
  const int status =
      run_engine_command(full_disk_options(tmpl), out, err, false);
  EXPECT_EQ(status, exit_runtime_error) << err.str();
  const nlohmann::json j = nlohmann::json::parse(out.str());
  ASSERT_EQ(j.at("results").size(), 2U);
  std::uint64_t failed = 0;
  for (const auto& r : j.at("results")) {
    EXPECT_GT(r.at("spill_failures").get<std::uint64_t>(), 0U) << r;
    EXPECT_EQ(r.at("spills").get<std::uint64_t>(), 0U) << r;
    EXPECT_GT(r.at("spills_refused_full").get<std::uint64_t>() +
                  r.at("spill_errors").get<std::uint64_t>(),
              0U)
        << r;
    EXPECT_TRUE(r.at("disk_full").get<bool>()) << r;
    failed += r.at("spill_failures").get<std::uint64_t>();
  }
  // One line, after the report, naming the count and the reason.
  const std::string e = err.str();
  EXPECT_EQ(e.find("kvfleet-bench: the disk tier refused or failed " +
                   std::to_string(failed) + " spills (lru: "),
            0U)
      << e;
  EXPECT_NE(e.find("file system full"), std::string::npos) << e;
  EXPECT_NE(e.find("; the disk figures are not valid\n"), std::string::npos)
      << e;
  EXPECT_EQ(std::count(e.begin(), e.end(), '\n'), 1) << e;
  EXPECT_TRUE(std::filesystem::is_empty(tmpl));
}

TEST(bench_app, a_disk_that_takes_every_spill_reports_no_failures) {
  const engine::testing::temp_dir scratch("kvfleet-bench-test-");
  ASSERT_TRUE(scratch.ok());
  const std::string tmpl = scratch.path();
  engine_options o = full_disk_options(tmpl);
  o.disk_config_for_testing = {};
  std::ostringstream out;
  std::ostringstream err;
  EXPECT_EQ(run_engine_command(o, out, err, false), exit_ok) << err.str();
  EXPECT_TRUE(err.str().empty()) << err.str();
  const nlohmann::json j = nlohmann::json::parse(out.str());
  ASSERT_EQ(j.at("results").size(), 2U) << "lru and lfu";
  for (const auto& r : j.at("results")) {
    EXPECT_GT(r.at("spills").get<std::uint64_t>(), 0U) << r;
    EXPECT_EQ(r.at("spill_failures"), 0U) << r;
    EXPECT_EQ(r.at("disk_full"), false) << r;
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
