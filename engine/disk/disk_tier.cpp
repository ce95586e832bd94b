#include "engine/disk/disk_tier.hpp"

#include "engine/checksum.hpp"
#include "engine/internal/check.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <filesystem>
#include <new>
#include <optional>
#include <set>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <system_error>
#include <unistd.h>

namespace kvfleet::engine {

namespace {

constexpr std::uint64_t header_bytes = segment_header_bytes;
constexpr std::uint64_t rec_header = record_header_bytes;

std::string errno_text(int e) {
  return std::strerror(e);
}

bool is_full_errno(int e) noexcept {
  return e == ENOSPC || e == EDQUOT;
}

/// What statvfs says of the file system holding `dir`, in bytes.
struct file_system_space {
  std::uint64_t total = 0; ///< f_blocks
  std::uint64_t avail = 0; ///< f_bavail: free to unprivileged writers
  /// At least one inode free (or the file system counts none, f_files 0:
  /// it makes them as needed).
  bool inode = true;
};

/// nullopt when statvfs fails.
std::optional<file_system_space> space_of(const std::string& dir) {
  struct statvfs vfs {};
  if (::statvfs(dir.c_str(), &vfs) != 0)
    return std::nullopt;
  const auto frsize = static_cast<std::uint64_t>(vfs.f_frsize);
  return file_system_space{static_cast<std::uint64_t>(vfs.f_blocks) * frsize,
                           static_cast<std::uint64_t>(vfs.f_bavail) * frsize,
                           vfs.f_files == 0 || vfs.f_favail > 0};
}

/// What to do when the data directory's path cannot be looked up.
std::string access_remedy(int e) {
  switch (e) {
  case EACCES:
  case EPERM:
    return "give the user running kvfleet search (x) permission on every "
           "directory above it, or choose another directory";
  case ENOTDIR:
    return "a component of the path is not a directory: fix the path or "
           "choose another directory";
  case ELOOP:
    return "the path has a loop of symbolic links: fix them or choose "
           "another directory";
  case ENAMETOOLONG:
    return "the path is too long: choose a shorter one";
  default:
    return "fix the cause or choose another directory";
  }
}

/// What to do when a file the tier keeps in its directory (`what`: the
/// LOCK file, the directory itself for a listing) cannot be opened.
std::string file_remedy(int e, const std::string& what) {
  switch (e) {
  case EACCES:
  case EPERM:
    return "give the user running kvfleet read and write permission on " +
           what +
           " (every file of the directory must be that user's to "
           "write), or choose another directory";
  case EROFS:
    return "the file system is mounted read-only: remount it read-write or "
           "choose another directory";
  case EISDIR:
    return what + " is not a file: move it aside or choose another "
                  "directory";
  case EMFILE:
  case ENFILE:
    return "no file descriptor is left: raise the open-file limit (ulimit "
           "-n)";
  default:
    return "fix the cause or choose another directory";
  }
}

/// Whether the bytes of `f` from `from` to its end hold anything but whole,
/// well-formed records: a write that was cut off. Whole records past the
/// last catalogued one are merely unacknowledged (or erased) and not torn.
bool tail_is_torn(const segment_file& f, std::uint64_t from) {
  std::uint64_t at = from;
  while (at < f.size()) {
    if (f.size() - at < rec_header)
      return true;
    auto h = f.read_header(at);
    // Compared without adding the header's bytes: a size near 2^64 wrapped
    // record_bytes() to 0 and this loop never ended.
    if (!h || h->size > f.size() - at - rec_header)
      return true;
    at += h->record_bytes();
  }
  return false;
}

/// Adds the accessed_at update `t` of block `k` to `into`: the latest time
/// wins and the reads add up, so that no read is lost or counted twice.
template <class Touches, class Touch>
void merge_touch(Touches& into, const block_key& k, const Touch& t) {
  auto& m = into[k];
  m.at = std::max(m.at, t.at);
  m.count += t.count;
}

} // namespace

struct disk_tier::request {
  enum class kind : std::uint8_t {
    spill,
    fetch,
    expire,
    compact,
    flush,
    report,
    erase,
    set_pins,
    touch
  };
  kind k = kind::flush;
  disk_request_id id{};
  block_key key{};
  std::uint64_t gen = 0;
  ns_fingerprint ns{};
  codec c = codec::none;
  std::vector<std::byte> bytes;
  std::uint64_t checksum = 0;
  std::int64_t created_at = 0;
  std::int64_t expires_at = 0;
  std::optional<size_partition> part; ///< spill
  std::optional<priority> prio;       ///< spill
  std::uint64_t access_count = 0;     ///< spill; touch: reads to add
  std::uint32_t pins = 0;
  std::int64_t now = 0;
  std::size_t top_n = 0;
  std::span<std::byte> dst; ///< fetch_into
  bool into = false;
  bool verify = true; ///< fetch: check the payload checksum
};

disk_tier::disk_tier(disk_tier_config config)
    : config_(std::move(config)),
      clock_(config_.clock != nullptr ? config_.clock
                                      : &wall_clock_source::instance()),
      retry_delay_(config_.retry_interval) {}

disk_tier::~disk_tier() {
  if (io_thread_.joinable()) {
    {
      std::lock_guard lk(mu_);
      stopping_ = true;
    }
    work_cv_.notify_all();
    io_thread_.join();
  }
  catalog_.reset();
  segments_.clear();
  if (lock_fd_ >= 0)
    ::close(lock_fd_);
}

// ---------------------------------------------------------------- opening

result<std::unique_ptr<disk_tier>> disk_tier::open(disk_tier_config config) {
  const std::string dir = config.directory;
  if (dir.empty())
    return make_error(errc::invalid_argument,
                      "disk tier: no data directory configured "
                      "(disk_tier_config::directory)");
  if (config.capacity_bytes == 0)
    return make_error(errc::zero_capacity,
                      "disk tier " + dir + ": capacity_bytes is 0");
  // A segment too small for a record holds one: a file (and a descriptor
  // while it is read) per block. Before, 0 was taken and did that.
  if (config.segment_bytes < min_segment_bytes)
    return make_error(errc::invalid_argument,
                      "disk tier " + dir + ": segment_bytes is " +
                          std::to_string(config.segment_bytes) +
                          "; it must be at least " +
                          std::to_string(min_segment_bytes) +
                          " (default 64 MiB: a segment file holds many "
                          "records)");
  if (!(config.compaction_threshold >= 0.0 &&
        config.compaction_threshold <= 1.0) ||
      !(config.low_watermark > 0.0 && config.low_watermark <= 1.0))
    return make_error(errc::invalid_argument,
                      "disk tier " + dir +
                          ": compaction_threshold must be in [0, 1] and "
                          "low_watermark in (0, 1]");
  // A zero interval would spin the I/O thread on a failure that persists;
  // the upper bound keeps the deadline arithmetic far from overflow.
  if (!(config.retry_interval > nanos{0} &&
        config.max_retry_interval >= config.retry_interval &&
        config.max_retry_interval <= std::chrono::hours(24)))
    return make_error(errc::invalid_argument,
                      "disk tier " + dir +
                          ": retry_interval must be positive and "
                          "max_retry_interval between retry_interval and "
                          "24 hours");
  // Added to the steady clock's now: nanos::max() overflowed it (a past
  // deadline: a touch flush at every pass).
  if (!(config.touch_flush_interval >= nanos{0} &&
        config.touch_flush_interval <= std::chrono::hours(24)))
    return make_error(errc::invalid_argument,
                      "disk tier " + dir +
                          ": touch_flush_interval must be between 0 and 24 "
                          "hours");
  if (config.max_batch == 0)
    config.max_batch = 1;
  if (config.touch_batch == 0)
    config.touch_batch = 1;
  // One descriptor per segment: a tier filled to its capacity needs
  // capacity / segment_bytes of them, besides those the process holds now
  // (other engines' tiers among them; their growth is theirs to say). Said
  // once here, before spills start failing with "Too many open files" once
  // the tier has grown.
  if (rlimit lim{};
      ::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY) {
    std::error_code ec;
    std::uint64_t in_use = 0;
    for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec);
         !ec && it != std::filesystem::directory_iterator(); it.increment(ec))
      ++in_use;
    const std::uint64_t segments =
        config.capacity_bytes / config.segment_bytes + 2;
    if (segments + in_use > static_cast<std::uint64_t>(lim.rlim_cur))
      std::fprintf(stderr,
                   "kvfleet: disk tier %s: filled to capacity_bytes (%llu) "
                   "it needs about %llu segment files open at once, besides "
                   "the %llu descriptors the process holds now: above the "
                   "open-file limit (%llu, ulimit -n): raise the limit or use "
                   "larger segments (segment_bytes, now %llu), or spills fail "
                   "once it grows that far\n",
                   dir.c_str(),
                   static_cast<unsigned long long>(config.capacity_bytes),
                   static_cast<unsigned long long>(segments),
                   static_cast<unsigned long long>(in_use),
                   static_cast<unsigned long long>(lim.rlim_cur),
                   static_cast<unsigned long long>(config.segment_bytes));
  }

  std::string open_full; ///< why the file system counts as full, if it does
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    const int e = errno;
    if (e == ENOENT)
      return make_error(
          errc::io_error,
          "disk tier directory " + dir +
              " does not exist: create it (mkdir -p " + dir +
              ") or point the disk tier at an existing directory");
    return make_error(errc::io_error,
                      "disk tier directory " + dir + " cannot be accessed (" +
                          errno_text(e) + "): " + access_remedy(e));
  }
  if (!S_ISDIR(st.st_mode))
    return make_error(errc::io_error, "disk tier directory " + dir +
                                          " is not a directory: point the "
                                          "disk tier at a directory");
  {
    const std::string probe = dir + "/.kvfleet-write-probe";
    const int fault =
        config.probe_fault_for_testing ? config.probe_fault_for_testing() : 0;
    const int fd = fault != 0
                       ? -1
                       : ::open(probe.c_str(),
                                O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    const int create_errno = fault != 0 ? fault : errno;
    if (fd < 0 && !is_full_errno(create_errno))
      return make_error(errc::io_error,
                        "disk tier directory " + dir + " is not writable (" +
                            errno_text(create_errno) +
                            "): give this process write permission or "
                            "choose another directory");
    // No block or inode left for the probe file itself is a full file
    // system, as a failed write of it is: the tier opens full. Before,
    // the open failed and told the operator to grant write permission.
    if (fd < 0) {
      open_full =
          "no space left to create a file (" + errno_text(create_errno) + ")";
    } else {
      const std::byte one{1};
      const ssize_t w = ::write(fd, &one, 1);
      const int e = errno;
      ::close(fd);
      ::unlink(probe.c_str());
      if (w != 1 && !is_full_errno(e))
        return make_error(errc::io_error,
                          "disk tier directory " + dir +
                              " cannot be written (" + errno_text(e) +
                              "): fix the cause or choose another directory");
      if (w != 1)
        open_full = "no space left for a 1-byte file";
    }
  }
  // A file system with less than min_free_bytes free opens in the full
  // state (spills refused, reads served, spills accepted again once
  // min_free_bytes are free), as the tier would be had it stayed up. The
  // write path fills the file system until ENOSPC, so refusing to open
  // here kept a node whose disk filled from starting again at all.
  const auto space = space_of(dir);
  // More than the whole file system is never free: such a tier would open
  // full and stay full for good, refusing every spill.
  if (space) {
    const std::uint64_t total = space->total;
    if (config.min_free_bytes > total)
      return make_error(
          errc::invalid_argument,
          "disk tier " + dir + ": min_free_bytes (" +
              std::to_string(config.min_free_bytes) +
              ") is more than its whole file system holds (" +
              std::to_string(total) +
              " bytes), so it is never free and the tier would refuse "
              "spills for good: lower min_free_bytes");
  }
  if (open_full.empty() && space && space->avail < config.min_free_bytes)
    open_full = std::to_string(space->avail) + " bytes free";
  const std::string lock_path = dir + "/LOCK";
  const int lock_fd =
      ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lock_fd < 0) {
    const int e = errno;
    return make_error(errc::io_error, "disk tier: cannot create " + lock_path +
                                          " (" + errno_text(e) +
                                          "): " + file_remedy(e, "it"));
  }
  if (::flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(lock_fd);
    return make_error(
        errc::busy,
        "disk tier directory " + dir +
            " is in use by another disk tier, in another process or in this "
            "one (it holds " +
            lock_path +
            "): close that tier, stop that process or choose another "
            "directory");
  }
  std::unique_ptr<disk_tier> tier(new disk_tier(std::move(config)));
  tier->lock_fd_ = lock_fd;
  const std::uint64_t min_free = tier->config_.min_free_bytes;
  // Opening a full tier still needs the catalog opened and recovered: if
  // that fails for lack of space, the error says the file system is full.
  const auto full_error = [&](const error& e) {
    if (open_full.empty())
      return e;
    return error{e.code, e.message + " (the file system of " + dir +
                             " is full: " + open_full + ", min_free_bytes is " +
                             std::to_string(min_free) +
                             "; free space or choose another directory)"};
  };
  if (!open_full.empty()) {
    // Set before recover(), which schedules the retry passes that look at
    // the free space again.
    std::lock_guard lk(tier->mu_);
    tier->full_ = true;
    tier->logged_full_ = true;
  }
  auto cat = catalog::open(dir + "/catalog.sqlite", tier->config_.full_sync,
                           tier->config_.catalog_fault_for_testing);
  if (!cat)
    return unexpected<error>(full_error(cat.error()));
  tier->catalog_ = std::move(*cat);
  if (auto r = tier->recover(); !r)
    return unexpected<error>(full_error(r.error()));
  if (!open_full.empty())
    std::fprintf(stderr,
                 "kvfleet: disk tier %s: the file system is full at open "
                 "(%s, min_free_bytes is %llu); refusing spills, serving "
                 "reads of the %zu blocks stored. Free space in the "
                 "directory: spills are accepted again once %llu bytes are "
                 "free (looked at again on the retry schedule), or lower "
                 "disk capacity_bytes (the tier then evicts and compacts "
                 "down to it, which frees space).\n",
                 dir.c_str(), open_full.c_str(),
                 static_cast<unsigned long long>(min_free), tier->index_.size(),
                 static_cast<unsigned long long>(min_free));
  {
    std::lock_guard lk(tier->mu_);
    tier->publish_locked();
  }
  try {
    tier->io_thread_ = std::thread([t = tier.get()] { t->run(); });
  } catch (const std::system_error& e) {
    return make_error(errc::unavailable,
                      "disk tier " + dir +
                          ": cannot start its I/O thread: " + e.what());
  }
  return tier;
}

