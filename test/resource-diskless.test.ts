// What this file proves, through the CLI against real pairs: a Diskless node (DRBD's detach) serves reads and
// writes through its peer's disk, the peer records what the detached disk misses, and `attach` brings the disk
// back with a resync of exactly that; `[disk] on-io-error = "detach"` does the same by itself when the backing
// disk returns EIO (a real one: FUSE over nbdkit's error filter), the failing write succeeding through the peer.
import { createHash, randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Cluster, run } from './replication-cluster.js';
import { mountFailingDisk } from './helpers/failing-disk.js';

const MiB = 1024 * 1024;
let cluster: Cluster | null = null;
const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
  for (const cleanup of cleanups.splice(0)) await cleanup();
});

async function readRange(c: Cluster, node: 'alice' | 'bob', offset: number, length: number): Promise<string> {
  const out = await run('sh', ['-c', `nbdcopy '${c.nbdUri(node)}' - | tail -c +${offset + 1} | head -c ${length} | sha256sum`]);
  if (out.code !== 0) throw new Error(`reading ${node}: ${out.stderr}`);
  return out.stdout.split(' ')[0]!;
}

const sha = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

describe('Diskless', () => {
  it('detach serves a Primary from the peer; attach (as Secondary) resyncs only what changed', async () => {
    cluster = new Cluster({ sizeMiB: 16 });
    await cluster.setup();
    await cluster.startSkippingSync();
    const first = randomBytes(4 * MiB);
    await writeFile(path.join(cluster.dir, 'first.bin'), first);
    expect((await run('nbdcopy', [path.join(cluster.dir, 'first.bin'), cluster.nbdUri('alice')])).code).toBe(0);

    // Refused without a good, connected peer; allowed with one.
    expect((await cluster.cli('bob', 'disconnect')).code).toBe(0);
    const alone = await cluster.cli('alice', 'detach');
    expect(alone.code).toBe(1);
    expect(alone.stderr).toMatch(/detaching would leave no good data to serve; use --force/);
    expect((await cluster.cli('bob', 'connect')).code).toBe(0);
    await cluster.waitInSync();
    const detached = await cluster.cli('alice', 'detach');
    expect(detached.code, detached.stderr).toBe(0);
    expect((await cluster.status('alice')).disk).toBe('Diskless');
    await cluster.waitState('bob', 'peer Diskless', (s) => s.peer.disk === 'Diskless');

    // alice serves reads and writes through bob; bob's bitmap records the writes for alice's disk.
    expect(await readRange(cluster, 'alice', 0, 4 * MiB)).toBe(sha(first));
    const second = randomBytes(1 * MiB);
    await writeFile(path.join(cluster.dir, 'second.bin'), second);
    expect((await run('nbdcopy', [path.join(cluster.dir, 'second.bin'), cluster.nbdUri('alice') ])).code).toBe(0);
    expect(await readRange(cluster, 'alice', 0, 1 * MiB)).toBe(sha(second));
    const bob = await cluster.status('bob');
    expect(bob.outOfSyncBytes).toBe(1 * MiB);
    const aliceImage = await readFile(cluster.imagePath('alice'));
    expect(sha(aliceImage.subarray(0, 1 * MiB)), 'the detached disk was not written').toBe(sha(first.subarray(0, 1 * MiB)));

    // A Diskless Primary does not attach; as Secondary it does, and the resync sends just the 1 MiB.
    const refused = await cluster.cli('alice', 'attach');
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/Diskless Primary: demote it first/);
    expect((await cluster.cli('alice', 'secondary')).code).toBe(0);
    const sentBefore = (await cluster.status('bob')).counters.resyncSentDataBytes;
    const attached = await cluster.cli('alice', 'attach');
    expect(attached.code, attached.stderr).toBe(0);
    await cluster.waitInSync();
    expect((await cluster.status('alice')).disk).toBe('UpToDate');
    // What bob wrote for alice (1 MiB), and the activity-log extents alice's disk had hot when it was left (its
    // metadata could not be closed cleanly, as after a crash): not the whole device.
    const resent = (await cluster.status('bob')).counters.resyncSentDataBytes - sentBefore;
    expect(resent).toBeGreaterThanOrEqual(1 * MiB);
    expect(resent).toBeLessThan(16 * MiB);
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
  });

  it('on-io-error detach: a real EIO on the Primary\'s disk makes it Diskless, and the write succeeds through the peer', async () => {
    const failing = await failingDisk('alice.img', 32 * MiB);
    cluster = new Cluster({ sizeMiB: 16, diskDirs: { alice: failing.dir }, extraDisk: 'on-io-error = "detach"' });
    await cluster.setup();
    await cluster.startSkippingSync();
    // The region is written once before the disk fails, so its activity-log extent is hot (no metadata write).
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 2M 256k', cluster.nbdUri('alice')])).code).toBe(0);
    await writeFile(failing.trigger, '');
    const written = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 2M 256k', '-c', 'read -P 0x22 2M 256k', cluster.nbdUri('alice')]);
    expect(written.code, written.stdout + written.stderr).toBe(0);
    expect(written.stdout).not.toMatch(/failed|error/i);
    const status = await cluster.status('alice');
    expect(status.disk).toBe('Diskless');
    expect(status.role).toBe('Primary');
    expect(await cluster.log('alice')).toMatch(/detaching the local disk: Diskless/);
    // The data is on bob, who has it marked for alice's disk.
    const bobImage = await readFile(cluster.imagePath('bob'));
    expect(sha(bobImage.subarray(2 * MiB, 2 * MiB + 256 * 1024))).toBe(sha(Buffer.alloc(256 * 1024, 0x22)));
    expect((await cluster.status('bob')).outOfSyncBytes).toBeGreaterThanOrEqual(256 * 1024);

    // fio on the Diskless Primary: random writes and their verification reads, all through bob's disk.
    const fio = await run('fio', ['--name=diskless', '--ioengine=nbd', `--uri=${cluster.nbdUri('alice')}`, '--rw=randwrite',
      '--bs=4k', '--size=8M', '--iodepth=8', '--verify=crc32c', '--do_verify=1', '--verify_state_save=0', '--output-format=json'], { timeoutMs: 120_000 });
    expect(fio.code, fio.stderr).toBe(0);
    const report = JSON.parse(fio.stdout.slice(fio.stdout.indexOf('{')));
    expect(report.jobs[0].error).toBe(0);
    expect(report.jobs[0].write.io_bytes).toBe(8 * MiB);
    expect((await cluster.status('bob')).outOfSyncBytes).toBeGreaterThanOrEqual(8 * MiB);
  });

  it('on-io-error detach under fio: the disk fails mid-run (activity-log writes included), fio sees no error', async () => {
    const failing = await failingDisk('alice.img', 32 * MiB);
    cluster = new Cluster({ sizeMiB: 16, diskDirs: { alice: failing.dir }, extraDisk: 'on-io-error = "detach"' });
    await cluster.setup();
    await cluster.startSkippingSync();
    const fio = run('fio', ['--name=failing', '--ioengine=nbd', `--uri=${cluster.nbdUri('alice')}`, '--rw=randwrite',
      '--bs=4k', '--size=16M', '--iodepth=16', '--verify=crc32c', '--do_verify=1', '--verify_state_save=0', '--output-format=json'], { timeoutMs: 180_000 });
    await new Promise((resolve) => setTimeout(resolve, 300));
    await writeFile(failing.trigger, '');
    const done = await fio;
    expect(done.code, done.stderr).toBe(0);
    const report = JSON.parse(done.stdout.slice(done.stdout.indexOf('{')));
    expect(report.jobs[0].error).toBe(0);
    expect((await cluster.status('alice')).disk).toBe('Diskless');
    expect(await cluster.log('alice')).toMatch(/detaching the local disk: Diskless/);
  });
});

/** A FUSE-mounted alice.img whose writes fail with EIO while the returned trigger file exists; unmounted after the test. */
async function failingDisk(fileName: string, sizeBytes: number): Promise<{ dir: string; trigger: string }> {
  const disk = await mountFailingDisk(fileName, sizeBytes);
  cleanups.push(disk.cleanup);
  return disk;
}
