// dirsync join: the merge of two packed scans (dirsync_scan.cc) with the archive's packed table
// (src/dirsync/archive.ts, ArchiveTable), done on bytes. It finds the paths that are *clean* (identical to their
// archive entry on both sides, under no path that differs) without making a JavaScript string or object for
// them; JavaScript then builds states only for the paths reported here. It is the same algorithm as
// SyncEngine.joinPackedMap (src/dirsync/engine.ts), which runs when this function is not available, and
// test/dirsync-packed.test.ts checks that both give the same plans, trees and archives.
//
// dirsyncJoin(strings1, records1, strings2, records2,
//             archiveStrings, archiveStarts, archiveLengths, archiveNumbers, archiveKinds, swapped, allowClean)
//   strings/records: the two packed scans (SCAN_RECORD_FIELDS doubles per record)
//   archiveStarts: Uint32Array (count + 1), offset of each entry's strings in archiveStrings (and the end)
//   archiveLengths: Uint32Array (3 per entry), byte lengths of path, fingerprint, link target
//   archiveNumbers: Float64Array (8 per entry), size, mode, then the stamps of the file's side 1 and side 2
//   archiveKinds: Uint8Array, 'f' 'd' 'l'
//   swapped: the archive's side 1 is this run's root 2
// Returns [triples, flags]: an Int32Array of triples (record index on side 1 or -1, record index on side 2 or -1,
// archive index or -1), one per path that is not clean, in merge order, and a Uint8Array with one flag per
// archive entry: 0 no scanned path has it, 1 clean, 2 a reported path has it. Or null when a scan is not in the
// expected order (the caller falls back to a state per path), or a number: the index of an archive entry whose
// path occurs twice (a corrupt archive).
// The inputs must not be typed arrays small enough for V8 to keep on its heap (their data may move): the
// archive's arrays are views of the file's buffer or built over an explicit ArrayBuffer (archive.ts), the scans'
// come from dirsync_scan.cc; the outputs are made here.

#include <napi.h>

#include <stdint.h>
#include <string.h>

#include <cmath>

#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace {

constexpr int kRecordFields = 9;
constexpr double kScanFile = 0;
constexpr double kScanDir = 1;
constexpr double kScanSymlink = 2;

inline unsigned SortKey(unsigned char byte) { return byte == 0xEE || byte == 0xEF ? byte + 0x10 : byte; }

// comparePaths of engine.ts on UTF-8 bytes: a directory's entries (name order in UTF-16 code units, which the
// SortKey remap gives for valid UTF-8), then the subtrees of its subdirectories.
int ComparePaths(std::string_view x, std::string_view y) {
  size_t n = x.size() < y.size() ? x.size() : y.size();
  size_t i = 0;
  while (i < n && x[i] == y[i]) i++;
  if (i == x.size() && i == y.size()) return 0;
  size_t start = 0;
  if (i > 0) {
    size_t slash = x.rfind('/', i - 1);
    start = slash == std::string_view::npos ? 0 : slash + 1;
  }
  size_t endX = x.find('/', start);
  size_t endY = y.find('/', start);
  bool lastX = endX == std::string_view::npos;
  bool lastY = endY == std::string_view::npos;
  if (lastX != lastY) return lastX ? -1 : 1;
  if (i >= (lastX ? x.size() : endX)) return -1;
  if (i >= (lastY ? y.size() : endY)) return 1;
  return static_cast<int>(SortKey(static_cast<unsigned char>(x[i]))) - static_cast<int>(SortKey(static_cast<unsigned char>(y[i])));
}

struct Scan {
  const char* strings;
  size_t stringsLength;
  const double* records;
  size_t count;  // records
};

// Cursor over the entry records (file, dir, symlink) of one scan.
struct Cursor {
  explicit Cursor(const Scan* s) : scan(s) {}
  const Scan* scan;
  size_t index = 0;  // record index of the current entry; == count at the end
  std::string_view path;
  bool valid = false;

  size_t PathStart(size_t record) const {
    return record == 0 ? 0 : static_cast<size_t>(scan->records[(record - 1) * kRecordFields + 3]);
  }
  const double* Record() const { return scan->records + index * kRecordFields; }
  std::string_view Text() const {
    const double* r = Record();
    size_t pathEnd = static_cast<size_t>(r[2]);
    size_t textEnd = static_cast<size_t>(r[3]);
    return std::string_view(scan->strings + pathEnd, textEnd - pathEnd);
  }
  // Advance to the next entry record (from `from`). Returns false when the scan is out of order.
  bool Seek(size_t from) {
    std::string_view previous = valid ? path : std::string_view();
    bool hadPrevious = valid;
    valid = false;
    for (index = from; index < scan->count; index++) {
      const double* r = Record();
      if (r[0] > kScanSymlink) continue;
      size_t start = PathStart(index);
      path = std::string_view(scan->strings + start, static_cast<size_t>(r[2]) - start);
      valid = true;
      if (hadPrevious && ComparePaths(previous, path) >= 0) return false;
      return true;
    }
    return true;
  }
};

