#pragma once
/// The query-result cache: get-or-compute by query key in front of the
/// balancer's process.
///
///   (query_atom, kv_request) -> kv_reply
/// A hit answers from the store (from_query_cache set). A miss sends the
/// request to the balancer, stores the reply for `ttl` (default 3600 s)
/// and answers; concurrent misses of one key wait for the one computation.
/// A request without a query key is an errc::invalid_argument error.
///   (stats_atom) -> query_cache_stats
///
/// Store: embedded_query_store (in process, bounded) by default. Time is the
/// actor clock, so tests move it with the test coordinator. A Redis backend
/// is not built yet.

#include "actors/query_store.hpp"

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

namespace kvfleet::actors {

struct kv_reply;

struct query_cache_config {
  std::chrono::seconds ttl{3600};
  std::size_t max_entries = 100'000;
  std::chrono::milliseconds request_timeout{30'000};
};

[[nodiscard]] caf::actor spawn_query_cache(caf::actor_system& sys,
                                           query_cache_config config,
                                           caf::actor balancer);

/// Encoding of a reply in the store (also used by tests).
[[nodiscard]] std::string encode_reply(const kv_reply& r);
[[nodiscard]] bool decode_reply(const std::string& s, kv_reply& out);

} // namespace kvfleet::actors
