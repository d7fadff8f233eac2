// On-disk metadata of one node of a resource: superblock (sizes, generation UUIDs, flags), activity log and
// dirty bitmap. It lives at the end of the file or device that holds it: the backing disk itself for
// meta-disk "internal" (the data area is [0, dataSizeBytes)), or a separate meta file. Layout of that region,
// from low to high offsets, ending at the end of the file:
//
//   [bitmap, whole 4 KiB pages][AL slot 0][AL slot 1][superblock slot 0 (4 KiB)][superblock slot 1 (4 KiB)]
//
// The superblock sits at a fixed distance from the end so `open` finds it without knowing the data size.
// Superblocks and AL records are written alternately into two slots, each with a sequence number and a
// SHA-256 over the record: a torn or half-written slot fails its checksum and the other (older, complete)
// slot is used. A running Metadata writes through a second handle opened O_DSYNC: each write is durable when
// it returns, and the kernel syncs only that range. An fdatasync on the backing file would also flush every
// dirty page of the data area (internal meta-disk), which made each AL transaction cost a full writeback.
//
// One process at a time: open() takes an exclusive flock on the disk (and the meta file). The kernel drops a
// flock when its holder dies, so a SIGKILLed daemon leaves no stale lock behind.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp, constants as fsConstants } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { ActivityLog, AL_EXTENT_BYTES, AL_EXTENTS_DEFAULT, AL_EXTENTS_MIN, AL_WIDE_MAX, type ExtentRange } from './activity-log.js';
import { Bitmap, BITMAP_BLOCK_BYTES, BITMAP_PAGE_BYTES } from './bitmap.js';
import { newUuid, type GenerationUuids } from './uuids.js';

export type { GenerationUuids };

export interface MetadataFlags {
  consistent: boolean;
  wasUpToDate: boolean;
  wasPrimary: boolean;
  crashedPrimary: boolean;
  peerOutdated: boolean;
  resyncInProgress: boolean;
  /** This node's data was outdated (`drbdts outdate`, a fence-peer handler): not promoted without --force. */
  outdated: boolean;
}

export interface CreateMetadataOptions {
  diskPath: string;
  metaDisk: 'internal' | string;
  dataSizeBytes?: number;
  force?: boolean;
  nodeName?: string;
  resourceName?: string;
  alExtents?: number;
}

export type MetadataErrorCode = 'ENOMETA' | 'EEXIST' | 'ETOOSMALL' | 'ELOCKED' | 'EINVAL' | 'EIO';

export class MetadataError extends Error {
  readonly code: MetadataErrorCode;
  constructor(code: MetadataErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'MetadataError';
    this.code = code;
  }
}

/** What `Metadata.read` reports without locking (for tools and tests). */
export interface MetadataSnapshot {
  dataSizeBytes: number;
  metadataSizeBytes: number;
  nodeName: string;
  resourceName: string;
  uuids: GenerationUuids;
  flags: MetadataFlags;
  cleanShutdown: boolean;
  sequence: bigint;
  superblockSlot: number;
  hotExtents: number[];
  wideRanges: ExtentRange[];
  dirtyBlocks: number;
}

const MAGIC = Buffer.from('DRBDTSMD', 'latin1');
const AL_MAGIC = Buffer.from('DRBDTSAL', 'latin1');
const VERSION = 1;
const SLOT_BYTES = 4096;
const CHECKSUM_BYTES = 32;
const NAME_BYTES = 64;
const AL_HEADER_BYTES = 32;
const MIN_DATA_BYTES = 1024 * 1024;

const FLAG_CONSISTENT = 1 << 0;
const FLAG_WAS_UP_TO_DATE = 1 << 1;
const FLAG_WAS_PRIMARY = 1 << 2;
const FLAG_CRASHED_PRIMARY = 1 << 3;
const FLAG_PEER_OUTDATED = 1 << 4;
const FLAG_RESYNC_IN_PROGRESS = 1 << 5;
const FLAG_OUTDATED = 1 << 7;
/** Set by close(); cleared as soon as a daemon opens the metadata. Absent at open = the last run crashed. */
const FLAG_CLEAN = 1 << 6;

function roundUp(value: number, unit: number): number {
  return Math.ceil(value / unit) * unit;
}

function alSlotBytes(alExtents: number): number {
  return roundUp(AL_HEADER_BYTES + 4 * alExtents + 8 * AL_WIDE_MAX + CHECKSUM_BYTES, 4096);
}

function bitmapAreaBytes(dataSizeBytes: number): number {
  return roundUp(Math.ceil(Math.ceil(dataSizeBytes / BITMAP_BLOCK_BYTES) / 64) * 8, BITMAP_PAGE_BYTES);
}

export function metadataSizeBytes(dataSizeBytes: number, alExtents = AL_EXTENTS_DEFAULT): number {
  return bitmapAreaBytes(dataSizeBytes) + 2 * alSlotBytes(alExtents) + 2 * SLOT_BYTES;
}

