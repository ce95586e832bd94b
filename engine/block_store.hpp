#pragma once
/// The single-node KV block store: the engine.
///
/// Composes a memory backend (bytes), a slab block pool (slots), a block
/// index (key -> entry), one eviction policy per size partition, codecs and
/// checksums. Blocks form prefix chains: every block but the first of a
/// request names its parent, and longest-prefix lookup walks keys in order
/// until the first miss.
///
/// Block state machine:
///   free --reserve--> reserved --write--> written --commit--> committed
///   reserved|written --abort--> free
///   committed --evict|expire|corrupt--> free (when evictable, else "dead":
///             invisible to lookups and removed once it becomes evictable)
/// Readers only ever see committed blocks.
///
/// Invariants (check_invariants() verifies them):
///   - a block is evictable iff committed, a leaf (no cached or reserved
///     child), unpinned and unleased; only evictable blocks are evicted or
///     demoted, so eviction is leaf-first and never frees bytes under a
///     reader;
///   - pool used bytes == sum of live blocks' slot bytes;
///   - per-codec and per-partition byte counts match the blocks.
///
/// Space: when a reservation would take the pool above the high watermark
/// (or no slot of the needed size is free), the store first demotes cold
/// blocks in place (adaptive compression: none -> int8 -> int4, by access
/// count), then evicts, until usage is at the low watermark. A size
/// partition above its share of capacity gives up space first. When the
/// size needed (a put's, or a demotion's) finds no slot and no free slab,
/// the store first moves the blocks of another size class's sparsest slab
/// into that class's other slabs and takes the slab (compaction;
/// committed, unleased blocks only, and only in an arena that can copy
/// within itself).
///
/// Disk tier (optional, attach_disk()): a block evicted for space is spilled
/// to disk instead of vanishing (its encoded bytes, codec and checksum; the
/// disk tier's I/O thread writes it), and process() promotes a prefix found
/// on disk back into memory: it reserves slots, the I/O thread reads into
/// them (into a host staging buffer per block when the arena is device
/// memory, which the owner then writes to the slot), and the owner commits
/// them; the checksum is verified at the block's first read. A block that
/// fails on disk is recomputed instead, never returned wrong. Pinned blocks
/// are written through to disk with their pin, so pins survive a restart;
/// persist() writes every cached block for a clean shutdown.
/// The block calls reach the disk too: acquire() and pin() of a block only
/// on disk, and reserve() of a block whose parent is only there (lookup()
/// callers count disk blocks as cached and extend them), bring that one
/// block back and wait, as process() does, for that read without a bound
/// (a line on stderr every 30 s). Those reads are demand reads: they go
/// ahead of the spills and prefetches queued before them, and the wait is
/// for them alone (disk_tier::wait_done); promote()'s reads are background
/// reads, queued behind them. The disk tier does not record
/// a block's parent, so it comes back as a chain root (a block in memory needs
/// its parent in memory, and this one's is unknown): it is evictable on its
/// own, leaf-first as ever. The first put or promotion that names its parent
/// (process() walking the chain, a host's put of the same block) links it under
/// that parent, so a chain brought back later is whole again and is evicted
/// leaf-first from its end. A trip through the memory tier keeps such a block
/// unlinked until then. The disk tier records each block's size partition
/// (disk format version 2), so every promotion (process(), promote(),
/// acquire(), pin(), a put's parent) brings a block back into the partition
/// it was put in, as the memory tier does: a long document's block read back
/// from disk does not count against the short prompts' budget. A block of a
/// version 1 directory has no partition recorded: acquire() and pin() bring
/// it back into the short partition, a put's parent into the put's, and
/// process() and promote() into the request's. The tier records each
/// block's request priority too (disk format version 3): a block comes back
/// at the higher of the recorded priority and the asking call's (process(),
/// promote(); a hit in memory takes the request's if higher), and at the
/// recorded one for acquire(), pin() and a put's parent, which have no
/// request priority (the memory tier keeps a block's priority the same
/// way). A block of a version 1 or 2 directory has none recorded and counts
/// as normal, the default of a put. An eviction rewrites a disk copy whose
/// recorded priority is not the block's (raised since its spill, or
/// unknown), although its bytes are the same.
///
/// Memory tier (optional, attach_tier(); engine/memory_tier.hpp): pinned
/// host memory under a device arena. demote_to_tier() (the GPU memory
/// manager calls it under pressure) moves cold blocks there in the
/// background: the lowest request priority first, then each partition's
/// eviction order picks them, a leaf first and then any parent whose
/// children all leave with it; a block stays
/// readable while its bytes are copied (a lease keeps it in place) and
/// leaves the arena when poll_tier() sees its copy finished, unless it was
/// read, pinned or extended meanwhile (then it stays, the copy is
/// dropped). process() and promote() bring blocks found there back: slots
/// are reserved, one batch copies them in, and they are committed with
/// their checksum (verified at the first read, as from disk). A full tier
/// drops its oldest blocks, spilling them to the disk tier when there is
/// one. A block in the tier is still this store's for on_block_event:
/// "removed" comes when it leaves the tier, not when it enters it.
///
/// Errors are values: no public call throws or aborts on bad input. A failed
/// put leaves nothing behind.
///
/// Thread safety: none. One owner (an engine actor) calls everything.
/// Leases and put handles must not outlive the store.

#include "engine/block_index.hpp"
#include "engine/block_key.hpp"
#include "engine/block_pool.hpp"
#include "engine/clock.hpp"
#include "engine/codec.hpp"
#include "engine/disk/disk_tier.hpp"
#include "engine/eviction_policy.hpp"
#include "engine/kv_namespace.hpp"
#include "engine/kv_producer.hpp"
#include "engine/memory_backend.hpp"
#include "engine/memory_tier.hpp"
#include "engine/result.hpp"
#include "engine/stats.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace kvfleet::engine {

class block_store;

/// What on_block_event reports.
enum class block_event : std::uint8_t { stored, removed };

/// Index of a registered namespace in its store.
struct ns_id {
  std::uint16_t value = 0;
  friend bool operator==(const ns_id&, const ns_id&) = default;
};

/// Access counts that decide how far adaptive compression may demote a
/// block: more than `precise_above` accesses keeps it as stored, more than
/// `int8_above` no lower than int8, otherwise int4. `int8_above` above
/// `precise_above` is refused (errc::invalid_argument); equal ones skip int8.
struct compression_thresholds {
  std::uint32_t precise_above = 10;
  std::uint32_t int8_above = 3;
};

struct namespace_options {
  codec default_codec = codec::none; ///< codec new blocks are stored in
  bool adaptive_compression = true;  ///< may demote cold blocks
  compression_thresholds thresholds{};
  nanos ttl{0}; ///< default time to live; 0 or over 100 years = none
};

/// Request-length classes with their shares of capacity. Requests below
/// `medium_from` tokens are short, below `long_from` medium, the rest long.
struct partition_config {
  std::uint32_t medium_from = 2048;
  std::uint32_t long_from = 4096;
  std::array<double, partition_count> shares{0.3, 0.3, 0.4};
};

