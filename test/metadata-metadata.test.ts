// On-disk metadata (src/metadata/metadata.ts) on real files: create-md creates a missing backing file of the
// right size, refuses to overwrite metadata without force, refuses a disk too small; a torn superblock write
// (half a slot, or a corrupted slot) falls back to the older valid slot; the flock held by another process
// (a spawned node process) refuses a second open and vanishes when that process is SIGKILLed; the bitmap
// write-back rewrites only the pages that changed (a marker planted on disk in an untouched page survives);
// external meta-disk layout; UUID rotation; crash detection with AL extents merged into the bitmap.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdtemp, open, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { AL_EXTENT_BYTES } from '../src/metadata/activity-log.js';
import { BITMAP_BLOCK_BYTES, BITMAP_PAGE_BYTES } from '../src/metadata/bitmap.js';
import { Metadata, MetadataError, maxDataSizeBytes, metadataSizeBytes } from '../src/metadata/metadata.js';
import { killChildren, repoRoot, spawnUntil, waitExit } from './resource-helpers.js';

let dir: string;
let counter = 0;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'drbdts-md-'));
});
afterEach(async () => {
  await killChildren();
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function diskPath(): string {
  counter += 1;
  return path.join(dir, `disk${counter}.img`);
}

async function expectMetadataError(promise: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  try {
    await promise;
  } catch (error) {
    expect(error).toBeInstanceOf(MetadataError);
    expect((error as MetadataError).code).toBe(code);
    expect((error as Error).message).toMatch(message);
    return;
  }
  throw new Error(`expected MetadataError ${code}, it succeeded`);
}

const MiB = 1024 * 1024;

describe('Metadata.create', () => {
  it('creates a missing backing file big enough for data plus metadata, and opens it again', async () => {
    const disk = diskPath();
    const md = await Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes: 64 * MiB, nodeName: 'alice', resourceName: 'r0' });
    expect(md.dataSizeBytes).toBe(64 * MiB);
    expect((await stat(disk)).size).toBe(64 * MiB + metadataSizeBytes(64 * MiB));
    expect(md.uuids).toEqual({ current: 0n, bitmap: 0n, history: [0n, 0n] });
    expect(md.flags.consistent).toBe(false);
    expect(md.recoveredFromCrash).toBe(false);
    await md.close();
    const snapshot = await Metadata.read(disk, 'internal');
    expect(snapshot).toMatchObject({ dataSizeBytes: 64 * MiB, nodeName: 'alice', resourceName: 'r0', cleanShutdown: true, dirtyBlocks: 0 });
  });

  it('uses the whole existing disk less metadata when no size is given', async () => {
    const disk = diskPath();
    await writeFile(disk, Buffer.alloc(0));
    const handle = await open(disk, 'r+');
    await handle.truncate(100 * MiB + 12345);
    await handle.close();
    const md = await Metadata.create({ diskPath: disk, metaDisk: 'internal' });
    expect(md.dataSizeBytes).toBe(maxDataSizeBytes(100 * MiB + 12345));
    expect(md.dataSizeBytes % 4096).toBe(0);
    expect(md.dataSizeBytes + md.metadataSizeBytes).toBeLessThanOrEqual(100 * MiB + 12345);
    expect(md.dataSizeBytes).toBeGreaterThan(100 * MiB - 64 * 1024);
    await md.close();
  });

  it('refuses to overwrite existing metadata without force, and overwrites with it', async () => {
    const disk = diskPath();
    const md = await Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes: 16 * MiB, nodeName: 'alice', resourceName: 'r0' });
    await md.newCurrentUuid();
    const uuid = md.uuids.current;
    await md.close();
    await expectMetadataError(Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes: 16 * MiB }), 'EEXIST',
      /already holds drbdts metadata \(resource r0, node alice, 16777216 bytes of data\); refusing to overwrite it without --force/);
    const kept = await Metadata.open(disk, 'internal');
    expect(kept.uuids.current).toBe(uuid); // nothing was lost
    await kept.close();
    // Data written into the data area (as through NBD) survives create-md --force: only metadata is rewritten.
    const pattern = Buffer.alloc(16 * MiB, 0x5a);
    const data = await open(disk, 'r+');
    await data.write(pattern, 0, pattern.length, 0);
    await data.close();
    const fresh = await Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes: 16 * MiB, force: true });
    expect(fresh.uuids.current).toBe(0n);
    await fresh.close();
    const after = await open(disk, 'r');
    const back = Buffer.alloc(16 * MiB);
    await after.read(back, 0, back.length, 0);
    await after.close();
    expect(back.equals(pattern)).toBe(true);
  });

  it('refuses a disk too small, naming sizes, and leaves the file alone', async () => {
    const disk = diskPath();
    await writeFile(disk, Buffer.alloc(2 * MiB, 7));
    await expectMetadataError(Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes: 64 * MiB }), 'ETOOSMALL',
      new RegExp(`disk ${disk} is too small: it has 2097152 bytes, size 67108864 plus \\d+ bytes of internal metadata needs \\d+`));
    const tiny = diskPath();
    await writeFile(tiny, Buffer.alloc(256 * 1024));
    await expectMetadataError(Metadata.create({ diskPath: tiny, metaDisk: 'internal' }), 'ETOOSMALL', /is too small: it has 262144 bytes/);
    const after = await open(disk, 'r');
    const content = Buffer.alloc(2 * MiB);
    await after.read(content, 0, content.length, 0);
    await after.close();
    expect(content.every((byte) => byte === 7)).toBe(true);
  });

  it('asks for a size when the backing file is missing and none is configured', async () => {
    await expectMetadataError(Metadata.create({ diskPath: diskPath(), metaDisk: 'internal' }), 'EINVAL', /does not exist and no size is configured/);
  });

  it('supports an external meta-disk', async () => {
    const disk = diskPath();
    const meta = `${disk}.meta`;
    const md = await Metadata.create({ diskPath: disk, metaDisk: meta, dataSizeBytes: 32 * MiB });
    expect((await stat(disk)).size).toBe(32 * MiB);
    expect((await stat(meta)).size).toBe(metadataSizeBytes(32 * MiB));
    md.bitmap.setRange(32 * MiB - 4096, 4096);
    await md.close();
    const again = await Metadata.open(disk, meta);
    expect(again.bitmap.isSet(again.bitmap.blockCount - 1)).toBe(true);
    await again.close();
  });
});

