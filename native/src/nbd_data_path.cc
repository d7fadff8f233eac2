// The NBD data path on native threads: READ, WRITE and FLUSH for a connection whose device is one plain
// descriptor (LocalDisk: pread, pwrite, fdatasync and nothing else).
//
// Why: on a 2-core machine the JavaScript path pays, per 1 MiB request, several read callbacks on the event loop
// and two cross-thread hand-offs (loop -> thread pool for the pwrite, pool -> loop for the reply), where
// nbdkit's connection threads each receive, write and reply by themselves (bench/README.md, "NBD serving").
// This does the same: `threads` workers per connection take turns reading one request (header, then payload)
// under the read lock, run the system call without any lock, and send the reply under the write lock.
//
// The JavaScript server (src/nbd/transmission.ts) still owns the protocol. It arms this path only when the
// connection is idle (nothing queued, nothing in flight, socket not being read by libuv), and the path hands the
// connection back, with every worker idle and every reply sent, as soon as it meets anything it does not serve
// itself: another command, a flag, length or offset it does not accept, a bad magic, DISC, EOF, a socket error,
// or a stop or abort asked by JavaScript. The header bytes it read for that request go back with it, so the
// JavaScript parser sees the stream exactly as the client sent it and answers it as it always does.
//
// Descriptors: the path works on its own dup()s of the socket and the file, so a close on the JavaScript side can
// never hand a worker a reused descriptor number; abort() wakes every blocked worker through an eventfd.

#include <napi.h>

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
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr uint32_t kRequestMagic = 0x25609513;
constexpr uint32_t kSimpleReplyMagic = 0x67446698;
constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;
constexpr uint16_t kCmdRead = 0;
constexpr uint16_t kCmdWrite = 1;
constexpr uint16_t kCmdFlush = 3;
constexpr uint16_t kCmdFlagFua = 1 << 0;
constexpr uint16_t kCmdFlagDf = 1 << 2;
constexpr uint16_t kReplyFlagDone = 1 << 0;
constexpr uint16_t kReplyTypeOffsetData = 1;
constexpr uint16_t kReplyTypeError = (1 << 15) + 1;
constexpr size_t kRequestHeaderBytes = 28;

// Why a round ended, as JavaScript sees it (src/native/index.ts: DataPathStop).
enum Reason : int {
  kRunning = -1,
  kHandback = 0,     // a request (header in `leftover`) for the JavaScript parser; resume reading
  kStopped = 1,      // stop() asked, taken at a request boundary
  kEnd = 2,          // the client closed its side at a request boundary; resume reading to see the EOF
  kSocketError = 3,  // receive or send failed: the connection is broken
  kTorn = 4,         // the client closed or failed in the middle of a request
  kAborted = 5,      // abort() asked
};

// Which reason wins when two workers end a round differently: a broken connection beats everything.
int ReasonRank(int reason) {
  switch (reason) {
    case kAborted: return 5;
    case kSocketError: return 4;
    case kTorn: return 3;
    case kEnd: return 2;
    case kStopped: return 1;
    default: return 0;
  }
}

// NBD error numbers (the spec's, which equal Linux's for these) for the errno a system call gave.
uint32_t NbdError(int err) {
  switch (err) {
    case EPERM: case EACCES: case EROFS: return 1;
    case EIO: return 5;
    case ENOMEM: return 12;
    case EINVAL: return 22;
    case ENOSPC: case EDQUOT: case EFBIG: return 28;
    case EOVERFLOW: return 75;
    case EOPNOTSUPP: return 95;
    case ESHUTDOWN: return 108;
    default: return 5;
  }
}

void Put16(uint8_t* p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xff; }
void Put32(uint8_t* p, uint32_t v) { p[0] = v >> 24; p[1] = (v >> 16) & 0xff; p[2] = (v >> 8) & 0xff; p[3] = v & 0xff; }
void Put64(uint8_t* p, uint64_t v) { Put32(p, static_cast<uint32_t>(v >> 32)); Put32(p + 4, static_cast<uint32_t>(v)); }
uint16_t Get16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }
uint32_t Get32(const uint8_t* p) {
  return (static_cast<uint32_t>(p[0]) << 24) | (static_cast<uint32_t>(p[1]) << 16) | (static_cast<uint32_t>(p[2]) << 8) | p[3];
}
uint64_t Get64(const uint8_t* p) { return (static_cast<uint64_t>(Get32(p)) << 32) | Get32(p + 4); }

// Payload buffers held by every data path in the process, against the cap each path was created with: past it a
// request is handed back to JavaScript, whose in-flight budget then applies.
std::atomic<int64_t> gBufferBytes{0};

struct Request {
  uint8_t header[kRequestHeaderBytes];
  uint16_t flags;
  uint16_t type;
  uint64_t offset;
  uint32_t lengthBytes;
  /** The payload (WRITE) or the data read (READ) sits in the worker's pipe, not in its buffer. */
  bool inPipe;
  /** A replicated WRITE or FLUSH admitted into the replication plane (repl_plane.cc), else null. */
  drbdts_repl::Ticket* ticket;
};

