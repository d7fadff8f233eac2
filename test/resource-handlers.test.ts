// Proves DRBD's handlers with two real daemons: each handler is a shell command that writes its DRBD_*
// environment to a file in the test's temp dir, and the test reads the file.
// - split-brain: both nodes write while disconnected and both stay Primary; at connect the split brain is
//   logged and shown in status with the words "split brain", and each node runs its handler.
// - fence-peer ([net] fencing = "resource-only"): the Primary loses its peer (SIGKILL); exit code 4 makes the
//   peer's disk Outdated in status (and events2 shows the call); a failing handler (exit 1) leaves it DUnknown
//   and says so in the log. A Secondary promoted without its peer runs it first: refused on exit 1 and 6,
//   promoted on exit 5.
// - before-resync-target / after-resync-target: run on the SyncTarget around a resync; a before-resync-target
//   that exits 1 drops the connection without resyncing, and with exit 0 the resync runs.
// - local-io-error: the Secondary's backing file sits on FUSE (nbdfuse over nbdkit's error filter), so its
//   writes fail with a real EIO once a trigger file exists; its handler runs, on both replication data paths.
//   That handler sleeps past [handlers] timeout, so the log must show it killed.
import { afterEach, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readFile, readdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Cluster, repoRoot, run } from './replication-cluster.js';
import { waitFor } from './replication-helpers.js';
import { mountFailingDisk } from './helpers/failing-disk.js';

let cluster: Cluster | null = null;
const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

const MiB = 1024 * 1024;

/** A handler command that records its DRBD variables in DIR/NAME.NODE_ID.env, then runs `then`. */
function recorder(dir: string, name: string, then = 'exit 0'): string {
  return `'env | grep -E "^(DRBD_|UP_TO_DATE_NODES)" | sort > ${dir}/${name}.$DRBD_NODE_ID.env.tmp; `
    + `mv ${dir}/${name}.$DRBD_NODE_ID.env.tmp ${dir}/${name}.$DRBD_NODE_ID.env; ${then}'`;
}

async function readEnv(file: string): Promise<Record<string, string>> {
  const text = await readFile(file, 'utf8');
  return Object.fromEntries(text.trim().split('\n').map((line) => {
    const eq = line.indexOf('=');
    return [line.slice(0, eq), line.slice(eq + 1)];
  }));
}

async function waitFile(file: string, timeoutMs = 20_000): Promise<void> {
  await waitFor(`${path.basename(file)} to be written`, () => existsSync(file), timeoutMs, 100);
}

