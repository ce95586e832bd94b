#pragma once
/// First-order query transitions for predictive prefetch, in bounded memory.
///
/// observe(session, q) counts the transition prev -> q, where prev is that
/// session's previous query (q itself too: a repeat is a transition, so a
/// query that mostly repeats gives its other successors a low confidence):
/// transitions are found per session (0 is one anonymous stream) and counted in
/// one overall table. For each query it keeps at most `top_k` successors and
/// one slot more for newcomers. When they are full, a new successor replaces
/// the weakest and takes over its count plus one, recorded as that much
/// possible overcount (the space-saving summary), so a pattern that recurs more
/// often than the weakest kept one gets in however strong the old ones were,
/// while a one-off among strong successors only replaces the weakest one-off
/// (with top_k 1 too: the spare slot takes it). Counts age: every
/// `aging_interval` observations all counts are multiplied by `decay`, and
/// successors below `min_count` are dropped, so a pattern that stops recurring
/// is forgotten (an `aging_interval` of 0 never ages by itself: only age()
/// does). At most `max_queries` queries and `max_sessions` sessions are tracked
/// (least recently used go first).
///
/// predict(q) names the most likely next query with its confidence: the
/// successor whose count less its possible overcount (the transitions it
/// surely followed q) is highest, and that figure over the total outgoing
/// count of q, aged alike, which counts every transition seen from q, also
/// to successors not kept (so a rare pattern among many others has a low
/// confidence, whatever top_k). Before, a successor came in only when the
/// weakest kept one had a count of 1 or less: after A -> B 100 times, A ->
/// C took ~40,000 transitions (top_k 1) to be predicted, and for ever
/// without aging.
/// Each session also keeps its own transitions: for the last
/// `session_queries` queries it left (least recently left go first), its
/// two strongest successors there, counted and aged like the overall ones.
/// predict(session, q) names the session's own successor of q when it has
/// followed q there at least `session_min_count` times (aged), with the
/// session's confidence, and the overall prediction otherwise: a session
/// that always goes A -> B gets B though most sessions go A -> C. Session
/// 0 (requests without one, many users interleaved) keeps no table of its
/// own. Memory: at most max_sessions x session_queries x 3 query ids
/// (about 1.2 KB per session at the defaults with 65-byte ids: 138 MB for
/// 100,000 sessions, measured).
/// Not thread-safe: owned by one actor.

#include <cstddef>
#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "engine/result.hpp"

namespace kvfleet::actors {

struct transition_config {
  std::size_t top_k = 4;
  std::size_t max_queries = 100'000;
  std::size_t max_sessions = 100'000;
  std::uint64_t aging_interval = 10'000; ///< observations between agings
  double decay = 0.5;
  double min_count = 0.5;
  /// Queries per session whose successors in that session are kept (0:
  /// overall counts only).
  std::size_t session_queries = 4;
  /// A session's own successor is predicted once it followed the query
  /// this many times there (aged); else the overall one is.
  double session_min_count = 2.0;
};

/// Checks: top_k, max_queries and max_sessions at least 1; decay in
/// [0, 1]; min_count and session_min_count finite and >= 0. Messages name the
/// field after `prefix` (say "prefetch_config.model.").
[[nodiscard]] result<void> validate(const transition_config& c,
                                    std::string_view prefix = "");

struct prediction {
  std::string query;
  double confidence = 0.0; ///< in (0, 1]
  double count = 0.0;      ///< transitions it surely followed the query, aged
  bool session = false;    ///< from the session's own transitions
};

class transition_model {
public:
  /// errc::invalid_argument when validate(config) fails.
  [[nodiscard]] static result<transition_model>
  create(transition_config config);

  /// Query `query` followed the session's previous query.
  void observe(std::uint64_t session, const std::string& query);
  /// Most likely successor of `query` overall, nullopt when none is known.
  [[nodiscard]] std::optional<prediction>
  predict(const std::string& query) const {
    return predict_overall(query, false);
  }
  /// Most likely successor of `query` in `session`: the session's own when
  /// it has enough of them (see the class comment), else predict(query).
  [[nodiscard]] std::optional<prediction>
  predict(std::uint64_t session, const std::string& query) const {
    return predict_in(session, query, false);
  }
  /// As predict(), the most likely successor other than `query` itself (a
  /// repeat still counts in the confidence's total): a prefetcher has just
  /// computed `query`, and a repeat ahead of another successor would hide
  /// it.
  [[nodiscard]] std::optional<prediction>
  predict_other(const std::string& query) const {
    return predict_overall(query, true);
  }
  [[nodiscard]] std::optional<prediction>
  predict_other(std::uint64_t session, const std::string& query) const {
    return predict_in(session, query, true);
  }
  /// Multiplies every count by `decay` and drops weak successors (also
  /// done automatically every aging_interval observations).
  void age();

  [[nodiscard]] std::size_t query_count() const noexcept {
    return queries_.size();
  }
  [[nodiscard]] std::size_t session_count() const noexcept {
    return sessions_.size();
  }

private:
  /// REQUIRES: validate(config) succeeds; else a bug in this class (create
  /// checks), and it aborts with the reason.
  explicit transition_model(transition_config config);
  /// predict(), or predict_other() when `other`.
  [[nodiscard]] std::optional<prediction>
  predict_overall(const std::string& query, bool other) const;
  [[nodiscard]] std::optional<prediction>
  predict_in(std::uint64_t session, const std::string& query, bool other) const;

  struct successor {
    std::string query;
    double count = 0.0;
    /// Of `count`, what it took over from the successor it replaced: the
    /// transitions it surely followed are count - over.
    double over = 0.0;
  };
  struct node {
    std::vector<successor> next;
    double total = 0.0; ///< every transition from this query, aged
    std::list<std::string>::iterator lru;
  };
  void count(const std::string& from, const std::string& to);

  transition_config config_;
  std::unordered_map<std::string, node> queries_;
  std::list<std::string> query_lru_; ///< front = most recent
  /// A query a session left, and where it went from there.
  struct session_node {
    std::string from;
    std::vector<successor> next; ///< at most session_successors
    double total = 0.0;
  };
  static constexpr std::size_t session_successors = 2;
  struct session_state {
    std::string last;
    std::list<std::uint64_t>::iterator lru;
    std::vector<session_node> table; ///< most recently left first
  };
  void count_in(session_state& s, const std::string& from,
                const std::string& to) const;
  /// Ages one query's successors (overall or a session's): `total` and
  /// every count times `decay`, and those below min_count dropped.
  void age_successors(std::vector<successor>& next, double& total) const;
  std::unordered_map<std::uint64_t, session_state> sessions_;
  std::list<std::uint64_t> session_lru_;
  std::uint64_t observations_ = 0;
};

} // namespace kvfleet::actors
