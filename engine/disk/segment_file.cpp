#include "engine/disk/segment_file.hpp"

#include "engine/checksum.hpp"

#include <xxhash.h>

#include <atomic>
#include <cerrno>
#include <csetjmp>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <mutex>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

namespace kvfleet::engine {
namespace {

constexpr std::array<unsigned char, 8> segment_magic{'k', 'v', 'f', 's',
                                                     'e', 'g', 0,   1};
constexpr std::uint32_t record_magic = 0x3142564bU; // "KVB1"

void store32(std::byte* p, std::uint32_t v) noexcept {
  for (int i = 0; i < 4; ++i)
    p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xffU);
}
void store64(std::byte* p, std::uint64_t v) noexcept {
  for (int i = 0; i < 8; ++i)
    p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xffU);
}
std::uint32_t load32(const std::byte* p) noexcept {
  std::uint32_t v = 0;
  for (int i = 0; i < 4; ++i)
    v |= static_cast<std::uint32_t>(p[i]) << (8 * i);
  return v;
}
std::uint64_t load64(const std::byte* p) noexcept {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i)
    v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
  return v;
}
std::uint64_t hash(const std::byte* p, std::size_t n) noexcept {
  return XXH3_64bits_withSeed(p, n, hash_seed);
}

std::string errno_text(int e) {
  return std::strerror(e);
}

/// What to do when an existing segment file cannot be opened.
std::string open_remedy(int e) {
  switch (e) {
  case EACCES:
  case EPERM:
    return "give the user running kvfleet read and write permission on it "
           "(every file of the directory must be that user's to write)";
  case EROFS:
    return "the file system is mounted read-only: remount it read-write";
  case EISDIR:
    return "it is not a segment file: move it out of the directory";
  case EMFILE:
  case ENFILE:
    return "no file descriptor is left (the tier keeps one per segment): "
           "raise the open-file limit (ulimit -n) or use larger segments "
           "(segment_bytes)";
  default:
    return "fix the cause and open the tier again";
  }
}

/// pread/pwrite until done; returns bytes moved or -1 with errno set.
ssize_t full_pread(int fd, std::byte* p, std::size_t n, std::uint64_t off) {
  std::size_t done = 0;
  while (done < n) {
    const ssize_t r =
        ::pread(fd, p + done, n - done, static_cast<off_t>(off + done));
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0)
      return -1;
    if (r == 0)
      break;
    done += static_cast<std::size_t>(r);
  }
  return static_cast<ssize_t>(done);
}

} // namespace

std::array<std::byte, record_header_bytes>
encode_record_header(const record_header& h) noexcept {
  std::array<std::byte, record_header_bytes> b{};
  store32(b.data(), record_magic);
  b[4] = static_cast<std::byte>(h.c);
  store64(b.data() + 8, h.size);
  store64(b.data() + 16, h.key.hi);
  store64(b.data() + 24, h.key.lo);
  store64(b.data() + 32, h.ns.hi);
  store64(b.data() + 40, h.ns.lo);
  store64(b.data() + 48, h.checksum);
  store64(b.data() + 56, static_cast<std::uint64_t>(h.created_at));
  store64(b.data() + 64, static_cast<std::uint64_t>(h.expires_at));
  store64(b.data() + 72, hash(b.data(), 72));
  return b;
}

result<record_header>
decode_record_header(std::span<const std::byte, record_header_bytes> raw) {
  const std::byte* b = raw.data();
  if (load32(b) != record_magic)
    return make_error(errc::checksum_mismatch, "record header: bad magic");
  if (load64(b + 72) != hash(b, 72))
    return make_error(errc::checksum_mismatch, "record header: bad checksum");
  record_header h;
  h.c = static_cast<codec>(b[4]);
  if (!is_valid(h.c))
    return make_error(errc::checksum_mismatch, "record header: bad codec");
  h.size = load64(b + 8);
  h.key = block_key{load64(b + 16), load64(b + 24)};
  h.ns = ns_fingerprint{load64(b + 32), load64(b + 40)};
  h.checksum = load64(b + 48);
  h.created_at = static_cast<std::int64_t>(load64(b + 56));
  h.expires_at = static_cast<std::int64_t>(load64(b + 64));
  return h;
}

