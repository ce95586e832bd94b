#pragma once
/// The disk tier: KV blocks in append-only segment files, indexed by an
/// SQLite catalog, surviving restarts.
///
/// What it owns: a data directory holding `catalog.sqlite` (the catalog,
/// engine/disk/catalog.hpp), segment files (engine/disk/segment_file.hpp)
/// and a `LOCK` file that keeps a second process out. Blocks are the encoded
/// bytes of a value with their codec and checksum (engine/checksum.hpp); the
/// tier checks the checksum when a block is spilled and again on every
/// fetch, and never returns bytes that fail it.
///
/// Threads: the owner (one thread, e.g. an engine actor) calls every public
/// member; one I/O thread, owned by the tier, does all file and catalog I/O.
/// spill, fetch, expire, compact, flush and report queue a request and
/// return at once (a demand fetch ahead of the background work, see
/// fetch()); the I/O thread answers with a `disk_completion` that the
/// owner collects on its own thread with drain_completions(). erase, pin,
/// unpin, contains and lookup act on the in-memory directory at once and
/// persist in the background. open() runs recovery on the calling thread:
/// call it at startup or off the thread that serves lookups.
///
/// Why a mutex: the owner and the I/O thread share the request queues, the
/// completion queue, the block directory (so contains() answers without
/// I/O) with the keys that left it (record_removals) and the published
/// statistics. One mutex guards them all; neither
/// thread holds it during I/O or while calling back into user code, and no
/// other lock is taken while it is held.
///
/// Block states (per key, in the directory):
///   absent --spill--> pending --written and catalogued--> stored
///   pending|stored --erase | spill (replaces) | evict | expire |
///                   checksum failure | refused--> absent (or the new spill)
/// A spill is acknowledged (its completion delivered) only after its bytes
/// are written and its catalog row committed, so an acknowledged block
/// survives a crash of the process (and a power loss with full_sync).
///
/// Space: `capacity_bytes` bounds the bytes of all segment files. A spill
/// that would exceed it first evicts unpinned blocks, least recently used
/// first, until live bytes are at `low_watermark` of capacity, then compacts
/// the segments with the most dead bytes until the spill fits; when pinned
/// blocks fill the capacity the spill is refused. Independently, a sealed
/// segment whose live fraction falls below `compaction_threshold` is
/// compacted after the batch that made it so (or that sealed it, for a
/// segment that lost blocks while it was active). The active segment is
/// sealed and compacted the same way once its dead bytes pass (1 -
/// compaction_threshold) of a full segment. A full file system (ENOSPC)
/// during operation refuses spills from then on (logged once, until a spill
/// is written again), keeps serving fetches, and accepts spills again once
/// the write that failed fits: the tier unlinked as many bytes of its
/// segments, or the file system has min_free_bytes free plus them (looked
/// at with each batch, after an unlink and on the retry schedule).
///
/// Times (created_at, expires_at, accessed_at) are nanoseconds of the
/// configured clock, which should be wall time (the default) so that they
/// mean the same after a restart. Expired blocks are removed by expire(now),
/// and by a spill that needs room before it evicts anything, and are never
/// returned by fetch. TTL applies to pinned blocks too, as in
/// block_store; pins protect from capacity eviction only.
///
/// Failures: a batch whose commit (or, under full_sync, sync) fails is rolled
/// back and the I/O thread's state reloaded from the catalog (not when the
/// batch changed no row but accessed_at updates: those are pending again,
/// and nothing else needs reloading). What a failure
/// leaves to do (catalog rows the directory is ahead of, a reload that failed,
/// a compaction that failed or was not reached on a segment below
/// compaction_threshold, accessed_at updates whose write or commit failed,
/// and a full file system: the tier looks whether min_free_bytes and the
/// write that failed fit again) is
/// retried with every later batch and, while the tier is idle, on its own:
/// retry_interval after the failure, then at a doubling delay up to
/// max_retry_interval while it keeps failing. Failures are counted
/// (stats().io_errors), and so are those retry passes (stats().retries);
/// requests are served meanwhile (refused while no reload has succeeded),
/// and shutdown does not wait for a retry.
///
/// Errors are values; nothing throws out of the public API. Broken
/// invariants abort (check_invariants()).

