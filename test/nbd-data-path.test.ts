// What this file proves: the native data path (native/src/nbd_data_path.cc), which serves READ, WRITE and
// FLUSH of LocalDisk exports on threads of its own and hands everything else back to the JavaScript server,
// answers exactly as the protocol requires, however requests of both kinds interleave on one connection.
// How: one seeded stream of pipelined requests (reads, writes with and without FUA, flushes, trims, zeroes,
// block status, cache, and invalid requests of every kind, including payloads too large for the native path)
// runs against an in-process NbdServer over a real file four ways (native with structured replies, native with
// simple replies, native copying through buffers instead of splicing through pipes, and all-JavaScript), and
// every reply is checked against an in-memory model of the disk: its
// error code, and for a READ every byte. At the end the file itself must equal the model. Then the edges:
// a client that dies in the middle of a WRITE payload (nothing of it may land), DISC, SIGTERM to `drbdts serve`
// mid-stream (exit 0, every acknowledged write in the file), closing the server under
// an idle native connection, a client that stops reading its replies, and a full filesystem (ENOSPC, after
// which the connection still serves).
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as net from 'node:net';
import { LocalDisk } from '../src/blockdev/local.js';
import { NbdServer } from '../src/nbd/server.js';
import { socketPair } from '../src/native/index.js';
import { makeTempDir, NBD, RawNbdClient, spawnServe, startServer, type InProcessServer } from './helpers/nbd.js';
import { mulberry32 } from './helpers/prng.js';

const sizeBytes = 16 * 1024 * 1024;
const seed = Number(process.env.NBD_DATA_PATH_SEED ?? 0xda7a);

let dir: string;
beforeAll(async () => {
  dir = await makeTempDir('nbd-data-path');
});
afterAll(async () => {
  await fs.promises.rm(dir, { recursive: true, force: true });
});

interface Planned {
  type: number;
  flags: number;
  offset: number;
  lengthBytes: number;
  payload?: Buffer;
  /** The error the server must answer with. */
  expectedError: number;
}

interface ServedDisk {
  served: InProcessServer;
  disk: LocalDisk;
  file: string;
  close(): Promise<void>;
}

async function serveFile(name: string, dataPath: 'native' | 'javascript', dataPathSplice = true): Promise<ServedDisk> {
  const file = path.join(dir, `${name}.img`);
  const disk = await LocalDisk.open(file, { createSizeBytes: sizeBytes });
  const served = await startServer(dir, disk, { dataPath, dataPathSplice }, `${name}.sock`);
  return {
    served, disk, file,
    async close() {
      await served.server.close();
      await disk.close();
    },
  };
}

/** Reads one reply of either kind; a simple READ reply's data length comes from the request it answers. */
async function readAnyReply(
  client: RawNbdClient, pending: Map<bigint, Planned>,
): Promise<{ cookie: bigint; error: number; data: Buffer; chunkType: number }> {
  const reply = await client.readReply((cookie) => {
    const request = pending.get(cookie);
    if (request === undefined) throw new Error(`reply for unknown cookie ${cookie}`);
    return request.type === NBD.CMD_READ ? request.lengthBytes : 0;
  });
  if (!reply.structured) return { cookie: reply.cookie, error: reply.error, data: reply.data, chunkType: -1 };
  expect(reply.chunkFlags & 1, 'every chunk here is the last of its reply').toBe(1);
  if (reply.chunkType === 1) {
    // OFFSET_DATA: the offset, then the data.
    expect(Number(reply.data.readBigUInt64BE(0))).toBe(pending.get(reply.cookie)!.offset);
    return { cookie: reply.cookie, error: 0, data: reply.data.subarray(8), chunkType: 1 };
  }
  return { cookie: reply.cookie, error: reply.error, data: (reply.chunkType & 0x8000) !== 0 ? Buffer.alloc(0) : reply.data, chunkType: reply.chunkType };
}

/**
 * The seeded request stream, in batches. Within a batch no request that changes data overlaps another
 * request, so the model's answer does not depend on the order the server runs them in.
 */
