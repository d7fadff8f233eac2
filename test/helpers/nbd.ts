// Shared helpers for tests that drive an NBD server: temp dirs, running real client tools, an in-process
// server on a unix socket, the `drbdts serve` process, test certificates, and a raw NBD client that speaks
// the wire protocol byte by byte (for the bad-input and fuzz tests, where real clients are too polite).
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server.js';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export async function makeTempDir(prefix: string): Promise<string> {
  return fs.promises.mkdtemp(path.join(os.tmpdir(), `drbdts-${prefix}-`));
}

export interface CommandResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs a program to completion (killing it after timeoutMs); never rejects for a non-zero exit. */
export function runCommand(
  command: string, args: string[], options: { timeoutMs?: number; input?: Buffer | string; env?: NodeJS.ProcessEnv } = {},
): Promise<CommandResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'], env: options.env ?? process.env });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    child.stdout.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr.on('data', (chunk: Buffer) => stderr.push(chunk));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 60_000);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(stdout).toString(), stderr: Buffer.concat(stderr).toString() });
    });
    child.stdin.on('error', () => {});
    child.stdin.end(options.input ?? '');
  });
}

/** Like runCommand but fails the test with the tool's stderr when it exits non-zero. */
export async function runOk(command: string, args: string[], options: Parameters<typeof runCommand>[2] = {}): Promise<string> {
  const result = await runCommand(command, args, options);
  if (result.code !== 0) {
    throw new Error(`${command} ${args.join(' ')} exited ${result.code ?? result.signal}:\n${result.stderr}${result.stdout}`);
  }
  return result.stdout;
}

export interface InProcessServer {
  server: NbdServer;
  socketPath: string;
  uri: string;
}

/** An NbdServer in this process on a unix socket in `dir`. */
export async function startServer(
  dir: string, device: BlockDevice, options: Omit<NbdServerOptions, 'device'> = {}, name = 'nbd.sock',
): Promise<InProcessServer> {
  const server = new NbdServer({ device, ...options });
  const socketPath = path.join(dir, name);
  await server.listen({ kind: 'unix', path: socketPath });
  const exportPath = encodeURIComponent(options.exportName ?? '');
  return { server, socketPath, uri: `nbd+unix:///${exportPath}?socket=${socketPath}` };
}

export interface ServeProcess {
  child: ChildProcess;
  stderr: () => string;
  /** Resolves with the exit code once the process exits. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  addresses: string[];
}

/** Starts `node bin/drbdts.js serve ...` and waits for its "serving" log line. */
export async function spawnServe(args: string[], timeoutMs = 20_000): Promise<ServeProcess> {
  const child = spawn(process.execPath, [path.join(repoRoot, 'bin/drbdts.js'), 'serve', ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, DRBDTS_LOG_LEVEL: 'info' },
  });
  let stderrText = '';
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.on('exit', (code, signal) => resolve({ code, signal }));
  });
  const addresses = await new Promise<string[]>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`drbdts serve did not start:\n${stderrText}`)), timeoutMs);
    child.stderr!.on('data', (chunk: Buffer) => {
      stderrText += chunk.toString();
      for (const line of stderrText.split('\n')) {
        if (!line.includes('"msg":"serving"')) continue;
        clearTimeout(timer);
        resolve((JSON.parse(line) as { addresses: string[] }).addresses);
        return;
      }
    });
    void exited.then(({ code }) => {
      clearTimeout(timer);
      reject(new Error(`drbdts serve exited ${code} before serving:\n${stderrText}`));
    });
  });
  return { child, stderr: () => stderrText, exited, addresses };
}

