// block_store with a disk tier below it: spill on eviction, promotion on a
// hit, restart recovery, pins across restarts, damaged bytes on disk.
#include "engine/block_store.hpp"
#include "engine/checksum.hpp"
#include "engine/testing/io_gate.hpp"
#include "engine/testing/old_disk_catalog.hpp"
#include "engine/testing/store_checks.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <thread>
#include <vector>

namespace kvfleet::engine {
namespace {

namespace fs = std::filesystem;

namespace_spec spec() {
  namespace_spec s;
  s.model = "disk-test";
  s.layers = 1;
  s.kv_heads = 1;
  s.head_dim = 64;
  s.block_tokens = 16; // 4 KiB per block
  return s;
}
constexpr std::size_t block_bytes = 4096;

/// An arena the host cannot address, as device memory is: host_data() is
/// null and bytes move only through read() and write(), which count their
/// calls.
class unaddressable_backend final : public memory_backend {
public:
  explicit unaddressable_backend(std::size_t bytes) : bytes_(bytes) {}
  [[nodiscard]] std::string_view name() const noexcept override {
    return "unaddressable";
  }
  [[nodiscard]] std::size_t size() const noexcept override {
    return bytes_.size();
  }
  [[nodiscard]] std::byte* host_data() noexcept override { return nullptr; }
  [[nodiscard]] result<void> write(std::size_t offset,
                                   std::span<const std::byte> src) override {
    if (offset > bytes_.size() || src.size() > bytes_.size() - offset)
      return make_error(errc::invalid_argument, "write out of bounds");
    std::copy(src.begin(), src.end(),
              bytes_.begin() + static_cast<std::ptrdiff_t>(offset));
    ++writes;
    return {};
  }
  [[nodiscard]] result<void> read(std::size_t offset,
                                  std::span<std::byte> dst) const override {
    if (offset > bytes_.size() || dst.size() > bytes_.size() - offset)
      return make_error(errc::invalid_argument, "read out of bounds");
    const auto* from = bytes_.data() + offset;
    std::copy(from, from + dst.size(), dst.begin());
    return {};
  }
  [[nodiscard]] result<std::uint64_t> checksum(std::size_t offset,
                                               std::size_t len) const override {
    if (offset > bytes_.size() || len > bytes_.size() - offset)
      return make_error(errc::invalid_argument, "checksum out of bounds");
    return block_checksum({bytes_.data() + offset, len});
  }
  std::size_t writes = 0;

private:
  std::vector<std::byte> bytes_;
};

class store_disk_test : public ::testing::Test {
protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kvfleet-store-disk-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    open();
  }
  void TearDown() override {
    store_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  /// (Re)opens the disk tier and a store of `blocks` blocks over it; with
  /// `unaddressable`, the store's arena is an unaddressable_backend.
  /// `tweak` may change the disk tier's configuration (fault hooks).
  void open(std::size_t blocks = 20, bool unaddressable = false,
            const std::function<void(disk_tier_config&)>& tweak = {}) {
    store_.reset(); // closes the previous tier first
    disk_tier_config dc;
    dc.directory = dir_;
    dc.clock = disk_clock_;
    dc.capacity_bytes = std::uint64_t{64} << 20;
    dc.segment_bytes = std::uint64_t{1} << 20;
    if (tweak)
      tweak(dc);
    auto tier = disk_tier::open(dc);
    ASSERT_TRUE(tier.has_value()) << tier.error().describe();
    store_config cfg;
    cfg.capacity_bytes = blocks * block_bytes;
    cfg.slab_bytes = block_bytes;
    cfg.policy = policy_;
    cfg.adaptive_compression = false;
    cfg.max_pinned_fraction = max_pinned_fraction_;
    cfg.clock = store_clock_;
    unaddressable_ = nullptr;
    auto s = [&] {
      if (!unaddressable)
        return block_store::create(cfg);
      auto b = std::make_unique<unaddressable_backend>(cfg.capacity_bytes);
      unaddressable_ = b.get();
      return block_store::create(cfg, std::move(b));
    }();
    ASSERT_TRUE(s.has_value()) << s.error().describe();
    store_ = std::move(*s);
    ASSERT_TRUE(store_->attach_disk(std::move(*tier)).has_value());
    ns_ = *store_->register_namespace(spec());
  }

  std::vector<block_key> chain(std::uint64_t first, std::size_t n) const {
    return testing::chain_of(spec(), first, n);
  }

  process_result run(const std::vector<block_key>& keys) {
    return testing::process_chain(*store_, ns_, spec(), keys, producer_);
  }

  void expect_correct(const block_key& k) {
    testing::expect_produced_bytes(*store_, ns_, spec(), producer_, k);
  }

  /// Runs other requests until the blocks cached before have left memory
  /// for the disk (20 blocks of memory, 40 blocks of requests).
  void push_out_to_disk() {
    for (std::uint64_t i = 0; i < 10; ++i)
      run(chain(1000 * (i + 1), 4));
  }

  /// Flips one byte of every segment file, `offset` bytes into it; false
  /// when there is no segment file.
  [[nodiscard]] bool flip_byte_in_segments(std::streamoff offset) const {
    bool flipped = false;
    for (const auto& e : fs::directory_iterator(dir_)) {
      if (e.path().extension() != ".kvs")
        continue;
      std::fstream f(e.path(), std::ios::in | std::ios::out | std::ios::binary);
      f.seekg(offset);
      char c = 0;
      f.read(&c, 1);
      c = static_cast<char>(c ^ 0x5a);
      f.seekp(offset);
      f.write(&c, 1);
      flipped = true;
    }
    return flipped;
  }

  /// Offset in a segment file of the payload of its `n`th record (from 0)
  /// of one uncompressed block: records are appended in commit order, an
  /// 80-byte header, then the payload, after the 32-byte file header.
  static std::streamoff payload_of_record(std::streamoff n) {
    return 32 + n * (80 + std::streamoff{block_bytes}) + 80;
  }

  /// Runs a one-block request for `key` at priority `p`.
  void run_at(const block_key& key, priority p) {
    put_options o;
    o.prio = p;
    ASSERT_TRUE(store_
                    ->process(ns_, std::vector<block_key>{key},
                              spec().block_tokens, producer_, o)
                    .has_value());
  }

  /// Evicts every block (to disk) and waits until the disk holds them.
  void spill_everything() {
    store_->evict_bytes(std::size_t{1} << 30);
    ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
    store_->poll_disk();
    ASSERT_EQ(store_->block_count(), 0U);
  }

  /// Fills memory with `n` one-block normal requests (more blocks than
  /// memory holds, so the store makes room over and over), new keys from
  /// `first` on.
  void flood(std::uint64_t first, std::size_t n) {
    for (std::uint64_t i = 0; i < n; ++i)
      run(chain(first + i, 1));
  }

  std::string dir_;
  policy_kind policy_ = policy_kind::lru; ///< the store's, at open()
  double max_pinned_fraction_ = store_config{}.max_pinned_fraction; ///< "
  synthetic_producer producer_;
  std::unique_ptr<block_store> store_;
  unaddressable_backend* unaddressable_ = nullptr; ///< owned by store_
  /// open()'s clocks for the store and its disk tier (wall time); null:
  /// the defaults.
  const clock_source* store_clock_ = nullptr;
  const clock_source* disk_clock_ = nullptr;
  /// Clocks a test moves, for the store and (wall time) its disk tier.
  struct test_clocks {
    manual_clock store{nanos{1'000'000'000}};
    manual_clock wall{std::chrono::hours(24 * 365 * 50)};
  };
  test_clocks clocks_;
  /// Reopens the store and its disk tier on clocks_ (they outlive store_).
  /// Puts root block `key` of namespace `ns` (registered with `s`) with
  /// `opts` through reserve(), write() and commit(); returns whether it
  /// was cached already (a repeat put), or nullopt when a step failed (the
  /// test has failed then).
  std::optional<bool> put_root(ns_id ns, const namespace_spec& s,
                               const block_key& key, const put_options& opts) {
    auto h = store_->reserve(ns, key, {}, opts);
    if (!h) {
      ADD_FAILURE() << h.error().describe();
      return std::nullopt;
    }
    std::vector<std::byte> value(s.value_bytes());
    if (!producer_.produce(s, key, value) || !store_->write(*h, value) ||
        !store_->commit(*h)) {
      ADD_FAILURE() << "the put of " << key.to_hex() << " failed";
      return std::nullopt;
    }
    return h->already_cached();
  }
  /// Requests `keys` (one request) pinned with `ttl`, and persists: the
  /// blocks are in memory and pinned on disk.
  void put_pinned_on_disk(const std::vector<block_key>& keys,
                          std::optional<nanos> ttl = std::nullopt) {
    put_options pinned;
    pinned.pin = true;
    pinned.ttl = ttl;
    ASSERT_TRUE(store_
                    ->process(ns_, keys, keys.size() * spec().block_tokens,
                              producer_, pinned)
                    .has_value());
    ASSERT_TRUE(store_->persist(std::chrono::seconds(30)).has_value());
  }
  /// A second namespace, "ttl-model", whose blocks expire after 100 s
  /// unless a put says otherwise.
  static namespace_spec ttl_model_spec() {
    namespace_spec s = spec();
    s.model = "ttl-model";
    return s;
  }
  static namespace_options ttl_model_options() {
    namespace_options o;
    o.ttl = std::chrono::seconds(100);
    return o;
  }
  /// The fixture's spec under another model name.
  static namespace_spec another_model_spec() {
    namespace_spec s = spec();
    s.model = "another-model";
    return s;
  }
  /// Requests `keys`, spills every block, reopens the store and registers
  /// `other` beside the fixture's namespace; returns its id.
  ns_id spill_and_reopen_with(const std::vector<block_key>& keys,
                              const namespace_spec& other) {
    run(keys);
    spill_everything();
    open();
    auto b = store_->register_namespace(other);
    EXPECT_TRUE(b.has_value()) << b.error().describe();
    return b.value_or(ns_id{});
  }
  /// put_root() in the fixture's namespace.
  std::optional<bool> put_root(const block_key& key, const put_options& opts) {
    return put_root(ns_, spec(), key, opts);
  }

  test_clocks& open_on_test_clocks() {
    store_clock_ = &clocks_.store;
    disk_clock_ = &clocks_.wall;
    open();
    return clocks_;
  }
  ns_id ns_;
};

TEST_F(store_disk_test,
       a_producer_failing_for_a_block_whose_read_failed_is_asked_once) {
  // a[0]'s disk record is damaged, so the promotion computes it; the
  // producer fails for it. The request fails with that error, and the
  // producer was asked once. (Before, the error was dropped and process()
  // reserved a[0] again and asked the producer a second time.)
  const auto a = chain(1, 2);
  run({a[0]});
  spill_everything(); // record 0: a[0]
  run(a);
  spill_everything();
  ASSERT_TRUE(flip_byte_in_segments(32 + 1)); // record 0's header
  struct refusing final : kv_producer {
    block_key bad{};
    int asked = 0;
    result<void> produce(const namespace_spec& s, const block_key& k,
                         std::span<std::byte> out) override {
      if (k == bad) {
        ++asked;
        return make_error(errc::backend_error, "no GPU for this one (test)");
      }
      return synthetic_producer{}.produce(s, k, out);
    }
    nanos cost(std::size_t) const noexcept override { return nanos{0}; }
  } producer;
  producer.bad = a[0];
  auto r = store_->process(ns_, a, 2 * spec().block_tokens, producer, {});
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, errc::backend_error) << r.error().describe();
  EXPECT_EQ(producer.asked, 1);
  store_->check_invariants();
}

TEST_F(store_disk_test, blocks_read_before_a_producer_fails_count_as_hits) {
  // a[0] reads back fine, a[1]'s record is damaged and the producer fails
  // for it: the request fails, a[0] stays cached and counts as a block
  // hit read from disk. (The first form of the producer-error fix failed
  // the request before counting the run: a[0] counted as a miss.)
  const auto a = chain(1, 2);
  run({a[0]});
  spill_everything(); // record 0: a[0]
  run(a);
  spill_everything(); // record 1: a[1]; a[0]'s copy stays
  ASSERT_TRUE(flip_byte_in_segments(payload_of_record(1) - 79)); // a[1]
  struct refusing final : kv_producer {
    block_key bad{};
    result<void> produce(const namespace_spec& s, const block_key& k,
                         std::span<std::byte> out) override {
      if (k == bad)
        return make_error(errc::backend_error, "no GPU for this one (test)");
      return synthetic_producer{}.produce(s, k, out);
    }
    nanos cost(std::size_t) const noexcept override { return nanos{0}; }
  } producer;
  producer.bad = a[1];
  const auto before = store_->stats();
  auto r = store_->process(ns_, a, 2 * spec().block_tokens, producer, {});
  ASSERT_FALSE(r.has_value());
  EXPECT_TRUE(store_->contains(ns_, a[0]));
  const auto after = store_->stats();
  EXPECT_EQ(after.block_hits - before.block_hits, 1U);
  EXPECT_EQ(after.block_misses - before.block_misses, 1U);
  EXPECT_EQ(after.disk_block_hits - before.disk_block_hits, 1U);
  store_->check_invariants();
}

TEST_F(store_disk_test,
       a_pinned_request_pins_every_block_when_a_disk_read_fails) {
  // a[0]'s disk record is damaged, a[1] and a[2] read back fine: a[0] is
  // computed again inside the promotion, the others promoted after it.
  // With pin every block ends pinned. (Before, only the matched prefix,
  // none here, was pinned after the compute loop: all three were left
  // unpinned, though process() succeeded.)
  const auto a = chain(1, 3);
  run({a[0]});
  spill_everything(); // record 0: a[0]
  run(a);             // a[0] back from disk, a[1] and a[2] computed
  spill_everything(); // records 1 and 2: a[2], a[1]; a[0]'s copy stays
  ASSERT_TRUE(flip_byte_in_segments(32 + 1)); // record 0's header
  put_options pin;
  pin.pin = true;
  auto r = store_->process(ns_, a, 3 * spec().block_tokens, producer_, pin);
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  EXPECT_GE(store_->stats().promotion_failures, 1U);
  store_->check_invariants();
  for (std::size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(store_->contains(ns_, a[i])) << "block " << i;
    auto u = store_->unpin(ns_, a[i]);
    EXPECT_TRUE(u.has_value())
        << "block " << i << ": " << (u ? std::string{} : u.error().describe());
  }
}

// A block process() brought back from disk stays while the rest of the
// request is computed. Here k1 came back alone (a reader holds it), so
// k0's promotion cannot link it under k0 (adopt() waits for the reader),
// and k0 is an evictable leaf when room is made for k2. Before, k0 was
// evicted in that same call, and the reply counted it matched.
TEST_F(store_disk_test, blocks_a_request_brought_back_stay_while_it_computes) {
  open(4);
  const auto k = chain(1, 3);
  run({k[0], k[1]});
  spill_everything();
  auto reader = store_->acquire(ns_, k[1]); // back alone, held
  ASSERT_TRUE(reader.has_value()) << reader.error().describe();
  put_options pin;
  pin.pin = true;
  for (std::uint64_t i = 0; i < 2; ++i)
    ASSERT_TRUE(store_
                    ->process(ns_, chain(100 + 10 * i, 1), spec().block_tokens,
                              producer_, pin)
                    .has_value());
  const auto evictions = store_->stats().evictions;
  auto r = store_->process(ns_, k, 3 * spec().block_tokens, producer_);
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  EXPECT_EQ(r->matched_blocks, 2U);
  EXPECT_EQ(r->uncached_blocks, 1U); // no room left for it
  EXPECT_EQ(store_->stats().evictions, evictions);
  EXPECT_TRUE(store_->contains(ns_, k[0]));
  store_->check_invariants();
}

// Pins a disk copy brings back are never refused, even past a lowered
// limit; a pinned request that adds no pin (its blocks pinned in memory
// or on disk) is not refused either. Before, a restart with a lower
// limit refused every pinned request from then on, repeats included.
TEST_F(store_disk_test, a_lowered_pin_limit_refuses_new_pins_only) {
  max_pinned_fraction_ = 1.0;
  open(16);
  put_options pin;
  pin.pin = true;
  const auto c = chain(1, 4);
  const auto d = chain(100, 6);
  put_pinned_on_disk(c);
  put_pinned_on_disk(d);
  max_pinned_fraction_ = 0.5; // 8 blocks
  open(16);
  ASSERT_TRUE(store_->process(ns_, d, 96, producer_).has_value());
  EXPECT_EQ(store_->pinned_bytes(), 6 * block_bytes);        // back, unrefused
  auto warm_c = store_->process(ns_, c, 64, producer_, pin); // on disk
  ASSERT_TRUE(warm_c.has_value()) << warm_c.error().describe();
  EXPECT_EQ(store_->pinned_bytes(), 10 * block_bytes);
  auto again = store_->process(ns_, d, 96, producer_, pin); // in memory
  ASSERT_TRUE(again.has_value()) << again.error().describe();
  auto fresh = store_->process(ns_, chain(200, 1), 16, producer_, pin);
  ASSERT_FALSE(fresh.has_value()) << "a new pin past the limit";
  EXPECT_EQ(fresh.error().code, errc::out_of_memory);
  store_->check_invariants();
}

// A promote() of a chain pinned on disk lands inside a pinned process()
// after its check: the pins it brings back do not refuse the request's
// later blocks. Before, they were computed uncached, the request half
// pinned.
TEST_F(store_disk_test, pins_landing_mid_request_do_not_half_pin_it) {
  open(16);
  put_options pin;
  pin.pin = true;
  const auto c = chain(1, 4);
  put_pinned_on_disk(c);
  open(16);
  put_options low;
  low.prio = priority::low;
  ASSERT_TRUE(store_->promote(ns_, c, low).has_value());
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
  EXPECT_EQ(store_->pinned_bytes(), 0U); // not collected yet
  auto out = store_->process(ns_, chain(100, 6), 96, producer_, pin);
  ASSERT_TRUE(out.has_value()) << out.error().describe();
  EXPECT_EQ(out->uncached_blocks, 0U);
  EXPECT_EQ(store_->pinned_bytes(), 10 * block_bytes);
  store_->check_invariants();
}

// A chain pinned on disk whose copies cannot be read (damaged record
// headers) is computed again, and its blocks take the pins their copies
// hold: those pins are the copies', counted and never refused (as when
// they come back), not new ones: past a lowered limit the request is
// served, and each block is pinned once, as before the restart.
TEST_F(store_disk_test, a_recomputed_block_takes_its_disk_copys_pins) {
  max_pinned_fraction_ = 1.0;
  open(16);
  put_options pin;
  pin.pin = true;
  const auto c = chain(1, 4);
  put_pinned_on_disk(c);
  store_.reset();
  for (std::streamoff n = 0; n < 4; ++n) // each record's header
    ASSERT_TRUE(flip_byte_in_segments(payload_of_record(n) - 79));
  max_pinned_fraction_ = 0.5; // 8 blocks
  open(16);
  ASSERT_TRUE(
      store_->process(ns_, chain(100, 8), 128, producer_, pin).has_value());
  ASSERT_EQ(store_->pinned_bytes(), store_->pinned_bytes_limit());
  auto r = store_->process(ns_, c, 64, producer_, pin);
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  EXPECT_EQ(r->computed_blocks, 4U);
  EXPECT_EQ(store_->pinned_bytes(), 12 * block_bytes);
  for (const auto& k : c) {
    EXPECT_TRUE(store_->unpin(ns_, k).has_value());
    EXPECT_EQ(store_->unpin(ns_, k).error().code, errc::invalid_argument)
        << "pinned once";
  }
  // A new pin past the limit is refused all the same.
  auto fresh = store_->process(ns_, chain(200, 1), 16, producer_, pin);
  ASSERT_FALSE(fresh.has_value());
  EXPECT_EQ(fresh.error().code, errc::out_of_memory);
  store_->check_invariants();
}

TEST_F(store_disk_test, evicted_blocks_spill_and_are_promoted_on_a_hit) {
  const auto a = chain(1, 4);
  EXPECT_EQ(run(a).computed_blocks, 4U);
  for (std::uint64_t i = 0; i < 10; ++i)
    run(chain(1000 * (i + 1), 4));
  EXPECT_GT(store_->stats().spills, 0U);
  EXPECT_FALSE(store_->contains(ns_, a[0]));
  auto tiers = store_->lookup_tiers(ns_, a);
  ASSERT_TRUE(tiers.has_value());
  EXPECT_EQ(tiers->memory, 0U);
  EXPECT_EQ(tiers->disk, 4U);

  const auto r = run(a);
  EXPECT_EQ(r.matched_blocks, 4U);
  EXPECT_EQ(r.disk_blocks, 4U);
  EXPECT_EQ(r.computed_blocks, 0U);
  EXPECT_EQ(r.matched_tokens, 64U);
  EXPECT_EQ(store_->stats().disk_block_hits, 4U);
  EXPECT_EQ(store_->stats().disk_token_hits, 64U);
  for (const auto& k : a)
    expect_correct(k);
}

TEST_F(store_disk_test, a_block_back_from_disk_keeps_its_access_count) {
  // LFU: H read 20 times, C 3 times; both spill and come back, and C is
  // read twice more. H has had more accesses: one block of room takes C.
  // The count travels in the catalog too: a store opened again on the
  // directory ranks them the same. (Before, a block came back at one
  // access, and H went.)
  policy_ = policy_kind::lfu;
  for (const bool reopen : {false, true}) {
    SCOPED_TRACE(reopen ? "after a reopen" : "same store");
    open();
    const std::uint64_t first = reopen ? 20 : 10;
    const auto h = chain(first, 1);
    const auto c = chain(first + 1, 1);
    run(h);
    run(c);
    const auto read = [&](const block_key& k, int times) {
      for (int i = 0; i < times; ++i)
        ASSERT_TRUE(store_->acquire(ns_, k).has_value());
    };
    read(h[0], 20);
    read(c[0], 3);
    spill_everything();
    if (reopen)
      open();
    read(c[0], 1); // back
    read(h[0], 1); // back
    read(c[0], 2);
    store_->evict_bytes(block_bytes);
    EXPECT_TRUE(store_->contains(ns_, h[0]));
    EXPECT_FALSE(store_->contains(ns_, c[0]));
  }
}

TEST_F(store_disk_test, a_block_used_in_memory_is_not_the_disks_first_victim) {
  // A is read back from disk, used in memory, and evicted again: its
  // bytes are on disk already (the spill is skipped), but it was used
  // after B10..B14 were spilled. When the disk (ten blocks) must make room,
  // the B blocks go first. (Before, A's copy kept the accessed_at of its
  // read back, and it went first.)
  store_clock_ = &clocks_.store;
  disk_clock_ = &clocks_.wall;
  open(20, false, [](disk_tier_config& dc) {
    dc.capacity_bytes = 32 + 10 * (80 + block_bytes);
  });
  auto& clocks = clocks_;
  const auto advance = [&](std::chrono::seconds s) {
    clocks.store.advance(s);
    clocks.wall.advance(s);
  };
  const auto settle = [&] {
    ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
    store_->poll_disk();
  };
  const auto a = chain(1, 1)[0];
  run({a});
  store_->evict_bytes(store_->used_bytes());
  settle();
  advance(std::chrono::seconds(10));
  {
    auto lease = store_->acquire(ns_, a); // back from disk, held
    ASSERT_TRUE(lease.has_value()) << lease.error().describe();
    settle();
    advance(std::chrono::seconds(10));
    for (std::uint64_t i = 10; i < 15; ++i)
      run(chain(i, 1));
    store_->evict_bytes(store_->used_bytes()); // B10..B14; A is held
    settle();
  }
  advance(std::chrono::seconds(100));
  for (int i = 0; i < 5; ++i)
    ASSERT_TRUE(store_->acquire(ns_, a).has_value());
  const auto skipped = store_->stats().spills_skipped;
  store_->evict_bytes(store_->used_bytes());
  settle();
  ASSERT_EQ(store_->stats().spills_skipped, skipped + 1);
  // Its accesses too: one put, one read back, five reads.
  const auto copy = store_->disk()->lookup(a);
  ASSERT_TRUE(copy.has_value());
  EXPECT_EQ(copy->access_count, 7U);
  advance(std::chrono::seconds(10));
  for (std::uint64_t i = 20; i < 25; ++i)
    run(chain(i, 1));
  // Eleven blocks for ten: the disk makes room, down to its low watermark.
  store_->evict_bytes(store_->used_bytes());
  settle();
  ASSERT_GT(store_->disk()->stats().evictions, 0U);
  EXPECT_TRUE(store_->on_disk(ns_, a)) << "the block used last went first";
  EXPECT_FALSE(store_->on_disk(ns_, chain(10, 1)[0]));
}

TEST_F(store_disk_test, a_copys_access_count_is_the_stores_across_a_reopen) {
  // Put (1), read back from disk (2), five reads (7), evicted again (the
  // spill skipped, marked used): the copy counts 7, and so does the
  // catalog a reopen reads. (Before, the read back counted twice on disk:
  // 8 after the reopen.)
  const auto k = chain(1, 1)[0];
  run({k});
  spill_everything();
  for (int i = 0; i < 6; ++i)
    ASSERT_TRUE(store_->acquire(ns_, k).has_value());
  spill_everything();
  EXPECT_EQ(store_->disk()->lookup(k)->access_count, 7U);
  ASSERT_TRUE(store_->persist().has_value());
  open();
  EXPECT_EQ(store_->disk()->lookup(k)->access_count, 7U);
}

TEST_F(store_disk_test, lookup_tiers_counts_one_lookup_with_the_disk_hits) {
  // lookup_tiers() is what a request would match, in one walk: the blocks
  // on disk are hits (process() would promote them). Before, it counted
  // nothing, and the engine actor called lookup() first, which counted
  // them as misses.
  auto a = chain(1, 4);
  run(a);
  for (std::uint64_t i = 0; i < 10; ++i)
    run(chain(1000 * (i + 1), 4));
  a.push_back(chain(99999, 1)[0]); // never cached
  const store_stats before = store_->stats();
  const auto tiers = store_->lookup_tiers(ns_, a);
  ASSERT_TRUE(tiers.has_value()) << tiers.error().describe();
  EXPECT_EQ(tiers->memory + tiers->tier + tiers->disk, 4U);
  EXPECT_EQ(tiers->disk, 4U);
  const store_stats& after = store_->stats();
  EXPECT_EQ(after.lookups - before.lookups, 1U);
  EXPECT_EQ(after.block_hits - before.block_hits, 4U);
  EXPECT_EQ(after.block_misses - before.block_misses, 1U);
  EXPECT_EQ(after.disk_block_hits, before.disk_block_hits) << "moves nothing";
  EXPECT_EQ(after.lookup_ns.count(), before.lookup_ns.count() + 1);
  store_->check_invariants();
}

TEST_F(store_disk_test, blocks_promoted_from_disk_count_as_block_hits) {
  const auto a = chain(1, 4);
  run(a);
  for (std::uint64_t i = 0; i < 10; ++i)
    run(chain(1000 * (i + 1), 4));
  ASSERT_EQ(store_->lookup_tiers(ns_, a)->disk, 4U);
  const store_stats before = store_->stats();
  EXPECT_EQ(run(a).disk_blocks, 4U);
  const store_stats& after = store_->stats();
  EXPECT_EQ(after.block_hits - before.block_hits, 4U);
  EXPECT_EQ(after.block_misses - before.block_misses, 0U);
  store_->check_invariants();
}

TEST_F(store_disk_test,
       an_arena_the_host_cannot_address_promotes_through_staging) {
  // Device memory: the disk tier reads into staging and the store writes
  // the slot through the backend before it commits.
  open(20, /*unaddressable=*/true);
  ASSERT_FALSE(store_->host_addressable());
  const auto a = chain(1, 4);
  run(a);
  for (std::uint64_t i = 0; i < 10; ++i)
    run(chain(1000 * (i + 1), 4));
  ASSERT_FALSE(store_->contains(ns_, a[0]));
  ASSERT_EQ(store_->lookup_tiers(ns_, a)->disk, 4U);

  const std::size_t writes_before = unaddressable_->writes;
  const auto r = run(a); // promote_now
  EXPECT_EQ(r.matched_blocks, 4U);
  EXPECT_EQ(r.disk_blocks, 4U);
  EXPECT_EQ(r.computed_blocks, 0U);
  EXPECT_GE(unaddressable_->writes, writes_before + 4);
  for (const auto& k : a)
    expect_correct(k);

  // And without waiting: promote() then poll_disk().
  const auto b = chain(50, 3);
  run(b);
  for (std::uint64_t i = 0; i < 10; ++i)
    run(chain(2000 * (i + 1), 4));
  ASSERT_FALSE(store_->contains(ns_, b[0]));
  ASSERT_EQ(*store_->promote(ns_, b), 3U);
  ASSERT_TRUE(store_->disk()->wait_idle());
  store_->poll_disk();
  EXPECT_EQ(*store_->lookup(ns_, b), 3U);
  for (const auto& k : b)
    expect_correct(k);
  store_->check_invariants();
}

TEST_F(store_disk_test, promote_does_not_wait_and_poll_makes_blocks_visible) {
  const auto a = chain(1, 4);
  run(a);
  for (std::uint64_t i = 0; i < 10; ++i)
    run(chain(1000 * (i + 1), 4));
  ASSERT_FALSE(store_->contains(ns_, a[0]));
  auto started = store_->promote(ns_, a);
  ASSERT_TRUE(started.has_value()) << started.error().describe();
  EXPECT_EQ(*started, 4U);
  EXPECT_EQ(store_->pending_promotions(), 4U);
  // Until poll_disk() collects them, a request of these keys would wait.
  const auto chain_no = store_->last_promotion_chain();
  ASSERT_TRUE(chain_no.has_value());
  EXPECT_FALSE(store_->promotions_done_through(*chain_no));
  // Reserved, not visible: a reader never sees a block still being read.
  EXPECT_EQ(*store_->lookup(ns_, a), 0U);
  store_->check_invariants();
  ASSERT_TRUE(store_->disk()->wait_idle());
  store_->poll_disk();
  EXPECT_EQ(store_->pending_promotions(), 0U);
  EXPECT_TRUE(store_->promotions_done_through(*chain_no));
  EXPECT_FALSE(store_->last_promotion_chain().has_value());
  EXPECT_EQ(*store_->lookup(ns_, a), 4U);
  EXPECT_EQ(store_->stats().disk_block_hits, 4U);
  for (const auto& k : a)
    expect_correct(k);
  EXPECT_EQ(store_->promote(ns_id{7}, a).error().code, errc::unknown_namespace);
  store_->check_invariants();
}

// promote() counts the disk reads it started: a block already in memory
// after one only on disk (brought back alone) goes on the prefix but is
// not read. Before, it was counted: 3 for 2 reads.
TEST_F(store_disk_test, promote_counts_only_the_reads_it_started) {
  const auto a = chain(1, 3);
  run(a);
  push_out_to_disk();
  ASSERT_TRUE(store_->acquire(ns_, a[1]).has_value()); // back alone
  const auto before = store_->stats().disk_block_hits;
  const auto n = store_->promote(ns_, a, {});
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  EXPECT_EQ(*n, 2U);
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
  store_->poll_disk();
  EXPECT_EQ(store_->stats().disk_block_hits - before, 2U);
  EXPECT_EQ(*store_->lookup(ns_, a), 3U);
  store_->check_invariants();
}

// promote() with a hold token keeps the blocks it brings back in memory
// until the token is released, however much the requests in between need
// room (they collect the reads: the blocks land held); released, they go
// as any. The same requests after a promote() without a hold evict what
// it brought back. (The engine actor holds what it reads for a deferred
// request until it has served it: before, the batches in between evicted
// those blocks first, low priority going first, and the request read or
// computed them again.)
TEST_F(store_disk_test, blocks_promoted_with_a_hold_stay_until_it_is_released) {
  put_options low;
  low.prio = priority::low;
  const auto a = chain(1, 4);
  run(a);
  push_out_to_disk();
  ASSERT_FALSE(store_->contains(ns_, a[0]));
  ASSERT_EQ(*store_->promote(ns_, a, low, 7), 4U);
  ASSERT_TRUE(store_->disk()->wait_idle());
  for (std::uint64_t i = 0; i < 10; ++i)
    run(chain(5000 * (i + 1), 4));
  EXPECT_EQ(store_->held_blocks(), 4U);
  for (const auto& k : a)
    EXPECT_TRUE(store_->contains(ns_, k));
  store_->check_invariants();
  store_->release_held(7);
  EXPECT_EQ(store_->held_blocks(), 0U);
  store_->release_held(7); // again: nothing
  store_->release_held(8); // never taken: nothing
  push_out_to_disk();
  EXPECT_FALSE(store_->contains(ns_, a[3])) << "still held";
  store_->check_invariants();

  // Without a hold, the same requests evict what promote() brought back.
  ASSERT_EQ(*store_->promote(ns_, a, low), 4U);
  ASSERT_TRUE(store_->disk()->wait_idle());
  for (std::uint64_t i = 0; i < 10; ++i)
    run(chain(7000 * (i + 1), 4));
  EXPECT_FALSE(store_->contains(ns_, a[3]));
  EXPECT_EQ(store_->held_blocks(), 0U);
  store_->check_invariants();
}

// A hold released while its reads are still on their way: they land
// unheld (nothing is left leased for a token nobody will release).
TEST_F(store_disk_test, a_hold_released_before_its_reads_land_holds_nothing) {
  const auto a = chain(1, 4);
  run(a);
  push_out_to_disk();
  ASSERT_EQ(*store_->promote(ns_, a, {}, 3), 4U);
  store_->release_held(3);
  ASSERT_TRUE(store_->disk()->wait_idle());
  store_->poll_disk();
  EXPECT_EQ(*store_->lookup(ns_, a), 4U);
  EXPECT_EQ(store_->held_blocks(), 0U);
  push_out_to_disk();
  EXPECT_FALSE(store_->contains(ns_, a[3]));
  store_->check_invariants();
}

TEST_F(store_disk_test, a_store_destroyed_with_promotions_in_flight_is_clean) {
  const auto a = chain(1, 4);
  run(a);
  for (std::uint64_t i = 0; i < 10; ++i)
    run(chain(1000 * (i + 1), 4));
  ASSERT_EQ(*store_->promote(ns_, a), 4U);
  store_.reset(); // the tier finishes its reads into the arena first
}

TEST_F(store_disk_test, a_block_damaged_on_disk_is_caught_at_its_first_read) {
  const auto a = chain(1, 4);
  run(a);
  ASSERT_TRUE(store_->persist().has_value());
  open();
  // Damage the second block's payload only.
  ASSERT_TRUE(flip_byte_in_segments(payload_of_record(1) + 100));
  // Promotion copies without hashing; every read verifies.
  ASSERT_EQ(*store_->promote(ns_, a), 4U);
  ASSERT_TRUE(store_->disk()->wait_idle());
  store_->poll_disk();
  store_->check_invariants();
  EXPECT_EQ(*store_->lookup(ns_, a), 4U);
  expect_correct(a[0]);
  {
    auto lease = store_->acquire(ns_, a[1]);
    ASSERT_TRUE(lease.has_value());
    std::vector<std::byte> out(block_bytes);
    auto r = store_->read(*lease, out);
    ASSERT_FALSE(r.has_value()); // never returned wrong
    EXPECT_EQ(r.error().code, errc::checksum_mismatch);
  }
  EXPECT_EQ(store_->stats().checksum_failures, 1U);
  // The damaged block, its unreachable descendants and its disk copy are
  // gone; the good prefix stays.
  EXPECT_EQ(*store_->lookup(ns_, a), 1U);
  EXPECT_EQ(store_->block_count(), 1U);
  EXPECT_FALSE(store_->disk()->contains(a[1]));
  store_->check_invariants();
  // The next request recomputes the rest and caches it again.
  const auto r = run(a);
  EXPECT_EQ(r.matched_blocks, 1U);
  EXPECT_EQ(r.computed_blocks, 3U);
  for (const auto& k : a)
    expect_correct(k);
}

TEST_F(store_disk_test, acquire_reads_back_a_block_that_is_only_on_disk) {
  const auto a = chain(1, 4);
  run(a);
  push_out_to_disk();
  ASSERT_FALSE(store_->contains(ns_, a[2]));
  ASSERT_TRUE(store_->disk()->contains(a[2]));
  // Before, errc::not_found: acquire() saw memory and the memory tier only,
  // so a host could look a block up (lookup counts disk) and not get it.
  auto lease = store_->acquire(ns_, a[2]);
  ASSERT_TRUE(lease.has_value()) << lease.error().describe();
  std::vector<std::byte> got(block_bytes);
  std::vector<std::byte> want(block_bytes);
  ASSERT_TRUE(store_->read(*lease, got).has_value());
  ASSERT_TRUE(producer_.produce(spec(), a[2], want).has_value());
  EXPECT_EQ(got, want);
  lease->release();
  EXPECT_EQ(store_->stats().disk_block_hits, 1U);
  store_->check_invariants();
  // It came back alone (the disk tier does not know its parent): the rest
  // of the chain is still only on disk, where a request finds it.
  EXPECT_FALSE(store_->contains(ns_, a[1]));
  const auto r = run(a);
  EXPECT_EQ(r.matched_blocks, 4U);
  EXPECT_EQ(r.computed_blocks, 0U);
  for (const auto& k : a)
    expect_correct(k);
  // That request linked it under its parent: with the leaf pinned, the
  // whole chain is held and stays a prefix in memory.
  ASSERT_TRUE(store_->pin(ns_, a[3]).has_value());
  store_->evict_bytes(std::size_t{1} << 30);
  store_->check_invariants();
  EXPECT_EQ(*store_->lookup(ns_, a), 4U);
  EXPECT_EQ(store_->block_count(), 4U);
}

TEST_F(store_disk_test, acquire_of_a_block_on_disk_lands_it_through_staging) {
  // Device memory: a block brought back alone reaches its slot through the
  // backend, as process()'s promotions do.
  open(20, /*unaddressable=*/true);
  const auto a = chain(1, 4);
  run(a);
  push_out_to_disk();
  ASSERT_FALSE(store_->contains(ns_, a[1]));
  const std::size_t writes_before = unaddressable_->writes;
  expect_correct(a[1]);
  EXPECT_EQ(unaddressable_->writes, writes_before + 1);
  store_->check_invariants();
}

TEST_F(store_disk_test, a_block_damaged_on_disk_is_never_served_by_acquire) {
  const auto a = chain(1, 4);
  run(a);
  ASSERT_TRUE(store_->persist().has_value());
  open(); // a restart: every block is only on disk
  ASSERT_TRUE(flip_byte_in_segments(payload_of_record(1) + 100));
  auto lease = store_->acquire(ns_, a[1]);
  ASSERT_TRUE(lease.has_value()) << lease.error().describe();
  std::vector<std::byte> out(block_bytes, std::byte{1});
  const auto r = store_->read(*lease, out);
  ASSERT_FALSE(r.has_value()) << "damaged bytes were served";
  EXPECT_EQ(r.error().code, errc::checksum_mismatch);
  EXPECT_EQ(std::count(out.begin(), out.end(), std::byte{0}),
            static_cast<std::ptrdiff_t>(block_bytes));
  lease->release();
  EXPECT_EQ(store_->stats().checksum_failures, 1U);
  store_->check_invariants();
  // Dropped from memory and from disk: asked again, it is not there.
  EXPECT_FALSE(store_->contains(ns_, a[1]));
  EXPECT_FALSE(store_->disk()->contains(a[1]));
  const auto again = store_->acquire(ns_, a[1]);
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().code, errc::not_found);
  // Its neighbours on disk were not damaged and are served.
  expect_correct(a[0]);
  expect_correct(a[2]);
  store_->check_invariants();
}

TEST_F(store_disk_test, pin_and_unpin_reach_a_block_that_is_only_on_disk) {
  const auto a = chain(1, 3);
  run(a);
  push_out_to_disk();
  ASSERT_FALSE(store_->contains(ns_, a[1]));
  // Before, errc::not_found. A pinned block is brought back (a pin keeps a
  // block in memory) and its disk copy is pinned too.
  ASSERT_TRUE(store_->pin(ns_, a[1]).has_value());
  EXPECT_TRUE(store_->contains(ns_, a[1]));
  EXPECT_EQ(store_->disk()->lookup(a[1])->pins, 1U);
  store_->evict_bytes(std::size_t{1} << 30);
  store_->check_invariants();
  EXPECT_TRUE(store_->contains(ns_, a[1]));
  expect_correct(a[1]);
  // A block pinned only on disk (pinned before a restart) is unpinned
  // there, once: it was pinned once.
  ASSERT_TRUE(store_->persist().has_value());
  open();
  ASSERT_FALSE(store_->contains(ns_, a[1]));
  ASSERT_EQ(store_->disk()->lookup(a[1])->pins, 1U);
  ASSERT_TRUE(store_->unpin(ns_, a[1]).has_value());
  EXPECT_EQ(store_->disk()->lookup(a[1])->pins, 0U);
  const auto twice = store_->unpin(ns_, a[1]);
  ASSERT_FALSE(twice.has_value());
  EXPECT_EQ(twice.error().code, errc::invalid_argument);
  const auto unknown = store_->unpin(ns_, chain(77, 1)[0]);
  ASSERT_FALSE(unknown.has_value());
  EXPECT_EQ(unknown.error().code, errc::not_found);
  store_->check_invariants();
}

TEST_F(store_disk_test, a_put_extends_a_prefix_that_is_only_on_disk) {
  // The host's flow: lookup counts the prefix (disk included), then the
  // host puts the next block, naming the last of the prefix as its parent.
  const auto a = chain(1, 5);
  const std::vector<block_key> prefix(a.begin(), a.begin() + 4);
  run(prefix);
  push_out_to_disk();
  ASSERT_EQ(store_->lookup_tiers(ns_, prefix)->disk, 4U);
  auto h = store_->reserve(ns_, a[4], a[3]);
  // Before, errc::not_found: the parent was not in memory.
  ASSERT_TRUE(h.has_value()) << h.error().describe();
  std::vector<std::byte> value(block_bytes);
  ASSERT_TRUE(producer_.produce(spec(), a[4], value).has_value());
  ASSERT_TRUE(store_->write(*h, value).has_value());
  ASSERT_TRUE(store_->commit(*h).has_value());
  store_->check_invariants();
  EXPECT_TRUE(store_->contains(ns_, a[3])) << "the parent came back with it";
  expect_correct(a[3]);
  expect_correct(a[4]);
  // The chain is cached whole: lookup (the engine actor's counts disk)
  // and a request find all five, the rest of the prefix read from disk and
  // the two blocks in memory served from there, not computed again.
  // (Before, both stopped at the block put: the walk over disk stopped at
  // the first block without a disk copy.)
  const auto tiers = *store_->lookup_tiers(ns_, a);
  EXPECT_EQ(tiers.memory + tiers.tier + tiers.disk, 5U);
  const auto r = run(a);
  EXPECT_EQ(r.matched_blocks, 5U);
  EXPECT_EQ(r.computed_blocks, 0U);
  EXPECT_EQ(r.disk_blocks, 3U);
  for (const auto& k : a)
    expect_correct(k);
  // That request linked the parent under its own: pinned at its leaf, the
  // whole chain stays.
  ASSERT_TRUE(store_->pin(ns_, a[4]).has_value());
  store_->evict_bytes(std::size_t{1} << 30);
  store_->check_invariants();
  EXPECT_EQ(*store_->lookup(ns_, a), 5U);
}

TEST_F(store_disk_test, a_put_naming_a_wrong_parent_links_no_cycle) {
  const auto a = chain(1, 2);
  run(a);
  push_out_to_disk();
  ASSERT_TRUE(store_->acquire(ns_, a[1]).has_value()); // back alone
  // A block put under a[1], then a[1] put again under that block: linking
  // a[1] there would close a cycle that could never be evicted.
  const block_key child = chain(500, 1)[0];
  std::vector<std::byte> value(block_bytes);
  for (const auto& [key, parent] :
       {std::pair{child, a[1]}, std::pair{a[1], child}}) {
    auto h = store_->reserve(ns_, key, parent);
    ASSERT_TRUE(h.has_value()) << h.error().describe();
    ASSERT_TRUE(producer_.produce(spec(), key, value).has_value());
    ASSERT_TRUE(store_->write(*h, value).has_value());
    ASSERT_TRUE(store_->commit(*h).has_value());
    store_->check_invariants();
  }
  store_->evict_bytes(std::size_t{1} << 30);
  store_->check_invariants();
  EXPECT_EQ(store_->block_count(), 0U);
}

// A block cannot be its own parent. Before, a put naming its own key as
// parent, for a block only on disk, brought the key back as the "parent"
// and then indexed a second entry under the same key (check_invariants
// aborted: "index does not point at its entry").
TEST_F(store_disk_test, a_put_naming_itself_as_parent_is_refused) {
  const auto a = chain(1, 2);
  run(a);
  push_out_to_disk();
  ASSERT_FALSE(store_->contains(ns_, a[1]));
  auto h = store_->reserve(ns_, a[1], a[1]);
  ASSERT_FALSE(h.has_value());
  EXPECT_EQ(h.error().code, errc::invalid_argument);
  EXPECT_NE(h.error().message.find("its own parent"), std::string::npos)
      << h.error().message;
  store_->check_invariants();
  EXPECT_FALSE(store_->contains(ns_, a[1])) << "nothing is brought back";
  // Nor when the block is in memory.
  ASSERT_TRUE(store_->acquire(ns_, a[1]).has_value());
  auto again = store_->reserve(ns_, a[1], a[1]);
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().code, errc::invalid_argument);
  store_->check_invariants();
  store_->evict_bytes(std::size_t{1} << 30);
  store_->check_invariants();
  EXPECT_EQ(store_->block_count(), 0U);
}

// The disk tier records each block's size partition, so a block read back
// from disk lands in the partition it was put in, whoever asks for it:
// acquire() (before, the short partition) and a short request's process()
// (before, the request's partition).
TEST_F(store_disk_test, a_block_read_back_from_disk_lands_in_its_partition) {
  constexpr auto large = static_cast<std::size_t>(size_partition::large);
  constexpr auto small = static_cast<std::size_t>(size_partition::small);
  const std::vector<block_key> k = chain(7, 1);
  put_options long_request;
  long_request.request_tokens = 5000; // the long partition (>= 4096)
  ASSERT_TRUE(store_->process(ns_, k, 16, producer_, long_request).has_value());
  ASSERT_EQ(store_->stats().blocks_by_partition[large], 1U);
  store_->evict_bytes(std::size_t{1} << 30);
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
  ASSERT_EQ(store_->block_count(), 0U);
  ASSERT_TRUE(store_->acquire(ns_, k[0]).has_value());
  EXPECT_EQ(store_->stats().blocks_by_partition[large], 1U);
  EXPECT_EQ(store_->stats().blocks_by_partition[small], 0U);
  store_->check_invariants();
  store_->evict_bytes(std::size_t{1} << 30);
  ASSERT_EQ(store_->block_count(), 0U);
  const auto r = store_->process(ns_, k, 16, producer_); // a short request
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->disk_blocks, 1U);
  EXPECT_EQ(store_->stats().blocks_by_partition[large], 1U);
  EXPECT_EQ(store_->stats().blocks_by_partition[small], 0U);
  store_->check_invariants();
}

