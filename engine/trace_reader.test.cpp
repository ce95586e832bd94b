#include "engine/trace_reader.hpp"

#include "engine/testing/temp_dir.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <streambuf>
#include <string>
#include <vector>

namespace kvfleet::engine {
namespace {

struct read_outcome {
  result<std::vector<workload_request>> got;
  trace_report report;
};

read_outcome read(const std::string& text,
                  bad_line_action action = bad_line_action::reject,
                  trace_options opts = {}) {
  std::istringstream in(text);
  opts.on_bad_line = action;
  trace_report report;
  auto got = read_trace(in, opts, report);
  return {std::move(got), std::move(report)};
}

workload_request request(std::uint64_t ts, std::uint32_t in, std::uint32_t out,
                         std::vector<std::uint64_t> ids) {
  workload_request r;
  r.timestamp_ms = ts;
  r.input_length = in;
  r.output_length = out;
  r.hash_ids = std::move(ids);
  return r;
}

TEST(trace_reader, reads_good_lines) {
  const auto [got, report] = read(
      R"({"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48]})"
      "\n"
      R"({"timestamp": 27482, "input_length": 1, "output_length": 0, "hash_ids": [18446744073709551615]})"
      "\n");
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  ASSERT_EQ(got->size(), 2U);
  EXPECT_EQ((*got)[0], request(0, 6955, 52, {46, 47, 48}));
  EXPECT_EQ((*got)[1], request(27482, 1, 0, {18446744073709551615ULL}));
  EXPECT_EQ(report.lines, 2U);
  EXPECT_EQ(report.accepted, 2U);
  EXPECT_EQ(report.skipped, 0U);
  EXPECT_TRUE(report.problems.empty());
}

TEST(trace_reader, ignores_blank_lines_and_extra_fields) {
  const std::string text =
      "\n"
      "   \t\r\n"
      R"({"hash_ids": [1, 2], "extra": {"hash_ids": "nested", "x": [[-1], null]}, "input_length": 700, "timestamp": 5, "output_length": 3, "tag": "a"})"
      "\r\n"
      "\n"
      // Last line without a line break.
      R"({"timestamp": 6.9, "input_length": 10, "output_length": 1, "hash_ids": [3], "flag": true})";
  const auto [got, report] = read(text);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  ASSERT_EQ(got->size(), 2U);
  EXPECT_EQ((*got)[0], request(5, 700, 3, {1, 2}));
  EXPECT_EQ((*got)[1], request(6, 10, 1, {3})); // fraction of a ms dropped
  EXPECT_EQ(report.lines, 5U);
  EXPECT_EQ(report.blank, 3U);
  EXPECT_EQ(report.accepted, 2U);
}

TEST(trace_reader, empty_input_is_an_empty_trace) {
  const auto [got, report] = read("");
  ASSERT_TRUE(got.has_value());
  EXPECT_TRUE(got->empty());
  EXPECT_EQ(report.lines, 0U);
}

TEST(trace_reader, sorts_backward_timestamps_stably) {
  const auto [got, report] = read(
      R"({"timestamp": 10, "input_length": 1, "output_length": 1, "hash_ids": [1]})"
      "\n"
      R"({"timestamp": 5, "input_length": 1, "output_length": 1, "hash_ids": [2]})"
      "\n"
      R"({"timestamp": 10, "input_length": 1, "output_length": 1, "hash_ids": [3]})"
      "\n"
      R"({"timestamp": 5, "input_length": 1, "output_length": 1, "hash_ids": [4]})"
      "\n");
  ASSERT_TRUE(got.has_value());
  ASSERT_EQ(got->size(), 4U);
  EXPECT_EQ((*got)[0].hash_ids[0], 2U);
  EXPECT_EQ((*got)[1].hash_ids[0], 4U);
  EXPECT_EQ((*got)[2].hash_ids[0], 1U);
  EXPECT_EQ((*got)[3].hash_ids[0], 3U);
  EXPECT_EQ(report.out_of_order, 2U);
  EXPECT_TRUE(report.problems.empty());
}