#include "engine/block_key.hpp"
#include "engine/clock.hpp"
#include "engine/codec.hpp"
#include "engine/disk/catalog.hpp"
#include "engine/disk/segment_file.hpp"
#include "engine/kv_namespace.hpp"
#include "engine/result.hpp"

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace kvfleet::engine {

/// Wall time (system_clock) in nanoseconds since the Unix epoch: the default
/// clock of the disk tier, because its times must survive a restart.
/// Thread-safe.
class wall_clock_source final : public clock_source {
public:
  [[nodiscard]] nanos now() const noexcept override {
    return std::chrono::duration_cast<nanos>(
        std::chrono::system_clock::now().time_since_epoch());
  }
  static const wall_clock_source& instance() noexcept {
    static const wall_clock_source clock;
    return clock;
  }
};

/// The smallest disk_tier_config::segment_bytes open() takes.
inline constexpr std::uint64_t min_segment_bytes = 4096;

struct disk_tier_config {
  std::string directory;            ///< must exist and be writable
  std::uint64_t capacity_bytes = 0; ///< bound on segment file bytes; required
  /// The active segment is sealed (and a new one started) once a record
  /// would take it past this size, so a segment smaller than a record holds
  /// one: a file per block. Size it for many blocks. open() refuses less
  /// than min_segment_bytes (0, say), which cannot hold even a small one.
  std::uint64_t segment_bytes = std::uint64_t{64} << 20;
  /// Sealed segments whose live fraction is below this are compacted. The
  /// active segment is sealed, and so compacted, once its dead bytes pass
  /// (1 - this) of segment_bytes (of capacity_bytes when smaller).
  double compaction_threshold = 0.5;
  /// Capacity eviction frees live bytes down to this fraction of capacity.
  double low_watermark = 0.9;
  /// accessed_at updates are batched (one per block read since the last
  /// write; kept and retried when the write, or the commit of the batch
  /// that wrote them, fails): written when this many are pending...
  std::size_t touch_batch = 256;
  /// ...or when the oldest has waited this long (0 to 24 hours).
  nanos touch_flush_interval = std::chrono::seconds(1);
  /// fdatasync segments (and fsync the directory after creating one) and
  /// run SQLite with synchronous=FULL, so that an acknowledged spill
  /// survives a power loss, not only a process crash. A batch whose sync
  /// fails is rolled back and its spills fail; a batch that gets no catalog
  /// transaction refuses its spills and compactions (errc::io_error), whose
  /// rows would otherwise commit before their bytes are synced.
  bool full_sync = false;
  /// A file system with less space free than this at open() (a tier that
  /// filled it before a restart, say) opens the tier full: spills refused,
  /// reads served. A tier that found the file system full accepts spills
  /// again once this much is free on top of the bytes of the write that
  /// failed (0 for a tier opened full; checked on the retry schedule, see
  /// Failures above): a block larger than this would otherwise be let in
  /// again, and fail again, at every look. Also a reserve the tier keeps
  /// while it spills: a spill that would leave less than this free is
  /// refused before it evicts or writes anything, and the tier turns full
  /// until a look at the free space finds enough (statvfs before each
  /// spill, and again after a compaction its room-making did; compaction
  /// alone is not held to it; 0 turns it off). open()
  /// refuses more than the whole file system holds (never free). A full tier
  /// over capacity_bytes (lowered since it filled) evicts and compacts down to
  /// it, which frees space.
  std::uint64_t min_free_bytes = std::uint64_t{1} << 20;
  /// Largest block accepted.
  std::uint64_t max_block_bytes = std::uint64_t{1} << 30;
  /// Requests the I/O thread takes into one catalog transaction.
  std::size_t max_batch = 64;
  /// Payload bytes of spills queued or being written, at most: past it an
  /// unpinned spill is refused with errc::busy (the disk is behind), so a
  /// slow disk cannot move evicted blocks onto the heap without limit. A
  /// spill is always taken when nothing is queued; pinned spills always are.
  std::uint64_t max_queued_bytes = std::uint64_t{256} << 20;
  /// Work left over after a failure (catalog repairs and a reload after a
  /// failed batch, a compaction that failed) is retried by the I/O thread on
  /// its own, not only with the next request: first this long after the
  /// failure, then at twice the previous delay while it keeps failing...
  /// Must be positive.
  nanos retry_interval = std::chrono::seconds(1);
  /// ...up to this (so a disk that stays broken costs one attempt per
  /// max_retry_interval). At least retry_interval, at most 24 hours.
  nanos max_retry_interval = std::chrono::seconds(30);
  /// Default: wall_clock_source. Read on the I/O thread: must be thread-safe.
  const clock_source* clock = nullptr;
  /// Called on the I/O thread after it queued completions (e.g. to send the
  /// owner a "drain" message). Must be cheap, thread-safe, and must not call
  /// back into the tier.
  std::function<void()> on_completion;
  /// Test hook: consulted before each segment append; a nonzero result is
  /// the errno of a failed write (ENOSPC simulates a full disk).
  segment_file::write_fault write_fault_for_testing;
  /// Test hook: consulted before each segment fdatasync (full_sync); a
  /// nonzero result is the errno of a failed sync.
  segment_file::write_fault sync_fault_for_testing;
  /// Test hook: consulted before each fsync of the data directory
  /// (full_sync, after a batch created a segment); a nonzero result is the
  /// errno of a failed sync.
  segment_file::write_fault dir_sync_fault_for_testing;
  /// Test hook: called on the I/O thread when capacity eviction takes a
  /// block, after the owner can no longer see or pin it.
  std::function<void(const block_key&)> on_evict_for_testing;
  /// Test hook: consulted each time the tier loads its state from the
  /// catalog (at open, and to reload after a failed batch), after the rows
  /// are read; a nonzero result is the errno of a failure there.
  segment_file::write_fault load_fault_for_testing;
  /// Test hook: consulted before each catalog write with its description
  /// (catalog::fault; at open, the upgrade of a version 1 catalog); ENOSPC
  /// makes it fail as a full catalog (SQLITE_FULL), any other nonzero
  /// errno as an I/O error.
  catalog::fault catalog_fault_for_testing;
  /// Test hook: while the tier is full, the free bytes it sees in its
  /// directory instead of statvfs's answer (an inode free unless
  /// inode_free_for_testing says otherwise).
  std::function<std::uint64_t()> free_bytes_for_testing;
  /// Test hook, with free_bytes_for_testing: whether an inode is free.
  std::function<bool()> inode_free_for_testing;
  /// Test hook: the free bytes a spill sees for the min_free_bytes reserve
  /// instead of statvfs's answer.
  std::function<std::uint64_t()> reserve_free_bytes_for_testing;
  /// Test hook: consulted before open() creates its write probe file; a
  /// nonzero result is the errno of a failed create (ENOSPC: no block or
  /// inode left).
  segment_file::write_fault probe_fault_for_testing;
  /// Test hook: consulted before each read of a record (a fetch, a
  /// compaction's copy); a nonzero result is the errno of a failed read
  /// (EIO).
  segment_file::write_fault read_fault_for_testing;
  /// Test hook: called on the I/O thread after each retry pass (one that
  /// ran because retry_interval passed with work pending, not for a
  /// request), once its results are published: with the delay until the
  /// next retry, or 0 when nothing is left to retry.
  std::function<void(nanos)> on_retry_for_testing;
};

/// Identifies one queued request; its completion carries the same id.
struct disk_request_id {
  std::uint64_t value = 0;
  friend bool operator==(const disk_request_id&,
                         const disk_request_id&) = default;
};

/// Where a fetch waits in the I/O thread's queue. A demand read (a caller
/// waits for it: a request's promotion, a block read back for acquire() or
/// pin()) goes ahead of background work (spills, prefetch promotions,
/// expiry, compaction, flushes, reports), in a batch of demand reads; a
/// background read waits its turn. See disk_tier::fetch.
enum class disk_priority : std::uint8_t { background, demand };

enum class disk_op : std::uint8_t {
  spill,
  fetch,
  expire,
  compact,
  flush,
  report
};

/// What the operator queries return, read from the catalog.
struct disk_report {
  std::vector<usage_row> usage;                   ///< per namespace and tier
  std::vector<catalog_entry> oldest;              ///< by created_at
  std::vector<catalog_entry> least_recently_used; ///< by accessed_at
};

/// The answer to one queued request.
struct disk_completion {
  disk_request_id id{};
  disk_op op = disk_op::flush;
  block_key key{};     ///< spill and fetch
  result<void> status; ///< ok, or why it failed
  /// fetch: the block's encoded bytes, codec, checksum and namespace.
  std::vector<std::byte> bytes;
  codec c = codec::none;
  std::uint64_t checksum = 0;
  ns_fingerprint ns{};
  /// expire: blocks removed; compact: segments compacted.
  std::uint64_t count = 0;
  std::unique_ptr<disk_report> report; ///< report only
};

/// What the directory knows about one block (no I/O).
struct disk_block_info {
  ns_fingerprint ns{};
  codec c = codec::none;
  std::uint64_t size = 0;
  std::uint64_t checksum = 0;
  nanos created_at{0};
  nanos expires_at{0};
  std::uint32_t pins = 0;
  bool stored = false; ///< false while its spill is pending
  /// The size partition given to spill(); nullopt when none was (a block
  /// of a version 1 directory).
  std::optional<size_partition> part;
  /// The request priority given to spill(); nullopt when none was (a block
  /// of a version 1 or 2 directory).
  std::optional<priority> prio;
  /// The accesses given to spill() (the store's count when the block left
  /// memory) and the disk's own reads since, as the catalog counts them, so
  /// a block brought back ranks by its history. 0 when none was given.
  std::uint64_t access_count = 0;
};

struct disk_tier_stats {
  // Contents, as of the I/O thread's last batch.
  std::uint64_t blocks = 0;     ///< stored blocks
  std::uint64_t bytes = 0;      ///< their payload bytes
  std::uint64_t file_bytes = 0; ///< segment file bytes, dead bytes included
  std::uint64_t segments = 0;
  // Writes.
  std::uint64_t spills = 0;                  ///< acknowledged spills
  std::uint64_t spills_refused_full = 0;     ///< the file system was full
  std::uint64_t spills_refused_capacity = 0; ///< pinned blocks fill capacity
  std::uint64_t spills_refused_busy = 0; ///< max_queued_bytes already queued
  std::uint64_t spills_superseded = 0;   ///< erased/replaced before written
  std::uint64_t spill_errors = 0;        ///< bad checksum or I/O error
  // Reads.
  std::uint64_t fetches = 0;
  std::uint64_t fetch_hits = 0;
  std::uint64_t fetch_misses = 0;
  std::uint64_t checksum_failures = 0; ///< blocks dropped for bad bytes
  /// Blocks dropped because a read of their record (a fetch's, a
  /// compaction's) failed and it lies past the end of its segment file (cut
  /// short). A record inside its file that two reads could not read is
  /// kept, counted in io_errors only.
  std::uint64_t unreadable_dropped = 0;
  // Recovery (at open).
  std::uint64_t recovered_blocks = 0;
  std::uint64_t torn_tails_dropped = 0; ///< segments cut back to their last
                                        ///< acknowledged record
  std::uint64_t torn_bytes_dropped = 0;
  std::uint64_t missing_dropped = 0; ///< catalog rows whose bytes were gone
  // Space.
  std::uint64_t evictions = 0;
  std::uint64_t evicted_bytes = 0;
  std::uint64_t expirations = 0;
  std::uint64_t compactions = 0; ///< segments compacted or deleted
  std::uint64_t compaction_bytes_moved = 0;
  // Catalog.
  std::uint64_t touch_flushes = 0; ///< batched accessed_at writes
  /// Batches of requests run against the catalog, each in one transaction
  /// (statement by statement when SQLite cannot start one). Not the passes
  /// without requests (retries, accessed_at flushes while idle) nor a batch
  /// refused because the state could not be reloaded.
  std::uint64_t batches = 0;
  /// Passes without requests that the I/O thread ran while idle because
  /// work a failure left was due for a retry (see Failures above).
  std::uint64_t retries = 0;
  std::uint64_t io_errors = 0;
  bool full = false; ///< refusing spills because the file system is full
};

class disk_tier {
public:
  /// Opens (or creates) the tier in config.directory and recovers it: the
  /// catalog is reopened, torn segment tails are cut off, rows whose bytes
  /// are gone are dropped (all counted in stats()); segments left below
  /// compaction_threshold are compacted by the first batch or a retry pass
  /// retry_interval later. A file system with less than min_free_bytes
  /// free opens the tier full (stats().full: spills refused until space
  /// comes back, reads served), logged once. Errors name the directory and what
  /// to do: it is missing, not a directory, cannot be accessed or listed, not
  /// writable, locked by another tier in this process or another (errc::busy),
  /// its LOCK file, a segment or the catalog cannot be opened, the catalog is
  /// read-only to this user or damaged (errc::parse_error), or
  /// holds a catalog of another format version, or a version 1 or 2
  /// catalog that could not be upgraded (it says why: errc::out_of_memory
  /// when the file system is full; see catalog::open).
  [[nodiscard]] static result<std::unique_ptr<disk_tier>>
  open(disk_tier_config config);

  /// Finishes the queued requests (their completions are dropped), writes
  /// pending accessed_at updates and stops the I/O thread.
  ~disk_tier();
  disk_tier(const disk_tier&) = delete;
  disk_tier& operator=(const disk_tier&) = delete;

  /// Queues a block to be written. `bytes` are copied. A key already on
  /// disk is replaced; its pin count is kept (at least 1 if `pinned`).
  /// `part` (the block's size partition in the store) is kept with it, in
  /// the catalog, and lookup() returns it, so that the block comes back
  /// into the partition it left; `prio` (its request priority) likewise,
  /// so that it comes back ranking as it did, and `access_count` (its
  /// accesses so far) too.
  /// Immediate errors: an invalid codec, an empty or too large block, or a
  /// full file system (errc::out_of_memory, counted). The completion fails
  /// with errc::checksum_mismatch when `checksum` is not the bytes'
  /// block_checksum, errc::out_of_memory when no space could be made, and
  /// errc::not_found when the block was erased or replaced first (unless
  /// a fetch of the key was queued in between: the spill is then written,
  /// for that fetch to find, and replaced or erased after it).
  [[nodiscard]] result<disk_request_id>
  spill(const block_key& key, const ns_fingerprint& ns, codec c,
        std::span<const std::byte> bytes, std::uint64_t checksum,
        nanos created_at, nanos expires_at, bool pinned,
        std::optional<size_partition> part = std::nullopt,
        std::optional<priority> prio = std::nullopt,
        std::uint64_t access_count = 0);

  /// Queues a read of a block. The completion holds the bytes after their
  /// checksum was verified; errc::not_found when absent or expired,
  /// errc::checksum_mismatch when the bytes are damaged (the block is then
  /// dropped and counted). A hit updates accessed_at (batched).
  ///
  /// A background read queues behind everything queued before it. A
  /// demand read goes ahead: the I/O thread runs the demand reads queued in
  /// a batch of their own (up to max_batch) before the background work
  /// queued earlier, except that after such a batch taken while background
  /// work waited, the next batch is background work (so spills advance by
  /// up to max_batch every other batch however many reads come). A demand
  /// read of a key whose spill or erase is still queued waits right behind
  /// the last of them, so it finds what was spilled (or nothing, if
  /// erased), never an older copy. Either kind of read finds at least
  /// what was spilled before it was queued: a spill or erase of the key
  /// queued after the read does not make the spill before it be skipped.
  [[nodiscard]] disk_request_id
  fetch(const block_key& key, disk_priority p = disk_priority::background);
  /// As fetch(), but reads straight into `dst` (e.g. the slot the block is
  /// promoted into) and leaves the completion's `bytes` empty; `count` is
  /// the bytes read. errc::wrong_value_size when `dst` is not the block's
  /// size (lookup() tells it); on a checksum failure `dst` is zeroed.
  /// REQUIRES: `dst` stays valid and untouched until the completion is
  /// drained.
  ///
  /// With `verify` false the payload checksum is not computed: the record
  /// header (which has its own checksum), key and size are still checked,
  /// and the completion's `checksum` is the one recorded at spill, for a
  /// caller that verifies the bytes itself when it uses them (block_store
  /// verifies every block on every read, so a promoted block is hashed once,
  /// at its first read, instead of twice).
  [[nodiscard]] disk_request_id
  fetch_into(const block_key& key, std::span<std::byte> dst, bool verify = true,
             disk_priority p = disk_priority::background);

  /// Whether the block is on disk or its spill is pending. No I/O.
  [[nodiscard]] bool contains(const block_key& key) const;
  /// Every key on disk or whose spill is pending, in no particular order
  /// (e.g. to report what a reopened tier recovered). No I/O; O(blocks).
  [[nodiscard]] std::vector<block_key> keys() const;
  /// Starts (or stops, dropping what was kept) recording the keys that
  /// leave the directory, for drain_removed(): evicted for capacity,
  /// expired, dropped as corrupt, a spill that failed or was refused
  /// after it was queued, erased, or dropped when a failed batch was
  /// reloaded. Off by default, so a tier whose owner never drains keeps
  /// nothing; on, it keeps one key per removal until the next drain.
  void record_removals(bool on);
  /// Moves the keys recorded since the last call to `fn`, in the order
  /// they left, on the calling thread; returns how many. A key may come
  /// more than once, and may be in the directory again (spilled since):
  /// check contains().
  std::size_t drain_removed(const std::function<void(const block_key&)>& fn);
  [[nodiscard]] std::optional<disk_block_info>
  lookup(const block_key& key) const;

  /// Removes a block (at once from the directory; from disk in the
  /// background). errc::not_found when absent.
  [[nodiscard]] result<void> erase(const block_key& key);
  /// Pinned blocks are never evicted for capacity. Pins nest and persist.
  /// errc::not_found when absent; unpin of an unpinned block is
  /// errc::invalid_argument.
  [[nodiscard]] result<void> pin(const block_key& key);
  [[nodiscard]] result<void> unpin(const block_key& key);
  /// Blocks whose copy holds pins (those recovered at open included).
  [[nodiscard]] std::size_t pinned_blocks() const;
  /// The owner used `key` since its copy was written (it was read back and
  /// is leaving memory again, the copy's bytes still the same): its
  /// accessed_at becomes now, as a read's does (batched), so capacity
  /// eviction, least recently accessed first, does not take it before
  /// blocks spilled later and never used; `access_count` (the owner's count)
  /// raises the copy's count to it (lookup() at once, the catalog by the
  /// difference). False when the key is not on disk.
  bool mark_used(const block_key& key, std::uint64_t access_count);

  /// Queues removal of every block with 0 < expires_at <= now.
  disk_request_id expire(nanos now);
  /// Queues compaction of every sealed segment below the threshold, and of
  /// the active one when its dead bytes pass the bound of
  /// compaction_threshold (sealing it).
  disk_request_id compact();
  /// Queues a write of pending accessed_at updates.
  disk_request_id flush();
  /// Queues the operator queries: blocks and bytes per namespace and tier,
  /// and the `top_n` oldest and least recently used blocks.
  disk_request_id report(std::size_t top_n);

  /// Moves the completions queued so far to `fn`, in order, on the calling
  /// thread. Returns how many.
  std::size_t
  drain_completions(const std::function<void(disk_completion&&)>& fn);
  /// Blocks until every queued request is done (its completion queued) or
  /// `timeout` passes; true when idle. For owners shutting down and tests.
  [[nodiscard]] bool wait_idle(nanos timeout = std::chrono::seconds(60));
  /// Blocks until the completion of every request in `ids` is queued (not
  /// yet taken by drain_completions), or the tier is idle, or `timeout`
  /// passes; false on timeout. Unlike wait_idle() it does not wait for
  /// the rest of the queue: an owner waiting for its demand reads
  /// (block_store's promotions) is not held up by the spills queued
  /// behind them.
  [[nodiscard]] bool wait_done(std::span<const disk_request_id> ids,
                               nanos timeout = std::chrono::seconds(60));
  /// Makes the background reads among `ids` still queued demand reads (a
  /// caller now waits for them: block_store's process(), acquire(), pin()
  /// or reserve() for a promote() read of its keys), at the back of the
  /// demand queue; one with a queued
  /// spill or erase of its key ahead of it goes right behind the last of
  /// them instead (a read finds what was written before it was asked), as
  /// a demand read of that key would (several keep their order). Returns
  /// how many became demand reads. Linear in the queue (one move of each
  /// queued request); a bad_alloc leaves the queue as it was.
  std::size_t expedite(std::span<const disk_request_id> ids);

  [[nodiscard]] disk_tier_stats stats() const;
  [[nodiscard]] const disk_tier_config& config() const noexcept {
    return config_;
  }

  /// Waits until idle, then aborts when an invariant is broken: the
  /// directory, the I/O thread's index, segment accounting and stats agree,
  /// and work a failure left has a retry scheduled.
  void check_invariants() const;

private:
  struct request;
  struct dir_entry {
    disk_block_info info;
    std::uint64_t gen = 0;
  };
  struct location {
    std::uint64_t segment = 0;
    std::uint64_t offset = 0;
    std::uint64_t size = 0; ///< payload bytes
    std::uint64_t gen = 0;
  };
  struct segment_state {
    segment_file file;
    std::uint64_t live = 0; ///< record bytes of indexed blocks
    std::unordered_set<block_key, block_key_hash> keys;
  };
  struct touch {
    std::int64_t at = 0;
    std::uint64_t count = 0;
  };
  /// Why remove_block drops a block. `replace` and `reconcile` leave the
  /// catalog row alone: a new row overwrites it, or a repair erases it.
  enum class removal : std::uint8_t {
    erase,
    evict,
    expire,
    corrupt,
    unreadable,
    replace,
    reconcile
  };
  /// A catalog write that the owner's directory is ahead of, because the
  /// batch that carried it was rolled back (see reload()), or because the
  /// statement failed (a row erase, or a pin count: another writer holding
  /// the catalog, say).
  struct repair {
    bool erase = false; ///< erase the row, unless the key is indexed again
    /// Else write the directory's pin count (read when applied) to the row,
    /// while the directory and index still hold generation `gen`.
    std::uint32_t pins = 0;
    std::uint64_t gen = 0;
  };
  using catalog_row = std::pair<block_key, disk_block_info>;

  explicit disk_tier(disk_tier_config config);

  // Owner side.
  /// Queues `r` (REQUIRES: mu_ held): background requests in order; a
  /// demand read ahead of them (see fetch()).
  disk_request_id enqueue(request&& r,
                          disk_priority p = disk_priority::background);
  /// Moves the next batch into `batch` (REQUIRES: mu_ held): demand reads
  /// first, in a batch of their own, unless it is the background's turn.
  void take_batch(std::vector<request>& batch);
  /// No request queued or running. REQUIRES: mu_ held.
  [[nodiscard]] bool idle_locked() const noexcept;

  // I/O thread side.
  void run();
  void process(std::vector<request>& batch, std::vector<disk_completion>& out,
               bool last);
  void do_spill(request& r, disk_completion& c);
  void do_fetch(request& r, disk_completion& c);
  /// Queues an accessed_at update of `key` (now) adding `reads` to its
  /// access count, flushed in batches (flush_touches). I/O thread.
  void note_access(const block_key& key, std::uint64_t reads);
  void do_expire(request& r, disk_completion& c);
  /// Removes every block whose TTL ran out by `now`, pinned or not (pins
  /// protect from capacity eviction only), adding to `count`.
  [[nodiscard]] result<void> remove_expired(std::int64_t now,
                                            std::uint64_t& count);
  void do_compact(disk_completion& c, bool forced);
  /// Rebuilds the index and segments from the catalog and the files,
  /// cutting unacknowledged bytes; `rows` gets each catalogued block.
  /// On failure the index and segments are left empty, never half built.
  [[nodiscard]] result<void> load(std::vector<catalog_row>& rows);
  [[nodiscard]] result<void>
  load_files_and_rows(std::vector<catalog_row>& rows);
  /// Empties the index, segments and their accounting.
  void clear_loaded_state();
  /// At open: load(), and the directory is the catalog.
  [[nodiscard]] result<void> recover();
  /// After a failed batch: load(), reconciled with the owner's directory.
  /// accessed_at updates the batch wrote (rolled back) or had pending are
  /// pending again for the blocks still indexed, and retried.
  /// If the load fails, reload_error_ says why and the tier refuses its
  /// requests until a later reload (next batch or retry pass) succeeds.
  void reload();
  /// Whether a failure left work that a pass without requests would do:
  /// a reload, catalog repairs, a threshold compaction, or accessed_at
  /// updates whose write or commit failed.
  [[nodiscard]] bool retry_pending() const noexcept;
  /// After each pass of run(): arms, backs off or disarms the retry
  /// deadline. `retry_pass`: the pass ran because the deadline passed.
  void schedule_retry(bool retry_pass);
  /// Answers a batch while reload_error_ is set: spills, fetches and the
  /// rest fail; erase and pins wait for the reload to reconcile them.
  void refuse_batch(std::vector<request>& batch,
                    std::vector<disk_completion>& out);
  /// Writes repairs_ (start of each batch and retry pass).
  void apply_repairs();
  [[nodiscard]] result<void> make_room(std::uint64_t record_bytes);
  [[nodiscard]] std::uint64_t bytes_needed(std::uint64_t record_bytes) const;
  [[nodiscard]] result<segment_state*> active_for(std::uint64_t record_bytes,
                                                  int* err_no);
  [[nodiscard]] result<void> compact_segment(std::uint64_t id);
  /// Reads the record at `loc` of segment `s` into `dst`
  /// (segment_file::read). An I/O error is counted (io_errors) and, unless
  /// the record lies past the end of the file as it is now (`lost` set:
  /// gone for good), read once more without the mapping; a second I/O
  /// error is counted too and returned with `lost` false: the caller
  /// keeps the block.
  [[nodiscard]] result<record_header>
  read_record(const segment_state& s, const location& loc, const block_key& key,
              std::span<std::byte> dst, bool verify, bool& lost);
  /// Whether the segment's live fraction is below compaction_threshold.
  [[nodiscard]] bool below_threshold(const segment_state& s) const noexcept;
  /// Whether the active segment `s` holds more dead bytes than (1 -
  /// compaction_threshold) of the data a segment holds at most: sealed, it
  /// would be below the threshold whatever is appended to it first.
  [[nodiscard]] bool active_too_dead(const segment_state& s) const noexcept;
  /// Seals the active segment (none is active afterwards), marking it for
  /// the threshold check when it is below the threshold.
  void seal_active();
  /// Whether rows naming bytes written in this batch may be written now:
  /// under full_sync only inside the batch's transaction.
  [[nodiscard]] result<void> may_write_rows() const;
  [[nodiscard]] result<void> flush_touches();
  void remove_block(const block_key& key, removal why);
  void retire_segment(std::uint64_t id);
  /// Counts and logs a failed write; ENOSPC or EDQUOT (a full file system)
  /// sets full_ instead, `bytes` being what the write needed: spills are
  /// accepted again only once that much is free on top of min_free_bytes.
  void note_write_error(int err_no, const error& e, std::uint64_t bytes = 0);
  /// While full_: accepts spills again when the directory's file system
  /// has min_free_bytes free plus full_write_bytes_ (space freed by
  /// something else than the tier, or not enough freed by it).
  void probe_free_space();
  struct free_space_info {
    std::uint64_t bytes = 0; ///< free to unprivileged writers (f_bavail)
    bool inode = true;       ///< at least one inode free
  };
  /// The directory's file system's free space (`hook`'s when set, with an
  /// inode free unless `inode_hook` says otherwise), nullopt when statvfs
  /// fails.
  [[nodiscard]] std::optional<free_space_info>
  free_space(const std::function<std::uint64_t()>& hook,
             const std::function<bool()>& inode_hook = {}) const;
  /// Refuses a spill of `rec` bytes (and sets full_, as a failed write
  /// would) when the file system would be left with less than
  /// min_free_bytes free; unknown free space lets it through.
  [[nodiscard]] result<void> keep_min_free(std::uint64_t rec);
  /// While full_ and over capacity_bytes: evicts unpinned blocks, least
  /// recently used first, and compacts (make_room), so that the unlinks
  /// free space and let spills in again.
  void shrink_while_full();
  /// Clears full_ and logs why, once per full episode. Caller holds mu_.
  void accept_spills_again_locked(const std::string& why);
  void publish_locked();
  /// Erases `it` from dir_, recording its key when record_removals is on.
  /// Caller holds mu_.
  void erase_dir_locked(
      std::unordered_map<block_key, dir_entry, block_key_hash>::iterator it);
  [[nodiscard]] std::int64_t now_ns() const noexcept {
    return clock_->now().count();
  }
  [[nodiscard]] bool over_capacity(std::uint64_t extra) const noexcept;

  disk_tier_config config_;
  const clock_source* clock_;
  int lock_fd_ = -1;

  // Guarded by mu_.
  mutable std::mutex mu_;
  mutable std::condition_variable work_cv_;
  mutable std::condition_variable idle_cv_;
  std::deque<request> queue_;  ///< background requests, in order
  std::deque<request> demand_; ///< demand reads, in order (see fetch())
  /// Spills and erases per key in queue_: a demand read of such a key
  /// queues behind them instead of ahead.
  std::unordered_map<block_key, std::uint32_t, block_key_hash> queued_writes_;
  /// Generations of spills, queued or in the batch in progress, that a
  /// read queued after them awaits: do_spill writes such a spill even if
  /// an erase or a newer spill of its key supersedes it first, so that the
  /// read never finds an older copy. Until the spill's batch is done.
  std::unordered_set<std::uint64_t> awaited_gens_;
  /// The last batch was demand reads taken while background work waited:
  /// the next batch is background work.
  bool background_turn_ = false;
  std::vector<disk_completion> done_;
  std::unordered_map<block_key, dir_entry, block_key_hash> dir_;
  std::size_t pinned_in_dir_ = 0; ///< dir_ entries with pins > 0
  bool record_removals_ = false;
  std::vector<block_key> removed_; ///< for drain_removed()
  disk_tier_stats published_;
  std::uint64_t next_request_ = 1;
  std::uint64_t next_gen_ = 1;
  bool busy_ = false;
  bool stopping_ = false;
  bool full_ = false;
  std::uint64_t refused_full_owner_ = 0;
  std::uint64_t refused_busy_owner_ = 0;
  std::uint64_t queued_spill_bytes_ = 0; ///< spill payloads not yet written

  // I/O thread only (and open() before the thread starts).
  std::unique_ptr<catalog> catalog_;
  std::unordered_map<block_key, location, block_key_hash> index_;
  std::map<std::uint64_t, segment_state> segments_;
  std::uint64_t active_ = 0; ///< id of the segment appended to; 0 = none
  std::uint64_t next_segment_ = 1;
  std::uint64_t file_bytes_ = 0;
  std::uint64_t live_bytes_ = 0;    ///< record bytes of indexed blocks
  std::uint64_t payload_bytes_ = 0; ///< payload bytes of indexed blocks
  /// accessed_at updates not yet written: at most one per indexed block.
  std::unordered_map<block_key, touch, block_key_hash> touches_;
  /// accessed_at updates written but not committed: those written in the
  /// current batch's transaction (empty again after its commit) and, while
  /// a reload fails, those of a batch whose commit failed. reload() makes
  /// them pending again (touches_), so a failed commit loses no read.
  std::unordered_map<block_key, touch, block_key_hash> uncommitted_touches_;
  /// Work counted in stats once the batch's transaction that did it
  /// commits: compactions and accessed_at writes rolled back with a failed
  /// batch are done again by a retry, and counted then (a compact()
  /// request in that batch fails). Work done without a transaction
  /// committed as it went and is counted at once.
  struct uncommitted_counts {
    std::uint64_t compactions = 0;
    std::uint64_t compaction_bytes_moved = 0;
    std::uint64_t touch_flushes = 0;
  };
  uncommitted_counts uncommitted_counts_;
  std::chrono::steady_clock::time_point touch_deadline_{};
  /// catalog_->changes() when the batch's transaction began, and the rows
  /// its accessed_at writes changed since: a batch whose commit fails
  /// having changed no other row is rolled back without a reload.
  std::uint64_t changes_at_begin_ = 0;
  std::uint64_t touch_changes_ = 0;
  /// A commit of accessed_at updates alone failed and was logged; no
  /// commit has succeeded since (one line per episode).
  bool logged_touch_commit_ = false;
  /// The last write of touches_ failed, or the commit of the batch that
  /// wrote them: they wait for a retry, not for touch_deadline_.
  bool touch_failed_ = false;
  std::vector<std::string> unlink_after_commit_;
  std::uint64_t unlink_after_commit_bytes_ = 0;        ///< their file bytes
  std::unordered_set<std::uint64_t> written_segments_; ///< to sync in batch
  /// Segments to check for threshold compaction: those that lost blocks,
  /// those sealed below the threshold (at open, every one below it), and
  /// those whose compaction (threshold or make_room) failed or was not
  /// reached after a failure (kept until compacted or no longer below the
  /// threshold).
  std::unordered_set<std::uint64_t> shrunk_segments_;
  bool created_segment_ = false; ///< in this batch: sync the directory
  std::string no_txn_reason_;    ///< why this batch has no transaction
  /// Generations whose spill was written in the current batch: if the
  /// batch fails, their completions fail and reload() drops them.
  std::unordered_set<std::uint64_t> batch_spill_gens_;
  /// Keys of those spills, once their batch failed, until a reload
  /// succeeds: a key spilled again meanwhile loses its older copy all the
  /// same (see reload()).
  std::unordered_set<block_key, block_key_hash> failed_spill_keys_;
  /// Written at the start of the next batch or retry pass (see reload()).
  std::unordered_map<block_key, repair, block_key_hash> repairs_;
  /// Set while the state could not be reloaded after a failed batch: the
  /// index and segments are empty and each batch (or retry pass) retries
  /// the reload.
  std::string reload_error_;
  /// While retry_pending(): when the next pass without requests runs, and
  /// the delay that set it (doubled, up to max_retry_interval, after each
  /// retry pass that leaves work pending).
  bool retry_armed_ = false;
  std::chrono::steady_clock::time_point retry_deadline_{};
  nanos retry_delay_{0};
  /// While full_: the largest write that found the file system full since
  /// it filled (a spill's record, a new segment's header with it, a
  /// compaction's copy, the spills of a batch whose commit found the
  /// catalog full). The partial write is cut off again, so the free space
  /// is back where it was before it: at least min_free_bytes, and yet too
  /// little for the same write.
  std::uint64_t full_write_bytes_ = 0;
  /// While full_: the segment file bytes the tier unlinked since the last
  /// write that found the file system full. Once they reach
  /// full_write_bytes_, that write fits again (its partial bytes were cut
  /// off), and spills are accepted again without a look at the free space.
  std::uint64_t freed_while_full_ = 0;
  /// While full_: it came from the min_free_bytes reserve (keep_min_free),
  /// not a failed write, so no byte count of its own says the next spill
  /// fits: only a look at the free space lets spills in again.
  bool full_for_reserve_ = false;
  /// "full" and "accepting spills again" were logged in this full episode,
  /// which ends when a batch commits a spill: a disk that fills again
  /// before any spill got through is not logged again (stats().full shows
  /// it), so a disk hovering at its limit logs once, not at every look.
  bool logged_full_ = false;
  bool logged_accept_ = false;
  /// The errno of the other write errors logged since a spill last got
  /// through (one line each kind per episode, with its remedy: no file
  /// descriptor left failed every spill with the same line before).
  std::vector<int> logged_write_errnos_;
  disk_tier_stats io_stats_;

  std::thread io_thread_;
};

} // namespace kvfleet::engine
