// Paths new on one side only, kept as numbers instead of objects (docs/dirsync.md, "How a run works", step 3).
//
// On an initial sync almost every path is new on one side: no archive entry, absent on the other side. Its plan
// is fixed ("copy from side X, target absent"), so a PathState, a ScanEntry, a PlanItem and an Action per path
// (~600 bytes of V8 heap each, 100,000 of them) only repeat what the packed scan record already says. Such a path
// is kept here as its record's index, its side, its place among the states (so that plans and archives keep the
// order of the object path), its status and its copy's result row: 14 bytes.
//
// Update detection decides which paths are packed (NewPathPacker, below, called by the scan join in path order)
// and hands the NewPaths on; the later phases read a packed path only through its methods (path, kind, entry,
// item), never through the scan records' layout.

import type { ArchiveTable, ArchiveEntry } from '../archive/file.js';
import { packedEntry } from '../local.js';
import { ReplicaError, type EntryStat, type ScanEntry } from '../replica.js';
import { SCAN_DIR, SCAN_FILE, SCAN_RECORD_FIELDS, SCAN_SYMLINK, type PackedScan } from '../../native/scan.js';
import type { PlanItem, Side } from '../types.js';
import type { PathState } from './detection.js';

export const NEW_PLANNED = 0;
export const NEW_DONE = 1;
export const NEW_FAILED = 2;
export const NEW_SKIPPED = 3;

/** Buffer's own UTF-8 decoder without toString's argument handling (as in local.ts). */
const utf8Slice = (Buffer.prototype as unknown as { utf8Slice(start: number, end: number): string }).utf8Slice;

const KIND_OF_CODE: Record<number, EntryStat['kind']> = { [SCAN_FILE]: 'file', [SCAN_DIR]: 'dir', [SCAN_SYMLINK]: 'symlink' };

/** DRBDTS_DIRSYNC_PACKED_NEW: 1 (the default) keeps the paths new on one side packed, 0 makes each an object. */
export function packedNewEnabled(): boolean {
  const value = process.env.DRBDTS_DIRSYNC_PACKED_NEW;
  if (value === undefined || value === '' || value === '1') return true;
  if (value === '0') return false;
  // ENOROOT as for the engine's other reasons not to run at all: a fatal result, exit 3, nothing touched.
  throw new ReplicaError('ENOROOT', `DRBDTS_DIRSYNC_PACKED_NEW must be 0 or 1, got "${value}"`);
}

export class NewPaths {
  count = 0;
  /** How many are on side 1 and side 2 (deletion safety counts what each side holds). */
  readonly perSide: [number, number] = [0, 0];
  /** Side (1 or 2) holding the path. */
  sides = new Uint8Array(0);
  /** The path's record index (not offset) in that side's packed scan. */
  records = new Uint32Array(0);
  /** How many states were made before it: its place in the path order, between states. */
  before = new Uint32Array(0);
  /** NEW_PLANNED, NEW_DONE, NEW_FAILED or NEW_SKIPPED. */
  status = new Uint8Array(0);
  /** A copied file's row in the engine's copy results, -1 for none. */
  rows = new Int32Array(0);
  /** Why a path failed or was skipped (its plan line and JSON say it). Only the few that failed. */
  readonly errors = new Map<number, string>();

  /** The scans the records index, side 1's and side 2's. */
  readonly scans: [PackedScan, PackedScan];
  /** The most paths there can be (the records of both scans). The arrays grow as paths are added (a run with
   * none, a no-change rescan, allocates nothing). */
  private readonly capacity: number;

  constructor(scans: [PackedScan, PackedScan]) {
    this.scans = scans;
    this.capacity = (scans[0].records.length + scans[1].records.length) / SCAN_RECORD_FIELDS;
  }

  /** Offset of path `k`'s scan record in its side's records. */
  offset(k: number): number {
    return this.records[k]! * SCAN_RECORD_FIELDS;
  }

  /** The records of the side holding path `k`. */
  recordsOf(k: number): Float64Array {
    return this.scans[this.sides[k]! - 1].records;
  }

