#include "actors/prefetch_tracker.hpp"

#include <cstdio>
#include <cstdlib>

namespace kvfleet::actors {

result<prefetch_tracker> prefetch_tracker::create(std::size_t max_outstanding) {
  if (max_outstanding == 0)
    return make_error(errc::invalid_argument,
                      "prefetch_tracker: max_outstanding must be at least 1");
  return prefetch_tracker{max_outstanding};
}

prefetch_tracker::prefetch_tracker(std::size_t max_outstanding)
    : max_outstanding_(max_outstanding) {
  if (max_outstanding_ == 0) {
    std::fprintf(stderr, "kvfleet: prefetch_tracker: max_outstanding 0\n");
    std::abort();
  }
}

result<void> prefetch_tracker::add(const std::string& query,
                                   const std::vector<engine::block_key>& keys,
                                   std::uint64_t id) {
  // Taking it again would leave the first entry's age and block claims
  // behind, tracked under nothing.
  if (outstanding_.contains(query))
    return make_error(errc::invalid_argument,
                      "prefetch_tracker: a prefetch of '" + query +
                          "' is outstanding already");
  while (outstanding_.size() >= max_outstanding_ && !order_.empty())
    drop(order_.front());
  order_.push_back(query);
  outstanding_.emplace(query, entry{keys, id, std::prev(order_.end())});
  for (const auto& k : keys)
    by_key_[k].insert(query);
  return {};
}

bool prefetch_tracker::used(const std::string& query) {
  auto it = outstanding_.find(query);
  if (it == outstanding_.end())
    return false;
  // Not answered yet, it may still fail: its answer decides.
  if (!it->second.answered) {
    it->second.used = true;
    return false;
  }
  drop(query);
  return true;
}

bool prefetch_tracker::answered(const std::string& query, std::uint64_t id) {
  auto it = outstanding_.find(query);
  if (it == outstanding_.end() || it->second.id != id)
    return false;
  if (!it->second.used) {
    it->second.answered = true;
    return false;
  }
  drop(query);
  return true;
}

bool prefetch_tracker::failed(const std::string& query, std::uint64_t id) {
  auto it = outstanding_.find(query);
  if (it == outstanding_.end() || it->second.id != id)
    return false;
  drop(query);
  return true;
}

std::vector<std::string>
prefetch_tracker::evicted(const engine::block_key& key) {
  auto it = by_key_.find(key);
  if (it == by_key_.end())
    return {};
  // Copied out first: each drop() edits this very set (and erases it with
  // the last query).
  std::vector<std::string> wasted(it->second.begin(), it->second.end());
  for (const auto& q : wasted)
    drop(q);
  return wasted;
}

void prefetch_tracker::drop(const std::string& query) {
  auto it = outstanding_.find(query);
  if (it == outstanding_.end())
    return;
  for (const auto& k : it->second.keys) {
    auto b = by_key_.find(k);
    if (b == by_key_.end())
      continue; // listed twice in this prefetch and erased at the first
    b->second.erase(query);
    if (b->second.empty())
      by_key_.erase(b);
  }
  order_.erase(it->second.age);
  outstanding_.erase(it);
}

} // namespace kvfleet::actors
