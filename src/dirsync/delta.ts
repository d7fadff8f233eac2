// rsync-style delta transfer for large files: the side that holds the old version (the basis) sends a
// signature (per block: a rolling weak checksum and an xxhash64 strong hash), the side that holds the new
// version scans it with a rolling window and answers with a delta (copy block ranges of the basis, or literal
// bytes), and the basis side applies the delta into a new file. Only changed regions cross the wire.
//
// Memory is bounded whatever the file size: the signature holds 12 bytes per block and the block size grows
// with the file so that a signature never has more than SIGNATURE_BLOCKS_MAX entries; delta generation keeps
// one sliding window; apply copies through one reusable buffer.
import { open, type FileHandle } from 'node:fs/promises';
import xxhash, { type XXHashAPI } from 'xxhash-wasm';

export const BLOCK_SIZE_MIN_BYTES = 2048;
export const BLOCK_SIZE_MAX_BYTES = 1 << 20;
/** Caps the signature at 12 MiB in memory (12 bytes per block) and the hash table at 8 MiB. */
export const SIGNATURE_BLOCKS_MAX = 1 << 20;
/** Literal runs are cut at this size so a delta message stays small and memory stays bounded. */
export const LITERAL_RUN_MAX_BYTES = 256 * 1024;
/** Reads of the source and basis go through buffers of about this size. */
const IO_CHUNK_BYTES = 1 << 20;

let xxhashApi: XXHashAPI | undefined;
let xxhashLoading: Promise<XXHashAPI> | undefined;

/** The xxhash-wasm instance, compiled once per process. */
export async function loadXxhash(): Promise<XXHashAPI> {
  if (xxhashApi !== undefined) return xxhashApi;
  xxhashLoading ??= xxhash().then((api) => {
    xxhashApi = api;
    return api;
  });
  return xxhashLoading;
}

/**
 * The block size for a file: about the square root of its size (as rsync does: the signature and the
 * per-change overhead grow equally), a power of two, and large enough that the block count stays capped.
 */
export function chooseBlockSize(fileSizeBytes: number): number {
  assert(Number.isSafeInteger(fileSizeBytes) && fileSizeBytes >= 0, `bad file size ${fileSizeBytes}`);
  let blockSizeBytes = BLOCK_SIZE_MIN_BYTES;
  const target = Math.sqrt(fileSizeBytes);
  while (blockSizeBytes < target && blockSizeBytes < BLOCK_SIZE_MAX_BYTES) blockSizeBytes *= 2;
  while (Math.ceil(fileSizeBytes / blockSizeBytes) > SIGNATURE_BLOCKS_MAX) blockSizeBytes *= 2;
  return blockSizeBytes;
}

/** The signature of a basis file: one weak and one strong checksum per block; the last block may be short. */
export interface Signature {
  blockSizeBytes: number;
  fileSizeBytes: number;
  weak: Uint32Array;
  /** xxhash64 of each block, as two 32-bit halves (high at 2i, low at 2i+1) to avoid one BigInt per block. */
  strong: Uint32Array;
}

export function blockCount(signature: Pick<Signature, 'blockSizeBytes' | 'fileSizeBytes'>): number {
  return Math.ceil(signature.fileSizeBytes / signature.blockSizeBytes);
}

/**
 * rsync's rolling checksum over `length` bytes: a = sum of bytes, b = sum of (length - i) * byte, both mod
 * 2^16, packed as b << 16 | a. Returns the packed value; the components are recovered by the caller.
 */
export function weakChecksum(data: Uint8Array, start: number, length: number): number {
  let a = 0;
  let b = 0;
  const end = start + length;
  for (let i = start; i < end; i++) {
    a += data[i]!;
    b += a;
  }
  // b accumulated as sum of prefix sums, which equals sum((length - i) * x_i).
  return (((b & 0xffff) << 16) | (a & 0xffff)) >>> 0;
}

function strongInto(api: XXHashAPI, data: Uint8Array, strong: Uint32Array, index: number): void {
  const digest = api.h64Raw(data);
  strong[2 * index] = Number(digest >> 32n);
  strong[2 * index + 1] = Number(digest & 0xffffffffn);
}

/** Computes the signature of a whole file, reading it sequentially through one buffer. */
export async function computeSignature(path: string, blockSizeBytes?: number): Promise<Signature> {
  const handle = await open(path, 'r');
  try {
    return await computeSignatureOfHandle(handle, blockSizeBytes);
  } finally {
    await handle.close();
  }
}