struct store_config {
  std::size_t capacity_bytes = 0; ///< arena size (host backend)
  /// Slab size; 0 picks capacity / 64 clamped to [1 MiB, 256 MiB] and
  /// rounded to the slot alignment, then fits it to the first namespace
  /// registered: when its full-size blocks would leave more than a
  /// sixteenth of it unused (before, a 160 MiB block in a 256 MiB slab
  /// left 37.5% of the arena unused while the watermarks counted it free)
  /// or are larger than it (before, refused), it becomes the whole number
  /// of them with which the arena holds the most (the larger on a tie),
  /// never below the default unless the arena is one slab, so later
  /// namespaces' blocks that fit the default still fit. The largest value
  /// must fit one slab.
  /// Compression (and a second namespace of another block size) works in
  /// whole slabs: a store of fewer than about ten slabs (under 10 MiB with
  /// the default) seldom frees one by demoting, and evicts instead; give
  /// such a small store a slab of a few blocks.
  std::size_t slab_bytes = 0;
  double high_watermark = 0.9;
  double low_watermark = 0.8;
  policy_kind policy = policy_kind::adaptive;
  partition_config partitions{};
  bool adaptive_compression = true; ///< master switch
  /// The make-room path on a put (the high watermark) evicts the lowest
  /// request priority first, of any size partition (the one furthest over
  /// its share among those holding it), then in the policy's order within
  /// it, instead of the policy's order across priorities in the put's
  /// partition. A partition within its share gives to another's put only
  /// while no partition is over its share, and only blocks of a priority
  /// lower than any the put's partition holds. Demotion still comes first.
  /// The engine actor sets it: its memory manager's rule (low priority
  /// first above 0.9) would otherwise never act, since this path keeps
  /// the pool from passing its high watermark (0.9 too).
  bool lowest_priority_first = false;
  /// Demotions a make-room pass tries before it evicts; blocks it passes
  /// over (being read or copied to the memory tier, or with no smaller slot
  /// free) count one sixteenth each. 0: no demotion.
  std::size_t demotion_scan_limit = 256;
  /// At most this fraction of the arena's bytes (slot bytes) may be held by
  /// pins, in (0, 1]: the pinned blocks and the blocks they chain from,
  /// which leaf-first eviction keeps in memory for them, each counted once
  /// (block_store::pin_held_bytes()). A pin past it is refused with
  /// errc::out_of_memory and changes nothing: pin(), the commit of a put
  /// with put_options::pin (checked at its reserve too, before making room
  /// for it), and process() or put_tokens() with a pin, which are refused
  /// before they start when pinning every block they cover could pass it
  /// (each block not pinned yet at the larger of the slot it would come
  /// back into and the put's codec's; a call that adds no pin, a repeat of
  /// one pinned already, is never refused).
  /// Without a limit, pins could fill the arena so that every later put is
  /// refused for good (pins outlive a restart with a disk tier). Pins a
  /// block's disk copy holds (pinned before a restart) are counted but
  /// never refused, also when the block is computed again because the copy
  /// cannot be read, so lowering the limit refuses new pins only.
  double max_pinned_fraction = 0.5;
  const clock_source* clock = nullptr; ///< default: steady clock
  /// Belady only: tick of the next use of a key after the current access.
  /// Should not throw: it runs inside commit() and every access. One that
  /// throws is taken as "never used again" for that key (the block is the
  /// first to go), logged once on stderr; the call goes on.
  std::function<std::uint64_t(const block_key&)> next_use;
  /// Called on the owner's thread when a block becomes visible (stored) or
  /// leaves memory (removed: evicted, expired, dropped as corrupt), e.g. to
  /// feed a cluster-wide prefix index. A block that expires while held (a
  /// pin, a lease, a cached child keeps it in memory, never served again)
  /// is removed then, once: not again when it leaves memory, and stored
  /// again if a put brings it back. Must not call back into the store,
  /// and must not throw: it runs inside the store's calls (an eviction that
  /// makes room for a put, a commit), which would be left half done.
  std::function<void(block_event, const block_key&)> on_block_event;
};

/// Options of one put.
struct put_options {
  /// A block ranks (priority policy) at the highest priority of the puts
  /// and process() calls that covered it, matched prefixes included. A
  /// value outside the five is errc::invalid_argument (check_priority).
  priority prio = priority::normal;
  std::optional<codec> codec_override; ///< default: the namespace's codec
  /// Default: the namespace's TTL. 0 or over 100 years = none.
  std::optional<nanos> ttl;
  std::uint32_t request_tokens = 0; ///< picks the size partition
  /// Pinned blocks are never evicted. Every block the put covers ends
  /// pinned, those already cached included (process(): the matched
  /// prefix too); a block already pinned gets no second pin. Refused
  /// (errc::out_of_memory) past store_config::max_pinned_fraction.
  bool pin = false;
};

/// RAII read lease: while it lives, its block is neither evicted nor
/// demoted. Move-only.
class read_lease {
public:
  read_lease() = default;
  read_lease(read_lease&& other) noexcept { *this = std::move(other); }
  read_lease& operator=(read_lease&& other) noexcept;
  read_lease(const read_lease&) = delete;
  read_lease& operator=(const read_lease&) = delete;
  ~read_lease() { release(); }

  [[nodiscard]] bool valid() const noexcept { return store_ != nullptr; }
  [[nodiscard]] const block_key& key() const noexcept { return key_; }
  void release() noexcept;

private:
  friend class block_store;
  read_lease(block_store* s, std::uint32_t id, const block_key& key)
      : store_(s), id_(id), key_(key) {}
  block_store* store_ = nullptr;
  std::uint32_t id_ = 0;
  block_key key_{};
};

/// Two-phase put handle: reserve -> write -> commit, or abort. Dropping an
/// open handle aborts the put. Move-only.
class put_handle {
public:
  put_handle() = default;
  put_handle(put_handle&& other) noexcept { *this = std::move(other); }
  put_handle& operator=(put_handle&& other) noexcept;
  put_handle(const put_handle&) = delete;
  put_handle& operator=(const put_handle&) = delete;
  ~put_handle();

  /// True when the key was already cached: write and commit then do nothing
  /// but validate, and commit counts as an access, sets the block's expiry
  /// to the reserve time + the put's TTL (as a cache's SET does; none when
  /// the put has none) and pins the block when the put asked for a pin. A
  /// block that expired (before the reserve or since) and is still held
  /// comes back at the commit, never at the reserve: an aborted put
  /// changes nothing. The open put holds the cached block as a lease does
  /// (not evicted, demoted or moved) until it is committed, aborted or
  /// dropped, so its commit finds it.
  [[nodiscard]] bool already_cached() const noexcept { return duplicate_; }
  [[nodiscard]] const block_key& key() const noexcept { return key_; }

private:
  friend class block_store;
  enum class phase : std::uint8_t { none, open, committed, aborted };
  block_store* store_ = nullptr;
  std::uint32_t id_ = 0;
  std::uint32_t generation_ = 0;
  std::int64_t started_ = 0; ///< reserve time, for the put latency histogram
  block_key key_{};
  phase phase_ = phase::none;
  /// A promotion's: the accesses the block had when it left memory, and
  /// its disk copy's pins (nested pins come back nested).
  std::uint32_t restored_count_ = 0;
  std::uint32_t restored_pins_ = 0;
  /// A promotion's from its disk copy, whose pins at the commit are the
  /// block's (restored_pins_ and pin_on_commit are the copy's at the
  /// read's start).
  bool from_disk_copy_ = false;
  bool duplicate_ = false;
  bool written_ = false;
  bool pin_ = false; ///< duplicate put with pin: pin the cached block
  /// Duplicate put: its priority, which the cached block takes if higher.
  priority prio_ = priority::background;
  /// Duplicate put: the parent it names, which a block brought back from
  /// disk alone is linked under at the commit (block_store::adopt()).
  block_key parent_{};
  /// Duplicate put: the expiry its commit gives the cached block (steady
  /// nanoseconds, 0 = never) when `sets_expiry_`.
  std::int64_t expires_at_ = 0;
  /// A put's (reserve(); and a promotion that failed and whose block the
  /// request computed instead), not a promotion's from the memory tier or
  /// disk: its commit gives the block its expiry (a duplicate put's, see
  /// above) and matches the disk copy's to it (match_disk_copy_expiry()).
  bool sets_expiry_ = false;
};

/// What process() did with one request.
struct process_result {
  std::size_t matched_blocks = 0; ///< memory, tier and disk hits together
  std::size_t tier_blocks = 0;    ///< of matched_blocks, from the memory tier
  std::size_t disk_blocks = 0;    ///< of matched_blocks, promoted from disk
  /// Of matched_blocks, the leading ones found in memory, before the first
  /// brought back from the tier or disk (blocks in memory after that one
  /// count in matched_blocks only).
  std::size_t memory_blocks = 0;
  std::size_t computed_blocks = 0;
  /// Of computed_blocks, those this call did not cache: from the first
  /// block it could not reserve (no room: the pool full of pinned, leased
  /// or chained blocks; or another put of that block still open) to the
  /// end of the request. The producer computes them too (into a scratch
  /// buffer): its time is spent, as a host's prefill would be.
  std::size_t uncached_blocks = 0;
  std::size_t matched_tokens = 0;  ///< prompt tokens served from cache
  std::size_t computed_tokens = 0; ///< prompt tokens the producer computed
  nanos prefill_saved{0};          ///< producer cost of the matched tokens
};

class block_store {
public:
  /// A store over a host arena of config.capacity_bytes.
  [[nodiscard]] static result<std::unique_ptr<block_store>>
  create(const store_config& config);
  /// A store over `backend`'s arena (config.capacity_bytes is ignored).
  /// Its slab records take about 84 bytes of host memory per slab; when
  /// the host has not that much, errc::out_of_memory.
  [[nodiscard]] static result<std::unique_ptr<block_store>>
  create(const store_config& config, std::unique_ptr<memory_backend> backend);

  ~block_store();
  block_store(const block_store&) = delete;
  block_store& operator=(const block_store&) = delete;

  /// Registers a namespace; registering an equal spec again with the same
  /// options returns the same id, with other options it is
  /// errc::namespace_conflict. A value larger than a slab is
  /// errc::value_too_large. The store reserves its bookkeeping for as many
  /// blocks as the arena holds (some hundred bytes of host memory each, for
  /// at most 2^26 blocks); when the host has not that much,
  /// errc::out_of_memory.
  [[nodiscard]] result<ns_id>
  register_namespace(const namespace_spec& spec,
                     const namespace_options& options = {});
  [[nodiscard]] result<const namespace_spec*> spec(ns_id ns) const;