TEST(trace_reader, reads_lines_longer_than_its_buffer) {
  std::string ids;
  for (int i = 0; i < 30'000; ++i)
    ids += (i ? ", " : "") + std::to_string(i);
  const std::string line = R"({"timestamp": 1, "input_length": 15360000, )"
                           R"("output_length": 1, "hash_ids": [)" +
                           ids + "]}";
  ASSERT_GT(line.size(), 128U * 1024U);
  trace_options opts;
  opts.block_tokens = 512;
  const auto [got, report] =
      read(line + "\n" + line, bad_line_action::reject, opts);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  ASSERT_EQ(got->size(), 2U);
  EXPECT_EQ((*got)[1].hash_ids.size(), 30'000U);
  EXPECT_EQ((*got)[1].hash_ids.back(), 29'999U);
}

// Each malformed line, the text its problem must contain.
struct bad_case {
  std::string line;
  std::string problem;
};

const std::vector<bad_case>& bad_cases() {
  static const std::vector<bad_case> cases = {
      {R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1])",
       "invalid JSON"},
      {R"(not json)", "invalid JSON"},
      {R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]} x)",
       "invalid JSON"},
      {R"([1, 2])", "line is not a JSON object"},
      {R"(42)", "line is not a JSON object"},
      {R"({"input_length": 1, "output_length": 1, "hash_ids": [1]})",
       "missing field \"timestamp\""},
      {R"({"timestamp": 0, "output_length": 1, "hash_ids": [1]})",
       "missing field \"input_length\""},
      {R"({"timestamp": 0, "input_length": 1, "hash_ids": [1]})",
       "missing field \"output_length\""},
      {R"({"timestamp": 0, "input_length": 1, "output_length": 1})",
       "missing field \"hash_ids\""},
      {R"({"timestamp": "0", "input_length": 1, "output_length": 1, "hash_ids": [1]})",
       "timestamp must be a non-negative number"},
      {R"({"timestamp": -1, "input_length": 1, "output_length": 1, "hash_ids": [1]})",
       "timestamp must be a non-negative number"},
      {R"({"timestamp": -0.5, "input_length": 1, "output_length": 1, "hash_ids": [1]})",
       "timestamp must be a non-negative number"},
      // Non-negative and finite, but past what a uint64 of milliseconds
      // holds: the message says which bound it broke.
      {R"({"timestamp": 1e300, "input_length": 1, "output_length": 1, "hash_ids": [1]})",
       "timestamp must be a non-negative number below 2^64"},
      {R"({"timestamp": 18446744073709551616, "input_length": 1, "output_length": 1, "hash_ids": [1]})",
       "timestamp must be a non-negative number below 2^64"},
      {R"({"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": [1]})",
       "input_length must be an integer between 1 and 4294967295"},
      {R"({"timestamp": 0, "input_length": -5, "output_length": 1, "hash_ids": [1]})",
       "input_length must be an integer between 1 and 4294967295"},
      {R"({"timestamp": 0, "input_length": 1.5, "output_length": 1, "hash_ids": [1]})",
       "input_length must be an integer between 1 and 4294967295"},
      {R"({"timestamp": 0, "input_length": 4294967296, "output_length": 1, "hash_ids": [1]})",
       "input_length must be an integer between 1 and 4294967295"},
      {R"({"timestamp": 0, "input_length": 1, "output_length": -1, "hash_ids": [1]})",
       "output_length must be an integer between 0 and 4294967295"},
      {R"({"timestamp": 0, "input_length": 1, "output_length": null, "hash_ids": [1]})",
       "output_length must be an integer between 0 and 4294967295"},
      {R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": 1})",
       "hash_ids must be an array of non-negative integers"},
      {R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1, -2]})",
       "hash_ids must be an array of non-negative integers"},
      {R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": ["1"]})",
       "hash_ids must be an array of non-negative integers"},
      {R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [[1]]})",
       "hash_ids must be an array of non-negative integers"},
      {R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1.0]})",
       "hash_ids must be an array of non-negative integers"},
      {R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": []})",
       "hash_ids must not be empty"},
      {R"({"timestamp": 0, "timestamp": 1, "input_length": 1, "output_length": 1, "hash_ids": [1]})",
       "field \"timestamp\" appears more than once"},
      // A NUL byte ends nlohmann's input: what follows it must not be
      // dropped unseen.
      {std::string(
           R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]})") +
           '\0' + R"({"timestamp": 1})",
       "invalid JSON (column 73: a NUL byte)"},
  };
  return cases;
}

