// Update detection, steps 1 and 2: scan both replicas at once, then join the scans with the archive.
//
// Two plain local roots are scanned by the addon into packed records (native/scan.ts), kept as they are for the
// join; any other pair is scanned entry by entry into states. Whether the roots are two plain local directories
// also decides whether new paths may stay packed (their files then go to the addon's copy,
// propagate/native-copies.ts).
//
// The join's result is a Detection (detection.ts): a state for every path that may need a decision, in path
// order, and for the packed scans the clean paths and the packed new paths, which get no state. Three joins give
// the same states: the addon's (native/src/dirsync_join.cc, over the archive's loaded table), this file's merge
// of the two packed scans (the archive as a map), and the object path's (every scanned and archived path a
// state). The first two fall back to the next when a scan is not in the order they expect.
import { ArchiveTable, type ArchiveEntry } from '../archive/file.js';
import { LocalReplica, packedEntry } from '../local.js';
import type { Replica } from '../replica.js';
import {
  joinPacked as nativeJoin,
  nativeCopier,
  problemOffsets,
  SCAN_DIR,
  SCAN_FILE,
  SCAN_RECORD_FIELDS,
  SCAN_SYMLINK,
  type JoinResult,
  type PackedScan,
} from '../../native/scan.js';
import { comparePaths, type Side, type SyncOptions } from '../types.js';
import { Detection, newState, TABLE_CLEAN, TABLE_UNSEEN } from './detection.js';
import { NewPathPacker } from './new-paths.js';

/** Each side's problem paths (unlistable directories: their subtrees are unknown). */
export type ProblemPaths = [Set<string>, Set<string>];

/** A scan's outcome: packed records of both sides, or the states already made (and the problem paths). */
export type Scanned = ProblemPaths | { packed: [PackedScan, PackedScan] };

/** Both roots are plain local directories: their paths. */
export function localRoots(replicas: [Replica, Replica]): [string, string] | undefined {
  const [r1, r2] = replicas;
  if (r1.constructor !== LocalReplica || r2.constructor !== LocalReplica) return undefined;
  return [(r1 as LocalReplica).rootPath, (r2 as LocalReplica).rootPath];
}

/** The addon's copy, when propagation between two local roots uses it (not with DRBDTS_DIRSYNC_WORKERS=0,
 * which keeps every file operation on this thread): packing new paths depends on it being there. */
export function localCopier(replicas: [Replica, Replica]): ReturnType<typeof nativeCopier> {
  return localRoots(replicas) !== undefined && process.env.DRBDTS_DIRSYNC_WORKERS !== '0' ? nativeCopier() : undefined;
}

export async function scanBoth(replicas: [Replica, Replica], options: SyncOptions, detection: Detection): Promise<Scanned> {
  const [r1, r2] = replicas;
  if (r1.constructor === LocalReplica && r2.constructor === LocalReplica) {
    const scanOptions = { ignore: options.ignore };
    const packed = await Promise.all([(r1 as LocalReplica).scanPacked(scanOptions), (r2 as LocalReplica).scanPacked(scanOptions)]);
    if (packed[0] !== undefined && packed[1] !== undefined) return { packed: packed as [PackedScan, PackedScan] };
  }
  return scanEntries(replicas, options, detection);
}

/** The object path: every scanned path becomes a state, as the batches arrive. */
async function scanEntries(replicas: [Replica, Replica], options: SyncOptions, detection: Detection): Promise<ProblemPaths> {
  const problems: ProblemPaths = [new Set(), new Set()];
  const { states } = detection;
  const scanSide = async (side: Side): Promise<void> => {
    for await (const batch of replicas[side - 1]!.scan({ ignore: options.ignore })) {
      for (const entry of batch.entries) {
        let state = states.get(entry.path);
        if (state === undefined) {
          state = newState(entry.path, undefined);
          states.set(entry.path, state);
        }
        if (side === 1) state.e1 = entry;
        else state.e2 = entry;
      }
      for (const problem of batch.problems) {
        problems[side - 1].add(problem.path);
        detection.problems.push({ side, path: problem.path, message: problem.message });
        options.warn(`root ${side}: ${problem.path}: ${problem.message} (skipped)`);
      }
    }
  };
  await Promise.all([scanSide(1), scanSide(2)]);
  return problems;
}

// ---- the join ------------------------------------------------------------------------------------------------

/** Buffer's own UTF-8 decoder without toString's argument handling (as in local.ts). */
const utf8Slice = (Buffer.prototype as unknown as { utf8Slice(start: number, end: number): string }).utf8Slice;

