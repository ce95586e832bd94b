#pragma once
// Asks a stop predicate (a signal handler's flag, behind a std::function)
// from a long loop often enough that a stop is seen within a fraction of a
// second, but not once per item: the loops it serves do a few hash or map
// operations per item, and a std::function call each time would show.

#include <cxxabi.h>

#include <cstddef>
#include <functional>
#include <new>
#include <stdexcept>

namespace kvfleet::engine {

/// What a stop predicate threw (a std::exception other than bad_alloc,
/// which passes as it is): the loop that asked it stops, and says so.
struct stop_check_failed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Asks `stop` (when set) whether to stop; anything it throws, bad_alloc
/// aside, is rethrown as stop_check_failed (what() of a std::exception,
/// else saying it was none), so the callers' error values cover it.
inline bool stop_asked(const std::function<bool()>& stop) {
  if (!stop)
    return false;
  try {
    return stop();
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    throw stop_check_failed(e.what());
  } catch (abi::__forced_unwind&) {
    throw; // the thread is being cancelled: let it unwind
  } catch (...) {
    throw stop_check_failed("an exception not derived from std::exception");
  }
}

/// How many items a long loop handles between two questions to `stop`.
inline constexpr std::size_t stop_poll_items = 4096;

class stop_poll {
public:
  /// `stop` (may be empty: never stops) must outlive the poll.
  explicit stop_poll(const std::function<bool()>& stop,
                     std::size_t every = stop_poll_items) noexcept
      : stop_(stop ? &stop : nullptr), every_(every == 0 ? 1 : every) {}

  /// True when `stop` said so. `done`, the items handled so far, must not
  /// decrease between calls; `stop` is asked at the first call and then
  /// whenever `done` has grown by `every` or more since it was last asked.
  /// What `stop` throws comes out as stop_asked() says.
  [[nodiscard]] bool stopped(std::size_t done) {
    if (stop_ == nullptr || done < next_)
      return false;
    next_ = done + every_;
    return stop_asked(*stop_);
  }

private:
  const std::function<bool()>* stop_;
  std::size_t every_;
  std::size_t next_ = 0;
};

} // namespace kvfleet::engine
