// The dirsync wire protocol between a remote replica (client) and `drbdts dirsync-server`: one byte stream
// (TCP, or ssh's stdin/stdout) carrying multiplexed calls, each with optional streamed content in either
// direction, with per-stream credit so memory stays bounded, lz4 where it pays, and a shared-secret
// challenge-response that authenticates both ends before any call is accepted.
//
// On the wire:
//   1. each side sends MAGIC (a text line, so a human or a wrong program sees what it reached);
//   2. frames: u32 payload length, u32 call id, u8 type, u8 flags, u16 zero, payload;
//      flag COMPRESSED: payload = u32 original length + lz4 block; flag STREAM: a content stream follows
//      (REQUEST: an upload from the client; RESPONSE: a download from the server);
//   3. the server sends HELLO {version, nonce, auth}, the client answers AUTH {nonce, mac}, the server AUTH_OK
//      {mac} (proving it knows the secret too) or AUTH_FAIL {message} and closes;
//   4. calls: REQUEST / RESPONSE or ERROR; content: CHUNK*, then END {json} or ABORT {code, message};
//      CREDIT (u32 bytes) lets the sender of a stream send more; CANCEL asks it to stop.
// REQUEST, RESPONSE and END payloads are u32 JSON length, JSON, then optional binary bytes.
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { createRequire } from 'node:module';
import { readFile } from 'node:fs/promises';
import type { Readable, Writable } from 'node:stream';
import type { Socket } from 'node:net';
import { connect as tlsConnect, TLSSocket, type TLSSocketOptions } from 'node:tls';
import { ReplicaError, type ReplicaErrorCode } from './replica.js';

export const PROTOCOL_VERSION = 1;
export const MAGIC = Buffer.from('DRBDTS-DIRSYNC/1\n', 'latin1');
const FRAME_HEADER_BYTES = 12;
/** A frame larger than this is a protocol violation (the sender never writes one). */
export const FRAME_PAYLOAD_MAX_BYTES = 16 << 20;
/** Content streams are cut into chunks of at most this size. */
export const STREAM_CHUNK_MAX_BYTES = 1 << 20;
/** Bytes a stream's sender may have in flight before the receiver grants more (bounds receiver memory). */
export const STREAM_WINDOW_BYTES = 4 << 20;
/** The receiver grants credit back in steps of at least this many consumed bytes. */
const CREDIT_STEP_BYTES = 1 << 20;
/** Payloads smaller than this are never compressed: the lz4 call costs more than the bytes saved. */
const COMPRESS_MIN_BYTES = 512;
/** Handshake (magic, hello, auth) must finish within this time. */
export const HANDSHAKE_TIMEOUT_MS = 15_000;

export const FrameType = {
  HELLO: 1,
  AUTH: 2,
  AUTH_OK: 3,
  AUTH_FAIL: 4,
  REQUEST: 5,
  RESPONSE: 6,
  ERROR: 7,
  CHUNK: 8,
  END: 9,
  ABORT: 10,
  CREDIT: 11,
  CANCEL: 12,
  PING: 13,
  PONG: 14,
} as const;
const FRAME_TYPE_MAX = 14;

/**
 * The client pings; a client that hears nothing (no PONG, no data) from the server for this long declares the
 * connection dead: TCP alone would take ~11 minutes to notice a black-holed path. Generous because the server
 * does file I/O synchronously and cannot answer while hashing a big batch. DRBDTS_DIRSYNC_PEER_TIMEOUT_MS
 * overrides it.
 */
export const PEER_TIMEOUT_MS = 300_000;
/** The server closes a connection from which nothing (not even a PING) arrived for this long. */
export const CLIENT_IDLE_TIMEOUT_MS = 30 * 60_000;
const FLAG_COMPRESSED = 1;
const FLAG_STREAM = 2;

interface Lz4 {
  encodeBound(size: number): number;
  encodeBlock(input: Buffer, output: Buffer): number;
  decodeBlock(input: Buffer, output: Buffer): number;
}
let lz4: Lz4 | undefined;
function getLz4(): Lz4 {
  lz4 ??= createRequire(import.meta.url)('lz4') as Lz4;
  return lz4;
}

// --- secrets

/**
 * The shared secret: from `--secret-file F` (trailing newline trimmed) or env DRBDTS_DIRSYNC_SECRET.
 * Returns undefined when neither is given. An empty or unreadable secret file is an error naming the file.
 */
export async function loadSecret(secretFile: string | undefined): Promise<Buffer | undefined> {
  if (secretFile !== undefined) {
    let text: string;
    try {
      text = await readFile(secretFile, 'utf8');
    } catch (error) {
      throw new ReplicaError('EAUTH', `cannot read secret file ${secretFile}: ${(error as Error).message}`);
    }
    const secret = text.replace(/\r?\n$/, '');
    if (secret.length === 0) throw new ReplicaError('EAUTH', `secret file ${secretFile} is empty`);
    return Buffer.from(secret, 'utf8');
  }
  const fromEnv = process.env.DRBDTS_DIRSYNC_SECRET;
  if (fromEnv !== undefined && fromEnv.length > 0) return Buffer.from(fromEnv, 'utf8');
  return undefined;
}

function mac(secret: Buffer, role: string, first: string, second: string): Buffer {
  return createHmac('sha256', secret).update(`drbdts-dirsync ${role}\n${first}\n${second}`).digest();
}

// --- TCP: encryption with TLS keyed by the shared secret (TLS-PSK: no certificates to manage)

