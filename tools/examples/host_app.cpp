// A host application using kvfleet in process: one engine per GPU (host
// memory where there is none), requests as chained block keys of their
// token ids, and the block calls. Exits 0 when the second request over the
// same prompt is served from cache; ctest runs it (example_host_app). It
// takes no arguments: -h/--help says what it does, anything else is a
// usage error (exit status 2).
#include "actors/node.hpp"
#include "cuda/backend_factory.hpp"
#include "cuda/memory_manager.hpp"
#include "engine/block_key.hpp"

#include <cstdint>
#include <cstdio>
#include <string_view>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

namespace {

constexpr const char* help_text =
    "kvfleet-example-host-app: the README's host application. Starts a node "
    "of\n"
    "two engines (one per GPU, host memory without one), sends the same "
    "64-token\n"
    "prompt twice and checks that the second is served from cache; prints "
    "each\n"
    "reply and each engine's stats. Exit status 0 when it was, 1 when not "
    "(or\n"
    "on an error), 2 for any argument but -h/--help.\n";

} // namespace

int main(int argc, char** argv) {
  // Before, every argument was ignored: `--help` or a typo ran the demo.
  if (argc == 2 && (std::string_view(argv[1]) == "-h" ||
                    std::string_view(argv[1]) == "--help")) {
    std::fputs("usage: kvfleet-example-host-app [-h | --help]\n", stdout);
    std::fputs(help_text, stdout);
    return 0;
  }
  if (argc > 1) {
    // The argument is not echoed: whatever it holds, this stays one line.
    std::fputs("kvfleet-example-host-app: takes no arguments (usage: "
               "kvfleet-example-host-app [-h | --help])\n",
               stderr);
    return 2;
  }
  caf::actor_system_config cfg;
  kvfleet::node::configure(cfg, 2); // scheduler.policy=sharing, 2 threads
  caf::actor_system sys{cfg};

  kvfleet::node_config c;
  c.engines = 2;
  // Route each prompt to the engine that holds its prefix (the index learns
  // it from each reply and the engines' block events), so the second
  // request below finds its blocks whichever engine the first went to.
  c.balancer.routing.policy = kvfleet::actors::routing_policy::kv_aware;
  c.engine.ns.model = "llama-3-8b";
  c.engine.ns.layers = 32;
  c.engine.ns.kv_heads = 8;
  c.engine.ns.head_dim = 128;
  c.engine.ns.block_tokens = 16; // 2 MiB of fp16 KV per block
  c.engine.store.capacity_bytes = std::size_t{256} << 20;
  c.engine.make_backend = kvfleet::cuda::device_backend_per_engine();
  // Under each GPU engine, 1 GiB of pinned host memory for cold blocks
  // (none under host memory).
  c.engine.make_tier =
      kvfleet::cuda::host_tier_per_engine({std::size_t{1} << 30});
  // Memory pressure: a GPU engine counts the whole device (cudaMemGetInfo)
  // and demotes to its tier before it evicts.
  auto relieve = kvfleet::cuda::device_memory_relief_per_engine();
  if (!relieve) {
    std::fprintf(stderr, "relief: %s\n", relieve.error().describe().c_str());
    return 1;
  }
  c.engine.relieve = std::move(*relieve);
  auto started = kvfleet::node::start(sys, c);
  if (!started) {
    std::fprintf(stderr, "start: %s\n", started.error().describe().c_str());
    return 1;
  }
  auto& node = **started;

  // A prompt of 64 token ids -> the keys of its 4 full blocks.
  std::vector<std::uint32_t> tokens(64);
  for (std::uint32_t i = 0; i < tokens.size(); ++i)
    tokens[i] = 1000 + i;
  kvfleet::actors::kv_request req;
  kvfleet::engine::chain_keys(c.engine.ns.fingerprint(),
                              c.engine.ns.block_tokens, tokens, req.keys);
  req.input_tokens = static_cast<std::uint32_t>(tokens.size());

  for (std::uint64_t id = 1; id <= 2; ++id) {
    req.id = id;
    auto reply = node.process_request(req);
    if (!reply) {
      std::fprintf(stderr, "request %llu: %s\n",
                   static_cast<unsigned long long>(id),
                   reply.error().describe().c_str());
      return 1;
    }
    std::printf("request %llu on engine %u: %llu tokens from cache, %llu "
                "computed\n",
                static_cast<unsigned long long>(id), reply->engine,
                static_cast<unsigned long long>(reply->matched_tokens),
                static_cast<unsigned long long>(reply->computed_tokens));
    if (id == 2 && reply->matched_tokens != tokens.size()) {
      std::fprintf(stderr,
                   "request 2: expected all %zu tokens from cache, got "
                   "%llu\n",
                   tokens.size(),
                   static_cast<unsigned long long>(reply->matched_tokens));
      return 1;
    }
  }
  for (std::uint32_t slot = 0; slot < c.engines; ++slot) {
    auto st = node.engine_stats(slot);
    if (!st) {
      std::fprintf(stderr, "engine %u stats: %s\n", slot,
                   st.error().describe().c_str());
      return 1;
    }
    std::printf("engine %u: %s memory, %llu blocks%s%s\n", slot,
                st->memory.c_str(), static_cast<unsigned long long>(st->blocks),
                st->tier.empty() ? "" : ", tier: ", st->tier.c_str());
  }
  return 0;
}
