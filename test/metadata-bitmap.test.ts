// The dirty bitmap (src/metadata/bitmap.ts): range set/clear semantics (partial blocks set, only fully covered
// blocks cleared), run iteration, merge, serialization round trip, and dirty-page tracking, checked against a
// plain boolean-array model driven by random operations with a fixed seed.
import { describe, expect, it } from 'vitest';
import { Bitmap, BITMAP_BLOCK_BYTES, BITMAP_PAGE_BYTES } from '../src/metadata/bitmap.js';

function rng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state * 1664525 + 1013904223) >>> 0;
    return state / 2 ** 32;
  };
}

describe('Bitmap', () => {
  it('sets touched blocks, clears only fully covered ones', () => {
    const bitmap = new Bitmap(1024 * 1024);
    expect(bitmap.blockCount).toBe(256);
    expect(bitmap.setRange(4095, 2)).toBe(2); // straddles blocks 0 and 1
    expect(bitmap.isSet(0) && bitmap.isSet(1)).toBe(true);
    expect(bitmap.clearRange(0, 4096 + 100)).toBe(1); // block 1 only partly covered: stays set
    expect(bitmap.isSet(0)).toBe(false);
    expect(bitmap.isSet(1)).toBe(true);
    expect(bitmap.setBits()).toBe(1);
    expect(bitmap.dirtyBytes()).toBe(BITMAP_BLOCK_BYTES);
  });

  it('counts a short last block by its real size and clears it at the end of the device', () => {
    const bitmap = new Bitmap(10 * 4096 + 512);
    expect(bitmap.blockCount).toBe(11);
    bitmap.setRange(10 * 4096, 512);
    expect(bitmap.dirtyBytes()).toBe(512);
    expect(bitmap.clearRange(10 * 4096, 512)).toBe(1);
    expect(bitmap.setBits()).toBe(0);
  });

  it('matches a boolean model under random operations', () => {
    const random = rng(42);
    const blocks = 5000;
    const bitmap = new Bitmap(blocks * 4096);
    const model = new Array<boolean>(blocks).fill(false);
    for (let step = 0; step < 3000; step += 1) {
      const offset = Math.floor(random() * blocks * 4096);
      const length = 1 + Math.floor(random() * Math.min(blocks * 4096 - offset, 200 * 4096));
      if (random() < 0.6) {
        bitmap.setRange(offset, length);
        for (let b = Math.floor(offset / 4096); b <= Math.floor((offset + length - 1) / 4096); b += 1) model[b] = true;
      } else {
        bitmap.clearRange(offset, length);
        for (let b = Math.ceil(offset / 4096); b < Math.floor((offset + length) / 4096); b += 1) model[b] = false;
      }
    }
    expect(bitmap.setBits()).toBe(model.filter(Boolean).length);
    for (let b = 0; b < blocks; b += 1) expect(bitmap.isSet(b)).toBe(model[b]);
    // runs() covers exactly the set blocks, in order, maximal runs
    const fromRuns = new Array<boolean>(blocks).fill(false);
    let lastEnd = -1;
    for (const run of bitmap.runs()) {
      expect(run.startBlock).toBeGreaterThan(lastEnd);
      for (let b = run.startBlock; b < run.startBlock + run.countBlocks; b += 1) fromRuns[b] = true;
      lastEnd = run.startBlock + run.countBlocks;
    }
    expect(fromRuns).toEqual(model);
    const first = model.indexOf(true);
    expect(bitmap.nextSet(0)).toBe(first);
    expect(bitmap.nextSet(blocks - 1)).toBe(model[blocks - 1] ? blocks - 1 : -1);
  });

  it('round-trips through a buffer and merges', () => {
    const a = new Bitmap(64 * 1024 * 1024);
    a.setRange(0, 8192);
    a.setRange(40 * 1024 * 1024, 4096);
    const b = Bitmap.fromBuffer(a.dataSizeBytes, a.toBuffer());
    expect(b.setBits()).toBe(3);
    expect(b.dirtyPageCount()).toBe(0);
    const c = new Bitmap(a.dataSizeBytes);
    c.setRange(8192, 4096);
    c.setRange(0, 4096);
    c.mergeFrom(b);
    expect(c.setBits()).toBe(4);
    expect([...c.runs()]).toEqual([{ startBlock: 0, countBlocks: 3 }, { startBlock: 10240, countBlocks: 1 }]);
    c.setAll();
    expect(c.setBits()).toBe(c.blockCount);
    c.clearAll();
    expect(c.setBits()).toBe(0);
    expect(c.nextSet(0)).toBe(-1);
  });

  it('ignores garbage bits past the end when loading', () => {
    const bitmap = new Bitmap(3 * 4096);
    bitmap.loadFrom(Buffer.alloc(bitmap.byteLength, 0xff));
    expect(bitmap.setBits()).toBe(3);
  });

  it('tracks dirty pages for write-back', () => {
    // 1 GiB of data = 262144 blocks = 32 KiB of bitmap = 8 pages, each covering 128 MiB.
    const bitmap = new Bitmap(1024 ** 3);
    expect(bitmap.pageCount).toBe(8);
    const perPage = BITMAP_PAGE_BYTES * 8 * BITMAP_BLOCK_BYTES;
    bitmap.setRange(0, 4096);
    bitmap.setRange(5 * perPage + 12345, 1);
    bitmap.setRange(5 * perPage, 4096);
    expect(bitmap.takeDirtyPages()).toEqual([0, 5]);
    expect(bitmap.takeDirtyPages()).toEqual([]);
    bitmap.setRange(0, 4096); // already set: no change, no dirty page
    expect(bitmap.dirtyPageCount()).toBe(0);
    bitmap.clearRange(0, 4096);
    expect(bitmap.takeDirtyPages()).toEqual([0]);
    expect(bitmap.pageBuffer(5).length).toBe(BITMAP_PAGE_BYTES);
  });
});