/** The largest 4 KiB-aligned data area that fits with its internal metadata into `backingSizeBytes`. */
export function maxDataSizeBytes(backingSizeBytes: number, alExtents = AL_EXTENTS_DEFAULT): number {
  // The bitmap grows by 4 KiB per 128 MiB of data: iterate to the fixed point data = B - fixed - bitmap(data)
  // (bitmap size is monotonic, so this settles in a few rounds), then nudge by 4 KiB to the exact largest fit.
  const fixed = 2 * SLOT_BYTES + 2 * alSlotBytes(alExtents);
  const floor4k = (value: number): number => Math.max(0, Math.floor(value / 4096) * 4096);
  let data = floor4k(backingSizeBytes - fixed);
  for (let round = 0; round < 64; round += 1) {
    const next = floor4k(backingSizeBytes - fixed - bitmapAreaBytes(data));
    if (next === data) break;
    data = next;
  }
  while (data > 0 && data + metadataSizeBytes(data, alExtents) > backingSizeBytes) data -= 4096;
  while (data + 4096 + metadataSizeBytes(data + 4096, alExtents) <= backingSizeBytes) data += 4096;
  return Math.max(0, data);
}

type FlockFn = (fd: number, flags: string, callback: (error: NodeJS.ErrnoException | null) => void) => void;
const { flock } = createRequire(import.meta.url)('fs-ext') as { flock: FlockFn };

async function lockExclusive(handle: fsp.FileHandle, file: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    flock(handle.fd, 'exnb', (error) => {
      if (error === null) return resolve();
      if (error.code === 'EWOULDBLOCK' || error.code === 'EAGAIN') {
        reject(new MetadataError('ELOCKED', `${file} is in use by another drbdts process (it holds the lock); ` +
          'stop that daemon first ("drbdts down RES")'));
      } else {
        reject(new MetadataError('EIO', `${file}: cannot lock: ${error.message}`, { cause: error }));
      }
    });
  });
}

async function sizeOf(handle: fsp.FileHandle, file: string): Promise<number> {
  const stat = await handle.stat();
  if (stat.isFile()) return stat.size;
  if (stat.isBlockDevice()) {
    const native = await import('../native/index.js');
    return native.blockDeviceSizeBytes(handle.fd);
  }
  throw new MetadataError('EINVAL', `${file} is neither a regular file nor a block device`);
}

async function readExactly(handle: fsp.FileHandle, buffer: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buffer.length) {
    const { bytesRead } = await handle.read(buffer, done, buffer.length - done, position + done);
    if (bytesRead === 0) throw new MetadataError('EIO', `short read at offset ${position + done}`);
    done += bytesRead;
  }
}

async function writeExactly(handle: fsp.FileHandle, buffer: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buffer.length) {
    const { bytesWritten } = await handle.write(buffer, done, buffer.length - done, position + done);
    done += bytesWritten;
  }
}

function checksum(buffer: Buffer, end: number): Buffer {
  return createHash('sha256').update(buffer.subarray(0, end)).digest();
}

function writeName(buffer: Buffer, offset: number, name: string): void {
  const bytes = Buffer.from(name, 'utf8');
  assert.ok(bytes.length <= NAME_BYTES, `name "${name}" longer than ${NAME_BYTES} bytes`);
  buffer.fill(0, offset, offset + NAME_BYTES);
  bytes.copy(buffer, offset);
}

function readName(buffer: Buffer, offset: number): string {
  const raw = buffer.subarray(offset, offset + NAME_BYTES);
  const end = raw.indexOf(0);
  return raw.subarray(0, end === -1 ? NAME_BYTES : end).toString('utf8');
}

interface Superblock {
  sequence: bigint;
  dataSizeBytes: number;
  metadataSizeBytes: number;
  alExtents: number;
  flagBits: number;
  uuids: GenerationUuids;
  lastPromotedMs: number;
  createdMs: number;
  nodeName: string;
  resourceName: string;
}

// Superblock record (little endian), one 4 KiB slot:
//   0 magic[8]  8 version u32  12 slot u32  16 sequence u64  24 dataSizeBytes u64  32 metadataSizeBytes u64
//   40 alExtents u32  44 flags u32  48 current u64  56 bitmap u64  64 history0 u64  72 history1 u64
//   80 lastPromotedMs u64  88 createdMs u64  128 nodeName[64]  192 resourceName[64]  4064 sha256[32]
function encodeSuperblock(sb: Superblock, slot: number): Buffer {
  const buffer = Buffer.alloc(SLOT_BYTES);
  MAGIC.copy(buffer, 0);
  buffer.writeUInt32LE(VERSION, 8);
  buffer.writeUInt32LE(slot, 12);
  buffer.writeBigUInt64LE(sb.sequence, 16);
  buffer.writeBigUInt64LE(BigInt(sb.dataSizeBytes), 24);
  buffer.writeBigUInt64LE(BigInt(sb.metadataSizeBytes), 32);
  buffer.writeUInt32LE(sb.alExtents, 40);
  buffer.writeUInt32LE(sb.flagBits, 44);
  buffer.writeBigUInt64LE(sb.uuids.current, 48);
  buffer.writeBigUInt64LE(sb.uuids.bitmap, 56);
  buffer.writeBigUInt64LE(sb.uuids.history[0], 64);
  buffer.writeBigUInt64LE(sb.uuids.history[1], 72);
  buffer.writeBigUInt64LE(BigInt(sb.lastPromotedMs), 80);
  buffer.writeBigUInt64LE(BigInt(sb.createdMs), 88);
  writeName(buffer, 128, sb.nodeName);
  writeName(buffer, 192, sb.resourceName);
  checksum(buffer, SLOT_BYTES - CHECKSUM_BYTES).copy(buffer, SLOT_BYTES - CHECKSUM_BYTES);
  return buffer;
}