  /// Number of leading `keys` cached (longest prefix), in memory and then
  /// in the memory tier (not on disk: lookup_tiers() goes on there and
  /// tells the tiers apart). No access is recorded and no block moves;
  /// an expired block it meets is removed then (counted in expirations,
  /// reported to on_block_event), as every call that finds one does.
  /// Counts block hits and misses.
  [[nodiscard]] result<std::size_t> lookup(ns_id ns,
                                           std::span<const block_key> keys);

  /// Longest cached prefix of `keys`, leased and recorded as accessed: in
  /// memory, then in the memory tier, whose blocks are brought back first
  /// (as lookup() counts them; not on disk). Replaces the contents of
  /// `out` with one lease per matched block.
  [[nodiscard]] result<std::size_t>
  acquire_prefix(ns_id ns, std::span<const block_key> keys,
                 std::vector<read_lease>& out);
  /// Lease of one cached block (brought back from the memory tier when it
  /// is there, or read back from the disk tier when only there, into the
  /// size partition it was put in: see the class comment);
  /// errc::not_found when absent. One in the memory tier or on disk that
  /// memory has no room for (every slot pinned, leased or being put) is
  /// that reservation's error (errc::out_of_memory, say), saying the block
  /// is there but could not be brought back; pin(), and reserve() for a
  /// parent, likewise (before, all three said "not cached"). A block
  /// damaged on disk is leased like any other and caught by read(), which
  /// verifies it.
  [[nodiscard]] result<read_lease> acquire(ns_id ns, const block_key& key);

  /// Codec and stored size of a leased block; errc::invalid_handle for an
  /// empty lease or one from another store.
  [[nodiscard]] result<codec> stored_codec(const read_lease& lease) const;
  [[nodiscard]] result<std::size_t> stored_bytes(const read_lease& lease) const;

  /// Verifies the leased block's checksum and decodes it into `out`
  /// (namespace dtype, value_bytes()). A checksum mismatch drops the block,
  /// counts it, zeroes `out` and returns errc::checksum_mismatch.
  [[nodiscard]] result<void> read(const read_lease& lease,
                                  std::span<std::byte> out);
  /// Copies the stored (encoded) bytes after verifying the checksum.
  [[nodiscard]] result<void> read_raw(const read_lease& lease,
                                      std::span<std::byte> out);

  /// Phase one of a put: claims space for block `key` whose parent is
  /// `parent` (null for the first block of a chain). The parent must be
  /// cached or reserved in the same namespace (errc::not_found otherwise);
  /// a parent in the memory tier is brought back with its chain, one only
  /// on disk alone (waiting for that read, a demand read; see the class
  /// comment). errc::busy when another put of the key is open;
  /// errc::invalid_argument when `parent` is `key` itself. A key that bringing
  /// the parent back brought back too (it was in the parent's chain in the
  /// memory tier) is cached now: the put is a duplicate of it, as for any
  /// cached key.
  [[nodiscard]] result<put_handle> reserve(ns_id ns, const block_key& key,
                                           const block_key& parent,
                                           const put_options& options = {});
  /// Phase two: stores the uncompressed value (spec.value_bytes() bytes of
  /// the namespace dtype), encoded with the put's codec. A write that fails
  /// after it reached the block's slot leaves the put unwritten, also
  /// after an earlier write succeeded (commit: errc::not_written until a
  /// write succeeds): the slot may hold part of the failed value.
  [[nodiscard]] result<void> write(put_handle& handle,
                                   std::span<const std::byte> value);
  /// Phase two, producer variant: the producer writes the value. A
  /// producer that throws is errc::backend_error with what it threw
  /// (errc::out_of_memory for std::bad_alloc: engine/host_error.hpp), and
  /// the put stays open (abort it), as after a producer's error value;
  /// unwritten, as after write(), when the producer wrote into the slot.
  [[nodiscard]] result<void> write_from(put_handle& handle,
                                        kv_producer& producer);
  /// Makes the block visible. errc::not_written before write,
  /// errc::double_commit and errc::commit_after_abort as named; errc::busy
  /// (the put stays open) while its parent is reserved and not committed
  /// yet: a chain commits from its first block. A duplicate put
  /// (already_cached()) whose block failed its checksum and was dropped
  /// while the put was open is errc::checksum_mismatch (the put is over:
  /// put the block again).
  [[nodiscard]] result<void> commit(put_handle& handle);
  /// Frees the reservation. Aborting twice, or after commit, is an error.
  /// Open puts chained from this one (children reserved on it) are aborted
  /// with it, and their handles turn stale (errc::invalid_handle); dropping
  /// an open handle does the same.
  [[nodiscard]] result<void> abort(put_handle& handle);

  /// Token-level put: stores the KV of `tokens`, which must be a whole
  /// number of blocks (errc::misaligned_tokens otherwise); `values` holds
  /// one uncompressed value per block, in order (errc::wrong_value_size
  /// otherwise). Blocks already cached are skipped. All or nothing: if any
  /// block cannot be stored, none of this call's blocks is, and the cached
  /// prefix it matched is left as it was (priority, recency; no lookup is
  /// counted). A put whose new blocks need more than its size partition
  /// could get at most (the free bytes, its own unpinned blocks but its
  /// cached prefix, the others' bytes over their shares, or with
  /// lowest_priority_first all the others' unpinned blocks) is
  /// errc::out_of_memory at once, evicting nothing: its blocks are all
  /// reserved before any commits, so it would evict, then fail (one that
  /// passes this bound can still fail so, rarely: free bytes in slots of
  /// another size count in it, and so do blocks a pinned block's chain
  /// holds). Returns how many
  /// blocks were added (not those already cached, in the matched prefix or
  /// after it).
  [[nodiscard]] result<std::size_t>
  put_tokens(ns_id ns, std::span<const std::uint32_t> tokens,
             std::span<const std::byte> values,
             const put_options& options = {});
  /// Token-level lookup: how many leading tokens of `tokens` are cached (a
  /// multiple of the block size; a trailing partial block is never cached).
  /// Both token calls return errc::out_of_memory when the keys of `tokens`
  /// do not fit in memory.
  [[nodiscard]] result<std::size_t>
  lookup_tokens(ns_id ns, std::span<const std::uint32_t> tokens);

  /// Looks up the prefix, computes the missing blocks with `producer`,
  /// commits them and returns what was matched and computed. `keys` are the
  /// request's full blocks, one each: exactly input_tokens / block_tokens
  /// of the namespace (`input_tokens`, its prompt length, may end in a
  /// partial block, which is never cached). Any other count, more keys or
  /// fewer, is refused before anything is looked up
  /// (errc::misaligned_tokens giving both numbers; counted as a rejected
  /// request). A request that fails later (the producer, a write) keeps the
  /// blocks it committed before, but not the pins it gave them with
  /// put_options::pin: the caller, told only of the failure, has none to
  /// unpin.
  [[nodiscard]] result<process_result>
  process(ns_id ns, std::span<const block_key> keys, std::size_t input_tokens,
          kv_producer& producer, const put_options& options = {});
  /// Takes back the pins the last process() with put_options::pin added
  /// (its blocks that were not pinned before it), for a caller that will
  /// not tell its requester of them: the engine actor, when the request
  /// finished after its caller stopped waiting. Call it right after that
  /// process(), before other calls pin or unpin; the next process()
  /// forgets them, one that fails too. Returns how many blocks it
  /// unpinned.
  std::size_t unpin_last_process();
  /// Appends the keys of the pins the last process() added (as
  /// unpin_last_process() would take back) to `out`: for a caller that
  /// must take them back later, after other process() calls (the engine
  /// actor's batch, which fails whole).
  void last_process_pins(std::vector<block_key>& out) const;

