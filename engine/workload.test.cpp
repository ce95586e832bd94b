#include "engine/workload.hpp"

#include "engine/kv_namespace.hpp"
#include "engine/stop_poll.hpp"
#include "engine/testing/heap_probe.hpp"
#include "engine/trace_reader.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvfleet::engine {
namespace {

std::vector<workload_request> make(std::string_view name, std::size_t n,
                                   std::uint32_t block_tokens = 512,
                                   std::uint64_t seed = 42) {
  auto got = generate_workload(name, {block_tokens, seed, n, {}});
  EXPECT_TRUE(got.has_value()) << got.error().describe();
  return got ? std::move(got).value() : std::vector<workload_request>{};
}

std::size_t full_blocks(const workload_request& r, std::uint32_t bt) {
  return r.input_length / bt;
}

/// Length of the common leading run of two id sequences.
std::size_t common_prefix(const std::vector<std::uint64_t>& a,
                          const std::vector<std::uint64_t>& b) {
  const auto n = std::min(a.size(), b.size());
  std::size_t i = 0;
  while (i < n && a[i] == b[i])
    ++i;
  return i;
}

/// For every id, the number of requests whose prompt holds it.
std::unordered_map<std::uint64_t, std::size_t>
id_use_counts(const std::vector<workload_request>& reqs) {
  std::unordered_map<std::uint64_t, std::size_t> uses;
  for (const auto& r : reqs) {
    const std::set<std::uint64_t> distinct(r.hash_ids.begin(),
                                           r.hash_ids.end());
    for (const auto id : distinct)
      ++uses[id];
  }
  return uses;
}

TEST(workload, names_are_the_four_workloads) {
  const auto names = workload_names();
  ASSERT_EQ(names.size(), 4U);
  EXPECT_EQ(names[0], "chat");
  EXPECT_EQ(names[1], "shared-prefix");
  EXPECT_EQ(names[2], "doc-qa");
  EXPECT_EQ(names[3], "no-reuse");
}

TEST(workload, unknown_name_lists_the_valid_ones) {
  const auto got = generate_workload("chatty", {});
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::invalid_argument);
  for (const auto name : workload_names())
    EXPECT_NE(got.error().message.find(name), std::string::npos)
        << got.error().message;
  EXPECT_NE(got.error().message.find("chatty"), std::string::npos);
}

TEST(workload, rejects_bad_options) {
  const auto zero = generate_workload("chat", {0, 42, 10, {}});
  ASSERT_FALSE(zero.has_value());
  EXPECT_EQ(zero.error().code, errc::invalid_argument);
  const auto huge =
      generate_workload("chat", {512, 42, max_workload_requests + 1, {}});
  ASSERT_FALSE(huge.has_value());
  EXPECT_EQ(huge.error().code, errc::invalid_argument);
}

TEST(workload, same_seed_same_output_other_seed_other_output) {
  for (const auto name : workload_names()) {
    SCOPED_TRACE(std::string(name));
    const auto a = make(name, 300, 512, 7);
    const auto b = make(name, 300, 512, 7);
    const auto c = make(name, 300, 512, 8);
    ASSERT_EQ(a.size(), 300U);
    EXPECT_EQ(a, b);
    EXPECT_NE(a, c);
  }
}

TEST(workload, workloads_share_no_ids) {
  std::set<std::uint64_t> seen;
  for (const auto name : workload_names()) {
    const auto reqs = make(name, 200);
    std::set<std::uint64_t> mine;
    for (const auto& r : reqs)
      mine.insert(r.hash_ids.begin(), r.hash_ids.end());
    for (const auto id : mine)
      EXPECT_TRUE(seen.insert(id).second) << name;
  }
}

