// kvfleet::node end to end on a real (2-thread) scheduler: each call blocks
// until its answer arrives, so the outcomes are deterministic without sleeps.
#include "actors/node.hpp"

#include "actors/caf_error.hpp"
#include "engine/clock.hpp"
#include "engine/disk/segment_file.hpp"
#include "engine/kv_producer.hpp"
#include "engine/memory_backend.hpp"
#include "engine/testing/io_gate.hpp"
#include "engine/testing/temp_dir.hpp"

#include <gtest/gtest.h>

#include <stdlib.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <functional>
#include <latch>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <caf/abstract_actor.hpp>
#include <caf/actor_cast.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/after.hpp>
#include <caf/exit_reason.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <caf/system_messages.hpp>

namespace kvfleet {
namespace {

using actors::kv_request;
using engine::block_key;

node_config small_node() {
  node_config c;
  c.engines = 2;
  c.engine.ns.model = "node-test";
  c.engine.ns.layers = 1;
  c.engine.ns.kv_heads = 1;
  c.engine.ns.head_dim = 64;
  c.engine.ns.block_tokens = 16;
  c.engine.store.capacity_bytes = 1u << 20;
  c.engine.store.slab_bytes = 64u << 10;
  c.balancer.routing.policy = actors::routing_policy::kv_aware;
  return c;
}

kv_request req(std::uint64_t id, std::string query = {}) {
  kv_request r;
  r.id = id;
  r.query = std::move(query);
  r.keys = {block_key{5, 1}, block_key{5, 2}, block_key{5, 3}};
  r.input_tokens = 48;
  return r;
}

/// A real 2-thread actor system, configured as node::configure says.
class Node : public ::testing::Test {
protected:
  Node() {
    node::configure(cfg_, 2);
    sys_ = std::make_unique<caf::actor_system>(cfg_);
  }

