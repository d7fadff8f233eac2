// Remote replicas: a Replica whose calls travel over the dirsync wire protocol (wire.ts) to a
// `drbdts dirsync-server`, reached over TCP (tcp://HOST:PORT/PATH, shared-secret auth) or over ssh
// (ssh://[USER@]HOST[:PORT]/PATH runs `drbdts dirsync-server --stdio` on HOST). Every call of the engine
// maps to one wire call; content streams both ways with credit-based flow control, so many propagations
// share one connection with bounded memory.
import { connect, type Socket } from 'node:net';
import { spawn, type ChildProcess } from 'node:child_process';
import type { Logger } from '../util/log.js';
import {
  assertRelativePath,
  ReplicaError,
  type ContentSource,
  type EntryKind,
  type EntryStat,
  type HashResult,
  type Precondition,
  type Replica,
  type ReplicaInfo,
  type ScanBatch,
  type ScanEntry,
  type ScanOptions,
  type SetPropsRequest,
  type WriteFileRequest,
  type WriteFileResult,
} from './replica.js';
import { decodeRecords, loadSecret, secureTcp, WireConnection, type OutgoingStream, type Reply, type Transport, type WireCounters } from './wire.js';

export interface RemoteOptions {
  /** File holding the shared secret (tcp://); else env DRBDTS_DIRSYNC_SECRET. */
  secretFile?: string;
  /** Command that runs drbdts on the remote host (ssh://), default "drbdts". */
  serverCommand?: string;
  /** ssh program and options, default env DRBDTS_SSH_COMMAND or "ssh" (split on spaces). */
  sshCommand?: string;
  /** lz4 on the wire when it pays (default true). */
  compress?: boolean;
  /** Declare the connection dead after this long without a word from the server (default 5 min). */
  peerTimeoutMs?: number;
  log?: Logger;
}

/** A parsed remote root. */
export interface RemoteUrl {
  scheme: 'tcp' | 'ssh';
  host: string;
  port?: number;
  user?: string;
  /** tcp: relative to the server's --root. ssh: relative to the remote home, or absolute when it starts with '/'. */
  path: string;
  /** Canonical form, used as the replica's rootId (archive naming, messages). */
  canonical: string;
}

export function isRemoteRoot(root: string): boolean {
  return root.startsWith('tcp://') || root.startsWith('ssh://');
}

/** Parses tcp://HOST:PORT/PATH and ssh://[USER@]HOST[:PORT]/PATH; a malformed URL is an error naming it. */
export function parseRemoteUrl(url: string): RemoteUrl {
  const match = /^(tcp|ssh):\/\/(?:([^@/]+)@)?(\[[^\]]+\]|[^:/]+)(?::(\d+))?(?:\/(.*))?$/.exec(url);
  if (!match) {
    throw new ReplicaError('ENOROOT', `"${url}" is not a remote root (tcp://HOST:PORT/PATH or ssh://[USER@]HOST[:PORT]/PATH)`);
  }
  const scheme = match[1] as 'tcp' | 'ssh';
  const user = match[2];
  const host = match[3]!.replace(/^\[(.*)\]$/, '$1');
  const port = match[4] === undefined ? undefined : Number(match[4]);
  const path = match[5] ?? '';
  if (port !== undefined && (port < 1 || port > 65535)) throw new ReplicaError('ENOROOT', `${url}: port ${port} out of range`);
  if (scheme === 'tcp') {
    if (port === undefined) throw new ReplicaError('ENOROOT', `${url}: tcp:// needs a port (tcp://HOST:PORT/PATH)`);
    if (user !== undefined) throw new ReplicaError('ENOROOT', `${url}: tcp:// takes no user name`);
  }
  const relative = path.replace(/^\/+/, '/').replace(/\/+$/, '');
  const checkable = relative.replace(/^\//, '');
  if (checkable !== '') {
    try {
      assertRelativePath(checkable);
    } catch {
      throw new ReplicaError('ENOROOT', `${url}: the path may not contain "." or ".." components or empty parts`);
    }
  }
  const hostShown = host.includes(':') ? `[${host}]` : host;
  const canonical =
    `${scheme}://${user === undefined ? '' : `${user}@`}${hostShown}${port === undefined ? '' : `:${port}`}/${relative}`;
  const result: RemoteUrl = { scheme, host, path: relative, canonical };
  if (port !== undefined) result.port = port;
  if (user !== undefined) result.user = user;
  return result;
}

