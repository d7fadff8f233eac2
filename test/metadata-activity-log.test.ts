// The activity log (src/metadata/activity-log.ts, persisted by src/metadata/metadata.ts).
// In process, with a recording persist callback: a cold extent is persisted before beginWrite resolves, hot
// extents cost no I/O, concurrent cold writers share one transaction, eviction is LRU and never takes an
// extent with writes in flight (a writer waits for room instead), a failed persist rejects the writers.
// Across a real crash: a child process writes through Metadata's ActivityLog as a disconnected Primary does
// (AL begin, bitmap bit, pwrite, AL end) with only 16 hot extents so it evicts constantly; it is SIGKILLed
// mid-stream; reopening the metadata must find every block the child reported starting to write marked out
// of sync (and not the whole device).
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ActivityLog, AL_EXTENT_BYTES } from '../src/metadata/activity-log.js';
import { Metadata } from '../src/metadata/metadata.js';
import { buildDist, killChildren, repoRoot, spawnUntil, waitExit } from './resource-helpers.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'drbdts-al-'));
});
afterEach(async () => {
  await killChildren();
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const E = AL_EXTENT_BYTES;

function recordingLog(maxHotExtents = 16, dataSizeBytes = 256 * E) {
  const persisted: { hot: number[]; evicted: number[]; wide?: { firstExtent: number; lastExtent: number }[] }[] = [];
  let gate: Promise<void> = Promise.resolve();
  let fail: Error | undefined;
  const log = new ActivityLog({
    dataSizeBytes,
    maxHotExtents,
    persist: async (hot, evicted, wide) => {
      await gate;
      if (fail) throw fail;
      persisted.push(wide.length > 0 ? { hot: [...hot], evicted: [...evicted], wide: wide.map((r) => ({ ...r })) } : { hot: [...hot], evicted: [...evicted] });
    },
  });
  return {
    log,
    persisted,
    hold(): () => void {
      let release!: () => void;
      gate = new Promise((resolve) => { release = resolve; });
      return release;
    },
    failWith(error: Error | undefined): void { fail = error; },
  };
}

describe('ActivityLog', () => {
  it('persists a cold extent before the write may start; hot writes cost nothing', async () => {
    const { log, persisted, hold } = recordingLog();
    const release = hold();
    let started = false;
    const begin = log.beginWrite(5 * E + 10, 4096).then(() => { started = true; });
    await sleep(10);
    expect(started).toBe(false); // the transaction is not durable yet
    release();
    await begin;
    expect(persisted).toEqual([{ hot: [5], evicted: [] }]);
    for (let i = 0; i < 100; i += 1) await log.beginWrite(5 * E + i * 4096, 4096);
    expect(persisted.length).toBe(1);
    expect(log.inFlightWrites()).toBe(101);
    expect(log.hotExtents()).toEqual([5]);
  });

  it('batches concurrent cold writers into few transactions', async () => {
    const { log, persisted, hold } = recordingLog(64);
    const release = hold();
    const first = log.beginWrite(0, 4096);
    await sleep(1); // the first transaction is now in progress
    const rest = Array.from({ length: 40 }, (_, i) => log.beginWrite((i + 1) * E, 4096));
    release();
    await Promise.all([first, ...rest]);
    expect(persisted.length).toBe(2);
    // 0..40 for the writers, plus up to AL_PREFETCH_EXTENTS read-ahead (the writers form a sequential run).
    expect(persisted[1]!.hot.slice(0, 41)).toEqual(Array.from({ length: 41 }, (_, i) => i));
    expect(persisted[1]!.hot.length).toBeLessThanOrEqual(44);
    expect(log.transactions).toBe(2);
  });

  it('evicts the least recently used idle extent, never one with writes in flight, and waits when full', async () => {
    const { log, persisted } = recordingLog(16);
    for (let extent = 0; extent < 16; extent += 1) await log.beginWrite(extent * E, 4096);
    for (let extent = 1; extent < 16; extent += 1) log.endWrite(extent * E, 4096); // extent 0 stays busy
    await log.beginWrite(1 * E, 4096); // touch 1: now 2 is the least recently used idle extent
    log.endWrite(1 * E, 4096);
    await log.beginWrite(100 * E, 4096);
    expect(persisted.at(-1)!.evicted).toEqual([2]);
    expect(log.hotExtents()).not.toContain(2);
    // Make every hot extent busy: the next cold writer must wait until one frees up.
    for (const extent of log.hotExtents()) if (extent !== 0 && extent !== 100) await log.beginWrite(extent * E, 4096);
    let admitted = false;
    const waiting = log.beginWrite(200 * E, 4096).then(() => { admitted = true; });
    await sleep(20);
    expect(admitted).toBe(false);
    log.endWrite(100 * E, 4096);
    await waiting;
    expect(persisted.at(-1)!.evicted).toEqual([100]);
    expect(log.hotExtents()).toContain(0); // busy the whole time: never evicted
  });

  it('rejects the writers of a failed transaction and recovers afterwards', async () => {
    const { log, failWith } = recordingLog();
    failWith(new Error('EIO on the meta disk'));
    await expect(log.beginWrite(7 * E, 4096)).rejects.toThrow('activity log write failed: EIO on the meta disk');
    expect(log.inFlightWrites()).toBe(0);
    failWith(undefined);
    await log.beginWrite(7 * E, 4096);
    expect(log.hotExtents()).toEqual([7]);
  });

  it('records a huge trim as one wide range instead of flushing the hot set', async () => {
    const { log, persisted } = recordingLog(16, 2048 * E);
    for (let extent = 0; extent < 16; extent += 1) await log.beginWrite(extent * E, 4096);
    const before = persisted.length;
    await log.beginWrite(100 * E, 1024 * E); // 4 GiB: 1024 extents, far more than the 16 hot slots
    expect(persisted.length).toBe(before + 1);
    expect(persisted.at(-1)).toEqual({ hot: log.hotExtents(), evicted: [], wide: [{ firstExtent: 100, lastExtent: 1123 }] });
    expect(log.hotExtents().length).toBe(16);
    expect(log.wideRanges()).toEqual([{ firstExtent: 100, lastExtent: 1123 }]);
    log.endWrite(100 * E, 1024 * E);
    expect(log.wideRanges()).toEqual([]);
    for (let extent = 0; extent < 16; extent += 1) log.endWrite(extent * E, 4096);
    await log.beginWrite(500 * E, 4096); // the next transaction no longer carries the ended range
    expect(persisted.at(-1)!.wide).toBeUndefined();
    expect(log.inFlightWrites()).toBe(1);
  });

  it('reads ahead for sequential streams, not for random writes', async () => {
    const { log, persisted } = recordingLog(64);
    // A 4 MiB-per-extent sequential stream of 1 MiB writes over 16 extents.
    for (let offset = 0; offset < 16 * E; offset += 1024 * 1024) {
      await log.beginWrite(offset, 1024 * 1024);
      log.endWrite(offset, 1024 * 1024);
    }
    // Extent 0 alone, then 1 with 2..4 ahead, 5 with 6..8, 9 with 10..12, 13 with 14..16: five transactions, not 16.
    expect(persisted.length).toBe(5);
    expect(persisted[1]!.hot).toEqual([0, 1, 2, 3, 4]);
    const random = recordingLog(64);
    for (const extent of [40, 7, 22, 90, 3]) {
      await random.log.beginWrite(extent * E, 4096);
      random.log.endWrite(extent * E, 4096);
    }
    expect(random.persisted.length).toBe(5);
    expect(random.log.hotExtents()).toEqual([3, 7, 22, 40, 90]);
  });

  it('looks ahead for a stream: the next extents become hot while it still writes, nothing waits', async () => {
    const { log, persisted, hold } = recordingLog(64);
    const MiB = 1024 * 1024;
    // The stream starts: extent 0, then 1 with 2..4 read ahead (as above).
    for (let offset = 0; offset < 5 * MiB; offset += MiB) await log.beginWrite(offset, MiB);
    expect(persisted.map((t) => t.hot.at(-1))).toEqual([0, 4]);
    // Continuing past the middle of extent 4 (hot, 5 cold) starts a transaction for 5..8 in the background: the
    // writes themselves do not wait for it, even while it is held.
    const release = hold();
    for (let offset = 5 * MiB; offset < 20 * MiB; offset += MiB) await log.beginWrite(offset, MiB);
    expect(persisted.length).toBe(2);
    release();
    await sleep(5);
    expect(persisted.length).toBe(3);
    expect(persisted[2]!.hot).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8]);
    // Extent 5 is hot when the stream gets there: no transaction in its way.
    let admitted = false;
    const next = log.beginWrite(20 * MiB, MiB).then(() => { admitted = true; });
    await Promise.resolve();
    expect(admitted).toBe(true);
    await next;
    // A write that does not continue the stream never looks ahead, hot or not.
    const before = persisted.length;
    await log.beginWrite(8 * E + 4096, 4096);
    await sleep(5);
    expect(persisted.length).toBe(before);
    expect(log.hotExtents()).not.toContain(9);
  });

  it('handles a write spanning two extents', async () => {
    const { log, persisted } = recordingLog();
    await log.beginWrite(3 * E - 4096, 8192);
    expect(persisted[0]!.hot).toEqual([2, 3]);
    log.endWrite(3 * E - 4096, 8192);
    expect(log.inFlightWrites()).toBe(0);
  });
});

