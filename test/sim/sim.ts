// A deterministic simulator for the replication write path: two ReplicatedDevices (the real code, src/replication/
// device.ts) over simulated disks and a simulated link, every delay drawn from one seeded PRNG and every event run
// from one virtual-time queue. Nothing real is awaited (no sockets, files or timers), so a seed replays the exact
// interleaving, and thousands of schedules run in seconds. The real-process campaign
// (test/replication-campaign.test.ts) covers what this cannot: the daemons, the kernel, TCP, SIGKILL.
//
// Modelled: per channel FIFO delivery with random latency (the data and meta channels are independent, so a
// frame on one overtakes an earlier frame on the other, as on two TCP connections); the receiver pausing its
// data channel (flow control); the send queue (bytes not yet delivered); a link break that drops every frame in
// flight; disks whose writes land at a random moment between issue and completion, with random latency.
import { mulberry32 } from '../helpers/prng.js';
import type { BlockDevice, BlockDeviceCapabilities, Extent, ZeroOptions } from '../../src/blockdev/types.js';
import { CHANNEL_DATA, type Channel, type PeerChannel } from '../../src/replication/link.js';
import { receivePool } from '../../src/replication/pool.js';

interface SimEvent {
  time: number;
  seq: number;
  run: () => void;
}

/** Virtual time and the one source of randomness. */
export class Scheduler {
  now = 0;
  private seq = 0;
  private readonly heap: SimEvent[] = [];
  readonly random: () => number;

  constructor(seed: number) {
    this.random = mulberry32(seed);
  }

  /** An integer in [low, high]. */
  between(low: number, high: number): number {
    return low + Math.floor(this.random() * (high - low + 1));
  }

  at(time: number, run: () => void): void {
    const event = { time: Math.max(time, this.now), seq: this.seq++, run };
    const heap = this.heap;
    heap.push(event);
    let index = heap.length - 1;
    while (index > 0) {
      const parent = (index - 1) >> 1;
      if (!before(heap[index]!, heap[parent]!)) break;
      [heap[index], heap[parent]] = [heap[parent]!, heap[index]!];
      index = parent;
    }
  }

  after(delay: number, run: () => void): void {
    this.at(this.now + delay, run);
  }

  get pending(): number {
    return this.heap.length;
  }

  /** Runs events in time order, letting every promise chain settle between two events. */
  async runUntilIdle(limit = 5_000_000): Promise<void> {
    for (let steps = 0; this.heap.length > 0; steps++) {
      if (steps >= limit) throw new Error(`simulation did not go idle after ${limit} events`);
      const event = this.pop();
      this.now = event.time;
      event.run();
      await settle();
    }
    await settle();
  }

  private pop(): SimEvent {
    const heap = this.heap;
    const top = heap[0]!;
    const last = heap.pop()!;
    if (heap.length > 0) {
      heap[0] = last;
      let index = 0;
      for (;;) {
        const left = 2 * index + 1;
        const right = left + 1;
        let smallest = index;
        if (left < heap.length && before(heap[left]!, heap[smallest]!)) smallest = left;
        if (right < heap.length && before(heap[right]!, heap[smallest]!)) smallest = right;
        if (smallest === index) break;
        [heap[index], heap[smallest]] = [heap[smallest]!, heap[index]!];
        index = smallest;
      }
    }
    return top;
  }
}

function before(a: SimEvent, b: SimEvent): boolean {
  return a.time < b.time || (a.time === b.time && a.seq < b.seq);
}

/** Every microtask queued so far, and the ones those queue, run before a macrotask. */
function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** An in-memory disk: each write lands at a random moment between its issue and its completion. */
export class SimDisk implements BlockDevice {
  readonly data: Buffer;
  writes = 0;

  constructor(private readonly sim: Scheduler, readonly sizeBytes: number, private readonly latency: [number, number]) {
    this.data = Buffer.alloc(sizeBytes);
  }

  capabilities(): BlockDeviceCapabilities {
    return {
      readOnly: false, canFlush: true, canFua: true, canTrim: true, canZero: true, canFastZero: false, canCache: false,
      canMultiConn: true, canBlockStatus: false, rotational: false,
      blockSizeMinimumBytes: 512, blockSizePreferredBytes: 4096, blockSizeMaximumBytes: 32 * 1024 * 1024,
    };
  }

  private io(apply: (() => void) | null): Promise<void> {
    const total = this.sim.between(this.latency[0], this.latency[1]);
    const landsAt = this.sim.between(0, total);
    return new Promise((resolve) => {
      if (apply !== null) this.sim.after(landsAt, apply);
      this.sim.after(total, resolve);
    });
  }

  read(offset: number, target: Buffer): Promise<void> {
    return this.io(null).then(() => {
      this.data.copy(target, 0, offset, offset + target.length);
    });
  }

  write(offset: number, data: Buffer, _fua: boolean): Promise<void> {
    this.writes += 1;
    // The caller may reuse its buffer only after completion, so the bytes are taken when they land.
    return this.io(() => data.copy(this.data, offset));
  }

  flush(): Promise<void> {
    return this.io(null);
  }

  trim(offset: number, lengthBytes: number, _fua: boolean): Promise<void> {
    return this.io(() => this.data.fill(0, offset, offset + lengthBytes));
  }

