#pragma once
/// Slab block pool: the engine's memory pool.
///
/// The arena (a memory_backend's bytes) is cut into equal slabs. A slab is
/// given to one size class when that class needs room and handed back when
/// its last slot is freed, so classes share the arena. A slot is a
/// (slab, index) pair; its arena offset is slab * slab_bytes + index *
/// slot_bytes. The pool only does bookkeeping: it never touches the arena.
///
/// Allocation and free are O(1) and allocate no heap memory once each slab's
/// free list has been sized (the first time the slab serves a class).
///
/// Compaction: a slab stays with its class while any of its slots is used,
/// so when the workload moves to other block sizes a class can hold many
/// sparse slabs while another class finds none. The pool records an owner
/// (the caller's number, e.g. an entry id) per slot; reclaimable_slab()
/// finds a sparse slab whose slots fit into the free slots of its class's
/// other slabs, and drain_slab() moves them there (the caller copies the
/// bytes) and hands the slab back. Both walk slabs: not for the hot path.
/// Not thread-safe: one owner.

#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace kvfleet::engine {

/// A slot in the pool. Default-constructed slots are invalid.
struct slot_ref {
  static constexpr std::uint32_t npos =
      std::numeric_limits<std::uint32_t>::max();
  std::uint32_t slab = npos;
  std::uint32_t index = 0;
  std::uint16_t size_class = 0;
  [[nodiscard]] bool valid() const noexcept { return slab != npos; }
  friend bool operator==(const slot_ref&, const slot_ref&) = default;
};

class block_pool {
public:
  /// Slots are aligned to this many bytes.
  static constexpr std::size_t slot_alignment = 256;

  /// A pool over `arena_bytes` cut into slabs of `slab_bytes` (rounded down
  /// to the slot alignment). Zero sizes, a slab larger than the arena and a
  /// slab of more than 2^32 - 1 slots of `slot_alignment` bytes (about
  /// 1 TiB) are errors.
  [[nodiscard]] static result<block_pool> create(std::size_t arena_bytes,
                                                 std::size_t slab_bytes);

  /// Returns the size class whose slots hold exactly `bytes` rounded up to
  /// the slot alignment, creating it if needed. More than a slab is
  /// errc::value_too_large.
  [[nodiscard]] result<std::uint16_t> size_class_for(std::size_t bytes);

  /// A slot's owner before set_owner(): never moved by compaction.
  static constexpr std::uint32_t no_owner = slot_ref::npos - 1;

  /// Takes a free slot of class `cls`; errc::out_of_memory when neither a
  /// partly used slab of that class nor a free slab is left.
  [[nodiscard]] result<slot_ref> allocate(std::uint16_t cls);
  /// Returns a slot. REQUIRES: allocated and not yet freed.
  void free(slot_ref slot);
  /// Records who holds an allocated slot (drain_slab() names it).
  void set_owner(slot_ref slot, std::uint32_t owner) noexcept {
    slabs_[slot.slab].owners[slot.index] = owner;
  }
  [[nodiscard]] std::uint32_t owner(slot_ref slot) const noexcept {
    return slabs_[slot.slab].owners[slot.index];
  }

  /// The slab with the fewest used slots, of a class other than `except`,
  /// whose used slots all fit into free slots of its class's other slabs
  /// and whose every owner satisfies `movable(owner)`; slot_ref::npos when
  /// there is none. Walks the slabs that have a free slot and the slots of
  /// those it considers.
  template <class Movable>
  [[nodiscard]] std::uint32_t reclaimable_slab(std::uint16_t except,
                                               Movable&& movable) const;
  /// Empties slab `s` into free slots of its class's other slabs (never a
  /// free slab): for each used slot, takes a free slot `to` elsewhere (same
  /// owner), calls `move(from, to)` and frees `from`. `move` copies the
  /// bytes and repoints the owner; when it returns false, `to` is freed,
  /// `from` stays and draining stops. Returns true when the slab went back
  /// to the free slabs. REQUIRES: `s` is reclaimable_slab()'s answer.
  template <class Move> bool drain_slab(std::uint32_t s, Move&& move);
  /// What room_could_come() may do with the block in a used slot.
  enum class slot_fate : std::uint8_t {
    stays,  ///< nothing frees its slot
    leaves, ///< it can go (evicted, demoted): its slot frees in place
    moves,  ///< it stays cached, but compaction can move it: it needs a
            ///< free slot of its class in another slab
  };
  /// True when a slab is free; when some slab could be emptied: no used
  /// slot's owner `stays` (fate(owner)), and either none `moves` or the
  /// slab has a slot free or freeing and its class a slab's worth of slots
  /// free or freeing (owners that `leave`), as compaction needs to drain a
  /// slab (reclaimable_slab());
  /// or when a used slot of class `cls` has an owner that satisfies
  /// `slot_goes(owner)`, so a slot of that class could come free (a slot
  /// with no owner yet never goes). Walks every slab and its slots.
  template <class Fate, class SlotGoes>
  [[nodiscard]] bool room_could_come(std::uint16_t cls, Fate&& fate,
                                     SlotGoes&& slot_goes) const;