void disk_tier::clear_loaded_state() {
  index_.clear();
  segments_.clear();
  touches_.clear();
  touch_failed_ = false;
  shrunk_segments_.clear();
  written_segments_.clear();
  created_segment_ = false;
  active_ = 0;
  file_bytes_ = 0;
  live_bytes_ = 0;
  payload_bytes_ = 0;
}

result<void> disk_tier::load(std::vector<catalog_row>& rows) {
  // A load that stops half way would leave indexed blocks whose segment is
  // not open (a fetch of one would end the process): all or nothing.
  auto r = load_files_and_rows(rows);
  if (!r) {
    clear_loaded_state();
    rows.clear();
  }
  return r;
}

result<void> disk_tier::load_files_and_rows(std::vector<catalog_row>& rows) {
  const std::string& dir = config_.directory;
  clear_loaded_state();

  // Segment files present.
  std::map<std::uint64_t, segment_state> found;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    const int e = errno;
    return make_error(
        errc::io_error,
        "disk tier: cannot list " + dir + " (" + errno_text(e) + "): " +
            (e == EACCES || e == EPERM ? "give the user running kvfleet read "
                                         "permission on it, or choose another "
                                         "directory"
                                       : file_remedy(e, "the directory")));
  }
  std::uint64_t max_id = 0;
  // Segments whose file header is short or damaged. One the catalog names
  // nowhere is a file whose header never made it (a crash while creating
  // it): it holds no acknowledged record and is dropped below. One the
  // catalog names had its header damaged later (it is written before any
  // record): its records are read by their own checked headers. (Before,
  // every such file was deleted before the catalog was read, and every
  // block in it, pinned ones too, dropped as missing.)
  std::set<std::uint64_t> damaged;
  while (const dirent* ent = ::readdir(d)) {
    const std::int64_t id = parse_segment_file_name(ent->d_name);
    if (id <= 0)
      continue;
    const auto uid = static_cast<std::uint64_t>(id);
    max_id = std::max(max_id, uid);
    auto f = segment_file::open(dir, uid);
    if (!f && f.error().code == errc::checksum_mismatch) {
      damaged.insert(uid);
      f = segment_file::open(dir, uid, /*check_header=*/false);
    }
    if (!f) {
      // Any other failure (no file descriptor left, permissions, an I/O
      // error, another format) may hide committed blocks: stop, deleting
      // nothing.
      ::closedir(d);
      return make_error(f.error().code, "disk tier: " + f.error().message +
                                            "; nothing was deleted");
    }
    segment_state s;
    s.file = std::move(*f);
    found.emplace(uid, std::move(s));
  }
  ::closedir(d);
  next_segment_ = std::max(next_segment_, max_id + 1);

  // Catalog rows.
  std::vector<block_key> drop;
  std::map<std::uint64_t, std::uint64_t> ends;
  // Rows whose key or namespace is not a 16-byte blob (damaged) are
  // skipped and deleted with the other dropped rows. (Before, they all
  // named the null key, each row's bytes counted under it, and came back
  // at every open, since erase() of the null key matches none of them.)
  std::uint64_t malformed = 0;
  auto scanned = catalog_->for_each([&](const catalog_entry& e) {
    if (e.malformed) {
      ++malformed;
      return;
    }
    auto s = found.find(e.segment);
    const std::uint64_t file_size =
        s == found.end() ? 0 : s->second.file.size();
    // Compared without adding the row's own numbers, which a damaged row
    // may set near 2^64 so that a sum wraps into range.
    const bool in_file = e.offset >= header_bytes && e.offset <= file_size &&
                         e.size != 0 && e.size <= file_size &&
                         rec_header + e.size <= file_size - e.offset;
    const std::uint64_t rec = rec_header + e.size;
    if (s == found.end() || e.tier != storage_tier::disk || !is_valid(e.c) ||
        !in_file) {
      drop.push_back(e.key);
      ++io_stats_.missing_dropped;
      return;
    }
    index_[e.key] = location{e.segment, e.offset, e.size, 0};
    s->second.live += rec;
    s->second.keys.insert(e.key);
    live_bytes_ += rec;
    payload_bytes_ += e.size;
    auto& end = ends[e.segment];
    end = std::max(end, e.offset + rec);
    rows.emplace_back(
        e.key, disk_block_info{e.ns, e.c, e.size, e.checksum,
                               nanos{e.created_at}, nanos{e.expires_at},
                               e.pinned, true, e.part, e.prio, e.access_count});
  });
  if (!scanned)
    return unexpected<error>(scanned.error());
  if (config_.load_fault_for_testing) {
    if (const int e = config_.load_fault_for_testing(); e != 0)
      return make_error(errc::io_error,
                        "disk tier: cannot load " + dir + ": " + errno_text(e));
  }
  if (!drop.empty() || malformed > 0) {
    if (auto r = catalog_->begin(); !r)
      return r;
    for (const auto& k : drop) {
      if (auto r = catalog_->erase(k); !r) {
        catalog_->rollback();
        return r;
      }
    }
    if (malformed > 0) {
      auto gone = catalog_->drop_malformed();
      if (!gone) {
        catalog_->rollback();
        return unexpected<error>(gone.error());
      }
      io_stats_.missing_dropped += *gone;
    }
    if (auto r = catalog_->commit(); !r) {
      catalog_->rollback();
      return r;
    }
  }

  // Cut every segment back to its last catalogued record: what follows was
  // never acknowledged (a torn or unfinished write).
  for (auto it = found.begin(); it != found.end();) {
    auto& s = it->second;
    const auto e = ends.find(it->first);
    const std::uint64_t end = e == ends.end() ? header_bytes : e->second;
    const bool bad_header = damaged.count(it->first) != 0;
    if (bad_header && s.keys.empty()) {
      ++io_stats_.torn_tails_dropped; // torn while it was created
      io_stats_.torn_bytes_dropped += s.file.size();
    } else if (tail_is_torn(s.file, end)) {
      ++io_stats_.torn_tails_dropped;
      io_stats_.torn_bytes_dropped += s.file.size() - end;
    }
    if (bad_header && !s.keys.empty())
      std::fprintf(stderr,
                   "kvfleet: disk tier: segment %s has a damaged header; its "
                   "%zu catalogued blocks are read by their own record "
                   "checksums\n",
                   s.file.path().c_str(), s.keys.size());
    if (s.keys.empty()) {
      const std::string path = s.file.path();
      it = found.erase(it);
      ::unlink(path.c_str());
      continue;
    }
    if (s.file.size() > end) {
      if (auto r = s.file.truncate(end); !r)
        return r;
    }
    file_bytes_ += s.file.size();
    ++it;
  }
  segments_ = std::move(found);
  return {};
}

result<void> disk_tier::recover() {
  std::vector<catalog_row> rows;
  if (auto r = load(rows); !r)
    return r;
  std::lock_guard lk(mu_);
  for (auto& [key, info] : rows) {
    const std::uint64_t gen = next_gen_++;
    index_[key].gen = gen;
    auto& d = dir_[key];
    pinned_in_dir_ -= d.info.pins > 0 ? 1 : 0;
    pinned_in_dir_ += info.pins > 0 ? 1 : 0;
    d = dir_entry{info, gen};
  }
  io_stats_.recovered_blocks = index_.size();
  // Every loaded segment is sealed: new writes go to a new one. A previous
  // run may have left some below the threshold (a compaction still failing
  // when it stopped, a process that died with a retry pending, a segment
  // that lost blocks while active, a threshold raised since), and nothing
  // would check them until a block left them. Marked, they are compacted
  // by the first batch, or by a retry pass retry_interval after open.
  for (const auto& [id, s] : segments_)
    if (below_threshold(s))
      shrunk_segments_.insert(id);
  schedule_retry(false);
  return {};
}

