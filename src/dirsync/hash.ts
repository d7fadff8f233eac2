// Content fingerprints: xxh64, loaded once per process. xxh64 is not cryptographic; it detects changes and
// transfer corruption, which is all update detection and the temp-file check need (unison uses MD5 for the same
// purpose). The addon's implementation (native/src/dirsync_hash.cc, several times faster) is used when it is
// built, else xxhash-wasm; both give the same digests, so archives and fingerprints from either agree.
// DRBDTS_DIRSYNC_NATIVE_HASH=0 forces the wasm one. It is loaded lazily so commands that never hash do not pay.
import { nativeHasher, type Hasher64 } from '../native/scan.js';
import { fingerprintHex } from './replica.js';

export type XXHashAPI = Hasher64;

let hasherPromise: Promise<XXHashAPI> | undefined;

export function getHasher(): Promise<XXHashAPI> {
  hasherPromise ??= loadHasher();
  return hasherPromise;
}

async function loadHasher(): Promise<XXHashAPI> {
  const native = nativeHasher();
  if (native !== undefined) return native;
  const { default: xxhash } = await import('xxhash-wasm');
  return xxhash();
}

/** Fingerprint of a whole buffer. */
export async function fingerprintOf(content: Uint8Array): Promise<string> {
  const hasher = await getHasher();
  return fingerprintHex(hasher.h64Raw(content));
}
