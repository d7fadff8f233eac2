// The addon's xxh64 (dirsync_hash.cc) for its other native files: the streaming form over 80 bytes of state,
// the same digests as dirsyncH64Init/Update/Digest give JavaScript.
#pragma once

#include <stddef.h>
#include <stdint.h>

constexpr size_t kDirsyncH64StateBytes = 80;

void DirsyncH64Init(void* state);
void DirsyncH64Update(void* state, const unsigned char* bytes, size_t length);
uint64_t DirsyncH64Digest(const void* state);
