#include "engine/kv_producer.hpp"

#include "engine/codec.hpp"

#include <array>
#include <chrono>
#include <cstring>

namespace kvfleet::engine {

namespace {

std::uint64_t splitmix(std::uint64_t& s) noexcept {
  std::uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

} // namespace

result<void> synthetic_producer::produce(const namespace_spec& spec,
                                         const block_key& key,
                                         std::span<std::byte> out) {
  const std::size_t bytes = spec.value_bytes();
  if (out.size() != bytes)
    return make_error(errc::wrong_value_size, "producer output buffer holds " +
                                                  std::to_string(out.size()) +
                                                  " bytes, the block needs " +
                                                  std::to_string(bytes));
  const auto start = std::chrono::steady_clock::now();
  std::uint64_t state = key.hi ^ (key.lo * 0xff51afd7ed558ccdULL);
  // A per-block magnitude so groups differ in scale, as real KV does.
  const float scale = 0.25f + static_cast<float>(splitmix(state) >> 40) /
                                  static_cast<float>(1ULL << 24) * 4.0f;
  // Each element is a sum of four 4-bit uniforms (an approximately normal
  // value), so a block has only 61 distinct values: convert them once.
  std::array<std::uint16_t, 61> table{};
  for (std::size_t v = 0; v < table.size(); ++v) {
    const float x = (static_cast<float>(v) - 30.0f) / 30.0f * scale;
    table[v] = spec.type == dtype::bf16 ? float_to_bf16(x) : float_to_half(x);
  }
  const std::size_t elements = bytes / 2;
  std::size_t i = 0;
  while (i < elements) {
    std::uint64_t r = splitmix(state);
    for (std::size_t j = 0; j < 4 && i < elements; ++j, ++i, r >>= 16) {
      const auto lane = static_cast<std::uint32_t>(r & 0xffffU);
      const std::uint32_t sum = (lane & 0xfU) + ((lane >> 4) & 0xfU) +
                                ((lane >> 8) & 0xfU) + (lane >> 12);
      std::memcpy(out.data() + 2 * i, &table[sum], 2);
    }
  }
  if (burn_) {
    const auto until = start + cost(spec.block_tokens);
    while (std::chrono::steady_clock::now() < until) {
    }
  }
  return {};
}

} // namespace kvfleet::engine
