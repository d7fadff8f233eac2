// Shared helpers for the remote dirsync tests: a real `drbdts dirsync-server` process on port 0, a TCP proxy
// that can cut a connection after N bytes, and stream collection.
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = fileURLToPath(new URL('..', import.meta.url));
export const drbdtsBin = join(repoRoot, 'bin', 'drbdts.js');

export interface ServerProcess {
  port: number;
  child: ChildProcess;
  stderr(): string;
  stop(): Promise<void>;
}

/** Starts `drbdts dirsync-server --listen 127.0.0.1:PORT` (port 0 unless given) and waits for "listening on".
 * By default as `node bin/drbdts.js`; `executable` runs that file itself instead (its #! line, as an operator's
 * `drbdts` runs). */
export async function startServerProcess(
  rootDir: string,
  args: string[],
  env: NodeJS.ProcessEnv = {},
  listenPort = 0,
  executable?: string,
): Promise<ServerProcess> {
  const command = executable ?? process.execPath;
  const commandArgs = [...(executable === undefined ? [drbdtsBin] : []), 'dirsync-server', '--listen', `127.0.0.1:${listenPort}`, '--root', rootDir, ...args];
  const child = spawn(command, commandArgs, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, DRBDTS_LOG_LEVEL: 'warn', ...env },
  });
  let stdout = '';
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (text: string) => (stderr += text));
  const port = await new Promise<number>((resolve, reject) => {
    child.stdout!.setEncoding('utf8').on('data', (text: string) => {
      stdout += text;
      const match = /listening on .*:(\d+)\n/.exec(stdout);
      if (match) resolve(Number(match[1]));
    });
    child.once('exit', (code) => reject(new Error(`dirsync-server exited with ${code}: ${stderr}`)));
  });
  return {
    port,
    child,
    stderr: () => stderr,
    stop: async () => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGKILL');
      await exited;
    },
  };
}

export async function writeSecret(dir: string, name: string, secret: string): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, `${secret}\n`, { mode: 0o600 });
  return path;
}

export async function collect(chunks: AsyncIterable<Buffer>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const chunk of chunks) parts.push(chunk);
  return Buffer.concat(parts);
}

export interface Proxy {
  port: number;
  /** Bytes forwarded client -> server so far. */
  upstreamBytes(): number;
  /** The first 8 MiB that went client -> server (to check what an eavesdropper sees). */
  captured(): Buffer;
  /** From now on drop every byte both ways and keep the connections open (a black-holed network path). */
  blackHole(): void;
  close(): Promise<void>;
}

/**
 * A TCP proxy to 127.0.0.1:targetPort. With cutAfterBytes, every connection is destroyed (both sides, like a
 * broken network path) once that many bytes went client -> server.
 */
export async function startProxy(targetPort: number, cutAfterBytes?: number): Promise<Proxy> {
  const sockets = new Set<Socket>();
  let upstream = 0;
  let dropping = false;
  const capture: Buffer[] = [];
  let capturedBytes = 0;
  const server: Server = createServer((client) => {
    const target = connect({ host: '127.0.0.1', port: targetPort });
    sockets.add(client);
    sockets.add(target);
    let forwarded = 0;
    const cut = (): void => {
      client.destroy();
      target.destroy();
    };
    client.on('data', (chunk: Buffer) => {
      if (dropping) return;
      forwarded += chunk.length;
      upstream += chunk.length;
      if (capturedBytes < 8 << 20) {
        capture.push(Buffer.from(chunk));
        capturedBytes += chunk.length;
      }
      if (cutAfterBytes !== undefined && forwarded >= cutAfterBytes) {
        cut();
        return;
      }
      target.write(chunk);
    });
    target.on('data', (chunk: Buffer) => {
      if (!dropping) client.write(chunk);
    });
    client.on('close', cut);
    target.on('close', cut);
    client.on('error', () => undefined);
    target.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('proxy address');
  return {
    port: address.port,
    upstreamBytes: () => upstream,
    captured: () => Buffer.concat(capture),
    blackHole: () => {
      dropping = true;
    },
    close: () =>
      new Promise((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}
