// The native replication data plane: replicated writes without JavaScript on the way (docs/replication.md,
// "The native data plane").
//
// JavaScript stays the control plane. It authenticates the two peer sockets, then hands them to a Transport here,
// which from then on is the only reader and writer of both: JavaScript sends its frames (handshake state, bitmaps,
// resync, acks of the writes it applies) through the Transport's queues, and gets every frame the plane does not
// handle itself as an event, in the order it arrived.
//
// Primary: the NBD data path's workers (nbd_data_path.cc) admit WRITE and FLUSH into the Plane (one per device,
// living across connections) while JavaScript keeps it open: Connected, shipping, protocol B or C, not
// dual-primary, no resync or verify, no write of JavaScript's own in flight, and only into the activity-log
// extents JavaScript pinned for it. A worker ships the DATA frame (small payloads copied into the data socket's
// batch, large ones spliced from a tee of the pipe the local write splices from, so a payload is copied once, into
// the page cache), writes locally, and reports; the meta socket's reader takes the acks and answers the NBD
// clients, every reply of one read in one writev per connection. Overlapping writes wait for the earlier one's
// local write (it is on the wire before that), so they land in the same order on both disks.
// Anything else (a cold extent, a full plane, a closed plane) is handed back to JavaScript, which first closes the
// plane and waits until every native write was acked (or marked), so the two paths never interleave.
//
// Secondary: while armed, the data socket's reader writes DATA frames itself, in arrival order, and acks them on
// the meta socket (RECV_ACK first for protocol B; WRITE_ACK or NEG_ACK after the local write; acks of one read
// batched); BARRIER is answered after fdatasync. Any other frame that changes the disk (TRIM, ZERO, resync data, a
// DATA frame with flags it does not know) disarms it and goes to JavaScript with everything after it, until
// JavaScript, idle, re-arms it having seen every such frame (no reordering between the two).
//
// Link failure: every native write not yet acked by the peer is sent to JavaScript to be set in the bitmap, and is
// answered only once JavaScript confirmed that (a MARK event and releaseMarks), as the JavaScript path does.
// Ids: native writes and barriers use ids with the top bit set; JavaScript's stay below, so each side knows its
// acks. The wire format is the JavaScript path's (src/replication/frame.ts): either side can run either path.

#include "repl_plane.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace drbdts_repl {
namespace {

constexpr uint32_t kMagic = 0x44524254;  // 'DRBT'
constexpr size_t kHeaderBytes = 24;
constexpr uint32_t kBodyMax = 33u * 1024 * 1024;
constexpr uint16_t kPing = 20, kPingAck = 21;
constexpr uint16_t kData = 30, kTrim = 31, kZero = 32, kRecvAck = 33, kWriteAck = 34, kNegAck = 35, kBarrier = 36,
                   kBarrierAck = 37;
constexpr uint16_t kRsReply = 51;
constexpr uint16_t kFlagFua = 1;
constexpr int kChannelData = 0, kChannelMeta = 1;
constexpr uint32_t kNativeIdBit = 0x80000000u;
constexpr uint64_t kExtentBytes = 4ull * 1024 * 1024;
/** Payloads up to this size are copied into the data socket's batch; larger ones are sent from where they are. */
constexpr uint32_t kBatchPayloadMax = 64 * 1024;
/** A worker adding to a batch this full waits for the socket (backpressure toward the NBD client). */
constexpr size_t kQueueBytesMax = 8 * 1024 * 1024;
constexpr size_t kReadBufferBytes = 256 * 1024;
// A Secondary splices a DATA payload from the socket to the file when at least this much of it is still to come.
constexpr size_t kSpliceReceiveMin = 64 * 1024;
/** Frames with a body this large are written from the caller's memory when the socket is idle. */
constexpr size_t kDirectBodyMin = 16 * 1024;
constexpr int kSocketBufferBytes = 8 * 1024 * 1024;
/** A deferred batch is sent once it holds this much, whatever comes next. */
constexpr size_t kDeferBytesMax = 32 * 1024;
/** Acks (and NBD replies) wait for the rest of a read burst, up to this many frames. */
constexpr size_t kAckBatchMax = 16;

// Bytes waiting in a socket's receive queue (0 when unknown).
int PendingBytes(int fd) {
  int pending = 0;
  if (ioctl(fd, FIONREAD, &pending) != 0) return 0;
  return pending;
}

void Put16(uint8_t* p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xff; }
void Put32(uint8_t* p, uint32_t v) { p[0] = v >> 24; p[1] = (v >> 16) & 0xff; p[2] = (v >> 8) & 0xff; p[3] = v & 0xff; }
uint16_t Get16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }
uint32_t Get32(const uint8_t* p) {
  return (static_cast<uint32_t>(p[0]) << 24) | (static_cast<uint32_t>(p[1]) << 16) | (static_cast<uint32_t>(p[2]) << 8) | p[3];
}

void PutHeader(uint8_t* p, uint16_t type, uint16_t flags, uint32_t length, uint32_t id, uint64_t offset) {
  Put32(p, kMagic);
  Put16(p + 4, type);
  Put16(p + 6, flags);
  Put32(p + 8, length);
  Put32(p + 12, id);
  Put32(p + 16, static_cast<uint32_t>(offset >> 32));
  Put32(p + 20, static_cast<uint32_t>(offset));
}

double NowMs() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<double>(ts.tv_sec) * 1000.0 + static_cast<double>(ts.tv_nsec) / 1e6;
}


}  // namespace

class Transport;

enum EventKind : int {
  kEventFrame = 0,    // a frame for JavaScript
  kEventClosed = 1,   // the transport broke (text = reason)
  kEventDrained = 2,  // the data socket's queue emptied (asked for by wantDrain)
  kEventMark = 3,     // set these ranges in the bitmap, then releaseMarks(token)
  kEventQuiesced = 4, // the plane is closed and no native write is in flight any more
  kEventPeerWriteFailed = 5,  // a peer write failed on this disk (range; NEG_ACK sent): bitmap and log
};

struct Event {
  int kind = 0;
  uint32_t transport = 0;
  int channel = 0;
  uint16_t type = 0;
  uint16_t flags = 0;
  uint32_t id = 0;
  uint64_t offset = 0;
  uint8_t* body = nullptr;
  size_t bodyBytes = 0;
  std::string text;
  uint64_t token = 0;
  std::vector<std::pair<uint64_t, uint32_t>> ranges;
};

struct Ticket {
  ReplySink* sink = nullptr;
  uint8_t cookie[8];
  uint64_t offset = 0;
  uint32_t length = 0;
  uint32_t seq = 0;
  uint64_t order = 0;
  bool flush = false;
  bool fua = false;
  bool needWritten = false;
  bool needReceived = false;
  bool registered = false;  // in bySeq_: an ack or a break settles its peer part
  bool localDone = false;
  bool peerReceived = false;
  bool peerWritten = false;
  bool marking = false;     // handed to JavaScript for the bitmap, not confirmed yet
  bool marked = false;
  bool replied = false;
  uint32_t localError = 0;
  Ticket* nextFree = nullptr;
};

class Plane : public std::enable_shared_from_this<Plane> {
 public:
  explicit Plane(Napi::ThreadSafeFunction tsfn) : tsfn_(tsfn) {}
  ~Plane() {
    std::lock_guard<std::mutex> lock(eventMutex_);
    for (Event& event : events_) free(event.body);
    events_.clear();
    while (free_ != nullptr) {
      Ticket* next = free_->nextFree;
      delete free_;
      free_ = next;
    }
  }

  // ---- JavaScript's control ----

