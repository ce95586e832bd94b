#include "engine/eviction_policy.hpp"

#include "engine/internal/check.hpp"
#include "engine/internal/indexed_heap.hpp"
#include "engine/internal/lrfu_shadow.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <vector>

namespace kvfleet::engine {

result<void> check_priority(priority p) {
  if (p <= priority::critical)
    return {};
  return make_error(errc::invalid_argument,
                    "priority " + std::to_string(static_cast<unsigned>(p)) +
                        " is not one of background, low, normal, high, "
                        "critical");
}

std::string_view to_string(priority p) noexcept {
  switch (p) {
  case priority::background:
    return "background";
  case priority::low:
    return "low";
  case priority::normal:
    return "normal";
  case priority::high:
    return "high";
  case priority::critical:
    return "critical";
  }
  return "unknown";
}

result<priority> parse_priority(std::string_view name) {
  for (auto p : {priority::background, priority::low, priority::normal,
                 priority::high, priority::critical})
    if (to_string(p) == name)
      return p;
  return make_error(errc::invalid_argument,
                    "unknown priority '" + std::string(name) +
                        "' (expected critical, high, normal, low or "
                        "background)");
}

std::string_view to_string(policy_kind k) noexcept {
  switch (k) {
  case policy_kind::lru:
    return "lru";
  case policy_kind::lfu:
    return "lfu";
  case policy_kind::priority:
    return "priority";
  case policy_kind::adaptive:
    return "adaptive";
  case policy_kind::belady:
    return "belady";
  }
  return "unknown";
}

result<policy_kind> parse_policy(std::string_view name) {
  for (auto k : {policy_kind::lru, policy_kind::lfu, policy_kind::priority,
                 policy_kind::adaptive, policy_kind::belady})
    if (to_string(k) == name)
      return k;
  return make_error(errc::unknown_policy,
                    "unknown eviction policy '" + std::string(name) +
                        "' (expected lru, lfu, priority, adaptive or belady)");
}

namespace {

using internal::score;

// Every policy here is a score per block; the evictable block with the
// smallest score goes first. Scores of non-evictable blocks are kept so a
// block that becomes evictable (its child was evicted) ranks by its real
// history, not by when it became a leaf. The evictable blocks are in one
// heap per priority: victim(p) is that heap's top, victim() the smallest of
// the five tops. With every block at one priority, one heap does all the
// work, with the same operations in the same order as a single heap would.
class score_policy : public eviction_policy {
public:
  void reserve(std::size_t ids) override {
    // scores_ last: its size says which ids have room (on_access), so a
    // failed allocation leaves no id with room in one array only.
    if (prios_.size() < ids)
      prios_.resize(ids, priority::normal);
    if (scores_.size() < ids)
      scores_.resize(ids);
    // Blocks are put at normal priority unless a request says otherwise;
    // the other priorities' heaps grow as they fill.
    heap_.reserve(ids, static_cast<std::size_t>(priority::normal));
  }
  void on_access(std::uint32_t id, const access_info& info,
                 bool inserted) override {
    if (id >= scores_.size())
      reserve(std::max<std::size_t>(id + 1, 2 * scores_.size()));
    scores_[id] = rescore(id, info, inserted);
    prios_[id] = info.prio;
    if (heap_.contains(id))
      heap_.set(id, level(id), scores_[id]);
  }
  void set_evictable(std::uint32_t id, bool evictable) override {
    if (evictable)
      heap_.set(id, level(id), scores_[id]);
    else
      heap_.erase(id);
  }
  void on_remove(std::uint32_t id) override { heap_.erase(id); }
  [[nodiscard]] std::uint32_t victim() const override {
    return heap_.empty() ? npos : heap_.top();
  }
  [[nodiscard]] std::uint32_t victim(priority p) const override {
    const auto l = static_cast<std::size_t>(p);
    return l >= priority_count || heap_.empty(l) ? npos : heap_.top(l);
  }
  [[nodiscard]] std::size_t evictable_count() const noexcept override {
    return heap_.size();
  }
  [[nodiscard]] std::size_t
  evictable_count(priority p) const noexcept override {
    const auto l = static_cast<std::size_t>(p);
    return l >= priority_count ? 0 : heap_.size(l);
  }
  void check_invariants() const override {
    heap_.check_invariants();
    for (std::uint32_t id = 0; id < scores_.size(); ++id)
      KVFLEET_CHECK(!heap_.contains(id) || heap_.level(id) == level(id),
                    "evictable block in another priority's heap");
  }

protected:
  virtual score rescore(std::uint32_t id, const access_info& info,
                        bool inserted) = 0;
  /// Replaces a block's score (for a policy that changes its scoring).
  void reset_score(std::uint32_t id, const score& s) {
    scores_[id] = s;
    if (heap_.contains(id))
      heap_.set(id, level(id), s);
  }
  [[nodiscard]] const score& current(std::uint32_t id) const {
    return scores_[id];
  }

private:
  /// The heap of the block's priority; a value outside the five (the store
  /// refuses those) ranks with critical.
  [[nodiscard]] std::size_t level(std::uint32_t id) const noexcept {
    return std::min(static_cast<std::size_t>(prios_[id]), priority_count - 1);
  }

