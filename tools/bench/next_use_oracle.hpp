#pragma once
/// The Belady next-use oracle for a replay (store_config::next_use).
///
/// The belady policy evicts the block whose next use is farthest in the
/// future. Every time the store records an access of a key (a hit, or the
/// commit of a newly computed block) it asks the oracle when that key will
/// be used next. The replay is a known sequence (request_keys), so the
/// answer is precomputed: for every access position, the position of the
/// same key's next access. The oracle answers with the key's first access
/// position in a request AFTER the current one, or max() when the key is
/// never used again. Positions order accesses in time, which is all the
/// policy compares.
///
/// Each key keeps a cursor into its chain of access positions; the cursor
/// only moves forward, so a whole replay costs O(accesses) after the
/// O(accesses) precomputation.
///
/// REQUIRES: begin_request is called with nondecreasing request indexes,
/// before the store processes that request. The oracle must outlive every
/// store that holds its function. Not thread-safe.

#include "engine/block_key.hpp"
#include "engine/result.hpp"
#include "tools/bench/request_keys.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <unordered_map>
#include <vector>

namespace kvfleet::bench {

class next_use_oracle {
public:
  static constexpr std::uint64_t never =
      std::numeric_limits<std::uint64_t>::max();

  /// Precomputes next uses. `keys` must outlive the oracle.
  explicit next_use_oracle(const request_keys& keys);

  /// Like the constructor, but `stop` (may be empty) is asked before the
  /// first access position and then every 4,096 (a hash-map operation
  /// each); true stops with errc::unavailable. Call as_function() only on
  /// the oracle where it will stay (as_function captures its address).
  [[nodiscard]] static result<next_use_oracle>
  build(const request_keys& keys, const std::function<bool()>& stop);

  /// The store is about to process request `r`.
  void begin_request(std::size_t r) noexcept;

  /// Access position of `key`'s next use after the current request, or
  /// `never`. Unknown keys are never used again.
  [[nodiscard]] std::uint64_t next_use(const engine::block_key& key);

  /// A function for store_config::next_use that calls this oracle.
  [[nodiscard]] std::function<std::uint64_t(const engine::block_key&)>
  as_function();

private:
  static constexpr std::uint64_t none = never;
  struct unfilled {};
  next_use_oracle(const request_keys& keys, unfilled) : keys_(&keys) {}
  /// Fills ids_, next_ and cursor_; false when `stop` said stop.
  bool precompute(const std::function<bool()>& stop);
  const request_keys* keys_;
  /// Key -> id (its cursor_ index). 64-bit: 32-bit ids wrapped past 2^32
  /// distinct keys and two keys shared a cursor (wrong next uses, no
  /// error); the map's entries are 24 bytes either way (16-byte key).
  std::unordered_map<engine::block_key, std::size_t, engine::block_key_hash>
      ids_;
  std::vector<std::uint64_t> next_;   ///< per access position
  std::vector<std::uint64_t> cursor_; ///< per key id: an access position
  std::uint64_t current_end_ = 0;     ///< first position after the request
};

} // namespace kvfleet::bench
