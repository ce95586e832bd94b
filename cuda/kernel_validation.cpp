// Host-side checks of kernel batches (see kernels.hpp): everything a kernel
// call refuses is refused here, before any launch.
#include "cuda/internal/offset_scan.hpp"
#include "cuda/kernels.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

namespace kvfleet::cuda::validate {

namespace {

bool aligned(const void* p, std::size_t a) {
  return reinterpret_cast<std::uintptr_t>(p) % a == 0;
}

/// Whether [a, a + an) and [b, b + bn) overlap (as addresses: the ranges
/// may belong to different allocations).
bool overlap(const void* a, std::size_t an, const void* b, std::size_t bn) {
  const auto x = reinterpret_cast<std::uintptr_t>(a);
  const auto y = reinterpret_cast<std::uintptr_t>(b);
  return x < y + bn && y < x + an;
}

std::string job_name(std::size_t i) {
  return "block " + std::to_string(i);
}

} // namespace

result<void> codec_batch(engine::codec c, engine::dtype t, std::size_t elements,
                         std::span<const codec_job> jobs, bool encode) {
  const char* what = encode ? "encode_blocks" : "decode_blocks";
  if (!engine::is_valid(c))
    return make_error(errc::unknown_codec,
                      std::string(what) + ": unknown codec value " +
                          std::to_string(static_cast<unsigned>(c)));
  if (t != engine::dtype::fp16 && t != engine::dtype::bf16)
    return make_error(errc::invalid_argument,
                      std::string(what) + ": unknown dtype value " +
                          std::to_string(static_cast<unsigned>(t)));
  if (elements == 0 || elements % engine::codec_group_size != 0)
    return make_error(errc::wrong_value_size,
                      std::string(what) + ": " + std::to_string(elements) +
                          " elements is not a positive multiple of the group "
                          "size " +
                          std::to_string(engine::codec_group_size));
  // 2 * elements (and codec::none's encoded size, the same) must not wrap:
  // 2^63 elements would pass as blocks of 0 bytes.
  if (elements > std::numeric_limits<std::size_t>::max() / 2)
    return make_error(errc::value_too_large,
                      std::string(what) + ": " + std::to_string(elements) +
                          " elements do not fit a block's size in bytes");
  const std::size_t raw = 2 * elements;
  const std::size_t enc = engine::encoded_size(c, elements);
  const std::size_t src_need = encode ? raw : enc;
  const std::size_t dst_need = encode ? enc : raw;
  const std::size_t src_align = encode || c == engine::codec::none ? 16 : 4;
  const std::size_t dst_align = encode && c != engine::codec::none ? 4 : 16;
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    const codec_job& j = jobs[i];
    if (j.src == nullptr || j.dst == nullptr)
      return make_error(errc::invalid_argument, std::string(what) + ": " +
                                                    job_name(i) +
                                                    " has a null pointer");
    if (j.src_bytes != src_need)
      return make_error(errc::wrong_value_size,
                        std::string(what) + ": " + job_name(i) +
                            " source holds " + std::to_string(j.src_bytes) +
                            " bytes, " + std::to_string(elements) +
                            " elements under " +
                            std::string(engine::to_string(c)) + " need " +
                            std::to_string(src_need));
    if (j.dst_bytes < dst_need)
      return make_error(errc::wrong_value_size,
                        std::string(what) + ": " + job_name(i) +
                            " destination holds " +
                            std::to_string(j.dst_bytes) + " bytes, needs " +
                            std::to_string(dst_need));
    if (!aligned(j.src, src_align) || !aligned(j.dst, dst_align))
      return make_error(errc::invalid_argument,
                        std::string(what) + ": " + job_name(i) +
                            " is misaligned (source needs " +
                            std::to_string(src_align) + " bytes, destination " +
                            std::to_string(dst_align) + ")");
    if (overlap(j.src, src_need, j.dst, dst_need))
      return make_error(errc::invalid_argument,
                        std::string(what) + ": " + job_name(i) +
                            " source and destination overlap");
  }
  return {};
}

result<void> copy_batch(std::span<const copy_job> jobs) {
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    const copy_job& j = jobs[i];
    if (j.bytes == 0)
      continue;
    if (j.src == nullptr || j.dst == nullptr)
      return make_error(errc::invalid_argument,
                        "copy_blocks: " + job_name(i) + " has a null pointer");
    if (overlap(j.src, j.bytes, j.dst, j.bytes))
      return make_error(errc::invalid_argument,
                        "copy_blocks: " + job_name(i) +
                            " source and destination overlap");
  }
  return {};
}

result<void> gather_batch(device_span pool,
                          std::span<const std::size_t> offsets,
                          std::size_t block_bytes, device_span other) {
  return gather_batch(
      pool, offsets, block_bytes, other,
      internal::scan_offsets(offsets,
                             internal::last_offset(pool.bytes, block_bytes)));
}

result<void> gather_batch(device_span pool,
                          std::span<const std::size_t> offsets,
                          std::size_t block_bytes, device_span other,
                          const internal::offset_scan& scan) {
  if (pool.data == nullptr || other.data == nullptr)
    return make_error(errc::invalid_argument, "gather/scatter: null buffer");
  if (block_bytes == 0)
    return make_error(errc::wrong_value_size,
                      "gather/scatter: blocks of 0 bytes");
  if (offsets.size() > other.bytes / block_bytes)
    return make_error(errc::wrong_value_size,
                      "gather/scatter: " + std::to_string(offsets.size()) +
                          " blocks of " + std::to_string(block_bytes) +
                          " bytes do not fit the contiguous buffer of " +
                          std::to_string(other.bytes) + " bytes");
  // `scan` is one pass without early exits (internal/offset_scan.hpp); the
  // error path looks again to name the first bad block.
  const std::size_t last = internal::last_offset(pool.bytes, block_bytes);
  if (!offsets.empty() && (block_bytes > pool.bytes || scan.past_end)) {
    for (std::size_t i = 0; i < offsets.size(); ++i) {
      if (block_bytes > pool.bytes || offsets[i] > last)
        return make_error(errc::invalid_argument,
                          "gather/scatter: " + job_name(i) + " at offset " +
                              std::to_string(offsets[i]) +
                              " runs past the pool's " +
                              std::to_string(pool.bytes) + " bytes");
    }
  }
  if (overlap(pool.data, pool.bytes, other.data, other.bytes))
    return make_error(errc::invalid_argument,
                      "gather/scatter: pool and contiguous buffer overlap");
  return {};
}

result<void> checksum_batch(std::span<const checksum_job> jobs,
                            const std::uint64_t* out) {
  if (out == nullptr && !jobs.empty())
    return make_error(errc::invalid_argument, "checksum_blocks: null output");
  if (!aligned(out, 8))
    return make_error(errc::invalid_argument,
                      "checksum_blocks: misaligned output");
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    if (jobs[i].data == nullptr && jobs[i].bytes != 0)
      return make_error(errc::invalid_argument,
                        "checksum_blocks: " + job_name(i) +
                            " has a null pointer");
    if (jobs[i].bytes > max_checksum_block_bytes)
      return make_error(errc::value_too_large,
                        "checksum_blocks: " + job_name(i) + " has " +
                            std::to_string(jobs[i].bytes) + " bytes, at most " +
                            std::to_string(max_checksum_block_bytes) +
                            " are supported");
  }
  return {};
}

} // namespace kvfleet::cuda::validate
