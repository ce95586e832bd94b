#include "engine/stats.hpp"

#include <algorithm>
#include <bit>
#include <cmath>

namespace kvfleet::engine {

std::string_view to_string(size_partition p) noexcept {
  switch (p) {
  case size_partition::small:
    return "short";
  case size_partition::medium:
    return "medium";
  case size_partition::large:
    return "long";
  }
  return "unknown";
}

std::size_t latency_histogram::bucket_of(std::uint64_t v) noexcept {
  constexpr std::uint64_t sub = std::uint64_t{1} << sub_bits;
  if (v < sub)
    return static_cast<std::size_t>(v);
  const int msb = 63 - std::countl_zero(v); // >= sub_bits
  const int shift = msb - sub_bits;
  const std::uint64_t mantissa = (v >> shift) & (sub - 1);
  return (static_cast<std::size_t>(shift + 1) << sub_bits) +
         static_cast<std::size_t>(mantissa);
}

std::uint64_t latency_histogram::bucket_upper(std::size_t b) noexcept {
  constexpr std::size_t sub = std::size_t{1} << sub_bits;
  if (b < sub)
    return b;
  const std::size_t shift = (b >> sub_bits) - 1;
  const std::uint64_t mantissa = (b & (sub - 1)) | sub;
  // Only the last bucket's edge, 2^64, is past the range; the other seven
  // buckets of the top power of two end below it.
  if (mantissa + 1 > (~std::uint64_t{0} >> shift))
    return ~std::uint64_t{0};
  return ((mantissa + 1) << shift) - 1;
}

void latency_histogram::merge(const latency_histogram& other) noexcept {
  for (std::size_t i = 0; i < bucket_count; ++i)
    buckets_[i] += other.buckets_[i];
  count_ += other.count_;
  sum_ = saturating_add(sum_, other.sum_);
  max_ = std::max(max_, other.max_);
}

std::uint64_t latency_histogram::quantile(double q) const noexcept {
  if (count_ == 0)
    return 0;
  // NaN compares false both ways and would pass clamp() as NaN, whose
  // conversion to an integer rank is undefined.
  q = std::isnan(q) ? 0.0 : std::clamp(q, 0.0, 1.0);
  auto rank =
      static_cast<std::uint64_t>(std::ceil(q * static_cast<double>(count_)));
  rank = std::max<std::uint64_t>(rank, 1);
  std::uint64_t seen = 0;
  for (std::size_t b = 0; b < bucket_count; ++b) {
    seen += buckets_[b];
    if (seen >= rank)
      return std::min(bucket_upper(b), max_);
  }
  return max_;
}

} // namespace kvfleet::engine
