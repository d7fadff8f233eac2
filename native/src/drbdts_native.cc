// drbdts native addon: only what Node.js lacks.
//
// - fallocate PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE and plain allocation (TRIM and WRITE_ZEROES on files), asynchronous
// - lseek SEEK_DATA / SEEK_HOLE (block status), synchronous: an extent lookup, no data I/O
// - BLKGETSIZE64, BLKSSZGET (sizes), BLKDISCARD and BLKZEROOUT (asynchronous: a device may take long)
// - posix_fadvise WILLNEED (NBD_CMD_CACHE)
// - preadv2/pwritev2 with RWF_NOWAIT: page-cache hits served on the event loop without ever waiting on the disk
// - a batched positioned-I/O worker: many pread/pwrite calls and at most one fdatasync per thread-pool hop,
//   because one hop per 4 KiB request costs more than the copy itself (see bench/README.md)
// - SO_SNDBUF/SO_RCVBUF on stream sockets (Node sets them only for UDP)
// - the kernel NBD client (/dev/nbdX): socketpair, the configuration ioctls, NBD_DO_IT on a dedicated thread
// - the NBD data path on native threads (READ/WRITE/FLUSH for LocalDisk exports): nbd_data_path.cc
//
// Errors reach JavaScript as Node-style errors: message "CODE: description, syscall", .code (errno name),
// .errno (negative, as libuv reports it) and .syscall. The TypeScript wrapper (src/native/index.ts) validates
// arguments before they get here; the checks below are the second line, and throw TypeError.

#include <malloc.h>
#include <napi.h>
#include <uv.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/nbd.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>
#include <stdio.h>

#include <string>
#include <thread>
#include <vector>

void InitDirsyncScan(Napi::Env env, Napi::Object exports);  // dirsync_scan.cc
void InitDirsyncJoin(Napi::Env env, Napi::Object exports);  // dirsync_join.cc
void InitDirsyncHash(Napi::Env env, Napi::Object exports);  // dirsync_hash.cc
void InitNbdDataPath(Napi::Env env, Napi::Object exports);  // nbd_data_path.cc
void InitReplPlane(Napi::Env env, Napi::Object exports);  // repl_plane.cc
void InitDirsyncCopy(Napi::Env env, Napi::Object exports);  // dirsync_copy.cc

namespace {

Napi::Error MakeErrnoError(Napi::Env env, int err, const char* syscall) {
  const char* code = uv_err_name(-err);
  std::string message = std::string(code) + ": " + strerror(err) + ", " + syscall;
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, code));
  error.Set("errno", Napi::Number::New(env, -err));
  error.Set("syscall", Napi::String::New(env, syscall));
  return error;
}

// Argument readers. A wrong type here is a bug in the TypeScript wrapper, not an operator error.
int ArgFd(const Napi::CallbackInfo& info, size_t index) {
  if (info.Length() <= index || !info[index].IsNumber()) {
    throw Napi::TypeError::New(info.Env(), "argument " + std::to_string(index) + " must be a file descriptor");
  }
  int64_t fd = info[index].As<Napi::Number>().Int64Value();
  if (fd < 0 || fd > INT32_MAX) throw Napi::TypeError::New(info.Env(), "file descriptor out of range");
  return static_cast<int>(fd);
}

int64_t ArgInt64(const Napi::CallbackInfo& info, size_t index, const char* name) {
  if (info.Length() <= index || !info[index].IsNumber()) {
    throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a number");
  }
  double value = info[index].As<Napi::Number>().DoubleValue();
  // 2^53: beyond it a JavaScript number no longer holds every integer.
  if (!(value >= 0 && value <= 9007199254740991.0) || value != static_cast<double>(static_cast<int64_t>(value))) {
    throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a non-negative safe integer");
  }
  return static_cast<int64_t>(value);
}

// ---------------------------------------------------------------------------------------------------------
// One-shot asynchronous system calls (fallocate, BLKDISCARD, BLKZEROOUT) on the libuv thread pool.

enum class RangeOp { kPunchHole, kZeroRange, kAllocate, kBlockDiscard, kBlockZeroOut };

