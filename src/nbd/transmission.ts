// One NBD connection: the socket, its receive queue, the handshake (handshake.ts) and the transmission phase
// (nbdkit: protocol.c). Requests are parsed straight out of the received chunks; a WRITE payload is a
// zero-copy view when one chunk holds it all, else it is gathered once into a pooled buffer. Requests run
// concurrently and reply out of order. Replies written in one event-loop turn leave in one corked writev.
// Backpressure: past the per-connection or per-server in-flight budget the socket is paused, so a client
// that sends faster than the device completes (or that does not read its replies) cannot grow our memory.

import type { Duplex } from 'node:stream';
import * as net from 'node:net';
import * as tls from 'node:tls';
import type { Logger } from 'pino';
import type { BlockDevice, BlockDeviceCapabilities, Extent } from '../blockdev/types.js';
import { BlockDeviceError } from '../blockdev/types.js';
import { greeting, negotiate, HandshakeEnd, type ExportSettings, type NegotiatedExport } from './handshake.js';
import type { NbdLimits } from './limits.js';
import type { BufferPool } from './pool.js';
import * as P from './protocol.js';
import { DataPathStop, NbdDataPath, type DataPathResult } from '../native/index.js';

/** What a connection needs from its server. */
export interface ConnectionHost {
  readonly limits: NbdLimits;
  readonly pool: BufferPool;
  /** READ, WRITE and FLUSH may run on the native data path for devices that offer directAccess(). */
  readonly dataPathEnabled: boolean;
  /** The native data path splices payloads through pipes (else it copies them through buffers). */
  readonly dataPathSplice: boolean;
  /** Workers per connection on the native data path. */
  readonly dataPathThreads: number;
  readonly secureContext: tls.SecureContext | undefined;
  exportSettings(): ExportSettings;
  /** Adds to (or, negative, takes from) the server-wide in-flight bytes. */
  chargeServer(bytes: number): void;
  serverOverBudget(): boolean;
  /** Called when this connection paused for the server budget; the host calls resumeReading() later. */
  waitForServerBudget(connection: NbdConnection): void;
  connectionClosed(connection: NbdConnection): void;
}

const enum ReceiveState {
  Header,
  Payload,
  Discard,
}

/** Reads outside payloads land in slabs of this size, offered slabReadMinBytes to slabReadMaxBytes of room. */
const slabBytes = 1024 * 1024;
const slabReadMinBytes = 16 * 1024;
const slabReadMaxBytes = 64 * 1024;
const emptyBuffer = Buffer.alloc(0);

/** Whether this Node's net.Socket has the internals takeOverSocket relies on (a handle not yet reading). */
function takeOverPossible(socket: net.Socket): boolean {
  const handle = (socket as unknown as { _handle?: { reading?: boolean; useUserBuffer?: unknown } | null })._handle;
  return handle !== null && handle !== undefined && handle.reading !== true && typeof handle.useUserBuffer === 'function';
}

/** Extents in one BLOCK_STATUS reply at most; the client asks again for the rest. */
const blockStatusExtentsMax = 65536;
const twoTo32 = 4294967296;

let nextConnectionId = 1;

/**
 * The native data path (native/src/nbd_data_path.cc) serves READ, WRITE and FLUSH of an idle connection to a
 * device that offers directAccess(), when the server enables it (NbdServerOptions.dataPath).
 * Larger requests stay in JavaScript, whose budgets bound them; below it the path keeps one buffer per worker.
 */
const dataPathRequestBytesMax = 8 * 1024 * 1024;

export class NbdConnection {
  readonly id = nextConnectionId++;
  private socket: Duplex;
  private readonly host: ConnectionHost;
  private readonly logger: Logger;
  private phase: 'handshake' | 'transmission' | 'closed' = 'handshake';
  private tlsActive = false;

  // Receive queue: chunks as the socket delivered them; `head` and `headOffset` mark the first unread byte.
  private chunks: Buffer[] = [];
  private head = 0;
  private headOffset = 0;
  private queuedBytes = 0;

  // Handshake reads wait here for bytes.
  private waiter: { lengthBytes: number; skip: boolean; resolve: (data: Buffer) => void; reject: (error: Error) => void } | null = null;
  private handshakeTimer: NodeJS.Timeout | undefined;

  // Transmission phase.
  private negotiated: NegotiatedExport | null = null;
  private device!: BlockDevice;
  private caps!: BlockDeviceCapabilities;
  private exportSizeBytes = 0;
  private readOnly = true;
  private structured = false;
  private receiveState = ReceiveState.Header;
  private readonly headerScratch = Buffer.allocUnsafe(P.REQUEST_HEADER_BYTES);
  private requestType = 0;
  private requestFlags = 0;
  private requestCookieHigh = 0;
  private requestCookieLow = 0;
  private requestOffset = 0;
  private requestLengthBytes = 0;
  private payloadPooled: Buffer | null = null;
  private payloadTarget: Buffer | null = null;
  private payloadFilledBytes = 0;
  private discardRemainingBytes = 0;
  private discardError = 0;

  private readingStopped = false;
  private pausedForBudget = false;
  private inFlightRequests = 0;
  private inFlightBytes = 0;
  private corked = false;
  private closing = false;
  private endingSocket = false;
  private settledWaiters: Array<() => void> = [];

  private readonly onDataBound = (chunk: Buffer): void => this.onData(chunk);
  private readonly onEndBound = (): void => this.onEnd();
  private readonly onErrorBound = (error: Error): void => this.onError(error);
  private readonly onCloseBound = (): void => this.onClose();
  private readonly uncorkBound = (): void => this.onUncorkTimer();
  private uncorkScheduled = false;

  // Direct reads (plain sockets only): the kernel reads into our memory, chosen per read by nextReadBuffer().
  private slab: Buffer = emptyBuffer;
  private slabUsedBytes = 0;
  private readIntoPayload = false;
  /** The socket was re-created for direct reads: pause() then stops libuv's reads at once. */
  private directReads = false;