  // Opens admission. `pinned`: one byte per 4 MiB extent, nonzero where JavaScript holds the extent hot for us.
  bool Open(int protocol, uint32_t maxInFlight, const uint8_t* pinned, size_t extents) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (transport_ == nullptr || transportBroken_) return false;
    protocol_ = protocol;
    maxInFlight_ = std::max<uint32_t>(1, maxInFlight);
    pinned_.assign(pinned, pinned + extents);
    quiesceWanted_ = false;
    open_ = true;
    return true;
  }

  void Pin(size_t extent) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (extent < pinned_.size()) pinned_[extent] = 1;
  }

  // Stops admission. True when nothing is in flight (JavaScript may go on at once); else a QUIESCED event follows.
  bool Close() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = false;
    if (inFlight_ == 0) {
      quiesceWanted_ = false;
      return true;
    }
    quiesceWanted_ = true;
    return false;
  }

  uint32_t InFlight() {
    std::lock_guard<std::mutex> lock(mutex_);
    return inFlight_;
  }

  void ReleaseMarks(uint64_t token) {
    std::vector<Completion> batch;
    std::vector<ReplySink*> sinks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = marks_.find(token);
      if (found == marks_.end()) return;
      std::vector<Ticket*> tickets = std::move(found->second);
      marks_.erase(found);
      for (Ticket* ticket : tickets) {
        ticket->marking = false;
        ticket->marked = true;
        SettleLocked(ticket, &batch, &sinks);
      }
    }
    SendBatch(batch, sinks);
  }

  // ---- the transport ----

  void Attach(const std::shared_ptr<Transport>& transport) {
    std::lock_guard<std::mutex> lock(mutex_);
    transport_ = transport;
    transportBroken_ = false;
    open_ = false;
  }

  // The transport broke: no ack will come for what is registered. Everything goes to JavaScript's bitmap.
  void TransportBroken(Transport* transport) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (transport_.get() != transport) return;
    transportBroken_ = true;
    open_ = false;
    std::vector<Ticket*> unacked;
    for (auto& entry : bySeq_) {
      Ticket* ticket = entry.second;
      ticket->registered = false;
      if (!ticket->peerWritten) unacked.push_back(ticket);
    }
    bySeq_.clear();
    MarkLocked(unacked);
  }

  std::shared_ptr<Transport> CurrentTransport() {
    std::lock_guard<std::mutex> lock(mutex_);
    return transport_;
  }

  void Detach(Transport* transport) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (transport_.get() == transport) transport_.reset();
  }

  // Acks for our ids (meta socket reader), under one lock. Completions are collected until FlushCompletions.
  void OnAcks(const std::vector<std::pair<uint16_t, uint32_t>>& acks) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& ack : acks) OnAckLocked(ack.first, ack.second);
  }

  void OnAckLocked(uint16_t type, uint32_t id) {
    auto found = bySeq_.find(id);
    if (found == bySeq_.end()) return;  // after a break: already marked
    Ticket* ticket = found->second;
    if (type == kRecvAck) {
      ticket->peerReceived = true;
    } else {
      bySeq_.erase(found);
      ticket->registered = false;
      ticket->peerWritten = true;
      if (type == kNegAck) {
        // The peer could not write it: its copy of these blocks is stale.
        std::vector<Ticket*> one{ticket};
        MarkLocked(one);
      }
    }
    SettleLocked(ticket, &pendingBatch_, &pendingSinks_);
  }

  void FlushCompletions() {
    std::vector<Completion> batch;
    std::vector<ReplySink*> sinks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (pendingBatch_.empty()) return;
      batch.swap(pendingBatch_);
      sinks.swap(pendingSinks_);
    }
    SendBatch(batch, sinks);
  }

  // ---- the NBD data path ----

  Ticket* AdmitImpl(ReplySink* sink, const uint8_t cookie[8], bool flush, uint64_t offset, uint32_t length, bool fua) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!open_ || transport_ == nullptr || transportBroken_ || inFlight_ >= maxInFlight_) return nullptr;
    if (!flush) {
      uint64_t first = offset / kExtentBytes;
      uint64_t last = (offset + length - 1) / kExtentBytes;
      for (uint64_t extent = first; extent <= last; extent += 1) {
        if (extent >= pinned_.size() || pinned_[extent] == 0) return nullptr;
      }
    }
    Ticket* ticket = free_;
    if (ticket != nullptr) free_ = ticket->nextFree;
    else ticket = new Ticket();
    *ticket = Ticket();
    ticket->sink = sink;
    memcpy(ticket->cookie, cookie, 8);
    ticket->flush = flush;
    ticket->fua = fua;
    ticket->offset = offset;
    ticket->length = length;
    ticket->order = nextOrder_++;
    ticket->seq = kNativeIdBit | (nextSeq_++ & ~kNativeIdBit);
    ticket->needWritten = flush || fua || protocol_ == 'C';
    ticket->needReceived = protocol_ == 'B';
    if (!flush) active_.push_back(ticket);
    inFlight_ += 1;
    return ticket;
  }

  void WaitTurnImpl(Ticket* ticket) {
    std::unique_lock<std::mutex> lock(mutex_);
    turnWaiters_ += 1;
    turnCv_.wait(lock, [&] {
      for (Ticket* other : active_) {
        if (other == ticket) return true;  // active_ is in admission order: nothing earlier overlaps
        if (other->offset < ticket->offset + ticket->length && ticket->offset < other->offset + other->length) return false;
      }
      return true;
    });
    turnWaiters_ -= 1;
  }

  // Registers the ticket for its ack before the frame can leave; false when the link is gone (then marked).
  bool Register(Ticket* ticket, std::shared_ptr<Transport>* transport) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (transport_ == nullptr || transportBroken_) {
      std::vector<Ticket*> one{ticket};
      MarkLocked(one);
      return false;
    }
    *transport = transport_;
    bySeq_[ticket->seq] = ticket;
    ticket->registered = true;
    return true;
  }

  bool LocalDoneImpl(Ticket* ticket, uint32_t nbdError, uint32_t* replyError) {
    bool now = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ticket->localDone = true;
      ticket->localError = nbdError;
      if (!ticket->flush) {
        auto at = std::find(active_.begin(), active_.end(), ticket);
        if (at != active_.end()) active_.erase(at);
        if (turnWaiters_ > 0) turnCv_.notify_all();
      }
      if (nbdError != 0 && !ticket->flush && !ticket->marking && !ticket->marked) {
        // The peer has (or will have) what this disk failed to hold: the blocks differ, the bitmap must say so.
        std::vector<Ticket*> one{ticket};
        MarkLocked(one);
      }
      if (nbdError == 0 && !ticket->flush) {
        writes_ += 1;
        writeBytes_ += ticket->length;
      }
      if (Completable(ticket)) {
        ticket->replied = true;
        *replyError = ticket->localError;
        now = true;
        RetireIfDoneLocked(ticket);
      }
    }
    return now;
  }

  void AbandonImpl(Ticket* ticket) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto at = std::find(active_.begin(), active_.end(), ticket);
    if (at != active_.end()) active_.erase(at);
    turnCv_.notify_all();
    ticket->replied = true;
    ticket->localDone = true;
    ticket->peerWritten = true;
    RetireIfDoneLocked(ticket);
  }

  std::atomic<uint64_t> writes_{0};
  std::atomic<uint64_t> writeBytes_{0};
  std::atomic<uint64_t> readBytes_{0};
  std::atomic<uint64_t> peerWrites_{0};
  std::atomic<uint64_t> peerWriteBytes_{0};

  // ---- events to JavaScript ----

  void Post(Event&& event) {
    bool ring = false;
    {
      std::lock_guard<std::mutex> lock(eventMutex_);
      events_.push_back(std::move(event));
      if (!doorbell_) {
        doorbell_ = true;
        ring = true;
      }
    }
    if (ring) {
      // The plane outlives the call: JavaScript's object holds a reference until destroy().
      if (tsfn_.NonBlockingCall(this, [](Napi::Env env, Napi::Function callback, Plane* plane) {
            if (env != nullptr && callback != nullptr) plane->Deliver(env, callback);
          }) != napi_ok) {
        std::lock_guard<std::mutex> lock(eventMutex_);
        doorbell_ = false;
      }
    }
  }

  void Deliver(Napi::Env env, Napi::Function callback) {
    std::vector<Event> events;
    {
      std::lock_guard<std::mutex> lock(eventMutex_);
      events.swap(events_);
      doorbell_ = false;
    }
    Napi::Array list = Napi::Array::New(env, events.size());
    for (size_t i = 0; i < events.size(); i += 1) {
      Event& event = events[i];
      Napi::Object object = Napi::Object::New(env);
      object.Set("kind", event.kind);
      object.Set("transport", event.transport);
      switch (event.kind) {
        case kEventFrame: {
          object.Set("channel", event.channel);
          object.Set("type", event.type);
          object.Set("flags", event.flags);
          object.Set("id", event.id);
          object.Set("offset", static_cast<double>(event.offset));
          // The body read for it becomes the Buffer itself (freed by its finalizer): no copy.
          Napi::Buffer<uint8_t> body = event.body == nullptr
              ? Napi::Buffer<uint8_t>::New(env, 0)
              : Napi::Buffer<uint8_t>::New(env, event.body, event.bodyBytes, [](Napi::Env, uint8_t* data) { free(data); });
          event.body = nullptr;
          object.Set("body", body);
          break;
        }
        case kEventClosed:
          object.Set("reason", event.text);
          break;
        case kEventMark:
        case kEventPeerWriteFailed: {
          object.Set("token", static_cast<double>(event.token));
          Napi::Array ranges = Napi::Array::New(env, event.ranges.size() * 2);
          for (size_t r = 0; r < event.ranges.size(); r += 1) {
            ranges.Set(static_cast<uint32_t>(r * 2), static_cast<double>(event.ranges[r].first));
            ranges.Set(static_cast<uint32_t>(r * 2 + 1), event.ranges[r].second);
          }
          object.Set("ranges", ranges);
          if (!event.text.empty()) object.Set("reason", event.text);
          break;
        }
        default:
          break;
      }
      list.Set(static_cast<uint32_t>(i), object);
    }
    callback.Call({list});
  }

  Napi::ThreadSafeFunction tsfn_;

 private:
  bool Completable(const Ticket* ticket) const {
    if (ticket->replied || !ticket->localDone || ticket->marking) return false;
    if (ticket->marked) return true;
    bool peerOk = (!ticket->needWritten || ticket->peerWritten) &&
                  (!ticket->needReceived || ticket->peerReceived || ticket->peerWritten);
    return peerOk;
  }

  void SettleLocked(Ticket* ticket, std::vector<Completion>* batch, std::vector<ReplySink*>* sinks) {
    if (Completable(ticket)) {
      ticket->replied = true;
      Completion completion;
      memcpy(completion.cookie, ticket->cookie, 8);
      completion.error = ticket->localError;
      batch->push_back(completion);
      sinks->push_back(ticket->sink);
    }
    RetireIfDoneLocked(ticket);
  }

  void RetireIfDoneLocked(Ticket* ticket) {
    if (!ticket->replied || ticket->registered || ticket->marking) return;
    if (!ticket->peerWritten && !ticket->marked) return;
    ticket->nextFree = free_;
    free_ = ticket;
    inFlight_ -= 1;
    if (inFlight_ == 0 && quiesceWanted_) {
      quiesceWanted_ = false;
      Event event;
      event.kind = kEventQuiesced;
      Post(std::move(event));
    }
  }

  void MarkLocked(const std::vector<Ticket*>& tickets) {
    if (tickets.empty()) return;
    Event event;
    event.kind = kEventMark;
    event.token = nextToken_++;
    std::vector<Ticket*>& list = marks_[event.token];
    for (Ticket* ticket : tickets) {
      if (ticket->marking || ticket->marked) continue;
      ticket->marking = true;
      list.push_back(ticket);
      if (!ticket->flush) event.ranges.emplace_back(ticket->offset, ticket->length);
    }
    if (list.empty()) {
      marks_.erase(event.token);
      return;
    }
    Post(std::move(event));
  }

  // Sends the NBD replies, grouped by connection, in completion order within each.
  static void SendBatch(std::vector<Completion>& batch, std::vector<ReplySink*>& sinks) {
    size_t start = 0;
    while (start < batch.size()) {
      ReplySink* sink = sinks[start];
      // Gather this sink's completions (usually all of them: one NBD connection).
      std::vector<Completion> mine;
      size_t next = batch.size();
      for (size_t i = start; i < batch.size(); i += 1) {
        if (sinks[i] == sink) {
          mine.push_back(batch[i]);
          sinks[i] = nullptr;
        } else if (sinks[i] != nullptr && next == batch.size()) {
          next = i;
        }
      }
      sink->SendCompletions(mine.data(), mine.size());
      start = next;
    }
  }

  std::mutex mutex_;
  std::condition_variable turnCv_;
  int turnWaiters_ = 0;
  bool open_ = false;
  bool quiesceWanted_ = false;
  int protocol_ = 'C';
  uint32_t maxInFlight_ = 1;
  std::vector<uint8_t> pinned_;
  std::vector<Ticket*> active_;
  std::unordered_map<uint32_t, Ticket*> bySeq_;
  std::unordered_map<uint64_t, std::vector<Ticket*>> marks_;
  uint64_t nextToken_ = 1;
  uint32_t inFlight_ = 0;
  uint32_t nextSeq_ = 1;
  uint64_t nextOrder_ = 1;
  Ticket* free_ = nullptr;
  std::shared_ptr<Transport> transport_;
  bool transportBroken_ = false;
  std::vector<Completion> pendingBatch_;
  std::vector<ReplySink*> pendingSinks_;

  std::mutex eventMutex_;
  std::vector<Event> events_;
  bool doorbell_ = false;
};

