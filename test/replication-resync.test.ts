// Proves the resync machinery with real processes: after a Primary is SIGKILLed mid-write and restarted, only
// its activity-log extents are resynced (not the device); the operator's resync controls work (pause holds
// progress, resume and a higher rate finish it); online verify finds a block corrupted behind the daemon's
// back and a reconnect repairs it; invalidate-remote forces a full resync; and with csums-alg a bitmap full of
// blocks rewritten with identical data is resynced without sending the data.
import { afterEach, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { open, writeFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { Cluster, run } from './replication-cluster.js';

let cluster: Cluster | null = null;
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
});

const MiB = 1024 * 1024;

describe('resync', () => {
  it('resyncs only the activity-log extents after a Primary crash', async () => {
    // 256 MiB device, sync skipped. qemu-io writes 64 KiB pieces into two 8 MiB regions; alice is SIGKILLed
    // mid-stream and restarted (bob stays Secondary). alice's recovered bitmap covers her hot AL extents only;
    // the resync moves about that much, far less than the device, and the replicas end identical.
    cluster = new Cluster({ sizeMiB: 256 });
    await cluster.setup();
    await cluster.startSkippingSync();
    const args = ['-o0', 'qemu-io', '-f', 'raw'];
    for (let i = 0; i < 400; i += 1) {
      const region = i % 2 === 0 ? 16 * MiB : 160 * MiB;
      args.push('-c', `write -P ${(i % 200) + 1} ${region + ((i * 37) % 128) * 65536} 64k`);
    }
    args.push(cluster.nbdUri('alice'));
    const writer = spawn('stdbuf', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let acks = 0;
    writer.stdout.on('data', (data: Buffer) => {
      acks += (data.toString().match(/wrote/g) ?? []).length;
      if (acks >= 60) cluster?.kill('alice');
    });
    writer.stderr.on('data', () => {});
    await new Promise((resolve) => writer.on('close', resolve));
    expect(acks).toBeGreaterThanOrEqual(60);

    await cluster.start('alice');
    const recovered = await cluster.status('alice');
    expect(recovered.role).toBe('Secondary');
    await cluster.waitInSync();
    const bob = await cluster.status('bob');
    const received: number = bob.counters.resyncReceivedBytes;
    expect(received).toBeGreaterThan(0);
    // Two 8 MiB regions touch at most 6 extents of 4 MiB (plus slack): nowhere near 256 MiB.
    expect(received).toBeLessThanOrEqual(32 * MiB);
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
  });

  it('pauses, resumes and speeds up a resync; verify finds corruption; invalidate-remote resyncs fully', async () => {
    // A full initial sync of 96 MiB of random data at 8 MiB/s: paused, progress must hold; resumed at 1 GiB/s it
    // finishes. Then 4 KiB of bob's data area is overwritten behind the daemon's back: verify on alice reports
    // it, disconnect + connect resyncs it. Finally invalidate-remote makes bob take the whole device again.
    cluster = new Cluster({ sizeMiB: 96, resyncRate: '8MiB' });
    await cluster.setup();
    const handle = await open(cluster.imagePath('alice'), 'r+');
    await handle.write(randomBytes(96 * MiB), 0, 96 * MiB, 0);
    await handle.close();
    await cluster.start('alice');
    await cluster.start('bob');
    await cluster.waitState('alice', 'connected', (s) => s.connection === 'Connected');
    expect((await cluster.cli('alice', 'primary', '--force')).code).toBe(0);
    await cluster.waitState('bob', 'resync under way', (s) => s.resync !== null && s.resync.doneBytes > 0);
    expect((await cluster.cli('bob', 'resync', 'pause')).code).toBe(0);
    const paused = await cluster.waitState('bob', 'paused', (s) => s.connection === 'PausedSyncT');
    await new Promise((resolve) => setTimeout(resolve, 1500));
    const stillPaused = await cluster.status('bob');
    expect(stillPaused.connection).toBe('PausedSyncT');
    // At most what was in flight when the pause came may still land.
    expect(stillPaused.resync.doneBytes - paused.resync.doneBytes).toBeLessThanOrEqual(8 * MiB);
    expect(stillPaused.outOfSyncBytes).toBeGreaterThan(0);
    expect((await cluster.cli('alice', 'resync', '--rate', '1GiB')).code).toBe(0);
    expect((await cluster.cli('bob', 'resync', 'resume')).code).toBe(0);
    const waited = await cluster.cli('bob', 'resync', '--wait');
    expect(waited.code).toBe(0);
    await cluster.waitInSync();
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));

    // Bit rot on bob, behind the daemon's back.
    const bobImage = await open(cluster.imagePath('bob'), 'r+');
    await bobImage.write(Buffer.alloc(4096, 0xee), 0, 4096, 5 * MiB);
    await bobImage.sync();
    await bobImage.close();
    expect((await cluster.cli('alice', 'verify')).code).toBe(0);
    const verified = await cluster.waitState('alice', 'verify finished', (s) =>
      s.connection === 'Connected' && s.verify !== null && s.verify.doneBytes === s.size);
    expect(verified.verify.outOfSyncBlocks).toBeGreaterThanOrEqual(1);
    expect(verified.outOfSyncBytes).toBeGreaterThan(0);
    expect((await cluster.cli('alice', 'disconnect')).code).toBe(0);
    expect((await cluster.cli('alice', 'connect')).code).toBe(0);
    await cluster.waitInSync();
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));

    const before = (await cluster.status('bob')).counters.resyncReceivedBytes;
    expect((await cluster.cli('alice', 'invalidate-remote')).code).toBe(0);
    await cluster.waitState('bob', 'full resync to start', (s) => s.counters.resyncReceivedBytes > before + MiB);
    await cluster.waitInSync();
    const after = (await cluster.status('bob')).counters.resyncReceivedBytes;
    expect(after - before).toBeGreaterThan(90 * MiB);
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
  });

  it('with csums-alg, resyncs rewritten-but-identical blocks without sending their data', async () => {
    // bob is down while alice rewrites 16 MiB with the bytes already there (bits set, data equal). On return
    // the checksum-based resync must mark them in sync while receiving far less than 16 MiB.
    cluster = new Cluster({ sizeMiB: 64, extraResync: 'csums-alg = "xxh64"' });
    await cluster.setup();
    await cluster.startSkippingSync();
    const data = path.join(cluster.dir, 'data.bin');
    await writeFile(data, randomBytes(16 * MiB));
    expect((await run('qemu-io', ['-f', 'raw', '-c', `write -s ${data} 8M 16M`, cluster.nbdUri('alice')])).code).toBe(0);
    await cluster.waitInSync();
    await cluster.down('bob');
    expect((await run('qemu-io', ['-f', 'raw', '-c', `write -s ${data} 8M 16M`, cluster.nbdUri('alice')])).code).toBe(0);
    const dirty = (await cluster.status('alice')).outOfSyncBytes;
    expect(dirty).toBeGreaterThanOrEqual(16 * MiB);
    await cluster.start('bob');
    await cluster.waitInSync();
    const received = (await cluster.status('bob')).counters.resyncReceivedBytes;
    expect(received).toBeLessThan(MiB);
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
  });
});

