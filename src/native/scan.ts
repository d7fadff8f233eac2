// Typed wrapper over what dirsync takes from the addon: the bulk directory scan (native/src/dirsync_scan.cc), used
// by LocalReplica.scan when no ignore patterns are given, the join of two such scans with the archive
// (native/src/dirsync_join.cc), and renameat2(RENAME_EXCHANGE). Loaded on its own (not
// through ./index.js) so that a dirsync run pulls in only this. The addon is optional here: when it is not built,
// `nativeScanAvailable()` is false and the JavaScript walk runs, and `renameExchange` says it could not swap.
import { createRequire } from 'node:module';

/** Record kinds of the packed result (see dirsync_scan.cc). */
export const SCAN_FILE = 0;
export const SCAN_DIR = 1;
export const SCAN_SYMLINK = 2;
export const SCAN_UNLISTABLE = 3;
export const SCAN_STAT_FAILED = 4;
export const SCAN_BAD_NAME = 5;
export const SCAN_LINK_FAILED = 6;
export const SCAN_TEMP = 7;
export const SCAN_RECORD_FIELDS = 9;

export interface PackedScan {
  /** UTF-8 relative paths and texts (link targets, messages), back to back in record order. */
  strings: Buffer;
  /** SCAN_RECORD_FIELDS doubles per record: kind, parent, pathEnd, textEnd, mode, size, mtimeMs, ctimeMs, inode. */
  records: Float64Array;
}

interface ScanAddon {
  mallocArenaMax?(count: number): boolean;
  dirsyncScanTree(root: string): Promise<[Buffer, Float64Array]>;
  renameExchange?(from: string, to: string): void;
  dirsyncJoin?(
    strings1: Buffer,
    records1: Float64Array,
    strings2: Buffer,
    records2: Float64Array,
    archiveStrings: Buffer,
    archiveStarts: Uint32Array,
    archiveLengths: Uint32Array,
    archiveNumbers: Float64Array,
    archiveKinds: Uint8Array,
    swapped: boolean,
    allowClean: boolean,
  ): [Int32Array, Uint8Array] | number | null;
  dirsyncXxh64?(bytes: Uint8Array): string;
  dirsyncH64?(bytes: Uint8Array): bigint;
  dirsyncH64Init?(state: Uint8Array): void;
  dirsyncH64Update?(state: Uint8Array, bytes: Uint8Array): void;
  dirsyncH64Digest?(state: Uint8Array): bigint;
  dirsyncProblemRecords?(records: Float64Array): Int32Array;
  dirsyncArchiveStarts?(numbers: Float64Array, lengths: Uint32Array, kinds: Uint8Array, stringBytes: number): Uint32Array | [number, number];
  dirsyncCopyFiles?(
    sourceRoot: string,
    targetRoot: string,
    paths: Buffer,
    pathEnds: Uint32Array,
    numbers: Float64Array,
    fsync: boolean,
  ): Promise<[Float64Array, Buffer, string[]]>;
}

/** The archive load's native helpers (native/src/dirsync_join.cc), or undefined (archive/file.ts then uses xxhash-wasm
 * and its own loop; DRBDTS_DIRSYNC_NATIVE_JOIN=0 forces that, as it forces the JavaScript join). */
export interface ArchiveNative {
  /** xxh64 of the bytes as fingerprintHex writes it (16 hex digits), the same digest as xxhash-wasm's h64Raw. */
  xxh64(bytes: Uint8Array): string;
  /** Check every entry; string offsets (count + 1), or [1, index] bad entry, [2, index] bad number, [3, n] n bytes
   * after the last entry. */
  archiveStarts(numbers: Float64Array, lengths: Uint32Array, kinds: Uint8Array, stringBytes: number): Uint32Array | [number, number];
}

/** Record offsets (index * SCAN_RECORD_FIELDS) of a packed scan's problem and temp records (kind > SCAN_SYMLINK),
 * found natively when the addon can, else by a walk over the records. */
export function problemOffsets(records: Float64Array): number[] {
  const native = process.env.DRBDTS_DIRSYNC_NATIVE_JOIN === '0' ? null : load();
  if (native?.dirsyncProblemRecords !== undefined) return Array.from(native.dirsyncProblemRecords(records), (index) => index * SCAN_RECORD_FIELDS);
  const offsets: number[] = [];
  for (let o = 0; o < records.length; o += SCAN_RECORD_FIELDS) if (records[o]! > SCAN_SYMLINK) offsets.push(o);
  return offsets;
}

