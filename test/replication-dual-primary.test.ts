// Dual-primary (allow-two-primaries, protocol C) with real processes: both nodes Primary at once, each serving
// its NBD export; fio on both exports writes random 4-64 KiB blocks confined to one 1 MiB region, so writes
// from the two sides overlap and cross on the wire all the time. Conflict resolution must leave both replicas
// byte-identical, and the status counters must show conflicts were actually met and resolved (a test of
// crossing writes that never crossed would prove nothing). Also: what each side writes elsewhere is read back
// on the other; a second Primary is refused without the option, or while the nodes are not in sync; a config
// that differs in allow-two-primaries is refused at connect; two Primaries that lose the link and both write
// are a split brain at reconnect (after-sb-2pri disconnect).
import { afterEach, describe, expect, it } from 'vitest';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Cluster, run, type NodeName } from './replication-cluster.js';
import { waitFor } from './replication-helpers.js';

let cluster: Cluster | null = null;
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
});

const dualPrimary = 'allow-two-primaries = true';

async function promoteBoth(c: Cluster): Promise<void> {
  await c.startSkippingSync();
  const second = await c.cli('bob', 'primary');
  expect(second.stderr).toBe('');
  expect(second.code).toBe(0);
  for (const node of ['alice', 'bob'] as const) {
    await c.waitState(node, 'Primary with a Primary peer', (s) => s.role === 'Primary' && s.peer.role === 'Primary');
  }
}

/** Waits until neither node has a write in flight or unacknowledged. */
async function quiesce(c: Cluster): Promise<void> {
  for (const node of ['alice', 'bob'] as const) {
    await c.waitState(node, 'no write in flight', (s) => s.pending === 0 && s.unacked === 0 && s.connection === 'Connected');
  }
}

function fioJob(c: Cluster, node: NodeName, seed: number): string {
  return `[global]
ioengine=nbd
uri=${c.nbdUri(node)}
rw=randwrite
bsrange=4k-64k
size=1m
io_size=1m
iodepth=16
randrepeat=0
randseed=${seed}
[${node}]
`;
}

