// The native replication data plane, as the NBD data path sees it (repl_plane.cc has the design).
//
// A Plane belongs to one replicated device for its whole life; a Transport is one connection to the peer (its
// data and meta sockets, taken over from JavaScript after the handshake). The NBD data path's workers admit a
// WRITE or FLUSH into the plane, ship it to the peer, do their local part and report it; the plane answers the
// NBD client once the protocol's condition holds (possibly later, from the thread that reads the peer's acks,
// through the ReplySink of the connection).
#pragma once

#include <napi.h>
#include <stddef.h>
#include <stdint.h>

#include <memory>

namespace drbdts_repl {

struct Completion {
  uint8_t cookie[8];
  uint32_t error;  // NBD error number, 0 for success
};

// An NBD connection's data path: sends the simple replies of writes the plane completes.
class ReplySink {
 public:
  virtual ~ReplySink() = default;
  virtual void SendCompletions(const Completion* completions, size_t count) = 0;
};

struct Ticket;
class Plane;

// The Plane behind a JavaScript ReplPlane object; null for anything else.
std::shared_ptr<Plane> PlaneFromValue(Napi::Value value);

// Admits a WRITE (length > 0) or FLUSH (length 0) while the plane is open and its conditions hold (connected, the
// write's activity-log extents pinned, a free slot); null when the request must go to JavaScript instead.
Ticket* Admit(Plane& plane, ReplySink* sink, const uint8_t cookie[8], bool flush, uint64_t offset, uint32_t length,
              bool fua);
// Waits until every earlier admitted write that overlaps this one is on the local disk (and so on the wire).
void WaitTurn(Plane& plane, Ticket* ticket);
// Sends the DATA frame with the payload from memory, or with the payload spliced from a pipe (a tee of the one
// the local write splices from), or the BARRIER of a FLUSH. A broken link is not an error here: the plane marks
// the write out of sync before it answers.
// `more`: another request is already waiting; a small frame may wait in the batch for it (see Flush).
void ShipBuffer(Plane& plane, Ticket* ticket, const uint8_t* data, bool more);
// ShipPipe: false when bytes may be left in the pipe (the link broke), which the caller then empties.
bool ShipPipe(Plane& plane, Ticket* ticket, int pipeRead);
void ShipBarrier(Plane& plane, Ticket* ticket);
// Sends frames a ShipBuffer(more) left in the batch: called before a worker waits for its client.
void Flush(Plane& plane);
// The local part is done with `nbdError` (0: success). True: the caller replies now with *replyError; false: the
// plane replies through the sink later.
bool LocalDone(Plane& plane, Ticket* ticket, uint32_t nbdError, uint32_t* replyError);
// A READ the data path served from the local disk of a replicated device (for the device's counters).
void CountRead(Plane& plane, uint64_t bytes);
// The request's payload never arrived (the client went away): forget the ticket, nothing was shipped.
void Abandon(Plane& plane, Ticket* ticket);

}  // namespace drbdts_repl