  caf::actor_system_config cfg_;
  std::unique_ptr<caf::actor_system> sys_;
};

TEST_F(Node, ProcessBlockCallsWarmAndBadConfig) {
  auto& sys = *sys_;
  {
    auto n = node::start(sys, small_node());
    ASSERT_TRUE(n.has_value()) << n.error().describe();
    auto& nd = **n;
    auto first = nd.process_request(req(1));
    ASSERT_TRUE(first.has_value()) << first.error().describe();
    EXPECT_EQ(first->computed_blocks, 3U);
    auto second = nd.process_request(req(2));
    ASSERT_TRUE(second.has_value());
    EXPECT_EQ(second->matched_blocks, 3U); // routed back to the holder
    EXPECT_EQ(second->engine, first->engine);
    auto cached = nd.process_request(req(3, "q"));
    auto again = nd.process_request(req(4, "q"));
    ASSERT_TRUE(cached && again);
    EXPECT_TRUE(again->from_query_cache);
    EXPECT_EQ(again->id, 4U);
    // A request the engines refuse is refused with the key of a cached
    // query too (before, the cached reply answered it).
    auto misaligned = req(5, "q");
    misaligned.keys.pop_back();
    auto refused = nd.process_request(misaligned);
    ASSERT_FALSE(refused.has_value());
    EXPECT_EQ(refused.error().code, errc::misaligned_tokens)
        << refused.error().describe();
    auto lk = nd.lookup({block_key{5, 1}, block_key{5, 2}});
    ASSERT_TRUE(lk.has_value());
    EXPECT_EQ(*lk, 2U);

    actors::put_request p;
    p.key = block_key{9, 1};
    std::vector<std::uint8_t> value(4096, 7);
    ASSERT_TRUE(nd.put_block(1, p, value));
    auto got = nd.get_block(1, p.key);
    ASSERT_TRUE(got.has_value()) << got.error().describe();
    EXPECT_EQ(*got, value);
    EXPECT_TRUE(nd.pin(1, p.key));
    EXPECT_TRUE(nd.unpin(1, p.key));
    EXPECT_EQ(nd.get_block(0, p.key).error().code, errc::not_found);
    EXPECT_EQ(nd.put_block(7, p, value).error().code, errc::not_found);

    std::vector<actors::warm_item> items;
    for (std::uint64_t i = 0; i < 5; ++i) {
      auto r = req(100 + i);
      r.keys = {block_key{50 + i, 1}};
      r.input_tokens = 16;
      items.push_back({r, static_cast<double>(i)});
    }
    auto w = nd.warm(items, 3, true);
    ASSERT_TRUE(w.has_value());
    EXPECT_EQ(w->warmed, 3U);
    auto st = nd.stats();
    ASSERT_TRUE(st.has_value());
    EXPECT_EQ(st->routed.size(), 2U);
  }
  auto bad = small_node();
  bad.engine.store.capacity_bytes = 0;
  auto n = node::start(sys, bad);
  ASSERT_FALSE(n.has_value());
  EXPECT_EQ(n.error().code, errc::zero_capacity);
}

TEST_F(Node, WarmReportsProgressOnTheCallingThread) {
  // Each answered query is reported, in order, on the caller's thread, and
  // all of them before warm() returns. (Before, a host app on the node API
  // got no progress: node::warm passed the warmer no progress actor.)
  auto n = node::start(*sys_, small_node());
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  std::vector<actors::warm_item> items;
  for (std::uint64_t i = 0; i < 6; ++i) {
    auto r = req(200 + i);
    r.keys = {block_key{80 + i, 1}};
    r.input_tokens = 16;
    items.push_back({r, static_cast<double>(i)});
  }
  std::vector<std::pair<std::uint64_t, std::uint64_t>> seen;
  bool other_thread = false;
  const auto caller = std::this_thread::get_id();
  auto w =
      (*n)->warm(items, 4, false, [&](std::uint64_t done, std::uint64_t total) {
        other_thread |= std::this_thread::get_id() != caller;
        seen.emplace_back(done, total);
      });
  ASSERT_TRUE(w.has_value()) << w.error().describe();
  EXPECT_EQ(w->warmed, 4U);
  EXPECT_FALSE(other_thread);
  const std::vector<std::pair<std::uint64_t, std::uint64_t>> want{
      {1, 4}, {2, 4}, {3, 4}, {4, 4}};
  EXPECT_EQ(seen, want);
  // A callback that throws: the exception reaches the caller, and the node
  // serves on (the warmer finishes the job).
  struct stop_warming {};
  EXPECT_THROW((void)(*n)->warm(
                   items, 4, false,
                   [](std::uint64_t, std::uint64_t) { throw stop_warming{}; }),
               stop_warming);
  // A null callback is warm() without one: the queries are warm already.
  auto again = (*n)->warm(items, 4, false, node::warm_progress{});
  ASSERT_TRUE(again.has_value()) << again.error().describe();
  EXPECT_EQ(again->warmed, 4U);
}

TEST_F(Node, APinnedWarmKeepsItsHotQueryWhenTheLongerColdOneIsRefused) {
  // "hot" (2 blocks) leads "cold" (200 blocks: pinning them all passes the
  // engine's pinned limit, so the engine refuses the whole request). The
  // warmer then sends "hot" itself: its blocks end cached and pinned.
  // (Before, "hot" was warmed only through "cold", and nothing was.)
  auto c = small_node();
  c.engines = 1;
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  const auto chain = [](std::uint64_t id, std::string q, std::size_t blocks) {
    kv_request r;
    r.id = id;
    r.query = std::move(q);
    for (std::uint64_t i = 1; i <= blocks; ++i)
      r.keys.push_back(block_key{7, i});
    r.input_tokens = static_cast<std::uint32_t>(16 * blocks);
    return r;
  };
  const auto hot = chain(1, "hot", 2);
  const std::vector<actors::warm_item> items{{hot, 100.0},
                                             {chain(2, "cold", 200), 1.0}};
  auto w = (*n)->warm(items, 100, true);
  ASSERT_TRUE(w.has_value()) << w.error().describe();
  EXPECT_EQ(w->requested, 2U);
  EXPECT_EQ(w->warmed, 1U);
  EXPECT_EQ(w->failed, 1U);
  EXPECT_EQ(w->shortened, 1U);
  auto held = (*n)->lookup(hot.keys);
  ASSERT_TRUE(held.has_value());
  EXPECT_EQ(*held, 2U);
  auto es = (*n)->engine_stats(0);
  ASSERT_TRUE(es.has_value());
  EXPECT_GT(es->pinned_bytes, 0U);
}

TEST_F(Node, StartRejectsConfigurationsThatBreakInvariants) {
  struct bad_case {
    const char* what;
    void (*edit)(node_config&);
    const char* names; ///< the message names the option
  };
  const bad_case cases[] = {
      {"no engines", [](node_config& c) { c.engines = 0; }, "engines"},
      {"more engines than router slots",
       [](node_config& c) { c.engines = actors::router::max_slots + 1; },
       "engines"},
      {"empty prefix index",
       [](node_config& c) { c.balancer.routing.max_index_keys = 0; },
       "max_index_keys"},
      {"more engines than the scaler's max_replicas",
       [](node_config& c) {
         c.scaler.emplace();
         c.scaler->policy.max_replicas = 2;
         c.engines = 3;
       },
       "node_config.engines (3) is above the scaler's max_replicas (2)"},
      {"scaler max_replicas above the router's slots",
       [](node_config& c) {
         c.scaler.emplace();
         c.scaler->policy.max_replicas = actors::router::max_slots + 1;
       },
       "node_config.scaler.policy.max_replicas (65) is above the router's 64 "
       "engine slots"},
      {"prefetch threshold above 1",
       [](node_config& c) {
         c.prefetch.emplace();
         c.prefetch->threshold = 2.0;
       },
       "prefetch_config.threshold"},
      {"scaler sustain 0",
       [](node_config& c) {
         c.scaler.emplace();
         c.scaler->policy.sustain = 0;
       },
       "sustain"},
      {"scaler sample priority outside the five",
       [](node_config& c) {
         c.scaler.emplace();
         c.scaler->sample_priority = static_cast<engine::priority>(7);
       },
       "scaler_actor_config.sample_priority"},
      {"scaler min capacity above max",
       [](node_config& c) {
         c.scaler.emplace();
         c.scaler->policy.min_capacity_tokens = 8192;
         c.scaler->policy.max_capacity_tokens = 4096;
       },
       "capacity_tokens"},
      {"engine budget below the scaler's range",
       [](node_config& c) {
         c.scaler.emplace();
         c.scaler->policy.min_capacity_tokens = 4096;
         c.engine.capacity_tokens = 2048;
       },
       "engine.capacity_tokens (2048) is outside the scaler's range [4096, "
       "16384]"},
      {"engine budget above the scaler's range",
       [](node_config& c) {
         c.scaler.emplace();
         c.engine.capacity_tokens = 32768;
       },
       "engine.capacity_tokens (32768) is outside the scaler's range"},
      {"query cache ttl 0",
       [](node_config& c) { c.cache.ttl = std::chrono::seconds{0}; }, "ttl"},
      {"query cache ttl negative",
       [](node_config& c) { c.cache.ttl = std::chrono::seconds{-5}; }, "ttl"},
      {"embedded query cache of no entries",
       [](node_config& c) { c.cache.max_entries = 0; },
       "query_cache_config.max_entries"},
      {"a query cache bound below one entry",
       [](node_config& c) { c.cache.max_bytes = 100; },
       "query_cache_config.max_bytes"},
      {"Redis URL in the store options, where nothing reads it",
       [](node_config& c) { c.cache.redis.url = "redis://127.0.0.1:1"; },
       "query_cache_config.redis_url"},
      {"call timeout 0",
       [](node_config& c) { c.call_timeout = std::chrono::milliseconds{0}; },
       "node_config.call_timeout"},
      {"call timeout as large as it goes (wraps to -1 ms)",
       [](node_config& c) {
         c.call_timeout = std::chrono::milliseconds::max();
       },
       "node_config.call_timeout"},
      {"kv-aware credit that is not a number",
       [](node_config& c) {
         c.balancer.routing.credit_per_block = std::nan("");
       },
       "router_config.credit_per_block"},
      {"batch of no requests",
       [](node_config& c) { c.engine.batch.max_size = 0; },
       "engine_actor_config.batch.max_size"},
      {"memory pressure target above its threshold",
       [](node_config& c) {
         c.engine.pressure.threshold = 0.5;
         c.engine.pressure.target = 0.6;
       },
       "engine_actor_config.pressure"},
      {"balancer request timeout 0",
       [](node_config& c) {
         c.balancer.request_timeout = std::chrono::milliseconds{0};
       },
       "balancer_config.request_timeout"},
      {"negative balancer restart window",
       [](node_config& c) {
         c.balancer.restart_window = std::chrono::milliseconds{-1};
       },
       "balancer_config.restart_window"},
      {"warmer parallelism 0", [](node_config& c) { c.warmer.parallelism = 0; },
       "warmer_config.parallelism"},
  };
  for (const auto& bc : cases) {
    auto c = small_node();
    bc.edit(c);
    auto n = node::start(*sys_, c);
    if (n.has_value()) {
      ADD_FAILURE() << bc.what << ": started";
      continue;
    }
    EXPECT_EQ(n.error().code, errc::invalid_argument) << bc.what;
    EXPECT_NE(n.error().message.find(bc.names), std::string::npos)
        << bc.what << ": " << n.error().describe();
  }
  // With the scaler on, an engine budget at either end of its range is
  // fine, and the scaler counts from the budget the engines run with.
  for (std::uint32_t tokens : {2048U, 16384U}) {
    auto c = small_node();
    c.scaler.emplace();
    c.engine.capacity_tokens = tokens;
    auto n = node::start(*sys_, c);
    ASSERT_TRUE(n.has_value()) << tokens << ": " << n.error().describe();
    auto es = (*n)->engine_stats(0);
    ASSERT_TRUE(es.has_value()) << es.error().describe();
    EXPECT_EQ(es->capacity_tokens, tokens);
    caf::scoped_actor self{*sys_};
    std::optional<actors::scaler_stats> ss;
    self->request((*n)->scaler(), std::chrono::seconds{30},
                  actors::stats_atom::value)
        .receive([&](actors::scaler_stats& x) { ss = x; },
                 [&](caf::error& e) {
                   ADD_FAILURE() << actors::from_caf_error(e).describe();
                 });
    ASSERT_TRUE(ss.has_value());
    EXPECT_EQ(ss->capacity_tokens, tokens);
  }
  // The largest fleet is fine.
  auto c = small_node();
  c.engines = actors::router::max_slots;
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto st = (*n)->stats();
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->up.size(), actors::router::max_slots);
}

TEST_F(Node, BadCallsGetErrorValuesAndTheNodeKeepsServing) {
  auto n = node::start(*sys_, small_node());
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto& nd = **n;
  auto expect_error = [](const auto& r, errc code, const char* what) {
    ASSERT_FALSE(r.has_value()) << what;
    EXPECT_EQ(r.error().code, code) << what << ": " << r.error().describe();
    EXPECT_FALSE(r.error().message.empty()) << what;
  };
  auto few_tokens = req(1);
  few_tokens.input_tokens = 20; // three blocks need 48 tokens
  expect_error(nd.process_request(few_tokens), errc::misaligned_tokens,
               "fewer tokens than the keys cover");
  auto no_keys = req(2);
  no_keys.keys.clear();
  no_keys.input_tokens = 0;
  auto empty = nd.process_request(no_keys);
  ASSERT_TRUE(empty.has_value()) << empty.error().describe();
  EXPECT_EQ(empty->matched_blocks + empty->computed_blocks, 0U);

  actors::put_request p;
  p.key = block_key{9, 1};
  expect_error(nd.put_block(0, p, std::vector<std::uint8_t>(100, 1)),
               errc::wrong_value_size, "short value");
  expect_error(nd.get_block(0, p.key), errc::not_found,
               "the failed put left nothing");
  expect_error(nd.pin(0, block_key{1, 1}), errc::not_found, "pin");
  expect_error(nd.unpin(0, block_key{1, 1}), errc::not_found, "unpin");
  expect_error(nd.engine_stats(99), errc::not_found, "engine 99");
  expect_error(nd.get_block(99, p.key), errc::not_found, "get on engine 99");

  // Everyone else is still served.
  auto ok = nd.process_request(req(3));
  ASSERT_TRUE(ok.has_value()) << ok.error().describe();
  EXPECT_EQ(ok->computed_blocks, 3U);
  ASSERT_TRUE(nd.put_block(0, p, std::vector<std::uint8_t>(4096, 1)));
}

TEST_F(Node, ACallThatTimesOutIsAnErrorAndLaterCallsGetTheirOwnReplies) {
  // One engine whose batches close at two requests only: the first call
  // waits alone and nothing can answer it before its call_timeout (1 s of
  // real time). The second closes the batch, so the first one's reply comes
  // late, to a caller that gave up: it must not reach any later call.
  auto c = small_node();
  c.engines = 1;
  c.query_cache = false;
  c.engine.batch = actors::batch_config{2, std::chrono::minutes{10}, false};
  c.balancer.request_timeout = std::chrono::minutes{10};
  c.call_timeout = std::chrono::seconds{1};
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto& nd = **n;
  auto first = nd.process_request(req(1));
  ASSERT_FALSE(first.has_value());
  EXPECT_EQ(first.error().code, errc::timeout) << first.error().describe();
  auto second = nd.process_request(req(2));
  ASSERT_TRUE(second.has_value()) << second.error().describe();
  EXPECT_EQ(second->id, 2U);
  EXPECT_EQ(second->matched_blocks, 3U); // the first one computed them
  for (int i = 0; i < 3; ++i) {
    auto lk = nd.lookup({block_key{5, 1}, block_key{5, 2}});
    ASSERT_TRUE(lk.has_value()) << lk.error().describe();
    EXPECT_EQ(*lk, 2U);
    auto es = nd.engine_stats(0);
    ASSERT_TRUE(es.has_value()) << es.error().describe();
    EXPECT_EQ(es->requests, 2U);
  }
}

TEST_F(Node, CallsFromManyThreadsAtOnceEachGetTheirOwnReply) {
  // Calls borrow the node's blocking actors: from eight threads at once,
  // every call still gets the reply to its own request, through the query
  // cache and straight to the balancer alike.
  auto n = node::start(*sys_, small_node());
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto& nd = **n;
  constexpr std::uint64_t threads = 8;
  constexpr std::uint64_t calls = 200;
  std::atomic<std::uint64_t> answered{0};
  std::atomic<std::uint64_t> wrong{0};
  std::vector<std::thread> hosts;
  for (std::uint64_t t = 0; t < threads; ++t)
    hosts.emplace_back([&, t] {
      for (std::uint64_t i = 0; i < calls; ++i) {
        const auto id = t * 1000 + i;
        auto r = req(id, i % 2 == 0 ? "q" + std::to_string(id % 16) : "");
        r.keys = {block_key{100 + t, 1 + i % 8}};
        r.input_tokens = 16;
        auto rep = nd.process_request(r);
        if (rep && rep->id == id)
          ++answered;
        else
          ++wrong;
        if (i % 50 == 0 && !nd.engine_stats(static_cast<std::uint32_t>(t % 2)))
          ++wrong;
      }
    });
  for (auto& h : hosts)
    h.join();
  EXPECT_EQ(answered.load(), threads * calls);
  EXPECT_EQ(wrong.load(), 0U);
}

using engine::testing::temp_dir;

/// One engine with room for 64 blocks of 4 KiB and a disk tier under it.
/// A disk tier of 64 MiB per engine under `dir`.
engine::disk_tier_config disk_config(const std::string& dir) {
  engine::disk_tier_config disk;
  disk.directory = dir;
  disk.capacity_bytes = 64u << 20;
  return disk;
}

node_config disk_node(const std::string& dir) {
  auto c = small_node();
  c.engines = 1;
  c.query_cache = false;
  c.engine.store.capacity_bytes = 256u << 10;
  c.engine.make_disk = actors::disk_tier_per_engine(disk_config(dir));
  return c;
}

/// Request `id`: four blocks of its own (16 tokens each).
kv_request chain(std::uint64_t id) {
  kv_request r;
  r.id = id;
  for (std::uint64_t b = 1; b <= 4; ++b)
    r.keys.push_back(block_key{1000 + id, b});
  r.input_tokens = 64;
  return r;
}

TEST_F(Node, ALowPriorityRequestWaitsForItsDiskReadsOffTheBatch) {
  // A prefetch whose prefix was on disk held its engine for its reads,
  // which queue behind the tier's other work (spills, here one held at a
  // gate): a request of normal priority that came meanwhile waited for all
  // of them. The prefetch's reads are started and it waits off its batch
  // now; the normal request is served at once, the prefetch once its
  // reads have landed, its reply counting them as promoted.
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto g = std::make_shared<engine::testing::io_gate>();
  auto disk = disk_config(dir.path());
  disk.write_fault_for_testing = engine::testing::io_gate::hook(g);
  auto c = disk_node(dir.path());
  c.engine.make_disk = actors::disk_tier_per_engine(disk);
  c.engine.store.adaptive_compression = false;      // evict, not demote
  c.engine.store.policy = engine::policy_kind::lru; // the oldest go first
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  // chain(1)'s four blocks leave memory (64 blocks) for disk.
  for (std::uint64_t id = 1; id <= 40; ++id)
    ASSERT_TRUE((*n)->process_request(chain(id)).has_value());
  // A misaligned one is refused before anything is read for it.
  auto bad = chain(1);
  bad.prio = engine::priority::low;
  bad.input_tokens = 48; // 4 keys for 3 blocks
  const auto refused = (*n)->process_request(bad);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, errc::misaligned_tokens);
  auto quiet = (*n)->engine_stats(0);
  ASSERT_TRUE(quiet.has_value()) << quiet.error().describe();
  EXPECT_EQ(quiet->disk_deferred, 0U);
  EXPECT_EQ(quiet->disk_hits, 0U) << "read for a request refused anyway";
  // The tier's I/O thread is held in its next write, a spill.
  g->arm();
  const engine::testing::gate_watchdog watchdog(g);
  ASSERT_TRUE((*n)->process_request(chain(41)).has_value());
  ASSERT_TRUE(g->wait_entered());
  auto low = chain(1);
  low.id = 500;
  low.prio = engine::priority::low;
  caf::scoped_actor self{*sys_};
  self->send((*n)->balancer(), actors::process_atom::value, low);
  // A second one of the same prefix finds its blocks on their way (read
  // for the first): it waits off the batch for that chain too. Before, it
  // was served in the batch, where process() waited for those reads, and
  // the normal request with it.
  auto second = low;
  second.id = 501;
  self->send((*n)->balancer(), actors::process_atom::value, second);
  // A third starts with chain(1)'s first two blocks and goes on with
  // chain(2)'s last two, on disk too: it waits for the first's chain, then
  // its own reads start and it waits again, off the batch. (Before, it was
  // served once the first's chain landed, reading the rest in its batch.)
  auto mixed = chain(2);
  mixed.id = 502;
  mixed.prio = engine::priority::low;
  mixed.keys[0] = low.keys[0];
  mixed.keys[1] = low.keys[1];
  self->send((*n)->balancer(), actors::process_atom::value, mixed);
  auto normal = (*n)->process_request(chain(42));
  ASSERT_TRUE(normal.has_value()) << normal.error().describe();
  auto st = (*n)->engine_stats(0);
  ASSERT_TRUE(st.has_value()) << st.error().describe();
  EXPECT_EQ(st->disk_deferred, 3U);
  EXPECT_EQ(st->in_flight, 3U) << "the low requests were served first";
  g->open();
  std::map<std::uint64_t, actors::kv_reply> got;
  for (int i = 0; i < 3; ++i)
    self->receive([&](actors::kv_reply& r) { got[r.id] = std::move(r); },
                  [&](caf::error& e) { ADD_FAILURE() << caf::to_string(e); },
                  caf::after(std::chrono::seconds(60)) >>
                      [&] { ADD_FAILURE() << "no reply to a low request"; });
  ASSERT_EQ(got.size(), 3U);
  const auto& third = got[502];
  EXPECT_EQ(third.matched_blocks, 4U);
  EXPECT_EQ(third.memory_blocks, 2U);
  EXPECT_EQ(third.promoted_blocks, 2U);
  auto after = (*n)->engine_stats(0);
  ASSERT_TRUE(after.has_value()) << after.error().describe();
  EXPECT_EQ(after->disk_deferred, 4U) << "the third waited again for its own";
  EXPECT_EQ(after->held_blocks, 0U) << "what was read for them is let go";
  const auto& first = got[500];
  EXPECT_EQ(first.matched_blocks, 4U);
  EXPECT_EQ(first.computed_blocks, 0U);
  EXPECT_EQ(first.memory_blocks, 0U);
  EXPECT_EQ(first.promoted_blocks, 4U) << "as process() would count them";
  // The second found them in memory: read for the first, not for it.
  const auto& other = got[501];
  EXPECT_EQ(other.matched_blocks, 4U);
  EXPECT_EQ(other.computed_blocks, 0U);
  EXPECT_EQ(other.memory_blocks, 4U);
  EXPECT_EQ(other.promoted_blocks, 0U);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, ADiskTierServesEvictedBlocksAndOutlivesTheNode) {
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  constexpr std::uint64_t requests = 100; // 400 blocks: 6x the memory
  {
    auto n = node::start(*sys_, disk_node(dir.path()));
    ASSERT_TRUE(n.has_value()) << n.error().describe();
    for (std::uint64_t id = 1; id <= requests; ++id) {
      auto r = (*n)->process_request(chain(id));
      ASSERT_TRUE(r.has_value()) << r.error().describe();
      ASSERT_EQ(r->computed_blocks, 4U) << "request " << id;
    }
    // Request 1's blocks left memory long ago: they come back from disk.
    auto again = (*n)->process_request(chain(1));
    ASSERT_TRUE(again.has_value()) << again.error().describe();
    EXPECT_EQ(again->matched_blocks, 4U);
    EXPECT_EQ(again->computed_blocks, 0U);
    EXPECT_EQ(again->promoted_blocks, 4U);
    auto es = (*n)->engine_stats(0);
    ASSERT_TRUE(es.has_value()) << es.error().describe();
    EXPECT_TRUE(es->disk);
    EXPECT_EQ(es->disk_hits, 4U);
    EXPECT_GE(es->disk_spills, 4U * (requests - 16));
    EXPECT_EQ(es->disk_spill_failures, 0U);
    // A clean shutdown: what is only in memory goes to disk too.
    auto persisted = (*n)->persist(std::chrono::seconds(30));
    ASSERT_TRUE(persisted.has_value()) << persisted.error().describe();
    EXPECT_GE(*persisted, es->blocks);
    ASSERT_TRUE((*n)->stop());
    EXPECT_TRUE((*n)->stop()) << "stopping again does nothing";
    auto after = (*n)->process_request(chain(1));
    ASSERT_FALSE(after.has_value());
    EXPECT_EQ(after.error().code, errc::invalid_argument);
  }
  // A new node on the same directory: every block is on disk, the last
  // request's (in memory at the shutdown) too.
  auto n = node::start(*sys_, disk_node(dir.path()));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  for (std::uint64_t id : {requests, std::uint64_t{50}, std::uint64_t{2}}) {
    auto r = (*n)->process_request(chain(id));
    ASSERT_TRUE(r.has_value()) << r.error().describe();
    EXPECT_EQ(r->matched_blocks, 4U) << "request " << id;
  }
  auto es = (*n)->engine_stats(0);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_EQ(es->disk_hits, 12U);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, ADiskDirectoryInUseOrMissingStopsTheStartWithAClearError) {
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto first = node::start(*sys_, disk_node(dir.path()));
  ASSERT_TRUE(first.has_value()) << first.error().describe();
  auto second = node::start(*sys_, disk_node(dir.path()));
  ASSERT_FALSE(second.has_value());
  EXPECT_EQ(second.error().code, errc::busy) << second.error().describe();
  EXPECT_NE(second.error().message.find("engine-0"), std::string::npos)
      << second.error().message;
  // The first node keeps serving.
  auto r = (*first)->process_request(chain(1));
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  // Once it has stopped, the directory is free.
  ASSERT_TRUE((*first)->stop());
  auto third = node::start(*sys_, disk_node(dir.path()));
  ASSERT_TRUE(third.has_value()) << third.error().describe();
  ASSERT_TRUE((*third)->stop());

  auto missing = node::start(*sys_, disk_node(dir.path() + "/no/such/dir"));
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().code, errc::io_error);
  EXPECT_NE(missing.error().message.find("must be an existing directory"),
            std::string::npos)
      << missing.error().message;
  auto empty = node::start(*sys_, disk_node(""));
  ASSERT_FALSE(empty.has_value());
  EXPECT_EQ(empty.error().code, errc::invalid_argument);
}