void disk_tier::reload() {
  // The catalog lost the failed batch, but the directory already shows what
  // the owner did: erase, pin and unpin change it at once, and their
  // requests were in the failed batch (lost) or are still queued. Reloading
  // the directory from the catalog would bring an erased block back or
  // undo a pin. So the directory wins for what the owner did, the index
  // follows it, and the catalog is repaired at the start of the next batch
  // (repairs_; a failure there is retried, as a failed batch reloads
  // again). Spills of the failed batch failed, so their keys become absent,
  // older copy included, as for any failed spill.
  //
  // If the load fails, the index stays empty while the directory keeps
  // what the owner did. Requests are refused (refuse_batch) and every batch
  // (and retry pass, so an idle tier too) retries the reload, which then
  // reconciles the catalog with the directory as above. Forgetting the
  // directory instead would bring back blocks the owner erased, or drop every
  // catalogued block at the retry.
  //
  // accessed_at updates are kept the same way: those the failed batch
  // wrote were rolled back with it, and those not written yet would be
  // cleared by the load. Both are pending again afterwards, for the blocks
  // still indexed, and retried like a failed write (touch_failed_).
  // Dropped, the blocks read since the last commit would look as cold as
  // before their reads to capacity eviction, which would take exactly
  // those first, and the catalog would keep that order across restarts.
  // While the load fails they wait in uncommitted_touches_.
  repairs_.clear();
  for (const auto& [key, t] : touches_)
    merge_touch(uncommitted_touches_, key, t);
  touches_.clear();
  std::vector<catalog_row> rows;
  if (auto r = load(rows); !r) {
    // batch_spill_gens_ is kept for the reload that succeeds: it must
    // still drop the failed batch's spills (before, cleared here, the
    // directory kept a failed spill's copy over the older copy's row).
    if (reload_error_.empty())
      std::fprintf(stderr,
                   "kvfleet: disk tier %s: reload failed: %s; requests are "
                   "refused until a reload succeeds (retried with each "
                   "batch and in the background)\n",
                   config_.directory.c_str(), r.error().describe().c_str());
    reload_error_ = r.error().message;
    return;
  }
  if (!reload_error_.empty()) {
    reload_error_.clear();
    std::fprintf(stderr, "kvfleet: disk tier %s: reloaded, serving again\n",
                 config_.directory.c_str());
  }
  std::vector<block_key> orphans;
  {
    std::lock_guard lk(mu_);
    for (const auto& [key, row] : rows) {
      const auto d = dir_.find(key);
      if (d != dir_.end() && !d->second.info.stored) {
        if (failed_spill_keys_.count(key) != 0) {
          // The copy before a spill that failed with the batch, the key
          // spilled again since: absent, as after any failed spill (a read
          // queued between the two spills got this older copy). The queued
          // spill writes the key again.
          orphans.push_back(key);
          continue;
        }
        // Its spill is still queued: it replaces this copy, or drops it if
        // it fails. A fresh generation, so that no removal the I/O thread
        // decides on takes the pending entry.
        index_[key].gen = next_gen_++;
        continue;
      }
      if (d == dir_.end() || batch_spill_gens_.count(d->second.gen) != 0) {
        // Erased by the owner, or evicted, expired or found corrupt in the
        // failed batch (the owner saw it go), or the older copy of a spill
        // that failed with it.
        if (d != dir_.end())
          erase_dir_locked(d);
        orphans.push_back(key);
        continue;
      }
      index_[key].gen = d->second.gen;
      if (d->second.info.pins != row.pins)
        repairs_[key] = repair{false, 0, d->second.gen};
    }
    // Stored as far as the owner knows, but not in the catalog: a new key
    // spilled in the failed batch, or a row dropped because its bytes are
    // gone.
    for (auto it = dir_.begin(); it != dir_.end();) {
      const auto here = it++; // erasing `here` leaves `it` valid
      if (here->second.info.stored && index_.count(here->first) == 0)
        erase_dir_locked(here);
    }
  }
  for (const auto& key : orphans) {
    remove_block(key, removal::reconcile);
    repairs_[key] = repair{true, 0, 0};
  }
  batch_spill_gens_.clear();
  failed_spill_keys_.clear();
  for (const auto& [key, t] : uncommitted_touches_)
    if (index_.count(key) != 0)
      touches_.emplace(key, t);
  uncommitted_touches_.clear();
  touch_failed_ = !touches_.empty();
  // The load forgot which segments awaited a threshold compaction, and
  // the failed batch may have rolled one back: check them all.
  for (const auto& [id, seg] : segments_)
    shrunk_segments_.insert(id);
}

void disk_tier::refuse_batch(std::vector<request>& batch,
                             std::vector<disk_completion>& out) {
  ++io_stats_.io_errors;
  const error why{errc::io_error,
                  "disk tier " + config_.directory +
                      ": its state could not be reloaded after a failed "
                      "batch (" +
                      reload_error_ +
                      "); retried in the background and with the next "
                      "request"};
  for (auto& r : batch) {
    disk_completion c;
    c.id = r.id;
    c.key = r.key;
    c.status = unexpected<error>(why);
    switch (r.k) {
    case request::kind::spill: {
      c.op = disk_op::spill;
      ++io_stats_.spill_errors;
      // Failed: its key is absent, older copy included, also when the
      // owner spills it again before a reload works (before, that reload
      // kept the older copy, and a read queued between the two spills got
      // it).
      failed_spill_keys_.insert(r.key);
      std::lock_guard lk(mu_);
      const auto d = dir_.find(r.key);
      if (d != dir_.end() && d->second.gen == r.gen)
        erase_dir_locked(d);
      break;
    }
    case request::kind::fetch:
      c.op = disk_op::fetch;
      ++io_stats_.fetches;
      ++io_stats_.fetch_misses;
      break;
    case request::kind::expire:
      c.op = disk_op::expire;
      break;
    case request::kind::compact:
      c.op = disk_op::compact;
      break;
    case request::kind::flush:
      c.op = disk_op::flush;
      break;
    case request::kind::report:
      c.op = disk_op::report;
      break;
    case request::kind::erase:
    case request::kind::set_pins:
      // Already in the directory; the reload that succeeds reconciles the
      // catalog with it.
      continue;
    case request::kind::touch:
      // The directory has its count, but the catalog only learns it from
      // a touch: it waits with the touches the failed batch rolled back,
      // which the reload that succeeds writes again (reload()). Dropped,
      // the owner's use of the block while the tier could not reload was
      // lost from the catalog: after a restart the block ranked as cold as
      // before it, a first victim of capacity eviction.
      merge_touch(uncommitted_touches_, r.key, touch{now_ns(), r.access_count});
      continue;
    }
    out.push_back(std::move(c));
  }
}

void disk_tier::apply_repairs() {
  if (repairs_.empty())
    return;
  {
    // Pins are read now, not at the reload: the directory holds the
    // owner's latest count, and any set_pins still queued writes a count
    // the owner set before it, so the catalog ends at the directory's.
    std::lock_guard lk(mu_);
    for (auto it = repairs_.begin(); it != repairs_.end();) {
      if (it->second.erase) {
        ++it;
        continue;
      }
      const auto d = dir_.find(it->first);
      if (d == dir_.end() || d->second.gen != it->second.gen) {
        // Erased (its erase request removes the row) or replaced (the new
        // row carries the pins).
        it = repairs_.erase(it);
        continue;
      }
      it->second.pins = d->second.info.pins;
      ++it;
    }
  }
  for (auto it = repairs_.begin(); it != repairs_.end();) {
    const auto& [key, rep] = *it;
    const auto idx = index_.find(key);
    result<void> r;
    if (rep.erase) {
      // A spill of the key written since owns the row now.
      if (idx == index_.end())
        r = catalog_->erase(key);
    } else if (idx != index_.end() && idx->second.gen == rep.gen) {
      r = catalog_->set_pins(key, rep.pins);
    }
    if (!r) {
      ++io_stats_.io_errors;
      ++it;
      continue;
    }
    it = repairs_.erase(it);
  }
}

// -------------------------------------------------------------- owner side

namespace {

/// Whether request kind `k` changes what a read of its key finds.
template <class Kind> bool writes_key(Kind k) noexcept {
  return k == Kind::spill || k == Kind::erase;
}

} // namespace

disk_request_id disk_tier::enqueue(request&& r, disk_priority p) {
  // REQUIRES: mu_ held.
  r.id = disk_request_id{next_request_++};
  const disk_request_id id = r.id;
  if (r.k == request::kind::fetch) {
    // The key's latest spill is not written yet (queued or in the batch
    // in progress): this read runs after it, and must find its bytes even
    // if a spill or erase queued after the read supersedes it first.
    const auto d = dir_.find(r.key);
    if (d != dir_.end() && !d->second.info.stored)
      awaited_gens_.insert(d->second.gen);
  }
  if (p == disk_priority::demand) {
    // A read goes ahead of the background work, but never ahead of a
    // queued spill or erase of its own key: it must find what the owner
    // wrote before it asked. It then waits right behind the last of them.
    const auto w = queued_writes_.find(r.key);
    if (w == queued_writes_.end()) {
      demand_.push_back(std::move(r));
    } else {
      const auto last =
          std::find_if(queue_.rbegin(), queue_.rend(), [&](const request& q) {
            return writes_key(q.k) && q.key == r.key;
          });
      KVFLEET_CHECK(last != queue_.rend(),
                    "a write counted in queued_writes_ is queued");
      queue_.insert(last.base(), std::move(r)); // right behind it
    }
  } else {
    if (writes_key(r.k))
      ++queued_writes_[r.key];
    queue_.push_back(std::move(r));
  }
  work_cv_.notify_one();
  return id;
}

void disk_tier::take_batch(std::vector<request>& batch) {
  // REQUIRES: mu_ held.
  // Demand reads (a caller waits) make a batch of their own, so that their
  // answers are published without waiting for background writes (a batch
  // answers when it commits). A batch of them taken while background work
  // waited gives the next batch to the background, so spills advance by up
  // to max_batch every other batch however many reads come. A read waits
  // for the batch in progress, the demand batches ahead of it, and one
  // background batch at most before each of those and before its own.
  const bool demand = !demand_.empty() && (queue_.empty() || !background_turn_);
  auto& from = demand ? demand_ : queue_;
  const std::size_t n = std::min(from.size(), config_.max_batch);
  for (std::size_t i = 0; i < n; ++i) {
    request& r = from.front();
    if (!demand && writes_key(r.k)) {
      // Counted when it was queued (enqueue).
      const auto w = queued_writes_.find(r.key);
      if (w != queued_writes_.end() && --w->second == 0)
        queued_writes_.erase(w);
    }
    batch.push_back(std::move(r));
    from.pop_front();
  }
  background_turn_ = demand && !queue_.empty();
}

bool disk_tier::idle_locked() const noexcept {
  return queue_.empty() && demand_.empty() && !busy_;
}

result<disk_request_id>
disk_tier::spill(const block_key& key, const ns_fingerprint& ns, codec c,
                 std::span<const std::byte> bytes, std::uint64_t checksum,
                 nanos created_at, nanos expires_at, bool pinned,
                 std::optional<size_partition> part,
                 std::optional<priority> prio, std::uint64_t access_count) {
  if (!is_valid(c))
    return make_error(errc::unknown_codec, "disk tier: spill of block " +
                                               key.to_hex() +
                                               " with an unknown codec");
  if (key.is_null())
    return make_error(errc::invalid_argument,
                      "disk tier: spill of the null block key");
  if (bytes.empty() || bytes.size() > config_.max_block_bytes ||
      rec_header + bytes.size() + header_bytes > config_.capacity_bytes)
    return make_error(errc::value_too_large,
                      "disk tier: block " + key.to_hex() + " of " +
                          std::to_string(bytes.size()) +
                          " bytes is empty or larger than the tier accepts");
  request r;
  r.k = request::kind::spill;
  r.key = key;
  r.ns = ns;
  r.c = c;
  // The one allocation here sized by a block (up to max_block_bytes): a
  // failure refuses this spill, it does not throw into the owner's
  // eviction.
  try {
    r.bytes.assign(bytes.begin(), bytes.end());
  } catch (const std::bad_alloc&) {
    return make_error(errc::out_of_memory,
                      "disk tier: no memory to queue the " +
                          std::to_string(bytes.size()) + " bytes of block " +
                          key.to_hex());
  }
  r.checksum = checksum;
  r.created_at = created_at.count();
  r.expires_at = expires_at.count();
  r.part = part;
  r.prio = prio;
  r.access_count = access_count;
  std::lock_guard lk(mu_);
  if (full_) {
    ++refused_full_owner_;
    return make_error(errc::out_of_memory,
                      "disk tier " + config_.directory +
                          ": the file system is full, spills are refused");
  }
  if (!pinned && queued_spill_bytes_ > 0 &&
      bytes.size() >
          config_.max_queued_bytes -
              std::min(queued_spill_bytes_, config_.max_queued_bytes)) {
    ++refused_busy_owner_;
    return make_error(errc::busy,
                      "disk tier " + config_.directory + ": " +
                          std::to_string(queued_spill_bytes_) +
                          " bytes of spills are waiting for the disk "
                          "(max_queued_bytes " +
                          std::to_string(config_.max_queued_bytes) + ")");
  }
  queued_spill_bytes_ += bytes.size();
  auto [it, inserted] = dir_.try_emplace(key);
  const std::uint32_t old_pins = inserted ? 0 : it->second.info.pins;
  it->second.info = disk_block_info{ns,
                                    c,
                                    bytes.size(),
                                    checksum,
                                    created_at,
                                    expires_at,
                                    std::max(old_pins, pinned ? 1U : 0U),
                                    false,
                                    part,
                                    prio,
                                    access_count};
  if (old_pins == 0 && it->second.info.pins > 0)
    ++pinned_in_dir_;
  it->second.gen = next_gen_++;
  r.gen = it->second.gen;
  return enqueue(std::move(r));
}

disk_request_id disk_tier::fetch(const block_key& key, disk_priority p) {
  request r;
  r.k = request::kind::fetch;
  r.key = key;
  std::lock_guard lk(mu_);
  return enqueue(std::move(r), p);
}

