// Resource metadata micro benchmarks (tinybench): what the activity log and the dirty bitmap cost on the write
// path of a replicated device. In memory: a write to a hot AL extent (begin + end: the common case of every
// write), bitmap setRange of one 4 KiB block (every write while disconnected), bitmap runs() over a 1 TiB
// bitmap with 0.1% of the blocks set (what a resync walks). On a real file: one cold-extent AL transaction
// (an O_DSYNC write of the AL slot) with and without 64 MiB of dirty data pages in the same file, which is the
// case that made fdatasync-based metadata writes expensive, and a bitmap write-back of 8 dirty pages.
//
//   node --import ./bench/ts-loader.mjs bench/resource-metadata.bench.ts [--quick] [--dir DIR]
//
// --dir puts the backing file on a chosen file system (default: os.tmpdir()).
import { mkdtemp, open, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Bench } from 'tinybench';
import { ActivityLog, AL_EXTENT_BYTES } from '../src/metadata/activity-log.js';
import { Bitmap, BITMAP_BLOCK_BYTES, BITMAP_PAGE_BYTES } from '../src/metadata/bitmap.js';
import { Metadata } from '../src/metadata/metadata.js';

const MiB = 1024 * 1024;
const { values: args } = parseArgs({ options: { quick: { type: 'boolean', default: false }, dir: { type: 'string' } } });
const quick = args.quick === true;
const benchOptions = quick ? { time: 100, warmupTime: 20 } : { time: 1000, warmupTime: 200 };

function lcg(seed: number): () => number {
  let state = seed >>> 0;
  return () => (state = (state * 1664525 + 1013904223) >>> 0);
}

// ---- in memory ----
const memory = new Bench({ name: 'in memory', ...benchOptions });
{
  const dataSizeBytes = 64 * 1024 * MiB;
  const log = new ActivityLog({ dataSizeBytes, maxHotExtents: 1237, persist: async () => undefined });
  for (let extent = 0; extent < 1237; extent += 1) {
    await log.beginWrite(extent * AL_EXTENT_BYTES, 4096);
    log.endWrite(extent * AL_EXTENT_BYTES, 4096);
  }
  const next = lcg(1);
  const hotSpanBlocks = (1237 * AL_EXTENT_BYTES) / 4096;
  memory.add('AL hot write: beginWrite + endWrite (4 KiB)', () => {
    const offset = (next() % hotSpanBlocks) * 4096;
    void log.beginWrite(offset, 4096);
    log.endWrite(offset, 4096);
  });
  const bitmap = new Bitmap(1024 * 1024 * MiB);
  const nextBlock = lcg(2);
  memory.add('bitmap setRange 4 KiB (1 TiB bitmap)', () => {
    bitmap.setRange((nextBlock() % bitmap.blockCount) * BITMAP_BLOCK_BYTES, 4096);
  });
  const sparse = new Bitmap(1024 * 1024 * MiB);
  const pick = lcg(3);
  for (let i = 0; i < sparse.blockCount / 1000; i += 1) sparse.setBlocks(pick() % sparse.blockCount, 1);
  memory.add('bitmap runs() over 1 TiB, 0.1% set', () => {
    let count = 0;
    for (const run of sparse.runs()) count += run.countBlocks;
    if (count === 0) throw new Error('no runs');
  });
}
await memory.run();
console.log(memory.name);
console.table(memory.table());

// ---- on a real file ----
const dir = await mkdtemp(path.join(args.dir ?? os.tmpdir(), 'drbdts-md-bench-'));
try {
  const disk = path.join(dir, 'disk.img');
  const dataSizeBytes = 1024 * MiB;
  const md = await Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes, alExtents: 16 });
  const data = await open(disk, 'r+');
  const dirty = Buffer.alloc(64 * MiB, 0x5a);
  const file = new Bench({ name: 'on a file (O_DSYNC metadata writes)', ...benchOptions, iterations: quick ? 3 : 10 });
  let extent = 0;
  // Each iteration touches a new extent (16 hot of 256): one AL transaction, often with an eviction.
  const coldWrite = async (): Promise<void> => {
    extent = (extent + 17) % 256;
    await md.activityLog.beginWrite(extent * AL_EXTENT_BYTES, 4096);
    md.activityLog.endWrite(extent * AL_EXTENT_BYTES, 4096);
  };
  file.add('AL cold-extent transaction, clean page cache', coldWrite);
  file.add('AL cold-extent transaction, 64 MiB dirty data in the file', coldWrite, {
    beforeEach: async () => {
      await data.write(dirty, 0, dirty.length, 512 * MiB);
    },
  });
  file.add('bitmap write-back, 8 dirty pages', async () => {
    for (let page = 0; page < 8; page += 1) {
      md.bitmap.setBlocks(page * BITMAP_PAGE_BYTES * 8 + (extent % 1000), 1);
    }
    extent += 1;
    await md.writeBitmap();
  });
  await file.run();
  console.log(file.name);
  console.table(file.table());
  console.log(`AL transactions: ${md.activityLog.transactions}, bitmap writes: ${md.bitmapWrites}`);
  await data.close();
  await md.close();
} finally {
  await rm(dir, { recursive: true, force: true });
}
