// The peer link: two authenticated TCP connections to the peer, like DRBD's data and meta sockets. Writes,
// resync data and barriers travel on the data socket; acks, pings and state changes on the meta socket, so an
// ack never waits behind megabytes of data. As in DRBD both nodes listen on their own address (so a port another
// process holds is an error at `up` on either node) and both dial, and a deterministic rule keeps one session: the
// one dialled by the node whose name sorts first (the `connector`). It dials at once; the other node dials only
// after it has waited a while, and the connector accepts that session only when its own dials keep failing (the
// peer is unreachable from it, say a one-way firewall). Should both sessions complete anyway, the connector's
// replaces the other on both nodes. Each socket runs a mutual HMAC challenge-response first (auth.ts);
// garbage, a wrong secret or the wrong resource drops that socket with a logged reason and nothing else.
// Keepalive: the meta socket carries a ping every pingIntervalMs; silence for pingTimeoutMs drops the connection,
// which is how a dead or black-holed peer is noticed.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import net, { type Socket } from 'node:net';
import type { Logger } from '../util/log.js';
import { authResponse, newChallenge, responseMatches } from './auth.js';
import { receivePool } from './pool.js';
import { FrameDecoder, FrameError, FrameType, FrameWriter, frameTypeName, frameTypeTable } from './frame.js';
import { ReplEventKind, ReplTransport, type ReplEvent } from '../native/index.js';
import type { NativePlaneHub } from './native-plane.js';
import {
  PROTOCOL_VERSION,
  versionMismatch,
  Messages,
  decodeMessage,
  encodeMessage,
  type HelloMessage,
  type HelloReplyMessage,
} from './messages.js';

export const CHANNEL_DATA = 0;
export const CHANNEL_META = 1;
export type Channel = typeof CHANNEL_DATA | typeof CHANNEL_META;

export interface PeerAddress {
  host: string;
  port: number;
}

export interface PeerLinkOptions {
  resource: string;
  localNode: string;
  peerNode: string;
  sharedSecret: string;
  /** Where this node listens (both sides bind it at start()). */
  listen: PeerAddress;
  /** Where the peer listens: where this node dials it. */
  peer: PeerAddress;
  pingIntervalMs: number;
  pingTimeoutMs: number;
  connectRetryMs?: number;
  handshakeTimeoutMs?: number;
  /** Default: the node whose name sorts first connects. */
  side?: 'connector' | 'acceptor';
  logger: Logger;
  /**
   * The native data plane: after authentication both sockets are handed to a native transport of this plane,
   * which writes peer writes to `fileFd()` itself. Without it (DRBDTS_REPL_DATA_PATH=js) JavaScript reads both.
   */
  native?: { hub: NativePlaneHub; fileFd: () => number; sizeBytes: number };
}

export type FrameListener = (
  channel: Channel,
  type: number,
  flags: number,
  id: number,
  offset: number,
  body: Buffer,
) => void;

interface QueuedFrame {
  type: number;
  flags: number;
  id: number;
  offset: number;
  body: Buffer;
}

/** Node's `onread` option: the socket reads into memory the decoder chooses, read by read. */
interface DirectRead {
  buffer: () => Buffer;
  /** Returning false would stop reading; these always return true. */
  callback: (bytes: number, buffer: Uint8Array) => boolean;
}

/** Whether `socket` has the internals takeOverSocket relies on (a handle that is not reading yet). */
function takeOverPossible(socket: Socket): boolean {
  const handle = (socket as unknown as { _handle?: { reading?: boolean; useUserBuffer?: unknown } | null })._handle;
  return handle !== null && handle !== undefined && handle.reading !== true && typeof handle.useUserBuffer === 'function';
}

/**
 * Re-creates an accepted socket (net.Server with pauseOnConnect, nothing read yet) with Node's `onread` option,
 * which net.Server cannot pass itself (as the NBD server does for its connections). Null when this Node's
 * internals do not allow it; the caller then reads 'data' chunks.
 */
function takeOverSocket(accepted: Socket, onread: DirectRead): Socket | null {
  if (!takeOverPossible(accepted)) return null;
  const internals = accepted as unknown as { _handle: unknown };
  const handle = internals._handle;
  internals._handle = null;
  accepted.destroy(); // no handle any more: only the server's connection count is released
  return new net.Socket({ handle, allowHalfOpen: false, readable: true, writable: true, onread } as net.SocketConstructorOpts);
}

