#include "actors/caf_error.hpp"

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/make_message.hpp>
#include <caf/sec.hpp>

#include <string>

namespace kvfleet::actors {
namespace {

constexpr caf::atom_value kvfleet_category = caf::atom("kvfleet");

std::uint8_t pack(errc c) noexcept {
  auto v = static_cast<unsigned>(c);
  return static_cast<std::uint8_t>((v / 100U) * 32U + v % 100U);
}

errc unpack(std::uint8_t x) noexcept {
  return static_cast<errc>((x / 32U) * 100U + x % 32U);
}

} // namespace

caf::error to_caf_error(const kvfleet::error& e) {
  return caf::error{pack(e.code), kvfleet_category,
                    caf::make_message(e.message)};
}

bool is_timeout(const caf::error& e) noexcept {
  return e.category() == caf::atom("system") &&
         e.code() == static_cast<std::uint8_t>(caf::sec::request_timeout);
}

bool is_kvfleet_error(const caf::error& e) noexcept {
  return e.category() == kvfleet_category;
}

kvfleet::error from_caf_error(const caf::error& e) {
  if (!e)
    return kvfleet::error{errc::ok, {}};
  if (is_kvfleet_error(e)) {
    std::string text;
    const auto& ctx = e.context();
    if (ctx.size() == 1 && ctx.match_element<std::string>(0))
      text = ctx.get_as<std::string>(0);
    return kvfleet::error{unpack(e.code()), std::move(text)};
  }
  if (e.category() == caf::atom("system")) {
    auto s = static_cast<caf::sec>(e.code());
    switch (s) {
    case caf::sec::request_timeout:
      return kvfleet::error{errc::timeout, "request timed out"};
    case caf::sec::request_receiver_down:
      return kvfleet::error{errc::unavailable, "receiving actor is down"};
    case caf::sec::unexpected_message:
      return kvfleet::error{errc::invalid_argument, "unexpected message"};
    default:
      return kvfleet::error{errc::backend_error,
                            "actor system error " + caf::to_string(s)};
    }
  }
  return kvfleet::error{errc::backend_error,
                        "error " + std::to_string(e.code()) + " in category " +
                            caf::to_string(e.category())};
}

result<void> check_balancer(const caf::actor& balancer, const char* spawn_fn) {
  if (!balancer)
    return make_error(errc::invalid_argument,
                      std::string{spawn_fn} + ": the balancer is null");
  return {};
}

} // namespace kvfleet::actors
