#pragma once
/// Producers compute the KV of blocks that missed the cache.
///
/// In production the producer is the inference engine's prefill. The
/// synthetic producer stands in for it in benchmarks and tests: it writes
/// deterministic, plausible fp16/bf16 values derived from the block key (the
/// key is a hash of the block's token ids and all tokens before them, as a
/// real KV is a function of the whole prefix) and reports a configurable
/// compute cost per token, so a benchmark can count prefill time saved.

#include "engine/block_key.hpp"
#include "engine/clock.hpp"
#include "engine/kv_namespace.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <span>

namespace kvfleet::engine {

class kv_producer {
public:
  virtual ~kv_producer() = default;
  /// Writes the uncompressed value (spec.value_bytes() bytes) of block `key`
  /// into `out`. REQUIRES: out.size() == spec.value_bytes().
  [[nodiscard]] virtual result<void> produce(const namespace_spec& spec,
                                             const block_key& key,
                                             std::span<std::byte> out) = 0;
  /// Compute time this producer spends on `tokens` tokens of prefill.
  [[nodiscard]] virtual nanos cost(std::size_t tokens) const noexcept = 0;
};

/// Deterministic synthetic KV. Values are fp16 or bf16 (per the namespace)
/// drawn from an approximately normal distribution with a per-block scale,
/// so the codecs see realistic data. Thread-safe (stateless).
class synthetic_producer final : public kv_producer {
public:
  /// `per_token_cost` is reported by cost(); with `burn` set, produce()
  /// also spins for that long, for benchmarks that want real prefill time.
  explicit synthetic_producer(nanos per_token_cost = nanos{0},
                              bool burn = false)
      : per_token_cost_(per_token_cost), burn_(burn) {}

  [[nodiscard]] result<void> produce(const namespace_spec& spec,
                                     const block_key& key,
                                     std::span<std::byte> out) override;
  [[nodiscard]] nanos cost(std::size_t tokens) const noexcept override {
    return per_token_cost_ * static_cast<long>(tokens);
  }

private:
  nanos per_token_cost_;
  bool burn_;
};

} // namespace kvfleet::engine
