#pragma once
/// Synthetic workloads for kvfleet-bench: requests as block-id sequences.
///
/// A request's prompt is cut into blocks of `block_tokens` tokens; each block
/// gets a 63-bit id that is a function of the whole token prefix up to and
/// including that block. Two requests therefore share their leading ids
/// exactly as far as their token streams share whole blocks. The last id of a
/// request covers a partial block when `input_length` is not a multiple of
/// `block_tokens` (as in Mooncake traces); a partial block's id differs from
/// that of any full block, so only the first `input_length / block_tokens`
/// ids are cacheable blocks.
///
/// Generation is deterministic for a given name, seed, size and block size
/// (std::mt19937_64 plus self-written inverse-CDF / Box-Muller sampling, so
/// the output does not depend on the standard library's distributions). Ids
/// are salted with the workload name and the seed, so different workloads or
/// seeds never share blocks by accident. Thread safety: free functions on
/// values; safe to call concurrently.
///
/// The workloads (T = tokens; sizes are the defaults when `requests` is 0):
///
/// - `chat` (20,000 requests): multi-turn conversations on a busy service.
///   Sessions arrive as a Poisson process at 4 sessions/s. A session's
///   number of rounds is heavy-tailed (discrete Pareto, alpha 1.3, at most
///   64: about 60% are one round, a few go on for dozens, as in public chat
///   logs), and it ends early once a prompt would exceed 32,768 T. Each
///   session uses one of 4 system prompts (lengths uniform in 1,000-3,000 T,
///   chosen with probabilities 0.55/0.25/0.12/0.08). User turns are
///   lognormal (median 300 T, sigma 0.9, clamped to 8-4,000 T); replies are
///   lognormal (median 400 T, sigma 0.6, clamped to 16-2,048 T) and are the
///   request's `output_length`. Round k's prompt = system prompt + all
///   earlier user turns and replies + user turn k. The next round arrives
///   after the reply is decoded (20 ms per output token) plus an exponential
///   think time (mean 60 s). A few hundred sessions are active at a time,
///   so their histories do not all fit a cache of a quarter of the working
///   set. `session` is the session number (1-based).
/// - `shared-prefix` (20,000 requests, 20 requests/s Poisson): 2,000 prefix
///   groups with prefix lengths log-uniform in 1,024-8,192 T; each request
///   picks a group by Zipf popularity (s = 1.0) and appends a unique suffix,
///   log-uniform in 100-2,000 T. Output lognormal (median 200 T, sigma 0.7,
///   clamped to 1-4,096 T).
/// - `doc-qa` (10,000 requests, 5 requests/s Poisson): a shared instruction
///   prompt (600 T) + one of 500 documents (lengths log-uniform in
///   4,096-32,768 T, Zipf popularity s = 1.0) + a unique question
///   (uniform 50-300 T). Output lognormal (median 150 T, sigma 0.7, clamped
///   to 1-4,096 T).
/// - `no-reuse` (10,000 requests, 10 requests/s Poisson): unique prompts,
///   log-uniform in 500-8,192 T. Output lognormal (median 250 T, sigma 0.7,
///   clamped to 1-4,096 T).
///
/// Only `chat` sets `session`; the other workloads leave it 0. Timestamps are
/// in milliseconds from 0 and nondecreasing.

#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string_view>
#include <vector>

namespace kvfleet::engine {

/// One request of a workload: a prompt cut into blocks.
struct workload_request {
  std::uint64_t timestamp_ms = 0;  ///< arrival time
  std::uint64_t session = 0;       ///< 0 when the workload has no sessions
  std::uint32_t input_length = 0;  ///< prompt tokens
  std::uint32_t output_length = 0; ///< generated tokens
  /// One id per block of the prompt, in order; equal leading ids mean a
  /// shared prefix. The last id may cover a partial block.
  std::vector<std::uint64_t> hash_ids;

  friend bool operator==(const workload_request&,
                         const workload_request&) = default;
};

/// Options of `generate_workload`.
struct workload_options {
  std::uint32_t block_tokens = 512; ///< tokens per block; must be > 0
  std::uint64_t seed = 42;
  std::size_t requests = 0; ///< 0 = the workload's default size
  /// Asked before the first request is made and then about every 4,096
  /// requests; true stops generation with `errc::unavailable` (e.g. a
  /// signal handler's flag: 5,000,000 requests take tens of seconds), and
  /// so does anything it throws (saying what; before, it escaped).
  /// Empty: never stops.
  std::function<bool()> stop;
};

/// Largest `workload_options::requests` accepted.
inline constexpr std::size_t max_workload_requests = 5'000'000;

/// Generates the named workload (see the file comment for the shapes).
/// Errors: `errc::invalid_argument` for an unknown name (the message lists
/// the valid names), `block_tokens` 0 or `requests` above
/// `max_workload_requests`; `errc::out_of_memory` if allocation fails;
/// `errc::unavailable` when `workload_options::stop` said so.
[[nodiscard]] result<std::vector<workload_request>>
generate_workload(std::string_view name, const workload_options& opts);

/// Names accepted by `generate_workload`: chat, shared-prefix, doc-qa,
/// no-reuse.
[[nodiscard]] std::span<const std::string_view> workload_names() noexcept;

/// Distinct full-block prefixes in the workload (the working set in blocks).
///
/// Request r contributes its first min(hash_ids.size(), input_length /
/// block_tokens) ids; two blocks are the same when the id sequences up to and
/// including them are equal, so ids that are not prefix-chained (as in some
/// traces) are still counted per prefix. `block_tokens` must be the block
/// size the ids were made with; 0 counts every id.
///
/// `stop` (may be empty) is asked before the first id and then about every
/// 4,096 ids; true stops the count with `errc::unavailable` ("stopped after
/// N of M requests"), as anything it throws does (saying what; bad_alloc:
/// out_of_memory).
/// Counting 5,000,000 chat requests takes tens of
/// seconds. `errc::out_of_memory` when the prefixes do not fit in memory
/// (about 40 bytes each).
[[nodiscard]] result<std::size_t>
working_set_blocks(std::span<const workload_request> reqs,
                   std::uint32_t block_tokens,
                   const std::function<bool()>& stop = {});

} // namespace kvfleet::engine
