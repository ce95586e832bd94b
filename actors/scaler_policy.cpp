#include "actors/scaler_policy.hpp"

#include "actors/config_checks.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <string>
#include <utility>

namespace kvfleet::actors {

std::string_view to_string(scale_action a) noexcept {
  switch (a) {
  case scale_action::hold:
    return "hold";
  case scale_action::spawn_replica:
    return "spawn_replica";
  case scale_action::grow_capacity:
    return "grow_capacity";
  case scale_action::retire_replica:
    return "retire_replica";
  case scale_action::shrink_capacity:
    return "shrink_capacity";
  }
  return "unknown";
}

result<void> validate(const scaler_config& c) {
  using end = end_point;
  // Each of these would make the scaler act against its own rule: a
  // target of 0 scales up on any latency; a low_fraction of 1 or more
  // scales down above the target's band; a grow_factor of 1 or less (or a
  // shrink_factor outside (0, 1)) grows by shrinking and shrinks by growing,
  // past the capacity bounds.
  if (auto ok = check_duration("scaler_config.target", c.target); !ok)
    return ok;
  if (auto ok = check_range("scaler_config.low_fraction", c.low_fraction, 0.0,
                            end::closed, 1.0, end::open);
      !ok)
    return ok;
  if (auto ok = check_duration("scaler_config.window", c.window); !ok)
    return ok;
  if (auto ok = check_duration("scaler_config.cooldown", c.cooldown, true); !ok)
    return ok;
  if (auto ok = check_range("scaler_config.grow_factor", c.grow_factor, 1.0,
                            end::open, unbounded, end::open);
      !ok)
    return ok;
  if (auto ok = check_range("scaler_config.shrink_factor", c.shrink_factor, 0.0,
                            end::open, 1.0, end::open);
      !ok)
    return ok;
  if (c.sustain == 0)
    return make_error(errc::invalid_argument,
                      "scaler_config.sustain must be at least 1 (evaluations "
                      "a condition must hold before the scaler acts)");
  if (c.min_capacity_tokens == 0)
    return make_error(errc::invalid_argument,
                      "scaler_config.min_capacity_tokens must be at least 1: "
                      "an engine reads a capacity_tokens of 0 as no limit, so "
                      "a shrink to 0 would lift the limit");
  if (c.min_capacity_tokens > c.max_capacity_tokens)
    return make_error(errc::invalid_argument,
                      "scaler_config.min_capacity_tokens (" +
                          std::to_string(c.min_capacity_tokens) +
                          ") is above max_capacity_tokens (" +
                          std::to_string(c.max_capacity_tokens) + ")");
  if (c.min_replicas == 0)
    return make_error(errc::invalid_argument,
                      "scaler_config.min_replicas must be at least 1: the "
                      "balancer never retires its last live engine, so the "
                      "scaler would decide that retire at every cooldown");
  if (c.min_replicas > c.max_replicas)
    return make_error(
        errc::invalid_argument,
        "scaler_config.min_replicas (" + std::to_string(c.min_replicas) +
            ") is above max_replicas (" + std::to_string(c.max_replicas) + ")");
  return {};
}

result<void> validate_capacity(const scaler_config& c,
                               std::uint32_t capacity_tokens,
                               std::string_view option) {
  if (capacity_tokens >= c.min_capacity_tokens &&
      capacity_tokens <= c.max_capacity_tokens)
    return {};
  return make_error(
      errc::invalid_argument,
      std::string(option) + " (" + std::to_string(capacity_tokens) +
          ") is outside the scaler's range [" +
          std::to_string(c.min_capacity_tokens) + ", " +
          std::to_string(c.max_capacity_tokens) +
          "] (scaler_config.min_capacity_tokens, max_capacity_tokens): set "
          "it inside, or widen the range");
}

result<void> validate_replicas(const scaler_config& c, std::uint32_t replicas,
                               std::string_view option) {
  if (replicas <= c.max_replicas)
    return {};
  return make_error(errc::invalid_argument,
                    std::string(option) + " (" + std::to_string(replicas) +
                        ") is above the scaler's max_replicas (" +
                        std::to_string(c.max_replicas) + ")");
}

namespace {

result<void> validate_all(const scaler_config& c,
                          std::uint32_t capacity_tokens) {
  if (auto ok = validate(c); !ok)
    return ok;
  return validate_capacity(c, capacity_tokens, "scaler_policy capacity_tokens");
}

const scaler_config& checked(const scaler_config& c,
                             std::uint32_t capacity_tokens) {
  if (auto ok = validate_all(c, capacity_tokens); !ok) {
    std::fprintf(stderr, "kvfleet: scaler_policy: %s\n",
                 ok.error().describe().c_str());
    std::abort();
  }
  return c;
}

} // namespace

result<scaler_policy> scaler_policy::create(scaler_config config,
                                            std::uint32_t replicas,
                                            std::uint32_t capacity_tokens) {
  if (auto ok = validate_all(config, capacity_tokens); !ok)
    return unexpected<error>{ok.error()};
  return scaler_policy{config, replicas, capacity_tokens};
}

scaler_policy::scaler_policy(scaler_config config, std::uint32_t replicas,
                             std::uint32_t capacity_tokens)
    : config_(checked(config, capacity_tokens)), replicas_(replicas),
      capacity_(capacity_tokens) {}

result<void> scaler_policy::record(engine::nanos now, engine::nanos latency) {
  if (latency < engine::nanos{0})
    return make_error(errc::invalid_argument,
                      "scaler_policy::record: a latency must not be negative, "
                      "not " +
                          std::to_string(latency.count()) + " ns");
  // The window is kept in time order, and leaves from its front: a sample
  // seen earlier than the newest (a caller's clocks that disagree) goes in
  // its place, and leaves at its time (at the next trim, when the window
  // has passed it already). Before, it went to the back and stayed until
  // the newer samples before it left. (Not dropped here against the newest
  // sample: one stamped far ahead would then drop every sample after it.)
  trim(now);
  // Past max_samples, each request is kept with chance 1 / stride_ (a
  // fixed-seed generator: deterministic, and unlike keeping every
  // stride_-th request, blind to periodic traffic).
  if (stride_ > 1 && (next_random() & (stride_ - 1)) != 0)
    return {};
  auto at = samples_.end();
  while (at != samples_.begin() && std::prev(at)->at > now)
    --at;
  samples_.insert(at, sample{now, latency, stride_});
  weight_sum_ += stride_;
  if (samples_.size() > max_samples) {
    thin();
    stride_ *= 2;
  }
  return {};
}

std::uint64_t scaler_policy::next_random() noexcept {
  // splitmix64
  std::uint64_t z = (random_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30U)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27U)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31U);
}