/** TLS 1.2 PSK suites (Node's TLS-PSK is 1.2 only): AEAD ciphers, no certificates; the key is derived below. */
const TLS_PSK_OPTIONS = {
  ciphers: 'PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305',
  minVersion: 'TLSv1.2',
  maxVersion: 'TLSv1.2',
} as const;
const TLS_PSK_IDENTITY = 'drbdts-dirsync/1';

function derivePsk(secret: Buffer): Buffer {
  // A key for TLS, separate from the one the HMAC challenge uses, so neither use can leak the other.
  return createHmac('sha256', secret).update('drbdts-dirsync tls-psk v1').digest();
}

/** Reads exactly the peer's MAGIC line from a raw socket, leaving any following bytes in the socket. */
function readPeerMagic(socket: Socket, description: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let got: Buffer = EMPTY;
    const cleanup = (): void => {
      socket.off('data', onData);
      socket.off('end', onEnd);
      socket.off('error', onError);
    };
    const onData = (chunk: Buffer): void => {
      got = got.length === 0 ? chunk : Buffer.concat([got, chunk]);
      const compared = Math.min(got.length, MAGIC.length);
      if (!got.subarray(0, compared).equals(MAGIC.subarray(0, compared))) {
        cleanup();
        const seen = got.toString('latin1').replace(/[^\x20-\x7e]/g, '.').slice(0, 40);
        reject(new ReplicaError('EPROTO', `${description} is not a drbdts dirsync peer (it sent "${seen}")`));
        return;
      }
      if (got.length < MAGIC.length) return;
      cleanup();
      socket.pause();
      if (got.length > MAGIC.length) socket.unshift(got.subarray(MAGIC.length));
      resolve();
    };
    const onEnd = (): void => {
      cleanup();
      reject(new ReplicaError('ECONN', `connection to ${description} closed`));
    };
    const onError = (error: Error): void => {
      cleanup();
      reject(new ReplicaError('ECONN', `connection to ${description} failed: ${error.message}`));
    };
    socket.on('data', onData);
    socket.once('end', onEnd);
    socket.once('error', onError);
  });
}

/**
 * Turns a fresh TCP connection into an encrypted, mutually authenticated transport: both sides send MAGIC in
 * clear (so a wrong program on the other end is named at once), then TLS with a pre-shared key derived from the
 * secret. A peer with another secret fails the TLS handshake (EAUTH). The dirsync handshake then runs inside.
 */