// Making room for a block read back from disk takes from its own partition
// when none is over its share: a long document's block does not flush the
// short prompts' blocks (before, it came back into the short partition,
// which then gave up its own blocks for it).
TEST_F(store_disk_test, a_long_block_read_back_does_not_evict_short_blocks) {
  constexpr auto small = static_cast<std::size_t>(size_partition::small);
  constexpr auto medium = static_cast<std::size_t>(size_partition::medium);
  constexpr auto large = static_cast<std::size_t>(size_partition::large);
  put_options medium_request;
  medium_request.request_tokens = 3000;
  put_options long_request;
  long_request.request_tokens = 5000;
  const std::vector<block_key> doc = chain(7, 1);
  ASSERT_TRUE(
      store_->process(ns_, doc, 16, producer_, long_request).has_value());
  store_->evict_bytes(std::size_t{1} << 30);
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
  ASSERT_EQ(store_->block_count(), 0U);
  // 20 blocks of memory, shares 6 / 6 / 8 blocks: 6 short and 6 medium
  // blocks fill their shares, 6 long ones leave the long partition under
  // its share, and the 18 blocks reach the high watermark (0.9).
  std::vector<block_key> shorts;
  for (std::uint64_t i = 0; i < 6; ++i) {
    const auto s = chain(100 + i, 1);
    shorts.push_back(s[0]);
    ASSERT_TRUE(store_->process(ns_, s, 16, producer_).has_value());
    ASSERT_TRUE(
        store_->process(ns_, chain(200 + i, 1), 16, producer_, medium_request)
            .has_value());
    ASSERT_TRUE(
        store_->process(ns_, chain(300 + i, 1), 16, producer_, long_request)
            .has_value());
  }
  ASSERT_EQ(store_->stats().blocks_by_partition[small], 6U);
  ASSERT_EQ(store_->stats().blocks_by_partition[medium], 6U);
  ASSERT_EQ(store_->stats().blocks_by_partition[large], 6U);
  // Reading the document back makes room down to the low watermark (0.8):
  // three blocks go, from the long partition.
  ASSERT_TRUE(store_->acquire(ns_, doc[0]).has_value());
  const auto st = store_->stats();
  EXPECT_EQ(st.blocks_by_partition[small], 6U);
  EXPECT_EQ(st.blocks_by_partition[medium], 6U);
  EXPECT_EQ(st.blocks_by_partition[large], 4U);
  for (const auto& k : shorts) {
    EXPECT_TRUE(store_->contains(ns_, k)) << k.to_hex();
  }
  store_->check_invariants();
}

