// Update detection on its own (src/dirsync/detect/): packed scans written out here (no file system) joined with
// an archive give the three kinds of path detection hands on (states, clean paths, packed new paths); hashing
// and classification then give each state its change per side. The replicas are stand-ins that only hash.
import { describe, expect, it } from 'vitest';
import type { ArchiveEntry } from '../src/dirsync/archive/file.js';
import { Detection } from '../src/dirsync/detect/detection.js';
import { joinScans } from '../src/dirsync/detect/scan.js';
import { detectUpdates } from '../src/dirsync/detect/updates.js';
import type { HashResult, Replica } from '../src/dirsync/replica.js';
import { SCAN_DIR, SCAN_FILE, type PackedScan } from '../src/native/scan.js';
import { engineOptions } from './dirsync-helpers.js';

interface Record {
  path: string;
  kind: 'file' | 'dir';
  size?: number;
  mtime?: number;
  mode?: number;
}

/** A packed scan of `records`, given in scan order (a directory's entries, then its subdirectories' subtrees). */
function packed(records: Record[]): PackedScan {
  const F = 9;
  const numbers = new Float64Array(records.length * F);
  let bytes = 0;
  const pieces: Buffer[] = [];
  records.forEach((record, index) => {
    const piece = Buffer.from(record.path);
    pieces.push(piece);
    bytes += piece.length;
    const o = index * F;
    numbers[o] = record.kind === 'file' ? SCAN_FILE : SCAN_DIR;
    numbers[o + 1] = -1;
    numbers[o + 2] = bytes; // path end
    numbers[o + 3] = bytes; // text end (no text)
    numbers[o + 4] = record.mode ?? (record.kind === 'dir' ? 0o755 : 0o644);
    numbers[o + 5] = record.size ?? 0;
    numbers[o + 6] = record.mtime ?? 1000;
    numbers[o + 7] = record.mtime ?? 1000;
    numbers[o + 8] = 7;
  });
  return { strings: Buffer.concat(pieces), records: numbers };
}

function archived(kind: 'file' | 'dir', size = 0, fingerprint = ''): ArchiveEntry {
  const mode = kind === 'dir' ? 0o755 : 0o644;
  return { kind, sizeBytes: size, fingerprint, mode, linkTarget: '', mtime1Ms: 1000, ctime1Ms: 1000, inode1: 7, mtime2Ms: 1000, ctime2Ms: 1000, inode2: 7 };
}

/** A replica that only hashes: fingerprints from `contents` (path -> fingerprint), stats from `scan`. */
function hasher(scan: Record[], contents: Record<string, string>, asked: string[]): Replica {
  return {
    async hashFiles(paths: string[]): Promise<Array<HashResult | null>> {
      asked.push(...paths);
      return paths.map((path) => {
        const record = scan.find((r) => r.path === path)!;
        return {
          fingerprint: contents[path]!,
          stat: { kind: 'file', sizeBytes: record.size ?? 0, mtimeMs: record.mtime ?? 1000, ctimeMs: record.mtime ?? 1000, inode: 7, mode: 0o644 },
        };
      });
    },
  } as unknown as Replica;
}

