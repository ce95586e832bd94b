#pragma once
/// scoped_value: gives a variable a value for the lifetime of a scope and
/// puts back the one it had when the scope ends (also on an early return),
/// for the store's flags that say what a call is in the middle of.
/// Not copyable or movable. Not thread-safe: the variable is the owner's.

#include <utility>

namespace kvfleet::engine::internal {

template <class T> class scoped_value {
public:
  scoped_value(T& var, T value) : var_(var), old_(std::exchange(var, value)) {}
  ~scoped_value() { var_ = std::move(old_); }
  scoped_value(const scoped_value&) = delete;
  scoped_value& operator=(const scoped_value&) = delete;

private:
  T& var_;
  T old_;
};

} // namespace kvfleet::engine::internal