// The disk tier records each block's priority (format version 3): a
// critical block spilled and read back by acquire() (no request priority
// of its own) ranks critical again, so the priority policy keeps it while
// normal blocks flood memory. Before, it came back at normal and, the
// oldest normal block, was the first to go.
TEST_F(store_disk_test, a_critical_block_read_back_by_acquire_stays_critical) {
  policy_ = policy_kind::priority;
  open();
  const block_key k = chain(7, 1)[0];
  ASSERT_NO_FATAL_FAILURE(run_at(k, priority::critical));
  ASSERT_NO_FATAL_FAILURE(spill_everything());
  ASSERT_TRUE(store_->acquire(ns_, k).has_value()); // the lease is dropped
  ASSERT_TRUE(store_->contains(ns_, k));
  flood(100, 40); // 40 blocks through 20 blocks of memory
  EXPECT_TRUE(store_->contains(ns_, k))
      << "the critical block read back was evicted like a normal one";
  EXPECT_GT(store_->stats().evictions, 0U);
  store_->check_invariants();
}

// process() brings a block back at the higher of its recorded priority and
// the request's, as a hit in memory takes the request's if higher: a low
// request does not lower a critical block. Before, it came back at the
// request's (low) and was evicted first.
TEST_F(store_disk_test, a_low_request_reads_a_critical_block_back_critical) {
  policy_ = policy_kind::priority;
  open();
  const block_key k = chain(7, 1)[0];
  ASSERT_NO_FATAL_FAILURE(run_at(k, priority::critical));
  ASSERT_NO_FATAL_FAILURE(spill_everything());
  ASSERT_NO_FATAL_FAILURE(run_at(k, priority::low));
  EXPECT_EQ(store_->stats().disk_block_hits, 1U);
  flood(100, 40);
  EXPECT_TRUE(store_->contains(ns_, k))
      << "the critical block came back at the low request's priority";
  store_->check_invariants();
}

