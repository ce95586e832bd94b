#include "engine/block_store.hpp"

#include "engine/checksum.hpp"
#include "engine/host_error.hpp"
#include "engine/internal/check.hpp"
#include "engine/internal/scoped_value.hpp"
#include "engine/internal/store_entry.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <optional>
#include <string>

namespace kvfleet::engine {

namespace {

/// What every call taking put_options checks: a priority of the five, a
/// known codec (the override, else the namespace's default) and no
/// negative TTL.
result<void> check_put_options(const put_options& o, codec ns_default) {
  if (auto ok = check_priority(o.prio); !ok)
    return ok;
  if (const codec c = o.codec_override.value_or(ns_default); !is_valid(c))
    return make_error(errc::unknown_codec,
                      "unknown codec #" + std::to_string(static_cast<int>(c)));
  if (o.ttl && o.ttl->count() < 0)
    return make_error(errc::invalid_argument, "negative TTL");
  return {};
}

constexpr std::uint32_t npos = block_index::npos;

/// A TTL longer than this counts as none. It keeps every deadline the store
/// computes (steady now + TTL, wall now + what is left) inside int64
/// nanoseconds, so `nanos::max()`, the obvious way to say "never", cannot
/// wrap round to a deadline in the past.
constexpr nanos max_ttl = std::chrono::hours{24 * 365 * 100};

/// Steady-clock deadline of a block put at `start` with `ttl`; 0 = never.
std::int64_t expiry_after(nanos start, nanos ttl) {
  if (ttl.count() <= 0 || ttl > max_ttl)
    return 0;
  return (start + ttl).count();
}

/// Whether two registrations of a namespace ask for the same behaviour (a
/// TTL of 0 and one over 100 years both mean none).
bool same_options(const namespace_options& a, const namespace_options& b) {
  return a.default_codec == b.default_codec &&
         a.adaptive_compression == b.adaptive_compression &&
         a.thresholds.precise_above == b.thresholds.precise_above &&
         a.thresholds.int8_above == b.thresholds.int8_above &&
         expiry_after(nanos{0}, a.ttl) == expiry_after(nanos{0}, b.ttl);
}

constexpr std::size_t max_reserved_entries = std::size_t{1} << 26;
/// register_namespace() reserves bookkeeping for at most one block per
/// this many arena bytes: a block's entry, index buckets and policy slots
/// take a few hundred bytes, so up front they stay under about 1/16 of
/// the arena however small the blocks (one per 256-byte slot took about as
/// much as the arena). Smaller blocks grow the tables as they come.
constexpr std::size_t arena_bytes_per_reserved_block = 4096;

/// The error for a lease that is not the store's: an empty one (default,
/// moved from or released) is not another store's.
unexpected<error> not_our_lease(const void* owner) {
  return make_error(errc::invalid_handle,
                    owner == nullptr
                        ? "lease is empty (default, moved from or released)"
                        : "lease belongs to another store");
}

/// The same for a put handle (default or moved from when empty).
unexpected<error> not_our_put(const void* owner) {
  return make_error(errc::invalid_handle,
                    owner == nullptr
                        ? "put handle is empty (default or moved from)"
                        : "put handle belongs to another store");
}

/// The options a block read back alone (acquire(), pin(), a put's parent)
/// is promoted with: no request priority of its own (the lowest), so the
/// block keeps the one its disk copy records (normal when none is, as
/// issue_promotions() does for every block), as such a block brought back
/// from the memory tier keeps its own. The codec, TTL, pin and recorded
/// partition come from the disk copy.
put_options keep_recorded() {
  put_options o;
  o.prio = priority::background;
  return o;
}

/// The same for a put's parent: its partition is the put's when the disk
/// copy records none. A put does not raise its parent's priority (a parent
/// in memory keeps its own too).
put_options for_parent_of(const put_options& put) {
  put_options o = keep_recorded();
  o.request_tokens = put.request_tokens;
  return o;
}

std::string ns_name(std::uint16_t id) {
  return "namespace #" + std::to_string(id);
}

// Codec rank by how much it compresses: fp8 and int8 take the same space.
int compression_rank(codec c) noexcept {
  switch (c) {
  case codec::none:
    return 0;
  case codec::fp8:
  case codec::int8:
    return 1;
  case codec::int4:
    return 2;
  }
  return 0;
}

} // namespace

// ---------------------------------------------------------------- handles

read_lease& read_lease::operator=(read_lease&& other) noexcept {
  if (this != &other) {
    release();
    store_ = other.store_;
    id_ = other.id_;
    key_ = other.key_;
    other.store_ = nullptr;
  }
  return *this;
}

void read_lease::release() noexcept {
  if (store_ != nullptr) {
    store_->release_lease(id_);
    store_ = nullptr;
  }
}

put_handle& put_handle::operator=(put_handle&& other) noexcept {
  if (this != &other) {
    if (store_ != nullptr && phase_ == phase::open)
      store_->drop_put(*this);
    store_ = other.store_;
    id_ = other.id_;
    generation_ = other.generation_;
    started_ = other.started_;
    key_ = other.key_;
    phase_ = other.phase_;
    restored_count_ = other.restored_count_;
    restored_pins_ = other.restored_pins_;
    from_disk_copy_ = other.from_disk_copy_;
    duplicate_ = other.duplicate_;
    written_ = other.written_;
    pin_ = other.pin_;
    prio_ = other.prio_;
    parent_ = other.parent_;
    expires_at_ = other.expires_at_;
    sets_expiry_ = other.sets_expiry_;
    other.store_ = nullptr;
    other.phase_ = phase::none;
  }
  return *this;
}

put_handle::~put_handle() {
  if (store_ != nullptr && phase_ == phase::open)
    store_->drop_put(*this);
}

// ---------------------------------------------------------------- creation

result<std::unique_ptr<block_store>>
block_store::create(const store_config& config) {
  if (config.capacity_bytes == 0)
    return make_error(errc::zero_capacity, "store capacity is zero bytes");
  auto backend = host_memory_backend::create(config.capacity_bytes);
  if (!backend)
    return unexpected<error>(backend.error());
  return create(config, std::move(*backend));
}

result<std::unique_ptr<block_store>>
block_store::create(const store_config& config,
                    std::unique_ptr<memory_backend> backend) {
  if (!backend)
    return make_error(errc::invalid_argument, "no memory backend given");
  if (backend->size() == 0)
    return make_error(errc::zero_capacity, "memory backend has zero bytes");
  if (!(config.low_watermark > 0.0 &&
        config.low_watermark <= config.high_watermark &&
        config.high_watermark <= 1.0))
    return make_error(errc::invalid_argument,
                      "watermarks must satisfy 0 < low <= high <= 1 (got low " +
                          std::to_string(config.low_watermark) + ", high " +
                          std::to_string(config.high_watermark) + ")");
  if (!(config.max_pinned_fraction > 0.0 && config.max_pinned_fraction <= 1.0))
    return make_error(errc::invalid_argument,
                      "max_pinned_fraction must be in (0, 1] (got " +
                          std::to_string(config.max_pinned_fraction) + ")");
  const auto& pc = config.partitions;
  if (pc.medium_from == 0 || pc.medium_from > pc.long_from)
    return make_error(
        errc::invalid_argument,
        "partition bounds must satisfy 0 < medium_from <= long_from");
  double share_sum = 0;
  for (double s : pc.shares) {
    if (!(s > 0.0))
      return make_error(errc::invalid_argument,
                        "every size partition needs a positive share");
    share_sum += s;
  }
  if (share_sum < 0.999 || share_sum > 1.001)
    return make_error(errc::invalid_argument,
                      "size partition shares must add up to 1 (got " +
                          std::to_string(share_sum) + ")");
  if (make_policy(config.policy) == nullptr)
    return make_error(errc::unknown_policy,
                      "unknown eviction policy #" +
                          std::to_string(static_cast<int>(config.policy)));
  if (config.policy == policy_kind::belady && !config.next_use)
    return make_error(errc::invalid_argument,
                      "the belady policy needs a next-use oracle");
  const std::size_t arena = backend->size();
  if (arena < block_pool::slot_alignment)
    return make_error(errc::invalid_argument,
                      "a store of " + std::to_string(arena) +
                          " bytes holds no block: the smallest takes " +
                          std::to_string(block_pool::slot_alignment));
  std::size_t slab = config.slab_bytes;
  if (slab == 0)
    slab = std::clamp<std::size_t>(arena / 64, std::size_t{1} << 20,
                                   std::size_t{256} << 20);
  slab = std::min(slab, arena);
  auto pool = block_pool::create(arena, slab);
  if (!pool)
    return unexpected<error>(pool.error());
  try {
    return std::unique_ptr<block_store>(
        new block_store(config, std::move(backend), std::move(*pool)));
  } catch (const std::bad_alloc&) {
    return make_error(errc::out_of_memory, "no host memory for a store");
  }
}

block_store::block_store(const store_config& config,
                         std::unique_ptr<memory_backend> backend,
                         block_pool pool)
    : config_(config),
      clock_(config.clock != nullptr ? config.clock
                                     : &steady_clock_source::instance()),
      backend_(std::move(backend)), pool_(std::move(pool)),
      pin_limit_bytes_(static_cast<std::size_t>(
          config.max_pinned_fraction *
          static_cast<double>(pool_.capacity_bytes()))) {
  for (std::size_t p = 0; p < partition_count; ++p) {
    policies_[p] = make_policy(config_.policy);
    recency_head_[p] = npos;
    recency_tail_[p] = npos;
  }
}

block_store::~block_store() {
  // Reads into reserved slots (and promotion staging) finish before the
  // slots and buffers are given back, however long a sick disk takes:
  // giving up after a timeout would free memory the I/O thread may still
  // write. Children's puts are aborted before their parents'.
  if (disk_)
    while (!disk_->wait_idle(std::chrono::seconds(30)))
      std::fprintf(stderr, "kvfleet: the disk tier has not answered for 30 s; "
                           "the store waits for it before freeing its "
                           "buffers\n");
  // Demotions still copying read their slots: wait before the arena goes.
  for (const demotion_batch& b : tier_batches_)
    (void)tier_->wait(b.ticket);
  abort_in_reverse(pending_promotions_);
  abort_in_reverse(promote_batch_);
  holds_.clear(); // their leases let go while the rest is still here
}

void block_store::fit_default_slab(const namespace_spec& spec) {
  // Only the default slab (cut before any block size was known), and only
  // before the pool has any size class or block.
  if (config_.slab_bytes != 0 || !namespaces_.empty() ||
      pool_.class_count() != 0 || pool_.used_bytes() != 0)
    return;
  std::size_t largest = 0;
  for (std::size_t c = 0; c < codec_count; ++c)
    largest = std::max(largest, encoded_size(static_cast<codec>(c),
                                             spec.elements_per_block()));
  const std::size_t slot = (largest + block_pool::slot_alignment - 1) /
                           block_pool::slot_alignment *
                           block_pool::slot_alignment;
  const std::size_t slab = pool_.slab_bytes();
  const std::size_t arena = backend_->size();
  if (slot == 0 || slot > arena)
    return; // refused below, as it would be anyway
  // A slab that full-size blocks leave more than a sixteenth of unused
  // (capacity the watermarks and pressure managers count as free, though
  // no block fits in it: a 160 MiB block in a 256 MiB slab left 37.5% of
  // the arena unused), or that a block does not fit (refused before), is
  // refitted to a whole number of blocks: the count that lets the arena
  // hold the most of them, the larger count on a tie (one block a slab
  // leaves int8 one a slab too, and demotion to it frees nothing). Never
  // smaller than the default slab (a later namespace's blocks that fit it
  // still do) unless the arena is that one slab.
  if (slot <= slab && slab % slot <= slab / 16)
    return;
  const std::size_t most = arena / slot; // at least 1: slot <= arena
  const auto holds = [&](std::size_t slab_bytes) {
    return arena / slab_bytes * (slab_bytes / slot) * slot;
  };
  const std::size_t covering = (slab + slot - 1) / slot;
  const std::size_t lo = arena / slab <= 1 ? 1 : covering;
  const std::size_t hi = std::min(most, std::max<std::size_t>(2, covering + 1));
  std::size_t best = 0;
  std::size_t best_holds = 0;
  for (std::size_t k = lo; k <= hi; ++k)
    if (const std::size_t h = holds(k * slot); h >= best_holds) {
      best = k;
      best_holds = h;
    }
  if (best == 0 || best_holds < holds(slab) || best * slot == slab)
    return;
  const std::size_t fitted = best * slot;
  auto pool = block_pool::create(arena, fitted);
  if (!pool)
    return; // keeps the default: a namespace it cannot hold is refused
  pool_ = std::move(*pool);
  pin_limit_bytes_ =
      static_cast<std::size_t>(config_.max_pinned_fraction *
                               static_cast<double>(pool_.capacity_bytes()));
}

result<ns_id>
block_store::register_namespace(const namespace_spec& spec,
                                const namespace_options& options) {
  if (auto ok = spec.validate(); !ok)
    return unexpected<error>(ok.error());
  if (!is_valid(options.default_codec))
    return make_error(errc::unknown_codec,
                      "namespace '" + spec.model + "': unknown default codec");
  if (options.ttl.count() < 0)
    return make_error(errc::invalid_argument,
                      "namespace '" + spec.model + "': negative TTL");
  if (options.thresholds.int8_above > options.thresholds.precise_above)
    return make_error(
        errc::invalid_argument,
        "namespace '" + spec.model + "': compression thresholds inverted: " +
            "int8_above (" + std::to_string(options.thresholds.int8_above) +
            ") is above precise_above (" +
            std::to_string(options.thresholds.precise_above) +
            "), so no block would ever be kept at int8; set int8_above <= "
            "precise_above (both 0 keeps every block as stored)");
  const ns_fingerprint fp = spec.fingerprint();
  for (std::size_t i = 0; i < namespaces_.size(); ++i) {
    if (namespaces_[i].fingerprint != fp)
      continue;
    // The blocks are stored under the first registration's options; other
    // ones would be silently ignored (a TTL that never applies, say).
    if (!same_options(namespaces_[i].options, options))
      return make_error(errc::namespace_conflict,
                        "namespace '" + spec.model +
                            "' is already registered with other options "
                            "(default codec, compression, thresholds or TTL)");
    return ns_id{static_cast<std::uint16_t>(i)};
  }
  if (namespaces_.size() >= 0xffff)
    return make_error(errc::invalid_argument, "too many namespaces");
  fit_default_slab(spec);
  // Its copy of the spec and a new size class allocate too (a size class
  // left behind by a refusal below does no harm).
  std::optional<ns_state> made;
  try {
    made.emplace(ns_state{spec, options, fp, {}});
    const std::size_t elements = spec.elements_per_block();
    for (std::size_t c = 0; c < codec_count; ++c) {
      const std::size_t bytes = encoded_size(static_cast<codec>(c), elements);
      auto cls = pool_.size_class_for(bytes);
      if (!cls)
        return make_error(cls.error().code, "namespace '" + spec.model +
                                                "': " + cls.error().message);
      made->size_class[c] = *cls;
    }
  } catch (const std::bad_alloc&) {
    return make_error(errc::out_of_memory,
                      "namespace '" + spec.model + "': no host memory for it");
  }
  ns_state& st = *made;
  // Size the index and entry table for the most blocks this namespace can
  // put in the arena, so puts do not allocate; within a bound for tiny
  // blocks (see arena_bytes_per_reserved_block).
  const std::size_t slot =
      pool_.slot_bytes(st.size_class[static_cast<std::size_t>(codec::int4)]);
  const std::size_t most = std::min(
      max_reserved_entries,
      pool_.capacity_bytes() / std::max(slot, arena_bytes_per_reserved_block));
  // Some hundred bytes of host memory per block (a large device arena of
  // small blocks can ask for more than the host has). What was reserved
  // before a failure stays: capacity only, nothing the store relies on
  // (each structure grows so that a failed allocation leaves it as it was,
  // or with room it does not count yet).
  try {
    index_.reserve(std::max(most, index_.size()));
    entries_.reserve(std::max(most, entries_.size()));
    free_entries_.reserve(std::max(most, entries_.size()));
    for (auto& p : policies_)
      p->reserve(most);
    // Each sized on its own: one grown without the other would pass a
    // later check of the first's size.
    if (scratch_.size() < spec.value_bytes())
      scratch_.resize(spec.value_bytes());
    if (scratch2_.size() < spec.value_bytes())
      scratch2_.resize(spec.value_bytes());
    namespaces_.push_back(std::move(st)); // unchanged when it throws
  } catch (const std::bad_alloc&) {
    return make_error(errc::out_of_memory,
                      "namespace '" + spec.model +
                          "': no host memory for the bookkeeping of " +
                          std::to_string(most) + " blocks");
  }
  return ns_id{static_cast<std::uint16_t>(namespaces_.size() - 1)};
}

result<const block_store::ns_state*> block_store::check_ns(ns_id ns) const {
  if (ns.value >= namespaces_.size())
    return make_error(errc::unknown_namespace,
                      ns_name(ns.value) + " is not registered with this store");
  return &namespaces_[ns.value];
}

result<const namespace_spec*> block_store::spec(ns_id ns) const {
  auto st = check_ns(ns);
  if (!st)
    return unexpected<error>(st.error());
  return &(*st)->spec;
}

// ---------------------------------------------------------------- lookup

std::uint32_t block_store::find_visible(ns_id ns, const block_key& key,
                                        nanos t) {
  const std::uint32_t id = index_.find(key);
  if (id == npos)
    return npos;
  entry& e = entries_[id];
  if (e.state != entry_state::committed || e.dead || e.ns != ns.value)
    return npos;
  if (expired_by(e.expires_at, t.count())) {
    ++stats_.expirations;
    kill(id);
    return npos;
  }
  return id;
}

std::size_t block_store::walk_prefix(ns_id ns, std::span<const block_key> keys,
                                     nanos t) {
  std::size_t n = 0;
  while (n < keys.size() && find_visible(ns, keys[n], t) != npos)
    ++n;
  return n;
}

result<std::size_t> block_store::lookup(ns_id ns,
                                        std::span<const block_key> keys) {
  if (auto st = check_ns(ns); !st) {
    count_rejected();
    return unexpected<error>(st.error());
  }
  const nanos start = now();
  std::size_t n = walk_prefix(ns, keys, start);
  n += tier_prefix_length(ns, keys.subspan(n)); // 0 at once without a tier
  count_lookup(start, n, keys.size());
  return n;
}

void block_store::count_lookup(nanos start, std::size_t hits,
                               std::size_t keys) noexcept {
  ++stats_.lookups;
  stats_.block_hits += hits;
  stats_.block_misses += keys - hits;
  stats_.lookup_ns.record(static_cast<std::uint64_t>((now() - start).count()));
}

void block_store::touch(std::uint32_t id) {
  entry& e = entries_[id];
  ++tick_;
  // Saturating: a hot block (a shared system prompt) passes 2^32 reads in
  // about 12 hours at 100k requests/s, and a count wrapped to near 0 would
  // make it the coldest block to LFU and to adaptive compression.
  if (e.access_count != std::numeric_limits<std::uint32_t>::max())
    ++e.access_count;
  access_info info;
  info.tick = tick_;
  info.count = e.access_count;
  info.prio = e.prio;
  info.resident_blocks = index_.size();
  info.key_hash = block_key_hash{}(e.key);
  if (config_.next_use)
    info.next_use = next_use_of(e.key);
  policies_[static_cast<std::size_t>(e.part)]->on_access(id, info, false);
  if (e.in_recency) {
    recency_unlink(id);
    // Accesses only raise the demotion target: a block too hot to demote
    // stays so, and leaves the demotion scan.
    if (may_demote(e))
      recency_push_front(id);
  }
}

std::uint64_t block_store::next_use_of(const block_key& key) noexcept {
  // The oracle runs in the middle of commit() and of every access, after
  // the block's own state has changed: an exception out of here would
  // leave it counted and not in its policy. Never used again is the safe
  // answer (the block goes first); the host hears of it once.
  auto report = [this](const char* what) noexcept {
    if (next_use_failed_)
      return;
    next_use_failed_ = true;
    std::fprintf(stderr,
                 "kvfleet: the next-use oracle threw (%s); blocks it throws "
                 "for are taken as never used again\n",
                 what);
  };
  try {
    return config_.next_use(key);
  } catch (const std::exception& ex) {
    report(ex.what());
  } catch (...) {
    report("an exception not derived from std::exception");
  }
  return std::numeric_limits<std::uint64_t>::max();
}

bool block_store::pin_held(const entry& e) noexcept {
  return e.pins > 0 || e.held_children > 0;
}

void block_store::count_held(const entry& e, bool held) noexcept {
  const std::size_t bytes = pool_.slot_bytes(e.slot.size_class);
  if (held)
    pin_held_bytes_ += bytes;
  else
    pin_held_bytes_ -= bytes;
}

void block_store::held_changed(const entry& e) noexcept {
  count_held(e, pin_held(e));
  child_held(e.parent, pin_held(e));
}

void block_store::child_held(std::uint32_t id, bool held) noexcept {
  // Up the chain while a block's own state changes: a block held already
  // by another pinned child, or pinned itself, stops the walk.
  for (std::uint32_t a = id; a != npos;) {
    entry& p = entries_[a];
    const bool was = pin_held(p);
    if (held)
      ++p.held_children;
    else
      --p.held_children;
    if (pin_held(p) == was)
      return;
    count_held(p, held);
    a = p.parent;
  }
}

std::size_t block_store::pin_charge(std::uint32_t id) const noexcept {
  return pin_cost(id, charged_prefix_);
}

std::size_t block_store::pin_cost(std::uint32_t id,
                                  std::uint32_t stop) const noexcept {
  std::size_t n = 0;
  for (std::uint32_t a = id; a != npos && a != stop && !pin_held(entries_[a]);
       a = entries_[a].parent)
    n += pool_.slot_bytes(entries_[a].slot.size_class);
  return n;
}

void block_store::set_pins(std::uint32_t id, std::uint32_t pins) noexcept {
  entry& e = entries_[id];
  const bool was_held = pin_held(e);
  if ((e.pins == 0) != (pins == 0)) {
    const std::size_t bytes = pool_.slot_bytes(e.slot.size_class);
    auto& in_part = pinned_by_partition_[static_cast<std::size_t>(e.part)];
    if (pins > 0) {
      pinned_bytes_ += bytes;
      in_part += bytes;
    } else {
      pinned_bytes_ -= bytes;
      in_part -= bytes;
    }
  }
  e.pins = pins;
  if (pin_held(e) != was_held)
    held_changed(e);
}

error block_store::pin_refusal(std::size_t more,
                               const std::string& what) const {
  return error{
      errc::out_of_memory,
      what + " would take the bytes pins hold (pinned blocks, and the " +
          "blocks they chain from, kept for them) to " +
          std::to_string(pin_held_bytes_ + more) +
          " bytes, past the limit of " + std::to_string(pin_limit_bytes_) +
          " (max_pinned_fraction " +
          std::to_string(config_.max_pinned_fraction) + " of " +
          std::to_string(pool_.capacity_bytes()) +
          " bytes); nothing was pinned: unpin blocks or raise the limit"};
}

std::size_t block_store::pin_bytes_at_most(ns_id ns,
                                           std::span<const block_key> keys,
                                           const put_options& options,
                                           bool may_compute) const {
  const ns_state& st = namespaces_[ns.value];
  const auto slot_of = [&](codec c) {
    return pool_.slot_bytes(st.size_class[static_cast<std::size_t>(c)]);
  };
  // A block may be computed again at the put's codec wherever it is now
  // (expired, evicted meanwhile, after a block that had to be computed, or
  // put by put_tokens(), which promotes nothing): it counts the larger of
  // that slot and the one it would come back into.
  const std::size_t put_slot =
      may_compute
          ? slot_of(options.codec_override.value_or(st.options.default_codec))
          : 0;
  const nanos wall = disk_ ? disk_clock().now() : nanos{0};
  std::size_t n = 0;
  for (const block_key& k : keys) {
    if (const std::uint32_t id = index_.find(k); id != npos) {
      const entry& e = entries_[id];
      if (e.state != entry_state::committed || !pin_held(e))
        n += std::max(pool_.slot_bytes(e.slot.size_class), put_slot);
      continue;
    }
    if (const auto t = tier_index_.find(k); t != tier_index_.end()) {
      n += std::max(slot_of(t->second.c), put_slot);
      continue;
    }
    if (disk_)
      if (const auto info = usable_disk_copy(st, k, wall)) {
        // Its pins come back with it, never refused (a copy that then
        // fails its read is recomputed: the budget's fallback checks it).
        if (info->pins == 0)
          n += std::max(slot_of(info->c), put_slot);
        continue;
      }
    n += put_slot;
  }
  return n;
}

result<std::optional<std::size_t>>
block_store::check_pins_of(ns_id ns, std::span<const block_key> keys,
                           const put_options& options,
                           std::string_view call) const {
  if (!options.pin)
    return std::optional<std::size_t>{};
  const std::size_t need = pin_bytes_at_most(ns, keys, options);
  if (auto room = pin_room(need,
                           [&] {
                             return std::string(call) + " with a pin over " +
                                    std::to_string(keys.size()) + " blocks";
                           });
      !room)
    return unexpected<error>(room.error());
  return std::optional<std::size_t>{need};
}

result<void> block_store::take_pin_budget(std::size_t need,
                                          std::string_view what,
                                          const block_key& key) {
  if (pin_budget_ && need <= *pin_budget_) {
    *pin_budget_ -= need;
    return {};
  }
  return pin_room(need + pin_budget_.value_or(0),
                  [&] { return std::string(what) + " " + key.to_hex(); });
}

bool block_store::would_pin(std::uint32_t id) const noexcept {
  const entry& e = entries_[id];
  return e.state == entry_state::committed && !e.dead && e.pins == 0;
}

void block_store::pin_once(std::uint32_t id) {
  entry& e = entries_[id];
  if (e.state != entry_state::committed || e.dead || e.pins > 0)
    return;
  set_pins(id, 1);
  if (pin_log_ != nullptr)
    pin_log_->emplace_back(id, e.generation);
  recency_unlink(id);    // no demotion candidate while pinned
  (void)spill(id, true); // pins survive restarts
  refresh_evictable(id);
}

void block_store::raise_priority(std::uint32_t id, priority p) noexcept {
  entry& e = entries_[id];
  if (p > e.prio)
    e.prio = p; // the policies see it at the touch() that follows
}

result<std::size_t> block_store::acquire_prefix(ns_id ns,
                                                std::span<const block_key> keys,
                                                std::vector<read_lease>& out) {
  // No request priority: the blocks keep theirs.
  return acquire_prefix_at(ns, keys, out, priority::background, true);
}

result<std::size_t>
block_store::acquire_prefix_at(ns_id ns, std::span<const block_key> keys,
                               std::vector<read_lease>& out, priority p,
                               bool from_tier) {
  out.clear();
  if (auto st = check_ns(ns); !st) {
    count_rejected();
    return unexpected<error>(st.error());
  }
  const nanos start = now();
  lease_prefix(ns, keys, out, start, p);
  // The prefix goes on in the memory tier (lookup() counts it cached):
  // bring it back, as process() does, and lease it too. Before, the
  // prefix stopped at memory's end.
  if (from_tier && tier_ && out.size() < keys.size()) {
    // A block that cannot be brought back is no error of this call.
    const nested_scope nested(*this);
    poll_tier();
    const std::size_t n = tier_prefix_length(ns, keys.subspan(out.size()));
    if (n > 0) {
      put_options use; // the blocks keep their own priority and partition
      use.prio = p;
      const block_key parent = out.empty() ? block_key{} : out.back().key();
      const std::size_t from = out.size();
      (void)promote_from_tier(ns, keys.subspan(from, n), parent, use);
      lease_prefix(ns, keys.subspan(from), out, now(), p);
    }
  }
  count_lookup(start, out.size(), keys.size());
  return out.size();
}

void block_store::lease_prefix(ns_id ns, std::span<const block_key> keys,
                               std::vector<read_lease>& out, nanos t,
                               std::optional<priority> use) {
  for (const block_key& key : keys) {
    const std::uint32_t id = find_visible(ns, key, t);
    if (id == npos)
      break;
    if (entries_[id].parent_unknown && !out.empty())
      adopt(id, out.back().key()); // the request names its parent
    if (use) {
      raise_priority(id, *use);
      touch(id);
    }
    ++entries_[id].leases;
    refresh_evictable(id);
    out.push_back(read_lease(this, id, key));
  }
}

result<read_lease> block_store::acquire(ns_id ns, const block_key& key) {
  if (auto st = check_ns(ns); !st) {
    count_rejected();
    return unexpected<error>(st.error());
  }
  std::uint32_t id = find_visible(ns, key, now());
  promotion_refused_.reset();
  if (id == npos && (promote_key_from_tier(ns, key) ||
                     promote_key_from_disk(ns, key, keep_recorded())))
    id = find_visible(ns, key, now());
  if (id == npos)
    return unexpected<error>(not_cached("block ", key));
  touch(id);
  ++entries_[id].leases;
  refresh_evictable(id);
  return read_lease(this, id, key);
}

void block_store::release_lease(std::uint32_t id) noexcept {
  entry& e = entries_[id];
  KVFLEET_CHECK(e.leases > 0, "lease released twice");
  --e.leases;
  refresh_evictable(id);
}

result<codec> block_store::stored_codec(const read_lease& lease) const {
  if (lease.store_ != this)
    return not_our_lease(lease.store_);
  return entries_[lease.id_].c;
}

result<std::size_t> block_store::stored_bytes(const read_lease& lease) const {
  if (lease.store_ != this)
    return not_our_lease(lease.store_);
  return std::size_t{entries_[lease.id_].stored_bytes};
}

std::byte* block_store::host_ptr(const entry& e) noexcept {
  std::byte* base = backend_->host_data();
  return base == nullptr ? nullptr : base + pool_.offset(e.slot);
}

result<void> block_store::read(const read_lease& lease,
                               std::span<std::byte> out) {
  if (lease.store_ != this)
    return not_our_lease(lease.store_);
  const nanos start = now();
  entry& e = entries_[lease.id_];
  if (e.corrupt)
    return refuse_corrupt(e, out);
  const ns_state& st = namespaces_[e.ns];
  if (out.size() != st.spec.value_bytes())
    return make_error(errc::wrong_value_size,
                      "read buffer holds " + std::to_string(out.size()) +
                          " bytes, a block of '" + st.spec.model + "' needs " +
                          std::to_string(st.spec.value_bytes()));
  std::uint64_t sum = 0;
  const std::byte* src = host_ptr(e);
  std::span<const std::byte> stored;
  if (src == nullptr) {
    std::span<std::byte> buf(scratch2_.data(), e.stored_bytes);
    if (auto r = backend_->read(pool_.offset(e.slot), buf); !r)
      return unexpected<error>(r.error());
    stored = buf;
  } else {
    stored = {src, e.stored_bytes};
  }
  if (e.c == codec::none) {
    sum = copy_out_with_checksum(out, stored);
  } else {
    sum = block_checksum(stored);
    if (sum == e.checksum) {
      auto d = decode(e.c, st.spec.type, stored, out);
      if (!d)
        return unexpected<error>(d.error());
    }
  }
  if (sum != e.checksum)
    return drop_corrupt(lease.id_, out);
  ++stats_.reads;
  stats_.read_ns.record(static_cast<std::uint64_t>((now() - start).count()));
  return {};
}

result<void> block_store::read_raw(const read_lease& lease,
                                   std::span<std::byte> out) {
  if (lease.store_ != this)
    return not_our_lease(lease.store_);
  const nanos start = now();
  entry& e = entries_[lease.id_];
  if (e.corrupt)
    return refuse_corrupt(e, out);
  if (out.size() != e.stored_bytes)
    return make_error(errc::wrong_value_size,
                      "raw read buffer holds " + std::to_string(out.size()) +
                          " bytes, the stored block has " +
                          std::to_string(e.stored_bytes));
  if (auto r = backend_->read(pool_.offset(e.slot), out); !r)
    return unexpected<error>(r.error());
  if (block_checksum(out) != e.checksum)
    return drop_corrupt(lease.id_, out);
  ++stats_.reads;
  stats_.read_ns.record(static_cast<std::uint64_t>((now() - start).count()));
  return {};
}

result<void> block_store::refuse_corrupt(const entry& e,
                                         std::span<std::byte> out) const {
  std::memset(out.data(), 0, out.size());
  return make_error(errc::checksum_mismatch,
                    "block " + e.key.to_hex() +
                        " failed its checksum on an earlier read and was "
                        "dropped");
}

result<void> block_store::drop_corrupt(std::uint32_t id,
                                       std::span<std::byte> out) {
  std::memset(out.data(), 0, out.size());
  const block_key k = entries_[id].key;
  drop_damaged(id);
  return make_error(errc::checksum_mismatch, "block " + k.to_hex() +
                                                 " failed its checksum and "
                                                 "was dropped");
}

void block_store::drop_damaged(std::uint32_t id) {
  ++stats_.checksum_failures;
  entries_[id].corrupt = true; // a lease still on it reads nothing more
  const block_key k = entries_[id].key;
  // The damage may have come from disk (promotion does not hash; reads
  // do): drop that copy too, so it is not promoted again.
  // Not another namespace's copy of the same raw key: this block never
  // came from it (promotion checks the namespace).
  if (disk_) {
    const auto info = disk_->lookup(k);
    if (info && info->ns == namespaces_[entries_[id].ns].fingerprint)
      (void)disk_->erase(k);
  }
  // Its cached descendants can no longer be reached; drop them as well,
  // so the prefix can be recomputed and cached again: also those below a
  // dead (expired, held) one, and pinned ones. A pin of the damaged block
  // holds nothing worth keeping, and one of a descendant holds a block no
  // request reaches; kept, either held the damaged entry, whose key could
  // then not be put again ("still held") and whose prefix every request
  // computed uncached, until an unpin that may never come. Their disk
  // copies keep their pins. Corruption is rare, so a scan of the entries
  // is fine here.
  struct doomed_entry {
    std::uint32_t id;
    std::uint32_t generation;
  };
  std::vector<doomed_entry> doomed{{id, entries_[id].generation}};
  for (std::size_t i = 0; i < doomed.size(); ++i)
    for (std::uint32_t c = 0; c < entries_.size(); ++c)
      if (entries_[c].parent == doomed[i].id &&
          entries_[c].state == entry_state::committed)
        doomed.push_back({c, entries_[c].generation});
  // Leaves first. Removing one may remove its dead parent too, whose entry
  // may then be reused: the generation tells.
  for (std::size_t i = doomed.size(); i > 0; --i) {
    const auto [d, generation] = doomed[i - 1];
    entry& e = entries_[d];
    if (e.generation != generation || e.state != entry_state::committed)
      continue;
    set_pins(d, 0);
    if (e.dead)
      refresh_evictable(d);
    else
      kill(d);
  }
}

// ---------------------------------------------------------------- puts

size_partition block_store::partition_for(std::uint32_t tokens) const {
  if (tokens < config_.partitions.medium_from)
    return size_partition::small;
  if (tokens < config_.partitions.long_from)
    return size_partition::medium;
  return size_partition::large;
}

std::uint32_t block_store::partition_start(size_partition p) const {
  switch (p) {
  case size_partition::small:
    return 0;
  case size_partition::medium:
    return config_.partitions.medium_from;
  case size_partition::large:
    return config_.partitions.long_from;
  }
  return 0;
}

std::uint32_t block_store::new_entry() {
  if (!free_entries_.empty()) {
    const std::uint32_t id = free_entries_.back();
    free_entries_.pop_back();
    return id;
  }
  entries_.emplace_back();
  return static_cast<std::uint32_t>(entries_.size() - 1);
}

std::optional<result<put_handle>> block_store::reserve_existing(
    ns_id ns, std::uint32_t existing, const block_key& parent,
    const put_options& options, nanos start, bool sets_expiry) {
  const ns_state& st = namespaces_[ns.value];
  const block_key key = entries_[existing].key; // a copy: kill() clears it
  entry& e = entries_[existing];
  if (e.ns != ns.value) {
    count_rejected();
    return make_error(errc::namespace_conflict,
                      "block " + key.to_hex() +
                          " belongs to another namespace");
  }
  if (e.state != entry_state::committed) {
    count_rejected();
    return make_error(errc::busy, "another put of block " + key.to_hex() +
                                      " is in progress");
  }
  auto duplicate = [&] {
    put_handle h = open_handle(existing, key, start);
    h.duplicate_ = true;
    h.pin_ = options.pin;
    h.prio_ = options.prio;
    h.parent_ = parent;
    h.expires_at_ = expiry_after(start, options.ttl.value_or(st.options.ttl));
    h.sets_expiry_ = sets_expiry;
    ++entries_[existing].open_duplicates;
    // The put holds the block until it ends, as a fresh put holds its
    // slot: a lease, so room made for other puts cannot evict it (nor
    // free it once dead) before the commit, which needs it.
    ++entries_[existing].leases;
    refresh_evictable(existing);
    if (sets_expiry) // a put's; a promotion's finds the block in memory
      ++stats_.reserves;
    return h;
  };
  const bool expired = expired_by(e.expires_at, start.count());
  if (!e.dead && !expired)
    return duplicate();
  if (!e.dead)
    ++stats_.expirations; // no lookup has seen it expire yet
  kill(existing);         // removes it when nothing holds it
  if (index_.find(key) != npos) {
    if (e.corrupt) {
      count_rejected();
      return make_error(errc::busy, "a corrupt copy of block " + key.to_hex() +
                                        " is still held by a reader");
    }
    // An expired copy that a reader or a cached child still holds (a
    // child outlives its parent's TTL when it was put later). Its key is
    // its value, so the new put's commit brings it back with the new TTL
    // rather than failing until the last holder lets go; its children
    // become reachable again. Not this reserve: an aborted put changes
    // nothing.
    return duplicate();
  }
  return std::nullopt; // gone: the put goes on as a fresh one
}

result<put_handle> block_store::reserve(ns_id ns, const block_key& key,
                                        const block_key& parent,
                                        const put_options& options) {
  return reserve_block(ns, key, parent, options, true);
}

result<put_handle> block_store::reserve_block(ns_id ns, const block_key& key,
                                              const block_key& parent,
                                              const put_options& options,
                                              bool sets_expiry) {
  collect_disk();
  auto st_r = check_ns(ns);
  if (!st_r) {
    count_rejected();
    return unexpected<error>(st_r.error());
  }
  const ns_state& st = **st_r;
  if (auto ok = check_put_options(options, st.options.default_codec); !ok) {
    count_rejected();
    return unexpected<error>(ok.error());
  }
  const codec c = options.codec_override.value_or(st.options.default_codec);
  if (key.is_null()) {
    count_rejected();
    return make_error(errc::invalid_argument,
                      "the all-zero block key is reserved");
  }
  if (key == parent) {
    count_rejected();
    return make_error(errc::invalid_argument,
                      "block " + key.to_hex() +
                          " names itself as its parent: a block cannot be "
                          "its own parent");
  }
  const nanos start = now();
  // The parent first, for a duplicate put too: it must be cached (or
  // reserved) whether or not `key` is.
  std::uint32_t pid = npos;
  if (!parent.is_null()) {
    pid = usable_parent(ns, parent, start);
    // lookup() counts a prefix in the memory tier as cached (the engine
    // actor's, one on disk too), so a host extends it: bring the parent
    // back, as acquire() does (from disk alone: see promote_key_from_disk),
    // at its own priority (its codec, TTL, pin and partition are its own
    // too; a disk copy that records no partition lands in the put's).
    promotion_refused_.reset();
    if (pid == npos && index_.find(parent) == npos &&
        (promote_key_from_tier(ns, parent) ||
         promote_key_from_disk(ns, parent, for_parent_of(options))))
      pid = usable_parent(ns, parent, start);
    if (pid == npos) {
      count_rejected();
      return unexpected<error>(not_cached("parent block ", parent));
    }
  }
  // The parent's chain brought back from the memory tier can hold `key`
  // itself (a put naming a descendant of its key as parent): it is back
  // now, and this put is a duplicate of it, never a second entry for the
  // same key.
  if (const std::uint32_t existing = index_.find(key); existing != npos)
    if (auto r =
            reserve_existing(ns, existing, parent, options, start, sets_expiry))
      return std::move(*r);
  const size_partition part = partition_for(options.request_tokens);
  const std::uint16_t cls = st.size_class[static_cast<std::size_t>(c)];
  // A put whose pin would not fit is refused before it makes room (its
  // commit checks again: other pins may come meanwhile). A promotion's
  // pin, and that of a block whose disk copy holds pins, is the copy's:
  // never refused.
  if (options.pin && sets_expiry && !pin_budget_) {
    const auto copy =
        disk_ ? usable_disk_copy(st, key, disk_clock().now()) : std::nullopt;
    if (!copy || copy->pins == 0)
      // Its parent's chain too, where no pin holds it yet: the pinned
      // block keeps it in memory.
      if (auto pin_ok = pin_room(pool_.slot_bytes(cls) + pin_cost(pid),
                                 [&] {
                                   return "the put of block " + key.to_hex() +
                                          " with a pin";
                                 });
          !pin_ok) {
        count_rejected();
        return unexpected<error>(pin_ok.error());
      }
  }
  if (pid != npos) {
    // Holding the child count up keeps the parent out of eviction below.
    ++entries_[pid].children;
    refresh_evictable(pid);
  }
  auto room = make_room(part, cls, pid);
  result<slot_ref> slot =
      room ? pool_.allocate(cls)
           : result<slot_ref>(unexpected<error>(room.error()));
  if (!slot) {
    if (pid != npos) {
      --entries_[pid].children;
      refresh_evictable(pid);
    }
    count_rejected();
    return unexpected<error>(slot.error());
  }
  const std::uint32_t id = new_entry();
  pool_.set_owner(*slot, id);
  entry& e = entries_[id];
  e.key = key;
  e.slot = *slot;
  e.parent = pid;
  e.ns = ns.value;
  e.state = entry_state::reserved;
  e.c = c;
  e.prio = options.prio;
  e.part = part;
  e.stored_bytes =
      static_cast<std::uint32_t>(encoded_size(c, st.spec.elements_per_block()));
  e.pin_on_commit = options.pin;
  const nanos ttl = options.ttl.value_or(st.options.ttl);
  e.expires_at = expiry_after(start, ttl);
  index_.insert(key, id);
  e.promotion = !sets_expiry; // a put's expiry, not a promotion's
  if (!e.promotion)
    ++stats_.reserves;
  put_handle h = open_handle(id, key, start);
  h.sets_expiry_ = sets_expiry;
  return h;
}

std::uint32_t block_store::usable_parent(ns_id ns, const block_key& key,
                                         nanos t) {
  const std::uint32_t id = index_.find(key);
  if (id == npos || entries_[id].ns != ns.value)
    return npos;
  const entry& p = entries_[id];
  // Expires it, counted, when its TTL has run out unseen (removed when
  // nothing holds it); a reserved parent is left as it is, and so is the
  // prefix a put_tokens() call matched, leased and puts again (it renews
  // its expiry once its new blocks are written). (Before, a prefix whose
  // TTL ran out during that call was killed here, and the call failed
  // with "parent block is not cached".)
  if (p.state == entry_state::committed && !p.dead &&
      !(renewing_prefix_ && p.leases > 0))
    (void)find_visible(ns, key, t);
  // A dead parent (expired, still held) will do while a put of it is
  // open: its commit brings it back (put_tokens() reserves a chain before
  // committing it).
  if (p.state == entry_state::free || (p.dead && p.open_duplicates == 0))
    return npos;
  return id;
}

put_handle block_store::open_handle(std::uint32_t id, const block_key& key,
                                    nanos start) {
  put_handle h;
  h.store_ = this;
  h.id_ = id;
  h.generation_ = entries_[id].generation;
  h.key_ = key;
  h.phase_ = put_handle::phase::open;
  h.started_ = start.count();
  return h;
}

result<void> block_store::check_open(const put_handle& h) const {
  if (h.store_ != this)
    return not_our_put(h.store_);
  switch (h.phase_) {
  case put_handle::phase::none:
    return make_error(errc::invalid_handle, "empty put handle");
  case put_handle::phase::committed:
    return make_error(errc::double_commit, "put of block " + h.key_.to_hex() +
                                               " was already committed");
  case put_handle::phase::aborted:
    return make_error(errc::commit_after_abort,
                      "put of block " + h.key_.to_hex() + " was aborted");
  case put_handle::phase::open:
    break;
  }
  const entry& e = entries_[h.id_];
  if (e.generation != h.generation_ || e.key != h.key_)
    return make_error(errc::invalid_handle, "stale put handle");
  return {};
}

void block_store::unwrite(put_handle& h) {
  // The slot may hold part of the failed value: the checksum of an earlier
  // write no longer matches it, and a commit would store a block that
  // fails its first read (or spill it to disk pinned). Written again, the
  // put can still commit.
  entries_[h.id_].state = entry_state::reserved;
  h.written_ = false;
}

result<void> block_store::write(put_handle& h,
                                std::span<const std::byte> value) {
  if (auto ok = check_open(h); !ok) {
    count_rejected();
    return ok;
  }
  entry& e = entries_[h.id_];
  const ns_state& st = namespaces_[e.ns];
  if (value.size() != st.spec.value_bytes()) {
    count_rejected();
    return make_error(errc::wrong_value_size,
                      "value of " + std::to_string(value.size()) +
                          " bytes for a block of '" + st.spec.model +
                          "', which holds " +
                          std::to_string(st.spec.value_bytes()));
  }
  if (h.duplicate_) {
    h.written_ = true;
    return {};
  }
  std::byte* dst = host_ptr(e);
  if (dst != nullptr) {
    std::span<std::byte> slot(dst, e.stored_bytes);
    if (e.c == codec::none) {
      e.checksum = copy_in_with_checksum(slot, value);
    } else {
      auto n = encode(e.c, st.spec.type, value, slot);
      if (!n) {
        count_rejected();
        unwrite(h);
        return unexpected<error>(n.error());
      }
      e.checksum = block_checksum(slot);
    }
  } else {
    std::span<std::byte> buf(scratch2_.data(), e.stored_bytes);
    if (e.c == codec::none) {
      std::memcpy(buf.data(), value.data(), value.size());
    } else {
      auto n = encode(e.c, st.spec.type, value, buf);
      if (!n) {
        count_rejected();
        return unexpected<error>(n.error()); // the slot is untouched
      }
    }
    if (auto w = backend_->write(pool_.offset(e.slot), buf); !w) {
      count_rejected();
      unwrite(h);
      return w;
    }
    e.checksum = block_checksum(buf);
  }
  e.state = entry_state::written;
  h.written_ = true;
  return {};
}

namespace {

/// `producer.produce()`, with an exception it throws turned into an error
/// value: the producer is the host's code (an inference engine's prefill),
/// and a store call never throws, so the caller (an engine actor serving
/// other requests) gets an error reply instead of dying.
result<void> produce_caught(kv_producer& producer, const namespace_spec& spec,
                            const block_key& key, std::span<std::byte> out) {
  try {
    return producer.produce(spec, key, out);
  } catch (...) {
    return unexpected<error>{current_exception_error(
        "the producer threw for block " + key.to_hex())};
  }
}

} // namespace

result<void> block_store::write_from(put_handle& h, kv_producer& producer) {
  if (auto ok = check_open(h); !ok) {
    count_rejected();
    return ok;
  }
  entry& e = entries_[h.id_];
  const ns_state& st = namespaces_[e.ns];
  std::span<std::byte> value(scratch_.data(), st.spec.value_bytes());
  std::byte* dst = host_ptr(e);
  if (!h.duplicate_ && dst != nullptr && e.c == codec::none) {
    // Produce straight into the slot: no staging copy.
    std::span<std::byte> slot(dst, e.stored_bytes);
    if (auto p = produce_caught(producer, st.spec, e.key, slot); !p) {
      count_rejected();
      unwrite(h);
      return p;
    }
    e.checksum = block_checksum(slot);
    e.state = entry_state::written;
    h.written_ = true;
    return {};
  }
  if (auto p = produce_caught(producer, st.spec, e.key, value); !p) {
    count_rejected();
    return p;
  }
  return write(h, value); // counts its own failure
}

result<void> block_store::commit(put_handle& h) {
  if (auto ok = check_open(h); !ok) {
    count_rejected();
    return ok;
  }
  if (!h.written_) {
    count_rejected();
    return make_error(errc::not_written, "put of block " + h.key_.to_hex() +
                                             " committed before write");
  }
  if (!h.duplicate_) {
    const std::uint32_t pid = entries_[h.id_].parent;
    // A dead parent (expired, held) with a put of it open (reserve() takes
    // a child under a dead parent only then): that put's commit brings it
    // back, so it goes first. One that died after this child's reserve,
    // with no put of it open, does not hold the child back: a child may
    // outlive its parent's TTL (a put of the parent makes it reachable
    // again), and waiting could never end.
    if (pid != npos &&
        (entries_[pid].state != entry_state::committed ||
         (entries_[pid].dead && entries_[pid].open_duplicates > 0))) {
      count_rejected();
      return make_error(errc::busy,
                        "block " + h.key_.to_hex() +
                            " cannot be committed "
                            "before its parent " +
                            entries_[pid].key.to_hex() +
                            ": commit a chain from its first block");
    }
    // The parent, or a dead ancestor it hangs from (dropped with it),
    // failed its checksum and was dropped while this put was open.
    // Committed under it, the block would be unreachable, and it would
    // hold the dropped entry, whose key could then not be put again
    // ("still held") for as long as it lived.
    bool under_corrupt = false;
    for (std::uint32_t a = pid; a != npos && entries_[a].dead;
         a = entries_[a].parent)
      if (entries_[a].corrupt) {
        under_corrupt = true;
        break;
      }
    if (under_corrupt) {
      h.phase_ = put_handle::phase::aborted;
      abort_reservation(h.id_);
      count_rejected();
      return make_error(errc::not_found,
                        "block " + h.key_.to_hex() +
                            " cannot be committed: "
                            "its parent " +
                            entries_[pid].key.to_hex() +
                            " (or a block before it) failed its checksum and "
                            "was dropped while this put was open; put the "
                            "chain from its first block");
    }
  }
  if (h.duplicate_ && entries_[h.id_].corrupt) {
    // It failed its checksum while this put was open and was dropped (a
    // reader still holds its entry): there are no bytes to bring back, and
    // a duplicate put writes none.
    h.phase_ = put_handle::phase::aborted;
    if (h.sets_expiry_)
      ++stats_.aborts;
    --entries_[h.id_].open_duplicates;
    release_lease(h.id_); // the put's hold: removes the dropped block now
    count_rejected();
    return make_error(errc::checksum_mismatch,
                      "block " + h.key_.to_hex() +
                          " failed its checksum and was dropped while this "
                          "put was open: put it again");
  }
  if (h.duplicate_ && entries_[h.id_].dead && h.sets_expiry_) {
    const std::uint32_t pid = entries_[h.id_].parent;
    // A dead parent with a put of it open comes back at that put's commit:
    // this one waits for it, as a new child would (busy, still open).
    if (pid != npos && entries_[pid].state == entry_state::committed &&
        entries_[pid].dead && entries_[pid].open_duplicates > 0) {
      count_rejected();
      return make_error(errc::busy,
                        "block " + h.key_.to_hex() +
                            " cannot be committed before its parent " +
                            entries_[pid].key.to_hex() +
                            ": commit a chain from its first block");
    }
    if (pid != npos &&
        (entries_[pid].state != entry_state::committed || entries_[pid].dead)) {
      // Its parent is gone (dropped with a corrupt ancestor, or expired
      // with no put of it to bring it back first): brought back under it,
      // the block would be unreachable by prefix and would hold the
      // parent's key, which could then not be cached again.
      auto gone = make_error(errc::not_found,
                             "block " + h.key_.to_hex() +
                                 " cannot be brought back: its parent " +
                                 entries_[pid].key.to_hex() +
                                 " is not cached; put the chain from its "
                                 "first block");
      h.phase_ = put_handle::phase::aborted;
      ++stats_.aborts;
      --entries_[h.id_].open_duplicates;
      release_lease(h.id_); // the put's hold: removes the dead block now
      count_rejected();
      return gone;
    }
  }
  // A new block's disk copy's pins are the block's: brought back
  // (restored_pins_), or put again while its copy holds pins from before a
  // restart (else the next pin or unpin would set the copy's count to this
  // one's and wipe those holders' pins). A put's own pin is one more only
  // when none is held ("a block already pinned gets no second pin"). A
  // block brought back from disk takes its copy's count as it is now, not
  // as it was when its read was queued: an unpin meanwhile (of the copy,
  // the block being on its way) stands. Its pin_on_commit was only that
  // old count.
  std::uint32_t held = 0;
  if (!h.duplicate_) {
    const entry& e = entries_[h.id_];
    held = h.restored_pins_;
    if (disk_ && (held == 0 || h.from_disk_copy_))
      if (const auto info =
              usable_disk_copy(namespaces_[e.ns], e.key, disk_clock().now()))
        held = info->pins;
  }
  const entry& pe = entries_[h.id_];
  const bool own_pin = !h.duplicate_ && pe.pin_on_commit && !h.from_disk_copy_;
  // A new pin, checked at the reserve too, may not fit any more (other
  // pins came since): refused whole, as an abort. One its disk copy holds
  // is that copy's: counted, never refused (max_pinned_fraction).
  const bool new_pin =
      h.duplicate_ ? h.pin_ && pe.pins == 0 : own_pin && held == 0;
  // A pinning duplicate of a block brought back alone, whose put names its
  // parent, links it under that chain (adopt()): where pins hold the block
  // (this pin, or one it had), the chain is charged too, so the put is
  // refused as a new one under it would be, instead of leaving a pinned
  // block unlinked, its chain evictable.
  std::size_t chain = 0;
  if (h.duplicate_ && h.pin_)
    if (const std::uint32_t pid = adoptive_parent(h.id_, h.parent_);
        pid != npos)
      chain = pin_cost(pid, charged_prefix_);
  if (new_pin || chain > 0) {
    // Inside a checked process() or put_tokens(), its share of what that
    // call was checked for; past it (a disk copy counted for its pins that
    // was recomputed), checked as any.
    const std::size_t own = new_pin ? pin_charge(h.id_) : 0;
    if (auto room =
            take_pin_budget(own + chain, "the put with a pin of block", h.key_);
        !room) {
      (void)abort(h);
      count_rejected();
      return room;
    }
  }
  h.phase_ = put_handle::phase::committed;
  // A promotion's time is mostly its read from disk: no put's latency.
  if (h.sets_expiry_)
    stats_.put_ns.record(
        static_cast<std::uint64_t>(now().count() - h.started_));
  if (h.duplicate_) {
    if (h.sets_expiry_)
      ++stats_.duplicate_puts;
    entry& d = entries_[h.id_];
    --d.open_duplicates;
    if (d.dead && h.sets_expiry_) {
      // Expired before the reserve or since, and still held (a reader, a
      // cached child): the put brings it back with its own TTL, as a put
      // of an expired block does (its key is its value). (A promotion from
      // the tier or disk is no put: a block dead in memory stays so.)
      d.dead = false;
      if (d.announced_gone) {
        d.announced_gone = false;
        if (config_.on_block_event)
          config_.on_block_event(block_event::stored, d.key);
      }
      d.expires_at = h.expires_at_;
      refresh_evictable(h.id_);
      match_disk_copy_expiry(h.id_);
      note_expiry(h.id_);
    } else if (h.sets_expiry_) {
      d.expires_at = h.expires_at_;
      match_disk_copy_expiry(h.id_);
      note_expiry(h.id_);
    } else if (d.dead) {
      // A promotion of a block dead in memory: it stays dead, and letting
      // go of the hold may remove it, so nothing below may touch it.
      release_lease(h.id_);
      return {};
    }
    // The put's hold, let go before adopt(), which waits for leases.
    // Pinned first: its pin was charged as a root's (its own slot), and
    // adopt() links it under its parent only if pins may hold that chain.
    release_lease(h.id_);
    if (h.pin_)
      pin_once(h.id_);
    adopt(h.id_, h.parent_);
    raise_priority(h.id_, h.prio_);
    touch(h.id_);
    return {};
  }
  const std::uint32_t id = h.id_;
  entry& e = entries_[id];
  e.state = entry_state::committed;
  // A block brought back from the memory tier or disk keeps its count.
  e.access_count = std::max<std::uint32_t>(1, h.restored_count_);
  set_pins(id, std::max<std::uint32_t>(own_pin ? 1 : 0, held)); // see above
  if (own_pin && held == 0 && pin_log_ != nullptr)
    pin_log_->emplace_back(id, e.generation);
  account(e, true);
  note_expiry(id);
  ++tick_;
  access_info info;
  info.tick = tick_;
  info.count = e.access_count;
  info.prio = e.prio;
  info.resident_blocks = index_.size();
  info.key_hash = block_key_hash{}(e.key);
  info.parent = e.parent;
  if (config_.next_use)
    info.next_use = next_use_of(e.key);
  policies_[static_cast<std::size_t>(e.part)]->on_access(id, info, true);
  if (e.pins == 0 && may_demote(e))
    recency_push_front(id); // the demotion scan's candidates
  refresh_evictable(id);
  if (config_.on_block_event)
    config_.on_block_event(block_event::stored, e.key);
  if (!tier_index_.empty() && tier_index_.count(e.key) != 0)
    drop_tier_block(e.key, false); // memory has the newer copy now
  // A put's expiry is the newest word on the block; a promotion's is the
  // copy's below, and leaves the disk copy alone.
  if (h.sets_expiry_)
    match_disk_copy_expiry(id);
  if (e.pins > 0)
    (void)spill(id, true); // pins survive restarts
  if (!e.promotion)
    ++stats_.commits;
  e.promotion = false;
  return {};
}

result<void> block_store::abort(put_handle& h) {
  if (h.store_ != this)
    return not_our_put(h.store_);
  if (h.phase_ == put_handle::phase::aborted)
    return make_error(errc::invalid_handle, "put of block " + h.key_.to_hex() +
                                                " was already aborted");
  if (h.phase_ == put_handle::phase::committed)
    return make_error(errc::invalid_handle, "put of block " + h.key_.to_hex() +
                                                " was already committed");
  if (auto ok = check_open(h); !ok)
    return ok;
  h.phase_ = put_handle::phase::aborted;
  if (h.duplicate_) {
    if (h.sets_expiry_) // abort_reservation() counts the others
      ++stats_.aborts;
    --entries_[h.id_].open_duplicates;
    release_lease(h.id_); // the put's hold on the cached block
  } else {
    abort_reservation(h.id_);
  }
  return {};
}

void block_store::drop_put(const put_handle& h) noexcept {
  if (h.duplicate_) {
    if (h.sets_expiry_) // abort_reservation() counts the rest
      ++stats_.aborts;
    --entries_[h.id_].open_duplicates;
    release_lease(h.id_); // the put's hold on the cached block
  } else {
    abort_if_current(h.id_, h.generation_);
  }
}

void block_store::abort_if_current(std::uint32_t id,
                                   std::uint32_t generation) noexcept {
  if (id < entries_.size() && entries_[id].generation == generation &&
      (entries_[id].state == entry_state::reserved ||
       entries_[id].state == entry_state::written))
    abort_reservation(id);
}

void block_store::abort_reservation(std::uint32_t id) noexcept {
  if (entries_[id].children > 0) {
    // Puts chained from this one are still open: the caller aborted or
    // dropped the parent first. Abort them too, deepest first, so no open
    // put points at a freed parent; their handles turn stale. (A child
    // cannot be committed while its parent is not, so all of them are
    // open.) Our own callers abort children first and never get here.
    std::vector<std::uint32_t> open{id};
    for (std::size_t i = 0; i < open.size(); ++i)
      for (std::uint32_t c = 0; c < entries_.size(); ++c)
        if (entries_[c].parent == open[i] &&
            (entries_[c].state == entry_state::reserved ||
             entries_[c].state == entry_state::written))
          open.push_back(c);
    for (std::size_t i = open.size() - 1; i > 0; --i)
      abort_reservation(open[i]);
  }
  entry& e = entries_[id];
  KVFLEET_CHECK(e.state == entry_state::reserved ||
                    e.state == entry_state::written,
                "abort of a block that is not being put");
  KVFLEET_CHECK(e.children == 0,
                "abort of a block whose child is still being put");
  const std::uint32_t pid = e.parent;
  if (!e.promotion) // however it ends: abort(), with its parent, dropped
    ++stats_.aborts;
  e.promotion = false;
  pool_.free(e.slot);
  index_.erase(e.key);
  ++e.generation;
  const std::uint32_t gen = e.generation;
  e = entry{};
  e.generation = gen;
  free_entries_.push_back(id);
  if (pid != npos) {
    --entries_[pid].children;
    refresh_evictable(pid);
  }
}

// ---------------------------------------------------------------- tokens

result<void>
block_store::compute_token_keys(const ns_state& st,
                                std::span<const std::uint32_t> tokens) {
  token_keys_.clear();
  try {
    chain_keys(st.fingerprint, st.spec.block_tokens, tokens, token_keys_);
  } catch (const std::bad_alloc&) {
    token_keys_.clear();
    token_keys_.shrink_to_fit();
    return make_error(errc::out_of_memory, "no memory for the block keys of " +
                                               std::to_string(tokens.size()) +
                                               " tokens");
  }
  return {};
}

result<std::size_t>
block_store::put_tokens(ns_id ns, std::span<const std::uint32_t> tokens,
                        std::span<const std::byte> values,
                        const put_options& options) {
  collect_disk();
  auto st_r = check_ns(ns);
  if (!st_r) {
    count_rejected();
    return unexpected<error>(st_r.error());
  }
  const ns_state& st = **st_r;
  if (auto ok = check_put_options(options, st.options.default_codec); !ok) {
    count_rejected();
    return unexpected<error>(ok.error());
  }
  const std::size_t bt = st.spec.block_tokens;
  if (tokens.empty() || tokens.size() % bt != 0) {
    count_rejected();
    return make_error(errc::misaligned_tokens,
                      std::to_string(tokens.size()) +
                          " tokens are not a whole number of blocks of " +
                          std::to_string(bt) + " tokens");
  }
  const std::size_t blocks = tokens.size() / bt;
  const std::size_t vb = st.spec.value_bytes();
  // Divided, not multiplied: blocks * vb can wrap (2^35 tokens of 512 MiB
  // blocks wrapped to 0, and an empty span passed).
  if (values.size() % vb != 0 || values.size() / vb != blocks) {
    count_rejected();
    return make_error(errc::wrong_value_size,
                      std::to_string(values.size()) + " bytes of values for " +
                          std::to_string(blocks) + " blocks of " +
                          std::to_string(vb) + " bytes");
  }
  if (auto ok = compute_token_keys(st, tokens); !ok) {
    count_rejected();
    return unexpected<error>(ok.error());
  }
  const auto pin_need = check_pins_of(ns, token_keys_, options, "put_tokens()");
  if (!pin_need) {
    count_rejected();
    return unexpected<error>(pin_need.error());
  }
  const pin_budget_scope budget(*this, *pin_need);
  // The calls below are the store's own: this call counts once if it fails.
  const nested_scope nested(*this);
  // Lease the cached prefix so making room for the rest cannot evict it,
  // and do no more to it until every block is reserved and written: a put
  // that fails leaves the prefix as it was (its priority, its accesses,
  // no lookup counted). acquire_prefix_at() would raise and touch it now.
  // Expired blocks go first, as make_room() would take them: the room
  // bound below counts what is free, not what expired blocks hold (before,
  // a put the reserves would have fit was refused for them).
  reclaim_expired();
  const nanos start = now();
  token_leases_.clear();
  lease_prefix(ns, token_keys_, token_leases_, start, std::nullopt);
  const std::size_t matched = token_leases_.size();
  const nanos walked = now() - start;
  put_options opts = options;
  if (opts.request_tokens == 0)
    opts.request_tokens = static_cast<std::uint32_t>(
        std::min<std::size_t>(tokens.size(), 0xffffffffU));
  token_puts_.clear();
  auto undo = [this](const error& e) -> result<std::size_t> {
    for (std::size_t i = token_puts_.size(); i > 0; --i)
      token_puts_[i - 1] = put_handle{}; // children first
    token_puts_.clear();
    token_leases_.clear();
    ++stats_.rejected_requests; // this call's failure (see `nested`)
    return unexpected<error>(e);
  };
  // Every block is reserved before any is committed, and a reserved block
  // cannot be evicted: a put too large for the room its partition can get
  // would make room block by block, evicting what it could, then fail and
  // abort them all, having flushed its partition for nothing (a 50-block
  // prompt in a store of 100 holding 28 short blocks took all 28, then
  // failed). So it is refused first, evicting nothing.
  if (auto ok = token_put_could_fit(ns, matched, blocks, opts); !ok)
    return undo(ok.error());
  block_key parent = matched > 0 ? token_keys_[matched - 1] : block_key{};
  // Its leased prefix is put again: not expired under the reserves.
  const internal::scoped_value renew{renewing_prefix_, true};
  for (std::size_t i = matched; i < blocks; ++i) {
    auto h = reserve(ns, token_keys_[i], parent, opts);
    if (!h)
      return undo(h.error());
    token_puts_.push_back(std::move(*h));
    if (auto w = write(token_puts_.back(), values.subspan(i * vb, vb)); !w)
      return undo(w.error());
    parent = token_keys_[i];
  }
  // The prefix's pins take their share of the checked bytes now, while
  // nothing is committed: refused (the budget spent by a block whose disk
  // copy's pins were gone at its commit), the put fails whole.
  if (opts.pin)
    for (const read_lease& l : token_leases_)
      if (would_pin(l.id_))
        // Its own slot, none when pins hold it already: each block of
        // the prefix is charged for itself, before any is pinned.
        if (auto room = take_pin_budget(
                pin_held(entries_[l.id_])
                    ? 0
                    : pool_.slot_bytes(entries_[l.id_].slot.size_class),
                "put_tokens() pinning block", l.key());
            !room)
          return undo(room.error());
  // Every block is reserved and written: the prefix is used now, as
  // acquire_prefix() uses it (before the new blocks' commits, so they are
  // the more recent). Only a commit can still fail (a duplicate's block
  // dropped as corrupt meanwhile).
  for (const read_lease& l : token_leases_) {
    raise_priority(l.id_, opts.prio);
    touch(l.id_);
  }
  {
    // The prefix's pins were charged above: a commit charges its own
    // block (before, its unpinned prefix again, and a call within a block
    // of the limit failed after writing everything).
    const internal::scoped_value prefix{
        charged_prefix_,
        token_leases_.empty() ? npos : token_leases_.back().id_};
    for (put_handle& h : token_puts_)
      if (auto c = commit(h); !c)
        return undo(c.error());
  }
  // The walk's time, not the put's: what acquire_prefix() would record.
  count_lookup(now() - walked, matched, blocks);
  // The cached prefix this put skipped is put again: a new expiry (as a
  // duplicate put's commit sets), and its pin.
  const std::int64_t expires =
      expiry_after(now(), opts.ttl.value_or(st.options.ttl));
  for (const read_lease& l : token_leases_) {
    entries_[l.id_].expires_at = expires;
    match_disk_copy_expiry(l.id_); // as a duplicate put's commit does
    note_expiry(l.id_);
    if (opts.pin)
      pin_once(l.id_); // its share was taken before the commits
  }
  // A block already cached after the matched prefix (a dead one brought
  // back, its cached children) was put again, not added.
  const auto added = static_cast<std::size_t>(
      std::count_if(token_puts_.begin(), token_puts_.end(),
                    [](const put_handle& h) { return !h.already_cached(); }));
  token_puts_.clear();
  token_leases_.clear();
  return added;
}

result<void>
block_store::token_put_could_fit(ns_id ns, std::size_t matched,
                                 std::size_t blocks,
                                 const put_options& options) const {
  // What the put needs at least: a slot for each key after the matched
  // prefix that memory and the memory tier do not hold (one they hold is
  // a duplicate, or comes back into a slot of its own codec: counted as
  // nothing, so this under-counts).
  const ns_state& st = namespaces_[ns.value];
  const codec c = options.codec_override.value_or(st.options.default_codec);
  const std::size_t slot =
      pool_.slot_bytes(st.size_class[static_cast<std::size_t>(c)]);
  std::uint64_t new_blocks = 0;
  for (std::size_t i = matched; i < blocks; ++i)
    if (index_.find(token_keys_[i]) == npos &&
        tier_index_.count(token_keys_[i]) == 0)
      ++new_blocks;
  const std::uint64_t need = new_blocks * slot;
  // What make_room could get for it at most: the free bytes, every
  // unpinned block of its own partition but the put's own cached prefix
  // (leased: it stays), and what the other partitions hold over their
  // shares (they give only while over, each a block past it at most), or
  // with lowest_priority_first all their unpinned blocks (a partition
  // within its share may give its lower priorities). Demotion frees no
  // more than eviction of the same blocks would. Free bytes in slots of
  // other sizes count too, and so do the blocks that hold a pinned or
  // leased block's chain, so this over-counts: a put it lets through can
  // still fail. (Before, pinned blocks and the leased prefix counted as
  // room, and each partition over its share a whole slab past it: a put
  // with half its partition pinned evicted all the rest, then failed.)
  const size_partition part = partition_for(options.request_tokens);
  const auto cap = static_cast<double>(pool_.capacity_bytes());
  std::size_t largest_slot = 0;
  for (std::size_t cls = 0; cls < pool_.class_count(); ++cls)
    largest_slot = std::max(largest_slot,
                            pool_.slot_bytes(static_cast<std::uint16_t>(cls)));
  double room = cap - static_cast<double>(pool_.used_bytes());
  std::array<bool, partition_count> all_of{};
  for (std::size_t q = 0; q < partition_count; ++q) {
    const auto held = static_cast<double>(stats_.bytes_by_partition[q]);
    all_of[q] =
        q == static_cast<std::size_t>(part) || config_.lowest_priority_first;
    if (all_of[q])
      room += held - static_cast<double>(pinned_by_partition_[q]);
    else if (const double over = held - config_.partitions.shares[q] * cap;
             over > 0)
      room += std::min(over + static_cast<double>(largest_slot),
                       held - static_cast<double>(pinned_by_partition_[q]));
  }
  for (const read_lease& l : token_leases_) {
    const entry& e = entries_[l.id_];
    if (e.pins == 0 && all_of[static_cast<std::size_t>(e.part)])
      room -= static_cast<double>(pool_.slot_bytes(e.slot.size_class));
  }
  if (static_cast<double>(need) <= room)
    return {};
  return make_error(
      errc::out_of_memory,
      "no room for the " + std::to_string(new_blocks) + " new blocks (" +
          std::to_string(need) + " bytes) of this put in the " +
          std::string(to_string(part)) +
          " partition: its own unpinned blocks (its cached prefix aside), "
          "the free bytes and the other partitions' bytes over their shares "
          "come " +
          "to " + std::to_string(static_cast<std::uint64_t>(room)) +
          " bytes at most; nothing was evicted");
}

result<std::size_t>
block_store::lookup_tokens(ns_id ns, std::span<const std::uint32_t> tokens) {
  auto st_r = check_ns(ns);
  if (!st_r) {
    count_rejected();
    return unexpected<error>(st_r.error());
  }
  const ns_state& st = **st_r;
  if (auto ok = compute_token_keys(st, tokens); !ok) {
    count_rejected();
    return unexpected<error>(ok.error());
  }
  auto n = lookup(ns, token_keys_);
  if (!n)
    return n;
  return *n * st.spec.block_tokens;
}

// ---------------------------------------------------------------- process

result<process_result> block_store::process(ns_id ns,
                                            std::span<const block_key> keys,
                                            std::size_t input_tokens,
                                            kv_producer& producer,
                                            const put_options& options) {
  // Forgets the last call's new pins first, so that unpin_last_process()
  // after a call that fails early takes back none of them.
  process_pins_.clear();
  auto st_r = check_ns(ns);
  if (!st_r) {
    count_rejected();
    return unexpected<error>(st_r.error());
  }
  const namespace_spec& spec = (*st_r)->spec;
  // Checked here, not only by each block's reserve(): a bad option would
  // make every reserve fail, and the request would succeed caching nothing.
  if (auto ok = check_put_options(options, (*st_r)->options.default_codec);
      !ok) {
    count_rejected();
    return unexpected<error>(ok.error());
  }
  // One key per full block, no more and no fewer: with fewer, the blocks
  // past the last key would be neither matched nor computed, yet counted
  // as computed tokens.
  if (auto ok = check_block_keys(keys.size(), input_tokens, spec.block_tokens);
      !ok) {
    count_rejected();
    return unexpected<error>(ok.error());
  }
  // Keys no block can have, refused here as reserve() refuses them: else
  // the request would succeed computing them uncached (and a warm query
  // report no room as the reason).
  if (auto ok = check_request_keys(keys); !ok) {
    count_rejected();
    return unexpected<error>(ok.error());
  }
  // Refused before it starts when pinning all it covers could pass the
  // pinned limit: its pins are then never refused on the way (no request
  // half pinned, no block computed for a refusal).
  const auto pin_need = check_pins_of(ns, keys, options, "process()");
  if (!pin_need) {
    count_rejected();
    return unexpected<error>(pin_need.error());
  }
  const pin_budget_scope budget(*this, *pin_need);
  const nanos start = now();
  std::vector<read_lease>& leases = process_leases_; // reused: no allocation
  // The calls below are the store's own: a block that cannot be cached is
  // computed anyway and the request succeeds, so they count no rejection;
  // this call counts once if it fails.
  const nested_scope nested(*this);
  auto matched = acquire_prefix_at(ns, keys, leases, options.prio);
  if (!matched) {
    ++stats_.rejected_requests;
    return unexpected<error>(matched.error());
  }
  process_result out;
  out.matched_blocks = *matched;
  out.memory_blocks = *matched;
  // The pins this call adds (process_pins_, empty since the call's start),
  // taken back if it fails.
  struct pin_log_scope {
    block_store& s;
    ~pin_log_scope() { s.pin_log_ = nullptr; }
  } pin_log_guard{*this};
  if (options.pin)
    pin_log_ = &process_pins_;
  // A request that fails after blocks were committed: its pins go (the
  // caller, told of the failure, holds none to unpin), and the blocks it
  // brought back from the memory tier or disk count as hits, as they do
  // when it succeeds (they stay cached).
  const auto fail = [&](const error& e) -> result<process_result> {
    leases.clear();
    pin_log_ = nullptr;
    for (const auto& [id, generation] : process_pins_)
      if (pinned_still(id, generation))
        (void)unpin(ns, entries_[id].key);
    process_pins_.clear();
    const std::size_t from_below = out.matched_blocks - *matched;
    stats_.block_hits += from_below;
    stats_.block_misses -= from_below;
    ++stats_.rejected_requests;
    return unexpected<error>(e);
  };
  put_options opts = options;
  if (opts.request_tokens == 0)
    opts.request_tokens = static_cast<std::uint32_t>(
        std::min<std::size_t>(input_tokens, 0xffffffffU));
  block_key parent =
      out.matched_blocks > 0 ? keys[out.matched_blocks - 1] : block_key{};
  std::size_t next = out.matched_blocks;
  // Below memory, runs of memory-tier blocks and of disk blocks can
  // alternate along the chain (a parent spilled to disk while its child
  // stayed in the tier): each round takes a tier run, then a disk run,
  // until neither moves the prefix on, or a block had to be computed.
  // (Before, one tier run then one disk run: a tier block after a disk
  // block was computed again.)
  for (bool more = true; more && next < keys.size();) {
    more = false;
    if (tier_) {
      poll_tier();
      const std::size_t n = tier_prefix_length(ns, keys.subspan(next));
      if (n > 0) {
        const std::size_t got =
            promote_from_tier(ns, keys.subspan(next, n), parent, opts);
        out.tier_blocks += got;
        out.matched_blocks += got;
        next += got;
        if (got > 0)
          parent = keys[next - 1];
      }
    }
    if (disk_ && next < keys.size()) {
      poll_disk();
      // Blocks a promote() (a prefetch) is bringing back are waited for,
      // not computed again: reserved by it, they could not be put, and the
      // request cached nothing from there on.
      (void)await_promotions_of(keys.subspan(next));
      const std::size_t on_disk = disk_prefix(ns, keys.subspan(next));
      if (on_disk > 0) {
        const disk_promoted done = promote_now(ns, keys.subspan(next, on_disk),
                                               parent, producer, opts);
        const std::size_t before = next;
        for (std::size_t i = next; i < keys.size() && i < before + on_disk;
             ++i) {
          if (!contains(ns, keys[i]))
            break;
          parent = keys[i];
          ++next;
        }
        // Blocks promoted count as hits up to the first that had to be
        // recomputed, and only while visible now: one dead in memory stays
        // dead (a promotion is no put), and one can expire while a later
        // block is computed; the loop below computes them again.
        const std::size_t hits = std::min(done.hits, next - before);
        const std::size_t from_disk = std::min(done.from_disk, hits);
        stats_.disk_block_hits += from_disk;
        out.disk_blocks += from_disk;
        out.matched_blocks += hits;
        out.computed_blocks += next - before - hits;
        // After the count: the blocks read before the producer failed stay
        // cached, and were hits.
        if (done.produce_failed)
          return fail(*done.produce_failed);
        // The whole run served and something after it: it may be in the
        // tier.
        more = tier_ != nullptr && hits == on_disk && next > before;
      }
    }
  }
  // What came back from the tier or disk is held while the rest is
  // computed, as the memory prefix is: making room for it must not evict
  // those blocks. (Before, one adopt() could not link under its parent
  // stayed an evictable leaf, was evicted in this call, and the reply
  // counted a hit that was gone.)
  // A block brought back as a hit is accessed as a memory hit is, at the
  // request's priority: its promotion's commit restored its count but
  // recorded no use (before, to LFU the hit was lost, and to the adaptive
  // policy a hot block came back as a one-off, the next to go). Blocks
  // computed inside a disk run, past out.matched_blocks, were misses.
  for (std::size_t i = *matched; i < next; ++i)
    if (const std::uint32_t id = index_.find(keys[i]);
        id != npos && entries_[id].state == entry_state::committed) {
      if (i < out.matched_blocks) {
        raise_priority(id, opts.prio);
        touch(id);
      }
      ++entries_[id].leases;
      refresh_evictable(id);
      leases.push_back(read_lease(this, id, keys[i]));
    }
  bool caching = true;
  // The KV must be computed whether or not it can be cached: a block that
  // cannot be is produced into the scratch buffer (the host takes its KV
  // from its own prefill; the producer's time is spent). Before, it was
  // counted computed but the producer never ran, so a store full of held
  // blocks answered faster than it computed.
  const auto compute_uncached = [&](const block_key& key) -> result<void> {
    ++out.uncached_blocks;
    return produce_caught(producer, spec, key,
                          std::span(scratch_.data(), spec.value_bytes()));
  };
  for (std::size_t i = next; i < keys.size(); ++i) {
    ++out.computed_blocks;
    if (caching) {
      // A block that cannot be cached ends caching for the rest of this
      // request.
      auto h = reserve(ns, keys[i], parent, opts);
      if (h) {
        if (auto w = write_from(*h, producer); !w)
          return fail(w.error());
        if (auto c = commit(*h); !c)
          return fail(c.error());
        parent = keys[i];
        continue;
      }
      caching = false;
    }
    if (auto p = compute_uncached(keys[i]); !p)
      return fail(p.error());
  }
  // Every block the request cached ends pinned: the matched ones, and
  // those promoted from disk after a block that had to be recomputed
  // (counted computed, and committed at their disk copy's pins, as was a
  // block recomputed inside the promotion). Before, only the matched ones
  // were pinned here, so a failed disk read left the rest unpinned.
  // pin_once() passes over blocks pinned at their commit.
  if (opts.pin)
    for (std::size_t i = 0; i + out.uncached_blocks < keys.size(); ++i)
      if (const std::uint32_t id = index_.find(keys[i]); id != npos) {
        // Its share of the checked bytes, as a commit's; past them (a key
        // counted for its disk copy's pins that were gone when it was
        // computed), checked, and the request fails whole.
        if (!would_pin(id))
          continue;
        if (auto room = take_pin_budget(pin_charge(id),
                                        "process() pinning block", keys[i]);
            !room)
          return fail(room.error());
        pin_once(id);
      }
  pin_log_ = nullptr; // process_pins_ keeps them: see unpin_last_process()
  out.matched_tokens =
      std::min(out.matched_blocks * spec.block_tokens, input_tokens);
  out.computed_tokens = input_tokens - out.matched_tokens;
  const std::size_t tier_tokens =
      std::min(out.tier_blocks * spec.block_tokens, out.matched_tokens);
  stats_.tier_token_hits += tier_tokens;
  const std::size_t disk_tokens = std::min(out.disk_blocks * spec.block_tokens,
                                           out.matched_tokens - tier_tokens);
  stats_.disk_token_hits += disk_tokens;
  // acquire_prefix() counted the blocks after the memory prefix as misses;
  // those served from the memory tier or disk were hits.
  const std::size_t from_below = out.matched_blocks - *matched;
  stats_.block_hits += from_below;
  stats_.block_misses -= from_below;
  out.prefill_saved = producer.cost(out.matched_tokens);
  stats_.token_hits += out.matched_tokens;
  stats_.token_misses += out.computed_tokens;
  leases.clear();
  stats_.process_ns.record(static_cast<std::uint64_t>((now() - start).count()));
  return out;
}

// ---------------------------------------------------------------- pins, expiry

std::optional<std::uint64_t>
block_store::promotion_chain_of(const block_key& key) const noexcept {
  for (const promotion& p : pending_promotions_)
    if (p.handle.key() == key)
      return p.group;
  return std::nullopt;
}

bool block_store::pinned_still(std::uint32_t id,
                               std::uint32_t generation) const noexcept {
  const entry& e = entries_[id];
  return e.generation == generation && e.state == entry_state::committed &&
         e.pins > 0;
}

void block_store::last_process_pins(std::vector<block_key>& out) const {
  for (const auto& [id, generation] : process_pins_)
    if (pinned_still(id, generation))
      out.push_back(entries_[id].key);
}

std::size_t block_store::unpin_last_process() {
  std::size_t n = 0;
  for (const auto& [id, generation] : process_pins_)
    if (pinned_still(id, generation) &&
        unpin(ns_id{entries_[id].ns}, entries_[id].key))
      ++n;
  process_pins_.clear();
  return n;
}

result<void> block_store::pin(ns_id ns, const block_key& key) {
  if (auto st = check_ns(ns); !st)
    return unexpected<error>(st.error());
  std::uint32_t id = find_visible(ns, key, now());
  promotion_refused_.reset();
  // One in the memory tier or on disk is checked before it is brought
  // back (making room for it may evict): a refused pin changes nothing.
  if (id == npos && index_.find(key) == npos)
    if (auto room = pin_room(pin_bytes_at_most(ns, std::span(&key, 1), {},
                                               /*may_compute=*/false),
                             [&] { return "pinning block " + key.to_hex(); });
        !room)
      return room;
  if (id == npos && (promote_key_from_tier(ns, key) ||
                     promote_key_from_disk(ns, key, keep_recorded())))
    id = find_visible(ns, key, now());
  if (id == npos)
    return unexpected<error>(not_cached("block ", key));
  // The bytes it holds that no pin held yet: its own, and those of the
  // blocks it chains from (before, only its own counted, so pinning the
  // last block of each chain held every chain in memory past the limit
  // and every later put failed).
  if (entries_[id].pins == 0)
    if (auto room = pin_room(pin_cost(id),
                             [&] { return "pinning block " + key.to_hex(); });
        !room)
      return room;
  set_pins(id, entries_[id].pins + 1);
  recency_unlink(id); // no demotion candidate while pinned
  if (entries_[id].pins == 1)
    (void)spill(id, true);      // pins survive restarts
  else if (!sync_disk_pins(id)) // nested, on disk too
    ++stats_.spill_failures;
  refresh_evictable(id);
  return {};
}

error block_store::not_cached(const char* what, const block_key& key) {
  if (promotion_refused_) {
    error e = std::move(*promotion_refused_);
    promotion_refused_.reset();
    return error{e.code, std::string(what) + key.to_hex() +
                             " is in the memory tier or on disk but could not "
                             "be brought back into memory: " +
                             e.message};
  }
  return error{errc::not_found,
               std::string(what) + key.to_hex() + " is not cached"};
}

result<void> block_store::sync_disk_pins(std::uint32_t id) {
  if (!disk_)
    return {};
  const entry& e = entries_[id];
  const auto info = disk_->lookup(e.key);
  if (!info || info->ns != namespaces_[e.ns].fingerprint)
    return {}; // none, or another namespace's: not this block's pins
  for (std::uint32_t n = info->pins; n < e.pins; ++n)
    if (auto p = disk_->pin(e.key); !p)
      return p;
  for (std::uint32_t n = info->pins; n > e.pins; --n)
    if (auto u = disk_->unpin(e.key); !u)
      return u;
  return {};
}

result<void> block_store::unpin(ns_id ns, const block_key& key) {
  if (auto st = check_ns(ns); !st)
    return unexpected<error>(st.error());
  const std::uint32_t id = index_.find(key);
  if (id == npos || entries_[id].state != entry_state::committed ||
      entries_[id].ns != ns.value ||
      (entries_[id].dead && entries_[id].pins == 0)) {
    // Only on disk (pinned there before a restart, say), or in memory only
    // as a dead block a reader still holds, whose pins went with it (a
    // block dropped with a damaged ancestor; drop_damaged()): unpinning
    // needs no bytes, so its copy is unpinned where it is.
    const auto info =
        disk_ ? usable_disk_copy(namespaces_[ns.value], key, disk_clock().now())
              : std::nullopt;
    if (info) {
      if (info->pins == 0)
        return make_error(errc::invalid_argument,
                          "block " + key.to_hex() + " is not pinned");
      return disk_->unpin(key);
    }
    return make_error(errc::not_found,
                      "block " + key.to_hex() + " is not cached");
  }
  if (entries_[id].pins == 0)
    return make_error(errc::invalid_argument,
                      "block " + key.to_hex() + " is not pinned");
  set_pins(id, entries_[id].pins - 1);
  // A candidate again, as the most recently used (its place among the
  // others is not kept while pinned; a pin is a use).
  if (entries_[id].pins == 0 && !entries_[id].in_recency &&
      may_demote(entries_[id]))
    recency_push_front(id);
  // The disk copy's count follows (pins nest across restarts too). Failing
  // that is counted, as in pin(): the unpin stands in memory (an error
  // would have the caller unpin again), and the block is offered to
  // eviction all the same (before, a failure returned first, leaving an
  // unpinned block out of its policy, and a dead one held for good).
  if (!sync_disk_pins(id))
    ++stats_.spill_failures;
  refresh_evictable(id);
  return {};
}

std::size_t block_store::expire() {
  const std::int64_t t = now().count();
  std::size_t n = 0;
  for (std::uint32_t id = 0; id < entries_.size(); ++id) {
    const entry& e = entries_[id];
    if (e.state == entry_state::committed && !e.dead &&
        expired_by(e.expires_at, t)) {
      ++n;
      ++stats_.expirations;
      kill(id);
    }
  }
  std::vector<block_key> expired_in_tier;
  for (const auto& [key, b] : tier_index_)
    if (expired_by(b.expires_at, t))
      expired_in_tier.push_back(key);
  for (const block_key& key : expired_in_tier) {
    ++n;
    ++stats_.expirations;
    drop_tier_block(key, true);
  }
  if (disk_)
    (void)disk_->expire(disk_clock().now());
  return n;
}

std::size_t block_store::evict_bytes(std::size_t bytes) {
  collect_disk();
  std::size_t freed = reclaim_expired(); // before any live block

  while (freed < bytes) {
    const std::uint32_t id = lowest_priority_victim();
    if (id == npos)
      break;
    // Measured, not the victim's slot: a dead parent the victim held is
    // freed with it.
    const std::size_t before = pool_.used_bytes();
    evict(id);
    freed += before - pool_.used_bytes();
  }
  return freed;
}

// Lowest priority first, whatever the policy: the policies rank by recency
// or frequency (only `priority` by priority), and keep that order per
// priority, so each step asks for the lowest priority's victim. A parent
// of a lower priority than the blocks being taken, left a leaf by its
// last child, goes next.
std::uint32_t block_store::lowest_priority_victim(
    std::optional<size_partition> asking) const {
  // A partition within its share gives to another's put only while no
  // partition is over its share (those give first), and only a priority
  // lower than anything `asking` holds.
  // (The partition with evictable blocks furthest over its share, as
  // pick_partition() asks: over it when any is.)
  const std::optional<size_partition> worst =
      asking ? most_over_share() : std::nullopt;
  const bool any_over = worst && share_ratio(*worst) > 1.0;
  for (std::size_t l = 0; l < priority_count; ++l) {
    const auto p = static_cast<priority>(l);
    std::optional<size_partition> q = most_over_share(p, asking);
    if (!q && asking && !any_over)
      q = most_over_share(p);
    if (q)
      return policies_[static_cast<std::size_t>(*q)]->victim(p);
  }
  return npos;
}

// ---------------------------------------------------------------- space

double block_store::share_ratio(size_partition p) const noexcept {
  const auto i = static_cast<std::size_t>(p);
  // While demote_to_tier() picks, blocks on their way to the memory tier
  // count no more: before, one call found the same partition furthest over
  // its share at every pick and took all its blocks of that priority, well
  // below its share, while another stayed over. Everywhere else they
  // count, as they hold their slots until their copies finish: a put
  // meanwhile is not refused for a partition that only looks within its
  // share.
  const std::size_t leaving =
      picking_for_tier_ ? departing_by_partition_[i] : 0;
  return static_cast<double>(stats_.bytes_by_partition[i] - leaving) /
         (config_.partitions.shares[i] *
          static_cast<double>(pool_.capacity_bytes()));
}

std::optional<size_partition>
block_store::most_over_share(std::optional<priority> prio,
                             std::optional<size_partition> asking) const {
  std::optional<size_partition> q;
  double worst = -1.0;
  for (std::size_t p = 0; p < partition_count; ++p) {
    if ((prio ? policies_[p]->evictable_count(*prio)
              : policies_[p]->evictable_count()) == 0)
      continue;
    const double ratio = share_ratio(static_cast<size_partition>(p));
    if (asking && static_cast<size_partition>(p) != *asking && ratio <= 1.0)
      continue;
    if (ratio > worst) {
      worst = ratio;
      q = static_cast<size_partition>(p);
    }
  }
  return q;
}

bool block_store::over_high(std::size_t extra) const noexcept {
  return static_cast<double>(pool_.used_bytes() + extra) >
         config_.high_watermark * static_cast<double>(pool_.capacity_bytes());
}

std::optional<size_partition>
block_store::pick_partition(size_partition p) const {
  // A partition over its share gives up space first; otherwise the asking
  // partition makes room in its own share. With nothing evictable there
  // (its blocks pinned, or all held by the request being put: a long
  // request's chain keeps each block's parent), no partition within its
  // share gives any up, so one class cannot flush another: the put finds
  // no room. Before, the partition with the most of its share in use gave
  // it up, so one long document flushed every short prompt.
  const std::optional<size_partition> worst = most_over_share();
  if (worst && share_ratio(*worst) > 1.0)
    return worst;
  if (policies_[static_cast<std::size_t>(p)]->evictable_count() > 0)
    return p;
  return std::nullopt;
}

size_partition block_store::demotion_partition(size_partition p) const {
  // Over its share, a partition gives up space first: by compression too,
  // even with nothing evictable (its blocks all parents).
  std::optional<size_partition> worst;
  double ratio = 1.0;
  for (std::size_t i = 0; i < partition_count; ++i) {
    const auto q = static_cast<size_partition>(i);
    if (recency_tail_[i] == npos || share_ratio(q) <= ratio)
      continue;
    ratio = share_ratio(q);
    worst = q;
  }
  return worst.value_or(p);
}

result<void> block_store::make_room(size_partition p, std::uint16_t cls,
                                    std::uint32_t parent) {
  const std::size_t need = pool_.slot_bytes(cls);
  if (!over_high(need) && pool_.can_allocate(cls))
    return {};
  // Demotions whose copies are done still hold their slots until someone
  // polls: free them before evicting anything. (Before, a put with no
  // process() or promote() in between failed, or evicted, next to slots
  // the tier had finished with.) A put's parent is safe: its child count
  // is already up, and a block leaves only without children.
  if (tier_ && !tier_batches_.empty()) {
    poll_tier();
    if (!over_high(need) && pool_.can_allocate(cls))
      return {};
  }
  // Blocks whose TTL ran out go before any live block is evicted or
  // compressed. (Before, only the policy's victims and the demotion scan's
  // candidates were checked: blocks read often just before they expired
  // kept their slots until the next expire() while live blocks went.)
  if (reclaim_expired() > 0 && !over_high(need) && pool_.can_allocate(cls))
    return {};
  // With no slot of this size free, none may come free however much goes:
  // fail now, before evicting what would not make room. Working that out
  // takes scratch memory (marks over every entry): without it (bad_alloc
  // under host memory pressure) the put fails as out of memory, nothing
  // evicted, instead of the exception escaping reserve().
  bool could_come = true;
  if (!pool_.can_allocate(cls)) {
    try {
      could_come = room_could_come(p, cls, parent);
    } catch (const std::bad_alloc&) {
      return make_error(errc::out_of_memory,
                        "no host memory to find room for a block of " +
                            std::to_string(need) +
                            " bytes (no slot of its size is free); nothing "
                            "was evicted");
    }
  }
  if (!could_come)
    return make_error(
        errc::out_of_memory,
        "no room for a block of " + std::to_string(need) +
            " bytes: no slot of its size is free, none of its size can be "
            "evicted or demoted, and every slab holds a block that cannot "
            "be evicted or demoted (being put or read, pinned, or with such "
            "a block chained from it) and cannot be moved either (being "
            "put or read, or its size has no slab's worth of slots free "
            "elsewhere); " +
            std::to_string(pool_.capacity_bytes() - pool_.used_bytes()) +
            " bytes are free in slots of other sizes; nothing was evicted");
  const double target =
      config_.low_watermark * static_cast<double>(pool_.capacity_bytes());
  demotion_scan scan{config_.demotion_scan_limit, cls};
  while (static_cast<double>(pool_.used_bytes() + need) > target ||
         !pool_.can_allocate(cls)) {
    // Slots of another size can be free in plenty while none of this
    // size is: moving blocks together frees a slab without evicting any.
    if (!pool_.can_allocate(cls) && compact_for(cls))
      continue;
    // The scan's budget is spent (its tries, or the blocks it may pass
    // over) and this put fits: stop here, above the low watermark, and let
    // the next put that crosses the high one demote on. Going on down to
    // the low watermark would evict the coldest blocks, those just
    // demoted: a pass that must free more than the budget demotes (a tenth
    // of a store over about 1,800 full-size blocks, at 256) then
    // compressed nothing that stayed, and a larger store hit less than a
    // smaller one.
    if ((scan.tries == 0 || scan.visits == 0) &&
        config_.demotion_scan_limit > 0 && !over_high(need) &&
        pool_.can_allocate(cls))
      break;
    const auto q = pick_partition(p);
    // Compression goes first, and in a partition that may hold nothing
    // evictable: a long chain's blocks each keep a cached child, so only
    // compressing them makes room. (Before, only the partition that could
    // evict was scanned, and a request longer than its partition's free
    // room cached only part of itself, nothing demoted.)
    if (config_.adaptive_compression) {
      const size_partition d = demotion_partition(p);
      if (try_demote(d, scan) || (q && *q != d && try_demote(*q, scan)))
        continue;
    }
    if (!q)
      break;
    evict(make_room_victim(*q, p));
    scan.no_slots = 0; // the eviction may have freed a slot of those sizes
  }
  if (!pool_.can_allocate(cls))
    // Every evictable block went (or none was there), and no slot of this
    // size came free: the rest holds the slabs. Free bytes in slots of
    // other sizes are no room for this one.
    return make_error(
        errc::out_of_memory,
        "no room for a block of " + std::to_string(need) +
            " bytes: no slot of its size came free after evicting every "
            "block that could be (the blocks left are pinned, leased or have "
            "cached children; " +
            std::to_string(pool_.capacity_bytes() - pool_.used_bytes()) +
            " bytes are free in slots of other sizes, on slabs those blocks "
            "hold)");
  return {};
}

bool block_store::room_could_come(size_partition p, std::uint16_t cls,
                                  std::uint32_t parent) {
  // A partition within its share gives nothing to another's put
  // (pick_partition(); with lowest_priority_first it may give its lower
  // priorities, counted as giving here): its blocks stay, as held ones do.
  // A dead block is never a victim: it goes when its last child does, and
  // that child may be the put's partition's (held() still keeps one
  // leased or pinned).
  const auto gives = [&](const entry& e) {
    return e.part == p || e.dead || config_.lowest_priority_first ||
           share_ratio(e.part) > 1.0;
  };
  const auto held = [&](const entry& e) {
    return e.state != entry_state::free &&
           (e.state != entry_state::committed || e.leases > 0 || e.pins > 0 ||
            !gives(e));
  };
  // Marks every entry that stays whatever is evicted: a held one and its
  // ancestors (each keeps a child).
  held_marks_.assign(entries_.size(), 0);
  for (std::uint32_t id = 0; id < entries_.size(); ++id) {
    if (!held(entries_[id]))
      continue;
    for (std::uint32_t a = id; a != npos && held_marks_[a] == 0;
         a = entries_[a].parent)
      held_marks_[a] = 1;
  }
  // The put's parent stays too (reserve holds its child count up), and its
  // ancestors with it.
  for (std::uint32_t a = parent; a != npos && held_marks_[a] == 0;
       a = entries_[a].parent)
    held_marks_[a] = 1;
  const bool can_move = !compaction_off_ && backend_->can_copy_within();
  // Per size class: whether a slot of it is free or can free: a block of
  // it nothing holds goes, or one is demoted to a size that has a slot
  // free or freeing (a chain: demoting a block of the smaller size first
  // frees the slot). A demotion needs a slot of its smaller size; with
  // none, try_demote() passes the block over, so it frees nothing.
  // (Before, every demotable block counted, and a put evicted blocks, then
  // failed.) A slab compaction could give that size empties on its own,
  // which the slab rule below sees.
  const auto may_free = [&](std::uint16_t c) {
    return pool_.can_allocate(c) ||
           (c < slot_may_free_.size() && slot_may_free_[c] != 0);
  };
  const auto mark = [&](std::uint16_t c) {
    if (c >= slot_may_free_.size())
      slot_may_free_.resize(c + 1u, 0);
    const bool was = slot_may_free_[c] != 0;
    slot_may_free_[c] = 1;
    return !was;
  };
  const auto demotable_to =
      [&](const entry& e) -> std::optional<std::uint16_t> {
    if (e.state != entry_state::committed || e.leases != 0 || e.pins != 0 ||
        e.dead || !may_demote(e) || !gives(e))
      return std::nullopt;
    return namespaces_[e.ns]
        .size_class[static_cast<std::size_t>(demotion_target(e))];
  };
  slot_may_free_.clear();
  for (std::uint32_t id = 0; id < entries_.size(); ++id)
    if (entries_[id].state == entry_state::committed && held_marks_[id] == 0)
      (void)mark(entries_[id].slot.size_class);
  // To a fixed point: each pass marks at least one more class or ends.
  for (bool changed = true; changed;) {
    changed = false;
    for (std::uint32_t id = 0; id < entries_.size(); ++id) {
      const entry& e = entries_[id];
      if (const auto to = demotable_to(e); to && may_free(*to))
        changed |= mark(e.slot.size_class);
    }
  }
  const auto demotable = [&](const entry& e) {
    const auto to = demotable_to(e);
    return to && may_free(*to);
  };
  using fate = block_pool::slot_fate;
  return pool_.room_could_come(
      cls,
      [&](std::uint32_t id) {
        // Its slab empties if each block goes: evicted once the blocks
        // below it are gone, or re-encoded by demotion (unpinned, no
        // reader), or moved by compaction (a committed block no reader
        // holds) where its class has room.
        const entry& e = entries_[id];
        if (held_marks_[id] == 0 || demotable(e))
          return fate::leaves;
        if (e.state == entry_state::committed && e.leases == 0 && can_move)
          return fate::moves;
        return fate::stays;
      },
      [&](std::uint32_t id) {
        // One slot of the put's size is room: a block in it that can be
        // evicted or demoted frees it, whatever else its slab holds.
        return held_marks_[id] == 0 || demotable(entries_[id]);
      });
}

std::uint32_t block_store::make_room_victim(size_partition q,
                                            size_partition asking) const {
  const eviction_policy& policy = *policies_[static_cast<std::size_t>(q)];
  if (!config_.lowest_priority_first)
    return policy.victim();
  // The lowest priority first, of the put's partition and of those over
  // their share. A partition within its share gives to another's put only
  // when none is over its share, and only a priority lower than anything
  // the put's partition holds: a critical block of the put's own partition
  // does not go before a background block of another. (Before, the
  // lowest priority of any partition went, from the one with the most of
  // its share in use: with every block at one priority a long put flushed
  // short prompts within their share, and a partition over its share kept
  // its blocks while another's went.) pick_partition() found an evictable
  // block, so there is a victim.
  if (const std::uint32_t id = lowest_priority_victim(asking); id != npos)
    return id;
  return policy.victim();
}

bool block_store::compact_for(std::uint16_t cls) {
  if (compaction_off_ || !backend_->can_copy_within())
    return false;
  const std::uint32_t slab =
      pool_.reclaimable_slab(cls, [this](std::uint32_t id) {
        const entry& e = entries_[id];
        return e.state == entry_state::committed && e.leases == 0;
      });
  if (slab == slot_ref::npos)
    return false;
  const bool freed = pool_.drain_slab(slab, [this](slot_ref from, slot_ref to) {
    entry& e = entries_[pool_.owner(from)];
    if (auto copied = backend_->copy_within(pool_.offset(to),
                                            pool_.offset(from), e.stored_bytes);
        !copied) {
      // A failed copy (a device error, which CUDA keeps) would fail again:
      // the store stops compacting and makes room by evicting, as an arena
      // without the copy does. The block stays where it was.
      ++stats_.compaction_failures;
      compaction_off_ = true;
      std::fprintf(stderr,
                   "kvfleet: slab compaction is off: a copy inside the %.*s "
                   "arena failed: %s; the store evicts to make room instead\n",
                   static_cast<int>(backend_->name().size()),
                   backend_->name().data(), copied.error().describe().c_str());
      return false;
    }
    e.slot = to;
    ++stats_.moved_blocks;
    return true;
  });
  if (freed)
    ++stats_.compacted_slabs;
  return freed;
}

codec block_store::demotion_target(const entry& e) const noexcept {
  const auto& th = namespaces_[e.ns].options.thresholds;
  if (e.access_count > th.precise_above)
    return e.c;
  if (e.access_count > th.int8_above)
    return codec::int8;
  return codec::int4;
}

bool block_store::may_demote(const entry& e) const noexcept {
  const ns_state& st = namespaces_[e.ns];
  if (!config_.adaptive_compression || !st.options.adaptive_compression)
    return false;
  const codec target = demotion_target(e);
  // Only a slot size of which a slab holds more frees anything: a block
  // whose slot the codec does not shrink (slots round up to the slot
  // alignment), or shrinks too little for one more per slab (slabs of one
  // fp16 block hold one int8 block too), keeps its precision. Before, that
  // block lost precision for bytes no other block could use.
  const std::uint16_t to_cls = st.size_class[static_cast<std::size_t>(target)];
  const std::size_t slab = pool_.slab_bytes();
  return compression_rank(target) > compression_rank(e.c) &&
         slab / pool_.slot_bytes(to_cls) >
             slab / pool_.slot_bytes(e.slot.size_class);
}

bool block_store::try_demote(size_partition p, demotion_scan& scan) {
  const std::int64_t t = now().count();
  const auto pi = static_cast<std::size_t>(p);
  // From where the last call of this pass stopped, if that block is still
  // a candidate of this partition: the blocks behind it were passed over
  // (held, or no slot) and still are. Otherwise from the coldest.
  std::uint32_t id = scan.resume[pi];
  if (id == npos || !entries_[id].in_recency || entries_[id].part != p)
    id = recency_tail_[pi];
  while (id != npos && scan.tries > 0 && scan.visits > 0) {
    --scan.visits;
    entry& e = entries_[id];
    const std::uint32_t next = e.rprev;
    scan.resume[pi] = next;
    if (!e.dead && e.leases == 0 && expired_by(e.expires_at, t)) {
      // Expired: not worth compressing, and freeing it is the better room.
      // Still held by a cached child, it only turns dead here. One leased
      // (read, or the prefix of the put or request making this room) is
      // passed over, as reclaim_expired() passes it: killed under that
      // call, a put_tokens renewed it dead, its new blocks unreachable.
      ++stats_.expirations;
      const std::size_t before = pool_.used_bytes();
      kill(id);
      if (pool_.used_bytes() < before)
        return true;
      id = next;
      continue;
    }
    if (e.leases == 0 && e.pins == 0 && !e.dead && may_demote(e)) {
      const codec to = demotion_target(e);
      // No slot of the smaller size and none to make: skip it here, not
      // through transcode()'s error, whose message would be allocated for
      // every block the scan passes (puts allocate nothing).
      // Once compaction found no slot of a size, this pass does not try
      // again for each block of that size until an eviction.
      const std::uint16_t cls =
          namespaces_[e.ns].size_class[static_cast<std::size_t>(to)];
      if (!pool_.can_allocate(cls) &&
          (scan.knows_no_slot(cls) || !compact_for(cls))) {
        if (!scan.knows_no_slot(cls) && scan.no_slots < scan.no_slot.size())
          scan.no_slot[scan.no_slots++] = cls;
        id = next;
        continue;
      }
      // Its smaller size would take the last free slab, which the put's
      // own size needs (no slot in its slabs), and the slot it frees is of
      // another size: the put would find no slot after the demotion, then
      // evict everything and fail (a reviewer's two-model store). Passed
      // over; fine are a block of the put's size, one demoted to the put's
      // size (the slab it takes has room for the put), one alone in its
      // slab (that slab comes free), or a free slab to spare.
      if (!pool_.has_room_in_slabs(cls) &&
          !pool_.has_room_in_slabs(scan.put_cls) && cls != scan.put_cls &&
          e.slot.size_class != scan.put_cls && !pool_.alone_in_slab(e.slot) &&
          pool_.free_slab_count() <= 1) {
        id = next;
        continue;
      }
      --scan.tries;
      const std::size_t before = pool_.used_bytes();
      // A block that fails its checksum is dropped instead: that freed
      // room too, and entries the scan would visit next may be gone.
      if (transcode(id, to).has_value() || pool_.used_bytes() < before)
        return true;
    }
    id = next;
  }
  return false;
}

result<void> block_store::transcode(std::uint32_t id, codec to) {
  entry& e = entries_[id];
  const ns_state& st = namespaces_[e.ns];
  const std::uint16_t cls = st.size_class[static_cast<std::size_t>(to)];
  // Its size may have no slab yet while the full size's slabs are sparse:
  // compaction (which may move this block too) gives it one.
  if (!pool_.can_allocate(cls) && !compact_for(cls))
    return make_error(errc::out_of_memory, "no slot for the demoted block");
  // Verify before re-encoding so a corrupted block is never laundered into a
  // fresh checksum.
  std::span<std::byte> old_bytes(scratch2_.data(), e.stored_bytes);
  if (auto r = backend_->read(pool_.offset(e.slot), old_bytes); !r)
    return r;
  if (block_checksum(old_bytes) != e.checksum) {
    drop_damaged(id); // as a read would: with its descendants
    return make_error(errc::checksum_mismatch, "block failed its checksum");
  }
  std::span<std::byte> value(scratch_.data(), st.spec.value_bytes());
  if (auto d = decode(e.c, st.spec.type, old_bytes, value); !d)
    return unexpected<error>(d.error());
  const std::size_t new_bytes = encoded_size(to, st.spec.elements_per_block());
  std::span<std::byte> encoded(scratch2_.data(), new_bytes);
  if (auto n = encode(to, st.spec.type, value, encoded); !n)
    return unexpected<error>(n.error());
  auto slot = pool_.allocate(cls);
  if (!slot)
    return unexpected<error>(slot.error());
  pool_.set_owner(*slot, id);
  if (auto w = backend_->write(pool_.offset(*slot), encoded); !w) {
    pool_.free(*slot);
    return w;
  }
  const std::size_t old_slot_bytes = pool_.slot_bytes(e.slot.size_class);
  account(e, false);
  pool_.free(e.slot);
  if (pin_held(e)) // a block a pinned one chains from, compressed
    pin_held_bytes_ = pin_held_bytes_ - old_slot_bytes + pool_.slot_bytes(cls);
  e.slot = *slot;
  e.c = to;
  e.stored_bytes = static_cast<std::uint32_t>(new_bytes);
  e.checksum = block_checksum(encoded);
  account(e, true);
  ++stats_.demotions;
  stats_.demoted_bytes_saved += old_slot_bytes - pool_.slot_bytes(cls);
  if (!may_demote(e))
    recency_unlink(id); // nothing lower to demote to
  return {};
}

void block_store::account(const entry& e, bool add) noexcept {
  const std::uint64_t bytes = pool_.slot_bytes(e.slot.size_class);
  auto adjust = [add](std::uint64_t& v, std::uint64_t d) {
    if (add)
      v += d;
    else
      v -= d;
  };
  adjust(stats_.blocks_by_codec[static_cast<std::size_t>(e.c)], 1);
  adjust(stats_.bytes_by_codec[static_cast<std::size_t>(e.c)], bytes);
  adjust(stats_.blocks_by_partition[static_cast<std::size_t>(e.part)], 1);
  adjust(stats_.bytes_by_partition[static_cast<std::size_t>(e.part)], bytes);
}

bool block_store::evictable(const entry& e) const noexcept {
  return e.state == entry_state::committed && e.children == 0 &&
         e.leases == 0 && e.pins == 0;
}

void block_store::refresh_evictable(std::uint32_t id) {
  entry& e = entries_[id];
  const bool ev = evictable(e);
  if (e.dead && ev) {
    remove(id);
    return;
  }
  const bool want = ev && !e.dead;
  if (want != e.flagged_evictable)
    set_flagged(id, want);
}

void block_store::set_flagged(std::uint32_t id, bool flagged) {
  entry& e = entries_[id];
  policies_[static_cast<std::size_t>(e.part)]->set_evictable(id, flagged);
  e.flagged_evictable = flagged;
}

void block_store::note_expiry(std::uint32_t id) {
  const entry& e = entries_[id];
  if (e.expires_at == 0 || e.state != entry_state::committed || e.dead)
    return;
  const auto stale = [this](const expiry_mark& m) {
    const entry& x = entries_[m.id];
    return x.generation != m.generation || x.state != entry_state::committed ||
           x.dead || x.expires_at != m.at;
  };
  // Renewed expiries (a block put again) leave marks behind, stale or,
  // renewed to the same time, repeated: once they outnumber the blocks,
  // drop them, so the heap holds at most one mark per block after, and a
  // renewal costs O(log n) amortized. (Repeats kept made every renewal
  // past that point a rebuild of the whole heap.)
  if (expiry_heap_.size() >= 64 && expiry_heap_.size() >= 2 * index_.size()) {
    std::erase_if(expiry_heap_, stale);
    const auto order = [](const expiry_mark& a, const expiry_mark& b) {
      return a.id != b.id ? a.id < b.id : a.generation < b.generation;
    };
    std::sort(expiry_heap_.begin(), expiry_heap_.end(), order);
    // Marks left are current: one (id, generation) has one expiry.
    expiry_heap_.erase(
        std::unique(expiry_heap_.begin(), expiry_heap_.end(),
                    [](const expiry_mark& a, const expiry_mark& b) {
                      return a.id == b.id && a.generation == b.generation;
                    }),
        expiry_heap_.end());
    std::make_heap(expiry_heap_.begin(), expiry_heap_.end(), std::greater<>{});
  }
  expiry_heap_.push_back(expiry_mark{e.expires_at, id, e.generation});
  std::push_heap(expiry_heap_.begin(), expiry_heap_.end(), std::greater<>{});
}

std::size_t block_store::reclaim_expired() {
  if (expiry_heap_.empty())
    return 0;
  const std::int64_t t = now().count();
  const std::size_t before = pool_.used_bytes();
  // A leased block (being read, or the cached prefix a put_tokens or
  // process() call holds) would only turn dead, freeing nothing, under a
  // call that goes on using it (a put_tokens then renewed a dead prefix
  // and its new blocks hung under it, unreachable): it keeps its mark for
  // a later pass, and lookups, expire() and eviction still find it
  // expired.
  leased_expired_.clear();
  while (!expiry_heap_.empty() && expired_by(expiry_heap_.front().at, t)) {
    const expiry_mark m = expiry_heap_.front();
    std::pop_heap(expiry_heap_.begin(), expiry_heap_.end(), std::greater<>{});
    expiry_heap_.pop_back();
    const entry& e = entries_[m.id];
    if (e.generation != m.generation || e.state != entry_state::committed ||
        e.dead || e.expires_at != m.at)
      continue; // gone, dead already, or put again with a later expiry
    if (e.leases > 0) {
      leased_expired_.push_back(m);
      continue;
    }
    ++stats_.expirations;
    kill(m.id);
  }
  for (const expiry_mark& m : leased_expired_) {
    expiry_heap_.push_back(m);
    std::push_heap(expiry_heap_.begin(), expiry_heap_.end(), std::greater<>{});
  }
  return before - pool_.used_bytes();
}

void block_store::kill(std::uint32_t id) {
  entry& e = entries_[id];
  if (e.dead)
    return;
  e.dead = true;
  if (e.flagged_evictable)
    set_flagged(id, false);
  const std::uint32_t generation = e.generation;
  refresh_evictable(id); // removes it (announced) when nothing holds it
  // Still held (a pin, a lease, a cached child): it is never served again,
  // so listeners hear it is gone now. Before, they heard only when it was
  // removed, which for a pinned block may be never: a kv-aware router kept
  // crediting the engine with a prefix it would not serve.
  entry& held = entries_[id];
  if (held.generation == generation && held.dead && !held.announced_gone) {
    held.announced_gone = true;
    if (config_.on_block_event)
      config_.on_block_event(block_event::removed, held.key);
  }
}

void block_store::remove(std::uint32_t id, bool announce) {
  // Iterative: removing a block may make its dead parent removable.
  while (id != npos) {
    entry& e = entries_[id];
    KVFLEET_CHECK(evictable(e), "removing a block that is not evictable");
    if (config_.on_block_event && announce && !e.announced_gone)
      config_.on_block_event(block_event::removed, e.key);
    announce = true;
    account(e, false);
    // Every partition's policy: a block may be the parent of blocks in
    // another partition, and that policy keeps what it learnt about it.
    for (auto& policy : policies_)
      policy->on_remove(id);
    if (e.in_recency)
      recency_unlink(id);
    pool_.free(e.slot);
    index_.erase(e.key);
    const std::uint32_t pid = e.parent;
    const std::uint32_t gen = e.generation + 1;
    e = entry{};
    e.generation = gen;
    free_entries_.push_back(id);
    id = npos;
    if (pid != npos) {
      entry& p = entries_[pid];
      --p.children;
      if (p.dead && evictable(p)) {
        id = pid;
      } else {
        refresh_evictable(pid);
      }
    }
  }
}

void block_store::recency_unlink(std::uint32_t id) noexcept {
  entry& e = entries_[id];
  if (!e.in_recency)
    return;
  const auto p = static_cast<std::size_t>(e.part);
  if (e.rprev != npos)
    entries_[e.rprev].rnext = e.rnext;
  else
    recency_head_[p] = e.rnext;
  if (e.rnext != npos)
    entries_[e.rnext].rprev = e.rprev;
  else
    recency_tail_[p] = e.rprev;
  e.rprev = e.rnext = npos;
  e.in_recency = false;
}

void block_store::recency_push_front(std::uint32_t id) noexcept {
  entry& e = entries_[id];
  const auto p = static_cast<std::size_t>(e.part);
  e.rprev = npos;
  e.rnext = recency_head_[p];
  if (recency_head_[p] != npos)
    entries_[recency_head_[p]].rprev = id;
  recency_head_[p] = id;
  if (recency_tail_[p] == npos)
    recency_tail_[p] = id;
  e.in_recency = true;
}

// ---------------------------------------------------------------- disk tier

const clock_source& block_store::disk_clock() const noexcept {
  const clock_source* c = disk_ ? disk_->config().clock : nullptr;
  return c != nullptr ? *c : wall_clock_source::instance();
}

result<void> block_store::attach_disk(std::unique_ptr<disk_tier> tier) {
  if (!tier)
    return make_error(errc::invalid_argument, "no disk tier given");
  if (disk_)
    return make_error(errc::invalid_argument,
                      "a disk tier is already attached");
  disk_ = std::move(tier);
  return {};
}

void block_store::evict(std::uint32_t id) {
  const entry& e = entries_[id];
  if (expired_by(e.expires_at, now().count())) {
    // Its TTL ran out before space ran short: an expiration, and nothing
    // to spill.
    ++stats_.expirations;
    remove(id);
    return;
  }
  ++stats_.evictions;
  stats_.evicted_bytes += pool_.slot_bytes(e.slot.size_class);
  (void)spill(id, false);
  remove(id);
}

namespace {
/// How much later a disk copy may expire than the block in memory and
/// still count as lasting as long: the drift between the store's clock and
/// the wall clock, so that a block promoted from disk and evicted again is
/// not rewritten for it.
constexpr nanos disk_expiry_slack = std::chrono::seconds(1);
} // namespace

bool block_store::spill(std::uint32_t id, bool pinned, bool rewrite) {
  if (!disk_)
    return false;
  const entry& e = entries_[id];
  const ns_state& st = namespaces_[e.ns];
  const nanos wall = disk_clock().now();
  nanos expires{0};
  if (e.expires_at != 0) {
    const std::int64_t left = e.expires_at - now().count();
    if (left <= 0)
      return false; // expired: nothing worth keeping
    expires = wall + nanos{left};
  }
  if (const auto info =
          rewrite ? std::nullopt
                  : lasting_disk_copy(st.fingerprint, e.key, e.checksum, e.c,
                                      expires, e.prio)) {
    ++stats_.spills_skipped;
    if (pinned && !sync_disk_pins(id))
      ++stats_.spill_failures;
    // Used in memory since its copy was written: the copy is as recent
    // (else the disk's capacity eviction takes it before blocks spilled
    // later and never used) and has its accesses.
    (void)disk_->mark_used(e.key, e.access_count);
    return true;
  }
  std::span<const std::byte> bytes;
  if (const std::byte* p = host_ptr(entries_[id]); p != nullptr) {
    bytes = {p, e.stored_bytes};
  } else {
    std::span<std::byte> buf(scratch2_.data(), e.stored_bytes);
    if (!backend_->read(pool_.offset(e.slot), buf)) {
      ++stats_.spill_failures;
      return false;
    }
    bytes = buf;
  }
  if (!disk_->spill(e.key, st.fingerprint, e.c, bytes, e.checksum, wall,
                    expires, pinned, e.part, e.prio, e.access_count)) {
    ++stats_.spill_failures; // the tier logs why (e.g. the disk is full)
    return false;
  }
  ++stats_.spills;
  if (e.pins > 1 && !sync_disk_pins(id)) // a new copy has one pin
    ++stats_.spill_failures;
  return true;
}

std::optional<disk_block_info>
block_store::lasting_disk_copy(const ns_fingerprint& ns, const block_key& key,
                               std::uint64_t checksum, codec c, nanos expires,
                               priority p) const {
  // The same bytes on disk are enough only if they last as long: a copy
  // spilled before the block expired and was put again (or revived) keeps
  // its old expiry, and the block would be lost with it. The slack absorbs
  // the drift between the store's clock and the wall clock, so that a
  // block promoted from disk and evicted again is not rewritten for it.
  // (disk_expiry_slack). And only if they record the block's priority: a block
  // raised since its spill (a critical request used it) would come back ranking
  // lower, and one of a version 1 or 2 directory records none. The bytes are
  // then written again with it (a priority only changes upward while the
  // block is in memory, so at most once per level). And only if they are
  // this namespace's: a copy of another namespace's block of the same key
  // (put before a restart) is no copy of this block, which would not come
  // back from it.
  auto info = disk_->lookup(key);
  if (info && info->ns == ns && info->checksum == checksum && info->c == c &&
      info->prio == p &&
      (info->expires_at.count() == 0 ||
       (expires.count() != 0 &&
        info->expires_at + disk_expiry_slack >= expires)))
    return info;
  return std::nullopt;
}

void block_store::match_disk_copy_expiry(std::uint32_t id) {
  const entry& e = entries_[id];
  if (!disk_ || (e.expires_at == 0 && e.pins == 0))
    return;
  const auto info = disk_->lookup(e.key);
  // Another namespace's copy of the same raw key is none of this block's:
  // neither rewritten nor dropped for it (the block spills in its own name
  // when it is evicted).
  if (!info || info->ns != namespaces_[e.ns].fingerprint)
    return;
  const nanos wall = disk_clock().now();
  nanos expires{0}; // never
  if (e.expires_at != 0)
    expires =
        wall + nanos{std::max<std::int64_t>(e.expires_at - now().count(), 0)};
  const nanos copy = info->expires_at;
  const bool outlasts =
      expires.count() != 0 &&
      (copy.count() == 0 || copy > expires + disk_expiry_slack);
  const bool pinned = e.pins > 0 || info->pins > 0;
  // A pinned block's copy is its pin across restarts: ending much sooner
  // than the block (a put lengthened its TTL, or took it away), it would
  // drop the pinned block at a restart. Only when it has less than half
  // the block's time left: repeat puts of the same TTL move the block's
  // expiry a little each time, and rewriting the whole block for each was
  // a disk write per put.
  const bool pin_ends_early =
      pinned && copy.count() != 0 &&
      (expires.count() == 0 || (copy - wall) * 2 < expires - wall);
  if (!outlasts && !pin_ends_early)
    return;
  // A pinned copy is written again with the block's expiry (a pinned
  // spill is never refused as busy; one the disk tier fails after taking
  // it loses the old record too). Otherwise, or when the spill is refused,
  // a copy that outlasts the block goes (the block in memory spills again
  // when it is evicted); one that ends early stays, serving until then.
  if (pinned && spill(id, true, true))
    return;
  if (!outlasts)
    return;
  ++stats_.outlasting_disk_copies_dropped;
  (void)disk_->erase(e.key);
}

std::optional<disk_block_info>
block_store::usable_disk_copy(const ns_state& st, const block_key& key,
                              nanos wall) const {
  auto info = disk_->lookup(key);
  if (!info || info->ns != st.fingerprint || !is_valid(info->c) ||
      info->size != encoded_size(info->c, st.spec.elements_per_block()) ||
      (info->expires_at.count() != 0 && info->expires_at <= wall))
    return std::nullopt;
  return info;
}

std::size_t block_store::disk_prefix(ns_id ns,
                                     std::span<const block_key> keys) const {
  if (!disk_)
    return 0;
  const ns_state& st = namespaces_[ns.value];
  const nanos wall = disk_clock().now();
  const std::int64_t t = now().count();
  // Dead in memory (expired there, still held): a promotion does not bring
  // it back, so a request computes it, whatever its disk copy's expiry.
  const auto dead_in_memory = [&](const block_key& key) {
    const std::uint32_t id = index_.find(key);
    if (id == npos)
      return false;
    const entry& e = entries_[id];
    return e.state == entry_state::committed &&
           (e.dead || expired_by(e.expires_at, t));
  };
  std::size_t n = 0;
  // A block in memory goes on a prefix on disk too: one brought back alone
  // (acquire(), pin(), a put's parent) and the blocks put under it are
  // there, with no parent in memory, and a request would match them.
  while (n < keys.size() && !dead_in_memory(keys[n]) &&
         (usable_disk_copy(st, keys[n], wall).has_value() ||
          contains(ns, keys[n])))
    ++n;
  return n;
}

result<void> block_store::mark_written(put_handle& h, std::uint64_t checksum) {
  if (auto ok = check_open(h); !ok)
    return ok;
  if (!h.duplicate_) {
    entry& e = entries_[h.id_];
    e.checksum = checksum;
    e.state = entry_state::written;
  }
  h.written_ = true;
  return {};
}

void block_store::issue_promotions(ns_id ns, std::span<const block_key> keys,
                                   const block_key& parent,
                                   const put_options& options,
                                   std::vector<promotion>& into,
                                   disk_priority prio) {
  ++promote_group_;
  const nanos wall = disk_clock().now();
  const ns_state& st = namespaces_[ns.value];
  block_key par = parent;
  for (const block_key& k : keys) {
    put_options o = options;
    std::uint32_t restored = 0; // its accesses when it left memory
    std::uint32_t restored_pins = 0;
    bool from_copy = false;
    if (const auto info = usable_disk_copy(st, k, wall)) {
      from_copy = true;
      restored = static_cast<std::uint32_t>(std::min<std::uint64_t>(
          info->access_count, std::numeric_limits<std::uint32_t>::max()));
      restored_pins = info->pins;
      o.codec_override = info->c;
      // Back in the partition it was put in, not the asking call's (a long
      // document's block must not count against short prompts); a block
      // whose partition the tier does not know (spilled by a version 1
      // build) comes back in the asking call's.
      if (info->part)
        o.request_tokens = partition_start(*info->part);
      // At the priority it left with (the highest of the calls that had
      // covered it), raised to the asking call's as a hit in memory is; a
      // block whose priority the tier does not know (spilled by a version
      // 1 or 2 build) counts as normal, the priority of a put that names
      // none. Calls without a request priority (acquire(), pin(), a put's
      // parent) ask at the lowest, so the recorded one stands.
      o.prio = std::max(info->prio.value_or(priority::normal), options.prio);
      o.pin = info->pins > 0;
      // The copy's own expiry, none when it has none: a promotion is no
      // put, so neither the asking call's TTL nor the namespace's applies
      // (a block put to last, given a TTL here, would lose its disk copy's
      // "never" at its next spill, and a pinned one at this commit).
      o.ttl =
          info->expires_at.count() != 0 ? info->expires_at - wall : nanos{0};
    } else if (!contains(ns, k)) {
      break;
    } // else in memory only (disk_prefix()): a duplicate put, which links it
    auto h = reserve_block(ns, k, par, o, false);
    if (!h) {
      promotion_refused_ = h.error();
      break;
    }
    h->restored_count_ = restored;
    h->restored_pins_ = restored_pins;
    h->from_disk_copy_ = from_copy;
    promotion p;
    p.group = promote_group_;
    if (h->already_cached()) {
      p.answered = true;
    } else {
      const entry& e = entries_[h->id_];
      // No hashing here: every read verifies the block's checksum, so a
      // block damaged on disk is caught (dropped, counted) at its first read
      // and the bytes are hashed once, not twice. An arena the host cannot
      // address (device memory) gets the bytes through staging.
      std::byte* dst = host_ptr(e);
      if (dst == nullptr) {
        p.staging.resize(e.stored_bytes);
        dst = p.staging.data();
      }
      p.id =
          disk_->fetch_into(k, {dst, e.stored_bytes}, /*verify=*/false, prio);
    }
    p.handle = std::move(*h);
    into.push_back(std::move(p));
    par = k;
  }
}

void block_store::drain_disk() {
  const nested_scope nested(*this); // its commits are the store's own
  // Where the last answer was found, per list: answers come mostly in the
  // order the reads were queued, so each is found in a step or two. (Each
  // scanned both lists from the front: a chain of n blocks took n^2 / 2
  // steps, over a second for 32,768.)
  std::array<std::size_t, 2> from{0, 0};
  disk_->drain_completions([this, &from](disk_completion&& c) {
    if (c.op == disk_op::spill && !c.status.has_value()) {
      // Counted in spills when the tier took it; it was not written. One
      // superseded before it was written (the key spilled again or erased
      // from disk: errc::not_found) did not fail: the newer spill counts
      // on its own, and an erased copy was not wanted.
      --stats_.spills;
      if (c.status.error().code != errc::not_found)
        ++stats_.spill_failures;
    }
    if (c.op != disk_op::fetch)
      return;
    const std::array<std::vector<promotion>*, 2> lists{&promote_batch_,
                                                       &pending_promotions_};
    for (std::size_t l = 0; l < lists.size(); ++l) {
      std::vector<promotion>& list = *lists[l];
      const std::size_t n = list.size();
      for (std::size_t k = 0, i = from[l] < n ? from[l] : 0; k < n; ++k) {
        promotion& p = list[i];
        if (!p.answered && p.id == c.id) {
          p.answered = true;
          if (c.status.has_value())
            p.checksum = c.checksum;
          from[l] = i + 1;
          return; // a request's id is its own
        }
        i = i + 1 == n ? 0 : i + 1;
      }
    }
  });
  // Finish each promote() call's chain once all of it is answered: commit
  // the blocks up to the first that failed on disk, abort the rest (their
  // parent is missing). A failed block is never served.
  std::size_t done = 0;
  while (done < pending_promotions_.size()) {
    const std::uint64_t group = pending_promotions_[done].group;
    std::size_t end = done;
    bool ready = true;
    while (end < pending_promotions_.size() &&
           pending_promotions_[end].group == group) {
      ready = ready && pending_promotions_[end].answered;
      ++end;
    }
    if (!ready)
      break; // later groups wait too, so completions stay in order
    std::size_t ok_until = done;
    for (; ok_until < end; ++ok_until) {
      promotion& p = pending_promotions_[ok_until];
      if (!finish_promotion(p))
        break;
      if (!p.handle.already_cached())
        ++stats_.disk_block_hits;
      if (p.hold != 0)
        hold_block(p.hold, p.handle.key());
    }
    stats_.promotion_failures += end - ok_until;
    for (std::size_t i = end; i > ok_until; --i)
      pending_promotions_[i - 1].handle = put_handle{}; // children first
    done = end;
  }
  pending_promotions_.erase(pending_promotions_.begin(),
                            pending_promotions_.begin() +
                                static_cast<std::ptrdiff_t>(done));
}

bool block_store::await_promotions_of(std::span<const block_key> keys) {
  if (pending_promotions_.empty() || keys.empty())
    return false;
  // The last pending promotion of one of `keys`: promote() reserved its
  // block, so a put or another promotion of it gets busy until it lands.
  std::optional<std::size_t> last;
  // From the back: a chain's later keys were queued later, so once the
  // last of them is found the scans below stop early (front to back, a
  // promoted chain of n blocks took n^2 / 2 steps).
  for (auto it = keys.rbegin(); it != keys.rend(); ++it) {
    const std::uint32_t id = index_.find(*it);
    if (id == npos || entries_[id].state != entry_state::reserved)
      continue;
    for (std::size_t i = pending_promotions_.size(); i > last.value_or(0); --i)
      if (pending_promotions_[i - 1].handle.id_ == id) {
        last = i - 1;
        break;
      }
  }
  if (!last)
    return false;
  // Chains finish in order (drain_disk()): every read up to the end of that
  // one's chain.
  const std::uint64_t group = pending_promotions_[*last].group;
  promote_ids_.clear();
  for (std::size_t i = 0; i < pending_promotions_.size(); ++i) {
    if (i > *last && pending_promotions_[i].group != group)
      break;
    if (!pending_promotions_[i].answered)
      promote_ids_.push_back(pending_promotions_[i].id);
  }
  // Background reads a caller now waits for: ahead of the queued
  // background work, behind only a queued write of their own key.
  disk_->expedite(promote_ids_);
  wait_for_reads("a prefetched block");
  return true;
}

bool block_store::land(promotion& p) {
  if (p.staging.empty() || p.handle.already_cached())
    return true;
  const entry& e = entries_[p.handle.id_];
  const bool ok = backend_->write(pool_.offset(e.slot), p.staging).has_value();
  p.staging = {};
  return ok;
}

void block_store::abort_in_reverse(std::vector<promotion>& list) noexcept {
  for (std::size_t i = list.size(); i > 0; --i)
    list[i - 1].handle = put_handle{};
  list.clear();
}

block_store::disk_promoted
block_store::promote_now(ns_id ns, std::span<const block_key> keys,
                         const block_key& parent, kv_producer& producer,
                         const put_options& options) {
  promote_batch_.clear();
  issue_promotions(ns, keys, parent, options, promote_batch_,
                   disk_priority::demand);
  disk_promoted done;
  if (promote_batch_.empty())
    return done;
  await_promote_batch();
  bool contiguous = true;
  for (promotion& p : promote_batch_) {
    put_handle& h = p.handle;
    const bool ok = finish_promotion(p);
    if (!ok && !h.already_cached()) {
      // Missing or damaged on disk (or not landed): compute it, never
      // serve it wrong. It is then a put of this request's: its TTL (the
      // promotion had the copy's), and a copy left on disk that outlasts
      // it goes. (process() refused a negative TTL before it began.)
      ++stats_.promotion_failures;
      entries_[h.id_].expires_at = expiry_after(
          now(), options.ttl.value_or(namespaces_[ns.value].options.ttl));
      h.sets_expiry_ = true;
      entries_[h.id_].promotion = false; // this request's put now
      ++stats_.reserves;
      if (auto w = write_from(h, producer); !w) {
        // Before, dropped: process() reserved the block again and asked
        // the producer a second time, and only that error reached the
        // caller.
        done.produce_failed = w.error();
        break;
      }
      if (!commit(h))
        break; // process() computes it again
      contiguous = false;
      continue;
    }
    if (contiguous) {
      ++done.hits;
      if (!h.already_cached())
        ++done.from_disk;
    }
  }
  abort_in_reverse(promote_batch_); // what a break above left open
  return done;
}

void block_store::await_promote_batch() {
  // The I/O thread reads into the reserved slots: they must not be touched,
  // or freed, until it has answered, however long a sick disk takes. Only
  // these reads are waited for (demand reads, ahead of the spills and
  // prefetches queued before them), not the tier's whole queue.
  promote_ids_.clear();
  for (const promotion& p : promote_batch_)
    if (!p.answered)
      promote_ids_.push_back(p.id);
  wait_for_reads("a promotion");
}

void block_store::wait_for_reads(const char* what) {
  while (!disk_->wait_done(promote_ids_, std::chrono::seconds(30)))
    std::fprintf(stderr,
                 "kvfleet: the disk tier has not answered for 30 s; still "
                 "waiting for %s\n",
                 what);
  drain_disk();
}

bool block_store::finish_promotion(promotion& p) {
  return (p.handle.already_cached() || p.checksum) && land(p) &&
         mark_written(p.handle, p.checksum.value_or(0)).has_value() &&
         commit(p.handle).has_value();
}

bool block_store::promote_key_from_disk(ns_id ns, const block_key& key,
                                        const put_options& options) {
  // Inside process()'s promotion (promote_batch_ in use) its own puts
  // never need it: their parents are in memory or reserved.
  if (!disk_ || !promote_batch_.empty())
    return false;
  const std::span<const block_key> one(&key, 1);
  // On its way already (promote()): wait for that read. Should it not have
  // landed (an earlier block of its chain failed on disk, which aborts the
  // rest), its own copy may still be good: read it back alone below.
  if (await_promotions_of(one) && find_visible(ns, key, now()) != npos)
    return true;
  if (!usable_disk_copy(namespaces_[ns.value], key, disk_clock().now()))
    return false;
  // Its put is the store's own: the asking call counts its own failure.
  const nested_scope nested(*this);
  // No parent: the disk tier does not know it. The block comes back as a
  // root, so nothing in memory depends on a parent that may not be there,
  // and adopt() links it once a put names its parent.
  issue_promotions(ns, one, block_key{}, options, promote_batch_,
                   disk_priority::demand);
  if (promote_batch_.empty())
    return false; // no room, or a put of the key is open
  await_promote_batch();
  promotion& p = promote_batch_.front();
  const bool ok = finish_promotion(p);
  if (!ok) {
    ++stats_.promotion_failures; // missing or damaged on disk: not served
  } else if (!p.handle.already_cached()) {
    ++stats_.disk_block_hits;
    entries_[p.handle.id_].parent_unknown = true;
  }
  abort_in_reverse(promote_batch_); // a failed one is still open
  return ok;
}

std::uint32_t block_store::adoptive_parent(std::uint32_t id,
                                           const block_key& parent) const {
  const entry& e = entries_[id];
  if (!e.parent_unknown || parent.is_null())
    return npos;
  const std::uint32_t pid = index_.find(parent);
  if (pid == npos || entries_[pid].state != entry_state::committed ||
      entries_[pid].dead || entries_[pid].ns != e.ns)
    return npos;
  // A put naming a wrong parent must not close a cycle: the chain above
  // `parent` would then never become evictable.
  for (std::uint32_t a = pid; a != npos; a = entries_[a].parent)
    if (a == id)
      return npos;
  return pid;
}

void block_store::adopt(std::uint32_t id, const block_key& parent) {
  entry& e = entries_[id];
  if (e.leases > 0)
    return;
  const std::uint32_t pid = adoptive_parent(id, parent);
  if (pid == npos)
    return;
  // Pinned (or holding a pinned block), it would hold its new chain in
  // memory too: past the pin limit it stays a root, unlinked, so that
  // chain stays evictable. (Before, a pinned block brought back alone
  // from disk and linked by a later request without a pin took the bytes
  // pins hold past the limit unchecked.)
  if (pin_held(e) && !pin_room(pin_cost(pid), [] { return std::string(); }))
    return;
  e.parent = pid;
  e.parent_unknown = false;
  ++entries_[pid].children; // not a leaf any more: eviction takes `id` first
  if (pin_held(e))
    child_held(pid, true); // pins hold its new chain too
  refresh_evictable(pid);
}

result<std::size_t> block_store::promote(ns_id ns,
                                         std::span<const block_key> keys,
                                         const put_options& options,
                                         std::uint64_t hold) {
  auto st = check_ns(ns);
  if (!st)
    return unexpected<error>(st.error());
  if (auto ok = check_put_options(options, (*st)->options.default_codec); !ok)
    return unexpected<error>(ok.error());
  // A block that cannot be brought back is no error of this call.
  const nested_scope nested(*this);
  std::size_t in_memory = walk_prefix(ns, keys, now());
  std::size_t from_tier = 0;
  if (tier_) {
    poll_tier();
    const std::size_t n = tier_prefix_length(ns, keys.subspan(in_memory));
    if (n > 0) {
      from_tier = promote_from_tier(
          ns, keys.subspan(in_memory, n),
          in_memory > 0 ? keys[in_memory - 1] : block_key{}, options);
      if (hold != 0)
        for (const block_key& key : keys.subspan(in_memory, from_tier))
          hold_block(hold, key);
      in_memory += from_tier;
    }
  }
  if (!disk_)
    return from_tier;
  poll_disk();
  const std::size_t on_disk = disk_prefix(ns, keys.subspan(in_memory));
  const std::size_t before = pending_promotions_.size();
  issue_promotions(ns, keys.subspan(in_memory, on_disk),
                   in_memory > 0 ? keys[in_memory - 1] : block_key{}, options,
                   pending_promotions_, disk_priority::background);
  for (std::size_t i = before; i < pending_promotions_.size(); ++i)
    pending_promotions_[i].hold = hold; // held once landed (drain_disk())
  // A block in memory after a gap on disk (disk_prefix() goes on over it)
  // is a duplicate put that links it, not a read started.
  const auto started = std::count_if(
      pending_promotions_.begin() + static_cast<std::ptrdiff_t>(before),
      pending_promotions_.end(),
      [](const promotion& p) { return !p.handle.already_cached(); });
  return from_tier + static_cast<std::size_t>(started);
}

void block_store::poll_disk() {
  if (disk_)
    drain_disk();
}

void block_store::hold_block(std::uint64_t hold, const block_key& key) {
  const std::uint32_t id = index_.find(key);
  if (id == npos || entries_[id].state != entry_state::committed ||
      entries_[id].dead)
    return;
  auto& held = holds_[hold];
  if (held.size() == held.capacity()) // before the lease: none left half done
    held.reserve(std::max<std::size_t>(16, 2 * held.size()));
  ++entries_[id].leases;
  refresh_evictable(id);
  held.push_back(read_lease(this, id, key));
}

void block_store::release_held(std::uint64_t hold) noexcept {
  if (hold == 0)
    return;
  // Reads still on their way land unheld.
  for (promotion& p : pending_promotions_)
    if (p.hold == hold)
      p.hold = 0;
  holds_.erase(hold); // the leases let go
}

std::size_t block_store::held_blocks() const noexcept {
  std::size_t n = 0;
  for (const auto& [hold, leases] : holds_)
    n += leases.size();
  return n;
}

void block_store::collect_disk() {
  // Every eviction spills and the tier answers every spill: an owner that
  // only puts would otherwise leave those answers to pile up in the tier
  // (and its spill failures uncounted) until a process(), promote(),
  // poll_disk() or persist(). Only at the start of an owner's call, not
  // inside the store's own calls, which may be making room.
  if (disk_ && nested_ == 0)
    drain_disk();
}

result<block_store::tier_prefix>
block_store::lookup_tiers(ns_id ns, std::span<const block_key> keys) {
  auto st = check_ns(ns);
  if (!st) {
    count_rejected();
    return unexpected<error>(st.error());
  }
  const nanos start = now();
  tier_prefix out;
  out.memory = walk_prefix(ns, keys, start);
  // Tier and disk runs can alternate below memory, as process() takes them.
  for (std::size_t at = out.memory; at < keys.size();) {
    const std::size_t tier = tier_prefix_length(ns, keys.subspan(at));
    const std::size_t disk = disk_prefix(ns, keys.subspan(at + tier));
    if (tier + disk == 0)
      break;
    out.tier += tier;
    out.disk += disk;
    at += tier + disk;
  }
  count_lookup(start, out.memory + out.tier + out.disk, keys.size());
  return out;
}

result<std::size_t> block_store::persist(nanos timeout) {
  if (!disk_)
    return make_error(errc::invalid_argument, "persist needs a disk tier");
  if (timeout < nanos{0})
    return make_error(errc::invalid_argument,
                      "persist timeout is negative (" +
                          std::to_string(timeout.count()) + " ns)");
  // Past 100 years (nanos::max() for "no bound", say) it waits as long as
  // it takes: now() plus the timeout would overflow, and the deadline lie
  // in the past (before, such a call failed at once with a timeout).
  timeout = std::min(timeout, max_ttl);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const auto wait_for_disk = [&]() -> bool {
    const auto left =
        std::max(nanos{0}, std::chrono::duration_cast<nanos>(
                               deadline - std::chrono::steady_clock::now()));
    if (!disk_->wait_idle(left))
      return false;
    poll_disk(); // nor do its answers pile up
    return true;
  };
  // The tier refuses an unpinned spill while max_queued_bytes of spills
  // wait for the disk (errc::busy: a slow disk must not move evictions onto
  // the heap). persist() can wait instead: it lets the disk catch up before
  // each max_queued_bytes of spills. (Before, a store holding more than
  // that wrote about max_queued_bytes and counted the rest failed spills.)
  // Spills queued before the call count too: it starts from an idle disk.
  const std::uint64_t window = disk_->config().max_queued_bytes;
  std::uint64_t in_window = 0;
  const auto room_for = [&](std::uint64_t bytes) -> bool {
    if (in_window == 0 || bytes <= window - std::min(in_window, window))
      return true;
    in_window = 0;
    return wait_for_disk();
  };
  bool late = !wait_for_disk();
  std::vector<block_key> queued;
  for (std::uint32_t id = 0; id < entries_.size() && !late; ++id) {
    if (entries_[id].state != entry_state::committed || entries_[id].dead)
      continue;
    if (!room_for(entries_[id].stored_bytes)) {
      late = true;
      break;
    }
    // Collecting the disk's answers may have committed promotions: the
    // entry is read again (and may be gone).
    const entry& e = entries_[id];
    if (e.state != entry_state::committed || e.dead)
      continue;
    const std::uint64_t spills = stats_.spills;
    if (spill(id, e.pins > 0)) {
      queued.push_back(e.key);
      if (stats_.spills != spills) // not a copy the disk had already
        in_window += e.stored_bytes;
    }
  }
  // The memory tier's blocks are cached blocks too. By key: the tier may
  // change while the disk's answers are collected.
  std::vector<block_key> tier_keys;
  if (!late) {
    tier_keys.reserve(tier_index_.size());
    for (const auto& kv : tier_index_)
      tier_keys.push_back(kv.first);
  }
  for (const block_key& key : tier_keys) {
    auto it = tier_index_.find(key);
    if (it == tier_index_.end())
      continue;
    if (!room_for(it->second.stored_bytes)) {
      late = true;
      break;
    }
    it = tier_index_.find(key);
    if (it == tier_index_.end())
      continue;
    const std::uint64_t spills = stats_.spills;
    if (spill_tier_block(key, it->second)) {
      queued.push_back(key);
      if (stats_.spills != spills)
        in_window += it->second.stored_bytes;
    }
  }
  if (late || !wait_for_disk())
    return make_error(
        errc::io_error,
        "the disk tier did not finish writing within the timeout");
  // A spill the tier took may still fail (a full disk, an I/O error, a
  // failed commit): what counts is what it stores now that it is idle.
  return static_cast<std::size_t>(
      std::count_if(queued.begin(), queued.end(), [&](const block_key& k) {
        const auto info = disk_->lookup(k);
        return info && info->stored;
      }));
}

// ---------------------------------------------------------------- queries

std::size_t block_store::reserved_blocks() const noexcept {
  return entries_.capacity();
}

bool block_store::contains(ns_id ns, const block_key& key) const {
  const std::uint32_t id = index_.find(key);
  if (id == npos)
    return false;
  const entry& e = entries_[id];
  return e.state == entry_state::committed && !e.dead && e.ns == ns.value &&
         !expired_by(e.expires_at, now().count());
}

bool block_store::on_disk(ns_id ns, const block_key& key) const {
  return disk_ && ns.value < namespaces_.size() &&
         usable_disk_copy(namespaces_[ns.value], key, disk_clock().now())
             .has_value();
}

result<codec> block_store::codec_of(ns_id ns, const block_key& key) const {
  if (auto st = check_ns(ns); !st) // as every call with a namespace
    return unexpected<error>(st.error());
  if (!contains(ns, key))
    return make_error(errc::not_found,
                      "block " + key.to_hex() + " is not cached");
  return entries_[index_.find(key)].c;
}

result<void> block_store::corrupt_for_testing(ns_id ns, const block_key& key,
                                              std::size_t offset) {
  if (!contains(ns, key))
    return make_error(errc::not_found,
                      "block " + key.to_hex() + " is not cached");
  entry& e = entries_[index_.find(key)];
  std::byte* p = host_ptr(e);
  if (p == nullptr || offset >= e.stored_bytes)
    return make_error(errc::invalid_argument, "cannot corrupt that byte");
  p[offset] ^= std::byte{0x5a};
  return {};
}

void block_store::check_invariants() const {
  pool_.check_invariants();
  std::vector<std::uint32_t> children(entries_.size(), 0);
  std::size_t live = 0;
  std::size_t used = 0;
  std::size_t pinned = 0;
  std::array<std::size_t, partition_count> pinned_parts{};
  // Blocks the policies hold, by partition and priority.
  std::array<std::array<std::size_t, priority_count>, partition_count>
      flagged{};
  store_stats sums;
  for (std::uint32_t id = 0; id < entries_.size(); ++id) {
    const entry& e = entries_[id];
    if (e.state == entry_state::free)
      continue;
    ++live;
    KVFLEET_CHECK(index_.find(e.key) == id,
                  "index does not point at its entry");
    used += pool_.slot_bytes(e.slot.size_class);
    if (e.pins > 0) {
      pinned += pool_.slot_bytes(e.slot.size_class);
      pinned_parts[static_cast<std::size_t>(e.part)] +=
          pool_.slot_bytes(e.slot.size_class);
    }
    KVFLEET_CHECK(pool_.owner(e.slot) == id,
                  "the pool does not name a block's entry as its slot's owner");
    KVFLEET_CHECK(!e.parent_unknown || e.parent == npos,
                  "a block of unknown parent has one");
    if (e.parent != npos) {
      KVFLEET_CHECK(entries_[e.parent].state != entry_state::free,
                    "block chained from a freed parent");
      ++children[e.parent];
    }
    if (e.state == entry_state::committed) {
      KVFLEET_CHECK(e.flagged_evictable == (evictable(e) && !e.dead),
                    "evictable flag out of date");
      KVFLEET_CHECK(!(e.dead && evictable(e)), "removable dead block kept");
      if (e.flagged_evictable)
        ++flagged[static_cast<std::size_t>(e.part)]
                 [static_cast<std::size_t>(e.prio)];
      const std::uint64_t b = pool_.slot_bytes(e.slot.size_class);
      sums.bytes_by_codec[static_cast<std::size_t>(e.c)] += b;
      sums.bytes_by_partition[static_cast<std::size_t>(e.part)] += b;
      sums.blocks_by_codec[static_cast<std::size_t>(e.c)] += 1;
    } else {
      KVFLEET_CHECK(!e.flagged_evictable && !e.in_recency,
                    "uncommitted block visible to eviction");
    }
  }
  std::vector<std::uint32_t> departing(entries_.size(), 0);
  std::size_t in_flight = 0;
  std::size_t tier_bytes = 0;
  std::array<std::size_t, partition_count> departing_parts{};
  for (const demotion_batch& b : tier_batches_) {
    for (const demotion& d : b.blocks) {
      KVFLEET_CHECK(entries_[d.id].state == entry_state::committed &&
                        entries_[d.id].leases > 0,
                    "a block being demoted is not held");
      if (entries_[d.id].parent != npos)
        ++departing[entries_[d.id].parent];
      departing_parts[static_cast<std::size_t>(entries_[d.id].part)] +=
          pool_.slot_bytes(entries_[d.id].slot.size_class);
    }
    in_flight += b.slot_bytes;
    tier_bytes += b.tier_bytes;
  }
  KVFLEET_CHECK(tier_bytes == tier_bytes_in_flight_,
                "tier bytes of the copies in flight out of step");
  KVFLEET_CHECK(departing_parts == departing_by_partition_,
                "bytes leaving for the tier by partition out of step");
  for (std::uint32_t id = 0; id < entries_.size(); ++id) {
    KVFLEET_CHECK(children[id] == entries_[id].children,
                  "child count mismatch");
    KVFLEET_CHECK(departing[id] == entries_[id].departing,
                  "departing count mismatch");
  }
  KVFLEET_CHECK(in_flight == tier_in_flight_, "tier bytes in flight mismatch");
  KVFLEET_CHECK(tier_order_.size() == tier_index_.size(),
                "tier directory and order differ");
  for (const auto& [key, b] : tier_index_) {
    const auto it = tier_order_.find(b.seq);
    KVFLEET_CHECK(it != tier_order_.end() && it->second == key,
                  "tier order does not point at its block");
    KVFLEET_CHECK(!b.parent_unknown || b.parent.is_null(),
                  "a tier block of unknown parent has one");
    KVFLEET_CHECK(index_.find(key) == npos ||
                      entries_[index_.find(key)].state !=
                          entry_state::committed,
                  "a block both in memory and in the tier");
  }
  KVFLEET_CHECK(live == index_.size(), "index size mismatch");
  KVFLEET_CHECK(used == pool_.used_bytes(), "pool bytes mismatch");
  KVFLEET_CHECK(pinned == pinned_bytes_, "pinned bytes out of step");
  {
    // Pins hold each pinned block and every block it chains from.
    std::vector<std::uint8_t> held(entries_.size(), 0);
    for (std::uint32_t id = 0; id < entries_.size(); ++id)
      if (entries_[id].state != entry_state::free && entries_[id].pins > 0)
        for (std::uint32_t a = id; a != npos && held[a] == 0;
             a = entries_[a].parent)
          held[a] = 1;
    std::vector<std::uint32_t> held_children(entries_.size(), 0);
    std::size_t held_bytes = 0;
    for (std::uint32_t id = 0; id < entries_.size(); ++id) {
      if (held[id] == 0)
        continue;
      held_bytes += pool_.slot_bytes(entries_[id].slot.size_class);
      if (entries_[id].parent != npos)
        ++held_children[entries_[id].parent];
    }
    for (std::uint32_t id = 0; id < entries_.size(); ++id)
      KVFLEET_CHECK(entries_[id].held_children == held_children[id],
                    "held children out of step");
    KVFLEET_CHECK(held_bytes == pin_held_bytes_,
                  "bytes held by pins out of step");
  }
  KVFLEET_CHECK(pinned_parts == pinned_by_partition_,
                "pinned bytes by partition out of step");
  KVFLEET_CHECK(sums.bytes_by_codec == stats_.bytes_by_codec,
                "codec bytes mismatch");
  KVFLEET_CHECK(sums.blocks_by_codec == stats_.blocks_by_codec,
                "codec blocks mismatch");
  KVFLEET_CHECK(sums.bytes_by_partition == stats_.bytes_by_partition,
                "partition bytes mismatch");
  for (std::size_t p = 0; p < partition_count; ++p) {
    std::size_t all = 0;
    for (std::size_t l = 0; l < priority_count; ++l) {
      KVFLEET_CHECK(policies_[p]->evictable_count(static_cast<priority>(l)) ==
                        flagged[p][l],
                    "policy evictable count by priority mismatch");
      all += flagged[p][l];
    }
    KVFLEET_CHECK(policies_[p]->evictable_count() == all,
                  "policy evictable count mismatch");
    policies_[p]->check_invariants();
    std::size_t n = 0;
    for (std::uint32_t id = recency_head_[p]; id != npos;
         id = entries_[id].rnext) {
      KVFLEET_CHECK(entries_[id].in_recency &&
                        entries_[id].state == entry_state::committed &&
                        entries_[id].pins == 0,
                    "recency list holds a block it should not");
      KVFLEET_CHECK(++n <= entries_.size(), "recency list cycle");
    }
  }
}

} // namespace kvfleet::engine
