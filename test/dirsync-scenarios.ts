// The conformance scenarios of /work/shared/reference/unison-semantics.md as data, shared by the dirsync scenario
// tests (local and tcp:// roots) and the unison comparison test. Each scenario: an optional baseline (state
// synced once first, so the archive knows it), a change, the sync options, and the expected outcome, checked on
// the real trees after the run. Scenario 22 (process killed) and 23 (file modified during the sync) need fault
// injection and live in dirsync-kill.test.ts and dirsync-engine.test.ts.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { expect } from 'vitest';
import { exists, lstat, read, write, type Pair, type RunResult } from './dirsync-helpers.js';

export type Tool = 'dirsync' | 'unison';

export interface Scenario {
  id: string;
  title: string;
  /** State synced once (with the same options) before the change, so the archive records it; omitted for
   * first-sync scenarios. */
  baseline?: (pair: Pair) => void;
  change: (pair: Pair) => void | Record<string, unknown>;
  args?: (pair: Pair) => string[];
  /** Assertions on the trees after the run. `memo` is what change() returned (e.g. inodes before). */
  check: (pair: Pair, result: RunResult, tool: Tool, memo: Record<string, unknown>) => void;
  /** Exit code expected from both tools. */
  code: number;
  /** Why unison is not the reference for this scenario (documented in docs/dirsync.md); not run through unison. */
  unisonDiffers?: string;
}

const T0 = Date.UTC(2026, 0, 1, 12, 0, 0);

function isRemote(pair: Pair): boolean {
  return pair.rootB.startsWith('tcp://') || pair.rootB.startsWith('ssh://');
}

function item(result: RunResult, p: string): NonNullable<RunResult['json']>['items'][number] | undefined {
  return result.json?.items.find((candidate) => candidate.path === p);
}