// --- scan entries travel as arrays: [path, kind, size, mtimeMs, ctimeMs, inode, mode, linkTarget?]
const KIND_CODES: Record<EntryKind, number> = { file: 0, dir: 1, symlink: 2 };
const KINDS: EntryKind[] = ['file', 'dir', 'symlink'];

export function encodeScanEntry(entry: ScanEntry): unknown[] {
  const row: unknown[] = [entry.path, KIND_CODES[entry.kind], entry.sizeBytes, entry.mtimeMs, entry.ctimeMs, entry.inode, entry.mode];
  if (entry.linkTarget !== undefined) row.push(entry.linkTarget);
  return row;
}

/** Matches what assertRelativePath refuses: a leading or trailing '/', '//', '.' or '..' components, NUL. */
const BAD_RELATIVE_PATH = /^\/|\/$|\/\/|(?:^|\/)\.\.?(?:\/|$)|\0/;

export function decodeScanEntry(row: unknown): ScanEntry {
  if (!Array.isArray(row) || row.length < 7 || row.length > 8) throw new ReplicaError('EPROTO', 'peer sent a malformed scan entry');
  const [path, kindCode, sizeBytes, mtimeMs, ctimeMs, inode, mode, linkTarget] = row as unknown[];
  const kind = KINDS[kindCode as number];
  if (
    typeof path !== 'string' || kind === undefined || typeof sizeBytes !== 'number' || typeof mtimeMs !== 'number' ||
    typeof ctimeMs !== 'number' || typeof inode !== 'number' || typeof mode !== 'number' ||
    (linkTarget !== undefined && typeof linkTarget !== 'string')
  ) {
    throw new ReplicaError('EPROTO', 'peer sent a malformed scan entry');
  }
  // The same rules as assertRelativePath, as one regular expression: scans bring tens of thousands of paths.
  if (path.length === 0 || BAD_RELATIVE_PATH.test(path)) assertRelativePath(path);
  const entry: ScanEntry = { path, kind, sizeBytes, mtimeMs, ctimeMs, inode, mode };
  if (linkTarget !== undefined) entry.linkTarget = linkTarget as string;
  return entry;
}

/** hashFiles requests are cut into batches of this many paths (bounded frames), several in flight. */
const HASH_BATCH_PATHS = 1000;
const HASH_BATCHES_IN_FLIGHT = 4;
/** readRange is answered in one frame, so ranges are requested in pieces of at most this size. */
const READ_RANGE_PIECE_BYTES = 8 << 20;

export class RemoteReplica implements Replica {
  constructor(
    private readonly connection: WireConnection,
    private readonly url: RemoteUrl,
    private readonly closeTransport: () => Promise<void>,
  ) {}

  /** What crossed the wire so far (benchmarks report it). */
  get counters(): WireCounters {
    return this.connection.counters;
  }

  private async call(method: string, args: unknown, options?: { binary?: Buffer; upload?: OutgoingStream }): Promise<Reply> {
    return this.connection.call(method, args, options);
  }

  async open(): Promise<ReplicaInfo> {
    const { json } = await this.call('open', { path: this.url.path });
    const info = json as { hostName?: unknown } | null;
    return { rootId: this.url.canonical, hostName: typeof info?.hostName === 'string' ? info.hostName : this.url.host };
  }

