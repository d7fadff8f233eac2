// Concurrent NBD writers whose every write carries distinct content, and a per-4-KiB-block model of what each
// block may hold afterwards. The campaign's model (replication-campaign.test.ts) stamps a write with one byte
// value and runs one write at a time; this one is for many writers hitting a small region at once, so it needs
// more than 255 distinguishable contents and has to reason about writes that overlapped in time.
//
// Content: every 4 KiB block of write N is the 8-byte record (N, absolute block number) repeated, so a block read
// back names the one write it came from, and a torn, misplaced or foreign block decodes to nothing. Block 0 of
// all-zero bytes decodes as write 0 (never written); zeroed and trimmed blocks are modelled explicitly.
//
// Ordering: one logical clock ticks at every issue (just before the request is handed to the socket) and at every
// reply (just after it was read), in this single-threaded process. A write W2 issued after W's reply was seen
// definitely came after W. So after the stream, a block may hold W iff no *acknowledged* write to that block was
// issued after W ended. W "ends" at its reply, or, when its connection died unanswered (a SIGKILLed Primary),
// when the death was seen: such a write may or may not have reached a disk. This is "the last acknowledged
// content, or a later (or concurrent) write that was in flight", generalised to concurrent writers.
import { NBD, RawNbdClient } from './helpers/nbd.js';
import { mulberry32 } from './helpers/prng.js';

export const BLOCK = 4096;
const RECORD = 8;
/** Decoded value of a block whose content is unspecified after a trim: any content is allowed. */
const ANY = -1;
/** Decoded value of a block that is neither zero nor a well-formed stamp. */
export const GARBAGE = -2;

/** The content of `blocks` blocks of write `writeId` starting at absolute block `firstBlock`. */
export function stampedContent(writeId: number, firstBlock: number, blocks: number): Buffer {
  const buffer = Buffer.allocUnsafe(blocks * BLOCK);
  const record = Buffer.allocUnsafe(RECORD);
  for (let index = 0; index < blocks; index++) {
    record.writeUInt32LE(writeId >>> 0, 0);
    record.writeUInt32LE((firstBlock + index) >>> 0, 4);
    buffer.fill(record, index * BLOCK, (index + 1) * BLOCK);
  }
  return buffer;
}

/** Which write a block read back at absolute block `blockNumber` came from: 0 for zeroes, GARBAGE otherwise. */
export function decodeBlock(bytes: Buffer, blockNumber: number): number {
  const writeId = bytes.readUInt32LE(0);
  const stampedBlock = bytes.readUInt32LE(4);
  if (writeId === 0 && stampedBlock === 0) return bytes.every((byte) => byte === 0) ? 0 : GARBAGE;
  if (stampedBlock !== blockNumber) return GARBAGE;
  for (let offset = RECORD; offset < BLOCK; offset += RECORD) {
    if (bytes.readUInt32LE(offset) !== writeId || bytes.readUInt32LE(offset + 4) !== blockNumber) return GARBAGE;
  }
  return writeId;
}

interface Candidate {
  /** Write id, 0 for zeroes (never written, or a write-zeroes), ANY for a trim. */
  value: number;
  issueTick: number;
  endTick: number;
  acked: boolean;
}

/** Per 4 KiB block of a region: the writes it may hold. */
export class BlockModel {
  private readonly candidates: Candidate[][];
  constructor(readonly firstBlock: number, readonly blocks: number) {
    this.candidates = Array.from({ length: blocks }, () => [{ value: 0, issueTick: 0, endTick: 0, acked: true }]);
  }

  record(firstBlock: number, blocks: number, candidate: Candidate): void {
    for (let block = firstBlock; block < firstBlock + blocks; block++) {
      const index = block - this.firstBlock;
      if (index < 0 || index >= this.blocks) throw new Error(`block ${block} outside the modelled region`);
      this.candidates[index]!.push(candidate);
    }
  }

  allowed(index: number): Candidate[] {
    const list = this.candidates[index]!;
    let lastAckedIssue = -1;
    for (const candidate of list) if (candidate.acked && candidate.issueTick > lastAckedIssue) lastAckedIssue = candidate.issueTick;
    // Disallowed: whatever ended before the last acknowledged write to this block was issued.
    return list.filter((candidate) => candidate.endTick >= lastAckedIssue);
  }