  std::vector<score> scores_;
  std::vector<priority> prios_; ///< of each block's last access
  internal::indexed_heap heap_{priority_count};
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

// The adaptive policy: LRFU (Lee et al., 2001) with a learned prior.
//
// Each block carries a combined recency-frequency value
// C = sum over past accesses of 2^(-(now - t_i) / h). Comparing C at a
// common time is the same as comparing log2(C(t_last)) + t_last / h, which
// does not change between accesses, so the score fits a heap.
//
// What LRU gets wrong on prefix caches is the new block that is never used
// again (the unique question after a shared document, the first turn of a
// one-shot chat): it enters at the top and pushes out blocks that will be
// reused. So a new block does not start at C = 1 but at the probability that
// it will be reused, learned online from the prefix tree: of the children
// its parent has had, how many were hit again (smoothed towards the
// store-wide rate). A child of a shared document that has had a hundred
// one-off questions starts near zero; the next turn of a conversation whose
// turns keep coming back starts near one. One hit gives any block a full
// access of credit.
//
// The half-life h is a multiple of the number of resident blocks, so the
// policy behaves the same at any cache size. Not of the number resident at
// each access, though: that moves between the store's watermarks at every
// room-making, and a score log_c + t / h taken under a smaller h ranks
// above one taken under a larger h by a gap that grows with t, so blocks
// touched while the store was fuller went first whatever their history,
// and after some hundred accesses per block the policy hit less than a
// third of what LRU hit (1,000 blocks, half the accesses to 300 hot keys:
// 0.09 against 0.43 after 2 million). The basis changes only now and then,
// and every score is retaken under the new one, in the shadows too: while
// the store fills, when it holds a quarter more blocks than the basis (a
// few dozen times, not at every insert); once the first block leaves, it is
// the most blocks resident so far (the high watermark's count, where the
// half-lives were tuned); after that, only if the store holds a quarter more
// again. Which multiple depends on the workload (short: recency, for chat;
// long: frequency, for shared prefixes and documents), so two lrfu_shadow
// caches on a sample of the keys try both and the policy follows the one that
// hits more (set dueling).
// The shadows are sized with the policy (reserve()), so an access allocates
// nothing in steady state.
class adaptive_policy final : public score_policy {
public:
  [[nodiscard]] policy_kind kind() const noexcept override {
    return policy_kind::adaptive;
  }
  void reserve(std::size_t ids) override {
    score_policy::reserve(ids);
    if (state_.size() < ids)
      state_.resize(ids);
    // A shadow holds a sample_rate-th of the resident blocks (at most
    // `ids`), and one more for a moment while it inserts before evicting.
    for (auto& s : shadows_)
      s.reserve(std::max<std::size_t>(ids / sample_rate, min_shadow_blocks) +
                1);
  }
  void on_remove(std::uint32_t id) override {
    score_policy::on_remove(id);
    removed_ = true;
    // Any partition's block (see eviction_policy::on_remove): an id this
    // policy never saw may be past its storage.
    if (id < state_.size())
      state_[id] = block_state{};
  }
  void check_invariants() const override {
    score_policy::check_invariants();
    for (const auto& s : shadows_)
      s.check_invariants();
  }
  [[nodiscard]] std::uint64_t full_rescores() const noexcept override {
    return full_rescores_;
  }

protected:
  score rescore(std::uint32_t id, const access_info& info,
                bool inserted) override {
    if (id >= state_.size())
      state_.resize(std::max<std::size_t>(id + 1, 2 * state_.size()));
    block_state& b = state_[id];
    const double t = static_cast<double>(info.tick);
    const double global = (static_cast<double>(reused_) + 1.0) /
                          (static_cast<double>(inserted_) + 2.0);
    follow_basis(info.resident_blocks);
    const double h = half_life();
    if (inserted) {
      b = block_state{};
      b.live = true;
      b.parent = info.parent;
      double prior = global;
      if (b.parent != npos && b.parent < state_.size()) {
        block_state& p = state_[b.parent];
        // At most 1: a hit counts a reused child of a parent whose insert
        // it did not see (the parent past this policy's storage then).
        prior =
            std::min(1.0, (static_cast<double>(p.children_reused) +
                           prior_weight * global) /
                              (static_cast<double>(p.children) + prior_weight));
        ++p.children;
      }
      ++inserted_;
      b.log_c = std::log2(std::max(prior, min_prior));
      // Brought back from the memory tier or disk with the accesses it had
      // (access_info::count): a block that was reused starts with a full
      // access of credit, as its first hit gave it, not at the prior of a
      // new block (which made a hot block back from the tier a one-off,
      // the first to go).
      if (info.count > 1) {
        b.hit = true;
        b.log_c = 0.0;
        // Counted as reused, as its insert was counted: the rates it
        // feeds stay what they were when a block back from the tier
        // counted a reuse at its next hit.
        ++reused_;
        if (b.parent != npos && b.parent < state_.size())
          ++state_[b.parent].children_reused;
      }
    } else {
      if (!b.hit) {
        b.hit = true;
        ++reused_;
        if (b.parent != npos && b.parent < state_.size())
          ++state_[b.parent].children_reused;
      }
      const double decayed = std::exp2(b.log_c - (t - b.last) / h);
      b.log_c = std::log2(1.0 + decayed);
    }
    b.last = t;
    b.tick = info.tick;
    // The shadows start a new block from the same prior as here.
    if (info.key_hash % sample_rate == 0)
      duel(info, t,
           inserted ? b.log_c : std::log2(std::max(global, min_prior)));
    // Under the half-life the duel may have just switched to, as every
    // other block's score was retaken (before, this block kept the old
    // one: after a switch to a shorter half-life, the block just used was
    // the next victim).
    return {b.log_c + t / half_life(), info.tick};
  }

private:
  struct block_state {
    double last = 0;
    double log_c = 0;
    std::uint64_t tick = 0;
    std::uint32_t parent = npos;
    // 64 bits: a resident parent (a pinned system prompt) sees a child
    // inserted at every round trip of one; at 32 bits `children` wrapped
    // after 2^32 and the prior of its next children came out far above 1,
    // ranking one-off blocks above the hottest.
    std::uint64_t children = 0;
    std::uint64_t children_reused = 0;
    bool hit = false;
    bool live = false;
  };