TEST(EngineActorConfig, ADiskTierNeedsTheEnginesOwnThread) {
  actors::engine_actor_config c;
  engine::disk_tier_config disk;
  disk.directory = "/nonexistent";
  disk.capacity_bytes = 1u << 20;
  c.make_disk = actors::disk_tier_per_engine(disk);
  EXPECT_TRUE(actors::validate(c)) << "default: its own thread";
  c.own_thread = true;
  EXPECT_TRUE(actors::validate(c));
  c.own_thread = false;
  const auto bad = actors::validate(c);
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code, errc::invalid_argument);
  EXPECT_NE(bad.error().message.find("own_thread"), std::string::npos)
      << bad.error().message;
  c.make_disk = nullptr;
  EXPECT_TRUE(actors::validate(c)) << "no disk: a worker may run it";
}

TEST_F(Node, PersistAndStopCheckTheirArguments) {
  auto n = node::start(*sys_, small_node());
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto no_disk = (*n)->persist(std::chrono::seconds(1));
  ASSERT_FALSE(no_disk.has_value());
  EXPECT_EQ(no_disk.error().code, errc::invalid_argument);
  for (auto bad : {std::chrono::milliseconds{0}, std::chrono::milliseconds{-1},
                   std::chrono::milliseconds{std::chrono::hours{25}}}) {
    auto p = (*n)->persist(bad);
    ASSERT_FALSE(p.has_value());
    EXPECT_EQ(p.error().code, errc::invalid_argument);
    auto s = (*n)->stop(bad);
    ASSERT_FALSE(s.has_value());
    EXPECT_EQ(s.error().code, errc::invalid_argument);
  }
  // Still running after the refused stops.
  auto r = (*n)->process_request(req(1));
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  ASSERT_TRUE((*n)->stop());
}

/// A gate that threads wait at while it is closed. A disk tier's write hook
/// that waits at it holds the tier's I/O thread, so its writes stay queued
/// until the test opens the gate.
class gate {
public:
  void close() {
    std::lock_guard lock{mutex_};
    open_ = false;
  }
  void open() {
    {
      std::lock_guard lock{mutex_};
      open_ = true;
    }
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock lock{mutex_};
    cv_.wait(lock, [&] { return open_; });
  }

private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool open_ = true;
};

/// Opens the gate when the test ends, however it ends: an I/O thread held
/// at it would keep its engine, and the actor system, from stopping.
struct gate_opener {
  std::shared_ptr<gate> g;
  ~gate_opener() { g->open(); }
};

/// A disk write hook that waits at `g`, holding the tier's I/O thread.
engine::segment_file::write_fault waiting_at(std::shared_ptr<gate> g) {
  return [g] {
    g->wait();
    return 0;
  };
}

/// Asks `n`'s balancer for a replica change (replica_atom or retire_atom)
/// and waits: the live engines after it, or nothing (a failure added).
template <class Atom>
std::optional<std::uint32_t> live_after(caf::actor_system& sys, node& n,
                                        Atom atom) {
  caf::scoped_actor self{sys};
  std::optional<std::uint32_t> out;
  self->request(n.balancer(), caf::infinite, atom)
      .receive([&](std::uint32_t live) { out = live; },
               [&](caf::error& e) { ADD_FAILURE() << caf::to_string(e); });
  return out;
}

/// The engine in `slot`, retiring ones too; null when the slot has none
/// live (errc::not_found: free, or its engine still opening). Any other
/// answer fails the test, so a poll for a freed slot cannot read a
/// balancer error as "freed".
caf::actor engine_of(caf::actor_system& sys, node& n, std::uint32_t slot) {
  caf::scoped_actor self{sys};
  caf::actor out;
  self->request(n.balancer(), caf::infinite, actors::engine_atom::value, slot,
                true)
      .receive([&](caf::actor& a) { out = std::move(a); },
               [&](caf::error& e) {
                 if (actors::from_caf_error(e).code != errc::not_found)
                   ADD_FAILURE()
                       << "engine_atom " << slot << ": " << caf::to_string(e);
               });
  return out;
}

/// Asks for the engine in `slot` until it has none (at most a million
/// times): whether the balancer freed the slot.
bool slot_freed(caf::actor_system& sys, node& n, std::uint32_t slot) {
  for (int i = 0; i < 1'000'000; ++i)
    if (!engine_of(sys, n, slot))
      return true;
  return false;
}

/// Reads the balancer's stats until `done` holds for them (at most a
/// million times); the last stats read.
template <class Pred>
std::optional<actors::balancer_stats> stats_once(node& n, Pred done) {
  std::optional<actors::balancer_stats> out;
  for (int i = 0; i < 1'000'000; ++i) {
    auto st = n.stats();
    if (!st)
      return std::nullopt;
    out = std::move(*st);
    if (done(*out))
      break;
  }
  return out;
}

/// Two engines under `dir`, engine 0 on `disk0`'s disk tier, engine 1 on
/// `disk1`'s.
node_config two_disk_engines(const std::string& dir,
                             const engine::disk_tier_config& disk0,
                             const engine::disk_tier_config& disk1) {
  auto c = disk_node(dir);
  c.engines = 2;
  c.engine.make_disk =
      [first = actors::disk_tier_per_engine(disk0),
       second = actors::disk_tier_per_engine(disk1)](std::uint32_t slot) {
        return slot == 0 ? first(slot) : second(slot);
      };
  return c;
}

/// Puts one block, key {first_key + slot, 1}, on each of engines 0 and 1.
void put_one_block_each(node& n, std::uint64_t first_key, std::uint8_t fill) {
  const std::vector<std::uint8_t> value(4096, fill);
  for (std::uint32_t slot = 0; slot < 2; ++slot) {
    actors::put_request p;
    p.key = block_key{first_key + slot, 1};
    auto put = n.put_block(slot, p, value);
    ASSERT_TRUE(put.has_value()) << put.error().describe();
  }
}

// A commit the engine refuses as busy (the block's parent is still being
// put, here by another caller) leaves the put open in the engine: put_block
// aborts it, so the same put succeeds once the parent is committed. Before,
// every retry failed "another put of block ... is in progress" until the
// engine's put_timeout (30 s by default) dropped the first.
TEST_F(Node, APutBlockRefusedAsBusyCanBeRetriedAtOnce) {
  auto n = node::start(*sys_, small_node());
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto& nd = **n;
  const std::vector<std::uint8_t> value(4096, 7);
  const caf::actor e = engine_of(*sys_, nd, 0);
  caf::scoped_actor self{*sys_};
  actors::put_request parent;
  parent.key = block_key{77, 1};
  std::uint64_t ticket = 0;
  self->request(e, caf::infinite, actors::reserve_atom::value, parent)
      .receive([&](std::uint64_t t) { ticket = t; },
               [&](caf::error& err) {
                 FAIL() << actors::from_caf_error(err).describe();
               });
  actors::put_request child;
  child.key = block_key{77, 2};
  child.parent = parent.key;
  auto busy = nd.put_block(0, child, value);
  ASSERT_FALSE(busy.has_value());
  EXPECT_EQ(busy.error().code, errc::busy) << busy.error().describe();
  for (const bool commit : {false, true}) {
    const auto done = [](bool) {};
    const auto failed = [](caf::error& err) {
      FAIL() << actors::from_caf_error(err).describe();
    };
    if (commit)
      self->request(e, caf::infinite, actors::commit_atom::value, ticket)
          .receive(done, failed);
    else
      self->request(e, caf::infinite, actors::write_atom::value, ticket, value)
          .receive(done, failed);
  }
  auto retry = nd.put_block(0, child, value);
  ASSERT_TRUE(retry.has_value()) << retry.error().describe();
  auto got = nd.get_block(0, child.key);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  EXPECT_EQ(*got, value);
}

TEST_F(Node,
       ADiskDirectoryThatCannotBeExaminedOrAFactoryThatThrowsIsAnErrorValue) {
  // A name too long for the file system: create_directory fails, and so
  // does examining the parent. (Before, the message's is_directory() threw
  // std::filesystem::filesystem_error out of node::start.)
  const std::string dir = "/tmp/" + std::string(300, 'a');
  try {
    auto made = actors::disk_tier_per_engine(disk_config(dir))(0);
    ASSERT_FALSE(made.has_value());
    EXPECT_EQ(made.error().code, errc::io_error) << made.error().describe();
    auto started = node::start(*sys_, disk_node(dir));
    ASSERT_FALSE(started.has_value());
    EXPECT_EQ(started.error().code, errc::io_error)
        << started.error().describe();
    // A host's factory that throws: an error value naming what it threw.
    auto c = disk_node(dir);
    c.engine.make_disk =
        [](std::uint32_t) -> result<std::unique_ptr<engine::disk_tier>> {
      throw std::runtime_error("host factory failed");
    };
    auto threw = node::start(*sys_, c);
    ASSERT_FALSE(threw.has_value());
    EXPECT_EQ(threw.error().code, errc::backend_error)
        << threw.error().describe();
    EXPECT_NE(threw.error().message.find("host factory failed"),
              std::string::npos)
        << threw.error().message;
  } catch (const std::exception& e) {
    FAIL() << "threw: " << e.what();
  }
}

TEST_F(Node, AStartFailsWhenAnyInitialEnginesDiskDoesNotOpen) {
  // Engine 1's directory is locked by another disk tier. The start fails
  // with its error, naming the engine and the directory, and engine 0
  // (started before it) is stopped and gone: its directory is free at
  // once. (Before, only engine 0 opened on the caller: the balancer
  // started engine 1, which failed, was restarted and finally given up,
  // while node::start reported success.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  const auto open = actors::disk_tier_per_engine(disk_config(dir.path()));
  auto c = disk_node(dir.path());
  c.engines = 2;
  {
    auto holder = open(1);
    ASSERT_TRUE(holder.has_value()) << holder.error().describe();
    auto bad = node::start(*sys_, c);
    ASSERT_FALSE(bad.has_value()) << "engine 1's directory is locked";
    EXPECT_EQ(bad.error().code, errc::busy) << bad.error().describe();
    EXPECT_NE(bad.error().message.find("engine 1 did not start"),
              std::string::npos)
        << bad.error().message;
    EXPECT_NE(bad.error().message.find(dir.path() + "/engine-1"),
              std::string::npos)
        << bad.error().message;
    auto engine0 = open(0);
    EXPECT_TRUE(engine0.has_value())
        << "engine 0 still holds its directory: " << engine0.error().describe();
  }
  // The lock is gone: the same configuration starts both engines.
  auto good = node::start(*sys_, c);
  ASSERT_TRUE(good.has_value()) << good.error().describe();
  auto st = (*good)->stats();
  ASSERT_TRUE(st.has_value()) << st.error().describe();
  EXPECT_EQ(st->live, 2U);
  ASSERT_TRUE((*good)->stop());
}

TEST_F(Node, PersistWritesEveryEngineEvenWhenOneOfThemFails) {
  // Engine 0's disk cannot finish in time (its I/O thread is held): its
  // persist fails. Engine 1's blocks are written all the same, and the
  // error names the engine that failed. (Before, persist returned at the
  // first engine's error and never asked the engines after it.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto held = std::make_shared<gate>();
  gate_opener opener{held};
  auto held_disk = disk_config(dir.path());
  held_disk.write_fault_for_testing = waiting_at(held);
  auto n = node::start(
      *sys_, two_disk_engines(dir.path(), held_disk, disk_config(dir.path())));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(put_one_block_each(**n, 2000, 7));
  held->close();
  auto persisted = (*n)->persist(std::chrono::milliseconds{10});
  ASSERT_FALSE(persisted.has_value());
  EXPECT_EQ(persisted.error().code, errc::io_error);
  EXPECT_NE(persisted.error().message.find("engine 0"), std::string::npos)
      << persisted.error().message;
  held->open();
  auto es = (*n)->engine_stats(1);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_EQ(es->disk_blocks, 1U) << "engine 1 was not persisted";
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, ADrainingEngineIsReadAndPersistedButTakesNoNewBlock) {
  // Engine 1 is retired while a request waits in its batch (batches close
  // only at their timeout, an hour): it drains, holding its blocks until
  // that request is answered. persist() writes its block too. (Before, it
  // asked only the engines stats() read as up, which a draining one is
  // not, so engine 1's block was neither written nor counted.) Its block
  // can be read, but put_block and pin are refused: it exits once its
  // request is answered, and what it took would go with it (before, both
  // succeeded and the block was lost when it exited).
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto c = two_disk_engines(dir.path(), disk_config(dir.path()),
                            disk_config(dir.path()));
  c.balancer.routing.policy = actors::routing_policy::least_loaded;
  c.engine.batch.close_when_idle = false;
  c.engine.batch.timeout = std::chrono::hours{1};
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(put_one_block_each(**n, 6000, 4));
  // One request waits at each engine (least loaded: the second goes to
  // engine 1), then the highest slot, engine 1, is retired. One sender,
  // so the balancer reads them in this order.
  caf::scoped_actor self{*sys_};
  self->send((*n)->balancer(), actors::process_atom::value, chain(1));
  self->send((*n)->balancer(), actors::process_atom::value, chain(2));
  std::optional<std::uint32_t> live;
  self->request((*n)->balancer(), caf::infinite, actors::retire_atom::value)
      .receive([&](std::uint32_t x) { live = x; },
               [&](caf::error& e) { ADD_FAILURE() << caf::to_string(e); });
  ASSERT_EQ(live, 1U);
  auto st = (*n)->stats();
  ASSERT_TRUE(st.has_value()) << st.error().describe();
  ASSERT_EQ(st->up.size(), 2U);
  ASSERT_EQ(st->up[1], 0U) << "engine 1 drains";
  ASSERT_EQ(st->in_flight[1], 1U) << "its request is still in its batch";
  const block_key held{6001, 1}; // put_one_block_each's block on engine 1
  auto read = (*n)->get_block(1, held);
  ASSERT_TRUE(read.has_value()) << read.error().describe();
  EXPECT_EQ(*read, std::vector<std::uint8_t>(4096, 4));
  actors::put_request late;
  late.key = block_key{6101, 1};
  auto put = (*n)->put_block(1, late, std::vector<std::uint8_t>(4096, 5));
  ASSERT_FALSE(put.has_value());
  EXPECT_EQ(put.error().code, errc::unavailable) << put.error().describe();
  EXPECT_NE(put.error().message.find("retired"), std::string::npos)
      << put.error().message;
  auto pinned = (*n)->pin(1, held);
  ASSERT_FALSE(pinned.has_value());
  EXPECT_EQ(pinned.error().code, errc::unavailable);
  auto persisted = (*n)->persist(std::chrono::seconds(30));
  ASSERT_TRUE(persisted.has_value()) << persisted.error().describe();
  EXPECT_EQ(*persisted, 2U) << "engine 1's block was not persisted";
  auto es = (*n)->engine_stats(1);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_EQ(es->disk_blocks, 1U);
  ASSERT_TRUE((*n)->stop());
}

