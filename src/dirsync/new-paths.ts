// Paths new on one side only, kept as numbers instead of objects (docs/dirsync.md, "How a run works", step 3).
//
// On an initial sync almost every path is new on one side: no archive entry, absent on the other side. Its plan
// is fixed ("copy from side X, target absent"), so a PathState, a ScanEntry, a PlanItem and an Action per path
// (~600 bytes of V8 heap each, 100,000 of them) only repeat what the packed scan record already says. Such a path
// is kept here as its record's index, its side, its place among the states (so that plans and archives keep the
// order of the object path), its status and its copy's result row: 14 bytes.

import { ReplicaError } from './replica.js';

export const NEW_PLANNED = 0;
export const NEW_DONE = 1;
export const NEW_FAILED = 2;
export const NEW_SKIPPED = 3;

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

  /** `capacity`: the most paths there can be (the records of both scans). The arrays grow as paths are added
   * (a run with none, a no-change rescan, allocates nothing). */
  constructor(private readonly capacity: number) {}

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
