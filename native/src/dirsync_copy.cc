// dirsync file copies between two local roots on the libuv thread pool: a batch of full-content copies per
// thread-pool job, each exactly LocalReplica's safe write (src/dirsync/local.ts: openExpected, readFile with
// readExpected, writeFile, checkPrecondition), without a V8 isolate per copying thread. Copy workers
// (copy-worker.ts) cost ~20 MiB of RSS each and a structured clone of every operation and result; here the main
// thread hands over packed arrays and gets packed arrays back.
//
// Per operation, in order (a failure at any step removes the temp file and reports the step's error):
//   1. open the source O_NOFOLLOW; fstat; it must be the scanned file (kind, size, mtime, inode: sameStat)
//   2. create the temp file ".NAME.drbdts-tmp-PID-cN" O_EXCL in the target's directory (mode 0600)
//   3. read (a file under 1 MiB: its size plus one probe byte; else 1 MiB chunks to the end), hashing what was
//      read; write each chunk, hashing what was written
//   4. fstat the source again: still the scanned file; the two fingerprints equal; as many bytes as scanned
//   5. fchmod, futimens (only with an mtime to set), fsync (only when asked), close
//   6. lstat the target: still absent, or still the file the scan saw (the precondition); rename over it
//   7. lstat the installed file: the stat the archive records
// A process killed at any point leaves at most a temp file, whose name carries the pid: the next scan removes it
// (LocalReplica.removeStaleTemp).
//
// dirsyncCopyFiles(sourceRoot, targetRoot, paths, pathEnds, numbers, fsync) -> Promise<[results, fingerprints,
// messages]>:
//   paths      Buffer, the relative paths (UTF-8) back to back; pathEnds Uint32Array, the end of each
//   numbers    Float64Array, kCopyInFields per operation: source size, mtimeMs, inode; precondition kind (0 absent,
//              1 file), its size, mtimeMs, inode; mode to set; mtimeMs to set (NaN: leave the new file's)
//   results    Float64Array, kCopyOutFields per operation: status (0 done; 1 EGONE, 2 ECHANGED, 3 EHASH,
//              4 EACCES, 5 EIO), then the installed file's kind (0 file, 1 dir, 2 symlink), size, mtimeMs,
//              ctimeMs, inode, mode
//   fingerprints  Buffer of 16 hex digits per operation (the written content's xxh64; zeros when it failed)
//   messages   Array of strings: '' for a done operation, else the error message LocalReplica would give
// The inputs are copied into C++ memory before the job is queued: no JavaScript memory is read off the main thread.

#include <napi.h>
#include <uv.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "dirsync_hash.h"

