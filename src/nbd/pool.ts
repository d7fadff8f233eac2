// Payload buffers for WRITE data and READ replies, reused across requests so the hot path allocates nothing
// in the steady state. Buffers come in power-of-two size classes from 4 KiB; each class keeps a bounded
// free list, so the pool never holds more than classFreeMax buffers of any size.

const sizeClassMinBytes = 4096;

export class BufferPool {
  private readonly free: Buffer[][] = [];
  private readonly classFreeMax: number;
  private readonly pooledBytesMax: number;
  private pooledBytes = 0;

  constructor(options?: { classFreeMax?: number; pooledBytesMax?: number }) {
    this.classFreeMax = options?.classFreeMax ?? 64;
    this.pooledBytesMax = options?.pooledBytesMax ?? 256 * 1024 * 1024;
  }

  /** A buffer of at least `sizeBytes` (its length is the size class); the caller uses a subarray. */
  acquire(sizeBytes: number): Buffer {
    const index = sizeClassIndex(sizeBytes);
    const list = this.free[index];
    const buffer = list?.pop();
    if (buffer !== undefined) {
      this.pooledBytes -= buffer.length;
      return buffer;
    }
    // allocUnsafeSlow: never a slice of Node's shared 8 KiB pool, so it is ours alone to recycle.
    return Buffer.allocUnsafeSlow(sizeClassMinBytes << index);
  }

  /** Returns a buffer from acquire(); nothing may reference it afterwards. */
  release(buffer: Buffer): void {
    const index = sizeClassIndex(buffer.length);
    if ((sizeClassMinBytes << index) !== buffer.length) throw new Error('BufferPool.release: not a pool buffer');
    let list = this.free[index];
    if (list === undefined) {
      list = [];
      this.free[index] = list;
    }
    if (list.length >= this.classFreeMax || this.pooledBytes + buffer.length > this.pooledBytesMax) return;
    this.pooledBytes += buffer.length;
    list.push(buffer);
  }
}

function sizeClassIndex(sizeBytes: number): number {
  if (sizeBytes <= sizeClassMinBytes) return 0;
  return 32 - Math.clz32(Math.ceil(sizeBytes / sizeClassMinBytes) - 1);
}
