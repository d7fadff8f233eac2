// Proves LocalDisk keeps the BlockDevice contract on real storage: a sparse file on the test machine's disk, a
// file on tmpfs, a file on a freshly made ext2 filesystem (no ZERO_RANGE, no preallocation: the slow zeroing
// path and FAST_ZERO's refusal), and a real loop device (BLKGETSIZE64, BLKDISCARD, BLKZEROOUT). Every check
// reads the bytes back independently with plain fs calls or looks at the allocation the kernel reports.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { LocalDisk } from '../src/blockdev/local.js';
import { BlockDeviceError, EXTENT_HOLE, EXTENT_ZERO } from '../src/blockdev/types.js';

const MiB = 1024 * 1024;
let tempDir: string;
const disks: LocalDisk[] = [];
const cleanups: (() => void)[] = [];

async function openDisk(...args: Parameters<typeof LocalDisk.open>): Promise<LocalDisk> {
  const disk = await LocalDisk.open(...args);
  disks.push(disk);
  return disk;
}

function readFileAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const buffer = Buffer.alloc(length);
    expect(fs.readSync(fd, buffer, 0, length, offset)).toBe(length);
    return buffer;
  } finally {
    fs.closeSync(fd);
  }
}

function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}

function allZero(buffer: Buffer): boolean {
  return buffer.every((byte) => byte === 0);
}

async function rejection(promise: Promise<unknown>): Promise<BlockDeviceError> {
  const error = await promise.then(
    () => null,
    (reason: unknown) => reason,
  );
  expect(error).toBeInstanceOf(BlockDeviceError);
  return error as BlockDeviceError;
}

beforeAll(() => {
  tempDir = fs.mkdtempSync(path.join(os.tmpdir(), 'drbdts-local-disk-'));
});

afterEach(async () => {
  await Promise.all(disks.splice(0).map((disk) => disk.close()));
});

afterAll(() => {
  for (const cleanup of cleanups.reverse()) cleanup();
  fs.rmSync(tempDir, { recursive: true, force: true });
});

