// block_store with a memory tier below it (block_store.hpp, "Memory
// tier"): background demotion, promotion on a hit, blocks read or pinned
// while copying, full tier, failures, expiry, events. The tier is
// testing::fake_memory_tier, whose copies happen only when the test
// finishes them, so the store's promise to keep a slot untouched until its
// copy is done is checked by the bytes that come back.
#include "engine/block_store.hpp"
#include "engine/checksum.hpp"
#include "engine/testing/fake_memory_tier.hpp"
#include "engine/testing/store_checks.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvfleet::engine {
namespace {

namespace_spec spec() {
  namespace_spec s;
  s.model = "tier-test";
  s.layers = 1;
  s.kv_heads = 1;
  s.head_dim = 64;
  s.block_tokens = 16; // 4 KiB per block
  return s;
}
constexpr std::size_t block_bytes = 4096;

/// A store of `cfg` over a fake memory tier of `tier_blocks` blocks, which
/// takes them all in one copy; `tier` points at it. Null when either
/// cannot be made (the test's ASSERT says so).
std::unique_ptr<block_store>
store_over_fake_tier(const store_config& cfg, std::size_t tier_blocks,
                     testing::fake_memory_tier*& tier) {
  auto made = block_store::create(cfg);
  if (!made)
    return nullptr;
  auto store = std::move(*made);
  const auto attached = store->attach_tier(
      [&](memory_backend& arena) -> result<std::unique_ptr<memory_tier>> {
        auto t = std::make_unique<testing::fake_memory_tier>(
            arena.host_data(), tier_blocks * block_bytes);
        t->max_batch = std::max(t->max_batch, tier_blocks * block_bytes);
        tier = t.get();
        return std::unique_ptr<memory_tier>(std::move(t));
      });
  if (!attached.value_or(false))
    return nullptr;
  return store;
}

class store_tier_test : public ::testing::Test {
protected:
  void SetUp() override { open(); }

  void open(std::size_t blocks = 32, std::size_t tier_blocks = 16,
            policy_kind policy = policy_kind::lru,
            std::size_t slab_blocks = 1) {
    store_.reset();
    store_config cfg;
    cfg.capacity_bytes = blocks * block_bytes;
    cfg.slab_bytes = slab_blocks * block_bytes;
    cfg.policy = policy;
    cfg.adaptive_compression = false;
    cfg.max_pinned_fraction = max_pinned_fraction_;
    cfg.clock = &clock_;
    cfg.on_block_event = [this](block_event e, const block_key& k) {
      (e == block_event::stored ? stored_ : removed_).push_back(k);
    };
    store_ = store_over_fake_tier(cfg, tier_blocks, tier_);
    ASSERT_TRUE(store_ && tier_);
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

  /// Puts a disk tier in a fresh temporary directory below the store (the
  /// directory goes at TearDown, after the store).
  /// `wall`: the disk tier's clock (default: the wall clock).
  void attach_disk(const clock_source* wall = nullptr) {
    char tmpl[] = "/tmp/kvfleet-store-tier-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    disk_dir_ = tmpl;
    disk_tier_config dc;
    dc.directory = disk_dir_;
    dc.capacity_bytes = std::uint64_t{16} << 20;
    dc.segment_bytes = std::uint64_t{1} << 20;
    dc.clock = wall;
    auto disk = disk_tier::open(dc);
    ASSERT_TRUE(disk.has_value()) << disk.error().describe();
    ASSERT_TRUE(store_->attach_disk(std::move(*disk)).has_value());
  }

  void TearDown() override {
    store_.reset(); // closes the disk tier before its directory goes
    if (!disk_dir_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(disk_dir_, ec);
    }
  }

  /// Finishes the tier's copies and lets the store collect them.
  void settle() {
    tier_->finish_demotions();
    store_->poll_tier();
    store_->check_invariants();
  }

  manual_clock clock_;
  synthetic_producer producer_;
  double max_pinned_fraction_ = store_config{}.max_pinned_fraction; ///< open's
  std::unique_ptr<block_store> store_;
  testing::fake_memory_tier* tier_ = nullptr; ///< owned by store_
  ns_id ns_;
  std::vector<block_key> stored_;
  std::vector<block_key> removed_;
  std::string disk_dir_;
};

// process() serves a prefix from memory and then from the tier; its block
// hits and misses follow what it served, as its token hits do.
TEST_F(store_tier_test, blocks_served_from_the_tier_count_as_block_hits) {
  const auto a = chain(1, 4);
  run(a);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 4U);
  const store_stats before = store_->stats();
  auto longer = a;
  longer.push_back(chain(1, 5)[4]);
  const auto r = run(longer);
  EXPECT_EQ(r.matched_blocks, 4U);
  const store_stats& after = store_->stats();
  EXPECT_EQ(after.block_hits - before.block_hits, 4U);
  EXPECT_EQ(after.block_misses - before.block_misses, 1U);
  EXPECT_EQ(after.token_hits - before.token_hits, 64U);
  store_->check_invariants();
}

// Slab compaction moves no block a copy still reads: the tier copies a
// demoted block's slot later (here when the test finishes it), so the block
// being demoted, alone in the sparsest slab, stays put while another
// slab is emptied for a block of another size. Had it moved, that size's
// blocks would overwrite its old slot before the copy and it would come
// back from the tier damaged.
TEST_F(store_tier_test, compaction_leaves_a_block_being_demoted_in_place) {
  open(64, 16, policy_kind::lru, 4); // 16 slabs of 4 blocks
  put_options expiring;
  expiring.ttl = std::chrono::seconds(1);
  std::vector<block_key> keys;
  for (std::uint64_t i = 0; i < 56; ++i) { // 14 slabs
    keys.push_back(chain(10 * (i + 1), 1)[0]);
    // Slab 0 keeps only its last block, the others every other one.
    const bool keep = i < 4 ? i == 3 : i % 2 == 1;
    auto h =
        store_->reserve(ns_, keys.back(), {}, keep ? put_options{} : expiring);
    ASSERT_TRUE(h.has_value());
    ASSERT_TRUE(store_->write_from(*h, producer_).has_value());
    ASSERT_TRUE(store_->commit(*h).has_value());
  }
  clock_.advance(std::chrono::seconds(2));
  ASSERT_EQ(store_->expire(), 29U);
  // The least recently used block, keys[3], starts its copy to the tier.
  ASSERT_EQ(*store_->demote_to_tier(block_bytes), block_bytes);
  namespace_spec wide = spec();
  wide.model = "tier-test-wide";
  wide.head_dim = 128; // 8 KiB blocks: two a slab
  const auto wide_ns = *store_->register_namespace(wide);
  for (std::uint64_t i = 0; i < 6; ++i) {
    auto h = store_->reserve(wide_ns, testing::chain_of(wide, i + 1, 1)[0], {});
    ASSERT_TRUE(h.has_value()) << h.error().describe();
    ASSERT_TRUE(store_->write_from(*h, producer_).has_value());
    ASSERT_TRUE(store_->commit(*h).has_value());
    store_->check_invariants();
  }
  EXPECT_EQ(store_->stats().evictions, 0U);
  EXPECT_EQ(store_->stats().moved_blocks, 2U);
  settle();
  ASSERT_EQ(store_->tier_block_count(), 1U);
  EXPECT_EQ(run({keys[3]}).tier_blocks, 1U);
  expect_correct(keys[3]);
}

TEST_F(store_tier_test, cold_blocks_move_to_the_tier_and_come_back_on_a_hit) {
  const auto a = chain(1, 4);
  run(a);
  const std::size_t used = store_->used_bytes();
  auto started = store_->demote_to_tier(used);
  ASSERT_TRUE(started.has_value());
  EXPECT_EQ(*started, used);
  EXPECT_EQ(store_->tier_bytes_in_flight(), used);
  // Still in memory and readable while the copies run.
  EXPECT_TRUE(store_->contains(ns_, a[3]));
  EXPECT_EQ(store_->used_bytes(), used);
  store_->check_invariants();

  settle();
  EXPECT_EQ(store_->tier_bytes_in_flight(), 0U);
  EXPECT_EQ(store_->used_bytes(), 0U);
  EXPECT_EQ(store_->tier_block_count(), 4U);
  EXPECT_EQ(store_->stats().tier_demotions, 4U);
  for (const auto& k : a) {
    EXPECT_FALSE(store_->contains(ns_, k));
    EXPECT_TRUE(store_->in_tier(ns_, k));
  }
  auto tiers = store_->lookup_tiers(ns_, a);
  ASSERT_TRUE(tiers.has_value());
  EXPECT_EQ(tiers->memory, 0U);
  EXPECT_EQ(tiers->tier, 4U);
  EXPECT_EQ(tiers->disk, 0U);
  EXPECT_TRUE(removed_.empty()) << "a demoted block is still this store's";
  EXPECT_EQ(store_->lookup(ns_, a).value_or(0), 4U) << "cached, in the tier";
  EXPECT_EQ(store_->tier_block_count(), 4U) << "a lookup moves nothing";

  // A longer request: the four come back from the tier, one is computed.
  auto longer = a;
  longer.push_back(chain(1, 5)[4]);
  const auto r = run(longer);
  EXPECT_EQ(r.tier_blocks, 4U);
  EXPECT_EQ(r.matched_blocks, 4U);
  EXPECT_EQ(r.computed_blocks, 1U);
  EXPECT_EQ(store_->stats().tier_block_hits, 4U);
  EXPECT_EQ(store_->stats().tier_token_hits, 64U);
  EXPECT_EQ(store_->tier_block_count(), 0U);
  EXPECT_EQ(tier_->used_bytes(), 0U);
  for (const auto& k : longer)
    expect_correct(k);
}

// acquire_prefix() leases the prefix lookup() counts: memory, then the
// memory tier, whose blocks come back. Before, it stopped where memory did:
// 0 blocks here, while lookup() said 4.
TEST_F(store_tier_test,
       acquire_prefix_brings_the_tier_part_back_and_leases_it) {
  const auto a = chain(1, 4);
  run(a);
  // The last two go to the tier (leaf first); the first two stay.
  auto started = store_->demote_to_tier(2 * store_->used_bytes() / 4);
  ASSERT_TRUE(started.has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 2U);
  ASSERT_EQ(store_->lookup(ns_, a).value_or(0), 4U);
  std::vector<read_lease> leases;
  auto n = store_->acquire_prefix(ns_, a, leases);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  EXPECT_EQ(*n, 4U);
  ASSERT_EQ(leases.size(), 4U);
  EXPECT_EQ(store_->tier_block_count(), 0U);
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(leases[i].key(), a[i]);
    std::vector<std::byte> out(spec().value_bytes());
    EXPECT_TRUE(store_->read(leases[i], out).has_value());
  }
  // Leased: none of them can go to the tier again while held.
  EXPECT_EQ(store_->demote_to_tier(store_->used_bytes()).value_or(1), 0U);
  leases.clear();
  store_->check_invariants();
}