class RangeWorker : public Napi::AsyncWorker {
 public:
  RangeWorker(Napi::Env env, RangeOp op, int fd, int64_t offset, int64_t length)
      : Napi::AsyncWorker(env, "drbdts.range"),
        deferred_(Napi::Promise::Deferred::New(env)),
        op_(op),
        fd_(fd),
        offset_(offset),
        length_(length) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    int result;
    do {
      switch (op_) {
        case RangeOp::kPunchHole:
          result = fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset_, length_);
          break;
        case RangeOp::kZeroRange:
          result = fallocate(fd_, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset_, length_);
          break;
        case RangeOp::kAllocate:
          result = fallocate(fd_, FALLOC_FL_KEEP_SIZE, offset_, length_);
          break;
        case RangeOp::kBlockDiscard:
        case RangeOp::kBlockZeroOut: {
          uint64_t range[2] = {static_cast<uint64_t>(offset_), static_cast<uint64_t>(length_)};
          result = ioctl(fd_, op_ == RangeOp::kBlockDiscard ? BLKDISCARD : BLKZEROOUT, range);
          break;
        }
        default:
          result = -1;
          errno = EINVAL;
      }
    } while (result != 0 && errno == EINTR);
    err_ = result == 0 ? 0 : errno;
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (err_ == 0) {
      deferred_.Resolve(env.Undefined());
      return;
    }
    const char* syscall = op_ == RangeOp::kBlockDiscard   ? "ioctl(BLKDISCARD)"
                          : op_ == RangeOp::kBlockZeroOut ? "ioctl(BLKZEROOUT)"
                                                          : "fallocate";
    deferred_.Reject(MakeErrnoError(env, err_, syscall).Value());
  }

  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  RangeOp op_;
  int fd_;
  int64_t offset_;
  int64_t length_;
  int err_ = 0;
};

Napi::Value StartRange(const Napi::CallbackInfo& info, RangeOp op) {
  int fd = ArgFd(info, 0);
  int64_t offset = ArgInt64(info, 1, "offset");
  int64_t length = ArgInt64(info, 2, "length");
  auto* worker = new RangeWorker(info.Env(), op, fd, offset, length);
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

Napi::Value PunchHole(const Napi::CallbackInfo& info) { return StartRange(info, RangeOp::kPunchHole); }
Napi::Value ZeroRange(const Napi::CallbackInfo& info) { return StartRange(info, RangeOp::kZeroRange); }
Napi::Value AllocateRange(const Napi::CallbackInfo& info) { return StartRange(info, RangeOp::kAllocate); }
Napi::Value BlockDiscard(const Napi::CallbackInfo& info) { return StartRange(info, RangeOp::kBlockDiscard); }
Napi::Value BlockZeroOut(const Napi::CallbackInfo& info) { return StartRange(info, RangeOp::kBlockZeroOut); }

// ---------------------------------------------------------------------------------------------------------
// Synchronous calls: each is one quick kernel call with no data transfer.

Napi::Value Seek(const Napi::CallbackInfo& info, int whence) {
  int fd = ArgFd(info, 0);
  int64_t offset = ArgInt64(info, 1, "offset");
  off_t result = lseek(fd, offset, whence);
  if (result < 0) {
    // ENXIO: no data (or no hole, past the end) at or after offset. The caller expects -1 for that.
    if (errno == ENXIO) return Napi::Number::New(info.Env(), -1);
    throw MakeErrnoError(info.Env(), errno, whence == SEEK_DATA ? "lseek(SEEK_DATA)" : "lseek(SEEK_HOLE)");
  }
  return Napi::Number::New(info.Env(), static_cast<double>(result));
}

Napi::Value SeekData(const Napi::CallbackInfo& info) { return Seek(info, SEEK_DATA); }
Napi::Value SeekHole(const Napi::CallbackInfo& info) { return Seek(info, SEEK_HOLE); }

Napi::Value BlockDeviceSizeBytes(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  uint64_t size = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) != 0) throw MakeErrnoError(info.Env(), errno, "ioctl(BLKGETSIZE64)");
  return Napi::Number::New(info.Env(), static_cast<double>(size));
}

