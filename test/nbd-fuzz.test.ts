// What this file proves: a live NBD server survives at least 10,000 random and mutated frames -- option
// frames in the handshake and request frames (with and without payloads) in transmission -- without a crash,
// a hang or a leaked connection, and then serves a well-behaved client correctly. Twice: over a MemoryDevice
// (every request in JavaScript) and over a LocalDisk file, where READ, WRITE and FLUSH run on the native data
// path and everything else is handed back to JavaScript mid-stream. How: an in-process NbdServer on a unix
// socket (any uncaught exception fails the run), a seeded PRNG so a failure reproduces from its seed, many
// short connections each flooded with frames and then half-closed, and a final write/read-back of random data
// through a fresh connection.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalDisk } from '../src/blockdev/local.js';
import type { BlockDevice } from '../src/blockdev/types.js';
import { MemoryDevice } from './helpers/memory-device.js';
import { makeTempDir, NBD, RawNbdClient, startServer, type InProcessServer } from './helpers/nbd.js';

const sizeBytes = 4 * 1024 * 1024;
const seed = Number(process.env.NBD_FUZZ_SEED ?? process.env.FUZZ_SEED ?? 0x5eed);
// FUZZ_NBD_SCALE multiplies the number of connections (and so frames): 1 sends 11,020 frames per device kind,
// 100 sends 1,102,000 (scripts/fuzz.sh).
const scale = Math.max(1, Math.floor(Number(process.env.FUZZ_NBD_SCALE ?? 1)));

/** xorshift32: small, seedable, good enough to choose mutations. */
function prng(initial: number): () => number {
  let state = initial >>> 0 || 1;
  return () => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state / 4294967296;
  };
}

let dir: string;
let device: BlockDevice;
let served: InProcessServer;

/** Sends the frames, half-closes, and waits (bounded) for the server to close its side. */
async function flood(frames: Buffer[], handshake: boolean, random: () => number): Promise<void> {
  const client = await RawNbdClient.connect(served.socketPath);
  if (handshake) {
    const structured = random() < 0.5;
    await client.handshake({ structured, baseAllocation: structured && random() < 0.5, exportName: 'fuzz' });
  }
  client.write(Buffer.concat(frames));
  client.socket.end();
  const closedInTime = await Promise.race([
    client.closed.then(() => true),
    new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 10_000)),
  ]);
  client.close();
  expect(closedInTime, 'the server closed the connection after the client half-closed').toBe(true);
}