function planBatches(structured: boolean, batches: number): Planned[][] {
  const random = mulberry32(seed);
  const model = Buffer.alloc(sizeBytes);
  const plans: Planned[][] = [];
  const pick = (maxBytes: number): [number, number] => {
    const lengthBytes = 1 + Math.floor(random() * maxBytes);
    const aligned = random() < 0.6;
    let offset = Math.floor(random() * (sizeBytes - lengthBytes));
    if (aligned) offset -= offset % 4096;
    return [offset, lengthBytes];
  };
  for (let batch = 0; batch < batches; batch += 1) {
    const count = 1 + Math.floor(random() * 24);
    const planned: Planned[] = [];
    const touched: Array<[number, number, boolean]> = [];
    const free = (offset: number, lengthBytes: number, modifies: boolean): boolean =>
      touched.every(([start, end, changes]) => (!changes && !modifies) || offset + lengthBytes <= start || offset >= end);
    const claim = (offset: number, lengthBytes: number, modifies: boolean): void => {
      touched.push([offset, offset + lengthBytes, modifies]);
    };
    const applies: Array<() => void> = [];
    while (planned.length < count) {
      const kind = random();
      const large = random() < 0.1;
      const [offset, lengthBytes] = pick(large ? 1024 * 1024 : 96 * 1024);
      if (kind < 0.34) {
        if (!free(offset, lengthBytes, false)) continue;
        claim(offset, lengthBytes, false);
        planned.push({ type: NBD.CMD_READ, flags: structured && random() < 0.3 ? NBD.FLAG_DF : 0, offset, lengthBytes, expectedError: 0 });
      } else if (kind < 0.62) {
        if (!free(offset, lengthBytes, true)) continue;
        claim(offset, lengthBytes, true);
        const payload = crypto.randomBytes(lengthBytes);
        planned.push({ type: NBD.CMD_WRITE, flags: random() < 0.2 ? NBD.FLAG_FUA : 0, offset, lengthBytes, payload, expectedError: 0 });
        applies.push(() => payload.copy(model, offset));
      } else if (kind < 0.67) {
        planned.push({ type: NBD.CMD_FLUSH, flags: 0, offset: 0, lengthBytes: 0, expectedError: 0 });
      } else if (kind < 0.72) {
        if (!free(offset, lengthBytes, true)) continue;
        claim(offset, lengthBytes, true);
        planned.push({ type: NBD.CMD_TRIM, flags: 0, offset, lengthBytes, expectedError: 0 });
        applies.push(() => model.fill(0, offset, offset + lengthBytes));
      } else if (kind < 0.77) {
        if (!free(offset, lengthBytes, true)) continue;
        claim(offset, lengthBytes, true);
        planned.push({ type: NBD.CMD_WRITE_ZEROES, flags: random() < 0.5 ? NBD.FLAG_NO_HOLE : 0, offset, lengthBytes, expectedError: 0 });
        applies.push(() => model.fill(0, offset, offset + lengthBytes));
      } else if (kind < 0.8) {
        planned.push({ type: NBD.CMD_CACHE, flags: 0, offset, lengthBytes, expectedError: 0 });
      } else if (kind < 0.83 && structured) {
        planned.push({ type: NBD.CMD_BLOCK_STATUS, flags: random() < 0.5 ? NBD.FLAG_REQ_ONE : 0, offset, lengthBytes, expectedError: 0 });
      } else if (kind < 0.85) {
        // Larger than the native path takes: JavaScript receives and writes it.
        const bigBytes = 9 * 1024 * 1024;
        const bigOffset = Math.floor(random() * (sizeBytes - bigBytes));
        if (!free(bigOffset, bigBytes, true)) continue;
        claim(bigOffset, bigBytes, true);
        const payload = crypto.randomBytes(bigBytes);
        planned.push({ type: NBD.CMD_WRITE, flags: 0, offset: bigOffset, lengthBytes: bigBytes, payload, expectedError: 0 });
        applies.push(() => payload.copy(model, bigOffset));
      } else {
        // Invalid requests, each answered with the error the spec (and nbdkit) gives.
        const which = Math.floor(random() * 7);
        if (which === 0) planned.push({ type: NBD.CMD_READ, flags: 0, offset: sizeBytes - 100, lengthBytes: 4096, expectedError: NBD.EINVAL });
        else if (which === 1) {
          planned.push({ type: NBD.CMD_WRITE, flags: 0, offset: sizeBytes - 100, lengthBytes: 4096, payload: crypto.randomBytes(4096), expectedError: NBD.ENOSPC });
        } else if (which === 2) planned.push({ type: NBD.CMD_READ, flags: 0, offset, lengthBytes: 0, expectedError: NBD.EINVAL });
        else if (which === 3) planned.push({ type: NBD.CMD_READ, flags: 0x80, offset, lengthBytes, expectedError: NBD.EINVAL });
        else if (which === 4) {
          planned.push({ type: NBD.CMD_WRITE, flags: NBD.FLAG_DF, offset, lengthBytes: 512, payload: crypto.randomBytes(512), expectedError: NBD.EINVAL });
        } else if (which === 5) planned.push({ type: NBD.CMD_FLUSH, flags: 0, offset: 4096, lengthBytes: 0, expectedError: NBD.EINVAL });
        else planned.push({ type: 99, flags: 0, offset, lengthBytes: 16, expectedError: NBD.EINVAL });
      }
    }
    plans.push(planned);
    for (const apply of applies) apply();
  }
  return plans;
}