  /// Puts a disk tier below memory; the store owns it from now on. Evicted
  /// blocks spill to it and process() promotes from it. The tier's blocks
  /// must be of this store's namespaces to be found (keys include the
  /// namespace). Attaching twice is errc::invalid_argument.
  [[nodiscard]] result<void> attach_disk(std::unique_ptr<disk_tier> tier);
  [[nodiscard]] disk_tier* disk() noexcept { return disk_.get(); }
  /// Leading blocks of `keys` in memory, then how many more follow in the
  /// memory tier and on disk (or in memory again: a block brought back
  /// from disk alone, and those put under it, follow blocks only on disk),
  /// tier and disk runs alternating as they come (a parent spilled to disk
  /// while its child stayed in the tier): the prefix a request would match
  /// (process() promotes those runs in the same order and matches them
  /// all). Counts one lookup, as
  /// lookup() does, whose block hits are all of them (README "Stats"); no
  /// access is recorded and no block moves (an expired block met is
  /// removed, as by lookup()). No I/O: the disk tier's directory is in
  /// memory.
  struct tier_prefix {
    std::size_t memory = 0;
    std::size_t tier = 0;
    std::size_t disk = 0;
  };
  [[nodiscard]] result<tier_prefix>
  lookup_tiers(ns_id ns, std::span<const block_key> keys);
  /// Writes every cached block (in memory and in the memory tier) that is
  /// not on disk yet and waits (at most `timeout`) until the disk tier has
  /// them: a clean shutdown. It queues at most the tier's max_queued_bytes
  /// of spills ahead of the disk and waits for it in between, so the tier
  /// does not refuse the rest as busy. Returns how many cached blocks the
  /// disk tier holds then (those it refused or failed to write are not
  /// counted, and are in stats().spill_failures); errc::invalid_argument
  /// without a disk tier or for a negative timeout, errc::io_error on
  /// timeout. A timeout over 100 years (nanos::max()) means no bound.
  [[nodiscard]] result<std::size_t>
  persist(nanos timeout = std::chrono::seconds(60));
  /// Brings the blocks of `keys` that follow its cached prefix in the memory
  /// tier back into memory (one copy batch; it waits for that copy, which
  /// takes microseconds), then starts promoting the blocks that follow on
  /// disk, without waiting: slots are reserved and the disk tier's I/O thread
  /// reads into them. The blocks become visible when poll_disk() collects
  /// the answers (a block that fails its checksum on disk is dropped and
  /// counted, never served). Returns how many blocks came back from the
  /// memory tier plus how many disk reads started (a block already in
  /// memory after one only on disk is linked, not read, and not counted;
  /// before, it was). This is
  /// the path for an owner that must not wait (an actor: it polls when the
  /// tier's on_completion hook tells it to); process() promotes and waits.
  /// The reads are background work at the disk tier (behind the demand
  /// reads of requests); a process() of their keys that comes before they
  /// land waits for them, and makes them demand reads
  /// (disk_tier::expedite), so it waits no longer than for its own.
  ///
  /// With `hold` (not 0: a token of the caller's), the blocks it brings
  /// back stay leased (not evicted, demoted or moved) until
  /// release_held(hold): the memory tier's at once, the disk's as they
  /// land (at whichever call collects the disk tier's answers). For an
  /// owner that serves a request once its reads have landed (the engine
  /// actor's deferred requests): before, the calls in between could evict
  /// them first (the lowest priority goes first, and a deferred request is
  /// of low priority), and the request read or computed them again. Calls
  /// with one token add up.
  [[nodiscard]] result<std::size_t> promote(ns_id ns,
                                            std::span<const block_key> keys,
                                            const put_options& options = {},
                                            std::uint64_t hold = 0);
  /// Lets go of every block promote() holds for `hold` (none: nothing),
  /// including those of its reads still on their way (they land unheld).
  void release_held(std::uint64_t hold) noexcept;
  /// Blocks promote() holds, all tokens together (a block held for two
  /// counts twice).
  [[nodiscard]] std::size_t held_blocks() const noexcept;
  /// Collects the disk tier's finished requests: commits promotions that
  /// arrived, counts spill failures. process(), promote(), reserve(),
  /// put_tokens() and evict_bytes() call it too (at their start), so the
  /// tier's answers to the spills of a store that is only put to do not
  /// pile up.
  void poll_disk();
  /// Promotions started by promote() and not yet collected.
  [[nodiscard]] std::size_t pending_promotions() const noexcept {
    return pending_promotions_.size();
  }
  /// The chain of the last promote() call that left promotions to collect
  /// (its reads, or blocks it links), while any is pending: each call's
  /// chain is numbered, in call order. None when nothing is pending.
  [[nodiscard]] std::optional<std::uint64_t>
  last_promotion_chain() const noexcept {
    if (pending_promotions_.empty())
      return std::nullopt;
    return pending_promotions_.back().group;
  }
  /// Whether poll_disk() has collected every promote() chain up to and
  /// including `chain` (landed or failed: chains finish in call order), so
  /// that process() of their keys waits for none of them.
  [[nodiscard]] bool
  promotions_done_through(std::uint64_t chain) const noexcept {
    return pending_promotions_.empty() ||
           pending_promotions_.front().group > chain;
  }
  /// The chain of the pending promote() promotion of `key` (a read on its
  /// way, or a block to link), none when no pending one is of it. Linear
  /// in pending_promotions().
  [[nodiscard]] std::optional<std::uint64_t>
  promotion_chain_of(const block_key& key) const noexcept;

  /// Puts a memory tier below the arena (see the class comment); `make` is
  /// called with the store's memory backend. Returns false when `make`
  /// returns no tier (none for this arena). Attaching twice is
  /// errc::invalid_argument; `make`'s error is returned as is, and what it
  /// throws as an error value (errc::out_of_memory for bad_alloc, else
  /// errc::backend_error with what()).
  [[nodiscard]] result<bool> attach_tier(const memory_tier_factory& make);
  [[nodiscard]] memory_tier* tier() noexcept { return tier_.get(); }
  /// Starts moving evictable blocks to the memory tier until about `bytes`
  /// of slots are on their way (lowest priority first whatever the policy,
  /// then in the policy's order, as evict_bytes(); pinned, leased and
  /// expired blocks stay). Returns the slot bytes whose copy
  /// started; they are freed when poll_tier() sees it finish. Stops early,
  /// without an error, when the tier's staging is busy or it has no room it
  /// can make, or at a block larger than the tier takes in one copy
  /// (memory_tier::max_batch_bytes: stats().tier_too_large, and one line on
  /// stderr the first time). Costs as evict_bytes(). errc::invalid_argument
  /// without a tier.
  [[nodiscard]] result<std::size_t> demote_to_tier(std::size_t bytes);
  /// Finishes the demotions whose copies are done: frees their slots. Never
  /// waits. demote_to_tier(), process() and promote() call it too, and so
  /// does a put that finds no room before it evicts anything.
  void poll_tier();
  /// Slot bytes being demoted now (still taken until poll_tier()).
  [[nodiscard]] std::size_t tier_bytes_in_flight() const noexcept {
    return tier_in_flight_;
  }
  /// Blocks in the memory tier.
  [[nodiscard]] std::size_t tier_block_count() const noexcept {
    return tier_index_.size();
  }
  /// Whether a key is in the memory tier (and not expired).
  [[nodiscard]] bool in_tier(ns_id ns, const block_key& key) const;

  /// Pinned blocks are never evicted or demoted. Pins nest. With a disk
  /// tier a pinned block is written through to disk with its pin. Pinning a
  /// block in the memory tier brings it back first, and so does pinning one
  /// only on disk (it waits for that read, a demand read, and lands in
  /// its own size partition, see the class comment), so a pinned block is
  /// always in memory. Unpinning a block only on disk (pinned there before
  /// a restart) unpins its disk copy. Pinning a block that is not pinned
  /// yet past store_config::max_pinned_fraction is errc::out_of_memory
  /// (a nested pin adds no bytes and is never refused).
  [[nodiscard]] result<void> pin(ns_id ns, const block_key& key);
  [[nodiscard]] result<void> unpin(ns_id ns, const block_key& key);
  /// Expiry marks the store keeps (a heap of them, for making room from
  /// expired blocks first): at most about twice the blocks with a TTL, once
  /// stale and repeated ones are dropped.
  [[nodiscard]] std::size_t expiry_marks() const noexcept {
    return expiry_heap_.size();
  }
  /// Slot bytes of the blocks in memory that are pinned (dead ones a
  /// reader still holds included), and the most they may take.
  [[nodiscard]] std::size_t pinned_bytes() const noexcept {
    return pinned_bytes_;
  }
  [[nodiscard]] std::size_t pinned_bytes_limit() const noexcept {
    return pin_limit_bytes_;
  }
  /// Slot bytes pins hold in memory: the pinned blocks and every block a
  /// pinned one chains from (evicted only after it: leaf-first). What
  /// store_config::max_pinned_fraction limits.
  [[nodiscard]] std::size_t pin_held_bytes() const noexcept {
    return pin_held_bytes_;
  }

  /// Evicts expired blocks now (lookups also skip them lazily). Returns how
  /// many expired: removed, or, when a reader or a cached child holds one,
  /// dead (never served again) and removed once released. Walks every
  /// block. Making room (a put that needs it, evict_bytes) also takes the
  /// expired blocks first, from a heap of expiries, before it evicts or
  /// compresses any live block.
  std::size_t expire();
  /// Evicts evictable blocks until `bytes` are freed or none is left:
  /// first every block whose TTL has run out, then
  /// the lowest request priority first, whatever the policy (so under
  /// memory pressure a prefetch's or warm-up's blocks go before a normal
  /// request's), and within a priority in the policy's order, from the
  /// partition furthest over its share. Returns bytes freed (a dead parent
  /// freed with its last child counts too). Cost: O(log blocks) per block
  /// evicted, whatever the mix of priorities (the policies keep their
  /// order per priority); nothing is walked. Memory managers call it once
  /// per excursion over their threshold, not per request.
  std::size_t evict_bytes(std::size_t bytes);

