// Resync and online verify. The SyncTarget drives: it walks its bitmap (already merged with the source's),
// asks for dirty ranges at a controlled rate, writes the replies through its ordering gate and clears the bits;
// the SyncSource answers each request by reading through its own gate (so a reply can never overtake or be
// overtaken by an application write to the same blocks on the data socket) and clears its bits when the target
// confirms. Checksum-based resync (csums-alg): the request carries the target's digest and the source answers
// "same" without data when it matches. Replies are lz4-compressed when that saves at least an eighth.
// The bitmap is the progress record: it is written back every few seconds, so an interrupted resync resumes.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import lz4 from 'lz4';
import xxhash from 'xxhash-wasm';
import type { Logger } from '../util/log.js';
import { BITMAP_BLOCK_BYTES } from '../metadata/bitmap.js';
import { FrameFlag, FrameType } from './frame.js';
import type { ReplicatedDevice } from './device.js';
import { receivePool } from './pool.js';
import { CHANNEL_DATA, CHANNEL_META, type PeerConnection } from './link.js';

/** One resync request covers at most this much (a run of dirty bits is split into such requests). */
export const RESYNC_REQUEST_MAX_BYTES = 256 * 1024;
/** Requests in flight from the target: 8 MiB keeps a loopback link and a disk busy without growing memory. */
export const RESYNC_IN_FLIGHT_MAX_BYTES = 8 * 1024 * 1024;
/** Application I/O seen this recently makes the rate controller fall back to the minimum rate. */
const APPLICATION_IO_WINDOW_MS = 500;
/**
 * How often the target writes its shrinking bitmap back during a resync. Only cleared bits are at stake (an
 * unpersisted clear means a block is resynced again after a crash, never skipped). Each write-back first
 * fdatasyncs the data written since the last one (a bit is cleared only once its blocks are durable), which
 * halved resync throughput at 1 s; 5 s keeps that cost small while an interrupted resync still resumes close
 * to where it stopped.
 */
const BITMAP_PERSIST_INTERVAL_MS = 5_000;
/**
 * Written but not yet flushed resync data past which the target starts an fdatasync (in the background, the
 * stream goes on): the disk writes back while the transfer runs instead of all of it at the end of the pass,
 * before the target may become UpToDate.
 */
const UNFLUSHED_FLUSH_BYTES = 64 * 1024 * 1024;

const hasher = await xxhash();

/** A digest of `data` with the configured algorithm (xxh64 by default: fast; any node crypto hash works). */
export function digest(algorithm: string, data: Uint8Array): Buffer {
  if (algorithm === 'xxh64' || algorithm === 'xxhash64' || algorithm === 'xxhash') {
    const value = hasher.h64Raw(data);
    const out = Buffer.allocUnsafe(8);
    out.writeBigUInt64BE(value, 0);
    return out;
  }
  return createHash(algorithm).update(data).digest();
}

export interface RateSettings {
  maxBytesPerSecond: number;
  minBytesPerSecond: number;
}

/** Token bucket: waits so that bytes taken stay under the rate (max, or min while application I/O competes). */
export class RateController {
  private tokens = 0;
  private lastRefillMs = Date.now();

  constructor(
    public settings: RateSettings,
    private readonly lastApplicationIoMs: () => number,
  ) {}

  currentRate(): number {
    const competing = Date.now() - this.lastApplicationIoMs() < APPLICATION_IO_WINDOW_MS;
    return competing ? Math.min(this.settings.minBytesPerSecond, this.settings.maxBytesPerSecond)
      : this.settings.maxBytesPerSecond;
  }

  /** Resolves when `bytes` may be sent. */
  async take(bytes: number): Promise<void> {
    for (;;) {
      const now = Date.now();
      const rate = this.currentRate();
      // At most 100 ms worth of burst, and at least one request's worth so a slow rate still makes progress.
      const burst = Math.max(rate / 10, RESYNC_REQUEST_MAX_BYTES);
      this.tokens = Math.min(burst, this.tokens + ((now - this.lastRefillMs) * rate) / 1000);
      this.lastRefillMs = now;
      if (this.tokens >= bytes || this.tokens >= burst) {
        this.tokens -= bytes;
        return;
      }
      const waitMs = Math.max(1, Math.ceil(((bytes - this.tokens) * 1000) / rate));
      await sleep(Math.min(waitMs, 100));
    }
  }
}

