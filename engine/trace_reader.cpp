#include "engine/trace_reader.hpp"

#include "engine/stop_poll.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <istream>
#include <limits>
#include <new>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>

namespace kvfleet::engine {

namespace {

using json = nlohmann::json;

constexpr std::size_t max_message_chars = 200;

enum class field : std::uint8_t {
  timestamp,
  input_length,
  output_length,
  hash_ids,
  other
};

constexpr std::array<std::string_view, 4> field_names = {
    "timestamp", "input_length", "output_length", "hash_ids"};

std::string_view type_message(field f) {
  switch (f) {
  case field::timestamp:
    return "timestamp must be a non-negative number below 2^64 (ms)";
  case field::input_length:
    return "input_length must be an integer between 1 and 4294967295";
  case field::output_length:
    return "output_length must be an integer between 0 and 4294967295";
  case field::hash_ids:
  case field::other:
    break;
  }
  return "hash_ids must be an array of non-negative integers";
}

/// At most `max_message_chars` of `text`, "..." marking a cut.
std::string shorten(std::string_view text) {
  if (text.size() <= max_message_chars)
    return std::string(text);
  std::size_t cut = max_message_chars;
  // Never split a UTF-8 sequence: back up over continuation bytes.
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0U) == 0x80U)
    --cut;
  return std::string(text.substr(0, cut)) + "...";
}

/// Length of the well-formed UTF-8 sequence at the start of `s` (1 to 4), or
/// 0 when its first bytes are not one.
std::size_t utf8_sequence_length(std::string_view s) {
  const auto byte = [&](std::size_t i) {
    return static_cast<unsigned char>(s[i]);
  };
  const unsigned char b = byte(0);
  if (b < 0x80U)
    return 1;
  std::size_t n = 0;
  unsigned char lo = 0x80U; // the second byte's range, per RFC 3629
  unsigned char hi = 0xBFU;
  if (b >= 0xC2U && b <= 0xDFU) {
    n = 2;
  } else if (b >= 0xE0U && b <= 0xEFU) {
    n = 3;
    lo = b == 0xE0U ? 0xA0U : 0x80U;
    hi = b == 0xEDU ? 0x9FU : 0xBFU;
  } else if (b >= 0xF0U && b <= 0xF4U) {
    n = 4;
    lo = b == 0xF0U ? 0x90U : 0x80U;
    hi = b == 0xF4U ? 0x8FU : 0xBFU;
  } else {
    return 0;
  }
  if (s.size() < n || byte(1) < lo || byte(1) > hi)
    return 0;
  for (std::size_t i = 2; i < n; ++i)
    if ((byte(i) & 0xC0U) != 0x80U)
      return 0;
  return n;
}

/// `text` with each byte that is not part of well-formed UTF-8 written as
/// "\xNN": nlohmann quotes the bytes it choked on as they are, and a problem
/// text must stay printable (and valid in a JSON log).
std::string escape_ill_formed_utf8(std::string_view text) {
  constexpr std::string_view hex = "0123456789ABCDEF";
  std::string out;
  out.reserve(text.size());
  while (!text.empty()) {
    const std::size_t n = utf8_sequence_length(text);
    if (n == 0) {
      const auto b = static_cast<unsigned char>(text[0]);
      out += "\\x";
      out += hex[b >> 4U];
      out += hex[b & 0xFU];
      text.remove_prefix(1);
    } else {
      out.append(text.substr(0, n));
      text.remove_prefix(n);
    }
  }
  return out;
}

/// "invalid JSON (...)" from a nlohmann exception text such as
/// "[json.exception.parse_error.101] parse error at line 1, column 6: syntax
/// error ...", keeping what a person needs ("column 6: syntax error ...").
std::string json_error_text(std::string_view what) {
  if (what.starts_with("[json.exception."))
    if (const auto end = what.find("] "); end != std::string_view::npos)
      what.remove_prefix(end + 2);
  if (const auto at = what.find("column "); at != std::string_view::npos)
    what.remove_prefix(at);
  return shorten("invalid JSON (" + escape_ill_formed_utf8(what) + ")");
}