  // The native data path: created at the first arm, counted as one request in flight while armed.
  private dataPathPossible = false;
  private dataPath: NbdDataPath | null = null;
  private dataPathArmed = false;
  private dataPathServed = 0;
  /** The path saw the client's EOF: never arm again; libuv reads on to see it too. */
  private dataPathSawEnd = false;
  private dataPathSpliced = 0;
  /** A replicated device's plane: the path is armed only while it admits writes (else every WRITE bounces). */
  private replicationOpen: (() => boolean) | null = null;
  /** Reading stopped until the requests in flight finish, to arm the native data path (yieldToNative). */
  private yielding = false;

  /**
   * `socket` is the connection; or, for a plain socket accepted with pauseOnConnect, pass `direct: true` and
   * the connection re-wraps its handle to read directly into its own buffers (see takeOverSocket).
   */
  constructor(host: ConnectionHost, socket: Duplex, logger: Logger, options: { direct?: boolean } = {}) {
    this.host = host;
    this.logger = logger.child({ connection: this.id });
    if (options.direct === true && socket instanceof net.Socket && takeOverPossible(socket)) {
      socket = this.takeOverSocket(socket);
      this.directReads = true;
    }
    this.socket = socket;
    this.attach(socket);
    // Accepted sockets start paused (pauseOnConnect); a 'data' listener alone does not resume them.
    socket.resume();
    if (socket instanceof net.Socket) socket.setNoDelay(true);
  }

  /**
   * Re-creates the accepted socket with Node's `onread` option, which lets us choose the memory each read
   * lands in. A WRITE payload then arrives straight in its pooled buffer (no copy out of 64 KiB socket
   * chunks), and everything else lands in a slab we advance through, so small payloads stay zero-copy views.
   * net.Server cannot pass `onread` itself; the handle moves to the new Socket before any byte was read.
   */
  private takeOverSocket(accepted: net.Socket): net.Socket {
    const internals = accepted as unknown as { _handle: unknown };
    const handle = internals._handle;
    internals._handle = null;
    accepted.destroy(); // no handle any more: only the server's connection count is released
    const options = {
      handle,
      allowHalfOpen: true,
      readable: true,
      writable: true,
      onread: { buffer: () => this.nextReadBuffer(), callback: (bytes: number, buffer: Uint8Array) => this.onDirectRead(bytes, buffer) },
    };
    return new net.Socket(options as net.SocketConstructorOpts);
  }

  private nextReadBuffer(): Buffer {
    if (this.phase === 'transmission' && this.receiveState === ReceiveState.Payload && this.queuedBytes === 0) {
      this.readIntoPayload = true;
      return this.payloadTarget!.subarray(this.payloadFilledBytes);
    }
    this.readIntoPayload = false;
    if (this.slab.length - this.slabUsedBytes < slabReadMinBytes) {
      // The old slab lives on while queued chunks or zero-copy payloads still view it.
      this.slab = Buffer.allocUnsafeSlow(slabBytes);
      this.slabUsedBytes = 0;
    }
    // Bounded, so that a large WRITE payload behind a header mostly arrives by direct reads, not copies.
    return this.slab.subarray(this.slabUsedBytes, this.slabUsedBytes + slabReadMaxBytes);
  }

  private onDirectRead(bytes: number, buffer: Uint8Array): void {
    if (this.readIntoPayload) {
      // The bytes are already in place in the payload buffer; until it is full there is nothing to parse.
      this.payloadFilledBytes += bytes;
      if (this.payloadFilledBytes === this.payloadTarget!.length) {
        this.finishPayload();
        this.pump();
      }
      return;
    }
    const chunk = this.slab.subarray(this.slabUsedBytes, this.slabUsedBytes + bytes);
    if (chunk.buffer !== buffer.buffer || chunk.byteOffset !== buffer.byteOffset) {
      throw new Error('NBD direct read landed outside the buffer it was given');
    }
    this.slabUsedBytes += bytes;
    this.onData(chunk);
  }

  /** Runs the handshake, then serves requests. Never rejects: failures close the connection. */
  async startHandshake(): Promise<void> {
    this.handshakeTimer = setTimeout(() => {
      this.logger.info('handshake timed out; closing');
      this.destroy();
    }, this.host.limits.handshakeTimeoutMs);
    this.handshakeTimer.unref();
    try {
      this.socket.write(greeting());
      const negotiated = await negotiate(
        {
          read: (lengthBytes) => this.handshakeRead(lengthBytes, false),
          skip: async (lengthBytes) => { await this.handshakeRead(lengthBytes, true); },
          write: (data) => { this.socket.write(data); },
          startTls: () => this.startTls(),
        },
        () => this.host.exportSettings(),
        () => this.tlsActive,
      );
      clearTimeout(this.handshakeTimer);
      this.logger.debug({ structuredReplies: negotiated.structuredReplies, flags: negotiated.transmissionFlags }, 'transmission');
      this.enterTransmission(negotiated);
    } catch (error) {
      clearTimeout(this.handshakeTimer);
      if (error instanceof HandshakeEnd) this.logger.debug({ reason: error.message }, 'handshake ended');
      else if (this.phase !== 'closed') this.logger.info({ err: error }, 'handshake failed');
      this.endGracefully();
    }
  }

  /** A socket already past the handshake (the kernel client's): simple replies, no meta contexts. */
  adoptTransmission(device: BlockDevice, transmissionFlags: number): void {
    this.enterTransmission({ device, transmissionFlags, structuredReplies: false, baseAllocation: false });
  }

  /** Stops reading new requests, lets in-flight ones finish and their replies leave, then closes. */
  shutdown(): Promise<void> {
    if (this.phase === 'handshake') this.destroy();
    else this.stopReadingThenEnd();
    return this.settled();
  }

