// Proves failover with real processes and real NBD clients: data written through NBD to the Primary (nbdcopy,
// qemu-io) reads back identical from the other node after a switch-over; a Secondary refuses NBD clients with a
// message saying so; and after the Primary is SIGKILLed in the middle of protocol C writes, every write qemu-io
// reported as acknowledged is on the survivor once it is promoted; a split brain is detected at reconnect and
// resolved by connect --discard-my-data on the victim.
import { afterEach, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Cluster, run } from './replication-cluster.js';
import { waitFor } from './replication-helpers.js';

let cluster: Cluster | null = null;
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
});

describe('failover', () => {
  it('serves on the other node, after a switch-over, exactly what was written through NBD', async () => {
    // Write 24 MiB of random data with nbdcopy and a pattern with qemu-io to alice; demote alice, promote bob;
    // copy bob's whole export out with nbdcopy and compare byte for byte.
    cluster = new Cluster({ sizeMiB: 64 });
    await cluster.setup();
    await cluster.startPrimaryAlice();
    const random = randomBytes(24 * 1024 * 1024);
    const source = path.join(cluster.dir, 'random.bin');
    await writeFile(source, random);
    expect((await run('nbdcopy', [source, cluster.nbdUri('alice')])).code).toBe(0);
    const pattern = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x7e 40M 1M', cluster.nbdUri('alice')]);
    expect(pattern.code).toBe(0);

    // bob is Secondary: its export refuses clients and says why (libnbd shows the server's message in debug).
    const refused = await run('nbdinfo', [cluster.nbdUri('bob')], { env: { ...process.env, LIBNBD_DEBUG: '1' } });
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/Secondary/);

    expect((await cluster.cli('alice', 'secondary')).code).toBe(0);
    const promoted = await cluster.cli('bob', 'primary');
    expect(promoted.stderr).toBe('');
    expect(promoted.code).toBe(0);
    const out = path.join(cluster.dir, 'out.bin');
    expect((await run('nbdcopy', [cluster.nbdUri('bob'), out])).code).toBe(0);
    const copy = await readFile(out);
    expect(copy.length).toBe(cluster.sizeBytes);
    expect(copy.subarray(0, random.length).equals(random)).toBe(true);
    expect(copy.subarray(40 * 1024 * 1024, 41 * 1024 * 1024).every((byte) => byte === 0x7e)).toBe(true);
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
  });

  it('keeps every acknowledged protocol C write when the Primary is SIGKILLed mid-stream', async () => {
    // qemu-io (unbuffered output) issues 600 sequential 64 KiB writes, each with its own pattern, and prints a
    // line per acknowledged write. After 100 acks alice is SIGKILLed. bob is promoted and every range qemu-io saw
    // acknowledged must hold its pattern on bob.
    cluster = new Cluster({ sizeMiB: 64, protocol: 'C' });
    await cluster.setup();
    await cluster.startPrimaryAlice();
    const chunk = 64 * 1024;
    const count = 600;
    const args = ['-o0', 'qemu-io', '-f', 'raw'];
    for (let i = 0; i < count; i += 1) args.push('-c', `write -P ${(i % 255) + 1} ${i * chunk} ${chunk}`);
    args.push(cluster.nbdUri('alice'));
    const writer = spawn('stdbuf', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const acked = new Set<number>();
    let output = '';
    let killed = false;
    writer.stdout.on('data', (data: Buffer) => {
      output += data.toString();
      for (const match of output.matchAll(/wrote 65536\/65536 bytes at offset (\d+)/g)) acked.add(Number(match[1]));
      if (!killed && acked.size >= 100) {
        killed = true;
        cluster!.kill('alice');
      }
    });
    writer.stderr.on('data', () => {});
    await new Promise((resolve) => writer.on('close', resolve));
    expect(killed).toBe(true);
    expect(acked.size).toBeGreaterThanOrEqual(100);

    await cluster.waitState('bob', 'to notice the Primary is gone', (s) => s.connection !== 'Connected', 15_000);
    const promoted = await cluster.cli('bob', 'primary');
    expect(promoted.stderr).toBe('');
    const out = path.join(cluster.dir, 'survivor.bin');
    expect((await run('nbdcopy', [cluster.nbdUri('bob'), out])).code).toBe(0);
    const survivor = await readFile(out);
    const missing: number[] = [];
    for (const offset of acked) {
      const pattern = ((offset / chunk) % 255) + 1;
      if (!survivor.subarray(offset, offset + chunk).every((byte) => byte === pattern)) missing.push(offset);
    }
    expect(missing).toEqual([]);
  });

  it('detects split brain at reconnect and recovers with connect --discard-my-data on the victim', async () => {
    // alice (Primary) is disconnected and writes; bob is promoted meanwhile and writes too. Reconnecting must
    // not sync either way: both go StandAlone and log the split brain. bob's operator discards bob's changes
    // (connect --discard-my-data), alice connects: bob becomes SyncTarget, and both end identical with
    // alice's data (bob's write gone).
    cluster = new Cluster({ sizeMiB: 32 });
    await cluster.setup();
    await cluster.startSkippingSync();
    expect((await cluster.cli('alice', 'disconnect')).code).toBe(0);
    await cluster.waitState('bob', 'to lose alice', (s) => s.connection !== 'Connected');
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xaa 0 1M', cluster.nbdUri('alice')])).code).toBe(0);
    expect((await cluster.cli('bob', 'primary')).code).toBe(0);
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xbb 2M 1M', cluster.nbdUri('bob')])).code).toBe(0);
    expect((await cluster.cli('bob', 'secondary')).code).toBe(0);
    expect((await cluster.cli('alice', 'connect')).code).toBe(0);
    await waitFor('both logs to report the split brain', async () =>
      /split brain/.test(await cluster!.log('alice')) && /split brain/.test(await cluster!.log('bob')));
    await cluster.waitState('alice', 'StandAlone after split brain', (s) => s.connection === 'StandAlone');
    await cluster.waitState('bob', 'StandAlone after split brain', (s) => s.connection === 'StandAlone');

    expect((await cluster.cli('bob', 'connect', '--discard-my-data')).code).toBe(0);
    expect((await cluster.cli('alice', 'connect')).code).toBe(0);
    await cluster.waitInSync();
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
    const read = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0xaa 0 1M', '-c', 'read -P 0 2M 1M', cluster.nbdUri('alice')]);
    expect(read.stdout.match(/read 1048576\/1048576/g)?.length).toBe(2);
  });
});
