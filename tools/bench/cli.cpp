#include "tools/bench/cli.hpp"

#include "engine/workload.hpp"
#include "tools/bench/engine_mode.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <functional>
#include <limits>
#include <system_error>

namespace kvfleet::bench {

namespace {

/// Upper bound of the per-token and per-request costs, in microseconds:
/// far above any real model, and low enough that simulated times and
/// prefill_saved_s stay inside int64 nanoseconds.
constexpr double max_cost_us = 1e6;

constexpr std::string_view main_help_text =
    R"(kvfleet-bench: workload driver and eviction-policy simulator for kvfleet.

Usage:
  kvfleet-bench engine [options]   replay a workload or trace through an
                                   in-process block store, once per policy
  kvfleet-bench routing [options]  simulate N engines behind the router,
                                   once per routing policy
  kvfleet-bench prefetch [options] predictive prefetch on chat: useful and
                                   wasted prefetches
  kvfleet-bench --help             this text
  kvfleet-bench MODE --help        that mode's options (also: help MODE)

An option's value is the next argument or follows '=' (--seed 7,
--seed=7). A next argument that starts with "--" is never a value: write a
value that starts with "--" after '=' (--trace=--odd-name). -h and --help
ask for help where an option may stand (not as a value), whatever else the
line holds.

Exit status: 0 success; 1 runtime error (a trace's content or lines, I/O,
this machine lacking the memory, a disk tier that failed spills (a busy
disk's refusals are only a warning): said after the report); 2 usage
error (bad option or value, or a capacity past 64-bit addresses, which no
machine could hold); 130/143 interrupted by
SIGINT/SIGTERM (the run cleans up and stops). Every error is one line on
stderr starting with "kvfleet-bench:".
)";

constexpr std::string_view engine_help_text =
    R"(Usage: kvfleet-bench engine (--workload NAME | --trace FILE)
                            [--capacity-fraction F | --capacity-blocks N]
                            [options]

Replays the same request sequence through a fresh in-process block store for
each eviction policy (no network, no daemon) and reports hit ratios, the
store's per-request process() latency and the prefill time saved.

Input (exactly one):
  --workload NAME           generated workload: chat, shared-prefix, doc-qa,
                            no-reuse
  --trace FILE              Mooncake JSONL trace (timestamp, input_length,
                            output_length, hash_ids per line)

Capacity (at most one; neither: --capacity-fraction 0.25):
  --capacity-fraction F     F times the working set (distinct full blocks),
                            rounded to whole blocks; F > 0
  --capacity-blocks N       N uncompressed blocks; N >= 1
  Eviction starts above the high watermark and stops at the low one, so
  between low x N and high x N blocks stay resident.

Options:
  --policies LIST           comma-separated eviction policies to compare:
                            lru, lfu, adaptive, belady (offline:
                            evicts the block used farthest in the future,
                            within the partition the store picks; the bound
                            to compare with, not always exact)
                            [lru,lfu,adaptive,belady]
  --json                    print one JSON object instead of a table
  --block-tokens N          tokens per block: the namespace's block size and
                            the block size the trace was made with; N x L x
                            H x D x 2 (see --layout) must be a multiple of
                            64, the codecs' group size (N a multiple of 4
                            with the default layout), and a block at most
                            1 GiB (N at most 33554432 with it) [512]
  --requests N              workload size, 1 to 5000000 (default: the
                            workload's own); with --trace, replay only the N
                            earliest requests (a trace is replayed in
                            timestamp order)
  --seed S                  workload generator seed; ignored for traces [42]
  --on-bad-line skip|reject what to do with a malformed trace line: skip it or
                            stop with exit status 1; the first 20 problems go
                            to stderr with their line numbers, then a count
                            of all; ignored for workloads [reject]
  --compression on|off      the store's adaptive compression (cold blocks
                            demoted to int8/int4 before eviction); off keeps
                            every policy on equal terms [off]
  --layout L,H,D            KV layout of the simulated namespace: layers,
                            kv heads, head dim (fp16); 1,1,8 makes a 512-token
                            block 16 KiB, which keeps simulations fast [1,1,8]
  --high-watermark X        store fill fraction that starts eviction [0.9]
  --low-watermark X         store fill fraction eviction stops at [0.8]
  --prefill-us-per-token X  prefill cost per prompt token in microseconds,
                            used for prefill_saved_s; 20 is about one H100
                            prefilling a batched 8B model; 0 to 1000000 [20]
  --disk-dir DIR            put a disk tier below memory, in a fresh
                            subdirectory of DIR (removed afterwards): evicted
                            blocks spill to it and hits on it are promoted
                            back; the report then shows hits by tier
  --disk-capacity-blocks N  disk tier capacity in uncompressed blocks; needs
                            --disk-dir [4 x the memory capacity]; not
                            checked against the file system's free space:
                            when it fills up, spills are refused, the report
                            counts them and the exit status is 1
  --no-progress             never draw the progress bar (it is drawn on
                            stderr, only when stderr is a terminal, for runs
                            longer than a second)
  -h, --help                this text

Output (table, or with --json one object):
  {"workload", "requests", "block_tokens", "working_set_blocks",
   "capacity_blocks", "results": [{"policy", "token_hit_ratio",
   "block_hit_ratio", "p50_us", "p95_us", "p99_us", "prefill_saved_s"}]}
  and with --disk-dir per result "memory_token_hit_ratio",
  "disk_token_hit_ratio", "spills", "spill_failures", "spills_refused_full",
  "spills_refused_capacity", "spills_refused_busy", "spill_errors",
  "disk_full"
  token_hit_ratio  prompt tokens served from cache / all prompt tokens
  block_hit_ratio  matched full blocks / all full blocks
  pNN_us           per-request latency of the store's process() call
  prefill_saved_s  prefill cost of the matched tokens, summed, in seconds
  spill_failures   spills the disk tier refused (file system full, capacity
                   pinned, disk behind) or failed to write: when any is
                   not "disk behind" (load shedding, only a warning), a
                   line on stderr says the disk figures are not valid and
                   the exit status is 1
)";

