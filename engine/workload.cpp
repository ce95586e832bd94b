#include "engine/workload.hpp"

#include "engine/internal/le.hpp"
#include "engine/stop_poll.hpp"

#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <new>
#include <numbers>
#include <random>
#include <string>
#include <unordered_map>

namespace kvfleet::engine {

namespace {

// The shape parameters below are documented in workload.hpp; keep the two in
// step.

constexpr std::array<std::string_view, 4> names = {"chat", "shared-prefix",
                                                   "doc-qa", "no-reuse"};

// Ids are kept below 2^63 so that they survive tools that read JSON integers
// as signed 64-bit values.
constexpr std::uint64_t id_mask = (std::uint64_t{1} << 63) - 1;

/// Random numbers from std::mt19937_64 with self-written transforms, so the
/// sequence is the same with every standard library.
class rng {
public:
  explicit rng(std::uint64_t seed) : gen_(seed) {}

  /// Uniform in [0, 1).
  double uniform01() { return static_cast<double>(gen_() >> 11) * 0x1p-53; }

  /// Uniform in (0, 1]; safe to take the logarithm of.
  double uniform_open0() {
    return static_cast<double>((gen_() >> 11) + 1) * 0x1p-53;
  }

  /// Uniform integer in [lo, hi].
  std::uint64_t uniform_int(std::uint64_t lo, std::uint64_t hi) {
    const double span = static_cast<double>(hi - lo) + 1.0;
    const auto off = static_cast<std::uint64_t>(uniform01() * span);
    return std::min(hi, lo + off);
  }

  /// Standard normal (Box-Muller, one value per call).
  double normal() {
    const double r = std::sqrt(-2.0 * std::log(uniform_open0()));
    return r * std::cos(2.0 * std::numbers::pi * uniform01());
  }

  double exponential(double mean) { return -mean * std::log(uniform_open0()); }

  double lognormal(double median, double sigma) {
    return median * std::exp(sigma * normal());
  }

  /// Discrete Pareto on {1, 2, ...}: floor of a Pareto(alpha, 1) draw.
  std::uint64_t pareto_int(double alpha) {
    return static_cast<std::uint64_t>(
        std::floor(std::pow(uniform_open0(), -1.0 / alpha)));
  }

  /// Log-uniform in [lo, hi].
  double log_uniform(double lo, double hi) {
    return std::exp(std::log(lo) + uniform01() * (std::log(hi) - std::log(lo)));
  }

private:
  std::mt19937_64 gen_;
};

/// Rounds a positive length to tokens, clamped to [lo, hi].
std::uint32_t to_tokens(double x, std::uint32_t lo, std::uint32_t hi) {
  const double clamped = std::clamp(std::round(x), static_cast<double>(lo),
                                    static_cast<double>(hi));
  return static_cast<std::uint32_t>(clamped);
}

/// Samples an index by inverse CDF over fixed weights.
class discrete_sampler {
public:
  explicit discrete_sampler(std::span<const double> weights) {
    cdf_.reserve(weights.size());
    double sum = 0.0;
    for (const double w : weights) {
      sum += w;
      cdf_.push_back(sum);
    }
  }

  /// Zipf popularity over n items: item k (0-based) has weight 1/(k+1)^s.
  static discrete_sampler zipf(std::size_t n, double s) {
    std::vector<double> w(n);
    for (std::size_t k = 0; k < n; ++k)
      w[k] = 1.0 / std::pow(static_cast<double>(k + 1), s);
    return discrete_sampler{w};
  }

  std::size_t sample(rng& r) const {
    const double u = r.uniform01() * cdf_.back();
    const auto it = std::upper_bound(cdf_.begin(), cdf_.end(), u);
    const auto i = static_cast<std::size_t>(it - cdf_.begin());
    return std::min(i, cdf_.size() - 1);
  }

private:
  std::vector<double> cdf_;
};

/// A run of tokens with its own content: the tokens of segment `id` at
/// offset k are the same in every prompt that contains the segment, and
/// differ from those of any other segment.
struct segment {
  std::uint64_t id = 0;
  std::uint32_t tokens = 0;
};

/// Turns prompts (segment sequences) into chained block ids.
class block_id_maker {
public:
  block_id_maker(std::uint64_t salt, std::uint32_t block_tokens)
      : salt_(salt), block_tokens_(block_tokens) {}

