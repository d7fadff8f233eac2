// `drbdts dirsync-server`: the far end of tcp:// and ssh:// replicas. Each connection attaches to one root
// (below --root for TCP, confined to it) and forwards every Replica call to a LocalReplica, which holds all the
// safety rules (temp file, fingerprint check, precondition re-check, rename); this file only (de)serialises.
//
//   dirsync-server --listen HOST:PORT --root DIR [--secret-file F]   TCP; a shared secret is required
//   dirsync-server --stdio [--root DIR]                               one connection on stdin/stdout (ssh)
import { createServer, type Server, type Socket } from 'node:net';
import { lstatSync } from 'node:fs';
import { realpath, stat as statPath } from 'node:fs/promises';
import * as pathModule from 'node:path';
import { createLogger, type Logger } from '../util/log.js';
import { LocalReplica } from './local.js';
import {
  assertRelativePath,
  ReplicaError,
  type ContentSource,
  type EntryStat,
  type FileContent,
  type Replica,
  type WriteFileRequest,
} from './replica.js';
import {
  encodeRecord,
  loadSecret,
  secureTcp,
  WireConnection,
  type IncomingRequest,
  type IncomingStream,
  type OutgoingReply,
  type OutgoingStream,
  type Transport,
} from './wire.js';
import { watchLocalTree } from './watch.js';
import { encodeScanEntry } from './remote.js';

/** Connections served at once by a TCP server; more are refused (a limit on everything). */
export const CONNECTIONS_MAX = 64;

export interface ServeOptions {
  /** Base directory. Listen mode: every root is below it. Stdio mode: relative roots resolve against it. */
  baseDir: string;
  /** Refuse roots outside baseDir (TCP). */
  confine: boolean;
  secret?: Buffer;
  log: Logger;
}

/** Serves one connection until it closes. Resolves when it is over (never rejects). */
export async function serveConnection(transport: Transport, options: ServeOptions): Promise<void> {
  const session = new Session(options);
  let connection: WireConnection;
  try {
    const serverOptions = options.secret === undefined ? {} : { secret: options.secret };
    connection = await WireConnection.server(transport, serverOptions, (request) => session.handle(request));
  } catch (error) {
    options.log.warn({ peer: transport.description, err: (error as Error).message }, 'dirsync handshake failed');
    return;
  }
  options.log.debug({ peer: transport.description }, 'dirsync client connected');
  const reason = await connection.closed();
  await session.close();
  options.log.debug({ peer: transport.description, reason: reason.message }, 'dirsync client gone');
}

class Session {
  private replica: Replica | undefined;

  constructor(private readonly options: ServeOptions) {}

  async close(): Promise<void> {
    await this.replica?.close();
  }

  private async attach(pathText: unknown): Promise<Replica> {
    if (typeof pathText !== 'string') throw new ReplicaError('EPROTO', 'open: missing root path');
    if (this.replica !== undefined) throw new ReplicaError('EPROTO', 'open: this connection already has a root');
    let rootPath: string;
    if (this.options.confine) {
      // Below --root only: the URL's path is relative to it whatever slashes it starts with.
      const relative = pathText.replace(/^\/+/, '').replace(/\/+$/, '');
      if (relative !== '') assertRelativePath(relative);
      rootPath = relative === '' ? this.options.baseDir : pathModule.join(this.options.baseDir, relative);
      // A symlink inside --root must not lead out of it.
      let real: string;
      try {
        real = await realpath(rootPath);
      } catch (error) {
        throw new ReplicaError('ENOROOT', `root ${pathText} does not exist on the server: ${(error as Error).message}`);
      }
      const base = await realpath(this.options.baseDir);
      if (real !== base && !real.startsWith(base + '/')) {
        throw new ReplicaError('ENOROOT', `root ${pathText} leads outside the served directory`);
      }
    } else {
      rootPath = pathModule.resolve(this.options.baseDir, pathText === '' ? '.' : pathText);
    }
    this.replica = new LocalReplica(rootPath);
    return this.replica;
  }

