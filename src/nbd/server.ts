// The NBD server: listeners (TCP and unix sockets), TLS settings, the set of connections, the server-wide
// in-flight budget, and a graceful close. It knows only the BlockDevice interface; handshake.ts and
// transmission.ts hold the protocol.

import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';
import type { Duplex } from 'node:stream';
import { pino, type Logger } from 'pino';
import type { BlockDevice } from '../blockdev/types.js';
import { formatListenAddress, type ListenAddress } from './address.js';
import { transmissionFlagsFor, type ExportSettings } from './handshake.js';
import { resolveLimits, type NbdLimits } from './limits.js';
import { BufferPool } from './pool.js';
import { setSocketBufferBytes } from '../native/index.js';
import { NbdConnection, type ConnectionHost } from './transmission.js';

export type { ListenAddress } from './address.js';
export type { NbdLimits } from './limits.js';

export interface NbdServerOptions {
  device: BlockDevice;
  exportName?: string;
  description?: string;
  readOnly?: boolean;
  tls?: { certPath: string; keyPath: string };
  logger?: Logger;
  limits?: Partial<NbdLimits>;
  /**
   * Where READ, WRITE and FLUSH run for a device that offers directAccess() (LocalDisk): 'native' (the default,
   * or DRBDTS_NBD_DATA_PATH=js for 'javascript') serves them on native threads per connection
   * (native/src/nbd_data_path.cc); 'javascript' keeps every request on the event loop.
   */
  dataPath?: 'native' | 'javascript';
  /**
   * The native data path moves payloads with splice through a pipe per worker (default true, or
   * DRBDTS_NBD_SPLICE=0 for false): a WRITE is copied once, into the page cache, a READ not at all.
   */
  dataPathSplice?: boolean;
  /** Runs before a client is given the export (handshake.ts ExportSettings.beforeExport). */
  beforeExport?: () => Promise<void>;
  /** Called when a client connection has closed, with the number still open. */
  onConnectionClosed?: (remaining: number) => void;
}

/** How long close() lets connections finish their in-flight requests before cutting them. */
const closeGraceMs = 30_000;

export class NbdServer {
  private device: BlockDevice;
  private readonly exportName: string;
  private readonly description: string | undefined;
  private readonly readOnly: boolean;
  private readonly logger: Logger;
  private readonly limits: NbdLimits;
  private readonly pool: BufferPool;
  private readonly secureContext: tls.SecureContext | undefined;
  private readonly listeners: Array<{ server: net.Server; address: ListenAddress }> = [];
  private readonly connections = new Set<NbdConnection>();
  /** Who each connection is, for an operator told that the export is open (`down` refused). */
  private readonly clientInfo = new WeakMap<NbdConnection, { remote: string; sinceMs: number; kernel: boolean }>();
  private readonly waitingForBudget = new Set<NbdConnection>();
  private serverInFlightBytes = 0;
  private closedConnectionsDataPathRequests = 0;
  private closedConnectionsDataPathSpliced = 0;
  private closed = false;
  private readonly host: ConnectionHost;

  constructor(options: NbdServerOptions) {
    this.device = options.device;
    this.exportName = options.exportName ?? '';
    this.description = options.description;
    this.readOnly = options.readOnly ?? false;
    this.logger = options.logger ?? pino({ level: 'silent' });
    this.limits = resolveLimits(options.limits);
    if (Buffer.byteLength(this.exportName) > this.limits.stringMaxBytes) {
      throw new Error(`export name is longer than ${this.limits.stringMaxBytes} bytes`);
    }
    this.pool = new BufferPool({ pooledBytesMax: Math.min(this.limits.serverInFlightBytesMax, 256 * 1024 * 1024) });
    if (options.tls !== undefined) {
      this.secureContext = loadSecureContext(options.tls.certPath, options.tls.keyPath);
    }
    const server = this;
    this.host = {
      limits: this.limits,
      pool: this.pool,
      dataPathSplice: options.dataPathSplice ?? envSwitch('DRBDTS_NBD_SPLICE'),
      dataPathThreads: dataPathThreadsFromEnv(),
      dataPathEnabled: (options.dataPath ?? dataPathFromEnv()) === 'native',
      secureContext: this.secureContext,
      exportSettings: (): ExportSettings => ({
        exportName: server.exportName,
        description: server.description,
        device: server.device,
        readOnly: server.readOnly,
        tlsConfigured: server.secureContext !== undefined,
        limits: server.limits,
        logger: server.logger,
        beforeExport: options.beforeExport,
      }),
      chargeServer: (bytes: number): void => server.chargeServer(bytes),
      serverOverBudget: (): boolean => server.serverInFlightBytes >= server.limits.serverInFlightBytesMax,
      waitForServerBudget: (connection: NbdConnection): void => { server.waitingForBudget.add(connection); },
      connectionClosed: (connection: NbdConnection): void => {
        server.connections.delete(connection);
        server.closedConnectionsDataPathRequests += connection.dataPathRequests;
        server.closedConnectionsDataPathSpliced += connection.dataPathSplicedRequests;
        server.waitingForBudget.delete(connection);
        server.logger.info({
          connection: connection.id, connections: server.connections.size, nativeRequests: connection.dataPathRequests,
          splicedRequests: connection.dataPathSplicedRequests,
        }, 'client disconnected');
        options.onConnectionClosed?.(server.connections.size);
      },
    };
  }