// A tier block that cannot be brought back (no room: memory full of
// pinned blocks) ends the prefix there, and the call, which succeeds, counts
// no rejected request for it.
TEST_F(store_tier_test, acquire_prefix_stops_at_a_tier_block_with_no_room) {
  max_pinned_fraction_ = 1.0; // pins fill memory here
  open(8, 16);
  const auto a = chain(1, 4);
  run(a);
  ASSERT_TRUE(store_->demote_to_tier(2 * store_->used_bytes() / 4));
  settle();
  ASSERT_EQ(store_->tier_block_count(), 2U);
  for (std::uint64_t i = 0; i < 5; ++i) {
    put_options pin;
    pin.pin = true;
    auto h = store_->reserve(ns_, chain(1000 + i * 10, 1)[0], {}, pin);
    ASSERT_TRUE(h.has_value()) << h.error().describe();
    ASSERT_TRUE(store_->write_from(*h, producer_).has_value());
    ASSERT_TRUE(store_->commit(*h).has_value());
  }
  const auto rejected = store_->stats().rejected_requests;
  std::vector<read_lease> leases;
  auto n = store_->acquire_prefix(ns_, a, leases);
  ASSERT_TRUE(n.has_value()) << n.error().describe();
  EXPECT_LT(*n, 4U);
  EXPECT_GE(*n, 2U);
  EXPECT_EQ(store_->stats().rejected_requests, rejected);
  leases.clear();
  store_->check_invariants();
}

TEST_F(store_tier_test, a_leaf_goes_first_and_a_parent_only_with_all_children) {
  // a0 <- a1 <- {a2, b2}: a batch of three can take a2, then not a1 (b2
  // still hangs from it), then b2's... only what the budget allows.
  const auto a = chain(1, 3);
  run(a);
  std::vector<block_key> b = {
      a[0], a[1], chain_key_from_id(a[1], spec().fingerprint(), 99)};
  run(b);
  auto started = store_->demote_to_tier(block_bytes); // one block
  ASSERT_TRUE(started.has_value());
  EXPECT_EQ(*started, block_bytes);
  settle();
  EXPECT_EQ(store_->tier_block_count(), 1U);
  EXPECT_TRUE(store_->contains(ns_, a[1])) << "a1 still has a child";
  // Everything now: b2 goes, and a1 and a0 follow it in the same batch.
  started = store_->demote_to_tier(store_->used_bytes());
  ASSERT_TRUE(started.has_value());
  settle();
  EXPECT_EQ(store_->tier_block_count(), 4U);
  EXPECT_EQ(store_->used_bytes(), 0U);
  EXPECT_EQ(tier_->demote_calls, 2);
  const auto r = run(b);
  EXPECT_EQ(r.tier_blocks, 3U);
  for (const auto& k : b)
    expect_correct(k);
}

TEST_F(store_tier_test, a_block_read_or_pinned_while_copying_stays_in_memory) {
  const auto a = chain(1, 2);
  const auto c = chain(50, 1);
  run(a);
  run(c);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  // Read a's leaf (an access) and pin c while their bytes are copied.
  {
    auto lease = store_->acquire(ns_, a[1]);
    ASSERT_TRUE(lease.has_value());
  }
  ASSERT_TRUE(store_->pin(ns_, c[0]).has_value());
  settle();
  EXPECT_TRUE(store_->contains(ns_, a[1]));
  EXPECT_TRUE(store_->contains(ns_, a[0])) << "its child stayed, so it stays";
  EXPECT_TRUE(store_->contains(ns_, c[0]));
  EXPECT_EQ(store_->tier_block_count(), 0U);
  EXPECT_EQ(store_->stats().tier_demotions_kept, 3U);
  EXPECT_EQ(tier_->used_bytes(), 0U) << "kept blocks' places are released";
  // A pinned block is never picked.
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  EXPECT_TRUE(store_->contains(ns_, c[0]));
  EXPECT_FALSE(store_->contains(ns_, a[0]));
  for (const auto& k : a)
    EXPECT_TRUE(store_->in_tier(ns_, k));
}

