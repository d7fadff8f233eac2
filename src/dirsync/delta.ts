// rsync-style delta transfer for large files: the side that holds the old version (the basis) sends a
// signature (per block: a rolling weak checksum and an xxhash64 strong hash), the side that holds the new
// version scans it with a rolling window and answers with a delta (copy block ranges of the basis, or literal
// bytes), and the basis side applies the delta into a new file. Only changed regions cross the wire.
//
// Memory is bounded whatever the file size: the signature holds 12 bytes per block and the block size grows
// with the file so that a signature never has more than SIGNATURE_BLOCKS_MAX entries; delta generation keeps
// one sliding window; apply copies through one reusable buffer.
import { open, type FileHandle } from 'node:fs/promises';
import { getHasher, type XXHashAPI } from './hash.js';
import { fingerprintHex } from './replica.js';

export const BLOCK_SIZE_MIN_BYTES = 2048;
export const BLOCK_SIZE_MAX_BYTES = 1 << 20;
/** Caps the signature at 12 MiB in memory (12 bytes per block) and the hash table at 8 MiB. */
export const SIGNATURE_BLOCKS_MAX = 1 << 20;
/** Literal runs are cut at this size so a delta message stays small and memory stays bounded. */
export const LITERAL_RUN_MAX_BYTES = 256 * 1024;
/** Reads of the source and basis go through buffers of about this size. */
const IO_CHUNK_BYTES = 1 << 20;

/** The xxhash-wasm instance shared with the rest of dirsync (hash.ts). */
export function loadXxhash(): Promise<XXHashAPI> {
  return getHasher();
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
  // b accumulates prefix sums, which equals sum((length - i) * x_i). Unrolled by four, and both sums are
  // reduced mod 2^16 every 1 KiB so they stay small integers (V8 keeps them untagged; measured 1.6x faster).
  let a = 0;
  let b = 0;
  const end = start + length;
  let i = start;
  while (i < end) {
    const stop = Math.min(end, i + 1024);
    for (; i + 4 <= stop; i += 4) {
      a += data[i]!;
      b += a;
      a += data[i + 1]!;
      b += a;
      a += data[i + 2]!;
      b += a;
      a += data[i + 3]!;
      b += a;
    }
    for (; i < stop; i++) {
      a += data[i]!;
      b += a;
    }
    a &= 0xffff;
    b &= 0xffff;
  }
  return ((b << 16) | a) >>> 0;
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

// --- delta operations (in memory, between the generator and the stream encoder)

/** Copy `blockCount` consecutive basis blocks starting at `blockIndex`. */
export interface CopyOp {
  kind: 'copy';
  blockIndex: number;
  blockCount: number;
}

/**
 * Literal bytes. `bytes` may be a view into the generator's window: it is valid only until the consumer
 * asks for the next operation (so a payload is copied once, straight into the encoded stream).
 */
export interface DataOp {
  kind: 'data';
  bytes: Buffer;
}

export type DeltaOp = CopyOp | DataOp;

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
  /** Set when the generator finishes: xxh64 of the whole source as read, and its length. */
  fingerprint?: string;
  sourceSizeBytes?: number;
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
  // The source is read exactly once, so its fingerprint is computed on the way (the engine compares it with
  // the scanned one, and the receiver checks the rebuilt file against it).
  const sourceHasher = api.create64();

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
      sourceHasher.update(window.subarray(end, end + bytesRead));
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
  assert(stats.copiedBytes + stats.literalBytes === sourceSizeBytes, 'delta bytes add up to the source size');
  stats.fingerprint = fingerprintHex(sourceHasher.digest());
  stats.sourceSizeBytes = sourceSizeBytes;
}

function copyLengthBytes(signature: Signature, op: CopyOp): number {
  const start = op.blockIndex * signature.blockSizeBytes;
  const stop = Math.min(signature.fileSizeBytes, (op.blockIndex + op.blockCount) * signature.blockSizeBytes);
  return stop - start;
}

