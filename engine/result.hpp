#pragma once
/// Error values for all of kvfleet.
///
/// Expected failures are values: a function that can fail returns
/// `result<T>`, whose API is a subset of C++23 `std::expected<T, error>` so
/// that moving to C++23 is one alias. Error codes live in one enum, grouped in
/// ranges by kind. Thread safety: plain values, no shared state.

#include <cstdint>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

namespace kvfleet {

/// The project's one error enum. Ranges: 1xx bad input, 2xx state machine
/// misuse, 3xx resources, 4xx data integrity, 5xx parsing and I/O.
enum class errc : std::uint16_t {
  ok = 0,
  invalid_argument = 100,
  unknown_namespace = 101,
  misaligned_tokens = 102,
  value_too_large = 103,
  unknown_codec = 104,
  wrong_value_size = 105,
  zero_capacity = 106,
  namespace_conflict = 107,
  unknown_policy = 108,
  double_commit = 200,
  commit_after_abort = 201,
  invalid_handle = 202,
  not_found = 203,
  not_written = 204,
  busy = 205,
  timeout = 206,
  out_of_memory = 300,
  no_evictable_block = 301,
  unavailable = 302,
  checksum_mismatch = 400,
  parse_error = 500,
  io_error = 501,
  backend_error = 502,
};

/// Short stable name of an error code, e.g. "checksum_mismatch".
[[nodiscard]] std::string_view to_string(errc code) noexcept;

/// An error: a code for programs and a message for people.
struct error {
  errc code = errc::ok;
  std::string message;

  /// "code: message", for logs.
  [[nodiscard]] std::string describe() const;
};

template <class E> class unexpected {
public:
  explicit unexpected(E e) : value_(std::move(e)) {}
  [[nodiscard]] const E& value() const& noexcept { return value_; }
  [[nodiscard]] E&& value() && noexcept { return std::move(value_); }

private:
  E value_;
};

/// Makes an error value to return from a function returning `result<T>`.
[[nodiscard]] inline unexpected<error> make_error(errc code,
                                                  std::string message) {
  return unexpected<error>{error{code, std::move(message)}};
}

/// Either a T or an error.
template <class T> class [[nodiscard]] result {
public:
  using value_type = T;
  using error_type = ::kvfleet::error;

  result(T value) : state_(std::in_place_index<0>, std::move(value)) {}
  result(unexpected<::kvfleet::error> e)
      : state_(std::in_place_index<1>, std::move(e).value()) {}

  [[nodiscard]] bool has_value() const noexcept { return state_.index() == 0; }
  explicit operator bool() const noexcept { return has_value(); }

  [[nodiscard]] T& value() & { return std::get<0>(state_); }
  [[nodiscard]] const T& value() const& { return std::get<0>(state_); }
  [[nodiscard]] T&& value() && { return std::get<0>(std::move(state_)); }
  [[nodiscard]] T& operator*() & { return value(); }
  [[nodiscard]] const T& operator*() const& { return value(); }
  [[nodiscard]] T&& operator*() && { return std::move(*this).value(); }
  [[nodiscard]] T* operator->() { return &value(); }
  [[nodiscard]] const T* operator->() const { return &value(); }

  [[nodiscard]] const ::kvfleet::error& error() const& {
    return std::get<1>(state_);
  }
  [[nodiscard]] T value_or(T fallback) const& {
    return has_value() ? value() : std::move(fallback);
  }

private:
  std::variant<T, ::kvfleet::error> state_;
};

/// `result<void>`: success or an error.
template <> class [[nodiscard]] result<void> {
public:
  using value_type = void;
  using error_type = ::kvfleet::error;

  result() = default;
  result(unexpected<::kvfleet::error> e)
      : error_(std::move(e).value()), ok_(false) {}

  [[nodiscard]] bool has_value() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  void value() const noexcept {}
  [[nodiscard]] const ::kvfleet::error& error() const& { return error_; }

private:
  ::kvfleet::error error_;
  bool ok_ = true;
};

} // namespace kvfleet
