#pragma once
/// Append-only segment files of the disk tier, and their on-disk format.
///
/// A segment file `seg-<16 hex digits>.kvs` is a file header followed by
/// records; a record is a fixed header followed by the block's encoded bytes.
/// All integers are little-endian. Segment format version 1 (unchanged in
/// disk format versions 2 and 3, which each added a catalog column only):
///
///   file header (32 bytes)
///     0  8  magic "kvfseg\0\1"
///     8  4  format version (segment_format_version)
///    12  4  reserved, 0
///    16  8  segment id
///    24  8  XXH3-64 (seed hash_seed) of bytes 0..23
///   record header (80 bytes), then `size` payload bytes
///     0  4  magic "KVB1"
///     4  1  codec
///     5  3  reserved, 0
///     8  8  payload size
///    16 16  block key (hi, lo)
///    32 16  namespace fingerprint (hi, lo)
///    48  8  payload checksum (engine/checksum.hpp block_checksum)
///    56  8  created_at (nanoseconds, the owner's clock)
///    64  8  expires_at (nanoseconds; 0 = never)
///    72  8  XXH3-64 (seed hash_seed) of bytes 0..71
///
/// Records are written with one positioned write at the file's end and never
/// modified; space is reclaimed by compaction (copying live records into the
/// active segment and deleting the old file). A header or payload whose
/// checksum does not match is never returned.
///
/// Thread safety: a segment_file is used by one thread at a time (the disk
/// tier's I/O thread). Move-only; closes its descriptor on destruction.
/// Errors are values (result<T>), each naming the file.