  /**
   * A path argument, validated; on a confined server (--root) also refused when one of its parent components is
   * a symlink: LocalReplica would follow it, and a client could then reach files outside --root (for example by
   * creating `link -> /` and writing `link/etc/...`). The last component is never followed by LocalReplica.
   * A client racing its own symlink swaps against this check is out of scope: the secret grants write access to
   * the served tree, and nothing beyond it is reachable without such a race.
   */
  private checkedPath(value: unknown): string {
    const path = pathArg(value);
    const replica = this.replica;
    if (!this.options.confine || !(replica instanceof LocalReplica)) return path;
    const parts = path.split('/');
    let current = replica.rootPath;
    for (let i = 0; i < parts.length - 1; i++) {
      current += '/' + parts[i]!;
      let st;
      try {
        st = lstatSync(current);
      } catch {
        return path; // a missing parent: the operation itself fails with a precise error
      }
      if (st.isSymbolicLink()) {
        throw new ReplicaError('EPATH', `${path} goes through the symlink ${parts.slice(0, i + 1).join('/')}; refused by the server`, path);
      }
      if (!st.isDirectory()) return path;
    }
    return path;
  }

  private need(): Replica {
    if (this.replica === undefined) throw new ReplicaError('EPROTO', 'a call arrived before open');
    return this.replica;
  }

  async handle(request: IncomingRequest): Promise<OutgoingReply> {
    const args = (request.json ?? {}) as Record<string, unknown>;
    switch (request.method) {
      case 'open': {
        const replica = await this.attach(args.path);
        return { json: await replica.open() };
      }
      case 'scan': {
        const replica = this.need();
        const ignore = Array.isArray(args.ignore) ? args.ignore.filter((item): item is string => typeof item === 'string') : [];
        const batches = replica.scan({ ignore });
        return {
          json: {},
          stream: {
            chunks: (async function* () {
              for await (const batch of batches) {
                yield encodeRecord({ entries: batch.entries.map(encodeScanEntry), problems: batch.problems });
              }
            })(),
            end: async () => ({}),
          },
        };
      }
      case 'watch': {
        const replica = this.need();
        if (!(replica instanceof LocalReplica)) throw new ReplicaError('EIO', 'watch: this root cannot be watched');
        const ignore = Array.isArray(args.ignore) ? args.ignore.filter((item): item is string => typeof item === 'string') : [];
        return { json: {}, stream: changeStream(replica.rootPath, ignore) };
      }
      case 'stat':
        return { json: await this.need().stat(this.checkedPath(args.path)) };
      case 'hashFiles': {
        if (!Array.isArray(args.paths)) throw new ReplicaError('EPROTO', 'hashFiles: paths must be a list');
        return { json: await this.need().hashFiles(args.paths.map((path: unknown) => this.checkedPath(path))) };
      }
      case 'readFile':
        return contentReply(await this.need().readFile(this.checkedPath(args.path), statArg(args.expect)));
      case 'readRange': {
        const data = await this.need().readRange(this.checkedPath(args.path), numberArg(args.offsetBytes), numberArg(args.lengthBytes));
        return { json: {}, binary: data };
      }
      case 'signature':
        return { json: {}, binary: await this.need().signature(this.checkedPath(args.path), statArg(args.expect)) };
      case 'delta': {
        if (request.binary === undefined) throw new ReplicaError('EPROTO', 'delta: the signature is missing');
        return contentReply(await this.need().delta(this.checkedPath(args.path), statArg(args.expect), request.binary));
      }
      case 'writeFile':
        return { json: await this.need().writeFile(writeRequestArg(args, request.upload, (value) => this.checkedPath(value))) };
      case 'mkdir':
        return { json: await this.need().mkdir(this.checkedPath(args.path), numberArg(args.mode)) };
      case 'replaceWithDir': {
        const replica = this.need();
        if (replica.replaceWithDir === undefined) throw new ReplicaError('EPROTO', 'replaceWithDir: not supported by this root');
        return { json: await replica.replaceWithDir(this.checkedPath(args.path), numberArg(args.mode), statArg(args.precondition)) };
      }
      case 'symlink': {
        if (typeof args.linkTarget !== 'string') throw new ReplicaError('EPROTO', 'symlink: missing target');
        return { json: await this.need().symlink(this.checkedPath(args.path), args.linkTarget, preconditionArg(args.precondition)) };
      }
      case 'remove':
        await this.need().remove(this.checkedPath(args.path), statArg(args.precondition));
        return { json: {} };
      case 'rename':
        return { json: await this.need().rename(this.checkedPath(args.fromPath), this.checkedPath(args.toPath), statArg(args.precondition)) };
      case 'setProps': {
        const props: { path: string; precondition: EntryStat; mode?: number; mtimeMs?: number } = {
          path: this.checkedPath(args.path),
          precondition: statArg(args.precondition),
        };
        if (args.mode !== undefined) props.mode = numberArg(args.mode);
        if (args.mtimeMs !== undefined) props.mtimeMs = numberArg(args.mtimeMs);
        return { json: await this.need().setProps(props) };
      }
      default:
        throw new ReplicaError('EPROTO', `unknown call "${request.method}" (client and server versions differ?)`);
    }
  }
}