std::string segment_file_name(std::uint64_t id) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "seg-%016llx.kvs",
                static_cast<unsigned long long>(id));
  return buf;
}

std::int64_t parse_segment_file_name(const std::string& name) {
  if (name.size() != 24 || name.rfind("seg-", 0) != 0 ||
      name.substr(20) != ".kvs")
    return -1;
  std::uint64_t v = 0;
  for (std::size_t i = 4; i < 20; ++i) {
    const char ch = name[i];
    std::uint64_t d = 0;
    if (ch >= '0' && ch <= '9')
      d = static_cast<std::uint64_t>(ch - '0');
    else if (ch >= 'a' && ch <= 'f')
      d = static_cast<std::uint64_t>(ch - 'a' + 10);
    else
      return -1;
    v = (v << 4) | d;
  }
  if (v > static_cast<std::uint64_t>(INT64_MAX))
    return -1;
  return static_cast<std::int64_t>(v);
}

result<void> sync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return make_error(errc::io_error, "cannot open directory " + dir +
                                          " to sync it: " + errno_text(errno));
  const int rc = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  if (rc != 0)
    return make_error(errc::io_error,
                      "cannot sync directory " + dir + ": " + errno_text(e));
  return {};
}

segment_file& segment_file::operator=(segment_file&& other) noexcept {
  if (this != &other) {
    unmap();
    if (fd_ >= 0)
      ::close(fd_);
    fd_ = other.fd_;
    id_ = other.id_;
    size_ = other.size_;
    path_ = std::move(other.path_);
    map_ = other.map_;
    map_len_ = other.map_len_;
    other.fd_ = -1;
    other.map_ = nullptr;
    other.map_len_ = 0;
  }
  return *this;
}

segment_file::~segment_file() {
  unmap();
  if (fd_ >= 0)
    ::close(fd_);
}

namespace {

// SIGBUS is how the kernel reports an I/O error (or a file cut short under
// us) while a mapping is read. The I/O thread arms a jump buffer around its
// mapped reads; the handler jumps back there, and any other SIGBUS goes to
// the previous handler (by default: the process dies, as it would have).
// volatile, and fenced where it is set and cleared: between the two the
// copy is a builtin memcpy, and the compiler removed the store that armed
// it as dead (an -O2 build died of the SIGBUS it was meant to catch).
thread_local sigjmp_buf* volatile sigbus_jump = nullptr;

void arm_sigbus(sigjmp_buf* jump) noexcept {
  sigbus_jump = jump;
  std::atomic_signal_fence(std::memory_order_seq_cst);
}
void disarm_sigbus() noexcept {
  std::atomic_signal_fence(std::memory_order_seq_cst);
  sigbus_jump = nullptr;
}
struct sigaction previous_sigbus {};

void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  if (sigbus_jump != nullptr)
    siglongjmp(*sigbus_jump, 1);
  if ((previous_sigbus.sa_flags & SA_SIGINFO) != 0 &&
      previous_sigbus.sa_sigaction != nullptr) {
    previous_sigbus.sa_sigaction(sig, info, ctx);
    return;
  }
  if (previous_sigbus.sa_handler != SIG_DFL &&
      previous_sigbus.sa_handler != SIG_IGN &&
      previous_sigbus.sa_handler != nullptr) {
    previous_sigbus.sa_handler(sig);
    return;
  }
  ::signal(SIGBUS, SIG_DFL);
  ::raise(SIGBUS);
}

void install_sigbus_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGBUS, &sa, &previous_sigbus);
  });
}

constexpr std::uint64_t map_step = std::uint64_t{16} << 20;

} // namespace

