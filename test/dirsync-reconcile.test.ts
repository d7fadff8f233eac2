// Reconciliation on its own (src/dirsync/reconcile/reconcile.ts): given classified states, as update detection
// hands them on, the plan is the one unison's rules give. No file system: the states are written out here.
import { describe, expect, it } from 'vitest';
import type { ArchiveEntry } from '../src/dirsync/archive/file.js';
import { newState, type PathState } from '../src/dirsync/detect/detection.js';
import { conflictName, reconcile, type ReconcileOptions } from '../src/dirsync/reconcile/reconcile.js';
import type { ScanEntry } from '../src/dirsync/replica.js';
import type { ChangeKind } from '../src/dirsync/types.js';

const options: ReconcileOptions = { copyOnConflict: false, perms: true, times: false };

function file(path: string, fingerprint: string, mtimeMs = 1000, mode = 0o644): { entry: ScanEntry; fingerprint: string } {
  return { entry: { path, kind: 'file', sizeBytes: fingerprint.length, mtimeMs, ctimeMs: mtimeMs, inode: 1, mode }, fingerprint };
}

function dir(path: string, mode = 0o755): { entry: ScanEntry; fingerprint: undefined } {
  return { entry: { path, kind: 'dir', sizeBytes: 0, mtimeMs: 1000, ctimeMs: 1000, inode: 2, mode }, fingerprint: undefined };
}

function archived(kind: 'file' | 'dir', fingerprint = '', mode = kind === 'dir' ? 0o755 : 0o644): ArchiveEntry {
  return { kind, sizeBytes: fingerprint.length, fingerprint, mode, linkTarget: '', mtime1Ms: 1000, ctime1Ms: 1000, inode1: 1, mtime2Ms: 1000, ctime2Ms: 1000, inode2: 1 };
}

type Side = ReturnType<typeof file> | ReturnType<typeof dir> | undefined;

/** A state as update detection leaves it: both sides' entries, fingerprints, archive entry and changes. */
function state(path: string, a: ArchiveEntry | undefined, s1: Side, s2: Side, change1: ChangeKind, change2: ChangeKind): PathState {
  const s = newState(path, a);
  s.e1 = s1?.entry;
  s.e2 = s2?.entry;
  s.fp1 = s1?.fingerprint;
  s.fp2 = s2?.fingerprint;
  s.change1 = change1;
  s.change2 = change2;
  return s;
}

function plan(states: PathState[], overrides: Partial<ReconcileOptions> = {}): Record<string, string> {
  const map = new Map(states.map((s) => [s.path, s]));
  const out: Record<string, string> = {};
  for (const action of reconcile(map, { ...options, ...overrides }, new Date('2026-11-22T07:05:00Z'))) {
    const { item } = action;
    // "action [from] [resolvedBy] [conflict copy name]"; `from` only once a side wins.
    out[item.path] = [item.action, item.from, item.resolvedBy, action.keepLoserAs].filter((part) => part !== undefined).join(' ');
  }
  return out;
}