function optionFrame(random: () => number): Buffer {
  const option = Math.floor(random() * 14);
  const kind = random();
  let data: Buffer;
  if (kind < 0.3) data = RawNbdClient.goData(random() < 0.5 ? 'fuzz' : '', [0, 1, 2, 3].filter(() => random() < 0.5));
  else if (kind < 0.5) data = RawNbdClient.metaContextData('fuzz', random() < 0.5 ? ['base:allocation'] : ['base:', 'x:y']);
  else if (kind < 0.7) data = crypto.randomBytes(Math.floor(random() * 64));
  else data = Buffer.alloc(0);
  // Mutations: a flipped bit anywhere, a lying length, a truncated frame.
  const header = Buffer.alloc(16);
  header.writeBigUInt64BE(NBD.IHAVEOPT, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(random() < 0.1 ? Math.floor(random() * 200) : data.length, 12);
  let frame = Buffer.concat([header, data]);
  if (random() < 0.15) {
    const bit = Math.floor(random() * frame.length * 8);
    frame[bit >> 3]! ^= 1 << (bit & 7);
  }
  if (random() < 0.05) frame = frame.subarray(0, Math.floor(random() * frame.length));
  return frame;
}

function requestFrame(random: () => number): Buffer {
  const type = random() < 0.95 ? Math.floor(random() * 8) : Math.floor(random() * 65536);
  const flags = random() < 0.7 ? [0, NBD.FLAG_FUA, NBD.FLAG_DF, NBD.FLAG_REQ_ONE, NBD.FLAG_NO_HOLE, NBD.FLAG_FAST_ZERO][Math.floor(random() * 6)]! : Math.floor(random() * 65536);
  const offsets = [0, 512, 4095, sizeBytes - 1, sizeBytes, sizeBytes + 4096, 2 ** 53, Math.floor(random() * sizeBytes)];
  const offset = BigInt(offsets[Math.floor(random() * offsets.length)]!);
  const lengths = [0, 1, 512, 4096, 65536, Math.floor(random() * 70000), 0xffffffff];
  let lengthBytes = lengths[Math.floor(random() * lengths.length)]!;
  if (type === NBD.CMD_WRITE && lengthBytes > 70000) lengthBytes = 4096; // payloads we actually send
  const payload = type === NBD.CMD_WRITE ? crypto.randomBytes(lengthBytes) : undefined;
  const frame = RawNbdClient.requestBytes(type, flags, BigInt(Math.floor(random() * 2 ** 32)), offset, lengthBytes, payload);
  if (random() < 0.02) {
    // A flipped bit in the header (magic, type, length...) is the nastiest mutation: the stream desyncs.
    const bit = Math.floor(random() * 28 * 8);
    frame[bit >> 3]! ^= 1 << (bit & 7);
  }
  return frame;
}

describe.each(['memory', 'file'] as const)('fuzz, %s device', (kind) => {
  beforeAll(async () => {
    dir = await makeTempDir('nbd-fuzz');
    device = kind === 'memory'
      ? new MemoryDevice(sizeBytes)
      : await LocalDisk.open(path.join(dir, 'disk.img'), { createSizeBytes: sizeBytes });
    served = await startServer(dir, device, { exportName: 'fuzz', limits: { handshakeTimeoutMs: 5000 } });
  });
  afterAll(async () => {
    await served.server.close();
    await device.close();
    await fs.promises.rm(dir, { recursive: true, force: true });
  });

  it(`survives ${11_020 * scale} random and mutated frames and then serves a good client`, async () => {
    const random = prng(seed);
    let frames = 0;
    let peakRss = 0;
    for (let connection = 0; connection < 120 * scale; connection += 1) {
      if (connection % 100 === 0) peakRss = Math.max(peakRss, process.memoryUsage().rss);
      const batch = Array.from({ length: 25 }, () => optionFrame(random));
      frames += batch.length;
      await flood(batch, false, random);
    }
    for (let connection = 0; connection < 40 * scale; connection += 1) {
      if (connection % 100 === 0) peakRss = Math.max(peakRss, process.memoryUsage().rss);
      const batch = Array.from({ length: 200 }, () => requestFrame(random));
      frames += batch.length;
      await flood(batch, true, random);
    }
    for (let connection = 0; connection < 20 * scale; connection += 1) {
      const junk = crypto.randomBytes(Math.floor(random() * 4096));
      frames += 1;
      await flood([junk], random() < 0.5, random);
    }
    expect(frames).toBeGreaterThanOrEqual(10_000 * scale);
    peakRss = Math.max(peakRss, process.memoryUsage().rss);
    console.log(`nbd fuzz (${kind} device), seed ${seed}: ${frames} frames, peak RSS of the test process (server ` +
      `included) ${(peakRss / 1048576).toFixed(0)} MiB`);
    expect(peakRss, 'memory stays bounded').toBeLessThan(1024 * 1048576);
    const fuzzedNative = served.server.dataPathRequests;

    const good = await RawNbdClient.connect(served.socketPath);
    const { sizeBytes: size } = await good.handshake({ exportName: 'fuzz' });
    expect(size).toBe(sizeBytes);
    const data = crypto.randomBytes(1024 * 1024);
    for (let index = 0; index < 16; index += 1) {
      good.request(NBD.CMD_WRITE, 0, BigInt(index), index * 65536, 65536, data.subarray(index * 65536, (index + 1) * 65536));
    }
    for (let index = 0; index < 16; index += 1) expect((await good.readReply()).error).toBe(0);
    good.request(NBD.CMD_READ, 0, 100n, 0, data.length);
    const back = await good.readReply(data.length);
    expect(back.error).toBe(0);
    expect(back.data.equals(data)).toBe(true);
    good.close();
    await good.closed;
    // Every fuzzed connection is gone: nothing leaked.
    for (let wait = 0; wait < 50 && served.server.activeConnections > 0; wait += 1) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    expect(served.server.activeConnections).toBe(0);
    // On the file export the native data path served fuzzed requests (a connection's first requests, until the
    // first one it hands back) and every request of the good client; the memory device never offers it.
    if (kind === 'file') {
      expect(fuzzedNative).toBeGreaterThan(0);
      expect(served.server.dataPathRequests - fuzzedNative).toBe(17);
    } else {
      expect(served.server.dataPathRequests).toBe(0);
    }
  }, 120_000 * scale);
});