bool segment_file::map_to(std::uint64_t end) const {
  if (map_ != nullptr && end <= map_len_)
    return true;
  unmap();
  // Grow in steps so an active segment is not remapped for every append;
  // the mapping may extend past the end of the file, which is never read.
  const std::uint64_t len = (end + map_step - 1) / map_step * map_step;
  void* p = ::mmap(nullptr, static_cast<std::size_t>(len), PROT_READ,
                   MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED)
    return false;
  install_sigbus_handler();
  map_ = static_cast<const std::byte*>(p);
  map_len_ = static_cast<std::size_t>(len);
  return true;
}

void segment_file::unmap() const noexcept {
  if (map_ != nullptr)
    ::munmap(const_cast<std::byte*>(map_), map_len_);
  map_ = nullptr;
  map_len_ = 0;
}

result<segment_file> segment_file::create(const std::string& dir,
                                          std::uint64_t id, int* err_no) {
  segment_file f;
  f.id_ = id;
  f.path_ = dir + "/" + segment_file_name(id);
  f.fd_ = ::open(f.path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (f.fd_ < 0) {
    const int e = errno;
    if (err_no != nullptr)
      *err_no = e;
    return make_error(errc::io_error, "cannot create segment " + f.path_ +
                                          ": " + errno_text(e));
  }
  std::array<std::byte, segment_header_bytes> h{};
  std::memcpy(h.data(), segment_magic.data(), segment_magic.size());
  store32(h.data() + 8, segment_format_version);
  store64(h.data() + 16, id);
  store64(h.data() + 24, hash(h.data(), 24));
  ssize_t w = 0;
  do {
    w = ::pwrite(f.fd_, h.data(), h.size(), 0);
  } while (w < 0 && errno == EINTR);
  if (w != static_cast<ssize_t>(h.size())) {
    const int e = w < 0 ? errno : ENOSPC;
    if (err_no != nullptr)
      *err_no = e;
    ::unlink(f.path_.c_str());
    return make_error(errc::io_error, "cannot write segment header " + f.path_ +
                                          ": " + errno_text(e));
  }
  f.size_ = segment_header_bytes;
  return f;
}

result<segment_file> segment_file::open(const std::string& dir,
                                        std::uint64_t id, bool check_header) {
  segment_file f;
  f.id_ = id;
  f.path_ = dir + "/" + segment_file_name(id);
  f.fd_ = ::open(f.path_.c_str(), O_RDWR | O_CLOEXEC);
  if (f.fd_ < 0) {
    const int e = errno;
    return make_error(errc::io_error, "cannot open segment " + f.path_ + " (" +
                                          errno_text(e) +
                                          "): " + open_remedy(e));
  }
  struct stat st {};
  if (::fstat(f.fd_, &st) != 0)
    return make_error(errc::io_error,
                      "cannot stat " + f.path_ + ": " + errno_text(errno) +
                          "; check the disk (dmesg) or move the directory "
                          "aside and start an empty disk tier");
  f.size_ = static_cast<std::uint64_t>(st.st_size);
  if (!check_header)
    return f;
  std::array<std::byte, segment_header_bytes> h{};
  const ssize_t got = full_pread(f.fd_, h.data(), h.size(), 0);
  if (got < 0)
    return make_error(errc::io_error,
                      "cannot read the header of " + f.path_ + ": " +
                          errno_text(errno) +
                          "; check the disk (dmesg) or move the directory "
                          "aside and start an empty disk tier");
  if (got != static_cast<ssize_t>(h.size()) ||
      std::memcmp(h.data(), segment_magic.data(), segment_magic.size()) != 0 ||
      load64(h.data() + 24) != hash(h.data(), 24))
    return make_error(errc::checksum_mismatch,
                      "segment " + f.path_ +
                          " has no valid header (torn while it was created)");
  const std::uint32_t version = load32(h.data() + 8);
  if (version != segment_format_version)
    return make_error(errc::parse_error,
                      "segment " + f.path_ + " has format version " +
                          std::to_string(version) + ", this build reads " +
                          std::to_string(segment_format_version) +
                          ": run a kvfleet build that reads that version, or "
                          "move the directory aside");
  if (load64(h.data() + 16) != id)
    return make_error(errc::parse_error,
                      "segment " + f.path_ + " names another segment id");
  return f;
}

result<std::uint64_t> segment_file::append(const record_header& h,
                                           std::span<const std::byte> payload,
                                           const write_fault& fault,
                                           int* err_no) {
  const std::uint64_t at = size_;
  int e = fault ? fault() : 0;
  if (e == 0) {
    auto head = encode_record_header(h);
    std::array<iovec, 2> iov{};
    iov[0].iov_base = head.data();
    iov[0].iov_len = head.size();
    // pwritev takes non-const iovecs but only reads the payload.
    iov[1].iov_base = const_cast<std::byte*>(payload.data());
    iov[1].iov_len = payload.size();
    const std::size_t total = head.size() + payload.size();
    std::size_t done = 0;
    while (done < total) {
      // Resume a short write from where it stopped.
      std::array<iovec, 2> rest{};
      int n = 0;
      std::size_t skip = done;
      for (const auto& v : iov) {
        if (skip >= v.iov_len) {
          skip -= v.iov_len;
          continue;
        }
        rest[static_cast<std::size_t>(n)].iov_base =
            static_cast<std::byte*>(v.iov_base) + skip;
        rest[static_cast<std::size_t>(n)].iov_len = v.iov_len - skip;
        skip = 0;
        ++n;
      }
      const ssize_t w =
          ::pwritev(fd_, rest.data(), n, static_cast<off_t>(at + done));
      if (w < 0 && errno == EINTR)
        continue;
      if (w < 0) {
        e = errno;
        break;
      }
      if (w == 0) {
        e = ENOSPC;
        break;
      }
      done += static_cast<std::size_t>(w);
    }
  }
  if (e != 0) {
    if (err_no != nullptr)
      *err_no = e;
    // Cut off whatever part of the record made it, so the file never holds
    // a torn record in the middle of later ones.
    (void)::ftruncate(fd_, static_cast<off_t>(at));
    return make_error(errc::io_error, "cannot append to segment " + path_ +
                                          ": " + errno_text(e));
  }
  size_ = at + record_header_bytes + payload.size();
  return at;
}

result<record_header> segment_file::read(std::uint64_t offset,
                                         const block_key& expect_key,
                                         std::span<std::byte> payload,
                                         bool verify) const {
  const std::uint64_t end = offset + record_header_bytes + payload.size();
  if (end <= size_ && map_to(end))
    return read_mapped(offset, expect_key, payload, verify);
  return read_unmapped(offset, expect_key, payload, verify);
}

result<record_header> segment_file::read_unmapped(std::uint64_t offset,
                                                  const block_key& expect_key,
                                                  std::span<std::byte> payload,
                                                  bool verify) const {
  const std::uint64_t end = offset + record_header_bytes + payload.size();
  if (end > size_)
    return make_error(errc::checksum_mismatch,
                      "record at " + std::to_string(offset) + " of " + path_ +
                          " is cut short");
  return read_pread(offset, expect_key, payload, verify);
}

result<std::uint64_t> segment_file::size_on_disk() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0)
    return make_error(errc::io_error,
                      "cannot stat " + path_ + ": " + errno_text(errno));
  return static_cast<std::uint64_t>(st.st_size);
}

