// Proves write ordering and refusal paths with real processes: fio drives many overlapping writes in flight
// over two NBD connections and the replicas hash identical (protocols C, B, A); a peer with the wrong secret and a client speaking
// garbage on the peer port are refused with logged reasons while both nodes keep serving; a bad config and
// forbidden state changes fail with exit 1 and a message naming the problem, and nothing written is lost;
// SIGTERM is a clean down (exit 0, no crash recovery on restart, nothing to resync).
import { afterEach, describe, expect, it } from 'vitest';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Cluster, repoRoot, run } from './replication-cluster.js';
import { waitFor } from './replication-helpers.js';

let cluster: Cluster | null = null;
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
});

describe('ordering', () => {
  for (const protocol of ['C', 'B', 'A'] as const) {
    it(`keeps replicas identical under many overlapping writes in flight (protocol ${protocol})`, async () => {
      // Two fio jobs (two NBD connections), QD32 each, random 4-64 KiB writes confined to 1 MiB: nearly every
      // write overlaps others in flight. Overlapping writes must land in the same order on both nodes.
      cluster = new Cluster({ sizeMiB: 16, protocol });
      await cluster.setup();
      await cluster.startPrimaryAlice();
      const jobFile = path.join(cluster.dir, 'overlap.fio');
      await writeFile(jobFile, `[global]
ioengine=nbd
uri=${cluster.nbdUri('alice')}
rw=randwrite
bsrange=4k-64k
size=1m
io_size=48m
iodepth=32
randrepeat=0
[a]
[b]
`);
      const fio = await run('fio', [jobFile], { timeoutMs: 90_000 });
      expect(fio.stderr).not.toMatch(/error/i);
      expect(fio.code).toBe(0);
      await cluster.waitInSync();
      expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
    });
  }
});

describe('refusals', () => {
  it('refuses a wrong secret and garbage on the peer port, and both nodes keep serving', async () => {
    // bob is configured with another secret: the nodes never connect, both logs say why; garbage sent to
    // bob's peer port is dropped with a logged reason; alice, promoted alone, serves NBD reads and writes.
    cluster = new Cluster({ sizeMiB: 16, secrets: { bob: 'not-the-same' } });
    await cluster.setup();
    await cluster.start('alice');
    await cluster.start('bob');
    await waitFor('both logs to name the failed authentication', async () =>
      /shared-secret differs/.test(await cluster!.log('bob')) && /shared-secret differs/.test(await cluster!.log('alice')));
    const garbage = net.connect(cluster.ports.bob, '127.0.0.1');
    garbage.on('error', () => {});
    garbage.write(randomBytes(1000));
    await waitFor('bob to log the garbage', async () => /bad frame magic/.test(await cluster!.log('bob')));
    garbage.destroy();
    expect((await cluster.status('alice')).connection).toBe('Connecting');
    expect((await cluster.status('bob')).connection).toBe('Connecting');
    const forced = await cluster.cli('alice', 'primary', '--force');
    expect(forced.code).toBe(0);
    const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 1M', '-c', 'read -P 0x11 0 1M',
      cluster.nbdUri('alice')]);
    expect(io.stdout).toMatch(/read 1048576\/1048576/);
    expect((await cluster.status('bob')).role).toBe('Secondary');
  });

  it('rejects a bad config and forbidden state changes with exit 1 and a clear message', async () => {
    cluster = new Cluster({ sizeMiB: 16 });
    await cluster.setup();
    // A bad config names the file, the key and the problem.
    const bad = path.join(cluster.dir, 'bad.toml');
    await writeFile(bad, '[resource]\nname = "r0"\nprotocol = "D"\nshared-secret = "x"\n');
    const badRun = await run('node', [path.join(repoRoot, 'bin/drbdts.js'), 'up', 'r0', '--config', bad, '--node', 'alice']);
    expect(badRun.code).toBe(1);
    expect(badRun.stderr).toMatch(/bad\.toml/);
    expect(badRun.stderr).toMatch(/protocol/);

    await cluster.start('alice');
    await cluster.start('bob');
    await cluster.waitState('alice', 'connected', (s) => s.connection === 'Connected');
    // An Inconsistent node may not be promoted without --force.
    const inconsistent = await cluster.cli('alice', 'primary');
    expect(inconsistent.code).toBe(1);
    expect(inconsistent.stderr).toMatch(/Inconsistent/);
    expect((await cluster.cli('alice', 'primary', '--force')).code).toBe(0);
    await cluster.waitInSync();
    const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 1M 1M', cluster.nbdUri('alice')]);
    expect(io.code).toBe(0);
    // A second Primary is refused.
    const second = await cluster.cli('bob', 'primary');
    expect(second.code).toBe(1);
    expect(second.stderr).toMatch(/Primary/);
    // create-md on a disk in use is refused.
    const createMd = await cluster.cli('bob', 'create-md', '--force');
    expect(createMd.code).toBe(1);
    // invalidate on the Primary is refused.
    const invalidate = await cluster.cli('alice', 'invalidate');
    expect(invalidate.code).toBe(1);
    expect(invalidate.stderr).toMatch(/Primary/);
    // Nothing lost: both replicas hold the write, identical.
    await cluster.waitInSync();
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
    const read = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x22 1M 1M', cluster.nbdUri('alice')]);
    expect(read.stdout).toMatch(/read 1048576\/1048576/);
  });

  it('treats SIGTERM as a clean down: exit 0, metadata closed clean, peer told', async () => {
    // alice (Primary, with data written) gets SIGTERM: she must exit 0, bob must see the peer go down, and
    // alice's next start must not find an unclean shutdown (no activity-log recovery) and resync nothing.
    cluster = new Cluster({ sizeMiB: 16 });
    await cluster.setup();
    await cluster.startSkippingSync();
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 2M', cluster.nbdUri('alice')])).code).toBe(0);
    const alice = cluster.processes.get('alice')!;
    alice.kill('SIGTERM');
    await cluster.exited(alice);
    expect(alice.exitCode).toBe(0);
    cluster.processes.delete('alice');
    await cluster.waitState('bob', 'to see alice gone', (s) => s.connection !== 'Connected');
    await cluster.start('alice');
    await cluster.waitInSync();
    expect(await cluster.log('alice')).not.toMatch(/did not shut down cleanly/);
    expect((await cluster.status('bob')).counters.resyncReceivedBytes).toBe(0);
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
  });
});
