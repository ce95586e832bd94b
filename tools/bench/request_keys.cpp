#include "tools/bench/request_keys.hpp"

#include "engine/stop_poll.hpp"

#include <algorithm>
#include <string>

namespace kvfleet::bench {

result<request_keys>
make_request_keys(std::span<const engine::workload_request> reqs,
                  const engine::ns_fingerprint& ns, std::uint32_t block_tokens,
                  const std::function<bool()>& stop) {
  request_keys out;
  std::size_t total = 0;
  for (const auto& r : reqs)
    total +=
        std::min<std::size_t>(r.input_length / block_tokens, r.hash_ids.size());
  out.keys.reserve(total);
  out.offsets.reserve(reqs.size() + 1);
  out.input_tokens.reserve(reqs.size());
  engine::stop_poll poll{stop};
  for (std::size_t q = 0; q < reqs.size(); ++q) {
    const auto& r = reqs[q];
    const std::size_t full =
        std::min<std::size_t>(r.input_length / block_tokens, r.hash_ids.size());
    engine::block_key parent{};
    for (std::size_t i = 0; i < full; ++i) {
      if (poll.stopped(out.keys.size()))
        return make_error(errc::unavailable,
                          "stopped after " + std::to_string(q) + " of " +
                              std::to_string(reqs.size()) + " requests");
      parent = engine::chain_key_from_id(parent, ns, r.hash_ids[i]);
      out.keys.push_back(parent);
    }
    out.offsets.push_back(out.keys.size());
    out.input_tokens.push_back(r.input_length);
  }
  return out;
}

request_keys make_request_keys(std::span<const engine::workload_request> reqs,
                               const engine::ns_fingerprint& ns,
                               std::uint32_t block_tokens) {
  return *make_request_keys(reqs, ns, block_tokens, {});
}

} // namespace kvfleet::bench