/** Bounds how often a watching client is told about changes (it coalesces further on its side). */
const WATCH_REPORT_INTERVAL_MS = 100;

/** The change notices for `watch`: a record {changes: N} per burst, until the client cancels. */
function changeStream(rootPath: string, ignore: string[]): OutgoingStream {
  let pending = 0;
  let wake: (() => void) | undefined;
  let stopped = false;
  let failure: Error | undefined;
  const watcher = watchLocalTree(
    rootPath,
    ignore,
    () => {
      pending++;
      wake?.();
    },
    (error) => {
      failure = error;
      wake?.();
    },
  );
  const stop = (): void => {
    stopped = true;
    watcher.close();
    wake?.();
  };
  return {
    chunks: (async function* () {
      try {
        while (!stopped) {
          if (failure !== undefined) throw new ReplicaError('EIO', `watching ${rootPath} failed: ${failure.message}`);
          if (pending === 0) {
            await new Promise<void>((resolve) => (wake = resolve));
            wake = undefined;
            continue;
          }
          const changes = pending;
          pending = 0;
          yield encodeRecord({ changes });
          await new Promise((resolve) => setTimeout(resolve, WATCH_REPORT_INTERVAL_MS));
        }
      } finally {
        stop();
      }
    })(),
    end: async () => ({}),
    cancel: stop,
  };
}

function contentReply(source: ContentSource): OutgoingReply {
  return {
    json: { sizeBytes: source.sizeBytes },
    stream: { chunks: source.chunks, end: () => source.done, cancel: () => source.cancel() },
  };
}

// --- argument checks: everything from the wire is untrusted; LocalReplica checks paths again.

function pathArg(value: unknown): string {
  if (typeof value !== 'string') throw new ReplicaError('EPATH', 'a path argument is not a string');
  assertRelativePath(value);
  return value;
}

function numberArg(value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value)) throw new ReplicaError('EPROTO', 'a number argument is not a number');
  return value;
}

function statArg(value: unknown): EntryStat {
  const stat = value as EntryStat | null;
  if (
    stat === null || typeof stat !== 'object' ||
    (stat.kind !== 'file' && stat.kind !== 'dir' && stat.kind !== 'symlink') ||
    typeof stat.sizeBytes !== 'number' || typeof stat.mtimeMs !== 'number' || typeof stat.inode !== 'number' ||
    typeof stat.mode !== 'number' ||
    (stat.linkTarget !== undefined && typeof stat.linkTarget !== 'string')
  ) {
    throw new ReplicaError('EPROTO', 'a stat argument is malformed');
  }
  return stat;
}

function preconditionArg(value: unknown): 'absent' | EntryStat {
  return value === 'absent' ? 'absent' : statArg(value);
}

