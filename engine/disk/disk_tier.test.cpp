#include "engine/disk/disk_tier.hpp"

#include "engine/checksum.hpp"
#include "engine/testing/heap_probe.hpp"
#include "engine/testing/io_gate.hpp"
#include "engine/testing/old_disk_catalog.hpp"

#include <gtest/gtest.h>
#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <linux/capability.h>
#include <mutex>
#include <random>
#include <set>
#include <sys/resource.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

namespace kvfleet::engine {
namespace {

namespace fs = std::filesystem;

constexpr ns_fingerprint ns_a{0x1111, 0x2222};
constexpr ns_fingerprint ns_b{0x3333, 0x4444};

block_key key_of(std::uint64_t i) {
  return block_key{i + 1, i * 0x9e37 + 7};
}

std::vector<std::byte> block_bytes(std::uint64_t seed, std::size_t n) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v)
    b = static_cast<std::byte>(rng());
  return v;
}

/// Holds the I/O thread inside its next segment append until open(), so
/// that the requests queued meanwhile go into the next batch together.
struct append_gate {
  std::atomic<bool> armed{false};
  std::promise<void> entered;
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> opened{false};

  static segment_file::write_fault hook(std::shared_ptr<append_gate> g) {
    return [g] {
      if (g->armed.exchange(false)) {
        g->entered.set_value();
        g->released.wait();
      }
      return 0;
    };
  }
  void open() {
    if (!opened.exchange(true))
      release.set_value();
  }
  /// Opens the gate when the test's scope ends, so that a failed assertion
  /// cannot leave the tier's destructor waiting for the I/O thread.
  struct guard {
    std::shared_ptr<append_gate> g;
    ~guard() { g->open(); }
  };
};

/// A sync hook that fails exactly the sync numbered `fail_at` (counting
/// from 1 since open), so that exactly one chosen batch is rolled back.
struct sync_counter {
  std::atomic<int> calls{0};
  std::atomic<int> fail_at{-1};

  static segment_file::write_fault hook(std::shared_ptr<sync_counter> s) {
    return [s] { return ++s->calls == s->fail_at.load() ? EIO : 0; };
  }
};

/// Records what on_retry_for_testing reports: the delay after each retry
/// pass, 0 once nothing is left to retry. Tests wait on it instead of
/// sleeping.
struct retry_watch {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<nanos> delays;

  /// Retries every 1 ms, backing off to 4 ms, reported to the watch it
  /// returns.
  static std::shared_ptr<retry_watch> fast(disk_tier_config& c) {
    c.retry_interval = std::chrono::milliseconds(1);
    c.max_retry_interval = std::chrono::milliseconds(4);
    auto w = std::make_shared<retry_watch>();
    c.on_retry_for_testing = hook(w);
    return w;
  }
  static std::function<void(nanos)> hook(std::shared_ptr<retry_watch> w) {
    return [w](nanos next) {
      {
        std::lock_guard lk(w->mu);
        w->delays.push_back(next);
      }
      w->cv.notify_all();
    };
  }
  /// Waits, with a bound, until `n` retry passes reported work left.
  bool failed(std::size_t n) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, std::chrono::seconds(60), [&] {
      return std::count_if(delays.begin(), delays.end(), [](nanos d) {
               return d != nanos{0};
             }) >= static_cast<std::ptrdiff_t>(n);
    });
  }
  /// Waits, with a bound, until `n` retry passes reported, whatever.
  bool passes(std::size_t n) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, std::chrono::seconds(60),
                       [&] { return delays.size() >= n; });
  }
  /// Waits, with a bound, until a retry pass left nothing to retry.
  bool converged() {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, std::chrono::seconds(60), [&] {
      return std::find(delays.begin(), delays.end(), nanos{0}) != delays.end();
    });
  }
  std::vector<nanos> seen() {
    std::lock_guard lk(mu);
    return delays;
  }
};

/// A second connection to a tier's catalog that can hold SQLite's write
/// lock, as an operator's sqlite3 shell inside a write transaction does:
/// the tier's BEGIN IMMEDIATE then fails with SQLITE_BUSY.
class catalog_peer {
public:
  explicit catalog_peer(const std::string& path) {
    EXPECT_EQ(sqlite3_open(path.c_str(), &db_), SQLITE_OK);
  }
  catalog_peer(const catalog_peer&) = delete;
  catalog_peer& operator=(const catalog_peer&) = delete;
  ~catalog_peer() {
    release();
    sqlite3_close(db_);
  }
  bool hold() {
    holding_ = sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr,
                            nullptr) == SQLITE_OK;
    return holding_;
  }
  void release() {
    if (holding_)
      sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr);
    holding_ = false;
  }
  /// Runs `sql` (no rows), committed at once unless the write lock is held.
  bool exec(const std::string& sql) {
    return sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, nullptr) ==
           SQLITE_OK;
  }
  /// The first column of the first row of `sql`, as committed so far.
  std::int64_t query(const std::string& sql) {
    sqlite3_stmt* s = nullptr;
    std::int64_t v = -1;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &s, nullptr) == SQLITE_OK &&
        sqlite3_step(s) == SQLITE_ROW)
      v = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    return v;
  }

private:
  sqlite3* db_ = nullptr;
  bool holding_ = false;
};

/// Captures what is written on stderr (the tier's log) until log(), or
/// until the scope ends, so that a failed assertion leaves it restored.
class stderr_log {
public:
  stderr_log() { ::testing::internal::CaptureStderr(); }
  stderr_log(const stderr_log&) = delete;
  stderr_log& operator=(const stderr_log&) = delete;
  ~stderr_log() {
    if (!taken_)
      (void)::testing::internal::GetCapturedStderr();
  }
  std::string log() {
    taken_ = true;
    return ::testing::internal::GetCapturedStderr();
  }

private:
  bool taken_ = false;
};

/// Lowers the soft open-file limit to the descriptors open now plus
/// `headroom` while it lives, and puts the old limit back when it goes,
/// also when an assertion returns early (the limit would otherwise stay low
/// for every later test of the binary).
class open_file_limit {
public:
  explicit open_file_limit(rlim_t headroom)
      : in_use_(static_cast<rlim_t>(
            std::distance(fs::directory_iterator("/proc/self/fd"), {}))) {
    if (::getrlimit(RLIMIT_NOFILE, &old_) != 0)
      return;
    rlimit low = old_;
    low.rlim_cur = in_use_ + headroom;
    lowered_ =
        low.rlim_cur <= old_.rlim_cur && ::setrlimit(RLIMIT_NOFILE, &low) == 0;
  }
  open_file_limit(const open_file_limit&) = delete;
  open_file_limit& operator=(const open_file_limit&) = delete;
  ~open_file_limit() {
    if (lowered_)
      (void)::setrlimit(RLIMIT_NOFILE, &old_);
  }
  /// Whether the limit was lowered.
  [[nodiscard]] bool lowered() const noexcept { return lowered_; }
  /// Descriptors open when it was made.
  [[nodiscard]] rlim_t in_use() const noexcept { return in_use_; }

private:
  rlimit old_{};
  rlim_t in_use_;
  bool lowered_ = false;
};

/// How many times `part` occurs in `text`.
std::size_t occurrences(const std::string& text, const std::string& part) {
  std::size_t n = 0;
  for (auto at = text.find(part); at != std::string::npos;
       at = text.find(part, at + part.size()))
    ++n;
  return n;
}

/// Makes permission bits apply to the calling thread while it lives, as
/// they do for any user but root: a root test drops CAP_DAC_OVERRIDE and
/// CAP_DAC_READ_SEARCH from the thread's effective capabilities (they come
/// back at the end; disk_tier::open runs on the calling thread). Another
/// user needs nothing. ok() is false when root could not drop them.
class permission_bits_apply {
public:
  permission_bits_apply() {
    if (::geteuid() != 0) {
      ok_ = true;
      return;
    }
    if (::syscall(SYS_capget, &header_, saved_) != 0)
      return;
    __user_cap_data_struct fewer[2] = {saved_[0], saved_[1]};
    fewer[0].effective &=
        ~((1U << CAP_DAC_OVERRIDE) | (1U << CAP_DAC_READ_SEARCH));
    dropped_ = ::syscall(SYS_capset, &header_, fewer) == 0;
    ok_ = dropped_;
  }
  permission_bits_apply(const permission_bits_apply&) = delete;
  permission_bits_apply& operator=(const permission_bits_apply&) = delete;
  ~permission_bits_apply() {
    if (dropped_) {
      EXPECT_EQ(::syscall(SYS_capset, &header_, saved_), 0);
    }
  }
  [[nodiscard]] bool ok() const noexcept { return ok_; }

private:
  __user_cap_header_struct header_{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct saved_[2]{};
  bool dropped_ = false;
  bool ok_ = false;
};

/// How read_between_writes() queues its read.
struct read_case {
  disk_priority p = disk_priority::demand;
  bool erase_after = false; ///< erase the key after the read, not spill v2
  bool in_flight = false;   ///< spill v1 is in the batch in progress
};

class disk_tier_test : public ::testing::Test {
protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kvfleet-disk-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    tier_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  disk_tier_config config() {
    disk_tier_config c;
    c.directory = dir_;
    c.capacity_bytes = std::uint64_t{64} << 20;
    c.segment_bytes = std::uint64_t{1} << 20;
    c.clock = &clock_;
    return c;
  }

  /// A tier in the test's directory that takes blocks past 64 MiB.
  disk_tier_config large_block_config() const {
    disk_tier_config c;
    c.directory = dir_;
    c.capacity_bytes = std::uint64_t{1} << 30;
    c.segment_bytes = std::uint64_t{128} << 20;
    return c;
  }

  /// File bytes of one spilled 4096-byte block: its record.
  static constexpr std::uint64_t rec = record_header_bytes + 4096;

  /// config() with segments that hold `blocks` 4096-byte blocks each.
  disk_tier_config config_with_segments_of(std::uint64_t blocks) {
    auto c = config();
    c.segment_bytes = segment_header_bytes + blocks * rec;
    return c;
  }

  void open(const disk_tier_config& c) {
    tier_.reset();
    auto t = disk_tier::open(c);
    ASSERT_TRUE(t.has_value()) << t.error().describe();
    tier_ = std::move(*t);
  }

  /// Queues a spill of block i (size n, seeded by i) and returns its id.
  disk_request_id spill(std::uint64_t i, std::size_t n = 4096,
                        bool pinned = false, nanos expires = nanos{0},
                        ns_fingerprint ns = ns_a) {
    const auto bytes = block_bytes(i, n);
    auto id =
        tier_->spill(key_of(i), ns, codec::int8, bytes, block_checksum(bytes),
                     clock_.now(), expires, pinned);
    EXPECT_TRUE(id.has_value()) << id.error().describe();
    return id.value_or(disk_request_id{});
  }

  /// Queues a spill of copy `seed` (4096 bytes seeded by it) of block 1.
  disk_request_id spill_copy_of_1(std::uint64_t seed) {
    const auto bytes = block_bytes(seed, 4096);
    return tier_
        ->spill(key_of(1), ns_a, codec::int8, bytes, block_checksum(bytes),
                clock_.now(), nanos{0}, false)
        .value();
  }

  /// The read `read` of block 1, among `done`, found no copy (copy 1, the
  /// older one, above all).
  static void expect_read_found_none(const std::vector<disk_completion>& done,
                                     disk_request_id read) {
    for (const auto& d : done) {
      if (d.id != read)
        continue;
      ASSERT_FALSE(d.status.has_value())
          << (d.bytes == block_bytes(1, 4096) ? "got the older copy A"
                                              : "got some copy");
      EXPECT_EQ(d.status.error().code, errc::not_found)
          << d.status.error().describe();
    }
  }

  /// Queues a spill of block i (4096 bytes, seeded by i) recording its size
  /// partition and request priority; true when the tier took it.
  bool spill_ranked(std::uint64_t i, size_partition part, priority prio) {
    const auto bytes = block_bytes(i, 4096);
    auto id =
        tier_->spill(key_of(i), ns_a, codec::int8, bytes, block_checksum(bytes),
                     clock_.now(), nanos{0}, false, part, prio);
    EXPECT_TRUE(id.has_value()) << id.error().describe();
    return id.has_value();
  }

  /// Waits for the tier to go idle and returns the completions so far.
  std::vector<disk_completion> settle() {
    EXPECT_TRUE(tier_->wait_idle());
    std::vector<disk_completion> out;
    tier_->drain_completions(
        [&](disk_completion&& c) { out.push_back(std::move(c)); });
    tier_->check_invariants();
    return out;
  }

  /// settle(), failing the test for each of `ids` with no completion among
  /// them (a test that checks a request's completion only when it comes
  /// would pass on a lost one).
  std::vector<disk_completion>
  settle_expecting(std::initializer_list<disk_request_id> ids) {
    auto out = settle();
    for (const auto& id : ids)
      if (std::none_of(out.begin(), out.end(),
                       [&](const disk_completion& c) { return c.id == id; }))
        ADD_FAILURE() << "no completion for request " << id.value;
    return out;
  }

  /// Fetches block i and waits for the answer.
  disk_completion fetch(std::uint64_t i) {
    const auto id = tier_->fetch(key_of(i));
    for (auto& c : settle())
      if (c.id == id)
        return std::move(c);
    ADD_FAILURE() << "no completion for the fetch";
    return {};
  }

  void expect_block(std::uint64_t i, std::size_t n = 4096) {
    auto c = fetch(i);
    ASSERT_TRUE(c.status.has_value())
        << i << ": " << c.status.error().describe();
    EXPECT_EQ(c.op, disk_op::fetch);
    EXPECT_EQ(c.key, key_of(i));
    EXPECT_TRUE(c.bytes == block_bytes(i, n)) << i;
    EXPECT_EQ(c.c, codec::int8);
    EXPECT_EQ(c.checksum, block_checksum(c.bytes));
  }

  /// Bytes of the file system that holds the test's directory: as
  /// min_free_bytes, more than it has free (it holds something), and no
  /// more than it holds, which open() takes.
  std::uint64_t file_system_bytes() const {
    struct statvfs vfs {};
    EXPECT_EQ(::statvfs(dir_.c_str(), &vfs), 0);
    return static_cast<std::uint64_t>(vfs.f_blocks) *
           static_cast<std::uint64_t>(vfs.f_frsize);
  }

  std::vector<fs::path> segment_files() const {
    std::vector<fs::path> out;
    for (const auto& e : fs::directory_iterator(dir_))
      if (e.path().extension() == ".kvs")
        out.push_back(e.path());
    std::sort(out.begin(), out.end());
    return out;
  }

  /// See its definition (demand reads).
  void read_between_writes(read_case rc);

