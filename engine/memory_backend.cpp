#include "engine/memory_backend.hpp"

#include "engine/checksum.hpp"
#include "engine/internal/host_memory.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <system_error>

namespace kvfleet::engine {

namespace detail {
namespace {

std::string_view trim(std::string_view s) {
  const auto first = s.find_first_not_of(" \t\n");
  if (first == std::string_view::npos)
    return {};
  const auto last = s.find_last_not_of(" \t\n");
  return s.substr(first, last - first + 1);
}

std::optional<std::size_t> whole_number(std::string_view s) {
  std::size_t v = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc{} || ptr != s.data() + s.size())
    return std::nullopt;
  return v;
}

/// The line of `text` that starts at `at` (without its '\n'); moves `at`
/// past it.
std::string_view next_line(std::string_view text, std::size_t& at) {
  auto end = text.find('\n', at);
  if (end == std::string_view::npos)
    end = text.size();
  const std::string_view line = text.substr(at, end - at);
  at = end + 1;
  return line;
}

/// The rest of the first line of `text` that starts with `key`.
std::optional<std::string_view> line_after(std::string_view text,
                                           std::string_view key) {
  for (std::size_t at = 0; at < text.size();)
    if (const std::string_view line = next_line(text, at);
        line.starts_with(key))
      return line.substr(key.size());
  return std::nullopt;
}

/// The file's text, or nullopt when it cannot be read (a file of /proc or
/// /sys is small; at most 64 KiB is read).
std::optional<std::string> small_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return std::nullopt;
  std::string text(std::size_t{64} << 10, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  if (in.bad())
    return std::nullopt;
  text.resize(static_cast<std::size_t>(in.gcount()));
  return text;
}

} // namespace

std::optional<std::size_t> meminfo_available(std::string_view meminfo) {
  const auto value = line_after(meminfo, "MemAvailable:");
  if (!value)
    return std::nullopt;
  const std::string_view rest = trim(*value);
  if (!rest.ends_with("kB"))
    return std::nullopt;
  const auto kib = whole_number(trim(rest.substr(0, rest.size() - 2)));
  if (!kib || *kib > std::numeric_limits<std::size_t>::max() / 1024)
    return std::nullopt;
  return *kib * 1024;
}

std::optional<std::string> cgroup_path(std::string_view text, bool v1) {
  for (std::size_t at = 0; at < text.size();) {
    const std::string_view line = next_line(text, at);
    // "hierarchy-id:controller,controller:path"
    const auto c1 = line.find(':');
    const auto c2 = c1 == std::string_view::npos ? c1 : line.find(':', c1 + 1);
    if (c2 == std::string_view::npos || c2 + 1 >= line.size())
      continue;
    const std::string_view id = line.substr(0, c1);
    const std::string_view controllers = line.substr(c1 + 1, c2 - c1 - 1);
    bool match = !v1 && id == "0" && controllers.empty();
    for (std::size_t from = 0; v1 && !match && from <= controllers.size();) {
      auto comma = controllers.find(',', from);
      if (comma == std::string_view::npos)
        comma = controllers.size();
      match = controllers.substr(from, comma - from) == "memory";
      from = comma + 1;
    }
    if (match)
      return std::string(line.substr(c2 + 1));
  }
  return std::nullopt;
}

std::optional<std::size_t> stat_value(std::string_view text,
                                      std::string_view key) {
  const auto value = line_after(text, std::string(key) + ' ');
  return value ? whole_number(trim(*value)) : std::nullopt;
}

std::optional<std::size_t> cgroup_room(std::string_view max,
                                       std::string_view current,
                                       std::size_t file_pages) {
  const auto limit = whole_number(trim(max));
  const auto used = whole_number(trim(current));
  if (!limit || !used)
    return std::nullopt;
  const std::size_t held = *used - std::min(file_pages, *used);
  return *limit > held ? *limit - held : 0;
}

} // namespace detail

namespace {

/// Where a cgroup version keeps a memory limit, the usage it applies to and
/// the file cache inside that usage.
struct cgroup_files {
  const char* mount;
  const char* limit;
  const char* usage;
  const char* stat_active_file;
  const char* stat_inactive_file;
};

constexpr cgroup_files cgroup_v2{"/sys/fs/cgroup", "memory.max",
                                 "memory.current", "active_file",
                                 "inactive_file"};
constexpr cgroup_files cgroup_v1{
    "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
    "total_active_file", "total_inactive_file"};

/// The smaller of `room` and what the limits of the cgroup at `path` and of
/// every cgroup above it leave (a limit anywhere up the hierarchy binds).
/// File cache counts as room: the kernel drops it before it kills.
std::optional<std::size_t> cgroup_limited(std::optional<std::size_t> room,
                                          const cgroup_files& files,
                                          std::string path) {
  for (;;) {
    const std::string dir = files.mount + (path == "/" ? "" : path);
    const auto limit = detail::small_file(dir + "/" + files.limit);
    const auto usage = detail::small_file(dir + "/" + files.usage);
    if (limit && usage) {
      std::size_t file_pages = 0;
      if (const auto stat = detail::small_file(dir + "/memory.stat"))
        file_pages =
            detail::stat_value(*stat, files.stat_active_file).value_or(0) +
            detail::stat_value(*stat, files.stat_inactive_file).value_or(0);
      if (const auto left = detail::cgroup_room(*limit, *usage, file_pages))
        room = room ? std::min(*room, *left) : *left;
    }
    if (path.empty() || path == "/")
      return room;
    path = path.substr(0, std::max<std::size_t>(path.rfind('/'), 1));
  }
}

} // namespace

