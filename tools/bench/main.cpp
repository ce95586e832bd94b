// kvfleet-bench: see tools/bench/README.md.
#include "tools/bench/app.hpp"
#include "tools/bench/interrupt.hpp"

#include <signal.h>
#include <unistd.h>

#include <iostream>
#include <string_view>
#include <vector>

// SIGINT and SIGTERM stop the replay at the next request, so that the run
// removes its --disk-dir subdirectory on the way out; a second signal ends
// the process at once (install_stop_handlers).
int main(int argc, char** argv) {
  kvfleet::bench::install_stop_handlers();
  // A closed stdout (`kvfleet-bench ... | head -c0`) makes the write fail,
  // so the run exits 1 with a message instead of dying of SIGPIPE.
  ::signal(SIGPIPE, SIG_IGN);
  std::vector<std::string_view> args;
  for (int i = 1; i < argc; ++i)
    args.emplace_back(argv[i]);
  return kvfleet::bench::run_app(args, std::cout, std::cerr,
                                 ::isatty(STDERR_FILENO) == 1);
}
