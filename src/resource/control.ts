// The control socket between operator commands and a node daemon: a unix stream socket, one JSON object per
// line each way. Request {"command": "primary", "args": {"force": true}}; answer {"ok": true, "result": ...}
// or {"ok": false, "error": "message for the operator"}. Requests on one connection are answered in order.
//
// A daemon killed with SIGKILL leaves its socket file behind. listen() tells a stale file (connect refused:
// nobody listens) from a live daemon (connect succeeds) and only removes the former.
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { Logger } from '../util/log.js';
import type { Protocol } from './config.js';

export type ConnectionState =
  | 'StandAlone'
  | 'Connecting'
  | 'Connected'
  | 'SyncSource'
  | 'SyncTarget'
  | 'PausedSyncS'
  | 'PausedSyncT'
  | 'VerifyS'
  | 'VerifyT'
  | 'Ahead'
  | 'Behind'
  | 'Disconnecting';
export type DiskState = 'Diskless' | 'Attaching' | 'Inconsistent' | 'Outdated' | 'DUnknown' | 'Consistent' | 'UpToDate';
export type RoleState = 'Primary' | 'Secondary' | 'Unknown';

export interface ResyncStatus {
  direction: 'source' | 'target';
  doneBytes: number;
  totalBytes: number;
  bytesPerSecond: number;
  etaSeconds: number;
  paused: boolean;
}

export interface ResourceStatus {
  name: string;
  node: string;
  /** DRBD's node-id of this node and its device minor (events2, the handlers' DRBD_NODE_ID/DRBD_MINOR). */
  nodeId?: number;
  minor?: number;
  size: number;
  role: RoleState;
  disk: DiskState;
  connection: ConnectionState;
  peer: { node: string; nodeId?: number; role: RoleState; disk: DiskState };
  outOfSyncBytes: number;
  /** Where replicated writes run: 'native' threads or 'js' (DRBDTS_REPL_DATA_PATH). */
  replicationDataPath: 'js' | 'native';
  resync: null | ResyncStatus;
  verify?: null | { doneBytes: number; totalBytes: number; outOfSyncBlocks: number };
  protocol: Protocol;
  /** The resync rate controller's bounds in effect ([resync] rate and min-rate, `resync --rate`, `adjust`). */
  resyncRate?: { maxBytesPerSecond: number; minBytesPerSecond: number };
  counters: {
    networkSentBytes: number;
    networkReceivedBytes: number;
    diskWrittenBytes: number;
    diskReadBytes: number;
    resyncSentBytes: number;
    /** Of resyncSentBytes, the block data without frame headers. */
    resyncSentDataBytes: number;
    resyncReceivedBytes: number;
    alWrites: number;
    bmWrites: number;
    /** Dual-primary: peer writes this node (the resolver) superseded / sent back for a retry. */
    conflictsSuperseded: number;
    conflictsRetried: number;
    /** Dual-primary: this node's writes the resolver superseded / had retried; peer writes that waited. */
    writesSupersededByPeer: number;
    writesRetried: number;
    peerWritesDelayed: number;
    /** Application writes replicated on the native plane (as Primary); peer writes applied on it (as Secondary). */
    nativeWrites: number;
    nativePeerWrites: number;
  };
  pending: number;
  unacked: number;
  /** Why the last connection attempt failed or the last connection ended; null once a connection is made. */
  lastConnectionError?: null | { message: string; at: string };
  uuids?: { current: string; bitmap: string; history: [string, string] };
  /** The last split brain found at connect (the reason names the way out), until a connection succeeds. */
  splitBrain?: null | { detectedMs: number; reason: string };
}

export type ControlHandler = (command: string, args: Record<string, unknown>) => Promise<unknown>;

/**
 * A subscription (the `events` request): after its ok answer the connection carries one JSON object per line
 * from the daemon until either side closes it. `send` returns false once the subscriber is gone.
 */
export type ControlSubscriber = (send: (message: object) => boolean) => () => void;

/** The request that turns a control connection into an event stream. */
export const SUBSCRIBE_COMMAND = 'events';
/** A subscriber that lets this much queue up unread is dropped rather than growing the daemon's memory. */
const SUBSCRIBER_BACKLOG_MAX_BYTES = 4 * 1024 * 1024;

