// LocalDisk: a BlockDevice over a regular file or a block device.
//
// Reads and writes go through a FileIoQueue (native batched pread/pwrite: several requests per thread-pool hop,
// one fdatasync for all FUA writes and flushes in a hop); bench/README.md "LocalDisk micro benchmarks" has the
// figures that chose it. TRIM punches holes (block device: BLKDISCARD), WRITE_ZEROES uses the cheapest way that
// honours NO_HOLE and FAST_ZERO, block status comes from SEEK_DATA/SEEK_HOLE. Every operation checks its range
// against the exposed size again (the NBD server checked first) and fails with the errno NBD expects.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { promisify } from 'node:util';
import {
  BlockDeviceError,
  EXTENT_HOLE,
  EXTENT_ZERO,
  type BlockDevice,
  type BlockDeviceCapabilities,
  type BlockDeviceErrorCode,
  type Extent,
  type ZeroOptions,
} from './types.js';
import {
  FileIoQueue,
  allocateRange,
  blockDeviceLogicalBlockSizeBytes,
  blockDeviceSizeBytes,
  blockDiscard,
  blockZeroOut,
  fadviseWillNeed,
  isSystemError,
  punchHole,
  seekData,
  seekHole,
  zeroRange,
} from '../native/index.js';

const openFd = promisify(fs.open);
const closeFd = promisify(fs.close);
const fstat = promisify(fs.fstat);
const ftruncate = promisify(fs.ftruncate);

export interface LocalDiskOptions {
  readOnly?: boolean;
  /** Expose only the first sizeBytes of the backing file or device (the rest may hold metadata). */
  sizeBytes?: number;
  /** Create the file with this size when it does not exist. */
  createSizeBytes?: number;
}

/** The largest request LocalDisk advertises (NBD's customary 32 MiB). */
const REQUEST_BYTES_MAX = 32 * 1024 * 1024;
/** Zeroing by writing zero buffers uses one shared buffer of this size, written repeatedly. */
const ZERO_BUFFER_BYTES = 1024 * 1024;
/** blockStatus answers at most this many extents per call; the client asks again for the rest. */
const EXTENTS_PER_REPLY_MAX = 1024;

let zeroBuffer: Buffer | null = null;
function sharedZeroBuffer(): Buffer {
  // Never written to: pwrite only reads it, so one buffer serves every disk and every concurrent request.
  zeroBuffer ??= Buffer.alloc(ZERO_BUFFER_BYTES);
  return zeroBuffer;
}

/** Maps a system error to the errno names the NBD server knows (anything else becomes EIO). */
function deviceError(error: unknown, what: string): BlockDeviceError {
  const code = (error as { code?: string }).code;
  let mapped: BlockDeviceErrorCode;
  switch (code) {
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      mapped = 'EPERM';
      break;
    case 'ENOSPC':
    case 'EDQUOT':
      mapped = 'ENOSPC';
      break;
    case 'ENOMEM':
    case 'EINVAL':
    case 'EOVERFLOW':
    case 'ENOTSUP':
    case 'EOPNOTSUPP':
      mapped = code === 'EOPNOTSUPP' ? 'ENOTSUP' : code;
      break;
    default:
      mapped = 'EIO';
  }
  const message = error instanceof Error ? error.message : String(error);
  return new BlockDeviceError(mapped, `${what}: ${message}`, { cause: error });
}

/** Reads /sys/dev/block/MAJOR:MINOR/queue/NAME (or the parent disk's, for a partition); null when absent. */
function readQueueAttribute(device: bigint, name: string): string | null {
  // glibc's dev_t layout (gnu_dev_major/gnu_dev_minor).
  const major = ((device >> 8n) & 0xfffn) | ((device >> 32n) & ~0xfffn);
  const minor = (device & 0xffn) | ((device >> 12n) & ~0xffn);
  for (const candidate of [`/sys/dev/block/${major}:${minor}/queue/${name}`, `/sys/dev/block/${major}:${minor}/../queue/${name}`]) {
    try {
      return fs.readFileSync(candidate, 'utf8').trim();
    } catch {
      // Not there (a partition keeps its queue in the parent, a virtual device may have none): try the next.
    }
  }
  return null;
}