// ------------------------------------------------------------------------------------------------ the transport

// One socket's sending side. Frames are appended to a batch; whoever finds the socket idle writes the whole batch
// (what others appended meanwhile goes in the same writev), so a burst of frames costs one system call. A writer
// that may not block (JavaScript's thread) leaves the rest to the pump thread when the socket is full. Large
// payloads are written from where they are (memory or a pipe), the batch first, with the socket held.
struct Sender {
  int fd = -1;
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<uint8_t> queue;
  std::vector<uint8_t> sending;
  bool busy = false;
  bool pumpWanted = false;
  bool broken = false;
  bool stop = false;
  bool drainWanted = false;
  /** The pump waits on its own condition; `cv` is for threads waiting for room or for the socket to be free. */
  std::condition_variable pumpCv;
  int waiters = 0;
  std::atomic<uint64_t> queuedBytes{0};
  std::atomic<uint64_t> sentBytes{0};
  std::thread pump;
};

class Transport : public std::enable_shared_from_this<Transport> {
 public:
  Transport(std::shared_ptr<Plane> plane, uint32_t id, int dataFd, int metaFd, int fileFd, uint64_t sizeBytes,
            std::vector<uint8_t> validTypes, std::vector<uint8_t> dataLeftover, std::vector<uint8_t> metaLeftover)
      : plane_(std::move(plane)), id_(id), fileFd_(fileFd), sizeBytes_(sizeBytes), validTypes_(std::move(validTypes)) {
    senders_[kChannelData].fd = dataFd;
    senders_[kChannelMeta].fd = metaFd;
    leftover_[kChannelData] = std::move(dataLeftover);
    leftover_[kChannelMeta] = std::move(metaLeftover);
    abortFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pauseFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    lastMetaMs_.store(NowMs());
  }

  ~Transport() {
    Shutdown("transport destroyed");
    Join();
    for (int channel = 0; channel < 2; channel += 1) close(senders_[channel].fd);
    close(fileFd_);
    if (abortFd_ >= 0) close(abortFd_);
    if (pauseFd_ >= 0) close(pauseFd_);
  }

  bool Ok() const { return abortFd_ >= 0 && pauseFd_ >= 0; }

