#pragma once
/// A response promise that is answered even when its holder forgets it.
///
/// CAF 0.17 sends nothing for a response_promise destroyed undelivered: its
/// caller waits for its own timeout, or forever without one. An owed_reply
/// dropped while still pending (its actor stopped, was killed, or a batch
/// was cut short by an exception) answers request_receiver_down, which is
/// what CAF answers for a request still in a stopped actor's mailbox. So a
/// caller always hears back, and a balancer can reroute at once.

#include <utility>

#include <caf/response_promise.hpp>
#include <caf/sec.hpp>

namespace kvfleet::actors {

class owed_reply {
public:
  owed_reply() = default;
  explicit owed_reply(caf::response_promise p) : promise_(std::move(p)) {}
  owed_reply(owed_reply&&) noexcept = default;
  owed_reply& operator=(owed_reply&& other) noexcept {
    drop();
    promise_ = std::move(other.promise_);
    return *this;
  }
  owed_reply(const owed_reply&) = delete;
  owed_reply& operator=(const owed_reply&) = delete;
  ~owed_reply() { drop(); }

  [[nodiscard]] bool pending() const { return promise_.pending(); }

  template <class T> void deliver(T&& x) {
    promise_.deliver(std::forward<T>(x));
  }

private:
  void drop() {
    if (promise_.pending())
      promise_.deliver(caf::make_error(caf::sec::request_receiver_down));
  }

  caf::response_promise promise_;
};

} // namespace kvfleet::actors
