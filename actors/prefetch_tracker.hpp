#pragma once
/// The prefetches the prefetch actor has issued and not yet seen resolved,
/// without CAF.
///
/// A prefetch of a query is outstanding until its request was answered and
/// the query requested, in either order (useful), an engine reports one of
/// its blocks evicted first (wasted), or the prefetch request itself failed
/// (failed: neither, also when the query was requested before that answer,
/// since nothing was prefetched for it).
/// Prefetches may share blocks (queries with a common prefix): an evicted
/// shared block wastes every outstanding prefetch that holds it, and
/// resolving one of them leaves the others' blocks tracked. At most
/// `max_outstanding` (at least 1) are tracked: tracking one more forgets
/// the oldest outstanding one. Memory is bounded by the outstanding
/// prefetches alone (one index entry per block of each): a resolved
/// prefetch leaves nothing behind. Not thread-safe: owned by one actor.
/// Move-only: each entry points into the age order it was made with.

#include "engine/block_key.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <list>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace kvfleet::actors {

class prefetch_tracker {
public:
  /// A tracker of at most `max_outstanding` prefetches. Errors:
  /// errc::invalid_argument for 0 (it could track nothing), never silently
  /// taken as 1.
  [[nodiscard]] static result<prefetch_tracker>
  create(std::size_t max_outstanding);

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
  /// already (contains(query)); the tracker is then unchanged, the earlier
  /// prefetch keeping its keys, its id and its age.
  [[nodiscard]] result<void> add(const std::string& query,
                                 const std::vector<engine::block_key>& keys,
                                 std::uint64_t id = 0);
  /// `query` was requested: true when its outstanding prefetch was
  /// answered already (useful), which is then resolved. One not answered
  /// yet is marked used and stays outstanding until its answer: answered()
  /// then finds it useful, failed() failed.
  bool used(const std::string& query);
  /// The prefetch request `id` of `query` succeeded: true when the query
  /// was requested meanwhile (useful), which is then resolved; else it
  /// stays outstanding, answered, until used, wasted or forgotten. False,
  /// changing nothing else, when that prefetch was resolved already or a
  /// later prefetch of `query` (another id) is the outstanding one.
  bool answered(const std::string& query, std::uint64_t id);
  /// The prefetch request `id` of `query` failed (nothing was prefetched):
  /// true when it was still outstanding (its query requested or not),
  /// which is then resolved, as neither useful nor wasted. False, changing
  /// nothing, when that prefetch was resolved already or a later prefetch
  /// of `query` (another id) is the outstanding one.
  bool failed(const std::string& query, std::uint64_t id);
  /// A block was evicted: the queries whose outstanding prefetches held it
  /// (each wasted, now resolved), in no particular order; empty when none.
  std::vector<std::string> evicted(const engine::block_key& key);

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

private:
  /// REQUIRES: max_outstanding >= 1; else a bug in this class (create
  /// checks first), logged before aborting.
  explicit prefetch_tracker(std::size_t max_outstanding);

  struct entry {
    std::vector<engine::block_key> keys;
    std::uint64_t id = 0;                 ///< the prefetch request's
    std::list<std::string>::iterator age; ///< in order_
    bool answered = false;                ///< its request succeeded
    bool used = false; ///< its query was requested before that
  };
  void drop(const std::string& query);

  std::size_t max_outstanding_;
  std::unordered_map<std::string, entry> outstanding_;
  std::list<std::string> order_; ///< front = oldest outstanding
  /// A block key -> every outstanding query whose prefetch holds it (a
  /// shared prefix block belongs to several).
  std::unordered_map<engine::block_key, std::unordered_set<std::string>,
                     engine::block_key_hash>
      by_key_;
};

} // namespace kvfleet::actors
