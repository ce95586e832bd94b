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
#include <cstdint>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvfleet::engine {

class kv_producer {
public:
  virtual ~kv_producer() = default;
  /// Writes the uncompressed value (spec.value_bytes() bytes) of block `key`
  /// into `out`. REQUIRES: out.size() == spec.value_bytes().
  [[nodiscard]] virtual result<void> produce(const namespace_spec& spec,
                                             const block_key& key,
                                             std::span<std::byte> out) = 0;
  /// Writes the uncompressed values of `keys`, one after another
  /// (spec.value_bytes() bytes each, in the order of `keys`), into `out`
  /// in one call: a model's prefill of a whole batch, one kernel launch.
  /// REQUIRES: out.size() == keys.size() * spec.value_bytes(). The
  /// default calls produce() for each key in turn; a producer that can
  /// compute many blocks at once overrides it. The engine actor calls it
  /// once per batch with the blocks its requests miss (prefilled_producer).
  [[nodiscard]] virtual result<void>
  produce_batch(const namespace_spec& spec, std::span<const block_key> keys,
                std::span<std::byte> out);
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

/// The values of a batch's missing blocks computed ahead, in one
/// produce_batch() call of the producer it wraps (prefill()); produce()
/// copies a prefilled block's value out and passes any other block to the
/// wrapped producer's produce(), so a block the estimate missed (its prefix
/// evicted by an earlier request of the batch, say) is still computed, on
/// its own. Not thread-safe: owned by one engine.
class prefilled_producer final : public kv_producer {
public:
  explicit prefilled_producer(kv_producer& inner) : inner_(inner) {}

  /// Forgets what was prefilled before, then computes `keys` in one
  /// produce_batch() call (keys that repeat are computed once). An error
  /// of that call, or an exception it throws, is returned and nothing is
  /// prefilled: produce() then computes each block alone, as without a
  /// prefill. Nothing to compute (no keys) is no call.
  result<void> prefill(const namespace_spec& spec,
                       std::span<const block_key> keys);
  /// Forgets what was prefilled (the buffer's memory is kept for the next
  /// batch); returns how many prefilled blocks no produce() took.
  std::size_t clear() noexcept;

  [[nodiscard]] result<void> produce(const namespace_spec& spec,
                                     const block_key& key,
                                     std::span<std::byte> out) override;
  [[nodiscard]] result<void> produce_batch(const namespace_spec& spec,
                                           std::span<const block_key> keys,
                                           std::span<std::byte> out) override {
    return inner_.produce_batch(spec, keys, out);
  }
  [[nodiscard]] nanos cost(std::size_t tokens) const noexcept override {
    return inner_.cost(tokens);
  }

  /// produce_batch() calls made by prefill(), and the blocks they computed.
  [[nodiscard]] std::uint64_t batch_calls() const noexcept {
    return batch_calls_;
  }
  [[nodiscard]] std::uint64_t prefilled_blocks() const noexcept {
    return prefilled_blocks_;
  }
  /// produce() calls answered from a prefill, and those passed on to the
  /// wrapped producer (a block computed alone).
  [[nodiscard]] std::uint64_t served() const noexcept { return served_; }
  [[nodiscard]] std::uint64_t alone() const noexcept { return alone_; }

private:
  kv_producer& inner_;
  std::vector<std::byte> values_;
  std::unordered_map<block_key, std::size_t, block_key_hash> at_;
  std::vector<bool> taken_;
  std::size_t value_bytes_ = 0;
  std::string model_;
  std::uint64_t batch_calls_ = 0;
  std::uint64_t prefilled_blocks_ = 0;
  std::uint64_t served_ = 0;
  std::uint64_t alone_ = 0;
};

} // namespace kvfleet::engine