/**
 * One read or write waiting on the I/O queue: its promise's resolve/reject and the callbacks handed to the
 * queue, bound once and pooled, so a request allocates nothing but its Promise.
 */
class PendingIo {
  private static readonly pool: PendingIo[] = [];
  private static readonly poolSizeMax = 1024;
  private resolve: (() => void) | null = null;
  private reject: ((reason: unknown) => void) | null = null;
  private path = '';
  private what = '';

  static take(path: string, what: string): PendingIo {
    const pending = PendingIo.pool.pop() ?? new PendingIo();
    pending.path = path;
    pending.what = what;
    return pending;
  }

  /** The Promise executor. */
  readonly capture = (resolve: () => void, reject: (reason: unknown) => void): void => {
    this.resolve = resolve;
    this.reject = reject;
  };

  readonly settle = (error: Error | null): void => {
    const { resolve, reject, path, what } = this;
    assert(resolve !== null && reject !== null, 'PendingIo settled twice or before capture');
    this.resolve = null;
    this.reject = null;
    if (PendingIo.pool.length < PendingIo.poolSizeMax) PendingIo.pool.push(this);
    if (error === null) resolve();
    else reject(deviceError(error, `${what} ${path}`));
  };
}

export class LocalDisk implements BlockDevice {
  readonly path: string;
  readonly fd: number;
  /** The size of the whole backing file or device; sizeBytes may expose less. */
  readonly backingSizeBytes: number;
  readonly isBlockDevice: boolean;
  readonly sizeBytes: number;
  private readonly readOnly: boolean;
  private readonly io: FileIoQueue;
  /** Block devices: BLKDISCARD/BLKZEROOUT alignment. Files: 1. */
  private readonly logicalBlockSizeBytes: number;
  private readonly rotational: boolean;
  /** Block devices only: the device zeroes without writing (REQ_OP_WRITE_ZEROES), so FAST_ZERO can succeed. */
  private readonly deviceWritesZeroes: boolean;
  private closed = false;
  private closing: Promise<void> | null = null;
  /** Trims and zeroes running outside the I/O queue (fallocate, ioctls): close() waits for them too. */
  private readonly rangeOperations = new Set<Promise<void>>();

  private constructor(init: {
    path: string;
    fd: number;
    backingSizeBytes: number;
    sizeBytes: number;
    isBlockDevice: boolean;
    readOnly: boolean;
    logicalBlockSizeBytes: number;
    rotational: boolean;
    deviceWritesZeroes: boolean;
  }) {
    this.path = init.path;
    this.fd = init.fd;
    this.backingSizeBytes = init.backingSizeBytes;
    this.sizeBytes = init.sizeBytes;
    this.isBlockDevice = init.isBlockDevice;
    this.readOnly = init.readOnly;
    this.logicalBlockSizeBytes = init.logicalBlockSizeBytes;
    this.rotational = init.rotational;
    this.deviceWritesZeroes = init.deviceWritesZeroes;
    this.io = new FileIoQueue(init.fd);
  }