  side(k: number): Side {
    return this.sides[k] as Side;
  }

  isFile(k: number): boolean {
    return this.recordsOf(k)[this.offset(k)] === SCAN_FILE;
  }

  isDir(k: number): boolean {
    return this.recordsOf(k)[this.offset(k)] === SCAN_DIR;
  }

  /** Size of path `k` (0 for a directory). */
  sizeBytes(k: number): number {
    return this.recordsOf(k)[this.offset(k) + 5]!;
  }

  mode(k: number): number {
    return this.recordsOf(k)[this.offset(k) + 4]!;
  }

  path(k: number): string {
    const { strings, records } = this.scans[this.sides[k]! - 1];
    const o = this.offset(k);
    return utf8Slice.call(strings, o === 0 ? 0 : records[o - SCAN_RECORD_FIELDS + 3]!, records[o + 2]!);
  }

  /** The path's bytes in its scan's strings (a view, no copy). */
  pathBytes(k: number): Buffer {
    const { strings, records } = this.scans[this.sides[k]! - 1];
    const o = this.offset(k);
    return strings.subarray(o === 0 ? 0 : records[o - SCAN_RECORD_FIELDS + 3]!, records[o + 2]!);
  }

  /** Path `k` as the ScanEntry the object path would have made (for the few uses that need one). */
  entry(k: number): ScanEntry {
    return packedEntry(this.recordsOf(k), this.offset(k), this.path(k), '');
  }

  /** Path `k`'s plan item, as reconciliation and propagation would have left it. */
  item(k: number): PlanItem {
    const side = this.sides[k] as Side;
    const kind = KIND_OF_CODE[this.recordsOf(k)[this.offset(k)]!]!;
    const status = this.status[k]!;
    const item: PlanItem = {
      path: this.path(k),
      action: 'copy',
      from: side,
      change1: side === 1 ? 'new' : 'absent',
      change2: side === 2 ? 'new' : 'absent',
      kind1: side === 1 ? kind : undefined,
      kind2: side === 2 ? kind : undefined,
      status: status === NEW_DONE ? 'done' : status === NEW_FAILED ? 'failed' : status === NEW_SKIPPED ? 'skipped' : 'planned',
      transfer: status === NEW_DONE && kind === 'file' ? 'full' : undefined,
    };
    const error = this.errors.get(k);
    if (error !== undefined) item.error = error;
    return item;
  }

  private grow(): void {
    const size = Math.min(this.capacity, Math.max(1024, this.sides.length * 2));
    if (size <= this.sides.length) throw new Error(`NewPaths: more than ${this.capacity} paths`);
    const grown = <T extends Uint8Array | Uint32Array | Int32Array>(old: T, make: (n: number) => T): T => {
      const array = make(size);
      array.set(old);
      return array;
    };
    this.sides = grown(this.sides, (n) => new Uint8Array(n));
    this.records = grown(this.records, (n) => new Uint32Array(n));
    this.before = grown(this.before, (n) => new Uint32Array(n));
    this.status = grown(this.status, (n) => new Uint8Array(n));
    const rows = new Int32Array(size).fill(-1);
    rows.set(this.rows);
    this.rows = rows;
  }

  add(side: 1 | 2, record: number, statesBefore: number): void {
    const k = this.count;
    if (k >= this.sides.length) this.grow();
    if (k > 0 && statesBefore < this.before[k - 1]!) throw new Error('NewPaths: added out of order');
    this.sides[k] = side;
    this.records[k] = record;
    this.before[k] = statesBefore;
    this.count = k + 1;
    this.perSide[side - 1]++;
  }

  clear(): void {
    this.count = 0;
    this.perSide[0] = 0;
    this.perSide[1] = 0;
    this.status.fill(NEW_PLANNED);
    this.rows.fill(-1);
    this.errors.clear();
  }
}

/**
 * Decides, path by path in path order during the scan join, which paths become packed new paths instead of
 * states. A path is one when it has no archive entry, is absent on the other side, is a file or a directory, is
 * no copy-local candidate (no archive file has its size), and each of its ancestors is a clean path, a directory
 * on both sides whose modes cannot conflict, or itself such a new directory of the same side: then no decision
 * above it can govern it, and its own decision is "copy from its side, target absent", a mkdir or a native copy.
 */
