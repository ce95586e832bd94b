// kvfleet-actors-bench: in-process request/reply throughput through the
// balancer and an engine actor (the bar: >= 150,000 requests/s on 2 cores
// with scheduler.policy=sharing), with direct requests to the engine actor
// measured in the same run as the baseline.
//
// A driver actor keeps `window` requests in flight; each request is one
// cached 16-token block, so the engine does a real prefix lookup and lease
// but little copying. Prints the median of the repetitions.
//
// The driver sets no timeout of its own on a request: the balancer answers
// every request (its own request_timeout, or request_receiver_down when it
// stops), so a host actor needs none. A CAF request timeout wakes CAF's
// clock thread at every request; the line "caller's own timer" measures the
// balancer with a driver that sets one (10 s) anyway.
//
// The fourth line measures an engine actor whose store is full (`full_blocks`
// blocks of 4 KiB, default 262,144 = 1 GiB) while every request brings a new
// block, so every request computes, stores and evicts one block: what an
// engine's bookkeeping of stored and evicted blocks costs per request when
// the store is large.
//
// The last lines measure the blocking host API, node::process_request,
// from one host thread sending one request at a time, and the same request
// from a host thread that makes a caf::scoped_actor and sets a CAF timeout
// per call (what node calls did before they reused their actors).
//
// Usage: kvfleet-actors-bench [threads=2] [seconds_per_rep=1] [reps=5]
//                             [full_blocks=262144]
#include "actors/balancer_actor.hpp"
#include "actors/engine_actor.hpp"
#include "actors/messages.hpp"
#include "actors/node.hpp"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scoped_actor.hpp>

