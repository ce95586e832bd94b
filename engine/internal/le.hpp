#pragma once
// Little-endian serialization helpers, so hashes do not depend on the host's
// byte order.

#include <cstdint>
#include <vector>

namespace kvfleet::engine::internal {

inline void put_le32(std::vector<unsigned char>& out, std::uint64_t v) {
  for (int i = 0; i < 4; ++i)
    out.push_back(static_cast<unsigned char>((v >> (8 * i)) & 0xffU));
}

inline void put_le64(std::vector<unsigned char>& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i)
    out.push_back(static_cast<unsigned char>((v >> (8 * i)) & 0xffU));
}

inline void store_le32(unsigned char* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i)
    p[i] = static_cast<unsigned char>((v >> (8 * i)) & 0xffU);
}

inline void store_le64(unsigned char* p, std::uint64_t v) {
  for (int i = 0; i < 8; ++i)
    p[i] = static_cast<unsigned char>((v >> (8 * i)) & 0xffU);
}

} // namespace kvfleet::engine::internal
