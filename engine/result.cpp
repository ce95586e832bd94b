#include "engine/result.hpp"

#include "engine/host_error.hpp"

#include <cxxabi.h>

#include <exception>

namespace kvfleet {

std::string_view to_string(errc code) noexcept {
  switch (code) {
  case errc::ok:
    return "ok";
  case errc::invalid_argument:
    return "invalid_argument";
  case errc::unknown_namespace:
    return "unknown_namespace";
  case errc::misaligned_tokens:
    return "misaligned_tokens";
  case errc::value_too_large:
    return "value_too_large";
  case errc::unknown_codec:
    return "unknown_codec";
  case errc::wrong_value_size:
    return "wrong_value_size";
  case errc::zero_capacity:
    return "zero_capacity";
  case errc::namespace_conflict:
    return "namespace_conflict";
  case errc::unknown_policy:
    return "unknown_policy";
  case errc::double_commit:
    return "double_commit";
  case errc::commit_after_abort:
    return "commit_after_abort";
  case errc::invalid_handle:
    return "invalid_handle";
  case errc::not_found:
    return "not_found";
  case errc::not_written:
    return "not_written";
  case errc::busy:
    return "busy";
  case errc::timeout:
    return "timeout";
  case errc::out_of_memory:
    return "out_of_memory";
  case errc::no_evictable_block:
    return "no_evictable_block";
  case errc::unavailable:
    return "unavailable";
  case errc::checksum_mismatch:
    return "checksum_mismatch";
  case errc::parse_error:
    return "parse_error";
  case errc::io_error:
    return "io_error";
  case errc::backend_error:
    return "backend_error";
  }
  return "unknown_error";
}

std::string error::describe() const {
  std::string out(to_string(code));
  if (!message.empty()) {
    out += ": ";
    out += message;
  }
  return out;
}

error current_exception_error(std::string_view context) {
  std::string message(context);
  message += ": ";
  try {
    throw;
  } catch (const std::bad_alloc&) {
    return error{errc::out_of_memory, message + "out of host memory"};
  } catch (const std::exception& ex) {
    return error{errc::backend_error, message + ex.what()};
  } catch (abi::__forced_unwind&) {
    throw; // the thread is being cancelled: let it unwind
  } catch (...) {
    return error{errc::backend_error,
                 message + "an exception not derived from std::exception"};
  }
}

} // namespace kvfleet
