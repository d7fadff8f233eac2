// The archive file (src/dirsync/archive/file.ts): format 2 (binary) round-trips every field in both orientations,
// archives written in format 1 (text) by earlier versions still load, and any damage is refused as corrupt.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ArchiveError, loadArchive, saveArchive, type ArchiveEntry } from '../src/dirsync/archive/file.js';
import { getHasher } from '../src/dirsync/hash.js';
import { fingerprintHex } from '../src/dirsync/replica.js';
import xxhash from 'xxhash-wasm';
import { archiveNative, nativeHasher } from '../src/native/scan.js';
import { mulberry32 } from './helpers/prng.js';
import { mkTemp } from './dirsync-helpers.js';

const temps: string[] = [];
afterEach(() => {
  for (const dir of temps.splice(0)) fs.rmSync(dir, { recursive: true, force: true });
});

function sample(): Map<string, ArchiveEntry> {
  const entries = new Map<string, ArchiveEntry>();
  const base = { sizeBytes: 0, fingerprint: '', mode: 0o755, linkTarget: '', mtime1Ms: 1_764_612_345_678.1234, ctime1Ms: 1_764_612_345_679.5, inode1: 2 ** 40 + 7, mtime2Ms: 1, ctime2Ms: 2, inode2: 3 };
  entries.set('dir', { ...base, kind: 'dir' });
  entries.set('dir/tab\there', { ...base, kind: 'file', sizeBytes: 12345, fingerprint: '0123456789abcdef', mode: 0o644, mtime2Ms: 1_700_000_000_000 });
  entries.set('dir/new\nline and \\ backslash', { ...base, kind: 'file', sizeBytes: 0, fingerprint: 'ef46db3751d8e999', mode: 0o600 });
  entries.set('dir/é 😀 \uE000', { ...base, kind: 'symlink', mode: 0o777, linkTarget: '../target with\ttab/é' });
  entries.set('big', { ...base, kind: 'file', sizeBytes: 2 ** 52 + 1, fingerprint: 'ffffffffffffffff', mode: 0o640, inode2: 2 ** 53 - 1 });
  return entries;
}

const roots = { root1Id: 'host:/one', root2Id: 'host:/two' };

function swapSides(entries: Map<string, ArchiveEntry>): Map<string, ArchiveEntry> {
  const swapped = new Map<string, ArchiveEntry>();
  for (const [p, e] of entries) {
    swapped.set(p, { ...e, mtime1Ms: e.mtime2Ms, ctime1Ms: e.ctime2Ms, inode1: e.inode2, mtime2Ms: e.mtime1Ms, ctime2Ms: e.ctime1Ms, inode2: e.inode1 });
  }
  return swapped;
}

/** Run `body` with the addon's archive helpers (xxh64, entry check) and again with the JavaScript fallback. */
async function bothLoaders(body: () => Promise<void>): Promise<void> {
  const saved = process.env.DRBDTS_DIRSYNC_NATIVE_JOIN;
  try {
    for (const value of [undefined, '0']) {
      if (value === undefined) delete process.env.DRBDTS_DIRSYNC_NATIVE_JOIN;
      else process.env.DRBDTS_DIRSYNC_NATIVE_JOIN = value;
      await body();
    }
  } finally {
    if (saved === undefined) delete process.env.DRBDTS_DIRSYNC_NATIVE_JOIN;
    else process.env.DRBDTS_DIRSYNC_NATIVE_JOIN = saved;
  }
}