constexpr std::string_view routing_help_text =
    R"(Usage: kvfleet-bench routing (--workload NAME | --trace FILE)
                             [--capacity-fraction F | --capacity-blocks N]
                             [options]

A deterministic discrete-event simulation (no threads, no wall clock) of N
engines behind the shipped router (actors::router), once per routing policy.
Each engine is an in-process block store with a FIFO queue serving one
request at a time. Requests arrive at their timestamps / --rate-scale; the
router picks an engine from its live load (queued + in service) and, for
kv_aware, its prefix index. A request's service time is its computed
(missed) prompt tokens x --prefill-us-per-token + --service-overhead-us. The
router gets the engines' block events (the store's on_block_event) as the
balancer relays them: stored when a request completes; evicted right after
the process() that removed them.

Input and capacity (as in engine mode, capacity PER ENGINE; neither
capacity: --capacity-fraction 0.25):
  --workload NAME | --trace FILE
  --capacity-fraction F     each engine holds round(F x working set /
                            engines) blocks (so F is the fleet's share)
  --capacity-blocks N       each engine holds N blocks

Options:
  --engines N               engines behind the router, 1..64 [4]
  --policies LIST           routing policies: round_robin, least_loaded,
                            kv_aware [round_robin,least_loaded,kv_aware]
  --eviction POLICY         every engine's eviction policy: lru, lfu or
                            adaptive [adaptive]
  --rate-scale X            arrival rate multiplier: timestamps are divided
                            by X; X > 0 [1]
  --prefill-us-per-token X  service cost per computed prompt token,
                            0 to 1000000 [20]
  --service-overhead-us X   constant added to every request's service,
                            0 to 1000000 [200]
  --credit-per-block X      kv_aware: load units credited per held prefix
                            block [0.25]
  --max-credit X            kv_aware: cap on the credit [4]
  --backlog-margin N        kv_aware: backlog above the least loaded engine
                            past which credit is scaled [4]
  --overload-credit-factor X  kv_aware: that scale, 0 to 1 [0]
  --json, --block-tokens, --requests, --seed, --on-bad-line, --compression,
  --layout, --high-watermark, --low-watermark, --no-progress: as in engine
  mode
  -h, --help                this text

Output (table, or with --json one object):
  {"workload", "requests", "block_tokens", "working_set_blocks", "engines",
   "capacity_blocks" (per engine), "rate_scale", "results": [{"policy",
   "token_hit_ratio", "block_hit_ratio", "p50_us", "p95_us", "p99_us",
   "prefill_saved_s", "p95_queue", "mean_queue", "max_queue",
   "max_engine_share", "engine_requests", "stale_routes"}]}
  pNN_us            latency from arrival to completion (queueing + service)
  p95_queue         p95 over all arrivals of the queue length (queued + in
                    service, before the request joins) of the engine the
                    request was routed to; mean_queue, max_queue likewise
  max_engine_share  largest fraction of all requests one engine got
  stale_routes      requests the index promised more leading blocks than
                    the engine still had
)";

constexpr std::string_view prefetch_help_text =
    R"(Usage: kvfleet-bench prefetch --workload chat
                              [--capacity-fraction F | --capacity-blocks N]
                              [options]

