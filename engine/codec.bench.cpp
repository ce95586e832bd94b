// Codec throughput on one 256 KiB block of fp16 values drawn from N(0, 1).
// Bytes processed are fp16 input bytes, so encode, decode and round trip
// (encode + decode per iteration) report comparable GB/s; rel_l2_error is
// the round trip's relative L2 error on the same block. The *_generic
// variants force the portable path, for the speed-up of the dispatched one
// measured side by side.
#include "engine/codec.hpp"
#include "engine/internal/codec_isa.hpp"

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace {

using namespace kvfleet::engine;
using kvfleet::engine::internal::codec_isa;

constexpr std::size_t block_bytes = std::size_t{256} * 1024;
constexpr std::size_t block_elements = block_bytes / 2;

std::vector<std::byte> normal_block() {
  std::mt19937 gen(42);
  std::normal_distribution<float> dist(0.0F, 1.0F);
  std::vector<std::byte> out(block_bytes);
  for (std::size_t i = 0; i < block_elements; ++i) {
    const std::uint16_t h = float_to_half(dist(gen));
    std::memcpy(out.data() + 2 * i, &h, sizeof h);
  }
  return out;
}

struct fixture {
  codec c;
  codec_isa isa;
  std::vector<std::byte> src = normal_block();
  std::vector<std::byte> enc;
  std::vector<std::byte> back = std::vector<std::byte>(block_bytes);

  fixture(codec c_, codec_isa isa_)
      : c(c_), isa(isa_), enc(encoded_size(c_, block_elements)) {}

  bool encode_once() {
    auto r = internal::encode_with(isa, c, dtype::fp16, src, enc);
    benchmark::DoNotOptimize(enc.data());
    return r.has_value();
  }
  bool decode_once() {
    auto r = internal::decode_with(isa, c, dtype::fp16, enc, back);
    benchmark::DoNotOptimize(back.data());
    return r.has_value();
  }
  /// Round trip outside the timed loop, for the error counter.
  bool finish(benchmark::State& state) {
    if (!encode_once() || !decode_once()) {
      state.SkipWithError("codec failed");
      return false;
    }
    state.counters["rel_l2_error"] = relative_l2_error(dtype::fp16, src, back);
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                            static_cast<std::int64_t>(block_bytes));
    return true;
  }
};

codec_isa path(bool generic) {
  return generic ? codec_isa::generic : internal::best_codec_isa();
}

void BM_codec_encode(benchmark::State& state, codec c) {
  fixture f(c, path(false));
  for (auto _ : state) {
    if (!f.encode_once())
      state.SkipWithError("encode failed");
    benchmark::ClobberMemory();
  }
  f.finish(state);
}

void BM_codec_decode(benchmark::State& state, codec c) {
  fixture f(c, path(false));
  if (!f.encode_once())
    state.SkipWithError("encode failed");
  for (auto _ : state) {
    if (!f.decode_once())
      state.SkipWithError("decode failed");
    benchmark::ClobberMemory();
  }
  f.finish(state);
}

void roundtrip(benchmark::State& state, codec c, bool generic) {
  fixture f(c, path(generic));
  for (auto _ : state) {
    if (!f.encode_once() || !f.decode_once())
      state.SkipWithError("round trip failed");
    benchmark::ClobberMemory();
  }
  f.finish(state);
}

void BM_codec_roundtrip(benchmark::State& state, codec c) {
  roundtrip(state, c, false);
}

void BM_codec_roundtrip_generic(benchmark::State& state, codec c) {
  roundtrip(state, c, true);
}

BENCHMARK_CAPTURE(BM_codec_encode, none, codec::none);
BENCHMARK_CAPTURE(BM_codec_encode, fp8, codec::fp8);
BENCHMARK_CAPTURE(BM_codec_encode, int8, codec::int8);
BENCHMARK_CAPTURE(BM_codec_encode, int4, codec::int4);

BENCHMARK_CAPTURE(BM_codec_decode, none, codec::none);
BENCHMARK_CAPTURE(BM_codec_decode, fp8, codec::fp8);
BENCHMARK_CAPTURE(BM_codec_decode, int8, codec::int8);
BENCHMARK_CAPTURE(BM_codec_decode, int4, codec::int4);

BENCHMARK_CAPTURE(BM_codec_roundtrip, none, codec::none);
BENCHMARK_CAPTURE(BM_codec_roundtrip, fp8, codec::fp8);
BENCHMARK_CAPTURE(BM_codec_roundtrip, int8, codec::int8);
BENCHMARK_CAPTURE(BM_codec_roundtrip, int4, codec::int4);

BENCHMARK_CAPTURE(BM_codec_roundtrip_generic, fp8, codec::fp8);
BENCHMARK_CAPTURE(BM_codec_roundtrip_generic, int8, codec::int8);
BENCHMARK_CAPTURE(BM_codec_roundtrip_generic, int4, codec::int4);

} // namespace