Napi::Value BlockDeviceLogicalBlockSizeBytes(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int size = 0;
  if (ioctl(fd, BLKSSZGET, &size) != 0) throw MakeErrnoError(info.Env(), errno, "ioctl(BLKSSZGET)");
  return Napi::Number::New(info.Env(), size);
}

Napi::Value FadviseWillNeed(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int64_t offset = ArgInt64(info, 1, "offset");
  int64_t length = ArgInt64(info, 2, "length");
  // posix_fadvise returns the error number rather than setting errno. WILLNEED starts readahead and returns.
  int err = posix_fadvise(fd, offset, length, POSIX_FADV_WILLNEED);
  if (err != 0) throw MakeErrnoError(info.Env(), err, "posix_fadvise");
  return info.Env().Undefined();
}

// ---------------------------------------------------------------------------------------------------------
// Non-blocking positioned I/O on the event loop: preadv2/pwritev2 with RWF_NOWAIT copy from or into the page
// cache and return EAGAIN instead of waiting for the disk (or for writeback throttling). Cached 4 KiB reads
// then cost a system call instead of a thread-pool round trip, and the loop never waits on the device.
// Returns the bytes transferred (possibly short), -1 when the call would block, -2 when the file or kernel
// does not support RWF_NOWAIT (the caller stops trying).

