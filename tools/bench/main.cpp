// kvfleet-bench: see tools/bench/README.md.
#include "tools/bench/app.hpp"
#include "tools/bench/interrupt.hpp"

#include <signal.h>
#include <unistd.h>

#include <iostream>
#include <string_view>
#include <vector>

namespace {

extern "C" void on_stop_signal(int signal) {
  kvfleet::bench::request_interrupt(signal);
}

// SIGINT and SIGTERM stop the replay at the next request, so that the run
// removes its --disk-dir subdirectory on the way out. Once: a second
// signal finds the default action again and ends the process at once. A
// signal ignored at startup (a background job's SIGINT) stays ignored.
void install_stop_handlers() {
  for (const int signal : {SIGINT, SIGTERM}) {
    struct sigaction old {};
    if (::sigaction(signal, nullptr, &old) == 0 && old.sa_handler == SIG_IGN)
      continue;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    ::sigemptyset(&sa.sa_mask);
    sa.sa_flags = static_cast<int>(SA_RESETHAND);
    ::sigaction(signal, &sa, nullptr);
  }
}

} // namespace

int main(int argc, char** argv) {
  install_stop_handlers();
  // A closed stdout (`kvfleet-bench ... | head -c0`) makes the write fail,
  // so the run exits 1 with a message instead of dying of SIGPIPE.
  ::signal(SIGPIPE, SIG_IGN);
  std::vector<std::string_view> args;
  for (int i = 1; i < argc; ++i)
    args.emplace_back(argv[i]);
  return kvfleet::bench::run_app(args, std::cout, std::cerr,
                                 ::isatty(STDERR_FILENO) == 1);
}
