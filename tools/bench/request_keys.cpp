#include "tools/bench/request_keys.hpp"

#include <algorithm>

namespace kvfleet::bench {

request_keys make_request_keys(std::span<const engine::workload_request> reqs,
                               const engine::ns_fingerprint& ns,
                               std::uint32_t block_tokens) {
  request_keys out;
  std::size_t total = 0;
  for (const auto& r : reqs)
    total +=
        std::min<std::size_t>(r.input_length / block_tokens, r.hash_ids.size());
  out.keys.reserve(total);
  out.offsets.reserve(reqs.size() + 1);
  out.input_tokens.reserve(reqs.size());
  for (const auto& r : reqs) {
    const std::size_t full =
        std::min<std::size_t>(r.input_length / block_tokens, r.hash_ids.size());
    engine::block_key parent{};
    for (std::size_t i = 0; i < full; ++i) {
      parent = engine::chain_key_from_id(parent, ns, r.hash_ids[i]);
      out.keys.push_back(parent);
    }
    out.offsets.push_back(out.keys.size());
    out.input_tokens.push_back(r.input_length);
  }
  return out;
}

} // namespace kvfleet::bench