// A block raised while in memory (read back at normal, then used by a
// critical request) is evicted again with its disk copy rewritten at the
// new priority, although its bytes are already there: the copy on disk
// would bring it back at normal. Before, the spill was skipped.
TEST_F(store_disk_test, a_block_raised_since_its_spill_is_spilled_again) {
  policy_ = policy_kind::priority;
  open();
  const block_key k = chain(7, 1)[0];
  ASSERT_NO_FATAL_FAILURE(run_at(k, priority::normal));
  ASSERT_NO_FATAL_FAILURE(spill_everything());
  const auto spills = store_->stats().spills;
  ASSERT_NO_FATAL_FAILURE(run_at(k, priority::critical)); // raised
  ASSERT_NO_FATAL_FAILURE(spill_everything());
  EXPECT_EQ(store_->stats().spills, spills + 1) << "not written again";
  // The same priority again: the copy on disk is enough.
  ASSERT_TRUE(store_->acquire(ns_, k).has_value());
  ASSERT_NO_FATAL_FAILURE(spill_everything());
  EXPECT_EQ(store_->stats().spills, spills + 1);
  ASSERT_TRUE(store_->acquire(ns_, k).has_value());
  flood(100, 40);
  EXPECT_TRUE(store_->contains(ns_, k)) << "read back below critical";
  store_->check_invariants();
}

// The priority survives a restart with the catalog (pin() reads the block
// back here: no request priority either).
TEST_F(store_disk_test, a_critical_block_stays_critical_across_a_restart) {
  policy_ = policy_kind::priority;
  open();
  const block_key k = chain(7, 1)[0];
  ASSERT_NO_FATAL_FAILURE(run_at(k, priority::critical));
  ASSERT_TRUE(store_->persist().has_value());
  open();
  ASSERT_EQ(store_->block_count(), 0U);
  ASSERT_TRUE(store_->pin(ns_, k).has_value());
  ASSERT_TRUE(store_->unpin(ns_, k).has_value());
  flood(100, 40);
  EXPECT_TRUE(store_->contains(ns_, k));
  expect_correct(k);
  store_->check_invariants();
}

// A directory written by disk format version 2 records no priorities: it
// opens (the catalog is upgraded to version 3 in place), and its blocks
// read back at normal, the default of a put that names no priority,
// raised to the request's if higher: below a high block, above a low one,
// also when a low request reads them back.
TEST_F(store_disk_test, a_version_2_directory_reads_back_at_normal) {
  const block_key old = chain(7, 1)[0];
  ASSERT_NO_FATAL_FAILURE(run_at(old, priority::critical));
  ASSERT_TRUE(store_->persist().has_value());
  store_.reset();
  ASSERT_NO_FATAL_FAILURE(testing::make_catalog_v2(dir_));
  open();
  EXPECT_EQ(testing::catalog_version(dir_), 3);
  ASSERT_NO_FATAL_FAILURE(run_at(old, priority::low)); // read back
  EXPECT_EQ(store_->stats().disk_block_hits, 1U);
  expect_correct(old);
  const block_key low = chain(8, 1)[0];
  const block_key high = chain(9, 1)[0];
  ASSERT_NO_FATAL_FAILURE(run_at(low, priority::low));
  ASSERT_NO_FATAL_FAILURE(run_at(high, priority::high));
  // Lowest priority first, whatever the policy (lru here, and `old` is the
  // least recently used): the low block, then `old`, then the high one.
  store_->evict_bytes(block_bytes);
  EXPECT_FALSE(store_->contains(ns_, low));
  EXPECT_TRUE(store_->contains(ns_, old)) << "read back below normal";
  store_->evict_bytes(block_bytes);
  EXPECT_FALSE(store_->contains(ns_, old)) << "read back above normal";
  EXPECT_TRUE(store_->contains(ns_, high));
  store_->check_invariants();
}

// A directory written by disk format version 1 records no partitions: it
// opens (the catalog is upgraded in place, to version 3 now), its blocks
// read back, and they land where they did before version 2: acquire() in
// the short partition.
TEST_F(store_disk_test, a_version_1_directory_opens_and_its_blocks_read_back) {
  constexpr auto large = static_cast<std::size_t>(size_partition::large);
  constexpr auto small = static_cast<std::size_t>(size_partition::small);
  const std::vector<block_key> k = chain(7, 1);
  put_options long_request;
  long_request.request_tokens = 5000;
  ASSERT_TRUE(store_->process(ns_, k, 16, producer_, long_request).has_value());
  ASSERT_TRUE(store_->persist().has_value());
  store_.reset();
  ASSERT_NO_FATAL_FAILURE(testing::make_catalog_v1(dir_));
  open();
  EXPECT_EQ(testing::catalog_version(dir_), 3);
  ASSERT_TRUE(store_->disk()->lookup(k[0]).has_value());
  EXPECT_FALSE(store_->disk()->lookup(k[0])->part.has_value());
  ASSERT_TRUE(store_->acquire(ns_, k[0]).has_value());
  EXPECT_EQ(store_->stats().blocks_by_partition[small], 1U);
  EXPECT_EQ(store_->stats().blocks_by_partition[large], 0U);
  expect_correct(k[0]);
  store_->check_invariants();
}