describe('LocalDisk on a file', () => {
  // Creating a missing file, then writes (plain and FUA) and reads of odd sizes and offsets, checked against
  // the file's bytes as plain fs sees them.
  it('creates a missing file and reads back what it wrote', async () => {
    const file = path.join(tempDir, 'create.img');
    const disk = await openDisk(file, { createSizeBytes: 16 * MiB });
    expect(disk.sizeBytes).toBe(16 * MiB);
    expect(disk.backingSizeBytes).toBe(16 * MiB);
    expect(disk.isBlockDevice).toBe(false);
    expect(disk.path).toBe(file);
    expect(fs.statSync(file).size).toBe(16 * MiB);
    const capabilities = disk.capabilities();
    expect(capabilities).toMatchObject({ readOnly: false, canFlush: true, canFua: true, canTrim: true, canZero: true });
    expect(capabilities.blockSizeMaximumBytes).toBeGreaterThanOrEqual(MiB);

    const payload = Buffer.alloc(3 * MiB + 17);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 7 + 3) & 0xff;
    await disk.write(12345, payload, false);
    await disk.write(8 * MiB, Buffer.from('durable before the reply'), true);
    await disk.flush();
    expect(readFileAt(file, 12345, payload.length).equals(payload)).toBe(true);
    expect(readFileAt(file, 8 * MiB, 24).toString()).toBe('durable before the reply');
    const back = Buffer.alloc(payload.length);
    await disk.read(12345, back);
    expect(back.equals(payload)).toBe(true);
    // A second open of an existing file ignores createSizeBytes and keeps the data.
    await disk.close();
    const again = await openDisk(file, { createSizeBytes: MiB });
    expect(again.sizeBytes).toBe(16 * MiB);
    const first = Buffer.alloc(24);
    await again.read(8 * MiB, first);
    expect(first.toString()).toBe('durable before the reply');
  });

  // Out-of-range requests fail with the errno NBD prescribes and change nothing; sizeBytes hides the tail
  // (where the metadata lives) from every operation.
  it('checks bounds, read-only and closed state, and keeps the area past sizeBytes untouched', async () => {
    const file = path.join(tempDir, 'bounds.img');
    fs.writeFileSync(file, Buffer.alloc(2 * MiB, 0xee));
    const disk = await openDisk(file, { sizeBytes: MiB });
    expect(disk.sizeBytes).toBe(MiB);
    expect(disk.backingSizeBytes).toBe(2 * MiB);
    expect((await rejection(disk.read(MiB - 1, Buffer.alloc(2)))).code).toBe('EINVAL');
    expect((await rejection(disk.write(MiB - 1, Buffer.alloc(2), false))).code).toBe('ENOSPC');
    expect((await rejection(disk.trim(MiB, 1, false))).code).toBe('EINVAL');
    expect((await rejection(disk.zero(MiB - 4096, 8192, { fua: false, noHole: false, fastZero: false }))).code).toBe(
      'ENOSPC',
    );
    expect((await rejection(disk.blockStatus(0, MiB + 1))).code).toBe('EINVAL');
    expect((await rejection(disk.read(-1, Buffer.alloc(1)))).code).toBe('EINVAL');
    // Requests reaching exactly the end are fine.
    await disk.write(MiB - 4, Buffer.from([1, 2, 3, 4]), true);
    await disk.zero(0, 4096, { fua: true, noHole: false, fastZero: false });
    expect(readFileAt(file, MiB - 4, 4)).toEqual(Buffer.from([1, 2, 3, 4]));
    expect(readFileAt(file, MiB, MiB).every((byte) => byte === 0xee)).toBe(true);

    const readOnly = await openDisk(file, { readOnly: true });
    expect(readOnly.capabilities()).toMatchObject({ readOnly: true, canTrim: false, canZero: false });
    expect((await rejection(readOnly.write(0, Buffer.alloc(1), false))).code).toBe('EPERM');
    expect((await rejection(readOnly.trim(0, 4096, false))).code).toBe('EPERM');
    expect((await rejection(readOnly.zero(0, 4096, { fua: false, noHole: false, fastZero: false }))).code).toBe('EPERM');
    const head = Buffer.alloc(4096);
    await readOnly.read(0, head);
    expect(allZero(head)).toBe(true);

    await disk.close();
    expect((await rejection(disk.read(0, Buffer.alloc(1)))).code).toBe('ESHUTDOWN');
    expect((await rejection(disk.flush())).code).toBe('ESHUTDOWN');
  });

  // close() while trims, zeroes (some FUA) and writes are running: every admitted operation completes on the
  // still-open descriptor (none fails with EBADF, none lands on a reused descriptor), then close resolves.
  it('close waits for admitted operations, including trims and zeroes', async () => {
    const file = path.join(tempDir, 'close.img');
    fs.writeFileSync(file, Buffer.alloc(8 * MiB, 0x21));
    const disk = await openDisk(file);
    const operations: Promise<void>[] = [];
    for (let i = 0; i < 8; i++) {
      const offset = i * MiB;
      if (i % 3 === 0) operations.push(disk.trim(offset, MiB, true));
      else if (i % 3 === 1) operations.push(disk.zero(offset, MiB, { fua: true, noHole: true, fastZero: false }));
      else operations.push(disk.write(offset, Buffer.alloc(MiB, 0), true));
    }
    const closed = disk.close();
    expect((await rejection(disk.zero(0, 4096, { fua: false, noHole: false, fastZero: false }))).code).toBe('ESHUTDOWN');
    const outcomes = await Promise.allSettled(operations);
    expect(outcomes.filter((outcome) => outcome.status === 'rejected')).toEqual([]);
    await closed;
    expect(allZero(fs.readFileSync(file))).toBe(true);
  });

  // Operator errors name the path and what is wrong with it.
  it('refuses bad paths and sizes with clear messages', async () => {
    const missing = path.join(tempDir, 'missing.img');
    await expect(LocalDisk.open(missing)).rejects.toThrow(`cannot open ${missing}: does not exist`);
    await expect(LocalDisk.open(tempDir)).rejects.toThrow(/is a directory/);
    await expect(LocalDisk.open('/dev/null')).rejects.toThrow(/neither a regular file nor a block device/);
    const small = path.join(tempDir, 'small.img');
    fs.writeFileSync(small, Buffer.alloc(4096));
    await expect(LocalDisk.open(small, { sizeBytes: 8192 })).rejects.toThrow(
      `cannot expose 8192 bytes of ${small}: it holds only 4096 bytes`,
    );
    await expect(LocalDisk.open(small, { sizeBytes: -1 })).rejects.toThrow(/sizeBytes must be a non-negative integer/);
    expect(fs.statSync(small).size).toBe(4096);
  });

  // TRIM punches a hole the kernel really deallocates, and block status reports holes and data where they are.
  it('trims by punching holes and reports extents from SEEK_DATA/SEEK_HOLE', async () => {
    const file = path.join(tempDir, 'trim.img');
    const disk = await openDisk(file, { createSizeBytes: 8 * MiB });
    expect(await disk.blockStatus(0, 8 * MiB)).toEqual([{ lengthBytes: 8 * MiB, flags: EXTENT_HOLE | EXTENT_ZERO }]);
    await disk.write(MiB, Buffer.alloc(2 * MiB, 0x42), true);
    expect(await disk.blockStatus(0, 8 * MiB)).toEqual([
      { lengthBytes: MiB, flags: EXTENT_HOLE | EXTENT_ZERO },
      { lengthBytes: 2 * MiB, flags: 0 },
      { lengthBytes: 5 * MiB, flags: EXTENT_HOLE | EXTENT_ZERO },
    ]);
    // A range starting inside data, ending inside the following hole.
    expect(await disk.blockStatus(2 * MiB, 2 * MiB)).toEqual([
      { lengthBytes: MiB, flags: 0 },
      { lengthBytes: MiB, flags: EXTENT_HOLE | EXTENT_ZERO },
    ]);
    const allocatedBefore = allocatedBytes(file);
    await disk.trim(MiB + 512 * 1024, MiB, true);
    expect(allocatedBytes(file)).toBe(allocatedBefore - MiB);
    expect(allZero(readFileAt(file, MiB + 512 * 1024, MiB))).toBe(true);
    expect(readFileAt(file, MiB, 512 * 1024).every((byte) => byte === 0x42)).toBe(true);
    const extents = await disk.blockStatus(0, 8 * MiB);
    expect(extents.map((extent) => extent.flags)).toEqual([3, 0, 3, 0, 3]);
    expect(extents.reduce((sum, extent) => sum + extent.lengthBytes, 0)).toBe(8 * MiB);
  });

  // WRITE_ZEROES: without NO_HOLE the range is deallocated; with NO_HOLE it stays allocated; both read as zeros.
  it('zeroes by punching, or in place with NO_HOLE', async () => {
    const file = path.join(tempDir, 'zero.img');
    fs.writeFileSync(file, Buffer.alloc(4 * MiB, 0x99));
    const disk = await openDisk(file);
    const allocatedBefore = allocatedBytes(file);
    await disk.zero(0, MiB, { fua: true, noHole: true, fastZero: true });
    expect(allocatedBytes(file)).toBe(allocatedBefore);
    await disk.zero(2 * MiB, MiB, { fua: false, noHole: false, fastZero: true });
    expect(allocatedBytes(file)).toBe(allocatedBefore - MiB);
    // An unaligned range: the partial blocks at both ends are zeroed, their neighbours kept.
    await disk.zero(MiB + 100, 5000, { fua: false, noHole: false, fastZero: false });
    expect(allZero(readFileAt(file, 0, MiB))).toBe(true);
    expect(allZero(readFileAt(file, MiB + 100, 5000))).toBe(true);
    expect(readFileAt(file, MiB, 100).every((byte) => byte === 0x99)).toBe(true);
    expect(readFileAt(file, MiB + 5100, 4096).every((byte) => byte === 0x99)).toBe(true);
    expect(allZero(readFileAt(file, 2 * MiB, MiB))).toBe(true);
    expect(readFileAt(file, 3 * MiB, MiB).every((byte) => byte === 0x99)).toBe(true);
  });

  // tmpfs has no ZERO_RANGE: NO_HOLE zeroing must still be fast (punch, then allocate) and leave blocks allocated.
  it.runIf(fs.existsSync('/dev/shm'))('zeroes with NO_HOLE on tmpfs by punching and re-allocating', async () => {
    const shmDir = fs.mkdtempSync('/dev/shm/drbdts-local-disk-');
    cleanups.push(() => fs.rmSync(shmDir, { recursive: true, force: true }));
    const file = path.join(shmDir, 'zero.img');
    fs.writeFileSync(file, Buffer.alloc(2 * MiB, 0x11));
    const disk = await openDisk(file);
    const allocatedBefore = allocatedBytes(file);
    await disk.zero(0, MiB, { fua: false, noHole: true, fastZero: true });
    expect(allZero(readFileAt(file, 0, MiB))).toBe(true);
    expect(readFileAt(file, MiB, MiB).every((byte) => byte === 0x11)).toBe(true);
    expect(allocatedBytes(file)).toBe(allocatedBefore);
  });
});