  std::string dir_;
  manual_clock clock_{nanos{1'000'000}};
  std::unique_ptr<disk_tier> tier_;
};

// ------------------------------------------------------------- contract

TEST_F(disk_tier_test, spilled_blocks_read_back_with_codec_and_checksum) {
  open(config());
  for (std::uint64_t i = 0; i < 10; ++i)
    spill(i, 1000 + 100 * i);
  for (const auto& c : settle()) {
    EXPECT_EQ(c.op, disk_op::spill);
    EXPECT_TRUE(c.status.has_value()) << c.status.error().describe();
  }
  for (std::uint64_t i = 0; i < 10; ++i) {
    EXPECT_TRUE(tier_->contains(key_of(i)));
    expect_block(i, 1000 + 100 * i);
  }
  EXPECT_FALSE(tier_->contains(key_of(99)));
  const auto s = tier_->stats();
  EXPECT_EQ(s.blocks, 10U);
  EXPECT_EQ(s.spills, 10U);
  EXPECT_EQ(s.fetch_hits, 10U);
  auto info = tier_->lookup(key_of(3));
  ASSERT_TRUE(info.has_value());
  EXPECT_TRUE(info->stored);
  EXPECT_EQ(info->size, 1300U);
  EXPECT_EQ(info->ns, ns_a);
}

TEST_F(disk_tier_test, a_fetch_queued_behind_its_spill_is_served) {
  open(config());
  spill(1);
  EXPECT_TRUE(tier_->contains(key_of(1))); // visible while pending
  expect_block(1);
}

TEST_F(disk_tier_test, fetch_into_reads_into_the_callers_buffer) {
  open(config());
  spill(1, 8192);
  settle();
  std::vector<std::byte> dst(8192);
  const auto id = tier_->fetch_into(key_of(1), dst);
  std::vector<std::byte> small(100);
  const auto bad = tier_->fetch_into(key_of(1), small);
  for (const auto& c : settle_expecting({id, bad})) {
    if (c.id == id) {
      ASSERT_TRUE(c.status.has_value()) << c.status.error().describe();
      EXPECT_TRUE(c.bytes.empty());
      EXPECT_EQ(c.count, 8192U);
      EXPECT_EQ(c.checksum, block_checksum(dst));
    }
    if (c.id == bad) {
      EXPECT_EQ(c.status.error().code, errc::wrong_value_size);
    }
  }
  EXPECT_TRUE(dst == block_bytes(1, 8192));
}

// ------------------------------------------------------- demand reads

/// Ids of `done` in completion order.
std::vector<std::uint64_t> order_of(const std::vector<disk_completion>& done) {
  std::vector<std::uint64_t> out;
  for (const auto& c : done)
    out.push_back(c.id.value);
  return out;
}

/// config() whose I/O thread takes batches of 4 and can be held in `gate`.
disk_tier_config gated_config(disk_tier_config c,
                              const std::shared_ptr<testing::io_gate>& gate) {
  c.max_batch = 4;
  c.write_fault_for_testing = testing::io_gate::hook(gate);
  return c;
}

// A read a caller waits for goes ahead of the spills queued before it;
// a background read (a prefetch) waits its turn. Before, every read
// waited for everything queued before it.
TEST_F(disk_tier_test, a_demand_read_goes_ahead_of_queued_spills) {
  auto gate = std::make_shared<testing::io_gate>();
  open(gated_config(config(), gate));
  spill(100);
  settle();
  gate->arm();
  const auto held = spill(0); // the I/O thread holds in its write
  ASSERT_TRUE(gate->wait_entered());
  std::vector<std::uint64_t> spills;
  for (std::uint64_t i = 1; i <= 8; ++i)
    spills.push_back(spill(i).value);
  const auto prefetch = tier_->fetch(key_of(100));
  const auto read = tier_->fetch(key_of(100), disk_priority::demand);
  gate->open();
  const auto done = settle();
  std::vector<std::uint64_t> want{held.value, read.value};
  want.insert(want.end(), spills.begin(), spills.end());
  want.push_back(prefetch.value);
  EXPECT_EQ(order_of(done), want);
  for (const auto& c : done) {
    EXPECT_TRUE(c.status.has_value()) << c.status.error().describe();
    if (c.id == read) {
      EXPECT_TRUE(c.bytes == block_bytes(100, 4096));
    }
  }
}

// A background read someone now waits for (a promote() read that a
// request of its key waits for) is made a demand read: it goes ahead of
// the queued spills, but never ahead of a queued write of its own key.
TEST_F(disk_tier_test,
       an_expedited_background_read_goes_ahead_of_queued_spills) {
  auto gate = std::make_shared<testing::io_gate>();
  open(gated_config(config(), gate));
  spill(100);
  spill(101);
  settle();
  gate->arm();
  const auto held = spill(0); // the I/O thread holds in its write
  ASSERT_TRUE(gate->wait_entered());
  std::vector<std::uint64_t> spills;
  for (std::uint64_t i = 1; i <= 4; ++i)
    spills.push_back(spill(i).value);
  const auto prefetch = tier_->fetch(key_of(100));
  const auto rewrite = spill(101); // a newer copy of 101, queued
  const auto later = spill(5);
  const auto behind = tier_->fetch(key_of(101));
  const auto other = tier_->fetch(key_of(100)); // not expedited
  const auto behind2 = tier_->fetch(key_of(101));
  const std::vector<disk_request_id> ids{prefetch, behind2, behind};
  EXPECT_EQ(tier_->expedite(ids), 1U) << "101's reads stay behind its write";
  gate->open();
  const auto done = settle_expecting(
      {held, prefetch, rewrite, later, behind, other, behind2});
  std::vector<std::uint64_t> want{held.value, prefetch.value};
  want.insert(want.end(), spills.begin(), spills.end());
  want.push_back(rewrite.value);
  want.push_back(behind.value);  // right behind 101's write, ahead of 5's
  want.push_back(behind2.value); // behind the first, in queue order
  want.push_back(later.value);
  want.push_back(other.value);
  EXPECT_EQ(order_of(done), want);
  for (const auto& c : done)
    EXPECT_TRUE(c.status.has_value()) << c.status.error().describe();
}

// Demand reads do not starve the background: while both wait, a batch of
// demand reads is followed by a batch of background work.
TEST_F(disk_tier_test, demand_reads_and_spills_take_turns) {
  auto gate = std::make_shared<testing::io_gate>();
  open(gated_config(config(), gate));
  for (std::uint64_t i = 100; i < 108; ++i)
    spill(i);
  settle();
  gate->arm();
  const auto held = spill(0);
  ASSERT_TRUE(gate->wait_entered());
  std::vector<std::uint64_t> spills;
  std::vector<std::uint64_t> reads;
  for (std::uint64_t i = 0; i < 8; ++i) {
    spills.push_back(spill(i + 1).value);
    reads.push_back(tier_->fetch(key_of(100 + i), disk_priority::demand).value);
  }
  gate->open();
  std::vector<std::uint64_t> want{held.value};
  for (std::ptrdiff_t half = 0; half < 2; ++half) {
    want.insert(want.end(), reads.begin() + 4 * half,
                reads.begin() + 4 * half + 4);
    want.insert(want.end(), spills.begin() + 4 * half,
                spills.begin() + 4 * half + 4);
  }
  EXPECT_EQ(order_of(settle()), want);
}

// A demand read never overtakes a queued spill or erase of its own key:
// it finds the bytes spilled last, or nothing when the key was erased,
// never the older copy. A read of another key still goes ahead.
TEST_F(disk_tier_test, a_demand_read_waits_for_the_queued_writes_of_its_key) {
  auto gate = std::make_shared<testing::io_gate>();
  open(gated_config(config(), gate));
  for (std::uint64_t i : {3UL, 5UL, 6UL})
    spill(i);
  settle();
  gate->arm();
  const auto held = spill(0);
  ASSERT_TRUE(gate->wait_entered());
  const auto s1 = spill(1);
  const auto newer = block_bytes(55, 4096); // key 5, new bytes
  const auto s5 =
      tier_->spill(key_of(5), ns_a, codec::int8, newer, block_checksum(newer),
                   clock_.now(), nanos{0}, false);
  EXPECT_TRUE(tier_->erase(key_of(6)).has_value());
  const auto s2 = spill(2);
  const auto r5 = tier_->fetch(key_of(5), disk_priority::demand);
  const auto r6 = tier_->fetch(key_of(6), disk_priority::demand);
  const auto r3 = tier_->fetch(key_of(3), disk_priority::demand);
  gate->open();
  ASSERT_TRUE(s5.has_value());
  const auto done = settle();
  // Batches of 4: the read of 3 alone, then the background in order, the
  // reads of 5 and 6 right behind their key's spill and erase.
  const std::vector<std::uint64_t> want{
      held.value, r3.value, s1.value, s5->value, r5.value, r6.value, s2.value};
  EXPECT_EQ(order_of(done), want);
  for (const auto& c : done) {
    if (c.id == r5) {
      EXPECT_TRUE(c.status.has_value());
      EXPECT_TRUE(c.bytes == newer) << "the older copy was read";
    }
    if (c.id == r6) {
      ASSERT_FALSE(c.status.has_value());
      EXPECT_EQ(c.status.error().code, errc::not_found);
    }
    if (c.id == r3) {
      EXPECT_TRUE(c.bytes == block_bytes(3, 4096));
    }
  }
}

/// Spills v0 of a key and waits; holds the I/O thread in another spill;
/// queues spill v1 of the key (or lets it into the batch in progress),
/// then a read of the key, then spill v2 (or an erase); opens the gate.
/// The read must find v1: what was spilled before it was queued.
void disk_tier_test::read_between_writes(read_case rc) {
  auto gate = std::make_shared<testing::io_gate>();
  open(gated_config(config(), gate));
  constexpr std::uint64_t k = 7;
  const auto v1 = block_bytes(71, 4096);
  const auto v2 = block_bytes(72, 4096);
  auto spill_k = [&](const std::vector<std::byte>& b) {
    auto id = tier_->spill(key_of(k), ns_a, codec::int8, b, block_checksum(b),
                           clock_.now(), nanos{0}, false);
    EXPECT_TRUE(id.has_value()) << id.error().describe();
  };
  spill(k); // v0
  settle();
  gate->arm();
  spill(0); // the I/O thread holds in its write
  ASSERT_TRUE(gate->wait_entered());
  if (rc.in_flight) {
    // The next batch takes spill 1 and spill v1 together and holds in
    // spill 1's write: spill v1 is then in the batch in progress, no
    // longer queued, when the read and spill v2 come.
    spill(1);
    spill_k(v1);
    gate->arm();
    gate->open();
    ASSERT_TRUE(gate->wait_entered());
  } else {
    spill_k(v1);
  }
  const auto read = tier_->fetch(key_of(k), rc.p);
  if (rc.erase_after) {
    EXPECT_TRUE(tier_->erase(key_of(k)).has_value());
  } else {
    spill_k(v2);
  }
  gate->open();
  bool answered = false;
  for (const auto& c : settle()) {
    if (c.id != read)
      continue;
    answered = true;
    ASSERT_TRUE(c.status.has_value()) << c.status.error().describe();
    EXPECT_TRUE(c.bytes == v1)
        << (c.bytes == block_bytes(k, 4096) ? "the older copy v0 was read"
                                            : "not the bytes of spill v1");
  }
  EXPECT_TRUE(answered);
  // What was queued after the read still wins in the end.
  auto after = fetch(k);
  if (rc.erase_after) {
    EXPECT_FALSE(tier_->contains(key_of(k)));
    ASSERT_FALSE(after.status.has_value());
    EXPECT_EQ(after.status.error().code, errc::not_found);
  } else {
    ASSERT_TRUE(after.status.has_value()) << after.status.error().describe();
    EXPECT_TRUE(after.bytes == v2);
  }
  // Key k unless erased, spill 0, and spill 1 when in flight.
  const std::uint64_t blocks =
      (rc.erase_after ? 1U : 2U) + (rc.in_flight ? 1U : 0U);
  EXPECT_EQ(tier_->stats().blocks, blocks);
}

// A read finds at least what was spilled before it was queued, also when
// a spill or erase of the key queued after the read supersedes that spill
// before it is written. Before, do_spill skipped the superseded spill as
// "replaced before it was written", and the read found the copy before
// it (v0).
TEST_F(disk_tier_test, a_demand_read_finds_the_spill_before_it_when_respilled) {
  read_between_writes({disk_priority::demand, false, false});
}

TEST_F(disk_tier_test,
       a_background_read_finds_the_spill_before_it_when_respilled) {
  read_between_writes({disk_priority::background, false, false});
}

TEST_F(disk_tier_test, a_demand_read_finds_the_spill_before_it_when_erased) {
  read_between_writes({disk_priority::demand, true, false});
}

TEST_F(disk_tier_test,
       a_background_read_finds_the_spill_before_it_when_erased) {
  read_between_writes({disk_priority::background, true, false});
}

// The same with spill v1 taken into the batch in progress (no longer
// queued) before the read and spill v2 come.
TEST_F(disk_tier_test, a_demand_read_finds_a_spill_in_progress_when_respilled) {
  read_between_writes({disk_priority::demand, false, true});
}

TEST_F(disk_tier_test,
       a_background_read_finds_a_spill_in_progress_when_erased) {
  read_between_writes({disk_priority::background, true, true});
}

// wait_done() returns once the given requests are answered, without
// waiting for the rest of the queue.
TEST_F(disk_tier_test, wait_done_waits_for_the_given_requests_only) {
  auto gate = std::make_shared<testing::io_gate>();
  open(gated_config(config(), gate));
  spill(100);
  settle();
  gate->arm();
  spill(0);
  ASSERT_TRUE(gate->wait_entered());
  const auto read = tier_->fetch(key_of(100), disk_priority::demand);
  gate->arm(); // the next spill holds the I/O thread again
  spill(1);
  gate->open();
  const std::vector<disk_request_id> ids{read};
  EXPECT_TRUE(tier_->wait_done(ids));
  bool answered = false;
  tier_->drain_completions(
      [&](disk_completion&& c) { answered = answered || c.id == read; });
  EXPECT_TRUE(answered);
  EXPECT_TRUE(gate->wait_entered()) << "spill 1 was not reached";
  gate->open();
  settle();
}

TEST_F(disk_tier_test, missing_blocks_are_not_found) {
  open(config());
  auto c = fetch(5);
  ASSERT_FALSE(c.status.has_value());
  EXPECT_EQ(c.status.error().code, errc::not_found);
  EXPECT_EQ(tier_->erase(key_of(5)).error().code, errc::not_found);
  EXPECT_EQ(tier_->pin(key_of(5)).error().code, errc::not_found);
}

TEST_F(disk_tier_test, erase_removes_a_block) {
  open(config());
  spill(1);
  spill(2);
  settle();
  ASSERT_TRUE(tier_->erase(key_of(1)).has_value());
  EXPECT_FALSE(tier_->contains(key_of(1)));
  EXPECT_EQ(fetch(1).status.error().code, errc::not_found);
  expect_block(2);
  EXPECT_EQ(tier_->stats().blocks, 1U);
}

TEST_F(disk_tier_test, erase_before_the_write_supersedes_the_spill) {
  open(config());
  const auto id = spill(1);
  ASSERT_TRUE(tier_->erase(key_of(1)).has_value());
  for (const auto& c : settle_expecting({id})) {
    if (c.id == id) {
      // Either order of the race is fine; never a stored block afterwards.
      EXPECT_TRUE(c.status.has_value() ||
                  c.status.error().code == errc::not_found);
    }
  }
  EXPECT_FALSE(tier_->contains(key_of(1)));
  EXPECT_EQ(tier_->stats().blocks, 0U);
}

TEST_F(disk_tier_test, a_spill_replaces_the_older_copy) {
  open(config());
  spill(1, 4096);
  settle();
  const auto other = block_bytes(77, 2048);
  ASSERT_TRUE(tier_
                  ->spill(key_of(1), ns_a, codec::int4, other,
                          block_checksum(other), clock_.now(), nanos{0}, false)
                  .has_value());
  settle();
  auto c = fetch(1);
  ASSERT_TRUE(c.status.has_value());
  EXPECT_EQ(c.bytes, other);
  EXPECT_EQ(c.c, codec::int4);
  EXPECT_EQ(tier_->stats().blocks, 1U);
}

TEST_F(disk_tier_test, a_spill_whose_checksum_is_wrong_is_refused) {
  open(config());
  const auto bytes = block_bytes(1, 4096);
  auto id =
      tier_->spill(key_of(1), ns_a, codec::none, bytes,
                   block_checksum(bytes) ^ 1, clock_.now(), nanos{0}, false);
  ASSERT_TRUE(id.has_value());
  auto done = settle();
  ASSERT_EQ(done.size(), 1U);
  EXPECT_EQ(done[0].status.error().code, errc::checksum_mismatch);
  EXPECT_FALSE(tier_->contains(key_of(1)));
}

TEST_F(disk_tier_test, bad_spills_are_refused_at_once) {
  open(config());
  const auto bytes = block_bytes(1, 16);
  EXPECT_EQ(tier_
                ->spill(key_of(1), ns_a, static_cast<codec>(9), bytes, 0,
                        nanos{0}, nanos{0}, false)
                .error()
                .code,
            errc::unknown_codec);
  EXPECT_EQ(tier_
                ->spill(block_key{}, ns_a, codec::none, bytes, 0, nanos{0},
                        nanos{0}, false)
                .error()
                .code,
            errc::invalid_argument);
  EXPECT_EQ(tier_
                ->spill(key_of(1), ns_a, codec::none, {}, 0, nanos{0}, nanos{0},
                        false)
                .error()
                .code,
            errc::value_too_large);
}

TEST_F(disk_tier_test, expire_removes_expired_blocks_pinned_or_not) {
  open(config());
  spill(1, 4096, false, nanos{5'000'000});
  spill(2, 4096, true, nanos{5'000'000});
  spill(3, 4096, false, nanos{9'000'000});
  spill(4);
  settle();
  const auto id = tier_->expire(nanos{6'000'000});
  for (const auto& c : settle_expecting({id}))
    if (c.id == id) {
      EXPECT_EQ(c.count, 2U);
    }
  EXPECT_FALSE(tier_->contains(key_of(1)));
  EXPECT_FALSE(tier_->contains(key_of(2)));
  EXPECT_TRUE(tier_->contains(key_of(3)));
  EXPECT_EQ(tier_->stats().expirations, 2U);
  // A fetch never returns an expired block, swept or not.
  clock_.set(nanos{9'500'000});
  EXPECT_EQ(fetch(3).status.error().code, errc::not_found);
  EXPECT_FALSE(tier_->contains(key_of(3)));
  expect_block(4);
}

TEST_F(disk_tier_test, capacity_eviction_takes_least_recently_used_unpinned) {
  auto c = config_with_segments_of(4);
  c.capacity_bytes = 4 * (segment_header_bytes + 4 * rec); // 16 blocks
  c.low_watermark = 0.75;
  open(c);
  for (std::uint64_t i = 0; i < 12; ++i) {
    clock_.advance(nanos{1000});
    spill(i, 4096, i == 0);
    settle();
  }
  // Blocks 1 and 2 are read again, so they are the most recently used.
  clock_.advance(nanos{1000});
  expect_block(1);
  expect_block(2);
  for (std::uint64_t i = 12; i < 18; ++i) {
    clock_.advance(nanos{1000});
    spill(i);
    for (const auto& d : settle())
      EXPECT_TRUE(d.status.has_value()) << d.status.error().describe();
    EXPECT_LE(tier_->stats().file_bytes, c.capacity_bytes);
  }
  const auto s = tier_->stats();
  EXPECT_GT(s.evictions, 0U);
  EXPECT_LE(s.file_bytes, c.capacity_bytes);
  EXPECT_TRUE(tier_->contains(key_of(0))) << "pinned blocks are never evicted";
  EXPECT_TRUE(tier_->contains(key_of(1)));
  EXPECT_TRUE(tier_->contains(key_of(2)));
  EXPECT_FALSE(tier_->contains(key_of(3))) << "least recently used goes first";
  EXPECT_TRUE(tier_->contains(key_of(17)));
  expect_block(0);
  expect_block(17);
}

TEST_F(disk_tier_test,
       a_pin_racing_capacity_eviction_never_answers_ok_for_a_lost_block) {
  auto c = config_with_segments_of(4);
  c.capacity_bytes = 4 * (segment_header_bytes + 4 * rec); // 16 blocks
  c.low_watermark = 0.75;
  // The owner pins each block as eviction takes it: the latest moment a
  // pin can race the eviction. Every such pin must fail, or the block must
  // stay.
  auto results = std::make_shared<std::vector<std::pair<block_key, bool>>>();
  disk_tier* tier = nullptr;
  c.on_evict_for_testing = [&tier, results](const block_key& k) {
    results->emplace_back(k, tier->pin(k).has_value());
  };
  open(c);
  tier = tier_.get();
  for (std::uint64_t i = 0; i < 20; ++i) {
    clock_.advance(nanos{1000});
    spill(i);
    settle();
  }
  ASSERT_FALSE(results->empty());
  for (const auto& [key, pinned] : *results) {
    if (pinned) {
      EXPECT_TRUE(tier_->contains(key)) << "pinned, yet evicted";
      EXPECT_GE(tier_->lookup(key)->pins, 1U);
    } else {
      EXPECT_FALSE(tier_->contains(key));
    }
  }
}

TEST_F(disk_tier_test, keys_that_leave_are_recorded_for_the_owner_when_asked) {
  // An owner that mirrors what the tier holds (an engine feeding a routing
  // index) learns of every key that leaves the directory, whoever removed
  // it: an erase, an expiry, a spill that failed after it was queued,
  // capacity eviction. Nothing is kept unless it asked.
  auto c = config_with_segments_of(4);
  c.capacity_bytes = 4 * (segment_header_bytes + 4 * rec); // 16 blocks
  c.low_watermark = 0.75;
  open(c);
  const auto drained = [&] {
    std::vector<block_key> out;
    tier_->drain_removed([&](const block_key& k) { out.push_back(k); });
    return out;
  };
  spill(0);
  spill(1, 4096, false, nanos{5'000'000});
  spill(2);
  settle();
  ASSERT_TRUE(tier_->erase(key_of(0)).has_value());
  EXPECT_TRUE(drained().empty()) << "not asked: nothing kept";

  tier_->record_removals(true);
  ASSERT_TRUE(tier_->erase(key_of(2)).has_value());
  tier_->expire(nanos{6'000'000});
  const auto bytes = block_bytes(3, 4096);
  ASSERT_TRUE(tier_
                  ->spill(key_of(3), ns_a, codec::none, bytes,
                          block_checksum(bytes) ^ 1, clock_.now(), nanos{0},
                          false)
                  .has_value());
  settle();
  EXPECT_EQ(drained(),
            (std::vector<block_key>{key_of(2), key_of(1), key_of(3)}));
  EXPECT_TRUE(drained().empty()) << "each removal is handed over once";

  for (std::uint64_t i = 10; i < 40; ++i) {
    clock_.advance(nanos{1000});
    spill(i);
    settle();
  }
  const auto evicted = drained();
  EXPECT_EQ(evicted.size(), tier_->stats().evictions);
  EXPECT_FALSE(evicted.empty());
  for (const auto& k : evicted) {
    EXPECT_FALSE(tier_->contains(k)) << k.to_hex();
  }
  // keys() lists exactly what is left.
  auto left = tier_->keys();
  EXPECT_EQ(left.size(), tier_->stats().blocks);
  for (const auto& k : left) {
    EXPECT_TRUE(tier_->contains(k)) << k.to_hex();
  }

  tier_->record_removals(false);
  ASSERT_TRUE(tier_->erase(key_of(39)).has_value());
  EXPECT_TRUE(drained().empty()) << "stopped: nothing kept";
}

TEST_F(disk_tier_test, spills_are_refused_when_pinned_blocks_fill_capacity) {
  auto c = config_with_segments_of(2);
  c.capacity_bytes = 2 * (segment_header_bytes + 2 * rec);
  open(c);
  for (std::uint64_t i = 0; i < 4; ++i)
    spill(i, 4096, true);
  settle();
  const auto id = spill(9);
  for (const auto& d : settle_expecting({id}))
    if (d.id == id) {
      EXPECT_EQ(d.status.error().code, errc::out_of_memory);
    }
  EXPECT_EQ(tier_->stats().spills_refused_capacity, 1U);
  EXPECT_FALSE(tier_->contains(key_of(9)));
  ASSERT_TRUE(tier_->unpin(key_of(2)).has_value());
  spill(9);
  settle();
  EXPECT_TRUE(tier_->contains(key_of(9)));
  EXPECT_FALSE(tier_->contains(key_of(2)));
  for (std::uint64_t i : {0UL, 1UL, 3UL, 9UL})
    expect_block(i);
}

TEST_F(disk_tier_test, making_room_takes_expired_blocks_first_pinned_or_not) {
  // Capacity for 4 blocks: 2 pinned and 1 unpinned with TTLs that run
  // out, 1 live. A spill that needs room takes it from the expired blocks
  // with no expire() sweep, before the live block, and a spill that needs
  // the pinned expired ones' room is not refused. (Before, only the
  // owner's sweep removed expired blocks: the live block was evicted, and
  // once pinned expired blocks filled the tier every spill was refused.)
  auto c = config_with_segments_of(2);
  c.capacity_bytes = 2 * (segment_header_bytes + 2 * rec);
  open(c);
  spill(0, 4096, true, nanos{5'000'000});
  spill(1, 4096, true, nanos{5'000'000});
  spill(2, 4096, false, nanos{5'000'000});
  spill(3);
  settle();
  clock_.set(nanos{6'000'000});
  for (const std::uint64_t i : {8UL, 9UL}) {
    const auto id = spill(i);
    for (const auto& d : settle_expecting({id}))
      if (d.id == id) {
        EXPECT_TRUE(d.status.has_value()) << d.status.error().describe();
      }
  }
  const auto st = tier_->stats();
  EXPECT_EQ(st.expirations, 3U);
  EXPECT_EQ(st.evictions, 0U);
  EXPECT_EQ(st.spills_refused_capacity, 0U);
  for (const std::uint64_t i : {0UL, 1UL, 2UL})
    EXPECT_FALSE(tier_->contains(key_of(i))) << i;
  for (const std::uint64_t i : {3UL, 8UL, 9UL})
    expect_block(i);
}

TEST_F(disk_tier_test, segments_with_few_live_blocks_are_compacted) {
  auto c = config_with_segments_of(4);
  c.compaction_threshold = 0.5;
  open(c);
  for (std::uint64_t i = 0; i < 12; ++i)
    spill(i);
  settle();
  EXPECT_EQ(tier_->stats().segments, 3U);
  const auto before = tier_->stats().file_bytes;
  // Segment 1 keeps one block of four: below the threshold.
  for (std::uint64_t i : {0UL, 1UL, 2UL})
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  auto s = tier_->stats();
  EXPECT_EQ(s.compactions, 1U);
  EXPECT_EQ(s.compaction_bytes_moved, rec);
  // Segment 1 went; its one live block moved to a new segment (the active
  // one was full).
  EXPECT_EQ(s.file_bytes, before - 3 * rec);
  for (std::uint64_t i = 3; i < 12; ++i)
    expect_block(i);
  // Segment 2 keeps two of four: at the threshold, so only compact() with
  // a higher threshold would move it; erasing all of it deletes the file.
  for (std::uint64_t i : {4UL, 5UL, 6UL, 7UL})
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  const auto id = tier_->compact();
  settle();
  s = tier_->stats();
  EXPECT_EQ(s.compactions, 2U);
  (void)id;
  for (std::uint64_t i : {3UL, 8UL, 9UL, 10UL, 11UL})
    expect_block(i);
  EXPECT_EQ(segment_files().size(), s.segments);
}

TEST_F(disk_tier_test, reads_batch_their_accessed_at_updates) {
  auto c = config();
  c.touch_batch = 1000;
  c.touch_flush_interval = std::chrono::hours(1);
  open(c);
  spill(1);
  spill(2);
  settle();
  clock_.advance(nanos{1000});
  for (int k = 0; k < 5; ++k)
    expect_block(1);
  EXPECT_EQ(tier_->stats().touch_flushes, 0U) << "reads did not write";
  tier_->flush();
  settle();
  EXPECT_EQ(tier_->stats().touch_flushes, 1U);
  const auto id = tier_->report(10);
  for (auto& d : settle_expecting({id})) {
    if (d.id != id)
      continue;
    ASSERT_TRUE(d.report);
    ASSERT_EQ(d.report->least_recently_used.size(), 2U);
    EXPECT_EQ(d.report->least_recently_used.back().key, key_of(1));
    EXPECT_EQ(d.report->least_recently_used.back().access_count, 5U);
  }
}

TEST_F(disk_tier_test, operator_report_counts_per_namespace_oldest_and_lru) {
  open(config());
  for (std::uint64_t i = 0; i < 6; ++i) {
    clock_.advance(nanos{10});
    spill(i, 1000, false, nanos{0}, i < 4 ? ns_a : ns_b);
  }
  settle();
  clock_.advance(nanos{10});
  expect_block(0, 1000); // block 0 is now the most recently used
  const auto id = tier_->report(2);
  bool seen = false;
  for (auto& d : settle()) {
    if (d.id != id)
      continue;
    seen = true;
    ASSERT_TRUE(d.status.has_value()) << d.status.error().describe();
    ASSERT_TRUE(d.report);
    const auto& r = *d.report;
    ASSERT_EQ(r.usage.size(), 2U);
    std::uint64_t blocks = 0;
    for (const auto& u : r.usage) {
      EXPECT_EQ(u.tier, storage_tier::disk);
      EXPECT_EQ(u.bytes, u.blocks * 1000);
      if (u.ns == ns_a) {
        EXPECT_EQ(u.blocks, 4U);
      }
      if (u.ns == ns_b) {
        EXPECT_EQ(u.blocks, 2U);
      }
      blocks += u.blocks;
    }
    EXPECT_EQ(blocks, 6U);
    ASSERT_EQ(r.oldest.size(), 2U);
    EXPECT_EQ(r.oldest[0].key, key_of(0));
    EXPECT_EQ(r.oldest[1].key, key_of(1));
    ASSERT_EQ(r.least_recently_used.size(), 2U);
    EXPECT_EQ(r.least_recently_used[0].key, key_of(1));
    EXPECT_EQ(r.least_recently_used[1].key, key_of(2));
  }
  EXPECT_TRUE(seen);
}

// ------------------------------------------------------------- restarts

TEST_F(disk_tier_test, a_reopened_tier_serves_blocks_and_keeps_pins) {
  open(config());
  for (std::uint64_t i = 0; i < 8; ++i)
    spill(i);
  settle();
  ASSERT_TRUE(tier_->pin(key_of(3)).has_value());
  ASSERT_TRUE(tier_->pin(key_of(3)).has_value());
  ASSERT_TRUE(tier_->pin(key_of(4)).has_value());
  EXPECT_EQ(tier_->pinned_blocks(), 2U); // nested pins count one block
  ASSERT_TRUE(tier_->unpin(key_of(4)).has_value());
  ASSERT_TRUE(tier_->pin(key_of(7)).has_value());
  EXPECT_EQ(tier_->pinned_blocks(), 2U);
  ASSERT_TRUE(tier_->erase(key_of(7)).has_value());
  EXPECT_EQ(tier_->pinned_blocks(), 1U);
  settle();
  tier_.reset();
  open(config());
  EXPECT_EQ(tier_->pinned_blocks(), 1U) << "recovered with its pins";
  const auto s = tier_->stats();
  EXPECT_EQ(s.recovered_blocks, 7U);
  EXPECT_EQ(s.torn_tails_dropped, 0U);
  for (std::uint64_t i = 0; i < 7; ++i)
    expect_block(i);
  EXPECT_FALSE(tier_->contains(key_of(7)));
  EXPECT_EQ(tier_->lookup(key_of(3))->pins, 2U);
  EXPECT_EQ(tier_->lookup(key_of(4))->pins, 0U);
  EXPECT_EQ(tier_->lookup(key_of(0))->ns, ns_a);
}

TEST_F(disk_tier_test, a_torn_tail_is_cut_off_and_counted) {
  open(config());
  for (std::uint64_t i = 0; i < 3; ++i)
    spill(i);
  settle();
  tier_.reset();
  const auto segs = segment_files();
  ASSERT_EQ(segs.size(), 1U);
  const auto size = fs::file_size(segs[0]);
  {
    // Half a record header: what a crash in the middle of a write leaves.
    std::ofstream f(segs[0], std::ios::binary | std::ios::app);
    const std::string junk(40, 'x');
    f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
  }
  open(config());
  const auto s = tier_->stats();
  EXPECT_EQ(s.torn_tails_dropped, 1U);
  EXPECT_EQ(s.torn_bytes_dropped, 40U);
  EXPECT_EQ(fs::file_size(segs[0]), size);
  for (std::uint64_t i = 0; i < 3; ++i)
    expect_block(i);
  // New writes follow the recovered ones.
  spill(3);
  settle();
  expect_block(3);
}

TEST_F(disk_tier_test, running_out_of_file_descriptors_is_said_once) {
  // One block per segment. With the open-file limit lowered, the tier
  // warns at open that it cannot hold its capacity's segments; spills
  // that then fail with EMFILE log one line with the remedy, not one per
  // spill (before: one identical line each, no remedy), and count each.
  auto c = config_with_segments_of(1);
  std::string log;
  std::uint64_t errors = 0;
  bool opened = false;
  {
    stderr_log captured;
    {
      // Back to the old limit before the log is read: reading it needs a
      // descriptor.
      const open_file_limit limit(8);
      ASSERT_TRUE(limit.lowered());
      tier_.reset();
      auto t = disk_tier::open(c);
      opened = t.has_value();
      if (opened) {
        tier_ = std::move(*t);
        for (std::uint64_t i = 0; i < 20; ++i)
          (void)tier_->spill(key_of(i), ns_a, codec::int8, block_bytes(i, 4096),
                             block_checksum(block_bytes(i, 4096)), clock_.now(),
                             nanos{0}, false);
        (void)tier_->wait_idle();
        errors = tier_->stats().io_errors;
      }
    }
    log = captured.log();
    ASSERT_TRUE(opened) << log;
  }
  EXPECT_EQ(occurrences(log, "above the open-file limit"), 1U) << log;
  EXPECT_GE(errors, 2U) << log;
  EXPECT_EQ(occurrences(log, "Too many open files"), 1U) << log;
  EXPECT_NE(log.find("ulimit -n"), std::string::npos) << log;
}

TEST_F(disk_tier_test, the_open_file_warning_counts_descriptors_in_use) {
  // Ten segments alone fit a limit of what is open now plus 8, not with
  // the descriptors the process holds (other engines' tiers, say): the
  // open warns. (Before, each tier was weighed alone.)
  auto c = config_with_segments_of(1);
  c.capacity_bytes = segment_header_bytes + 10 * rec;
  std::string log;
  {
    stderr_log captured;
    {
      const open_file_limit limit(8); // 12 segments need more than 8
      ASSERT_TRUE(limit.lowered());
      ASSERT_GT(limit.in_use(), 4U); // and fit in_use + 8 alone
      tier_.reset();
      (void)disk_tier::open(c); // closed at once
    }
    log = captured.log();
  }
  EXPECT_EQ(occurrences(log, "above the open-file limit"), 1U) << log;
  EXPECT_NE(log.find("descriptors the process holds now"), std::string::npos)
      << log;
}

TEST_F(disk_tier_test,
       a_segment_that_cannot_be_opened_stops_the_open_and_is_kept) {
  // One block per segment, so the blocks take many file descriptors.
  auto c = config_with_segments_of(1);
  open(c);
  constexpr std::uint64_t blocks = 64;
  for (std::uint64_t i = 0; i < blocks; ++i)
    spill(i);
  settle();
  tier_.reset();
  ASSERT_EQ(segment_files().size(), blocks);
  // Leave room for the catalog and a few segments, not all of them.
  std::string why;
  {
    const open_file_limit limit(24);
    ASSERT_TRUE(limit.lowered());
    auto starved = disk_tier::open(c); // closed again at the brace
    why = starved ? std::string("opened") : starved.error().describe();
  }
  EXPECT_NE(why.find("nothing was deleted"), std::string::npos) << why;
  EXPECT_NE(why.find("ulimit -n"), std::string::npos) << why;
  // Every segment is still there, and every block with it.
  EXPECT_EQ(segment_files().size(), blocks);
  open(c);
  EXPECT_EQ(tier_->stats().recovered_blocks, blocks);
  for (std::uint64_t i = 0; i < blocks; ++i)
    expect_block(i);
}

TEST_F(disk_tier_test, a_record_size_near_2_64_past_the_last_row_is_torn) {
  // A well-formed record header (valid magic and hash) whose size wrapped
  // record_bytes() to 0: the open looped for ever. It is a torn tail.
  open(config());
  spill(0);
  settle();
  tier_.reset();
  const auto segs = segment_files();
  ASSERT_EQ(segs.size(), 1U);
  const auto size = fs::file_size(segs[0]);
  {
    record_header h;
    h.size = ~std::uint64_t{0} - (record_header_bytes - 1);
    const auto raw = encode_record_header(h);
    std::ofstream f(segs[0], std::ios::binary | std::ios::app);
    f.write(reinterpret_cast<const char*>(raw.data()),
            static_cast<std::streamsize>(raw.size()));
  }
  open(config());
  EXPECT_EQ(tier_->stats().torn_tails_dropped, 1U);
  EXPECT_EQ(fs::file_size(segs[0]), size);
  expect_block(0);
}

TEST_F(disk_tier_test, a_damaged_segment_header_keeps_the_catalogued_blocks) {
  // The file header is written before any record: damaged later, the
  // records (each with its own checked header) still hold the blocks.
  // (Before, the file was deleted at open and all 8 dropped as missing.)
  open(config());
  for (std::uint64_t i = 0; i < 8; ++i)
    spill(i);
  ASSERT_TRUE(tier_->pin(key_of(3)).has_value());
  settle();
  tier_.reset();
  const auto segs = segment_files();
  ASSERT_EQ(segs.size(), 1U);
  {
    std::fstream f(segs[0], std::ios::binary | std::ios::in | std::ios::out);
    f.seekg(20);
    char b = 0;
    f.read(&b, 1);
    b = static_cast<char>(b ^ 0x5a);
    f.seekp(20);
    f.write(&b, 1);
  }
  open(config());
  const auto s = tier_->stats();
  EXPECT_EQ(s.recovered_blocks, 8U);
  EXPECT_EQ(s.missing_dropped, 0U);
  EXPECT_TRUE(fs::exists(segs[0]));
  for (std::uint64_t i = 0; i < 8; ++i)
    expect_block(i);
  EXPECT_EQ(tier_->lookup(key_of(3))->pins, 1U);
  tier_->check_invariants();
}

TEST_F(disk_tier_test, catalog_rows_with_a_damaged_key_are_dropped_for_good) {
  // Keys that are not 16-byte blobs read as the null key: the rows all
  // landed on it, with every row's bytes counted, and came back at each
  // open (erase() of the null key matched none of them).
  open(config());
  for (std::uint64_t i = 0; i < 3; ++i)
    spill(i);
  settle();
  tier_.reset();
  ASSERT_TRUE(catalog_peer(dir_ + "/catalog.sqlite")
                  .exec("UPDATE cache_entries SET key = x'0102' WHERE id = 1;"
                        "UPDATE cache_entries SET namespace = 'ns' "
                        "WHERE id = 2;"));
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round == 0 ? "first open" : "reopened");
    // The second open has nothing to repair: it writes nothing, so it
    // opens while another connection holds the catalog's write lock (an
    // operator's sqlite3 shell), as before this check.
    catalog_peer peer(dir_ + "/catalog.sqlite");
    if (round == 1) {
      ASSERT_TRUE(peer.hold());
    }
    open(config());
    const auto s = tier_->stats();
    EXPECT_EQ(s.missing_dropped, round == 0 ? 2U : 0U);
    EXPECT_EQ(s.recovered_blocks, 1U);
    EXPECT_EQ(s.blocks, 1U);
    EXPECT_FALSE(tier_->contains(block_key{}));
    tier_->check_invariants();
    tier_.reset();
  }
}

