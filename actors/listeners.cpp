#include "actors/listeners.hpp"

#include <algorithm>

#include <caf/actor_addr.hpp>
#include <caf/scheduled_actor.hpp>

namespace kvfleet::actors {

bool add_listener(caf::scheduled_actor* self,
                  std::vector<caf::actor>& listeners,
                  const caf::actor& listener) {
  if (!listener || listener.address() == self->address() ||
      std::find(listeners.begin(), listeners.end(), listener) !=
          listeners.end())
    return false;
  self->monitor(listener);
  listeners.push_back(listener);
  return true;
}

bool drop_listener(std::vector<caf::actor>& listeners,
                   const caf::actor_addr& gone) {
  return std::erase_if(listeners, [&](const caf::actor& l) {
           return l.address() == gone;
         }) > 0;
}

} // namespace kvfleet::actors