// A spill that waits in the disk tier's queue while the block is put again
// (another codec) and spilled again is superseded: the tier never writes
// it. That is no spill failure (before, it was counted as one).
TEST_F(store_disk_test, a_superseded_spill_is_not_a_spill_failure) {
  auto gate = std::make_shared<testing::io_gate>();
  open(20, false, [gate](disk_tier_config& c) {
    c.write_fault_for_testing = testing::io_gate::hook(gate);
  });
  run(chain(1, 1));
  gate->arm();
  store_->evict_bytes(std::size_t{1} << 30); // the I/O thread holds there
  ASSERT_TRUE(gate->wait_entered());
  const std::vector<block_key> k = chain(7, 1);
  run(k);
  store_->evict_bytes(std::size_t{1} << 30); // k, uncompressed: queued
  put_options int8;
  int8.codec_override = codec::int8;
  auto h = store_->reserve(ns_, k[0], block_key{}, int8);
  EXPECT_TRUE(h.has_value());
  if (h) {
    EXPECT_TRUE(store_->write_from(*h, producer_).has_value());
    EXPECT_TRUE(store_->commit(*h).has_value());
  }
  store_->evict_bytes(std::size_t{1} << 30); // k in int8: supersedes it
  gate->open();
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(60)));
  store_->poll_disk();
  const auto st = store_->stats();
  EXPECT_EQ(store_->disk()->stats().spills_superseded, 1U);
  EXPECT_EQ(st.spill_failures, 0U);
  EXPECT_EQ(st.spills, 2U) << "the first block and k in int8 were written";
  ASSERT_TRUE(store_->disk()->lookup(k[0]).has_value());
  EXPECT_EQ(store_->disk()->lookup(k[0])->c, codec::int8);
  store_->check_invariants();
}

TEST_F(store_disk_test, an_unpin_while_its_promotion_is_on_its_way_stands) {
  // k pinned on disk only (after a restart); promote() queues its read
  // behind a spill the I/O thread holds, and the one holder unpins it
  // meanwhile (the copy's count goes to 0). The block that lands is not
  // pinned. (Before, the commit restored the count the read started with:
  // pinned in memory and on disk again, by nobody, never evicted.)
  const auto k = chain(7, 1);
  put_options pin;
  pin.pin = true;
  ASSERT_TRUE(store_->process(ns_, k, 16, producer_, pin).has_value());
  ASSERT_TRUE(store_->persist().has_value());
  auto gate = std::make_shared<testing::io_gate>();
  open(20, false, [gate](disk_tier_config& c) {
    c.write_fault_for_testing = testing::io_gate::hook(gate);
  });
  ASSERT_EQ(store_->disk()->lookup(k[0])->pins, 1U);
  gate->arm();
  run(chain(8, 1));
  store_->evict_bytes(std::size_t{1} << 30); // its spill holds the thread
  ASSERT_TRUE(gate->wait_entered());
  ASSERT_TRUE(store_->promote(ns_, k).has_value());
  ASSERT_EQ(store_->pending_promotions(), 1U);
  ASSERT_TRUE(store_->unpin(ns_, k[0]).has_value());
  EXPECT_EQ(store_->disk()->lookup(k[0])->pins, 0U);
  gate->open();
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(60)));
  store_->poll_disk();
  ASSERT_TRUE(store_->contains(ns_, k[0])) << "the promotion landed";
  EXPECT_EQ(store_->unpin(ns_, k[0]).error().code, errc::invalid_argument);
  EXPECT_EQ(store_->disk()->lookup(k[0])->pins, 0U);
  store_->evict_bytes(std::size_t{1} << 30);
  EXPECT_FALSE(store_->contains(ns_, k[0]));
  store_->check_invariants();
}

TEST_F(store_disk_test, a_request_waits_for_its_prefix_being_prefetched) {
  // promote() (a prefetch) queued the reads of a's four blocks behind a
  // spill the I/O thread holds; a request for a and two new blocks comes
  // before they land. It waits for them: four matched, two computed and
  // cached. (Before, the prefetch's reservations made every put of a busy:
  // all six computed, none cached, the two new ones not even after the
  // prefetch landed.) acquire() of a block on its way waits too (it got
  // busy). The gate opens from another thread, in all likelihood once the
  // call waits (the I/O thread then still has to finish its write and
  // commit before it reads): the old code failed every run.
  const auto a = chain(100, 4);
  run(a);
  spill_everything();
  auto gate = std::make_shared<testing::io_gate>();
  open(20, false, [gate](disk_tier_config& c) {
    c.write_fault_for_testing = testing::io_gate::hook(gate);
  });
  const auto hold_the_io_thread = [&] {
    gate->arm();
    run(chain(900 + store_->stats().commits, 1));
    store_->evict_bytes(std::size_t{1} << 30); // its spill holds the thread
    ASSERT_TRUE(gate->wait_entered());
  };
  hold_the_io_thread();
  ASSERT_EQ(*store_->promote(ns_, a), 4U);
  std::vector<block_key> six = chain(100, 6);
  ASSERT_EQ(std::vector<block_key>(six.begin(), six.begin() + 4), a);
  {
    std::thread opener([&] { gate->open(); }); // whenever it runs
    const auto r = store_->process(ns_, six, 6 * 16, producer_);
    opener.join();
    ASSERT_TRUE(r.has_value()) << r.error().describe();
    EXPECT_EQ(r->matched_blocks, 4U);
    EXPECT_EQ(r->computed_blocks, 2U);
    EXPECT_EQ(r->uncached_blocks, 0U);
  }
  EXPECT_EQ(store_->pending_promotions(), 0U);
  for (const auto& k : six)
    expect_correct(k);

  spill_everything();
  hold_the_io_thread();
  ASSERT_EQ(*store_->promote(ns_, a), 4U);
  {
    std::thread opener([&] { gate->open(); });
    auto lease = store_->acquire(ns_, a[0]);
    opener.join();
    EXPECT_TRUE(lease.has_value()) << lease.error().describe();
  }
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(60)));
  store_->poll_disk();
  store_->check_invariants();
}

TEST_F(store_disk_test, a_block_whose_prefetch_chain_failed_is_read_alone) {
  // promote() of a[0], a[1]; a[0]'s record is damaged, so the chain fails
  // there and a[1]'s promotion is aborted with it. acquire(a[1]), which
  // waited for that chain, then reads a[1]'s own good copy. (Before the
  // fall-through it answered not_found for a block on disk.)
  const auto a = chain(100, 2);
  run(std::vector<block_key>{a[0]});
  ASSERT_TRUE(store_->persist().has_value());
  run(a);
  ASSERT_TRUE(store_->persist().has_value());
  auto gate = std::make_shared<testing::io_gate>();
  open(20, false, [gate](disk_tier_config& c) {
    c.write_fault_for_testing = testing::io_gate::hook(gate);
  });
  ASSERT_TRUE(flip_byte_in_segments(32 + 1)); // record 0's header: a[0]
  gate->arm();
  run(chain(900, 1));
  store_->evict_bytes(std::size_t{1} << 30); // its spill holds the thread
  ASSERT_TRUE(gate->wait_entered());
  ASSERT_EQ(*store_->promote(ns_, a), 2U);
  std::thread opener([&] { gate->open(); });
  auto lease = store_->acquire(ns_, a[1]);
  opener.join();
  ASSERT_TRUE(lease.has_value()) << lease.error().describe();
  lease->release();
  EXPECT_GE(store_->stats().promotion_failures, 1U);
  expect_correct(a[1]);
  store_->check_invariants();
}

TEST_F(store_disk_test, blocks_brought_back_from_disk_are_no_puts) {
  // Four blocks promoted from disk by a request that computes nothing: no
  // reserve, commit or put latency (the put histogram's samples carried the
  // disk's read time: 0.3 ms against 0.1 ms for real puts). A block whose
  // copy is damaged and is computed instead is a put.
  const auto a = chain(3, 4);
  run(a);
  spill_everything();
  const store_stats before = store_->stats();
  const auto r = run(a);
  EXPECT_EQ(r.disk_blocks, 4U);
  const store_stats after = store_->stats();
  EXPECT_EQ(after.reserves, before.reserves);
  EXPECT_EQ(after.commits, before.commits);
  EXPECT_EQ(after.aborts, before.aborts);
  EXPECT_EQ(after.put_ns.count(), before.put_ns.count());
  EXPECT_EQ(after.disk_block_hits - before.disk_block_hits, 4U);
  // b's copy (the only record of a fresh store) has a damaged header: the
  // request computes it again, a put.
  const auto b = chain(5, 1);
  open();
  run(b);
  spill_everything();
  open();
  ASSERT_TRUE(flip_byte_in_segments(32 + 1));
  const store_stats fresh = store_->stats();
  const auto rb = run(b);
  EXPECT_EQ(rb.disk_blocks, 0U);
  EXPECT_EQ(rb.computed_blocks, 1U);
  const store_stats put = store_->stats();
  EXPECT_EQ(put.promotion_failures - fresh.promotion_failures, 1U);
  EXPECT_EQ(put.reserves - fresh.reserves, 1U);
  EXPECT_EQ(put.commits - fresh.commits, 1U);
  EXPECT_EQ(put.put_ns.count() - fresh.put_ns.count(), 1U);
  expect_correct(b[0]);
  store_->check_invariants();
}

TEST_F(store_disk_test, memory_prefix_then_disk_rest) {
  const auto a = chain(1, 6);
  run(a);
  // Push the tail out: with leaf-first LRU the chain loses its tail first.
  for (std::uint64_t i = 0; i < 3; ++i)
    run(chain(1000 * (i + 1), 5));
  const auto tiers = *store_->lookup_tiers(ns_, a);
  ASSERT_LT(tiers.memory, 6U);
  EXPECT_EQ(tiers.memory + tiers.disk, 6U);
  const auto r = run(a);
  EXPECT_EQ(r.matched_blocks, 6U);
  EXPECT_EQ(r.disk_blocks, 6U - tiers.memory);
  EXPECT_EQ(r.memory_blocks, tiers.memory);
  for (const auto& k : a)
    expect_correct(k);
}

TEST_F(store_disk_test, memory_blocks_stop_at_the_first_block_brought_back) {
  // a and c in memory, b only on disk (c brought back alone, as a chain
  // root): the request matches all three, but only a was found in memory
  // before a block came back. (The prefetcher judges a prefetch by this;
  // matched less promoted said 2.)
  const auto a = chain(1, 3);
  run(a);
  push_out_to_disk();
  ASSERT_FALSE(store_->contains(ns_, a[0]));
  auto lease = store_->acquire(ns_, a[0]); // back from disk
  ASSERT_TRUE(lease.has_value()) << lease.error().describe();
  lease->release();
  auto leaf = store_->acquire(ns_, a[2]);
  ASSERT_TRUE(leaf.has_value()) << leaf.error().describe();
  leaf->release();
  ASSERT_TRUE(store_->contains(ns_, a[0]));
  ASSERT_FALSE(store_->contains(ns_, a[1]));
  const auto r = run(a);
  EXPECT_EQ(r.matched_blocks, 3U);
  EXPECT_EQ(r.disk_blocks, 1U);
  EXPECT_EQ(r.memory_blocks, 1U);
}

TEST_F(store_disk_test,
       a_block_dropped_with_a_damaged_ancestor_unpins_on_disk) {
  // A pinned chain a -> b -> c on disk too; a reader holds c when a fails
  // its checksum. c is dropped (dead, held by the reader) and its pins in
  // memory go; its unpin reaches its disk copy. (Before, it answered "not
  // pinned" while the copy kept the pin, and the next recompute of c took
  // that pin back with no holder left.)
  const auto k = chain(1, 3);
  put_options pinned;
  pinned.pin = true;
  ASSERT_TRUE(
      store_->process(ns_, k, 3 * spec().block_tokens, producer_, pinned)
          .has_value());
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
  store_->poll_disk();
  ASSERT_EQ(store_->disk()->lookup(k[2])->pins, 1U);
  auto reader = store_->acquire(ns_, k[2]);
  ASSERT_TRUE(reader.has_value());
  ASSERT_TRUE(store_->corrupt_for_testing(ns_, k[0], 10).has_value());
  {
    auto lease = store_->acquire(ns_, k[0]);
    ASSERT_TRUE(lease.has_value());
    std::vector<std::byte> out(block_bytes);
    EXPECT_EQ(store_->read(*lease, out).error().code, errc::checksum_mismatch);
  }
  store_->check_invariants();
  const auto u = store_->unpin(ns_, k[2]);
  ASSERT_TRUE(u.has_value()) << u.error().describe();
  ASSERT_TRUE(store_->disk()->lookup(k[2]).has_value());
  EXPECT_EQ(store_->disk()->lookup(k[2])->pins, 0U);
  reader->release();
  store_->check_invariants();
}

TEST_F(store_disk_test, a_block_expired_in_memory_is_no_disk_hit) {
  // k0 is put with a long TTL and persisted, then put again with a short
  // one (the memory copy's expiry comes sooner; the disk keeps the longer).
  // Once it expires in memory, held by its cached child, a request of the
  // chain finds k0 dead in memory but usable on disk: the promotion does
  // not bring a dead block back, so the request computes k0 again, and its
  // reply says so. (Before, k0 counted as a disk hit too, and the reply had
  // one matched block more and one computed less than happened.)
  auto& [clock, wall] = open_on_test_clocks();
  const auto keys = chain(1, 2);
  put_options long_ttl;
  long_ttl.ttl = std::chrono::seconds(100);
  ASSERT_TRUE(store_
                  ->process(ns_, std::vector<block_key>{keys[0]},
                            spec().block_tokens, producer_, long_ttl)
                  .has_value());
  ASSERT_TRUE(store_->process(ns_, keys, 2 * spec().block_tokens, producer_)
                  .has_value()); // k1: no TTL
  ASSERT_TRUE(store_->persist(std::chrono::seconds(30)).has_value());
  put_options short_ttl;
  short_ttl.ttl = std::chrono::seconds(1);
  ASSERT_EQ(put_root(keys[0], short_ttl), true); // a repeat put
  clock.advance(std::chrono::seconds(2));
  wall.advance(std::chrono::seconds(2));
  ASSERT_EQ(*store_->lookup(ns_, keys), 0U); // k0 dead, held by k1
  // What a request would match, as routers read it: not k0's disk copy.
  EXPECT_EQ(store_->lookup_tiers(ns_, keys)->disk, 0U);
  const auto r = run(keys);
  EXPECT_EQ(r.matched_blocks + r.computed_blocks, 2U);
  EXPECT_EQ(r.computed_blocks, 2U) << "matched " << r.matched_blocks;
  EXPECT_EQ(*store_->lookup(ns_, keys), 2U);
  store_->check_invariants();
}