TEST_F(store_tier_test, a_full_tier_drops_its_oldest_blocks_and_says_so) {
  open(32, 4); // the tier holds four blocks
  const auto a = chain(1, 4);
  const auto b = chain(100, 4);
  run(a);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  EXPECT_EQ(store_->tier_block_count(), 4U);
  run(b);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  EXPECT_EQ(store_->tier_block_count(), 4U);
  EXPECT_EQ(store_->stats().tier_drops, 4U);
  for (const auto& k : a)
    EXPECT_FALSE(store_->in_tier(ns_, k));
  for (const auto& k : b)
    EXPECT_TRUE(store_->in_tier(ns_, k));
  EXPECT_EQ(removed_.size(), 4U) << "dropped blocks leave the store";
  EXPECT_EQ(run(a).computed_blocks, 4U);
}

TEST_F(store_tier_test, a_busy_full_tier_keeps_its_blocks) {
  // The tier is full and its staging busy: the batch cannot go now, so
  // nothing is dropped for it. Before, the oldest tier blocks were dropped
  // (evicted, or spilled to disk) ahead of the refusal.
  open(32, 4);
  const auto a = chain(1, 4);
  run(a);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 4U);
  const auto b = chain(100, 4);
  run(b);
  removed_.clear();
  tier_->fail_next = errc::busy;
  auto started = store_->demote_to_tier(store_->used_bytes());
  ASSERT_TRUE(started.has_value());
  EXPECT_EQ(*started, 0U);
  EXPECT_EQ(store_->stats().tier_drops, 0U);
  EXPECT_TRUE(removed_.empty());
  for (const auto& k : a)
    EXPECT_TRUE(store_->in_tier(ns_, k));
  store_->check_invariants();
  // Not busy: the same call drops the oldest to make room, as before.
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  EXPECT_EQ(store_->stats().tier_drops, 4U);
  for (const auto& k : b)
    EXPECT_TRUE(store_->in_tier(ns_, k));
}

TEST_F(store_tier_test, a_tier_full_of_copies_in_flight_is_no_failure) {
  // The tier's room is all taken by copies still in flight: nothing can be
  // dropped to make more, so the demotion stops early, without an error,
  // and counts no failure. (Before, it counted one in tier_failures, the
  // copies that failed.)
  open(8, 2);
  for (std::uint64_t i = 1; i <= 4; ++i)
    run(chain(1000 * i, 1));
  tier_->max_batch = block_bytes;
  auto started = store_->demote_to_tier(4 * block_bytes);
  ASSERT_TRUE(started.has_value());
  EXPECT_EQ(*started, 2 * block_bytes);
  EXPECT_EQ(store_->stats().tier_failures, 0U);
  settle();
  EXPECT_EQ(store_->tier_block_count(), 2U);
  for (std::uint64_t i = 1; i <= 4; ++i)
    expect_correct(chain(1000 * i, 1)[0]);
  EXPECT_EQ(store_->stats().tier_failures, 0U);
}

TEST_F(store_tier_test, blocks_dropped_from_the_tier_spill_to_disk) {
  open(32, 4);
  attach_disk();
  {
    const auto a = chain(1, 4);
    run(a);
    ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
    settle();
    run(chain(100, 4));
    ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
    settle();
    EXPECT_EQ(store_->stats().tier_drops, 4U);
    EXPECT_EQ(store_->stats().spills, 4U);
    ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
    auto tiers = store_->lookup_tiers(ns_, a);
    ASSERT_TRUE(tiers.has_value());
    EXPECT_EQ(tiers->disk, 4U);
    const auto r = run(a);
    EXPECT_EQ(r.disk_blocks, 4U);
    for (const auto& k : a)
      expect_correct(k);
  }
}

TEST_F(store_tier_test, a_block_reaches_disk_through_the_tier_with_its_uses) {
  // A block used 20 times goes memory -> tier -> disk: its disk copy
  // carries the store's access count, as a spill from memory does, and a
  // block whose copy is on disk already has that copy marked used. (Before,
  // the copy started at 0 accesses, and a skipped spill left it as read
  // back long ago.)
  attach_disk();
  const auto a = chain(1, 1);
  const auto b = chain(50, 1);
  run(a);
  run(b);
  // b has a disk copy already: spilled, then read back into memory.
  ASSERT_TRUE(store_->pin(ns_, b[0]).has_value());
  ASSERT_TRUE(store_->unpin(ns_, b[0]).has_value());
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
  const auto b_before = store_->disk()->lookup(b[0]);
  ASSERT_TRUE(b_before.has_value());
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(store_->acquire(ns_, a[0]).has_value());
    ASSERT_TRUE(store_->acquire(ns_, b[0]).has_value());
  }
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_TRUE(store_->in_tier(ns_, a[0]));
  ASSERT_TRUE(store_->in_tier(ns_, b[0]));
  const auto skipped = store_->stats().spills_skipped;
  auto written = store_->persist(std::chrono::seconds(30));
  ASSERT_TRUE(written.has_value()) << written.error().describe();
  EXPECT_EQ(store_->stats().spills_skipped, skipped + 1) << "b's copy stays";
  const auto info_a = store_->disk()->lookup(a[0]);
  ASSERT_TRUE(info_a.has_value());
  EXPECT_GE(info_a->access_count, 21U);
  const auto info_b = store_->disk()->lookup(b[0]);
  ASSERT_TRUE(info_b.has_value());
  EXPECT_GE(info_b->access_count, 21U);
  EXPECT_GT(info_b->access_count, b_before->access_count);
}

TEST_F(store_tier_test, a_tier_block_whose_parent_went_to_disk_is_served) {
  // The leaf went to the tier, its parent then to disk: a request finds
  // the parent on disk and the leaf in the tier, and acquire() and pin()
  // of the leaf bring both back. (Before, the walk went memory, tier,
  // disk and never back to the tier: the leaf was computed again, and
  // acquire() answered not_found for bytes the tier held.)
  attach_disk();
  const auto a = chain(1, 2);
  run(a);
  ASSERT_TRUE(store_->demote_to_tier(block_bytes).has_value()); // the leaf
  settle();
  ASSERT_TRUE(store_->in_tier(ns_, a[1]));
  store_->evict_bytes(store_->used_bytes()); // the parent, to disk
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
  store_->poll_disk();
  ASSERT_FALSE(store_->contains(ns_, a[0]));
  ASSERT_TRUE(store_->on_disk(ns_, a[0]));
  {
    auto lease = store_->acquire(ns_, a[1]);
    ASSERT_TRUE(lease.has_value()) << lease.error().describe();
  }
  expect_correct(a[1]);
  // Both out again, the same way; then a request.
  ASSERT_TRUE(store_->demote_to_tier(block_bytes).has_value());
  settle();
  ASSERT_TRUE(store_->in_tier(ns_, a[1]));
  store_->evict_bytes(store_->used_bytes());
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
  store_->poll_disk();
  ASSERT_FALSE(store_->contains(ns_, a[0]));
  const auto found = store_->lookup_tiers(ns_, a);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->memory, 0U);
  EXPECT_EQ(found->disk, 1U);
  EXPECT_EQ(found->tier, 1U);
  const auto r = run(a);
  EXPECT_EQ(r.matched_blocks, 2U);
  EXPECT_EQ(r.computed_blocks, 0U);
  EXPECT_EQ(r.disk_blocks, 1U);
  EXPECT_EQ(r.tier_blocks, 1U);
  expect_correct(a[0]);
  expect_correct(a[1]);
  store_->check_invariants();
}

