#include "cuda/copy_engine.hpp"

#include "cuda/internal/copy_tickets.hpp"
#include "cuda/internal/cuda_check.hpp"
#include "cuda/internal/staging_ring.hpp"

#include <cstring>
#include <deque>
#include <vector>

namespace kvfleet::cuda {

using internal::check;

struct copy_engine::impl {
  enum class kind : std::uint8_t { up, down, dev };
  struct batch {
    copy_ticket ticket = 0;
    kind k = kind::dev;
    cudaEvent_t done = nullptr;
    internal::staging_ring::region region{};
    std::vector<download_job> outs; // download: where staged bytes go
  };

  int device = 0;
  std::byte* pinned = nullptr;
  std::size_t half = 0;
  cudaStream_t streams[3] = {nullptr, nullptr, nullptr};
  internal::staging_ring up_ring{0};
  internal::staging_ring down_ring{0};
  std::deque<batch> pending[3];
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
    if (pinned != nullptr)
      (void)cudaFreeHost(pinned);
  }

  result<copy_ticket> finish_enqueue(kind k,
                                     internal::staging_ring::region region,
                                     std::vector<download_job> outs) {
    batch b;
    b.ticket = next; // used up only once queued (poll of a failed one)
    b.k = k;
    b.region = region;
    b.outs = std::move(outs);
    KVFLEET_CUDA_TRY(cudaEventCreateWithFlags(&b.done, cudaEventDisableTiming),
                     "cudaEventCreateWithFlags");
    if (auto r = internal::check(
            cudaEventRecord(b.done, streams[static_cast<int>(k)]),
            "cudaEventRecord");
        !r) {
      (void)cudaEventDestroy(b.done);
      return unexpected<error>(r.error());
    }
    pending[static_cast<int>(k)].push_back(std::move(b));
    ++next;
    return pending[static_cast<int>(k)].back().ticket;
  }

  // Completes finished batches in each stream's order.
  result<void> collect() {
    for (int q = 0; q < 3; ++q) {
      while (!pending[q].empty()) {
        batch& b = pending[q].front();
        const cudaError_t st = cudaEventQuery(b.done);
        if (st == cudaErrorNotReady)
          break;
        if (auto r = check(st, "cudaEventQuery"); !r)
          return r;
        if (b.k == kind::down) {
          std::size_t off = b.region.offset;
          for (const download_job& j : b.outs) {
            std::memcpy(j.dst.data(), pinned + half + off, j.dst.size());
            off += j.dst.size();
          }
          down_ring.release(b.region);
        } else if (b.k == kind::up) {
          up_ring.release(b.region);
        }
        (void)cudaEventDestroy(b.done);
        pending[q].pop_front();
      }
    }
    return {};
  }

  // REQUIRES: `t` was issued (check_issued).
  bool finished(copy_ticket t) const {
    for (const auto& q : pending)
      for (const batch& b : q)
        if (b.ticket == t)
          return false;
    return true;
  }
};

copy_engine::copy_engine(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
copy_engine::~copy_engine() = default;

result<std::unique_ptr<copy_engine>>
copy_engine::create(const copy_engine_config& config) {
  if (config.staging_bytes < 2 * 4096)
    return make_error(errc::invalid_argument,
                      "copy engine staging below 8 KiB");
  if (auto r = internal::use_device(config.device); !r)
    return unexpected<error>(r.error());
  auto p = std::make_unique<impl>();
  p->device = config.device;
  p->half = config.staging_bytes / 2 / 256 * 256;
  void* pinned = nullptr;
  KVFLEET_CUDA_TRY(cudaHostAlloc(&pinned, 2 * p->half, cudaHostAllocDefault),
                   "cudaHostAlloc(" + std::to_string(2 * p->half) + " bytes)");
  p->pinned = static_cast<std::byte*>(pinned);
  for (cudaStream_t& s : p->streams)
    KVFLEET_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking),
                     "cudaStreamCreateWithFlags");
  p->up_ring = internal::staging_ring(p->half);
  p->down_ring = internal::staging_ring(p->half);
  return std::unique_ptr<copy_engine>(new copy_engine(std::move(p)));
}