TEST_F(disk_tier_test, flipped_bytes_are_reported_missing_and_counted) {
  open(config());
  spill(0);
  spill(1);
  settle();
  tier_.reset();
  const auto segs = segment_files();
  ASSERT_EQ(segs.size(), 1U);
  {
    // Block 0's payload starts after the file and record headers.
    std::fstream f(segs[0], std::ios::binary | std::ios::in | std::ios::out);
    const auto at = static_cast<std::streamoff>(segment_header_bytes +
                                                record_header_bytes + 100);
    f.seekg(at);
    char b = 0;
    f.read(&b, 1);
    b = static_cast<char>(b ^ 0x5a);
    f.seekp(at);
    f.write(&b, 1);
  }
  open(config());
  EXPECT_TRUE(tier_->contains(key_of(0))) << "not verified until read";
  auto c = fetch(0);
  ASSERT_FALSE(c.status.has_value());
  EXPECT_EQ(c.status.error().code, errc::checksum_mismatch);
  EXPECT_TRUE(c.bytes.empty());
  EXPECT_FALSE(tier_->contains(key_of(0)));
  EXPECT_EQ(fetch(0).status.error().code, errc::not_found);
  EXPECT_EQ(tier_->stats().checksum_failures, 1U);
  expect_block(1);
  // The drop is persistent.
  tier_.reset();
  open(config());
  EXPECT_FALSE(tier_->contains(key_of(0)));
}

TEST_F(disk_tier_test,
       catalog_rows_pointing_outside_their_segment_are_dropped) {
  open(config());
  for (std::uint64_t i = 0; i < 4; ++i)
    spill(i);
  settle();
  tier_.reset();
  sqlite3* db = nullptr;
  const std::string path = dir_ + "/catalog.sqlite";
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  // Sizes and offsets near 2^64 (stored as negative SQLite integers) whose
  // sum with a record header wraps into the file's range, and one plainly
  // past its end.
  ASSERT_EQ(sqlite3_exec(db,
                         "UPDATE cache_entries SET size = -1 WHERE id = 1;"
                         "UPDATE cache_entries SET size = -40 WHERE id = 2;"
                         "UPDATE cache_entries SET offset = -8 WHERE id = 3;",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  open(config());
  EXPECT_EQ(tier_->stats().missing_dropped, 3U);
  EXPECT_EQ(tier_->stats().recovered_blocks, 1U);
  std::size_t kept = 0;
  for (std::uint64_t i = 0; i < 4; ++i) {
    if (!tier_->contains(key_of(i))) {
      EXPECT_EQ(fetch(i).status.error().code, errc::not_found);
      continue;
    }
    ++kept;
    expect_block(i);
  }
  EXPECT_EQ(kept, 1U);
}

/// Runs `body` in a forked child (a test that changes process-wide limits)
/// and expects it to exit with status 0; `body` returns the exit status.
void expect_child_succeeds(const std::function<int()>& body) {
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0)
    ::_exit(body());
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status))
      << "child ended by signal "
      << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

using testing::cap_address_space_at;

/// Larger than the 64 MiB glibc reserves per thread arena, which an
/// allocation on the I/O thread could otherwise grow into unlimited.
constexpr std::size_t block_past_arena = std::size_t{96} << 20;

TEST_F(disk_tier_test, a_spill_without_memory_for_its_copy_fails_alone) {
  KVFLEET_SKIP_IF_ADDRESS_SPACE_CANNOT_BE_CAPPED();
  // Child: an address-space limit that leaves no room for the queued copy
  // of a large block. The spill must fail with an error value and the tier
  // go on serving; before, std::bad_alloc escaped spill() into the owner's
  // eviction.
  expect_child_succeeds([this] {
    auto t = disk_tier::open(large_block_config());
    if (!t)
      return 2;
    auto& tier = **t;
    const auto bytes = block_bytes(1, block_past_arena);
    if (!cap_address_space_at(std::uint64_t{16} << 20))
      return 3;
    const auto refused =
        tier.spill(key_of(1), ns_a, codec::int8, bytes, block_checksum(bytes),
                   nanos{1}, nanos{0}, false);
    if (refused.has_value() || refused.error().code != errc::out_of_memory)
      return 4;
    if (tier.contains(key_of(1)))
      return 5;
    const rlimit unlimited{RLIM_INFINITY, RLIM_INFINITY};
    if (::setrlimit(RLIMIT_AS, &unlimited) != 0)
      return 6;
    const auto small = block_bytes(2, 4096);
    if (!tier.spill(key_of(2), ns_a, codec::int8, small, block_checksum(small),
                    nanos{1}, nanos{0}, false))
      return 7;
    (void)tier.wait_idle();
    int code = tier.contains(key_of(2)) ? 0 : 8;
    tier.drain_completions([&](disk_completion&& d) {
      if (!d.status.has_value())
        code = 9;
    });
    return code;
  });
}

TEST_F(disk_tier_test, a_fetch_without_memory_for_its_block_fails_alone) {
  KVFLEET_SKIP_IF_ADDRESS_SPACE_CANNOT_BE_CAPPED();
  // Child: a tier holding one large block, then an address-space limit that
  // leaves no room for a copy of it. The fetch must fail with an error
  // value; before, std::bad_alloc ended the process on the I/O thread.
  expect_child_succeeds([this] {
    auto t = disk_tier::open(large_block_config());
    if (!t)
      return 2;
    auto& tier = **t;
    {
      const auto bytes = block_bytes(1, block_past_arena);
      if (!tier.spill(key_of(1), ns_a, codec::int8, bytes,
                      block_checksum(bytes), nanos{1}, nanos{0}, false))
        return 3;
    }
    (void)tier.wait_idle();
    // A second round trip: the I/O thread frees a batch's requests (the
    // spill's copy of the block) only after it reports idle.
    (void)tier.fetch(key_of(2));
    (void)tier.wait_idle();
    tier.drain_completions([](disk_completion&&) {});
    if (!cap_address_space_at(std::uint64_t{16} << 20))
      return 4;
    const auto id = tier.fetch(key_of(1));
    (void)tier.wait_idle();
    int code = 5;
    tier.drain_completions([&](disk_completion&& d) {
      if (d.id == id && !d.status.has_value() &&
          d.status.error().code == errc::out_of_memory && d.bytes.empty())
        code = 0;
    });
    return code;
  });
  // The block is still there for a process with memory.
  open(config());
  EXPECT_TRUE(tier_->contains(key_of(1)));
}

TEST_F(disk_tier_test, a_killed_writer_loses_only_unacknowledged_blocks) {
  constexpr std::uint64_t total = 400;
  constexpr std::size_t size = 64 * 1024;
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Child: spill as fast as possible, reporting each acknowledged block.
    ::close(fds[0]);
    disk_tier_config c;
    c.directory = dir_;
    c.capacity_bytes = std::uint64_t{1} << 30;
    c.segment_bytes = std::uint64_t{4} << 20;
    c.max_batch = 4;
    auto t = disk_tier::open(c);
    if (!t)
      ::_exit(2);
    auto& tier = **t;
    std::uint64_t in_flight = 0;
    auto report = [&](disk_completion&& d) {
      --in_flight;
      if (!d.status.has_value())
        ::_exit(3);
      const std::uint64_t i = d.key.hi - 1;
      if (::write(fds[1], &i, sizeof i) != sizeof i)
        ::_exit(4);
    };
    for (std::uint64_t i = 0; i < total; ++i) {
      const auto bytes = block_bytes(i, size);
      if (!tier.spill(key_of(i), ns_a, codec::int8, bytes,
                      block_checksum(bytes), nanos{1}, nanos{0}, false))
        ::_exit(5);
      ++in_flight;
      tier.drain_completions(report);
      if (in_flight > 16) {
        (void)tier.wait_idle();
        tier.drain_completions(report);
      }
    }
    (void)tier.wait_idle();
    tier.drain_completions(report);
    ::_exit(0);
  }
  ::close(fds[1]);
  std::set<std::uint64_t> acked;
  std::uint64_t i = 0;
  while (acked.size() < 40 && ::read(fds[0], &i, sizeof i) == sizeof i)
    acked.insert(i);
  ::kill(pid, SIGKILL);
  while (::read(fds[0], &i, sizeof i) == sizeof i)
    acked.insert(i);
  ::close(fds[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_GE(acked.size(), 40U) << "child status " << status;

  open(config());
  const auto s = tier_->stats();
  EXPECT_GE(s.recovered_blocks, acked.size());
  for (const std::uint64_t k : acked)
    expect_block(k, size);
  std::uint64_t served = 0;
  for (std::uint64_t k = 0; k < total; ++k) {
    auto c = fetch(k);
    if (c.status.has_value()) {
      EXPECT_TRUE(c.bytes == block_bytes(k, size)) << k;
      ++served;
    } else {
      EXPECT_EQ(c.status.error().code, errc::not_found) << k;
      EXPECT_EQ(acked.count(k), 0U) << k;
    }
  }
  EXPECT_EQ(served, s.recovered_blocks);
  EXPECT_EQ(tier_->stats().checksum_failures, 0U);
}

// ------------------------------------------------------------- bad input

TEST_F(disk_tier_test, a_missing_directory_is_a_clear_error) {
  auto c = config();
  c.directory = dir_ + "/nope";
  auto t = disk_tier::open(c);
  ASSERT_FALSE(t.has_value());
  EXPECT_NE(t.error().message.find(c.directory), std::string::npos);
  EXPECT_NE(t.error().message.find("does not exist"), std::string::npos);
  EXPECT_NE(t.error().message.find("mkdir -p"), std::string::npos);
}

TEST_F(disk_tier_test, a_file_instead_of_a_directory_is_a_clear_error) {
  auto c = config();
  c.directory = dir_ + "/file";
  std::ofstream(c.directory) << "x";
  auto t = disk_tier::open(c);
  ASSERT_FALSE(t.has_value());
  EXPECT_NE(t.error().message.find("is not a directory"), std::string::npos);
}

TEST_F(disk_tier_test, an_unwritable_directory_is_a_clear_error) {
  auto c = config();
  if (::geteuid() == 0) {
    // Root ignores permission bits; sysfs refuses new files even to root.
    c.directory = "/sys";
  } else {
    c.directory = dir_ + "/ro";
    fs::create_directory(c.directory);
    fs::permissions(c.directory, fs::perms::owner_read | fs::perms::owner_exec);
  }
  auto t = disk_tier::open(c);
  ASSERT_FALSE(t.has_value());
  EXPECT_NE(t.error().message.find(c.directory), std::string::npos);
  EXPECT_NE(t.error().message.find("not writable"), std::string::npos);
}

// The write path fills the file system until ENOSPC, so a node whose disk
// filled restarts with less than min_free_bytes free. Before, open refused
// such a directory ("is full"), and the engine could not start. It opens
// full: spills refused, reads served, spills accepted again once
// min_free_bytes are free.
TEST_F(disk_tier_test, a_full_directory_opens_refusing_spills_serving_reads) {
  auto c = config();
  open(c);
  spill(0);
  spill(1);
  settle();
  tier_.reset();
  auto watch = retry_watch::fast(c);
  // All the file system holds: statvfs finds the directory full.
  c.min_free_bytes = file_system_bytes();
  auto free_bytes = std::make_shared<std::atomic<std::uint64_t>>(0);
  c.free_bytes_for_testing = [free_bytes] { return free_bytes->load(); };
  c.reserve_free_bytes_for_testing = [free_bytes] {
    return free_bytes->load() + (std::uint64_t{1} << 20);
  };
  stderr_log err;
  open(c);
  ASSERT_TRUE(tier_) << "a full directory was refused";
  EXPECT_TRUE(tier_->stats().full);
  const auto bytes = block_bytes(2, 4096);
  const auto refused =
      tier_->spill(key_of(2), ns_a, codec::int8, bytes, block_checksum(bytes),
                   clock_.now(), nanos{0}, false);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, errc::out_of_memory);
  expect_block(0);
  expect_block(1);
  ASSERT_TRUE(watch->failed(1)) << "a full tier never looked again";
  EXPECT_TRUE(tier_->stats().full);
  free_bytes->store(c.min_free_bytes);
  EXPECT_TRUE(watch->converged()) << "spills stay refused though space came";
  EXPECT_FALSE(tier_->stats().full);
  spill(2);
  settle();
  expect_block(2);
  const std::string log = err.log();
  EXPECT_EQ(occurrences(log, "the file system is full at open"), 1U) << log;
  EXPECT_NE(log.find(dir_), std::string::npos) << log;
}

// The open log line says to free space or lower capacity_bytes. A tier
// opened full that holds more than its capacity evicts (least recently
// used first) and compacts down to it from its first pass, and the space
// its unlinks free lets spills in again. Before, eviction ran only for a
// spill, which a full tier refuses: it stayed over capacity and full for
// good.
TEST_F(disk_tier_test, a_tier_opened_full_over_capacity_shrinks_and_accepts) {
  auto c = config_with_segments_of(4);
  open(c);
  for (std::uint64_t i = 0; i < 12; ++i)
    spill(i);
  settle();
  ASSERT_EQ(tier_->stats().blocks, 12U);
  tier_.reset();
  // The file system stays full as statvfs sees it: only the tier's own
  // unlinks free space.
  c.min_free_bytes = file_system_bytes(); // statvfs: full at open
  c.free_bytes_for_testing = [] { return std::uint64_t{0}; };
  // What the unlinks freed, seen by the spill after them.
  c.reserve_free_bytes_for_testing = [m = c.min_free_bytes] {
    return m + (std::uint64_t{1} << 20);
  };
  c.capacity_bytes = segment_header_bytes + 4 * rec; // lowered
  open(c);
  ASSERT_TRUE(tier_->stats().full);
  const auto id = tier_->flush();
  settle_expecting({id});
  auto s = tier_->stats();
  EXPECT_LE(s.file_bytes, c.capacity_bytes) << "over capacity for good";
  EXPECT_GE(s.evictions, 9U);
  EXPECT_FALSE(s.full) << "full for good";
  spill(20);
  settle();
  expect_block(20);
  EXPECT_LE(tier_->stats().file_bytes, c.capacity_bytes);
}

