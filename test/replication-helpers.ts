// Helpers for the replication tests: a TCP proxy the test controls (pass, break, black-hole), temp dirs.
import net from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

export type ProxyMode = 'pass' | 'blackhole';

/**
 * A TCP proxy between a node and its peer. `mode = 'blackhole'` keeps the connections open but silently drops
 * every byte in both directions (a pulled cable that TCP cannot see); `breakAll()` resets every connection.
 */
export class TcpProxy {
  mode: ProxyMode = 'pass';
  private readonly server: net.Server;
  private readonly pairs = new Set<[net.Socket, net.Socket]>();
  connectionsSeen = 0;

  constructor(private readonly targetPort: number, private readonly targetHost = '127.0.0.1') {
    this.server = net.createServer((client) => {
      this.connectionsSeen += 1;
      const upstream = net.connect(this.targetPort, this.targetHost);
      const pair: [net.Socket, net.Socket] = [client, upstream];
      this.pairs.add(pair);
      const forward = (from: net.Socket, to: net.Socket) =>
        from.on('data', (chunk) => {
          if (this.mode === 'pass') to.write(chunk);
        });
      forward(client, upstream);
      forward(upstream, client);
      // A close is passed on to the other side, except in a black hole: there nothing gets through, not even
      // a FIN, and the other side must find out by itself (its keepalive).
      const end = (closed: net.Socket, other: net.Socket) => () => {
        closed.destroy();
        if (this.mode === 'blackhole') return;
        this.pairs.delete(pair);
        other.destroy();
      };
      client.on('error', end(client, upstream)).on('close', end(client, upstream));
      upstream.on('error', end(upstream, client)).on('close', end(upstream, client));
    });
  }

  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return (this.server.address() as net.AddressInfo).port;
  }

  /** Stops reading from both sides (the bytes stay in the kernel's buffers, so senders feel backpressure). */
  stall(): void {
    this.stalled = true;
    for (const [a, b] of this.pairs) {
      a.pause();
      b.pause();
    }
  }

  /**
   * Stops reading only the oldest open connection: the data socket of a node pair (the connecting node opens its
   * data socket before its meta socket), so bulk data backs up while acks, pings and state changes still pass.
   */
  stallFirst(): void {
    const first = this.pairs.values().next().value;
    if (first === undefined) throw new Error('stallFirst: no connection through the proxy');
    first[0].pause();
    first[1].pause();
  }

  resume(): void {
    this.stalled = false;
    for (const [a, b] of this.pairs) {
      a.resume();
      b.resume();
    }
  }

  private stalled = false;

  breakAll(): void {
    for (const [a, b] of this.pairs) {
      a.resetAndDestroy();
      b.resetAndDestroy();
    }
    this.pairs.clear();
  }

  get openConnections(): number {
    return this.pairs.size;
  }

  async close(): Promise<void> {
    this.breakAll();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

export async function makeTempDir(prefix: string): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

export async function waitFor(what: string, predicate: () => boolean | Promise<boolean>, timeoutMs = 20000,
  intervalMs = 50): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await predicate()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}