result<copy_ticket> copy_engine::to_device(std::span<const upload_job> jobs) {
  std::size_t total = 0;
  for (const upload_job& j : jobs) {
    if (j.dst == nullptr && !j.src.empty())
      return make_error(errc::invalid_argument, "to_device: null destination");
    if (j.src.size() > impl_->half - total)
      return make_error(errc::value_too_large,
                        "to_device: batch exceeds the staging half of " +
                            std::to_string(impl_->half) + " bytes");
    total += j.src.size();
  }
  if (auto r = internal::use_device(impl_->device); !r)
    return unexpected<error>(r.error());
  if (auto r = impl_->collect(); !r)
    return unexpected<error>(r.error());
  auto region = impl_->up_ring.acquire(total);
  if (!region)
    return make_error(errc::busy, "to_device: upload staging is full");
  auto queued = [&]() -> result<copy_ticket> {
    std::size_t off = region->offset;
    cudaStream_t s = impl_->streams[0];
    for (const upload_job& j : jobs) {
      std::memcpy(impl_->pinned + off, j.src.data(), j.src.size());
      KVFLEET_CUDA_TRY(cudaMemcpyAsync(j.dst, impl_->pinned + off, j.src.size(),
                                       cudaMemcpyHostToDevice, s),
                       "cudaMemcpyAsync(host to device)");
      off += j.src.size();
    }
    return impl_->finish_enqueue(impl::kind::up, *region, {});
  }();
  if (!queued)
    (void)impl_->up_ring.give_back(*region); // no batch will release it
  return queued;
}

result<copy_ticket> copy_engine::to_host(std::span<const download_job> jobs) {
  std::size_t total = 0;
  for (const download_job& j : jobs) {
    if (j.src == nullptr && !j.dst.empty())
      return make_error(errc::invalid_argument, "to_host: null source");
    if (j.dst.size() > impl_->half - total)
      return make_error(errc::value_too_large,
                        "to_host: batch exceeds the staging half of " +
                            std::to_string(impl_->half) + " bytes");
    total += j.dst.size();
  }
  if (auto r = internal::use_device(impl_->device); !r)
    return unexpected<error>(r.error());
  if (auto r = impl_->collect(); !r)
    return unexpected<error>(r.error());
  auto region = impl_->down_ring.acquire(total);
  if (!region)
    return make_error(errc::busy, "to_host: download staging is full");
  auto queued = [&]() -> result<copy_ticket> {
    std::size_t off = region->offset;
    cudaStream_t s = impl_->streams[1];
    for (const download_job& j : jobs) {
      KVFLEET_CUDA_TRY(cudaMemcpyAsync(impl_->pinned + impl_->half + off, j.src,
                                       j.dst.size(), cudaMemcpyDeviceToHost, s),
                       "cudaMemcpyAsync(device to host)");
      off += j.dst.size();
    }
    return impl_->finish_enqueue(
        impl::kind::down, *region,
        std::vector<download_job>(jobs.begin(), jobs.end()));
  }();
  if (!queued)
    (void)impl_->down_ring.give_back(*region); // no batch will release it
  return queued;
}

result<copy_ticket> copy_engine::on_device(std::span<const copy_job> jobs) {
  if (auto r = internal::use_device(impl_->device); !r)
    return unexpected<error>(r.error());
  if (auto r = copy_blocks(jobs, device_stream()); !r)
    return unexpected<error>(r.error());
  return impl_->finish_enqueue(impl::kind::dev, {}, {});
}

result<bool> copy_engine::poll(copy_ticket t) {
  if (auto ok = internal::check_issued(t, impl_->next, "copy_engine::poll");
      !ok)
    return unexpected<error>(ok.error());
  if (auto r = impl_->collect(); !r)
    return unexpected<error>(r.error());
  return impl_->finished(t);
}

result<void> copy_engine::wait(copy_ticket t) {
  if (auto ok = internal::check_issued(t, impl_->next, "copy_engine::wait");
      !ok)
    return ok;
  for (const auto& q : impl_->pending)
    for (const auto& b : q)
      if (b.ticket == t)
        KVFLEET_CUDA_TRY(cudaEventSynchronize(b.done), "cudaEventSynchronize");
  return impl_->collect();
}

std::size_t copy_engine::in_flight() const noexcept {
  return impl_->pending[0].size() + impl_->pending[1].size() +
         impl_->pending[2].size();
}

stream_ref copy_engine::upload_stream() const noexcept {
  return {impl_->streams[0]};
}
stream_ref copy_engine::download_stream() const noexcept {
  return {impl_->streams[1]};
}
stream_ref copy_engine::device_stream() const noexcept {
  return {impl_->streams[2]};
}

} // namespace kvfleet::cuda
