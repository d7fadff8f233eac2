// Typed wrapper over the native addon (native/, built by `npm run build:native`). The addon does only what
// Node.js lacks; this layer checks arguments first so that a bad call fails here with a precise message rather
// than as an opaque errno from the kernel. Errors from system calls are Node-style: `.code` is the errno name
// (EOPNOTSUPP reports as ENOTSUP: Linux gives both the number 95), `.errno` is negative, `.syscall` names the call.
import { createRequire } from 'node:module';
import util from 'node:util';

interface NativeAddon {
  punchHole(fd: number, offset: number, length: number): Promise<void>;
  zeroRange(fd: number, offset: number, length: number): Promise<void>;
  allocateRange(fd: number, offset: number, length: number): Promise<void>;
  blockDiscard(fd: number, offset: number, length: number): Promise<void>;
  blockZeroOut(fd: number, offset: number, length: number): Promise<void>;
  seekData(fd: number, offset: number): number;
  seekHole(fd: number, offset: number): number;
  blockDeviceSizeBytes(fd: number): number;
  blockDeviceLogicalBlockSizeBytes(fd: number): number;
  fadviseWillNeed(fd: number, offset: number, length: number): void;
  preadNowait(fd: number, buffer: Uint8Array, offset: number): number;
  pwriteNowait(fd: number, buffer: Uint8Array, offset: number): number;
  ioBatch(
    fd: number,
    count: number,
    kinds: Uint8Array,
    offsets: Float64Array,
    buffers: (Uint8Array | null)[],
    results: Int32Array,
    callback: (error: null) => void,
  ): void;
  setSocketBufferBytes(fd: number, sendBytes: number, receiveBytes: number): [number, number];
  socketPair(): [number, number];
  closeFd(fd: number): void;
  nbdConfigure(
    nbdFd: number,
    blockSizeBytes: number,
    sizeBytes: number,
    timeoutSeconds: number,
    flags: number,
    kernelSocketFds: number[],
  ): void;
  nbdDoIt(nbdFd: number): Promise<void>;
  nbdDisconnect(nbdFd: number): void;
  NbdDataPath: new (
    socketFd: number,
    fileFd: number,
    sizeBytes: number,
    options: number,
    requestBytesMax: number,
    bufferBytesCap: number,
    threads: number,
    onStop: (reason: number, leftover: Buffer | undefined, errnoPositive: number) => void,
    plane?: NativeReplPlane,
  ) => NativeDataPath;
  nbdDataPathBufferBytes(): number;
  ReplPlane: new (onEvents: (events: ReplEvent[]) => void) => NativeReplPlane;
  ReplTransport: new (
    plane: NativeReplPlane,
    dataFd: number,
    metaFd: number,
    fileFd: number,
    sizeBytes: number,
    validTypes: Buffer,
    dataLeftover: Buffer | undefined,
    metaLeftover: Buffer | undefined,
  ) => NativeReplTransport;
}

interface NativeReplPlane {
  open(protocol: 'B' | 'C', maxInFlight: number, pinnedExtents: Buffer): boolean;
  close(): boolean;
  pin(extent: number): void;
  releaseMarks(token: number): void;
  inFlight(): number;
  counters(): ReplPlaneCounters;
  destroy(): void;
}

interface NativeReplTransport {
  readonly id: number;
  start(): void;
  sendFrame(channel: number, type: number, flags: number, id: number, offset: number, body?: Uint8Array): boolean;
  close(reason: string): void;
  destroy(): void;
  setPaused(paused: boolean): void;
  queuedBytes(channel: number): number;
  wantDrain(): void;
  lastMetaReceivedMs(): number;
  sentBytes(): number;
  receivedBytes(): number;
  armSecondary(protocol: string, forwardedSeen: number): boolean;
  disarmSecondary(): void;
  forwardedModifying(): number;
}

interface NativeDataPath {
  arm(): boolean;
  stop(): void;
  abort(): void;
  destroy(): void;
  requests(): number;
  splicedRequests(): number;
  unref(): void;
  replicatedRequests(): number;
}

/** Where the addon lives relative to this file, both as src/native/index.ts (vitest) and dist/native/index.js. */
const addonPath = '../../native/build/Release/drbdts_native.node';

function loadAddon(): NativeAddon {
  try {
    return createRequire(import.meta.url)(addonPath) as NativeAddon;
  } catch (error) {
    throw new Error(
      `the drbdts native addon is not built or does not load (${addonPath}): run "npm run build:native"`,
      { cause: error },
    );
  }
}

const addon: NativeAddon = loadAddon();

/** A Node-style system error, for errors the wrapper reports itself (the addon builds its own the same way). */
export interface SystemError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