  void Start() {
    // JavaScript no longer reads or writes these sockets: native threads block in recv and send themselves
    // (no poll per wait); a thread that must not block (JavaScript's) sends with MSG_DONTWAIT.
    for (int channel = 0; channel < 2; channel += 1) {
      int fd = senders_[channel].fd;
      int flags = fcntl(fd, F_GETFL);
      if (flags >= 0) fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    }
    // Room for a burst of large writes in flight on the data socket: a 1 MiB payload spliced into a socket with a
    // small send buffer waits (a sleep and a wake-up) once per window update. Root may exceed the sysctl limits.
    int bytes = kSocketBufferBytes;
    int fd = senders_[kChannelData].fd;
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes) != 0) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) != 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
    for (int channel = 0; channel < 2; channel += 1) {
      senders_[channel].pump = std::thread([this, channel] { Pump(channel); });
      readers_[channel] = std::thread([this, channel] { ReadLoop(channel); });
    }
  }

  void Join() {
    for (int channel = 0; channel < 2; channel += 1) {
      Sender& sender = senders_[channel];
      {
        std::lock_guard<std::mutex> lock(sender.mutex);
        sender.stop = true;
        sender.cv.notify_all();
        sender.pumpCv.notify_all();
      }
      if (sender.pump.joinable()) sender.pump.join();
      if (readers_[channel].joinable()) readers_[channel].join();
    }
  }

  uint32_t id() const { return id_; }

  // ---- sending ----

  // Appends bytes (whole frames) to a socket's batch and writes if nobody is. `mayBlock`: a native thread that may
  // wait for the socket (and, past kQueueBytesMax, for room in the batch). False once the transport broke.
  bool Enqueue(int channel, const uint8_t* header, size_t headerBytes, const uint8_t* body, size_t bodyBytes,
               bool mayBlock, bool defer = false) {
    Sender& sender = senders_[channel];
    std::unique_lock<std::mutex> lock(sender.mutex);
    if (mayBlock && sender.queue.size() >= kQueueBytesMax) {
      sender.waiters += 1;
      sender.cv.wait(lock, [&] { return sender.broken || sender.queue.size() < kQueueBytesMax; });
      sender.waiters -= 1;
    }
    if (sender.broken) return false;
    if (!sender.busy && sender.queue.empty() && !defer && bodyBytes >= kDirectBodyMin) {
      return SendDirectLocked(channel, lock, header, headerBytes, body, bodyBytes, mayBlock);
    }
    sender.queue.insert(sender.queue.end(), header, header + headerBytes);
    if (bodyBytes > 0) sender.queue.insert(sender.queue.end(), body, body + bodyBytes);
    sender.queuedBytes.fetch_add(headerBytes + bodyBytes);
    if (sender.busy) return true;
    // More of the same burst is on its way (another request is waiting): it goes in the same send.
    if (defer && sender.queue.size() < kDeferBytesMax) return true;
    sender.busy = true;
    DrainLocked(channel, lock, mayBlock);
    return true;
  }

  // A large frame on an idle socket is written from the caller's memory (one writev, no copy into the batch);
  // only what the socket does not take now (a caller that may not wait) is copied, in front of the batch.
  bool SendDirectLocked(int channel, std::unique_lock<std::mutex>& lock, const uint8_t* header, size_t headerBytes,
                        const uint8_t* body, size_t bodyBytes, bool mayBlock) {
    Sender& sender = senders_[channel];
    sender.busy = true;
    sender.queuedBytes.fetch_add(headerBytes + bodyBytes);
    lock.unlock();
    struct iovec iov[2] = {{const_cast<uint8_t*>(header), headerBytes}, {const_cast<uint8_t*>(body), bodyBytes}};
    size_t total = headerBytes + bodyBytes;
    size_t done = 0;
    bool ok = true;
    while (done < total) {
      struct iovec rest[2];
      int count = 0;
      size_t skip = done;
      for (const struct iovec& part : iov) {
        if (skip >= part.iov_len) {
          skip -= part.iov_len;
          continue;
        }
        rest[count].iov_base = static_cast<uint8_t*>(part.iov_base) + skip;
        rest[count].iov_len = part.iov_len - skip;
        skip = 0;
        count += 1;
      }
      struct msghdr message = {};
      message.msg_iov = rest;
      message.msg_iovlen = static_cast<size_t>(count);
      ssize_t n = sendmsg(sender.fd, &message, MSG_NOSIGNAL | (mayBlock ? 0 : MSG_DONTWAIT));
      if (n > 0) {
        done += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (!mayBlock) break;
        if (!WaitFd(sender.fd, POLLOUT)) {
          lastSendErrno_.store(ECANCELED);
          ok = false;
          break;
        }
        continue;
      }
      lastSendErrno_.store(n == 0 ? EIO : errno);
      ok = false;
      break;
    }
    lock.lock();
    sender.queuedBytes.fetch_sub(done);
    sender.sentBytes.fetch_add(done);
    if (!ok) {
      FailLocked(channel, lock);
      return false;
    }
    if (done < total) {
      // The rest of this frame goes before whatever others added meanwhile; the pump waits for the socket.
      std::vector<uint8_t> remainder;
      remainder.reserve(total - done);
      for (const struct iovec& part : iov) {
        const uint8_t* base = static_cast<const uint8_t*>(part.iov_base);
        size_t from = done >= part.iov_len ? part.iov_len : done;
        done = done >= part.iov_len ? done - part.iov_len : 0;
        remainder.insert(remainder.end(), base + from, base + part.iov_len);
      }
      sender.queue.insert(sender.queue.begin(), remainder.begin(), remainder.end());
      sender.pumpWanted = true;
      sender.pumpCv.notify_one();
      return true;
    }
    ReleaseLocked(channel, lock, mayBlock);
    return true;
  }

  // Sends what deferred enqueues left in the data socket's batch.
  void FlushData() {
    Sender& sender = senders_[kChannelData];
    std::unique_lock<std::mutex> lock(sender.mutex);
    if (sender.broken || sender.busy || sender.queue.empty()) return;
    sender.busy = true;
    DrainLocked(kChannelData, lock, true);
  }

  // Sends one frame whose payload stays where it is (memory, or a pipe with `length` bytes), in order after the
  // batch. The caller (a native worker) waits for the socket. False when the transport broke (the pipe is then
  // left for the caller to empty).
  bool SendLarge(const uint8_t* header, const uint8_t* payload, int pipeRead, size_t length) {
    Sender& sender = senders_[kChannelData];
    std::unique_lock<std::mutex> lock(sender.mutex);
    sender.waiters += 1;
    sender.cv.wait(lock, [&] { return sender.broken || !sender.busy; });
    sender.waiters -= 1;
    if (sender.broken) return false;
    sender.busy = true;
    sender.queuedBytes.fetch_add(kHeaderBytes + length);
    // What is batched goes first.
    while (!sender.queue.empty()) {
      sender.sending.swap(sender.queue);
      sender.queue.clear();
      lock.unlock();
      bool ok = WriteAll(kChannelData, sender.sending.data(), sender.sending.size(), true, nullptr);
      lock.lock();
      sender.queuedBytes.fetch_sub(sender.sending.size());
      sender.sending.clear();
      if (!ok) return FailLocked(kChannelData, lock);
    }
    lock.unlock();
    bool ok;
    if (pipeRead < 0) {
      ok = WriteAll(kChannelData, header, kHeaderBytes, true, nullptr, payload != nullptr) &&
           WriteAll(kChannelData, payload, length, true, nullptr);
    } else {
      ok = WriteAll(kChannelData, header, kHeaderBytes, true, nullptr, true) && SpliceAll(pipeRead, length);
    }
    lock.lock();
    sender.queuedBytes.fetch_sub(kHeaderBytes + length);
    if (!ok) return FailLocked(kChannelData, lock);
    sender.sentBytes.fetch_add(kHeaderBytes + length);
    ReleaseLocked(kChannelData, lock, true);
    return true;
  }

  void WantDrain() {
    Sender& sender = senders_[kChannelData];
    std::lock_guard<std::mutex> lock(sender.mutex);
    if (!sender.busy && sender.queue.empty()) {
      Event event;
      event.kind = kEventDrained;
      event.transport = id_;
      plane_->Post(std::move(event));
      return;
    }
    sender.drainWanted = true;
  }

  uint64_t QueuedBytes(int channel) { return broken_.load() ? 0 : senders_[channel].queuedBytes.load(); }
  uint64_t SentBytes() { return senders_[0].sentBytes.load() + senders_[1].sentBytes.load(); }
  uint64_t ReceivedBytes() { return receivedBytes_.load(); }
  double LastMetaMs() { return lastMetaMs_.load(); }

  // ---- the Secondary's switch ----

  bool ArmSecondary(int protocol, uint64_t forwardedSeen) {
    std::lock_guard<std::mutex> lock(armMutex_);
    if (forwardedSeen != forwardedModifying_) return false;  // JavaScript has not handled all it was given yet
    secondaryProtocol_ = protocol;
    secondaryArmed_ = true;
    return true;
  }

  void DisarmSecondary() {
    std::lock_guard<std::mutex> lock(armMutex_);
    secondaryArmed_ = false;
  }

  uint64_t ForwardedModifying() {
    std::lock_guard<std::mutex> lock(armMutex_);
    return forwardedModifying_;
  }

  void SetPaused(bool paused) {
    paused_.store(paused);
    if (!paused) Wake(pauseFd_);
  }

  // JavaScript closes the connection (or the transport is destroyed): what is queued (a refusal telling the peer
  // why, say) goes out first if the socket takes it now.
  void Shutdown(const std::string& reason) {
    if (!broken_.load()) {
      for (int channel = 0; channel < 2; channel += 1) {
        Sender& sender = senders_[channel];
        std::lock_guard<std::mutex> lock(sender.mutex);
        if (sender.busy || sender.queue.empty()) continue;
        ssize_t n = send(sender.fd, sender.queue.data(), sender.queue.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        (void)n;
      }
    }
    Break(reason);
  }

 private:
  static void Wake(int fd) {
    uint64_t one = 1;
    ssize_t ignored = write(fd, &one, sizeof one);
    (void)ignored;
  }

  bool FailLocked(int channel, std::unique_lock<std::mutex>& lock) {
    Sender& sender = senders_[channel];
    sender.busy = false;
    if (sender.waiters > 0) sender.cv.notify_all();
    lock.unlock();
    Break(std::string(channel == kChannelData ? "data" : "meta") + " socket: send failed: " + strerror(lastSendErrno_.load()));
    lock.lock();
    return false;
  }

  // Writes the batch until it is empty; the caller set busy. Without mayBlock, a full socket hands over to the pump.
  void DrainLocked(int channel, std::unique_lock<std::mutex>& lock, bool mayBlock) {
    Sender& sender = senders_[channel];
    while (!sender.queue.empty()) {
      sender.sending.swap(sender.queue);
      sender.queue.clear();
      lock.unlock();
      size_t written = 0;
      bool ok = WriteAll(channel, sender.sending.data(), sender.sending.size(), mayBlock, &written);
      lock.lock();
      sender.queuedBytes.fetch_sub(written);
      sender.sentBytes.fetch_add(written);
      if (!ok) {
        sender.sending.clear();
        FailLocked(channel, lock);
        return;
      }
      if (written < sender.sending.size()) {
        // The socket is full and this thread may not wait: the rest goes back in front, for the pump.
        sender.queue.insert(sender.queue.begin(), sender.sending.begin() + written, sender.sending.end());
        sender.sending.clear();
        sender.pumpWanted = true;
        sender.pumpCv.notify_one();
        return;
      }
      sender.sending.clear();
    }
    ReleaseLocked(channel, lock, mayBlock);
  }

  // The busy writer is done with the socket: what others batched meanwhile goes now, or the socket is free.
  void ReleaseLocked(int channel, std::unique_lock<std::mutex>& lock, bool mayBlock) {
    Sender& sender = senders_[channel];
    if (!sender.queue.empty()) {
      DrainLocked(channel, lock, mayBlock);
      return;
    }
    sender.busy = false;
    if (sender.waiters > 0) sender.cv.notify_all();
    NotifyDrainedLocked(channel);
  }

  void NotifyDrainedLocked(int channel) {
    Sender& sender = senders_[channel];
    if (channel != kChannelData || !sender.drainWanted) return;
    sender.drainWanted = false;
    Event event;
    event.kind = kEventDrained;
    event.transport = id_;
    plane_->Post(std::move(event));
  }

  void Pump(int channel) {
    Sender& sender = senders_[channel];
    std::unique_lock<std::mutex> lock(sender.mutex);
    for (;;) {
      sender.pumpCv.wait(lock, [&] { return sender.stop || sender.pumpWanted; });
      if (sender.stop) return;
      sender.pumpWanted = false;
      if (sender.broken) continue;
      DrainLocked(channel, lock, true);
    }
  }

  // Waits for the socket (POLLIN/POLLOUT) or the abort; false when aborted.
  bool WaitFd(int fd, short events) {
    for (;;) {
      if (broken_.load()) return false;
      struct pollfd fds[2] = {{fd, events, 0}, {abortFd_, POLLIN, 0}};
      int n = poll(fds, 2, -1);
      if (n < 0 && errno != EINTR) return false;
      if (fds[1].revents != 0) return false;
      if (fds[0].revents != 0) return true;
    }
  }

  // Writes bytes; with mayBlock all of them (or false on error/abort), else what fits now (*written says).
  bool WriteAll(int channel, const uint8_t* data, size_t length, bool mayBlock, size_t* written, bool more = false) {
    int fd = senders_[channel].fd;
    size_t done = 0;
    while (done < length) {
      ssize_t n = send(fd, data + done, length - done, MSG_NOSIGNAL | (more ? MSG_MORE : 0) | (mayBlock ? 0 : MSG_DONTWAIT));
      if (n > 0) {
        done += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (!mayBlock) break;
        if (!WaitFd(fd, POLLOUT)) {
          lastSendErrno_.store(ECANCELED);
          if (written != nullptr) *written = done;
          return false;
        }
        continue;
      }
      lastSendErrno_.store(n == 0 ? EIO : errno);
      if (written != nullptr) *written = done;
      return false;
    }
    if (written != nullptr) *written = done;
    return true;
  }

  bool SpliceAll(int pipeRead, size_t length) {
    int fd = senders_[kChannelData].fd;
    while (length > 0) {
      ssize_t n = splice(pipeRead, nullptr, fd, nullptr, length, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n > 0) {
        length -= static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (!WaitFd(fd, POLLOUT)) {
          lastSendErrno_.store(ECANCELED);
          return false;
        }
        continue;
      }
      lastSendErrno_.store(n == 0 ? EIO : errno);
      return false;
    }
    return true;
  }

  // Once: both sockets shut down, every waiter woken, JavaScript told (after the plane marked what was unacked).
  void Break(const std::string& reason) {
    bool expected = false;
    if (!broken_.compare_exchange_strong(expected, true)) return;
    Wake(abortFd_);
    for (int channel = 0; channel < 2; channel += 1) {
      Sender& sender = senders_[channel];
      shutdown(sender.fd, SHUT_RDWR);
      std::lock_guard<std::mutex> lock(sender.mutex);
      sender.broken = true;
      sender.queue.clear();
      sender.cv.notify_all();
      sender.pumpCv.notify_all();
    }
    plane_->TransportBroken(this);
    Event event;
    event.kind = kEventClosed;
    event.transport = id_;
    event.text = reason;
    plane_->Post(std::move(event));
  }

  // ---- receiving ----

  // Receives into [data, data+length) entirely; false on EOF, error or abort (the reason is set).
  bool ReceiveAll(int channel, uint8_t* data, size_t length, std::string* reason) {
    int fd = senders_[channel].fd;
    size_t got = 0;
    while (got < length) {
      ssize_t n = recv(fd, data + got, length - got, 0);
      if (n > 0) {
        got += static_cast<size_t>(n);
        receivedBytes_.fetch_add(static_cast<uint64_t>(n));
        if (channel == kChannelMeta) lastMetaMs_.store(NowMs());
        continue;
      }
      if (n == 0) {
        *reason = "connection closed by peer";
        return false;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        if (!WaitFd(fd, POLLIN)) {
          *reason = "closed";
          return false;
        }
        continue;
      }
      *reason = std::string("receive failed: ") + strerror(errno);
      return false;
    }
    return true;
  }

  // Flow control toward the peer while JavaScript applies its writes: the data socket is not read while paused.
  bool WaitUnpaused() {
    while (paused_.load()) {
      struct pollfd fds[2] = {{pauseFd_, POLLIN, 0}, {abortFd_, POLLIN, 0}};
      int n = poll(fds, 2, 200);
      if (n < 0 && errno != EINTR) return false;
      if (fds[1].revents != 0 || broken_.load()) return false;
      uint64_t drained;
      while (read(pauseFd_, &drained, sizeof drained) > 0) {
      }
    }
    return true;
  }

  void QueueAck(std::vector<uint8_t>& acks, uint16_t type, uint32_t id) {
    uint8_t header[kHeaderBytes];
    PutHeader(header, type, 0, 0, id, 0);
    acks.insert(acks.end(), header, header + kHeaderBytes);
  }

  // A reader's acks go back on its own socket: the meta reader's PING_ACKs on the meta socket, the data reader's
  // write and barrier acks on the data socket, where nothing else travels toward the Primary while the plane runs
  // (so they wait behind nothing) and each carries the TCP acknowledgement of the data it answers: one packet
  // each way per burst instead of two.
  void FlushAcks(std::vector<uint8_t>& acks, int channel) {
    if (acks.empty()) return;
    Enqueue(channel, acks.data(), acks.size(), nullptr, 0, true);
    acks.clear();
  }

  // Protocol B: the whole payload is here, so the Primary may complete the write.
  void AckReceived(std::vector<uint8_t>& acks, int channel, uint32_t id) {
    QueueAck(acks, kRecvAck, id);
    FlushAcks(acks, channel);
  }

  bool InRange(uint64_t offset, uint32_t length) const { return offset <= sizeBytes_ && length <= sizeBytes_ - offset; }

  // pwrite of all of it: 0, or the errno that stopped it.
  uint32_t WriteFully(const uint8_t* payload, size_t length, uint64_t offset) {
    size_t done = 0;
    while (done < length) {
      ssize_t n = pwrite(fileFd_, payload + done, length - done, static_cast<off_t>(offset + done));
      if (n > 0) {
        done += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      return n == 0 ? ENOSPC : errno;
    }
    return 0;
  }

  // A reader's pipe for payloads spliced from the socket to the file, made on first use.
  struct SplicePipe {
    int read = -1;
    int write = -1;
    size_t capacity = 0;
    bool tried = false;
    bool toFile = true;
    bool Ready() {
      if (read >= 0) return true;
      if (tried) return false;
      tried = true;
      int fds[2];
      if (pipe2(fds, O_CLOEXEC) != 0) return false;
      int bytes = -1;
      for (int wanted = 1 << 20; wanted >= 64 * 1024 && bytes < 0; wanted /= 2) bytes = fcntl(fds[1], F_SETPIPE_SZ, wanted);
      if (bytes < 0) bytes = fcntl(fds[1], F_GETPIPE_SZ);
      if (bytes < static_cast<int>(kSpliceReceiveMin)) {
        close(fds[0]);
        close(fds[1]);
        return false;
      }
      read = fds[0];
      write = fds[1];
      capacity = static_cast<size_t>(bytes);
      return true;
    }
    ~SplicePipe() {
      if (read >= 0) close(read);
      if (write >= 0) close(write);
    }
  };

  // Moves `length` payload bytes from the socket to the file at `offset` through the pipe. A failing file write
  // is remembered in *fileError (0 before) and the rest of the payload still read, so the stream stays in step.
  // False when the socket failed (*reason set).
  bool SpliceReceive(int channel, SplicePipe& pipe, uint64_t offset, size_t length, uint32_t* fileError,
                     std::string* reason) {
    int fd = senders_[channel].fd;
    size_t moved = 0;
    while (moved < length) {
      ssize_t n = splice(fd, nullptr, pipe.write, nullptr, std::min(length - moved, pipe.capacity), SPLICE_F_MOVE);
      if (n == 0) {
        *reason = "connection closed by peer";
        return false;
      }
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          if (!WaitFd(fd, POLLIN)) {
            *reason = "closed";
            return false;
          }
          continue;
        }
        *reason = std::string("receive failed: ") + strerror(errno);
        return false;
      }
      receivedBytes_.fetch_add(static_cast<uint64_t>(n));
      // Empty the pipe into the file (or, once the file failed, into nowhere).
      size_t inPipe = static_cast<size_t>(n);
      while (inPipe > 0) {
        ssize_t w;
        if (*fileError == 0 && pipe.toFile) {
          loff_t at = static_cast<loff_t>(offset + moved);
          w = splice(pipe.read, nullptr, fileFd_, &at, inPipe, SPLICE_F_MOVE);
          if (w == 0) {
            *fileError = ENOSPC;
            continue;
          }
          if (w < 0 && errno == EINVAL) {
            pipe.toFile = false;  // a file that takes no splice: through memory from now on
            continue;
          }
        } else {
          // Through memory: to the file when splice does not serve it, or nowhere once the file failed.
          uint8_t scratch[16384];
          w = ::read(pipe.read, scratch, std::min(inPipe, sizeof scratch));
          if (w == 0) {
            *reason = "the receive pipe closed";
            return false;
          }
          if (w > 0 && *fileError == 0) *fileError = WriteFully(scratch, static_cast<size_t>(w), offset + moved);
        }
        if (w < 0) {
          if (errno == EINTR) continue;
          if (*fileError == 0) {
            *fileError = static_cast<uint32_t>(errno);
            continue;
          }
          *reason = std::string("reading the receive pipe failed: ") + strerror(errno);
          return false;
        }
        inPipe -= static_cast<size_t>(w);
        moved += static_cast<size_t>(w);
      }
    }
    return true;
  }

  // Writes a peer's DATA frame here (the Secondary armed); acks go into `acks`.
  void ApplyPeerWrite(uint16_t flags, uint32_t id, uint64_t offset, const uint8_t* payload, uint32_t length,
                      std::vector<uint8_t>& acks) {
    uint32_t error = InRange(offset, length) ? WriteFully(payload, length, offset) : EINVAL;
    FinishPeerWrite(flags, id, offset, length, error, acks);
  }

  // The write's payload is in the file (error 0) or failed: FUA's flush, then WRITE_ACK or NEG_ACK.
  void FinishPeerWrite(uint16_t flags, uint32_t id, uint64_t offset, uint32_t length, uint32_t error,
                       std::vector<uint8_t>& acks) {
    if (error == 0 && (flags & kFlagFua) != 0) {
      while (fdatasync(fileFd_) != 0) {
        if (errno != EINTR) {
          error = errno;
          break;
        }
      }
    }
    if (error == 0) {
      plane_->peerWrites_ += 1;
      plane_->peerWriteBytes_ += length;
      QueueAck(acks, kWriteAck, id);
    } else {
      QueueAck(acks, kNegAck, id);
      Event event;
      event.kind = kEventPeerWriteFailed;
      event.transport = id_;
      event.ranges.emplace_back(offset, length);
      event.text = strerror(error);
      plane_->Post(std::move(event));
    }
  }

  bool ValidType(uint16_t type) const { return type < validTypes_.size() && validTypes_[type] != 0; }

  void ReadLoop(int channel) {
    SplicePipe splice;
    std::vector<uint8_t> buffer(kReadBufferBytes);
    std::vector<uint8_t> payload;
    std::vector<uint8_t> acks;
    std::vector<std::pair<uint16_t, uint32_t>> ackBatch;
    size_t start = 0;
    size_t end = 0;
    std::vector<uint8_t>& leftover = leftover_[channel];
    if (!leftover.empty()) {
      if (leftover.size() > buffer.size()) buffer.resize(leftover.size());
      memcpy(buffer.data(), leftover.data(), leftover.size());
      end = leftover.size();
      leftover.clear();
    }
    int fd = senders_[channel].fd;
    std::string reason;
    for (;;) {
      // Every complete frame in the buffer.
      while (end - start >= kHeaderBytes) {
        const uint8_t* header = buffer.data() + start;
        uint32_t magic = Get32(header);
        uint16_t type = Get16(header + 4);
        uint16_t flags = Get16(header + 6);
        uint32_t length = Get32(header + 8);
        uint32_t id = Get32(header + 12);
        uint64_t offset = (static_cast<uint64_t>(Get32(header + 16)) << 32) | Get32(header + 20);
        if (magic != kMagic) {
          char text[96];
          snprintf(text, sizeof text, "bad frame magic 0x%08x (not a drbdts peer?)", magic);
          reason = text;
          goto failed;
        }
        if (!ValidType(type)) {
          reason = "unexpected frame type " + std::to_string(type) + " here";
          goto failed;
        }
        if (length > kBodyMax) {
          reason = "frame body of " + std::to_string(length) + " bytes exceeds the limit of " + std::to_string(kBodyMax);
          goto failed;
        }
        size_t available = end - start - kHeaderBytes;
        if (length == 0 && (id & kNativeIdBit) != 0 &&
            (type == kWriteAck || type == kRecvAck || type == kNegAck || type == kBarrierAck)) {
          ackBatch.emplace_back(type, id);  // on either socket: a native Secondary acks on the data socket
          start += kHeaderBytes;
          continue;
        }
        if (channel == kChannelMeta) {
          if (type == kPing && length == 0) {
            QueueAck(acks, kPingAck, id);
            start += kHeaderBytes;
            continue;
          }
          if (type == kPingAck && length == 0) {
            start += kHeaderBytes;
            continue;
          }
        }
        bool armed;
        int protocol;
        {
          std::lock_guard<std::mutex> lock(armMutex_);
          armed = secondaryArmed_ && channel == kChannelData;
          protocol = secondaryProtocol_;
        }
        if (armed && type == kData && (flags & ~kFlagFua) == 0 && length > 0) {
          if (available >= length) {
            if (protocol == 'B') AckReceived(acks, channel, id);
            ApplyPeerWrite(flags, id, offset, header + kHeaderBytes, length, acks);
            start += kHeaderBytes + length;
          } else if (length - available >= kSpliceReceiveMin && InRange(offset, length) && splice.Ready()) {
            // A large payload: what the buffer holds is written from there, the rest goes socket -> pipe -> file
            // (one copy, into the page cache, where recv and pwrite would copy twice).
            uint32_t error = WriteFully(header + kHeaderBytes, available, offset);
            start = end = 0;
            if (!SpliceReceive(channel, splice, offset + available, length - available, &error, &reason)) goto failed;
            if (protocol == 'B') AckReceived(acks, channel, id);
            FinishPeerWrite(flags, id, offset, length, error, acks);
          } else {
            payload.resize(length);
            memcpy(payload.data(), header + kHeaderBytes, available);
            start = end = 0;
            if (!ReceiveAll(channel, payload.data() + available, length - available, &reason)) goto failed;
            if (protocol == 'B') AckReceived(acks, channel, id);
            ApplyPeerWrite(flags, id, offset, payload.data(), length, acks);
          }
          continue;
        }
        if (armed && type == kBarrier && length == 0) {
          // Every write received before it is written (this thread wrote them in order): make them durable.
          FlushAcks(acks, channel);
          int err = 0;
          while (fdatasync(fileFd_) != 0) {
            if (errno != EINTR) {
              err = errno;
              break;
            }
          }
          start += kHeaderBytes;
          if (err == 0) {
            QueueAck(acks, kBarrierAck, id);
          } else {
            // No ack: the Primary's flush waits until the link drops and its bitmap covers the writes (as in JS).
            Event event;
            event.kind = kEventPeerWriteFailed;
            event.transport = id_;
            event.text = std::string("flush for the peer failed: ") + strerror(err);
            plane_->Post(std::move(event));
          }
          continue;
        }
        // Everything else is JavaScript's, in order. A frame that changes this disk stops the native writes until
        // JavaScript re-arms them, having handled it.
        Event event;
        event.kind = kEventFrame;
        event.transport = id_;
        event.channel = channel;
        event.type = type;
        event.flags = flags;
        event.id = id;
        event.offset = offset;
        event.bodyBytes = length;
        if (length > 0) {
          event.body = static_cast<uint8_t*>(malloc(length));
          if (event.body == nullptr) {
            reason = "out of memory for a frame body";
            goto failed;
          }
          size_t take = std::min<size_t>(available, length);
          memcpy(event.body, header + kHeaderBytes, take);
          if (take < length) {
            start = end = 0;
            if (!ReceiveAll(channel, event.body + take, length - take, &reason)) {
              free(event.body);
              goto failed;
            }
          } else {
            start += kHeaderBytes + length;
          }
        } else {
          start += kHeaderBytes;
        }
        if (channel == kChannelData && (type == kData || type == kTrim || type == kZero || type == kRsReply || type == kBarrier)) {
          std::lock_guard<std::mutex> lock(armMutex_);
          secondaryArmed_ = false;
          forwardedModifying_ += 1;
        }
        plane_->Post(std::move(event));
      }
      // Nothing complete left: what this read produced leaves now (acks in one write, NBD replies per connection),
      // unless more of the burst is already in the socket (then it goes with the rest, up to a bound).
      bool more = acks.size() / kHeaderBytes + ackBatch.size() < kAckBatchMax && PendingBytes(fd) > 0;
      if (!ackBatch.empty()) {
        plane_->OnAcks(ackBatch);
        ackBatch.clear();
      }
      if (!more) {
        FlushAcks(acks, channel);
        plane_->FlushCompletions();
      }
      if (start > 0) {
        memmove(buffer.data(), buffer.data() + start, end - start);
        end -= start;
        start = 0;
      }
      if (end == buffer.size()) buffer.resize(buffer.size() * 2);
      if (channel == kChannelData && !WaitUnpaused()) {
        reason = "closed";
        goto failed;
      }
      ssize_t n = recv(fd, buffer.data() + end, buffer.size() - end, 0);
      if (n > 0) {
        end += static_cast<size_t>(n);
        receivedBytes_.fetch_add(static_cast<uint64_t>(n));
        if (channel == kChannelMeta) lastMetaMs_.store(NowMs());
        continue;
      }
      if (n == 0) {
        reason = "connection closed by peer";
        goto failed;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        if (!WaitFd(fd, POLLIN)) {
          reason = "closed";
          goto failed;
        }
        continue;
      }
      reason = std::string("receive failed: ") + strerror(errno);
      goto failed;
    }
  failed:
    Break(std::string(channel == kChannelData ? "data" : "meta") + " socket: " + reason);
  }

  std::shared_ptr<Plane> plane_;
  const uint32_t id_;
  const int fileFd_;
  const uint64_t sizeBytes_;
  const std::vector<uint8_t> validTypes_;
  Sender senders_[2];
  std::thread readers_[2];
  std::vector<uint8_t> leftover_[2];
  int abortFd_ = -1;
  int pauseFd_ = -1;
  std::atomic<bool> broken_{false};
  std::atomic<bool> paused_{false};
  std::atomic<int> lastSendErrno_{0};
  std::atomic<uint64_t> receivedBytes_{0};
  std::atomic<double> lastMetaMs_{0};
  std::mutex armMutex_;
  bool secondaryArmed_ = false;
  int secondaryProtocol_ = 'C';
  uint64_t forwardedModifying_ = 0;
};