describe('dual-primary', () => {
  it('keeps both replicas identical while both Primaries write crossing, overlapping blocks', async () => {
    cluster = new Cluster({ sizeMiB: 16, extraNet: dualPrimary });
    await cluster.setup();
    await promoteBoth(cluster);
    const c = cluster;
    // Short bursts, each checked: a block's last writers must have crossed for a divergence to survive, and
    // in one long run later writes would paper over earlier ones.
    for (let round = 0; round < 12; round++) {
      const jobs = await Promise.all((['alice', 'bob'] as const).map(async (node, index) => {
        const file = path.join(c.dir, `${node}.fio`);
        await writeFile(file, fioJob(c, node, 1000 + 2 * round + index));
        return file;
      }));
      const results = await Promise.all(jobs.map((job) => run('fio', [job], { timeoutMs: 120_000 })));
      for (const result of results) {
        expect(result.stderr).not.toMatch(/error/i);
        expect(result.code).toBe(0);
      }
      await quiesce(c);
      expect(await c.hashData('alice'), `replicas after round ${round}`).toBe(await c.hashData('bob'));
    }
    const alice = (await c.status('alice')).counters;
    const bob = (await c.status('bob')).counters;
    // alice sorts first, so she connects and resolves; bob waits for her verdicts and retries when told.
    expect(alice.conflictsSuperseded + alice.conflictsRetried).toBeGreaterThan(0);
    expect(bob.writesSupersededByPeer).toBe(alice.conflictsSuperseded);
    expect(bob.writesRetried).toBe(alice.conflictsRetried);
    expect(alice.writesRetried + alice.writesSupersededByPeer + alice.peerWritesDelayed).toBe(0);
    expect(bob.conflictsSuperseded + bob.conflictsRetried).toBe(0);

    // Each side's writes elsewhere are read back through the other side's export.
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 4M 1M', c.nbdUri('alice')])).code).toBe(0);
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xa5 6M 512k', c.nbdUri('bob')])).code).toBe(0);
    const onBob = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 4M 1M', c.nbdUri('bob')]);
    const onAlice = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0xa5 6M 512k', c.nbdUri('alice')]);
    expect(onBob.stdout).toMatch(/read 1048576\/1048576/);
    expect(onAlice.stdout).toMatch(/read 524288\/524288/);
    await quiesce(c);
    expect(await c.hashData('alice')).toBe(await c.hashData('bob'));
  }, 180_000);

  it('survives SIGKILL of one Primary during crossing writes: the other serves on, and the restart resyncs', async () => {
    cluster = new Cluster({ sizeMiB: 16, extraNet: dualPrimary });
    await cluster.setup();
    await promoteBoth(cluster);
    const c = cluster;
    const files = await Promise.all((['alice', 'bob'] as const).map(async (node, index) => {
      const file = path.join(c.dir, `${node}-timed.fio`);
      await writeFile(file, fioJob(c, node, 77 + index).replace('io_size=1m', 'time_based=1\nruntime=4'));
      return file;
    }));
    const alice = run('fio', [files[0]!], { timeoutMs: 60_000 });
    const bob = run('fio', [files[1]!], { timeoutMs: 60_000 });
    await new Promise((resolve) => setTimeout(resolve, 1500));
    c.kill('bob');
    const [aliceResult] = await Promise.all([alice, bob]);
    // alice's writes waited for the dead peer until the ping timeout, then completed StandAlone.
    expect(aliceResult.stderr).not.toMatch(/error/i);
    expect(aliceResult.code).toBe(0);
    const survivor = await c.status('alice');
    expect(survivor.role).toBe('Primary');
    expect(survivor.connection).not.toBe('Connected');
    expect(survivor.outOfSyncBytes).toBeGreaterThan(0);
    // bob restarts as Secondary; his crash left activity-log extents, alice's bitmap has the rest.
    await c.start('bob');
    await c.waitInSync(60_000);
    expect((await c.status('bob')).role).toBe('Secondary');
    expect(await c.hashData('alice')).toBe(await c.hashData('bob'));
  }, 120_000);

  it('refuses a second Primary without allow-two-primaries, and while the nodes are not in sync', async () => {
    cluster = new Cluster({ sizeMiB: 16 });
    await cluster.setup();
    await cluster.startSkippingSync();
    const refused = await cluster.cli('bob', 'primary');
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/peer alice is Primary; demote it first \(allow-two-primaries is off\)/);
    // Promotions at the same instant: each node may still see the other Secondary. Whatever the race gives,
    // two Primaries must never stay connected without the option.
    expect((await cluster.cli('alice', 'secondary')).code).toBe(0);
    for (let attempt = 0; attempt < 3; attempt++) {
      await Promise.all([cluster.cli('alice', 'primary'), cluster.cli('bob', 'primary')]);
      await new Promise((resolve) => setTimeout(resolve, 500));
      const [a, b] = [await cluster.status('alice'), await cluster.status('bob')];
      expect(a.role === 'Primary' && b.role === 'Primary' && a.connection === 'Connected' && b.connection === 'Connected',
        `attempt ${attempt}: ${JSON.stringify([a.role, a.connection, b.role, b.connection])}`).toBe(false);
      for (const node of ['alice', 'bob'] as const) expect((await cluster.cli(node, 'secondary')).code).toBe(0);
      for (const node of ['alice', 'bob'] as const) {
        if ((await cluster.status(node)).connection === 'StandAlone') await cluster.cli(node, 'connect');
      }
      await cluster.waitInSync();
    }
    await cluster.teardown();

    cluster = new Cluster({ sizeMiB: 16, extraNet: dualPrimary });
    await cluster.setup();
    await cluster.start('alice');
    await cluster.start('bob');
    await cluster.waitState('alice', 'connected', (s) => s.connection === 'Connected');
    // A fresh pair: alice forced Primary starts the full sync to bob, who is Inconsistent until it ends.
    expect((await cluster.cli('alice', 'primary', '--force')).code).toBe(0);
    await cluster.waitState('alice', 'peer Inconsistent or syncing', (s) => s.peer.role === 'Secondary');
    const forced = await cluster.cli('bob', 'primary', '--force');
    expect(forced.code).toBe(1);
    expect(forced.stderr).toMatch(/--force would discard the data it serves/);
    await cluster.waitInSync();
    expect((await cluster.cli('bob', 'primary')).code).toBe(0);
    expect((await cluster.status('bob')).role).toBe('Primary');
  }, 120_000);

  it('refuses to connect when only one config allows two primaries', async () => {
    cluster = new Cluster({ sizeMiB: 16, extraNet: dualPrimary });
    await cluster.setup();
    const bobConfig = cluster.configPath('bob');
    await writeFile(bobConfig, (await readFile(bobConfig, 'utf8')).replace(dualPrimary, ''));
    await cluster.start('alice');
    await cluster.start('bob');
    await waitFor('a log to name the differing allow-two-primaries', async () =>
      /allow-two-primaries is (on|off) here and (on|off) on/.test((await cluster!.log('alice')) + (await cluster!.log('bob'))));
    expect((await cluster.status('alice')).connection).not.toBe('Connected');
  }, 60_000);

  it('detects the split brain of two Primaries that wrote while disconnected', async () => {
    cluster = new Cluster({ sizeMiB: 16, extraNet: dualPrimary });
    await cluster.setup();
    await promoteBoth(cluster);
    expect((await cluster.cli('alice', 'disconnect')).code).toBe(0);
    await cluster.waitState('bob', 'to lose alice', (s) => s.connection !== 'Connected');
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xaa 0 1M', cluster.nbdUri('alice')])).code).toBe(0);
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xbb 2M 1M', cluster.nbdUri('bob')])).code).toBe(0);
    expect((await cluster.cli('alice', 'connect')).code).toBe(0);
    await waitFor('both logs to report the split brain', async () =>
      /split brain with two Primaries/.test(await cluster!.log('alice')) && /split brain/.test(await cluster!.log('bob')));
    await cluster.waitState('alice', 'StandAlone after split brain', (s) => s.connection === 'StandAlone');
    // Nothing was overwritten: each node still serves what it wrote.
    const alice = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0xaa 0 1M', '-c', 'read -P 0 2M 1M', cluster.nbdUri('alice')]);
    const bob = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0xbb 2M 1M', '-c', 'read -P 0 0 1M', cluster.nbdUri('bob')]);
    expect(alice.stdout.match(/read 1048576\/1048576/g)?.length).toBe(2);
    expect(bob.stdout.match(/read 1048576\/1048576/g)?.length).toBe(2);
  }, 90_000);
});