/** xxh64 as dirsync uses it (hash.ts): one-shot and streaming, the digests of xxhash-wasm's h64Raw/create64. */
export interface Hasher64 {
  h64Raw(input: Uint8Array): bigint;
  create64(): { update(input: Uint8Array): unknown; digest(): bigint };
}

/** The addon's xxh64 (native/src/dirsync_hash.cc), or undefined: not built, or DRBDTS_DIRSYNC_NATIVE_HASH=0. */
export function nativeHasher(): Hasher64 | undefined {
  const native = process.env.DRBDTS_DIRSYNC_NATIVE_HASH === '0' ? null : load();
  if (native?.dirsyncH64 === undefined || native.dirsyncH64Init === undefined || native.dirsyncH64Update === undefined || native.dirsyncH64Digest === undefined) {
    return undefined;
  }
  const { dirsyncH64, dirsyncH64Init, dirsyncH64Update, dirsyncH64Digest } = native;
  return {
    h64Raw: dirsyncH64,
    create64() {
      // Over its own ArrayBuffer: the addon writes the state in place, which a small on-heap array would not allow.
      const state = new Uint8Array(new ArrayBuffer(80));
      dirsyncH64Init(state);
      const hasher = {
        update(input: Uint8Array) {
          dirsyncH64Update(state, input);
          return hasher;
        },
        digest: () => dirsyncH64Digest(state),
      };
      return hasher;
    },
  };
}

export function archiveNative(): ArchiveNative | undefined {
  const native = process.env.DRBDTS_DIRSYNC_NATIVE_JOIN === '0' ? null : load();
  if (native?.dirsyncXxh64 === undefined || native.dirsyncArchiveStarts === undefined) return undefined;
  return { xxh64: native.dirsyncXxh64, archiveStarts: native.dirsyncArchiveStarts };
}

/** The archive's packed arrays as the native join reads them (ArchiveTable in src/dirsync/archive/file.ts); none may be
 * a small typed array of its own (V8 keeps those on its heap, where they can move): views of a buffer only. */
export interface PackedArchive {
  strings: Buffer;
  starts: Uint32Array;
  lengths: Uint32Array;
  numbers: Float64Array;
  kinds: Uint8Array;
  swapped: boolean;
  count: number;
}

/** What the native join found (native/src/dirsync_join.cc). */
export type JoinResult =
  | { kind: 'joined'; triples: Int32Array; flags: Uint8Array }
  | { kind: 'order' }
  | { kind: 'duplicate'; index: number };

/** The native join of two packed scans with the packed archive, or undefined when the addon lacks it (or
 * DRBDTS_DIRSYNC_NATIVE_JOIN=0): the caller then joins in JavaScript. */
export function joinPacked(scan1: PackedScan, scan2: PackedScan, archive: PackedArchive, allowClean: boolean): JoinResult | undefined {
  const native = process.env.DRBDTS_DIRSYNC_NATIVE_JOIN === '0' ? null : load();
  if (native?.dirsyncJoin === undefined) return undefined;
  const result = native.dirsyncJoin(
    scan1.strings,
    scan1.records,
    scan2.strings,
    scan2.records,
    archive.strings,
    archive.starts,
    archive.lengths,
    archive.numbers,
    archive.kinds,
    archive.swapped,
    allowClean,
  );
  if (result === null) return { kind: 'order' };
  if (typeof result === 'number') return { kind: 'duplicate', index: result };
  return { kind: 'joined', triples: result[0], flags: result[1] };
}

/** Per operation of copyFiles: source size, mtimeMs, inode; precondition kind (0 absent, 1 file), size, mtimeMs,
 * inode; mode; mtimeMs to set (NaN: none). See native/src/dirsync_copy.cc. */
export const COPY_IN_FIELDS = 9;
/** Per result: status (COPY_DONE or a failure), installed kind (SCAN_FILE...), size, mtimeMs, ctimeMs, inode, mode. */
export const COPY_OUT_FIELDS = 7;
export const COPY_DONE = 0;
/** Failure statuses of copyFiles, in order from 1: the ReplicaErrorCode each stands for. */
export const COPY_FAILURE_CODES = ['EGONE', 'ECHANGED', 'EHASH', 'EACCES', 'EIO'] as const;