TEST_F(store_tier_test, a_clean_shutdown_writes_the_tiers_blocks_to_disk) {
  attach_disk();
  {
    const auto a = chain(1, 3);
    run(a);
    ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
    settle();
    for (const auto& k : a) {
      ASSERT_TRUE(store_->in_tier(ns_, k));
      ASSERT_FALSE(store_->disk()->lookup(k).has_value());
    }
    auto written = store_->persist(std::chrono::seconds(30));
    ASSERT_TRUE(written.has_value()) << written.error().describe();
    EXPECT_EQ(*written, 3U);
    for (const auto& k : a)
      EXPECT_TRUE(store_->disk()->lookup(k).has_value()) << k.to_hex();
  }
}

TEST_F(store_tier_test,
       a_tier_block_is_not_kept_off_disk_by_a_copy_that_expired) {
  static manual_clock wall{std::chrono::hours(24 * 365 * 50)};
  attach_disk(&wall);
  const auto a = chain(1, 1);
  put_options o;
  o.ttl = std::chrono::minutes(10);
  ASSERT_TRUE(store_->process(ns_, a, 16, producer_, o).has_value());
  // A pin writes it through to disk, with its expiry.
  ASSERT_TRUE(store_->pin(ns_, a[0]).has_value());
  ASSERT_TRUE(store_->unpin(ns_, a[0]).has_value());
  ASSERT_TRUE(store_->disk()->wait_idle());
  ASSERT_TRUE(store_->disk()->contains(a[0]));
  // Both copies expire (nothing has run the disk tier's expire() yet); the
  // block is computed again, for ten more minutes, and goes to the tier.
  clock_.advance(std::chrono::minutes(11));
  wall.advance(std::chrono::minutes(11));
  ASSERT_TRUE(store_->process(ns_, a, 16, producer_, o).has_value());
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_TRUE(store_->in_tier(ns_, a[0]));
  auto written = store_->persist(std::chrono::seconds(30));
  ASSERT_TRUE(written.has_value()) << written.error().describe();
  const auto info = store_->disk()->lookup(a[0]);
  ASSERT_TRUE(info.has_value());
  EXPECT_GT(info->expires_at, wall.now()) << "persisted as an expired copy";
}

TEST_F(store_tier_test, a_busy_or_failing_tier_loses_nothing) {
  const auto a = chain(1, 3);
  run(a);
  tier_->fail_next = errc::busy;
  auto started = store_->demote_to_tier(store_->used_bytes());
  ASSERT_TRUE(started.has_value());
  EXPECT_EQ(*started, 0U);
  EXPECT_EQ(store_->stats().tier_failures, 0U) << "busy is not a failure";
  store_->check_invariants();
  // A copy that fails after it started: the blocks stay in memory.
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  tier_->fail_oldest_demotion();
  store_->poll_tier();
  store_->check_invariants();
  EXPECT_EQ(store_->stats().tier_failures, 1U);
  EXPECT_EQ(store_->tier_block_count(), 0U);
  EXPECT_EQ(tier_->used_bytes(), 0U);
  for (const auto& k : a)
    expect_correct(k);
  EXPECT_EQ(store_->demote_to_tier(0).value_or(1), 0U);
}

TEST_F(store_tier_test, expired_blocks_in_the_tier_are_never_promoted) {
  const auto a = chain(1, 2);
  put_options o;
  o.ttl = std::chrono::seconds(10);
  ASSERT_TRUE(store_->process(ns_, a, 32, producer_, o).has_value());
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 2U);
  clock_.advance(std::chrono::seconds(11));
  EXPECT_FALSE(store_->in_tier(ns_, a[0]));
  EXPECT_EQ(store_->expire(), 2U);
  EXPECT_EQ(store_->tier_block_count(), 0U);
  EXPECT_EQ(tier_->used_bytes(), 0U);
  EXPECT_EQ(run(a).computed_blocks, 2U);
}

TEST_F(store_tier_test, a_ttl_carries_through_the_tier) {
  const auto a = chain(1, 1);
  put_options o;
  o.ttl = std::chrono::seconds(10);
  ASSERT_TRUE(store_->process(ns_, a, 16, producer_, o).has_value());
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  clock_.advance(std::chrono::seconds(4));
  EXPECT_EQ(run(a).tier_blocks, 1U);
  clock_.advance(std::chrono::seconds(7)); // 11 s after the put
  EXPECT_FALSE(store_->contains(ns_, a[0]));
}

// A block with no expiry comes back from the tier with none: a request's
// TTL is for what it computes, not for what it brings back. (Before, the
// promotion took the request's TTL, or the namespace's.)
TEST_F(store_tier_test, a_block_without_a_ttl_comes_back_without_one) {
  const auto a = chain(1, 1);
  ASSERT_TRUE(store_->process(ns_, a, 16, producer_).has_value());
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  put_options o;
  o.ttl = std::chrono::seconds(5);
  const auto r = store_->process(ns_, a, 16, producer_, o);
  ASSERT_TRUE(r.has_value()) << r.error().describe();
  ASSERT_EQ(r->tier_blocks, 1U);
  clock_.advance(std::chrono::seconds(10));
  EXPECT_TRUE(store_->contains(ns_, a[0]));
}

TEST_F(store_tier_test, a_fresh_put_replaces_the_tier_copy) {
  const auto a = chain(1, 1);
  run(a);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_TRUE(store_->in_tier(ns_, a[0]));
  std::vector<std::byte> v(block_bytes);
  ASSERT_TRUE(producer_.produce(spec(), a[0], v).has_value());
  auto h = store_->reserve(ns_, a[0], block_key{});
  ASSERT_TRUE(h.has_value());
  ASSERT_TRUE(store_->write(*h, v).has_value());
  ASSERT_TRUE(store_->commit(*h).has_value());
  EXPECT_FALSE(store_->in_tier(ns_, a[0]));
  EXPECT_EQ(tier_->used_bytes(), 0U);
  store_->check_invariants();
}

// lookup() counts a prefix in the tier as cached, so a host that extends
// the prefix it found puts a child whose parent is in the tier: the
// parent comes back with its chain, as for a get or a pin.
TEST_F(store_tier_test, a_put_whose_parent_is_in_the_tier_brings_it_back) {
  const auto a = chain(1, 4);
  run(std::vector<block_key>(a.begin(), a.begin() + 3));
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 3U);
  ASSERT_EQ(*store_->lookup(ns_, a), 3U);
  std::vector<std::byte> v(block_bytes);
  ASSERT_TRUE(producer_.produce(spec(), a[3], v).has_value());
  auto h = store_->reserve(ns_, a[3], a[2]);
  ASSERT_TRUE(h.has_value()) << h.error().describe();
  ASSERT_TRUE(store_->write(*h, v).has_value());
  ASSERT_TRUE(store_->commit(*h).has_value());
  EXPECT_EQ(store_->tier_block_count(), 0U);
  for (const auto& k : a)
    expect_correct(k);
  // A parent in neither place is still not found.
  const auto other = chain(500, 2);
  EXPECT_EQ(store_->reserve(ns_, other[1], other[0]).error().code,
            errc::not_found);
  store_->check_invariants();
}

