#pragma once
/// block_store's entry and namespace records, shared by its source files
/// (block_store.cpp, block_store_tier.cpp). Not part of the API.

#include "engine/block_store.hpp"

#include <array>
#include <cstdint>

namespace kvfleet::engine {

enum class entry_state : std::uint8_t { free, reserved, written, committed };

/// Whether an expiry (steady nanoseconds, 0 = never) has come by `t`.
[[nodiscard]] constexpr bool expired_by(std::int64_t expires_at,
                                        std::int64_t t) noexcept {
  return expires_at != 0 && expires_at <= t;
}

struct block_store::entry {
  block_key key{};
  std::uint64_t checksum = 0;
  std::int64_t expires_at = 0; // steady nanoseconds; 0 = never
  slot_ref slot{};
  std::uint32_t parent = block_index::npos;
  std::uint32_t children = 0;
  std::uint32_t departing = 0; // children being demoted to the memory tier
  std::uint32_t leases = 0;
  std::uint32_t pins = 0;
  /// Children that are pinned or chained to by a pinned block: while any
  /// is, this block stays in memory for them (leaf-first eviction), held
  /// by pins (block_store::pin_held_bytes()).
  std::uint32_t held_children = 0;
  /// Duplicate puts of this committed block open now (reserve() until
  /// their commit or abort): a dead block with one is being put again, so
  /// a child may be reserved under it as under a reserved block.
  std::uint32_t open_duplicates = 0;
  std::uint32_t access_count = 0;
  std::uint32_t stored_bytes = 0;
  std::uint32_t generation = 0;
  std::uint32_t rprev = block_index::npos;
  std::uint32_t rnext = block_index::npos;
  std::uint16_t ns = 0;
  entry_state state = entry_state::free;
  codec c = codec::none;
  priority prio = priority::normal;
  size_partition part = size_partition::small;
  bool dead = false;
  bool corrupt = false; // failed its checksum; dead, kept only for a lease
  bool flagged_evictable = false;
  bool in_recency = false;
  bool pin_on_commit = false;
  /// Being brought back from the memory tier or disk, not put: its reserve,
  /// commit or abort is no put's (store_stats' put counters, put_ns).
  bool promotion = false;
  /// Brought back from disk alone: a root until a put names its parent
  /// (block_store::adopt()).
  bool parent_unknown = false;
  /// Dead and announced removed (block_event::removed) while something
  /// still held it (a pin, a lease, a cached child): its removal later
  /// says nothing more, and a put that brings it back announces it stored.
  bool announced_gone = false;
};

struct block_store::ns_state {
  namespace_spec spec;
  namespace_options options;
  ns_fingerprint fingerprint;
  std::array<std::uint16_t, codec_count> size_class{};
};

} // namespace kvfleet::engine
