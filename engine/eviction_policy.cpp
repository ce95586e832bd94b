#include "engine/eviction_policy.hpp"

#include "engine/internal/indexed_heap.hpp"

#include <cmath>
#include <string>
#include <vector>

namespace kvfleet::engine {

std::string_view to_string(priority p) noexcept {
  switch (p) {
  case priority::background: return "background";
  case priority::low: return "low";
  case priority::normal: return "normal";
  case priority::high: return "high";
  case priority::critical: return "critical";
  }
  return "unknown";
}

result<priority> parse_priority(std::string_view name) {
  for (auto p : {priority::background, priority::low, priority::normal,
                 priority::high, priority::critical})
    if (to_string(p) == name) return p;
  return make_error(errc::invalid_argument,
                    "unknown priority '" + std::string(name) +
                        "' (expected critical, high, normal, low or "
                        "background)");
}

std::string_view to_string(policy_kind k) noexcept {
  switch (k) {
  case policy_kind::lru: return "lru";
  case policy_kind::lfu: return "lfu";
  case policy_kind::priority: return "priority";
  case policy_kind::adaptive: return "adaptive";
  case policy_kind::belady: return "belady";
  }
  return "unknown";
}

result<policy_kind> parse_policy(std::string_view name) {
  for (auto k : {policy_kind::lru, policy_kind::lfu, policy_kind::priority,
                 policy_kind::adaptive, policy_kind::belady})
    if (to_string(k) == name) return k;
  return make_error(errc::unknown_policy,
                    "unknown eviction policy '" + std::string(name) +
                        "' (expected lru, lfu, priority, adaptive or belady)");
}

namespace {

using internal::score;

// Every policy here is a score per block; the evictable block with the
// smallest score goes first. Scores of non-evictable blocks are kept so a
// block that becomes evictable (its child was evicted) ranks by its real
// history, not by when it became a leaf.
class score_policy : public eviction_policy {
public:
  void reserve(std::size_t ids) override {
    if (scores_.size() < ids) scores_.resize(ids);
    heap_.reserve(ids);
  }
  void on_access(std::uint32_t id, const access_info& info,
                 bool inserted) override {
    if (id >= scores_.size()) reserve(std::max<std::size_t>(id + 1, 2 * scores_.size()));
    scores_[id] = rescore(id, info, inserted);
    if (heap_.contains(id)) heap_.set(id, scores_[id]);
  }
  void set_evictable(std::uint32_t id, bool evictable) override {
    if (evictable)
      heap_.set(id, scores_[id]);
    else
      heap_.erase(id);
  }
  void on_remove(std::uint32_t id) override { heap_.erase(id); }
  [[nodiscard]] std::uint32_t victim() const override {
    return heap_.empty() ? npos : heap_.top();
  }
  [[nodiscard]] std::size_t evictable_count() const noexcept override {
    return heap_.size();
  }
  void check_invariants() const override { heap_.check_invariants(); }

protected:
  virtual score rescore(std::uint32_t id, const access_info& info,
                        bool inserted) = 0;
  [[nodiscard]] const score& current(std::uint32_t id) const {
    return scores_[id];
  }

private:
  std::vector<score> scores_;
  internal::indexed_heap heap_;
};

class lru_policy final : public score_policy {
public:
  [[nodiscard]] policy_kind kind() const noexcept override {
    return policy_kind::lru;
  }

protected:
  score rescore(std::uint32_t, const access_info& info, bool) override {
    return {0.0, info.tick};
  }
};

class lfu_policy final : public score_policy {
public:
  [[nodiscard]] policy_kind kind() const noexcept override {
    return policy_kind::lfu;
  }

protected:
  score rescore(std::uint32_t, const access_info& info, bool) override {
    return {static_cast<double>(info.count), info.tick};
  }
};

class priority_policy final : public score_policy {
public:
  [[nodiscard]] policy_kind kind() const noexcept override {
    return policy_kind::priority;
  }

protected:
  score rescore(std::uint32_t, const access_info& info, bool) override {
    return {static_cast<double>(info.prio), info.tick};
  }
};

class belady_policy final : public score_policy {
public:
  [[nodiscard]] policy_kind kind() const noexcept override {
    return policy_kind::belady;
  }

protected:
  score rescore(std::uint32_t, const access_info& info, bool) override {
    // Farthest next use first: invert so the smallest score is the farthest.
    return {0.0, std::numeric_limits<std::uint64_t>::max() - info.next_use};
  }
};

// LRFU (Lee et al., 2001): each block carries a combined recency-frequency
// value C = sum over past accesses of 2^(-(now - t_i) / h). Comparing C at a
// common time is the same as comparing log2(C(t_last)) + t_last / h, which
// never changes between accesses, so the score fits a heap. Blocks touched
// often survive a burst of one-time blocks (scan resistance, unlike LRU);
// a block that stops being used decays (aging, unlike LFU).
//
// The half-life h adapts: it is a multiple of the number of blocks resident,
// so the policy behaves the same at any cache size. One access per block per
// cache turnover keeps a block as warm as a block first seen now.
class adaptive_policy final : public score_policy {
public:
  [[nodiscard]] policy_kind kind() const noexcept override {
    return policy_kind::adaptive;
  }
  void reserve(std::size_t ids) override {
    score_policy::reserve(ids);
    if (last_.size() < ids) last_.resize(ids);
  }

protected:
  score rescore(std::uint32_t id, const access_info& info,
                bool inserted) override {
    if (id >= last_.size()) last_.resize(std::max<std::size_t>(id + 1, 2 * last_.size()));
    const double h = half_life_factor *
                     static_cast<double>(std::max<std::size_t>(info.resident_blocks, 64));
    const double t = static_cast<double>(info.tick);
    double log_c = 0.0; // log2 of C right after this access
    if (!inserted) {
      const double prev_log_c = current(id).major - last_[id] / h;
      const double decayed = std::exp2(prev_log_c - (t - last_[id]) / h);
      log_c = std::log2(1.0 + decayed);
    }
    last_[id] = t;
    return {log_c + t / h, info.tick};
  }

private:
  static constexpr double half_life_factor = 1.0;
  std::vector<double> last_;
};

} // namespace

std::unique_ptr<eviction_policy> make_policy(policy_kind kind) {
  switch (kind) {
  case policy_kind::lru: return std::make_unique<lru_policy>();
  case policy_kind::lfu: return std::make_unique<lfu_policy>();
  case policy_kind::priority: return std::make_unique<priority_policy>();
  case policy_kind::adaptive: return std::make_unique<adaptive_policy>();
  case policy_kind::belady: return std::make_unique<belady_policy>();
  }
  return nullptr;
}

} // namespace kvfleet::engine
