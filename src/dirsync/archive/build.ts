// The new archive after propagation: exactly the paths that synced. Clean paths keep their entries (copied from
// the loaded table as runs of bytes in table mode), unchanged paths get their new stamps, synced paths their
// final stats on both sides, and failed, skipped or conflicting paths what the archive knew before. Nothing is
// written when the result equals the loaded archive (the common cron case).
import { type Detection, entryOf, fingerprintOf, type PathState, TABLE_CLEAN } from '../detect/detection.js';
import { NEW_DONE } from '../detect/new-paths.js';
import type { PropagationResults } from '../propagate/results.js';
import type { Action } from '../reconcile/reconcile.js';
import type { EntryStat } from '../replica.js';
import { other, type Side } from '../types.js';
import { ArchiveBuilder, saveArchive, saveArchiveBuilder, type ArchiveEntry } from './file.js';

type Put = (path: string, entry: ArchiveEntry) => void;

/** The results of a run that propagated nothing (propagation's modules are then never loaded). */
export const NOTHING_PROPAGATED: PropagationResults = {
  copies: { stat: () => undefined, fingerprint: () => undefined },
  newDirStats: new Map(),
  finalDirStats: [new Map(), new Map()],
};

/** The archive entry of a path unchanged on both sides: the same object when no stamp moved (no allocation). */
function refreshed(a: ArchiveEntry, e1: EntryStat, e2: EntryStat): ArchiveEntry {
  if (
    a.mtime1Ms === e1.mtimeMs &&
    a.ctime1Ms === e1.ctimeMs &&
    a.inode1 === e1.inode &&
    a.mtime2Ms === e2.mtimeMs &&
    a.ctime2Ms === e2.ctimeMs &&
    a.inode2 === e2.inode
  ) {
    return a;
  }
  return {
    ...a,
    mtime1Ms: e1.mtimeMs,
    ctime1Ms: e1.ctimeMs,
    inode1: e1.inode,
    mtime2Ms: e2.mtimeMs,
    ctime2Ms: e2.ctimeMs,
    inode2: e2.inode,
  };
}

/** A clean directory's entry with the final stamps the propagation gave it (on the sides it wrote into). */
function refreshedDir(a: ArchiveEntry, final1: EntryStat | undefined, final2: EntryStat | undefined): ArchiveEntry {
  return refreshed(
    a,
    final1 ?? { kind: 'dir', sizeBytes: 0, mtimeMs: a.mtime1Ms, ctimeMs: a.ctime1Ms, inode: a.inode1, mode: a.mode },
    final2 ?? { kind: 'dir', sizeBytes: 0, mtimeMs: a.mtime2Ms, ctimeMs: a.ctime2Ms, inode: a.inode2, mode: a.mode },
  );
}

export function archivesEqual(before: Map<string, ArchiveEntry>, after: Map<string, ArchiveEntry>): boolean {
  if (before.size !== after.size) return false;
  for (const [path, entry] of after) {
    const old = before.get(path);
    if (old === entry) continue;
    if (
      old === undefined ||
      old.kind !== entry.kind ||
      old.sizeBytes !== entry.sizeBytes ||
      old.fingerprint !== entry.fingerprint ||
      old.mode !== entry.mode ||
      old.linkTarget !== entry.linkTarget ||
      old.mtime1Ms !== entry.mtime1Ms ||
      old.ctime1Ms !== entry.ctime1Ms ||
      old.inode1 !== entry.inode1 ||
      old.mtime2Ms !== entry.mtime2Ms ||
      old.ctime2Ms !== entry.ctime2Ms ||
      old.inode2 !== entry.inode2
    ) {
      return false;
    }
  }
  return true;
}

/** Where the archive goes and what it describes. */
export interface ArchiveTarget {
  file: string;
  swapped: boolean;
  roots: { root1Id: string; root2Id: string };
}

/** Build the new archive from the run's phases and write it, unless it equals the loaded one. */
export async function commitArchive(target: ArchiveTarget, detection: Detection, actions: Action[], results: PropagationResults): Promise<void> {
  // Nothing changed (the common cron case): skip building the new archive, the write and its two fsyncs. (The
  // engine checks the same before it loads this module at all.)
  if (actions.length === 0 && detection.archiveUnchanged()) return;
  const build = new ArchiveBuild(detection, results);
  const { file, swapped, roots } = target;
  if (detection.flags !== undefined) {
    // Table mode: clean entries are copied as they are from the loaded file; an identical result is not written.
    await saveArchiveBuilder(file, swapped, roots, build.table(swapped), detection.table);
  } else if (detection.archive.size === 0) {
    // No archive before (a first sync): the entries go straight to the encoder, no map of them; an empty
    // result is an unchanged (absent) archive, as archivesEqual would find.
    const builder = new ArchiveBuilder(swapped);
    build.entries((path, entry) => builder.add(path, entry));
    if (builder.count > 0) await saveArchiveBuilder(file, swapped, roots, builder);
  } else {
    const newArchive = new Map<string, ArchiveEntry>();
    build.entries((path, entry) => void newArchive.set(path, entry));
    if (!archivesEqual(detection.archive, newArchive)) await saveArchive(file, swapped, roots, newArchive);
  }
}