bool CheckScan(const Napi::Buffer<char>& strings, const Napi::Float64Array& records, Scan* scan) {
  if (records.ElementLength() % kRecordFields != 0) return false;
  scan->strings = strings.Data();
  scan->stringsLength = strings.Length();
  scan->records = records.Data();
  scan->count = records.ElementLength() / kRecordFields;
  double previous = 0;
  for (size_t k = 0; k < scan->count; k++) {
    double pathEnd = scan->records[k * kRecordFields + 2];
    double textEnd = scan->records[k * kRecordFields + 3];
    if (!(previous <= pathEnd && pathEnd <= textEnd && textEnd <= static_cast<double>(scan->stringsLength))) return false;
    previous = textEnd;
  }
  return true;
}

unsigned char KindLetter(double scanKind) {
  return scanKind == kScanFile ? 'f' : scanKind == kScanDir ? 'd' : 'l';
}

Napi::Value Join(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 11 || !info[0].IsBuffer() || !info[1].IsTypedArray() || !info[2].IsBuffer() || !info[3].IsTypedArray() ||
      !info[4].IsBuffer() || !info[5].IsTypedArray() || !info[6].IsTypedArray() || !info[7].IsTypedArray() ||
      !info[8].IsTypedArray()) {
    throw Napi::TypeError::New(env, "dirsyncJoin: bad arguments");
  }
  Napi::TypedArray t1 = info[1].As<Napi::TypedArray>();
  Napi::TypedArray t3 = info[3].As<Napi::TypedArray>();
  Napi::TypedArray t5 = info[5].As<Napi::TypedArray>();
  Napi::TypedArray t6 = info[6].As<Napi::TypedArray>();
  Napi::TypedArray t7 = info[7].As<Napi::TypedArray>();
  Napi::TypedArray t8 = info[8].As<Napi::TypedArray>();
  if (t1.TypedArrayType() != napi_float64_array || t3.TypedArrayType() != napi_float64_array ||
      t5.TypedArrayType() != napi_uint32_array || t6.TypedArrayType() != napi_uint32_array ||
      t7.TypedArrayType() != napi_float64_array || t8.TypedArrayType() != napi_uint8_array) {
    throw Napi::TypeError::New(env, "dirsyncJoin: bad array types");
  }
  Scan scan1, scan2;
  if (!CheckScan(info[0].As<Napi::Buffer<char>>(), t1.As<Napi::Float64Array>(), &scan1) ||
      !CheckScan(info[2].As<Napi::Buffer<char>>(), t3.As<Napi::Float64Array>(), &scan2)) {
    throw Napi::TypeError::New(env, "dirsyncJoin: malformed scan");
  }
  Napi::Buffer<char> archiveStrings = info[4].As<Napi::Buffer<char>>();
  const uint32_t* starts = t5.As<Napi::Uint32Array>().Data();
  const uint32_t* lengths = t6.As<Napi::Uint32Array>().Data();
  const double* numbers = t7.As<Napi::Float64Array>().Data();
  const uint8_t* kinds = t8.As<Napi::Uint8Array>().Data();
  size_t count = t8.ElementLength();
  if (t5.ElementLength() != count + 1 || t6.ElementLength() != count * 3 || t7.ElementLength() != count * 8) {
    throw Napi::TypeError::New(env, "dirsyncJoin: archive arrays of different lengths");
  }
  for (size_t k = 0; k < count; k++) {
    if (starts[k + 1] < starts[k] || static_cast<uint64_t>(lengths[k * 3]) + lengths[k * 3 + 1] + lengths[k * 3 + 2] != starts[k + 1] - starts[k]) {
      throw Napi::TypeError::New(env, "dirsyncJoin: archive offsets do not match the lengths");
    }
  }
  if (count > 0 && starts[count] > archiveStrings.Length()) throw Napi::TypeError::New(env, "dirsyncJoin: archive strings too short");
  bool swapped = info[9].ToBoolean().Value();
  bool allowClean = info[10].ToBoolean().Value();
  const char* as = archiveStrings.Data();
  // The run's side 1 stamps are the file's side 2 when swapped.
  const int stamps1 = swapped ? 5 : 2;
  const int stamps2 = swapped ? 2 : 5;

  // Lookup of a path's archive entry. The archive is usually in the scans' order (it is written in the order of
  // the previous run's states), so the entry after the last one found is tried first; the hash index is built
  // at the first miss only. Paths must be unique: the index build refuses a duplicate, and without an index every
  // entry was found by a distinct scanned path, or the index is built at the end to check.
  auto archivePath = [&](size_t k) { return std::string_view(as + starts[k], lengths[k * 3]); };
  std::unordered_map<std::string_view, uint32_t> index;
  bool indexed = false;
  int64_t duplicate = -1;
  auto buildIndex = [&]() {
    indexed = true;
    index.reserve(count * 2);
    for (size_t k = 0; k < count; k++) {
      if (!index.emplace(archivePath(k), static_cast<uint32_t>(k)).second) {
        duplicate = static_cast<int64_t>(k);
        return;
      }
    }
  };
  size_t hint = 0;
  size_t found = 0;
  auto lookup = [&](std::string_view path) -> int64_t {
    if (hint < count && archivePath(hint) == path) {
      found++;
      return static_cast<int64_t>(hint++);
    }
    if (!indexed) buildIndex();
    if (duplicate >= 0) return -1;
    auto it = index.find(path);
    if (it == index.end()) return -1;
    found++;
    hint = static_cast<size_t>(it->second) + 1;
    return static_cast<int64_t>(it->second);
  };
  std::vector<uint8_t> flags(count, 0);

  auto sameAsArchive = [&](const Cursor& cursor, uint32_t a, int stamps) -> bool {
    const double* r = cursor.Record();
    const double* n = numbers + static_cast<size_t>(a) * 8;
    if (KindLetter(r[0]) != kinds[a] || r[5] != n[0] || r[4] != n[1] || r[6] != n[stamps] || r[7] != n[stamps + 1] || r[8] != n[stamps + 2]) {
      return false;
    }
    if (r[0] != kScanSymlink) return true;
    const uint32_t* l = lengths + static_cast<size_t>(a) * 3;
    std::string_view link(as + starts[a] + l[0] + l[1], l[2]);
    return cursor.Text() == link;
  };

  Cursor c1(&scan1);
  Cursor c2(&scan2);
  std::vector<int32_t> out;
  std::unordered_set<std::string_view> opened;
  std::string_view lastParent;
  bool lastParentOpened = false;
  if (!c1.Seek(0) || !c2.Seek(0)) return env.Null();
  while (c1.valid || c2.valid) {
    int order = !c1.valid ? 1 : !c2.valid ? -1 : ComparePaths(c1.path, c2.path);
    std::string_view path = order <= 0 ? c1.path : c2.path;
    bool has1 = order <= 0;
    bool has2 = order >= 0;
    bool underOpened = false;
    if (!opened.empty()) {
      size_t slash = path.rfind('/');
      if (slash != std::string_view::npos && slash > 0) {
        if (slash != lastParent.size() || path.substr(0, slash) != lastParent) {
          lastParent = path.substr(0, slash);
          lastParentOpened = opened.count(lastParent) > 0;
        }
        underOpened = lastParentOpened;
      }
    }
    int64_t a = lookup(path);
    if (duplicate >= 0) return Napi::Number::New(env, static_cast<double>(duplicate));
    if (allowClean && !underOpened && a >= 0 && has1 && has2 && sameAsArchive(c1, static_cast<uint32_t>(a), stamps1) &&
        sameAsArchive(c2, static_cast<uint32_t>(a), stamps2)) {
      flags[a] = 1;
    } else {
      out.push_back(has1 ? static_cast<int32_t>(c1.index) : -1);
      out.push_back(has2 ? static_cast<int32_t>(c2.index) : -1);
      out.push_back(static_cast<int32_t>(a));
      if (a >= 0) flags[a] = 2;
      // A directory that differs from the archive only in its stamps does not pull its subtree in.
      bool stampsOnly = false;
      if (!underOpened && allowClean && a >= 0 && has1 && has2 && kinds[a] == 'd' && c1.Record()[0] == kScanDir &&
          c2.Record()[0] == kScanDir) {
        double mode = numbers[static_cast<size_t>(a) * 8 + 1];
        stampsOnly = c1.Record()[4] == mode && c2.Record()[4] == mode;
      }
      if (!stampsOnly) opened.insert(path);
    }
    if (has1 && !c1.Seek(c1.index + 1)) return env.Null();
    if (has2 && !c2.Seek(c2.index + 1)) return env.Null();
  }
  if (!indexed && found != count) buildIndex();
  if (duplicate >= 0) return Napi::Number::New(env, static_cast<double>(duplicate));
  Napi::ArrayBuffer tripleStorage = Napi::ArrayBuffer::New(env, out.size() * sizeof(int32_t));
  if (!out.empty()) memcpy(tripleStorage.Data(), out.data(), out.size() * sizeof(int32_t));
  Napi::ArrayBuffer flagStorage = Napi::ArrayBuffer::New(env, count);
  if (count > 0) memcpy(flagStorage.Data(), flags.data(), count);
  Napi::Array result = Napi::Array::New(env, 2);
  result.Set(0u, Napi::Int32Array::New(env, out.size(), tripleStorage, 0));
  result.Set(1u, Napi::Uint8Array::New(env, count, flagStorage, 0));
  return result;
}

