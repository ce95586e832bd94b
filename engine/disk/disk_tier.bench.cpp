// Disk tier promote cost: fetch of 256 KiB blocks whose bytes are in the
// page cache, against plain sequential reads of the same segment files in
// the same run (the bandwidth a fetch could at best reach).
//
//   BM_disk_fetch_256k/depth:D/into:1  fetch_into a caller's buffer (the
//                                promote path) through the I/O thread, D
//                                requests in flight, checksum verified
//   BM_disk_fetch_256k/depth:D/into:0  fetch() returning an owned vector
//                                (a fresh 256 KiB allocation per fetch)
//   BM_disk_seq_read             pread of the segment files, 256 KiB at a time
//   BM_disk_seq_read_checksum    the same plus block_checksum of each chunk

#include "engine/disk/disk_tier.hpp"
#include "engine/checksum.hpp"

#include <benchmark/benchmark.h>

#include <cstdlib>
#include <fcntl.h>
#include <filesystem>
#include <random>
#include <unistd.h>

namespace kvfleet::engine {
namespace {

constexpr std::size_t block_bytes = 256 * 1024;
constexpr std::uint64_t block_count = 128; // 32 MiB: stays in the page cache

block_key key_of(std::uint64_t i) {
  return block_key{i + 1, i * 0x9e37 + 7};
}

/// One tier filled once per process and removed at exit.
struct fixture {
  std::string dir;
  std::unique_ptr<disk_tier> tier;
  std::vector<std::string> files;
  bool ok = false;

  fixture() {
    char tmpl[] = "/tmp/kvfleet-disk-bench-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr)
      return;
    dir = tmpl;
    disk_tier_config c;
    c.directory = dir;
    c.capacity_bytes = std::uint64_t{1} << 30;
    c.segment_bytes = std::uint64_t{16} << 20;
    auto t = disk_tier::open(c);
    if (!t)
      return;
    tier = std::move(*t);
    std::mt19937_64 rng(1);
    std::vector<std::byte> v(block_bytes);
    for (std::uint64_t i = 0; i < block_count; ++i) {
      for (auto& b : v)
        b = static_cast<std::byte>(rng());
      if (!tier->spill(key_of(i), ns_fingerprint{1, 2}, codec::none, v,
                       block_checksum(v), nanos{1}, nanos{0}, false))
        return;
    }
    if (!tier->wait_idle())
      return;
    std::size_t failed = 0;
    tier->drain_completions([&](disk_completion&& d) {
      if (!d.status.has_value())
        ++failed;
    });
    for (const auto& e : std::filesystem::directory_iterator(dir))
      if (e.path().extension() == ".kvs")
        files.push_back(e.path().string());
    ok = failed == 0 && !files.empty();
  }
  ~fixture() {
    tier.reset();
    std::error_code ec;
    if (!dir.empty())
      std::filesystem::remove_all(dir, ec);
  }
};

fixture& shared() {
  static fixture f;
  return f;
}

void BM_disk_fetch_256k(benchmark::State& state) {
  auto& f = shared();
  if (!f.ok) {
    state.SkipWithError("cannot set up the disk tier");
    return;
  }
  const auto depth = static_cast<std::uint64_t>(state.range(0));
  const bool into = state.range(1) != 0;
  // verify:0 is the store's promote path: it copies, and the block is
  // verified at its first read like every block in memory.
  const bool verify = state.range(2) != 0;
  // Promotion reads into a slot the owner already has: one per request.
  std::vector<std::vector<std::byte>> slots(
      depth, std::vector<std::byte>(block_bytes));
  std::uint64_t next = 0;
  std::uint64_t failed = 0;
  auto check = [&](disk_completion&& d) {
    if (!d.status.has_value())
      ++failed;
    benchmark::DoNotOptimize(d.bytes.data());
  };
  for (auto _ : state) {
    for (std::uint64_t k = 0; k < depth; ++k) {
      const block_key key = key_of(next++ % block_count);
      if (into)
        (void)f.tier->fetch_into(key, slots[k], verify);
      else
        (void)f.tier->fetch(key);
    }
    if (!f.tier->wait_idle())
      state.SkipWithError("timeout");
    f.tier->drain_completions(check);
  }
  if (failed != 0)
    state.SkipWithError("a fetch failed");
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(depth * block_bytes));
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(depth));
}
BENCHMARK(BM_disk_fetch_256k)
    ->ArgNames({"depth", "into", "verify"})
    ->Args({1, 1, 1})
    ->Args({16, 1, 1})
    ->Args({16, 1, 0})
    ->Args({1, 0, 1})
    ->Args({16, 0, 1})
    ->UseRealTime();

void seq_read(benchmark::State& state, bool hash, std::size_t buffers = 1) {
  auto& f = shared();
  if (!f.ok) {
    state.SkipWithError("cannot set up the disk tier");
    return;
  }
  std::vector<int> fds;
  for (const auto& p : f.files)
    fds.push_back(::open(p.c_str(), O_RDONLY | O_CLOEXEC));
  std::vector<std::vector<std::byte>> bufs(buffers,
                                           std::vector<std::byte>(block_bytes));
  std::size_t file = 0;
  std::size_t which = 0;
  off_t off = 0;
  for (auto _ : state) {
    auto& buf = bufs[which++ % buffers];
    ssize_t r = ::pread(fds[file], buf.data(), buf.size(), off);
    if (r <= 0) { // end of this file: go on with the next
      file = (file + 1) % fds.size();
      off = 0;
      r = ::pread(fds[file], buf.data(), buf.size(), off);
    }
    off += r;
    if (hash) {
      benchmark::DoNotOptimize(block_checksum(
          std::span<const std::byte>(buf.data(), static_cast<std::size_t>(r))));
    }
    benchmark::DoNotOptimize(buf.data());
  }
  for (const int fd : fds)
    ::close(fd);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(block_bytes));
}

void BM_disk_seq_read(benchmark::State& state) {
  seq_read(state, false);
}
BENCHMARK(BM_disk_seq_read)->UseRealTime();

void BM_disk_seq_read_checksum(benchmark::State& state) {
  seq_read(state, true);
}
BENCHMARK(BM_disk_seq_read_checksum)->UseRealTime();

// Reference: the same reads into 16 rotating 256 KiB buffers, as promotion
// writes into 16 different cache slots.
void BM_disk_seq_read_16_buffers(benchmark::State& state) {
  seq_read(state, false, 16);
}
BENCHMARK(BM_disk_seq_read_16_buffers)->UseRealTime();

} // namespace
} // namespace kvfleet::engine
