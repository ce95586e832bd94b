#pragma once
/// Routing decisions of the load balancer, without CAF (the balancer actor
/// is a thin wrapper; kvfleet-bench's routing mode drives this directly).
///
/// Policies:
///   round_robin   next live engine in turn;
///   least_loaded  lowest in_flight / weight (the base policy; ties: lowest
///                 slot);
///   kv_aware      lowest  in_flight / weight - credit, where credit =
///                 credit_per_block x (leading blocks of the request the
///                 engine holds, per the prefix index), at most max_credit.
///                 When an engine's backlog (in_flight) exceeds what it
///                 would hold at the least loaded live engine's load
///                 (that engine's in_flight / weight, times this one's
///                 weight) by more than `backlog_margin`, its credit is
///                 multiplied by `overload_credit_factor`, so a hot prefix
///                 cannot pile every request onto one engine. (Equal
///                 weights: more than `backlog_margin` requests above the
///                 least loaded engine's. Before, raw counts were compared
///                 whatever the weights, so an engine of weight 8 with 9
///                 requests lost its credit next to one of weight 1 with
///                 1, at nearly the same load.)
///                 Ties: the engine holding more of the request's prefix,
///                 then the one holding fewer index keys per weight (a new
///                 prefix goes where there is room), then the first from a
///                 start that moves on past each pick (idle engines take
///                 turns; before, every tie went to the lowest slot).
///
/// The prefix index maps block keys to the set of engines that reported
/// storing them (block events); it may be stale. A stale entry only makes a
/// request go where its blocks no longer are: the engine then computes them
/// (a miss), never returns a wrong block, because engines look blocks up by
/// key themselves.
///
/// The index holds at most router_config::max_index_keys keys. When it is
/// full, a newly stored key replaces the least recently used one. A key is
/// used when stored() is told of it (an engine's report, or the balancer
/// indexing a reply) and when a kv_aware pick() finds
/// it held by a live engine in the request's matched prefix; the keys one
/// call uses become the most recent in their order, so a prefix's leading
/// blocks outlast its later ones. One stored() call with more new keys
/// than the index can take keeps its leading ones: once the least recently
/// used entry is one of that call's own keys, its later keys are not
/// indexed (before, each replaced the call's key just used, so a prefix
/// kept its first block and its last ones, which no request reaches past
/// the hole). Each operation costs O(1) per key; a full index reuses the
/// replaced entry's memory, and pick() allocates nothing.
///
/// Slots are engine positions; a slot is live or down, and a draining slot
/// takes no new requests. A removed slot is free for add_slot to reuse. Not
/// thread-safe: owned by one actor.

#include "engine/block_key.hpp"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine/result.hpp"

namespace kvfleet::actors {

enum class routing_policy : std::uint8_t {
  round_robin,
  least_loaded,
  kv_aware
};
[[nodiscard]] std::string_view to_string(routing_policy p) noexcept;
/// Accepts "round_robin", "least_loaded", "kv_aware".
[[nodiscard]] result<routing_policy> parse_routing_policy(std::string_view s);

struct router_config {
  routing_policy policy = routing_policy::least_loaded;
  double credit_per_block = 0.25; ///< load units per held prefix block
  double max_credit = 4.0;        ///< cap on the credit
  /// Requests above the least loaded engine's load (scaled to the
  /// engine's weight) before the credit shrinks.
  std::uint32_t backlog_margin = 4;
  double overload_credit_factor = 0.0;
  std::size_t max_index_keys = 1 << 20; ///< index entries kept (>= 1)
};

/// errc::invalid_argument naming the option when `c` breaks an invariant:
/// credit_per_block or max_credit negative or not finite (a NaN score
/// ranks no engine, a negative credit steers requests away from their
/// prefix), overload_credit_factor outside [0, 1], max_index_keys 0.
[[nodiscard]] result<void> validate(const router_config& c);

/// One routing decision, for tests and the bench.
struct route {
  std::uint32_t slot = 0;
  std::size_t expected_hit_blocks = 0; ///< per the (possibly stale) index
};

class router {
public:
  /// At most 64 slots (the index keeps a 64-bit engine set per key).
  static constexpr std::size_t max_slots = 64;

  /// A router for `config`. Errors: validate(config)'s (errc::invalid_argument
  /// naming the option), so a configuration from outside never aborts.
  [[nodiscard]] static result<router> create(router_config config);
  /// A router with the default configuration, which is valid.
  router() : router(router_config{}) {}
  /// Move-only: each index entry points into the use order it was made
  /// with (a move keeps those, a copy would not).
  router(router&&) noexcept = default;
  router& operator=(router&&) noexcept = default;
  router(const router&) = delete;
  router& operator=(const router&) = delete;

  /// Adds a live slot of capacity `weight` and returns its number: the
  /// lowest removed slot when there is one, else a new one. Errors:
  /// errc::invalid_argument for a weight that is not finite and > 0
  /// (before, taken as 1), errc::unavailable when all max_slots are in use.
  /// With `reuse` false, always a new slot (the balancer's initial
  /// engines: each gets its own slot, even when an earlier one was given
  /// up already).
  result<std::uint32_t> add_slot(double weight = 1.0, bool reuse = true);
  /// Takes `slot` as a live slot of capacity `weight`: a removed slot, or
  /// a new one when `slot` is slot_count() (the balancer chooses which
  /// free slot a replica gets). Errors: errc::invalid_argument for a bad
  /// weight or a slot that is neither, errc::unavailable for a new slot
  /// when all max_slots are in use.
  result<std::uint32_t> take_slot(std::uint32_t slot, double weight = 1.0);
  /// Whether `slot` is removed: free for add_slot or take_slot.
  [[nodiscard]] bool is_removed(std::uint32_t slot) const {
    return slots_.at(slot).removed;
  }
  /// The slot's engine is gone for good (retired): the slot takes no
  /// requests, its index entries and load are forgotten, and add_slot may
  /// hand it out again. Its number stays (slot_count() does not shrink).
  void remove_slot(std::uint32_t slot);
  [[nodiscard]] std::size_t slot_count() const noexcept {
    return slots_.size();
  }