/// Runs requests 1 to `last` (chain(id)): 100 push request 1's blocks out
/// of a disk node's memory to its disk.
void run_chains(node& n, std::uint64_t last) {
  for (std::uint64_t id = 1; id <= last; ++id) {
    auto r = n.process_request(chain(id));
    ASSERT_TRUE(r.has_value()) << r.error().describe();
  }
}

/// The number of keys in the balancer's routing index, once it has read
/// every block event engine `slot` sent so far: engine_stats goes to the
/// engine (which publishes first) and its answer comes after those events,
/// which reach the balancer before the stats call that follows.
std::uint64_t index_keys_after_events_of(node& n, std::uint32_t slot) {
  auto es = n.engine_stats(slot);
  EXPECT_TRUE(es.has_value()) << es.error().describe();
  auto st = n.stats();
  EXPECT_TRUE(st.has_value()) << st.error().describe();
  return st ? st->index_keys : 0;
}

TEST_F(Node, TheRoutingIndexKeepsSpilledAndRecoveredBlocks) {
  // 400 blocks, memory for 64: the rest is spilled to the engine's disk,
  // from where a request is still served. The index keeps all 400 as the
  // engine's, and a node started on the same directory has them in its
  // index at once. (Before, a spill was reported as an eviction, so the
  // index held only what was in memory, and recovered blocks were never
  // reported: 0.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  {
    auto n = node::start(*sys_, disk_node(dir.path()));
    ASSERT_TRUE(n.has_value()) << n.error().describe();
    ASSERT_NO_FATAL_FAILURE(run_chains(**n, 100));
    EXPECT_EQ(index_keys_after_events_of(**n, 0), 400U);
    ASSERT_TRUE((*n)->persist(std::chrono::seconds(30)).has_value());
    ASSERT_TRUE((*n)->stop());
  }
  auto n = node::start(*sys_, disk_node(dir.path()));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  EXPECT_EQ(index_keys_after_events_of(**n, 0), 400U);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, ExpiredBlocksOnARecoveredDiskAreNotReportedHeld) {
  // A chain with a 10 s TTL persisted; the next node starts after it ran
  // out. The engine's first block_events leaves the expired blocks out,
  // though they are still in its directory: the index holds none. (Before,
  // it took every key in the directory: the index held all four.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  engine::manual_clock clock{std::chrono::hours{1}};
  auto c = disk_node(dir.path());
  c.engine.store.clock = &clock;
  c.engine.ns_options.ttl = std::chrono::seconds{10};
  auto disk = disk_config(dir.path());
  disk.clock = &clock;
  c.engine.make_disk = actors::disk_tier_per_engine(disk);
  {
    auto n = node::start(*sys_, c);
    ASSERT_TRUE(n.has_value()) << n.error().describe();
    auto r = (*n)->process_request(chain(1));
    ASSERT_TRUE(r.has_value()) << r.error().describe();
    auto persisted = (*n)->persist(std::chrono::seconds(30));
    ASSERT_TRUE(persisted.has_value()) << persisted.error().describe();
    ASSERT_EQ(*persisted, 4U);
    ASSERT_TRUE((*n)->stop());
  }
  {
    // Within the TTL, the recovered blocks are reported held.
    auto n = node::start(*sys_, c);
    ASSERT_TRUE(n.has_value()) << n.error().describe();
    EXPECT_EQ(index_keys_after_events_of(**n, 0), 4U);
    ASSERT_TRUE((*n)->stop());
  }
  clock.advance(std::chrono::seconds{11});
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  EXPECT_EQ(index_keys_after_events_of(**n, 0), 0U);
  EXPECT_EQ((*n)->lookup(chain(1).keys).value_or(99), 0U);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, ARecoveredPrefixIsRoutedToTheEngineWhoseDiskHoldsIt) {
  // A chain of four blocks put on engine 1 and persisted. On the next
  // start, kv-aware routing sends the chain's request to engine 1, which
  // serves it from disk. (Before, the index did not know recovered blocks:
  // the request went to engine 0, the least loaded by slot order, which
  // computed all four.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto c = disk_node(dir.path());
  c.engines = 2;
  const auto request = chain(9);
  {
    auto n = node::start(*sys_, c);
    ASSERT_TRUE(n.has_value()) << n.error().describe();
    block_key parent{};
    for (const auto& key : request.keys) {
      actors::put_request p;
      p.key = key;
      p.parent = parent;
      auto put = (*n)->put_block(1, p, std::vector<std::uint8_t>(4096, 6));
      ASSERT_TRUE(put.has_value()) << put.error().describe();
      parent = key;
    }
    auto persisted = (*n)->persist(std::chrono::seconds(30));
    ASSERT_TRUE(persisted.has_value()) << persisted.error().describe();
    ASSERT_EQ(*persisted, 4U);
    ASSERT_TRUE((*n)->stop());
  }
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_EQ(index_keys_after_events_of(**n, 1), 4U);
  auto r = (*n)->process_request(request);
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  EXPECT_EQ(r->engine, 1U);
  EXPECT_EQ(r->matched_blocks, 4U);
  EXPECT_EQ(r->computed_blocks, 0U);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, BlocksTheDiskTierDropsLeaveTheRoutingIndex) {
  // The disk holds about 250 of the 400 blocks: it evicts the oldest for
  // the newer spills. Those leave the index too, so after persist() (the
  // disk is idle) the index holds exactly what the engine holds: its
  // blocks on disk and those only in memory. (Reporting spilled blocks as
  // held without reporting the disk's own evictions would keep all 400.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto c = disk_node(dir.path());
  auto disk = disk_config(dir.path());
  disk.capacity_bytes = 1u << 20;
  disk.segment_bytes = 128u << 10;
  c.engine.make_disk = actors::disk_tier_per_engine(disk);
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(run_chains(**n, 100));
  auto persisted = (*n)->persist(std::chrono::seconds(30));
  ASSERT_TRUE(persisted.has_value()) << persisted.error().describe();
  auto es = (*n)->engine_stats(0);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  ASSERT_LT(es->disk_blocks + es->blocks, 400U) << "the disk evicted nothing";
  // In memory and on disk, counted once.
  const auto held = es->disk_blocks + es->blocks - *persisted;
  EXPECT_EQ(index_keys_after_events_of(**n, 0), held);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, AStartRefusedForItsConfigurationOpensNoDiskDirectory) {
  // A bad query-cache URL is found before any engine starts: engine 0 does
  // not open (and lock) its disk directory, so a start with the URL fixed
  // right after finds it free. (Before, engine 0 had it open and was only
  // told to stop: the next start could find it busy.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto c = disk_node(dir.path());
  c.query_cache = true;
  c.cache.redis_url = "http://not-redis";
  auto bad = node::start(*sys_, c);
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code, errc::parse_error) << bad.error().describe();
  EXPECT_FALSE(std::filesystem::exists(dir.path() + "/engine-0"));
  auto good = node::start(*sys_, disk_node(dir.path()));
  ASSERT_TRUE(good.has_value()) << good.error().describe();
  ASSERT_TRUE((*good)->stop());
}

TEST_F(Node, StopWaitsForAnEngineRestartedWhileItStops) {
  // Engine 1 is killed and restarted (restart_delay 0) while the node
  // stops: whether the restart came before the stop or not, no engine
  // holds a directory once stop() returns. (Before, stop() waited only for
  // the engines it listed before stopping the balancer, which could still
  // start one in between.) Several rounds, as the timing varies.
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  for (int round = 0; round < 20; ++round) {
    auto c = disk_node(dir.path());
    c.engines = 2;
    c.balancer.restart_delay = std::chrono::milliseconds{0};
    auto n = node::start(*sys_, c);
    ASSERT_TRUE(n.has_value()) << n.error().describe();
    auto e1 = engine_of(*sys_, **n, 1);
    ASSERT_TRUE(e1) << "round " << round;
    caf::anon_send_exit(e1, caf::exit_reason::kill);
    ASSERT_TRUE((*n)->stop()) << "round " << round;
    const auto open = actors::disk_tier_per_engine(disk_config(dir.path()));
    for (std::uint32_t slot = 0; slot < 2; ++slot) {
      auto tier = open(slot);
      ASSERT_TRUE(tier.has_value())
          << "round " << round << ": " << tier.error().describe();
    }
  }
}

TEST_F(Node, CallsWhileTheNodeStopsGetAnAnswerOrAClearError) {
  // Host threads keep calling while another thread stops the node: each
  // call is answered, or fails with "actor not running" or as a request
  // to a stopped actor; none reads a handle stop() is resetting. (Before,
  // stop() reset the actor handles that concurrent calls read: a data race.)
  auto n = node::start(*sys_, small_node());
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto& nd = **n;
  constexpr std::uint64_t threads = 4;
  std::latch calling{static_cast<std::ptrdiff_t>(threads)};
  std::atomic<std::uint64_t> unclear{0};
  std::vector<std::thread> hosts;
  for (std::uint64_t t = 0; t < threads; ++t)
    hosts.emplace_back([&, t] {
      bool arrived = false;
      for (std::uint64_t i = 0;; ++i) {
        auto r = req(t * 1'000'000 + i, t % 2 == 0 ? "q" : "");
        auto rep = nd.process_request(r);
        auto st = nd.stats();
        if (!arrived) {
          calling.count_down();
          arrived = true;
        }
        const auto check = [&](const auto& answer) {
          if (!answer && answer.error().code != errc::invalid_argument &&
              answer.error().code != errc::unavailable)
            ++unclear;
        };
        check(rep);
        check(st);
        if (!rep && !st)
          return;
      }
    });
  calling.wait();
  auto stopped = nd.stop();
  for (auto& h : hosts)
    h.join();
  EXPECT_TRUE(stopped.has_value()) << stopped.error().describe();
  EXPECT_EQ(unclear.load(), 0U);
  auto after = nd.stats();
  ASSERT_FALSE(after.has_value());
  EXPECT_EQ(after.error().code, errc::invalid_argument);
}

TEST_F(Node, AnEngineRestartedAfterAKillRecoversItsDiskDirectory) {
  // Engine 0 is killed: the balancer restarts it on the same directory
  // (the killed one released it), and the blocks it had spilled there come
  // back from disk.
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto c = disk_node(dir.path());
  c.balancer.restart_delay = std::chrono::milliseconds{1};
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(run_chains(**n, 100));
  auto e0 = engine_of(*sys_, **n, 0);
  ASSERT_TRUE(e0);
  {
    caf::scoped_actor self{*sys_};
    self->monitor(e0);
    caf::anon_send_exit(e0, caf::exit_reason::kill);
    self->receive([](const caf::down_msg&) {});
  }
  // Wait for the restart (1 ms away), reading the balancer's stats.
  auto restarted = stats_once(**n, [](const actors::balancer_stats& st) {
    return st.restarts == 1 && st.up.at(0) == 1;
  });
  ASSERT_TRUE(restarted.has_value());
  ASSERT_TRUE(restarted->restarts == 1 && restarted->up.at(0) == 1);
  auto es = (*n)->engine_stats(0);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_TRUE(es->disk);
  EXPECT_EQ(es->requests, 0U) << "not a fresh engine";
  EXPECT_GE(es->disk_blocks, 4U * (100 - 16));
  auto again = (*n)->process_request(chain(1));
  ASSERT_TRUE(again.has_value()) << again.error().describe();
  EXPECT_EQ(again->matched_blocks, 4U);
  EXPECT_EQ(again->computed_blocks, 0U);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, LookupCountsTheBlocksAnEngineHoldsOnDisk) {
  // What lookup says is cached is what a request then matches, also when
  // the blocks are only on the engine's disk (spilled, or recovered by a
  // new node). (Before, lookup counted memory only: 0 for both.) The
  // engine's stats count the blocks on disk as hits, once: the engine asks
  // its store one lookup (before, two, and the disk's blocks were misses).
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  {
    auto n = node::start(*sys_, disk_node(dir.path()));
    ASSERT_TRUE(n.has_value()) << n.error().describe();
    ASSERT_NO_FATAL_FAILURE(run_chains(**n, 100));
    auto before = (*n)->engine_stats(0);
    ASSERT_TRUE(before.has_value()) << before.error().describe();
    auto spilled = (*n)->lookup(chain(1).keys);
    ASSERT_TRUE(spilled.has_value()) << spilled.error().describe();
    EXPECT_EQ(*spilled, 4U);
    auto after = (*n)->engine_stats(0);
    ASSERT_TRUE(after.has_value()) << after.error().describe();
    EXPECT_EQ(after->block_hits - before->block_hits, 4U);
    EXPECT_EQ(after->block_misses - before->block_misses, 0U);
    auto unknown = (*n)->lookup({block_key{1, 1}});
    ASSERT_TRUE(unknown.has_value()) << unknown.error().describe();
    EXPECT_EQ(*unknown, 0U);
    ASSERT_TRUE((*n)->stop());
  }
  auto n = node::start(*sys_, disk_node(dir.path()));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto recovered = (*n)->lookup(chain(2).keys);
  ASSERT_TRUE(recovered.has_value()) << recovered.error().describe();
  EXPECT_EQ(*recovered, 4U);
  auto r = (*n)->process_request(chain(2));
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  EXPECT_EQ(r->matched_blocks, *recovered);
  ASSERT_TRUE((*n)->stop());
}

/// disk_node without adaptive compression: blocks reach the disk as they
/// were computed, so a value read back is what the producer made.
node_config exact_disk_node(const std::string& dir) {
  auto c = disk_node(dir);
  c.engine.store.adaptive_compression = false;
  return c;
}