/** Progress as status --json shows it. */
export class Progress {
  totalBytes = 0;
  doneBytes = 0;
  readonly startedMs = Date.now();
  private samples: Array<[number, number]> = [];

  add(bytes: number): void {
    this.doneBytes += bytes;
  }

  /** Bytes per second over the last few seconds. */
  bytesPerSecond(): number {
    const now = Date.now();
    this.samples.push([now, this.doneBytes]);
    while (this.samples.length > 2 && now - this.samples[0]![0] > 3000) this.samples.shift();
    const [firstMs, firstBytes] = this.samples[0]!;
    const elapsedMs = now - firstMs;
    if (elapsedMs < 200) {
      const sinceStart = now - this.startedMs;
      return sinceStart > 0 ? Math.round((this.doneBytes * 1000) / sinceStart) : 0;
    }
    return Math.round(((this.doneBytes - firstBytes) * 1000) / elapsedMs);
  }

  etaSeconds(rate: number): number {
    const left = Math.max(0, this.totalBytes - this.doneBytes);
    return rate > 0 ? Math.ceil(left / rate) : left === 0 ? 0 : -1;
  }
}

export interface ResyncTargetOptions {
  device: ReplicatedDevice;
  connection: PeerConnection;
  rate: RateController;
  checksumAlgorithm?: string;
  persistBitmap: () => Promise<void>;
  logger: Logger;
}

interface Waiter {
  resolve: () => void;
}

/** The SyncTarget's side: requests dirty ranges, writes replies, clears bits. */
export class ResyncTarget {
  readonly progress = new Progress();
  paused = false;
  private inFlightBytes = 0;
  private stopped: string | null = null;
  private wake: Waiter | null = null;
  private lastPersistMs = Date.now();
  private readonly pendingRequests = new Map<number, number>(); // offset -> length
  /**
   * Ranges written (to the page cache) whose bits are still set: a bit is cleared only once an fdatasync after
   * its write returned, so a bitmap written back never claims blocks in sync that a power loss could take.
   * Flat pairs (offset, length).
   */
  private unflushed: number[] = [];
  /** Bytes in `unflushed`: transferred and written, their bits still set until the next flush. */
  unflushedBytes = 0;
  private flushing: Promise<void> | null = null;

  constructor(private readonly options: ResyncTargetOptions) {
    this.progress.totalBytes = options.device.bitmap.dirtyBytes();
  }

  /** Runs to completion: resolves true when every bit is clear, false when stopped (link lost, down). */
  async run(): Promise<boolean> {
    const { device, connection } = this.options;
    const bitmap = device.bitmap;
    for (let pass = 0; pass < 1000 && this.stopped === null; pass += 1) {
      let cursorBlock = 0;
      for (;;) {
        if (this.stopped !== null) break;
        while (this.paused && this.stopped === null) await this.sleepUntilWoken(200);
        const start = bitmap.nextSet(cursorBlock);
        if (start < 0) break;
        // Extend over the run of set bits, up to one request's size.
        let countBlocks = 1;
        const maxBlocks = RESYNC_REQUEST_MAX_BYTES / BITMAP_BLOCK_BYTES;
        while (countBlocks < maxBlocks && start + countBlocks < bitmap.blockCount && bitmap.isSet(start + countBlocks)) {
          countBlocks += 1;
        }
        cursorBlock = start + countBlocks;
        const offset = start * BITMAP_BLOCK_BYTES;
        const lengthBytes = Math.min(countBlocks * BITMAP_BLOCK_BYTES, device.sizeBytes - offset);
        while (this.inFlightBytes + lengthBytes > RESYNC_IN_FLIGHT_MAX_BYTES && this.stopped === null) {
          await this.sleepUntilWoken(1000);
        }
        if (this.stopped !== null) break;
        await this.options.rate.take(lengthBytes);
        if (this.stopped !== null) break;
        await this.request(offset, lengthBytes);
      }
      while (this.inFlightBytes > 0 && this.stopped === null) await this.sleepUntilWoken(1000);
      if (this.stopped !== null) break;
      // Everything written durable, and its bits cleared, before the target may count itself in sync.
      await this.flushAndClear();
      if (bitmap.setBits() === 0) {
        await this.options.persistBitmap();
        return true;
      }
    }
    await this.flushAndClear().catch(() => {});
    await this.options.persistBitmap().catch(() => {});
    void connection;
    return false;
  }