/** Runs the planned batches on one connection, checking every reply against the model as it goes. */
async function runStream(target: ServedDisk, structured: boolean, batches: number): Promise<{ requests: number; model: Buffer }> {
  const plans = planBatches(structured, batches);
  const model = Buffer.alloc(sizeBytes);
  const client = await RawNbdClient.connect(target.served.socketPath);
  await client.handshake({ structured, baseAllocation: structured });
  let cookie = 1n;
  let requests = 0;
  for (const planned of plans) {
    const pending = new Map<bigint, Planned>();
    const frames: Buffer[] = [];
    for (const request of planned) {
      pending.set(cookie, request);
      frames.push(RawNbdClient.requestBytes(request.type, request.flags, cookie, BigInt(request.offset), request.lengthBytes, request.payload));
      cookie += 1n;
    }
    client.write(Buffer.concat(frames));
    // Reads see the model before this batch's changes (nothing they overlap changes within the batch), so the
    // changes are applied once every reply is in.
    const succeeded: Planned[] = [];
    for (let index = 0; index < planned.length; index += 1) {
      const reply = await readAnyReply(client, pending);
      const request = pending.get(reply.cookie)!;
      pending.delete(reply.cookie);
      const what = `request ${reply.cookie} (type ${request.type}, flags ${request.flags}, ${request.lengthBytes} bytes at ${request.offset})`;
      expect(reply.error, what).toBe(request.expectedError);
      if (request.type === NBD.CMD_READ && request.expectedError === 0) {
        expect(reply.data.length, what).toBe(request.lengthBytes);
        expect(reply.data.equals(model.subarray(request.offset, request.offset + request.lengthBytes)), `${what}: data`).toBe(true);
      }
      if (request.type === NBD.CMD_BLOCK_STATUS) expect(reply.chunkType, what).toBe(5);
      if (request.expectedError === 0) succeeded.push(request);
    }
    for (const request of succeeded) {
      if (request.type === NBD.CMD_WRITE) request.payload!.copy(model, request.offset);
      if (request.type === NBD.CMD_TRIM || request.type === NBD.CMD_WRITE_ZEROES) model.fill(0, request.offset, request.offset + request.lengthBytes);
    }
    expect(pending.size).toBe(0);
    requests += planned.length;
  }
  client.request(NBD.CMD_DISC, 0, 0n, 0, 0);
  await client.closed;
  return { requests, model };
}

