#include "actors/router.hpp"

#include "actors/config_checks.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>

namespace kvfleet::actors {

std::string_view to_string(routing_policy p) noexcept {
  switch (p) {
  case routing_policy::round_robin:
    return "round_robin";
  case routing_policy::least_loaded:
    return "least_loaded";
  case routing_policy::kv_aware:
    return "kv_aware";
  }
  return "unknown";
}

result<routing_policy> parse_routing_policy(std::string_view s) {
  for (auto p : {routing_policy::round_robin, routing_policy::least_loaded,
                 routing_policy::kv_aware})
    if (s == to_string(p))
      return p;
  return make_error(errc::invalid_argument,
                    "unknown routing policy '" + std::string(s) +
                        "' (round_robin, least_loaded, kv_aware)");
}

result<void> validate(const router_config& c) {
  using end = end_point;
  // A NaN credit makes every score NaN (no engine compares lower), a
  // negative one steers requests away from the engines that hold their
  // prefix, and an overload factor above 1 raises the credit of the
  // engine it is meant to relieve.
  if (auto ok =
          check_range("router_config.credit_per_block", c.credit_per_block, 0.0,
                      end::closed, unbounded, end::open);
      !ok)
    return ok;
  if (auto ok = check_range("router_config.max_credit", c.max_credit, 0.0,
                            end::closed, unbounded, end::open);
      !ok)
    return ok;
  if (auto ok = check_range("router_config.overload_credit_factor",
                            c.overload_credit_factor, 0.0, end::closed, 1.0,
                            end::closed);
      !ok)
    return ok;
  if (c.policy != routing_policy::round_robin &&
      c.policy != routing_policy::least_loaded &&
      c.policy != routing_policy::kv_aware)
    return make_error(errc::invalid_argument,
                      "router_config.policy " +
                          std::to_string(static_cast<unsigned>(c.policy)) +
                          " is none of round_robin, least_loaded, kv_aware");
  if (c.max_index_keys == 0)
    return make_error(errc::invalid_argument,
                      "router_config.max_index_keys must be at least 1");
  return {};
}

result<router> router::create(router_config config) {
  if (auto ok = validate(config); !ok)
    return unexpected<error>{ok.error()};
  return router{config};
}

router::router(router_config config) : config_(config) {
  if (auto ok = validate(config_); !ok) {
    std::fprintf(stderr, "kvfleet: router: %s\n",
                 ok.error().describe().c_str());
    std::abort();
  }
}

namespace {

result<void> check_weight(double weight) {
  // A tiny weight still makes in_flight / weight infinite; pick() copes.
  if (weight > 0.0 && std::isfinite(weight))
    return {};
  return make_error(errc::invalid_argument,
                    "router: an engine's weight must be finite and > 0, not " +
                        std::to_string(weight));
}

} // namespace

result<std::uint32_t> router::add_slot(double weight, bool reuse) {
  for (std::uint32_t i = 0; reuse && i < slots_.size(); ++i) {
    if (slots_[i].removed)
      return take_slot(i, weight);
  }
  return take_slot(static_cast<std::uint32_t>(slots_.size()), weight);
}

result<std::uint32_t> router::take_slot(std::uint32_t slot, double weight) {
  if (auto ok = check_weight(weight); !ok)
    return unexpected<error>{ok.error()};
  const slot_state fresh{weight, 0, true, false, false, 0};
  if (slot < slots_.size()) {
    if (!slots_[slot].removed)
      return make_error(errc::invalid_argument,
                        "engine slot " + std::to_string(slot) +
                            " is in use: only a removed slot is taken");
    slots_[slot] = fresh;
    return slot;
  }
  if (slot > slots_.size())
    return make_error(errc::invalid_argument,
                      "engine slot " + std::to_string(slot) +
                          " does not exist: a new slot is number " +
                          std::to_string(slots_.size()));
  if (slots_.size() < max_slots) {
    slots_.push_back(fresh);
    return slot;
  }
  return make_error(errc::unavailable,
                    "no free engine slot: all " + std::to_string(max_slots) +
                        " are in use (retire an engine first)");
}

void router::remove_slot(std::uint32_t slot) {
  auto& s = slots_.at(slot);
  forget(slot);
  s.up = false;
  s.draining = false;
  s.in_flight = 0;
  s.removed = true;
}

void router::set_up(std::uint32_t slot, bool up) {
  auto& s = slots_.at(slot);
  if (s.up != up)
    forget(slot);
  s.up = up;
  if (!up)
    s.in_flight = 0;
}

void router::set_draining(std::uint32_t slot, bool draining) {
  slots_.at(slot).draining = draining;
}

result<void> router::set_weight(std::uint32_t slot, double weight) {
  if (auto ok = check_weight(weight); !ok)
    return ok;
  slots_.at(slot).weight = weight;
  return {};
}

std::size_t router::live_slots() const noexcept {
  return static_cast<std::size_t>(
      std::count_if(slots_.begin(), slots_.end(),
                    [this](const slot_state& s) { return eligible(s); }));
}

void router::started(std::uint32_t slot) {
  ++slots_.at(slot).in_flight;
}

void router::finished(std::uint32_t slot) {
  auto& s = slots_.at(slot);
  if (s.in_flight > 0)
    --s.in_flight;
}

void router::stored(std::uint32_t slot,
                    std::span<const engine::block_key> keys) {
  if (slot >= slots_.size() || !slots_[slot].up)
    return;
  const std::uint64_t bit = std::uint64_t{1} << slot;
  index_node* front_end = use_.newest;
  for (const auto& k : keys)
    if (auto* n = find_or_add(k, front_end);
        n != nullptr && (n->second.engines & bit) == 0) {
      n->second.engines |= bit;
      ++slots_[slot].keys;
    }
}

void router::uncount(std::uint64_t bits) noexcept {
  for (std::uint32_t s = 0; bits != 0; ++s, bits >>= 1)
    if ((bits & 1U) != 0)
      --slots_[s].keys;
}

void router::link_before(index_node& n, index_node* pos) {
  auto& e = n.second;
  e.older = pos;
  e.newer = pos != nullptr ? pos->second.newer : use_.oldest;
  (e.newer != nullptr ? e.newer->second.older : use_.newest) = &n;
  (pos != nullptr ? pos->second.newer : use_.oldest) = &n;
}

void router::unlink(index_node& n) {
  auto& e = n.second;
  (e.newer != nullptr ? e.newer->second.older : use_.newest) = e.older;
  (e.older != nullptr ? e.older->second.newer : use_.oldest) = e.newer;
  e.newer = nullptr;
  e.older = nullptr;
}

void router::mark_used(index_node& n, index_node*& front_end) {
  if (&n == front_end) {
    front_end = n.second.older; // already right after the call's earlier keys
    return;
  }
  unlink(n);
  link_before(n, front_end);
}

router::index_node* router::find_or_add(const engine::block_key& k,
                                        index_node*& front_end) {
  if (auto it = index_.find(k); it != index_.end()) {
    mark_used(*it, front_end);
    return &*it;
  }
  if (index_.size() < config_.max_index_keys) {
    auto& n = *index_.emplace(k, index_entry{}).first;
    link_before(n, front_end);
    return &n;
  }
  // Every entry is newer than `front_end` exactly when this call used them
  // all (null: the oldest end). The least recently used one is then one of
  // this call's earlier keys, nearer its prefix's start than `k`: replacing
  // it would keep a later key no prefix reaches past the hole, so `k` is
  // not indexed.
  if (front_end == nullptr)
    return nullptr;
  // Full: the least recently used key goes (a possible miss for a request
  // that would have found it), and its map node takes `k`, keeping its
  // place in the use order (the node, and so its address, is the same), so
  // a full index allocates nothing.
  auto node = index_.extract(use_.oldest->first);
  node.key() = k;
  uncount(node.mapped().engines);
  node.mapped().engines = 0;
  auto& n = *index_.insert(std::move(node)).position;
  mark_used(n, front_end);
  return &n;
}

void router::erase(index_map::iterator it) {
  unlink(*it);
  index_.erase(it);
}

void router::evicted(std::uint32_t slot,
                     std::span<const engine::block_key> keys) {
  if (slot >= slots_.size()) // no such slot holds anything (as stored())
    return;
  const std::uint64_t bit = std::uint64_t{1} << slot;
  for (const auto& k : keys) {
    auto it = index_.find(k);
    if (it == index_.end() || (it->second.engines & bit) == 0)
      continue;
    it->second.engines &= ~bit;
    --slots_[slot].keys;
    if (it->second.engines == 0)
      erase(it);
  }
}

void router::forget(std::uint32_t slot) {
  if (slots_[slot].keys == 0)
    return; // nothing to walk the index for
  const std::uint64_t bit = std::uint64_t{1} << slot;
  for (auto it = index_.begin(); it != index_.end();) {
    auto here = it++;
    here->second.engines &= ~bit;
    if (here->second.engines == 0)
      erase(here);
  }
  slots_[slot].keys = 0;
}

std::vector<engine::block_key> router::keys_of(std::uint32_t slot) const {
  std::vector<engine::block_key> out;
  if (slot >= slots_.size() || slots_[slot].keys == 0)
    return out;
  out.reserve(slots_[slot].keys);
  const std::uint64_t bit = std::uint64_t{1} << slot;
  for (const auto& [key, entry] : index_)
    if ((entry.engines & bit) != 0)
      out.push_back(key);
  return out;
}

std::size_t router::held_prefix(std::uint32_t slot,
                                std::span<const engine::block_key> keys) const {
  if (slot >= slots_.size())
    return 0;
  const std::uint64_t bit = std::uint64_t{1} << slot;
  std::size_t n = 0;
  for (const auto& k : keys) {
    auto it = index_.find(k);
    if (it == index_.end() || (it->second.engines & bit) == 0)
      break;
    ++n;
  }
  return n;
}

std::optional<route> router::pick(std::span<const engine::block_key> keys) {
  const auto n = static_cast<std::uint32_t>(slots_.size());
  if (live_slots() == 0)
    return std::nullopt;
  if (config_.policy == routing_policy::round_robin) {
    for (std::uint32_t i = 0; i < n; ++i) {
      std::uint32_t s = (next_rr_ + i) % n;
      if (eligible(slots_[s])) {
        next_rr_ = (s + 1) % n;
        return route{s, 0};
      }
    }
    return std::nullopt;
  }
  // Leading blocks held per slot, in one walk over the keys.
  held_scratch_.assign(n, 0);
  if (config_.policy == routing_policy::kv_aware) {
    std::uint64_t alive = 0;
    for (std::uint32_t s = 0; s < n; ++s)
      if (eligible(slots_[s]))
        alive |= std::uint64_t{1} << s;
    // A key some live engine's matched prefix reaches counts as used.
    index_node* front_end = use_.newest;
    std::size_t i = 0;
    for (; i < keys.size() && alive != 0; ++i) {
      auto it = index_.find(keys[i]);
      std::uint64_t has = it == index_.end() ? 0 : it->second.engines;
      if ((has & alive) != 0)
        mark_used(*it, front_end);
      std::uint64_t dropped = alive & ~has;
      for (std::uint32_t s = 0; s < n; ++s)
        if ((dropped >> s) & 1U)
          held_scratch_[s] = i;
      alive &= has;
    }
    for (std::uint32_t s = 0; s < n; ++s)
      if ((alive >> s) & 1U)
        held_scratch_[s] = i;
  }
  // The least loaded live engine's load (in_flight / weight lowest), as
  // the overload rule says. Before, the smallest backlog of any engine:
  // with unequal weights a light engine's few requests withdrew the credit
  // of a heavy one less loaded than it.
  const slot_state* least = nullptr;
  for (const auto& s : slots_) {
    if (!eligible(s))
      continue;
    if (least == nullptr ||
        static_cast<double>(s.in_flight) / s.weight <
            static_cast<double>(least->in_flight) / least->weight)
      least = &s;
  }
  // kv_aware: equal scores (idle engines, say) do not all go to the lowest
  // slot: under sequential traffic that slot took every request and every
  // new prefix, the others' memory unused. On a tie it takes the engine
  // holding more of the request's prefix, then the one the index says
  // holds fewer blocks per weight (a new prefix goes where there is room),
  // then the first from a start that moves on past each pick.
  // least_loaded keeps the lowest slot on a tie: it knows nothing of the
  // blocks, and sequential requests of one prompt then meet its blocks on
  // the engine they went to (turns would send them to one engine each).
  const bool kv = config_.policy == routing_policy::kv_aware;
  const auto fuller = [&](std::uint32_t a, std::uint32_t b) {
    return static_cast<double>(slots_[a].keys) / slots_[a].weight >
           static_cast<double>(slots_[b].keys) / slots_[b].weight;
  };
  std::optional<route> best;
  double best_score = std::numeric_limits<double>::infinity();
  const std::uint32_t start = kv ? next_tie_ % n : 0;
  for (std::uint32_t i = 0; i < n; ++i) {
    const std::uint32_t s = (start + i) % n;
    const auto& st = slots_[s];
    if (!eligible(st))
      continue;
    double score = static_cast<double>(st.in_flight) / st.weight;
    if (config_.policy == routing_policy::kv_aware && held_scratch_[s] > 0) {
      double credit = std::min(config_.max_credit,
                               config_.credit_per_block *
                                   static_cast<double>(held_scratch_[s]));
      // Its backlog against what it would hold at the least loaded
      // engine's load (its own weight's share): with equal weights, the
      // least loaded engine's backlog, compared exactly. (64-bit: a margin
      // near 2^32 must not wrap the sum to a small one.)
      const bool overloaded =
          st.weight == least->weight
              ? st.in_flight >
                    std::uint64_t{least->in_flight} + config_.backlog_margin
              : static_cast<double>(st.in_flight) >
                    static_cast<double>(least->in_flight) / least->weight *
                            st.weight +
                        static_cast<double>(config_.backlog_margin);
      if (overloaded)
        credit *= config_.overload_credit_factor;
      score -= credit;
    }
    // The first eligible slot is taken even when its score is infinite
    // (a tiny weight): a live engine is never "none".
    const bool better = !best || score < best_score ||
                        (kv && score == best_score &&
                         (held_scratch_[s] > best->expected_hit_blocks ||
                          (held_scratch_[s] == best->expected_hit_blocks &&
                           fuller(best->slot, s))));
    if (better) {
      best_score = score;
      best = route{s, held_scratch_[s]};
    }
  }
  if (best && kv)
    next_tie_ = (best->slot + 1) % n;
  return best;
}

} // namespace kvfleet::actors