// ------------------------------------------------------------------------------------- the data path's calls

Ticket* Admit(Plane& plane, ReplySink* sink, const uint8_t cookie[8], bool flush, uint64_t offset, uint32_t length,
              bool fua) {
  return plane.AdmitImpl(sink, cookie, flush, offset, length, fua);
}

void WaitTurn(Plane& plane, Ticket* ticket) { plane.WaitTurnImpl(ticket); }

void ShipBuffer(Plane& plane, Ticket* ticket, const uint8_t* data, bool more) {
  std::shared_ptr<Transport> transport;
  if (!plane.Register(ticket, &transport)) return;
  uint8_t header[kHeaderBytes];
  PutHeader(header, kData, ticket->fua ? kFlagFua : 0, ticket->length, ticket->seq, ticket->offset);
  if (ticket->length <= kBatchPayloadMax) {
    // A small frame waits in the batch while another request is already waiting (the worker that finds none
    // sends the batch before it waits for its client): a burst leaves in one send.
    transport->Enqueue(kChannelData, header, kHeaderBytes, data, ticket->length, true, more && !ticket->fua);
  } else {
    transport->SendLarge(header, data, -1, ticket->length);
  }
  // A failed send broke the transport, which marked this write with the others: nothing more to do here.
}

bool ShipPipe(Plane& plane, Ticket* ticket, int pipeRead) {
  std::shared_ptr<Transport> transport;
  if (!plane.Register(ticket, &transport)) return false;
  uint8_t header[kHeaderBytes];
  PutHeader(header, kData, ticket->fua ? kFlagFua : 0, ticket->length, ticket->seq, ticket->offset);
  return transport->SendLarge(header, nullptr, pipeRead, ticket->length);
}