  /// A fresh segment of `tokens` tokens.
  segment make_segment(std::uint32_t tokens) {
    return {next_segment_++, tokens};
  }

  /// Ids of every block of the concatenation of `segs`, the last one possibly
  /// partial. A block's id hashes the previous block's id and the pieces
  /// (segment, offset, length) that make up the block, which together name
  /// the block's tokens; so the id is a function of the token prefix.
  std::vector<std::uint64_t> ids(std::span<const segment> segs) {
    std::uint64_t total = 0;
    for (const segment& s : segs)
      total += s.tokens;
    std::vector<std::uint64_t> out;
    out.reserve(
        static_cast<std::size_t>((total + block_tokens_ - 1) / block_tokens_));
    std::uint64_t prev = 0;
    std::size_t seg = 0;
    std::uint32_t seg_off = 0;
    std::uint64_t left = total;
    while (left > 0) {
      buf_.clear();
      internal::put_le64(buf_, prev);
      auto need = static_cast<std::uint32_t>(
          std::min<std::uint64_t>(block_tokens_, left));
      left -= need;
      while (need > 0) {
        while (segs[seg].tokens == seg_off) { // skips empty segments too
          ++seg;
          seg_off = 0;
        }
        const std::uint32_t take = std::min(need, segs[seg].tokens - seg_off);
        internal::put_le64(buf_, segs[seg].id);
        internal::put_le32(buf_, seg_off);
        internal::put_le32(buf_, take);
        seg_off += take;
        need -= take;
      }
      prev = XXH3_64bits_withSeed(buf_.data(), buf_.size(), salt_) & id_mask;
      out.push_back(prev);
    }
    return out;
  }

private:
  std::uint64_t salt_;
  std::uint32_t block_tokens_;
  std::uint64_t next_segment_ = 1;
  std::vector<unsigned char> buf_;
};

std::uint32_t total_tokens(std::span<const segment> segs) {
  std::uint64_t total = 0;
  for (const segment& s : segs)
    total += s.tokens;
  return static_cast<std::uint32_t>(total);
}

workload_request make_request(double t_ms, std::uint64_t session,
                              std::span<const segment> segs,
                              std::uint32_t output, block_id_maker& ids) {
  workload_request r;
  r.timestamp_ms = static_cast<std::uint64_t>(t_ms);
  r.session = session;
  r.input_length = total_tokens(segs);
  r.output_length = output;
  r.hash_ids = ids.ids(segs);
  return r;
}

constexpr double ms_per_s = 1000.0;

// ---- chat ------------------------------------------------------------------

constexpr std::size_t chat_default_requests = 20'000;
constexpr double chat_sessions_per_s = 4.0;
constexpr double chat_rounds_alpha = 1.3;
constexpr std::uint64_t chat_max_rounds = 64;
constexpr std::uint32_t chat_max_context = 32'768;
constexpr std::array<double, 4> chat_system_weights = {0.55, 0.25, 0.12, 0.08};
constexpr std::uint32_t chat_system_min = 1'000;
constexpr std::uint32_t chat_system_max = 3'000;
constexpr double chat_user_median = 300.0;
constexpr double chat_user_sigma = 0.9;
constexpr std::uint32_t chat_user_min = 8;
constexpr std::uint32_t chat_user_max = 4'000;
constexpr double chat_reply_median = 400.0;
constexpr double chat_reply_sigma = 0.6;
constexpr std::uint32_t chat_reply_min = 16;
constexpr std::uint32_t chat_reply_max = 2'048;
constexpr double chat_decode_ms_per_token = 20.0;
constexpr double chat_mean_think_ms = 60'000.0;

/// Appends one session's requests to `out`.
void chat_session(rng& r, block_id_maker& ids, double arrival_ms,
                  std::uint64_t session, segment system,
                  std::vector<workload_request>& out) {
  // Heavy-tailed conversation lengths (discrete Pareto): most sessions are
  // one or two rounds, a few go on for dozens, as in public chat logs.
  const auto rounds =
      std::min<std::uint64_t>(chat_max_rounds, r.pareto_int(chat_rounds_alpha));
  std::vector<segment> prompt{system};
  std::uint32_t length = system.tokens;
  double t = arrival_ms;
  for (std::uint64_t k = 0; k < rounds; ++k) {
    const std::uint32_t user =
        to_tokens(r.lognormal(chat_user_median, chat_user_sigma), chat_user_min,
                  chat_user_max);
    const std::uint32_t reply =
        to_tokens(r.lognormal(chat_reply_median, chat_reply_sigma),
                  chat_reply_min, chat_reply_max);
    if (length + user > chat_max_context)
      break; // context window full
    prompt.push_back(ids.make_segment(user));
    length += user;
    out.push_back(make_request(t, session, prompt, reply, ids));
    prompt.push_back(ids.make_segment(reply));
    length += reply;
    t += static_cast<double>(reply) * chat_decode_ms_per_token +
         r.exponential(chat_mean_think_ms);
  }
}

bool make_chat(rng& r, block_id_maker& ids, std::size_t n, stop_poll& poll,
               std::vector<workload_request>& out) {
  std::vector<segment> systems;
  for (std::size_t i = 0; i < chat_system_weights.size(); ++i)
    systems.push_back(ids.make_segment(static_cast<std::uint32_t>(
        r.uniform_int(chat_system_min, chat_system_max))));
  const discrete_sampler pick_system{chat_system_weights};

  out.reserve(n + n / 8);
  double t = 0.0;
  std::uint64_t session = 0;
  // Phase 1 makes sessions until there are n requests. Requests later than
  // the n-th earliest are then cut, but a session not made yet could still
  // add requests before that cut: phase 2 makes sessions until they arrive
  // after it.
  bool cut_known = false;
  std::uint64_t cut_ms = 0;
  for (;;) {
    if (poll.stopped(out.size()))
      return false;
    t += r.exponential(ms_per_s / chat_sessions_per_s);
    if (cut_known && static_cast<std::uint64_t>(t) > cut_ms)
      break;
    const segment system = systems[pick_system.sample(r)];
    chat_session(r, ids, t, ++session, system, out);
    if (!cut_known && out.size() >= n) {
      std::vector<std::uint64_t> times;
      times.reserve(out.size());
      for (const workload_request& q : out)
        times.push_back(q.timestamp_ms);
      std::nth_element(times.begin(),
                       times.begin() + static_cast<std::ptrdiff_t>(n - 1),
                       times.end());
      cut_ms = times[n - 1];
      cut_known = true;
    }
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const workload_request& a, const workload_request& b) {
                     return a.timestamp_ms < b.timestamp_ms;
                   });
  out.resize(n);
  return true;
}

// ---- shared-prefix ---------------------------------------------------------

constexpr std::size_t shared_default_requests = 20'000;
constexpr double shared_requests_per_s = 20.0;
constexpr std::size_t shared_groups = 2000;
constexpr double shared_zipf_s = 1.0;
constexpr double shared_prefix_min = 1'024.0;
constexpr double shared_prefix_max = 8'192.0;
constexpr double shared_suffix_min = 100.0;
constexpr double shared_suffix_max = 2'000.0;
constexpr double shared_output_median = 200.0;

constexpr double output_sigma = 0.7;
constexpr std::uint32_t output_min = 1;
constexpr std::uint32_t output_max = 4'096;

std::uint32_t log_uniform_tokens(rng& r, double lo, double hi) {
  return to_tokens(r.log_uniform(lo, hi), static_cast<std::uint32_t>(lo),
                   static_cast<std::uint32_t>(hi));
}

std::uint32_t output_tokens(rng& r, double median) {
  return to_tokens(r.lognormal(median, output_sigma), output_min, output_max);
}

bool make_shared_prefix(rng& r, block_id_maker& ids, std::size_t n,
                        stop_poll& poll, std::vector<workload_request>& out) {
  std::vector<segment> groups;
  for (std::size_t g = 0; g < shared_groups; ++g)
    groups.push_back(ids.make_segment(
        log_uniform_tokens(r, shared_prefix_min, shared_prefix_max)));
  const auto pick_group = discrete_sampler::zipf(shared_groups, shared_zipf_s);
  out.reserve(n);
  double t = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    if (poll.stopped(i))
      return false;
    t += r.exponential(ms_per_s / shared_requests_per_s);
    const segment prefix = groups[pick_group.sample(r)];
    const segment suffix = ids.make_segment(
        log_uniform_tokens(r, shared_suffix_min, shared_suffix_max));
    const std::array<segment, 2> prompt{prefix, suffix};
    out.push_back(make_request(t, 0, prompt,
                               output_tokens(r, shared_output_median), ids));
  }
  return true;
}

