#pragma once
/// One pass over a gather/scatter batch's pool offsets: the highest offset
/// (range check) and the OR of all of them (alignment), shared by the
/// batch validation and the launcher so that a batch is read once before
/// its first launch: the GPU idles while the host reads it (32,768 offsets
/// take about 20 us on one core, 3% of gathering 1 GiB on an H100).

#include <algorithm>
#include <cstddef>
#include <span>

namespace kvfleet::cuda::internal {

struct offset_scan {
  std::size_t highest = 0;
  std::size_t any_bits = 0; // OR of every offset
};

[[nodiscard]] inline offset_scan
scan_offsets(std::span<const std::size_t> offsets) {
  offset_scan s;
  for (const std::size_t o : offsets) {
    s.highest = std::max(s.highest, o);
    s.any_bits |= o;
  }
  return s;
}

} // namespace kvfleet::cuda::internal
