#pragma once
/// The disk tier's SQLite catalog: one row per block in `cache_entries`.
///
/// Schema (format version disk_format_version, kept in table `meta`):
///   cache_entries(id INTEGER PRIMARY KEY, key BLOB(16), namespace BLOB(16),
///                 tier, segment, offset, size, codec, checksum, created_at,
///                 accessed_at, access_count, pinned, expires_at,
///                 size_partition, priority)
///   idx_cache_key (unique) on key, idx_cache_created_at,
///   idx_cache_accessed_at, idx_cache_key_created on (key, created_at), and
///   idx_cache_expires_at on expires_at for rows that expire.
/// Keys and namespaces are 16 big-endian bytes (hi then lo), so byte order is
/// numeric order. Checksums are the uint64 stored as its int64 bit pattern;
/// times are int64 nanoseconds; `pinned` is the pin count; `size_partition`
/// is the block's size partition in the store that spilled it (0 short, 1
/// medium, 2 long), NULL when not recorded (rows of a version 1 catalog);
/// `priority` the block's request priority in that store (0 background to
/// 4 critical, engine::priority), NULL when not recorded (rows of a version
/// 1 or 2 catalog). A catalog of version 1 (neither column) or 2 (no
/// priority column) is upgraded at open.
///
/// The database runs in WAL mode with prepared statements, and one
/// connection writes (the disk tier's I/O thread). Writes are grouped by the
/// caller with begin()/commit().
///
/// Thread safety: none; one thread uses a catalog. Errors are values naming
/// the database file. sqlite3.h is included only by catalog.cpp.

#include "engine/block_key.hpp"
#include "engine/codec.hpp"
#include "engine/eviction_policy.hpp"
#include "engine/kv_namespace.hpp"
#include "engine/result.hpp"
#include "engine/stats.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kvfleet::engine {

/// Where a block lives. The disk tier's catalog holds `disk` rows only;
/// the column lets one catalog describe other tiers later.
enum class storage_tier : std::uint8_t { device = 0, host = 1, disk = 2 };

[[nodiscard]] std::string_view to_string(storage_tier t) noexcept;

/// One row of cache_entries.
struct catalog_entry {
  block_key key{};
  ns_fingerprint ns{};
  storage_tier tier = storage_tier::disk;
  std::uint64_t segment = 0;
  std::uint64_t offset = 0;
  std::uint64_t size = 0; ///< payload bytes (the encoded value)
  codec c = codec::none;
  std::uint64_t checksum = 0;
  std::int64_t created_at = 0;
  std::int64_t accessed_at = 0;
  std::uint64_t access_count = 0;
  std::uint32_t pinned = 0;
  std::int64_t expires_at = 0; ///< 0 = never
  /// The size partition the block was in; nullopt when not recorded.
  std::optional<size_partition> part;
  /// The block's request priority; nullopt when not recorded.
  std::optional<priority> prio;
  /// The row's key or namespace is not a 16-byte blob (a damaged row):
  /// `key` and `ns` are then zero. drop_malformed() deletes such rows.
  bool malformed = false;
};

/// Blocks and payload bytes of one (namespace, tier).
struct usage_row {
  ns_fingerprint ns{};
  storage_tier tier = storage_tier::disk;
  std::uint64_t blocks = 0;
  std::uint64_t bytes = 0;
};

class catalog {
public:
  /// Test hook: consulted with a statement's description ("relocate block
  /// <key>", "insert block <key>", "begin", "upgrade to format version 3",
  /// ...) before each write; a nonzero errno fails it without running it:
  /// ENOSPC or EDQUOT as SQLITE_FULL (last_error_was_full()), any other as
  /// an I/O error.
  using fault = std::function<int(const std::string& what)>;