// ---- doc-qa ----------------------------------------------------------------

constexpr std::size_t docqa_default_requests = 10'000;
constexpr double docqa_requests_per_s = 5.0;
constexpr std::uint32_t docqa_instruction = 600;
constexpr std::size_t docqa_documents = 500;
constexpr double docqa_zipf_s = 1.0;
constexpr double docqa_doc_min = 4'096.0;
constexpr double docqa_doc_max = 32'768.0;
constexpr std::uint32_t docqa_question_min = 50;
constexpr std::uint32_t docqa_question_max = 300;
constexpr double docqa_output_median = 150.0;

bool make_doc_qa(rng& r, block_id_maker& ids, std::size_t n, stop_poll& poll,
                 std::vector<workload_request>& out) {
  const segment instruction = ids.make_segment(docqa_instruction);
  std::vector<segment> docs;
  for (std::size_t d = 0; d < docqa_documents; ++d)
    docs.push_back(
        ids.make_segment(log_uniform_tokens(r, docqa_doc_min, docqa_doc_max)));
  const auto pick_doc = discrete_sampler::zipf(docqa_documents, docqa_zipf_s);
  out.reserve(n);
  double t = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    if (poll.stopped(i))
      return false;
    t += r.exponential(ms_per_s / docqa_requests_per_s);
    const segment doc = docs[pick_doc.sample(r)];
    const segment question = ids.make_segment(static_cast<std::uint32_t>(
        r.uniform_int(docqa_question_min, docqa_question_max)));
    const std::array<segment, 3> prompt{instruction, doc, question};
    out.push_back(
        make_request(t, 0, prompt, output_tokens(r, docqa_output_median), ids));
  }
  return true;
}

