#include "tools/bench/engine_mode.hpp"

#include "engine/disk/segment_file.hpp"
#include "engine/testing/temp_dir.hpp"

#include <gtest/gtest.h>

#include <algorithm>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace kvfleet::bench {
namespace {

using engine::policy_kind;

engine_options small_workload(std::string name, double fraction) {
  engine_options o;
  o.workload = std::move(name);
  o.requests = 400;
  o.capacity_fraction = fraction;
  o.policies = {policy_kind::lru, policy_kind::lfu, policy_kind::priority,
                policy_kind::adaptive, policy_kind::belady};
  return o;
}

result<engine_report> run(const engine_options& o) {
  std::ostringstream diag;
  auto reqs = load_requests(o, diag);
  if (!reqs)
    return unexpected<error>(reqs.error());
  return run_engine(o, *reqs, o.workload);
}

TEST(engine_mode, belady_is_at_least_as_good_as_every_other_policy) {
  for (const char* name : {"chat", "shared-prefix", "doc-qa"}) {
    auto report = run(small_workload(name, 0.25));
    ASSERT_TRUE(report) << report.error().describe();
    ASSERT_EQ(report->results.size(), 5U);
    const policy_result& belady = report->results.back();
    ASSERT_EQ(belady.policy, policy_kind::belady);
    EXPECT_GT(belady.block_hit_ratio, 0.0) << name;
    for (const policy_result& r : report->results) {
      EXPECT_GE(belady.block_hit_ratio, r.block_hit_ratio)
          << name << " vs " << engine::to_string(r.policy);
      EXPECT_GE(belady.token_hit_ratio, r.token_hit_ratio)
          << name << " vs " << engine::to_string(r.policy);
      EXPECT_GE(belady.prefill_saved_s, r.prefill_saved_s) << name;
    }
  }
}

TEST(engine_mode, adaptive_follows_the_workload_recency_or_frequency) {
  // Documents reused by later questions reward a long memory (LFU beats
  // LRU); chat rewards recency. The adaptive policy picks its half-life
  // from two sampled shadow caches, so it does at least about as well as
  // the better of LRU and LFU on each (with its fixed short half-life it
  // fell 7% behind LFU on doc-qa). Within 3%: on chat its ratio to LRU
  // moves by a few percent either way from one capacity to the next
  // (README), and here it is 0.982; held on the short half-life it reaches
  // 0.964 of LFU on doc-qa, held on the long one 0.948 of LRU on chat.
  for (const char* name : {"doc-qa", "chat"}) {
    auto o = small_workload(name, 0.25);
    o.requests = 6000;
    o.policies = {policy_kind::lru, policy_kind::lfu, policy_kind::adaptive};
    auto report = run(o);
    ASSERT_TRUE(report) << report.error().describe();
    const double lru = report->results[0].token_hit_ratio;
    const double lfu = report->results[1].token_hit_ratio;
    const double adaptive = report->results[2].token_hit_ratio;
    EXPECT_GE(adaptive, 0.97 * std::max(lru, lfu))
        << name << ": lru " << lru << " lfu " << lfu << " adaptive "
        << adaptive;
  }
}

TEST(engine_mode, a_disk_tier_only_adds_hits_and_reports_them_by_tier) {
  const engine::testing::temp_dir scratch("kvfleet-bench-test-");
  ASSERT_TRUE(scratch.ok());
  const std::string tmpl = scratch.path();
  engine_options o = small_workload("chat", 0.1);
  o.policies = {policy_kind::lru, policy_kind::adaptive};
  auto without = run(o);
  ASSERT_TRUE(without) << without.error().describe();
  o.disk_dir = tmpl;
  auto with = run(o);
  ASSERT_TRUE(with) << with.error().describe();
  ASSERT_EQ(with->results.size(), 2U);
  ASSERT_EQ(without->results.size(), 2U);
  for (std::size_t i = 0; i < with->results.size(); ++i) {
    const policy_result& w = with->results[i];
    EXPECT_TRUE(w.disk);
    EXPECT_GE(w.token_hit_ratio, without->results[i].token_hit_ratio);
    EXPECT_GT(w.disk_token_hit_ratio, 0.0);
    EXPECT_GT(w.spills, 0U);
    EXPECT_NEAR(w.token_hit_ratio - w.disk_token_hit_ratio,
                without->results[i].token_hit_ratio, 0.05);
  }
  // Each run's directory is removed afterwards.
  EXPECT_TRUE(std::filesystem::is_empty(tmpl));
}

TEST(engine_mode, spills_refused_while_the_disk_was_behind_are_not_failures) {
  policy_result r;
  EXPECT_EQ(failed_spills(r), 0U);
  r.spill_failures = 7;
  r.spills_refused_busy = 7; // all load shedding
  EXPECT_EQ(failed_spills(r), 0U);
  r.spills_refused_full = 2;
  r.spill_errors = 1;
  r.spill_failures = 10; // 7 busy, 2 full, 1 write error
  EXPECT_EQ(failed_spills(r), 3U);
  r.spills_refused_busy = 12; // more than counted: never below 0
  EXPECT_EQ(failed_spills(r), 0U);
}

TEST(engine_mode, a_disk_capacity_past_64_bits_is_an_error) {
  const engine::testing::temp_dir scratch("kvfleet-bench-test-");
  ASSERT_TRUE(scratch.ok());
  const std::string tmpl = scratch.path();
  engine_options o = small_workload("chat", 0.1);
  o.policies = {policy_kind::lru};
  o.disk_dir = tmpl;
  o.disk_capacity_blocks = std::size_t{1} << 50; // x 16 KiB wraps to 0
  auto r = run(o);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, errc::value_too_large);
  EXPECT_NE(r.error().message.find("does not fit"), std::string::npos);
  EXPECT_TRUE(std::filesystem::is_empty(tmpl));
}

