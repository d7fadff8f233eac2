// Building the new archive on its own (src/dirsync/archive/build.ts): from states, their actions as propagation
// left them and propagation's results, the archive records exactly the paths that synced: new stats for a copy,
// new stamps for an unchanged path, the old entry for a failure or an unresolved conflict, nothing for a deletion.
import { describe, expect, it } from 'vitest';
import { ArchiveBuild } from '../src/dirsync/archive/build.js';
import type { ArchiveEntry } from '../src/dirsync/archive/file.js';
import { Detection, newState, type PathState } from '../src/dirsync/detect/detection.js';
import { CopyResults, type PropagationResults } from '../src/dirsync/propagate/results.js';
import type { Action } from '../src/dirsync/reconcile/reconcile.js';
import type { EntryStat, ScanEntry } from '../src/dirsync/replica.js';
import type { PlanItem } from '../src/dirsync/types.js';

function fileEntry(path: string, size: number, stamp: number): ScanEntry {
  return { path, kind: 'file', sizeBytes: size, mtimeMs: stamp, ctimeMs: stamp, inode: stamp, mode: 0o644 };
}

function archived(size: number, fingerprint: string, stamp = 1000): ArchiveEntry {
  return { kind: 'file', sizeBytes: size, fingerprint, mode: 0o644, linkTarget: '', mtime1Ms: stamp, ctime1Ms: stamp, inode1: stamp, mtime2Ms: stamp, ctime2Ms: stamp, inode2: stamp };
}

function act(state: PathState, item: Partial<PlanItem>, from: 1 | 2, result?: { stat: EntryStat; fingerprint?: string }): Action {
  const action: Action = {
    item: { path: state.path, action: 'copy', change1: 'unchanged', change2: 'unchanged', status: 'done', from, ...item },
    state,
    from,
    resultStat: result?.stat,
    resultFingerprint: result?.fingerprint,
    resultRow: -1,
  };
  state.action = action;
  return action;
}

const noResults: PropagationResults = { copies: new CopyResults(), newDirStats: new Map(), finalDirStats: [new Map(), new Map()] };

function build(states: PathState[], results = noResults): Map<string, ArchiveEntry> {
  const detection = new Detection();
  for (const state of states) {
    detection.states.set(state.path, state);
    if (state.a !== undefined) detection.archive.set(state.path, state.a);
  }
  const out = new Map<string, ArchiveEntry>();
  new ArchiveBuild(detection, results).entries((path, entry) => void out.set(path, entry));
  return out;
}

describe('archive build', () => {
  it('records what synced, keeps what did not, drops what was deleted', () => {
    const unchanged = newState('unchanged', archived(1, 'u'));
    unchanged.e1 = fileEntry('unchanged', 1, 1000);
    unchanged.e2 = fileEntry('unchanged', 1, 2000); // touched on side 2, same content
    unchanged.refresh = true;
    const copied = newState('copied', archived(1, 'old'));
    copied.e1 = fileEntry('copied', 2, 3000);
    copied.e2 = fileEntry('copied', 1, 1000);
    copied.fp1 = 'new';
    act(copied, {}, 1, { stat: fileEntry('copied', 2, 4000), fingerprint: 'new' });
    const failed = newState('failed', archived(1, 'f'));
    failed.e1 = fileEntry('failed', 5, 3000);
    failed.fp1 = 'g';
    act(failed, { status: 'failed' }, 1);
    const conflict = newState('conflict', archived(1, 'c'));
    act(conflict, { action: 'conflict', status: 'planned', from: undefined }, 1);
    const deleted = newState('deleted', archived(1, 'd'));
    deleted.e1 = fileEntry('deleted', 1, 1000);
    act(deleted, { action: 'delete' }, 2);
    const out = build([unchanged, copied, failed, conflict, deleted]);
    expect([...out.keys()]).toEqual(['unchanged', 'copied', 'failed', 'conflict']);
    expect(out.get('unchanged')).toMatchObject({ fingerprint: 'u', mtime1Ms: 1000, mtime2Ms: 2000, inode2: 2000 });
    expect(out.get('copied')).toMatchObject({ sizeBytes: 2, fingerprint: 'new', mtime1Ms: 3000, mtime2Ms: 4000 });
    expect(out.get('failed')).toBe(failed.a);
    expect(out.get('conflict')).toBe(conflict.a);
  });

  it('a copy made by the native back-end is recorded from its packed result row', () => {
    const copies = new CopyResults();
    copies.allocate(1);
    // One batch result: status, kind (file = 0), size, mtime, ctime, inode, mode; and its 16-digit fingerprint.
    const row = copies.add(Float64Array.from([0, 0, 9, 5000, 5000, 42, 0o600]), Buffer.from('0123456789abcdef', 'latin1'), 0);
    const state = newState('native', undefined);
    state.e2 = fileEntry('native', 9, 4000);
    const action = act(state, { change2: 'new' }, 2);
    action.resultRow = row;
    const out = build([state], { ...noResults, copies });
    expect(out.get('native')).toMatchObject({ sizeBytes: 9, fingerprint: '0123456789abcdef', mtime1Ms: 5000, inode1: 42, mtime2Ms: 4000 });
  });

  it('with nothing to do, the archive is unchanged unless some stamp moved', () => {
    const detection = new Detection();
    const still = newState('still', archived(1, 's'));
    still.e1 = fileEntry('still', 1, 1000);
    still.e2 = fileEntry('still', 1, 1000);
    still.refresh = true;
    detection.states.set('still', still);
    expect(detection.archiveUnchanged()).toBe(true);
    still.e2 = fileEntry('still', 1, 1500);
    expect(detection.archiveUnchanged()).toBe(false);
  });
});