  /// Marks a slot down (routed around) or up. Going down or coming back
  /// empty forgets what the index says it holds.
  void set_up(std::uint32_t slot, bool up);
  void set_draining(std::uint32_t slot, bool draining);
  /// errc::invalid_argument, the weight unchanged, for a weight that is
  /// not finite and > 0 (before, ignored without a word).
  result<void> set_weight(std::uint32_t slot, double weight);
  [[nodiscard]] bool is_up(std::uint32_t slot) const {
    return slots_.at(slot).up;
  }
  [[nodiscard]] bool is_draining(std::uint32_t slot) const {
    return slots_.at(slot).draining;
  }
  [[nodiscard]] double weight(std::uint32_t slot) const {
    return slots_.at(slot).weight;
  }
  [[nodiscard]] std::uint32_t in_flight(std::uint32_t slot) const {
    return slots_.at(slot).in_flight;
  }
  [[nodiscard]] std::size_t live_slots() const noexcept;

  /// Picks a live, non-draining slot for a request with these keys;
  /// nullopt when none is live. Does not count the request as in flight.
  [[nodiscard]] std::optional<route>
  pick(std::span<const engine::block_key> keys);
  /// Request dispatched to / finished at `slot`.
  void started(std::uint32_t slot);
  void finished(std::uint32_t slot);

  /// Block events of `slot`.
  void stored(std::uint32_t slot, std::span<const engine::block_key> keys);
  void evicted(std::uint32_t slot, std::span<const engine::block_key> keys);
  /// Every key the index says `slot` holds, in no particular order (a walk
  /// over the whole index).
  [[nodiscard]] std::vector<engine::block_key>
  keys_of(std::uint32_t slot) const;
  /// Leading blocks of `keys` the index says `slot` holds.
  [[nodiscard]] std::size_t
  held_prefix(std::uint32_t slot,
              std::span<const engine::block_key> keys) const;
  /// How many index keys name `slot` (0 for a slot that does not exist).
  [[nodiscard]] std::size_t keys_held(std::uint32_t slot) const noexcept {
    return slot < slots_.size() ? slots_[slot].keys : 0;
  }
  [[nodiscard]] std::size_t index_size() const noexcept {
    return index_.size();
  }
  [[nodiscard]] const router_config& config() const noexcept { return config_; }

private:
  /// REQUIRES: validate(config) succeeds; else a bug in this class (create
  /// checks first), logged before aborting.
  explicit router(router_config config);

  struct slot_state {
    double weight = 1.0;
    std::uint32_t in_flight = 0;
    bool up = true;
    bool draining = false;
    bool removed = false;
    /// Index keys whose entry names this slot: forget() and keys_of() walk
    /// the whole index only for a slot that holds some (an engine going up
    /// or down, a fresh replica, holds none after its first forget).
    std::size_t keys = 0;
  };
  [[nodiscard]] bool eligible(const slot_state& s) const noexcept {
    return s.up && !s.draining;
  }
  void forget(std::uint32_t slot);
  /// Takes the slots in `bits` off their key counts (an entry that goes).
  void uncount(std::uint64_t bits) noexcept;

  /// The use order is a list threaded through the index's own entries
  /// (map nodes keep their address while the key is indexed, extract and
  /// insert included), so it costs two pointers per key, no node of its
  /// own.
  struct index_entry;
  using index_node = std::pair<const engine::block_key, index_entry>;
  struct index_entry {
    std::uint64_t engines = 0;   ///< bit s: slot s holds the block
    index_node* newer = nullptr; ///< next more recently used; null: newest
    index_node* older = nullptr; ///< next less recently used; null: oldest
  };
  using index_map = std::unordered_map<engine::block_key, index_entry,
                                       engine::block_key_hash>;
  /// Ends of the use order. Moving it empties the source, as moving the
  /// map does, so a moved-from router is an empty one.
  struct use_ends {
    index_node* newest = nullptr;
    index_node* oldest = nullptr;
    use_ends() = default;
    use_ends(use_ends&& o) noexcept
        : newest(std::exchange(o.newest, nullptr)),
          oldest(std::exchange(o.oldest, nullptr)) {}
    use_ends& operator=(use_ends&& o) noexcept {
      newest = std::exchange(o.newest, nullptr);
      oldest = std::exchange(o.oldest, nullptr);
      return *this;
    }
  };
  /// Puts `n` (unlinked) just newer than `pos`; null: at the oldest end.
  void link_before(index_node& n, index_node* pos);
  void unlink(index_node& n);
  /// Moves `n` to just newer than `front_end`, the end of the keys this
  /// call used so far (the newest at its start), and keeps `front_end`
  /// older than it, so a call's keys keep their order.
  void mark_used(index_node& n, index_node*& front_end);
  /// `k`'s entry, added (with no engines) and marked used when missing,
  /// replacing the least recently used entry when the index is full;
  /// null, `k` not indexed, when that entry is one this call used (the
  /// call has more keys than the index holds).
  index_node* find_or_add(const engine::block_key& k, index_node*& front_end);
  void erase(index_map::iterator it);

  router_config config_;
  std::vector<slot_state> slots_;
  index_map index_;
  use_ends use_;
  std::uint32_t next_rr_ = 0;
  /// Where kv_aware's pick() starts among equal scores.
  std::uint32_t next_tie_ = 0;
  std::vector<std::size_t> held_scratch_;
};

} // namespace kvfleet::actors