const std::string good_line =
    R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]})";

TEST(trace_reader, rejects_each_malformed_line_naming_it) {
  for (const auto& c : bad_cases()) {
    SCOPED_TRACE(c.line);
    // Good line, blank line, then the bad one: line 3.
    std::string text = good_line;
    text += "\n\n";
    text += c.line;
    text += "\n";
    text += good_line;
    text += "\n";
    const auto [got, report] = read(text);
    ASSERT_FALSE(got.has_value());
    EXPECT_EQ(got.error().code, errc::parse_error);
    EXPECT_EQ(got.error().message.rfind("line 3: " + c.problem, 0), 0U)
        << got.error().message;
    EXPECT_EQ(report.lines, 3U);
    EXPECT_EQ(report.accepted, 1U);
    ASSERT_EQ(report.problems.size(), 1U);
    EXPECT_EQ(report.problems[0], got.error().message);
  }
}

TEST(trace_reader, skips_malformed_lines_reporting_each) {
  // Line 2k+1 is good, line 2k+2 is bad case k.
  std::string text;
  const auto& cases = bad_cases();
  for (const auto& c : cases)
    text += good_line + "\n" + c.line + "\n";
  trace_options opts;
  opts.max_reported = 1000;
  const auto [got, report] = read(text, bad_line_action::skip, opts);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  EXPECT_EQ(got->size(), cases.size());
  EXPECT_EQ(report.lines, 2 * cases.size());
  EXPECT_EQ(report.accepted, cases.size());
  EXPECT_EQ(report.skipped, cases.size());
  ASSERT_EQ(report.problems.size(), cases.size());
  for (std::size_t k = 0; k < cases.size(); ++k) {
    const std::string want =
        "line " + std::to_string(2 * k + 2) + ": " + cases[k].problem;
    EXPECT_EQ(report.problems[k].rfind(want, 0), 0U)
        << report.problems[k] << " vs " << want;
  }
}

TEST(trace_reader, keeps_at_most_max_reported_problems) {
  std::string text;
  for (int i = 0; i < 10; ++i)
    text += "{\n";
  trace_options opts;
  opts.max_reported = 3;
  const auto [got, report] = read(text, bad_line_action::skip, opts);
  ASSERT_TRUE(got.has_value());
  EXPECT_TRUE(got->empty());
  EXPECT_EQ(report.skipped, 10U);
  ASSERT_EQ(report.problems.size(), 3U);
  EXPECT_EQ(report.problems[2].rfind("line 3: invalid JSON", 0), 0U);
}

TEST(trace_reader, rejects_too_long_lines) {
  trace_options opts;
  opts.max_line_bytes = good_line.size();
  const std::string longer =
      R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [12]})";
  const std::string text = good_line + "\n" + longer + "\n" + good_line + "\n";

  const auto rejected = read(text, bad_line_action::reject, opts);
  ASSERT_FALSE(rejected.got.has_value());
  EXPECT_EQ(rejected.got.error().code, errc::parse_error);
  EXPECT_EQ(rejected.got.error().message, "line 2: line longer than " +
                                              std::to_string(good_line.size()) +
                                              " bytes");

  const auto skipped = read(text, bad_line_action::skip, opts);
  ASSERT_TRUE(skipped.got.has_value());
  EXPECT_EQ(skipped.got->size(), 2U);
  EXPECT_EQ(skipped.report.lines, 3U);
  EXPECT_EQ(skipped.report.skipped, 1U);
}