function decodeSuperblock(buffer: Buffer, slot: number): Superblock | null {
  if (!buffer.subarray(0, 8).equals(MAGIC)) return null;
  if (!checksum(buffer, SLOT_BYTES - CHECKSUM_BYTES).equals(buffer.subarray(SLOT_BYTES - CHECKSUM_BYTES))) return null;
  if (buffer.readUInt32LE(8) !== VERSION || buffer.readUInt32LE(12) !== slot) return null;
  return {
    sequence: buffer.readBigUInt64LE(16),
    dataSizeBytes: Number(buffer.readBigUInt64LE(24)),
    metadataSizeBytes: Number(buffer.readBigUInt64LE(32)),
    alExtents: buffer.readUInt32LE(40),
    flagBits: buffer.readUInt32LE(44),
    uuids: {
      current: buffer.readBigUInt64LE(48),
      bitmap: buffer.readBigUInt64LE(56),
      history: [buffer.readBigUInt64LE(64), buffer.readBigUInt64LE(72)],
    },
    lastPromotedMs: Number(buffer.readBigUInt64LE(80)),
    createdMs: Number(buffer.readBigUInt64LE(88)),
    nodeName: readName(buffer, 128),
    resourceName: readName(buffer, 192),
  };
}

// AL record: 0 magic[8]  8 sequence u64  16 count u32  20 alExtents u32  24 wideCount u32  28 reserved[4]
// 32 extents u32[count]  then wide ranges (first u32, last u32)[wideCount]  then sha256 over everything before.
interface AlRecord {
  sequence: bigint;
  extents: number[];
  wide: ExtentRange[];
}

function encodeAl(extents: readonly number[], wide: readonly ExtentRange[], sequence: bigint, alExtents: number): Buffer {
  assert.ok(extents.length <= alExtents && wide.length <= AL_WIDE_MAX, 'activity log record overflow');
  const buffer = Buffer.alloc(alSlotBytes(alExtents));
  AL_MAGIC.copy(buffer, 0);
  buffer.writeBigUInt64LE(sequence, 8);
  buffer.writeUInt32LE(extents.length, 16);
  buffer.writeUInt32LE(alExtents, 20);
  buffer.writeUInt32LE(wide.length, 24);
  let offset = AL_HEADER_BYTES;
  for (const extent of extents) {
    buffer.writeUInt32LE(extent, offset);
    offset += 4;
  }
  for (const range of wide) {
    buffer.writeUInt32LE(range.firstExtent, offset);
    buffer.writeUInt32LE(range.lastExtent, offset + 4);
    offset += 8;
  }
  checksum(buffer, offset).copy(buffer, offset);
  return buffer;
}

function decodeAl(buffer: Buffer, alExtents: number): AlRecord | null {
  if (!buffer.subarray(0, 8).equals(AL_MAGIC)) return null;
  const count = buffer.readUInt32LE(16);
  const wideCount = buffer.readUInt32LE(24);
  if (count > alExtents || wideCount > AL_WIDE_MAX || buffer.readUInt32LE(20) !== alExtents) return null;
  const end = AL_HEADER_BYTES + 4 * count + 8 * wideCount;
  if (!checksum(buffer, end).equals(buffer.subarray(end, end + CHECKSUM_BYTES))) return null;
  const extents: number[] = [];
  for (let i = 0; i < count; i += 1) extents.push(buffer.readUInt32LE(AL_HEADER_BYTES + 4 * i));
  const wide: ExtentRange[] = [];
  for (let i = 0; i < wideCount; i += 1) {
    const at = AL_HEADER_BYTES + 4 * count + 8 * i;
    wide.push({ firstExtent: buffer.readUInt32LE(at), lastExtent: buffer.readUInt32LE(at + 4) });
  }
  return { sequence: buffer.readBigUInt64LE(8), extents, wide };
}

function flagsFromBits(bits: number): MetadataFlags {
  return {
    consistent: (bits & FLAG_CONSISTENT) !== 0,
    wasUpToDate: (bits & FLAG_WAS_UP_TO_DATE) !== 0,
    wasPrimary: (bits & FLAG_WAS_PRIMARY) !== 0,
    crashedPrimary: (bits & FLAG_CRASHED_PRIMARY) !== 0,
    peerOutdated: (bits & FLAG_PEER_OUTDATED) !== 0,
    resyncInProgress: (bits & FLAG_RESYNC_IN_PROGRESS) !== 0,
    outdated: (bits & FLAG_OUTDATED) !== 0,
  };
}

function bitsFromFlags(flags: MetadataFlags, clean: boolean): number {
  return (flags.consistent ? FLAG_CONSISTENT : 0) | (flags.wasUpToDate ? FLAG_WAS_UP_TO_DATE : 0)
    | (flags.wasPrimary ? FLAG_WAS_PRIMARY : 0) | (flags.crashedPrimary ? FLAG_CRASHED_PRIMARY : 0)
    | (flags.peerOutdated ? FLAG_PEER_OUTDATED : 0) | (flags.resyncInProgress ? FLAG_RESYNC_IN_PROGRESS : 0)
    | (flags.outdated ? FLAG_OUTDATED : 0) | (clean ? FLAG_CLEAN : 0);
}

interface Layout {
  /** File holding the metadata (the disk itself for internal). */
  metaPath: string;
  regionOffset: number;
  bitmapOffset: number;
  bitmapBytes: number;
  alOffsets: [number, number];
  alSlotBytes: number;
  superblockOffsets: [number, number];
}