  /** fdatasync of the local disk, then the bits of every range written before it are cleared. */
  private flushAndClear(): Promise<void> {
    const run = async (): Promise<void> => {
      if (this.flushing !== null) await this.flushing.catch(() => {});
      const ranges = this.unflushed;
      if (ranges.length === 0) return;
      this.unflushed = [];
      try {
        await this.options.device.local.flush();
      } catch (error) {
        this.unflushed.push(...ranges); // bits stay set: resynced again, never skipped
        this.options.device.reportIoError('resync flush', error);
        throw error;
      }
      const bitmap = this.options.device.bitmap;
      for (let i = 0; i < ranges.length; i += 2) {
        bitmap.clearRange(ranges[i]!, ranges[i + 1]!);
        this.unflushedBytes -= ranges[i + 1]!;
      }
    };
    const done = run();
    this.flushing = done;
    void done.finally(() => {
      if (this.flushing === done) this.flushing = null;
    }).catch(() => {});
    return done;
  }

  private async request(offset: number, lengthBytes: number): Promise<void> {
    const { connection, device, checksumAlgorithm } = this.options;
    this.inFlightBytes += lengthBytes;
    this.pendingRequests.set(offset, lengthBytes);
    if (checksumAlgorithm === undefined) {
      connection.send(CHANNEL_DATA, FrameType.RS_REQUEST, 0, lengthBytes, offset);
      return;
    }
    // Checksum-based: send our digest; the source sends data only where the digests differ.
    const block = Buffer.allocUnsafe(lengthBytes);
    await device.local.read(offset, block);
    device.counters.diskReadBytes += lengthBytes;
    connection.send(CHANNEL_DATA, FrameType.RS_REQUEST, FrameFlag.CSUM, lengthBytes, offset,
      digest(checksumAlgorithm, block));
  }

  /** RS_REPLY from the source. */
  handleReply(flags: number, lengthBytes: number, offset: number, body: Buffer): void {
    const { device, connection } = this.options;
    const requested = this.pendingRequests.get(offset);
    if (requested === undefined) return; // from before a pause/reconnect: the bits stay and are asked again
    assert.equal(requested, lengthBytes, 'resync reply length differs from the request');
    this.pendingRequests.delete(offset);
    device.counters.resyncReceivedBytes += body.length + 24;
    device.counters.networkReceivedBytes += body.length + 24;
    const finish = (written: boolean): void => {
      // A "same" reply is in sync already (our blocks were read to digest them); written ones wait for a flush.
      if (written) {
        this.unflushed.push(offset, lengthBytes);
        this.unflushedBytes += lengthBytes;
      }
      else device.bitmap.clearRange(offset, lengthBytes);
      // The source may clear its bits now: should this node lose them, its own bitmap still has them set.
      connection.send(CHANNEL_META, FrameType.RS_ACK, 0, lengthBytes, offset);
      this.inFlightBytes -= lengthBytes;
      this.progress.add(lengthBytes);
      this.maybePersist();
      this.poke();
    };
    if ((flags & FrameFlag.SAME) !== 0) {
      finish(false);
      return;
    }
    let data = body;
    if ((flags & FrameFlag.LZ4) !== 0) {
      data = Buffer.allocUnsafe(lengthBytes);
      const decoded = lz4.decodeBlock(body, data);
      if (decoded !== lengthBytes) {
        this.stop(`resync reply at ${offset} did not decompress to ${lengthBytes} bytes`);
        connection.close('corrupt resync reply');
        return;
      }
    }
    if (data.length !== lengthBytes) {
      connection.close(`resync reply at ${offset} has ${data.length} bytes, expected ${lengthBytes}`);
      return;
    }
    const admitted = device.enterBackground(offset, lengthBytes, 'resync');
    void (async () => {
      const entry = admitted instanceof Promise ? await admitted : admitted;
      try {
        await device.local.write(offset, data, false);
        device.counters.diskWrittenBytes += lengthBytes;
      } catch (error) {
        this.options.logger.error({ err: error, offset }, 'resync write failed');
        device.reportIoError('resync write', error);
        this.stop('local disk write failed during resync');
        connection.close('resync write failed on the target');
        return;
      } finally {
        device.gate.leave(entry);
        receivePool.release(body);
      }
      finish(true);
    })();
  }