// min_free_bytes is a reserve the tier keeps while it writes: a spill that
// would leave less free is refused before any byte is written, the tier
// turns full (logged once, naming min_free_bytes), and it accepts spills
// again once the space is back. Before, spills filled the file system
// until a write failed. 0 turns the reserve off.
TEST_F(disk_tier_test, a_spill_leaves_min_free_bytes_free) {
  auto c = config();
  c.min_free_bytes = 64 << 10;
  auto watch = retry_watch::fast(c);
  auto free_bytes = std::make_shared<std::atomic<std::uint64_t>>(1 << 30);
  c.free_bytes_for_testing = [free_bytes] { return free_bytes->load(); };
  c.reserve_free_bytes_for_testing = [free_bytes] {
    return free_bytes->load();
  };
  open(c);
  spill(0);
  settle();
  const auto written = tier_->stats().file_bytes;
  stderr_log err;
  // Room for min_free_bytes and 1000 bytes more: a 4 KiB block does not fit.
  free_bytes->store(c.min_free_bytes + 1000);
  const auto id = spill(1);
  for (const auto& d : settle_expecting({id}))
    if (d.id == id) {
      ASSERT_FALSE(d.status.has_value());
      EXPECT_EQ(d.status.error().code, errc::out_of_memory);
      EXPECT_NE(d.status.error().message.find("min_free_bytes"),
                std::string::npos)
          << d.status.error().describe();
    }
  auto s = tier_->stats();
  EXPECT_TRUE(s.full);
  EXPECT_EQ(s.spills_refused_full, 1U);
  EXPECT_EQ(s.file_bytes, written) << "the refused spill wrote bytes";
  EXPECT_FALSE(tier_->contains(key_of(1)));
  expect_block(0);
  EXPECT_EQ(occurrences(err.log(), "min_free_bytes (65536)"), 1U) << err.log();
  free_bytes->store(1 << 30);
  EXPECT_TRUE(watch->converged()) << "spills stay refused though space came";
  EXPECT_FALSE(tier_->stats().full);
  spill(1);
  settle();
  expect_block(1);
  tier_.reset();

  c.min_free_bytes = 0; // no reserve: spills go on to the last byte
  free_bytes->store(0);
  open(c);
  spill(2);
  settle();
  expect_block(2);
  EXPECT_FALSE(tier_->stats().full);
}

// A full tier looks at its file system's free inodes too: with bytes free
// but no inode, the next segment could not be created, so spills stay
// refused until an inode is free again.
TEST_F(disk_tier_test, a_full_tier_waits_for_a_free_inode_too) {
  auto c = config();
  c.min_free_bytes = 64 << 10;
  auto watch = retry_watch::fast(c);
  auto free_bytes = std::make_shared<std::atomic<std::uint64_t>>(1 << 30);
  auto inode = std::make_shared<std::atomic<bool>>(true);
  c.free_bytes_for_testing = [free_bytes] { return free_bytes->load(); };
  c.inode_free_for_testing = [inode] { return inode->load(); };
  c.reserve_free_bytes_for_testing = [free_bytes] {
    return free_bytes->load();
  };
  open(c);
  stderr_log err;
  free_bytes->store(c.min_free_bytes + 1000); // full: the reserve refuses
  const auto id = spill(1);
  (void)settle_expecting({id});
  ASSERT_TRUE(tier_->stats().full);
  inode->store(false);
  free_bytes->store(1 << 30);
  std::size_t seen = 0;
  {
    std::lock_guard lk(watch->mu);
    seen = watch->delays.size();
  }
  ASSERT_TRUE(watch->passes(seen + 3));
  EXPECT_TRUE(tier_->stats().full) << "spills taken with no inode free";
  inode->store(true);
  EXPECT_TRUE(watch->converged());
  EXPECT_FALSE(tier_->stats().full);
  spill(1);
  settle();
  expect_block(1);
}

// A tier at its capacity: a spill the reserve refuses evicts and compacts
// nothing (before, make_room threw out a tenth of the tier and wrote
// compaction copies into the reserve, for a spill then refused), and only
// a look at the free space, not the bytes a later unlink frees, lets
// spills in again.
TEST_F(disk_tier_test, a_spill_the_reserve_refuses_evicts_nothing) {
  auto c = config_with_segments_of(4);
  c.capacity_bytes = 2 * c.segment_bytes;
  c.min_free_bytes = 64 << 10;
  auto free_bytes = std::make_shared<std::atomic<std::uint64_t>>(1 << 30);
  c.free_bytes_for_testing = [free_bytes] { return free_bytes->load(); };
  c.reserve_free_bytes_for_testing = [free_bytes] {
    return free_bytes->load();
  };
  auto evicted = std::make_shared<std::atomic<int>>(0);
  c.on_evict_for_testing = [evicted](const block_key&) { ++*evicted; };
  open(c);
  for (std::uint64_t i = 0; i < 8; ++i)
    spill(i);
  settle();
  ASSERT_EQ(*evicted, 0);
  ASSERT_EQ(tier_->stats().blocks, 8U);
  free_bytes->store(c.min_free_bytes + 1000);
  const auto id = spill(100);
  for (const auto& d : settle_expecting({id}))
    if (d.id == id) {
      EXPECT_FALSE(d.status.has_value());
    }
  EXPECT_EQ(*evicted, 0) << "evicted for a spill that was then refused";
  EXPECT_EQ(tier_->stats().blocks, 8U);
  EXPECT_TRUE(tier_->stats().full);
  // An erase unlinks a segment's worth: the reserve is still short.
  for (std::uint64_t i = 0; i < 4; ++i)
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  EXPECT_TRUE(tier_->stats().full) << "let in by the bytes an unlink freed";
  for (std::uint64_t i = 0; i < 8; ++i)
    if (i >= 4) {
      expect_block(i);
    }
}

// A spill whose room-making compacts is held to the reserve again after
// the compaction's copies: the file system here is simulated, its free
// space what it had less what the directory holds, so the copies eat into
// it. Before, only the first look counted, and the spill went on below
// min_free_bytes.
TEST_F(disk_tier_test, a_spill_is_held_to_the_reserve_after_its_compaction) {
  auto c = config_with_segments_of(4);
  c.capacity_bytes = 2 * c.segment_bytes;
  c.compaction_threshold = 0.0; // no compaction but make_room's
  c.min_free_bytes = 64 << 10;
  const std::string dir = c.directory;
  const auto dir_bytes = [dir] {
    std::uint64_t n = 0;
    for (const auto& f : fs::directory_iterator(dir))
      if (f.is_regular_file())
        n += f.file_size();
    return n;
  };
  auto total = std::make_shared<std::atomic<std::uint64_t>>(1ULL << 40);
  c.reserve_free_bytes_for_testing = [total, dir_bytes] {
    return total->load() - dir_bytes();
  };
  open(c);
  for (std::uint64_t i = 0; i < 8; ++i)
    spill(i);
  settle();
  for (std::uint64_t i : {0UL, 1UL, 2UL})
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  ASSERT_EQ(tier_->stats().compactions, 0U);
  // Room for the spill and a new segment's header on top of the reserve,
  // not for the block the compaction copies too.
  total->store(dir_bytes() + c.min_free_bytes + rec + segment_header_bytes +
               16);
  const auto id = spill(100);
  for (const auto& d : settle_expecting({id}))
    if (d.id == id) {
      ASSERT_FALSE(d.status.has_value()) << "spilled below the reserve";
      EXPECT_NE(d.status.error().message.find("min_free_bytes"),
                std::string::npos)
          << d.status.error().describe();
    }
  const auto st = tier_->stats();
  EXPECT_EQ(st.compactions, 1U) << "make_room did not compact";
  EXPECT_EQ(st.spills_refused_full, 1U);
  // The commit unlinked the compacted segment, which freed more than the
  // spill needs: spills are let in again.
  EXPECT_FALSE(st.full);
  for (std::uint64_t i = 3; i < 8; ++i)
    expect_block(i);
}

// No file system has min_free_bytes free when it is larger than the file
// system: the tier would open full and stay full. Before, it did.
TEST_F(disk_tier_test, a_min_free_bytes_past_the_file_system_is_refused) {
  auto c = config();
  c.min_free_bytes = std::uint64_t{1} << 62;
  auto t = disk_tier::open(c);
  ASSERT_FALSE(t.has_value()) << "opened full for good";
  EXPECT_EQ(t.error().code, errc::invalid_argument);
  EXPECT_NE(t.error().message.find("min_free_bytes"), std::string::npos)
      << t.error().describe();
}

TEST_F(disk_tier_test, a_relative_directory_starting_with_file_is_no_uri) {
  // SQLite takes a name starting with "file:" for a URI: "file:plain" did
  // not open, and "file:q?x" wrote its catalog to ./q, outside the
  // directory, where it stayed.
  const auto cwd = fs::current_path();
  fs::current_path(dir_);
  for (const std::string d : {"file:plain", "file:q?x"}) {
    fs::create_directory(d);
    auto c = config();
    c.directory = d;
    {
      auto t = disk_tier::open(c);
      EXPECT_TRUE(t.has_value()) << d << ": " << t.error().describe();
    }
    EXPECT_TRUE(fs::exists(d + "/catalog.sqlite")) << d;
  }
  EXPECT_FALSE(fs::exists("q"));
  fs::current_path(cwd);
}

/// Expects open() of `c` to fail with a message holding each of `parts`.
void expect_open_error(const disk_tier_config& c,
                       std::initializer_list<std::string> parts) {
  auto t = disk_tier::open(c);
  ASSERT_FALSE(t.has_value()) << "opened";
  for (const auto& part : parts) {
    EXPECT_NE(t.error().message.find(part), std::string::npos)
        << part << " in: " << t.error().message;
  }
}

/// The skip message of a root test that could not drop its capabilities.
constexpr const char* cannot_drop_caps =
    "running as root and CAP_DAC_OVERRIDE could not be dropped: permission "
    "bits do not apply to this process";

// The errors that named a path gave no remedy. Each case that needs
// permission bits runs as root too: the check drops root's capabilities.
TEST_F(disk_tier_test, a_directory_that_cannot_be_accessed_says_what_to_do) {
  auto c = config();
  std::ofstream(dir_ + "/file") << "x";
  c.directory = dir_ + "/file/data";
  expect_open_error(c, {c.directory, "cannot be accessed", "Not a directory",
                        "not a directory: fix the path"});
  fs::create_directory(dir_ + "/locked");
  fs::create_directory(dir_ + "/locked/data");
  fs::permissions(dir_ + "/locked", fs::perms::none);
  c.directory = dir_ + "/locked/data";
  bool bits_apply = false;
  {
    permission_bits_apply as_user;
    bits_apply = as_user.ok();
    if (bits_apply)
      expect_open_error(c, {c.directory, "cannot be accessed",
                            "Permission denied", "search (x) permission"});
  }
  fs::permissions(dir_ + "/locked", fs::perms::owner_all);
  if (!bits_apply)
    GTEST_SKIP() << "the permission case: " << cannot_drop_caps;
}

TEST_F(disk_tier_test, a_lock_file_that_cannot_be_opened_says_what_to_do) {
  fs::create_directory(dir_ + "/LOCK");
  expect_open_error(config(), {dir_ + "/LOCK", "Is a directory",
                               "is not a file: move it aside"});
  fs::remove(dir_ + "/LOCK");
  std::ofstream(dir_ + "/LOCK").put('\0');
  fs::permissions(dir_ + "/LOCK", fs::perms::owner_read);
  permission_bits_apply as_user;
  if (!as_user.ok())
    GTEST_SKIP() << cannot_drop_caps;
  expect_open_error(config(), {dir_ + "/LOCK", "Permission denied",
                               "read and write permission"});
}

TEST_F(disk_tier_test, a_segment_that_cannot_be_opened_says_what_to_do) {
  open(config());
  spill(0);
  settle();
  tier_.reset();
  const auto seg = segment_files().at(0);
  // A directory with a segment's name.
  const std::string odd = dir_ + "/" + segment_file_name(99);
  fs::create_directory(odd);
  expect_open_error(
      config(), {odd, "Is a directory", "move it out", "nothing was deleted"});
  fs::remove(odd);
  fs::permissions(seg, fs::perms::owner_read);
  bool bits_apply = false;
  {
    permission_bits_apply as_user;
    bits_apply = as_user.ok();
    if (bits_apply)
      expect_open_error(config(),
                        {seg.string(), "Permission denied",
                         "read and write permission", "nothing was deleted"});
  }
  fs::permissions(seg, fs::perms::owner_read | fs::perms::owner_write);
  open(config());
  expect_block(0);
  if (!bits_apply)
    GTEST_SKIP() << "the permission case: " << cannot_drop_caps;
}

TEST_F(disk_tier_test, a_catalog_that_cannot_be_opened_says_what_to_do) {
  const std::string cat = dir_ + "/catalog.sqlite";
  fs::create_directory(cat);
  expect_open_error(config(),
                    {cat, "cannot open", "is not a file: move it aside"});
  fs::remove(cat);
  std::ofstream(cat).put('\0');
  fs::permissions(cat, fs::perms::none);
  permission_bits_apply as_user;
  if (!as_user.ok())
    GTEST_SKIP() << cannot_drop_caps;
  expect_open_error(config(), {cat, "cannot open",
                               "read and write "
                               "permission"});
}

// SQLite opens a catalog it may not write read-only without a word, and
// one whose -wal and -shm files it may not write as well. The tier opened,
// and then every spill failed ("attempt to write a readonly database"),
// only counted. The open refuses it now, saying what to do.
TEST_F(disk_tier_test, a_catalog_the_user_cannot_write_is_refused_at_open) {
  open(config());
  spill(0);
  settle();
  tier_.reset();
  const std::string cat = dir_ + "/catalog.sqlite";
  fs::permissions(cat, fs::perms::owner_read | fs::perms::group_read |
                           fs::perms::others_read); // 0444
  {
    permission_bits_apply as_user;
    if (!as_user.ok())
      GTEST_SKIP() << cannot_drop_caps;
    expect_open_error(config(),
                      {cat, "read-only", "give that user write permission"});
  }
  fs::permissions(cat, fs::perms::owner_read | fs::perms::owner_write);
  // The file is writable, but not its -wal and -shm files (left by an
  // operator's sqlite3 shell run as another user, say): as read-only.
  for (const char* suffix : {"-wal", "-shm"}) {
    std::ofstream(cat + suffix).flush();
    fs::permissions(cat + suffix, fs::perms::owner_read);
  }
  {
    permission_bits_apply as_user;
    ASSERT_TRUE(as_user.ok());
    expect_open_error(config(), {cat, "read-only", "-wal and -shm files"});
  }
  for (const char* suffix : {"-wal", "-shm"})
    fs::permissions(cat + suffix,
                    fs::perms::owner_read | fs::perms::owner_write);
  open(config());
  expect_block(0);
  spill(1);
  settle();
  expect_block(1);
}

TEST_F(disk_tier_test, a_catalog_of_another_format_version_is_refused) {
  open(config());
  tier_.reset();
  sqlite3* db = nullptr;
  const std::string path = dir_ + "/catalog.sqlite";
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db,
                         "UPDATE meta SET value = 999 WHERE name = "
                         "'format_version'",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  auto t = disk_tier::open(config());
  ASSERT_FALSE(t.has_value());
  EXPECT_EQ(t.error().code, errc::parse_error);
  EXPECT_NE(t.error().message.find(path), std::string::npos);
  EXPECT_NE(t.error().message.find("format version 999"), std::string::npos);
  EXPECT_NE(t.error().message.find("move the directory aside"),
            std::string::npos);
}

// The version after this build's (a newer build's catalog) is refused the
// same way, and the open changes nothing in it.
TEST_F(disk_tier_test, a_catalog_of_the_next_format_version_is_refused) {
  open(config());
  spill(1);
  settle();
  tier_.reset();
  ASSERT_NO_FATAL_FAILURE(testing::rewrite_catalog(
      dir_, "UPDATE meta SET value = 4 WHERE name = 'format_version';"));
  auto t = disk_tier::open(config());
  ASSERT_FALSE(t.has_value());
  EXPECT_EQ(t.error().code, errc::parse_error);
  const std::string& m = t.error().message;
  for (const char* part : {"catalog.sqlite", "format version 4",
                           "reads versions 1 to 3", "move the directory aside",
                           "run a kvfleet build that reads that version"}) {
    EXPECT_NE(m.find(part), std::string::npos) << part << " in: " << m;
  }
  catalog_peer peer(dir_ + "/catalog.sqlite");
  EXPECT_EQ(peer.query("SELECT value FROM meta WHERE name = 'format_version'"),
            4);
  EXPECT_EQ(peer.query("SELECT count(*) FROM cache_entries"), 1);
}

TEST_F(disk_tier_test, a_spill_keeps_its_size_partition_across_a_restart) {
  open(config());
  const auto bytes = block_bytes(1, 4096);
  ASSERT_TRUE(tier_
                  ->spill(key_of(1), ns_a, codec::int8, bytes,
                          block_checksum(bytes), clock_.now(), nanos{0}, false,
                          size_partition::large)
                  .has_value());
  spill(2); // no partition given
  settle();
  ASSERT_TRUE(tier_->lookup(key_of(1)).has_value());
  EXPECT_EQ(tier_->lookup(key_of(1))->part, size_partition::large);
  EXPECT_FALSE(tier_->lookup(key_of(2))->part.has_value());
  open(config());
  ASSERT_TRUE(tier_->lookup(key_of(1)).has_value());
  EXPECT_EQ(tier_->lookup(key_of(1))->part, size_partition::large);
  EXPECT_FALSE(tier_->lookup(key_of(2))->part.has_value());
  expect_block(1);
}

// The catalog records each block's request priority (format version 3), so
// the store can bring a block back ranking as it left. Before, the tier
// kept none: a critical block came back at the asking call's priority.
TEST_F(disk_tier_test, a_spill_keeps_its_priority_across_a_restart) {
  open(config());
  ASSERT_TRUE(spill_ranked(1, size_partition::medium, priority::critical));
  spill(2); // no priority given
  settle();
  ASSERT_TRUE(tier_->lookup(key_of(1)).has_value());
  EXPECT_EQ(tier_->lookup(key_of(1))->prio, priority::critical);
  EXPECT_FALSE(tier_->lookup(key_of(2))->prio.has_value());
  open(config());
  ASSERT_TRUE(tier_->lookup(key_of(1)).has_value());
  EXPECT_EQ(tier_->lookup(key_of(1))->prio, priority::critical);
  EXPECT_EQ(tier_->lookup(key_of(1))->part, size_partition::medium);
  EXPECT_FALSE(tier_->lookup(key_of(2))->prio.has_value());
  expect_block(1);
  tier_.reset();
  catalog_peer peer(dir_ + "/catalog.sqlite");
  EXPECT_EQ(peer.query("SELECT priority FROM cache_entries WHERE priority "
                       "IS NOT NULL"),
            static_cast<std::int64_t>(priority::critical));
}

// A directory a version 2 build wrote (no priority column) opens: the
// catalog is upgraded to version 3 in place, its blocks read back with their
// partitions and no priority known (NULL), and spills from then on record
// theirs.
TEST_F(disk_tier_test, a_version_2_catalog_is_upgraded_at_open) {
  open(config());
  ASSERT_TRUE(spill_ranked(1, size_partition::large, priority::high));
  settle();
  tier_.reset();
  ASSERT_NO_FATAL_FAILURE(testing::make_catalog_v2(dir_));
  open(config());
  ASSERT_TRUE(tier_->lookup(key_of(1)).has_value());
  EXPECT_EQ(tier_->lookup(key_of(1))->part, size_partition::large);
  EXPECT_FALSE(tier_->lookup(key_of(1))->prio.has_value());
  expect_block(1);
  ASSERT_TRUE(spill_ranked(2, size_partition::small, priority::low));
  settle();
  tier_.reset();
  {
    catalog_peer peer(dir_ + "/catalog.sqlite");
    EXPECT_EQ(peer.query("SELECT value FROM meta WHERE name = "
                         "'format_version'"),
              3);
    EXPECT_EQ(peer.query("SELECT count(*) FROM cache_entries WHERE "
                         "priority IS NULL"),
              1);
  }
  open(config());
  EXPECT_EQ(tier_->lookup(key_of(2))->prio, priority::low);
  EXPECT_FALSE(tier_->lookup(key_of(1))->prio.has_value());
  EXPECT_EQ(tier_->lookup(key_of(1))->part, size_partition::large);
  expect_block(1);
  expect_block(2);
}

// A directory a version 1 build wrote (no size_partition column) opens: the
// catalog is upgraded to version 3 (both columns added in one step), its
// blocks read back with no partition or priority known, and spills from
// then on record theirs.
TEST_F(disk_tier_test, a_version_1_catalog_is_upgraded_at_open) {
  open(config());
  spill(1);
  settle();
  tier_.reset();
  ASSERT_NO_FATAL_FAILURE(testing::make_catalog_v1(dir_));
  open(config());
  ASSERT_TRUE(tier_->lookup(key_of(1)).has_value());
  EXPECT_FALSE(tier_->lookup(key_of(1))->part.has_value());
  EXPECT_FALSE(tier_->lookup(key_of(1))->prio.has_value());
  expect_block(1);
  ASSERT_TRUE(spill_ranked(2, size_partition::medium, priority::high));
  settle();
  tier_.reset();
  {
    catalog_peer peer(dir_ + "/catalog.sqlite");
    EXPECT_EQ(peer.query("SELECT value FROM meta WHERE name = "
                         "'format_version'"),
              std::int64_t{disk_format_version});
    EXPECT_EQ(peer.query("SELECT count(*) FROM cache_entries WHERE "
                         "size_partition IS NULL"),
              1);
    EXPECT_EQ(peer.query("SELECT count(*) FROM cache_entries WHERE "
                         "priority IS NULL"),
              1);
  }
  open(config());
  EXPECT_EQ(tier_->lookup(key_of(2))->part, size_partition::medium);
  EXPECT_EQ(tier_->lookup(key_of(2))->prio, priority::high);
  EXPECT_FALSE(tier_->lookup(key_of(1))->part.has_value());
  EXPECT_FALSE(tier_->lookup(key_of(1))->prio.has_value());
  expect_block(1);
  expect_block(2);
}

// A catalog of an older version that cannot be upgraded (here: the file
// system is full) fails the open with a message that says so and why, and
// is left at its version for the next open to upgrade. Before, the message
// blamed permissions ("check that the directory is writable"), and a
// version 2 catalog could not fail an upgrade: there was none.
class disk_tier_failed_upgrade_test
    : public disk_tier_test,
      public ::testing::WithParamInterface<int> {};