function layoutFor(metaPath: string, metaFileSizeBytes: number, dataSizeBytes: number, alExtents: number): Layout {
  const size = metadataSizeBytes(dataSizeBytes, alExtents);
  const regionOffset = metaFileSizeBytes - size;
  const bitmapBytes = bitmapAreaBytes(dataSizeBytes);
  const slot = alSlotBytes(alExtents);
  const alOffset = regionOffset + bitmapBytes;
  return {
    metaPath,
    regionOffset,
    bitmapOffset: regionOffset,
    bitmapBytes,
    alOffsets: [alOffset, alOffset + slot],
    alSlotBytes: slot,
    superblockOffsets: [metaFileSizeBytes - 2 * SLOT_BYTES, metaFileSizeBytes - SLOT_BYTES],
  };
}

/** Reads both superblock slots at the end of a meta file; the valid one with the higher sequence wins. */
async function readSuperblock(handle: fsp.FileHandle, fileSizeBytes: number): Promise<{ sb: Superblock; slot: number } | null> {
  if (fileSizeBytes < 2 * SLOT_BYTES) return null;
  const buffer = Buffer.alloc(2 * SLOT_BYTES);
  await readExactly(handle, buffer, fileSizeBytes - 2 * SLOT_BYTES);
  let best: { sb: Superblock; slot: number } | null = null;
  for (const slot of [0, 1]) {
    const sb = decodeSuperblock(buffer.subarray(slot * SLOT_BYTES, (slot + 1) * SLOT_BYTES), slot);
    if (sb !== null && (best === null || sb.sequence > best.sb.sequence)) best = { sb, slot };
  }
  return best;
}

async function readAl(handle: fsp.FileHandle, layout: Layout, alExtents: number): Promise<(AlRecord & { slot: number }) | null> {
  let best: (AlRecord & { slot: number }) | null = null;
  const buffer = Buffer.alloc(layout.alSlotBytes);
  for (const slot of [0, 1] as const) {
    await readExactly(handle, buffer, layout.alOffsets[slot]);
    const record = decodeAl(buffer, alExtents);
    if (record !== null && (best === null || record.sequence > best.sequence)) best = { ...record, slot };
  }
  return best;
}

/**
 * Why a disk has no superblock, for an operator about to reach for create-md: internal metadata lives at the end of
 * the disk, so a disk shrunk or truncated after create-md lost it with its tail, and create-md would then throw
 * away this node's data generation. With the configured size the expected length is known and the shortfall named.
 */
export async function explainMissingMetadata(options: {
  diskPath: string; metaDisk: 'internal' | string; configuredSizeBytes?: number; alExtents?: number; resource: string;
}): Promise<string> {
  const metaPath = metaPathOf(options.diskPath, options.metaDisk);
  let fileSizeBytes: number | null = null;
  try {
    const stat = await fsp.stat(metaPath);
    if (stat.isFile()) fileSizeBytes = stat.size;
  } catch {
    // unreadable or gone: said below without a size
  }
  const have = fileSizeBytes === null ? '' : ` (${fileSizeBytes} bytes)`;
  const fresh = `for a new disk, "drbdts create-md ${options.resource}" writes it`;
  if (options.configuredSizeBytes !== undefined && fileSizeBytes !== null) {
    const metaBytes = metadataSizeBytes(options.configuredSizeBytes, options.alExtents ?? AL_EXTENTS_DEFAULT);
    const needBytes = options.metaDisk === 'internal' ? options.configuredSizeBytes + metaBytes : metaBytes;
    if (fileSizeBytes < needBytes) {
      return `${metaPath} holds no drbdts metadata: it has ${fileSizeBytes} bytes, smaller than the ${needBytes} bytes ` +
        `that [disk] size (${options.configuredSizeBytes}) and its metadata take. If it was shrunk or truncated after ` +
        `create-md, its metadata (kept at its end) went with the lost part: grow it back to ${needBytes} bytes ` +
        '(truncate -s, lvextend) or restore it from a backup; create-md would start a new, empty data generation ' +
        `and a full sync from the peer would overwrite this node's data. Only ${fresh}`;
    }
  }
  return `${metaPath}${have} holds no drbdts metadata (no valid superblock at its end). If it held metadata before, ` +
    'its size changed since create-md: restore the former size or the disk (create-md would start a new, empty ' +
    `data generation); ${fresh}`;
}

function metaPathOf(diskPath: string, metaDisk: 'internal' | string): string {
  return metaDisk === 'internal' ? diskPath : metaDisk;
}

async function openFile(file: string, what: string): Promise<fsp.FileHandle> {
  try {
    return await fsp.open(file, fsConstants.O_RDWR);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new MetadataError('ENOMETA', `${what} ${file} does not exist (run "drbdts create-md RES")`);
    throw new MetadataError('EIO', `cannot open ${what} ${file}: ${(error as Error).message}`, { cause: error });
  }
}

export class Metadata {
  readonly diskPath: string;
  readonly metaDisk: 'internal' | string;
  readonly dataSizeBytes: number;
  readonly nodeName: string;
  readonly resourceName: string;
  readonly alExtents: number;
  uuids: GenerationUuids;
  flags: MetadataFlags;
  lastPromotedMs: number;
  readonly bitmap: Bitmap;
  readonly activityLog: ActivityLog;
  readonly recoveredFromCrash: boolean;
  /** Holds the flock; used for reads and to close. */
  readonly #handle: fsp.FileHandle;
  /** O_DSYNC handle for every metadata write (durable on return, only the written range synced). */
  readonly #syncHandle: fsp.FileHandle;
  /** The data disk's handle when the metadata is external: held only for its lock. */
  readonly #dataHandle: fsp.FileHandle | undefined;
  readonly #layout: Layout;
  readonly #createdMs: number;
  #sequence: bigint;
  #alSequence: bigint;
  #bitmapWrites = 0;
  #superblockWrites = 0;
  /** Serializes metadata writes: superblock slot alternation and fdatasync ordering depend on it. */
  #queue: Promise<unknown> = Promise.resolve();
  #closed = false;