  [[nodiscard]] double half_life() const noexcept {
    return shadows_[active_].factor() * basis_;
  }

  /// Moves the half-life's basis (see the class comment), retaking every
  /// score under it: to the most blocks resident so far once the first
  /// block has left (the store is full: its high watermark), and else when
  /// `resident` is a quarter above the basis (a store filling up, or one
  /// whose capacity grew).
  void follow_basis(std::size_t resident) {
    const double r = static_cast<double>(resident);
    most_resident_ = std::max(most_resident_, r);
    if (removed_ && !settled_) {
      settled_ = true;
      if (most_resident_ == basis_)
        return;
      basis_ = std::max(most_resident_, min_basis);
    } else if (r > basis_ * basis_step) {
      basis_ = r;
    } else {
      return;
    }
    rescore_all();
    for (auto& s : shadows_)
      s.rebase(basis_);
  }

  /// Every live block's score under the active half-life.
  void rescore_all() {
    ++full_rescores_;
    const double h = half_life();
    for (std::uint32_t id = 0; id < state_.size(); ++id)
      if (state_[id].live)
        reset_score(id,
                    {state_[id].log_c + state_[id].last / h, state_[id].tick});
  }

  /// Feeds a sampled reference to both shadows and, every `duel_window`
  /// sampled references, switches to the other half-life when its shadow
  /// hit clearly more (then rescores every block under the new one).
  void duel(const access_info& info, double t, double log_prior) {
    const std::size_t capacity = std::max<std::size_t>(
        info.resident_blocks / sample_rate, min_shadow_blocks);
    for (auto& s : shadows_)
      s.reference(info.key_hash, t, capacity, log_prior);
    if (++sampled_ % duel_window != 0)
      return;
    const std::size_t other = 1 - active_;
    // The other half-life must win `needed_wins_` windows in a row: a
    // switch rescores every block, so it must not flap on a tie. On a tie
    // the noise still passes the margin twice in a row now and then, so
    // each switch doubles the windows the next one needs (up to
    // max_switch_after), and every quiet_windows windows without one halve
    // them again (down to switch_after), so that a change of workload is
    // followed within a few hundred thousand accesses again.
    if (shadows_[other].hits() > shadows_[active_].hits() * switch_margin)
      ++other_wins_;
    else
      other_wins_ = 0;
    if (other_wins_ >= needed_wins_) {
      other_wins_ = 0;
      quiet_ = 0;
      needed_wins_ = std::min(needed_wins_ * 2, max_switch_after);
      active_ = other;
      rescore_all();
    } else if (++quiet_ == quiet_windows) {
      quiet_ = 0;
      needed_wins_ = std::max(needed_wins_ / 2, switch_after);
    }
    for (auto& s : shadows_)
      s.decay();
  }

