// Reconciliation: from each state's change on both sides (update detection, detect/), decide what to do with the
// path, in path order so that a decision on a directory governs its subtree (unison's recon.ml). A path changed
// on one side only is propagated from that side; changed on both, it is equal, a props decision, or a conflict,
// which --prefer resolves or which is skipped with its subtree. The result is the plan: one Action per path that
// has an item. Clean paths and packed new paths (detect/detection.ts) need no decision and never come here.
// Below the rules: the plan as the user and the CLI see it (the actions' items and the packed new paths' items in
// path order, made only when asked), and the deletion-safety check that may stop a run before propagation.
import { type Detection, entryOf, type PathState } from '../detect/detection.js';
import type { EntryStat, ScanEntry } from '../replica.js';
import { modeOf, other, parentOf, TIME_TOLERANCE_MS, type PlanItem, type Side, type SyncOptions, type SyncResult } from '../types.js';

export interface Action {
  item: PlanItem;
  state: PathState;
  /** Side that wins (copy, delete, props). */
  from: Side;
  /** Rename the loser to this conflict name before changing the path (copy-on-conflict). */
  keepLoserAs?: string;
  /** Entry the target had at scan time (precondition), or undefined (absent). */
  target?: ScanEntry;
  /** The target holds a different kind that must be removed before the create. */
  removeTargetFirst?: boolean;
  /** After a successful propagation: the target side's final stat, and (files) the installed content's
   * fingerprint, for the archive. Fields of the action rather than maps keyed by it: one fewer hash-table entry
   * per path (every path of an initial sync has an action). */
  resultStat: EntryStat | undefined;
  resultFingerprint: string | undefined;
  /** A native copy's result instead (its row in propagation's CopyResults, -1 for none): numbers, not objects. */
  resultRow: number;
}

/** The options reconciliation reads. */
export type ReconcileOptions = Pick<SyncOptions, 'prefer' | 'copyOnConflict' | 'perms' | 'times'>;

/** The conflict copy's name of `path`: "report (conflict 20261122T0705Z).txt". */
export function conflictName(path: string, now: Date): string {
  const stamp = now.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
  const slash = path.lastIndexOf('/');
  const dir = slash === -1 ? '' : path.slice(0, slash + 1);
  const name = path.slice(slash + 1);
  const dot = name.lastIndexOf('.');
  // Keep the extension last so the copy still opens with the right program.
  return dot > 0
    ? `${dir}${name.slice(0, dot)} (conflict ${stamp})${name.slice(dot)}`
    : `${dir}${name} (conflict ${stamp})`;
}

function contentEqual(state: PathState): boolean {
  const { e1, e2 } = state;
  if (e1 === undefined || e2 === undefined || e1.kind !== e2.kind) return false;
  if (e1.kind === 'dir') return true;
  if (e1.kind === 'symlink') return e1.linkTarget === e2.linkTarget;
  return state.fp1 !== undefined && state.fp1 === state.fp2 && e1.sizeBytes === e2.sizeBytes;
}

/**
 * The plan of `states` (classified by update detection, in path order): an Action per path with an item; a
 * path unchanged on both sides gets none and is marked `refresh` (the archive keeps it, with its new stamps).
 * Each action is also its state's `action`.
 */
export function reconcile(states: Map<string, PathState>, options: ReconcileOptions, now = new Date()): Action[] {
  const actions = new Reconciler(options).run(states, now);
  for (const action of actions) action.state.action = action;
  return actions;
}

class Reconciler {
  constructor(private readonly options: ReconcileOptions) {}