  /** Resolves once the socket is closed and no request is still running on the device. */
  settled(): Promise<void> {
    if (this.phase === 'closed' && this.inFlightRequests === 0) return Promise.resolve();
    return new Promise((resolve) => this.settledWaiters.push(resolve));
  }

  destroy(): void {
    this.readingStopped = true;
    if (this.dataPathArmed) this.dataPath!.abort();
    this.socket.destroy();
  }

  /** The socket this connection reads and writes (a re-created one when it took over an accepted socket). */
  get transport(): Duplex {
    return this.socket;
  }

  /** Requests the native data path served on this connection. */
  get dataPathRequests(): number {
    return this.dataPath !== null ? this.dataPath.requests : this.dataPathServed;
  }

  /** Of those, the ones whose payload was spliced (zero-copy) rather than copied through a buffer. */
  get dataPathSplicedRequests(): number {
    return this.dataPath !== null ? this.dataPath.splicedRequests : this.dataPathSpliced;
  }

  /** Called by the host when the server-wide budget has room again. */
  resumeReading(): void {
    if (!this.pausedForBudget) return;
    this.pausedForBudget = false;
    if (this.readingStopped) return;
    this.socket.resume();
    this.pump();
  }

  // ---------------------------------------------------------------- socket plumbing

  private attach(socket: Duplex): void {
    socket.on('data', this.onDataBound);
    socket.on('end', this.onEndBound);
    socket.on('error', this.onErrorBound);
    socket.on('close', this.onCloseBound);
  }

  private detach(socket: Duplex): void {
    socket.off('data', this.onDataBound);
    socket.off('end', this.onEndBound);
    socket.off('close', this.onCloseBound);
    // The error listener stays: an error on the raw socket under TLS must not become an uncaught exception.
  }

  private onData(chunk: Buffer): void {
    if (chunk.length === 0) return;
    // After DISC or shutdown we only read on to see the client's EOF; what it still sends is dropped.
    if (this.readingStopped && this.phase === 'transmission' && this.receiveState === ReceiveState.Header) return;
    this.chunks.push(chunk);
    this.queuedBytes += chunk.length;
    if (this.phase === 'handshake') this.serveWaiter();
    else if (this.phase === 'transmission') this.pump();
  }

  private onEnd(): void {
    this.logger.trace({ receiveState: this.receiveState, inFlight: this.inFlightRequests }, 'client EOF');
    // The client closed its sending side: like DISC, finish what is in flight and then close.
    if (this.phase === 'handshake') {
      this.failWaiter(new Error('client closed the connection during the handshake'));
      this.destroy();
      return;
    }
    if (this.receiveState !== ReceiveState.Header) {
      this.logger.info('client closed the connection in the middle of a WRITE payload');
      this.destroy();
      return;
    }
    this.stopReadingThenEnd();
  }

  private onError(error: Error): void {
    this.logger.debug({ err: error }, 'socket error');
    this.destroy();
  }

  private onClose(): void {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    this.readingStopped = true;
    clearTimeout(this.handshakeTimer);
    this.failWaiter(new Error('connection closed'));
    if (this.payloadPooled !== null) {
      // A WRITE whose payload never fully arrived: it was charged at its header, so it is uncharged here.
      this.host.pool.release(this.payloadPooled);
      this.payloadPooled = null;
      this.payloadTarget = null;
      this.endRequest(this.requestLengthBytes);
    }
    if (this.receiveState === ReceiveState.Discard) {
      this.receiveState = ReceiveState.Header;
      this.endRequest(0);
    }
    this.chunks = [];
    this.head = 0;
    this.queuedBytes = 0;
    if (this.pausedForBudget) this.pausedForBudget = false;
    // Closed under an armed path (the socket destroyed from outside): its workers still hold a duplicate of the
    // socket, so they are told to stop now; destroyDataPath follows when their result arrives.
    if (this.dataPathArmed) this.dataPath!.abort();
    else if (this.dataPath !== null) this.destroyDataPath();
    this.host.connectionClosed(this);
    this.checkSettled();
  }

  private async startTls(): Promise<void> {
    const context = this.host.secureContext;
    if (context === undefined) throw new HandshakeEnd('STARTTLS without a TLS context');
    if (this.queuedBytes !== 0) {
      // The client must wait for our ACK before its ClientHello; bytes already here were sent in the clear
      // after STARTTLS and could be injected by a man in the middle.
      throw new HandshakeEnd('data after STARTTLS before the TLS handshake');
    }
    const raw = this.socket;
    this.detach(raw);
    const secure = new tls.TLSSocket(raw as net.Socket, { isServer: true, secureContext: context });
    this.socket = secure;
    this.attach(secure);
    await new Promise<void>((resolve, reject) => {
      const onSecure = (): void => {
        secure.off('close', onFailure);
        resolve();
      };
      const onFailure = (): void => {
        secure.off('secure', onSecure);
        reject(new HandshakeEnd('TLS handshake failed'));
      };
      secure.once('secure', onSecure);
      secure.once('close', onFailure);
    });
    this.tlsActive = true;
    this.logger.debug('TLS established');
  }

  // ---------------------------------------------------------------- receive queue

  private consume(lengthBytes: number): void {
    this.queuedBytes -= lengthBytes;
    while (lengthBytes > 0) {
      const chunk = this.chunks[this.head]!;
      const available = chunk.length - this.headOffset;
      if (available > lengthBytes) {
        this.headOffset += lengthBytes;
        return;
      }
      lengthBytes -= available;
      this.advanceChunk();
    }
  }

  private advanceChunk(): void {
    this.chunks[this.head] = undefined as unknown as Buffer; // drop the reference for the GC
    this.head += 1;
    this.headOffset = 0;
    if (this.head === this.chunks.length) {
      this.chunks.length = 0;
      this.head = 0;
    }
  }

