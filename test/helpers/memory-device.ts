// A test-only BlockDevice held in memory, with 4 KiB allocation tracking so block status, TRIM and
// WRITE_ZEROES behave as on a sparse file. It counts calls, can delay completions (to keep many requests in
// flight) and can be told to fail, so server tests see the device side of every request.
import {
  BlockDeviceError,
  EXTENT_HOLE,
  EXTENT_ZERO,
  type BlockDevice,
  type BlockDeviceCapabilities,
  type Extent,
  type ZeroOptions,
} from '../../src/blockdev/types.js';

const pageBytes = 4096;

export class MemoryDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly data: Buffer;
  private readonly allocated: Uint8Array;
  readonly calls = { read: 0, write: 0, flush: 0, trim: 0, zero: 0, cache: 0, blockStatus: 0 };
  /** Milliseconds each operation waits before completing (0: next tick). */
  delayMs = 0;
  /** When set, every write fails with this code. */
  failWrites: BlockDeviceError['code'] | null = null;
  inFlight = 0;
  inFlightMax = 0;
  private readonly caps: BlockDeviceCapabilities;

  constructor(sizeBytes: number, capabilities: Partial<BlockDeviceCapabilities> = {}) {
    this.sizeBytes = sizeBytes;
    this.data = Buffer.alloc(sizeBytes);
    this.allocated = new Uint8Array(Math.ceil(sizeBytes / pageBytes));
    this.caps = {
      readOnly: false, canFlush: true, canFua: true, canTrim: true, canZero: true, canFastZero: true,
      canCache: true, canMultiConn: true, canBlockStatus: true, rotational: false,
      blockSizeMinimumBytes: 1, blockSizePreferredBytes: 4096, blockSizeMaximumBytes: 32 * 1024 * 1024,
      ...capabilities,
    };
  }

  capabilities(): BlockDeviceCapabilities {
    return this.caps;
  }

  private check(offset: number, lengthBytes: number): void {
    if (!(offset >= 0 && lengthBytes >= 0 && offset + lengthBytes <= this.sizeBytes)) {
      throw new BlockDeviceError('EINVAL', `range ${offset}+${lengthBytes} outside ${this.sizeBytes}`);
    }
  }

  private async settle(): Promise<void> {
    this.inFlight += 1;
    this.inFlightMax = Math.max(this.inFlightMax, this.inFlight);
    await new Promise((resolve) => (this.delayMs > 0 ? setTimeout(resolve, this.delayMs) : setImmediate(resolve)));
    this.inFlight -= 1;
  }

  private markAllocated(offset: number, lengthBytes: number, value: number): void {
    // Only whole pages become holes; partially covered pages stay allocated.
    const first = value === 1 ? Math.floor(offset / pageBytes) : Math.ceil(offset / pageBytes);
    const end = value === 1 ? Math.ceil((offset + lengthBytes) / pageBytes) : Math.floor((offset + lengthBytes) / pageBytes);
    for (let page = first; page < end; page += 1) this.allocated[page] = value;
  }

  async read(offset: number, target: Buffer): Promise<void> {
    this.calls.read += 1;
    this.check(offset, target.length);
    await this.settle();
    this.data.copy(target, 0, offset, offset + target.length);
  }

  async write(offset: number, data: Buffer, _fua: boolean): Promise<void> {
    this.calls.write += 1;
    this.check(offset, data.length);
    // Copy before waiting, as a real device's pwrite does: the server may reuse the buffer after we settle.
    const copy = Buffer.from(data);
    await this.settle();
    if (this.failWrites !== null) throw new BlockDeviceError(this.failWrites, 'injected write failure');
    copy.copy(this.data, offset);
    this.markAllocated(offset, data.length, 1);
  }

  async flush(): Promise<void> {
    this.calls.flush += 1;
    await this.settle();
  }

  async trim(offset: number, lengthBytes: number, _fua: boolean): Promise<void> {
    this.calls.trim += 1;
    this.check(offset, lengthBytes);
    await this.settle();
    this.data.fill(0, offset, offset + lengthBytes);
    this.markAllocated(offset, lengthBytes, 0);
  }

  async zero(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    this.calls.zero += 1;
    this.check(offset, lengthBytes);
    await this.settle();
    this.data.fill(0, offset, offset + lengthBytes);
    if (!options.noHole) this.markAllocated(offset, lengthBytes, 0);
  }

  async cache(offset: number, lengthBytes: number): Promise<void> {
    this.calls.cache += 1;
    this.check(offset, lengthBytes);
    await this.settle();
  }

  async blockStatus(offset: number, lengthBytes: number): Promise<Extent[]> {
    this.calls.blockStatus += 1;
    this.check(offset, lengthBytes);
    await this.settle();
    const extents: Extent[] = [];
    let position = offset;
    const end = offset + lengthBytes;
    while (position < end) {
      const page = Math.floor(position / pageBytes);
      const state = this.allocated[page]!;
      let next = Math.min((page + 1) * pageBytes, this.sizeBytes);
      while (next < end && this.allocated[Math.floor(next / pageBytes)] === state) {
        next = Math.min(next + pageBytes, this.sizeBytes);
      }
      next = Math.min(next, end);
      extents.push({ lengthBytes: next - position, flags: state === 1 ? 0 : EXTENT_HOLE | EXTENT_ZERO });
      position = next;
    }
    return extents;
  }

  async close(): Promise<void> {}
}