  private maybePersist(): void {
    if (this.unflushedBytes >= UNFLUSHED_FLUSH_BYTES && this.flushing === null) {
      this.flushAndClear().catch((error: Error) =>
        this.options.logger.error({ err: error }, 'flush during resync failed'));
    }
    const now = Date.now();
    if (now - this.lastPersistMs < BITMAP_PERSIST_INTERVAL_MS) return;
    this.lastPersistMs = now;
    this.flushAndClear().then(() => this.options.persistBitmap()).catch((error: Error) =>
      this.options.logger.error({ err: error }, 'bitmap write-back during resync failed'));
  }

  stop(reason: string): void {
    if (this.stopped !== null) return;
    this.stopped = reason;
    this.poke();
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    this.paused = false;
    this.poke();
  }

  private poke(): void {
    const waiter = this.wake;
    this.wake = null;
    waiter?.resolve();
  }

  private sleepUntilWoken(timeoutMs: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        if (this.wake === waiter) this.wake = null;
        resolve();
      }, timeoutMs);
      const waiter: Waiter = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
      };
      this.wake?.resolve();
      this.wake = waiter;
    });
  }
}

export interface ResyncSourceOptions {
  device: ReplicatedDevice;
  connection: PeerConnection;
  checksumAlgorithm?: string;
  logger: Logger;
}

/** The SyncSource's side: answers requests through the gate, clears bits on the target's acks. */
export class ResyncSource {
  readonly progress = new Progress();
  paused = false;
  private compressionMisses = 0;
  private compressionSkips = 0;
  compressedReplies = 0;
  sameReplies = 0;
  /** Requests answered (or being answered) and not acked yet: offset -> length. */
  private readonly awaitingAck = new Map<number, number>();

  constructor(private readonly options: ResyncSourceOptions) {
    this.progress.totalBytes = options.device.bitmap.dirtyBytes();
  }

  handleRequest(flags: number, lengthBytes: number, offset: number, body: Buffer): void {
    const { device, connection } = this.options;
    if (lengthBytes <= 0 || lengthBytes > RESYNC_REQUEST_MAX_BYTES || offset + lengthBytes > device.sizeBytes) {
      connection.close(`bad resync request ${offset}+${lengthBytes}`);
      return;
    }
    // The target acks each reply once written; only an ack for a request made here may clear bits.
    this.awaitingAck.set(offset, lengthBytes);
    const peerDigest = (flags & FrameFlag.CSUM) !== 0 ? Buffer.from(body) : null;
    const admitted = device.enterBackground(offset, lengthBytes, 'resync-read');
    void (async () => {
      const entry = admitted instanceof Promise ? await admitted : admitted;
      // A pooled read buffer, given back once the socket has taken the reply (or at once when not sent).
      const data = receivePool.take(lengthBytes);
      let handedToSocket = false;
      try {
        await device.local.read(offset, data);
        device.counters.diskReadBytes += lengthBytes;
        if (peerDigest !== null && this.options.checksumAlgorithm !== undefined
          && digest(this.options.checksumAlgorithm, data).equals(peerDigest)) {
          this.sameReplies += 1;
          connection.send(CHANNEL_DATA, FrameType.RS_REPLY, FrameFlag.SAME, lengthBytes, offset);
          device.counters.resyncSentBytes += 24;
          device.counters.networkSentBytes += 24;
          return;
        }
        const [replyFlags, payload] = this.compress(data);
        // Sent while still inside the gate: a later application write to these blocks queues behind it.
        if (payload === data && connection.closedReason === null) {
          handedToSocket = true;
          connection.sendWithCallback(CHANNEL_DATA, FrameType.RS_REPLY, replyFlags, lengthBytes, offset, payload,
            () => receivePool.release(data));
        } else {
          connection.send(CHANNEL_DATA, FrameType.RS_REPLY, replyFlags, lengthBytes, offset, payload);
        }
        device.counters.resyncSentBytes += payload.length + 24;
        device.counters.resyncSentDataBytes += payload.length;
        device.counters.networkSentBytes += payload.length + 24;
      } catch (error) {
        this.options.logger.error({ err: error, offset }, 'resync read failed');
        device.reportIoError('resync read', error);
        connection.close('resync read failed on the source');
      } finally {
        device.gate.leave(entry);
        if (!handedToSocket) receivePool.release(data);
      }
    })();
  }

