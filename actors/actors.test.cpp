// Deterministic actor tests: CAF's test_coordinator runs every actor on the
// test thread and moves virtual time only when told (no sleeps).
#include "actors/balancer_actor.hpp"
#include "actors/caf_error.hpp"
#include "actors/engine_actor.hpp"
#include "actors/messages.hpp"
#include "actors/prefetch_actor.hpp"
#include "actors/prioritized.hpp"
#include "actors/query_cache_actor.hpp"
#include "actors/query_store.hpp"
#include "actors/scaler_actor.hpp"
#include "actors/warmer_actor.hpp"
#include "engine/clock.hpp"
#include "engine/memory_backend.hpp"
#include "engine/testing/fake_memory_tier.hpp"
#include "engine/testing/host_wrapper.hpp"
#include "engine/testing/io_gate.hpp"
#include "engine/testing/temp_dir.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <locale>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/resumable.hpp>
#include <caf/scheduler/test_coordinator.hpp>
#include <caf/scoped_execution_unit.hpp>
#include <caf/send.hpp>
#include <caf/system_messages.hpp>

namespace kvfleet::actors {
namespace {

using namespace std::chrono_literals;
using engine::block_key;

constexpr std::size_t block_bytes = 4096; // 16 tokens x 64 dims x K,V x fp16

engine_actor_config small_engine(std::size_t blocks, std::size_t batch_size = 1,
                                 engine::nanos batch_timeout = 100ms) {
  engine_actor_config c;
  c.ns.model = "test-model";
  c.ns.layers = 1;
  c.ns.kv_heads = 1;
  c.ns.head_dim = 64;
  c.ns.block_tokens = 16;
  c.store.capacity_bytes = blocks * block_bytes;
  c.store.slab_bytes = 4 * block_bytes;
  c.store.policy = engine::policy_kind::lru;
  c.store.adaptive_compression = false;
  // Batches close at N or at the timeout only, so a test can hold requests
  // in a batch.
  c.batch = batch_config{batch_size, batch_timeout, false};
  return c;
}

/// small_engine(8) on `clock`, whose blocks expire after 10 s.
engine_actor_config small_ttl_engine(engine::manual_clock& clock) {
  auto c = small_engine(8);
  c.store.clock = &clock;
  c.ns_options.ttl = 10s;
  return c;
}

/// A prompt of `n` blocks: `shared` leading blocks of group `group`, then
/// blocks unique to `unique`.
kv_request make_request(std::uint64_t id, std::uint64_t group,
                        std::size_t shared, std::size_t n,
                        std::uint64_t unique) {
  kv_request r;
  r.id = id;
  r.input_tokens = static_cast<std::uint32_t>(n * 16);
  for (std::size_t i = 0; i < n; ++i)
    r.keys.push_back(i < shared ? block_key{group + 1, i + 1}
                                : block_key{(unique + 1) << 20, i + 1});
  return r;
}

/// The actor a spawn function returned; a failed spawn fails the test and
/// yields an invalid handle.
caf::actor spawned(const result<caf::actor>& a) {
  EXPECT_TRUE(a.has_value()) << a.error().describe();
  return a.value_or(caf::actor{});
}

template <class T> struct outcome {
  std::optional<T> value;
  std::optional<caf::error> error;
  [[nodiscard]] bool done() const { return value || error; }
};

/// Runs every job but `held`'s until none is left, so messages pile up in
/// `held`'s mailbox unread; the caller then runs the scheduler to let it
/// read them.
void run_all_but(caf::scheduler::test_coordinator& sched,
                 const caf::actor& held) {
  auto* job = dynamic_cast<caf::resumable*>(
      caf::actor_cast<caf::abstract_actor*>(held));
  sched.run_jobs_filtered([=](caf::resumable* j) { return j != job; });
}

struct broken_slot_factory;

class actor_test : public ::testing::Test {
protected:
  actor_test() {
    cfg_.add_message_types<caf::id_block::kvfleet>();
    cfg_.set("scheduler.policy", caf::atom("testing"));
    cfg_.set("logger.verbosity", caf::atom("quiet"));
    sys_ = std::make_unique<caf::actor_system>(cfg_);
    sched_ =
        &dynamic_cast<caf::scheduler::test_coordinator&>(sys_->scheduler());
  }
  ~actor_test() override {
    // Actors with pending timers stay alive: stop every long-lived one so
    // the actor system can shut down.
    sched_->run();
    for (auto& a : stop_at_end_)
      caf::anon_send_exit(a, caf::exit_reason::kill);
    sched_->run();
    // A test that failed may leave a request unanswered: let the asking
    // actors' own timeouts end them, or the system would wait for them.
    sched_->advance_time(3601s);
    sched_->run();
  }

  /// Sends a request from a fresh actor; the outcome fills in as the
  /// scheduler runs.
  template <class T, class... Ts>
  std::shared_ptr<outcome<T>> ask(const caf::actor& dest, Ts... xs) {
    auto out = std::make_shared<outcome<T>>();
    sys_->spawn([=](caf::event_based_actor* self) {
      self->request(dest, 3600s, xs...)
          .then([=](T& v) { out->value = std::move(v); },
                [=](caf::error& e) { out->error = e; });
    });
    return out;
  }

  /// A prefetcher on `balancer` (stopped at the end): it prefetches a
  /// successor seen in half of the transitions, and never ages them unless
  /// `pc` says so.
  caf::actor prefetcher(const caf::actor& balancer,
                        prefetch_config pc = eager_prefetch(),
                        const caf::actor& front = {}) {
    auto pf = spawned(spawn_prefetcher(*sys_, pc, balancer, front));
    stop_at_end_.push_back(pf);
    sched_->run();
    return pf;
  }
  static prefetch_config eager_prefetch() {
    prefetch_config pc;
    pc.threshold = 0.5;
    pc.model.aging_interval = 0;
    return pc;
  }

  /// The reply of `r` served by engine 0 with every block from cache.
  static kv_reply found_all(const kv_request& r) {
    return kv_reply{r.id, 0, r.keys.size(), 0, r.input_tokens, 0, false, 0};
  }
  /// Tells prefetcher `pf` that `r` was requested and served as `rep`
  /// (found_all(r) when not given), and runs.
  void observed(const caf::actor& pf, const kv_request& r,
                std::optional<kv_reply> rep = std::nullopt) {
    caf::anon_send(pf, observe_atom::value, r, rep.value_or(found_all(r)),
                   std::int64_t{0});
    sched_->run();
  }

  /// ask() from a caller that sets no timer of its own (caf::infinite).
  template <class T, class... Ts>
  std::shared_ptr<outcome<T>> ask_untimed(const caf::actor& dest, Ts... xs) {
    auto out = std::make_shared<outcome<T>>();
    sys_->spawn([=](caf::event_based_actor* self) {
      self->request(dest, caf::infinite, xs...)
          .then([=](T& v) { out->value = std::move(v); },
                [=](caf::error& e) { out->error = e; });
    });
    return out;
  }

  std::tuple<caf::actor, kv_request, kv_request>
  two_engines_holding_a_prefix_each();

  /// A balancer of `initial` engines from `f` (max_restarts 0) whose slots
  /// `broken` break for good: their engines are killed and given up.
  /// `f.tried` is cleared after.
  caf::actor balancer_with_broken_slots(const broken_slot_factory& f,
                                        std::uint32_t initial,
                                        const std::set<std::uint32_t>& broken);

  template <class T, class... Ts> T ask_now(const caf::actor& dest, Ts... xs) {
    auto out = ask<T>(dest, xs...);
    sched_->run();
    EXPECT_TRUE(out->value.has_value());
    return out->value.value_or(T{});
  }

  /// Ten served requests of 800 ms (above a 500 ms target) reach scaler
  /// `s`, which reads them.
  void send_slow_samples(const caf::actor& s) {
    for (int i = 0; i < 10; ++i)
      caf::anon_send(s, observe_atom::value, kv_request{}, kv_reply{},
                     std::int64_t{800'000'000});
    sched_->run();
  }

  /// Reserves block {group, 1} and its child {group, 2} on engine `e`:
  /// their put tickets.
  std::pair<std::uint64_t, std::uint64_t>
  reserve_parent_and_child(const caf::actor& e, std::uint64_t group) {
    put_request parent;
    parent.key = block_key{group, 1};
    put_request child;
    child.key = block_key{group, 2};
    child.parent = parent.key;
    const auto tp = ask_now<std::uint64_t>(e, reserve_atom::value, parent);
    return {tp, ask_now<std::uint64_t>(e, reserve_atom::value, child)};
  }

  caf::actor engine(const engine_actor_config& c) {
    auto a = spawn_engine_actor(*sys_, c);
    EXPECT_TRUE(a.has_value());
    if (a)
      stop_at_end_.push_back(*a);
    return a.value_or(caf::actor{});
  }
  /// A warmer over balancer `b`; it stops at the test's end.
  caf::actor warmer(const caf::actor& b, const warmer_config& wc = {}) {
    auto w = spawned(spawn_warmer(*sys_, wc, b));
    stop_at_end_.push_back(w);
    return w;
  }
  /// A listener that records the block_events it gets in `events`,
  /// subscribed to `engine` (and run); it stops at the test's end when
  /// `stop_at_end`.
  caf::actor record_events(const caf::actor& engine,
                           std::shared_ptr<std::vector<block_events>> events,
                           bool stop_at_end = true) {
    auto l = sys_->spawn([events](caf::event_based_actor*) -> caf::behavior {
      return {[events](const block_events& ev) { events->push_back(ev); }};
    });
    if (stop_at_end)
      stop_at_end_.push_back(l);
    caf::anon_send(engine, listen_atom::value, l);
    sched_->run();
    return l;
  }

  caf::actor balancer(routing_policy p,
                      std::vector<engine_actor_config> engines,
                      std::chrono::milliseconds timeout = 5s) {
    balancer_config bc;
    bc.routing.policy = p;
    bc.initial_engines = static_cast<std::uint32_t>(engines.size());
    bc.request_timeout = timeout;
    auto b = spawned(spawn_balancer(
        *sys_, bc, [engines](caf::actor_system& s, std::uint32_t slot) {
          auto c = engines.at(slot % engines.size());
          c.slot = slot;
          return started_now(spawn_engine_actor(s, c));
        }));
    stop_at_end_.push_back(b);
    return b;
  }

  /// A balancer under `bc` over `make`, stopped at the test's end, with its
  /// initial engines started (or their starts failed).
  caf::actor started_balancer(const balancer_config& bc, engine_factory make) {
    auto b = spawned(spawn_balancer(*sys_, bc, std::move(make)));
    stop_at_end_.push_back(b);
    sched_->run();
    return b;
  }

  /// Lets `n` of the balancer's restart delays pass, running what is due.
  void pass_restart_delays(const balancer_config& bc, int n) {
    for (int i = 0; i < n; ++i) {
      sched_->advance_time(bc.restart_delay);
      sched_->run();
    }
  }

  /// A balancer with request_timeout 50 ms over one held_requests_engine,
  /// put in `engine`.
  caf::actor held_requests_balancer(std::shared_ptr<caf::actor> engine);

  /// Kills the engine in slot 0 of balancer `b` (under `bc`) and lets its
  /// restart_delay pass.
  void kill_engine_0(const caf::actor& b, const balancer_config& bc) {
    caf::anon_send_exit(
        ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0}),
        caf::exit_reason::kill);
    sched_->run();
    pass_restart_delays(bc, 1);
  }

  /// A balancer under `bc` whose engines are small_engine(64) stores.
  caf::actor small_balancer(const balancer_config& bc) {
    auto b = spawned(
        spawn_balancer(*sys_, bc, [](caf::actor_system& s, std::uint32_t slot) {
          auto c = small_engine(64);
          c.slot = slot;
          return started_now(spawn_engine_actor(s, c));
        }));
    stop_at_end_.push_back(b);
    return b;
  }

  /// A scaler over `b` with the scaler tests' policy: target 500 ms over a
  /// 5 s window, 30 s cooldown, 5 samples, acting on the first evaluation
  /// past a threshold, evaluating every second, `min_replicas` to
  /// `max_replicas` (1 to 2) replicas starting at `initial`. Its decisions
  /// are appended to `*log`.
  caf::actor quick_scaler(const caf::actor& b, std::uint32_t initial,
                          std::shared_ptr<std::vector<scale_decision>> log,
                          std::uint32_t min_replicas = 1,
                          std::uint32_t max_replicas = 2,
                          std::uint32_t sustain = 1) {
    scaler_actor_config sc;
    sc.policy.target = 500ms;
    sc.policy.window = 5s;
    sc.policy.cooldown = 30s;
    sc.policy.min_samples = 5;
    sc.policy.sustain = sustain;
    sc.policy.min_replicas = min_replicas;
    sc.policy.max_replicas = max_replicas;
    sc.interval = 1s;
    sc.initial_replicas = initial;
    sc.on_decision = [log](const scale_decision& d) { log->push_back(d); };
    auto s = spawned(spawn_scaler(*sys_, sc, b));
    stop_at_end_.push_back(s);
    return s;
  }

  caf::actor_system_config cfg_;
  std::unique_ptr<caf::actor_system> sys_;
  caf::scheduler::test_coordinator* sched_ = nullptr;
  std::vector<caf::actor> stop_at_end_;
};

TEST_F(actor_test, BatchClosesAtMaxSize) {
  auto e = engine(small_engine(64, 3, 100ms));
  auto r1 = ask<kv_reply>(e, process_atom::value, make_request(1, 0, 0, 2, 1));
  auto r2 = ask<kv_reply>(e, process_atom::value, make_request(2, 0, 0, 2, 2));
  sched_->run();
  EXPECT_FALSE(r1->done());
  EXPECT_FALSE(r2->done());
  auto r3 = ask<kv_reply>(e, process_atom::value, make_request(3, 0, 0, 2, 3));
  sched_->run();
  ASSERT_TRUE(r1->value && r2->value && r3->value);
  EXPECT_EQ(r3->value->computed_blocks, 2U);
  auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.batches, 1U);
  EXPECT_EQ(st.requests, 3U);
  EXPECT_EQ(st.in_flight, 0U);
}

TEST_F(actor_test, BatchClosesAtTimeout) {
  auto e = engine(small_engine(64, 20, 100ms));
  auto r1 = ask<kv_reply>(e, process_atom::value, make_request(1, 0, 0, 2, 1));
  sched_->run();
  sched_->advance_time(99ms);
  sched_->run();
  EXPECT_FALSE(r1->done());
  auto r2 = ask<kv_reply>(e, process_atom::value, make_request(2, 0, 0, 2, 2));
  sched_->run();
  sched_->advance_time(1ms); // 100 ms after the first request
  sched_->run();
  EXPECT_TRUE(r1->value.has_value());
  EXPECT_TRUE(r2->value.has_value());
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).batches, 1U);
}

TEST_F(actor_test, ARequestLeftOverByTheTokenBudgetWaitsTheTimeoutInAll) {
  // A (low, 16 tokens) opens a batch at 0 ms; B (critical, 96) arrives at
  // 90 ms and fills the 100-token budget: B runs at once and A is left
  // over. A closes 100 ms after it arrived, not 100 ms after B's batch
  // (190 ms, as before: the next batch's timer started at that close).
  auto c = small_engine(64, 20, 100ms);
  c.capacity_tokens = 100;
  auto e = engine(c);
  auto a = make_request(1, 0, 0, 1, 1);
  a.prio = engine::priority::low;
  auto b = make_request(2, 0, 0, 6, 2);
  b.prio = engine::priority::critical;
  auto ra = ask<kv_reply>(e, process_atom::value, a);
  sched_->run();
  sched_->advance_time(90ms);
  sched_->run();
  auto rb = ask<kv_reply>(e, process_atom::value, b);
  sched_->run();
  EXPECT_TRUE(rb->value.has_value());
  EXPECT_FALSE(ra->done());
  sched_->advance_time(9ms);
  sched_->run();
  EXPECT_FALSE(ra->done());
  sched_->advance_time(1ms); // 100 ms after A arrived
  sched_->run();
  EXPECT_TRUE(ra->value.has_value());
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).batches, 2U);
}

TEST_F(actor_test, ABatchCloseFromOutsideTheEngineIsIgnored) {
  // Its close message is its own timer's (or marker's): one sent from
  // outside with the right generation closed the batch early.
  auto e = engine(small_engine(64, 20, 100ms));
  auto r = ask<kv_reply>(e, process_atom::value, make_request(1, 0, 0, 2, 1));
  sched_->run();
  caf::anon_send(e, close_batch_atom::value, std::uint64_t{1});
  sched_->run();
  EXPECT_FALSE(r->done());
  sched_->advance_time(100ms);
  sched_->run();
  EXPECT_TRUE(r->value.has_value());
}

TEST_F(actor_test, ABatchTimeoutBelowAMillisecondIsNotCutToZero) {
  // 1.5 ms: the batch closes 1.5 ms after its first request, not after the
  // whole milliseconds in it (1 ms; a 0.5 ms timeout used to close at once).
  auto e = engine(small_engine(64, 20, 1500us));
  auto r1 = ask<kv_reply>(e, process_atom::value, make_request(1, 0, 0, 2, 1));
  sched_->run();
  EXPECT_FALSE(r1->done());
  sched_->advance_time(1ms);
  sched_->run();
  EXPECT_FALSE(r1->done());
  sched_->advance_time(500us);
  sched_->run();
  EXPECT_TRUE(r1->value.has_value());
}

TEST_F(actor_test, BatchClosesWhenIdleWithoutWaitingForTheTimeout) {
  auto c = small_engine(64, 20, 100ms);
  c.batch.close_when_idle = true;
  auto e = engine(c);
  // A lone request runs at once: no virtual time passes.
  auto r1 = ask<kv_reply>(e, process_atom::value, make_request(1, 0, 0, 2, 1));
  sched_->run();
  ASSERT_TRUE(r1->value.has_value());
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).batches, 1U);
  // Three requests queued in the mailbox together make one batch, the
  // higher priority first.
  auto low = make_request(2, 7, 2, 2, 2);
  low.prio = engine::priority::background;
  auto crit = make_request(4, 7, 2, 2, 4);
  crit.prio = engine::priority::critical;
  std::vector<std::shared_ptr<outcome<kv_reply>>> rs;
  for (const auto& r : {low, make_request(3, 0, 0, 2, 3), crit})
    rs.push_back(ask<kv_reply>(e, process_atom::value, r));
  run_all_but(*sched_, e);
  sched_->run();
  for (const auto& r : rs)
    ASSERT_TRUE(r->value.has_value());
  EXPECT_EQ(rs[2]->value->computed_blocks, 2U);
  EXPECT_EQ(rs[0]->value->matched_blocks, 2U);
  auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.batches, 2U);
  EXPECT_EQ(st.requests, 4U);
  EXPECT_FALSE(sched_->has_pending_timeout());
}

TEST_F(actor_test, ARequestLeftOverAtTheTokenBudgetThatFillsABatchRunsAtOnce) {
  // Budget 100 tokens. A (80) waits for company; B (160) fills the batch,
  // which closes with A alone (A and B would exceed the budget). B, left
  // over, is a full batch by itself: it runs now, not after another
  // 100 ms timeout.
  auto c = small_engine(64, 20, 100ms);
  c.capacity_tokens = 100;
  auto e = engine(c);
  auto a = ask<kv_reply>(e, process_atom::value, make_request(1, 0, 0, 5, 1));
  sched_->run();
  EXPECT_FALSE(a->done());
  auto b = ask<kv_reply>(e, process_atom::value, make_request(2, 0, 0, 10, 2));
  sched_->run();
  ASSERT_TRUE(a->value.has_value());
  EXPECT_TRUE(b->value.has_value());
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).batches, 2U);
}

TEST_F(actor_test, ABudgetCutBelowWhatIsQueuedClosesTheBatch) {
  // Four requests of 32 tokens wait in a batch under the 8192-token
  // budget; the scaler cuts the budget to 64. They make two full batches
  // now: neither waits out the 100 ms timeout.
  auto e = engine(small_engine(64, 20, 100ms));
  std::vector<std::shared_ptr<outcome<kv_reply>>> rs;
  for (std::uint64_t i = 0; i < 4; ++i)
    rs.push_back(
        ask<kv_reply>(e, process_atom::value, make_request(i, 0, 0, 2, i)));
  sched_->run();
  EXPECT_FALSE(rs[0]->done());
  caf::anon_send(e, capacity_atom::value, std::uint32_t{64});
  sched_->run();
  for (const auto& r : rs) {
    EXPECT_TRUE(r->value.has_value());
  }
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).batches, 2U);
}

TEST_F(actor_test, BatchServesHigherPriorityFirst) {
  auto e = engine(small_engine(64, 20, 100ms));
  auto low = make_request(1, 7, 2, 2, 1);
  low.prio = engine::priority::background;
  auto crit = make_request(2, 7, 2, 2, 2);
  crit.prio = engine::priority::critical;
  auto r1 = ask<kv_reply>(e, process_atom::value, low);
  auto r2 = ask<kv_reply>(e, process_atom::value, crit);
  sched_->run();
  sched_->advance_time(100ms);
  sched_->run();
  ASSERT_TRUE(r1->value && r2->value);
  // The critical request ran first and computed the shared blocks.
  EXPECT_EQ(r2->value->computed_blocks, 2U);
  EXPECT_EQ(r1->value->matched_blocks, 2U);
}

TEST_F(actor_test,
       ANormalRequestQueuedBehindAFullBatchOfBackgroundOnesRunsFirst) {
  // Defaults (20 per batch, close_when_idle): 25 background requests, then
  // a normal one, all queued before the engine reads any. All share two
  // leading blocks: whoever runs first computes them. The normal one does.
  // (Before, the first 20 background requests closed a full batch before
  // the normal one was read, and it ran in the second batch.)
  auto c = small_engine(256);
  c.batch = batch_config{};
  auto e = engine(c);
  std::vector<std::shared_ptr<outcome<kv_reply>>> bg;
  for (std::uint64_t i = 0; i < 25; ++i) {
    auto r = make_request(i + 1, 7, 2, 3, i + 1);
    r.prio = engine::priority::background;
    bg.push_back(ask<kv_reply>(e, process_atom::value, r));
  }
  auto normal =
      ask<kv_reply>(e, process_atom::value, make_request(100, 7, 2, 3, 100));
  sched_->run();
  ASSERT_TRUE(normal->value.has_value());
  EXPECT_EQ(normal->value->matched_blocks, 0U);
  EXPECT_EQ(normal->value->computed_blocks, 3U);
  for (const auto& r : bg) {
    ASSERT_TRUE(r->value.has_value());
    EXPECT_EQ(r->value->matched_blocks, 2U);
  }
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).batches, 2U);
}

/// A producer that records the keys it computes, in order, and calls
/// `on_first` once, at its first block.
class recording_producer final : public engine::kv_producer {
public:
  recording_producer(std::shared_ptr<std::vector<block_key>> seen,
                     std::function<void()> on_first)
      : seen_(std::move(seen)), on_first_(std::move(on_first)) {}
  result<void> produce(const engine::namespace_spec& spec, const block_key& key,
                       std::span<std::byte> out) override {
    seen_->push_back(key);
    if (on_first_)
      std::exchange(on_first_, nullptr)();
    return inner_.produce(spec, key, out);
  }
  engine::nanos cost(std::size_t) const noexcept override { return {}; }

private:
  std::shared_ptr<std::vector<block_key>> seen_;
  std::function<void()> on_first_;
  engine::synthetic_producer inner_;
};

TEST_F(actor_test, ACriticalRequestArrivingDuringABacklogJoinsTheNextBatch) {
  // 100 background requests of one block are queued; while the first
  // batch runs, a critical one arrives (an urgent message). It runs first
  // in the second batch: each batch after the first closes at its own
  // marker, behind what came meanwhile. (A version that ran every full
  // batch of the backlog back to back ran it after all 100.)
  auto seen = std::make_shared<std::vector<block_key>>();
  auto target = std::make_shared<caf::actor>();
  auto crit = make_request(1000, 0, 0, 1, 1000);
  crit.prio = engine::priority::critical;
  auto c = small_engine(512);
  c.batch = batch_config{};
  c.make_producer = [seen, target, crit] {
    return std::make_unique<recording_producer>(seen, [target, crit] {
      caf::anon_send<caf::message_priority::high>(*target, process_atom::value,
                                                  crit);
    });
  };
  auto e = engine(c);
  *target = e;
  std::vector<std::shared_ptr<outcome<kv_reply>>> bg;
  for (std::uint64_t i = 0; i < 100; ++i) {
    auto r = make_request(i + 1, 0, 0, 1, i + 1);
    r.prio = engine::priority::background;
    bg.push_back(ask<kv_reply>(e, process_atom::value, r));
  }
  sched_->run();
  for (const auto& r : bg)
    ASSERT_TRUE(r->value.has_value());
  ASSERT_EQ(seen->size(), 101U);
  const auto at = std::find(seen->begin(), seen->end(), crit.keys[0]);
  ASSERT_NE(at, seen->end());
  EXPECT_EQ(at - seen->begin(), 20); // first of the second batch
}

TEST_F(actor_test, ACriticalRequestRunsBeforeNormalMessagesQueuedBeforeIt) {
  // Batches close at their marker (close_when_idle). A stats request (a
  // normal message, as block calls are) and then a critical request
  // (urgent) wait in an idle engine's mailbox. The critical one is read
  // first and opens a batch whose close marker is urgent too, so the
  // request has run when the stats are read. (Before, the marker was a
  // normal message behind the stats request: the critical request waited
  // for every normal message queued before it.) A critical request that
  // joins a batch a normal request opened closes it as early.
  auto c = small_engine(64);
  c.batch = batch_config{}; // up to 20 a batch, closed at its marker
  auto e = engine(c);
  auto stats = ask<engine_stats>(e, stats_atom::value);
  run_all_but(*sched_, e); // the stats request waits in e's mailbox
  auto crit = make_request(1, 0, 0, 1, 1);
  crit.prio = engine::priority::critical;
  caf::anon_send<caf::message_priority::high>(e, process_atom::value, crit);
  sched_->run();
  ASSERT_TRUE(stats->value.has_value());
  EXPECT_EQ(stats->value->requests, 1U);

  auto e2 = engine(c);
  caf::anon_send(e2, process_atom::value, make_request(2, 0, 0, 1, 2));
  auto stats2 = ask<engine_stats>(e2, stats_atom::value);
  run_all_but(*sched_, e2); // e2's mailbox: the request, the stats request
  sched_->run_once();       // e2 reads the request: its marker is queued
  auto crit2 = make_request(3, 0, 0, 1, 3);
  crit2.prio = engine::priority::critical;
  caf::anon_send<caf::message_priority::high>(e2, process_atom::value, crit2);
  sched_->run();
  ASSERT_TRUE(stats2->value.has_value());
  EXPECT_EQ(stats2->value->requests, 2U);
  EXPECT_EQ(ask_now<engine_stats>(e2, stats_atom::value).batches, 1U);
}

TEST_F(actor_test,
       MaxSizeOneRunsANormalRequestBeforeABackgroundOneQueuedFirst) {
  // max_size 1 runs each request alone, yet not in the order they came: a
  // background request and then a normal one, both queued before the
  // engine reads either, reach its store normal first, with
  // close_when_idle or without. (Before, max_size 1 ran each request as
  // the engine read it, skipping the lanes; normal, low and background
  // share CAF's normal mailbox category, so the background one ran first.)
  // A lone request still runs with no time passing.
  for (const bool close_when_idle : {true, false}) {
    SCOPED_TRACE(close_when_idle ? "close_when_idle" : "no close_when_idle");
    auto seen = std::make_shared<std::vector<block_key>>();
    auto c = small_engine(64); // max_size 1
    c.batch.close_when_idle = close_when_idle;
    c.make_producer = [seen] {
      return std::make_unique<recording_producer>(seen, nullptr);
    };
    auto e = engine(c);
    auto background = make_request(1, 0, 0, 1, 1);
    background.prio = engine::priority::background;
    const auto normal = make_request(2, 0, 0, 1, 2);
    auto rb = ask<kv_reply>(e, process_atom::value, background);
    auto rn = ask<kv_reply>(e, process_atom::value, normal);
    sched_->run();
    ASSERT_TRUE(rb->value.has_value());
    ASSERT_TRUE(rn->value.has_value());
    EXPECT_EQ(*seen,
              (std::vector<block_key>{normal.keys[0], background.keys[0]}));
    auto lone =
        ask<kv_reply>(e, process_atom::value, make_request(3, 0, 0, 1, 3));
    sched_->run();
    EXPECT_TRUE(lone->value.has_value());
    EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).batches, 3U);
  }
}

TEST_F(actor_test, UnknownMessageGetsAnErrorReply) {
  auto e = engine(small_engine(64));
  auto r = ask<kv_reply>(e, std::string{"hello"});
  sched_->run();
  ASSERT_TRUE(r->error.has_value());
  EXPECT_EQ(*r->error, caf::sec::unexpected_message);
  auto b = balancer(routing_policy::least_loaded, {small_engine(64)});
  auto r2 = ask<kv_reply>(b, 42.0);
  sched_->run();
  ASSERT_TRUE(r2->error.has_value());
  EXPECT_EQ(*r2->error, caf::sec::unexpected_message);
}

TEST_F(actor_test, APriorityOutsideTheFiveIsRefusedNotRankedAboveCritical) {
  // Batched (20, 100 ms) so an accepted request would wait in a lane.
  const auto bogus = static_cast<engine::priority>(7);
  auto e = engine(small_engine(64, 20, 100ms));
  auto req = make_request(1, 0, 0, 2, 1);
  req.prio = bogus;
  auto r = ask<kv_reply>(e, process_atom::value, req);
  auto batch = ask<std::vector<kv_reply>>(
      e, batch_atom::value,
      std::vector<kv_request>{make_request(2, 0, 0, 2, 2), req});
  put_request put;
  put.key = block_key{9, 9};
  put.prio = bogus;
  auto ticket = ask<std::uint64_t>(e, reserve_atom::value, put);
  sched_->run();
  for (const auto* err : {&r->error, &batch->error, &ticket->error}) {
    ASSERT_TRUE(err->has_value());
    const auto back = from_caf_error(**err);
    EXPECT_EQ(back.code, errc::invalid_argument);
    EXPECT_NE(back.message.find("priority 7"), std::string::npos)
        << back.message;
  }
  auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.requests, 0U); // the batch ran none of its requests
  EXPECT_EQ(st.blocks, 0U);
  EXPECT_EQ(st.in_flight, 0U);
}

TEST_F(actor_test, TheBalancerRefusesAPriorityOutsideTheFiveBeforeRouting) {
  const auto bogus = static_cast<engine::priority>(7);
  // Until it is refused it jumps no mailbox queue.
  EXPECT_EQ(mailbox_priority(bogus), caf::message_priority::normal);
  EXPECT_EQ(mailbox_priority(engine::priority::critical),
            caf::message_priority::high);
  auto b = balancer(routing_policy::least_loaded, {small_engine(64)});
  auto req = make_request(1, 0, 0, 2, 1);
  req.prio = bogus;
  auto r = ask<kv_reply>(b, process_atom::value, req);
  sched_->run();
  ASSERT_TRUE(r->error.has_value());
  const auto back = from_caf_error(*r->error);
  EXPECT_EQ(back.code, errc::invalid_argument);
  EXPECT_NE(back.message.find("priority 7"), std::string::npos) << back.message;
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  ASSERT_EQ(st.routed.size(), 1U);
  EXPECT_EQ(st.routed[0], 0U) << "refused before it was routed";
}

TEST_F(actor_test, ABatchThatFailsSaysWhichRequestFailed) {
  auto e = engine(small_engine(64));
  auto good = make_request(1, 0, 0, 2, 1);
  auto bad = make_request(7, 0, 0, 2, 2);
  bad.input_tokens = 20; // two blocks need 32 tokens
  auto out = ask<std::vector<kv_reply>>(e, batch_atom::value,
                                        std::vector<kv_request>{good, bad});
  sched_->run();
  ASSERT_TRUE(out->error.has_value());
  const auto err = from_caf_error(*out->error);
  EXPECT_EQ(err.code, errc::misaligned_tokens);
  EXPECT_EQ(err.message.rfind("request 7 of the batch: ", 0), 0U)
      << err.message;
  // The request run before it keeps its effect. Nothing was computed
  // ahead in a batch call for a batch that fails on a request whose keys
  // do not fit its tokens: that work would be thrown away.
  const auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.requests, 1U);
  EXPECT_EQ(st.prefill_calls, 0U);
  EXPECT_EQ(st.produced_alone, 2U);
}

TEST_F(actor_test, EngineErrorsAreConvertedOnce) {
  auto e = engine(small_engine(64));
  auto r = ask<std::vector<std::uint8_t>>(e, read_atom::value, block_key{1, 2});
  sched_->run();
  ASSERT_TRUE(r->error.has_value());
  EXPECT_EQ(from_caf_error(*r->error).code, errc::not_found);
}

TEST_F(actor_test, TwoPhasePutThenReadAndPin) {
  auto e = engine(small_engine(64));
  put_request p;
  p.key = block_key{9, 9};
  auto ticket = ask_now<std::uint64_t>(e, reserve_atom::value, p);
  // Not visible before commit.
  EXPECT_EQ(ask_now<std::uint64_t>(e, lookup_atom::value,
                                   std::vector<block_key>{p.key}),
            0U);
  std::vector<std::uint8_t> value(block_bytes, 0);
  auto w = ask<bool>(e, write_atom::value, ticket, value);
  auto c = ask<bool>(e, commit_atom::value, ticket);
  sched_->run();
  EXPECT_FALSE(w->error.has_value());
  EXPECT_FALSE(c->error.has_value());
  EXPECT_EQ(ask_now<std::uint64_t>(e, lookup_atom::value,
                                   std::vector<block_key>{p.key}),
            1U);
  auto back = ask_now<std::vector<std::uint8_t>>(e, read_atom::value, p.key);
  EXPECT_EQ(back, value);
  auto pin = ask<bool>(e, pin_atom::value, p.key);
  sched_->run();
  EXPECT_FALSE(pin->error.has_value());
}

TEST_F(actor_test, OpenPutsExpireAtTheirPutTimeoutOnOneTimer) {
  // Puts left open are aborted put_timeout after their reserve, and the
  // engine keeps one timer for all of them. (Before, one CAF timer per
  // put, committed or not, for the whole put_timeout.)
  auto cfg = small_engine(256);
  cfg.put_timeout = 10s;
  auto e = engine(cfg);
  sched_->run();
  const std::vector<std::uint8_t> value(block_bytes, 7);
  auto reserve = [&](std::uint64_t k) {
    put_request p;
    p.key = block_key{k, k};
    return ask_now<std::uint64_t>(e, reserve_atom::value, p);
  };
  const auto timers = sched_->clock().schedule().size();
  const auto first = reserve(1); // t = 0, left open
  for (std::uint64_t k = 100; k < 200; ++k) {
    const auto t = reserve(k);
    ASSERT_TRUE(ask_now<bool>(e, write_atom::value, t, value));
    ASSERT_TRUE(ask_now<bool>(e, commit_atom::value, t));
  }
  EXPECT_LE(sched_->clock().schedule().size(), timers + 1)
      << "one timer for every put";
  sched_->advance_time(4s);
  sched_->run();
  const auto second = reserve(2); // t = 4 s, left open
  ASSERT_TRUE(ask_now<bool>(e, write_atom::value, second, value));
  sched_->advance_time(6s); // t = 10 s: the first put's deadline
  sched_->run();
  auto gone = ask<bool>(e, write_atom::value, first, value);
  auto open = ask<bool>(e, commit_atom::value, second);
  sched_->run();
  ASSERT_TRUE(gone->error.has_value()) << "the first put expired";
  EXPECT_EQ(from_caf_error(*gone->error).code, errc::invalid_handle);
  EXPECT_TRUE(open->value.has_value()) << "the second is open till 14 s";
  // A third put, left open, expires 10 s after its own reserve.
  const auto third = reserve(3); // t = 10 s
  sched_->advance_time(9s);
  sched_->run();
  auto still = ask<bool>(e, write_atom::value, third, value);
  sched_->run();
  EXPECT_TRUE(still->value.has_value());
  sched_->advance_time(1s);
  sched_->run();
  auto late = ask<bool>(e, commit_atom::value, third);
  sched_->run();
  EXPECT_TRUE(late->error.has_value()) << "expired at 20 s";
  for (std::uint64_t k = 100; k < 200; ++k)
    EXPECT_EQ(ask_now<std::uint64_t>(e, lookup_atom::value,
                                     std::vector<block_key>{{k, k}}),
              1U);
}

TEST_F(actor_test, APutAbortedWithItsParentIsNoExpiredPut) {
  // A child put reserved under an open parent whose caller aborts the
  // parent: the store aborts the child with it. Its put_timeout later
  // finds nothing open: puts_expired ("aborted unfinished by the engine")
  // stays 0. (Before, it counted 1.)
  auto cfg = small_engine(64);
  cfg.put_timeout = 10s;
  auto e = engine(cfg);
  sched_->run();
  put_request parent;
  parent.key = block_key{1, 1};
  put_request child;
  child.key = block_key{1, 2};
  child.parent = parent.key;
  const auto tp = ask_now<std::uint64_t>(e, reserve_atom::value, parent);
  (void)ask_now<std::uint64_t>(e, reserve_atom::value, child);
  EXPECT_TRUE(ask_now<bool>(e, abort_atom::value, tp));
  sched_->advance_time(11s);
  sched_->run();
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).puts_expired, 0U);
}

TEST_F(actor_test, APutEndsAtItsCallersDeadline) {
  // A put carries when its caller stops waiting (put_request::deadline_ns):
  // the engine aborts it then rather than at put_timeout, and refuses a
  // reserve, write or commit of it at or after then. (Before, a
  // reservation whose reply reached its caller too late kept the key busy
  // for the whole put_timeout, and a pinning commit that landed after its
  // caller gave up left a pin no one knew of.)
  auto cfg = small_engine(256);
  cfg.put_timeout = 10s;
  auto e = engine(cfg);
  sched_->run();
  const std::vector<std::uint8_t> value(block_bytes, 7);
  const auto in = [&](std::chrono::milliseconds d) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               (sched_->clock().now() + d).time_since_epoch())
        .count();
  };
  const auto busy_reserve = [&](const put_request& p) {
    auto r = ask<std::uint64_t>(e, reserve_atom::value, p);
    sched_->run();
    return r->error.has_value() ? from_caf_error(*r->error).code : errc::ok;
  };
  // A reservation its caller never heard of: the key is busy until the
  // caller's deadline, 1 s, not until put_timeout.
  put_request lost;
  lost.key = block_key{1, 1};
  lost.deadline_ns = in(1s);
  const auto lost_ticket = ask_now<std::uint64_t>(e, reserve_atom::value, lost);
  put_request retry;
  retry.key = lost.key;
  EXPECT_EQ(busy_reserve(retry), errc::busy);
  sched_->advance_time(1s);
  sched_->run();
  // A write after the deadline is told so (the ticket is kept, ended,
  // until its put_timeout), not that the ticket is unknown.
  auto gone = ask<bool>(e, write_atom::value, lost_ticket, value);
  sched_->run();
  ASSERT_TRUE(gone->error.has_value());
  EXPECT_EQ(from_caf_error(*gone->error).code, errc::timeout);
  const auto t = ask_now<std::uint64_t>(e, reserve_atom::value, retry);
  ASSERT_TRUE(ask_now<bool>(e, write_atom::value, t, value));
  ASSERT_TRUE(ask_now<bool>(e, commit_atom::value, t));
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).puts_expired, 1U);

  // A reserve that comes at its deadline reserves nothing.
  put_request past;
  past.key = block_key{2, 2};
  past.deadline_ns = in(0ms);
  EXPECT_EQ(busy_reserve(past), errc::timeout);
  past.deadline_ns = 0;
  const auto free = ask_now<std::uint64_t>(e, reserve_atom::value, past);
  ASSERT_TRUE(ask_now<bool>(e, write_atom::value, free, value));
  ASSERT_TRUE(ask_now<bool>(e, commit_atom::value, free));

  // A pinning commit that comes at its deadline (ahead of the expiry
  // timer's message) is refused: no block, no pin.
  put_request pinned;
  pinned.key = block_key{3, 3};
  pinned.pin = true;
  pinned.deadline_ns = in(2s);
  const auto ticket = ask_now<std::uint64_t>(e, reserve_atom::value, pinned);
  ASSERT_TRUE(ask_now<bool>(e, write_atom::value, ticket, value));
  auto commit = ask<bool>(e, commit_atom::value, ticket);
  sched_->run_once(); // the asker sends the commit
  sched_->advance_time(2s);
  sched_->run();
  ASSERT_TRUE(commit->error.has_value());
  EXPECT_EQ(from_caf_error(*commit->error).code, errc::timeout);
  const auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.pinned_bytes, 0U);
  EXPECT_EQ(st.puts_expired, 3U);
  EXPECT_EQ(ask_now<std::uint64_t>(e, lookup_atom::value,
                                   std::vector<block_key>{pinned.key}),
            0U);
  // The put_timeout expiries still come, find those puts ended, and
  // forget their tickets.
  sched_->advance_time(10s);
  sched_->run();
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).puts_expired, 3U);
  auto forgotten = ask<bool>(e, commit_atom::value, lost_ticket);
  sched_->run();
  ASSERT_TRUE(forgotten->error.has_value());
  EXPECT_EQ(from_caf_error(*forgotten->error).code, errc::invalid_handle);
}

TEST_F(actor_test, LeastLoadedAvoidsTheBackloggedEngine) {
  // Engine 0 answers at once; engine 1 holds requests for 100 ms.
  auto fast = small_engine(256, 1);
  auto slow = small_engine(256, 100, 100ms);
  for (auto policy :
       {routing_policy::round_robin, routing_policy::least_loaded}) {
    auto b = balancer(policy, {fast, slow});
    sched_->run();
    std::vector<std::shared_ptr<outcome<kv_reply>>> out;
    for (std::uint64_t i = 0; i < 12; ++i) {
      out.push_back(
          ask<kv_reply>(b, process_atom::value, make_request(i, 0, 0, 1, i)));
      sched_->run();
    }
    auto st = ask_now<balancer_stats>(b, stats_atom::value);
    if (policy == routing_policy::round_robin) {
      EXPECT_EQ(st.routed[0], 6U);
      EXPECT_EQ(st.routed[1], 6U);
    } else {
      EXPECT_EQ(st.routed[0], 12U); // the slow engine is never less loaded
      EXPECT_EQ(st.routed[1], 0U);
    }
    sched_->advance_time(100ms);
    sched_->run();
    for (auto& o : out)
      EXPECT_TRUE(o->value.has_value());
    caf::anon_send_exit(b, caf::exit_reason::user_shutdown);
    sched_->run();
  }
}

/// A factory of small_engine(256, 100, 100ms) engines (which hold each
/// request in a batch for 100 ms) giving slot i capacity weight
/// weights[i]; the engine it started last is kept in `*last`.
engine_factory weighted_engines(std::vector<double> weights,
                                std::shared_ptr<caf::actor> last) {
  return [weights, last](caf::actor_system& s,
                         std::uint32_t slot) -> result<started_engine> {
    auto c = small_engine(256, 100, 100ms);
    c.slot = slot;
    auto started = started_now(spawn_engine_actor(s, c));
    if (started) {
      started->weight = weights.at(slot);
      *last = started->actor;
    }
    return started;
  };
}

TEST_F(actor_test, LeastLoadedDividesTheLoadByTheCapacityWeight) {
  // Slot 1 has three times slot 0's capacity: of 8 requests held in flight
  // it takes 6 (in_flight / weight decides; ties go to the lower slot).
  balancer_config bc;
  bc.routing.policy = routing_policy::least_loaded;
  bc.initial_engines = 2;
  auto b = started_balancer(
      bc, weighted_engines({1.0, 3.0}, std::make_shared<caf::actor>()));
  std::vector<std::shared_ptr<outcome<kv_reply>>> out;
  for (std::uint64_t i = 0; i < 8; ++i) {
    out.push_back(
        ask<kv_reply>(b, process_atom::value, make_request(i, 0, 0, 1, i)));
    sched_->run();
  }
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.in_flight, (std::vector<std::uint64_t>{2, 6}));
  EXPECT_EQ(st.weight, (std::vector<double>{1.0, 3.0}));
  sched_->advance_time(100ms);
  sched_->run();
  for (auto& o : out)
    EXPECT_TRUE(o->value.has_value());
}

TEST_F(actor_test, AReplicaWithABadCapacityWeightFailsToStartAndExits) {
  // The factory gives the replica in slot 1 a weight that is not finite
  // and > 0: the replica_atom gets invalid_argument naming it, the engine
  // the factory spawned is told to exit, and slot 0 serves on.
  for (double bad : {0.0, -2.0, std::nan("")}) {
    balancer_config bc;
    bc.initial_engines = 1;
    auto last = std::make_shared<caf::actor>();
    auto b = started_balancer(bc, weighted_engines({1.0, bad}, last));
    auto replica = ask<std::uint32_t>(b, replica_atom::value);
    sched_->run();
    auto gone = std::make_shared<bool>(false);
    stop_at_end_.push_back(sys_->spawn(
        [engine = *last, gone](caf::event_based_actor* self) -> caf::behavior {
          self->monitor(engine);
          self->set_down_handler([gone](caf::down_msg&) { *gone = true; });
          return {[](std::int32_t) {}}; // stays up to hear the down_msg
        }));
    sched_->run();
    ASSERT_TRUE(replica->error.has_value()) << bad;
    const auto e = from_caf_error(*replica->error);
    EXPECT_EQ(e.code, errc::invalid_argument);
    EXPECT_NE(e.message.find("capacity weight"), std::string::npos)
        << e.message;
    EXPECT_TRUE(*gone) << bad;
    auto st = ask_now<balancer_stats>(b, stats_atom::value);
    EXPECT_EQ(st.live, 1U);
    EXPECT_EQ(st.engines, 1U);
    auto served =
        ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1));
    sched_->run();
    sched_->advance_time(100ms);
    sched_->run();
    EXPECT_TRUE(served->value.has_value()) << bad;
    caf::anon_send_exit(b, caf::exit_reason::user_shutdown);
    sched_->run();
  }
}

struct routing_outcome {
  double hit_ratio = 0.0;
  double max_share = 0.0;
};

routing_outcome run_shared_prefix(actor_test* t, caf::actor_system& sys,
                                  caf::scheduler::test_coordinator& sched,
                                  routing_policy policy) {
  (void)t;
  const std::size_t engines = 4;
  balancer_config bc;
  bc.routing.policy = policy;
  bc.initial_engines = engines;
  auto b = spawned(
      spawn_balancer(sys, bc, [](caf::actor_system& s, std::uint32_t slot) {
        auto c = small_engine(48); // ~3 of the 16 hot prefixes fit one engine
        c.slot = slot;
        return started_now(spawn_engine_actor(s, c));
      }));
  sched.run();
  std::mt19937_64 rng{7};
  std::uint64_t matched = 0;
  std::uint64_t total = 0;
  std::vector<std::shared_ptr<outcome<kv_reply>>> wave;
  std::uint64_t id = 0;
  for (int w = 0; w < 100; ++w) {
    wave.clear();
    for (int i = 0; i < 8; ++i, ++id) {
      // 16 prefix groups of 8 blocks, skewed popularity, 2 unique blocks.
      auto g = std::min<std::uint64_t>(rng() % 16, rng() % 16);
      auto out = std::make_shared<outcome<kv_reply>>();
      auto req = make_request(id, g, 8, 10, id);
      sys.spawn([=](caf::event_based_actor* self) {
        self->request(b, 3600s, process_atom::value, req)
            .then([=](kv_reply& r) { out->value = r; },
                  [=](caf::error& e) { out->error = e; });
      });
      wave.push_back(out);
    }
    sched.run();
    for (auto& o : wave) {
      EXPECT_TRUE(o->value.has_value());
      if (o->value) {
        matched += o->value->matched_blocks;
        total += o->value->matched_blocks + o->value->computed_blocks;
      }
    }
  }
  auto st = std::make_shared<outcome<balancer_stats>>();
  sys.spawn([=](caf::event_based_actor* self) {
    self->request(b, 3600s, stats_atom::value)
        .then([=](balancer_stats& s) { st->value = s; }, [=](caf::error&) {});
  });
  sched.run();
  routing_outcome r;
  r.hit_ratio = static_cast<double>(matched) / static_cast<double>(total);
  std::uint64_t sum = 0;
  std::uint64_t mx = 0;
  for (auto n : st->value->routed) {
    sum += n;
    mx = std::max(mx, n);
  }
  r.max_share = static_cast<double>(mx) / static_cast<double>(sum);
  caf::anon_send_exit(b, caf::exit_reason::user_shutdown);
  sched.run();
  return r;
}

TEST_F(actor_test, KvAwareBeatsLeastLoadedOnSharedPrefixWithoutOverload) {
  auto ll =
      run_shared_prefix(this, *sys_, *sched_, routing_policy::least_loaded);
  auto kv = run_shared_prefix(this, *sys_, *sched_, routing_policy::kv_aware);
  std::printf("block hit ratio: kv_aware %.3f (max engine share %.2f), "
              "least_loaded %.3f (max engine share %.2f)\n",
              kv.hit_ratio, kv.max_share, ll.hit_ratio, ll.max_share);
  EXPECT_GT(kv.hit_ratio, ll.hit_ratio * 1.2)
      << "kv_aware " << kv.hit_ratio << " least_loaded " << ll.hit_ratio;
  EXPECT_LT(kv.max_share, 0.5) << "one engine took " << kv.max_share;
}

TEST_F(actor_test, RequestTimeoutReturnsTimeoutError) {
  // The engine holds requests for 10 s; the balancer waits 50 ms.
  auto b =
      balancer(routing_policy::least_loaded, {small_engine(64, 20, 10s)}, 50ms);
  auto r = ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1));
  sched_->run();
  EXPECT_FALSE(r->done());
  sched_->advance_time(50ms);
  sched_->run();
  ASSERT_TRUE(r->error.has_value());
  EXPECT_TRUE(is_timeout(*r->error));
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).timeouts, 1U);
  sched_->advance_time(10s);
  sched_->run();
}

TEST_F(actor_test, TimeoutsFireAtEachDeadlineAndLateRepliesAreDropped) {
  // One timer serves every open request: each still times out at its own
  // deadline, its engine's load is released once, when the engine's late
  // answer comes (the engine works on it until then), and that answer
  // reaches no caller. (Before, a timeout released the load at once, so
  // the engine read idle while still busy with both.)
  auto b =
      balancer(routing_policy::least_loaded, {small_engine(64, 20, 10s)}, 50ms);
  auto r1 = ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1));
  sched_->run();
  sched_->advance_time(30ms);
  sched_->run();
  auto r2 = ask<kv_reply>(b, process_atom::value, make_request(2, 0, 0, 1, 2));
  sched_->run();
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).in_flight.at(0), 2U);
  sched_->advance_time(20ms); // t = 50 ms: r1's deadline
  sched_->run();
  ASSERT_TRUE(r1->error.has_value());
  EXPECT_TRUE(is_timeout(*r1->error));
  EXPECT_FALSE(r2->done());
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.timeouts, 1U);
  EXPECT_EQ(st.in_flight.at(0), 2U);
  sched_->advance_time(30ms); // t = 80 ms: r2's
  sched_->run();
  ASSERT_TRUE(r2->error.has_value());
  EXPECT_TRUE(is_timeout(*r2->error));
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.timeouts, 2U);
  EXPECT_EQ(st.in_flight.at(0), 2U);
  sched_->advance_time(10s); // the engine's batch closes; both replies late
  sched_->run();
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.timeouts, 2U);
  EXPECT_EQ(st.in_flight.at(0), 0U);
  EXPECT_FALSE(r1->value.has_value());
  EXPECT_FALSE(r2->value.has_value());
}

/// An engine that holds each request until it is told its id (a
/// std::string of it), then answers it.
struct held_requests_state {
  std::map<std::uint64_t, caf::response_promise> held;
  static inline const char* name = "test.held_requests_engine";
};

caf::behavior
held_requests_engine(caf::stateful_actor<held_requests_state>* self) {
  return {
      [](listen_atom, const caf::actor&) {},
      [=](process_atom, const kv_request& r) -> caf::result<kv_reply> {
        auto p = self->make_response_promise();
        self->state.held.emplace(r.id, p);
        return p;
      },
      [=](const std::string& id) {
        const auto it = self->state.held.find(std::stoull(id));
        if (it == self->state.held.end())
          return;
        kv_reply rep;
        rep.id = it->first;
        it->second.deliver(rep);
        self->state.held.erase(it);
      },
  };
}

caf::actor
actor_test::held_requests_balancer(std::shared_ptr<caf::actor> engine) {
  balancer_config bc;
  bc.request_timeout = 50ms;
  auto b = started_balancer(
      bc,
      [engine](caf::actor_system& s, std::uint32_t) -> result<started_engine> {
        *engine = s.spawn(held_requests_engine);
        return started_now(*engine);
      });
  sched_->run();
  stop_at_end_.push_back(*engine);
  return b;
}

TEST_F(actor_test, ALateSweepDoesNotTimeOutAReplySentInTime) {
  // Request 1 at 0 ms, request 2 at 10 ms (deadline 60 ms). The sweep for
  // 1 is queued at 50 ms; the engine answers 2 at 50 ms, behind it. The
  // balancer reads the sweep only at 61 ms: 1 times out, 2 gets its
  // reply. (Before, the sweep timed out every call due by the time it was
  // read, and dropped 2's reply: its caller heard "timeout" while a
  // pinning request's pins stayed.)
  auto engine = std::make_shared<caf::actor>();
  auto b = held_requests_balancer(engine);
  auto r1 = ask_untimed<kv_reply>(b, process_atom::value,
                                  make_request(1, 0, 0, 1, 1));
  sched_->run();
  sched_->advance_time(10ms);
  sched_->run();
  auto r2 = ask_untimed<kv_reply>(b, process_atom::value,
                                  make_request(2, 0, 0, 1, 2));
  sched_->run();
  sched_->advance_time(40ms); // 50 ms: the sweep for 1 is queued
  caf::anon_send(*engine, std::string{"2"});
  sched_->prioritize(*engine);
  sched_->run_once();         // 2's reply, queued behind the sweep
  sched_->advance_time(11ms); // the balancer reads them at 61 ms
  sched_->run();
  ASSERT_TRUE(r1->error.has_value());
  EXPECT_TRUE(is_timeout(*r1->error));
  ASSERT_TRUE(r2->value.has_value())
      << to_string(r2->error.value_or(caf::error{}));
  EXPECT_EQ(r2->value->id, 2U);
  const auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.timeouts, 1U);
  caf::anon_send(*engine, std::string{"1"}); // 1's late answer
  sched_->run();
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).in_flight.at(0), 0U);
}

TEST_F(actor_test, ALateSweepDoesNotTimeOutUrgentRepliesSentInTime) {
  // As above with 20 critical requests, whose replies come urgent, and a
  // balancer that reads its mailbox as a worker thread does, many messages
  // a turn: CAF takes turns between urgent and normal messages, so the
  // sweep (a normal message) could overtake urgent replies queued before
  // it. None of the 20 times out. (Before, 8 did.)
  auto engine = std::make_shared<caf::actor>();
  auto b = held_requests_balancer(engine);
  auto first = ask_untimed<kv_reply>(b, process_atom::value,
                                     make_request(100, 0, 0, 1, 100));
  sched_->run();
  sched_->advance_time(10ms);
  sched_->run();
  std::vector<std::shared_ptr<outcome<kv_reply>>> critical;
  for (std::uint64_t i = 1; i <= 20; ++i) {
    auto r = make_request(i, 0, 0, 1, i);
    r.prio = engine::priority::critical;
    critical.push_back(ask_untimed<kv_reply>(b, process_atom::value, r));
  }
  sched_->run();
  sched_->advance_time(40ms); // 50 ms: the sweep for the first is queued
  for (std::uint64_t i = 1; i <= 20; ++i)
    caf::anon_send(*engine, std::to_string(i));
  auto* job =
      dynamic_cast<caf::resumable*>(caf::actor_cast<caf::abstract_actor*>(b));
  ASSERT_NE(job, nullptr);
  sched_->run_jobs_filtered([=](caf::resumable* j) { return j != job; });
  sched_->advance_time(11ms); // the balancer reads them all at 61 ms
  caf::scoped_execution_unit unit{sys_.get()};
  job->resume(&unit, 1000);
  sched_->run();
  ASSERT_TRUE(first->error.has_value());
  int timed_out = 0;
  for (const auto& r : critical)
    timed_out += r->error.has_value() ? 1 : 0;
  EXPECT_EQ(timed_out, 0) << "replies sent in time timed out";
  caf::anon_send(*engine, std::string{"100"});
  sched_->run();
}

TEST_F(actor_test, LeastLoadedRoutesAroundAnEngineStillBusyWithTimedOutWork) {
  // Engine 0 holds its requests for 10 s (its batch closes then); engine 1
  // answers at once. The request sent to engine 0 times out; engine 0
  // still works on it, so least_loaded sends the next ones to engine 1.
  // (Before, the timeout released engine 0's load and it was picked
  // again, to time out again.)
  auto b = balancer(routing_policy::least_loaded,
                    {small_engine(64, 20, 10s), small_engine(64)}, 50ms);
  auto r1 = ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1));
  auto r2 = ask<kv_reply>(b, process_atom::value, make_request(2, 0, 0, 1, 2));
  sched_->run();
  // Engine 1 answered one of them; the other waits in engine 0's batch.
  const auto first = ask_now<balancer_stats>(b, stats_atom::value);
  ASSERT_EQ(first.in_flight.at(0), 1U);
  sched_->advance_time(50ms);
  sched_->run();
  ASSERT_TRUE(r1->done() && r2->done());
  for (std::uint64_t id = 3; id < 7; ++id) {
    auto r =
        ask<kv_reply>(b, process_atom::value, make_request(id, 0, 0, 1, id));
    sched_->run();
    ASSERT_TRUE(r->value.has_value())
        << id << ": " << to_string(r->error.value_or(caf::error{}));
    EXPECT_EQ(r->value->engine, 1U) << id;
  }
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.timeouts, 1U);
  EXPECT_EQ(st.in_flight.at(0), 1U);
  sched_->advance_time(10s); // engine 0 answers; its load is released
  sched_->run();
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.in_flight.at(0), 0U);
  EXPECT_EQ(st.in_flight.at(1), 0U);
}

TEST_F(actor_test, ARetiredEngineDoesNotWaitForRequestsThatTimedOut) {
  // Engine 1 holds its requests for 10 s. One of them times out, then
  // engine 1 is retired: nothing else waits for it, so it exits at once and
  // its slot takes the next replica, though its load still counts the
  // timed-out request (an engine stuck on one would hold its slot
  // forever).
  auto b = balancer(routing_policy::round_robin,
                    {small_engine(64), small_engine(64, 20, 10s)}, 50ms);
  sched_->run();
  ASSERT_EQ(
      ask_now<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1))
          .engine,
      0U);
  auto held =
      ask<kv_reply>(b, process_atom::value, make_request(2, 0, 0, 1, 2));
  sched_->run();
  sched_->advance_time(50ms);
  sched_->run();
  ASSERT_TRUE(held->error.has_value());
  ASSERT_EQ(ask_now<balancer_stats>(b, stats_atom::value).in_flight.at(1), 1U);
  ASSERT_EQ(ask_now<std::uint32_t>(b, retire_atom::value), 1U);
  sched_->run();
  ASSERT_EQ(ask_now<std::uint32_t>(b, replica_atom::value), 2U);
  const auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1})) << "slot 1 not reused";
}

TEST_F(actor_test, ARetireSkipsAnEngineHoldingPins) {
  // Engine 1, the highest slot, holds a pinned block: the retire takes
  // engine 0, which holds none. (Before, the highest live slot went, and
  // the pins with it.)
  auto b = balancer(routing_policy::round_robin,
                    {small_engine(64), small_engine(64)});
  sched_->run();
  ASSERT_EQ(
      ask_now<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1))
          .engine,
      0U);
  auto pinned = make_request(2, 0, 0, 1, 2);
  pinned.pin = true;
  ASSERT_EQ(ask_now<kv_reply>(b, process_atom::value, pinned).engine, 1U);
  sched_->run();
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.pinned_bytes, (std::vector<std::uint64_t>{0, block_bytes}));
  ASSERT_EQ(ask_now<std::uint32_t>(b, retire_atom::value), 1U);
  sched_->run();
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}))
      << "the engine holding pins was retired";
  EXPECT_EQ(st.pinned_bytes, (std::vector<std::uint64_t>{0, block_bytes}));
}

TEST_F(actor_test, ARetireIsRefusedWhileEveryEngineHoldsPins) {
  // Both engines hold a pinned block: the retire is refused (busy) and
  // both stay live. Once engine 0's block is unpinned (a cached block: the
  // engine reports the change with no key events), it is the one retired.
  auto b = balancer(routing_policy::round_robin,
                    {small_engine(64), small_engine(64)});
  sched_->run();
  auto first = make_request(1, 0, 0, 1, 1);
  auto second = make_request(2, 0, 0, 1, 2);
  first.pin = second.pin = true;
  ASSERT_EQ(ask_now<kv_reply>(b, process_atom::value, first).engine, 0U);
  ASSERT_EQ(ask_now<kv_reply>(b, process_atom::value, second).engine, 1U);
  sched_->run();
  auto refused = ask<std::uint32_t>(b, retire_atom::value);
  sched_->run();
  ASSERT_TRUE(refused->error.has_value()) << "an engine with pins retired";
  EXPECT_EQ(from_caf_error(*refused->error).code, errc::busy);
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1}));
  EXPECT_EQ(st.live, 2U);

  const auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  ASSERT_TRUE(ask_now<bool>(e0, unpin_atom::value, first.keys.front()));
  sched_->run();
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.pinned_bytes, (std::vector<std::uint64_t>{0, block_bytes}));
  ASSERT_EQ(ask_now<std::uint32_t>(b, retire_atom::value), 1U);
  sched_->run();
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}));
}

TEST_F(actor_test, ARetireSkipsAnEngineWorkingOnAPinningRequest) {
  // Engine 1 holds a pinning request in its batch: it holds no pins yet,
  // but would once the request is done, and they would go with it. The
  // retire takes engine 0.
  auto b = balancer(routing_policy::round_robin,
                    {small_engine(64), small_engine(64, 20, 10s)}, 20s);
  sched_->run();
  ASSERT_EQ(
      ask_now<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1))
          .engine,
      0U);
  auto pinned = make_request(2, 0, 0, 1, 2);
  pinned.pin = true;
  auto held = ask<kv_reply>(b, process_atom::value, pinned);
  sched_->run();
  ASSERT_FALSE(held->done()) << "engine 1 holds its request";
  ASSERT_EQ(ask_now<std::uint32_t>(b, retire_atom::value), 1U);
  sched_->run();
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}))
      << "the engine working on a pinning request was retired";
  sched_->advance_time(10s); // engine 1's batch closes
  sched_->run();
  ASSERT_TRUE(held->value.has_value())
      << to_string(held->error.value_or(caf::error{}));
  EXPECT_EQ(held->value->engine, 1U);
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.pinned_bytes.at(1), block_bytes);
}

/// Synthetic KV; producing block `trigger` sends retire_atom to *target
/// (a scaler's retire that comes while the engine computes its batch).
struct retire_on_produce final : engine::kv_producer {
  std::shared_ptr<caf::actor> target;
  block_key trigger;
  engine::synthetic_producer inner;
  result<void> produce(const engine::namespace_spec& spec, const block_key& key,
                       std::span<std::byte> out) override {
    if (key == trigger && *target)
      caf::anon_send(*target, retire_atom::value);
    return inner.produce(spec, key, out);
  }
  engine::nanos cost(std::size_t tokens) const noexcept override {
    return inner.cost(tokens);
  }
};

TEST_F(actor_test, ARetireRightAfterAPinningReplyPassesOverItsEngine) {
  // Engine 1 answers a pinning request, then computes the next request of
  // its batch, during which a retire reaches the balancer: engine 1's
  // block_events, which tell of the pin, come only after the batch. The
  // reply told of it already, so the retire takes engine 0. (Before, it
  // took engine 1, the pinned block with it.)
  auto target = std::make_shared<caf::actor>();
  const auto next = make_request(4, 0, 0, 1, 4);
  auto e1 = small_engine(64, 2, 10s);
  e1.make_producer = [target, trigger = next.keys.front()] {
    auto p = std::make_unique<retire_on_produce>();
    p->target = target;
    p->trigger = trigger;
    return std::unique_ptr<engine::kv_producer>(std::move(p));
  };
  auto b = balancer(routing_policy::round_robin, {small_engine(64), e1}, 20s);
  *target = b;
  sched_->run();
  ASSERT_EQ(
      ask_now<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1))
          .engine,
      0U);
  auto pinned = make_request(2, 0, 0, 1, 2);
  pinned.pin = true;
  auto held = ask<kv_reply>(b, process_atom::value, pinned);
  sched_->run();
  ASSERT_FALSE(held->done()) << "engine 1 holds it in its batch";
  ASSERT_EQ(
      ask_now<kv_reply>(b, process_atom::value, make_request(3, 0, 0, 1, 3))
          .engine,
      0U);
  auto second = ask<kv_reply>(b, process_atom::value, next); // fills it
  sched_->run();
  ASSERT_TRUE(held->value.has_value())
      << to_string(held->error.value_or(caf::error{}));
  EXPECT_EQ(held->value->engine, 1U);
  EXPECT_EQ(held->value->pinned_bytes, block_bytes);
  const auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}))
      << "the engine that had just pinned a block was retired";
  EXPECT_EQ(st.pinned_bytes, (std::vector<std::uint64_t>{0, block_bytes}));
}

TEST_F(actor_test, AnEngineTellsItsPinsToANewListenerAndEachPinChange) {
  // A listener that comes while the engine holds pins hears of them at
  // once; a pin or unpin of a cached block, which stores and evicts
  // nothing, is still reported, with the seq of the events before it.
  auto e = spawned(spawn_engine_actor(*sys_, small_engine(64)));
  stop_at_end_.push_back(e);
  auto pinned = make_request(1, 0, 0, 2, 1);
  pinned.pin = true;
  ASSERT_EQ(ask_now<kv_reply>(e, process_atom::value, pinned).computed_blocks,
            2U);
  auto events = std::make_shared<std::vector<block_events>>();
  record_events(e, events);
  ASSERT_EQ(events->size(), 1U);
  EXPECT_TRUE(events->back().stored.empty());
  EXPECT_EQ(events->back().pinned_bytes, 2 * block_bytes);
  ASSERT_TRUE(ask_now<bool>(e, unpin_atom::value, pinned.keys.back()));
  sched_->run();
  ASSERT_EQ(events->size(), 2U);
  EXPECT_TRUE(events->back().stored.empty() && events->back().evicted.empty());
  EXPECT_EQ(events->back().pinned_bytes, block_bytes);
  EXPECT_EQ(events->back().seq, events->front().seq);
  ASSERT_TRUE(ask_now<bool>(e, pin_atom::value, pinned.keys.back()));
  sched_->run();
  ASSERT_EQ(events->size(), 3U);
  EXPECT_EQ(events->back().pinned_bytes, 2 * block_bytes);
  // A request that pins nothing new and stores nothing sends none.
  ASSERT_EQ(ask_now<kv_reply>(e, process_atom::value, pinned).matched_blocks,
            2U);
  sched_->run();
  EXPECT_EQ(events->size(), 3U);
}

TEST_F(actor_test, ABalancerListenerCountsOnceAndIsForgottenWhenItStops) {
  // A listener subscribed twice gets each sample once. When it stops, the
  // balancer lets go of it: nothing keeps the stopped actor alive, and no
  // request is sent to it again.
  auto b = balancer(routing_policy::round_robin, {small_engine(64)});
  auto samples = std::make_shared<std::size_t>(0);
  auto listener = sys_->spawn([samples](caf::event_based_actor*) {
    return caf::behavior{
        [samples](observe_atom, const kv_request&, const kv_reply&,
                  std::int64_t) { ++*samples; },
        [](const block_events&) {},
    };
  });
  caf::anon_send(b, listen_atom::value, listener);
  caf::anon_send(b, listen_atom::value, listener);
  sched_->run();
  ask_now<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1));
  EXPECT_EQ(*samples, 1U);
  auto weak = caf::actor_cast<caf::weak_actor_ptr>(listener);
  caf::anon_send_exit(listener, caf::exit_reason::user_shutdown);
  listener = caf::actor{};
  sched_->run();
  EXPECT_EQ(weak.lock(), nullptr) << "the balancer still holds the listener";
  ask_now<kv_reply>(b, process_atom::value, make_request(2, 0, 0, 1, 2));
  EXPECT_EQ(*samples, 1U);
}

TEST_F(actor_test, FailedEngineIsRestartedAndRoutedAround) {
  auto b = balancer(routing_policy::round_robin,
                    {small_engine(64), small_engine(64)});
  sched_->run();
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  caf::anon_send_exit(e0, caf::exit_reason::kill);
  sched_->run();
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}));
  for (std::uint64_t i = 0; i < 4; ++i) {
    auto rep =
        ask_now<kv_reply>(b, process_atom::value, make_request(i, 0, 0, 1, i));
    EXPECT_EQ(rep.engine, 1U);
  }
  sched_->advance_time(100ms); // restart_delay
  sched_->run();
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1}));
  EXPECT_EQ(st.restarts, 1U);
  std::vector<std::uint32_t> engines;
  for (std::uint64_t i = 0; i < 2; ++i)
    engines.push_back(ask_now<kv_reply>(b, process_atom::value,
                                        make_request(10 + i, 0, 0, 1, 10 + i))
                          .engine);
  std::sort(engines.begin(), engines.end());
  EXPECT_EQ(engines, (std::vector<std::uint32_t>{0, 1}));
}

TEST_F(actor_test, RestartFromOutsideDoesNotCutTheRestartDelay) {
  // Only the balancer's own timer restarts a failed engine: a restart_atom
  // from anyone else is ignored. (Before, it restarted the slot at once.)
  auto b = balancer(routing_policy::round_robin,
                    {small_engine(64), small_engine(64)});
  sched_->run();
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  caf::anon_send_exit(e0, caf::exit_reason::kill);
  sched_->run();
  caf::anon_send(b, restart_atom::value, std::uint32_t{0});
  sched_->run();
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}));
  sched_->advance_time(100ms); // restart_delay
  sched_->run();
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1}));
  EXPECT_EQ(st.restarts, 1U);
}

TEST_F(actor_test, NewAndRestartedEnginesGetTheLastCapacity) {
  // The scaler changed the token budget to 2048: a replica added after,
  // and an engine restarted after, run with 2048, not the configured 8192.
  auto b = balancer(routing_policy::round_robin, {small_engine(64)});
  sched_->run();
  auto capacity = [&](std::uint32_t slot) {
    auto e = ask_now<caf::actor>(b, engine_atom::value, slot);
    return ask_now<engine_stats>(e, stats_atom::value).capacity_tokens;
  };
  EXPECT_EQ(capacity(0), 8192U);
  caf::anon_send(b, capacity_atom::value, std::uint32_t{2048});
  sched_->run();
  EXPECT_EQ(capacity(0), 2048U);
  EXPECT_EQ(ask_now<std::uint32_t>(b, replica_atom::value), 2U);
  EXPECT_EQ(capacity(1), 2048U);
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  caf::anon_send_exit(e0, caf::exit_reason::kill);
  sched_->run();
  sched_->advance_time(100ms); // restart_delay
  sched_->run();
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).restarts, 1U);
  EXPECT_EQ(capacity(0), 2048U);
}

TEST_F(actor_test, RetiredSlotsAreReused) {
  // 70 spawn/retire cycles pass the router's 64 slots: each new replica
  // takes the slot the last one left.
  auto b = balancer(routing_policy::round_robin, {small_engine(64)});
  sched_->run();
  for (int i = 0; i < 70; ++i) {
    ASSERT_EQ(ask_now<std::uint32_t>(b, replica_atom::value), 2U) << i;
    ASSERT_EQ(ask_now<std::uint32_t>(b, retire_atom::value), 1U) << i;
  }
  EXPECT_EQ(ask_now<std::uint32_t>(b, replica_atom::value), 2U);
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1}));
  // Both engines serve.
  std::set<std::uint32_t> engines;
  for (std::uint64_t i = 0; i < 2; ++i)
    engines.insert(
        ask_now<kv_reply>(b, process_atom::value, make_request(i, 0, 0, 1, i))
            .engine);
  EXPECT_EQ(engines, (std::set<std::uint32_t>{0, 1}));
}

/// A round-robin balancer of two engines; request r0 (3 blocks) went to
/// engine 0 and r1 to engine 1, so each holds one prefix.
std::tuple<caf::actor, kv_request, kv_request>
actor_test::two_engines_holding_a_prefix_each() {
  auto b = balancer(routing_policy::round_robin,
                    {small_engine(64), small_engine(64)});
  sched_->run();
  const auto r0 = make_request(1, 0, 0, 3, 1);
  const auto r1 = make_request(2, 0, 0, 3, 2);
  EXPECT_EQ(ask_now<kv_reply>(b, process_atom::value, r0).engine, 0U);
  EXPECT_EQ(ask_now<kv_reply>(b, process_atom::value, r1).engine, 1U);
  return {b, r0, r1};
}

TEST_F(actor_test, ALookupDoesNotGoToAnEngineBeingRetired) {
  // Engine 1 holds the prefix and is retired with nothing in flight, so the
  // balancer stops it at once. A lookup right behind the retire must not
  // be sent to it (it would be answered request_receiver_down): it asks a
  // live engine, which holds nothing of it (a miss, not an error).
  const auto [b, r0, r1] = two_engines_holding_a_prefix_each();
  auto retired = ask<std::uint32_t>(b, retire_atom::value);
  auto found = ask<std::uint64_t>(b, lookup_atom::value, r1.keys);
  sched_->run();
  ASSERT_TRUE(retired->value.has_value());
  EXPECT_EQ(*retired->value, 1U);
  ASSERT_TRUE(found->value.has_value())
      << to_string(found->error.value_or(caf::error{}));
  EXPECT_EQ(*found->value, 0U);
  // And the prefix engine 0 holds is still found there.
  EXPECT_EQ(ask_now<std::uint64_t>(b, lookup_atom::value, r0.keys), 3U);
}

TEST_F(actor_test, EngineAtomGivesARetiringEngineOnlyWhenAskedTo) {
  // Engine 1 is retired with a request held in its batch, so it drains.
  // engine_atom(1) refuses it (a put there would go with it);
  // engine_atom(1, true) gives it until it has exited, then not_found.
  auto b = balancer(routing_policy::round_robin,
                    {small_engine(64), small_engine(64, 100, 100ms)});
  sched_->run();
  ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1));
  auto held =
      ask<kv_reply>(b, process_atom::value, make_request(2, 0, 0, 1, 2));
  sched_->run();
  ASSERT_FALSE(held->done()) << "engine 1 holds its request";
  ASSERT_EQ(ask_now<std::uint32_t>(b, retire_atom::value), 1U);
  auto refused = ask<caf::actor>(b, engine_atom::value, std::uint32_t{1});
  sched_->run();
  ASSERT_TRUE(refused->error.has_value());
  EXPECT_EQ(from_caf_error(*refused->error).code, errc::unavailable);
  const auto e1 =
      ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{1}, true);
  EXPECT_TRUE(e1);
  EXPECT_TRUE(
      ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0}, false));
  sched_->advance_time(100ms); // its batch closes; it answers and exits
  sched_->run();
  EXPECT_TRUE(held->value.has_value());
  auto gone = ask<caf::actor>(b, engine_atom::value, std::uint32_t{1}, true);
  sched_->run();
  ASSERT_TRUE(gone->error.has_value());
  EXPECT_EQ(from_caf_error(*gone->error).code, errc::not_found);
}

TEST_F(actor_test, ALookupWithNoEngineCountsAsRejected) {
  // Like a process request refused for want of an engine.
  balancer_config bc;
  bc.initial_engines = 0;
  auto b = started_balancer(
      bc, [](caf::actor_system&, std::uint32_t) -> result<started_engine> {
        return make_error(errc::backend_error, "not called (test)");
      });
  auto found = ask<std::uint64_t>(b, lookup_atom::value,
                                  make_request(1, 0, 0, 1, 1).keys);
  sched_->run();
  ASSERT_TRUE(found->error.has_value());
  EXPECT_EQ(from_caf_error(*found->error).code, errc::unavailable);
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).rejected, 1U);
}

TEST_F(actor_test, ALookupWhoseEngineDiesIsAskedOfAnotherEngine) {
  // Engine 1 holds the prefix and dies with the balancer's lookup in its
  // mailbox (killed ahead of it). The lookup is answered
  // request_receiver_down; the balancer marks engine 1 down and asks
  // engine 0, which holds nothing of it: a miss, not an error. (Before, the
  // caller got request_receiver_down, while a process call was rerouted.)
  const auto [b, r0, r1] = two_engines_holding_a_prefix_each();
  const auto e1 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{1});
  auto found = ask<std::uint64_t>(b, lookup_atom::value, r1.keys);
  run_all_but(*sched_, e1); // the lookup waits in engine 1's mailbox
  ASSERT_FALSE(found->done());
  e1->enqueue(
      nullptr, caf::make_message_id(caf::message_priority::high),
      caf::make_message(caf::exit_msg{e1.address(), caf::exit_reason::kill}),
      nullptr);
  sched_->run();
  ASSERT_TRUE(found->value.has_value())
      << to_string(found->error.value_or(caf::error{}));
  EXPECT_EQ(*found->value, 0U);
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).rerouted, 1U);
  EXPECT_EQ(ask_now<std::uint64_t>(b, lookup_atom::value, r0.keys), 3U);
}

TEST_F(actor_test, ALookupTheEngineDoesNotAnswerTimesOutAtTheBalancer) {
  // The engine reads nothing (busy with a long batch, or stuck). A lookup
  // through the balancer gets its request_timeout like a process call, also
  // from a caller with no timer of its own; the engine's late answer
  // reaches nobody and leaves the balancer as it was. (Before, the lookup
  // was delegated to the engine: it waited as long as the engine did, for
  // ever for a caller without a timer.)
  auto b = balancer(routing_policy::least_loaded, {small_engine(64)}, 50ms);
  sched_->run();
  const auto r = make_request(1, 0, 0, 3, 1);
  ASSERT_EQ(ask_now<kv_reply>(b, process_atom::value, r).computed_blocks, 3U);
  const auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  auto found = ask_untimed<std::uint64_t>(b, lookup_atom::value, r.keys);
  run_all_but(*sched_, e0);
  sched_->advance_time(49ms);
  run_all_but(*sched_, e0);
  EXPECT_FALSE(found->done());
  sched_->advance_time(1ms); // the balancer's deadline
  run_all_but(*sched_, e0);
  ASSERT_TRUE(found->error.has_value()) << "no answer at the deadline";
  EXPECT_TRUE(is_timeout(*found->error)) << to_string(*found->error);
  sched_->run(); // the engine answers now: too late
  EXPECT_FALSE(found->value.has_value());
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.timeouts, 1U);
  EXPECT_EQ(st.in_flight.at(0), 0U) << "a lookup counts in no load";
  // The balancer goes on answering lookups in time.
  EXPECT_EQ(ask_now<std::uint64_t>(b, lookup_atom::value, r.keys), 3U);
  sched_->advance_time(50ms);
  sched_->run();
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).timeouts, 1U);
}

TEST_F(actor_test, ARetireSkipsAnEngineAFailedRequestFoundGone) {
  // Engine 2 dies with a request in its batch. The balancer reads the
  // request's request_receiver_down first (it reroutes the request and
  // marks slot 2 down), and a retire comes before engine 2's down message:
  // it must drain a live engine, not the dead one (which would cancel its
  // restart, drain nothing and leave as many live engines as before).
  auto b =
      balancer(routing_policy::round_robin,
               {small_engine(64), small_engine(64), small_engine(64, 20, 10s)});
  sched_->run();
  for (std::uint64_t id = 1; id <= 2; ++id)
    ASSERT_EQ(
        ask_now<kv_reply>(b, process_atom::value, make_request(id, 0, 0, 2, id))
            .engine,
        id - 1);
  auto held =
      ask<kv_reply>(b, process_atom::value, make_request(3, 0, 0, 2, 3));
  sched_->run();
  ASSERT_FALSE(held->done()); // in engine 2's batch
  auto e2 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{2});
  caf::anon_send_exit(e2, caf::exit_reason::kill);
  run_all_but(*sched_, b); // the reply's error, then the down message
  ASSERT_TRUE(sched_->prioritize(b));
  sched_->run_once(); // the error only: slot 2 is down, the request rerouted
  caf::anon_send<caf::message_priority::high>(b, retire_atom::value);
  ASSERT_TRUE(sched_->prioritize(b));
  sched_->run_once(); // the retire, ahead of the down message
  sched_->run();
  sched_->advance_time(100ms); // restart_delay: engine 2 is back
  sched_->run();
  ASSERT_TRUE(held->value.has_value());
  EXPECT_NE(held->value->engine, 2U);
  const auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.rerouted, 1U);
  EXPECT_EQ(st.restarts, 1U);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 0, 1}));
  EXPECT_EQ(st.live, 2U);
}

TEST_F(actor_test, AGivenUpSlotIsFreedForTheNextReplica) {
  // max_restarts 1: engine 0 is restarted once, and when it fails again
  // it is given up. Its slot is then free like a retired one: the next
  // replica takes slot 0, and the stats show two live engines in two slots
  // (not a third slot next to a dead one).
  balancer_config bc;
  bc.routing.policy = routing_policy::round_robin;
  bc.initial_engines = 2;
  bc.max_restarts = 1;
  auto b = small_balancer(bc);
  sched_->run();
  std::vector<caf::actor> killed;
  auto kill_engine_0 = [&] {
    killed.push_back(
        ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0}));
    caf::anon_send_exit(killed.back(), caf::exit_reason::kill);
    sched_->run();
    sched_->advance_time(bc.restart_delay);
    sched_->run();
  };
  kill_engine_0(); // restarted
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).up,
            (std::vector<std::uint8_t>{1, 1}));
  kill_engine_0(); // given up: no restart comes
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}));
  EXPECT_EQ(st.live, 1U);
  EXPECT_EQ(st.restarts, 1U);
  EXPECT_EQ(st.given_up, 1U);
  EXPECT_EQ(st.engines, 1U); // a given-up engine is no longer kept
  EXPECT_EQ(st.in_flight, (std::vector<std::uint64_t>{0, 0}));
  auto none = ask<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  sched_->run();
  ASSERT_TRUE(none->error.has_value());
  EXPECT_EQ(from_caf_error(*none->error).code, errc::not_found);

  EXPECT_EQ(ask_now<std::uint32_t>(b, replica_atom::value), 2U);
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1}));
  EXPECT_EQ(st.live, 2U);
  EXPECT_EQ(st.given_up, 1U);
  auto reused = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  EXPECT_TRUE(reused);
  for (const auto& k : killed)
    EXPECT_NE(reused, k);
  std::set<std::uint32_t> engines;
  for (std::uint64_t i = 0; i < 2; ++i)
    engines.insert(
        ask_now<kv_reply>(b, process_atom::value, make_request(i, 0, 0, 1, i))
            .engine);
  EXPECT_EQ(engines, (std::set<std::uint32_t>{0, 1}));
}

TEST_F(actor_test, AnEngineThatRanRestartWindowGetsItsRestartsBack) {
  // max_restarts 1 in a row: an engine that ran restart_window (1 s)
  // before it failed starts the count again and is restarted, where a
  // count for the slot's life gave it up; one that fails right after its
  // restart is given up.
  balancer_config bc;
  bc.routing.policy = routing_policy::round_robin;
  bc.initial_engines = 2;
  bc.max_restarts = 1;
  bc.restart_window = std::chrono::seconds{1};
  auto b = small_balancer(bc);
  sched_->run();
  kill_engine_0(b, bc); // restart 1 of 1
  sched_->advance_time(std::chrono::seconds{1});
  sched_->run();
  kill_engine_0(b, bc); // ran 1 s: restart 1 of 1 again
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1}));
  EXPECT_EQ(st.restarts, 2U);
  EXPECT_EQ(st.given_up, 0U);
  sched_->advance_time(std::chrono::milliseconds{999});
  sched_->run();
  kill_engine_0(b, bc); // ran 999 ms: no restart left
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}));
  EXPECT_EQ(st.restarts, 2U);
  EXPECT_EQ(st.given_up, 1U);
}

TEST_F(actor_test, RestartWindowZeroCountsRestartsForTheSlotsLife) {
  balancer_config bc;
  bc.routing.policy = routing_policy::round_robin;
  bc.initial_engines = 2;
  bc.max_restarts = 1;
  bc.restart_window = std::chrono::milliseconds{0};
  auto b = small_balancer(bc);
  sched_->run();
  for (int i = 0; i < 2; ++i) {
    kill_engine_0(b, bc);
    sched_->advance_time(std::chrono::hours{1});
    sched_->run();
  }
  const auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.restarts, 1U);
  EXPECT_EQ(st.given_up, 1U);
}

/// An engine factory that counts its calls and fails while `failing`:
/// with an error value, or by throwing when `throwing`.
struct flaky_factory {
  std::shared_ptr<int> calls = std::make_shared<int>(0);
  std::shared_ptr<bool> failing = std::make_shared<bool>(true);
  std::shared_ptr<bool> throwing = std::make_shared<bool>(false);

  [[nodiscard]] engine_factory make() const {
    return [calls = calls, failing = failing,
            throwing = throwing](caf::actor_system& s,
                                 std::uint32_t slot) -> result<started_engine> {
      ++*calls;
      if (*failing && *throwing)
        throw std::system_error(
            std::make_error_code(std::errc::resource_unavailable_try_again),
            "no thread (test)");
      if (*failing)
        return make_error(errc::backend_error, "no device (test)");
      auto c = small_engine(64);
      c.slot = slot;
      return started_now(spawn_engine_actor(s, c));
    };
  }
};

TEST_F(actor_test, EachInitialEngineIsTriedInItsOwnSlot) {
  // Two initial engines, no restarts, a factory that fails for slot 0
  // only (its device, say): slot 0 is given up and slot 1 starts. (Before,
  // the given-up slot 0 was handed to the second initial engine: the
  // factory was asked for slot 0 twice and no engine ran.)
  auto slots = std::make_shared<std::vector<std::uint32_t>>();
  balancer_config bc;
  bc.initial_engines = 2;
  bc.max_restarts = 0;
  auto b = spawned(spawn_balancer(
      *sys_, bc,
      [slots](caf::actor_system& s,
              std::uint32_t slot) -> result<started_engine> {
        slots->push_back(slot);
        if (slot == 0)
          return make_error(errc::backend_error, "no device 0 (test)");
        auto c = small_engine(64);
        c.slot = slot;
        return started_now(spawn_engine_actor(s, c));
      }));
  stop_at_end_.push_back(b);
  sched_->run();
  EXPECT_EQ(*slots, (std::vector<std::uint32_t>{0, 1}));
  const auto bs = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(bs.live, 1U);
  EXPECT_EQ(bs.given_up, 1U);
}

/// An engine whose disk open the test holds: it answers ready_atom only
/// once it gets (ready_atom, true), and every request at once.
struct opening_engine_state {
  caf::response_promise ready;
  static inline const char* name = "test.opening_engine";
};

caf::behavior opening_engine(caf::stateful_actor<opening_engine_state>* self) {
  return {
      [=](ready_atom) -> caf::result<bool> {
        self->state.ready = self->make_response_promise();
        return self->state.ready;
      },
      [=](ready_atom, bool) { self->state.ready.deliver(true); },
      [=](listen_atom, const caf::actor&) {},
      [=](process_atom, const kv_request& r) {
        kv_reply rep;
        rep.id = r.id;
        return rep;
      },
  };
}

/// An engine factory whose first `ready` starts (counted in `calls`)
/// start an engine at once, and every later one an opening_engine, the
/// last kept in `opening`.
engine_factory opening_after(int ready, std::shared_ptr<int> calls,
                             std::shared_ptr<caf::actor> opening) {
  return [ready, calls, opening](caf::actor_system& s,
                                 std::uint32_t slot) -> result<started_engine> {
    if (++*calls <= ready) {
      auto c = small_engine(64);
      c.slot = slot;
      return started_now(spawn_engine_actor(s, c));
    }
    *opening = s.spawn(opening_engine);
    return started_engine{*opening, true};
  };
}

/// Ends an opening engine as an open that fails does: with a kvfleet error
/// as its exit reason.
void fail_open(const caf::actor& engine) {
  caf::anon_send(
      engine,
      caf::exit_msg{engine.address(),
                    to_caf_error(error{errc::io_error, "disk gone (test)"})});
}

TEST_F(actor_test, AnOpeningEnginesRestartWindowStartsWhenItIsReady) {
  // The restart of slot 0 opens its store (started_engine::opening) for
  // 2 s, longer than restart_window (1 s), and fails as soon as it is
  // ready: it took requests for no time at all, so with max_restarts 1 it
  // is given up (its time opening does not count as running).
  auto opening = std::make_shared<caf::actor>();
  balancer_config bc;
  bc.routing.policy = routing_policy::round_robin;
  bc.initial_engines = 2;
  bc.max_restarts = 1;
  bc.restart_window = std::chrono::seconds{1};
  auto starts = std::make_shared<int>(0);
  auto b = started_balancer(
      bc,
      [opening, starts](caf::actor_system& s,
                        std::uint32_t slot) -> result<started_engine> {
        if (slot != 0 || (*starts)++ == 0) {
          auto c = small_engine(64);
          c.slot = slot;
          return started_now(spawn_engine_actor(s, c));
        }
        *opening = s.spawn(opening_engine);
        return started_engine{*opening, true};
      });
  sched_->run();
  kill_engine_0(b, bc); // the restart, opening
  ASSERT_TRUE(*opening);
  sched_->advance_time(std::chrono::seconds{2});
  sched_->run();
  caf::anon_send(*opening, ready_atom::value, true);
  sched_->run();
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).up,
            (std::vector<std::uint8_t>{1, 1}));
  caf::anon_send_exit(*opening, caf::exit_reason::kill);
  sched_->run();
  pass_restart_delays(bc, 1);
  const auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}));
  EXPECT_EQ(st.restarts, 1U);
  EXPECT_EQ(st.given_up, 1U);
  EXPECT_EQ(*starts, 2);
}

/// An engine that answers every request at once, its reply saying it
/// holds one block's pinned bytes, and sends no block events.
caf::behavior pinned_replies_engine(caf::event_based_actor*) {
  return {
      [](listen_atom, const caf::actor&) {},
      [](process_atom, const kv_request& r) {
        kv_reply rep;
        rep.id = r.id;
        rep.pinned_bytes = block_bytes;
        return rep;
      },
  };
}

TEST_F(actor_test, OnlyAPinningRequestsReplyTellsTheBalancerOfPins) {
  // A reply's pinned bytes count at the balancer for a pinning request
  // only: a stale reply of another (overtaken by the block events of an
  // unpin) would bring back pins that are gone.
  balancer_config bc;
  bc.initial_engines = 1;
  auto b = started_balancer(
      bc, [](caf::actor_system& s, std::uint32_t) -> result<started_engine> {
        return started_now(s.spawn(pinned_replies_engine));
      });
  ask_now<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1));
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).pinned_bytes,
            (std::vector<std::uint64_t>{0}));
  auto pinned = make_request(2, 0, 0, 1, 2);
  pinned.pin = true;
  ask_now<kv_reply>(b, process_atom::value, pinned);
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).pinned_bytes,
            (std::vector<std::uint64_t>{block_bytes}));
}

TEST_F(actor_test, ADiskEngineThatHasNotToldItsPinsIsRetiredLast) {
  // Engine 1 has a disk tier and has not told the balancer what pins it
  // holds (it may have recovered pinned copies; its first block events
  // say): the retire takes engine 0, which has no disk tier and so starts
  // with none. (Before, engine 1, the highest slot, read as holding none
  // between its start and those events, and was retired.)
  balancer_config bc;
  bc.initial_engines = 2;
  auto b = started_balancer(
      bc,
      [](caf::actor_system& s, std::uint32_t slot) -> result<started_engine> {
        auto started = started_now(s.spawn(opening_engine));
        if (started)
          started->disk = slot == 1;
        return started;
      });
  ASSERT_EQ(ask_now<std::uint32_t>(b, retire_atom::value), 1U);
  sched_->run();
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).up,
            (std::vector<std::uint8_t>{0, 1}))
      << "the disk engine whose pins are unknown was retired";
}

TEST_F(actor_test, KvAwareRoutesAPromptToTheEngineItsReplyCameFrom) {
  // Two engines that answer requests but report no block events (as when
  // an engine on a thread of its own sends its events after the caller's
  // next request): the balancer learns from the first reply which engine
  // holds the prompt, and sends the same prompt there again. (Before, only
  // the events fed the index: the second request found both engines
  // holding nothing, a tie, and went to the other engine, a miss.)
  balancer_config bc;
  bc.routing.policy = routing_policy::kv_aware;
  bc.initial_engines = 2;
  auto b = started_balancer(
      bc, [](caf::actor_system& s, std::uint32_t) -> result<started_engine> {
        return started_now(s.spawn(opening_engine));
      });
  const auto req = make_request(1, 0, 0, 3, 1);
  const auto first = ask_now<kv_reply>(b, process_atom::value, req);
  for (std::uint64_t id = 2; id < 6; ++id) {
    auto again = req;
    again.id = id;
    EXPECT_EQ(ask_now<kv_reply>(b, process_atom::value, again).engine,
              first.engine)
        << id;
  }
  // Another prompt, both engines idle: the engine holding fewer blocks.
  EXPECT_NE(
      ask_now<kv_reply>(b, process_atom::value, make_request(9, 0, 0, 3, 9))
          .engine,
      first.engine);
}

/// An engine that, for each request, replies as if before it published
/// its block events (kv_reply::events_published 0), but sends them ahead
/// of its reply: the request's keys stored, then evicted (as an urgent
/// reply overtaken by normal messages has them arrive first).
struct overtaken_engine_state {
  caf::actor listener;
  std::uint64_t published = 0;
  static inline const char* name = "test.overtaken_engine";
};

caf::behavior
overtaken_engine(caf::stateful_actor<overtaken_engine_state>* self) {
  return {
      [=](listen_atom, const caf::actor& l) { self->state.listener = l; },
      [=](process_atom, const kv_request& r) {
        block_events stored;
        stored.stored = r.keys;
        stored.seq = ++self->state.published;
        self->send(self->state.listener, stored);
        block_events gone;
        gone.evicted = r.keys;
        gone.seq = ++self->state.published;
        self->send(self->state.listener, gone);
        kv_reply rep;
        rep.id = r.id;
        rep.computed_blocks = r.keys.size();
        return rep;
      },
  };
}

TEST_F(actor_test, AReplyOvertakenByItsEnginesEventsDoesNotUndoThem) {
  // The engine's events (the request's blocks stored, then evicted) reach
  // the balancer before its reply, which the engine made before it
  // published them: the reply does not put the evicted keys back in the
  // index. (Without events_published, it did: a stale entry that no event
  // would ever remove.)
  balancer_config bc;
  bc.routing.policy = routing_policy::kv_aware;
  bc.initial_engines = 1;
  auto b = started_balancer(
      bc, [](caf::actor_system& s, std::uint32_t) -> result<started_engine> {
        return started_now(s.spawn(overtaken_engine));
      });
  ask_now<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 3, 1));
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).index_keys, 0U);
}

TEST_F(actor_test, AReplyIndexesTheBlocksItsEngineCached) {
  // 5 blocks computed, the last 2 not cached (the engine caches none after
  // the first it cannot): the reply indexes the first 3.
  balancer_config bc;
  bc.routing.policy = routing_policy::kv_aware;
  bc.initial_engines = 1;
  auto b = started_balancer(
      bc, [](caf::actor_system& s, std::uint32_t) -> result<started_engine> {
        return started_now(s.spawn([]() -> caf::behavior {
          return {
              [](listen_atom, const caf::actor&) {},
              [](process_atom, const kv_request& r) {
                kv_reply rep;
                rep.id = r.id;
                rep.computed_blocks = r.keys.size();
                rep.uncached_blocks = 2;
                return rep;
              },
          };
        }));
      });
  ask_now<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 5, 1));
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).index_keys, 3U);
}

/// An engine with a disk tier that records the persist_atom it gets.
caf::behavior persisting_engine(caf::event_based_actor* self,
                                std::shared_ptr<std::vector<bool>> asked,
                                std::uint32_t slot) {
  return {
      [asked](persist_atom, std::uint64_t) -> std::uint64_t {
        asked->push_back(false);
        return 0;
      },
      [asked](persist_atom, std::uint64_t, bool retiring) -> std::uint64_t {
        asked->push_back(retiring);
        return 0;
      },
      // Tells a new listener it holds no pins, as an engine with a disk
      // tier does.
      [self, slot](listen_atom, const caf::actor& listener) {
        block_events none;
        none.engine = slot;
        self->send(listener, std::move(none));
      },
  };
}

TEST_F(actor_test, ARetiredDiskEngineIsToldItIsRetiringWhenAskedToPersist) {
  // The persist before a retired engine's exit says so, so the engine
  // refuses the puts and pins that come after it (they would be lost
  // with it). Before, it was a plain persist_atom.
  auto asked = std::make_shared<std::vector<bool>>();
  balancer_config bc;
  bc.initial_engines = 2;
  auto b =
      started_balancer(bc,
                       [asked](caf::actor_system& s,
                               std::uint32_t slot) -> result<started_engine> {
                         if (slot == 0) {
                           auto c = small_engine(64);
                           return started_now(spawn_engine_actor(s, c));
                         }
                         started_engine e;
                         e.actor = s.spawn(persisting_engine, asked, slot);
                         e.disk = true;
                         return e;
                       });
  EXPECT_EQ(ask_now<std::uint32_t>(b, retire_atom::value), 1U);
  sched_->run();
  EXPECT_EQ(*asked, (std::vector<bool>{true}));
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.live, 1U) << "the retired engine did not exit";
}

TEST_F(actor_test, AnEngineStillOpeningItsDiskTakesNoRequestsUntilReady) {
  // The replica in slot 2 opens its disk (started_engine::opening). Least
  // loaded would pick it first (nothing in flight there), and every
  // request would wait for the open: the balancer routes them to the live
  // engines until the replica answers ready_atom, retires a live engine
  // (slot 1), not the opening one, and answers the replica_atom then.
  // Shared: the balancer keeps the factory beyond this scope.
  auto opening = std::make_shared<caf::actor>();
  balancer_config bc;
  bc.routing.policy = routing_policy::least_loaded;
  bc.initial_engines = 2;
  auto b =
      started_balancer(bc,
                       [opening](caf::actor_system& s,
                                 std::uint32_t slot) -> result<started_engine> {
                         if (slot < 2) {
                           auto c = small_engine(64);
                           c.slot = slot;
                           return started_now(spawn_engine_actor(s, c));
                         }
                         *opening = s.spawn(opening_engine);
                         return started_engine{*opening, true};
                       });
  auto replica = ask_untimed<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_TRUE(*opening);
  stop_at_end_.push_back(*opening);
  EXPECT_FALSE(replica->done()) << "answered before the replica was ready";
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1, 0}));
  EXPECT_EQ(st.live, 2U);
  EXPECT_EQ(st.engines, 3U);
  // Not live yet: engine_atom (the node's block calls, persist) is
  // not_found, not an engine whose answers wait for its open.
  for (const bool retiring_too : {false, true}) {
    auto found =
        ask<caf::actor>(b, engine_atom::value, std::uint32_t{2}, retiring_too);
    sched_->run();
    ASSERT_TRUE(found->error.has_value()) << retiring_too;
    const auto e = from_caf_error(*found->error);
    EXPECT_EQ(e.code, errc::not_found);
    EXPECT_NE(e.message.find("still opening"), std::string::npos) << e.message;
  }
  EXPECT_EQ(ask_now<std::uint32_t>(b, retire_atom::value), 1U);
  std::vector<std::shared_ptr<outcome<kv_reply>>> replies;
  for (std::uint64_t i = 0; i < 4; ++i)
    replies.push_back(
        ask<kv_reply>(b, process_atom::value, make_request(i, 0, 0, 1, i)));
  sched_->run();
  for (const auto& r : replies) {
    ASSERT_TRUE(r->value.has_value());
    EXPECT_EQ(r->value->engine, 0U);
  }
  caf::anon_send(*opening, ready_atom::value, true);
  sched_->run();
  ASSERT_TRUE(replica->value.has_value()) << "the opening replica retired";
  EXPECT_EQ(*replica->value, 2U);
  EXPECT_EQ(ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{2}),
            *opening);
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 0, 1}));
  // Two requests at once: least loaded gives the replica one of them.
  std::set<std::uint32_t> engines;
  replies = {
      ask<kv_reply>(b, process_atom::value, make_request(8, 0, 0, 1, 8)),
      ask<kv_reply>(b, process_atom::value, make_request(9, 0, 0, 1, 9))};
  sched_->run();
  for (const auto& r : replies) {
    ASSERT_TRUE(r->value.has_value());
    engines.insert(r->value->engine);
  }
  EXPECT_EQ(engines, (std::set<std::uint32_t>{0, 2}));
}

/// An engine factory whose first `initial` engines start at once and
/// whose later ones (restarts, replicas) make their stores on their own
/// threads (store_open::on_engine) over a make_backend the test observes:
/// it counts its calls, and refuses every arena while `refuse`.
struct store_on_engine_factory {
  int initial = 1;
  std::shared_ptr<int> calls = std::make_shared<int>(0);
  std::shared_ptr<int> backends = std::make_shared<int>(0);
  std::shared_ptr<bool> refuse = std::make_shared<bool>(false);
  /// Slots whose arena the backend refuses (whatever `refuse` says).
  std::shared_ptr<std::set<std::uint32_t>> refused_slots =
      std::make_shared<std::set<std::uint32_t>>();
  /// The last engine started on its own thread.
  std::shared_ptr<caf::actor> opening = std::make_shared<caf::actor>();

  [[nodiscard]] engine_factory make() const {
    return [*this](caf::actor_system& s,
                   std::uint32_t slot) -> result<started_engine> {
      auto c = small_engine(64);
      c.slot = slot;
      if (++*calls <= initial)
        return started_now(spawn_engine_actor(s, c));
      // On the test scheduler, not a thread of its own, so the test
      // decides when it runs.
      c.own_thread = false;
      c.make_backend = [backends = backends, refuse = refuse,
                        refused_slots = refused_slots](std::uint32_t at,
                                                       std::size_t bytes)
          -> result<std::unique_ptr<engine::memory_backend>> {
        ++*backends;
        if (*refuse || refused_slots->count(at) > 0)
          return make_error(errc::out_of_memory, "arena of " +
                                                     std::to_string(bytes) +
                                                     " bytes refused (test)");
        auto host = engine::host_memory_backend::create(bytes);
        if (!host)
          return unexpected<error>{host.error()};
        return std::unique_ptr<engine::memory_backend>{std::move(*host)};
      };
      auto engine = spawn_engine_actor(s, c, store_open::on_engine);
      if (!engine)
        return unexpected<error>{engine.error()};
      *opening = *engine;
      return started_engine{std::move(*engine), true};
    };
  }

  /// Runs every job but the opening engine's (whichever it is by then).
  void run_all_but_opening(caf::scheduler::test_coordinator& sched) const {
    sched.run_jobs_filtered([opening = opening](caf::resumable* j) {
      return !*opening ||
             j != dynamic_cast<caf::resumable*>(
                      caf::actor_cast<caf::abstract_actor*>(*opening));
    });
  }
};

TEST_F(actor_test, AReplicaMakesItsArenaOnItsOwnThreadWhileTheBalancerRoutes) {
  // The replica's memory is made by the engine, not by the factory on the
  // balancer's thread (a host arena of GiBs is prefaulted for seconds):
  // while the engine has not run, its arena does not exist yet, and the
  // balancer answers requests on engine 0, and its stats.
  store_on_engine_factory f;
  balancer_config bc;
  bc.routing.policy = routing_policy::least_loaded;
  auto b = started_balancer(bc, f.make());
  auto replica = ask_untimed<std::uint32_t>(b, replica_atom::value);
  f.run_all_but_opening(*sched_);
  ASSERT_TRUE(*f.opening);
  EXPECT_EQ(*f.backends, 0) << "the arena was made on the balancer's thread";
  EXPECT_FALSE(replica->done()) << "answered before the replica was ready";
  auto served =
      ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1));
  auto st = ask<balancer_stats>(b, stats_atom::value);
  f.run_all_but_opening(*sched_);
  ASSERT_TRUE(served->value.has_value());
  EXPECT_EQ(served->value->engine, 0U);
  ASSERT_TRUE(st->value.has_value());
  EXPECT_EQ(st->value->up, (std::vector<std::uint8_t>{1, 0}));
  EXPECT_EQ(st->value->engines, 2U);
  sched_->run(); // the engine makes its arena, then answers ready_atom
  EXPECT_EQ(*f.backends, 1);
  ASSERT_TRUE(replica->value.has_value());
  EXPECT_EQ(*replica->value, 2U);
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).up,
            (std::vector<std::uint8_t>{1, 1}));
}

TEST_F(actor_test, AReplicaWhoseOpenFailsInAFailedSlotIsTriedInAnother) {
  // Replicas open their stores on their own (as a node's do). Slot 2's
  // arena is refused: the first replica fails there and frees it, marked.
  // The next takes that free slot, fails to open there too, and is tried
  // once more in a new slot, where it opens: its caller gets the replica.
  // (Before, the open's failure in the marked slot was the answer, and
  // every replica failed there.)
  store_on_engine_factory f;
  f.refused_slots->insert(2);
  balancer_config bc;
  bc.initial_engines = 2;
  f.initial = 2;
  auto b = started_balancer(bc, f.make());
  auto first = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_TRUE(first->error.has_value()) << "slot 2 opened";
  testing::internal::CaptureStderr();
  auto second = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  const auto log = testing::internal::GetCapturedStderr();
  ASSERT_TRUE(second->value.has_value())
      << to_string(second->error.value_or(caf::error{}));
  EXPECT_EQ(*second->value, 3U);
  const auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1, 0, 1}));
  EXPECT_EQ(st.live, 3U);
  EXPECT_NE(log.find("did not open in free slot 2"), std::string::npos) << log;
}

TEST_F(actor_test, AReplicaKilledWhileOpeningInAFailedSlotIsNotTriedAgain) {
  // The first replica's open fails in slot 2 with its own error, so slot
  // 2 is marked. The next replica takes it and is killed while it opens:
  // no failure of the slot's directory or device, so it is not tried in
  // another slot, and its caller hears that it was stopped.
  balancer_config bc;
  bc.initial_engines = 2;
  auto calls = std::make_shared<int>(0);
  auto opening = std::make_shared<caf::actor>();
  auto b = started_balancer(bc, opening_after(2, calls, opening));
  auto first = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  fail_open(*opening); // its open fails
  sched_->run();
  ASSERT_TRUE(first->error.has_value());
  EXPECT_EQ(from_caf_error(*first->error).code, errc::io_error);
  auto second = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_EQ(*calls, 4);
  ASSERT_FALSE(second->done());
  caf::anon_send_exit(*opening, caf::exit_reason::kill);
  sched_->run();
  ASSERT_TRUE(second->error.has_value());
  const auto e = from_caf_error(*second->error);
  EXPECT_EQ(e.code, errc::unavailable);
  EXPECT_NE(e.message.find("stopped while it was still opening"),
            std::string::npos)
      << e.message;
  EXPECT_EQ(*calls, 4) << "retried in another slot";
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.live, 2U);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1, 0}));
}

TEST_F(actor_test, AReplicaRetriedAfterAFailedOpenMayStartAtOnceOrFail) {
  // Slot 2's engines open on their own and fail there; slot 3's factory
  // starts its engine at once; slot 4's fails. The second replica, whose
  // open fails in the marked slot 2, is tried in slot 3 and answered with
  // the live count at once; the third, failing in slot 2 again, is tried
  // in slot 4 and answered with slot 4's error.
  balancer_config bc;
  bc.initial_engines = 2;
  auto calls = std::make_shared<int>(0);
  auto opening = std::make_shared<caf::actor>();
  auto b = started_balancer(
      bc,
      [calls, opening](caf::actor_system& s,
                       std::uint32_t slot) -> result<started_engine> {
        ++*calls;
        if (slot == 4)
          return make_error(errc::io_error, "no device 4 (test)");
        if (slot == 2) {
          *opening = s.spawn(opening_engine);
          return started_engine{*opening, true};
        }
        auto c = small_engine(64);
        c.slot = slot;
        return started_now(spawn_engine_actor(s, c));
      });
  const auto open_fails = [&] {
    fail_open(*opening);
    sched_->run();
  };
  auto first = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  open_fails();
  ASSERT_TRUE(first->error.has_value());
  auto second = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_FALSE(second->done());
  open_fails();
  ASSERT_TRUE(second->value.has_value())
      << to_string(second->error.value_or(caf::error{}));
  EXPECT_EQ(*second->value, 3U);
  auto third = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_FALSE(third->done());
  open_fails();
  ASSERT_TRUE(third->error.has_value());
  const auto e = from_caf_error(*third->error);
  EXPECT_EQ(e.code, errc::io_error);
  EXPECT_NE(e.message.find("no device 4 (test)"), std::string::npos)
      << e.message;
  EXPECT_EQ(*calls, 2 + 1 + 2 + 2);
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.live, 3U);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1, 0, 1, 0}));
}

TEST_F(actor_test, AnArenaTheBackendRefusesFailsTheStartWithItsError) {
  // Made on the engine, an arena the backend refuses ends the engine with
  // the backend's error: a replica asked for gets it (and its slot is
  // free again); a restart goes the restart / give-up way, logged with it.
  store_on_engine_factory f;
  *f.refuse = true;
  balancer_config bc;
  bc.initial_engines = 2;
  bc.max_restarts = 1;
  f.initial = 2;
  auto b = started_balancer(bc, f.make());
  auto replica = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  EXPECT_EQ(*f.backends, 1);
  ASSERT_TRUE(replica->error.has_value());
  auto e = from_caf_error(*replica->error);
  EXPECT_EQ(e.code, errc::out_of_memory);
  EXPECT_NE(e.message.find("the new replica did not start: arena of"),
            std::string::npos)
      << e.message;
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1, 0}));
  EXPECT_EQ(st.engines, 2U) << "the replica's slot is free";
  testing::internal::CaptureStderr();
  caf::anon_send_exit(
      ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0}),
      caf::exit_reason::kill);
  sched_->run();
  pass_restart_delays(bc, 3);
  const auto log = testing::internal::GetCapturedStderr();
  EXPECT_EQ(*f.backends, 2); // the replica's and the one restart's
  st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.restarts, 1U);
  EXPECT_EQ(st.given_up, 1U);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1, 0}));
  EXPECT_NE(log.find("engine slot 0 given up"), std::string::npos) << log;
  EXPECT_NE(log.find("its restart failed: out_of_memory"), std::string::npos)
      << log;
  EXPECT_NE(log.find("refused (test)"), std::string::npos) << log;
}

TEST_F(actor_test, AnOpeningEngineKilledFromOutsideIsReportedAsStopped) {
  // An engine killed while it opens did not fail its open: the replica
  // asked for hears it was stopped, with the exit reason, and a restart
  // given up says so in its log line, not "its restart failed".
  balancer_config bc;
  bc.initial_engines = 2;
  bc.max_restarts = 1;
  auto calls = std::make_shared<int>(0);
  auto opening = std::make_shared<caf::actor>();
  auto b = started_balancer(bc, opening_after(2, calls, opening));
  auto replica = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_TRUE(*opening);
  EXPECT_FALSE(replica->done());
  caf::anon_send_exit(*opening, caf::exit_reason::kill);
  sched_->run();
  ASSERT_TRUE(replica->error.has_value());
  const auto e = from_caf_error(*replica->error);
  EXPECT_EQ(e.code, errc::unavailable);
  EXPECT_NE(e.message.find("the new replica stopped while it was still "
                           "opening its store (exit reason: "),
            std::string::npos)
      << e.message;
  EXPECT_NE(e.message.find("kill"), std::string::npos) << e.message;
  testing::internal::CaptureStderr();
  caf::anon_send_exit(
      ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0}),
      caf::exit_reason::kill);
  sched_->run();
  pass_restart_delays(bc, 1); // the restart, opening
  caf::anon_send_exit(*opening, caf::exit_reason::kill);
  sched_->run();
  const auto log = testing::internal::GetCapturedStderr();
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.restarts, 1U);
  EXPECT_EQ(st.given_up, 1U);
  // The restart is logged with its reason when it is scheduled, the
  // give-up when it fails.
  EXPECT_NE(log.find("engine slot 0: its engine stopped: "), std::string::npos)
      << log;
  EXPECT_NE(log.find("; restart 1 of 1 in 100 ms (requests go to the other "
                     "engines meanwhile)"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("engine slot 0 given up after 1 restart(s) (max_restarts "
                     "1): its engine stopped while it was still opening its "
                     "store (exit reason: "),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("kill"), std::string::npos) << log;
  EXPECT_EQ(log.find("failed"), std::string::npos) << log;
}

TEST_F(actor_test, AFactoryThatAlwaysFailsIsGivenUpAfterMaxRestarts) {
  // The first start and every retry fail. Each retry counts as a restart:
  // after max_restarts + 1 calls the slot is given up, and no more calls
  // come however long the balancer runs.
  flaky_factory f;
  balancer_config bc;
  bc.initial_engines = 1;
  bc.max_restarts = 2;
  auto b = started_balancer(bc, f.make());
  EXPECT_EQ(*f.calls, 1);
  for (int i = 0; i < 10; ++i) {
    sched_->advance_time(bc.restart_delay);
    sched_->run();
    EXPECT_EQ(*f.calls, std::min(i + 2, 3)) << "after " << i + 1 << " delays";
  }
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.restarts, 2U);
  EXPECT_EQ(st.given_up, 1U);
  EXPECT_EQ(st.live, 0U);
  // The freed slot is the next replica's, and it starts once the factory
  // works again.
  *f.failing = false;
  EXPECT_EQ(ask_now<std::uint32_t>(b, replica_atom::value), 1U);
  EXPECT_EQ(*f.calls, 4);
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).up,
            (std::vector<std::uint8_t>{1}));
}

TEST_F(actor_test, AReplicaThatDoesNotStartIsAnErrorAndLeavesNoRetry) {
  // One engine runs; the factory then fails. A replica asked for now gets
  // the factory's error, its slot is free again, and no engine appears
  // later behind the caller's back (the scaler undoes its count on the
  // error). Once the factory works, the next replica takes that slot.
  flaky_factory f;
  *f.failing = false;
  balancer_config bc;
  bc.initial_engines = 1;
  bc.max_restarts = 3;
  auto b = started_balancer(bc, f.make());
  *f.failing = true;
  auto failed = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_TRUE(failed->error.has_value());
  const auto e = from_caf_error(*failed->error);
  EXPECT_EQ(e.code, errc::backend_error);
  EXPECT_NE(e.message.find("did not start"), std::string::npos) << e.message;
  pass_restart_delays(bc, 5);
  EXPECT_EQ(*f.calls, 2); // the first engine and the one failed replica
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.live, 1U);
  EXPECT_EQ(st.given_up, 0U);
  *f.failing = false;
  EXPECT_EQ(ask_now<std::uint32_t>(b, replica_atom::value), 2U);
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).up,
            (std::vector<std::uint8_t>{1, 1}));
}

TEST_F(actor_test, FailedRestartsCountAgainstMaxRestarts) {
  // Engine 0 starts, then is killed while the factory fails: the restart
  // attempts that fail use up its max_restarts (1), then it is given up.
  flaky_factory f;
  *f.failing = false;
  balancer_config bc;
  bc.initial_engines = 2;
  bc.max_restarts = 1;
  auto b = started_balancer(bc, f.make());
  EXPECT_EQ(*f.calls, 2);
  *f.failing = true;
  caf::anon_send_exit(
      ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0}),
      caf::exit_reason::kill);
  sched_->run();
  pass_restart_delays(bc, 10);
  EXPECT_EQ(*f.calls, 3); // the two starts and one failed restart
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.restarts, 1U);
  EXPECT_EQ(st.given_up, 1U);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}));
}

TEST_F(actor_test, AFactoryThatThrowsIsAFailedStartNotTheFleetsEnd) {
  // A host's factory that throws (a thread it could not start). Thrown
  // from a restart, that ended the balancer, which stopped the healthy
  // engine too: every later request got "receiving actor is down". It is
  // a failed restart now, counted against max_restarts, and engine 1 goes
  // on serving.
  flaky_factory f;
  *f.failing = false;
  *f.throwing = true;
  balancer_config bc;
  bc.initial_engines = 2;
  bc.max_restarts = 1;
  auto b = started_balancer(bc, f.make());
  ASSERT_EQ(*f.calls, 2);
  *f.failing = true;
  caf::anon_send_exit(
      ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0}),
      caf::exit_reason::kill);
  sched_->run();
  pass_restart_delays(bc, 10);
  EXPECT_EQ(*f.calls, 3); // the two starts and the restart that threw
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.restarts, 1U);
  EXPECT_EQ(st.given_up, 1U);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}));
  auto r = ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 2, 1));
  sched_->run();
  ASSERT_TRUE(r->value.has_value()) << caf::to_string(*r->error);
  EXPECT_EQ(r->value->engine, 1U);
  // A replica whose start throws is refused with the factory's words.
  auto replica = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_TRUE(replica->error.has_value());
  const auto e = from_caf_error(*replica->error);
  EXPECT_EQ(e.code, errc::backend_error);
  EXPECT_NE(e.message.find("no thread (test)"), std::string::npos) << e.message;
}

/// An engine factory that records the slots it is asked for and fails for
/// the slots in `broken`, for every slot during an `outage`, and returns a
/// null actor while `null_actor`.
struct broken_slot_factory {
  std::shared_ptr<std::set<std::uint32_t>> broken =
      std::make_shared<std::set<std::uint32_t>>();
  std::shared_ptr<bool> outage = std::make_shared<bool>(false);
  std::shared_ptr<bool> null_actor = std::make_shared<bool>(false);
  std::shared_ptr<std::vector<std::uint32_t>> tried =
      std::make_shared<std::vector<std::uint32_t>>();

  [[nodiscard]] engine_factory make() const {
    return [f = *this](caf::actor_system& s,
                       std::uint32_t slot) -> result<started_engine> {
      f.tried->push_back(slot);
      if (*f.null_actor)
        return started_engine{caf::actor{}};
      if (*f.outage)
        return make_error(errc::io_error, "no device (outage)");
      if (f.broken->count(slot) > 0)
        return make_error(errc::io_error, "slot " + std::to_string(slot) +
                                              "'s directory is damaged");
      auto c = small_engine(64);
      c.slot = slot;
      return started_now(spawn_engine_actor(s, c));
    };
  }
};

caf::actor
actor_test::balancer_with_broken_slots(const broken_slot_factory& f,
                                       std::uint32_t initial,
                                       const std::set<std::uint32_t>& broken) {
  balancer_config bc;
  bc.initial_engines = initial;
  bc.max_restarts = 0;
  auto b = started_balancer(bc, f.make());
  *f.broken = broken;
  for (const std::uint32_t slot : broken)
    caf::anon_send_exit(ask_now<caf::actor>(b, engine_atom::value, slot),
                        caf::exit_reason::kill);
  sched_->run();
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).given_up,
            broken.size());
  f.tried->clear();
  return b;
}

TEST_F(actor_test, AReplicaThatFailsInABrokenFreeSlotStartsInAnother) {
  // Slot 0 breaks (its directory, say): its engine dies and every start
  // for slot 0 fails, so it is given up. A replica asked for then is tried
  // in the free slot 0, fails, and is started in a new slot instead; so is
  // the next. (Before, each replica took the lowest free slot, slot 0, and
  // failed there: the fleet could not grow back.) A factory that returns a
  // null actor is a failed start too (before, monitoring it crashed the
  // process).
  broken_slot_factory f;
  const auto& broken = f.broken;
  const auto& null_actor = f.null_actor;
  const auto& tried = f.tried;
  balancer_config bc;
  bc.initial_engines = 2;
  bc.max_restarts = 2;
  auto b = started_balancer(bc, f.make());
  broken->insert(0);
  caf::anon_send_exit(
      ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0}),
      caf::exit_reason::kill);
  sched_->run();
  pass_restart_delays(bc, 5);
  ASSERT_EQ(ask_now<balancer_stats>(b, stats_atom::value).given_up, 1U);
  tried->clear();
  for (const std::uint32_t want : {2U, 3U}) {
    auto replica = ask<std::uint32_t>(b, replica_atom::value);
    sched_->run();
    ASSERT_TRUE(replica->value.has_value()) << caf::to_string(*replica->error);
    EXPECT_EQ(*replica->value, want);
  }
  EXPECT_EQ(*tried, (std::vector<std::uint32_t>{0, 2, 0, 3}));
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).live, 3U);
  // A free slot whose start did not fail goes first: once slot 3 is
  // retired, the next replica starts there, not in slot 0.
  ASSERT_EQ(ask_now<std::uint32_t>(b, retire_atom::value), 2U);
  sched_->run();
  tried->clear();
  auto again = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_TRUE(again->value.has_value()) << caf::to_string(*again->error);
  EXPECT_EQ(*tried, (std::vector<std::uint32_t>{3}));
  *null_actor = true;
  auto none = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_TRUE(none->error.has_value());
  EXPECT_NE(from_caf_error(*none->error).message.find("no actor"),
            std::string::npos)
      << from_caf_error(*none->error).message;
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).live, 3U);
}

TEST_F(actor_test, FailedReplicasInARowAddFewSlotsAndTakeTurnsInThem) {
  // Slot 0 is broken for good; an outage then fails every start while
  // five replicas are asked for. Each fails in the free slot tried longest
  // ago, then in another, never twice for one replica; a new slot takes
  // its turn with the failed free slots once per round through them (3,
  // then 4, then 5): three slots more, not one per failure. Once the
  // outage ends, the next replica starts in the free slot tried longest
  // ago, 3.
  broken_slot_factory f;
  const auto& broken = f.broken;
  const auto& outage = f.outage;
  const auto& tried = f.tried;
  balancer_config bc;
  bc.initial_engines = 3;
  bc.max_restarts = 0;
  auto b = started_balancer(bc, f.make());
  broken->insert(0);
  caf::anon_send_exit(
      ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0}),
      caf::exit_reason::kill);
  sched_->run();
  *outage = true;
  tried->clear();
  for (int i = 0; i < 5; ++i) {
    auto failed = ask<std::uint32_t>(b, replica_atom::value);
    sched_->run();
    ASSERT_TRUE(failed->error.has_value()) << i;
  }
  EXPECT_EQ(*tried, (std::vector<std::uint32_t>{0, 3, 0, 3, 0, 4, 3, 0, 4, 5}));
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up.size(), 6U);
  EXPECT_EQ(st.live, 2U);
  *outage = false;
  tried->clear();
  auto replica = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_TRUE(replica->value.has_value()) << caf::to_string(*replica->error);
  EXPECT_EQ(*tried, (std::vector<std::uint32_t>{3}));
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).live, 3U);
}

TEST_F(actor_test, AReplicaGetsPastTwoBrokenFreeSlots) {
  // Slots 0 and 1 break for good and are given up. A replica fails in
  // slot 0 and starts in a new slot, 4; the next fails in slot 1 (its turn:
  // tried longer ago than slot 0) and starts in slot 5. (Before, each
  // replica failed in slot 0 and then in slot 1, and none ever started.)
  broken_slot_factory f;
  const auto& tried = f.tried;
  auto b = balancer_with_broken_slots(f, 4, {0, 1});
  for (const std::uint32_t live : {3U, 4U}) {
    auto replica = ask<std::uint32_t>(b, replica_atom::value);
    sched_->run();
    ASSERT_TRUE(replica->value.has_value()) << caf::to_string(*replica->error);
    EXPECT_EQ(*replica->value, live);
  }
  EXPECT_EQ(*tried, (std::vector<std::uint32_t>{0, 4, 1, 5}));
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).live, 4U);
}

TEST_F(actor_test, AReplicaGetsPastMoreBrokenFreeSlotsThanLiveEngines) {
  // Slots 1, 2 and 3 break for good and are given up; one engine is live.
  // Each replica fails in one broken slot and starts in a new slot. (The
  // first fix bounded new slots by the failed free slots, given-up ones
  // included: with more broken slots than live engines every replica
  // failed twice, forever.)
  broken_slot_factory f;
  const auto& tried = f.tried;
  auto b = balancer_with_broken_slots(f, 4, {1, 2, 3});
  ASSERT_EQ(ask_now<balancer_stats>(b, stats_atom::value).live, 1U);
  for (const std::uint32_t live : {2U, 3U, 4U}) {
    auto replica = ask<std::uint32_t>(b, replica_atom::value);
    sched_->run();
    ASSERT_TRUE(replica->value.has_value()) << caf::to_string(*replica->error);
    EXPECT_EQ(*replica->value, live);
  }
  EXPECT_EQ(*tried, (std::vector<std::uint32_t>{1, 4, 2, 5, 3, 6}));
}

TEST_F(actor_test, ReplicasRetriedWhileANewSlotOpensAddNoOtherSlot) {
  // Slot 0 is given up and broken; new slots open their stores on their
  // own. The first replica fails in slot 0 and is tried in new slot 3,
  // which opens. A second replica asked for meanwhile fails in slot 0 and
  // is answered with that error: slot 3 is the new slot's turn, and no
  // slot 4 is added. (Before, each replica asked for while one opened
  // added a slot.) Slot 3 opens, and the first replica is answered.
  balancer_config bc;
  bc.initial_engines = 3;
  bc.max_restarts = 0;
  auto broken = std::make_shared<bool>(false);
  auto tried = std::make_shared<std::vector<std::uint32_t>>();
  auto opening = std::make_shared<caf::actor>();
  auto b = started_balancer(
      bc,
      [broken, tried, opening](caf::actor_system& s,
                               std::uint32_t slot) -> result<started_engine> {
        tried->push_back(slot);
        if (slot == 0 && *broken)
          return make_error(errc::io_error, "slot 0's directory is damaged");
        if (slot < 3) {
          auto c = small_engine(64);
          c.slot = slot;
          return started_now(spawn_engine_actor(s, c));
        }
        *opening = s.spawn(opening_engine);
        return started_engine{*opening, true};
      });
  *broken = true;
  caf::anon_send_exit(
      ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0}),
      caf::exit_reason::kill);
  sched_->run();
  tried->clear();
  auto first = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_FALSE(first->done());
  auto second = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_TRUE(second->error.has_value());
  EXPECT_NE(from_caf_error(*second->error).message.find("damaged"),
            std::string::npos)
      << from_caf_error(*second->error).message;
  EXPECT_EQ(*tried, (std::vector<std::uint32_t>{0, 3, 0}));
  caf::anon_send(*opening, ready_atom::value, true);
  sched_->run();
  ASSERT_TRUE(first->value.has_value())
      << to_string(first->error.value_or(caf::error{}));
  EXPECT_EQ(*first->value, 3U);
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).up.size(), 4U);
}

TEST_F(actor_test, AnInitialStartThatThrowsLeavesTheOtherEnginesServing) {
  // Slot 1's first start throws: slot 0's engine, started before it, goes
  // on serving (before, the balancer ended before it owned any engine,
  // and engine 0 was left running with nobody to stop it).
  auto calls = std::make_shared<int>(0);
  balancer_config bc;
  bc.initial_engines = 2;
  bc.max_restarts = 0;
  auto b =
      started_balancer(bc,
                       [calls](caf::actor_system& s,
                               std::uint32_t slot) -> result<started_engine> {
                         ++*calls;
                         if (slot == 1)
                           throw std::runtime_error("no device 1 (test)");
                         auto c = small_engine(64);
                         c.slot = slot;
                         return started_now(spawn_engine_actor(s, c));
                       });
  EXPECT_EQ(*calls, 2);
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.live, 1U);
  EXPECT_EQ(st.given_up, 1U);
  auto r = ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 2, 1));
  sched_->run();
  ASSERT_TRUE(r->value.has_value()) << caf::to_string(*r->error);
  EXPECT_EQ(r->value->engine, 0U);
}

TEST_F(actor_test, AFullFleetRefusesAReplicaWithAnError) {
  auto b = balancer(routing_policy::round_robin, {small_engine(16)});
  sched_->run();
  for (std::uint32_t n = 2; n <= router::max_slots; ++n)
    ASSERT_EQ(ask_now<std::uint32_t>(b, replica_atom::value), n);
  auto full = ask<std::uint32_t>(b, replica_atom::value);
  sched_->run();
  ASSERT_TRUE(full->error.has_value())
      << "replica_atom reported " << full->value.value_or(0);
  EXPECT_EQ(from_caf_error(*full->error).code, errc::unavailable);
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).up.size(),
            router::max_slots);
}

TEST_F(actor_test, RequestsBatchedInAKilledEngineAreReroutedAtOnce) {
  // Engine 0 holds its requests for 10 s; engine 1 answers at once. A
  // request waiting in engine 0's batch when it dies goes to engine 1 right
  // away: it does not wait out the balancer's 5 s timeout.
  auto b = balancer(routing_policy::round_robin,
                    {small_engine(64, 20, 10s), small_engine(64)});
  sched_->run();
  auto r = ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 2, 1));
  sched_->run();
  ASSERT_FALSE(r->done());
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).in_flight.at(0), 1U);
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  caf::anon_send_exit(e0, caf::exit_reason::kill);
  sched_->run();
  ASSERT_TRUE(r->value.has_value());
  EXPECT_EQ(r->value->engine, 1U);
  EXPECT_EQ(r->value->computed_blocks, 2U);
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.rerouted, 1U);
  EXPECT_EQ(st.timeouts, 0U);
  EXPECT_EQ(st.in_flight.at(0), 0U);
  EXPECT_EQ(st.in_flight.at(1), 0U);
}

TEST_F(actor_test, ACallerWithoutATimerHearsBackWhenTheBalancerStops) {
  // The caller sets no timeout of its own: the balancer answers every
  // request, with request_receiver_down for those it holds when it stops.
  auto b = balancer(routing_policy::round_robin, {small_engine(64, 20, 10s)});
  sched_->run();
  auto out = std::make_shared<outcome<kv_reply>>();
  sys_->spawn([=](caf::event_based_actor* self) {
    self->request(b, caf::infinite, process_atom::value,
                  make_request(1, 0, 0, 2, 1))
        .then([=](kv_reply& v) { out->value = std::move(v); },
              [=](caf::error& e) { out->error = e; });
  });
  sched_->run();
  ASSERT_FALSE(out->done());
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).in_flight.at(0), 1U);
  caf::anon_send_exit(b, caf::exit_reason::kill);
  sched_->run();
  ASSERT_TRUE(out->error.has_value());
  EXPECT_EQ(*out->error, caf::sec::request_receiver_down);
}

/// A memory backend with a bug: its write() throws, which no backend may.
/// It hides its host address, so the store writes every value through
/// write(). (A producer that throws no longer ends the actor: the store
/// turns that into an error value.)
class throwing_backend final : public engine::testing::host_wrapper {
public:
  using host_wrapper::host_wrapper;
  [[nodiscard]] std::string_view name() const noexcept override {
    return "throwing";
  }
  [[nodiscard]] std::byte* host_data() noexcept override { return nullptr; }
  [[nodiscard]] result<void> write(std::size_t,
                                   std::span<const std::byte>) override {
    throw std::runtime_error("backend bug");
  }
};

/// `c` with a memory backend whose writes throw, on the test scheduler
/// (an arena without a host address would otherwise get a thread of its
/// own, as device memory does).
engine_actor_config with_throwing_backend(engine_actor_config c) {
  c.own_thread = false;
  c.make_backend =
      [](std::uint32_t,
         std::size_t bytes) -> result<std::unique_ptr<engine::memory_backend>> {
    return std::unique_ptr<engine::memory_backend>(
        std::make_unique<throwing_backend>(bytes));
  };
  return c;
}

/// A producer with a bug: it throws for one key, which no producer may.
class throwing_producer final : public engine::kv_producer {
public:
  explicit throwing_producer(block_key bad) : bad_(bad) {}
  result<void> produce(const engine::namespace_spec& spec, const block_key& key,
                       std::span<std::byte> out) override {
    if (key == bad_)
      throw std::runtime_error("producer bug");
    return inner_.produce(spec, key, out);
  }
  engine::nanos cost(std::size_t) const noexcept override { return {}; }

private:
  block_key bad_;
  engine::synthetic_producer inner_;
};

/// A producer whose every block fails with errc::timeout (an upstream
/// prefill that timed out, say).
class timing_out_producer final : public engine::kv_producer {
public:
  result<void> produce(const engine::namespace_spec&, const block_key&,
                       std::span<std::byte>) override {
    return make_error(errc::timeout, "upstream prefill timed out");
  }
  engine::nanos cost(std::size_t) const noexcept override { return {}; }
};

TEST_F(actor_test, AProducersOwnTimeoutIsTheEnginesErrorNotAnExpiredRequest) {
  // The producer answers errc::timeout long before the balancer's deadline:
  // the caller gets that error, with its message, and the balancer counts
  // no timeout of its own. (Before, any errc::timeout from the engine was
  // taken for its deadline passing: counted, told to the scaler, and
  // replaced by request_timeout.)
  auto c = small_engine(64);
  c.make_producer = [] { return std::make_unique<timing_out_producer>(); };
  auto b = balancer(routing_policy::round_robin, {c}, 70s);
  sched_->run();
  auto r = ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 2, 1));
  sched_->run();
  ASSERT_TRUE(r->error.has_value());
  const auto e = from_caf_error(*r->error);
  EXPECT_EQ(e.code, errc::timeout);
  EXPECT_NE(e.message.find("upstream prefill timed out"), std::string::npos)
      << e.message;
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).timeouts, 0U);
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  EXPECT_EQ(ask_now<engine_stats>(e0, stats_atom::value).expired, 0U);
}

/// Moves the test's clock on by `step` for each block it computes: a
/// request whose computing spans its deadline.
class clock_moving_producer final : public engine::kv_producer {
public:
  clock_moving_producer(caf::scheduler::test_coordinator& sched,
                        caf::timespan step)
      : sched_(sched), step_(step) {}
  result<void> produce(const engine::namespace_spec& spec, const block_key& key,
                       std::span<std::byte> out) override {
    sched_.advance_time(step_);
    return inner_.produce(spec, key, out);
  }
  engine::nanos cost(std::size_t) const noexcept override { return {}; }

private:
  caf::scheduler::test_coordinator& sched_;
  caf::timespan step_;
  engine::synthetic_producer inner_;
};

TEST_F(actor_test, APinningRequestFinishedAfterItsDeadlineTakesItsPinsBack) {
  // The engine computes a pinning request from 0 s to 71 s; the balancer
  // told its caller errc::timeout at 70 s. Before, its blocks stayed
  // pinned for good: the caller, told it failed, has no pin to take back.
  // Now the engine takes back the pins that request added (not one a
  // block had before it) and answers errc::timeout; the blocks stay cached.
  auto c = small_engine(64);
  auto* sched = sched_;
  c.make_producer = [sched] {
    return std::make_unique<clock_moving_producer>(*sched, 71s);
  };
  auto b = balancer(routing_policy::round_robin, {c}, 70s);
  sched_->run();
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  // Its first block is cached and pinned before, by another caller.
  auto first = make_request(1, 0, 1, 1, 1);
  first.pin = true;
  ASSERT_TRUE(ask_now<kv_reply>(e0, process_atom::value, first).id == 1);
  auto late = make_request(2, 0, 1, 2, 2);
  late.pin = true;
  auto r = ask<kv_reply>(b, process_atom::value, late);
  sched_->run();
  ASSERT_TRUE(r->error.has_value());
  EXPECT_TRUE(is_timeout(*r->error)) << to_string(*r->error);
  EXPECT_EQ(ask_now<engine_stats>(e0, stats_atom::value).expired, 1U);
  EXPECT_EQ(ask_now<std::uint64_t>(e0, lookup_atom::value, late.keys), 2U);
  auto unpin = [&](const block_key& k) {
    auto u = ask<bool>(e0, unpin_atom::value, k);
    sched_->run();
    return u->error ? from_caf_error(*u->error).code : errc::ok;
  };
  EXPECT_EQ(unpin(late.keys[1]), errc::invalid_argument) << "still pinned";
  EXPECT_EQ(unpin(late.keys[0]), errc::ok) << "the earlier caller's pin stays";
  EXPECT_EQ(unpin(late.keys[0]), errc::invalid_argument);
  // In time (a request without a deadline), its pins stay.
  auto direct = make_request(3, 0, 0, 1, 3);
  direct.pin = true;
  ASSERT_EQ(ask_now<kv_reply>(e0, process_atom::value, direct).id, 3U);
  EXPECT_EQ(unpin(direct.keys[0]), errc::ok);
}

TEST_F(actor_test, EngineStatsSayWhatPinsHoldBesidesThePinnedBlocks) {
  // Pinning a 3-block request's last block holds its whole chain: stats
  // show 1 block pinned and 3 held, the figure the limit (4 of 8) counts.
  auto e = engine(small_engine(8));
  sched_->run();
  const auto r = make_request(1, 0, 0, 3, 1);
  ASSERT_EQ(ask_now<kv_reply>(e, process_atom::value, r).id, 1U);
  ASSERT_TRUE(ask_now<bool>(e, pin_atom::value, r.keys.back()));
  auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.pinned_bytes, block_bytes);
  EXPECT_EQ(st.pin_held_bytes, 3 * block_bytes);
  EXPECT_EQ(st.pinned_bytes_limit, 4 * block_bytes);
}

TEST_F(actor_test, AFailedBatchTakesBackThePinsOfItsEarlierRequests) {
  // A batch fails whole when one request fails (here the second, refused
  // by the pinned limit: 3 + 3 blocks of an 8-block engine's 4). Its
  // caller, told only of that, holds none of the first request's pins:
  // before, they stayed for good.
  auto e = engine(small_engine(8));
  sched_->run();
  auto first = make_request(1, 0, 0, 3, 1);
  auto second = make_request(2, 0, 0, 3, 2);
  first.pin = second.pin = true;
  auto r = ask<std::vector<kv_reply>>(e, batch_atom::value,
                                      std::vector<kv_request>{first, second});
  sched_->run();
  ASSERT_TRUE(r->error.has_value());
  EXPECT_EQ(from_caf_error(*r->error).code, errc::out_of_memory)
      << to_string(*r->error);
  auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.pinned_bytes, 0U);
  EXPECT_EQ(st.pinned_bytes_limit, 4 * block_bytes);
  EXPECT_EQ(ask_now<std::uint64_t>(e, lookup_atom::value, first.keys), 3U)
      << "cached all the same";
}

TEST_F(actor_test, AProducerFactoryThatGivesNoneFailsTheStart) {
  // A host's make_producer that returns null (its model did not load):
  // the engine does not start. Before, it fell back to the synthetic
  // producer and served made-up KV as the model's.
  auto c = small_engine(64);
  c.make_producer = [] { return std::unique_ptr<engine::kv_producer>{}; };
  auto e = spawn_engine_actor(*sys_, c);
  ASSERT_FALSE(e.has_value()) << "started with no producer";
  EXPECT_EQ(e.error().code, errc::invalid_argument);
  EXPECT_NE(e.error().message.find("make_producer gave no producer"),
            std::string::npos)
      << e.error().describe();
  // Made on the engine, the open's error is the engine's exit reason.
  c.own_thread = false; // on the test scheduler
  auto opening = spawn_engine_actor(*sys_, c, store_open::on_engine);
  ASSERT_TRUE(opening.has_value()) << opening.error().describe();
  auto ready = ask<bool>(*opening, ready_atom::value);
  sched_->run();
  ASSERT_TRUE(ready->error.has_value()) << "the engine answered ready";
}

TEST_F(actor_test, AProducerThatThrowsFailsItsRequestNotTheEngine) {
  // The producer throws for one request's block: that request gets an
  // error reply and the engine keeps serving. Before, the exception ended
  // the engine actor, the balancer sent the request on, and it ended the
  // next engine too: one poison request took down two engines and
  // everything they held.
  auto poison = make_request(1, 0, 0, 2, 1);
  auto bad = small_engine(64);
  bad.make_producer = [key = poison.keys[1]] {
    return std::make_unique<throwing_producer>(key);
  };
  auto b = balancer(routing_policy::round_robin, {bad, bad});
  sched_->run();
  auto r = ask<kv_reply>(b, process_atom::value, poison);
  sched_->run();
  ASSERT_TRUE(r->error.has_value());
  const auto e = from_caf_error(*r->error);
  EXPECT_EQ(e.code, errc::backend_error);
  EXPECT_NE(e.message.find("the producer threw for block"), std::string::npos)
      << e.message;
  EXPECT_NE(e.message.find("producer bug"), std::string::npos) << e.message;
  for (std::uint64_t id = 2; id < 6; ++id) {
    auto ok =
        ask<kv_reply>(b, process_atom::value, make_request(id, 0, 0, 2, id));
    sched_->run();
    ASSERT_TRUE(ok->value.has_value())
        << to_string(ok->error.value_or(caf::error{}));
  }
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.rerouted, 0U);
  EXPECT_EQ(st.restarts, 0U);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1}));
}

TEST_F(actor_test, ABatchCutShortByAnExceptionIsReroutedNotLost) {
  // Engine 0's memory backend throws in the middle of a batch of two,
  // which ends the actor; both requests of that batch go to engine 1 at
  // once.
  auto bad = with_throwing_backend(small_engine(64, 2, 10s));
  auto b = balancer(routing_policy::round_robin, {bad, small_engine(64)});
  sched_->run();
  auto r1 = ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 2, 1));
  sched_->run();
  auto r2 = ask<kv_reply>(b, process_atom::value, make_request(2, 0, 0, 2, 2));
  sched_->run();
  auto r3 = ask<kv_reply>(b, process_atom::value, make_request(3, 0, 0, 2, 3));
  sched_->run();
  for (const auto& r : {r1, r2, r3}) {
    ASSERT_TRUE(r->value.has_value());
    EXPECT_EQ(r->value->engine, 1U);
    EXPECT_EQ(r->value->computed_blocks, 2U);
  }
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.rerouted, 2U);
  EXPECT_EQ(st.timeouts, 0U);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}));
}

TEST_F(actor_test, AnUnbatchedRequestCutShortByAnExceptionIsRerouted) {
  // Engine 0 runs each request alone (batch.max_size 1) and its memory
  // backend throws, which ends the actor mid-request: that request goes to
  // engine 1 at once, as one cut short in a batch does, instead of failing
  // with the exception's error.
  auto bad = with_throwing_backend(small_engine(64));
  auto b = balancer(routing_policy::round_robin, {bad, small_engine(64)});
  sched_->run();
  auto r = ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 2, 1));
  sched_->run();
  ASSERT_TRUE(r->value.has_value())
      << to_string(r->error.value_or(caf::error{}));
  EXPECT_EQ(r->value->engine, 1U);
  EXPECT_EQ(r->value->computed_blocks, 2U);
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.rerouted, 1U);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{0, 1}));
}

TEST_F(actor_test, ScalerScalesUpAndDownAtThresholdsNotDuringCooldown) {
  auto b = balancer(routing_policy::least_loaded, {small_engine(64)});
  auto decisions = std::make_shared<std::vector<scale_decision>>();
  auto s = quick_scaler(b, 1, decisions);
  sched_->run();
  auto feed = [&](engine::nanos latency) {
    for (int i = 0; i < 10; ++i)
      caf::anon_send(s, observe_atom::value, kv_request{}, kv_reply{},
                     static_cast<std::int64_t>(latency.count()));
    sched_->run();
  };
  auto tick = [&] {
    sched_->advance_time(1s);
    sched_->run();
  };
  auto live = [&] {
    auto st = ask_now<balancer_stats>(b, stats_atom::value);
    return std::count(st.up.begin(), st.up.end(), std::uint8_t{1});
  };
  feed(400ms); // below target, above 0.3x: hold
  tick();
  EXPECT_TRUE(decisions->empty());
  feed(800ms);
  tick();
  ASSERT_EQ(decisions->size(), 1U);
  EXPECT_EQ(decisions->back().action, scale_action::spawn_replica);
  EXPECT_EQ(live(), 2);
  for (int i = 0; i < 24; ++i) { // in the 30 s cooldown: no decision
    feed(800ms);
    tick();
  }
  for (int i = 0; i < 6; ++i) // the slow samples leave the 5 s window
    tick();
  EXPECT_EQ(decisions->size(), 1U);
  feed(100ms); // below 0.3 x target
  tick();
  ASSERT_EQ(decisions->size(), 2U);
  EXPECT_EQ(decisions->back().action, scale_action::retire_replica);
  EXPECT_EQ(live(), 1);
  auto st = ask_now<scaler_stats>(s, stats_atom::value);
  EXPECT_EQ(st.actions[static_cast<std::size_t>(scale_action::spawn_replica)],
            1U);
  EXPECT_EQ(st.actions[static_cast<std::size_t>(scale_action::retire_replica)],
            1U);
  caf::anon_send_exit(s, caf::exit_reason::user_shutdown);
}

TEST_F(actor_test, ScalerGoesOnWhenItsDecisionCallbackThrows) {
  // The host's on_decision threw out of the scaler's handler: the scaler
  // ended, silently, and never scaled again. Now the throw is logged and
  // the next decision comes as before.
  auto b = balancer(routing_policy::least_loaded, {small_engine(64)});
  auto calls = std::make_shared<int>(0);
  scaler_actor_config sc;
  sc.policy.target = 500ms;
  sc.policy.window = 5s;
  sc.policy.cooldown = 30s;
  sc.policy.min_samples = 5;
  sc.policy.sustain = 1;
  sc.policy.min_replicas = 1;
  sc.policy.max_replicas = 2;
  sc.interval = 1s;
  sc.initial_replicas = 1;
  sc.on_decision = [calls](const scale_decision&) {
    ++*calls;
    throw std::runtime_error("host callback (test)");
  };
  auto s = spawned(spawn_scaler(*sys_, sc, b));
  stop_at_end_.push_back(s);
  sched_->run();
  auto feed_and_tick = [&](engine::nanos latency) {
    for (int i = 0; i < 10; ++i)
      caf::anon_send(s, observe_atom::value, kv_request{}, kv_reply{},
                     static_cast<std::int64_t>(latency.count()));
    sched_->run();
    sched_->advance_time(1s);
    sched_->run();
  };
  feed_and_tick(800ms);
  ASSERT_EQ(*calls, 1);
  for (int i = 0; i < 36; ++i) // past the cooldown and the window
    feed_and_tick(100ms);
  EXPECT_EQ(*calls, 2) << "the scaler stopped after the first throw";
  auto st = ask_now<scaler_stats>(s, stats_atom::value);
  EXPECT_EQ(st.actions[static_cast<std::size_t>(scale_action::spawn_replica)],
            1U);
  EXPECT_EQ(st.actions[static_cast<std::size_t>(scale_action::retire_replica)],
            1U);
}

TEST_F(actor_test, ScalerCountsRequestsTheBalancerTimedOutAsSlow) {
  // The only engine holds every request in a 100 s batch and the balancer
  // times them out after 2 s: no request is answered, yet they waited far
  // past the 500 ms target. The scaler must spawn a replica, not hold for
  // want of samples.
  auto b =
      balancer(routing_policy::least_loaded, {small_engine(64, 20, 100s)}, 2s);
  auto decisions = std::make_shared<std::vector<scale_decision>>();
  auto s = quick_scaler(b, 1, decisions);
  sched_->run();
  std::vector<std::shared_ptr<outcome<kv_reply>>> replies;
  for (std::uint64_t i = 0; i < 5; ++i)
    replies.push_back(
        ask<kv_reply>(b, process_atom::value, make_request(i, 0, 0, 1, i)));
  sched_->run();
  for (int t = 0; t < 3; ++t) { // the timeouts at 2 s, then an evaluation
    sched_->advance_time(1s);
    sched_->run();
  }
  for (const auto& r : replies) {
    ASSERT_TRUE(r->error.has_value());
    EXPECT_TRUE(is_timeout(*r->error));
  }
  ASSERT_EQ(decisions->size(), 1U);
  EXPECT_EQ(decisions->back().action, scale_action::spawn_replica);
  EXPECT_GE(decisions->back().p95, 2s);
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).live, 2U);
  caf::anon_send_exit(s, caf::exit_reason::user_shutdown);
  sched_->advance_time(100s);
  sched_->run();
}

TEST_F(actor_test, ScalerKeepsItsCountWhenTheBalancerRefusesARetire) {
  // Two engines; one dies and restarts only after 10 s. Meanwhile the
  // scaler decides to retire one; the balancer refuses (it would be the
  // last live engine). The scaler must still count two replicas.
  balancer_config bc;
  bc.initial_engines = 2;
  bc.restart_delay = 10s;
  auto b = small_balancer(bc);
  auto decisions = std::make_shared<std::vector<scale_decision>>();
  auto s = quick_scaler(b, 2, decisions);
  sched_->run();
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  caf::anon_send_exit(e0, caf::exit_reason::kill);
  sched_->run();
  for (int i = 0; i < 10; ++i)
    caf::anon_send(s, observe_atom::value, kv_request{}, kv_reply{},
                   std::int64_t{100'000'000}); // 100 ms: below 0.3 x target
  sched_->run();
  sched_->advance_time(1s);
  sched_->run();
  ASSERT_EQ(decisions->size(), 1U);
  EXPECT_EQ(decisions->back().action, scale_action::retire_replica);
  EXPECT_EQ(ask_now<scaler_stats>(s, stats_atom::value).replicas, 2U);
  // Engine 0 waits for its restart: not live, but still kept.
  auto down = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(down.live, 1U);
  EXPECT_EQ(down.engines, 2U);
  sched_->advance_time(10s); // engine 0 is back: two live, as counted
  sched_->run();
  auto st = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(st.up, (std::vector<std::uint8_t>{1, 1}));
  auto sst = ask_now<scaler_stats>(s, stats_atom::value);
  EXPECT_EQ(sst.replicas, 2U);
  EXPECT_EQ(sst.refused, 1U);
  EXPECT_EQ(sst.lost, 0U); // a restart is no loss
}

TEST_F(actor_test, ScalerLearnsOfEnginesTheBalancerGaveUp) {
  // Two engines, no restarts: when engine 1 dies the balancer gives it up.
  // The scaler learns it at its next evaluation and counts one replica, so
  // high latency then spawns a replica (believing two still ran, at
  // max_replicas 2, it would only grow the capacity).
  balancer_config bc;
  bc.initial_engines = 2;
  bc.max_restarts = 0;
  auto b = small_balancer(bc);
  auto decisions = std::make_shared<std::vector<scale_decision>>();
  auto s = quick_scaler(b, 2, decisions);
  sched_->run();
  caf::anon_send_exit(
      ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{1}),
      caf::exit_reason::kill);
  sched_->run();
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).given_up, 1U);
  sched_->advance_time(1s); // an evaluation: no samples, so it holds
  sched_->run();
  EXPECT_TRUE(decisions->empty());
  auto st = ask_now<scaler_stats>(s, stats_atom::value);
  EXPECT_EQ(st.replicas, 1U);
  EXPECT_EQ(st.lost, 1U);
  send_slow_samples(s); // 800 ms: above the target
  sched_->advance_time(1s);
  sched_->run();
  ASSERT_EQ(decisions->size(), 1U);
  EXPECT_EQ(decisions->back().action, scale_action::spawn_replica);
  EXPECT_EQ(ask_now<scaler_stats>(s, stats_atom::value).replicas, 2U);
  auto bs = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(bs.live, 2U);
  EXPECT_EQ(bs.up, (std::vector<std::uint8_t>{1, 1})); // slot 1 reused
  // Later evaluations do not count the same loss again.
  sched_->advance_time(1s);
  sched_->run();
  EXPECT_EQ(ask_now<scaler_stats>(s, stats_atom::value).lost, 1U);
}

TEST_F(actor_test, ScalerReplacesLostReplicasUpToMinReplicas) {
  // min_replicas 2 and no restarts: an engine the balancer gives up is
  // replaced at the scaler's next evaluation, with no latency sample at
  // all (at low load no latency rule would bring it back), but not during
  // the 30 s cooldown after the scaler's last action.
  balancer_config bc;
  bc.initial_engines = 2;
  bc.max_restarts = 0;
  auto b = small_balancer(bc);
  auto decisions = std::make_shared<std::vector<scale_decision>>();
  auto s = quick_scaler(b, 2, decisions, 2, 3);
  sched_->run();
  auto kill = [&](std::uint32_t slot) {
    caf::anon_send_exit(ask_now<caf::actor>(b, engine_atom::value, slot),
                        caf::exit_reason::kill);
    sched_->run();
  };
  auto tick = [&] {
    sched_->advance_time(1s);
    sched_->run();
  };
  kill(1);
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).live, 1U);
  tick(); // t = 1 s
  ASSERT_EQ(decisions->size(), 1U);
  EXPECT_EQ(decisions->back().action, scale_action::spawn_replica);
  EXPECT_TRUE(decisions->back().below_min);
  auto bs = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(bs.live, 2U);
  EXPECT_EQ(bs.up, (std::vector<std::uint8_t>{1, 1})); // slot 1 reused
  kill(0);
  for (int i = 0; i < 29; ++i) // up to t = 30 s: in the cooldown
    tick();
  EXPECT_EQ(decisions->size(), 1U);
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).live, 1U);
  tick(); // t = 31 s: the cooldown is over
  ASSERT_EQ(decisions->size(), 2U);
  EXPECT_TRUE(decisions->back().below_min);
  bs = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(bs.live, 2U);
  EXPECT_EQ(bs.given_up, 2U);
  auto st = ask_now<scaler_stats>(s, stats_atom::value);
  EXPECT_EQ(st.replicas, 2U);
  EXPECT_EQ(st.lost, 2U);
  EXPECT_EQ(st.replaced, 2U);
  EXPECT_EQ(st.actions[static_cast<std::size_t>(scale_action::spawn_replica)],
            2U);
  for (int i = 0; i < 40; ++i) // at the floor: nothing more to do
    tick();
  EXPECT_EQ(decisions->size(), 2U);
}

/// What a slow_balancer does: the engines it keeps, whether it carries out
/// the replica changes it is asked for, and how many it was asked for.
struct slow_fleet {
  std::uint32_t engines = 1;
  bool apply = true;
  int asked = 0;
};

struct slow_balancer_state {
  std::vector<caf::response_promise> held; ///< never answered
};

/// Stands in for a balancer too slow to answer a replica change within the
/// scaler's 10 s, though it may carry it out; it answers stats at once.
caf::behavior slow_balancer(caf::stateful_actor<slow_balancer_state>* self,
                            std::shared_ptr<slow_fleet> f) {
  return {
      [=](replica_atom) -> caf::result<std::uint32_t> {
        ++f->asked;
        if (f->apply)
          ++f->engines;
        self->state.held.push_back(self->make_response_promise());
        return self->state.held.back();
      },
      [=](stats_atom) -> balancer_stats {
        balancer_stats bs;
        bs.live = f->engines;
        bs.engines = f->engines;
        return bs;
      },
      [](listen_atom, const caf::actor&) {},
  };
}

struct stalled_balancer_state {
  std::vector<caf::response_promise> held; ///< stats requests not answered
};

/// A balancer that holds every stats request until it gets ready_atom,
/// then answers them all at once (one engine).
caf::behavior
stalled_balancer(caf::stateful_actor<stalled_balancer_state>* self,
                 std::shared_ptr<int> asked) {
  return {
      [=](stats_atom) -> caf::result<balancer_stats> {
        ++*asked;
        auto rp = self->make_response_promise<balancer_stats>();
        self->state.held.push_back(rp);
        return rp;
      },
      [=](ready_atom) {
        balancer_stats bs;
        bs.live = 1;
        bs.engines = 1;
        for (auto& rp : self->state.held)
          rp.deliver(bs);
        self->state.held.clear();
      },
      [](replica_atom) -> std::uint32_t { return 1; },
      [](listen_atom, const caf::actor&) {},
  };
}

TEST_F(actor_test, ScalerSendsNoStatsRequestWhileOneIsOnItsWay) {
  // The balancer stalls for 4 intervals, then answers. The scaler asked
  // once, so one evaluation follows: with sustain 2 it holds, and acts at
  // the next interval. Before, each interval sent a request, the four
  // answers came together and their evaluations met sustain at once.
  auto asked = std::make_shared<int>(0);
  auto b = sys_->spawn(stalled_balancer, asked);
  stop_at_end_.push_back(b);
  auto decisions = std::make_shared<std::vector<scale_decision>>();
  auto s = quick_scaler(b, 1, decisions, 1, 2, 2);
  sched_->run();
  send_slow_samples(s); // 800 ms: above the target
  for (int i = 0; i < 4; ++i) {
    sched_->advance_time(1s);
    sched_->run();
  }
  EXPECT_EQ(*asked, 1);
  caf::anon_send(b, ready_atom::value);
  sched_->run();
  EXPECT_TRUE(decisions->empty()) << "sustain 2 met by one interval";
  sched_->advance_time(1s);
  sched_->run();
  EXPECT_EQ(*asked, 2);
  caf::anon_send(b, ready_atom::value);
  sched_->run();
  ASSERT_EQ(decisions->size(), 1U);
  EXPECT_EQ(decisions->back().action, scale_action::spawn_replica);
}

TEST_F(actor_test, ScalerTakesATimeoutShorterThanItsTargetAsTooSlow) {
  // Every request times out at 100 ms (a balancer request_timeout below
  // the 500 ms target): nobody got a reply in time, so the fleet scales
  // up. Before, the waits were the samples, p95 100 ms read as below 0.3x
  // the target, and the scaler would retire or shrink.
  auto f = std::make_shared<slow_fleet>();
  auto b = sys_->spawn(slow_balancer, f);
  stop_at_end_.push_back(b);
  auto decisions = std::make_shared<std::vector<scale_decision>>();
  auto s = quick_scaler(b, 1, decisions);
  sched_->run();
  for (int i = 0; i < 10; ++i)
    caf::anon_send(s, latency_atom::value, kv_request{},
                   std::int64_t{100'000'000});
  sched_->run();
  sched_->advance_time(1s);
  sched_->run();
  ASSERT_EQ(decisions->size(), 1U);
  EXPECT_EQ(decisions->back().action, scale_action::spawn_replica);
  EXPECT_GT(ask_now<scaler_stats>(s, stats_atom::value).last_p95_ns,
            500'000'000);
}

TEST_F(actor_test, ScalerIgnoresTheLatencyOfWarmAndBackgroundRequests) {
  // Warm queries and background work wait behind served traffic at low
  // priority: their latencies, answered or timed out, are no samples at
  // the default sample_priority (normal), so 800 ms of them spawns
  // nothing. The same latencies at normal priority do; with
  // sample_priority low, low ones count too.
  auto send = [&](const caf::actor& s, engine::priority prio, bool timed_out) {
    kv_request r;
    r.prio = prio;
    for (int i = 0; i < 10; ++i) {
      if (timed_out)
        caf::anon_send(s, latency_atom::value, r, std::int64_t{800'000'000});
      else
        caf::anon_send(s, observe_atom::value, r, kv_reply{},
                       std::int64_t{800'000'000});
    }
    sched_->run();
    sched_->advance_time(1s);
    sched_->run();
  };
  auto f = std::make_shared<slow_fleet>();
  auto b = sys_->spawn(slow_balancer, f);
  stop_at_end_.push_back(b);
  auto decisions = std::make_shared<std::vector<scale_decision>>();
  auto s = quick_scaler(b, 1, decisions);
  sched_->run();
  for (auto prio : {engine::priority::low, engine::priority::background})
    for (bool timed_out : {false, true})
      send(s, prio, timed_out);
  EXPECT_TRUE(decisions->empty());
  EXPECT_EQ(ask_now<scaler_stats>(s, stats_atom::value).last_p95_ns, 0);
  send(s, engine::priority::normal, false);
  ASSERT_EQ(decisions->size(), 1U);
  EXPECT_EQ(decisions->back().action, scale_action::spawn_replica);
  caf::anon_send_exit(s, caf::exit_reason::user_shutdown);

  scaler_actor_config sc;
  sc.policy.min_samples = 5;
  sc.policy.sustain = 1;
  sc.policy.max_replicas = 2;
  sc.sample_priority = engine::priority::low;
  sc.on_decision = [decisions](const scale_decision& d) {
    decisions->push_back(d);
  };
  auto low = spawned(spawn_scaler(*sys_, sc, b));
  stop_at_end_.push_back(low);
  sched_->run();
  send(low, engine::priority::background, false);
  EXPECT_EQ(decisions->size(), 1U);
  send(low, engine::priority::low, false);
  ASSERT_EQ(decisions->size(), 2U);
  EXPECT_EQ(decisions->back().action, scale_action::spawn_replica);
}

TEST_F(actor_test, ScalerDoesNotUndoAReplicaChangeTheBalancerLeftUnanswered) {
  // The scaler asks for a replica; the balancer does not answer in 10 s.
  // That is no refusal: the scaler keeps its count until the balancer's
  // stats say what runs, whether the balancer made the change or not.
  for (bool apply : {true, false}) {
    auto f = std::make_shared<slow_fleet>();
    f->apply = apply;
    auto b = sys_->spawn(slow_balancer, f);
    stop_at_end_.push_back(b);
    auto decisions = std::make_shared<std::vector<scale_decision>>();
    auto s = quick_scaler(b, 1, decisions);
    sched_->run();
    send_slow_samples(s); // 800 ms: above the target
    sched_->advance_time(1s);
    sched_->run();
    ASSERT_EQ(decisions->size(), 1U) << "apply " << apply;
    EXPECT_EQ(decisions->back().action, scale_action::spawn_replica);
    EXPECT_EQ(f->asked, 1);
    for (int i = 0; i < 12; ++i) { // the 10 s timeout, then a stats read
      sched_->advance_time(1s);
      sched_->run();
    }
    auto st = ask_now<scaler_stats>(s, stats_atom::value);
    EXPECT_EQ(st.unanswered, 1U) << "apply " << apply;
    EXPECT_EQ(st.refused, 0U) << "apply " << apply;
    EXPECT_EQ(st.replicas, f->engines) << "apply " << apply;
    EXPECT_EQ(st.replicas, apply ? 2U : 1U);
    EXPECT_EQ(decisions->size(), 1U); // still in the cooldown
    caf::anon_send_exit(s, caf::exit_reason::user_shutdown);
    sched_->run();
  }
}

TEST_F(actor_test, ScalerHoldsWhileAReplicaOpensAndCoolsDownFromItsStart) {
  // The replica the scaler asks for opens for 50 s, past the 30 s cooldown,
  // while every second's requests take 800 ms (above the 500 ms target).
  // The scaler holds until the balancer answers (before, it spawned again
  // at the end of the cooldown, at 31 s, reading latencies from before the
  // first replica served, up to max_replicas), and the cooldown runs from
  // the replica's start: the next spawn comes 30 s after it, not before.
  auto opening = std::make_shared<std::vector<caf::actor>>();
  balancer_config bc;
  auto b =
      started_balancer(bc,
                       [opening](caf::actor_system& s,
                                 std::uint32_t slot) -> result<started_engine> {
                         if (slot == 0) {
                           auto c = small_engine(64);
                           return started_now(spawn_engine_actor(s, c));
                         }
                         opening->push_back(s.spawn(opening_engine));
                         return started_engine{opening->back(), true};
                       });
  auto decisions = std::make_shared<std::vector<scale_decision>>();
  auto s = quick_scaler(b, 1, decisions, 1, 4);
  sched_->run();
  const auto slow_second = [&] {
    send_slow_samples(s);
    sched_->advance_time(1s);
    sched_->run();
  };
  slow_second();
  ASSERT_EQ(decisions->size(), 1U);
  EXPECT_EQ(decisions->back().action, scale_action::spawn_replica);
  ASSERT_EQ(opening->size(), 1U);
  stop_at_end_.push_back(opening->front());
  for (int i = 0; i < 49; ++i) // to 50 s
    slow_second();
  EXPECT_EQ(decisions->size(), 1U) << "held while the replica opened";
  EXPECT_EQ(opening->size(), 1U);
  caf::anon_send(opening->front(), ready_atom::value, true);
  sched_->run();
  for (int i = 0; i < 29; ++i) // the cooldown from its start
    slow_second();
  EXPECT_EQ(decisions->size(), 1U) << "cooling down from the replica's start";
  for (int i = 0; i < 3; ++i)
    slow_second();
  ASSERT_EQ(decisions->size(), 2U);
  EXPECT_EQ(decisions->back().action, scale_action::spawn_replica);
  ASSERT_EQ(opening->size(), 2U);
  stop_at_end_.push_back(opening->back());
  auto st = ask_now<scaler_stats>(s, stats_atom::value);
  EXPECT_EQ(st.refused, 0U);
  caf::anon_send_exit(s, caf::exit_reason::user_shutdown);
  sched_->run();
}

TEST_F(actor_test, ScalerFollowsAReplicaThatOpensLongerThanItsTimeout) {
  // The replica the scaler asks for opens its store for 15 s, past the
  // scaler's 10 s: counted unanswered (the balancer counts the opening
  // replica, so the count reads 2), then it comes up or its open fails.
  // Either way the scaler hears the balancer's late answer and its count
  // follows the balancer's engines (before, a failed open left it at 2).
  for (bool comes_up : {true, false}) {
    auto opening = std::make_shared<caf::actor>();
    balancer_config bc;
    auto b = started_balancer(
        bc,
        [opening](caf::actor_system& s,
                  std::uint32_t slot) -> result<started_engine> {
          if (slot == 0) {
            auto c = small_engine(64);
            return started_now(spawn_engine_actor(s, c));
          }
          *opening = s.spawn(opening_engine);
          return started_engine{*opening, true};
        });
    auto decisions = std::make_shared<std::vector<scale_decision>>();
    auto s = quick_scaler(b, 1, decisions);
    sched_->run();
    send_slow_samples(s); // 800 ms: above the target
    auto tick = [&] {
      sched_->advance_time(1s);
      sched_->run();
    };
    tick();
    ASSERT_EQ(decisions->size(), 1U) << "comes_up " << comes_up;
    EXPECT_EQ(decisions->back().action, scale_action::spawn_replica);
    ASSERT_TRUE(*opening);
    stop_at_end_.push_back(*opening);
    for (int i = 0; i < 12; ++i) // the 10 s timeout, then a stats read
      tick();
    auto st = ask_now<scaler_stats>(s, stats_atom::value);
    EXPECT_EQ(st.unanswered, 1U);
    EXPECT_EQ(st.replicas, 2U) << "the opening replica is counted";
    if (comes_up)
      caf::anon_send(*opening, ready_atom::value, true);
    else
      // What an open that fails does: the engine exits with the error.
      caf::anon_send(
          *opening,
          caf::exit_msg{opening->address(),
                        to_caf_error(error{errc::io_error, "disk unplugged"})});
    sched_->run();
    tick(); // an evaluation reads the balancer's stats
    auto bs = ask_now<balancer_stats>(b, stats_atom::value);
    EXPECT_EQ(bs.engines, comes_up ? 2U : 1U);
    EXPECT_EQ(bs.live, comes_up ? 2U : 1U);
    st = ask_now<scaler_stats>(s, stats_atom::value);
    EXPECT_EQ(st.replicas, bs.engines) << "comes_up " << comes_up;
    EXPECT_EQ(st.answered_late, 1U);
    EXPECT_EQ(st.refused, 0U);
    if (!comes_up) {
      // Refused late: past the cooldown the next scale-up grows the
      // capacity (before, the same spawn was decided again).
      for (int i = 0; i < 20; ++i)
        tick();
      send_slow_samples(s);
      tick();
      EXPECT_EQ(decisions->back().action, scale_action::grow_capacity);
    }
    caf::anon_send_exit(s, caf::exit_reason::user_shutdown);
    sched_->run();
  }
}

/// Stands in for the balancer: answers process requests and records them.
struct fake_backend {
  std::vector<kv_request> seen;
  /// Of each reply's computed blocks, those it says were not cached.
  std::uint64_t uncached = 0;
};

caf::behavior fake_balancer(caf::event_based_actor*,
                            std::shared_ptr<fake_backend> be) {
  return {
      [be](process_atom, const kv_request& r) -> kv_reply {
        be->seen.push_back(r);
        return kv_reply{r.id,           0,     0,           r.keys.size(), 0,
                        r.input_tokens, false, be->uncached};
      },
      [](listen_atom, const caf::actor&) {},
  };
}

/// A fake balancer over a fresh fake_backend; it stops at the test's end.
struct fake_fleet {
  std::shared_ptr<fake_backend> be;
  caf::actor balancer;
};
fake_fleet spawn_fake_fleet(caf::actor_system& sys,
                            std::vector<caf::actor>& stop_at_end) {
  auto be = std::make_shared<fake_backend>();
  auto balancer = sys.spawn(fake_balancer, be);
  stop_at_end.push_back(balancer);
  return {std::move(be), std::move(balancer)};
}

/// A query cache in front of a fake balancer; both stop at the test's end.
struct cache_over_fake {
  std::shared_ptr<fake_backend> be = std::make_shared<fake_backend>();
  caf::actor balancer;
  caf::actor cache;

  /// Over `store` when one is given, else the store `qc` selects.
  cache_over_fake(caf::actor_system& sys, std::vector<caf::actor>& stop_at_end,
                  const query_cache_config& qc = {},
                  std::unique_ptr<query_store> store = nullptr) {
    balancer = sys.spawn(fake_balancer, be);
    cache =
        spawned(store ? spawn_query_cache(sys, qc, balancer, std::move(store))
                      : spawn_query_cache(sys, qc, balancer));
    stop_at_end.push_back(cache);
    stop_at_end.push_back(balancer);
  }
};

TEST_F(actor_test, SpawnFunctionsAnswerABadConfigurationWithAnError) {
  // Used directly, not through node::start: each bad option is an
  // errc::invalid_argument naming it, and the process goes on.
  auto [be, fake] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto expect_error = [](const result<caf::actor>& a, const char* names) {
    ASSERT_FALSE(a.has_value()) << names;
    EXPECT_EQ(a.error().code, errc::invalid_argument);
    EXPECT_NE(a.error().message.find(names), std::string::npos)
        << a.error().message;
  };
  // A refused balancer spawns no engine: the factory counts its calls.
  int factory_calls = 0;
  const auto factory = [&](caf::actor_system& s, std::uint32_t slot) {
    ++factory_calls;
    auto c = small_engine(16);
    c.slot = slot;
    return started_now(spawn_engine_actor(s, c));
  };
  const std::pair<void (*)(balancer_config&), const char*> balancer_cases[] = {
      {[](balancer_config& c) { c.routing.max_index_keys = 0; },
       "max_index_keys"},
      {[](balancer_config& c) { c.initial_engines = router::max_slots + 1; },
       "initial_engines"},
      {[](balancer_config& c) { c.request_timeout = 0ms; },
       "balancer_config.request_timeout"},
      // "No timeout" as the largest value would wrap to -1 ms.
      {[](balancer_config& c) {
         c.request_timeout = std::chrono::milliseconds::max();
       },
       "balancer_config.request_timeout"},
      {[](balancer_config& c) { c.restart_delay = -1ms; },
       "balancer_config.restart_delay"},
      {[](balancer_config& c) { c.retire_persist_timeout = 0ms; },
       "balancer_config.retire_persist_timeout"},
      {[](balancer_config& c) { c.retire_persist_timeout = 25h; },
       "balancer_config.retire_persist_timeout"},
  };
  for (const auto& [edit, names] : balancer_cases) {
    balancer_config bc;
    edit(bc);
    expect_error(spawn_balancer(*sys_, bc, factory), names);
  }
  // Each nonsense engine option, where it used to be taken as something
  // else (a batch of 0 as 1), or to stall (timeouts of 0), spin (a tier
  // poll every 0 us) or cast a negative fraction to an unsigned size.
  const std::pair<void (*)(engine_actor_config&), const char*> engine_cases[] =
      {
          {[](engine_actor_config& c) { c.batch.max_size = 0; },
           "batch.max_size"},
          {[](engine_actor_config& c) { c.batch.timeout = 0ms; },
           "batch.timeout"},
          {[](engine_actor_config& c) { c.put_timeout = -5ms; }, "put_timeout"},
          // "No timeout" as the largest value would wrap to -1 ms.
          {[](engine_actor_config& c) {
             c.put_timeout = std::chrono::milliseconds::max();
           },
           "put_timeout"},
          {[](engine_actor_config& c) {
             c.batch.timeout = engine::nanos::max();
           },
           "batch.timeout"},
          {[](engine_actor_config& c) { c.tier_poll_interval = 0us; },
           "tier_poll_interval"},
          {[](engine_actor_config& c) { c.disk_poll_interval = -1us; },
           "disk_poll_interval"},
          {[](engine_actor_config& c) { c.pressure.target = -0.5; },
           "pressure"},
          {[](engine_actor_config& c) { c.pressure.threshold = 1.5; },
           "pressure"},
          {[](engine_actor_config& c) { c.pressure.threshold = std::nan(""); },
           "pressure"},
          {[](engine_actor_config& c) {
             c.pressure.threshold = 0.5;
             c.pressure.target = 0.7;
           },
           "pressure"},
          // Pins may reach the target: relief would flush every unpinned
          // block after each batch.
          {[](engine_actor_config& c) { c.store.max_pinned_fraction = 0.8; },
           "store.max_pinned_fraction"},
      };
  for (const auto& [edit, names] : engine_cases) {
    auto c = small_engine(16);
    edit(c);
    expect_error(spawn_engine_actor(*sys_, c),
                 (std::string("engine_actor_config.") + names).c_str());
  }
  warmer_config wc;
  wc.parallelism = 0;
  expect_error(spawn_warmer(*sys_, wc, fake), "warmer_config.parallelism");
  scaler_actor_config sc;
  sc.policy.sustain = 0;
  expect_error(spawn_scaler(*sys_, sc, fake), "sustain");
  sc = scaler_actor_config{};
  sc.policy.min_replicas = 5;
  expect_error(spawn_scaler(*sys_, sc, fake), "min_replicas");
  sc = scaler_actor_config{};
  sc.interval = 0ms; // would re-arm its timer at once, forever
  expect_error(spawn_scaler(*sys_, sc, fake), "scaler_actor_config.interval");
  sc = scaler_actor_config{};
  sc.policy.grow_factor = 0.5;
  expect_error(spawn_scaler(*sys_, sc, fake), "scaler_config.grow_factor");
  sc = scaler_actor_config{};
  sc.initial_replicas = sc.policy.max_replicas + 1;
  expect_error(spawn_scaler(*sys_, sc, fake), "initial_replicas");
  sc = scaler_actor_config{};
  sc.sample_priority = static_cast<engine::priority>(5);
  expect_error(spawn_scaler(*sys_, sc, fake),
               "scaler_actor_config.sample_priority");
  prefetch_config pc;
  pc.threshold = 1.5;
  expect_error(spawn_prefetcher(*sys_, pc, fake), "threshold");
  pc = prefetch_config{};
  pc.model.decay = std::nan("");
  expect_error(spawn_prefetcher(*sys_, pc, fake), "decay");
  pc = prefetch_config{};
  pc.model.top_k = 0; // was taken as 1
  expect_error(spawn_prefetcher(*sys_, pc, fake),
               "prefetch_config.model.top_k");
  pc = prefetch_config{};
  pc.max_outstanding = 0;
  expect_error(spawn_prefetcher(*sys_, pc, fake), "max_outstanding");
  query_cache_config qc;
  qc.ttl = std::chrono::seconds::max(); // expiry would wrap into the past
  expect_error(spawn_query_cache(*sys_, qc, fake), "query_cache_config.ttl");
  qc = query_cache_config{};
  qc.redis_url = "redis://127.0.0.1:1";
  qc.redis.max_value_bytes = max_encoded_reply_bytes - 1; // sets would fail
  expect_error(spawn_query_cache(*sys_, qc, fake),
               "query_cache_config.redis.max_value_bytes must be at least");
  qc = query_cache_config{};
  qc.ttl = 0s;
  expect_error(spawn_query_cache(*sys_, qc, fake), "ttl");
  expect_error(spawn_query_cache(*sys_, qc, fake,
                                 std::make_unique<embedded_query_store>()),
               "ttl");
  expect_error(spawn_query_cache(*sys_, query_cache_config{}, fake, nullptr),
               "null");
  // No balancer: refused at the spawn, not at every request it would send.
  const caf::actor none;
  expect_error(spawn_warmer(*sys_, warmer_config{}, none),
               "spawn_warmer: the balancer is null");
  expect_error(spawn_scaler(*sys_, scaler_actor_config{}, none),
               "spawn_scaler: the balancer is null");
  expect_error(spawn_prefetcher(*sys_, prefetch_config{}, none),
               "spawn_prefetcher: the balancer is null");
  expect_error(spawn_query_cache(*sys_, query_cache_config{}, none),
               "spawn_query_cache: the balancer is null");
  sched_->run();
  EXPECT_TRUE(be->seen.empty());
  EXPECT_EQ(factory_calls, 0) << "engines spawned for a refused balancer";
}

TEST_F(actor_test, SpawnScalerRejectsAnInitialCapacityOutsideItsRange) {
  // Not clamped into [min_capacity_tokens, max_capacity_tokens]: the
  // engines run the budget they were given, and the scaler must count from
  // that same one.
  auto [be, fake] = spawn_fake_fleet(*sys_, stop_at_end_);
  for (std::uint32_t tokens : {1000U, 20000U}) {
    scaler_actor_config sc; // range [2048, 16384]
    sc.initial_capacity_tokens = tokens;
    auto a = spawn_scaler(*sys_, sc, fake);
    if (a)
      stop_at_end_.push_back(*a);
    ASSERT_FALSE(a.has_value()) << tokens;
    EXPECT_EQ(a.error().code, errc::invalid_argument);
    EXPECT_NE(
        a.error().message.find("scaler_actor_config.initial_capacity_tokens (" +
                               std::to_string(tokens) + ")"),
        std::string::npos)
        << a.error().message;
  }
  scaler_actor_config sc;
  sc.initial_capacity_tokens = 16384;
  auto s = spawned(spawn_scaler(*sys_, sc, fake));
  stop_at_end_.push_back(s);
  sched_->run();
  EXPECT_EQ(ask_now<scaler_stats>(s, stats_atom::value).capacity_tokens,
            16384U);
}

kv_request query(std::uint64_t session, std::string q) {
  kv_request r;
  r.session = session;
  r.query = std::move(q);
  r.keys = {block_key{std::hash<std::string>{}(r.query), 1}};
  r.input_tokens = 16;
  return r;
}

/// query(id, q) as request `id` (its session too) at priority `p`.
kv_request query_at(std::uint64_t id, std::string q, engine::priority p) {
  kv_request r = query(id, std::move(q));
  r.id = id;
  r.prio = p;
  return r;
}

TEST_F(actor_test, APrefetchDoesNotReplayTheDeadlineOfTheRequestItLearnt) {
  // The prefetcher learns a query's request from the listeners' copy,
  // which carries its caller's deadline (a pinning node call's). A
  // prefetch of it sent later carried that long-passed deadline, and the
  // engine refused it unprocessed: prefetching was dead for any query not
  // seen in the last call_timeout. It goes without one now; the balancer
  // gives it its own.
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pf = prefetcher(b);
  for (std::uint64_t s = 1; s <= 3; ++s) {
    auto a = query(s, "A");
    auto bq = query(s, "B");
    a.deadline_ns = bq.deadline_ns = 1'000'000'000;
    observed(pf, a);
    observed(pf, bq);
  }
  const auto before = be->seen.size();
  observed(pf, query(10, "A"));
  ASSERT_EQ(be->seen.size(), before + 1);
  EXPECT_TRUE(be->seen.back().prefetch);
  EXPECT_EQ(be->seen.back().query, "B");
  EXPECT_EQ(be->seen.back().deadline_ns, 0);
}

TEST_F(actor_test, AnExpiryAtTheCallersEarlierDeadlineIsTheBalancersTimeout) {
  // A request whose caller's deadline (a pinning node call's) comes before
  // the balancer's: the engine reaches it after that and answers
  // errc::timeout unprocessed. Before, the balancer judged the expiry by
  // its own deadline alone, so it counted no timeout and told the scaler
  // nothing of the request.
  auto b =
      balancer(routing_policy::round_robin, {small_engine(64, 2, 100s)}, 70s);
  sched_->run();
  auto late = make_request(1, 0, 0, 1, 1);
  late.deadline_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                         (sched_->clock().now() + 1s).time_since_epoch())
                         .count();
  auto r1 = ask<kv_reply>(b, process_atom::value, late);
  sched_->run();
  sched_->advance_time(2s); // past its caller's deadline, not the balancer's
  sched_->run();
  auto r2 = ask<kv_reply>(b, process_atom::value, make_request(2, 0, 0, 1, 2));
  sched_->run(); // the second closes the engine's batch of two
  ASSERT_TRUE(r1->error.has_value());
  EXPECT_TRUE(is_timeout(*r1->error)) << to_string(*r1->error);
  ASSERT_TRUE(r2->value.has_value());
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).timeouts, 1U);
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  EXPECT_EQ(ask_now<engine_stats>(e0, stats_atom::value).expired, 1U);
}

TEST_F(actor_test, PrefetcherPredictsLearnedPatternAndForgetsStaleOnes) {
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pc = eager_prefetch();
  pc.threshold = 0.6;
  pc.model.decay = 0.5;
  auto pf = prefetcher(b, pc);
  auto observe = [&](const kv_request& r) { observed(pf, r); };
  for (std::uint64_t s = 1; s <= 3; ++s) {
    observe(query(s, "A"));
    observe(query(s, "B"));
  }
  auto before = be->seen.size();
  observe(query(10, "A"));
  ASSERT_EQ(be->seen.size(), before + 1);
  EXPECT_EQ(be->seen.back().query, "B");
  EXPECT_TRUE(be->seen.back().prefetch);
  EXPECT_EQ(be->seen.back().prio, engine::priority::low);
  observe(query(10, "B")); // the prefetched query arrives: useful
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_GE(st.issued, 1U);
  EXPECT_EQ(st.useful, st.issued); // every prefetch so far was used
  // A prefetch whose blocks are evicted before use is wasted.
  observe(query(11, "A"));
  block_events ev;
  ev.evicted = query(0, "B").keys;
  caf::anon_send(pf, ev);
  sched_->run();
  EXPECT_EQ(ask_now<prefetch_stats>(pf, stats_atom::value).wasted, 1U);
  caf::anon_send_exit(pf, caf::exit_reason::user_shutdown);
  sched_->run();
  // Stale patterns age out: with aging every 4 observations, A -> B decays
  // below the floor while other traffic flows, and A predicts nothing.
  pc.model.aging_interval = 4;
  auto pf2 = prefetcher(b, pc);
  auto observe2 = [&](const kv_request& r) { observed(pf2, r); };
  observe2(query(1, "A"));
  observe2(query(1, "B"));
  for (int i = 0; i < 40; ++i)
    observe2(query(100 + static_cast<std::uint64_t>(i),
                   "other" + std::to_string(i)));
  before = be->seen.size();
  observe2(query(50, "A"));
  EXPECT_EQ(be->seen.size(), before);
  caf::anon_send_exit(pf2, caf::exit_reason::user_shutdown);
}

TEST_F(actor_test, PrefetcherLooksPastARepeatToTheNextQuery) {
  // Sessions ask A, A, B: after A, A repeats as often as B follows. The
  // repeat is cached already, so the prefetcher sends B (confidence 1/2,
  // the threshold 0.5); a repeat is never prefetched.
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pc = eager_prefetch();
  pc.threshold = 0.5;
  auto pf = prefetcher(b, pc);
  auto observe = [&](const kv_request& r) { observed(pf, r); };
  for (std::uint64_t s = 1; s <= 3; ++s) {
    observe(query(s, "A"));
    observe(query(s, "A"));
    observe(query(s, "B"));
  }
  const auto before = be->seen.size();
  observe(query(10, "A"));
  ASSERT_EQ(be->seen.size(), before + 1);
  EXPECT_EQ(be->seen.back().query, "B");
  EXPECT_TRUE(be->seen.back().prefetch);
  caf::anon_send_exit(pf, caf::exit_reason::user_shutdown);
}

TEST_F(actor_test, PrefetcherKeepsKeylessRequestsApartFromQueries) {
  // A request without a query was known by its last key's 32 hex digits,
  // which is also the id of the query of those 32 characters: a keyless
  // request shared that query's history, and prefetched what followed it.
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pc = eager_prefetch();
  pc.threshold = 0.6;
  auto pf = prefetcher(b, pc);
  auto observe = [&](const kv_request& r) { observed(pf, r); };
  const block_key last{0x1234, 0x5678};
  for (std::uint64_t s = 1; s <= 3; ++s) {
    observe(query(s, last.to_hex()));
    observe(query(s, "B"));
  }
  kv_request keyless;
  keyless.session = 10;
  keyless.keys = {last};
  keyless.input_tokens = 16;
  const auto before = be->seen.size();
  observe(keyless);
  EXPECT_EQ(be->seen.size(), before) << "predicted from another query";
  // The query itself still predicts B.
  observe(query(11, last.to_hex()));
  ASSERT_EQ(be->seen.size(), before + 1);
  EXPECT_EQ(be->seen.back().query, "B");
  EXPECT_NE(prefetch_key_query_id(last), prefetch_query_id(last.to_hex()));
  EXPECT_EQ(prefetch_key_query_id(last).size(), 65U);
  caf::anon_send_exit(pf, caf::exit_reason::user_shutdown);
}

TEST_F(actor_test, PrefetcherForgetsTheLeastRecentlySeenQueryPastItsKeyBound) {
  // Room for 3 block keys of remembered requests (1 key each here). B is
  // seen, then C, then A -> B is learned: C, now the least recently seen,
  // goes when D comes, not B (before, the first seen went first, whatever
  // was seen since, and A predicted a B it could no longer replay); then a
  // 4-key prompt, more than the bound, is not kept, and nothing goes for
  // it.
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pc = eager_prefetch();
  pc.max_known_keys = 3;
  auto pf = prefetcher(b, pc);
  auto observe = [&](const kv_request& r) { observed(pf, r); };
  observe(query(9, "B"));
  observe(query(2, "C"));
  observe(query(1, "A"));
  observe(query(1, "B")); // seen again: the most recent
  observe(query(7, "D")); // 4 keys known: C, the least recent, goes
  auto big = query(5, "E");
  big.keys = {block_key{9, 1}, block_key{9, 2}, block_key{9, 3},
              block_key{9, 4}};
  big.input_tokens = 64;
  observe(big); // over the bound alone: not kept
  const auto before = be->seen.size();
  observe(query(6, "A")); // predicts B, still known: prefetched
  ASSERT_EQ(be->seen.size(), before + 1);
  EXPECT_EQ(be->seen.back().query, "B");
  EXPECT_TRUE(be->seen.back().prefetch);
  caf::anon_send_exit(pf, caf::exit_reason::user_shutdown);
  sched_->run();
  // A bound of 0 is refused.
  pc.max_known_keys = 0;
  EXPECT_FALSE(validate(pc).has_value());
}

TEST_F(actor_test, PrefetcherFullEvictsTheOldestLivePrefetch) {
  // With room for two prefetches, a third evicts the oldest one still
  // outstanding, never a newer prefetch of a query used earlier.
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pc = eager_prefetch();
  pc.max_outstanding = 2;
  auto pf = prefetcher(b, pc);
  std::uint64_t session = 1;
  auto observe = [&](const std::string& q) {
    observed(pf, query(session++, q));
  };
  auto pair = [&](const std::string& from, const std::string& to) {
    const auto s = session++;
    for (const auto& q : {from, to})
      caf::anon_send(pf, observe_atom::value, query(s, q), kv_reply{},
                     std::int64_t{0});
    sched_->run();
  };
  pair("X", "B"); // X -> B, Y -> C, Z -> D
  pair("Y", "C");
  pair("Z", "D");
  ASSERT_TRUE(be->seen.empty());
  observe("X"); // prefetches B
  observe("B"); // used
  observe("Y"); // prefetches C: the oldest live prefetch
  observe("X"); // prefetches B again
  observe("Z"); // prefetches D: full, so C goes
  std::vector<std::string> prefetched;
  for (const auto& r : be->seen)
    prefetched.push_back(r.query);
  EXPECT_EQ(prefetched, (std::vector<std::string>{"B", "C", "B", "D"}));
  observe("B"); // the second prefetch of B is still tracked: useful
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 4U);
  EXPECT_EQ(st.useful, 2U);
  // C was forgotten unused, D is outstanding: every prefetch issued is
  // accounted for (before, C counted nowhere).
  EXPECT_EQ(st.forgotten, 1U);
  EXPECT_EQ(st.outstanding, 1U);
  EXPECT_EQ(st.wasted, 0U);
  EXPECT_EQ(st.issued, st.useful + st.wasted + st.failed + st.cached +
                           st.redundant + st.forgotten + st.outstanding);
}

TEST_F(actor_test, PrefetcherLearnsLongQueriesAndSendsThemWhole) {
  // Whole prompts as queries: the model and the tracker know them by a
  // digest (bounded memory), and the prefetch carries the query whole.
  // A query longer than max_known_query_bytes is not kept to replay.
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pc = eager_prefetch();
  pc.max_known_query_bytes = 30'000;
  auto pf = prefetcher(b, pc);
  const std::string x(10'000, 'x');
  const std::string y(20'000, 'y');
  const std::string huge(40'000, 'z');
  observed(pf, query(1, x));
  observed(pf, query(1, y)); // x -> y
  observed(pf, query(2, x)); // prefetches y
  ASSERT_EQ(be->seen.size(), 1U);
  EXPECT_EQ(be->seen[0].query, y);
  EXPECT_TRUE(be->seen[0].prefetch);
  observed(pf, query(3, huge));
  observed(pf, query(3, x)); // huge -> x (x is known)
  observed(pf, query(4, x));
  observed(pf, query(4, huge)); // x -> huge once, x -> y once
  observed(pf, query(5, huge)); // prefetches x
  ASSERT_EQ(be->seen.size(), 2U);
  EXPECT_EQ(be->seen[1].query, x);
  observed(pf, query(6, y));
  observed(pf, query(6, huge)); // y -> huge
  observed(pf, query(7, y));    // predicts huge: not kept, not sent
  EXPECT_EQ(be->seen.size(), 2U);
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.tracked_queries, 3U); // x, huge and y have successors
}

TEST_F(actor_test, PrefetcherPredictsASessionsOwnPatternFirst) {
  // Session 1 goes A -> B three times, eight other sessions A -> C: back
  // at A, session 1's prefetch is B, another session's C. (Before, every
  // session got the overall C.)
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pf = prefetcher(b, eager_prefetch());
  for (int i = 0; i < 3; ++i) {
    observed(pf, query(1, "A"));
    observed(pf, query(1, "B"));
  }
  for (std::uint64_t session = 2; session <= 9; ++session) {
    observed(pf, query(session, "A"));
    observed(pf, query(session, "C"));
  }
  observed(pf, query(30, "B")); // settles a prefetch of B still outstanding
  observed(pf, query(1, "A"));
  ASSERT_FALSE(be->seen.empty());
  EXPECT_EQ(be->seen.back().query, "B");
  observed(pf, query(31, "C"));
  observed(pf, query(31, "A"));
  EXPECT_EQ(be->seen.back().query, "C");
}

TEST_F(actor_test, PrefetcherDoesNotPrefetchAnOutstandingQueryAgain) {
  // X -> B is learned; X twice in a row predicts B twice, but the second
  // prediction finds B's prefetch outstanding (the tracker refuses it) and
  // sends nothing.
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pf = prefetcher(b);
  auto observe = [&](std::uint64_t session, const std::string& q) {
    observed(pf, query(session, q));
  };
  observe(1, "X");
  observe(1, "B");
  ASSERT_TRUE(be->seen.empty());
  observe(2, "X"); // prefetches B
  observe(3, "X"); // B is outstanding: not again
  ASSERT_EQ(be->seen.size(), 1U);
  EXPECT_EQ(be->seen[0].query, "B");
  observe(2, "B"); // used; X may prefetch B once more
  observe(4, "X");
  EXPECT_EQ(be->seen.size(), 2U);
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 2U);
  EXPECT_EQ(st.useful, 1U);
}

TEST_F(actor_test, PrefetcherWastesEveryPrefetchThatHeldAnEvictedBlock) {
  // B and C share their first block (a common prefix) and are both
  // prefetched, outstanding, when an engine evicts that block: both were
  // wasted, and B requested afterwards is no useful prefetch.
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pf = prefetcher(b);
  const block_key shared{99, 1};
  auto prefixed = [&](std::uint64_t session, const std::string& q) {
    auto r = query(session, q);
    r.keys = {shared, block_key{std::hash<std::string>{}(q), 2}};
    r.input_tokens = 32;
    return r;
  };
  auto observe = [&](const kv_request& r) { observed(pf, r); };
  observe(query(1, "X")); // X -> B, Y -> C
  observe(prefixed(1, "B"));
  observe(query(2, "Y"));
  observe(prefixed(2, "C"));
  ASSERT_TRUE(be->seen.empty());
  observe(query(3, "X")); // prefetches B
  observe(query(4, "Y")); // prefetches C
  ASSERT_EQ(be->seen.size(), 2U);
  EXPECT_EQ(be->seen[0].keys.front(), shared);
  EXPECT_EQ(be->seen[1].keys.front(), shared);
  block_events ev;
  ev.evicted = {shared};
  caf::anon_send(pf, ev);
  sched_->run();
  observe(prefixed(3, "B"));
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 2U);
  EXPECT_EQ(st.wasted, 2U);
  EXPECT_EQ(st.useful, 0U);
}

/// Stands in for a balancer that can serve nothing: answers every process
/// request with errc::unavailable, as the balancer does with no live
/// engine. `asked` counts the requests.
caf::behavior refusing_balancer(caf::event_based_actor*,
                                std::shared_ptr<std::size_t> asked) {
  return {
      [asked](process_atom, const kv_request&) -> caf::result<kv_reply> {
        ++*asked;
        return to_caf_error(error{errc::unavailable, "no engine available"});
      },
      [](listen_atom, const caf::actor&) {},
  };
}

TEST_F(actor_test, AFailedPrefetchIsNeitherOutstandingNorUseful) {
  // The balancer answers B's prefetch with an error: nothing was
  // prefetched. The next prediction of B sends it again (it is not
  // outstanding), and B requested afterwards counts no useful prefetch.
  auto asked = std::make_shared<std::size_t>(0);
  auto b = sys_->spawn(refusing_balancer, asked);
  stop_at_end_.push_back(b);
  auto pf = prefetcher(b);
  auto observe = [&](std::uint64_t session, const std::string& q) {
    observed(pf, query(session, q));
  };
  observe(1, "X"); // X -> B
  observe(1, "B");
  ASSERT_EQ(*asked, 0U);
  observe(2, "X"); // prefetches B: refused
  ASSERT_EQ(*asked, 1U);
  observe(3, "X"); // B is not outstanding: prefetched again, refused again
  EXPECT_EQ(*asked, 2U);
  observe(2, "B");
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 2U);
  EXPECT_EQ(st.failed, 2U);
  EXPECT_EQ(st.useful, 0U);
  EXPECT_EQ(st.wasted, 0U);
}

TEST_F(actor_test, APrefetchThatFailsAfterItsQueryArrivedIsFailedNotUseful) {
  // B's prefetch waits in the balancer's mailbox while B itself is
  // requested; then the balancer answers the prefetch with an error:
  // nothing was prefetched for B, so it counts failed, not useful. (Before,
  // B's request counted it useful and the failure changed nothing.)
  auto asked = std::make_shared<std::size_t>(0);
  auto b = sys_->spawn(refusing_balancer, asked);
  stop_at_end_.push_back(b);
  auto pf = prefetcher(b);
  auto observe = [&](std::uint64_t session, const std::string& q) {
    caf::anon_send(pf, observe_atom::value, query(session, q), kv_reply{},
                   std::int64_t{0});
    run_all_but(*sched_, b);
  };
  observe(1, "X"); // X -> B
  observe(1, "B");
  observe(2, "X"); // prefetches B: held in the balancer's mailbox
  observe(2, "B"); // B requested before the prefetch's answer
  sched_->run();
  ASSERT_EQ(*asked, 1U);
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 1U);
  EXPECT_EQ(st.failed, 1U);
  EXPECT_EQ(st.useful, 0U);
  EXPECT_EQ(st.wasted, 0U);
}

TEST_F(actor_test, APrefetchAnsweredAfterItsQueryArrivedCountsUsefulThen) {
  // The same order with a balancer that serves the prefetch: it is useful,
  // counted at its reply.
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pf = prefetcher(b);
  auto observe = [&](std::uint64_t session, const std::string& q) {
    const auto r = query(session, q);
    caf::anon_send(pf, observe_atom::value, r, found_all(r), std::int64_t{0});
    run_all_but(*sched_, b);
  };
  observe(1, "X");
  observe(1, "B");
  observe(2, "X");
  observe(2, "B");
  auto early = ask<prefetch_stats>(pf, stats_atom::value);
  run_all_but(*sched_, b);
  ASSERT_TRUE(early->value.has_value());
  EXPECT_EQ(early->value->useful, 0U); // not answered yet
  sched_->run();
  ASSERT_EQ(be->seen.size(), 1U);
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 1U);
  EXPECT_EQ(st.useful, 1U);
  EXPECT_EQ(st.failed, 0U);
}

TEST_F(actor_test, APrefetchOnAnEngineThatStopsIsWastedNotUseful) {
  // B is prefetched onto engine 0, which is then killed: B's block goes
  // with its store, which reports no eviction. The balancer tells its
  // listeners the blocks its index gave the engine are gone, so B requested
  // afterwards is a wasted prefetch (the restarted engine computes it
  // again), not a useful one.
  auto b = balancer(routing_policy::least_loaded, {small_engine(64)});
  auto events = std::make_shared<std::vector<block_events>>();
  auto listener = sys_->spawn([events](caf::event_based_actor*) {
    return caf::behavior{
        [events](const block_events& ev) { events->push_back(ev); },
        [](observe_atom, const kv_request&, const kv_reply&, std::int64_t) {},
    };
  });
  stop_at_end_.push_back(listener);
  caf::anon_send(b, listen_atom::value, listener);
  auto pf = prefetcher(b);
  auto observe = [&](std::uint64_t session, const std::string& q) {
    observed(pf, query(session, q));
  };
  observe(1, "X"); // X -> B
  observe(1, "B");
  observe(2, "X"); // prefetches B onto engine 0
  ASSERT_EQ(ask_now<prefetch_stats>(pf, stats_atom::value).issued, 1U);
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  ASSERT_EQ(ask_now<engine_stats>(e0, stats_atom::value).blocks, 1U);
  events->clear();
  caf::anon_send_exit(e0, caf::exit_reason::kill);
  sched_->run();
  sched_->advance_time(100ms); // restart_delay: engine 0 is back, empty
  sched_->run();
  observe(2, "B");
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.useful, 0U);
  EXPECT_EQ(st.wasted, 1U);
  ASSERT_EQ(events->size(), 1U);
  EXPECT_EQ(events->front().engine, 0U);
  EXPECT_TRUE(events->front().stored.empty());
  EXPECT_EQ(events->front().evicted, query(0, "B").keys);
}

TEST_F(actor_test, OnlyTheEngineThatServedAPrefetchWastesItByEvicting) {
  // B's prefetch is served by engine 0 (the fake balancer's). Engine 1
  // evicting B's block (its own copy) wastes nothing, and B requested on
  // engine 0 with its block found is useful. (Before, any engine's
  // eviction wasted it.) Engine 0 evicting it is waste.
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pf = prefetcher(b);
  auto evict = [&](std::uint32_t engine, const std::string& q) {
    block_events ev;
    ev.engine = engine;
    ev.evicted = query(0, q).keys;
    caf::anon_send(pf, ev);
    sched_->run();
  };
  observed(pf, query(1, "X")); // X -> B
  observed(pf, query(1, "B"));
  observed(pf, query(2, "X")); // prefetches B onto engine 0
  ASSERT_EQ(be->seen.size(), 1U);
  evict(1, "B");
  observed(pf, query(2, "B"));
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.useful, 1U);
  EXPECT_EQ(st.wasted, 0U);
  observed(pf, query(3, "X")); // prefetches B again
  evict(0, "B");
  st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 2U);
  EXPECT_EQ(st.useful, 1U);
  EXPECT_EQ(st.wasted, 1U);
}

TEST_F(actor_test, APrefetchIsUsefulOnlyIfItsQueryFoundTheBlocks) {
  // B is prefetched onto engine 0; its request is then served by engine 1
  // (the router sent it elsewhere), or by engine 0 computing the block
  // again: either way the prefetch did not serve it, so it is wasted.
  // (Before, any request of B counted it useful.)
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto pf = prefetcher(b);
  observed(pf, query(1, "X")); // X -> B
  observed(pf, query(1, "B"));
  observed(pf, query(2, "X")); // prefetches B onto engine 0
  auto elsewhere = found_all(query(2, "B"));
  elsewhere.engine = 1;
  observed(pf, query(2, "B"), elsewhere);
  observed(pf, query(3, "X")); // again
  auto computed = found_all(query(3, "B"));
  computed.matched_blocks = 0;
  computed.computed_blocks = 1;
  observed(pf, query(3, "B"), computed);
  observed(pf, query(4, "X")); // again, and found this time
  observed(pf, query(4, "B"));
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 3U);
  EXPECT_EQ(st.wasted, 2U);
  EXPECT_EQ(st.useful, 1U);
}

/// Records the observations a cache or balancer reports.
struct observations {
  std::vector<std::pair<kv_request, kv_reply>> seen;
};

caf::behavior observation_recorder(caf::event_based_actor*,
                                   std::shared_ptr<observations> out) {
  return {
      [out](observe_atom, const kv_request& req, const kv_reply& rep,
            std::int64_t) { out->seen.emplace_back(req, rep); },
  };
}

TEST_F(actor_test, QueryCacheReportsWhatItAnswersWithoutTheBalancer) {
  // Its listeners hear of a hit and of a request that joined another's
  // computation without going itself; not of a request it sent to the
  // balancer (which reports those). Subscribing twice changes nothing.
  const cache_over_fake f(*sys_, stop_at_end_);
  auto out = std::make_shared<observations>();
  auto rec = sys_->spawn(observation_recorder, out);
  stop_at_end_.push_back(rec);
  caf::anon_send(f.cache, listen_atom::value, rec);
  caf::anon_send(f.cache, listen_atom::value, rec);
  sched_->run();
  auto first = query(1, "q");
  first.id = 1;
  auto joiner = query(2, "q");
  joiner.id = 2;
  auto r1 = ask<kv_reply>(f.cache, query_atom::value, first);
  run_all_but(*sched_, f.balancer);
  auto r2 = ask<kv_reply>(f.cache, query_atom::value, joiner);
  run_all_but(*sched_, f.balancer);
  sched_->run();
  ASSERT_TRUE(r1->value && r2->value);
  ASSERT_EQ(out->seen.size(), 1U);
  EXPECT_EQ(out->seen[0].first.id, 2U);
  EXPECT_EQ(out->seen[0].first.session, 2U);
  EXPECT_EQ(out->seen[0].second.id, 2U);
  EXPECT_FALSE(out->seen[0].second.from_query_cache);
  auto hit = query(3, "q");
  hit.id = 3;
  EXPECT_TRUE(
      ask_now<kv_reply>(f.cache, query_atom::value, hit).from_query_cache);
  ASSERT_EQ(out->seen.size(), 2U);
  EXPECT_EQ(out->seen[1].first.id, 3U);
  EXPECT_TRUE(out->seen[1].second.from_query_cache);
  // A listener that goes is forgotten: the next hit is sent to nobody.
  caf::anon_send_exit(rec, caf::exit_reason::user_shutdown);
  sched_->run();
  EXPECT_TRUE(
      ask_now<kv_reply>(f.cache, query_atom::value, hit).from_query_cache);
  EXPECT_EQ(out->seen.size(), 2U);
}

TEST_F(actor_test, AWaiterAnsweredByAnothersRequestBeforeItsOwnIsJoined) {
  // A low-priority request of "q" goes to the balancer; a high-priority one
  // of "q" arrives before it is answered and goes too, as urgent, and its
  // reply answers both. The first got another request's work: joined (so a
  // prefetch overtaken so counts cached, not judged against a user's
  // computation; before, only a waiter that sent nothing was joined).
  const cache_over_fake f(*sys_, stop_at_end_);
  const auto low = query_at(1, "q", engine::priority::low);
  const auto high = query_at(2, "q", engine::priority::high);
  auto r1 = ask<kv_reply>(f.cache, query_atom::value, low);
  run_all_but(*sched_, f.balancer);
  auto r2 = ask<kv_reply>(f.cache, query_atom::value, high);
  run_all_but(*sched_, f.balancer);
  sched_->run();
  ASSERT_TRUE(r1->value && r2->value);
  ASSERT_EQ(f.be->seen.size(), 2U);
  EXPECT_EQ(f.be->seen[0].id, 2U) << "the urgent one first";
  EXPECT_TRUE(r1->value->joined);
  EXPECT_FALSE(r2->value->joined);
  EXPECT_EQ(r1->value->id, 1U);
}

TEST_F(actor_test, WithACacheInFrontThePrefetcherLearnsFromHitsAndSkipsCached) {
  // X and B are served once (misses; the fake balancer reports nothing),
  // then again as hits, which the cache reports: the prefetcher learns
  // X -> B from them. X's next hit predicts B, whose prefetch goes through
  // the cache and is answered from its store: cached, no engine work.
  // (Before, cache hits never reached the prefetcher: it learned nothing.)
  const cache_over_fake f(*sys_, stop_at_end_);
  auto pf = prefetcher(f.balancer, eager_prefetch(), f.cache);
  auto ask_cache = [&](std::uint64_t session, const std::string& q) {
    return ask_now<kv_reply>(f.cache, query_atom::value, query(session, q));
  };
  EXPECT_FALSE(ask_cache(1, "X").from_query_cache);
  EXPECT_FALSE(ask_cache(1, "B").from_query_cache);
  EXPECT_TRUE(ask_cache(2, "X").from_query_cache);
  EXPECT_TRUE(ask_cache(2, "B").from_query_cache);
  ASSERT_EQ(f.be->seen.size(), 2U);
  EXPECT_TRUE(ask_cache(3, "X").from_query_cache); // predicts B: cached
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.observed, 3U);
  EXPECT_EQ(st.issued, 1U);
  EXPECT_EQ(st.cached, 1U);
  EXPECT_EQ(st.useful + st.wasted + st.failed, 0U);
  EXPECT_EQ(f.be->seen.size(), 2U); // the balancer saw no prefetch
}

TEST_F(actor_test, APrefetchComputedThroughTheCacheIsUsefulWhenItsQueryHits) {
  // X -> B is learned from the balancer's reports (sent here by hand). B's
  // result is not cached: its prefetch goes through the cache, is computed
  // and stored, and B's request is then answered from the cache: the
  // prefetch computed what it got, useful. A prefetch whose blocks only
  // reached an engine (no cache) and whose query the cache answers would
  // be wasted.
  const cache_over_fake f(*sys_, stop_at_end_);
  auto pf = prefetcher(f.balancer, eager_prefetch(), f.cache);
  observed(pf, query(1, "X"));
  observed(pf, query(1, "B"));
  observed(pf, query(2, "X")); // prefetches B through the cache
  ASSERT_EQ(f.be->seen.size(), 1U);
  EXPECT_TRUE(f.be->seen[0].prefetch);
  EXPECT_EQ(f.be->seen[0].query, "B");
  EXPECT_TRUE(ask_now<kv_reply>(f.cache, query_atom::value, query(2, "B"))
                  .from_query_cache);
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 1U);
  EXPECT_EQ(st.useful, 1U);
  EXPECT_EQ(st.wasted, 0U);
}

TEST_F(actor_test,
       APrefetchThroughTheCacheThatWasNotStoredIsJudgedByItsEngine) {
  // B's prefetch goes through the cache, and the engine could not cache
  // its block (uncached): the cache stores no such reply, so only the
  // engine holds what the prefetch did, and that engine evicting B's block
  // wastes it, as for a prefetch sent to the balancer. (Before, the
  // prefetcher took the reply as stored in the cache and ignored the
  // eviction: the prefetch stayed outstanding.)
  const cache_over_fake f(*sys_, stop_at_end_);
  f.be->uncached = 1;
  auto pf = prefetcher(f.balancer, eager_prefetch(), f.cache);
  observed(pf, query(1, "X"));
  observed(pf, query(1, "B"));
  observed(pf, query(2, "X")); // prefetches B through the cache
  ASSERT_EQ(f.be->seen.size(), 1U);
  EXPECT_TRUE(f.be->seen[0].prefetch);
  block_events ev;
  ev.evicted = query(0, "B").keys;
  caf::anon_send(pf, ev);
  sched_->run();
  auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 1U);
  EXPECT_EQ(st.wasted, 1U);
  EXPECT_EQ(st.outstanding, 0U);
}

TEST_F(actor_test, AUserWhoJoinedAPrefetchInTheCacheMakesItUseful) {
  // B's prefetch is on its way through the cache (held at the balancer)
  // when B is asked twice: the first user sends its own request (normal is
  // above the prefetch's low), the second joins. The prefetch's reply comes
  // back first and answers all three: both users got what the prefetch
  // computed. The cache reports the joined user to the prefetcher with the
  // prefetch's reply (joined): useful. (Before, that reply was judged as an
  // engine's answer to the user, matching none of the blocks the prefetch
  // had found: wasted.)
  const cache_over_fake f(*sys_, stop_at_end_);
  auto pf = prefetcher(f.balancer, eager_prefetch(), f.cache);
  observed(pf, query(1, "X")); // X -> B
  observed(pf, query(1, "B"));
  const auto x = query(2, "X");
  caf::anon_send(pf, observe_atom::value, x, found_all(x), std::int64_t{0});
  run_all_but(*sched_, f.balancer); // the prefetch of B waits there
  auto first = query(3, "B");
  first.id = 31;
  auto second = query(4, "B");
  second.id = 41;
  auto r1 = ask<kv_reply>(f.cache, query_atom::value, first);
  run_all_but(*sched_, f.balancer);
  auto r2 = ask<kv_reply>(f.cache, query_atom::value, second);
  run_all_but(*sched_, f.balancer);
  sched_->run();
  ASSERT_TRUE(r1->value && r2->value);
  ASSERT_EQ(f.be->seen.size(), 2U);
  EXPECT_TRUE(f.be->seen[0].prefetch);
  EXPECT_TRUE(r1->value->joined);
  EXPECT_TRUE(r2->value->joined);
  const auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 1U);
  EXPECT_EQ(st.useful, 1U);
  EXPECT_EQ(st.wasted, 0U);
}

TEST_F(actor_test, APrefetchThatJoinsAUsersRequestInTheCacheCountsCached) {
  // B's own request is on its way through the cache (held at the balancer)
  // when X predicts B: the prefetch joins it in the cache and gets its
  // reply, which computed B's block for the user. The prefetch did no work:
  // cached, not wasted (before, it counted wasted, its query's request
  // having computed the block the prefetch "held").
  auto b = balancer(routing_policy::least_loaded, {small_engine(64)});
  auto cache = spawned(spawn_query_cache(*sys_, query_cache_config{}, b));
  stop_at_end_.push_back(cache);
  auto pf = prefetcher(b, eager_prefetch(), cache);
  observed(pf, query(1, "X")); // X -> B
  observed(pf, query(1, "B"));
  auto user = ask<kv_reply>(cache, query_atom::value, query(2, "B"));
  run_all_but(*sched_, b); // B's miss waits in the balancer's mailbox
  const auto x = query(2, "X");
  caf::anon_send(pf, observe_atom::value, x, found_all(x), std::int64_t{0});
  run_all_but(*sched_, b); // prefetches B: it joins the user's request
  sched_->run();
  ASSERT_TRUE(user->value.has_value());
  EXPECT_EQ(user->value->computed_blocks, 1U);
  EXPECT_FALSE(user->value->joined);
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  EXPECT_EQ(ask_now<engine_stats>(e0, stats_atom::value).requests, 1U);
  const auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 1U);
  EXPECT_EQ(st.cached, 1U);
  EXPECT_EQ(st.wasted, 0U);
  EXPECT_EQ(st.useful, 0U);
}

TEST_F(actor_test, APrefetchWhoseBlocksWereAllCachedIsRedundantNotUseful) {
  // B was served once, so its block is in the engine when X predicts B:
  // the prefetch matches it and computes nothing. B's next request finds
  // the block, but not thanks to the prefetch: redundant, not useful
  // (before, useful). D's prefetch computes D's block: useful when found.
  auto b = balancer(routing_policy::least_loaded, {small_engine(64)});
  auto pf = prefetcher(b);
  observed(pf, query(1, "X")); // X -> B and Y -> D, learned by hand
  observed(pf, query(1, "B"));
  observed(pf, query(2, "Y"));
  observed(pf, query(2, "D"));
  const auto served = [&](std::uint64_t session, const std::string& q) {
    return ask_now<kv_reply>(b, process_atom::value, query(session, q));
  };
  ASSERT_EQ(served(3, "B").computed_blocks, 1U);
  observed(pf, query(4, "X")); // prefetches B: all cached already
  EXPECT_EQ(served(4, "B").matched_blocks, 1U);
  observed(pf, query(5, "Y")); // prefetches D, which computes it
  EXPECT_EQ(served(5, "D").matched_blocks, 1U);
  const auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.issued, 2U);
  EXPECT_EQ(st.redundant, 1U);
  EXPECT_EQ(st.useful, 1U);
  EXPECT_EQ(st.wasted, 0U);
}

TEST_F(actor_test, APrefetchThatBroughtBlocksBackOrWentThroughTheCacheCounts) {
  // Two prefetches that computed nothing but did work: one whose blocks
  // the engine brought back from its disk (promoted_blocks), and one sent
  // through the query cache, which stored its answer for the query. Both
  // are judged when their query comes (useful here), not counted
  // redundant as one that found every block in memory already.
  {
    auto be = std::make_shared<fake_backend>();
    auto promoting = sys_->spawn([be](caf::event_based_actor*) {
      return caf::behavior{
          [be](process_atom, const kv_request& r) {
            be->seen.push_back(r);
            kv_reply rep = found_all(r);
            rep.promoted_blocks = r.keys.size();
            return rep;
          },
          [](listen_atom, const caf::actor&) {},
      };
    });
    stop_at_end_.push_back(promoting);
    auto pf = prefetcher(promoting);
    observed(pf, query(1, "X")); // X -> B, learned by hand
    observed(pf, query(1, "B"));
    observed(pf, query(2, "X")); // prefetches B: back from disk
    ASSERT_EQ(be->seen.size(), 1U);
    observed(pf, query(2, "B")); // found by the engine that answered
    const auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
    EXPECT_EQ(st.issued, 1U);
    EXPECT_EQ(st.redundant, 0U);
    EXPECT_EQ(st.useful, 1U);
  }
  {
    // B is served once by the balancer alone, so its block is in the
    // engine but its result is not in the cache: B's prefetch through
    // the cache computes nothing, and the cache stores its answer, which
    // then answers B's request.
    auto b = balancer(routing_policy::least_loaded, {small_engine(64)});
    auto cache = spawned(spawn_query_cache(*sys_, query_cache_config{}, b));
    stop_at_end_.push_back(cache);
    auto pf = prefetcher(b, eager_prefetch(), cache);
    observed(pf, query(1, "X"));
    observed(pf, query(1, "B"));
    ASSERT_EQ(ask_now<kv_reply>(b, process_atom::value, query(3, "B"))
                  .computed_blocks,
              1U);
    observed(pf, query(4, "X")); // prefetches B through the cache
    EXPECT_TRUE(ask_now<kv_reply>(cache, query_atom::value, query(4, "B"))
                    .from_query_cache);
    const auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
    EXPECT_EQ(st.issued, 1U);
    EXPECT_EQ(st.redundant, 0U);
    EXPECT_EQ(st.useful, 1U);
  }
}

/// Digits grouped by threes with ',' (as en_US does), without needing
/// such a locale installed.
struct grouping_numpunct : std::numpunct<char> {
  char do_thousands_sep() const override { return ','; }
  std::string do_grouping() const override { return "\3"; }
};

TEST(QueryCacheEncoding, RepliesAreWrittenAndReadInTheClassicLocale) {
  // Entries in Redis are shared between processes: a host's global locale
  // must not change how they are written or read.
  const kv_reply rep{0, 3, 1234567, 2, 19753072, 32, false};
  const std::locale grouped(std::locale::classic(), new grouping_numpunct);
  const auto previous = std::locale::global(grouped);
  const auto written = encode_reply(rep);
  kv_reply back_grouped;
  const bool read_grouped = decode_reply(written, back_grouped);
  std::locale::global(previous);
  EXPECT_EQ(written, "v1 3 1234567 2 19753072 32");
  kv_reply back;
  ASSERT_TRUE(decode_reply(written, back)) << written;
  EXPECT_EQ(back, rep);
  EXPECT_TRUE(read_grouped);
  EXPECT_EQ(back_grouped, rep);
}

TEST(QueryCacheEncoding, AnythingButAnEncodedReplyIsNotRead) {
  const kv_reply rep{0, 3, 12, 2, 192, 32, false};
  kv_reply back;
  ASSERT_TRUE(decode_reply(encode_reply(rep), back));
  EXPECT_EQ(back, rep);
  for (const std::string bad :
       {"v1 3 12 2 192", "v1 3 12 2 192 32 7", "v1 3 -12 2 192 32",
        "v1 3 12 2 192 32x", "v1 3 +12 2 192 32", "v1  3 12 2 192 32",
        "v1 3 12 2 192 32 ", "v2 3 12 2 192 32", "v1 4294967296 12 2 192 32",
        "v1 3 18446744073709551616 2 192 32", "", "v1",
        // Well-formed, but no engine wrote them: a slot past
        // router::max_slots (64), counts past a request's uint32 tokens,
        // sums that would overflow.
        "v1 64 12 2 192 32", "v1 99999 12 2 192 32",
        "v1 3 18446744073709551615 2 192 32", "v1 3 12 2 4294967296 0",
        "v1 3 4294967295 1 192 32", "v1 3 12 2 1 18446744073709551615",
        "v1 3 12 2 4294967295 1"}) {
    kv_reply out{9, 9, 9, 9, 9, 9, false};
    EXPECT_FALSE(decode_reply(bad, out)) << '"' << bad << '"';
    EXPECT_EQ(out, (kv_reply{9, 9, 9, 9, 9, 9, false, 0})) << '"' << bad << '"';
  }
  // The largest possible reply is read.
  ASSERT_TRUE(decode_reply("v1 63 4294967295 0 0 4294967295", back));
  EXPECT_EQ(back, (kv_reply{0, 63, 4294967295, 0, 0, 4294967295, false, 0}));
  // No encoding is longer than max_encoded_reply_bytes (the least a Redis
  // store's max_value_bytes may be).
  constexpr auto big = std::numeric_limits<std::uint64_t>::max();
  EXPECT_EQ(encode_reply(kv_reply{0, std::numeric_limits<std::uint32_t>::max(),
                                  big, big, big, big, false, 0})
                .size(),
            max_encoded_reply_bytes);
}

TEST_F(actor_test, AQueryCacheEntryItCannotReadIsAStoreErrorAndRecomputed) {
  auto store = std::make_unique<embedded_query_store>();
  ASSERT_TRUE(store->set("what is kv", "v1 3 -12 2 192 32",
                         std::chrono::hours{1000}, engine::nanos{0}));
  auto [be, fake] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto qcache = spawned(
      spawn_query_cache(*sys_, query_cache_config{}, fake, std::move(store)));
  stop_at_end_.push_back(qcache);
  auto first =
      ask_now<kv_reply>(qcache, query_atom::value, query(1, "what is kv"));
  EXPECT_FALSE(first.from_query_cache);
  EXPECT_EQ(be->seen.size(), 1U);
  auto second =
      ask_now<kv_reply>(qcache, query_atom::value, query(2, "what is kv"));
  EXPECT_TRUE(second.from_query_cache) << "the computed reply replaced it";
  auto st = ask_now<query_cache_stats>(qcache, stats_atom::value);
  EXPECT_EQ(st.store_errors, 1U);
  EXPECT_EQ(st.hits, 1U);
  EXPECT_EQ(st.misses, 1U);
}

TEST_F(actor_test, QueryCacheExpiresEntriesAtTtl) {
  query_cache_config qc;
  qc.ttl = 10s;
  const cache_over_fake f(*sys_, stop_at_end_, qc);
  const auto& be = f.be;
  const auto& qcache = f.cache;
  auto q = query(1, "what is kv");
  auto first = ask_now<kv_reply>(qcache, query_atom::value, q);
  EXPECT_FALSE(first.from_query_cache);
  EXPECT_EQ(be->seen.size(), 1U);
  sched_->advance_time(9s);
  auto second = ask_now<kv_reply>(qcache, query_atom::value, q);
  EXPECT_TRUE(second.from_query_cache);
  EXPECT_EQ(second.computed_blocks, first.computed_blocks);
  EXPECT_EQ(be->seen.size(), 1U);
  sched_->advance_time(1s); // 10 s after the store: expired
  auto third = ask_now<kv_reply>(qcache, query_atom::value, q);
  EXPECT_FALSE(third.from_query_cache);
  EXPECT_EQ(be->seen.size(), 2U);
  auto st = ask_now<query_cache_stats>(qcache, stats_atom::value);
  EXPECT_EQ(st.hits, 1U);
  EXPECT_EQ(st.misses, 2U);
}

TEST_F(actor_test, QueryCacheCoalescesConcurrentMisses) {
  const cache_over_fake f(*sys_, stop_at_end_);
  const auto& be = f.be;
  const auto& qcache = f.cache;
  auto r1 = ask<kv_reply>(qcache, query_atom::value, query(1, "q"));
  auto r2 = ask<kv_reply>(qcache, query_atom::value, query(2, "q"));
  sched_->run();
  EXPECT_TRUE(r1->value && r2->value);
  EXPECT_EQ(be->seen.size(), 1U);
  auto bad = ask<kv_reply>(qcache, query_atom::value, kv_request{});
  sched_->run();
  ASSERT_TRUE(bad->error.has_value());
  EXPECT_EQ(from_caf_error(*bad->error).code, errc::invalid_argument);
}

TEST_F(actor_test, QueryCacheRefusesABadRequestBeforeTheStoreOrAJoin) {
  // A request the engines would refuse is refused by the cache itself: a
  // priority outside the five, and with block_tokens set (a node sets its
  // namespace's) a key count that does not fit its tokens. It is not
  // answered from the store (before, a hit answered it), not sent on, and
  // never the miss that another request of its key joins (before, a good
  // request joined it and got its refusal).
  struct bad_case {
    const char* what;
    std::uint32_t block_tokens;
    void (*edit)(kv_request&);
    errc code;
    const char* message;
  };
  const bad_case cases[] = {
      {"priority", 0,
       [](kv_request& r) { r.prio = static_cast<engine::priority>(9); },
       errc::invalid_argument, "priority 9"},
      {"misaligned", 16,
       [](kv_request& r) {
         r.input_tokens = 20;               // one full block, but...
         r.keys.push_back(block_key{7, 7}); // ...two keys
       },
       errc::misaligned_tokens, "2 block keys for a prompt of 20 tokens"},
      // A key no block can have, block_tokens known or not.
      {"repeated key", 0,
       [](kv_request& r) {
         r.input_tokens = 32;
         r.keys.push_back(r.keys.back());
       },
       errc::invalid_argument, "a block cannot be its own parent"},
      {"all-zero key", 16, [](kv_request& r) { r.keys.back() = block_key{}; },
       errc::invalid_argument, "all-zero block key"},
  };
  for (const auto& bc : cases) {
    query_cache_config qc;
    qc.block_tokens = bc.block_tokens;
    const cache_over_fake f(*sys_, stop_at_end_, qc);
    auto bad_req = query(1, "q");
    bc.edit(bad_req);
    const auto refused = [&](const kv_request& r) {
      auto reply = ask<kv_reply>(f.cache, query_atom::value, r);
      sched_->run();
      EXPECT_TRUE(reply->error.has_value()) << bc.what;
      if (reply->error) {
        const auto e = from_caf_error(*reply->error);
        EXPECT_EQ(e.code, bc.code) << bc.what;
        EXPECT_NE(e.message.find(bc.message), std::string::npos) << e.message;
      }
    };
    refused(bad_req);
    EXPECT_TRUE(f.be->seen.empty()) << bc.what << ": the bad request went on";
    // Sent just before a good request of the same key: the good one is the
    // miss, computed for itself.
    auto bad = ask<kv_reply>(f.cache, query_atom::value, bad_req);
    auto good = ask<kv_reply>(f.cache, query_atom::value, query(2, "q"));
    sched_->run();
    ASSERT_TRUE(bad->error.has_value()) << bc.what;
    ASSERT_TRUE(good->value.has_value()) << bc.what;
    EXPECT_FALSE(good->value->from_query_cache);
    EXPECT_EQ(f.be->seen.size(), 1U) << bc.what;
    // Now "q" is stored: the bad request still gets no hit.
    refused(bad_req);
    auto st = ask_now<query_cache_stats>(f.cache, stats_atom::value);
    EXPECT_EQ(st.hits, 0U) << bc.what;
    EXPECT_EQ(st.misses, 1U) << bc.what;
    EXPECT_EQ(st.coalesced, 0U) << bc.what;
  }
}

/// An embedded store that counts its calls in `gets` and `sets`, which the
/// test keeps (the cache owns the store).
struct counting_store final : query_store {
  struct calls {
    std::size_t gets = 0;
    std::size_t sets = 0;
  };
  explicit counting_store(std::shared_ptr<calls> c) : counts(std::move(c)) {}
  result<std::optional<std::string>> get(const std::string& key,
                                         engine::nanos now) override {
    ++counts->gets;
    return inner.get(key, now);
  }
  result<void> set(const std::string& key, const std::string& value,
                   engine::nanos ttl, engine::nanos now) override {
    ++counts->sets;
    return inner.set(key, value, ttl, now);
  }
  std::shared_ptr<calls> counts;
  embedded_query_store inner;
};

TEST_F(actor_test, QueryCacheJoinersOfAMissOnItsWayDoNotReadTheStore) {
  // The miss of "q" waits in the balancer's mailbox while two more
  // requests of "q" arrive: they join it without a GET of their own (with
  // Redis, a round trip each). Once it is answered and stored, the next
  // request reads the store and hits. (Before, each joiner read the store
  // first: three GETs.)
  auto calls = std::make_shared<counting_store::calls>();
  const cache_over_fake f(*sys_, stop_at_end_, query_cache_config{},
                          std::make_unique<counting_store>(calls));
  auto r1 = ask<kv_reply>(f.cache, query_atom::value, query(1, "q"));
  run_all_but(*sched_, f.balancer);
  auto r2 = ask<kv_reply>(f.cache, query_atom::value, query(2, "q"));
  auto r3 = ask<kv_reply>(f.cache, query_atom::value, query(3, "q"));
  run_all_but(*sched_, f.balancer);
  EXPECT_EQ(calls->gets, 1U);
  EXPECT_TRUE(f.be->seen.empty());
  sched_->run();
  for (const auto* r : {&r1, &r2, &r3}) {
    ASSERT_TRUE((*r)->value.has_value());
    EXPECT_FALSE((*r)->value->from_query_cache);
  }
  EXPECT_EQ(f.be->seen.size(), 1U);
  EXPECT_EQ(calls->gets, 1U);
  EXPECT_EQ(calls->sets, 1U);
  auto hit = ask_now<kv_reply>(f.cache, query_atom::value, query(4, "q"));
  EXPECT_TRUE(hit.from_query_cache);
  EXPECT_EQ(calls->gets, 2U);
  auto st = ask_now<query_cache_stats>(f.cache, stats_atom::value);
  EXPECT_EQ(st.misses, 3U);
  EXPECT_EQ(st.coalesced, 2U);
  EXPECT_EQ(st.hits, 1U);
}

TEST_F(actor_test, QueryCacheSendsAHigherPriorityWaiterItsOwnRequest) {
  // A low-priority miss of "q" waits in the balancer's mailbox behind
  // other traffic; a critical request of "q" joins it. The cache sends the
  // critical one too (urgent, so it overtakes), answers both callers with
  // the first reply and ignores the second.
  const cache_over_fake f(*sys_, stop_at_end_);
  const auto& be = f.be;
  const auto& b = f.balancer;
  const auto& qcache = f.cache;
  const auto low = query_at(1, "q", engine::priority::low);
  const auto crit = query_at(2, "q", engine::priority::critical);
  auto r1 = ask<kv_reply>(qcache, query_atom::value, low);
  run_all_but(*sched_, b);
  auto r2 = ask<kv_reply>(qcache, query_atom::value, crit);
  // A later normal request of "q" only waits: a critical one is on its way.
  auto normal = query(3, "q");
  normal.id = 3;
  auto r3 = ask<kv_reply>(qcache, query_atom::value, normal);
  run_all_but(*sched_, b);
  ASSERT_TRUE(be->seen.empty());
  sched_->run();
  ASSERT_EQ(be->seen.size(), 2U);
  EXPECT_EQ(be->seen[0].id, 2U);
  EXPECT_EQ(be->seen[0].prio, engine::priority::critical);
  EXPECT_EQ(be->seen[1].id, 1U);
  for (std::uint64_t id = 1; id <= 3; ++id) {
    const auto& r = id == 1 ? r1 : id == 2 ? r2 : r3;
    ASSERT_TRUE(r->value.has_value()) << id;
    EXPECT_EQ(r->value->id, id);
    EXPECT_FALSE(r->value->from_query_cache);
  }
  auto st = ask_now<query_cache_stats>(qcache, stats_atom::value);
  EXPECT_EQ(st.misses, 3U);
  EXPECT_EQ(st.coalesced, 2U);
  // The late reply changed nothing; the next request is a hit.
  auto hit = ask_now<kv_reply>(qcache, query_atom::value, query(4, "q"));
  EXPECT_TRUE(hit.from_query_cache);
  EXPECT_EQ(be->seen.size(), 2U);
}

/// Process requests a cued_balancer keeps, each with its promise.
struct cued_calls {
  std::vector<std::pair<kv_request, caf::response_promise>> calls;
};

/// A balancer that holds every process request until told (ready_atom,
/// index, fail) to answer the index-th: with an error (fail) or a reply.
caf::behavior cued_balancer(caf::event_based_actor* self,
                            std::shared_ptr<cued_calls> h) {
  return {
      [=](process_atom, const kv_request& r) -> caf::result<kv_reply> {
        auto rp = self->make_response_promise();
        h->calls.emplace_back(r, rp);
        return rp;
      },
      [=](ready_atom, std::uint64_t i, bool fail) {
        auto& c = h->calls.at(i);
        if (fail)
          c.second.deliver(caf::make_error(caf::sec::request_timeout));
        else
          c.second.deliver(kv_reply{c.first.id, 0, 0, 1, 0, 16, false, 0});
      },
      [](listen_atom, const caf::actor&) {},
  };
}

/// A query cache in front of a cued_balancer whose calls are `calls`; both
/// stop at the test's end.
struct cache_over_cued {
  std::shared_ptr<cued_calls> calls = std::make_shared<cued_calls>();
  caf::actor balancer;
  caf::actor cache;

  cache_over_cued(caf::actor_system& sys,
                  std::vector<caf::actor>& stop_at_end) {
    balancer = sys.spawn(cued_balancer, calls);
    stop_at_end.push_back(balancer);
    cache = spawned(spawn_query_cache(sys, query_cache_config{}, balancer));
    stop_at_end.push_back(cache);
  }
};

TEST_F(actor_test, AHighPriorityJoinerGoesItselfWhenTheOneSentBeforeFailed) {
  // Low, then critical (sent too); the critical one fails. A new critical
  // request of the key then waited behind the low one: the cache still
  // counted the failed critical request as on its way.
  const cache_over_cued f(*sys_, stop_at_end_);
  const auto& h = f.calls;
  const auto& b = f.balancer;
  const auto& qc = f.cache;
  const auto req = [](std::uint64_t id, engine::priority p) {
    auto r = query(id, "k");
    r.id = id;
    r.prio = p;
    return r;
  };
  auto r1 = ask<kv_reply>(qc, query_atom::value, req(1, engine::priority::low));
  sched_->run();
  auto r2 =
      ask<kv_reply>(qc, query_atom::value, req(2, engine::priority::critical));
  sched_->run();
  ASSERT_EQ(h->calls.size(), 2U);
  caf::anon_send(b, ready_atom::value, std::uint64_t{1}, true);
  sched_->run();
  EXPECT_FALSE(r2->value || r2->error); // the low one may still answer it
  auto r3 =
      ask<kv_reply>(qc, query_atom::value, req(3, engine::priority::critical));
  sched_->run();
  ASSERT_EQ(h->calls.size(), 3U) << "the critical joiner waited behind low";
  EXPECT_EQ(h->calls[2].first.prio, engine::priority::critical);
  caf::anon_send(b, ready_atom::value, std::uint64_t{2}, false);
  sched_->run();
  for (const auto& r : {r1, r2, r3})
    EXPECT_TRUE(r->value.has_value());
  caf::anon_send(b, ready_atom::value, std::uint64_t{0}, false); // late
  sched_->run();
}

TEST_F(actor_test, AJoinerIsNotAnsweredWithAnotherCallersTimeout) {
  // Four requests of "k" join one miss, whatever their deadlines (ten
  // callers with deadlines each later than the last still make one
  // request). It times out at 2 ms, at its caller's 1 ms deadline:
  // requests 1 and 2 (0.5 ms) get the timeout; 3 (none) and 4 (4 ms) get
  // one more request, with no deadline, whose reply answers them.
  // (Before, every waiter got the first request's timeout.) A miss sent
  // without a deadline ends at the balancer's own timeout, which its
  // waiters' own requests would meet too: no retry
  // (AQueryCacheMissEndsAtTheBalancersDeadlineOnly).
  const cache_over_cued f(*sys_, stop_at_end_);
  const auto& h = f.calls;
  const auto& b = f.balancer;
  const auto& qc = f.cache;
  const auto base = std::chrono::duration_cast<engine::nanos>(
                        sched_->clock().now().time_since_epoch())
                        .count();
  const auto req = [&](std::uint64_t id, std::int64_t after_ns) {
    auto r = query_at(id, "k", engine::priority::normal);
    r.deadline_ns = after_ns == 0 ? 0 : base + after_ns;
    return r;
  };
  const std::int64_t ms = 1'000'000;
  auto r1 = ask<kv_reply>(qc, query_atom::value, req(1, ms));
  auto r2 = ask<kv_reply>(qc, query_atom::value, req(2, ms / 2));
  auto r3 = ask<kv_reply>(qc, query_atom::value, req(3, 0));
  auto r4 = ask<kv_reply>(qc, query_atom::value, req(4, 4 * ms));
  sched_->run();
  ASSERT_EQ(h->calls.size(), 1U);
  sched_->advance_time(2ms);
  caf::anon_send(b, ready_atom::value, std::uint64_t{0}, true); // times out
  sched_->run();
  for (const auto& r : {r1, r2}) {
    ASSERT_TRUE(r->error.has_value());
    EXPECT_TRUE(is_timeout(*r->error));
  }
  for (const auto& r : {r3, r4})
    EXPECT_FALSE(r->value || r->error) << "a request is on its way for it";
  ASSERT_EQ(h->calls.size(), 2U);
  EXPECT_EQ(h->calls[1].first.id, 3U);
  EXPECT_EQ(h->calls[1].first.deadline_ns, 0);
  caf::anon_send(b, ready_atom::value, std::uint64_t{1}, false);
  sched_->run();
  for (const auto& r : {r3, r4}) {
    ASSERT_TRUE(r->value.has_value());
    EXPECT_EQ(r->value->computed_tokens, 16U);
  }
  auto st = ask_now<query_cache_stats>(qc, stats_atom::value);
  EXPECT_EQ(st.misses, 4U);
  EXPECT_EQ(st.coalesced, 3U);

  // Once per waiter, not per round: "n" from a caller with a deadline at
  // 3 ms and one at 10 ms; the first times out at 4 ms, so one more goes
  // for the second (10 ms). A caller with no deadline joins that one; when
  // it times out at 11 ms, the second gets the timeout (it had its one
  // more request) and the third a request of its own.
  const auto n = [&](std::uint64_t id, std::int64_t after_ns) {
    auto r = query_at(id, "n", engine::priority::normal);
    r.deadline_ns = after_ns == 0 ? 0 : base + after_ns;
    return r;
  };
  auto n1 = ask<kv_reply>(qc, query_atom::value, n(11, 3 * ms));
  auto n2 = ask<kv_reply>(qc, query_atom::value, n(12, 10 * ms));
  sched_->run();
  ASSERT_EQ(h->calls.size(), 3U);
  sched_->advance_time(2ms); // 4 ms
  caf::anon_send(b, ready_atom::value, std::uint64_t{2}, true);
  sched_->run();
  ASSERT_TRUE(n1->error.has_value());
  ASSERT_EQ(h->calls.size(), 4U);
  EXPECT_EQ(h->calls[3].first.id, 12U);
  EXPECT_EQ(h->calls[3].first.deadline_ns, base + 10 * ms);
  auto n3 = ask<kv_reply>(qc, query_atom::value, n(13, 0));
  sched_->run();
  ASSERT_EQ(h->calls.size(), 4U) << "it joins";
  sched_->advance_time(7ms); // 11 ms
  caf::anon_send(b, ready_atom::value, std::uint64_t{3}, true);
  sched_->run();
  ASSERT_TRUE(n2->error.has_value());
  EXPECT_TRUE(is_timeout(*n2->error));
  EXPECT_FALSE(n3->value || n3->error);
  ASSERT_EQ(h->calls.size(), 5U);
  EXPECT_EQ(h->calls[4].first.id, 13U);
  EXPECT_EQ(h->calls[4].first.deadline_ns, 0);
  caf::anon_send(b, ready_atom::value, std::uint64_t{4}, false);
  sched_->run();
  ASSERT_TRUE(n3->value.has_value());

  // Callers with deadlines each later than the last: one request. The
  // balancer times it out before its caller's deadline (its own
  // request_timeout, which the others' own requests would meet too):
  // every caller gets the timeout, with no request sent again.
  std::vector<std::shared_ptr<outcome<kv_reply>>> many;
  for (std::uint64_t i = 0; i < 10; ++i) {
    auto r = query_at(20 + i, "m", engine::priority::normal);
    r.deadline_ns = base + 100 * ms + static_cast<std::int64_t>(i) * ms;
    many.push_back(ask<kv_reply>(qc, query_atom::value, r));
  }
  sched_->run();
  ASSERT_EQ(h->calls.size(), 6U);
  caf::anon_send(b, ready_atom::value, std::uint64_t{5}, true);
  sched_->run();
  EXPECT_EQ(h->calls.size(), 6U);
  for (const auto& r : many) {
    ASSERT_TRUE(r->error.has_value());
    EXPECT_TRUE(is_timeout(*r->error));
  }
}

TEST_F(actor_test, QueryCacheCallersHearBackWhenTheCacheStops) {
  // Two callers wait on one miss held by an engine's 10 s batch; the cache
  // is killed: both get request_receiver_down, not silence.
  auto b = balancer(routing_policy::round_robin, {small_engine(64, 20, 10s)});
  auto qcache = spawned(spawn_query_cache(*sys_, query_cache_config{}, b));
  sched_->run();
  auto r1 = ask<kv_reply>(qcache, query_atom::value, query(1, "q"));
  auto r2 = ask<kv_reply>(qcache, query_atom::value, query(2, "q"));
  auto pinned = query(3, "q"); // sent on its own
  pinned.pin = true;
  auto r3 = ask<kv_reply>(qcache, query_atom::value, pinned);
  sched_->run();
  ASSERT_FALSE(r1->done() || r2->done() || r3->done());
  caf::anon_send_exit(qcache, caf::exit_reason::kill);
  sched_->run();
  for (const auto& r : {r1, r2, r3}) {
    ASSERT_TRUE(r->error.has_value());
    EXPECT_EQ(*r->error, caf::sec::request_receiver_down);
  }
}

TEST_F(actor_test, AQueryCacheMissEndsAtTheBalancersDeadlineOnly) {
  // The cache sets no timer of its own: a miss whose engine does not answer
  // ends when the balancer times it out (here after 40 s, later than the
  // 30 s the cache used to set itself), and the key is asked for again
  // afterwards.
  auto b =
      balancer(routing_policy::round_robin, {small_engine(64, 2, 100s)}, 40s);
  auto qcache = spawned(spawn_query_cache(*sys_, query_cache_config{}, b));
  stop_at_end_.push_back(qcache);
  sched_->run();
  auto r1 = ask<kv_reply>(qcache, query_atom::value, query(1, "q"));
  auto r2 = ask<kv_reply>(qcache, query_atom::value, query(2, "q"));
  sched_->run();
  sched_->advance_time(39s);
  sched_->run();
  EXPECT_FALSE(r1->done() || r2->done());
  sched_->advance_time(1s); // the balancer's deadline
  sched_->run();
  for (const auto& r : {r1, r2}) {
    ASSERT_TRUE(r->error.has_value());
    EXPECT_TRUE(is_timeout(*r->error)) << to_string(*r->error);
  }
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).timeouts, 1U);
  // Nothing of the failed miss waits on: the next request of "q" goes to
  // the balancer again (and closes the engine's batch of two).
  auto r3 = ask_now<kv_reply>(qcache, query_atom::value, query(3, "q"));
  EXPECT_FALSE(r3.from_query_cache);
  auto st = ask_now<query_cache_stats>(qcache, stats_atom::value);
  EXPECT_EQ(st.misses, 3U);
  EXPECT_EQ(st.coalesced, 1U);
}

/// Stands in for the balancer and answers nothing until told to: holds
/// every process request, like an engine batch that never closes by
/// itself, and answers them all at (close_batch_atom). `held` counts them.
caf::behavior holding_balancer(caf::event_based_actor* self,
                               std::shared_ptr<std::size_t> held) {
  auto promises = std::make_shared<
      std::vector<std::pair<kv_request, caf::response_promise>>>();
  return {
      [=](process_atom, const kv_request& r) -> caf::result<kv_reply> {
        auto p = self->make_response_promise();
        promises->emplace_back(r, p);
        ++*held;
        return p;
      },
      [=](close_batch_atom) {
        for (auto& [r, p] : *promises)
          p.deliver(
              kv_reply{r.id, 0, 0, r.keys.size(), 0, r.input_tokens, false, 0});
        promises->clear();
      },
      [](listen_atom, const caf::actor&) {},
  };
}

/// A query cache in front of a holding_balancer, which counts the
/// requests it holds in `*held`; both stop at the test's end.
struct cache_over_holding {
  std::shared_ptr<std::size_t> held = std::make_shared<std::size_t>(0);
  caf::actor balancer;
  caf::actor cache;

  cache_over_holding(caf::actor_system& sys,
                     std::vector<caf::actor>& stop_at_end) {
    balancer = sys.spawn(holding_balancer, held);
    stop_at_end.push_back(balancer);
    cache = spawned(spawn_query_cache(sys, query_cache_config{}, balancer));
    stop_at_end.push_back(cache);
  }
};

TEST_F(actor_test, AQueryCacheRequestThatPinsAlwaysReachesTheBalancer) {
  // "q" is stored; a request of "q" that pins its blocks still goes to the
  // balancer (a stored reply pinned nothing), and so does one that finds a
  // miss of "q" on its way (that request does not pin). Each gets its own
  // reply; the others of the key are answered as before.
  const cache_over_holding f(*sys_, stop_at_end_);
  const auto& held = f.held;
  const auto& b = f.balancer;
  const auto& qcache = f.cache;
  sched_->run();
  auto stored = ask<kv_reply>(qcache, query_atom::value, query(1, "q"));
  sched_->run();
  caf::anon_send(b, close_batch_atom::value);
  sched_->run();
  ASSERT_TRUE(stored->value.has_value());
  auto pinned = query(2, "q");
  pinned.id = 2;
  pinned.pin = true;
  auto r1 = ask<kv_reply>(qcache, query_atom::value, pinned);
  sched_->run();
  EXPECT_EQ(*held, 2U); // not answered from the store
  EXPECT_FALSE(r1->done());
  auto miss = query(3, "p");
  miss.id = 3;
  auto r2 = ask<kv_reply>(qcache, query_atom::value, miss);
  auto pinned_p = query(4, "p");
  pinned_p.id = 4;
  pinned_p.pin = true;
  auto r3 = ask<kv_reply>(qcache, query_atom::value, pinned_p);
  sched_->run();
  EXPECT_EQ(*held, 4U); // the pinning one did not wait on the miss
  caf::anon_send(b, close_batch_atom::value);
  sched_->run();
  for (std::uint64_t id = 2; id <= 4; ++id) {
    const auto& r = id == 2 ? r1 : id == 3 ? r2 : r3;
    ASSERT_TRUE(r->value.has_value()) << id;
    EXPECT_EQ(r->value->id, id);
    EXPECT_FALSE(r->value->from_query_cache);
  }
  auto st = ask_now<query_cache_stats>(qcache, stats_atom::value);
  EXPECT_EQ(st.misses, 4U);
  EXPECT_EQ(st.coalesced, 0U);
  EXPECT_EQ(st.hits, 0U);
  // A request that does not pin is a hit again.
  auto hit = ask_now<kv_reply>(qcache, query_atom::value, query(5, "p"));
  EXPECT_TRUE(hit.from_query_cache);
}

TEST_F(actor_test, QueryCacheDoesNotStoreAReplyWithUncachedBlocks) {
  // The engine computed q's block but could not cache it (its pool full of
  // pinned blocks, say): the caller gets the reply, and it is not stored,
  // so q's next request reaches an engine again. (Before, it was a hit for
  // the whole TTL, and no engine ever cached the block.) A reply of cached
  // blocks is stored as before.
  const cache_over_fake f(*sys_, stop_at_end_);
  f.be->uncached = 1;
  auto first = ask_now<kv_reply>(f.cache, query_atom::value, query(1, "q"));
  EXPECT_EQ(first.uncached_blocks, 1U);
  EXPECT_FALSE(first.from_query_cache);
  f.be->uncached = 0;
  auto second = ask_now<kv_reply>(f.cache, query_atom::value, query(2, "q"));
  EXPECT_FALSE(second.from_query_cache);
  EXPECT_EQ(f.be->seen.size(), 2U);
  auto third = ask_now<kv_reply>(f.cache, query_atom::value, query(3, "q"));
  EXPECT_TRUE(third.from_query_cache);
  EXPECT_EQ(f.be->seen.size(), 2U);
  auto st = ask_now<query_cache_stats>(f.cache, stats_atom::value);
  EXPECT_EQ(st.hits, 1U);
  EXPECT_EQ(st.misses, 2U);
  EXPECT_EQ(st.store_errors, 0U);
}

TEST_F(actor_test, QueryCacheAnswersAQueryKeyOnlyWithAReplyOfItsBlockCount) {
  // "q" of 2 blocks is stored. "q" of 1 block (another prompt under the
  // same key) is a miss, computed, and its reply replaces the entry. (Before,
  // it was a hit saying 2 blocks, and its own block was never computed.)
  // With "p" of 2 blocks on its way, "p" of 1 block does not join it: it
  // goes on its own and gets its own reply; one of 2 blocks joins.
  const cache_over_holding f(*sys_, stop_at_end_);
  const auto& held = f.held;
  const auto& b = f.balancer;
  const auto& qcache = f.cache;
  sched_->run();
  const auto two_blocks = [](std::uint64_t id, const std::string& q) {
    auto r = query(id, q);
    r.id = id;
    r.keys.push_back(block_key{r.keys[0].hi, 2});
    r.input_tokens = 32;
    return r;
  };
  const auto one_block = [](std::uint64_t id, const std::string& q) {
    auto r = query(id, q);
    r.id = id;
    return r;
  };
  const auto answered = [&](const kv_request& r) {
    auto out = ask<kv_reply>(qcache, query_atom::value, r);
    sched_->run();
    caf::anon_send(b, close_batch_atom::value);
    sched_->run();
    EXPECT_TRUE(out->value.has_value());
    return out->value.value_or(kv_reply{});
  };
  EXPECT_EQ(answered(two_blocks(1, "q")).computed_blocks, 2U);
  const auto one = answered(one_block(2, "q"));
  EXPECT_FALSE(one.from_query_cache);
  EXPECT_EQ(one.computed_blocks, 1U);
  EXPECT_EQ(*held, 2U);
  const auto hit = answered(one_block(3, "q"));
  EXPECT_TRUE(hit.from_query_cache);
  EXPECT_EQ(hit.computed_blocks, 1U);
  EXPECT_EQ(*held, 2U);

  auto p2 = ask<kv_reply>(qcache, query_atom::value, two_blocks(4, "p"));
  auto p1 = ask<kv_reply>(qcache, query_atom::value, one_block(5, "p"));
  auto p2_again = ask<kv_reply>(qcache, query_atom::value, two_blocks(6, "p"));
  sched_->run();
  EXPECT_EQ(*held, 4U); // p of 1 block went; the second p of 2 joined
  caf::anon_send(b, close_batch_atom::value);
  sched_->run();
  ASSERT_TRUE(p2->value && p1->value && p2_again->value);
  EXPECT_EQ(p2->value->computed_blocks, 2U);
  EXPECT_FALSE(p2->value->joined);
  EXPECT_EQ(p1->value->computed_blocks, 1U);
  EXPECT_FALSE(p1->value->joined);
  EXPECT_EQ(p2_again->value->computed_blocks, 2U);
  EXPECT_TRUE(p2_again->value->joined);
  auto st = ask_now<query_cache_stats>(qcache, stats_atom::value);
  EXPECT_EQ(st.hits, 1U);
  EXPECT_EQ(st.misses, 5U);
  EXPECT_EQ(st.coalesced, 1U);

  // "p" of 1 block is stored now. With "p" of 2 blocks on its way, "p" of
  // 1 block is answered from the store: the miss of another prompt on its
  // way does not keep it from its own stored reply.
  auto p2_more = ask<kv_reply>(qcache, query_atom::value, two_blocks(7, "p"));
  sched_->run();
  EXPECT_EQ(*held, 5U);
  auto p1_hit = ask<kv_reply>(qcache, query_atom::value, one_block(8, "p"));
  sched_->run();
  EXPECT_EQ(*held, 5U);
  ASSERT_TRUE(p1_hit->value.has_value());
  EXPECT_TRUE(p1_hit->value->from_query_cache);
  EXPECT_EQ(p1_hit->value->computed_blocks, 1U);
  caf::anon_send(b, close_batch_atom::value);
  sched_->run();
  ASSERT_TRUE(p2_more->value.has_value());
  EXPECT_EQ(p2_more->value->computed_blocks, 2U);
}

TEST_F(actor_test, QueryCacheAnswersAQueryKeyOnlyWithAReplyOfItsTokenCount) {
  // "q" of one block and 16 tokens is stored. "q" of the same block and
  // 20 tokens (another partial last block: another prompt) is a miss with
  // its own token counts, which replace the entry. (Before, it was a hit
  // saying 16 tokens computed, 4 short of its prompt.) With "p" of 16
  // tokens on its way, "p" of 20 does not join it.
  const cache_over_holding f(*sys_, stop_at_end_);
  const auto& held = f.held;
  const auto& b = f.balancer;
  const auto& qcache = f.cache;
  sched_->run();
  const auto tokens = [](std::uint64_t id, const std::string& q,
                         std::uint32_t n) {
    auto r = query_at(id, q, engine::priority::normal);
    r.input_tokens = n;
    return r;
  };
  const auto answered = [&](const kv_request& r) {
    auto out = ask<kv_reply>(qcache, query_atom::value, r);
    sched_->run();
    caf::anon_send(b, close_batch_atom::value);
    sched_->run();
    EXPECT_TRUE(out->value.has_value());
    return out->value.value_or(kv_reply{});
  };
  EXPECT_EQ(answered(tokens(1, "q", 16)).computed_tokens, 16U);
  const auto longer = answered(tokens(2, "q", 20));
  EXPECT_FALSE(longer.from_query_cache);
  EXPECT_EQ(longer.computed_tokens, 20U);
  EXPECT_EQ(*held, 2U);
  const auto hit = answered(tokens(3, "q", 20));
  EXPECT_TRUE(hit.from_query_cache);
  EXPECT_EQ(hit.computed_tokens, 20U);
  EXPECT_EQ(*held, 2U);

  auto p16 = ask<kv_reply>(qcache, query_atom::value, tokens(4, "p", 16));
  auto p20 = ask<kv_reply>(qcache, query_atom::value, tokens(5, "p", 20));
  sched_->run();
  EXPECT_EQ(*held, 4U) << "p of 20 tokens joined p of 16";
  caf::anon_send(b, close_batch_atom::value);
  sched_->run();
  ASSERT_TRUE(p16->value && p20->value);
  EXPECT_EQ(p16->value->computed_tokens, 16U);
  EXPECT_EQ(p20->value->computed_tokens, 20U);
  EXPECT_FALSE(p20->value->joined);
}

TEST_F(actor_test, TheCacheWarmerAndPrefetcherSetNoTimerOfTheirOwn) {
  // The balancer answers every request (at the latest with its own
  // request_timeout), so their requests to it carry no CAF timeout: each
  // would be a clock entry that wakes CAF's clock thread.
  const cache_over_holding f(*sys_, stop_at_end_);
  const auto& held = f.held;
  const auto& b = f.balancer;
  const auto& qcache = f.cache;
  auto w = warmer(b);
  auto pf = prefetcher(b);
  auto cached = ask_untimed<kv_reply>(qcache, query_atom::value, query(1, "q"));
  auto warmed = ask_untimed<warm_report>(
      w, warm_atom::value, std::vector<warm_item>{{query(0, "w"), 1.0}},
      std::uint32_t{1}, false, caf::actor{});
  for (const auto& [session, q] :
       {std::pair{1, "X"}, std::pair{1, "B"}, std::pair{2, "X"}})
    observed(pf, query(static_cast<std::uint64_t>(session), q));
  ASSERT_EQ(*held, 3U); // the miss, the warm query, the prefetch
  EXPECT_FALSE(sched_->has_pending_timeout());
  caf::anon_send(b, close_batch_atom::value);
  sched_->run();
  ASSERT_TRUE(cached->value.has_value());
  ASSERT_TRUE(warmed->value.has_value());
  EXPECT_EQ(warmed->value->warmed, 1U);
  EXPECT_EQ(ask_now<prefetch_stats>(pf, stats_atom::value).issued, 1U);
}

/// Sends three normal requests and then a critical one to `dest` and runs
/// every actor but `sink` until they reach it; then lets `sink` read its
/// mailbox. Returns the ids in the order `sink` (a fake_balancer) saw them.
std::vector<std::uint64_t>
order_at_sink(caf::scheduler::test_coordinator& sched, const caf::actor& dest,
              const caf::actor& sink, const std::shared_ptr<fake_backend>& be,
              auto atom) {
  for (std::uint64_t id = 1; id <= 4; ++id) {
    auto r = query(id, "q" + std::to_string(id));
    r.id = id;
    r.prio = id == 4 ? engine::priority::critical : engine::priority::normal;
    caf::anon_send(dest, atom, r);
  }
  run_all_but(sched, sink);
  EXPECT_TRUE(be->seen.empty());
  sched.run();
  std::vector<std::uint64_t> ids;
  for (const auto& r : be->seen)
    ids.push_back(r.id);
  return ids;
}

TEST_F(actor_test, CriticalRequestsOvertakeNormalOnesAtTheEngineMailbox) {
  // The balancer forwards high and critical requests as urgent messages.
  auto be = std::make_shared<fake_backend>();
  balancer_config bc;
  auto b = spawned(spawn_balancer(
      *sys_, bc,
      [be](caf::actor_system& s, std::uint32_t) -> result<started_engine> {
        return started_engine{s.spawn(fake_balancer, be)};
      }));
  stop_at_end_.push_back(b);
  sched_->run();
  auto engine0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  EXPECT_EQ(order_at_sink(*sched_, b, engine0, be, process_atom::value),
            (std::vector<std::uint64_t>{4, 1, 2, 3}));
}

TEST_F(actor_test, CriticalRequestsOvertakeNormalOnesAtTheBalancerMailbox) {
  // The query cache forwards its misses in the request's priority.
  const cache_over_fake f(*sys_, stop_at_end_);
  EXPECT_EQ(
      order_at_sink(*sched_, f.cache, f.balancer, f.be, query_atom::value),
      (std::vector<std::uint64_t>{4, 1, 2, 3}));
}

TEST_F(actor_test, WarmerWarmsTopNAtLowPriorityAndReportsProgress) {
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  warmer_config wc;
  wc.parallelism = 2;
  auto w = warmer(b, wc);
  auto progress = std::make_shared<std::vector<std::uint64_t>>();
  auto listener =
      sys_->spawn([progress](caf::event_based_actor*) -> caf::behavior {
        return {[progress](progress_atom, std::uint64_t done, std::uint64_t) {
          progress->push_back(done);
        }};
      });
  std::vector<warm_item> items;
  for (int i = 0; i < 10; ++i)
    items.push_back(warm_item{query(0, "q" + std::to_string(i)), double(i)});
  auto rep = ask<warm_report>(w, warm_atom::value, items, std::uint32_t{3},
                              true, listener);
  sched_->run();
  ASSERT_TRUE(rep->value.has_value());
  EXPECT_EQ(rep->value->requested, 3U);
  EXPECT_EQ(rep->value->warmed, 3U);
  ASSERT_EQ(be->seen.size(), 3U);
  EXPECT_EQ(be->seen[0].query, "q9");
  EXPECT_EQ(be->seen[1].query, "q8");
  EXPECT_EQ(be->seen[2].query, "q7");
  for (const auto& r : be->seen) {
    EXPECT_EQ(r.prio, engine::priority::low);
    EXPECT_TRUE(r.pin);
  }
  EXPECT_EQ(*progress, (std::vector<std::uint64_t>{1, 2, 3}));
}

TEST_F(actor_test, AMalformedWarmItemCannotDisplaceAValidOne) {
  // With the engines' block size known, an item of 3 keys for 16 tokens
  // (one block) fails before the selection: the hot valid query over the
  // same first key is sent, not displaced by the malformed longer chain.
  // (Before, the longer item took the hot one's place in the chain merge,
  // the engine refused it, and nothing was warmed.)
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  warmer_config wc;
  wc.block_tokens = 16;
  auto w = warmer(b, wc);
  kv_request hot;
  hot.query = "hot";
  hot.keys = {block_key{7, 1}};
  hot.input_tokens = 16;
  kv_request bad = hot;
  bad.query = "bad";
  bad.keys = {block_key{7, 1}, block_key{7, 2}, block_key{7, 3}};
  const std::vector<warm_item> items = {warm_item{hot, 10.0},
                                        warm_item{bad, 1.0}};
  auto rep = ask<warm_report>(w, warm_atom::value, items, std::uint32_t{10},
                              false, caf::actor{});
  sched_->run();
  ASSERT_TRUE(rep->value.has_value());
  EXPECT_EQ(rep->value->requested, 1U);
  EXPECT_EQ(rep->value->warmed, 1U);
  EXPECT_EQ(rep->value->failed, 0U);
  EXPECT_EQ(rep->value->malformed, 1U);
  EXPECT_NE(rep->value->first_error.find("warm item 1"), std::string::npos)
      << rep->value->first_error;
  EXPECT_NE(rep->value->first_error.find("misaligned"), std::string::npos)
      << rep->value->first_error;
  ASSERT_EQ(be->seen.size(), 1U);
  EXPECT_EQ(be->seen[0].query, "hot");
}

TEST_F(actor_test, AWarmItemWithAKeyNoBlockCanHaveIsRefusedFirst) {
  // Block size unknown to the warmer (0): an item whose keys repeat one, or
  // hold the all-zero key, still fails before the selection, so it cannot
  // take the place of the valid query its keys lead. (Before, it did, and
  // the engine then refused it: nothing was warmed.)
  for (const auto& bad_keys :
       {std::vector<block_key>{block_key{7, 1}, block_key{7, 2},
                               block_key{7, 2}},
        std::vector<block_key>{block_key{7, 1}, block_key{7, 2},
                               block_key{}}}) {
    auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
    auto w = warmer(b, warmer_config{});
    kv_request hot;
    hot.query = "hot";
    hot.keys = {block_key{7, 1}, block_key{7, 2}};
    hot.input_tokens = 32;
    kv_request bad = hot;
    bad.query = "bad";
    bad.keys = bad_keys;
    bad.input_tokens = 48;
    const std::vector<warm_item> items = {warm_item{hot, 10.0},
                                          warm_item{bad, 1.0}};
    auto rep = ask<warm_report>(w, warm_atom::value, items, std::uint32_t{10},
                                false, caf::actor{});
    sched_->run();
    ASSERT_TRUE(rep->value.has_value());
    EXPECT_EQ(rep->value->malformed, 1U);
    EXPECT_EQ(rep->value->warmed, 1U);
    EXPECT_NE(rep->value->first_error.find("warm item 1"), std::string::npos)
        << rep->value->first_error;
    ASSERT_EQ(be->seen.size(), 1U);
    EXPECT_EQ(be->seen[0].query, "hot");
  }
}

TEST(WarmerSelectTop, ANaNFrequencyRanksBelowEveryNumber) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<warm_item> items;
  for (double f : {nan, 1.0, 2.0, nan, 3.0, -1.0}) {
    kv_request r;
    r.query = "q" + std::to_string(items.size());
    r.keys = {block_key{items.size() + 1, 1}};
    r.input_tokens = 16;
    items.push_back(warm_item{r, f});
  }
  EXPECT_EQ(select_top(items, 3), (std::vector<std::size_t>{4, 2, 1}));
  EXPECT_EQ(select_top(items, 6), (std::vector<std::size_t>{4, 2, 1, 5, 0, 3}));
}

TEST(WarmerSelectTop, TheSameRequestTwiceIsOneQuery) {
  // A request twice in one warm, its copies in flight together, could be
  // routed to two engines and pin its blocks on both. The repeat is left
  // out, the top n are n different requests. Blocks decide, not the
  // query's name: "b" over the same blocks is the same request to the
  // balancer (before, it was warmed, and pinned, as well). Nor its token
  // count: only full blocks are cached, so "a" with 20 tokens warms the
  // same block as with 16 (before, it was warmed twice).
  const auto item = [](std::string q, std::uint32_t tokens, double f) {
    kv_request r;
    r.query = std::move(q);
    r.keys = {block_key{1, 1}};
    r.input_tokens = tokens;
    return warm_item{r, f};
  };
  std::vector<warm_item> items = {
      item("a", 16, 1.0), item("a", 16, 5.0), // the same request
      item("a", 20, 2.0),                     // other tokens, same blocks
      item("b", 16, 3.0),                     // other name, same blocks
      item("a", 16, 4.0), item("c", 16, 0.5)};
  items.back().request.keys = {block_key{2, 1}};
  EXPECT_EQ(select_top(items, 1), (std::vector<std::size_t>{1}));
  EXPECT_EQ(select_top(items, 10), (std::vector<std::size_t>{1, 5}));
}

/// A warm item named `q` of `blocks` blocks of chain 7 ({7, 1} onwards:
/// one turn leads every longer one), of frequency `f`.
warm_item warm_turn(std::string q, std::size_t blocks, double f) {
  kv_request r;
  r.query = std::move(q);
  for (std::uint64_t i = 1; i <= blocks; ++i)
    r.keys.push_back(block_key{7, i});
  r.input_tokens = static_cast<std::uint32_t>(16 * blocks);
  return warm_item{r, f};
}

TEST(WarmerSelectTop, AQueryWhoseBlocksLeadAnotherIsWarmedByIt) {
  // A chat's turns: turn1's block leads turn2's two, which lead turn3's
  // three. Warming turn3 stores (and pins) the blocks of all three, so it
  // is sent once, at the rank of the hottest of them selected; "other" is
  // a query of its own. (Before, each turn was sent: its blocks matched
  // or computed up to three times, pinned on up to three engines.)
  auto other = warm_turn("other", 1, 4.0);
  other.request.keys = {block_key{9, 1}};
  const std::vector<warm_item> items = {warm_turn("turn1", 1, 5.0), other,
                                        warm_turn("turn3", 3, 1.0),
                                        warm_turn("turn2", 2, 3.0)};
  EXPECT_EQ(select_top(items, 10), (std::vector<std::size_t>{2, 1}));
  // Only the top two queries: turn1 and other, turn1 sent itself.
  EXPECT_EQ(select_top(items, 2), (std::vector<std::size_t>{0, 1}));
  // The top three: turn2 warms turn1 too.
  EXPECT_EQ(select_top(items, 3), (std::vector<std::size_t>{3, 1}));
  // A shorter turn ranked below a longer one selected adds nothing.
  const std::vector<warm_item> longer_first = {
      warm_turn("turn3", 3, 5.0), warm_turn("turn1", 1, 4.0), other};
  EXPECT_EQ(select_top(longer_first, 10), (std::vector<std::size_t>{0, 2}));
  // The chains behind those picks list their selected queries longest
  // first, the order they are tried in when one fails: turn3, turn2,
  // turn1; the shorter turn joins the longer one's chain whatever its rank.
  using chains = std::vector<std::vector<std::size_t>>;
  EXPECT_EQ(select_chains(items, 10), (chains{{2, 3, 0}, {1}}));
  EXPECT_EQ(select_chains(items, 3), (chains{{3, 0}, {1}}));
  EXPECT_EQ(select_chains(items, 1), (chains{{0}}));
  EXPECT_EQ(select_chains(longer_first, 10), (chains{{0, 1}, {2}}));
}

/// Stands in for the balancer: refuses (errc::out_of_memory, as an engine
/// that cannot pin them all) every process request of more than
/// `most_keys` keys and answers the others; records them all.
caf::behavior refusing_long_balancer(caf::event_based_actor*,
                                     std::shared_ptr<fake_backend> be,
                                     std::size_t most_keys) {
  return {
      [=](process_atom, const kv_request& r) -> caf::result<kv_reply> {
        be->seen.push_back(r);
        if (r.keys.size() > most_keys)
          return to_caf_error(
              error{errc::out_of_memory, "too many blocks to pin"});
        return kv_reply{r.id, 0, 0, r.keys.size(), 0, r.input_tokens, false, 0};
      },
      [](listen_atom, const caf::actor&) {},
  };
}

TEST_F(actor_test, AHotQueryIsWarmedWhenTheLongerColdQueryOfItsChainFails) {
  // "hot" (2 blocks, the hottest) leads "mid" (3) and "cold" (6): one
  // chain, sent as "cold". The engine refuses more than 2 blocks, so
  // "cold" fails, then "mid", then "hot" is sent and warmed. (Before, the
  // chain failed with "cold" and the hottest query was not warmed.)
  auto be = std::make_shared<fake_backend>();
  auto b = sys_->spawn(refusing_long_balancer, be, std::size_t{2});
  stop_at_end_.push_back(b);
  auto w = warmer(b, warmer_config{});
  auto progress =
      std::make_shared<std::vector<std::pair<std::uint64_t, std::uint64_t>>>();
  auto listener = sys_->spawn([progress](caf::event_based_actor*) {
    return caf::behavior{
        [progress](progress_atom, std::uint64_t done, std::uint64_t total) {
          progress->emplace_back(done, total);
        }};
  });
  stop_at_end_.push_back(listener);
  const std::vector<warm_item> items = {warm_turn("hot", 2, 100.0),
                                        warm_turn("cold", 6, 1.0),
                                        warm_turn("mid", 3, 2.0)};
  auto rep = ask<warm_report>(w, warm_atom::value, items, std::uint32_t{10},
                              true, listener);
  sched_->run();
  ASSERT_TRUE(rep->value.has_value());
  EXPECT_EQ(rep->value->requested, 3U);
  EXPECT_EQ(rep->value->warmed, 1U);
  EXPECT_EQ(rep->value->failed, 2U);
  EXPECT_EQ(rep->value->shortened, 2U);
  EXPECT_NE(rep->value->first_error.find("too many blocks"), std::string::npos)
      << rep->value->first_error;
  ASSERT_EQ(be->seen.size(), 3U);
  EXPECT_EQ(be->seen[0].query, "cold");
  EXPECT_EQ(be->seen[1].query, "mid");
  EXPECT_EQ(be->seen[2].query, "hot");
  EXPECT_TRUE(be->seen[2].pin);
  const std::vector<std::pair<std::uint64_t, std::uint64_t>> want{
      {1, 2}, {2, 3}, {3, 3}};
  EXPECT_EQ(*progress, want);
}

TEST_F(actor_test, AChainIsNotSentAgainAfterAReplyWithUncachedBlocks) {
  // The engine answers the chain's longest query with blocks it could not
  // cache: its leading blocks are cached, and pinned, so the shorter query
  // is not sent (it would pin them a second time, which one unpin would
  // not undo). The query counts failed.
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  be->uncached = 1;
  auto w = warmer(b, warmer_config{});
  const std::vector<warm_item> items = {warm_turn("hot", 2, 100.0),
                                        warm_turn("cold", 6, 1.0)};
  auto rep = ask<warm_report>(w, warm_atom::value, items, std::uint32_t{10},
                              true, caf::actor{});
  sched_->run();
  ASSERT_TRUE(rep->value.has_value());
  EXPECT_EQ(rep->value->requested, 1U);
  EXPECT_EQ(rep->value->failed, 1U);
  EXPECT_EQ(rep->value->shortened, 0U);
  ASSERT_EQ(be->seen.size(), 1U);
  EXPECT_EQ(be->seen[0].query, "cold");
}

TEST_F(actor_test, AWarmOfNoQueriesOrOfABadFrequencyIsRefused) {
  // top_n 0 is an error, not an empty report; an item whose frequency is
  // negative or infinite is malformed, not warmed (a "never" marker of -1
  // was warmed, and pinned). A NaN frequency (unknown) is still warmed,
  // ranked last.
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  auto w = warmer(b, warmer_config{});
  const auto item = [](std::uint64_t hi, double f) {
    kv_request r;
    r.query = "q" + std::to_string(hi);
    r.keys = {block_key{hi, 1}};
    r.input_tokens = 16;
    return warm_item{r, f};
  };
  const std::vector<warm_item> items = {
      item(1, -1.0), item(2, std::numeric_limits<double>::infinity()),
      item(3, std::nan("")), item(4, 2.0)};
  auto none = ask<warm_report>(w, warm_atom::value, items, std::uint32_t{0},
                               false, caf::actor{});
  sched_->run();
  ASSERT_TRUE(none->error.has_value());
  EXPECT_EQ(from_caf_error(*none->error).code, errc::invalid_argument);
  EXPECT_TRUE(be->seen.empty());
  auto rep = ask<warm_report>(w, warm_atom::value, items, std::uint32_t{10},
                              false, caf::actor{});
  sched_->run();
  ASSERT_TRUE(rep->value.has_value());
  EXPECT_EQ(rep->value->malformed, 2U);
  EXPECT_EQ(rep->value->requested, 2U);
  EXPECT_EQ(rep->value->warmed, 2U);
  EXPECT_NE(rep->value->first_error.find("warm item 0"), std::string::npos)
      << rep->value->first_error;
  ASSERT_EQ(be->seen.size(), 2U);
  EXPECT_EQ(be->seen[0].query, "q4");
  EXPECT_EQ(be->seen[1].query, "q3");
}

TEST_F(actor_test, AWarmerParallelismAboveTheJobStartsEachQueryOnce) {
  // SIZE_MAX means "all at once": the warmer starts the job's two queries
  // and stops there (it used to count to SIZE_MAX and never answer).
  auto [be, b] = spawn_fake_fleet(*sys_, stop_at_end_);
  warmer_config wc;
  wc.parallelism = std::numeric_limits<std::size_t>::max();
  auto w = warmer(b, wc);
  std::vector<warm_item> items{warm_item{query(0, "a"), 2.0},
                               warm_item{query(0, "b"), 1.0}};
  auto rep = ask_now<warm_report>(w, warm_atom::value, items, std::uint32_t{5},
                                  false, caf::actor{});
  EXPECT_EQ(rep.requested, 2U);
  EXPECT_EQ(rep.warmed, 2U);
  EXPECT_EQ(be->seen.size(), 2U);
}

TEST_F(actor_test, ConcurrentWarmJobsShareTheWarmersParallelism) {
  // Two jobs of three queries each, parallelism 2, into an engine that
  // holds each batch for 10 s: at most two queries are in flight at once,
  // both jobs together (before, each job sent two of its own: four), the
  // second job's after the first's, and each caller's progress counts its
  // own job.
  auto b =
      balancer(routing_policy::round_robin, {small_engine(64, 20, 10s)}, 60s);
  warmer_config wc;
  wc.parallelism = 2;
  auto w = warmer(b, wc);
  sched_->run();
  struct job {
    std::shared_ptr<std::vector<std::uint64_t>> progress =
        std::make_shared<std::vector<std::uint64_t>>();
    std::shared_ptr<outcome<warm_report>> report;
  };
  std::vector<job> jobs(2);
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    auto progress = jobs[j].progress;
    auto listener =
        sys_->spawn([progress](caf::event_based_actor*) -> caf::behavior {
          return {[progress](progress_atom, std::uint64_t done,
                             std::uint64_t total) {
            EXPECT_EQ(total, 3U);
            progress->push_back(done);
          }};
        });
    stop_at_end_.push_back(listener);
    std::vector<warm_item> items;
    for (int i = 0; i < 3; ++i)
      items.push_back(warm_item{
          query(0, "job" + std::to_string(j) + "-q" + std::to_string(i)),
          double(10 - i)});
    jobs[j].report = ask<warm_report>(w, warm_atom::value, items,
                                      std::uint32_t{3}, false, listener);
  }
  sched_->run();
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  const auto in_flight = [&] {
    return ask_now<engine_stats>(e0, stats_atom::value).in_flight;
  };
  const std::vector<std::vector<std::uint64_t>> progress_after[] = {
      {{1, 2}, {}}, {{1, 2, 3}, {1}}, {{1, 2, 3}, {1, 2, 3}}};
  for (const auto& expected : progress_after) {
    EXPECT_EQ(in_flight(), 2U);
    sched_->advance_time(10s); // the batch closes
    sched_->run();
    EXPECT_EQ(*jobs[0].progress, expected[0]);
    EXPECT_EQ(*jobs[1].progress, expected[1]);
  }
  EXPECT_EQ(in_flight(), 0U);
  for (const auto& j : jobs) {
    ASSERT_TRUE(j.report->value.has_value());
    EXPECT_EQ(j.report->value->requested, 3U);
    EXPECT_EQ(j.report->value->warmed, 3U);
  }
}

TEST_F(actor_test, AWarmCallerHearsBackWhenTheWarmerStops) {
  // The engine holds the warm requests in a 10 s batch; the warmer is
  // killed mid-job. Its caller, with no timer of its own, gets
  // request_receiver_down instead of silence.
  // A second job, its query waiting behind the first's (parallelism 3),
  // hears back too.
  auto b = balancer(routing_policy::round_robin, {small_engine(64, 20, 10s)});
  warmer_config wc;
  wc.parallelism = 3;
  auto w = spawned(spawn_warmer(*sys_, wc, b));
  sched_->run();
  std::vector<warm_item> items;
  for (int i = 0; i < 3; ++i)
    items.push_back(warm_item{query(0, "q" + std::to_string(i)), double(i)});
  const std::vector<warm_item> queued{warm_item{query(0, "later"), 1.0}};
  std::vector<std::shared_ptr<outcome<warm_report>>> outs;
  for (const auto& job : {items, queued}) {
    auto out = std::make_shared<outcome<warm_report>>();
    outs.push_back(out);
    sys_->spawn([=](caf::event_based_actor* self) {
      self->request(w, caf::infinite, warm_atom::value, job, std::uint32_t{3},
                    false, caf::actor{})
          .then([=](warm_report& v) { out->value = std::move(v); },
                [=](caf::error& e) { out->error = e; });
    });
  }
  sched_->run();
  for (const auto& out : outs)
    ASSERT_FALSE(out->done());
  caf::anon_send_exit(w, caf::exit_reason::kill);
  sched_->run();
  for (const auto& out : outs) {
    ASSERT_TRUE(out->error.has_value());
    EXPECT_EQ(*out->error, caf::sec::request_receiver_down);
  }
}

TEST_F(actor_test, AWarmQueryTheBalancerTimesOutFailsAtItsDeadlineOnly) {
  // The warmer sets no timer of its own: a query whose engine does not
  // answer fails when the balancer times it out (here after 70 s, later
  // than the 60 s the warmer used to set itself).
  auto b =
      balancer(routing_policy::round_robin, {small_engine(64, 20, 100s)}, 70s);
  auto w = warmer(b);
  sched_->run();
  auto rep = ask<warm_report>(w, warm_atom::value,
                              std::vector<warm_item>{{query(0, "q0"), 1.0}},
                              std::uint32_t{1}, false, caf::actor{});
  sched_->run();
  sched_->advance_time(69s);
  sched_->run();
  EXPECT_FALSE(rep->done());
  sched_->advance_time(1s); // the balancer's deadline
  sched_->run();
  ASSERT_TRUE(rep->value.has_value());
  EXPECT_EQ(rep->value->requested, 1U);
  EXPECT_EQ(rep->value->warmed, 0U);
  EXPECT_EQ(rep->value->failed, 1U);
  EXPECT_EQ(rep->value->first_error, "timeout: request timed out");
}

TEST_F(actor_test, AnEngineDoesNotProcessARequestPastItsBalancerDeadline) {
  // A pinning warm query waits in its engine's batch for 100 s; the
  // balancer times it out at 70 s, and the warmer counts it failed. When
  // the batch closes, the engine answers it unprocessed (engine_stats::
  // expired): nothing is computed nor pinned behind the warmer's back.
  // (Before, the engine computed and pinned its blocks at 100 s.) With the
  // batch closing at the deadline itself, whichever of the engine and the
  // balancer's sweep comes first, the caller gets one timeout, counted once.
  for (const auto batch_timeout : {100s, 70s}) {
    SCOPED_TRACE(batch_timeout.count());
    auto b = balancer(routing_policy::round_robin,
                      {small_engine(64, 20, batch_timeout)}, 70s);
    auto w = warmer(b);
    sched_->run();
    auto item = query(0, "q0");
    auto rep = ask<warm_report>(w, warm_atom::value,
                                std::vector<warm_item>{{item, 1.0}},
                                std::uint32_t{1}, true, caf::actor{});
    sched_->run();
    sched_->advance_time(70s);
    sched_->run();
    ASSERT_TRUE(rep->value.has_value());
    EXPECT_EQ(rep->value->failed, 1U);
    EXPECT_EQ(rep->value->first_error.rfind("timeout: ", 0), 0U)
        << rep->value->first_error;
    sched_->advance_time(batch_timeout - 70s + 1s);
    sched_->run();
    auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
    EXPECT_EQ(ask_now<std::uint64_t>(e0, lookup_atom::value, item.keys), 0U);
    const auto es = ask_now<engine_stats>(e0, stats_atom::value);
    EXPECT_EQ(es.expired, 1U);
    EXPECT_EQ(es.requests, 0U);
    EXPECT_EQ(es.in_flight, 0U);
    const auto bs = ask_now<balancer_stats>(b, stats_atom::value);
    EXPECT_EQ(bs.timeouts, 1U);
  }
}

TEST_F(actor_test, AnEngineThatExpiresARequestBeforeTheSweepIsOneTimeout) {
  // A high-priority request's batch closes at its deadline, and the engine
  // runs before the balancer's sweep: its timeout answer (urgent, as the
  // request) reaches the balancer first. The caller gets the sweep's error
  // (request_timeout) all the same, the balancer counts one timeout, tells
  // its listeners the request's wait, and the engine's load is released.
  auto b =
      balancer(routing_policy::round_robin, {small_engine(64, 20, 70s)}, 70s);
  sched_->run();
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  auto req = query(0, "q0");
  req.prio = engine::priority::high;
  auto out = ask<kv_reply>(b, process_atom::value, req);
  sched_->run();
  sched_->advance_time(70s);
  ASSERT_TRUE(sched_->prioritize(e0));
  sched_->run_once(); // the engine's batch closes: the request expired
  sched_->run();
  ASSERT_TRUE(out->error.has_value());
  EXPECT_EQ(*out->error, caf::make_error(caf::sec::request_timeout));
  const auto es = ask_now<engine_stats>(e0, stats_atom::value);
  EXPECT_EQ(es.expired, 1U);
  EXPECT_EQ(es.in_flight, 0U);
  const auto bs = ask_now<balancer_stats>(b, stats_atom::value);
  EXPECT_EQ(bs.timeouts, 1U);
  ASSERT_EQ(bs.in_flight.size(), 1U);
  EXPECT_EQ(bs.in_flight[0], 0U);
  EXPECT_EQ(ask_now<std::uint64_t>(e0, lookup_atom::value, req.keys), 0U);
}

TEST_F(actor_test, AWarmQueryTheEngineCouldNotCacheCountsFailed) {
  // 30 pinned queries of 2 blocks into one engine of 40: pins fill the
  // pool, and the queries that come after it is full are computed but not
  // cached. They count failed, out_of_memory, and `warmed` is exactly the
  // queries whose blocks are cached. (Before: warmed 30, failed 0.)
  auto b = balancer(routing_policy::round_robin, {small_engine(40)});
  warmer_config wc;
  wc.parallelism = 1;
  auto w = warmer(b, wc);
  sched_->run();
  std::vector<warm_item> items;
  for (std::uint64_t i = 0; i < 30; ++i)
    items.push_back(
        {make_request(i + 1, 0, 0, 2, i + 1), static_cast<double>(30 - i)});
  auto rep = ask_now<warm_report>(w, warm_atom::value, items, std::uint32_t{30},
                                  true, caf::actor{});
  auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  std::uint64_t whole = 0;
  for (const auto& item : items)
    if (ask_now<std::uint64_t>(e0, lookup_atom::value, item.request.keys) == 2)
      ++whole;
  EXPECT_EQ(rep.requested, 30U);
  EXPECT_GT(rep.failed, 0U);
  EXPECT_EQ(rep.warmed, whole);
  EXPECT_EQ(rep.warmed + rep.failed, 30U);
  EXPECT_EQ(rep.first_error.rfind("out_of_memory: ", 0), 0U) << rep.first_error;
}

TEST_F(actor_test, AWarmReportSaysWhyItsFirstFailedQueryFailed) {
  // Two of three queries are bad (their token counts do not fill their
  // blocks): the report counts both and names the first one's error, so a
  // caller learns why, not only how many.
  auto b = balancer(routing_policy::round_robin, {small_engine(64)});
  warmer_config wc;
  wc.parallelism = 1;
  auto w = warmer(b, wc);
  sched_->run();
  auto good = query(0, "good");
  auto short_one = query(0, "short");
  short_one.input_tokens = 3;
  auto empty = query(0, "empty");
  empty.input_tokens = 0;
  auto rep = ask_now<warm_report>(
      w, warm_atom::value,
      std::vector<warm_item>{{good, 3.0}, {short_one, 2.0}, {empty, 1.0}},
      std::uint32_t{3}, false, caf::actor{});
  EXPECT_EQ(rep.requested, 3U);
  EXPECT_EQ(rep.warmed, 1U);
  EXPECT_EQ(rep.failed, 2U);
  EXPECT_EQ(rep.first_error.rfind("misaligned_tokens: ", 0), 0U)
      << rep.first_error;
  auto fine = ask_now<warm_report>(w, warm_atom::value,
                                   std::vector<warm_item>{{good, 1.0}},
                                   std::uint32_t{1}, false, caf::actor{});
  EXPECT_EQ(fine.failed, 0U);
  EXPECT_TRUE(fine.first_error.empty()) << fine.first_error;
}

TEST_F(actor_test, MemoryPressureEvictsLowPriorityFirst) {
  auto c = small_engine(40);
  c.pressure.threshold = 0.5;
  c.pressure.target = 0.25;
  c.store.max_pinned_fraction = 0.2; // below the target
  c.store.policy = engine::policy_kind::priority;
  auto e = engine(c);
  auto low = make_request(1, 1, 0, 8, 1);
  low.prio = engine::priority::background;
  auto high = make_request(2, 2, 0, 8, 2);
  high.prio = engine::priority::high;
  ask_now<kv_reply>(e, process_atom::value, high);
  ask_now<kv_reply>(e, process_atom::value,
                    low); // 16 of 40 blocks: above 0.5? no
  auto more = make_request(3, 3, 0, 8, 3);
  more.prio = engine::priority::high;
  ask_now<kv_reply>(e, process_atom::value,
                    more); // 24 of 40 > 0.5: evict to 10
  auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.pressure_evictions, 1U);
  EXPECT_EQ(ask_now<std::uint64_t>(e, lookup_atom::value, low.keys), 0U);
  EXPECT_GT(ask_now<std::uint64_t>(e, lookup_atom::value, more.keys), 0U);
}

TEST_F(actor_test, APutUnderPressureTakesTheLowestPriorityFirstByDefault) {
  // Default pressure settings and store watermarks (0.9 and 0.8 both): a
  // critical chain of 12 blocks, a background one, a normal one (36 of
  // 40), then a normal chain of 8. The store makes room for it itself (its
  // high watermark; twice, five blocks each time), lowest priority first
  // as the memory manager's rule says: ten blocks of the background chain
  // go (its tail first), the critical one stays whole. (Before, the
  // store made room in the policy's order, the oldest chain, critical,
  // first, and the pool never passed 0.9, so the rule never acted.)
  for (const auto policy : {engine::policy_kind::lru, engine::policy_kind::lfu,
                            engine::policy_kind::adaptive}) {
    SCOPED_TRACE(engine::to_string(policy));
    auto c = small_engine(40);
    c.store.policy = policy;
    auto e = engine(c);
    auto crit = make_request(1, 1, 0, 12, 1);
    crit.prio = engine::priority::critical;
    auto bg = make_request(2, 2, 0, 12, 2);
    bg.prio = engine::priority::background;
    const auto normal = make_request(3, 3, 0, 12, 3);
    const auto last = make_request(4, 4, 0, 8, 4);
    for (const auto& r : {crit, bg, normal, last})
      ask_now<kv_reply>(e, process_atom::value, r);
    auto cached = [&](const kv_request& r) {
      return ask_now<std::uint64_t>(e, lookup_atom::value, r.keys);
    };
    EXPECT_EQ(cached(crit), 12U);
    EXPECT_EQ(cached(bg), 2U);
    EXPECT_EQ(cached(normal), 12U);
    EXPECT_EQ(cached(last), 8U);
    caf::anon_send_exit(e, caf::exit_reason::user_shutdown);
    sched_->run();
  }
}

TEST_F(actor_test, MemoryPressureHookDecidesInsteadOfThePoolRule) {
  auto c = small_engine(40);
  c.slot = 3;
  c.pressure.threshold = 0.01; // the pool rule would evict after any batch
  c.pressure.target = 0.01;
  auto calls = std::make_shared<std::vector<std::uint32_t>>();
  c.relieve = [calls](std::uint32_t slot, engine::block_store& store) {
    calls->push_back(slot);
    // Frees one block's bytes on the second call only.
    return calls->size() == 2 ? store.evict_bytes(block_bytes) : 0;
  };
  auto e = engine(c);
  ask_now<kv_reply>(e, process_atom::value, make_request(1, 1, 0, 4, 1));
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).blocks, 4U);
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).pressure_evictions, 0U);
  ask_now<kv_reply>(e, process_atom::value, make_request(2, 2, 0, 4, 2));
  auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.pressure_evictions, 1U);
  EXPECT_EQ(st.blocks, 7U);
  EXPECT_EQ(*calls, (std::vector<std::uint32_t>{3, 3}));
}

/// Gives engine config `c` a fake memory tier of `blocks` blocks; the
/// returned cell points at the tier once the engine has made it.
std::shared_ptr<engine::testing::fake_memory_tier*>
attach_fake_tier(engine_actor_config& c, std::size_t blocks) {
  auto tier = std::make_shared<engine::testing::fake_memory_tier*>(nullptr);
  c.make_tier = [tier, blocks](engine::memory_backend& arena)
      -> result<std::unique_ptr<engine::memory_tier>> {
    auto t = std::make_unique<engine::testing::fake_memory_tier>(
        arena.host_data(), blocks * block_bytes);
    *tier = t.get();
    return std::unique_ptr<engine::memory_tier>(std::move(t));
  };
  return tier;
}

TEST_F(actor_test, AMemoryTierKeepsDemotedBlocksInTheEngine) {
  auto c = small_engine(40);
  auto tier = attach_fake_tier(c, 40);
  // A hook that demotes everything after each batch (a GPU engine's hook
  // does it above its threshold: cuda::device_memory_relief_per_engine).
  c.relieve = [](std::uint32_t, engine::block_store& store) {
    store.poll_tier();
    return store.demote_to_tier(store.used_bytes()).value_or(0);
  };
  auto e = engine(c);
  ASSERT_NE(*tier, nullptr);
  const auto first = make_request(1, 1, 0, 4, 1);
  ask_now<kv_reply>(e, process_atom::value, first);
  (*tier)->finish_demotions(); // the copies finish
  ask_now<kv_reply>(e, process_atom::value, make_request(2, 2, 0, 2, 2));
  auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.tier, "fake");
  EXPECT_EQ(st.tier_blocks, 4U);
  EXPECT_EQ(st.tier_demotions, 4U);
  EXPECT_EQ(st.evictions, 0U);
  // The same prompt again: every block comes back from the tier.
  const auto again = ask_now<kv_reply>(e, process_atom::value, first);
  EXPECT_EQ(again.matched_blocks, 4U);
  EXPECT_EQ(again.computed_blocks, 0U);
  st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.tier_hits, 4U);
}

TEST_F(actor_test, BlockEventsTellListenersWhatTheEngineHolds) {
  auto e = engine(small_engine(8));
  auto events = std::make_shared<std::vector<block_events>>();
  record_events(e, events);
  // What a listener believes the engine holds, from the events alone.
  std::set<block_key> held;
  auto apply = [&] {
    for (const auto& ev : *events) {
      EXPECT_EQ(ev.engine, 0U);
      held.insert(ev.stored.begin(), ev.stored.end());
      for (const auto& k : ev.evicted)
        EXPECT_EQ(held.erase(k), 1U) << "evicted a block never stored";
    }
    events->clear();
  };
  auto held_prefix = [&](const std::vector<block_key>& keys) {
    std::size_t n = 0;
    while (n < keys.size() && held.count(keys[n]) == 1)
      ++n;
    return n;
  };
  const auto a = make_request(1, 1, 0, 4, 1);
  const auto b = make_request(2, 2, 0, 4, 2);
  ask_now<kv_reply>(e, process_atom::value, a);
  ASSERT_EQ(events->size(), 1U);
  EXPECT_EQ(events->front().stored, a.keys); // in chain order
  EXPECT_TRUE(events->front().evicted.empty());
  apply();
  // b does not fit next to a: some of a's blocks go, leaf first.
  ask_now<kv_reply>(e, process_atom::value, b);
  ASSERT_FALSE(events->empty());
  EXPECT_FALSE(events->back().evicted.empty());
  apply();
  for (const auto& r : {a, b, a, b}) {
    ask_now<kv_reply>(e, process_atom::value, r);
    apply();
    for (const auto& chain : {a.keys, b.keys})
      EXPECT_EQ(held_prefix(chain),
                ask_now<std::uint64_t>(e, lookup_atom::value, chain));
  }
  // A put is reported too.
  put_request p;
  p.key = block_key{77, 1};
  auto ticket = ask_now<std::uint64_t>(e, reserve_atom::value, p);
  ask_now<bool>(e, write_atom::value, ticket,
                std::vector<std::uint8_t>(block_bytes, 1));
  ask_now<bool>(e, commit_atom::value, ticket);
  apply();
  EXPECT_EQ(held.count(p.key), 1U);
}

TEST_F(actor_test, ExpiredBlocksAreReportedEvictedWithinASweep) {
  // Blocks with a 10 s TTL: once it has run out, the engine's next sweep
  // (every expire_interval, 1 s by default, while it has a listener)
  // removes them and tells the listener. (Before, nothing removed them
  // unless space ran short: the listener held them forever.)
  engine::manual_clock clock{std::chrono::hours{1}};
  auto e = engine(small_ttl_engine(clock));
  auto events = std::make_shared<std::vector<block_events>>();
  record_events(e, events);
  const auto a = make_request(1, 1, 0, 4, 1);
  ask_now<kv_reply>(e, process_atom::value, a);
  ASSERT_EQ(events->size(), 1U);
  EXPECT_EQ(events->front().stored, a.keys);
  events->clear();
  clock.advance(5s); // not yet
  sched_->advance_time(1s);
  sched_->run();
  EXPECT_TRUE(events->empty());
  clock.advance(6s);
  sched_->advance_time(1s);
  sched_->run();
  ASSERT_EQ(events->size(), 1U);
  std::set<block_key> evicted(events->front().evicted.begin(),
                              events->front().evicted.end());
  EXPECT_EQ(evicted, std::set<block_key>(a.keys.begin(), a.keys.end()));
  EXPECT_TRUE(events->front().stored.empty());
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).blocks, 0U);
}

TEST_F(actor_test, AnIdleEngineFinishesItsDemotionsWithoutANewRequest) {
  auto c = small_engine(40);
  c.tier_poll_interval = 2ms;
  auto tier = attach_fake_tier(c, 40);
  // Demotes everything it can and never polls: finishing is the actor's job.
  c.relieve = [](std::uint32_t, engine::block_store& store) {
    return store.demote_to_tier(store.used_bytes()).value_or(0);
  };
  auto e = engine(c);
  ASSERT_NE(*tier, nullptr);
  ask_now<kv_reply>(e, process_atom::value, make_request(1, 1, 0, 4, 1));
  auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.tier_in_flight_bytes, 4 * block_bytes);
  EXPECT_EQ(st.tier_blocks, 0U);
  sched_->advance_time(2ms); // the copies are not done: look again later
  sched_->run();
  st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.tier_in_flight_bytes, 4 * block_bytes);
  (*tier)->finish_demotions();
  sched_->advance_time(2ms);
  sched_->run();
  st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.tier_in_flight_bytes, 0U);
  EXPECT_EQ(st.tier_blocks, 4U);
  EXPECT_EQ(st.used_bytes, 0U);
  EXPECT_EQ(st.requests, 1U);
  // Nothing in flight: the actor stops looking.
  EXPECT_FALSE(sched_->has_pending_timeout());
}

TEST_F(actor_test, AFailingTierFactoryFailsTheEngineStart) {
  auto c = small_engine(40);
  c.make_tier = [](engine::memory_backend&)
      -> result<std::unique_ptr<engine::memory_tier>> {
    return make_error(errc::out_of_memory, "no pinned memory");
  };
  auto spawned = spawn_engine_actor(*sys_, c);
  ASSERT_FALSE(spawned.has_value());
  EXPECT_EQ(spawned.error().code, errc::out_of_memory);
}

} // namespace
} // namespace kvfleet::actors

namespace kvfleet::actors {
namespace {

/// Whether `a` still runs (its fail state is none).
bool alive(const caf::actor& a) {
  auto* sa = dynamic_cast<caf::scheduled_actor*>(
      caf::actor_cast<caf::abstract_actor*>(a));
  return sa != nullptr && !sa->fail_state();
}

// ---------------------------------------------------------------------------
// Deferred disk reads (engine_actor.cpp: defer_for_disk, run_deferred,
// close_batch) on the test coordinator.

/// A disk tier under an engine on the test coordinator. make_disk cannot
/// put one there: validate() refuses own_thread false with it, and an
/// engine on a thread of its own runs outside the coordinator and its
/// virtual time. So the engine, spawned without one, attaches this tier at
/// its first memory relief (engine_actor_config::relieve, after its first
/// batch); the hook then frees memory as the default rule does. `store` is
/// the engine's store from then on: the test waits for the tier's I/O
/// thread through it between scheduler runs, on the thread the engine runs
/// on, never while the engine runs. The tier's writes pass `gate`, which
/// holds the I/O thread once armed.
struct coordinated_disk {
  engine::testing::temp_dir dir;
  std::shared_ptr<engine::testing::io_gate> gate =
      std::make_shared<engine::testing::io_gate>();
  std::shared_ptr<engine::block_store*> store =
      std::make_shared<engine::block_store*>(nullptr);
  bool held = false; ///< the I/O thread waits at the gate
  std::optional<engine::testing::gate_watchdog> watchdog; ///< while it does

  /// Waits until the tier has answered everything queued: the reads of
  /// the deferred requests have landed (or failed), uncollected.
  void wait_idle() const {
    ASSERT_NE(*store, nullptr);
    EXPECT_TRUE((*store)->disk()->wait_idle());
  }
  /// Lets the held I/O thread go and waits until it has done everything
  /// queued behind it.
  void release() {
    gate->open();
    held = false;
    watchdog.reset();
    wait_idle();
  }
};

void attach_coordinated_disk(engine_actor_config& c, coordinated_disk& d) {
  engine::disk_tier_config disk;
  disk.directory = d.dir.path();
  disk.capacity_bytes = 64u << 20;
  disk.write_fault_for_testing = engine::testing::io_gate::hook(d.gate);
  c.relieve = [disk, cell = d.store, pressure = c.pressure](
                  std::uint32_t, engine::block_store& store) -> std::size_t {
    if (store.disk() == nullptr) {
      auto tier = engine::disk_tier::open(disk);
      if (tier && store.attach_disk(std::move(*tier)).has_value())
        *cell = &store;
    }
    const auto bytes =
        bytes_to_free(pressure, store.used_bytes(), store.capacity_bytes());
    return bytes > 0 ? store.evict_bytes(bytes) : 0;
  };
}

/// A request of `prio` for `keys`, 16 tokens each.
kv_request blocks_request(std::uint64_t id, std::vector<block_key> keys,
                          engine::priority prio = engine::priority::normal) {
  kv_request r;
  r.id = id;
  r.input_tokens = static_cast<std::uint32_t>(keys.size() * 16);
  r.keys = std::move(keys);
  r.prio = prio;
  return r;
}

/// Blocks {group, 1} ... {group, n}.
std::vector<block_key> chain_keys(std::uint64_t group, std::size_t n) {
  std::vector<block_key> keys;
  for (std::size_t i = 1; i <= n; ++i)
    keys.push_back(block_key{group, i});
  return keys;
}

/// `a` then `b`.
std::vector<block_key> joined(std::vector<block_key> a,
                              const std::vector<block_key>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

/// An answer a client got: the request's id, its reply or its error.
struct answer {
  std::uint64_t id = 0;
  std::optional<kv_reply> reply;
  errc code = errc::ok;
};

class disk_deferral_test : public actor_test {
protected:
  ~disk_deferral_test() override {
    // Before the directory goes: the I/O thread let go, the engine stopped
    // (its disk tier closes with it).
    if (disk_.held)
      disk_.gate->open();
    disk_.watchdog.reset();
    for (auto& e : disk_engines_)
      caf::anon_send_exit(e, caf::exit_reason::kill);
    sched_->run();
  }

  /// An engine under `c` over disk_'s tier, which its first request (a
  /// block of its own, evicted before any test block) attached.
  caf::actor disk_engine(engine_actor_config c) {
    attach_coordinated_disk(c, disk_);
    auto e = engine(c);
    disk_engines_.push_back(e);
    ask_now<kv_reply>(e, process_atom::value,
                      blocks_request(900, chain_keys(900, 1)));
    EXPECT_NE(*disk_.store, nullptr) << "no disk tier attached";
    return e;
  }
  /// Evicts every block in memory to disk and waits until it is written.
  void spill_all(const caf::actor& e) {
    evict_all(e);
    disk_.wait_idle();
  }
  /// Asks `e` to evict every block it can; the bytes it freed.
  std::uint64_t evict_all(const caf::actor& e) {
    return ask_now<std::uint64_t>(e, evict_atom::value, std::uint64_t{1} << 40);
  }
  /// Moves every block in the engine's memory to `tier` and lets the copies
  /// finish, so those blocks are in the tier only.
  void demote_all(engine::testing::fake_memory_tier& tier) {
    auto* store = *disk_.store;
    ASSERT_TRUE(store->demote_to_tier(store->used_bytes()).has_value());
    tier.finish_demotions();
    store->poll_tier();
  }
  /// Holds the tier's I/O thread in a write (a block of its own, computed
  /// and evicted, with every other block in memory): the reads started
  /// from now on wait behind it until disk_.release().
  void hold_disk(const caf::actor& e) {
    disk_.gate->arm();
    ask_now<kv_reply>(e, process_atom::value,
                      blocks_request(901, chain_keys(901, 1)));
    evict_all(e);
    ASSERT_TRUE(disk_.gate->wait_entered());
    disk_.held = true;
    disk_.watchdog.emplace(disk_.gate);
  }
  engine_stats stats(const caf::actor& e) {
    return ask_now<engine_stats>(e, stats_atom::value);
  }
  /// Blocks 1 and 2 (two blocks each) cached and spilled, the disk held,
  /// then two low requests of them deferred through a client logging to
  /// `log`: request 11 with a deadline 5 ms from now, request 12 with
  /// none. Returns the client.
  caf::actor defer_late_and_on_time(const caf::actor& e,
                                    std::shared_ptr<std::vector<answer>> log) {
    ask_now<kv_reply>(e, process_atom::value,
                      blocks_request(1, chain_keys(1, 2)));
    ask_now<kv_reply>(e, process_atom::value,
                      blocks_request(2, chain_keys(2, 2)));
    spill_all(e);
    hold_disk(e);
    auto cl = client(e, log);
    const auto now = std::chrono::duration_cast<engine::nanos>(
        sched_->clock().now().time_since_epoch());
    auto late = blocks_request(11, chain_keys(1, 2), engine::priority::low);
    late.deadline_ns = (now + 5ms).count();
    caf::anon_send(cl, late);
    send_via(cl, blocks_request(12, chain_keys(2, 2), engine::priority::low));
    return cl;
  }

  /// An actor that sends `e` each kv_request it is sent, as a request of
  /// its own with no timer, and logs the answers as they come (one engine
  /// answering one client: in the order the engine answered).
  caf::actor client(const caf::actor& e,
                    std::shared_ptr<std::vector<answer>> log) {
    auto c = sys_->spawn([=](caf::event_based_actor* self) -> caf::behavior {
      return {[=](kv_request& r) {
        const auto id = r.id;
        self->request(e, caf::infinite, process_atom::value, std::move(r))
            .then(
                [=](kv_reply& rep) {
                  log->push_back({id, rep, errc::ok});
                },
                [=](caf::error& err) {
                  log->push_back({id, std::nullopt, from_caf_error(err).code});
                });
      }};
    });
    stop_at_end_.push_back(c);
    return c;
  }
  /// Has `c` send `r`, and runs.
  void send_via(const caf::actor& c, kv_request r) {
    caf::anon_send(c, std::move(r));
    sched_->run();
  }
  static std::vector<std::uint64_t> ids(const std::vector<answer>& log) {
    std::vector<std::uint64_t> out;
    for (const auto& a : log)
      out.push_back(a.id);
    return out;
  }

  /// `log` holds one answer: a reply matching all `n` blocks of its
  /// request, every one promoted (from the memory tier or disk), none
  /// computed nor found in memory. `why`: said when the promoted count is
  /// off.
  static void expect_one_reply_all_promoted(const std::vector<answer>& log,
                                            std::uint64_t n,
                                            const char* why = "") {
    ASSERT_EQ(log.size(), 1U);
    ASSERT_TRUE(log.front().reply.has_value());
    const auto& rep = *log.front().reply;
    EXPECT_EQ(rep.matched_blocks, n);
    EXPECT_EQ(rep.computed_blocks, 0U);
    EXPECT_EQ(rep.promoted_blocks, n) << why;
    EXPECT_EQ(rep.memory_blocks, 0U);
  }
  /// After its one request of `n` blocks, deferred `deferred` times, was
  /// served: nothing in flight, each block read from disk once, nothing
  /// held, and all `n` can be evicted.
  void expect_served_and_let_go(const caf::actor& e, std::uint64_t deferred,
                                std::uint64_t n) {
    const auto st = stats(e);
    EXPECT_EQ(st.disk_deferred, deferred);
    EXPECT_EQ(st.in_flight, 0U);
    EXPECT_EQ(st.disk_hits, n) << "a block read twice";
    EXPECT_EQ(st.held_blocks, 0U) << "still held after it was served";
    EXPECT_EQ(evict_all(e), n * block_bytes);
  }

  coordinated_disk disk_;
  std::vector<caf::actor> disk_engines_;
};

TEST_F(disk_deferral_test, ADeferredRequestIsDeferredAgainWhileItsPrefixGrows) {
  // A low request whose prefix is on disk in two runs, the second of them
  // spilled only after the first one's reads started (so promote() read
  // only part): once those have landed, its prefix in memory grew and goes
  // on to disk, so the second run's reads start and it waits off the batch
  // again, not in process(). Its reply counts the blocks of both reads as
  // promoted (the second deferral adds to the first's count).
  ASSERT_TRUE(disk_.dir.ok());
  auto e = disk_engine(small_engine(64));
  const auto a = chain_keys(1, 2);
  const auto b = chain_keys(2, 2);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(1, a));
  spill_all(e);
  ASSERT_NO_FATAL_FAILURE(hold_disk(e));
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  send_via(cl, blocks_request(10, joined(a, b), engine::priority::low));
  auto st = stats(e);
  EXPECT_EQ(st.disk_deferred, 1U);
  EXPECT_EQ(st.in_flight, 1U);
  // b is computed and evicted while a's reads wait: its spill is queued,
  // so it is on disk now, after a.
  ask_now<kv_reply>(e, process_atom::value, blocks_request(2, b));
  EXPECT_EQ(evict_all(e), 2 * block_bytes);
  disk_.release();           // a's reads have landed, b is written
  sched_->advance_time(1ms); // the disk poll
  sched_->run();
  st = stats(e);
  EXPECT_EQ(st.disk_deferred, 2U) << "not deferred again for b's reads";
  EXPECT_EQ(st.in_flight, 1U);
  EXPECT_TRUE(log->empty()) << "served with b's reads in its batch";
  disk_.wait_idle(); // b's reads have landed
  sched_->advance_time(1ms);
  sched_->run();
  ASSERT_NO_FATAL_FAILURE(
      expect_one_reply_all_promoted(*log, 4, "both reads count as promoted"));
  st = stats(e);
  EXPECT_EQ(st.disk_deferred, 2U);
  EXPECT_EQ(st.in_flight, 0U);
  EXPECT_EQ(st.disk_hits, 4U);
}

TEST_F(disk_deferral_test,
       ADeferredRequestWhoseReadsFailIsProcessedNotDeferredAgain) {
  // The disk fails under the tier (its segment files cut short behind its
  // back: every read is an I/O error, and unlike a damaged block the block
  // stays on disk). A low request's reads fail, its prefix in memory does
  // not grow, and it is processed in the pass that finds them answered
  // (process() computes what it cannot read), not deferred again: its
  // blocks still on disk would defer it for ever.
  ASSERT_TRUE(disk_.dir.ok());
  auto e = disk_engine(small_engine(64));
  const auto a = chain_keys(1, 2);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(1, a));
  spill_all(e);
  std::size_t cut = 0;
  for (const auto& f : std::filesystem::directory_iterator(disk_.dir.path()))
    if (f.path().extension() == ".kvs") {
      std::filesystem::resize_file(f.path(), 0);
      ++cut;
    }
  ASSERT_GE(cut, 1U);
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  send_via(cl, blocks_request(10, a, engine::priority::low));
  EXPECT_EQ(stats(e).disk_deferred, 1U);
  disk_.wait_idle(); // the reads have failed
  sched_->advance_time(1ms);
  sched_->run();
  ASSERT_EQ(log->size(), 1U) << "deferred again for reads that fail";
  ASSERT_TRUE(log->front().reply.has_value())
      << static_cast<int>(log->front().code);
  const auto& rep = *log->front().reply;
  EXPECT_EQ(rep.computed_blocks, 2U);
  EXPECT_EQ(rep.promoted_blocks, 0U);
  const auto st = stats(e);
  EXPECT_EQ(st.disk_deferred, 1U);
  EXPECT_EQ(st.in_flight, 0U);
}

TEST_F(disk_deferral_test,
       ALowRequestThroughTheMemoryTierToDiskIsDeferredCountingBoth) {
  // A low request's prefix goes on past memory into the memory tier and
  // then onto disk: promote() brings the tier's run back at once and
  // starts the disk reads, and the request waits off the batch for them.
  // Its reply counts both as promoted_blocks.
  ASSERT_TRUE(disk_.dir.ok());
  auto c = small_engine(64);
  auto tier = attach_fake_tier(c, 40);
  auto e = disk_engine(c);
  ASSERT_NE(*tier, nullptr);
  const auto t = chain_keys(1, 2);
  const auto b = chain_keys(2, 2);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(2, b));
  spill_all(e);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(1, t));
  ASSERT_NO_FATAL_FAILURE(demote_all(**tier));
  auto st = stats(e);
  ASSERT_EQ(st.tier_blocks, 2U);
  ASSERT_EQ(st.blocks, 0U);
  ASSERT_NO_FATAL_FAILURE(hold_disk(e));
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  send_via(cl, blocks_request(10, joined(t, b), engine::priority::low));
  st = stats(e);
  EXPECT_EQ(st.disk_deferred, 1U);
  EXPECT_EQ(st.in_flight, 1U);
  EXPECT_EQ(st.tier_blocks, 0U) << "the tier's run is back in memory";
  disk_.release();
  sched_->advance_time(1ms);
  sched_->run();
  ASSERT_NO_FATAL_FAILURE(
      expect_one_reply_all_promoted(*log, 4, "the tier's and the disk's"));
  st = stats(e);
  EXPECT_EQ(st.tier_hits, 2U);
  EXPECT_EQ(st.disk_hits, 2U);
  EXPECT_EQ(st.disk_deferred, 1U);
}

TEST_F(disk_deferral_test, ARequestWaitsAgainForTheDiskPastATierRun) {
  // Disk, then the memory tier, then disk again: promote() reads the first
  // disk run only (the tier's blocks are not on disk). Once it has landed
  // the request's prefix grew, and the second promote() brings the tier's
  // run back and starts the second disk run's reads: it waits again. Its
  // reply counts all six as promoted.
  ASSERT_TRUE(disk_.dir.ok());
  auto c = small_engine(64);
  auto tier = attach_fake_tier(c, 40);
  auto e = disk_engine(c);
  ASSERT_NE(*tier, nullptr);
  const auto a = chain_keys(1, 2);
  const auto t = chain_keys(2, 2);
  const auto b = chain_keys(3, 2);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(1, a));
  ask_now<kv_reply>(e, process_atom::value, blocks_request(3, b));
  spill_all(e);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(2, t));
  ASSERT_NO_FATAL_FAILURE(demote_all(**tier));
  ASSERT_EQ(stats(e).tier_blocks, 2U);
  ASSERT_NO_FATAL_FAILURE(hold_disk(e));
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  send_via(cl,
           blocks_request(10, joined(joined(a, t), b), engine::priority::low));
  auto st = stats(e);
  EXPECT_EQ(st.disk_deferred, 1U);
  EXPECT_EQ(st.tier_blocks, 2U) << "the tier's run waits for the first reads";
  disk_.release();
  sched_->advance_time(1ms);
  sched_->run();
  st = stats(e);
  EXPECT_EQ(st.disk_deferred, 2U);
  EXPECT_EQ(st.in_flight, 1U);
  EXPECT_EQ(st.tier_blocks, 0U);
  EXPECT_TRUE(log->empty());
  disk_.wait_idle();
  sched_->advance_time(1ms);
  sched_->run();
  ASSERT_NO_FATAL_FAILURE(expect_one_reply_all_promoted(*log, 6));
}

/// Five low requests of two blocks each, deferred on an engine of batches
/// of two whose disk tier's I/O thread is held: the setup of the next two
/// tests. Returns the client that sent them.
class deferred_five_test : public disk_deferral_test {
protected:
  caf::actor defer_five(std::shared_ptr<std::vector<answer>> log) {
    auto c = small_engine(64, 2);
    c.batch.close_when_idle = true;
    engine_ = disk_engine(c);
    for (std::uint64_t i = 1; i <= 5; ++i)
      ask_now<kv_reply>(engine_, process_atom::value,
                        blocks_request(i, chain_keys(i, 2)));
    spill_all(engine_);
    hold_disk(engine_);
    auto cl = client(engine_, log);
    for (std::uint64_t i = 1; i <= 5; ++i)
      caf::anon_send(
          cl, blocks_request(10 + i, chain_keys(i, 2), engine::priority::low));
    sched_->run();
    const auto st = stats(engine_);
    EXPECT_EQ(st.disk_deferred, 5U);
    EXPECT_EQ(st.in_flight, 5U);
    EXPECT_TRUE(log->empty());
    return cl;
  }
  caf::actor engine_;
};

TEST_F(deferred_five_test,
       APassServesAtMostABatchOfDeferredRequestsTheRestBehindTheMailbox) {
  // Passes that serve nothing (the reads wait) count no batch: neither the
  // disk poll's nor the one after a batch, which counts its own. Once the
  // reads have landed, the poll serves two (a batch's max_size) and sends
  // the next poll behind the mailbox, so a request queued meanwhile runs
  // between passes: that poll finds it in the batcher, above the deferred
  // requests' priority, and serves none; its batch's close serves two
  // more, and the last waits for the timed poll (one poll on its way at a
  // time). (Before, the second poll served two ahead of the normal
  // request.)
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = defer_five(log);
  ASSERT_FALSE(HasFatalFailure());
  const auto batches = stats(engine_).batches;
  sched_->advance_time(1ms); // a poll: nothing has landed
  sched_->run();
  ask_now<kv_reply>(engine_, process_atom::value,
                    blocks_request(20, chain_keys(20, 1)));
  auto st = stats(engine_);
  EXPECT_EQ(st.batches, batches + 1) << "a pass that served none counted";
  EXPECT_EQ(st.in_flight, 5U);
  disk_.release();
  // The poll is in the mailbox, then a normal request behind it.
  sched_->advance_time(1ms);
  caf::anon_send(cl, blocks_request(21, chain_keys(21, 1)));
  run_all_but(*sched_, engine_);
  sched_->run();
  EXPECT_EQ(ids(*log), (std::vector<std::uint64_t>{11, 12, 21, 13, 14}));
  EXPECT_EQ(stats(engine_).in_flight, 1U);
  sched_->advance_time(1ms);
  sched_->run();
  EXPECT_EQ(ids(*log), (std::vector<std::uint64_t>{11, 12, 21, 13, 14, 15}));
  for (const auto& a : *log) {
    ASSERT_TRUE(a.reply.has_value()) << a.id;
    if (a.id != 21) {
      EXPECT_EQ(a.reply->promoted_blocks, 2U) << a.id;
    }
  }
  st = stats(engine_);
  EXPECT_EQ(st.in_flight, 0U);
  // Two passes from polls, the request's batch and the pass after it.
  EXPECT_EQ(st.batches, batches + 1 + 4);
}

TEST_F(deferred_five_test,
       ABatchLeavesTheDeferredRequestsPastItsMaxSizeToThePollOnItsWay) {
  // The pass after a batch serves at most max_size of the deferred
  // requests ready; with the timed disk poll on its way it sends no second
  // one, so the rest wait for it (one poll in flight at a time).
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = defer_five(log);
  ASSERT_FALSE(HasFatalFailure());
  disk_.release();
  send_via(cl, blocks_request(21, chain_keys(21, 1)));
  EXPECT_EQ(ids(*log), (std::vector<std::uint64_t>{21, 11, 12}));
  EXPECT_EQ(stats(engine_).in_flight, 3U);
  sched_->advance_time(1ms);
  sched_->run();
  EXPECT_EQ(ids(*log), (std::vector<std::uint64_t>{21, 11, 12, 13, 14, 15}));
  EXPECT_EQ(stats(engine_).in_flight, 0U);
}

TEST_F(disk_deferral_test,
       ADeferredRequestPastItsDeadlineIsAnsweredUnprocessed) {
  // A deferred request whose deadline passes while it waits is answered
  // errc::timeout at the next pass, unprocessed, and is not counted as
  // served: a pass with nothing else counts no batch.
  ASSERT_TRUE(disk_.dir.ok());
  auto e = disk_engine(small_engine(64));
  auto log = std::make_shared<std::vector<answer>>();
  caf::actor cl;
  ASSERT_NO_FATAL_FAILURE(cl = defer_late_and_on_time(e, log));
  const auto before = stats(e);
  EXPECT_EQ(before.disk_deferred, 2U);
  EXPECT_EQ(before.in_flight, 2U);
  sched_->advance_time(5ms); // a poll at the deadline; the reads wait
  sched_->run();
  ASSERT_EQ(log->size(), 1U);
  EXPECT_EQ(log->front().id, 11U);
  EXPECT_EQ(log->front().code, errc::timeout);
  auto st = stats(e);
  EXPECT_EQ(st.expired, before.expired + 1);
  EXPECT_EQ(st.requests, before.requests) << "processed";
  EXPECT_EQ(st.batches, before.batches) << "counted as served";
  EXPECT_EQ(st.in_flight, 1U);
  disk_.release();
  sched_->advance_time(1ms);
  sched_->run();
  ASSERT_EQ(log->size(), 2U);
  ASSERT_TRUE(log->back().reply.has_value());
  EXPECT_EQ(log->back().reply->promoted_blocks, 2U);
  st = stats(e);
  EXPECT_EQ(st.requests, before.requests + 1);
  EXPECT_EQ(st.batches, before.batches + 1);
  EXPECT_EQ(st.in_flight, 0U);
}

TEST_F(disk_deferral_test, APassWithOnlyLateRequestsStillTellsWhatLanded) {
  // A deferred request's reads land, and the pass that collects them finds
  // it past its deadline: answered unprocessed, nothing served. The blocks
  // that landed are still told to the listeners at once (and pressure
  // relieved). Before, only a pass that served a request published, so the
  // listeners heard of them only at the engine's next call.
  ASSERT_TRUE(disk_.dir.ok());
  auto e = disk_engine(small_engine(64));
  const auto a = chain_keys(1, 2);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(1, a));
  spill_all(e);
  auto events = std::make_shared<std::vector<block_events>>();
  record_events(e, events);
  ASSERT_NO_FATAL_FAILURE(hold_disk(e));
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  const auto now = std::chrono::duration_cast<engine::nanos>(
      sched_->clock().now().time_since_epoch());
  auto late = blocks_request(11, a, engine::priority::low);
  late.deadline_ns = (now + 5ms).count();
  send_via(cl, late);
  EXPECT_EQ(stats(e).disk_deferred, 1U);
  sched_->run();
  disk_.release(); // the reads have landed, not collected yet
  events->clear();
  sched_->advance_time(5ms); // the poll, at the deadline
  sched_->run();
  ASSERT_EQ(log->size(), 1U);
  EXPECT_EQ(log->front().code, errc::timeout);
  std::set<block_key> stored;
  for (const auto& ev : *events)
    stored.insert(ev.stored.begin(), ev.stored.end());
  EXPECT_EQ(stored, (std::set<block_key>(a.begin(), a.end())))
      << "the blocks that landed were not told";
}

TEST_F(disk_deferral_test, ALateDeferredRequestTakesNoPlaceInAPass) {
  // A pass serves at most max_size deferred requests (one here), and one
  // answered late does not count toward them: the late one and the next
  // ready one are both answered in the poll's pass, before a critical
  // request read after the poll (whose batch closes ahead of any poll sent
  // behind the mailbox).
  ASSERT_TRUE(disk_.dir.ok());
  auto e = disk_engine(small_engine(64));
  auto log = std::make_shared<std::vector<answer>>();
  caf::actor cl;
  ASSERT_NO_FATAL_FAILURE(cl = defer_late_and_on_time(e, log));
  EXPECT_EQ(stats(e).disk_deferred, 2U);
  disk_.release();           // both have landed
  sched_->advance_time(5ms); // the poll, past the first one's deadline
  caf::anon_send(
      cl, blocks_request(21, chain_keys(21, 1), engine::priority::critical));
  run_all_but(*sched_, e);
  sched_->run();
  EXPECT_EQ(ids(*log), (std::vector<std::uint64_t>{11, 12, 21}));
  ASSERT_EQ(log->size(), 3U);
  EXPECT_EQ((*log)[0].code, errc::timeout);
  EXPECT_TRUE((*log)[1].reply.has_value());
  EXPECT_TRUE((*log)[2].reply.has_value());
}

TEST_F(disk_deferral_test, ADeferredRequestsLandedBlocksStayUntilItIsServed) {
  // What a low request's reads brought back is held in memory from the
  // moment it lands until the request is served: a call in between that
  // makes room (here an eviction of everything it can) passes over it, and
  // the request finds all of it in memory. Once served, it is let go.
  // (Before, the eviction took the landed blocks, and the request read
  // them again in process().)
  ASSERT_TRUE(disk_.dir.ok());
  auto e = disk_engine(small_engine(64));
  const auto a = chain_keys(1, 4);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(1, a));
  spill_all(e);
  ASSERT_NO_FATAL_FAILURE(hold_disk(e));
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  send_via(cl, blocks_request(10, a, engine::priority::low));
  EXPECT_EQ(stats(e).disk_deferred, 1U);
  disk_.release();
  // The eviction collects the landed reads first: they are held.
  EXPECT_EQ(evict_all(e), 0U)
      << "the landed blocks were evicted before their request was served";
  EXPECT_EQ(stats(e).held_blocks, 4U);
  sched_->advance_time(1ms);
  sched_->run();
  ASSERT_NO_FATAL_FAILURE(expect_one_reply_all_promoted(*log, 4));
  expect_served_and_let_go(e, 1, 4);
}

TEST_F(disk_deferral_test,
       ARequestDeferredAgainKeepsWhatItsFirstReadsBroughtBackHeld) {
  // A low request whose prefix is on disk in two runs, the second spilled
  // after the first one's reads started: once those have landed it is
  // deferred again for the second run's reads (defer_for_disk with its
  // prior hold token). While it waits again, the first run's blocks stay
  // held: an eviction of everything takes none of them (held_blocks counts
  // them; the eviction cannot take them anyway while b's slots, their
  // children, wait for b's reads). Were the first hold let go at the second
  // deferral, a failed read of b would leave them to go first (low
  // priority), and the request would read them again in process(). Once
  // served, nothing is held, and its reply counts every block as promoted.
  ASSERT_TRUE(disk_.dir.ok());
  auto e = disk_engine(small_engine(64));
  const auto a = chain_keys(1, 2);
  const auto b = chain_keys(2, 2);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(1, a));
  spill_all(e);
  ASSERT_NO_FATAL_FAILURE(hold_disk(e));
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  send_via(cl, blocks_request(10, joined(a, b), engine::priority::low));
  EXPECT_EQ(stats(e).disk_deferred, 1U);
  // b goes to disk behind a's reads; block {902, 1} stays in memory.
  ask_now<kv_reply>(e, process_atom::value, blocks_request(2, b));
  EXPECT_EQ(evict_all(e), 2 * block_bytes);
  ask_now<kv_reply>(e, process_atom::value,
                    blocks_request(902, chain_keys(902, 1)));
  disk_.release(); // a's reads have landed (uncollected), b is written
  // The I/O thread held again, in {902, 1}'s spill: b's reads, started at
  // the next poll, wait behind it. The eviction collects a's reads first.
  disk_.gate->arm();
  EXPECT_EQ(ask_now<std::uint64_t>(e, evict_atom::value, block_bytes),
            block_bytes);
  ASSERT_TRUE(disk_.gate->wait_entered());
  disk_.held = true;
  disk_.watchdog.emplace(disk_.gate);
  sched_->advance_time(1ms); // the disk poll: deferred again for b
  sched_->run();
  auto st = stats(e);
  EXPECT_EQ(st.disk_deferred, 2U);
  EXPECT_EQ(st.in_flight, 1U);
  EXPECT_TRUE(log->empty());
  EXPECT_EQ(st.held_blocks, 2U) << "a's blocks let go while it waits again";
  EXPECT_EQ(evict_all(e), 0U)
      << "a's blocks were evicted while their request waited again";
  st = stats(e);
  EXPECT_EQ(st.held_blocks, 2U);
  EXPECT_EQ(st.blocks, 4U) << "a's, and the slots b's reads land in";
  disk_.release(); // b's reads have landed
  sched_->advance_time(1ms);
  sched_->run();
  ASSERT_NO_FATAL_FAILURE(expect_one_reply_all_promoted(*log, 4));
  expect_served_and_let_go(e, 2, 4);
}

TEST_F(disk_deferral_test,
       ALowRequestWhoseTierRunStartsNoReadIsServedInItsBatchCountingIt) {
  // A low request whose prefix goes into the memory tier and then to a
  // block both in memory and on disk: promote() brings the tier's run back
  // (held for the request) and links the rest, starting no disk read. The
  // request is not deferred but served in its batch (defer_for_disk's
  // served_after): its reply counts the tier's blocks as promoted, which
  // process() found in memory, and the hold taken for promote() is let go
  // with its answer. Served without served_after, the reply would count
  // them as memory blocks; not let go, they would stay held for good.
  ASSERT_TRUE(disk_.dir.ok());
  auto c = small_engine(64);
  auto tier = attach_fake_tier(c, 40);
  auto e = disk_engine(c);
  ASSERT_NE(*tier, nullptr);
  const auto t = chain_keys(1, 2);
  const auto b = chain_keys(2, 2);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(2, b));
  spill_all(e);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(1, t));
  ASSERT_NO_FATAL_FAILURE(demote_all(**tier));
  // b read back from disk: in memory, its disk copies kept.
  EXPECT_EQ(ask_now<kv_reply>(e, process_atom::value, blocks_request(3, b))
                .promoted_blocks,
            2U);
  auto st = stats(e);
  ASSERT_EQ(st.tier_blocks, 2U);
  ASSERT_EQ(st.blocks, 2U);
  ASSERT_EQ(ask_now<std::uint64_t>(e, lookup_atom::value, joined(t, b)), 4U);
  const auto before = st;
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  send_via(cl, blocks_request(10, joined(t, b), engine::priority::low));
  ASSERT_EQ(log->size(), 1U) << "not served in its batch";
  ASSERT_TRUE(log->front().reply.has_value())
      << static_cast<int>(log->front().code);
  const auto& rep = *log->front().reply;
  EXPECT_EQ(rep.matched_blocks, 4U);
  EXPECT_EQ(rep.computed_blocks, 0U);
  EXPECT_EQ(rep.promoted_blocks, 2U) << "the tier's run";
  EXPECT_EQ(rep.memory_blocks, 2U);
  st = stats(e);
  EXPECT_EQ(st.disk_deferred, 0U);
  EXPECT_EQ(st.in_flight, 0U);
  EXPECT_EQ(st.held_blocks, 0U) << "promote()'s hold not let go";
  EXPECT_EQ(st.tier_blocks, 0U);
  EXPECT_EQ(st.tier_hits, before.tier_hits + 2);
  EXPECT_EQ(st.disk_hits, before.disk_hits) << "a disk read started";
  EXPECT_EQ(st.batches, before.batches + 1);
  EXPECT_EQ(evict_all(e), 4 * block_bytes);
}

TEST_F(disk_deferral_test, ALowRequestWhoseReadsFindNoRoomIsNotDeferred) {
  // Memory full of open puts (reserved slots: nothing to evict), a low
  // request whose prefix is on disk: promote() cannot reserve a slot for
  // its first block, so no read starts, and the request is not deferred
  // (there is nothing for it to wait for): it is answered in its batch, as
  // process() answers it, with nothing held. Once the puts are aborted,
  // the same request is deferred and reads its blocks.
  ASSERT_TRUE(disk_.dir.ok());
  auto e = disk_engine(small_engine(64));
  const auto a = chain_keys(1, 2);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(1, a));
  spill_all(e);
  std::vector<std::uint64_t> tickets;
  for (std::uint64_t i = 1; i <= 64; ++i) {
    put_request p;
    p.key = block_key{50, i};
    auto r = ask<std::uint64_t>(e, reserve_atom::value, p);
    sched_->run();
    if (!r->value)
      break;
    tickets.push_back(*r->value);
  }
  auto st = stats(e);
  ASSERT_GE(tickets.size(), 1U);
  ASSERT_EQ(st.used_bytes, st.capacity_bytes) << tickets.size();
  const auto before = st;
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  send_via(cl, blocks_request(10, a, engine::priority::low));
  st = stats(e);
  EXPECT_EQ(st.disk_deferred, 0U) << "deferred with no read started";
  EXPECT_EQ(st.in_flight, 0U);
  EXPECT_EQ(st.held_blocks, 0U);
  EXPECT_EQ(st.batches, before.batches + 1);
  ASSERT_EQ(log->size(), 1U) << "not answered in its batch";
  ASSERT_TRUE(log->front().reply.has_value())
      << static_cast<int>(log->front().code);
  // process() computes what it cannot read, with no room to keep it.
  EXPECT_EQ(log->front().reply->computed_blocks, 2U);
  EXPECT_EQ(log->front().reply->uncached_blocks, 2U);
  EXPECT_EQ(log->front().reply->promoted_blocks, 0U);
  for (const auto ticket : tickets)
    EXPECT_TRUE(ask_now<bool>(e, abort_atom::value, ticket));
  send_via(cl, blocks_request(11, a, engine::priority::low));
  EXPECT_EQ(stats(e).disk_deferred, 1U) << "the room was not the reason";
  disk_.wait_idle();
  sched_->advance_time(1ms);
  sched_->run();
  ASSERT_EQ(log->size(), 2U);
  ASSERT_TRUE(log->back().reply.has_value());
  EXPECT_EQ(log->back().reply->promoted_blocks, 2U);
  st = stats(e);
  EXPECT_EQ(st.in_flight, 0U);
  EXPECT_EQ(st.held_blocks, 0U);
}

TEST_F(disk_deferral_test,
       ALowRequestWhosePrefixEndsPastTheMemoryTierOffDiskIsNotDeferred) {
  // The memory tier's run, then a block on no tier (or the request's end):
  // defer_for_disk leaves it to process() before promote() (nothing to
  // read from disk), so nothing is held for it; process() brings the
  // tier's run back itself and counts it as promoted.
  ASSERT_TRUE(disk_.dir.ok());
  auto c = small_engine(64);
  auto tier = attach_fake_tier(c, 40);
  auto e = disk_engine(c);
  ASSERT_NE(*tier, nullptr);
  const auto t = chain_keys(1, 2);
  spill_all(e); // the engine's own block
  ask_now<kv_reply>(e, process_atom::value, blocks_request(1, t));
  ASSERT_NO_FATAL_FAILURE(demote_all(**tier));
  ASSERT_EQ(stats(e).tier_blocks, 2U);
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  send_via(cl, blocks_request(10, joined(t, chain_keys(2, 1)),
                              engine::priority::low));
  ASSERT_EQ(log->size(), 1U) << "not served in its batch";
  ASSERT_TRUE(log->front().reply.has_value());
  EXPECT_EQ(log->front().reply->promoted_blocks, 2U);
  EXPECT_EQ(log->front().reply->computed_blocks, 1U);
  auto st = stats(e);
  EXPECT_EQ(st.disk_deferred, 0U);
  EXPECT_EQ(st.held_blocks, 0U);
  EXPECT_EQ(st.tier_blocks, 0U);
  EXPECT_EQ(st.in_flight, 0U);
}

TEST_F(disk_deferral_test,
       DeferredLowRequestsWaitForCriticalOnesLeftInTheBatcher) {
  // Five low requests wait off the batch for disk reads; once they land,
  // four critical requests arrive at once, two more than a batch takes.
  // The two left in the batcher run before any of the low ones. (Before,
  // the close of the first batch served up to a batch of ready deferred
  // requests first, each computing its missing block, while the critical
  // ones left over waited.)
  ASSERT_TRUE(disk_.dir.ok());
  auto order = std::make_shared<std::vector<std::uint64_t>>();
  auto c = small_engine(64, 2);
  c.batch.close_when_idle = true; // a lone request runs at once
  c.store.on_block_event = [order](engine::block_event ev, const block_key& k) {
    // Each request's computed block: a critical one's only block, a low
    // one's third.
    if (ev == engine::block_event::stored && (k.hi >= 30 || k.lo == 3))
      order->push_back(k.hi);
  };
  auto e = disk_engine(c);
  for (std::uint64_t i = 1; i <= 5; ++i)
    ask_now<kv_reply>(e, process_atom::value,
                      blocks_request(i, chain_keys(i, 2)));
  spill_all(e);
  hold_disk(e);
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  for (std::uint64_t i = 1; i <= 5; ++i)
    caf::anon_send(
        cl, blocks_request(10 + i, chain_keys(i, 3), engine::priority::low));
  sched_->run();
  ASSERT_EQ(stats(e).disk_deferred, 5U);
  disk_.release();
  disk_.wait_idle();
  order->clear();
  for (std::uint64_t i = 0; i < 4; ++i)
    sys_->spawn([=](caf::event_based_actor* self) {
      request_at(self, engine::priority::critical, e, caf::infinite,
                 process_atom::value,
                 blocks_request(30 + i, chain_keys(30 + i, 1),
                                engine::priority::critical))
          .then([](kv_reply&) {}, [](caf::error&) {});
    });
  run_all_but(*sched_, e);
  sched_->run();
  sched_->advance_time(1s); // a disk poll, should any be left
  sched_->run();
  ASSERT_EQ(order->size(), 9U);
  for (std::size_t i = 0; i < 4; ++i)
    EXPECT_GE((*order)[i], 30U) << "a low request ran at " << i;
  EXPECT_EQ(log->size(), 5U);
  const auto st = stats(e);
  EXPECT_EQ(st.in_flight, 0U);
  EXPECT_EQ(st.held_blocks, 0U);
  // Every block computed, the low requests' third ones included (served
  // off their batch once their reads landed), came from a batch's one
  // producer call.
  EXPECT_EQ(st.produced_alone, 0U);
}

TEST_F(disk_deferral_test, ReadyDeferredRequestsGoLowBeforeBackground) {
  // Two background requests, then a low one, wait off the batch for disk
  // reads; once all have landed, the low one is served first, as the
  // batcher's lanes would order them. (Before, in the order deferred.)
  ASSERT_TRUE(disk_.dir.ok());
  auto e = disk_engine(small_engine(64));
  for (std::uint64_t i = 1; i <= 3; ++i)
    ask_now<kv_reply>(e, process_atom::value,
                      blocks_request(i, chain_keys(i, 2)));
  spill_all(e);
  hold_disk(e);
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  // In batches of their own: one batch would run (and defer) the low one
  // first.
  send_via(cl,
           blocks_request(11, chain_keys(1, 2), engine::priority::background));
  send_via(cl,
           blocks_request(12, chain_keys(2, 2), engine::priority::background));
  send_via(cl, blocks_request(13, chain_keys(3, 2), engine::priority::low));
  ASSERT_EQ(stats(e).disk_deferred, 3U);
  ASSERT_TRUE(log->empty());
  disk_.release();
  disk_.wait_idle();
  sched_->advance_time(1s); // the disk poll
  sched_->run();
  EXPECT_EQ(ids(*log), (std::vector<std::uint64_t>{13, 11, 12}));
}

TEST_F(disk_deferral_test, AReadyDeferredBackgroundRequestWaitsForAQueuedLow) {
  // A background request waits off the batch for its disk reads; they
  // land, and a low request reaches the engine before the disk poll: the
  // low one is served first, as the batcher's lanes would order them.
  // (Before, only a request above low held deferred ones back.)
  ASSERT_TRUE(disk_.dir.ok());
  auto c = small_engine(64);
  c.batch = batch_config{4, 100ms, true};
  auto e = disk_engine(c);
  const auto b = chain_keys(1, 2);
  ask_now<kv_reply>(e, process_atom::value, blocks_request(1, b));
  spill_all(e);
  ASSERT_NO_FATAL_FAILURE(hold_disk(e));
  auto log = std::make_shared<std::vector<answer>>();
  auto cl = client(e, log);
  send_via(cl, blocks_request(20, b, engine::priority::background));
  ASSERT_EQ(stats(e).disk_deferred, 1U);
  disk_.release();
  disk_.wait_idle();
  caf::anon_send(cl,
                 blocks_request(30, chain_keys(5, 2), engine::priority::low));
  sched_->run_once();        // the client sends it
  sched_->advance_time(1ms); // the disk poll, behind it in the mailbox
  sched_->run();
  EXPECT_EQ(ids(*log), (std::vector<std::uint64_t>{30, 20}));
}

TEST_F(actor_test, AQueuedRequestPastItsDeadlineIsAnsweredBelowFullBatches) {
  // A low request with a 5 ms deadline waits in the batcher, behind a low
  // request with none, while 30 normal requests fill every batch. At the
  // first batch close past its deadline it is answered errc::timeout,
  // unprocessed, ahead of the normal requests still queued. (Before, it
  // stayed queued, counted as load, until the normal requests were done:
  // answered last; and once that was mended for the front of each lane,
  // still so behind the low request without a deadline.)
  auto c = small_engine(1024, 2);
  c.batch.close_when_idle = true;
  auto e = engine(c);
  sched_->run();
  // Logs the id of each answer, in the order the engine answered.
  auto answered = std::make_shared<std::vector<std::uint64_t>>();
  auto low_code = std::make_shared<errc>(errc::ok);
  auto cl = sys_->spawn([=](caf::event_based_actor* self) -> caf::behavior {
    return {[=](kv_request& r) {
      const auto id = r.id;
      self->request(e, caf::infinite, process_atom::value, std::move(r))
          .then([=](kv_reply&) { answered->push_back(id); },
                [=](caf::error& err) {
                  answered->push_back(id);
                  if (id == 1)
                    *low_code = from_caf_error(err).code;
                });
    }};
  });
  stop_at_end_.push_back(cl);
  const auto now = std::chrono::duration_cast<engine::nanos>(
      sched_->clock().now().time_since_epoch());
  caf::anon_send(cl,
                 blocks_request(2, chain_keys(2, 1), engine::priority::low));
  auto low = blocks_request(1, chain_keys(1, 1), engine::priority::low);
  low.deadline_ns = (now + 5ms).count();
  caf::anon_send(cl, low);
  for (std::uint64_t id = 100; id < 130; ++id)
    caf::anon_send(cl, blocks_request(id, chain_keys(id, 1)));
  run_all_but(*sched_, e); // all 32 in the engine's mailbox
  // Half a millisecond per message handled: the low request's deadline
  // passes after a few batches of two normal requests each.
  while (sched_->try_run_once())
    sched_->advance_time(500us);
  sched_->run();
  ASSERT_EQ(answered->size(), 32U);
  const auto at = std::find(answered->begin(), answered->end(), 1U);
  ASSERT_NE(at, answered->end());
  EXPECT_LT(at - answered->begin(), 20) << "answered after the traffic";
  EXPECT_EQ(*low_code, errc::timeout);
  const auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.expired, 1U);
  EXPECT_EQ(st.in_flight, 0U);
}

/// What a batch_counting_producer saw: its produce_batch() calls (the keys
/// of each) and its produce() calls outside them.
struct producer_calls {
  std::vector<std::vector<block_key>> batches;
  int alone = 0;
  bool fail_batch = false;
};

/// A synthetic producer that records its calls in `calls`.
class batch_counting_producer final : public engine::kv_producer {
public:
  explicit batch_counting_producer(std::shared_ptr<producer_calls> calls)
      : calls_(std::move(calls)) {}
  result<void> produce(const engine::namespace_spec& spec, const block_key& key,
                       std::span<std::byte> out) override {
    ++calls_->alone;
    return inner_.produce(spec, key, out);
  }
  result<void> produce_batch(const engine::namespace_spec& spec,
                             std::span<const block_key> keys,
                             std::span<std::byte> out) override {
    calls_->batches.emplace_back(keys.begin(), keys.end());
    if (calls_->fail_batch)
      return make_error(errc::io_error, "the model's batch failed");
    const auto bytes = spec.value_bytes();
    for (std::size_t i = 0; i < keys.size(); ++i)
      if (auto ok =
              inner_.produce(spec, keys[i], out.subspan(i * bytes, bytes));
          !ok)
        return ok;
    return {};
  }
  engine::nanos cost(std::size_t) const noexcept override { return {}; }

private:
  std::shared_ptr<producer_calls> calls_;
  engine::synthetic_producer inner_;
};

TEST_F(actor_test, ABatchComputesTheBlocksItsRequestsMissInOneProducerCall) {
  // Three requests in one batch miss four distinct blocks (the second
  // shares the first's two): the producer computes them in one
  // produce_batch call and none alone; every reply counts as before, and
  // the bytes read back are the producer's. (Before, each block was a
  // produce() call of its own: a batch handed a model no batched prefill.)
  auto calls = std::make_shared<producer_calls>();
  auto c = small_engine(64, 3);
  c.make_producer = [calls] {
    return std::make_unique<batch_counting_producer>(calls);
  };
  auto e = engine(c);
  const auto r1 = blocks_request(1, chain_keys(1, 2));
  const auto r2 = blocks_request(2, joined(chain_keys(1, 2), chain_keys(2, 1)));
  const auto r3 = blocks_request(3, chain_keys(3, 1));
  auto a1 = ask<kv_reply>(e, process_atom::value, r1);
  auto a2 = ask<kv_reply>(e, process_atom::value, r2);
  auto a3 = ask<kv_reply>(e, process_atom::value, r3);
  sched_->run();
  ASSERT_TRUE(a1->value && a2->value && a3->value);
  EXPECT_EQ(a1->value->computed_blocks, 2U);
  EXPECT_EQ(a2->value->matched_blocks, 2U);
  EXPECT_EQ(a2->value->computed_blocks, 1U);
  EXPECT_EQ(a3->value->computed_blocks, 1U);
  ASSERT_EQ(calls->batches.size(), 1U);
  EXPECT_EQ(calls->batches[0],
            (std::vector<block_key>{block_key{1, 1}, block_key{1, 2},
                                    block_key{2, 1}, block_key{3, 1}}));
  EXPECT_EQ(calls->alone, 0);
  const auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.batches, 1U);
  EXPECT_EQ(st.prefill_calls, 1U);
  EXPECT_EQ(st.prefilled_blocks, 4U);
  EXPECT_EQ(st.prefill_unused, 0U);
  EXPECT_EQ(st.produced_alone, 0U);
  engine::synthetic_producer reference;
  engine::namespace_spec spec = c.ns;
  std::vector<std::byte> want(spec.value_bytes());
  ASSERT_TRUE(reference.produce(spec, block_key{2, 1}, want).has_value());
  const auto got =
      ask_now<std::vector<std::uint8_t>>(e, read_atom::value, block_key{2, 1});
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size()), 0);
  // A later batch of only hits calls nothing.
  auto again = ask<kv_reply>(e, process_atom::value, r2);
  caf::anon_send(e, process_atom::value, r1);
  caf::anon_send(e, process_atom::value, r3);
  sched_->run();
  ASSERT_TRUE(again->value.has_value());
  EXPECT_EQ(again->value->matched_blocks, 3U);
  EXPECT_EQ(calls->batches.size(), 1U);
}

TEST_F(actor_test, ARequestPastThePrefillBoundIsLeftOutAndASmallerOneFits) {
  // A bound of two blocks: the first request's block fits, the second's
  // three do not (computed alone), the third's block still fits.
  auto calls = std::make_shared<producer_calls>();
  auto c = small_engine(64, 3);
  c.prefill_bytes = 2 * c.ns.value_bytes();
  c.make_producer = [calls] {
    return std::make_unique<batch_counting_producer>(calls);
  };
  auto e = engine(c);
  auto a1 = ask<kv_reply>(e, process_atom::value,
                          blocks_request(1, chain_keys(1, 1)));
  auto a2 = ask<kv_reply>(e, process_atom::value,
                          blocks_request(2, chain_keys(2, 3)));
  auto a3 = ask<kv_reply>(e, process_atom::value,
                          blocks_request(3, chain_keys(3, 1)));
  sched_->run();
  ASSERT_TRUE(a1->value && a2->value && a3->value);
  ASSERT_EQ(calls->batches.size(), 1U);
  EXPECT_EQ(calls->batches[0],
            (std::vector<block_key>{block_key{1, 1}, block_key{3, 1}}));
  EXPECT_EQ(calls->alone, 3);
}

TEST_F(actor_test, WithoutAPrefillBoundOrWhenTheBatchCallFailsBlocksGoAlone) {
  // prefill_bytes 0: no batch call, each block computed alone. A batch
  // call that fails: counted, and each block is computed alone; the
  // requests succeed all the same.
  for (const bool fail : {false, true}) {
    auto calls = std::make_shared<producer_calls>();
    calls->fail_batch = fail;
    auto c = small_engine(64, 2);
    c.prefill_bytes = fail ? c.prefill_bytes : 0;
    c.make_producer = [calls] {
      return std::make_unique<batch_counting_producer>(calls);
    };
    auto e = engine(c);
    auto a1 = ask<kv_reply>(e, process_atom::value,
                            blocks_request(1, chain_keys(1, 2)));
    auto a2 = ask<kv_reply>(e, process_atom::value,
                            blocks_request(2, chain_keys(2, 1)));
    sched_->run();
    ASSERT_TRUE(a1->value && a2->value) << fail;
    EXPECT_EQ(a1->value->computed_blocks, 2U);
    EXPECT_EQ(calls->batches.size(), fail ? 1U : 0U);
    EXPECT_EQ(calls->alone, 3);
    const auto st = ask_now<engine_stats>(e, stats_atom::value);
    EXPECT_EQ(st.prefill_failures, fail ? 1U : 0U);
    EXPECT_EQ(st.prefilled_blocks, 0U);
    EXPECT_EQ(st.produced_alone, 3U);
  }
}

TEST_F(actor_test, OnlyARequestTheBatchCallComputedForIsLetOffItsTime) {
  // Each block takes 10 ms. A batch of two: the first request's block fits
  // the prefill bound (one block), the second's, with a 5 ms deadline, is
  // past it. The batch call's 10 ms do not count against the first; the
  // second came to its turn at 10 ms, past its deadline, with nothing
  // computed for it: answered errc::timeout unprocessed. (Before, the
  // batch call's time was taken off every request of the batch, and the
  // second was processed, computing its block alone, though its caller had
  // been told it timed out.)
  auto c = small_engine(64, 2);
  c.prefill_bytes = c.ns.value_bytes();
  auto* sched = sched_;
  c.make_producer = [sched] {
    return std::make_unique<clock_moving_producer>(*sched, 10ms);
  };
  auto e = engine(c);
  sched_->run();
  const auto now = std::chrono::duration_cast<engine::nanos>(
      sched_->clock().now().time_since_epoch());
  auto first = blocks_request(1, chain_keys(1, 1));
  first.deadline_ns = (now + 8ms).count();
  auto second = blocks_request(2, chain_keys(2, 1));
  second.deadline_ns = (now + 5ms).count();
  auto a1 = ask<kv_reply>(e, process_atom::value, first);
  auto a2 = ask<kv_reply>(e, process_atom::value, second);
  sched_->run();
  ASSERT_TRUE(a1->value.has_value());
  EXPECT_EQ(a1->value->computed_blocks, 1U);
  ASSERT_TRUE(a2->error.has_value());
  EXPECT_EQ(from_caf_error(*a2->error).code, errc::timeout);
  const auto st = ask_now<engine_stats>(e, stats_atom::value);
  EXPECT_EQ(st.expired, 1U);
  EXPECT_EQ(st.prefill_calls, 1U);
  EXPECT_EQ(st.produced_alone, 0U);
}

TEST_F(actor_test, AListenerThatHandlesTooLittleEndsNoBalancerAndNoEngine) {
  // The balancer sends its listeners observe_atom, latency_atom and
  // block_events; an engine sends block_events. A listener that handles
  // fewer used to answer the rest with an error message, and CAF ends an
  // actor on an error message it has no handler for: the balancer (with
  // every engine) or the engine ended. Subscribing a balancer's own engine
  // to it, or an engine to itself, did the same.
  auto b = balancer(routing_policy::least_loaded, {small_engine(64)});
  sched_->run();
  const auto e0 = ask_now<caf::actor>(b, engine_atom::value, std::uint32_t{0});
  auto events = std::make_shared<int>(0);
  auto events_only =
      sys_->spawn([events](caf::event_based_actor*) -> caf::behavior {
        return {[events](const block_events&) { ++*events; }};
      });
  auto nothing = sys_->spawn(
      [](caf::event_based_actor*) -> caf::behavior { return {[](int) {}}; });
  stop_at_end_.push_back(events_only);
  stop_at_end_.push_back(nothing);
  caf::anon_send(b, listen_atom::value, events_only);
  caf::anon_send(b, listen_atom::value, e0);
  caf::anon_send(b, listen_atom::value, b); // would forward to itself
  caf::anon_send(e0, listen_atom::value, nothing);
  caf::anon_send(e0, listen_atom::value, e0);
  sched_->run();
  for (std::uint64_t i = 1; i <= 3; ++i) {
    auto r = ask<kv_reply>(b, process_atom::value, make_request(i, 0, 0, 2, i));
    // Bounded: a balancer listening to itself sent itself its events for
    // ever.
    EXPECT_LT(sched_->run(10'000), 10'000U);
    ASSERT_TRUE(r->value.has_value())
        << i << ": " << to_string(r->error.value_or(caf::error{}));
  }
  EXPECT_TRUE(alive(b));
  EXPECT_TRUE(alive(e0));
  EXPECT_TRUE(alive(events_only));
  EXPECT_TRUE(alive(nothing));
  EXPECT_GT(*events, 0);
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).restarts, 0U);
}

TEST_F(actor_test, ALookupIsNotSentToAnEngineStillOpening) {
  // The only engine is still opening its store (it reads its mailbox once
  // open): a lookup is answered errc::unavailable at once, as engine_atom
  // is, rather than sent to it to wait out the balancer's request_timeout.
  // (Before, with no live engine, it went there.)
  auto lookups = std::make_shared<int>(0);
  balancer_config bc;
  bc.initial_engines = 1;
  auto b = started_balancer(
      bc,
      [this, lookups](caf::actor_system& s,
                      std::uint32_t) -> result<started_engine> {
        auto a = s.spawn([=](caf::event_based_actor* self) -> caf::behavior {
          return {
              // Never ready: a promise it does not keep.
              [=](ready_atom) -> caf::result<bool> {
                return self->make_response_promise<bool>();
              },
              [](listen_atom, const caf::actor&) {},
              [=](lookup_atom, std::vector<block_key>&) -> std::uint64_t {
                ++*lookups;
                return 7;
              },
          };
        });
        stop_at_end_.push_back(a);
        return started_engine{a, true};
      });
  EXPECT_EQ(ask_now<balancer_stats>(b, stats_atom::value).live, 0U);
  auto r = ask<std::uint64_t>(b, lookup_atom::value,
                              std::vector<block_key>{block_key{1, 1}});
  sched_->run();
  EXPECT_EQ(*lookups, 0);
  ASSERT_TRUE(r->error.has_value());
  EXPECT_EQ(from_caf_error(*r->error).code, errc::unavailable);
}

TEST_F(actor_test, TheBalancerPassesOnOnlyItsCurrentEnginesBlockEvents) {
  // Block events the balancer does not take for its index (from an actor
  // that is not the slot's engine) do not reach its listeners either: the
  // prefetcher would count their evictions against the slot's engine.
  // (Before, every block_events was passed on.)
  auto b = balancer(routing_policy::kv_aware, {small_engine(64)});
  auto events = std::make_shared<std::vector<block_events>>();
  auto listener = sys_->spawn([events](caf::event_based_actor*) {
    return caf::behavior{
        [](observe_atom, const kv_request&, const kv_reply&, std::int64_t) {},
        [events](const block_events& ev) { events->push_back(ev); },
    };
  });
  stop_at_end_.push_back(listener);
  caf::anon_send(b, listen_atom::value, listener);
  sched_->run();
  ask_now<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 1, 1));
  ASSERT_FALSE(events->empty()) << "the engine's own events reach it";
  events->clear();
  block_events forged;
  forged.engine = 0;
  forged.evicted = {block_key{1, 1}};
  caf::anon_send(b, forged);
  sched_->run();
  EXPECT_TRUE(events->empty());
}

TEST_F(actor_test, AnUnknownOneWayMessageIsDroppedNotAnsweredWithAnError) {
  // Answered, the error ended its sender (an actor with CAF's default
  // error handler). A request of it still gets the error.
  auto b = balancer(routing_policy::least_loaded, {small_engine(64)});
  sched_->run();
  auto sender = sys_->spawn([b](caf::event_based_actor* self) -> caf::behavior {
    self->send(b, std::string{"hello"});
    return {[](int) {}};
  });
  stop_at_end_.push_back(sender);
  sched_->run();
  EXPECT_TRUE(alive(sender));
  EXPECT_TRUE(alive(b));
  auto r = ask<std::string>(b, std::string{"hello"});
  sched_->run();
  ASSERT_TRUE(r->error.has_value());
  EXPECT_EQ(*r->error, caf::sec::unexpected_message);
}

TEST_F(actor_test, ACommitRefusedWhileThePutIsOpenLeavesItOpen) {
  // busy (its parent is not committed yet) and not_written leave the put
  // open, as the store says; the engine dropped its ticket, which aborted
  // the put and every put chained on it.
  auto e = engine(small_engine(64));
  const auto [tp, tc] = reserve_parent_and_child(e, 1);
  const std::vector<std::uint8_t> value(block_bytes, 7);
  const auto refused = [&](std::uint64_t ticket, errc code) {
    auto r = ask<bool>(e, commit_atom::value, ticket);
    sched_->run();
    ASSERT_TRUE(r->error.has_value());
    EXPECT_EQ(from_caf_error(*r->error).code, code);
  };
  refused(tp, errc::not_written);
  EXPECT_TRUE(ask_now<bool>(e, write_atom::value, tp, value));
  EXPECT_TRUE(ask_now<bool>(e, write_atom::value, tc, value));
  refused(tc, errc::busy); // before its parent
  EXPECT_TRUE(ask_now<bool>(e, commit_atom::value, tp));
  EXPECT_TRUE(ask_now<bool>(e, commit_atom::value, tc));
  EXPECT_EQ(ask_now<std::uint64_t>(e, lookup_atom::value,
                                   std::vector<block_key>{{1, 1}, {1, 2}}),
            2U);
  // A commit that ends the put (the second one) drops the ticket.
  auto again = ask<bool>(e, commit_atom::value, tc);
  sched_->run();
  ASSERT_TRUE(again->error.has_value());
  EXPECT_EQ(from_caf_error(*again->error).code, errc::invalid_handle);
}

TEST_F(actor_test, AnAbortOfAPutThatWentWithItsParentIsTrue) {
  // "already committed, aborted or expired" answers true; a child aborted
  // with its parent answered the store's stale-handle error.
  auto e = engine(small_engine(64));
  const auto [tp, tc] = reserve_parent_and_child(e, 2);
  EXPECT_TRUE(ask_now<bool>(e, abort_atom::value, tp));
  EXPECT_TRUE(ask_now<bool>(e, abort_atom::value, tc));
  EXPECT_TRUE(ask_now<bool>(e, abort_atom::value, tc)); // gone: true
}

TEST_F(actor_test, AnEngineTellsEachListenerOnceAndForgetsOnesThatWent) {
  auto e = engine(small_engine(64));
  auto events = std::make_shared<int>(0);
  auto l = sys_->spawn([events](caf::event_based_actor*) -> caf::behavior {
    return {[events](const block_events&) { ++*events; }};
  });
  caf::anon_send(e, listen_atom::value, l);
  caf::anon_send(e, listen_atom::value, l); // twice: told twice before
  sched_->run();
  ASSERT_TRUE(
      ask_now<kv_reply>(e, process_atom::value, make_request(1, 0, 0, 2, 1))
          .computed_blocks == 2U);
  EXPECT_EQ(*events, 1);
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).listeners, 1U);
  caf::anon_send_exit(l, caf::exit_reason::kill);
  sched_->run();
  // Gone: forgotten (the list never shrank), and the engine keeps serving.
  EXPECT_EQ(ask_now<engine_stats>(e, stats_atom::value).listeners, 0U);
  ASSERT_TRUE(
      ask_now<kv_reply>(e, process_atom::value, make_request(2, 0, 0, 2, 2))
          .computed_blocks == 2U);
}

TEST_F(actor_test, TheExpirySweepStopsWithTheLastListenerAndResumesWithANew) {
  // The sweep (every expire_interval, 1 s) is for listeners: once the last
  // one has gone, the sweep due next arms no other (before, it went on for
  // good, walking the store every second for nobody). A new listener arms
  // it again, one chain however often listeners come and go.
  auto e = engine(small_engine(64));
  sched_->run();
  const auto idle = sched_->clock().schedule().size();
  const auto listen = [&] {
    auto l = sys_->spawn([](caf::event_based_actor*) -> caf::behavior {
      return {[](const block_events&) {}};
    });
    caf::anon_send(e, listen_atom::value, l);
    sched_->run();
    return l;
  };
  const auto leave = [&](const caf::actor& l) {
    caf::anon_send_exit(l, caf::exit_reason::kill);
    sched_->run();
  };
  const auto pass_sweep = [&] {
    sched_->advance_time(1s);
    sched_->run();
  };
  auto l1 = listen();
  EXPECT_EQ(sched_->clock().schedule().size(), idle + 1);
  pass_sweep();
  EXPECT_EQ(sched_->clock().schedule().size(), idle + 1);
  leave(l1);
  pass_sweep();
  EXPECT_EQ(sched_->clock().schedule().size(), idle);
  pass_sweep();
  EXPECT_EQ(sched_->clock().schedule().size(), idle);
  auto l2 = listen();
  EXPECT_EQ(sched_->clock().schedule().size(), idle + 1);
  leave(l2); // and one more before the sweep is due: still one chain
  auto l3 = listen();
  stop_at_end_.push_back(l3);
  EXPECT_EQ(sched_->clock().schedule().size(), idle + 1);
  pass_sweep();
  pass_sweep();
  EXPECT_EQ(sched_->clock().schedule().size(), idle + 1);
}

TEST_F(actor_test, AnEngineRecordsNoBlockEventsWhileNobodyListens) {
  // Events are recorded for listeners only: once the last one has gone,
  // the engine records nothing (before, it went on recording every event,
  // built a block_events after every change and threw it away, and an event
  // no call published yet waited for the next listener), and the next
  // listener hears of what changes after it came. A lookup that meets an
  // expired block removes it and publishes nothing: what it recorded with
  // nobody listening reached the next listener at its first publish.
  engine::manual_clock clock{std::chrono::hours{1}};
  auto e = engine(small_ttl_engine(clock));
  sched_->run();
  const auto listen = [&](std::shared_ptr<std::vector<block_events>> got) {
    return record_events(e, std::move(got), false);
  };
  auto first = std::make_shared<std::vector<block_events>>();
  auto l1 = listen(first);
  const auto a = make_request(1, 1, 0, 2, 1);
  ask_now<kv_reply>(e, process_atom::value, a);
  ASSERT_EQ(first->size(), 1U);
  EXPECT_EQ(first->front().stored, a.keys);
  caf::anon_send_exit(l1, caf::exit_reason::kill);
  sched_->run();
  ASSERT_EQ(ask_now<engine_stats>(e, stats_atom::value).listeners, 0U);
  // Nobody listens: a request stores a block, which expires, and a lookup
  // meets it and removes it (a leaf: a parent would only be marked dead).
  const auto b = make_request(2, 2, 0, 1, 2);
  ASSERT_EQ(ask_now<kv_reply>(e, process_atom::value, b).computed_blocks, 1U);
  clock.advance(11s);
  ASSERT_EQ(ask_now<std::uint64_t>(e, lookup_atom::value, b.keys), 0U);
  // A new listener hears of what changes from now on, and only of that.
  auto second = std::make_shared<std::vector<block_events>>();
  auto l2 = listen(second);
  stop_at_end_.push_back(l2);
  const auto d = make_request(3, 3, 0, 2, 3);
  ASSERT_EQ(ask_now<kv_reply>(e, process_atom::value, d).computed_blocks, 2U);
  ASSERT_EQ(second->size(), 1U);
  EXPECT_EQ(second->front().stored, d.keys);
  EXPECT_TRUE(second->front().evicted.empty())
      << "an event recorded while nobody listened reached the new listener";
  EXPECT_EQ(first->size(), 1U);
}

TEST_F(actor_test, BlocksAReserveEvictsAreReportedAtOnce) {
  // Making room for a put evicts: the listeners heard of it only at the
  // next request or expiry sweep, so the router kept sending requests for
  // those blocks to this engine meanwhile.
  auto e = engine(small_engine(8));
  auto evicted = std::make_shared<std::size_t>(0);
  auto l = sys_->spawn([evicted](caf::event_based_actor*) -> caf::behavior {
    return {
        [evicted](const block_events& ev) { *evicted += ev.evicted.size(); }};
  });
  stop_at_end_.push_back(l);
  caf::anon_send(e, listen_atom::value, l);
  sched_->run();
  ASSERT_EQ(
      ask_now<kv_reply>(e, process_atom::value, make_request(1, 0, 0, 8, 1))
          .computed_blocks,
      8U);
  const auto before = *evicted;
  for (std::uint64_t i = 1; i <= 4 && *evicted == before; ++i) {
    put_request p;
    p.key = block_key{77, i};
    (void)ask_now<std::uint64_t>(e, reserve_atom::value, p);
  }
  EXPECT_GT(*evicted, before) << "four reserves in a full store of 8";
}

TEST_F(actor_test, WarmQueriesTeachThePrefetcherNothing) {
  // A warm list's order (low priority) is no user's: it was learned as
  // transitions, and the next request of A prefetched B.
  auto b = balancer(routing_policy::least_loaded, {small_engine(64)});
  sched_->run();
  auto pf = prefetcher(b);
  warmer_config wc;
  wc.parallelism = 1;
  auto w = warmer(b, wc);
  std::vector<warm_item> items(2);
  items[0].request = make_request(1, 1, 0, 2, 1);
  items[0].request.query = "A";
  items[0].frequency = 2;
  items[1].request = make_request(2, 2, 0, 2, 2);
  items[1].request.query = "B";
  items[1].frequency = 1;
  auto rep = ask<warm_report>(w, warm_atom::value, items, std::uint32_t{10},
                              false, caf::actor{});
  sched_->run();
  ASSERT_TRUE(rep->value.has_value());
  EXPECT_EQ(ask_now<prefetch_stats>(pf, stats_atom::value).observed, 0U);
  auto a = make_request(3, 1, 0, 2, 1);
  a.query = "A";
  a.session = 5;
  auto r = ask<kv_reply>(b, process_atom::value, a);
  sched_->run();
  ASSERT_TRUE(r->value.has_value());
  const auto st = ask_now<prefetch_stats>(pf, stats_atom::value);
  EXPECT_EQ(st.observed, 1U);
  EXPECT_EQ(st.issued, 0U);
}

TEST_F(actor_test, AScalerTimeoutFromOutsideCountsNothing) {
  // Only the scaler's own timer says a replica change went unanswered; one
  // from anyone else marked it so at once.
  auto f = std::make_shared<slow_fleet>();
  auto b = sys_->spawn(slow_balancer, f);
  stop_at_end_.push_back(b);
  auto decisions = std::make_shared<std::vector<scale_decision>>();
  auto s = quick_scaler(b, 1, decisions);
  sched_->run();
  send_slow_samples(s); // 800 ms: above the target
  sched_->advance_time(1s);
  sched_->run();
  ASSERT_EQ(f->asked, 1);
  caf::anon_send(s, timeout_atom::value, std::uint64_t{0});
  sched_->run();
  EXPECT_EQ(ask_now<scaler_stats>(s, stats_atom::value).unanswered, 0U);
}

TEST_F(actor_test, TimerMessagesFromOutsideStartNoTimerChain) {
  // The engine's expiry sweep re-arms itself, and the balancer's sweep
  // while a call is open: a sweep_atom from anyone else started another
  // chain each, for good (the engine's walking the whole store every
  // expire_interval).
  auto e = engine(small_engine(64));
  auto l = sys_->spawn([](caf::event_based_actor*) -> caf::behavior {
    return {[](const block_events&) {}};
  });
  stop_at_end_.push_back(l);
  caf::anon_send(e, listen_atom::value, l);
  // A call the balancer keeps open: its engine batches for an hour.
  auto b = balancer(routing_policy::least_loaded,
                    {small_engine(64, 100, std::chrono::hours{1})},
                    std::chrono::hours{2});
  sched_->run();
  auto open =
      ask<kv_reply>(b, process_atom::value, make_request(1, 0, 0, 2, 1));
  sched_->run();
  ASSERT_FALSE(open->value || open->error);
  const auto before = sched_->clock().schedule().size();
  for (int i = 0; i < 5; ++i) {
    caf::anon_send(e, sweep_atom::value);
    caf::anon_send(b, sweep_atom::value);
  }
  sched_->run();
  for (int i = 0; i < 10; ++i) {
    sched_->advance_time(1s);
    sched_->run();
  }
  EXPECT_EQ(sched_->clock().schedule().size(), before);
}

} // namespace
} // namespace kvfleet::actors