export function systemError(errnoPositive: number, syscall: string, detail?: string): SystemError {
  const code = util.getSystemErrorName(-errnoPositive);
  const description = util.getSystemErrorMap().get(-errnoPositive)?.[1] ?? 'unknown error';
  const error = new Error(`${code}: ${description}, ${syscall}${detail === undefined ? '' : ` (${detail})`}`);
  return Object.assign(error, { code, errno: -errnoPositive, syscall });
}

export function isSystemError(error: unknown, ...codes: string[]): error is SystemError {
  return error instanceof Error && codes.includes((error as Partial<SystemError>).code ?? '');
}

function checkFd(fd: number): void {
  if (!Number.isSafeInteger(fd) || fd < 0) throw new TypeError(`fd must be a non-negative integer, got ${fd}`);
}

function checkRange(offset: number, length: number, lengthMayBeZero = false): void {
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new RangeError(`offset must be a non-negative safe integer, got ${offset}`);
  }
  if (!Number.isSafeInteger(length) || length < (lengthMayBeZero ? 0 : 1)) {
    throw new RangeError(`length must be a ${lengthMayBeZero ? 'non-negative' : 'positive'} safe integer, got ${length}`);
  }
  if (!Number.isSafeInteger(offset + length)) throw new RangeError(`offset + length overflows: ${offset} + ${length}`);
}

/** fallocate(PUNCH_HOLE | KEEP_SIZE): deallocate; the range reads back as zeros. The file size is unchanged. */
export function punchHole(fd: number, offset: number, length: number): Promise<void> {
  checkFd(fd);
  checkRange(offset, length);
  return addon.punchHole(fd, offset, length);
}

/** fallocate(ZERO_RANGE | KEEP_SIZE): zero and keep allocated. Rejects with code ENOTSUP where unsupported (tmpfs). */
export function zeroRange(fd: number, offset: number, length: number): Promise<void> {
  checkFd(fd);
  checkRange(offset, length);
  return addon.zeroRange(fd, offset, length);
}

/** fallocate(KEEP_SIZE): allocate blocks (reading as zeros where there was a hole). Data already there stays. */
export function allocateRange(fd: number, offset: number, length: number): Promise<void> {
  checkFd(fd);
  checkRange(offset, length);
  return addon.allocateRange(fd, offset, length);
}

/** lseek(SEEK_DATA): the first data offset at or after `offset`, or -1 when there is none (ENXIO). */
export function seekData(fd: number, offset: number): number {
  checkFd(fd);
  checkRange(offset, 0, true);
  return addon.seekData(fd, offset);
}

/** lseek(SEEK_HOLE): the first hole at or after `offset` (end of file counts as one), or -1 past the end (ENXIO). */
export function seekHole(fd: number, offset: number): number {
  checkFd(fd);
  checkRange(offset, 0, true);
  return addon.seekHole(fd, offset);
}

/** ioctl(BLKGETSIZE64) on a block device. */
export function blockDeviceSizeBytes(fd: number): number {
  checkFd(fd);
  return addon.blockDeviceSizeBytes(fd);
}

/** ioctl(BLKSSZGET): the logical block size, the alignment BLKDISCARD and BLKZEROOUT demand. */
export function blockDeviceLogicalBlockSizeBytes(fd: number): number {
  checkFd(fd);
  return addon.blockDeviceLogicalBlockSizeBytes(fd);
}

/** ioctl(BLKDISCARD): offset and length must be multiples of the logical block size. Contents become undefined. */
export function blockDiscard(fd: number, offset: number, length: number): Promise<void> {
  checkFd(fd);
  checkRange(offset, length);
  return addon.blockDiscard(fd, offset, length);
}

/** ioctl(BLKZEROOUT): zero without unmapping; the kernel writes zeros itself where the device cannot. */
export function blockZeroOut(fd: number, offset: number, length: number): Promise<void> {
  checkFd(fd);
  checkRange(offset, length);
  return addon.blockZeroOut(fd, offset, length);
}

/** posix_fadvise(WILLNEED): start reading the range into the page cache and return at once. */
export function fadviseWillNeed(fd: number, offset: number, length: number): void {
  checkFd(fd);
  checkRange(offset, length, true);
  addon.fadviseWillNeed(fd, offset, length);
}

// ------------------------------------------------------------------------------------------------------------
// Batched positioned I/O.

const KIND_READ = 0;
const KIND_WRITE = 1;
const KIND_WRITE_FUA = 2;
const KIND_FLUSH = 3;
const syscallOfKind = ['pread', 'pwrite', 'pwrite', 'fdatasync'] as const;

