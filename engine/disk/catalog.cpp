#include "engine/disk/catalog.hpp"

#include "engine/disk/segment_file.hpp"

#include <sqlite3.h>

#include <array>
#include <cerrno>
#include <iterator>

namespace kvfleet::engine {

std::string_view to_string(storage_tier t) noexcept {
  switch (t) {
  case storage_tier::device:
    return "device";
  case storage_tier::host:
    return "host";
  case storage_tier::disk:
    return "disk";
  }
  return "unknown";
}

namespace {

constexpr const char* columns =
    "key, namespace, tier, segment, offset, size, codec, checksum, "
    "created_at, accessed_at, access_count, pinned, expires_at, "
    "size_partition, priority";

constexpr const char* schema = R"sql(
CREATE TABLE meta(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE cache_entries(
  id INTEGER PRIMARY KEY,
  key BLOB NOT NULL,
  namespace BLOB NOT NULL,
  tier INTEGER NOT NULL,
  segment INTEGER NOT NULL,
  offset INTEGER NOT NULL,
  size INTEGER NOT NULL,
  codec INTEGER NOT NULL,
  checksum INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  accessed_at INTEGER NOT NULL,
  access_count INTEGER NOT NULL DEFAULT 0,
  pinned INTEGER NOT NULL DEFAULT 0,
  expires_at INTEGER NOT NULL DEFAULT 0,
  size_partition INTEGER,
  priority INTEGER);
CREATE UNIQUE INDEX idx_cache_key ON cache_entries(key);
CREATE INDEX idx_cache_created_at ON cache_entries(created_at);
CREATE INDEX idx_cache_accessed_at ON cache_entries(accessed_at);
CREATE INDEX idx_cache_key_created ON cache_entries(key, created_at);
CREATE INDEX idx_cache_expires_at ON cache_entries(expires_at)
  WHERE expires_at > 0;
)sql";

std::array<unsigned char, 16> to_blob(std::uint64_t hi, std::uint64_t lo) {
  std::array<unsigned char, 16> b{};
  for (int i = 0; i < 8; ++i) {
    b[static_cast<std::size_t>(i)] =
        static_cast<unsigned char>(hi >> (56 - 8 * i));
    b[static_cast<std::size_t>(8 + i)] =
        static_cast<unsigned char>(lo >> (56 - 8 * i));
  }
  return b;
}

void from_blob(const void* p, int n, std::uint64_t& hi, std::uint64_t& lo) {
  hi = 0;
  lo = 0;
  if (p == nullptr || n != 16)
    return;
  const auto* b = static_cast<const unsigned char*>(p);
  for (int i = 0; i < 8; ++i) {
    hi = (hi << 8) | b[i];
    lo = (lo << 8) | b[8 + i];
  }
}

/// A prepared statement, finalized on destruction.
class stmt {
public:
  stmt() = default;
  stmt(const stmt&) = delete;
  stmt& operator=(const stmt&) = delete;
  ~stmt() { sqlite3_finalize(s_); }
  sqlite3_stmt** out() noexcept { return &s_; }
  sqlite3_stmt* get() const noexcept { return s_; }

private:
  sqlite3_stmt* s_ = nullptr;
};

/// Resets a statement when a use of it ends, so it holds no read lock.
class use {
public:
  explicit use(const stmt& s) : s_(s.get()) {}
  use(const use&) = delete;
  use& operator=(const use&) = delete;
  ~use() {
    sqlite3_reset(s_);
    sqlite3_clear_bindings(s_);
  }
  sqlite3_stmt* operator*() const noexcept { return s_; }

private:
  sqlite3_stmt* s_;
};

void bind_key(sqlite3_stmt* s, int i, std::uint64_t hi, std::uint64_t lo) {
  const auto b = to_blob(hi, lo);
  sqlite3_bind_blob(s, i, b.data(), static_cast<int>(b.size()),
                    SQLITE_TRANSIENT);
}

void bind_u64(sqlite3_stmt* s, int i, std::uint64_t v) {
  sqlite3_bind_int64(s, i, static_cast<sqlite3_int64>(v));
}

std::uint64_t col_u64(sqlite3_stmt* s, int i) {
  return static_cast<std::uint64_t>(sqlite3_column_int64(s, i));
}

/// A 16-byte blob, as every key and namespace is written.
bool is_key_blob(sqlite3_stmt* s, int i) {
  return sqlite3_column_type(s, i) == SQLITE_BLOB &&
         sqlite3_column_bytes(s, i) == 16;
}

catalog_entry read_row(sqlite3_stmt* s) {
  catalog_entry e;
  e.malformed = !is_key_blob(s, 0) || !is_key_blob(s, 1);
  from_blob(sqlite3_column_blob(s, 0), sqlite3_column_bytes(s, 0), e.key.hi,
            e.key.lo);
  from_blob(sqlite3_column_blob(s, 1), sqlite3_column_bytes(s, 1), e.ns.hi,
            e.ns.lo);
  e.tier = static_cast<storage_tier>(sqlite3_column_int(s, 2));
  e.segment = col_u64(s, 3);
  e.offset = col_u64(s, 4);
  e.size = col_u64(s, 5);
  e.c = static_cast<codec>(sqlite3_column_int(s, 6));
  e.checksum = col_u64(s, 7);
  e.created_at = sqlite3_column_int64(s, 8);
  e.accessed_at = sqlite3_column_int64(s, 9);
  e.access_count = col_u64(s, 10);
  e.pinned = static_cast<std::uint32_t>(sqlite3_column_int64(s, 11));
  e.expires_at = sqlite3_column_int64(s, 12);
  // NULL: not recorded (a row of a version 1 catalog). A value out of range
  // (a damaged row) is not trusted either: the block comes back where a
  // block of unknown partition does.
  if (sqlite3_column_type(s, 13) == SQLITE_INTEGER) {
    const std::int64_t p = sqlite3_column_int64(s, 13);
    if (p >= 0 && p < static_cast<std::int64_t>(partition_count))
      e.part = static_cast<size_partition>(p);
  }
  // The same for the priority (NULL in the rows of a version 1 or 2
  // catalog).
  if (sqlite3_column_type(s, 14) == SQLITE_INTEGER) {
    const std::int64_t p = sqlite3_column_int64(s, 14);
    if (p >= 0 && p < static_cast<std::int64_t>(priority_count))
      e.prio = static_cast<priority>(p);
  }
  return e;
}

} // namespace

struct catalog::impl {
  sqlite3* db = nullptr;
  stmt begin, commit, rollback, upsert, erase, set_pins, touch, relocate, all,
      lru_unpinned, expired, usage, oldest, lru, malformed;

