#pragma once
/// A test double of engine::memory_tier (tests only: nothing in a library
/// includes it). It keeps its "tier" in host memory and copies to and from
/// a host arena, but only when the test says so, so tests check that the
/// store leaves a slot alone until its copy is done.

#include "engine/memory_tier.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

namespace kvfleet::engine::testing {

/// A memory tier over host memory. demote() and promote() queue their
/// copies; a demotion's copy runs when the test calls finish_demotions()
/// (or at wait()), a promotion's at wait(). Places are 256-byte aligned
/// ranges of a fixed capacity, freed block by block.
class fake_memory_tier final : public memory_tier {
public:
  fake_memory_tier(std::byte* arena, std::size_t capacity)
      : arena_(arena), memory_(capacity) {}

  std::string_view name() const noexcept override { return "fake"; }

  result<tier_ticket> demote(std::span<const tier_demotion> jobs,
                             std::vector<tier_place>& places) override {
    ++demote_calls;
    if (fail_next != errc::ok) {
      const errc c = fail_next;
      fail_next = errc::ok;
      return make_error(c, "fake tier refuses");
    }
    places.clear();
    std::vector<std::size_t> at;
    for (const tier_demotion& j : jobs) {
      auto o = allocate(j.bytes);
      if (!o) {
        for (std::size_t i = 0; i < at.size(); ++i)
          free_range(at[i], jobs[i].bytes);
        return make_error(errc::out_of_memory, "fake tier full");
      }
      at.push_back(*o);
    }
    pending copy;
    copy.ticket = ++next_;
    for (std::size_t i = 0; i < jobs.size(); ++i) {
      places.push_back({at[i], jobs[i].bytes, 0});
      copy.jobs.push_back({jobs[i].arena_offset, at[i], jobs[i].bytes});
    }
    demotions_.push_back(copy);
    return tier_ticket{copy.ticket};
  }

  result<tier_ticket> promote(std::span<const tier_promotion> jobs) override {
    pending copy;
    copy.ticket = ++next_;
    copy.to_arena = true;
    for (const tier_promotion& j : jobs)
      copy.jobs.push_back({j.arena_offset, j.place.offset, j.place.bytes});
    promotions_.push_back(copy);
    ++promote_calls;
    return tier_ticket{copy.ticket};
  }

  result<bool> poll(tier_ticket t) override {
    if (t.value == failed_ticket)
      return make_error(errc::io_error, "fake copy failed");
    for (const auto* list : {&demotions_, &promotions_})
      for (const pending& p : *list)
        if (p.ticket == t.value)
          return false;
    return true;
  }

  result<void> wait(tier_ticket t) override {
    ++waits;
    if (wait_counter != nullptr)
      ++*wait_counter;
    if (t.value == failed_ticket)
      return make_error(errc::io_error, "fake copy failed");
    run_until(demotions_, t.value);
    run_until(promotions_, t.value);
    return {};
  }

  void release(const tier_place& p) override { free_range(p.offset, p.bytes); }

  const std::byte* host_bytes(const tier_place& p) const noexcept override {
    return memory_.data() + p.offset;
  }
  std::size_t capacity_bytes() const noexcept override {
    return memory_.size();
  }
  std::size_t used_bytes() const noexcept override { return used_; }
  std::size_t max_batch_bytes() const noexcept override { return max_batch; }

  /// Runs every queued demotion copy (the DMA finishing).
  void finish_demotions() { run_until(demotions_, next_); }
  /// Makes the oldest queued demotion fail instead of copying.
  void fail_oldest_demotion() {
    failed_ticket = demotions_.front().ticket;
    demotions_.erase(demotions_.begin());
  }

  errc fail_next = errc::ok;
  std::size_t max_batch = std::size_t{1} << 20;
  std::uint64_t failed_ticket = 0;
  int demote_calls = 0;
  int promote_calls = 0;
  int waits = 0;
  int* wait_counter = nullptr; ///< outlives the tier, when set

private:
  struct job {
    std::size_t arena_offset;
    std::size_t tier_offset;
    std::size_t bytes;
  };
  struct pending {
    std::uint64_t ticket = 0;
    bool to_arena = false;
    std::vector<job> jobs;
  };

  static std::size_t round(std::size_t n) { return (n + 255) / 256 * 256; }

  result<std::size_t> allocate(std::size_t bytes) {
    const std::size_t n = round(bytes);
    std::size_t at = 0;
    for (const auto& [o, len] : taken_) {
      if (o - at >= n)
        break;
      at = o + len;
    }
    if (at + n > memory_.size())
      return make_error(errc::out_of_memory, "full");
    taken_[at] = n;
    used_ += n;
    return at;
  }
  void free_range(std::size_t offset, std::size_t bytes) {
    const auto it = taken_.find(offset);
    if (it == taken_.end() || it->second != round(bytes)) {
      std::fprintf(stderr,
                   "fake_memory_tier: freeing a range never given "
                   "(offset %zu, %zu bytes)\n",
                   offset, bytes);
      std::abort();
    }
    used_ -= it->second;
    taken_.erase(it);
  }
  void run_until(std::vector<pending>& list, std::uint64_t ticket) {
    while (!list.empty() && list.front().ticket <= ticket) {
      for (const job& j : list.front().jobs) {
        if (list.front().to_arena)
          std::memcpy(arena_ + j.arena_offset, memory_.data() + j.tier_offset,
                      j.bytes);
        else
          std::memcpy(memory_.data() + j.tier_offset, arena_ + j.arena_offset,
                      j.bytes);
      }
      list.erase(list.begin());
    }
  }

  std::byte* arena_;
  std::vector<std::byte> memory_;
  std::map<std::size_t, std::size_t> taken_; // offset -> rounded bytes
  std::size_t used_ = 0;
  std::uint64_t next_ = 0;
  std::vector<pending> demotions_;
  std::vector<pending> promotions_;
};

} // namespace kvfleet::engine::testing
