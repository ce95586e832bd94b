// BM_evict_bytes: block_store::evict_bytes() over a store of 12,000 cached
// one-block chains, all evictable, whose priorities are background, low and
// normal in turn (range(1) = 3) or all normal (range(1) = 1). Each iteration
// evicts 16 blocks' worth, lowest priority first, and is timed alone: the 16
// are put back at their priorities with the timer paused, so every iteration
// sees the same mix. range(0) is the policy (policy_kind).
//
// BM_collect_promotions/blocks:N: poll_disk() collecting the answers to
// promote()'s reads of a chain of N 4 KiB blocks, all landed (the tier
// idle), timed alone; /hold:1 with a hold token. Items are blocks: a rate
// that stays flat as N grows means the cost is linear in the chain.
#include "engine/block_store.hpp"
#include "engine/kv_producer.hpp"

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <unistd.h>
#include <vector>

namespace {

using namespace kvfleet::engine;

constexpr std::size_t cached_blocks = 12000;
constexpr std::size_t evicted_per_call = 16;

namespace_spec evict_spec() {
  namespace_spec s;
  s.model = "bench-evict";
  s.layers = 1;
  s.kv_heads = 1;
  s.head_dim = 64;
  s.block_tokens = 16; // 1 * 2 * 16 * 1 * 64 * 2 bytes = 4 KiB
  return s;
}

struct evict_fixture {
  std::unique_ptr<block_store> store;
  ns_id ns{};
  ns_fingerprint fp = evict_spec().fingerprint();
  std::vector<std::byte> value;
  std::size_t priorities = 1;
  std::uint64_t next_id = 0;

  evict_fixture(policy_kind policy, std::size_t prios) : priorities(prios) {
    store_config cfg;
    // 16,384 slots: the cached blocks stay under the high watermark, so a
    // put never evicts and evict_bytes() is the only eviction.
    cfg.capacity_bytes = std::size_t{64} << 20;
    cfg.slab_bytes = std::size_t{1} << 20;
    cfg.policy = policy;
    cfg.adaptive_compression = false;
    auto s = block_store::create(cfg);
    if (!s)
      std::abort();
    store = std::move(*s);
    auto n = store->register_namespace(evict_spec());
    if (!n)
      std::abort();
    ns = *n;
    value.assign(evict_spec().value_bytes(), std::byte{5});
    for (std::size_t i = 0; i < cached_blocks; ++i)
      put_one();
  }

  void put_one() {
    const std::uint64_t id = ++next_id;
    put_options o;
    o.prio = static_cast<priority>(priorities == 1 ? 2 : id % priorities);
    auto h = store->reserve(ns, chain_key_from_id({}, fp, id), {}, o);
    if (!h || !store->write(*h, value) || !store->commit(*h))
      std::abort();
  }
};

void BM_evict_bytes(benchmark::State& state) {
  evict_fixture f(static_cast<policy_kind>(state.range(0)),
                  static_cast<std::size_t>(state.range(1)));
  const std::size_t bytes = evicted_per_call * f.value.size();
  for (auto _ : state) {
    const std::size_t freed = f.store->evict_bytes(bytes);
    benchmark::DoNotOptimize(freed);
    state.PauseTiming();
    for (std::size_t i = 0; i < evicted_per_call; ++i)
      f.put_one();
    state.ResumeTiming();
  }
  state.SetItemsProcessed(state.iterations() *
                          static_cast<std::int64_t>(evicted_per_call));
}
BENCHMARK(BM_evict_bytes)
    ->ArgNames({"policy", "priorities"})
    ->Args({static_cast<int>(policy_kind::lru), 1})
    ->Args({static_cast<int>(policy_kind::lru), 3})
    ->Args({static_cast<int>(policy_kind::adaptive), 1})
    ->Args({static_cast<int>(policy_kind::adaptive), 3});

void BM_collect_promotions(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  const auto hold = static_cast<std::uint64_t>(state.range(1));
  char tmpl[] = "/tmp/kvfleet-promote-bench-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr)
    std::abort();
  const std::string dir = tmpl;
  {
    disk_tier_config dc;
    dc.directory = dir;
    dc.capacity_bytes = std::uint64_t{4} << 30;
    dc.segment_bytes = std::uint64_t{64} << 20;
    auto tier = disk_tier::open(dc);
    store_config cfg;
    cfg.capacity_bytes = (n + 64) * 4096;
    cfg.slab_bytes = 4096;
    cfg.adaptive_compression = false;
    auto s = block_store::create(cfg);
    if (!tier || !s || !(*s)->attach_disk(std::move(*tier)))
      std::abort();
    auto& store = **s;
    const auto ns = store.register_namespace(evict_spec());
    if (!ns)
      std::abort();
    std::vector<block_key> keys;
    const auto fp = evict_spec().fingerprint();
    for (std::size_t i = 0; i < n; ++i)
      keys.push_back(
          chain_key_from_id(i == 0 ? block_key{} : keys.back(), fp, i + 1));
    synthetic_producer producer;
    if (!store.process(*ns, keys, static_cast<std::uint32_t>(n * 16), producer))
      std::abort();
    for (auto _ : state) {
      state.PauseTiming();
      store.evict_bytes(std::size_t{1} << 40); // every block to disk
      if (!store.disk()->wait_idle(std::chrono::seconds(300)))
        std::abort();
      store.poll_disk();
      if (!store.promote(*ns, keys, {}, hold) ||
          !store.disk()->wait_idle(std::chrono::seconds(300)))
        std::abort();
      state.ResumeTiming();
      store.poll_disk();
      state.PauseTiming();
      if (store.block_count() != n)
        std::abort();
      store.release_held(hold);
      state.ResumeTiming();
    }
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(n));
}
BENCHMARK(BM_collect_promotions)
    ->ArgNames({"blocks", "hold"})
    ->Args({2048, 0})
    ->Args({16384, 0})
    ->Args({16384, 1})
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3);

} // namespace
