#include "tools/bench/app.hpp"

#include "tools/bench/cli.hpp"
#include "tools/bench/engine_mode.hpp"
#include "tools/bench/progress_bar.hpp"
#include "tools/bench/report.hpp"

#include <ostream>

namespace kvfleet::bench {

namespace {

int fail(std::ostream& err, const error& e) {
  err << "kvfleet-bench: " << e.message << '\n';
  return is_usage_error(e) ? exit_usage_error : exit_runtime_error;
}

int run_engine_mode(const engine_options& opts, std::ostream& out,
                    std::ostream& err, bool err_is_terminal) {
  auto reqs = load_requests(opts, err);
  if (!reqs)
    return fail(err, reqs.error());
  const std::string label =
      opts.workload.empty() ? opts.trace_path : opts.workload;
  progress_bar bar(err, opts.progress && err_is_terminal);
  auto report = run_engine(
      opts, *reqs, label,
      [&bar](std::size_t done, std::size_t total, const std::string& what) {
        bar.update(done, total, what);
      });
  bar.finish();
  if (!report)
    return fail(err, report.error());
  out << (opts.json ? to_json(*report) : to_table(*report)) << std::flush;
  if (!out) {
    err << "kvfleet-bench: cannot write the results\n";
    return exit_runtime_error;
  }
  return exit_ok;
}

} // namespace

int run_app(std::span<const std::string_view> args, std::ostream& out,
            std::ostream& err, bool err_is_terminal) {
  auto cmd = parse_command_line(args);
  if (!cmd)
    return fail(err, cmd.error());
  switch (cmd->kind) {
  case command_kind::help:
    out << main_help();
    return exit_ok;
  case command_kind::engine_help:
    out << engine_help();
    return exit_ok;
  case command_kind::engine:
    return run_engine_mode(cmd->engine, out, err, err_is_terminal);
  }
  return exit_usage_error;
}

} // namespace kvfleet::bench
