// Receive buffers for frame bodies: every body the peer link reads (straight into it, or copied out of the
// decoder's reused slab) is one of these, reused instead of allocated per frame, because a fresh ArrayBuffer per
// write is external memory that drives V8 into frequent garbage collections on the Secondary. Size classes are
// powers of two from 4 KiB; the free lists are bounded in bytes, past that buffers are simply dropped to the GC.
// Bodies below 4 KiB (acks carry none, control frames are small) are allocated normally.
import assert from 'node:assert/strict';

const CLASS_MIN_BYTES = 4 * 1024;
const CLASS_MAX_BYTES = 64 * 1024 * 1024;

export class BodyPool {
  private readonly free = new Map<number, ArrayBuffer[]>();
  private readonly owned = new WeakSet<ArrayBuffer>();
  private freeBytes = 0;
  hits = 0;
  misses = 0;

  constructor(private readonly freeBytesMax = 64 * 1024 * 1024) {}

  take(lengthBytes: number): Buffer {
    if (lengthBytes < CLASS_MIN_BYTES || lengthBytes > CLASS_MAX_BYTES) return Buffer.allocUnsafe(lengthBytes);
    const size = classOf(lengthBytes);
    const list = this.free.get(size);
    let slab = list?.pop();
    if (slab !== undefined) {
      this.freeBytes -= size;
      this.hits += 1;
    } else {
      slab = new ArrayBuffer(size);
      this.owned.add(slab);
      this.misses += 1;
    }
    return Buffer.from(slab, 0, lengthBytes);
  }

  /** Gives a body back once nothing refers to it any more; a buffer that is not the pool's is ignored. */
  release(body: Buffer): void {
    const slab = body.buffer as ArrayBuffer;
    if (!this.owned.has(slab)) return;
    const size = slab.byteLength;
    if (this.freeBytes + size > this.freeBytesMax) return;
    let list = this.free.get(size);
    if (list === undefined) {
      list = [];
      this.free.set(size, list);
    }
    // A cheap double-release check (a full scan of a long list of 4 KiB buffers would cost more than the write).
    assert.ok(list.length > 64 || !list.includes(slab), 'body released twice');
    list.push(slab);
    this.freeBytes += size;
  }
}

function classOf(lengthBytes: number): number {
  let size = CLASS_MIN_BYTES;
  while (size < lengthBytes) size *= 2;
  return size;
}

/** One pool per process: every connection's decoder takes from it, the device gives back. */
export const receivePool = new BodyPool();