  run(states: Map<string, PathState>, now: Date): Action[] {
    // Sides on which a path has a changed descendant: a directory deleted on one side while something below it
    // changed on the other is a conflict on the directory (unison's behaviour), not a silent deletion.
    const changedBelow: [Set<string>, Set<string>] = [new Set(), new Set()];
    for (const state of states.values()) {
      for (const side of [1, 2] as const) {
        const change = side === 1 ? state.change1 : state.change2;
        if (change === 'new' || change === 'modified' || change === 'deleted' || change === 'props' || state.unknown) {
          for (let current = parentOf(state.path); current !== ''; current = parentOf(current)) {
            if (changedBelow[side - 1].has(current)) break;
            changedBelow[side - 1].add(current);
          }
        }
      }
    }
    // Decisions on a directory that govern its subtree: 'skip' (conflict or unknown), or a forced winner side.
    const governing = new Map<string, 'skip' | Side>();
    const actions: Action[] = [];
    for (const [path, state] of states) {
      let governed: 'skip' | Side | undefined;
      if (governing.size > 0) {
        for (let current = parentOf(path); current !== ''; current = parentOf(current)) {
          governed = governing.get(current);
          if (governed !== undefined) break;
        }
      }
      if (governed === 'skip') {
        governing.set(path, 'skip');
        continue;
      }
      if (state.unknown) {
        governing.set(path, 'skip');
        continue;
      }
      const { change1, change2 } = state;
      const changed1 = change1 !== 'unchanged' && change1 !== 'absent';
      const changed2 = change2 !== 'unchanged' && change2 !== 'absent';
      if (governed === undefined && !changed1 && !changed2) {
        // Unchanged on both sides (the bulk of a run): no plan item, only an archive refresh of the stamps.
        state.refresh = true;
        continue;
      }
      // Every field that decideFrom and the propagation set on most paths is there from the start (undefined is
      // left out of the JSON output): a property added later moves the object's fields to a separate store,
      // ~40 bytes more per path (100,000 of them on an initial sync).
      const item: PlanItem = {
        path,
        action: 'equal',
        from: undefined,
        change1: state.change1,
        change2: state.change2,
        kind1: state.e1?.kind,
        kind2: state.e2?.kind,
        status: 'planned',
        transfer: undefined,
      };
      const action: Action = {
        item,
        state,
        from: 1,
        keepLoserAs: undefined,
        target: undefined,
        removeTargetFirst: undefined,
        resultStat: undefined,
        resultFingerprint: undefined,
        resultRow: -1,
      };
      if (governed !== undefined) {
        // Inside a conflict resolved in favour of `governed`: that side's state is imposed on the whole subtree.
        if (!this.decideFrom(action, governed)) continue;
        item.resolvedBy = 'parent';
        actions.push(action);
        continue;
      }
      let conflict: string | undefined;
      if (changed1 && changed2) {
        if (state.e1 === undefined && state.e2 === undefined) {
          item.action = 'equal'; // deleted on both sides: drop from the archive
          actions.push(action);
          continue;
        }
        if (contentEqual(state)) {
          const props = this.propsDecision(state);
          if (props === 'conflict') conflict = 'permissions changed differently on both sides';
          else {
            if (props !== undefined) {
              item.action = 'props';
              action.from = props;
              item.from = props;
              action.target = entryOf(state, other(props));
            }
            actions.push(action);
            continue;
          }
        } else if (state.e1 === undefined || state.e2 === undefined) conflict = 'deleted on one side, changed on the other';
        else if (state.e1.kind !== state.e2.kind) conflict = `${state.e1.kind} on one side, ${state.e2.kind} on the other`;
        else if (state.e1.kind === 'symlink') conflict = 'symbolic link retargeted differently on both sides';
        else conflict = state.a === undefined ? 'new file on both sides with different contents' : 'changed on both sides';
      } else {
        const winner: Side = changed1 ? 1 : 2;
        const loser = other(winner);
        const winnerEntry = entryOf(state, winner);
        const loserEntry = entryOf(state, loser);
        // Replacing or deleting a directory of the loser whose subtree changed there: conflict.
        if (loserEntry?.kind === 'dir' && winnerEntry?.kind !== 'dir' && changedBelow[loser - 1].has(path)) {
          conflict = `directory ${winnerEntry === undefined ? 'deleted' : 'replaced'} on one side, its contents changed on the other`;
        } else {
          if (this.decideFrom(action, winner)) actions.push(action);
          continue;
        }
      }
      // A conflict: resolve with --prefer, or skip it (with its subtree).
      item.action = 'conflict';
      item.reason = conflict;
      const winner = this.preferredSide(state);
      if (winner === undefined) {
        governing.set(path, 'skip');
        actions.push(action);
        continue;
      }
      item.resolvedBy = this.options.prefer === 'newer' || this.options.prefer === 'older' ? this.options.prefer : `root${winner}`;
      if (!this.decideFrom(action, winner)) {
        item.action = 'equal';
        actions.push(action);
        continue;
      }
      const loserEntry = entryOf(state, other(winner));
      if (this.options.copyOnConflict && loserEntry !== undefined) {
        action.keepLoserAs = conflictName(path, now);
      }
      if (entryOf(state, winner)?.kind === 'dir' || loserEntry?.kind === 'dir') governing.set(path, winner);
      actions.push(action);
    }
    return actions;
  }

  /** Props resolution between two equal contents: which side's props to propagate, or conflict. */
  private propsDecision(state: PathState): Side | 'conflict' | undefined {
    const { e1, e2, a } = state;
    if (e1 === undefined || e2 === undefined) return undefined;
    let from: Side | undefined;
    if (this.options.perms && modeOf(e1) !== modeOf(e2)) {
      const m1Changed = a === undefined || modeOf(e1) !== (e1.kind === 'symlink' ? 0 : a.mode);
      const m2Changed = a === undefined || modeOf(e2) !== (e2.kind === 'symlink' ? 0 : a.mode);
      if (m1Changed && m2Changed) return 'conflict';
      from = m1Changed ? 1 : 2;
    }
    if (from === undefined && this.options.times && e1.kind === 'file' && Math.abs(e1.mtimeMs - e2.mtimeMs) >= TIME_TOLERANCE_MS) {
      from = e1.mtimeMs > e2.mtimeMs ? 1 : 2; // both touched: the later time wins (no content at stake)
    }
    return from;
  }

