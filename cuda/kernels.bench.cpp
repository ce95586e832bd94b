// kvfleet-cuda-bench: bandwidth of each kernel and of tiering against the
// ceilings measured in the same run (cudaMemcpy device to device; a plain
// cudaMemcpyAsync to or from pinned memory). Each figure is the median of
// --reps timed runs with CUDA events (gather and scatter also four calls
// back to back, against four back-to-back cudaMemcpy). The whole set is
// measured --rounds times, each round against its own baselines, after a
// warm-up that brings the clocks up; the table shows the median figure and
// the median of the rounds' ratios, and a bar is judged on that ratio, so
// one slow round (clocks ramping, a neighbour on the GPU) does not decide
// it. Bytes count what is read plus what is written. Prints a table and
// exits 1 when a bar is missed (bars: the CUDA backend issue).
#include "cuda/kernels.hpp"
#include "cuda/device.hpp"
#include "cuda/host_tier.hpp"
#include "cuda/internal/device_buffer.hpp"
#include "engine/codec.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace kvfleet;
using namespace kvfleet::cuda;
using internal::device_buffer;

void die(const char* what, const error& e) {
  std::fprintf(stderr, "kvfleet-cuda-bench: %s: %s\n", what,
               e.describe().c_str());
  std::exit(2);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "kvfleet-cuda-bench: %s: %s\n", what,
                 cudaGetErrorString(e));
    std::exit(2);
  }
}

int reps = 20;

/// Median milliseconds of one call of `fn` (enqueued on the default
/// stream), timed `chain` calls back to back per repetition: with chain 1
/// the host's work before the first launch (validation) is on the clock;
/// with more, each call's host work overlaps the previous call's kernels,
/// as when an engine issues batches one after another.
double time_ms(const std::function<void()>& fn, int chain = 1) {
  cudaEvent_t a = nullptr;
  cudaEvent_t b = nullptr;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  fn(); // warm-up
  fn();
  check(cudaDeviceSynchronize(), "warm-up");
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    check(cudaEventRecord(a), "cudaEventRecord");
    for (int k = 0; k < chain; ++k)
      fn();
    check(cudaEventRecord(b), "cudaEventRecord");
    check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float t = 0;
    check(cudaEventElapsedTime(&t, a, b), "cudaEventElapsedTime");
    ms.push_back(static_cast<double>(t) / chain);
  }
  check(cudaGetLastError(), "kernel");
  (void)cudaEventDestroy(a);
  (void)cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

/// One operation's figures, one per round.
struct row {
  std::string name;
  double bar = 0; // 0: no bar
  std::vector<double> gbs;
  std::vector<double> base;
  std::vector<double> ratio;
};

std::vector<row> rows; // in the order first measured
int round_no = 0;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/// Records one round's figure for an operation and says it on stderr at
/// once, so a run cut short still shows what it measured.
void add(const std::string& name, double gbs, double base_gbs, double bar) {
  auto it = std::find_if(rows.begin(), rows.end(),
                         [&](const row& r) { return r.name == name; });
  if (it == rows.end())
    it = rows.insert(rows.end(), row{name, bar, {}, {}, {}});
  it->gbs.push_back(gbs);
  it->base.push_back(base_gbs);
  it->ratio.push_back(gbs / base_gbs);
  std::fprintf(stderr, "round %d: %s: %.1f GB/s (%.1f%%)\n", round_no,
               name.c_str(), gbs, 100.0 * gbs / base_gbs);
}

void report(const std::string& name, double bytes, double ms, double base_gbs,
            double bar) {
  add(name, bytes / (ms * 1e6), base_gbs, bar);
}

} // namespace