function writeRequestArg(
  args: Record<string, unknown>,
  upload: IncomingStream | undefined,
  pathArg: (value: unknown) => string,
): WriteFileRequest {
  const content = (args.content ?? {}) as Record<string, unknown>;
  let fileContent: FileContent;
  if (content.kind === 'local') {
    if (typeof content.fingerprint !== 'string') throw new ReplicaError('EPROTO', 'writeFile: local copy without fingerprint');
    fileContent = {
      kind: 'local',
      fromPath: pathArg(content.fromPath),
      fromStat: statArg(content.fromStat),
      fingerprint: content.fingerprint,
      sizeBytes: numberArg(content.sizeBytes),
    };
  } else if (content.kind === 'full' || content.kind === 'delta') {
    if (upload === undefined) throw new ReplicaError('EPROTO', `writeFile: ${content.kind} content without a stream`);
    const source = uploadSource(upload, numberArg(content.sizeBytes));
    fileContent =
      content.kind === 'full'
        ? { kind: 'full', source }
        : { kind: 'delta', basisPath: pathArg(content.basisPath), basisStat: statArg(content.basisStat), source };
  } else {
    throw new ReplicaError('EPROTO', `writeFile: unknown content kind ${String(content.kind)}`);
  }
  const request: WriteFileRequest = {
    path: pathArg(args.path),
    precondition: preconditionArg(args.precondition),
    content: fileContent,
    mode: numberArg(args.mode),
  };
  if (args.mtimeMs !== undefined) request.mtimeMs = numberArg(args.mtimeMs);
  if (args.sourceStat !== undefined) request.sourceStat = statArg(args.sourceStat);
  if (args.expectFingerprint !== undefined) {
    if (typeof args.expectFingerprint !== 'string') throw new ReplicaError('EPROTO', 'writeFile: bad fingerprint');
    request.expectFingerprint = args.expectFingerprint;
  }
  return request;
}

/** The client's upload seen as a ContentSource: END carries {fingerprint, statAfter} from the client's source. */
function uploadSource(upload: IncomingStream, sizeBytes: number): ContentSource {
  const done = upload.end.then((json) => {
    const object = (json ?? {}) as { fingerprint?: unknown; statAfter?: unknown };
    if (typeof object.fingerprint !== 'string') throw new ReplicaError('EPROTO', 'upload ended without a fingerprint');
    return { fingerprint: object.fingerprint, statAfter: statArg(object.statAfter) };
  });
  done.catch(() => undefined);
  return { sizeBytes, chunks: upload, done, cancel: () => upload.cancel() };
}

// --- the command

export interface ListeningServer {
  /** host:port actually bound (port 0 resolved). */
  host: string;
  port: number;
  close(): Promise<void>;
}

/** Starts a TCP dirsync server (used by the command and by tests that want one in-process). */
export async function startDirsyncServer(options: {
  host: string;
  port: number;
  rootDir: string;
  secret: Buffer;
  log: Logger;
}): Promise<ListeningServer> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    if (sockets.size >= CONNECTIONS_MAX) {
      options.log.warn({ peer: socket.remoteAddress }, `refusing connection: ${CONNECTIONS_MAX} already open`);
      socket.destroy();
      return;
    }
    sockets.add(socket);
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 30_000);
    const description = `${socket.remoteAddress}:${socket.remotePort}`;
    socket.on('error', () => undefined); // reported through the handshake or the connection
    void secureTcp(socket, 'server', options.secret, description)
      .then(
        (transport) => serveConnection(transport, { baseDir: options.rootDir, confine: true, secret: options.secret, log: options.log }),
        (error: Error) => options.log.warn({ peer: description, err: error.message }, 'dirsync connection refused'),
      )
      .finally(() => {
        sockets.delete(socket);
        socket.destroy();
      });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port, options.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('assertion failed: TCP server address');
  return {
    host: address.address,
    port: address.port,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

const serverUsage = `Usage: drbdts dirsync-server --listen HOST:PORT --root DIR [--secret-file FILE]
       drbdts dirsync-server --stdio [--root DIR]

Serves directory trees to 'drbdts dirsync' over tcp://HOST:PORT/PATH (PATH below --root) or, with --stdio,
over ssh (ssh://HOST/PATH runs this command on HOST). TCP requires a shared secret: --secret-file FILE or the
environment variable DRBDTS_DIRSYNC_SECRET; both ends must use the same secret.
`;

/** Parses HOST:PORT, [V6]:PORT, :PORT or PORT. */
export function parseListenAddress(text: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text) ?? /^()()(\d+)$/.exec(text);
  const port = match ? Number(match[3]) : NaN;
  if (!match || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`--listen: "${text}" is not HOST:PORT (examples: 127.0.0.1:7790, [::1]:7790, :7790)`);
  }
  const host = match[1] ?? (match[2] === '' ? '0.0.0.0' : match[2]!);
  return { host, port };
}