  /** Copies `lengthBytes` queued bytes into target at targetOffset and consumes them. */
  private copyOut(target: Buffer, targetOffset: number, lengthBytes: number): void {
    this.queuedBytes -= lengthBytes;
    while (lengthBytes > 0) {
      const chunk = this.chunks[this.head]!;
      const available = chunk.length - this.headOffset;
      const taken = available < lengthBytes ? available : lengthBytes;
      chunk.copy(target, targetOffset, this.headOffset, this.headOffset + taken);
      targetOffset += taken;
      lengthBytes -= taken;
      if (taken === available) this.advanceChunk();
      else this.headOffset += taken;
    }
  }

  private handshakeRead(lengthBytes: number, skip: boolean): Promise<Buffer> {
    if (this.phase === 'closed') return Promise.reject(new Error('connection closed'));
    return new Promise((resolve, reject) => {
      this.waiter = { lengthBytes, skip, resolve, reject };
      this.serveWaiter();
    });
  }

  private serveWaiter(): void {
    const waiter = this.waiter;
    if (waiter === null) return;
    if (waiter.skip) {
      const taken = Math.min(waiter.lengthBytes, this.queuedBytes);
      this.consume(taken);
      waiter.lengthBytes -= taken;
      if (waiter.lengthBytes > 0) return;
      this.waiter = null;
      waiter.resolve(Buffer.alloc(0));
      return;
    }
    if (this.queuedBytes < waiter.lengthBytes) return;
    const data = Buffer.allocUnsafe(waiter.lengthBytes);
    this.copyOut(data, 0, waiter.lengthBytes);
    this.waiter = null;
    waiter.resolve(data);
  }

  private failWaiter(error: Error): void {
    const waiter = this.waiter;
    if (waiter === null) return;
    this.waiter = null;
    waiter.reject(error);
  }

  // ---------------------------------------------------------------- transmission: receiving

  private enterTransmission(negotiated: NegotiatedExport): void {
    if (this.phase === 'closed') return;
    this.negotiated = negotiated;
    this.device = negotiated.device;
    this.caps = negotiated.device.capabilities();
    this.exportSizeBytes = negotiated.device.sizeBytes;
    this.readOnly = (negotiated.transmissionFlags & P.NBD_FLAG_READ_ONLY) !== 0;
    this.structured = negotiated.structuredReplies;
    this.phase = 'transmission';
    // Whether the path can be had is settled at the first arm (directAccess(), the socket's descriptor).
    this.dataPathPossible = this.host.dataPathEnabled && this.directReads && !this.tlsActive &&
      this.device.directAccess !== undefined;
    this.pump();
    this.considerDataPath();
  }

  // ---------------------------------------------------------------- transmission: the native data path

  /**
   * Hands the connection to the native data path when it is idle: nothing queued or in flight, between
   * requests, no reply waiting to leave, reading not stopped. libuv's reads stop first (pause() of a socket
   * with direct reads stops them at once), so only the path reads the socket until it hands the connection back.
   */
  private considerDataPath(): void {
    if (!this.dataPathPossible || this.dataPathArmed || this.dataPathSawEnd ||
      this.phase !== 'transmission' || this.readingStopped || this.closing || this.pausedForBudget) {
      this.stopYielding();
      return;
    }
    if (this.receiveState !== ReceiveState.Header || this.queuedBytes !== 0 || this.inFlightRequests !== 0) return;
    const socket = this.socket as net.Socket;
    if (this.corked || socket.destroyed || socket.writableLength !== 0) {
      // Replies still leaving: a connection that stopped reading to yield tries again next turn.
      if (this.yielding && !socket.destroyed) setImmediate(() => this.considerDataPath());
      return;
    }
    if (this.replicationOpen !== null && !this.replicationOpen()) {
      this.stopYielding();
      return;
    }
    if (this.dataPath === null) {
      const access = this.device.directAccess?.() ?? null;
      const fd = socketFd(socket);
      if (access === null || fd < 0) {
        this.dataPathPossible = false;
        return;
      }
      const flagsOffered = this.negotiated!.transmissionFlags;
      try {
        this.dataPath = new NbdDataPath({
          socketFd: fd,
          fileFd: access.fd,
          sizeBytes: this.exportSizeBytes,
          readOnly: this.readOnly,
          structured: this.structured,
          fuaAllowed: (flagsOffered & P.NBD_FLAG_SEND_FUA) !== 0,
          flushAllowed: (flagsOffered & P.NBD_FLAG_SEND_FLUSH) !== 0,
          requestBytesMax: Math.min(dataPathRequestBytesMax, this.host.limits.payloadMaxBytes),
          bufferBytesCap: this.host.limits.serverInFlightBytesMax,
          threads: this.host.dataPathThreads,
          spliceWrites: this.host.dataPathSplice,
          // Measured: on TCP, READ replies of page-cache pages spliced into the socket cost less CPU but came out
          // slower (0.74-0.83x nbdkit against 0.94-1.01x copying, same run); on unix sockets 2.6-2.8x.
          spliceReads: this.host.dataPathSplice && socket.remoteAddress === undefined,
          plane: access.replicationPlane,
        }, (result) => this.onDataPathStop(result));
        this.replicationOpen = access.replicationOpen ?? null;
        if (this.replicationOpen !== null && !this.replicationOpen()) {
          this.stopYielding();
          return;
        }
      } catch (error) {
        this.logger.warn({ err: error }, 'native data path unavailable; serving in JavaScript');
        this.dataPathPossible = false;
        return;
      }
    }
    socket.pause();
    if (!this.dataPath.arm()) {
      this.dataPathPossible = false;
      socket.resume();
      return;
    }
    this.dataPathArmed = true;
    this.yielding = false;
    this.beginAccounting(0);
    this.logger.trace('native data path armed');
  }

