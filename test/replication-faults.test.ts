// Proves recovery from faults with real processes: a Secondary SIGKILLed during writes is resynced from the
// bitmap with about the dirty bytes only (asserted from both nodes' counters) and the replicas end identical;
// a link broken mid-stream and a link black-holed by the test's own TCP proxy are noticed by both sides within
// the ping timeout, reconnect, resync and converge to identical replicas.
import { afterEach, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Cluster, run } from './replication-cluster.js';

let cluster: Cluster | null = null;
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
});

function startWriter(args: string[]) {
  const child = spawn(args[0]!, args.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (data) => (stderr += data));
  child.stdout.on('data', () => {});
  const done = new Promise<{ code: number; stderr: string }>((resolve) =>
    child.on('close', (code) => resolve({ code: code ?? -1, stderr })));
  return { child, done };
}

describe('faults', () => {
  it('resyncs only the dirty blocks after the Secondary is SIGKILLed during writes', async () => {
    // alice streams 32 MiB of random data (incompressible) with nbdcopy; bob is SIGKILLed 150 ms in; alice then
    // writes 4 MiB more with qemu-io. On restart bob must receive about alice's out-of-sync bytes (not the
    // 64 MiB device), and both data areas must hash the same.
    cluster = new Cluster({ sizeMiB: 64 });
    await cluster.setup();
    await cluster.startPrimaryAlice();
    const source = path.join(cluster.dir, 'random.bin');
    await writeFile(source, randomBytes(32 * 1024 * 1024));
    const writer = startWriter(['nbdcopy', source, cluster.nbdUri('alice')]);
    await new Promise((resolve) => setTimeout(resolve, 150));
    cluster.kill('bob');
    expect((await writer.done).code).toBe(0);
    const more = path.join(cluster.dir, 'more.bin');
    await writeFile(more, randomBytes(4 * 1024 * 1024));
    const writeMore = await run('qemu-io', ['-f', 'raw', '-c', 'write -s ' + more + ' 48M 4M', cluster.nbdUri('alice')]);
    expect(writeMore.code).toBe(0);
    const before = await cluster.waitState('alice', 'StandAlone/Connecting with dirty blocks',
      (s) => s.connection !== 'Connected' && s.outOfSyncBytes >= 4 * 1024 * 1024);
    const dirty: number = before.outOfSyncBytes;
    const sentBefore: number = before.counters.resyncSentBytes;

    await cluster.start('bob');
    await cluster.waitInSync();
    const bob = await cluster.status('bob');
    const alice = await cluster.status('alice');
    const received: number = bob.counters.resyncReceivedBytes;
    const sent = alice.counters.resyncSentBytes - sentBefore;
    expect(received).toBeGreaterThan(dirty * 0.9);
    expect(received).toBeLessThanOrEqual(dirty * 1.05);
    expect(sent).toBeLessThanOrEqual(dirty * 1.05);
    // Not a full resync: at most the 36 MiB written since the kill (plus writes in flight), of a 64 MiB device.
    expect(dirty).toBeLessThanOrEqual(40 * 1024 * 1024);
    expect(received).toBeLessThan(cluster.sizeBytes * 0.7);
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
  });

  it('notices a broken and a black-holed link on both sides, reconnects, resyncs and converges', async () => {
    // alice reaches bob through the test's proxy. (1) The proxy resets every connection during an nbdcopy
    // stream: both sides drop, reconnect, resync. (2) The proxy swallows all bytes during qemu-io writes: both
    // sides must notice within the 1.5 s ping timeout (writes then complete locally and mark the bitmap);
    // after the proxy passes traffic again the nodes reconnect, resync and end identical.
    cluster = new Cluster({ sizeMiB: 64, proxy: true });
    await cluster.setup();
    await cluster.startPrimaryAlice();
    const proxy = cluster.proxy!;
    const source = path.join(cluster.dir, 'random.bin');
    await writeFile(source, randomBytes(32 * 1024 * 1024));

    const writer = startWriter(['nbdcopy', source, cluster.nbdUri('alice')]);
    await new Promise((resolve) => setTimeout(resolve, 100));
    proxy.breakAll();
    expect((await writer.done).code).toBe(0);
    await cluster.waitInSync();
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));

    proxy.mode = 'blackhole';
    const blackholedAt = Date.now();
    const writes = startWriter(['qemu-io', '-f', 'raw', '-c', 'write -P 0x61 8M 2M', '-c', 'write -P 0x62 30M 64K',
      cluster.nbdUri('alice')]);
    await cluster.waitState('alice', 'to notice the black hole', (s) => s.connection !== 'Connected', 15_000);
    await cluster.waitState('bob', 'to notice the black hole', (s) => s.connection !== 'Connected', 15_000);
    // Ping timeout 1.5 s; allow generous slack for a loaded machine, but far below "never".
    expect(Date.now() - blackholedAt).toBeLessThan(12_000);
    const written = await writes.done;
    expect(written.code).toBe(0);
    const alice = await cluster.status('alice');
    expect(alice.outOfSyncBytes).toBeGreaterThanOrEqual(2 * 1024 * 1024);

    proxy.mode = 'pass';
    proxy.breakAll();
    await cluster.waitInSync();
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
  });
});

describe('congestion', () => {
  it('protocol A with on-congestion pull-ahead keeps writing through a stalled link, then resyncs', async () => {
    // The proxy stops reading (the peer is "slow"): alice's send queue passes max-buffers (1 MiB) and she must
    // pull ahead instead of blocking the application: nbdcopy of 48 MiB completes while the link is stalled,
    // the blocks are marked out of sync while still Connected. Once the proxy reads again the queue drains,
    // the nodes renegotiate, resync the bitmap and end identical.
    cluster = new Cluster({
      sizeMiB: 64, protocol: 'A', proxy: true, pingTimeout: '30s',
      extraNet: 'on-congestion = "pull-ahead"\nmax-buffers = "1MiB"',
    });
    await cluster.setup();
    await cluster.startSkippingSync();
    const source = path.join(cluster.dir, 'random.bin');
    await writeFile(source, randomBytes(48 * 1024 * 1024));
    cluster.proxy!.stall();
    const copied = await run('nbdcopy', [source, cluster.nbdUri('alice')], { timeoutMs: 60_000 });
    expect(copied.code).toBe(0);
    const ahead = await cluster.status('alice');
    // Still the same connection, pulled ahead: the writes did not wait for the stalled peer (ping timeout 30 s).
    expect(ahead.connection).toBe('Ahead');
    expect((await cluster.cli('alice', 'cstate')).stdout).toBe('Ahead\n');
    expect(ahead.outOfSyncBytes).toBeGreaterThan(0);
    expect(await cluster.log('alice')).toMatch(/pulling ahead/);
    cluster.proxy!.resume();
    await cluster.waitInSync();
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
  });
});