  // Half-lives in units of resident blocks: short favours recency (chat),
  // long favours frequency (shared prefixes, documents). The policy starts
  // with the short one and follows whichever its shadow caches (1 key in
  // `sample_rate`, `sample_rate` times smaller than the store) find better.
  static constexpr std::size_t sample_rate = 16;
  static constexpr std::size_t min_shadow_blocks = 16;
  static constexpr std::uint64_t duel_window = 512;
  static constexpr double switch_margin = 1.005;
  static constexpr std::uint32_t switch_after = 2;
  static constexpr std::uint32_t max_switch_after = 32;
  static constexpr std::uint32_t quiet_windows = 64;
  static constexpr double prior_weight = 2.0;
  static constexpr double min_prior = 1.0 / 1024;
  /// The half-life's basis is retaken when the store holds this many
  /// times as many blocks; it starts at min_basis.
  static constexpr double basis_step = 1.25;
  static constexpr double min_basis = 64;
  double basis_ = min_basis;
  double most_resident_ = 0;
  bool removed_ = false; ///< a block has left (on_remove)
  bool settled_ = false; ///< the basis was set at the first one
  std::array<internal::lrfu_shadow, 2> shadows_{internal::lrfu_shadow{0.5},
                                                internal::lrfu_shadow{4.0}};
  std::size_t active_ = 0;
  std::uint32_t other_wins_ = 0;
  std::uint32_t needed_wins_ = switch_after;
  std::uint32_t quiet_ = 0; ///< windows since the last switch or halving
  std::uint64_t sampled_ = 0;
  std::vector<block_state> state_;
  std::uint64_t inserted_ = 0;
  std::uint64_t reused_ = 0;
  std::uint64_t full_rescores_ = 0;
};

} // namespace

std::unique_ptr<eviction_policy> make_policy(policy_kind kind) {
  switch (kind) {
  case policy_kind::lru:
    return std::make_unique<lru_policy>();
  case policy_kind::lfu:
    return std::make_unique<lfu_policy>();
  case policy_kind::priority:
    return std::make_unique<priority_policy>();
  case policy_kind::adaptive:
    return std::make_unique<adaptive_policy>();
  case policy_kind::belady:
    return std::make_unique<belady_policy>();
  }
  return nullptr;
}

} // namespace kvfleet::engine
