#pragma once
/// What every kvfleet actor does with messages it does not expect.
///
/// - A request it does not know gets sec::unexpected_message (the node API
///   maps it to errc::invalid_argument): never silence.
/// - A one-way message it does not know is dropped. Answering it would send
///   its sender an error message nobody asked for, and CAF 0.17 ends an
///   actor on an error message it has no handler for: a listener that did
///   not handle one of the events the balancer or an engine sends it (or an
///   engine subscribed to its own balancer) ended the sender, and with the
///   balancer every engine.
/// - A stray error message (an answer to one of its own one-way messages,
///   from an actor that did not know it) is dropped, the first one per
///   actor with a line on stderr naming the actor, instead of ending it.

#include <caf/fwd.hpp>

namespace kvfleet::actors {

/// Installs the default and error handlers above on `self`, an actor named
/// `name` in the stderr line.
void handle_stray_messages(caf::scheduled_actor* self, const char* name);

/// Whether the message `self` is handling is one it sent itself (a timer,
/// `delayed_send(self, ...)`): a timer's atom from anyone else would start
/// another timer chain, or claim a deadline passed that did not.
[[nodiscard]] bool sent_by_itself(caf::scheduled_actor* self);

} // namespace kvfleet::actors
