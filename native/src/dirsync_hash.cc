// xxh64 for dirsync: the archive checksum and name, and file fingerprints, natively instead of through
// xxhash-wasm (which hashed at 0.5-0.9 GB/s here, a native loop does several GB/s). Written from the algorithm's
// published description (seed 0); the digests are xxhash-wasm's h64Raw ones, which every archive and fingerprint
// so far was made with (test/dirsync-archive.test.ts compares the two on many lengths and chunkings).
//
// dirsyncXxh64(bytes) -> 16 lowercase hex digits; dirsyncH64(bytes) -> BigInt;
// streaming: dirsyncH64Init(state), dirsyncH64Update(state, bytes), dirsyncH64Digest(state) -> BigInt, where
// state is a JavaScript-owned Uint8Array of kStateBytes over its own ArrayBuffer (never a small on-heap array).

#include <napi.h>

#include <stdint.h>
#include <string.h>

#include "dirsync_hash.h"

namespace {

constexpr uint64_t kPrime1 = 11400714785074694791ULL;
constexpr uint64_t kPrime2 = 14029467366897019727ULL;
constexpr uint64_t kPrime3 = 1609587929392839161ULL;
constexpr uint64_t kPrime4 = 9650029242287828579ULL;
constexpr uint64_t kPrime5 = 2870177450012600261ULL;

inline uint64_t Rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t Read64(const unsigned char* p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;  // little-endian hosts only (the addon is built for Linux on x86-64 and arm64)
}
inline uint32_t Read32(const unsigned char* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}
inline uint64_t Round(uint64_t acc, uint64_t lane) { return Rotl(acc + lane * kPrime2, 31) * kPrime1; }
inline uint64_t MergeRound(uint64_t acc, uint64_t v) { return (acc ^ Round(0, v)) * kPrime1 + kPrime4; }

// Accumulator merge (inputs of 32 bytes or more).
uint64_t Converge(const uint64_t v[4]) {
  uint64_t h = Rotl(v[0], 1) + Rotl(v[1], 7) + Rotl(v[2], 12) + Rotl(v[3], 18);
  for (int k = 0; k < 4; k++) h = MergeRound(h, v[k]);
  return h;
}

// The tail (< 32 bytes) and the avalanche.
uint64_t Finish(uint64_t h, const unsigned char* p, const unsigned char* end) {
  while (p + 8 <= end) {
    h = Rotl(h ^ Round(0, Read64(p)), 27) * kPrime1 + kPrime4;
    p += 8;
  }
  if (p + 4 <= end) {
    h = Rotl(h ^ (static_cast<uint64_t>(Read32(p)) * kPrime1), 23) * kPrime2 + kPrime3;
    p += 4;
  }
  while (p < end) {
    h = Rotl(h ^ (*p * kPrime5), 11) * kPrime1;
    p++;
  }
  h ^= h >> 33;
  h *= kPrime2;
  h ^= h >> 29;
  h *= kPrime3;
  h ^= h >> 32;
  return h;
}

inline const unsigned char* Stripes(uint64_t v[4], const unsigned char* p, const unsigned char* end) {
  while (p + 32 <= end) {
    v[0] = Round(v[0], Read64(p));
    v[1] = Round(v[1], Read64(p + 8));
    v[2] = Round(v[2], Read64(p + 16));
    v[3] = Round(v[3], Read64(p + 24));
    p += 32;
  }
  return p;
}

uint64_t Xxh64(const unsigned char* p, size_t length) {
  const unsigned char* end = p + length;
  uint64_t h;
  if (length >= 32) {
    uint64_t v[4] = {kPrime1 + kPrime2, kPrime2, 0, 0 - kPrime1};
    p = Stripes(v, p, end);
    h = Converge(v);
  } else {
    h = kPrime5;
  }
  return Finish(h + static_cast<uint64_t>(length), p, end);
}

struct State {
  uint64_t v[4];
  uint64_t total;
  unsigned char buffer[32];
  uint32_t buffered;
  uint32_t unused;
};
constexpr size_t kStateBytes = sizeof(State);
static_assert(kStateBytes == 80 && kStateBytes == kDirsyncH64StateBytes, "state layout");

}  // namespace

