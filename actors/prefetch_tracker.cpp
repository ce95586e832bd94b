#include "actors/prefetch_tracker.hpp"

#include <cstdio>
#include <cstdlib>

namespace kvfleet::actors {

result<prefetch_tracker> prefetch_tracker::create(std::size_t max_outstanding,
                                                  std::size_t max_keys) {
  if (max_outstanding == 0)
    return make_error(errc::invalid_argument,
                      "prefetch_tracker: max_outstanding must be at least 1");
  if (max_keys == 0)
    return make_error(errc::invalid_argument,
                      "prefetch_tracker: max_keys must be at least 1");
  return prefetch_tracker{max_outstanding, max_keys};
}

prefetch_tracker::prefetch_tracker(std::size_t max_outstanding,
                                   std::size_t max_keys)
    : max_outstanding_(max_outstanding), max_keys_(max_keys) {
  if (max_outstanding_ == 0 || max_keys_ == 0) {
    std::fprintf(stderr, "kvfleet: prefetch_tracker: a bound of 0\n");
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
  if (keys.size() > max_keys_)
    return make_error(errc::invalid_argument,
                      "prefetch_tracker: a prefetch of " +
                          std::to_string(keys.size()) +
                          " block keys is more than max_keys (" +
                          std::to_string(max_keys_) + ")");
  while ((outstanding_.size() >= max_outstanding_ ||
          keys_held_ + keys.size() > max_keys_) &&
         !order_.empty()) {
    drop(order_.front());
    ++forgotten_;
  }
  order_.push_back(query);
  entry e;
  e.keys = keys;
  e.id = id;
  e.age = std::prev(order_.end());
  e.serial = next_serial_++;
  const auto serial = e.serial;
  const auto placed = outstanding_.emplace(query, std::move(e)).first;
  query_of_.emplace(serial, &placed->first);
  for (const auto& k : keys)
    by_key_[k].insert(serial);
  keys_held_ += keys.size();
  return {};
}

prefetch_tracker::outcome prefetch_tracker::verdict(const entry& e,
                                                    const served& how,
                                                    std::size_t shared) {
  // Answered from the result cache: only a prefetch whose answer that
  // cache stored gave the request what it got.
  if (how.from_result_cache)
    return e.in_result_cache ? outcome::useful : outcome::wasted;
  // Useful only when the request reached a block the prefetch put in
  // memory: those it found there were the request's without it.
  return shared > e.found && e.engine == how.engine &&
                 how.matched_blocks >= shared
             ? outcome::useful
             : outcome::wasted;
}

prefetch_tracker::outcome
prefetch_tracker::used(const std::string& query,
                       std::span<const engine::block_key> keys,
                       const served& how) {
  auto it = outstanding_.find(query);
  if (it == outstanding_.end())
    return outcome::none;
  entry& e = it->second;
  std::size_t shared = 0;
  while (shared < keys.size() && shared < e.keys.size() &&
         keys[shared] == e.keys[shared])
    ++shared;
  // Not answered yet: it may still fail, and which engine answers it is
  // not known. The first request's verdict waits for that answer.
  if (!e.engine) {
    if (!e.use) {
      e.use = how;
      e.shared = shared;
    }
    return outcome::pending;
  }
  const auto out = verdict(e, how, shared);
  drop(query);
  return out;
}

prefetch_tracker::outcome prefetch_tracker::answered(const std::string& query,
                                                     std::uint64_t id,
                                                     std::uint32_t engine,
                                                     bool in_result_cache,
                                                     std::uint64_t found) {
  auto it = outstanding_.find(query);
  if (it == outstanding_.end() || it->second.id != id || it->second.engine)
    return outcome::none;
  entry& e = it->second;
  e.engine = engine;
  e.in_result_cache = in_result_cache;
  e.found = found;
  if (!e.use)
    return outcome::pending;
  const auto out = verdict(e, *e.use, e.shared);
  drop(query);
  return out;
}

bool prefetch_tracker::discard(const std::string& query, std::uint64_t id) {
  auto it = outstanding_.find(query);
  if (it == outstanding_.end() || it->second.id != id)
    return false;
  drop(query);
  return true;
}

std::vector<std::string>
prefetch_tracker::evicted(std::uint32_t engine, const engine::block_key& key) {
  auto it = by_key_.find(key);
  if (it == by_key_.end())
    return {};
  // Only prefetches this engine answered, and not those whose answer the
  // result cache keeps (their query is answered without the blocks).
  // Copied out first: each drop() edits this very set (and erases it with
  // the last query).
  std::vector<std::string> wasted;
  for (const auto serial : it->second) {
    // There: drop() keeps the three in step.
    const auto q = query_of_.find(serial);
    if (q == query_of_.end())
      continue;
    const auto e = outstanding_.find(*q->second);
    if (e != outstanding_.end() && e->second.engine == engine &&
        !e->second.in_result_cache)
      wasted.push_back(*q->second);
  }
  for (const auto& q : wasted)
    drop(q);
  return wasted;
}

void prefetch_tracker::drop(const std::string& query) {
  auto it = outstanding_.find(query);
  if (it == outstanding_.end())
    return;
  const auto serial = it->second.serial;
  for (const auto& k : it->second.keys) {
    auto b = by_key_.find(k);
    if (b == by_key_.end())
      continue; // listed twice in this prefetch and erased at the first
    b->second.erase(serial);
    if (b->second.empty())
      by_key_.erase(b);
  }
  keys_held_ -= it->second.keys.size();
  query_of_.erase(serial);
  order_.erase(it->second.age);
  outstanding_.erase(it);
}

} // namespace kvfleet::actors