  /** lz4 when it saves at least an eighth; after repeated misses (random data) try only now and then. */
  private compress(data: Buffer): [number, Buffer] {
    if (this.compressionSkips > 0) {
      this.compressionSkips -= 1;
      return [0, data];
    }
    const out = Buffer.allocUnsafe(lz4.encodeBound(data.length));
    const size = lz4.encodeBlock(data, out);
    if (size > 0 && size < data.length - data.length / 8) {
      this.compressionMisses = 0;
      this.compressedReplies += 1;
      return [FrameFlag.LZ4, out.subarray(0, size)];
    }
    this.compressionMisses += 1;
    if (this.compressionMisses >= 4) this.compressionSkips = 32;
    return [0, data];
  }

  handleAck(lengthBytes: number, offset: number): void {
    if (this.awaitingAck.get(offset) !== lengthBytes) {
      throw new Error(`RS_ACK for ${offset}+${lengthBytes}, which no resync request asked for`);
    }
    this.awaitingAck.delete(offset);
    this.options.device.bitmap.clearRange(offset, lengthBytes);
    this.progress.add(lengthBytes);
  }
}

/**
 * Digests of each 4 KiB block of `data` (the last one may be shorter), concatenated, and the digest of that
 * list: the summary is what travels first; the per-block list only where two summaries differ. Hashing the
 * list instead of the data keeps each block hashed once.
 */
export function blockDigests(algorithm: string, data: Buffer): { blocks: Buffer; summary: Buffer } {
  const parts: Buffer[] = [];
  for (let at = 0; at < data.length; at += BITMAP_BLOCK_BYTES) {
    parts.push(digest(algorithm, data.subarray(at, Math.min(data.length, at + BITMAP_BLOCK_BYTES))));
  }
  const blocks = Buffer.concat(parts);
  return { blocks, summary: digest(algorithm, blocks) };
}

/** Blocks whose digests differ, as a bitmask (bit i of byte i/8 = block i of the request), and their count. */
function differingBlocks(ours: Buffer, theirs: Buffer, digestBytes: number): { mask: Buffer; count: number } {
  const blockCount = ours.length / digestBytes;
  const mask = Buffer.alloc(Math.ceil(blockCount / 8));
  let count = 0;
  for (let block = 0; block < blockCount; block += 1) {
    const at = block * digestBytes;
    if (ours.compare(theirs, at, at + digestBytes, at, at + digestBytes) !== 0) {
      mask[block >> 3]! |= 1 << (block & 7);
      count += 1;
    }
  }
  return { mask, count };
}

/** Sets the bitmap bits of the blocks in `mask` (see differingBlocks) of the request at offset. */
export function markDifferingBlocks(device: ReplicatedDevice, offset: number, lengthBytes: number, mask: Buffer): number {
  const blockCount = Math.ceil(lengthBytes / BITMAP_BLOCK_BYTES);
  if (mask.length !== Math.ceil(blockCount / 8)) throw new Error(`verify result mask of ${mask.length} bytes for ${blockCount} blocks`);
  let marked = 0;
  for (let block = 0; block < blockCount; block += 1) {
    if ((mask[block >> 3]! & (1 << (block & 7))) === 0) continue;
    const at = offset + block * BITMAP_BLOCK_BYTES;
    device.bitmap.setRange(at, Math.min(BITMAP_BLOCK_BYTES, offset + lengthBytes - at));
    marked += 1;
  }
  return marked;
}

/**
 * Online verify, the initiator's side. Per 256 KiB it sends one summary digest (OV_REQUEST); the peer answers
 * SAME, or with its digest of every 4 KiB block in the range (OV_REPLY). Then this side compares block by
 * block, marks exactly the differing 4 KiB blocks and tells the peer which (OV_RESULT) so it marks the same.
 * A verify of identical replicas costs one small message each way per 256 KiB.
 */
export class VerifyInitiator {
  readonly progress = new Progress();
  mismatchedBytes = 0;
  private inFlightBytes = 0;
  private stopped: string | null = null;
  private wake: (() => void) | null = null;
  /** Our per-block digests of each request in flight, until the peer answers it. */
  private readonly pending = new Map<number, Buffer>();
  private readonly digestBytes: number;

