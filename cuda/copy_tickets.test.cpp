// The ticket check that copy_engine and host_tier run first in poll() and
// wait(); device-free (their own GPU tests check the calls).
#include "cuda/internal/copy_tickets.hpp"

#include <gtest/gtest.h>

namespace kvfleet::cuda {
namespace {

TEST(copy_tickets_test, a_ticket_never_issued_is_an_invalid_handle) {
  // next = 4: tickets 1, 2 and 3 were issued.
  for (const std::uint64_t t : {std::uint64_t{0}, std::uint64_t{4},
                                std::uint64_t{5}, ~std::uint64_t{0}}) {
    auto r = internal::check_issued(t, 4, "copy_engine::poll");
    ASSERT_FALSE(r) << t;
    EXPECT_EQ(r.error().code, errc::invalid_handle);
    EXPECT_NE(r.error().message.find("copy_engine::poll: ticket " +
                                     std::to_string(t) + " was never issued"),
              std::string::npos)
        << r.error().message;
    EXPECT_NE(r.error().message.find("tickets 1 to 3"), std::string::npos)
        << r.error().message;
  }
  for (const std::uint64_t t : {1U, 2U, 3U})
    EXPECT_TRUE(internal::check_issued(t, 4, "copy_engine::poll")) << t;
  auto none = internal::check_issued(1, 1, "host_tier::wait");
  ASSERT_FALSE(none);
  EXPECT_NE(none.error().message.find("none issued yet"), std::string::npos)
      << none.error().message;
}

} // namespace
} // namespace kvfleet::cuda
