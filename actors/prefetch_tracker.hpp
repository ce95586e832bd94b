#pragma once
/// The prefetches the prefetch actor has issued and not yet seen resolved,
/// without CAF.
///
/// A prefetch is answered by the engine that carried it out (or, through a
/// query-result cache, from the cache's store: the caller then discards
/// it, since nothing was prefetched). Its query's next request settles it,
/// before or after that answer (the later of the two decides):
/// - useful when that request found the prefetched blocks: it was served
///   by the engine that answered the prefetch, every block the request
///   shares with the prefetch (their common leading keys) was among its
///   matched blocks, and they reach past the blocks the prefetch found in
///   memory already (at least one it computed or brought back; before, a
///   request sharing only blocks cached before the prefetch made it useful,
///   though the blocks it computed went unused); or it was answered from the
///   query-result cache and the prefetch's own answer went through that cache
///   (which stored it: the prefetch computed the result the request got);
/// - wasted otherwise: another engine served it, some shared block had to
///   be computed again, or the result cache answered a prefetch that only
///   stored blocks.
/// The answering engine reporting one of the blocks evicted settles it
/// early, wasted (not so for a prefetch kept in the result cache, which
/// answers its query without the blocks). Evictions by other engines, and
/// those reported before the answer (the prefetch may have stored the block
/// again since), change nothing: the request decides. An answer that is an
/// error, or discard(), resolves it as neither useful nor wasted.
/// Prefetches may share blocks (queries with a common prefix): an evicted
/// shared block wastes every outstanding prefetch that engine answered and
/// that holds it, and resolving one of them leaves the others' blocks
/// tracked. At most `max_outstanding` (at least 1) are tracked, holding at
/// most `max_keys` block keys in all: tracking one more forgets the oldest
/// outstanding ones until both hold (counted, forgotten()); a prefetch of
/// more keys than `max_keys` is refused. (Before, keys were bounded only by
/// the count: 10,000 prefetches sharing a 1,000-block prefix took 1.6 GB,
/// each index entry holding a copy of its query.) Memory
/// is bounded by the outstanding prefetches alone (one index entry per block of
/// each): a resolved prefetch leaves nothing behind. Not thread-safe: owned by
/// one actor. Move-only: each entry points into the age order it was made with.

#include "engine/block_key.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <list>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace kvfleet::actors {

class prefetch_tracker {
public:
  /// How a request was served (from its kv_reply).
  struct served {
    std::uint32_t engine = 0;         ///< slot of the engine that served it
    std::uint64_t matched_blocks = 0; ///< its leading blocks found cached
    /// Answered by a query-result cache: from its store, or with another
    /// request's reply there (kv_reply::joined).
    bool from_result_cache = false;
  };
  enum class outcome { none, pending, useful, wasted };

  /// A tracker of at most `max_outstanding` prefetches holding at most
  /// `max_keys` block keys. Errors: errc::invalid_argument for either 0 (it
  /// could track nothing), never silently taken as 1.
  [[nodiscard]] static result<prefetch_tracker>
  create(std::size_t max_outstanding, std::size_t max_keys = default_max_keys);
  /// About 256 bytes each in the index (a map node, a set and its node,
  /// measured): 64 MB.
  static constexpr std::size_t default_max_keys = 250'000;

  prefetch_tracker(prefetch_tracker&&) noexcept = default;
  prefetch_tracker& operator=(prefetch_tracker&&) noexcept = default;
  prefetch_tracker(const prefetch_tracker&) = delete;
  prefetch_tracker& operator=(const prefetch_tracker&) = delete;