describe('Metadata on a block device', () => {
  it('sizes internal metadata from the device size (a loop device) and survives reopen', async () => {
    const backing = diskPath();
    await writeFile(backing, Buffer.alloc(0));
    const handle = await open(backing, 'r+');
    await handle.truncate(48 * MiB);
    await handle.close();
    const device = execFileSync('losetup', ['-f', '--show', backing], { encoding: 'utf8' }).trim();
    try {
      const md = await Metadata.create({ diskPath: device, metaDisk: 'internal', nodeName: 'alice' });
      expect(md.dataSizeBytes).toBe(maxDataSizeBytes(48 * MiB));
      md.bitmap.setRange(md.dataSizeBytes - 4096, 4096);
      await md.close();
      await expectMetadataError(Metadata.create({ diskPath: device, metaDisk: 'internal' }), 'EEXIST', /already holds drbdts metadata/);
      const again = await Metadata.open(device, 'internal');
      expect(again.nodeName).toBe('alice');
      expect(again.bitmap.setBits()).toBe(1);
      await again.close();
      // The metadata went through the device to the end of the backing file.
      expect((await Metadata.read(backing, 'internal'))!.dataSizeBytes).toBe(maxDataSizeBytes(48 * MiB));
    } finally {
      execFileSync('losetup', ['-d', device]);
    }
  });
});

describe('maxDataSizeBytes', () => {
  it('is the largest 4 KiB multiple that fits with its metadata, for sizes around bitmap page boundaries', () => {
    const sizes = [2 * MiB, 128 * MiB + 4096 * 7, 1024 * MiB + metadataSizeBytes(1024 * MiB), 3 * 1024 ** 4 + 12345];
    for (let i = 0; i < 200; i += 1) sizes.push(MiB + Math.floor(((i * 2654435761) % 4096) * 1.3e9 / 4096) * 4096 + (i % 7));
    for (const backing of sizes) {
      const data = maxDataSizeBytes(backing);
      expect(data % 4096).toBe(0);
      expect(data + metadataSizeBytes(data)).toBeLessThanOrEqual(backing);
      expect(data + 4096 + metadataSizeBytes(data + 4096)).toBeGreaterThan(backing);
    }
  });
});

