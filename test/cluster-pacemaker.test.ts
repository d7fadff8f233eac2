// Proves the OCF agent under a real two-node Pacemaker 2.1 + Corosync 3 cluster on this one machine. Each
// cluster node is a set of namespaces the test builds: its own network namespace (the two joined by a veth
// pair: Corosync's knet and drbdts's replication run over it), and mount, UTS, IPC and PID namespaces
// (test/pacemaker-node.sh: own host name, /run, /dev/shm, state and log directories, the agent in its view of
// /usr/lib/ocf/resource.d). The pair's metadata is initialised (skipped initial sync), the agent is configured
// as a promotable clone through the CIB, and Pacemaker promotes one node by the agent's promotion scores. An
// ext3 filesystem is made on the export, and a group on top of the Primary mounts it: nbdfuse
// (ocf:heartbeat:anything) exposes the node's export as a file, ocf:heartbeat:Filesystem loop-mounts it. A file
// is written there; then the node crashes (its PID namespace killed: Corosync, Pacemaker, drbdts, nbdfuse at
// once), Pacemaker on the survivor sees it leave, promotes the survivor (fencing is off: there is no fence
// device between namespaces) and mounts the filesystem there, where the file is.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { run, type RunResult } from './replication-cluster.js';
import { waitFor } from './replication-helpers.js';
import { buildDist, repoRoot } from './resource-helpers.js';

type Node = 'alice' | 'bob';
const nodes: Node[] = ['alice', 'bob'];

let prefix: string;
let dir = '';
let tag = '';
let subnet = '';
const clusterNodes = new Map<Node, { unshare: ChildProcess; init: number }>();

beforeAll(async () => {
  await buildDist();
  prefix = await mkdtemp(path.join(tmpdir(), 'drbdts-pcmk-prefix-'));
  await chmod(prefix, 0o755);
  const installed = await run('bash', [path.join(repoRoot, 'scripts/install.sh'), '--prefix', prefix, '--no-build']);
  if (installed.code !== 0) throw new Error(`install.sh failed: ${installed.stderr}`);
});

afterAll(async () => {
  await rm(prefix, { recursive: true, force: true });
});

afterEach(async () => {
  for (const node of nodes) await crash(node);
  for (const node of nodes) await run('ip', ['netns', 'delete', ns(node)]);
  if (process.env.DRBDTS_TEST_KEEP !== '1' && dir !== '') await rm(dir, { recursive: true, force: true });
});

const ns = (node: Node) => `${tag}-${node}`;
const address = (node: Node) => `${subnet}.${node === 'alice' ? 1 : 2}`;

async function must(command: string, args: string[], env?: NodeJS.ProcessEnv): Promise<string> {
  const result = await run(command, args, { env });
  if (result.code !== 0) throw new Error(`${command} ${args.join(' ')} failed (${result.code}): ${result.stderr}${result.stdout}`);
  return result.stdout;
}

/** A command inside a cluster node's namespaces (as its own tools see the node). */
function inNode(node: Node, command: string, args: string[]): Promise<RunResult> {
  const init = clusterNodes.get(node)?.init;
  if (init === undefined) throw new Error(`cluster node ${node} is not running`);
  return run('nsenter', ['-t', String(init), '-m', '-u', '-i', '-n', '-p', command, ...args]);
}

const drbdts = (node: Node, ...args: string[]) =>
  run(`${prefix}/bin/drbdts`, [args[0]!, 'r0', '--config', path.join(dir, 'r0.toml'), '--node', node, ...args.slice(1)],
    { env: { ...process.env, DRBDTS_LOG_LEVEL: 'warn' } });