/// A line of 'x' with no end in sight: `size` bytes, then end of input.
/// Counts how many bytes the reader took.
class endless_line_buf : public std::streambuf {
public:
  explicit endless_line_buf(std::size_t size) : left_(size) {}
  [[nodiscard]] std::size_t taken() const { return taken_; }

protected:
  int_type underflow() override {
    if (left_ == 0)
      return traits_type::eof();
    const std::size_t n = std::min(left_, chunk_.size());
    left_ -= n;
    taken_ += n;
    setg(chunk_.data(), chunk_.data(), chunk_.data() + n);
    return traits_type::to_int_type(chunk_[0]);
  }

private:
  std::string chunk_ = std::string(4096, 'x');
  std::size_t left_;
  std::size_t taken_ = 0;
};

TEST(trace_reader,
     rejecting_a_line_past_the_limit_does_not_read_it_to_its_end) {
  // `--trace /dev/zero` is one line without an end: rejecting it must not
  // wait for one. 64 MiB stands in for "endless"; the limit is 1 KiB.
  trace_options opts;
  opts.max_line_bytes = 1024;
  opts.on_bad_line = bad_line_action::reject;
  endless_line_buf buf(std::size_t{64} << 20);
  std::istream in(&buf);
  trace_report report;
  const auto got = read_trace(in, opts, report);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::parse_error);
  EXPECT_EQ(got.error().message, "line 1: line longer than 1024 bytes");
  EXPECT_LT(buf.taken(), std::size_t{1} << 20);
}

TEST(trace_reader, problems_name_ill_formed_utf8_bytes_in_hex) {
  // nlohmann quotes the bytes it stopped at; a problem text must still be
  // well-formed UTF-8, so they are written as \xNN, while a well-formed
  // character (U+00E9, bytes C3 A9) is kept.
  const std::string line =
      R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1], "x": ")"
      "\xc3\xa9\xff\xfe\"}";
  const auto [got, report] = read(line + "\n");
  ASSERT_FALSE(got.has_value());
  const std::string& message = got.error().message;
  EXPECT_EQ(message.rfind("line 1: invalid JSON (column ", 0), 0U) << message;
  EXPECT_NE(message.find("\"\xc3\xa9\\xFF"), std::string::npos) << message;
  for (std::size_t i = 0; i < message.size(); ++i) {
    const auto b = static_cast<unsigned char>(message[i]);
    if (b < 0x80U)
      continue;
    // The only bytes above 0x7F: the one well-formed sequence.
    EXPECT_EQ(b, 0xC3U) << message;
    ASSERT_LT(i + 1, message.size());
    EXPECT_EQ(static_cast<unsigned char>(message[i + 1]), 0xA9U) << message;
    ++i;
  }
}

TEST(trace_reader, line_limit_leaves_out_a_crlf_break) {
  // The limit counts a line without its line break, "\r\n" as well as "\n".
  trace_options opts;
  opts.max_line_bytes = good_line.size();
  const auto crlf = read(good_line + "\r\n" + good_line + "\r\n" + good_line,
                         bad_line_action::reject, opts);
  ASSERT_TRUE(crlf.got.has_value()) << crlf.got.error().describe();
  EXPECT_EQ(crlf.got->size(), 3U);

  // One byte more than the limit is still too long, with either break.
  const std::string longer =
      R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [12]})";
  ASSERT_EQ(longer.size(), good_line.size() + 1);
  for (const char* end : {"\r\n", "\n", ""}) {
    SCOPED_TRACE(end);
    std::string text = good_line;
    text += "\r\n";
    text += longer;
    text += end;
    const auto got = read(text, bad_line_action::skip, opts);
    ASSERT_TRUE(got.got.has_value());
    EXPECT_EQ(got.got->size(), 1U);
    ASSERT_EQ(got.report.problems.size(), 1U);
    EXPECT_EQ(got.report.problems[0], "line 2: line longer than " +
                                          std::to_string(good_line.size()) +
                                          " bytes");
  }
  // A '\r' that is not the line's last byte counts.
  const auto inner = read(good_line + "\r \n", bad_line_action::skip, opts);
  ASSERT_TRUE(inner.got.has_value());
  EXPECT_EQ(inner.report.skipped, 1U);
}