describe('Metadata superblock slots', () => {
  async function superblockSlotOffset(disk: string, slot: number): Promise<number> {
    return (await stat(disk)).size - 2 * 4096 + slot * 4096;
  }

  it('falls back to the older slot after a half-written (torn) newest slot', async () => {
    const disk = diskPath();
    const md = await Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes: 8 * MiB });
    md.uuids = { current: 0xaaaan, bitmap: 0n, history: [0n, 0n] };
    await md.writeSuperblock();
    md.uuids = { current: 0xbbbbn, bitmap: 0n, history: [0n, 0n] };
    await md.close(); // the newest slot: current B, clean
    const before = (await Metadata.read(disk, 'internal'))!;
    expect(before.uuids.current).toBe(0xbbbbn);
    expect(before.cleanShutdown).toBe(true);
    // Tear the newest slot: its second half never reached the disk (still old bytes: zeros here).
    const handle = await open(disk, 'r+');
    await handle.write(Buffer.alloc(2048, 0), 0, 2048, (await superblockSlotOffset(disk, before.superblockSlot)) + 2048);
    await handle.close();
    const after = (await Metadata.read(disk, 'internal'))!;
    expect(after.superblockSlot).toBe(1 - before.superblockSlot);
    expect(after.sequence).toBe(before.sequence - 1n);
    expect(after.uuids.current).toBe(0xaaaan);
    expect(after.cleanShutdown).toBe(false); // that write was made while open: reopening counts as crash recovery
    const reopened = await Metadata.open(disk, 'internal');
    expect(reopened.uuids.current).toBe(0xaaaan);
    expect(reopened.recoveredFromCrash).toBe(true);
    await reopened.close();
  });

  it('ignores a slot with one flipped byte, and reports no metadata when both are bad', async () => {
    const disk = diskPath();
    const md = await Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes: 8 * MiB });
    md.uuids.current = 0x1234n;
    await md.close();
    const newest = (await Metadata.read(disk, 'internal'))!;
    const handle = await open(disk, 'r+');
    const offset = await superblockSlotOffset(disk, newest.superblockSlot);
    const byte = Buffer.alloc(1);
    await handle.read(byte, 0, 1, offset + 50);
    byte[0] = byte[0]! ^ 0x01;
    await handle.write(byte, 0, 1, offset + 50);
    const fallback = (await Metadata.read(disk, 'internal'))!;
    expect(fallback.superblockSlot).toBe(1 - newest.superblockSlot);
    await handle.write(Buffer.alloc(4096, 0xee), 0, 4096, await superblockSlotOffset(disk, fallback.superblockSlot));
    await handle.close();
    expect(await Metadata.read(disk, 'internal')).toBeNull();
    await expectMetadataError(Metadata.open(disk, 'internal'), 'ENOMETA', /has no valid drbdts metadata \(run "drbdts create-md RES"\)/);
  });
});

describe('Metadata lock', () => {
  it('refuses a disk locked by another process, and opens once that process is SIGKILLed', async () => {
    const disk = diskPath();
    await (await Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes: 8 * MiB })).close();
    // Another process holds the lock exactly as a daemon does: flock(LOCK_EX) on its own open of the disk.
    const script = `const f=require('fs-ext');const fs=require('fs');const fd=fs.openSync(${JSON.stringify(disk)},'r+');` +
      `f.flockSync(fd,'ex');console.log('locked');setInterval(()=>{},1e6);`;
    const holder = await spawnUntil(process.execPath, ['-e', script], /locked/, { cwd: repoRoot });
    await expectMetadataError(Metadata.open(disk, 'internal'), 'ELOCKED', /is in use by another drbdts process/);
    await expectMetadataError(Metadata.create({ diskPath: disk, metaDisk: 'internal', force: true }), 'ELOCKED', /in use/);
    holder.child.kill('SIGKILL');
    await waitExit(holder.child);
    const md = await Metadata.open(disk, 'internal');
    // A second open in this very process is refused too: one daemon per disk.
    await expectMetadataError(Metadata.open(disk, 'internal'), 'ELOCKED', /in use/);
    await md.close();
  });
});