int main(int argc, char** argv) {
  std::size_t total = std::size_t{1} << 30; // bytes of fp16 input per codec run
  int rounds = 5;
  auto count_arg = [&](int& i, int lo, int& out) {
    if (i + 1 >= argc)
      return false;
    char* end = nullptr;
    const long v = std::strtol(argv[++i], &end, 10);
    if (*end != '\0' || v < lo || v > 1000)
      return false;
    out = static_cast<int>(v);
    return true;
  };
  bool quick = false;
  bool reps_given = false;
  bool rounds_given = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--reps") == 0) {
      reps_given = true;
      if (!count_arg(i, 3, reps)) {
        std::fprintf(stderr, "kvfleet-cuda-bench: --reps takes 3 to 1000\n");
        return 2;
      }
    } else if (std::strcmp(argv[i], "--rounds") == 0) {
      rounds_given = true;
      if (!count_arg(i, 1, rounds)) {
        std::fprintf(stderr, "kvfleet-cuda-bench: --rounds takes 1 to 1000\n");
        return 2;
      }
    } else {
      std::fprintf(stderr, "usage: kvfleet-cuda-bench [--quick] [--reps N] "
                           "[--rounds N]\n");
      return 2;
    }
  }
  if (quick) { // a smaller run; explicit --reps/--rounds win, in any order
    total = std::size_t{256} << 20;
    reps = reps_given ? reps : 10;
    rounds = rounds_given ? rounds : 3;
  }
  auto name = describe_device(0);
  if (!name)
    die("no device", name.error());
  std::printf("device: %s, %d rounds of %d repetitions, medians\n",
              name->c_str(), rounds, reps);

  device_buffer a(total);
  device_buffer b(total);
  {
    // 16 MiB of N(0,1) fp16 values, repeated (not zeros: they can run
    // faster than real data).
    constexpr std::size_t chunk = std::size_t{16} << 20;
    std::vector<std::byte> h(chunk);
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.0F, 1.0F);
    for (std::size_t i = 0; i < chunk; i += 2) {
      const std::uint16_t v = engine::float_to_half(normal(rng));
      std::memcpy(h.data() + i, &v, 2);
    }
    for (std::size_t at = 0; at + chunk <= total; at += chunk)
      a.upload(h, at);
  }

  // Codecs over 256 KiB blocks of fp16.
  constexpr std::size_t block_raw = 256 << 10;
  const std::size_t elements = block_raw / 2;
  const std::size_t blocks = total / block_raw;
  struct codec_run {
    engine::codec c;
    std::vector<codec_job> enc;
    std::vector<codec_job> dec;
    double bytes;
  };
  std::vector<codec_run> codec_runs;
  for (engine::codec c :
       {engine::codec::int8, engine::codec::fp8, engine::codec::int4}) {
    codec_run cr{c, {}, {}, 0};
    const std::size_t enc = engine::encoded_size(c, elements);
    for (std::size_t i = 0; i < blocks; ++i) {
      cr.enc.push_back(
          {a.data() + i * block_raw, block_raw, b.data() + i * enc, enc});
      cr.dec.push_back(
          {b.data() + i * enc, enc, a.data() + i * block_raw, block_raw});
    }
    cr.bytes = static_cast<double>(blocks * (block_raw + enc));
    codec_runs.push_back(std::move(cr));
  }
  auto d2d_copy = [&] {
    check(cudaMemcpyAsync(b.data(), a.data(), total, cudaMemcpyDeviceToDevice),
          "cudaMemcpyAsync");
  };

  // Gather and scatter of 32 KiB blocks in random order.
  constexpr std::size_t block = 32 << 10;
  const std::size_t slots = total / block;
  std::vector<std::size_t> offsets(slots);
  for (std::size_t i = 0; i < slots; ++i)
    offsets[i] = i * block;
  std::shuffle(offsets.begin(), offsets.end(), std::mt19937(2));
  const double gs_bytes = 2.0 * static_cast<double>(slots * block);
  auto gather = [&] {
    if (auto r =
            gather_blocks({a.data(), total}, offsets, block, {b.data(), total});
        !r)
      die("gather", r.error());
  };
  auto scatter = [&] {
    if (auto r = scatter_blocks({b.data(), total}, offsets, block,
                                {a.data(), total});
        !r)
      die("scatter", r.error());
  };

  // Checksums of 256 KiB blocks (bytes read only; no bar).
  device_buffer sums(8 * blocks);
  std::vector<checksum_job> cj;
  for (std::size_t i = 0; i < blocks; ++i)
    cj.push_back({a.data() + i * block_raw, block_raw});

  // Tiering: demotion and promotion of 32 KiB blocks in random order
  // through the host tier, against one plain cudaMemcpyAsync of the same
  // bytes to or from pinned memory.
  const std::size_t batch_bytes =
      std::min<std::size_t>(total / 2, std::size_t{128} << 20);
  const std::size_t n = batch_bytes / block;
  auto tier = host_tier::create({0, batch_bytes, 2 * batch_bytes});
  if (!tier)
    die("host_tier", tier.error());
  void* pinned = nullptr;
  check(cudaHostAlloc(&pinned, batch_bytes, cudaHostAllocDefault),
        "cudaHostAlloc");
  std::vector<demote_job> demotes;
  for (std::size_t i = 0; i < n; ++i)
    demotes.push_back({a.data() + offsets[i], block});
  std::vector<host_block> placed;
  auto demote = [&] {
    for (const host_block& hb : placed)
      (*tier)->release(hb);
    auto t = (*tier)->demote(demotes, placed);
    if (!t)
      die("demote", t.error());
    if (auto w = (*tier)->wait(*t); !w)
      die("demote wait", w.error());
  };

  // Warm-up: half a second of copies and quantization, so the first
  // round's kernels do not run while the clocks are still coming up.
  {
    cudaEvent_t a0 = nullptr;
    cudaEvent_t a1 = nullptr;
    check(cudaEventCreate(&a0), "cudaEventCreate");
    check(cudaEventCreate(&a1), "cudaEventCreate");
    float spent = 0;
    while (spent < 500) {
      check(cudaEventRecord(a0), "cudaEventRecord");
      for (int k = 0; k < 8; ++k) {
        d2d_copy();
        if (auto r = encode_blocks(engine::codec::int8, engine::dtype::fp16,
                                   elements, codec_runs[0].enc, {});
            !r)
          die("encode", r.error());
      }
      check(cudaEventRecord(a1), "cudaEventRecord");
      check(cudaEventSynchronize(a1), "cudaEventSynchronize");
      float t = 0;
      check(cudaEventElapsedTime(&t, a0, a1), "cudaEventElapsedTime");
      spent += t;
    }
    (void)cudaEventDestroy(a0);
    (void)cudaEventDestroy(a1);
  }

  for (round_no = 1; round_no <= rounds; ++round_no) {
    // Ceiling: device-to-device cudaMemcpy of the same size.
    const double d2d =
        2.0 * static_cast<double>(total) / (time_ms(d2d_copy) * 1e6);
    add("cudaMemcpy device to device", d2d, d2d, 0);

    for (const codec_run& cr : codec_runs) {
      const double bar = cr.c == engine::codec::int4 ? 0.75 : 0.85;
      for (kernel_path p : {kernel_path::hardware, kernel_path::portable}) {
        const std::string suffix =
            p == kernel_path::hardware ? "" : " (portable path)";
        const double e_ms = time_ms([&] {
          if (auto r = encode_blocks(cr.c, engine::dtype::fp16, elements,
                                     cr.enc, {}, p);
              !r)
            die("encode", r.error());
        });
        report(std::string(engine::to_string(cr.c)) + " quantize fp16" + suffix,
               cr.bytes, e_ms, d2d, p == kernel_path::hardware ? bar : 0);
        const double d_ms = time_ms([&] {
          if (auto r = decode_blocks(cr.c, engine::dtype::fp16, elements,
                                     cr.dec, {}, p);
              !r)
            die("decode", r.error());
        });
        report(std::string(engine::to_string(cr.c)) + " dequantize fp16" +
                   suffix,
               cr.bytes, d_ms, d2d, p == kernel_path::hardware ? bar : 0);
      }
    }

    // Gather and scatter validate every offset on the host before the
    // first launch (32,768 here): timed alone, that is on the clock; timed
    // four calls back to back, the host checks call k+1 while the GPU
    // copies call k. The bar is against cudaMemcpy timed the same way.
    constexpr int chain = 4;
    const double d2d_chain =
        2.0 * static_cast<double>(total) / (time_ms(d2d_copy, chain) * 1e6);
    add("cudaMemcpy device to device, 4 back to back", d2d_chain, d2d_chain, 0);
    report("gather 32 KiB blocks, random order, 1 call", gs_bytes,
           time_ms(gather), d2d, 0);
    report("scatter 32 KiB blocks, random order, 1 call", gs_bytes,
           time_ms(scatter), d2d, 0);
    report("gather 32 KiB blocks, random order, 4 calls", gs_bytes,
           time_ms(gather, chain), d2d_chain, 0.90);
    report("scatter 32 KiB blocks, random order, 4 calls", gs_bytes,
           time_ms(scatter, chain), d2d_chain, 0.90);

    const double c_ms = time_ms([&] {
      if (auto r = checksum_blocks(
              cj, reinterpret_cast<std::uint64_t*>(sums.data()));
          !r)
        die("checksum", r.error());
    });
    report("checksum 256 KiB blocks (read only)", static_cast<double>(total),
           c_ms, d2d, 0);

    const double d2h_ms = time_ms([&] {
      check(cudaMemcpyAsync(pinned, a.data(), batch_bytes,
                            cudaMemcpyDeviceToHost),
            "d2h");
    });
    const double h2d_ms = time_ms([&] {
      check(cudaMemcpyAsync(a.data(), pinned, batch_bytes,
                            cudaMemcpyHostToDevice),
            "h2d");
    });
    const double d2h = static_cast<double>(batch_bytes) / (d2h_ms * 1e6);
    const double h2d = static_cast<double>(batch_bytes) / (h2d_ms * 1e6);
    add("cudaMemcpyAsync device to pinned host", d2h, d2h, 0);
    add("cudaMemcpyAsync pinned host to device", h2d, h2d, 0);
    report("demote 32 KiB blocks to pinned host",
           static_cast<double>(batch_bytes), time_ms(demote), d2h, 0.80);
    std::vector<promote_job> pj;
    for (std::size_t i = 0; i < n; ++i)
      pj.push_back({placed[i], b.data() + offsets[i]});
    const double pro_ms = time_ms([&] {
      auto t = (*tier)->promote(pj);
      if (!t)
        die("promote", t.error());
      if (auto w = (*tier)->wait(*t); !w)
        die("promote wait", w.error());
    });
    report("promote 32 KiB blocks from pinned host",
           static_cast<double>(batch_bytes), pro_ms, h2d, 0.80);
  }
  (void)cudaFreeHost(pinned);

  bool missed = false;
  std::printf("\n%-50s %10s %10s %8s %15s %6s  %s\n", "operation", "GB/s",
              "baseline", "ratio", "ratio range", "bar", "");
  for (const row& r : rows) {
    const double ratio = median(r.ratio);
    const auto [lo, hi] = std::minmax_element(r.ratio.begin(), r.ratio.end());
    const bool met = ratio >= r.bar;
    missed = missed || !met;
    const char* verdict = r.bar == 0 ? "" : (met ? "met" : "MISSED");
    char bar[16] = "";
    if (r.bar > 0)
      std::snprintf(bar, sizeof bar, ">=%.0f%%", r.bar * 100);
    char range[32] = "";
    std::snprintf(range, sizeof range, "%.1f-%.1f%%", 100.0 * *lo, 100.0 * *hi);
    std::printf("%-50s %10.1f %10.1f %7.1f%% %15s %6s  %s\n", r.name.c_str(),
                median(r.gbs), median(r.base), 100.0 * ratio, range, bar,
                verdict);
  }
  return missed ? 1 : 0;
}