const KIND_OF_CODE: Record<number, string> = { [SCAN_FILE]: 'file', [SCAN_DIR]: 'dir', [SCAN_SYMLINK]: 'symlink' };

/** A packed scan is not in the order comparePaths expects (never seen; the merge then falls back). */
class ScanOrderError extends Error {}

/**
 * One side's packed scan records, walked in scan order (records past SCAN_SYMLINK, the problems, are skipped):
 * `path` is the current record's path (undefined at the end), `offset` its first field. Throws ScanOrderError
 * when a path does not sort after the one before it.
 */
class ScanCursor {
  offset = -SCAN_RECORD_FIELDS;
  path: string | undefined = undefined;

  constructor(private readonly records: Float64Array, private readonly strings: Buffer) {}

  next(): void {
    const F = SCAN_RECORD_FIELDS;
    const records = this.records;
    const previous = this.path;
    this.path = undefined;
    for (this.offset += F; this.offset < records.length; this.offset += F) {
      const o = this.offset;
      const start = o === 0 ? 0 : records[o - F + 3]!;
      if (records[o]! > SCAN_SYMLINK) continue;
      this.path = utf8Slice.call(this.strings, start, records[o + 2]!);
      if (previous !== undefined && comparePaths(previous, this.path) >= 0) throw new ScanOrderError();
      return;
    }
  }
}

/** The link target (or problem text) of record `o`. */
function textOf(strings: Buffer, records: Float64Array, o: number): string {
  const pathEnd = records[o + 2]!;
  const textEnd = records[o + 3]!;
  return textEnd > pathEnd ? utf8Slice.call(strings, pathEnd, textEnd) : '';
}

export interface JoinOptions {
  options: SyncOptions;
  replicas: [Replica, Replica];
  /** The run may keep new paths packed (no dry run, native copies between two local roots, the variable). */
  packNewPaths: boolean;
}

/**
 * Join the scans with the loaded archive into `detection`; returns each side's problem paths. With packed scans
 * and the archive's table the native join runs; otherwise the archive becomes a map.
 */
export function joinScans(detection: Detection, scanned: Scanned, loaded: ArchiveTable | Map<string, ArchiveEntry>, join: JoinOptions): ProblemPaths {
  if (loaded instanceof ArchiveTable && !Array.isArray(scanned)) detection.table = loaded;
  else detection.archive = loaded instanceof ArchiveTable ? loaded.toMap() : loaded;
  const problems = Array.isArray(scanned) ? scanned : new PackedJoin(detection, join).run(scanned.packed);
  mergeArchive(detection);
  return problems;
}

/** Every archived path that is neither clean nor already a state becomes one (deleted on both sides, or on the
 * object path any archived path); a state gets its archive entry. */
function mergeArchive(detection: Detection): void {
  if (detection.flags !== undefined) return; // table mode: the native join made these states
  const { clean, states } = detection;
  for (const [path, entry] of detection.archive) {
    if (clean !== undefined && clean.has(entry)) continue;
    let state = states.get(path);
    if (state === undefined) {
      state = newState(path, entry);
      states.set(path, state);
    } else state.a = entry;
  }
}

class PackedJoin {
  private packer: NewPathPacker | undefined;

  constructor(private readonly detection: Detection, private readonly join: JoinOptions) {}

  /**
   * Merge-join the two packed scans (both in comparePaths order) with the archive. A path present on both sides
   * whose records equal its archive entry in everything the update detection looks at, and that lies under no
   * path that differs, is clean: it would be "unchanged" on both sides with no action and an identical archive
   * entry, so it gets no objects at all. Every other path becomes a PathState as the object path would make it.
   * With any scan problem (an unknown subtree) or --always-hash nothing is clean.
   */
  run(packed: [PackedScan, PackedScan]): ProblemPaths {
    const { detection } = this;
    const { options, replicas } = this.join;
    const problems: ProblemPaths = [new Set(), new Set()];
    const F = SCAN_RECORD_FIELDS;
    for (const side of [1, 2] as const) {
      const { strings, records } = packed[side - 1];
      const replica = replicas[side - 1] as LocalReplica;
      for (const o of problemOffsets(records)) {
        const textStart = o === 0 ? 0 : records[o - F + 3]!;
        const pathEnd = records[o + 2]!;
        const path = pathEnd > textStart ? utf8Slice.call(strings, textStart, pathEnd) : '';
        const problem = replica.packedProblem(records[o]!, path, textOf(strings, records, o));
        if (problem === undefined) continue;
        problems[side - 1].add(problem.path);
        detection.problems.push({ side, path: problem.path, message: problem.message });
        options.warn(`root ${side}: ${problem.path}: ${problem.message} (skipped)`);
      }
    }
    const allowClean = problems[0].size === 0 && problems[1].size === 0 && !options.alwaysHash;
    this.startPacking(packed, allowClean);
    const { table } = detection;
    if (table !== undefined) {
      const joined = nativeJoin(packed[0], packed[1], table, allowClean);
      if (joined?.kind === 'duplicate') throw table.duplicatePath();
      if (joined?.kind === 'joined') {
        this.applyNativeJoin(packed, joined);
        return problems;
      }
      // No native join (or a scan out of order): the archive as a map, and the JavaScript join below.
      detection.archive = table.toMap();
      detection.table = undefined;
      this.startPacking(packed, allowClean);
      if (joined?.kind === 'order') {
        this.statePerPath(packed);
        return problems;
      }
    }
    try {
      this.joinPacked(packed, allowClean);
    } catch (error) {
      if (!(error instanceof ScanOrderError)) throw error;
      this.statePerPath(packed);
    }
    return problems;
  }

