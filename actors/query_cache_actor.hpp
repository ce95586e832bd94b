#pragma once
/// The query-result cache: get-or-compute by query key in front of the
/// balancer's process.
///
///   (query_atom, kv_request) -> kv_reply
/// A hit answers from the store (from_query_cache set): the reply of the
/// request that computed it, whose `engine` (and block counts) say where
/// the blocks were then; the cache does not follow evictions, engine
/// restarts or retirements, so they may not be there now (with a shared
/// Redis, another node's engine computed it). A miss sends the
/// request to the balancer, stores the reply for `ttl` (default 3600 s)
/// and answers; concurrent misses of one key wait for the one computation,
/// and a request of a key whose miss is on its way joins it without reading
/// the store (with Redis, one GET saved per joining request). An entry may
/// be there meanwhile: another node sharing the Redis store, or a pinning
/// request of the key (below), may have stored one. The joiner then waits
/// for the miss's reply instead: the only cost is a missed hit, never a
/// wrong reply.
/// A miss that joins them with a higher priority than every request of that
/// key already sent goes to the balancer too, in its own priority (so a
/// critical caller never waits behind a low-priority request); the first
/// reply answers every waiter and a later one is ignored. Such a miss counts
/// as coalesced. When every request of a round has ended, the last by a
/// timeout, and those that timed out each ran to its caller's deadline
/// (kv_request::deadline_ns, passed by then), the waiters with a later
/// deadline still to come, or with none, get one more request, once per
/// waiter, in the highest priority among them (its session) and with the
/// latest of their deadlines (none if one has none); the others get the
/// timeout. (Before, a caller with no deadline that joined a request of a
/// 1 ns deadline got that request's timeout.) A request without a
/// deadline, or one the balancer timed out before its caller's deadline,
/// ended at the balancer's own request_timeout, as a waiter's own would:
/// that timeout answers every waiter. A waiter whose reply another
/// request computed gets it with kv_reply::joined set: one that sent nothing
/// itself, and one whose own request was answered later (a low-priority
/// prefetch overtaken by a high-priority user's request of its query prefetched
/// nothing). The waiters get an error only when every request sent for them
/// failed (the last error). The cache sets no CAF timeout of its own on these
/// requests: the balancer answers each one (balancer_actor.hpp), with
/// request_timeout after its `request_timeout`, so that is the deadline of a
/// miss. A request that pins its blocks (kv_request::pin, warming) is never
/// answered from the store nor by another request's reply (neither pinned
/// anything): it goes to the balancer on its own, counts as a miss, and its
/// reply is stored like any miss's.
/// A reply whose engine computed blocks it could not cache
/// (kv_reply::uncached_blocks) is delivered and not stored: a hit on it
/// would keep its query from the engines, which would then never cache
/// those blocks, for the whole TTL. A reply is stored after it is
/// delivered (with Redis, the SET does not hold the callers up).
/// The query key names a prompt: a stored reply answers only a request of
/// as many blocks and tokens as it covers (matched_blocks + computed_blocks,
/// matched_tokens + computed_tokens against input_tokens), and a request of
/// the key with another block or token count is a miss (its reply replaces
/// the entry); one that finds a miss of the key with another block or token
/// count on its way does not join it: answered from the store when it holds
/// a reply of its counts, else sent to the balancer on its own, as a
/// pinning request is. (Before, a request of the same blocks and another
/// token count, another partial last block, got the stored token counts,
/// which did not add up to its prompt.)
/// A request without a query key is an errc::invalid_argument error.
///   (stats_atom) -> query_cache_stats
///   (listen_atom, actor)   (no reply; once per listener, never the cache
///                          itself, until it goes: listeners.hpp) the
///                          listener gets (observe_atom, kv_request,
///                          kv_reply, int64 ns) for each request the cache
///                          answers without the balancer: a hit
///                          (from_query_cache), and a request that joined
///                          another's computation without going itself. The
///                          balancer reports the others to its own
///                          listeners, so a listener of both (the
///                          prefetcher) sees each request once.
///
/// Store: embedded_query_store (in process, bounded) by default; its time is
/// the actor clock, so tests move it with the test coordinator. With a
/// `redis_url`, a redis_query_store (redis_query_store.hpp), whose entries
/// expire on Redis's clock. A store that blocks on I/O (Redis) makes the
/// actor detached: it runs on its own thread, each Redis call bounded by the
/// store's command timeout (default 50 ms), so the scheduler's workers never
/// wait on Redis. A store error on get counts in `store_errors` and the
/// request is computed as on a miss, as is an entry that is not a reply
/// decode_reply can read (corrupt, or another program's under the prefix);
/// a store error on set counts there too and the reply is still delivered.