  private constructor(args: {
    diskPath: string; metaDisk: 'internal' | string; handle: fsp.FileHandle; syncHandle: fsp.FileHandle;
    dataHandle: fsp.FileHandle | undefined;
    layout: Layout; sb: Superblock; bitmap: Bitmap; hot: number[]; alSequence: bigint; recovered: boolean;
  }) {
    this.diskPath = args.diskPath;
    this.metaDisk = args.metaDisk;
    this.#handle = args.handle;
    this.#syncHandle = args.syncHandle;
    this.#dataHandle = args.dataHandle;
    this.#layout = args.layout;
    this.dataSizeBytes = args.sb.dataSizeBytes;
    this.nodeName = args.sb.nodeName;
    this.resourceName = args.sb.resourceName;
    this.alExtents = args.sb.alExtents;
    this.uuids = { ...args.sb.uuids, history: [...args.sb.uuids.history] };
    this.flags = flagsFromBits(args.sb.flagBits);
    this.lastPromotedMs = args.sb.lastPromotedMs;
    this.#createdMs = args.sb.createdMs;
    this.#sequence = args.sb.sequence;
    this.#alSequence = args.alSequence;
    this.bitmap = args.bitmap;
    this.recoveredFromCrash = args.recovered;
    this.activityLog = new ActivityLog({
      dataSizeBytes: this.dataSizeBytes,
      maxHotExtents: this.alExtents,
      initialHot: args.hot,
      persist: (hot, evicted, wide) => this.#persistAl(hot, evicted, wide),
    });
  }

  get bitmapWrites(): number {
    return this.#bitmapWrites;
  }

  get superblockWrites(): number {
    return this.#superblockWrites;
  }

  get metadataSizeBytes(): number {
    return metadataSizeBytes(this.dataSizeBytes, this.alExtents);
  }

