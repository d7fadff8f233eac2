// Propagation on its own (src/dirsync/propagate/): a plan made here from hand-written states (no scan, no
// archive file) is carried out on two real local roots: creates parents first, deletions, a rename recognised by
// its content and done as a local copy on the target before the old path is deleted, and the final stamps of the
// directories it wrote into. Also how a file is planned to travel (file-plan.ts).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { ArchiveEntry } from '../src/dirsync/archive/file.js';
import { Detection, newState, type PathState } from '../src/dirsync/detect/detection.js';
import { LocalReplica } from '../src/dirsync/local.js';
import { planFileOp } from '../src/dirsync/propagate/file-plan.js';
import { Propagation } from '../src/dirsync/propagate/propagate.js';
import { reconcile, type Action } from '../src/dirsync/reconcile/reconcile.js';
import type { Replica, ScanEntry } from '../src/dirsync/replica.js';
import { engineOptions, mkTemp, snapshot } from './dirsync-helpers.js';

const temps: string[] = [];
afterEach(() => {
  for (const dir of temps.splice(0)) fs.rmSync(dir, { recursive: true, force: true });
});

function write(root: string, rel: string, content: string): void {
  fs.mkdirSync(path.dirname(path.join(root, rel)), { recursive: true });
  fs.writeFileSync(path.join(root, rel), content);
}

/** The archive entry of a file both sides hold as scanned now. */
function archivedAs(e1: ScanEntry, e2: ScanEntry, fingerprint: string): ArchiveEntry {
  return {
    kind: 'file', sizeBytes: e1.sizeBytes, fingerprint, mode: e1.mode, linkTarget: '',
    mtime1Ms: e1.mtimeMs, ctime1Ms: e1.ctimeMs, inode1: e1.inode, mtime2Ms: e2.mtimeMs, ctime2Ms: e2.ctimeMs, inode2: e2.inode,
  };
}

describe('propagation', () => {
  it('carries out a plan on two local roots: creates, a deletion, and a rename as a local copy', async () => {
    const dir = mkTemp('drbdts-propagate-');
    temps.push(dir);
    const [a, b] = [path.join(dir, 'a'), path.join(dir, 'b')];
    write(a, 'n.txt', 'new on a\n');
    write(a, 'd/f.txt', 'inside a new directory\n');
    write(a, 'renamed.txt', 'moved content\n');
    write(b, 'orig.txt', 'moved content\n'); // renamed on a: deleted there, new under its new name
    write(b, 'old.txt', 'deleted on a\n');
    const replicas: [Replica, Replica] = [new LocalReplica(a), new LocalReplica(b)];
    await Promise.all(replicas.map((replica) => replica.open()));
    const stat = async (side: 1 | 2, rel: string): Promise<ScanEntry> => ({ ...(await replicas[side - 1]!.stat(rel))!, path: rel });
    const [moved] = await replicas[1].hashFiles(['orig.txt']);
    const [old] = await replicas[1].hashFiles(['old.txt']);

    const detection = new Detection();
    const add = (state: PathState): void => void detection.states.set(state.path, state);
    for (const rel of ['n.txt', 'd', 'd/f.txt', 'renamed.txt']) {
      const state = newState(rel, undefined);
      state.e1 = await stat(1, rel);
      state.change1 = 'new';
      if (rel === 'renamed.txt') state.fp1 = moved!.fingerprint;
      add(state);
    }
    for (const [rel, hashed] of [['orig.txt', moved!], ['old.txt', old!]] as const) {
      const e2 = await stat(2, rel);
      const state = newState(rel, archivedAs(e2, e2, hashed.fingerprint));
      state.e2 = e2;
      state.fp2 = hashed.fingerprint;
      state.change1 = 'deleted';
      state.change2 = 'unchanged';
      add(state);
    }
    const actions = reconcile(detection.states, engineOptions(dir));
    expect(actions.map((action) => `${action.item.path} ${action.item.action} ${action.from}`)).toEqual([
      'n.txt copy 1', 'd copy 1', 'd/f.txt copy 1', 'renamed.txt copy 1', 'orig.txt delete 1', 'old.txt delete 1',
    ]);

    const propagation = new Propagation(replicas, engineOptions(dir), detection);
    await propagation.run(actions);
    expect(actions.every((action) => action.item.status === 'done')).toBe(true);
    expect(snapshot(b)).toEqual(snapshot(a));
    expect(actions.find((action) => action.item.path === 'renamed.txt')!.item.transfer).toBe('local');
    // What the archive needs: every created path's result on the target, and the new stamps of 'd' on side 2.
    for (const action of actions.filter((x) => x.item.action === 'copy')) {
      expect(action.resultStat !== undefined || action.resultRow >= 0).toBe(true);
    }
    expect(propagation.finalDirStats[1].get('d')?.mtimeMs).toBe(fs.statSync(path.join(b, 'd')).mtimeMs);
    expect(propagation.connectionLost).toBeUndefined();
  });

  it('plans a delta only toward a remote side, for files past the threshold, and keeps the target mode without --perms', () => {
    const state = newState('big.bin', undefined);
    const entry = (side: number, size: number, mode: number): ScanEntry => ({ path: 'big.bin', kind: 'file', sizeBytes: size, mtimeMs: side, ctimeMs: side, inode: side, mode });
    state.e1 = entry(1, 1 << 20, 0o600);
    state.e2 = entry(2, 1 << 20, 0o644);
    state.fp1 = 'x';
    // A copy from side 1 over side 2's older version, as reconciliation makes it.
    const copy: Action = {
      item: { path: 'big.bin', action: 'copy', from: 1, change1: 'modified', change2: 'unchanged', status: 'planned' },
      state, from: 1, target: state.e2, resultStat: undefined, resultFingerprint: undefined, resultRow: -1,
    };
    const index: [Map<string, PathState>, Map<string, PathState>] = [new Map(), new Map()];
    expect(planFileOp(copy, index, engineOptions('/nonexistent')).delta).toBeUndefined();
    const remote = engineOptions('/nonexistent', { local: [true, false], perms: false });
    const op = planFileOp(copy, index, remote);
    expect(op.delta).toBe(true);
    expect(op.mode).toBe(0o644);
    expect(planFileOp(copy, index, { ...remote, deltaThresholdBytes: 2 << 20 }).delta).toBeUndefined();
  });
});
