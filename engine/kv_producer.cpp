#include "engine/kv_producer.hpp"

#include "engine/codec.hpp"
#include "engine/host_error.hpp"

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

result<void> kv_producer::produce_batch(const namespace_spec& spec,
                                        std::span<const block_key> keys,
                                        std::span<std::byte> out) {
  const std::size_t bytes = spec.value_bytes();
  if (out.size() != keys.size() * bytes)
    return make_error(errc::wrong_value_size,
                      "producer batch buffer holds " +
                          std::to_string(out.size()) + " bytes, " +
                          std::to_string(keys.size()) + " blocks need " +
                          std::to_string(keys.size() * bytes));
  for (std::size_t i = 0; i < keys.size(); ++i)
    if (auto ok = produce(spec, keys[i], out.subspan(i * bytes, bytes)); !ok)
      return ok;
  return {};
}

result<void> prefilled_producer::prefill(const namespace_spec& spec,
                                         std::span<const block_key> keys) {
  (void)clear();
  if (keys.empty())
    return {};
  const std::size_t bytes = spec.value_bytes();
  // Everything that allocates is inside: an exception (bad_alloc, or the
  // producer's own) leaves nothing prefilled, never a directory of keys
  // over another batch's bytes.
  auto ok = [&]() -> result<void> {
    try {
      std::vector<block_key> distinct;
      distinct.reserve(keys.size());
      for (const auto& k : keys)
        if (at_.emplace(k, distinct.size()).second)
          distinct.push_back(k);
      const std::size_t need = distinct.size() * bytes;
      // A buffer far larger than this batch needs (one large batch long
      // ago) is given back rather than kept for good.
      if (values_.capacity() > 4 * need &&
          values_.capacity() > (std::size_t{1} << 20))
        std::vector<std::byte>().swap(values_);
      values_.resize(need);
      taken_.assign(distinct.size(), false);
      ++batch_calls_;
      if (auto r = inner_.produce_batch(spec, distinct, values_); !r)
        return r;
      model_ = spec.model;
      value_bytes_ = bytes;
      prefilled_blocks_ += distinct.size();
      return {};
    } catch (...) {
      return unexpected<error>{
          current_exception_error("the producer threw for a batch of " +
                                  std::to_string(keys.size()) + " blocks")};
    }
  }();
  if (!ok) {
    at_.clear();
    taken_.clear();
    value_bytes_ = 0;
    return ok;
  }
  return {};
}

std::size_t prefilled_producer::clear() noexcept {
  std::size_t unused = 0;
  for (const bool t : taken_)
    unused += t ? 0 : 1;
  at_.clear();
  taken_.clear();
  return unused;
}

result<void> prefilled_producer::produce(const namespace_spec& spec,
                                         const block_key& key,
                                         std::span<std::byte> out) {
  if (const auto it = at_.find(key);
      it != at_.end() && out.size() == value_bytes_ &&
      spec.value_bytes() == value_bytes_ && spec.model == model_) {
    std::memcpy(out.data(), values_.data() + it->second * value_bytes_,
                value_bytes_);
    taken_[it->second] = true;
    ++served_;
    return {};
  }
  ++alone_;
  return inner_.produce(spec, key, out);
}

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