describe('ActivityLog crash recovery', () => {
  it('after SIGKILL during a wide trim, the whole trimmed range is out of sync on reopen', async () => {
    await buildDist();
    const disk = path.join(dir, 'wide.img');
    const dataSizeBytes = 64 * E;
    await (await Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes, alExtents: 16 })).close();
    const child = path.join(dir, 'wide.mjs');
    await writeFile(child, `
import { Metadata } from ${JSON.stringify(path.join(repoRoot, 'dist/metadata/metadata.js'))};
const md = await Metadata.open(${JSON.stringify(disk)}, 'internal');
await md.activityLog.beginWrite(${10 * E + 4096}, ${40 * E});
process.stdout.write('trimming\\n');
setInterval(() => {}, 1e6);
`);
    const proc = await spawnUntil(process.execPath, [child], /trimming/, { cwd: dir });
    const snapshot = (await Metadata.read(disk, 'internal'))!;
    expect(snapshot.wideRanges).toEqual([{ firstExtent: 10, lastExtent: 50 }]);
    proc.child.kill('SIGKILL');
    await waitExit(proc.child);
    const md = await Metadata.open(disk, 'internal');
    try {
      expect(md.recoveredFromCrash).toBe(true);
      expect([...md.bitmap.runs()]).toEqual([{ startBlock: (10 * E) / 4096, countBlocks: (41 * E) / 4096 }]);
    } finally {
      await md.close();
    }
  });

  it('after SIGKILL mid-write, every block the child started to write is out of sync on reopen', async () => {
    await buildDist();
    const disk = path.join(dir, 'crash.img');
    const dataSizeBytes = 64 * E; // 256 MiB, 64 extents, sparse
    await (await Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes, alExtents: 16 })).close();
    const child = path.join(dir, 'writer.mjs');
    await writeFile(child, `
import { Metadata } from ${JSON.stringify(path.join(repoRoot, 'dist/metadata/metadata.js'))};
import { open } from 'node:fs/promises';
const md = await Metadata.open(${JSON.stringify(disk)}, 'internal');
const fh = await open(${JSON.stringify(disk)}, 'r+');
const block = Buffer.alloc(4096, 0xab);
let seed = 12345;
const next = () => (seed = (seed * 1103515245 + 12345) % 2147483648);
process.stdout.write('ready\\n');
async function writer() {
  for (;;) {
    const blockIndex = next() % ${dataSizeBytes / 4096};
    const offset = blockIndex * 4096;
    await md.activityLog.beginWrite(offset, 4096);
    md.bitmap.setRange(offset, 4096);          // disconnected Primary: the peer lacks this block
    process.stdout.write('begin ' + blockIndex + '\\n'); // synchronous on a pipe: printed before the pwrite
    await fh.write(block, 0, 4096, offset);
    md.activityLog.endWrite(offset, 4096);
  }
}
await Promise.all([writer(), writer(), writer(), writer()]);
`);
    const proc = await spawnUntil(process.execPath, [child], /ready\n/, { cwd: dir });
    // Let it write (and evict: 16 hot extents out of 64) for a while, then kill it without warning.
    const deadline = Date.now() + 20_000;
    while ((proc.output().match(/begin /g)?.length ?? 0) < 3000 && Date.now() < deadline) await sleep(50);
    proc.child.kill('SIGKILL');
    await waitExit(proc.child);
    const started = new Set<number>();
    for (const match of proc.output().matchAll(/begin (\d+)\n/g)) started.add(Number(match[1]));
    expect(started.size).toBeGreaterThan(100); // enough to have evicted many times over (16 hot of 64 extents)
    const md = await Metadata.open(disk, 'internal');
    try {
      expect(md.recoveredFromCrash).toBe(true);
      const missing = [...started].filter((blockIndex) => !md.bitmap.isSet(blockIndex));
      expect(missing).toEqual([]);
      // Recovery adds at most the hot extents on top of what was written: not the whole device.
      expect(md.bitmap.setBits()).toBeLessThanOrEqual(started.size + 16 * (E / 4096));
      expect(md.activityLog.hotExtents().length).toBeLessThanOrEqual(16);
    } finally {
      await md.close();
    }
  });
});
