// Proves that a full disk on the Primary loses nothing and leaves no silent divergence: alice's backing file is
// sparse on a small tmpfs, so once the tmpfs is full her local writes fail with ENOSPC while bob, whose disk has
// room, writes the same data. The NBD client must see the error (not a success the Primary's disk does not
// hold), the Primary must stay up and mark those blocks out of sync (its disk and the peer's now differ there),
// and once space is back (the tmpfs grown) a disconnect/connect resyncs them and both replicas hash identical.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, expect, it } from 'vitest';
import { Cluster, run } from './replication-cluster.js';

let cluster: Cluster | null = null;
let smallDir: string | null = null;
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
  if (smallDir !== null) {
    execFileSync('umount', ['-l', smallDir]);
    rmSync(smallDir, { recursive: true, force: true });
    smallDir = null;
  }
});

it('a full Primary disk: the client gets ENOSPC, the blocks are marked out of sync, a resync converges', async () => {
  smallDir = mkdtempSync(path.join(os.tmpdir(), 'drbdts-small-'));
  // Room for the metadata create-md writes and about 16 MiB of data: the 48 MiB written below cannot fit.
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=20m', 'tmpfs', smallDir]);
  cluster = new Cluster({ sizeMiB: 64, diskDirs: { alice: smallDir } });
  await cluster.setup();
  await cluster.startSkippingSync();

  const written = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 8M 48M', cluster.nbdUri('alice')]);
  expect(written.code, written.stdout).not.toBe(0);
  expect(`${written.stdout}${written.stderr}`).toMatch(/No space left on device/);
  // The Primary is still up and Primary, connected, and knows the replicas differ.
  const status = await cluster.status('alice');
  expect(status.role).toBe('Primary');
  expect(status.connection).toBe('Connected');
  expect(status.outOfSyncBytes).toBeGreaterThan(0);
  expect(await cluster.log('alice')).toMatch(/ENOSPC|No space left/);

  // Space comes back; a reconnect resyncs the marked blocks; the replicas converge.
  execFileSync('mount', ['-o', 'remount,size=200m', smallDir]);
  expect((await cluster.cli('alice', 'disconnect')).code).toBe(0);
  expect((await cluster.cli('alice', 'connect')).code).toBe(0);
  await cluster.waitInSync();
  expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
  // And the device takes the same write now.
  const again = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 8M 48M', cluster.nbdUri('alice')]);
  expect(again.code, again.stderr).toBe(0);
  await cluster.waitInSync();
  expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
}, 180_000);
