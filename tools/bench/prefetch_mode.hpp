#pragma once
/// `kvfleet-bench prefetch`: predictive prefetch on the chat workload,
/// measured on one in-process block store with the shipped transition
/// model (actors::transition_model).
///
/// What a query is for chat: every chat session's next round extends the
/// current prompt (prompt + reply + new turn), so the useful question is
/// not "which other prompt follows" (each prompt is unique and never recurs)
/// but "does this session come back for another round". A request of round
/// k of its session is named "round:k" (rounds above max_round share one
/// name), and a session idle for longer than session_timeout_s is observed
/// to go to "end". The model thus learns, per round, how often a session
/// continues; that is how many chat sessions behave (heavy-tailed lengths:
/// the more rounds a session has had, the likelier another). Every
/// observation is online: the model only knows the past.
///
/// The prefetch: after each request, when the model predicts a next round
/// (not "end") with confidence >= threshold, the prefetcher prefetches the
/// prefix the next round is known to start with, i.e. this request's full
/// blocks, with block_store::process() at low priority: missing blocks are
/// computed and inserted. The reply's blocks are not known before the next
/// request arrives, so they cannot be prefetched. Right after the request
/// every one of those blocks is in memory, so a prefetch then would fetch
/// nothing: it is timed for later, `prefetch_at` of the mean gap seen so
/// far between a session's round k and its next round after the request
/// (no prefetch until one such gap has been seen). The session's next
/// request coming first cancels it (`overtaken`). A prefetch that finds
/// every block in memory, or can cache none of those it computes, fetched
/// nothing (`redundant`: neither useful nor wasted, as the actor layer's
/// prefetcher counts one that found every block).
///
/// Accounting (prefetch_ledger), per session, as the actor layer judges a
/// prefetch by its own query's request: a prefetch that fetched blocks is
/// useful when the session's next request matches its whole chain (its
/// last block), wasted when that request does not or when one of its blocks
/// is evicted first, and unused when the session ends (its idle timeout)
/// or the replay ends first. Another session's use of the same blocks (a
/// shared system prompt) is no use of this prediction. Eviction is
/// leaf-first, so a chain loses its last block first: checking the last
/// block after each eviction pass finds every eviction. (Before, prefetches
/// were issued right after their request, every one redundant, and any
/// session's request counted as their use.)
/// Thread safety: free functions and a plain class; nothing shared.

#include "actors/transition_model.hpp"
#include "engine/block_key.hpp"
#include "engine/result.hpp"
#include "engine/workload.hpp"
#include "tools/bench/cli.hpp"
#include "tools/bench/engine_mode.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvfleet::bench {

/// Useful / wasted / unused accounting of prefetches, one outstanding per
/// session at most.
class prefetch_ledger {
public:
  /// Records a prefetch of the chain `keys` for `session`; false (and
  /// nothing counted) when `keys` is empty. One still outstanding for the
  /// session is judged wasted first (its next request did not come).
  bool issued(std::uint64_t session, std::span<const engine::block_key> keys);
  /// A prefetch that found every block in memory: fetched nothing.
  void redundant() noexcept { ++redundant_; }
  /// The session's next request matched these leading blocks: its
  /// outstanding prefetch is useful when its last block is among them,
  /// else wasted.
  void request(std::uint64_t session,
               std::span<const engine::block_key> matched);
  /// Outstanding prefetches whose last block `cached` says is gone become
  /// wasted.
  void
  check_evicted(const std::function<bool(const engine::block_key&)>& cached);
  /// The session ended: its outstanding prefetch is unused.
  void ended(std::uint64_t session);
  /// Outstanding prefetches become unused.
  void finish();

  [[nodiscard]] std::uint64_t prefetches() const noexcept {
    return prefetches_;
  }
  [[nodiscard]] std::uint64_t useful() const noexcept { return useful_; }
  [[nodiscard]] std::uint64_t wasted() const noexcept { return wasted_; }
  [[nodiscard]] std::uint64_t unused() const noexcept { return unused_; }
  [[nodiscard]] std::uint64_t redundant_count() const noexcept {
    return redundant_;
  }
  [[nodiscard]] std::size_t outstanding() const noexcept {
    return outstanding_.size();
  }

private:
  /// Last block of each session's outstanding prefetch.
  std::unordered_map<std::uint64_t, engine::block_key> outstanding_;
  std::uint64_t prefetches_ = 0;
  std::uint64_t useful_ = 0;
  std::uint64_t wasted_ = 0;
  std::uint64_t unused_ = 0;
  std::uint64_t redundant_ = 0;
};

struct prefetch_report {
  std::string workload;
  std::size_t requests = 0;
  std::uint32_t block_tokens = 0;
  std::size_t working_set_blocks = 0;
  std::size_t capacity_blocks = 0;
  engine::policy_kind eviction = engine::policy_kind::adaptive;
  double threshold = 0.0;
  double prefetch_at = 0.0;
  std::uint64_t predictions = 0; ///< requests with a next round predicted
  /// Predictions timed for later: no gap seen yet for the round (none).
  std::uint64_t untimed = 0;
  /// Cancelled: the session's next request came before the prefetch.
  std::uint64_t overtaken = 0;
  /// Never fired: the session ended (its idle timeout), or the replay did,
  /// first.
  std::uint64_t unfired = 0;
  /// Fired, and found every block in memory (or could cache none):
  /// fetched nothing.
  std::uint64_t redundant = 0;
  std::uint64_t prefetches = 0; ///< fired and fetched blocks
  std::uint64_t useful = 0;
  std::uint64_t wasted = 0;   ///< evicted first, or not used by the next round
  std::uint64_t unused = 0;   ///< the session or the replay ended first
  double used_fraction = 0.0; ///< useful / prefetches
  double token_hit_ratio = 0.0;          ///< with prefetch
  double baseline_token_hit_ratio = 0.0; ///< the same store without
};

/// Name of the query of a request that is round `round` (1-based) of its
/// session: "round:k", k capped at `max_round`.
[[nodiscard]] std::string round_query(std::uint64_t round,
                                      std::uint32_t max_round);

/// The replay store's configuration for `capacity_blocks`: make_store_config's,
/// with the engine actor's eviction rule (lowest_priority_first), so the
/// blocks a prefetch brings back at low priority go first, as there.
[[nodiscard]] result<engine::store_config>
replay_store_config(const prefetch_options& opts, std::size_t capacity_blocks);

/// Replays `reqs` (timestamp order, sessions set) through one store twice,
/// with and without prefetch. `workload` labels the report.
/// errc::invalid_argument when a request has no session or
/// session_timeout_s is not in [0, max_session_timeout_s].
[[nodiscard]] result<prefetch_report>
run_prefetch(const prefetch_options& opts,
             std::span<const engine::workload_request> reqs,
             const std::string& workload, const progress_fn& progress = {});

} // namespace kvfleet::bench