  async *scan(options: ScanOptions): AsyncIterable<ScanBatch> {
    const reply = await this.call('scan', { ignore: options.ignore });
    if (reply.stream === undefined) throw new ReplicaError('EPROTO', `${this.url.canonical}: scan without a stream`);
    for await (const record of decodeRecords(reply.stream)) {
      const batch = record as { entries?: unknown; problems?: unknown } | null;
      if (!Array.isArray(batch?.entries) || !Array.isArray(batch?.problems)) {
        throw new ReplicaError('EPROTO', `${this.url.canonical}: malformed scan batch`);
      }
      yield {
        entries: batch.entries.map(decodeScanEntry),
        problems: (batch.problems as Array<{ path?: unknown; message?: unknown }>).map((problem) => ({
          path: String(problem?.path),
          message: String(problem?.message),
        })),
      };
    }
    await reply.stream.end;
  }

  async stat(path: string): Promise<EntryStat | null> {
    return (await this.call('stat', { path })).json as EntryStat | null;
  }

  async hashFiles(paths: string[]): Promise<Array<HashResult | null>> {
    const results: Array<HashResult | null> = new Array(paths.length).fill(null);
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < paths.length) {
        const start = next;
        next = Math.min(paths.length, next + HASH_BATCH_PATHS);
        const batch = paths.slice(start, next);
        const { json } = await this.call('hashFiles', { paths: batch });
        if (!Array.isArray(json) || json.length !== batch.length) {
          throw new ReplicaError('EPROTO', `${this.url.canonical}: hashFiles answered ${Array.isArray(json) ? json.length : 'no'} results for ${batch.length} paths`);
        }
        for (let i = 0; i < batch.length; i++) results[start + i] = json[i] as HashResult | null;
      }
    };
    await Promise.all(Array.from({ length: Math.min(HASH_BATCHES_IN_FLIGHT, Math.ceil(paths.length / HASH_BATCH_PATHS)) }, worker));
    return results;
  }

  private contentSource(reply: Reply): ContentSource {
    const stream = reply.stream;
    if (stream === undefined) throw new ReplicaError('EPROTO', `${this.url.canonical}: content reply without a stream`);
    const sizeBytes = (reply.json as { sizeBytes?: unknown } | null)?.sizeBytes;
    if (typeof sizeBytes !== 'number') throw new ReplicaError('EPROTO', `${this.url.canonical}: content reply without a size`);
    const done = stream.end.then((json) => {
      const result = json as { fingerprint?: unknown; statAfter?: unknown } | null;
      if (typeof result?.fingerprint !== 'string' || typeof result.statAfter !== 'object' || result.statAfter === null) {
        throw new ReplicaError('EPROTO', `${this.url.canonical}: content stream ended without fingerprint and stat`);
      }
      return { fingerprint: result.fingerprint, statAfter: result.statAfter as EntryStat };
    });
    done.catch(() => undefined);
    return { sizeBytes, chunks: stream, done, cancel: () => stream.cancel() };
  }

  async readFile(path: string, expect: EntryStat): Promise<ContentSource> {
    return this.contentSource(await this.call('readFile', { path, expect }));
  }

  async readRange(path: string, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    // Replies must fit a frame: big ranges are fetched in pieces (short at end of file, as the local replica).
    const parts: Buffer[] = [];
    let done = 0;
    while (done < lengthBytes) {
      const want = Math.min(READ_RANGE_PIECE_BYTES, lengthBytes - done);
      const reply = await this.call('readRange', { path, offsetBytes: offsetBytes + done, lengthBytes: want });
      const piece = reply.binary ?? Buffer.alloc(0);
      parts.push(piece);
      done += piece.length;
      if (piece.length < want) break;
    }
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
  }

  async signature(path: string, expect: EntryStat): Promise<Buffer> {
    const reply = await this.call('signature', { path, expect });
    if (reply.binary === undefined) throw new ReplicaError('EPROTO', `${this.url.canonical}: empty signature for ${path}`, path);
    return reply.binary;
  }

  async delta(path: string, expect: EntryStat, signature: Buffer): Promise<ContentSource> {
    return this.contentSource(await this.call('delta', { path, expect }, { binary: signature }));
  }

  async writeFile(request: WriteFileRequest): Promise<WriteFileResult> {
    const { content } = request;
    const args: Record<string, unknown> = { path: request.path, precondition: request.precondition, mode: request.mode };
    if (request.mtimeMs !== undefined) args.mtimeMs = request.mtimeMs;
    if (request.expectFingerprint !== undefined) args.expectFingerprint = request.expectFingerprint;
    if (request.sourceStat !== undefined) args.sourceStat = request.sourceStat;
    if (content.kind === 'local') {
      args.content = content;
      return (await this.call('writeFile', args)).json as WriteFileResult;
    }
    const source = content.source;
    args.content =
      content.kind === 'full'
        ? { kind: 'full', sizeBytes: source.sizeBytes }
        : { kind: 'delta', sizeBytes: source.sizeBytes, basisPath: content.basisPath, basisStat: content.basisStat };
    const upload: OutgoingStream = {
      chunks: source.chunks,
      end: async () => {
        const { fingerprint, statAfter } = await source.done;
        return { fingerprint, statAfter };
      },
      cancel: () => source.cancel(),
    };
    return (await this.call('writeFile', args, { upload })).json as WriteFileResult;
  }

  async mkdir(path: string, mode: number): Promise<EntryStat> {
    return (await this.call('mkdir', { path, mode })).json as EntryStat;
  }

  async symlink(path: string, linkTarget: string, precondition: Precondition): Promise<EntryStat> {
    return (await this.call('symlink', { path, linkTarget, precondition })).json as EntryStat;
  }

  async replaceWithDir(path: string, mode: number, precondition: EntryStat): Promise<EntryStat> {
    return (await this.call('replaceWithDir', { path, mode, precondition })).json as EntryStat;
  }

  async remove(path: string, precondition: EntryStat): Promise<void> {
    await this.call('remove', { path, precondition });
  }

  async rename(fromPath: string, toPath: string, precondition: EntryStat): Promise<EntryStat> {
    return (await this.call('rename', { fromPath, toPath, precondition })).json as EntryStat;
  }

  async setProps(request: SetPropsRequest): Promise<EntryStat> {
    return (await this.call('setProps', request)).json as EntryStat;
  }

  /**
   * Asks the server to watch this root and report changes (for --watch): `onChange` is called once per batch
   * of changes the server saw; `onEnd` when the stream stops (connection lost). Use a dedicated connection:
   * the stream stays open until close().
   */
  async watchChanges(ignore: string[], onChange: () => void, onEnd: (error: Error) => void): Promise<{ close(): void }> {
    const reply = await this.call('watch', { ignore });
    const stream = reply.stream;
    if (stream === undefined) throw new ReplicaError('EPROTO', `${this.url.canonical}: watch without a stream`);
    let closed = false;
    void (async () => {
      try {
        for await (const record of decodeRecords(stream)) {
          if (closed) return;
          if (typeof (record as { changes?: unknown } | null)?.changes === 'number') onChange();
        }
        if (!closed) onEnd(new ReplicaError('ECONN', 'the server ended the change stream'));
      } catch (error) {
        if (!closed) onEnd(error as Error);
      }
    })();
    return {
      close: () => {
        closed = true;
        stream.cancel();
      },
    };
  }

  async close(): Promise<void> {
    this.connection.close();
    await this.closeTransport();
  }
}

