#pragma once
/// Reads request traces in the Mooncake JSONL format.
///
/// One JSON object per line:
/// `{"timestamp": 0, "input_length": 6955, "output_length": 52,
///   "hash_ids": [46, 47, 48]}`.
/// All four fields are required; other fields are ignored, and so are blank
/// (whitespace-only) lines. `timestamp` is in milliseconds: an integer or
/// a finite number in [0, 2^64), whose fraction is dropped.
/// `input_length` is an integer in [1, 2^32 - 1], `output_length` one in
/// [0, 2^32 - 1], `hash_ids` a non-empty array of integers in [0, 2^64 - 1].
/// When `trace_options::block_tokens` is set, `hash_ids` must also hold
/// exactly ceil(input_length / block_tokens) ids. A field given twice and a
/// line longer than `max_line_bytes` are malformed too, and so is a line
/// that starts with a UTF-8 byte order mark (EF BB BF), except the file's
/// first line: one there is dropped. `session` of every request read is 0.
///
/// Timestamps may go backwards: such lines are accepted and counted in
/// `trace_report::out_of_order`, and the requests are returned sorted stably
/// by timestamp (equal timestamps keep their file order).
///
/// Thread safety: free functions; a stream or report must not be shared
/// between concurrent calls.

#include "engine/result.hpp"
#include "engine/workload.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <string>
#include <vector>

namespace kvfleet::engine {

/// What to do with a malformed line.
enum class bad_line_action {
  skip,  ///< count it in `trace_report::skipped` and go on
  reject ///< stop: the read fails with `errc::parse_error`
};

/// Options of `read_trace`.
struct trace_options {
  bad_line_action on_bad_line = bad_line_action::reject;
  /// Most problems kept in `trace_report::problems`; later ones are only
  /// counted.
  std::size_t max_reported = 20;
  /// Longest accepted line in bytes, without its line break ("\n" or
  /// "\r\n"). Rejecting, the read stops as soon as a line passes it (a
  /// line with no end, as from /dev/zero, fails at once); skipping, the
  /// line is read to its end to find the next one.
  std::size_t max_line_bytes = std::size_t{16} << 20;
  /// Tokens per block the trace was made with (Mooncake: 512); when not 0,
  /// a line whose id count is not ceil(input_length / block_tokens) is
  /// malformed. 0 skips the check.
  std::uint32_t block_tokens = 0;
  /// Asked before each line, after each 64 KiB of a long line and at the
  /// end of the input; true stops the read with `errc::unavailable` (e.g. a
  /// signal handler's flag, so an endless or huge input can be
  /// interrupted). A read blocked on its stream (a pipe with no data) sees
  /// it once the stream answers, data or end: a stop seen at the end is
  /// still a stop, not an empty trace. One that throws stops it too, with
  /// the text of a std::exception (bad_alloc: out_of_memory). Empty: never
  /// stops.
  std::function<bool()> stop;
};

/// What a read saw. Filled in also when the read fails.
struct trace_report {
  std::size_t lines = 0;        ///< lines read, blank ones included
  std::size_t blank = 0;        ///< whitespace-only lines
  std::size_t accepted = 0;     ///< requests returned
  std::size_t skipped = 0;      ///< malformed lines skipped
  std::size_t out_of_order = 0; ///< accepted lines earlier than the previous
  /// "line 17: hash_ids must be an array of non-negative integers", in file
  /// order, at most `trace_options::max_reported` of them. Well-formed
  /// UTF-8: a quoted input byte that is not is written as "\xFF".
  std::vector<std::string> problems;
};

/// Reads a trace from `in`. `report` is reset first.
/// Errors: `errc::parse_error` naming the line ("line 17: ...") for the first
/// malformed line under `bad_line_action::reject`; `errc::io_error` when the
/// stream fails (sets badbit, or throws: a stream with exceptions enabled
/// for failbit or eofbit, on which lines are read, fails at its first long
/// line or at its end); `errc::out_of_memory` when allocation fails;
/// `errc::unavailable` when `trace_options::stop` said so.
[[nodiscard]] result<std::vector<workload_request>>
read_trace(std::istream& in, const trace_options& opts, trace_report& report);

/// Reads the trace file at `path`, like `read_trace`; error messages start
/// with the path. A missing or unreadable file is `errc::io_error`.
[[nodiscard]] result<std::vector<workload_request>>
read_trace_file(const std::string& path, const trace_options& opts,
                trace_report& report);

} // namespace kvfleet::engine