  [[nodiscard]] bool contains(const std::string& query) const {
    return outstanding_.contains(query);
  }
  /// Tracks a prefetch of `query` over `keys`, sent as request `id`,
  /// forgetting the oldest outstanding prefetch first when full. Errors:
  /// errc::invalid_argument when a prefetch of `query` is outstanding
  /// already (contains(query)), or when `keys` are more than max_keys; the
  /// tracker is then unchanged, the earlier prefetch keeping its keys, its
  /// id and its age.
  [[nodiscard]] result<void> add(const std::string& query,
                                 const std::vector<engine::block_key>& keys,
                                 std::uint64_t id = 0);
  /// A request of `query` over `keys` was served as `how`: useful or wasted
  /// when the prefetch of `query` was answered already (then resolved);
  /// pending when it was not, the request's verdict kept until the answer
  /// (the first request counts, later ones change nothing); none when no
  /// prefetch of `query` is outstanding.
  outcome used(const std::string& query,
               std::span<const engine::block_key> keys, const served& how);
  /// The prefetch request `id` of `query` was answered by engine `engine`,
  /// which found its first `found` blocks in memory already, through a
  /// query-result cache that stores its answer when
  /// `in_result_cache`: useful or wasted when the query was requested
  /// meanwhile (then resolved), else pending (outstanding, answered, until
  /// its query is requested, its blocks evicted, or it is forgotten). None,
  /// changing nothing, when that prefetch was resolved already or a later
  /// prefetch of `query` (another id) is the outstanding one.
  outcome answered(const std::string& query, std::uint64_t id,
                   std::uint32_t engine, bool in_result_cache = false,
                   std::uint64_t found = 0);
  /// The prefetch request `id` of `query` prefetched nothing (its answer
  /// was an error, came from the result cache's store or from another
  /// request's computation there, or the engine computed no block): true
  /// when it was still outstanding (its query requested or not), which is
  /// then resolved, as neither useful nor wasted. False, changing nothing,
  /// when that prefetch was resolved already or a later prefetch of `query`
  /// (another id) is the outstanding one.
  bool discard(const std::string& query, std::uint64_t id);
  /// Engine `engine` evicted block `key`: the queries whose outstanding
  /// prefetches it answered and that hold the block (each wasted, now
  /// resolved), in no particular order; empty when none.
  std::vector<std::string> evicted(std::uint32_t engine,
                                   const engine::block_key& key);

  [[nodiscard]] std::size_t size() const noexcept {
    return outstanding_.size();
  }
  /// Entries of the age order (equal to size()).
  [[nodiscard]] std::size_t order_size() const noexcept {
    return order_.size();
  }
  /// Block keys indexed: those of the outstanding prefetches.
  [[nodiscard]] std::size_t index_size() const noexcept {
    return by_key_.size();
  }
  /// Block keys the outstanding prefetches hold (a key held by two counts
  /// twice): at most max_keys.
  [[nodiscard]] std::size_t keys_held() const noexcept { return keys_held_; }
  /// Outstanding prefetches add() forgot to make room (the oldest first),
  /// neither useful nor wasted as far as the tracker knows.
  [[nodiscard]] std::uint64_t forgotten() const noexcept { return forgotten_; }

private:
  /// REQUIRES: max_outstanding >= 1; else a bug in this class (create
  /// checks first), logged before aborting.
  prefetch_tracker(std::size_t max_outstanding, std::size_t max_keys);

  struct entry {
    std::vector<engine::block_key> keys;
    std::uint64_t id = 0;                 ///< the prefetch request's
    std::list<std::string>::iterator age; ///< in order_
    std::optional<std::uint32_t> engine;  ///< that answered it
    bool in_result_cache = false;         ///< its answer was stored there
    std::uint64_t found = 0; ///< its leading blocks already in memory
    /// Its query's first request before the answer: how it was served and
    /// how many leading blocks it shares with the prefetch.
    std::optional<served> use;
    std::size_t shared = 0;
    std::uint64_t serial = 0; ///< its name in by_key_
  };
  [[nodiscard]] static outcome verdict(const entry& e, const served& how,
                                       std::size_t shared);
  void drop(const std::string& query);

  std::size_t max_outstanding_;
  std::size_t max_keys_;
  std::size_t keys_held_ = 0;
  std::uint64_t forgotten_ = 0;
  std::uint64_t next_serial_ = 0;
  std::unordered_map<std::string, entry> outstanding_;
  std::list<std::string> order_; ///< front = oldest outstanding
  /// An entry's serial -> its query (the key of its node in outstanding_,
  /// which stays where it is until erased).
  std::unordered_map<std::uint64_t, const std::string*> query_of_;
  /// A block key -> the serials of every outstanding prefetch that holds it
  /// (a shared prefix block belongs to several).
  std::unordered_map<engine::block_key, std::unordered_set<std::uint64_t>,
                     engine::block_key_hash>
      by_key_;
};

} // namespace kvfleet::actors
