// Proves the peer link's framing, authentication and keepalive on real loopback sockets: frames survive any
// split into chunks; two links authenticate and carry data and acks on separate sockets; a wrong secret and a
// garbage-speaking client are dropped with a logged reason while the listener keeps serving; a black-holed link
// is noticed by both sides within the ping timeout and comes back once traffic flows again. The ordering gate
// admits disjoint ranges at once and overlapping ones strictly in arrival order.
import { afterEach, describe, expect, it } from 'vitest';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { pino } from 'pino';
import { FrameDecoder, FrameType, FrameWriter, FRAME_HEADER_BYTES, writeFrameHeader } from '../src/replication/frame.js';
import { CHANNEL_DATA, CHANNEL_META, PeerLink, type PeerConnection } from '../src/replication/link.js';
import { IntervalGate, type GateEntry } from '../src/replication/gate.js';
import { Messages, decodeMessage, encodeMessage } from '../src/replication/messages.js';
import { TcpProxy, waitFor } from './replication-helpers.js';

const logger = pino({ level: 'silent' });
const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

function makePair(options: { secretA?: string; secretB?: string; pingTimeoutMs?: number; viaProxy?: boolean } = {}) {
  const base = {
    resource: 'r0', pingIntervalMs: 100, pingTimeoutMs: options.pingTimeoutMs ?? 600, connectRetryMs: 50, logger,
  };
  const bob = new PeerLink({
    ...base, localNode: 'bob', peerNode: 'alice', sharedSecret: options.secretB ?? 's3cret',
    listen: { host: '127.0.0.1', port: 0 }, peer: { host: '127.0.0.1', port: 1 },
  });
  return {
    bob,
    async alice(port: number) {
      const alice = new PeerLink({
        ...base, localNode: 'alice', peerNode: 'bob', sharedSecret: options.secretA ?? 's3cret',
        listen: { host: '127.0.0.1', port: 0 }, peer: { host: '127.0.0.1', port },
      });
      cleanups.push(() => alice.close());
      return alice;
    },
  };
}

