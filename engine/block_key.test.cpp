#include "engine/block_key.hpp"

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include <gtest/gtest.h>

#include <cstddef>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

namespace kvfleet::engine {
namespace {

namespace_spec test_spec() {
  namespace_spec s;
  s.model = "llama-3-8b";
  s.layers = 32;
  s.kv_heads = 8;
  s.head_dim = 128;
  s.type = dtype::fp16;
  s.block_tokens = 4;
  s.tenant_salt = 7;
  return s;
}

void le64(std::vector<unsigned char>& b, std::uint64_t v) {
  for (int i = 0; i < 8; ++i)
    b.push_back(static_cast<unsigned char>(v >> (8 * i)));
}

TEST(block_key, fixed_vectors_do_not_change) {
  // These literals pin the key format: if they change, every cached block
  // on every machine stops matching. Change them only with a format version.
  const auto fp = test_spec().fingerprint();
  EXPECT_EQ(block_key({fp.hi, fp.lo}).to_hex(),
            "f268c56aa484051d296931c0f2cbfe38");
  std::vector<std::uint32_t> tokens(8);
  std::iota(tokens.begin(), tokens.end(), 1U);
  std::vector<block_key> keys;
  chain_keys(fp, 4, tokens, keys);
  ASSERT_EQ(keys.size(), 2U);
  EXPECT_EQ(keys[0].to_hex(), "f3c85deeb8ea9a7a62b1c430612de90e");
  EXPECT_EQ(keys[1].to_hex(), "61a7dd709fa595389d1db78284f6c6cd");
}

/// The library's one-shot XXH3-128 over the documented layout of a key's
/// input: parent, namespace, tokens, little-endian.
block_key reference_key(const block_key& parent, const ns_fingerprint& ns,
                        const std::vector<std::uint32_t>& tokens) {
  std::vector<unsigned char> buf;
  le64(buf, parent.hi);
  le64(buf, parent.lo);
  le64(buf, ns.hi);
  le64(buf, ns.lo);
  for (auto t : tokens)
    for (int i = 0; i < 4; ++i)
      buf.push_back(static_cast<unsigned char>(t >> (8 * i)));
  const XXH128_hash_t h =
      XXH3_128bits_withSeed(buf.data(), buf.size(), hash_seed);
  return {h.high64, h.low64};
}

TEST(block_key, chain_key_matches_the_documented_byte_layout) {
  const auto fp = test_spec().fingerprint();
  const std::vector<std::uint32_t> tokens{10, 20, 30, 40};
  const block_key parent{0x0102030405060708ULL, 0x1112131415161718ULL};
  const block_key h = reference_key(parent, fp, tokens);
  const block_key k = chain_key(parent, fp, tokens);
  EXPECT_EQ(k.hi, h.hi);
  EXPECT_EQ(k.lo, h.lo);
}

/// Leaves stack bytes where the next call's frame will be that read, as
/// an XXH3 state, as one of hash_seed with another secret: what an earlier
/// call of other code could have left there.
[[gnu::noinline]] void leave_stale_hash_states() {
  alignas(64) unsigned char region[16384];
  const std::size_t seed_at = offsetof(XXH3_state_t, seed) % 64;
  const std::size_t secret_at = offsetof(XXH3_state_t, extSecret) % 64;
  for (std::size_t i = 0; i < sizeof region; i += 64) {
    std::memset(region + i, 0x5a, 64);
    std::memcpy(region + i + seed_at, &hash_seed, sizeof hash_seed);
    std::memset(region + i + secret_at, 0, 8);
  }
  asm volatile("" : : "r"(region) : "memory");
}

TEST(block_key, long_blocks_and_model_ids_hash_the_same_whatever_the_stack) {
  // Blocks of 64 and 512 tokens (inputs over 240 bytes take XXH3's
  // streaming path, and 512 tokens go through the staging buffer twice)
  // and a 300-byte model id. Before, the hash state on the stack was not
  // initialised: stack bytes that read as hash_seed kept a stale secret,
  // and the key changed.
  auto spec = test_spec();
  spec.model = std::string(300, 'm');
  const auto fp = spec.fingerprint();
  for (const std::size_t n : {std::size_t{64}, std::size_t{512}}) {
    std::vector<std::uint32_t> tokens(n);
    std::iota(tokens.begin(), tokens.end(), 100U);
    const block_key want = reference_key({}, fp, tokens);
    EXPECT_EQ(chain_key({}, fp, tokens), want) << n << " tokens";
    leave_stale_hash_states();
    EXPECT_EQ(chain_key({}, fp, tokens), want) << n << " tokens, stale stack";
  }
  leave_stale_hash_states();
  EXPECT_EQ(spec.fingerprint(), fp) << "stale stack";
  // Pinned, as the short vectors above are.
  std::vector<std::uint32_t> tokens(512);
  std::iota(tokens.begin(), tokens.end(), 1U);
  EXPECT_EQ(chain_key({}, test_spec().fingerprint(), tokens).to_hex(),
            "89b27b139c2c2b45b247573019943a5a");
  EXPECT_EQ(block_key({fp.hi, fp.lo}).to_hex(),
            "c0e62d096523b890bffa94b092e7c8bd");
}

TEST(block_key, same_tokens_and_namespace_give_same_keys) {
  const auto fp = test_spec().fingerprint();
  std::vector<std::uint32_t> tokens(4096);
  std::iota(tokens.begin(), tokens.end(), 100U);
  std::vector<block_key> a;
  std::vector<block_key> b;
  chain_keys(fp, 4, tokens, a);
  chain_keys(fp, 4, tokens, b);
  EXPECT_EQ(a, b);
  EXPECT_EQ(a.size(), 1024U);
}

TEST(block_key, prefix_shares_keys_and_divergence_changes_the_rest) {
  const auto fp = test_spec().fingerprint();
  std::vector<std::uint32_t> x{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  std::vector<std::uint32_t> y = x;
  y[5] = 99; // second block differs
  std::vector<block_key> kx;
  std::vector<block_key> ky;
  chain_keys(fp, 4, x, kx);
  chain_keys(fp, 4, y, ky);
  EXPECT_EQ(kx[0], ky[0]);
  EXPECT_NE(kx[1], ky[1]);
  EXPECT_NE(kx[2], ky[2]); // chained: the third block differs too
}

TEST(block_key, namespaces_never_match) {
  auto a = test_spec();
  auto b = test_spec();
  b.tenant_salt = 8;
  auto c = test_spec();
  c.type = dtype::bf16;
  const std::vector<std::uint32_t> tokens{1, 2, 3, 4};
  const auto ka = chain_key({}, a.fingerprint(), tokens);
  EXPECT_NE(ka, chain_key({}, b.fingerprint(), tokens));
  EXPECT_NE(ka, chain_key({}, c.fingerprint(), tokens));
}

TEST(block_key, partial_blocks_get_no_key) {
  const auto fp = test_spec().fingerprint();
  std::vector<std::uint32_t> tokens{1, 2, 3, 4, 5, 6};
  std::vector<block_key> keys;
  chain_keys(fp, 4, tokens, keys);
  EXPECT_EQ(keys.size(), 1U);
}

TEST(block_key, ids_and_tokens_are_separate_domains) {
  const auto fp = test_spec().fingerprint();
  const auto a = chain_key_from_id({}, fp, 42);
  EXPECT_EQ(a, chain_key_from_id({}, fp, 42));
  EXPECT_NE(a, chain_key_from_id({}, fp, 43));
  EXPECT_NE(a, chain_key_from_id(a, fp, 42));
}

TEST(kv_namespace, fingerprint_matches_the_documented_byte_layout) {
  // Version byte 1, the model id length-prefixed, then the fields, all
  // little-endian; model ids shorter and longer than XXH3's 256-byte
  // stream buffer, and empty.
  for (const std::size_t model_chars : {0U, 10U, 300U, 5000U}) {
    SCOPED_TRACE(model_chars);
    auto spec = test_spec();
    spec.model.assign(model_chars, 'm');
    std::vector<unsigned char> buf{1};
    le64(buf, spec.model.size());
    buf.insert(buf.end(), spec.model.begin(), spec.model.end());
    for (const std::uint32_t v : {spec.layers, spec.kv_heads, spec.head_dim})
      for (int i = 0; i < 4; ++i)
        buf.push_back(static_cast<unsigned char>(v >> (8 * i)));
    buf.push_back(static_cast<unsigned char>(spec.type));
    for (int i = 0; i < 4; ++i)
      buf.push_back(static_cast<unsigned char>(spec.block_tokens >> (8 * i)));
    le64(buf, spec.tenant_salt);
    const XXH128_hash_t h =
        XXH3_128bits_withSeed(buf.data(), buf.size(), hash_seed);
    const ns_fingerprint fp = spec.fingerprint();
    EXPECT_EQ(fp.hi, h.high64);
    EXPECT_EQ(fp.lo, h.low64);
  }
}

TEST(kv_namespace, validation_names_the_problem) {
  auto s = test_spec();
  EXPECT_TRUE(s.validate().has_value());
  s.layers = 0;
  auto r = s.validate();
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, errc::invalid_argument);
  s = test_spec();
  s.model.clear();
  EXPECT_FALSE(s.validate().has_value());
  s = test_spec();
  s.layers = 1 << 20;
  s.block_tokens = 1 << 20;
  r = s.validate();
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, errc::value_too_large);
  // 2^20 layers x 2 x 2^20 tokens x 8 heads x 128 dims x 2 bytes = 2^52.
  EXPECT_NE(r.error().message.find(" 4503599627370496 bytes,"),
            std::string::npos)
      << r.error().message;
  EXPECT_EQ(test_spec().value_bytes(), 32U * 2 * 4 * 8 * 128 * 2);
}

} // namespace
} // namespace kvfleet::engine