  [[nodiscard]] const store_stats& stats() const noexcept { return stats_; }
  [[nodiscard]] std::size_t block_count() const noexcept {
    return index_.size();
  }
  [[nodiscard]] std::size_t used_bytes() const noexcept {
    return pool_.used_bytes();
  }
  [[nodiscard]] std::size_t capacity_bytes() const noexcept {
    return pool_.capacity_bytes();
  }
  /// Blocks the per-block tables (entries, index, policies) hold before
  /// they grow. register_namespace() sizes them for the blocks of its
  /// smallest encoding the arena holds, but at most one per 4 KiB of arena
  /// (a block's bookkeeping takes a few hundred bytes); past that they
  /// grow as the store fills (doubling: a put then allocates, rarely).
  [[nodiscard]] std::size_t reserved_blocks() const noexcept;
  [[nodiscard]] const store_config& config() const noexcept { return config_; }
  /// The memory backend's name: "host", "cuda:0", ...
  [[nodiscard]] std::string_view memory_name() const noexcept {
    return backend_->name();
  }
  /// True when the host addresses the arena directly; false for device
  /// memory, whose reads and writes are copies that wait for the device.
  [[nodiscard]] bool host_addressable() const noexcept {
    return backend_->host_data() != nullptr;
  }
  /// Whether a key is cached and visible (committed, not expired).
  [[nodiscard]] bool contains(ns_id ns, const block_key& key) const;
  /// Whether the disk tier holds a copy of `key` a request could use now
  /// (of namespace `ns`, whole, not expired on the tier's clock), stored or
  /// with its spill queued; false without a disk tier. No I/O.
  [[nodiscard]] bool on_disk(ns_id ns, const block_key& key) const;
  /// Codec a cached block is stored in (for tests and tools).
  [[nodiscard]] result<codec> codec_of(ns_id ns, const block_key& key) const;
  /// Test hook: flips one byte of a block's stored bytes (host backend).
  [[nodiscard]] result<void> corrupt_for_testing(ns_id ns, const block_key& key,
                                                 std::size_t offset);

  /// Aborts when an invariant is broken. O(blocks).
  void check_invariants() const;

private:
  friend class read_lease;
  friend class put_handle;
  struct entry;
  struct ns_state;

  block_store(const store_config& config,
              std::unique_ptr<memory_backend> backend, block_pool pool);

  [[nodiscard]] nanos now() const noexcept { return clock_->now(); }
  /// Counts a call that returns an error (stats().rejected_requests),
  /// unless the store made the call itself inside another public call:
  /// each public call counts once, and only when it fails.
  void count_rejected() noexcept {
    if (nested_ == 0)
      ++stats_.rejected_requests;
  }
  /// Marks the calls made while it lives as the store's own.
  class nested_scope {
  public:
    explicit nested_scope(block_store& s) noexcept : s_(s) { ++s_.nested_; }
    ~nested_scope() { --s_.nested_; }
    nested_scope(const nested_scope&) = delete;
    nested_scope& operator=(const nested_scope&) = delete;

  private:
    block_store& s_;
  };
  [[nodiscard]] result<const ns_state*> check_ns(ns_id ns) const;
  /// token_keys_ = the chained keys of `tokens`' full blocks; errc::
  /// out_of_memory (nothing thrown) when they do not fit in memory.
  [[nodiscard]] result<void>
  compute_token_keys(const ns_state& st, std::span<const std::uint32_t> tokens);
  /// reserve(); `sets_expiry`: the put's commit sets the block's expiry
  /// (a duplicate put's: the cached block's, to the put's start + TTL) and
  /// matches the disk copy's to it (match_disk_copy_expiry()). A put's; a
  /// block brought back from the memory tier or disk passes false: it
  /// takes its copy's own expiry, which is no put's, and leaves the disk
  /// copy as it is.
  [[nodiscard]] result<put_handle> reserve_block(ns_id ns, const block_key& key,
                                                 const block_key& parent,
                                                 const put_options& options,
                                                 bool sets_expiry);
  /// reserve_block() of a key the index holds at `existing`: a duplicate
  /// put of the committed block (errc::namespace_conflict or errc::busy
  /// when it cannot be one), or nullopt when the copy was dead or expired
  /// and is gone now, so the put goes on as a fresh one.
  [[nodiscard]] std::optional<result<put_handle>>
  reserve_existing(ns_id ns, std::uint32_t existing, const block_key& parent,
                   const put_options& options, nanos start, bool sets_expiry);
  [[nodiscard]] std::uint32_t find_visible(ns_id ns, const block_key& key,
                                           nanos now);
  /// The entry of `key` when a put may name it as parent at `now`: a
  /// committed block of namespace `ns`, alive and not expired (one found
  /// expired is expired here), or one being put (reserved, or dead with a
  /// duplicate put open that will bring it back); npos otherwise.
  [[nodiscard]] std::uint32_t usable_parent(ns_id ns, const block_key& key,
                                            nanos now);
  [[nodiscard]] std::size_t
  walk_prefix(ns_id ns, std::span<const block_key> keys, nanos now);
  void touch(std::uint32_t id);
  /// config_.next_use(key); an exception it throws is taken as "never
  /// used again" (max), logged once.
  [[nodiscard]] std::uint64_t next_use_of(const block_key& key) noexcept;
  /// Counts one prefix lookup that found `hits` of `keys` blocks and began
  /// at `start` (stats: lookups, block hits and misses, lookup_ns).
  void count_lookup(nanos start, std::size_t hits, std::size_t keys) noexcept;
  /// A block used by a request of priority `p` ranks at least as `p`
  /// (priority policy): one put by a prefetch and then used by a normal
  /// request is no longer the first to go. Call before touch(): the
  /// policies learn the new priority from that access.
  void raise_priority(std::uint32_t id, priority p) noexcept;
  /// acquire_prefix() for a request of priority `p` (raise_priority());
  /// the memory tier's part of the prefix only `from_tier` (process()
  /// brings it back itself, counting it).
  [[nodiscard]] result<std::size_t>
  acquire_prefix_at(ns_id ns, std::span<const block_key> keys,
                    std::vector<read_lease>& out, priority p,
                    bool from_tier = false);
  /// Leases the leading visible blocks of `keys` into `out` (at `t`),
  /// linking a block brought back without its parent under the one before
  /// it; with `use`, raises each to that priority and records an access
  /// first, as a request's use (acquire_prefix_at()), without, leaves them
  /// as they were (put_tokens(), until its blocks are all written).
  void lease_prefix(ns_id ns, std::span<const block_key> keys,
                    std::vector<read_lease>& out, nanos t,
                    std::optional<priority> use);
  /// Pins a committed block that is not pinned yet (put_options::pin).
  /// Its caller checked the room for it (pin_room()).
  void pin_once(std::uint32_t id);
  /// Sets block `id`'s pin count, keeping pinned_bytes_ and
  /// pin_held_bytes_ in step.
  void set_pins(std::uint32_t id, std::uint32_t pins) noexcept;
  /// Whether pins hold block `e` in memory (pin_held_bytes()).
  [[nodiscard]] static bool pin_held(const entry& e) noexcept;
  /// A child of block `id` (npos: none) became held by pins (`held`) or
  /// stopped being: updates `id` and, where its own state changes, its
  /// ancestors.
  void child_held(std::uint32_t id, bool held) noexcept;
  /// Block `e` became held by pins or stopped being (pin_held(e) says
  /// which): its bytes in pin_held_bytes_, and its parent's count.
  void held_changed(const entry& e) noexcept;
  /// Adds block `e`'s slot bytes to pin_held_bytes_ (`held`) or takes them
  /// off.
  void count_held(const entry& e, bool held) noexcept;
  /// The slot bytes pinning would newly hold: block `id`'s when pins do
  /// not hold it yet, and those of the blocks it chains from up to the
  /// first that pins hold already (or `stop`, charged already). `id` may
  /// be npos (no block: nothing).
  [[nodiscard]] std::size_t
  pin_cost(std::uint32_t id,
           std::uint32_t stop = block_index::npos) const noexcept;
  /// What a pin of block `id` is charged: pin_cost(id), up to the prefix
  /// a put_tokens() call charged already (charged_prefix_).
  [[nodiscard]] std::size_t pin_charge(std::uint32_t id) const noexcept;
  /// Whether `more` slot bytes newly held by pins fit max_pinned_fraction
  /// (no bytes always do): an error naming what() when they do not
  /// (called only then: a pin that fits builds no message).
  template <class What>
  [[nodiscard]] result<void> pin_room(std::size_t more, What&& what) const {
    if (more == 0 || (more <= pin_limit_bytes_ &&
                      pin_held_bytes_ <= pin_limit_bytes_ - more))
      return {};
    return unexpected<error>(pin_refusal(more, what()));
  }
  [[nodiscard]] error pin_refusal(std::size_t more,
                                  const std::string& what) const;
  /// A process() or put_tokens() (`call`) with a pin over `keys`: the
  /// bytes its new pins may take (pin_bytes_at_most), for its
  /// pin_budget_scope, or the error refusing it when they do not fit;
  /// none without a pin.
  [[nodiscard]] result<std::optional<std::size_t>>
  check_pins_of(ns_id ns, std::span<const block_key> keys,
                const put_options& options, std::string_view call) const;
  /// Room for a new pin of `need` slot bytes, of block `key`: within a
  /// checked call's budget (pin_budget_scope) it takes its share; past it,
  /// or outside such a call, pin_room() with the rest of the budget kept
  /// for the call's pins still to come. `what` names the pin in the error
  /// ("<what> <key> would take ...").
  [[nodiscard]] result<void> take_pin_budget(std::size_t need,
                                             std::string_view what,
                                             const block_key& key);
  /// Whether pin_once(id) would pin the block (committed, alive, unpinned).
  [[nodiscard]] bool would_pin(std::uint32_t id) const noexcept;
  /// Whether entry `id` is still the block of `generation` and pinned (a
  /// process_pins_ record that can be taken back).
  [[nodiscard]] bool pinned_still(std::uint32_t id,
                                  std::uint32_t generation) const noexcept;
  /// The slot bytes pinning every block of `keys` can add: none for a
  /// block pinned in memory, or whose disk copy holds pins (they come back
  /// unrefused); else the slot it would come back into (its own in
  /// memory, the memory tier's or the disk copy's codec) or, with
  /// `may_compute`, the larger of that and the put's codec's (it may be
  /// computed again instead).
  [[nodiscard]] std::size_t pin_bytes_at_most(ns_id ns,
                                              std::span<const block_key> keys,
                                              const put_options& options,
                                              bool may_compute = true) const;
  /// While a process() or put_tokens() with a pin runs past its check of
  /// them all: the bytes it was checked for, which its commits' new pins
  /// take instead of checking again (pins a landing promote() brought
  /// back meanwhile would otherwise refuse its later blocks, leaving the
  /// request half pinned). A commit past them (a disk copy counted for its
  /// pins and then recomputed) is checked as any.
  class pin_budget_scope {
  public:
    pin_budget_scope(block_store& s, std::optional<std::size_t> bytes) noexcept
        : s_(s), was_(s.pin_budget_) {
      if (bytes)
        s_.pin_budget_ = bytes;
    }
    ~pin_budget_scope() { s_.pin_budget_ = was_; }
    pin_budget_scope(const pin_budget_scope&) = delete;
    pin_budget_scope& operator=(const pin_budget_scope&) = delete;