void ShipBarrier(Plane& plane, Ticket* ticket) {
  std::shared_ptr<Transport> transport;
  if (!plane.Register(ticket, &transport)) return;
  uint8_t header[kHeaderBytes];
  PutHeader(header, kBarrier, 0, 0, ticket->seq, 0);
  transport->Enqueue(kChannelData, header, kHeaderBytes, nullptr, 0, true);
}

void Flush(Plane& plane) {
  std::shared_ptr<Transport> transport = plane.CurrentTransport();
  if (transport != nullptr) transport->FlushData();
}

bool LocalDone(Plane& plane, Ticket* ticket, uint32_t nbdError, uint32_t* replyError) {
  return plane.LocalDoneImpl(ticket, nbdError, replyError);
}

void Abandon(Plane& plane, Ticket* ticket) { plane.AbandonImpl(ticket); }

void CountRead(Plane& plane, uint64_t bytes) { plane.readBytes_ += bytes; }

// ------------------------------------------------------------------------------------------- JavaScript objects

namespace {

Napi::FunctionReference* gPlaneConstructor = nullptr;

class ReplPlaneObject : public Napi::ObjectWrap<ReplPlaneObject> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "ReplPlane", {
        InstanceMethod("open", &ReplPlaneObject::OpenMethod),
        InstanceMethod("close", &ReplPlaneObject::CloseMethod),
        InstanceMethod("pin", &ReplPlaneObject::PinMethod),
        InstanceMethod("releaseMarks", &ReplPlaneObject::ReleaseMarksMethod),
        InstanceMethod("inFlight", &ReplPlaneObject::InFlightMethod),
        InstanceMethod("counters", &ReplPlaneObject::CountersMethod),
        InstanceMethod("destroy", &ReplPlaneObject::DestroyMethod),
    });
  }

  explicit ReplPlaneObject(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ReplPlaneObject>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsFunction()) throw Napi::TypeError::New(env, "ReplPlane: an event callback expected");
    Napi::ThreadSafeFunction tsfn = Napi::ThreadSafeFunction::New(env, info[0].As<Napi::Function>(), "replPlane", 0, 1);
    tsfn.Unref(env);
    plane_ = std::make_shared<Plane>(tsfn);
  }

  ~ReplPlaneObject() override { Release(); }

  std::shared_ptr<Plane> plane() const { return plane_; }

 private:
  void Release() {
    if (plane_ != nullptr) {
      plane_->tsfn_.Release();
      plane_.reset();
    }
  }

  Napi::Value OpenMethod(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (plane_ == nullptr) return Napi::Boolean::New(env, false);
    if (info.Length() < 3 || !info[0].IsString() || !info[1].IsNumber() || !info[2].IsBuffer()) {
      throw Napi::TypeError::New(env, "ReplPlane.open(protocol, maxInFlight, pinnedExtents)");
    }
    std::string protocol = info[0].As<Napi::String>().Utf8Value();
    if (protocol != "B" && protocol != "C") throw Napi::TypeError::New(env, "ReplPlane.open: protocol must be B or C");
    Napi::Buffer<uint8_t> pinned = info[2].As<Napi::Buffer<uint8_t>>();
    bool ok = plane_->Open(protocol[0], info[1].As<Napi::Number>().Uint32Value(), pinned.Data(), pinned.Length());
    return Napi::Boolean::New(env, ok);
  }

  Napi::Value CloseMethod(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), plane_ == nullptr ? true : plane_->Close());
  }

  Napi::Value PinMethod(const Napi::CallbackInfo& info) {
    if (plane_ != nullptr && info.Length() >= 1 && info[0].IsNumber()) {
      plane_->Pin(static_cast<size_t>(info[0].As<Napi::Number>().Int64Value()));
    }
    return info.Env().Undefined();
  }

  Napi::Value ReleaseMarksMethod(const Napi::CallbackInfo& info) {
    if (plane_ != nullptr && info.Length() >= 1 && info[0].IsNumber()) {
      plane_->ReleaseMarks(static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value()));
    }
    return info.Env().Undefined();
  }

  Napi::Value InFlightMethod(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), plane_ == nullptr ? 0 : plane_->InFlight());
  }

  Napi::Value CountersMethod(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object counters = Napi::Object::New(env);
    counters.Set("writes", plane_ == nullptr ? 0.0 : static_cast<double>(plane_->writes_.load()));
    counters.Set("writeBytes", plane_ == nullptr ? 0.0 : static_cast<double>(plane_->writeBytes_.load()));
    counters.Set("peerWrites", plane_ == nullptr ? 0.0 : static_cast<double>(plane_->peerWrites_.load()));
    counters.Set("readBytes", plane_ == nullptr ? 0.0 : static_cast<double>(plane_->readBytes_.load()));
    counters.Set("peerWriteBytes", plane_ == nullptr ? 0.0 : static_cast<double>(plane_->peerWriteBytes_.load()));
    return counters;
  }

  Napi::Value DestroyMethod(const Napi::CallbackInfo& info) {
    Release();
    return info.Env().Undefined();
  }

  std::shared_ptr<Plane> plane_;
};