TEST(engine_mode, disk_capacity_counts_the_segment_and_record_headers) {
  const engine::namespace_spec spec = bench_namespace(engine_options{});
  const std::uint64_t record = engine::record_header_bytes + 16384;
  const std::uint64_t segment = std::uint64_t{64} << 20;
  auto one = disk_capacity_bytes(spec, 1, segment);
  ASSERT_TRUE(one) << one.error().describe();
  EXPECT_EQ(*one, engine::segment_header_bytes + record);
  // A segment holds (64 MiB - its header) / record records; the next one
  // starts another segment with its own header.
  const std::uint64_t per_segment =
      (segment - engine::segment_header_bytes) / record;
  EXPECT_EQ(disk_capacity_bytes(spec, per_segment, segment).value_or(0),
            engine::segment_header_bytes + per_segment * record);
  EXPECT_EQ(disk_capacity_bytes(spec, per_segment + 1, segment).value_or(0),
            2 * engine::segment_header_bytes + (per_segment + 1) * record);
  // Records larger than a segment get one each.
  EXPECT_EQ(disk_capacity_bytes(spec, 3, 1024).value_or(0),
            3 * (engine::segment_header_bytes + record));
}

TEST(engine_mode, a_disk_tier_of_one_block_holds_one) {
  // Sized as blocks x the block's bytes, a one-block tier had no room for
  // the record and segment headers: every spill was refused, silently.
  const engine::testing::temp_dir scratch("kvfleet-bench-test-");
  ASSERT_TRUE(scratch.ok());
  const std::string tmpl = scratch.path();
  engine_options o = small_workload("chat", 0.1);
  o.requests = 100;
  o.policies = {policy_kind::lru};
  o.disk_dir = tmpl;
  o.disk_capacity_blocks = 1;
  auto r = run(o);
  ASSERT_TRUE(r) << r.error().describe();
  EXPECT_GT(r->results[0].spills, 0U);
  EXPECT_TRUE(std::filesystem::is_empty(tmpl));
}

TEST(engine_mode, prefill_saved_uses_the_cost_as_given) {
  // The store's producer counts whole nanoseconds per token: 0.0004 us
  // (0.4 ns) became 0 and the report said no prefill time was saved.
  engine_options o = small_workload("chat", 0.25);
  o.requests = 100;
  o.policies = {policy_kind::lru};
  o.prefill_us_per_token = 0.0004;
  auto report = run(o);
  ASSERT_TRUE(report) << report.error().describe();
  const policy_result& r = report->results[0];
  ASSERT_GT(r.matched_tokens, 0U);
  EXPECT_DOUBLE_EQ(r.prefill_saved_s,
                   static_cast<double>(r.matched_tokens) * 0.0004 / 1e6);
}