disk_request_id disk_tier::fetch_into(const block_key& key,
                                      std::span<std::byte> dst, bool verify,
                                      disk_priority p) {
  request r;
  r.k = request::kind::fetch;
  r.key = key;
  r.dst = dst;
  r.into = true;
  r.verify = verify;
  std::lock_guard lk(mu_);
  return enqueue(std::move(r), p);
}

bool disk_tier::contains(const block_key& key) const {
  std::lock_guard lk(mu_);
  return dir_.count(key) != 0;
}

std::vector<block_key> disk_tier::keys() const {
  std::lock_guard lk(mu_);
  std::vector<block_key> out;
  out.reserve(dir_.size());
  for (const auto& [key, entry] : dir_)
    out.push_back(key);
  return out;
}

void disk_tier::record_removals(bool on) {
  std::lock_guard lk(mu_);
  record_removals_ = on;
  if (!on)
    removed_.clear();
}

std::size_t
disk_tier::drain_removed(const std::function<void(const block_key&)>& fn) {
  std::vector<block_key> got;
  {
    std::lock_guard lk(mu_);
    got.swap(removed_);
  }
  for (const auto& key : got)
    fn(key);
  return got.size();
}

void disk_tier::erase_dir_locked(
    std::unordered_map<block_key, dir_entry, block_key_hash>::iterator it) {
  if (record_removals_)
    removed_.push_back(it->first);
  if (it->second.info.pins > 0)
    --pinned_in_dir_;
  dir_.erase(it);
}

std::optional<disk_block_info> disk_tier::lookup(const block_key& key) const {
  std::lock_guard lk(mu_);
  const auto it = dir_.find(key);
  if (it == dir_.end())
    return std::nullopt;
  return it->second.info;
}

result<void> disk_tier::erase(const block_key& key) {
  std::lock_guard lk(mu_);
  const auto it = dir_.find(key);
  if (it == dir_.end())
    return make_error(errc::not_found,
                      "disk tier: block " + key.to_hex() + " is not on disk");
  erase_dir_locked(it);
  request r;
  r.k = request::kind::erase;
  r.key = key;
  (void)enqueue(std::move(r));
  return {};
}

result<void> disk_tier::pin(const block_key& key) {
  std::lock_guard lk(mu_);
  const auto it = dir_.find(key);
  if (it == dir_.end())
    return make_error(errc::not_found,
                      "disk tier: block " + key.to_hex() + " is not on disk");
  request r;
  r.k = request::kind::set_pins;
  r.key = key;
  r.pins = ++it->second.info.pins;
  if (r.pins == 1)
    ++pinned_in_dir_;
  (void)enqueue(std::move(r));
  return {};
}

bool disk_tier::mark_used(const block_key& key, std::uint64_t access_count) {
  std::lock_guard lk(mu_);
  const auto it = dir_.find(key);
  if (it == dir_.end())
    return false;
  auto& info = it->second.info;
  request r;
  r.k = request::kind::touch;
  r.key = key;
  r.access_count =
      access_count > info.access_count ? access_count - info.access_count : 0;
  info.access_count = std::max(info.access_count, access_count);
  (void)enqueue(std::move(r));
  return true;
}

result<void> disk_tier::unpin(const block_key& key) {
  std::lock_guard lk(mu_);
  const auto it = dir_.find(key);
  if (it == dir_.end())
    return make_error(errc::not_found,
                      "disk tier: block " + key.to_hex() + " is not on disk");
  if (it->second.info.pins == 0)
    return make_error(errc::invalid_argument,
                      "disk tier: block " + key.to_hex() + " is not pinned");
  request r;
  r.k = request::kind::set_pins;
  r.key = key;
  r.pins = --it->second.info.pins;
  if (r.pins == 0)
    --pinned_in_dir_;
  (void)enqueue(std::move(r));
  return {};
}

std::size_t disk_tier::pinned_blocks() const {
  std::lock_guard lk(mu_);
  return pinned_in_dir_;
}

disk_request_id disk_tier::expire(nanos now) {
  request r;
  r.k = request::kind::expire;
  r.now = now.count();
  std::lock_guard lk(mu_);
  return enqueue(std::move(r));
}

disk_request_id disk_tier::compact() {
  request r;
  r.k = request::kind::compact;
  std::lock_guard lk(mu_);
  return enqueue(std::move(r));
}

disk_request_id disk_tier::flush() {
  request r;
  r.k = request::kind::flush;
  std::lock_guard lk(mu_);
  return enqueue(std::move(r));
}

disk_request_id disk_tier::report(std::size_t top_n) {
  request r;
  r.k = request::kind::report;
  r.top_n = top_n;
  std::lock_guard lk(mu_);
  return enqueue(std::move(r));
}

std::size_t
disk_tier::drain_completions(const std::function<void(disk_completion&&)>& fn) {
  std::vector<disk_completion> got;
  {
    std::lock_guard lk(mu_);
    got.swap(done_);
  }
  for (auto& c : got)
    fn(std::move(c));
  return got.size();
}

bool disk_tier::wait_idle(nanos timeout) {
  std::unique_lock lk(mu_);
  return idle_cv_.wait_for(lk, timeout, [&] { return idle_locked(); });
}

std::size_t disk_tier::expedite(std::span<const disk_request_id> ids) {
  if (ids.empty())
    return 0;
  std::vector<std::uint64_t> want;
  want.reserve(ids.size());
  for (const disk_request_id& id : ids)
    want.push_back(id.value);
  std::sort(want.begin(), want.end());
  const auto wanted = [&](const request& r) {
    return r.k == request::kind::fetch &&
           std::binary_search(want.begin(), want.end(), r.id.value);
  };
  std::lock_guard lk(mu_);
  // A wanted read with no write of its key ahead becomes a demand read; one
  // with such a write goes right behind the last of them (after the reads
  // of its key placed there before it, in queue order), as enqueue() places
  // a demand read of that key (before, it stayed behind every background
  // request queued after that write). Linear in the queue: a plan first,
  // with every allocation, then only moves that cannot throw, so a
  // bad_alloc leaves the queue as it was.
  const std::size_t n = queue_.size();
  std::unordered_map<block_key, std::size_t, block_key_hash> last_write;
  for (const request& r : queue_)
    if (wanted(r) && queued_writes_.count(r.key) > 0)
      last_write.emplace(r.key, n); // n: none seen yet
  std::vector<std::size_t> to_demand;
  std::vector<std::pair<std::size_t, std::size_t>> behind; // write, read
  std::vector<bool> moved(n, false);
  for (std::size_t i = 0; i < n; ++i) {
    const request& r = queue_[i];
    if (writes_key(r.k)) {
      if (const auto w = last_write.find(r.key); w != last_write.end())
        w->second = i;
      continue;
    }
    if (!wanted(r))
      continue;
    moved[i] = true;
    const auto w = last_write.find(r.key);
    if (w == last_write.end() || w->second == n)
      to_demand.push_back(i);
    else
      behind.emplace_back(w->second, i);
  }
  if (to_demand.empty() && behind.empty())
    return 0;
  std::stable_sort(
      behind.begin(), behind.end(),
      [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<std::size_t> order;
  order.reserve(n - to_demand.size());
  std::size_t b = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (!moved[i])
      order.push_back(i);
    for (; b < behind.size() && behind[b].first == i; ++b)
      order.push_back(behind[b].second);
  }
  std::vector<request> all;
  all.reserve(n);
  const std::size_t base = demand_.size();
  try {
    for (std::size_t k = 0; k < to_demand.size(); ++k)
      demand_.emplace_back();
  } catch (...) {
    demand_.resize(base); // shrinking allocates nothing
    throw;
  }
  for (request& r : queue_)
    all.push_back(std::move(r)); // within the capacity reserved
  for (std::size_t k = 0; k < to_demand.size(); ++k)
    demand_[base + k] = std::move(all[to_demand[k]]);
  for (std::size_t j = 0; j < order.size(); ++j)
    queue_[j] = std::move(all[order[j]]);
  queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(order.size()),
               queue_.end());
  if (!to_demand.empty())
    work_cv_.notify_one();
  return to_demand.size();
}

bool disk_tier::wait_done(std::span<const disk_request_id> ids, nanos timeout) {
  std::vector<std::uint64_t> want;
  want.reserve(ids.size());
  for (const disk_request_id& id : ids)
    want.push_back(id.value);
  std::sort(want.begin(), want.end());
  want.erase(std::unique(want.begin(), want.end()), want.end());
  std::unique_lock lk(mu_);
  return idle_cv_.wait_for(lk, timeout, [&] {
    if (idle_locked())
      return true; // whatever of `ids` is not in done_ was drained before
    std::size_t found = 0;
    for (const disk_completion& c : done_)
      found += static_cast<std::size_t>(
          std::binary_search(want.begin(), want.end(), c.id.value));
    return found == want.size();
  });
}

disk_tier_stats disk_tier::stats() const {
  std::lock_guard lk(mu_);
  disk_tier_stats s = published_;
  s.spills_refused_full += refused_full_owner_;
  s.spills_refused_busy = refused_busy_owner_;
  s.full = full_;
  return s;
}

// --------------------------------------------------------------- I/O thread

void disk_tier::run() {
  std::vector<request> batch;
  std::vector<disk_completion> out;
  for (;;) {
    bool last = false;
    bool retry_pass = false;
    {
      std::unique_lock lk(mu_);
      while (queue_.empty() && demand_.empty() && !stopping_) {
        // Woken by a request or the destructor; otherwise at the deadline
        // of the batched accessed_at updates or of a retry, whichever
        // comes first, to run a pass without requests. Updates whose
        // write failed wait for the retry, not for their deadline, which
        // has passed and would wake the thread again at once.
        std::optional<std::chrono::steady_clock::time_point> wake;
        if (!touches_.empty() && !touch_failed_)
          wake = touch_deadline_;
        if (retry_armed_ && (!wake || retry_deadline_ < *wake))
          wake = retry_deadline_;
        if (!wake) {
          work_cv_.wait(lk);
        } else if (work_cv_.wait_until(lk, *wake) == std::cv_status::timeout) {
          retry_pass = queue_.empty() && demand_.empty() && !stopping_ &&
                       retry_armed_ &&
                       std::chrono::steady_clock::now() >= retry_deadline_;
          break;
        }
      }
      take_batch(batch);
      last = stopping_ && queue_.empty() && demand_.empty();
      busy_ = true;
    }
    if (retry_pass)
      ++io_stats_.retries;
    process(batch, out, last);
    if (!last)
      schedule_retry(retry_pass);
    {
      std::lock_guard lk(mu_);
      for (const request& r : batch)
        if (r.k == request::kind::spill) {
          queued_spill_bytes_ -= r.bytes.size();
          awaited_gens_.erase(r.gen); // written, failed or refused now
        }
      for (auto& c : out)
        done_.push_back(std::move(c));
      publish_locked();
      busy_ = false;
    }
    idle_cv_.notify_all();
    if (!out.empty() && config_.on_completion)
      config_.on_completion();
    if (retry_pass && config_.on_retry_for_testing)
      config_.on_retry_for_testing(retry_armed_ ? retry_delay_ : nanos{0});
    out.clear();
    batch.clear();
    if (last)
      return;
  }
}

bool disk_tier::retry_pending() const noexcept {
  // full_ is written only on this thread (under mu_, for the owner's
  // reads), so this thread reads it without the lock.
  return full_ || !reload_error_.empty() || !repairs_.empty() ||
         !shrunk_segments_.empty() || (touch_failed_ && !touches_.empty());
}

void disk_tier::schedule_retry(bool retry_pass) {
  if (!retry_pending()) {
    retry_armed_ = false;
    retry_delay_ = config_.retry_interval;
    return;
  }
  // A batch of requests that leaves work pending keeps the deadline: it
  // is no reason to retry sooner, nor to back off.
  if (retry_armed_ && !retry_pass)
    return;
  if (retry_pass)
    retry_delay_ = retry_delay_ > config_.max_retry_interval / 2
                       ? config_.max_retry_interval
                       : retry_delay_ * 2;
  retry_armed_ = true;
  retry_deadline_ =
      std::chrono::steady_clock::now() +
      std::chrono::duration_cast<std::chrono::steady_clock::duration>(
          retry_delay_);
}

