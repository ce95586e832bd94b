#pragma once
/// Batch accumulation for one engine: a batch closes at `max_size` requests
/// (default 20), at `max_tokens` prompt tokens (0 = no token limit), or
/// `timeout` (default 100 ms) after its oldest request arrived (one left
/// over from the last batch counts from its own arrival), whichever
/// comes first; the engine actor also closes it when it has no more queued
/// requests to add (`close_when_idle`, on by default). Higher priorities leave
/// first (lane_queue). The actor wrapper owns the timer; this class only
/// decides. Not thread-safe: owned by one actor.

#include "actors/lane_queue.hpp"
#include "engine/clock.hpp"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace kvfleet::actors {

struct batch_config {
  std::size_t max_size = 20;
  engine::nanos timeout = std::chrono::milliseconds{100};
  /// Also close a batch once the engine actor has read every message that
  /// reached it before the batch opened (a marker it sends itself), so a
  /// request on an idle engine runs at once instead of waiting out
  /// `timeout`; under load, batches still fill from the mailbox up to
  /// max_size. A batch that reaches max_size waits for that marker too, so
  /// every request queued by then is ranked with it: the batch takes the
  /// highest priorities of all of them (at most max_size; the rest run in
  /// the batches right after), and a normal request queued behind
  /// max_size background ones is not left for the next batch. Off: a batch
  /// closes at max_size or at timeout only, and a host thread that sends one
  /// request at a time waits `timeout` for each (10 requests/s through
  /// node::process_request; about 50k with it on). With max_size 1 the
  /// engine actor takes it as on whatever it says: each batch is full at
  /// its first request, and closing it at once would run requests in the
  /// order they came, past the lanes.
  bool close_when_idle = true;
};

template <class T> class batch_accumulator {
public:
  explicit batch_accumulator(batch_config config, std::uint64_t max_tokens = 0)
      : config_(config), max_tokens_(max_tokens) {
    if (config_.max_size == 0)
      config_.max_size = 1;
  }

  /// Adds one request of `tokens` prompt tokens that arrived at `arrived`
  /// (the caller's clock). Returns true when a batch is now full (close it
  /// now). When it opened a new batch, take_opened() turns true once and
  /// the caller arms a timer for the batch's deadline() tagged with
  /// generation().
  bool add(engine::priority prio, T item, std::uint64_t tokens = 0,
           engine::nanos arrived = engine::nanos{0}) {
    if (queue_.empty()) {
      ++generation_;
      opened_ = true;
    }
    queue_.push(prio, slot{std::move(item), tokens, arrived});
    pending_tokens_ += tokens;
    return full();
  }

  /// When the current batch must close: `timeout` after its oldest
  /// request arrived (a request left over from the last batch keeps its
  /// arrival, so that batch closes `timeout` after it came, not a second
  /// timeout from the last close; the request itself may be left over
  /// again when higher priorities fill the token budget, and the batches
  /// after then close at once until it runs); nullopt when nothing is
  /// pending.
  [[nodiscard]] std::optional<engine::nanos> deadline() const {
    const auto oldest =
        queue_.min_front([](const slot& s) { return s.arrived; });
    if (!oldest)
      return std::nullopt;
    return *oldest + config_.timeout;
  }

  /// Whether the pending requests make a full batch.
  [[nodiscard]] bool full() const noexcept {
    return queue_.size() >= config_.max_size ||
           (max_tokens_ > 0 && pending_tokens_ >= max_tokens_);
  }

  /// True once after a batch opened (consumes the flag).
  bool take_opened() noexcept { return std::exchange(opened_, false); }

  /// Whether a timer tagged `gen` still closes the current batch (a batch
  /// that closed early has a newer generation, so its timer is ignored).
  [[nodiscard]] bool timer_current(std::uint64_t gen) const noexcept {
    return gen == generation_ && !queue_.empty();
  }

  /// Closes the batch: takes up to max_size requests and max_tokens tokens
  /// (at least one request), highest priority first. Requests left over
  /// open the next batch (take_opened() turns true: re-arm the timer).
  std::vector<T> take() {
    std::vector<T> out;
    out.reserve(std::min(queue_.size(), config_.max_size));
    std::uint64_t tokens = 0;
    while (out.size() < config_.max_size) {
      const slot* next = queue_.peek();
      if (next == nullptr)
        break;
      if (max_tokens_ > 0 && !out.empty() &&
          tokens + next->tokens > max_tokens_)
        break;
      tokens += next->tokens;
      pending_tokens_ -= next->tokens;
      out.push_back(std::move(queue_.pop()->item));
    }
    ++generation_;
    opened_ = !queue_.empty();
    return out;
  }

  /// Takes out every request for which `pred(item)` holds
  /// (lane_queue::remove_if): requests past their deadline, which a full
  /// batch of higher priorities would otherwise leave queued for as long
  /// as they keep coming. The batch stays open (its timer is ignored once
  /// nothing is pending: timer_current).
  template <class Pred> std::vector<T> take_if(Pred pred) {
    auto slots = queue_.remove_if(
        [&](const slot& s) { return pred(std::as_const(s.item)); });
    std::vector<T> out;
    out.reserve(slots.size());
    for (auto& s : slots) {
      pending_tokens_ -= s.tokens;
      out.push_back(std::move(s.item));
    }
    return out;
  }

  void set_max_tokens(std::uint64_t max_tokens) noexcept {
    max_tokens_ = max_tokens;
  }
  [[nodiscard]] std::size_t pending() const noexcept { return queue_.size(); }
  /// The highest priority pending; nullopt when none is.
  [[nodiscard]] std::optional<engine::priority> top_priority() const noexcept {
    return queue_.top();
  }
  [[nodiscard]] std::uint64_t generation() const noexcept {
    return generation_;
  }
  [[nodiscard]] const batch_config& config() const noexcept { return config_; }

private:
  struct slot {
    T item;
    std::uint64_t tokens = 0;
    engine::nanos arrived{0};
  };
  batch_config config_;
  std::uint64_t max_tokens_;
  lane_queue<slot> queue_;
  std::uint64_t pending_tokens_ = 0;
  std::uint64_t generation_ = 0;
  bool opened_ = false;
};

} // namespace kvfleet::actors