  ~impl() {
    // Statements first: the connection closes only when all are finalized.
    for (stmt* s : {&begin, &commit, &rollback, &upsert, &erase, &set_pins,
                    &touch, &relocate, &all, &lru_unpinned, &expired, &usage,
                    &oldest, &lru, &malformed}) {
      sqlite3_finalize(s->get());
      *s->out() = nullptr;
    }
    sqlite3_close_v2(db);
  }
};

catalog::catalog(std::string path)
    : path_(std::move(path)), impl_(std::make_unique<impl>()) {}

catalog::~catalog() = default;

namespace {

std::string db_error(sqlite3* db, const std::string& path,
                     const std::string& what) {
  return "catalog " + path + ": " + what + ": " +
         (db != nullptr ? sqlite3_errmsg(db) : "out of memory");
}

/// What to do when the catalog file cannot be opened, by the system error
/// behind it.
std::string open_remedy(int os_errno) {
  switch (os_errno) {
  case EACCES:
  case EPERM:
    return "give the user running kvfleet read and write permission on the "
           "catalog and its directory, or choose another directory";
  case EROFS:
    return "the file system is mounted read-only: remount it read-write or "
           "choose another directory";
  case EISDIR:
    return "it is not a file: move it aside or choose another directory";
  case EMFILE:
  case ENFILE:
    return "no file descriptor is left: raise the open-file limit (ulimit "
           "-n)";
  default:
    return "fix the cause, or move the file aside or choose another "
           "directory";
  }
}

} // namespace

#define KVFLEET_SQL_ERROR(what)                                                \
  make_error(errc::io_error, db_error(impl_->db, path_, what))

result<std::unique_ptr<catalog>> catalog::open(const std::string& path,
                                               bool full_sync, fault f) {
  std::unique_ptr<catalog> c(new catalog(path));
  c->fault_ = std::move(f);
  sqlite3*& db = c->impl_->db;
  // Debian's SQLite takes a name that starts with "file:" for a URI even
  // without SQLITE_OPEN_URI (it is built with SQLITE_USE_URI): a directory
  // "file:d" failed to open, and "file:q?x" put the catalog in ./q. Such a
  // name is relative (an absolute one starts with '/'), so "./" in front
  // names the same file and is no URI.
  const std::string name =
      path.compare(0, 5, "file:") == 0 ? "./" + path : path;
  if (sqlite3_open_v2(name.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                          SQLITE_OPEN_NOMUTEX,
                      nullptr) != SQLITE_OK)
    return make_error(
        errc::io_error,
        db_error(db, path, "cannot open") + "; " +
            open_remedy(db != nullptr ? sqlite3_system_errno(db) : ENOMEM));
  // SQLite opens a file it may not write read-only without a word (mode
  // 0444, another user's file): the tier would open, and every spill,
  // erase and pin would then fail ("attempt to write a readonly
  // database"), only counted.
  const auto read_only = [&path] {
    return make_error(
        errc::io_error,
        "catalog " + path +
            " is read-only to the user running kvfleet (every spill would "
            "fail): give that user write permission on it and on its -wal "
            "and -shm files, if any, or choose another directory");
  };
  if (sqlite3_db_readonly(db, "main") == 1)
    return read_only();
  sqlite3_extended_result_codes(db, 1);
  auto exec = [&](const char* sql) {
    return sqlite3_exec(db, sql, nullptr, nullptr, nullptr);
  };
  // Reading the schema is the first access that touches the file: a file
  // that is not a database fails here.
  bool has_meta = false;
  {
    stmt s;
    int rc = sqlite3_prepare_v2(
        db, "SELECT count(*) FROM sqlite_master WHERE name = 'meta'", -1,
        s.out(), nullptr);
    if (rc == SQLITE_OK)
      rc = sqlite3_step(s.get());
    if (rc != SQLITE_ROW)
      return make_error(
          errc::parse_error,
          db_error(db, path, "not a kvfleet disk catalog") +
              "; move the file aside or point the disk tier at another "
              "directory");
    has_meta = sqlite3_column_int(s.get(), 0) > 0;
  }
  if (exec("PRAGMA journal_mode=WAL") != SQLITE_OK)
    return make_error(errc::io_error,
                      db_error(db, path, "cannot enable WAL mode") +
                          "; check that the directory is writable");
  if (exec(full_sync ? "PRAGMA synchronous=FULL"
                     : "PRAGMA synchronous=NORMAL") != SQLITE_OK)
    return make_error(errc::io_error,
                      db_error(db, path, "cannot set synchronous") +
                          "; the catalog may be damaged: move the directory "
                          "aside, or point the disk tier at another one");
  // The file may be writable and the catalog not all the same: its -wal
  // or -shm file another user's (left by an operator's sqlite3 shell run
  // as root, say). Only a write finds out. Busy (another writer holds the
  // catalog) is no reason to refuse: the tier retries its writes.
  if (const int rc = exec("BEGIN IMMEDIATE"); rc == SQLITE_OK)
    exec("ROLLBACK");
  else if ((rc & 0xff) == SQLITE_READONLY)
    return read_only();
  if (!has_meta) {
    const std::string init = std::string("BEGIN;") + schema +
                             "INSERT INTO meta VALUES('format_version', " +
                             std::to_string(disk_format_version) + ");COMMIT;";
    if (exec(init.c_str()) != SQLITE_OK) {
      auto err = db_error(db, path, "cannot create the schema") +
                 "; check that the directory is writable and its file "
                 "system has room, or choose another directory";
      exec("ROLLBACK");
      return make_error(errc::io_error, err);
    }
  } else {
    stmt s;
    std::int64_t version = -1;
    if (sqlite3_prepare_v2(
            db, "SELECT value FROM meta WHERE name = 'format_version'", -1,
            s.out(), nullptr) == SQLITE_OK &&
        sqlite3_step(s.get()) == SQLITE_ROW)
      version = sqlite3_column_int64(s.get(), 0);
    if (version < static_cast<std::int64_t>(oldest_disk_format_version) ||
        version > static_cast<std::int64_t>(disk_format_version))
      return make_error(
          errc::parse_error,
          "catalog " + path + " has format version " + std::to_string(version) +
              ", this build reads versions " +
              std::to_string(oldest_disk_format_version) + " to " +
              std::to_string(disk_format_version) +
              "; move the directory aside (or delete it to start an empty "
              "disk tier) or run a kvfleet build that reads that version");
    if (version < static_cast<std::int64_t>(disk_format_version)) {
      // Each version since 1 added one column, NULL in the rows written
      // before it (not recorded: see catalog_entry). All steps from the
      // catalog's version run in one transaction: a failure leaves the
      // catalog at its version.
      struct step {
        const char* column;
        const char* sql;
      };
      static constexpr step steps[] = {
          {"size_partition", // version 1 -> 2
           "ALTER TABLE cache_entries ADD COLUMN size_partition INTEGER;"},
          {"priority", // version 2 -> 3
           "ALTER TABLE cache_entries ADD COLUMN priority INTEGER;"},
      };
      static_assert(std::size(steps) + 1 == disk_format_version,
                    "one upgrade step per format version after 1");
      const std::string from = std::to_string(version);
      const std::string to = std::to_string(disk_format_version);
      const std::string what = "upgrade to format version " + to;
      std::string upgrade = "BEGIN IMMEDIATE;";
      std::string added;
      for (auto v = static_cast<std::size_t>(version); v < disk_format_version;
           ++v) {
        const step& st = steps[v - 1];
        upgrade += st.sql;
        added += added.empty() ? "" : " and ";
        added += st.column;
      }
      upgrade += "UPDATE meta SET value = " + to +
                 " WHERE name = 'format_version';COMMIT;";
      const int injected = c->fault_ ? c->injected_fault(what) : SQLITE_OK;
      const int rc = injected != SQLITE_OK ? injected : exec(upgrade.c_str());
      if (rc != SQLITE_OK) {
        const std::string why =
            injected != SQLITE_OK
                ? std::string(sqlite3_errstr(rc)) + " (injected by a test)"
                : std::string(sqlite3_errmsg(db));
        exec("ROLLBACK");
        std::string msg =
            "catalog " + path + " is at format version " + from +
            " and could not be upgraded to version " + to + " (adding the " +
            added +
            (added.find(" and ") != std::string::npos ? " columns): "
                                                      : " column): ") +
            why + "; it is left at version " + from + ". ";
        switch (rc & 0xff) {
        case SQLITE_FULL:
          return make_error(errc::out_of_memory,
                            msg + "The file system is full (SQLITE_FULL): "
                                  "free space in the directory and open "
                                  "it again");
        case SQLITE_READONLY:
        case SQLITE_PERM:
        case SQLITE_CANTOPEN:
          return make_error(errc::io_error,
                            msg + "Give this process write permission on "
                                  "the directory and the catalog");
        case SQLITE_BUSY:
        case SQLITE_LOCKED:
          return make_error(errc::busy,
                            msg + "Another process holds the catalog: stop "
                                  "it and open again");
        default:
          return make_error(errc::io_error,
                            msg + "Open it again once the cause is fixed");
        }
      }
    }
  }
  auto& i = *c->impl_;
  const std::string cols = columns;
  const std::pair<stmt*, std::string> prepared[] = {
      {&i.begin, "BEGIN IMMEDIATE"},
      {&i.commit, "COMMIT"},
      {&i.rollback, "ROLLBACK"},
      {&i.upsert,
       "INSERT INTO cache_entries(" + cols +
           ") VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15) "
           "ON CONFLICT(key) DO UPDATE SET namespace=excluded.namespace, "
           "tier=excluded.tier, segment=excluded.segment, "
           "offset=excluded.offset, size=excluded.size, codec=excluded.codec, "
           "checksum=excluded.checksum, created_at=excluded.created_at, "
           "accessed_at=excluded.accessed_at, "
           "access_count=excluded.access_count, pinned=excluded.pinned, "
           "expires_at=excluded.expires_at, "
           "size_partition=excluded.size_partition, "
           "priority=excluded.priority"},
      {&i.erase, "DELETE FROM cache_entries WHERE key = ?1"},
      {&i.malformed, "DELETE FROM cache_entries WHERE typeof(key) != 'blob' OR "
                     "length(key) != 16 OR typeof(namespace) != 'blob' OR "
                     "length(namespace) != 16"},
      {&i.set_pins, "UPDATE cache_entries SET pinned = ?2 WHERE key = ?1"},
      {&i.touch, "UPDATE cache_entries SET accessed_at = max(accessed_at, ?2), "
                 "access_count = access_count + ?3 WHERE key = ?1"},
      {&i.relocate,
       "UPDATE cache_entries SET segment = ?2, offset = ?3 WHERE key = ?1"},
      {&i.all, "SELECT " + cols + " FROM cache_entries"},
      {&i.lru_unpinned, "SELECT " + cols +
                            " FROM cache_entries WHERE pinned = 0 "
                            "ORDER BY accessed_at LIMIT ?1 OFFSET ?2"},
      {&i.expired, "SELECT key FROM cache_entries WHERE expires_at > 0 AND "
                   "expires_at <= ?1 ORDER BY expires_at LIMIT ?2"},
      {&i.usage, "SELECT namespace, tier, count(*), sum(size) FROM "
                 "cache_entries GROUP BY namespace, tier ORDER BY 1, 2"},
      {&i.oldest,
       "SELECT " + cols + " FROM cache_entries ORDER BY created_at LIMIT ?1"},
      {&i.lru,
       "SELECT " + cols + " FROM cache_entries ORDER BY accessed_at LIMIT ?1"},
  };
  for (const auto& [s, sql] : prepared) {
    if (sqlite3_prepare_v3(db, sql.c_str(), -1, SQLITE_PREPARE_PERSISTENT,
                           s->out(), nullptr) != SQLITE_OK)
      return make_error(errc::io_error,
                        db_error(db, path, "cannot prepare '" + sql + "'"));
  }
  return c;
}

namespace {

/// Runs a statement that returns no rows.
int run(sqlite3_stmt* s) {
  const int rc = sqlite3_step(s);
  return rc == SQLITE_DONE || rc == SQLITE_ROW ? SQLITE_OK : rc;
}

} // namespace

int catalog::injected_fault(const std::string& what) const {
  const int e = fault_(what);
  if (e == 0)
    return SQLITE_OK;
  return e == ENOSPC || e == EDQUOT ? SQLITE_FULL : SQLITE_IOERR;
}

#define KVFLEET_SQL_RUN(statement, what)                                       \
  do {                                                                         \
    const int fault_rc_ = fault_ ? injected_fault(what) : SQLITE_OK;           \
    const int rc_ = fault_rc_ != SQLITE_OK ? fault_rc_ : run(statement);       \
    if (rc_ != SQLITE_OK) {                                                    \
      full_ = (rc_ & 0xff) == SQLITE_FULL;                                     \
      if (fault_rc_ != SQLITE_OK)                                              \
        return make_error(errc::io_error, "catalog " + path_ + ": " + (what) + \
                                              ": " + sqlite3_errstr(rc_) +     \
                                              " (injected by a test)");        \
      return KVFLEET_SQL_ERROR(what);                                          \
    }                                                                          \
    full_ = false;                                                             \
  } while (false)

result<void> catalog::begin() {
  use u(impl_->begin);
  KVFLEET_SQL_RUN(*u, "begin");
  return {};
}

result<void> catalog::commit() {
  use u(impl_->commit);
  KVFLEET_SQL_RUN(*u, "commit");
  return {};
}

void catalog::rollback() noexcept {
  if (sqlite3_get_autocommit(impl_->db) != 0)
    return;
  use u(impl_->rollback);
  (void)run(*u);
}

bool catalog::in_transaction() const noexcept {
  return sqlite3_get_autocommit(impl_->db) == 0;
}

std::uint64_t catalog::changes() const noexcept {
  return static_cast<std::uint64_t>(sqlite3_total_changes64(impl_->db));
}

result<void> catalog::upsert(const catalog_entry& e) {
  use u(impl_->upsert);
  sqlite3_stmt* s = *u;
  bind_key(s, 1, e.key.hi, e.key.lo);
  bind_key(s, 2, e.ns.hi, e.ns.lo);
  sqlite3_bind_int(s, 3, static_cast<int>(e.tier));
  bind_u64(s, 4, e.segment);
  bind_u64(s, 5, e.offset);
  bind_u64(s, 6, e.size);
  sqlite3_bind_int(s, 7, static_cast<int>(e.c));
  bind_u64(s, 8, e.checksum);
  sqlite3_bind_int64(s, 9, e.created_at);
  sqlite3_bind_int64(s, 10, e.accessed_at);
  bind_u64(s, 11, e.access_count);
  sqlite3_bind_int64(s, 12, e.pinned);
  sqlite3_bind_int64(s, 13, e.expires_at);
  if (e.part)
    sqlite3_bind_int(s, 14, static_cast<int>(*e.part));
  else
    sqlite3_bind_null(s, 14);
  if (e.prio)
    sqlite3_bind_int(s, 15, static_cast<int>(*e.prio));
  else
    sqlite3_bind_null(s, 15);
  KVFLEET_SQL_RUN(s, "insert block " + e.key.to_hex());
  return {};
}

result<void> catalog::erase(const block_key& key) {
  use u(impl_->erase);
  bind_key(*u, 1, key.hi, key.lo);
  KVFLEET_SQL_RUN(*u, "delete block " + key.to_hex());
  return {};
}

result<std::uint64_t> catalog::drop_malformed() {
  use u(impl_->malformed);
  KVFLEET_SQL_RUN(*u, "delete damaged rows");
  return static_cast<std::uint64_t>(sqlite3_changes(impl_->db));
}

result<void> catalog::set_pins(const block_key& key, std::uint32_t pins) {
  use u(impl_->set_pins);
  bind_key(*u, 1, key.hi, key.lo);
  sqlite3_bind_int64(*u, 2, pins);
  KVFLEET_SQL_RUN(*u, "pin block " + key.to_hex());
  return {};
}

result<void> catalog::touch(const block_key& key, std::int64_t at,
                            std::uint64_t count) {
  use u(impl_->touch);
  bind_key(*u, 1, key.hi, key.lo);
  sqlite3_bind_int64(*u, 2, at);
  bind_u64(*u, 3, count);
  KVFLEET_SQL_RUN(*u, "touch block " + key.to_hex());
  return {};
}

result<void> catalog::relocate(const block_key& key, std::uint64_t segment,
                               std::uint64_t offset) {
  use u(impl_->relocate);
  bind_key(*u, 1, key.hi, key.lo);
  bind_u64(*u, 2, segment);
  bind_u64(*u, 3, offset);
  KVFLEET_SQL_RUN(*u, "relocate block " + key.to_hex());
  return {};
}

namespace {

/// Steps a row-returning statement, calling `fn` per row.
template <class Fn> int rows(sqlite3_stmt* s, Fn&& fn) {
  for (;;) {
    const int rc = sqlite3_step(s);
    if (rc == SQLITE_DONE)
      return SQLITE_OK;
    if (rc != SQLITE_ROW)
      return rc;
    fn(s);
  }
}

} // namespace

#define KVFLEET_SQL_ROWS(statement, fn, what)                                  \
  do {                                                                         \
    if (rows(statement, fn) != SQLITE_OK)                                      \
      return KVFLEET_SQL_ERROR(what);                                          \
  } while (false)

result<void>
catalog::for_each(const std::function<void(const catalog_entry&)>& fn) {
  use u(impl_->all);
  const int rc = rows(*u, [&](sqlite3_stmt* s) { fn(read_row(s)); });
  if (rc == SQLITE_OK)
    return {};
  // A damaged file (a page overwritten, cut short) fails the scan of the
  // open, or of a running tier's reload after a failed batch: say so and
  // how to start over. The process stops first: a running tier holds the
  // directory (LOCK, open segments), so moving it aside under the tier
  // would change nothing it reads. Before, the open said "database disk
  // image is malformed" and nothing else.
  if ((rc & 0xff) == SQLITE_CORRUPT || (rc & 0xff) == SQLITE_NOTADB) {
    const auto slash = path_.find_last_of('/');
    const std::string dir =
        slash == std::string::npos ? "." : path_.substr(0, slash);
    return make_error(
        errc::parse_error,
        db_error(impl_->db, path_, "scan") +
            "; the catalog is damaged: stop the process, then move the "
            "directory " +
            dir +
            " aside (or delete it) to start an empty disk tier, whose "
            "blocks are then recomputed");
  }
  return KVFLEET_SQL_ERROR("scan");
}

result<std::vector<catalog_entry>>
catalog::least_recent_unpinned(std::size_t limit, std::size_t skip) {
  use u(impl_->lru_unpinned);
  bind_u64(*u, 1, limit);
  bind_u64(*u, 2, skip);
  std::vector<catalog_entry> out;
  KVFLEET_SQL_ROWS(
      *u, [&](sqlite3_stmt* s) { out.push_back(read_row(s)); },
      "least recently used");
  return out;
}

result<std::vector<block_key>> catalog::expired(std::int64_t now,
                                                std::size_t limit) {
  use u(impl_->expired);
  sqlite3_bind_int64(*u, 1, now);
  bind_u64(*u, 2, limit);
  std::vector<block_key> out;
  KVFLEET_SQL_ROWS(
      *u,
      [&](sqlite3_stmt* s) {
        block_key k;
        from_blob(sqlite3_column_blob(s, 0), sqlite3_column_bytes(s, 0), k.hi,
                  k.lo);
        out.push_back(k);
      },
      "expired");
  return out;
}

result<std::vector<usage_row>> catalog::usage() {
  use u(impl_->usage);
  std::vector<usage_row> out;
  KVFLEET_SQL_ROWS(
      *u,
      [&](sqlite3_stmt* s) {
        usage_row r;
        from_blob(sqlite3_column_blob(s, 0), sqlite3_column_bytes(s, 0),
                  r.ns.hi, r.ns.lo);
        r.tier = static_cast<storage_tier>(sqlite3_column_int(s, 1));
        r.blocks = col_u64(s, 2);
        r.bytes = col_u64(s, 3);
        out.push_back(r);
      },
      "usage");
  return out;
}

result<std::vector<catalog_entry>> catalog::oldest(std::size_t limit) {
  use u(impl_->oldest);
  bind_u64(*u, 1, limit);
  std::vector<catalog_entry> out;
  KVFLEET_SQL_ROWS(
      *u, [&](sqlite3_stmt* s) { out.push_back(read_row(s)); }, "oldest");
  return out;
}

result<std::vector<catalog_entry>>
catalog::least_recently_used(std::size_t limit) {
  use u(impl_->lru);
  bind_u64(*u, 1, limit);
  std::vector<catalog_entry> out;
  KVFLEET_SQL_ROWS(
      *u, [&](sqlite3_stmt* s) { out.push_back(read_row(s)); },
      "least recently used");
  return out;
}

} // namespace kvfleet::engine