describe('native data path, one seeded stream against a model', () => {
  for (const [name, dataPath, structured, splice] of [
    ['native-structured', 'native', true, true],
    ['native-simple', 'native', false, true],
    ['native-copying', 'native', true, false],
    ['javascript-structured', 'javascript', true, true],
  ] as const) {
    it(`${name}: every reply and the final file match the model`, async () => {
      const target = await serveFile(name, dataPath, splice);
      try {
        const { requests, model } = await runStream(target, structured, 120);
        const native = target.served.server.dataPathRequests;
        if (dataPath === 'native') {
          // Most requests are READ/WRITE/FLUSH and every batch starts on an idle connection, so the native
          // path serves a good share; the rest (and whatever follows a handback in a batch) is JavaScript's.
          expect(native).toBeGreaterThan(requests * 0.15);
          expect(native).toBeLessThan(requests);
          // Spliced: every READ and WRITE the path served (all fit a pipe here); else none.
          const spliced = target.served.server.dataPathSplicedRequests;
          if (splice) expect(spliced).toBeGreaterThan(native * 0.5);
          else expect(spliced).toBe(0);
        } else {
          expect(native).toBe(0);
        }
        await target.close();
        const onDisk = await fs.promises.readFile(target.file);
        expect(onDisk.equals(model), 'file content equals the model').toBe(true);
      } finally {
        await target.close();
      }
    }, 120_000);
  }
});

describe('native data path, edges', () => {
  let target: ServedDisk;
  beforeAll(async () => {
    target = await serveFile('edges', 'native');
  });
  afterAll(async () => {
    await target.close();
  });

  async function connect(): Promise<RawNbdClient> {
    const client = await RawNbdClient.connect(target.served.socketPath);
    await client.handshake({});
    return client;
  }

  async function readBack(offset: number, lengthBytes: number): Promise<Buffer> {
    const client = await connect();
    client.request(NBD.CMD_READ, 0, 7n, offset, lengthBytes);
    const reply = await client.readReply(lengthBytes);
    expect(reply.error).toBe(0);
    client.close();
    return reply.data;
  }

  async function noConnectionsLeft(): Promise<void> {
    for (let wait = 0; wait < 100 && target.served.server.activeConnections > 0; wait += 1) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    expect(target.served.server.activeConnections).toBe(0);
  }

  it('drops a WRITE whose client dies halfway through its payload: none of it lands', async () => {
    const original = crypto.randomBytes(1024 * 1024);
    const writer = await connect();
    writer.request(NBD.CMD_WRITE, 0, 1n, 2 * 1024 * 1024, original.length, original);
    expect((await writer.readReply()).error).toBe(0);
    const servedBefore = target.served.server.dataPathRequests;
    expect(servedBefore).toBeGreaterThan(0);
    // Header plus 300 KiB of a 1 MiB payload, then the connection is gone.
    const torn = RawNbdClient.requestBytes(NBD.CMD_WRITE, 0, 2n, 2n * 1024n * 1024n, original.length, Buffer.alloc(original.length, 0xee));
    writer.write(torn.subarray(0, 28 + 300 * 1024));
    await new Promise((resolve) => setTimeout(resolve, 100));
    writer.close();
    await noConnectionsLeft();
    expect((await readBack(2 * 1024 * 1024, original.length)).equals(original)).toBe(true);
    await noConnectionsLeft();
  });

  it('takes a WRITE payload sent in 1 KiB pieces (more socket fragments than the pipe has slots)', async () => {
    const data = crypto.randomBytes(1024 * 1024);
    const client = await connect();
    const splicedBefore = target.served.server.dataPathSplicedRequests;
    client.write(RawNbdClient.requestBytes(NBD.CMD_WRITE, 0, 1n, 3n * 1024n * 1024n, data.length));
    for (let offset = 0; offset < data.length; offset += 1024) {
      // Wait for each piece to leave before the next, so it is its own send and so its own fragment on the
      // server's side: pieces queued behind a pending write would go out together in one writev.
      await new Promise<void>((resolve, reject) =>
        client.socket.write(data.subarray(offset, offset + 1024), (error) => (error ? reject(error) : resolve())));
    }
    expect((await client.readReply()).error).toBe(0);
    client.close();
    expect((await readBack(3 * 1024 * 1024, data.length)).equals(data)).toBe(true);
    // The write itself went through the buffer (the pipe filled up first), the read back through the pipe.
    expect(target.served.server.dataPathSplicedRequests - splicedBefore).toBe(1);
  });

  it('answers the requests before a DISC, then closes', async () => {
    const data = crypto.randomBytes(65536);
    const client = await connect();
    client.write(Buffer.concat([
      RawNbdClient.requestBytes(NBD.CMD_WRITE, NBD.FLAG_FUA, 1n, 0n, data.length, data),
      RawNbdClient.requestBytes(NBD.CMD_FLUSH, 0, 2n, 0n, 0),
      RawNbdClient.requestBytes(NBD.CMD_DISC, 0, 3n, 0n, 0),
    ]));
    const cookies = [(await client.readReply()).cookie, (await client.readReply()).cookie].sort();
    expect(cookies).toEqual([1n, 2n]);
    await client.closed;
    expect((await readBack(0, data.length)).equals(data)).toBe(true);
    await noConnectionsLeft();
  });

  it('cleans up after a client that stops reading its replies and then disappears', async () => {
    const client = await connect();
    client.socket.pause();
    for (let index = 0; index < 64; index += 1) client.request(NBD.CMD_READ, 0, BigInt(index), 0, 1024 * 1024);
    await new Promise((resolve) => setTimeout(resolve, 300));
    client.close();
    await noConnectionsLeft();
  });

  it('closes the server promptly under an idle connection held by the native path', async () => {
    const other = await serveFile('idle', 'native');
    const client = await RawNbdClient.connect(other.served.socketPath);
    await client.handshake({});
    client.request(NBD.CMD_WRITE, 0, 1n, 0, 4096, Buffer.alloc(4096, 1));
    expect((await client.readReply()).error).toBe(0);
    expect(other.served.server.dataPathRequests).toBe(1);
    const started = Date.now();
    await other.close();
    await client.closed;
    expect(Date.now() - started).toBeLessThan(5000);
  });
});

