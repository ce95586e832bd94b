#include "actors/transition_model.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace kvfleet::actors {

result<void> validate(const transition_config& c, std::string_view prefix) {
  const auto bad = [&](const std::string& what) -> result<void> {
    return make_error(errc::invalid_argument, std::string(prefix) + what);
  };
  // Each of these bounds was taken as 1 before (top_k 0 still predicted).
  if (c.top_k == 0)
    return bad("top_k must be at least 1 (successors kept per query)");
  if (c.max_queries == 0)
    return bad("max_queries must be at least 1");
  if (c.max_sessions == 0)
    return bad("max_sessions must be at least 1");
  // Written so that NaN fails each range check.
  if (!(c.decay >= 0.0 && c.decay <= 1.0))
    return bad("decay must be in [0, 1], not " + std::to_string(c.decay));
  if (!(c.min_count >= 0.0 && std::isfinite(c.min_count)))
    return bad("min_count must be finite and >= 0, not " +
               std::to_string(c.min_count));
  if (!(c.session_min_count >= 0.0 && std::isfinite(c.session_min_count)))
    return bad("session_min_count must be finite and >= 0, not " +
               std::to_string(c.session_min_count));
  return {};
}

result<transition_model> transition_model::create(transition_config config) {
  if (auto ok = validate(config); !ok)
    return unexpected<error>{ok.error()};
  return transition_model{config};
}

transition_model::transition_model(transition_config config) : config_(config) {
  if (auto ok = validate(config_); !ok) {
    std::fprintf(stderr, "kvfleet: transition_model: %s\n",
                 ok.error().describe().c_str());
    std::abort();
  }
}

void transition_model::observe(std::uint64_t session,
                               const std::string& query) {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) {
    if (sessions_.size() >= config_.max_sessions && !session_lru_.empty()) {
      sessions_.erase(session_lru_.back());
      session_lru_.pop_back();
    }
    session_lru_.push_front(session);
    it = sessions_.emplace(session, session_state{{}, session_lru_.begin(), {}})
             .first;
  } else {
    session_lru_.splice(session_lru_.begin(), session_lru_, it->second.lru);
  }
  // A repeat (A -> A: a client polling, or asking again) is a transition
  // like any other: left out, after 100 A -> A and one A -> B the model
  // gave B confidence 1, and a repeated last query learned no successor
  // but the one it left to.
  if (!it->second.last.empty()) {
    count(it->second.last, query);
    // Session 0 is every request without a session: no one's own habits.
    if (session != 0)
      count_in(it->second, it->second.last, query);
  }
  it->second.last = query;
  if (config_.aging_interval > 0 &&
      ++observations_ % config_.aging_interval == 0)
    age();
}

void transition_model::count(const std::string& from, const std::string& to) {
  auto it = queries_.find(from);
  if (it == queries_.end()) {
    if (queries_.size() >= config_.max_queries && !query_lru_.empty()) {
      queries_.erase(query_lru_.back());
      query_lru_.pop_back();
    }
    query_lru_.push_front(from);
    it = queries_.emplace(from, node{{}, 0.0, query_lru_.begin()}).first;
  } else {
    query_lru_.splice(query_lru_.begin(), query_lru_, it->second.lru);
  }
  it->second.total += 1.0;
  auto& next = it->second.next;
  auto s = std::find_if(next.begin(), next.end(),
                        [&](const successor& x) { return x.query == to; });
  if (s != next.end()) {
    s->count += 1.0;
    return;
  }
  // top_k successors and one slot more for newcomers, so a stray
  // transition takes that slot, not the place of a strong successor (with
  // top_k 1, the only one).
  if (next.size() <= config_.top_k) { // not top_k + 1: it may be SIZE_MAX
    next.push_back(successor{to, 1.0, 0.0});
    return;
  }
  // Full: the newcomer replaces the weakest successor and takes over its
  // count, as overcount (space-saving): it is kept while it recurs at least
  // as often as the weakest others.
  auto weakest = std::min_element(
      next.begin(), next.end(),
      [](const successor& a, const successor& b) { return a.count < b.count; });
  *weakest = successor{to, weakest->count + 1.0, weakest->count};
}

void transition_model::count_in(session_state& s, const std::string& from,
                                const std::string& to) const {
  if (config_.session_queries == 0)
    return;
  auto n = std::find_if(s.table.begin(), s.table.end(),
                        [&](const session_node& x) { return x.from == from; });
  if (n == s.table.end()) {
    if (s.table.size() >= config_.session_queries)
      s.table.pop_back(); // the query it left least recently
    s.table.insert(s.table.begin(), session_node{from, {}, 0.0});
    n = s.table.begin();
  } else if (n != s.table.begin()) {
    std::rotate(s.table.begin(), n, n + 1);
    n = s.table.begin();
  }
  n->total += 1.0;
  auto& next = n->next;
  auto x = std::find_if(next.begin(), next.end(),
                        [&](const successor& y) { return y.query == to; });
  if (x != next.end()) {
    x->count += 1.0;
  } else if (next.size() < session_successors) {
    next.push_back(successor{to, 1.0, 0.0});
  } else {
    *std::min_element(next.begin(), next.end(),
                      [](const successor& a, const successor& b) {
                        return a.count < b.count;
                      }) = successor{to, 1.0, 0.0};
  }
}

std::optional<prediction> transition_model::predict_in(std::uint64_t session,
                                                       const std::string& query,
                                                       bool other) const {
  if (const auto s = sessions_.find(session);
      session != 0 && s != sessions_.end())
    for (const auto& n : s->second.table) {
      if (n.from != query)
        continue;
      const successor* best = nullptr;
      for (const auto& x : n.next)
        if ((!other || x.query != query) &&
            (best == nullptr || x.count > best->count))
          best = &x;
      if (best != nullptr && best->count >= config_.session_min_count &&
          best->count > 0.0 && n.total > 0.0)
        return prediction{best->query, std::min(1.0, best->count / n.total),
                          best->count, true};
      break;
    }
  return predict_overall(query, other);
}

std::optional<prediction>
transition_model::predict_overall(const std::string& query, bool other) const {
  auto it = queries_.find(query);
  if (it == queries_.end() || it->second.next.empty())
    return std::nullopt;
  const auto& next = it->second.next;
  const successor* best = nullptr;
  for (const auto& s : next) {
    if (other && s.query == query)
      continue;
    if (best == nullptr || s.count - s.over > best->count - best->over)
      best = &s;
  }
  // total >= the kept counts' sum; the min guards rounding in the aging.
  const double total = it->second.total;
  const double sure = best == nullptr ? 0.0 : best->count - best->over;
  if (best == nullptr || !(total > 0.0) || !(sure > 0.0))
    return std::nullopt;
  return prediction{best->query, std::min(1.0, sure / total), sure};
}

void transition_model::age_successors(std::vector<successor>& next,
                                      double& total) const {
  total *= config_.decay;
  for (auto& s : next) {
    s.count *= config_.decay;
    s.over *= config_.decay;
  }
  std::erase_if(
      next, [&](const successor& s) { return s.count < config_.min_count; });
}

void transition_model::age() {
  for (auto& [id, s] : sessions_) {
    for (auto& n : s.table)
      age_successors(n.next, n.total);
    std::erase_if(s.table,
                  [](const session_node& n) { return n.next.empty(); });
  }
  for (auto it = queries_.begin(); it != queries_.end();) {
    auto& next = it->second.next;
    age_successors(next, it->second.total);
    if (next.empty()) {
      query_lru_.erase(it->second.lru);
      it = queries_.erase(it);
    } else {
      ++it;
    }
  }
}

} // namespace kvfleet::actors
