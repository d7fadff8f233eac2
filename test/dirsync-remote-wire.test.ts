// The dirsync wire protocol (src/dirsync/wire.ts) against hand-made frames on real TCP sockets: a peer that
// passes authentication and then breaks the protocol — a corrupt lz4 frame, a stream that ignores flow control,
// an answer to a call that was never made — is cut off with EPROTO, and the other side survives (the server
// keeps serving; the client's pending calls fail with the reason instead of hanging). Also proves flow control
// from the good side: a receiver that does not read holds the sender at the window.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHmac, randomBytes } from 'node:crypto';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { WireConnection, STREAM_WINDOW_BYTES, type IncomingStream } from '../src/dirsync/wire.js';
import { ReplicaError } from '../src/dirsync/replica.js';

const secret = Buffer.from('wire test secret');
const MAGIC = Buffer.from('DRBDTS-DIRSYNC/1\n');

function frame(type: number, payload: Buffer, callId = 0, flags = 0): Buffer {
  const header = Buffer.alloc(12);
  header.writeUInt32BE(payload.length, 0);
  header.writeUInt32BE(callId, 4);
  header[8] = type;
  header[9] = flags;
  return Buffer.concat([header, payload]);
}

function jsonPayload(json: unknown): Buffer {
  const text = Buffer.from(JSON.stringify(json));
  const head = Buffer.alloc(4);
  head.writeUInt32BE(text.length, 0);
  return Buffer.concat([head, text]);
}

/** Reads frames from a raw socket (after the magic). */
class RawPeer {
  private buffer = Buffer.alloc(0);
  private waiters: Array<() => void> = [];
  closed: Promise<void>;

  constructor(readonly socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.buffer = Buffer.concat([this.buffer, chunk]);
      for (const wake of this.waiters.splice(0)) wake();
    });
    socket.on('error', () => undefined);
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
  }

  async bytes(count: number): Promise<Buffer> {
    while (this.buffer.length < count) await new Promise<void>((resolve) => this.waiters.push(resolve));
    const out = this.buffer.subarray(0, count);
    this.buffer = this.buffer.subarray(count);
    return out;
  }

  async frame(): Promise<{ type: number; callId: number; json: unknown }> {
    const header = await this.bytes(12);
    const payload = await this.bytes(header.readUInt32BE(0));
    const json = payload.length >= 4 ? (JSON.parse(payload.subarray(4, 4 + payload.readUInt32BE(0)).toString()) as unknown) : null;
    return { type: header[8]!, callId: header.readUInt32BE(4), json };
  }
}

let server: Server;
let serverPort: number;
const serverErrors: Error[] = [];
let served = 0;