export async function computeSignatureOfHandle(handle: FileHandle, blockSizeBytesWanted?: number): Promise<Signature> {
  const api = await loadXxhash();
  const { size: fileSizeBytes } = await handle.stat();
  const blockSizeBytes = blockSizeBytesWanted ?? chooseBlockSize(fileSizeBytes);
  assert(blockSizeBytes >= 1 && Number.isSafeInteger(blockSizeBytes), `bad block size ${blockSizeBytes}`);
  const count = Math.ceil(fileSizeBytes / blockSizeBytes);
  const weak = new Uint32Array(count);
  const strong = new Uint32Array(2 * count);
  const blocksPerChunk = Math.max(1, Math.floor(IO_CHUNK_BYTES / blockSizeBytes));
  const buffer = Buffer.allocUnsafe(blocksPerChunk * blockSizeBytes);
  let index = 0;
  let position = 0;
  while (position < fileSizeBytes) {
    const wanted = Math.min(buffer.length, fileSizeBytes - position);
    const got = await readFully(handle, buffer, wanted, position);
    if (got !== wanted) throw new Error(`file shrank while computing its signature (at byte ${position + got})`);
    for (let offset = 0; offset < got; offset += blockSizeBytes) {
      const length = Math.min(blockSizeBytes, got - offset);
      weak[index] = weakChecksum(buffer, offset, length);
      strongInto(api, buffer.subarray(offset, offset + length), strong, index);
      index++;
    }
    position += got;
  }
  assert(index === count, 'signature block count');
  return { blockSizeBytes, fileSizeBytes, weak, strong };
}

// --- serialisation: header (magic u32, block size u32, file size u64, count u32) then per block weak u32,
// strong u64 (big-endian high, low).
const SIGNATURE_MAGIC = 0x44535347; // "DSSG"
const SIGNATURE_HEADER_BYTES = 20;

export function encodeSignature(signature: Signature): Buffer {
  const count = blockCount(signature);
  const out = Buffer.allocUnsafe(SIGNATURE_HEADER_BYTES + 12 * count);
  out.writeUInt32BE(SIGNATURE_MAGIC, 0);
  out.writeUInt32BE(signature.blockSizeBytes, 4);
  out.writeBigUInt64BE(BigInt(signature.fileSizeBytes), 8);
  out.writeUInt32BE(count, 16);
  let offset = SIGNATURE_HEADER_BYTES;
  for (let i = 0; i < count; i++) {
    out.writeUInt32BE(signature.weak[i]!, offset);
    out.writeUInt32BE(signature.strong[2 * i]!, offset + 4);
    out.writeUInt32BE(signature.strong[2 * i + 1]!, offset + 8);
    offset += 12;
  }
  return out;
}

