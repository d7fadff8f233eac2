// The peer protocol fuzzer: a peer that knows the shared secret (it authenticates with the project's own
// PeerLink, so every frame it sends arrives after a genuine handshake) and then sends seeded garbage: frames of
// every type the protocol has and of types it does not, with random flags, ids, offsets and bodies, protobuf
// messages with random and mutated fields, plausible handshakes that go wrong halfway. Before authentication it
// also opens raw TCP connections to the node's peer port and sends random bytes or mutated hellos.
// What must hold is checked by the caller: the node under test never crashes, every bad input costs at most a
// connection, and the data of its UpToDate Primary is never written by the peer.
// An input is one frame (or one raw pre-authentication connection).
import net from 'node:net';
import { CHANNEL_DATA, CHANNEL_META, PeerLink, type PeerConnection } from '../../src/replication/link.js';
import { FrameFlag, FrameType } from '../../src/replication/frame.js';
import { encodeMessage, Messages } from '../../src/replication/messages.js';
import { createLogger } from '../../src/util/log.js';
import { mulberry32 } from '../helpers/prng.js';

export interface PeerFuzzOptions {
  seed: number;
  /** Frames to send after authentication, in all connections together. */
  inputs: number;
  /** Raw connections before authentication. */
  rawConnections: number;
  resource: string;
  secret: string;
  /** The fuzzer's node name and the node under test's (which listens at `target`). */
  localNode: string;
  targetNode: string;
  target: { host: string; port: number };
  /** Frames per connection at most (each connection sends 1..this). */
  framesPerConnection?: number;
  /** The device size of the node under test (offsets are drawn around it). */
  sizeBytes: number;
  /** Called between connections: fail fast when the node under test died. */
  check?: () => Promise<void>;
  /** The operator's `connect` on the node under test, for when it went StandAlone. */
  connect?: () => Promise<void>;
}

export interface PeerFuzzResult {
  connections: number;
  framesSent: number;
  /** Connections the node under test closed (the rest the fuzzer closed itself after its frames). */
  closedByTarget: number;
  rawConnections: number;
  rawBytes: number;
  /** Times the node was StandAlone (a refused handshake) and got the operator's `connect`. */
  operatorConnects: number;
  /** Frames sent per type (name -> count). */
  byType: Record<string, number>;
  peakRssBytes: number;
}

const typeNames = new Map<number, string>(Object.entries(FrameType).map(([name, value]) => [value, name]));
const roles = ['Primary', 'Secondary', '', 'Unknown', 'primary'];
const disks = ['UpToDate', 'Inconsistent', 'Outdated', 'Consistent', 'Diskless', 'DUnknown', ''];
const decisions = ['none', 'source', 'target', 'full-source', 'full-target', 'split-brain', 'unrelated', 'bogus'];
const commands = ['invalidate', 'set-uuid', 'resync-pause', 'resync-resume', 'resync-rate', 'primary', 'down', ''];