  static async create(options: CreateMetadataOptions): Promise<Metadata> {
    const alExtents = options.alExtents ?? AL_EXTENTS_DEFAULT;
    if (alExtents < AL_EXTENTS_MIN) throw new MetadataError('EINVAL', `al-extents ${alExtents} is below ${AL_EXTENTS_MIN}`);
    const internal = options.metaDisk === 'internal';
    const metaPath = metaPathOf(options.diskPath, options.metaDisk);
    const wanted = options.dataSizeBytes;
    if (wanted !== undefined && (wanted < MIN_DATA_BYTES || wanted % 4096 !== 0)) {
      throw new MetadataError('EINVAL', `data size ${wanted} bytes must be a multiple of 4096 and at least ${MIN_DATA_BYTES}`);
    }
    // A missing backing file is created big enough; that needs a size to make it.
    const ensure = async (file: string, sizeBytes: number | undefined, what: string): Promise<void> => {
      try {
        await fsp.stat(file);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
        if (sizeBytes === undefined) {
          throw new MetadataError('EINVAL', `${what} ${file} does not exist and no size is configured to create it ` +
            '(set [disk] size in the resource file)');
        }
        await fsp.mkdir(path.dirname(file), { recursive: true });
        const handle = await fsp.open(file, 'wx');
        try {
          await handle.truncate(sizeBytes);
        } finally {
          await handle.close();
        }
      }
    };
    if (internal) {
      await ensure(options.diskPath, wanted === undefined ? undefined : wanted + metadataSizeBytes(wanted, alExtents), 'disk');
    } else {
      await ensure(options.diskPath, wanted, 'disk');
      // Created empty; sized below once the data size (and so the bitmap size) is known.
      await ensure(metaPath, 0, 'meta-disk');
    }

    const dataHandle = internal ? undefined : await openFile(options.diskPath, 'disk');
    const handle = await openFile(metaPath, internal ? 'disk' : 'meta-disk').catch(async (error) => {
      await dataHandle?.close();
      throw error;
    });
    try {
      if (dataHandle !== undefined) await lockExclusive(dataHandle, options.diskPath);
      await lockExclusive(handle, metaPath);
      let dataSizeBytes: number;
      let metaFileSizeBytes: number;
      if (internal) {
        metaFileSizeBytes = await sizeOf(handle, metaPath);
        const fits = maxDataSizeBytes(metaFileSizeBytes, alExtents);
        if (wanted !== undefined && wanted > fits) {
          const need = wanted + metadataSizeBytes(wanted, alExtents);
          throw new MetadataError('ETOOSMALL', `disk ${options.diskPath} is too small: it has ${metaFileSizeBytes} bytes, ` +
            `size ${wanted} plus ${metadataSizeBytes(wanted, alExtents)} bytes of internal metadata needs ${need}`);
        }
        dataSizeBytes = wanted ?? fits;
        if (dataSizeBytes < MIN_DATA_BYTES) {
          throw new MetadataError('ETOOSMALL', `disk ${options.diskPath} is too small: it has ${metaFileSizeBytes} bytes, ` +
            `which leaves ${dataSizeBytes} bytes of data after metadata (minimum ${MIN_DATA_BYTES})`);
        }
      } else {
        const diskSizeBytes = await sizeOf(dataHandle!, options.diskPath);
        if (wanted !== undefined && wanted > diskSizeBytes) {
          throw new MetadataError('ETOOSMALL', `disk ${options.diskPath} is too small: it has ${diskSizeBytes} bytes, size is ${wanted}`);
        }
        dataSizeBytes = wanted ?? Math.floor(diskSizeBytes / 4096) * 4096;
        if (dataSizeBytes < MIN_DATA_BYTES) {
          throw new MetadataError('ETOOSMALL', `disk ${options.diskPath} is too small: ${diskSizeBytes} bytes (minimum ${MIN_DATA_BYTES})`);
        }
        const needMeta = metadataSizeBytes(dataSizeBytes, alExtents);
        metaFileSizeBytes = await sizeOf(handle, metaPath);
        if (metaFileSizeBytes === 0 && (await handle.stat()).isFile()) {
          await handle.truncate(needMeta);
          metaFileSizeBytes = needMeta;
        }
        if (metaFileSizeBytes < needMeta) {
          throw new MetadataError('ETOOSMALL', `meta-disk ${metaPath} is too small: it has ${metaFileSizeBytes} bytes, ` +
            `metadata for ${dataSizeBytes} bytes of data needs ${needMeta}`);
        }
      }
      const existing = await readSuperblock(handle, metaFileSizeBytes);
      if (existing !== null && options.force !== true) {
        const sb = existing.sb;
        throw new MetadataError('EEXIST', `${metaPath} already holds drbdts metadata (resource ${sb.resourceName || '?'}, ` +
          `node ${sb.nodeName || '?'}, ${sb.dataSizeBytes} bytes of data); refusing to overwrite it without --force`);
      }
      const layout = layoutFor(metaPath, metaFileSizeBytes, dataSizeBytes, alExtents);
      assert.ok(!internal || layout.regionOffset >= dataSizeBytes, 'metadata region overlaps the data area');
      // Zero the bitmap in chunks (a 1 TiB disk has a 32 MiB bitmap), empty AL, then the superblock last:
      // until the superblock is durable the disk does not count as having metadata.
      const zeros = Buffer.alloc(Math.min(layout.bitmapBytes, 1024 * 1024));
      for (let done = 0; done < layout.bitmapBytes; done += zeros.length) {
        await writeExactly(handle, zeros.subarray(0, Math.min(zeros.length, layout.bitmapBytes - done)), layout.bitmapOffset + done);
      }
      await writeExactly(handle, encodeAl([], [], 1n, alExtents), layout.alOffsets[0]);
      await writeExactly(handle, Buffer.alloc(layout.alSlotBytes), layout.alOffsets[1]);
      await writeExactly(handle, Buffer.alloc(SLOT_BYTES), layout.superblockOffsets[1]);
      await handle.datasync();
      const sb: Superblock = {
        sequence: 1n, dataSizeBytes, metadataSizeBytes: metadataSizeBytes(dataSizeBytes, alExtents), alExtents,
        flagBits: FLAG_CLEAN, uuids: { current: 0n, bitmap: 0n, history: [0n, 0n] }, lastPromotedMs: 0,
        createdMs: Date.now(), nodeName: options.nodeName ?? '', resourceName: options.resourceName ?? '',
      };
      await writeExactly(handle, encodeSuperblock(sb, 0), layout.superblockOffsets[0]);
      await handle.datasync();
    } finally {
      await handle.close();
      await dataHandle?.close();
    }
    return Metadata.open(options.diskPath, options.metaDisk);
  }