// --- the encoded delta stream: a sequence of records, self-delimiting so chunk boundaries do not matter.
//   COPY: u8 1, u32 block index, u32 block count
//   DATA: u8 2, u32 length, bytes (a literal run may be split over several records)
//   END:  u8 3, u64 size of the new content, u64 xxh64 of the new content (the receiver checks both)
//   The stream starts with BASIS: u8 4, u32 block size, u64 basis size (the signature's geometry, so the
//   receiver interprets block indexes exactly as the sender did and notices a basis that changed size).
const RECORD_BASIS = 4;
const BASIS_RECORD_BYTES = 13;
const RECORD_COPY = 1;
const RECORD_DATA = 2;
const RECORD_END = 3;
const COPY_RECORD_BYTES = 9;
const DATA_HEADER_BYTES = 5;
const END_RECORD_BYTES = 17;
/** Encoded chunks are about this size: big enough to amortise framing, small enough to bound memory. */
const ENCODED_CHUNK_BYTES = 256 * 1024;
/** A peer's DATA record longer than this is refused (the encoder never writes more than a chunk). */
const DATA_RECORD_MAX_BYTES = 16 << 20;

/** Encoded signature of a file (block size chosen from its size). */
export async function createSignature(path: string): Promise<Buffer> {
  return encodeSignature(await computeSignature(path));
}

/**
 * The encoded delta that turns the basis (described by `signature`, encoded) into the file at `newPath`.
 * Chunks are fresh buffers the consumer owns. `stats` (optional) is filled in as the delta is generated; its
 * fingerprint is set once the last chunk has been yielded.
 */
export async function* createDelta(newPath: string, signature: Buffer, stats?: DeltaStats): AsyncGenerator<Buffer> {
  const decoded = decodeSignature(signature);
  const summary: DeltaStats = stats ?? { copiedBytes: 0, literalBytes: 0 };
  let out = Buffer.allocUnsafe(ENCODED_CHUNK_BYTES);
  out[0] = RECORD_BASIS;
  out.writeUInt32BE(decoded.blockSizeBytes, 1);
  out.writeBigUInt64BE(BigInt(decoded.fileSizeBytes), 5);
  let used = BASIS_RECORD_BYTES;
  for await (const op of generateDelta(newPath, decoded, summary)) {
    if (op.kind === 'copy') {
      if (used + COPY_RECORD_BYTES > out.length) {
        yield out.subarray(0, used);
        out = Buffer.allocUnsafe(ENCODED_CHUNK_BYTES);
        used = 0;
      }
      out[used] = RECORD_COPY;
      out.writeUInt32BE(op.blockIndex, used + 1);
      out.writeUInt32BE(op.blockCount, used + 5);
      used += COPY_RECORD_BYTES;
      continue;
    }
    let offset = 0;
    while (offset < op.bytes.length) {
      if (used + DATA_HEADER_BYTES + 1 > out.length) {
        yield out.subarray(0, used);
        out = Buffer.allocUnsafe(ENCODED_CHUNK_BYTES);
        used = 0;
      }
      const length = Math.min(op.bytes.length - offset, out.length - used - DATA_HEADER_BYTES);
      out[used] = RECORD_DATA;
      out.writeUInt32BE(length, used + 1);
      op.bytes.copy(out, used + DATA_HEADER_BYTES, offset, offset + length);
      used += DATA_HEADER_BYTES + length;
      offset += length;
    }
  }
  assert(summary.fingerprint !== undefined && summary.sourceSizeBytes !== undefined, 'generator finished');
  if (used + END_RECORD_BYTES > out.length) {
    yield out.subarray(0, used);
    out = Buffer.allocUnsafe(END_RECORD_BYTES);
    used = 0;
  }
  out[used] = RECORD_END;
  out.writeBigUInt64BE(BigInt(summary.sourceSizeBytes), used + 1);
  out.writeBigUInt64BE(BigInt('0x' + summary.fingerprint), used + 9);
  used += END_RECORD_BYTES;
  yield out.subarray(0, used);
}

/**
 * Rebuilds the new content from the basis file at `basisPath` and an encoded delta. Yields the content in
 * chunks the consumer owns (literal bytes are views of the delta's chunks; copied ranges are fresh buffers of
 * at most 1 MiB). Everything from the peer is checked: record types, lengths, block ranges, and at the end the
 * rebuilt content's size and xxh64 against the END record. A bad delta is an Error naming what was wrong.
 * The basis must not change while this runs (the replica checks its stat before and after).
 */
export async function* applyDelta(basisPath: string, delta: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  const api = await loadXxhash();
  const basis = await open(basisPath, 'r');
  try {
    const { size: basisSizeBytes } = await basis.stat();
    yield* applyDeltaRecords(api, basis, basisSizeBytes, delta);
  } finally {
    await basis.close();
  }
}

