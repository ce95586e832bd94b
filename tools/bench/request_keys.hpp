#pragma once
/// A request sequence turned into chained block keys, computed once and
/// replayed for every policy.
///
/// Request r's keys are keys[offsets[r] .. offsets[r + 1]): one per FULL
/// block of its prompt, key_i = chain_key_from_id(key_{i-1}, namespace,
/// hash_ids[i]) with key_{-1} null, for i < min(input_length / block_tokens,
/// hash_ids.size()). A position in `keys` is an "access position": the
/// logical time of one block access in the replay.
/// Thread safety: a plain value.

#include "engine/block_key.hpp"
#include "engine/kv_namespace.hpp"
#include "engine/result.hpp"
#include "engine/workload.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

namespace kvfleet::bench {

struct request_keys {
  std::vector<engine::block_key> keys;
  std::vector<std::size_t> offsets{0}; ///< size() == requests + 1
  std::vector<std::uint32_t> input_tokens;

  [[nodiscard]] std::size_t size() const noexcept {
    return input_tokens.size();
  }
  /// Keys of request `r`. REQUIRES: r < size().
  [[nodiscard]] std::span<const engine::block_key> of(std::size_t r) const {
    return std::span<const engine::block_key>(keys).subspan(
        offsets[r], offsets[r + 1] - offsets[r]);
  }
};

/// Keys of every request of `reqs` in namespace `ns` with `block_tokens`
/// tokens per block. REQUIRES: block_tokens > 0.
[[nodiscard]] request_keys
make_request_keys(std::span<const engine::workload_request> reqs,
                  const engine::ns_fingerprint& ns, std::uint32_t block_tokens);

/// make_request_keys that can be stopped: `stop` (may be empty) is asked
/// before the first key and then every 4,096 keys (one hash each); true
/// stops with errc::unavailable ("stopped after N of M requests").
[[nodiscard]] result<request_keys>
make_request_keys(std::span<const engine::workload_request> reqs,
                  const engine::ns_fingerprint& ns, std::uint32_t block_tokens,
                  const std::function<bool()>& stop);

} // namespace kvfleet::bench