Replays chat through one in-process block store with the shipped transition
model (actors::transition_model) and measures predictive prefetch. A
request of round k of its session is the query "round:k" (k capped at
--max-round); a session idle past --session-timeout-s goes to "end". After
each request, when the model predicts another round with confidence >=
--threshold, the prefix that round starts with (this request's full blocks)
is prefetched at low priority, --prefetch-at of the mean gap seen so far
between that round and the next after the request (the session's next
request coming first cancels it: overtaken). One that finds every block in
memory fetched nothing (redundant). One that fetched blocks is useful when
the session's next request matches its last block, wasted when that request
does not or one of its blocks is evicted first, unused when the session or
the replay ends first. The replay runs again without prefetch for the
baseline hit ratio.

Options:
  --eviction POLICY         the store's eviction policy: lru, lfu, priority
                            or adaptive [adaptive]
  --threshold X             confidence needed to prefetch, in [0, 1] [0.5]
  --prefetch-at F           when to prefetch after a request: this fraction
                            of the mean gap to the next round, in [0, 1]
                            [0.5]
  --max-round N             rounds above N share one query [16]
  --session-timeout-s X     idle seconds after which a session ends, at
                            most 1e9 [600]
  --json, --block-tokens, --requests, --seed, --compression, --layout,
  --high-watermark, --low-watermark, --no-progress: as in engine mode
  -h, --help                this text

Output (table, or with --json one object):
  {"workload", "requests", "block_tokens", "working_set_blocks",
   "capacity_blocks", "eviction", "threshold", "prefetch_at", "predictions",
   "untimed", "overtaken", "unfired", "redundant", "prefetches", "useful",
   "wasted",
   "unused", "used_fraction", "token_hit_ratio", "baseline_token_hit_ratio"}
  prefetches        fired and fetched blocks (not redundant)
  used_fraction     useful / prefetches
)";

unexpected<error> usage(std::string message) {
  return make_error(errc::invalid_argument, std::move(message));
}

// `text` as an integer of at most `max`, the option's own limit (not the
// type's: --requests 99999999999999999999 said "at most 2^64 - 1" when
// 5000000 was the limit); `why` (may be empty) explains the limit.
template <class T>
result<T> parse_unsigned(std::string_view option, std::string_view text,
                         T max = std::numeric_limits<T>::max(),
                         std::string_view why = {}) {
  T value{};
  const char* first = text.data();
  const char* last = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(first, last, value);
  const bool too_large = ec == std::errc::result_out_of_range ||
                         (ec == std::errc{} && value > max);
  if (too_large && ptr == last)
    return usage("option " + std::string(option) + " is too large: '" +
                 std::string(text) + "' (at most " + std::to_string(max) +
                 (why.empty() ? "" : " ") + std::string(why) + ")");
  if (text.empty() || ec != std::errc{} || ptr != last)
    return usage("option " + std::string(option) +
                 " needs a non-negative integer, got '" + std::string(text) +
                 "'");
  return value;
}

result<double> parse_real(std::string_view option, std::string_view text) {
  double value = 0.0;
  const char* first = text.data();
  const char* last = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(first, last, value);
  if (text.empty() || ec != std::errc{} || ptr != last || !std::isfinite(value))
    return usage("option " + std::string(option) + " needs a number, got '" +
                 std::string(text) + "'");
  // -0 passes every "not negative" check and was echoed as "-0.0"
  // (prefill_saved_s, --threshold): it means 0.
  if (value == 0.0)
    value = 0.0;
  return value;
}

result<bool> parse_on_off(std::string_view option, std::string_view text) {
  if (text == "on")
    return true;
  if (text == "off")
    return false;
  return usage("option " + std::string(option) + " takes on or off, got '" +
               std::string(text) + "'");
}

std::vector<std::string_view> split(std::string_view text, char sep) {
  std::vector<std::string_view> parts;
  std::size_t start = 0;
  while (true) {
    const std::size_t end = text.find(sep, start);
    parts.push_back(text.substr(start, end - start));
    if (end == std::string_view::npos)
      break;
    start = end + 1;
  }
  return parts;
}

/// Refuses `priority` where every request replayed is of one priority:
/// its figures would be lru's under another name.
result<void> refuse_flat_priority(engine::policy_kind kind,
                                  std::string_view option) {
  if (kind != engine::policy_kind::priority)
    return {};
  return usage("option " + std::string(option) +
               ": policy 'priority' evicts the lowest request priority "
               "first, and every request of a workload or trace replayed "
               "in this mode is of normal priority, so it would repeat "
               "lru's figures under another name (prefetch mode takes it: "
               "its prefetches are of low priority)");
}

result<std::vector<engine::policy_kind>> parse_policies(std::string_view text) {
  std::vector<engine::policy_kind> out;
  for (std::string_view name : split(text, ',')) {
    if (name.empty())
      return usage("option --policies needs a comma-separated list of "
                   "policies, got '" +
                   std::string(text) + "'");
    auto kind = engine::parse_policy(name);
    if (!kind)
      return usage(kind.error().message);
    if (auto ok = refuse_flat_priority(*kind, "--policies"); !ok)
      return unexpected<error>(ok.error());
    if (std::find(out.begin(), out.end(), *kind) != out.end())
      return usage("policy '" + std::string(name) +
                   "' is listed twice in --policies");
    out.push_back(*kind);
  }
  return out;
}