  /**
   * Opens a file or block device. Fails with a message naming the path when it is missing (and no
   * createSizeBytes was given), is neither a regular file nor a block device, or is smaller than sizeBytes.
   */
  static async open(path: string, options: LocalDiskOptions = {}): Promise<LocalDisk> {
    const readOnly = options.readOnly ?? false;
    for (const key of ['sizeBytes', 'createSizeBytes'] as const) {
      const value = options[key];
      if (value !== undefined && (!Number.isSafeInteger(value) || value < 0)) {
        throw new RangeError(`${path}: ${key} must be a non-negative integer number of bytes, got ${value}`);
      }
    }
    // A writable block device is opened exclusively, as the kernel's DRBD claims its backing device: the open
    // fails (EBUSY) while the device is mounted or claimed, instead of serving, and corrupting, a live filesystem.
    const isBlockDevicePath = await fs.promises.stat(path).then(
      (stat) => stat.isBlockDevice(),
      () => false,
    );
    const flags = readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR | (isBlockDevicePath ? fs.constants.O_EXCL : 0);
    let fd: number;
    try {
      fd = await openFd(path, flags);
    } catch (error) {
      if (!isSystemError(error, 'ENOENT') || options.createSizeBytes === undefined) {
        throw LocalDisk.openError(path, error, options.createSizeBytes === undefined);
      }
      fd = await LocalDisk.create(path, options.createSizeBytes, readOnly);
    }
    try {
      return await LocalDisk.fromFd(path, fd, readOnly, options.sizeBytes);
    } catch (error) {
      await closeFd(fd).catch(() => undefined);
      throw error;
    }
  }

  private static openError(path: string, error: unknown, suggestCreate: boolean): Error {
    const code = (error as { code?: string }).code;
    let reason: string;
    if (code === 'ENOENT') reason = `does not exist${suggestCreate ? ' (give a size to create it)' : ''}`;
    else if (code === 'EACCES' || code === 'EPERM') reason = 'permission denied';
    else if (code === 'EISDIR') reason = 'is a directory, not a file or block device';
    else if (code === 'EROFS') reason = 'is on a read-only filesystem (open it read-only)';
    else if (code === 'EBUSY') reason = 'is busy: mounted, or claimed by another program (drbdts opens writable devices exclusively)';
    else reason = error instanceof Error ? error.message : String(error);
    return Object.assign(new Error(`cannot open ${path}: ${reason}`, { cause: error }), { code });
  }

