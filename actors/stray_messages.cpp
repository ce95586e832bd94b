#include "actors/stray_messages.hpp"

#include <iostream>
#include <memory>

#include <caf/error.hpp>
#include <caf/message.hpp>
#include <caf/scheduled_actor.hpp>
#include <caf/sec.hpp>

namespace kvfleet::actors {

void handle_stray_messages(caf::scheduled_actor* self, const char* name) {
  self->set_default_handler(
      [](caf::scheduled_actor* actor,
         caf::message_view&) -> caf::result<caf::message> {
        if (actor->current_message_id().is_request())
          return caf::sec::unexpected_message;
        // An empty result answers nothing to a one-way message.
        return caf::message{};
      });
  auto logged = std::make_shared<bool>(false);
  self->set_error_handler(
      [name, logged](caf::scheduled_actor*, caf::error& err) {
        if (*logged)
          return;
        *logged = true;
        std::clog << "kvfleet " << name
                  << ": ignored an error message nobody asked for ("
                  << caf::to_string(err)
                  << "): an actor it sent a one-way message to did not "
                     "handle it; later ones are ignored without a line\n";
      });
}

bool sent_by_itself(caf::scheduled_actor* self) {
  return self->current_sender() == self->ctrl();
}

} // namespace kvfleet::actors
