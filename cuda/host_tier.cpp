#include "cuda/host_tier.hpp"

#include "cuda/internal/copy_tickets.hpp"
#include "cuda/internal/cuda_check.hpp"
#include "cuda/internal/staging_ring.hpp"

#include <deque>
#include <iterator>
#include <map>
#include <optional>
#include <unordered_map>

namespace kvfleet::cuda {

using internal::check;

namespace {
constexpr std::size_t extent_alignment = 256;
std::size_t round_up(std::size_t n) {
  return (n + extent_alignment - 1) / extent_alignment * extent_alignment;
}
} // namespace

struct host_tier::impl {
  struct batch {
    copy_ticket ticket = 0;
    cudaEvent_t done = nullptr;
    internal::staging_ring::region region{};
  };
  struct extent {
    std::size_t offset = 0;
    std::size_t bytes = 0;
    std::size_t live = 0; // blocks not yet released
  };

  int device = 0;
  std::byte* host = nullptr;
  std::size_t host_bytes = 0;
  std::size_t host_used = 0;
  std::byte* staging = nullptr;
  std::size_t half = 0;
  cudaStream_t streams[2] = {nullptr, nullptr}; // demote, promote
  internal::staging_ring rings[2] = {internal::staging_ring(0),
                                     internal::staging_ring(0)};
  std::deque<batch> pending[2];
  std::map<std::size_t, std::size_t> free_ranges; // offset -> bytes
  std::unordered_map<std::uint64_t, extent> extents;
  std::uint64_t next_extent = 1; ///< 64 bits: never wraps, never reused
  copy_ticket next = 1;

  ~impl() {
    (void)cudaSetDevice(device);
    for (auto& q : pending)
      for (auto& b : q) {
        (void)cudaEventSynchronize(b.done);
        (void)cudaEventDestroy(b.done);
      }
    for (cudaStream_t s : streams)
      if (s != nullptr)
        (void)cudaStreamDestroy(s);
    if (staging != nullptr)
      (void)cudaFree(staging);
    if (host != nullptr)
      (void)cudaFreeHost(host);
  }

  // First fit over the free ranges.
  std::optional<std::size_t> allocate(std::size_t n) {
    for (auto it = free_ranges.begin(); it != free_ranges.end(); ++it) {
      if (it->second < n)
        continue;
      const std::size_t at = it->first;
      const std::size_t rest = it->second - n;
      free_ranges.erase(it);
      if (rest > 0)
        free_ranges.emplace(at + n, rest);
      host_used += n;
      return at;
    }
    return std::nullopt;
  }

  void free_range(std::size_t at, std::size_t n) {
    host_used -= n;
    auto next_it = free_ranges.lower_bound(at);
    if (next_it != free_ranges.end() && at + n == next_it->first) {
      n += next_it->second;
      next_it = free_ranges.erase(next_it);
    }
    if (next_it != free_ranges.begin()) {
      auto prev = std::prev(next_it);
      if (prev->first + prev->second == at) {
        prev->second += n;
        return;
      }
    }
    free_ranges.emplace(at, n);
  }

  result<copy_ticket> enqueue(int q, internal::staging_ring::region region) {
    batch b;
    // The number is used up only once the batch is queued: a failed
    // enqueue issued no ticket, so poll() of that number must not call it
    // finished.
    b.ticket = next;
    b.region = region;
    KVFLEET_CUDA_TRY(cudaEventCreateWithFlags(&b.done, cudaEventDisableTiming),
                     "cudaEventCreateWithFlags");
    if (auto r = check(cudaEventRecord(b.done, streams[q]), "cudaEventRecord");
        !r) {
      (void)cudaEventDestroy(b.done);
      return unexpected<error>(r.error());
    }
    pending[q].push_back(b);
    ++next;
    return b.ticket;
  }

