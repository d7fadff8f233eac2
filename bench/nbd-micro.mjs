// Micro benchmarks (tinybench) of the NBD server's own work per request: parsing request headers out of
// received chunks, gathering WRITE payloads, encoding replies, budget accounting. The device completes at
// once and the "socket" is an in-memory Duplex, so no I/O is measured. Needs the build (dist/).
// Usage: node bench/nbd-micro.mjs [--quick]
import { Duplex } from 'node:stream';
import { Bench } from 'tinybench';
import { NbdServer } from '../dist/nbd/server.js';

const quick = process.argv.includes('--quick');
const sizeBytes = 256 * 1024 * 1024;

const nullDevice = {
  sizeBytes,
  capabilities: () => ({
    readOnly: false, canFlush: true, canFua: true, canTrim: true, canZero: true, canFastZero: true, canCache: true,
    canMultiConn: true, canBlockStatus: false, rotational: false,
    blockSizeMinimumBytes: 1, blockSizePreferredBytes: 4096, blockSizeMaximumBytes: 32 * 1024 * 1024,
  }),
  read: async () => {},
  write: async () => {},
  flush: async () => {},
  trim: async () => {},
  zero: async () => {},
  cache: async () => {},
  blockStatus: async (offset, lengthBytes) => [{ lengthBytes, flags: 0 }],
  close: async () => {},
};

/** The client end: requests are pushed in as the socket would deliver them; replies are only counted. */
class MemorySocket extends Duplex {
  constructor() {
    super();
    this.replyBytes = 0;
    this.waitBytes = 0;
    this.onDone = null;
  }
  _read() {}
  _write(chunk, _encoding, callback) {
    this.count(chunk.length);
    callback();
  }
  _writev(chunks, callback) {
    let total = 0;
    for (const { chunk } of chunks) total += chunk.length;
    this.count(total);
    callback();
  }
  count(bytes) {
    this.replyBytes += bytes;
    if (this.onDone !== null && this.replyBytes >= this.waitBytes) {
      const done = this.onDone;
      this.onDone = null;
      done();
    }
  }
  /** Delivers `frames` in chunks of `chunkBytes` (as TCP would) and resolves when `replyBytes` came back. */
  exchange(frames, chunkBytes, replyBytes) {
    return new Promise((resolve) => {
      this.replyBytes = 0;
      this.waitBytes = replyBytes;
      this.onDone = resolve;
      for (let position = 0; position < frames.length; position += chunkBytes) {
        this.push(frames.subarray(position, Math.min(frames.length, position + chunkBytes)));
      }
    });
  }
}

function requests(type, count, lengthBytes, withPayload) {
  const frameBytes = 28 + (withPayload ? lengthBytes : 0);
  const frames = Buffer.alloc(frameBytes * count);
  for (let index = 0; index < count; index += 1) {
    const base = index * frameBytes;
    frames.writeUInt32BE(0x25609513, base);
    frames.writeUInt16BE(type, base + 6);
    frames.writeUInt32BE(index, base + 12);
    frames.writeUInt32BE((index * lengthBytes) % (sizeBytes - lengthBytes), base + 20);
    frames.writeUInt32BE(lengthBytes, base + 24);
  }
  return frames;
}

const server = new NbdServer({ device: nullDevice });
const socket = new MemorySocket();
server.adoptTransmissionSocket(socket);

const batch = 256;
const write4k = requests(1, batch, 4096, true);
const read4k = requests(0, batch, 4096, false);
const write1m = requests(1, 16, 1024 * 1024, true);
const read1m = requests(0, 16, 1024 * 1024, false);
const flushes = requests(3, batch, 0, false);

const bench = new Bench({ time: quick ? 200 : 2000, warmupTime: quick ? 50 : 500 });
bench
  .add(`${batch} x WRITE 4 KiB (64 KiB chunks: parse, zero-copy payload, reply)`, () => socket.exchange(write4k, 65536, batch * 16))
  .add(`${batch} x READ 4 KiB (parse, pooled buffer, header+data reply)`, () => socket.exchange(read4k, 65536, batch * (16 + 4096)))
  .add(`${batch} x FLUSH (parse and reply only)`, () => socket.exchange(flushes, 65536, batch * 16))
  .add('16 x WRITE 1 MiB (64 KiB chunks: payload gathered into pooled buffers)', () => socket.exchange(write1m, 65536, 16 * 16))
  .add('16 x READ 1 MiB (pooled 1 MiB buffers, corked replies)', () => socket.exchange(read1m, 65536, 16 * (16 + 1024 * 1024)));
await bench.run();
console.table(bench.tasks.map((task) => {
  const perOp = task.name.startsWith('16') ? 16 : batch;
  const meanMs = task.result.latency?.mean ?? task.result.mean;
  return { task: task.name, 'requests/s': Math.round((perOp * 1000) / meanMs).toLocaleString('en-US'), 'us/request': ((meanMs * 1000) / perOp).toFixed(2) };
}));
await server.close();