std::vector<uint8_t> BytesOf(const Napi::Value& value) {
  if (!value.IsBuffer()) return {};
  Napi::Buffer<uint8_t> buffer = value.As<Napi::Buffer<uint8_t>>();
  return std::vector<uint8_t>(buffer.Data(), buffer.Data() + buffer.Length());
}

uint32_t gNextTransportId = 1;

// new ReplTransport(plane, dataFd, metaFd, fileFd, sizeBytes, validTypes: Buffer (1 byte per type), dataLeftover,
// metaLeftover). Descriptors are duplicated; JavaScript keeps (and must stop reading and writing) its own.
class ReplTransportObject : public Napi::ObjectWrap<ReplTransportObject> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "ReplTransport", {
        InstanceMethod("start", &ReplTransportObject::StartMethod),
        InstanceMethod("sendFrame", &ReplTransportObject::SendFrameMethod),
        InstanceMethod("close", &ReplTransportObject::CloseMethod),
        InstanceMethod("destroy", &ReplTransportObject::DestroyMethod),
        InstanceMethod("setPaused", &ReplTransportObject::SetPausedMethod),
        InstanceMethod("queuedBytes", &ReplTransportObject::QueuedBytesMethod),
        InstanceMethod("wantDrain", &ReplTransportObject::WantDrainMethod),
        InstanceMethod("lastMetaReceivedMs", &ReplTransportObject::LastMetaMethod),
        InstanceMethod("sentBytes", &ReplTransportObject::SentBytesMethod),
        InstanceMethod("receivedBytes", &ReplTransportObject::ReceivedBytesMethod),
        InstanceMethod("armSecondary", &ReplTransportObject::ArmSecondaryMethod),
        InstanceMethod("disarmSecondary", &ReplTransportObject::DisarmSecondaryMethod),
        InstanceMethod("forwardedModifying", &ReplTransportObject::ForwardedMethod),
        InstanceAccessor("id", &ReplTransportObject::IdGetter, nullptr),
    });
  }

  explicit ReplTransportObject(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ReplTransportObject>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 8 || !info[0].IsObject()) throw Napi::TypeError::New(env, "ReplTransport: 8 arguments expected");
    std::shared_ptr<Plane> plane = PlaneFromValue(info[0]);
    if (plane == nullptr) throw Napi::TypeError::New(env, "ReplTransport: the first argument must be a ReplPlane");
    for (size_t i = 1; i <= 4; i += 1) {
      if (!info[i].IsNumber()) throw Napi::TypeError::New(env, "ReplTransport: argument " + std::to_string(i) + " must be a number");
    }
    if (!info[5].IsBuffer()) throw Napi::TypeError::New(env, "ReplTransport: validTypes must be a Buffer");
    int fds[3] = {info[1].As<Napi::Number>().Int32Value(), info[2].As<Napi::Number>().Int32Value(),
                  info[3].As<Napi::Number>().Int32Value()};
    int dups[3] = {-1, -1, -1};
    for (int i = 0; i < 3; i += 1) {
      dups[i] = fds[i] < 0 ? -1 : fcntl(fds[i], F_DUPFD_CLOEXEC, 0);
      if (dups[i] < 0) {
        int err = errno;
        for (int j = 0; j < i; j += 1) close(dups[j]);
        throw Napi::Error::New(env, std::string("ReplTransport: dup of descriptor ") + std::to_string(fds[i]) + ": " + strerror(err));
      }
    }
    uint32_t id = gNextTransportId++;
    transport_ = std::make_shared<Transport>(plane, id, dups[0], dups[1], dups[2],
                                             static_cast<uint64_t>(info[4].As<Napi::Number>().DoubleValue()),
                                             BytesOf(info[5]), BytesOf(info[6]), BytesOf(info[7]));
    if (!transport_->Ok()) {
      transport_.reset();
      throw Napi::Error::New(env, std::string("ReplTransport: eventfd: ") + strerror(errno));
    }
    plane_ = plane;
    id_ = id;
  }

  ~ReplTransportObject() override { Release(); }

 private:
  void Release() {
    if (transport_ != nullptr) {
      transport_->Shutdown("closed");
      transport_->Join();
      plane_->Detach(transport_.get());
      transport_.reset();
    }
  }

  Napi::Value StartMethod(const Napi::CallbackInfo& info) {
    if (transport_ != nullptr && !started_) {
      started_ = true;
      plane_->Attach(transport_);
      transport_->Start();
    }
    return info.Env().Undefined();
  }

  // sendFrame(channel, type, flags, id, offset, body?)
  Napi::Value SendFrameMethod(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (transport_ == nullptr) return Napi::Boolean::New(env, false);
    int channel = info[0].As<Napi::Number>().Int32Value();
    uint16_t type = static_cast<uint16_t>(info[1].As<Napi::Number>().Uint32Value());
    uint16_t flags = static_cast<uint16_t>(info[2].As<Napi::Number>().Uint32Value());
    uint32_t id = info[3].As<Napi::Number>().Uint32Value();
    uint64_t offset = static_cast<uint64_t>(info[4].As<Napi::Number>().DoubleValue());
    const uint8_t* body = nullptr;
    size_t bodyBytes = 0;
    if (info.Length() > 5 && info[5].IsTypedArray()) {
      Napi::Uint8Array array = info[5].As<Napi::Uint8Array>();
      body = array.Data();
      bodyBytes = array.ByteLength();
    }
    if (channel != kChannelData && channel != kChannelMeta) throw Napi::RangeError::New(env, "sendFrame: bad channel");
    uint8_t header[kHeaderBytes];
    PutHeader(header, type, flags, static_cast<uint32_t>(bodyBytes), id, offset);
    return Napi::Boolean::New(env, transport_->Enqueue(channel, header, kHeaderBytes, body, bodyBytes, false));
  }

  Napi::Value CloseMethod(const Napi::CallbackInfo& info) {
    if (transport_ != nullptr) {
      std::string reason = info.Length() > 0 && info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "closed";
      transport_->Shutdown(reason);
    }
    return info.Env().Undefined();
  }

  Napi::Value DestroyMethod(const Napi::CallbackInfo& info) {
    Release();
    return info.Env().Undefined();
  }

  Napi::Value SetPausedMethod(const Napi::CallbackInfo& info) {
    if (transport_ != nullptr) transport_->SetPaused(info[0].ToBoolean().Value());
    return info.Env().Undefined();
  }

  Napi::Value QueuedBytesMethod(const Napi::CallbackInfo& info) {
    int channel = info.Length() > 0 ? info[0].As<Napi::Number>().Int32Value() : 0;
    return Napi::Number::New(info.Env(), transport_ == nullptr ? 0.0 : static_cast<double>(transport_->QueuedBytes(channel == 1 ? 1 : 0)));
  }

  Napi::Value WantDrainMethod(const Napi::CallbackInfo& info) {
    if (transport_ != nullptr) transport_->WantDrain();
    return info.Env().Undefined();
  }

  Napi::Value LastMetaMethod(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), transport_ == nullptr ? 0.0 : transport_->LastMetaMs());
  }

  Napi::Value SentBytesMethod(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), transport_ == nullptr ? 0.0 : static_cast<double>(transport_->SentBytes()));
  }

  Napi::Value ReceivedBytesMethod(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), transport_ == nullptr ? 0.0 : static_cast<double>(transport_->ReceivedBytes()));
  }

  // armSecondary(protocol, forwardedSeen): true when armed.
  Napi::Value ArmSecondaryMethod(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (transport_ == nullptr) return Napi::Boolean::New(env, false);
    std::string protocol = info[0].As<Napi::String>().Utf8Value();
    uint64_t seen = static_cast<uint64_t>(info[1].As<Napi::Number>().Int64Value());
    return Napi::Boolean::New(env, transport_->ArmSecondary(protocol.empty() ? 'C' : protocol[0], seen));
  }

  Napi::Value DisarmSecondaryMethod(const Napi::CallbackInfo& info) {
    if (transport_ != nullptr) transport_->DisarmSecondary();
    return info.Env().Undefined();
  }

  Napi::Value ForwardedMethod(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), transport_ == nullptr ? 0.0 : static_cast<double>(transport_->ForwardedModifying()));
  }

  // The id stays readable after destroy(): JavaScript unregisters the transport's event route by it.
  Napi::Value IdGetter(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), id_); }

  uint32_t id_ = 0;

  std::shared_ptr<Plane> plane_;
  std::shared_ptr<Transport> transport_;
  bool started_ = false;
};

}  // namespace

std::shared_ptr<Plane> PlaneFromValue(Napi::Value value) {
  if (gPlaneConstructor == nullptr || !value.IsObject()) return nullptr;
  Napi::Object object = value.As<Napi::Object>();
  if (!object.InstanceOf(gPlaneConstructor->Value())) return nullptr;
  return ReplPlaneObject::Unwrap(object)->plane();
}

}  // namespace drbdts_repl

void InitReplPlane(Napi::Env env, Napi::Object exports) {
  Napi::Function plane = drbdts_repl::ReplPlaneObject::Define(env);
  drbdts_repl::gPlaneConstructor = new Napi::FunctionReference(Napi::Persistent(plane));
  exports.Set("ReplPlane", plane);
  exports.Set("ReplTransport", drbdts_repl::ReplTransportObject::Define(env));
}