TEST_P(disk_tier_failed_upgrade_test, says_why_and_leaves_the_version) {
  const int version = GetParam();
  open(config());
  spill(1);
  settle();
  tier_.reset();
  if (version == 1) {
    ASSERT_NO_FATAL_FAILURE(testing::make_catalog_v1(dir_));
  } else {
    ASSERT_NO_FATAL_FAILURE(testing::make_catalog_v2(dir_));
  }
  auto c = config();
  std::vector<std::string> asked;
  c.catalog_fault_for_testing = [&asked](const std::string& what) {
    asked.push_back(what);
    return what.rfind("upgrade to format version", 0) == 0 ? ENOSPC : 0;
  };
  {
    auto t = disk_tier::open(c);
    ASSERT_FALSE(t.has_value()) << "opened although the upgrade failed";
    EXPECT_EQ(t.error().code, errc::out_of_memory);
    const std::string& m = t.error().message;
    const std::string at = "at format version " + std::to_string(version);
    const std::string left = "left at version " + std::to_string(version);
    const std::string added = version == 1
                                  ? "size_partition and priority columns"
                                  : "priority column";
    for (const std::string& part :
         {std::string("catalog.sqlite"), at,
          std::string("could not be "
                      "upgraded"),
          std::string("to version 3"), added, left, std::string("full"),
          std::string("SQLITE_FULL"), std::string("free space")}) {
      EXPECT_NE(m.find(part), std::string::npos) << part << " in: " << m;
    }
    EXPECT_EQ(m.find("writable"), std::string::npos) << m;
  }
  ASSERT_EQ(asked.size(), 1U);
  EXPECT_EQ(asked[0], "upgrade to format version 3");
  {
    catalog_peer peer(dir_ + "/catalog.sqlite");
    EXPECT_EQ(peer.query("SELECT value FROM meta WHERE name = "
                         "'format_version'"),
              version);
    // Nothing of the upgrade stayed: the columns it adds are not there.
    EXPECT_EQ(peer.query("SELECT count(*) FROM pragma_table_info("
                         "'cache_entries') WHERE name = 'priority'"),
              0);
    EXPECT_EQ(peer.query("SELECT count(*) FROM pragma_table_info("
                         "'cache_entries') WHERE name = 'size_partition'"),
              version == 1 ? 0 : 1);
  }
  open(config()); // space freed: the upgrade goes through
  expect_block(1);
  tier_.reset();
  catalog_peer peer(dir_ + "/catalog.sqlite");
  EXPECT_EQ(peer.query("SELECT value FROM meta WHERE name = 'format_version'"),
            3);
}

// An upgrade that fails after its first step: a version 1 catalog that
// somehow has a priority column already, so adding size_partition works
// and adding priority fails. The upgrade is one transaction: the open
// fails saying why, and size_partition is gone again, the version still 1.
TEST_F(disk_tier_test, an_upgrade_failing_halfway_leaves_nothing_behind) {
  open(config());
  spill(1);
  settle();
  tier_.reset();
  ASSERT_NO_FATAL_FAILURE(testing::make_catalog_v1(dir_));
  {
    catalog_peer peer(dir_ + "/catalog.sqlite");
    ASSERT_TRUE(
        peer.exec("ALTER TABLE cache_entries ADD COLUMN priority INTEGER;"));
  }
  auto t = disk_tier::open(config());
  ASSERT_FALSE(t.has_value()) << "opened although the upgrade failed";
  EXPECT_EQ(t.error().code, errc::io_error);
  for (const std::string part :
       {"at format version 1", "could not be upgraded to version 3",
        "size_partition and priority columns", "duplicate column",
        "left at version 1"}) {
    EXPECT_NE(t.error().message.find(part), std::string::npos)
        << part << " in: " << t.error().message;
  }
  catalog_peer peer(dir_ + "/catalog.sqlite");
  EXPECT_EQ(peer.query("SELECT value FROM meta WHERE name = 'format_version'"),
            1);
  EXPECT_EQ(peer.query("SELECT count(*) FROM pragma_table_info("
                       "'cache_entries') WHERE name = 'size_partition'"),
            0);
}

INSTANTIATE_TEST_SUITE_P(versions, disk_tier_failed_upgrade_test,
                         ::testing::Values(1, 2),
                         [](const ::testing::TestParamInfo<int>& i) {
                           return "version_" + std::to_string(i.param);
                         });

// A record that cannot be read (an I/O error; here the segment was cut
// short under the tier's mapping, which reads as SIGBUS) is lost: the
// block is dropped and counted, and compaction drops it and goes on.
// Before, only a checksum failure dropped a block: the unreadable one
// stayed, failing every fetch, and its segment was never compacted.
TEST_F(disk_tier_test, an_unreadable_record_is_dropped_and_compacted_away) {
  open(config_with_segments_of(8));
  for (std::uint64_t i = 0; i < 6; ++i)
    spill(i);
  settle();
  expect_block(0); // the segment is mapped
  const auto segs = segment_files();
  ASSERT_EQ(segs.size(), 1U);
  // Block 4 loses its end, block 5 all of it.
  ASSERT_EQ(
      ::truncate(segs[0].c_str(),
                 static_cast<off_t>(segment_header_bytes + 4 * rec + 100)),
      0);
  auto c = fetch(5);
  ASSERT_FALSE(c.status.has_value());
  EXPECT_EQ(c.status.error().code, errc::io_error);
  EXPECT_FALSE(tier_->contains(key_of(5))) << "an unreadable block stayed";
  EXPECT_EQ(tier_->stats().unreadable_dropped, 1U);
  EXPECT_EQ(tier_->stats().checksum_failures, 0U);
  c = fetch(5);
  ASSERT_FALSE(c.status.has_value());
  EXPECT_EQ(c.status.error().code, errc::not_found);
  // Blocks 0-3 leave: the segment is compacted, and block 4 with its bytes
  // cut short cannot be copied.
  for (std::uint64_t i = 0; i < 4; ++i)
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  const auto id = tier_->compact();
  for (const auto& d : settle_expecting({id}))
    if (d.id == id) {
      EXPECT_TRUE(d.status.has_value()) << d.status.error().describe();
    }
  EXPECT_FALSE(tier_->contains(key_of(4)));
  const auto s = tier_->stats();
  EXPECT_EQ(s.unreadable_dropped, 2U);
  EXPECT_EQ(s.blocks, 0U);
  EXPECT_EQ(s.segments, 0U) << "the segment of an unreadable record stayed";
  EXPECT_TRUE(segment_files().empty());
  spill(6);
  settle();
  expect_block(6);
}

// A read that fails with an I/O error is no proof that the record is lost
// (a transient EIO, a path that recovers): it is read once more, and a
// block whose record still lies inside its file is kept when that fails
// too. Before, one failed read dropped it, pinned or not.
TEST_F(disk_tier_test, a_read_error_keeps_a_block_whose_record_is_there) {
  auto c = config();
  auto faults = std::make_shared<std::atomic<int>>(0);
  // Only the I/O thread reads: the next `faults` reads fail with EIO.
  c.read_fault_for_testing = [faults] {
    if (faults->load() <= 0)
      return 0;
    faults->fetch_sub(1);
    return EIO;
  };
  open(c);
  spill(0, 4096, /*pinned=*/true);
  spill(1);
  settle();
  faults->store(1); // one failed read: the second one serves the block
  expect_block(0);
  EXPECT_EQ(faults->load(), 0) << "the fault was never hit";
  faults->store(2); // both reads fail: the fetch fails, the block stays
  auto f = fetch(1);
  ASSERT_FALSE(f.status.has_value());
  EXPECT_EQ(f.status.error().code, errc::io_error);
  EXPECT_TRUE(tier_->contains(key_of(1))) << "dropped for a read error";
  expect_block(1);
  expect_block(0);
  const auto s = tier_->stats();
  EXPECT_EQ(s.unreadable_dropped, 0U);
  EXPECT_EQ(s.checksum_failures, 0U);
  EXPECT_EQ(s.io_errors, 3U) << "each failed read counts";
  EXPECT_EQ(s.blocks, 2U);
}

// A compaction that cannot read a record whose bytes are in its file stops
// there, keeping every block, and its segment stays marked: it is compacted
// once the reads work again. Before, a short burst of EIO dropped every
// live block of the segment.
TEST_F(disk_tier_test, a_read_error_stops_a_compaction_and_keeps_its_blocks) {
  auto c = config_with_segments_of(8);
  auto failing = std::make_shared<std::atomic<bool>>(false);
  c.read_fault_for_testing = [failing] { return failing->load() ? EIO : 0; };
  open(c);
  for (std::uint64_t i = 0; i < 9; ++i)
    spill(i, 4096, /*pinned=*/i == 6);
  settle();
  ASSERT_EQ(tier_->stats().segments, 2U);
  failing->store(true);
  // The first segment falls below the threshold: its compaction reads.
  for (std::uint64_t i = 0; i < 5; ++i)
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  for (std::uint64_t i = 5; i < 9; ++i) {
    EXPECT_TRUE(tier_->contains(key_of(i))) << i << " lost to a read error";
  }
  auto s = tier_->stats();
  EXPECT_EQ(s.unreadable_dropped, 0U);
  EXPECT_GT(s.io_errors, 0U);
  EXPECT_EQ(s.segments, 2U);
  failing->store(false);
  const auto id = tier_->compact();
  for (const auto& d : settle_expecting({id}))
    if (d.id == id) {
      EXPECT_TRUE(d.status.has_value()) << d.status.error().describe();
    }
  for (std::uint64_t i = 5; i < 9; ++i)
    expect_block(i);
  s = tier_->stats();
  EXPECT_EQ(s.segments, 1U) << "the segment was never compacted";
  EXPECT_EQ(s.blocks, 4U);
}

TEST_F(disk_tier_test, a_file_that_is_not_a_catalog_is_refused) {
  std::ofstream(dir_ + "/catalog.sqlite") << std::string(4096, 'z');
  auto t = disk_tier::open(config());
  ASSERT_FALSE(t.has_value());
  EXPECT_NE(t.error().message.find("catalog.sqlite"), std::string::npos);
}

// A catalog page damaged on disk: SQLite says "database disk image is
// malformed" when the open scans the rows. Before, that was all the open
// said; it names the catalog and says how to start over.
TEST_F(disk_tier_test, a_damaged_catalog_says_what_to_do) {
  open(config());
  for (std::uint64_t i = 0; i < 2000; ++i)
    spill(i, 64);
  settle();
  tier_.reset();
  const std::string path = dir_ + "/catalog.sqlite";
  {
    catalog_peer peer(path);
    ASSERT_TRUE(peer.exec("PRAGMA wal_checkpoint(TRUNCATE)"));
  }
  // Junk over the second half of the file (pages of rows among them),
  // leaving the schema on the first pages readable.
  const auto size = fs::file_size(path);
  ASSERT_GT(size, 16U * 4096U);
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(size / 2 / 4096 * 4096));
    const std::string junk(size - size / 2 / 4096 * 4096, '\x55');
    f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
  }
  auto t = disk_tier::open(config());
  ASSERT_FALSE(t.has_value());
  EXPECT_EQ(t.error().code, errc::parse_error) << t.error().describe();
  EXPECT_NE(t.error().message.find(path), std::string::npos)
      << t.error().describe();
  EXPECT_NE(t.error().message.find("damaged"), std::string::npos)
      << t.error().describe();
  // Also logged by a running tier's reload, where the directory is moved
  // aside only once the process is stopped.
  EXPECT_NE(t.error().message.find("stop the process, then move the "
                                   "directory " +
                                   dir_ + " aside"),
            std::string::npos)
      << t.error().describe();
}

TEST_F(disk_tier_test, a_directory_in_use_is_refused) {
  open(config());
  auto t = disk_tier::open(config());
  ASSERT_FALSE(t.has_value());
  EXPECT_EQ(t.error().code, errc::busy);
  EXPECT_NE(t.error().message.find("in use"), std::string::npos);
}

// No block or inode left for the open's probe file is a full file system,
// not a permission problem: the tier opens full. Before, the open failed
// and told the operator to give the process write permission.
TEST_F(disk_tier_test, no_room_for_the_probe_file_opens_full) {
  auto c = config();
  open(c);
  spill(0);
  settle();
  tier_.reset();
  for (const int e : {ENOSPC, EDQUOT}) {
    SCOPED_TRACE(e);
    c.probe_fault_for_testing = [e] { return e; };
    stderr_log err;
    auto t = disk_tier::open(c);
    ASSERT_TRUE(t.has_value()) << t.error().describe();
    tier_ = std::move(*t);
    EXPECT_TRUE(tier_->stats().full);
    expect_block(0);
    tier_.reset();
    const std::string log = err.log();
    EXPECT_EQ(occurrences(log, "the file system is full at open"), 1U) << log;
    EXPECT_EQ(log.find("write permission"), std::string::npos) << log;
  }
}

TEST_F(disk_tier_test,
       spills_past_max_queued_bytes_are_refused_while_the_disk_lags) {
  auto c = config();
  c.max_queued_bytes = 64 << 10;
  // The I/O thread's first write waits until the test opens the gate: the
  // disk is "behind" for exactly as long as the test needs.
  std::promise<void> gate;
  std::shared_future<void> open_gate = gate.get_future().share();
  c.write_fault_for_testing = [open_gate] {
    open_gate.wait();
    return 0;
  };
  open(c);
  for (std::uint64_t i = 0; i < 16; ++i) // 16 x 4 KiB = max_queued_bytes
    spill(i);
  const auto bytes = block_bytes(16, 4096);
  auto refused = tier_->spill(key_of(16), ns_a, codec::int8, bytes,
                              block_checksum(bytes), nanos{0}, nanos{0}, false);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, errc::busy);
  EXPECT_NE(refused.error().message.find("max_queued_bytes"), std::string::npos)
      << refused.error().message;
  EXPECT_FALSE(tier_->contains(key_of(16)));
  spill(17, 4096, /*pinned=*/true); // a pin is never shed
  EXPECT_EQ(tier_->stats().spills_refused_busy, 1U);
  gate.set_value();
  settle();
  for (std::uint64_t i = 0; i < 16; ++i)
    expect_block(i);
  expect_block(17);
  EXPECT_FALSE(tier_->contains(key_of(16)));
  spill(16); // the queue drained: taken again
  settle();
  expect_block(16);
}

TEST_F(disk_tier_test, under_full_sync_a_failed_sync_fails_the_spill) {
  auto c = config();
  c.full_sync = true;
  auto broken = std::make_shared<std::atomic<bool>>(false);
  c.sync_fault_for_testing = [broken] { return broken->load() ? EIO : 0; };
  open(c);
  spill(0);
  settle();
  broken->store(true);
  const auto id = spill(1);
  bool seen = false;
  for (const auto& d : settle()) {
    if (d.id != id)
      continue;
    seen = true;
    ASSERT_FALSE(d.status.has_value()) << "acknowledged without its sync";
    EXPECT_EQ(d.status.error().code, errc::io_error);
    EXPECT_NE(d.status.error().message.find("cannot sync"), std::string::npos)
        << d.status.error().message;
  }
  EXPECT_TRUE(seen);
  EXPECT_FALSE(tier_->contains(key_of(1)));
  broken->store(false);
  spill(2);
  settle();
  expect_block(0);
  expect_block(2);
  tier_.reset();
  open(c);
  expect_block(0);
  expect_block(2);
  EXPECT_FALSE(tier_->contains(key_of(1)));
}

TEST_F(disk_tier_test,
       a_disk_that_fills_refuses_spills_and_keeps_serving_reads) {
  auto c = config_with_segments_of(2);
  auto full = std::make_shared<std::atomic<bool>>(false);
  c.write_fault_for_testing = [full] { return full->load() ? ENOSPC : 0; };
  // The file system stays full as statvfs sees it: only the tier's own
  // unlink frees space here.
  c.free_bytes_for_testing = [] { return std::uint64_t{0}; };
  open(c);
  for (std::uint64_t i = 0; i < 4; ++i)
    spill(i);
  settle();
  full->store(true);
  const auto id = spill(10);
  for (const auto& d : settle_expecting({id}))
    if (d.id == id) {
      EXPECT_EQ(d.status.error().code, errc::out_of_memory);
    }
  auto s = tier_->stats();
  EXPECT_TRUE(s.full);
  EXPECT_EQ(s.spills_refused_full, 1U);
  EXPECT_FALSE(tier_->contains(key_of(10)));
  const auto bytes = block_bytes(11, 4096);
  auto refused = tier_->spill(key_of(11), ns_a, codec::int8, bytes,
                              block_checksum(bytes), nanos{0}, nanos{0}, false);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, errc::out_of_memory);
  EXPECT_EQ(tier_->stats().spills_refused_full, 2U);
  for (std::uint64_t i = 0; i < 4; ++i)
    expect_block(i);
  // Freeing a segment's worth of space lets spills in again.
  full->store(false);
  ASSERT_TRUE(tier_->erase(key_of(0)).has_value());
  ASSERT_TRUE(tier_->erase(key_of(1)).has_value());
  settle();
  EXPECT_FALSE(tier_->stats().full);
  spill(12);
  settle();
  expect_block(12);
}

TEST_F(disk_tier_test, an_erase_or_pin_in_a_failed_batch_stays_done) {
  auto c = config();
  c.full_sync = true;
  auto syncs = std::make_shared<sync_counter>();
  auto gate = std::make_shared<append_gate>();
  const append_gate::guard gate_guard{gate};
  c.sync_fault_for_testing = sync_counter::hook(syncs);
  c.write_fault_for_testing = append_gate::hook(gate);
  open(c);
  for (std::uint64_t i = 0; i < 4; ++i)
    spill(i);
  settle();
  ASSERT_TRUE(tier_->pin(key_of(2)).has_value());
  ASSERT_TRUE(tier_->pin(key_of(3)).has_value());
  settle();
  // Spill 10 holds the I/O thread; what the owner does meanwhile goes into
  // the next batch, whose sync fails.
  gate->armed = true;
  const auto first = spill(10);
  gate->entered.get_future().wait();
  ASSERT_TRUE(tier_->erase(key_of(0)).has_value());
  ASSERT_TRUE(tier_->pin(key_of(1)).has_value());
  ASSERT_TRUE(tier_->unpin(key_of(2)).has_value());
  const auto other = block_bytes(33, 2048);
  const auto replace =
      tier_
          ->spill(key_of(3), ns_a, codec::int8, other, block_checksum(other),
                  clock_.now(), nanos{0}, false)
          .value();
  const auto lost = spill(11);
  syncs->fail_at = syncs->calls + 2;
  gate->open();
  for (const auto& d : settle_expecting({first, replace, lost})) {
    if (d.id == first) {
      EXPECT_TRUE(d.status.has_value()) << d.status.error().describe();
    }
    if (d.id == replace || d.id == lost) {
      EXPECT_FALSE(d.status.has_value()) << "acknowledged, yet rolled back";
    }
  }
  auto owner_view = [&] {
    EXPECT_FALSE(tier_->contains(key_of(0))) << "an erased block came back";
    ASSERT_TRUE(tier_->lookup(key_of(1)).has_value());
    EXPECT_EQ(tier_->lookup(key_of(1))->pins, 1U) << "a pin was undone";
    ASSERT_TRUE(tier_->lookup(key_of(2)).has_value());
    EXPECT_EQ(tier_->lookup(key_of(2))->pins, 0U) << "an unpin was undone";
    // A failed spill leaves its key absent, older copy included.
    EXPECT_FALSE(tier_->contains(key_of(3)));
    EXPECT_FALSE(tier_->contains(key_of(11)));
    EXPECT_TRUE(tier_->contains(key_of(10)));
  };
  owner_view();
  // The catalog catches up with the next batch, and a restart agrees.
  tier_->flush();
  settle();
  tier_.reset();
  open(c);
  owner_view();
  EXPECT_EQ(tier_->stats().recovered_blocks, 3U);
  expect_block(1);
  expect_block(2);
  expect_block(10);
}

TEST_F(disk_tier_test,
       an_erase_or_pin_queued_behind_a_failed_batch_stays_done) {
  auto c = config();
  c.full_sync = true;
  auto syncs = std::make_shared<sync_counter>();
  auto gate = std::make_shared<append_gate>();
  const append_gate::guard gate_guard{gate};
  c.sync_fault_for_testing = sync_counter::hook(syncs);
  c.write_fault_for_testing = append_gate::hook(gate);
  open(c);
  for (std::uint64_t i = 0; i < 3; ++i)
    spill(i);
  settle();
  ASSERT_TRUE(tier_->pin(key_of(2)).has_value());
  settle();
  // Spill 10's batch fails while the owner's requests wait behind it: the
  // reload after the failure runs before they do.
  gate->armed = true;
  const auto failed = spill(10);
  gate->entered.get_future().wait();
  ASSERT_TRUE(tier_->erase(key_of(0)).has_value());
  ASSERT_TRUE(tier_->pin(key_of(1)).has_value());
  ASSERT_TRUE(tier_->unpin(key_of(2)).has_value());
  syncs->fail_at = syncs->calls + 1;
  gate->open();
  ASSERT_TRUE(tier_->wait_idle());
  tier_->drain_completions([&](disk_completion&& d) {
    if (d.id == failed) {
      EXPECT_FALSE(d.status.has_value());
    }
  });
  auto owner_view = [&] {
    EXPECT_FALSE(tier_->contains(key_of(0))) << "an erased block came back";
    ASSERT_TRUE(tier_->lookup(key_of(1)).has_value());
    EXPECT_EQ(tier_->lookup(key_of(1))->pins, 1U) << "a pin was undone";
    ASSERT_TRUE(tier_->lookup(key_of(2)).has_value());
    EXPECT_EQ(tier_->lookup(key_of(2))->pins, 0U) << "an unpin was undone";
    EXPECT_FALSE(tier_->contains(key_of(10)));
  };
  owner_view();
  settle();
  tier_.reset();
  open(c);
  owner_view();
  EXPECT_EQ(tier_->stats().recovered_blocks, 2U);
}

TEST_F(disk_tier_test, a_read_behind_a_failed_spill_never_gets_the_older_copy) {
  // Key 1 holds copy A. Spill B of it fails with its batch while a read of
  // key 1 and a spill C of it wait behind it. A failed spill leaves its key
  // absent, older copy included; before, the reload kept A's row because
  // C was queued, and the read got A, older than what the owner spilled.
  auto c = config();
  c.full_sync = true;
  c.max_batch = 1; // B alone in its batch
  auto syncs = std::make_shared<sync_counter>();
  auto gate = std::make_shared<append_gate>();
  const append_gate::guard gate_guard{gate};
  c.sync_fault_for_testing = sync_counter::hook(syncs);
  c.write_fault_for_testing = append_gate::hook(gate);
  open(c);
  spill(1); // A
  settle();
  gate->armed = true;
  const auto held = spill(9);
  gate->entered.get_future().wait(); // the I/O thread is in spill 9's batch
  const auto b = spill_copy_of_1(2);
  const auto read = tier_->fetch(key_of(1));
  const auto cc = spill_copy_of_1(3);
  syncs->fail_at = syncs->calls + 2; // spill 9's batch syncs, B's fails
  gate->open();
  const auto done = settle_expecting({held, b, read, cc});
  for (const auto& d : done) {
    if (d.id == b) {
      EXPECT_FALSE(d.status.has_value()) << "B's batch did not fail";
    }
    if (d.id == cc) {
      EXPECT_TRUE(d.status.has_value()) << d.status.error().describe();
    }
  }
  expect_read_found_none(done, read);
  auto now = fetch(1);
  ASSERT_TRUE(now.status.has_value()) << now.status.error().describe();
  EXPECT_TRUE(now.bytes == block_bytes(3, 4096)) << "not C";
}