  private static async create(path: string, sizeBytes: number, readOnly: boolean): Promise<number> {
    let fd: number;
    try {
      fd = await openFd(path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
    } catch (error) {
      throw LocalDisk.openError(path, error, false);
    }
    try {
      await ftruncate(fd, sizeBytes);
    } catch (error) {
      await closeFd(fd).catch(() => undefined);
      await fs.promises.unlink(path).catch(() => undefined);
      throw Object.assign(new Error(`cannot create ${path} of ${sizeBytes} bytes: ${(error as Error).message}`), {
        cause: error,
      });
    }
    if (!readOnly) return fd;
    await closeFd(fd);
    return openFd(path, fs.constants.O_RDONLY);
  }

  private static async fromFd(
    path: string,
    fd: number,
    readOnly: boolean,
    sizeBytesRequested: number | undefined,
  ): Promise<LocalDisk> {
    const stat = await fstat(fd, { bigint: true });
    const isBlockDevice = stat.isBlockDevice();
    if (!isBlockDevice && !stat.isFile()) {
      throw new Error(`cannot use ${path}: it is neither a regular file nor a block device`);
    }
    const backingSizeBytes = isBlockDevice ? blockDeviceSizeBytes(fd) : Number(stat.size);
    const sizeBytes = sizeBytesRequested ?? backingSizeBytes;
    if (sizeBytes > backingSizeBytes) {
      throw new Error(
        `cannot expose ${sizeBytes} bytes of ${path}: it holds only ${backingSizeBytes} bytes`,
      );
    }
    let rotational = false;
    let deviceWritesZeroes = false;
    let logicalBlockSizeBytes = 1;
    if (isBlockDevice) {
      logicalBlockSizeBytes = blockDeviceLogicalBlockSizeBytes(fd);
      rotational = readQueueAttribute(stat.rdev, 'rotational') === '1';
      deviceWritesZeroes = Number(readQueueAttribute(stat.rdev, 'write_zeroes_max_bytes') ?? '0') > 0;
    } else {
      rotational = readQueueAttribute(stat.dev, 'rotational') === '1';
    }
    return new LocalDisk({
      path,
      fd,
      backingSizeBytes,
      sizeBytes,
      isBlockDevice,
      readOnly,
      logicalBlockSizeBytes,
      rotational,
      deviceWritesZeroes,
    });
  }

  capabilities(): BlockDeviceCapabilities {
    return {
      readOnly: this.readOnly,
      canFlush: true,
      canFua: true,
      canTrim: !this.readOnly,
      canZero: !this.readOnly,
      // Files: punching a hole or ZERO_RANGE never writes data; where neither works FAST_ZERO fails at once.
      canFastZero: !this.readOnly && (!this.isBlockDevice || this.deviceWritesZeroes),
      canCache: true,
      // One descriptor serves every connection, so one fdatasync covers writes from all of them.
      canMultiConn: true,
      canBlockStatus: true,
      rotational: this.rotational,
      blockSizeMinimumBytes: 1,
      blockSizePreferredBytes: Math.max(4096, this.logicalBlockSizeBytes),
      blockSizeMaximumBytes: REQUEST_BYTES_MAX,
    };
  }

  read(offset: number, target: Buffer): Promise<void> {
    const refusal = this.checkRange('read', offset, target.length, 'EINVAL', false);
    if (refusal !== null) return Promise.reject(refusal);
    if (target.length === 0) return Promise.resolve();
    const pending = PendingIo.take(this.path, 'read');
    const promise = new Promise<void>(pending.capture);
    this.io.read(offset, target, pending.settle);
    return promise;
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    const refusal = this.checkRange('write', offset, data.length, 'ENOSPC', true);
    if (refusal !== null) return Promise.reject(refusal);
    if (data.length === 0) return fua ? this.flush() : Promise.resolve();
    const pending = PendingIo.take(this.path, 'write');
    const promise = new Promise<void>(pending.capture);
    this.io.write(offset, data, fua, pending.settle);
    return promise;
  }

  writeWithCallback(offset: number, data: Buffer, fua: boolean, done: (error: Error | null) => void): void {
    const refusal = this.checkRange('write', offset, data.length, 'ENOSPC', true);
    if (refusal !== null) {
      done(refusal);
      return;
    }
    if (data.length === 0) {
      if (fua) this.flush().then(() => done(null), done);
      else done(null);
      return;
    }
    // No wrapper per write: a failure reaches `done` as the system error itself (the callers log it).
    this.io.write(offset, data, fua, done);
  }

  /** Reads, writes and flushes are plain pread/pwrite/fdatasync on this.fd (FileIoQueue only batches them). */
  directAccess(): { fd: number } | null {
    return this.closed ? null : { fd: this.fd };
  }

  flush(): Promise<void> {
    if (this.closed) return Promise.reject(this.shutdownError('flush'));
    return this.flushQueued();
  }

  /** fdatasync through the queue; also for trims and zeroes already admitted when close() began. */
  private flushQueued(): Promise<void> {
    return new Promise((resolve, reject) =>
      this.io.flush((error) => (error === null ? resolve() : reject(deviceError(error, `fdatasync ${this.path}`)))),
    );
  }

  trim(offset: number, lengthBytes: number, fua: boolean): Promise<void> {
    const refusal = this.checkRange('trim', offset, lengthBytes, 'EINVAL', true);
    if (refusal !== null) return Promise.reject(refusal);
    return this.tracked(this.trimRange(offset, lengthBytes, fua));
  }

  /** Registers an operation close() must wait for, so the descriptor is never closed (and reused) under it. */
  private tracked(operation: Promise<void>): Promise<void> {
    this.rangeOperations.add(operation);
    const forget = (): void => {
      this.rangeOperations.delete(operation);
    };
    operation.then(forget, forget);
    return operation;
  }

  private async trimRange(offset: number, lengthBytes: number, fua: boolean): Promise<void> {
    if (lengthBytes > 0) {
      try {
        if (this.isBlockDevice) {
          // BLKDISCARD wants whole logical blocks. TRIM is advisory, so the partial blocks at the edges stay.
          const start = this.alignUp(offset);
          const end = this.alignDown(offset + lengthBytes);
          if (end > start) await blockDiscard(this.fd, start, end - start);
        } else {
          await punchHole(this.fd, offset, lengthBytes);
        }
      } catch (error) {
        // A filesystem or device that cannot discard simply keeps the data: TRIM is a hint.
        if (!isSystemError(error, 'ENOTSUP', 'EOPNOTSUPP')) throw deviceError(error, `trim ${this.path}`);
      }
    }
    if (fua) await this.flushQueued();
  }

  zero(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    const refusal = this.checkRange('zero', offset, lengthBytes, 'ENOSPC', true);
    if (refusal !== null) return Promise.reject(refusal);
    return this.tracked(this.zeroRange(offset, lengthBytes, options));
  }

  private async zeroRange(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    if (lengthBytes > 0) {
      try {
        if (this.isBlockDevice) await this.zeroBlockDevice(offset, lengthBytes, options);
        else await this.zeroFile(offset, lengthBytes, options);
      } catch (error) {
        if (error instanceof BlockDeviceError) throw error;
        throw deviceError(error, `zero ${this.path}`);
      }
    }
    if (options.fua) await this.flushQueued();
  }

  private async zeroFile(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    // Cheapest first. A punched hole reads as zeros and frees space; NO_HOLE forbids it, so ZERO_RANGE (zeroes
    // and keeps the blocks allocated); where the filesystem lacks ZERO_RANGE (tmpfs), punch and re-allocate,
    // which is also fast, but only once allocation is known to work (a plain fallocate changes no data), so
    // that a refused FAST_ZERO leaves no hole behind. Only then write zeros, which FAST_ZERO forbids.
    if (!options.noHole && (await this.tryFallocate(punchHole, offset, lengthBytes))) return;
    if (await this.tryFallocate(zeroRange, offset, lengthBytes)) return;
    if (
      options.noHole &&
      (await this.tryFallocate(allocateRange, offset, lengthBytes)) &&
      (await this.tryFallocate(punchHole, offset, lengthBytes)) &&
      (await this.tryFallocate(allocateRange, offset, lengthBytes))
    ) {
      return;
    }
    if (options.fastZero) throw this.slowZeroError();
    await this.writeZeros(offset, lengthBytes);
  }

  private async zeroBlockDevice(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    // BLKZEROOUT never unmaps (NO_HOLE holds either way) and uses the device's WRITE_ZEROES when it has one;
    // without it the kernel writes zero pages itself, which is the slow way FAST_ZERO rules out.
    if (options.fastZero && !this.deviceWritesZeroes) throw this.slowZeroError();
    // BLKZEROOUT takes whole logical blocks; partial blocks at the edges get zeros written.
    const end = offset + lengthBytes;
    const alignedStart = this.alignUp(offset);
    const alignedEnd = this.alignDown(end);
    if (alignedEnd <= alignedStart) {
      await this.writeZeros(offset, lengthBytes);
      return;
    }
    if (alignedStart > offset) await this.writeZeros(offset, alignedStart - offset);
    await blockZeroOut(this.fd, alignedStart, alignedEnd - alignedStart);
    if (end > alignedEnd) await this.writeZeros(alignedEnd, end - alignedEnd);
  }

  private async tryFallocate(
    call: (fd: number, offset: number, length: number) => Promise<void>,
    offset: number,
    lengthBytes: number,
  ): Promise<boolean> {
    try {
      await call(this.fd, offset, lengthBytes);
      return true;
    } catch (error) {
      if (isSystemError(error, 'ENOTSUP', 'EOPNOTSUPP')) return false;
      throw error;
    }
  }

  private slowZeroError(): BlockDeviceError {
    return new BlockDeviceError('ENOTSUP', `${this.path} cannot zero without writing zeros (FAST_ZERO refused)`);
  }

  /** Writes zeros from the shared zero buffer, at most a few chunks in flight so memory stays bounded. */
  private async writeZeros(offset: number, lengthBytes: number): Promise<void> {
    const zeros = sharedZeroBuffer();
    const end = offset + lengthBytes;
    let position = offset;
    const inFlightMax = 4;
    const inFlight: Promise<void>[] = [];
    while (position < end) {
      const chunkBytes = Math.min(zeros.length, end - position);
      inFlight.push(this.io.writeAsync(position, zeros.subarray(0, chunkBytes), false));
      position += chunkBytes;
      if (inFlight.length === inFlightMax) await Promise.all(inFlight.splice(0));
    }
    await Promise.all(inFlight);
  }

  async cache(offset: number, lengthBytes: number): Promise<void> {
    const refusal = this.checkRange('cache', offset, lengthBytes, 'EINVAL', false);
    if (refusal !== null) throw refusal;
    try {
      fadviseWillNeed(this.fd, offset, lengthBytes);
    } catch {
      // A hint the kernel may ignore; failing it would only make the client's CACHE fail for nothing.
    }
  }

  async blockStatus(offset: number, lengthBytes: number): Promise<Extent[]> {
    const refusal = this.checkRange('block status', offset, lengthBytes, 'EINVAL', false);
    if (refusal !== null) throw refusal;
    if (lengthBytes === 0) return [];
    const end = offset + lengthBytes;
    if (this.isBlockDevice) return [{ lengthBytes, flags: 0 }];
    const extents: Extent[] = [];
    let position = offset;
    try {
      while (position < end && extents.length < EXTENTS_PER_REPLY_MAX) {
        const dataStart = seekData(this.fd, position);
        if (dataStart === -1 || dataStart >= end) {
          extents.push({ lengthBytes: end - position, flags: EXTENT_HOLE | EXTENT_ZERO });
          break;
        }
        if (dataStart > position) {
          extents.push({ lengthBytes: dataStart - position, flags: EXTENT_HOLE | EXTENT_ZERO });
          position = dataStart;
        }
        // The end of the file counts as a hole, so SEEK_HOLE finds one; -1 only if the file shrank meanwhile.
        const holeStart = seekHole(this.fd, position);
        const dataEnd = holeStart === -1 ? end : Math.min(holeStart, end);
        extents.push({ lengthBytes: dataEnd - position, flags: 0 });
        position = dataEnd;
      }
    } catch (error) {
      // A filesystem without SEEK_DATA support reports everything as data through the generic lseek, so an
      // error here is real.
      throw deviceError(error, `block status ${this.path}`);
    }
    return extents;
  }

  /** Waits for running operations, then closes the descriptor. Later calls fail with ESHUTDOWN. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      this.closed = true;
      await Promise.allSettled([...this.rangeOperations]);
      await this.io.drain();
      await closeFd(this.fd);
    })();
    return this.closing;
  }

  private checkRange(
    what: string,
    offset: number,
    lengthBytes: number,
    outOfRangeCode: 'EINVAL' | 'ENOSPC',
    modifies: boolean,
  ): BlockDeviceError | null {
    if (this.closed) return this.shutdownError(what);
    if (modifies && this.readOnly) return new BlockDeviceError('EPERM', `${what}: ${this.path} is open read-only`);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(lengthBytes) || offset < 0 || lengthBytes < 0) {
      return new BlockDeviceError('EINVAL', `${what}: bad offset ${offset} or length ${lengthBytes}`);
    }
    if (offset + lengthBytes > this.sizeBytes) {
      return new BlockDeviceError(
        outOfRangeCode,
        `${what} of ${lengthBytes} bytes at ${offset} goes past the end of ${this.path} (${this.sizeBytes} bytes)`,
      );
    }
    return null;
  }

  private shutdownError(what: string): BlockDeviceError {
    return new BlockDeviceError('ESHUTDOWN', `${what}: ${this.path} is closed`);
  }

  private alignUp(offset: number): number {
    const block = this.logicalBlockSizeBytes;
    return Math.ceil(offset / block) * block;
  }

  private alignDown(offset: number): number {
    const block = this.logicalBlockSizeBytes;
    return Math.floor(offset / block) * block;
  }
}