TEST(engine_mode, every_policy_sees_the_same_requests) {
  auto report = run(small_workload("chat", 0.25));
  ASSERT_TRUE(report) << report.error().describe();
  for (const policy_result& r : report->results) {
    EXPECT_EQ(r.input_tokens, report->results[0].input_tokens);
    EXPECT_EQ(r.full_blocks, report->results[0].full_blocks);
    EXPECT_LE(r.matched_blocks, r.full_blocks);
    EXPECT_LE(r.matched_tokens, r.input_tokens);
    EXPECT_DOUBLE_EQ(r.token_hit_ratio,
                     static_cast<double>(r.matched_tokens) /
                         static_cast<double>(r.input_tokens));
    // 20 us per matched token by default.
    EXPECT_NEAR(r.prefill_saved_s,
                static_cast<double>(r.matched_tokens) * 20e-6, 1e-6);
    EXPECT_LE(r.p50_us, r.p95_us);
    EXPECT_LE(r.p95_us, r.p99_us);
    EXPECT_GT(r.p50_us, 0.0);
  }
}

TEST(engine_mode, no_reuse_gets_no_hits_and_a_whole_working_set_fits) {
  auto none = run(small_workload("no-reuse", 0.25));
  ASSERT_TRUE(none) << none.error().describe();
  for (const policy_result& r : none->results) {
    EXPECT_EQ(r.matched_blocks, 0U);
    EXPECT_EQ(r.prefill_saved_s, 0.0);
  }
  // With room for everything (below the high watermark) nothing is evicted
  // and every policy scores the same: the compulsory misses only.
  auto all = run(small_workload("shared-prefix", 1.2));
  ASSERT_TRUE(all) << all.error().describe();
  for (const policy_result& r : all->results) {
    EXPECT_EQ(r.evictions, 0U);
    EXPECT_EQ(r.matched_blocks, all->results[0].matched_blocks);
    EXPECT_EQ(r.full_blocks - r.matched_blocks, all->working_set_blocks);
  }
}

TEST(engine_mode, capacity_from_fraction_or_blocks) {
  engine_options o;
  o.capacity_fraction = 0.25;
  EXPECT_EQ(capacity_in_blocks(o, 1000).value_or(0), 250U);
  EXPECT_EQ(capacity_in_blocks(o, 10).value_or(0), 3U); // 2.5 rounds up
  auto zero = capacity_in_blocks(o, 1);
  ASSERT_FALSE(zero);
  EXPECT_EQ(zero.error().code, errc::zero_capacity);
  EXPECT_TRUE(is_usage_error(zero.error()));
  o.capacity_fraction.reset();
  o.capacity_blocks = 17;
  EXPECT_EQ(capacity_in_blocks(o, 1000).value_or(0), 17U);
}

TEST(engine_mode, a_capacity_error_quotes_the_fraction_as_given) {
  // std::to_string printed 1e-9 as "0.000000": a fraction the user did
  // not give, and one the option refuses anyway.
  engine_options o;
  o.capacity_fraction = 1e-9;
  auto zero = capacity_in_blocks(o, 1000);
  ASSERT_FALSE(zero);
  EXPECT_NE(zero.error().message.find("--capacity-fraction 1e-09 of"),
            std::string::npos)
      << zero.error().message;
}