#include "actors/query_store.hpp"
#include "actors/redis_query_store.hpp"
#include "engine/result.hpp"

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

namespace kvfleet::actors {

struct kv_reply;

struct query_cache_config {
  std::chrono::seconds ttl{3600};
  std::size_t max_entries = 100'000;
  /// The embedded store's bound in bytes: keys, values and
  /// embedded_query_store::entry_overhead_bytes each (query keys may be
  /// whole prompts). An entry larger than it is not stored (counted in
  /// store_errors).
  std::size_t max_bytes = std::size_t{256} << 20;
  /// Empty: the embedded store (max_entries, max_bytes). Else
  /// redis://[[user]:password@]host[:port][/db] and the options below (their
  /// `url` is replaced by this one).
  std::string redis_url;
  redis_query_store_config redis{};
  /// Tokens per block of the engines behind the cache (kvfleet::node sets
  /// its namespace's). When set, a request whose key count is not
  /// input_tokens / block_tokens is refused (errc::misaligned_tokens)
  /// before it reads the store or joins another request of its key: a
  /// stored reply would answer it though the engine refuses it, and as the
  /// miss others joined, its refusal would fail them all. 0 checks nothing
  /// here (the engine still refuses such a request on a miss).
  std::uint32_t block_tokens = 0;
};

/// errc::invalid_argument naming the option when `config` breaks an
/// invariant: a ttl that is not positive (every set would fail) or is
/// above a year (its expiry would overflow the clock and lie in the past),
/// max_entries 0 with the embedded store (it would hold one entry), a
/// max_bytes below what an empty query's reply takes in it, or a
/// `redis.url` other than `redis_url` (the one that counts; a URL set only
/// in `redis.url` would leave the cache in process without a word).
[[nodiscard]] result<void> validate(const query_cache_config& config);

/// The store `config` selects. Errors: validate's, then those of
/// redis_query_store::open (bad URL, bad timeouts); connecting happens on
/// the first call.
[[nodiscard]] result<std::unique_ptr<query_store>>
make_query_store(const query_cache_config& config);

/// Spawns the cache with the store `config` selects. Errors:
/// make_query_store(config)'s (validate's, a bad redis_url); nothing is
/// spawned then.
[[nodiscard]] result<caf::actor> spawn_query_cache(caf::actor_system& sys,
                                                   query_cache_config config,
                                                   caf::actor balancer);
/// Spawns the cache over `store`, detached when it blocks. Errors:
/// validate(config)'s, and errc::invalid_argument for a null store; nothing
/// is spawned then (and `store` is dropped).
[[nodiscard]] result<caf::actor>
spawn_query_cache(caf::actor_system& sys, query_cache_config config,
                  caf::actor balancer, std::unique_ptr<query_store> store);

/// Encoding of a reply in the store (also used by tests): "v1" and the
/// engine, matched and computed blocks, matched and computed tokens, in
/// decimal, one space apart, whatever the global locale.
[[nodiscard]] std::string encode_reply(const kv_reply& r);
/// The longest encode_reply writes: "v1 ", a uint32 engine slot and four
/// uint64 counts, each after a space.
inline constexpr std::size_t max_encoded_reply_bytes = 3 + 10 + 4 * (1 + 20);
/// Reads what encode_reply wrote into `out` (id and from_query_cache
/// untouched); false, leaving `out` unchanged, for anything else: another
/// version, a sign, a number out of range, a missing or extra field, or
/// numbers no engine could have written (an engine slot at or above
/// router::max_slots, blocks or tokens that add up to more than a
/// request's uint32 input_tokens).
[[nodiscard]] bool decode_reply(const std::string& s, kv_reply& out);

} // namespace kvfleet::actors