// dirsyncArchiveStarts(numbers: Float64Array, lengths: Uint32Array, kinds: Uint8Array, stringBytes)
// The archive load's check of every entry (archive.ts parseBinary, which does the same in JavaScript when this is
// missing): a kind of 'f' 'd' 'l', a non-empty path, strings within the string region, finite numbers, and
// nothing after the last entry. Returns the Uint32Array of string offsets (count + 1), or [code, value]:
// 1 = bad entry value (0-based index), 2 = bad number in entry value, 3 = value bytes after the last entry.
Napi::Value ArchiveStarts(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsTypedArray() || !info[1].IsTypedArray() || !info[2].IsTypedArray() || !info[3].IsNumber()) {
    throw Napi::TypeError::New(env, "dirsyncArchiveStarts: bad arguments");
  }
  Napi::TypedArray t0 = info[0].As<Napi::TypedArray>();
  Napi::TypedArray t1 = info[1].As<Napi::TypedArray>();
  Napi::TypedArray t2 = info[2].As<Napi::TypedArray>();
  if (t0.TypedArrayType() != napi_float64_array || t1.TypedArrayType() != napi_uint32_array || t2.TypedArrayType() != napi_uint8_array) {
    throw Napi::TypeError::New(env, "dirsyncArchiveStarts: bad array types");
  }
  const double* numbers = t0.As<Napi::Float64Array>().Data();
  const uint32_t* lengths = t1.As<Napi::Uint32Array>().Data();
  const uint8_t* kinds = t2.As<Napi::Uint8Array>().Data();
  size_t count = t2.ElementLength();
  if (t0.ElementLength() != count * 8 || t1.ElementLength() != count * 3) throw Napi::TypeError::New(env, "dirsyncArchiveStarts: lengths differ");
  double stringBytes = info[3].As<Napi::Number>().DoubleValue();
  auto failure = [&](int code, double value) {
    Napi::Array result = Napi::Array::New(env, 2);
    result.Set(0u, Napi::Number::New(env, code));
    result.Set(1u, Napi::Number::New(env, value));
    return result;
  };
  Napi::ArrayBuffer storage = Napi::ArrayBuffer::New(env, (count + 1) * sizeof(uint32_t));
  uint32_t* starts = static_cast<uint32_t*>(storage.Data());
  double position = 0;
  for (size_t k = 0; k < count; k++) {
    uint8_t kind = kinds[k];
    double pathLength = lengths[k * 3];
    double end = position + pathLength + lengths[k * 3 + 1] + lengths[k * 3 + 2];
    if ((kind != 'f' && kind != 'd' && kind != 'l') || end > stringBytes || pathLength == 0) return failure(1, static_cast<double>(k));
    double sum = 0;
    for (int f = 0; f < 8; f++) sum += numbers[k * 8 + f];
    if (!std::isfinite(sum)) return failure(2, static_cast<double>(k));
    starts[k] = static_cast<uint32_t>(position);
    position = end;
  }
  starts[count] = static_cast<uint32_t>(position);
  if (position != stringBytes) return failure(3, stringBytes - position);
  return Napi::Uint32Array::New(env, count + 1, storage, 0);
}