TEST_F(disk_tier_test,
       a_read_behind_a_spill_failed_unwritten_in_a_failed_batch_gets_no_copy) {
  // As above, but B fails before it is written (its append fails) and then
  // its batch's commit fails too. B's failure erased A's row in the
  // transaction rolled back; before, the reload brought A back because C
  // was queued, and the read got A.
  auto c = config();
  c.max_batch = 1; // B alone in its batch
  auto gate = std::make_shared<append_gate>();
  const append_gate::guard gate_guard{gate};
  auto fail_write = std::make_shared<std::atomic<bool>>(false);
  auto fail_commit = std::make_shared<std::atomic<bool>>(false);
  const auto gated = append_gate::hook(gate);
  c.write_fault_for_testing = [gated, fail_write] {
    (void)gated();
    return fail_write->exchange(false) ? EIO : 0;
  };
  c.catalog_fault_for_testing = [fail_commit](const std::string& what) {
    return what == "commit" && fail_commit->exchange(false) ? EIO : 0;
  };
  open(c);
  spill(1); // A
  settle();
  gate->armed = true;
  const auto b = spill_copy_of_1(2);
  gate->entered.get_future().wait(); // the I/O thread is in B's append
  const auto read = tier_->fetch(key_of(1));
  const auto cc = spill_copy_of_1(3);
  fail_write->store(true);
  fail_commit->store(true);
  gate->open();
  const auto done = settle_expecting({b, read, cc});
  for (const auto& d : done)
    if (d.id == b) {
      EXPECT_FALSE(d.status.has_value()) << "B did not fail";
    }
  expect_read_found_none(done, read);
  tier_->check_invariants();
}

TEST_F(disk_tier_test, a_read_behind_a_refused_spill_gets_no_copy) {
  // A failed batch whose reload fails too: the tier refuses requests until
  // a reload works. Spill B of key 1 (copy A on disk) is refused so, while
  // a read of key 1 and a spill C wait behind it; the next reload works.
  // A refused spill leaves its key absent, older copy included; before,
  // that reload kept A's row because C was queued, and the read got A.
  auto c = config();
  c.max_batch = 1;
  c.retry_interval = std::chrono::hours(1); // reloads come with requests
  c.max_retry_interval = std::chrono::hours(1);
  auto fail_commit = std::make_shared<std::atomic<bool>>(false);
  // 0: loads work; 1: they fail; 2: the next one waits for `release`,
  // then fails, and the ones after it work.
  auto load_mode = std::make_shared<std::atomic<int>>(0);
  auto gate = std::make_shared<append_gate>(); // holds that load
  const append_gate::guard gate_guard{gate};
  c.catalog_fault_for_testing = [fail_commit](const std::string& what) {
    return what == "commit" && fail_commit->load() ? EIO : 0;
  };
  c.load_fault_for_testing = [load_mode, gate]() -> int {
    const int m = load_mode->load();
    if (m == 2) {
      load_mode->store(1);
      gate->entered.set_value();
      gate->released.wait();
      load_mode->store(0);
      return EIO;
    }
    return m == 1 ? EIO : 0;
  };
  open(c);
  spill(1); // A
  settle();
  fail_commit->store(true);
  load_mode->store(1);
  const auto other = spill(9); // its batch fails, and so does the reload
  (void)settle_expecting({other});
  fail_commit->store(false);
  load_mode->store(2);
  const auto b = spill_copy_of_1(2);
  gate->entered.get_future().wait(); // B's reload attempt
  const auto read = tier_->fetch(key_of(1));
  const auto cc = spill_copy_of_1(3);
  gate->open();
  const auto done = settle_expecting({b, read, cc});
  for (const auto& d : done)
    if (d.id == b) {
      EXPECT_FALSE(d.status.has_value()) << "B was not refused";
    }
  expect_read_found_none(done, read);
  tier_->check_invariants();
}

TEST_F(disk_tier_test, a_low_watermark_of_one_refuses_no_spill_for_capacity) {
  // A tier of 64 KiB in 8 KiB segments with a low watermark of 1.0 and no
  // pins takes 400 spills of 100 to 3,000 bytes: each evicts what it
  // needs, none is refused. (Before, eviction stopped short of the
  // segments' headers, compaction could not make the rest, and 46 spills
  // were refused "for capacity" with unpinned blocks stored.)
  auto c = config();
  c.capacity_bytes = 64 << 10;
  c.segment_bytes = 8 << 10;
  c.low_watermark = 1.0;
  open(c);
  for (std::uint64_t i = 0; i < 400; ++i) {
    const auto id = spill(i, 100 + (i * 7919) % 2900);
    for (auto& d : settle_expecting({id}))
      ASSERT_TRUE(d.status.has_value())
          << "spill " << i << ": " << d.status.error().describe();
  }
  EXPECT_EQ(tier_->stats().spills_refused_capacity, 0U);
  EXPECT_LE(tier_->stats().file_bytes, c.capacity_bytes);
  tier_->check_invariants();
}

TEST_F(disk_tier_test, a_replacing_spill_whose_row_fails_drops_the_older_copy) {
  open(config());
  spill(1, 4096);
  settle();
  {
    // A statement-level failure of exactly the replacing row: SQLite fails
    // the upsert and the batch's transaction goes on to commit.
    sqlite3* db = nullptr;
    const std::string path = dir_ + "/catalog.sqlite";
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db,
                           "CREATE TRIGGER fail_upsert BEFORE UPDATE ON "
                           "cache_entries WHEN NEW.size = 2048 BEGIN "
                           "SELECT RAISE(ABORT, 'injected'); END;",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_close(db);
  }
  const auto other = block_bytes(77, 2048);
  const auto id =
      tier_
          ->spill(key_of(1), ns_a, codec::int8, other, block_checksum(other),
                  clock_.now(), nanos{0}, false)
          .value();
  bool seen = false;
  for (const auto& d : settle()) {
    if (d.id != id)
      continue;
    seen = true;
    ASSERT_FALSE(d.status.has_value());
    EXPECT_NE(d.status.error().message.find("injected"), std::string::npos)
        << d.status.error().message;
  }
  EXPECT_TRUE(seen);
  EXPECT_FALSE(tier_->contains(key_of(1)));
  // The catalog agrees: no row is left naming the older copy.
  const auto rid = tier_->report(10);
  for (auto& d : settle()) {
    if (d.id != rid)
      continue;
    ASSERT_TRUE(d.report);
    EXPECT_TRUE(d.report->usage.empty());
    EXPECT_TRUE(d.report->oldest.empty());
  }
  tier_.reset();
  open(config());
  EXPECT_FALSE(tier_->contains(key_of(1))) << "the older copy came back";
  EXPECT_EQ(tier_->stats().recovered_blocks, 0U);
}

TEST_F(disk_tier_test, under_full_sync_a_new_segment_is_synced_into_its_dir) {
  auto c = config_with_segments_of(2); // two blocks a segment
  c.full_sync = true;
  auto dir_syncs = std::make_shared<std::atomic<int>>(0);
  auto broken = std::make_shared<std::atomic<bool>>(false);
  c.dir_sync_fault_for_testing = [dir_syncs, broken] {
    ++*dir_syncs;
    return broken->load() ? EIO : 0;
  };
  open(c);
  spill(0);
  settle();
  EXPECT_EQ(dir_syncs->load(), 1) << "the first segment's name was not synced";
  spill(1);
  settle();
  EXPECT_EQ(dir_syncs->load(), 1) << "no new segment, no directory sync";
  // Block 2 starts a segment whose name cannot be made durable: its row must
  // not commit.
  broken->store(true);
  const auto id = spill(2);
  bool seen = false;
  for (const auto& d : settle()) {
    if (d.id != id)
      continue;
    seen = true;
    ASSERT_FALSE(d.status.has_value()) << "acknowledged in an unsynced file";
    EXPECT_EQ(d.status.error().code, errc::io_error);
    EXPECT_NE(d.status.error().message.find("cannot sync directory"),
              std::string::npos)
        << d.status.error().message;
  }
  EXPECT_TRUE(seen);
  EXPECT_EQ(dir_syncs->load(), 2);
  EXPECT_FALSE(tier_->contains(key_of(2)));
  broken->store(false);
  spill(3);
  settle();
  EXPECT_EQ(dir_syncs->load(), 3);
  tier_.reset();
  open(c);
  expect_block(0);
  expect_block(1);
  expect_block(3);
  EXPECT_FALSE(tier_->contains(key_of(2)));
}

TEST_F(disk_tier_test,
       under_full_sync_without_a_transaction_nothing_commits_before_its_sync) {
  auto c = config_with_segments_of(4);
  c.full_sync = true;
  open(c);
  for (std::uint64_t i = 0; i < 6; ++i) // segment 1: 0-3, segment 2: 4-5
    spill(i);
  settle();
  ASSERT_TRUE(tier_->erase(key_of(0)).has_value());
  settle();
  tier_.reset();
  // Segment 1 is now below the threshold: open marks it, so any batch
  // that gets a transaction compacts it, compact() or not. No retry pass
  // runs in this test: only the batches below try.
  c.compaction_threshold = 0.9;
  c.retry_interval = std::chrono::hours(1);
  c.max_retry_interval = std::chrono::hours(1);
  // The peer holds the write lock, so the batch gets no transaction, and
  // lets go at the tier's first segment write, so that the tier's own
  // statements can commit one by one. At each sync the hook counts rows
  // that another connection can already see: rows ahead of their bytes.
  auto peer = std::make_shared<catalog_peer>(dir_ + "/catalog.sqlite");
  auto probe = std::make_shared<std::string>("SELECT 0");
  auto early = std::make_shared<std::atomic<int>>(0);
  c.write_fault_for_testing = [peer] {
    peer->release();
    return 0;
  };
  c.sync_fault_for_testing = [peer, probe, early] {
    if (peer->query(*probe) > 0)
      ++*early;
    return 0;
  };
  open(c);
  const auto spill_3000 = [&] {
    const auto bytes = block_bytes(20, 3000);
    return tier_
        ->spill(key_of(20), ns_a, codec::int8, bytes, block_checksum(bytes),
                clock_.now(), nanos{0}, false)
        .value();
  };

  // A spill.
  *probe = "SELECT count(*) FROM cache_entries WHERE size = 3000";
  ASSERT_TRUE(peer->hold());
  const auto id = spill_3000();
  for (const auto& d : settle_expecting({id})) {
    if (d.id != id)
      continue;
    EXPECT_FALSE(d.status.has_value()) << "written without a transaction";
    if (!d.status.has_value()) {
      EXPECT_EQ(d.status.error().code, errc::io_error);
      EXPECT_NE(d.status.error().message.find("no transaction"),
                std::string::npos)
          << d.status.error().message;
    }
  }
  EXPECT_EQ(early->load(), 0) << "a spill's row committed before its sync";
  EXPECT_FALSE(tier_->contains(key_of(20)));
  EXPECT_EQ(tier_->stats().spill_errors, 1U);
  peer->release();

  // A compaction: its relocated rows name copies not yet synced.
  *probe = "SELECT 3 - count(*) FROM cache_entries WHERE segment = 1";
  ASSERT_TRUE(peer->hold());
  const auto cid = tier_->compact();
  for (const auto& d : settle_expecting({cid})) {
    if (d.id != cid)
      continue;
    EXPECT_FALSE(d.status.has_value()) << "compacted without a transaction";
    if (!d.status.has_value()) {
      EXPECT_NE(d.status.error().message.find("no transaction"),
                std::string::npos)
          << d.status.error().message;
    }
  }
  EXPECT_EQ(early->load(), 0) << "a relocation committed before its sync";
  EXPECT_EQ(tier_->stats().compactions, 0U);
  peer->release();

  // With transactions again, both go through, and survive a restart. The
  // segment is compacted by the spill's batch (it was marked at open) or
  // by compact(), whichever the I/O thread runs first: once.
  spill_3000();
  tier_->compact();
  for (const auto& d : settle()) {
    EXPECT_TRUE(d.status.has_value()) << d.status.error().describe();
  }
  EXPECT_EQ(tier_->stats().compactions, 1U);
  EXPECT_EQ(early->load(), 0);
  tier_.reset();
  open(config());
  for (std::uint64_t i = 1; i < 6; ++i)
    expect_block(i);
  expect_block(20, 3000);
}

TEST_F(disk_tier_test, capacity_eviction_looks_past_blocks_pinned_since) {
  // The tier is full of 400 unpinned blocks when a spill is queued; while
  // its batch starts, the owner pins the 300 oldest (their pins are not in
  // the catalog yet). Eviction passes over them to the unpinned ones and
  // the spill is stored. (Before, it read the first 256 rows the catalog
  // calls unpinned again and again, found every one pinned, and refused the
  // spill as if pinned blocks held the whole tier.)
  constexpr std::uint64_t n = 400;
  constexpr std::size_t size = 1000;
  auto c = config();
  c.segment_bytes = std::uint64_t{64} << 10;
  const std::uint64_t record = record_header_bytes + size;
  const std::uint64_t per_segment =
      (c.segment_bytes - segment_header_bytes) / record;
  const std::uint64_t segments = (n + per_segment - 1) / per_segment;
  c.capacity_bytes = n * record + segments * segment_header_bytes + record / 2;
  auto armed = std::make_shared<std::atomic<bool>>(false);
  auto entered = std::make_shared<std::promise<void>>();
  auto release = std::make_shared<std::promise<void>>();
  auto released = release->get_future().share();
  c.catalog_fault_for_testing = [armed, entered,
                                 released](const std::string& what) {
    if (what == "begin" && armed->exchange(false)) {
      entered->set_value();
      released.wait();
    }
    return 0;
  };
  open(c);
  for (std::uint64_t i = 0; i < n; ++i) {
    spill(i, size);
    if (i % 50 == 49)
      settle();
  }
  settle();
  ASSERT_EQ(tier_->stats().blocks, n);
  armed->store(true);
  const auto last = spill(n, size);
  entered->get_future().wait(); // its batch is starting
  for (std::uint64_t i = 0; i < 300; ++i)
    ASSERT_TRUE(tier_->pin(key_of(i)).has_value());
  release->set_value();
  bool seen = false;
  for (const auto& d : settle()) {
    if (d.id == last) {
      seen = true;
      EXPECT_TRUE(d.status.has_value()) << d.status.error().describe();
    }
  }
  EXPECT_TRUE(seen);
  EXPECT_TRUE(tier_->contains(key_of(n)));
  EXPECT_GT(tier_->stats().evictions, 0U);
  EXPECT_EQ(tier_->stats().spills_refused_capacity, 0U);
  for (std::uint64_t i = 0; i < 300; ++i)
    EXPECT_TRUE(tier_->contains(key_of(i))) << "pinned block " << i;
}

TEST_F(disk_tier_test,
       a_spill_failed_with_its_batch_stays_gone_after_a_failed_reload) {
  // Block 7 on disk (4096 bytes); spilled again (3000 bytes) in a batch
  // whose commit fails, and the reload after it fails too. When a later
  // reload succeeds, the key is absent, older copy included. (Before, the
  // failed reload forgot which spills failed with the batch: the directory
  // kept the failed copy's size and checksum over the older copy's row, and
  // check_invariants aborted.)
  auto c = config();
  c.retry_interval = std::chrono::hours(1); // only the batches below
  c.max_retry_interval = std::chrono::hours(1);
  auto fail_commit = std::make_shared<std::atomic<bool>>(false);
  auto fail_loads = std::make_shared<std::atomic<int>>(0);
  c.catalog_fault_for_testing = [fail_commit](const std::string& what) {
    return what == "commit" && fail_commit->load() ? EIO : 0;
  };
  c.load_fault_for_testing = [fail_loads] {
    return fail_loads->fetch_sub(1) > 0 ? EIO : 0;
  };
  open(c);
  spill(7);
  settle();
  fail_commit->store(true);
  fail_loads->store(1);
  const auto failed = spill(7, 3000);
  ASSERT_TRUE(tier_->wait_idle());
  fail_commit->store(false);
  bool seen = false;
  tier_->drain_completions([&](disk_completion&& d) {
    if (d.id == failed) {
      seen = true;
      EXPECT_FALSE(d.status.has_value()) << "acknowledged, yet rolled back";
    }
  });
  EXPECT_TRUE(seen);
  (void)tier_->flush(); // this batch's reload succeeds
  settle();             // check_invariants
  EXPECT_FALSE(tier_->contains(key_of(7)));
  EXPECT_EQ(fetch(7).status.error().code, errc::not_found);
}

TEST_F(disk_tier_test,
       a_tier_that_cannot_reload_refuses_requests_until_it_can) {
  auto c = config();
  c.full_sync = true;
  auto syncs = std::make_shared<sync_counter>();
  auto broken = std::make_shared<std::atomic<bool>>(false);
  c.sync_fault_for_testing = sync_counter::hook(syncs);
  c.load_fault_for_testing = [broken] { return broken->load() ? EIO : 0; };
  open(c);
  for (std::uint64_t i = 0; i < 4; ++i)
    spill(i);
  settle();
  ASSERT_TRUE(tier_->pin(key_of(2)).has_value());
  settle();
  // A batch fails, and so does the reload after it (after the rows were
  // read: the old code kept them indexed with no segment open).
  broken->store(true);
  syncs->fail_at = syncs->calls + 1;
  const auto lost = spill(10);
  for (const auto& d : settle_expecting({lost})) {
    if (d.id == lost) {
      EXPECT_FALSE(d.status.has_value()) << "acknowledged, yet rolled back";
    }
  }
  // While it cannot reload, requests get a clear error, and what the owner
  // does is kept.
  ASSERT_TRUE(tier_->erase(key_of(0)).has_value());
  ASSERT_TRUE(tier_->unpin(key_of(2)).has_value());
  const std::uint64_t reads_before = tier_->lookup(key_of(3))->access_count;
  ASSERT_TRUE(tier_->mark_used(key_of(3), reads_before + 7));
  const auto refused = fetch(1);
  ASSERT_FALSE(refused.status.has_value()) << "served from a state not loaded";
  EXPECT_EQ(refused.status.error().code, errc::io_error);
  EXPECT_NE(refused.status.error().message.find("could not be reloaded"),
            std::string::npos)
      << refused.status.error().message;
  const auto spilled = spill(11);
  for (const auto& d : settle_expecting({spilled})) {
    if (d.id == spilled) {
      EXPECT_FALSE(d.status.has_value()) << "a spill acknowledged unloaded";
    }
  }
  EXPECT_FALSE(tier_->contains(key_of(11)));
  EXPECT_TRUE(tier_->contains(key_of(1)));
  // The next request reloads, reconciled with what the owner did.
  broken->store(false);
  expect_block(1);
  expect_block(3);
  auto owner_view = [&] {
    EXPECT_FALSE(tier_->contains(key_of(0))) << "an erased block came back";
    ASSERT_TRUE(tier_->lookup(key_of(2)).has_value());
    EXPECT_EQ(tier_->lookup(key_of(2))->pins, 0U) << "an unpin was undone";
    EXPECT_FALSE(tier_->contains(key_of(10)));
    // The owner's use of block 3 while the tier could not reload (its
    // touch was in a refused batch) reaches the catalog, and the fetch
    // after the reload counts one more. (Before, the refused touch was
    // dropped: 1 read after the restart.)
    ASSERT_TRUE(tier_->lookup(key_of(3)).has_value());
    EXPECT_EQ(tier_->lookup(key_of(3))->access_count, reads_before + 8);
  };
  owner_view();
  tier_->flush();
  settle();
  tier_.reset();
  open(c);
  owner_view();
  EXPECT_EQ(tier_->stats().recovered_blocks, 3U);
  expect_block(2);
}

// ------------------------------------------------------------- retries

/// A file system that is full while the returned flag is set: segment
/// writes fail with ENOSPC and the free space the tier looks at is 0; with
/// the flag clear, writes succeed and a terabyte is free.
std::shared_ptr<std::atomic<bool>> simulate_full_disk(disk_tier_config& c) {
  auto full = std::make_shared<std::atomic<bool>>(false);
  c.write_fault_for_testing = [full] { return full->load() ? ENOSPC : 0; };
  c.free_bytes_for_testing = [full] {
    return full->load() ? std::uint64_t{0} : std::uint64_t{1} << 40;
  };
  return full;
}

/// Block i's size in the retry tests: distinct, so that a test can read a
/// block's row from the catalog by its size.
std::size_t retry_size(std::uint64_t i) {
  return 1024 * static_cast<std::size_t>(i + 1);
}

/// Expects the catalog row of retry-test block `i` (found by its size) to
/// count `reads` reads, the latest at `at`.
void expect_reads(catalog_peer& peer, std::uint64_t i, std::int64_t reads,
                  nanos at) {
  const std::string row =
      " FROM cache_entries WHERE size = " + std::to_string(retry_size(i));
  EXPECT_EQ(peer.query("SELECT access_count" + row), reads) << "block " << i;
  EXPECT_EQ(peer.query("SELECT accessed_at" + row), at.count())
      << "block " << i;
}

TEST_F(disk_tier_test, a_compaction_that_failed_is_retried_while_idle) {
  auto c = config_with_segments_of(4);
  c.compaction_threshold = 0.5;
  auto watch = retry_watch::fast(c);
  auto broken = std::make_shared<std::atomic<bool>>(false);
  c.write_fault_for_testing = [broken] { return broken->load() ? EIO : 0; };
  open(c);
  for (std::uint64_t i = 0; i < 12; ++i)
    spill(i);
  settle();
  EXPECT_EQ(tier_->stats().segments, 3U);
  const auto before = tier_->stats().file_bytes;
  // Segment 1 keeps one block of four, and copying that block out fails.
  broken->store(true);
  for (std::uint64_t i : {0UL, 1UL, 2UL})
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  auto s = tier_->stats();
  EXPECT_EQ(s.compactions, 0U);
  EXPECT_GE(s.io_errors, 1U);
  // The disk recovers. No request, removal or compact() follows: the I/O
  // thread retries on its own.
  broken->store(false);
  EXPECT_TRUE(watch->converged()) << "the failed compaction was not retried";
  s = tier_->stats();
  EXPECT_EQ(s.compactions, 1U) << "segment 1's dead bytes stayed on disk";
  EXPECT_EQ(s.compaction_bytes_moved, rec);
  EXPECT_EQ(s.file_bytes, before - 3 * rec);
  for (std::uint64_t i = 3; i < 12; ++i)
    expect_block(i);
  EXPECT_EQ(segment_files().size(), tier_->stats().segments);
}

// A catalog that is full (SQLITE_FULL) when a compaction moves a row is a
// lack of space, as a full segment write is: the tier is `full`, and no
// I/O error is counted (before, it counted in io_errors and `full` stayed
// clear).
TEST_F(disk_tier_test, a_full_catalog_during_a_compaction_sets_full) {
  auto c = config_with_segments_of(4);
  c.compaction_threshold = 0.5;
  auto full = std::make_shared<std::atomic<bool>>(false);
  c.catalog_fault_for_testing = [full](const std::string& what) {
    return full->load() && what.rfind("relocate", 0) == 0 ? ENOSPC : 0;
  };
  c.free_bytes_for_testing = [full] {
    return full->load() ? std::uint64_t{0} : std::uint64_t{1} << 40;
  };
  open(c);
  for (std::uint64_t i = 0; i < 8; ++i) // segment 1: 0-3, segment 2: 4-7
    spill(i);
  settle();
  ASSERT_EQ(tier_->stats().io_errors, 0U);
  // Segment 1 keeps one block of four; moving its row fails, catalog full.
  full->store(true);
  for (std::uint64_t i : {0UL, 1UL, 2UL}) {
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  }
  settle();
  const auto s = tier_->stats();
  EXPECT_TRUE(s.full);
  EXPECT_EQ(s.io_errors, 0U);
  EXPECT_EQ(s.compactions, 0U);
  expect_block(3); // still where it was
}

