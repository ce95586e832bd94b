#include "engine/block_key.hpp"

#include "engine/internal/le.hpp"

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include <array>
#include <cstdio>

namespace kvfleet::engine {

std::string block_key::to_hex() const {
  std::array<char, 33> buf{};
  std::snprintf(buf.data(), buf.size(), "%016llx%016llx",
                static_cast<unsigned long long>(hi),
                static_cast<unsigned long long>(lo));
  return std::string(buf.data(), 32);
}

namespace {

// Header of every chained hash input: parent key then namespace, 32 bytes.
void write_header(unsigned char* p, const block_key& parent,
                  const ns_fingerprint& ns) {
  internal::store_le64(p, parent.hi);
  internal::store_le64(p + 8, parent.lo);
  internal::store_le64(p + 16, ns.hi);
  internal::store_le64(p + 24, ns.lo);
}

block_key finish(const XXH128_hash_t& h) {
  return {h.high64, h.low64};
}

} // namespace

block_key chain_key(const block_key& parent, const ns_fingerprint& ns,
                    std::span<const std::uint32_t> tokens) {
  // Initialised first, as xxhash.h asks of a state on the stack: the
  // reset rebuilds its seeded secret only when the state's seed differs,
  // so stack bytes that read as this seed left another call's secret in
  // use, and inputs over 240 bytes hashed to another key.
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_128bits_reset_withSeed(&state, hash_seed);
  std::array<unsigned char, 32> header{};
  write_header(header.data(), parent, ns);
  XXH3_128bits_update(&state, header.data(), header.size());
  // Tokens in little-endian, staged through a small buffer.
  std::array<unsigned char, 1024> buf{};
  std::size_t fill = 0;
  for (const std::uint32_t t : tokens) {
    internal::store_le32(buf.data() + fill, t);
    fill += 4;
    if (fill == buf.size()) {
      XXH3_128bits_update(&state, buf.data(), fill);
      fill = 0;
    }
  }
  if (fill > 0)
    XXH3_128bits_update(&state, buf.data(), fill);
  return finish(XXH3_128bits_digest(&state));
}

block_key chain_key_from_id(const block_key& parent, const ns_fingerprint& ns,
                            std::uint64_t block_id) {
  std::array<unsigned char, 41> buf{};
  write_header(buf.data(), parent, ns);
  buf[32] = 0xffU; // domain separator: an id, not tokens
  internal::store_le64(buf.data() + 33, block_id);
  return finish(XXH3_128bits_withSeed(buf.data(), buf.size(), hash_seed));
}

void chain_keys(const ns_fingerprint& ns, std::uint32_t block_tokens,
                std::span<const std::uint32_t> tokens,
                std::vector<block_key>& out) {
  if (block_tokens == 0)
    return;
  block_key parent{};
  const std::size_t blocks = tokens.size() / block_tokens;
  out.reserve(out.size() + blocks);
  for (std::size_t i = 0; i < blocks; ++i) {
    parent =
        chain_key(parent, ns, tokens.subspan(i * block_tokens, block_tokens));
    out.push_back(parent);
  }
}

result<void> check_request_keys(std::span<const block_key> keys) {
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (keys[i].is_null())
      return make_error(errc::invalid_argument,
                        "key " + std::to_string(i) +
                            " is the all-zero block key, which is reserved");
    if (i > 0 && keys[i] == keys[i - 1])
      return make_error(errc::invalid_argument,
                        "keys " + std::to_string(i - 1) + " and " +
                            std::to_string(i) + " are the same block " +
                            keys[i].to_hex() +
                            ": a block cannot be its own parent");
  }
  return {};
}

} // namespace kvfleet::engine
