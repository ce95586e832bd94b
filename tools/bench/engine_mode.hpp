#pragma once
/// `kvfleet-bench engine`: replays one request sequence through a fresh
/// in-process block store per eviction policy and measures each.
///
/// Every policy sees the identical sequence of keys (request_keys, computed
/// once) against a store of the same capacity. A request is one
/// block_store::process() call with the synthetic producer standing in for
/// prefill, so the store's real code paths run: prefix lookup, leases,
/// two-phase puts, eviction between the watermarks, optional adaptive
/// compression. `belady` gets a next_use_oracle over the same sequence.
///
/// Capacity is counted in uncompressed blocks: capacity_bytes = N x the slot
/// size of one uncompressed block, and the slab size divides it, so slab
/// rounding never changes how many blocks fit.
/// Thread safety: free functions; nothing shared between calls.

#include "engine/block_store.hpp"
#include "engine/eviction_policy.hpp"
#include "engine/result.hpp"
#include "engine/workload.hpp"
#include "tools/bench/cli.hpp"
#include "tools/bench/request_keys.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kvfleet::bench {

/// What one policy achieved over the whole sequence.
struct policy_result {
  engine::policy_kind policy = engine::policy_kind::lru;
  double token_hit_ratio = 0.0; ///< matched_tokens / input_tokens
  double block_hit_ratio = 0.0; ///< matched_blocks / full_blocks
  double p50_us = 0.0;          ///< process() latency quantiles
  double p95_us = 0.0;
  double p99_us = 0.0;
  double prefill_saved_s = 0.0; ///< producer cost of the matched tokens
  std::uint64_t input_tokens = 0;
  std::uint64_t matched_tokens = 0;
  std::uint64_t full_blocks = 0;
  std::uint64_t matched_blocks = 0;
  std::uint64_t evictions = 0;
  std::uint64_t demotions = 0;
  bool disk = false;                 ///< a disk tier was below memory
  double disk_token_hit_ratio = 0.0; ///< tokens served from disk / input
  std::uint64_t spills = 0;          ///< blocks written to disk
  /// Spills the disk tier refused or failed to write (store_stats::
  /// spill_failures, counted once the tier finished its writes), busy
  /// refusals included: see failed_spills().
  std::uint64_t spill_failures = 0;
  // Of the disk tier's refusals and failures (disk_tier_stats):
  std::uint64_t spills_refused_full = 0;     ///< the file system was full
  std::uint64_t spills_refused_capacity = 0; ///< pinned blocks filled it
  std::uint64_t spills_refused_busy = 0;     ///< too many writes queued
  std::uint64_t spill_errors = 0;            ///< write or checksum errors
  bool disk_full = false; ///< the tier found the file system full
};

/// The spills that make a run's disk figures invalid: spill_failures less
/// the refusals because the disk was behind (spills_refused_busy). Those
/// are the tier shedding load as designed on a disk slower than the
/// workload; they lower the disk figures as they would in service, so they
/// are reported (and warned about) but are not an error.
[[nodiscard]] std::uint64_t failed_spills(const policy_result& r) noexcept;

struct engine_report {
  std::string workload; ///< workload name or trace path
  bool from_trace = false;
  std::size_t requests = 0;
  std::uint32_t block_tokens = 0;
  std::size_t working_set_blocks = 0;
  std::size_t capacity_blocks = 0;
  std::vector<policy_result> results; ///< in the order asked for
};

/// Called after each request: `done` of `total` requests over all policies,
/// `label` names the policy running. A `total` of 0 announces a step of
/// unknown length that `label` names (counting the working set, creating a
/// store), until the next call.
using progress_fn = std::function<void(std::size_t done, std::size_t total,
                                       const std::string& label)>;

/// Announces the step `label` to `progress` (a call with a total of 0);
/// nothing when `progress` is empty.
void announce(const progress_fn& progress, const std::string& label);

/// The per-request callback of pass `index` of `passes` over `per_pass`
/// requests, reporting to `progress` as "name (index+1/passes)"; empty
/// when `progress` is. Announces that pass's set-up first ("name
/// (index+1/passes): setting up"), which runs until its first request.
[[nodiscard]] std::function<void(std::size_t)>
pass_progress(const progress_fn& progress, std::string_view name,
              std::size_t index, std::size_t passes, std::size_t per_pass);

