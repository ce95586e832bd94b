#include "tools/bench/next_use_oracle.hpp"

#include "engine/stop_poll.hpp"

#include <string>

namespace kvfleet::bench {

next_use_oracle::next_use_oracle(const request_keys& keys) : keys_(&keys) {
  precompute({});
}

result<next_use_oracle>
next_use_oracle::build(const request_keys& keys,
                       const std::function<bool()>& stop) {
  next_use_oracle oracle(keys, unfilled{});
  if (!oracle.precompute(stop))
    return make_error(errc::unavailable,
                      "stopped building the next-use oracle");
  return oracle;
}

bool next_use_oracle::precompute(const std::function<bool()>& stop) {
  const request_keys& keys = *keys_;
  const std::size_t n = keys.keys.size();
  ids_.reserve(n);
  next_.assign(n, none);
  // Walking backwards, cursor_ holds each key's latest-seen (i.e. next)
  // position; at the end it holds the key's first position.
  engine::stop_poll poll{stop};
  for (std::size_t s = n; s-- > 0;) {
    if (poll.stopped(n - 1 - s))
      return false;
    const auto [it, inserted] = ids_.try_emplace(keys.keys[s], cursor_.size());
    if (inserted) {
      cursor_.push_back(s);
    } else {
      next_[s] = cursor_[it->second];
      cursor_[it->second] = s;
    }
  }
  return true;
}

void next_use_oracle::begin_request(std::size_t r) noexcept {
  current_end_ = r + 1 < keys_->offsets.size() ? keys_->offsets[r + 1]
                                               : keys_->offsets.back();
}

std::uint64_t next_use_oracle::next_use(const engine::block_key& key) {
  const auto it = ids_.find(key);
  if (it == ids_.end())
    return never;
  std::uint64_t& pos = cursor_[it->second];
  while (pos != none && pos < current_end_)
    pos = next_[pos];
  return pos;
}

std::function<std::uint64_t(const engine::block_key&)>
next_use_oracle::as_function() {
  return [this](const engine::block_key& key) { return next_use(key); };
}

} // namespace kvfleet::bench
