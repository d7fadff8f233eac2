// Content fingerprints: xxh64 (xxhash-wasm), loaded once per process. xxh64 is not cryptographic; it detects
// changes and transfer corruption, which is all update detection and the temp-file check need (unison uses MD5
// for the same purpose). The wasm module is instantiated lazily so commands that never hash do not pay for it.
import xxhash from 'xxhash-wasm';
import { fingerprintHex } from './replica.js';

export type XXHashAPI = Awaited<ReturnType<typeof xxhash>>;

let hasherPromise: Promise<XXHashAPI> | undefined;

export function getHasher(): Promise<XXHashAPI> {
  hasherPromise ??= xxhash();
  return hasherPromise;
}

/** Fingerprint of a whole buffer. */
export async function fingerprintOf(content: Uint8Array): Promise<string> {
  const hasher = await getHasher();
  return fingerprintHex(hasher.h64Raw(content));
}