result<record_header> segment_file::read_mapped(std::uint64_t offset,
                                                const block_key& expect_key,
                                                std::span<std::byte> payload,
                                                bool verify) const {
  std::array<std::byte, record_header_bytes> raw{};
  std::uint64_t sum = 0;
  sigjmp_buf jump;
  if (sigsetjmp(jump, 1) != 0) {
    disarm_sigbus();
    std::memset(payload.data(), 0, payload.size());
    return make_error(errc::io_error, "I/O error reading segment " + path_ +
                                          " at " + std::to_string(offset));
  }
  arm_sigbus(&jump);
  const std::byte* rec = map_ + offset;
  std::memcpy(raw.data(), rec, raw.size());
  disarm_sigbus();
  auto h = decode_record_header(raw);
  if (!h)
    return make_error(h.error().code, h.error().message + " in " + path_);
  if (h->key != expect_key || h->size != payload.size())
    return make_error(errc::checksum_mismatch,
                      "record at " + std::to_string(offset) + " of " + path_ +
                          " holds another block");
  arm_sigbus(&jump);
  if (verify) {
    sum = copy_out_with_checksum(payload,
                                 {rec + record_header_bytes, payload.size()});
  } else {
    std::memcpy(payload.data(), rec + record_header_bytes, payload.size());
    sum = h->checksum;
  }
  disarm_sigbus();
  if (sum != h->checksum) {
    std::memset(payload.data(), 0, payload.size());
    return make_error(errc::checksum_mismatch, "block " + expect_key.to_hex() +
                                                   " in " + path_ +
                                                   " fails its checksum");
  }
  return h;
}

