// The quick-sync bitmap: one bit per 4 KiB block of the data area, set for every block the peer may not have.
// Kept as 32-bit words with an incrementally maintained population count (setBits() is O(1), read by every
// status request) and a per-page dirty mark so that Metadata writes back only the 4 KiB pages that changed:
// a 1 TiB device has a 32 MiB bitmap, and rewriting all of it per AL transaction would be absurd.
import assert from 'node:assert/strict';
// Invariant checks are written `if (!cond) assert.fail(message)`: assert.ok(cond, `template`) would build the
// message string on every call, and setRange/isSet sit on the write and resync paths.

export const BITMAP_BLOCK_BYTES = 4096;
export const BITMAP_PAGE_BYTES = 4096;
const BITS_PER_WORD = 32;
const WORDS_PER_PAGE = BITMAP_PAGE_BYTES / 4;

function popcount32(value: number): number {
  let v = value - ((value >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

export class Bitmap {
  readonly dataSizeBytes: number;
  readonly blockCount: number;
  readonly byteLength: number;
  readonly #words: Uint32Array;
  readonly #bytes: Buffer;
  #setBits = 0;
  readonly #dirtyPages: Uint8Array;
  #dirtyPageCount = 0;

  constructor(dataSizeBytes: number) {
    if (!(Number.isSafeInteger(dataSizeBytes) && dataSizeBytes >= 0)) assert.fail(`bad data size ${dataSizeBytes}`);
    this.dataSizeBytes = dataSizeBytes;
    this.blockCount = Math.ceil(dataSizeBytes / BITMAP_BLOCK_BYTES);
    // Whole 8-byte words on disk so a 64-bit reader (or a future wire format) never sees a partial word.
    this.byteLength = Math.ceil(this.blockCount / 64) * 8;
    this.#bytes = Buffer.alloc(this.byteLength);
    this.#words = new Uint32Array(this.#bytes.buffer, this.#bytes.byteOffset, this.byteLength / 4);
    this.#dirtyPages = new Uint8Array(Math.max(1, Math.ceil(this.byteLength / BITMAP_PAGE_BYTES)));
  }

  get pageCount(): number {
    return Math.ceil(this.byteLength / BITMAP_PAGE_BYTES);
  }

  #markWordDirty(word: number): void {
    const page = Math.floor(word / WORDS_PER_PAGE);
    if (this.#dirtyPages[page] === 0) {
      this.#dirtyPages[page] = 1;
      this.#dirtyPageCount += 1;
    }
  }

  /** Sets or clears blocks [start, start+count); returns how many bits changed. */
  #apply(startBlock: number, countBlocks: number, set: boolean): number {
    if (!(startBlock >= 0 && countBlocks >= 0 && startBlock + countBlocks <= this.blockCount)) {
      assert.fail(`bitmap range ${startBlock}+${countBlocks} outside ${this.blockCount} blocks`);
    }
    let changed = 0;
    let block = startBlock;
    const end = startBlock + countBlocks;
    while (block < end) {
      const word = Math.floor(block / BITS_PER_WORD);
      const bit = block % BITS_PER_WORD;
      const span = Math.min(BITS_PER_WORD - bit, end - block);
      // Mask of `span` bits starting at `bit` (span may be 32: shift by 32 is a no-op in JS, so special-case it).
      const mask = span === 32 ? 0xffffffff : (((1 << span) - 1) << bit) >>> 0;
      const before = this.#words[word]!;
      const after = (set ? before | mask : before & ~mask) >>> 0;
      if (after !== before) {
        const delta = popcount32((after ^ before) >>> 0);
        changed += delta;
        this.#words[word] = after;
        this.#markWordDirty(word);
      }
      block += span;
    }
    this.#setBits += set ? changed : -changed;
    return changed;
  }

  setBlocks(startBlock: number, countBlocks: number): number {
    return this.#apply(startBlock, countBlocks, true);
  }

  clearBlocks(startBlock: number, countBlocks: number): number {
    return this.#apply(startBlock, countBlocks, false);
  }

  /** Marks every block the byte range touches (a partial block is out of sync as a whole). */
  setRange(offsetBytes: number, lengthBytes: number): number {
    if (lengthBytes === 0) return 0;
    if (!(offsetBytes >= 0 && offsetBytes + lengthBytes <= this.dataSizeBytes)) {
      assert.fail(`bitmap setRange ${offsetBytes}+${lengthBytes} outside ${this.dataSizeBytes}`);
    }
    const first = Math.floor(offsetBytes / BITMAP_BLOCK_BYTES);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / BITMAP_BLOCK_BYTES);
    return this.#apply(first, last - first + 1, true);
  }

  /**
   * Clears only blocks the range covers entirely: a block partly written in sync may still differ elsewhere.
   * The last block of the device counts as fully covered when the range reaches the end of the data.
   */
  clearRange(offsetBytes: number, lengthBytes: number): number {
    if (lengthBytes === 0) return 0;
    if (!(offsetBytes >= 0 && offsetBytes + lengthBytes <= this.dataSizeBytes)) {
      assert.fail(`bitmap clearRange ${offsetBytes}+${lengthBytes} outside ${this.dataSizeBytes}`);
    }
    const first = Math.ceil(offsetBytes / BITMAP_BLOCK_BYTES);
    const endByte = offsetBytes + lengthBytes;
    const end = endByte === this.dataSizeBytes ? this.blockCount : Math.floor(endByte / BITMAP_BLOCK_BYTES);
    if (end <= first) return 0;
    return this.#apply(first, end - first, false);
  }

  isSet(block: number): boolean {
    if (!(block >= 0 && block < this.blockCount)) assert.fail(`block ${block} outside ${this.blockCount}`);
    return ((this.#words[Math.floor(block / BITS_PER_WORD)]! >>> (block % BITS_PER_WORD)) & 1) === 1;
  }

  setBits(): number {
    return this.#setBits;
  }

  dirtyBytes(): number {
    if (this.#setBits === 0) return 0;
    let bytes = this.#setBits * BITMAP_BLOCK_BYTES;
    const tail = this.dataSizeBytes % BITMAP_BLOCK_BYTES;
    if (tail !== 0 && this.isSet(this.blockCount - 1)) bytes -= BITMAP_BLOCK_BYTES - tail;
    return bytes;
  }

  nextSet(fromBlock: number): number {
    if (fromBlock >= this.blockCount || this.#setBits === 0) return -1;
    let word = Math.floor(Math.max(0, fromBlock) / BITS_PER_WORD);
    let value = (this.#words[word]! & (0xffffffff << (Math.max(0, fromBlock) % BITS_PER_WORD))) >>> 0;
    while (value === 0) {
      word += 1;
      if (word >= this.#words.length) return -1;
      value = this.#words[word]!;
    }
    const block = word * BITS_PER_WORD + (31 - Math.clz32(value & -value));
    return block < this.blockCount ? block : -1;
  }

  nextClear(fromBlock: number): number {
    let block = fromBlock;
    while (block < this.blockCount) {
      const word = Math.floor(block / BITS_PER_WORD);
      const value = this.#words[word]!;
      const bit = block % BITS_PER_WORD;
      if (bit === 0 && value === 0xffffffff) {
        block += BITS_PER_WORD;
        continue;
      }
      if (((value >>> bit) & 1) === 0) return block;
      block += 1;
    }
    return this.blockCount;
  }

  /** Runs of set blocks from `fromBlock` on, in order; a resync walks these. */
  *runs(fromBlock = 0): IterableIterator<{ startBlock: number; countBlocks: number }> {
    let block = this.nextSet(fromBlock);
    while (block !== -1) {
      const end = this.nextClear(block);
      yield { startBlock: block, countBlocks: end - block };
      block = this.nextSet(end);
    }
  }

  mergeFrom(other: Bitmap): void {
    assert.equal(other.blockCount, this.blockCount, 'merging bitmaps of different sizes');
    const theirs = other.#words;
    for (let word = 0; word < this.#words.length; word += 1) {
      const before = this.#words[word]!;
      const after = (before | theirs[word]!) >>> 0;
      if (after !== before) {
        this.#setBits += popcount32((after ^ before) >>> 0);
        this.#words[word] = after;
        this.#markWordDirty(word);
      }
    }
  }

  setAll(): void {
    this.#apply(0, this.blockCount, true);
  }

  clearAll(): void {
    this.#apply(0, this.blockCount, false);
  }

  toBuffer(): Buffer {
    return Buffer.from(this.#bytes);
  }

  /** Replaces the contents with `buffer` (byteLength bytes, as toBuffer() gives); marks changed pages dirty. */
  loadFrom(buffer: Buffer): void {
    if (!(buffer.length >= this.byteLength)) {
      assert.fail(`bitmap buffer ${buffer.length} bytes, need ${this.byteLength}`);
    }
    const theirs = new Uint32Array(this.byteLength / 4);
    Buffer.from(theirs.buffer).set(buffer.subarray(0, this.byteLength));
    // Bits past blockCount must stay clear, or setBits() would count blocks that do not exist.
    const tailBits = this.blockCount % BITS_PER_WORD;
    if (theirs.length > 0) {
      const lastWord = Math.floor((this.blockCount - 1) / BITS_PER_WORD);
      if (tailBits !== 0) theirs[lastWord] = (theirs[lastWord]! & ((1 << tailBits) - 1)) >>> 0;
      for (let word = lastWord + 1; word < theirs.length; word += 1) theirs[word] = 0;
    }
    for (let word = 0; word < this.#words.length; word += 1) {
      const before = this.#words[word]!;
      const after = theirs[word]!;
      if (after !== before) {
        this.#setBits += popcount32(after) - popcount32(before);
        this.#words[word] = after;
        this.#markWordDirty(word);
      }
    }
  }

  static fromBuffer(dataSizeBytes: number, buffer: Buffer): Bitmap {
    const bitmap = new Bitmap(dataSizeBytes);
    bitmap.loadFrom(buffer);
    bitmap.takeDirtyPages();
    return bitmap;
  }

  dirtyPageCount(): number {
    return this.#dirtyPageCount;
  }

  takeDirtyPages(): number[] {
    const pages: number[] = [];
    if (this.#dirtyPageCount === 0) return pages;
    for (let page = 0; page < this.#dirtyPages.length; page += 1) {
      if (this.#dirtyPages[page] === 1) {
        pages.push(page);
        this.#dirtyPages[page] = 0;
      }
    }
    this.#dirtyPageCount = 0;
    return pages;
  }

  /** Marks pages dirty again (a write-back failed and must be retried). */
  markPagesDirty(pages: readonly number[]): void {
    for (const page of pages) this.#markWordDirty(page * WORDS_PER_PAGE);
  }

  pageBuffer(page: number): Buffer {
    if (!(page >= 0 && page < this.pageCount)) assert.fail(`bitmap page ${page} outside ${this.pageCount}`);
    const start = page * BITMAP_PAGE_BYTES;
    return this.#bytes.subarray(start, Math.min(start + BITMAP_PAGE_BYTES, this.byteLength));
  }
}