/**
 * preadv2(RWF_NOWAIT): copies from the page cache without waiting for the device. Returns the bytes read
 * (possibly short), -1 when the data is not cached (the read would block), -2 when the filesystem or kernel
 * does not support RWF_NOWAIT (tmpfs, for one).
 */
export function preadNowait(fd: number, buffer: Uint8Array, offset: number): number {
  checkFd(fd);
  checkRange(offset, buffer.byteLength, true);
  return addon.preadNowait(fd, buffer, offset);
}

/** pwritev2(RWF_NOWAIT): as preadNowait, for writes (buffered ext4 does not support it: -2). */
export function pwriteNowait(fd: number, buffer: Uint8Array, offset: number): number {
  checkFd(fd);
  checkRange(offset, buffer.byteLength, true);
  return addon.pwriteNowait(fd, buffer, offset);
}

/** Requests up to this size may be served on the event loop by RWF_NOWAIT. */
const NOWAIT_REQUEST_BYTES_MAX = 128 * 1024;
/** Bytes copied on the event loop per turn, at most: bounds how long a burst of cache hits holds the loop. */
const NOWAIT_BYTES_PER_TURN_MAX = 1024 * 1024;
/** After this many cache misses in a row, stop trying RWF_NOWAIT for NOWAIT_SKIP_OPERATIONS requests. */
const NOWAIT_MISSES_IN_ROW_MAX = 16;
const NOWAIT_SKIP_OPERATIONS = 256;

export interface FileIoQueueOptions {
  /** Operations per thread-pool hop. */
  batchOperationsMax?: number;
  /** Payload bytes per hop (a batch always takes at least one operation): bounds how long one hop runs. */
  batchBytesMax?: number;
  /** Hops in flight at once: more overlap copies on several cores, fewer make bigger batches. */
  batchesInFlightMax?: number;
  /**
   * When several hops are free, the waiting operations are spread over them, but no hop gets fewer than this
   * many (while enough wait): one pwrite stuck behind writeback then holds up a part, not all, and small
   * requests still share hops.
   */
  batchOperationsSpreadMin?: number;
  /**
   * Serve reads (and non-FUA writes, where the kernel allows) from the page cache on the event loop with
   * RWF_NOWAIT, falling back to the thread pool for anything that would wait on the device. Default true.
   */
  nowait?: boolean;
}

type Settle = (error: Error | null) => void;

/** One hop's worth of operations; a few are allocated per queue and reused. */
class Batch {
  count = 0;
  readonly kinds: Uint8Array;
  readonly offsets: Float64Array;
  readonly buffers: (Uint8Array | null)[];
  readonly results: Int32Array;
  readonly settles: (Settle | null)[];
  readonly onDone: () => void;

  constructor(capacity: number, onDone: (batch: Batch) => void) {
    this.kinds = new Uint8Array(capacity);
    this.offsets = new Float64Array(capacity);
    this.buffers = new Array<Uint8Array | null>(capacity).fill(null);
    this.results = new Int32Array(capacity);
    this.settles = new Array<Settle | null>(capacity).fill(null);
    this.onDone = () => onDone(this);
  }
}

/**
 * Positioned reads and writes on one file descriptor, several per thread-pool hop. Operations issued while
 * hops are busy (or in the same tick) wait in a ring and leave together in the next hop; FUA writes and
 * flushes in one hop share a single fdatasync at its end. Operations in different hops may run concurrently,
 * in any order, as NBD allows; an operation issued after another resolved always runs after it.
 */
export class FileIoQueue {
  readonly fd: number;
  private readonly batchOperationsMax: number;
  private readonly batchBytesMax: number;
  private readonly batchOperationsSpreadMin: number;
  private readonly idleBatches: Batch[] = [];
  private batchesInFlight = 0;
  private dispatchScheduled = false;
  // The waiting operations: a growable ring (index arithmetic, no shift()).
  private ringKinds: Uint8Array;
  private ringOffsets: Float64Array;
  private ringBuffers: (Uint8Array | null)[];
  private ringSettles: (Settle | null)[];
  private ringHead = 0;
  private ringCount = 0;
  private drainWaiters: (() => void)[] = [];
  private readonly dispatchBound = () => this.dispatch();
  private hopCount = 0;
  private operationCount = 0;
  private nowaitHitCount = 0;
  private nowaitReads: boolean;
  private nowaitWrites: boolean;
  private nowaitBudgetBytes = NOWAIT_BYTES_PER_TURN_MAX;
  private nowaitBudgetResetScheduled = false;
  private nowaitMissesInRow = 0;
  private nowaitSkipOperations = 0;
  private readonly resetNowaitBudgetBound = () => {
    this.nowaitBudgetResetScheduled = false;
    this.nowaitBudgetBytes = NOWAIT_BYTES_PER_TURN_MAX;
  };

