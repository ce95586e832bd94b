#pragma once
/// Eviction policies.
///
/// A policy ranks the *evictable* blocks of one size partition and names the
/// one to evict next. The store decides what is evictable (committed, a leaf
/// of its prefix chain, unpinned, unleased: see block_store.hpp) and tells
/// the policy about every access, so a policy sees the full access history
/// of a block even while it is not evictable (e.g. a parent in a chain).
///
/// A policy also keeps its order per request priority (the priority of a
/// block's last access, access_info::prio): victim(p) names the next block
/// of priority p in the policy's order, without a walk, so the store can go
/// lowest priority first whatever the policy (evict_bytes(),
/// demote_to_tier()). victim() names the next of all priorities, as if
/// they were one order (the store's make-room path on a put).
///
/// Policies:
///   lru       least recently used first
///   lfu       fewest accesses first, ties least recent first
///   priority  lowest request priority first (a block has the highest
///             priority of the requests that put or used it), then least
///             recent
///   adaptive  the store's default: a decayed frequency-recency score (LRFU)
///             with a reuse prior learned per prefix-tree parent; its
///             half-life (short: recency, long: frequency) is chosen online
///             by two shadow caches on a sample of the keys, see
///             eviction_policy.cpp
///   belady    offline, for research: the block whose next use is farthest
///             (within the partition the store picks, so not an exact
///             optimum where chains cross partitions); needs a next-use
///             oracle (block_store config)
/// Not thread-safe: owned by one store.

#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string_view>

namespace kvfleet::engine {

/// Request priorities, lowest first. Used by eviction and by every queue.
enum class priority : std::uint8_t {
  background = 0,
  low = 1,
  normal = 2,
  high = 3,
  critical = 4,
};
inline constexpr std::size_t priority_count = 5;
[[nodiscard]] std::string_view to_string(priority p) noexcept;
/// errc::invalid_argument for a value outside the five (a cast from a
/// number), which would rank above critical; every put checks it.
[[nodiscard]] result<void> check_priority(priority p);
[[nodiscard]] result<priority> parse_priority(std::string_view name);

enum class policy_kind : std::uint8_t { lru, lfu, priority, adaptive, belady };
[[nodiscard]] std::string_view to_string(policy_kind k) noexcept;
/// Accepts "lru", "lfu", "priority", "adaptive", "belady".
[[nodiscard]] result<policy_kind> parse_policy(std::string_view name);

inline constexpr std::uint32_t npos_id =
    std::numeric_limits<std::uint32_t>::max();

/// What a policy learns at each access.
struct access_info {
  std::uint64_t tick = 0;  ///< store-wide logical access counter
  std::uint32_t count = 0; ///< accesses of this block so far (>= 1)
  priority prio = priority::normal;
  /// Tick of the block's next use (belady only); max() when never again.
  std::uint64_t next_use = std::numeric_limits<std::uint64_t>::max();
  std::size_t resident_blocks = 0; ///< blocks cached store-wide right now
  /// On insert: the id of the block's parent in its prefix chain (npos for
  /// the first block of a chain). The parent outlives the child.
  std::uint32_t parent = npos_id;
  /// A uniform hash of the block's key, the same for every access of the
  /// same key (adaptive: samples keys for its shadow caches).
  std::uint64_t key_hash = 0;
};

class eviction_policy {
public:
  static constexpr std::uint32_t npos =
      std::numeric_limits<std::uint32_t>::max();

  virtual ~eviction_policy() = default;
  [[nodiscard]] virtual policy_kind kind() const noexcept = 0;
  /// Sizes per-id storage for ids below `ids`; the order of the
  /// evictable blocks gets room for all of them at normal priority only
  /// (the other priorities' grow as they fill).
  virtual void reserve(std::size_t ids) = 0;
  /// Block `id` was inserted (`inserted`) or hit.
  virtual void on_access(std::uint32_t id, const access_info& info,
                         bool inserted) = 0;
  /// Block `id` became evictable or stopped being so.
  virtual void set_evictable(std::uint32_t id, bool evictable) = 0;
  /// Block `id` left the cache. Every partition's policy hears it, also
  /// those that never held the block: a block's children may be in
  /// another partition (a longer request extended its chain), and their
  /// policy may keep per-parent state (access_info::parent) under its id.
  virtual void on_remove(std::uint32_t id) = 0;
  /// The evictable block to evict next, or npos when none is.
  [[nodiscard]] virtual std::uint32_t victim() const = 0;
  /// The evictable block of priority `p` to evict next, or npos when none
  /// is: the first of victim()'s order that has priority `p`.
  [[nodiscard]] virtual std::uint32_t victim(priority p) const = 0;
  [[nodiscard]] virtual std::size_t evictable_count() const noexcept = 0;
  [[nodiscard]] virtual std::size_t
  evictable_count(priority p) const noexcept = 0;
  virtual void check_invariants() const = 0;
  /// How many times the policy has retaken every block's score at once (an
  /// O(blocks) pass inside one access; adaptive only, 0 for the others).
  [[nodiscard]] virtual std::uint64_t full_rescores() const noexcept {
    return 0;
  }
};

[[nodiscard]] std::unique_ptr<eviction_policy> make_policy(policy_kind kind);

} // namespace kvfleet::engine