  private:
    block_store& s_;
    std::optional<std::size_t> was_;
  };
  void release_lease(std::uint32_t id) noexcept;
  void abort_reservation(std::uint32_t id) noexcept;
  /// An open put whose handle is dropped: aborted (if still current) and
  /// counted.
  void drop_put(const put_handle& h) noexcept;
  /// Aborts the put of entry `id` if it is still that put (same generation).
  void abort_if_current(std::uint32_t id, std::uint32_t generation) noexcept;
  [[nodiscard]] result<void> check_open(const put_handle& h) const;
  [[nodiscard]] size_partition
  partition_for(std::uint32_t request_tokens) const;
  /// The fewest request tokens that land in partition `p` (a block brought
  /// back from a tier is reserved with them, to land in its own partition).
  [[nodiscard]] std::uint32_t partition_start(size_partition p) const;
  /// Makes room for a put of class `cls` in partition `p` whose parent is
  /// entry `parent` (npos: none).
  [[nodiscard]] result<void> make_room(size_partition p, std::uint16_t cls,
                                       std::uint32_t parent);
  /// Gives size class `cls`, which has no free slot and finds no free
  /// slab (a put's, or a demotion's smaller size), a slab without evicting:
  /// moves the blocks of another class's sparsest slab into free slots of that
  /// class's other slabs (committed blocks no lease holds; a put's slot, a
  /// reader's and a copy's stay where they are). False when no slab can be
  /// emptied so, or the backend cannot copy within its arena. A copy that
  /// fails turns compaction off for good (counted, logged once).
  bool compact_for(std::uint16_t cls);
  /// False when make_room() could free no slot of class `cls` whatever it
  /// evicted, demoted or moved: every block of that size is held (being
  /// put or read, pinned, or with such a block chained below it) and not
  /// demotable, and every slab holds a block that can be neither evicted,
  /// moved (compaction) nor demoted. True when room might come (so a put
  /// it answers false for fails before evicting anything). Walks every
  /// entry and every slot: make_room() asks only when no slot of the put's
  /// size is free. The put's `parent` (npos: none) and its ancestors stay,
  /// and so do the blocks of a partition other than the put's `p` that is
  /// within its share (make_room() takes nothing from it; before, such a
  /// block made room seem possible, and a put evicted every evictable
  /// block of its own partition, then failed). Without
  /// lowest_priority_first only: with it, every partition counts as giving.
  [[nodiscard]] bool room_could_come(size_partition p, std::uint16_t cls,
                                     std::uint32_t parent);
  [[nodiscard]] bool over_high(std::size_t extra) const noexcept;
  /// put_tokens() of token_keys_ with `matched` leading blocks cached:
  /// errc::out_of_memory when its new blocks need more than make_room could
  /// get for them at most (it would evict, then fail), else nothing.
  [[nodiscard]] result<void>
  token_put_could_fit(ns_id ns, std::size_t matched, std::size_t blocks,
                      const put_options& options) const;
  [[nodiscard]] std::optional<size_partition>
  pick_partition(size_partition p) const;
  /// Where make_room() for a put in `p` compresses first: the partition
  /// furthest over its share with any block to compress (evictable or
  /// not), else `p`.
  [[nodiscard]] size_partition demotion_partition(size_partition p) const;
  /// Bytes in partition `p` over its share of capacity (1.0: exactly its
  /// share).
  [[nodiscard]] double share_ratio(size_partition p) const noexcept;
  /// The partition with evictable blocks (of priority `p` when given)
  /// furthest over its share of capacity (evict_bytes(), demote_to_tier()
  /// and pick_partition() take from it first). With `asking` (a put's
  /// partition making room), only that partition and those over their
  /// share count: one within its share gives nothing to another's put.
  [[nodiscard]] std::optional<size_partition>
  most_over_share(std::optional<priority> p = std::nullopt,
                  std::optional<size_partition> asking = std::nullopt) const;
  /// One make-room pass's demotion scan: what it may still spend, where it
  /// stopped in each partition's recency list (a later call of the pass
  /// goes on from there rather than passing the same held blocks again),
  /// and the sizes it found no slot for since the pass last evicted.
  struct demotion_scan {
    std::size_t tries = 0;  ///< demotions it may still try
    std::size_t visits = 0; ///< blocks it may still pass over
    std::array<std::uint32_t, partition_count> resume{};
    std::array<std::uint16_t, 4> no_slot{};
    std::size_t no_slots = 0;
    /// The size class of the put the room is for.
    std::uint16_t put_cls = 0;