export class ArchiveBuild {
  constructor(private readonly detection: Detection, private readonly results: PropagationResults) {}

  /** The new archive's entries, in order, given to `put` (each path once). Map mode. */
  entries(put: Put): void {
    const { clean, states, archive } = this.detection;
    if (clean === undefined) {
      // (Every path a state: nothing was packed, and every state's path is either archived or not.)
      for (const [path, state] of states) this.recordPath(path, state, state.action, put);
      return;
    }
    // Packed scans: the old archive's order (parents first) with clean entries kept as they are, then the paths
    // the archive did not know, in state order (parents first; a new path's parent is new or in the archive).
    const [finals1, finals2] = this.results.finalDirStats;
    for (const [path, a] of archive) {
      if (!clean.has(a)) {
        const state = states.get(path)!;
        this.recordPath(path, state, state.action, put);
        continue;
      }
      // A clean directory the propagation wrote into has new stamps on that side.
      const final1 = a.kind === 'dir' ? finals1.get(path) : undefined;
      const final2 = a.kind === 'dir' ? finals2.get(path) : undefined;
      if (final1 === undefined && final2 === undefined) put(path, a);
      else put(path, refreshedDir(a, final1, final2));
    }
    this.recordUnarchived(put);
  }

  /**
   * The new archive in table mode: the loaded table's order, clean entries copied from it as they are (runs of
   * bytes, no object), a clean directory the propagation wrote into with its new stamps, every other entry from
   * its state; then the paths the archive did not know, in state order.
   */
  table(swapped: boolean): ArchiveBuilder {
    const table = this.detection.table!;
    const flags = this.detection.flags!;
    const { states } = this.detection;
    const builder = new ArchiveBuilder(swapped);
    const put = (path: string, entry: ArchiveEntry): void => builder.add(path, entry);
    const [finals1, finals2] = this.results.finalDirStats;
    const dirsTouched = finals1.size > 0 || finals2.size > 0;
    const { count, kinds } = table;
    for (let index = 0; index < count; index++) {
      if (flags[index] !== TABLE_CLEAN) {
        const path = table.path(index);
        const state = states.get(path)!;
        this.recordPath(path, state, state.action, put);
        continue;
      }
      if (dirsTouched && kinds[index] === 0x64) {
        const path = table.path(index);
        const final1 = finals1.get(path);
        const final2 = finals2.get(path);
        if (final1 !== undefined || final2 !== undefined) {
          put(path, refreshedDir(table.entry(index), final1, final2));
          continue;
        }
      }
      // A run of clean entries (all but a few, usually) is copied as one piece; a directory whose stamps this run
      // may have moved ends a run.
      let end = index + 1;
      while (end < count && flags[end] === TABLE_CLEAN && (!dirsTouched || kinds[end] !== 0x64)) end++;
      builder.copyRun(table, index, end);
      index = end - 1;
    }
    this.recordUnarchived(put);
    return builder;
  }

  /** The new archive's entries of the paths the old archive did not have: states and packed new paths, in the
   * plan's order (as the object path would record their states). */
  private recordUnarchived(put: Put): void {
    const { detection } = this;
    if (detection.newCount() === 0) {
      for (const [path, state] of detection.states) if (state.a === undefined) this.recordPath(path, state, state.action, put);
      return;
    }
    for (const next of detection.planOrder()) {
      if (typeof next === 'number') this.recordNew(next, put);
      else if (next.a === undefined) this.recordPath(next.path, next, next.action, put);
    }
  }