// One worker's payload buffer, grown on demand and kept for the connection's life.
// and its pipe for zero-copy transfers (splice): socket -> pipe -> file for a WRITE, file -> pipe -> socket for
// a READ, so the server itself copies a WRITE payload once (into the page cache) and a READ not at all, where
// recv + pwrite and pread + send copy everything twice. A pipe holds page references, counted in slots.
struct WorkerBuffer {
  uint8_t* data = nullptr;
  size_t capacity = 0;
  int pipeRead = -1;
  int pipeWrite = -1;
  size_t pipeSlots = 0;
  bool pipeTried = false;
  /** A replicated WRITE's second pipe: a tee of the payload, spliced to the peer's data socket. */
  int teeRead = -1;
  int teeWrite = -1;
  ~WorkerBuffer() {
    if (data != nullptr) {
      free(data);
      gBufferBytes.fetch_sub(static_cast<int64_t>(capacity));
    }
    ClosePipe();
  }
  void ClosePipe() {
    if (pipeRead >= 0) close(pipeRead);
    if (pipeWrite >= 0) close(pipeWrite);
    if (teeRead >= 0) close(teeRead);
    if (teeWrite >= 0) close(teeWrite);
    pipeRead = pipeWrite = teeRead = teeWrite = -1;
    pipeSlots = 0;
  }
};

constexpr size_t kPageBytes = 4096;
/** Replicated WRITE payloads up to this size are received into the buffer, not spliced (see ReadRequest). */
constexpr uint32_t kReplicatedBufferMaxBytes = 64 * 1024;
/** Pipes of this many bytes are asked for (the kernel may cap it: /proc/sys/fs/pipe-max-size, 1 MiB by default). */
constexpr int kPipeBytesWanted = 2 * 1024 * 1024;
/** Below this a pipe is not worth the extra system calls; the worker then uses its buffer only. */
constexpr size_t kPipeSlotsMin = 64;

// Page slots a byte range can take in a pipe at most (page-cache folios of at least a page).
size_t SlotsFor(uint64_t offset, uint32_t lengthBytes) {
  return (offset % kPageBytes + lengthBytes + kPageBytes - 1) / kPageBytes;
}

struct Finished {
  int reason;
  std::vector<uint8_t> leftover;
  int err;
};

class DataPath : public drbdts_repl::ReplySink {
 public:
  DataPath(int socketFd, int fileFd, uint64_t sizeBytes, uint32_t options, uint32_t requestBytesMax, int64_t bufferBytesCap,
           int threads, std::shared_ptr<drbdts_repl::Plane> plane)
      : plane_(std::move(plane)), socketFd_(socketFd), fileFd_(fileFd), sizeBytes_(sizeBytes), readOnly_((options & 1) != 0),
        structured_((options & 2) != 0), fuaAllowed_((options & 4) != 0), flushAllowed_((options & 8) != 0),
        spliceWrites_((options & 16) != 0), spliceReads_((options & 32) != 0), requestBytesMax_(requestBytesMax), bufferBytesCap_(bufferBytesCap),
        threadCount_(threads) {
    stopFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    abortFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  }

  ~DataPath() override {
    Join();
    if (stopFd_ >= 0) close(stopFd_);
    if (abortFd_ >= 0) close(abortFd_);
    close(socketFd_);
    close(fileFd_);
  }

  bool Ok() const { return stopFd_ >= 0 && abortFd_ >= 0; }

  // JavaScript thread. Starts a round; false when one is running or the path was aborted.
  bool Arm(std::function<void(Finished*)> finish) {
    std::lock_guard<std::mutex> lock(stateMutex_);
    if (active_ != 0 || aborted_.load() || destroying_) return false;
    finish_ = std::move(finish);
    uint64_t drained;
    while (read(stopFd_, &drained, sizeof drained) > 0) {
    }
    stopRequested_.store(false);
    ending_.store(false);
    reason_ = kRunning;
    err_ = 0;
    leftover_.clear();
    active_ = threadCount_;
    generation_ += 1;
    if (threads_.empty()) {
      for (int i = 0; i < threadCount_; i += 1) threads_.emplace_back([this] { Worker(); });
    } else {
      stateCv_.notify_all();
    }
    return true;
  }

  void Stop() {
    stopRequested_.store(true);
    Wake(stopFd_);
  }

  void Abort() {
    aborted_.store(true);
    stopRequested_.store(true);
    Wake(abortFd_);
    Wake(stopFd_);
  }

  void Join() {
    {
      std::lock_guard<std::mutex> lock(stateMutex_);
      if (destroying_) return;
      destroying_ = true;
    }
    Abort();
    stateCv_.notify_all();
    for (auto& thread : threads_) thread.join();
    threads_.clear();
  }

  uint64_t Requests() const { return requests_.load(); }
  uint64_t Spliced() const { return spliced_.load(); }

 private:
  static void Wake(int fd) {
    uint64_t one = 1;
    ssize_t ignored = write(fd, &one, sizeof one);
    (void)ignored;
  }