Napi::Value TransferNowait(const Napi::CallbackInfo& info, bool write) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  if (info.Length() < 3 || !info[1].IsTypedArray()) throw Napi::TypeError::New(env, "buffer must be a Uint8Array");
  Napi::TypedArray view = info[1].As<Napi::TypedArray>();
  if (view.TypedArrayType() != napi_uint8_array) throw Napi::TypeError::New(env, "buffer must be a Uint8Array");
  int64_t offset = ArgInt64(info, 2, "offset");
  Napi::Uint8Array bytes = view.As<Napi::Uint8Array>();
  struct iovec iov;
  iov.iov_base = bytes.Data();
  iov.iov_len = bytes.ByteLength();
  ssize_t n;
  do {
    n = write ? pwritev2(fd, &iov, 1, offset, RWF_NOWAIT) : preadv2(fd, &iov, 1, offset, RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
  if (n >= 0) return Napi::Number::New(env, static_cast<double>(n));
  if (errno == EAGAIN) return Napi::Number::New(env, -1);
  if (errno == EOPNOTSUPP || errno == EINVAL) return Napi::Number::New(env, -2);
  throw MakeErrnoError(env, errno, write ? "pwritev2(RWF_NOWAIT)" : "preadv2(RWF_NOWAIT)");
}

Napi::Value PreadNowait(const Napi::CallbackInfo& info) { return TransferNowait(info, false); }
Napi::Value PwriteNowait(const Napi::CallbackInfo& info) { return TransferNowait(info, true); }

// ---------------------------------------------------------------------------------------------------------
// Batched positioned I/O. JavaScript fills parallel arrays (kinds, offsets, buffers) for `count` operations;
// one thread-pool hop runs them in order, then one fdatasync if any operation asked for durability, and
// writes each operation's result (0 or a positive errno) into `results` before calling back.

enum BatchKind : uint8_t { kRead = 0, kWrite = 1, kWriteFua = 2, kFlush = 3 };

struct BatchOp {
  uint8_t kind;
  int64_t offset;
  char* data;
  size_t length;
};

class BatchWorker : public Napi::AsyncWorker {
 public:
  BatchWorker(Napi::Function callback, int fd, std::vector<BatchOp>&& ops, int32_t* results,
              Napi::Object buffers, Napi::Object results_array)
      : Napi::AsyncWorker(callback, "drbdts.ioBatch"), fd_(fd), ops_(std::move(ops)), results_(results) {
    // The buffers and the results array must outlive the worker: hold them until OnOK/OnError.
    buffers_ref_ = Napi::Persistent(buffers);
    results_ref_ = Napi::Persistent(results_array);
  }

  void Execute() override {
    bool sync_needed = false;
    for (size_t i = 0; i < ops_.size(); i++) {
      const BatchOp& op = ops_[i];
      int err = 0;
      if (op.kind == kRead) {
        err = ReadFully(op);
      } else if (op.kind == kWrite || op.kind == kWriteFua) {
        err = WriteFully(op);
        if (err == 0 && op.kind == kWriteFua) sync_needed = true;
      } else {
        sync_needed = true;
      }
      results_[i] = err;
    }
    if (!sync_needed) return;
    // One fdatasync makes every write this worker did, and every write that completed before, durable:
    // it serves all FUA writes and flushes of the batch at once (group commit).
    int result;
    do {
      result = fdatasync(fd_);
    } while (result != 0 && errno == EINTR);
    if (result == 0) return;
    int err = errno;
    for (size_t i = 0; i < ops_.size(); i++) {
      if ((ops_[i].kind == kWriteFua || ops_[i].kind == kFlush) && results_[i] == 0) results_[i] = err;
    }
  }

  void OnOK() override { Callback().Call({Env().Null()}); }

 private:
  int ReadFully(const BatchOp& op) {
    size_t done = 0;
    while (done < op.length) {
      ssize_t n = pread(fd_, op.data + done, op.length - done, op.offset + static_cast<int64_t>(done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno;
      }
      // End of file inside the exposed area: the backing file shrank under us. Report it, never invent data.
      if (n == 0) return EIO;
      done += static_cast<size_t>(n);
    }
    return 0;
  }

  int WriteFully(const BatchOp& op) {
    size_t done = 0;
    while (done < op.length) {
      ssize_t n = pwrite(fd_, op.data + done, op.length - done, op.offset + static_cast<int64_t>(done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno;
      }
      if (n == 0) return EIO;
      done += static_cast<size_t>(n);
    }
    return 0;
  }

  int fd_;
  std::vector<BatchOp> ops_;
  int32_t* results_;
  Napi::ObjectReference buffers_ref_;
  Napi::ObjectReference results_ref_;
};

// ioBatch(fd, count, kinds: Uint8Array, offsets: Float64Array, buffers: (Buffer|null)[], results: Int32Array,
//         callback: (err: null) => void): void
Napi::Value IoBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  int64_t count = ArgInt64(info, 1, "count");
  if (info.Length() < 7 || !info[2].IsTypedArray() || !info[3].IsTypedArray() || !info[4].IsArray() ||
      !info[5].IsTypedArray() || !info[6].IsFunction()) {
    throw Napi::TypeError::New(env, "ioBatch(fd, count, kinds, offsets, buffers, results, callback)");
  }
  Napi::TypedArray kinds_any = info[2].As<Napi::TypedArray>();
  Napi::TypedArray offsets_any = info[3].As<Napi::TypedArray>();
  Napi::TypedArray results_any = info[5].As<Napi::TypedArray>();
  if (kinds_any.TypedArrayType() != napi_uint8_array || offsets_any.TypedArrayType() != napi_float64_array ||
      results_any.TypedArrayType() != napi_int32_array) {
    throw Napi::TypeError::New(env, "ioBatch: kinds Uint8Array, offsets Float64Array, results Int32Array");
  }
  Napi::Uint8Array kinds = kinds_any.As<Napi::Uint8Array>();
  Napi::Float64Array offsets = offsets_any.As<Napi::Float64Array>();
  Napi::Int32Array results = results_any.As<Napi::Int32Array>();
  Napi::Array buffers = info[4].As<Napi::Array>();
  size_t n = static_cast<size_t>(count);
  if (n == 0 || kinds.ElementLength() < n || offsets.ElementLength() < n || results.ElementLength() < n ||
      buffers.Length() < n) {
    throw Napi::RangeError::New(env, "ioBatch: count exceeds an array's length (or is 0)");
  }
  std::vector<BatchOp> ops(n);
  for (size_t i = 0; i < n; i++) {
    BatchOp& op = ops[i];
    op.kind = kinds[i];
    double offset = offsets[i];
    if (op.kind > kFlush) throw Napi::RangeError::New(env, "ioBatch: unknown operation kind");
    if (!(offset >= 0 && offset <= 9007199254740991.0)) throw Napi::RangeError::New(env, "ioBatch: bad offset");
    op.offset = static_cast<int64_t>(offset);
    op.data = nullptr;
    op.length = 0;
    if (op.kind != kFlush) {
      Napi::Value value = buffers[static_cast<uint32_t>(i)];
      if (!value.IsTypedArray()) throw Napi::TypeError::New(env, "ioBatch: operation needs a buffer");
      Napi::TypedArray view = value.As<Napi::TypedArray>();
      if (view.TypedArrayType() != napi_uint8_array) throw Napi::TypeError::New(env, "ioBatch: buffers are Uint8Array");
      Napi::Uint8Array bytes = view.As<Napi::Uint8Array>();
      op.data = reinterpret_cast<char*>(bytes.Data());
      op.length = bytes.ByteLength();
    }
    results[i] = 0;
  }
  auto* worker = new BatchWorker(info[6].As<Napi::Function>(), fd, std::move(ops), results.Data(), buffers, results);
  worker->Queue();
  return env.Undefined();
}

// ---------------------------------------------------------------------------------------------------------
// Socket buffers. Node.js sets SO_SNDBUF/SO_RCVBUF only for UDP; a stream server whose replies are larger than
// the default send buffer (212992 bytes here) otherwise needs several writev + EPOLLOUT round trips per reply.

// setSocketBufferBytes(fd, sendBytes, receiveBytes): 0 leaves that side alone. Returns [send, receive] as the
// kernel reports them afterwards (it doubles the request for its bookkeeping and caps it at wmem_max/rmem_max).
Napi::Value SetSocketBufferBytes(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int64_t sendBytes = ArgInt64(info, 1, "sendBytes");
  int64_t receiveBytes = ArgInt64(info, 2, "receiveBytes");
  if (sendBytes > INT32_MAX / 2 || receiveBytes > INT32_MAX / 2) {
    throw Napi::TypeError::New(info.Env(), "socket buffer size out of range");
  }
  const struct {
    int64_t bytes;
    int option;
    const char* name;
  } sides[2] = {{sendBytes, SO_SNDBUF, "setsockopt SO_SNDBUF"}, {receiveBytes, SO_RCVBUF, "setsockopt SO_RCVBUF"}};
  Napi::Array result = Napi::Array::New(info.Env(), 2);
  for (uint32_t i = 0; i < 2; i++) {
    if (sides[i].bytes > 0) {
      int value = static_cast<int>(sides[i].bytes);
      if (setsockopt(fd, SOL_SOCKET, sides[i].option, &value, sizeof value) != 0) {
        throw MakeErrnoError(info.Env(), errno, sides[i].name);
      }
    }
    int actual = 0;
    socklen_t actualLength = sizeof actual;
    if (getsockopt(fd, SOL_SOCKET, sides[i].option, &actual, &actualLength) != 0) {
      throw MakeErrnoError(info.Env(), errno, "getsockopt");
    }
    result.Set(i, Napi::Number::New(info.Env(), actual));
  }
  return result;
}

// ---------------------------------------------------------------------------------------------------------
// Kernel NBD client.

Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    throw MakeErrnoError(info.Env(), errno, "socketpair");
  }
  Napi::Array pair = Napi::Array::New(info.Env(), 2);
  pair.Set(0u, Napi::Number::New(info.Env(), fds[0]));
  pair.Set(1u, Napi::Number::New(info.Env(), fds[1]));
  return pair;
}

Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  if (close(fd) != 0 && errno != EINTR) throw MakeErrnoError(info.Env(), errno, "close");
  return info.Env().Undefined();
}

