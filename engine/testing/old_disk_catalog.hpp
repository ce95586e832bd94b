#pragma once
/// Turns a disk tier's catalog into the one an older disk format version
/// wrote (tests only; uses GoogleTest and SQLite): version 2 has no
/// priority column, version 1 neither a priority nor a size_partition
/// column; meta.format_version says which. The segment files are the same
/// in every version, so the directory is then one an older build left
/// behind.

#include <gtest/gtest.h>
#include <sqlite3.h>

#include <cstdint>
#include <initializer_list>
#include <string>

namespace kvfleet::engine::testing {

/// Runs `sql` on the catalog of `dir` in one transaction, after dropping
/// those of the columns `drop` (of cache_entries) that it has: a catalog
/// already without them (one an older build wrote) is turned into the
/// same older catalog.
/// REQUIRES: no disk tier has `dir` open.
inline void rewrite_catalog(const std::string& dir, const std::string& sql,
                            std::initializer_list<const char*> drop = {}) {
  const std::string path = dir + "/catalog.sqlite";
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK) << path;
  std::string all = "BEGIN;";
  for (const char* column : drop) {
    sqlite3_stmt* s = nullptr;
    bool has = false;
    if (sqlite3_prepare_v2(db,
                           "SELECT count(*) FROM pragma_table_info("
                           "'cache_entries') WHERE name = ?1",
                           -1, &s, nullptr) == SQLITE_OK) {
      sqlite3_bind_text(s, 1, column, -1, SQLITE_STATIC);
      has = sqlite3_step(s) == SQLITE_ROW && sqlite3_column_int(s, 0) > 0;
    }
    sqlite3_finalize(s);
    if (has)
      all +=
          std::string("ALTER TABLE cache_entries DROP COLUMN ") + column + ";";
  }
  all += sql + "COMMIT;";
  char* err = nullptr;
  const int rc = sqlite3_exec(db, all.c_str(), nullptr, nullptr, &err);
  const std::string why = err != nullptr ? err : "";
  sqlite3_free(err);
  sqlite3_close(db);
  ASSERT_EQ(rc, SQLITE_OK) << why;
}

/// The catalog of disk format version 2: no priority column.
/// REQUIRES: no disk tier has `dir` open.
inline void make_catalog_v2(const std::string& dir) {
  rewrite_catalog(dir,
                  "UPDATE meta SET value = 2 WHERE name = 'format_version';",
                  {"priority"});
}

/// The catalog of disk format version 1: no priority and no size_partition
/// column.
/// REQUIRES: no disk tier has `dir` open.
inline void make_catalog_v1(const std::string& dir) {
  rewrite_catalog(dir,
                  "UPDATE meta SET value = 1 WHERE name = 'format_version';",
                  {"priority", "size_partition"});
}

/// meta.format_version of the catalog of `dir`, -1 when it cannot be read.
/// REQUIRES: no disk tier is writing to `dir` (a tier open there and idle
/// is fine: the catalog runs in WAL mode).
inline std::int64_t catalog_version(const std::string& dir) {
  const std::string path = dir + "/catalog.sqlite";
  sqlite3* db = nullptr;
  std::int64_t version = -1;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) ==
      SQLITE_OK) {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v2(
            db, "SELECT value FROM meta WHERE name = 'format_version'", -1, &s,
            nullptr) == SQLITE_OK &&
        sqlite3_step(s) == SQLITE_ROW)
      version = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
  }
  sqlite3_close(db);
  return version;
}

} // namespace kvfleet::engine::testing
