// Proves the operator's script-facing commands on a real pair of daemons: `role`, `cstate` and `dstate` print
// one word (or local/peer) that tracks the state through promotion, disconnect and a resync; `dump-md` shows a
// stopped node's on-disk metadata (generation UUIDs matching what the daemon reported, the crashed flag and hot
// activity-log extents after a SIGKILL mid-write, covering the writes the peer missed), refuses
// while the node is up, and names the problem on a disk without metadata (and that it may have been truncated).
import { spawn } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Cluster, run } from './replication-cluster.js';

let cluster: Cluster | null = null;
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
});

async function word(c: Cluster, node: 'alice' | 'bob', command: string): Promise<string> {
  const result = await c.cli(node, command);
  expect(result.code, `${command}: ${result.stderr}`).toBe(0);
  return result.stdout;
}

describe('role, cstate, dstate, dump-md', () => {
  it('track the state of a pair, and dump-md reads a stopped node\'s metadata', async () => {
    cluster = new Cluster({ sizeMiB: 64 });
    const c = cluster;
    await c.setup();
    // A fresh, never-started node: no UUIDs yet, clean, nothing hot.
    const fresh = await c.cli('bob', 'dump-md', '--json');
    expect(fresh.code, fresh.stderr).toBe(0);
    const freshDump = JSON.parse(fresh.stdout);
    expect(freshDump).toMatchObject({ resource: 'r0', node: 'bob', dataSizeBytes: 64 * 1024 * 1024, cleanShutdown: true,
      outOfSyncBlocks: 0, activityLog: { hotExtents: [] } });

    await c.startPrimaryAlice();
    expect(await word(c, 'alice', 'role')).toBe('Primary\n');
    expect(await word(c, 'bob', 'role')).toBe('Secondary\n');
    expect(await word(c, 'alice', 'cstate')).toBe('Connected\n');
    expect(await word(c, 'bob', 'dstate')).toBe('UpToDate/UpToDate\n');

    // dump-md is for a stopped node.
    const refused = await c.cli('bob', 'dump-md');
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain('r0 is up on node bob: dump-md reads the metadata of a stopped node');

    // bob goes down cleanly; alice writes 4 MiB bob does not have; alice reports StandAlone-ish states.
    const bobUuid = (await c.status('bob')).uuids.current;
    await c.down('bob');
    const cleanBob = JSON.parse((await c.cli('bob', 'dump-md', '--json')).stdout);
    expect(cleanBob.cleanShutdown).toBe(true);
    expect(cleanBob.uuids.current).toBe(bobUuid);
    expect(cleanBob.flags.consistent).toBe(true);
    expect(await word(c, 'alice', 'cstate')).not.toBe('Connected\n');
    expect(await word(c, 'alice', 'dstate')).toBe('UpToDate/DUnknown\n');
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 16M 4M', c.nbdUri('alice')])).code).toBe(0);

    // alice is SIGKILLed in the middle of a long write: her metadata says so.
    const writes = Array.from({ length: 300 }, (_, i) => ['-c', `write -P 0x44 ${32 * 1024 * 1024 + i * 65536} 64K`]).flat();
    const writer = spawn('stdbuf', ['-o0', 'qemu-io', '-f', 'raw', ...writes, c.nbdUri('alice')], { stdio: ['ignore', 'pipe', 'ignore'] });
    const writerClosed = new Promise((resolve) => writer.on('close', resolve));
    let acks = 0;
    writer.stdout.on('data', (chunk: Buffer) => {
      acks += chunk.toString().split('wrote 65536/65536').length - 1;
      if (acks >= 10 && c.processes.has('alice')) c.kill('alice');
    });
    await writerClosed;
    expect(acks).toBeGreaterThanOrEqual(10);
    expect(acks).toBeLessThan(300);
    const crashed = await c.cli('alice', 'dump-md');
    expect(crashed.code, crashed.stderr).toBe(0);
    expect(crashed.stdout).toMatch(/^# r0 on alice: metadata internal, at the end of /);
    expect(crashed.stdout).toMatch(/shutdown not clean/);
    expect(crashed.stdout).toMatch(/flags .*wasPrimary/);
    const crashedDump = JSON.parse((await c.cli('alice', 'dump-md', '--json')).stdout);
    expect(crashedDump.cleanShutdown).toBe(false);
    // The bitmap reaches the disk lazily; what covers a crash is the activity log: the 4 MiB extents of both the
    // write bob missed (16 MiB: extent 4) and the write the kill interrupted (32 MiB: extent 8) are hot.
    expect(crashedDump.activityLog.hotExtents).toEqual(expect.arrayContaining([4, 8]));
    expect(crashedDump.uuids.current).not.toBe(bobUuid);

    // Both back: bob resyncs, and the one-word states say so until both are UpToDate.
    await c.start('alice');
    // Crash recovery on up: the hot extents are out of sync now, at least the 4 MiB bob missed.
    expect((await c.status('alice')).outOfSyncBytes).toBeGreaterThanOrEqual(4 * 1024 * 1024);
    await c.start('bob');
    await c.waitInSync();
    expect(await word(c, 'bob', 'dstate')).toBe('UpToDate/UpToDate\n');
    expect(await word(c, 'alice', 'role')).toBe('Secondary\n');

    // A disk without metadata: named, with the fix.
    await c.down('bob');
    const bare = path.join(c.dir, 'bare.img');
    await writeFile(bare, Buffer.alloc(8 * 1024 * 1024));
    const config = (await readFile(c.configPath('bob'), 'utf8')).replace(c.imagePath('bob'), bare);
    await writeFile(c.configPath('bob'), config);
    const none = await c.cli('bob', 'dump-md');
    expect(none.code).toBe(1);
    // Smaller than [disk] size needs: it may be a disk truncated after create-md, so growing it back comes first.
    expect(none.stderr).toContain(`${bare} holds no drbdts metadata: it has ${8 * 1024 * 1024} bytes, smaller than the`);
    expect(none.stderr).toContain('Only for a new disk, "drbdts create-md r0" writes it');
  }, 180_000);
});