// renameExchange(a, b): renameat2(RENAME_EXCHANGE) swaps two existing paths atomically (a file and a directory
// too), which rename(2) cannot: dirsync replaces a file by a directory without the path ever being absent.
Napi::Value RenameExchange(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsString()) {
    throw Napi::TypeError::New(env, "renameExchange(from: string, to: string)");
  }
  std::string from = info[0].As<Napi::String>().Utf8Value();
  std::string to = info[1].As<Napi::String>().Utf8Value();
  if (renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_EXCHANGE) != 0) {
    throw MakeErrnoError(env, errno, "renameat2(RENAME_EXCHANGE)");
  }
  return env.Undefined();
}

void NbdIoctl(Napi::Env env, int fd, unsigned long request, unsigned long argument, const char* name) {
  int result;
  do {
    result = ioctl(fd, request, argument);
  } while (result != 0 && errno == EINTR);
  if (result != 0) throw MakeErrnoError(env, errno, name);
}

// nbdConfigure(nbdFd, blockSizeBytes, sizeBytes, timeoutSeconds, flags, kernelSocketFds: number[])
// The ioctl sequence nbd-client uses: clear stale sockets, sizes, timeout, one SET_SOCK per connection (the
// kernel gives each its own hardware queue), then the transmission flags.
Napi::Value NbdConfigure(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  int64_t block_size = ArgInt64(info, 1, "blockSizeBytes");
  int64_t size = ArgInt64(info, 2, "sizeBytes");
  int64_t timeout = ArgInt64(info, 3, "timeoutSeconds");
  int64_t flags = ArgInt64(info, 4, "flags");
  if (info.Length() < 6 || !info[5].IsArray()) throw Napi::TypeError::New(env, "kernelSocketFds must be an array");
  Napi::Array sockets = info[5].As<Napi::Array>();
  if (block_size < 512 || block_size > 4096 || (block_size & (block_size - 1)) != 0 || size % block_size != 0) {
    throw Napi::RangeError::New(env, "blockSizeBytes must be a power of two in 512..4096 dividing sizeBytes");
  }
  std::vector<int> socket_fds;
  for (uint32_t i = 0; i < sockets.Length(); i++) {
    Napi::Value value = sockets[i];
    if (!value.IsNumber()) throw Napi::TypeError::New(env, "kernelSocketFds must hold numbers");
    socket_fds.push_back(static_cast<int>(value.As<Napi::Number>().Int32Value()));
  }
  NbdIoctl(env, fd, NBD_CLEAR_SOCK, 0, "ioctl(NBD_CLEAR_SOCK)");
  try {
    NbdIoctl(env, fd, NBD_SET_BLKSIZE, static_cast<unsigned long>(block_size), "ioctl(NBD_SET_BLKSIZE)");
    NbdIoctl(env, fd, NBD_SET_SIZE_BLOCKS, static_cast<unsigned long>(size / block_size), "ioctl(NBD_SET_SIZE_BLOCKS)");
    NbdIoctl(env, fd, NBD_SET_TIMEOUT, static_cast<unsigned long>(timeout), "ioctl(NBD_SET_TIMEOUT)");
    for (int socket_fd : socket_fds) {
      NbdIoctl(env, fd, NBD_SET_SOCK, static_cast<unsigned long>(socket_fd), "ioctl(NBD_SET_SOCK)");
    }
    NbdIoctl(env, fd, NBD_SET_FLAGS, static_cast<unsigned long>(flags), "ioctl(NBD_SET_FLAGS)");
  } catch (const Napi::Error&) {
    // Give back the sockets the kernel already took, so the device is as free as before the call.
    ioctl(fd, NBD_CLEAR_SOCK);
    throw;
  }
  return env.Undefined();
}

