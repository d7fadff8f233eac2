// Local-to-local copies lend pooled read buffers (LocalReplica.readFile's `recycle`, fileop.ts): every file must
// still arrive byte for byte, whatever its size relative to the 1 MiB chunk, on the main thread, in the copy
// workers and in the addon's copies (its own 1 MiB buffer per job, reused from file to file), and a buffer reused
// must never leak one file's bytes into another (the fingerprint check would refuse it, the run would fail).
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { dirsync, localPair, mkTemp, snapshot, write, type Pair } from './dirsync-helpers.js';

const temps: string[] = [];
afterEach(() => {
  for (const dir of temps.splice(0)) fs.rmSync(dir, { recursive: true, force: true });
});

function pair(): Pair {
  const dir = mkTemp('drbdts-copy-');
  temps.push(dir);
  return localPair(dir);
}

const MiB = 1 << 20;
const SIZES = [0, 1, 100, 4095, 4096, 65_537, MiB - 1, MiB, MiB + 1, 3 * MiB + 17, 0, 7];

/** Distinct content per file (a pooled buffer reused for the next file would show through). */
const pool = randomBytes(4 * MiB);
function content(index: number, size: number): Buffer {
  const offset = (index * 7919) % (pool.length - size);
  return pool.subarray(offset, offset + size);
}

describe('dirsync local copies with pooled read buffers', () => {
  // DRBDTS_DIRSYNC_WORKERS=0: this thread; 3: the addon's copies on the thread pool (three jobs at once); 3 with
  // DRBDTS_DIRSYNC_NATIVE_COPY=0: three copy workers.
  for (const [workers, nativeCopy] of [['0', '1'], ['3', '1'], ['3', '0']] as const) {
    it(`copies every size exactly (workers: ${workers}, native copy: ${nativeCopy})`, async () => {
      const env = { DRBDTS_DIRSYNC_WORKERS: workers, DRBDTS_DIRSYNC_NATIVE_COPY: nativeCopy };
      const p = pair();
      // Enough files for the copy workers to start (WORKER_MIN_FILES), sizes cycling around the chunk size, and
      // big files before small ones so a reused 1 MiB buffer holds stale bytes past each small file's end.
      const count = 300;
      for (let index = 0; index < count; index++) write(p.a, `d${index % 7}/f${index}`, content(index, SIZES[index % SIZES.length]!));
      const first = await dirsync(p, [], env);
      expect(first.code, first.stderr).toBe(0);
      expect(first.json!.counts.failed).toBe(0);
      expect(snapshot(p.b)).toEqual(snapshot(p.a));
      // Updates in place (the target holds an older version of every file) go the same way.
      for (let index = 0; index < count; index += 3) write(p.a, `d${index % 7}/f${index}`, content(index + 1000, SIZES[(index + 5) % SIZES.length]!));
      const second = await dirsync(p, [], env);
      expect(second.code, second.stderr).toBe(0);
      expect(second.json!.counts.propagated).toBe(count / 3);
      expect(snapshot(p.b)).toEqual(snapshot(p.a));
    });
  }
});