  /** Blocks of `image` (the region read back) that hold content the model does not allow. */
  violations(image: Buffer): string[] {
    const bad: string[] = [];
    for (let index = 0; index < this.blocks; index++) {
      const blockNumber = this.firstBlock + index;
      const value = decodeBlock(image.subarray(index * BLOCK, (index + 1) * BLOCK), blockNumber);
      const allowed = this.allowed(index);
      if (allowed.some((candidate) => candidate.value === ANY || candidate.value === value)) continue;
      const describe = (c: Candidate) => `${c.value === 0 ? 'zeroes' : `write ${c.value}`}${c.acked ? '' : ' (unacknowledged)'}`;
      const acked = this.candidates[index]!.filter((c) => c.acked);
      const held = value === GARBAGE ? 'garbage (torn, misplaced or foreign)' : value === 0 ? 'zeroes' : `write ${value}`;
      bad.push(`block ${blockNumber} (offset ${blockNumber * BLOCK}): holds ${held}; allowed ${allowed.map(describe).join(' / ')}; ` +
        `last acknowledged ${acked.length > 0 ? describe(acked[acked.length - 1]!) : 'none'}`);
    }
    return bad;
  }

  /** After a check, each block may hold exactly what was seen, until a later acknowledged write replaces it. */
  settle(image: Buffer, tick: number): void {
    for (let index = 0; index < this.blocks; index++) {
      const value = decodeBlock(image.subarray(index * BLOCK, (index + 1) * BLOCK), this.firstBlock + index);
      this.candidates[index] = [{ value, issueTick: tick, endTick: tick, acked: true }];
    }
  }
}

export interface StreamOptions {
  /** The Primary's NBD unix socket. */
  socketPath: string;
  seed: number;
  connections: number;
  /** Requests in flight per connection. */
  depth: number;
  firstBlock: number;
  blocks: number;
  /** Longest write, in blocks. */
  maxBlocks: number;
  /** Share of writes of exactly `maxBlocks` (large writes take other paths than small ones). */
  largeShare?: number;
  /** Shares of FUA writes, write-zeroes, trims and flushes among the requests (the rest are plain writes). */
  fuaShare?: number;
  zeroShare?: number;
  trimShare?: number;
  flushShare?: number;
}

export interface StreamResult {
  acked: number;
  /** Requests answered with an NBD error. */
  errors: string[];
  /** Requests whose connection died before an answer (a killed Primary). */
  unanswered: number;
  /** Connections that died (or could not connect). */
  deadConnections: number;
}

/**
 * `connections` NBD connections to one export, each keeping `depth` random requests in flight inside the region
 * until stop(). Shares one clock and one model with other streams (a failover moves writing to another node).
 */
export class WriteStream {
  acked = 0;
  private stopping = false;
  private readonly errors: string[] = [];
  private unanswered = 0;
  private deadConnections = 0;
  private readonly random: () => number;
  private readonly ackWaiters: { count: number; resolve: () => void }[] = [];
  private readonly finished: Promise<void>;

  constructor(private readonly options: StreamOptions, private readonly model: BlockModel, private readonly shared: { tick: number; nextWriteId: number }) {
    this.random = mulberry32(options.seed);
    this.finished = Promise.all(Array.from({ length: options.connections }, (_, index) => this.connection(index))).then(() => {
      for (const waiter of this.ackWaiters.splice(0)) waiter.resolve();
    });
  }

  /** Resolves once `count` requests of this stream were answered successfully (or the stream ended). */
  acks(count: number): Promise<void> {
    if (this.acked >= count) return Promise.resolve();
    return new Promise((resolve) => this.ackWaiters.push({ count, resolve }));
  }

  /** Stops issuing, waits for what is in flight. */
  async stop(): Promise<StreamResult> {
    this.stopping = true;
    return this.ended();
  }

  /** Waits for the stream to end by itself (every connection died). */
  async ended(): Promise<StreamResult> {
    await this.finished;
    return { acked: this.acked, errors: this.errors, unanswered: this.unanswered, deadConnections: this.deadConnections };
  }

  private pick(n: number): number {
    return Math.floor(this.random() * n);
  }