  /** Fill in an action propagating `winner`'s state. Returns false when there is nothing to do. */
  private decideFrom(action: Action, winner: Side): boolean {
    const { state, item } = action;
    const winnerEntry = entryOf(state, winner);
    const loserEntry = entryOf(state, other(winner));
    action.from = winner;
    item.from = winner;
    action.target = loserEntry;
    if (winnerEntry === undefined) {
      if (loserEntry === undefined) return false;
      if (item.action !== 'conflict') item.action = 'delete';
      return true;
    }
    if (loserEntry !== undefined && winnerEntry.kind === loserEntry.kind && contentEqual(state)) {
      const change = winner === 1 ? state.change1 : state.change2;
      if (change === 'props' || this.propsDiffer(winnerEntry, loserEntry)) {
        if (item.action !== 'conflict') item.action = 'props';
        return true;
      }
      if (item.action !== 'conflict') item.action = 'equal';
      return true;
    }
    if (item.action !== 'conflict') item.action = 'copy';
    action.removeTargetFirst = loserEntry !== undefined && (loserEntry.kind === 'dir' || winnerEntry.kind === 'dir');
    return true;
  }

  private propsDiffer(winner: EntryStat, loser: EntryStat): boolean {
    if (this.options.perms && modeOf(winner) !== modeOf(loser)) return true;
    return this.options.times && winner.kind === 'file' && Math.abs(winner.mtimeMs - loser.mtimeMs) >= TIME_TOLERANCE_MS;
  }

  private preferredSide(state: PathState): Side | undefined {
    const { prefer } = this.options;
    if (prefer === undefined) return undefined;
    if (prefer === 1 || prefer === 2) return prefer;
    const { e1, e2 } = state;
    // newer/older never pick a deletion over an edit: the side that still has the path wins (no data lost).
    if (e1 === undefined) return 2;
    if (e2 === undefined) return 1;
    if (e1.mtimeMs === e2.mtimeMs) return undefined;
    const newer: Side = e1.mtimeMs > e2.mtimeMs ? 1 : 2;
    return prefer === 'newer' ? newer : other(newer);
  }
}

// ---- the plan as shown ----------------------------------------------------------------------------------------

const PLAN_CHUNK_ITEMS = 4096;

/** The plan's items, `size` at a time, in path order. */
function* itemChunks(detection: Detection, size: number): Generator<PlanItem[]> {
  const { newPaths } = detection;
  let chunk: PlanItem[] = [];
  for (const next of detection.planOrder()) {
    if (typeof next === 'number') chunk.push(newPaths!.item(next));
    else if (next.action !== undefined) chunk.push(next.action.item);
    else continue;
    if (chunk.length >= size) {
      yield chunk;
      chunk = [];
    }
  }
  if (chunk.length > 0) yield chunk;
}

/** result.items and result.itemChunks: the actions' items, with packed new paths' made only when asked. */
export function exposeItems(result: SyncResult, actions: Action[], detection: Detection): void {
  Object.defineProperty(result, 'itemChunks', { value: (size: number) => itemChunks(detection, size), enumerable: false });
  if (detection.newCount() === 0) {
    result.items = actions.map((action) => action.item);
    return;
  }
  // Same key, same place in the object: JSON.stringify(result) gives the bytes it gave with an array.
  Object.defineProperty(result, 'items', {
    get: () => {
      const items: PlanItem[] = [];
      for (const chunk of itemChunks(detection, PLAN_CHUNK_ITEMS)) for (const item of chunk) items.push(item);
      return items;
    },
    enumerable: true,
    configurable: true,
  });
}

/**
 * Warnings that stop a batch run: a side that holds nothing any more while the archive remembers content (a
 * missing mount, a wiped disk), whose propagation would delete everything on the other side.
 */
export function deletionSafety(actions: Action[], detection: Detection, rootIds: [string, string]): string[] {
  const warnings: string[] = [];
  if (detection.archiveSize() === 0) return warnings;
  for (const side of [1, 2] as const) {
    const deletes = actions.filter((action) => action.item.action === 'delete' && action.from === side);
    if (deletes.length === 0) continue;
    let remaining = detection.cleanCount() + (detection.newPaths?.perSide[side - 1] ?? 0); // a clean path is present on both sides
    for (const state of detection.states.values()) if (entryOf(state, side) !== undefined) remaining++;
    if (remaining === 0) {
      warnings.push(`root ${side} (${rootIds[side - 1]}) was emptied: it would delete ${deletes.length} paths on the other side`);
    }
  }
  return warnings;
}
