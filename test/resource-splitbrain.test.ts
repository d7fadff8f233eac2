// Split brain through the operator CLI, with two real node daemons (`drbdts up` child processes): both nodes
// write while disconnected (alice as Primary, bob promoted by a failover that did not know alice still ran);
// reconnecting is refused as a split brain (after-sb-1pri = disconnect); the operator demotes the victim and
// connects it with --discard-my-data; after the resync both data areas are byte-identical, hold the survivor's
// writes and not the victim's, and only the blocks changed on either side were resynced. Second: with
// after-sb-0pri = discard-zero-changes, a split brain where one side made a new generation but wrote nothing is
// resolved automatically in favour of the side with changes.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { buildDist, freePort, killChildren, ResourcePair, until, writeResourceConfig } from './resource-helpers.js';

let dir: string;
const pair = new ResourcePair();
const cli = pair.cli.bind(pair);
const status = pair.status.bind(pair);
const up = pair.up.bind(pair);

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'drbdts-sb-'));
  await buildDist();
});

afterAll(async () => {
  await killChildren();
  await rm(dir, { recursive: true, force: true });
});

describe('split brain and its manual recovery through the CLI', () => {
  it('connect --discard-my-data on the victim resolves it', async () => {
    const sbDir = path.join(dir, 'sb');
    await mkdir(sbDir);
    pair.resource = await writeResourceConfig(sbDir, { ports: [await freePort(), await freePort()], size: '16MiB' });
    expect((await cli('alice', 'create-md')).code).toBe(0);
    expect((await cli('bob', 'create-md')).code).toBe(0);
    await up('alice');
    await up('bob');
    await until('connection', async () => (await status('alice')).connection === 'Connected');
    expect((await cli('alice', 'primary', '--force')).code).toBe(0);
    expect((await cli('alice', 'resync', '--wait', '--interval', '0.2')).code).toBe(0);
    expect((await cli('alice', 'disconnect')).code).toBe(0);
    await until('alice StandAlone', async () => (await status('alice')).connection === 'StandAlone');
    await pair.qemuWrite('alice', 0xaa, 0, 1024 * 1024);
    // bob loses sight of alice and is promoted (a failover decision made without knowing alice still runs).
    const promoted = await cli('bob', 'primary');
    expect(promoted.code, promoted.stderr).toBe(0);
    await pair.qemuWrite('bob', 0xbb, 4 * 1024 * 1024, 1024 * 1024);
    expect((await cli('bob', 'secondary')).code).toBe(0);
    expect((await cli('alice', 'connect')).code).toBe(0);
    // The UUIDs show both sides changed the data: no automatic resolution (after-sb-1pri = disconnect).
    await until('split brain detected', async () => {
      const a = await status('alice');
      return a.connection === 'StandAlone' && (await status('bob')).connection !== 'Connected';
    });
    await sleep(1000);
    expect((await status('alice')).connection).toBe('StandAlone');
    if ((await status('bob')).connection !== 'StandAlone') expect((await cli('bob', 'disconnect')).code).toBe(0);
    const victim = await cli('bob', 'connect', '--discard-my-data');
    expect(victim.code, victim.stderr).toBe(0);
    expect((await cli('alice', 'connect')).code).toBe(0);
    await until('resynced', async () => {
      const a = await status('alice');
      return a.connection === 'Connected' && a.resync === null && a.peer.disk === 'UpToDate' && a.outOfSyncBytes === 0;
    });
    const bobStatus = await status('bob');
    expect(bobStatus).toMatchObject({ role: 'Secondary', disk: 'UpToDate' });
    // Only the blocks changed on either side were sent (2 MiB), not the whole 16 MiB device.
    expect(bobStatus.counters.resyncReceivedBytes).toBeLessThanOrEqual(4 * 1024 * 1024);
    expect((await cli('alice', 'down')).code).toBe(0);
    expect((await cli('bob', 'down')).code).toBe(0);
    const a = (await readFile(path.join(sbDir, 'alice.img'))).subarray(0, 16 * 1024 * 1024);
    const b = (await readFile(path.join(sbDir, 'bob.img'))).subarray(0, 16 * 1024 * 1024);
    expect(a.equals(b)).toBe(true);
    expect(a[0]).toBe(0xaa);
    expect(b[4 * 1024 * 1024]).toBe(0); // bob's split-brain write was discarded
  });

  it('after-sb-0pri = discard-zero-changes resolves a split brain where one side changed nothing', async () => {
    const sbDir = path.join(dir, 'auto');
    await mkdir(sbDir);
    pair.resource = await writeResourceConfig(sbDir, {
      ports: [await freePort(), await freePort()], size: '16MiB', extra: '\n[net]\nafter-sb-0pri = "discard-zero-changes"\n',
    });
    expect((await cli('alice', 'create-md')).code).toBe(0);
    expect((await cli('bob', 'create-md')).code).toBe(0);
    await up('alice');
    await up('bob');
    await until('connection', async () => (await status('alice')).connection === 'Connected');
    expect((await cli('alice', 'primary', '--force')).code).toBe(0);
    expect((await cli('alice', 'resync', '--wait', '--interval', '0.2')).code).toBe(0);
    expect((await cli('alice', 'disconnect')).code).toBe(0);
    await until('alice StandAlone', async () => (await status('alice')).connection === 'StandAlone');
    await pair.qemuWrite('alice', 0xcc, 8 * 1024 * 1024, 64 * 1024);
    expect((await cli('alice', 'secondary')).code).toBe(0);
    // bob starts a generation of its own without writing anything: a split brain with zero changes on bob.
    expect((await cli('bob', 'new-current-uuid')).code).toBe(0);
    expect((await cli('alice', 'connect')).code).toBe(0);
    await until('automatic recovery', async () => {
      const a = await status('alice');
      return a.connection === 'Connected' && a.resync === null && a.peer.disk === 'UpToDate' && a.outOfSyncBytes === 0;
    });
    expect(await status('bob')).toMatchObject({ disk: 'UpToDate', connection: 'Connected' });
    expect((await cli('alice', 'down')).code).toBe(0);
    expect((await cli('bob', 'down')).code).toBe(0);
    const a = (await readFile(path.join(sbDir, 'alice.img'))).subarray(0, 16 * 1024 * 1024);
    const b = (await readFile(path.join(sbDir, 'bob.img'))).subarray(0, 16 * 1024 * 1024);
    expect(b[8 * 1024 * 1024]).toBe(0xcc);
    expect(a.equals(b)).toBe(true);
  });
});