    demotion_scan(std::size_t limit, std::uint16_t cls) noexcept
        : tries(limit), visits(limit > SIZE_MAX / 16 ? SIZE_MAX : 16 * limit),
          put_cls(cls) {
      resume.fill(block_index::npos);
    }
    [[nodiscard]] bool knows_no_slot(std::uint16_t cls) const noexcept {
      return std::find(no_slot.begin(), no_slot.begin() + no_slots, cls) !=
             no_slot.begin() + no_slots;
    }
  };
  /// Demotes one cold block of partition `p` (or removes an expired one)
  /// to free room; false when the scan finds none within what it may
  /// spend.
  bool try_demote(size_partition p, demotion_scan& scan);
  /// The codec adaptive compression would take block `e` to (its own when
  /// it is too hot for any).
  [[nodiscard]] codec demotion_target(const entry& e) const noexcept;
  /// Whether demoting `e` now would free bytes. Accesses and demotions
  /// only make it false, never true again: only such blocks are on the
  /// recency list the demotion scan walks, and only while unpinned (a pin
  /// takes a block off it, the last unpin puts it back at the front), so
  /// blocks it could never demote do not use up its limit.
  [[nodiscard]] bool may_demote(const entry& e) const noexcept;
  [[nodiscard]] result<void> transcode(std::uint32_t id, codec to);
  /// Frees a block's slot and entry. `announce`: report it removed
  /// (on_block_event); false when it moved to the memory tier. Dead parents
  /// it frees are always announced.
  void remove(std::uint32_t id, bool announce = true);
  void kill(std::uint32_t id);
  /// At the first namespace's registration, a default slab (slab_bytes 0)
  /// that its full-size blocks do not tile is refitted to a whole number
  /// of them (see store_config).
  void fit_default_slab(const namespace_spec& spec);
  /// Notes committed block `id`'s expiry (none: nothing) in
  /// expiry_heap_, for reclaim_expired().
  void note_expiry(std::uint32_t id);
  /// Kills every block whose TTL has run out, soonest first, as expire()
  /// does, by expiry_heap_ (no walk of the store); returns the bytes that
  /// freed (a block still held only turns dead). make_room() and
  /// evict_bytes() call it before they evict or demote a live block.
  std::size_t reclaim_expired();
  /// Writes block `id` to the disk tier unless it is there already
  /// (`rewrite`: even then).
  bool spill(std::uint32_t id, bool pinned, bool rewrite = false);
  /// Why the last promotion stopped short: its reservation's error (no
  /// room: every slot pinned, leased or being put), so that a call whose
  /// block is in the memory tier or on disk but could not come back says
  /// so (not_cached()), not "not cached". Reset before each such call.
  std::optional<error> promotion_refused_;
  /// `what` + key "is not cached" (errc::not_found), or, after a promotion
  /// that was refused, that reservation's error saying the block is there
  /// but could not come back.
  [[nodiscard]] error not_cached(const char* what, const block_key& key);
  /// Pins or unpins block `id`'s disk copy, when it has one, until its pin
  /// count is the block's (so nested pins survive a restart nested).
  [[nodiscard]] result<void> sync_disk_pins(std::uint32_t id);
  /// After a put set block `id`'s expiry: a disk copy that would outlast
  /// it (spilled before a put shortened its TTL) is rewritten with the
  /// block's expiry when pinned there, else erased, so the disk never
  /// serves the block after it expired in memory; and a pinned block's
  /// copy that would end sooner (a put lengthened the TTL or took it away)
  /// is rewritten, so the pin outlives a restart as long as the block.
  void match_disk_copy_expiry(std::uint32_t id);
  void evict(std::uint32_t id);
  /// The disk tier's copy of `key` when a promotion can use it: of this
  /// namespace, its codec and size, not expired at `wall`.
  [[nodiscard]] std::optional<disk_block_info>
  usable_disk_copy(const ns_state& st, const block_key& key, nanos wall) const;
  /// Leading blocks of `keys` on disk, or in memory (a block brought back
  /// alone, or put under one, continues a prefix on disk).
  [[nodiscard]] std::size_t disk_prefix(ns_id ns,
                                        std::span<const block_key> keys) const;
  struct promotion {
    disk_request_id id{};
    put_handle handle;
    std::optional<std::uint64_t> checksum; ///< set when read and verified
    std::uint64_t group = 0; ///< one chain: the promotions of one call
    std::uint64_t hold = 0;  ///< promote()'s hold token (0: none)
    bool answered = false;
    /// Where the disk tier reads the block when the host cannot address
    /// the arena (device memory); copied into the slot before the commit.
    std::vector<std::byte> staging;
  };
  /// Puts a promotion's bytes into its slot (from staging, when it has
  /// one); false when the backend's write fails.
  [[nodiscard]] bool land(promotion& p);
  static void abort_in_reverse(std::vector<promotion>& list) noexcept;
  /// Reserves the blocks of `keys` (after `parent`) and queues their disk
  /// reads at `prio`: demand when the caller waits for them (process(),
  /// a block read back alone), background for promote().
  void issue_promotions(ns_id ns, std::span<const block_key> keys,
                        const block_key& parent, const put_options& options,
                        std::vector<promotion>& into, disk_priority prio);
  void drain_disk();
  /// Waits for promote()'s reads of any of `keys` still on their way (and
  /// those before them) and commits them; false when none was.
  bool await_promotions_of(std::span<const block_key> keys);
  /// Waits, without a bound (the I/O thread reads into reserved slots),
  /// for the disk reads in promote_ids_, a line to stderr every 30 s
  /// naming `what`; then collects the tier's answers (drain_disk()).
  void wait_for_reads(const char* what);
  /// The disk tier's copy of `key` when it is namespace `ns`'s, holds these
  /// bytes, expires no sooner than `expires` (wall time, 0 = never) and
  /// records priority `p`: no spill is needed.
  [[nodiscard]] std::optional<disk_block_info>
  lasting_disk_copy(const ns_fingerprint& ns, const block_key& key,
                    std::uint64_t checksum, codec c, nanos expires,
                    priority p) const;
  /// drain_disk() at the start of an owner's put or eviction call (not
  /// inside the store's own calls), so that spill answers do not pile up.
  void collect_disk();
  /// A put whose write failed after reaching its slot: reserved again and
  /// its handle unwritten (write()).
  void unwrite(put_handle& h);
  /// What promote_now() served: the blocks up to the first it had to
  /// recompute, and of those the ones read from disk (the others were in
  /// memory already, after a block only on disk). process() counts as hits
  /// only those still visible after it (stats().disk_block_hits too).
  struct disk_promoted {
    std::size_t hits = 0;
    std::size_t from_disk = 0;
    /// The producer's error for a block it computed in place of a failed
    /// read: the request fails with it (the producer is not asked again).
    std::optional<error> produce_failed;
  };
  disk_promoted promote_now(ns_id ns, std::span<const block_key> keys,
                            const block_key& parent, kv_producer& producer,
                            const put_options& options);
  /// Waits until the disk tier has answered promote_batch_'s reads (demand
  /// reads: they go ahead of the spills and prefetches queued before them,
  /// and the wait is for them alone, disk_tier::wait_done), without a
  /// bound, printing a line to stderr every 30 s; then collects the
  /// answers. The reads go into promote_batch_'s reserved slots, which
  /// must not be freed before they are answered.
  void await_promote_batch();
  /// Lands and commits an answered promotion; false when it failed on disk
  /// (missing, damaged header) or could not be committed.
  [[nodiscard]] bool finish_promotion(promotion& p);
  /// Brings `key`, found only on disk, back into memory as a chain root
  /// marked parent_unknown, and waits for it (await_promote_batch()); true
  /// when it is in memory now. acquire(), pin() and reserve() (a parent)
  /// use it; false at once without a disk tier, or inside process()'s own
  /// promotion.
  bool promote_key_from_disk(ns_id ns, const block_key& key,
                             const put_options& options);
  /// Links block `id`, brought back from disk without its parent, under
  /// `parent` when that is a visible block of its namespace (and not its
  /// own descendant): a duplicate put's commit calls it. A block held by a
  /// lease (a reader, a demotion in flight) waits for a later put.
  void adopt(std::uint32_t id, const block_key& parent);
  /// The entry adopt() would link block `id` under for `parent`: npos when
  /// `id` knows its parent, `parent` is not a visible block of its
  /// namespace, or is `id`'s own descendant.
  [[nodiscard]] std::uint32_t adoptive_parent(std::uint32_t id,
                                              const block_key& parent) const;
  /// An open put handle of entry `id` (its generation now) for `key`,
  /// started at `start`: what reserve() hands out, a new block's or a
  /// duplicate's.
  [[nodiscard]] put_handle open_handle(std::uint32_t id, const block_key& key,
                                       nanos start);
  [[nodiscard]] result<void> mark_written(put_handle& h,
                                          std::uint64_t checksum);
  [[nodiscard]] const clock_source& disk_clock() const noexcept;
  // Memory tier (block_store_tier.cpp).
  struct tier_block {
    tier_place place;
    block_key parent{}; // null for a chain's first block
    /// Brought back from disk alone and not linked yet (entry's flag): it
    /// comes back so, for adopt() to link it once a put names its parent.
    bool parent_unknown = false;
    std::uint64_t checksum = 0;
    std::int64_t expires_at = 0; // steady nanoseconds; 0 = never
    std::uint64_t seq = 0;       // key of tier_order_
    std::uint32_t stored_bytes = 0;
    std::uint32_t access_count = 0; // comes back with it
    std::uint16_t ns = 0;
    codec c = codec::none;
    priority prio = priority::normal;
    size_partition part = size_partition::small; // comes back in it
  };
  struct demotion {
    std::uint32_t id = 0;
    std::uint32_t access_count = 0; // at the start: a read cancels it
    tier_place place;
  };
  struct demotion_batch {
    tier_ticket ticket;
    std::vector<demotion> blocks; // children before parents
    std::size_t slot_bytes = 0;
    std::size_t tier_bytes = 0; ///< its places' bytes in the tier
  };
  /// Counts (and logs, the first time) a demotion stopped at a block of
  /// `stored` bytes, over the tier's batch limit `limit`.
  void tier_block_too_large(std::size_t stored, std::size_t limit);
  /// Takes block `id` into a batch being built (a lease holds it in place).
  void start_demotion(std::uint32_t id, demotion_batch& batch,
                      std::vector<tier_demotion>& jobs);
  /// Undoes start_demotion for every block of a batch that did not start.
  void cancel_demotions(demotion_batch& batch);
  void finish_demotions(demotion_batch& batch, bool copied);
  /// Whether `id` can leave with its children: committed, alive, unpinned,
  /// unleased, every child being demoted (in this batch or one in flight;
  /// batches finish in order, so the children finish first).
  [[nodiscard]] bool can_follow_children(std::uint32_t id) const noexcept;
  /// Writes a tier block to the disk tier (unless it is there already or
  /// expired); false without a disk tier.
  bool spill_tier_block(const block_key& key, const tier_block& b);
  /// Drops the oldest block of the tier (spilled to disk when attached).
  void drop_oldest_tier_block();
  /// Brings `key` back from the memory tier with the tier blocks it chains
  /// from; true when it is in memory now. acquire() and pin() use it.
  bool promote_key_from_tier(ns_id ns, const block_key& key);
  void drop_tier_block(const block_key& key, bool announce);
  [[nodiscard]] std::size_t tier_prefix_length(ns_id ns,
                                               std::span<const block_key> keys);
  /// Promotes the leading tier blocks of `keys` (after `parent`); returns
  /// how many are cached now.
  std::size_t promote_from_tier(ns_id ns, std::span<const block_key> keys,
                                const block_key& parent,
                                const put_options& options);
  /// Answer to a read of a block an earlier read found corrupt: zeroes
  /// `out`, counts nothing twice.
  [[nodiscard]] result<void> refuse_corrupt(const entry& e,
                                            std::span<std::byte> out) const;
  /// Zeroes `out`, counts and drops a block that failed its checksum.
  [[nodiscard]] result<void> drop_corrupt(std::uint32_t id,
                                          std::span<std::byte> out);
  /// Counts and drops a block that failed its checksum, with its copy on
  /// disk and the cached blocks chained from it (unreachable now), so the
  /// prefix can be cached again.
  void drop_damaged(std::uint32_t id);
  void refresh_evictable(std::uint32_t id);
  /// Sets whether the policies hold block `id` (flagged_evictable).
  void set_flagged(std::uint32_t id, bool flagged);
  /// The next block evict_bytes() and demote_to_tier() take, or npos when
  /// none is evictable: of the lowest priority that has evictable blocks
  /// (whatever the policy), the partition furthest over its share among
  /// those that hold some, and that partition's policy's victim of the
  /// priority. O(priorities x partitions), no walk. With `asking` (a
  /// put's partition), from that partition and those over their share
  /// (most_over_share); from another partition within its share only while
  /// none is over its share, and only at a priority lower than any of
  /// `asking`'s.
  [[nodiscard]] std::uint32_t lowest_priority_victim(
      std::optional<size_partition> asking = std::nullopt) const;
  /// The make-room path's victim, `q` the partition pick_partition(asking)
  /// gave for a put of partition `asking` (a partition over its share, or
  /// `asking` itself): q's policy's, or with lowest_priority_first
  /// lowest_priority_victim(asking), which takes from `asking` and the
  /// partitions over their share.
  [[nodiscard]] std::uint32_t make_room_victim(size_partition q,
                                               size_partition asking) const;
  [[nodiscard]] bool evictable(const entry& e) const noexcept;
  void account(const entry& e, bool add) noexcept;
  std::uint32_t new_entry();
  [[nodiscard]] std::byte* host_ptr(const entry& e) noexcept;
  void recency_unlink(std::uint32_t id) noexcept;
  void recency_push_front(std::uint32_t id) noexcept;

