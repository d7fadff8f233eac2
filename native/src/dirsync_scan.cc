// dirsync bulk tree scan: readdir + fstatat (+ readlink) of a whole replica tree on a libuv thread-pool thread,
// results packed into two buffers instead of one fs.Stats object (and one JS-to-C++ hop) per path. Two replicas
// are scanned concurrently, and the main thread meanwhile loads the archive.
//
// The walk is exactly LocalReplica.scan's (src/dirsync/local.ts): pop a directory, list it, sort the names in
// JavaScript's default order (UTF-16 code units), emit every entry, push the subdirectories so that they are
// listed in name order; a parent comes before its children. Ignore patterns are JavaScript regular expressions:
// with patterns the JavaScript walk is used instead (src/native/scan.ts decides).
//
// Result: [strings: Buffer, records: Float64Array], RECORD_FIELDS doubles per record:
//   0 kind   (0 file, 1 dir, 2 symlink; problems: 3 directory not listable, 4 lstat failed, 5 name not valid UTF-8,
//             6 readlink failed; 7 a temp name, handed to JavaScript for stale-temp removal)
//   1 parent (record index of the parent directory, -1 for the root; for kind 3 the directory itself, -1 = root)
//   2 end of the path in strings (it starts where the previous record's text ended): the path relative to the
//     root, '/'-separated, so JavaScript decodes one flat string per entry (no concatenation, no flattening when
//     it becomes a Map key); for kind 3 the directory's own path ("" = the root)
//   3 end of the text in strings (symlink target, or the problem's message; empty otherwise)
//   4 mode & 0777   5 size (files)   6 mtimeMs   7 ctimeMs   8 inode
// Times are computed as Node computes fs.Stats' mtimeMs (sec * 1e3 + nsec / 1e6 in doubles), so a scanned stat
// compares equal to a later fs.lstatSync of the same unchanged path (the precondition re-check relies on it).

#include <napi.h>
#include <uv.h>

#include <dirent.h>
#include <malloc.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

namespace {

constexpr int kRecordFields = 9;
constexpr const char* kTempMarker = ".drbdts-tmp-";

enum Kind { kFile = 0, kDir = 1, kSymlink = 2, kUnlistable = 3, kStatFailed = 4, kBadName = 5, kLinkFailed = 6, kTemp = 7 };

// JavaScript's default sort compares UTF-16 code units; byte order of UTF-8 is code point order. The two differ
// only between U+E000..U+FFFF (lead bytes 0xEE, 0xEF) and supplementary characters (lead bytes 0xF0..0xF4,
// surrogates in UTF-16, which sort below 0xE000). The first differing byte of two valid UTF-8 strings is either
// a pair of lead bytes or a pair of continuation bytes under the same lead, so remapping 0xEE/0xEF above 0xF4
// gives UTF-16 order.
inline unsigned SortKey(unsigned char byte) { return byte == 0xEE || byte == 0xEF ? byte + 0x10 : byte; }

bool Utf16Less(const std::string& a, const std::string& b) {
  size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; i++) {
    unsigned char x = static_cast<unsigned char>(a[i]);
    unsigned char y = static_cast<unsigned char>(b[i]);
    if (x != y) return SortKey(x) < SortKey(y);
  }
  return a.size() < b.size();
}

// Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF): what V8 decodes without U+FFFD.
bool ValidUtf8(const std::string& s) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    unsigned char c = p[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (size_t k = 1; k < len; k++) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += len;
  }
  return true;
}

// "CODE: description, syscall 'path'": the message Node's fs gives for the same failure.
std::string ErrnoMessage(int err, const char* syscall, const std::string& path) {
  return std::string(uv_err_name(-err)) + ": " + uv_strerror(-err) + ", " + syscall + " '" + path + "'";
}

double MsFromTimespec(const struct timespec& ts) {
  return static_cast<double>(ts.tv_sec) * 1000 + static_cast<double>(ts.tv_nsec) / 1000000;
}