/** One socket with its decoder and writer. Frames queue until a consumer takes them (handshake, then link). */
class FrameSocket {
  readonly decoder: FrameDecoder;
  readonly writer: FrameWriter;
  readonly socket: Socket;
  private queue: QueuedFrame[] = [];
  private waiter: ((frame: QueuedFrame | Error) => void) | null = null;
  private listener: ((type: number, flags: number, id: number, offset: number, body: Buffer) => void) | null = null;
  closedReason: string | null = null;
  onClose: ((reason: string) => void) | null = null;

  /**
   * `open` makes the socket, given the `onread` option that reads straight into the decoder's buffers (a large
   * body lands in place, no 64 KiB chunk is allocated per read); it returns the socket and whether it used it.
   * The decoder exists before the socket: Node asks for the first read buffer when the handle is set up.
   */
  constructor(open: (onread: DirectRead) => { socket: Socket; direct: boolean }) {
    const onFrame = (type: number, flags: number, id: number, offset: number, body: Buffer): void => {
      if (this.listener !== null) {
        this.listener(type, flags, id, offset, body);
        return;
      }
      const frame = { type, flags, id, offset, body };
      if (this.waiter !== null) {
        const waiter = this.waiter;
        this.waiter = null;
        waiter(frame);
      } else {
        this.queue.push(frame);
      }
    };
    this.decoder = new FrameDecoder(onFrame, null, (lengthBytes) => receivePool.take(lengthBytes));
    const failed = (error: unknown): void => {
      this.close(error instanceof FrameError ? error.message : `receive failed: ${(error as Error).stack}`);
    };
    const { socket, direct } = open({
      buffer: () => this.decoder.nextReadBuffer(),
      callback: (bytes) => {
        try {
          this.decoder.onRead(bytes);
        } catch (error) {
          failed(error);
        }
        return true;
      },
    });
    this.socket = socket;
    socket.setNoDelay(true);
    this.writer = new FrameWriter(socket);
    if (!direct) {
      socket.on('data', (chunk: Buffer) => {
        try {
          this.decoder.push(chunk);
        } catch (error) {
          failed(error);
        }
      });
    }
    socket.on('error', (error) => this.close(`socket error: ${error.message}`));
    socket.on('close', () => this.close('connection closed by peer'));
  }