export async function secureTcp(socket: Socket, role: 'client' | 'server', secret: Buffer, description: string): Promise<Transport> {
  const psk = derivePsk(secret);
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new ReplicaError('EPROTO', `no dirsync handshake from ${description} within ${HANDSHAKE_TIMEOUT_MS} ms`)),
      HANDSHAKE_TIMEOUT_MS,
    );
  });
  try {
    socket.write(MAGIC);
    await Promise.race([readPeerMagic(socket, description), timeout]);
    const secured: TLSSocket =
      role === 'client'
        ? tlsConnect({
            socket,
            ...TLS_PSK_OPTIONS,
            checkServerIdentity: () => undefined,
            pskCallback: () => ({ psk, identity: TLS_PSK_IDENTITY }),
          })
        : new TLSSocket(socket, {
            isServer: true,
            ...TLS_PSK_OPTIONS,
            // Supported at runtime for server-side TLSSockets; @types/node only declares it on tls.createServer.
            pskCallback: (_tlsSocket: TLSSocket, identity: string) => (identity === TLS_PSK_IDENTITY ? psk : null),
          } as unknown as TLSSocketOptions);
    await Promise.race([
      new Promise<void>((resolve, reject) => {
        secured.once(role === 'client' ? 'secureConnect' : 'secure', () => resolve());
        secured.once('error', (error: Error & { code?: string }) => reject(tlsFailure(error, role, description)));
        secured.once('close', () => reject(new ReplicaError('EAUTH', `${description} closed the connection during the TLS handshake (wrong shared secret?)`)));
      }),
      timeout,
    ]);
    return {
      input: secured,
      output: secured,
      destroy: () => {
        secured.destroy();
        socket.destroy();
      },
      description,
    };
  } catch (error) {
    socket.destroy();
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

function tlsFailure(error: Error & { code?: string }, role: 'client' | 'server', description: string): ReplicaError {
  // A different key shows up as a record that does not decrypt (bad record mac / decrypt error) on either side.
  if (/BAD_RECORD_MAC|DECRYPT|cipher operation failed|decrypt/i.test(`${error.code ?? ''} ${error.message}`)) {
    return new ReplicaError(
      'EAUTH',
      role === 'client'
        ? `${description} refused authentication: wrong shared secret`
        : `client at ${description} failed authentication (wrong shared secret)`,
    );
  }
  return new ReplicaError('EPROTO', `TLS handshake with ${description} failed: ${error.message}`);
}

// --- JSON + binary payloads

export interface Payload {
  json: unknown;
  binary?: Buffer;
}

function encodePayload(json: unknown, binary?: Buffer): Buffer[] {
  const text = Buffer.from(JSON.stringify(json ?? null), 'utf8');
  const head = Buffer.allocUnsafe(4);
  head.writeUInt32BE(text.length, 0);
  return binary !== undefined && binary.length > 0 ? [head, text, binary] : [head, text];
}

function decodePayload(payload: Buffer): Payload {
  if (payload.length < 4) throw new ReplicaError('EPROTO', `peer sent a ${payload.length}-byte message, too short`);
  const jsonLength = payload.readUInt32BE(0);
  if (jsonLength > payload.length - 4) throw new ReplicaError('EPROTO', 'peer sent a message with a bad JSON length');
  let json: unknown;
  try {
    json = JSON.parse(payload.toString('utf8', 4, 4 + jsonLength));
  } catch {
    throw new ReplicaError('EPROTO', 'peer sent a message that is not valid JSON');
  }
  const binary = payload.length > 4 + jsonLength ? payload.subarray(4 + jsonLength) : undefined;
  return binary === undefined ? { json } : { json, binary };
}

/** The error object sent in ERROR and ABORT frames; a ReplicaError keeps its code across the wire. */
export function errorToJson(error: unknown): { code: ReplicaErrorCode; message: string; path?: string } {
  if (error instanceof ReplicaError) {
    return error.path === undefined ? { code: error.code, message: error.message } : { code: error.code, message: error.message, path: error.path };
  }
  const message = error instanceof Error ? error.message : String(error);
  const errno = (error as { code?: unknown } | null)?.code;
  return { code: errno === 'EACCES' || errno === 'EPERM' ? 'EACCES' : 'EIO', message };
}

const replicaErrorCodes = new Set<string>([
  'ENOROOT', 'ECHANGED', 'EGONE', 'EHASH', 'EPATH', 'EACCES', 'EIO', 'EPROTO', 'EAUTH', 'ECONN',
]);

export function errorFromJson(json: unknown): ReplicaError {
  const object = (json ?? {}) as { code?: unknown; message?: unknown; path?: unknown };
  const code = typeof object.code === 'string' && replicaErrorCodes.has(object.code) ? (object.code as ReplicaErrorCode) : 'EPROTO';
  const message = typeof object.message === 'string' ? object.message : 'peer sent an error without a message';
  return new ReplicaError(code, message, typeof object.path === 'string' ? object.path : undefined);
}

// --- streams

/** Content to send after a REQUEST or RESPONSE: chunks, then the END JSON (e.g. the content's fingerprint). */
export interface OutgoingStream {
  chunks: AsyncIterable<Buffer>;
  /** Called after the last chunk; its value is sent in END. A rejection is sent as ABORT. */
  end(): Promise<unknown>;
  /** Called when the receiver cancels or the connection fails. */
  cancel?(): void;
}

/** Content arriving from the peer. Iterate once; `end` resolves with the END JSON after the last chunk. */
export class IncomingStream implements AsyncIterable<Buffer> {
  private readonly queue: Buffer[] = [];
  private queueHead = 0;
  private finished = false;
  private failure: Error | undefined;
  private wake: (() => void) | undefined;
  private consumedSinceCredit = 0;
  /** Bytes received and not yet credited back to the sender. */
  private unacknowledgedBytes = 0;
  private iterated = false;
  private resolveEnd!: (value: unknown) => void;
  private rejectEnd!: (error: Error) => void;
  readonly end: Promise<unknown>;

  constructor(
    private readonly connection: WireConnection,
    private readonly callId: number,
  ) {
    this.end = new Promise((resolve, reject) => {
      this.resolveEnd = resolve;
      this.rejectEnd = reject;
    });
    // Nobody may await `end` (a consumer that only iterates); keep an unobserved rejection from crashing.
    this.end.catch(() => undefined);
  }

  /** @internal */ push(chunk: Buffer): void {
    if (this.finished) return;
    // The sender may overshoot its credit by at most one chunk; more means it ignores flow control, and
    // queueing it would let a peer exhaust our memory.
    this.unacknowledgedBytes += chunk.length;
    if (this.unacknowledgedBytes > STREAM_WINDOW_BYTES + STREAM_CHUNK_MAX_BYTES) {
      throw new ReplicaError('EPROTO', 'peer sent stream data beyond its credit (flow control violated)');
    }
    this.queue.push(chunk);
    this.wake?.();
  }

  /** @internal */ finish(json: unknown): void {
    if (this.finished) return;
    this.finished = true;
    this.resolveEnd(json);
    this.wake?.();
  }

  /** @internal */ fail(error: Error): void {
    if (this.finished) return;
    this.finished = true;
    this.failure = error;
    this.rejectEnd(error);
    this.wake?.();
  }

  get isFinished(): boolean {
    return this.finished && this.queueHead >= this.queue.length;
  }

  /** Stop receiving: the sender is told to stop; queued chunks are dropped. Idempotent. */
  cancel(): void {
    if (!this.finished) {
      this.connection.sendControl(FrameType.CANCEL, this.callId);
      this.fail(new ReplicaError('EIO', 'stream cancelled by the receiver'));
    }
    this.queue.length = 0;
    this.queueHead = 0;
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Buffer> {
    if (this.iterated) throw new Error('assertion failed: an incoming stream is iterated once');
    this.iterated = true;
    try {
      for (;;) {
        if (this.queueHead < this.queue.length) {
          const chunk = this.queue[this.queueHead]!;
          this.queue[this.queueHead] = EMPTY;
          this.queueHead++;
          if (this.queueHead > 64 && this.queueHead * 2 > this.queue.length) {
            this.queue.splice(0, this.queueHead);
            this.queueHead = 0;
          }
          this.consumedSinceCredit += chunk.length;
          if (this.consumedSinceCredit >= CREDIT_STEP_BYTES && !this.finished) {
            this.connection.sendCredit(this.callId, this.consumedSinceCredit);
            this.unacknowledgedBytes -= this.consumedSinceCredit;
            this.consumedSinceCredit = 0;
          }
          yield chunk;
          continue;
        }
        if (this.finished) {
          if (this.failure !== undefined) throw this.failure;
          return;
        }
        await new Promise<void>((resolve) => {
          this.wake = resolve;
        });
        this.wake = undefined;
      }
    } finally {
      // A consumer that stops early (break, throw) cancels the sender.
      if (!this.finished) this.cancel();
    }
  }
}
const EMPTY = Buffer.alloc(0);

interface OutgoingState {
  credit: number;
  waiting: (() => void) | undefined;
  cancelled: boolean;
  stream: OutgoingStream;
}

// --- the connection

export interface Transport {
  input: Readable;
  output: Writable;
  /** Tear the transport down (destroy the socket, kill the ssh child). */
  destroy(): void;
  /** For messages: "tcp://host:port", "ssh host". */
  description: string;
}

export interface ConnectionOptions {
  /** Shared secret; required by a server that demands auth, and by a client talking to one. */
  secret?: Buffer;
  /** lz4 on the wire for payloads that shrink (default true). */
  compress?: boolean;
  /** Client: how long the server may stay silent before the connection is declared dead (default PEER_TIMEOUT_MS). */
  peerTimeoutMs?: number;
  /** How long the handshake may take (default HANDSHAKE_TIMEOUT_MS); ssh needs longer (a password prompt). */
  handshakeTimeoutMs?: number;
}

export interface IncomingRequest {
  callId: number;
  method: string;
  json: unknown;
  binary?: Buffer;
  upload?: IncomingStream;
}

export interface Reply {
  json: unknown;
  binary?: Buffer;
  stream?: IncomingStream;
}

export interface OutgoingReply {
  json: unknown;
  binary?: Buffer;
  stream?: OutgoingStream;
}

interface PendingCall {
  resolve(reply: Reply): void;
  reject(error: Error): void;
  uploadDone: boolean;
}

/** Byte counters for a connection (what crossed the wire, after compression, including framing). */
export interface WireCounters {
  bytesSent: number;
  bytesReceived: number;
  payloadBytesSent: number;
  payloadBytesReceived: number;
}

export class WireConnection {
  readonly counters: WireCounters = { bytesSent: 0, bytesReceived: 0, payloadBytesSent: 0, payloadBytesReceived: 0 };
  private readonly compress: boolean;
  private readonly pending = new Map<number, PendingCall>();
  private readonly incoming = new Map<number, IncomingStream>();
  private readonly outgoing = new Map<number, OutgoingState>();
  private nextCallId = 1;
  private closedError: Error | undefined;
  private readonly closedWaiters: Array<(error: Error) => void> = [];
  private drainWaiters: Array<() => void> = [];
  private frameHandler: (type: number, flags: number, callId: number, payload: Buffer) => void = () => undefined;
  private requestHandler: ((request: IncomingRequest) => Promise<OutgoingReply>) | undefined;
  // Receive buffer: chunks from the transport not yet parsed into frames.
  private readonly received: Buffer[] = [];
  private receivedBytes = 0;
  private magicSeen = false;
  // lz4 adaptivity: after payloads that did not shrink, skip trying for a while.
  private incompressibleStreak = 0;
  private skipCompressionCount = 0;
  private compressBuffer: Buffer | undefined;
  private lastReceivedAt = Date.now();
  private livenessTimer: NodeJS.Timeout | undefined;

  private constructor(
    private readonly transport: Transport,
    options: ConnectionOptions,
  ) {
    this.compress = options.compress ?? true;
    transport.input.on('data', (chunk: Buffer) => this.onData(chunk));
    transport.input.on('end', () => this.shutdown(new ReplicaError('ECONN', `connection to ${transport.description} closed`)));
    // A destroyed socket emits 'close' without 'end': without this, streams (a watch) would outlive it.
    transport.input.on('close', () => this.shutdown(new ReplicaError('ECONN', `connection to ${transport.description} closed`)));
    transport.input.on('error', (error) =>
      this.shutdown(new ReplicaError('ECONN', `connection to ${transport.description} failed: ${error.message}`)),
    );
    transport.output.on('error', (error) =>
      this.shutdown(new ReplicaError('ECONN', `connection to ${transport.description} failed: ${error.message}`)),
    );
    transport.output.on('drain', () => {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const wake of waiters) wake();
    });
    transport.output.write(MAGIC);
    this.counters.bytesSent += MAGIC.length;
  }

  /**
   * Liveness: the client pings every quarter of the timeout and gives up when the server stays silent longer
   * than the timeout; the server only watches for silence (a live client pings).
   */
  private startLiveness(role: 'client' | 'server', timeoutMs: number): void {
    assert(timeoutMs > 0, 'liveness timeout');
    const intervalMs = role === 'client' ? Math.max(250, Math.floor(timeoutMs / 4)) : Math.max(1000, Math.floor(timeoutMs / 10));
    this.livenessTimer = setInterval(() => {
      if (Date.now() - this.lastReceivedAt > timeoutMs) {
        this.shutdown(
          new ReplicaError('ECONN', `${this.description} did not answer for ${timeoutMs} ms (network down or peer stuck); connection dropped`),
        );
        this.transport.destroy();
        return;
      }
      if (role === 'client') this.sendControl(FrameType.PING, 0);
    }, intervalMs);
    this.livenessTimer.unref();
  }

  get description(): string {
    return this.transport.description;
  }

  /** Connects as the client: checks the server's magic, answers its challenge, checks the server's proof. */
  static async client(transport: Transport, options: ConnectionOptions): Promise<WireConnection> {
    const connection = new WireConnection(transport, options);
    try {
      await connection.withTimeout(connection.clientHandshake(options.secret), options.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS);
    } catch (error) {
      connection.shutdown(error instanceof Error ? error : new Error(String(error)));
      transport.destroy();
      throw error;
    }
    connection.frameHandler = (type, flags, callId, payload) => connection.onFrame(type, flags, callId, payload);
    const fromEnv = Number(process.env.DRBDTS_DIRSYNC_PEER_TIMEOUT_MS);
    connection.startLiveness('client', options.peerTimeoutMs ?? (fromEnv > 0 ? fromEnv : PEER_TIMEOUT_MS));
    return connection;
  }

  /** Accepts as the server: sends a challenge; with a secret, a client that cannot answer it is refused. */
  static async server(
    transport: Transport,
    options: ConnectionOptions,
    handler: (request: IncomingRequest) => Promise<OutgoingReply>,
  ): Promise<WireConnection> {
    const connection = new WireConnection(transport, options);
    try {
      await connection.withTimeout(connection.serverHandshake(options.secret), options.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS);
    } catch (error) {
      connection.shutdown(error instanceof Error ? error : new Error(String(error)));
      transport.destroy();
      throw error;
    }
    connection.requestHandler = handler;
    connection.frameHandler = (type, flags, callId, payload) => connection.onFrame(type, flags, callId, payload);
    connection.startLiveness('server', CLIENT_IDLE_TIMEOUT_MS);
    return connection;
  }

  /** Resolves with the reason once the connection is closed (by either side or by a failure). */
  closed(): Promise<Error> {
    if (this.closedError !== undefined) return Promise.resolve(this.closedError);
    return new Promise((resolve) => this.closedWaiters.push(resolve));
  }

  get isClosed(): boolean {
    return this.closedError !== undefined;
  }

  close(): void {
    this.shutdown(new ReplicaError('ECONN', `connection to ${this.transport.description} closed`));
    this.transport.output.end();
    this.transport.destroy();
  }

  // --- handshake

  private async withTimeout<T>(work: Promise<T>, timeoutMs: number): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new ReplicaError('EPROTO', `no dirsync handshake from ${this.transport.description} within ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    try {
      return await Promise.race([work, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  private nextHandshakeFrame(): Promise<{ type: number; payload: Buffer }> {
    return new Promise((resolve, reject) => {
      if (this.closedError !== undefined) {
        reject(this.closedError);
        return;
      }
      const onClose = (error: Error): void => reject(error);
      this.closedWaiters.push(onClose);
      this.frameHandler = (type, _flags, _callId, payload) => {
        this.frameHandler = () => undefined;
        const index = this.closedWaiters.indexOf(onClose);
        if (index >= 0) this.closedWaiters.splice(index, 1);
        resolve({ type, payload });
      };
    });
  }

  private async clientHandshake(secret: Buffer | undefined): Promise<void> {
    const hello = await this.nextHandshakeFrame();
    if (hello.type !== FrameType.HELLO) throw new ReplicaError('EPROTO', `${this.description}: expected HELLO, got frame type ${hello.type}`);
    const { json } = decodePayload(hello.payload);
    const { version, nonce, auth } = (json ?? {}) as { version?: unknown; nonce?: unknown; auth?: unknown };
    if (version !== PROTOCOL_VERSION || typeof nonce !== 'string') {
      throw new ReplicaError('EPROTO', `${this.description} speaks dirsync protocol version ${String(version)}, this is ${PROTOCOL_VERSION}`);
    }
    if (auth === true && secret === undefined) {
      throw new ReplicaError(
        'EAUTH',
        `${this.description} requires a shared secret: give --secret-file FILE or set DRBDTS_DIRSYNC_SECRET`,
      );
    }
    const clientNonce = randomBytes(32).toString('hex');
    const answer = secret === undefined ? {} : { nonce: clientNonce, mac: mac(secret, 'client', nonce, clientNonce).toString('hex') };
    this.sendPayload(FrameType.AUTH, 0, 0, encodePayload(answer));
    const verdict = await this.nextHandshakeFrame();
    if (verdict.type === FrameType.AUTH_FAIL) {
      const { message } = (decodePayload(verdict.payload).json ?? {}) as { message?: unknown };
      throw new ReplicaError('EAUTH', `${this.description} refused authentication: ${String(message)}`);
    }
    if (verdict.type !== FrameType.AUTH_OK) throw new ReplicaError('EPROTO', `${this.description}: expected AUTH_OK, got frame type ${verdict.type}`);
    if (secret !== undefined && auth === true) {
      // The server proves it knows the secret too, so a client never syncs with an impostor. (A server that
      // asks for no secret — ssh's stdio mode, where ssh authenticated the host — has nothing to prove.)
      const proof = (decodePayload(verdict.payload).json as { mac?: unknown } | null)?.mac;
      const expected = mac(secret, 'server', clientNonce, nonce);
      if (typeof proof !== 'string' || !safeEqualHex(proof, expected)) {
        throw new ReplicaError('EAUTH', `${this.description} did not prove it knows the shared secret (wrong secret on one side?)`);
      }
    }
  }

  private async serverHandshake(secret: Buffer | undefined): Promise<void> {
    const nonce = randomBytes(32).toString('hex');
    this.sendPayload(FrameType.HELLO, 0, 0, encodePayload({ version: PROTOCOL_VERSION, nonce, auth: secret !== undefined }));
    const auth = await this.nextHandshakeFrame();
    if (auth.type !== FrameType.AUTH) throw new ReplicaError('EPROTO', `${this.description}: expected AUTH, got frame type ${auth.type}`);
    if (secret === undefined) {
      this.sendPayload(FrameType.AUTH_OK, 0, 0, encodePayload({}));
      return;
    }
    const answer = (decodePayload(auth.payload).json ?? {}) as { nonce?: unknown; mac?: unknown };
    const ok =
      typeof answer.nonce === 'string' &&
      answer.nonce.length >= 32 &&
      answer.nonce !== nonce &&
      typeof answer.mac === 'string' &&
      safeEqualHex(answer.mac, mac(secret, 'client', nonce, answer.nonce));
    if (!ok) {
      this.sendPayload(FrameType.AUTH_FAIL, 0, 0, encodePayload({ message: 'wrong shared secret' }));
      await new Promise((resolve) => setTimeout(resolve, 50)); // let the refusal reach the client before closing
      throw new ReplicaError('EAUTH', `client at ${this.description} failed authentication (wrong shared secret)`);
    }
    this.sendPayload(FrameType.AUTH_OK, 0, 0, encodePayload({ mac: mac(secret, 'server', answer.nonce as string, nonce).toString('hex') }));
  }

  // --- client side: calls

  /** Sends a call; resolves with the reply (and its download stream, if any) or rejects with the server's error. */
  call(method: string, json: unknown, options: { binary?: Buffer; upload?: OutgoingStream } = {}): Promise<Reply> {
    if (this.closedError !== undefined) return Promise.reject(this.closedError);
    const callId = this.nextCallId;
    this.nextCallId = this.nextCallId >= 0x7fffffff ? 1 : this.nextCallId + 1;
    return new Promise<Reply>((resolve, reject) => {
      const call: PendingCall = { resolve, reject, uploadDone: options.upload === undefined };
      this.pending.set(callId, call);
      this.sendPayload(FrameType.REQUEST, options.upload ? FLAG_STREAM : 0, callId, encodePayload({ method, args: json }, options.binary));
      if (options.upload !== undefined) this.startOutgoing(callId, options.upload);
    });
  }

  // --- frames in

  private onData(chunk: Buffer): void {
    this.counters.bytesReceived += chunk.length;
    this.lastReceivedAt = Date.now();
    if (this.closedError !== undefined) return;
    this.received.push(chunk);
    this.receivedBytes += chunk.length;
    try {
      if (!this.magicSeen) {
        if (this.receivedBytes < MAGIC.length) {
          if (!MAGIC.subarray(0, this.receivedBytes).equals(this.take(this.receivedBytes, true))) this.badMagic();
          return;
        }
        const head = this.take(MAGIC.length, false);
        if (!head.equals(MAGIC)) this.badMagic(head);
        this.magicSeen = true;
      }
      while (this.receivedBytes >= FRAME_HEADER_BYTES && this.closedError === undefined) {
        const header = this.take(FRAME_HEADER_BYTES, true);
        const length = header.readUInt32BE(0);
        const callId = header.readUInt32BE(4);
        const type = header[8]!;
        const flags = header[9]!;
        if (length > FRAME_PAYLOAD_MAX_BYTES + 4 || type < 1 || type > FRAME_TYPE_MAX || header.readUInt16BE(10) !== 0) {
          throw new ReplicaError('EPROTO', `${this.description} sent a malformed frame (type ${type}, ${length} bytes): not a dirsync peer?`);
        }
        if (this.receivedBytes < FRAME_HEADER_BYTES + length) break;
        this.take(FRAME_HEADER_BYTES, false);
        let payload = this.take(length, false);
        if ((flags & FLAG_COMPRESSED) !== 0) payload = this.decompress(payload);
        this.counters.payloadBytesReceived += payload.length;
        this.frameHandler(type, flags, callId, payload);
      }
    } catch (error) {
      this.shutdown(error instanceof ReplicaError ? error : new ReplicaError('EPROTO', `${this.description}: ${(error as Error).message}`));
      this.transport.destroy();
    }
  }

  private badMagic(head?: Buffer): never {
    const seen = (head ?? Buffer.concat(this.received)).toString('latin1').replace(/[^\x20-\x7e]/g, '.').slice(0, 40);
    throw new ReplicaError('EPROTO', `${this.description} is not a drbdts dirsync peer (it sent "${seen}")`);
  }

  /** Returns the next `length` received bytes as one buffer (a view when they lie in one chunk). */
  private take(length: number, peek: boolean): Buffer {
    if (length === 0) return EMPTY;
    const first = this.received[0]!;
    let result: Buffer;
    if (first.length >= length) {
      result = first.subarray(0, length);
      if (!peek) {
        if (first.length === length) this.received.shift();
        else this.received[0] = first.subarray(length);
      }
    } else {
      result = Buffer.allocUnsafe(length);
      let copied = 0;
      let index = 0;
      while (copied < length) {
        const chunk = this.received[index]!;
        const part = Math.min(chunk.length, length - copied);
        chunk.copy(result, copied, 0, part);
        copied += part;
        if (!peek) {
          if (part === chunk.length) index++;
          else this.received[index] = chunk.subarray(part);
        } else index++;
      }
      if (!peek) this.received.splice(0, index);
    }
    if (!peek) this.receivedBytes -= length;
    return result;
  }

  private decompress(payload: Buffer): Buffer {
    if (payload.length < 4) throw new ReplicaError('EPROTO', `${this.description} sent a bad compressed frame`);
    const originalLength = payload.readUInt32BE(0);
    if (originalLength > FRAME_PAYLOAD_MAX_BYTES) throw new ReplicaError('EPROTO', `${this.description} sent an oversized compressed frame`);
    const output = Buffer.allocUnsafe(originalLength);
    const decoded = getLz4().decodeBlock(payload.subarray(4), output);
    if (decoded !== originalLength) throw new ReplicaError('EPROTO', `${this.description} sent a corrupt lz4 frame`);
    return output;
  }

  private onFrame(type: number, flags: number, callId: number, payload: Buffer): void {
    switch (type) {
      case FrameType.REQUEST: {
        if (this.requestHandler === undefined) throw new ReplicaError('EPROTO', `${this.description} sent a request to a client`);
        const { json, binary } = decodePayload(payload);
        const { method, args } = (json ?? {}) as { method?: unknown; args?: unknown };
        if (typeof method !== 'string') throw new ReplicaError('EPROTO', `${this.description} sent a request without a method`);
        let upload: IncomingStream | undefined;
        if ((flags & FLAG_STREAM) !== 0) {
          upload = new IncomingStream(this, callId);
          this.incoming.set(callId, upload);
        }
        const request: IncomingRequest = { callId, method, json: args };
        if (binary !== undefined) request.binary = binary;
        if (upload !== undefined) request.upload = upload;
        this.handleRequest(request);
        return;
      }
      case FrameType.RESPONSE:
      case FrameType.ERROR: {
        const call = this.pending.get(callId);
        if (call === undefined) throw new ReplicaError('EPROTO', `${this.description} answered call ${callId}, which is not pending`);
        this.pending.delete(callId);
        // The call is over: stop any upload the server no longer reads.
        const upload = this.outgoing.get(callId);
        if (upload !== undefined) this.cancelOutgoing(callId, upload);
        const { json, binary } = decodePayload(payload);
        if (type === FrameType.ERROR) {
          call.reject(errorFromJson(json));
          return;
        }
        const reply: Reply = { json };
        if (binary !== undefined) reply.binary = binary;
        if ((flags & FLAG_STREAM) !== 0) {
          const stream = new IncomingStream(this, callId);
          this.incoming.set(callId, stream);
          reply.stream = stream;
        }
        call.resolve(reply);
        return;
      }
      case FrameType.CHUNK: {
        const stream = this.incoming.get(callId);
        if (stream !== undefined) stream.push(payload); // a chunk for a cancelled stream is late, not an error
        return;
      }
      case FrameType.END:
      case FrameType.ABORT: {
        const stream = this.incoming.get(callId);
        if (stream === undefined) return;
        this.incoming.delete(callId);
        const { json } = decodePayload(payload);
        if (type === FrameType.END) stream.finish(json);
        else stream.fail(errorFromJson(json));
        return;
      }
      case FrameType.CREDIT: {
        const state = this.outgoing.get(callId);
        if (state === undefined) return;
        if (payload.length !== 4) throw new ReplicaError('EPROTO', `${this.description} sent a bad credit frame`);
        state.credit += payload.readUInt32BE(0);
        const wake = state.waiting;
        state.waiting = undefined;
        wake?.();
        return;
      }
      case FrameType.CANCEL: {
        const state = this.outgoing.get(callId);
        if (state !== undefined) this.cancelOutgoing(callId, state);
        return;
      }
      case FrameType.PING:
        this.sendControl(FrameType.PONG, callId);
        return;
      case FrameType.PONG:
        return; // arrival alone proves liveness (lastReceivedAt)
      default:
        throw new ReplicaError('EPROTO', `${this.description} sent frame type ${type} out of place`);
    }
  }

  private handleRequest(request: IncomingRequest): void {
    const handler = this.requestHandler!;
    void (async () => {
      let reply: OutgoingReply;
      try {
        reply = await handler(request);
        this.sendPayload(
          FrameType.RESPONSE,
          reply.stream ? FLAG_STREAM : 0,
          request.callId,
          encodePayload(reply.json, reply.binary),
        );
      } catch (error) {
        // Also a reply that cannot be sent (over the frame limit) becomes an error for the caller, never a crash.
        this.discardUpload(request);
        try {
          this.sendPayload(FrameType.ERROR, 0, request.callId, encodePayload(errorToJson(error)));
        } catch (sendError) {
          this.shutdown(new ReplicaError('EPROTO', `cannot answer ${request.method}: ${(sendError as Error).message}`));
          this.transport.destroy();
        }
        return;
      }
      this.discardUpload(request);
      if (reply.stream !== undefined) this.startOutgoing(request.callId, reply.stream);
    })();
  }

  /** After a reply, an upload nobody finished reading is cancelled so the client stops sending. */
  private discardUpload(request: IncomingRequest): void {
    if (request.upload !== undefined && !request.upload.isFinished) request.upload.cancel();
    this.incoming.delete(request.callId);
  }

  // --- frames out

  /** @internal */ sendControl(type: number, callId: number): void {
    if (this.closedError !== undefined) return;
    this.sendPayload(type, 0, callId, []);
  }

  /** @internal */ sendCredit(callId: number, bytes: number): void {
    if (this.closedError !== undefined) return;
    const payload = Buffer.allocUnsafe(4);
    payload.writeUInt32BE(bytes, 0);
    this.sendPayload(FrameType.CREDIT, 0, callId, [payload]);
  }

  /** Writes one frame (header and payload parts in one corked write). Returns false when the transport is full. */
  private sendPayload(type: number, flags: number, callId: number, parts: Buffer[], compressible = false): boolean {
    if (this.closedError !== undefined) return true;
    let length = 0;
    for (const part of parts) length += part.length;
    assert(length <= FRAME_PAYLOAD_MAX_BYTES, `frame payload of ${length} bytes`);
    this.counters.payloadBytesSent += length;
    let wireParts = parts;
    if (compressible && this.compress && length >= COMPRESS_MIN_BYTES && parts.length === 1) {
      const compressed = this.tryCompress(parts[0]!);
      if (compressed !== undefined) {
        flags |= FLAG_COMPRESSED;
        wireParts = [compressed];
        length = compressed.length;
      }
    }
    const header = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
    header.writeUInt32BE(length, 0);
    header.writeUInt32BE(callId, 4);
    header[8] = type;
    header[9] = flags;
    header.writeUInt16BE(0, 10);
    const output = this.transport.output;
    output.cork();
    let ok = output.write(header);
    for (const part of wireParts) if (part.length > 0) ok = output.write(part);
    output.uncork();
    this.counters.bytesSent += FRAME_HEADER_BYTES + length;
    return ok;
  }

  /** lz4 a payload when it pays; after repeated misses (already compressed data), stop trying for a while. */
  private tryCompress(data: Buffer): Buffer | undefined {
    if (this.skipCompressionCount > 0) {
      this.skipCompressionCount--;
      return undefined;
    }
    const codec = getLz4();
    const bound = codec.encodeBound(data.length);
    if (this.compressBuffer === undefined || this.compressBuffer.length < 4 + bound) {
      this.compressBuffer = Buffer.allocUnsafe(4 + bound);
    }
    const size = codec.encodeBlock(data, this.compressBuffer.subarray(4));
    if (size > 0 && size < data.length * 0.9) {
      this.incompressibleStreak = 0;
      // The frame is written now and the buffer reused for the next one, so hand out a copy of the bytes used.
      const out = Buffer.allocUnsafe(4 + size);
      out.writeUInt32BE(data.length, 0);
      this.compressBuffer.copy(out, 4, 4, 4 + size);
      return out;
    }
    this.incompressibleStreak++;
    if (this.incompressibleStreak >= 4) this.skipCompressionCount = 32;
    return undefined;
  }

  private waitDrain(): Promise<void> {
    if (this.closedError !== undefined) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  private startOutgoing(callId: number, stream: OutgoingStream): void {
    const state: OutgoingState = { credit: STREAM_WINDOW_BYTES, waiting: undefined, cancelled: false, stream };
    this.outgoing.set(callId, state);
    void (async () => {
      try {
        for await (const chunk of stream.chunks) {
          if (state.cancelled || this.closedError !== undefined) return;
          for (let offset = 0; offset < chunk.length; offset += STREAM_CHUNK_MAX_BYTES) {
            const piece = chunk.subarray(offset, Math.min(chunk.length, offset + STREAM_CHUNK_MAX_BYTES));
            while (state.credit <= 0 && !state.cancelled && this.closedError === undefined) {
              await new Promise<void>((resolve) => {
                state.waiting = resolve;
              });
            }
            if (state.cancelled || this.closedError !== undefined) return;
            state.credit -= piece.length;
            if (!this.sendPayload(FrameType.CHUNK, 0, callId, [piece], true)) await this.waitDrain();
          }
        }
        if (state.cancelled) return;
        const endJson = await stream.end();
        if (state.cancelled) return;
        this.sendPayload(FrameType.END, 0, callId, encodePayload(endJson ?? null));
      } catch (error) {
        if (!state.cancelled) this.sendPayload(FrameType.ABORT, 0, callId, encodePayload(errorToJson(error)));
      } finally {
        this.outgoing.delete(callId);
      }
    })();
  }

  private cancelOutgoing(callId: number, state: OutgoingState): void {
    if (state.cancelled) return;
    state.cancelled = true;
    this.outgoing.delete(callId);
    const wake = state.waiting;
    state.waiting = undefined;
    wake?.();
    try {
      state.stream.cancel?.();
    } catch {
      // cancelling is best effort; the stream's owner reports its own failures
    }
  }

  private shutdown(error: Error): void {
    if (this.closedError !== undefined) return;
    this.closedError = error;
    clearInterval(this.livenessTimer);
    for (const call of this.pending.values()) call.reject(error);
    this.pending.clear();
    for (const stream of this.incoming.values()) stream.fail(error);
    this.incoming.clear();
    for (const [callId, state] of this.outgoing) this.cancelOutgoing(callId, state);
    const drains = this.drainWaiters;
    this.drainWaiters = [];
    for (const wake of drains) wake();
    const waiters = this.closedWaiters.splice(0);
    for (const wake of waiters) wake(error);
    this.frameHandler = () => undefined;
  }
}

function safeEqualHex(text: string, expected: Buffer): boolean {
  if (!/^[0-9a-f]+$/.test(text) || text.length !== expected.length * 2) return false;
  return timingSafeEqual(Buffer.from(text, 'hex'), expected);
}

function assert(condition: unknown, what: string): asserts condition {
  if (!condition) throw new Error(`assertion failed: ${what}`);
}

// --- JSON records inside a content stream (scan batches): u32 length + JSON, so a stream's chunk boundaries
// (which the wire may cut anywhere) do not matter.

/** Limit on one record: a scan batch is far smaller; a bigger one means a confused peer. */
export const RECORD_MAX_BYTES = 64 << 20;

export function encodeRecord(json: unknown): Buffer {
  const text = JSON.stringify(json);
  const length = Buffer.byteLength(text, 'utf8');
  const out = Buffer.allocUnsafe(4 + length);
  out.writeUInt32BE(length, 0);
  out.write(text, 4, 'utf8');
  return out;
}

export async function* decodeRecords(chunks: AsyncIterable<Buffer>): AsyncGenerator<unknown> {
  let pending: Buffer = EMPTY;
  for await (const chunk of chunks) {
    pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
    let offset = 0;
    while (pending.length - offset >= 4) {
      const length = pending.readUInt32BE(offset);
      if (length > RECORD_MAX_BYTES) throw new ReplicaError('EPROTO', `peer sent a ${length}-byte record, over the limit`);
      if (pending.length - offset - 4 < length) break;
      let json: unknown;
      try {
        json = JSON.parse(pending.toString('utf8', offset + 4, offset + 4 + length));
      } catch {
        throw new ReplicaError('EPROTO', 'peer sent a record that is not valid JSON');
      }
      offset += 4 + length;
      yield json;
    }
    pending = pending.subarray(offset);
  }
  if (pending.length > 0) throw new ReplicaError('EPROTO', 'peer sent a truncated record');
}
