// Proves the keepalived and UCARP notify scripts (contrib/vip, as installed by scripts/install.sh) move a drbdts
// Primary with the virtual IP, using the real keepalived and ucarp. Three network namespaces: nodes A and B and a
// client namespace C whose bridge joins them (veth pairs), so the client reaches whichever node holds the VIP,
// as a client on the LAN would. Each node runs its drbdts daemon inside its namespace (replication over the
// veth addresses, the NBD export on 0.0.0.0:10809) and its VIP manager with vip-notify as the notify hook.
// The run: A's manager takes the VIP and its notify promotes alice; the client writes through the VIP; node A
// crashes (drbdts and the manager SIGKILLed, its link unplugged); B's manager takes the VIP and its notify
// promotes bob (retrying until bob has noticed alice is gone); the client reads through the VIP what it wrote
// before and writes more; node A comes back (drbdts resyncs it as Secondary), its manager preempts, B's notify
// demotes bob and A's promotes alice (retrying until bob is Secondary and alice's resync is done), and the
// client reads everything through the VIP again.
import { spawn, type ChildProcess } from 'node:child_process';
import { openSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { run } from './replication-cluster.js';
import { waitFor } from './replication-helpers.js';
import { buildDist, repoRoot } from './resource-helpers.js';

type Side = 'a' | 'b';
const nodeOf: Record<Side, 'alice' | 'bob'> = { a: 'alice', b: 'bob' };

let prefix: string;
let dir = '';
let tag = '';
let subnet = '';
const processes: ChildProcess[] = [];

beforeAll(async () => {
  await buildDist();
  prefix = await mkdtemp(path.join(tmpdir(), 'drbdts-vip-prefix-'));
  const installed = await run('bash', [path.join(repoRoot, 'scripts/install.sh'), '--prefix', prefix, '--no-build']);
  if (installed.code !== 0) throw new Error(`install.sh failed: ${installed.stderr}`);
});

afterAll(async () => {
  await rm(prefix, { recursive: true, force: true });
});

afterEach(async () => {
  for (const child of processes.splice(0)) await kill(child);
  for (const side of ['a', 'b', 'c']) await run('ip', ['netns', 'delete', `${tag}-${side}`]);
  if (process.env.DRBDTS_TEST_KEEP !== '1' && dir !== '') await rm(dir, { recursive: true, force: true });
});

async function kill(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGKILL');
  await exited;
}

async function must(command: string, args: string[]): Promise<string> {
  const result = await run(command, args);
  if (result.code !== 0) throw new Error(`${command} ${args.join(' ')} failed (${result.code}): ${result.stderr}`);
  return result.stdout;
}

const ns = (side: Side | 'c') => `${tag}-${side}`;
const address = (side: Side | 'c') => `${subnet}.${{ a: 1, b: 2, c: 3 }[side]}`;
const vip = () => `${subnet}.100`;

/** Namespaces A, B and C; C's bridge joins A's and B's eth0 (one veth pair each). */
async function setupNetwork(): Promise<void> {
  tag = `dtsvip${process.pid % 100000}`;
  subnet = `10.${200 + (process.pid % 50)}.${process.pid % 250}`;
  for (const side of ['a', 'b', 'c'] as const) {
    await run('ip', ['netns', 'delete', ns(side)]);
    await must('ip', ['netns', 'add', ns(side)]);
    await must('ip', ['-n', ns(side), 'link', 'set', 'lo', 'up']);
  }
  await must('ip', ['-n', ns('c'), 'link', 'add', 'br0', 'type', 'bridge']);
  for (const side of ['a', 'b'] as const) {
    await must('ip', ['link', 'add', 'eth0', 'netns', ns(side), 'type', 'veth', 'peer', 'name', `port${side}`, 'netns', ns('c')]);
    await must('ip', ['-n', ns('c'), 'link', 'set', `port${side}`, 'master', 'br0', 'up']);
    await must('ip', ['-n', ns(side), 'address', 'add', `${address(side)}/24`, 'dev', 'eth0']);
    await must('ip', ['-n', ns(side), 'link', 'set', 'eth0', 'up']);
  }
  await must('ip', ['-n', ns('c'), 'address', 'add', `${address('c')}/24`, 'dev', 'br0']);
  await must('ip', ['-n', ns('c'), 'link', 'set', 'br0', 'up']);
}

function spawnIn(side: Side, name: string, command: string, args: string[], env: NodeJS.ProcessEnv = {}): ChildProcess {
  const log = openSync(path.join(dir, `${name}.log`), 'a');
  const child = spawn('ip', ['netns', 'exec', ns(side), command, ...args], {
    stdio: ['ignore', log, log], env: { ...process.env, ...env },
  });
  processes.push(child);
  return child;
}

const drbdts = (side: Side, ...args: string[]) =>
  run(`${prefix}/bin/drbdts`, [args[0]!, 'r0', '--config', path.join(dir, 'r0.toml'), '--node', nodeOf[side], ...args.slice(1)],
    { env: { ...process.env, DRBDTS_LOG_LEVEL: 'warn' } });

async function status(side: Side): Promise<any> {
  const result = await drbdts(side, 'status', '--json');
  if (result.code !== 0) throw new Error(`status ${side}: ${result.stderr}`);
  return JSON.parse(result.stdout);
}

async function waitStatus(side: Side, what: string, predicate: (s: any) => boolean, timeoutMs = 45_000): Promise<void> {
  let last: any = null;
  try {
    await waitFor(`${nodeOf[side]}: ${what}`, async () => {
      last = await status(side).catch((error: Error) => ({ error: error.message }));
      return predicate(last);
    }, timeoutMs, 200);
  } catch (error) {
    const notify = await readFile(path.join(dir, 'notify.log'), 'utf8').catch(() => '(no notify log)');
    throw new Error(`${(error as Error).message}; last status ${JSON.stringify(last)}\nnotify log:\n${notify}`);
  }
}

async function startDaemon(side: Side): Promise<ChildProcess> {
  const child = spawnIn(side, `drbdts-${side}`, `${prefix}/bin/drbdts`,
    ['up', 'r0', '--config', path.join(dir, 'r0.toml'), '--node', nodeOf[side]]);
  await waitStatus(side, 'daemon answering', (s) => s.error === undefined, 30_000);
  return child;
}

async function holdsVip(side: Side): Promise<boolean> {
  return (await must('ip', ['-n', ns(side), '-4', 'address', 'show', 'dev', 'eth0'])).includes(`${vip()}/`);
}

/** qemu-io in the client namespace against the export behind the VIP; retried while the VIP moves. */
async function client(command: string): Promise<string> {
  let output = '';
  await waitFor(`client: ${command}`, async () => {
    const result = await run('ip', ['netns', 'exec', ns('c'), 'qemu-io', '-f', 'raw', '-c', command, `nbd://${vip()}:10809`]);
    output = result.stdout + result.stderr;
    return result.code === 0 && !/error|failed/i.test(output);
  }, 20_000, 500).catch((error: Error) => {
    throw new Error(`${error.message}: ${output}`);
  });
  return output;
}

interface VipManager {
  name: string;
  /** Starts the manager on a node; `preferred` wins elections and preempts. */
  start(side: Side, preferred: boolean): Promise<ChildProcess[]>;
}

const vrid = () => 1 + (process.pid % 250);

const keepalived: VipManager = {
  name: 'keepalived',
  async start(side, preferred) {
    const notify = (state: string) =>
      `"${prefix}/libexec/drbdts/vip-notify --conf ${dir}/vip-notify.conf --node ${nodeOf[side]} r0 ${state}"`;
    const conf = path.join(dir, `keepalived-${side}.conf`);
    await writeFile(conf, `global_defs {
  script_user root
}
vrrp_instance r0 {
  state BACKUP
  interface eth0
  virtual_router_id ${vrid()}
  priority ${preferred ? 150 : 100}
  advert_int 1
  virtual_ipaddress {
    ${vip()}/24 dev eth0
  }
  notify_master ${notify('MASTER')}
  notify_backup ${notify('BACKUP')}
  notify_fault ${notify('FAULT')}
}
`);
    const pids = [path.join(dir, `keepalived-${side}.pid`), path.join(dir, `keepalived-${side}-vrrp.pid`)];
    const child = spawnIn(side, `keepalived-${side}`, 'keepalived',
      ['-n', '-l', '-D', '--vrrp', '-f', conf, '-p', pids[0]!, '-r', pids[1]!]);
    // The VRRP work happens in a child process: it is part of "the node's keepalived" to kill.
    let vrrpPid = 0;
    await waitFor('keepalived VRRP child', async () => {
      vrrpPid = Number((await readFile(pids[1]!, 'utf8').catch(() => '')).trim());
      return vrrpPid > 0;
    }, 10_000, 100);
    const vrrp = { pid: vrrpPid, exitCode: null, signalCode: null,
      kill: (signal: NodeJS.Signals) => { try { process.kill(vrrpPid, signal); } catch { /* gone */ } return true; },
      once: (_event: string, resolve: () => void) => resolve() } as unknown as ChildProcess;
    // The VRRP child first: killed after its parent, it would shut down cleanly (sending priority 0, which hands
    // over the VIP at once) rather than crash.
    return [vrrp, child];
  },
};

const ucarp: VipManager = {
  name: 'ucarp',
  async start(side, preferred) {
    const child = spawnIn(side, `ucarp-${side}`, 'ucarp', [
      '--interface=eth0', `--srcip=${address(side)}`, `--vhid=${vrid()}`, '--pass=drbdts-test', `--addr=${vip()}`,
      `--upscript=${prefix}/libexec/drbdts/ucarp-up`, `--downscript=${prefix}/libexec/drbdts/ucarp-down`, '--xparam=r0',
      '--advbase=1', `--advskew=${preferred ? 0 : 100}`, ...(preferred ? ['--preempt'] : []),
    ], { DRBDTS_VIP_CONF: path.join(dir, `vip-notify-${side}.conf`) });
    return [child];
  },
};

async function scenario(manager: VipManager): Promise<void> {
  dir = await mkdtemp(path.join(tmpdir(), `drbdts-${manager.name}-`));
  await setupNetwork();
  await writeFile(path.join(dir, 'r0.toml'), `[resource]
name = "r0"
protocol = "C"
shared-secret = "vip-test"
[disk]
size = "16MiB"
[net]
ping-interval = "200ms"
ping-timeout = "1500ms"
connect-int = "200ms"
[node.alice]
address = "${address('a')}:7789"
disk = "${dir}/alice.img"
nbd = "0.0.0.0:10809"
control = "${dir}/alice.ctl"
[node.bob]
address = "${address('b')}:7789"
disk = "${dir}/bob.img"
nbd = "0.0.0.0:10809"
control = "${dir}/bob.ctl"
`);
  // keepalived passes --node on the notify command line; UCARP's scripts get theirs from the conf file.
  const common = `DRBDTS_OPTIONS="--config ${dir}/r0.toml"\nPROMOTE_TIMEOUT=40\nLOG_FILE=${dir}/notify.log\nVIP_PREFIX_LENGTH=24\n`;
  await writeFile(path.join(dir, 'vip-notify.conf'), common);
  for (const side of ['a', 'b'] as const) {
    await writeFile(path.join(dir, `vip-notify-${side}.conf`), `${common}DRBDTS_OPTIONS="$DRBDTS_OPTIONS --node ${nodeOf[side]}"\n`);
    await must(`${prefix}/bin/drbdts`, ['create-md', 'r0', '--config', path.join(dir, 'r0.toml'), '--node', nodeOf[side]]);
  }
  const daemonA = await startDaemon('a');
  await startDaemon('b');
  await waitStatus('a', 'connected', (s) => s.connection === 'Connected');
  // Fresh pair: skip the initial sync (both disks are zeros), both UpToDate and Secondary.
  expect((await drbdts('a', 'new-current-uuid', '--clear-bitmap')).code).toBe(0);
  await waitStatus('b', 'UpToDate', (s) => s.disk === 'UpToDate' && s.peer.disk === 'UpToDate');

  const managerA = await manager.start('a', true);
  await waitStatus('a', 'promoted by the MASTER notify', (s) => s.role === 'Primary');
  await manager.start('b', false);
  expect(await holdsVip('a')).toBe(true);
  await client('write -P 0x42 0 1M');

  // Node A crashes: its drbdts and its VIP manager die, its network link goes dark.
  await kill(daemonA);
  for (const child of managerA) await kill(child);
  await must('ip', ['-n', ns('c'), 'link', 'set', 'porta', 'down']);
  await waitStatus('b', 'promoted by the MASTER notify after the failover', (s) => s.role === 'Primary');
  expect(await holdsVip('b')).toBe(true);
  const before = await client('read -P 0x42 0 1M');
  expect(before).toMatch(/read 1048576\/1048576 bytes/);
  await client('write -P 0x43 1M 1M');

  // Node A comes back: no VIP (a rebooted node holds none), drbdts resyncs it, its manager preempts.
  await run('ip', ['-n', ns('a'), 'address', 'delete', `${vip()}/24`, 'dev', 'eth0']);
  await must('ip', ['-n', ns('c'), 'link', 'set', 'porta', 'up']);
  await startDaemon('a');
  await waitStatus('a', 'resynced from bob', (s) => s.disk === 'UpToDate' && s.connection === 'Connected', 60_000);
  await manager.start('a', true);
  await waitStatus('b', 'demoted by the BACKUP notify', (s) => s.role === 'Secondary');
  await waitStatus('a', 'promoted again', (s) => s.role === 'Primary');
  expect(await holdsVip('a')).toBe(true);
  expect(await holdsVip('b')).toBe(false);
  const after = await client('read -P 0x42 0 1M');
  expect(after).toMatch(/read 1048576\/1048576 bytes/);
  expect(await client('read -P 0x43 1M 1M')).toMatch(/read 1048576\/1048576 bytes/);
  const notifyLog = await readFile(path.join(dir, 'notify.log'), 'utf8');
  expect(notifyLog).toMatch(/r0 on bob MASTER: Primary/);
  expect(notifyLog).toMatch(/r0 on bob BACKUP: Secondary/);
}

describe('VIP failover with the notify scripts', () => {
  it('keepalived moves the VIP and the Primary, both ways', async () => {
    await scenario(keepalived);
  }, 240_000);

  it('UCARP moves the VIP and the Primary, both ways', async () => {
    await scenario(ucarp);
  }, 240_000);
});