TEST(engine_mode, store_capacity_is_a_whole_number_of_blocks_and_slabs) {
  engine_options o;
  const std::size_t slot = block_slot_bytes(bench_namespace(o));
  EXPECT_EQ(slot, 16U * 1024U);
  for (std::size_t n : {1U, 2U, 7U, 64U, 97U, 250U, 1000U}) {
    auto cfg = make_store_config(o, policy_kind::lru, n);
    ASSERT_TRUE(cfg) << cfg.error().describe();
    EXPECT_EQ(cfg->capacity_bytes, n * slot);
    EXPECT_EQ(cfg->slab_bytes % slot, 0U);
    EXPECT_EQ(cfg->capacity_bytes % cfg->slab_bytes, 0U) << n;
    EXPECT_LE(cfg->slab_bytes, 64 * slot);
    // At least 8 slabs where the capacity allows (compression needs a
    // slab's worth of free slots to make one of the smaller size).
    if (n >= 8) {
      EXPECT_GE(cfg->capacity_bytes / cfg->slab_bytes, 8U) << n;
    }
    EXPECT_FALSE(cfg->adaptive_compression);
    auto store = engine::block_store::create(*cfg);
    ASSERT_TRUE(store) << store.error().describe();
    EXPECT_EQ((*store)->capacity_bytes(), n * slot) << n;
  }
}

TEST(engine_mode, compression_demotes_instead_of_evicting) {
  engine_options o = small_workload("doc-qa", 0.25);
  o.policies = {policy_kind::lru};
  o.compression = true;
  auto on = run(o);
  ASSERT_TRUE(on) << on.error().describe();
  EXPECT_GT(on->results[0].demotions, 0U);
  o.compression = false;
  auto off = run(o);
  ASSERT_TRUE(off) << off.error().describe();
  EXPECT_EQ(off->results[0].demotions, 0U);
  // Also in a store of 64 blocks: it used to be one slab, where nothing
  // could ever be demoted.
  o.capacity_fraction.reset();
  o.capacity_blocks = 64;
  o.compression = true;
  auto small = run(o);
  ASSERT_TRUE(small) << small.error().describe();
  EXPECT_GT(small->results[0].demotions, 0U);
}

class trace_file : public ::testing::Test {
protected:
  void SetUp() override {
    ASSERT_TRUE(dir_.ok()) << "mkdtemp failed";
    path_ = dir_.file("trace.jsonl");
  }
  void write(const std::string& text) {
    std::ofstream f(path_);
    f << text;
    f.close();
    EXPECT_TRUE(f.good()) << "cannot write " << path_;
  }
  engine::testing::temp_dir dir_{"kvfleet_bench_trace_"};
  std::string path_;
};

constexpr const char* good_lines =
    R"({"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [1, 2, 3]}
{"timestamp": 10, "input_length": 1024, "output_length": 5, "hash_ids": [1, 2]}
{"timestamp": 20, "input_length": 600, "output_length": 5, "hash_ids": [1, 9]}
)";

TEST_F(trace_file, replays_a_trace) {
  write(good_lines);
  engine_options o;
  o.trace_path = path_;
  o.capacity_blocks = 10;
  std::ostringstream diag;
  auto reqs = load_requests(o, diag);
  ASSERT_TRUE(reqs) << reqs.error().describe();
  EXPECT_EQ(reqs->size(), 3U);
  EXPECT_TRUE(diag.str().empty()) << diag.str();
  auto report = run_engine(o, *reqs, path_);
  ASSERT_TRUE(report) << report.error().describe();
  EXPECT_EQ(report->working_set_blocks, 2U);
  for (const policy_result& r : report->results) {
    EXPECT_EQ(r.full_blocks, 2U + 2U + 1U);
    EXPECT_EQ(r.matched_blocks, 2U + 1U);
    EXPECT_EQ(r.matched_tokens, 1024U + 512U);
    EXPECT_EQ(r.input_tokens, 1100U + 1024U + 600U);
  }
  o.requests = 2;
  auto first_two = load_requests(o, diag);
  ASSERT_TRUE(first_two);
  EXPECT_EQ(first_two->size(), 2U);
}