// A block cannot be its own parent. Before, a put naming its own key as
// parent, for a block in the tier, brought the key back with the
// "parent's" chain and then indexed a second entry under the same key
// (check_invariants aborted: "index does not point at its entry").
TEST_F(store_tier_test, a_put_naming_itself_as_parent_is_refused) {
  const auto a = chain(1, 2);
  run(a);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_FALSE(store_->contains(ns_, a[1]));
  auto h = store_->reserve(ns_, a[1], a[1]);
  ASSERT_FALSE(h.has_value());
  EXPECT_EQ(h.error().code, errc::invalid_argument);
  store_->check_invariants();
  EXPECT_EQ(store_->tier_block_count(), 2U) << "nothing is brought back";
}

// A put naming as parent a block whose chain in the tier holds the put's
// own key: bringing the parent back brings the key back too, and the put
// is a duplicate of it. Before, it indexed a second entry under the key.
TEST_F(store_tier_test,
       a_put_whose_parents_chain_holds_its_key_is_a_duplicate) {
  const auto a = chain(1, 3);
  run(a);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 3U);
  auto h = store_->reserve(ns_, a[0], a[2]); // a[2] chains from a[0]
  ASSERT_TRUE(h.has_value()) << h.error().describe();
  EXPECT_TRUE(h->already_cached());
  store_->check_invariants();
  std::vector<std::byte> v(block_bytes);
  ASSERT_TRUE(producer_.produce(spec(), a[0], v).has_value());
  ASSERT_TRUE(store_->write(*h, v).has_value());
  ASSERT_TRUE(store_->commit(*h).has_value());
  store_->check_invariants();
  for (const auto& k : a)
    expect_correct(k);
  store_->evict_bytes(std::size_t{1} << 30);
  store_->check_invariants();
  EXPECT_EQ(store_->block_count(), 0U);
}

// A block brought back from disk alone stays unlinked through a trip to
// the tier and back, so the first request naming its parent links it and
// the chain is evicted leaf-first. Before, it came back from the tier as
// an ordinary root: nothing linked it, and its parent was evicted before
// its pinned child (lookup found nothing while memory held the rest).
TEST_F(store_tier_test, parent_unknown_survives_the_memory_tier) {
  attach_disk();
  const auto a = chain(1, 3);
  run(a);
  store_->evict_bytes(std::size_t{1} << 30);
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
  ASSERT_EQ(store_->block_count(), 0U);
  ASSERT_TRUE(store_->acquire(ns_, a[1]).has_value()); // back alone
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 1U);
  ASSERT_TRUE(store_->acquire(ns_, a[1]).has_value()); // back from the tier
  store_->check_invariants();
  const auto r = run(a); // names a[1]'s parent a[0]
  EXPECT_EQ(r.matched_blocks, 3U);
  store_->check_invariants();
  ASSERT_TRUE(store_->pin(ns_, a[2]).has_value());
  store_->evict_bytes(std::size_t{1} << 30);
  store_->check_invariants();
  EXPECT_TRUE(store_->contains(ns_, a[1]));
  EXPECT_TRUE(store_->contains(ns_, a[0])) << "parent evicted before its child";
  EXPECT_EQ(*store_->lookup(ns_, a), 3U);
}

// A block keeps the size partition it was put in when it comes back from
// the tier, whichever call brings it: a long document's blocks brought
// back by a get must not count against the short prompts' share.
TEST_F(store_tier_test, a_block_comes_back_from_the_tier_in_its_partition) {
  const auto a = chain(1, 3);
  put_options long_request;
  long_request.request_tokens = 5000; // the long partition (>= 4096)
  ASSERT_TRUE(store_->process(ns_, a, a.size() * 16, producer_, long_request)
                  .has_value());
  constexpr auto large = static_cast<std::size_t>(size_partition::large);
  constexpr auto small = static_cast<std::size_t>(size_partition::small);
  ASSERT_EQ(store_->stats().blocks_by_partition[large], 3U);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 3U);
  expect_correct(a[2]); // a get brings the chain back
  EXPECT_EQ(store_->stats().blocks_by_partition[large], 3U);
  EXPECT_EQ(store_->stats().blocks_by_partition[small], 0U);
  // And a short request's process() does not move them either.
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 3U);
  run(a);
  EXPECT_EQ(store_->stats().blocks_by_partition[large], 3U);
  EXPECT_EQ(store_->stats().blocks_by_partition[small], 0U);
  store_->check_invariants();
}

// A block the full tier drops to disk keeps its partition there too: read
// back alone from disk, a long document's block lands in the long
// partition (before, the disk kept none and it landed in the short one).
TEST_F(store_tier_test, a_block_dropped_to_disk_comes_back_in_its_partition) {
  open(32, 4);
  attach_disk();
  const auto a = chain(1, 4);
  put_options long_request;
  long_request.request_tokens = 5000; // the long partition (>= 4096)
  ASSERT_TRUE(store_->process(ns_, a, a.size() * 16, producer_, long_request)
                  .has_value());
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  run(chain(100, 4));
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->stats().tier_drops, 4U);
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
  ASSERT_EQ(store_->block_count(), 0U);
  ASSERT_TRUE(store_->acquire(ns_, a[0]).has_value());
  constexpr auto large = static_cast<std::size_t>(size_partition::large);
  constexpr auto small = static_cast<std::size_t>(size_partition::small);
  EXPECT_EQ(store_->stats().blocks_by_partition[large], 1U);
  EXPECT_EQ(store_->stats().blocks_by_partition[small], 0U);
  store_->check_invariants();
}

// ... and its priority (disk format version 3): a critical block the full
// tier drops to disk comes back critical when read back alone, and stays
// while normal blocks take memory, then leave it for the tier. Before, the
// disk kept none and it came back at normal, the oldest normal block.
TEST_F(store_tier_test, a_block_dropped_to_disk_comes_back_at_its_priority) {
  open(32, 4, policy_kind::priority);
  attach_disk();
  const auto a = chain(1, 1);
  put_options critical;
  critical.prio = priority::critical;
  ASSERT_TRUE(store_->process(ns_, a, 16, producer_, critical).has_value());
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  run(chain(100, 4)); // 4 more: the tier of 4 drops `a`, its oldest
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->stats().tier_drops, 1U);
  ASSERT_TRUE(store_->disk()->wait_idle(std::chrono::seconds(30)));
  ASSERT_EQ(store_->block_count(), 0U);
  ASSERT_FALSE(store_->in_tier(ns_, a[0]));
  ASSERT_TRUE(store_->acquire(ns_, a[0]).has_value());
  for (std::uint64_t i = 0; i < 3; ++i)
    run(chain(200 + i, 1));
  // One block to the tier: the lowest priority's least recent goes.
  ASSERT_TRUE(store_->demote_to_tier(block_bytes).has_value());
  settle();
  EXPECT_TRUE(store_->contains(ns_, a[0]))
      << "the critical block came back from disk below the normal blocks";
  store_->check_invariants();
}

TEST_F(store_tier_test,
       a_block_back_from_the_tier_takes_the_requests_priority) {
  open(32, 16, policy_kind::priority);
  // Put by a prefetch (background), moved to the tier, then hit by a high
  // priority request: it ranks high now, as a hit in memory would.
  const auto prefetched = chain(1, 1);
  put_options background;
  background.prio = priority::background;
  ASSERT_TRUE(
      store_->process(ns_, prefetched, 16, producer_, background).has_value());
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_TRUE(store_->in_tier(ns_, prefetched[0]));
  const auto normal = chain(100, 1);
  run(normal);
  put_options high;
  high.prio = priority::high;
  const auto r = store_->process(ns_, prefetched, 16, producer_, high);
  ASSERT_TRUE(r.has_value());
  ASSERT_EQ(r->tier_blocks, 1U);
  // The lowest priority goes to the tier first: the normal block.
  ASSERT_TRUE(store_->demote_to_tier(block_bytes).has_value());
  settle();
  EXPECT_TRUE(store_->in_tier(ns_, normal[0]));
  EXPECT_TRUE(store_->contains(ns_, prefetched[0]));
}

