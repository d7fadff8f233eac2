// What this file proves, through the CLI against real pairs: `outdate` marks a node's data as possibly stale
// the way drbdsetup outdate does (refused on a Primary, while connected, on Inconsistent data; kept across a
// restart; a promotion refused without --force), and the mark goes once the data is known good again (a resync
// from the peer, or a connect that finds the same generation on an UpToDate peer). And the Behind state: when a
// protocol A Primary pulls ahead of a slow link, its Secondary says Behind until the resync that follows.
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Cluster, run } from './replication-cluster.js';

let cluster: Cluster | null = null;
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
});

describe('outdate', () => {
  it('refuses where DRBD refuses, survives a restart, blocks promotion, and clears after a resync or an equal reconnect', async () => {
    cluster = new Cluster({ sizeMiB: 16 });
    await cluster.setup();
    await cluster.startSkippingSync();

    const onPrimary = await cluster.cli('alice', 'outdate');
    expect(onPrimary.code).toBe(1);
    expect(onPrimary.stderr).toMatch(/is Primary: refusing to outdate/);
    const connected = await cluster.cli('bob', 'outdate');
    expect(connected.code).toBe(1);
    expect(connected.stderr).toMatch(/refusing to be Outdated while Connected to alice \(disconnect first\)/);

    // Disconnected, bob's data can be outdated; the mark is on disk (a restart keeps it) and blocks promotion.
    expect((await cluster.cli('bob', 'disconnect')).code).toBe(0);
    const outdated = await cluster.cli('bob', 'outdate');
    expect(outdated.code, outdated.stderr).toBe(0);
    expect((await cluster.cli('bob', 'dstate')).stdout).toBe('Outdated/DUnknown\n');
    expect((await cluster.cli('bob', 'outdate')).code, 'outdating Outdated data is a no-op').toBe(0);
    await cluster.down('bob');
    const dump = await cluster.cli('bob', 'dump-md', '--json');
    expect(dump.code, dump.stderr).toBe(0);
    expect(JSON.parse(dump.stdout).flags.outdated, 'the mark is in the superblock').toBe(true);
    // Restarted while alice is away (a connect to her would find the same generation and clear the mark).
    await cluster.down('alice');
    await cluster.start('bob');
    await cluster.waitState('bob', 'up', (s) => s.disk !== undefined);
    expect((await cluster.status('bob')).disk).toBe('Outdated');
    const promote = await cluster.cli('bob', 'primary');
    expect(promote.code).toBe(1);
    expect(promote.stderr).toMatch(/is Outdated: refusing to be Primary/);

    // alice comes back and writes meanwhile; bob connects, resyncs and is UpToDate again.
    await cluster.cli('bob', 'disconnect');
    await cluster.start('alice');
    await cluster.waitState('alice', 'up', (s) => s.disk === 'UpToDate');
    expect((await cluster.cli('alice', 'primary')).code).toBe(0);
    const written = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 1M 2M', cluster.nbdUri('alice')]);
    expect(written.code, written.stderr).toBe(0);
    expect((await cluster.cli('bob', 'connect')).code).toBe(0);
    await cluster.waitInSync();
    expect((await cluster.status('bob')).disk).toBe('UpToDate');
    expect(await cluster.hashData('bob')).toBe(await cluster.hashData('alice'));

    // Outdated again with nothing written: the reconnect finds the same generation and clears the mark.
    expect((await cluster.cli('bob', 'disconnect')).code).toBe(0);
    expect((await cluster.cli('bob', 'outdate')).code).toBe(0);
    expect((await cluster.status('alice')).peer.disk).not.toBe('Outdated'); // not connected: alice does not know
    expect((await cluster.cli('bob', 'connect')).code).toBe(0);
    await cluster.waitInSync();
    expect((await cluster.cli('bob', 'dstate')).stdout).toBe('UpToDate/UpToDate\n');
  });

  it('refuses to outdate Inconsistent data', async () => {
    cluster = new Cluster({ sizeMiB: 8 });
    await cluster.setup();
    await cluster.start('bob');
    await cluster.waitState('bob', 'up', (s) => s.disk !== undefined);
    const refused = await cluster.cli('bob', 'outdate');
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/is Inconsistent: only good data can be outdated/);
  });
});

describe('Behind', () => {
  it('a Secondary whose protocol A Primary pulled ahead says Behind, then resyncs', async () => {
    cluster = new Cluster({
      sizeMiB: 64, protocol: 'A', proxy: true, pingTimeout: '30s',
      extraNet: 'on-congestion = "pull-ahead"\nmax-buffers = "1MiB"',
    });
    await cluster.setup();
    await cluster.startSkippingSync();
    const source = path.join(cluster.dir, 'random.bin');
    await writeFile(source, randomBytes(32 * 1024 * 1024));
    // Only the data socket stalls: the state change saying "ahead" reaches bob on the meta socket.
    cluster.proxy!.stallFirst();
    const copied = await run('nbdcopy', [source, cluster.nbdUri('alice')], { timeoutMs: 60_000 });
    expect(copied.code, copied.stderr).toBe(0);
    expect((await cluster.status('alice')).connection).toBe('Ahead');
    await cluster.waitState('bob', 'Behind', (s) => s.connection === 'Behind', 10_000);
    expect((await cluster.cli('bob', 'cstate')).stdout).toBe('Behind\n');
    cluster.proxy!.resume();
    await cluster.waitInSync();
    expect((await cluster.status('bob')).connection).toBe('Connected');
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
  });
});
