// One engine per GPU: a kvfleet::node whose engines take their block pools
// from cuda::device_backend_per_engine. With GPUs the pools are device
// memory (engine k on GPU k % GPUs); without, host memory with one log line
// per engine; either way the node serves requests and block calls.
#include "actors/node.hpp"
#include "cuda/backend_factory.hpp"
#include "cuda/device.hpp"
#include "cuda/internal/test_support.hpp"
#include "cuda/memory_manager.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

namespace kvfleet {
namespace {

using actors::kv_request;
using engine::block_key;

/// Log lines from any thread (engine 0 starts on the caller's, the others
/// on the balancer's).
struct log_lines {
  std::mutex mutex;
  std::vector<std::string> lines;
  cuda::log_sink sink() {
    return [this](std::string_view l) {
      std::lock_guard lock{mutex};
      lines.emplace_back(l);
    };
  }
  std::vector<std::string> taken() {
    std::lock_guard lock{mutex};
    return lines;
  }
};

node_config gpu_node(log_lines& log) {
  node_config c;
  c.engines = 2;
  c.engine.ns.model = "gpu-node-test";
  c.engine.ns.layers = 2;
  c.engine.ns.kv_heads = 2;
  c.engine.ns.head_dim = 64;
  c.engine.ns.block_tokens = 16;
  c.engine.store.capacity_bytes = 8u << 20;
  c.engine.store.slab_bytes = 256u << 10;
  // The default batcher (20 requests, 100 ms, closed when idle), as a host
  // application runs it.
  c.engine.make_backend = cuda::device_backend_per_engine(log.sink());
  // Memory pressure read from the whole device (cudaMemGetInfo) for a
  // device engine, from the pool for a host one.
  c.engine.relieve =
      cuda::device_memory_relief_per_engine({}, log.sink()).value();
  c.balancer.routing.policy = actors::routing_policy::kv_aware;
  c.query_cache = false;
  return c;
}

kv_request request(std::uint64_t id) {
  kv_request r;
  r.id = id;
  r.keys = {block_key{7, 1}, block_key{7, 2}, block_key{7, 3}};
  r.input_tokens = 48;
  return r;
}

/// Runs requests and block calls on both engines; returns each engine's
/// stats.
std::vector<actors::engine_stats> exercise(node& nd) {
  std::vector<actors::engine_stats> out;
  auto first = nd.process_request(request(1));
  EXPECT_TRUE(first.has_value()) << first.error().describe();
  if (!first)
    return out;
  EXPECT_EQ(first->computed_blocks, 3U);
  auto second = nd.process_request(request(2));
  EXPECT_TRUE(second.has_value());
  if (!second)
    return out;
  EXPECT_EQ(second->matched_blocks, 3U); // read back from the pool, verified
  EXPECT_EQ(second->engine, first->engine);

  for (std::uint32_t slot = 0; slot < 2; ++slot) {
    actors::put_request p;
    p.key = block_key{90 + slot, 1};
    // One block: 2 layers x (K, V) x 16 tokens x 2 heads x 64 x fp16.
    std::vector<std::uint8_t> value(16384);
    for (std::size_t i = 0; i < value.size(); ++i)
      value[i] = static_cast<std::uint8_t>(i * 31 + slot);
    auto put = nd.put_block(slot, p, value);
    EXPECT_TRUE(put.has_value()) << put.error().describe();
    auto got = nd.get_block(slot, p.key);
    EXPECT_TRUE(got.has_value()) << got.error().describe();
    if (got) {
      EXPECT_EQ(*got, value);
    }
    auto st = nd.engine_stats(slot);
    EXPECT_TRUE(st.has_value());
    if (st) {
      out.push_back(*st);
    }
  }
  return out;
}

/// Sends the same three-block prompt from three host threads at once to a
/// node of one engine whose batches close at three requests only (no
/// timeout for ten minutes, not when idle), so they are one batch whatever
/// the threads' timing; returns the engine's stats after it.
std::optional<actors::engine_stats> batch_of_three(node& nd) {
  std::vector<std::optional<result<actors::kv_reply>>> replies(3);
  std::vector<std::thread> hosts;
  for (std::uint64_t i = 0; i < replies.size(); ++i)
    hosts.emplace_back([&nd, &replies, i] {
      replies[i].emplace(nd.process_request(request(i + 1)));
    });
  for (auto& h : hosts)
    h.join();
  std::uint64_t computed = 0;
  std::uint64_t matched = 0;
  for (std::uint64_t i = 0; i < replies.size(); ++i) {
    const auto& r = *replies[i];
    EXPECT_TRUE(r.has_value()) << r.error().describe();
    if (!r)
      return std::nullopt;
    EXPECT_EQ(r->id, i + 1);
    computed += r->computed_blocks;
    matched += r->matched_blocks;
  }
  // The first of the batch computes the prompt, the other two find it.
  EXPECT_EQ(computed, 3U);
  EXPECT_EQ(matched, 6U);
  auto st = nd.engine_stats(0);
  EXPECT_TRUE(st.has_value()) << st.error().describe();
  if (!st)
    return std::nullopt;
  EXPECT_EQ(st->batches, 1U);
  EXPECT_EQ(st->requests, 3U);
  EXPECT_EQ(st->in_flight, 0U);
  return *st;
}

/// gpu_node with one engine whose batches close at three requests only.
node_config batching_node(log_lines& log) {
  auto c = gpu_node(log);
  c.engines = 1;
  c.engine.batch = actors::batch_config{3, std::chrono::minutes{10}, false};
  c.balancer.request_timeout = std::chrono::minutes{10};
  return c;
}

/// An actor system of two scheduler threads per test, and the log lines
/// the engines' backend factory writes.
class gpu_node_test : public ::testing::Test {
protected:
  gpu_node_test() {
    node::configure(cfg_, 2);
    sys_.emplace(cfg_);
  }
  /// Starts a node (the test fails when it cannot).
  std::unique_ptr<node> start(const node_config& c) {
    auto n = node::start(*sys_, c);
    EXPECT_TRUE(n.has_value()) << n.error().describe();
    return n ? std::move(*n) : nullptr;
  }

