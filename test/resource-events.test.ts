// Proves that `drbdts events2` is event-driven and names its objects as DRBD does, with two real daemons: a
// short resync (an 8 MiB initial sync at the default 100 MiB/s, well under the second the old poll waited)
// shows up on both nodes as replication:SyncSource / SyncTarget and back to Established; the node ids come
// from the config (bob's explicit node-id 3, alice's position 0) and the minor from [resource] minor; with
// --timestamps every line starts with drbdsetup's time stamp; when the daemon goes down the stream ends with
// destroy lines and exit 0.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { buildDist, cliPath, freePort, killChildren, ResourcePair, until, waitExit } from './resource-helpers.js';

let dir: string;
const pair = new ResourcePair();
const watchers: ChildProcess[] = [];

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'drbdts-events-'));
  await buildDist();
});

afterAll(async () => {
  for (const watcher of watchers) watcher.kill('SIGKILL');
  await killChildren();
  await rm(dir, { recursive: true, force: true });
});

function watch(node: 'alice' | 'bob', ...flags: string[]): { child: ChildProcess; output: () => string } {
  const child = spawn(process.execPath, [cliPath, 'events2', 'r0', '--config', pair.resource.file, '--node', node, ...flags],
    { stdio: ['ignore', 'pipe', 'pipe'] });
  watchers.push(child);
  let text = '';
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => { text += chunk; });
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => { text += chunk; });
  return { child, output: () => text };
}

/** Index of the first line at or after `from` that contains every one of `parts`; -1 when none. */
function findLine(lines: string[], from: number, ...parts: string[]): number {
  for (let i = from; i < lines.length; i += 1) if (parts.every((part) => lines[i]!.includes(part))) return i;
  return -1;
}

describe('events2', () => {
  it('pushes every state of a short resync, with config node ids, minor and timestamps', async () => {
    const [portA, portB] = [await freePort(), await freePort()];
    const file = path.join(dir, 'r0.toml');
    await writeFile(file, `[resource]
name = "r0"
protocol = "C"
shared-secret = "test-secret"
minor = 7

[disk]
size = "8MiB"

[node.alice]
address = "127.0.0.1:${portA}"
disk = "${dir}/alice.img"
nbd = "unix:${dir}/alice.nbd"
control = "${dir}/alice.ctl"

[node.bob]
node-id = 3
address = "127.0.0.1:${portB}"
disk = "${dir}/bob.img"
nbd = "unix:${dir}/bob.nbd"
control = "${dir}/bob.ctl"
`);
    pair.resource = { file, dir };
    expect((await pair.cli('alice', 'create-md')).code).toBe(0);
    expect((await pair.cli('bob', 'create-md')).code).toBe(0);
    await pair.up('alice');
    await pair.up('bob');
    await until('connection', async () => (await pair.status('alice')).connection === 'Connected');

    const aliceEvents = watch('alice', '--timestamps');
    const bobEvents = watch('bob');
    await until('both initial dumps', async () => aliceEvents.output().includes('exists -') && bobEvents.output().includes('exists -'));
    const now = await pair.cli('bob', 'events2', '--now');
    expect(now.stdout).toContain('exists device name:r0 volume:0 minor:7 disk:Inconsistent');
    expect(now.stdout).toContain('exists connection name:r0 peer-node-id:0 conn-name:alice connection:Connected');

    expect((await pair.cli('alice', 'primary', '--force')).code).toBe(0);
    await until('the resync to end on both', async () => {
      const [a, b] = [await pair.status('alice'), await pair.status('bob')];
      return a.connection === 'Connected' && b.connection === 'Connected' && b.disk === 'UpToDate' && a.peer.disk === 'UpToDate';
    });
    await until('alice\'s stream to show Established after SyncSource', async () => {
      const lines = aliceEvents.output().split('\n');
      const sync = findLine(lines, 0, 'change peer-device', 'replication:SyncSource');
      return sync >= 0 && findLine(lines, sync + 1, 'change peer-device', 'replication:Established') >= 0;
    });
    await until('bob\'s stream to show Established and UpToDate after SyncTarget', async () => {
      const lines = bobEvents.output().split('\n');
      const sync = findLine(lines, 0, 'change peer-device', 'replication:SyncTarget');
      return sync >= 0 && findLine(lines, sync + 1, 'change peer-device', 'replication:Established') >= 0
        && findLine(lines, sync + 1, 'change device', 'disk:UpToDate') >= 0;
    });

    const aliceLines = aliceEvents.output().trim().split('\n');
    // drbdsetup's --timestamps: local time with microseconds and the UTC offset, then the event.
    for (const line of aliceLines) {
      expect(line).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d (exists|change|call|response) /);
    }
    expect(aliceEvents.output()).toMatch(/exists connection name:r0 peer-node-id:3 conn-name:bob connection:Connected/);
    expect(aliceEvents.output()).toMatch(/exists device name:r0 volume:0 minor:7 disk:Inconsistent/);
    expect(aliceEvents.output()).toMatch(/change resource name:r0 role:Primary/);
    const bobLines = bobEvents.output().trim().split('\n');
    expect(bobLines.every((line) => !/^\d{4}-/.test(line))).toBe(true);
    expect(findLine(bobLines, 0, 'peer-node-id:0', 'conn-name:alice')).toBeGreaterThanOrEqual(0);
    expect(findLine(bobLines, 0, 'peer-node-id:1')).toBe(-1);
    // Inconsistent while SyncTarget, UpToDate only after.
    const syncTarget = findLine(bobLines, 0, 'replication:SyncTarget');
    expect(findLine(bobLines, 0, 'change device', 'disk:UpToDate')).toBeGreaterThan(syncTarget);

    // Down: bob's stream ends with the objects destroyed and exit 0.
    expect((await pair.cli('bob', 'down')).code).toBe(0);
    const exit = await waitExit(bobEvents.child);
    expect(exit.code).toBe(0);
    expect(bobEvents.output()).toMatch(/destroy peer-device name:r0 peer-node-id:0 conn-name:alice volume:0\ndestroy connection name:r0 peer-node-id:0 conn-name:alice\ndestroy device name:r0 volume:0 minor:7\ndestroy resource name:r0\n$/);
    // alice sees the connection go.
    await until('alice to see bob go', async () => /change connection name:r0 peer-node-id:3 conn-name:bob connection:Connecting/.test(aliceEvents.output()));
  });
});