/** A CA and a server certificate for localhost/127.0.0.1, made with openssl; libnbd's layout in `dir`. */
export async function makeCertificates(dir: string): Promise<{ certPath: string; keyPath: string; caDir: string }> {
  const caKey = path.join(dir, 'ca-key.pem');
  const caCert = path.join(dir, 'ca-cert.pem');
  const keyPath = path.join(dir, 'server-key.pem');
  const csr = path.join(dir, 'server.csr');
  const certPath = path.join(dir, 'server-cert.pem');
  const ext = path.join(dir, 'server.ext');
  await runOk('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', caKey, '-out', caCert,
    '-days', '2', '-subj', '/CN=drbdts test CA']);
  await runOk('openssl', ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', keyPath, '-out', csr, '-subj', '/CN=localhost']);
  fs.writeFileSync(ext, 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  await runOk('openssl', ['x509', '-req', '-in', csr, '-CA', caCert, '-CAkey', caKey, '-CAcreateserial', '-out', certPath,
    '-days', '2', '-extfile', ext]);
  return { certPath, keyPath, caDir: dir };
}

// ------------------------------------------------------------------------------------------------ raw client

export const NBD = {
  IHAVEOPT: 0x49484156454f5054n,
  REQUEST_MAGIC: 0x25609513,
  SIMPLE_REPLY_MAGIC: 0x67446698,
  STRUCTURED_REPLY_MAGIC: 0x668e33ef,
  OPT_EXPORT_NAME: 1, OPT_ABORT: 2, OPT_LIST: 3, OPT_STARTTLS: 5, OPT_INFO: 6, OPT_GO: 7,
  OPT_STRUCTURED_REPLY: 8, OPT_LIST_META_CONTEXT: 9, OPT_SET_META_CONTEXT: 10,
  REP_ACK: 1, REP_SERVER: 2, REP_INFO: 3, REP_META_CONTEXT: 4,
  REP_ERR_UNSUP: 0x80000001, REP_ERR_POLICY: 0x80000002, REP_ERR_INVALID: 0x80000003, REP_ERR_TLS_REQD: 0x80000005,
  REP_ERR_UNKNOWN: 0x80000006, REP_ERR_TOO_BIG: 0x80000009,
  CMD_READ: 0, CMD_WRITE: 1, CMD_DISC: 2, CMD_FLUSH: 3, CMD_TRIM: 4, CMD_CACHE: 5, CMD_WRITE_ZEROES: 6, CMD_BLOCK_STATUS: 7,
  FLAG_FUA: 1, FLAG_NO_HOLE: 2, FLAG_DF: 4, FLAG_REQ_ONE: 8, FLAG_FAST_ZERO: 16,
  EPERM: 1, EIO: 5, EINVAL: 22, ENOSPC: 28, ENOTSUP: 95,
} as const;

export interface Reply {
  structured: boolean;
  error: number;
  cookie: bigint;
  /** Simple READ data or the structured chunk's payload. */
  data: Buffer;
  chunkType: number;
  chunkFlags: number;
}

/** A deliberately low-level NBD client: it sends exactly the bytes a test asks for. */
export class RawNbdClient {
  readonly socket: net.Socket;
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;
  private waiter: (() => void) | null = null;
  ended = false;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.buffered.push(chunk);
      this.bufferedBytes += chunk.length;
      this.waiter?.();
    });
    socket.on('error', () => {});
    this.closed = new Promise((resolve) => socket.on('close', () => {
      this.ended = true;
      this.waiter?.();
      resolve();
    }));
  }

  /** A client over a socket already connected (a socketpair end, say), in whatever phase it is. */
  static over(socket: net.Socket): RawNbdClient {
    return new RawNbdClient(socket);
  }

  static connect(socketPath: string): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection(socketPath, () => resolve(new RawNbdClient(socket)));
      socket.once('error', reject);
    });
  }

  /** Exactly `lengthBytes` bytes, or rejects when the server closes first or after timeoutMs. */
  async read(lengthBytes: number, timeoutMs = 10_000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.bufferedBytes < lengthBytes) {
      if (this.ended) throw new Error(`server closed the connection (wanted ${lengthBytes} bytes, have ${this.bufferedBytes})`);
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new Error(`timed out waiting for ${lengthBytes} bytes`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, remaining);
        this.waiter = () => {
          clearTimeout(timer);
          this.waiter = null;
          resolve();
        };
      });
    }
    this.bufferedBytes -= lengthBytes;
    const first = this.buffered[0]!;
    if (first.length >= lengthBytes) {
      // The common case: no concatenation of everything buffered (replies can pile up to many MiB).
      if (first.length === lengthBytes) this.buffered.shift();
      else this.buffered[0] = first.subarray(lengthBytes);
      return first.subarray(0, lengthBytes);
    }
    const parts: Buffer[] = [];
    let gathered = 0;
    while (gathered < lengthBytes) {
      const chunk = this.buffered[0]!;
      const wanted = lengthBytes - gathered;
      if (chunk.length <= wanted) {
        parts.push(chunk);
        gathered += chunk.length;
        this.buffered.shift();
      } else {
        parts.push(chunk.subarray(0, wanted));
        this.buffered[0] = chunk.subarray(wanted);
        gathered += wanted;
      }
    }
    return Buffer.concat(parts, lengthBytes);
  }

  write(data: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(data);
  }

  /** Reads the greeting and sends client flags (fixed newstyle + no zeroes unless told otherwise). */
  async greet(clientFlags = 3): Promise<number> {
    const greeting = await this.read(18);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(clientFlags >>> 0);
    this.write(flags);
    return greeting.readUInt16BE(16);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), lengthOverride?: number): void {
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(NBD.IHAVEOPT, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(lengthOverride ?? data.length, 12);
    this.write(Buffer.concat([header, data]));
  }

  async readOptionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const header = await this.read(20);
    if (header.readBigUInt64BE(0) !== 0x0003e889045565a9n) throw new Error('bad option reply magic');
    const lengthBytes = header.readUInt32BE(16);
    const data = lengthBytes === 0 ? Buffer.alloc(0) : await this.read(lengthBytes);
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data };
  }

  /** Reads option replies up to and including the ACK or an error. */
  async readOptionReplies(): Promise<Array<{ option: number; type: number; data: Buffer }>> {
    const replies = [];
    for (;;) {
      const reply = await this.readOptionReply();
      replies.push(reply);
      if (reply.type === NBD.REP_ACK || (reply.type & 0x80000000) !== 0) return replies;
    }
  }

  static goData(name = '', requests: number[] = []): Buffer {
    const nameBytes = Buffer.from(name);
    const data = Buffer.alloc(4 + nameBytes.length + 2 + requests.length * 2);
    data.writeUInt32BE(nameBytes.length, 0);
    nameBytes.copy(data, 4);
    data.writeUInt16BE(requests.length, 4 + nameBytes.length);
    requests.forEach((request, index) => data.writeUInt16BE(request, 6 + nameBytes.length + index * 2));
    return data;
  }

  static metaContextData(name: string, queries: string[]): Buffer {
    const parts: Buffer[] = [];
    const u32 = (value: number): Buffer => {
      const buffer = Buffer.alloc(4);
      buffer.writeUInt32BE(value);
      return buffer;
    };
    parts.push(u32(Buffer.byteLength(name)), Buffer.from(name), u32(queries.length));
    for (const query of queries) parts.push(u32(Buffer.byteLength(query)), Buffer.from(query));
    return Buffer.concat(parts);
  }

  /** Full handshake to transmission with GO; returns size and transmission flags. */
  async handshake(options: { structured?: boolean; baseAllocation?: boolean; exportName?: string } = {}): Promise<{ sizeBytes: number; flags: number }> {
    await this.greet();
    if (options.structured === true) {
      this.sendOption(NBD.OPT_STRUCTURED_REPLY);
      const [reply] = await this.readOptionReplies();
      if (reply!.type !== NBD.REP_ACK) throw new Error('STRUCTURED_REPLY refused');
      if (options.baseAllocation === true) {
        this.sendOption(NBD.OPT_SET_META_CONTEXT, RawNbdClient.metaContextData(options.exportName ?? '', ['base:allocation']));
        await this.readOptionReplies();
      }
    }
    this.sendOption(NBD.OPT_GO, RawNbdClient.goData(options.exportName ?? '', []));
    let sizeBytes = -1;
    let flags = -1;
    for (const reply of await this.readOptionReplies()) {
      if (reply.type === NBD.REP_INFO && reply.data.readUInt16BE(0) === 0) {
        sizeBytes = Number(reply.data.readBigUInt64BE(2));
        flags = reply.data.readUInt16BE(10);
      } else if (reply.type !== NBD.REP_INFO && reply.type !== NBD.REP_ACK) {
        throw new Error(`GO failed with reply type 0x${reply.type.toString(16)}: ${reply.data.toString()}`);
      }
    }
    return { sizeBytes, flags };
  }

  static requestBytes(type: number, flags: number, cookie: bigint, offset: bigint, lengthBytes: number, payload?: Buffer): Buffer {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(NBD.REQUEST_MAGIC, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(type, 6);
    header.writeBigUInt64BE(cookie, 8);
    header.writeBigUInt64BE(offset, 16);
    header.writeUInt32BE(lengthBytes >>> 0, 24);
    return payload === undefined ? header : Buffer.concat([header, payload]);
  }

  request(type: number, flags: number, cookie: bigint, offset: number | bigint, lengthBytes: number, payload?: Buffer): void {
    this.write(RawNbdClient.requestBytes(type, flags, cookie, BigInt(offset), lengthBytes, payload));
  }

  /**
   * Reads one reply. A simple reply to a READ carries `readLengthBytes` of data (pass it, or a lookup by cookie,
   * when a READ is expected to succeed); a structured chunk carries its own length.
   */
  async readReply(readLengthBytes: number | ((cookie: bigint) => number) = 0): Promise<Reply> {
    const magic = (await this.read(4)).readUInt32BE(0);
    if (magic === NBD.SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12);
      const error = rest.readUInt32BE(0);
      const cookie = rest.readBigUInt64BE(4);
      // With replies out of order, the caller may look the length up by the cookie it answers.
      const dataBytes = typeof readLengthBytes === 'function' ? readLengthBytes(cookie) : readLengthBytes;
      const data = error === 0 && dataBytes > 0 ? await this.read(dataBytes) : Buffer.alloc(0);
      return { structured: false, error, cookie, data, chunkType: 0, chunkFlags: 0 };
    }
    if (magic !== NBD.STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
    const rest = await this.read(16);
    const chunkFlags = rest.readUInt16BE(0);
    const chunkType = rest.readUInt16BE(2);
    const cookie = rest.readBigUInt64BE(4);
    const lengthBytes = rest.readUInt32BE(12);
    const data = lengthBytes === 0 ? Buffer.alloc(0) : await this.read(lengthBytes);
    const error = (chunkType & 0x8000) !== 0 ? data.readUInt32BE(0) : 0;
    return { structured: true, error, cookie, data, chunkType, chunkFlags };
  }

  close(): void {
    this.socket.destroy();
  }
}