  caf::actor_system_config cfg_;
  std::optional<caf::actor_system> sys_;
  log_lines log_;
};

TEST_F(gpu_node_test, engines_use_device_memory_one_per_gpu) {
  KVFLEET_REQUIRE_DEVICE();
  const int gpus = *cuda::device_count();
  auto n = start(gpu_node(log_));
  ASSERT_NE(n, nullptr);
  auto stats = exercise(*n);
  ASSERT_EQ(stats.size(), 2U);
  for (std::uint32_t slot = 0; slot < 2; ++slot)
    EXPECT_EQ(stats[slot].memory,
              "cuda:" +
                  std::to_string(slot % static_cast<std::uint32_t>(gpus)));
  EXPECT_TRUE(log_.taken().empty());
}

TEST_F(gpu_node_test, without_a_gpu_engines_run_on_host_memory_and_say_so) {
  auto count = cuda::device_count();
  if (count)
    GTEST_SKIP() << *count << " CUDA device(s) present";
  auto n = start(gpu_node(log_));
  ASSERT_NE(n, nullptr);
  auto stats = exercise(*n);
  ASSERT_EQ(stats.size(), 2U);
  for (const auto& st : stats)
    EXPECT_EQ(st.memory, "host");
  // One line per engine, engine 0's allocated once (not probed twice).
  auto lines = log_.taken();
  ASSERT_EQ(lines.size(), 2U);
  std::sort(lines.begin(), lines.end());
  EXPECT_EQ(lines[0].rfind("engine 0: ", 0), 0U) << lines[0];
  EXPECT_EQ(lines[1].rfind("engine 1: ", 0), 0U) << lines[1];
  EXPECT_NE(lines[0].find("host memory instead"), std::string::npos);
}

TEST_F(gpu_node_test, engines_on_threads_of_their_own_serve_the_same) {
  // What device engines do by default (own_thread), forced on host memory,
  // so that the detached path runs on every machine.
  auto c = gpu_node(log_);
  c.engine.make_backend = nullptr;
  c.engine.own_thread = true;
  auto n = start(c);
  ASSERT_NE(n, nullptr);
  auto stats = exercise(*n);
  ASSERT_EQ(stats.size(), 2U);
  std::uint64_t hits = 0;
  for (const auto& st : stats) {
    EXPECT_EQ(st.memory, "host");
    hits += st.token_hits;
  }
  EXPECT_EQ(hits, 48U); // the second request's three blocks
  EXPECT_TRUE(log_.taken().empty());
}

TEST_F(gpu_node_test, a_device_engine_runs_a_batch_of_requests_as_one) {
  KVFLEET_REQUIRE_DEVICE();
  auto n = start(batching_node(log_));
  ASSERT_NE(n, nullptr);
  auto st = batch_of_three(*n);
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->memory, "cuda:0");
  EXPECT_TRUE(log_.taken().empty());
}

TEST_F(gpu_node_test, an_engine_on_a_thread_of_its_own_runs_a_batch_as_one) {
  // What a device engine does (own_thread, the batcher above one request),
  // forced on host memory, so that it runs on every machine.
  auto c = batching_node(log_);
  c.engine.make_backend = nullptr;
  c.engine.own_thread = true;
  auto n = start(c);
  ASSERT_NE(n, nullptr);
  auto st = batch_of_three(*n);
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->memory, "host");
  EXPECT_TRUE(log_.taken().empty());
}