TEST_F(store_tier_test,
       demotion_takes_the_lowest_priority_first_in_every_policy) {
  // The GPU memory manager demotes with demote_to_tier(); a prefetch's
  // blocks must leave before a normal request's also when the policy ranks
  // by recency (it used to follow the policy alone: under lru the oldest
  // normal block went first).
  for (policy_kind policy :
       {policy_kind::lru, policy_kind::lfu, policy_kind::adaptive}) {
    SCOPED_TRACE(to_string(policy));
    open(32, 16, policy);
    const auto old_normal = chain(1, 1);
    run(old_normal);
    put_options background;
    background.prio = priority::background;
    const auto prefetched = chain(100, 1);
    ASSERT_TRUE(store_->process(ns_, prefetched, 16, producer_, background)
                    .has_value());
    const auto new_normal = chain(200, 1);
    run(new_normal);
    ASSERT_TRUE(store_->demote_to_tier(block_bytes).has_value());
    settle();
    EXPECT_TRUE(store_->in_tier(ns_, prefetched[0]));
    EXPECT_TRUE(store_->contains(ns_, old_normal[0]));
    EXPECT_TRUE(store_->contains(ns_, new_normal[0]));
    // Then the normal ones, in the policy's order: every block is shown
    // to the policies again.
    ASSERT_TRUE(store_->demote_to_tier(2 * block_bytes).has_value());
    settle();
    EXPECT_TRUE(store_->in_tier(ns_, old_normal[0]));
    EXPECT_TRUE(store_->in_tier(ns_, new_normal[0]));
    EXPECT_EQ(store_->block_count(), 0U);
  }
}

TEST_F(store_tier_test, a_block_back_from_the_tier_keeps_its_access_count) {
  // LFU: H read 20 times, C 3 times; both go to the tier and come back,
  // and C is read twice more. H has had more accesses: one block of room
  // takes C. (Before, a block came back at one access, and H went.)
  open(32, 16, policy_kind::lfu);
  const auto h = chain(1, 1);
  const auto c = chain(2, 1);
  run(h);
  run(c);
  const auto read = [&](const block_key& k, int times) {
    for (int i = 0; i < times; ++i)
      ASSERT_TRUE(store_->acquire(ns_, k).has_value());
  };
  read(h[0], 20);
  read(c[0], 3);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->block_count(), 0U);
  read(c[0], 1); // back
  read(h[0], 1); // back
  read(c[0], 2);
  store_->evict_bytes(block_bytes);
  EXPECT_TRUE(store_->contains(ns_, h[0]));
  EXPECT_FALSE(store_->contains(ns_, c[0]));
}

TEST_F(store_tier_test, promote_brings_tier_blocks_back_for_block_calls) {
  const auto a = chain(1, 3);
  run(a);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  auto n = store_->promote(ns_, a);
  ASSERT_TRUE(n.has_value());
  EXPECT_EQ(*n, 3U);
  for (const auto& k : a)
    expect_correct(k);
  EXPECT_EQ(tier_->promote_calls, 1) << "one copy batch for the chain";
  store_->check_invariants();
}

TEST_F(store_tier_test,
       a_get_or_a_pin_brings_a_tier_block_back_with_its_chain) {
  const auto a = chain(1, 4);
  run(a);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 4U);
  // a2's chain: a0 and a1 come back with it (a lease needs its prefix).
  expect_correct(a[2]);
  EXPECT_TRUE(store_->contains(ns_, a[0]));
  EXPECT_TRUE(store_->contains(ns_, a[1]));
  EXPECT_TRUE(store_->in_tier(ns_, a[3]));
  EXPECT_EQ(store_->stats().tier_block_hits, 3U);
  // a3's parent is in memory now: only a3 moves, and a pin keeps it there.
  ASSERT_TRUE(store_->pin(ns_, a[3]).has_value());
  EXPECT_EQ(store_->tier_block_count(), 0U);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  EXPECT_TRUE(store_->contains(ns_, a[3])) << "pinned blocks stay";
  expect_correct(a[3]);
  // A key in neither place is still not found.
  const auto other = chain(500, 1);
  EXPECT_EQ(store_->acquire(ns_, other[0]).error().code, errc::not_found);
  EXPECT_EQ(store_->pin(ns_, other[0]).error().code, errc::not_found);
}

TEST_F(store_tier_test, batches_respect_the_tiers_staging_limit) {
  tier_->max_batch = 2 * block_bytes;
  const auto a = chain(1, 5);
  run(a);
  auto started = store_->demote_to_tier(store_->used_bytes());
  ASSERT_TRUE(started.has_value());
  EXPECT_EQ(*started, 5 * block_bytes);
  EXPECT_EQ(tier_->demote_calls, 3);
  settle();
  EXPECT_EQ(store_->tier_block_count(), 5U);
  EXPECT_EQ(run(a).tier_blocks, 5U);
  EXPECT_EQ(tier_->promote_calls, 3);
  for (const auto& k : a)
    expect_correct(k);
}

TEST_F(store_tier_test, a_block_larger_than_a_batch_is_counted_and_logged) {
  // A tier whose batch limit is below one block takes none: the demotion
  // moves nothing, and says why (before, nothing was counted or logged).
  tier_->max_batch = block_bytes / 2;
  run(chain(1, 2));
  ::testing::internal::CaptureStderr();
  for (int i = 0; i < 2; ++i) {
    auto started = store_->demote_to_tier(store_->used_bytes());
    ASSERT_TRUE(started.has_value());
    EXPECT_EQ(*started, 0U);
  }
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(store_->stats().tier_too_large, 2U);
  EXPECT_EQ(tier_->demote_calls, 0);
  EXPECT_NE(log.find("a block of 4096 bytes is larger than the memory tier "
                     "takes in one copy (2048 bytes)"),
            std::string::npos)
      << log;
  EXPECT_EQ(log.find("kvfleet:"), log.rfind("kvfleet:")) << "logged once";
  store_->check_invariants();
}

TEST(store_tier, puts_demote_past_the_blocks_being_copied_to_the_tier) {
  // 256 of the coldest blocks are on their way to the tier (leased) when
  // 400 puts come. The demotion scan passes over them and compresses the
  // cold blocks behind them. Before, each passed block used up one of the
  // scan's 256: no demotion at all, and 390 blocks evicted.
  manual_clock clock;
  store_config cfg;
  cfg.capacity_bytes = 2000 * block_bytes;
  cfg.slab_bytes = 16 * block_bytes;
  cfg.policy = policy_kind::lru;
  cfg.clock = &clock;
  testing::fake_memory_tier* tier = nullptr;
  auto store = store_over_fake_tier(cfg, 4096, tier);
  ASSERT_TRUE(store && tier);
  const auto ns = *store->register_namespace(spec());
  synthetic_producer producer;
  std::uint64_t next = 1;
  const auto put_one = [&] {
    const auto keys = testing::chain_of(spec(), next++, 1);
    ASSERT_TRUE(store->process(ns, keys, 16, producer).has_value());
  };
  for (int i = 0; i < 1790; ++i) // just under the high watermark
    put_one();
  ASSERT_EQ(store->demote_to_tier(256 * block_bytes).value_or(0),
            256 * block_bytes);
  for (int i = 0; i < 400; ++i)
    put_one();
  store->check_invariants();
  EXPECT_EQ(store->stats().evictions, 0U);
  EXPECT_GE(store->stats().demotions, 400U);
  tier->finish_demotions();
  store->poll_tier();
  store->check_invariants();
}