result<kv_layout> parse_layout(std::string_view text) {
  const auto parts = split(text, ',');
  const auto bad = [&] {
    return usage("option --layout needs three positive integers "
                 "layers,kv_heads,head_dim, got '" +
                 std::string(text) + "'");
  };
  if (parts.size() != 3)
    return bad();
  std::uint32_t v[3] = {0, 0, 0};
  for (std::size_t i = 0; i < 3; ++i) {
    auto n = parse_unsigned<std::uint32_t>("--layout", parts[i]);
    if (!n || *n == 0)
      return bad();
    v[i] = *n;
  }
  return kv_layout{v[0], v[1], v[2]};
}

std::string workload_list() {
  std::string out;
  for (std::string_view n : engine::workload_names()) {
    if (!out.empty())
      out += ", ";
    out += n;
  }
  return out;
}

// Most tokens a block of `layout` may hold: namespace_spec::validate()
// refuses a block over 1 GiB (fp16, keys and values: 4 bytes per token per
// layer, head and dimension). 0 when not even one token fits.
std::uint32_t max_block_tokens(const kv_layout& layout) {
  constexpr std::uint64_t max_bytes = std::uint64_t{1} << 30;
  std::uint64_t per_token = 4;
  for (const std::uint64_t d :
       {layout.layers, layout.kv_heads, layout.head_dim}) {
    if (d == 0)
      return std::numeric_limits<std::uint32_t>::max(); // validate() says why
    if (per_token > max_bytes / d)
      return 0;
    per_token *= d;
  }
  return static_cast<std::uint32_t>(max_bytes / per_token);
}

bool is_valid_workload(std::string_view name) {
  const auto names = engine::workload_names();
  return std::find(names.begin(), names.end(), name) != names.end();
}

// Applies one valued option; the caller has already split off its value.
result<void> apply_option(engine_options& o, std::string_view name,
                          std::string_view value) {
  if (name == "--workload") {
    if (!is_valid_workload(value))
      return usage("unknown workload '" + std::string(value) +
                   "'; valid workloads: " + workload_list());
    o.workload = std::string(value);
  } else if (name == "--trace") {
    if (value.empty())
      return usage("option --trace needs a file name");
    o.trace_path = std::string(value);
  } else if (name == "--capacity-fraction") {
    auto f = parse_real(name, value);
    if (!f)
      return unexpected<error>(f.error());
    if (!(*f > 0.0))
      return usage("capacity 0: --capacity-fraction must be above 0, got '" +
                   std::string(value) + "'");
    o.capacity_fraction = *f;
  } else if (name == "--capacity-blocks") {
    // Applied after --layout and --block-tokens, which size a block. A
    // layout that does not validate has no block size (its byte count may
    // wrap to 0): the limit waits for check_complete, which refuses it.
    const engine::namespace_spec spec = bench_namespace(o);
    const bool sized = spec.validate().has_value();
    const std::size_t slot = sized ? block_slot_bytes(spec) : 1;
    auto n = parse_unsigned<std::size_t>(
        name, value, std::numeric_limits<std::size_t>::max() / slot,
        "blocks of " + std::to_string(slot) +
            " bytes: more is past 64-bit addresses, which no machine has");
    if (!n)
      return unexpected<error>(n.error());
    if (*n == 0)
      return usage("capacity 0: --capacity-blocks must be at least 1");
    o.capacity_blocks = *n;
  } else if (name == "--policies") {
    auto p = parse_policies(value);
    if (!p)
      return unexpected<error>(p.error());
    o.policies = std::move(*p);
  } else if (name == "--block-tokens") {
    // Applied after --layout, which decides the limit.
    const std::uint32_t most = max_block_tokens(o.layout);
    const std::string layout_text = std::to_string(o.layout.layers) + "," +
                                    std::to_string(o.layout.kv_heads) + "," +
                                    std::to_string(o.layout.head_dim);
    if (most == 0)
      return usage("option --layout " + layout_text +
                   " makes even a block of one token larger than the 1 GiB "
                   "limit");
    auto n = parse_unsigned<std::uint32_t>(name, value, most,
                                           "with --layout " + layout_text +
                                               ": a block holds at most 1 GiB");
    if (!n)
      return unexpected<error>(n.error());
    if (*n == 0)
      return usage("option --block-tokens must be at least 1");
    o.block_tokens = *n;
  } else if (name == "--requests") {
    auto n =
        parse_unsigned<std::size_t>(name, value, engine::max_workload_requests);
    if (!n)
      return unexpected<error>(n.error());
    if (*n == 0) // the upper bound is parse_unsigned's
      return usage("option --requests must be in [1, " +
                   std::to_string(engine::max_workload_requests) + "], got " +
                   std::string(value));
    o.requests = *n;
  } else if (name == "--seed") {
    auto n = parse_unsigned<std::uint64_t>(name, value);
    if (!n)
      return unexpected<error>(n.error());
    o.seed = *n;
  } else if (name == "--on-bad-line") {
    if (value == "skip")
      o.on_bad_line = engine::bad_line_action::skip;
    else if (value == "reject")
      o.on_bad_line = engine::bad_line_action::reject;
    else
      return usage("option --on-bad-line takes skip or reject, got '" +
                   std::string(value) + "'");
  } else if (name == "--compression") {
    auto b = parse_on_off(name, value);
    if (!b)
      return unexpected<error>(b.error());
    o.compression = *b;
  } else if (name == "--layout") {
    auto l = parse_layout(value);
    if (!l)
      return unexpected<error>(l.error());
    o.layout = *l;
  } else if (name == "--high-watermark" || name == "--low-watermark") {
    auto x = parse_real(name, value);
    if (!x)
      return unexpected<error>(x.error());
    (name == "--high-watermark" ? o.high_watermark : o.low_watermark) = *x;
  } else if (name == "--prefill-us-per-token") {
    auto x = parse_real(name, value);
    if (!x)
      return unexpected<error>(x.error());
    if (*x < 0.0)
      return usage("option --prefill-us-per-token must not be negative");
    if (*x > max_cost_us)
      return usage("option --prefill-us-per-token must be at most 1000000 "
                   "(one second per token)");
    o.prefill_us_per_token = *x;
  } else if (name == "--disk-dir") {
    if (value.empty())
      return usage("option --disk-dir needs a directory");
    o.disk_dir = std::string(value);
  } else if (name == "--disk-capacity-blocks") {
    // Applied after --layout and --block-tokens, which size a block (not
    // sized while the layout does not validate, as for --capacity-blocks).
    const engine::namespace_spec spec = bench_namespace(o);
    auto n = parse_unsigned<std::size_t>(
        name, value,
        spec.validate() ? max_disk_capacity_blocks(spec)
                        : std::numeric_limits<std::size_t>::max(),
        "blocks: their segment files' bytes must fit in 64 bits");
    if (!n)
      return unexpected<error>(n.error());
    if (*n == 0)
      return usage("option --disk-capacity-blocks must be at least 1");
    o.disk_capacity_blocks = *n;
  } else {
    return usage("unknown option '" + std::string(name) +
                 "' (see kvfleet-bench engine --help)");
  }
  return {};
}