  /** The next frame, within timeoutMs. */
  next(timeoutMs: number, what: string): Promise<QueuedFrame> {
    const queued = this.queue.shift();
    if (queued !== undefined) return Promise.resolve(queued);
    if (this.closedReason !== null) return Promise.reject(new Error(this.closedReason));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = null;
        reject(new Error(`no ${what} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiter = (frame) => {
        clearTimeout(timer);
        if (frame instanceof Error) reject(frame);
        else resolve(frame);
      };
    });
  }

  setListener(listener: (type: number, flags: number, id: number, offset: number, body: Buffer) => void): void {
    this.listener = listener;
    const queued = this.queue;
    this.queue = [];
    for (const frame of queued) listener(frame.type, frame.flags, frame.id, frame.offset, frame.body);
  }

  close(reason: string): void {
    if (this.closedReason !== null) return;
    this.closedReason = reason;
    // Flush what is corked (a refusal telling the peer why) and end politely; destroy soon regardless, since a
    // black-holed peer never completes the close.
    this.writer.flushNow();
    this.socket.end();
    setTimeout(() => this.socket.destroy(), 500).unref();
    if (this.waiter !== null) {
      const waiter = this.waiter;
      this.waiter = null;
      waiter(new Error(reason));
    }
    this.onClose?.(reason);
  }
}

async function expectFrame(socket: FrameSocket, type: number, timeoutMs: number): Promise<QueuedFrame> {
  const frame = await socket.next(timeoutMs, frameTypeName(type));
  if (frame.type !== type) {
    throw new FrameError(`expected ${frameTypeName(type)}, got ${frameTypeName(frame.type)}`);
  }
  return frame;
}

/** An established, authenticated connection to the peer: a data socket and a meta socket. */
/**
 * What the replicated device needs of a peer connection: PeerConnection below, or the deterministic simulated
 * link of the tests (test/sim/).
 */
export interface PeerChannel {
  readonly closedReason: string | null;
  /** Bytes queued toward the peer on the data channel and not yet taken by the transport. */
  readonly dataQueuedBytes: number;
  send(channel: Channel, type: number, flags: number, id: number, offset: number, body?: Uint8Array): boolean;
  sendWithCallback(channel: Channel, type: number, flags: number, id: number, offset: number, body: Uint8Array,
    onWritten: () => void): void;
  /** Stop / resume receiving the peer's data channel (flow control toward the peer). */
  pauseData(): void;
  resumeData(): void;
  waitDataDrain(): Promise<void>;
  /** The native transport carrying this connection, if any (the device arms and disarms its Secondary side). */
  readonly nativeTransport?: ReplTransport | null;
  /** Frames that change the disk (peer writes, resync data, barriers) the native transport handed to JavaScript. */
  readonly nativeForwarded?: number;
}

/** Data-channel frames that change this node's disk: the native Secondary stops at each until JavaScript re-arms. */
const modifyingTypes: ReadonlySet<number> = new Set([FrameType.DATA, FrameType.TRIM, FrameType.ZERO, FrameType.RS_REPLY,
  FrameType.BARRIER]);

/** The socket's descriptor, or -1 (the handle's internals). */
function socketFd(socket: Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
  return typeof fd === 'number' ? fd : -1;
}

export class PeerConnection implements PeerChannel {
  onFrame: FrameListener = () => {};
  onClose: (reason: string) => void = () => {};
  closedReason: string | null = null;
  lastMetaReceivedMs = Date.now();
  private pingTimer: NodeJS.Timeout;
  private drainWaiters: Array<() => void> = [];
  nativeForwarded = 0;
  /** Native events that came before start(). */
  private early: ReplEvent[] | null = [];

  constructor(
    private readonly data: FrameSocket,
    private readonly meta: FrameSocket,
    readonly peerNode: string,
    private pingIntervalMs: number,
    private pingTimeoutMs: number,
    /** The native transport that owns both sockets from now on, and the hub routing its events. */
    readonly nativeTransport: ReplTransport | null = null,
    private readonly hub: NativePlaneHub | null = null,
  ) {
    if (nativeTransport !== null) {
      hub!.register(nativeTransport.id, (event) => {
        if (this.early !== null) this.early.push(event);
        else this.onNativeEvent(event);
      });
    }
    data.onClose = (reason) => this.close(`data socket: ${reason}`);
    meta.onClose = (reason) => this.close(`meta socket: ${reason}`);
    data.socket.on('drain', () => {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const waiter of waiters) waiter();
    });
    this.pingTimer = setInterval(() => this.keepalive(), Math.max(10, Math.min(pingIntervalMs, pingTimeoutMs / 2)));
    this.pingTimer.unref();
  }

  /** New keepalive timers for this connection (`adjust`): the ping interval and timeout take effect now. */
  setKeepalive(pingIntervalMs: number, pingTimeoutMs: number): void {
    this.pingIntervalMs = pingIntervalMs;
    this.pingTimeoutMs = pingTimeoutMs;
    if (this.closedReason !== null) return;
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(() => this.keepalive(), Math.max(10, Math.min(pingIntervalMs, pingTimeoutMs / 2)));
    this.pingTimer.unref();
  }

  /** Starts delivering frames (queued ones first) to `listener`. Call once, after setting onClose. */
  start(listener: FrameListener): void {
    this.onFrame = listener;
    if (this.nativeTransport !== null) {
      // Frames JavaScript decoded before the hand-off come first; the native reader starts after them.
      this.data.setListener((type, flags, id, offset, body) => this.onFrame(CHANNEL_DATA, type, flags, id, offset, body));
      this.meta.setListener((type, flags, id, offset, body) => this.onMetaFrame(type, flags, id, offset, body));
      const early = this.early!;
      this.early = null;
      for (const event of early) this.onNativeEvent(event);
      if (this.closedReason === null) this.nativeTransport.start();
      return;
    }
    this.data.setListener((type, flags, id, offset, body) => this.onFrame(CHANNEL_DATA, type, flags, id, offset, body));
    this.meta.setListener((type, flags, id, offset, body) => {
      this.lastMetaReceivedMs = Date.now();
      if (type === FrameType.PING) {
        this.meta.writer.send(FrameType.PING_ACK, 0, id, 0);
        return;
      }
      if (type === FrameType.PING_ACK) return;
      this.onFrame(CHANNEL_META, type, flags, id, offset, body);
    });
  }

  private onMetaFrame(type: number, flags: number, id: number, offset: number, body: Buffer): void {
    this.lastMetaReceivedMs = Date.now();
    if (type === FrameType.PING) {
      this.send(CHANNEL_META, FrameType.PING_ACK, 0, id, 0);
      return;
    }
    if (type === FrameType.PING_ACK) return;
    this.onFrame(CHANNEL_META, type, flags, id, offset, body);
  }

  private onNativeEvent(event: ReplEvent): void {
    switch (event.kind) {
      case ReplEventKind.Frame: {
        const channel = event.channel as Channel;
        if (this.closedReason !== null) return;
        if (channel === CHANNEL_META) {
          this.onMetaFrame(event.type!, event.flags!, event.id!, event.offset!, event.body!);
          return;
        }
        if (modifyingTypes.has(event.type!)) this.nativeForwarded += 1;
        this.onFrame(CHANNEL_DATA, event.type!, event.flags!, event.id!, event.offset!, event.body!);
        return;
      }
      case ReplEventKind.Closed:
        this.close(event.reason ?? 'closed');
        return;
      case ReplEventKind.Drained: {
        const waiters = this.drainWaiters;
        this.drainWaiters = [];
        for (const waiter of waiters) waiter();
        return;
      }
      default:
        return;
    }
  }

  private keepalive(): void {
    if (this.nativeTransport !== null) {
      this.lastMetaReceivedMs = Math.max(this.lastMetaReceivedMs, this.nativeTransport.lastMetaReceivedMs);
    }
    const silentMs = Date.now() - this.lastMetaReceivedMs;
    if (silentMs > this.pingTimeoutMs) {
      this.close(`ping timeout: nothing from ${this.peerNode} for ${silentMs} ms (limit ${this.pingTimeoutMs} ms)`);
      return;
    }
    this.send(CHANNEL_META, FrameType.PING, 0, 0, 0);
  }

  send(channel: Channel, type: number, flags: number, id: number, offset: number, body?: Uint8Array): boolean {
    if (this.closedReason !== null) return false;
    if (this.nativeTransport !== null) return this.nativeTransport.sendFrame(channel, type, flags, id, offset, body);
    return (channel === CHANNEL_DATA ? this.data : this.meta).writer.send(type, flags, id, offset, body);
  }

  /** As send(); `onWritten` runs once the kernel took the frame (protocol A's completion point). */
  sendWithCallback(
    channel: Channel,
    type: number,
    flags: number,
    id: number,
    offset: number,
    body: Uint8Array,
    onWritten: () => void,
  ): void {
    if (this.closedReason !== null) return;
    if (this.nativeTransport !== null) {
      // The transport copied the frame (or wrote it): the caller's buffer is free, the frame is on its way.
      this.nativeTransport.sendFrame(channel, type, flags, id, offset, body);
      process.nextTick(onWritten);
      return;
    }
    (channel === CHANNEL_DATA ? this.data : this.meta).writer.send(type, flags, id, offset, body, () => onWritten());
  }

  sendMessage(channel: Channel, type: number, messageType: keyof typeof Messages, value: object): void {
    this.send(channel, type, 0, 0, 0, encodeMessage(Messages[messageType], value));
  }

  /**
   * Stops reading the data socket (the peer then feels TCP backpressure) while this node has too many of the
   * peer's writes still to apply; the meta socket keeps flowing, so acks and pings are unaffected.
   */
  pauseData(): void {
    if (this.nativeTransport !== null) this.nativeTransport.setPaused(true);
    else this.data.socket.pause();
  }

  resumeData(): void {
    if (this.closedReason !== null) return;
    if (this.nativeTransport !== null) this.nativeTransport.setPaused(false);
    else this.data.socket.resume();
  }

  /** Bytes written to the data socket that the kernel has not taken yet (the send queue toward the peer). */
  get dataQueuedBytes(): number {
    return this.nativeTransport !== null ? this.nativeTransport.queuedBytes(CHANNEL_DATA) : this.data.writer.queuedBytes;
  }

  /** Resolves when the data socket's user-space queue drained (or the connection closed). */
  waitDataDrain(): Promise<void> {
    if (this.closedReason !== null || this.dataQueuedBytes === 0) return Promise.resolve();
    const drained = new Promise<void>((resolve) => this.drainWaiters.push(resolve));
    this.nativeTransport?.wantDrain();
    return drained;
  }

  get sentBytes(): number {
    return this.data.writer.sentBytes + this.meta.writer.sentBytes + (this.nativeTransport?.sentBytes ?? 0);
  }

  get receivedBytes(): number {
    return this.data.decoder.receivedBytes + this.meta.decoder.receivedBytes + (this.nativeTransport?.receivedBytes ?? 0);
  }

  close(reason: string): void {
    if (this.closedReason !== null) return;
    this.closedReason = reason;
    clearInterval(this.pingTimer);
    const transport = this.nativeTransport;
    if (transport !== null) {
      // Its threads stop now; the plane marks what the peer did not confirm (events that still come are routed
      // until the threads are joined, a turn later).
      transport.close(reason);
      const id = transport.id; // read now: a destroyed transport no longer knows its id
      setImmediate(() => {
        transport.destroy();
        this.hub!.unregister(id);
      });
    }
    this.data.close(reason);
    this.meta.close(reason);
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    for (const waiter of waiters) waiter();
    this.onClose(reason);
  }
}

export type LinkState = 'StandAlone' | 'Connecting' | 'Connected';

/** Why the last connection attempt failed or the last connection ended, for `status` (not only the log). */
export interface LinkError {
  message: string;
  atMs: number;
}

interface PendingSession {
  sockets: Array<FrameSocket | undefined>;
  timer: NodeJS.Timeout;
}

/** The connector refuses the other node's session while it can dial itself: said so, and not an error. */
const DIALS_ITSELF = 'dials its peer itself';

/** A StandAlone node refuses every session: its peer is told why; its own last error (why it went StandAlone) stays. */
const NOT_CONNECTING = 'is StandAlone (not connecting)';

/** Consecutive failed dials after which the connector accepts a session the other node dialled. */
const CONNECTOR_FAILURES_BEFORE_ACCEPTING = 2;

/** Keeps one PeerConnection up while connecting is enabled. */
export class PeerLink {
  state: LinkState = 'StandAlone';
  connection: PeerConnection | null = null;
  onConnected: (connection: PeerConnection) => void = () => {};
  onDisconnected: (reason: string) => void = () => {};
  readonly side: 'connector' | 'acceptor';
  /** Reasons for dropped inbound connections (garbage, wrong secret), newest last; bounded. */
  readonly rejections: string[] = [];
  /** The newest connection failure (handshake refused, wrong secret, connection lost, refused by the daemon). */
  lastError: LinkError | null = null;
  private server: net.Server | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  private attempt = 0;
  private readonly pending = new Map<string, PendingSession>();
  private connectRetryMs: number;
  private readonly handshakeTimeoutMs: number;
  private closed = false;
  /** Who dialled the current connection: this node, or its peer. */
  private dialledBy: 'self' | 'peer' = 'self';
  /** This node's dials that failed in a row (reset by a connection). */
  private dialFailures = 0;
  /** How long the acceptor waits in Connecting before it dials too: the connector normally connects first. */
  private readonly acceptorDialDelayMs: number;

  constructor(private readonly options: PeerLinkOptions) {
    assert.notEqual(options.localNode, options.peerNode, 'a node cannot peer with itself');
    this.side = options.side ?? (options.localNode < options.peerNode ? 'connector' : 'acceptor');
    this.connectRetryMs = options.connectRetryMs ?? 300;
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? Math.max(2000, options.pingTimeoutMs);
    this.acceptorDialDelayMs = Math.max(2000, 5 * this.connectRetryMs);
  }

  /** The first dial after going Connecting: at once for the connector, later for the acceptor. */
  private firstDialDelayMs(): number {
    return this.side === 'connector' ? 0 : this.acceptorDialDelayMs;
  }

  private get log(): Logger {
    return this.options.logger;
  }

  /**
   * Starts listening on this node's address (on both sides: a port conflict is found at `up`, whichever side this
   * node is); does not connect yet. The connector accepts its peer's session only once its own dials keep
   * failing (see the file comment).
   */
  async start(): Promise<void> {
    // pauseOnConnect: nothing is read before accept() re-wraps the socket for direct reads.
    const server = net.createServer({ pauseOnConnect: true }, (socket) => this.accept(socket));
    this.server = server;
    const { host, port } = this.options.listen;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    }).catch((error: NodeJS.ErrnoException) => {
      this.server = null;
      const advice = error.code === 'EADDRINUSE' ? 'another process listens there: stop it or change this node\'s address'
        : error.code === 'EADDRNOTAVAIL' ? 'no interface of this machine has that address: check this node\'s address'
          : error.code === 'EACCES' ? 'ports below 1024 need root' : error.code ?? 'failed';
      throw new Error(`${advice} (${error.message})`, { cause: error });
    });
    server.on('error', (error) => this.log.error({ err: error }, 'peer listener failed'));
  }

  /** The port actually listened on (tests listen on port 0). */
  get listenPort(): number {
    const address = this.server?.address();
    return typeof address === 'object' && address !== null ? address.port : this.options.listen.port;
  }

  connect(): void {
    if (this.closed || this.state !== 'StandAlone') return;
    this.state = 'Connecting';
    this.scheduleAttempt(this.firstDialDelayMs());
  }

  /** `adjust`: keepalive and retry timers (now, also on the live connection) and the secret (at the next connect). */
  adjust(settings: { pingIntervalMs: number; pingTimeoutMs: number; connectRetryMs: number; sharedSecret: string }): void {
    this.options.pingIntervalMs = settings.pingIntervalMs;
    this.options.pingTimeoutMs = settings.pingTimeoutMs;
    this.options.sharedSecret = settings.sharedSecret;
    this.connectRetryMs = settings.connectRetryMs;
    this.connection?.setKeepalive(settings.pingIntervalMs, settings.pingTimeoutMs);
  }

  /**
   * Stops connecting. `failed`: the reason is an error the operator must see in `status` (a refused handshake, a
   * config mismatch, a split brain), not an operator's own disconnect.
   */
  disconnect(reason: string, options: { failed?: boolean } = {}): void {
    if (options.failed === true) this.recordError(reason);
    this.state = 'StandAlone';
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.connection?.close(reason);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.disconnect('shutting down');
    for (const session of this.pending.values()) {
      clearTimeout(session.timer);
      for (const socket of session.sockets) socket?.close('shutting down');
    }
    this.pending.clear();
    const server = this.server;
    this.server = null;
    if (server !== null) await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  private recordError(message: string): void {
    this.lastError = { message, atMs: Date.now() };
  }

  private reject(reason: string): void {
    this.log.warn({ peer: this.options.peerNode }, `peer connection dropped: ${reason}`);
    this.recordError(`inbound connection ${reason}`);
    this.rejections.push(reason);
    if (this.rejections.length > 32) this.rejections.shift();
  }

  private scheduleAttempt(delayMs: number): void {
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      void this.attemptConnect();
    }, delayMs);
  }

  private async attemptConnect(): Promise<void> {
    if (this.state !== 'Connecting' || this.closed) return;
    const attempt = ++this.attempt;
    const session = randomBytes(16);
    const sockets: FrameSocket[] = [];
    try {
      for (const channel of [CHANNEL_DATA, CHANNEL_META] as const) {
        const socket = await this.dial();
        sockets.push(socket);
        await this.connectorHandshake(socket, session, channel);
      }
    } catch (error) {
      for (const socket of sockets) socket.close('handshake failed');
      const message = (error as Error).message;
      this.dialFailures += 1;
      if (message.includes(DIALS_ITSELF)) {
        // The connector reaches us itself: nothing wrong, and nothing to retry soon.
        if (this.state === 'Connecting' && !this.closed) this.scheduleAttempt(this.acceptorDialDelayMs);
        return;
      }
      this.recordError(`connect to ${this.options.peer.host}:${this.options.peer.port}: ${message}`);
      if (attempt === 1 || attempt % 50 === 0 || !/ECONNREFUSED|ECONNRESET|closed/.test(message)) {
        this.log.info({ peer: this.options.peerNode, attempt }, `connect to peer failed: ${message}`);
      }
      if (this.state === 'Connecting' && !this.closed) this.scheduleAttempt(this.connectRetryMs);
      return;
    }
    // (A cast: TypeScript keeps the narrowing from the check above across the awaits.)
    if ((this.state as LinkState) === 'Connected' && this.side === 'connector' && this.dialledBy === 'peer' && !this.closed) {
      // Both sessions completed: the connector's wins, here and (pair() replaces) on the peer.
      this.connection?.close(`replaced by the session ${this.options.localNode} dialled (the node whose name sorts first keeps its own)`);
    }
    if (this.state !== 'Connecting' || this.closed) {
      for (const socket of sockets) socket.close('no longer connecting');
      return;
    }
    this.establish(sockets[0]!, sockets[1]!, 'self');
  }

  private dial(): Promise<FrameSocket> {
    const { host, port } = this.options.peer;
    return new Promise((resolve, reject) => {
      const frameSocket = new FrameSocket((onread) => ({ socket: net.connect({ host, port, onread }), direct: true }));
      const socket = frameSocket.socket;
      const onError = (error: Error): void => {
        clearTimeout(timer);
        reject(error);
      };
      const timer = setTimeout(() => {
        socket.off('error', onError);
        frameSocket.close(`connect to ${host}:${port} timed out`);
        socket.destroy();
        reject(new Error(`connect to ${host}:${port} timed out`));
      }, this.handshakeTimeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.off('error', onError);
        resolve(frameSocket);
      });
      socket.once('error', onError);
    });
  }

  private async connectorHandshake(socket: FrameSocket, session: Buffer, channel: Channel): Promise<void> {
    const { resource, localNode, peerNode, sharedSecret } = this.options;
    const challenge = newChallenge();
    socket.writer.send(FrameType.HELLO, 0, 0, 0, encodeMessage(Messages.Hello, {
      protocolVersion: PROTOCOL_VERSION, resource, node: localNode, peerNode, channel, challenge, session,
    }));
    const replyFrame = await socket.next(this.handshakeTimeoutMs, frameTypeName(FrameType.HELLO_REPLY));
    if (replyFrame.type === FrameType.AUTH_RESULT) {
      // Refused before any reply (an acceptor speaking another protocol version says so here).
      const refusal = decodeMessage<{ ok: boolean; reason: string }>(Messages.AuthResult, replyFrame.body);
      throw new FrameError(`peer ${peerNode} refused us: ${refusal.reason}`);
    }
    if (replyFrame.type !== FrameType.HELLO_REPLY) {
      throw new FrameError(`expected HELLO_REPLY, got ${frameTypeName(replyFrame.type)}`);
    }
    const reply = decodeMessage<HelloReplyMessage>(Messages.HelloReply, replyFrame.body);
    if (reply.protocolVersion !== PROTOCOL_VERSION) throw new FrameError(versionMismatch(peerNode, reply.protocolVersion));
    if (reply.node !== peerNode) throw new FrameError(`peer says it is node "${reply.node}", expected "${peerNode}"`);
    // Answer first so that the acceptor, too, can log a wrong secret; then check the acceptor's answer.
    socket.writer.send(FrameType.AUTH_RESPONSE, 0, 0, 0, encodeMessage(Messages.AuthResponse, {
      response: authResponse(sharedSecret, 'connector', resource, reply.challenge, session, channel),
    }));
    const expected = authResponse(sharedSecret, 'acceptor', resource, challenge, session, channel);
    if (!responseMatches(expected, reply.response)) {
      throw new FrameError(`peer ${peerNode} failed authentication (shared-secret differs)`);
    }
    const resultFrame = await expectFrame(socket, FrameType.AUTH_RESULT, this.handshakeTimeoutMs);
    const result = decodeMessage<{ ok: boolean; reason: string }>(Messages.AuthResult, resultFrame.body);
    if (!result.ok) throw new FrameError(`peer ${peerNode} refused us: ${result.reason}`);
  }

  private accept(raw: Socket): void {
    const remote = `${raw.remoteAddress}:${raw.remotePort}`;
    const socket = new FrameSocket((onread) => {
      const direct = takeOverSocket(raw, onread);
      if (direct !== null) return { socket: direct, direct: true };
      raw.resume(); // accepted paused (pauseOnConnect); 'data' chunks then
      return { socket: raw, direct: false };
    });
    this.acceptorHandshake(socket).catch((error: Error) => {
      if (error.message.includes(DIALS_ITSELF) || error.message.includes(NOT_CONNECTING)) {
        this.log.debug({ peer: this.options.peerNode, remote, reason: error.message }, 'refused the peer\'s session');
        socket.close(error.message);
        return;
      }
      this.reject(`from ${remote}: ${error.message}`);
      socket.close(error.message);
    });
  }

  private async acceptorHandshake(socket: FrameSocket): Promise<void> {
    const { resource, localNode, peerNode, sharedSecret } = this.options;
    const helloFrame = await expectFrame(socket, FrameType.HELLO, this.handshakeTimeoutMs);
    const hello = decodeMessage<HelloMessage>(Messages.Hello, helloFrame.body);
    const refuse = (reason: string): never => {
      socket.writer.send(FrameType.AUTH_RESULT, 0, 0, 0, encodeMessage(Messages.AuthResult, { ok: false, reason }));
      throw new FrameError(reason);
    };
    if (hello.protocolVersion !== PROTOCOL_VERSION) refuse(versionMismatch(hello.node, hello.protocolVersion));
    if (hello.resource !== resource) refuse(`wrong resource "${hello.resource}" (this is "${resource}")`);
    if (hello.node !== peerNode) refuse(`unknown node "${hello.node}" (the peer is "${peerNode}")`);
    if (hello.peerNode !== localNode) refuse(`peer wants node "${hello.peerNode}", this is "${localNode}"`);
    if (hello.channel !== CHANNEL_DATA && hello.channel !== CHANNEL_META) refuse(`bad channel ${hello.channel}`);
    if (hello.session.length !== 16 || hello.challenge.length < 16) refuse('malformed hello');
    const channel = hello.channel as Channel;
    const challenge = newChallenge();
    socket.writer.send(FrameType.HELLO_REPLY, 0, 0, 0, encodeMessage(Messages.HelloReply, {
      protocolVersion: PROTOCOL_VERSION,
      node: localNode,
      challenge,
      response: authResponse(sharedSecret, 'acceptor', resource, hello.challenge, hello.session, channel),
    }));
    const answerFrame = await expectFrame(socket, FrameType.AUTH_RESPONSE, this.handshakeTimeoutMs);
    const answer = decodeMessage<{ response: Buffer }>(Messages.AuthResponse, answerFrame.body);
    const expected = authResponse(sharedSecret, 'connector', resource, challenge, hello.session, channel);
    if (!responseMatches(expected, answer.response)) {
      refuse(`node ${hello.node} failed authentication (shared-secret differs)`);
    }
    if (this.state === 'StandAlone' || this.closed) refuse(`node ${localNode} ${NOT_CONNECTING}`);
    if (this.side === 'connector' && this.dialFailures < CONNECTOR_FAILURES_BEFORE_ACCEPTING) {
      refuse(`node ${localNode} ${DIALS_ITSELF} (the node whose name sorts first keeps its own session)`);
    }
    socket.writer.send(FrameType.AUTH_RESULT, 0, 0, 0, encodeMessage(Messages.AuthResult, { ok: true, reason: '' }));
    this.pair(hello.session.toString('hex'), channel, socket);
  }

  private pair(sessionKey: string, channel: Channel, socket: FrameSocket): void {
    let session = this.pending.get(sessionKey);
    if (session === undefined) {
      const timer = setTimeout(() => {
        this.pending.delete(sessionKey);
        for (const pendingSocket of session!.sockets) pendingSocket?.close('second socket never came');
      }, this.handshakeTimeoutMs);
      session = { sockets: [], timer };
      this.pending.set(sessionKey, session);
    }
    if (session.sockets[channel] !== undefined) {
      socket.close('duplicate channel');
      return;
    }
    session.sockets[channel] = socket;
    const data = session.sockets[CHANNEL_DATA];
    const meta = session.sockets[CHANNEL_META];
    if (data === undefined || meta === undefined) return;
    clearTimeout(session.timer);
    this.pending.delete(sessionKey);
    // A new authenticated session replaces an old connection: the peer restarted before we noticed.
    if (this.connection !== null) this.connection.close('replaced by a new connection from the peer');
    this.establish(data, meta, 'peer');
  }

  /**
   * Hands both authenticated sockets to a native transport: JavaScript stops reading them (what it decoded stays
   * queued for the connection, a frame it began goes along as raw bytes) and writes nothing more to them. Null
   * (JavaScript keeps them) when that cannot be done cleanly.
   */
  private handOff(data: FrameSocket, meta: FrameSocket): ReplTransport | null {
    const native = this.options.native;
    if (native === undefined) return null;
    for (const socket of [data, meta]) {
      socket.writer.flushNow();
      if (socket.socket.writableLength !== 0 || socketFd(socket.socket) < 0) return null;
    }
    try {
      const stop = (socket: Socket): void => {
        socket.pause();
        (socket as unknown as { _handle?: { readStop?: () => void } | null })._handle?.readStop?.();
      };
      stop(data.socket);
      stop(meta.socket);
      const transport = new ReplTransport(native.hub.plane, {
        dataFd: socketFd(data.socket), metaFd: socketFd(meta.socket), fileFd: native.fileFd(),
        sizeBytes: native.sizeBytes, validTypes: frameTypeTable(),
        dataLeftover: data.decoder.takePartial(), metaLeftover: meta.decoder.takePartial(),
      });
      return transport;
    } catch (error) {
      this.log.error({ err: error }, 'native transport unavailable: this connection stays in JavaScript');
      data.socket.resume();
      meta.socket.resume();
      return null;
    }
  }

  private establish(data: FrameSocket, meta: FrameSocket, dialledBy: 'self' | 'peer'): void {
    const transport = this.handOff(data, meta);
    const connection = new PeerConnection(
      data, meta, this.options.peerNode, this.options.pingIntervalMs, this.options.pingTimeoutMs,
      transport, transport === null ? null : this.options.native!.hub,
    );
    this.connection = connection;
    this.state = 'Connected';
    this.dialledBy = dialledBy;
    this.dialFailures = 0;
    this.lastError = null;
    connection.onClose = (reason) => {
      if (this.connection !== connection) return;
      this.connection = null;
      this.log.warn({ peer: this.options.peerNode }, `connection to peer lost: ${reason}`);
      // disconnect() went StandAlone first: its caller recorded the reason already, or it was the operator's.
      if (this.state !== 'StandAlone' && !this.closed) this.recordError(`connection lost: ${reason}`);
      if (this.state === 'Connected') this.state = 'Connecting';
      this.onDisconnected(reason);
      if (this.state === 'Connecting' && !this.closed) {
        this.scheduleAttempt(this.side === 'connector' ? this.connectRetryMs : this.acceptorDialDelayMs);
      }
    };
    this.log.info({ peer: this.options.peerNode, side: this.side, dialledBy, dataPath: transport === null ? 'js' : 'native' },
      'connected to peer');
    this.onConnected(connection);
  }
}