export class NewPathPacker {
  readonly newPaths: NewPaths;
  /** Directories below which a new path may be packed: 0 = on both sides (safe), 1 or 2 = a packed new
   * directory of that side. A directory that is a state and not listed here is not safe; one that is neither
   * a state nor listed is clean. */
  private readonly newParents = new Map<string, number>();
  /** Sizes of the archive's files, sorted (a superset of the copy-local candidates' sizes): made at the first
   * new file that asks. */
  private archiveFileSizes: Float64Array | undefined;
  private newParentCache = '';
  private newParentCacheValue: number | undefined = undefined;

  /** `states`: the join's states so far (their count places a packed path among them); `archive`: the loaded
   * archive, as its table or as a map. */
  constructor(
    scans: [PackedScan, PackedScan],
    private readonly states: Map<string, PathState>,
    private readonly archive: ArchiveTable | Map<string, ArchiveEntry>,
    private readonly perms: boolean,
  ) {
    this.newPaths = new NewPaths(scans);
  }

  /**
   * Try to keep a path new on `side` only (no archive entry, the other side has nothing) as a packed new path
   * instead of a state; `o` is its record's offset. Called in path order, as its state would have been made.
   */
  packNew(side: Side, records: Float64Array, o: number, path: string): boolean {
    const kind = records[o]!;
    if (kind !== SCAN_FILE && kind !== SCAN_DIR) return false;
    // A file of a size some archive file has may be a rename or copy of it: hashed, a state.
    if (kind === SCAN_FILE && records[o + 5]! > 0 && this.archiveHasFileSize(records[o + 5]!)) return false;
    const parent = this.newParentOf(path);
    if (parent !== 0 && parent !== side) return false;
    this.newPaths.add(side, o / SCAN_RECORD_FIELDS, this.states.size);
    if (kind === SCAN_DIR) this.newParents.set(path, side);
    return true;
  }

  /** A state was made for a path present on both sides: a directory on both with modes that cannot conflict
   * (and a safe parent) may hold packed new paths. */
  noteBothSides(path: string, e1: ScanEntry, e2: ScanEntry): void {
    if (e1.kind !== 'dir' || e2.kind !== 'dir' || (this.perms && e1.mode !== e2.mode)) return;
    if (this.newParentOf(path) === 0) this.newParents.set(path, 0);
  }

  /** What the parent of `path` allows below it: 0 (safe: clean, root, or a directory on both sides), the side of
   * a packed new directory, or -1 (a state that may govern its subtree). */
  private newParentOf(path: string): number {
    const slash = path.lastIndexOf('/');
    if (slash === -1) return 0;
    // A directory's entries come together: one lookup per directory.
    const cache = this.newParentCache;
    if (slash !== cache.length || !path.startsWith(cache)) {
      this.newParentCache = path.slice(0, slash);
      this.newParentCacheValue = undefined;
    }
    if (this.newParentCacheValue === undefined) {
      const parent = this.newParentCache;
      this.newParentCacheValue = this.newParents.get(parent) ?? (this.states.has(parent) ? -1 : 0);
    }
    return this.newParentCacheValue;
  }

  /** Does some file of the archive have this size? */
  private archiveHasFileSize(size: number): boolean {
    let sizes = this.archiveFileSizes;
    if (sizes === undefined) {
      const found: number[] = [];
      const { archive } = this;
      if (archive instanceof Map) {
        for (const a of archive.values()) if (a.kind === 'file') found.push(a.sizeBytes);
      } else {
        const { count, kinds, numbers } = archive;
        for (let index = 0; index < count; index++) if (kinds[index] === 0x66) found.push(numbers[index * 8]!);
      }
      sizes = Float64Array.from(found).sort();
      this.archiveFileSizes = sizes;
    }
    let low = 0;
    let high = sizes.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (sizes[middle]! < size) low = middle + 1;
      else high = middle;
    }
    return low < sizes.length && sizes[low] === size;
  }
}