TEST(workload, id_count_and_timestamps) {
  for (const std::uint32_t bt : {512U, 128U, 100U}) {
    for (const auto name : workload_names()) {
      SCOPED_TRACE(std::string(name) + " block_tokens " + std::to_string(bt));
      const auto reqs = make(name, 1000, bt);
      ASSERT_EQ(reqs.size(), 1000U);
      std::uint64_t last = 0;
      for (const auto& r : reqs) {
        ASSERT_GT(r.input_length, 0U);
        ASSERT_GT(r.output_length, 0U);
        ASSERT_EQ(r.hash_ids.size(), (r.input_length + bt - 1) / bt);
        ASSERT_GE(r.timestamp_ms, last);
        last = r.timestamp_ms;
        for (const auto id : r.hash_ids)
          ASSERT_LT(id, std::uint64_t{1} << 63);
      }
      EXPECT_GT(last, 0U);
    }
  }
}

TEST(workload, default_sizes_stay_moderate) {
  const std::map<std::string_view, std::size_t> sizes = {
      {"chat", 20'000},
      {"shared-prefix", 20'000},
      {"doc-qa", 10'000},
      {"no-reuse", 10'000}};
  for (const auto name : workload_names()) {
    SCOPED_TRACE(std::string(name));
    const auto reqs = make(name, 0);
    EXPECT_EQ(reqs.size(), sizes.at(name));
    std::size_t refs = 0;
    for (const auto& r : reqs)
      refs += r.hash_ids.size();
    EXPECT_LT(refs, 1'500'000U);
  }
}

TEST(workload, default_workloads_match_the_documented_table) {
  // tools/bench/workloads/README.md's table, which README's policy and
  // routing numbers rest on: a change to a generator must update both.
  struct shape {
    std::size_t refs_512, set_512, refs_128, set_128;
  };
  const std::map<std::string_view, shape> table = {
      {"chat", {175'598, 30'031, 732'166, 113'778}},
      {"shared-prefix", {153'985, 35'352, 645'450, 145'456}},
      {"doc-qa", {232'871, 15'670, 948'846, 67'604}},
      {"no-reuse", {49'392, 49'392, 211'590, 211'590}}};
  for (const auto name : workload_names()) {
    SCOPED_TRACE(std::string(name));
    const auto& want = table.at(name);
    for (const std::uint32_t bt : {512U, 128U}) {
      SCOPED_TRACE(bt);
      const auto reqs = make(name, 0, bt);
      std::size_t refs = 0;
      for (const auto& r : reqs)
        refs += std::min(r.hash_ids.size(), full_blocks(r, bt));
      EXPECT_EQ(refs, bt == 512 ? want.refs_512 : want.refs_128);
      EXPECT_EQ(working_set_blocks(reqs, bt).value(),
                bt == 512 ? want.set_512 : want.set_128);
    }
  }
}

TEST(workload, chat_rounds_extend_the_session_history) {
  constexpr std::uint32_t bt = 128;
  const auto reqs = make("chat", 3000, bt);
  std::map<std::uint64_t, std::vector<const workload_request*>> sessions;
  for (const auto& r : reqs) {
    ASSERT_NE(r.session, 0U);
    sessions[r.session].push_back(&r);
  }
  std::size_t multi_round = 0;
  for (const auto& [id, rounds] : sessions) {
    if (rounds.size() > 1)
      ++multi_round;
    for (std::size_t k = 1; k < rounds.size(); ++k) {
      const auto& before = *rounds[k - 1];
      const auto& after = *rounds[k];
      // The reply to the earlier round and a new user turn come in between.
      EXPECT_GT(after.input_length, before.input_length + before.output_length);
      const auto full = full_blocks(before, bt);
      ASSERT_GE(common_prefix(before.hash_ids, after.hash_ids), full)
          << "session " << id << " round " << k;
    }
  }
  // Heavy-tailed lengths: most sessions are one round, but not all.
  EXPECT_GT(multi_round, sessions.size() / 4);
  EXPECT_LT(multi_round, sessions.size() * 3 / 4);

  // Sessions share system prompts: a few distinct first blocks, many
  // sessions each.
  std::map<std::uint64_t, std::set<std::uint64_t>> sessions_by_first;
  for (const auto& r : reqs)
    sessions_by_first[r.hash_ids[0]].insert(r.session);
  EXPECT_LE(sessions_by_first.size(), 4U);
  std::size_t biggest = 0;
  for (const auto& [first, s] : sessions_by_first)
    biggest = std::max(biggest, s.size());
  EXPECT_GT(biggest, sessions.size() / 3);
}

TEST(workload, chat_sessions_interleave) {
  const auto reqs = make("chat", 0);
  std::map<std::uint64_t, std::pair<std::uint64_t, std::uint64_t>> span;
  for (const auto& r : reqs) {
    auto [it, fresh] =
        span.try_emplace(r.session, r.timestamp_ms, r.timestamp_ms);
    if (!fresh) {
      it->second.second = r.timestamp_ms;
    }
  }
  // Sessions active at the middle of the trace.
  const std::uint64_t mid = reqs[reqs.size() / 2].timestamp_ms;
  std::size_t active = 0;
  for (const auto& [s, t] : span)
    if (t.first <= mid && mid <= t.second)
      ++active;
  EXPECT_GE(active, 200U);
  EXPECT_LE(active, 800U);
}

TEST(workload, shared_prefix_groups_share_prefixes_and_suffixes_are_unique) {
  constexpr std::uint32_t bt = 256;
  const auto reqs = make("shared-prefix", 2000, bt);
  const auto uses = id_use_counts(reqs);
  std::map<std::uint64_t, std::size_t> group_sizes; // by first id
  for (const auto& r : reqs) {
    ++group_sizes[r.hash_ids[0]];
    // Shared ids first, then the request's own ids; the block holding the
    // start of the suffix is already its own.
    std::size_t i = 0;
    while (i < r.hash_ids.size() && uses.at(r.hash_ids[i]) > 1)
      ++i;
    ASSERT_LT(i, r.hash_ids.size());
    for (; i < r.hash_ids.size(); ++i)
      ASSERT_EQ(uses.at(r.hash_ids[i]), 1U);
  }
  EXPECT_LE(group_sizes.size(), 2000U);
  EXPECT_GT(group_sizes.size(), 300U);
  // Zipf: the most popular group is far above the mean of 10 requests.
  std::size_t biggest = 0;
  for (const auto& [first, n] : group_sizes)
    biggest = std::max(biggest, n);
  EXPECT_GT(biggest, 100U);

  // Requests of a group share the group's prefix, at least 1,024 tokens.
  std::map<std::uint64_t, const workload_request*> first_of_group;
  for (const auto& r : reqs) {
    const auto [it, fresh] = first_of_group.try_emplace(r.hash_ids[0], &r);
    if (!fresh) {
      EXPECT_GE(common_prefix(it->second->hash_ids, r.hash_ids), 1024U / bt);
    }
  }
}

TEST(workload, no_reuse_shares_nothing) {
  const auto reqs = make("no-reuse", 2000, 128);
  std::set<std::uint64_t> ids;
  std::size_t refs = 0;
  for (const auto& r : reqs) {
    EXPECT_GE(r.input_length, 500U);
    EXPECT_LE(r.input_length, 8192U);
    ids.insert(r.hash_ids.begin(), r.hash_ids.end());
    refs += r.hash_ids.size();
  }
  EXPECT_EQ(ids.size(), refs);
}

TEST(workload, doc_qa_reuses_documents) {
  constexpr std::uint32_t bt = 512;
  const auto reqs = make("doc-qa", 2000, bt);
  // Every request starts with the 600-token instruction: one shared block.
  for (const auto& r : reqs)
    ASSERT_EQ(r.hash_ids[0], reqs[0].hash_ids[0]);
  // Requests on the same document share instruction + document, at least
  // 4,696 tokens.
  std::map<std::uint64_t, std::size_t> by_doc_block; // second block
  for (const auto& r : reqs)
    ++by_doc_block[r.hash_ids[1]];
  EXPECT_LE(by_doc_block.size(), 500U);
  std::size_t reused = 0;
  for (const auto& [id, n] : by_doc_block)
    if (n > 1)
      reused += n;
  EXPECT_GT(reused, reqs.size() / 2);
  std::size_t total_full = 0;
  for (const auto& r : reqs)
    total_full += full_blocks(r, bt);
  EXPECT_LT(working_set_blocks(reqs, bt).value(), total_full / 2);
}

TEST(workload, working_set_counts_distinct_full_block_prefixes) {
  constexpr std::uint32_t bt = 4;
  std::vector<workload_request> reqs(5);
  reqs[0].input_length = 12; // [1], [1 2], [1 2 3]
  reqs[0].hash_ids = {1, 2, 3};
  reqs[1].input_length = 10; // [1], [1 2]; id 9 covers a partial block
  reqs[1].hash_ids = {1, 2, 9};
  reqs[2].input_length = 8; // [1 5] is new
  reqs[2].hash_ids = {1, 5};
  reqs[3].input_length = 8; // ids not chained: [7 2] differs from [1 2]
  reqs[3].hash_ids = {7, 2};
  reqs[4].input_length = 3; // no full block
  reqs[4].hash_ids = {8};
  EXPECT_EQ(working_set_blocks(reqs, bt).value(), 6U);
  EXPECT_EQ(working_set_blocks(reqs, 0).value(), 8U); // every id counts
  EXPECT_EQ(working_set_blocks({}, bt).value(), 0U);
}

TEST(workload, working_set_out_of_memory_is_an_error_not_an_exception) {
  // The count's map cannot grow: out_of_memory comes back as a value (it
  // used to escape as std::bad_alloc and end the program).
  std::vector<workload_request> reqs(1);
  reqs[0].input_length = 8;
  reqs[0].hash_ids = {1, 2};
  std::optional<result<std::size_t>> got;
  ASSERT_TRUE(testing::failing_allocation(
      0, [&] { got.emplace(working_set_blocks(reqs, 4)); }));
  ASSERT_TRUE(got.has_value());
  ASSERT_FALSE(got->has_value());
  EXPECT_EQ(got->error().code, errc::out_of_memory);
  EXPECT_NE(got->error().message.find("working set"), std::string::npos)
      << got->error().message;
  EXPECT_EQ(working_set_blocks(reqs, 4).value(), 2U); // heap back: counts
}

/// A stop predicate that says stop from its `stop_at`-th call on, and
/// counts its calls.
struct counting_stop {
  std::size_t stop_at;
  std::size_t calls = 0;
  std::function<bool()> fn() {
    return [this] { return ++calls >= stop_at; };
  }
};

/// The N in "... stopped after N of M requests".
std::size_t stopped_after(const std::string& message) {
  const auto at = message.find("after ");
  if (at == std::string::npos)
    return std::string::npos;
  return std::stoul(message.substr(at + 6));
}

TEST(workload, stop_ends_generation_within_a_few_thousand_requests) {
  // A run of 5,000,000 chat requests spent tens of seconds here deaf to
  // Ctrl-C: nothing asked the stop flag before the replay.
  constexpr std::size_t n = 20'000;
  for (const std::string_view name : workload_names()) {
    SCOPED_TRACE(std::string(name));
    counting_stop stop{3};
    workload_options opts;
    opts.requests = n;
    opts.stop = stop.fn();
    const auto got = generate_workload(name, opts);
    ASSERT_FALSE(got.has_value());
    EXPECT_EQ(got.error().code, errc::unavailable);
    EXPECT_EQ(stop.calls, 3U) << "stops at the first yes";
    const std::size_t made = stopped_after(got.error().message);
    EXPECT_GE(made, 2 * stop_poll_items) << got.error().message;
    // Asked every 4,096 requests (a chat session adds at most 64 more).
    EXPECT_LE(made, 2 * (stop_poll_items + 64)) << got.error().message;
  }
}

TEST(workload, stop_is_asked_before_the_first_request) {
  counting_stop stop{1};
  workload_options opts;
  opts.requests = 10;
  opts.stop = stop.fn();
  const auto got = generate_workload("chat", opts);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::unavailable);
  EXPECT_EQ(got.error().message,
            "workload generation stopped after 0 of 10 requests");
  EXPECT_EQ(stop.calls, 1U);
}

TEST(workload, a_stop_that_never_says_yes_changes_nothing) {
  constexpr std::size_t n = 20'000;
  for (const std::string_view name : workload_names()) {
    SCOPED_TRACE(std::string(name));
    counting_stop stop{std::numeric_limits<std::size_t>::max()};
    workload_options opts;
    opts.requests = n;
    opts.stop = stop.fn();
    const auto got = generate_workload(name, opts);
    ASSERT_TRUE(got.has_value()) << got.error().describe();
    EXPECT_EQ(*got, make(name, n));
    EXPECT_GE(stop.calls, n / (stop_poll_items + 64));
  }
}

TEST(workload, stop_ends_the_working_set_count_within_a_few_thousand_ids) {
  const auto reqs = make("chat", 5'000);
  std::size_t ids = 0;
  for (const auto& r : reqs)
    ids += full_blocks(r, 512);
  ASSERT_GT(ids, 3 * stop_poll_items);

  counting_stop stop{3};
  const auto got = working_set_blocks(reqs, 512, stop.fn());
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::unavailable);
  EXPECT_EQ(stop.calls, 3U);
  // Two polls of 4,096 ids: fewer requests than that, and not all.
  const std::size_t counted = stopped_after(got.error().message);
  EXPECT_LE(counted, 2 * stop_poll_items) << got.error().message;
  EXPECT_LT(counted, reqs.size()) << got.error().message;

  counting_stop never{std::numeric_limits<std::size_t>::max()};
  const auto all = working_set_blocks(reqs, 512, never.fn());
  ASSERT_TRUE(all.has_value());
  EXPECT_EQ(*all, working_set_blocks(reqs, 512).value());
  EXPECT_EQ(never.calls, (ids + stop_poll_items - 1) / stop_poll_items);

  counting_stop at_once{1};
  const auto none = working_set_blocks(reqs, 512, at_once.fn());
  ASSERT_FALSE(none.has_value());
  EXPECT_EQ(none.error().message, "stopped after 0 of 5000 requests");
}

/// Generation and the working set count with a stop predicate that
/// throws stop with errc::unavailable, their messages holding `says`.
void expect_stopped_by_a_throw(const std::function<bool()>& throws,
                               const std::string& says) {
  workload_options o;
  o.requests = 100;
  o.stop = throws;
  const auto gen = generate_workload("chat", o);
  ASSERT_FALSE(gen.has_value());
  EXPECT_EQ(gen.error().code, errc::unavailable);
  EXPECT_NE(gen.error().message.find(says), std::string::npos)
      << gen.error().message;
  const auto count = working_set_blocks(make("chat", 100), 512, throws);
  ASSERT_FALSE(count.has_value());
  EXPECT_EQ(count.error().code, errc::unavailable);
  EXPECT_NE(count.error().message.find(says), std::string::npos)
      << count.error().message;
}

TEST(workload, a_stop_check_that_throws_stops_with_an_error_value) {
  // The stop predicate throws (a flag it cannot read): generation and the
  // working set count stop with errc::unavailable saying what it threw, as
  // read_trace does. (Before, the exception escaped both.)
  expect_stopped_by_a_throw(
      []() -> bool { throw std::runtime_error("the stop flag is gone"); },
      "the stop flag is gone");
}

TEST(workload, a_stop_check_that_throws_a_non_exception_is_an_error_value) {
  // An int thrown from the stop predicate left generate_workload,
  // working_set_blocks and read_trace, which return errors as values.
  const std::function<bool()> throws = []() -> bool { throw 42; };
  expect_stopped_by_a_throw(throws, "not derived from std::exception");
  std::istringstream in(R"({"timestamp": 0, "input_length": 512, )"
                        R"("output_length": 1, "hash_ids": [1]})"
                        "\n");
  trace_options t;
  t.stop = throws;
  trace_report report;
  const auto read = read_trace(in, t, report);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code, errc::unavailable);
}

TEST(workload, block_keys_of_zero_tokens_per_block_are_an_error_value) {
  // It divided by block_tokens: 0 ended the process (SIGFPE).
  const auto r = check_block_keys(0, 10, 0);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, errc::invalid_argument);
  EXPECT_TRUE(check_block_keys(2, 1100, 512).has_value());
  EXPECT_EQ(check_block_keys(3, 1100, 512).error().code,
            errc::misaligned_tokens);
}

} // namespace
} // namespace kvfleet::engine