class ScanWorker : public Napi::AsyncWorker {
 public:
  ScanWorker(Napi::Env env, std::string root)
      : Napi::AsyncWorker(env, "drbdts.dirsyncScan"), deferred_(Napi::Promise::Deferred::New(env)), root_(std::move(root)) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    // Stack of directories to list: record index (the root is -1) and path relative to the root ("" for it).
    std::vector<std::pair<double, std::string>> stack;
    stack.emplace_back(-1, std::string());
    std::vector<std::string> names;
    std::string path;
    while (!stack.empty()) {
      double dirIndex = stack.back().first;
      std::string relDir = std::move(stack.back().second);
      stack.pop_back();
      std::string absDir = relDir.empty() ? root_ : root_ + "/" + relDir;
      int dirFd = open(absDir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      DIR* dir = dirFd == -1 ? nullptr : fdopendir(dirFd);
      if (dir == nullptr) {
        int err = errno;
        if (dirFd != -1) close(dirFd);
        Add(kUnlistable, dirIndex, relDir, ErrnoMessage(err, "scandir", absDir), nullptr);
        continue;
      }
      names.clear();
      bool failed = false;
      for (;;) {
        errno = 0;
        struct dirent* entry = readdir(dir);
        if (entry == nullptr) {
          failed = errno != 0;
          break;
        }
        const char* name = entry->d_name;
        if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'))) continue;
        names.emplace_back(name);
      }
      if (failed) {
        int err = errno;
        closedir(dir);
        Add(kUnlistable, dirIndex, relDir, ErrnoMessage(err, "scandir", absDir), nullptr);
        continue;
      }
      std::sort(names.begin(), names.end(), Utf16Less);
      size_t firstChild = stack.size();
      for (const std::string& name : names) {
        path.assign(relDir);
        if (!relDir.empty()) path.push_back('/');
        path.append(name);
        if (name.find(kTempMarker) != std::string::npos) {
          Add(kTemp, dirIndex, path, "", nullptr);
          continue;
        }
        if (!ValidUtf8(name)) {
          Add(kBadName, dirIndex, path, "file name is not valid UTF-8; not synced", nullptr);
          continue;
        }
        struct stat st;
        if (fstatat(dirFd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
          int err = errno;
          if (err == ENOENT) continue;  // vanished since readdir: as if never there
          Add(kStatFailed, dirIndex, path, ErrnoMessage(err, "lstat", absDir + "/" + name), nullptr);
          continue;
        }
        Kind kind;
        std::string text;
        if (S_ISREG(st.st_mode)) {
          kind = kFile;
        } else if (S_ISDIR(st.st_mode)) {
          kind = kDir;
        } else if (S_ISLNK(st.st_mode)) {
          kind = kSymlink;
          size_t capacity = st.st_size > 0 ? static_cast<size_t>(st.st_size) + 1 : 256;
          for (;;) {
            text.resize(capacity);
            ssize_t length = readlinkat(dirFd, name.c_str(), &text[0], capacity);
            if (length < 0) {
              kind = kLinkFailed;
              text = ErrnoMessage(errno, "readlink", absDir + "/" + name);
              break;
            }
            if (static_cast<size_t>(length) < capacity) {
              text.resize(length);
              break;
            }
            capacity *= 2;
          }
        } else {
          continue;  // sockets, fifos, devices are not synced (as unison)
        }
        double index = Add(kind, dirIndex, path, text, kind == kLinkFailed ? nullptr : &st);
        if (kind == kDir) stack.emplace_back(index, path);
      }
      closedir(dir);
      std::reverse(stack.begin() + firstChild, stack.end());
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    // The scan's memory becomes the JavaScript buffers' as it is, not a copy: a copy doubled a big scan's footprint
    // (10 MB per 100,000 entries), and what this thread had allocated stayed in its malloc arena after the free.
    size_t recordCount = records_.size();
    auto* strings = new std::string(std::move(strings_));
    auto* records = new std::vector<double>(std::move(records_));
    Napi::Buffer<char> stringsBuffer =
        strings->empty() ? Napi::Buffer<char>::New(env, 0)
                         : Napi::Buffer<char>::New(env, strings->data(), strings->size(),
                                                   [](Napi::Env, char*, std::string* owned) { delete owned; }, strings);
    if (strings->empty()) delete strings;
    Napi::ArrayBuffer storage =
        records->empty() ? Napi::ArrayBuffer::New(env, 0)
                         : Napi::ArrayBuffer::New(env, records->data(), recordCount * sizeof(double),
                                                  [](Napi::Env, void*, std::vector<double>* owned) { delete owned; }, records);
    if (records->empty()) delete records;
    // The growth of those buffers (each doubling freed the previous block) left free chunks in this worker
    // thread's arena; give them back now rather than carry them to the end of the run.
    malloc_trim(0);
    Napi::Array result = Napi::Array::New(env, 2);
    result.Set(0u, stringsBuffer);
    result.Set(1u, Napi::Float64Array::New(env, recordCount, storage, 0));
    deferred_.Resolve(result);
  }

  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  double Add(Kind kind, double parent, const std::string& name, const std::string& text, const struct stat* st) {
    double index = static_cast<double>(records_.size() / kRecordFields);
    strings_.append(name);
    double nameEnd = static_cast<double>(strings_.size());
    strings_.append(text);
    double textEnd = static_cast<double>(strings_.size());
    records_.push_back(kind);
    records_.push_back(parent);
    records_.push_back(nameEnd);
    records_.push_back(textEnd);
    if (st != nullptr) {
      records_.push_back(st->st_mode & 0777);
      records_.push_back(kind == kFile ? static_cast<double>(st->st_size) : 0);
      records_.push_back(MsFromTimespec(st->st_mtim));
      records_.push_back(MsFromTimespec(st->st_ctim));
      records_.push_back(static_cast<double>(st->st_ino));
    } else {
      for (int k = 4; k < kRecordFields; k++) records_.push_back(0);
    }
    return index;
  }

  Napi::Promise::Deferred deferred_;
  std::string root_;
  std::string strings_;
  std::vector<double> records_;
};

Napi::Value ScanTree(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(env, "root must be a string");
  std::string root = info[0].As<Napi::String>().Utf8Value();
  if (root.empty() || root[0] != '/' || root.find('\0') != std::string::npos) {
    throw Napi::TypeError::New(env, "root must be an absolute path");
  }
  ScanWorker* worker = new ScanWorker(env, std::move(root));
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

}  // namespace

// Called from the module's Init (drbdts_native.cc).
void InitDirsyncScan(Napi::Env env, Napi::Object exports) {
  exports.Set("dirsyncScanTree", Napi::Function::New(env, ScanTree, "dirsyncScanTree"));
}