  result<void> collect() {
    for (int q = 0; q < 2; ++q) {
      while (!pending[q].empty()) {
        batch& b = pending[q].front();
        const cudaError_t st = cudaEventQuery(b.done);
        if (st == cudaErrorNotReady)
          break;
        if (auto r = check(st, "cudaEventQuery"); !r)
          return r;
        rings[q].release(b.region);
        (void)cudaEventDestroy(b.done);
        pending[q].pop_front();
      }
    }
    return {};
  }
};

host_tier::host_tier(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
host_tier::~host_tier() = default;

result<std::unique_ptr<host_tier>>
host_tier::create(const host_tier_config& config) {
  if (config.host_bytes == 0)
    return make_error(errc::zero_capacity, "host tier of zero bytes");
  if (config.staging_bytes < 2 * extent_alignment)
    return make_error(errc::invalid_argument, "host tier staging too small");
  if (auto r = internal::use_device(config.device); !r)
    return unexpected<error>(r.error());
  auto p = std::make_unique<impl>();
  p->device = config.device;
  p->host_bytes = config.host_bytes / extent_alignment * extent_alignment;
  if (p->host_bytes == 0)
    return make_error(errc::zero_capacity,
                      "host tier of " + std::to_string(config.host_bytes) +
                          " bytes holds no " +
                          std::to_string(extent_alignment) + "-byte extent");
  p->half = config.staging_bytes / 2 / extent_alignment * extent_alignment;
  void* host = nullptr;
  KVFLEET_CUDA_TRY(cudaHostAlloc(&host, p->host_bytes, cudaHostAllocDefault),
                   "cudaHostAlloc(" + std::to_string(p->host_bytes) +
                       " bytes)");
  p->host = static_cast<std::byte*>(host);
  void* staging = nullptr;
  KVFLEET_CUDA_TRY(cudaMalloc(&staging, 2 * p->half),
                   "cudaMalloc(" + std::to_string(2 * p->half) +
                       " bytes of staging)");
  p->staging = static_cast<std::byte*>(staging);
  for (cudaStream_t& s : p->streams)
    KVFLEET_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking),
                     "cudaStreamCreateWithFlags");
  p->rings[0] = internal::staging_ring(p->half);
  p->rings[1] = internal::staging_ring(p->half);
  p->free_ranges.emplace(0, p->host_bytes);
  return std::unique_ptr<host_tier>(new host_tier(std::move(p)));
}

result<copy_ticket> host_tier::demote(std::span<const demote_job> jobs,
                                      std::vector<host_block>& out) {
  impl& m = *impl_;
  std::size_t total = 0;
  for (const demote_job& j : jobs) {
    if (j.src == nullptr || j.bytes == 0)
      return make_error(errc::invalid_argument, "demote: empty or null block");
    // Checked before rounding, which would wrap a size near 2^64 to 0.
    if (j.bytes > m.half || round_up(j.bytes) > m.half - total)
      return make_error(errc::value_too_large,
                        "demote: batch exceeds the staging half of " +
                            std::to_string(m.half) + " bytes");
    total += round_up(j.bytes);
  }
  // errc::out_of_memory from demote() means "no room in the host arena"
  // (engine::memory_tier): the store drops tier blocks for it. A CUDA call
  // that failed for memory (cudaErrorMemoryAllocation: an event, a launch)
  // is another failure, and dropping blocks would not help it: every
  // retry failed the same way until the whole tier was gone.
  const auto failed = [](error e) {
    if (e.code == errc::out_of_memory)
      e.code = errc::backend_error;
    return unexpected<error>(std::move(e));
  };
  if (auto r = internal::use_device(m.device); !r)
    return failed(r.error());
  if (auto r = m.collect(); !r)
    return failed(r.error());
  if (jobs.empty()) {
    // Nothing to copy: no extent (one with no blocks would never be
    // released) and no host bytes, but a ticket in the stream's order.
    out.clear();
    auto t = m.enqueue(0, {});
    if (!t)
      return failed(t.error());
    return t;
  }
  // Staging first: errc::out_of_memory must mean that the batch would go
  // through now with room in the host arena (engine::memory_tier), since
  // the store drops tier blocks to make that room.
  auto region = m.rings[0].acquire(total);
  if (!region)
    return make_error(errc::busy, "demote: staging is full");
  auto at = m.allocate(total);
  if (!at) {
    (void)m.rings[0].give_back(*region);
    return make_error(errc::out_of_memory, "demote: no free extent of " +
                                               std::to_string(total) +
                                               " bytes in the host tier");
  }
  const std::uint64_t id = m.next_extent++;
  m.extents[id] = {*at, total, jobs.size()};
  auto queued = [&]() -> result<copy_ticket> {
    std::vector<copy_job> gather(jobs.size());
    out.clear();
    std::size_t off = 0;
    for (std::size_t i = 0; i < jobs.size(); ++i) {
      gather[i] = {jobs[i].src, m.staging + region->offset + off,
                   jobs[i].bytes};
      out.push_back({*at + off, jobs[i].bytes, id});
      off += round_up(jobs[i].bytes);
    }
    const stream_ref s{m.streams[0]};
    if (auto r = copy_blocks(gather, s); !r)
      return unexpected<error>(r.error());
    KVFLEET_CUDA_TRY(cudaMemcpyAsync(m.host + *at, m.staging + region->offset,
                                     total, cudaMemcpyDeviceToHost,
                                     m.streams[0]),
                     "cudaMemcpyAsync(demotion, device to host)");
    return m.enqueue(0, *region);
  }();
  if (!queued) {
    // Nothing will release what this batch took: give it all back.
    out.clear();
    m.extents.erase(id);
    m.free_range(*at, total);
    (void)m.rings[0].give_back(*region);
    return failed(queued.error());
  }
  return queued;
}

