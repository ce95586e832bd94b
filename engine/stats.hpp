#pragma once
/// Engine statistics: counters and latency histograms.
///
/// latency_histogram is log-linear (HdrHistogram-like): 8 sub-buckets per
/// power of two, so a percentile is exact to within 12.5%. Recording is a
/// few instructions and never allocates. The sum behind mean() saturates
/// at 2^64 - 1 ns (584 years) rather than wrapping, so absurd values (a
/// clock that jumps) make the mean too low, never near zero. Not
/// thread-safe.

#include "engine/codec.hpp"

#include <array>
#include <cstddef>
#include <cstdint>

namespace kvfleet::engine {

class latency_histogram {
public:
  static constexpr int sub_bits = 3;
  static constexpr std::size_t bucket_count = (64 - sub_bits + 1) << sub_bits;

  void record(std::uint64_t ns) noexcept {
    ++buckets_[bucket_of(ns)];
    ++count_;
    sum_ = saturating_add(sum_, ns);
    if (ns > max_)
      max_ = ns;
  }
  void merge(const latency_histogram& other) noexcept;
  void reset() noexcept { *this = latency_histogram{}; }
  [[nodiscard]] std::uint64_t count() const noexcept { return count_; }
  [[nodiscard]] std::uint64_t max() const noexcept { return max_; }
  [[nodiscard]] double mean() const noexcept {
    return count_ == 0
               ? 0.0
               : static_cast<double>(sum_) / static_cast<double>(count_);
  }
  /// Value at quantile `q` in [0, 1] (upper edge of its bucket, capped at
  /// the largest value seen); 0 when empty. `q` outside [0, 1] is clamped,
  /// NaN reads as 0.
  [[nodiscard]] std::uint64_t quantile(double q) const noexcept;

  [[nodiscard]] static std::size_t bucket_of(std::uint64_t v) noexcept;
  [[nodiscard]] static std::uint64_t bucket_upper(std::size_t b) noexcept;

private:
  [[nodiscard]] static std::uint64_t saturating_add(std::uint64_t a,
                                                    std::uint64_t b) noexcept {
    return b > ~std::uint64_t{0} - a ? ~std::uint64_t{0} : a + b;
  }

  std::array<std::uint64_t, bucket_count> buckets_{};
  std::uint64_t count_ = 0;
  std::uint64_t sum_ = 0;
  std::uint64_t max_ = 0;
};

/// Size partitions by request length.
enum class size_partition : std::uint8_t { small = 0, medium = 1, large = 2 };
inline constexpr std::size_t partition_count = 3;
/// "short", "medium", "long".
[[nodiscard]] std::string_view to_string(size_partition p) noexcept;

struct store_stats {
  // Prefix matching (lookup, lookup_tiers, acquire_prefix, process).
  std::uint64_t lookups = 0;
  /// Blocks found: lookup() in memory and the memory tier, lookup_tiers()
  /// and process() also on disk (what a request matches), acquire_prefix()
  /// in memory and the memory tier (engine/README.md "Stats").
  std::uint64_t block_hits = 0;
  std::uint64_t block_misses = 0;
  std::uint64_t token_hits = 0;   ///< process() only: prompt tokens served
  std::uint64_t token_misses = 0; ///< process() only: prompt tokens computed
  // Puts: reserve(), put_tokens() and process()'s own, not the blocks
  // brought back from the memory tier or disk (disk_block_hits,
  // tier_block_hits, promotion_failures count those).
  std::uint64_t reserves = 0;
  std::uint64_t commits = 0;
  std::uint64_t aborts = 0; ///< by abort(), with a parent, handle dropped
  std::uint64_t duplicate_puts = 0;
  // Reads.
  std::uint64_t reads = 0;
  std::uint64_t checksum_failures = 0; ///< corrupted blocks dropped
  // Space management.
  std::uint64_t evictions = 0;
  std::uint64_t evicted_bytes = 0;
  std::uint64_t demotions = 0;
  std::uint64_t demoted_bytes_saved = 0;
  std::uint64_t expirations = 0;
  /// Slab compaction: blocks moved inside the arena, and the slabs that
  /// went to another size class so (engine/README.md "Space management").
  std::uint64_t moved_blocks = 0;
  std::uint64_t compacted_slabs = 0;
  /// Copies inside the arena that failed (a device copy, say): the first
  /// turns compaction off, and the store evicts instead.
  std::uint64_t compaction_failures = 0;
  /// Lookup, put and process calls (lookup, lookup_tokens, acquire_prefix,
  /// acquire, reserve, write, write_from, commit, put_tokens, process) that
  /// returned an error, each once. acquire() of a block that is not cached
  /// is a miss, not counted; reads, pins, unpins, aborts and the tier calls
  /// are not counted either.
  std::uint64_t rejected_requests = 0;
  // Disk tier (zero without one).
  std::uint64_t disk_block_hits = 0;    ///< blocks promoted from disk
  std::uint64_t disk_token_hits = 0;    ///< prompt tokens served from disk
  std::uint64_t promotion_failures = 0; ///< disk blocks recomputed instead
  std::uint64_t spills = 0;             ///< written to disk, or in flight
  std::uint64_t spills_skipped = 0;     ///< already on disk, not rewritten
  /// Disk copies erased because a put gave the block an earlier expiry
  /// than theirs (they would have served it after it expired).
  std::uint64_t outlasting_disk_copies_dropped = 0;
  /// Refused or failed on disk. A spill superseded before it was written
  /// (the block spilled again, or its disk copy erased) is in neither.
  std::uint64_t spill_failures = 0;
  // Memory tier (zero without one).
  std::uint64_t tier_demotions = 0;      ///< blocks moved to the tier
  std::uint64_t tier_demoted_bytes = 0;  ///< their stored bytes
  std::uint64_t tier_demotions_kept = 0; ///< read, pinned or extended while
                                         ///< copying: kept in memory
  std::uint64_t tier_block_hits = 0;     ///< blocks promoted back
  std::uint64_t tier_token_hits = 0;     ///< prompt tokens served from it
  std::uint64_t tier_drops = 0;          ///< dropped from a full tier
  std::uint64_t tier_failures = 0;       ///< copies that failed
  /// Demotions that stopped at a block larger than the tier takes in one
  /// batch (memory_tier::max_batch_bytes): that block and those behind it
  /// stay, and are evicted when memory is needed (logged once).
  std::uint64_t tier_too_large = 0;
  // Current contents.
  std::array<std::uint64_t, codec_count> blocks_by_codec{};
  std::array<std::uint64_t, codec_count> bytes_by_codec{};
  std::array<std::uint64_t, partition_count> blocks_by_partition{};
  std::array<std::uint64_t, partition_count> bytes_by_partition{};
  // Latencies in nanoseconds, per operation.
  latency_histogram lookup_ns;
  latency_histogram put_ns; ///< reserve through commit, puts only
  latency_histogram read_ns;
  latency_histogram process_ns;
};

} // namespace kvfleet::engine
