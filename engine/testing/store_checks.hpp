#pragma once
/// Helpers the block_store tests share (tests only; uses GoogleTest).

#include "engine/block_key.hpp"
#include "engine/block_store.hpp"
#include "engine/kv_producer.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace kvfleet::engine::testing {

/// Every eviction policy, for tests run once per policy
/// (`::testing::ValuesIn(every_policy_kind), policy_param_name{}`).
inline constexpr std::array<policy_kind, 5> every_policy_kind{
    policy_kind::lru, policy_kind::lfu, policy_kind::priority,
    policy_kind::adaptive, policy_kind::belady};

/// A policy parameter's test name: the policy's own ("lru", ...).
struct policy_param_name {
  template <class Info> std::string operator()(const Info& info) const {
    return std::string(to_string(info.param));
  }
};

/// Keys of a chain of `n` blocks whose token ids are first, first + 1, ...
inline std::vector<block_key> chain_of(const namespace_spec& spec,
                                       std::uint64_t first, std::size_t n) {
  std::vector<block_key> keys;
  block_key parent{};
  for (std::size_t i = 0; i < n; ++i) {
    parent = chain_key_from_id(parent, spec.fingerprint(), first + i);
    keys.push_back(parent);
  }
  return keys;
}

/// Processes `keys` as one request of whole blocks and checks the store's
/// invariants after it.
inline process_result process_chain(block_store& store, ns_id ns,
                                    const namespace_spec& spec,
                                    const std::vector<block_key>& keys,
                                    kv_producer& producer) {
  auto r = store.process(ns, keys, keys.size() * spec.block_tokens, producer);
  EXPECT_TRUE(r.has_value()) << r.error().describe();
  store.check_invariants();
  return r.value_or(process_result{});
}

/// The block's bytes as the store returns them equal what the producer
/// makes for it: nothing came back wrong.
inline void expect_produced_bytes(block_store& store, ns_id ns,
                                  const namespace_spec& spec,
                                  kv_producer& producer, const block_key& k) {
  auto lease = store.acquire(ns, k);
  ASSERT_TRUE(lease.has_value()) << k.to_hex();
  std::vector<std::byte> got(spec.value_bytes());
  std::vector<std::byte> want(spec.value_bytes());
  ASSERT_TRUE(store.read(*lease, got).has_value());
  ASSERT_TRUE(producer.produce(spec, k, want).has_value());
  EXPECT_EQ(got, want);
}

} // namespace kvfleet::engine::testing