  /** Set up packing new paths for a join (or turn it off): only when the whole run can take the packed path. */
  private startPacking(packed: [PackedScan, PackedScan], allowed: boolean): void {
    const { detection } = this;
    // Everything a packed path skips must be known not to apply: no unknown subtree, no hash of every file, a
    // run that propagates on its own (no dry run), and native copies between two local roots for its files.
    this.packer = allowed && this.join.packNewPaths
      ? new NewPathPacker(packed, detection.states, detection.table ?? detection.archive, this.join.options.perms)
      : undefined;
    detection.newPaths = this.packer?.newPaths;
  }

  /** Not in the expected order: join nothing, make every path a state (side 1's, then side 2's). */
  private statePerPath(packed: [PackedScan, PackedScan]): void {
    const F = SCAN_RECORD_FIELDS;
    const { detection } = this;
    const { states } = detection;
    states.clear();
    detection.clean = undefined;
    detection.cleanSizes.clear();
    this.startPacking(packed, false);
    for (const side of [1, 2] as const) {
      const { strings, records } = packed[side - 1];
      for (let o = 0, textStart = 0; o < records.length; textStart = records[o + 3]!, o += F) {
        if (records[o]! > SCAN_SYMLINK) continue;
        const path = utf8Slice.call(strings, textStart, records[o + 2]!);
        const entry = packedEntry(records, o, path, textOf(strings, records, o));
        let state = states.get(path);
        if (state === undefined) {
          state = newState(path, undefined);
          states.set(path, state);
        }
        if (side === 1) state.e1 = entry;
        else state.e2 = entry;
      }
    }
  }

  /**
   * States for what the native join reported (paths that are not clean, in merge order), then for the archive
   * entries no scanned path has (deleted on both sides), in archive order: the states joinPacked and
   * mergeArchive would make, without a string or object for any clean path.
   */
  private applyNativeJoin(packed: [PackedScan, PackedScan], joined: Extract<JoinResult, { kind: 'joined' }>): void {
    const F = SCAN_RECORD_FIELDS;
    const { detection, packer } = this;
    const { states } = detection;
    const table = detection.table!;
    const { triples, flags } = joined;
    const [s1, s2] = [packed[0].strings, packed[1].strings];
    const [r1, r2] = [packed[0].records, packed[1].records];
    const pathOf = (strings: Buffer, records: Float64Array, o: number): string =>
      utf8Slice.call(strings, o === 0 ? 0 : records[o - F + 3]!, records[o + 2]!);
    for (let t = 0; t < triples.length; t += 3) {
      const o1 = triples[t]! * F;
      const o2 = triples[t + 1]! * F;
      const index = triples[t + 2]!;
      const path = o1 >= 0 ? pathOf(s1, r1, o1) : pathOf(s2, r2, o2);
      if (packer !== undefined && index < 0 && (o1 < 0) !== (o2 < 0) && (o1 >= 0 ? packer.packNew(1, r1, o1, path) : packer.packNew(2, r2, o2, path))) continue;
      const state = newState(path, index >= 0 ? table.entry(index) : undefined);
      if (o1 >= 0) state.e1 = packedEntry(r1, o1, path, textOf(s1, r1, o1));
      if (o2 >= 0) state.e2 = packedEntry(r2, o2, path, textOf(s2, r2, o2));
      states.set(path, state);
      if (packer !== undefined && state.e1 !== undefined && state.e2 !== undefined) packer.noteBothSides(path, state.e1, state.e2);
    }
    let clean = 0;
    for (let index = 0; index < table.count; index++) {
      const flag = flags[index]!;
      if (flag === TABLE_CLEAN) clean++;
      else if (flag === TABLE_UNSEEN) {
        const path = table.path(index);
        states.set(path, newState(path, table.entry(index)));
      }
    }
    detection.flags = flags;
    detection.cleanInTable = clean;
  }