TEST_F(disk_tier_test,
       work_refused_while_the_catalog_is_locked_is_retried_at_a_bounded_pace) {
  auto c = config_with_segments_of(4);
  c.full_sync = true;
  c.compaction_threshold = 0.5;
  auto watch = retry_watch::fast(c);
  // No accessed_at flush wakes the I/O thread: only the retries do.
  c.touch_flush_interval = std::chrono::hours(1);
  open(c);
  for (std::uint64_t i = 0; i < 8; ++i) // segment 1: 0-3, segment 2: 4-7
    spill(i);
  settle();
  const auto before = tier_->stats().file_bytes;
  // An operator's shell holds the catalog's write lock: the erases cannot
  // reach the catalog, and under full_sync segment 1 (one live block of
  // four) cannot be compacted without a transaction.
  catalog_peer peer(dir_ + "/catalog.sqlite");
  ASSERT_TRUE(peer.hold());
  for (std::uint64_t i : {0UL, 1UL, 2UL})
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  // While the lock is held every retry fails, and is counted; the delay
  // doubles up to max_retry_interval instead of spinning.
  const auto tried = watch->seen().size();
  const auto errors = tier_->stats().io_errors;
  EXPECT_TRUE(watch->failed(tried + 4)) << "nothing was retried while idle";
  const auto delays = watch->seen();
  for (std::size_t i = 0; i < std::min<std::size_t>(delays.size(), 4); ++i)
    EXPECT_EQ(delays[i], std::chrono::milliseconds(i == 0 ? 2 : 4)) << i;
  EXPECT_GE(tier_->stats().io_errors, errors + 4); // 4 or more a retry
  EXPECT_EQ(tier_->stats().compactions, 0U);
  EXPECT_EQ(peer.query("SELECT count(*) FROM cache_entries"), 8);
  expect_block(3); // requests are served meanwhile
  // The lock goes; the next retry writes the erases and compacts.
  peer.release();
  EXPECT_TRUE(watch->converged()) << "the refused work was not retried";
  EXPECT_EQ(peer.query("SELECT count(*) FROM cache_entries"), 5)
      << "rows of erased blocks are still committed";
  const auto s = tier_->stats();
  EXPECT_EQ(s.compactions, 1U) << "segment 1's dead bytes stayed on disk";
  EXPECT_EQ(s.file_bytes, before - 3 * rec);
  for (std::uint64_t i = 3; i < 8; ++i)
    expect_block(i);
  tier_.reset();
  open(c);
  EXPECT_EQ(tier_->stats().recovered_blocks, 5U);
}

TEST_F(disk_tier_test, repairs_after_a_failed_batch_are_written_while_idle) {
  auto c = config();
  c.full_sync = true;
  auto watch = retry_watch::fast(c);
  auto syncs = std::make_shared<sync_counter>();
  auto gate = std::make_shared<append_gate>();
  const append_gate::guard gate_guard{gate};
  c.sync_fault_for_testing = sync_counter::hook(syncs);
  c.write_fault_for_testing = append_gate::hook(gate);
  open(c);
  for (std::uint64_t i = 0; i < 4; ++i)
    spill(i, retry_size(i));
  settle();
  ASSERT_TRUE(tier_->pin(key_of(2)).has_value());
  settle();
  // Spill 10 holds the I/O thread; an erase, a pin and an unpin go into
  // the next batch, whose sync fails.
  gate->armed = true;
  spill(10, 512);
  gate->entered.get_future().wait();
  ASSERT_TRUE(tier_->erase(key_of(0)).has_value());
  ASSERT_TRUE(tier_->pin(key_of(1)).has_value());
  ASSERT_TRUE(tier_->unpin(key_of(2)).has_value());
  const auto lost = spill(11, 512);
  syncs->fail_at = syncs->calls + 2;
  gate->open();
  for (const auto& d : settle_expecting({lost})) {
    if (d.id == lost) {
      EXPECT_FALSE(d.status.has_value()) << "acknowledged, yet rolled back";
    }
  }
  // No request follows. The I/O thread writes the repairs on its own, so
  // that a crash from now on cannot bring the erased block back.
  EXPECT_TRUE(watch->converged()) << "the repairs waited for a request";
  catalog_peer peer(dir_ + "/catalog.sqlite");
  EXPECT_EQ(peer.query("SELECT count(*) FROM cache_entries WHERE size = 1024"),
            0)
      << "the erased block's row is still committed";
  EXPECT_EQ(peer.query("SELECT pinned FROM cache_entries WHERE size = 2048"), 1)
      << "the pin is not committed";
  EXPECT_EQ(peer.query("SELECT pinned FROM cache_entries WHERE size = 3072"), 0)
      << "the unpin is not committed";
  EXPECT_EQ(peer.query("SELECT count(*) FROM cache_entries"), 4); // 1-3, 10
  tier_.reset();
  open(c);
  EXPECT_FALSE(tier_->contains(key_of(0)));
  EXPECT_EQ(tier_->lookup(key_of(1)).value_or(disk_block_info{}).pins, 1U);
  EXPECT_EQ(tier_->stats().recovered_blocks, 4U);
}

// A pin or unpin whose catalog write fails (another writer holds the
// catalog: an operator's sqlite3 shell inside BEGIN IMMEDIATE) is retried
// like a failed row erase, writing the pin count the directory holds when
// the retry runs. Before, it was only counted: the catalog kept the old
// count, so a restart lost the pin or brought back the one the owner
// took off, and capacity eviction (which asks the catalog for unpinned
// blocks) never offered the block the owner had unpinned.
TEST_F(disk_tier_test, a_pin_whose_catalog_write_failed_is_retried) {
  auto c = config();
  auto watch = retry_watch::fast(c);
  c.touch_flush_interval = std::chrono::hours(1); // only retries wake it
  open(c);
  for (std::uint64_t i = 0; i < 3; ++i)
    spill(i, retry_size(i), /*pinned=*/i == 1);
  settle();
  catalog_peer peer(dir_ + "/catalog.sqlite");
  const auto pins_in_catalog = [&](std::uint64_t i) {
    return peer.query("SELECT pinned FROM cache_entries WHERE size = " +
                      std::to_string(retry_size(i)));
  };
  ASSERT_TRUE(peer.hold());
  ASSERT_TRUE(tier_->pin(key_of(0)).has_value());
  ASSERT_TRUE(tier_->unpin(key_of(1)).has_value());
  settle();
  // Pinned once more while the lock is held: the retry writes 2.
  ASSERT_TRUE(tier_->pin(key_of(0)).has_value());
  settle();
  EXPECT_EQ(pins_in_catalog(0), 0);
  EXPECT_EQ(pins_in_catalog(1), 1);
  const auto tried = watch->seen().size();
  ASSERT_TRUE(watch->failed(tried + 2)) << "the pins were not retried";
  EXPECT_GE(tier_->stats().io_errors, 3U);
  // The lock goes. No request follows: a retry writes the counts.
  peer.release();
  EXPECT_TRUE(watch->converged()) << "the pins were not written while idle";
  EXPECT_EQ(pins_in_catalog(0), 2) << "the pins are not committed";
  EXPECT_EQ(pins_in_catalog(1), 0) << "the unpin is not committed";
  EXPECT_EQ(pins_in_catalog(2), 0);
  EXPECT_EQ(peer.query("SELECT count(*) FROM cache_entries WHERE pinned = 0"),
            2)
      << "capacity eviction would not see the unpinned block";
  tier_.reset();
  open(c);
  EXPECT_EQ(tier_->lookup(key_of(0)).value_or(disk_block_info{}).pins, 2U);
  EXPECT_EQ(tier_->lookup(key_of(1)).value_or(disk_block_info{}).pins, 0U);
  EXPECT_EQ(tier_->lookup(key_of(2)).value_or(disk_block_info{}).pins, 0U);
  EXPECT_EQ(tier_->stats().recovered_blocks, 3U);
}

// A full catalog (SQLITE_FULL at commit) while blocks are read: each batch
// of reads writes their accessed_at updates and fails its commit. Before,
// every such batch logged a line and reloaded the whole catalog (reads
// about 200 times slower). A batch that wrote only accessed_at updates is
// rolled back, they stay pending, nothing is reloaded, and the failure is
// logged once until a commit succeeds.
TEST_F(disk_tier_test, a_failed_commit_of_accessed_at_updates_reloads_nothing) {
  auto c = config();
  c.touch_batch = 1; // each read's update is written in its own batch
  c.retry_interval = std::chrono::hours(1); // only requests run passes
  c.max_retry_interval = std::chrono::hours(1);
  auto full = std::make_shared<std::atomic<bool>>(false);
  c.catalog_fault_for_testing = [full](const std::string& what) {
    return full->load() && what == "commit" ? ENOSPC : 0;
  };
  c.free_bytes_for_testing = [full] {
    return full->load() ? std::uint64_t{0} : std::uint64_t{1} << 40;
  };
  auto loads = std::make_shared<std::atomic<int>>(0);
  c.load_fault_for_testing = [loads] {
    ++*loads;
    return 0;
  };
  open(c);
  spill(0, retry_size(0));
  spill(1, retry_size(1));
  settle();
  stderr_log err;
  full->store(true);
  for (std::uint64_t k = 0; k < 5; ++k)
    expect_block(k % 2, retry_size(k % 2));
  auto s = tier_->stats();
  EXPECT_EQ(loads->load(), 1) << "a failed commit of accessed_at updates "
                                 "reloaded the catalog";
  EXPECT_TRUE(s.full);
  EXPECT_GE(s.io_errors, 5U);
  full->store(false);
  const auto flushed = tier_->flush();
  for (const auto& d : settle_expecting({flushed}))
    if (d.id == flushed) {
      EXPECT_TRUE(d.status.has_value()) << d.status.error().describe();
    }
  EXPECT_FALSE(tier_->stats().full);
  EXPECT_EQ(loads->load(), 1);
  catalog_peer peer(dir_ + "/catalog.sqlite");
  const auto reads = [&](std::uint64_t i) {
    return peer.query("SELECT access_count FROM cache_entries WHERE size = " +
                      std::to_string(retry_size(i)));
  };
  EXPECT_EQ(reads(0), 3) << "reads lost with the failed commits";
  EXPECT_EQ(reads(1), 2) << "reads lost with the failed commits";
  const std::string log = err.log();
  EXPECT_EQ(occurrences(log, "commit: database or disk is full"), 2U) << log;
}

TEST_F(disk_tier_test, a_failed_reload_is_retried_while_idle) {
  auto c = config();
  c.full_sync = true;
  auto watch = retry_watch::fast(c);
  auto syncs = std::make_shared<sync_counter>();
  auto broken = std::make_shared<std::atomic<bool>>(false);
  c.sync_fault_for_testing = sync_counter::hook(syncs);
  c.load_fault_for_testing = [broken] { return broken->load() ? EIO : 0; };
  open(c);
  for (std::uint64_t i = 0; i < 4; ++i)
    spill(i, retry_size(i));
  settle();
  ASSERT_TRUE(tier_->pin(key_of(2)).has_value());
  settle();
  // A batch fails, and so does the reload after it.
  broken->store(true);
  syncs->fail_at = syncs->calls + 1;
  const auto lost = spill(10, 512);
  for (const auto& d : settle_expecting({lost})) {
    if (d.id == lost) {
      EXPECT_FALSE(d.status.has_value()) << "acknowledged, yet rolled back";
    }
  }
  // The reload keeps failing: retried, counted, at a bounded pace. (A
  // retry that published its error before `errors` was read may report
  // after `tried`: one more than the three errors expected.)
  const auto tried = watch->seen().size();
  const auto errors = tier_->stats().io_errors;
  EXPECT_TRUE(watch->failed(tried + 4))
      << "the reload was not retried while idle";
  for (const nanos d : watch->seen()) {
    EXPECT_GE(d, c.retry_interval);
    EXPECT_LE(d, c.max_retry_interval);
  }
  EXPECT_GE(tier_->stats().io_errors, errors + 3);
  // What the owner does meanwhile waits in the directory.
  ASSERT_TRUE(tier_->erase(key_of(0)).has_value());
  ASSERT_TRUE(tier_->unpin(key_of(2)).has_value());
  settle();
  // The fault clears. No request follows: a retry reloads, reconciled
  // with the directory, and writes the erase and the unpin.
  broken->store(false);
  EXPECT_TRUE(watch->converged()) << "the reload waited for a request";
  EXPECT_EQ(tier_->stats().blocks, 3U) << "not reloaded";
  catalog_peer peer(dir_ + "/catalog.sqlite");
  EXPECT_EQ(peer.query("SELECT count(*) FROM cache_entries WHERE size = 1024"),
            0)
      << "the erased block's row is still committed";
  EXPECT_EQ(peer.query("SELECT pinned FROM cache_entries WHERE size = 3072"), 0)
      << "the unpin is not committed";
  EXPECT_EQ(peer.query("SELECT count(*) FROM cache_entries"), 3);
  expect_block(1, retry_size(1));
  tier_.reset();
  open(c);
  EXPECT_FALSE(tier_->contains(key_of(0)));
  EXPECT_EQ(tier_->stats().recovered_blocks, 3U);
}

TEST_F(disk_tier_test, a_pending_retry_does_not_hold_up_shutdown) {
  auto c = config();
  c.retry_interval = std::chrono::hours(24);
  c.max_retry_interval = std::chrono::hours(24);
  open(c);
  for (std::uint64_t i = 0; i < 4; ++i)
    spill(i, retry_size(i));
  settle();
  {
    // The erase cannot reach the catalog: a retry is due in a day.
    catalog_peer peer(dir_ + "/catalog.sqlite");
    ASSERT_TRUE(peer.hold());
    ASSERT_TRUE(tier_->erase(key_of(0)).has_value());
    settle();
  }
  // The destructor does not wait for it; its last pass writes the erase.
  tier_.reset();
  open(c);
  EXPECT_FALSE(tier_->contains(key_of(0))) << "an erased block came back";
  EXPECT_EQ(tier_->stats().recovered_blocks, 3U);
}

// A segment too small for a record would hold one: a file per block (0
// was taken before, and 50 blocks made 50 segment files).
TEST_F(disk_tier_test, segments_too_small_for_records_are_refused) {
  for (const std::uint64_t bytes :
       {std::uint64_t{0}, std::uint64_t{100}, min_segment_bytes - 1}) {
    auto c = config();
    c.segment_bytes = bytes;
    auto t = disk_tier::open(c);
    ASSERT_FALSE(t.has_value()) << bytes;
    EXPECT_EQ(t.error().code, errc::invalid_argument);
    EXPECT_NE(t.error().message.find("segment_bytes is " +
                                     std::to_string(bytes) +
                                     "; it must be at least 4096"),
              std::string::npos)
        << t.error().message;
  }
  auto c = config();
  c.segment_bytes = min_segment_bytes;
  auto t = disk_tier::open(c);
  EXPECT_TRUE(t.has_value()) << t.error().describe();
}

TEST_F(disk_tier_test,
       retry_intervals_that_would_spin_or_overflow_are_refused) {
  using std::chrono::hours;
  using std::chrono::seconds;
  const std::pair<nanos, nanos> bad[] = {{nanos{0}, seconds(1)},
                                         {seconds(-1), seconds(1)},
                                         {seconds(2), seconds(1)},
                                         {seconds(1), hours(25)}};
  for (const auto& [first, most] : bad) {
    auto c = config();
    c.retry_interval = first;
    c.max_retry_interval = most;
    auto t = disk_tier::open(c);
    ASSERT_FALSE(t.has_value()) << first.count() << " " << most.count();
    EXPECT_EQ(t.error().code, errc::invalid_argument);
    EXPECT_NE(t.error().message.find("retry_interval"), std::string::npos)
        << t.error().message;
  }
  auto c = config();
  c.retry_interval = hours(24);
  c.max_retry_interval = hours(24);
  // The touch flush interval the same way (nanos::max() overflowed the
  // deadline and flushed at every pass).
  for (const nanos interval : {nanos{-1}, nanos::max(), nanos{hours(25)}}) {
    auto bad_touch = config();
    bad_touch.touch_flush_interval = interval;
    auto t = disk_tier::open(bad_touch);
    ASSERT_FALSE(t.has_value()) << interval.count();
    EXPECT_NE(t.error().message.find("touch_flush_interval"), std::string::npos)
        << t.error().message;
  }
  c.touch_flush_interval = hours(24);
  open(c);
}

TEST_F(disk_tier_test,
       a_compaction_that_failed_while_making_room_is_retried_while_idle) {
  auto c = config_with_segments_of(4);
  c.capacity_bytes = 2 * c.segment_bytes; // segments 1 and 2, full
  c.compaction_threshold = 0.5;
  c.low_watermark = 1.0; // live bytes fit: make room by compacting only
  auto watch = retry_watch::fast(c);
  // Appends past number `fail_after` fail with EIO.
  auto appends = std::make_shared<std::atomic<int>>(0);
  auto fail_after = std::make_shared<std::atomic<int>>(1 << 30);
  c.write_fault_for_testing = [appends, fail_after] {
    return ++*appends > fail_after->load() ? EIO : 0;
  };
  open(c);
  for (std::uint64_t i = 0; i < 8; ++i) // segment 1: 0-3, segment 2: 4-7
    spill(i);
  settle();
  // Segment 1 keeps two blocks of four: at the threshold, not below it.
  for (std::uint64_t i : {0UL, 1UL})
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  EXPECT_EQ(tier_->stats().compactions, 0U);
  // Spill 8 does not fit: make_room compacts segment 1, the segment with
  // the most dead bytes. Block 2 is copied out, block 3's copy fails: the
  // spill fails, and segment 1 is left with one live block of four.
  fail_after->store(appends->load() + 1);
  const auto id = spill(8);
  for (const auto& d : settle_expecting({id})) {
    if (d.id == id) {
      EXPECT_FALSE(d.status.has_value()) << "spilled without room";
    }
  }
  auto s = tier_->stats();
  EXPECT_EQ(s.compactions, 0U);
  EXPECT_GE(s.io_errors, 1U);
  EXPECT_FALSE(tier_->contains(key_of(8)));
  // The disk recovers. No request, removal or compact() follows: segment
  // 1, now below the threshold, is compacted by a retry.
  fail_after->store(1 << 30);
  EXPECT_TRUE(watch->converged())
      << "the compaction that failed in make_room was not retried";
  s = tier_->stats();
  EXPECT_EQ(s.compactions, 1U) << "segment 1's dead bytes stayed on disk";
  // Segment 2, and the segment holding the copies of blocks 2 and 3.
  EXPECT_EQ(s.file_bytes, c.segment_bytes + segment_header_bytes + 2 * rec);
  for (std::uint64_t i = 2; i < 8; ++i)
    expect_block(i);
  EXPECT_EQ(segment_files().size(), tier_->stats().segments);
}

TEST_F(disk_tier_test,
       a_segment_that_lost_blocks_while_active_is_compacted_once_sealed) {
  auto c = config_with_segments_of(4);
  c.compaction_threshold = 0.5;
  open(c);
  for (std::uint64_t i = 0; i < 3; ++i) // segment 1, active, room for one
    spill(i);
  settle();
  // Segment 1 keeps one block of three while it is active: below the
  // threshold, but its two dead records are no more than a full sealed
  // segment may hold, so it is still appended to.
  for (std::uint64_t i : {0UL, 1UL})
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  EXPECT_EQ(tier_->stats().compactions, 0U);
  EXPECT_EQ(tier_->stats().file_bytes, segment_header_bytes + 3 * rec);
  // Spill 3 does not fit the room left and seals it (no block leaves it):
  // it is compacted after the batch.
  const std::uint64_t big = record_header_bytes + 8192;
  spill(3, 8192);
  settle();
  const auto s = tier_->stats();
  EXPECT_EQ(s.compactions, 1U) << "segment 1's dead bytes stayed on disk";
  EXPECT_EQ(s.compaction_bytes_moved, rec);
  // Segment 2 holds block 3 and the copy of block 2.
  EXPECT_EQ(s.file_bytes, segment_header_bytes + big + rec);
  EXPECT_EQ(s.segments, 1U);
  expect_block(2);
  expect_block(3, 8192);
  EXPECT_EQ(segment_files().size(), 1U);
}

TEST_F(disk_tier_test,
       an_active_segment_whose_dead_bytes_pass_the_bound_is_compacted_at_once) {
  auto c = config_with_segments_of(8);
  c.compaction_threshold = 0.5; // the active one may hold 4 dead records
  open(c);
  for (std::uint64_t i = 0; i < 6; ++i) // segment 1, active, not full
    spill(i);
  settle();
  // Four dead records: its live fraction (2 of 6) is below the threshold,
  // but it is still being filled, and four is what a full sealed segment
  // may hold. Compacting it now would copy blocks for nothing.
  for (std::uint64_t i : {0UL, 1UL, 2UL, 3UL})
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  EXPECT_EQ(tier_->stats().compactions, 0U);
  EXPECT_EQ(tier_->stats().file_bytes, segment_header_bytes + 6 * rec);
  // A fifth: sealed, it would be below the threshold whatever came next.
  // It is compacted in the erase's batch; no spill needs to seal it, so a
  // tier that goes idle now does not keep the dead bytes.
  ASSERT_TRUE(tier_->erase(key_of(4)).has_value());
  settle();
  auto s = tier_->stats();
  EXPECT_EQ(s.compactions, 1U) << "the active segment kept its dead bytes";
  EXPECT_EQ(s.compaction_bytes_moved, rec);
  EXPECT_EQ(s.file_bytes, segment_header_bytes + rec); // block 5's copy
  EXPECT_EQ(s.segments, 1U);
  EXPECT_EQ(segment_files().size(), 1U);
  expect_block(5);
  // The copy's segment is the active one now: spills go on there.
  spill(6);
  settle();
  s = tier_->stats();
  EXPECT_EQ(s.file_bytes, segment_header_bytes + 2 * rec);
  EXPECT_EQ(s.segments, 1U);
  expect_block(6);
}

TEST_F(disk_tier_test, an_active_segment_whose_blocks_all_left_is_compacted) {
  // As above, with every block of the active segment erased, past the
  // bound: the file goes, nothing is copied.
  auto c = config_with_segments_of(4);
  c.compaction_threshold = 0.5;
  open(c);
  for (std::uint64_t i = 0; i < 3; ++i)
    spill(i);
  settle();
  for (std::uint64_t i : {0UL, 1UL, 2UL})
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  auto s = tier_->stats();
  EXPECT_EQ(s.compactions, 1U);
  EXPECT_EQ(s.compaction_bytes_moved, 0U);
  EXPECT_EQ(s.file_bytes, 0U);
  EXPECT_EQ(s.segments, 0U);
  EXPECT_TRUE(segment_files().empty());
  spill(3);
  settle();
  expect_block(3);
}