// A put that gives a block a shorter TTL than its disk copy's: once the
// block has left memory, the disk no longer serves it past the new expiry.
// (Before, the copy kept its 100 s expiry, an eviction skipped the spill as
// the copy "lasted", and a request 2 s later matched the block from disk.)
// A pinned disk copy is rewritten with the new expiry and keeps its pin.
TEST_F(store_disk_test, a_put_that_shortens_a_ttl_shortens_the_disk_copy_too) {
  auto& [clock, wall] = open_on_test_clocks();
  const auto a = chain(1, 1);
  const auto b = chain(100, 1);
  put_options long_ttl;
  long_ttl.ttl = std::chrono::seconds(100);
  ASSERT_TRUE(store_->process(ns_, a, spec().block_tokens, producer_, long_ttl)
                  .has_value());
  long_ttl.pin = true;
  ASSERT_TRUE(store_->process(ns_, b, spec().block_tokens, producer_, long_ttl)
                  .has_value());
  ASSERT_TRUE(store_->persist(std::chrono::seconds(30)).has_value());
  ASSERT_TRUE(store_->on_disk(ns_, a[0]));
  ASSERT_EQ(store_->disk()->lookup(b[0])->pins, 1U);
  put_options short_ttl;
  short_ttl.ttl = std::chrono::seconds(1);
  for (const auto& k : {a[0], b[0]})
    ASSERT_EQ(put_root(k, short_ttl), true); // a repeat put
  EXPECT_EQ(store_->stats().outlasting_disk_copies_dropped, 1U);
  const auto pinned = store_->disk()->lookup(b[0]);
  ASSERT_TRUE(pinned.has_value());
  EXPECT_EQ(pinned->pins, 1U);
  EXPECT_LE(pinned->expires_at, wall.now() + std::chrono::seconds(2));
  ASSERT_GT(store_->evict_bytes(spec().value_bytes()), 0U); // a: b is pinned
  ASSERT_EQ(store_->lookup_tiers(ns_, a)->memory, 0U);
  clock.advance(std::chrono::seconds(2));
  wall.advance(std::chrono::seconds(2));
  EXPECT_EQ(store_->lookup_tiers(ns_, a)->disk, 0U);
  EXPECT_EQ(store_->lookup_tiers(ns_, b)->disk, 0U);
  const auto r = run(a);
  EXPECT_EQ(r.computed_blocks, 1U) << "matched " << r.matched_blocks;
  store_->check_invariants();
}

// A block put with no TTL in a namespace whose default TTL is 100 s is on
// disk with no expiry; brought back by a request, it keeps none, and a
// promotion is no put: its disk copy stays as it was.
// (The first version of the drop above erased it: a review's probe.) A
// fresh put of it with a shorter TTL, with only that copy left, drops it.
TEST_F(store_disk_test, a_promotion_leaves_a_never_expiring_disk_copy_alone) {
  const namespace_spec ttl_spec = ttl_model_spec();
  auto ns = store_->register_namespace(ttl_spec, ttl_model_options());
  ASSERT_TRUE(ns.has_value()) << ns.error().describe();
  const block_key key = chain_key_from_id({}, ttl_spec.fingerprint(), 1);
  const std::vector<block_key> keys{key};
  put_options forever;
  forever.ttl = nanos{0};
  ASSERT_TRUE(
      store_->process(*ns, keys, spec().block_tokens, producer_, forever)
          .has_value());
  ASSERT_TRUE(store_->persist(std::chrono::seconds(30)).has_value());
  ASSERT_EQ(store_->disk()->lookup(key)->expires_at.count(), 0);
  ASSERT_GT(store_->evict_bytes(spec().value_bytes()), 0U);
  const auto r = store_->process(*ns, keys, spec().block_tokens, producer_);
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  ASSERT_EQ(r->disk_blocks, 1U);
  EXPECT_EQ(store_->stats().outlasting_disk_copies_dropped, 0U);
  const auto copy = store_->disk()->lookup(key);
  ASSERT_TRUE(copy.has_value());
  EXPECT_EQ(copy->expires_at.count(), 0);

  // Out of memory again (its copy lasts: no spill), then a fresh put of
  // it with a 1 s TTL: that copy would outlast it, and goes.
  ASSERT_GT(store_->evict_bytes(spec().value_bytes()), 0U);
  put_options short_ttl;
  short_ttl.ttl = std::chrono::seconds(1);
  ASSERT_EQ(put_root(*ns, ttl_spec, key, short_ttl), false); // a fresh put
  EXPECT_EQ(store_->stats().outlasting_disk_copies_dropped, 1U);
  EXPECT_FALSE(store_->disk()->lookup(key).has_value());
  store_->check_invariants();
}

// A block put with no TTL, at low priority, in a namespace whose default
// TTL is 100 s: a normal request brings it back from disk and raises its
// priority. It keeps "never" in memory, and its disk copy, written again
// for the new priority at the next spill, keeps it too. (Before, the
// promotion gave it the namespace's TTL: it expired from memory after
// 100 s, and the rewrite took that expiry to disk; pinned, at the
// promotion's own commit. A review's probe.)
TEST_F(store_disk_test,
       a_promoted_block_keeps_no_expiry_when_its_priority_rises) {
  auto& [clock, wall] = open_on_test_clocks();
  const namespace_spec ttl_spec = ttl_model_spec();
  auto ns = store_->register_namespace(ttl_spec, ttl_model_options());
  ASSERT_TRUE(ns.has_value()) << ns.error().describe();
  const std::vector<block_key> keys{
      chain_key_from_id({}, ttl_spec.fingerprint(), 1)};
  put_options low_forever;
  low_forever.ttl = nanos{0};
  low_forever.prio = priority::low;
  ASSERT_TRUE(
      store_->process(*ns, keys, spec().block_tokens, producer_, low_forever)
          .has_value());
  ASSERT_TRUE(store_->persist(std::chrono::seconds(30)).has_value());
  ASSERT_GT(store_->evict_bytes(spec().value_bytes()), 0U);
  put_options with_ttl; // normal priority, and a TTL for what it computes
  with_ttl.ttl = std::chrono::seconds(10);
  const auto r =
      store_->process(*ns, keys, spec().block_tokens, producer_, with_ttl);
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  ASSERT_EQ(r->disk_blocks, 1U);
  clock.advance(std::chrono::seconds(200));
  wall.advance(std::chrono::seconds(200));
  EXPECT_EQ(*store_->lookup(*ns, keys), 1U) << "expired in memory";
  ASSERT_GT(store_->evict_bytes(spec().value_bytes()), 0U);
  ASSERT_TRUE(store_->persist(std::chrono::seconds(30)).has_value());
  const auto copy = store_->disk()->lookup(keys[0]);
  ASSERT_TRUE(copy.has_value());
  EXPECT_EQ(copy->prio, priority::normal) << "rewritten for the priority";
  EXPECT_EQ(copy->expires_at.count(), 0);
  store_->check_invariants();
}

// put_tokens() sets the cached prefix it skips to its put's expiry, as a
// duplicate put's commit does: a disk copy of that prefix that would
// outlast it goes too. (Before, the copy with no expiry stayed, the
// eviction skipped the spill as that copy "lasted", and the block came
// back from disk after its 1 s TTL, with no expiry at all.)
TEST_F(store_disk_test,
       a_token_put_over_a_cached_prefix_drops_its_longer_copy) {
  auto& [clock, wall] = open_on_test_clocks();
  std::vector<std::uint32_t> tokens(2 * spec().block_tokens);
  for (std::size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = static_cast<std::uint32_t>(i + 1);
  std::vector<block_key> keys;
  chain_keys(spec().fingerprint(), spec().block_tokens, tokens, keys);
  ASSERT_EQ(keys.size(), 2U);
  const std::size_t vb = spec().value_bytes();
  std::vector<std::byte> values(2 * vb);
  for (std::size_t i = 0; i < 2; ++i)
    ASSERT_TRUE(
        producer_
            .produce(spec(), keys[i], std::span(values).subspan(i * vb, vb))
            .has_value());
  ASSERT_EQ(*store_->put_tokens(ns_,
                                std::span(tokens).first(spec().block_tokens),
                                std::span(values).first(vb)),
            1U); // no TTL
  ASSERT_TRUE(store_->persist(std::chrono::seconds(30)).has_value());
  ASSERT_EQ(store_->disk()->lookup(keys[0])->expires_at.count(), 0);
  put_options one_second;
  one_second.ttl = std::chrono::seconds(1);
  ASSERT_EQ(*store_->put_tokens(ns_, tokens, values, one_second), 1U);
  EXPECT_EQ(store_->stats().outlasting_disk_copies_dropped, 1U);
  EXPECT_FALSE(store_->disk()->lookup(keys[0]).has_value());
  clock.advance(std::chrono::seconds(10));
  wall.advance(std::chrono::seconds(10));
  EXPECT_EQ(store_->lookup_tiers(ns_, keys)->disk, 0U);
  EXPECT_FALSE(store_->contains(ns_, keys[0]));
  store_->check_invariants();
}

// A block whose copy on disk is damaged is computed by the request that
// tried to bring it back: a put of that request's, with its TTL. (Before,
// it kept the damaged copy's expiry, here none, and never expired.)
TEST_F(store_disk_test,
       a_block_computed_after_a_failed_promotion_takes_the_ttl) {
  auto& [clock, wall] = open_on_test_clocks();
  const auto a = chain(1, 1);
  run(a); // no TTL
  ASSERT_TRUE(store_->persist(std::chrono::seconds(30)).has_value());
  open(); // memory empty, the block on disk; the same clocks
  ASSERT_EQ(store_->disk()->lookup(a[0])->expires_at.count(), 0);
  ASSERT_TRUE(flip_byte_in_segments(32 + 1)); // record 0's header
  put_options one_second;
  one_second.ttl = std::chrono::seconds(1);
  const auto r =
      store_->process(ns_, a, spec().block_tokens, producer_, one_second);
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  ASSERT_EQ(r->computed_blocks, 1U);
  ASSERT_EQ(store_->stats().promotion_failures, 1U);
  EXPECT_TRUE(store_->contains(ns_, a[0]));
  clock.advance(std::chrono::seconds(2));
  wall.advance(std::chrono::seconds(2));
  EXPECT_FALSE(store_->contains(ns_, a[0]));
  store_->check_invariants();
}

// A pinned block's disk copy is its pin across restarts: a repeat put that
// takes its TTL away rewrites that copy with no expiry, still pinned.
// (Before, the copy kept the first put's 10 s until a persist(), and a
// crash and restart after those 10 s lost the pinned block.)
TEST_F(store_disk_test, a_put_that_lengthens_a_pinned_blocks_ttl_reaches_disk) {
  auto& [clock, wall] = open_on_test_clocks();
  const auto a = chain(1, 1);
  put_pinned_on_disk(a, std::chrono::seconds(10));
  auto copy = store_->disk()->lookup(a[0]);
  ASSERT_TRUE(copy.has_value());
  ASSERT_EQ(copy->pins, 1U);
  ASSERT_NE(copy->expires_at.count(), 0);
  put_options forever;
  forever.ttl = nanos{0};
  ASSERT_EQ(put_root(a[0], forever), true); // a repeat put, no pin
  // At the commit, not only at a clean shutdown's persist(): a crash
  // before that left the 10 s copy.
  copy = store_->disk()->lookup(a[0]);
  ASSERT_TRUE(copy.has_value());
  EXPECT_EQ(copy->pins, 1U);
  EXPECT_EQ(copy->expires_at.count(), 0);
  EXPECT_EQ(store_->stats().outlasting_disk_copies_dropped, 0U);
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
  clock.advance(std::chrono::seconds(60));
  wall.advance(std::chrono::seconds(60));
  EXPECT_TRUE(store_->on_disk(ns_, a[0])) << "the pinned copy expired";
  store_->check_invariants();
}

// Repeat puts of a pinned block with the same TTL move its expiry a little
// each time: its disk copy, still with most of that time left, is not
// rewritten for each (a review counted 10 spills for 10 puts 2 s apart).
TEST_F(store_disk_test, repeat_puts_of_a_pinned_block_do_not_rewrite_its_copy) {
  auto& [clock, wall] = open_on_test_clocks();
  const auto a = chain(1, 1);
  put_pinned_on_disk(a, std::chrono::hours(1));
  const auto spills = store_->stats().spills;
  put_options hour;
  hour.ttl = std::chrono::hours(1);
  for (int i = 0; i < 10; ++i) {
    clock.advance(std::chrono::seconds(2));
    wall.advance(std::chrono::seconds(2));
    ASSERT_EQ(put_root(a[0], hour), true);
  }
  EXPECT_EQ(store_->stats().spills, spills);
  // Past half the hour the copy is written again, once.
  clock.advance(std::chrono::minutes(40));
  wall.advance(std::chrono::minutes(40));
  ASSERT_EQ(put_root(a[0], hour), true);
  EXPECT_EQ(store_->stats().spills, spills + 1);
  store_->check_invariants();
}

// A request with a negative TTL is refused before it begins: the disk
// copy stays as it was. (Before, process() computed and cached nothing and
// succeeded: every reserve() refused the TTL, and a block whose promotion
// failed had first taken it as none, through expiry_after(), and stayed
// for good.)
TEST_F(store_disk_test,
       a_negative_ttl_request_is_refused_and_leaves_disk_as_it_was) {
  const auto a = chain(1, 1);
  run(a);
  ASSERT_TRUE(store_->persist(std::chrono::seconds(30)).has_value());
  open(); // memory empty, the block on disk
  put_options negative;
  negative.ttl = std::chrono::seconds(-5);
  const auto r =
      store_->process(ns_, a, spec().block_tokens, producer_, negative);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, errc::invalid_argument) << r.error().describe();
  EXPECT_EQ(store_->stats().rejected_requests, 1U);
  EXPECT_FALSE(store_->contains(ns_, a[0]));
  const auto where = store_->lookup_tiers(ns_, a);
  ASSERT_TRUE(where.has_value());
  EXPECT_EQ(where->disk, 1U); // still on disk
  store_->check_invariants();
}

/// A prefill that takes time: moves both clocks by `step` per block.
class slow_producer final : public kv_producer {
public:
  slow_producer(manual_clock& store, manual_clock& wall, nanos step)
      : store_(store), wall_(wall), step_(step) {}
  result<void> produce(const namespace_spec& s, const block_key& k,
                       std::span<std::byte> out) override {
    ++calls;
    store_.advance(step_);
    wall_.advance(step_);
    return inner_.produce(s, k, out);
  }
  nanos cost(std::size_t t) const noexcept override { return inner_.cost(t); }
  int calls = 0;

private:
  manual_clock& store_;
  manual_clock& wall_;
  nanos step_;
  synthetic_producer inner_;
};