  /// Opens or creates the catalog at `path`. A catalog of format version 1
  /// or 2 is upgraded to disk_format_version in one transaction (the
  /// columns it lacks, size_partition and priority, are added, NULL in its
  /// rows); an upgrade that fails leaves it at its version and fails the
  /// open with a message that says so and why: errc::out_of_memory when the
  /// file system is full,
  /// errc::busy when another process holds the catalog, errc::io_error
  /// otherwise. A database of another format version, or a file that is
  /// not a catalog, is errc::parse_error with a message naming the path and
  /// what to do. A file that cannot be opened, or that SQLite could open
  /// only read-only (another user's file, mode 0444, or its -wal or -shm
  /// file), is errc::io_error with a message naming it and what to do.
  /// `full_sync`: synchronous=FULL (survives power loss) instead of NORMAL
  /// (survives a process crash). `f`: see fault.
  [[nodiscard]] static result<std::unique_ptr<catalog>>
  open(const std::string& path, bool full_sync, fault f = {});

  ~catalog();
  catalog(const catalog&) = delete;
  catalog& operator=(const catalog&) = delete;

  [[nodiscard]] const std::string& path() const noexcept { return path_; }

  [[nodiscard]] result<void> begin();
  [[nodiscard]] result<void> commit();
  /// Rolls back an open transaction; a no-op without one.
  void rollback() noexcept;
  /// Whether a transaction is open: begin() succeeded and neither commit(),
  /// rollback() nor SQLite itself (it rolls back on some errors, e.g.
  /// SQLITE_FULL) has ended it.
  [[nodiscard]] bool in_transaction() const noexcept;
  /// Rows inserted, updated or deleted on this connection since it opened
  /// (SQLite's total changes; a rollback does not take them back), so that
  /// a caller can tell which statements of a transaction changed rows.
  [[nodiscard]] std::uint64_t changes() const noexcept;

  /// Inserts a row, or replaces every column of the row with the same key.
  [[nodiscard]] result<void> upsert(const catalog_entry& e);
  [[nodiscard]] result<void> erase(const block_key& key);
  /// Deletes every row whose key or namespace is not a 16-byte blob (a
  /// damaged row, read with `malformed` set: erase() of its zero key never
  /// matches it); returns how many went. A write: call it only when a scan
  /// found such a row, inside a transaction with the other repairs.
  [[nodiscard]] result<std::uint64_t> drop_malformed();
  [[nodiscard]] result<void> set_pins(const block_key& key, std::uint32_t pins);
  /// accessed_at = max(accessed_at, at), access_count += count.
  [[nodiscard]] result<void> touch(const block_key& key, std::int64_t at,
                                   std::uint64_t count);
  [[nodiscard]] result<void>
  relocate(const block_key& key, std::uint64_t segment, std::uint64_t offset);

  /// Calls `fn` for every row.
  [[nodiscard]] result<void>
  for_each(const std::function<void(const catalog_entry&)>& fn);
  /// Up to `limit` unpinned rows, least recently accessed first, after
  /// the first `skip` of them.
  [[nodiscard]] result<std::vector<catalog_entry>>
  least_recent_unpinned(std::size_t limit, std::size_t skip = 0);
  /// Up to `limit` rows with 0 < expires_at <= now.
  [[nodiscard]] result<std::vector<block_key>> expired(std::int64_t now,
                                                       std::size_t limit);
  /// Blocks and bytes grouped by namespace and tier.
  [[nodiscard]] result<std::vector<usage_row>> usage();
  /// Up to `limit` rows, oldest created first.
  [[nodiscard]] result<std::vector<catalog_entry>> oldest(std::size_t limit);
  /// Up to `limit` rows, least recently accessed first (pinned included).
  [[nodiscard]] result<std::vector<catalog_entry>>
  least_recently_used(std::size_t limit);
  /// Whether SQLite's last error was "database or disk is full".
  [[nodiscard]] bool last_error_was_full() const noexcept { return full_; }

  /// Test hook (see fault), for the writes after open.
  void set_fault_for_testing(fault f) { fault_ = std::move(f); }

private:
  /// The SQLite result code fault_ makes `what` fail with (SQLITE_OK: none).
  [[nodiscard]] int injected_fault(const std::string& what) const;
  struct impl;
  explicit catalog(std::string path);
  std::string path_;
  std::unique_ptr<impl> impl_;
  bool full_ = false;
  fault fault_;
};

} // namespace kvfleet::engine
