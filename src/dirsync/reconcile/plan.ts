// The plan as the user and the CLI see it: the actions' items and the packed new paths' items in path order
// (made only when asked), and the deletion-safety check that may stop a run before anything is propagated.
import type { Detection } from '../detect/detection.js';
import { entryOf } from '../detect/path-state.js';
import type { PlanItem, SyncResult } from '../types.js';
import type { Action } from './reconcile.js';

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