  zero(offset: number, lengthBytes: number, _options: ZeroOptions): Promise<void> {
    return this.io(() => this.data.fill(0, offset, offset + lengthBytes));
  }

  cache(): Promise<void> {
    return Promise.resolve();
  }

  blockStatus(_offset: number, lengthBytes: number): Promise<Extent[]> {
    return Promise.resolve([{ lengthBytes, flags: 0 }]);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

type FrameSink = (channel: number, type: number, flags: number, id: number, offset: number, body: Buffer) => void;

interface InFlight {
  from: SimEnd;
  length: number;
  channel: Channel;
  type: number;
  flags: number;
  id: number;
  offset: number;
  body: Buffer;
}

/** One end of a simulated two-channel link. `connect` pairs two ends. */
export class SimEnd implements PeerChannel {
  closedReason: string | null = null;
  peer: SimEnd | null = null;
  sink: FrameSink = () => {};
  /** Data-channel bytes sent and not yet delivered (the send queue). */
  private queued = 0;
  private drainWaiters: Array<() => void> = [];
  /** Last delivery time per channel toward the peer: delivery stays FIFO within a channel. */
  private readonly lastDelivery = [0, 0];
  /** This end's receiving side: paused data frames wait here. */
  private dataPaused = false;
  private held: InFlight[] = [];
  sentFrames = 0;

  constructor(private readonly sim: Scheduler, private readonly latency: [number, number]) {}

  get dataQueuedBytes(): number {
    return this.queued;
  }

  send(channel: Channel, type: number, flags: number, id: number, offset: number, body?: Uint8Array): boolean {
    if (this.closedReason !== null || this.peer === null) return false;
    this.transmit(channel, type, flags, id, offset, body, null);
    return true;
  }

  sendWithCallback(channel: Channel, type: number, flags: number, id: number, offset: number, body: Uint8Array,
    onWritten: () => void): void {
    if (this.closedReason !== null || this.peer === null) return;
    this.transmit(channel, type, flags, id, offset, body, onWritten);
  }

  private transmit(channel: Channel, type: number, flags: number, id: number, offset: number,
    body: Uint8Array | undefined, onWritten: (() => void) | null): void {
    this.sentFrames += 1;
    // The transport copies the bytes when it takes them (here: at once), like a socket write.
    const length = body?.byteLength ?? 0;
    const copy = receivePool.take(length);
    if (body !== undefined) copy.set(body);
    const frame: InFlight = { from: this, length: channel === CHANNEL_DATA ? length : 0, channel, type, flags, id, offset, body: copy };
    if (channel === CHANNEL_DATA) this.queued += length;
    const peer = this.peer!;
    const deliverAt = Math.max(this.sim.now + this.sim.between(this.latency[0], this.latency[1]), this.lastDelivery[channel]!);
    this.lastDelivery[channel] = deliverAt;
    if (onWritten !== null) this.sim.after(this.sim.between(0, 2), onWritten);
    this.sim.at(deliverAt, () => {
      if (this.closedReason !== null || peer.closedReason !== null) {
        receivePool.release(copy);
        return; // the link broke with this frame on the wire (break() emptied the queue count)
      }
      peer.receive(frame);
    });
  }

  /** Data bytes leave the send queue when the receiver takes them: a paused receiver backs the sender up. */
  dequeued(length: number): void {
    if (length === 0 || this.closedReason !== null) return;
    this.queued -= length;
    if (this.queued === 0 && this.drainWaiters.length > 0) {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const waiter of waiters) waiter();
    }
  }

  private receive(frame: InFlight): void {
    if (frame.channel === CHANNEL_DATA && (this.dataPaused || this.held.length > 0)) {
      this.held.push(frame);
      return;
    }
    this.handOn(frame);
  }

  private handOn(frame: InFlight): void {
    frame.from.dequeued(frame.length);
    this.sink(frame.channel, frame.type, frame.flags, frame.id, frame.offset, frame.body);
  }

  pauseData(): void {
    this.dataPaused = true;
  }

  resumeData(): void {
    this.dataPaused = false;
    // Held frames are handed on in order, one event each, until the receiver pauses again.
    const next = (): void => {
      if (this.dataPaused || this.closedReason !== null) return;
      const frame = this.held.shift();
      if (frame === undefined) return;
      this.handOn(frame);
      if (this.held.length > 0) this.sim.after(0, next);
    };
    this.sim.after(0, next);
  }

  waitDataDrain(): Promise<void> {
    if (this.closedReason !== null || this.queued === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  /** The link breaks: both ends closed, frames in flight and held are lost. */
  break(reason: string): void {
    for (const end of [this, this.peer!]) {
      end.closedReason = reason;
      end.queued = 0;
      for (const frame of end.held) receivePool.release(frame.body);
      end.held = [];
      const waiters = end.drainWaiters;
      end.drainWaiters = [];
      for (const waiter of waiters) waiter();
    }
  }
}

export function connect(sim: Scheduler, latency: [number, number]): [SimEnd, SimEnd] {
  const a = new SimEnd(sim, latency);
  const b = new SimEnd(sim, latency);
  a.peer = b;
  b.peer = a;
  return [a, b];
}