// A put that finds no room collects the demotions whose copies are done
// before it evicts anything. Before, their slots stayed taken until a
// process() or promote() polled: with every slot on its way to the tier,
// the put failed ("nothing was evicted"), and with room above the high
// watermark only, it evicted blocks while finished copies held slots.
TEST(store_tier, a_put_collects_finished_demotions_before_evicting) {
  struct case_t {
    double high;        // and low watermark
    std::size_t filled; // blocks put first
    std::size_t demoted;
  };
  for (const case_t c : {case_t{1.0, 8, 8}, case_t{0.9, 7, 4}}) {
    SCOPED_TRACE(c.high);
    manual_clock clock;
    store_config cfg;
    cfg.capacity_bytes = 8 * block_bytes;
    cfg.slab_bytes = block_bytes;
    cfg.high_watermark = c.high;
    cfg.low_watermark = c.high;
    cfg.adaptive_compression = false;
    cfg.policy = policy_kind::lru;
    cfg.clock = &clock;
    testing::fake_memory_tier* tier = nullptr;
    auto store = store_over_fake_tier(cfg, 16, tier);
    ASSERT_TRUE(store && tier);
    const auto ns = *store->register_namespace(spec());
    synthetic_producer producer;
    const auto keys = testing::chain_of(spec(), 1, 9);
    for (std::size_t i = 0; i < c.filled; ++i)
      ASSERT_TRUE(
          store->process(ns, std::span(keys).subspan(i, 1), 16, producer)
              .has_value());
    ASSERT_EQ(store->demote_to_tier(c.demoted * block_bytes).value_or(0),
              c.demoted * block_bytes);
    tier->finish_demotions(); // copied; nobody has polled yet
    const block_key fresh = keys[8];
    auto h = store->reserve(ns, fresh, {}, {});
    ASSERT_TRUE(h.has_value()) << h.error().describe();
    std::vector<std::byte> v(spec().value_bytes());
    ASSERT_TRUE(producer.produce(spec(), fresh, v).has_value());
    ASSERT_TRUE(store->write(*h, v).has_value());
    ASSERT_TRUE(store->commit(*h).has_value());
    EXPECT_EQ(store->stats().evictions, 0U);
    EXPECT_EQ(store->tier_block_count(), c.demoted);
    EXPECT_EQ(store->tier_bytes_in_flight(), 0U);
    store->check_invariants();
  }
}

// A pinned put_tokens() over blocks the memory tier holds at int4 puts
// them in memory at the put's codec (fp16): they are counted at that, the
// larger slot. Before, they were counted at int4, the call passed, and it
// pinned 12 of 16 blocks' bytes against a limit of 8.
TEST_F(store_tier_test, a_pinned_put_is_counted_at_the_larger_slot) {
  open(16, 64);
  std::vector<std::uint32_t> tokens(8 * 16);
  for (std::size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = 1 + static_cast<std::uint32_t>(i);
  const std::vector<std::byte> values(8 * spec().value_bytes(), std::byte{3});
  put_options int4;
  int4.codec_override = codec::int4;
  ASSERT_TRUE(store_->put_tokens(ns_, tokens, values, int4).has_value());
  ASSERT_TRUE(store_->demote_to_tier(16 * block_bytes).has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 8U);
  put_options pin;
  pin.pin = true;
  ASSERT_TRUE(
      store_->process(ns_, chain(100, 4), 64, producer_, pin).has_value());
  auto r = store_->put_tokens(ns_, tokens, values, pin);
  ASSERT_FALSE(r.has_value()) << "8 fp16 blocks past 4 of room";
  EXPECT_EQ(r.error().code, errc::out_of_memory);
  EXPECT_EQ(store_->pinned_bytes(), 4 * block_bytes);
  EXPECT_EQ(store_->tier_block_count(), 8U);
  store_->check_invariants();
}

// A pin of a block in the memory tier is checked before the block is
// brought back: refused, it changes nothing. Before, the block came back
// (evicting for its room) and then the pin was refused.
TEST_F(store_tier_test, a_refused_pin_brings_nothing_back) {
  open(16, 64);
  const auto k = chain(1, 3);
  run(k);
  ASSERT_TRUE(store_->demote_to_tier(16 * block_bytes).has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 3U);
  put_options pin;
  pin.pin = true;
  ASSERT_TRUE(
      store_->process(ns_, chain(100, 8), 128, producer_, pin).has_value());
  run(chain(200, 8)); // the arena full
  const auto evictions = store_->stats().evictions;
  auto r = store_->pin(ns_, k[2]);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, errc::out_of_memory);
  EXPECT_EQ(store_->tier_block_count(), 3U);
  EXPECT_FALSE(store_->contains(ns_, k[2]));
  EXPECT_EQ(store_->stats().evictions, evictions);
  store_->check_invariants();
}

TEST_F(store_tier_test, destroying_the_store_waits_for_copies_in_flight) {
  run(chain(1, 2));
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  int waits = 0;
  tier_->wait_counter = &waits; // the fake tier dies with the store
  store_.reset();
  EXPECT_EQ(waits, 1) << "one batch in flight, waited for";
}

TEST_F(store_tier_test, random_operations_keep_every_invariant_and_every_byte) {
  // Fixed seed: requests over shared prefixes, demotions of random sizes,
  // copies finishing at random moments, pins, reads, expiry. Every block
  // served must be the producer's bytes; invariants hold after each step.
  open(24, 12);
  tier_->max_batch = 3 * block_bytes;
  std::mt19937 rng(7);
  std::vector<std::vector<block_key>> prompts;
  for (std::uint64_t p = 0; p < 6; ++p) {
    auto base = chain(1000 * (p % 3 + 1), 3); // three shared prefixes
    block_key parent = base.back();
    for (std::uint64_t i = 0; i < 1 + p % 3; ++i) {
      parent = chain_key_from_id(parent, spec().fingerprint(), 50 * p + i);
      base.push_back(parent);
    }
    prompts.push_back(base);
  }
  std::vector<block_key> pinned;
  for (int step = 0; step < 3000; ++step) {
    const auto& prompt = prompts[rng() % prompts.size()];
    switch (rng() % 7) {
    case 0:
    case 1:
    case 2: {
      const auto r = run(prompt);
      EXPECT_EQ(r.matched_blocks + r.computed_blocks, prompt.size());
      break;
    }
    case 3:
      ASSERT_TRUE(
          store_->demote_to_tier((1 + rng() % 6) * block_bytes).has_value());
      break;
    case 4:
      if (rng() % 2 == 0)
        tier_->finish_demotions();
      store_->poll_tier();
      break;
    case 5: {
      const block_key& k = prompt[rng() % prompt.size()];
      if (store_->contains(ns_, k)) {
        expect_correct(k);
      } else if (store_->in_tier(ns_, k)) {
        // A get brings it back with its chain, unless the chain is broken
        // (an ancestor dropped): then it is not found, never wrong.
        if (store_->acquire(ns_, k).has_value())
          expect_correct(k);
      }
      if (rng() % 4 == 0 && store_->pin(ns_, k).has_value())
        pinned.push_back(k);
      break;
    }
    case 6:
      if (!pinned.empty()) {
        ASSERT_TRUE(store_->unpin(ns_, pinned.back()).has_value());
        pinned.pop_back();
      }
      break;
    }
    store_->check_invariants();
  }
  settle();
  EXPECT_GT(store_->stats().tier_demotions, 10U);
  EXPECT_GT(store_->stats().tier_block_hits, 10U);
  for (const auto& prompt : prompts) {
    run(prompt);
    for (const auto& k : prompt)
      expect_correct(k);
  }
}