export async function runDirsyncServer(argv: string[]): Promise<number> {
  let listen: string | undefined;
  let rootDir: string | undefined;
  let secretFile: string | undefined;
  let stdio = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const value = (): string => {
      const next = argv[++i];
      if (next === undefined) throw new Error(`dirsync-server: ${arg} needs a value`);
      return next;
    };
    if (arg === '--listen') listen = value();
    else if (arg === '--root') rootDir = value();
    else if (arg === '--secret-file') secretFile = value();
    else if (arg === '--stdio') stdio = true;
    else if (arg === '--help' || arg === '-h') {
      process.stdout.write(serverUsage);
      return 0;
    } else {
      process.stderr.write(`drbdts dirsync-server: unknown argument "${arg}"\n\n${serverUsage}`);
      return 3;
    }
  }
  const log = createLogger('dirsync-server');
  if (stdio === (listen !== undefined)) {
    process.stderr.write(`drbdts dirsync-server: give exactly one of --listen HOST:PORT and --stdio\n\n${serverUsage}`);
    return 3;
  }
  if (rootDir !== undefined) {
    const st = await statPath(rootDir).catch(() => undefined);
    if (st === undefined || !st.isDirectory()) {
      process.stderr.write(`drbdts dirsync-server: --root ${rootDir} is not a directory\n`);
      return 3;
    }
  }
  if (stdio) {
    // ssh already authenticated the user; a secret, when set, is still demanded (defence in depth).
    const secret = secretFile !== undefined ? await loadSecret(secretFile) : undefined;
    const options: ServeOptions = { baseDir: rootDir ?? process.cwd(), confine: rootDir !== undefined, log };
    if (secret !== undefined) options.secret = secret;
    await serveConnection(
      {
        input: process.stdin,
        output: process.stdout,
        destroy: () => {
          process.stdin.destroy();
        },
        description: 'ssh client',
      },
      options,
    );
    return 0;
  }
  if (rootDir === undefined) {
    process.stderr.write(`drbdts dirsync-server: --listen needs --root DIR (the directory served)\n`);
    return 3;
  }
  let secret: Buffer | undefined;
  try {
    secret = await loadSecret(secretFile);
  } catch (error) {
    process.stderr.write(`drbdts dirsync-server: ${(error as Error).message}\n`);
    return 3;
  }
  if (secret === undefined) {
    process.stderr.write(
      'drbdts dirsync-server: TCP needs a shared secret: --secret-file FILE or DRBDTS_DIRSYNC_SECRET\n',
    );
    return 3;
  }
  let address: { host: string; port: number };
  try {
    address = parseListenAddress(listen!);
  } catch (error) {
    process.stderr.write(`drbdts dirsync-server: ${(error as Error).message}\n`);
    return 3;
  }
  let server: ListeningServer;
  try {
    server = await startDirsyncServer({ ...address, rootDir: pathModule.resolve(rootDir), secret, log });
  } catch (error) {
    process.stderr.write(`drbdts dirsync-server: cannot listen on ${listen}: ${(error as Error).message}\n`);
    return 3;
  }
  const shown = server.host.includes(':') ? `[${server.host}]` : server.host;
  // One line on stdout once ready, so scripts (and tests using port 0) learn the port.
  process.stdout.write(`listening on ${shown}:${server.port}\n`);
  await new Promise<void>((resolve) => {
    const stop = (): void => resolve();
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
  });
  await server.close();
  return 0;
}