/// Turns one line's SAX events into a request, without building a DOM.
/// Every handler returns false to stop the parse at the first problem, whose
/// text is then in `problem`.
class line_parser {
public:
  using number_integer_t = json::number_integer_t;
  using number_unsigned_t = json::number_unsigned_t;
  using number_float_t = json::number_float_t;
  using string_t = json::string_t;
  using binary_t = json::binary_t;

  workload_request request;
  std::string problem;

  /// Checks what the events cannot: required fields and the id count.
  bool finish(std::uint32_t block_tokens) {
    for (std::size_t i = 0; i < field_names.size(); ++i)
      if (!seen_[i])
        return fail("missing field \"" + std::string(field_names[i]) + "\"");
    if (block_tokens != 0) {
      const std::uint64_t want =
          (std::uint64_t{request.input_length} + block_tokens - 1) /
          block_tokens;
      if (request.hash_ids.size() != want)
        return fail("hash_ids has " + std::to_string(request.hash_ids.size()) +
                    " ids, but input_length " +
                    std::to_string(request.input_length) + " needs " +
                    std::to_string(want) + " blocks of " +
                    std::to_string(block_tokens) + " tokens");
    }
    return true;
  }

  bool null() { return other_scalar(); }
  bool boolean(bool /*value*/) { return other_scalar(); }
  bool string(string_t& /*value*/) { return other_scalar(); }
  bool binary(binary_t& /*value*/) { return other_scalar(); }

  bool number_integer(number_integer_t value) {
    if (value >= 0)
      return number_unsigned(static_cast<number_unsigned_t>(value));
    return other_scalar();
  }

  bool number_unsigned(number_unsigned_t value) {
    if (depth_ == 0)
      return not_an_object();
    if (in_ids_) {
      request.hash_ids.push_back(value);
      return true;
    }
    if (depth_ > 1)
      return true;
    constexpr std::uint64_t u32_max = std::numeric_limits<std::uint32_t>::max();
    switch (current_) {
    case field::timestamp:
      request.timestamp_ms = value;
      return true;
    case field::input_length:
      if (value == 0 || value > u32_max)
        return fail(type_message(current_));
      request.input_length = static_cast<std::uint32_t>(value);
      return true;
    case field::output_length:
      if (value > u32_max)
        return fail(type_message(current_));
      request.output_length = static_cast<std::uint32_t>(value);
      return true;
    case field::hash_ids:
      return fail(type_message(current_));
    case field::other:
      break;
    }
    return true;
  }

  bool number_float(number_float_t value, const string_t& /*text*/) {
    if (depth_ == 1 && !in_ids_ && current_ == field::timestamp) {
      // 2^64 is exactly representable; anything below it fits.
      constexpr double limit = 18446744073709551616.0;
      if (!std::isfinite(value) || value < 0.0 || value >= limit)
        return fail(type_message(current_));
      request.timestamp_ms = static_cast<std::uint64_t>(value);
      return true;
    }
    return other_scalar();
  }

  bool start_object(std::size_t /*elements*/) {
    if (depth_ == 0) {
      depth_ = 1;
      return true;
    }
    if (!start_nested())
      return false;
    ++depth_;
    return true;
  }

  bool end_object() {
    --depth_;
    return true;
  }

  bool start_array(std::size_t /*elements*/) {
    if (depth_ == 0)
      return not_an_object();
    if (depth_ == 1 && current_ == field::hash_ids) {
      in_ids_ = true;
      ++depth_;
      return true;
    }
    if (!start_nested())
      return false;
    ++depth_;
    return true;
  }

  bool end_array() {
    if (in_ids_) {
      in_ids_ = false;
      if (request.hash_ids.empty())
        return fail("hash_ids must not be empty");
    }
    --depth_;
    return true;
  }

  bool key(string_t& name) {
    if (depth_ != 1)
      return true;
    current_ = field::other;
    for (std::size_t i = 0; i < field_names.size(); ++i) {
      if (name != field_names[i])
        continue;
      if (seen_[i])
        return fail("field \"" + name + "\" appears more than once");
      seen_[i] = true;
      current_ = static_cast<field>(i);
    }
    return true;
  }

  bool parse_error(std::size_t /*position*/, const std::string& /*last_token*/,
                   const nlohmann::detail::exception& ex) {
    return fail(json_error_text(ex.what()));
  }

private:
  /// A value that is neither a number nor a container.
  bool other_scalar() {
    if (depth_ == 0)
      return not_an_object();
    if (in_ids_)
      return fail(type_message(field::hash_ids));
    if (depth_ == 1 && current_ != field::other)
      return fail(type_message(current_));
    return true;
  }

