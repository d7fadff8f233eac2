// The operator CLI (src/cli/resource.ts) as an operator uses it: `node bin/drbdts.js COMMAND r0 --config F
// --node N` in child processes, against two real node daemons (`drbdts up`, child processes) on loopback.
// Proves: create-md creates/refuses (existing metadata, disk too small) with exit 1 and a clear message; bad
// configs and bad usage are rejected naming the problem; commands without a daemon say the resource is not
// up; the fresh-pair workflow (promote refused while Inconsistent, primary --force, resync --wait); forbidden
// transitions exit 1 with the daemon's reason; resync progress, pause, resume and rate on real random data
// written through NBD with nbdcopy; disconnect/connect, verify, new-current-uuid, events2, status layouts; a
// second `up` on a running node fails while the first keeps serving; a SIGKILLed daemon restarts (stale socket
// and lock recognised); `down` and SIGTERM stop daemons with exit 0; a fresh pair skips the initial sync with
// new-current-uuid --clear-bitmap.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import type { ResourceStatus } from '../src/resource/control.js';
import { buildDist, cliPath, freePort, killChildren, ResourcePair, runCli, spawnUntil, until, waitExit, writeResourceConfig } from './resource-helpers.js';

let dir: string;
const pair = new ResourcePair();
const cli = pair.cli.bind(pair);
const status = pair.status.bind(pair);
const up = pair.up.bind(pair);

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'drbdts-cli-'));
  await buildDist();
  pair.resource = await writeResourceConfig(dir, { ports: [await freePort(), await freePort()], size: '64MiB' });
});

afterAll(async () => {
  await killChildren();
  await rm(dir, { recursive: true, force: true });
});