  [[nodiscard]] std::size_t offset(slot_ref slot) const noexcept {
    return std::size_t{slot.slab} * slab_bytes_ +
           std::size_t{slot.index} * classes_[slot.size_class].slot_bytes;
  }
  [[nodiscard]] std::size_t slot_bytes(std::uint16_t cls) const noexcept {
    return classes_[cls].slot_bytes;
  }
  /// True when allocate(cls) would succeed now.
  [[nodiscard]] bool can_allocate(std::uint16_t cls) const noexcept;
  /// True when a slab of size class `cls` has a free slot (allocate(cls)
  /// takes no free slab).
  [[nodiscard]] bool has_room_in_slabs(std::uint16_t cls) const noexcept {
    return cls < classes_.size() && classes_[cls].with_room != none;
  }
  /// True when `r` is the only allocated slot of its slab (freeing it
  /// frees the slab).
  [[nodiscard]] bool alone_in_slab(const slot_ref& r) const noexcept {
    return r.slab < slabs_.size() && slabs_[r.slab].used == 1;
  }

  [[nodiscard]] std::size_t capacity_bytes() const noexcept {
    return std::size_t{slab_count()} * slab_bytes_;
  }
  [[nodiscard]] std::size_t slab_bytes() const noexcept { return slab_bytes_; }
  [[nodiscard]] std::uint32_t slab_count() const noexcept {
    return static_cast<std::uint32_t>(slabs_.size());
  }
  [[nodiscard]] std::uint32_t free_slab_count() const noexcept {
    return static_cast<std::uint32_t>(free_slabs_.size());
  }
  /// Bytes of allocated slots (what blocks occupy, slot rounding included).
  [[nodiscard]] std::size_t used_bytes() const noexcept { return used_bytes_; }
  [[nodiscard]] std::size_t class_count() const noexcept {
    return classes_.size();
  }
  /// Smallest slot size of any class (0 when there is none).
  [[nodiscard]] std::size_t smallest_slot_bytes() const noexcept;

  /// Aborts when the bookkeeping is inconsistent.
  void check_invariants() const;

private:
  static constexpr std::uint32_t none = slot_ref::npos;
  static constexpr std::uint16_t no_class =
      std::numeric_limits<std::uint16_t>::max();

  struct slab_state {
    std::uint16_t size_class = no_class;
    std::uint32_t used = 0;     // allocated slots
    std::uint32_t bumped = 0;   // slots ever handed out since assignment
    std::uint32_t capacity = 0; // slots in this slab for its class
    std::vector<std::uint32_t> free_slots; // freed indexes below `bumped`
    std::vector<std::uint32_t> owners;     // per slot; vacant when free
    std::uint32_t prev = none; // in its class's list of slabs with room
    std::uint32_t next = none;
    bool listed = false;
  };
  struct class_state {
    std::size_t slot_bytes = 0;
    std::uint32_t with_room = none; // head of slabs that have a free slot
  };

  static constexpr std::uint32_t vacant = slot_ref::npos;

  block_pool(std::size_t slab_bytes, std::uint32_t slabs);
  /// Takes a free slot of slab `s`. REQUIRES: `s` has one.
  slot_ref take(std::uint32_t s) noexcept;
  /// Free slots in the slabs of class `cls` (walks them).
  [[nodiscard]] std::size_t free_slots_of(std::uint16_t cls) const noexcept;
  void link(std::uint32_t slab);
  void unlink(std::uint32_t slab);

