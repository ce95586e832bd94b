#pragma once
/// Turns a disk tier's catalog into the one disk format version 1 wrote
/// (tests only; uses GoogleTest and SQLite): no size_partition column and
/// meta.format_version 1. The segment files are the same in both versions,
/// so the directory is then one a version 1 build left behind.

#include <gtest/gtest.h>
#include <sqlite3.h>

#include <string>

namespace kvfleet::engine::testing {

/// REQUIRES: no disk tier has `dir` open.
inline void make_catalog_v1(const std::string& dir) {
  const std::string path = dir + "/catalog.sqlite";
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK) << path;
  char* err = nullptr;
  const int rc =
      sqlite3_exec(db,
                   "BEGIN;"
                   "ALTER TABLE cache_entries DROP COLUMN size_partition;"
                   "UPDATE meta SET value = 1 WHERE name = 'format_version';"
                   "COMMIT;",
                   nullptr, nullptr, &err);
  const std::string why = err != nullptr ? err : "";
  sqlite3_free(err);
  sqlite3_close(db);
  ASSERT_EQ(rc, SQLITE_OK) << why;
}

} // namespace kvfleet::engine::testing
