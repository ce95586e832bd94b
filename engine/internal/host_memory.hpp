#pragma once
/// How much host memory a process can still populate: the parsers behind
/// host_memory_available() (engine/memory_backend.hpp), separate so tests
/// can feed them text.

#include <atomic>
#include <cstddef>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

namespace kvfleet::engine::detail {

/// Bytes of `MemAvailable:` in /proc/meminfo text; nullopt when the line is
/// missing or unreadable.
[[nodiscard]] std::optional<std::size_t>
meminfo_available(std::string_view meminfo);

/// The process's memory cgroup in /proc/self/cgroup text: the cgroup v2
/// path (the "0::PATH" line) when `v1` is false, else the path of the v1
/// hierarchy whose controllers include "memory". nullopt without one.
[[nodiscard]] std::optional<std::string> cgroup_path(std::string_view text,
                                                     bool v1);

/// The number after `key` on its line of a memory.stat text ("key N");
/// nullopt when missing or not a number.
[[nodiscard]] std::optional<std::size_t> stat_value(std::string_view text,
                                                    std::string_view key);

/// Room left under a cgroup limit: the limit (v2 memory.max, v1
/// memory.limit_in_bytes) minus the usage (memory.current,
/// memory.usage_in_bytes) less the `file_pages` of cache inside it, which
/// the kernel reclaims before it kills; 0 when over. nullopt for "max" (no
/// limit) or text that is not a number.
[[nodiscard]] std::optional<std::size_t> cgroup_room(std::string_view max,
                                                     std::string_view current,
                                                     std::size_t file_pages);

/// Host arenas being populated in this process, and the bytes of theirs
/// not faulted in yet, which host_memory_available() does not see: two
/// arenas made at once (a replica and a restart, each on its engine's own
/// thread) would otherwise both pass the check against the same room, and
/// populating both would wake the kernel's OOM killer.
class arena_admission {
public:
  struct verdict {
    bool admitted = false;
    std::optional<std::size_t> available; ///< what `available` read
    std::size_t unpopulated = 0;          ///< of other arenas, then
  };
  /// Admits an arena of `bytes` when they fit in `available()` less the
  /// unpopulated bytes of the arenas admitted before (or when `available`
  /// reads nothing), and counts them as unpopulated. One check at a time.
  verdict admit(std::size_t bytes, std::optional<std::size_t> (*available)());
  /// `bytes` of an admitted arena are populated now (or will never be).
  void populated(std::size_t bytes) noexcept;
  [[nodiscard]] std::size_t unpopulated() const noexcept {
    return unpopulated_.load();
  }

private:
  std::mutex check_;
  std::atomic<std::size_t> unpopulated_{0};
};

} // namespace kvfleet::engine::detail