  /// An object or array below the top level.
  bool start_nested() {
    if (in_ids_)
      return fail(type_message(field::hash_ids));
    if (depth_ == 1 && current_ != field::other)
      return fail(type_message(current_));
    return true;
  }

  bool not_an_object() { return fail("line is not a JSON object"); }

  bool fail(std::string_view text) {
    if (problem.empty())
      problem = shorten(text);
    return false;
  }

  std::size_t depth_ = 0;
  bool in_ids_ = false;
  field current_ = field::other;
  std::array<bool, 4> seen_{};
};

/// The UTF-8 byte order mark: allowed at the start of the file only.
constexpr std::string_view utf8_bom = "\xEF\xBB\xBF";

/// Parses one non-blank line; on failure `problem` says why.
bool parse_line(std::string_view line, std::uint32_t block_tokens,
                workload_request& out, std::string& problem) {
  // nlohmann skips a byte order mark at the start of each input, and each
  // line is an input of its own: without this, a BOM would pass at the
  // start of any line. The file's own BOM was removed before.
  if (line.starts_with(utf8_bom)) {
    problem = "a byte order mark (EF BB BF) is allowed only at the start "
              "of the file";
    return false;
  }
  // nlohmann's lexer takes a NUL byte for the end of its input (a C string's
  // terminator): a line cut short by one would pass, whatever followed it
  // (a NUL-padded file after a crash) silently dropped. JSON has no raw NUL.
  if (const auto nul = line.find('\0'); nul != std::string_view::npos) {
    problem =
        "invalid JSON (column " + std::to_string(nul + 1) + ": a NUL byte)";
    return false;
  }
  line_parser p;
  bool ok = false;
  try {
    ok =
        json::sax_parse(line.begin(), line.end(), &p) && p.finish(block_tokens);
  } catch (const json::exception& e) {
    // The SAX interface reports parse errors through parse_error; this is a
    // safety net for anything else the library throws.
    p.problem = json_error_text(e.what());
  }
  if (!ok) {
    problem = p.problem.empty() ? "invalid JSON" : std::move(p.problem);
    return false;
  }
  out = std::move(p.request);
  return true;
}

enum class line_status { line, too_long, end, stopped };

// A `trace_options::stop` predicate that throws (not bad_alloc) stops the
// read, saying so (stop_asked, stop_poll.hpp).

/// Reads one line without its line break ('\n' or "\r\n"). A line longer
/// than `max_bytes` is consumed but not kept.
/// With `stop_when_too_long` (the reader rejects), a line past the limit is
/// reported as soon as the limit is passed, without reading it to its end:
/// it may have none (`--trace /dev/zero`), and the read stops there anyway.
/// `stop` (when set) is asked after each buffer of a line that goes on.
line_status read_line(std::istream& in, std::size_t max_bytes,
                      std::span<char> buf, std::string& line,
                      bool stop_when_too_long,
                      const std::function<bool()>& stop) {
  line.clear();
  // One byte over the limit is kept for now: it may be the '\r' of a CRLF
  // break, which is not part of the line.
  const std::size_t keep_max =
      max_bytes == std::numeric_limits<std::size_t>::max() ? max_bytes
                                                           : max_bytes + 1;
  bool any = false;
  bool too_long = false;
  for (;;) {
    in.getline(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto got = static_cast<std::size_t>(in.gcount());
    if (in.bad())
      return line_status::end;
    bool done = true;
    std::size_t keep = got;
    if (in.eof()) {
      if (got == 0 && !any)
        return line_status::end;
    } else if (in.fail()) { // buffer full before the line ended
      in.clear();
      done = false;
      if (stop_asked(stop))
        return line_status::stopped;
    } else {
      keep = got - 1; // the '\n' was counted but not stored
    }
    any = true;
    if (!too_long) {
      if (line.size() + keep > keep_max) {
        too_long = true;
        line.clear();
        line.shrink_to_fit();
        if (stop_when_too_long)
          return line_status::too_long;
      } else {
        line.append(buf.data(), keep);
      }
    }
    if (done) {
      if (too_long)
        return line_status::too_long;
      if (!line.empty() && line.back() == '\r')
        line.pop_back();
      if (line.size() > max_bytes) {
        line.clear();
        return line_status::too_long;
      }
      return line_status::line;
    }
  }
}

bool is_blank(std::string_view line) {
  return line.find_first_not_of(" \t\r\n\f\v") == std::string_view::npos;
}

std::string describe_errno(int err) {
  return err == 0 ? std::string("unknown error")
                  : std::error_code(err, std::generic_category()).message();
}

} // namespace