/// Hands out `data`, then fails as a broken device does: by throwing.
class failing_buf : public std::streambuf {
public:
  explicit failing_buf(std::string data) : data_(std::move(data)) {
    setg(data_.data(), data_.data(), data_.data() + data_.size());
  }

protected:
  int_type underflow() override { throw std::runtime_error("device gone"); }

private:
  std::string data_;
};

TEST(trace_reader, a_failing_stream_is_an_io_error_even_if_it_throws) {
  // Without exceptions the stream sets badbit; with badbit exceptions on it
  // rethrows its buffer's exception, which must not escape the reader.
  for (const bool throws : {false, true}) {
    SCOPED_TRACE(throws);
    failing_buf buf(good_line + "\n");
    std::istream in(&buf);
    if (throws)
      in.exceptions(std::ios::badbit);
    trace_report report;
    std::optional<result<std::vector<workload_request>>> got;
    EXPECT_NO_THROW(got.emplace(read_trace(in, {}, report)));
    ASSERT_TRUE(got.has_value());
    ASSERT_FALSE(got->has_value());
    EXPECT_EQ(got->error().code, errc::io_error);
    EXPECT_EQ(got->error().message.rfind("read error after line 1", 0), 0U)
        << got->error().message;
    if (throws) {
      EXPECT_NE(got->error().message.find("device gone"), std::string::npos)
          << got->error().message;
    }
    EXPECT_EQ(report.accepted, 1U);
  }
}

/// A stream of 'x' with no end and no line break (like /dev/zero).
class endless_buf : public std::streambuf {
public:
  endless_buf() { setg(chunk_.data(), chunk_.data(), chunk_.data()); }

private:
  int_type underflow() override {
    std::fill(chunk_.begin(), chunk_.end(), 'x');
    setg(chunk_.data(), chunk_.data(), chunk_.data() + chunk_.size());
    return traits_type::to_int_type(chunk_[0]);
  }
  std::array<char, 4096> chunk_{};
};

TEST(trace_reader, stop_ends_the_read_between_lines) {
  std::string text;
  for (int i = 0; i < 5; ++i)
    text += good_line + "\n";
  trace_options opts;
  int asked = 0;
  opts.stop = [&asked] { return ++asked > 2; };
  const auto [got, report] = read(text, bad_line_action::reject, opts);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::unavailable);
  EXPECT_EQ(got.error().message, "read stopped after line 2");
  EXPECT_EQ(report.lines, 2U);
  EXPECT_EQ(report.accepted, 2U);
}

TEST(trace_reader, stop_ends_a_line_that_never_ends) {
  // Skipping, a too-long line is read to its end; this one has none, so
  // only `stop` can end the read.
  endless_buf buf;
  std::istream in(&buf);
  trace_options opts;
  opts.on_bad_line = bad_line_action::skip;
  opts.max_line_bytes = 100;
  int asked = 0;
  opts.stop = [&asked] { return ++asked > 50; };
  trace_report report;
  const auto got = read_trace(in, opts, report);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::unavailable);
  EXPECT_EQ(asked, 51);
  EXPECT_EQ(report.lines, 0U);
}

/// A pipe whose writer sends nothing and closes once the reader was told
/// to stop (as a signal handler would, while the read is blocked).
class stopped_while_blocked_buf : public std::streambuf {
public:
  explicit stopped_while_blocked_buf(bool& stop) : stop_(&stop) {}

private:
  int_type underflow() override {
    *stop_ = true;
    return traits_type::eof();
  }
  bool* stop_;
};