/** Parses a signature received from a peer; every field is checked, a bad one is a clear error. */
export function decodeSignature(data: Buffer): Signature {
  if (data.length < SIGNATURE_HEADER_BYTES || data.readUInt32BE(0) !== SIGNATURE_MAGIC) {
    throw new Error('bad block signature: missing header');
  }
  const blockSizeBytes = data.readUInt32BE(4);
  const fileSizeBig = data.readBigUInt64BE(8);
  const count = data.readUInt32BE(16);
  if (blockSizeBytes < 1 || blockSizeBytes > 64 * BLOCK_SIZE_MAX_BYTES) {
    throw new Error(`bad block signature: block size ${blockSizeBytes}`);
  }
  if (fileSizeBig > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error('bad block signature: file size too large');
  const fileSizeBytes = Number(fileSizeBig);
  if (count !== Math.ceil(fileSizeBytes / blockSizeBytes) || data.length !== SIGNATURE_HEADER_BYTES + 12 * count) {
    throw new Error(`bad block signature: ${count} blocks in ${data.length} bytes for a ${fileSizeBytes}-byte file`);
  }
  const weak = new Uint32Array(count);
  const strong = new Uint32Array(2 * count);
  let offset = SIGNATURE_HEADER_BYTES;
  for (let i = 0; i < count; i++) {
    weak[i] = data.readUInt32BE(offset);
    strong[2 * i] = data.readUInt32BE(offset + 4);
    strong[2 * i + 1] = data.readUInt32BE(offset + 8);
    offset += 12;
  }
  return { blockSizeBytes, fileSizeBytes, weak, strong };
}

// --- delta operations

/** Copy `blockCount` consecutive basis blocks starting at `blockIndex`. */
export interface CopyOp {
  kind: 'copy';
  blockIndex: number;
  blockCount: number;
}

/**
 * Literal bytes. `bytes` may be a view into the generator's window: it is valid only until the consumer
 * asks for the next operation (so a payload is copied once, straight into the wire frame or the file).
 */
export interface DataOp {
  kind: 'data';
  bytes: Buffer;
}

export type DeltaOp = CopyOp | DataOp;

const OP_COPY = 1;
const OP_DATA = 2;

/** Encodes one op as a self-contained message (copy: 9 bytes; data: 1 + payload). */
export function encodeDeltaOp(op: DeltaOp): Buffer {
  if (op.kind === 'copy') {
    const out = Buffer.allocUnsafe(9);
    out[0] = OP_COPY;
    out.writeUInt32BE(op.blockIndex, 1);
    out.writeUInt32BE(op.blockCount, 5);
    return out;
  }
  const out = Buffer.allocUnsafe(1 + op.bytes.length);
  out[0] = OP_DATA;
  op.bytes.copy(out, 1);
  return out;
}

export function decodeDeltaOp(message: Buffer): DeltaOp {
  if (message.length === 9 && message[0] === OP_COPY) {
    return { kind: 'copy', blockIndex: message.readUInt32BE(1), blockCount: message.readUInt32BE(5) };
  }
  if (message.length >= 1 && message[0] === OP_DATA) return { kind: 'data', bytes: message.subarray(1) };
  throw new Error(`bad delta operation: type ${message[0]} in ${message.length} bytes`);
}

// --- the lookup table: open hashing of weak checksums to block indexes (chains through `next`).

class WeakIndex {
  private readonly heads: Int32Array;
  private readonly next: Int32Array;
  private readonly shift: number;

  constructor(private readonly signature: Signature, fullBlocks: number) {
    let bits = 4;
    while (1 << bits < 2 * fullBlocks && bits < 24) bits++;
    this.shift = 32 - bits;
    this.heads = new Int32Array(1 << bits).fill(-1);
    this.next = new Int32Array(Math.max(1, fullBlocks)).fill(-1);
    // Insert in reverse so a chain lists lower block indexes first (earlier blocks are matched first).
    for (let i = fullBlocks - 1; i >= 0; i--) {
      const slot = Math.imul(signature.weak[i]!, 0x9e3779b1) >>> this.shift;
      this.next[i] = this.heads[slot]!;
      this.heads[slot] = i;
    }
  }

  first(weak: number): number {
    return this.heads[Math.imul(weak, 0x9e3779b1) >>> this.shift]!;
  }

  following(index: number): number {
    return this.next[index]!;
  }

  weakOf(index: number): number {
    return this.signature.weak[index]!;
  }
}

export interface DeltaStats {
  copiedBytes: number;
  literalBytes: number;
}

/**
 * Generates the delta that turns the basis described by `signature` into the file at `sourcePath`.
 * Streams: the source is read once through a window of a few MiB.
 */
export async function* generateDelta(
  sourcePath: string,
  signature: Signature,
  stats?: DeltaStats,
): AsyncGenerator<DeltaOp> {
  const handle = await open(sourcePath, 'r');
  try {
    yield* generateDeltaFromHandle(handle, signature, stats);
  } finally {
    await handle.close();
  }
}

export async function* generateDeltaFromHandle(
  handle: FileHandle,
  signature: Signature,
  stats: DeltaStats = { copiedBytes: 0, literalBytes: 0 },
): AsyncGenerator<DeltaOp> {
  const api = await loadXxhash();
  const blockSize = signature.blockSizeBytes;
  const count = blockCount(signature);
  const fullBlocks = Math.floor(signature.fileSizeBytes / blockSize);
  const tailLength = signature.fileSizeBytes - fullBlocks * blockSize;
  const index = new WeakIndex(signature, fullBlocks);
  const { size: sourceSizeBytes } = await handle.stat();

  // The window holds source bytes [windowStart, windowStart + end). It must fit a full block beyond any
  // pending literal run, so it is at least LITERAL_RUN_MAX_BYTES + 2 blocks.
  const window = Buffer.allocUnsafe(Math.max(IO_CHUNK_BYTES, LITERAL_RUN_MAX_BYTES) + 2 * blockSize);
  let windowStart = 0; // source offset of window[0]
  let end = 0; // valid bytes in the window
  let readPosition = 0; // next source offset to read
  let pos = 0; // current match position in the window
  let literalStart = 0; // start of the pending literal run in the window

  let pendingCopyIndex = -1;
  let pendingCopyCount = 0;
  // Ops that are ready to yield, in order. At most two at once (a literal run then a copy).
  const flushCopy = (): CopyOp | undefined => {
    if (pendingCopyCount === 0) return undefined;
    const op: CopyOp = { kind: 'copy', blockIndex: pendingCopyIndex, blockCount: pendingCopyCount };
    stats.copiedBytes += copyLengthBytes(signature, op);
    pendingCopyCount = 0;
    pendingCopyIndex = -1;
    return op;
  };

  const refill = async (): Promise<void> => {
    // Keep [literalStart, end) and move it to the front; the caller has flushed long literal runs first.
    if (literalStart > 0) {
      window.copy(window, 0, literalStart, end);
      windowStart += literalStart;
      end -= literalStart;
      pos -= literalStart;
      literalStart = 0;
    }
    while (end < window.length && readPosition < sourceSizeBytes) {
      const wanted = Math.min(window.length - end, sourceSizeBytes - readPosition);
      const { bytesRead } = await handle.read(window, end, wanted, readPosition);
      if (bytesRead === 0) throw new Error(`source file shrank while generating a delta (at byte ${readPosition})`);
      end += bytesRead;
      readPosition += bytesRead;
    }
  };

  let a = 0;
  let b = 0;
  let rollingValid = false;
  let predicted = -1; // the block expected next after a match (sequential runs are the common case)

  for (;;) {
    // Flush a literal run that reached its cap, so the window can always slide.
    if (pos - literalStart >= LITERAL_RUN_MAX_BYTES) {
      const copy = flushCopy();
      if (copy) yield copy;
      stats.literalBytes += pos - literalStart;
      yield { kind: 'data', bytes: window.subarray(literalStart, pos) };
      literalStart = pos;
    }
    if (pos + blockSize > end && readPosition < sourceSizeBytes) {
      await refill();
    }
    if (pos + blockSize > end) break; // fewer than a block left in the source

    let matched = -1;
    if (predicted >= 0 && predicted < fullBlocks) {
      const digest = api.h64Raw(window.subarray(pos, pos + blockSize));
      if (
        signature.strong[2 * predicted] === Number(digest >> 32n) &&
        signature.strong[2 * predicted + 1] === Number(digest & 0xffffffffn)
      ) {
        matched = predicted;
      }
    }
    if (matched < 0) {
      if (!rollingValid) {
        const packed = weakChecksum(window, pos, blockSize);
        a = packed & 0xffff;
        b = packed >>> 16;
        rollingValid = true;
      }
      const weak = ((b << 16) | a) >>> 0;
      let candidate = index.first(weak);
      if (candidate >= 0) {
        let digest: bigint | undefined;
        for (; candidate >= 0; candidate = index.following(candidate)) {
          if (index.weakOf(candidate) !== weak) continue;
          digest ??= api.h64Raw(window.subarray(pos, pos + blockSize));
          if (
            signature.strong[2 * candidate] === Number(digest >> 32n) &&
            signature.strong[2 * candidate + 1] === Number(digest & 0xffffffffn)
          ) {
            matched = candidate;
            break;
          }
        }
      }
    }

    if (matched >= 0) {
      if (pos > literalStart) {
        const copy = flushCopy();
        if (copy) yield copy;
        stats.literalBytes += pos - literalStart;
        yield { kind: 'data', bytes: window.subarray(literalStart, pos) };
      }
      if (pendingCopyCount > 0 && pendingCopyIndex + pendingCopyCount === matched) {
        pendingCopyCount++;
      } else {
        const copy = flushCopy();
        if (copy) yield copy;
        pendingCopyIndex = matched;
        pendingCopyCount = 1;
      }
      pos += blockSize;
      literalStart = pos;
      rollingValid = false;
      predicted = matched + 1;
      continue;
    }

    predicted = -1;
    // Roll one byte: drop window[pos], add window[pos + blockSize] (when there is one).
    if (pos + blockSize < end) {
      const out = window[pos]!;
      const incoming = window[pos + blockSize]!;
      a = (a - out + incoming) & 0xffff;
      b = (b - blockSize * out + a) & 0xffff;
    } else {
      rollingValid = false;
    }
    pos++;
  }

  // Fewer than a block remains: it may be the basis's short last block, or literal bytes.
  const remaining = end - pos;
  if (tailLength > 0 && remaining === tailLength) {
    const tailIndex = count - 1;
    const digest = api.h64Raw(window.subarray(pos, end));
    if (
      signature.strong[2 * tailIndex] === Number(digest >> 32n) &&
      signature.strong[2 * tailIndex + 1] === Number(digest & 0xffffffffn) &&
      signature.weak[tailIndex] === weakChecksum(window, pos, remaining)
    ) {
      if (pos > literalStart) {
        const copy = flushCopy();
        if (copy) yield copy;
        stats.literalBytes += pos - literalStart;
        yield { kind: 'data', bytes: window.subarray(literalStart, pos) };
      }
      if (pendingCopyCount > 0 && pendingCopyIndex + pendingCopyCount === tailIndex) {
        pendingCopyCount++;
      } else {
        const copy = flushCopy();
        if (copy) yield copy;
        pendingCopyIndex = tailIndex;
        pendingCopyCount = 1;
      }
      pos = end;
      literalStart = end;
    }
  }
  const copy = flushCopy();
  if (copy) yield copy;
  // Whatever is left is literal; cut it in runs of at most the cap.
  while (literalStart < end) {
    const runEnd = Math.min(end, literalStart + LITERAL_RUN_MAX_BYTES);
    stats.literalBytes += runEnd - literalStart;
    yield { kind: 'data', bytes: window.subarray(literalStart, runEnd) };
    literalStart = runEnd;
  }
  assert(windowStart + end === sourceSizeBytes, 'delta covered the whole source');
}

function copyLengthBytes(signature: Signature, op: CopyOp): number {
  const start = op.blockIndex * signature.blockSizeBytes;
  const stop = Math.min(signature.fileSizeBytes, (op.blockIndex + op.blockCount) * signature.blockSizeBytes);
  return stop - start;
}

export interface ApplyResult {
  sizeBytes: number;
  /** xxhash64 of the written content, 16 lowercase hex digits: the caller compares it with the source's. */
  hashHex: string;
}

/**
 * Applies delta ops to `basis`, writing the new content sequentially to `output` from offset 0. Copy ops
 * are checked against the signature's geometry (a peer could send anything): out of range is an error.
 */
export async function applyDelta(
  basis: FileHandle,
  geometry: Pick<Signature, 'blockSizeBytes' | 'fileSizeBytes'>,
  ops: AsyncIterable<DeltaOp> | Iterable<DeltaOp>,
  output: FileHandle,
): Promise<ApplyResult> {
  const api = await loadXxhash();
  const hasher = api.create64();
  const count = blockCount(geometry);
  const buffer = Buffer.allocUnsafe(Math.max(IO_CHUNK_BYTES, geometry.blockSizeBytes));
  let written = 0;
  for await (const op of ops) {
    if (op.kind === 'data') {
      hasher.update(op.bytes);
      await writeFully(output, op.bytes, written);
      written += op.bytes.length;
      continue;
    }
    if (
      !Number.isSafeInteger(op.blockIndex) || !Number.isSafeInteger(op.blockCount) || op.blockCount < 1 ||
      op.blockIndex < 0 || op.blockIndex + op.blockCount > count
    ) {
      throw new Error(`bad delta: copy of blocks ${op.blockIndex}+${op.blockCount} from a basis of ${count} blocks`);
    }
    let position = op.blockIndex * geometry.blockSizeBytes;
    const stop = Math.min(geometry.fileSizeBytes, (op.blockIndex + op.blockCount) * geometry.blockSizeBytes);
    while (position < stop) {
      const wanted = Math.min(buffer.length, stop - position);
      const got = await readFully(basis, buffer, wanted, position);
      if (got !== wanted) throw new Error(`basis file shrank while applying a delta (at byte ${position + got})`);
      const chunk = buffer.subarray(0, got);
      hasher.update(chunk);
      await writeFully(output, chunk, written);
      written += got;
      position += got;
    }
  }
  return { sizeBytes: written, hashHex: hex64(hasher.digest()) };
}

export function hex64(value: bigint): string {
  return value.toString(16).padStart(16, '0');
}

async function readFully(handle: FileHandle, buffer: Buffer, length: number, position: number): Promise<number> {
  let got = 0;
  while (got < length) {
    const { bytesRead } = await handle.read(buffer, got, length - got, position + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return got;
}

async function writeFully(handle: FileHandle, data: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await handle.write(data, done, data.length - done, position + done);
    done += bytesWritten;
  }
}

function assert(condition: unknown, what: string): asserts condition {
  if (!condition) throw new Error(`assertion failed: ${what}`);
}
