#pragma once
/// The kvfleet-bench program behind main(): parses, runs, prints, and
/// returns the exit status, with its streams injected so tests can drive it.
///
/// Results go to `out` only; help goes to `out`; errors, trace problems and
/// the progress bar go to `err`. Exit status: 0 success, 1 runtime error
/// (a trace's content, or a bad line under --on-bad-line reject, I/O, the
/// store failing, this machine lacking the memory; and, after the report,
/// a disk tier that failed spills (failed_spills)), 2 usage error (bad option
/// or value, unknown workload or policy, capacity 0 or past 64-bit
/// addresses), 128 + the signal when a run stopped for request_interrupt()
/// (interrupt.hpp; 130 for SIGINT).
/// Not thread-safe with respect to the streams.

#include "tools/bench/cli.hpp"

#include <iosfwd>
#include <span>
#include <string_view>

namespace kvfleet::bench {

inline constexpr int exit_ok = 0;
inline constexpr int exit_runtime_error = 1;
inline constexpr int exit_usage_error = 2;

/// Runs `kvfleet-bench engine` with `opts` (parsed, or a test's with its
/// hooks): prints the report, then a warning line on `err` when the disk
/// tier refused spills because it was behind, and when any spill failed
/// (failed_spills) one line saying so and returns exit_runtime_error.
[[nodiscard]] int run_engine_command(const engine_options& opts,
                                     std::ostream& out, std::ostream& err,
                                     bool err_is_terminal);

/// Runs kvfleet-bench with `args` (the arguments after the program name).
/// `err_is_terminal` allows the progress bar on `err`.
[[nodiscard]] int run_app(std::span<const std::string_view> args,
                          std::ostream& out, std::ostream& err,
                          bool err_is_terminal);

} // namespace kvfleet::bench
