#pragma once
/// First-order query transitions for predictive prefetch, in bounded memory.
///
/// observe(session, q) counts the transition prev -> q, where prev is that
/// session's previous query: transitions are found per session (0 is one
/// anonymous stream) and counted in one overall table. For each query
/// it keeps at most `top_k` successors (a new successor replaces the
/// weakest when full). Counts age: every `aging_interval` observations all
/// counts are multiplied by `decay`, and successors below `min_count` are
/// dropped, so a pattern that stops recurring is forgotten (an
/// `aging_interval` of 0 never ages by itself: only age() does). At most
/// `max_queries` queries and `max_sessions` sessions are tracked (least
/// recently used go first).
///
/// predict(q) names the most likely next query with its confidence: that
/// successor's count over the total outgoing count of q, aged alike, which
/// counts every transition seen from q, also to successors not kept (so a
/// rare pattern among many others has a low confidence, whatever top_k).
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
};

/// Checks: top_k, max_queries and max_sessions at least 1; decay in
/// [0, 1]; min_count finite and >= 0. Messages name the field after
/// `prefix` (say "prefetch_config.model.").
[[nodiscard]] result<void> validate(const transition_config& c,
                                    std::string_view prefix = "");

struct prediction {
  std::string query;
  double confidence = 0.0; ///< in (0, 1]
  double count = 0.0;
};

class transition_model {
public:
  /// errc::invalid_argument when validate(config) fails.
  [[nodiscard]] static result<transition_model>
  create(transition_config config);

  /// Query `query` followed the session's previous query.
  void observe(std::uint64_t session, const std::string& query);
  /// Most likely successor of `query`, nullopt when none is known.
  [[nodiscard]] std::optional<prediction>
  predict(const std::string& query) const;
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

  struct successor {
    std::string query;
    double count = 0.0;
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
  struct session_state {
    std::string last;
    std::list<std::uint64_t>::iterator lru;
  };
  std::unordered_map<std::uint64_t, session_state> sessions_;
  std::list<std::uint64_t> session_lru_;
  std::uint64_t observations_ = 0;
};

} // namespace kvfleet::actors