constexpr std::string_view flag_options[] = {"--json", "--no-progress"};
constexpr std::string_view valued_options[] = {"--workload",
                                               "--trace",
                                               "--capacity-fraction",
                                               "--capacity-blocks",
                                               "--policies",
                                               "--block-tokens",
                                               "--requests",
                                               "--seed",
                                               "--on-bad-line",
                                               "--compression",
                                               "--layout",
                                               "--high-watermark",
                                               "--low-watermark",
                                               "--prefill-us-per-token",
                                               "--disk-dir",
                                               "--disk-capacity-blocks"};

bool contains(std::span<const std::string_view> set, std::string_view s) {
  return std::find(set.begin(), set.end(), s) != set.end();
}

// `no_input` is the message when neither --workload nor --trace is given
// (empty: the one for modes that take both).
result<void> check_complete(const engine_options& o,
                            std::string_view no_input) {
  const bool has_workload = !o.workload.empty();
  const bool has_trace = !o.trace_path.empty();
  if (has_workload == has_trace) {
    if (has_workload)
      return usage("give either --workload or --trace, not both");
    if (!no_input.empty())
      return usage(std::string(no_input));
    return usage("give a workload (--workload NAME, one of " + workload_list() +
                 ") or a trace (--trace FILE)");
  }
  if (o.capacity_fraction.has_value() && o.capacity_blocks.has_value())
    return usage("give either --capacity-fraction or --capacity-blocks, "
                 "not both");
  if (!(o.low_watermark > 0.0 && o.low_watermark <= o.high_watermark &&
        o.high_watermark <= 1.0))
    return usage("watermarks must satisfy 0 < low <= high <= 1 (got low " +
                 number_text(o.low_watermark) + ", high " +
                 number_text(o.high_watermark) + ")");
  if (o.disk_capacity_blocks != 0 && o.disk_dir.empty())
    return usage("option --disk-capacity-blocks needs --disk-dir (without "
                 "it there is no disk tier to size)");
  if (auto ok = bench_namespace(o).validate(); !ok)
    return usage("bad --layout/--block-tokens: " + ok.error().message);
  return {};
}

// Mode-specific valued options: handled by `apply` before the common ones.
using extra_apply =
    std::function<result<void>(std::string_view name, std::string_view value)>;

