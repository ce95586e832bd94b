#include "actors/scaler_policy.hpp"

#include "actors/config_checks.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

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
  if (c.min_capacity_tokens > c.max_capacity_tokens)
    return make_error(errc::invalid_argument,
                      "scaler_config.min_capacity_tokens (" +
                          std::to_string(c.min_capacity_tokens) +
                          ") is above max_capacity_tokens (" +
                          std::to_string(c.max_capacity_tokens) + ")");
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

void scaler_policy::record(engine::nanos now, engine::nanos latency) {
  samples_.emplace_back(now, latency);
  trim(now);
}

void scaler_policy::trim(engine::nanos now) {
  while (!samples_.empty() && samples_.front().first + config_.window < now)
    samples_.pop_front();
}

engine::nanos scaler_policy::p95(engine::nanos now) {
  trim(now);
  if (samples_.empty())
    return engine::nanos{0};
  scratch_.clear();
  for (const auto& s : samples_)
    scratch_.push_back(s.second);
  // Nearest rank: the smallest sample with at least 95% at or below it.
  auto rank = static_cast<std::size_t>(
      std::ceil(0.95 * static_cast<double>(scratch_.size())));
  rank = std::max<std::size_t>(rank, 1) - 1;
  std::nth_element(scratch_.begin(),
                   scratch_.begin() + static_cast<std::ptrdiff_t>(rank),
                   scratch_.end());
  return scratch_[rank];
}

scale_decision scaler_policy::evaluate(engine::nanos now) {
  scale_decision d{now, scale_action::hold, p95(now), replicas_, capacity_};
  if (in_cooldown(now)) {
    up_streak_ = down_streak_ = 0;
    return d;
  }
  // Below the floor (lost replicas): at low load no latency rule would
  // restore it, so it comes before the window and needs no samples.
  if (replicas_ < config_.min_replicas) {
    d.action = scale_action::spawn_replica;
    d.below_min = true;
    ++replicas_;
    ++replacements_;
    return acted(d, now);
  }
  if (samples_.size() < config_.min_samples) {
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
    if (replicas_ < config_.max_replicas) {
      d.action = scale_action::spawn_replica;
      ++replicas_;
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
    if (replicas_ > config_.min_replicas) {
      d.action = scale_action::retire_replica;
      --replicas_;
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
  up_streak_ = down_streak_ = 0;
  samples_.clear();
  ++counts_[static_cast<std::size_t>(d.action)];
  if (log_.size() >= max_log)
    log_.pop_front();
  log_.push_back(d);
  return d;
}

} // namespace kvfleet::actors