export async function runPeerFuzz(options: PeerFuzzOptions): Promise<PeerFuzzResult> {
  const random = mulberry32(options.seed);
  const int = (below: number): number => Math.floor(random() * below);
  const pick = <T>(items: readonly T[]): T => items[int(items.length)]!;
  const bytes = (n: number): Buffer => {
    const out = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i += 1) out[i] = int(256);
    return out;
  };
  const uuid = (): bigint => (random() < 0.2 ? 0n : (BigInt(int(2 ** 32)) << 32n) | BigInt(int(2 ** 32)));
  const offset = (): number => {
    const r = random();
    if (r < 0.6) return int(options.sizeBytes / 4096) * 4096;
    if (r < 0.8) return int(options.sizeBytes);
    if (r < 0.9) return options.sizeBytes - int(8192);
    return int(2 ** 32) * 4096; // far beyond the device
  };
  const length = (): number => pick([0, 1, 511, 4096, 4096, 65536, 1 << 20, int(1 << 17), 0xffffffff]);
  /** Byte flips, truncation or extension of a body. */
  const mutate = (input: Uint8Array): Buffer => {
    const body = Buffer.from(input.buffer, input.byteOffset, input.byteLength);
    const r = random();
    if (r < 0.5 || body.length === 0) return body;
    if (r < 0.7) return body.subarray(0, int(body.length));
    if (r < 0.85) return Buffer.concat([body, bytes(1 + int(16))]);
    const copy = Buffer.from(body);
    for (let i = 0, n = 1 + int(4); i < n; i += 1) copy[int(copy.length)] = int(256);
    return copy;
  };
  const u32 = (value: number): Buffer => {
    const out = Buffer.alloc(4);
    out.writeUInt32BE(value >>> 0);
    return out;
  };

  /** One frame: [channel, type, flags, id, offset, body]. */
  const frame = (): [number, number, number, number, number, Buffer] => {
    const channel = random() < 0.5 ? CHANNEL_DATA : CHANNEL_META;
    const flags = random() < 0.7 ? 0 : pick([FrameFlag.LZ4, FrameFlag.SAME, FrameFlag.CSUM, int(65536)]);
    const id = random() < 0.5 ? int(64) : int(2 ** 32);
    const r = random();
    if (r < 0.04) return [channel, int(256), int(65536), id, offset(), bytes(int(64))]; // any type at all
    const type = pick(Object.values(FrameType));
    let body: Uint8Array;
    switch (type) {
      case FrameType.NODE_STATE:
        body = encodeMessage(Messages.NodeState, {
          node: pick([options.localNode, options.targetNode, 'mallory', '']), sizeBytes: BigInt(pick([options.sizeBytes, options.sizeBytes * 2, 0, int(2 ** 31)])),
          currentUuid: uuid(), bitmapUuid: uuid(), historyUuids: [uuid(), uuid()].slice(0, int(3)),
          role: pick(roles), disk: pick(disks), consistent: random() < 0.5, wasPrimary: random() < 0.5,
          crashedPrimary: random() < 0.3, discardMyData: random() < 0.2, dirtyBlocks: BigInt(int(2 ** 20)),
          protocol: pick(['A', 'B', 'C', 'D', '']), resyncInProgress: random() < 0.3, allowTwoPrimaries: random() < 0.3,
          lastPromotedMs: BigInt(int(2 ** 40)),
        });
        break;
      case FrameType.STATE_CHANGE:
        body = encodeMessage(Messages.StateChange, { role: pick(roles), disk: pick(disks), currentUuid: uuid(),
          bitmapUuid: uuid(), historyUuids: [uuid()] });
        break;
      case FrameType.SYNC_DECISION:
        body = encodeMessage(Messages.SyncDecision, { kind: pick(decisions), reason: 'fuzz' });
        break;
      case FrameType.RESYNC_START:
        body = encodeMessage(Messages.ResyncStart, { totalBytes: BigInt(int(options.sizeBytes * 2)), full: random() < 0.5,
          checksumBased: random() < 0.5, syncUuid: uuid() });
        break;
      case FrameType.RESYNC_DONE:
        body = encodeMessage(Messages.ResyncDone, { bytes: BigInt(int(options.sizeBytes)) });
        break;
      case FrameType.VERIFY_DONE:
        body = encodeMessage(Messages.VerifyDone, { checkedBytes: BigInt(int(options.sizeBytes)), mismatchedBytes: BigInt(int(4096)) });
        break;
      case FrameType.COMMAND:
        body = encodeMessage(Messages.Command, { name: pick(commands),
          arg: pick(['', '0', '12345', String(uuid()), 'x', '-1', '1e999', '0x10']) });
        break;
      case FrameType.DISCONNECT:
        body = encodeMessage(Messages.Disconnect, { reason: 'fuzz' });
        break;
      case FrameType.HELLO:
      case FrameType.HELLO_REPLY:
      case FrameType.AUTH_RESPONSE:
      case FrameType.AUTH_RESULT:
        body = bytes(int(48));
        break;
      case FrameType.DATA:
      case FrameType.RS_REPLY:
        body = bytes(pick([0, 1, 512, 4096, 4096, 8192, 65536]));
        break;
      case FrameType.TRIM:
      case FrameType.ZERO:
      case FrameType.RS_REQUEST:
      case FrameType.RS_ACK:
        body = random() < 0.8 ? u32(length()) : bytes(int(12));
        break;
      case FrameType.OV_REQUEST:
        body = Buffer.concat([u32(length()), bytes(pick([0, 8, 16, 32]))]);
        break;
      case FrameType.OV_REPLY:
        body = Buffer.concat([u32(length()), Buffer.from([int(3)])]);
        break;
      case FrameType.BITMAP:
        body = bytes(pick([0, 1, 64, 4096]));
        break;
      default:
        body = random() < 0.9 ? Buffer.alloc(0) : bytes(int(16)); // acks, barriers, pings, verdicts, BITMAP_END
    }
    return [channel, type, flags, id, type === FrameType.BITMAP ? int(1 << 16) : offset(), mutate(body)];
  };

  const result: PeerFuzzResult = {
    connections: 0, framesSent: 0, closedByTarget: 0, rawConnections: 0, rawBytes: 0, operatorConnects: 0, byType: {}, peakRssBytes: 0,
  };
  const notePeak = (): void => {
    result.peakRssBytes = Math.max(result.peakRssBytes, process.memoryUsage().rss);
  };

  // Before authentication: raw connections with random bytes or a hello-shaped start.
  for (let i = 0; i < options.rawConnections; i += 1) {
    const payload = random() < 0.5 ? bytes(int(4096)) : Buffer.concat([
      Buffer.from([0x64, 0x72, 0x62, 0x64]), bytes(int(64)), // a plausible magic, then garbage
    ]);
    await rawConnection(options.target, payload);
    result.rawConnections += 1;
    result.rawBytes += payload.length;
    if (i % 50 === 0) {
      notePeak();
      await options.check?.();
    }
  }

  // After authentication.
  const link = new PeerLink({
    resource: options.resource, localNode: options.localNode, peerNode: options.targetNode,
    sharedSecret: options.secret, listen: { host: '127.0.0.1', port: 0 }, peer: options.target,
    pingIntervalMs: 1000, pingTimeoutMs: 5000, connectRetryMs: 20, side: 'connector',
    logger: createLogger('fuzz-peer', 'silent'),
  });
  let waiting: ((connection: PeerConnection) => void) | null = null;
  let lost: string | null = null;
  link.onConnected = (connection) => {
    connection.start(() => {}); // the node's own frames (state, pings) are read and dropped
    waiting?.(connection);
  };
  link.onDisconnected = (reason) => {
    lost = reason;
  };
  await link.start();
  link.connect();
  const perConnection = options.framesPerConnection ?? 64;
  try {
    while (result.framesSent < options.inputs) {
      const connection = await new Promise<PeerConnection>((resolve, reject) => {
        if (link.connection !== null && link.connection.closedReason === null) {
          resolve(link.connection);
          return;
        }
        // A refused handshake (split brain, a size or config mismatch the fuzzer claimed) leaves the node
        // StandAlone, as DRBD does: the operator's `connect` brings it back.
        const standAlone = setTimeout(() => {
          result.operatorConnects += 1;
          options.connect?.().catch(reject);
        }, 500);
        const timer = setTimeout(() => reject(new Error(`no authenticated connection to ${options.targetNode} within 10 s`)), 10_000);
        waiting = (value) => {
          clearTimeout(standAlone);
          clearTimeout(timer);
          waiting = null;
          resolve(value);
        };
      });
      result.connections += 1;
      lost = null;
      const count = 1 + int(perConnection);
      for (let i = 0; i < count && result.framesSent < options.inputs; i += 1) {
        const [channel, type, flags, id, off, body] = frame();
        if (!connection.send(channel as 0 | 1, type, flags, id, off, body)) break;
        result.framesSent += 1;
        const name = typeNames.get(type) ?? 'other';
        result.byType[name] = (result.byType[name] ?? 0) + 1;
        // Let the node answer now and then, so that its replies and state changes interleave with ours.
        if (random() < 0.1) await new Promise((resolve) => setImmediate(resolve));
      }
      // Give the node a moment to react to the last frames, then end the connection if it has not.
      await new Promise((resolve) => setTimeout(resolve, random() < 0.9 ? 0 : 5));
      await connection.waitDataDrain().catch(() => {});
      if (connection.closedReason === null) connection.close('fuzz: connection done');
      else result.closedByTarget += 1;
      void lost;
      if (result.connections % 20 === 0) {
        notePeak();
        await options.check?.();
      }
    }
  } finally {
    await link.close();
  }
  notePeak();
  return result;
}

/** Connects, sends the bytes, half-closes and waits (bounded) for the node to close its side. */
function rawConnection(target: { host: string; port: number }, payload: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(target.port, target.host);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`the node kept a garbage connection open for 10 s after the fuzzer half-closed it`));
    }, 10_000);
    socket.on('connect', () => socket.end(payload));
    socket.on('data', () => {});
    socket.on('error', () => {});
    socket.on('close', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