// ---- no-reuse --------------------------------------------------------------

constexpr std::size_t noreuse_default_requests = 10'000;
constexpr double noreuse_requests_per_s = 10.0;
constexpr double noreuse_min = 500.0;
constexpr double noreuse_max = 8'192.0;
constexpr double noreuse_output_median = 250.0;

bool make_no_reuse(rng& r, block_id_maker& ids, std::size_t n, stop_poll& poll,
                   std::vector<workload_request>& out) {
  out.reserve(n);
  double t = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    if (poll.stopped(i))
      return false;
    t += r.exponential(ms_per_s / noreuse_requests_per_s);
    const std::array<segment, 1> prompt{
        ids.make_segment(log_uniform_tokens(r, noreuse_min, noreuse_max))};
    out.push_back(make_request(t, 0, prompt,
                               output_tokens(r, noreuse_output_median), ids));
  }
  return true;
}

// Appends the workload's `n` requests to its last argument and returns
// true, or returns false as soon as the poll says stop (asked with the number
// of requests made so far).
using generator = bool (*)(rng&, block_id_maker&, std::size_t, stop_poll&,
                           std::vector<workload_request>&);

struct workload_kind {
  std::string_view name;
  generator make;
  std::size_t default_requests;
};

constexpr std::array<workload_kind, 4> kinds = {{
    {names[0], make_chat, chat_default_requests},
    {names[1], make_shared_prefix, shared_default_requests},
    {names[2], make_doc_qa, docqa_default_requests},
    {names[3], make_no_reuse, noreuse_default_requests},
}};

