#pragma once
/// Batched device kernels: codec encode/decode (fp8, int8, int4 with
/// per-group scales, bit-exact with engine/codec.hpp), block copies (gather
/// of scattered pool slots into a contiguous buffer and scatter back) and
/// block checksums (engine/checksum.hpp, computed on the device).
///
/// Every call takes device pointers, validates the whole batch on the host
/// and refuses it before anything is launched (an unknown codec, a block of
/// the wrong size, a misaligned or null pointer, a range outside its
/// buffer), then enqueues its kernels on `stream` and returns without
/// waiting. A batch of any length is one launch per 1024 blocks (per 8184
/// for aligned gather and scatter, whose jobs are one offset each). Launch
/// failures are error values naming the kernel and the CUDA code.
/// Arithmetic is fp32 (mixed precision: fp16/bf16 storage, fp32 inside the
/// kernels), IEEE division, no fused multiply-add, round half to even.
///
/// Includes no CUDA header: a stream is passed as an opaque stream_ref.
/// Thread safety: calls on different streams may run concurrently.

#include "engine/codec.hpp"
#include "engine/kv_namespace.hpp"
#include "engine/result.hpp"

#include <cstddef>
#include <cstdint>
#include <span>

namespace kvfleet::cuda {

namespace internal {
struct offset_scan;
} // namespace internal

/// A cudaStream_t without the CUDA header; nullptr is the legacy default
/// stream.
struct stream_ref {
  void* handle = nullptr;
};

/// Blocks per kernel launch (the batch travels in the launch's parameters).
inline constexpr std::size_t max_blocks_per_launch = 1024;

/// One block of a codec batch: device pointers and the sizes of the
/// buffers behind them (checked before launch).
struct codec_job {
  const std::byte* src = nullptr;
  std::size_t src_bytes = 0;
  std::byte* dst = nullptr;
  std::size_t dst_bytes = 0;
};

/// Which element conversions the codec kernels use. Both give the bytes of
/// engine/codec.cpp; `hardware` uses the GPU's conversion instructions,
/// `portable` the bit-level functions of cuda/internal/codec_math.hpp that
/// the host tests check against the engine.
enum class kernel_path : std::uint8_t { hardware = 0, portable = 1 };

/// Encodes each job's `elements` elements of `t` (src: 2 * elements bytes,
/// 16-byte aligned) into the engine's encoded format (dst: at least
/// encoded_size(c, elements) bytes, 4-byte aligned). codec::none is a copy
/// and needs both sides 16-byte aligned (copy_blocks takes any alignment).
/// `elements` must be a positive multiple of engine::codec_group_size; a
/// count whose size in bytes does not fit a size_t is errc::value_too_large.
[[nodiscard]] result<void>
encode_blocks(engine::codec c, engine::dtype t, std::size_t elements,
              std::span<const codec_job> jobs, stream_ref stream = {},
              kernel_path path = kernel_path::hardware);

/// Decodes each job (src: encoded_size(c, elements) bytes, 4-byte aligned;
/// 16-byte under codec::none) into `elements` elements of `t` (dst: at
/// least 2 * elements bytes, 16-byte aligned).
[[nodiscard]] result<void>
decode_blocks(engine::codec c, engine::dtype t, std::size_t elements,
              std::span<const codec_job> jobs, stream_ref stream = {},
              kernel_path path = kernel_path::hardware);

/// One device-to-device copy. Any alignment works; 16-byte aligned
/// pointers and sizes take the fast path.
struct copy_job {
  const std::byte* src = nullptr;
  std::byte* dst = nullptr;
  std::size_t bytes = 0;
};

/// Copies every job (no overlaps within a job or between a job's
/// destination and any other job's range).
[[nodiscard]] result<void> copy_blocks(std::span<const copy_job> jobs,
                                       stream_ref stream = {});

/// A device buffer and its size, for range checks.
struct device_span {
  std::byte* data = nullptr;
  std::size_t bytes = 0;
};

/// Gathers blocks of `block_bytes` at `offsets` in `pool` into `out`, block
/// i at out + i * block_bytes. Every range must lie inside its buffer.
[[nodiscard]] result<void>
gather_blocks(device_span pool, std::span<const std::size_t> offsets,
              std::size_t block_bytes, device_span out, stream_ref stream = {});

/// The reverse: block i of `in` goes to pool + offsets[i].
[[nodiscard]] result<void> scatter_blocks(device_span in,
                                          std::span<const std::size_t> offsets,
                                          std::size_t block_bytes,
                                          device_span pool,
                                          stream_ref stream = {});

/// One block to checksum.
struct checksum_job {
  const std::byte* data = nullptr;
  std::size_t bytes = 0;
};

/// Largest block checksum_blocks accepts (its chunk hashes stay in shared
/// memory): 4096 chunks of 4 KiB.
inline constexpr std::size_t max_checksum_block_bytes = std::size_t{16} << 20;

/// Writes engine::block_checksum of each job's bytes to out[i] (memory the
/// device can write: device memory or pinned host memory).
[[nodiscard]] result<void> checksum_blocks(std::span<const checksum_job> jobs,
                                           std::uint64_t* out,
                                           stream_ref stream = {});

/// The validation the calls above run before launching, exposed so that it
/// can be tested without a GPU. Each returns what the call would refuse.
namespace validate {
[[nodiscard]] result<void> codec_batch(engine::codec c, engine::dtype t,
                                       std::size_t elements,
                                       std::span<const codec_job> jobs,
                                       bool encode);
[[nodiscard]] result<void> copy_batch(std::span<const copy_job> jobs);
[[nodiscard]] result<void> gather_batch(device_span pool,
                                        std::span<const std::size_t> offsets,
                                        std::size_t block_bytes,
                                        device_span other);
/// The same with the offsets already scanned (the launcher's one pass,
/// against last = pool.bytes - block_bytes).
[[nodiscard]] result<void> gather_batch(device_span pool,
                                        std::span<const std::size_t> offsets,
                                        std::size_t block_bytes,
                                        device_span other,
                                        const internal::offset_scan& scan);
[[nodiscard]] result<void> checksum_batch(std::span<const checksum_job> jobs,
                                          const std::uint64_t* out);
} // namespace validate

} // namespace kvfleet::cuda