async function* applyDeltaRecords(
  api: XXHashAPI,
  basis: FileHandle,
  basisSizeBytes: number,
  delta: AsyncIterable<Buffer>,
): AsyncGenerator<Buffer> {
  const hasher = api.create64();
  const geometry = { blockSizeBytes: 0, fileSizeBytes: 0 };
  let count = -1; // until the BASIS record arrives
  let written = 0;
  let ended = false;
  // A record header split across chunks is gathered here.
  const header = Buffer.alloc(END_RECORD_BYTES);
  let headerUsed = 0;
  let headerWanted = 0;
  let dataRemaining = 0; // bytes of the current DATA record still to come

  const copyBlocks = async function* (blockIndex: number, blocks: number): AsyncGenerator<Buffer> {
    if (blocks < 1 || blockIndex + blocks > count) {
      throw new Error(`bad delta: copy of blocks ${blockIndex}+${blocks} from a basis of ${count} blocks`);
    }
    let position = blockIndex * geometry.blockSizeBytes;
    const stop = Math.min(geometry.fileSizeBytes, (blockIndex + blocks) * geometry.blockSizeBytes);
    while (position < stop) {
      const wanted = Math.min(IO_CHUNK_BYTES, stop - position);
      const chunk = Buffer.allocUnsafe(wanted);
      const got = await readFully(basis, chunk, wanted, position);
      if (got !== wanted) throw new Error(`basis file shrank while applying a delta (at byte ${position + got})`);
      hasher.update(chunk);
      written += got;
      position += got;
      yield chunk;
    }
  };

  for await (const chunk of delta) {
    let offset = 0;
    while (offset < chunk.length) {
      if (ended) throw new Error('bad delta: bytes after the end record');
      if (dataRemaining > 0) {
        const take = Math.min(dataRemaining, chunk.length - offset);
        const piece = chunk.subarray(offset, offset + take);
        hasher.update(piece);
        written += take;
        dataRemaining -= take;
        offset += take;
        yield piece;
        continue;
      }
      if (headerWanted === 0) {
        const type = chunk[offset]!;
        if ((count < 0) !== (type === RECORD_BASIS)) {
          throw new Error(`bad delta: record type ${type} ${count < 0 ? 'before' : 'after'} the basis record`);
        }
        headerWanted =
          type === RECORD_COPY ? COPY_RECORD_BYTES
          : type === RECORD_DATA ? DATA_HEADER_BYTES
          : type === RECORD_END ? END_RECORD_BYTES
          : type === RECORD_BASIS ? BASIS_RECORD_BYTES
          : 0;
        if (headerWanted === 0) throw new Error(`bad delta: unknown record type ${type}`);
        headerUsed = 0;
      }
      const take = Math.min(headerWanted - headerUsed, chunk.length - offset);
      chunk.copy(header, headerUsed, offset, offset + take);
      headerUsed += take;
      offset += take;
      if (headerUsed < headerWanted) continue;
      headerWanted = 0;
      if (header[0] === RECORD_BASIS) {
        geometry.blockSizeBytes = header.readUInt32BE(1);
        const sizeBig = header.readBigUInt64BE(5);
        if (sizeBig !== BigInt(basisSizeBytes)) {
          throw new Error(`basis changed: the delta was made for ${sizeBig} bytes, the basis now has ${basisSizeBytes}`);
        }
        if (geometry.blockSizeBytes < 1) throw new Error('bad delta: block size 0');
        geometry.fileSizeBytes = basisSizeBytes;
        count = blockCount(geometry);
      } else if (header[0] === RECORD_COPY) {
        yield* copyBlocks(header.readUInt32BE(1), header.readUInt32BE(5));
      } else if (header[0] === RECORD_DATA) {
        dataRemaining = header.readUInt32BE(1);
        if (dataRemaining === 0 || dataRemaining > DATA_RECORD_MAX_BYTES) {
          throw new Error(`bad delta: literal record of ${dataRemaining} bytes`);
        }
      } else {
        const expectedSize = header.readBigUInt64BE(1);
        const expectedHash = fingerprintHex(header.readBigUInt64BE(9));
        const actualHash = fingerprintHex(hasher.digest());
        if (expectedSize !== BigInt(written) || expectedHash !== actualHash) {
          throw new Error(
            `delta result does not match the source: ${written} bytes with xxh64 ${actualHash}, ` +
              `expected ${expectedSize} bytes with ${expectedHash}`,
          );
        }
        ended = true;
      }
    }
  }
  if (!ended || dataRemaining > 0 || headerWanted > 0) throw new Error('bad delta: truncated (no end record)');
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
