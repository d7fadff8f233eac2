// What update detection knows of one path that needs a decision: its scan entries on both sides, its archive
// entry, the fingerprints it needed, and how each side changed. The paths that need none (clean paths, packed new
// paths) never become one; see detection.ts.
import type { ArchiveEntry } from '../archive/file.js';
import type { Action } from '../reconcile/reconcile.js';
import type { ScanEntry } from '../replica.js';
import type { ChangeKind, Side } from '../types.js';

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
