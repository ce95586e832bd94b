#pragma once
/// Checks shared by the actors' validate() functions for the durations and
/// factors in their configurations. No CAF.
///
/// A duration is bounded above as well as below: a timer is armed at the
/// clock's reading plus the duration, in nanoseconds, so a value near the
/// type's limit (`std::chrono::milliseconds::max()` written to mean "no
/// timeout") would wrap into the past and fire at once, the opposite of
/// what was asked. The bounds are far beyond any sensible setting.

#include "engine/result.hpp"

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <ratio>
#include <string>
#include <string_view>
#include <type_traits>

namespace kvfleet::actors {

/// The longest timeout, interval, window or cooldown a configuration takes.
inline constexpr std::chrono::hours max_config_duration{24};

namespace detail {

template <class Period> constexpr const char* unit_suffix() {
  if constexpr (std::is_same_v<Period, std::nano>)
    return " ns";
  else if constexpr (std::is_same_v<Period, std::micro>)
    return " us";
  else if constexpr (std::is_same_v<Period, std::milli>)
    return " ms";
  else if constexpr (std::is_same_v<Period, std::ratio<1>>)
    return " s";
  else
    return " ticks";
}

inline std::string hours_text(std::chrono::hours h) {
  return std::to_string(h.count()) + " h";
}

/// `x` in at most 6 significant digits, "nan" and "inf" included.
inline std::string number_text(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

} // namespace detail

/// errc::invalid_argument naming `option` unless 0 < `value` <= `max`
/// (0 <= `value` when `zero_ok`).
template <class Rep, class Period>
[[nodiscard]] result<void>
check_duration(std::string_view option,
               std::chrono::duration<Rep, Period> value, bool zero_ok = false,
               std::chrono::hours max = max_config_duration) {
  const bool low_ok = zero_ok ? value.count() >= 0 : value.count() > 0;
  // Compared in the finer of the two units: `max` converts to it exactly
  // and without overflow, and `value` is not converted.
  if (low_ok && value <= max)
    return {};
  return make_error(errc::invalid_argument,
                    std::string(option) + " must be " +
                        (zero_ok ? "at least 0" : "positive") +
                        " and at most " + detail::hours_text(max) + ", not " +
                        std::to_string(value.count()) +
                        detail::unit_suffix<Period>());
}

/// For check_range's `hi`: no upper bound (the value must still be finite).
inline constexpr double unbounded = std::numeric_limits<double>::infinity();

/// Whether an end of a range belongs to it.
enum class end_point : std::uint8_t { closed, open };

/// errc::invalid_argument naming `option` unless `value` lies between `lo`
/// and `hi` (each end in or out of the range as given; an infinite `hi`
/// leaves it unbounded above but still finite). NaN always fails.
[[nodiscard]] inline result<void> check_range(std::string_view option,
                                              double value, double lo,
                                              end_point lo_end, double hi,
                                              end_point hi_end) {
  const bool above = lo_end == end_point::closed ? value >= lo : value > lo;
  const bool below = std::isinf(hi)                ? std::isfinite(value)
                     : hi_end == end_point::closed ? value <= hi
                                                   : value < hi;
  if (above && below)
    return {};
  std::string want;
  if (std::isinf(hi))
    want = (lo_end == end_point::closed ? "finite and at least "
                                        : "finite and above ") +
           detail::number_text(lo);
  else
    want = std::string("in ") + (lo_end == end_point::closed ? "[" : "(") +
           detail::number_text(lo) + ", " + detail::number_text(hi) +
           (hi_end == end_point::closed ? "]" : ")");
  return make_error(errc::invalid_argument, std::string(option) + " must be " +
                                                want + ", not " +
                                                detail::number_text(value));
}

} // namespace kvfleet::actors