export interface CopyBatchResult {
  /** COPY_OUT_FIELDS per operation. */
  results: Float64Array;
  /** 16 hex digits per operation (latin1): the installed content's xxh64. */
  fingerprints: Buffer;
  /** '' for a done operation, else its error message. */
  messages: string[];
}

/** Full-content copies of files between two local roots on the thread pool (native/src/dirsync_copy.cc), or
 * undefined when the addon lacks it (or DRBDTS_DIRSYNC_NATIVE_COPY=0): the caller then copies in JavaScript. */
export function nativeCopier():
  | ((sourceRoot: string, targetRoot: string, paths: Buffer, pathEnds: Uint32Array, numbers: Float64Array, fsync: boolean) => Promise<CopyBatchResult>)
  | undefined {
  const native = process.env.DRBDTS_DIRSYNC_NATIVE_COPY === '0' ? null : load();
  const copy = native?.dirsyncCopyFiles;
  if (copy === undefined) return undefined;
  return async (sourceRoot, targetRoot, paths, pathEnds, numbers, fsync) => {
    if (numbers.length !== pathEnds.length * COPY_IN_FIELDS) throw new TypeError(`copyFiles: ${numbers.length} numbers for ${pathEnds.length} paths`);
    const [results, fingerprints, messages] = await copy(sourceRoot, targetRoot, paths, pathEnds, numbers, fsync);
    if (results.length !== pathEnds.length * COPY_OUT_FIELDS || fingerprints.length !== pathEnds.length * 16 || messages.length !== pathEnds.length) {
      throw new Error(`native copy returned ${results.length} fields, ${fingerprints.length} digest bytes, ${messages.length} messages for ${pathEnds.length} paths`);
    }
    return { results, fingerprints, messages };
  };
}

let addon: ScanAddon | null | undefined;

const DIRSYNC_MALLOC_ARENAS = 1;

function load(): ScanAddon | null {
  if (addon === undefined) {
    try {
      const loaded = createRequire(import.meta.url)('../../native/build/Release/drbdts_native.node') as Partial<ScanAddon>;
      addon = typeof loaded.dirsyncScanTree === 'function' ? (loaded as ScanAddon) : null;
      // dirsync's native work runs on the thread pool: one malloc arena per pool thread kept ~20 MiB of freed
      // blocks resident in a 100,000-file sync (native/src/drbdts_native.cc, MallocArenaMax).
      if (addon !== null) loaded.mallocArenaMax?.(DIRSYNC_MALLOC_ARENAS);
    } catch {
      addon = null;
    }
  }
  return addon;
}

export function nativeScanAvailable(): boolean {
  return process.env.DRBDTS_DIRSYNC_NATIVE_SCAN !== '0' && load() !== null;
}

/** Scan the tree under the absolute directory `root` on a thread-pool thread (lstat semantics, no symlink followed). */
export async function scanTree(root: string): Promise<PackedScan> {
  if (typeof root !== 'string' || !root.startsWith('/') || root.includes('\0')) {
    throw new TypeError(`scan root must be an absolute path, got ${JSON.stringify(root)}`);
  }
  const native = load();
  if (native === null) throw new Error('the drbdts native addon (dirsyncScanTree) is not built: run "npm run build:native"');
  const [strings, records] = await native.dirsyncScanTree(root);
  if (records.length % SCAN_RECORD_FIELDS !== 0) throw new Error(`native scan returned ${records.length} fields`);
  return { strings, records };
}

/**
 * renameat2(RENAME_EXCHANGE): swaps two existing paths atomically, whatever their types. Returns false when the
 * addon is not built; throws the system error otherwise (EINVAL or ENOSYS where the filesystem or kernel cannot,
 * ENOENT if either path is missing), so the caller can fall back.
 */
export function renameExchange(from: string, to: string): boolean {
  if (typeof from !== 'string' || typeof to !== 'string' || from === '' || to === '') {
    throw new TypeError('renameExchange: two non-empty paths');
  }
  const native = load();
  if (native?.renameExchange === undefined) return false;
  native.renameExchange(from, to);
  return true;
}