// The streaming hash for the other native files (dirsync_copy.cc): `state` is kStateBytes (80) of any memory.
void DirsyncH64Init(void* memory) {
  State* state = static_cast<State*>(memory);
  memset(state, 0, kStateBytes);
  state->v[0] = kPrime1 + kPrime2;
  state->v[1] = kPrime2;
  state->v[2] = 0;
  state->v[3] = 0 - kPrime1;
}

void DirsyncH64Update(void* memory, const unsigned char* p, size_t length) {
  State* state = static_cast<State*>(memory);
  const unsigned char* end = p + length;
  state->total += length;
  if (state->buffered + length < 32) {
    memcpy(state->buffer + state->buffered, p, length);
    state->buffered += static_cast<uint32_t>(length);
    return;
  }
  if (state->buffered > 0) {
    size_t fill = 32 - state->buffered;
    memcpy(state->buffer + state->buffered, p, fill);
    Stripes(state->v, state->buffer, state->buffer + 32);
    p += fill;
    state->buffered = 0;
  }
  p = Stripes(state->v, p, end);
  memcpy(state->buffer, p, static_cast<size_t>(end - p));
  state->buffered = static_cast<uint32_t>(end - p);
}

uint64_t DirsyncH64Digest(const void* memory) {
  const State* state = static_cast<const State*>(memory);
  uint64_t h = state->total >= 32 ? Converge(state->v) : kPrime5;
  return Finish(h + state->total, state->buffer, state->buffer + state->buffered);
}

namespace {

Napi::Uint8Array BytesArg(const Napi::CallbackInfo& info, size_t index, const char* what) {
  if (info.Length() <= index || !info[index].IsTypedArray() || info[index].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    throw Napi::TypeError::New(info.Env(), std::string(what) + ": a Uint8Array or Buffer");
  }
  return info[index].As<Napi::Uint8Array>();
}

State* StateArg(const Napi::CallbackInfo& info) {
  Napi::Uint8Array state = BytesArg(info, 0, "xxh64 state");
  if (state.ElementLength() != kStateBytes) throw Napi::TypeError::New(info.Env(), "xxh64 state: 80 bytes");
  return reinterpret_cast<State*>(state.Data());  // alignment: memcpy-free access is fine on x86-64 and arm64
}

Napi::Value Xxh64Hex(const Napi::CallbackInfo& info) {
  Napi::Uint8Array bytes = BytesArg(info, 0, "dirsyncXxh64");
  uint64_t digest = Xxh64(bytes.Data(), bytes.ElementLength());
  char hex[16];
  static const char kDigits[] = "0123456789abcdef";
  for (int k = 15; k >= 0; k--, digest >>= 4) hex[k] = kDigits[digest & 15];
  return Napi::String::New(info.Env(), hex, 16);
}

Napi::Value H64(const Napi::CallbackInfo& info) {
  Napi::Uint8Array bytes = BytesArg(info, 0, "dirsyncH64");
  return Napi::BigInt::New(info.Env(), Xxh64(bytes.Data(), bytes.ElementLength()));
}

Napi::Value H64Init(const Napi::CallbackInfo& info) {
  DirsyncH64Init(StateArg(info));
  return info.Env().Undefined();
}

Napi::Value H64Update(const Napi::CallbackInfo& info) {
  State* state = StateArg(info);
  Napi::Uint8Array bytes = BytesArg(info, 1, "dirsyncH64Update");
  DirsyncH64Update(state, bytes.Data(), bytes.ElementLength());
  return info.Env().Undefined();
}

Napi::Value H64Digest(const Napi::CallbackInfo& info) {
  return Napi::BigInt::New(info.Env(), DirsyncH64Digest(StateArg(info)));
}

}  // namespace

// Called from the module's Init (drbdts_native.cc).
void InitDirsyncHash(Napi::Env env, Napi::Object exports) {
  exports.Set("dirsyncXxh64", Napi::Function::New(env, Xxh64Hex, "dirsyncXxh64"));
  exports.Set("dirsyncH64", Napi::Function::New(env, H64, "dirsyncH64"));
  exports.Set("dirsyncH64Init", Napi::Function::New(env, H64Init, "dirsyncH64Init"));
  exports.Set("dirsyncH64Update", Napi::Function::New(env, H64Update, "dirsyncH64Update"));
  exports.Set("dirsyncH64Digest", Napi::Function::New(env, H64Digest, "dirsyncH64Digest"));
}