describe('native data path on a socket adopted past the handshake (the kernel client\'s socketpair)', () => {
  it('serves READ/WRITE/FLUSH natively with simple replies, and the rest in JavaScript', async () => {
    const file = path.join(dir, 'adopted.img');
    const disk = await LocalDisk.open(file, { createSizeBytes: sizeBytes });
    const server = new NbdServer({ device: disk });
    const [clientEnd, serverEnd] = socketPair();
    // As src/nbd/kernel.ts makes it: not reading yet, so the connection can take it over for direct reads.
    const serverSocket = new net.Socket({ fd: serverEnd, readable: true, writable: true, pauseOnCreate: true } as net.SocketConstructorOpts);
    const transport = server.adoptTransmissionSocket(serverSocket);
    expect(transport).not.toBe(serverSocket);
    const client = RawNbdClient.over(new net.Socket({ fd: clientEnd, readable: true, writable: true }));
    try {
      const data = crypto.randomBytes(1024 * 1024);
      client.write(Buffer.concat([
        RawNbdClient.requestBytes(NBD.CMD_WRITE, 0, 1n, 4096n, data.length, data),
        RawNbdClient.requestBytes(NBD.CMD_FLUSH, 0, 2n, 0n, 0),
      ]));
      const done = [await client.readReply(), await client.readReply()];
      expect(done.map((reply) => reply.error)).toEqual([0, 0]);
      client.request(NBD.CMD_READ, 0, 3n, 4096, data.length);
      const back = await client.readReply(data.length);
      expect(back.structured).toBe(false);
      expect(back.data.equals(data)).toBe(true);
      // A TRIM goes back to JavaScript, and the path takes over again afterwards.
      client.request(NBD.CMD_TRIM, 0, 4n, 4096, 65536);
      expect((await client.readReply()).error).toBe(0);
      client.request(NBD.CMD_READ, 0, 5n, 4096, 65536);
      expect((await client.readReply(65536)).data.equals(Buffer.alloc(65536))).toBe(true);
      expect(server.dataPathRequests).toBe(4);
    } finally {
      // What kernel.ts does on detach: end the socket the server returned. The connection must then close at
      // once (not at the server's 30 s grace), though the path, not libuv, read the client's EOF.
      const closing = Date.now();
      transport.end();
      await client.closed;
      await server.close();
      expect(Date.now() - closing).toBeLessThan(5000);
      await disk.close();
    }
  });
});