describe('dirsync archive file', () => {
  it.skipIf(archiveNative() === undefined || nativeHasher() === undefined)('the native xxh64 gives xxhash-wasm digests: one-shot, streamed, hex', async () => {
    const native = archiveNative()!;
    const hasher = nativeHasher()!;
    const wasm = await xxhash();
    const random = mulberry32(64);
    const bytes = Buffer.alloc(200_000);
    for (let index = 0; index < bytes.length; index++) bytes[index] = Math.floor(random() * 256);
    const lengths = [...Array.from({ length: 200 }, (_, n) => n), 1023, 1024, 4096, 65_537, 199_990];
    for (const length of lengths) {
      for (const offset of [0, 1, 5]) {
        const part = bytes.subarray(offset, offset + length);
        const expected = wasm.h64Raw(part);
        expect(hasher.h64Raw(part)).toBe(expected);
        expect(native.xxh64(part)).toBe(fingerprintHex(expected));
        // Streamed in random pieces (crossing the 32-byte stripes anywhere) gives the same digest.
        const state = hasher.create64();
        for (let at = 0; at < part.length; ) {
          const piece = Math.min(part.length - at, Math.floor(random() * 70));
          state.update(part.subarray(at, at + piece));
          at += piece;
        }
        expect(state.digest()).toBe(expected);
      }
    }
  });

  it('format 2 round-trips every field, in order, in both orientations', async () => {
    const dir = mkTemp('drbdts-archive-');
    temps.push(dir);
    const file = path.join(dir, 'ar-test');
    const entries = sample();
    await bothLoaders(async () => {
      for (const swapped of [false, true]) {
        await saveArchive(file, swapped, roots, entries);
        expect(fs.readFileSync(file).subarray(0, 25).toString()).toBe('drbdts-dirsync-archive 2\n');
        const loaded = await loadArchive(file, swapped);
        expect([...loaded]).toEqual([...entries]);
        // Read in the other orientation, side 1 and side 2 trade places.
        expect([...(await loadArchive(file, !swapped))]).toEqual([...swapSides(entries)]);
      }
      await saveArchive(file, false, roots, new Map());
      expect((await loadArchive(file, false)).size).toBe(0);
    });
  });

  it('a format 1 (text) archive from an earlier version still loads', async () => {
    const dir = mkTemp('drbdts-archive-');
    temps.push(dir);
    const file = path.join(dir, 'ar-v1');
    const body =
      'drbdts-dirsync-archive 1\n' +
      JSON.stringify({ root1: roots.root1Id, root2: roots.root2Id, entries: 3 }) +
      '\n' +
      'd\td\t0\t\t493\t\t1764612345678.1234\t1764612345679.5\t1099511627783\t1\t2\t3\n' +
      'd/a\\tb\tf\t12345\t0123456789abcdef\t420\t\t10\t11\t12\t13\t14\t15\n' +
      'd/l\tl\t0\t\t511\t../x\\ty\t20\t21\t22\t23\t24\t25\n';
    const hasher = await getHasher();
    fs.writeFileSync(file, body + 'end ' + fingerprintHex(hasher.h64Raw(Buffer.from(body))) + '\n');
    const loaded = await loadArchive(file, false);
    expect([...loaded.keys()]).toEqual(['d', 'd/a\tb', 'd/l']);
    expect(loaded.get('d')).toEqual({ kind: 'dir', sizeBytes: 0, fingerprint: '', mode: 493, linkTarget: '', mtime1Ms: 1764612345678.1234, ctime1Ms: 1764612345679.5, inode1: 1099511627783, mtime2Ms: 1, ctime2Ms: 2, inode2: 3 });
    expect(loaded.get('d/a\tb')).toMatchObject({ kind: 'file', sizeBytes: 12345, fingerprint: '0123456789abcdef', mode: 420, mtime1Ms: 10, inode2: 15 });
    expect((await loadArchive(file, true)).get('d/l')).toMatchObject({ kind: 'symlink', linkTarget: '../x\ty', mtime1Ms: 23, ctime1Ms: 24, inode1: 25, mtime2Ms: 20 });
    // Rewriting converts it to format 2 with the same content.
    await saveArchive(file, false, roots, loaded);
    expect([...(await loadArchive(file, false))]).toEqual([...loaded]);
  });

  it('refuses a damaged format 2 archive: any flipped byte, a truncation, a wrong count', async () => {
    const dir = mkTemp('drbdts-archive-');
    temps.push(dir);
    const file = path.join(dir, 'ar-test');
    await saveArchive(file, false, roots, sample());
    const good = fs.readFileSync(file);
    const expectCorrupt = async (bytes: Buffer): Promise<void> => {
      fs.writeFileSync(file, bytes);
      const error = await loadArchive(file, false).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error).toBeInstanceOf(ArchiveError);
      expect((error as Error).message).toMatch(/is corrupt/);
    };
    const hasher = await getHasher();
    const resealed = (body: Buffer): Buffer => Buffer.concat([body, Buffer.from('\nend ' + fingerprintHex(hasher.h64Raw(body)) + '\n')]);
    const bodyEnd = good.length - 22;
    await bothLoaders(async () => {
      for (let offset = 0; offset < good.length; offset += 7) {
        const bad = Buffer.from(good);
        bad[offset] ^= 0x20;
        await expectCorrupt(bad);
      }
      await expectCorrupt(good.subarray(0, good.length - 1));
      await expectCorrupt(good.subarray(0, 40));
      // A consistent checksum over inconsistent content (a writer bug) is refused too: a wrong count, a bad kind,
      // a NaN, an empty path.
      const body = Buffer.from(good.subarray(0, bodyEnd));
      await expectCorrupt(resealed(Buffer.from(body.toString('latin1').replace('"entries":5', '"entries":4'), 'latin1')));
      const headerEnd = body.indexOf(10, 25) + 1;
      const kinds = headerEnd + 5 * 8 * 8 + 5 * 3 * 4;
      const badKind = Buffer.from(body);
      badKind[kinds + 2] = 0x78;
      await expectCorrupt(resealed(badKind));
      const nan = Buffer.from(body);
      nan.writeDoubleLE(Number.NaN, headerEnd + 3 * 8 * 8 + 2 * 8);
      await expectCorrupt(resealed(nan));
      const emptyPath = Buffer.from(body);
      emptyPath.writeUInt32LE(0, headerEnd + 5 * 8 * 8 + 12);
      await expectCorrupt(resealed(emptyPath));
    });
  });
});