/// What the engines' synthetic producer computes for `key`.
std::vector<std::uint8_t> produced(const node_config& c, const block_key& key) {
  std::vector<std::uint8_t> out(c.engine.ns.value_bytes());
  engine::synthetic_producer producer;
  EXPECT_TRUE(
      producer.produce(c.engine.ns, key, std::as_writable_bytes(std::span{out}))
          .has_value());
  return out;
}

/// Flips a payload byte of every record of `key` in the segment files in
/// `dir` (a disk tier's directory that no tier has open); how many.
std::size_t damage_on_disk(const std::string& dir, const block_key& key) {
  std::size_t damaged = 0;
  for (const auto& f : std::filesystem::directory_iterator(dir)) {
    if (f.path().extension() != ".kvs")
      continue;
    std::fstream io(f.path(), std::ios::in | std::ios::out | std::ios::binary);
    const std::uint64_t size = std::filesystem::file_size(f.path());
    std::array<std::byte, engine::record_header_bytes> raw{};
    for (std::uint64_t at = engine::segment_header_bytes;
         at + raw.size() <= size;) {
      io.seekg(static_cast<std::streamoff>(at));
      io.read(reinterpret_cast<char*>(raw.data()), raw.size());
      const auto h = engine::decode_record_header(raw);
      if (!h)
        break;
      if (h->key == key) {
        const auto payload = static_cast<std::streamoff>(at + raw.size() + 10);
        char c = 0;
        io.seekg(payload);
        io.read(&c, 1);
        c = static_cast<char>(c ^ 0x5a);
        io.seekp(payload);
        io.write(&c, 1);
        ++damaged;
      }
      at += h->record_bytes();
    }
  }
  return damaged;
}

TEST_F(Node, GetBlockReadsABlockOnlyOnTheEnginesDisk) {
  // lookup counts a block on disk, and get_block now returns it. (Before,
  // errc::not_found until a request brought its chain back.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  const auto c = exact_disk_node(dir.path());
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(run_chains(**n, 100));
  const auto one = chain(1).keys;
  ASSERT_EQ((*n)->lookup(one).value_or(0), 4U);
  auto got = (*n)->get_block(0, one[2]);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  EXPECT_EQ(*got, produced(c, one[2]));
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, PinAndUnpinReachABlockOnlyOnTheEnginesDisk) {
  // (Before, both errc::not_found.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto n = node::start(*sys_, exact_disk_node(dir.path()));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(run_chains(**n, 100));
  const block_key key = chain(2).keys[1];
  auto pin = (*n)->pin(0, key);
  ASSERT_TRUE(pin.has_value()) << pin.error().describe();
  auto unpin = (*n)->unpin(0, key);
  ASSERT_TRUE(unpin.has_value()) << unpin.error().describe();
  auto twice = (*n)->unpin(0, key);
  ASSERT_FALSE(twice.has_value());
  EXPECT_EQ(twice.error().code, errc::invalid_argument);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, ReadsAndPinsFromDiskRelieveMemoryPressure) {
  // Reading or pinning a block only on disk brings it back: memory fills
  // up, and the memory manager (here above half the pool, down to 0.4)
  // brings it down to its target after each call, as after a request.
  // (Before, relief waited for the next request or put: sixteen reads left
  // the pool above its threshold.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto c = exact_disk_node(dir.path());
  c.engine.pressure.threshold = 0.5;
  c.engine.pressure.target = 0.4;
  c.engine.store.max_pinned_fraction = 0.3; // below the target
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(run_chains(**n, 100));
  auto before = (*n)->engine_stats(0);
  ASSERT_TRUE(before.has_value()) << before.error().describe();
  const auto under_threshold = [](const actors::engine_stats& es) {
    return es.used_bytes * 2 <= es.capacity_bytes;
  };
  ASSERT_TRUE(under_threshold(*before));
  for (std::uint64_t id = 1; id <= 4; ++id) {
    for (const auto& key : chain(id).keys) {
      auto got = (*n)->get_block(0, key);
      ASSERT_TRUE(got.has_value()) << got.error().describe();
    }
  }
  auto after_reads = (*n)->engine_stats(0);
  ASSERT_TRUE(after_reads.has_value()) << after_reads.error().describe();
  EXPECT_TRUE(under_threshold(*after_reads))
      << after_reads->used_bytes << " of " << after_reads->capacity_bytes;
  EXPECT_GT(after_reads->pressure_evictions, before->pressure_evictions);
  for (std::uint64_t id = 5; id <= 8; ++id) {
    for (const auto& key : chain(id).keys) {
      auto pinned = (*n)->pin(0, key);
      ASSERT_TRUE(pinned.has_value()) << pinned.error().describe();
      auto unpinned = (*n)->unpin(0, key);
      ASSERT_TRUE(unpinned.has_value()) << unpinned.error().describe();
    }
  }
  auto after_pins = (*n)->engine_stats(0);
  ASSERT_TRUE(after_pins.has_value()) << after_pins.error().describe();
  EXPECT_TRUE(under_threshold(*after_pins))
      << after_pins->used_bytes << " of " << after_pins->capacity_bytes;
  EXPECT_GT(after_pins->pressure_evictions, after_reads->pressure_evictions);
  ASSERT_TRUE((*n)->stop());
}

/// The sizes of the block_events a new listener of engine `slot` gets
/// first (the snapshot of its disk), once it has `expected` keys or the
/// engine is silent for a minute (only a guard against a hang: the chunks
/// come at once), and the distinct keys they stored.
struct disk_snapshot {
  std::vector<std::size_t> sizes;
  std::set<block_key> keys;
};

disk_snapshot snapshot_of(caf::actor_system& sys, node& n, std::uint32_t slot,
                          std::size_t expected) {
  disk_snapshot out;
  auto engine = engine_of(sys, n, slot);
  if (!engine) {
    ADD_FAILURE() << "no engine in slot " << slot;
    return out;
  }
  caf::scoped_actor self{sys};
  self->send(engine, actors::listen_atom::value,
             caf::actor_cast<caf::actor>(self));
  bool silent = false;
  while (out.keys.size() < expected && !silent) {
    self->receive(
        [&](const actors::block_events& ev) {
          EXPECT_TRUE(ev.evicted.empty());
          // A disk engine first tells a new listener its pins, no keys.
          if (ev.stored.empty())
            return;
          out.sizes.push_back(ev.stored.size());
          out.keys.insert(ev.stored.begin(), ev.stored.end());
        },
        caf::after(std::chrono::seconds(60)) >> [&] { silent = true; });
  }
  return out;
}

TEST_F(Node, ANewListenersSnapshotOfTheDiskIsChunkedAndBounded) {
  // About 4700 blocks on the engine's disk, a bound of 4500: a new
  // listener gets 4500 keys of the disk, at most 4096 per message. (Before,
  // every key on disk in one message, however many: a large directory
  // flushed the balancer's index.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto c = disk_node(dir.path());
  c.engine.snapshot_keys = 4500;
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(run_chains(**n, 1200));
  auto es = (*n)->engine_stats(0);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  ASSERT_GT(es->disk_spills, 4500U);
  auto snap = snapshot_of(*sys_, **n, 0, 4500);
  EXPECT_EQ(snap.keys.size(), 4500U);
  EXPECT_EQ(snap.sizes, (std::vector<std::size_t>{4096, 404}));
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, TheDiskSnapshotBoundIsTheEnginesShareOfTheRoutersIndex) {
  // snapshot_keys left unset: the node bounds each engine's snapshot by
  // its share of the router's index, max_index_keys 9000 over 2 engines.
  // Engine 0 holds about 4700 blocks on disk (round robin: every other
  // chain); a new listener gets 4500 of them. A snapshot_keys set by the
  // caller wins. (Before, a fixed 2^20 / 64 = 16384 whatever the index:
  // all 4700.)
  for (const std::optional<std::size_t> set :
       {std::optional<std::size_t>{}, std::optional<std::size_t>{4200}}) {
    temp_dir dir;
    ASSERT_FALSE(dir.path().empty());
    auto c = two_disk_engines(dir.path(), disk_config(dir.path()),
                              disk_config(dir.path()));
    c.balancer.routing.policy = actors::routing_policy::round_robin;
    c.balancer.routing.max_index_keys = 9000;
    c.engine.snapshot_keys = set;
    auto n = node::start(*sys_, c);
    ASSERT_TRUE(n.has_value()) << n.error().describe();
    ASSERT_NO_FATAL_FAILURE(run_chains(**n, 2400));
    auto es = (*n)->engine_stats(0);
    ASSERT_TRUE(es.has_value()) << es.error().describe();
    ASSERT_GT(es->disk_spills, 4500U);
    const std::size_t bound = set.value_or(4500);
    auto snap = snapshot_of(*sys_, **n, 0, bound);
    EXPECT_EQ(snap.keys.size(), bound);
    EXPECT_EQ(snap.sizes, (std::vector<std::size_t>{4096, bound - 4096}));
    ASSERT_TRUE((*n)->stop());
  }
}

TEST_F(Node, EveryEnginesSnapshotShareCountsTheScalersMostReplicas) {
  // A node of 3 engines fills each one's disk with 560 blocks. A node of 2
  // engines whose scaler may run 3 then reopens the directories: each
  // engine's snapshot, the replica's in slot 2 too, is max_index_keys 900
  // over 3 engines, 300 keys, so the 3 snapshots fit the index. (Before,
  // 900 over the 2 initial engines, 450 each and for the replica too:
  // 1350 keys for an index of 900.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto c = disk_node(dir.path());
  c.engines = 3;
  c.balancer.routing.policy = actors::routing_policy::round_robin;
  c.balancer.routing.max_index_keys = 900;
  {
    auto n = node::start(*sys_, c);
    ASSERT_TRUE(n.has_value()) << n.error().describe();
    ASSERT_NO_FATAL_FAILURE(run_chains(**n, 420));
    ASSERT_TRUE((*n)->persist(std::chrono::seconds(30)).has_value());
    for (std::uint32_t slot = 0; slot < 3; ++slot) {
      auto es = (*n)->engine_stats(slot);
      ASSERT_TRUE(es.has_value()) << es.error().describe();
      ASSERT_GT(es->disk_blocks, 450U) << "engine " << slot;
    }
    ASSERT_TRUE((*n)->stop());
  }
  c.engines = 2;
  c.scaler.emplace();
  c.scaler->policy.max_replicas = 3;
  c.scaler->interval = std::chrono::hours{1}; // it decides nothing here
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto first = snapshot_of(*sys_, **n, 0, 300);
  EXPECT_EQ(first.keys.size(), 300U);
  caf::scoped_actor self{*sys_};
  std::optional<std::uint32_t> live;
  self->request((*n)->balancer(), caf::infinite, actors::replica_atom::value)
      .receive([&](std::uint32_t engines) { live = engines; },
               [&](caf::error& e) { ADD_FAILURE() << caf::to_string(e); });
  ASSERT_EQ(live, 3U);
  auto replica = snapshot_of(*sys_, **n, 2, 300);
  EXPECT_EQ(replica.keys.size(), 300U);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, APutExtendsAPrefixOnlyOnTheEnginesDisk) {
  // The host's flow: lookup, then put the next block of the chain under
  // the last one found. (Before, errc::not_found: the parent was only on
  // disk. And lookup then stopped before the block put.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  const auto c = exact_disk_node(dir.path());
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(run_chains(**n, 100));
  auto keys = chain(3).keys;
  ASSERT_EQ((*n)->lookup(keys).value_or(0), 4U);
  actors::put_request put;
  put.key = block_key{1003, 5};
  put.parent = keys.back();
  const std::vector<std::uint8_t> value(c.engine.ns.value_bytes(), 7);
  auto stored = (*n)->put_block(0, put, value);
  ASSERT_TRUE(stored.has_value()) << stored.error().describe();
  keys.push_back(put.key);
  auto longer = (*n)->lookup(keys);
  ASSERT_TRUE(longer.has_value()) << longer.error().describe();
  EXPECT_EQ(*longer, 5U) << "the block put after the prefix on disk counts";
  auto back = (*n)->get_block(0, put.key);
  ASSERT_TRUE(back.has_value()) << back.error().describe();
  EXPECT_EQ(*back, value);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, GetBlockNeverServesABlockDamagedOnDisk) {
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  const auto c = exact_disk_node(dir.path());
  const auto one = chain(1).keys;
  {
    auto n = node::start(*sys_, c);
    ASSERT_TRUE(n.has_value()) << n.error().describe();
    ASSERT_NO_FATAL_FAILURE(run_chains(**n, 100));
    ASSERT_TRUE((*n)->stop()); // its disk tier is closed: the files are still
  }
  ASSERT_GE(damage_on_disk(dir.path() + "/engine-0", one[0]), 1U);
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto got = (*n)->get_block(0, one[0]);
  ASSERT_FALSE(got.has_value()) << "damaged bytes were served";
  EXPECT_EQ(got.error().code, errc::checksum_mismatch);
  // Dropped, from disk too: asked again, it is not there.
  auto again = (*n)->get_block(0, one[0]);
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().code, errc::not_found);
  auto neighbour = (*n)->get_block(0, one[1]);
  ASSERT_TRUE(neighbour.has_value()) << neighbour.error().describe();
  EXPECT_EQ(*neighbour, produced(c, one[1]));
  ASSERT_TRUE((*n)->stop());
}

/// A disk tier's writes, all failing (EIO), and how many of them the tier
/// had answered when it last told its owner of completions.
struct spill_watch {
  std::mutex mutex;
  std::condition_variable cv;
  std::uint64_t faults = 0;
  std::uint64_t answered = 0;

  int fault() {
    std::lock_guard lock{mutex};
    ++faults;
    return EIO;
  }
  void completed() {
    {
      std::lock_guard lock{mutex};
      answered = faults;
    }
    cv.notify_all();
  }
  void wait_answered(std::uint64_t n) {
    std::unique_lock lock{mutex};
    cv.wait(lock, [&] { return answered >= n; });
  }
};