result<record_header> segment_file::read_pread(std::uint64_t offset,
                                               const block_key& expect_key,
                                               std::span<std::byte> payload,
                                               bool verify) const {
  const std::uint64_t expect_size = payload.size();
  std::array<std::byte, record_header_bytes> raw{};
  std::array<iovec, 2> iov{};
  iov[0].iov_base = raw.data();
  iov[0].iov_len = raw.size();
  iov[1].iov_base = payload.data();
  iov[1].iov_len = payload.size();
  const std::size_t total = raw.size() + payload.size();
  ssize_t r = 0;
  do {
    r = ::preadv(fd_, iov.data(), 2, static_cast<off_t>(offset));
  } while (r < 0 && errno == EINTR);
  if (r >= 0 && static_cast<std::size_t>(r) < total &&
      static_cast<std::size_t>(r) >= raw.size()) {
    // A short read of a regular file: finish the payload.
    const std::size_t got = static_cast<std::size_t>(r) - raw.size();
    const ssize_t more =
        full_pread(fd_, payload.data() + got, payload.size() - got,
                   offset + static_cast<std::uint64_t>(r));
    if (more >= 0)
      r += more;
  }
  if (r < 0)
    return make_error(errc::io_error, "cannot read segment " + path_ + ": " +
                                          errno_text(errno));
  if (static_cast<std::size_t>(r) != total)
    return make_error(errc::checksum_mismatch,
                      "record at " + std::to_string(offset) + " of " + path_ +
                          " is cut short");
  auto h = decode_record_header(raw);
  if (!h)
    return make_error(h.error().code, h.error().message + " in " + path_);
  if (h->key != expect_key || h->size != expect_size)
    return make_error(errc::checksum_mismatch,
                      "record at " + std::to_string(offset) + " of " + path_ +
                          " holds another block");
  if (verify && block_checksum(payload) != h->checksum)
    return make_error(errc::checksum_mismatch, "block " + expect_key.to_hex() +
                                                   " in " + path_ +
                                                   " fails its checksum");
  return h;
}

result<record_header> segment_file::read_header(std::uint64_t offset) const {
  std::array<std::byte, record_header_bytes> raw{};
  const ssize_t r = full_pread(fd_, raw.data(), raw.size(), offset);
  if (r < 0)
    return make_error(errc::io_error, "cannot read segment " + path_ + ": " +
                                          errno_text(errno));
  if (static_cast<std::size_t>(r) != raw.size())
    return make_error(errc::checksum_mismatch,
                      "record header at " + std::to_string(offset) + " of " +
                          path_ + " is cut short");
  return decode_record_header(raw);
}

result<void> segment_file::truncate(std::uint64_t bytes) {
  unmap(); // never leave a mapping over bytes that are gone
  if (::ftruncate(fd_, static_cast<off_t>(bytes)) != 0)
    return make_error(errc::io_error,
                      "cannot truncate " + path_ + ": " + errno_text(errno));
  size_ = bytes;
  return {};
}

result<void> segment_file::sync() {
  if (::fdatasync(fd_) != 0)
    return make_error(errc::io_error,
                      "cannot sync " + path_ + ": " + errno_text(errno));
  return {};
}

} // namespace kvfleet::engine