  private joinPacked(packed: [PackedScan, PackedScan], allowClean: boolean): void {
    const { detection, packer } = this;
    const { states, archive } = detection;
    const [s1, s2] = [packed[0].strings, packed[1].strings];
    const [r1, r2] = [packed[0].records, packed[1].records];
    const clean = new Set<ArchiveEntry>();
    detection.clean = clean;
    const { cleanSizes } = detection;
    // A cursor per side over its records in scan order.
    const c1 = new ScanCursor(r1, s1);
    const c2 = new ScanCursor(r2, s2);
    // Does record `o` of a side equal the archive entry in kind, size, mode, link target and that side's stamps?
    const sameAsArchive = (strings: Buffer, records: Float64Array, o: number, a: ArchiveEntry, side: Side): boolean =>
      KIND_OF_CODE[records[o]!] === a.kind &&
      records[o + 5] === a.sizeBytes &&
      records[o + 4] === a.mode &&
      records[o + 6] === (side === 1 ? a.mtime1Ms : a.mtime2Ms) &&
      records[o + 7] === (side === 1 ? a.ctime1Ms : a.ctime2Ms) &&
      records[o + 8] === (side === 1 ? a.inode1 : a.inode2) &&
      (records[o] !== SCAN_SYMLINK || textOf(strings, records, o) === a.linkTarget);
    // Paths that differ and whose subtrees are therefore made states too (a decision on them may govern their
    // descendants). A parent comes before its children, and a directory's entries come together: one lookup of
    // the parent per directory.
    const opened = new Set<string>();
    let lastParent = '';
    let lastParentOpened = false;
    c1.next();
    c2.next();
    while (c1.path !== undefined || c2.path !== undefined) {
      const order = c1.path === undefined ? 1 : c2.path === undefined ? -1 : comparePaths(c1.path, c2.path);
      const path = (order <= 0 ? c1.path : c2.path)!;
      const has1 = order <= 0;
      const has2 = order >= 0;
      let underOpened = false;
      if (opened.size > 0) {
        const slash = path.lastIndexOf('/');
        if (slash > 0) {
          if (slash !== lastParent.length || !path.startsWith(lastParent)) {
            lastParent = path.slice(0, slash);
            lastParentOpened = opened.has(lastParent);
          }
          underOpened = lastParentOpened;
        }
      }
      const a = has1 && has2 ? archive.get(path) : undefined;
      if (allowClean && !underOpened && a !== undefined && sameAsArchive(s1, r1, c1.offset, a, 1) && sameAsArchive(s2, r2, c2.offset, a, 2)) {
        clean.add(a);
        if (a.kind === 'file') cleanSizes.add(a.sizeBytes);
      } else if (
        !(packer !== undefined && has1 !== has2 && !archive.has(path) && (has1 ? packer.packNew(1, r1, c1.offset, path) : packer.packNew(2, r2, c2.offset, path)))
      ) {
        // (A packed new path needs nothing in `opened`: nothing below it is on the other side, so nothing is clean.)
        const state = newState(path, undefined);
        if (has1) state.e1 = packedEntry(r1, c1.offset, path, textOf(s1, r1, c1.offset));
        if (has2) state.e2 = packedEntry(r2, c2.offset, path, textOf(s2, r2, c2.offset));
        states.set(path, state);
        if (packer !== undefined && state.e1 !== undefined && state.e2 !== undefined) packer.noteBothSides(path, state.e1, state.e2);
        // A directory that differs from the archive only in its stamps is "unchanged" on both sides: no decision
        // on it, nothing it could govern. Anything else keeps its subtree out of the clean set.
        const stampsOnly =
          !underOpened &&
          allowClean &&
          a?.kind === 'dir' &&
          state.e1?.kind === 'dir' &&
          state.e2?.kind === 'dir' &&
          state.e1.mode === a.mode &&
          state.e2.mode === a.mode;
        if (!stampsOnly) opened.add(path);
      }
      if (has1) c1.next();
      if (has2) c2.next();
    }
  }
}
