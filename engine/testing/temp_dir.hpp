#pragma once
/// A fresh directory of the test's own under the system temp directory
/// (tests only), removed with everything in it when the object goes, so a
/// test that fails half-way leaves nothing behind and two test processes
/// running at once never share a path.

#include <filesystem>
#include <string>
#include <system_error>

#include <stdlib.h>

namespace kvfleet::engine::testing {

class temp_dir {
public:
  /// `prefix` starts the directory's name; path() is empty when mkdtemp
  /// failed (check ok()).
  explicit temp_dir(const std::string& prefix = "kvfleet_test_") {
    std::error_code ec;
    auto base = std::filesystem::temp_directory_path(ec);
    if (ec)
      base = "/tmp";
    std::string tmpl = (base / (prefix + "XXXXXX")).string();
    if (::mkdtemp(tmpl.data()) != nullptr)
      path_ = tmpl;
  }
  ~temp_dir() {
    if (!path_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(path_, ec);
    }
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  [[nodiscard]] bool ok() const { return !path_.empty(); }
  [[nodiscard]] const std::string& path() const { return path_; }
  /// path() / name.
  [[nodiscard]] std::string file(const std::string& name) const {
    return path_ + "/" + name;
  }

private:
  std::string path_;
};

} // namespace kvfleet::engine::testing