  private onDataPathStop(result: DataPathResult): void {
    if (!this.dataPathArmed) return; // a late result after destroyDataPath
    this.dataPathArmed = false;
    this.logger.trace({ reason: DataPathStop[result.reason], leftoverBytes: result.leftover?.length ?? 0 }, 'native data path stopped');
    if (result.leftover !== undefined) {
      this.chunks.push(result.leftover);
      this.queuedBytes += result.leftover.length;
    }
    switch (result.reason) {
      case DataPathStop.Handback:
        // The JavaScript parser takes the handed-back request (and whatever follows) from here.
        if (!this.readingStopped && !this.pausedForBudget) this.socket.resume();
        break;
      case DataPathStop.Stopped:
        break;
      case DataPathStop.End:
        // The client closed its side between requests. libuv reads again to see that EOF itself, so that the
        // usual end path runs (finish, end our side, close once both sides are done).
        this.dataPathSawEnd = true;
        this.socket.resume();
        break;
      default:
        this.logger.debug({ reason: DataPathStop[result.reason], errno: result.errno }, 'native data path: connection broken');
        this.destroy();
    }
    if (this.phase === 'closed') this.destroyDataPath();
    this.endRequest(0);
    this.pump();
  }

  /** The device's replication plane opened: an idle connection goes (back) to the native data path. */
  replicationOpened(): void {
    if (this.phase === 'transmission' && !this.dataPathArmed) this.considerDataPath();
  }

  /**
   * A busy connection of a replicated device whose plane is open goes back to the native data path: at a request
   * boundary with nothing buffered it stops reading, lets its requests in flight finish, and arms (endRequest ->
   * considerDataPath). Without this, a client that keeps its queue full would stay on JavaScript's path after
   * the first write handed back. True when reading stopped for that.
   */
  private yieldToNative(): boolean {
    if (this.replicationOpen === null || !this.dataPathPossible || this.dataPathArmed || this.yielding) return false;
    if (this.pausedForBudget || this.closing || !this.replicationOpen()) return false;
    this.yielding = true;
    this.socket.pause();
    if (this.inFlightRequests === 0) this.considerDataPath();
    return true;
  }

  /** Reading stopped to yield to the native path, which cannot be armed now: JavaScript reads on. */
  private stopYielding(): void {
    if (!this.yielding) return;
    this.yielding = false;
    if (!this.readingStopped && !this.pausedForBudget && !this.dataPathArmed) this.socket.resume();
  }

  private destroyDataPath(): void {
    const path = this.dataPath;
    if (path === null) return;
    this.dataPath = null;
    this.dataPathPossible = false;
    this.dataPathServed = path.requests;
    this.dataPathSpliced = path.splicedRequests;
    path.destroy();
  }


  private overBudget(): boolean {
    const limits = this.host.limits;
    return (
      this.inFlightRequests >= limits.connectionInFlightRequestsMax ||
      this.inFlightBytes >= limits.connectionInFlightBytesMax
    );
  }

  /** Parses and starts every complete request in the queue, until the budget or the queue runs out. */
  private pump(): void {
    if (this.dataPathArmed) return;
    for (;;) {
      if (this.phase !== 'transmission') return;
      if (this.receiveState === ReceiveState.Header) {
        // Stopping takes effect between requests, so a WRITE whose payload is arriving still completes.
        if (this.readingStopped) return;
        if (this.queuedBytes === 0 && this.yieldToNative()) return;
        if (this.queuedBytes < P.REQUEST_HEADER_BYTES) return;
        if (this.overBudget()) {
          this.pauseForBudget(false);
          return;
        }
        if (this.host.serverOverBudget()) {
          this.pauseForBudget(true);
          return;
        }
        let header = this.chunks[this.head]!;
        let position = this.headOffset;
        if (header.length - position >= P.REQUEST_HEADER_BYTES) {
          this.consume(P.REQUEST_HEADER_BYTES);
        } else {
          header = this.headerScratch;
          position = 0;
          this.copyOut(header, 0, P.REQUEST_HEADER_BYTES);
        }
        if (header.readUInt32BE(position) !== P.NBD_REQUEST_MAGIC) {
          this.logger.info({ magic: header.readUInt32BE(position) }, 'bad request magic; closing');
          this.destroy();
          return;
        }
        const offsetHigh = header.readUInt32BE(position + 16);
        // Offsets past 2^53 cannot be in range of any export; Infinity keeps every bounds check simple.
        const offset = offsetHigh >= 0x200000 ? Infinity : offsetHigh * twoTo32 + header.readUInt32BE(position + 20);
        this.requestFlags = header.readUInt16BE(position + 4);
        this.requestType = header.readUInt16BE(position + 6);
        this.requestCookieHigh = header.readUInt32BE(position + 8);
        this.requestCookieLow = header.readUInt32BE(position + 12);
        this.requestOffset = offset;
        this.requestLengthBytes = header.readUInt32BE(position + 24);
        this.beginRequest();
      } else if (this.receiveState === ReceiveState.Payload) {
        const target = this.payloadTarget!;
        const wanted = target.length - this.payloadFilledBytes;
        const taken = wanted < this.queuedBytes ? wanted : this.queuedBytes;
        if (taken === 0) return;
        this.copyOut(target, this.payloadFilledBytes, taken);
        this.payloadFilledBytes += taken;
        if (this.payloadFilledBytes < target.length) return;
        this.finishPayload();
      } else {
        const taken = this.discardRemainingBytes < this.queuedBytes ? this.discardRemainingBytes : this.queuedBytes;
        if (taken === 0) return;
        this.consume(taken);
        this.discardRemainingBytes -= taken;
        if (this.discardRemainingBytes > 0) return;
        this.receiveState = ReceiveState.Header;
        if (this.readingStopped) this.socket.pause();
        this.replyError(P.NBD_CMD_WRITE, this.requestCookieHigh, this.requestCookieLow, this.discardError, 0);
      }
    }
  }

  private finishPayload(): void {
    const target = this.payloadTarget!;
    const pooled = this.payloadPooled;
    this.payloadPooled = null;
    this.payloadTarget = null;
    this.receiveState = ReceiveState.Header;
    if (this.readingStopped) this.socket.pause();
    void this.runWrite(this.requestCookieHigh, this.requestCookieLow, this.requestOffset, this.requestFlags, target, pooled);
  }