describe('reconcile', () => {
  it('a change on one side is propagated from it; unchanged paths get no item and are refreshed', () => {
    const same = state('same', archived('file', 'aa'), file('same', 'aa'), file('same', 'aa'), 'unchanged', 'unchanged');
    const edited = state('edited', archived('file', 'aa'), file('edited', 'aa'), file('edited', 'bb'), 'unchanged', 'modified');
    const added = state('added', undefined, file('added', 'cc'), undefined, 'new', 'absent');
    const removed = state('removed', archived('file', 'dd'), file('removed', 'dd'), undefined, 'unchanged', 'deleted');
    expect(plan([same, edited, added, removed])).toEqual({ edited: 'copy 2', added: 'copy 1', removed: 'delete 2' });
    expect(same.refresh).toBe(true);
    expect(edited.action?.item.path).toBe('edited'); // each action is also its state's
  });

  it('both sides changed: equal content is no conflict, different content is, deletion on both drops the path', () => {
    const converged = state('converged', archived('file', 'aa'), file('converged', 'bb'), file('converged', 'bb'), 'modified', 'modified');
    const diverged = state('diverged', archived('file', 'aa'), file('diverged', 'bb'), file('diverged', 'cc'), 'modified', 'modified');
    const bothNew = state('both-new', undefined, file('both-new', 'bb'), file('both-new', 'cc'), 'new', 'new');
    const gone = state('gone', archived('file', 'aa'), undefined, undefined, 'deleted', 'deleted');
    const result = reconcile(new Map([converged, diverged, bothNew, gone].map((s) => [s.path, s])), options);
    const byPath = Object.fromEntries(result.map((action) => [action.item.path, action.item]));
    expect(byPath.converged!.action).toBe('equal');
    expect(byPath.diverged!).toMatchObject({ action: 'conflict', reason: 'changed on both sides' });
    expect(byPath['both-new']!).toMatchObject({ action: 'conflict', reason: 'new file on both sides with different contents' });
    expect(byPath.gone!.action).toBe('equal');
  });

  it('a directory deleted on one side while its contents changed on the other is a conflict, its subtree skipped', () => {
    const states = [
      state('d', archived('dir'), dir('d'), undefined, 'unchanged', 'deleted'),
      state('d/kept', archived('file', 'aa'), file('d/kept', 'bb'), undefined, 'modified', 'deleted'),
      state('d/other', archived('file', 'cc'), file('d/other', 'cc'), undefined, 'unchanged', 'deleted'),
    ];
    expect(plan(states)).toEqual({ d: 'conflict' });
  });

  it('--prefer resolves a conflict; on a directory the winner is imposed on the subtree; copy-on-conflict names the loser', () => {
    const states = () => [
      state('d', archived('dir'), dir('d'), undefined, 'unchanged', 'deleted'),
      state('d/kept', archived('file', 'aa'), file('d/kept', 'bb'), undefined, 'modified', 'deleted'),
      state('f.txt', archived('file', 'aa'), file('f.txt', 'bb', 2000), file('f.txt', 'cc', 3000), 'modified', 'modified'),
    ];
    expect(plan(states(), { prefer: 1 })).toEqual({ d: 'conflict 1 root1', 'd/kept': 'copy 1 parent', 'f.txt': 'conflict 1 root1' });
    expect(plan(states(), { prefer: 'newer', copyOnConflict: true })).toEqual({
      // newer never picks a deletion over an edit: the side that still has the path wins.
      d: 'conflict 1 newer',
      'd/kept': 'copy 1 parent',
      'f.txt': `conflict 2 newer ${conflictName('f.txt', new Date('2026-11-22T07:05:00Z'))}`,
    });
    expect(conflictName('a/report.txt', new Date('2026-11-22T07:05:00Z'))).toBe('a/report (conflict 20261122T070500Z).txt');
  });

  it('permissions: one side changed them, they propagate; both changed them differently, a conflict', () => {
    const one = state('one', archived('file', 'aa'), file('one', 'aa', 1000, 0o600), file('one', 'aa'), 'props', 'unchanged');
    const both = state('both', archived('file', 'aa'), file('both', 'aa', 1000, 0o600), file('both', 'aa', 1000, 0o640), 'props', 'props');
    expect(plan([one, both])).toEqual({ one: 'props 1', both: 'conflict' });
    // Without --perms the modes are no decision at all.
    expect(plan([state('one', archived('file', 'aa'), file('one', 'aa', 1000, 0o600), file('one', 'aa'), 'unchanged', 'unchanged')], { perms: false })).toEqual({});
  });

  it('a state under an unlistable directory decides nothing, nor does its subtree', () => {
    const unknown = state('u', archived('dir'), dir('u'), dir('u'), 'absent', 'absent');
    unknown.unknown = true;
    const below = state('u/f', archived('file', 'aa'), file('u/f', 'bb'), file('u/f', 'aa'), 'modified', 'unchanged');
    expect(plan([unknown, below])).toEqual({});
  });
});
