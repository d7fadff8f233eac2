// Receive buffers for frame bodies that span socket chunks (every 1 MiB write does): reused instead of
// allocated per frame, because a fresh 1 MiB ArrayBuffer per write is external memory that drives V8 into
// frequent garbage collections on the Secondary. Size classes are powers of two from 64 KiB; the free lists are
// bounded, past that buffers are simply dropped to the GC. Bodies below 64 KiB are allocated normally.
import assert from 'node:assert/strict';

const CLASS_MIN_BYTES = 64 * 1024;
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
    assert.ok(!list.includes(slab), 'body released twice');
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