namespace {

using namespace kvfleet;
using namespace kvfleet::actors;
using clk = std::chrono::steady_clock;

engine_actor_config bench_engine() {
  engine_actor_config c;
  c.ns.model = "bench";
  c.ns.layers = 1;
  c.ns.kv_heads = 1;
  c.ns.head_dim = 64;
  c.ns.block_tokens = 16;
  c.store.capacity_bytes = 16u << 20;
  c.store.adaptive_compression = false;
  // The batcher keeps its defaults: up to 20 requests, closed when the
  // actor has read what was queued (close_when_idle) or after 100 ms.
  return c;
}

struct driver_result {
  std::uint64_t done = 0;
  std::uint64_t errors = 0;
};

struct drive_ctx {
  caf::actor dest;
  std::size_t window = 0;
  std::uint64_t keyspace = 1; ///< 0: every request a new key
  std::uint64_t first_key = 1;
  caf::duration timeout; ///< the caller's own timer; infinite: none
  std::shared_ptr<std::atomic<bool>> stop;
  std::shared_ptr<driver_result> out;
};

void issue(caf::event_based_actor* self, const std::shared_ptr<drive_ctx>& ctx,
           std::uint64_t i) {
  kv_request req;
  req.id = i;
  req.keys = {ctx->keyspace == 0 ? engine::block_key{2, ctx->first_key + i}
                                 : engine::block_key{1, 1 + i % ctx->keyspace}};
  req.input_tokens = 16;
  self->request(ctx->dest, ctx->timeout, process_atom::value, std::move(req))
      .then(
          [=](const kv_reply&) {
            ++ctx->out->done;
            if (!ctx->stop->load(std::memory_order_relaxed))
              issue(self, ctx, i + ctx->window);
          },
          [=](caf::error&) { ++ctx->out->errors; });
}

/// Keeps `window` requests in flight at `dest` until `stop` is set.
void drive(caf::event_based_actor* self, std::shared_ptr<drive_ctx> ctx) {
  for (std::size_t i = 0; i < ctx->window; ++i)
    issue(self, ctx, i);
}

double measure(caf::actor_system& sys, const caf::actor& dest, double seconds,
               std::size_t window, std::uint64_t keyspace = 64,
               caf::duration timeout = caf::infinite) {
  // New keys never repeat across calls.
  static std::uint64_t next_first_key = 1;
  auto stop = std::make_shared<std::atomic<bool>>(false);
  auto out = std::make_shared<driver_result>();
  auto start = clk::now();
  auto ctx = std::make_shared<drive_ctx>(
      drive_ctx{dest, window, keyspace, next_first_key, timeout, stop, out});
  next_first_key += std::uint64_t{1} << 32;
  auto d = sys.spawn(drive, ctx);
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop->store(true);
  auto elapsed = std::chrono::duration<double>(clk::now() - start).count();
  // Let the window drain before the next repetition.
  caf::scoped_actor self{sys};
  self->wait_for(d);
  return static_cast<double>(out->done) / elapsed;
}

/// Calls `call(i)` from this thread for `seconds`; calls per second.
template <class Call> double measure_calls(double seconds, Call&& call) {
  std::uint64_t done = 0;
  const auto start = clk::now();
  const auto until = start + std::chrono::duration_cast<clk::duration>(
                                 std::chrono::duration<double>(seconds));
  while (clk::now() < until)
    call(done++);
  const auto elapsed =
      std::chrono::duration<double>(clk::now() - start).count();
  return static_cast<double>(done) / elapsed;
}

kv_request host_request(std::uint64_t i) {
  kv_request req;
  req.id = i;
  req.input_tokens = 16;
  req.keys = {engine::block_key{1, 1 + i % 64}};
  return req;
}

/// node::process_request from one host thread, one request at a time
/// (the blocking host API, on one of the node's reused blocking actors).
double measure_node(node& n, double seconds) {
  return measure_calls(seconds, [&](std::uint64_t i) {
    if (auto rep = n.process_request(host_request(i)); !rep) {
      std::fprintf(stderr, "node: %s\n", rep.error().describe().c_str());
      std::exit(1);
    }
  });
}

/// The same requests from one host thread with a fresh scoped_actor and a
/// CAF request timeout (30 s, node_config's call_timeout) per call.
double measure_fresh_actor(caf::actor_system& sys, const caf::actor& balancer,
                           double seconds) {
  return measure_calls(seconds, [&](std::uint64_t i) {
    caf::scoped_actor self{sys};
    self->request(balancer, caf::duration{std::chrono::seconds{30}},
                  process_atom::value, host_request(i))
        .receive([](const kv_reply&) {},
                 [](caf::error& e) {
                   std::fprintf(stderr, "fresh actor: %s\n",
                                to_string(e).c_str());
                   std::exit(1);
                 });
  });
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

constexpr const char* usage =
    "usage: kvfleet-actors-bench [threads=2] [seconds_per_rep=1] [reps=5] "
    "[full_blocks=262144]\n";

/// Argument `i` as a number in [lo, hi], `fallback` when absent; exits
/// with a message naming the argument otherwise.
template <class T>
T arg(int argc, char** argv, int i, const char* name, T fallback, T lo, T hi) {
  if (argc <= i)
    return fallback;
  const char* s = argv[i];
  const char* end = s + std::strlen(s);
  T value{};
  auto [ptr, ec] = std::from_chars(s, end, value);
  if (ec != std::errc{} || ptr != end || value < lo || value > hi) {
    std::fprintf(
        stderr,
        "kvfleet-actors-bench: %s must be a number from %.10g to %.10g, "
        "not '%s'\n%s",
        name, static_cast<double>(lo), static_cast<double>(hi), s, usage);
    std::exit(2);
  }
  return value;
}

} // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--help") == 0 ||
        std::strcmp(argv[i], "-h") == 0) {
      std::fputs(usage, stdout);
      return 0;
    }
  if (argc > 5) {
    std::fputs(usage, stderr);
    return 2;
  }
  const auto threads = arg<std::size_t>(argc, argv, 1, "threads", 2, 1, 256);
  const auto seconds =
      arg<double>(argc, argv, 2, "seconds_per_rep", 1.0, 0.01, 3600.0);
  const auto reps = arg<int>(argc, argv, 3, "reps", 5, 1, 1000);
  const auto full_blocks = arg<std::size_t>(argc, argv, 4, "full_blocks",
                                            262'144, 1, std::size_t{1} << 26);
  const std::size_t window = 64;
  caf::actor_system_config cfg;
  node::configure(cfg, threads);
  caf::actor_system sys{cfg};
  auto engine = spawn_engine_actor(sys, bench_engine());
  if (!engine) {
    std::fprintf(stderr, "engine: %s\n", engine.error().describe().c_str());
    return 1;
  }
  balancer_config bc;
  bc.initial_engines = 1;
  bc.routing.policy = routing_policy::least_loaded;
  auto spawned =
      spawn_balancer(sys, bc, [](caf::actor_system& s, std::uint32_t slot) {
        auto c = bench_engine();
        c.slot = slot;
        return started_now(spawn_engine_actor(s, c));
      });
  if (!spawned) {
    std::fprintf(stderr, "balancer: %s\n", spawned.error().describe().c_str());
    return 1;
  }
  const caf::actor balancer = std::move(*spawned);
  auto full_config = bench_engine();
  full_config.store.capacity_bytes = full_blocks * 4096;
  full_config.store.slab_bytes = std::size_t{1} << 20;
  auto full = spawn_engine_actor(sys, full_config);
  if (!full) {
    std::fprintf(stderr, "engine: %s\n", full.error().describe().c_str());
    return 1;
  }
  node_config nc;
  nc.engines = 1;
  nc.engine = bench_engine();
  nc.query_cache = false;
  auto host = node::start(sys, nc);
  if (!host) {
    std::fprintf(stderr, "node: %s\n", host.error().describe().c_str());
    return 1;
  }
  // Warm both paths (fills the caches with the 64 keys) and fill the full
  // engine's store: enough new blocks to pass its capacity once.
  measure(sys, *engine, 0.2, window);
  measure(sys, balancer, 0.2, window);
  {
    caf::scoped_actor self{sys};
    for (std::uint64_t i = 0; i < full_blocks + full_blocks / 8; ++i) {
      kv_request req;
      req.keys = {engine::block_key{3, i + 1}};
      req.input_tokens = 16;
      self->send(*full, process_atom::value, std::move(req));
    }
    self->request(*full, caf::infinite, stats_atom::value)
        .receive([](const engine_stats&) {},
                 [](caf::error& e) {
                   std::fprintf(stderr, "fill: %s\n", to_string(e).c_str());
                   std::exit(1);
                 });
  }
  std::vector<double> direct;
  std::vector<double> routed;
  std::vector<double> timed;
  std::vector<double> evicting;
  std::vector<double> blocking;
  std::vector<double> fresh;
  for (int r = 0; r < reps; ++r) {
    direct.push_back(measure(sys, *engine, seconds, window));
    routed.push_back(measure(sys, balancer, seconds, window));
    timed.push_back(measure(sys, balancer, seconds, window, 64,
                            caf::duration{std::chrono::seconds{10}}));
    evicting.push_back(measure(sys, *full, seconds, window, 0));
    blocking.push_back(measure_node(**host, seconds));
    fresh.push_back(measure_fresh_actor(sys, (*host)->balancer(), seconds));
  }
  std::printf("threads=%zu policy=sharing window=%zu reps=%d seconds=%.1f\n",
              threads, window, reps, seconds);
  std::printf("engine actor direct       : median %.0f requests/s\n",
              median(direct));
  std::printf(
      "balancer -> engine actor  : median %.0f requests/s (%.2fx of direct)\n",
      median(routed), median(routed) / median(direct));
  std::printf("balancer, caller's own timer: median %.0f requests/s (%.2fx "
              "of direct)\n",
              median(timed), median(timed) / median(direct));
  std::printf("engine actor, full store of %zu blocks, every request "
              "evicts: median %.0f requests/s (%.2fx of direct)\n",
              full_blocks, median(evicting), median(evicting) / median(direct));
  std::printf("node::process_request, one host thread, one request at a "
              "time: median %.0f requests/s\n",
              median(blocking));
  std::printf("host thread, a scoped_actor and a CAF timeout per call: median "
              "%.0f requests/s (node::process_request %.2fx of it)\n",
              median(fresh), median(blocking) / median(fresh));
  host->reset();
  caf::anon_send_exit(*engine, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(balancer, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(*full, caf::exit_reason::user_shutdown);
  return 0;
}