// nbdDoIt(nbdFd): Promise<void>. NBD_DO_IT blocks for the life of the attachment, so it gets its own thread
// rather than a thread-pool slot the disk I/O needs. Settles after the kernel lets go (NBD_DISCONNECT, or all
// sockets dead), having cleared the queue and sockets as nbd-client does.
struct DoItResult {
  int err;
};

void DoItFinished(Napi::Env env, Napi::Function, Napi::Promise::Deferred* deferred, DoItResult* result) {
  if (env != nullptr) {
    if (result->err == 0) {
      deferred->Resolve(env.Undefined());
    } else {
      deferred->Reject(MakeErrnoError(env, result->err, "ioctl(NBD_DO_IT)").Value());
    }
  }
  delete result;
}

using DoItTsfn = Napi::TypedThreadSafeFunction<Napi::Promise::Deferred, DoItResult, DoItFinished>;

Napi::Value NbdDoIt(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  auto* deferred = new Napi::Promise::Deferred(env);
  Napi::Promise promise = deferred->Promise();
  DoItTsfn tsfn = DoItTsfn::New(
      env, "drbdts.nbdDoIt", 0, 1, deferred,
      [](Napi::Env, void*, Napi::Promise::Deferred* context) { delete context; });
  std::thread([tsfn, fd]() mutable {
    // NBD_DO_IT sleeps interruptibly, and a signal landing on this thread (SIGCHLD from a child exiting, say)
    // would make the kernel shut the sockets and drop the device. Block them all here; other threads take them.
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, nullptr);
    int result = ioctl(fd, NBD_DO_IT);
    int err = result == 0 ? 0 : errno;
    // DO_IT returns EPIPE style errors after a disconnect on some kernels; the caller decides what they mean.
    ioctl(fd, NBD_CLEAR_QUE);
    ioctl(fd, NBD_CLEAR_SOCK);
    tsfn.BlockingCall(new DoItResult{err});
    tsfn.Release();
  }).detach();
  return promise;
}

