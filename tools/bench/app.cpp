#include "tools/bench/app.hpp"

#include "tools/bench/cli.hpp"
#include "tools/bench/engine_mode.hpp"
#include "tools/bench/interrupt.hpp"
#include "tools/bench/prefetch_mode.hpp"
#include "tools/bench/progress_bar.hpp"
#include "tools/bench/report.hpp"
#include "tools/bench/routing_mode.hpp"

#include <algorithm>
#include <cstdio>
#include <ostream>
#include <sstream>

namespace kvfleet::bench {

namespace {

int fail(std::ostream& err, const error& e) {
  // One line whatever the message quotes (a value with a newline in it).
  err << "kvfleet-bench: " << printable(e.message) << '\n';
  // A run stopped by a signal exits as a shell reports a process the
  // signal killed: 128 + the signal.
  if (const int signal = interrupt_signal(); signal != 0)
    return 128 + signal;
  return is_usage_error(e) ? exit_usage_error : exit_runtime_error;
}

// Writes `text` (`what`: the results or the help) to `out`; a write that
// fails (a full disk, a closed pipe) is a runtime error, not a silent
// success.
int print(std::ostream& out, std::ostream& err, std::string_view text,
          std::string_view what) {
  out << text << std::flush;
  if (!out) {
    err << "kvfleet-bench: cannot write " << what << " to standard output\n";
    return exit_runtime_error;
  }
  return exit_ok;
}

// Loads the input of `opts`, runs `run` on it with a progress bar and
// prints the report it returns.
template <class Run>
int run_mode(const engine_options& opts, std::ostream& out, std::ostream& err,
             bool err_is_terminal, Run run) {
  const std::string label =
      opts.workload.empty() ? opts.trace_path : opts.workload;
  // Drawn from the start: generating or reading a large input, and each
  // store's creation, take seconds with no request replayed.
  progress_bar bar(err, opts.progress && err_is_terminal);
  bar.phase(opts.workload.empty() ? "reading the trace"
                                  : "generating the workload");
  bar.start_ticking();
  // Its warnings (malformed trace lines) go out once the bar is erased.
  std::ostringstream diag;
  auto reqs = load_requests(opts, diag);
  bar.print(diag.str());
  if (!reqs) {
    bar.finish();
    return fail(err, reqs.error());
  }
  auto report =
      run(*reqs, label,
          [&bar](std::size_t done, std::size_t total, const std::string& what) {
            bar.update(done, total, what);
          });
  bar.finish();
  if (!report)
    return fail(err, report.error());
  // A signal after the replays' last check (while the report was put
  // together): no results either, and the signal's exit status.
  if (interrupt_requested())
    return fail(err, interrupted_error(reqs->size(), reqs->size()).value());
  return print(out, err, opts.json ? to_json(*report) : to_table(*report),
               "the results");
}

// "lru: 12 (12 file system full); lfu: ..." for the policies with spills
// that failed (failed_spills); empty when none did. `total` is their sum.
std::string spill_failure_detail(const engine_report& report,
                                 std::uint64_t& total) {
  std::string detail;
  total = 0;
  for (const policy_result& r : report.results) {
    const std::uint64_t failed = failed_spills(r);
    if (failed == 0)
      continue;
    total += failed;
    std::string parts;
    const auto add = [&parts](std::uint64_t n, std::string_view what) {
      if (n == 0)
        return;
      parts += (parts.empty() ? "" : ", ") + std::to_string(n) + " " +
               std::string(what);
    };
    add(r.spills_refused_full, "file system full");
    add(r.spills_refused_capacity, "capacity pinned");
    add(r.spill_errors, "write errors");
    if (parts.empty())
      parts = "not written";
    detail += (detail.empty() ? "" : "; ") +
              std::string(engine::to_string(r.policy)) + ": " +
              std::to_string(failed) + " (" + parts + ")";
  }
  return detail;
}

// "lru: 40; adaptive: 12" for the policies whose tier refused spills
// because the disk was behind; empty when none did.
std::string busy_detail(const engine_report& report) {
  std::string detail;
  for (const policy_result& r : report.results) {
    if (r.spills_refused_busy == 0)
      continue;
    detail += (detail.empty() ? "" : "; ") +
              std::string(engine::to_string(r.policy)) + ": " +
              std::to_string(r.spills_refused_busy);
  }
  return detail;
}

// A line saying which policies hit more tokens than belady, whose figure
// is then no bound; empty when belady did not run or none did.
std::string belady_beaten(const engine_report& report) {
  const auto b = std::find_if(report.results.begin(), report.results.end(),
                              [](const policy_result& r) {
                                return r.policy == engine::policy_kind::belady;
                              });
  if (b == report.results.end())
    return {};
  std::string above;
  for (const policy_result& r : report.results) {
    if (r.token_hit_ratio <= b->token_hit_ratio)
      continue;
    char ratio[32];
    std::snprintf(ratio, sizeof ratio, "%.2f%%", 100.0 * r.token_hit_ratio);
    above += (above.empty() ? "" : ", ") +
             std::string(engine::to_string(r.policy)) + " " + ratio;
  }
  if (above.empty())
    return {};
  char own[32];
  std::snprintf(own, sizeof own, "%.2f%%", 100.0 * b->token_hit_ratio);
  return "kvfleet-bench: note: belady's token hit ratio (" + std::string(own) +
         ") is below " + above +
         ": belady evicts the block used farthest ahead only within the "
         "size partition the store picks (and compression demotes by "
         "recency), so it is no exact bound on this run "
         "(tools/bench/README.md)\n";
}

} // namespace

int run_engine_command(const engine_options& opts, std::ostream& out,
                       std::ostream& err, bool err_is_terminal) {
  engine_report kept;
  const int status = run_mode(
      opts, out, err, err_is_terminal,
      [&](const auto& reqs, const std::string& label, const progress_fn& p) {
        auto report = run_engine(opts, reqs, label, p);
        if (report)
          kept = *report;
        return report;
      });
  if (status != exit_ok)
    return status;
  err << belady_beaten(kept);
  // The report is printed (its spill counts say what happened), but a run
  // whose disk tier refused or failed spills did not measure what it was
  // asked to: a full file system gave 190 spills instead of 8051 and an
  // exit status of 0.
  if (const std::string busy = busy_detail(kept); !busy.empty())
    err << "kvfleet-bench: warning: the disk tier refused spills while "
           "max_queued_bytes of writes waited for the disk ("
        << busy << "); the disk figures include that\n";
  std::uint64_t total = 0;
  const std::string detail = spill_failure_detail(kept, total);
  if (total == 0)
    return exit_ok;
  err << "kvfleet-bench: the disk tier refused or failed " << total << " spill"
      << (total == 1 ? "" : "s") << " (" << detail
      << "); the disk figures are not valid\n";
  return exit_runtime_error;
}

int run_app(std::span<const std::string_view> args, std::ostream& out,
            std::ostream& err, bool err_is_terminal) {
  auto cmd = parse_command_line(args);
  if (!cmd)
    return fail(err, cmd.error());
  switch (cmd->kind) {
  case command_kind::help:
    return print(out, err, main_help(), "the help");
  case command_kind::engine_help:
    return print(out, err, engine_help(), "the help");
  case command_kind::engine:
    return run_engine_command(cmd->engine, out, err, err_is_terminal);
  case command_kind::routing_help:
    return print(out, err, routing_help(), "the help");
  case command_kind::routing:
    return run_mode(
        cmd->routing.base, out, err, err_is_terminal,
        [&](const auto& reqs, const std::string& label, const progress_fn& p) {
          return run_routing(cmd->routing, reqs, label, p);
        });
  case command_kind::prefetch_help:
    return print(out, err, prefetch_help(), "the help");
  case command_kind::prefetch:
    return run_mode(
        cmd->prefetch.base, out, err, err_is_terminal,
        [&](const auto& reqs, const std::string& label, const progress_fn& p) {
          return run_prefetch(cmd->prefetch, reqs, label, p);
        });
  }
  return exit_usage_error;
}

} // namespace kvfleet::bench
