// How each file travels: a local copy of content the target side already holds (a rename or copy recognised by
// its fingerprint), a delta against the target's old version (a remote side), or the full content. The copy-local
// index maps the fingerprints some copy needs to a target-side path that holds them.
import { type Detection, entryOf, fingerprintOf, newState, type PathState } from '../detect/detection.js';
import type { ArchiveEntry } from '../archive/file.js';
import type { Action } from '../reconcile/reconcile.js';
import { comparePaths, other, type SyncOptions } from '../types.js';
import type { FileOp } from './fileop.js';

const DEFAULT_DELTA_THRESHOLD_BYTES = 256 * 1024;

/** Per side, a fingerprint's first holder in path order among the paths whose content some copy may reuse. */
export type CopyIndex = [Map<string, PathState>, Map<string, PathState>];

/**
 * The copy-local index of `work`'s copies, and the target-side paths it will read (`sources`, "side:path"),
 * whose deletion must wait until the copies are done. Only the fingerprints some copy needs are indexed (the
 * first path holding each, in path order).
 */
export function buildCopyIndex(work: Action[], detection: Detection): { index: CopyIndex; sources: Set<string> } {
  const wanted: [Set<string>, Set<string>] = [new Set(), new Set()];
  // Their sizes too: equal content has equal size, so most clean files are passed over without a string.
  const wantedSizes = new Set<number>();
  for (const action of work) {
    if (action.item.action !== 'copy' && action.item.action !== 'conflict') continue;
    const fp = fingerprintOf(action.state, action.from);
    if (fp === undefined) continue;
    wanted[other(action.from) - 1].add(fp);
    const source = entryOf(action.state, action.from);
    if (source?.kind === 'file') wantedSizes.add(source.sizeBytes);
  }
  const index: CopyIndex = [new Map(), new Map()];
  if (wanted[0].size > 0 || wanted[1].size > 0) {
    for (const state of detection.states.values()) {
      if (state.unknown) continue;
      for (const side of [1, 2] as const) {
        const fp = fingerprintOf(state, side);
        if (fp === undefined || !wanted[side - 1].has(fp)) continue;
        const entry = entryOf(state, side);
        if (entry?.kind === 'file' && entry.sizeBytes > 0 && !index[side - 1].has(fp)) index[side - 1].set(fp, state);
      }
    }
    if (detection.cleanCount() > 0) indexCleanFiles(detection, wanted, wantedSizes, index);
  }
  const sources = new Set<string>();
  for (const action of work) {
    if (action.item.action !== 'copy' && action.item.action !== 'conflict') continue;
    const fp = fingerprintOf(action.state, action.from);
    if (fp === undefined) continue;
    const local = index[other(action.from) - 1].get(fp);
    if (local !== undefined && local.path !== action.item.path) sources.add(`${other(action.from)}:${local.path}`);
  }
  return { index, sources };
}

/**
 * Add the clean files (packed scans) to the copy-local index: a clean file holds the archive's fingerprint and
 * stamps on both sides. Among all paths with a fingerprint the first in path order is taken, as for states.
 */
function indexCleanFiles(detection: Detection, wanted: [Set<string>, Set<string>], wantedSizes: Set<number>, index: CopyIndex): void {
  const add = (path: string, a: ArchiveEntry): void => {
    for (const side of [1, 2] as const) {
      if (!wanted[side - 1].has(a.fingerprint)) continue;
      const known = index[side - 1].get(a.fingerprint);
      if (known !== undefined && comparePaths(known.path, path) < 0) continue;
      const state = newState(path, a);
      state.e1 = { path, kind: 'file', sizeBytes: a.sizeBytes, mtimeMs: a.mtime1Ms, ctimeMs: a.ctime1Ms, inode: a.inode1, mode: a.mode };
      state.e2 = { path, kind: 'file', sizeBytes: a.sizeBytes, mtimeMs: a.mtime2Ms, ctimeMs: a.ctime2Ms, inode: a.inode2, mode: a.mode };
      state.fp1 = a.fingerprint;
      state.fp2 = a.fingerprint;
      index[side - 1].set(a.fingerprint, state);
    }
  };
  detection.forEachCleanFile(wantedSizes, (fingerprint) => wanted[0].has(fingerprint) || wanted[1].has(fingerprint), add);
}

/** Decide how a file or link travels: a local copy on the target, a delta, or the full content. */
export function planFileOp(action: Action, index: CopyIndex, options: SyncOptions): FileOp {
  const sourceSide = action.from;
  const targetSide = other(sourceSide);
  const source = entryOf(action.state, sourceSide)!;
  // Keep the target's own permission bits on update when permissions are not synced.
  const mode = !options.perms && action.target?.kind === 'file' ? action.target.mode : source.mode;
  const op: FileOp = { path: action.item.path, source, precondition: action.target ?? 'absent', mode };
  if (options.times && source.kind === 'file') op.mtimeMs = source.mtimeMs;
  if (source.kind !== 'file') return op;
  const knownFingerprint = fingerprintOf(action.state, sourceSide);
  if (knownFingerprint !== undefined) {
    const local = index[targetSide - 1].get(knownFingerprint);
    const localEntry = local === undefined ? undefined : entryOf(local, targetSide);
    if (local !== undefined && localEntry !== undefined && local.path !== action.item.path) {
      op.local = { fromPath: local.path, fromStat: localEntry, fingerprint: knownFingerprint };
    }
  }
  const remote = !options.local[0] || !options.local[1];
  const threshold = options.deltaThresholdBytes ?? DEFAULT_DELTA_THRESHOLD_BYTES;
  if (remote && action.target?.kind === 'file' && action.target.sizeBytes >= threshold && source.sizeBytes >= threshold) op.delta = true;
  return op;
}