TEST_F(store_tier_test, attaching_is_checked) {
  auto again = store_->attach_tier(
      [](memory_backend&) -> result<std::unique_ptr<memory_tier>> {
        return std::unique_ptr<memory_tier>{};
      });
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().code, errc::invalid_argument);
  EXPECT_FALSE(store_->attach_tier({}).has_value());

  store_config cfg;
  cfg.capacity_bytes = 8 * block_bytes;
  cfg.slab_bytes = block_bytes;
  auto bare = block_store::create(cfg);
  ASSERT_TRUE(bare.has_value());
  EXPECT_EQ((*bare)->demote_to_tier(1).error().code, errc::invalid_argument);
  auto none = (*bare)->attach_tier(
      [](memory_backend&) -> result<std::unique_ptr<memory_tier>> {
        return std::unique_ptr<memory_tier>{};
      });
  ASSERT_TRUE(none.has_value());
  EXPECT_FALSE(*none) << "no tier for this arena";
  EXPECT_EQ((*bare)->tier(), nullptr);
  auto failing = (*bare)->attach_tier(
      [](memory_backend&) -> result<std::unique_ptr<memory_tier>> {
        return make_error(errc::out_of_memory, "no pinned memory");
      });
  ASSERT_FALSE(failing.has_value());
  EXPECT_EQ(failing.error().code, errc::out_of_memory);
  // A factory that throws (the host's code) is an error value too.
  auto throwing = (*bare)->attach_tier(
      [](memory_backend&) -> result<std::unique_ptr<memory_tier>> {
        throw std::runtime_error("no device (test)");
      });
  ASSERT_FALSE(throwing.has_value());
  EXPECT_EQ(throwing.error().code, errc::backend_error);
  EXPECT_NE(throwing.error().message.find("no device (test)"),
            std::string::npos)
      << throwing.error().message;
  EXPECT_EQ((*bare)->tier(), nullptr);
}

} // namespace
TEST_F(store_tier_test, a_hit_from_the_tier_counts_as_an_access) {
  // H and N: put, hit once or three times each, H last through the tier.
  // Evicting one of them takes the same one as when H's last hit was in
  // memory: the tier hit is an access. (Before, process() recorded none
  // for a block it brought back: LFU lost the hit, and the adaptive policy
  // saw a hot block as a one-off and evicted it first.)
  for (const auto& [policy, hits] :
       {std::pair{policy_kind::lfu, 3}, std::pair{policy_kind::adaptive, 1}}) {
    bool survived[2] = {};
    for (const bool through_tier : {false, true}) {
      SCOPED_TRACE(std::string(to_string(policy)) +
                   (through_tier ? " through the tier" : " in memory"));
      open(32, 32, policy);
      const auto h = chain(1, 1);
      const auto n = chain(2, 1);
      for (std::uint64_t i = 0; i < 10; ++i)
        run(chain(100 + i, 1)); // one-offs
      run(h);
      for (int i = 0; i < hits; ++i)
        run(h);
      if (through_tier) {
        ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
        settle();
        ASSERT_TRUE(store_->in_tier(ns_, h[0]));
        EXPECT_EQ(run(h).tier_blocks, 1U);
      } else {
        run(h);
      }
      run(n);
      for (int i = 0; i < hits; ++i)
        run(n);
      while (store_->contains(ns_, h[0]) && store_->contains(ns_, n[0]) &&
             store_->evict_bytes(block_bytes) > 0) {
      }
      survived[through_tier ? 1 : 0] = store_->contains(ns_, h[0]);
      store_->check_invariants();
    }
    EXPECT_EQ(survived[1], survived[0]) << to_string(policy);
  }
}

TEST_F(store_tier_test, demotion_takes_from_each_partition_down_to_its_share) {
  // 35 short blocks (share 30 of 100) and 45 long ones (share 40): moving
  // 20 blocks to the tier takes them as evict_bytes() would, from the
  // partition furthest over its share as the shares change, leaving
  // neither far below its share. (Before, the blocks on their way still
  // counted for their partition: one call took every block of the short
  // partition's it could, down to 15, and left the long one over.)
  for (const bool to_tier : {false, true}) {
    SCOPED_TRACE(to_tier ? "demote_to_tier" : "evict_bytes");
    open(100, 100);
    for (std::uint64_t i = 0; i < 80; ++i) {
      put_options o;
      o.request_tokens = i < 35 ? 16 : 5000;
      const auto k = chain(10'000 + i, 1);
      ASSERT_TRUE(store_->process(ns_, k, 16, producer_, o).has_value());
    }
    if (to_tier) {
      ASSERT_TRUE(store_->demote_to_tier(20 * block_bytes).has_value());
      settle();
    } else {
      EXPECT_EQ(store_->evict_bytes(20 * block_bytes), 20 * block_bytes);
    }
    const auto& by = store_->stats().blocks_by_partition;
    EXPECT_EQ(by[static_cast<std::size_t>(size_partition::small)], 26U);
    EXPECT_EQ(by[static_cast<std::size_t>(size_partition::large)], 34U);
    store_->check_invariants();
  }
}

TEST_F(store_tier_test,
       nothing_is_dropped_for_a_batch_the_copies_in_flight_keep_out) {
  // An 8-block tier holding 2 settled blocks and 6 still being copied: a
  // batch of 4 cannot fit until the copies finish, whatever is dropped. It
  // waits, dropping nothing, and the settled chain is still served from
  // the tier. (Before, the tier was emptied for it, then it was refused.)
  open(32, 8);
  const auto a = chain(1, 2);
  run(a);
  ASSERT_TRUE(store_->demote_to_tier(store_->used_bytes()).has_value());
  settle();
  ASSERT_EQ(store_->tier_block_count(), 2U);
  for (std::uint64_t i = 0; i < 6; ++i)
    run(chain(100 + i * 10, 1));
  auto in_flight = store_->demote_to_tier(6 * block_bytes);
  ASSERT_TRUE(in_flight.has_value());
  ASSERT_EQ(*in_flight, 6 * block_bytes);
  for (std::uint64_t i = 0; i < 4; ++i)
    run(chain(500 + i * 10, 1));
  removed_.clear();
  auto waits = store_->demote_to_tier(4 * block_bytes);
  ASSERT_TRUE(waits.has_value());
  EXPECT_EQ(*waits, 0U);
  EXPECT_EQ(store_->tier_block_count(), 2U);
  EXPECT_EQ(store_->stats().tier_drops, 0U);
  EXPECT_EQ(store_->stats().tier_failures, 0U) << "waiting is no failure";
  EXPECT_TRUE(removed_.empty());
  store_->check_invariants();
  EXPECT_EQ(run(a).computed_blocks, 0U);
  settle();
}

} // namespace kvfleet::engine