  static async open(diskPath: string, metaDisk: 'internal' | string): Promise<Metadata> {
    const internal = metaDisk === 'internal';
    const metaPath = metaPathOf(diskPath, metaDisk);
    const dataHandle = internal ? undefined : await openFile(diskPath, 'disk');
    let handle: fsp.FileHandle | undefined;
    let syncHandle: fsp.FileHandle | undefined;
    try {
      handle = await openFile(metaPath, internal ? 'disk' : 'meta-disk');
      if (dataHandle !== undefined) await lockExclusive(dataHandle, diskPath);
      await lockExclusive(handle, metaPath);
      // Not flocked: flock is per open file description, and this one must not conflict with `handle`'s lock.
      syncHandle = await fsp.open(metaPath, fsConstants.O_RDWR | fsConstants.O_DSYNC);
      const fileSizeBytes = await sizeOf(handle, metaPath);
      const found = await readSuperblock(handle, fileSizeBytes);
      if (found === null) {
        throw new MetadataError('ENOMETA', `${metaPath} has no valid drbdts metadata (run "drbdts create-md RES")`);
      }
      const sb = found.sb;
      if (sb.metadataSizeBytes !== metadataSizeBytes(sb.dataSizeBytes, sb.alExtents) || sb.metadataSizeBytes > fileSizeBytes) {
        throw new MetadataError('EIO', `${metaPath}: metadata superblock describes ${sb.metadataSizeBytes} bytes of metadata ` +
          `for ${sb.dataSizeBytes} bytes of data, which does not fit this ${fileSizeBytes}-byte file`);
      }
      const layout = layoutFor(metaPath, fileSizeBytes, sb.dataSizeBytes, sb.alExtents);
      if (internal && layout.regionOffset < sb.dataSizeBytes) {
        throw new MetadataError('EIO', `${metaPath}: the metadata overlaps the ${sb.dataSizeBytes}-byte data area`);
      }
      if (!internal && dataHandle !== undefined) {
        const diskSizeBytes = await sizeOf(dataHandle, diskPath);
        if (diskSizeBytes < sb.dataSizeBytes) {
          throw new MetadataError('ETOOSMALL', `disk ${diskPath} has ${diskSizeBytes} bytes, smaller than the ${sb.dataSizeBytes} ` +
            `bytes of data its metadata (${metaPath}) records: it shrank or was truncated after create-md. Grow it back to ` +
            `${sb.dataSizeBytes} bytes or restore it from a backup (create-md would start a new, empty data generation)`);
        }
      }
      const bitmapBuffer = Buffer.alloc(layout.bitmapBytes);
      await readExactly(handle, bitmapBuffer, layout.bitmapOffset);
      const bitmap = Bitmap.fromBuffer(sb.dataSizeBytes, bitmapBuffer);
      const al = await readAl(handle, layout, sb.alExtents);
      const hot = al?.extents ?? [];
      const recovered = (sb.flagBits & FLAG_CLEAN) === 0;
      if (recovered) {
        // The last run ended without close(): writes may have been in flight in every hot extent, so the
        // peer may differ there. Mark them out of sync; a resync then covers them (and only them).
        const extentCount = Math.ceil(sb.dataSizeBytes / AL_EXTENT_BYTES);
        for (const extent of hot) {
          if (extent >= extentCount) continue; // cannot happen with a valid record; never trust it to assert
          const range = ActivityLog.extentRange(extent, sb.dataSizeBytes);
          bitmap.setRange(range.offsetBytes, range.lengthBytes);
        }
        for (const { firstExtent, lastExtent } of al?.wide ?? []) {
          const last = Math.min(lastExtent, extentCount - 1);
          if (firstExtent > last) continue;
          const start = ActivityLog.extentRange(firstExtent, sb.dataSizeBytes).offsetBytes;
          const end = ActivityLog.extentRange(last, sb.dataSizeBytes);
          bitmap.setRange(start, end.offsetBytes + end.lengthBytes - start);
        }
      }
      const metadata = new Metadata({
        diskPath, metaDisk, handle, syncHandle, dataHandle, layout, sb, bitmap, hot, alSequence: al?.sequence ?? 0n, recovered,
      });
      if (recovered && metadata.flags.wasPrimary) metadata.flags.crashedPrimary = true;
      // Persist "not clean" at once, so a crash from here on is detected on the next open.
      await metadata.writeBitmap();
      await metadata.writeSuperblock();
      return metadata;
    } catch (error) {
      await syncHandle?.close();
      await handle?.close();
      await dataHandle?.close();
      throw error;
    }
  }

  /** Reads the metadata without locking or changing it (status of a stopped node, tests). */
  static async read(diskPath: string, metaDisk: 'internal' | string): Promise<MetadataSnapshot | null> {
    const metaPath = metaPathOf(diskPath, metaDisk);
    const handle = await fsp.open(metaPath, 'r');
    try {
      const fileSizeBytes = await sizeOf(handle, metaPath);
      const found = await readSuperblock(handle, fileSizeBytes);
      if (found === null) return null;
      const sb = found.sb;
      const layout = layoutFor(metaPath, fileSizeBytes, sb.dataSizeBytes, sb.alExtents);
      const bitmapBuffer = Buffer.alloc(layout.bitmapBytes);
      await readExactly(handle, bitmapBuffer, layout.bitmapOffset);
      const bitmap = Bitmap.fromBuffer(sb.dataSizeBytes, bitmapBuffer);
      const al = await readAl(handle, layout, sb.alExtents);
      return {
        dataSizeBytes: sb.dataSizeBytes, metadataSizeBytes: sb.metadataSizeBytes, nodeName: sb.nodeName,
        resourceName: sb.resourceName, uuids: sb.uuids, flags: flagsFromBits(sb.flagBits),
        cleanShutdown: (sb.flagBits & FLAG_CLEAN) !== 0, sequence: sb.sequence, superblockSlot: found.slot,
        hotExtents: al?.extents ?? [], wideRanges: al?.wide ?? [], dirtyBlocks: bitmap.setBits(),
      };
    } finally {
      await handle.close();
    }
  }

