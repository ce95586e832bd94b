#pragma once
/// The engine test binary's replacement of the global operator new (tests
/// only, heap_probe.test.cpp): it counts nothing and fails nothing unless a
/// test asks, and then only on that test's thread.

#include <cstddef>
#include <functional>

namespace kvfleet::engine::testing {

/// Heap allocations (calls of operator new) `f` makes on this thread.
std::size_t heap_allocations_in(const std::function<void()>& f);

/// Runs `f` with the `nth` call of operator new on this thread (0: the
/// first) throwing std::bad_alloc, as when memory runs out for one large
/// allocation; the calls before and after it succeed. Returns whether that
/// call came (f made more than `nth` allocations).
bool failing_allocation(std::size_t nth, const std::function<void()>& f);

/// Sets the soft address-space limit (RLIMIT_AS) `headroom` bytes above
/// what the process maps now, the hard limit unlimited; false when it
/// cannot. For a test's child process (a death test): every allocation past
/// the headroom then fails.
bool cap_address_space_at(std::size_t headroom);

/// Built with AddressSanitizer or ThreadSanitizer: they reserve address
/// space, so a cap (cap_address_space_at) breaks them.
inline constexpr bool address_space_sanitized =
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    true;
#else
    false;
#endif

} // namespace kvfleet::engine::testing

/// First line of a test that caps its child's address space: skips it
/// under the sanitizers.
#define KVFLEET_SKIP_IF_ADDRESS_SPACE_CANNOT_BE_CAPPED()                       \
  do {                                                                         \
    if (::kvfleet::engine::testing::address_space_sanitized)                   \
      GTEST_SKIP() << "the sanitizers reserve address space; RLIMIT_AS "       \
                      "breaks them";                                           \
  } while (false)
