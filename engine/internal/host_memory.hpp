#pragma once
/// How much host memory a process can still populate: the parsers behind
/// host_memory_available() (engine/memory_backend.hpp), separate so tests
/// can feed them text.

#include <cstddef>
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

} // namespace kvfleet::engine::detail