std::string valid_names() {
  std::string s;
  for (const std::string_view n : names) {
    if (!s.empty())
      s += ", ";
    s += n;
  }
  return s;
}

} // namespace

std::span<const std::string_view> workload_names() noexcept {
  return names;
}

result<std::vector<workload_request>>
generate_workload(std::string_view name, const workload_options& opts) {
  const auto kind = std::find_if(kinds.begin(), kinds.end(),
                                 [&](const auto& k) { return k.name == name; });
  if (kind == kinds.end())
    return make_error(errc::invalid_argument,
                      "unknown workload '" + std::string(name) +
                          "'; valid names: " + valid_names());
  if (opts.block_tokens == 0)
    return make_error(errc::invalid_argument, "block_tokens must be > 0");
  if (opts.requests > max_workload_requests)
    return make_error(errc::invalid_argument,
                      "requests must be at most " +
                          std::to_string(max_workload_requests));
  const std::size_t n =
      opts.requests == 0 ? kind->default_requests : opts.requests;
  try {
    // The salt ties every id and the random stream to (name, seed).
    const std::uint64_t salt =
        XXH3_64bits_withSeed(name.data(), name.size(), opts.seed);
    rng r{salt};
    block_id_maker ids{salt, opts.block_tokens};
    stop_poll poll{opts.stop};
    std::vector<workload_request> out;
    if (!kind->make(r, ids, n, poll, out))
      return make_error(errc::unavailable,
                        "workload generation stopped after " +
                            std::to_string(std::min(out.size(), n)) + " of " +
                            std::to_string(n) + " requests");
    return out;
  } catch (const stop_check_failed& e) {
    return make_error(errc::unavailable,
                      "workload generation stopped: the stop check failed: " +
                          std::string(e.what()));
  } catch (const std::bad_alloc&) {
    return make_error(errc::out_of_memory, "not enough memory for workload '" +
                                               std::string(name) + "' with " +
                                               std::to_string(n) + " requests");
  }
}

result<std::size_t> working_set_blocks(std::span<const workload_request> reqs,
                                       std::uint32_t block_tokens,
                                       const std::function<bool()>& stop) {
  // A trie of prefixes: node (parent, id) -> node number; 0 is the root.
  struct edge {
    std::uint64_t parent;
    std::uint64_t id;
    bool operator==(const edge&) const = default;
  };
  struct edge_hash {
    std::size_t operator()(const edge& e) const noexcept {
      std::uint64_t h = e.id ^ (e.parent * 0x9e3779b97f4a7c15ULL);
      h ^= h >> 31;
      h *= 0xbf58476d1ce4e5b9ULL;
      h ^= h >> 29;
      return static_cast<std::size_t>(h);
    }
  };
  std::size_t ids_seen = 0;
  try {
    std::unordered_map<edge, std::uint64_t, edge_hash> nodes;
    stop_poll poll{stop};
    for (std::size_t r = 0; r < reqs.size(); ++r) {
      const workload_request& q = reqs[r];
      std::size_t full = q.hash_ids.size();
      if (block_tokens != 0)
        full = std::min<std::size_t>(full, q.input_length / block_tokens);
      std::uint64_t parent = 0;
      for (std::size_t i = 0; i < full; ++i) {
        // Asked per id, not per request: one trace line may hold millions.
        if (poll.stopped(ids_seen++))
          return make_error(errc::unavailable,
                            "stopped after " + std::to_string(r) + " of " +
                                std::to_string(reqs.size()) + " requests");
        const auto next = static_cast<std::uint64_t>(nodes.size()) + 1;
        parent =
            nodes.try_emplace(edge{parent, q.hash_ids[i]}, next).first->second;
      }
    }
    return nodes.size();
  } catch (const stop_check_failed& e) {
    return make_error(errc::unavailable,
                      "counting the working set stopped: the stop check "
                      "failed: " +
                          std::string(e.what()));
  } catch (const std::bad_alloc&) {
    return make_error(errc::out_of_memory,
                      "out of memory counting the working set (" +
                          std::to_string(ids_seen) + " block ids read)");
  }
}

} // namespace kvfleet::engine