  private pauseForBudget(server: boolean): void {
    if (this.pausedForBudget) return;
    this.pausedForBudget = true;
    this.socket.pause();
    if (server) this.host.waitForServerBudget(this);
  }

  private beginRequest(): void {
    const type = this.requestType;
    const lengthBytes = this.requestLengthBytes;
    if (type === P.NBD_CMD_DISC) {
      this.logger.debug('client sent DISC');
      this.stopReadingThenEnd();
      return;
    }
    const error = this.validate(type, this.requestFlags, this.requestOffset, lengthBytes);
    if (type === P.NBD_CMD_WRITE) {
      if (lengthBytes > this.host.limits.writeDisconnectBytes) {
        this.logger.info({ lengthBytes }, 'WRITE payload beyond any limit; closing');
        this.destroy();
        return;
      }
      if (error !== 0) {
        // The payload must still come off the socket, or the next "header" would be write data.
        this.beginAccounting(0);
        this.discardError = error;
        this.discardRemainingBytes = lengthBytes;
        this.receiveState = ReceiveState.Discard;
        return;
      }
      this.beginAccounting(lengthBytes);
      const chunk = this.chunks[this.head];
      if (chunk !== undefined && chunk.length - this.headOffset >= lengthBytes) {
        // Zero copy: the whole payload sits in one received chunk.
        const payload = chunk.subarray(this.headOffset, this.headOffset + lengthBytes);
        this.consume(lengthBytes);
        void this.runWrite(this.requestCookieHigh, this.requestCookieLow, this.requestOffset, this.requestFlags, payload, null);
        return;
      }
      const pooled = this.host.pool.acquire(lengthBytes);
      this.payloadPooled = pooled;
      this.payloadTarget = pooled.subarray(0, lengthBytes);
      this.payloadFilledBytes = 0;
      this.receiveState = ReceiveState.Payload;
      return;
    }
    if (error !== 0) {
      this.beginAccounting(0);
      this.replyError(type, this.requestCookieHigh, this.requestCookieLow, error, 0);
      return;
    }
    const cookieHigh = this.requestCookieHigh;
    const cookieLow = this.requestCookieLow;
    const offset = this.requestOffset;
    const flags = this.requestFlags;
    switch (type) {
      case P.NBD_CMD_READ:
        this.beginAccounting(lengthBytes);
        void this.runRead(cookieHigh, cookieLow, offset, lengthBytes);
        return;
      case P.NBD_CMD_BLOCK_STATUS:
        this.beginAccounting(0);
        void this.runBlockStatus(cookieHigh, cookieLow, offset, lengthBytes, (flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0);
        return;
      default:
        this.beginAccounting(0);
        void this.runOther(type, cookieHigh, cookieLow, offset, lengthBytes, flags);
    }
  }

  /** Checks a request at the edge (nbdkit: validate_request); 0 or the NBD error to answer with. */
  private validate(type: number, flags: number, offset: number, lengthBytes: number): number {
    const flagsOffered = this.negotiated!.transmissionFlags;
    if ((flags & ~P.NBD_CMD_FLAGS_KNOWN) !== 0) return P.NBD_EINVAL;
    if ((flags & P.NBD_CMD_FLAG_FUA) !== 0 && (flagsOffered & P.NBD_FLAG_SEND_FUA) === 0) return P.NBD_EINVAL;
    if ((flags & P.NBD_CMD_FLAG_DF) !== 0 && (type !== P.NBD_CMD_READ || !this.structured)) return P.NBD_EINVAL;
    if ((flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0 && type !== P.NBD_CMD_BLOCK_STATUS) return P.NBD_EINVAL;
    if ((flags & P.NBD_CMD_FLAG_NO_HOLE) !== 0 && type !== P.NBD_CMD_WRITE_ZEROES) return P.NBD_EINVAL;
    if ((flags & P.NBD_CMD_FLAG_FAST_ZERO) !== 0) {
      if (type !== P.NBD_CMD_WRITE_ZEROES || (flagsOffered & P.NBD_FLAG_SEND_FAST_ZERO) === 0) return P.NBD_EINVAL;
    }
    const end = offset + lengthBytes;
    const inRange = end <= this.exportSizeBytes;
    switch (type) {
      case P.NBD_CMD_READ:
        if (lengthBytes === 0 || lengthBytes > this.host.limits.payloadMaxBytes) return P.NBD_EINVAL;
        return inRange ? 0 : P.NBD_EINVAL;
      case P.NBD_CMD_WRITE:
        if (this.readOnly) return P.NBD_EPERM;
        if (lengthBytes === 0 || lengthBytes > this.host.limits.payloadMaxBytes) return P.NBD_EINVAL;
        return inRange ? 0 : P.NBD_ENOSPC;
      case P.NBD_CMD_FLUSH:
        if ((flagsOffered & P.NBD_FLAG_SEND_FLUSH) === 0) return P.NBD_EINVAL;
        return offset === 0 && lengthBytes === 0 ? 0 : P.NBD_EINVAL;
      case P.NBD_CMD_TRIM:
        if (this.readOnly) return P.NBD_EPERM;
        if ((flagsOffered & P.NBD_FLAG_SEND_TRIM) === 0 || lengthBytes === 0) return P.NBD_EINVAL;
        return inRange ? 0 : P.NBD_EINVAL;
      case P.NBD_CMD_WRITE_ZEROES:
        if (this.readOnly) return P.NBD_EPERM;
        if ((flagsOffered & P.NBD_FLAG_SEND_WRITE_ZEROES) === 0 || lengthBytes === 0) return P.NBD_EINVAL;
        return inRange ? 0 : P.NBD_ENOSPC;
      case P.NBD_CMD_CACHE:
        if ((flagsOffered & P.NBD_FLAG_SEND_CACHE) === 0 || lengthBytes === 0) return P.NBD_EINVAL;
        return inRange ? 0 : P.NBD_EINVAL;
      case P.NBD_CMD_BLOCK_STATUS:
        if (!this.negotiated!.baseAllocation || lengthBytes === 0) return P.NBD_EINVAL;
        return inRange ? 0 : P.NBD_EINVAL;
      default:
        return P.NBD_EINVAL;
    }
  }

  // ---------------------------------------------------------------- transmission: running requests

  private async runRead(cookieHigh: number, cookieLow: number, offset: number, lengthBytes: number): Promise<void> {
    const pooled = this.host.pool.acquire(lengthBytes);
    const data = pooled.subarray(0, lengthBytes);
    try {
      await this.device.read(offset, data);
    } catch (error) {
      this.host.pool.release(pooled);
      this.replyDeviceError(P.NBD_CMD_READ, cookieHigh, cookieLow, error, lengthBytes);
      return;
    }
    this.replyRead(cookieHigh, cookieLow, offset, data, pooled);
  }

  private async runWrite(
    cookieHigh: number, cookieLow: number, offset: number, flags: number, payload: Buffer, pooled: Buffer | null,
  ): Promise<void> {
    const lengthBytes = payload.length;
    let error: unknown = null;
    try {
      await this.device.write(offset, payload, (flags & P.NBD_CMD_FLAG_FUA) !== 0);
    } catch (caught) {
      error = caught;
    }
    if (pooled !== null) this.host.pool.release(pooled);
    if (error === null) this.replySimple(cookieHigh, cookieLow, 0, lengthBytes);
    else this.replyDeviceError(P.NBD_CMD_WRITE, cookieHigh, cookieLow, error, lengthBytes);
  }

  private async runOther(
    type: number, cookieHigh: number, cookieLow: number, offset: number, lengthBytes: number, flags: number,
  ): Promise<void> {
    const fua = (flags & P.NBD_CMD_FLAG_FUA) !== 0;
    try {
      switch (type) {
        case P.NBD_CMD_FLUSH:
          await this.device.flush();
          break;
        case P.NBD_CMD_TRIM:
          await this.device.trim(offset, lengthBytes, fua);
          break;
        case P.NBD_CMD_WRITE_ZEROES:
          await this.device.zero(offset, lengthBytes, {
            fua,
            noHole: (flags & P.NBD_CMD_FLAG_NO_HOLE) !== 0,
            fastZero: (flags & P.NBD_CMD_FLAG_FAST_ZERO) !== 0,
          });
          break;
        case P.NBD_CMD_CACHE:
          await this.device.cache(offset, lengthBytes);
          break;
        default:
          throw new Error(`runOther: command ${type} was not validated`);
      }
    } catch (error) {
      this.replyDeviceError(type, cookieHigh, cookieLow, error, 0);
      return;
    }
    this.replySimple(cookieHigh, cookieLow, 0, 0);
  }

  private async runBlockStatus(
    cookieHigh: number, cookieLow: number, offset: number, lengthBytes: number, requestOne: boolean,
  ): Promise<void> {
    let extents: Extent[];
    try {
      extents = this.caps.canBlockStatus
        ? await this.device.blockStatus(offset, lengthBytes)
        : [{ lengthBytes, flags: 0 }];
      if (extents.length === 0) throw new BlockDeviceError('EIO', 'blockStatus returned no extents');
    } catch (error) {
      this.replyDeviceError(P.NBD_CMD_BLOCK_STATUS, cookieHigh, cookieLow, error, 0);
      return;
    }
    const countMax = requestOne ? 1 : Math.min(extents.length, blockStatusExtentsMax);
    const reply = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_BYTES + 4 + countMax * 8);
    let position = P.STRUCTURED_REPLY_HEADER_BYTES + 4;
    let coveredBytes = 0;
    for (let index = 0; index < countMax && coveredBytes < lengthBytes; index += 1) {
      const extent = extents[index]!;
      if (!(extent.lengthBytes > 0)) {
        this.replyError(P.NBD_CMD_BLOCK_STATUS, cookieHigh, cookieLow, P.NBD_EIO, 0);
        this.logger.error({ extent }, 'device returned an empty extent');
        return;
      }
      // The last descriptor is clipped to the request so its length fits in the u32 field.
      const extentBytes = Math.min(extent.lengthBytes, lengthBytes - coveredBytes);
      reply.writeUInt32BE(extentBytes, position);
      reply.writeUInt32BE(extent.flags, position + 4);
      position += 8;
      coveredBytes += extentBytes;
    }
    this.writeStructuredHeader(reply, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_BLOCK_STATUS, cookieHigh, cookieLow,
      position - P.STRUCTURED_REPLY_HEADER_BYTES);
    reply.writeUInt32BE(P.META_CONTEXT_BASE_ALLOCATION_ID, P.STRUCTURED_REPLY_HEADER_BYTES);
    this.output(reply.subarray(0, position), null, 0);
  }

  // ---------------------------------------------------------------- transmission: replying

  private writeStructuredHeader(
    target: Buffer, flags: number, type: number, cookieHigh: number, cookieLow: number, lengthBytes: number,
  ): void {
    target.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
    target.writeUInt16BE(flags, 4);
    target.writeUInt16BE(type, 6);
    target.writeUInt32BE(cookieHigh, 8);
    target.writeUInt32BE(cookieLow, 12);
    target.writeUInt32BE(lengthBytes, 16);
  }

  private replySimple(cookieHigh: number, cookieLow: number, error: number, chargedBytes: number): void {
    const reply = Buffer.allocUnsafe(P.SIMPLE_REPLY_HEADER_BYTES);
    reply.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
    reply.writeUInt32BE(error, 4);
    reply.writeUInt32BE(cookieHigh, 8);
    reply.writeUInt32BE(cookieLow, 12);
    this.output(reply, null, chargedBytes);
  }

  private replyRead(cookieHigh: number, cookieLow: number, offset: number, data: Buffer, pooled: Buffer): void {
    let header: Buffer;
    if (this.structured) {
      header = Buffer.allocUnsafe(P.OFFSET_DATA_HEADER_BYTES);
      this.writeStructuredHeader(header, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, cookieHigh, cookieLow,
        8 + data.length);
      header.writeUInt32BE(Math.floor(offset / twoTo32), 20);
      header.writeUInt32BE(offset >>> 0, 24);
    } else {
      header = Buffer.allocUnsafe(P.SIMPLE_REPLY_HEADER_BYTES);
      header.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
      header.writeUInt32BE(0, 4);
      header.writeUInt32BE(cookieHigh, 8);
      header.writeUInt32BE(cookieLow, 12);
    }
    const alone = this.cork();
    this.socket.write(header);
    this.output(data, pooled, data.length);
    if (alone) this.uncork();
  }

  private replyDeviceError(type: number, cookieHigh: number, cookieLow: number, error: unknown, chargedBytes: number): void {
    const nbdError = P.nbdErrorFor(error);
    this.logger.debug({ command: P.commandName(type), error: P.errorName(nbdError), err: error }, 'request failed');
    this.replyError(type, cookieHigh, cookieLow, nbdError, chargedBytes);
  }

  private replyError(type: number, cookieHigh: number, cookieLow: number, error: number, chargedBytes: number): void {
    // Once structured replies are negotiated a READ (and BLOCK_STATUS) must be answered in chunks; every
    // other command may keep simple replies, which every client parses.
    if (this.structured && (type === P.NBD_CMD_READ || type === P.NBD_CMD_BLOCK_STATUS)) {
      const reply = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_BYTES + 6);
      this.writeStructuredHeader(reply, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, cookieHigh, cookieLow, 6);
      reply.writeUInt32BE(error, 20);
      reply.writeUInt16BE(0, 24);
      this.output(reply, null, chargedBytes);
      return;
    }
    this.replySimple(cookieHigh, cookieLow, error, chargedBytes);
  }