void disk_tier::process(std::vector<request>& batch,
                        std::vector<disk_completion>& out, bool last) {
  if (full_)
    probe_free_space();
  if (!reload_error_.empty()) {
    reload();
    if (!reload_error_.empty()) {
      refuse_batch(batch, out);
      return;
    }
  }
  // Without a transaction (SQLite could not start one) every statement
  // commits on its own. Removals, pins and touches still run; under
  // full_sync spills and compactions do not (may_write_rows()).
  auto began = catalog_->begin();
  const bool in_txn = began.has_value();
  changes_at_begin_ = catalog_->changes();
  touch_changes_ = 0;
  no_txn_reason_.clear();
  if (!in_txn) {
    ++io_stats_.io_errors;
    no_txn_reason_ = began.error().message;
  }
  apply_repairs();
  for (auto& r : batch) {
    disk_completion c;
    c.id = r.id;
    c.key = r.key;
    switch (r.k) {
    case request::kind::spill:
      c.op = disk_op::spill;
      do_spill(r, c);
      break;
    case request::kind::fetch:
      c.op = disk_op::fetch;
      do_fetch(r, c);
      break;
    case request::kind::expire:
      c.op = disk_op::expire;
      do_expire(r, c);
      break;
    case request::kind::compact:
      c.op = disk_op::compact;
      do_compact(c, true);
      break;
    case request::kind::flush:
      c.op = disk_op::flush;
      c.status = flush_touches();
      break;
    case request::kind::report: {
      c.op = disk_op::report;
      if (auto f = flush_touches(); !f) {
        c.status = f;
        break;
      }
      auto rep = std::make_unique<disk_report>();
      auto usage = catalog_->usage();
      auto oldest = catalog_->oldest(r.top_n);
      auto lru = catalog_->least_recently_used(r.top_n);
      if (!usage)
        c.status = unexpected<error>(usage.error());
      else if (!oldest)
        c.status = unexpected<error>(oldest.error());
      else if (!lru)
        c.status = unexpected<error>(lru.error());
      else {
        rep->usage = std::move(*usage);
        rep->oldest = std::move(*oldest);
        rep->least_recently_used = std::move(*lru);
        c.report = std::move(rep);
      }
      break;
    }
    case request::kind::erase:
      remove_block(r.key, removal::erase);
      continue;
    case request::kind::set_pins:
      if (const auto idx = index_.find(r.key); idx != index_.end()) {
        if (auto p = catalog_->set_pins(r.key, r.pins); !p) {
          // Retried like a failed row erase (another writer holding the
          // catalog, say). Dropped, the catalog would keep the old count:
          // a pin lost or an unpin undone at restart, and a block the
          // owner unpinned never offered to capacity eviction. The repair
          // writes the directory's count when it runs, not r.pins, which
          // a later pin or unpin may have made stale.
          ++io_stats_.io_errors;
          repairs_[r.key] = repair{false, 0, idx->second.gen};
        }
      }
      continue;
    case request::kind::touch:
      if (index_.count(r.key) != 0)
        note_access(r.key, r.access_count);
      continue;
    }
    out.push_back(std::move(c));
  }
  if (full_ && over_capacity(0))
    shrink_while_full();
  if (!touches_.empty() &&
      (last || touch_failed_ || touches_.size() >= config_.touch_batch ||
       std::chrono::steady_clock::now() >= touch_deadline_))
    (void)flush_touches();
  if (!shrunk_segments_.empty()) {
    disk_completion ignored;
    do_compact(ignored, false);
  }
  // Under full_sync a spill is acknowledged only once its bytes are on
  // stable storage: a failed sync fails the batch as a failed commit does.
  result<void> synced;
  if (config_.full_sync) {
    for (const std::uint64_t id : written_segments_) {
      const auto s = segments_.find(id);
      if (s == segments_.end())
        continue;
      const int fault =
          config_.sync_fault_for_testing ? config_.sync_fault_for_testing() : 0;
      auto r = fault != 0 ? make_error(errc::io_error,
                                       "cannot sync " + s->second.file.path() +
                                           ": " + errno_text(fault))
                          : s->second.file.sync();
      if (!r && synced)
        synced = r;
    }
    // fdatasync makes a new segment's bytes durable, not its name in the
    // directory: without this a power loss could lose the file while the
    // rows committed next name it (recovery would then drop them as
    // missing, acknowledged blocks lost).
    if (synced && created_segment_) {
      const int fault = config_.dir_sync_fault_for_testing
                            ? config_.dir_sync_fault_for_testing()
                            : 0;
      synced = fault != 0
                   ? make_error(errc::io_error, "cannot sync directory " +
                                                    config_.directory + ": " +
                                                    errno_text(fault))
                   : sync_directory(config_.directory);
    }
  }
  created_segment_ = false;
  written_segments_.clear();
  auto committed = !synced  ? synced
                   : in_txn ? catalog_->commit()
                            : result<void>{};
  if (!batch.empty())
    ++io_stats_.batches;
  // A batch whose only rows were accessed_at updates (a batch of reads
  // after a touch flush failed, say) loses nothing else when its commit
  // fails: the in-memory state is what the catalog holds once they are
  // rolled back. Before, such a batch reloaded the whole catalog, and on a
  // full file system every later batch of reads retried the updates,
  // failed its commit, logged a line and reloaded again.
  const bool touches_only =
      !committed && synced && in_txn && batch_spill_gens_.empty() &&
      unlink_after_commit_.empty() &&
      catalog_->changes() - changes_at_begin_ == touch_changes_;
  if (touches_only) {
    catalog_->rollback();
    ++io_stats_.io_errors;
    if (catalog_->last_error_was_full())
      note_write_error(ENOSPC, committed.error(), 0);
    if (!logged_touch_commit_) {
      logged_touch_commit_ = true;
      std::fprintf(stderr,
                   "kvfleet: disk tier %s: %s; the accessed_at updates are "
                   "kept and retried (not logged again until a commit "
                   "succeeds; io_errors counts each)\n",
                   config_.directory.c_str(),
                   committed.error().describe().c_str());
    }
    for (auto& c : out) {
      // The updates a flush() or report() wrote were rolled back.
      if ((c.op == disk_op::flush || c.op == disk_op::report) &&
          c.status.has_value()) {
        c.status = unexpected<error>(committed.error());
        c.report.reset();
      }
    }
    for (const auto& [key, t] : uncommitted_touches_)
      if (index_.count(key) != 0)
        merge_touch(touches_, key, t);
    uncommitted_touches_.clear();
    touch_failed_ = !touches_.empty();
    uncommitted_counts_ = {};
    return;
  }
  if (!committed) {
    // Nothing of this batch is durable: fail its spills and reload the
    // in-memory state from the catalog, which cuts off their bytes, while
    // keeping what the owner did meanwhile (reload()).
    catalog_->rollback();
    ++io_stats_.io_errors;
    // Every spill of the batch failed: their keys lose their older copies
    // too at the reload (failed_spill_keys_), those that failed before
    // they were written included (their older copy's row was erased in the
    // transaction rolled back; before, the reload kept it for a key
    // spilled again meanwhile). Those written need their bytes back.
    std::uint64_t spilled = 0;
    for (const request& r : batch)
      if (r.k == request::kind::spill) {
        failed_spill_keys_.insert(r.key);
        if (batch_spill_gens_.count(r.gen) != 0)
          spilled += rec_header + r.bytes.size();
      }
    // The reload cuts those spills off again: written again, they need
    // their bytes back.
    if (catalog_->last_error_was_full())
      note_write_error(ENOSPC, committed.error(), spilled);
    std::fprintf(stderr, "kvfleet: disk tier %s: %s\n",
                 config_.directory.c_str(),
                 committed.error().describe().c_str());
    for (auto& c : out) {
      if (c.op == disk_op::spill && c.status.has_value()) {
        c.status = unexpected<error>(committed.error());
        --io_stats_.spills;
        ++io_stats_.spill_errors;
      }
      // The updates it wrote were rolled back: pending again (reload()).
      if (c.op == disk_op::flush && c.status.has_value())
        c.status = unexpected<error>(committed.error());
      // So were its compactions: the reload marks every segment, and a
      // retry compacts again those still below the threshold.
      if (c.op == disk_op::compact && c.status.has_value()) {
        c.status = unexpected<error>(committed.error());
        c.count = 0;
      }
      // A report read inside the transaction describes a catalog that
      // never was (the batch's spills there, its removals gone).
      if (c.op == disk_op::report && c.status.has_value()) {
        c.status = unexpected<error>(committed.error());
        c.report.reset();
      }
    }
    uncommitted_counts_ = {};
    unlink_after_commit_.clear();
    unlink_after_commit_bytes_ = 0;
    reload();
    return;
  }
  if (!batch_spill_gens_.empty()) {
    // A spill got through: a full file system from now on is news again.
    logged_full_ = false;
    logged_accept_ = false;
  }
  batch_spill_gens_.clear();
  uncommitted_touches_.clear();
  if (!touch_failed_)
    logged_touch_commit_ = false; // the updates got through
  io_stats_.compactions += uncommitted_counts_.compactions;
  io_stats_.compaction_bytes_moved +=
      uncommitted_counts_.compaction_bytes_moved;
  io_stats_.touch_flushes += uncommitted_counts_.touch_flushes;
  uncommitted_counts_ = {};
  for (const auto& path : unlink_after_commit_)
    ::unlink(path.c_str());
  if (!unlink_after_commit_.empty()) {
    unlink_after_commit_.clear();
    if (full_) {
      // The write that failed fits once the tier has freed as much as it
      // needs (its partial bytes were cut off again); less may be enough
      // too if something else freed space, which the look at the free
      // space finds.
      freed_while_full_ += unlink_after_commit_bytes_;
      if (!full_for_reserve_ && freed_while_full_ >= full_write_bytes_) {
        std::lock_guard lk(mu_);
        accept_spills_again_locked(std::to_string(freed_while_full_) +
                                   " bytes freed");
      } else {
        probe_free_space();
      }
    }
  }
  unlink_after_commit_bytes_ = 0;
}

void disk_tier::shrink_while_full() {
  // A tier full and over its capacity (opened full after capacity_bytes
  // was lowered, as the full log line advises) evicts and compacts as a
  // spill's make_room would: no spill comes to do it, since a full tier
  // refuses them. The segments it retires are unlinked after the commit,
  // and that freed space lets spills in again (process()). Before, such a
  // tier never evicted and stayed full for good. Segments with the most
  // dead bytes are compacted first, so a segment eviction emptied goes
  // before any copy onto the full file system. A failure is counted where
  // it happens (a copy that finds no space keeps full_ and its bytes);
  // what is left waits for the next pass, which a full tier has on the
  // retry schedule.
  (void)make_room(0);
}

void disk_tier::accept_spills_again_locked(const std::string& why) {
  full_ = false;
  full_write_bytes_ = 0;
  freed_while_full_ = 0;
  full_for_reserve_ = false;
  // The once-log is not reset here but when a spill gets through: a disk
  // that is full again at the next write would otherwise log both lines
  // at every look.
  if (logged_accept_)
    return;
  logged_accept_ = true;
  std::fprintf(stderr, "kvfleet: disk tier %s: %s, accepting spills again\n",
               config_.directory.c_str(), why.c_str());
}

void disk_tier::probe_free_space() {
  // Space freed outside the tier (the operator deleting files, as the log
  // line asks) unlinks no segment of the tier's, so without this look a
  // tier with nothing to erase, evict or compact would refuse spills for
  // good.
  //
  // min_free_bytes alone is not enough: a write larger than the free space
  // fails, its partial bytes are cut off again, and the free space is then
  // what it was, at least min_free_bytes if the open found that much. The
  // same write would fail again, and every spill with it. So the write
  // that failed must fit on top of min_free_bytes.
  // Unknown: stay full, look again at the next retry. No inode left
  // counts as no space: the next segment could not be created (a tier
  // opened full because its probe file could not be, say).
  const auto free = free_space(config_.free_bytes_for_testing,
                               config_.inode_free_for_testing);
  if (!free || !free->inode)
    return;
  const std::uint64_t avail = free->bytes;
  const std::uint64_t need = config_.min_free_bytes + full_write_bytes_;
  const bool wraps = need < config_.min_free_bytes;
  if (wraps || avail < need)
    return;
  std::lock_guard lk(mu_);
  accept_spills_again_locked(std::to_string(avail) + " bytes free (" +
                             std::to_string(need) +
                             " needed: min_free_bytes and the write that "
                             "failed)");
}