describe('drbdts serve stopped by SIGTERM in the middle of a stream of writes on the native path', () => {
  it('exits 0 at a request boundary, and every write it acknowledged is in the file', async () => {
    const disk = path.join(dir, 'term.img');
    const socket = path.join(dir, 'term.sock');
    const serve = await spawnServe([disk, '--size', '64M', '--listen', `unix:${socket}`]);
    const client = await RawNbdClient.connect(socket);
    await client.handshake({});
    const blockBytes = 256 * 1024;
    const blocks = 256;
    const contentOf = (index: number): Buffer => Buffer.alloc(blockBytes, (index * 7 + 1) & 0xff);
    const acknowledged: number[] = [];
    // Keep 8 writes in flight; SIGTERM after the first 40 acknowledgements.
    let next = 0;
    const send = (): void => {
      if (next < blocks) client.request(NBD.CMD_WRITE, 0, BigInt(next), next * blockBytes, blockBytes, contentOf(next));
      next += 1;
    };
    for (let index = 0; index < 8; index += 1) send();
    let terminated = false;
    for (;;) {
      let reply;
      try {
        reply = await client.readReply();
      } catch {
        break; // the server closed the connection
      }
      expect(reply.error).toBe(0);
      acknowledged.push(Number(reply.cookie));
      if (acknowledged.length === 40 && !terminated) {
        terminated = true;
        serve.child.kill('SIGTERM');
      }
      if (acknowledged.length === blocks) break;
      send();
    }
    const { code } = await serve.exited;
    expect(code, serve.stderr().slice(-2000)).toBe(0);
    expect(terminated).toBe(true);
    expect(acknowledged.length).toBeGreaterThanOrEqual(40);
    expect(acknowledged.length, 'the server stopped before the client had sent everything').toBeLessThan(blocks);
    const file = await fs.promises.readFile(disk);
    for (const index of acknowledged) {
      expect(file.subarray(index * blockBytes, (index + 1) * blockBytes).equals(contentOf(index)), `block ${index}`).toBe(true);
    }
    expect(serve.stderr()).toMatch(/"nativeRequests":[1-9]/);
    client.close();
  });
});

describe('native data path on a full filesystem', () => {
  let mountDir: string;
  let mounted = false;
  beforeAll(() => {
    mountDir = path.join(dir, 'small-fs');
    fs.mkdirSync(mountDir);
    // A 3 MiB tmpfs holding a 64 MiB sparse file: writes fail with ENOSPC once the 3 MiB are used.
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', mountDir]);
    mounted = true;
  });
  afterAll(() => {
    if (mounted) execFileSync('umount', [mountDir]);
  });

  for (const dataPath of ['native', 'javascript'] as const) {
    it(`${dataPath}: answers ENOSPC and keeps serving what was written`, async () => {
      const file = path.join(mountDir, `${dataPath}.img`);
      const disk = await LocalDisk.open(file, { createSizeBytes: 64 * 1024 * 1024 });
      const served = await startServer(mountDir, disk, { dataPath }, `${dataPath}.sock`);
      try {
        const client = await RawNbdClient.connect(served.socketPath);
        await client.handshake({});
        const chunk = crypto.randomBytes(512 * 1024);
        let firstFailure = -1;
        for (let index = 0; index < 16 && firstFailure < 0; index += 1) {
          client.request(NBD.CMD_WRITE, 0, BigInt(index), index * chunk.length, chunk.length, chunk);
          const reply = await client.readReply();
          if (reply.error !== 0) {
            expect(reply.error).toBe(NBD.ENOSPC);
            firstFailure = index;
          }
        }
        expect(firstFailure, 'a write failed once the filesystem was full').toBeGreaterThan(0);
        // The connection still serves: what was written before reads back intact.
        client.request(NBD.CMD_READ, 0, 100n, 0, chunk.length);
        const back = await client.readReply(chunk.length);
        expect(back.error).toBe(0);
        expect(back.data.equals(chunk)).toBe(true);
        if (dataPath === 'native') expect(served.server.dataPathRequests).toBeGreaterThan(firstFailure);
        client.close();
        await client.closed;
      } finally {
        await served.server.close();
        await disk.close();
        await fs.promises.rm(file, { force: true });
      }
    });
  }
});