async function startClusterNode(node: Node): Promise<void> {
  const unshare = spawn('ip', ['netns', 'exec', ns(node), 'unshare', '--mount', '--uts', '--ipc', '--pid', '--fork',
    '--mount-proc', '--kill-child=SIGKILL', path.join(repoRoot, 'test/pacemaker-node.sh'), path.join(dir, node), node,
    path.join(prefix, 'lib/ocf'), path.join(dir, 'corosync.conf')], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  unshare.stdout!.on('data', (chunk) => (output += chunk));
  unshare.stderr!.on('data', (chunk) => (output += chunk));
  await waitFor(`cluster node ${node} up`, () => {
    if (unshare.exitCode !== null) throw new Error(`cluster node ${node} exited: ${output}`);
    return output.includes(`node ${node} up`);
  }, 30_000, 100);
  // The node's PID 1 (pacemaker-node.sh), as the root PID namespace numbers it: nsenter's target.
  const init = Number((await must('pgrep', ['-P', String(unshare.pid)])).trim().split('\n')[0]);
  clusterNodes.set(node, { unshare, init });
}

async function crash(node: Node): Promise<void> {
  const entry = clusterNodes.get(node);
  if (entry === undefined) return;
  clusterNodes.delete(node);
  if (entry.unshare.exitCode !== null || entry.unshare.signalCode !== null) return;
  const exited = new Promise((resolve) => entry.unshare.once('exit', resolve));
  // unshare --kill-child passes SIGKILL to the node's PID 1, and the kernel ends every process of its PID
  // namespace with it.
  entry.unshare.kill('SIGKILL');
  await exited;
  await waitFor(`${node}'s processes gone`, async () => (await run('pgrep', ['-f', `pacemaker-node.sh ${path.join(dir, node)} `])).code !== 0, 10_000, 100);
}

async function crmMon(node: Node): Promise<string> {
  const result = await inNode(node, 'crm_mon', ['-1']);
  return result.stdout + result.stderr;
}

async function waitMon(node: Node, what: string, pattern: RegExp, timeoutMs = 60_000): Promise<string> {
  let last = '';
  try {
    await waitFor(`${what} (crm_mon on ${node})`, async () => pattern.test(last = await crmMon(node)), timeoutMs, 500);
  } catch (error) {
    const log = await readFile(path.join(dir, node, 'log/pacemaker/pacemaker.log'), 'utf8').catch(() => '');
    const agentLines = log.split('\n').filter((line) => /drbdts|r0_|exit-reason/.test(line)).slice(-20).join('\n');
    throw new Error(`${(error as Error).message}\n${last}\n${agentLines}`);
  }
  return last;
}

describe('Pacemaker and Corosync', () => {
  it('promote the drbdts clone and mount a filesystem on it, then fail both over to the other node on a crash', async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'drbdts-pcmk-'));
    tag = `dtspcmk${process.pid % 100000}`;
    subnet = `10.${150 + (process.pid % 50)}.${process.pid % 250}`;
    for (const node of nodes) {
      await run('ip', ['netns', 'delete', ns(node)]);
      await must('ip', ['netns', 'add', ns(node)]);
      await must('ip', ['-n', ns(node), 'link', 'set', 'lo', 'up']);
    }
    await must('ip', ['link', 'add', 'eth0', 'netns', ns('alice'), 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns('bob')]);
    for (const node of nodes) {
      await must('ip', ['-n', ns(node), 'address', 'add', `${address(node)}/24`, 'dev', 'eth0']);
      await must('ip', ['-n', ns(node), 'link', 'set', 'eth0', 'up']);
    }
    await writeFile(path.join(dir, 'corosync.conf'), `totem {
  version: 2
  cluster_name: drbdts-test
  transport: knet
  crypto_cipher: none
  crypto_hash: none
  token: 3000
}
nodelist {
  node {
    ring0_addr: ${address('alice')}
    name: alice
    nodeid: 1
  }
  node {
    ring0_addr: ${address('bob')}
    name: bob
    nodeid: 2
  }
}
quorum {
  provider: corosync_votequorum
  two_node: 1
}
logging {
  to_stderr: yes
  to_logfile: no
  to_syslog: no
}
`);
    await writeFile(path.join(dir, 'r0.toml'), `[resource]
name = "r0"
protocol = "C"
shared-secret = "pacemaker-test"
[disk]
size = "16MiB"
[net]
ping-interval = "200ms"
ping-timeout = "1500ms"
connect-int = "200ms"
${nodes.map((node) => `[node.${node}]
address = "${address(node)}:7789"
disk = "${dir}/${node}.img"
nbd = "unix:${dir}/${node}.nbd"
control = "${dir}/${node}.ctl"
`).join('')}`);

    // Fresh metadata on both, the initial sync skipped once (both disks are zeros), then both down: from here
    // on only Pacemaker starts drbdts.
    const initial: ChildProcess[] = [];
    for (const node of nodes) {
      expect((await drbdts(node, 'create-md')).code).toBe(0);
      initial.push(spawn('ip', ['netns', 'exec', ns(node), `${prefix}/bin/drbdts`, 'up', 'r0', '--config', path.join(dir, 'r0.toml'),
        '--node', node], { stdio: 'ignore' }));
    }
    await waitFor('initial pair connected', async () => (await drbdts('alice', 'cstate')).stdout.trim() === 'Connected', 30_000, 200);
    expect((await drbdts('alice', 'new-current-uuid', '--clear-bitmap')).code).toBe(0);
    await waitFor('initial pair UpToDate', async () => (await drbdts('bob', 'dstate')).stdout.trim() === 'UpToDate/UpToDate', 30_000, 200);
    for (const node of nodes) expect((await drbdts(node, 'down')).code).toBe(0);
    await Promise.all(initial.map((child) => child.exitCode !== null ? null : new Promise((resolve) => child.once('exit', resolve))));

    for (const node of nodes) await startClusterNode(node);
    await waitMon('alice', 'both nodes online', /Online: \[ alice bob \]/);
    expect((await inNode('alice', 'crm_attribute', ['-t', 'crm_config', '-n', 'stonith-enabled', '-v', 'false'])).code).toBe(0);
    const nvpairs = (id: string, pairs: Record<string, string>) =>
      Object.entries(pairs).map(([name, value]) => `<nvpair id="${id}-${name}" name="${name}" value="${value}"/>`).join('');
    const clone = `<clone id="r0-clone">
  <meta_attributes id="r0-clone-meta">${nvpairs('r0-clone', { promotable: 'true', 'promoted-max': '1', 'promoted-node-max': '1',
    'clone-max': '2', 'clone-node-max': '1', notify: 'true' })}</meta_attributes>
  <primitive id="r0" class="ocf" provider="drbdts" type="drbdts">
    <instance_attributes id="r0-params">${nvpairs('r0', { resource: 'r0', config: path.join(dir, 'r0.toml'),
      drbdts: `${prefix}/bin/drbdts`, log: path.join(dir, 'r0-daemon.log') })}</instance_attributes>
    <operations>
      <op id="r0-monitor-promoted" name="monitor" interval="3s" role="Promoted" timeout="20s"/>
      <op id="r0-monitor-unpromoted" name="monitor" interval="4s" role="Unpromoted" timeout="20s"/>
    </operations>
  </primitive>
</clone>`;
    const created = await inNode('alice', 'cibadmin', ['--create', '-o', 'resources', '--xml-text', clone]);
    expect(created.code, created.stderr).toBe(0);

    const promotedMon = await waitMon('alice', 'one node promoted, the other unpromoted',
      /Promoted: \[ (alice|bob) \][\s\S]*Unpromoted: \[ (alice|bob) \]/);
    const primary = /Promoted: \[ (alice|bob) \]/.exec(promotedMon)![1] as Node;
    const survivor: Node = primary === 'alice' ? 'bob' : 'alice';
    expect((await drbdts(primary, 'role')).stdout.trim()).toBe('Primary');
    expect((await drbdts(survivor, 'role')).stdout.trim()).toBe('Secondary');
    // The agent set the promotion scores DRBD's agent would: both UpToDate with a known peer.
    expect((await inNode(survivor, 'crm_mon', ['-1', '-A'])).stdout).toMatch(/master-r0\s*:\s*10000/);

    // The filesystem, made once through the Primary's export (nbdfuse turns it into a file mkfs can use).
    const mkfsFuse = path.join(dir, 'fuse-mkfs');
    await mkdir(mkfsFuse);
    const fusePid = path.join(dir, 'fuse-mkfs.pid');
    const nbdfuse = spawn('nbdfuse', ['-P', fusePid, mkfsFuse, `nbd+unix:///?socket=${dir}/${primary}.nbd`], { stdio: 'ignore' });
    try {
      await waitFor('nbdfuse for mkfs', () => existsSync(fusePid), 10_000, 100);
      await must('mkfs.ext3', ['-q', '-F', path.join(mkfsFuse, 'nbd')]);
    } finally {
      await run('fusermount3', ['-u', mkfsFuse]);
      nbdfuse.kill('SIGKILL');
    }

    // On top of the Primary: nbdfuse (ocf:heartbeat:anything) exposing the node's export as a file, and that
    // file loop-mounted (ocf:heartbeat:Filesystem) on /run/r0-data, in that node's mount namespace.
    const perNode = (id: string, name: string, value: (node: Node) => string) => nodes.map((node) => `
      <instance_attributes id="${id}-${node}" score="${node === 'alice' ? 2 : 1}">
        <rule id="${id}-${node}-rule" score="0"><expression id="${id}-${node}-expr" attribute="#uname" operation="eq" value="${node}"/></rule>
        <nvpair id="${id}-${node}-${name}" name="${name}" value="${value(node)}"/>
      </instance_attributes>`).join('');
    for (const node of nodes) await mkdir(path.join(dir, `fuse-${node}`));
    const group = `<group id="r0-fs">
  <primitive id="r0-fuse" class="ocf" provider="heartbeat" type="anything">
    <instance_attributes id="r0-fuse-params">${nvpairs('r0-fuse', { binfile: '/usr/bin/nbdfuse', pidfile: '/run/r0-fuse.pid',
      logfile: path.join(dir, 'nbdfuse.log') })}</instance_attributes>${perNode('r0-fuse-args', 'cmdline_options',
      (node) => `${path.join(dir, `fuse-${node}`)} nbd+unix:///?socket=${dir}/${node}.nbd`)}
  </primitive>
  <primitive id="r0-data" class="ocf" provider="heartbeat" type="Filesystem">
    <instance_attributes id="r0-data-params">${nvpairs('r0-data', { directory: '/run/r0-data', fstype: 'ext3', options: 'loop' })}</instance_attributes>${
      perNode('r0-data-device', 'device', (node) => path.join(dir, `fuse-${node}`, 'nbd'))}
    <operations><op id="r0-data-monitor" name="monitor" interval="5s" timeout="20s"/></operations>
  </primitive>
</group>`;
    const addedGroup = await inNode('alice', 'cibadmin', ['--create', '-o', 'resources', '--xml-text', group]);
    expect(addedGroup.code, addedGroup.stderr).toBe(0);
    for (const constraint of [
      '<rsc_colocation id="r0-fs-on-primary" rsc="r0-fs" with-rsc="r0-clone" with-rsc-role="Promoted" score="INFINITY"/>',
      '<rsc_order id="r0-fs-after-promote" first="r0-clone" first-action="promote" then="r0-fs" then-action="start"/>',
    ]) {
      const added = await inNode('alice', 'cibadmin', ['--create', '-o', 'constraints', '--xml-text', constraint]);
      expect(added.code, added.stderr).toBe(0);
    }
    await waitMon(primary, `the filesystem mounted on ${primary}`, new RegExp(`r0-data\\s+\\(ocf:heartbeat:Filesystem\\):\\s+Started ${primary}`));
    const wrote = await inNode(primary, 'sh', ['-c', 'echo "written on the first Primary" > /run/r0-data/note && sync']);
    expect(wrote.code, wrote.stderr).toBe(0);

    await crash(primary);
    await waitMon(survivor, `${survivor} promoted after ${primary} crashed`, new RegExp(`OFFLINE: \\[ ${primary} \\][\\s\\S]*Promoted: \\[ ${survivor} \\]`));
    expect((await drbdts(survivor, 'role')).stdout.trim()).toBe('Primary');
    await waitMon(survivor, `the filesystem mounted on ${survivor}`, new RegExp(`r0-data\\s+\\(ocf:heartbeat:Filesystem\\):\\s+Started ${survivor}`));
    const note = await inNode(survivor, 'cat', ['/run/r0-data/note']);
    expect(note.stdout).toBe('written on the first Primary\n');
  }, 300_000);
});