  /** Queues `data` in this turn's corked batch; ends the request's accounting once it has left. */
  private output(data: Buffer, pooled: Buffer | null, chargedBytes: number): void {
    if (this.socket.destroyed || this.phase === 'closed') {
      if (pooled !== null) this.host.pool.release(pooled);
      this.endRequest(chargedBytes);
      return;
    }
    const alone = this.cork();
    this.socket.write(data, () => {
      if (pooled !== null) this.host.pool.release(pooled);
      this.endRequest(chargedBytes);
    });
    if (alone) this.uncork();
  }

  /**
   * Corks the socket for this loop turn so that every reply completed in the turn leaves in one writev
   * (setImmediate runs after the turn's I/O callbacks). A reply with nothing else in flight has nobody to
   * wait for: true means the caller uncorks at once (queue depth 1 latency), without the setImmediate.
   */
  private cork(): boolean {
    if (this.corked) return false;
    this.corked = true;
    this.socket.cork();
    if (this.inFlightRequests <= 1) {
      this.uncorkScheduled = false;
      return true;
    }
    if (!this.uncorkScheduled) {
      this.uncorkScheduled = true;
      setImmediate(this.uncorkBound);
    }
    return false;
  }

  private uncork(): void {
    if (!this.corked) return;
    this.corked = false;
    this.socket.uncork();
  }