/** Longest request line accepted: control requests are tiny; a huge line is a confused or hostile client. */
const MAX_LINE_BYTES = 64 * 1024;
const MAX_CONNECTIONS = 64;

export type ControlErrorCode = 'ENODAEMON' | 'EREMOTE' | 'EPROTO' | 'ETIMEDOUT' | 'EINUSE';

export class ControlError extends Error {
  readonly code: ControlErrorCode;
  constructor(code: ControlErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ControlError';
    this.code = code;
  }
}

/** Is a process listening on this unix socket? Resolves false for refused/missing, true if it accepts. */
function probe(socketPath: string, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    const timer = setTimeout(() => {
      socket.destroy();
      // A listener that accepts but never answers is still alive (a busy daemon): not stale.
      resolve(true);
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.destroy();
      resolve(true);
    });
    socket.once('error', (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (error.code === 'ECONNREFUSED' || error.code === 'ENOENT') resolve(false);
      else reject(error);
    });
  });
}

export class ControlServer {
  readonly path: string;
  readonly #handler: ControlHandler;
  readonly #logger: Logger | undefined;
  readonly #server: net.Server;
  readonly #sockets = new Set<net.Socket>();
  #listening = false;
  readonly #subscriber: ControlSubscriber | undefined;

  constructor(socketPath: string, handler: ControlHandler, logger?: Logger, subscriber?: ControlSubscriber) {
    this.path = socketPath;
    this.#handler = handler;
    this.#logger = logger;
    this.#subscriber = subscriber;
    this.#server = net.createServer((socket) => this.#accept(socket));
    this.#server.maxConnections = MAX_CONNECTIONS;
  }