describe('update detection', () => {
  // Side 1: the archive's tree unchanged, plus a new directory with a file. Side 2: one file edited (new mtime),
  // one deleted. The archive also lists a path gone from both sides.
  const side1: Record[] = [
    { path: 'a', kind: 'dir' },
    { path: 'new', kind: 'dir' },
    { path: 'a/edited', kind: 'file', size: 4 },
    { path: 'a/removed', kind: 'file', size: 5 },
    { path: 'a/same', kind: 'file', size: 3 },
    { path: 'new/f', kind: 'file', size: 11 },
  ];
  const side2: Record[] = [
    { path: 'a', kind: 'dir', mtime: 2000 },
    { path: 'a/edited', kind: 'file', size: 4, mtime: 2000 },
    { path: 'a/same', kind: 'file', size: 3 },
  ];
  const archive = () =>
    new Map<string, ArchiveEntry>([
      ['a', archived('dir')],
      ['a/same', archived('file', 3, 'f-same')],
      ['a/edited', archived('file', 4, 'f-old')],
      ['a/removed', archived('file', 5, 'f-removed')],
      ['gone', archived('file', 6, 'f-gone')],
    ]);

  it('the join: clean paths get no state, new paths on one side are packed, everything else is a state', () => {
    const detection = new Detection();
    const replicas = [{}, {}] as unknown as [Replica, Replica];
    const problems = joinScans(detection, { packed: [packed(side1), packed(side2)] }, archive(), { options: engineOptions('/nonexistent'), replicas, packNewPaths: true });
    expect(problems.map((set) => set.size)).toEqual([0, 0]);
    // 'a' differs only in its stamps (a directory): a state, unchanged, that keeps its subtree joinable.
    expect([...detection.states.keys()]).toEqual(['a', 'a/edited', 'a/removed', 'gone']);
    expect(detection.cleanCount()).toBe(1); // a/same
    expect(detection.newCount()).toBe(2); // new, new/f
    const newPaths = detection.newPaths!;
    expect([0, 1].map((k) => [newPaths.path(k), newPaths.side(k), newPaths.isDir(k)])).toEqual([
      ['new', 1, true],
      ['new/f', 1, false],
    ]);
    expect(newPaths.item(1)).toMatchObject({ path: 'new/f', action: 'copy', from: 1, change1: 'new', change2: 'absent', status: 'planned' });
    // The plan's order puts each packed path among the states where the object path would have it.
    expect([...detection.planOrder()].map((next) => (typeof next === 'number' ? newPaths.path(next) : next.path))).toEqual(['a', 'new', 'a/edited', 'a/removed', 'new/f', 'gone']);
  });

  it('without packing (a dry run, or no native copy) the new paths are states too', () => {
    const detection = new Detection();
    const replicas = [{}, {}] as unknown as [Replica, Replica];
    joinScans(detection, { packed: [packed(side1), packed(side2)] }, archive(), { options: engineOptions('/nonexistent'), replicas, packNewPaths: false });
    expect(detection.newPaths).toBeUndefined();
    expect([...detection.states.keys()]).toEqual(['a', 'new', 'a/edited', 'a/removed', 'new/f', 'gone']);
  });

  it('a scan out of path order is joined path by path: every path a state, nothing clean or packed', () => {
    const detection = new Detection();
    const replicas = [{}, {}] as unknown as [Replica, Replica];
    const shuffled = [side1[0]!, side1[1]!, side1[4]!, side1[2]!, side1[3]!, side1[5]!];
    joinScans(detection, { packed: [packed(shuffled), packed(side2)] }, archive(), { options: engineOptions('/nonexistent'), replicas, packNewPaths: true });
    expect(detection.cleanCount() + detection.newCount()).toBe(0);
    expect([...detection.states.keys()].sort()).toEqual(['a', 'a/edited', 'a/removed', 'a/same', 'gone', 'new', 'new/f']);
  });

  it('hashes only what the fast check cannot vouch for, and classifies each side', async () => {
    const detection = new Detection();
    const options = engineOptions('/nonexistent');
    const asked: [string[], string[]] = [[], []];
    const replicas: [Replica, Replica] = [hasher(side1, {}, asked[0]), hasher(side2, { 'a/edited': 'f-new' }, asked[1])];
    const problems = joinScans(detection, { packed: [packed(side1), packed(side2)] }, archive(), { options, replicas, packNewPaths: true });
    await detectUpdates(detection, replicas, problems, options);
    expect(asked).toEqual([[], ['a/edited']]);
    const changes = Object.fromEntries([...detection.states.values()].map((s) => [s.path, `${s.change1} ${s.change2}`]));
    expect(changes).toEqual({ a: 'unchanged unchanged', 'a/edited': 'unchanged modified', 'a/removed': 'unchanged deleted', gone: 'deleted deleted' });
    expect(detection.states.get('a/edited')!.fp2).toBe('f-new');
  });

  it('a state under an unlistable directory is unknown: neither hashed nor classified', async () => {
    const detection = new Detection();
    const options = engineOptions('/nonexistent');
    const asked: [string[], string[]] = [[], []];
    const replicas: [Replica, Replica] = [hasher(side1, {}, asked[0]), hasher(side2, { 'a/edited': 'f-new' }, asked[1])];
    // The object path: the states as a replica's scan makes them, the problem paths beside them.
    joinScans(detection, [new Set(), new Set(['a'])], archive(), { options, replicas, packNewPaths: false });
    await detectUpdates(detection, replicas, [new Set(), new Set(['a'])], options);
    expect(asked).toEqual([[], []]);
    expect(detection.states.get('a/edited')).toMatchObject({ unknown: true, change1: 'absent', change2: 'absent' });
    expect(detection.states.get('gone')).toMatchObject({ unknown: false, change1: 'deleted', change2: 'deleted' });
  });
});