  #serialized<T>(work: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(work, work);
    this.#queue = run.catch(() => undefined);
    return run;
  }

  #assertOpen(): void {
    assert.ok(!this.#closed, 'metadata used after close()');
  }

  /**
   * The disk holding this metadata failed and was detached (Diskless): from now on nothing is written to it; the
   * in-memory state lives on until the daemon attaches a disk again (a fresh Metadata) or stops.
   */
  detachDisk(): void {
    this.#detached = true;
  }

  #detached = false;

  get detached(): boolean {
    return this.#detached;
  }

  writeSuperblock(): Promise<void> {
    if (this.#detached) return Promise.resolve();
    return this.#serialized(() => this.#writeSuperblockNow(false));
  }

  async #writeSuperblockNow(clean: boolean): Promise<void> {
    this.#assertOpen();
    const sequence = this.#sequence + 1n;
    const slot = Number(sequence % 2n);
    const record = encodeSuperblock({
      sequence, dataSizeBytes: this.dataSizeBytes, metadataSizeBytes: this.metadataSizeBytes, alExtents: this.alExtents,
      flagBits: bitsFromFlags(this.flags, clean), uuids: this.uuids, lastPromotedMs: this.lastPromotedMs,
      createdMs: this.#createdMs, nodeName: this.nodeName, resourceName: this.resourceName,
    }, slot);
    await writeExactly(this.#syncHandle, record, this.#layout.superblockOffsets[slot as 0 | 1]);
    this.#sequence = sequence;
    this.#superblockWrites += 1;
  }

  writeBitmap(): Promise<void> {
    if (this.#detached) return Promise.resolve();
    return this.#serialized(() => this.#writeBitmapNow());
  }

  async #writeBitmapNow(): Promise<void> {
    this.#assertOpen();
    const pages = this.bitmap.takeDirtyPages();
    if (pages.length === 0) return;
    try {
      // Coalesce runs of adjacent pages into one write each. The pages are copied first: bits keep
      // changing while the write is in flight, and a changed page is marked dirty again for the next round.
      let index = 0;
      while (index < pages.length) {
        let end = index + 1;
        while (end < pages.length && pages[end] === pages[end - 1]! + 1 && end - index < 256) end += 1;
        const chunk = Buffer.alloc((end - index) * BITMAP_PAGE_BYTES);
        for (let i = index; i < end; i += 1) this.bitmap.pageBuffer(pages[i]!).copy(chunk, (i - index) * BITMAP_PAGE_BYTES);
        await writeExactly(this.#syncHandle, chunk, this.#layout.bitmapOffset + pages[index]! * BITMAP_PAGE_BYTES);
        this.#bitmapWrites += 1;
        index = end;
      }
    } catch (error) {
      this.bitmap.markPagesDirty(pages);
      throw new MetadataError('EIO', `writing the bitmap of ${this.#layout.metaPath} failed: ${(error as Error).message}`, { cause: error });
    }
  }

  #persistAl(hot: readonly number[], evicted: readonly number[], wide: readonly ExtentRange[]): Promise<void> {
    return this.#serialized(async () => {
      this.#assertOpen();
      // Evicted extents stop being covered by the AL: their bitmap bits must be durable first.
      if (evicted.length > 0) await this.#writeBitmapNow();
      const sequence = this.#alSequence + 1n;
      const slot = Number(sequence % 2n) as 0 | 1;
      await writeExactly(this.#syncHandle, encodeAl(hot, wide, sequence, this.alExtents), this.#layout.alOffsets[slot]);
      this.#alSequence = sequence;
    });
  }

  /**
   * DRBD's rotation when a new data generation starts (a Primary writing without its peer, or the operator):
   * the current UUID becomes the bitmap UUID (if none is set yet: the bitmap then tracks changes since the
   * peer last had our data), an older bitmap UUID goes into history, and a fresh current UUID is made.
   */
  async newCurrentUuid(): Promise<void> {
    const u = this.uuids;
    if (u.bitmap === 0n) {
      this.uuids = { current: newUuid(), bitmap: u.current, history: [...u.history] };
    } else {
      this.uuids = { current: newUuid(), bitmap: u.bitmap, history: [u.current, u.history[0]] };
    }
    await this.writeSuperblock();
  }

  /**
   * The peer now has everything (resync finished as source, or connected with nothing to sync): the bitmap
   * UUID goes into history and is cleared, as DRBD does, so the next disconnect starts a fresh generation.
   */
  async clearBitmapUuid(): Promise<void> {
    const u = this.uuids;
    if (u.bitmap !== 0n) this.uuids = { current: u.current, bitmap: 0n, history: [u.bitmap, u.history[0]] };
    await this.writeSuperblock();
  }

  /**
   * Resync starts as source (DRBD's sync UUID): make sure a bitmap UUID names the generation the target is
   * being brought to, and return it for the target. A fresh source (full initial sync) gets a new one. With
   * the target holding it as its current UUID, an interrupted resync is recognised at the next connect as
   * "source is ahead by its bitmap" and resumes from the persisted bitmaps instead of starting over.
   */
  async beginSyncSource(): Promise<bigint> {
    if (this.uuids.bitmap === 0n) {
      this.uuids = { current: this.uuids.current, bitmap: newUuid(), history: [...this.uuids.history] };
      await this.writeSuperblock();
    }
    return this.uuids.bitmap;
  }

  /** Resync starts as target with the source's sync UUID: Inconsistent until adoptUuids() at the end. */
  async beginSyncTarget(syncUuid: bigint): Promise<void> {
    const u = this.uuids;
    if (u.current !== syncUuid) {
      const history: [bigint, bigint] = u.current !== 0n ? [u.current, u.history[0]] : [...u.history];
      this.uuids = { current: syncUuid, bitmap: 0n, history };
    }
    this.flags = { ...this.flags, consistent: false, resyncInProgress: true };
    await this.writeSuperblock();
  }

  /** Resync finished as target: take the source's generation (its bitmap UUID is cleared as above). */
  async adoptUuids(source: GenerationUuids): Promise<void> {
    const history: [bigint, bigint] = source.bitmap !== 0n ? [source.bitmap, source.history[0]] : [...source.history];
    this.uuids = { current: source.current, bitmap: 0n, history };
    await this.writeSuperblock();
  }

  /** Clean shutdown: bitmap and superblock (with the clean mark) durable, then the lock goes. */
  async close(): Promise<void> {
    if (this.#closed) return;
    if (!this.#detached) assert.equal(this.activityLog.inFlightWrites(), 0, 'metadata closed with writes in flight');
    if (!this.#detached) await this.#serialized(async () => {
      // crashedPrimary stays: it is cleared by whoever finishes the resync of the AL extents, not by a restart.
      await this.#writeBitmapNow();
      await this.#writeSuperblockNow(true);
    });
    this.#closed = true;
    await this.#syncHandle.close();
    await this.#handle.close();
    await this.#dataHandle?.close();
  }
}
