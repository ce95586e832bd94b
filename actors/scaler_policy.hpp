#pragma once
/// The auto-scaler's state machine, without CAF.
///
/// Latency samples go into a sliding window (`window` of time). Every
/// evaluate(now) compares the window's p95 with the target:
///   p95 > target                 -> scale up: spawn a replica while fewer
///                                   than max_replicas run, else grow the
///                                   capacity x grow_factor (at most
///                                   max_capacity_tokens);
///   p95 < low_fraction x target  -> scale down: retire a replica while more
///                                   than min_replicas run, else shrink the
///                                   capacity x shrink_factor (at least
///                                   min_capacity_tokens);
///   otherwise                    -> hold.
/// A replica change the balancer refused turns the next ones to capacity
/// (refused()).
/// Before any of that, fewer than min_replicas replicas (engines the
/// balancer gave up after max_restarts, replica_lost(), or a fleet started
/// below it) -> spawn a replica, whatever the window holds: at low load no
/// latency rule would restore the floor. Cooldown applies to it too. The
/// one exception: after a refused spawn, while p95 is above the target and
/// the capacity below its cap, the capacity grows instead (a replacement
/// the factory cannot start would be decided again at every cooldown while
/// requests wait); at low latency or at the cap the replacement is tried
/// again.
/// Flapping is prevented three ways: the dead band between 0.3x and 1x the
/// target (hysteresis), a condition must hold for `sustain` consecutive
/// evaluations before it acts, and after any action nothing happens for
/// `cooldown` (the window is also cleared, so the next decision sees only
/// latencies measured after the change). A replica change takes effect
/// when the balancer answers it (a replica may take a while to open): while
/// one is unanswered (change_started()) every evaluation holds, and its
/// answer (change_done()) starts the cooldown again and clears the window.
/// A window with fewer than
/// `min_samples` samples holds (so with the default 20 an idle fleet keeps
/// its replicas; with 0 an empty window reads a p95 of 0, below the band,
/// and an idle fleet scales down). Every decision that acts is logged and
/// counted. Not thread-safe: owned by one actor.
///
/// The window keeps at most `max_samples` latencies, whatever the request
/// rate: past that it keeps a request with chance 1/2, then 1/4, ... (a
/// fixed-seed generator, so runs repeat), each kept latency weighing for
/// the requests it stands for, and p95 is taken over the weights. It is
/// exact while the window has held at most max_samples requests; after a
/// busier spell, once the requests in the window are down to
/// max_samples / 2 and the spell's samples have left it. `min_samples`
/// counts requests (window_requests()), estimated while it samples. Memory and
/// the cost of an evaluation stay bounded (before, 20 million samples took 586
/// MB and 1.9 s per p95).

#include "engine/clock.hpp"
#include "engine/result.hpp"

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <string_view>
#include <vector>

namespace kvfleet::actors {

struct scaler_config {
  engine::nanos target = std::chrono::milliseconds{500};
  double low_fraction = 0.3;
  engine::nanos window = std::chrono::seconds{30};
  engine::nanos cooldown = std::chrono::seconds{60};
  std::size_t min_samples = 20;
  std::uint32_t sustain = 2;
  std::uint32_t min_replicas = 1;
  std::uint32_t max_replicas = 4;
  double grow_factor = 1.5;
  double shrink_factor = 0.8;
  std::uint32_t min_capacity_tokens = 2048;
  std::uint32_t max_capacity_tokens = 16384;
};

/// errc::invalid_argument naming the option when `c` breaks an invariant:
/// a target or window that is not positive, a negative cooldown (each of
/// the three above 24 hours too), low_fraction outside [0, 1) (the band
/// below the target would reach above it), grow_factor not above 1 or
/// shrink_factor outside (0, 1) (a grow would shrink, a shrink grow),
/// sustain 0 (every evaluation would act), min_capacity_tokens of 0 (an
/// engine reads a budget of 0 as no limit, so shrinking to it would lift
/// the limit) or above max_capacity_tokens, min_replicas of 0 (the
/// balancer never retires its last live engine: the scaler would decide
/// that refused retire at every cooldown and never shrink the capacity)
/// or above max_replicas.
[[nodiscard]] result<void> validate(const scaler_config& c);
/// errc::invalid_argument naming `option` (the caller's name for it) when
/// `capacity_tokens` is outside [c.min_capacity_tokens,
/// c.max_capacity_tokens]: the scaler counts from the budget the engines
/// run with, so starting it elsewhere (clamped, say) would make the two
/// disagree from the first decision.
[[nodiscard]] result<void> validate_capacity(const scaler_config& c,
                                             std::uint32_t capacity_tokens,
                                             std::string_view option);
/// errc::invalid_argument naming `option` when a fleet starts with more
/// `replicas` than `c.max_replicas` (fewer than min_replicas is fine: the
/// scaler spawns up to it).
[[nodiscard]] result<void> validate_replicas(const scaler_config& c,
                                             std::uint32_t replicas,
                                             std::string_view option);

enum class scale_action : std::uint8_t {
  hold,
  spawn_replica,
  grow_capacity,
  retire_replica,
  shrink_capacity,
};
inline constexpr std::size_t scale_action_count = 5;
[[nodiscard]] std::string_view to_string(scale_action a) noexcept;

struct scale_decision {
  engine::nanos at{0};
  scale_action action = scale_action::hold;
  engine::nanos p95{0};
  std::uint32_t replicas = 0;        ///< after the action
  std::uint32_t capacity_tokens = 0; ///< after the action
  /// A spawn_replica restoring min_replicas, not driven by latency.
  bool below_min = false;
};

class scaler_policy {
public:
  /// A policy for `config` counting from `replicas` engines of
  /// `capacity_tokens`. Errors (errc::invalid_argument naming the option):
  /// validate(config)'s, then validate_capacity's, so a configuration from
  /// outside never aborts and the capacity is never silently clamped.
  [[nodiscard]] static result<scaler_policy>
  create(scaler_config config, std::uint32_t replicas,
         std::uint32_t capacity_tokens);

