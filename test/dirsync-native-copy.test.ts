// The native copy (native/src/dirsync_copy.cc via src/native/scan.ts) must keep every rule of LocalReplica's safe
// write: the source must be the file the scan saw, the target must still be absent (or the file the scan saw),
// content and fingerprint must be exact, and a refused or failed copy must leave the target as it was and no temp
// file behind. Each case calls the addon on real files and checks the result, the target and the directory.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { fingerprintOf } from '../src/dirsync/hash.js';
import { statToEntry } from '../src/dirsync/local.js';
import type { EntryStat } from '../src/dirsync/replica.js';
import { COPY_DONE, COPY_FAILURE_CODES, COPY_IN_FIELDS, COPY_OUT_FIELDS, nativeCopier } from '../src/native/scan.js';
import { localPair, mkTemp } from './dirsync-helpers.js';

const temps: string[] = [];
afterEach(() => {
  for (const dir of temps.splice(0)) fs.rmSync(dir, { recursive: true, force: true });
});

function roots(): { a: string; b: string } {
  const dir = mkTemp('drbdts-native-copy-');
  temps.push(dir);
  return localPair(dir);
}

function lstat(file: string): EntryStat {
  return statToEntry(fs.lstatSync(file), file);
}

interface Op {
  path: string;
  source: EntryStat;
  precondition?: EntryStat;
  mode?: number;
  mtimeMs?: number;
}

/** Run one batch through the addon and decode it the way the engine does. */
async function copy(a: string, b: string, ops: Op[]): Promise<Array<{ code: string; message: string; stat?: EntryStat; fingerprint?: string }>> {
  const copier = nativeCopier();
  expect(copier, 'the addon is built with dirsyncCopyFiles').toBeDefined();
  const numbers = new Float64Array(ops.length * COPY_IN_FIELDS);
  const ends = new Uint32Array(new ArrayBuffer(ops.length * 4));
  let bytes = 0;
  ops.forEach((op, k) => {
    const n = k * COPY_IN_FIELDS;
    numbers.set([op.source.sizeBytes, op.source.mtimeMs, op.source.inode], n);
    if (op.precondition !== undefined) numbers.set([1, op.precondition.sizeBytes, op.precondition.mtimeMs, op.precondition.inode], n + 3);
    numbers[n + 7] = op.mode ?? op.source.mode;
    numbers[n + 8] = op.mtimeMs ?? NaN;
    ends[k] = bytes += Buffer.byteLength(op.path);
  });
  const { results, fingerprints, messages } = await copier!(a, b, Buffer.from(ops.map((op) => op.path).join('')), ends, numbers, false);
  return ops.map((_, k) => {
    const o = k * COPY_OUT_FIELDS;
    const status = results[o]!;
    if (status !== COPY_DONE) return { code: COPY_FAILURE_CODES[status - 1]!, message: messages[k]! };
    const kinds = ['file', 'dir', 'symlink'] as const;
    const stat: EntryStat = { kind: kinds[results[o + 1]!]!, sizeBytes: results[o + 2]!, mtimeMs: results[o + 3]!, ctimeMs: results[o + 4]!, inode: results[o + 5]!, mode: results[o + 6]! };
    return { code: 'done', message: messages[k]!, stat, fingerprint: fingerprints.toString('latin1', k * 16, k * 16 + 16) };
  });
}

function noTemps(dir: string): void {
  const leftovers: string[] = [];
  const walk = (at: string): void => {
    for (const name of fs.readdirSync(at)) {
      if (name.includes('.drbdts-tmp-')) leftovers.push(path.join(at, name));
      if (fs.lstatSync(path.join(at, name)).isDirectory()) walk(path.join(at, name));
    }
  };
  walk(dir);
  expect(leftovers).toEqual([]);
}