// --- transports

const CONNECT_TIMEOUT_MS = 15_000;
/** ssh plus a remote process start, possibly after a password prompt. */
const SSH_HANDSHAKE_TIMEOUT_MS = 300_000;

async function tcpTransport(url: RemoteUrl, secret: Buffer): Promise<Transport> {
  const socket: Socket = await new Promise((resolve, reject) => {
    const attempt = connect({ host: url.host, port: url.port! });
    const timer = setTimeout(() => {
      attempt.destroy();
      reject(new ReplicaError('ECONN', `cannot connect to ${url.canonical}: no answer within ${CONNECT_TIMEOUT_MS} ms`));
    }, CONNECT_TIMEOUT_MS);
    attempt.once('connect', () => {
      clearTimeout(timer);
      resolve(attempt);
    });
    attempt.once('error', (error) => {
      clearTimeout(timer);
      reject(new ReplicaError('ECONN', `cannot connect to ${url.canonical}: ${error.message}`));
    });
  });
  socket.setNoDelay(true);
  socket.setKeepAlive(true, 30_000);
  return secureTcp(socket, 'client', secret, url.canonical);
}

interface SshTransport extends Transport {
  child: ChildProcess;
  stderrTail(): string;
  exited: Promise<number | null>;
}

function splitCommand(text: string): string[] {
  return text.trim().split(/\s+/).filter((part) => part.length > 0);
}

