// Proves the operator surface a DRBD init or notify script relies on, through the CLI against real daemons:
// - waiting: wait-connect and wait-sync return once the pair is connected / in sync, time out with exit 5, and
//   are refused with exit 1 on a StandAlone node; `resync --wait` started before the peer is up waits through
//   Connecting and ends when the initial sync has;
// - `down` is refused while an NBD client holds the export (the message names it), `--force` stops anyway, and a
//   `down` of a node that is not up exits 0 with a note;
// - errors that explain: a wrong shared secret shows in `status` (text and --json) on both nodes; a disk
//   truncated after create-md, a config size above the metadata's, a relative control path, a control socket
//   that cannot be made or reached, a missing NBD socket directory and a port taken on the connecting node's own
//   address each stop with a message naming the thing at fault and what to do;
// - the peer link: both nodes listen and dial; with both reachable the session alice (first by name) dialled is
//   the only one; when alice cannot reach bob, bob's session connects them;
// - `--json` on role/cstate/dstate, `get-gi` from the daemon and from a stopped node's metadata, `dump` (the configuration with its defaults) reading back to itself, usage errors (an unknown command included) exit 2, `drbdts --help` lists
//   every command, and docs/operators.md documents each resource command and the exit codes.
import { spawn } from 'node:child_process';
import { chmod, mkdir, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Cluster, repoRoot, run, type RunResult } from './replication-cluster.js';
import { buildDist, cliPath } from './resource-helpers.js';

let cluster: Cluster | null = null;
beforeAll(async () => {
  await buildDist();
});
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
});

async function newCluster(options: ConstructorParameters<typeof Cluster>[0] = {}): Promise<Cluster> {
  cluster = new Cluster({ sizeMiB: 64, ...options });
  await cluster.setup();
  return cluster;
}

/** `drbdts ARGS` with no resource arguments added (usage tests). */
function drbdts(...args: string[]): Promise<RunResult> {
  return run(process.execPath, [cliPath, ...args], { env: { ...process.env, DRBDTS_LOG_LEVEL: 'warn' } });
}

/** Runs a CLI command of `node` and measures how long it took. */
async function timed(c: Cluster, node: 'alice' | 'bob', ...args: string[]): Promise<RunResult & { ms: number }> {
  const started = Date.now();
  const [command, ...rest] = args;
  const result = await c.cli(node, command!, ...rest);
  return { ...result, ms: Date.now() - started };
}

async function editConfig(c: Cluster, node: 'alice' | 'bob', edit: (text: string) => string): Promise<void> {
  const file = c.configPath(node);
  await writeFile(file, edit(await readFile(file, 'utf8')));
}

describe('usage, help and --json on queries', () => {
  it('exits 2 on usage errors, lists every command in --help', async () => {
    const unknown = await drbdts('wait-fr');
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain('unknown command "wait-fr" (drbdts --help lists them)');
    const bare = await drbdts();
    expect(bare.code).toBe(2);
    expect(bare.stderr).toMatch(/^Usage: drbdts COMMAND/);
    const help = await drbdts('--help');
    expect(help.code).toBe(0);
    const commands = ['serve', 'create-md', 'up', 'down', 'primary', 'secondary', 'connect', 'disconnect', 'invalidate',
      'invalidate-remote', 'new-current-uuid', 'verify', 'status', 'resync', 'pause-sync', 'resume-sync', 'wait-connect',
      'wait-sync', 'role', 'cstate', 'dstate', 'events2', 'dump-md', 'dump', 'get-gi', 'dirsync', 'dirsync-server'];
    for (const command of commands) {
      expect(help.stdout, `--help lists ${command}`).toMatch(new RegExp(`(^|[ ,])${command} `, 'm'));
      const own = await drbdts(command, '--help');
      expect(own.code, `${command} --help: ${own.stderr}`).toBe(0);
    }
    expect(help.stdout).toContain('Exit codes: 0 done, 1 refused or failed, 2 bad usage, 5 a wait timed out');
    // docs/operators.md documents each resource command and has the exit code table.
    const docs = await readFile(path.join(repoRoot, 'docs', 'operators.md'), 'utf8');
    for (const command of commands.filter((name) => !['serve', 'dirsync', 'dirsync-server'].includes(name))) {
      expect(docs, `docs/operators.md documents ${command}`).toMatch(new RegExp(`^\\| \`${command} RES|, \`${command} RES`, 'm'));
    }
    for (const code of [0, 1, 2, 5]) expect(docs).toMatch(new RegExp(`^\\| ${code} \\| `, 'm'));
    const badTimeout = await drbdts('wait-connect', 'r0', '--timeout', 'soon');
    expect(badTimeout.code).toBe(2);
    expect(badTimeout.stderr).toContain('--timeout: "soon" is not a number of seconds');
  });
});