TEST_F(gpu_node_test,
       device_engines_keep_demoted_blocks_in_pinned_host_memory) {
  KVFLEET_REQUIRE_DEVICE();
  auto c = gpu_node(log_);
  c.engines = 1;
  c.engine.make_tier = cuda::host_tier_per_engine(
      {std::size_t{8} << 20, std::size_t{1} << 20}, log_.sink());
  // Pressure on demand: after every batch, everything goes to the tier and
  // the hook waits for the copies (real GPU time, bounded by a deadline),
  // so what the next request finds is deterministic.
  c.engine.relieve = [](std::uint32_t, engine::block_store& store) {
    auto started = store.demote_to_tier(store.used_bytes());
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (store.tier_bytes_in_flight() > 0 &&
           std::chrono::steady_clock::now() < deadline)
      store.poll_tier();
    return started.value_or(0);
  };
  auto n = start(c);
  ASSERT_NE(n, nullptr);
  auto first = n->process_request(request(1));
  ASSERT_TRUE(first.has_value()) << first.error().describe();
  EXPECT_EQ(first->computed_blocks, 3U);
  auto st = n->engine_stats(0);
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->memory, "cuda:0");
  EXPECT_EQ(st->tier, "pinned host");
  EXPECT_EQ(st->tier_blocks, 3U);
  EXPECT_EQ(st->blocks, 0U);
  auto second = n->process_request(request(2));
  ASSERT_TRUE(second.has_value()) << second.error().describe();
  EXPECT_EQ(second->matched_blocks, 3U); // promoted from the tier
  st = n->engine_stats(0);
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->tier_hits, 3U);
  EXPECT_TRUE(log_.taken().empty());
}

TEST_F(gpu_node_test, a_failing_backend_fails_the_start_with_its_error) {
  auto c = gpu_node(log_);
  c.engine.make_backend =
      [](std::uint32_t,
         std::size_t) -> result<std::unique_ptr<engine::memory_backend>> {
    return make_error(errc::out_of_memory, "no memory for this test");
  };
  auto n = node::start(*sys_, c);
  ASSERT_FALSE(n.has_value());
  EXPECT_EQ(n.error().code, errc::out_of_memory);
  EXPECT_NE(n.error().message.find("no memory for this test"),
            std::string::npos);
}

} // namespace
} // namespace kvfleet