result<copy_ticket> host_tier::promote(std::span<const promote_job> jobs) {
  impl& m = *impl_;
  std::size_t total = 0;
  for (const promote_job& j : jobs) {
    // Compared without sums that a block near 2^64 would wrap; the copy
    // reads the block's padded size.
    if (j.dst == nullptr || j.block.bytes == 0 ||
        j.block.bytes > m.host_bytes ||
        round_up(j.block.bytes) > m.host_bytes ||
        j.block.offset > m.host_bytes - round_up(j.block.bytes))
      return make_error(errc::invalid_argument,
                        "promote: bad block or destination");
    if (j.block.bytes > m.half || round_up(j.block.bytes) > m.half - total)
      return make_error(errc::value_too_large,
                        "promote: batch exceeds the staging half of " +
                            std::to_string(m.half) + " bytes");
    total += round_up(j.block.bytes);
  }
  if (auto r = internal::use_device(m.device); !r)
    return unexpected<error>(r.error());
  if (auto r = m.collect(); !r)
    return unexpected<error>(r.error());
  auto region = m.rings[1].acquire(total);
  if (!region)
    return make_error(errc::busy, "promote: staging is full");
  auto queued = [&]() -> result<copy_ticket> {
    std::byte* stage = m.staging + m.half + region->offset;
    std::vector<copy_job> scatter(jobs.size());
    // One DMA per run of blocks that sit back to back in the host arena.
    std::size_t run_host = 0;
    std::size_t run_stage = 0;
    std::size_t run_bytes = 0;
    std::size_t off = 0;
    auto flush = [&]() -> result<void> {
      if (run_bytes == 0)
        return {};
      KVFLEET_CUDA_TRY(cudaMemcpyAsync(stage + run_stage, m.host + run_host,
                                       run_bytes, cudaMemcpyHostToDevice,
                                       m.streams[1]),
                       "cudaMemcpyAsync(promotion, host to device)");
      run_bytes = 0;
      return {};
    };
    for (std::size_t i = 0; i < jobs.size(); ++i) {
      const host_block& b = jobs[i].block;
      const std::size_t padded = round_up(b.bytes);
      if (run_bytes > 0 && run_host + run_bytes == b.offset &&
          run_stage + run_bytes == off) {
        run_bytes += padded;
      } else {
        if (auto r = flush(); !r)
          return unexpected<error>(r.error());
        run_host = b.offset;
        run_stage = off;
        run_bytes = padded;
      }
      scatter[i] = {stage + off, jobs[i].dst, b.bytes};
      off += padded;
    }
    if (auto r = flush(); !r)
      return unexpected<error>(r.error());
    if (auto r = copy_blocks(scatter, {m.streams[1]}); !r)
      return unexpected<error>(r.error());
    return m.enqueue(1, *region);
  }();
  if (!queued) {
    // Copies already queued (host to staging, a scatter into the
    // destinations) may still run: the caller frees the destinations on
    // this error, and the next promotion reuses the region. Wait for them
    // first (before, a scatter could land in slots a later put took).
    (void)cudaStreamSynchronize(m.streams[1]);
    (void)m.rings[1].give_back(*region); // no batch will release it
  }
  return queued;
}

result<bool> host_tier::poll(copy_ticket t) {
  if (auto ok = internal::check_issued(t, impl_->next, "host_tier::poll"); !ok)
    return unexpected<error>(ok.error());
  if (auto r = impl_->collect(); !r)
    return unexpected<error>(r.error());
  for (const auto& q : impl_->pending)
    for (const auto& b : q)
      if (b.ticket == t)
        return false;
  return true;
}

result<void> host_tier::wait(copy_ticket t) {
  if (auto ok = internal::check_issued(t, impl_->next, "host_tier::wait"); !ok)
    return ok;
  for (const auto& q : impl_->pending)
    for (const auto& b : q)
      if (b.ticket == t)
        KVFLEET_CUDA_TRY(cudaEventSynchronize(b.done), "cudaEventSynchronize");
  return impl_->collect();
}

void host_tier::release(const host_block& b) {
  auto it = impl_->extents.find(b.extent);
  if (it == impl_->extents.end())
    return;
  if (--it->second.live == 0) {
    impl_->free_range(it->second.offset, it->second.bytes);
    impl_->extents.erase(it);
  }
}

const std::byte* host_tier::host_data() const noexcept {
  return impl_->host;
}
std::size_t host_tier::host_capacity() const noexcept {
  return impl_->host_bytes;
}
std::size_t host_tier::max_batch_bytes() const noexcept {
  return impl_->half;
}

std::size_t host_tier::host_used() const noexcept {
  return impl_->host_used;
}
stream_ref host_tier::demote_stream() const noexcept {
  return {impl_->streams[0]};
}
stream_ref host_tier::promote_stream() const noexcept {
  return {impl_->streams[1]};
}

} // namespace kvfleet::cuda