// Parses the options of `mode` into `o` (the common ones) and `apply` (the
// mode's own, listed in `extra`); common options in `excluded` are not
// accepted by this mode. `no_input` as for check_complete.
result<void> parse_options(std::span<const std::string_view> args,
                           std::string_view mode, engine_options& o,
                           std::span<const std::string_view> extra,
                           std::span<const std::string_view> excluded,
                           const extra_apply& apply,
                           std::string_view no_input = {}) {
  const std::string see =
      " (see kvfleet-bench " + std::string(mode) + " --help)";
  std::vector<std::string_view> seen;
  // Valued options with their values, applied after the loop.
  std::vector<std::pair<std::string_view, std::string_view>> given;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string_view arg = args[i];
    if (!arg.starts_with("--"))
      return usage("unexpected argument '" + std::string(arg) + "'" + see);
    const std::size_t eq = arg.find('=');
    const std::string_view name = arg.substr(0, eq);
    const bool is_extra = contains(extra, name);
    const bool is_flag = !is_extra && contains(flag_options, name);
    if (!is_extra && !is_flag &&
        (!contains(valued_options, name) || contains(excluded, name)))
      return usage("unknown option '" + std::string(name) + "'" + see);
    if (contains(seen, name))
      return usage("option " + std::string(name) + " is given twice");
    seen.push_back(name);
    if (is_flag) {
      if (eq != std::string_view::npos)
        return usage("option " + std::string(name) + " takes no value");
      if (name == "--json")
        o.json = true;
      else
        o.progress = false;
      continue;
    }
    std::string_view value;
    if (eq != std::string_view::npos) {
      value = arg.substr(eq + 1);
    } else {
      // An option is never a value: `--trace --json` took "--json" as the
      // file name.
      if (i + 1 >= args.size() || args[i + 1].starts_with("--"))
        return usage("option " + std::string(name) +
                     " needs a value (a value that starts with '--' is "
                     "written " +
                     std::string(name) + "=VALUE)");
      value = args[++i];
    }
    given.emplace_back(name, value);
  }
  // --layout first, then --block-tokens: the limits of --block-tokens and
  // of the capacities depend on the size of a block.
  const auto rank = [](std::string_view name) {
    return name == "--layout" ? 0 : name == "--block-tokens" ? 1 : 2;
  };
  std::stable_sort(given.begin(), given.end(),
                   [&](const auto& a, const auto& b) {
                     return rank(a.first) < rank(b.first);
                   });
  for (const auto& [name, value] : given) {
    auto ok = contains(extra, name) ? apply(name, value)
                                    : apply_option(o, name, value);
    if (!ok)
      return unexpected<error>(ok.error());
  }
  // Neither capacity given: a quarter of the working set, the capacity
  // every bar is measured at.
  if (!o.capacity_fraction && !o.capacity_blocks)
    o.capacity_fraction = default_capacity_fraction;
  return check_complete(o, no_input);
}

constexpr std::string_view disk_options[] = {"--disk-dir",
                                             "--disk-capacity-blocks"};

// Whether `args` ask for help: "--help" or "-h" where an option may stand,
// not as the value of an option that takes one (`--trace -h` names a file
// "-h"); `extra` are the mode's own valued options, and the common ones in
// `excluded` are not the mode's, so they take no value (`routing --disk-dir
// -h` asks for help). Asking for help wins over any mistake elsewhere on
// the line.
bool wants_help(std::span<const std::string_view> args,
                std::span<const std::string_view> extra = {},
                std::span<const std::string_view> excluded = {}) {
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string_view a = args[i];
    if (a == "--help" || a == "-h")
      return true;
    // The next argument is this option's value (parse_options' rule).
    if (((contains(valued_options, a) && !contains(excluded, a)) ||
         contains(extra, a)) &&
        i + 1 < args.size() && !args[i + 1].starts_with("--"))
      ++i;
  }
  return false;
}

result<command> parse_engine(std::span<const std::string_view> args) {
  if (wants_help(args))
    return command{command_kind::engine_help, {}, {}, {}};
  command cmd;
  cmd.kind = command_kind::engine;
  if (auto ok = parse_options(args, "engine", cmd.engine, {}, {}, {}); !ok)
    return unexpected<error>(ok.error());
  return cmd;
}

/// --eviction's value; `flat` (routing mode): every request is of normal
/// priority, so `priority` is refused (refuse_flat_priority()).
result<engine::policy_kind> parse_one_policy(std::string_view value,
                                             bool flat) {
  auto kind = engine::parse_policy(value);
  if (!kind)
    return usage("option --eviction: " + kind.error().message);
  if (flat)
    if (auto ok = refuse_flat_priority(*kind, "--eviction"); !ok)
      return unexpected<error>(ok.error());
  if (*kind == engine::policy_kind::belady)
    return usage("option --eviction: belady needs to know every request "
                 "ahead; only engine mode's --policies can run it");
  return *kind;
}

result<double> parse_nonnegative(std::string_view name,
                                 std::string_view value) {
  auto x = parse_real(name, value);
  if (!x)
    return unexpected<error>(x.error());
  if (!(*x >= 0.0))
    return usage("option " + std::string(name) + " must not be negative");
  return *x;
}