TEST_F(trace_file, bad_lines_are_rejected_or_skipped_with_line_numbers) {
  write(std::string(good_lines) +
        R"({"timestamp": 30, "input_length": 512, "output_length": 5}
{"timestamp": 40, "input_length": 512, "output_length": 5, "hash_ids": [4]}
not json
)");
  engine_options o;
  o.trace_path = path_;
  o.capacity_blocks = 10;
  std::ostringstream diag;
  auto rejected = load_requests(o, diag);
  ASSERT_FALSE(rejected);
  EXPECT_EQ(rejected.error().code, errc::parse_error);
  EXPECT_FALSE(is_usage_error(rejected.error()));
  EXPECT_NE(rejected.error().message.find("line 4"), std::string::npos)
      << rejected.error().message;

  o.on_bad_line = engine::bad_line_action::skip;
  diag.str("");
  auto skipped = load_requests(o, diag);
  ASSERT_TRUE(skipped) << skipped.error().describe();
  EXPECT_EQ(skipped->size(), 4U);
  EXPECT_NE(diag.str().find("line 4"), std::string::npos) << diag.str();
  EXPECT_NE(diag.str().find("line 6"), std::string::npos) << diag.str();
  EXPECT_NE(diag.str().find("skipped 2 malformed lines"), std::string::npos)
      << diag.str();
}

TEST_F(trace_file, a_trace_without_requests_is_an_error) {
  engine_options o;
  o.trace_path = path_;
  o.capacity_blocks = 10;
  std::ostringstream diag;
  write("\n  \n");
  auto blank = load_requests(o, diag);
  ASSERT_FALSE(blank);
  EXPECT_EQ(blank.error().code, errc::parse_error);
  EXPECT_FALSE(is_usage_error(blank.error()));
  EXPECT_NE(blank.error().message.find("has no requests"), std::string::npos)
      << blank.error().message;

  // Blank lines and one malformed line: the message counts both (it said
  // "every line was malformed" after "skipped 1 malformed line of 4").
  write("\n\n\nnot json\n");
  o.on_bad_line = engine::bad_line_action::skip;
  auto all_skipped = load_requests(o, diag);
  ASSERT_FALSE(all_skipped);
  EXPECT_NE(all_skipped.error().message.find(
                "has no requests (1 malformed and 3 blank of 4 lines)"),
            std::string::npos)
      << all_skipped.error().message;
}

TEST(generated_workload, one_without_a_whole_block_names_what_gives_some) {
  engine_options o;
  o.workload = "no-reuse";
  o.requests = 1;
  o.block_tokens = 1u << 20; // no generated prompt is that long
  o.capacity_blocks = 5;
  std::ostringstream diag;
  auto reqs = load_requests(o, diag);
  ASSERT_FALSE(reqs);
  EXPECT_EQ(reqs.error().code, errc::invalid_argument);
  EXPECT_NE(reqs.error().message.find("a smaller --block-tokens, more "
                                      "--requests or another --seed"),
            std::string::npos)
      << reqs.error().message;
}

TEST_F(trace_file, an_input_without_a_whole_block_is_refused) {
  engine_options o;
  o.trace_path = path_;
  o.capacity_blocks = 10;
  o.block_tokens = 512;
  std::ostringstream diag;
  write(
      R"({"timestamp": 0, "input_length": 511, "output_length": 1, "hash_ids": [1]})"
      "\n");
  auto reqs = load_requests(o, diag);
  ASSERT_FALSE(reqs);
  // The trace's content: exit status 1, as for any bad trace (it was 2).
  EXPECT_EQ(reqs.error().code, errc::parse_error);
  EXPECT_FALSE(is_usage_error(reqs.error()));
  EXPECT_NE(reqs.error().message.find("no request has a whole block of 512"),
            std::string::npos)
      << reqs.error().message;

  // One request of a whole block is enough.
  write(
      R"({"timestamp": 0, "input_length": 511, "output_length": 1, "hash_ids": [1]})"
      "\n"
      R"({"timestamp": 1, "input_length": 512, "output_length": 1, "hash_ids": [2]})"
      "\n");
  auto one = load_requests(o, diag);
  ASSERT_TRUE(one) << one.error().describe();
  EXPECT_EQ(one->size(), 2U);
}

TEST_F(trace_file, missing_file_is_an_io_error) {
  engine_options o;
  o.trace_path = path_ + ".missing";
  o.capacity_blocks = 10;
  std::ostringstream diag;
  auto reqs = load_requests(o, diag);
  ASSERT_FALSE(reqs);
  EXPECT_EQ(reqs.error().code, errc::io_error);
  EXPECT_FALSE(is_usage_error(reqs.error()));
}

} // namespace
} // namespace kvfleet::bench