  constructor(fd: number, options: FileIoQueueOptions = {}) {
    checkFd(fd);
    this.fd = fd;
    // Defaults chosen by bench/local-disk.bench.ts (bench/README.md, "LocalDisk micro benchmarks"): as many
    // hops as libuv's default pool has threads, 1 MiB per hop so large requests copy on several cores at once,
    // and small requests spread at least 8 to a hop.
    this.batchOperationsMax = options.batchOperationsMax ?? 64;
    this.batchBytesMax = options.batchBytesMax ?? 1024 * 1024;
    this.batchOperationsSpreadMin = options.batchOperationsSpreadMin ?? 8;
    const batchesInFlightMax = options.batchesInFlightMax ?? 4;
    this.nowaitReads = options.nowait ?? true;
    this.nowaitWrites = options.nowait ?? true;
    if (!(this.batchOperationsMax >= 1 && this.batchBytesMax >= 1 && batchesInFlightMax >= 1)) {
      throw new RangeError('FileIoQueue: batch limits must be at least 1');
    }
    for (let i = 0; i < batchesInFlightMax; i++) {
      this.idleBatches.push(new Batch(this.batchOperationsMax, (batch) => this.complete(batch)));
    }
    const ringCapacity = 256;
    this.ringKinds = new Uint8Array(ringCapacity);
    this.ringOffsets = new Float64Array(ringCapacity);
    this.ringBuffers = new Array<Uint8Array | null>(ringCapacity).fill(null);
    this.ringSettles = new Array<Settle | null>(ringCapacity).fill(null);
  }

  /** Thread-pool hops so far. With `operations`, the batching achieved. */
  get hops(): number {
    return this.hopCount;
  }

  /** Operations handed to the thread pool so far. */
  get operations(): number {
    return this.operationCount;
  }

  /** Requests served from the page cache on the event loop (RWF_NOWAIT), without a hop. */
  get nowaitHits(): number {
    return this.nowaitHitCount;
  }

  /**
   * Fills `target` with the bytes at `offset`; fails with EIO if the file ends first. `settle` may run before
   * this returns (a page-cache hit).
   */
  read(offset: number, target: Uint8Array, settle: Settle): void {
    if (this.nowaitReads && this.tryNowait(false, offset, target)) {
      settle(null);
      return;
    }
    this.enqueue(KIND_READ, offset, target, settle);
  }

  /** Writes all of `data` at `offset`; with `fua` it is on stable storage (fdatasync) before `settle`. */
  write(offset: number, data: Uint8Array, fua: boolean, settle: Settle): void {
    if (!fua && this.nowaitWrites && this.tryNowait(true, offset, data)) {
      settle(null);
      return;
    }
    this.enqueue(fua ? KIND_WRITE_FUA : KIND_WRITE, offset, data, settle);
  }

  /**
   * One RWF_NOWAIT attempt; true when it transferred everything. Anything else (not cached, short, an error,
   * over the per-turn budget) leaves the whole request to the thread pool, which reports errors properly;
   * repeating a partial transfer there is harmless, it moves the same bytes.
   */
  private tryNowait(write: boolean, offset: number, buffer: Uint8Array): boolean {
    const length = buffer.byteLength;
    if (this.nowaitSkipOperations > 0) {
      this.nowaitSkipOperations--;
      return false;
    }
    if (length === 0 || length > NOWAIT_REQUEST_BYTES_MAX || length > this.nowaitBudgetBytes) return false;
    checkRange(offset, length, true);
    let transferred: number;
    try {
      transferred = write ? addon.pwriteNowait(this.fd, buffer, offset) : addon.preadNowait(this.fd, buffer, offset);
    } catch {
      return false;
    }
    if (transferred === -2) {
      if (write) this.nowaitWrites = false;
      else this.nowaitReads = false;
      return false;
    }
    if (transferred === -1) {
      // A cold working set: stop paying a failed system call per request for a while.
      if (++this.nowaitMissesInRow >= NOWAIT_MISSES_IN_ROW_MAX) {
        this.nowaitMissesInRow = 0;
        this.nowaitSkipOperations = NOWAIT_SKIP_OPERATIONS;
      }
      return false;
    }
    this.nowaitMissesInRow = 0;
    this.nowaitBudgetBytes -= transferred;
    if (!this.nowaitBudgetResetScheduled) {
      this.nowaitBudgetResetScheduled = true;
      setImmediate(this.resetNowaitBudgetBound);
    }
    if (transferred !== length) return false;
    this.nowaitHitCount++;
    return true;
  }