  get activeConnections(): number {
    return this.connections.size;
  }

  /** The open connections: the client's address (a unix socket's path: its peer has no address), since when. */
  get clients(): Array<{ id: number; remote: string; since: string; kernel: boolean }> {
    return [...this.connections].map((connection) => {
      const info = this.clientInfo.get(connection) ?? { remote: 'unknown', sinceMs: 0, kernel: false };
      return { id: connection.id, remote: info.remote, since: new Date(info.sinceMs).toISOString(), kernel: info.kernel };
    });
  }

  /** Requests the native data path has served, over every connection so far. */
  get dataPathRequests(): number {
    let requests = this.closedConnectionsDataPathRequests;
    for (const connection of this.connections) requests += connection.dataPathRequests;
    return requests;
  }

  /** Of those, the ones whose payload was spliced through a pipe. */
  get dataPathSplicedRequests(): number {
    let requests = this.closedConnectionsDataPathSpliced;
    for (const connection of this.connections) requests += connection.dataPathSplicedRequests;
    return requests;
  }

  /** The addresses actually bound (a TCP port 0 replaced by the port the OS chose). */
  get addresses(): string[] {
    return this.listeners.map(({ server, address }) => {
      const bound = server.address();
      if (address.kind === 'tcp' && bound !== null && typeof bound === 'object') {
        return formatListenAddress({ kind: 'tcp', host: address.host, port: bound.port });
      }
      return formatListenAddress(address);
    });
  }

  /** The device's replication plane opened: idle connections go (back) to the native data path. */
  replicationOpened(): void {
    for (const connection of this.connections) connection.replicationOpened();
  }

  /** Swaps the device for new connections (a role change); connections already open keep theirs. */
  setDevice(device: BlockDevice): void {
    this.device = device;
  }

  async listen(address: ListenAddress): Promise<void> {
    if (this.closed) throw new Error('NbdServer.listen: the server is closed');
    if (address.kind === 'unix') await removeStaleSocket(address.path);
    // pauseOnConnect: no byte is read before the connection decides how it reads (see NbdConnection).
    const server = net.createServer({ noDelay: true, allowHalfOpen: true, pauseOnConnect: true }, (socket) => this.accept(socket, address));
    if (address.kind === 'unix') {
      // bind() in a missing directory fails with a bare errno (EACCES or ENOENT): name the directory instead.
      const directory = path.dirname(address.path);
      if (!fs.existsSync(directory)) {
        throw new Error(`cannot listen on unix:${address.path}: the directory ${directory} does not exist (create it, or choose another path)`);
      }
    }
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      const done = (): void => {
        server.off('error', reject);
        resolve();
      };
      if (address.kind === 'unix') server.listen(address.path, done);
      else server.listen(address.port, address.host, done);
    }).catch((error: NodeJS.ErrnoException) => {
      throw new Error(`cannot listen on ${formatListenAddress(address)}: ${error.message}`, { cause: error });
    });
    server.on('error', (error) => this.logger.error({ err: error }, 'listener error'));
    this.listeners.push({ server, address });
    this.logger.info({ address: this.addresses[this.addresses.length - 1], export: this.exportName }, 'listening');
  }

  /**
   * Serves a socket that is already past the handshake (the kernel client): simple replies only. A net.Socket
   * made with `pauseOnCreate` (not reading yet) is re-created for direct reads, which the native data path needs;
   * the socket returned is the one the connection uses (end or destroy that one).
   */
  adoptTransmissionSocket(socket: net.Socket | Duplex): Duplex {
    if (this.closed) {
      socket.destroy();
      return socket;
    }
    const connection = new NbdConnection(this.host, socket, this.logger, { direct: socket instanceof net.Socket });
    this.connections.add(connection);
    this.clientInfo.set(connection, { remote: 'the kernel NBD client', sinceMs: Date.now(), kernel: true });
    connection.adoptTransmission(this.device, transmissionFlagsFor(this.device, this.readOnly, false));
    return connection.transport;
  }

  /** Stops accepting, lets in-flight requests finish, flushes the device and closes every connection. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const listenersClosed = this.listeners.map(({ server, address }) => new Promise<void>((resolve) => {
      server.close(() => resolve());
      if (address.kind === 'unix') fs.rmSync(address.path, { force: true });
    }));
    const connections = [...this.connections];
    const drained = Promise.all(connections.map((connection) => connection.shutdown()));
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(true), closeGraceMs);
    });
    if (await Promise.race([drained.then(() => false), timedOut])) {
      this.logger.warn('connections did not finish in time; closing them');
      for (const connection of connections) connection.destroy();
      await Promise.all(connections.map((connection) => connection.settled()));
    }
    clearTimeout(timer);
    await Promise.all(listenersClosed);
    const caps = this.device.capabilities();
    if (caps.canFlush && !caps.readOnly && !this.readOnly) {
      await this.device.flush();
    }
    this.logger.info('NBD server closed');
  }

  private accept(socket: net.Socket, address: ListenAddress): void {
    if (this.closed || this.connections.size >= this.limits.connectionsMax) {
      this.logger.warn({ connections: this.connections.size }, 'refusing connection');
      socket.destroy();
      return;
    }
    const remote = socket.remoteAddress ?? 'unix';
    if (socket.remoteAddress === undefined) raiseUnixSendBuffer(socket);
    // Direct reads into our own buffers, except under TLS, where TLSSocket must own the handle's reads.
    const connection = new NbdConnection(this.host, socket, this.logger, { direct: this.secureContext === undefined });
    this.connections.add(connection);
    this.clientInfo.set(connection, {
      remote: socket.remoteAddress === undefined ? `a client on ${formatListenAddress(address)}` : `${remote}:${socket.remotePort}`,
      sinceMs: Date.now(), kernel: false,
    });
    this.logger.info({ connection: connection.id, remote, connections: this.connections.size }, 'client connected');
    void connection.startHandshake();
  }

  private chargeServer(bytes: number): void {
    this.serverInFlightBytes += bytes;
    if (bytes < 0 && this.waitingForBudget.size > 0 && this.serverInFlightBytes < this.limits.serverInFlightBytesMax) {
      const waiting = [...this.waitingForBudget];
      this.waitingForBudget.clear();
      for (const connection of waiting) connection.resumeReading();
    }
  }
}

/** DRBDTS_NBD_DATA_PATH: native (the default) or js; anything else is an error naming the variable. */
function dataPathFromEnv(): 'native' | 'javascript' {
  const value = process.env.DRBDTS_NBD_DATA_PATH;
  if (value === undefined || value === '' || value === 'native') return 'native';
  if (value === 'js' || value === 'javascript') return 'javascript';
  throw new Error(`DRBDTS_NBD_DATA_PATH must be "native" or "js", got "${value}"`);
}

