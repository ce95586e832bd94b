// kvfleet-bench: see tools/bench/README.md.
#include "tools/bench/app.hpp"

#include <unistd.h>

#include <iostream>
#include <string_view>
#include <vector>

int main(int argc, char** argv) {
  std::vector<std::string_view> args;
  for (int i = 1; i < argc; ++i)
    args.emplace_back(argv[i]);
  return kvfleet::bench::run_app(args, std::cout, std::cerr,
                                 ::isatty(STDERR_FILENO) == 1);
}