std::optional<std::size_t> host_memory_available() {
  std::optional<std::size_t> room;
  if (const auto meminfo = detail::small_file("/proc/meminfo"))
    room = detail::meminfo_available(*meminfo);
  if (const auto cgroup = detail::small_file("/proc/self/cgroup")) {
    if (auto v2 = detail::cgroup_path(*cgroup, false))
      room = cgroup_limited(room, cgroup_v2, std::move(*v2));
    if (auto v1 = detail::cgroup_path(*cgroup, true))
      room = cgroup_limited(room, cgroup_v1, std::move(*v1));
  }
  return room;
}

result<void> memory_backend::copy_within(std::size_t, std::size_t,
                                         std::size_t) {
  return make_error(errc::unavailable,
                    "the " + std::string(name()) +
                        " arena cannot copy bytes within itself");
}

namespace detail {

arena_admission::verdict
arena_admission::admit(std::size_t bytes,
                       std::optional<std::size_t> (*available)()) {
  const std::lock_guard lock(check_);
  verdict v;
  // Read before the room: bytes populated in between count twice (the
  // safe side), never not at all.
  v.unpopulated = unpopulated_.load();
  v.available = available();
  v.admitted = !v.available || (v.unpopulated <= *v.available &&
                                bytes <= *v.available - v.unpopulated);
  if (v.admitted)
    unpopulated_ += bytes;
  return v;
}

void arena_admission::populated(std::size_t bytes) noexcept {
  unpopulated_ -= bytes;
}

} // namespace detail

namespace {

detail::arena_admission& host_arenas() {
  static detail::arena_admission admission;
  return admission;
}

} // namespace

result<std::unique_ptr<host_memory_backend>>
host_memory_backend::create(std::size_t bytes) {
  if (bytes == 0)
    return make_error(errc::zero_capacity, "host arena of zero bytes");
  const auto v = host_arenas().admit(bytes, &host_memory_available);
  if (!v.admitted)
    return make_error(
        errc::out_of_memory,
        "host arena of " + std::to_string(bytes) +
            " bytes is more than the memory available to this process (" +
            std::to_string(*v.available) +
            " bytes: MemAvailable, or the room its memory cgroup leaves" +
            (v.unpopulated > 0 ? ", less " + std::to_string(v.unpopulated) +
                                     " bytes of other host arenas still "
                                     "being populated"
                               : std::string{}) +
            ")");
  // The bytes not populated yet stay counted until they are (or the map
  // fails).
  struct populating {
    std::size_t left;
    ~populating() { host_arenas().populated(left); }
    void done(std::size_t n) noexcept {
      host_arenas().populated(n);
      left -= n;
    }
  } pending{bytes};
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    return make_error(
        errc::out_of_memory,
        "cannot map " + std::to_string(bytes) +
            " bytes of host memory: " + std::generic_category().message(errno));
  // Huge pages cut TLB misses (failure is harmless); then fault the whole
  // arena in up front so no put pays for a page fault.
  (void)::madvise(p, bytes, MADV_HUGEPAGE);
  auto* bytes_p = static_cast<volatile unsigned char*>(p);
  const long page = ::sysconf(_SC_PAGESIZE);
  const auto step = static_cast<std::size_t>(page > 0 ? page : 4096);
  constexpr std::size_t report_every = std::size_t{64} << 20;
  std::size_t since_report = 0;
  for (std::size_t off = 0; off < bytes; off += step) {
    bytes_p[off] = 0;
    since_report += step;
    if (since_report >= report_every) {
      pending.done(std::min(since_report, pending.left));
      since_report = 0;
    }
  }
  return std::unique_ptr<host_memory_backend>(
      new host_memory_backend(static_cast<std::byte*>(p), bytes));
}

host_memory_backend::~host_memory_backend() {
  ::munmap(data_, size_);
}

result<void> host_memory_backend::write(std::size_t offset,
                                        std::span<const std::byte> src) {
  if (offset > size_ || src.size() > size_ - offset)
    return make_error(errc::invalid_argument, "host arena write out of bounds");
  std::memcpy(data_ + offset, src.data(), src.size());
  return {};
}

result<void> host_memory_backend::read(std::size_t offset,
                                       std::span<std::byte> dst) const {
  if (offset > size_ || dst.size() > size_ - offset)
    return make_error(errc::invalid_argument, "host arena read out of bounds");
  std::memcpy(dst.data(), data_ + offset, dst.size());
  return {};
}

result<void> host_memory_backend::copy_within(std::size_t dst, std::size_t src,
                                              std::size_t len) {
  if (src > size_ || len > size_ - src || dst > size_ || len > size_ - dst)
    return make_error(errc::invalid_argument, "host arena copy out of bounds");
  std::memmove(data_ + dst, data_ + src, len);
  return {};
}

result<std::uint64_t> host_memory_backend::checksum(std::size_t offset,
                                                    std::size_t len) const {
  if (offset > size_ || len > size_ - offset)
    return make_error(errc::invalid_argument,
                      "host arena checksum out of bounds");
  return block_checksum({data_ + offset, len});
}

} // namespace kvfleet::engine