TEST_F(Node, EngineStatsCountSpillsThatFailedAfterTheLastRequest) {
  // Every write to the engine's disk fails. Once the tier has answered
  // every spill, the engine's stats count each as failed and none as
  // written, with no request after the last spills. (Before, failures were
  // collected only at the engine's next request, put or eviction: an idle
  // engine went on counting its last spills as written.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto watch = std::make_shared<spill_watch>();
  auto c = disk_node(dir.path());
  auto disk = disk_config(dir.path());
  disk.write_fault_for_testing = [watch] { return watch->fault(); };
  disk.on_completion = [watch] { watch->completed(); };
  c.engine.make_disk = actors::disk_tier_per_engine(disk);
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(run_chains(**n, 20));
  // The last request evicts (40 new blocks in memory for 64): its spills
  // are issued inside it, and no call of the engine's store follows.
  kv_request last;
  last.id = 1000;
  for (std::uint64_t b = 1; b <= 40; ++b)
    last.keys.push_back(block_key{7000, b});
  last.input_tokens = 640;
  auto r = (*n)->process_request(last);
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  auto before = (*n)->engine_stats(0);
  ASSERT_TRUE(before.has_value()) << before.error().describe();
  ASSERT_GT(before->evictions, 0U);
  watch->wait_answered(before->evictions);
  auto es = (*n)->engine_stats(0);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_EQ(es->evictions, before->evictions);
  EXPECT_EQ(es->disk_spills, 0U);
  EXPECT_EQ(es->disk_spill_failures, es->evictions);
  EXPECT_EQ(es->disk_blocks, 0U);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, ASpillThatFailsLeavesTheListenersIndexWithNoCallAfterIt) {
  // Every write to the engine's disk waits at a gate, then fails. The
  // requests' evictions queue spills (their blocks are reported stored:
  // on their way to disk); the gate opens, every spill fails, and with no
  // call of the engine after that, a listener of the engine learns that
  // those blocks are gone (within the engine's expiry sweep): the blocks it
  // believes held are those in memory.
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto held = std::make_shared<gate>();
  const gate_opener opener{held};
  auto c = disk_node(dir.path());
  auto disk = disk_config(dir.path());
  disk.write_fault_for_testing = [held] {
    held->wait();
    return EIO;
  };
  c.engine.make_disk = actors::disk_tier_per_engine(disk);
  c.engine.expire_interval = std::chrono::milliseconds{20};
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto engine = engine_of(*sys_, **n, 0);
  ASSERT_TRUE(engine);
  caf::scoped_actor self{*sys_};
  self->send(engine, actors::listen_atom::value,
             caf::actor_cast<caf::actor>(self));
  held->close();
  ASSERT_NO_FATAL_FAILURE(run_chains(**n, 30));
  // Publishes what the requests did; the spills are all still queued.
  auto es = (*n)->engine_stats(0);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  ASSERT_GT(es->evictions, 0U);
  std::set<block_key> believed;
  const auto take = [&](const actors::block_events& ev) {
    believed.insert(ev.stored.begin(), ev.stored.end());
    for (const auto& k : ev.evicted)
      believed.erase(k);
  };
  // Every event published so far is in the mailbox (sent before the
  // stats reply).
  for (bool empty = false; !empty;)
    self->receive(
        take, caf::after(std::chrono::seconds(0)) >> [&] { empty = true; });
  ASSERT_GT(believed.size(), es->blocks) << "spills on their way count held";
  held->open();
  bool silent = false;
  while (believed.size() != es->blocks && !silent)
    self->receive(
        take, caf::after(std::chrono::seconds(60)) >> [&] { silent = true; });
  EXPECT_EQ(believed.size(), es->blocks)
      << "spills that failed stay in the listener's index";
  auto after = (*n)->engine_stats(0);
  ASSERT_TRUE(after.has_value()) << after.error().describe();
  EXPECT_EQ(after->blocks, es->blocks);
  EXPECT_EQ(after->disk_blocks, 0U);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, AnEngineWhoseListenersHaveGoneKeepsNoDiskRemovals) {
  // The disk tier records the keys that leave it for the engine's
  // listeners only (disk_tier::record_removals): once the last listener has
  // gone, the spills that fail are not recorded (before, the first
  // listener turned the recording on for good). Every write waits at a
  // gate, then fails, so the failures come after the requests' own
  // publish, with no call of the engine after them.
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto held = std::make_shared<gate>();
  const gate_opener opener{held};
  auto watch = std::make_shared<spill_watch>();
  auto disk = disk_config(dir.path());
  disk.write_fault_for_testing = [held, watch] {
    held->wait();
    return watch->fault();
  };
  disk.on_completion = [watch] { watch->completed(); };
  // The engine's disk tier, for the test to look into once the engine is
  // idle (the tier is thread-safe).
  auto tier = std::make_shared<std::atomic<engine::disk_tier*>>(nullptr);
  auto c = disk_node(dir.path()).engine;
  c.make_disk = [open = actors::disk_tier_per_engine(disk),
                 tier](std::uint32_t slot) {
    auto d = open(slot);
    if (d)
      tier->store(d->get());
    return d;
  };
  auto e = actors::spawn_engine_actor(*sys_, c);
  ASSERT_TRUE(e.has_value()) << e.error().describe();
  caf::scoped_actor self{*sys_};
  const auto listeners = [&] {
    std::optional<std::uint32_t> n;
    self->request(*e, std::chrono::seconds(60), actors::stats_atom::value)
        .receive([&](const actors::engine_stats& st) { n = st.listeners; },
                 [&](caf::error& err) { ADD_FAILURE() << to_string(err); });
    return n;
  };
  {
    caf::scoped_actor listener{*sys_};
    self->send(*e, actors::listen_atom::value,
               caf::actor_cast<caf::actor>(listener));
    ASSERT_EQ(listeners(), 1U);
  }
  ASSERT_EQ(listeners(), 0U);
  held->close();
  for (std::uint64_t id = 1; id <= 30; ++id) // 120 blocks for 64
    self->request(*e, std::chrono::seconds(60), actors::process_atom::value,
                  chain(id))
        .receive([](const actors::kv_reply&) {},
                 [&](caf::error& err) { ADD_FAILURE() << to_string(err); });
  held->open();
  watch->wait_answered(1);
  ASSERT_NE(tier->load(), nullptr);
  EXPECT_EQ(tier->load()->drain_removed([](const block_key&) {}), 0U)
      << "failed spills recorded with no listener left";
  self->monitor(*e);
  caf::anon_send_exit(*e, caf::exit_reason::kill);
  self->receive([](const caf::down_msg&) {});
}

TEST_F(Node, PersistWritesMoreThanTheDiskQueueHolds) {
  // The disk tier queues at most max_queued_bytes of spills (here four
  // blocks) and refuses more while they wait for the disk. persist() waits
  // for the disk instead: all 40 blocks in memory are written, none is
  // refused. (Before, it queued them all at once: the tier refused most as
  // busy, and they counted as failed spills.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto c = disk_node(dir.path());
  auto disk = disk_config(dir.path());
  disk.max_queued_bytes = std::uint64_t{4} * 4096;
  c.engine.make_disk = actors::disk_tier_per_engine(disk);
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(run_chains(**n, 10));
  auto persisted = (*n)->persist(std::chrono::seconds(30));
  ASSERT_TRUE(persisted.has_value()) << persisted.error().describe();
  EXPECT_EQ(*persisted, 40U);
  auto es = (*n)->engine_stats(0);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_EQ(es->evictions, 0U);
  EXPECT_EQ(es->disk_blocks, 40U);
  EXPECT_EQ(es->disk_spill_failures, 0U);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, AReplicaInTheSlotOfARetiredOneReopensItsDiskDirectory) {
  // A replica added in slot 1 writes a pinned block through to its disk
  // (engine-1); it is retired, and the next replica takes the slot again:
  // the retired engine released the directory, and the new one recovers
  // the block with its pin. Engine 0 holds a pin too, so that the retire
  // takes one holding pins: with every engine holding some, one with a
  // disk tier goes (the highest of the fewest pinned bytes).
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto n = node::start(*sys_, disk_node(dir.path()));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  caf::scoped_actor self{*sys_};
  ASSERT_EQ(live_after(*sys_, **n, actors::replica_atom::value), 2U);
  actors::put_request p;
  p.key = block_key{3000, 1};
  p.pin = true;
  auto put = (*n)->put_block(1, p, std::vector<std::uint8_t>(4096, 9));
  ASSERT_TRUE(put.has_value()) << put.error().describe();
  p.key = block_key{3000, 2};
  put = (*n)->put_block(0, p, std::vector<std::uint8_t>(4096, 9));
  ASSERT_TRUE(put.has_value()) << put.error().describe();
  // The engines tell the balancer of their pins in their block events.
  const auto both_pin = [](const actors::balancer_stats& st) {
    return st.pinned_bytes.size() == 2 && st.pinned_bytes[0] > 0 &&
           st.pinned_bytes[1] > 0;
  };
  const auto told = stats_once(**n, both_pin);
  ASSERT_TRUE(told.has_value());
  ASSERT_TRUE(both_pin(*told));
  auto retired = engine_of(*sys_, **n, 1);
  ASSERT_TRUE(retired);
  self->monitor(retired);
  ASSERT_EQ(live_after(*sys_, **n, actors::retire_atom::value), 1U);
  self->receive([](const caf::down_msg&) {});
  // The balancer frees the slot when it sees the engine stop.
  ASSERT_TRUE(slot_freed(*sys_, **n, 1));
  ASSERT_EQ(live_after(*sys_, **n, actors::replica_atom::value), 2U);
  auto es = (*n)->engine_stats(1);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_EQ(es->requests, 0U) << "not the new replica";
  EXPECT_EQ(es->disk_blocks, 1U);
  auto lk = (*n)->stats();
  ASSERT_TRUE(lk.has_value()) << lk.error().describe();
  EXPECT_EQ(lk->routed.size(), 2U) << "the replica took another slot";
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, ARetirePassesOverAnEngineWhosePinsAreOnlyOnDisk) {
  // Engine 1 pins a block (written through to its disk with the pin), is
  // killed and restarted: the new engine recovers the pinned copy on disk
  // and holds no pin in memory. It tells the balancer (pinned_on_disk), so
  // the retire takes engine 0, which holds no pin; the pin can still be
  // taken back on slot 1. (Before, slot 1 read as holding none, was
  // retired, and the unpin found no engine.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto c = disk_node(dir.path());
  c.balancer.restart_delay = std::chrono::milliseconds{1};
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  caf::scoped_actor self{*sys_};
  ASSERT_EQ(live_after(*sys_, **n, actors::replica_atom::value), 2U);
  actors::put_request p;
  p.key = block_key{3000, 1};
  p.pin = true;
  auto put = (*n)->put_block(1, p, std::vector<std::uint8_t>(4096, 9));
  ASSERT_TRUE(put.has_value()) << put.error().describe();
  auto e1 = engine_of(*sys_, **n, 1);
  ASSERT_TRUE(e1);
  self->monitor(e1);
  caf::anon_send_exit(e1, caf::exit_reason::kill);
  self->receive([](const caf::down_msg&) {});
  // The restart (1 ms away) recovers the copy and reports its pin.
  const auto recovered = [](const actors::balancer_stats& st) {
    return st.restarts == 1 && st.up.at(1) == 1 && st.pinned_on_disk.at(1) == 1;
  };
  const auto told = stats_once(**n, recovered);
  ASSERT_TRUE(told.has_value());
  ASSERT_TRUE(recovered(*told));
  auto st = (*n)->stats();
  ASSERT_TRUE(st.has_value()) << st.error().describe();
  EXPECT_EQ(st->pinned_bytes, (std::vector<std::uint64_t>{0, 0}));
  EXPECT_EQ(st->pinned_on_disk, (std::vector<std::uint64_t>{0, 1}));
  ASSERT_EQ(live_after(*sys_, **n, actors::retire_atom::value), 1U);
  st = (*n)->stats();
  ASSERT_TRUE(st.has_value()) << st.error().describe();
  EXPECT_EQ(st->up, (std::vector<std::uint8_t>{0, 1}))
      << "the engine whose pin is on disk was retired";
  auto unpinned = (*n)->unpin(1, p.key);
  EXPECT_TRUE(unpinned.has_value()) << unpinned.error().describe();
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, ARetiredEnginePersistsItsBlocksForTheNextEngineInItsSlot) {
  // Engine 1 holds three blocks in memory only (not pinned: nothing is
  // written through). The scaler's retire_atom drains it; it persists
  // them before it exits, so the next replica in slot 1 recovers them
  // from engine-1. (Before, the balancer told it to exit at once, and its
  // blocks went with it.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto n =
      node::start(*sys_, two_disk_engines(dir.path(), disk_config(dir.path()),
                                          disk_config(dir.path())));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  for (std::uint64_t b = 1; b <= 3; ++b) {
    actors::put_request p;
    p.key = block_key{8000, b};
    if (b > 1) {
      p.parent = block_key{8000, b - 1};
    }
    auto put = (*n)->put_block(1, p, std::vector<std::uint8_t>(4096, 5));
    ASSERT_TRUE(put.has_value()) << put.error().describe();
  }
  auto before = (*n)->engine_stats(1);
  ASSERT_TRUE(before.has_value()) << before.error().describe();
  ASSERT_EQ(before->disk_blocks, 0U) << "the blocks are in memory only";
  caf::scoped_actor self{*sys_};
  auto retired = engine_of(*sys_, **n, 1);
  ASSERT_TRUE(retired);
  self->monitor(retired);
  ASSERT_EQ(live_after(*sys_, **n, actors::retire_atom::value), 1U);
  self->receive([](const caf::down_msg&) {});
  // The balancer frees the slot when it sees the engine stop.
  ASSERT_TRUE(slot_freed(*sys_, **n, 1));
  ASSERT_EQ(live_after(*sys_, **n, actors::replica_atom::value), 2U);
  auto es = (*n)->engine_stats(1);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_EQ(es->requests, 0U) << "not the new replica";
  EXPECT_EQ(es->disk_blocks, 3U) << "the retired engine's blocks were lost";
  ASSERT_TRUE((*n)->stop());
  // A new node on the directory finds them too.
  auto again =
      node::start(*sys_, two_disk_engines(dir.path(), disk_config(dir.path()),
                                          disk_config(dir.path())));
  ASSERT_TRUE(again.has_value()) << again.error().describe();
  auto got = (*again)->get_block(1, block_key{8000, 3});
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  EXPECT_EQ(*got, std::vector<std::uint8_t>(4096, 5));
  ASSERT_TRUE((*again)->stop());
}

