// The native bulk scan (native/src/dirsync_scan.cc via src/native/scan.ts) must give exactly what the JavaScript
// walk of LocalReplica.scan gives: same entries, same order, same stats (the precondition re-check compares a
// scanned stat with a later fs.lstatSync), same problems. Both are run on the same real trees and compared.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { LocalReplica, statToEntry } from '../src/dirsync/local.js';
import type { ScanBatch } from '../src/dirsync/replica.js';
import { nativeScanAvailable } from '../src/native/scan.js';
import { mkTemp, repoRoot, write } from './dirsync-helpers.js';

async function collect(root: string, native: boolean): Promise<ScanBatch> {
  const saved = process.env.DRBDTS_DIRSYNC_NATIVE_SCAN;
  process.env.DRBDTS_DIRSYNC_NATIVE_SCAN = native ? '1' : '0';
  try {
    const all: ScanBatch = { entries: [], problems: [] };
    for await (const batch of new LocalReplica(root).scan({ ignore: [] })) {
      all.entries.push(...batch.entries);
      all.problems.push(...batch.problems);
    }
    return all;
  } finally {
    if (saved === undefined) delete process.env.DRBDTS_DIRSYNC_NATIVE_SCAN;
    else process.env.DRBDTS_DIRSYNC_NATIVE_SCAN = saved;
  }
}

const temps: string[] = [];
afterEach(() => {
  for (const dir of temps.splice(0)) fs.rmSync(dir, { recursive: true, force: true });
});

describe('dirsync native scan', () => {
  it('is built and used', () => {
    expect(nativeScanAvailable()).toBe(true);
  });

  it('gives the same entries, order and stats as the JavaScript walk', async () => {
    const root = mkTemp('drbdts-scan-');
    temps.push(root);
    // Names chosen for the sort order: ASCII, Latin-1, a BMP character above U+E000 and a supplementary one
    // (UTF-16 and UTF-8 byte order disagree on these two), a prefix of another name.
    const names = ['b', 'a', 'B', 'ab', 'a b', 'é', '\uE000x', '\uFFFDy', '😀z', 'zz', '10', '9', '.hidden'];
    for (const name of names) write(root, `top/${name}`, `content of ${name}\n`);
    write(root, 'top/sub/deep/er/file.txt', 'deep\n', { mode: 0o600, mtimeMs: 1_600_000_000_123.456 });
    write(root, 'big.bin', Buffer.alloc(3 << 20, 7));
    write(root, 'empty', '');
    fs.mkdirSync(path.join(root, 'emptydir'));
    fs.chmodSync(path.join(root, 'emptydir'), 0o751);
    fs.symlinkSync('top/a', path.join(root, 'link'));
    fs.symlinkSync('nowhere/at all', path.join(root, 'top', 'dangling'));
    fs.symlinkSync('x'.repeat(3000), path.join(root, 'longlink'));
    spawnSync('mkfifo', [path.join(root, 'top', 'fifo')]); // not synced by either walk
    // A temp file of a live process: skipped (and kept) by both walks.
    write(root, `top/.a.drbdts-tmp-${process.pid}-1`, 'temp\n');
    const js = await collect(root, false);
    const native = await collect(root, true);
    expect(native.problems).toEqual(js.problems);
    expect(native.entries.map((e) => e.path)).toEqual(js.entries.map((e) => e.path));
    expect(native.entries).toEqual(js.entries);
    expect(js.entries.length).toBeGreaterThan(names.length + 8);
    expect(js.entries.some((e) => e.path === 'top/fifo' || e.path.includes('drbdts-tmp'))).toBe(false);
    expect(fs.existsSync(path.join(root, `top/.a.drbdts-tmp-${process.pid}-1`))).toBe(true);
    // Each scanned stat equals a fresh lstat of the path (what checkPrecondition compares with sameStat).
    for (const entry of native.entries) {
      const { path: rel, ...stat } = entry;
      expect(stat).toEqual(statToEntry(fs.lstatSync(path.join(root, rel)), path.join(root, rel)));
    }
  });

  it('removes the stale temp file of a dead process, like the JavaScript walk', async () => {
    const root = mkTemp('drbdts-scan-');
    temps.push(root);
    const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
    const deadPid = Number(dead.stdout);
    write(root, 'd/keep.txt', 'keep\n');
    write(root, `d/.keep.txt.drbdts-tmp-${deadPid}-3`, 'leftover\n');
    const native = await collect(root, true);
    expect(native.entries.map((e) => e.path)).toEqual(['d', 'd/keep.txt']);
    expect(fs.readdirSync(path.join(root, 'd'))).toEqual(['keep.txt']);
  });

  it('reports a name that is not valid UTF-8 and an unlistable directory as problems, like the JavaScript walk', async () => {
    const root = mkTemp('drbdts-scan-');
    temps.push(root);
    fs.chmodSync(root, 0o777);
    write(root, 'ok.txt', 'fine\n');
    write(root, 'locked/inner.txt', 'inner\n');
    fs.chmodSync(path.join(root, 'locked'), 0o700);
    fs.writeFileSync(Buffer.concat([Buffer.from(root + '/bad-'), Buffer.from([0xff, 0xfe]), Buffer.from('.txt')]), 'bad name\n');
    // The unlistable directory needs a user that is not root: the same scan, in a child process as nobody.
    const script = `
      import { LocalReplica } from ${JSON.stringify(path.join(repoRoot, 'dist/dirsync/local.js'))};
      const all = { entries: [], problems: [] };
      for await (const b of new LocalReplica(process.argv[1]).scan({ ignore: [] })) { all.entries.push(...b.entries); all.problems.push(...b.problems); }
      process.stdout.write(JSON.stringify(all));`;
    const asNobody = (native: boolean) => {
      const child = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '--input-type=module', '-e', script, root], {
        encoding: 'utf8',
        env: { ...process.env, DRBDTS_DIRSYNC_NATIVE_SCAN: native ? '1' : '0' },
      });
      expect(child.status, child.stderr).toBe(0);
      return JSON.parse(child.stdout) as ScanBatch;
    };
    const js = asNobody(false);
    const native = asNobody(true);
    expect(native).toEqual(js);
    expect(native.problems.map((p) => p.path)).toEqual(['bad-\uFFFD\uFFFD.txt', 'locked']);
    expect(native.problems[1]!.message).toMatch(/^cannot list directory: EACCES/);
    expect(native.entries.map((e) => e.path)).toEqual(['locked', 'ok.txt']);
  });
});