  private onUncorkTimer(): void {
    this.uncorkScheduled = false;
    this.uncork();
  }

  // ---------------------------------------------------------------- accounting and closing

  private beginAccounting(bytes: number): void {
    this.inFlightRequests += 1;
    this.inFlightBytes += bytes;
    this.host.chargeServer(bytes);
  }

  private endRequest(bytes: number): void {
    this.inFlightRequests -= 1;
    this.inFlightBytes -= bytes;
    this.host.chargeServer(-bytes);
    if (this.inFlightRequests < 0 || this.inFlightBytes < 0) {
      throw new Error(`NBD accounting went negative: ${this.inFlightRequests} requests, ${this.inFlightBytes} bytes`);
    }
    if (this.pausedForBudget && !this.overBudget() && !this.readingStopped) {
      this.pausedForBudget = false;
      this.socket.resume();
      this.pump();
    }
    if (this.inFlightRequests === 0) {
      if (this.closing) this.endSocketWhenDrained();
      this.checkSettled();
      this.considerDataPath();
    }
  }

  private stopReadingThenEnd(): void {
    this.readingStopped = true;
    this.closing = true;
    if (this.dataPathArmed) this.dataPath!.stop();
    if (this.receiveState === ReceiveState.Header) this.socket.pause();
    if (this.inFlightRequests === 0) this.endSocketWhenDrained();
  }

  private endSocketWhenDrained(): void {
    if (this.phase === 'closed' || this.endingSocket) return;
    this.endingSocket = true;
    if (this.receiveState !== ReceiveState.Header) {
      // A WRITE payload is half received: it cannot finish, so the connection goes now.
      this.destroy();
      return;
    }
    if (this.corked) this.uncork();
    // Our side may be ended already (kernel.ts ends the kernel's sockets itself on detach); the reads below and
    // the timer still have to run, or nothing would ever see the client's EOF and close the socket.
    if (!this.socket.writableEnded) this.socket.end();
    // Read on (discarding) so the client's EOF arrives and the half-open socket closes fully.
    this.socket.resume();
    // A client that never closes its side must not keep the connection open for ever.
    setTimeout(() => this.socket.destroy(), 5000).unref();
  }

  private endGracefully(): void {
    if (this.phase === 'closed') return;
    this.socket.end();
    setTimeout(() => this.socket.destroy(), 1000).unref();
  }

  private checkSettled(): void {
    if (this.phase !== 'closed' || this.inFlightRequests !== 0) return;
    const waiters = this.settledWaiters;
    this.settledWaiters = [];
    for (const resolve of waiters) resolve();
  }
}

function socketFd(socket: Duplex): number {
  const fd = (socket as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
  return typeof fd === 'number' ? fd : -1;
}