describe('LocalDisk on ext2 (no ZERO_RANGE, no preallocation)', () => {
  // A real ext2 filesystem on a loop-mounted image. Without extents the kernel refuses ZERO_RANGE and plain
  // fallocate, so NO_HOLE zeroing can only write zeros: FAST_ZERO must fail with ENOTSUP and change nothing,
  // and without FAST_ZERO the zeros are written and stay allocated.
  it('writes zeros when it must, and refuses FAST_ZERO then', async () => {
    const image = path.join(tempDir, 'ext2.img');
    const mountPoint = path.join(tempDir, 'ext2');
    fs.mkdirSync(mountPoint);
    fs.writeFileSync(image, Buffer.alloc(0));
    fs.truncateSync(image, 64 * MiB);
    execFileSync('mkfs.ext2', ['-q', '-F', image]);
    execFileSync('mount', ['-o', 'loop', image, mountPoint]);
    cleanups.push(() => execFileSync('umount', [mountPoint]));
    const file = path.join(mountPoint, 'disk.img');
    fs.writeFileSync(file, Buffer.alloc(4 * MiB, 0x33));
    const disk = await openDisk(file);
    const refused = await rejection(disk.zero(0, MiB, { fua: false, noHole: true, fastZero: true }));
    expect(refused.code).toBe('ENOTSUP');
    expect(refused.message).toMatch(/FAST_ZERO/);
    expect(readFileAt(file, 0, MiB).every((byte) => byte === 0x33)).toBe(true);
    const allocatedBefore = allocatedBytes(file);
    await disk.zero(0, 3 * MiB, { fua: true, noHole: true, fastZero: false });
    expect(allZero(readFileAt(file, 0, 3 * MiB))).toBe(true);
    expect(allocatedBytes(file)).toBe(allocatedBefore);
    expect(readFileAt(file, 3 * MiB, MiB).every((byte) => byte === 0x33)).toBe(true);
    // The loop device under the mounted filesystem: a writable LocalDisk must refuse it (exclusive open),
    // a read-only one may look.
    const mountedDevice = execFileSync('findmnt', ['-n', '-o', 'SOURCE', mountPoint], { encoding: 'utf8' }).trim();
    expect(mountedDevice).toMatch(/^\/dev\/loop/);
    await expect(LocalDisk.open(mountedDevice)).rejects.toThrow(`cannot open ${mountedDevice}: is busy: mounted`);
    const peek = await openDisk(mountedDevice, { readOnly: true });
    expect(peek.isBlockDevice).toBe(true);
    expect(peek.sizeBytes).toBe(64 * MiB);
    // Punching holes works on ext2, so zeroing without NO_HOLE stays fast.
    await disk.zero(3 * MiB, MiB, { fua: false, noHole: false, fastZero: true });
    expect(allocatedBytes(file)).toBeLessThan(allocatedBefore);
    expect(allZero(readFileAt(file, 3 * MiB, MiB))).toBe(true);
    await disk.close();
  });
});