  constructor(
    private readonly device: ReplicatedDevice,
    private readonly connection: PeerConnection,
    private readonly algorithm: string,
    private readonly rate: RateController,
  ) {
    this.progress.totalBytes = device.sizeBytes;
    this.digestBytes = digest(algorithm, Buffer.alloc(0)).length;
  }

  async run(): Promise<boolean> {
    for (let offset = 0; offset < this.device.sizeBytes && this.stopped === null;) {
      const lengthBytes = Math.min(RESYNC_REQUEST_MAX_BYTES, this.device.sizeBytes - offset);
      while (this.inFlightBytes + lengthBytes > RESYNC_IN_FLIGHT_MAX_BYTES && this.stopped === null) {
        await new Promise<void>((resolve) => {
          this.wake = resolve;
          setTimeout(resolve, 500);
        });
      }
      if (this.stopped !== null) break;
      await this.rate.take(lengthBytes);
      const data = Buffer.allocUnsafe(lengthBytes);
      const admitted = this.device.enterBackground(offset, lengthBytes, 'verify');
      const entry = admitted instanceof Promise ? await admitted : admitted;
      try {
        await this.device.local.read(offset, data);
      } catch (error) {
        this.device.reportIoError('verify read', error);
        throw error;
      } finally {
        this.device.gate.leave(entry);
      }
      const { blocks, summary } = blockDigests(this.algorithm, data);
      this.pending.set(offset, blocks);
      this.inFlightBytes += lengthBytes;
      this.connection.send(CHANNEL_DATA, FrameType.OV_REQUEST, 0, lengthBytes, offset, summary);
      offset += lengthBytes;
    }
    while (this.inFlightBytes > 0 && this.stopped === null) await sleep(20);
    return this.stopped === null;
  }

  handleReply(flags: number, lengthBytes: number, offset: number, body: Buffer): void {
    const ours = this.pending.get(offset);
    if (ours === undefined) throw new Error(`verify reply for ${offset}+${lengthBytes}, which was not asked`);
    this.pending.delete(offset);
    this.inFlightBytes -= lengthBytes;
    this.progress.add(lengthBytes);
    if ((flags & FrameFlag.SAME) === 0) {
      if (body.length !== ours.length) {
        throw new Error(`verify reply for ${offset}+${lengthBytes} has ${body.length} bytes of block digests, expected ${ours.length}`);
      }
      const { mask, count } = differingBlocks(ours, body, this.digestBytes);
      if (count > 0) {
        markDifferingBlocks(this.device, offset, lengthBytes, mask);
        this.mismatchedBytes += count * BITMAP_BLOCK_BYTES;
        this.connection.send(CHANNEL_META, FrameType.OV_RESULT, 0, lengthBytes, offset, mask);
      }
    }
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }

  stop(reason: string): void {
    this.stopped = reason;
  }
}

/**
 * Online verify, the peer's side: compare our summary digest with the initiator's; where they differ, send our
 * per-block digests back. The initiator decides which blocks differ and tells us (OV_RESULT: markDifferingBlocks).
 */
export function answerVerify(device: ReplicatedDevice, connection: PeerConnection, algorithm: string,
  lengthBytes: number, offset: number, body: Buffer): void {
  const peerSummary = Buffer.from(body);
  if (lengthBytes <= 0 || lengthBytes > RESYNC_REQUEST_MAX_BYTES || offset + lengthBytes > device.sizeBytes) {
    connection.close(`bad verify request ${offset}+${lengthBytes}`);
    return;
  }
  const admitted = device.enterBackground(offset, lengthBytes, 'verify');
  void (async () => {
    const entry = admitted instanceof Promise ? await admitted : admitted;
    const data = Buffer.allocUnsafe(lengthBytes);
    try {
      await device.local.read(offset, data);
    } catch (error) {
      device.reportIoError('verify read', error);
      throw error;
    } finally {
      device.gate.leave(entry);
    }
    const { blocks, summary } = blockDigests(algorithm, data);
    if (summary.equals(peerSummary)) connection.send(CHANNEL_META, FrameType.OV_REPLY, FrameFlag.SAME, lengthBytes, offset);
    else connection.send(CHANNEL_META, FrameType.OV_REPLY, 0, lengthBytes, offset, blocks);
  })().catch((error: Error) => connection.close(`verify read failed: ${error.message}`));
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
