#include "engine/testing/heap_probe.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <new>

namespace {
thread_local bool counting = false;
thread_local bool failing = false;
thread_local std::size_t allocations = 0;
thread_local std::size_t fail_at = 0;

/// Sets `flag` for its lifetime, so an exception leaves it cleared.
class raised {
public:
  explicit raised(bool& flag) : flag_(flag) { flag_ = true; }
  ~raised() { flag_ = false; }
  raised(const raised&) = delete;
  raised& operator=(const raised&) = delete;

private:
  bool& flag_;
};
} // namespace

void* operator new(std::size_t n) {
  if (failing && allocations++ == fail_at)
    throw std::bad_alloc();
  if (counting)
    ++allocations;
  if (void* p = std::malloc(n == 0 ? 1 : n))
    return p;
  throw std::bad_alloc();
}
// Not inlined: GCC would otherwise see free() of what operator new returned
// and warn of a mismatch (-Wmismatched-new-delete), though both use malloc.
[[gnu::noinline]] void operator delete(void* p) noexcept {
  std::free(p);
}
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}

namespace kvfleet::engine::testing {

std::size_t heap_allocations_in(const std::function<void()>& f) {
  allocations = 0;
  {
    raised on{counting};
    f();
  }
  return allocations;
}

bool failing_allocation(std::size_t nth, const std::function<void()>& f) {
  allocations = 0;
  fail_at = nth;
  {
    raised on{failing};
    f();
  }
  return allocations > nth;
}

bool cap_address_space_at(std::size_t headroom) {
  std::size_t pages = 0;
  std::ifstream("/proc/self/statm") >> pages;
  const rlimit lim{pages * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)) +
                       headroom,
                   RLIM_INFINITY};
  return ::setrlimit(RLIMIT_AS, &lim) == 0;
}

} // namespace kvfleet::engine::testing