  /// Adds a request's latency, seen at `now`, to the window (in time order:
  /// a `now` earlier than the newest sample's takes its place, and leaves
  /// the window at its own time). Errors:
  /// errc::invalid_argument for a negative latency (nothing recorded: it
  /// would pull the p95 below every real one and retire replicas).
  [[nodiscard]] result<void> record(engine::nanos now, engine::nanos latency);
  /// Decides at `now`; an action is applied to replicas()/capacity_tokens()
  /// at once (the actor carries it out) and logged. Every decision is
  /// counted (count()), holds too; only actions are logged (log()).
  scale_decision evaluate(engine::nanos now);

  /// Requests in the window at `now` (each one a sample, or stood for by a
  /// kept sample: an estimate while it samples).
  [[nodiscard]] std::uint64_t window_requests(engine::nanos now);
  /// Latencies the window holds now (at most max_samples).
  [[nodiscard]] std::size_t kept_samples() const noexcept {
    return samples_.size();
  }
  /// p95 of the window at `now` (0 when empty).
  [[nodiscard]] engine::nanos p95(engine::nanos now);
  [[nodiscard]] std::uint32_t replicas() const noexcept { return replicas_; }
  [[nodiscard]] std::uint32_t capacity_tokens() const noexcept {
    return capacity_;
  }
  [[nodiscard]] bool in_cooldown(engine::nanos now) const noexcept {
    return acted_ && now < last_action_ + config_.cooldown;
  }
  [[nodiscard]] std::uint64_t count(scale_action a) const noexcept {
    return counts_[static_cast<std::size_t>(a)];
  }
  /// The most recent decisions that acted, oldest first: at most
  /// max_log of them, so a scaler that runs for months keeps its memory
  /// (count() keeps every one).
  [[nodiscard]] const std::deque<scale_decision>& log() const noexcept {
    return log_;
  }
  static constexpr std::size_t max_log = 1024;
  /// Latencies the window keeps at most (see the class comment).
  static constexpr std::size_t max_samples = 16384;
  /// The balancer refused (answered an error to) the replica change of
  /// action `a`, which evaluate() had already counted: undoes it, so
  /// replicas() stays what the balancer runs, and counts it in refusals().
  /// Cooldown and action counts stay. The next scale-up after a refused
  /// spawn grows the capacity instead (a factory that cannot start an
  /// engine, no device left, would otherwise be asked again at every
  /// cooldown while the capacity stayed put), and so does every one after
  /// it until the capacity is at max_capacity_tokens; then a spawn is tried
  /// again. A refused retire (the balancer keeps its last live engine) makes
  /// the next scale-downs shrink the capacity the same way. Either lasts
  /// until a replica change goes the other way (a spawn after a refused
  /// retire, a retire after a refused spawn), which changes what refused;
  /// unless that change is refused too, which leaves both standing.
  void refused(scale_action a) noexcept {
    ++refusals_;
    if (a == scale_action::spawn_replica && replicas_ > 0)
      --replicas_;
    else if (a == scale_action::retire_replica)
      ++replicas_;
    mark_refused(a);
  }
  /// The balancer refused the change of `a` after change_unanswered()
  /// counted it: the count is left to resync() (the balancer's stats say
  /// what it runs), but the next changes turn to the capacity as after any
  /// refusal (refused()). Before, a factory slow to fail was asked for a
  /// spawn at every cooldown.
  void refused_late(scale_action a) noexcept { mark_refused(a); }
  /// A replica left on its own (the balancer gave its engine up after its
  /// restarts): keeps the count honest, and counts it in losses().
  void replica_lost() noexcept {
    ++losses_;
    if (replicas_ > 0)
      --replicas_;
  }
  /// The balancer did not answer the replica change of an evaluate() in
  /// time. Unlike a refusal, it may still carry the change out (it may be
  /// slow, not unwilling), so the count stays until resync() sets it from
  /// the balancer's own; counted in unanswered().
  void change_unanswered() noexcept { ++unanswered_; }
  /// The replica change evaluate() just decided was sent to the balancer:
  /// evaluate() holds until it is answered (change_done()), also past the
  /// cooldown. Before, the cooldown ran from the decision alone: a replica
  /// slower to open than the cooldown left the next decisions reading
  /// latencies from before it served, and they spawned more.
  void change_started() noexcept { ++changes_pending_; }
  /// The balancer answered a change of change_started() at `now`. One that
  /// `took_effect` (a replica came up or left) starts the cooldown again
  /// from `now` and clears the window and streaks, so that the next
  /// decision sees only latencies measured since; a refused one does not.
  void change_done(engine::nanos now, bool took_effect) noexcept;
  [[nodiscard]] bool change_pending() const noexcept {
    return changes_pending_ > 0;
  }
  /// Sets replicas() to `replicas`, the engines the balancer says it keeps
  /// (after an unanswered change). Returns whether the count changed.
  bool resync(std::uint32_t replicas) noexcept {
    const bool changed = replicas != replicas_;
    replicas_ = replicas;
    return changed;
  }
  [[nodiscard]] std::uint64_t refusals() const noexcept { return refusals_; }
  [[nodiscard]] std::uint64_t unanswered() const noexcept {
    return unanswered_;
  }
  [[nodiscard]] std::uint64_t losses() const noexcept { return losses_; }
  /// Spawns decided to restore min_replicas (also in
  /// count(spawn_replica)).
  [[nodiscard]] std::uint64_t replacements() const noexcept {
    return replacements_;
  }

private:
  /// REQUIRES: validate(config) and validate_capacity(config,
  /// capacity_tokens) succeed; else a bug in this class (create checks
  /// first), logged before aborting.
  scaler_policy(scaler_config config, std::uint32_t replicas,
                std::uint32_t capacity_tokens);
  void trim(engine::nanos now);
  /// Halves the kept samples: each pair becomes one weighing for both.
  void thin();
  std::uint64_t next_random() noexcept;
  /// evaluate() before it counts a hold.
  scale_decision decide(engine::nanos now);
  /// Records `d`, an action evaluate() took at `now`: starts the cooldown,
  /// clears the window and streaks, counts and logs it.
  scale_decision acted(scale_decision d, engine::nanos now);