result<std::vector<workload_request>>
read_trace(std::istream& in, const trace_options& opts, trace_report& report) {
  report = trace_report{};
  try {
    std::vector<workload_request> out;
    std::vector<char> buf(std::size_t{64} << 10);
    std::string line;
    std::string problem;
    std::uint64_t last_timestamp = 0;
    for (;;) {
      line_status status = line_status::end;
      try {
        if (stop_asked(opts.stop))
          status = line_status::stopped;
        else
          status =
              read_line(in, opts.max_line_bytes, buf, line,
                        opts.on_bad_line == bad_line_action::reject, opts.stop);
        // A read blocked on a pipe with no data sees the stop only when the
        // writer closes: that end is the stop's, not the trace's.
        if (status == line_status::end && stop_asked(opts.stop))
          status = line_status::stopped;
      } catch (const std::bad_alloc&) {
        throw;
      } catch (const stop_check_failed& e) {
        return make_error(errc::unavailable,
                          "read stopped after line " +
                              std::to_string(report.lines) +
                              ": the stop check failed: " + e.what());
      } catch (const std::exception& e) {
        // A stream with exceptions enabled throws instead of setting badbit
        // (rethrowing what its buffer threw), or on failbit or eofbit,
        // which the reader relies on to read lines.
        return make_error(errc::io_error, "read error after line " +
                                              std::to_string(report.lines) +
                                              ": " + e.what());
      }
      if (status == line_status::end)
        break;
      if (status == line_status::stopped)
        return make_error(errc::unavailable, "read stopped after line " +
                                                 std::to_string(report.lines));
      ++report.lines;
      if (report.lines == 1 && line.starts_with(utf8_bom))
        line.erase(0, utf8_bom.size());
      workload_request req;
      if (status == line_status::too_long) {
        problem = "line longer than " + std::to_string(opts.max_line_bytes) +
                  " bytes";
      } else if (is_blank(line)) {
        ++report.blank;
        continue;
      } else if (parse_line(line, opts.block_tokens, req, problem)) {
        if (report.accepted > 0 && req.timestamp_ms < last_timestamp)
          ++report.out_of_order;
        last_timestamp = req.timestamp_ms;
        ++report.accepted;
        out.push_back(std::move(req));
        continue;
      }
      std::string text =
          "line " + std::to_string(report.lines) + ": " + problem;
      if (report.problems.size() < opts.max_reported)
        report.problems.push_back(text);
      if (opts.on_bad_line == bad_line_action::reject)
        return make_error(errc::parse_error, std::move(text));
      ++report.skipped;
    }
    if (in.bad())
      return make_error(errc::io_error, "read error after line " +
                                            std::to_string(report.lines));
    std::stable_sort(out.begin(), out.end(),
                     [](const workload_request& a, const workload_request& b) {
                       return a.timestamp_ms < b.timestamp_ms;
                     });
    return out;
  } catch (const std::bad_alloc&) {
    return make_error(errc::out_of_memory, "not enough memory after line " +
                                               std::to_string(report.lines));
  }
}

result<std::vector<workload_request>> read_trace_file(const std::string& path,
                                                      const trace_options& opts,
                                                      trace_report& report) {
  report = trace_report{};
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    return make_error(errc::io_error,
                      "cannot read trace file '" + path + "': is a directory");
  errno = 0;
  std::ifstream file(path, std::ios::binary);
  if (!file)
    return make_error(errc::io_error, "cannot open trace file '" + path +
                                          "': " + describe_errno(errno));
  auto got = read_trace(file, opts, report);
  if (!got)
    return make_error(got.error().code,
                      "trace file '" + path + "': " + got.error().message);
  return got;
}

} // namespace kvfleet::engine