  void Worker() {
    WorkerBuffer buffer;
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(stateMutex_);
        stateCv_.wait(lock, [&] { return destroying_ || generation_ != seen; });
        if (generation_ == seen) return;  // destroying with no round to serve
        seen = generation_;
      }
      ServeRound(buffer);
      if (plane_ != nullptr) drbdts_repl::Flush(*plane_);
      std::function<void(Finished*)> finish;
      Finished* finished = nullptr;
      {
        std::unique_lock<std::mutex> lock(stateMutex_);
        active_ -= 1;
        // Replicated writes still waiting for the peer are answered (by the plane) before the round ends.
        if (active_ == 0) outstandingCv_.wait(lock, [&] { return outstanding_ == 0; });
        if (active_ == 0) {
          finished = new Finished{reason_ == kRunning ? kStopped : reason_, std::move(leftover_), err_};
          finish = std::move(finish_);
          finish_ = nullptr;
        }
      }
      if (finished != nullptr) finish(finished);
      {
        std::lock_guard<std::mutex> lock(stateMutex_);
        if (destroying_) return;
      }
    }
  }

  // Ends the round for every worker; the strongest reason wins. A handback keeps its header bytes.
  void EndRound(int reason, int err, const uint8_t* leftover, size_t leftoverBytes) {
    std::lock_guard<std::mutex> lock(stateMutex_);
    if (reason_ == kRunning || ReasonRank(reason) > ReasonRank(reason_)) {
      reason_ = reason;
      err_ = err;
      leftover_.assign(leftover, leftover + leftoverBytes);
    }
    ending_.store(true);
    Wake(stopFd_);  // the reader may be waiting for a header that will not come
  }

  void ServeRound(WorkerBuffer& buffer) {
    for (;;) {
      Request request;
      {
        // A frame this worker left in the batch need not be sent before it waits here: the worker holding the
        // lock sends the batch before it waits for the client (see Ship and WaitSocket).
        std::unique_lock<std::mutex> lock(readMutex_);
        if (ending_.load()) return;
        if (!ReadRequest(request, buffer)) return;
      }
      uint32_t error = Execute(request, buffer);
      requests_.fetch_add(1);
      if (request.inPipe) spliced_.fetch_add(1);
      if (plane_ != nullptr && request.type == kCmdRead && error == 0) drbdts_repl::CountRead(*plane_, request.lengthBytes);
      if (request.ticket != nullptr) {
        replicated_.fetch_add(1);
        // The plane answers once the peer's part is in too (from the thread reading the acks), or now.
        uint32_t replyError = 0;
        if (!drbdts_repl::LocalDone(*plane_, request.ticket, error, &replyError)) continue;
        error = replyError;
      }
      int err;
      {
        std::lock_guard<std::mutex> lock(writeMutex_);
        err = SendReply(request, error, buffer);
      }
      if (request.ticket != nullptr) OutstandingDone(1);
      if (err != 0) {
        EndRound(aborted_.load() ? kAborted : kSocketError, err, nullptr, 0);
        return;
      }
    }
  }

  // Waits until the socket is ready (POLLIN or POLLOUT); false when aborted, or stopped if `stoppable`.
  bool WaitSocket(short events, bool stoppable) {
    // Frames a worker left batched for the next request go to the peer before anyone waits for the client. The
    // flag is raised before that send and cleared after the wait: a worker that batches a frame meanwhile sees it
    // and sends the frame itself (Ship), so no frame waits for a request that will not come.
    bool reading = plane_ != nullptr && (events & POLLIN) != 0;
    if (reading) {
      readerWaiting_.store(true);
      drbdts_repl::Flush(*plane_);
    }
    bool ready = PollSocket(events, stoppable);
    if (reading) readerWaiting_.store(false);
    return ready;
  }

  bool PollSocket(short events, bool stoppable) {
    for (;;) {
      if (aborted_.load()) return false;
      if (stoppable && (stopRequested_.load() || ending_.load())) return false;
      struct pollfd fds[3] = {{socketFd_, events, 0}, {abortFd_, POLLIN, 0}, {stopFd_, POLLIN, 0}};
      int n = poll(fds, stoppable ? 3 : 2, -1);
      if (n < 0 && errno != EINTR) return false;
      if (fds[1].revents != 0) return false;
      if (stoppable && fds[2].revents != 0) return false;
      if (fds[0].revents != 0) return true;  // readable, writable, or an error for recv/send to report
    }
  }

  // Receives exactly `length` bytes. 0, or the reason to end the round (the errno in *err).
  int Receive(uint8_t* target, size_t length, int* err) {
    size_t got = 0;
    while (got < length) {
      ssize_t n = recv(socketFd_, target + got, length - got, 0);
      if (n > 0) {
        got += static_cast<size_t>(n);
        continue;
      }
      if (n == 0) return kTorn;
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        if (!WaitSocket(POLLIN, false)) return kAborted;
        continue;
      }
      *err = errno;
      return kSocketError;
    }
    return 0;
  }

  // The worker's pipe, made on first use; false when splicing is off or no useful pipe could be had.
  bool PipeReady(WorkerBuffer& buffer) {
    if (buffer.pipeRead >= 0) return true;
    if (!(spliceWrites_ || spliceReads_) || buffer.pipeTried) return false;
    buffer.pipeTried = true;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return false;
    buffer.pipeRead = fds[0];
    buffer.pipeWrite = fds[1];
    int bytes = -1;
    for (int wanted = kPipeBytesWanted; wanted >= 256 * 1024 && bytes < 0; wanted /= 2) bytes = fcntl(fds[1], F_SETPIPE_SZ, wanted);
    if (bytes < 0) bytes = fcntl(fds[1], F_GETPIPE_SZ);
    buffer.pipeSlots = bytes > 0 ? static_cast<size_t>(bytes) / kPageBytes : 0;
    if (buffer.pipeSlots < kPipeSlotsMin) {
      buffer.ClosePipe();
      return false;
    }
    return true;
  }

  // Empties the pipe into the buffer from `into` on (the bytes are kept) or, with into == nullptr, discards them.
  // The pipe is closed if that fails, so a later request never sees stale bytes in it.
  static bool DrainPipe(WorkerBuffer& buffer, uint8_t* into, size_t room) {
    uint8_t* scratch = buffer.data;
    for (;;) {
      ssize_t n = into != nullptr ? read(buffer.pipeRead, into, room) : read(buffer.pipeRead, scratch, buffer.capacity);
      if (n > 0) {
        if (into != nullptr) {
          into += n;
          room -= static_cast<size_t>(n);
          if (room == 0) return true;
        }
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && into == nullptr) return true;
      buffer.ClosePipe();
      return false;
    }
  }

  // Moves a WRITE payload from the socket into the pipe, whole, before anything is written: a client that dies
  // halfway leaves nothing on disk. Returns 0 with request.inPipe set, 0 with the payload in the buffer instead
  // (the pipe filled up before the payload ended: small socket fragments), or a reason to end the round.
  int ReceiveIntoPipe(Request& request, WorkerBuffer& buffer, int* err) {
    size_t got = 0;
    size_t length = request.lengthBytes;
    bool woke = false;  // the last wait reported the socket readable
    while (got < length) {
      ssize_t n = splice(socketFd_, nullptr, buffer.pipeWrite, nullptr, length - got, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n > 0) {
        got += static_cast<size_t>(n);
        woke = false;
        continue;
      }
      if (n == 0) {
        DrainPipe(buffer, nullptr, 0);
        return kTorn;
      }
      if (errno == EINTR) continue;
      bool full = false;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        // Right after a wait reported data, nothing moved: the pipe has no free slot. Otherwise the socket is
        // empty for now (no extra poll per wait to tell the two apart).
        full = woke;
        if (!full) {
          if (!WaitSocket(POLLIN, false)) {
            DrainPipe(buffer, nullptr, 0);
            return kAborted;
          }
          woke = true;
          continue;
        }
      }
      // A full pipe, or a socket splice does not serve: what arrived so far moves to the buffer, recv does the rest.
      if (got > 0 && !DrainPipe(buffer, buffer.data, got)) {
        *err = EIO;
        return kSocketError;
      }
      if (!full) buffer.ClosePipe();  // splice itself failed: do not try again on this worker
      request.inPipe = false;
      return Receive(buffer.data + got, length - got, err);
    }
    request.inPipe = true;
    return 0;
  }

  bool Reserve(WorkerBuffer& buffer, size_t bytes) {
    if (buffer.capacity >= bytes) return true;
    // Whole MiB steps, so that a client mixing sizes does not make us grow a little at a time.
    size_t capacity = (bytes + (1u << 20) - 1) & ~static_cast<size_t>((1u << 20) - 1);
    int64_t more = static_cast<int64_t>(capacity - buffer.capacity);
    if (gBufferBytes.fetch_add(more) + more > bufferBytesCap_) {
      gBufferBytes.fetch_sub(more);
      return false;
    }
    void* grown = realloc(buffer.data, capacity);
    if (grown == nullptr) {
      gBufferBytes.fetch_sub(more);
      return false;
    }
    buffer.data = static_cast<uint8_t*>(grown);
    buffer.capacity = capacity;
    return true;
  }

  // Reads the next request, and a WRITE's payload, under the read lock. False once the round is over.
  bool ReadRequest(Request& request, WorkerBuffer& buffer) {
    uint8_t* header = request.header;
    size_t got = 0;
    // Waiting for the first byte of a header is where stop() and a handback elsewhere take effect.
    while (got < kRequestHeaderBytes) {
      if (got == 0 && (stopRequested_.load() || ending_.load())) {
        EndRound(aborted_.load() ? kAborted : kStopped, 0, nullptr, 0);
        return false;
      }
      ssize_t n = recv(socketFd_, header + got, kRequestHeaderBytes - got, 0);
      if (n > 0) {
        got += static_cast<size_t>(n);
        continue;
      }
      if (n == 0) {
        // EOF between requests is the client's normal close; halfway through a header, JavaScript sees it too.
        EndRound(got == 0 ? kEnd : kHandback, 0, header, got);
        return false;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        if (!WaitSocket(POLLIN, got == 0)) {
          EndRound(aborted_.load() ? kAborted : kStopped, 0, nullptr, 0);
          return false;
        }
        continue;
      }
      EndRound(kSocketError, errno, nullptr, 0);
      return false;
    }
    request.flags = Get16(header + 4);
    request.type = Get16(header + 6);
    request.offset = Get64(header + 16);
    request.lengthBytes = Get32(header + 24);
    if (!Accepted(request) || (request.type != kCmdFlush && !Reserve(buffer, request.lengthBytes))) {
      EndRound(kHandback, 0, header, kRequestHeaderBytes);
      return false;
    }
    request.inPipe = false;
    request.ticket = nullptr;
    if (plane_ != nullptr && request.type != kCmdRead) {
      // A replicated device: the plane takes the write or flush while its conditions hold; else JavaScript does.
      request.ticket = drbdts_repl::Admit(*plane_, this, request.header + 8, request.type == kCmdFlush, request.offset,
                                          request.lengthBytes, (request.flags & kCmdFlagFua) != 0);
      if (request.ticket == nullptr) {
        EndRound(kHandback, 0, header, kRequestHeaderBytes);
        return false;
      }
      std::lock_guard<std::mutex> lock(stateMutex_);
      outstanding_ += 1;
    }
    if (request.type == kCmdWrite) {
      int err = 0;
      // A small replicated payload goes through the buffer: it is batched with other frames into one send to the
      // peer, where a pipe would cost a tee and two splices per write.
      bool small = request.ticket != nullptr && request.lengthBytes <= kReplicatedBufferMaxBytes;
      int reason = !small && spliceWrites_ && PipeReady(buffer) && SlotsFor(0, request.lengthBytes) <= buffer.pipeSlots
                       ? ReceiveIntoPipe(request, buffer, &err)
                       : Receive(buffer.data, request.lengthBytes, &err);
      if (reason != 0) {
        if (request.ticket != nullptr) {
          drbdts_repl::Abandon(*plane_, request.ticket);
          OutstandingDone(1);
        }
        EndRound(reason, err, nullptr, 0);
        return false;
      }
    }
    return true;
  }

  // The requests served here; any other goes back to JavaScript, which validates and answers it.
  bool Accepted(const Request& request) const {
    if (Get32(request.header) != kRequestMagic) return false;
    uint16_t fua = fuaAllowed_ ? kCmdFlagFua : 0;
    switch (request.type) {
      case kCmdRead:
        if ((request.flags & ~(fua | (structured_ ? kCmdFlagDf : 0))) != 0) return false;
        break;
      case kCmdWrite:
        if (readOnly_ || (request.flags & ~fua) != 0) return false;
        break;
      case kCmdFlush:
        return flushAllowed_ && (request.flags & ~fua) == 0 && request.offset == 0 && request.lengthBytes == 0;
      default:
        return false;
    }
    return request.lengthBytes != 0 && request.lengthBytes <= requestBytesMax_ && request.offset <= sizeBytes_ &&
           request.lengthBytes <= sizeBytes_ - request.offset;
  }

  static int Fdatasync(int fd) {
    while (fdatasync(fd) != 0) {
      if (errno != EINTR) return errno;
    }
    return 0;
  }

  // The system calls; the NBD error to answer with (0 for success).
  uint32_t Execute(Request& request, WorkerBuffer& buffer) {
    if (request.ticket != nullptr) Ship(request, buffer);
    if (request.type == kCmdFlush) {
      int err = Fdatasync(fileFd_);
      return err == 0 ? 0 : NbdError(err);
    }
    if (request.type == kCmdWrite && request.inPipe) return WriteFromPipe(request, buffer);
    if (request.type == kCmdRead && spliceReads_ && PipeReady(buffer) && SlotsFor(request.offset, request.lengthBytes) <= buffer.pipeSlots) {
      uint32_t error = 0;
      if (ReadIntoPipe(request, buffer, &error)) return error;
      // Not all of it came into the pipe (a slot count off, a file splice does not serve): read it plainly.
    }
    size_t done = 0;
    while (done < request.lengthBytes) {
      off_t at = static_cast<off_t>(request.offset + done);
      size_t left = request.lengthBytes - done;
      ssize_t n = request.type == kCmdRead ? pread(fileFd_, buffer.data + done, left, at)
                                           : pwrite(fileFd_, buffer.data + done, left, at);
      if (n > 0) {
        done += static_cast<size_t>(n);
        continue;
      }
      if (n == 0) return NbdError(request.type == kCmdRead ? EIO : ENOSPC);  // the file shrank under us
      if (errno == EINTR) continue;
      return NbdError(errno);
    }
    if (request.type == kCmdWrite && (request.flags & kCmdFlagFua) != 0) {
      int err = Fdatasync(fileFd_);
      if (err != 0) return NbdError(err);
    }
    return 0;
  }

  // A replicated request goes to the peer before its local part starts: the BARRIER of a FLUSH, or the DATA frame
  // of a WRITE once every earlier overlapping write is on the local disk. A payload in the pipe is tee'd into a
  // second pipe (page references, no copy) that is spliced to the peer's socket, so it is copied once in all,
  // into the page cache by the local splice; one in the buffer is sent from there (small ones batched).
  void Ship(Request& request, WorkerBuffer& buffer) {
    drbdts_repl::Ticket* ticket = request.ticket;
    if (request.type == kCmdFlush) {
      drbdts_repl::ShipBarrier(*plane_, ticket);
      return;
    }
    drbdts_repl::WaitTurn(*plane_, ticket);
    if (request.inPipe) {
      if (TeeReady(buffer) && Tee(buffer, request.lengthBytes)) {
        if (!drbdts_repl::ShipPipe(*plane_, ticket, buffer.teeRead)) DrainFd(buffer.teeRead, buffer);
        return;
      }
      // No tee: the payload moves to the buffer and goes from there.
      if (!DrainPipe(buffer, buffer.data, request.lengthBytes)) {
        request.inPipe = false;
        drbdts_repl::ShipBuffer(*plane_, ticket, buffer.data, false);  // the pipe broke: the local write says what went wrong
        return;
      }
      request.inPipe = false;
    }
    // Another request already waiting: this frame may go in the same send as its. The worker reading requests
    // sends the batch before it waits for the client (WaitSocket); if it already waits (it read that request
    // before this frame was batched), the frame goes now. The flag is read after the batch's lock was released
    // and raised before the reader takes that lock to send, so one of the two sees the other.
    int pending = 0;
    bool more = ioctl(socketFd_, FIONREAD, &pending) == 0 && pending >= static_cast<int>(kRequestHeaderBytes);
    drbdts_repl::ShipBuffer(*plane_, ticket, buffer.data, more);
    if (more && readerWaiting_.load()) drbdts_repl::Flush(*plane_);
  }

  bool TeeReady(WorkerBuffer& buffer) {
    if (buffer.teeRead >= 0) return true;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return false;
    int bytes = fcntl(fds[1], F_SETPIPE_SZ, static_cast<int>(buffer.pipeSlots * kPageBytes));
    if (bytes < 0 || static_cast<size_t>(bytes) / kPageBytes < buffer.pipeSlots) {
      close(fds[0]);
      close(fds[1]);
      return false;
    }
    buffer.teeRead = fds[0];
    buffer.teeWrite = fds[1];
    return true;
  }

  // Duplicates the whole payload into the tee pipe in one call (tee always starts at the pipe's head).
  static bool Tee(WorkerBuffer& buffer, size_t length) {
    for (;;) {
      ssize_t n = tee(buffer.pipeRead, buffer.teeWrite, length, SPLICE_F_NONBLOCK);
      if (n < 0 && errno == EINTR) continue;
      if (n == static_cast<ssize_t>(length)) return true;
      if (n > 0) DrainFd(buffer.teeRead, buffer);
      return false;
    }
  }

  // Empties a pipe of whatever is left in it.
  static void DrainFd(int fd, WorkerBuffer& buffer) {
    for (;;) {
      ssize_t n = read(fd, buffer.data, buffer.capacity);
      if (n > 0) continue;
      if (n < 0 && errno == EINTR) continue;
      return;
    }
  }

  // The plane's thread answers writes whose peer part came last: one writev of simple replies.
  void SendCompletions(const drbdts_repl::Completion* completions, size_t count) override {
    std::vector<uint8_t> replies(count * 16);
    for (size_t i = 0; i < count; i += 1) {
      uint8_t* reply = replies.data() + i * 16;
      Put32(reply, kSimpleReplyMagic);
      Put32(reply + 4, completions[i].error);
      memcpy(reply + 8, completions[i].cookie, 8);
    }
    int err = 0;
    {
      std::lock_guard<std::mutex> lock(writeMutex_);
      size_t done = 0;
      while (done < replies.size()) {
        ssize_t n = send(socketFd_, replies.data() + done, replies.size() - done, MSG_NOSIGNAL);
        if (n > 0) {
          done += static_cast<size_t>(n);
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
          if (!WaitSocket(POLLOUT, false)) {
            err = ECANCELED;
            break;
          }
          continue;
        }
        err = n == 0 ? EIO : errno;
        break;
      }
    }
    if (err != 0) EndRound(aborted_.load() ? kAborted : kSocketError, err, nullptr, 0);
    OutstandingDone(count);
  }

  void OutstandingDone(size_t count) {
    std::lock_guard<std::mutex> lock(stateMutex_);
    outstanding_ -= count;
    if (outstanding_ == 0) outstandingCv_.notify_all();
  }

  uint32_t WriteFromPipe(const Request& request, WorkerBuffer& buffer) {
    loff_t at = static_cast<loff_t>(request.offset);
    size_t left = request.lengthBytes;
    uint32_t error = 0;
    while (left > 0) {
      ssize_t n = splice(buffer.pipeRead, nullptr, fileFd_, &at, left, SPLICE_F_MOVE);
      if (n > 0) {
        left -= static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      error = NbdError(n == 0 ? EIO : errno);
      DrainPipe(buffer, nullptr, 0);  // what the file did not take must not stay for the next request
      return error;
    }
    if ((request.flags & kCmdFlagFua) != 0) {
      int err = Fdatasync(fileFd_);
      if (err != 0) return NbdError(err);
    }
    return 0;
  }

  // Splices the whole READ range into the pipe (page references, no copy) before the reply: an error reading the
  // file still becomes an error reply. True when done (*error set for a failed read); false to fall back to pread
  // with the pipe empty.
  bool ReadIntoPipe(Request& request, WorkerBuffer& buffer, uint32_t* error) {
    loff_t at = static_cast<loff_t>(request.offset);
    size_t got = 0;
    while (got < request.lengthBytes) {
      ssize_t n = splice(fileFd_, &at, buffer.pipeWrite, nullptr, request.lengthBytes - got, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n > 0) {
        got += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      DrainPipe(buffer, nullptr, 0);
      if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINVAL) {
        *error = NbdError(errno);
        return true;
      }
      if (n < 0 && errno == EINVAL) buffer.ClosePipe();  // this file cannot be spliced from
      return false;
    }
    request.inPipe = true;
    return true;
  }

  // Sends the reply under the write lock. 0, or the errno that broke the socket (ECANCELED when aborted).
  int SendReply(const Request& request, uint32_t error, WorkerBuffer& buffer) {
    uint8_t header[32];
    size_t headerBytes;
    bool withData = request.type == kCmdRead && error == 0;
    if (structured_ && request.type == kCmdRead) {
      Put32(header, kStructuredReplyMagic);
      Put16(header + 4, kReplyFlagDone);
      memcpy(header + 8, request.header + 8, 8);  // the cookie, as the client sent it
      if (withData) {
        Put16(header + 6, kReplyTypeOffsetData);
        Put32(header + 16, 8 + request.lengthBytes);
        Put64(header + 20, request.offset);
        headerBytes = 28;
      } else {
        Put16(header + 6, kReplyTypeError);
        Put32(header + 16, 6);
        Put32(header + 20, error);
        Put16(header + 24, 0);
        headerBytes = 26;
      }
    } else {
      Put32(header, kSimpleReplyMagic);
      Put32(header + 4, error);
      memcpy(header + 8, request.header + 8, 8);
      headerBytes = 16;
    }
    bool fromPipe = withData && request.inPipe;
    struct iovec iov[2] = {{header, headerBytes}, {buffer.data, withData && !fromPipe ? request.lengthBytes : 0}};
    int count = withData && !fromPipe ? 2 : 1;
    struct iovec* next = iov;
    while (count > 0) {
      struct msghdr message = {};
      message.msg_iov = next;
      message.msg_iovlen = static_cast<size_t>(count);
      ssize_t n = sendmsg(socketFd_, &message, MSG_NOSIGNAL | (fromPipe ? MSG_MORE : 0));
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          if (!WaitSocket(POLLOUT, false)) return ECANCELED;
          continue;
        }
        return errno;
      }
      size_t sent = static_cast<size_t>(n);
      while (count > 0 && sent >= next->iov_len) {
        sent -= next->iov_len;
        next += 1;
        count -= 1;
      }
      if (count > 0) {
        next->iov_base = static_cast<uint8_t*>(next->iov_base) + sent;
        next->iov_len -= sent;
      }
    }
    if (!fromPipe) return 0;
    size_t left = request.lengthBytes;
    while (left > 0) {
      ssize_t n = splice(buffer.pipeRead, nullptr, socketFd_, nullptr, left, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n > 0) {
        left -= static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (!WaitSocket(POLLOUT, false)) return ECANCELED;
        continue;
      }
      int err = n == 0 ? EIO : errno;
      buffer.ClosePipe();
      return err;
    }
    return 0;
  }

  const std::shared_ptr<drbdts_repl::Plane> plane_;
  const int socketFd_;
  const int fileFd_;
  const uint64_t sizeBytes_;
  const bool readOnly_;
  const bool structured_;
  const bool fuaAllowed_;
  const bool flushAllowed_;
  const bool spliceWrites_;
  const bool spliceReads_;
  const uint32_t requestBytesMax_;
  const int64_t bufferBytesCap_;
  const int threadCount_;
  int stopFd_ = -1;
  int abortFd_ = -1;

  std::mutex readMutex_;
  std::mutex writeMutex_;
  std::mutex stateMutex_;
  std::condition_variable stateCv_;
  std::vector<std::thread> threads_;
  uint64_t generation_ = 0;
  bool destroying_ = false;
  int active_ = 0;
  int reason_ = kRunning;
  int err_ = 0;
  std::vector<uint8_t> leftover_;
  std::function<void(Finished*)> finish_;
  std::atomic<bool> stopRequested_{false};
  std::atomic<bool> ending_{false};
  std::atomic<bool> aborted_{false};
  std::atomic<uint64_t> requests_{0};
  std::atomic<uint64_t> spliced_{0};
  std::atomic<uint64_t> replicated_{0};
  /** The worker holding the read lock waits for the client (a replicated device's batch was sent before). */
  std::atomic<bool> readerWaiting_{false};
  /** Replicated requests admitted and not answered yet. */
  size_t outstanding_ = 0;
  std::condition_variable outstandingCv_;

 public:
  uint64_t Replicated() const { return replicated_.load(); }
};