  store_config config_;
  const clock_source* clock_;
  std::unique_ptr<memory_backend> backend_;
  bool compaction_off_ = false;        ///< a copy within the arena failed
  bool next_use_failed_ = false;       ///< the next-use oracle threw (logged)
  bool tier_too_large_logged_ = false; ///< stats_.tier_too_large's log line
  block_pool pool_;
  block_index index_;
  std::vector<entry> entries_;
  std::vector<std::uint32_t> free_entries_;
  std::vector<ns_state> namespaces_;
  /// Declared before the leases below, whose release updates them.
  std::array<std::unique_ptr<eviction_policy>, partition_count> policies_;
  std::array<std::uint32_t, partition_count> recency_head_{};
  std::array<std::uint32_t, partition_count> recency_tail_{};
  std::vector<std::byte> scratch_; ///< one uncompressed value, for transcoding
  std::vector<std::byte> scratch2_;
  /// room_could_come()'s per-entry marks, kept for their capacity.
  std::vector<std::uint8_t> held_marks_;
  /// room_could_come()'s per-class marks: a slot free or freeing.
  std::vector<std::uint8_t> slot_may_free_;
  std::vector<read_lease> process_leases_; ///< process()'s leases, reused
  /// promote()'s holds, by token (after entries_: their leases are let go
  /// first when the store goes).
  std::unordered_map<std::uint64_t, std::vector<read_lease>> holds_;
  /// Leases block `key` (committed, in memory) for promote()'s `hold`.
  void hold_block(std::uint64_t hold, const block_key& key);
  /// While process() runs with put_options::pin: the blocks it pinned
  /// that were not pinned before, {id, generation}, so a request that
  /// fails takes those pins back (nobody was told of them); kept after a
  /// success until the next process(), for unpin_last_process().
  std::vector<std::pair<std::uint32_t, std::uint32_t>>* pin_log_ = nullptr;
  std::vector<std::pair<std::uint32_t, std::uint32_t>> process_pins_;
  std::vector<promotion> promote_batch_;      ///< process()'s, reused
  std::vector<disk_request_id> promote_ids_;  ///< its reads, reused
  std::vector<promotion> pending_promotions_; ///< promote()'s, in flight
  std::uint64_t promote_group_ = 0;
  std::vector<block_key> token_keys_; ///< put_tokens()/lookup_tokens(), reused
  std::vector<read_lease> token_leases_;
  std::vector<put_handle> token_puts_;
  /// The memory tier and its directory: key -> place, oldest first by seq.
  std::unique_ptr<memory_tier> tier_;
  std::unordered_map<block_key, tier_block, block_key_hash> tier_index_;
  std::map<std::uint64_t, block_key> tier_order_;
  std::uint64_t tier_seq_ = 0;
  std::deque<demotion_batch> tier_batches_; ///< in flight, oldest first
  std::size_t tier_in_flight_ = 0;
  /// Tier bytes the batches in flight take there (their `tier_bytes`):
  /// dropping settled tier blocks frees none of them.
  std::size_t tier_bytes_in_flight_ = 0;
  /// Slot bytes of blocks being copied to the tier, by size partition:
  /// share_ratio() leaves them out (they are leaving).
  std::array<std::size_t, partition_count> departing_by_partition_{};
  /// Declared last so it is destroyed first: its I/O thread may still be
  /// reading into the arena.
  std::unique_ptr<disk_tier> disk_;
  std::uint64_t tick_ = 0;
  std::uint32_t nested_ = 0;       ///< see count_rejected()
  std::size_t pinned_bytes_ = 0;   ///< see pinned_bytes()
  std::size_t pin_held_bytes_ = 0; ///< see pin_held_bytes()
  /// put_tokens() is reserving blocks under the prefix it leased and puts
  /// again: usable_parent() does not expire that prefix.
  bool renewing_prefix_ = false;
  /// The last block of the prefix a put_tokens() call charged for its pins
  /// while it commits its new blocks (pin_charge()); npos otherwise.
  std::uint32_t charged_prefix_ = block_index::npos;
  /// A committed block's expiry as noted (note_expiry): stale once the
  /// block is gone (its generation moved on), dead, or has another expiry.
  struct expiry_mark {
    std::int64_t at;
    std::uint32_t id;
    std::uint32_t generation;
    bool operator>(const expiry_mark& o) const noexcept { return at > o.at; }
  };
  /// Min-heap of expiry marks, soonest on top; rebuilt without its stale
  /// marks when they outnumber the blocks.
  std::vector<expiry_mark> expiry_heap_;
  std::vector<expiry_mark> leased_expired_; ///< reclaim_expired's scratch
  /// demote_to_tier() is picking its blocks: share_ratio() leaves out the
  /// bytes already leaving for the tier.
  bool picking_for_tier_ = false;
  /// pinned_bytes_ by size partition (token_put_could_fit's).
  std::array<std::size_t, partition_count> pinned_by_partition_{};
  std::optional<std::size_t> pin_budget_; ///< see pin_budget_scope
  std::size_t pin_limit_bytes_ = 0;       ///< max_pinned_fraction of the arena
  store_stats stats_;
};

} // namespace kvfleet::engine