beforeAll(async () => {
  // A real WireConnection server whose handler answers "echo" and consumes uploads slowly on request.
  server = createServer((socket) => {
    void WireConnection.server(
      { input: socket, output: socket, destroy: () => socket.destroy(), description: 'test client' },
      { secret },
      async (request) => {
        served++;
        if (request.method === 'echo') return { json: request.json };
        if (request.method === 'hold' && request.upload) {
          // Never reads the upload; returns once the connection is gone (the stream then fails).
          await request.upload.end.catch(() => undefined);
          return { json: {} };
        }
        if (request.method === 'upload' && request.upload) {
          let total = 0;
          for await (const chunk of request.upload) total += chunk.length;
          return { json: { total } };
        }
        throw new ReplicaError('EPROTO', `unknown ${request.method}`);
      },
    ).then(
      (connection) => connection.closed().then((reason) => serverErrors.push(reason)),
      (error: Error) => serverErrors.push(error),
    );
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  serverPort = (server.address() as { port: number }).port;
});

const rawSockets: Socket[] = [];
afterAll(async () => {
  for (const socket of rawSockets) socket.destroy();
  await new Promise((resolve) => server.close(resolve));
});

/** Connects raw, authenticates properly, returns the raw peer ready for frames. */
async function rawClient(): Promise<RawPeer> {
  const socket = connect({ host: '127.0.0.1', port: serverPort });
  rawSockets.push(socket);
  const peer = new RawPeer(socket);
  expect((await peer.bytes(MAGIC.length)).equals(MAGIC)).toBe(true);
  const hello = (await peer.frame()).json as { nonce: string };
  const clientNonce = randomBytes(32).toString('hex');
  const mac = createHmac('sha256', secret).update(`drbdts-dirsync client\n${hello.nonce}\n${clientNonce}`).digest('hex');
  socket.write(MAGIC);
  socket.write(frame(2, jsonPayload({ nonce: clientNonce, mac })));
  const verdict = await peer.frame();
  expect(verdict.type).toBe(3); // AUTH_OK
  return peer;
}

async function goodClient(): Promise<WireConnection> {
  const socket = connect({ host: '127.0.0.1', port: serverPort });
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  return WireConnection.client({ input: socket, output: socket, destroy: () => socket.destroy(), description: 'test server' }, { secret });
}

describe('protocol violations after authentication', () => {
  // Proves a frame flagged as lz4 whose payload does not decode is refused and the connection closed.
  it('closes on a corrupt lz4 frame', async () => {
    const peer = await rawClient();
    const bogus = Buffer.concat([Buffer.from([0, 0, 0x10, 0]), randomBytes(50)]); // claims 4096 bytes
    peer.socket.write(frame(5, bogus, 1, 1));
    await peer.closed;
    const client = await goodClient();
    expect((await client.call('echo', { still: 'alive' })).json).toEqual({ still: 'alive' });
    client.close();
  });

  // Proves a sender that ignores its credit (here: 8 MiB more than the window without any CREDIT) is cut off
  // rather than buffered without limit.
  it('closes on a stream that ignores flow control', async () => {
    const peer = await rawClient();
    peer.socket.write(frame(5, jsonPayload({ method: 'hold', args: {} }), 9, 2)); // REQUEST with an upload
    const chunk = randomBytes(1 << 20);
    for (let i = 0; i < (STREAM_WINDOW_BYTES >> 20) + 8 && !peer.socket.destroyed; i++) {
      peer.socket.write(frame(8, chunk, 9));
    }
    await peer.closed;
    expect(serverErrors.some((error) => /beyond its credit/.test(error.message))).toBe(true);
  });

  // Proves a server answering a call that was never made is detected by the client: its pending call fails
  // with EPROTO instead of hanging or being resolved with someone else's answer.
  it('client rejects answers to calls it never made', async () => {
    const fake = createServer((socket) => {
      const peer = new RawPeer(socket);
      void (async () => {
        socket.write(MAGIC);
        socket.write(frame(1, jsonPayload({ version: 1, nonce: randomBytes(32).toString('hex'), auth: false })));
        await peer.bytes(MAGIC.length);
        await peer.frame(); // AUTH
        socket.write(frame(3, jsonPayload({})));
        await peer.frame(); // the client's REQUEST (call id 1)
        socket.write(frame(6, jsonPayload({ bogus: true }), 4242)); // RESPONSE to call 4242
      })().catch(() => undefined);
    });
    await new Promise<void>((resolve) => fake.listen(0, '127.0.0.1', resolve));
    try {
      const socket = connect({ host: '127.0.0.1', port: (fake.address() as { port: number }).port });
      await new Promise<void>((resolve) => socket.once('connect', resolve));
      const client = await WireConnection.client({ input: socket, output: socket, destroy: () => socket.destroy(), description: 'fake server' }, {});
      const error = await client.call('echo', {}).catch((caught: unknown) => caught);
      expect(error).toBeInstanceOf(ReplicaError);
      expect((error as ReplicaError).code).toBe('EPROTO');
      expect((error as ReplicaError).message).toMatch(/call 4242, which is not pending/);
    } finally {
      await new Promise((resolve) => fake.close(resolve));
    }
  });
});

describe('flow control', () => {
  // Proves backpressure end to end: an upload to a handler that has not started reading stalls at the window
  // (the sender's iterator is not drained beyond ~window + one chunk), then completes once the reader reads.
  it('holds a sender at the window until the receiver reads', async () => {
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const gated = createServer((socket) => {
      void WireConnection.server({ input: socket, output: socket, destroy: () => socket.destroy(), description: 'c' }, { secret }, async (request) => {
        await gate;
        let total = 0;
        for await (const chunk of request.upload as IncomingStream) total += chunk.length;
        return { json: { total } };
      }).catch(() => undefined);
    });
    await new Promise<void>((resolve) => gated.listen(0, '127.0.0.1', resolve));
    try {
      const socket = connect({ host: '127.0.0.1', port: (gated.address() as { port: number }).port });
      await new Promise<void>((resolve) => socket.once('connect', resolve));
      const client = await WireConnection.client({ input: socket, output: socket, destroy: () => socket.destroy(), description: 's' }, { secret, compress: false });
      let produced = 0;
      const totalBytes = 64 << 20;
      const chunk = randomBytes(1 << 20);
      const reply = client.call('upload', {}, {
        upload: {
          chunks: (async function* () {
            while (produced < totalBytes) {
              produced += chunk.length;
              yield chunk;
            }
          })(),
          end: async () => ({}),
        },
      });
      // Give the sender every chance to run ahead, then check it did not.
      for (let i = 0; i < 20; i++) await new Promise((resolve) => setTimeout(resolve, 25));
      expect(produced).toBeLessThanOrEqual(STREAM_WINDOW_BYTES + 2 * chunk.length);
      release();
      expect((await reply).json).toEqual({ total: totalBytes });
      client.close();
    } finally {
      await new Promise((resolve) => gated.close(resolve));
    }
  });
});
