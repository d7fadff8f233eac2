// Proves `[resource] auto-promote = true` on a real pair with real NBD clients (qemu-io): both nodes Secondary
// and UpToDate, a client opening alice's export promotes alice and keeps it Primary while connected (its `sleep`
// holds the connection); a client of bob meanwhile is refused and bob stays Secondary (alice is Primary and
// allow-two-primaries is off); the last client leaving demotes alice. Then a client of bob promotes bob and
// reads what the first client wrote, and bob is demoted when it leaves. A node an operator promoted stays
// Primary when an auto-promoting client leaves. Without the key, a Secondary still turns clients away.
import { spawn } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { Cluster, run, type NodeName } from './replication-cluster.js';

let cluster: Cluster | null = null;
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
});

async function pair(autoPromote: boolean): Promise<Cluster> {
  const c = new Cluster({ sizeMiB: 16 });
  cluster = c;
  await c.setup();
  if (autoPromote) {
    for (const node of ['alice', 'bob'] as const) {
      const file = c.configPath(node);
      await writeFile(file, (await readFile(file, 'utf8')).replace('shared-secret = "test-secret"', 'shared-secret = "test-secret"\nauto-promote = true'));
    }
  }
  await c.start('alice');
  await c.start('bob');
  await c.waitState('alice', 'connected', (s) => s.connection === 'Connected');
  const skipped = await c.cli('alice', 'new-current-uuid', '--clear-bitmap');
  expect(skipped.code, skipped.stderr).toBe(0);
  await c.waitInSync();
  return c;
}

const qemuIo = (c: Cluster, node: NodeName, ...commands: string[]) =>
  run('qemu-io', ['-f', 'raw', ...commands.flatMap((command) => ['-c', command]), c.nbdUri(node)]);

const role = async (c: Cluster, node: NodeName) => (await c.cli(node, 'role')).stdout.trim();

describe('auto-promote', () => {
  it('promotes a Secondary for its NBD clients and demotes it when the last leaves', async () => {
    const c = await pair(true);
    expect(await role(c, 'alice')).toBe('Secondary');

    // A client that writes, then holds its connection for a while.
    const holder = spawn('qemu-io', ['-f', 'raw', '-c', 'write -P 0x2c 0 1M', '-c', 'sleep 4000', c.nbdUri('alice')], { stdio: 'pipe' });
    let holderOutput = '';
    holder.stdout.on('data', (chunk) => (holderOutput += chunk));
    holder.stderr.on('data', (chunk) => (holderOutput += chunk));
    const holderExit = new Promise<number | null>((resolve) => holder.once('exit', resolve));
    await c.waitState('alice', 'auto-promoted', (s) => s.role === 'Primary', 10_000);
    // Bob's client is turned away: alice is Primary and two Primaries are not allowed.
    const refused = await qemuIo(c, 'bob', 'read 0 4k');
    expect(refused.code).not.toBe(0);
    expect(refused.stderr + refused.stdout).toMatch(/is Secondary/);
    expect(await role(c, 'bob')).toBe('Secondary');
    expect(await holderExit, holderOutput).toBe(0);
    expect(holderOutput).toMatch(/wrote 1048576\/1048576 bytes/);
    await c.waitState('alice', 'demoted after the last client left', (s) => s.role === 'Secondary', 10_000);

    // Now bob's client promotes bob and finds alice's client's data.
    const read = await qemuIo(c, 'bob', 'read -P 0x2c 0 1M');
    expect(read.code, read.stderr).toBe(0);
    expect(read.stdout).toMatch(/read 1048576\/1048576 bytes/);
    expect(read.stdout).not.toMatch(/Pattern verification failed/);
    await c.waitState('bob', 'demoted again', (s) => s.role === 'Secondary', 10_000);
    expect(await c.log('bob')).toMatch(/auto-promote: promoted to Primary/);

    // An operator's Primary stays Primary after a client leaves.
    expect((await c.cli('alice', 'primary')).code).toBe(0);
    expect((await qemuIo(c, 'alice', 'read -P 0x2c 0 4k')).code).toBe(0);
    await new Promise((resolve) => setTimeout(resolve, 500));
    expect(await role(c, 'alice')).toBe('Primary');
  });

  it('is off by default: a Secondary turns clients away', async () => {
    const c = await pair(false);
    const refused = await qemuIo(c, 'alice', 'read 0 4k');
    expect(refused.code).not.toBe(0);
    expect(await role(c, 'alice')).toBe('Secondary');
  });
});
