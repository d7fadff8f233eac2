// What update detection hands on to reconciliation, propagation and the archive: the paths that need a decision
// (states, in path order), the paths that need none in the compact forms the packed scans allow, and the scan
// problems. Three kinds of path:
//   - a state (PathState, below): any path that may need a decision;
//   - a clean path (packed scans only): present on both sides and identical to the archive in everything update
//     detection looks at, with nothing changed above it. It can be part of no action and keeps its archive entry,
//     so it gets no object at all: with the archive as a map, `clean` holds its entry; with the archive as its
//     loaded table (native join), `flags` marks it;
//   - a packed new path (new-paths.ts): new on one side only, with a fixed decision.
import type { ArchiveEntry, ArchiveTable } from '../archive/file.js';
import type { Action } from '../reconcile/reconcile.js';
import type { ScanEntry } from '../replica.js';
import type { ChangeKind, Problem, Side } from '../types.js';
import type { NewPaths } from './new-paths.js';

/** What update detection knows of one path that needs a decision: its scan entries on both sides, its archive
 * entry, the fingerprints it needed, and how each side changed. */
export interface PathState {
  path: string;
  e1: ScanEntry | undefined;
  e2: ScanEntry | undefined;
  a: ArchiveEntry | undefined;
  fp1?: string;
  fp2?: string;
  change1: ChangeKind;
  change2: ChangeKind;
  /** Inside a directory that could not be listed on that side: its state is unknown, nothing is decided. */
  unknown: boolean;
  /** Unchanged on both sides: the archive entry is kept, with refreshed stamps if they moved. */
  refresh?: boolean;
  /** The path's action, when reconciliation made one (propagation fills in its outcome; the archive is built
   * from it). Empty until then. */
  action: Action | undefined;
}

/** Every field present from the start: one object shape for all paths, no property store added per path later
 * (fp1, fp2 and refresh are set on most paths after the scan). */
export function newState(path: string, a: ArchiveEntry | undefined): PathState {
  return { path, e1: undefined, e2: undefined, a, fp1: undefined, fp2: undefined, change1: 'absent', change2: 'absent', unknown: false, refresh: false, action: undefined };
}

export function entryOf(state: PathState, side: Side): ScanEntry | undefined {
  return side === 1 ? state.e1 : state.e2;
}

export function fingerprintOf(state: PathState, side: Side): string | undefined {
  return side === 1 ? state.fp1 : state.fp2;
}

/** Flags of the table's entries after a native join: no scanned path, clean, or a state's entry. */
export const TABLE_UNSEEN = 0;
export const TABLE_CLEAN = 1;
export const TABLE_STATE = 2;

export class Detection {
  /** Every state, in insertion order = path order: parents before children (not necessarily string-sorted). */
  readonly states = new Map<string, PathState>();
  /** The loaded archive as a map (empty in table mode). */
  archive = new Map<string, ArchiveEntry>();
  /** Map mode, packed scans only: the archive entries of the clean paths. */
  clean: Set<ArchiveEntry> | undefined;
  /** Map mode, packed scans only: sizes of the clean files (their fingerprints are known: copy-local candidates). */
  readonly cleanSizes = new Set<number>();
  /**
   * The loaded format 2 archive, kept as its packed table while the native join can use it (two packed scans);
   * otherwise it is turned into `archive` (a map) and this is undefined.
   */
  table: ArchiveTable | undefined;
  /** Table mode (set by the native join): per table entry TABLE_UNSEEN, TABLE_CLEAN or TABLE_STATE. In table mode
   * `archive` stays empty and `clean` undefined: the table and these flags take their place. */
  flags: Uint8Array | undefined;
  cleanInTable = 0;
  /** Packed scans only, when the run can take the packed path: the paths new on one side that are not states. */
  newPaths: NewPaths | undefined;
  /** Paths that could not be scanned or hashed. */
  readonly problems: Problem[] = [];

  /** How many paths are clean (packed scans): present on both sides, identical to the archive. */
  cleanCount(): number {
    return this.flags !== undefined ? this.cleanInTable : this.clean?.size ?? 0;
  }

  archiveSize(): number {
    return this.flags !== undefined ? this.table!.count : this.archive.size;
  }

  newCount(): number {
    return this.newPaths?.count ?? 0;
  }

  /**
   * Of `sizes`, those some clean file has (copy-local candidates: their fingerprints are known). In table mode
   * one pass over the table's arrays for all the sizes asked (usually a handful of new files), no set of every size.
   */
  cleanFileSizes(sizes: Set<number>): Set<number> {
    if (this.flags === undefined || sizes.size === 0) return this.cleanSizes;
    const found = new Set<number>();
    const { flags } = this;
    const { count, kinds, numbers } = this.table!;
    for (let index = 0; index < count; index++) {
      if (flags[index] === TABLE_CLEAN && kinds[index] === 0x66 && sizes.has(numbers[index * 8]!)) found.add(numbers[index * 8]!);
    }
    return found;
  }

  /** Give `add` every clean file (an empty one never) of a size in `sizes` whose fingerprint `wanted` accepts, in
   * archive order. In table mode only those get a string or an object. */
  forEachCleanFile(sizes: Set<number>, wanted: (fingerprint: string) => boolean, add: (path: string, a: ArchiveEntry) => void): void {
    const { flags } = this;
    if (flags !== undefined) {
      const table = this.table!;
      const { count, kinds, numbers } = table;
      for (let index = 0; index < count; index++) {
        if (flags[index] !== TABLE_CLEAN || kinds[index] !== 0x66) continue;
        const size = numbers[index * 8]!;
        if (size <= 0 || !sizes.has(size)) continue;
        if (wanted(table.fingerprint(index))) add(table.path(index), table.entry(index));
      }
      return;
    }
    const { clean } = this;
    if (clean === undefined) return;
    for (const [path, a] of this.archive) {
      if (a.kind === 'file' && a.sizeBytes > 0 && clean.has(a) && wanted(a.fingerprint)) add(path, a);
    }
  }

  /** With no action at all, the new archive would be the old one unless a path is packed or some unchanged
   * path's stamps moved (archive/build.ts then keeps every other entry as it was): checked without building it. */
  archiveUnchanged(): boolean {
    if (this.newCount() > 0) return false;
    for (const state of this.states.values()) {
      const { a, e1, e2 } = state;
      if (state.refresh !== true || a === undefined || e1 === undefined || e2 === undefined) continue;
      if (
        a.mtime1Ms !== e1.mtimeMs ||
        a.ctime1Ms !== e1.ctimeMs ||
        a.inode1 !== e1.inode ||
        a.mtime2Ms !== e2.mtimeMs ||
        a.ctime2Ms !== e2.ctimeMs ||
        a.inode2 !== e2.inode
      ) {
        return false;
      }
    }
    return true;
  }

  /** The plan's order: every state (whose action, if any, is an item) and packed new path (its index). */
  *planOrder(): Generator<PathState | number> {
    const newPaths = this.newPaths;
    const count = this.newCount();
    let k = 0;
    let n = 0;
    for (const state of this.states.values()) {
      for (; k < count && newPaths!.before[k]! <= n; k++) yield k;
      yield state;
      n++;
    }
    for (; k < count; k++) yield k;
  }
}