std::optional<disk_tier::free_space_info>
disk_tier::free_space(const std::function<std::uint64_t()>& hook,
                      const std::function<bool()>& inode_hook) const {
  if (hook)
    return free_space_info{hook(), !inode_hook || inode_hook()};
  const auto space = space_of(config_.directory);
  if (!space)
    return std::nullopt;
  return free_space_info{space->avail, space->inode};
}

result<void> disk_tier::keep_min_free(std::uint64_t rec) {
  if (config_.min_free_bytes == 0)
    return {};
  const auto free = free_space(config_.reserve_free_bytes_for_testing);
  if (!free)
    return {}; // unknown: the write itself will say
  const std::uint64_t need = config_.min_free_bytes + rec;
  if (need >= config_.min_free_bytes && free->bytes >= need)
    return {};
  error e{errc::out_of_memory, "disk tier " + config_.directory + ": writing " +
                                   std::to_string(rec) +
                                   " bytes would leave less than "
                                   "min_free_bytes (" +
                                   std::to_string(config_.min_free_bytes) +
                                   ") free on its file system (" +
                                   std::to_string(free->bytes) +
                                   " bytes free); spills are refused"};
  note_write_error(ENOSPC, e, rec);
  full_for_reserve_ = true;
  return unexpected<error>(std::move(e));
}

void disk_tier::note_write_error(int err_no, const error& e,
                                 std::uint64_t bytes) {
  if (!is_full_errno(err_no)) {
    ++io_stats_.io_errors;
    // Once per kind until a spill gets through (io_errors counts each).
    if (std::find(logged_write_errnos_.begin(), logged_write_errnos_.end(),
                  err_no) != logged_write_errnos_.end())
      return;
    logged_write_errnos_.push_back(err_no);
    std::fprintf(stderr,
                 "kvfleet: disk tier %s: %s; %s (the same failure is not "
                 "logged again until a spill gets through; io_errors counts "
                 "each)\n",
                 config_.directory.c_str(), e.describe().c_str(),
                 file_remedy(err_no, "the segment file").c_str());
    return;
  }
  std::lock_guard lk(mu_);
  full_ = true;
  full_for_reserve_ = false; // a write failed: its bytes say when it fits
  full_write_bytes_ = std::max(full_write_bytes_, bytes);
  freed_while_full_ = 0; // what was freed before did not make it fit
  if (!logged_full_) {
    logged_full_ = true;
    std::fprintf(stderr,
                 "kvfleet: disk tier %s: the file system is full (%s); "
                 "refusing spills, still serving reads. Free space in the "
                 "directory: spills are accepted again once %llu bytes are "
                 "free (min_free_bytes and the %llu bytes of the write that "
                 "failed; looked at again on the retry schedule), or lower "
                 "disk capacity_bytes.\n",
                 config_.directory.c_str(), e.describe().c_str(),
                 static_cast<unsigned long long>(config_.min_free_bytes +
                                                 full_write_bytes_),
                 static_cast<unsigned long long>(full_write_bytes_));
  }
}

void disk_tier::do_spill(request& r, disk_completion& c) {
  {
    // A spill the directory has moved on from (erased, or spilled again)
    // is skipped, unless a read queued after it and before the newer
    // request awaits it: that read must not find the copy before it.
    std::lock_guard lk(mu_);
    const auto d = dir_.find(r.key);
    if ((d == dir_.end() || d->second.gen != r.gen) &&
        awaited_gens_.count(r.gen) == 0) {
      ++io_stats_.spills_superseded;
      c.status = make_error(
          errc::not_found, "disk tier: block " + r.key.to_hex() +
                               " was erased or replaced before it was written");
      return;
    }
  }
  // A failed spill leaves the key absent, older copy included, so the
  // directory and the disk always agree.
  auto fail = [&](error e) {
    remove_block(r.key, removal::erase);
    {
      std::lock_guard lk(mu_);
      const auto d = dir_.find(r.key);
      if (d != dir_.end() && d->second.gen == r.gen)
        erase_dir_locked(d);
    }
    c.status = unexpected<error>(std::move(e));
  };
  bool is_full = false;
  {
    std::lock_guard lk(mu_);
    is_full = full_;
  }
  if (is_full) {
    ++io_stats_.spills_refused_full;
    fail(error{errc::out_of_memory, "disk tier " + config_.directory +
                                        ": the file system is full, spills "
                                        "are refused"});
    return;
  }
  if (block_checksum(r.bytes) != r.checksum) {
    ++io_stats_.spill_errors;
    fail(error{errc::checksum_mismatch, "disk tier: spill of block " +
                                            r.key.to_hex() +
                                            " whose bytes fail the checksum"});
    return;
  }
  // Checked before make_room, so that a spill that cannot be written
  // evicts nothing.
  if (auto rows = may_write_rows(); !rows) {
    ++io_stats_.spill_errors;
    fail(rows.error());
    return;
  }
  const std::uint64_t size = r.bytes.size();
  const std::uint64_t rec = rec_header + size;
  // min_free_bytes is a reserve the tier keeps while it spills, not only
  // what it waits for once full: other programs (and the catalog) on the
  // same file system keep that much. Before, spills filled it until a
  // write failed. Checked before make_room, as may_write_rows is, so a
  // refused spill evicts and compacts nothing (a new segment's header
  // counted whether or not this spill starts one).
  if (auto reserve = keep_min_free(rec + header_bytes); !reserve) {
    ++io_stats_.spills_refused_full;
    fail(reserve.error());
    return;
  }
  const auto moved = [&] {
    return io_stats_.compaction_bytes_moved +
           uncommitted_counts_.compaction_bytes_moved;
  };
  const std::uint64_t moved_before = moved();
  if (auto room = make_room(rec); !room) {
    if (room.error().code == errc::out_of_memory)
      ++io_stats_.spills_refused_capacity;
    else
      ++io_stats_.spill_errors;
    fail(room.error());
    return;
  }
  // make_room's compaction wrote copies (their old segments are unlinked
  // at the commit): the spill is held to the reserve again on top of them.
  if (moved() != moved_before) {
    if (auto reserve = keep_min_free(rec + header_bytes); !reserve) {
      ++io_stats_.spills_refused_full;
      fail(reserve.error());
      return;
    }
  }
  int err_no = 0;
  auto seg = active_for(rec, &err_no);
  if (!seg) {
    note_write_error(err_no, seg.error(), header_bytes + rec);
    if (is_full_errno(err_no))
      ++io_stats_.spills_refused_full;
    else
      ++io_stats_.spill_errors;
    fail(seg.error());
    return;
  }
  segment_state& s = **seg;
  const record_header h{r.c,        size,         r.key,       r.ns,
                        r.checksum, r.created_at, r.expires_at};
  auto off =
      s.file.append(h, r.bytes, config_.write_fault_for_testing, &err_no);
  if (!off) {
    note_write_error(err_no, off.error(), rec);
    if (is_full_errno(err_no)) {
      ++io_stats_.spills_refused_full;
      fail(error{errc::out_of_memory, off.error().message});
    } else {
      ++io_stats_.spill_errors;
      fail(off.error());
    }
    return;
  }
  file_bytes_ += rec;
  written_segments_.insert(s.file.id());
  std::uint32_t pins = 0;
  {
    // The owner may have erased or replaced the key meanwhile; its request
    // is queued behind this one and undoes this write.
    std::lock_guard lk(mu_);
    const auto d = dir_.find(r.key);
    if (d != dir_.end() && d->second.gen == r.gen)
      pins = d->second.info.pins;
  }
  catalog_entry e;
  e.key = r.key;
  e.ns = r.ns;
  e.tier = storage_tier::disk;
  e.segment = s.file.id();
  e.offset = *off;
  e.size = size;
  e.c = r.c;
  e.checksum = r.checksum;
  e.created_at = r.created_at;
  e.accessed_at = now_ns();
  e.access_count = r.access_count;
  e.pinned = pins;
  e.expires_at = r.expires_at;
  e.part = r.part;
  e.prio = r.prio;
  // Again here: SQLite may have ended the transaction on an error of an
  // earlier statement of this batch (make_room's included).
  if (auto rows = may_write_rows(); !rows) {
    ++io_stats_.spill_errors;
    fail(rows.error());
    return;
  }
  // The older copy leaves the index only once the new row has replaced its
  // row. Were it dropped first, a failed upsert would leave the older
  // copy's row in the catalog (committed with the batch) while fail() found
  // nothing indexed to erase: a row the tier no longer accounts for, whose
  // bytes count as dead and may be compacted away, and a block back at
  // restart although its spill was refused.
  if (auto up = catalog_->upsert(e); !up) {
    // The record's bytes stay behind as dead bytes of the segment; fail()
    // erases the older copy's row.
    if (catalog_->last_error_was_full()) {
      note_write_error(ENOSPC, up.error(), rec);
      ++io_stats_.spills_refused_full;
    } else {
      ++io_stats_.io_errors;
      ++io_stats_.spill_errors;
    }
    fail(up.error());
    return;
  }
  remove_block(r.key, removal::replace);
  index_[r.key] = location{s.file.id(), *off, size, r.gen};
  s.live += rec;
  s.keys.insert(r.key);
  live_bytes_ += rec;
  payload_bytes_ += size;
  {
    std::lock_guard lk(mu_);
    const auto d = dir_.find(r.key);
    if (d != dir_.end() && d->second.gen == r.gen)
      d->second.info.stored = true;
  }
  batch_spill_gens_.insert(r.gen);
  ++io_stats_.spills;
  logged_write_errnos_.clear(); // a write error from now on is news again
}

void disk_tier::do_fetch(request& r, disk_completion& c) {
  ++io_stats_.fetches;
  const auto it = index_.find(r.key);
  if (it == index_.end()) {
    ++io_stats_.fetch_misses;
    c.status =
        make_error(errc::not_found,
                   "disk tier: block " + r.key.to_hex() + " is not on disk");
    return;
  }
  const location loc = it->second;
  std::span<std::byte> dst = r.dst;
  if (r.into) {
    if (dst.size() != loc.size) {
      ++io_stats_.fetch_misses;
      c.status = make_error(errc::wrong_value_size,
                            "disk tier: block " + r.key.to_hex() + " has " +
                                std::to_string(loc.size) + " bytes, not " +
                                std::to_string(dst.size()));
      return;
    }
  } else {
    // The one allocation here sized by a block (up to what was spilled): a
    // failure answers this fetch, it does not end the I/O thread.
    try {
      c.bytes.resize(static_cast<std::size_t>(loc.size));
    } catch (const std::bad_alloc&) {
      ++io_stats_.fetch_misses;
      c.bytes = {};
      c.status = make_error(errc::out_of_memory,
                            "disk tier: no memory for the " +
                                std::to_string(loc.size) + " bytes of block " +
                                r.key.to_hex());
      return;
    }
    dst = c.bytes;
  }
  bool lost = false;
  auto h =
      read_record(segments_.at(loc.segment), loc, r.key, dst, r.verify, lost);
  if (!h) {
    ++io_stats_.fetch_misses;
    c.bytes.clear();
    if (r.into)
      std::fill(dst.begin(), dst.end(), std::byte{0});
    // A damaged record, or one past the end of its file (cut short), is
    // lost: the block is dropped. One that two reads could not read is
    // kept (read_record, counted in io_errors) for a later read.
    if (h.error().code == errc::checksum_mismatch)
      remove_block(r.key, removal::corrupt);
    else if (lost)
      remove_block(r.key, removal::unreadable);
    c.status = unexpected<error>(h.error());
    return;
  }
  const std::int64_t now = now_ns();
  if (h->expires_at != 0 && h->expires_at <= now) {
    ++io_stats_.fetch_misses;
    c.bytes.clear();
    if (r.into)
      std::fill(dst.begin(), dst.end(), std::byte{0});
    remove_block(r.key, removal::expire);
    c.status = make_error(errc::not_found,
                          "disk tier: block " + r.key.to_hex() + " expired");
    return;
  }
  ++io_stats_.fetch_hits;
  c.count = loc.size;
  c.c = h->c;
  c.checksum = h->checksum;
  c.ns = h->ns;
  note_access(r.key, 1);
  {
    // lookup()'s count follows the catalog's, which adds this read: a
    // mark_used() after it then adds only the owner's accesses since.
    std::lock_guard lk(mu_);
    if (const auto d = dir_.find(r.key); d != dir_.end())
      ++d->second.info.access_count;
  }
}