TEST_F(Node, AnEngineRetiringRefusesPutsAndPinsAfterItsLastPersist) {
  // The balancer retires a drained engine with a disk tier by asking it
  // persist_atom with `retiring`, then tells it to exit. A put reserved
  // before (the caller had asked engine_atom just before the retire) and
  // committed after that persist would be acked and then lost with the
  // engine: it is refused as unavailable and aborted, and so are new puts
  // and pins (pin_atom, and a process or batch request that pins); reads
  // still work. (Before, the commit was acked.) Sent here
  // by hand, so the commit lands between the persist and the exit.
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto n = node::start(*sys_, disk_node(dir.path()));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto& nd = **n;
  const std::vector<std::uint8_t> value(4096, 6);
  actors::put_request kept;
  kept.key = block_key{91, 1};
  ASSERT_TRUE(nd.put_block(0, kept, value).has_value());
  const caf::actor e = engine_of(*sys_, nd, 0);
  caf::scoped_actor self{*sys_};
  const auto failed = [](caf::error& err) {
    FAIL() << actors::from_caf_error(err).describe();
  };
  actors::put_request late;
  late.key = block_key{92, 1};
  std::uint64_t ticket = 0;
  self->request(e, caf::infinite, actors::reserve_atom::value, late)
      .receive([&](std::uint64_t t) { ticket = t; }, failed);
  self->request(e, caf::infinite, actors::write_atom::value, ticket, value)
      .receive([](bool) {}, failed);
  // `reply` is a value of the type the call answers when it succeeds.
  const auto refused = [&](auto reply, auto... msg) {
    std::optional<error> out;
    self->request(e, caf::infinite, msg...)
        .receive([](const decltype(reply)&) {},
                 [&](caf::error& err) { out = actors::from_caf_error(err); });
    return out;
  };
  // Only a listener (the balancer is one) may say the engine is retiring:
  // from anyone else it would refuse every put for good while the
  // balancer still routes to it. Refused, and the engine takes puts on.
  auto stranger = refused(std::uint64_t{}, actors::persist_atom::value,
                          std::uint64_t{30'000}, true);
  ASSERT_TRUE(stranger.has_value()) << "retired by an actor not its listener";
  EXPECT_EQ(stranger->code, errc::invalid_argument) << stranger->describe();
  actors::put_request other;
  other.key = block_key{93, 1};
  ASSERT_TRUE(nd.put_block(0, other, value).has_value());
  self->send(e, actors::listen_atom::value, caf::actor_cast<caf::actor>(self));
  std::uint64_t persisted = 0;
  self->request(e, caf::infinite, actors::persist_atom::value,
                std::uint64_t{30'000}, true)
      .receive([&](std::uint64_t p) { persisted = p; }, failed);
  EXPECT_EQ(persisted, 2U);
  auto commit = refused(true, actors::commit_atom::value, ticket);
  ASSERT_TRUE(commit.has_value())
      << "a commit after the last persist was acked";
  EXPECT_EQ(commit->code, errc::unavailable) << commit->describe();
  EXPECT_NE(commit->message.find("retired"), std::string::npos)
      << commit->message;
  auto reserve = refused(std::uint64_t{}, actors::reserve_atom::value, late);
  ASSERT_TRUE(reserve.has_value());
  EXPECT_EQ(reserve->code, errc::unavailable) << reserve->describe();
  auto pin = refused(true, actors::pin_atom::value, kept.key);
  ASSERT_TRUE(pin.has_value());
  EXPECT_EQ(pin->code, errc::unavailable) << pin->describe();
  // A request that pins its blocks too, through the batcher or as a batch
  // (before, it was processed and pinned: pins that went with the engine).
  kv_request pinning;
  pinning.id = 1;
  pinning.keys = {kept.key};
  pinning.input_tokens = 16;
  pinning.pin = true;
  auto by_process =
      refused(actors::kv_reply{}, actors::process_atom::value, pinning);
  ASSERT_TRUE(by_process.has_value()) << "a pinning request was processed";
  EXPECT_EQ(by_process->code, errc::unavailable) << by_process->describe();
  auto by_batch =
      refused(std::vector<actors::kv_reply>{}, actors::batch_atom::value,
              std::vector<kv_request>{pinning});
  ASSERT_TRUE(by_batch.has_value()) << "a pinning batch was processed";
  EXPECT_EQ(by_batch->code, errc::unavailable) << by_batch->describe();
  // The refused put was aborted, not left open to its put_timeout.
  auto gone = refused(true, actors::commit_atom::value, ticket);
  ASSERT_TRUE(gone.has_value());
  EXPECT_EQ(gone->code, errc::invalid_handle) << gone->describe();
  auto got = nd.get_block(0, kept.key);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  EXPECT_EQ(*got, value);
  auto lost = nd.get_block(0, late.key);
  ASSERT_FALSE(lost.has_value());
  EXPECT_EQ(lost.error().code, errc::not_found) << lost.error().describe();
  ASSERT_TRUE(nd.stop());
}

TEST_F(Node, StopAgainAfterATimeoutWaitsForTheEnginesLeft) {
  // The engine's disk is held (a pinned block's write waits at the gate),
  // so the engine cannot finish stopping: stop() times out. Once the disk
  // goes on, a second stop() waits for the engine, and its directory is
  // free when it returns. (Before, a second stop() returned at once, while
  // the engine could still hold the directory.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto held = std::make_shared<gate>();
  gate_opener opener{held};
  auto c = disk_node(dir.path());
  auto disk = disk_config(dir.path());
  disk.write_fault_for_testing = waiting_at(held);
  c.engine.make_disk = actors::disk_tier_per_engine(disk);
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  held->close();
  actors::put_request p;
  p.key = block_key{4000, 1};
  p.pin = true; // written through to disk: the write waits at the gate
  auto put = (*n)->put_block(0, p, std::vector<std::uint8_t>(4096, 3));
  ASSERT_TRUE(put.has_value()) << put.error().describe();
  auto first = (*n)->stop(std::chrono::milliseconds{10});
  ASSERT_FALSE(first.has_value());
  EXPECT_EQ(first.error().code, errc::timeout) << first.error().describe();
  held->open();
  auto second = (*n)->stop();
  ASSERT_TRUE(second.has_value()) << second.error().describe();
  auto tier = actors::disk_tier_per_engine(disk_config(dir.path()))(0);
  ASSERT_TRUE(tier.has_value()) << tier.error().describe();
  EXPECT_EQ((*tier)->stats().blocks, 1U);
}

TEST_F(Node, PersistAsksEveryEngineAtOnce) {
  // Engine 0's disk waits at a gate that engine 1's first write opens: it
  // can finish only if engine 1 persists while engine 0 does. persist()
  // asks every engine at once, so both finish and the call takes about the
  // slowest engine's time, not the sum. (Before, it asked one engine after
  // the other: engine 0 waited out the whole timeout for a write that came
  // only after it, and failed.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto held = std::make_shared<gate>();
  gate_opener opener{held};
  auto waits = disk_config(dir.path());
  waits.write_fault_for_testing = waiting_at(held);
  auto opens = disk_config(dir.path());
  opens.write_fault_for_testing = [held] {
    held->open();
    return 0;
  };
  auto n = node::start(*sys_, two_disk_engines(dir.path(), waits, opens));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(put_one_block_each(**n, 5000, 5));
  held->close();
  auto persisted = (*n)->persist(std::chrono::seconds(30));
  ASSERT_TRUE(persisted.has_value()) << persisted.error().describe();
  EXPECT_EQ(*persisted, 2U);
  ASSERT_TRUE((*n)->stop());
}

/// A producer that waits at `held` before it computes a block whose key's
/// `hi` is `held_hi`, holding its engine's thread in that request, and
/// first opens `began` (when given), so the test learns that the engine is
/// held; it computes every other block at once.
class held_producer final : public engine::kv_producer {
public:
  held_producer(std::shared_ptr<gate> held, std::uint64_t held_hi,
                std::shared_ptr<gate> began = nullptr)
      : held_(std::move(held)), began_(std::move(began)), held_hi_(held_hi) {}
  result<void> produce(const engine::namespace_spec& spec, const block_key& key,
                       std::span<std::byte> out) override {
    if (key.hi == held_hi_) {
      if (began_)
        began_->open();
      held_->wait();
    }
    return inner_.produce(spec, key, out);
  }
  engine::nanos cost(std::size_t) const noexcept override { return {}; }

private:
  std::shared_ptr<gate> held_;
  std::shared_ptr<gate> began_;
  std::uint64_t held_hi_;
  engine::synthetic_producer inner_;
};

/// Sends engine `e` a batch of one request, block {hi, 1}, and does not wait
/// for its answer: an engine whose producer is held_producer(g, hi) then
/// reads nothing more until `g` opens.
void hold_engine(const caf::actor& e, std::uint64_t hi) {
  kv_request r;
  r.id = hi;
  r.keys = {block_key{hi, 1}};
  r.input_tokens = 16;
  caf::anon_send(e, actors::batch_atom::value, std::vector<kv_request>{r});
}

/// small_node() with one engine whose producer is held_producer(held, 77,
/// began) and a call_timeout of 300 ms.
node_config held_at_77(const std::shared_ptr<gate>& held,
                       const std::shared_ptr<gate>& began) {
  auto c = small_node();
  c.engines = 1;
  c.engine.make_producer = [held, began] {
    return std::make_unique<held_producer>(held, 77, began);
  };
  c.call_timeout = std::chrono::milliseconds{300};
  return c;
}

TEST_F(Node, APinningRequestPastTheCallTimeoutLeavesNoPin) {
  // The node's call gives up at call_timeout (300 ms), long before the
  // balancer's request_timeout, while the engine is still computing the
  // pinning request. Before, the engine finished it afterwards and its
  // block stayed pinned for good: the caller, told of a timeout, has no
  // pin to take back. Now the request carries the call's deadline, and
  // the engine takes back the pins of a request that ends past it.
  auto held = std::make_shared<gate>();
  auto began = std::make_shared<gate>();
  gate_opener opener{held};
  auto n = node::start(*sys_, held_at_77(held, began));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  node& nd = **n;
  held->close();
  began->close();
  kv_request r = req(1);
  r.keys = {block_key{77, 1}};
  r.input_tokens = 16;
  r.pin = true;
  result<actors::kv_reply> got = actors::kv_reply{};
  std::thread caller([&] { got = nd.process_request(r); });
  began->wait(); // the engine is computing it
  caller.join(); // the call's time ran out meanwhile
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::timeout) << got.error().describe();
  held->open();
  // The engine reads this after that request (it is inside it now).
  auto es = nd.engine_stats(0);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_EQ(es->expired, 1U);
  auto lk = nd.lookup(r.keys);
  ASSERT_TRUE(lk.has_value());
  EXPECT_EQ(*lk, 1U); // cached all the same
  auto unpinned = nd.unpin(0, r.keys[0]);
  ASSERT_FALSE(unpinned.has_value()) << "still pinned";
  EXPECT_EQ(unpinned.error().code, errc::invalid_argument)
      << unpinned.error().describe();
  ASSERT_TRUE(nd.stop());
}

TEST_F(Node, APutBlockPastTheCallTimeoutLeavesTheKeyFree) {
  // The engine is held in a request while put_block's reserve waits in its
  // mailbox: the call gives up at call_timeout (300 ms). Before, the engine
  // reserved the block afterwards, for a ticket no caller knew of, and
  // every put of that key was refused busy for the engine's put_timeout
  // (30 s). Now the put carries the call's deadline, and the engine
  // refuses a reserve that comes to it later.
  auto held = std::make_shared<gate>();
  auto began = std::make_shared<gate>();
  gate_opener opener{held};
  auto n = node::start(*sys_, held_at_77(held, began));
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  node& nd = **n;
  held->close();
  began->close();
  hold_engine(engine_of(*sys_, nd, 0), 77);
  began->wait(); // the engine is computing block {77, 1}
  actors::put_request p;
  p.key = block_key{78, 1};
  const std::vector<std::uint8_t> value(4096, 4);
  auto late = nd.put_block(0, p, value);
  ASSERT_FALSE(late.has_value());
  EXPECT_EQ(late.error().code, errc::timeout) << late.error().describe();
  held->open();
  auto retry = nd.put_block(0, p, value);
  ASSERT_TRUE(retry.has_value()) << retry.error().describe();
  auto got = nd.get_block(0, p.key);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  EXPECT_EQ(*got, value);
  auto es = nd.engine_stats(0);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_EQ(es->puts_expired, 1U) << "the late reserve was refused";
  ASSERT_TRUE(nd.stop());
}

TEST_F(Node, PersistWaitsForEveryEngineAgainstOneDeadline) {
  // Engine 0 is held in a request and never reads persist's request: the
  // call ends at its deadline, `timeout` + call_timeout after it asked.
  // Engine 1's disk is held, so its own persist gives up at `timeout` and
  // answers while the call still waits for engine 0. That answer must not
  // draw the wait out. (Before, one actor waited for the engines in turn,
  // and CAF's blocking receive started the wait's `after` again when
  // engine 1's answer, which it skipped, arrived: the call returned after
  // `timeout` + `timeout` + call_timeout, 3.3 s here.) The bound is one of
  // real time, so this test takes 1.8 s of it; the threshold sits halfway
  // between, 0.75 s from either, for a loaded machine.
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto held = std::make_shared<gate>();
  gate_opener opener{held};
  auto disk_held = std::make_shared<gate>();
  gate_opener disk_opener{disk_held};
  auto held_disk = disk_config(dir.path());
  held_disk.write_fault_for_testing = waiting_at(disk_held);
  auto c = two_disk_engines(dir.path(), disk_config(dir.path()), held_disk);
  c.engine.make_producer = [held] {
    return std::make_unique<held_producer>(held, 9000);
  };
  c.call_timeout = std::chrono::milliseconds{300};
  constexpr std::chrono::milliseconds timeout{1500};
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  ASSERT_NO_FATAL_FAILURE(put_one_block_each(**n, 6000, 6));
  held->close();
  disk_held->close();
  hold_engine(engine_of(*sys_, **n, 0), 9000);
  const auto began = std::chrono::steady_clock::now();
  auto persisted = (*n)->persist(timeout);
  const auto took = std::chrono::steady_clock::now() - began;
  held->open();
  disk_held->open();
  ASSERT_FALSE(persisted.has_value());
  // Engine 0's, the first engine that failed.
  EXPECT_EQ(persisted.error().code, errc::timeout)
      << persisted.error().describe();
  EXPECT_NE(persisted.error().message.find("2 of 2 engines failed"),
            std::string::npos)
      << persisted.error().message;
  EXPECT_GE(took, timeout + c.call_timeout);
  EXPECT_LT(took, timeout + c.call_timeout + std::chrono::milliseconds{750})
      << "took "
      << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
      << " ms";
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, ACriticalPutsReserveOvertakesNormalMessagesQueuedAtTheEngine) {
  // The engine is held in a request. A normal stats request is queued
  // behind it, then put_block puts K at critical priority: the engine
  // reads nothing, so the call times out, its reserve left in the engine's
  // mailbox. Once the engine goes on, it reads that reserve first (an
  // urgent message) and refuses it, past the put's deadline (counted in
  // puts_expired), and only then the stats request queued before it, which
  // counts that refusal. (Before, put_block's messages went as normal
  // ones, behind the stats request.) The messages are sent once the engine
  // is in the request: CAF takes urgent messages first among those it has
  // not yet taken out of the mailbox for the round it is in, so a normal
  // one sent before the engine woke for the request would be in its round
  // already.
  auto held = std::make_shared<gate>();
  gate_opener opener{held};
  auto began = std::make_shared<gate>();
  auto c = small_node();
  c.engines = 1;
  c.query_cache = false;
  c.engine.own_thread = true; // held on a thread of its own, not a worker
  c.engine.make_producer = [held, began] {
    return std::make_unique<held_producer>(held, 9000, began);
  };
  c.call_timeout = std::chrono::seconds{1};
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  auto& nd = **n;
  const caf::actor e = engine_of(*sys_, nd, 0);
  held->close();
  began->close();
  hold_engine(e, 9000);
  began->wait();
  caf::scoped_actor self{*sys_};
  auto queued = self->request(e, caf::infinite, actors::stats_atom::value);
  actors::put_request critical;
  critical.key = block_key{78, 1};
  critical.prio = engine::priority::critical;
  auto put = nd.put_block(0, critical, std::vector<std::uint8_t>(4096, 7));
  ASSERT_FALSE(put.has_value());
  EXPECT_EQ(put.error().code, errc::timeout) << put.error().describe();
  held->open();
  std::optional<actors::engine_stats> st;
  queued.receive([&](actors::engine_stats& got) { st = got; },
                 [&](caf::error& err) {
                   FAIL() << actors::from_caf_error(err).describe();
                 });
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->puts_expired, 1U)
      << "the stats request, queued first, was read before the reserve";
  auto lk = nd.lookup({critical.key});
  ASSERT_TRUE(lk.has_value()) << lk.error().describe();
  EXPECT_EQ(*lk, 0U) << "the late reserve took nothing";
}

/// disk_tier_per_engine(disk_config(dir)) whose every open first opens
/// `began`, then waits at `held`: with both closed, the test learns when a
/// restart's or a replica's open has begun, and holds it there.
std::function<result<std::unique_ptr<engine::disk_tier>>(std::uint32_t)>
held_open(const std::string& dir, std::shared_ptr<gate> began,
          std::shared_ptr<gate> held) {
  return
      [open = actors::disk_tier_per_engine(disk_config(dir)),
       began = std::move(began), held = std::move(held)](std::uint32_t slot) {
        began->open();
        held->wait();
        return open(slot);
      };
}

TEST_F(Node, AnEngineRestartingOnItsDiskDoesNotHoldUpTheOthers) {
  // Engine 1 is killed, and its restart's disk open waits at a gate. The
  // balancer answers requests meanwhile, on engine 0, and keeps engine 1's
  // slot down; once the open is done, engine 1 is up again with what its
  // directory holds, in the routing index too. (Before, the balancer
  // opened the disk on its own thread: no request was answered until the
  // gate opened.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto began = std::make_shared<gate>();
  auto held = std::make_shared<gate>();
  gate_opener opener{held};
  auto c = disk_node(dir.path());
  c.engines = 2;
  c.balancer.restart_delay = std::chrono::milliseconds{1};
  c.call_timeout = std::chrono::seconds{10};
  c.engine.make_disk = held_open(dir.path(), began, held);
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  actors::put_request p;
  p.key = block_key{3100, 1};
  p.pin = true;
  auto put = (*n)->put_block(1, p, std::vector<std::uint8_t>(4096, 8));
  ASSERT_TRUE(put.has_value()) << put.error().describe();
  ASSERT_TRUE((*n)->persist(std::chrono::seconds(30)).has_value());
  began->close();
  held->close();
  auto e1 = engine_of(*sys_, **n, 1);
  ASSERT_TRUE(e1);
  caf::anon_send_exit(e1, caf::exit_reason::kill);
  began->wait(); // the restart's open has begun, and waits
  auto r = (*n)->process_request(chain(1));
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  EXPECT_EQ(r->engine, 0U);
  auto st = (*n)->stats();
  ASSERT_TRUE(st.has_value()) << st.error().describe();
  EXPECT_EQ(st->up, (std::vector<std::uint8_t>{1, 0}));
  EXPECT_EQ(st->live, 1U);
  EXPECT_EQ(st->engines, 2U) << "the restarting engine is kept";
  EXPECT_EQ(st->restarts, 1U);
  held->open();
  auto back = stats_once(
      **n, [](const actors::balancer_stats& s) { return s.up.at(1) == 1; });
  ASSERT_TRUE(back.has_value());
  ASSERT_EQ(back->up.at(1), 1U) << "engine 1 never came back";
  auto es = (*n)->engine_stats(1);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_EQ(es->requests, 0U) << "not the restarted engine";
  EXPECT_EQ(es->disk_blocks, 1U);
  // Engine 0's four blocks and engine 1's recovered one.
  EXPECT_EQ(index_keys_after_events_of(**n, 1), 5U);
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, AReplicaOpeningItsDiskDoesNotHoldUpTheOthers) {
  // A replica's disk open waits at a gate: the balancer answers requests
  // meanwhile, on engine 0, and answers the replica_atom once the replica
  // is up. (Before, the balancer opened the disk on its own thread: no
  // request was answered until the gate opened.)
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto began = std::make_shared<gate>();
  auto held = std::make_shared<gate>();
  gate_opener opener{held};
  auto c = disk_node(dir.path());
  c.call_timeout = std::chrono::seconds{10};
  c.engine.make_disk = held_open(dir.path(), began, held);
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  began->close();
  held->close();
  caf::scoped_actor self{*sys_};
  auto replica = self->request((*n)->balancer(), caf::infinite,
                               actors::replica_atom::value);
  began->wait();
  auto r = (*n)->process_request(chain(1));
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  EXPECT_EQ(r->engine, 0U);
  auto st = (*n)->stats();
  ASSERT_TRUE(st.has_value()) << st.error().describe();
  EXPECT_EQ(st->up, (std::vector<std::uint8_t>{1, 0}));
  EXPECT_EQ(st->live, 1U);
  EXPECT_EQ(st->engines, 2U) << "the opening replica is counted";
  held->open();
  std::optional<std::uint32_t> live;
  replica.receive([&](std::uint32_t x) { live = x; },
                  [&](caf::error& e) { ADD_FAILURE() << caf::to_string(e); });
  EXPECT_EQ(live, 2U);
  st = (*n)->stats();
  ASSERT_TRUE(st.has_value()) << st.error().describe();
  EXPECT_EQ(st->up, (std::vector<std::uint8_t>{1, 1}));
  ASSERT_TRUE((*n)->stop());
}

TEST_F(Node, AReplicaMakingItsArenaDoesNotHoldUpTheOthers) {
  // No disk tier: a replica's arena (make_backend, standing in for GiBs
  // prefaulted) waits at a gate. The balancer answers requests meanwhile,
  // on engine 0, keeps the replica's slot down, and answers the
  // replica_atom once the arena is made. (Before, the node's factory made
  // the arena on the balancer's thread: no request was answered until the
  // gate opened.)
  auto began = std::make_shared<gate>();
  auto held = std::make_shared<gate>();
  gate_opener opener{held};
  auto c = small_node();
  c.engines = 1;
  c.query_cache = false;
  c.call_timeout = std::chrono::seconds{10};
  c.engine.make_backend = [began, held](std::uint32_t, std::size_t bytes)
      -> result<std::unique_ptr<engine::memory_backend>> {
    began->open();
    held->wait();
    auto host = engine::host_memory_backend::create(bytes);
    if (!host)
      return unexpected<error>{host.error()};
    return std::unique_ptr<engine::memory_backend>{std::move(*host)};
  };
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  began->close();
  held->close();
  caf::scoped_actor self{*sys_};
  auto replica = self->request((*n)->balancer(), caf::infinite,
                               actors::replica_atom::value);
  began->wait(); // the replica's arena is being made, and waits
  auto r = (*n)->process_request(chain(1));
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  EXPECT_EQ(r->engine, 0U);
  auto st = (*n)->stats();
  ASSERT_TRUE(st.has_value()) << st.error().describe();
  EXPECT_EQ(st->up, (std::vector<std::uint8_t>{1, 0}));
  EXPECT_EQ(st->engines, 2U) << "the opening replica is counted";
  held->open();
  std::optional<std::uint32_t> live;
  replica.receive([&](std::uint32_t x) { live = x; },
                  [&](caf::error& e) { ADD_FAILURE() << caf::to_string(e); });
  EXPECT_EQ(live, 2U);
  auto es = (*n)->engine_stats(1);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_EQ(es->memory, "host");
  ASSERT_TRUE((*n)->stop());
}

/// Whether `a` runs on a thread of its own (caf::detached), not on the
/// scheduler's workers.
bool runs_on_its_own_thread(const caf::actor& a) {
  return caf::actor_cast<caf::abstract_actor*>(a)->getf(
      caf::abstract_actor::is_detached_flag);
}

TEST_F(Node, AHostMemoryReplicaMakesItsArenaOnAThreadOfItsOwn) {
  // No make_backend, no make_disk: the replica prefaults its host arena
  // (seconds for GiBs) as its first act, so it runs on a thread of its own,
  // not on a scheduler worker where the balancer and the scaler may wait
  // behind it. (Before, it ran on a worker.) An initial engine, whose store
  // node::start made, needs none; own_thread false still keeps an engine
  // opened so on the workers.
  auto c = small_node();
  c.engines = 1;
  c.query_cache = false;
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  caf::scoped_actor self{*sys_};
  std::optional<std::uint32_t> live;
  self->request((*n)->balancer(), caf::infinite, actors::replica_atom::value)
      .receive([&](std::uint32_t x) { live = x; },
               [&](caf::error& e) { ADD_FAILURE() << caf::to_string(e); });
  ASSERT_EQ(live, 2U);
  auto initial = engine_of(*sys_, **n, 0);
  auto replica = engine_of(*sys_, **n, 1);
  ASSERT_TRUE(initial && replica);
  EXPECT_FALSE(runs_on_its_own_thread(initial));
  EXPECT_TRUE(runs_on_its_own_thread(replica));
  auto es = (*n)->engine_stats(1);
  ASSERT_TRUE(es.has_value()) << es.error().describe();
  EXPECT_EQ(es->memory, "host");
  ASSERT_TRUE((*n)->stop());

  auto cfg = c.engine;
  cfg.own_thread = false;
  auto on_worker =
      actors::spawn_engine_actor(*sys_, cfg, actors::store_open::on_engine);
  ASSERT_TRUE(on_worker.has_value()) << on_worker.error().describe();
  EXPECT_FALSE(runs_on_its_own_thread(*on_worker));
  std::optional<bool> ready;
  self->request(*on_worker, caf::infinite, actors::ready_atom::value)
      .receive([&](bool x) { ready = x; },
               [&](caf::error& e) { ADD_FAILURE() << caf::to_string(e); });
  EXPECT_EQ(ready, true);
  caf::anon_send_exit(*on_worker, caf::exit_reason::kill);
}

TEST_F(Node, AReplicaOrRestartWhoseDiskDoesNotOpenFailsWithItsError) {
  // Once the disk is "unplugged", every open fails. A replica asked for is
  // answered with the open's error and its slot is free again; a killed
  // engine's restart fails the same way, is given up after max_restarts
  // (1), and the log line says why. Engine 0 serves throughout.
  temp_dir dir;
  ASSERT_FALSE(dir.path().empty());
  auto unplugged = std::make_shared<std::atomic<bool>>(false);
  auto c = disk_node(dir.path());
  c.engines = 2;
  c.balancer.restart_delay = std::chrono::milliseconds{1};
  c.balancer.max_restarts = 1;
  c.engine.make_disk =
      [open = actors::disk_tier_per_engine(disk_config(dir.path())), unplugged](
          std::uint32_t slot) -> result<std::unique_ptr<engine::disk_tier>> {
    if (unplugged->load())
      return make_error(errc::io_error, "disk unplugged (test)");
    return open(slot);
  };
  auto n = node::start(*sys_, c);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  unplugged->store(true);
  caf::scoped_actor self{*sys_};
  self->request((*n)->balancer(), caf::infinite, actors::replica_atom::value)
      .receive([&](std::uint32_t) { ADD_FAILURE() << "the replica started"; },
               [&](caf::error& e) {
                 const auto err = actors::from_caf_error(e);
                 EXPECT_EQ(err.code, errc::io_error) << err.describe();
                 EXPECT_NE(err.message.find("the new replica did not start: "
                                            "disk unplugged (test)"),
                           std::string::npos)
                     << err.message;
               });
  auto st = (*n)->stats();
  ASSERT_TRUE(st.has_value()) << st.error().describe();
  EXPECT_EQ(st->up, (std::vector<std::uint8_t>{1, 1, 0}));
  EXPECT_EQ(st->engines, 2U) << "the replica's slot is free";
  testing::internal::CaptureStderr();
  auto e1 = engine_of(*sys_, **n, 1);
  ASSERT_TRUE(e1);
  caf::anon_send_exit(e1, caf::exit_reason::kill);
  auto after = stats_once(
      **n, [](const actors::balancer_stats& s) { return s.given_up == 1; });
  const auto log = testing::internal::GetCapturedStderr();
  ASSERT_TRUE(after.has_value());
  EXPECT_EQ(after->given_up, 1U);
  EXPECT_EQ(after->restarts, 1U);
  EXPECT_NE(log.find("engine slot 1 given up"), std::string::npos) << log;
  EXPECT_NE(log.find("its restart failed: "), std::string::npos) << log;
  EXPECT_NE(log.find("disk unplugged (test)"), std::string::npos) << log;
  auto r = (*n)->process_request(chain(1));
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  EXPECT_EQ(r->engine, 0U);
  ASSERT_TRUE((*n)->stop());
}

} // namespace
} // namespace kvfleet
