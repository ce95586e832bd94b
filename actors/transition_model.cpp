#include "actors/transition_model.hpp"

#include <algorithm>

namespace kvfleet::actors {

void transition_model::observe(std::uint64_t session,
                               const std::string& query) {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) {
    if (sessions_.size() >= config_.max_sessions && !session_lru_.empty()) {
      sessions_.erase(session_lru_.back());
      session_lru_.pop_back();
    }
    session_lru_.push_front(session);
    it = sessions_.emplace(session, session_state{{}, session_lru_.begin()})
             .first;
  } else {
    session_lru_.splice(session_lru_.begin(), session_lru_, it->second.lru);
  }
  if (!it->second.last.empty() && it->second.last != query)
    count(it->second.last, query);
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
    it = queries_.emplace(from, node{{}, query_lru_.begin()}).first;
  } else {
    query_lru_.splice(query_lru_.begin(), query_lru_, it->second.lru);
  }
  auto& next = it->second.next;
  auto s = std::find_if(next.begin(), next.end(),
                        [&](const successor& x) { return x.query == to; });
  if (s != next.end()) {
    s->count += 1.0;
    return;
  }
  if (next.size() < std::max<std::size_t>(config_.top_k, 1)) {
    next.push_back(successor{to, 1.0});
    return;
  }
  // Full: the newcomer replaces the weakest successor when that one is no
  // stronger than a single observation (so a new pattern can take over as
  // the old one ages out).
  auto weakest = std::min_element(
      next.begin(), next.end(),
      [](const successor& a, const successor& b) { return a.count < b.count; });
  if (weakest->count <= 1.0)
    *weakest = successor{to, 1.0};
}

std::optional<prediction>
transition_model::predict(const std::string& query) const {
  auto it = queries_.find(query);
  if (it == queries_.end() || it->second.next.empty())
    return std::nullopt;
  const auto& next = it->second.next;
  double total = 0.0;
  const successor* best = nullptr;
  for (const auto& s : next) {
    total += s.count;
    if (best == nullptr || s.count > best->count)
      best = &s;
  }
  if (best == nullptr || total <= 0.0)
    return std::nullopt;
  return prediction{best->query, best->count / total, best->count};
}

void transition_model::age() {
  for (auto it = queries_.begin(); it != queries_.end();) {
    auto& next = it->second.next;
    for (auto& s : next)
      s.count *= config_.decay;
    std::erase_if(
        next, [&](const successor& s) { return s.count < config_.min_count; });
    if (next.empty()) {
      query_lru_.erase(it->second.lru);
      it = queries_.erase(it);
    } else {
      ++it;
    }
  }
}

} // namespace kvfleet::actors