void disk_tier::note_access(const block_key& key, std::uint64_t reads) {
  if (touches_.empty()) {
    touch_failed_ = false;
    touch_deadline_ =
        std::chrono::steady_clock::now() +
        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            config_.touch_flush_interval);
  }
  auto& t = touches_[key];
  t.at = std::max(t.at, now_ns());
  t.count += reads;
}

void disk_tier::do_expire(request& r, disk_completion& c) {
  if (auto ok = remove_expired(r.now, c.count); !ok)
    c.status = unexpected<error>(ok.error());
}

result<void> disk_tier::remove_expired(std::int64_t now, std::uint64_t& count) {
  // Bounded: every round removes at least one row or stops.
  for (std::size_t round = 0; round <= index_.size(); ++round) {
    auto keys = catalog_->expired(now, 1024);
    if (!keys)
      return unexpected<error>(keys.error());
    if (keys->empty())
      return {};
    const std::uint64_t before = count;
    for (const auto& k : *keys) {
      if (index_.count(k) != 0) {
        remove_block(k, removal::expire);
        ++count;
      } else if (catalog_->erase(k)) {
        ++count;
      }
    }
    if (count == before)
      return {};
  }
  return {};
}

void disk_tier::do_compact(disk_completion& c, bool forced) {
  // A segment leaves shrunk_segments_ when it is compacted (retired) or
  // found not to need it. One whose compaction fails, and those not
  // reached after it, stay: the next batch or retry pass tries again.
  // Forgetting them would leave their dead bytes on disk until another
  // block left the same segment. A forced compaction adds nothing: its
  // caller gets the error. A segment sealed below the threshold by the
  // copies (seal_active) is left to the next batch or retry pass.
  //
  // The active segment is passed over while it is appended to, unless its
  // dead bytes pass what a sealed segment may hold (active_too_dead): it
  // is then sealed and compacted like any other. Otherwise a tier whose
  // active segment lost most of its blocks and then went idle kept those
  // dead bytes until the next spill that needed a new segment.
  std::vector<std::uint64_t> ids;
  for (const auto& [id, s] : segments_) {
    const bool shrunk = shrunk_segments_.count(id) != 0;
    if (!forced && !shrunk)
      continue;
    if (id == active_ && active_too_dead(s) && below_threshold(s))
      seal_active();
    // One not taken is checked again when it next loses a block, or, if
    // it is the active one, when it is sealed (seal_active).
    if (id != active_ && below_threshold(s))
      ids.push_back(id);
    else if (shrunk)
      shrunk_segments_.erase(id);
  }
  std::erase_if(shrunk_segments_,
                [&](std::uint64_t id) { return segments_.count(id) == 0; });
  for (const std::uint64_t id : ids) {
    if (auto r = compact_segment(id); !r) {
      c.status = r;
      return;
    }
    ++c.count;
  }
}

bool disk_tier::below_threshold(const segment_state& s) const noexcept {
  const std::uint64_t data = s.file.size() - header_bytes;
  return s.live == 0 ||
         static_cast<double>(s.live) <
             config_.compaction_threshold * static_cast<double>(data);
}

bool disk_tier::active_too_dead(const segment_state& s) const noexcept {
  // Compared with the live fraction, a segment still being filled would
  // look below the threshold after losing one of its first few blocks, and
  // be compacted over and over (a key spilled again and again, say). Its
  // dead bytes only grow, and its data is at most what a segment can hold
  // (segment_bytes, or the capacity when that is smaller): past (1 -
  // compaction_threshold) of that, it will be below the threshold when it
  // is sealed, whatever is appended to it first. Compacting it now does
  // early what its seal would do anyway, never once more.
  const std::uint64_t dead = s.file.size() - header_bytes - s.live;
  const std::uint64_t room =
      std::min(config_.segment_bytes, config_.capacity_bytes);
  const std::uint64_t data = room > header_bytes ? room - header_bytes : 0;
  return dead > 0 &&
         static_cast<double>(dead) >
             (1.0 - config_.compaction_threshold) * static_cast<double>(data);
}

void disk_tier::seal_active() {
  // The threshold check skips the active segment (until its dead bytes
  // pass active_too_dead's bound), and a segment is checked when it loses
  // a block: one that lost blocks while active would keep its dead bytes
  // until another block left it after the seal.
  const auto it = segments_.find(active_);
  if (it != segments_.end() && below_threshold(it->second))
    shrunk_segments_.insert(active_);
  active_ = 0;
}

result<void> disk_tier::flush_touches() {
  // An update leaves touches_ once written, so that a retry does not count
  // its reads twice. The one that fails stays, with those not reached, and
  // is retried (retry_pending()). Dropping them would make the blocks read
  // since the last flush look as cold as their previous accessed_at to
  // capacity eviction, which takes the least recently accessed first, so
  // it would evict the blocks being read, and the catalog keeps that
  // order across restarts. touches_ holds at most one entry per indexed
  // block, so keeping them cannot grow it past the index.
  //
  // Written in the batch's transaction, an update is durable only once the
  // batch commits: it moves to uncommitted_touches_, which reload() makes
  // pending again if the commit fails. Written without one (SQLite could
  // not start it), it committed on its own and must not be written again.
  if (touches_.empty()) {
    touch_failed_ = false;
    return {};
  }
  const bool in_txn = catalog_->in_transaction();
  for (auto it = touches_.begin(); it != touches_.end();) {
    const std::uint64_t before = catalog_->changes();
    const auto r = catalog_->touch(it->first, it->second.at, it->second.count);
    if (in_txn)
      touch_changes_ += catalog_->changes() - before;
    if (!r) {
      ++io_stats_.io_errors;
      touch_failed_ = true;
      return r;
    }
    if (in_txn)
      merge_touch(uncommitted_touches_, it->first, it->second);
    it = touches_.erase(it);
  }
  touch_failed_ = false;
  ++(in_txn ? uncommitted_counts_.touch_flushes : io_stats_.touch_flushes);
  return {};
}

bool disk_tier::over_capacity(std::uint64_t extra) const noexcept {
  return file_bytes_ + extra > config_.capacity_bytes;
}

std::uint64_t disk_tier::bytes_needed(std::uint64_t record_bytes) const {
  // The record, plus a new segment's header when it will not fit the
  // active one (see active_for).
  if (active_ != 0) {
    const auto& s = segments_.at(active_);
    if (s.file.size() == header_bytes ||
        s.file.size() + record_bytes <= config_.segment_bytes)
      return record_bytes;
  }
  return record_bytes + header_bytes;
}

result<void> disk_tier::make_room(std::uint64_t record_bytes) {
  if (!over_capacity(bytes_needed(record_bytes)))
    return {};
  // Blocks whose TTL ran out go first, pinned ones too: before, only the
  // owner's expire() sweep took them, and until it came they held
  // capacity while live blocks were evicted, or, pinned, had every spill
  // refused for want of room. A catalog error here leaves them to that
  // sweep (counted), and eviction goes on.
  std::uint64_t expired = 0;
  if (!remove_expired(now_ns(), expired))
    ++io_stats_.io_errors;
  if (expired > 0 && !over_capacity(bytes_needed(record_bytes)))
    return {};
  // Evict unpinned blocks, least recently used first, down to the low
  // watermark of live bytes. The catalog orders them by accessed_at, so
  // pending updates are written first. If that write fails they stay
  // pending (flush_touches) and eviction goes on all the same, passing
  // over the blocks they name: those were read since the last flush, so
  // they are the most recently used, whatever the catalog says. Only when
  // nothing else can go are they taken too. Failing the spill instead
  // would refuse every spill that needs room for as long as the write
  // fails.
  bool pass_over_touched = !flush_touches().has_value();
  const double target =
      config_.low_watermark * static_cast<double>(config_.capacity_bytes);
  // The segments' headers count too, one each and one for a new segment:
  // compaction cannot free them. (Before, only the new one counted, and
  // with a low watermark of 1.0 eviction stopped where compaction could
  // not make room, and spills were refused "for capacity" with unpinned
  // blocks left.)
  auto above_target = [&] {
    return static_cast<double>(live_bytes_ + record_bytes +
                               header_bytes * (segments_.size() + 1)) > target;
  };
  bool progress = true;
  // Rows passed over so far, ahead of the rest in the catalog's order: the
  // next page starts after them. (Before, every page was the first 256
  // rows again, and when the owner had pinned all of them since, their
  // pins still queued, eviction gave up with unpinned blocks left.)
  std::size_t passed = 0;
  constexpr std::size_t page = 256;
  while (above_target()) {
    if (!progress) {
      if (!pass_over_touched)
        break;
      pass_over_touched = false; // nothing else could go
      passed = 0;
    }
    progress = false;
    auto lru = catalog_->least_recent_unpinned(page, passed);
    if (!lru)
      return unexpected<error>(lru.error());
    // A full page may have more rows after it: not the end yet.
    if (lru->size() == page)
      progress = true;
    for (const auto& e : *lru) {
      if (!above_target())
        break;
      const auto it = index_.find(e.key);
      if (it == index_.end()) {
        ++passed;
        continue;
      }
      if (pass_over_touched && touches_.count(e.key) != 0) {
        ++passed;
        continue;
      }
      {
        // A pin taken after this spill was queued is not in the catalog yet.
        // The check and the owner-visible removal are one step under the
        // lock: a pin() after it answers not_found, never ok for a block
        // about to go.
        std::lock_guard lk(mu_);
        const auto d = dir_.find(e.key);
        if (d != dir_.end() && d->second.gen == it->second.gen) {
          if (d->second.info.pins > 0) {
            ++passed;
            continue;
          }
          erase_dir_locked(d);
        }
      }
      if (config_.on_evict_for_testing)
        config_.on_evict_for_testing(e.key);
      remove_block(e.key, removal::evict);
      progress = true;
    }
  }
  // Reclaim dead bytes, segments with the most first.
  while (over_capacity(bytes_needed(record_bytes))) {
    std::uint64_t best = 0;
    std::uint64_t best_dead = 0;
    for (const auto& [id, s] : segments_) {
      const std::uint64_t dead = s.file.size() - header_bytes - s.live;
      if (id != active_ && dead > best_dead) {
        best = id;
        best_dead = dead;
      }
    }
    if (best == 0) {
      const auto a = segments_.find(active_);
      if (a != segments_.end() &&
          a->second.file.size() - header_bytes > a->second.live) {
        seal_active(); // so that it can be compacted
        continue;
      }
      break;
    }
    if (auto r = compact_segment(best); !r) {
      // As in do_compact: the segment stays marked for the threshold
      // check, which retries it (after this batch, then in the
      // background) if it is below the threshold. Copies that succeeded
      // before the failure may have left it there; forgetting it would
      // keep its dead bytes until another block left it.
      shrunk_segments_.insert(best);
      return r;
    }
  }
  if (over_capacity(bytes_needed(record_bytes)))
    return make_error(errc::out_of_memory,
                      "disk tier " + config_.directory + " is at capacity (" +
                          std::to_string(config_.capacity_bytes) +
                          " bytes) and holds no unpinned block to evict");
  return {};
}

result<disk_tier::segment_state*>
disk_tier::active_for(std::uint64_t record_bytes, int* err_no) {
  if (active_ != 0) {
    auto& s = segments_.at(active_);
    if (s.file.size() == header_bytes ||
        s.file.size() + record_bytes <= config_.segment_bytes)
      return &s;
    seal_active();
  }
  auto f = segment_file::create(config_.directory, next_segment_, err_no);
  if (!f)
    return unexpected<error>(f.error());
  const std::uint64_t id = next_segment_++;
  segment_state s;
  s.file = std::move(*f);
  file_bytes_ += header_bytes;
  created_segment_ = true;
  auto [it, inserted] = segments_.emplace(id, std::move(s));
  KVFLEET_CHECK(inserted, "new segment id is unused");
  active_ = id;
  return &it->second;
}