namespace {

constexpr int kCopyInFields = 9;
constexpr int kCopyOutFields = 7;
constexpr size_t kChunkBytes = 1 << 20;
/** Temp names keep the file's own name to at most this many bytes (NAME_MAX is 255), as tempPathFor does. */
constexpr size_t kTempBaseBytes = 180;

enum Status { kDone = 0, kGone = 1, kChanged = 2, kHash = 3, kAccess = 4, kIo = 5 };

std::atomic<uint64_t> tempCounter{0};

double MsFromTimespec(const struct timespec& ts) {
  return static_cast<double>(ts.tv_sec) * 1000 + static_cast<double>(ts.tv_nsec) / 1000000;
}

// statToEntry's kind: directory, symbolic link, anything else a file.
int KindOf(const struct stat& st) { return S_ISDIR(st.st_mode) ? 1 : S_ISLNK(st.st_mode) ? 2 : 0; }

// sameStat against a scanned file: kind file, same size, mtime and inode.
bool SameFile(const struct stat& st, double sizeBytes, double mtimeMs, double inode) {
  return KindOf(st) == 0 && static_cast<double>(st.st_size) == sizeBytes && MsFromTimespec(st.st_mtim) == mtimeMs &&
         static_cast<double>(st.st_ino) == inode;
}

// toReplicaError's mapping of an errno.
Status StatusOf(int err) {
  if (err == ENOENT || err == ENOTDIR) return kGone;
  if (err == EACCES || err == EPERM) return kAccess;
  return kIo;
}

// Node's message for a failed fs call: "CODE: description, syscall 'path'".
std::string ErrnoMessage(int err, const char* syscall, const std::string& path) {
  return std::string(uv_err_name(-err)) + ": " + uv_strerror(-err) + ", " + syscall + " '" + path + "'";
}

std::string Hex16(uint64_t digest) {
  static const char kDigits[] = "0123456789abcdef";
  char hex[16];
  for (int k = 15; k >= 0; k--, digest >>= 4) hex[k] = kDigits[digest & 15];
  return std::string(hex, 16);
}

// Cut a file name to `limit` bytes without leaving a partial UTF-8 character at its end.
std::string Truncated(const std::string& name, size_t limit) {
  if (name.size() <= limit) return name;
  size_t end = limit;
  // Step back over continuation bytes to the start of the character the cut falls in; keep it only if whole.
  size_t start = end;
  while (start > 0 && (static_cast<unsigned char>(name[start - 1]) & 0xC0) == 0x80) start--;
  if (start > 0) {
    unsigned char lead = static_cast<unsigned char>(name[start - 1]);
    size_t length = lead < 0x80 ? 1 : lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    if (start - 1 + length > end) end = start - 1;
  }
  return name.substr(0, end);
}

struct Failure {
  Status status;
  std::string message;
};

class CopyWorker : public Napi::AsyncWorker {
 public:
  CopyWorker(Napi::Env env, std::string sourceRoot, std::string targetRoot, std::vector<std::string> paths,
             std::vector<double> numbers, bool fsync)
      : Napi::AsyncWorker(env, "drbdts.dirsyncCopy"),
        deferred_(Napi::Promise::Deferred::New(env)),
        sourceRoot_(std::move(sourceRoot)),
        targetRoot_(std::move(targetRoot)),
        paths_(std::move(paths)),
        in_(std::move(numbers)),
        fsync_(fsync),
        out_(paths_.size() * kCopyOutFields, 0),
        fingerprints_(paths_.size() * 16, '0'),
        messages_(paths_.size()) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    // Not zero-filled: only the pages a copy touches become resident (a batch of small files touches one or two
    // of its 1 MiB, and a freed block stays in this pool thread's malloc arena).
    buffer_.reset(new char[kChunkBytes]);
    for (size_t index = 0; index < paths_.size(); index++) {
      Failure failure{kDone, std::string()};
      CopyOne(index, &failure);
      if (failure.status != kDone) {
        out_[index * kCopyOutFields] = failure.status;
        messages_[index] = std::move(failure.message);
      }
    }
    buffer_.reset();
  }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::ArrayBuffer storage = Napi::ArrayBuffer::New(env, out_.size() * sizeof(double));
    if (!out_.empty()) memcpy(storage.Data(), out_.data(), out_.size() * sizeof(double));
    Napi::Array messages = Napi::Array::New(env, messages_.size());
    for (size_t index = 0; index < messages_.size(); index++) messages.Set(index, Napi::String::New(env, messages_[index]));
    Napi::Array result = Napi::Array::New(env, 3);
    result.Set(0u, Napi::Float64Array::New(env, out_.size(), storage, 0));
    result.Set(1u, Napi::Buffer<char>::Copy(env, fingerprints_.data(), fingerprints_.size()));
    result.Set(2u, messages);
    deferred_.Resolve(result);
  }

  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  // pread until `length` bytes or end of file; -1 with errno on failure.
  ssize_t ReadAt(int fd, char* into, size_t length, off_t position) {
    size_t total = 0;
    while (total < length) {
      ssize_t count = pread(fd, into + total, length - total, position + static_cast<off_t>(total));
      if (count < 0) {
        if (errno == EINTR) continue;
        return -1;
      }
      if (count == 0) break;
      total += static_cast<size_t>(count);
    }
    return static_cast<ssize_t>(total);
  }

  // readExpected: at most sizeBytes + 1 bytes, stopping as soon as sizeBytes are in (no second call for the end).
  ssize_t ReadExpected(int fd, char* into, size_t sizeBytes) {
    size_t total = 0;
    while (total < sizeBytes + 1) {
      ssize_t count = pread(fd, into + total, sizeBytes + 1 - total, static_cast<off_t>(total));
      if (count < 0) {
        if (errno == EINTR) continue;
        return -1;
      }
      if (count == 0) break;
      total += static_cast<size_t>(count);
      if (total == sizeBytes) break;
    }
    return static_cast<ssize_t>(total);
  }

  bool WriteAll(int fd, const char* from, size_t length, off_t position) {
    size_t done = 0;
    while (done < length) {
      ssize_t count = pwrite(fd, from + done, length - done, position + static_cast<off_t>(done));
      if (count < 0) {
        if (errno == EINTR) continue;
        return false;
      }
      done += static_cast<size_t>(count);
    }
    return true;
  }

  void CopyOne(size_t index, Failure* failure) {
    const std::string& path = paths_[index];
    const double* in = &in_[index * kCopyInFields];
    const double sourceSize = in[0], sourceMtime = in[1], sourceInode = in[2];
    const bool expectAbsent = in[3] == 0;
    const int mode = static_cast<int>(in[7]) & 0777;
    const double mtimeToSet = in[8];
    const std::string source = sourceRoot_ + "/" + path;
    const std::string target = targetRoot_ + "/" + path;
    auto fail = [&](Status status, std::string message) {
      failure->status = status;
      failure->message = std::move(message);
    };

    // 1. The source, as scanned (openExpected).
    int sourceFd = open(source.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (sourceFd < 0) {
      int err = errno;
      if (err == ENOENT || err == ELOOP || err == ENOTDIR) return fail(kGone, path + " is no longer a file");
      return fail(StatusOf(err), "open " + path + ": " + ErrnoMessage(err, "open", source));
    }
    struct stat st;
    if (fstat(sourceFd, &st) != 0) {
      int err = errno;
      close(sourceFd);
      return fail(StatusOf(err), "open " + path + ": " + ErrnoMessage(err, "fstat", source));
    }
    if (!SameFile(st, sourceSize, sourceMtime, sourceInode)) {
      close(sourceFd);
      return fail(kChanged, path + " changed since the scan");
    }

    // 2. The temp file beside the target.
    size_t slash = target.rfind('/');
    std::string temp = target.substr(0, slash + 1) + "." + Truncated(target.substr(slash + 1), kTempBaseBytes) +
                       ".drbdts-tmp-" + std::to_string(getpid()) + "-c" + std::to_string(++tempCounter);
    int tempFd = open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (tempFd < 0) {
      int err = errno;
      close(sourceFd);
      if (err == ENOENT || err == ENOTDIR) return fail(kGone, "parent directory of " + path + " is missing");
      return fail(StatusOf(err), "write " + path + ": " + ErrnoMessage(err, "open", temp));
    }
    bool installed = false;
    auto cleanup = [&]() {
      if (sourceFd >= 0) close(sourceFd);
      if (tempFd >= 0) close(tempFd);
      if (!installed) unlink(temp.c_str());
    };

    // 3. Read, hash, write, hash.
    alignas(8) unsigned char readState[kDirsyncH64StateBytes];
    alignas(8) unsigned char writeState[kDirsyncH64StateBytes];
    DirsyncH64Init(readState);
    DirsyncH64Init(writeState);
    char* buffer = buffer_.get();
    size_t written = 0;
    if (sourceSize < kChunkBytes) {
      ssize_t length = ReadExpected(sourceFd, buffer, static_cast<size_t>(sourceSize));
      if (length < 0) {
        int err = errno;
        cleanup();
        return fail(StatusOf(err), "read " + path + ": " + ErrnoMessage(err, "read", source));
      }
      DirsyncH64Update(readState, reinterpret_cast<unsigned char*>(buffer), static_cast<size_t>(length));
      if (!WriteAll(tempFd, buffer, static_cast<size_t>(length), 0)) {
        int err = errno;
        cleanup();
        return fail(StatusOf(err), "write " + path + ": " + ErrnoMessage(err, "write", temp));
      }
      DirsyncH64Update(writeState, reinterpret_cast<unsigned char*>(buffer), static_cast<size_t>(length));
      written = static_cast<size_t>(length);
    } else {
      for (;;) {
        ssize_t length = ReadAt(sourceFd, buffer, kChunkBytes, static_cast<off_t>(written));
        if (length < 0) {
          int err = errno;
          cleanup();
          return fail(StatusOf(err), "read " + path + ": " + ErrnoMessage(err, "read", source));
        }
        if (length == 0) break;
        DirsyncH64Update(readState, reinterpret_cast<unsigned char*>(buffer), static_cast<size_t>(length));
        if (!WriteAll(tempFd, buffer, static_cast<size_t>(length), static_cast<off_t>(written))) {
          int err = errno;
          cleanup();
          return fail(StatusOf(err), "write " + path + ": " + ErrnoMessage(err, "write", temp));
        }
        DirsyncH64Update(writeState, reinterpret_cast<unsigned char*>(buffer), static_cast<size_t>(length));
        written += static_cast<size_t>(length);
      }
    }

    // 4. The source did not change while it was read; what was written is what was read.
    struct stat after;
    if (fstat(sourceFd, &after) != 0) {
      int err = errno;
      cleanup();
      return fail(StatusOf(err), "read " + path + ": " + ErrnoMessage(err, "fstat", source));
    }
    close(sourceFd);
    sourceFd = -1;
    std::string sourceFingerprint = Hex16(DirsyncH64Digest(readState));
    std::string fingerprint = Hex16(DirsyncH64Digest(writeState));
    if (!SameFile(after, sourceSize, sourceMtime, sourceInode)) {
      cleanup();
      return fail(kChanged, path + " changed on the source side during the transfer");
    }
    if (static_cast<double>(written) != sourceSize || fingerprint != sourceFingerprint) {
      cleanup();
      char sizes[96];
      snprintf(sizes, sizeof sizes, " bytes with fingerprint %s, expected %.0f bytes with ", fingerprint.c_str(), sourceSize);
      return fail(kHash, path + ": received " + std::to_string(written) + sizes + sourceFingerprint);
    }

    // 5. Permissions, times, durability.
    if (fchmod(tempFd, mode) != 0) {
      int err = errno;
      cleanup();
      return fail(StatusOf(err), "write " + path + ": " + ErrnoMessage(err, "fchmod", temp));
    }
    if (!isnan(mtimeToSet)) {
      // As futimesSync(fd, new Date(), new Date(mtimeMs)): a Date holds whole milliseconds.
      double wholeMs = trunc(mtimeToSet);
      struct timespec times[2];
      times[0].tv_sec = 0;
      times[0].tv_nsec = UTIME_NOW;
      double seconds = floor(wholeMs / 1000);
      times[1].tv_sec = static_cast<time_t>(seconds);
      times[1].tv_nsec = static_cast<long>((wholeMs - seconds * 1000) * 1000000);
      if (futimens(tempFd, times) != 0) {
        int err = errno;
        cleanup();
        return fail(StatusOf(err), "write " + path + ": " + ErrnoMessage(err, "futime", temp));
      }
    }
    if (fsync_ && fsync(tempFd) != 0) {
      int err = errno;
      cleanup();
      return fail(StatusOf(err), "write " + path + ": " + ErrnoMessage(err, "fsync", temp));
    }
    int closed = close(tempFd);
    tempFd = -1;
    if (closed != 0) {
      int err = errno;
      cleanup();
      return fail(StatusOf(err), "write " + path + ": " + ErrnoMessage(err, "close", temp));
    }

    // 6. The target is still what the scan saw (checkPrecondition), then the rename.
    struct stat current;
    if (lstat(target.c_str(), &current) != 0) {
      int err = errno;
      if (err != ENOENT) {
        cleanup();
        return fail(StatusOf(err), "write " + path + ": " + ErrnoMessage(err, "lstat", target));
      }
      if (!expectAbsent) {
        cleanup();
        return fail(kChanged, path + " changed since the scan");
      }
    } else if (expectAbsent) {
      cleanup();
      return fail(kChanged, path + " appeared since the scan");
    } else if (!SameFile(current, in[4], in[5], in[6])) {
      cleanup();
      return fail(kChanged, path + " changed since the scan");
    }
    if (rename(temp.c_str(), target.c_str()) != 0) {
      int err = errno;
      cleanup();
      return fail(StatusOf(err), "write " + path + ": " + ErrnoMessage(err, "rename", temp));
    }
    installed = true;

    // 7. The installed file's stat, for the archive.
    struct stat final;
    if (lstat(target.c_str(), &final) != 0) {
      int err = errno;
      return fail(StatusOf(err), "write " + path + ": " + ErrnoMessage(err, "lstat", target));
    }
    double* out = &out_[index * kCopyOutFields];
    int kind = KindOf(final);
    out[0] = kDone;
    out[1] = kind;
    out[2] = kind == 0 ? static_cast<double>(final.st_size) : 0;
    out[3] = MsFromTimespec(final.st_mtim);
    out[4] = MsFromTimespec(final.st_ctim);
    out[5] = static_cast<double>(final.st_ino);
    out[6] = final.st_mode & 0777;
    memcpy(&fingerprints_[index * 16], fingerprint.data(), 16);
  }

  Napi::Promise::Deferred deferred_;
  std::string sourceRoot_;
  std::string targetRoot_;
  std::vector<std::string> paths_;
  std::vector<double> in_;
  bool fsync_;
  std::vector<double> out_;
  std::string fingerprints_;
  std::vector<std::string> messages_;
  std::unique_ptr<char[]> buffer_;
};

