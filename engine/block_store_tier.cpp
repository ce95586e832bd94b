// block_store's memory tier (block_store.hpp, "Memory tier"): demotion of
// cold blocks into it in the background, promotion back on a hit, and the
// tier's directory (key -> place, oldest first).
#include "engine/block_store.hpp"

#include "engine/host_error.hpp"
#include "engine/internal/check.hpp"
#include "engine/internal/scoped_value.hpp"
#include "engine/internal/store_entry.hpp"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <memory>
#include <new>
#include <string>

namespace kvfleet::engine {

namespace {

constexpr std::uint32_t npos = block_index::npos;

// What a block takes in a tier batch: tiers place blocks at 256-byte
// boundaries (cuda::host_tier), so count them that way against its limit.
std::size_t batch_bytes(std::size_t stored) noexcept {
  return (stored + 255) / 256 * 256;
}

} // namespace

result<bool> block_store::attach_tier(const memory_tier_factory& make) {
  if (!make)
    return make_error(errc::invalid_argument, "no memory tier factory given");
  if (tier_)
    return make_error(errc::invalid_argument,
                      "a memory tier is already attached");
  // The host's factory: what it throws is an error value, as a producer's
  // exception is.
  result<std::unique_ptr<memory_tier>> made =
      make_error(errc::backend_error, "the memory tier factory gave nothing");
  try {
    made = make(*backend_);
  } catch (...) {
    return unexpected<error>{
        current_exception_error("the memory tier factory threw")};
  }
  if (!made)
    return unexpected<error>(made.error());
  if (!*made)
    return false;
  tier_ = std::move(*made);
  return true;
}

void block_store::tier_block_too_large(std::size_t stored, std::size_t limit) {
  ++stats_.tier_too_large;
  if (tier_too_large_logged_)
    return;
  tier_too_large_logged_ = true;
  std::fprintf(stderr,
               "kvfleet: a block of %zu bytes is larger than the memory tier "
               "takes in one copy (%zu bytes): such blocks are evicted, not "
               "moved to the tier; give the tier staging of at least twice "
               "the largest block (host_tier_options::staging_bytes), or "
               "smaller blocks (fewer tokens per block)\n",
               stored, limit);
}

bool block_store::in_tier(ns_id ns, const block_key& key) const {
  const auto it = tier_index_.find(key);
  return it != tier_index_.end() && it->second.ns == ns.value &&
         !expired_by(it->second.expires_at, now().count());
}

bool block_store::can_follow_children(std::uint32_t id) const noexcept {
  const entry& e = entries_[id];
  return e.state == entry_state::committed && !e.dead && e.pins == 0 &&
         e.leases == 0 && e.children > 0 && e.children == e.departing;
}

void block_store::start_demotion(std::uint32_t id, demotion_batch& batch,
                                 std::vector<tier_demotion>& jobs) {
  entry& e = entries_[id];
  ++e.leases; // keeps it in place (no eviction, no transcoding) while copied
  refresh_evictable(id);
  if (e.parent != npos)
    ++entries_[e.parent].departing;
  batch.blocks.push_back({id, e.access_count, {}});
  batch.slot_bytes += pool_.slot_bytes(e.slot.size_class);
  departing_by_partition_[static_cast<std::size_t>(e.part)] +=
      pool_.slot_bytes(e.slot.size_class);
  jobs.push_back({pool_.offset(e.slot), e.stored_bytes});
}

void block_store::cancel_demotions(demotion_batch& batch) {
  // Parents first: each release may free a dead block, and a parent's
  // departing count must be back to zero before its child is released.
  for (auto it = batch.blocks.rbegin(); it != batch.blocks.rend(); ++it) {
    entry& e = entries_[it->id];
    if (e.parent != npos)
      --entries_[e.parent].departing;
    departing_by_partition_[static_cast<std::size_t>(e.part)] -=
        pool_.slot_bytes(e.slot.size_class);
  }
  for (auto it = batch.blocks.rbegin(); it != batch.blocks.rend(); ++it)
    release_lease(it->id);
  batch.blocks.clear();
  batch.slot_bytes = 0;
}

result<std::size_t> block_store::demote_to_tier(std::size_t bytes) {
  if (!tier_)
    return make_error(errc::invalid_argument, "no memory tier attached");
  poll_tier();
  const std::size_t limit =
      std::min(tier_->max_batch_bytes(), tier_->capacity_bytes());
  const std::int64_t t = now().count();
  std::size_t started = 0;
  std::vector<tier_demotion> jobs;
  std::vector<tier_place> places;
  std::vector<std::uint32_t> follow; // parents left over by a full batch
  const internal::scoped_value scope{picking_for_tier_, true};
  while (started < bytes) {
    demotion_batch batch;
    jobs.clear();
    std::size_t taken = 0; // tier bytes of this batch
    auto fits = [&](std::uint32_t id) {
      return taken + batch_bytes(entries_[id].stored_bytes) <= limit;
    };
    // Takes `id`, then each parent whose children are all leaving; false
    // when the batch is full (the block that did not fit waits in
    // `follow` for the next batch).
    auto take_chain = [&](std::uint32_t id) {
      while (id != npos && started + batch.slot_bytes < bytes) {
        if (!fits(id)) {
          follow.push_back(id);
          return false;
        }
        taken += batch_bytes(entries_[id].stored_bytes);
        start_demotion(id, batch, jobs);
        id = entries_[id].parent;
        if (id != npos && !can_follow_children(id))
          break;
      }
      return true;
    };
    while (started + batch.slot_bytes < bytes) {
      if (!follow.empty()) {
        const std::uint32_t id = follow.back();
        follow.pop_back();
        if (can_follow_children(id) && !take_chain(id))
          break;
        continue;
      }
      // The lowest priority, and within it the partition furthest over
      // its share, gives first, as in evict_bytes(); expired blocks are
      // not worth a copy: evict them.
      const std::uint32_t id = lowest_priority_victim();
      if (id == npos)
        break;
      if (expired_by(entries_[id].expires_at, t)) {
        ++stats_.expirations;
        kill(id);
        continue;
      }
      if (!fits(id) && batch.blocks.empty()) {
        // Too large for any batch: no demotion gets past it.
        tier_block_too_large(entries_[id].stored_bytes, limit);
        break;
      }
      if (!fits(id) || !take_chain(id))
        break;
    }
    if (batch.blocks.empty())
      break;
    // Room in the tier: its oldest blocks go first, but only once the
    // tier has said no room (errc::out_of_memory, which memory_tier
    // answers only when it could otherwise take the batch now). Dropping
    // ahead of that threw blocks out for a batch that a busy tier then
    // refused. The first refusal drops in one go down to the bytes the
    // batch needs; an extent is freed when all its blocks are, so keep
    // dropping while demote says no room.
    auto ticket = tier_->demote(jobs, places);
    // Dropping helps only if the batch fits beside the copies in flight,
    // which hold their room until they finish: otherwise it waits for
    // them, dropping nothing. (Before, every block of the tier was dropped
    // for a batch that was then refused all the same.)
    const bool room_could_come =
        tier_bytes_in_flight_ + taken <= tier_->capacity_bytes();
    for (bool first = true;
         !ticket && ticket.error().code == errc::out_of_memory &&
         !tier_order_.empty() && room_could_come;
         first = false) {
      do
        drop_oldest_tier_block();
      while (first && !tier_order_.empty() &&
             tier_->capacity_bytes() - tier_->used_bytes() < taken);
      ticket = tier_->demote(jobs, places);
    }
    if (!ticket) {
      // busy: its staging is full of copies in flight; no room with
      // nothing left to drop and copies in flight: they hold it. Either
      // way the next call continues. Anything else is a failure worth
      // counting.
      const bool waits =
          ticket.error().code == errc::busy ||
          (ticket.error().code == errc::out_of_memory &&
           (tier_order_.empty() || !room_could_come) && tier_in_flight_ > 0);
      if (!waits)
        ++stats_.tier_failures;
      cancel_demotions(batch);
      break;
    }
    for (std::size_t i = 0; i < batch.blocks.size(); ++i)
      batch.blocks[i].place = places[i];
    batch.ticket = *ticket;
    batch.tier_bytes = taken;
    started += batch.slot_bytes;
    tier_in_flight_ += batch.slot_bytes;
    tier_bytes_in_flight_ += taken;
    tier_batches_.push_back(std::move(batch));
  }
  return started;
}

void block_store::finish_demotions(demotion_batch& batch, bool copied) {
  const std::int64_t t = now().count();
  // Children come before their parents in a batch, so a parent sees its
  // children gone (or kept) by the time its own turn comes.
  for (const demotion& d : batch.blocks) {
    entry& e = entries_[d.id];
    --e.leases;
    if (e.parent != npos)
      --entries_[e.parent].departing;
    departing_by_partition_[static_cast<std::size_t>(e.part)] -=
        pool_.slot_bytes(e.slot.size_class);
    const bool expired = expired_by(e.expires_at, t);
    const bool leave = copied && !e.dead && !expired && e.pins == 0 &&
                       e.leases == 0 && e.children == 0 &&
                       e.access_count == d.access_count;
    if (!leave) {
      tier_->release(d.place);
      if (copied && !e.dead && !expired)
        ++stats_.tier_demotions_kept;
      if (expired && !e.dead) {
        ++stats_.expirations;
        kill(d.id); // refresh_evictable inside removes it when free
      } else {
        refresh_evictable(d.id);
      }
      continue;
    }
    tier_block b;
    b.place = d.place;
    if (e.parent != npos)
      b.parent = entries_[e.parent].key;
    b.parent_unknown = e.parent_unknown;
    b.checksum = e.checksum;
    b.expires_at = e.expires_at;
    b.seq = ++tier_seq_;
    b.stored_bytes = e.stored_bytes;
    b.ns = e.ns;
    b.c = e.c;
    b.prio = e.prio;
    b.part = e.part;
    b.access_count = e.access_count;
    const block_key key = e.key;
    ++stats_.tier_demotions;
    stats_.tier_demoted_bytes += e.stored_bytes;
    refresh_evictable(d.id);
    remove(d.id, /*announce=*/false); // still this store's, in the tier
    tier_index_.emplace(key, b);
    tier_order_.emplace(b.seq, key);
  }
}

void block_store::poll_tier() {
  while (!tier_batches_.empty()) {
    demotion_batch& b = tier_batches_.front();
    auto done = tier_->poll(b.ticket);
    if (done && !*done)
      return; // batches finish in order
    if (!done)
      ++stats_.tier_failures; // the copy failed: the blocks stay in memory
    tier_in_flight_ -= b.slot_bytes;
    tier_bytes_in_flight_ -= b.tier_bytes;
    finish_demotions(b, done.has_value());
    tier_batches_.pop_front();
  }
}

void block_store::drop_tier_block(const block_key& key, bool announce) {
  const auto it = tier_index_.find(key);
  if (it == tier_index_.end())
    return;
  const tier_block& b = it->second;
  tier_->release(b.place);
  tier_order_.erase(b.seq);
  tier_index_.erase(it);
  if (announce && config_.on_block_event)
    config_.on_block_event(block_event::removed, key);
}

bool block_store::spill_tier_block(const block_key& key, const tier_block& b) {
  const std::int64_t t = now().count();
  if (!disk_ || expired_by(b.expires_at, t))
    return false;
  const std::byte* bytes = tier_->host_bytes(b.place);
  if (bytes == nullptr)
    return false;
  const nanos wall = disk_clock().now();
  const nanos expires =
      b.expires_at != 0 ? wall + nanos{b.expires_at - t} : nanos{0};
  const ns_state& st = namespaces_[b.ns];
  // As spill() from memory: the copy carries the block's accesses, and a
  // copy already there is marked used (before, a hot block that reached
  // disk through the tier came back with one access, cold to LFU and to
  // adaptive compression, and a skipped spill left its copy first in line
  // for the disk's capacity eviction).
  if (lasting_disk_copy(st.fingerprint, key, b.checksum, b.c, expires,
                        b.prio)) {
    ++stats_.spills_skipped;
    (void)disk_->mark_used(key, b.access_count);
    return true;
  }
  if (!disk_->spill(key, st.fingerprint, b.c, {bytes, b.stored_bytes},
                    b.checksum, wall, expires, false, b.part, b.prio,
                    b.access_count)) {
    ++stats_.spill_failures;
    return false;
  }
  ++stats_.spills;
  return true;
}

void block_store::drop_oldest_tier_block() {
  const block_key key = tier_order_.begin()->second;
  ++stats_.tier_drops;
  // Below the tier is the disk: a block that leaves the tier for room goes
  // there, as a block evicted from memory does.
  (void)spill_tier_block(key, tier_index_.at(key));
  drop_tier_block(key, true);
}

bool block_store::promote_key_from_tier(ns_id ns, const block_key& key) {
  if (tier_index_.empty())
    return false;
  // Its puts are the store's own: the asking call counts its own failure.
  const nested_scope nested(*this);
  // The key and the tier blocks it chains from, up to the first ancestor
  // in memory (or the chain's root); a chain broken by an ancestor that is
  // in neither stays where it is (unreachable by prefix, dropped in time).
  std::vector<block_key> chain;
  block_key parent{};
  // No request priority here (a lease, a pin, a parent): the blocks keep
  // theirs.
  put_options keep;
  keep.prio = priority::background;
  for (block_key k = key;;) {
    const auto it = tier_index_.find(k);
    if (it == tier_index_.end() || it->second.ns != ns.value)
      return false;
    chain.push_back(k);
    parent = it->second.parent;
    if (parent.is_null() || find_visible(ns, parent, now()) != npos)
      break;
    if (const auto up = tier_index_.find(parent);
        up == tier_index_.end() || up->second.ns != ns.value) {
      // The parent went to disk while this block stayed in the tier:
      // brought back first, the chain lands on it. (Before, the chain
      // counted as broken: acquire() and pin() answered not_found for a
      // block whose bytes were in the tier.)
      if (!promote_key_from_disk(ns, parent, keep))
        return false;
      break;
    }
    k = parent;
  }
  std::reverse(chain.begin(), chain.end());
  return promote_from_tier(ns, chain, parent, keep) == chain.size();
}

std::size_t block_store::tier_prefix_length(ns_id ns,
                                            std::span<const block_key> keys) {
  if (tier_index_.empty())
    return 0;
  const std::int64_t t = now().count();
  std::size_t n = 0;
  for (const block_key& k : keys) {
    const auto it = tier_index_.find(k);
    if (it == tier_index_.end() || it->second.ns != ns.value)
      break;
    if (expired_by(it->second.expires_at, t)) {
      ++stats_.expirations;
      drop_tier_block(k, true);
      break;
    }
    ++n;
  }
  return n;
}

std::size_t block_store::promote_from_tier(ns_id ns,
                                           std::span<const block_key> keys,
                                           const block_key& parent,
                                           const put_options& options) {
  const std::size_t limit = tier_->max_batch_bytes();
  std::size_t promoted = 0;
  block_key par = parent;
  std::vector<put_handle> handles;
  std::vector<tier_promotion> jobs;
  std::vector<const block_key*> job_keys;
  while (promoted < keys.size()) {
    // One batch: reserve slots along the chain up to the staging limit.
    handles.clear();
    jobs.clear();
    job_keys.clear();
    std::size_t taken = 0;
    const std::int64_t t = now().count();
    for (std::size_t i = promoted; i < keys.size(); ++i) {
      const auto it = tier_index_.find(keys[i]);
      if (it == tier_index_.end())
        break;
      const tier_block& b = it->second;
      if (taken > 0 && taken + batch_bytes(b.stored_bytes) > limit)
        break;
      put_options o = options;
      o.codec_override = b.c;
      // Its own priority, raised to the asking request's (as a hit in
      // memory is).
      o.prio = std::max(b.prio, options.prio);
      // Back in the partition it was put in, not the asking request's (a
      // long document's block must not count against short prompts).
      o.request_tokens = partition_start(b.part);
      o.pin = false;
      // Its own expiry, none when it has none (no put: neither the asking
      // call's TTL nor the namespace's applies).
      o.ttl = nanos{0};
      if (b.expires_at != 0) {
        if (b.expires_at <= t)
          break;
        o.ttl = nanos{b.expires_at - t};
      }
      auto h = reserve_block(ns, keys[i], par, o, false);
      if (!h) {
        promotion_refused_ = h.error();
        break;
      }
      h->restored_count_ = b.access_count;
      if (!h->already_cached()) {
        const entry& e = entries_[h->id_];
        if (e.stored_bytes != b.stored_bytes)
          break; // a different namespace layout: never copy it in
        jobs.push_back({b.place, pool_.offset(e.slot)});
        job_keys.push_back(&keys[i]);
        taken += batch_bytes(b.stored_bytes);
      }
      handles.push_back(std::move(*h));
      par = keys[i];
    }
    if (handles.empty())
      break;
    bool copied = true;
    if (!jobs.empty()) {
      auto ticket = tier_->promote(jobs);
      if (ticket) {
        // A promotion is a request waiting on a hit: microseconds of copy
        // on the tier's own stream, not queued behind demotions.
        copied = tier_->wait(*ticket).has_value();
      } else {
        copied = false;
      }
    }
    if (!copied) {
      ++stats_.tier_failures;
      for (auto it = handles.rbegin(); it != handles.rend(); ++it)
        *it = put_handle{}; // children first
      break;
    }
    std::size_t landed = 0;
    for (put_handle& h : handles) {
      const auto it = tier_index_.find(h.key());
      const std::uint64_t sum =
          it != tier_index_.end() ? it->second.checksum : std::uint64_t{0};
      const bool parent_unknown =
          it != tier_index_.end() && it->second.parent_unknown;
      const bool ok = (h.already_cached() || it != tier_index_.end()) &&
                      mark_written(h, sum).has_value() && commit(h).has_value();
      if (!ok)
        break;
      // commit() dropped the tier copy of a new block; a block that was in
      // memory already keeps that one.
      if (h.already_cached()) {
        drop_tier_block(h.key(), false);
      } else {
        ++stats_.tier_block_hits;
        // Back from disk alone before it went to the tier: unless this
        // call named its parent (a request's chain), it is still unlinked
        // and adopt() links it once a put or request names the parent.
        entry& e = entries_[h.id_];
        e.parent_unknown = parent_unknown && e.parent == npos;
      }
      ++landed;
    }
    for (auto it = handles.rbegin(); it != handles.rend(); ++it)
      *it = put_handle{}; // whatever did not land is aborted, children first
    promoted += landed;
    if (landed < handles.size())
      break;
  }
  return promoted;
}

} // namespace kvfleet::engine