TEST_F(disk_tier_test,
       a_compaction_a_previous_run_left_undone_is_done_after_open) {
  auto c = config_with_segments_of(4);
  c.compaction_threshold = 0.5;
  auto broken = std::make_shared<std::atomic<bool>>(false);
  c.write_fault_for_testing = [broken] { return broken->load() ? EIO : 0; };
  open(c);
  for (std::uint64_t i = 0; i < 12; ++i)
    spill(i);
  settle();
  const auto before = tier_->stats().file_bytes;
  // Segment 1 keeps one block of four, and copying it out fails, also in
  // the destructor's last pass: the tier stops with the work undone.
  broken->store(true);
  for (std::uint64_t i : {0UL, 1UL, 2UL})
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  EXPECT_EQ(tier_->stats().compactions, 0U);
  tier_.reset();
  // The next run: the disk works, and no block leaves segment 1.
  broken->store(false);
  auto watch = retry_watch::fast(c);
  open(c);
  EXPECT_EQ(tier_->stats().recovered_blocks, 9U);
  EXPECT_TRUE(watch->converged()) << "segment 1 was not checked after open";
  const auto s = tier_->stats();
  EXPECT_EQ(s.compactions, 1U) << "segment 1's dead bytes stayed on disk";
  EXPECT_EQ(s.compaction_bytes_moved, rec);
  // Segment 1 went; block 3's copy starts a new segment.
  EXPECT_EQ(s.file_bytes, before - 3 * rec);
  for (std::uint64_t i = 3; i < 12; ++i)
    expect_block(i);
  EXPECT_EQ(segment_files().size(), tier_->stats().segments);
}

TEST_F(disk_tier_test,
       accessed_at_updates_whose_write_failed_are_kept_and_retried) {
  auto c = config();
  // Only flush() and the retries write the updates.
  c.touch_batch = 1000;
  c.touch_flush_interval = std::chrono::hours(1);
  auto watch = retry_watch::fast(c);
  open(c);
  for (std::uint64_t i = 0; i < 4; ++i)
    spill(i, retry_size(i));
  settle();
  // Block i is read i + 1 times.
  clock_.advance(nanos{1000});
  const nanos read_at = clock_.now();
  for (std::uint64_t i = 0; i < 4; ++i)
    for (std::uint64_t k = 0; k <= i; ++k)
      expect_block(i, retry_size(i));
  // Block 2's update fails (a statement error; the batch commits): the
  // updates written before it are committed, it and those after it are
  // not.
  catalog_peer peer(dir_ + "/catalog.sqlite");
  ASSERT_TRUE(peer.exec("CREATE TRIGGER fail_touch BEFORE UPDATE OF "
                        "access_count ON cache_entries WHEN NEW.size = 3072 "
                        "BEGIN SELECT RAISE(ABORT, 'injected'); END"));
  const auto id = tier_->flush();
  bool seen = false;
  for (const auto& d : settle()) {
    if (d.id != id)
      continue;
    seen = true;
    ASSERT_FALSE(d.status.has_value());
    EXPECT_NE(d.status.error().message.find("injected"), std::string::npos)
        << d.status.error().message;
  }
  EXPECT_TRUE(seen);
  EXPECT_EQ(tier_->stats().touch_flushes, 0U);
  // Kept, and retried while idle at a bounded pace.
  ASSERT_TRUE(watch->failed(2)) << "the failed updates were not retried";
  for (const nanos d : watch->seen()) {
    EXPECT_GE(d, c.retry_interval);
    EXPECT_LE(d, c.max_retry_interval);
  }
  // The fault clears; the next retry writes the rest.
  ASSERT_TRUE(peer.exec("DROP TRIGGER fail_touch"));
  EXPECT_TRUE(watch->converged()) << "the kept updates were not written";
  EXPECT_EQ(tier_->stats().touch_flushes, 1U);
  // Every read counted once: none lost, none written twice.
  for (std::uint64_t i = 0; i < 4; ++i)
    expect_reads(peer, i, static_cast<std::int64_t>(i + 1), read_at);
}

TEST_F(
    disk_tier_test,
    accessed_at_updates_of_a_batch_whose_commit_failed_are_kept_and_retried) {
  auto c = config();
  c.full_sync = true;
  // Only flush() and the retries write the updates.
  c.touch_batch = 1000;
  c.touch_flush_interval = std::chrono::hours(1);
  auto watch = retry_watch::fast(c);
  auto syncs = std::make_shared<sync_counter>();
  auto gate = std::make_shared<append_gate>();
  const append_gate::guard gate_guard{gate};
  c.sync_fault_for_testing = sync_counter::hook(syncs);
  c.write_fault_for_testing = append_gate::hook(gate);
  open(c);
  for (std::uint64_t i = 0; i < 4; ++i)
    spill(i, retry_size(i));
  settle();
  // Block i is read i + 1 times.
  clock_.advance(nanos{1000});
  const nanos first_reads = clock_.now();
  for (std::uint64_t i = 0; i < 4; ++i)
    for (std::uint64_t k = 0; k <= i; ++k)
      expect_block(i, retry_size(i));
  // Spill 10 holds the I/O thread. The next batch reads block 1, writes
  // every pending update (flush), reads block 3 (an update written by no
  // one yet) and fails at its sync: the catalog rolls the writes back.
  gate->armed = true;
  spill(10, 512);
  gate->entered.get_future().wait();
  clock_.advance(nanos{1000});
  const nanos last_reads = clock_.now();
  const auto read_1 = tier_->fetch(key_of(1));
  const auto flushed = tier_->flush();
  const auto read_3 = tier_->fetch(key_of(3));
  const auto lost = spill(11, 512);
  syncs->fail_at = syncs->calls + 2;
  gate->open();
  for (const auto& d : settle_expecting({read_1, read_3, flushed, lost})) {
    if (d.id == read_1 || d.id == read_3) {
      EXPECT_TRUE(d.status.has_value()) << d.status.error().describe();
    }
    if (d.id == flushed || d.id == lost) {
      EXPECT_FALSE(d.status.has_value()) << "acknowledged, yet rolled back";
    }
  }
  // No request follows: a retry writes the updates again.
  EXPECT_TRUE(watch->converged()) << "the updates were not retried";
  // Every read counted once, at its latest time.
  catalog_peer peer(dir_ + "/catalog.sqlite");
  const std::int64_t counts[] = {1, 3, 3, 5};
  const nanos times[] = {first_reads, last_reads, first_reads, last_reads};
  for (std::uint64_t i = 0; i < 4; ++i)
    expect_reads(peer, i, counts[i], times[i]);
}

TEST_F(disk_tier_test,
       accessed_at_updates_of_a_failed_batch_wait_for_a_reload_that_failed) {
  auto c = config();
  c.full_sync = true;
  c.touch_batch = 1000;
  c.touch_flush_interval = std::chrono::hours(1);
  auto watch = retry_watch::fast(c);
  auto syncs = std::make_shared<sync_counter>();
  auto broken = std::make_shared<std::atomic<bool>>(false);
  c.sync_fault_for_testing = sync_counter::hook(syncs);
  c.load_fault_for_testing = [broken] { return broken->load() ? EIO : 0; };
  open(c);
  for (std::uint64_t i = 0; i < 4; ++i)
    spill(i, retry_size(i));
  settle();
  clock_.advance(nanos{1000});
  const nanos read_at = clock_.now();
  for (std::uint64_t i = 0; i < 4; ++i)
    for (std::uint64_t k = 0; k <= i; ++k)
      expect_block(i, retry_size(i));
  // A batch fails with the updates pending, and so does the reload after
  // it, a few times.
  broken->store(true);
  syncs->fail_at = syncs->calls + 1;
  spill(10, 512);
  settle();
  const auto tried = watch->seen().size();
  EXPECT_TRUE(watch->failed(tried + 2)) << "the reload was not retried";
  // Block 0 goes meanwhile: its update goes with it.
  ASSERT_TRUE(tier_->erase(key_of(0)).has_value());
  settle();
  broken->store(false);
  EXPECT_TRUE(watch->converged()) << "the reload waited for a request";
  catalog_peer peer(dir_ + "/catalog.sqlite");
  EXPECT_EQ(peer.query("SELECT count(*) FROM cache_entries"), 3);
  for (std::uint64_t i = 1; i < 4; ++i)
    expect_reads(peer, i, static_cast<std::int64_t>(i + 1), read_at);
}

TEST_F(
    disk_tier_test,
    eviction_goes_on_past_failed_accessed_at_writes_sparing_the_read_blocks) {
  // As in capacity_eviction_takes_least_recently_used_unpinned, but the
  // reads of blocks 1 and 2 cannot be written to the catalog: the spills
  // that need room still get it, and eviction still passes over 1 and 2.
  auto c = config_with_segments_of(4);
  c.capacity_bytes = 4 * (segment_header_bytes + 4 * rec); // 16 blocks
  c.low_watermark = 0.75;
  c.touch_batch = 1000;
  c.touch_flush_interval = std::chrono::hours(1);
  c.retry_interval = std::chrono::hours(1); // only batches retry here
  c.max_retry_interval = std::chrono::hours(1);
  open(c);
  for (std::uint64_t i = 0; i < 12; ++i) {
    clock_.advance(nanos{1000});
    spill(i);
    settle();
  }
  clock_.advance(nanos{1000});
  expect_block(1);
  expect_block(2);
  catalog_peer peer(dir_ + "/catalog.sqlite");
  ASSERT_TRUE(peer.exec("CREATE TRIGGER fail_touch BEFORE UPDATE OF "
                        "access_count ON cache_entries BEGIN SELECT "
                        "RAISE(ABORT, 'injected'); END"));
  for (std::uint64_t i = 12; i < 18; ++i) {
    clock_.advance(nanos{1000});
    spill(i);
    for (const auto& d : settle())
      EXPECT_TRUE(d.status.has_value()) << d.status.error().describe();
  }
  auto s = tier_->stats();
  EXPECT_GT(s.evictions, 0U);
  EXPECT_GT(s.io_errors, 0U) << "the failed writes are counted";
  EXPECT_EQ(s.touch_flushes, 0U);
  EXPECT_LE(s.file_bytes, c.capacity_bytes);
  EXPECT_TRUE(tier_->contains(key_of(1))) << "read, so not evicted";
  EXPECT_TRUE(tier_->contains(key_of(2))) << "read, so not evicted";
  EXPECT_FALSE(tier_->contains(key_of(0))) << "least recently used goes first";
  EXPECT_FALSE(tier_->contains(key_of(3))) << "least recently used goes first";
  for (std::uint64_t i = 12; i < 18; ++i)
    EXPECT_TRUE(tier_->contains(key_of(i)));
  // The fault clears: the kept updates are written, once each.
  ASSERT_TRUE(peer.exec("DROP TRIGGER fail_touch"));
  const auto id = tier_->flush();
  for (const auto& d : settle_expecting({id})) {
    if (d.id == id) {
      EXPECT_TRUE(d.status.has_value()) << d.status.error().describe();
    }
  }
  EXPECT_EQ(tier_->stats().touch_flushes, 1U);
  EXPECT_EQ(peer.query("SELECT COUNT(*) FROM cache_entries WHERE "
                       "access_count = 1"),
            2);
  EXPECT_EQ(peer.query("SELECT COUNT(*) FROM cache_entries WHERE "
                       "access_count > 1"),
            0);
}

TEST_F(disk_tier_test,
       a_compaction_refused_by_a_full_disk_sets_full_and_its_retry_clears_it) {
  auto c = config_with_segments_of(4);
  c.compaction_threshold = 0.5;
  auto watch = retry_watch::fast(c);
  auto full = simulate_full_disk(c);
  open(c);
  for (std::uint64_t i = 0; i < 12; ++i)
    spill(i);
  settle();
  // Segment 1 keeps one block of four; its copy finds the file system full.
  full->store(true);
  for (std::uint64_t i : {0UL, 1UL, 2UL})
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  settle();
  auto s = tier_->stats();
  EXPECT_EQ(s.compactions, 0U);
  EXPECT_TRUE(s.full) << "spills would run into the full file system";
  EXPECT_EQ(s.io_errors, 0U) << "a full file system is not an I/O error";
  const auto bytes = block_bytes(12, 4096);
  auto refused = tier_->spill(key_of(12), ns_a, codec::int8, bytes,
                              block_checksum(bytes), nanos{0}, nanos{0}, false);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, errc::out_of_memory);
  // Retried while full, at a bounded pace, still not counted as errors.
  ASSERT_TRUE(watch->failed(2)) << "the compaction was not retried";
  s = tier_->stats();
  EXPECT_TRUE(s.full);
  EXPECT_EQ(s.io_errors, 0U);
  // Space comes back (freed outside the tier). The retry compacts, and
  // unlinking segment 1 lets spills in again: no erase or request needed.
  full->store(false);
  EXPECT_TRUE(watch->converged()) << "the compaction was not retried";
  s = tier_->stats();
  EXPECT_EQ(s.compactions, 1U);
  EXPECT_FALSE(s.full) << "spills stay refused though space came back";
  EXPECT_EQ(s.io_errors, 0U);
  spill(12);
  settle();
  for (std::uint64_t i = 3; i < 13; ++i)
    expect_block(i);
}

TEST_F(disk_tier_test,
       a_full_tier_accepts_spills_again_once_space_is_freed_elsewhere) {
  // The operator frees space outside the tier (as the log line asks): no
  // segment of the tier's is unlinked, nothing is erased or compacted, and
  // no request comes. The retries look at the free space.
  auto c = config();
  auto watch = retry_watch::fast(c);
  auto full = simulate_full_disk(c);
  open(c);
  for (std::uint64_t i = 0; i < 4; ++i)
    spill(i);
  settle();
  full->store(true);
  const auto id = spill(10);
  for (const auto& d : settle_expecting({id})) {
    if (d.id == id) {
      EXPECT_EQ(d.status.error().code, errc::out_of_memory);
    }
  }
  // Still full at each look, at a bounded pace.
  ASSERT_TRUE(watch->failed(2)) << "a full tier never looked again";
  for (const nanos d : watch->seen()) {
    EXPECT_GE(d, c.retry_interval);
    EXPECT_LE(d, c.max_retry_interval);
  }
  EXPECT_TRUE(tier_->stats().full);
  full->store(false);
  EXPECT_TRUE(watch->converged()) << "spills stay refused though space came";
  auto s = tier_->stats();
  EXPECT_FALSE(s.full);
  EXPECT_EQ(s.compactions, 0U);
  EXPECT_EQ(s.evictions, 0U);
  EXPECT_EQ(s.io_errors, 0U);
  spill(11);
  settle();
  for (std::uint64_t i : {0UL, 1UL, 2UL, 3UL, 11UL})
    expect_block(i);
}

// A block larger than min_free_bytes finds the file system full. Its
// partial record is cut off again, so the free space is back above
// min_free_bytes, and yet the same write would fail again. Before, the
// next look at the free space let spills in again: each one ran into the
// full file system, and each round logged "full" and "accepting spills
// again" anew. Spills are accepted again once the write that failed fits
// on top of min_free_bytes, and the two lines are logged once until a
// spill gets through.
TEST_F(disk_tier_test,
       a_block_larger_than_min_free_bytes_keeps_a_full_tier_full) {
  auto c = config();
  c.min_free_bytes = 64 << 10;
  auto watch = retry_watch::fast(c);
  auto full = std::make_shared<std::atomic<bool>>(false);
  auto writes_refused = std::make_shared<std::atomic<int>>(0);
  auto free_bytes = std::make_shared<std::atomic<std::uint64_t>>(0);
  c.write_fault_for_testing = [full, writes_refused] {
    if (!full->load())
      return 0;
    ++*writes_refused;
    return ENOSPC;
  };
  c.free_bytes_for_testing = [free_bytes] { return free_bytes->load(); };
  constexpr std::size_t big = 256 << 10;
  // What is free once a 256 KiB record failed and was cut off, and what
  // it takes for that record to fit.
  const std::uint64_t short_of_it = c.min_free_bytes + (128 << 10);
  const std::uint64_t room = c.min_free_bytes + record_header_bytes + big;
  open(c);
  spill(0);
  settle();
  stderr_log err;
  full->store(true);
  free_bytes->store(short_of_it);
  spill(1, big);
  settle();
  ASSERT_TRUE(tier_->stats().full);
  // A batch looks at the free space: min_free_bytes are there, the block
  // would not fit.
  tier_->flush();
  settle();
  EXPECT_TRUE(tier_->stats().full) << "let in with room for min_free_bytes";
  for (std::uint64_t i = 2; i < 5; ++i) {
    const auto bytes = block_bytes(i, 4096);
    const auto refused =
        tier_->spill(key_of(i), ns_a, codec::int8, bytes, block_checksum(bytes),
                     clock_.now(), nanos{0}, false);
    EXPECT_FALSE(refused.has_value()) << "spill " << i << " was taken";
  }
  settle();
  // Nor does a retry while idle let spills in.
  const auto seen = watch->seen().size();
  ASSERT_TRUE(watch->passes(seen + 1)) << "a full tier never looked again";
  EXPECT_NE(watch->seen().at(seen), nanos{0}) << "a retry let spills in";
  EXPECT_TRUE(tier_->stats().full);
  EXPECT_EQ(writes_refused->load(), 1)
      << "spills kept writing onto the full file system";
  // Room for the block on top of min_free_bytes: spills are let in.
  free_bytes->store(room);
  full->store(false);
  EXPECT_TRUE(watch->converged()) << "spills stay refused though space came";
  EXPECT_FALSE(tier_->stats().full);
  // Full again before a spill got through: not logged again.
  full->store(true);
  free_bytes->store(short_of_it);
  spill(5, big);
  settle();
  EXPECT_TRUE(tier_->stats().full);
  free_bytes->store(room);
  full->store(false);
  tier_->flush();
  settle();
  EXPECT_FALSE(tier_->stats().full);
  spill(1, big);
  settle();
  expect_block(1, big);
  expect_block(0);
  // A spill got through: the next full file system is news again.
  full->store(true);
  free_bytes->store(short_of_it);
  spill(6, big);
  settle();
  EXPECT_TRUE(tier_->stats().full);
  EXPECT_EQ(writes_refused->load(), 3);
  const std::string log = err.log();
  EXPECT_EQ(occurrences(log, "the file system is full"), 2U) << log;
  EXPECT_EQ(occurrences(log, "accepting spills again"), 1U) << log;
}

TEST_F(disk_tier_test,
       work_rolled_back_with_a_failed_batch_is_not_reported_or_counted_done) {
  auto c = config_with_segments_of(4);
  c.full_sync = true;
  c.compaction_threshold = 0.5;
  // Only flush() and the retries write the updates.
  c.touch_batch = 1000;
  c.touch_flush_interval = std::chrono::hours(1);
  auto watch = retry_watch::fast(c);
  auto syncs = std::make_shared<sync_counter>();
  auto gate = std::make_shared<append_gate>();
  const append_gate::guard gate_guard{gate};
  c.sync_fault_for_testing = sync_counter::hook(syncs);
  c.write_fault_for_testing = append_gate::hook(gate);
  open(c);
  for (std::uint64_t i = 0; i < 8; ++i)
    spill(i);
  settle();
  expect_block(5);
  // Spill 10 holds the I/O thread (a batch of its own). The next batch
  // erases three of segment 1's four blocks, compacts it (compact()),
  // writes the pending update (flush()) and fails at its sync: the
  // catalog rolls all of it back.
  gate->armed = true;
  spill(10);
  gate->entered.get_future().wait();
  for (std::uint64_t i : {0UL, 1UL, 2UL})
    ASSERT_TRUE(tier_->erase(key_of(i)).has_value());
  const auto compacted = tier_->compact();
  const auto flushed = tier_->flush();
  // The operator's report, read inside the same transaction, describes a
  // catalog that never was: blocks 0-2 gone, spill 11 there.
  spill(11);
  const auto reported = tier_->report(4);
  syncs->fail_at = syncs->calls + 2;
  gate->open();
  int answered = 0;
  for (const auto& d : settle_expecting({compacted, flushed, reported})) {
    if (d.id == compacted) {
      ++answered;
      EXPECT_FALSE(d.status.has_value()) << "reported done, yet rolled back";
      EXPECT_EQ(d.count, 0U) << "segments compacted, yet rolled back";
    }
    if (d.id == flushed) {
      EXPECT_FALSE(d.status.has_value());
    }
    if (d.id == reported) {
      ++answered;
      EXPECT_FALSE(d.status.has_value()) << "a report of a rolled-back state";
      EXPECT_FALSE(d.report);
    }
  }
  EXPECT_EQ(answered, 2);
  // The retry does the work again, and it is counted once.
  EXPECT_TRUE(watch->converged()) << "the rolled-back work was not retried";
  const auto s = tier_->stats();
  EXPECT_EQ(s.compactions, 1U);
  EXPECT_EQ(s.compaction_bytes_moved, rec);
  EXPECT_EQ(s.touch_flushes, 1U);
  for (std::uint64_t i : {3UL, 4UL, 5UL, 6UL, 7UL, 10UL})
    expect_block(i);
  EXPECT_EQ(segment_files().size(), tier_->stats().segments);
}

TEST_F(disk_tier_test, batches_count_requests_and_retries_the_idle_passes) {
  auto c = config();
  auto watch = retry_watch::fast(c);
  auto full = simulate_full_disk(c);
  open(c);
  EXPECT_EQ(tier_->stats().batches, 0U);
  spill(0);
  settle();
  // Spill 1 finds the file system full: the tier retries while idle, and
  // each retry pass carries no request.
  full->store(true);
  spill(1);
  settle();
  ASSERT_TRUE(watch->failed(2)) << "a full tier never looked again";
  full->store(false);
  ASSERT_TRUE(watch->converged());
  auto s = tier_->stats();
  EXPECT_EQ(s.batches, 2U) << "passes without requests counted as batches";
  EXPECT_EQ(s.retries, watch->seen().size());
  EXPECT_GE(s.retries, 3U);
  expect_block(0);
  s = tier_->stats();
  EXPECT_EQ(s.batches, 3U);
  EXPECT_EQ(s.retries, watch->seen().size());
}

TEST_F(disk_tier_test, a_full_tier_looks_at_the_free_space_statvfs_reports) {
  // No free-space hook: the tier asks statvfs about its directory, which
  // has room on the machine running the tests (the write fault alone made
  // the tier full), so the first look lets spills in again.
  auto c = config();
  auto watch = retry_watch::fast(c);
  auto full = std::make_shared<std::atomic<bool>>(false);
  c.write_fault_for_testing = [full] { return full->load() ? ENOSPC : 0; };
  open(c);
  full->store(true);
  spill(0);
  settle();
  full->store(false);
  EXPECT_TRUE(watch->converged()) << "the tier never looked at statvfs";
  EXPECT_FALSE(tier_->stats().full);
  spill(1);
  settle();
  expect_block(1);
}

} // namespace
} // namespace kvfleet::engine
