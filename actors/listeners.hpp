#pragma once
/// The subscribers of an actor's one-way events (block_events,
/// observations), as the balancer, the engine actor and the query cache
/// keep them.
///
/// Each listener is taken once (a second subscription would double every
/// event it gets), never the actor itself (the balancer forwards every
/// block_events it gets to its listeners, so it would send itself its own
/// events for ever), and only while it lives: the actor monitors it and its
/// down handler drops it, so a listener that comes and goes leaves nothing
/// behind.

#include <vector>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

namespace kvfleet::actors {

/// Adds `listener` to `listeners`, monitored by `self`, unless it is null,
/// `self` or there already. True when added.
bool add_listener(caf::scheduled_actor* self,
                  std::vector<caf::actor>& listeners,
                  const caf::actor& listener);

/// Drops the listener at `gone` (a down message's source) from
/// `listeners`; true when one was there.
bool drop_listener(std::vector<caf::actor>& listeners,
                   const caf::actor_addr& gone);

} // namespace kvfleet::actors