// The final pins of a pinned process() (its matched blocks) take their
// share of the checked bytes too. Here k2's pinned disk copy counted
// nothing at the check, then expired while k1 was computed: k2 was
// computed, its pin new, and took the bytes k0's pin was checked for; k0
// was then pinned unchecked, past the limit (36 KiB of 32). Now k0's pin
// is checked, and the request fails whole, pinning nothing.
TEST_F(store_disk_test, a_request_cannot_spend_its_checked_pins_twice) {
  auto& [clock, wall] = open_on_test_clocks();
  max_pinned_fraction_ = 1.0;
  open(16);
  const auto c = chain(1, 3);
  put_options long_ttl;
  long_ttl.ttl = std::chrono::seconds(100);
  ASSERT_TRUE(store_
                  ->process(ns_, std::vector<block_key>{c[0]},
                            spec().block_tokens, producer_, long_ttl)
                  .has_value());
  put_options short_ttl;
  short_ttl.ttl = std::chrono::seconds(1);
  auto h1 = store_->reserve(ns_, c[1], c[0], short_ttl);
  ASSERT_TRUE(h1.has_value()) << h1.error().describe();
  ASSERT_TRUE(store_->write_from(*h1, producer_).has_value());
  ASSERT_TRUE(store_->commit(*h1).has_value());
  put_options pinned;
  pinned.pin = true;
  pinned.ttl = std::chrono::seconds(3);
  auto h2 = store_->reserve(ns_, c[2], c[1], pinned);
  ASSERT_TRUE(h2.has_value()) << h2.error().describe();
  ASSERT_TRUE(store_->write_from(*h2, producer_).has_value());
  ASSERT_TRUE(store_->commit(*h2).has_value());
  ASSERT_TRUE(store_->persist(std::chrono::seconds(30)).has_value());
  max_pinned_fraction_ = 0.5; // 8 blocks
  open(16);
  ASSERT_TRUE(store_
                  ->process(ns_, std::vector<block_key>{c[0]},
                            spec().block_tokens, producer_)
                  .has_value()); // k0 back, unpinned
  clock.advance(std::chrono::milliseconds(1500));
  wall.advance(std::chrono::milliseconds(1500)); // k1's copy gone
  put_options pin;
  pin.pin = true;
  ASSERT_TRUE(
      store_->process(ns_, chain(100, 6), 96, producer_, pin).has_value());
  ASSERT_EQ(store_->pinned_bytes(), 6 * block_bytes);
  slow_producer slow(clock, wall, std::chrono::seconds(2));
  auto r = store_->process(ns_, c, 3 * spec().block_tokens, slow, pin);
  EXPECT_LE(store_->pinned_bytes(), store_->pinned_bytes_limit());
  if (!r.has_value()) {
    EXPECT_EQ(r.error().code, errc::out_of_memory) << r.error().describe();
    EXPECT_EQ(store_->pinned_bytes(), 6 * block_bytes) << "half pinned";
  }
  store_->check_invariants();
}

TEST_F(store_disk_test,
       a_disk_hit_that_expires_while_a_later_block_is_computed_is_none) {
  // k0 and k1 (10 s TTL) only on disk; k1's copy is damaged, so the request
  // computes it, and that prefill takes 20 s: k0, read back first, has
  // expired by then and is computed again. The reply counts k0 computed,
  // not matched. (Before, matched 1 and computed 1 for 3 blocks computed,
  // the computed count wrapping below zero and back; a disk hit counted.)
  auto& [clock, wall] = open_on_test_clocks();
  const auto keys = chain(1, 2);
  put_options ttl;
  ttl.ttl = std::chrono::seconds(10);
  ASSERT_TRUE(
      store_->process(ns_, keys, 2 * spec().block_tokens, producer_, ttl)
          .has_value());
  ASSERT_TRUE(store_->persist(std::chrono::seconds(30)).has_value());
  open(); // memory empty, both on disk
  ASSERT_TRUE(store_->on_disk(ns_, keys[0]) && store_->on_disk(ns_, keys[1]));
  // In record 1's header (before its payload): its read fails at once.
  ASSERT_TRUE(flip_byte_in_segments(payload_of_record(1) - 60));
  slow_producer slow(clock, wall, std::chrono::seconds(20));
  auto r = store_->process(ns_, keys, 2 * spec().block_tokens, slow);
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  EXPECT_EQ(slow.calls, 3);
  EXPECT_EQ(r->matched_blocks, 0U);
  EXPECT_EQ(r->computed_blocks, 2U);
  EXPECT_EQ(r->disk_blocks, 0U);
  EXPECT_EQ(store_->stats().disk_block_hits, 0U);
  store_->check_invariants();
}

TEST_F(store_disk_test, a_clean_restart_serves_every_committed_block) {
  std::vector<std::vector<block_key>> chains;
  for (std::uint64_t i = 0; i < 25; ++i) {
    chains.push_back(chain(100 * (i + 1), 4));
    run(chains.back());
  }
  auto written = store_->persist();
  ASSERT_TRUE(written.has_value()) << written.error().describe();
  open(); // a new process would do the same: reopen the tier, new store
  std::size_t served = 0;
  std::size_t total = 0;
  for (const auto& c : chains) {
    const auto r = run(c);
    served += r.matched_blocks;
    total += c.size();
    for (const auto& k : c)
      expect_correct(k);
  }
  EXPECT_EQ(served, total); // the bar is 99%; a clean restart loses none
}

// nanos::max() means no bound: before, now() plus it overflowed and the
// call failed at once with io_error. A negative timeout is refused.
TEST_F(store_disk_test,
       persist_without_a_bound_waits_and_a_negative_one_is_refused) {
  for (std::uint64_t i = 0; i < 5; ++i)
    run(chain(100 * (i + 1), 4));
  auto written = store_->persist(nanos::max());
  ASSERT_TRUE(written.has_value()) << written.error().describe();
  EXPECT_EQ(*written, store_->block_count());
  auto negative = store_->persist(nanos{-1});
  ASSERT_FALSE(negative.has_value());
  EXPECT_EQ(negative.error().code, errc::invalid_argument);
  EXPECT_NE(negative.error().message.find("negative"), std::string::npos)
      << negative.error().message;
}

TEST_F(store_disk_test, persist_counts_only_the_blocks_the_disk_took) {
  auto full = std::make_shared<std::atomic<bool>>(false);
  open(20, false, [full](disk_tier_config& c) {
    c.write_fault_for_testing = [full] { return full->load() ? ENOSPC : 0; };
    c.free_bytes_for_testing = [full] {
      return full->load() ? std::uint64_t{0} : std::uint64_t{1} << 40;
    };
  });
  const auto a = chain(1, 4);
  run(a);
  ASSERT_EQ(store_->stats().spills, 0U);
  // The file system fills up: the tier takes the spills and then fails
  // them (the first) or refuses them (the rest, once it knows).
  full->store(true);
  auto written = store_->persist();
  ASSERT_TRUE(written.has_value()) << written.error().describe();
  EXPECT_EQ(*written, 0U) << "blocks the disk refused counted as written";
  for (const auto& k : a) {
    EXPECT_FALSE(store_->disk()->contains(k)) << k.to_hex();
  }
  const auto s = store_->stats();
  EXPECT_EQ(s.spills, 0U) << "failed spills counted as written";
  EXPECT_EQ(s.spill_failures, a.size());
  // With space again, persist() writes them and says so.
  full->store(false);
  (void)store_->disk()->flush(); // a batch sees the space freed
  ASSERT_TRUE(store_->disk()->wait_idle());
  ASSERT_FALSE(store_->disk()->stats().full);
  written = store_->persist();
  ASSERT_TRUE(written.has_value()) << written.error().describe();
  EXPECT_EQ(*written, a.size());
  EXPECT_EQ(store_->stats().spills, a.size());
  for (const auto& k : a) {
    EXPECT_TRUE(store_->disk()->contains(k)) << k.to_hex();
  }
}

TEST_F(store_disk_test, puts_alone_do_not_pile_up_the_disk_tiers_answers) {
  // A store fed only by reserve/write/commit (no process(), promote(),
  // poll_disk() or persist()) spills a block at every eviction, and the
  // tier answers each spill.
  for (std::uint64_t i = 0; i < 60; ++i) {
    const block_key k = chain(1000 * (i + 1), 1)[0];
    auto h = store_->reserve(ns_, k, block_key{}, {});
    ASSERT_TRUE(h.has_value()) << h.error().describe();
    ASSERT_TRUE(store_->write_from(*h, producer_).has_value());
    ASSERT_TRUE(store_->commit(*h).has_value());
    ASSERT_TRUE(store_->disk()->wait_idle());
  }
  EXPECT_GE(store_->stats().spills, 40U);
  const std::size_t left =
      store_->disk()->drain_completions([](disk_completion&&) {});
  EXPECT_LE(left, 1U) << "the disk tier's answers pile up uncollected";
}