  scaler_config config_;
  std::uint32_t replicas_;
  std::uint32_t capacity_;
  struct sample {
    engine::nanos at;
    engine::nanos latency;
    std::uint64_t weight; ///< requests it stands for
  };
  std::deque<sample> samples_;
  std::uint64_t weight_sum_ = 0; ///< requests in the window
  std::uint64_t stride_ = 1;     ///< keep a request with chance 1/stride_
  std::uint64_t random_ = 0x6b76666c656574; ///< fixed seed
  std::vector<std::pair<engine::nanos, std::uint64_t>> scratch_;
  engine::nanos last_action_{0};
  bool acted_ = false;
  std::uint32_t up_streak_ = 0;
  std::uint32_t down_streak_ = 0;
  std::array<std::uint64_t, scale_action_count> counts_{};
  std::uint64_t refusals_ = 0;
  std::uint64_t losses_ = 0;
  /// The balancer refused the last spawn (retire): see refused().
  bool spawn_refused_ = false;
  bool retire_refused_ = false;
  /// The other way's refusal the last replica change cleared, which its own
  /// refusal restores.
  bool cleared_refusal_ = false;
  void mark_refused(scale_action a) noexcept {
    if (a == scale_action::spawn_replica) {
      spawn_refused_ = true;
      retire_refused_ = retire_refused_ || cleared_refusal_;
    } else if (a == scale_action::retire_replica) {
      retire_refused_ = true;
      spawn_refused_ = spawn_refused_ || cleared_refusal_;
    } else {
      return;
    }
    cleared_refusal_ = false;
  }
  std::uint64_t unanswered_ = 0;
  std::uint64_t replacements_ = 0;
  std::uint32_t changes_pending_ = 0; ///< change_started(), not yet done
  /// Empties the window and the streaks (after a change).
  void clear_window() noexcept;
  std::deque<scale_decision> log_;
};

} // namespace kvfleet::actors
