// block_store::evict_bytes() over a store of 12,000 cached one-block chains,
// all evictable, whose priorities are background, low and normal in turn
// (range(1) = 3) or all normal (range(1) = 1). Each iteration evicts 16
// blocks' worth, lowest priority first, and is timed alone: the 16 are put
// back at their priorities with the timer paused, so every iteration sees
// the same mix. range(0) is the policy (policy_kind).
#include "engine/block_store.hpp"

#include <benchmark/benchmark.h>

#include <cstdlib>
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

} // namespace
