#include "tools/bench/engine_mode.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "engine/codec.hpp"
#include "engine/disk/segment_file.hpp"
#include "engine/kv_producer.hpp"
#include "engine/trace_reader.hpp"
#include "tools/bench/cli.hpp"
#include "tools/bench/interrupt.hpp"
#include "tools/bench/next_use_oracle.hpp"

#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <ostream>

namespace kvfleet::bench {

namespace {

constexpr std::size_t max_slab_blocks = 64;
constexpr std::size_t min_slabs = 8;

double ratio(std::uint64_t part, std::uint64_t whole) {
  return whole == 0 ? 0.0
                    : static_cast<double>(part) / static_cast<double>(whole);
}

double to_us(std::uint64_t ns) {
  return static_cast<double>(ns) / 1e3;
}

// Largest divisor of n that is at most `limit`: slabs of that many blocks
// tile a capacity of n blocks exactly.
std::size_t slab_blocks_for(std::size_t n, std::size_t limit) {
  for (std::size_t d = std::min(n, limit); d > 1; --d)
    if (n % d == 0)
      return d;
  return 1;
}

} // namespace

namespace {

result<std::vector<engine::workload_request>>
read_or_generate(const engine_options& opts, std::ostream& diag) {
  if (!opts.workload.empty()) {
    engine::workload_options wo;
    wo.block_tokens = opts.block_tokens;
    wo.seed = opts.seed;
    wo.requests = opts.requests;
    wo.stop = stop_on_interrupt();
    auto reqs = engine::generate_workload(opts.workload, wo);
    if (!reqs && reqs.error().code == errc::unavailable)
      return interrupted_while("generating workload '" + opts.workload + "'");
    return reqs;
  }
  engine::trace_options to;
  to.on_bad_line = opts.on_bad_line;
  to.block_tokens = opts.block_tokens;
  to.stop = stop_on_interrupt();
  engine::trace_report report;
  auto reqs = engine::read_trace_file(opts.trace_path, to, report);
  if (!reqs && reqs.error().code == errc::unavailable)
    return interrupted_while("reading trace file '" + opts.trace_path +
                             "' (after line " + std::to_string(report.lines) +
                             ")");
  if (!reqs)
    return reqs; // the error names the file and the line
  const std::string path = printable(opts.trace_path);
  for (const std::string& p : report.problems)
    diag << path << ": " << printable(p) << '\n';
  if (report.skipped > 0) {
    diag << path << ": skipped " << report.skipped << " malformed line"
         << (report.skipped == 1 ? "" : "s") << " of " << report.lines;
    if (report.skipped > report.problems.size())
      diag << " (the first " << report.problems.size() << " shown)";
    diag << '\n';
  }
  // An empty replay would print a table of zeros that looks like a result.
  if (reqs->empty())
    return make_error(
        errc::parse_error,
        "trace file '" + opts.trace_path + "' has no requests" +
            (report.skipped > 0
                 ? " (" + std::to_string(report.skipped) + " malformed and " +
                       std::to_string(report.blank) + " blank of " +
                       std::to_string(report.lines) + " lines)"
                 : ""));
  if (opts.requests != 0 && reqs->size() > opts.requests)
    reqs->resize(opts.requests);
  return reqs;
}

} // namespace

result<std::vector<engine::workload_request>>
load_requests(const engine_options& opts, std::ostream& diag) {
  auto reqs = read_or_generate(opts, diag);
  if (!reqs)
    return reqs;
  // Only whole blocks are cached: with none, every policy would print a
  // table of zeros that looks like a result.
  const bool any_block = std::any_of(
      reqs->begin(), reqs->end(), [&](const engine::workload_request& r) {
        return r.input_length >= opts.block_tokens;
      });
  // In a trace that is its content (exit status 1, as for any bad trace);
  // a generated workload meets it through --block-tokens, or a few short
  // requests (--requests, --seed): no-reuse prompts can be under 512.
  if (!any_block)
    return make_error(
        opts.trace_path.empty() ? errc::invalid_argument : errc::parse_error,
        "no request has a whole block of " + std::to_string(opts.block_tokens) +
            " tokens (--block-tokens): every input is "
            "shorter, so nothing could be cached" +
            (opts.trace_path.empty()
                 ? std::string("; a smaller --block-tokens, more --requests "
                               "or another --seed gives some")
                 : std::string()));
  return reqs;
}

result<std::size_t> capacity_in_blocks(const engine_options& opts,
                                       std::size_t working_set_blocks) {
  if (opts.capacity_blocks) {
    if (*opts.capacity_blocks == 0)
      return make_error(errc::zero_capacity,
                        "capacity 0: --capacity-blocks must be at least 1");
    return *opts.capacity_blocks;
  }
  const double f = opts.capacity_fraction.value_or(0.0);
  const double n = std::round(f * static_cast<double>(working_set_blocks));
  if (!(n >= 1.0))
    return make_error(errc::zero_capacity,
                      "capacity 0: --capacity-fraction " + number_text(f) +
                          " of a working set of " +
                          std::to_string(working_set_blocks) +
                          " blocks rounds to 0 blocks");
  const std::size_t slot = block_slot_bytes(bench_namespace(opts));
  const std::size_t most = std::numeric_limits<std::size_t>::max() / slot;
  if (n > static_cast<double>(most))
    return make_error(
        errc::value_too_large,
        capacity_fraction_too_large(f, working_set_blocks, 1, most, slot));
  return static_cast<std::size_t>(n);
}

std::string capacity_fraction_too_large(double fraction,
                                        std::size_t working_set_blocks,
                                        std::size_t engines,
                                        std::size_t most_blocks,
                                        std::size_t slot_bytes) {
  // Each engine gets fraction x working set / engines blocks, so the most a
  // fraction can be is engines times most_blocks over the working set.
  const std::string per =
      engines > 1 ? " over " + std::to_string(engines) + " engines" : "";
  return "option --capacity-fraction is too large: " + number_text(fraction) +
         " of a working set of " + std::to_string(working_set_blocks) +
         " blocks" + per + " is more than " + std::to_string(most_blocks) +
         " blocks of " + std::to_string(slot_bytes) + " bytes" +
         (engines > 1 ? " per engine" : "") +
         ", past 64-bit addresses, which no machine has (at most " +
         number_text(static_cast<double>(most_blocks) *
                     static_cast<double>(std::max<std::size_t>(1, engines)) /
                     static_cast<double>(
                         std::max<std::size_t>(1, working_set_blocks))) +
         ")";
}

std::size_t block_slot_bytes(const engine::namespace_spec& spec) {
  const std::size_t bytes =
      engine::encoded_size(engine::codec::none, spec.elements_per_block());
  const std::size_t align = engine::block_pool::slot_alignment;
  return (bytes + align - 1) / align * align;
}

result<std::uint64_t> disk_capacity_bytes(const engine::namespace_spec& spec,
                                          std::size_t blocks,
                                          std::uint64_t segment_bytes) {
  const std::uint64_t payload =
      engine::encoded_size(engine::codec::none, spec.elements_per_block());
  const std::uint64_t record = engine::record_header_bytes + payload;
  const std::uint64_t header = engine::segment_header_bytes;
  // At most one segment header per block: a bound that cannot overflow.
  if (blocks > std::numeric_limits<std::uint64_t>::max() / (record + header))
    return make_error(errc::value_too_large,
                      "a disk capacity of " + std::to_string(blocks) +
                          " blocks of " + std::to_string(payload) +
                          " bytes does not fit in 64 bits");
  // A record that does not fit a segment's room gets a segment of its own.
  const std::uint64_t room =
      segment_bytes > header ? segment_bytes - header : 0;
  const std::uint64_t per_segment = std::max<std::uint64_t>(1, room / record);
  const std::uint64_t segments = (blocks + per_segment - 1) / per_segment;
  return blocks * record + segments * header;
}

std::size_t max_disk_capacity_blocks(const engine::namespace_spec& spec) {
  const std::uint64_t payload =
      engine::encoded_size(engine::codec::none, spec.elements_per_block());
  // disk_capacity_bytes' bound: a record and a segment header per block.
  const std::uint64_t most =
      std::numeric_limits<std::uint64_t>::max() /
      (engine::record_header_bytes + payload + engine::segment_header_bytes);
  return static_cast<std::size_t>(
      std::min<std::uint64_t>(most, std::numeric_limits<std::size_t>::max()));
}

result<engine::store_config> make_store_config(const engine_options& opts,
                                               engine::policy_kind policy,
                                               std::size_t capacity_blocks) {
  const std::size_t slot = block_slot_bytes(bench_namespace(opts));
  if (capacity_blocks == 0)
    return make_error(errc::zero_capacity, "capacity 0 blocks");
  if (capacity_blocks > std::numeric_limits<std::size_t>::max() / slot)
    return make_error(
        errc::value_too_large,
        "a capacity of " + std::to_string(capacity_blocks) + " blocks of " +
            std::to_string(slot) +
            " bytes does not fit in 64-bit addresses: no "
            "machine could hold it (at most " +
            std::to_string(std::numeric_limits<std::size_t>::max() / slot) +
            " blocks)");
  engine::store_config cfg;
  cfg.capacity_bytes = capacity_blocks * slot;
  // At least min_slabs slabs: demotion needs a slab of the smaller size,
  // which compaction frees only from a slab's worth of free slots, and the
  // low watermark leaves a fifth free: with 4 slabs or fewer (every store
  // of 64 blocks or less was one) nothing was ever demoted, and 252 blocks
  // hit less with compression on than 251 did.
  cfg.slab_bytes =
      slab_blocks_for(capacity_blocks,
                      std::clamp<std::size_t>(capacity_blocks / min_slabs, 1,
                                              max_slab_blocks)) *
      slot;
  cfg.high_watermark = opts.high_watermark;
  cfg.low_watermark = opts.low_watermark;
  cfg.policy = policy;
  cfg.adaptive_compression = opts.compression;
  return cfg;
}

result<std::unique_ptr<engine::block_store>>
create_store(const engine::store_config& cfg, std::size_t capacity_blocks) {
  auto store = engine::block_store::create(cfg);
  // Said as such: a capacity this machine cannot give is a runtime error
  // (exit 1), unlike one no machine could hold (exit 2, make_store_config).
  if (!store && store.error().code == errc::out_of_memory)
    return make_error(errc::out_of_memory,
                      "this machine cannot give a store of " +
                          std::to_string(capacity_blocks) +
                          " blocks its memory: " + store.error().message);
  return store;
}

// simulate_policy without its out-of-memory guard.
static result<policy_result>
simulate_policy_unguarded(const engine_options& opts,
                          engine::policy_kind policy, const request_keys& keys,
                          std::size_t capacity_blocks,
                          const std::function<void(std::size_t)>& progress) {
  auto cfg = make_store_config(opts, policy, capacity_blocks);
  if (!cfg)
    return unexpected<error>(cfg.error());
  // Declared before the store, so it outlives the store's copy of the
  // oracle function.
  std::optional<next_use_oracle> oracle;
  if (policy == engine::policy_kind::belady) {
    auto built = next_use_oracle::build(keys, stop_on_interrupt());
    if (!built)
      return interrupted_while("building the belady oracle");
    oracle.emplace(std::move(*built));
    cfg->next_use = oracle->as_function();
  }
  // A disk tier in a fresh directory of its own, removed when the run ends.
  // Declared before the store, so it is removed after the store and the
  // disk tier it owns are gone: while the tier lives, its I/O thread may
  // still write segment files there and its catalog is open.
  std::string disk_dir;
  struct dir_remover {
    std::string* dir;
    ~dir_remover() {
      if (!dir->empty()) {
        std::error_code ec;
        std::filesystem::remove_all(*dir, ec);
      }
    }
  } remove_disk_dir{&disk_dir};
  auto store = create_store(*cfg, capacity_blocks);
  if (!store)
    return unexpected<error>(store.error());
  if (!opts.disk_dir.empty()) {
    std::string tmpl = opts.disk_dir + "/kvfleet-bench-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr)
      return make_error(errc::io_error,
                        "cannot make a directory in --disk-dir '" +
                            opts.disk_dir + "': " + std::strerror(errno));
    disk_dir = tmpl;
    engine::disk_tier_config dc;
    dc.directory = disk_dir;
    // Default: four times the memory capacity (saturating: too large is
    // then the error below).
    const std::size_t most = std::numeric_limits<std::size_t>::max() / 4;
    const std::size_t blocks = opts.disk_capacity_blocks != 0
                                   ? opts.disk_capacity_blocks
                                   : std::min(capacity_blocks, most) * 4;
    // Sized in bytes of segment files, headers included: blocks x the
    // block's bytes alone held one block fewer (none for 1 block).
    auto bytes =
        disk_capacity_bytes(bench_namespace(opts), blocks, dc.segment_bytes);
    if (!bytes)
      return unexpected<error>(bytes.error());
    dc.capacity_bytes = *bytes;
    if (opts.disk_config_for_testing)
      opts.disk_config_for_testing(dc);
    auto tier = engine::disk_tier::open(dc);
    if (!tier)
      return unexpected<error>(tier.error());
    if (auto a = (*store)->attach_disk(std::move(*tier)); !a)
      return unexpected<error>(a.error());
  }
  engine::namespace_options ns_opts;
  ns_opts.adaptive_compression = opts.compression;
  auto ns = (*store)->register_namespace(bench_namespace(opts), ns_opts);
  if (!ns)
    return unexpected<error>(ns.error());

  const auto per_token = engine::nanos{
      static_cast<std::int64_t>(std::llround(opts.prefill_us_per_token * 1e3))};
  engine::synthetic_producer producer(per_token);
  policy_result out;
  out.policy = policy;
  for (std::size_t r = 0; r < keys.size(); ++r) {
    if (interrupt_requested())
      return interrupted_error(r, keys.size());
    if (oracle)
      oracle->begin_request(r);
    engine::put_options put;
    put.request_tokens = keys.input_tokens[r];
    const auto request = keys.of(r);
    auto done =
        (*store)->process(*ns, request, keys.input_tokens[r], producer, put);
    if (!done)
      return make_error(done.error().code,
                        "request " + std::to_string(r) + " under policy " +
                            std::string(engine::to_string(policy)) + ": " +
                            done.error().message);
    out.input_tokens += keys.input_tokens[r];
    out.matched_tokens += done->matched_tokens;
    out.full_blocks += request.size();
    out.matched_blocks += done->matched_blocks;
    if (progress)
      progress(r + 1);
  }
  if (engine::disk_tier* disk = (*store)->disk(); disk != nullptr) {
    // Spills still queued may yet be refused or fail: their answers are
    // counted (poll_disk) only once the tier has written them.
    if (!disk->wait_idle())
      return make_error(errc::io_error,
                        "the disk tier under policy " +
                            std::string(engine::to_string(policy)) +
                            " did not finish its writes within 60 s");
    (*store)->poll_disk();
    const engine::disk_tier_stats ds = disk->stats();
    out.spills_refused_full = ds.spills_refused_full;
    out.spills_refused_capacity = ds.spills_refused_capacity;
    out.spills_refused_busy = ds.spills_refused_busy;
    out.spill_errors = ds.spill_errors;
    out.disk_full = ds.full;
  }
  // One that came during the last request (or the disk tier's wait, up to
  // 60 s) is one too: the run stops and prints no results.
  if (interrupt_requested())
    return interrupted_error(keys.size(), keys.size());
  const engine::store_stats& st = (*store)->stats();
  out.spill_failures = st.spill_failures;
  out.token_hit_ratio = ratio(out.matched_tokens, out.input_tokens);
  out.disk = !opts.disk_dir.empty();
  out.disk_token_hit_ratio = ratio(st.disk_token_hits, out.input_tokens);
  out.spills = st.spills;
  out.block_hit_ratio = ratio(out.matched_blocks, out.full_blocks);
  out.p50_us = to_us(st.process_ns.quantile(0.50));
  out.p95_us = to_us(st.process_ns.quantile(0.95));
  out.p99_us = to_us(st.process_ns.quantile(0.99));
  // From the cost as given, in double (as routing mode does): the
  // producer's whole nanoseconds per token rounded a cost below 0.5 ns to
  // 0 and 1.5 ns to 2, and their sum would wrap after about 9.2e9 matched
  // tokens at the largest cost.
  out.prefill_saved_s =
      static_cast<double>(out.matched_tokens) * opts.prefill_us_per_token / 1e6;
  out.evictions = st.evictions;
  out.demotions = st.demotions;
  return out;
}

result<policy_result>
simulate_policy(const engine_options& opts, engine::policy_kind policy,
                const request_keys& keys, std::size_t capacity_blocks,
                const std::function<void(std::size_t)>& progress) {
  return out_of_memory_as_error("engine mode", [&] {
    return simulate_policy_unguarded(opts, policy, keys, capacity_blocks,
                                     progress);
  });
}

// run_engine without its out-of-memory guard.
static result<engine_report>
run_engine_unguarded(const engine_options& opts,
                     std::span<const engine::workload_request> reqs,
                     const std::string& workload, const progress_fn& progress) {
  engine_report report;
  report.workload = workload;
  report.from_trace = !opts.trace_path.empty();
  report.requests = reqs.size();
  report.block_tokens = opts.block_tokens;
  announce(progress, "counting the working set");
  auto ws =
      engine::working_set_blocks(reqs, opts.block_tokens, stop_on_interrupt());
  if (!ws)
    return stopped_or_failed(ws.error(), "counting the working set");
  report.working_set_blocks = *ws;
  auto cap = capacity_in_blocks(opts, report.working_set_blocks);
  if (!cap)
    return unexpected<error>(cap.error());
  report.capacity_blocks = *cap;

  announce(progress, "computing the block keys");
  auto made = make_request_keys(reqs, bench_namespace(opts).fingerprint(),
                                opts.block_tokens, stop_on_interrupt());
  if (!made)
    return interrupted_while("computing the block keys");
  const request_keys keys = std::move(*made);
  for (std::size_t i = 0; i < opts.policies.size(); ++i) {
    const engine::policy_kind policy = opts.policies[i];
    const auto step = pass_progress(progress, engine::to_string(policy), i,
                                    opts.policies.size(), keys.size());
    auto res =
        simulate_policy(opts, policy, keys, report.capacity_blocks, step);
    if (!res)
      return unexpected<error>(res.error());
    report.results.push_back(*res);
  }
  return report;
}

result<engine_report> run_engine(const engine_options& opts,
                                 std::span<const engine::workload_request> reqs,
                                 const std::string& workload,
                                 const progress_fn& progress) {
  return out_of_memory_as_error("engine mode", [&] {
    return run_engine_unguarded(opts, reqs, workload, progress);
  });
}

void announce(const progress_fn& progress, const std::string& label) {
  if (progress)
    progress(0, 0, label);
}

std::function<void(std::size_t)>
pass_progress(const progress_fn& progress, std::string_view name,
              std::size_t index, std::size_t passes, std::size_t per_pass) {
  if (!progress)
    return {};
  std::string label = std::string(name) + " (" + std::to_string(index + 1) +
                      "/" + std::to_string(passes) + ")";
  announce(progress, label + ": setting up");
  return [progress, label = std::move(label), before = index * per_pass,
          total = passes * per_pass](std::size_t done) {
    progress(before + done, total, label);
  };
}

std::uint64_t failed_spills(const policy_result& r) noexcept {
  return r.spill_failures - std::min(r.spills_refused_busy, r.spill_failures);
}

} // namespace kvfleet::bench