describe('interrupted resync', () => {
  it('resumes from the persisted bitmap after the SyncTarget is SIGKILLed', async () => {
    // A full sync of 96 MiB of random data at 8 MiB/s; bob (the target) is SIGKILLed once more than 48 MiB are
    // done (the bitmap is written back every 5 s). Restarted, bob must finish by receiving only what was left
    // (well under the device size), stay Inconsistent until then, and end identical to alice.
    cluster = new Cluster({ sizeMiB: 96, resyncRate: '8MiB' });
    await cluster.setup();
    const handle = await open(cluster.imagePath('alice'), 'r+');
    await handle.write(randomBytes(96 * MiB), 0, 96 * MiB, 0);
    await handle.close();
    await cluster.start('alice');
    await cluster.start('bob');
    await cluster.waitState('alice', 'connected', (s) => s.connection === 'Connected');
    expect((await cluster.cli('alice', 'primary', '--force')).code).toBe(0);
    await cluster.waitState('bob', 'half the resync done', (s) => s.resync !== null && s.resync.doneBytes > 48 * MiB,
      60_000);
    cluster.kill('bob');
    await cluster.start('bob');
    const restarted = await cluster.status('bob');
    expect(restarted.disk).toBe('Inconsistent');
    expect(restarted.outOfSyncBytes).toBeLessThan(80 * MiB);
    expect((await cluster.cli('bob', 'primary')).code).toBe(1);
    expect((await cluster.cli('alice', 'resync', '--rate', '1GiB')).code).toBe(0);
    await cluster.waitInSync();
    const received = (await cluster.status('bob')).counters.resyncReceivedBytes;
    expect(received).toBeLessThan(80 * MiB);
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
  });
});