function sshTransport(url: RemoteUrl, options: RemoteOptions): SshTransport {
  const [program, ...sshArgs] = splitCommand(options.sshCommand ?? process.env.DRBDTS_SSH_COMMAND ?? 'ssh');
  const args = [...sshArgs, '-e', 'none'];
  if (url.port !== undefined) args.push('-p', String(url.port));
  if (url.user !== undefined) args.push('-l', url.user);
  args.push('--', url.host, ...splitCommand(options.serverCommand ?? 'drbdts'), 'dirsync-server', '--stdio');
  const child = spawn(program!, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (text: string) => {
    stderr = (stderr + text).slice(-4000);
  });
  const exited = new Promise<number | null>((resolve) => {
    child.once('exit', (code) => resolve(code));
    child.once('error', (error) => {
      stderr += `\ncannot run ${program}: ${error.message}`;
      resolve(null);
    });
  });
  return {
    input: child.stdout!,
    output: child.stdin!,
    destroy: () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    },
    description: url.canonical,
    child,
    stderrTail: () => stderr.trim().split('\n').slice(-5).join('\n'),
    exited,
  };
}

/**
 * Connects to a remote root and returns its Replica (call `open()` next, as for any replica). Errors are
 * ReplicaErrors: ECONN (cannot reach), EAUTH (secret missing or wrong), EPROTO (not a dirsync server).
 */
export async function openRemoteReplica(rootUrl: string, options: RemoteOptions = {}): Promise<RemoteReplica> {
  const url = parseRemoteUrl(rootUrl);
  const connectionOptions: { secret?: Buffer; compress?: boolean; peerTimeoutMs?: number } = {};
  if (options.compress !== undefined) connectionOptions.compress = options.compress;
  if (options.peerTimeoutMs !== undefined) connectionOptions.peerTimeoutMs = options.peerTimeoutMs;
  if (url.scheme === 'tcp') {
    const secret = await loadSecret(options.secretFile);
    if (secret === undefined) {
      throw new ReplicaError('EAUTH', `${url.canonical} needs a shared secret: give --secret-file FILE or set DRBDTS_DIRSYNC_SECRET`);
    }
    connectionOptions.secret = secret;
    const transport = await tcpTransport(url, secret);
    const connection = await WireConnection.client(transport, connectionOptions);
    return new RemoteReplica(connection, url, async () => transport.destroy());
  }
  // ssh authenticates the user; a secret, if configured, is offered too (a server started with one demands it).
  const secret = await loadSecret(options.secretFile);
  if (secret !== undefined) connectionOptions.secret = secret;
  const transport = sshTransport(url, options);
  let connection: WireConnection;
  try {
    // ssh may ask for a password or a key passphrase on the terminal: give the user time.
    connection = await WireConnection.client(transport, { ...connectionOptions, handshakeTimeoutMs: SSH_HANDSHAKE_TIMEOUT_MS });
  } catch (error) {
    transport.destroy();
    // Give ssh a moment to exit so its own explanation (host key, permission denied, command not found) is shown.
    await Promise.race([transport.exited, new Promise((resolve) => setTimeout(resolve, 2000))]);
    const tail = transport.stderrTail();
    const reason = error instanceof ReplicaError ? error : new ReplicaError('ECONN', String(error));
    throw new ReplicaError(reason.code, tail === '' ? reason.message : `${reason.message}; ssh said: ${tail}`);
  }
  const closeTransport = async (): Promise<void> => {
    transport.output.end();
    const timer = setTimeout(() => transport.child.kill('SIGKILL'), 5000);
    await transport.exited;
    clearTimeout(timer);
  };
  return new RemoteReplica(connection, url, closeTransport);
}