describe('handlers', () => {
  it('split-brain: logged and shown as a split brain, the handler runs on both nodes', async () => {
    cluster = new Cluster({ sizeMiB: 16, handlers: `split-brain = ${recorder('HANDLERS', 'split-brain')}` });
    await cluster.setup();
    const dir = cluster.dir;
    await rewriteHandlersDir(cluster, dir);
    await cluster.startSkippingSync();
    expect((await cluster.cli('alice', 'disconnect')).code).toBe(0);
    await cluster.waitState('alice', 'StandAlone', (s) => s.connection === 'StandAlone');
    await cluster.waitState('bob', 'bob without alice', (s) => s.connection !== 'Connected');
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xaa 0 1M', cluster.nbdUri('alice')])).code).toBe(0);
    const promoted = await cluster.cli('bob', 'primary');
    expect(promoted.code, promoted.stderr).toBe(0);
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xbb 4M 1M', cluster.nbdUri('bob')])).code).toBe(0);
    // Both stay Primary: the case that used to be reported only as "both nodes are Primary".
    expect((await cluster.cli('alice', 'connect')).code).toBe(0);
    const alice = await cluster.waitState('alice', 'split brain in status', (s) => s.splitBrain != null);
    expect(alice.connection).toBe('StandAlone');
    expect(alice.splitBrain.reason).toMatch(/split brain/);
    expect((await cluster.cli('alice', 'status')).stdout).toMatch(/^ {4}split brain.*"drbdts connect r0 --discard-my-data"/m);
    expect(await cluster.log('alice')).toMatch(/split brain detected/);
    for (const [node, nodeId, peer, peerId] of [['alice', '0', 'bob', '1'], ['bob', '1', 'alice', '0']] as const) {
      await waitFile(path.join(dir, `split-brain.${nodeId}.env`));
      const env = await readEnv(path.join(dir, `split-brain.${nodeId}.env`));
      expect(env).toMatchObject({
        DRBD_RESOURCE: 'r0', DRBD_MINOR: '0', DRBD_VOLUME: '0', DRBD_NODE_ID: nodeId, DRBD_MY_NODE_ID: nodeId,
        DRBD_PEER: peer, DRBD_PEER_NODE_ID: peerId, DRBD_PEER_ADDRESS: '127.0.0.1', DRBD_PEER_AF: 'ipv4',
        DRBD_MY_ADDRESS: '127.0.0.1', DRBD_BACKING_DEV: cluster.imagePath(node), DRBD_CONF: cluster.configPath(node),
        [`DRBD_NODE_ID_${nodeId}`]: node, [`DRBD_NODE_ID_${peerId}`]: peer,
      });
      await waitFor(`${node}'s log to show the exit code`, async () => /split-brain handler exit code 0/.test(await cluster!.log(node)));
    }
  });

  it('fence-peer: exit 4 outdates the lost peer; a failing handler leaves it unknown', async () => {
    cluster = new Cluster({
      sizeMiB: 16, extraNet: 'fencing = "resource-only"',
      handlers: `fence-peer = ${recorder('HANDLERS', 'fence-peer', 'exit $(cat HANDLERS/fence-exit)')}`,
    });
    await cluster.setup();
    const dir = cluster.dir;
    await rewriteHandlersDir(cluster, dir);
    await writeFile(path.join(dir, 'fence-exit'), '4\n');
    await cluster.startSkippingSync();
    // events2 on alice shows the handler's call and response.
    const events = spawn('node', [path.join(repoRoot, 'bin', 'drbdts.js'), 'events2', 'r0', '--config', cluster.configPath('alice'),
      '--node', 'alice'], { stdio: ['ignore', 'pipe', 'pipe'] });
    cleanups.push(async () => {
      events.kill('SIGKILL');
    });
    let eventText = '';
    events.stdout!.on('data', (chunk) => (eventText += chunk));
    await waitFor('the events2 dump', () => eventText.includes('exists -'));
    cluster.kill('bob');
    const fenced = await cluster.waitState('alice', 'bob Outdated after fencing', (s) =>
      s.connection !== 'Connected' && s.peer.disk === 'Outdated');
    expect(fenced.role).toBe('Primary');
    const env = await readEnv(path.join(dir, 'fence-peer.0.env'));
    expect(env).toMatchObject({ DRBD_RESOURCE: 'r0', DRBD_PEER: 'bob', DRBD_PEER_NODE_ID: '1', UP_TO_DATE_NODES: '0x00000001' });
    expect(await cluster.log('alice')).toMatch(/fence-peer handler returned 4 \(peer was fenced \(outdated\)\)/);
    await waitFor('the helper lines in events2', () => /^response helper /m.test(eventText));
    expect(eventText).toMatch(/^call helper name:r0 volume:0 minor:0 peer-node-id:1 helper:fence-peer\n/m);
    expect(eventText).toMatch(/^response helper name:r0 volume:0 minor:0 peer-node-id:1 helper:fence-peer status:4\n/m);
    // In order: the connection goes, the handler is called, answers, and the peer's disk is Outdated.
    const order = ['change connection name:r0 peer-node-id:1 conn-name:bob connection:Connecting', 'call helper',
      'response helper', 'change peer-device name:r0 peer-node-id:1 conn-name:bob volume:0 replication:Off peer-disk:Outdated'];
    const positions = order.map((text) => eventText.indexOf(text));
    expect(positions.every((at) => at >= 0), eventText).toBe(true);
    expect([...positions].sort((a, b) => a - b), eventText).toEqual(positions);

    // bob comes back: connected again, its disk known again; then lost again with a failing handler.
    await cluster.start('bob');
    await cluster.waitInSync();
    await writeFile(path.join(dir, 'fence-exit'), '1\n');
    cluster.kill('bob');
    await waitFor('the failing fence-peer to be logged', async () =>
      /fence-peer handler failed/.test(await cluster!.log('alice')), 20_000);
    expect((await cluster.status('alice')).peer.disk).toBe('DUnknown');

    // A Primary going down is no lost peer: no third call.
    await cluster.start('bob');
    await cluster.waitInSync();
    await cluster.down('alice');
    expect((await cluster.log('alice')).match(/calling the fence-peer handler/g)).toHaveLength(2);
  });

  it('fence-peer: a Secondary promoted without its peer asks the handler first, and is refused when it fails', async () => {
    // Both Secondary and UpToDate; alice dies; bob is promoted (a failover). With fencing, bob first runs
    // fence-peer: exit 1 (failed) refuses the promotion, exit 6 (the peer is Primary) too, exit 5 (unreachable,
    // assumed dead) with bob UpToDate outdates alice and bob becomes Primary.
    cluster = new Cluster({
      sizeMiB: 16, extraNet: 'fencing = "resource-only"',
      handlers: `fence-peer = ${recorder('HANDLERS', 'fence-peer', 'exit $(cat HANDLERS/fence-exit)')}`,
    });
    await cluster.setup();
    const dir = cluster.dir;
    await rewriteHandlersDir(cluster, dir);
    await writeFile(path.join(dir, 'fence-exit'), '1\n');
    await cluster.startSkippingSync();
    expect((await cluster.cli('alice', 'secondary')).code).toBe(0);
    cluster.kill('alice');
    await cluster.waitState('bob', 'alice gone', (s) => s.connection === 'Connecting');
    const failed = await cluster.cli('bob', 'primary');
    expect(failed.code).toBe(1);
    expect(failed.stderr).toMatch(/fencing is resource-only and the peer's disk is unknown; the fence-peer handler did not outdate it \(exit code 1/);
    await writeFile(path.join(dir, 'fence-exit'), '6\n');
    const active = await cluster.cli('bob', 'primary');
    expect(active.code).toBe(1);
    expect(active.stderr).toMatch(/says the peer alice is Primary \(exit code 6\)/);
    expect((await cluster.status('bob')).role).toBe('Secondary');
    await writeFile(path.join(dir, 'fence-exit'), '5\n');
    const promoted = await cluster.cli('bob', 'primary');
    expect(promoted.code, promoted.stderr).toBe(0);
    const bob = await cluster.status('bob');
    expect(bob.role).toBe('Primary');
    expect(bob.peer.disk).toBe('Outdated');
    const env = await readEnv(path.join(dir, 'fence-peer.1.env'));
    expect(env).toMatchObject({ DRBD_PEER: 'alice', DRBD_PEER_NODE_ID: '0', DRBD_CSTATE: 'Connecting', UP_TO_DATE_NODES: '0x00000002' });
    expect(await cluster.log('bob')).toMatch(/fence-peer handler returned 5 \(peer is unreachable, assumed to be dead\)/);
  });

  it('before-resync-target and after-resync-target run on the SyncTarget; a failing before drops the connection', async () => {
    cluster = new Cluster({
      sizeMiB: 16,
      handlers: [
        `before-resync-target = ${recorder('HANDLERS', 'before-resync-target', 'exit $(cat HANDLERS/before-exit)')}`,
        `after-resync-target = ${recorder('HANDLERS', 'after-resync-target')}`,
      ].join('\n'),
    });
    await cluster.setup();
    const dir = cluster.dir;
    await rewriteHandlersDir(cluster, dir);
    await writeFile(path.join(dir, 'before-exit'), '1\n');
    await cluster.startSkippingSync();
    await cluster.down('bob');
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 2M 1M', cluster.nbdUri('alice')])).code).toBe(0);
    await cluster.start('bob');
    // before-resync-target says no: no resync, bob StandAlone and still missing the 1 MiB.
    await waitFile(path.join(dir, 'before-resync-target.1.env'));
    await cluster.waitState('bob', 'StandAlone after the refusal', (s) => s.connection === 'StandAlone');
    expect(await cluster.log('bob')).toMatch(/before-resync-target handler returned 1/);
    const refused = await cluster.status('bob');
    expect(refused.outOfSyncBytes).toBeGreaterThanOrEqual(MiB);
    // Marked Inconsistent when the resync was decided, as an interrupted resync leaves it: not promotable.
    expect(refused.disk).toBe('Inconsistent');
    expect((await cluster.cli('bob', 'primary')).code).toBe(1);
    expect(existsSync(path.join(dir, 'after-resync-target.1.env'))).toBe(false);
    const before = await readEnv(path.join(dir, 'before-resync-target.1.env'));
    expect(before).toMatchObject({ DRBD_RESOURCE: 'r0', DRBD_NODE_ID: '1', DRBD_PEER: 'alice', DRBD_CSTATE: 'Connected' });

    await writeFile(path.join(dir, 'before-exit'), '0\n');
    expect((await cluster.cli('bob', 'connect')).code).toBe(0);
    await cluster.waitInSync();
    await waitFile(path.join(dir, 'after-resync-target.1.env'));
    const after = await readEnv(path.join(dir, 'after-resync-target.1.env'));
    expect(after).toMatchObject({ DRBD_RESOURCE: 'r0', DRBD_NODE_ID: '1', DRBD_PEER_NODE_ID: '0' });
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
    // The SyncSource runs neither.
    expect((await readdir(dir)).filter((file) => file.endsWith('.0.env'))).toEqual([]);
  });

  for (const dataPath of ['native', 'js'] as const) {
    it(`local-io-error runs when the Secondary's disk returns EIO (${dataPath} data path), killed at its timeout`, async () => {
      // bob's backing file: nbdfuse exposes an nbdkit memory disk whose writes fail with EIO while `trigger` exists.
      const mountDir = await failingDisk('bob.img', 32 * MiB);
      cluster = new Cluster({
        sizeMiB: 16, env: { alice: { DRBDTS_REPL_DATA_PATH: dataPath }, bob: { DRBDTS_REPL_DATA_PATH: dataPath } },
        handlers: `local-io-error = ${recorder('HANDLERS', 'local-io-error', 'sleep 30')}\ntimeout = "2s"`,
        diskDirs: { bob: mountDir.dir },
      });
      await cluster.setup();
      const dir = cluster.dir;
      await rewriteHandlersDir(cluster, dir);
      await cluster.startSkippingSync();
      await writeFile(mountDir.trigger, '');
      // alice's write reaches bob, whose disk fails it.
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 1M 64k', cluster.nbdUri('alice')]);
      await waitFile(path.join(dir, 'local-io-error.1.env'));
      const env = await readEnv(path.join(dir, 'local-io-error.1.env'));
      expect(env).toMatchObject({ DRBD_RESOURCE: 'r0', DRBD_NODE_ID: '1', DRBD_BACKING_DEV: path.join(mountDir.dir, 'bob.img') });
      await waitFor('the handler to be killed at its timeout', async () =>
        /local-io-error handler did not finish within its timeout/.test(await cluster!.log('bob')), 10_000);
      await waitFor('its end to be logged', async () => /local-io-error handler exit code none \(killed\)/.test(await cluster!.log('bob')), 10_000);
      expect(existsSync(path.join(dir, 'local-io-error.0.env'))).toBe(false);
    });
  }
});

/** The configs name the handlers' directory HANDLERS (the temp dir is made by setup): put the real one in. */
async function rewriteHandlersDir(c: Cluster, dir: string): Promise<void> {
  for (const node of ['alice', 'bob'] as const) {
    const file = c.configPath(node);
    await writeFile(file, (await readFile(file, 'utf8')).replaceAll('HANDLERS', dir));
  }
}

/** A FUSE-mounted bob.img whose writes fail with EIO while the returned trigger file exists; unmounted after the test. */
async function failingDisk(fileName: string, sizeBytes: number): Promise<{ dir: string; trigger: string }> {
  const disk = await mountFailingDisk(fileName, sizeBytes);
  cleanups.push(disk.cleanup);
  return disk;
}