void scaler_policy::thin() {
  std::deque<sample> kept;
  for (std::size_t i = 0; i < samples_.size(); i += 2) {
    if (i + 1 == samples_.size()) {
      kept.push_back(samples_[i]);
      break;
    }
    const sample& a = samples_[i];
    const sample& b = samples_[i + 1];
    // Either latency at random, in proportion to the requests each stands
    // for, keeps the thinning unbiased (an even draw is only for equal
    // weights: after a busier spell, a sample of 8 requests beside one of
    // 1 was kept as often); the later time, so the pair's weight leaves
    // the window with its last.
    const std::uint64_t total = a.weight + b.weight;
    const bool keep_a = next_random() % total < a.weight;
    kept.push_back(sample{b.at, keep_a ? a.latency : b.latency, total});
  }
  samples_ = std::move(kept);
}

void scaler_policy::trim(engine::nanos now) {
  while (!samples_.empty() && samples_.front().at + config_.window < now) {
    weight_sum_ -= samples_.front().weight;
    samples_.pop_front();
  }
  // Traffic fell: new requests are kept more densely again, once at half
  // the stride they would fill at most half the window (the headroom keeps
  // it from halving and doubling at every turn).
  while (stride_ > 1 && weight_sum_ <= (max_samples / 2) * (stride_ / 2))
    stride_ /= 2;
}

std::uint64_t scaler_policy::window_requests(engine::nanos now) {
  trim(now);
  return weight_sum_;
}

engine::nanos scaler_policy::p95(engine::nanos now) {
  trim(now);
  if (samples_.empty())
    return engine::nanos{0};
  scratch_.clear();
  for (const auto& s : samples_)
    scratch_.emplace_back(s.latency, s.weight);
  // Nearest rank over the requests: the smallest latency with at least 95%
  // of the window's requests at or below it.
  const auto rank =
      std::max<std::uint64_t>(1, static_cast<std::uint64_t>(std::ceil(
                                     0.95 * static_cast<double>(weight_sum_))));
  std::sort(scratch_.begin(), scratch_.end());
  std::uint64_t below = 0;
  for (const auto& [latency, weight] : scratch_) {
    below += weight;
    if (below >= rank)
      return latency;
  }
  return scratch_.back().first;
}