// dirsyncProblemRecords(records: Float64Array) -> Int32Array: the indices of the records that are not entries
// (problems and temp names, kind > 2), so that JavaScript does not walk every record to find the few.
Napi::Value ProblemRecords(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    throw Napi::TypeError::New(env, "dirsyncProblemRecords(records: Float64Array)");
  }
  Napi::Float64Array records = info[0].As<Napi::Float64Array>();
  size_t count = records.ElementLength() / kRecordFields;
  std::vector<int32_t> found;
  for (size_t k = 0; k < count; k++) {
    if (records[k * kRecordFields] > kScanSymlink) found.push_back(static_cast<int32_t>(k));
  }
  Napi::ArrayBuffer storage = Napi::ArrayBuffer::New(env, found.size() * sizeof(int32_t));
  if (!found.empty()) memcpy(storage.Data(), found.data(), found.size() * sizeof(int32_t));
  return Napi::Int32Array::New(env, found.size(), storage, 0);
}

}  // namespace

// Called from the module's Init (drbdts_native.cc).
void InitDirsyncJoin(Napi::Env env, Napi::Object exports) {
  exports.Set("dirsyncJoin", Napi::Function::New(env, Join, "dirsyncJoin"));
  exports.Set("dirsyncArchiveStarts", Napi::Function::New(env, ArchiveStarts, "dirsyncArchiveStarts"));
  exports.Set("dirsyncProblemRecords", Napi::Function::New(env, ProblemRecords, "dirsyncProblemRecords"));
}