  private async connection(index: number): Promise<void> {
    const o = this.options;
    let client: RawNbdClient;
    let flags: number;
    try {
      client = await RawNbdClient.connect(o.socketPath);
      ({ flags } = await client.handshake());
    } catch (error) {
      this.deadConnections += 1;
      this.errors.push(`connection ${index}: ${(error as Error).message}`);
      return;
    }
    const canTrim = (flags & 32) !== 0;
    const canZero = (flags & 64) !== 0;
    interface Op { kind: string; firstBlock: number; blocks: number; candidate: Candidate | null }
    const inFlight = new Map<bigint, Op>();
    let cookie = BigInt(index) << 40n;
    const issue = (): void => {
      const roll = this.random();
      const fua = o.fuaShare ?? 0;
      const zero = canZero ? o.zeroShare ?? 0 : 0;
      const trim = canTrim ? o.trimShare ?? 0 : 0;
      const flush = o.flushShare ?? 0;
      const kind = roll < flush ? 'flush' : roll < flush + zero ? 'zero' : roll < flush + zero + trim ? 'trim'
        : roll < flush + zero + trim + fua ? 'fua' : 'write';
      const blocks = this.random() < (o.largeShare ?? 0) ? o.maxBlocks : 1 + this.pick(Math.min(o.maxBlocks, 16));
      const firstBlock = o.firstBlock + this.pick(o.blocks - blocks + 1);
      cookie += 1n;
      const issueTick = ++this.shared.tick;
      if (kind === 'flush') {
        inFlight.set(cookie, { kind, firstBlock: 0, blocks: 0, candidate: null });
        client.request(NBD.CMD_FLUSH, 0, cookie, 0, 0);
        return;
      }
      const value = kind === 'zero' ? 0 : kind === 'trim' ? ANY : this.shared.nextWriteId++;
      const candidate: Candidate = { value, issueTick, endTick: Number.POSITIVE_INFINITY, acked: false };
      this.model.record(firstBlock, blocks, candidate);
      inFlight.set(cookie, { kind, firstBlock, blocks, candidate });
      const offset = firstBlock * BLOCK;
      const length = blocks * BLOCK;
      if (kind === 'zero') client.request(NBD.CMD_WRITE_ZEROES, 0, cookie, offset, length);
      else if (kind === 'trim') client.request(NBD.CMD_TRIM, 0, cookie, offset, length);
      else client.request(NBD.CMD_WRITE, kind === 'fua' ? NBD.FLAG_FUA : 0, cookie, offset, length, stampedContent(value, firstBlock, blocks));
    };
    for (let k = 0; k < o.depth; k++) issue();
    while (inFlight.size > 0) {
      let reply: Buffer;
      try {
        // Generous: a Primary may hold writes while its peer is being declared dead or reconnects.
        reply = await client.read(16, 120_000);
      } catch (error) {
        if (!client.ended) this.errors.push(`connection ${index}: ${(error as Error).message}`);
        break;
      }
      const tick = ++this.shared.tick;
      if (reply.readUInt32BE(0) !== NBD.SIMPLE_REPLY_MAGIC) throw new Error(`connection ${index}: bad reply magic`);
      const errno = reply.readUInt32BE(4);
      const replyCookie = reply.readBigUInt64BE(8);
      const op = inFlight.get(replyCookie);
      if (op === undefined) throw new Error(`connection ${index}: reply for unknown cookie ${replyCookie}`);
      inFlight.delete(replyCookie);
      if (op.candidate !== null) {
        op.candidate.endTick = tick;
        op.candidate.acked = errno === 0;
      }
      if (errno !== 0) {
        this.errors.push(`connection ${index}: ${op.kind} of ${op.blocks} blocks at block ${op.firstBlock} failed with errno ${errno}`);
      } else {
        this.acked += 1;
        for (let w = this.ackWaiters.length - 1; w >= 0; w--) {
          if (this.acked >= this.ackWaiters[w]!.count) this.ackWaiters.splice(w, 1)[0]!.resolve();
        }
      }
      if (!this.stopping) issue();
    }
    if (inFlight.size > 0) {
      // The connection died (the Primary was killed): what was in flight may or may not have reached a disk.
      this.deadConnections += 1;
      const tick = ++this.shared.tick;
      for (const op of inFlight.values()) {
        if (op.candidate !== null) op.candidate.endTick = tick;
        this.unanswered += 1;
      }
    }
    client.close();
  }
}

/** Reads `blocks` blocks from `firstBlock` through the export at `socketPath` (one NBD READ per MiB). */
export async function readRegion(socketPath: string, firstBlock: number, blocks: number): Promise<Buffer> {
  const client = await RawNbdClient.connect(socketPath);
  try {
    await client.handshake();
    const parts: Buffer[] = [];
    const perRead = 256;
    for (let block = firstBlock; block < firstBlock + blocks; block += perRead) {
      const count = Math.min(perRead, firstBlock + blocks - block);
      client.request(NBD.CMD_READ, 0, BigInt(block), block * BLOCK, count * BLOCK);
      const reply = await client.readReply(count * BLOCK);
      if (reply.error !== 0) throw new Error(`READ at block ${block} failed with errno ${reply.error}`);
      parts.push(Buffer.from(reply.data));
    }
    return Buffer.concat(parts);
  } finally {
    client.close();
  }
}