describe('LocalDisk on a real loop device', () => {
  // The device's size comes from BLKGETSIZE64; TRIM becomes BLKDISCARD (the loop driver punches the backing
  // file), WRITE_ZEROES becomes BLKZEROOUT, with unaligned edges written as zeros; data written through the
  // disk is visible in the backing file.
  it('serves a block device: size, read/write, discard, zero-out', async () => {
    const backing = path.join(tempDir, 'loop-backing.img');
    fs.writeFileSync(backing, Buffer.alloc(0));
    fs.truncateSync(backing, 32 * MiB);
    const device = execFileSync('losetup', ['-f', '--show', backing], { encoding: 'utf8' }).trim();
    cleanups.push(() => execFileSync('losetup', ['-d', device]));
    const disk = await openDisk(device);
    expect(disk.isBlockDevice).toBe(true);
    expect(disk.sizeBytes).toBe(32 * MiB);
    expect(disk.backingSizeBytes).toBe(32 * MiB);
    const capabilities = disk.capabilities();
    expect(capabilities.blockSizePreferredBytes).toBeGreaterThanOrEqual(512);
    // The loop driver implements REQ_OP_WRITE_ZEROES by fallocate on the backing file.
    expect(capabilities.canFastZero).toBe(true);

    await disk.write(0, Buffer.alloc(8 * MiB, 0x5c), true);
    expect(readFileAt(backing, 0, 8 * MiB).every((byte) => byte === 0x5c)).toBe(true);
    expect(await disk.blockStatus(0, MiB)).toEqual([{ lengthBytes: MiB, flags: 0 }]);

    await disk.zero(MiB + 100, MiB, { fua: true, noHole: true, fastZero: false });
    const zeroed = Buffer.alloc(MiB + 200);
    await disk.read(MiB, zeroed);
    expect(zeroed.subarray(0, 100).every((byte) => byte === 0x5c)).toBe(true);
    expect(allZero(zeroed.subarray(100, MiB + 100))).toBe(true);
    expect(zeroed.subarray(MiB + 100).every((byte) => byte === 0x5c)).toBe(true);
    expect(allZero(readFileAt(backing, MiB + 100, MiB))).toBe(true);

    const allocatedBefore = allocatedBytes(backing);
    await disk.trim(4 * MiB + 1, 2 * MiB, true);
    expect(allocatedBytes(backing)).toBeLessThan(allocatedBefore);
    // The partial first block was left alone (TRIM is a hint), so its first byte keeps its data.
    const edge = Buffer.alloc(1);
    await disk.read(4 * MiB, edge);
    expect(edge[0]).toBe(0x5c);
    await disk.close();
  });
});
