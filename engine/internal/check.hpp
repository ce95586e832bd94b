#pragma once
// Always-on invariant checks: a broken invariant is a bug, so it logs where
// and aborts instead of limping on with corrupted state.

#include <cstdio>
#include <cstdlib>

#define KVFLEET_CHECK(cond, what)                                              \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "kvfleet: invariant broken at %s:%d: %s (%s)\n",    \
                   __FILE__, __LINE__, what, #cond);                           \
      std::abort();                                                            \
    }                                                                          \
  } while (false)