describe('waiting for the connection and the resync', () => {
  it('wait-connect, wait-sync and resync --wait wait through Connecting, time out with 5, refuse StandAlone with 1', async () => {
    const c = await newCluster();
    await c.start('alice');
    const timeoutAlone = await c.cli('alice', 'resync', '--timeout', '3');
    expect(timeoutAlone.code).toBe(2);
    expect(timeoutAlone.stderr).toContain('--timeout goes with --wait');
    // Nobody to connect to: a timeout, exit 5, naming the state and why it is not connected.
    const early = await timed(c, 'alice', 'wait-connect', '--timeout', '1');
    expect(early.code, early.stderr).toBe(5);
    expect(early.ms).toBeLessThan(5000);
    expect(early.stderr).toMatch(/r0 on alice: not connected after 1 s \(Connecting, disk:Inconsistent peer-disk:DUnknown/);
    expect(early.stderr).toMatch(/last connection error: connect to 127\.0\.0\.1:\d+: .*ECONNREFUSED/);
    // Started before bob is up: these wait instead of failing at once.
    const waitConnect = timed(c, 'alice', 'wait-connect', '--timeout', '60', '--json');
    const waitSync = timed(c, 'alice', 'wait-sync', '--timeout', '60');
    const resyncWait = timed(c, 'alice', 'resync', '--wait', '--timeout', '60');
    await new Promise((resolve) => setTimeout(resolve, 1500));
    await c.start('bob');
    const connected = await waitConnect;
    expect(connected.code, connected.stderr).toBe(0);
    expect(JSON.parse(connected.stdout)).toMatchObject({ resource: 'r0', node: 'alice', result: 'connected' });
    // A fresh pair: connected, both Inconsistent, nothing syncs until an operator picks the good copy.
    const promoted = await c.cli('alice', 'primary', '--force');
    expect(promoted.code, promoted.stderr).toBe(0);
    const [synced, resynced] = await Promise.all([waitSync, resyncWait]);
    expect(synced.code, synced.stderr).toBe(0);
    expect(resynced.code, resynced.stderr).toBe(0);
    expect(resynced.ms).toBeGreaterThan(1500);
    for (const node of ['alice', 'bob'] as const) {
      const s = await c.status(node);
      expect(s).toMatchObject({ connection: 'Connected', disk: 'UpToDate', peer: { disk: 'UpToDate' }, outOfSyncBytes: 0 });
      expect((await c.cli(node, 'wait-sync', '--timeout', '5')).code).toBe(0);
    }
    // dump: the configuration with every default, the secret hidden; it reads back to the same configuration.
    const dumped = await c.cli('bob', 'dump');
    expect(dumped.code, dumped.stderr).toBe(0);
    expect(dumped.stdout).toContain('shared-secret = "<hidden>"');
    expect(dumped.stdout).not.toContain('test-secret');
    expect(dumped.stdout).toMatch(/^\[net\]\non-congestion = "block"\nallow-two-primaries = false\n/m);
    expect(dumped.stdout).toContain('ping-interval = "200ms"\nping-timeout = "1500ms"\nconnect-int = "200ms"\nmax-buffers = "64MiB"');
    const again = path.join(c.dir, 'dumped.toml');
    await writeFile(again, dumped.stdout.replace('<hidden>', 'test-secret'));
    const redumped = await run(process.execPath, [cliPath, 'dump', 'r0', '--config', again]);
    expect(redumped.stdout.split('\n').slice(1)).toEqual(dumped.stdout.split('\n').slice(1));
    const json = JSON.parse((await c.cli('bob', 'dump', '--json')).stdout);
    expect(json).toMatchObject({ file: c.configPath('bob'), resource: { name: 'r0', protocol: 'C', 'shared-secret': '<hidden>' },
      disk: { size: '64MiB', 'al-extents': 1237 }, 'node.bob': { address: `127.0.0.1:${c.ports.bob}`, 'meta-disk': 'internal' } });
    // --json on the one-word queries.
    expect(JSON.parse((await c.cli('alice', 'role', '--json')).stdout)).toEqual({ resource: 'r0', node: 'alice', role: 'Primary' });
    expect(JSON.parse((await c.cli('bob', 'cstate', '--json')).stdout)).toEqual({ resource: 'r0', node: 'bob', connection: 'Connected' });
    expect(JSON.parse((await c.cli('bob', 'dstate', '--json')).stdout))
      .toEqual({ resource: 'r0', node: 'bob', disk: 'UpToDate', peerDisk: 'UpToDate' });

    // StandAlone: the wait can never end by itself, so it is refused (exit 1) at once, not timed out.
    expect((await c.cli('bob', 'disconnect')).code).toBe(0);
    for (const command of ['wait-connect', 'wait-sync'] as const) {
      const refused = await timed(c, 'bob', command, '--timeout', '30');
      expect(refused.code, refused.stderr).toBe(1);
      expect(refused.ms).toBeLessThan(5000);
      expect(refused.stderr).toContain('r0 on bob is StandAlone: it does not try to connect, so the wait cannot end');
      expect(refused.stderr).toContain('"drbdts connect r0" connects again');
    }
    const resyncRefused = await c.cli('bob', 'resync', '--wait', '--timeout', '30');
    expect(resyncRefused.code).toBe(1);
    // alice lost her peer: Connecting, so wait-sync waits, then times out (5) naming what is missing.
    const aliceAlone = await timed(c, 'alice', 'wait-sync', '--timeout', '1');
    expect(aliceAlone.code, aliceAlone.stderr).toBe(5);
    expect(aliceAlone.stderr).toMatch(/r0 on alice: not connected after 1 s \(Connecting/);
    // bob reconnects; writes made meanwhile on alice are resynced; wait-sync on bob sees the short resync end.
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 8M 4M', c.nbdUri('alice')])).code).toBe(0);
    expect((await c.cli('bob', 'connect')).code).toBe(0);
    const bobSynced = await c.cli('bob', 'wait-sync', '--timeout', '60');
    expect(bobSynced.code, bobSynced.stderr).toBe(0);
    expect(await c.status('bob')).toMatchObject({ disk: 'UpToDate', outOfSyncBytes: 0, connection: 'Connected' });
    // get-gi: the generation UUIDs from the daemon, and from the metadata once the node is down.
    const bobUuids = (await c.status('bob')).uuids;
    const gi = await c.cli('bob', 'get-gi');
    expect(gi.code, gi.stderr).toBe(0);
    expect(gi.stdout).toBe(`${bobUuids.current}:${bobUuids.bitmap}:${bobUuids.history[0]}:${bobUuids.history[1]}\n`);
    expect((await c.cli('alice', 'get-gi')).stdout.split(':')[0]).toBe(bobUuids.current);
    // A node that is not up: nothing to wait for (exit 1).
    await c.down('bob');
    expect(JSON.parse((await c.cli('bob', 'get-gi', '--json')).stdout))
      .toEqual({ resource: 'r0', node: 'bob', source: 'metadata', ...bobUuids });
    const notUp = await c.cli('bob', 'wait-connect', '--timeout', '5');
    expect(notUp.code).toBe(1);
    expect(notUp.stderr).toContain('resource r0 is not up on node bob');
  }, 180_000);
});

describe('the peer link: both nodes listen and dial', () => {
  /** The 'connected to peer' log lines of a node: who dialled each session. */
  async function sessions(c: Cluster, node: 'alice' | 'bob'): Promise<string[]> {
    return (await c.log(node)).split('\n').filter((line) => line.includes('"msg":"connected to peer"'))
      .map((line) => (JSON.parse(line) as { dialledBy: string }).dialledBy);
  }

  it('keeps the session of the node whose name sorts first, and connects from the other node when it cannot', async () => {
    // Both reachable: alice (first by name) dials at once; bob's later dials are refused quietly; one session.
    const c = await newCluster();
    await c.start('bob');
    await c.start('alice');
    await c.waitState('alice', 'connected', (s) => s.connection === 'Connected');
    await new Promise((resolve) => setTimeout(resolve, 3000)); // past bob's first dial (2 s after going Connecting)
    expect(await sessions(c, 'alice')).toEqual(['self']);
    expect(await sessions(c, 'bob')).toEqual(['peer']);
    expect((await c.status('bob')).lastConnectionError).toBeNull();
    await c.teardown();

    // alice cannot reach bob (her config points at a port nobody listens on): bob dials her, and she takes his
    // session once her own dials have failed.
    const oneWay = await newCluster();
    const deadPort = oneWay.ports.bob + 1 === oneWay.ports.alice ? oneWay.ports.bob + 2 : oneWay.ports.bob + 1;
    await editConfig(oneWay, 'alice', (t) => t.replace(`address = "127.0.0.1:${oneWay.ports.bob}"`, `address = "127.0.0.1:${deadPort}"`));
    await oneWay.start('alice');
    await oneWay.start('bob');
    const connected = await oneWay.cli('alice', 'wait-connect', '--timeout', '30');
    expect(connected.code, connected.stderr).toBe(0);
    expect(await sessions(oneWay, 'alice')).toEqual(['peer']);
    expect(await sessions(oneWay, 'bob')).toEqual(['self']);
    const promoted = await oneWay.cli('alice', 'primary', '--force');
    expect(promoted.code, promoted.stderr).toBe(0);
    expect((await oneWay.cli('bob', 'wait-sync', '--timeout', '60')).code).toBe(0);
  }, 120_000);
});

describe('down', () => {
  it('is refused while a client holds the export, --force overrides, and a stopped node is stopped (exit 0)', async () => {
    const c = await newCluster();
    await c.startSkippingSync();
    // qemu-io holds the export open, idle (its `sleep` command), as a mounted filesystem's client would.
    const holder = spawn('stdbuf', ['-o0', 'qemu-io', '-f', 'raw', '-c', 'read 0 4k', '-c', 'sleep 60000', c.nbdUri('alice')],
      { stdio: ['ignore', 'pipe', 'ignore'] });
    try {
      let holderOutput = '';
      await new Promise<void>((resolve, reject) => {
        holder.stdout.on('data', (chunk: Buffer) => {
          holderOutput += chunk.toString();
          if (holderOutput.includes('read 4096/4096 bytes')) resolve();
        });
        holder.on('close', () => reject(new Error(`qemu-io ended before holding the export: ${holderOutput}`)));
      });
      const refused = await c.cli('alice', 'down');
      expect(refused.code, refused.stdout).toBe(1);
      expect(refused.stderr).toMatch(new RegExp(`the export is open by 1 NBD client\\(s\\): a client on unix:${c.dir}/alice\\.nbd ` +
        '\\(connected \\d{4}-\\d\\d-\\d\\dT[\\d:.]+Z\\); disconnect them first, or down --force'));
      expect((await c.status('alice')).role).toBe('Primary');
      const forced = await c.cli('alice', 'down', '--force');
      expect(forced.code, forced.stderr).toBe(0);
      await c.exited(c.processes.get('alice')!);
      expect(c.processes.get('alice')!.exitCode).toBe(0);
      c.processes.delete('alice');
    } finally {
      holder.kill('SIGKILL');
    }
    // Stopping what is stopped: exit 0, with a note (a stop action must be idempotent).
    const again = await c.cli('alice', 'down');
    expect(again.code, again.stderr).toBe(0);
    expect(again.stdout).toBe('r0 is not up on node alice: nothing to stop\n');
    // Without clients, down goes ahead as before.
    await c.start('alice');
    const plain = await c.cli('alice', 'down');
    expect(plain.code, plain.stderr).toBe(0);
  }, 120_000);
});

describe('errors that explain', () => {
  it('a wrong shared secret shows in status on both nodes, text and --json', async () => {
    const c = await newCluster({ secrets: { bob: 'another-secret' } });
    await c.start('alice');
    await c.start('bob');
    const aliceError = await c.waitState('alice', 'a connection error', (s) => /shared-secret differs/.test(s.lastConnectionError?.message ?? ''));
    expect(aliceError.connection).toBe('Connecting');
    // Both nodes dial: the newest error is either this node's dial or the peer's session it dropped.
    const wrongSecret = (peer: string): RegExp => new RegExp(`^(connect to 127\\.0\\.0\\.1:\\d+: peer ${peer}|` +
      `inbound connection from 127\\.0\\.0\\.1:\\d+: node ${peer}) failed authentication \\(shared-secret differs\\)$`);
    expect(aliceError.lastConnectionError.message).toMatch(wrongSecret('bob'));
    expect(Date.parse(aliceError.lastConnectionError.at)).toBeGreaterThan(Date.now() - 60_000);
    const bobError = await c.waitState('bob', 'a connection error', (s) => /shared-secret differs/.test(s.lastConnectionError?.message ?? ''));
    expect(bobError.lastConnectionError.message).toMatch(wrongSecret('alice'));
    const text = await c.cli('alice', 'status');
    expect(text.code).toBe(0);
    expect(text.stdout).toMatch(/^ {2}bob connection:Connecting\n {4}last-error:"(connect to|inbound connection from) 127\.0\.0\.1:\d+: (peer|node) bob failed authentication \(shared-secret differs\)" at:\d{4}-/m);
    // Fixed secret: connected, and the error is gone from status.
    await c.down('bob');
    await editConfig(c, 'bob', (t) => t.replace('another-secret', 'test-secret'));
    await c.start('bob');
    const fixed = await c.waitState('alice', 'connected', (s) => s.connection === 'Connected');
    expect(fixed.lastConnectionError).toBeNull();
    expect((await c.cli('alice', 'status')).stdout).not.toContain('last-error');
  }, 120_000);

  it('a peer config mismatch shows in status as the last connection error', async () => {
    const c = await newCluster();
    await editConfig(c, 'bob', (t) => t.replace('protocol = "C"', 'protocol = "A"'));
    await c.start('alice');
    await c.start('bob');
    const s = await c.waitState('alice', 'refused', (st) => st.connection === 'StandAlone' && st.lastConnectionError !== null);
    expect(s.lastConnectionError.message).toBe('peer bob uses protocol A, this node C: the config must be identical');
    const text = (await c.cli('alice', 'status')).stdout;
    expect(text).toContain('bob connection:StandAlone\n    last-error:"peer bob uses protocol A, this node C: the config must be identical"');
  }, 120_000);

  it('up names a truncated disk, a size above the metadata, a missing NBD directory, an address in use', async () => {
    const c = await newCluster();
    // Config size above what create-md recorded.
    await editConfig(c, 'alice', (t) => t.replace('size = "64MiB"', 'size = "80MiB"'));
    const bigger = await c.cli('alice', 'up');
    expect(bigger.code).toBe(1);
    expect(bigger.stderr).toContain(`disk.size: ${80 * 1024 * 1024} bytes is larger than the ${64 * 1024 * 1024} bytes this node's metadata records`);
    await editConfig(c, 'alice', (t) => t.replace('size = "80MiB"', 'size = "64MiB"'));

    // A missing NBD socket directory is named as such.
    await editConfig(c, 'alice', (t) => t.replace(`nbd = "unix:${c.dir}/alice.nbd"`, `nbd = "unix:${c.dir}/gone/alice.nbd"`));
    const noDir = await c.cli('alice', 'up');
    expect(noDir.code).toBe(1);
    expect(noDir.stderr).toContain(`cannot listen on unix:${c.dir}/gone/alice.nbd: the directory ${c.dir}/gone does not exist`);
    await editConfig(c, 'alice', (t) => t.replace(`${c.dir}/gone/alice.nbd`, `${c.dir}/alice.nbd`));

    // alice sorts first, so she dials bob; her own address must still be free at up.
    const squatter = net.createServer();
    await new Promise<void>((resolve) => squatter.listen(c.ports.alice, '127.0.0.1', resolve));
    try {
      const taken = await c.cli('alice', 'up');
      expect(taken.code).toBe(1);
      expect(taken.stderr).toContain(`cannot listen for the peer on 127.0.0.1:${c.ports.alice}: another process listens there: ` +
        'stop it or change this node\'s address');
    } finally {
      await new Promise<void>((resolve) => squatter.close(() => resolve()));
    }

    // A disk truncated after create-md: its metadata went with the tail; the message says so, not "run create-md".
    const image = c.imagePath('bob');
    const before = (await stat(image)).size;
    await truncate(image, 64 * 1024 * 1024);
    const truncated = await c.cli('bob', 'up');
    expect(truncated.code).toBe(1);
    expect(truncated.stderr).toContain(`${image} holds no drbdts metadata: it has ${64 * 1024 * 1024} bytes, smaller than the ${before} bytes`);
    expect(truncated.stderr).toContain(`grow it back to ${before} bytes`);
    expect(truncated.stderr).toContain('create-md would start a new, empty data generation');
    for (const command of ['status', 'dump-md']) {
      const seen = await c.cli('bob', command);
      expect(seen.code).toBe(1);
      expect(seen.stderr, command).toContain(`grow it back to ${before} bytes`);
    }
  }, 120_000);

  it('control paths: relative refused, a socket that cannot be made or reached is named with what to do', async () => {
    const c = await newCluster();
    await editConfig(c, 'alice', (t) => t.replace(`control = "${c.dir}/alice.ctl"`, 'control = "alice.ctl"'));
    const relative = await c.cli('alice', 'status');
    expect(relative.code).toBe(1);
    expect(relative.stderr).toContain('node.alice.control: "alice.ctl" must be an absolute path');
    await editConfig(c, 'alice', (t) => t.replace('control = "alice.ctl"', `control = "${c.dir}/alice.ctl"`)
      .replace(`nbd = "unix:${c.dir}/alice.nbd"`, 'nbd = "unix:alice.nbd"'));
    const relativeNbd = await c.cli('alice', 'status');
    expect(relativeNbd.code).toBe(1);
    expect(relativeNbd.stderr).toContain('node.alice.nbd: "unix:alice.nbd": the socket path must be absolute');
    await editConfig(c, 'alice', (t) => t.replace('nbd = "unix:alice.nbd"', `nbd = "unix:${c.dir}/alice.nbd"`));

    // A control directory that cannot be made (a file is in its way).
    await writeFile(path.join(c.dir, 'plain-file'), '');
    await editConfig(c, 'alice', (t) => t.replace(`control = "${c.dir}/alice.ctl"`, `control = "${c.dir}/plain-file/alice.ctl"`));
    const blocked = await c.cli('alice', 'up');
    expect(blocked.code).toBe(1);
    expect(blocked.stderr).toContain(`control socket ${c.dir}/plain-file/alice.ctl: a part of ${c.dir}/plain-file exists and is not a directory`);
    expect(blocked.stderr).not.toMatch(/^drbdts up: (EEXIST|ENOTDIR)/m);
    await editConfig(c, 'alice', (t) => t.replace(`${c.dir}/plain-file/alice.ctl`, `${c.dir}/alice.ctl`));

    // A user who may not create the socket where the config puts it: permission denied, named, with what to do.
    // (The tests run as root, who may write anywhere: the daemon runs as nobody, with a disk and an NBD socket
    // directory it may use and a control directory it may not.)
    await chmod(c.dir, 0o755);
    await mkdir(path.join(c.dir, 'home'), { mode: 0o777 });
    await chmod(path.join(c.dir, 'home'), 0o777);
    await chmod(c.imagePath('bob'), 0o666);
    await mkdir(path.join(c.dir, 'rootonly'), { mode: 0o755 });
    await editConfig(c, 'bob', (t) => t.replace(`control = "${c.dir}/bob.ctl"`, `control = "${c.dir}/rootonly/bob.ctl"`)
      .replace(`nbd = "unix:${c.dir}/bob.nbd"`, `nbd = "unix:${c.dir}/home/bob.nbd"`));
    const denied = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, cliPath, 'up', 'r0',
      '--config', c.configPath('bob'), '--node', 'bob'], { env: { ...process.env, HOME: path.join(c.dir, 'home'), DRBDTS_LOG_LEVEL: 'warn' } });
    expect(denied.code, denied.stderr).toBe(1);
    expect(denied.stderr).toContain(`control socket ${c.dir}/rootonly/bob.ctl: permission denied creating it in ${c.dir}/rootonly: ` +
      'run as a user who may write there');
    expect(denied.stderr).not.toMatch(/^drbdts up: (listen )?EACCES/m);

    // A user who may not use the (mode 0600) socket of root's daemon.
    await c.start('alice');
    const asNobody = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, cliPath, 'status', 'r0',
      '--config', c.configPath('alice'), '--node', 'alice'], { env: { ...process.env, HOME: path.join(c.dir, 'home') } });
    expect(asNobody.code, asNobody.stderr).toBe(1);
    expect(asNobody.stderr).toContain(`control socket ${c.dir}/alice.ctl: permission denied: the socket is mode 0600, ` +
      'run the command as the user that started the daemon');
  }, 120_000);
});