  /** fdatasync: every write settled before this call is durable before `settle`. */
  flush(settle: Settle): void {
    this.enqueue(KIND_FLUSH, 0, null, settle);
  }

  readAsync(offset: number, target: Uint8Array): Promise<void> {
    return new Promise((resolve, reject) => this.read(offset, target, (error) => (error ? reject(error) : resolve())));
  }

  writeAsync(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    return new Promise((resolve, reject) =>
      this.write(offset, data, fua, (error) => (error ? reject(error) : resolve())),
    );
  }

  flushAsync(): Promise<void> {
    return new Promise((resolve, reject) => this.flush((error) => (error ? reject(error) : resolve())));
  }

  /** Resolves once nothing is queued or running (used before closing the descriptor). */
  drain(): Promise<void> {
    if (this.ringCount === 0 && this.batchesInFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  private enqueue(kind: number, offset: number, buffer: Uint8Array | null, settle: Settle): void {
    if (kind !== KIND_FLUSH) {
      checkRange(offset, buffer!.byteLength, true);
    }
    if (this.ringCount === this.ringKinds.length) this.growRing();
    const index = (this.ringHead + this.ringCount) % this.ringKinds.length;
    this.ringKinds[index] = kind;
    this.ringOffsets[index] = offset;
    this.ringBuffers[index] = buffer;
    this.ringSettles[index] = settle;
    this.ringCount++;
    // Dispatch at the end of the current job, so that requests issued together (one socket read's worth of
    // NBD requests) leave in one hop.
    if (!this.dispatchScheduled && this.idleBatches.length > 0) {
      this.dispatchScheduled = true;
      queueMicrotask(this.dispatchBound);
    }
  }

  private growRing(): void {
    const oldCapacity = this.ringKinds.length;
    const capacity = oldCapacity * 2;
    const kinds = new Uint8Array(capacity);
    const offsets = new Float64Array(capacity);
    const buffers = new Array<Uint8Array | null>(capacity).fill(null);
    const settles = new Array<Settle | null>(capacity).fill(null);
    for (let i = 0; i < this.ringCount; i++) {
      const from = (this.ringHead + i) % oldCapacity;
      kinds[i] = this.ringKinds[from]!;
      offsets[i] = this.ringOffsets[from]!;
      buffers[i] = this.ringBuffers[from]!;
      settles[i] = this.ringSettles[from]!;
    }
    this.ringKinds = kinds;
    this.ringOffsets = offsets;
    this.ringBuffers = buffers;
    this.ringSettles = settles;
    this.ringHead = 0;
  }

  private dispatch(): void {
    this.dispatchScheduled = false;
    while (this.ringCount > 0 && this.idleBatches.length > 0) {
      const batch = this.idleBatches.pop()!;
      const capacity = this.ringKinds.length;
      const share = Math.ceil(this.ringCount / (this.idleBatches.length + 1));
      const operationsMax = Math.min(this.batchOperationsMax, Math.max(this.batchOperationsSpreadMin, share));
      let count = 0;
      let bytes = 0;
      while (this.ringCount > 0 && count < operationsMax) {
        const index = this.ringHead;
        const buffer = this.ringBuffers[index]!;
        const length = buffer === null ? 0 : buffer.byteLength;
        if (count > 0 && bytes + length > this.batchBytesMax) break;
        batch.kinds[count] = this.ringKinds[index]!;
        batch.offsets[count] = this.ringOffsets[index]!;
        batch.buffers[count] = buffer;
        batch.settles[count] = this.ringSettles[index]!;
        this.ringBuffers[index] = null;
        this.ringSettles[index] = null;
        this.ringHead = (index + 1) % capacity;
        this.ringCount--;
        bytes += length;
        count++;
      }
      batch.count = count;
      this.hopCount++;
      this.operationCount += count;
      this.batchesInFlight++;
      try {
        addon.ioBatch(this.fd, count, batch.kinds, batch.offsets, batch.buffers, batch.results, batch.onDone);
      } catch {
        // Only a programming error gets here (the arguments were checked); fail the batch rather than hang it.
        batch.results.fill(5 /* EIO */, 0, count);
        queueMicrotask(batch.onDone);
      }
    }
  }

  private complete(batch: Batch): void {
    const count = batch.count;
    const settles = batch.settles;
    for (let i = 0; i < count; i++) {
      const settle = settles[i]!;
      const result = batch.results[i]!;
      settles[i] = null;
      batch.buffers[i] = null;
      // Settle callbacks only resolve promises or queue more work; none may reach this batch before it is
      // back in the pool below.
      settle(result === 0 ? null : systemError(result, syscallOfKind[batch.kinds[i]!]!));
    }
    batch.count = 0;
    this.batchesInFlight--;
    this.idleBatches.push(batch);
    if (this.ringCount > 0) {
      this.dispatch();
    } else if (this.batchesInFlight === 0 && this.drainWaiters.length > 0) {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const waiter of waiters) waiter();
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Socket buffers.

export interface SocketBufferBytes {
  sendBytes: number;
  receiveBytes: number;
}

/**
 * SO_SNDBUF / SO_RCVBUF on a stream socket's descriptor (Node.js sets them only for UDP); an omitted or 0 side is
 * left alone. Returns both sizes as the kernel reports them afterwards: it doubles a request (half is its own
 * bookkeeping) and silently caps it at net.core.wmem_max / rmem_max. Setting either turns off the kernel's TCP
 * buffer autotuning for that side, so ask for a size at least as large as the autotuned one would grow to.
 */
export function setSocketBufferBytes(fd: number, sizes: Partial<SocketBufferBytes>): SocketBufferBytes {
  checkFd(fd);
  const sendBytes = sizes.sendBytes ?? 0;
  const receiveBytes = sizes.receiveBytes ?? 0;
  for (const [name, value] of [['sendBytes', sendBytes], ['receiveBytes', receiveBytes]] as const) {
    if (!Number.isSafeInteger(value) || value < 0 || value > 0x3fffffff) {
      throw new RangeError(`setSocketBufferBytes: ${name} must be an integer from 0 to 2^30 - 1, got ${value}`);
    }
  }
  const [send, receive] = addon.setSocketBufferBytes(fd, sendBytes, receiveBytes);
  return { sendBytes: send, receiveBytes: receive };
}

// ------------------------------------------------------------------------------------------------------------
// Kernel NBD client primitives (src/nbd/kernel.ts builds the attach/detach flow on them).

/** socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC): two connected descriptors. */
export function socketPair(): [number, number] {
  return addon.socketPair();
}

/** close(2) for descriptors no Node.js object owns. */
export function closeFd(fd: number): void {
  checkFd(fd);
  addon.closeFd(fd);
}

export interface NbdConfiguration {
  blockSizeBytes: number;
  sizeBytes: number;
  timeoutSeconds: number;
  /** NBD transmission flags (HAS_FLAGS, READ_ONLY, SEND_FLUSH...), as the server would send them. */
  flags: number;
  kernelSocketFds: number[];
}

/** The ioctl sequence before NBD_DO_IT: NBD_CLEAR_SOCK, SET_BLKSIZE, SET_SIZE_BLOCKS, SET_TIMEOUT, SET_SOCK..., SET_FLAGS. */
export function nbdConfigure(nbdFd: number, configuration: NbdConfiguration): void {
  checkFd(nbdFd);
  const { blockSizeBytes, sizeBytes, timeoutSeconds, flags, kernelSocketFds } = configuration;
  if (![512, 1024, 2048, 4096].includes(blockSizeBytes)) {
    throw new RangeError(`blockSizeBytes must be 512, 1024, 2048 or 4096, got ${blockSizeBytes}`);
  }
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % blockSizeBytes !== 0) {
    throw new RangeError(`sizeBytes must be a positive multiple of blockSizeBytes ${blockSizeBytes}, got ${sizeBytes}`);
  }
  if (!Number.isSafeInteger(timeoutSeconds) || timeoutSeconds < 0) {
    throw new RangeError(`timeoutSeconds must be a non-negative integer, got ${timeoutSeconds}`);
  }
  if (!Number.isInteger(flags) || flags < 0 || flags > 0xffff) throw new RangeError(`flags must be a u16, got ${flags}`);
  if (kernelSocketFds.length < 1) throw new RangeError('at least one socket is needed');
  kernelSocketFds.forEach(checkFd);
  addon.nbdConfigure(nbdFd, blockSizeBytes, sizeBytes, timeoutSeconds, flags, kernelSocketFds);
}

/** NBD_DO_IT on a dedicated thread: settles when the kernel lets go of the device. */
export function nbdDoIt(nbdFd: number): Promise<void> {
  checkFd(nbdFd);
  return addon.nbdDoIt(nbdFd);
}

/** NBD_DISCONNECT: the kernel sends NBD_CMD_DISC and NBD_DO_IT returns. */
export function nbdDisconnect(nbdFd: number): void {
  checkFd(nbdFd);
  addon.nbdDisconnect(nbdFd);
}

// ------------------------------------------------------------------------------------------------------------
// The NBD data path on native threads (native/src/nbd_data_path.cc).

/** Why a data path round ended. */
export enum DataPathStop {
  /** A request the path does not serve: its header bytes come back for the JavaScript parser. */
  Handback = 0,
  /** stop() took effect at a request boundary. */
  Stopped = 1,
  /** The client closed its side between requests. */
  End = 2,
  /** Receiving or sending failed: the connection is broken. */
  SocketError = 3,
  /** The client closed or failed in the middle of a request (a WRITE payload cut short). */
  Torn = 4,
  /** abort() took effect. */
  Aborted = 5,
}

export interface DataPathOptions {
  /** The connection's socket and the device's descriptor; the path works on its own duplicates of both. */
  socketFd: number;
  fileFd: number;
  /** The export's size: requests past it go back to JavaScript (which answers EINVAL or ENOSPC). */
  sizeBytes: number;
  readOnly: boolean;
  /** Structured replies negotiated: READ replies are OFFSET_DATA or ERROR chunks. */
  structured: boolean;
  fuaAllowed: boolean;
  flushAllowed: boolean;
  /** Larger READ/WRITE requests go back to JavaScript. */
  requestBytesMax: number;
  /** Payload buffers of every data path in the process together, at most; past it requests go back to JavaScript. */
  bufferBytesCap: number;
  /** Worker threads on this connection (each holds one request at a time). */
  threads: number;
  /** Move WRITE payloads socket -> pipe -> file with splice (copied once, into the page cache), not recv + pwrite. */
  spliceWrites: boolean;
  /** Move READ data file -> pipe -> socket with splice (not copied by us at all), not pread + send. */
  spliceReads: boolean;
  /** A replicated device: WRITE and FLUSH go through this replication plane (or back to JavaScript). */
  plane?: ReplPlane;
}

export interface DataPathResult {
  reason: DataPathStop;
  /** Bytes of the stream the path read but did not serve (a handed-back request's header). */
  leftover: Buffer | undefined;
  /** For SocketError: the errno that broke the socket, when known. */
  errno: number;
}

/**
 * Serves READ, WRITE and FLUSH of one NBD connection on native threads while armed (see the file comment of
 * native/src/nbd_data_path.cc). `onStop` runs on the event loop once per arm(), after every worker is idle.
 */
export class NbdDataPath {
  private readonly native: NativeDataPath;

  constructor(options: DataPathOptions, onStop: (result: DataPathResult) => void) {
    checkFd(options.socketFd);
    checkFd(options.fileFd);
    checkRange(0, options.sizeBytes, true);
    if (!Number.isSafeInteger(options.requestBytesMax) || options.requestBytesMax < 1 || options.requestBytesMax > 0xffffffff) {
      throw new RangeError(`NbdDataPath: requestBytesMax ${options.requestBytesMax} out of range`);
    }
    if (!Number.isSafeInteger(options.bufferBytesCap) || options.bufferBytesCap < 0) {
      throw new RangeError(`NbdDataPath: bufferBytesCap ${options.bufferBytesCap} out of range`);
    }
    if (!Number.isInteger(options.threads) || options.threads < 1 || options.threads > 64) {
      throw new RangeError(`NbdDataPath: threads must be 1-64, got ${options.threads}`);
    }
    const flags = (options.readOnly ? 1 : 0) | (options.structured ? 2 : 0) | (options.fuaAllowed ? 4 : 0) |
      (options.flushAllowed ? 8 : 0) | (options.spliceWrites ? 16 : 0) | (options.spliceReads ? 32 : 0);
    this.native = new addon.NbdDataPath(
      options.socketFd, options.fileFd, options.sizeBytes, flags, options.requestBytesMax, options.bufferBytesCap,
      options.threads,
      (reason, leftover, errnoPositive) => {
        this.native.unref();
        onStop({ reason: reason as DataPathStop, leftover, errno: errnoPositive });
      },
      options.plane?.native,
    );
  }

  /** Of the requests, the WRITE and FLUSH requests replicated through the plane. */
  get replicatedRequests(): number {
    return this.native.replicatedRequests();
  }

  /** Starts serving; false when a round is running or the path was aborted or destroyed. */
  arm(): boolean {
    return this.native.arm();
  }

  /** Ends the round at the next request boundary (a request being received or run still completes). */
  stop(): void {
    this.native.stop();
  }

  /** Ends the round now: a payload being received is dropped, blocked workers wake. */
  abort(): void {
    this.native.abort();
  }

  /** Aborts, joins the threads and closes the duplicates. A result still queued may arrive later; ignore it. */
  destroy(): void {
    this.native.destroy();
  }

  get requests(): number {
    return this.native.requests();
  }

  /** Of those, the ones whose payload or data went through the pipe (splice) rather than the buffer. */
  get splicedRequests(): number {
    return this.native.splicedRequests();
  }
}

/** Payload buffer bytes every data path in the process holds (for tests of the cap). */
export function dataPathBufferBytes(): number {
  return addon.nbdDataPathBufferBytes();
}

// ------------------------------------------------------------------------------------------------------------
// The native replication data plane (native/src/repl_plane.cc).

/** What the plane tells JavaScript, in order (ReplEventKind says which fields are set). */
export interface ReplEvent {
  kind: ReplEventKind;
  /** The transport it concerns (frames, closed, drained, peer write failed). */
  transport: number;
  channel?: number;
  type?: number;
  flags?: number;
  id?: number;
  offset?: number;
  body?: Buffer;
  reason?: string;
  token?: number;
  /** offset, length pairs. */
  ranges?: number[];
}

export enum ReplEventKind {
  /** A frame the plane does not handle itself, for the JavaScript receiver. */
  Frame = 0,
  /** The transport broke (reason). */
  Closed = 1,
  /** The data socket's send queue emptied (after wantDrain). */
  Drained = 2,
  /** Native writes the peer did not confirm: set the ranges in the bitmap, then releaseMarks(token). */
  Mark = 3,
  /** close() found writes in flight; now none are. */
  Quiesced = 4,
  /** A peer write failed on this node's disk (NEG_ACK sent): set the range in the bitmap, log the reason. */
  PeerWriteFailed = 5,
}

export interface ReplPlaneCounters {
  /** Application writes (as Primary) and their bytes, replicated on the plane. */
  writes: number;
  writeBytes: number;
  /** Peer writes (as Secondary) and their bytes, applied on the plane. */
  peerWrites: number;
  peerWriteBytes: number;
  /** Bytes the NBD data path read from the local disk of this device. */
  readBytes: number;
}

/** One replicated device's native data plane: admission of NBD writes, their acks, events to JavaScript. */
export class ReplPlane {
  /** @internal */
  readonly native: NativeReplPlane;

  constructor(onEvents: (events: ReplEvent[]) => void) {
    this.native = new addon.ReplPlane(onEvents);
  }

  /** Lets NBD data paths admit writes into the pinned extents (one byte per 4 MiB extent); false if no transport. */
  open(protocol: 'B' | 'C', maxInFlight: number, pinnedExtents: Buffer): boolean {
    return this.native.open(protocol, maxInFlight, pinnedExtents);
  }

  /** Stops admission; true when nothing is in flight, else a Quiesced event follows. */
  close(): boolean {
    return this.native.close();
  }

  releaseMarks(token: number): void {
    this.native.releaseMarks(token);
  }

  get inFlight(): number {
    return this.native.inFlight();
  }

  counters(): ReplPlaneCounters {
    return this.native.counters();
  }
}

/** One peer connection's two sockets, owned by native threads once started (see repl_plane.cc). */
export class ReplTransport {
  private readonly native: NativeReplTransport;

  constructor(plane: ReplPlane, options: {
    dataFd: number; metaFd: number; fileFd: number; sizeBytes: number; validTypes: Buffer;
    dataLeftover?: Buffer; metaLeftover?: Buffer;
  }) {
    checkFd(options.dataFd);
    checkFd(options.metaFd);
    checkFd(options.fileFd);
    checkRange(0, options.sizeBytes, true);
    this.native = new addon.ReplTransport(plane.native, options.dataFd, options.metaFd, options.fileFd,
      options.sizeBytes, options.validTypes, options.dataLeftover, options.metaLeftover);
  }

  get id(): number {
    return this.native.id;
  }

  start(): void {
    this.native.start();
  }

  sendFrame(channel: number, type: number, flags: number, id: number, offset: number, body?: Uint8Array): boolean {
    return this.native.sendFrame(channel, type, flags, id >>> 0, offset, body);
  }

  close(reason: string): void {
    this.native.close(reason);
  }

  destroy(): void {
    this.native.destroy();
  }

  setPaused(paused: boolean): void {
    this.native.setPaused(paused);
  }

  queuedBytes(channel: number): number {
    return this.native.queuedBytes(channel);
  }

  wantDrain(): void {
    this.native.wantDrain();
  }

  get lastMetaReceivedMs(): number {
    return this.native.lastMetaReceivedMs();
  }

  get sentBytes(): number {
    return this.native.sentBytes();
  }

  get receivedBytes(): number {
    return this.native.receivedBytes();
  }

  armSecondary(protocol: 'A' | 'B' | 'C', forwardedSeen: number): boolean {
    return this.native.armSecondary(protocol, forwardedSeen);
  }

  disarmSecondary(): void {
    this.native.disarmSecondary();
  }
}