void DeliverFinished(Napi::Env env, Napi::Function callback, Finished* finished);

// The JavaScript object: new NbdDataPath(socketFd, fileFd, sizeBytes, options, requestBytesMax, bufferBytesCap,
// threads, onStop). The descriptors are duplicated; the caller keeps its own.
class NbdDataPath : public Napi::ObjectWrap<NbdDataPath> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NbdDataPath",
                       {InstanceMethod("arm", &NbdDataPath::ArmMethod), InstanceMethod("stop", &NbdDataPath::StopMethod),
                        InstanceMethod("abort", &NbdDataPath::AbortMethod),
                        InstanceMethod("destroy", &NbdDataPath::DestroyMethod),
                        InstanceMethod("requests", &NbdDataPath::RequestsMethod),
                        InstanceMethod("splicedRequests", &NbdDataPath::SplicedMethod),
                        InstanceMethod("replicatedRequests", &NbdDataPath::ReplicatedMethod),
                        InstanceMethod("unref", &NbdDataPath::UnrefMethod)});
  }

  explicit NbdDataPath(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NbdDataPath>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 8 || !info[7].IsFunction()) throw Napi::TypeError::New(env, "NbdDataPath: 8 arguments expected");
    for (size_t i = 0; i < 7; i += 1) {
      if (!info[i].IsNumber()) throw Napi::TypeError::New(env, "NbdDataPath: argument " + std::to_string(i) + " must be a number");
    }
    int socketFd = info[0].As<Napi::Number>().Int32Value();
    int fileFd = info[1].As<Napi::Number>().Int32Value();
    double sizeBytes = info[2].As<Napi::Number>().DoubleValue();
    uint32_t options = info[3].As<Napi::Number>().Uint32Value();
    uint32_t requestBytesMax = info[4].As<Napi::Number>().Uint32Value();
    int64_t bufferBytesCap = info[5].As<Napi::Number>().Int64Value();
    int threads = info[6].As<Napi::Number>().Int32Value();
    if (socketFd < 0 || fileFd < 0 || !(sizeBytes >= 0) || threads < 1 || threads > 64 || requestBytesMax == 0) {
      throw Napi::TypeError::New(env, "NbdDataPath: argument out of range");
    }
    int socketDup = fcntl(socketFd, F_DUPFD_CLOEXEC, 0);
    if (socketDup < 0) throw Napi::Error::New(env, std::string("NbdDataPath: dup of the socket: ") + strerror(errno));
    int fileDup = fcntl(fileFd, F_DUPFD_CLOEXEC, 0);
    if (fileDup < 0) {
      close(socketDup);
      throw Napi::Error::New(env, std::string("NbdDataPath: dup of the file: ") + strerror(errno));
    }
    std::shared_ptr<drbdts_repl::Plane> plane;
    if (info.Length() > 8 && !info[8].IsUndefined() && !info[8].IsNull()) {
      plane = drbdts_repl::PlaneFromValue(info[8]);
      if (plane == nullptr) {
        close(socketDup);
        close(fileDup);
        throw Napi::TypeError::New(env, "NbdDataPath: argument 8 must be a ReplPlane");
      }
    }
    path_ = new DataPath(socketDup, fileDup, static_cast<uint64_t>(sizeBytes), options, requestBytesMax, bufferBytesCap, threads,
                         std::move(plane));
    if (!path_->Ok()) {
      delete path_;
      path_ = nullptr;
      throw Napi::Error::New(env, std::string("NbdDataPath: eventfd: ") + strerror(errno));
    }
    tsfn_ = Napi::ThreadSafeFunction::New(env, info[7].As<Napi::Function>(), "nbdDataPath", 0, 1);
    tsfn_.Unref(env);
  }

  ~NbdDataPath() override { Release(); }

 private:
  void Release() {
    if (path_ != nullptr) {
      delete path_;  // joins the workers
      path_ = nullptr;
      tsfn_.Release();
    }
  }

  Napi::Value ArmMethod(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (path_ == nullptr) return Napi::Boolean::New(env, false);
    Napi::ThreadSafeFunction tsfn = tsfn_;
    bool armed = path_->Arm([tsfn](Finished* finished) mutable {
      if (tsfn.NonBlockingCall(finished, DeliverFinished) != napi_ok) delete finished;
    });
    // While a round runs the callback must keep the loop alive: libuv is not reading the socket meanwhile.
    if (armed) tsfn_.Ref(env);
    return Napi::Boolean::New(env, armed);
  }

  Napi::Value StopMethod(const Napi::CallbackInfo& info) {
    if (path_ != nullptr) path_->Stop();
    return info.Env().Undefined();
  }

  Napi::Value AbortMethod(const Napi::CallbackInfo& info) {
    if (path_ != nullptr) path_->Abort();
    return info.Env().Undefined();
  }

  Napi::Value DestroyMethod(const Napi::CallbackInfo& info) {
    Release();
    return info.Env().Undefined();
  }

  Napi::Value RequestsMethod(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), path_ == nullptr ? 0 : static_cast<double>(path_->Requests()));
  }

  Napi::Value ReplicatedMethod(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), path_ == nullptr ? 0 : static_cast<double>(path_->Replicated()));
  }

  Napi::Value SplicedMethod(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), path_ == nullptr ? 0 : static_cast<double>(path_->Spliced()));
  }

  // Called by JavaScript once a round's result arrived: an idle path must not keep the process alive.
  Napi::Value UnrefMethod(const Napi::CallbackInfo& info) {
    if (path_ != nullptr) tsfn_.Unref(info.Env());
    return info.Env().Undefined();
  }

  DataPath* path_ = nullptr;
  Napi::ThreadSafeFunction tsfn_;
};

void DeliverFinished(Napi::Env env, Napi::Function callback, Finished* finished) {
  if (env != nullptr && callback != nullptr) {
    Napi::Value leftover = finished->leftover.empty()
                               ? env.Undefined()
                               : Napi::Buffer<uint8_t>::Copy(env, finished->leftover.data(), finished->leftover.size()).As<Napi::Value>();
    callback.Call({Napi::Number::New(env, finished->reason), leftover, Napi::Number::New(env, finished->err)});
  }
  delete finished;
}

}  // namespace

void InitNbdDataPath(Napi::Env env, Napi::Object exports) {
  exports.Set("NbdDataPath", NbdDataPath::Define(env));
  exports.Set("nbdDataPathBufferBytes", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(gBufferBytes.load()));
  }, "nbdDataPathBufferBytes"));
}
