#pragma once
/// Error values for exceptions thrown by host code (factories, producers,
/// callbacks) that kvfleet calls where it promises error values.

#include "engine/result.hpp"

#include <string_view>

namespace kvfleet {
/// The error value for the exception being handled (call it in a catch
/// block, around host code that may throw: a factory, a producer, a
/// callback): errc::out_of_memory for std::bad_alloc, else
/// errc::backend_error; the message is "<context>: " and the exception's
/// what() ("an exception not derived from std::exception" for others;
/// "out of host memory" for bad_alloc). A thread cancellation's forced
/// unwind is rethrown, not turned into a value.
[[nodiscard]] error current_exception_error(std::string_view context);

} // namespace kvfleet