// nbdDisconnect(nbdFd): asks the kernel to send NBD_CMD_DISC and let go; NBD_DO_IT then returns.
Napi::Value NbdDisconnect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  NbdIoctl(env, fd, NBD_DISCONNECT, 0, "ioctl(NBD_DISCONNECT)");
  return env.Undefined();
}

// mallopt(M_ARENA_MAX, n): at most n malloc arenas from here on (glibc; arenas already made stay). Each thread that
// allocates otherwise gets an arena of its own, whose freed blocks stay resident: a dirsync run's thread-pool and
// V8 helper threads kept ~20 MiB that way. Returns whether glibc took it.
Napi::Value MallocArenaMax(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "arena count must be a number");
  int64_t count = info[0].As<Napi::Number>().Int64Value();
  if (count < 1 || count > 1024) throw Napi::RangeError::New(env, "arena count must be 1..1024");
  return Napi::Boolean::New(env, mallopt(M_ARENA_MAX, static_cast<int>(count)) == 1);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("punchHole", Napi::Function::New(env, PunchHole, "punchHole"));
  exports.Set("zeroRange", Napi::Function::New(env, ZeroRange, "zeroRange"));
  exports.Set("allocateRange", Napi::Function::New(env, AllocateRange, "allocateRange"));
  exports.Set("blockDiscard", Napi::Function::New(env, BlockDiscard, "blockDiscard"));
  exports.Set("blockZeroOut", Napi::Function::New(env, BlockZeroOut, "blockZeroOut"));
  exports.Set("seekData", Napi::Function::New(env, SeekData, "seekData"));
  exports.Set("seekHole", Napi::Function::New(env, SeekHole, "seekHole"));
  exports.Set("blockDeviceSizeBytes", Napi::Function::New(env, BlockDeviceSizeBytes, "blockDeviceSizeBytes"));
  exports.Set("blockDeviceLogicalBlockSizeBytes",
              Napi::Function::New(env, BlockDeviceLogicalBlockSizeBytes, "blockDeviceLogicalBlockSizeBytes"));
  exports.Set("fadviseWillNeed", Napi::Function::New(env, FadviseWillNeed, "fadviseWillNeed"));
  exports.Set("preadNowait", Napi::Function::New(env, PreadNowait, "preadNowait"));
  exports.Set("pwriteNowait", Napi::Function::New(env, PwriteNowait, "pwriteNowait"));
  exports.Set("ioBatch", Napi::Function::New(env, IoBatch, "ioBatch"));
  exports.Set("setSocketBufferBytes", Napi::Function::New(env, SetSocketBufferBytes, "setSocketBufferBytes"));
  exports.Set("socketPair", Napi::Function::New(env, SocketPair, "socketPair"));
  exports.Set("closeFd", Napi::Function::New(env, CloseFd, "closeFd"));
  exports.Set("renameExchange", Napi::Function::New(env, RenameExchange, "renameExchange"));
  exports.Set("nbdConfigure", Napi::Function::New(env, NbdConfigure, "nbdConfigure"));
  exports.Set("nbdDoIt", Napi::Function::New(env, NbdDoIt, "nbdDoIt"));
  exports.Set("nbdDisconnect", Napi::Function::New(env, NbdDisconnect, "nbdDisconnect"));
  exports.Set("mallocArenaMax", Napi::Function::New(env, MallocArenaMax, "mallocArenaMax"));
  InitDirsyncScan(env, exports);
  InitDirsyncJoin(env, exports);
  InitDirsyncHash(env, exports);
  InitNbdDataPath(env, exports);
  InitReplPlane(env, exports);
  InitDirsyncCopy(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(drbdts_native, Init)