  std::size_t slab_bytes_;
  std::vector<slab_state> slabs_;
  std::vector<std::uint32_t> free_slabs_;
  std::vector<class_state> classes_;
  std::size_t used_bytes_ = 0;
};

template <class Movable>
std::uint32_t block_pool::reclaimable_slab(std::uint16_t except,
                                           Movable&& movable) const {
  std::uint32_t best = none;
  for (std::uint16_t cls = 0; cls < classes_.size(); ++cls) {
    const std::uint32_t head = classes_[cls].with_room;
    // The other slabs' free slots hold slab s's used ones iff the class's
    // free slots are at least a slab's worth: free - (capacity - used) >=
    // used.
    if (cls == except || head == none ||
        free_slots_of(cls) < slabs_[head].capacity)
      continue;
    for (std::uint32_t s = head; s != none; s = slabs_[s].next) {
      const slab_state& slab = slabs_[s];
      if (best != none && slab.used >= slabs_[best].used)
        continue;
      bool all = true;
      for (std::uint32_t i = 0; i < slab.bumped && all; ++i)
        all = slab.owners[i] == vacant ||
              (slab.owners[i] != no_owner && movable(slab.owners[i]));
      if (all)
        best = s;
    }
  }
  return best;
}

template <class Fate, class SlotGoes>
bool block_pool::room_could_come(std::uint16_t cls, Fate&& fate,
                                 SlotGoes&& slot_goes) const {
  if (!free_slabs_.empty())
    return true;
  // Per class, the slots free or freeing (an owner that leaves): a slab
  // whose blocks must move drains only when they make a slab's worth, as
  // compaction asks. Before, a slab of movable blocks (pinned ones too)
  // counted as one that could empty however full its class was, and a put
  // that could never get a slot evicted blocks before it failed.
  std::vector<std::size_t> room(classes_.size(), 0);
  // Per slab: whether it could empty with no move, with moves, or not.
  enum class drains : std::uint8_t { alone, with_moves, never };
  std::vector<drains> slab_drains(slabs_.size(), drains::never);
  for (std::size_t s = 0; s < slabs_.size(); ++s) {
    const slab_state& slab = slabs_[s];
    if (slab.size_class == no_class)
      continue;
    room[slab.size_class] += slab.capacity - slab.used;
    drains d = drains::alone;
    bool frees_one = slab.used < slab.capacity; // a slot free or freeing
    for (std::uint32_t i = 0; i < slab.bumped; ++i) {
      const std::uint32_t o = slab.owners[i];
      if (o == vacant)
        continue;
      if (o == no_owner) {
        d = drains::never;
        continue;
      }
      if (slab.size_class == cls && slot_goes(o))
        return true;
      switch (fate(o)) {
      case slot_fate::stays:
        d = drains::never;
        break;
      case slot_fate::leaves:
        ++room[slab.size_class];
        frees_one = true;
        break;
      case slot_fate::moves:
        if (d == drains::alone)
          d = drains::with_moves;
        break;
      }
    }
    // Compaction drains only a slab with a free slot (reclaimable_slab()
    // walks its class's slabs with room): a full slab of blocks that can
    // only move never drains.
    if (d == drains::with_moves && !frees_one)
      d = drains::never;
    slab_drains[s] = d;
  }
  for (std::size_t s = 0; s < slabs_.size(); ++s) {
    if (slab_drains[s] == drains::alone)
      return true;
    if (slab_drains[s] == drains::with_moves &&
        room[slabs_[s].size_class] >= slabs_[s].capacity)
      return true;
  }
  return false;
}

template <class Move>
bool block_pool::drain_slab(std::uint32_t s, Move&& move) {
  slab_state& slab = slabs_[s];
  const std::uint16_t cls = slab.size_class;
  // Off its class's list, so that no slot of it is a destination.
  unlink(s);
  for (std::uint32_t i = 0; i < slab.bumped && slab.used > 0; ++i) {
    if (slab.owners[i] == vacant)
      continue;
    const std::uint32_t dest = classes_[cls].with_room;
    if (dest == none)
      break;
    const slot_ref from{s, i, cls};
    const slot_ref to = take(dest);
    set_owner(to, slab.owners[i]);
    if (!move(from, to)) {
      free(to);
      break;
    }
    free(from);
  }
  if (slab.size_class == no_class)
    return true; // the last free() handed it back
  link(s);
  return false;
}

} // namespace kvfleet::engine