#include "engine/block_key.hpp"
#include "engine/codec.hpp"
#include "engine/kv_namespace.hpp"
#include "engine/result.hpp"

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace kvfleet::engine {

/// Version of the disk tier's on-disk format, kept in the catalog
/// (`meta.format_version`). A change to the catalog's or the segments'
/// layout bumps it. Version 2 added the catalog's `size_partition` column,
/// version 3 its `priority` column.
inline constexpr std::uint32_t disk_format_version = 3;
/// The oldest version this build opens: a catalog of version 1 or 2 is
/// upgraded in place at open (the missing columns are added, NULL: its
/// blocks' partitions and priorities are unknown), after which a build that
/// reads only the older version refuses it.
inline constexpr std::uint32_t oldest_disk_format_version = 1;
/// Version in every segment file header. The segment layout is the same in
/// disk format versions 1, 2 and 3.
inline constexpr std::uint32_t segment_format_version = 1;
inline constexpr std::size_t segment_header_bytes = 32;
inline constexpr std::size_t record_header_bytes = 80;

/// The decoded fixed header of one record.
struct record_header {
  codec c = codec::none;
  std::uint64_t size = 0;
  block_key key{};
  ns_fingerprint ns{};
  std::uint64_t checksum = 0;
  std::int64_t created_at = 0;
  std::int64_t expires_at = 0;

  /// Bytes of header plus payload.
  [[nodiscard]] std::uint64_t record_bytes() const noexcept {
    return record_header_bytes + size;
  }
};

/// Serializes `h` (header checksum included).
[[nodiscard]] std::array<std::byte, record_header_bytes>
encode_record_header(const record_header& h) noexcept;
/// Parses a record header; errc::checksum_mismatch when the magic or the
/// header checksum is wrong (a torn or corrupted header).
[[nodiscard]] result<record_header>
decode_record_header(std::span<const std::byte, record_header_bytes> raw);

/// Name of segment `id`'s file ("seg-00000000000000a1.kvs").
[[nodiscard]] std::string segment_file_name(std::uint64_t id);
/// Segment id of a file name made by segment_file_name, or -1.
[[nodiscard]] std::int64_t parse_segment_file_name(const std::string& name);

/// fsync of directory `dir`, which makes the names of files created in it
/// durable (fdatasync of a file does not). errc::io_error naming `dir`.
[[nodiscard]] result<void> sync_directory(const std::string& dir);

/// One open segment file.
class segment_file {
public:
  /// Test hook: called before each append; a nonzero return is treated as
  /// the errno of a failed write (ENOSPC simulates a full disk).
  using write_fault = std::function<int()>;

  /// Creates a new, empty segment (fails if the file exists); the errno of
  /// a failure goes to `*err_no` when given.
  [[nodiscard]] static result<segment_file>
  create(const std::string& dir, std::uint64_t id, int* err_no = nullptr);
  /// Opens an existing segment and validates its file header:
  /// errc::checksum_mismatch when the header is short or damaged (a crash
  /// while the file was created), errc::parse_error for another format
  /// version or segment id, errc::io_error when the file cannot be opened
  /// or read (no file descriptor left, permissions, I/O error). With
  /// `check_header` false the header is not read at all (a file whose
  /// header was damaged after records went in: each record has its own
  /// checked header, and each payload its checksum).
  [[nodiscard]] static result<segment_file>
  open(const std::string& dir, std::uint64_t id, bool check_header = true);

  segment_file() = default;
  segment_file(segment_file&& other) noexcept { *this = std::move(other); }
  segment_file& operator=(segment_file&& other) noexcept;
  segment_file(const segment_file&) = delete;
  segment_file& operator=(const segment_file&) = delete;
  ~segment_file();

  [[nodiscard]] std::uint64_t id() const noexcept { return id_; }
  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  /// Bytes in the file (header included); appends go here.
  [[nodiscard]] std::uint64_t size() const noexcept { return size_; }

  /// Appends one record; returns its offset. On failure the file is cut
  /// back to its previous size and errc::io_error is returned, with the
  /// errno in `*err_no` when given (ENOSPC: the disk is full).
  [[nodiscard]] result<std::uint64_t> append(const record_header& h,
                                             std::span<const std::byte> payload,
                                             const write_fault& fault,
                                             int* err_no);

  /// Reads the record at `offset` into `payload` (exactly its payload size)
  /// and checks it: header checksum, key, size, payload checksum.
  /// errc::checksum_mismatch for any mismatch or a short read. Reads through
  /// a memory mapping (checksum and copy in one pass; an I/O error while
  /// touching it, SIGBUS, is caught and returned as errc::io_error), or with
  /// preadv where the file cannot be mapped. On a mismatch `payload` is
  /// zeroed.
  /// With `verify` false the payload checksum is skipped (header, key and
  /// size are still checked): for a caller that verifies on use.
  [[nodiscard]] result<record_header> read(std::uint64_t offset,
                                           const block_key& expect_key,
                                           std::span<std::byte> payload,
                                           bool verify = true) const;

  /// read() without the mapping: preadv alone (a second try after an I/O
  /// error, which a fault of the mapping may have caused).
  [[nodiscard]] result<record_header>
  read_unmapped(std::uint64_t offset, const block_key& expect_key,
                std::span<std::byte> payload, bool verify = true) const;
  /// The file's size as the file system has it now (fstat), which a file
  /// cut short by something else makes smaller than size().
  [[nodiscard]] result<std::uint64_t> size_on_disk() const;

  /// Reads and checks only the record header at `offset`;
  /// errc::checksum_mismatch when it is cut short or damaged.
  [[nodiscard]] result<record_header> read_header(std::uint64_t offset) const;

  /// Cuts the file to `bytes` (>= the file header), dropping a torn tail.
  [[nodiscard]] result<void> truncate(std::uint64_t bytes);
  /// fdatasync.
  [[nodiscard]] result<void> sync();

private:
  /// Maps the file read-only up to at least `end` bytes; false when mmap
  /// fails (read() then falls back to preadv).
  bool map_to(std::uint64_t end) const;
  void unmap() const noexcept;
  [[nodiscard]] result<record_header> read_mapped(std::uint64_t offset,
                                                  const block_key& expect_key,
                                                  std::span<std::byte> payload,
                                                  bool verify) const;
  [[nodiscard]] result<record_header> read_pread(std::uint64_t offset,
                                                 const block_key& expect_key,
                                                 std::span<std::byte> payload,
                                                 bool verify) const;

  int fd_ = -1;
  std::uint64_t id_ = 0;
  std::uint64_t size_ = 0;
  std::string path_;
  // Read-only shared mapping used by read(): one pass over the page cache
  // that verifies and copies, instead of a kernel copy then a checksum pass.
  // Only the I/O thread reads, so the lazily grown mapping needs no lock.
  mutable const std::byte* map_ = nullptr;
  mutable std::size_t map_len_ = 0;
};

} // namespace kvfleet::engine