result<command> parse_routing(std::span<const std::string_view> args) {
  static constexpr std::string_view extra[] = {"--engines",
                                               "--policies",
                                               "--eviction",
                                               "--rate-scale",
                                               "--service-overhead-us",
                                               "--credit-per-block",
                                               "--max-credit",
                                               "--backlog-margin",
                                               "--overload-credit-factor"};
  if (wants_help(args, extra, disk_options))
    return command{command_kind::routing_help, {}, {}, {}};
  command cmd;
  cmd.kind = command_kind::routing;
  routing_options& r = cmd.routing;
  const auto apply = [&r](std::string_view name,
                          std::string_view value) -> result<void> {
    if (name == "--engines") {
      auto n = parse_unsigned<std::uint32_t>(
          name, value, static_cast<std::uint32_t>(actors::router::max_slots));
      if (!n)
        return unexpected<error>(n.error());
      if (*n == 0) // the upper bound is parse_unsigned's
        return usage("option --engines must be in [1, 64], got " +
                     std::string(value));
      r.engines = *n;
    } else if (name == "--policies") {
      r.policies.clear();
      for (std::string_view p : split(value, ',')) {
        auto kind = actors::parse_routing_policy(p);
        if (!kind)
          return usage(kind.error().message);
        if (std::find(r.policies.begin(), r.policies.end(), *kind) !=
            r.policies.end())
          return usage("policy '" + std::string(p) +
                       "' is listed twice in --policies");
        r.policies.push_back(*kind);
      }
    } else if (name == "--eviction") {
      auto k = parse_one_policy(value, /*flat=*/true);
      if (!k)
        return unexpected<error>(k.error());
      r.eviction = *k;
    } else if (name == "--backlog-margin") {
      auto n = parse_unsigned<std::uint32_t>(name, value);
      if (!n)
        return unexpected<error>(n.error());
      r.router.backlog_margin = *n;
    } else {
      auto x = parse_nonnegative(name, value);
      if (!x)
        return unexpected<error>(x.error());
      if (name == "--rate-scale") {
        if (!(*x > 0.0))
          return usage("option --rate-scale must be above 0");
        r.rate_scale = *x;
      } else if (name == "--service-overhead-us") {
        if (*x > max_cost_us)
          return usage("option --service-overhead-us must be at most "
                       "1000000 (one second per request)");
        r.service_overhead_us = *x;
      } else if (name == "--credit-per-block") {
        r.router.credit_per_block = *x;
      } else if (name == "--max-credit") {
        r.router.max_credit = *x;
      } else {
        // Above 1 it would raise the credit of the engine it relieves.
        if (*x > 1.0)
          return usage("option --overload-credit-factor must be at most 1");
        r.router.overload_credit_factor = *x;
      }
    }
    return {};
  };
  if (auto ok =
          parse_options(args, "routing", r.base, extra, disk_options, apply);
      !ok)
    return unexpected<error>(ok.error());
  return cmd;
}

result<command> parse_prefetch(std::span<const std::string_view> args) {
  static constexpr std::string_view extra[] = {"--eviction", "--threshold",
                                               "--prefetch-at", "--max-round",
                                               "--session-timeout-s"};
  static constexpr std::string_view excluded[] = {
      "--disk-dir", "--disk-capacity-blocks", "--policies",
      "--trace",    "--on-bad-line",          "--prefill-us-per-token"};
  if (wants_help(args, extra, excluded))
    return command{command_kind::prefetch_help, {}, {}, {}};
  command cmd;
  cmd.kind = command_kind::prefetch;
  prefetch_options& p = cmd.prefetch;
  const auto apply = [&p](std::string_view name,
                          std::string_view value) -> result<void> {
    if (name == "--eviction") {
      auto k = parse_one_policy(value, /*flat=*/false);
      if (!k)
        return unexpected<error>(k.error());
      p.eviction = *k;
    } else if (name == "--max-round") {
      auto n = parse_unsigned<std::uint32_t>(name, value);
      if (!n)
        return unexpected<error>(n.error());
      if (*n == 0)
        return usage("option --max-round must be at least 1");
      p.max_round = *n;
    } else {
      auto x = parse_nonnegative(name, value);
      if (!x)
        return unexpected<error>(x.error());
      if (name == "--threshold") {
        if (*x > 1.0)
          return usage("option --threshold must be in [0, 1]");
        p.threshold = *x;
      } else if (name == "--prefetch-at") {
        if (*x > 1.0)
          return usage("option --prefetch-at must be in [0, 1]");
        p.prefetch_at = *x;
      } else {
        if (*x > max_session_timeout_s)
          return usage("option --session-timeout-s must be at most "
                       "1000000000 (about 31 years)");
        p.session_timeout_s = *x;
      }
    }
    return {};
  };
  // Without a workload the common message would offer --trace, which this
  // mode refuses.
  constexpr std::string_view needs_chat =
      "prefetch mode needs --workload chat (the workload with sessions)";
  if (auto ok = parse_options(args, "prefetch", p.base, extra, excluded, apply,
                              needs_chat);
      !ok)
    return unexpected<error>(ok.error());
  if (p.base.workload != "chat")
    return usage(std::string(needs_chat));
  return cmd;
}

} // namespace