TEST(trace_reader, a_stop_while_blocked_on_an_empty_pipe_is_a_stop) {
  // The read only ended when the writer closed; it then returned an empty
  // trace, and the bench said "has no requests" to a SIGTERM.
  bool stop = false;
  stopped_while_blocked_buf buf(stop);
  std::istream in(&buf);
  trace_options opts;
  opts.stop = [&stop] { return stop; };
  trace_report report;
  const auto got = read_trace(in, opts, report);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::unavailable);
  EXPECT_EQ(got.error().message, "read stopped after line 0");
  EXPECT_EQ(report.lines, 0U);
}

TEST(trace_reader, a_stop_at_the_end_of_the_input_is_a_stop) {
  std::istringstream in(good_line + "\n");
  trace_options opts;
  int asked = 0;
  opts.stop = [&asked] { return ++asked > 2; }; // line 1, then its end
  trace_report report;
  const auto got = read_trace(in, opts, report);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().message, "read stopped after line 1");
  EXPECT_EQ(asked, 3);
}

TEST(trace_reader, a_stop_check_that_throws_stops_the_read_saying_so) {
  // Wherever it is asked (before a line, within a long line, at the end of
  // the input) a stop check that throws stops the read with its text.
  // (Before, at the end it escaped read_trace, and elsewhere it read as an
  // I/O error of the stream.)
  struct at_call {
    const char* where;
    std::string input;
    int throw_at;
  };
  const std::string long_line(200 << 10, 'x');
  for (const auto& c : {at_call{"before a line", good_line + "\n", 1},
                        at_call{"within a line", long_line + "\n", 2},
                        at_call{"at the end", good_line + "\n", 3}}) {
    SCOPED_TRACE(c.where);
    std::istringstream in(c.input);
    trace_options opts;
    int asked = 0;
    opts.stop = [&asked, &c]() -> bool {
      if (++asked == c.throw_at)
        throw std::runtime_error("flag unreadable");
      return false;
    };
    trace_report report;
    const auto got = read_trace(in, opts, report);
    ASSERT_FALSE(got.has_value());
    EXPECT_EQ(got.error().code, errc::unavailable);
    EXPECT_NE(got.error().message.find("the stop check failed: flag "
                                       "unreadable"),
              std::string::npos)
        << got.error().message;
  }
}

TEST(trace_reader, a_byte_order_mark_is_allowed_at_the_start_of_the_file) {
  const std::string bom = "\xEF\xBB\xBF";
  auto o = read(bom + good_line + "\n" + good_line + "\n");
  ASSERT_TRUE(o.got.has_value()) << o.got.error().describe();
  EXPECT_EQ(o.got->size(), 2U);
  // A BOM alone on the first line leaves a blank line.
  o = read(bom + "\n" + good_line + "\n");
  ASSERT_TRUE(o.got.has_value()) << o.got.error().describe();
  EXPECT_EQ(o.got->size(), 1U);
  EXPECT_EQ(o.report.blank, 1U);
}

TEST(trace_reader, a_byte_order_mark_elsewhere_is_a_bad_line) {
  // nlohmann skips a BOM at the start of each input, and each line was
  // parsed as one: a BOM at the start of line 2 passed, 2 requests read.
  const std::string bom = "\xEF\xBB\xBF";
  const std::string why =
      "a byte order mark (EF BB BF) is allowed only at the start of the file";
  auto o = read(good_line + "\n" + bom + good_line + "\n");
  ASSERT_FALSE(o.got.has_value());
  EXPECT_EQ(o.got.error().code, errc::parse_error);
  EXPECT_EQ(o.got.error().message, "line 2: " + why);

  o = read(good_line + "\n" + bom + good_line + "\n" + good_line + "\n",
           bad_line_action::skip);
  ASSERT_TRUE(o.got.has_value()) << o.got.error().describe();
  EXPECT_EQ(o.got->size(), 2U);
  EXPECT_EQ(o.report.skipped, 1U);
  ASSERT_EQ(o.report.problems.size(), 1U);
  EXPECT_EQ(o.report.problems[0], "line 2: " + why);

  // Two at the start of the file: the second is not the file's.
  o = read(bom + bom + good_line + "\n");
  ASSERT_FALSE(o.got.has_value());
  EXPECT_EQ(o.got.error().message, "line 1: " + why);
}