  async listen(): Promise<void> {
    assert.ok(!this.#listening, 'ControlServer.listen called twice');
    try {
      await this.#listen();
    } catch (error) {
      if (error instanceof ControlError) throw error;
      throw new ControlError('EINUSE', explainSocketError(this.path, error as NodeJS.ErrnoException, 'create'), { cause: error });
    }
  }

  async #listen(): Promise<void> {
    await fsp.mkdir(path.dirname(this.path), { recursive: true });
    let exists = true;
    try {
      const stat = await fsp.lstat(this.path);
      if (!stat.isSocket()) {
        throw new ControlError('EINUSE', `control socket ${this.path}: the path exists and is not a socket; remove it or set another "control" path`);
      }
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
      exists = false;
    }
    if (exists) {
      if (await probe(this.path, 2000)) {
        throw new ControlError('EINUSE', `another daemon is already running on control socket ${this.path} ("drbdts down" stops it)`);
      }
      this.#logger?.info({ path: this.path }, 'removing stale control socket (no daemon answers on it)');
      await fsp.unlink(this.path).catch((error: NodeJS.ErrnoException) => {
        if (error.code !== 'ENOENT') throw error;
      });
    }
    await new Promise<void>((resolve, reject) => {
      const onError = (error: NodeJS.ErrnoException): void => {
        reject(error.code === 'EADDRINUSE'
          ? new ControlError('EINUSE', `control socket ${this.path}: taken by another daemon while starting`)
          : error);
      };
      this.#server.once('error', onError);
      this.#server.listen(this.path, () => {
        this.#server.off('error', onError);
        resolve();
      });
    });
    // Operators only: the socket can promote, demote and destroy data.
    await fsp.chmod(this.path, 0o600).catch(() => undefined);
    this.#listening = true;
  }

  #accept(socket: net.Socket): void {
    this.#sockets.add(socket);
    socket.setEncoding('utf8');
    let buffered = '';
    // Answers go out in request order even when handlers finish out of order.
    let chain: Promise<void> = Promise.resolve();
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      if (buffered.length > MAX_LINE_BYTES && !buffered.includes('\n')) {
        socket.end(`${JSON.stringify({ ok: false, error: `request longer than ${MAX_LINE_BYTES} bytes` })}\n`);
        buffered = '';
        return;
      }
      let newline: number;
      while ((newline = buffered.indexOf('\n')) !== -1) {
        const line = buffered.slice(0, newline).trim();
        buffered = buffered.slice(newline + 1);
        if (line === '') continue;
        if (this.#subscriber !== undefined && isSubscribeRequest(line)) {
          // From here on the connection only carries events; whatever else the client sends is ignored.
          const subscriber = this.#subscriber;
          chain = chain.then(() => {
            if (socket.destroyed) return;
            socket.write(`${JSON.stringify({ ok: true, result: null })}\n`);
            const send = (message: object): boolean => {
              if (socket.destroyed || socket.writableEnded) return false;
              if (socket.writableLength > SUBSCRIBER_BACKLOG_MAX_BYTES) {
                // Said at the end of what is queued, so the subscriber can tell this from the daemon going down.
                socket.end(`${JSON.stringify({ event: 'overrun', backlogBytes: socket.writableLength })}\n`);
                return false;
              }
              socket.write(`${JSON.stringify(message, jsonReplacer)}\n`);
              return true;
            };
            const unsubscribe = subscriber(send);
            socket.once('close', unsubscribe);
          });
          socket.removeAllListeners('data');
          socket.on('data', () => {});
          return;
        }
        const answer = this.#answer(line);
        chain = chain.then(async () => {
          const text = await answer;
          if (!socket.destroyed) socket.write(text);
        });
      }
    });
    socket.on('error', () => socket.destroy());
    socket.on('close', () => this.#sockets.delete(socket));
  }

  async #answer(line: string): Promise<string> {
    let request: { command?: unknown; args?: unknown };
    try {
      request = JSON.parse(line) as typeof request;
    } catch {
      return `${JSON.stringify({ ok: false, error: 'request is not JSON' })}\n`;
    }
    if (typeof request !== 'object' || request === null || typeof request.command !== 'string') {
      return `${JSON.stringify({ ok: false, error: 'request needs a "command" string' })}\n`;
    }
    const args = typeof request.args === 'object' && request.args !== null && !Array.isArray(request.args)
      ? request.args as Record<string, unknown>
      : {};
    try {
      const result = await this.#handler(request.command, args);
      return `${JSON.stringify({ ok: true, result: result ?? null }, jsonReplacer)}\n`;
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      this.#logger?.info({ command: request.command, error: message }, 'control request refused');
      return `${JSON.stringify({ ok: false, error: message })}\n`;
    }
  }

  async close(): Promise<void> {
    if (!this.#listening) return;
    this.#listening = false;
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    // Let answers already written reach their clients, then drop the connections.
    for (const socket of this.#sockets) socket.end();
    const timer = setTimeout(() => {
      for (const socket of this.#sockets) socket.destroy();
    }, 1000);
    await closed;
    clearTimeout(timer);
    // net.Server unlinks its unix socket on close; make sure, without failing if it is gone already.
    await fsp.unlink(this.path).catch(() => undefined);
  }
}

function isSubscribeRequest(line: string): boolean {
  try {
    return (JSON.parse(line) as { command?: unknown }).command === SUBSCRIBE_COMMAND;
  } catch {
    return false;
  }
}

/**
 * Subscribes to a daemon's events: `onMessage` gets each object it pushes. Resolves when the daemon closes the
 * stream (it went down); rejects as sendControlRequest does when there is no daemon or it refuses.
 */
export function subscribeControl(socketPath: string, onMessage: (message: Record<string, unknown>) => void,
  options: { timeoutMs?: number } = {}): Promise<void> {
  const timeoutMs = options.timeoutMs ?? 30_000;
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    let buffered = '';
    let subscribed = false;
    let settled = false;
    const finish = (error: Error | null): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      if (error !== null) reject(error);
      else resolve();
    };
    const timer = setTimeout(() => {
      finish(new ControlError('ETIMEDOUT', `no answer to "${SUBSCRIBE_COMMAND}" from the daemon at ${socketPath} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.setEncoding('utf8');
    socket.once('connect', () => socket.write(`${JSON.stringify({ command: SUBSCRIBE_COMMAND, args: {} })}\n`));
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      let newline: number;
      while ((newline = buffered.indexOf('\n')) !== -1) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        let message: Record<string, unknown>;
        try {
          message = JSON.parse(line) as Record<string, unknown>;
        } catch {
          finish(new ControlError('EPROTO', `the daemon at ${socketPath} sent something that is not JSON`));
          return;
        }
        if (!subscribed) {
          if (message.ok !== true) {
            finish(new ControlError('EREMOTE', typeof message.error === 'string' ? message.error : 'the daemon refused the subscription'));
            return;
          }
          subscribed = true;
          clearTimeout(timer);
          continue;
        }
        if (message.event === 'overrun') {
          finish(new ControlError('EPROTO', `the daemon at ${socketPath} dropped this event stream: `
            + `${String(message.backlogBytes)} bytes of events were waiting unread`));
          return;
        }
        onMessage(message);
      }
    });
    socket.on('error', (error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT' || error.code === 'ECONNREFUSED') {
        finish(new ControlError('ENODAEMON', `no daemon at ${socketPath}`, { cause: error }));
      } else if (subscribed) {
        finish(null);
      } else {
        finish(new ControlError('EPROTO', `control socket ${socketPath}: ${error.message}`, { cause: error }));
      }
    });
    socket.on('close', () => {
      if (subscribed) finish(null);
      else finish(new ControlError('EPROTO', `the daemon at ${socketPath} closed the connection without answering "${SUBSCRIBE_COMMAND}"`));
    });
  });
}

/**
 * A control socket failure in words: which path, what the errno means there, and what to do. `create` is the
 * daemon making the socket (and its directory), `connect` a command reaching it.
 */
export function explainSocketError(socketPath: string, error: NodeJS.ErrnoException, action: 'create' | 'connect'): string {
  const directory = path.dirname(socketPath);
  const where = `control socket ${socketPath}`;
  switch (error.code) {
    case 'EACCES':
    case 'EPERM':
      return action === 'create'
        ? `${where}: permission denied creating it in ${directory}: run as a user who may write there (root for ` +
          '/run/drbdts), or set this node\'s "control" to a path you may write'
        : `${where}: permission denied: the socket is mode 0600, run the command as the user that started the daemon`;
    case 'EEXIST':
    case 'ENOTDIR':
      return `${where}: a part of ${directory} exists and is not a directory: remove it or set another "control" path`;
    case 'EROFS':
      return `${where}: ${directory} is on a read-only filesystem: set another "control" path`;
    case 'ENAMETOOLONG':
      return `${where}: the path is too long for a unix socket: set a shorter "control" path`;
    default:
      return `${where}: ${error.message}`;
  }
}

/** bigint (UUIDs) serializes as a hex string; JSON.stringify would throw. */
function jsonReplacer(_key: string, value: unknown): unknown {
  return typeof value === 'bigint' ? value.toString(16).toUpperCase().padStart(16, '0') : value;
}

export function sendControlRequest(
  socketPath: string,
  command: string,
  args: Record<string, unknown> = {},
  options: { timeoutMs?: number } = {},
): Promise<unknown> {
  const timeoutMs = options.timeoutMs ?? 30_000;
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    let buffered = '';
    let settled = false;
    const finish = (error: Error | null, result?: unknown): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      if (error !== null) reject(error);
      else resolve(result);
    };
    const timer = setTimeout(() => {
      finish(new ControlError('ETIMEDOUT', `no answer to "${command}" from the daemon at ${socketPath} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.setEncoding('utf8');
    socket.once('connect', () => socket.write(`${JSON.stringify({ command, args })}\n`));
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      const newline = buffered.indexOf('\n');
      if (newline === -1) return;
      let response: { ok?: unknown; result?: unknown; error?: unknown };
      try {
        response = JSON.parse(buffered.slice(0, newline)) as typeof response;
      } catch {
        finish(new ControlError('EPROTO', `the daemon at ${socketPath} answered with something that is not JSON`));
        return;
      }
      if (response.ok === true) finish(null, response.result);
      else finish(new ControlError('EREMOTE', typeof response.error === 'string' ? response.error : 'the daemon refused without saying why'));
    });
    socket.on('error', (error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT' || error.code === 'ECONNREFUSED') {
        finish(new ControlError('ENODAEMON', `no daemon at ${socketPath}`, { cause: error }));
      } else {
        finish(new ControlError('EPROTO', explainSocketError(socketPath, error, 'connect'), { cause: error }));
      }
    });
    socket.on('close', () => {
      finish(new ControlError('EPROTO', `the daemon at ${socketPath} closed the connection without answering "${command}"`));
    });
  });
}
