#pragma once
/// Command line of kvfleet-bench: parsing and help texts.
///
/// Parsing never prints and never exits: it returns the command or an error
/// whose code is in the "bad input" range (errc 1xx), which the program
/// reports as a usage error (exit status 2). Options take their value as the
/// next argument or after '=' (`--seed 7`, `--seed=7`); a next argument
/// that starts with "--" is never a value (`--trace --json` is a missing
/// value), so such a value is written after '=' (`--trace=--json`).
/// "-h" and "--help" ask for help only where an option may stand.
/// Thread safety: free functions on values.

#include "actors/router.hpp"
#include "engine/eviction_policy.hpp"
#include "engine/kv_namespace.hpp"
#include "engine/result.hpp"
#include "engine/trace_reader.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kvfleet::engine {
struct disk_tier_config;
} // namespace kvfleet::engine

namespace kvfleet::bench {

/// KV layout of the simulated namespace; decides the size of one block.
struct kv_layout {
  std::uint32_t layers = 1;
  std::uint32_t kv_heads = 1;
  std::uint32_t head_dim = 8;
};

/// Everything `kvfleet-bench engine` was asked to do. Exactly one of
/// `workload` and `trace_path` is set, and exactly one of
/// `capacity_fraction` and `capacity_blocks`.
struct engine_options {
  std::string workload;   ///< generated workload name (--workload)
  std::string trace_path; ///< Mooncake JSONL trace (--trace)
  std::optional<double> capacity_fraction;    ///< of the working set
  std::optional<std::size_t> capacity_blocks; ///< absolute
  std::vector<engine::policy_kind> policies{
      engine::policy_kind::lru, engine::policy_kind::lfu,
      engine::policy_kind::adaptive, engine::policy_kind::belady};
  bool json = false;
  std::uint32_t block_tokens = 512;
  std::size_t requests = 0; ///< 0: the workload's default / the whole trace
  std::uint64_t seed = 42;
  engine::bad_line_action on_bad_line = engine::bad_line_action::reject;
  bool compression = false;
  kv_layout layout{};
  double high_watermark = 0.9;
  double low_watermark = 0.8;
  double prefill_us_per_token = 20.0;
  bool progress = true; ///< still only drawn when stderr is a terminal
  /// A disk tier below memory in a fresh subdirectory of this (--disk-dir);
  /// empty: no disk tier.
  std::string disk_dir;
  /// Disk tier capacity in uncompressed blocks (--disk-capacity-blocks);
  /// 0: four times the memory capacity.
  std::size_t disk_capacity_blocks = 0;
  /// Test hook: edits the disk tier's configuration before it opens (its
  /// fault hooks make the file system look full or failing). Never set by
  /// the command line.
  std::function<void(engine::disk_tier_config&)> disk_config_for_testing;
};

/// Everything `kvfleet-bench routing` was asked to do. `base` carries the
/// input, capacity (PER ENGINE: --capacity-blocks per engine, or
/// --capacity-fraction of the working set divided by `engines`), layout,
/// watermarks, prefill cost and output options; its `policies` and disk
/// options are unused.
struct routing_options {
  engine_options base{};
  std::uint32_t engines = 4;
  std::vector<actors::routing_policy> policies{
      actors::routing_policy::round_robin, actors::routing_policy::least_loaded,
      actors::routing_policy::kv_aware};
  engine::policy_kind eviction = engine::policy_kind::adaptive;
  double rate_scale = 1.0;            ///< arrival times are divided by this
  double service_overhead_us = 200.0; ///< added to every request's service
  actors::router_config router{};     ///< credit and backlog knobs
};

/// Longest prefetch_options::session_timeout_s (about 31.7 years): its
/// milliseconds are added to request timestamps, which must not wrap.
inline constexpr double max_session_timeout_s = 1e9;
/// The capacity when neither --capacity-fraction nor --capacity-blocks is
/// given: a quarter of the working set, where every bar is measured.
inline constexpr double default_capacity_fraction = 0.25;

/// Everything `kvfleet-bench prefetch` was asked to do: `base` as for the
/// engine mode (one store of that capacity); the workload must be chat.
struct prefetch_options {
  engine_options base{};
  engine::policy_kind eviction = engine::policy_kind::adaptive;
  double threshold = 0.5; ///< prediction confidence to prefetch
  /// When to prefetch after a request: this fraction of the mean gap seen
  /// between a session's round and its next, in [0, 1].
  double prefetch_at = 0.5;
  std::uint32_t max_round = 16; ///< rounds above this share one query
  /// Idle time that ends a session, 0 to max_session_timeout_s.
  double session_timeout_s = 600.0;
};

/// What the command line asks for.
enum class command_kind : std::uint8_t {
  help,          ///< `--help`, `-h`
  engine_help,   ///< `engine --help`
  engine,        ///< run the engine simulation
  routing_help,  ///< `routing --help`
  routing,       ///< run the routing simulation
  prefetch_help, ///< `prefetch --help`
  prefetch,      ///< run the prefetch replay
};

struct command {
  command_kind kind = command_kind::help;
  engine_options engine{};
  routing_options routing{};
  prefetch_options prefetch{};
};

/// Parses the arguments after the program name.
[[nodiscard]] result<command>
parse_command_line(std::span<const std::string_view> args);

/// Text of `kvfleet-bench --help`.
[[nodiscard]] std::string_view main_help() noexcept;
/// Text of `kvfleet-bench engine --help`.
[[nodiscard]] std::string_view engine_help() noexcept;
/// Text of `kvfleet-bench routing --help`.
[[nodiscard]] std::string_view routing_help() noexcept;
/// Text of `kvfleet-bench prefetch --help`.
[[nodiscard]] std::string_view prefetch_help() noexcept;

/// The namespace every simulated block belongs to.
[[nodiscard]] engine::namespace_spec
bench_namespace(const engine_options& opts);

/// `x` as the shortest text that reads back as `x` ("1e-09", "0.25"), for
/// messages that quote an option's value: std::to_string's six fixed
/// decimals print a small fraction as "0.000000".
[[nodiscard]] std::string number_text(double x);

/// `text` with its control characters, C0 and C1, written as escapes (\n,
/// \r, \t, \xHH for each byte), a backslash as \\, and each byte that is
/// not part of valid UTF-8 as \xHH, so that a message quoting any value
/// stays one printable line.
[[nodiscard]] std::string printable(std::string_view text);

/// True when `e` is a usage error (errc 1xx: bad input), which exits with
/// status 2; every other error is a runtime error (status 1).
[[nodiscard]] bool is_usage_error(const error& e) noexcept;

} // namespace kvfleet::bench
