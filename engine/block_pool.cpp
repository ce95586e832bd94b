#include "engine/block_pool.hpp"

#include "engine/internal/check.hpp"

#include <algorithm>
#include <new>
#include <string>

namespace kvfleet::engine {

namespace {
std::size_t round_up(std::size_t n, std::size_t a) {
  return (n + a - 1) / a * a;
}
} // namespace

block_pool::block_pool(std::size_t slab_bytes, std::uint32_t slabs)
    : slab_bytes_(slab_bytes), slabs_(slabs) {
  free_slabs_.reserve(slabs);
  // Hand out low slabs first: keeps the used part of the arena compact.
  for (std::uint32_t i = slabs; i > 0; --i)
    free_slabs_.push_back(i - 1);
}

result<block_pool> block_pool::create(std::size_t arena_bytes,
                                      std::size_t slab_bytes) {
  if (arena_bytes == 0)
    return make_error(errc::zero_capacity, "block pool of zero bytes");
  slab_bytes = slab_bytes / slot_alignment * slot_alignment;
  if (slab_bytes == 0)
    return make_error(errc::invalid_argument,
                      "slab size must be at least " +
                          std::to_string(slot_alignment) + " bytes");
  if (slab_bytes > arena_bytes)
    return make_error(errc::invalid_argument, "slab size " +
                                                  std::to_string(slab_bytes) +
                                                  " exceeds the arena size " +
                                                  std::to_string(arena_bytes));
  // A slot's index in its slab and the slab's slot count are 32 bits: a
  // slab with more slots of the smallest size would wrap that count (to 0
  // at 2^32 slots, and the first allocation would break the bookkeeping).
  constexpr std::size_t max_slab_bytes =
      slot_alignment * std::size_t{std::numeric_limits<std::uint32_t>::max()};
  if (slab_bytes > max_slab_bytes)
    return make_error(
        errc::invalid_argument,
        "slab size " + std::to_string(slab_bytes) + " exceeds the largest, " +
            std::to_string(max_slab_bytes) + " bytes (2^32 - 1 " + "slots of " +
            std::to_string(slot_alignment) + " bytes)");
  const std::size_t slabs = arena_bytes / slab_bytes;
  if (slabs >= none)
    return make_error(errc::invalid_argument, "too many slabs");
  // About 84 bytes of host memory per slab, allocated now: small slabs on
  // a large arena can ask for more than the host has.
  try {
    return block_pool(slab_bytes, static_cast<std::uint32_t>(slabs));
  } catch (const std::bad_alloc&) {
    return make_error(errc::out_of_memory,
                      "no host memory for the bookkeeping of " +
                          std::to_string(slabs) + " slabs of " +
                          std::to_string(slab_bytes) +
                          " bytes; use larger slabs");
  }
}

result<std::uint16_t> block_pool::size_class_for(std::size_t bytes) {
  if (bytes == 0)
    return make_error(errc::invalid_argument, "size class of zero bytes");
  if (bytes > slab_bytes_)
    return make_error(errc::value_too_large,
                      "a value of " + std::to_string(bytes) +
                          " bytes is larger than a slab (" +
                          std::to_string(slab_bytes_) + " bytes)");
  const std::size_t slot = round_up(bytes, slot_alignment);
  for (std::size_t i = 0; i < classes_.size(); ++i)
    if (classes_[i].slot_bytes == slot)
      return static_cast<std::uint16_t>(i);
  if (classes_.size() >= no_class)
    return make_error(errc::invalid_argument, "too many size classes");
  classes_.push_back(class_state{slot, none});
  return static_cast<std::uint16_t>(classes_.size() - 1);
}

bool block_pool::can_allocate(std::uint16_t cls) const noexcept {
  return cls < classes_.size() &&
         (classes_[cls].with_room != none || !free_slabs_.empty());
}

result<slot_ref> block_pool::allocate(std::uint16_t cls) {
  if (cls >= classes_.size())
    return make_error(errc::invalid_argument, "unknown size class");
  class_state& c = classes_[cls];
  std::uint32_t s = c.with_room;
  if (s == none) {
    if (free_slabs_.empty())
      return make_error(errc::out_of_memory, "block pool is full");
    s = free_slabs_.back();
    slab_state& fresh = slabs_[s];
    const auto capacity =
        static_cast<std::uint32_t>(slab_bytes_ / c.slot_bytes);
    // The slab's free list and owners are sized once, here (8 bytes a
    // slot): without the heap for them the slab stays free and the put
    // fails, nothing lost.
    try {
      fresh.free_slots.clear();
      fresh.free_slots.reserve(capacity);
      if (fresh.owners.size() < capacity)
        fresh.owners.resize(capacity, vacant);
    } catch (const std::bad_alloc&) {
      return make_error(errc::out_of_memory,
                        "no memory for the free list of a slab of " +
                            std::to_string(capacity) + " slots");
    }
    free_slabs_.pop_back();
    fresh.size_class = cls;
    fresh.used = 0;
    fresh.bumped = 0;
    fresh.capacity = capacity;
    link(s);
  }
  return take(s);
}

slot_ref block_pool::take(std::uint32_t s) noexcept {
  slab_state& slab = slabs_[s];
  std::uint32_t index = 0;
  if (!slab.free_slots.empty()) {
    index = slab.free_slots.back();
    slab.free_slots.pop_back();
  } else {
    index = slab.bumped++;
  }
  ++slab.used;
  if (slab.used == slab.capacity)
    unlink(s);
  used_bytes_ += classes_[slab.size_class].slot_bytes;
  slab.owners[index] = no_owner;
  return slot_ref{s, index, slab.size_class};
}

void block_pool::free(slot_ref slot) {
  KVFLEET_CHECK(slot.valid() && slot.slab < slabs_.size(),
                "free of a bad slot");
  slab_state& slab = slabs_[slot.slab];
  KVFLEET_CHECK(slab.size_class == slot.size_class && slab.used > 0 &&
                    slot.index < slab.bumped &&
                    slab.owners[slot.index] != vacant,
                "free of a slot the pool did not hand out");
  const bool was_full = slab.used == slab.capacity;
  --slab.used;
  used_bytes_ -= classes_[slot.size_class].slot_bytes;
  slab.owners[slot.index] = vacant;
  if (slab.used == 0) {
    // Not listed when full, nor while drain_slab() empties it.
    if (slab.listed)
      unlink(slot.slab);
    slab.size_class = no_class;
    slab.free_slots.clear();
    free_slabs_.push_back(slot.slab);
    return;
  }
  slab.free_slots.push_back(slot.index);
  if (was_full)
    link(slot.slab);
}

std::size_t block_pool::free_slots_of(std::uint16_t cls) const noexcept {
  std::size_t n = 0;
  for (std::uint32_t s = classes_[cls].with_room; s != none; s = slabs_[s].next)
    n += slabs_[s].capacity - slabs_[s].used;
  return n;
}

std::size_t block_pool::smallest_slot_bytes() const noexcept {
  std::size_t best = 0;
  for (const auto& c : classes_)
    if (best == 0 || c.slot_bytes < best)
      best = c.slot_bytes;
  return best;
}

void block_pool::link(std::uint32_t s) {
  slab_state& slab = slabs_[s];
  class_state& c = classes_[slab.size_class];
  slab.prev = none;
  slab.next = c.with_room;
  if (c.with_room != none)
    slabs_[c.with_room].prev = s;
  c.with_room = s;
  slab.listed = true;
}

void block_pool::unlink(std::uint32_t s) {
  slab_state& slab = slabs_[s];
  class_state& c = classes_[slab.size_class];
  if (slab.prev != none)
    slabs_[slab.prev].next = slab.next;
  else
    c.with_room = slab.next;
  if (slab.next != none)
    slabs_[slab.next].prev = slab.prev;
  slab.prev = slab.next = none;
  slab.listed = false;
}

void block_pool::check_invariants() const {
  std::size_t used = 0;
  std::size_t free_count = 0;
  for (std::uint32_t s = 0; s < slabs_.size(); ++s) {
    const slab_state& slab = slabs_[s];
    if (slab.size_class == no_class) {
      ++free_count;
      KVFLEET_CHECK(slab.used == 0 && !slab.listed, "free slab in use");
      continue;
    }
    KVFLEET_CHECK(slab.used > 0, "assigned slab with no used slot");
    KVFLEET_CHECK(slab.used <= slab.capacity, "slab over capacity");
    KVFLEET_CHECK(slab.bumped - slab.free_slots.size() == slab.used,
                  "slab slot count mismatch");
    KVFLEET_CHECK(slab.listed == (slab.used < slab.capacity),
                  "slab with room not listed, or full slab listed");
    std::uint32_t owned = 0;
    for (std::uint32_t i = 0; i < slab.bumped; ++i)
      owned += slab.owners[i] != vacant ? 1U : 0U;
    KVFLEET_CHECK(owned == slab.used, "slab owners do not match its slots");
    used += std::size_t{slab.used} * classes_[slab.size_class].slot_bytes;
  }
  KVFLEET_CHECK(free_count == free_slabs_.size(), "free slab list mismatch");
  KVFLEET_CHECK(used == used_bytes_, "used bytes mismatch");
}

} // namespace kvfleet::engine