TEST(trace_reader, checks_id_count_when_block_size_is_given) {
  trace_options opts;
  opts.block_tokens = 512;
  const std::string ok =
      R"({"timestamp": 0, "input_length": 513, "output_length": 1, "hash_ids": [1, 2]})";
  const std::string bad =
      R"({"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [1, 2]})";
  const auto [got, report] =
      read(ok + "\n" + bad + "\n", bad_line_action::skip, opts);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->size(), 1U);
  ASSERT_EQ(report.problems.size(), 1U);
  EXPECT_EQ(report.problems[0],
            "line 2: hash_ids has 2 ids, but input_length 512 needs 1 blocks "
            "of 512 tokens");
  // Without a block size the count is not checked.
  EXPECT_EQ(read(ok + "\n" + bad + "\n").got->size(), 2U);
}

TEST(trace_reader, round_trips_a_generated_workload) {
  auto made = generate_workload("chat", {128, 3, 200, {}});
  ASSERT_TRUE(made.has_value());
  std::string text;
  for (auto& r : *made) {
    text += R"({"timestamp": )" + std::to_string(r.timestamp_ms) +
            R"(, "input_length": )" + std::to_string(r.input_length) +
            R"(, "output_length": )" + std::to_string(r.output_length) +
            R"(, "hash_ids": [)";
    for (std::size_t i = 0; i < r.hash_ids.size(); ++i)
      text += (i ? "," : "") + std::to_string(r.hash_ids[i]);
    text += "]}\n";
    r.session = 0; // traces carry no session
  }
  trace_options opts;
  opts.block_tokens = 128;
  const auto [got, report] = read(text, bad_line_action::reject, opts);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  EXPECT_EQ(*got, *made);
}

class trace_file : public ::testing::Test {
protected:
  void SetUp() override { ASSERT_TRUE(dir_.ok()) << "mkdtemp failed"; }
  /// Writes `text` to a file `name` in this test's own directory.
  std::string write(const std::string& name, const std::string& text) {
    std::string path = dir_.file(name);
    std::ofstream f(path, std::ios::binary);
    f << text;
    f.close();
    EXPECT_TRUE(f.good()) << "cannot write " << path;
    return path;
  }
  /// A path in this test's directory that no file has.
  std::string missing(const std::string& name) const { return dir_.file(name); }

private:
  testing::temp_dir dir_{"kvfleet_trace_"};
};

TEST_F(trace_file, reads_a_file) {
  const auto path = write("good.jsonl", good_line + "\n" + good_line + "\n");
  trace_report report;
  const auto got = read_trace_file(path, {}, report);
  ASSERT_TRUE(got.has_value()) << got.error().describe();
  EXPECT_EQ(got->size(), 2U);
  EXPECT_EQ(report.accepted, 2U);
}

TEST_F(trace_file, bad_line_error_names_file_and_line) {
  const auto path = write("bad.jsonl", good_line + "\n{\n");
  trace_report report;
  const auto got = read_trace_file(path, {}, report);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::parse_error);
  EXPECT_NE(got.error().message.find(path), std::string::npos);
  EXPECT_NE(got.error().message.find("line 2: invalid JSON"), std::string::npos)
      << got.error().message;
}

TEST_F(trace_file, missing_file_is_an_io_error_naming_the_path) {
  const std::string path = missing("no_such_trace.jsonl");
  trace_report report;
  const auto got = read_trace_file(path, {}, report);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::io_error);
  EXPECT_NE(got.error().message.find(path), std::string::npos)
      << got.error().message;
}

TEST_F(trace_file, directory_is_an_io_error) {
  trace_report report;
  const auto got = read_trace_file(::testing::TempDir(), {}, report);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code, errc::io_error);
}

} // namespace
} // namespace kvfleet::engine