describe('drbdts create-md and bad input', () => {
  it('creates metadata, refuses to overwrite it without --force, and refuses a disk too small', async () => {
    const created = await cli('alice', 'create-md');
    expect(created.code, created.stderr).toBe(0);
    expect(created.stdout).toContain('r0 on alice: new metadata (internal, at the end of');
    expect((await stat(path.join(dir, 'alice.img'))).size).toBeGreaterThan(64 * 1024 * 1024);
    const again = await cli('alice', 'create-md');
    expect(again.code).toBe(1);
    expect(again.stderr).toContain('already holds drbdts metadata (resource r0, node alice');
    expect(again.stderr).toContain('refusing to overwrite it without --force');
    const forced = await cli('alice', 'create-md', '--force');
    expect(forced.code, forced.stderr).toBe(0);
    // bob's disk exists but is far too small for [disk] size = 64MiB
    await writeFile(path.join(dir, 'bob.img'), Buffer.alloc(1024 * 1024));
    const small = await cli('bob', 'create-md');
    expect(small.code).toBe(1);
    expect(small.stderr).toMatch(/disk .*bob\.img is too small: it has 1048576 bytes, size 67108864 plus \d+ bytes of internal metadata needs \d+/);
    await rm(path.join(dir, 'bob.img'));
    const bob = await cli('bob', 'create-md');
    expect(bob.code, bob.stderr).toBe(0);
  });

  it('rejects bad configs and bad usage with precise messages', async () => {
    const badFile = path.join(dir, 'bad.toml');
    await writeFile(badFile, '[resource]\nname = "r0"\nprotocol = "Z"\nshared-secret = "x"\n');
    const bad = await runCli(['status', 'r0', '--config', badFile, '--node', 'alice']);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toBe(`drbdts status: ${badFile}: resource.protocol: "Z" is not one of "A", "B", "C"\n`);
    const missing = await runCli(['status', 'r0', '--config', path.join(dir, 'nope.toml')]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain('nope.toml: no such file (pass --config FILE)');
    const wrongNode = await cli('alice', 'status', '--node', 'carol');
    expect(wrongNode.code).toBe(1);
    expect(wrongNode.stderr).toContain('node "carol" (from --node) is not in this resource; its nodes are alice, bob');
    const wrongName = await runCli(['status', 'r1', '--config', pair.resource.file, '--node', 'alice']);
    expect(wrongName.code).toBe(1);
    expect(wrongName.stderr).toContain('resource.name: is "r0", but the command names resource "r1"');
    const flag = await cli('alice', 'primary', '--forse');
    expect(flag.code).toBe(2);
    expect(flag.stderr).toContain('"primary" does not take --forse (it takes --force)');
    const noRes = await runCli(['primary']);
    expect(noRes.code).toBe(2);
    expect(noRes.stderr).toContain('"primary" needs the resource name');
    const rate = await cli('alice', 'resync', '--rate', 'fast');
    expect(rate.code).toBe(2);
    expect(rate.stderr).toContain('--rate: "fast" is not a rate in bytes per second');
  });

  it('up without metadata fails with exit 1 and says what to run', async () => {
    const bare = path.join(dir, 'nometa');
    await import('node:fs/promises').then((fs) => fs.mkdir(bare));
    const config = await writeResourceConfig(bare, { ports: [await freePort(), await freePort()] });
    const result = await runCli(['up', 'r0', '--config', config.file, '--node', 'bob']);
    expect(result.code).toBe(1);
    expect(result.stderr).toContain(`disk ${path.join(bare, 'bob.img')} does not exist (run "drbdts create-md r0")`);
  });

  it('says the resource is not up when no daemon runs', async () => {
    for (const command of ['primary', 'resync', 'events2', 'role']) {
      const result = await cli('alice', command);
      expect(result.code).toBe(1);
      expect(result.stderr).toBe(`drbdts ${command}: resource r0 is not up on node alice (no daemon at ${path.join(dir, 'alice.ctl')})\n`);
    }
    // down is a stop: a node that is not up is stopped already (exit 0, a note), as init scripts expect.
    const down = await cli('alice', 'down');
    expect(down.code, down.stderr).toBe(0);
    expect(down.stdout).toBe('r0 is not up on node alice: nothing to stop\n');
    // status also says what the stopped node's metadata holds.
    const result = await cli('alice', 'status');
    expect(result.code).toBe(1);
    expect(result.stderr).toBe(`drbdts status: resource r0 is not up on node alice (no daemon at ${path.join(dir, 'alice.ctl')})\n` +
      '  on disk: Inconsistent, was Secondary, generation 0000000000000000, out-of-sync 0 B, last stop clean\n');
  });
});

describe('drbdts against two running daemons', () => {
  it('fresh pair: promotion refused while Inconsistent; primary --force runs the initial sync', async () => {
    await up('alice');
    await up('bob');
    await until('connection', async () => (await status('alice')).connection === 'Connected');
    const text = await cli('alice', 'status');
    expect(text.stdout).toBe('r0 role:Secondary\n  disk:Inconsistent\n  bob role:Secondary\n    peer-disk:Inconsistent\n\n');
    const refused = await cli('alice', 'primary');
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain('is Inconsistent: refusing to promote');
    const forced = await cli('alice', 'primary', '--force');
    expect(forced.code, forced.stderr).toBe(0);
    const wait = await cli('alice', 'resync', '--wait', '--interval', '0.2');
    expect(wait.code, wait.stderr).toBe(0);
    expect(wait.stdout).toContain('r0: in sync with bob');
    const bob = await status('bob');
    expect(bob).toMatchObject({ role: 'Secondary', disk: 'UpToDate', connection: 'Connected', peer: { node: 'alice', role: 'Primary', disk: 'UpToDate' }, outOfSyncBytes: 0, resync: null });
    expect(bob.counters.resyncReceivedBytes).toBeGreaterThan(0);
  });

  it('refuses forbidden transitions with exit 1 and the reason', async () => {
    const second = await cli('bob', 'primary');
    expect(second.code).toBe(1);
    expect(second.stderr).toContain('the peer alice is Primary; demote it first');
    const connected = await cli('alice', 'connect');
    expect(connected.code).toBe(1);
    expect(connected.stderr).toContain('is already Connected');
    const noResync = await cli('alice', 'pause-sync');
    expect(noResync.code).toBe(1);
    expect(noResync.stderr).toContain('no resync is running');
    const invalidatePrimary = await cli('alice', 'invalidate');
    expect(invalidatePrimary.code).toBe(1);
    expect(invalidatePrimary.stderr).toContain('Primary');
    const remotePrimary = await cli('bob', 'invalidate-remote');
    expect(remotePrimary.code).toBe(1);
    expect(remotePrimary.stderr).toContain('the peer is Primary');
    const clear = await cli('alice', 'new-current-uuid', '--clear-bitmap');
    expect(clear.code).toBe(1);
    expect(clear.stderr).toContain('both nodes are already UpToDate');
    // Nothing above changed the state.
    expect(await status('alice')).toMatchObject({ role: 'Primary', disk: 'UpToDate', connection: 'Connected' });
  });

  it('shows, pauses, resumes and speeds up a resync of real data', async () => {
    const data = path.join(dir, 'random.bin');
    await writeFile(data, randomBytes(32 * 1024 * 1024));
    await promisify(execFile)('nbdcopy', [data, `nbd+unix:///?socket=${path.join(dir, 'alice.nbd')}`]);
    expect((await cli('alice', 'resync', '--rate', '2MiB')).code).toBe(0);
    const invalidate = await cli('bob', 'invalidate');
    expect(invalidate.code, invalidate.stderr).toBe(0);
    await until('resync start', async () => (await status('bob')).resync !== null, 10_000);
    const progress = await cli('bob', 'resync');
    expect(progress.code).toBe(0);
    expect(progress.stdout).toMatch(/^r0: resync from alice \((SyncTarget|PausedSyncT)\) \d+\.\d\d% [\d.]+ (KiB|MiB)\/64\.0 MiB /);
    const json = JSON.parse((await cli('bob', 'resync', '--json')).stdout) as { resync: ResourceStatus['resync'] };
    expect(json.resync).toMatchObject({ direction: 'target', totalBytes: 64 * 1024 * 1024 });
    expect((await cli('bob', 'pause-sync')).code).toBe(0);
    await until('paused', async () => (await status('alice')).connection === 'PausedSyncS', 10_000);
    const paused = await cli('bob', 'status');
    expect(paused.stdout).toMatch(/replication:PausedSyncT peer-disk:UpToDate done:\d+\.\d\d/);
    const pausedLine = await cli('alice', 'resync');
    expect(pausedLine.stdout).toMatch(/resync to bob \(PausedSyncS\) .* paused\n$/);
    // On a terminal (script(1) gives the CLI a pty) the line is a bar redrawn in place.
    const tty = await promisify(execFile)('script', ['-qfec', `${process.execPath} ${cliPath} resync r0 --config ${pair.resource.file} --node bob`, '/dev/null']);
    expect(tty.stdout).toMatch(/\r\x1b\[2Kr0 from alice \[[=> ]+\] \d+\.\d\d% [\d.]+ (KiB|MiB)\/64\.0 MiB paused/);
    const resumed = await cli('bob', 'resync', 'resume', '--rate', '1GiB');
    expect(resumed.code, resumed.stderr).toBe(0);
    const wait = await cli('bob', 'resync', '--wait', '--interval', '0.2');
    expect(wait.code, wait.stderr).toBe(0);
    const bob = await status('bob');
    expect(bob).toMatchObject({ disk: 'UpToDate', outOfSyncBytes: 0, resync: null });
    expect(bob.counters.resyncReceivedBytes).toBeGreaterThanOrEqual(32 * 1024 * 1024);
  });

  it('disconnects, reconnects, verifies, makes a new generation, and streams events', async () => {
    const stream = await spawnUntil(process.execPath, [cliPath, 'events2', 'r0', '--config', pair.resource.file, '--node', 'alice', '--interval', '0.2'], /exists -\n/);
    const full = await spawnUntil(process.execPath, [cliPath, 'events2', 'r0', '--config', pair.resource.file, '--node', 'alice', '--interval', '0.2', '--full'], /exists -\n/);
    expect((await cli('alice', 'disconnect')).code).toBe(0);
    await until('StandAlone', async () => (await status('alice')).connection === 'StandAlone');
    await until('events2 change line', async () => /^change connection name:r0 peer-node-id:1 conn-name:bob connection:StandAlone/m.test(stream.output()), 10_000);
    // Only the connection and peer-device changed: the plain stream says so, --full repeats the resource too.
    expect(stream.output()).not.toMatch(/^change resource /m);
    await until('events2 --full', async () => /^change resource name:r0 role:Primary/m.test(full.output()) && /^change connection .*StandAlone/m.test(full.output()), 10_000);
    stream.child.kill('SIGTERM');
    full.child.kill('SIGTERM');
    await waitExit(stream.child);
    await waitExit(full.child);
    expect((await cli('alice', 'status')).stdout).toContain('  bob connection:StandAlone\n');
    expect((await cli('alice', 'new-current-uuid')).code).toBe(0);
    expect((await cli('alice', 'connect')).code).toBe(0);
    await until('reconnected', async () => {
      const s = await status('alice');
      return s.connection === 'Connected' && s.resync === null && s.peer.disk === 'UpToDate';
    });
    const verify = await cli('alice', 'verify', '--wait');
    expect(verify.code, verify.stderr).toBe(0);
    expect(verify.stdout).toContain('r0: verify finished: 0 blocks out of sync');
    const events = await cli('alice', 'events2', '--now', '--statistics');
    expect(events.code).toBe(0);
    const lines = events.stdout.trim().split('\n');
    expect(lines[0]).toBe('exists resource name:r0 role:Primary suspended:no may_promote:no');
    expect(lines[1]).toMatch(/^exists device name:r0 volume:0 minor:0 disk:UpToDate size:65536 read:\d+ written:\d+ al-writes:\d+ bm-writes:\d+$/);
    expect(lines.at(-1)).toBe('exists -');
    const byFile = await runCli(['status', '--config', pair.resource.file, '--node', 'alice']); // the file names the resource
    expect(byFile.code, byFile.stderr).toBe(0);
    expect(byFile.stdout).toMatch(/^r0 role:Primary\n/);
    const stats = await cli('alice', 'status', '--statistics');
    expect(stats.stdout).toMatch(/received:\d+ sent:\d+ out-of-sync:0 pending:\d+ unacked:\d+/);
    const s = await status('alice');
    for (const key of ['networkSentBytes', 'networkReceivedBytes', 'diskWrittenBytes', 'diskReadBytes', 'resyncSentBytes', 'resyncReceivedBytes'] as const) {
      expect(typeof s.counters[key]).toBe('number');
    }
    expect(s.counters.diskWrittenBytes).toBeGreaterThanOrEqual(32 * 1024 * 1024);
    expect(s.size).toBe(64 * 1024 * 1024);
  });

  it('a second up on a running node fails and the first keeps serving', async () => {
    const second = await runCli(['up', 'r0', '--config', pair.resource.file, '--node', 'bob']);
    expect(second.code).toBe(1);
    expect(second.stderr).toMatch(/in use by another drbdts process|another daemon is already running/);
    expect((await status('bob')).connection).toBe('Connected');
  });

  it('restarts after SIGKILL (stale socket and lock), and stops with down and SIGTERM', async () => {
    const bob = pair.daemons.bob!;
    bob.kill('SIGKILL');
    await waitExit(bob);
    expect((await stat(path.join(dir, 'bob.ctl'))).isSocket()).toBe(true); // left behind
    await until('alice notices', async () => (await status('alice')).connection !== 'Connected');
    await up('bob');
    await until('reconnected after restart', async () => {
      const s = await status('alice');
      return s.connection === 'Connected' && s.resync === null && s.peer.disk === 'UpToDate';
    }, 60_000);
    expect((await cli('alice', 'secondary')).code).toBe(0);
    const down = await cli('alice', 'down');
    expect(down.code, down.stderr).toBe(0);
    expect(await waitExit(pair.daemons.alice!)).toEqual({ code: 0, signal: null });
    const gone = await cli('alice', 'status');
    expect(gone.stderr).toContain('resource r0 is not up on node alice');
    pair.daemons.bob!.kill('SIGTERM');
    expect(await waitExit(pair.daemons.bob!)).toEqual({ code: 0, signal: null });
    await expect(stat(path.join(dir, 'bob.ctl'))).rejects.toMatchObject({ code: 'ENOENT' });
  });
});

describe('fresh pair without an initial sync', () => {
  it('new-current-uuid --clear-bitmap makes both nodes UpToDate without sending data', async () => {
    const freshDir = path.join(dir, 'fresh');
    await import('node:fs/promises').then((fs) => fs.mkdir(freshDir));
    pair.resource = await writeResourceConfig(freshDir, { ports: [await freePort(), await freePort()], size: '16MiB' });
    expect((await cli('alice', 'create-md')).code).toBe(0);
    expect((await cli('bob', 'create-md')).code).toBe(0);
    // Before connecting, the operation needs the peer: refused with the reason.
    await up('alice');
    const alone = await cli('alice', 'new-current-uuid', '--clear-bitmap');
    expect(alone.code).toBe(1);
    expect(alone.stderr).toContain('is not connected to bob');
    await up('bob');
    await until('connection', async () => (await status('alice')).connection === 'Connected');
    const cleared = await cli('alice', 'new-current-uuid', '--clear-bitmap');
    expect(cleared.code, cleared.stderr).toBe(0);
    await until('both UpToDate', async () => {
      const a = await status('alice');
      return a.disk === 'UpToDate' && a.peer.disk === 'UpToDate';
    });
    const a = await status('alice');
    const b = await status('bob');
    expect(b).toMatchObject({ disk: 'UpToDate', connection: 'Connected', outOfSyncBytes: 0, resync: null });
    expect(a.uuids!.current).toBe(b.uuids!.current);
    expect(a.counters.resyncSentBytes + b.counters.resyncReceivedBytes).toBe(0);
    expect((await cli('alice', 'primary')).code).toBe(0); // UpToDate now: no --force needed
    expect((await cli('alice', 'down')).code).toBe(0);
    expect((await cli('bob', 'down')).code).toBe(0);
  });
});