result<void> disk_tier::compact_segment(std::uint64_t id) {
  const auto it = segments_.find(id);
  if (it == segments_.end())
    return {};
  // A relocated row names the copy, which is synced only at the end of the
  // batch, and the old file goes after the batch: a relocation that
  // commits on its own could lose the block to a power loss.
  if (!it->second.keys.empty()) {
    if (auto rows = may_write_rows(); !rows)
      return rows;
  }
  if (id == active_)
    active_ = 0;
  std::vector<block_key> keys(it->second.keys.begin(), it->second.keys.end());
  // Copy in file order, so the reads are sequential.
  std::sort(keys.begin(), keys.end(),
            [&](const block_key& a, const block_key& b) {
              return index_.at(a).offset < index_.at(b).offset;
            });
  std::vector<std::byte> buf;
  for (const auto& key : keys) {
    location& loc = index_.at(key);
    const std::uint64_t rec = rec_header + loc.size;
    try {
      buf.resize(static_cast<std::size_t>(loc.size));
    } catch (const std::bad_alloc&) {
      return make_error(errc::out_of_memory,
                        "disk tier: no memory to copy a block of " +
                            std::to_string(loc.size) +
                            " bytes while compacting segment " +
                            std::to_string(id));
    }
    bool lost = false;
    auto h = read_record(it->second, loc, key, buf, true, lost);
    if (!h) {
      // A record that is lost for good (damaged, or past the end of its
      // file) is dropped and the compaction goes on; otherwise, a segment
      // that stopped at it would keep its dead bytes for good. One that
      // could not be read twice stops the compaction (counted in
      // io_errors by read_record), keeping its block: the segment stays
      // marked and is retried (see Retries). Dropping it instead lost
      // every live block of a segment to a short burst of read errors.
      if (h.error().code == errc::checksum_mismatch) {
        remove_block(key, removal::corrupt);
        continue;
      }
      if (lost) {
        remove_block(key, removal::unreadable);
        continue;
      }
      return unexpected<error>(h.error());
    }
    int err_no = 0;
    auto dst = active_for(rec, &err_no);
    if (!dst) {
      note_write_error(err_no, dst.error(), header_bytes + rec);
      return unexpected<error>(dst.error());
    }
    segment_state& d = **dst;
    auto off = d.file.append(*h, buf, config_.write_fault_for_testing, &err_no);
    if (!off) {
      note_write_error(err_no, off.error(), rec);
      return unexpected<error>(off.error());
    }
    file_bytes_ += rec;
    written_segments_.insert(d.file.id());
    if (auto r = catalog_->relocate(key, d.file.id(), *off); !r) {
      // A full catalog is a lack of space, as a full segment write is
      // (note_write_error sets full); before, it counted in io_errors.
      if (catalog_->last_error_was_full())
        note_write_error(ENOSPC, r.error(), rec);
      else
        ++io_stats_.io_errors;
      return r;
    }
    it->second.live -= rec;
    it->second.keys.erase(key);
    d.live += rec;
    d.keys.insert(key);
    loc.segment = d.file.id();
    loc.offset = *off;
    (catalog_->in_transaction() ? uncommitted_counts_.compaction_bytes_moved
                                : io_stats_.compaction_bytes_moved) += rec;
  }
  retire_segment(id);
  ++(catalog_->in_transaction() ? uncommitted_counts_.compactions
                                : io_stats_.compactions);
  return {};
}

result<record_header> disk_tier::read_record(const segment_state& s,
                                             const location& loc,
                                             const block_key& key,
                                             std::span<std::byte> dst,
                                             bool verify, bool& lost) {
  lost = false;
  const auto fault = [&]() -> result<void> {
    if (!config_.read_fault_for_testing)
      return {};
    if (const int e = config_.read_fault_for_testing(); e != 0) {
      std::fill(dst.begin(), dst.end(), std::byte{0});
      return make_error(errc::io_error, "cannot read segment " + s.file.path() +
                                            ": " + errno_text(e));
    }
    return {};
  };
  auto first = fault();
  result<record_header> h =
      first ? s.file.read(loc.offset, key, dst, verify)
            : result<record_header>(unexpected<error>(first.error()));
  if (h || h.error().code != errc::io_error)
    return h;
  ++io_stats_.io_errors;
  // Only a record past the end of its file is provably gone (the file was
  // cut short under the mapping: SIGBUS), like one whose bytes fail their
  // checksum. Any other I/O error may pass (a transient EIO, a path that
  // recovers): read once more, with pread, and if that fails too keep the
  // block for a later read. Before, one failed read dropped it, and a
  // short burst of errors during a compaction every block of a segment.
  if (const auto size = s.file.size_on_disk();
      size && *size < loc.offset + rec_header + loc.size) {
    lost = true;
    return h;
  }
  if (auto f = fault(); !f) {
    ++io_stats_.io_errors;
    return unexpected<error>(f.error());
  }
  h = s.file.read_unmapped(loc.offset, key, dst, verify);
  if (!h && h.error().code == errc::io_error)
    ++io_stats_.io_errors;
  return h;
}

result<void> disk_tier::may_write_rows() const {
  // Under full_sync a row that names bytes written in this batch must not
  // commit before process() has synced them. In the batch's transaction
  // it commits after the sync; without one (begin() failed, or SQLite
  // rolled the transaction back on an error) it would commit as it is
  // written, and a power loss could leave it naming bytes that never
  // reached the disk: an acknowledged block lost, or a relocated one.
  // Refusing is the correct choice over syncing before each row: a
  // catalog that cannot start a transaction (busy, I/O error, full) is
  // unlikely to take the row either, each spill would cost its own
  // fdatasync, and a refused spill costs a cache only a disk copy (the
  // store evicts the block without one). Without full_sync nothing waits
  // for a sync (a process crash keeps the page cache), so rows may commit
  // one by one.
  if (!config_.full_sync || catalog_->in_transaction())
    return {};
  return make_error(
      errc::io_error,
      "disk tier " + config_.directory +
          ": the catalog has no transaction open" +
          (no_txn_reason_.empty() ? std::string()
                                  : " (" + no_txn_reason_ + ")") +
          "; under full_sync no row may commit before its bytes are "
          "synced, so the write is refused");
}

void disk_tier::retire_segment(std::uint64_t id) {
  const auto it = segments_.find(id);
  KVFLEET_CHECK(it != segments_.end() && it->second.keys.empty(),
                "a retired segment holds no live block");
  file_bytes_ -= it->second.file.size();
  shrunk_segments_.erase(id);
  // The file goes only after the catalog stops naming it (next commit).
  unlink_after_commit_.push_back(it->second.file.path());
  unlink_after_commit_bytes_ += it->second.file.size();
  if (active_ == id)
    active_ = 0;
  segments_.erase(it);
}

void disk_tier::remove_block(const block_key& key, removal why) {
  const auto it = index_.find(key);
  if (it == index_.end())
    return;
  const location loc = it->second;
  const std::uint64_t rec = rec_header + loc.size;
  auto& s = segments_.at(loc.segment);
  KVFLEET_CHECK(s.live >= rec && live_bytes_ >= rec, "live byte accounting");
  s.live -= rec;
  s.keys.erase(key);
  live_bytes_ -= rec;
  payload_bytes_ -= loc.size;
  index_.erase(it);
  touches_.erase(key);
  shrunk_segments_.insert(loc.segment);
  if (why != removal::replace && why != removal::reconcile) {
    // A row that outlived its block would come back at restart: retry the
    // erase with the next batch.
    if (auto r = catalog_->erase(key); !r) {
      ++io_stats_.io_errors;
      repairs_[key] = repair{true, 0, 0};
    }
  }
  switch (why) {
  case removal::evict:
    ++io_stats_.evictions;
    io_stats_.evicted_bytes += loc.size;
    break;
  case removal::expire:
    ++io_stats_.expirations;
    break;
  case removal::corrupt:
    ++io_stats_.checksum_failures;
    break;
  case removal::unreadable:
    ++io_stats_.unreadable_dropped;
    break;
  case removal::erase:
  case removal::replace:
  case removal::reconcile:
    break;
  }
  if (why == removal::evict || why == removal::expire ||
      why == removal::corrupt || why == removal::unreadable) {
    std::lock_guard lk(mu_);
    const auto d = dir_.find(key);
    if (d != dir_.end() && d->second.gen == loc.gen)
      erase_dir_locked(d);
  }
}

void disk_tier::publish_locked() {
  published_ = io_stats_;
  published_.blocks = index_.size();
  published_.bytes = payload_bytes_;
  published_.file_bytes = file_bytes_;
  published_.segments = segments_.size();
  published_.full = full_;
}

void disk_tier::check_invariants() const {
  std::unique_lock lk(mu_);
  idle_cv_.wait(lk, [&] { return idle_locked(); });
  // Idle: the I/O thread waits for mu_ before touching its state, so its
  // state can be read here.
  KVFLEET_CHECK(retry_armed_ == retry_pending(),
                "work a failure left is scheduled for a retry");
  KVFLEET_CHECK(queued_writes_.empty() && !background_turn_,
                "when idle, no write is counted as queued and no batch "
                "waits for its turn");
  KVFLEET_CHECK(awaited_gens_.empty(),
                "when idle, no spill is awaited by a queued read");
  if (!reload_error_.empty()) {
    // Nothing loaded; the directory keeps the owner's view until a reload.
    KVFLEET_CHECK(index_.empty() && segments_.empty() && file_bytes_ == 0 &&
                      live_bytes_ == 0 && payload_bytes_ == 0,
                  "a tier that could not reload holds nothing");
    return;
  }
  std::uint64_t files = 0;
  std::uint64_t live = 0;
  std::size_t keys = 0;
  for (const auto& [id, s] : segments_) {
    KVFLEET_CHECK(s.file.id() == id, "segment map key is its id");
    KVFLEET_CHECK(s.file.size() >= header_bytes + s.live,
                  "a segment holds its live records");
    files += s.file.size();
    std::uint64_t seg_live = 0;
    for (const auto& k : s.keys) {
      const auto it = index_.find(k);
      KVFLEET_CHECK(it != index_.end() && it->second.segment == id,
                    "segment keys are indexed there");
      KVFLEET_CHECK(it->second.offset >= header_bytes &&
                        it->second.offset + rec_header + it->second.size <=
                            s.file.size(),
                    "a record lies inside its segment");
      seg_live += rec_header + it->second.size;
    }
    KVFLEET_CHECK(seg_live == s.live, "segment live bytes match its keys");
    live += s.live;
    keys += s.keys.size();
  }
  KVFLEET_CHECK(files == file_bytes_, "file bytes match the segments");
  KVFLEET_CHECK(live == live_bytes_, "live bytes match the segments");
  KVFLEET_CHECK(keys == index_.size(), "every indexed block is in a segment");
  KVFLEET_CHECK(active_ == 0 || segments_.count(active_) == 1,
                "the active segment exists");
  KVFLEET_CHECK(dir_.size() == index_.size(),
                "when idle, the directory holds exactly the stored blocks");
  for (const auto& [k, t] : touches_)
    KVFLEET_CHECK(index_.count(k) == 1,
                  "pending accessed_at updates are for stored blocks");
  KVFLEET_CHECK(uncommitted_touches_.empty(),
                "when idle, every written accessed_at update is committed or "
                "pending again");
  std::size_t pinned = 0;
  for (const auto& [k, d] : dir_)
    pinned += d.info.pins > 0 ? 1 : 0;
  KVFLEET_CHECK(pinned == pinned_in_dir_,
                "the count of pinned directory entries matches them");
  for (const auto& [k, d] : dir_) {
    const auto it = index_.find(k);
    KVFLEET_CHECK(it != index_.end() && it->second.gen == d.gen &&
                      d.info.stored && d.info.size == it->second.size,
                  "a directory entry matches its stored block");
  }
  KVFLEET_CHECK(published_.blocks == index_.size() &&
                    published_.bytes == payload_bytes_,
                "published stats match the index");
}

} // namespace kvfleet::engine