TEST_F(store_disk_test,
       a_block_put_again_after_its_disk_copy_expired_is_spilled_anew) {
  // Clocks the test moves: the store's, and the disk tier's wall clock.
  static manual_clock store_clock{nanos{1'000'000'000}};
  static manual_clock wall{std::chrono::hours(24 * 365 * 50)};
  store_.reset();
  disk_tier_config dc;
  dc.directory = dir_;
  dc.capacity_bytes = std::uint64_t{64} << 20;
  dc.segment_bytes = std::uint64_t{1} << 20;
  dc.clock = &wall;
  auto tier = disk_tier::open(dc);
  ASSERT_TRUE(tier.has_value()) << tier.error().describe();
  store_config cfg;
  cfg.capacity_bytes = 20 * block_bytes;
  cfg.slab_bytes = block_bytes;
  cfg.policy = policy_kind::lru;
  cfg.adaptive_compression = false;
  cfg.clock = &store_clock;
  auto s = block_store::create(cfg);
  ASSERT_TRUE(s.has_value()) << s.error().describe();
  store_ = std::move(*s);
  ASSERT_TRUE(store_->attach_disk(std::move(*tier)).has_value());
  ns_ = *store_->register_namespace(spec());

  const std::vector<block_key> k = chain(1, 1);
  put_options ten_minutes;
  ten_minutes.ttl = std::chrono::minutes(10);
  auto put = [&] {
    auto h = store_->reserve(ns_, k[0], block_key{}, ten_minutes);
    ASSERT_TRUE(h.has_value()) << h.error().describe();
    ASSERT_TRUE(store_->write_from(*h, producer_).has_value());
    ASSERT_TRUE(store_->commit(*h).has_value());
  };
  put();
  // A pin writes it through to disk, with its expiry.
  ASSERT_TRUE(store_->pin(ns_, k[0]).has_value());
  ASSERT_TRUE(store_->unpin(ns_, k[0]).has_value());
  ASSERT_TRUE(store_->disk()->wait_idle());
  ASSERT_TRUE(store_->disk()->contains(k[0]));
  // Both copies expire; nothing has run the disk tier's expire() yet. The
  // same block is put again, for ten more minutes, and then evicted.
  store_clock.advance(std::chrono::minutes(11));
  wall.advance(std::chrono::minutes(11));
  put();
  ASSERT_TRUE(store_->contains(ns_, k[0]));
  store_->evict_bytes(store_->used_bytes());
  ASSERT_FALSE(store_->contains(ns_, k[0]));
  ASSERT_TRUE(store_->disk()->wait_idle());
  const auto tiers = store_->lookup_tiers(ns_, k);
  ASSERT_TRUE(tiers.has_value());
  EXPECT_EQ(tiers->disk, 1U) << "evicted on the strength of an expired copy";
  EXPECT_EQ(run(k).disk_blocks, 1U);
  expect_correct(k[0]);
}

TEST_F(store_disk_test, pins_survive_a_restart) {
  const auto a = chain(1, 2);
  run(a);
  ASSERT_TRUE(store_->pin(ns_, a[0]).has_value());
  ASSERT_TRUE(store_->persist().has_value());
  open();
  EXPECT_EQ(run(a).disk_blocks, 2U);
  store_->evict_bytes(std::size_t{1} << 30);
  EXPECT_TRUE(store_->contains(ns_, a[0])); // came back pinned
  EXPECT_FALSE(store_->contains(ns_, a[1]));
  ASSERT_TRUE(store_->unpin(ns_, a[0]).has_value());
  EXPECT_EQ(store_->disk()->lookup(a[0])->pins, 0U);
}

TEST_F(store_disk_test, nested_pins_survive_a_restart_nested) {
  // Pinned twice (pin, pin, unpin, pin): the disk copy holds two pins, and
  // after a restart the block comes back pinned twice, so one holder's
  // unpin leaves it pinned. (Before, the disk copy held one pin: the first
  // unpin after the restart left the block evictable, and the second
  // failed "not pinned".)
  const auto a = chain(1, 1);
  run(a);
  for (const bool pin : {true, true, false, true}) {
    ASSERT_TRUE(
        (pin ? store_->pin(ns_, a[0]) : store_->unpin(ns_, a[0])).has_value());
  }
  EXPECT_EQ(store_->disk()->lookup(a[0])->pins, 2U);
  ASSERT_TRUE(store_->persist().has_value());
  open();
  EXPECT_EQ(store_->disk()->lookup(a[0])->pins, 2U);
  ASSERT_TRUE(store_->acquire(ns_, a[0]).has_value()); // back, pinned
  ASSERT_TRUE(store_->unpin(ns_, a[0]).has_value());
  EXPECT_EQ(store_->disk()->lookup(a[0])->pins, 1U);
  store_->evict_bytes(std::size_t{1} << 30);
  EXPECT_TRUE(store_->contains(ns_, a[0])) << "one pin is left";
  ASSERT_TRUE(store_->unpin(ns_, a[0]).has_value());
  EXPECT_EQ(store_->disk()->lookup(a[0])->pins, 0U);
  store_->evict_bytes(std::size_t{1} << 30);
  EXPECT_FALSE(store_->contains(ns_, a[0]));
  auto third = store_->unpin(ns_, a[0]);
  ASSERT_FALSE(third.has_value());
  EXPECT_EQ(third.error().code, errc::invalid_argument);
}

TEST_F(store_disk_test, a_put_again_after_a_restart_keeps_the_copys_pins) {
  // Pinned twice, persisted, restarted; the block is put again (no pin,
  // then with a pin): it takes its copy's two pins, so a third pin makes
  // three on disk and the old holders' unpins still find theirs. (Before
  // the copy's count followed the put's: a pin set it to 1 and the old
  // holders' second unpin failed "not pinned".)
  for (const bool pin_put : {false, true}) {
    SCOPED_TRACE(pin_put ? "put with a pin" : "put without one");
    const auto a = chain(pin_put ? 2 : 1, 1);
    open();
    run(a);
    ASSERT_TRUE(store_->pin(ns_, a[0]).has_value());
    ASSERT_TRUE(store_->pin(ns_, a[0]).has_value());
    ASSERT_TRUE(store_->persist().has_value());
    open();
    put_options o;
    o.pin = pin_put;
    ASSERT_TRUE(put_root(a[0], o).has_value());
    EXPECT_EQ(store_->disk()->lookup(a[0])->pins, 2U);
    ASSERT_TRUE(store_->pin(ns_, a[0]).has_value());
    EXPECT_EQ(store_->disk()->lookup(a[0])->pins, 3U);
    for (std::uint32_t left : {2U, 1U, 0U}) {
      ASSERT_TRUE(store_->unpin(ns_, a[0]).has_value()) << left;
      EXPECT_EQ(store_->disk()->lookup(a[0])->pins, left);
    }
    store_->evict_bytes(std::size_t{1} << 30);
    EXPECT_FALSE(store_->contains(ns_, a[0]));
  }
}

TEST_F(store_disk_test, a_copy_of_another_namespaces_key_is_not_this_blocks) {
  // Namespace A's block is on disk when, after a restart, namespace B puts
  // a block of the same raw key and the same bytes. Evicted, B's block is
  // written to disk in B's name: A's copy is none of B's, and B's block
  // would not come back from it. (Before, the spill was skipped as already
  // on disk, and B's block was gone.)
  const namespace_spec other = another_model_spec();
  const auto a = chain(7, 1);
  const ns_id b = spill_and_reopen_with(a, other);
  ASSERT_TRUE(put_root(b, other, a[0], put_options{}).has_value());
  const auto skipped = store_->stats().spills_skipped;
  spill_everything();
  EXPECT_EQ(store_->stats().spills_skipped, skipped);
  const auto info = store_->disk()->lookup(a[0]);
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->ns, other.fingerprint());
  EXPECT_EQ(store_->lookup_tiers(b, a)->disk, 1U);
  EXPECT_EQ(store_->lookup_tiers(ns_, a)->disk, 0U);
  auto lease = store_->acquire(b, a[0]);
  ASSERT_TRUE(lease.has_value()) << lease.error().describe();
  lease->release();
  store_->check_invariants();
}

TEST_F(store_disk_test,
       another_namespaces_copy_outlives_this_blocks_ttl_and_damage) {
  // Namespace A's block (no expiry) is on disk when, after a restart,
  // namespace B puts a block of the same raw key for ten minutes, and B's
  // block is then found damaged. A's copy is none of B's: it is neither
  // dropped as outlasting B's block nor with B's damaged bytes. (Before,
  // each of the two erased it, and A's block was lost.)
  const namespace_spec other = another_model_spec();
  const auto a = chain(7, 1);
  const ns_id b = spill_and_reopen_with(a, other);
  put_options ten_minutes;
  ten_minutes.ttl = std::chrono::minutes(10);
  ASSERT_TRUE(put_root(b, other, a[0], ten_minutes).has_value());
  ASSERT_TRUE(store_->disk()->wait_idle());
  EXPECT_EQ(store_->stats().outlasting_disk_copies_dropped, 0U);
  EXPECT_EQ(store_->lookup_tiers(ns_, a)->disk, 1U);

  ASSERT_TRUE(store_->corrupt_for_testing(b, a[0], 10).has_value());
  {
    auto lease = store_->acquire(b, a[0]);
    ASSERT_TRUE(lease.has_value()) << lease.error().describe();
    std::vector<std::byte> out(other.value_bytes());
    EXPECT_EQ(store_->read(*lease, out).error().code, errc::checksum_mismatch);
  }
  ASSERT_TRUE(store_->disk()->wait_idle());
  EXPECT_EQ(store_->lookup_tiers(ns_, a)->disk, 1U);
  EXPECT_EQ(run(a).disk_blocks, 1U);
  expect_correct(a[0]);
  store_->check_invariants();
}

TEST_F(store_disk_test, a_failed_request_counts_its_disk_blocks_as_hits) {
  // Four blocks on disk, a fifth the producer fails: the request fails,
  // the four brought back stay cached and count as hits (disk_block_hits
  // said so, block_hits did not: 0 hits, 5 misses). With pin, none of them
  // is left pinned (a block brought back is pinned only when the request
  // succeeds).
  const auto k = chain(3, 5);
  run(std::vector<block_key>(k.begin(), k.begin() + 4));
  spill_everything();
  struct no_kv final : kv_producer {
    result<void> produce(const namespace_spec&, const block_key&,
                         std::span<std::byte>) override {
      return make_error(errc::backend_error, "no KV for this block");
    }
    nanos cost(std::size_t) const noexcept override { return nanos{0}; }
  } fails;
  const store_stats before = store_->stats();
  put_options pin;
  pin.pin = true;
  const auto r = store_->process(ns_, k, 5 * spec().block_tokens, fails, pin);
  ASSERT_FALSE(r.has_value());
  const store_stats after = store_->stats();
  EXPECT_EQ(after.disk_block_hits - before.disk_block_hits, 4U);
  EXPECT_EQ(after.block_hits - before.block_hits, 4U);
  EXPECT_EQ(after.block_misses - before.block_misses, 1U);
  for (std::size_t i = 0; i < 4; ++i) {
    ASSERT_TRUE(store_->contains(ns_, k[i]));
    EXPECT_EQ(store_->unpin(ns_, k[i]).error().code, errc::invalid_argument);
  }
  ASSERT_TRUE(store_->disk()->wait_idle());
  for (std::size_t i = 0; i < 4; ++i) {
    if (const auto info = store_->disk()->lookup(k[i])) {
      EXPECT_EQ(info->pins, 0U);
    }
  }
  store_->check_invariants();
}

TEST_F(store_disk_test, a_block_on_disk_with_no_room_in_memory_says_so) {
  // Memory (4 blocks) full of pinned blocks: a block only on disk cannot
  // come back. acquire() and a put naming it as parent say it is there
  // but has no room, with the reservation's error (before, they said "not
  // cached", errc::not_found, of a block on disk).
  max_pinned_fraction_ = 1.0; // pins fill memory here
  open(4);
  const auto k = chain(7, 1)[0];
  run({k});
  spill_everything();
  put_options pinned;
  pinned.pin = true;
  for (std::uint64_t i = 0; i < 4; ++i)
    ASSERT_TRUE(put_root(chain(100 + i, 1)[0], pinned).has_value());
  ASSERT_EQ(store_->block_count(), 4U);
  ASSERT_TRUE(store_->on_disk(ns_, k));
  const auto said_so = [&](const error& e, const char* what) {
    EXPECT_NE(e.code, errc::not_found) << what << ": " << e.describe();
    EXPECT_NE(e.message.find("could not be brought back"), std::string::npos)
        << what << ": " << e.describe();
  };
  auto a = store_->acquire(ns_, k);
  ASSERT_FALSE(a.has_value());
  said_so(a.error(), "acquire");
  // pin() finds the pins' limit reached first (every byte is pinned),
  // before it tries to bring the block back.
  auto p = store_->pin(ns_, k);
  ASSERT_FALSE(p.has_value());
  EXPECT_EQ(p.error().code, errc::out_of_memory) << p.error().describe();
  EXPECT_NE(p.error().message.find("max_pinned_fraction"), std::string::npos)
      << p.error().describe();
  auto child = store_->reserve(ns_, chain(200, 1)[0], k);
  ASSERT_FALSE(child.has_value());
  said_so(child.error(), "reserve");
  EXPECT_TRUE(store_->on_disk(ns_, k));
  // Absent everywhere: still not_found.
  auto none = store_->acquire(ns_, chain(999, 1)[0]);
  ASSERT_FALSE(none.has_value());
  EXPECT_EQ(none.error().code, errc::not_found) << none.error().describe();
}

TEST_F(store_disk_test,
       a_pinned_block_linked_under_its_chain_stays_within_the_pin_limit) {
  // Two 6-block chains go to disk; pinning each last block brings it back
  // alone, charged one block. Requests without a pin then bring the chains
  // back: linked under its chain, a pinned block would hold 6 blocks. The
  // first fits the limit (8 blocks) and is linked; the second would pass
  // it, so it stays a root and its chain stays evictable: another pin
  // still fits. (Before, both were linked unchecked: 12 blocks held past
  // the limit of 8, and every later pin was refused.)
  open(16);
  ASSERT_EQ(store_->pinned_bytes_limit(), 8 * block_bytes);
  const std::vector<std::vector<block_key>> chains{chain(1000, 6),
                                                   chain(2000, 6)};
  for (const auto& k : chains)
    run(k);
  spill_everything();
  for (const auto& k : chains)
    ASSERT_TRUE(store_->pin(ns_, k.back()).has_value());
  EXPECT_EQ(store_->pin_held_bytes(), 2 * block_bytes);
  for (const auto& k : chains)
    EXPECT_EQ(run(k).matched_blocks, 6U);
  store_->check_invariants();
  EXPECT_EQ(store_->pin_held_bytes(), 7 * block_bytes);
  const auto other = chain(3000, 1);
  run(other);
  EXPECT_TRUE(store_->pin(ns_, other[0]).has_value());
  store_->check_invariants();
}

TEST_F(store_disk_test, a_pinning_duplicate_put_is_charged_the_chain_it_links) {
  // Chain a is pinned through its last block (6 blocks held of a limit of
  // 8). b's last block comes back from disk alone, then b's first five
  // blocks. A pinning put of b's last block naming b[4] as its parent
  // would link it under b and hold 6 blocks more: refused, as a new
  // pinning put under b[4] is, and nothing is pinned. (Before, it was
  // charged its own block only, pinned, and left unlinked: its chain
  // evictable, the pinned block out of reach of any lookup.)
  open(16);
  const auto a = chain(1000, 6);
  const auto b = chain(2000, 6);
  run(a);
  run(b);
  spill_everything();
  ASSERT_TRUE(store_->pin(ns_, a.back()).has_value());
  EXPECT_EQ(run(a).matched_blocks, 6U);
  ASSERT_EQ(store_->pin_held_bytes(), 6 * block_bytes);
  ASSERT_TRUE(store_->acquire(ns_, b.back()).has_value());
  ASSERT_EQ(run(std::vector<block_key>(b.begin(), b.end() - 1)).matched_blocks,
            5U);
  put_options pin;
  pin.pin = true;
  auto fresh = store_->reserve(
      ns_, chain_key_from_id(b[4], spec().fingerprint(), 777), b[4], pin);
  ASSERT_FALSE(fresh.has_value());
  EXPECT_EQ(fresh.error().code, errc::out_of_memory);
  auto h = store_->reserve(ns_, b.back(), b[4], pin);
  ASSERT_TRUE(h.has_value()) << h.error().describe();
  std::vector<std::byte> v(spec().value_bytes());
  ASSERT_TRUE(producer_.produce(spec(), b.back(), v).has_value());
  ASSERT_TRUE(store_->write(*h, v).has_value());
  auto committed = store_->commit(*h);
  ASSERT_FALSE(committed.has_value());
  EXPECT_EQ(committed.error().code, errc::out_of_memory);
  EXPECT_EQ(store_->pinned_bytes(), block_bytes);
  EXPECT_EQ(store_->pin_held_bytes(), 6 * block_bytes);
  // Pinned already (one block more held), it is refused the same.
  ASSERT_TRUE(store_->pin(ns_, b.back()).has_value());
  auto again = store_->reserve(ns_, b.back(), b[4], pin);
  ASSERT_TRUE(again.has_value()) << again.error().describe();
  ASSERT_TRUE(store_->write(*again, v).has_value());
  committed = store_->commit(*again);
  ASSERT_FALSE(committed.has_value());
  EXPECT_EQ(committed.error().code, errc::out_of_memory);
  EXPECT_EQ(store_->pin_held_bytes(), 7 * block_bytes);
  store_->check_invariants();
}

TEST_F(store_disk_test, damaged_bytes_on_disk_are_never_returned) {
  const auto a = chain(1, 3);
  run(a);
  ASSERT_TRUE(store_->persist().has_value());
  open();
  // Flip bytes all over every segment's payload area.
  for (const auto& e : fs::directory_iterator(dir_)) {
    if (e.path().extension() != ".kvs")
      continue;
    std::fstream f(e.path(), std::ios::in | std::ios::out | std::ios::binary);
    const auto size = static_cast<std::streamoff>(fs::file_size(e.path()));
    for (std::streamoff off = 200; off < size; off += 512) {
      f.seekg(off);
      char c = 0;
      f.read(&c, 1);
      c = static_cast<char>(c ^ 0x5a);
      f.seekp(off);
      f.write(&c, 1);
    }
  }
  run(a); // promotes what it can; a damaged record header fails at once
  // The first read of each finds the damage: an error, never wrong bytes.
  for (const auto& k : a) {
    auto lease = store_->acquire(ns_, k);
    if (!lease)
      continue; // dropped with a damaged ancestor
    std::vector<std::byte> out(block_bytes);
    EXPECT_EQ(store_->read(*lease, out).error().code, errc::checksum_mismatch);
  }
  EXPECT_GT(store_->stats().checksum_failures, 0U);
  EXPECT_EQ(store_->block_count(), 0U);
  // The next request recomputes everything, from nothing damaged.
  const auto r = run(a);
  EXPECT_EQ(r.matched_blocks, 0U);
  EXPECT_EQ(r.computed_blocks, 3U);
  for (const auto& k : a)
    expect_correct(k);
}

TEST_F(store_disk_test, hit_ratio_with_the_disk_tier_is_at_least_that_without) {
  std::mt19937_64 rng(3);
  std::vector<std::vector<block_key>> reqs;
  for (int i = 0; i < 400; ++i)
    reqs.push_back(chain(100 * (rng() % 40 + 1), 1 + rng() % 6));
  auto ratio = [&](bool with_disk) {
    open(16);
    if (!with_disk) {
      store_config cfg;
      cfg.capacity_bytes = 16 * block_bytes;
      cfg.slab_bytes = block_bytes;
      cfg.policy = policy_kind::lru;
      store_ = std::move(*block_store::create(cfg));
      ns_ = *store_->register_namespace(spec());
    }
    std::size_t hit = 0;
    std::size_t all = 0;
    for (const auto& r : reqs) {
      hit += run(r).matched_tokens;
      all += r.size() * 16;
    }
    return static_cast<double>(hit) / static_cast<double>(all);
  };
  const double without = ratio(false);
  // Start the disk tier empty.
  store_.reset();
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir_))
    fs::remove_all(e.path(), ec);
  const double with = ratio(true);
  EXPECT_GE(with, without);
  EXPECT_GT(with,
            without + 0.1); // 40 chains do not fit 16 blocks; disk holds them
}

} // namespace
} // namespace kvfleet::engine