scale_decision scaler_policy::evaluate(engine::nanos now) {
  const scale_decision d = decide(now);
  if (d.action == scale_action::hold)
    ++counts_[static_cast<std::size_t>(scale_action::hold)];
  return d;
}

scale_decision scaler_policy::decide(engine::nanos now) {
  scale_decision d{now, scale_action::hold, p95(now), replicas_, capacity_};
  if (in_cooldown(now) || change_pending()) {
    up_streak_ = down_streak_ = 0;
    return d;
  }
  // Below the floor (lost replicas): at low load no latency rule would
  // restore it, so it comes before the window and needs no samples. Not
  // while its spawns are refused and the latency asks for more: the
  // capacity grows first then, as above the floor (refused()).
  const bool grow_first =
      spawn_refused_ && capacity_ < config_.max_capacity_tokens;
  if (replicas_ < config_.min_replicas &&
      !(grow_first && weight_sum_ >= config_.min_samples &&
        d.p95 > config_.target)) {
    d.action = scale_action::spawn_replica;
    d.below_min = true;
    ++replicas_;
    ++replacements_;
    spawn_refused_ = false;
    cleared_refusal_ = false;
    return acted(d, now);
  }
  if (weight_sum_ < config_.min_samples) {
    up_streak_ = down_streak_ = 0;
    return d;
  }
  const auto low = engine::nanos{static_cast<std::int64_t>(
      config_.low_fraction * static_cast<double>(config_.target.count()))};
  if (d.p95 > config_.target) {
    ++up_streak_;
    down_streak_ = 0;
  } else if (d.p95 < low) {
    ++down_streak_;
    up_streak_ = 0;
  } else {
    up_streak_ = down_streak_ = 0;
  }
  if (up_streak_ >= config_.sustain) {
    // After a refused spawn, capacity first (refused()).
    if (replicas_ < config_.max_replicas && !grow_first) {
      d.action = scale_action::spawn_replica;
      ++replicas_;
      // A retire refused before (the last live engine) says nothing about
      // the grown fleet; should this spawn be refused too, it stands again
      // (refused()).
      spawn_refused_ = false;
      cleared_refusal_ = std::exchange(retire_refused_, false);
    } else if (capacity_ < config_.max_capacity_tokens) {
      d.action = scale_action::grow_capacity;
      // At least one token, so that a factor close to 1 on a small budget
      // still changes what the decision says it changed.
      capacity_ = static_cast<std::uint32_t>(std::min<double>(
          config_.max_capacity_tokens,
          std::max<double>(static_cast<double>(capacity_) + 1.0,
                           std::round(static_cast<double>(capacity_) *
                                      config_.grow_factor))));
    }
  } else if (down_streak_ >= config_.sustain) {
    const bool shrink_first =
        retire_refused_ && capacity_ > config_.min_capacity_tokens;
    if (replicas_ > config_.min_replicas && !shrink_first) {
      d.action = scale_action::retire_replica;
      --replicas_;
      // A retire frees what a refused spawn lacked (an engine slot, a
      // device): the next scale-up tries a spawn first again (unless this
      // retire is refused too: refused()).
      retire_refused_ = false;
      cleared_refusal_ = std::exchange(spawn_refused_, false);
    } else if (capacity_ > config_.min_capacity_tokens) {
      d.action = scale_action::shrink_capacity;
      capacity_ = static_cast<std::uint32_t>(std::max<double>(
          config_.min_capacity_tokens,
          std::min<double>(static_cast<double>(capacity_) - 1.0,
                           std::round(static_cast<double>(capacity_) *
                                      config_.shrink_factor))));
    }
  }
  if (d.action != scale_action::hold)
    return acted(d, now);
  return d;
}

scale_decision scaler_policy::acted(scale_decision d, engine::nanos now) {
  d.replicas = replicas_;
  d.capacity_tokens = capacity_;
  last_action_ = now;
  acted_ = true;
  clear_window();
  ++counts_[static_cast<std::size_t>(d.action)];
  if (log_.size() >= max_log)
    log_.pop_front();
  log_.push_back(d);
  return d;
}

void scaler_policy::change_done(engine::nanos now, bool took_effect) noexcept {
  if (changes_pending_ > 0)
    --changes_pending_;
  if (!took_effect)
    return;
  last_action_ = std::max(last_action_, now);
  acted_ = true;
  clear_window();
}

void scaler_policy::clear_window() noexcept {
  up_streak_ = down_streak_ = 0;
  samples_.clear();
  weight_sum_ = 0;
  stride_ = 1;
}

} // namespace kvfleet::actors