describe('native file copies between local roots', () => {
  it('copies content exactly around the 1 MiB chunk, with the fingerprint of what was written and the installed stat', async () => {
    const { a, b } = roots();
    const sizes = [0, 1, 31, 32, 4096, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 5];
    const ops: Op[] = [];
    fs.mkdirSync(path.join(a, 'd'));
    fs.mkdirSync(path.join(b, 'd'));
    sizes.forEach((size, k) => {
      const file = path.join(a, 'd', `f${k} é`);
      fs.writeFileSync(file, randomBytes(size));
      fs.chmodSync(file, k % 2 === 0 ? 0o640 : 0o755);
      ops.push({ path: `d/f${k} é`, source: lstat(file) });
    });
    const results = await copy(a, b, ops);
    for (const [k, result] of results.entries()) {
      const target = path.join(b, ops[k]!.path);
      const content = fs.readFileSync(target);
      expect(result.code, result.message).toBe('done');
      expect(content.equals(fs.readFileSync(path.join(a, ops[k]!.path)))).toBe(true);
      expect(result.fingerprint).toBe(await fingerprintOf(content));
      expect(result.stat).toEqual(lstat(target));
      expect(result.stat!.mode).toBe(ops[k]!.source.mode);
    }
    noTemps(b);
  });

  it('sets the modification time when asked (whole milliseconds, as futimesSync with a Date)', async () => {
    const { a, b } = roots();
    fs.writeFileSync(path.join(a, 'timed'), 'x');
    const mtimeMs = 1_700_000_000_123.75;
    const [result] = await copy(a, b, [{ path: 'timed', source: lstat(path.join(a, 'timed')), mtimeMs }]);
    expect(result!.code, result!.message).toBe('done');
    expect(fs.lstatSync(path.join(b, 'timed')).mtimeMs).toBe(1_700_000_000_123);
  });

  it('refuses a source that is not the scanned file, a target that appeared or changed, a missing parent: nothing installed, no temp left', async () => {
    const { a, b } = roots();
    for (const name of ['changed', 'appeared', 'replaced', 'nodir', 'vanished', 'ok']) fs.writeFileSync(path.join(a, name), `content of ${name}`);
    fs.mkdirSync(path.join(a, 'sub'));
    fs.writeFileSync(path.join(a, 'sub', 'nodir'), 'x');
    const scanned = (name: string): EntryStat => lstat(path.join(a, name));
    const changedScan = scanned('changed');
    fs.appendFileSync(path.join(a, 'changed'), ' and more'); // changed since the scan
    fs.writeFileSync(path.join(b, 'appeared'), 'already here'); // appeared on the target since the scan
    fs.writeFileSync(path.join(b, 'replaced'), 'old');
    const oldTarget = lstat(path.join(b, 'replaced'));
    fs.writeFileSync(path.join(b, 'replaced'), 'old, edited since the scan');
    const vanishedScan = scanned('vanished');
    fs.unlinkSync(path.join(a, 'vanished'));
    const results = await copy(a, b, [
      { path: 'changed', source: changedScan },
      { path: 'appeared', source: scanned('appeared') },
      { path: 'replaced', source: scanned('replaced'), precondition: oldTarget },
      { path: 'sub/nodir', source: scanned('sub/nodir') },
      { path: 'vanished', source: vanishedScan },
      { path: 'ok', source: scanned('ok') },
    ]);
    expect(results.map((result) => result.code)).toEqual(['ECHANGED', 'ECHANGED', 'ECHANGED', 'EGONE', 'EGONE', 'done']);
    expect(results[0]!.message).toBe('changed changed since the scan');
    expect(results[1]!.message).toBe('appeared appeared since the scan');
    expect(results[3]!.message).toBe('parent directory of sub/nodir is missing');
    expect(results[4]!.message).toBe('vanished is no longer a file');
    expect(fs.existsSync(path.join(b, 'changed'))).toBe(false);
    expect(fs.readFileSync(path.join(b, 'appeared'), 'utf8')).toBe('already here');
    expect(fs.readFileSync(path.join(b, 'replaced'), 'utf8')).toBe('old, edited since the scan');
    expect(fs.readFileSync(path.join(b, 'ok'), 'utf8')).toBe('content of ok');
    noTemps(b);
  });

  it('replaces the file the scan saw on the target', async () => {
    const { a, b } = roots();
    fs.writeFileSync(path.join(a, 'f'), 'new content');
    fs.writeFileSync(path.join(b, 'f'), 'old');
    const [result] = await copy(a, b, [{ path: 'f', source: lstat(path.join(a, 'f')), precondition: lstat(path.join(b, 'f')) }]);
    expect(result!.code, result!.message).toBe('done');
    expect(fs.readFileSync(path.join(b, 'f'), 'utf8')).toBe('new content');
    noTemps(b);
  });

  it('refuses a symbolic link where the scan saw a file (never follows it)', async () => {
    const { a, b } = roots();
    fs.writeFileSync(path.join(a, 'real'), 'secret');
    fs.writeFileSync(path.join(a, 'f'), 'data');
    const scan = lstat(path.join(a, 'f'));
    fs.unlinkSync(path.join(a, 'f'));
    fs.symlinkSync('real', path.join(a, 'f'));
    const [result] = await copy(a, b, [{ path: 'f', source: scan }]);
    expect(result!.code).toBe('EGONE');
    expect(fs.existsSync(path.join(b, 'f'))).toBe(false);
    noTemps(b);
  });

  it('rejects paths that are not relative before touching anything', async () => {
    const { a, b } = roots();
    const source: EntryStat = { kind: 'file', sizeBytes: 0, mtimeMs: 0, ctimeMs: 0, inode: 0, mode: 0o644 };
    for (const bad of ['../x', '/etc/passwd', 'a//b', 'a/./b', 'a/']) {
      await expect(copy(a, b, [{ path: bad, source }])).rejects.toThrow(/not a relative path/);
    }
  });
});