/// Returns `run()`, or errc::out_of_memory when it throws std::bad_alloc:
/// a large replay's containers (keys, oracle, queues) can exhaust memory
/// (or an address-space limit), and the modes' public calls return errors
/// instead of letting the exception end the program. `what` names the
/// mode in the message.
template <class Run>
[[nodiscard]] auto out_of_memory_as_error(std::string_view what, Run&& run)
    -> decltype(run()) {
  try {
    return run();
  } catch (const std::bad_alloc&) {
    return make_error(errc::out_of_memory,
                      std::string(what) +
                          ": out of memory (try fewer --requests or a "
                          "smaller capacity)");
  }
}

/// Generates the workload or reads the trace `opts` names, truncated to
/// `opts.requests` for a trace. Trace problems (with line numbers) and a
/// summary of skipped lines are written to `diag`.
/// Errors: the generator's (errc::invalid_argument) and the reader's
/// (errc::parse_error, errc::io_error).
[[nodiscard]] result<std::vector<engine::workload_request>>
load_requests(const engine_options& opts, std::ostream& diag);

/// Capacity in blocks: opts.capacity_blocks, or opts.capacity_fraction of
/// `working_set_blocks` rounded to nearest. errc::zero_capacity when that
/// is 0.
[[nodiscard]] result<std::size_t>
capacity_in_blocks(const engine_options& opts, std::size_t working_set_blocks);

/// The message for a --capacity-fraction `fraction` of `working_set_blocks`
/// over `engines` engines (1 in engine mode) that gives an engine more than
/// `most_blocks` blocks of `slot_bytes`, the most 64-bit addresses hold; it
/// names the largest fraction that does not.
[[nodiscard]] std::string
capacity_fraction_too_large(double fraction, std::size_t working_set_blocks,
                            std::size_t engines, std::size_t most_blocks,
                            std::size_t slot_bytes);

/// Bytes of the slot one uncompressed block of `spec` occupies.
[[nodiscard]] std::size_t block_slot_bytes(const engine::namespace_spec& spec);

/// Disk tier capacity (disk_tier_config::capacity_bytes) that holds
/// `blocks` uncompressed blocks of `spec` in segment files of
/// `segment_bytes`: a block on disk is a record (a header plus its encoded
/// bytes), and every segment file starts with a header of its own.
/// errc::value_too_large when that does not fit in 64 bits.
[[nodiscard]] result<std::uint64_t>
disk_capacity_bytes(const engine::namespace_spec& spec, std::size_t blocks,
                    std::uint64_t segment_bytes);

/// Largest disk tier capacity in blocks of `spec` that disk_capacity_bytes
/// accepts: its segment files' bytes fit in 64 bits.
[[nodiscard]] std::size_t
max_disk_capacity_blocks(const engine::namespace_spec& spec);

/// The store configuration for `capacity_blocks` blocks and `policy`
/// (next_use is left empty). errc::value_too_large when the capacity does
/// not fit in 64-bit memory addresses (no machine could hold it).
[[nodiscard]] result<engine::store_config>
make_store_config(const engine_options& opts, engine::policy_kind policy,
                  std::size_t capacity_blocks);

/// block_store::create(cfg), whose errc::out_of_memory (this machine cannot
/// give the memory of `capacity_blocks` blocks: exit status 1) says so.
[[nodiscard]] result<std::unique_ptr<engine::block_store>>
create_store(const engine::store_config& cfg, std::size_t capacity_blocks);

/// Replays `keys` through a fresh store with `policy`. `progress` (may be
/// empty) is called after each request with the number done. With a disk
/// tier it waits for the tier's writes at the end, so that every refused
/// or failed spill is counted. errc::out_of_memory when this machine
/// cannot give the store its memory.
[[nodiscard]] result<policy_result>
simulate_policy(const engine_options& opts, engine::policy_kind policy,
                const request_keys& keys, std::size_t capacity_blocks,
                const std::function<void(std::size_t)>& progress = {});

/// Runs every policy of `opts` over `reqs`; `workload` labels the report.
[[nodiscard]] result<engine_report>
run_engine(const engine_options& opts,
           std::span<const engine::workload_request> reqs,
           const std::string& workload, const progress_fn& progress = {});

} // namespace kvfleet::bench
