// What this file proves, through the CLI against a real pair: `adjust` applies a changed config file to a
// running node where it can (resync rates now, the protocol only while disconnected, split-brain policies at
// the next connect), names what needs down/up and then changes nothing, and refuses a broken file with the
// config error, the node running on as before.
import { readFile, writeFile } from 'node:fs/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { Cluster } from './replication-cluster.js';

let cluster: Cluster | null = null;
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
});

async function edit(cluster: Cluster, node: 'alice' | 'bob', change: (text: string) => string): Promise<void> {
  const file = cluster.configPath(node);
  const text = await readFile(file, 'utf8');
  const changed = change(text);
  expect(changed, 'the edit changed the file').not.toBe(text);
  await writeFile(file, changed);
}

describe('adjust', () => {
  it('applies what a running node can take, names what needs down/up, refuses a broken file', async () => {
    cluster = new Cluster({ sizeMiB: 16 });
    await cluster.setup();
    await cluster.startSkippingSync();

    const unchanged = await cluster.cli('bob', 'adjust');
    expect(unchanged.code, unchanged.stderr).toBe(0);
    expect(unchanged.stdout).toMatch(/nothing to apply/);

    // Rates and timers: in effect at once.
    await edit(cluster, 'bob', (t) => t.replace('rate = "1GiB"', 'rate = "5MiB"\nmin-rate = "1MiB"')
      .replace('ping-timeout = "1500ms"', 'ping-timeout = "3s"'));
    const applied = await cluster.cli('bob', 'adjust', '--json');
    expect(applied.code, applied.stderr).toBe(0);
    const result = JSON.parse(applied.stdout);
    expect(result.applied).toEqual(expect.arrayContaining(['resync.rate', 'resync.min-rate', 'net.ping-timeout']));
    expect(result.needsRestart).toEqual([]);
    const status = await cluster.status('bob');
    expect(status.resyncRate).toEqual({ maxBytesPerSecond: 5 * 1024 * 1024, minBytesPerSecond: 1024 * 1024 });
    expect(status.connection, 'the connection stayed up').toBe('Connected');

    // A split-brain policy: at the next connect.
    await edit(cluster, 'bob', (t) => t.replace('[net]\n', '[net]\nafter-sb-0pri = "discard-zero-changes"\n'));
    const policy = await cluster.cli('bob', 'adjust');
    expect(policy.code, policy.stderr).toBe(0);
    expect(policy.stdout).toMatch(/at the next connect: net.after-sb-0pri/);

    // The protocol: refused while connected, applied while disconnected (on both nodes), then they connect.
    for (const node of ['alice', 'bob'] as const) {
      await edit(cluster, node, (t) => t.replace('protocol = "C"', 'protocol = "B"'));
    }
    const connected = await cluster.cli('bob', 'adjust');
    expect(connected.code).toBe(1);
    expect(connected.stderr).toMatch(/protocol C -> B changes only while disconnected/);
    expect((await cluster.status('bob')).protocol).toBe('C');
    for (const node of ['alice', 'bob'] as const) expect((await cluster.cli(node, 'disconnect')).code).toBe(0);
    for (const node of ['alice', 'bob'] as const) {
      const done = await cluster.cli(node, 'adjust');
      expect(done.code, done.stderr).toBe(0);
      expect(done.stdout).toMatch(/applied: .*net.protocol/);
    }
    for (const node of ['alice', 'bob'] as const) expect((await cluster.cli(node, 'connect')).code).toBe(0);
    await cluster.waitInSync();
    expect((await cluster.status('alice')).protocol).toBe('B');

    // What needs a restart: named, exit 1, nothing applied (the rate stays as it was).
    await edit(cluster, 'bob', (t) => t.replace(/nbd = "unix:([^"]*)bob.nbd"/, 'nbd = "unix:$1bob2.nbd"')
      .replace('rate = "5MiB"', 'rate = "7MiB"'));
    const restart = await cluster.cli('bob', 'adjust');
    expect(restart.code).toBe(1);
    expect(restart.stdout).toMatch(/node\.bob changed: these need drbdts down r0, then up; nothing was applied/);
    expect((await cluster.status('bob')).resyncRate.maxBytesPerSecond).toBe(5 * 1024 * 1024);

    // A broken file: the config error (the command reads the file too), the node running on as before.
    await edit(cluster, 'bob', (t) => t.replace('ping-timeout = "3s"', 'ping-timeout = "soon"'));
    const broken = await cluster.cli('bob', 'adjust');
    expect(broken.code).toBe(1);
    expect(broken.stderr).toMatch(/net\.ping-timeout: "soon" is not a duration/);
    await edit(cluster, 'bob', (t) => t.replace('ping-timeout = "soon"', 'ping-timeout = "3s"'));
    const after = await cluster.status('bob');
    expect(after.connection).toBe('Connected');
    expect(after.resyncRate.maxBytesPerSecond).toBe(5 * 1024 * 1024);
  });
});