describe('frame decoder', () => {
  it('decodes the same frames however the byte stream is split', () => {
    // Builds three frames (one with a 100 KiB payload), feeds them in random-sized chunks, compares.
    const payload = randomBytes(100 * 1024);
    const frames: Buffer[] = [];
    for (const [type, body, offset] of [
      [FrameType.PING, Buffer.alloc(0), 0],
      [FrameType.DATA, payload, 2 ** 40 + 4096],
      [FrameType.WRITE_ACK, Buffer.from([1, 2, 3]), 7],
    ] as const) {
      const header = Buffer.alloc(FRAME_HEADER_BYTES);
      writeFrameHeader(header, 0, type, 1, body.length, 42, offset);
      frames.push(header, body);
    }
    const stream = Buffer.concat(frames);
    for (let round = 0; round < 20; round += 1) {
      const seen: Array<[number, number, number, string]> = [];
      const decoder = new FrameDecoder((type, _flags, id, offset, body) => {
        seen.push([type, id, offset, body.toString('base64')]);
      });
      let position = 0;
      while (position < stream.length) {
        const size = 1 + Math.floor(Math.random() * (round < 10 ? 7 : 40000));
        decoder.push(stream.subarray(position, position + size));
        position += size;
      }
      expect(seen.map((frame) => frame[0])).toEqual([FrameType.PING, FrameType.DATA, FrameType.WRITE_ACK]);
      expect(seen[1]![2]).toBe(2 ** 40 + 4096);
      expect(seen[1]![3]).toBe(payload.toString('base64'));
      expect(seen[2]![1]).toBe(42);
    }
  });

  it('decodes the same frames with direct reads (the kernel filling the buffers the decoder offers)', () => {
    // Large bodies (read in place), small ones (copied out of the reused slab), empty ones, in any read sizes.
    const bodies = [randomBytes(300 * 1024), randomBytes(4096), Buffer.alloc(0), randomBytes(1 << 20), randomBytes(20 * 1024), randomBytes(3)];
    const frames: Buffer[] = [];
    bodies.forEach((body, i) => {
      const header = Buffer.alloc(FRAME_HEADER_BYTES);
      writeFrameHeader(header, 0, body.length === 0 ? FrameType.PING : FrameType.DATA, 0, body.length, i, i * 4096);
      frames.push(header, body);
    });
    const stream = Buffer.concat([...frames, ...frames]);
    for (let round = 0; round < 20; round += 1) {
      const seen: Array<[number, Buffer]> = [];
      const decoder = new FrameDecoder((_type, _flags, id, _offset, body) => seen.push([id, body]));
      let position = 0;
      while (position < stream.length) {
        const target = decoder.nextReadBuffer();
        const size = Math.min(target.length, stream.length - position, 1 + Math.floor(Math.random() * (round < 10 ? 100 : 70000)));
        stream.copy(target, 0, position, position + size);
        position += size;
        decoder.onRead(size);
      }
      expect(seen.map(([id]) => id)).toEqual([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]);
      // Bodies handed out must stay intact although the slab was read into again afterwards.
      seen.forEach(([id, body]) => expect(body.equals(bodies[id]!)).toBe(true));
    }
  });

  it('rejects garbage with a reason naming the problem', () => {
    const decoder = new FrameDecoder(() => {});
    expect(() => decoder.push(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'))).toThrow(/bad frame magic/);
    const huge = Buffer.alloc(FRAME_HEADER_BYTES);
    writeFrameHeader(huge, 0, FrameType.DATA, 0, 0, 0, 0);
    huge.writeUInt32BE(0xffffffff, 8);
    expect(() => new FrameDecoder(() => {}).push(huge)).toThrow(/exceeds the limit/);
  });
});

describe('peer link', () => {
  it('authenticates both ways and carries data and acks on separate sockets', async () => {
    // alice (connector) and bob (acceptor) connect over loopback; alice sends a DATA frame, bob acks on meta.
    const { bob, alice: makeAlice } = makePair();
    cleanups.push(() => bob.close());
    await bob.start();
    bob.connect();
    const alice = await makeAlice(bob.listenPort);
    const received: string[] = [];
    let bobConnection: PeerConnection | null = null;
    bob.onConnected = (connection) => {
      bobConnection = connection;
      connection.start((channel, type, _flags, id, offset, body) => {
        received.push(`${channel}:${type}:${id}:${offset}:${body.length}`);
        if (type === FrameType.DATA) connection.send(CHANNEL_META, FrameType.WRITE_ACK, 0, id, 0);
      });
    };
    const acks: number[] = [];
    alice.onConnected = (connection) => {
      connection.start((channel, type, _flags, id) => {
        if (channel === CHANNEL_META && type === FrameType.WRITE_ACK) acks.push(id);
      });
      connection.send(CHANNEL_DATA, FrameType.DATA, 0, 9, 8192, randomBytes(65536));
    };
    alice.connect();
    await waitFor('the write ack', () => acks.length === 1);
    expect(acks).toEqual([9]);
    expect(received).toEqual([`${CHANNEL_DATA}:${FrameType.DATA}:9:8192:65536`]);
    expect(alice.state).toBe('Connected');
    expect(bob.state).toBe('Connected');
    expect(bobConnection).not.toBeNull();
  });

  it('drops a peer with the wrong secret and a garbage-speaking client, and keeps serving', async () => {
    // bob listens; a client with another secret is refused (both sides log why), then a client speaking
    // garbage is dropped, then the right peer connects.
    const { bob } = makePair({ secretB: 'right' });
    cleanups.push(() => bob.close());
    await bob.start();
    bob.connect();
    let connected = 0;
    bob.onConnected = (connection) => {
      connected += 1;
      connection.start(() => {});
    };
    const wrong = new PeerLink({
      resource: 'r0', localNode: 'alice', peerNode: 'bob', sharedSecret: 'wrong', pingIntervalMs: 100,
      pingTimeoutMs: 600, connectRetryMs: 50, logger, listen: { host: '127.0.0.1', port: 0 },
      peer: { host: '127.0.0.1', port: bob.listenPort },
    });
    cleanups.push(() => wrong.close());
    wrong.connect();
    await waitFor('the wrong secret to be refused', () =>
      bob.rejections.some((reason) => /failed authentication \(shared-secret differs\)/.test(reason)));
    await wrong.close();
    expect(wrong.state).not.toBe('Connected');

    const garbage = net.connect(bob.listenPort, '127.0.0.1');
    garbage.on('error', () => {});
    garbage.write(randomBytes(4096));
    await waitFor('the garbage client to be dropped', () =>
      bob.rejections.some((reason) => /bad frame magic/.test(reason)));
    await waitFor('the garbage socket to close', () => garbage.destroyed || garbage.readableEnded);

    const alice = new PeerLink({
      resource: 'r0', localNode: 'alice', peerNode: 'bob', sharedSecret: 'right', pingIntervalMs: 100,
      pingTimeoutMs: 600, connectRetryMs: 50, logger, listen: { host: '127.0.0.1', port: 0 },
      peer: { host: '127.0.0.1', port: bob.listenPort },
    });
    cleanups.push(() => alice.close());
    alice.onConnected = (connection) => connection.start(() => {});
    alice.connect();
    await waitFor('the right peer to connect', () => connected === 1 && alice.state === 'Connected');
  });

  it('refuses a peer speaking an older protocol version with a message saying so', async () => {
    // A client sends bob the HELLO of peer protocol version 1 (online verify per 256 KiB, whose digests this
    // version reads differently): bob answers with a refusal naming both versions, and logs the same.
    const { bob } = makePair();
    cleanups.push(() => bob.close());
    await bob.start();
    bob.connect();
    const old = net.connect(bob.listenPort, '127.0.0.1');
    old.on('error', () => {});
    const frames: Array<{ type: number; body: Buffer }> = [];
    const decoder = new FrameDecoder((type, _flags, _id, _offset, body) => frames.push({ type, body: Buffer.from(body) }));
    old.on('data', (chunk: Buffer) => decoder.push(chunk));
    await new Promise<void>((resolve) => old.once('connect', () => resolve()));
    const hello = encodeMessage(Messages.Hello, {
      protocolVersion: 1, resource: 'r0', node: 'alice', peerNode: 'bob', channel: CHANNEL_DATA,
      challenge: randomBytes(32), session: randomBytes(16),
    });
    const header = Buffer.alloc(FRAME_HEADER_BYTES);
    writeFrameHeader(header, 0, FrameType.HELLO, 0, hello.length, 0, 0);
    old.write(Buffer.concat([header, hello]));
    await waitFor('the refusal', () => frames.length > 0);
    expect(frames[0]!.type).toBe(FrameType.AUTH_RESULT);
    const refusal = decodeMessage<{ ok: boolean; reason: string }>(Messages.AuthResult, frames[0]!.body);
    expect(refusal.ok).toBe(false);
    expect(refusal.reason).toMatch(/node alice speaks peer protocol version 1 .*this node version 2 .*run the same drbdts version on both nodes/);
    await waitFor('bob to log it', () => bob.rejections.some((reason) => reason.includes('peer protocol version 1')));
    old.destroy();
  });

  it('notices a black-holed link on both sides within the ping timeout and reconnects after', async () => {
    // alice reaches bob through a proxy; the proxy swallows all bytes; both sides must drop the connection
    // (ping timeout 600 ms) and, once the proxy passes traffic again, reconnect.
    const { bob, alice: makeAlice } = makePair({ pingTimeoutMs: 600 });
    cleanups.push(() => bob.close());
    await bob.start();
    bob.connect();
    const proxy = new TcpProxy(bob.listenPort);
    cleanups.push(() => proxy.close());
    const alice = await makeAlice(await proxy.listen());
    const lost: Record<string, string[]> = { alice: [], bob: [] };
    let aliceConnects = 0;
    bob.onConnected = (connection) => connection.start(() => {});
    bob.onDisconnected = (reason) => lost.bob!.push(reason);
    alice.onConnected = (connection) => {
      aliceConnects += 1;
      connection.start(() => {});
    };
    alice.onDisconnected = (reason) => lost.alice!.push(reason);
    alice.connect();
    await waitFor('first connection', () => aliceConnects === 1 && bob.state === 'Connected');
    proxy.mode = 'blackhole';
    const blackholedAt = Date.now();
    await waitFor('both sides to notice', () => lost.alice!.length > 0 && lost.bob!.length > 0, 10000);
    expect(Date.now() - blackholedAt).toBeLessThan(5000);
    expect(lost.alice![0]).toMatch(/ping timeout/);
    expect(lost.bob![0]).toMatch(/ping timeout/);
    proxy.breakAll();
    proxy.mode = 'pass';
    await waitFor('reconnection', () => aliceConnects >= 2 && alice.state === 'Connected' && bob.state === 'Connected');
  });
});

describe('ordering gate', () => {
  it('admits disjoint ranges at once and overlapping ones in arrival order', async () => {
    // A holds [0, 8K); B overlaps A, C overlaps B only, D is disjoint. D enters at once; B waits for A;
    // C waits for B (admitted after it, overlapping), even though C does not overlap A.
    const gate = new IntervalGate();
    const order: string[] = [];
    const a = gate.enter(0, 8192) as GateEntry;
    const b = gate.enter(4096, 8192);
    const c = gate.enter(10000, 100);
    const d = gate.enter(1 << 20, 4096);
    expect(b).toBeInstanceOf(Promise);
    expect(c).toBeInstanceOf(Promise);
    expect(d).not.toBeInstanceOf(Promise);
    const bDone = (b as Promise<GateEntry>).then((entry) => { order.push('B'); return entry; });
    const cDone = (c as Promise<GateEntry>).then((entry) => { order.push('C'); gate.leave(entry); });
    await new Promise((resolve) => setTimeout(resolve, 10));
    expect(order).toEqual([]);
    gate.leave(a);
    const bEntry = await bDone;
    expect(order).toEqual(['B']);
    gate.leave(bEntry);
    await cDone;
    expect(order).toEqual(['B', 'C']);
    gate.leave(d as GateEntry);
    expect(gate.size).toBe(0);
    expect(gate.waits).toBe(2);
  });
});