std::string AbsoluteRootArg(const Napi::CallbackInfo& info, size_t index) {
  if (info.Length() <= index || !info[index].IsString()) throw Napi::TypeError::New(info.Env(), "dirsyncCopyFiles: roots must be strings");
  std::string root = info[index].As<Napi::String>().Utf8Value();
  if (root.empty() || root[0] != '/' || root.find('\0') != std::string::npos) {
    throw Napi::TypeError::New(info.Env(), "dirsyncCopyFiles: roots must be absolute paths");
  }
  return root;
}

Napi::Value CopyFiles(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string sourceRoot = AbsoluteRootArg(info, 0);
  std::string targetRoot = AbsoluteRootArg(info, 1);
  if (info.Length() < 6 || !info[2].IsBuffer() || !info[3].IsTypedArray() || !info[4].IsTypedArray() || !info[5].IsBoolean() ||
      info[3].As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array ||
      info[4].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    throw Napi::TypeError::New(env, "dirsyncCopyFiles(sourceRoot, targetRoot, paths: Buffer, pathEnds: Uint32Array, numbers: Float64Array, fsync: boolean)");
  }
  Napi::Buffer<char> pathBytes = info[2].As<Napi::Buffer<char>>();
  Napi::Uint32Array pathEnds = info[3].As<Napi::Uint32Array>();
  Napi::Float64Array numbers = info[4].As<Napi::Float64Array>();
  size_t count = pathEnds.ElementLength();
  if (numbers.ElementLength() != count * kCopyInFields) throw Napi::TypeError::New(env, "dirsyncCopyFiles: numbers must hold 9 per path");
  std::vector<std::string> paths;
  paths.reserve(count);
  size_t start = 0;
  for (size_t index = 0; index < count; index++) {
    size_t end = pathEnds[index];
    if (end < start || end > pathBytes.Length()) throw Napi::TypeError::New(env, "dirsyncCopyFiles: path ends out of order");
    std::string path(pathBytes.Data() + start, end - start);
    // The same rule as assertRelativePath: relative, no empty, '.' or '..' component, no NUL.
    bool bad = path.empty() || path[0] == '/' || path.find('\0') != std::string::npos;
    for (size_t from = 0; !bad && from <= path.size();) {
      size_t to = path.find('/', from);
      if (to == std::string::npos) to = path.size();
      std::string component = path.substr(from, to - from);
      bad = component.empty() || component == "." || component == "..";
      from = to + 1;
    }
    if (bad) throw Napi::TypeError::New(env, "dirsyncCopyFiles: not a relative path: " + path);
    paths.push_back(std::move(path));
    start = end;
  }
  std::vector<double> in(numbers.Data(), numbers.Data() + numbers.ElementLength());
  CopyWorker* worker = new CopyWorker(env, std::move(sourceRoot), std::move(targetRoot), std::move(paths), std::move(in),
                                      info[5].As<Napi::Boolean>().Value());
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

}  // namespace

// Called from the module's Init (drbdts_native.cc).
void InitDirsyncCopy(Napi::Env env, Napi::Object exports) {
  exports.Set("dirsyncCopyFiles", Napi::Function::New(env, CopyFiles, "dirsyncCopyFiles"));
}