/** DRBDTS_NBD_DATA_PATH_THREADS: the native data path's workers per connection (default 2: one receives while one writes; bench/README.md). */
function dataPathThreadsFromEnv(): number {
  const value = process.env.DRBDTS_NBD_DATA_PATH_THREADS;
  if (value === undefined || value === '') return 2;
  const threads = Number(value);
  if (!Number.isInteger(threads) || threads < 1 || threads > 64) {
    throw new Error(`DRBDTS_NBD_DATA_PATH_THREADS must be a whole number from 1 to 64, got "${value}"`);
  }
  return threads;
}

/** A 0/1 environment switch that defaults to on; anything else is an error naming the variable. */
function envSwitch(name: string): boolean {
  const value = process.env[name];
  if (value === undefined || value === '' || value === '1') return true;
  if (value === '0') return false;
  throw new Error(`${name} must be 0 or 1, got "${value}"`);
}

/** Per unix connection; the kernel doubles it (bookkeeping) and charges only what replies actually queue. */
const unixSendBufferBytes = 2 * 1024 * 1024;

/**
 * Unix sockets get no send-buffer autotuning (TCP does): at the default 208 KiB a 1 MiB READ reply took ~4.4
 * writev calls with an EPOLLOUT wake-up between each (per GiB of 1 MiB QD8 reads: 4546 writev and 10486 epoll
 * waits; with this 451 and 864), which made the socket, not the disk, the limit (0.78x nbdkit, 0.88x with this;
 * bench/README.md, "NBD serving"). Best effort: serving works without it.
 */
function raiseUnixSendBuffer(socket: net.Socket): void {
  const fd = (socket as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
  if (fd === undefined || fd < 0) return;
  try {
    setSocketBufferBytes(fd, { sendBytes: unixSendBufferBytes });
  } catch {
    // Not fatal: the replies still leave, in more writes.
  }
}

function loadSecureContext(certPath: string, keyPath: string): tls.SecureContext {
  let cert: Buffer;
  let key: Buffer;
  try {
    cert = fs.readFileSync(certPath);
  } catch (error) {
    throw new Error(`TLS certificate ${certPath}: ${(error as Error).message}`, { cause: error });
  }
  try {
    key = fs.readFileSync(keyPath);
  } catch (error) {
    throw new Error(`TLS key ${keyPath}: ${(error as Error).message}`, { cause: error });
  }
  try {
    return tls.createSecureContext({ cert, key, minVersion: 'TLSv1.2' });
  } catch (error) {
    throw new Error(`TLS certificate ${certPath} / key ${keyPath}: ${(error as Error).message}`, { cause: error });
  }
}

/**
 * A unix socket left by a server that died (nobody accepts on it) is removed. A live one, or any other kind
 * of file at the path, is an error: we never take over another server's socket or delete a user's file.
 */
async function removeStaleSocket(path: string): Promise<void> {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(path);
  } catch {
    return;
  }
  if (!stat.isSocket()) throw new Error(`cannot listen on unix:${path}: the path exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const probe = net.createConnection(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) throw new Error(`cannot listen on unix:${path}: another server is listening there`);
  fs.rmSync(path, { force: true });
}
