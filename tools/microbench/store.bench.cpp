// Engine hot paths: prefix lookup, put and get through the pool, and the
// single-thread memcpy baseline the put/get bar is measured against.
#include "engine/block_store.hpp"

#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

namespace {

using namespace kvfleet::engine;

constexpr std::size_t big_block = 256 * 1024;
// Larger than the caches, so bandwidth is memory bandwidth for every case.
constexpr std::size_t arena_bytes = std::size_t{1} << 30;

namespace_spec spec_256k() {
  namespace_spec s;
  s.model = "bench";
  s.layers = 4;
  s.kv_heads = 4;
  s.head_dim = 64;
  s.block_tokens = 64; // 4 * 2 * 64 * 4 * 64 * 2 bytes = 256 KiB
  return s;
}

namespace_spec spec_small() {
  namespace_spec s;
  s.model = "bench-small";
  s.layers = 1;
  s.kv_heads = 1;
  s.head_dim = 64;
  s.block_tokens = 16;
  return s;
}

std::unique_ptr<block_store> make_store(std::size_t bytes, std::size_t slab) {
  store_config cfg;
  cfg.capacity_bytes = bytes;
  cfg.slab_bytes = slab;
  cfg.policy = policy_kind::lru;
  cfg.adaptive_compression = false;
  auto s = block_store::create(cfg);
  if (!s)
    std::abort();
  return std::move(*s);
}

std::vector<block_key> make_chain(const ns_fingerprint& fp, std::size_t n,
                                  std::uint64_t salt) {
  std::vector<block_key> keys;
  block_key parent{};
  for (std::size_t i = 0; i < n; ++i) {
    parent = chain_key_from_id(parent, fp, salt * 1000003 + i);
    keys.push_back(parent);
  }
  return keys;
}

void BM_lookup_chain(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  auto store = make_store(std::size_t{64} << 20, std::size_t{1} << 20);
  const auto ns = *store->register_namespace(spec_small());
  const auto keys = make_chain(spec_small().fingerprint(), n, 1);
  synthetic_producer producer;
  if (!store->process(ns, keys, n * 16, producer))
    std::abort();
  for (auto _ : state) {
    auto r = store->lookup(ns, keys);
    benchmark::DoNotOptimize(r);
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(n));
}
BENCHMARK(BM_lookup_chain)->Arg(1000);

// Baseline: copy 256 KiB blocks into a 1 GiB arena, slot after slot.
void BM_memcpy_256k(benchmark::State& state) {
  std::vector<std::byte> arena(arena_bytes, std::byte{1});
  std::vector<std::byte> src(big_block, std::byte{2});
  std::size_t slot = 0;
  const std::size_t slots = arena_bytes / big_block;
  for (auto _ : state) {
    std::memcpy(arena.data() + slot * big_block, src.data(), big_block);
    benchmark::ClobberMemory();
    slot = (slot + 1) % slots;
  }
  state.SetBytesProcessed(state.iterations() *
                          static_cast<std::int64_t>(big_block));
}
BENCHMARK(BM_memcpy_256k);

// reserve + write (copy and checksum) + commit of a new block each time; in
// steady state every put also evicts, as a full cache does.
void BM_put_256k(benchmark::State& state) {
  auto store = make_store(arena_bytes, std::size_t{16} << 20);
  const auto ns = *store->register_namespace(spec_256k());
  const auto fp = spec_256k().fingerprint();
  std::vector<std::byte> value(big_block, std::byte{3});
  std::uint64_t id = 0;
  for (auto _ : state) {
    const block_key key = chain_key_from_id({}, fp, ++id);
    auto h = store->reserve(ns, key, {});
    if (!h || !store->write(*h, value) || !store->commit(*h))
      std::abort();
  }
  state.SetBytesProcessed(state.iterations() *
                          static_cast<std::int64_t>(big_block));
}
BENCHMARK(BM_put_256k);

// acquire + read (checksum verified, copied out) over blocks spread across
// the arena.
void BM_get_256k(benchmark::State& state) {
  auto store = make_store(arena_bytes, std::size_t{16} << 20);
  const auto ns = *store->register_namespace(spec_256k());
  const auto fp = spec_256k().fingerprint();
  std::vector<std::byte> value(big_block, std::byte{3});
  std::vector<block_key> keys;
  const std::size_t blocks = arena_bytes / big_block * 8 / 10;
  for (std::uint64_t i = 0; i < blocks; ++i) {
    keys.push_back(chain_key_from_id({}, fp, i + 1));
    auto h = store->reserve(ns, keys.back(), {});
    if (!h || !store->write(*h, value) || !store->commit(*h))
      std::abort();
  }
  std::vector<std::byte> out(big_block);
  std::size_t i = 0;
  for (auto _ : state) {
    auto lease = store->acquire(ns, keys[i]);
    if (!lease || !store->read(*lease, out))
      std::abort();
    benchmark::ClobberMemory();
    i = (i + 1) % keys.size();
  }
  state.SetBytesProcessed(state.iterations() *
                          static_cast<std::int64_t>(big_block));
}
BENCHMARK(BM_get_256k);

// Baseline for get: copy 256 KiB out of a 1 GiB arena, slot after slot.
void BM_memcpy_256k_out(benchmark::State& state) {
  std::vector<std::byte> arena(arena_bytes, std::byte{1});
  std::vector<std::byte> dst(big_block);
  std::size_t slot = 0;
  const std::size_t slots = arena_bytes / big_block * 8 / 10;
  for (auto _ : state) {
    std::memcpy(dst.data(), arena.data() + slot * big_block, big_block);
    benchmark::ClobberMemory();
    slot = (slot + 1) % slots;
  }
  state.SetBytesProcessed(state.iterations() *
                          static_cast<std::int64_t>(big_block));
}
BENCHMARK(BM_memcpy_256k_out);

} // namespace