  /** The archive entry of packed new path `k`, as recordPath makes it for a copy to an absent path: only when it
   * synced (a failed or skipped path had no archive entry, and gets none). */
  private recordNew(k: number, put: Put): void {
    const newPaths = this.detection.newPaths!;
    if (newPaths.status[k] !== NEW_DONE) return;
    const from = newPaths.side(k);
    const path = newPaths.path(k);
    const winner: EntryStat = newPaths.entry(k);
    let targetStat: EntryStat | undefined;
    let fingerprint = '';
    if (winner.kind === 'dir') targetStat = this.results.newDirStats.get(k);
    else {
      const row = newPaths.rows[k]!;
      targetStat = this.results.copies.stat(row);
      fingerprint = this.results.copies.fingerprint(row) ?? '';
      if (targetStat === undefined || fingerprint === '') throw new Error(`dirsync: ${path} was copied without a result`);
    }
    if (targetStat === undefined) throw new Error(`dirsync: ${path} was created without a result`);
    const [s1, s2] = from === 1 ? [winner, targetStat] : [targetStat, winner];
    put(path, this.syncedEntry(path, from, s1, s2, fingerprint));
  }

  /** The archive entry of a path synced to stats s1 and s2 (a directory's final stamps, when its contents changed
   * after it was created, replace its stat), with `from`'s kind, size, mode and link target. */
  private syncedEntry(path: string, from: Side | undefined, s1: EntryStat, s2: EntryStat, fingerprint: string | undefined): ArchiveEntry {
    const { finalDirStats } = this.results;
    if (s1.kind === 'dir') s1 = finalDirStats[0].get(path) ?? s1;
    if (s2.kind === 'dir') s2 = finalDirStats[1].get(path) ?? s2;
    const source = from === 2 ? s2 : s1;
    return {
      kind: source.kind,
      sizeBytes: source.kind === 'file' ? source.sizeBytes : 0,
      fingerprint: source.kind === 'file' ? fingerprint ?? '' : '',
      mode: source.mode,
      linkTarget: source.linkTarget ?? '',
      mtime1Ms: s1.mtimeMs,
      ctime1Ms: s1.ctimeMs,
      inode1: s1.inode,
      mtime2Ms: s2.mtimeMs,
      ctime2Ms: s2.ctimeMs,
      inode2: s2.inode,
    };
  }

  /** The new archive's entry of one path (a state), if it has one. */
  private recordPath(path: string, state: PathState, action: Action | undefined, put: Put): void {
    const { finalDirStats, copies } = this.results;
    if (action === undefined) {
      if (state.refresh === true && state.a !== undefined && state.e1 !== undefined && state.e2 !== undefined) {
        const e1 = state.e1.kind === 'dir' ? finalDirStats[0].get(path) ?? state.e1 : state.e1;
        const e2 = state.e2.kind === 'dir' ? finalDirStats[1].get(path) ?? state.e2 : state.e2;
        put(path, refreshed(state.a, e1, e2));
        return;
      }
      // Skipped (under a conflict or unknown) or nothing on either side: the archive keeps what it knew.
      if (state.a !== undefined) put(path, state.a);
      return;
    }
    const { item } = action;
    const resolved = item.action === 'conflict' && item.resolvedBy !== undefined;
    if (item.status === 'failed' || (item.action === 'conflict' && !resolved) || item.status === 'skipped') {
      if (state.a !== undefined) put(path, state.a); // keep what the archive knew
      return;
    }
    let s1: EntryStat | undefined;
    let s2: EntryStat | undefined;
    let fingerprint: string | undefined;
    if (item.action === 'equal' && item.from === undefined) {
      s1 = state.e1;
      s2 = state.e2;
      fingerprint = state.fp1 ?? state.fp2;
      if (s1 === undefined || s2 === undefined) return; // deleted on both, or refresh of a one-sided path
      if (s1.kind === 'file' && (state.fp1 === undefined || state.fp2 === undefined || state.fp1 !== state.fp2)) {
        if (state.a !== undefined) put(path, state.a); // keep what the archive knew
        return;
      }
    } else {
      const winner = entryOf(state, action.from);
      if (winner === undefined) return; // deletion propagated: gone from both sides
      const targetStat = action.resultStat ?? copies.stat(action.resultRow) ?? entryOf(state, other(action.from));
      if (targetStat === undefined) {
        if (state.a !== undefined) put(path, state.a); // keep what the archive knew
        return;
      }
      fingerprint = action.resultFingerprint ?? copies.fingerprint(action.resultRow) ?? fingerprintOf(state, action.from);
      if (winner.kind === 'file' && fingerprint === undefined) {
        if (state.a !== undefined) put(path, state.a); // keep what the archive knew
        return;
      }
      [s1, s2] = action.from === 1 ? [winner, targetStat] : [targetStat, winner];
    }
    put(path, this.syncedEntry(path, item.from, s1, s2, fingerprint));
  }
}