export const scenarios: Scenario[] = [
  {
    id: '1',
    title: 'first sync, file only on A: copied to B',
    change: ({ a }) => write(a, 'only-a.txt', 'from A\n'),
    code: 0,
    check: ({ b }) => expect(read(b, 'only-a.txt')).toBe('from A\n'),
  },
  {
    id: '2',
    title: 'first sync, identical file on both: nothing to do',
    change: ({ a, b }) => {
      write(a, 'same.txt', 'identical\n');
      write(b, 'same.txt', 'identical\n');
      return { inodeB: lstat(b, 'same.txt').ino };
    },
    code: 0,
    check: ({ b }, result, tool, memo) => {
      expect(read(b, 'same.txt')).toBe('identical\n');
      expect(lstat(b, 'same.txt').ino).toBe(memo.inodeB); // not re-copied
      if (tool === 'dirsync') expect(result.json!.counts.propagated).toBe(0);
    },
  },
  {
    id: '3',
    title: 'first sync, file differs: conflict, skipped',
    change: ({ a, b }) => {
      write(a, 'f.txt', 'version A\n');
      write(b, 'f.txt', 'version B\n');
    },
    code: 1,
    check: ({ a, b }, result, tool) => {
      expect(read(a, 'f.txt')).toBe('version A\n');
      expect(read(b, 'f.txt')).toBe('version B\n');
      if (tool === 'dirsync') expect(item(result, 'f.txt')?.action).toBe('conflict');
    },
  },
  {
    id: '4',
    title: 'different new files on each side: union',
    change: ({ a, b }) => {
      write(a, 'from-a.txt', 'A\n');
      write(b, 'from-b.txt', 'B\n');
    },
    code: 0,
    check: ({ a, b }) => {
      expect(read(a, 'from-b.txt')).toBe('B\n');
      expect(read(b, 'from-a.txt')).toBe('A\n');
    },
  },
  {
    id: '5',
    title: 'same-named new directory on both, different children: merged',
    change: ({ a, b }) => {
      write(a, 'd/x.txt', 'x\n');
      write(b, 'd/y.txt', 'y\n');
    },
    code: 0,
    check: ({ a, b }) => {
      for (const root of [a, b]) {
        expect(read(root, 'd/x.txt')).toBe('x\n');
        expect(read(root, 'd/y.txt')).toBe('y\n');
      }
    },
  },
  {
    id: '6',
    title: 'edit on A only: A -> B',
    baseline: ({ a }) => write(a, 'doc.txt', 'old\n'),
    change: ({ a }) => write(a, 'doc.txt', 'new content\n'),
    code: 0,
    check: ({ b }) => expect(read(b, 'doc.txt')).toBe('new content\n'),
  },
  {
    id: '7a',
    title: 'different edits on both: conflict, skipped',
    baseline: ({ a }) => write(a, 'doc.txt', 'old\n'),
    change: ({ a, b }) => {
      write(a, 'doc.txt', 'edit A\n');
      write(b, 'doc.txt', 'edit B\n');
    },
    code: 1,
    check: ({ a, b }) => {
      expect(read(a, 'doc.txt')).toBe('edit A\n');
      expect(read(b, 'doc.txt')).toBe('edit B\n');
    },
  },
  {
    id: '7b',
    title: 'different edits on both, prefer newer: the later mtime wins',
    baseline: ({ a }) => write(a, 'doc.txt', 'old\n'),
    change: ({ a, b }) => {
      write(a, 'doc.txt', 'edit A (older)\n', { mtimeMs: T0 + 10_000 });
      write(b, 'doc.txt', 'edit B (newer)\n', { mtimeMs: T0 + 20_000 });
    },
    args: () => ['--prefer', 'newer'],
    code: 0,
    check: ({ a, b }) => {
      expect(read(a, 'doc.txt')).toBe('edit B (newer)\n');
      expect(read(b, 'doc.txt')).toBe('edit B (newer)\n');
    },
  },
  {
    id: '7c',
    title: 'different edits on both, prefer root A with copy-on-conflict: A wins, B keeps a conflict copy',
    baseline: ({ a }) => write(a, 'doc.txt', 'old\n'),
    change: ({ a, b }) => {
      write(a, 'doc.txt', 'edit A\n');
      write(b, 'doc.txt', 'edit B\n');
    },
    args: (pair) => ['--prefer', pair.rootA, '--copy-on-conflict'],
    code: 0,
    check: ({ a, b }) => {
      expect(read(a, 'doc.txt')).toBe('edit A\n');
      expect(read(b, 'doc.txt')).toBe('edit A\n');
      const copies = fs.readdirSync(b).filter((name) => name !== 'doc.txt' && name.startsWith('doc'));
      expect(copies.length).toBe(1);
      expect(read(b, copies[0]!)).toBe('edit B\n');
    },
  },
  {
    id: '8',
    title: 'identical edits on both: marked synced, nothing copied',
    baseline: ({ a }) => write(a, 'doc.txt', 'old\n'),
    change: ({ a, b }) => {
      write(a, 'doc.txt', 'same edit\n');
      write(b, 'doc.txt', 'same edit\n');
      return { inodeA: lstat(a, 'doc.txt').ino, inodeB: lstat(b, 'doc.txt').ino };
    },
    code: 0,
    check: ({ a, b }, result, tool, memo) => {
      expect(lstat(a, 'doc.txt').ino).toBe(memo.inodeA);
      expect(lstat(b, 'doc.txt').ino).toBe(memo.inodeB);
      expect(read(b, 'doc.txt')).toBe('same edit\n');
      if (tool === 'dirsync') expect(result.json!.counts.propagated).toBe(0);
    },
  },
  {
    id: '9',
    title: 'delete on A, B unchanged: deleted on B',
    baseline: ({ a }) => {
      write(a, 'gone.txt', 'bye\n');
      write(a, 'stays.txt', 'stay\n');
    },
    change: ({ a }) => fs.unlinkSync(path.join(a, 'gone.txt')),
    code: 0,
    check: ({ b }) => {
      expect(exists(b, 'gone.txt')).toBe(false);
      expect(read(b, 'stays.txt')).toBe('stay\n');
    },
  },
  {
    id: '10a',
    title: 'delete on A, edit on B: conflict',
    baseline: ({ a }) => {
      write(a, 'f.txt', 'old\n');
      write(a, 'other.txt', 'keep root non-empty\n');
    },
    change: ({ a, b }) => {
      fs.unlinkSync(path.join(a, 'f.txt'));
      write(b, 'f.txt', 'edited on B\n');
    },
    code: 1,
    check: ({ a, b }) => {
      expect(exists(a, 'f.txt')).toBe(false);
      expect(read(b, 'f.txt')).toBe('edited on B\n');
    },
  },
  {
    id: '10b',
    title: 'delete on A, edit on B, prefer newer: the edit survives',
    baseline: ({ a }) => {
      write(a, 'f.txt', 'old\n');
      write(a, 'other.txt', 'keep root non-empty\n');
    },
    change: ({ a, b }) => {
      fs.unlinkSync(path.join(a, 'f.txt'));
      write(b, 'f.txt', 'edited on B\n');
    },
    args: () => ['--prefer', 'newer'],
    code: 0,
    check: ({ a, b }) => {
      expect(read(a, 'f.txt')).toBe('edited on B\n');
      expect(read(b, 'f.txt')).toBe('edited on B\n');
    },
  },
  {
    id: '11',
    title: 'delete on both: nothing',
    baseline: ({ a }) => {
      write(a, 'f.txt', 'x\n');
      write(a, 'other.txt', 'y\n');
    },
    change: ({ a, b }) => {
      fs.unlinkSync(path.join(a, 'f.txt'));
      fs.unlinkSync(path.join(b, 'f.txt'));
    },
    code: 0,
    check: ({ a, b }, result, tool) => {
      expect(exists(a, 'f.txt')).toBe(false);
      expect(exists(b, 'f.txt')).toBe(false);
      if (tool === 'dirsync') expect(result.json!.counts.propagated).toBe(0);
    },
  },
  {
    id: '12',
    title: 'directory deleted on A, a file inside edited on B: conflict',
    baseline: ({ a }) => {
      write(a, 'd/f1.txt', 'one\n');
      write(a, 'd/f2.txt', 'two\n');
      write(a, 'other.txt', 'keep root non-empty\n');
    },
    change: ({ a, b }) => {
      fs.rmSync(path.join(a, 'd'), { recursive: true });
      write(b, 'd/f1.txt', 'edited on B\n');
    },
    code: 1,
    check: ({ a, b }) => {
      expect(read(b, 'd/f1.txt')).toBe('edited on B\n');
      expect(exists(a, 'd/f1.txt')).toBe(false);
    },
  },
  {
    id: '13',
    title: 'file replaced by a directory on A, B unchanged: replaced on B',
    baseline: ({ a }) => write(a, 'p', 'was a file\n'),
    change: ({ a }) => {
      fs.unlinkSync(path.join(a, 'p'));
      write(a, 'p/child.txt', 'inside\n');
    },
    code: 0,
    check: ({ b }) => {
      expect(lstat(b, 'p').isDirectory()).toBe(true);
      expect(read(b, 'p/child.txt')).toBe('inside\n');
    },
  },
  {
    id: '13r',
    title: 'directory replaced by a file on A, B unchanged: replaced on B',
    baseline: ({ a }) => write(a, 'p/child.txt', 'inside\n'),
    change: ({ a }) => {
      fs.rmSync(path.join(a, 'p'), { recursive: true });
      write(a, 'p', 'now a file\n');
    },
    code: 0,
    check: ({ b }) => {
      expect(lstat(b, 'p').isFile()).toBe(true);
      expect(read(b, 'p')).toBe('now a file\n');
    },
  },
  {
    id: '14',
    title: 'file -> directory on A, file edited on B: conflict',
    baseline: ({ a }) => write(a, 'p', 'file\n'),
    change: ({ a, b }) => {
      fs.unlinkSync(path.join(a, 'p'));
      write(a, 'p/child.txt', 'inside\n');
      write(b, 'p', 'edited on B\n');
    },
    code: 1,
    check: ({ a, b }) => {
      expect(read(b, 'p')).toBe('edited on B\n');
      expect(read(a, 'p/child.txt')).toBe('inside\n');
    },
  },
  {
    id: '15',
    title: 'rename on A: delete + create, content copied locally on B (not re-sent)',
    baseline: ({ a }) => write(a, 'old-name.bin', randomBytes(300_000)),
    change: ({ a }) => {
      const content = fs.readFileSync(path.join(a, 'old-name.bin'));
      fs.renameSync(path.join(a, 'old-name.bin'), path.join(a, 'new-name.bin'));
      return { content: content.toString('base64') };
    },
    code: 0,
    check: ({ b }, result, tool, memo) => {
      expect(exists(b, 'old-name.bin')).toBe(false);
      expect(fs.readFileSync(path.join(b, 'new-name.bin')).toString('base64')).toBe(memo.content);
      if (tool === 'dirsync') {
        expect(item(result, 'new-name.bin')?.transfer).toBe('local');
        expect(result.json!.bytesTransferred).toBe(0);
      }
    },
  },
  {
    id: '16',
    title: 'large file, small edit: temp + rename (delta transfer when a side is remote)',
    baseline: ({ a }) => write(a, 'big.bin', randomBytes(3 << 20)),
    change: ({ a }) => {
      const file = path.join(a, 'big.bin');
      const fd = fs.openSync(file, 'r+');
      fs.writeSync(fd, Buffer.from('a small edit in the middle'), 0, 26, 1_500_000);
      fs.closeSync(fd);
      return { content: fs.readFileSync(file).toString('base64') };
    },
    code: 0,
    check: (pair, result, tool, memo) => {
      expect(fs.readFileSync(path.join(pair.b, 'big.bin')).toString('base64')).toBe(memo.content);
      // No temp file left behind.
      expect(fs.readdirSync(pair.b).filter((name) => name.includes('drbdts-tmp'))).toEqual([]);
      if (tool === 'dirsync') expect(item(result, 'big.bin')?.transfer).toBe(isRemote(pair) ? 'delta' : 'full');
    },
  },
  {
    id: '17',
    title: 'empty file: created',
    change: ({ a }) => write(a, 'empty', ''),
    code: 0,
    check: ({ b }) => {
      expect(lstat(b, 'empty').isFile()).toBe(true);
      expect(lstat(b, 'empty').size).toBe(0);
    },
  },
  {
    id: '18a',
    title: 'chmod only: permissions propagated',
    baseline: ({ a }) => write(a, 'script.sh', 'echo hi\n', { mode: 0o644 }),
    change: ({ a }) => fs.chmodSync(path.join(a, 'script.sh'), 0o755),
    code: 0,
    check: ({ b }) => expect(lstat(b, 'script.sh').mode & 0o777).toBe(0o755),
  },
  {
    id: '18b',
    title: 'different chmods on both sides: conflict',
    baseline: ({ a }) => write(a, 'script.sh', 'echo hi\n', { mode: 0o644 }),
    change: ({ a, b }) => {
      fs.chmodSync(path.join(a, 'script.sh'), 0o755);
      fs.chmodSync(path.join(b, 'script.sh'), 0o600);
    },
    code: 1,
    check: ({ a, b }) => {
      expect(lstat(a, 'script.sh').mode & 0o777).toBe(0o755);
      expect(lstat(b, 'script.sh').mode & 0o777).toBe(0o600);
    },
  },
  {
    id: '19a',
    title: 'touch only: nothing',
    baseline: ({ a }) => write(a, 't.txt', 'content\n', { mtimeMs: T0 }),
    change: ({ a, b }) => {
      fs.utimesSync(path.join(a, 't.txt'), new Date(T0 + 100_000), new Date(T0 + 100_000));
      return { mtimeB: lstat(b, 't.txt').mtimeMs, inodeB: lstat(b, 't.txt').ino };
    },
    code: 0,
    check: ({ b }, result, tool, memo) => {
      expect(lstat(b, 't.txt').mtimeMs).toBe(memo.mtimeB);
      expect(lstat(b, 't.txt').ino).toBe(memo.inodeB);
      if (tool === 'dirsync') expect(result.json!.counts.propagated).toBe(0);
    },
  },
  {
    id: '19b',
    title: 'touch only with times sync on: the mtime is propagated',
    baseline: ({ a }) => write(a, 't.txt', 'content\n', { mtimeMs: T0 }),
    change: ({ a }) => fs.utimesSync(path.join(a, 't.txt'), new Date(T0 + 100_000), new Date(T0 + 100_000)),
    args: () => ['--times'],
    code: 0,
    check: ({ b }) => expect(Math.abs(lstat(b, 't.txt').mtimeMs - (T0 + 100_000))).toBeLessThan(1000),
  },
  {
    id: '20a',
    title: 'symlink retargeted: link propagated',
    baseline: ({ a }) => {
      write(a, 'target1', '1\n');
      write(a, 'target2', '2\n');
      fs.symlinkSync('target1', path.join(a, 'link'));
    },
    change: ({ a }) => {
      fs.unlinkSync(path.join(a, 'link'));
      fs.symlinkSync('target2', path.join(a, 'link'));
    },
    code: 0,
    check: ({ b }) => expect(fs.readlinkSync(path.join(b, 'link'))).toBe('target2'),
  },
  {
    id: '20b',
    title: 'symlink retargeted differently on both sides: conflict',
    baseline: ({ a }) => fs.symlinkSync('target1', path.join(a, 'link')),
    change: ({ a, b }) => {
      fs.unlinkSync(path.join(a, 'link'));
      fs.symlinkSync('target-a', path.join(a, 'link'));
      fs.unlinkSync(path.join(b, 'link'));
      fs.symlinkSync('target-b', path.join(b, 'link'));
    },
    code: 1,
    check: ({ a, b }) => {
      expect(fs.readlinkSync(path.join(a, 'link'))).toBe('target-a');
      expect(fs.readlinkSync(path.join(b, 'link'))).toBe('target-b');
    },
  },
  {
    id: '21',
    title: 'names with spaces, unicode, leading dashes: synced like any other',
    change: ({ a }) => {
      write(a, 'with space.txt', 's\n');
      write(a, 'ünïcødé-名前.txt', 'u\n');
      write(a, '-leading-dash', 'd\n');
      write(a, '--double/-x y', 'n\n');
    },
    code: 0,
    check: ({ b }) => {
      expect(read(b, 'with space.txt')).toBe('s\n');
      expect(read(b, 'ünïcødé-名前.txt')).toBe('u\n');
      expect(read(b, '-leading-dash')).toBe('d\n');
      expect(read(b, '--double/-x y')).toBe('n\n');
    },
  },
  {
    id: '24',
    title: 'replica root emptied: refused in batch mode, nothing deleted on the other side',
    baseline: ({ a }) => {
      write(a, 'one.txt', '1\n');
      write(a, 'sub/two.txt', '2\n');
    },
    change: ({ a }) => {
      for (const name of fs.readdirSync(a)) fs.rmSync(path.join(a, name), { recursive: true });
    },
    code: 3,
    check: ({ b }, result, tool) => {
      expect(read(b, 'one.txt')).toBe('1\n');
      expect(read(b, 'sub/two.txt')).toBe('2\n');
      if (tool === 'dirsync') expect(result.json!.fatal).toMatch(/emptied/);
    },
  },
  {
    id: '25',
    title: 'ignored paths: never touched on either side',
    change: ({ a, b }) => {
      write(a, 'keep.txt', 'k\n');
      write(a, 'x.tmp', 'A tmp\n');
      write(b, 'x.tmp', 'B tmp\n');
      write(a, 'cache/c1', 'c1\n');
      write(b, 'cache/c2', 'c2\n');
    },
    args: () => ['--ignore', 'Name *.tmp', '--ignore', 'BelowPath cache'],
    code: 0,
    check: ({ a, b }) => {
      expect(read(b, 'keep.txt')).toBe('k\n');
      expect(read(a, 'x.tmp')).toBe('A tmp\n');
      expect(read(b, 'x.tmp')).toBe('B tmp\n');
      expect(exists(b, 'cache/c1')).toBe(false);
      expect(exists(a, 'cache/c2')).toBe(false);
    },
  },
];