result<command> parse_command_line(std::span<const std::string_view> args) {
  if (args.empty())
    return usage("no mode given (see kvfleet-bench --help)");
  const std::string_view mode = args[0];
  if (mode == "--help" || mode == "-h" || mode == "help") {
    // `help engine` is `engine --help`; options after the help request
    // are ignored, as a mode's help ignores the rest of its line, but a
    // topic that is no mode is a mistake to say (`help engnie`).
    const std::string_view topic = args.size() > 1 ? args[1] : "";
    const command_kind kind = topic == "engine"    ? command_kind::engine_help
                              : topic == "routing" ? command_kind::routing_help
                              : topic == "prefetch"
                                  ? command_kind::prefetch_help
                                  : command_kind::help;
    if (kind == command_kind::help && !topic.empty() && !topic.starts_with("-"))
      return usage("no help on '" + std::string(topic) +
                   "': the modes are engine, routing and prefetch (see "
                   "kvfleet-bench --help)");
    return command{kind, {}, {}, {}};
  }
  if (mode == "engine")
    return parse_engine(args.subspan(1));
  if (mode == "routing")
    return parse_routing(args.subspan(1));
  if (mode == "prefetch")
    return parse_prefetch(args.subspan(1));
  if (mode.starts_with("-"))
    return usage("unknown option '" + std::string(mode) +
                 "'; options follow the mode (see kvfleet-bench --help)");
  return usage(
      "unknown mode '" + std::string(mode) +
      "'; modes: engine, routing, prefetch (see kvfleet-bench --help)");
}

std::string_view main_help() noexcept {
  return main_help_text;
}
std::string_view engine_help() noexcept {
  return engine_help_text;
}
std::string_view routing_help() noexcept {
  return routing_help_text;
}
std::string_view prefetch_help() noexcept {
  return prefetch_help_text;
}

engine::namespace_spec bench_namespace(const engine_options& opts) {
  engine::namespace_spec spec;
  spec.model = "kvfleet-bench";
  spec.layers = opts.layout.layers;
  spec.kv_heads = opts.layout.kv_heads;
  spec.head_dim = opts.layout.head_dim;
  spec.type = engine::dtype::fp16;
  spec.block_tokens = opts.block_tokens;
  return spec;
}

std::string number_text(double x) {
  // Shortest round-trip form: at most 24 characters for any double.
  char buf[32];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, x);
  if (ec != std::errc{})
    return std::to_string(x);
  return std::string(buf, end);
}

std::string printable(std::string_view text) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(text.size());
  const auto escape = [&](unsigned char c) {
    out += "\\x";
    out += hex[c >> 4];
    out += hex[c & 15];
  };
  for (std::size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f) {
      if (c == '\n')
        out += "\\n";
      else if (c == '\r')
        out += "\\r";
      else if (c == '\t')
        out += "\\t";
      else
        escape(c);
      ++i;
      continue;
    }
    if (c == '\\') { // so that a literal "\n" is not read as an escape
      out += "\\\\";
      ++i;
      continue;
    }
    if (c < 0x80) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    // A UTF-8 sequence: its length from the lead byte, then continuation
    // bytes; no overlong forms, surrogates or code points past U+10FFFF.
    std::size_t len = 0;
    std::uint32_t cp = 0;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
      cp = c & 0x1fU;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      cp = c & 0x0fU;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      cp = c & 0x07U;
    }
    bool valid = len != 0 && i + len <= text.size();
    for (std::size_t k = 1; valid && k < len; ++k) {
      const auto cc = static_cast<unsigned char>(text[i + k]);
      valid = (cc & 0xc0U) == 0x80U;
      cp = (cp << 6) | (cc & 0x3fU);
    }
    if (valid)
      valid = !(len == 3 && cp < 0x800) && !(len == 4 && cp < 0x10000) &&
              !(cp >= 0xd800 && cp <= 0xdfff) && cp <= 0x10ffff;
    if (!valid) {
      escape(c);
      ++i;
      continue;
    }
    if (cp < 0xa0) { // C1 controls (U+0080-U+009F: NEL, CSI, ...)
      for (std::size_t k = 0; k < len; ++k)
        escape(static_cast<unsigned char>(text[i + k]));
      i += len;
      continue;
    }
    out.append(text.substr(i, len));
    i += len;
  }
  return out;
}

bool is_usage_error(const error& e) noexcept {
  const auto code = static_cast<unsigned>(e.code);
  return code >= 100 && code < 200;
}

} // namespace kvfleet::bench
