#include "engine/block_key.hpp"

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include <gtest/gtest.h>

#include <numeric>
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

TEST(block_key, chain_key_matches_the_documented_byte_layout) {
  const auto fp = test_spec().fingerprint();
  const std::vector<std::uint32_t> tokens{10, 20, 30, 40};
  const block_key parent{0x0102030405060708ULL, 0x1112131415161718ULL};
  std::vector<unsigned char> buf;
  le64(buf, parent.hi);
  le64(buf, parent.lo);
  le64(buf, fp.hi);
  le64(buf, fp.lo);
  for (auto t : tokens)
    for (int i = 0; i < 4; ++i)
      buf.push_back(static_cast<unsigned char>(t >> (8 * i)));
  const XXH128_hash_t h =
      XXH3_128bits_withSeed(buf.data(), buf.size(), hash_seed);
  const block_key k = chain_key(parent, fp, tokens);
  EXPECT_EQ(k.hi, h.high64);
  EXPECT_EQ(k.lo, h.low64);
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