describe('Metadata bitmap and activity log persistence', () => {
  it('writes back only the bitmap pages that changed', async () => {
    const disk = diskPath();
    const dataSizeBytes = 1024 * MiB; // 8 bitmap pages of 128 MiB each (the file is sparse)
    const md = await Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes });
    expect(md.bitmap.pageCount).toBe(8);
    const bitmapOffset = (await stat(disk)).size - md.metadataSizeBytes;
    // Plant a marker in page 3 behind Metadata's back: a write-back that rewrote every page would erase it.
    const handle = await open(disk, 'r+');
    await handle.write(Buffer.from([0x01]), 0, 1, bitmapOffset + 3 * BITMAP_PAGE_BYTES);
    const perPage = BITMAP_PAGE_BYTES * 8 * BITMAP_BLOCK_BYTES;
    const writesBefore = md.bitmapWrites;
    md.bitmap.setRange(4096, 4096);
    md.bitmap.setRange(5 * perPage, 8192);
    await md.writeBitmap();
    expect(md.bitmapWrites - writesBefore).toBe(2); // pages 0 and 5, not adjacent: two writes
    await md.writeBitmap();
    expect(md.bitmapWrites - writesBefore).toBe(2); // nothing changed: nothing written
    const page = Buffer.alloc(1);
    await handle.read(page, 0, 1, bitmapOffset + 3 * BITMAP_PAGE_BYTES);
    expect(page[0]).toBe(0x01);
    await handle.close();
    await md.close();
    const again = await Metadata.open(disk, 'internal');
    expect(again.bitmap.isSet(1)).toBe(true);
    expect(again.bitmap.isSet((5 * perPage) / 4096 + 1)).toBe(true);
    expect(again.bitmap.isSet((3 * perPage) / 4096)).toBe(true); // the planted marker
    expect(again.bitmap.setBits()).toBe(4);
    await again.close();
  });

  it('rotates generation UUIDs like DRBD', async () => {
    const md = await Metadata.create({ diskPath: diskPath(), metaDisk: 'internal', dataSizeBytes: 8 * MiB });
    await md.newCurrentUuid();
    const first = md.uuids.current;
    expect(first).not.toBe(0n);
    expect(md.uuids.bitmap).toBe(0n); // was empty: the bitmap UUID takes the old (empty) current
    await md.clearBitmapUuid();
    await md.newCurrentUuid(); // disconnected primary: bitmap UUID = what the peer last had
    expect(md.uuids.bitmap).toBe(first);
    const second = md.uuids.current;
    await md.newCurrentUuid(); // again while the bitmap UUID is set: it stays, the old current goes to history
    expect(md.uuids.bitmap).toBe(first);
    expect(md.uuids.history[0]).toBe(second);
    await md.clearBitmapUuid();
    expect(md.uuids.bitmap).toBe(0n);
    expect(md.uuids.history[0]).toBe(first);
    await md.close();
  });

  it('persists the hot AL extents before the writes proceed, and is marked unclean while open', async () => {
    const disk = diskPath();
    const md = await Metadata.create({ diskPath: disk, metaDisk: 'internal', dataSizeBytes: 64 * MiB });
    await md.activityLog.beginWrite(AL_EXTENT_BYTES * 3 + 100, 4096);
    await md.activityLog.beginWrite(AL_EXTENT_BYTES * 9, 8192);
    // Read from disk, not from memory: this is what a restart after a crash at this moment would see.
    const snapshot = (await Metadata.read(disk, 'internal'))!;
    expect(snapshot.cleanShutdown).toBe(false);
    expect(snapshot.hotExtents).toEqual([3, 9]);
    md.activityLog.endWrite(AL_EXTENT_BYTES * 3 + 100, 4096);
    md.activityLog.endWrite(AL_EXTENT_BYTES * 9, 8192);
    await md.close();
    expect((await Metadata.read(disk, 'internal'))!.cleanShutdown).toBe(true);
  });
});
