#include "engine/internal/lrfu_shadow.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <set>
#include <unordered_map>
#include <utility>

namespace kvfleet::engine::internal {
namespace {

// The shadow as it was before its storage was made fixed (a node-based map
// and set, which allocated at every reference): the new one must make the
// same decisions, hit for hit and victim for victim.
class reference_shadow {
public:
  explicit reference_shadow(double half_life_factor)
      : factor_(half_life_factor) {}

  void reference(std::uint64_t key, double t, std::size_t capacity,
                 double log_prior) {
    const double h = factor_ * basis_;
    auto it = blocks_.find(key);
    if (it != blocks_.end()) {
      hits_ += 1.0;
      order_.erase({it->second.score, key});
      const double decayed =
          std::exp2(it->second.log_c - (t - it->second.last) / h);
      it->second.log_c = std::log2(1.0 + decayed);
    } else {
      it = blocks_.emplace(key, entry{log_prior, t, 0.0}).first;
    }
    it->second.last = t;
    it->second.score = it->second.log_c + t / h;
    order_.insert({it->second.score, key});
    while (blocks_.size() > capacity && !order_.empty()) {
      const auto victim = order_.begin()->second;
      order_.erase(order_.begin());
      blocks_.erase(victim);
    }
  }
  void rebase(double basis) {
    basis_ = basis;
    const double h = factor_ * basis_;
    order_.clear();
    for (auto& [key, e] : blocks_) {
      e.score = e.log_c + e.last / h;
      order_.insert({e.score, key});
    }
  }
  [[nodiscard]] double hits() const noexcept { return hits_; }
  void decay() noexcept { hits_ *= 0.5; }
  [[nodiscard]] std::size_t size() const noexcept { return blocks_.size(); }
  [[nodiscard]] bool contains(std::uint64_t key) const {
    return blocks_.contains(key);
  }

private:
  struct entry {
    double log_c = 0;
    double last = 0;
    double score = 0;
  };
  double factor_;
  double basis_ = 64;
  double hits_ = 0;
  std::unordered_map<std::uint64_t, entry> blocks_;
  std::set<std::pair<double, std::uint64_t>> order_;
};

struct shadow_case {
  std::uint32_t seed;
  std::uint64_t keys;   ///< distinct keys referenced
  bool same_ticks;      ///< runs of references at one tick (score ties)
  std::size_t reserved; ///< reserve() before the first reference (0: none)
};

class lrfu_shadow_matches : public ::testing::TestWithParam<shadow_case> {};

// Random references (hits, new keys, a capacity that grows and shrinks, a
// half-life basis that changes,
// priors that repeat so scores tie and the key breaks the tie) to both: the
// same blocks are held and the same hits counted after every step.
TEST_P(lrfu_shadow_matches, the_node_based_shadow_it_replaced) {
  const shadow_case c = GetParam();
  std::mt19937_64 gen(c.seed);
  for (const double factor : {0.5, 4.0}) {
    lrfu_shadow fixed(factor);
    reference_shadow want(factor);
    if (c.reserved != 0)
      fixed.reserve(c.reserved);
    double t = 0;
    std::size_t capacity = 16;
    for (std::size_t step = 0; step < 20000; ++step) {
      if (gen() % 500 == 0)
        capacity = 1 + gen() % 64;
      if (!c.same_ticks || gen() % 4 == 0)
        t += 1.0;
      // Sampled keys are multiples of the sample rate.
      const std::uint64_t key = (gen() % c.keys) * 16;
      // The policy's basis grows now and then: every score is retaken.
      if (gen() % 700 == 0) {
        const double basis = static_cast<double>(64 + gen() % 4096);
        fixed.rebase(basis);
        want.rebase(basis);
      }
      const double log_prior = std::log2(static_cast<double>(1 + gen() % 4) /
                                         4.0); // a few values: ties
      fixed.reference(key, t, capacity, log_prior);
      want.reference(key, t, capacity, log_prior);
      if (step % 512 == 511) {
        fixed.decay();
        want.decay();
      }
      ASSERT_EQ(fixed.hits(), want.hits()) << "step " << step;
      ASSERT_EQ(fixed.size(), want.size()) << "step " << step;
      for (std::uint64_t k = 0; k < c.keys; ++k)
        ASSERT_EQ(fixed.contains(k * 16), want.contains(k * 16))
            << "key " << k << ", step " << step;
      if (step % 1000 == 0)
        fixed.check_invariants();
    }
    fixed.check_invariants();
  }
}

INSTANTIATE_TEST_SUITE_P(random, lrfu_shadow_matches,
                         ::testing::Values(shadow_case{1, 40, false, 0},
                                           shadow_case{2, 200, false, 66},
                                           shadow_case{3, 40, true, 66},
                                           shadow_case{4, 200, true, 0},
                                           shadow_case{5, 1000, true, 16}));

// reserve() sizes the storage for that many blocks at once; reference()
// grows it only past that (one more than its capacity, for a moment).
TEST(lrfu_shadow, holds_capacity_plus_one_in_what_reserve_sized) {
  lrfu_shadow s(0.5);
  s.reserve(17);
  for (std::uint64_t k = 0; k < 1000; ++k)
    s.reference(k * 16, static_cast<double>(k), 16, -1.0);
  EXPECT_EQ(s.size(), 16U);
  EXPECT_EQ(s.reserved(), 17U);
  s.reference(1000 * 16, 1000.0, 40, -1.0);
  EXPECT_EQ(s.reserved(), 17U);
  for (std::uint64_t k = 1001; k < 1100; ++k)
    s.reference(k * 16, static_cast<double>(k), 40, -1.0);
  EXPECT_EQ(s.size(), 40U);
  EXPECT_GE(s.reserved(), 41U);
  s.check_invariants();
}

} // namespace
} // namespace kvfleet::engine::internal
