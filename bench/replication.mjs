// Replication benchmark, measured as on two machines (docs: bench/README.md, "Replication"): each node gets what a
// machine of its own would give it, and every figure is a ratio to a peer or a limit measured in the same run.
//  - own disk: one tmpfs per node, a third for the baseline's file;
//  - own core: the Primary's daemon, fio and qemu-io on core 0, the Secondary's daemon on core 1;
//  - own network stack: each node in its own network namespace, joined by a veth pair (MTU 65000), receive packet
//    steering on each node's core; NBD and control sockets are unix sockets, reachable from the host namespace;
//  - baseline: `drbdts serve` of a file on its own tmpfs, on core 0.
// Measured: protocol C vs the baseline on fio jobs (1 MiB sequential writes QD8, 4 KiB random writes QD32, time based,
// one warm-up run of every job on every target, then rounds in alternating order), paired medians and paired ratios;
// daemon CPU per write (utime+stime of all threads, /proc/PID/stat) and per-core busy % (/proc/stat) during each job;
// QD1 4 KiB FUA write latency p50/p99 (qemu-io `write -f`) vs baseline + the veth round trip; full resync throughput
// vs min(tmpfs write, TCP across the veth); bitmap resync bytes sent vs dirty bytes; the daemons' peak RSS.
// Usage: node bench/replication.mjs [--quick] [--rounds N] [--size 512m] [--runtime S] [--out FILE.json]
//        (defaults: 4 rounds, 512 MiB, 4 s; --quick: 1 round, 64 MiB, 1 s, for CI's smoke test)
//        [--data-path js|native|both] (DRBDTS_REPL_DATA_PATH for the daemons; both: a pair of each, same rounds;
//        without it the variable is passed through as set, or not at all) [--no-fio] [--no-resync]
//        [--cpu-prof DIR] (daemons under node --cpu-prof) [--perf DIR] (perf record -g on the daemons per fio job)
// Needs root (mount, ip netns), fio, qemu-io, taskset and 2 cores.
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { sh } from './lib/process.mjs';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const netprobe = path.join(repoRoot, 'bench', 'lib', 'netprobe.mjs');

const args = process.argv.slice(2);
const flag = (name) => args.includes(name);
const option = (name, fallback) => {
  const index = args.indexOf(name);
  return index >= 0 && index + 1 < args.length ? args[index + 1] : fallback;
};
const quick = flag('--quick');
const rounds = Number(option('--rounds', quick ? '1' : '4'));
const sizeText = option('--size', quick ? '64m' : '512m');
const sizeMiB = parseInt(sizeText, 10) * (sizeText.endsWith('g') ? 1024 : 1);
const runtimeSeconds = Number(option('--runtime', quick ? '1' : '4'));
const fuaWrites = quick ? 200 : 2000;
const rttSamples = quick ? 500 : 5000;
const tcpMiB = quick ? 256 : 4096;
const ddMiB = quick ? 128 : 1024;
const outPath = option('--out', null);
const dataPathOption = option('--data-path', null);
if (dataPathOption !== null && !['js', 'native', 'both'].includes(dataPathOption)) {
  console.error('--data-path takes js, native or both');
  process.exit(2);
}
/** One replicated pair per entry; null: DRBDTS_REPL_DATA_PATH left as the environment has it. */
const dataPaths = dataPathOption === 'both' ? ['js', 'native'] : [dataPathOption];
const dataPathLabel = (dataPath) => dataPath ?? process.env.DRBDTS_REPL_DATA_PATH ?? 'default';
const skipResync = flag('--no-resync');
const skipFio = flag('--no-fio');
const cpuProfDir = option('--cpu-prof', null);
const nodeArgs = cpuProfDir === null ? [] : ['--cpu-prof', `--cpu-prof-dir=${path.resolve(cpuProfDir)}`];
const perfDir = option('--perf', null);

const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length === 0 ? NaN : sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
};
const percentile = (values, fraction) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * fraction))];
};
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(what, predicate, timeoutMs = 120_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await predicate()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

function checkPrerequisites() {
  const missing = [];
  if (process.getuid?.() !== 0) missing.push('root (mount, ip netns)');
  if (os.cpus().length < 2) missing.push('2 cores');
  for (const tool of ['fio', 'qemu-io', 'ip', 'taskset', 'mount', 'umount', 'dd']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) missing.push(tool);
  }
  if (missing.length > 0) {
    console.error(`bench/replication.mjs needs: ${missing.join(', ')}`);
    process.exit(2);
  }
}
checkPrerequisites();

// ---- clean-up: every mount, namespace and process is undone at exit, on failure and on SIGINT/SIGTERM ----

const children = new Set();
const cleanups = [];
let cleanedUp = false;
function cleanUp() {
  if (cleanedUp) return;
  cleanedUp = true;
  for (const child of children) child.kill('SIGKILL');
  for (const undo of cleanups.reverse()) {
    try {
      undo();
    } catch (error) {
      console.error(`clean-up: ${error.message}`);
    }
  }
}
process.on('exit', cleanUp);
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(signal, () => {
    console.error(`${signal}: cleaning up`);
    process.exit(130);
  });
}

/**
 * A private snapshot of the built program (dist, bin, proto, the addon; node_modules linked): a rebuild of the
 * tree while this runs for minutes cannot break a round half-way.
 */
function snapshotProgram() {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'drbdts-bench-program-'));
  cleanups.push(() => fs.rmSync(root, { recursive: true, force: true }));
  for (const dir of ['dist', 'bin', 'proto']) fs.cpSync(path.join(repoRoot, dir), path.join(root, dir), { recursive: true });
  fs.mkdirSync(path.join(root, 'native/build/Release'), { recursive: true });
  fs.copyFileSync(path.join(repoRoot, 'native/build/Release/drbdts_native.node'), path.join(root, 'native/build/Release/drbdts_native.node'));
  fs.copyFileSync(path.join(repoRoot, 'package.json'), path.join(root, 'package.json'));
  fs.symlinkSync(fs.realpathSync(path.join(repoRoot, 'node_modules')), path.join(root, 'node_modules'));
  return root;
}
const cli = path.join(snapshotProgram(), 'bin', 'drbdts.js');

function mountTmpfs(dir, sizeMiBs) {
  fs.mkdirSync(dir, { recursive: true });
  sh('mount', ['-t', 'tmpfs', '-o', `size=${Math.ceil(sizeMiBs)}m`, 'tmpfs', dir]);
  cleanups.push(() => {
    // A daemon killed a moment ago may still hold a file open: lazy unmount rather than leave the mount behind.
    if (spawnSync('umount', [dir]).status !== 0) spawnSync('umount', ['-l', dir]);
  });
}

/** Two namespaces joined by a veth pair, RPS on each node's own core. */
function makeNetwork() {
  const id = process.pid;
  const nodes = {
    a: { ns: `drbdts-bench-a-${id}`, veth: `dba${id}`, address: '10.77.0.1', core: 0, rps: '1' },
    b: { ns: `drbdts-bench-b-${id}`, veth: `dbb${id}`, address: '10.77.0.2', core: 1, rps: '2' },
  };
  for (const node of Object.values(nodes)) {
    sh('ip', ['netns', 'add', node.ns]);
    cleanups.push(() => spawnSync('ip', ['netns', 'del', node.ns]));
  }
  sh('ip', ['link', 'add', nodes.a.veth, 'type', 'veth', 'peer', 'name', nodes.b.veth]);
  for (const node of Object.values(nodes)) {
    sh('ip', ['link', 'set', node.veth, 'netns', node.ns]);
    sh('ip', ['-n', node.ns, 'link', 'set', 'lo', 'up']);
    sh('ip', ['-n', node.ns, 'link', 'set', node.veth, 'mtu', '65000', 'up']);
    sh('ip', ['-n', node.ns, 'addr', 'add', `${node.address}/24`, 'dev', node.veth]);
    // `ip netns exec` mounts a sysfs of the namespace, where the veth's queues are.
    sh('ip', ['netns', 'exec', node.ns, 'sh', '-c', `echo ${node.rps} > /sys/class/net/${node.veth}/queues/rx-0/rps_cpus`]);
  }
  return nodes;
}

/** Starts `command` pinned to `core`, inside network namespace `ns` (null: the host's). */
function startPinned(ns, core, command, commandArgs, logFile, env = {}) {
  const argv = [...(ns === null ? [] : ['ip', 'netns', 'exec', ns]), 'taskset', '-c', String(core), command, ...commandArgs];
  const log = fs.openSync(logFile, 'a');
  const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', log, log], env: { ...process.env, ...env } });
  fs.closeSync(log);
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}

/** `ip netns exec` and taskset exec, so the child's pid is the program's own: checked, as CPU time is read from it. */
function programPid(child, command) {
  let exe = '';
  try {
    exe = fs.readlinkSync(`/proc/${child.pid}/exe`);
  } catch {
    return child.pid; // exited already; the caller notices
  }
  if (path.basename(exe) !== path.basename(command)) {
    // Still between exec()s: ip -> taskset -> the program.
    return null;
  }
  return child.pid;
}

const clockTicksPerSecond = Number(sh('getconf', ['CLK_TCK']).trim()) || 100;

/** CPU seconds (user + system, all threads) a process has used so far. */
function cpuSeconds(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / clockTicksPerSecond; // utime, stime (fields 14, 15)
  } catch {
    return 0;
  }
}

/** CPU seconds of this process's children that have been waited for (fio: spawnSync waits for it). */
function waitedChildrenCpuSeconds() {
  const stat = fs.readFileSync('/proc/self/stat', 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[13]) + Number(fields[14])) / clockTicksPerSecond; // cutime, cstime (fields 16, 17)
}

/** Per-cpu [busy, total] jiffies from /proc/stat (busy: all but idle and iowait). */
function cpuTimes() {
  return fs.readFileSync('/proc/stat', 'utf8').split('\n').filter((line) => /^cpu\d+ /.test(line)).map((line) => {
    const values = line.split(/\s+/).slice(1, 9).map(Number);
    const total = values.reduce((a, b) => a + b, 0);
    return [total - values[3] - values[4], total];
  });
}
const busyPercent = (before, after) => after.map(([busy, total], i) => (100 * (busy - before[i][0])) / Math.max(1, total - before[i][1]));

function rssMiB(pid) {
  try {
    const match = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Number(match[1]) / 1024 : 0;
  } catch {
    return 0;
  }
}

// ---- targets ----

class Pair {
  /** alice: Primary in namespace a on core 0; bob: Secondary in namespace b on core 1; images on each node's tmpfs. */
  constructor(dir, net, mounts, dataPath, port, tag) {
    this.dir = dir;
    this.net = net;
    this.mounts = mounts;
    this.dataPath = dataPath;
    this.port = port;
    this.tag = tag;
    this.config = path.join(dir, `${tag}.toml`);
    this.nodes = new Map();
    this.pids = new Map();
    this.peakRssMiB = 0;
  }

  node(name) {
    return name === 'alice' ? { ...this.net.a, mount: this.mounts.a } : { ...this.net.b, mount: this.mounts.b };
  }

  image(name) {
    return path.join(this.node(name).mount, `${name}-${this.tag}.img`);
  }

  async setup({ prefillRandom = false } = {}) {
    const section = (name) => `[node.${name}]
address = "${this.node(name).address}:${this.port}"
disk = "${this.image(name)}"
meta-disk = "internal"
nbd = "unix:${this.dir}/${this.tag}-${name}.nbd"
control = "${this.dir}/${this.tag}-${name}.ctl"
`;
    fs.writeFileSync(this.config, `[resource]
name = "r0"
protocol = "C"
shared-secret = "bench"
[disk]
size = "${sizeMiB}MiB"
[net]
ping-timeout = "10s"
[resync]
rate = "20GiB"
min-rate = "20GiB"
${section('alice')}${section('bob')}`);
    for (const name of ['alice', 'bob']) {
      // Written out before create-md (which puts internal metadata at the end of the file as it is), so the first
      // pass does not pay for allocating tmpfs pages; the baseline's file is made the same way.
      sh('dd', [prefillRandom && name === 'alice' ? 'if=/dev/urandom' : 'if=/dev/zero', `of=${this.image(name)}`, 'bs=1M',
        `count=${sizeMiB + 16}`, 'status=none']);
      this.cli(name, 'create-md', '--force');
    }
  }

  cli(name, command, ...rest) {
    return sh(process.execPath, [cli, command, 'r0', '--config', this.config, '--node', name, ...rest]);
  }

  status(name) {
    return JSON.parse(this.cli(name, 'status', '--json'));
  }

  logFile(name) {
    return path.join(this.dir, `${this.tag}-${name}.log`);
  }

  async up(name) {
    const node = this.node(name);
    const env = { DRBDTS_LOG_LEVEL: 'info' }; // info: the resync start and end lines time the resync
    if (this.dataPath !== null) env.DRBDTS_REPL_DATA_PATH = this.dataPath;
    const child = startPinned(node.ns, node.core, process.execPath,
      [...nodeArgs, cli, 'up', 'r0', '--config', this.config, '--node', name], this.logFile(name), env);
    this.nodes.set(name, child);
    await waitFor(`${name} up`, () => {
      if (child.exitCode !== null) throw new Error(`${name} exited: ${fs.readFileSync(this.logFile(name), 'utf8')}`);
      try {
        this.status(name);
        return true;
      } catch {
        return false;
      }
    });
    const pid = programPid(child, process.execPath);
    if (pid === null) throw new Error(`${name}: pid ${child.pid} is not node`);
    this.pids.set(name, pid);
  }

  sampleRss() {
    for (const pid of this.pids.values()) this.peakRssMiB = Math.max(this.peakRssMiB, rssMiB(pid));
  }

  async down(name) {
    const child = this.nodes.get(name);
    if (child === undefined) return;
    this.sampleRss();
    try {
      this.cli(name, 'down');
    } catch {
      child.kill('SIGKILL');
    }
    await waitFor(`${name} down`, () => child.exitCode !== null || child.signalCode !== null, 30_000);
    this.nodes.delete(name);
    this.pids.delete(name);
  }

  async connected() {
    await waitFor('connected', () => this.status('alice').connection !== 'Connecting' && this.status('bob').connection !== 'Connecting');
  }

  async inSync() {
    // Polled every 500 ms: each poll starts two CLI processes, which compete with the daemons for the CPU.
    await waitFor('in sync', async () => {
      await sleep(450);
      this.sampleRss();
      const a = this.status('alice');
      const b = this.status('bob');
      return a.connection === 'Connected' && b.connection === 'Connected' && b.disk === 'UpToDate' && a.outOfSyncBytes === 0;
    }, 600_000);
  }

  /** Start and end (epoch ms) of the last resync as the target logged them (polling with CLI processes would steal the CPU). */
  resyncWindow(name) {
    const lines = fs.readFileSync(this.logFile(name), 'utf8').split('\n');
    const time = (pattern) => {
      const line = lines.filter((text) => pattern.test(text)).pop();
      return line === undefined ? NaN : JSON.parse(line).time;
    };
    return { startMs: time(/"msg":"resync starts"/), endMs: time(/"msg":"resync finished/) };
  }

  resyncSeconds(name) {
    const { startMs, endMs } = this.resyncWindow(name);
    return (endMs - startMs) / 1000;
  }

  uri(name) {
    return `nbd+unix:///?socket=${this.dir}/${this.tag}-${name}.nbd`;
  }

  async stop() {
    this.sampleRss();
    try {
      this.cli('alice', 'secondary');
    } catch {
      // down anyway
    }
    await this.down('alice');
    await this.down('bob');
    for (const name of ['alice', 'bob']) fs.rmSync(this.image(name), { force: true });
  }
}

async function startBaseline(dir, mount) {
  const image = path.join(mount, 'baseline.img');
  sh('dd', ['if=/dev/zero', `of=${image}`, 'bs=1M', `count=${sizeMiB}`, 'status=none']);
  const socket = path.join(dir, 'baseline.nbd');
  const child = startPinned(null, 0, process.execPath, [...nodeArgs, cli, 'serve', image, '--listen', `unix:${socket}`], path.join(dir, 'baseline.log'));
  await waitFor('baseline server', () => {
    if (child.exitCode !== null) throw new Error(`drbdts serve exited: ${fs.readFileSync(path.join(dir, 'baseline.log'), 'utf8')}`);
    return fs.existsSync(socket);
  });
  await sleep(200);
  const pid = programPid(child, process.execPath);
  if (pid === null) throw new Error(`baseline: pid ${child.pid} is not node`);
  return {
    kind: 'baseline',
    uri: `nbd+unix:///?socket=${socket}`,
    pids: () => [pid],
    sampleRss() {},
    peakRssMiB: 0,
    async stop() {
      child.kill('SIGTERM');
      await waitFor('baseline exit', () => child.exitCode !== null || child.signalCode !== null, 30_000);
      fs.rmSync(image, { force: true });
    },
  };
}

async function startReplicated(dir, net, mounts, dataPath, port) {
  const pair = new Pair(dir, net, mounts, dataPath, port, `pair-${dataPathLabel(dataPath)}`);
  await pair.setup();
  await pair.up('alice');
  await pair.up('bob');
  await pair.connected();
  pair.cli('alice', 'new-current-uuid', '--clear-bitmap');
  await pair.inSync();
  pair.cli('alice', 'primary');
  return {
    kind: dataPathLabel(dataPath),
    uri: pair.uri('alice'),
    pair,
    pids: () => [pair.pids.get('alice'), pair.pids.get('bob')],
    sampleRss: () => pair.sampleRss(),
    get peakRssMiB() {
      return pair.peakRssMiB;
    },
    stop: () => pair.stop(),
  };
}

// ---- measurements ----

/** perf record -g on every thread of `pids` until stop(); the daemons keep running. */
async function startPerf(pids, output) {
  fs.mkdirSync(path.dirname(output), { recursive: true });
  const child = spawn('perf', ['record', '-g', '-F', '999', '-o', output, '-p', pids.join(',')], { stdio: ['ignore', 'ignore', 'pipe'] });
  children.add(child);
  child.on('exit', () => children.delete(child));
  let stderr = '';
  child.stderr.on('data', (chunk) => { stderr += chunk; });
  await sleep(300); // perf attaches to every thread before fio starts
  return {
    async stop() {
      child.kill('SIGINT');
      await new Promise((resolve) => child.once('exit', resolve));
      if (!fs.existsSync(output)) throw new Error(`perf record wrote nothing: ${stderr}`);
    },
  };
}

const fioJobs = [
  { name: 'seqwrite-1m-qd8', title: '1 MiB seq write QD8', lines: ['rw=write', 'bs=1m', 'iodepth=8'], metric: 'bwMiBps', unit: 'MiB/s', bound: 0.9 },
  { name: 'randwrite-4k-qd32', title: '4 KiB rand write QD32', lines: ['rw=randwrite', 'bs=4k', 'iodepth=32'], metric: 'iops', unit: 'IOPS', bound: 0.8 },
];

/** One fio job on core 0, with the daemons' CPU time and each core's busy share around it. */
function runFio(job, target, dir) {
  const jobFile = path.join(dir, `${job.name}.fio`);
  fs.writeFileSync(jobFile, ['[global]', 'ioengine=nbd', `uri=${target.uri}`, `size=${sizeMiB}m`, 'time_based=1',
    `runtime=${runtimeSeconds}`, `[${job.name}]`, ...job.lines, ''].join('\n'));
  const cpuBefore = target.pids().map(cpuSeconds);
  const coresBefore = cpuTimes();
  const fioBefore = waitedChildrenCpuSeconds();
  const start = process.hrtime.bigint();
  const output = sh('taskset', ['-c', '0', 'fio', '--output-format=json', jobFile]);
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  const busy = busyPercent(coresBefore, cpuTimes());
  const cpuAfter = target.pids().map(cpuSeconds);
  const fioSeconds = waitedChildrenCpuSeconds() - fioBefore;
  const result = JSON.parse(output.slice(output.indexOf('{'))).jobs[0];
  if (result.error !== 0) throw new Error(`fio ${job.name} failed: error ${result.error}`);
  const writes = result.write.total_ios;
  return {
    bwMiBps: result.write.bw_bytes / (1024 * 1024),
    iops: result.write.iops,
    writes,
    cpuUsPerWrite: cpuAfter.map((after, i) => ((after - cpuBefore[i]) * 1e6) / writes),
    busy,
    // Each program's share of its own core: /proc/stat's busy also counts whatever else runs on the machine.
    daemonPercent: cpuAfter.map((after, i) => (100 * (after - cpuBefore[i])) / seconds),
    fioPercent: (100 * fioSeconds) / seconds,
  };
}

/** QD1 4 KiB FUA writes from qemu-io on core 0, one timing per write (ops/sec of a single op = 1/latency). */
function fuaLatency(uri) {
  const commandArgs = ['-c', '0', 'qemu-io', '-f', 'raw'];
  for (let i = 0; i < fuaWrites; i += 1) commandArgs.push('-c', `write -f -P ${(i % 250) + 1} ${((i * 7919) % Math.min(16384, sizeMiB * 256)) * 4096} 4k`);
  commandArgs.push(uri);
  const output = sh('taskset', commandArgs);
  const latencies = [...output.matchAll(/and ([\d.]+) ops\/sec/g)].map((match) => 1e6 / Number(match[1]));
  if (latencies.length < fuaWrites * 0.9) throw new Error(`qemu-io reported ${latencies.length} timings`);
  return { p50Us: percentile(latencies, 0.5), p99Us: percentile(latencies, 0.99) };
}

/** A netprobe client in namespace a (core 0) against a netprobe server in namespace b (core 1). */
async function probeLink(net, dir, mode, count) {
  const port = 7700;
  const logFile = path.join(dir, 'netprobe.log');
  const server = startPinned(net.b.ns, net.b.core, process.execPath, [netprobe, 'serve', net.b.address, String(port)], logFile);
  await waitFor('netprobe server', () => {
    if (server.exitCode !== null) throw new Error(`netprobe server exited: ${fs.readFileSync(logFile, 'utf8')}`);
    return fs.readFileSync(logFile, 'utf8').includes('ready');
  }, 20_000);
  try {
    const output = sh('ip', ['netns', 'exec', net.a.ns, 'taskset', '-c', String(net.a.core), process.execPath, netprobe, mode, net.b.address, String(port), String(count)]);
    return JSON.parse(output);
  } finally {
    server.kill('SIGKILL');
    await waitFor('netprobe server exit', () => server.exitCode !== null || server.signalCode !== null, 10_000);
    fs.rmSync(logFile, { force: true });
  }
}

/** dd of zeroes onto the resync target's tmpfs, on the target's core; median of 3. */
function tmpfsWriteMiBps(mount, core) {
  const file = path.join(mount, 'dd.img');
  const samples = [];
  for (let i = 0; i < 3; i += 1) {
    const start = process.hrtime.bigint();
    sh('taskset', ['-c', String(core), 'dd', 'if=/dev/zero', `of=${file}`, 'bs=1M', `count=${ddMiB}`, 'conv=fdatasync', 'status=none']);
    samples.push(ddMiB / (Number(process.hrtime.bigint() - start) / 1e9));
    fs.rmSync(file);
  }
  return median(samples);
}

/** Full resync of random data, then a bitmap resync after the Secondary missed scattered writes. */
async function measureResync(dir, net, mounts, dataPath, port) {
  const pair = new Pair(dir, net, mounts, dataPath, port, `resync-${dataPathLabel(dataPath)}`);
  await pair.setup({ prefillRandom: true });
  await pair.up('alice');
  await pair.up('bob');
  await pair.connected();
  const cpuBefore = [pair.pids.get('alice'), pair.pids.get('bob')].map(cpuSeconds);
  // /proc/stat every 50 ms, so the busy share covers the resync as the target logged it, not the polling after it.
  const coreSamples = [[Date.now(), cpuTimes()]];
  const sampler = setInterval(() => coreSamples.push([Date.now(), cpuTimes()]), 50);
  pair.cli('alice', 'primary', '--force');
  await pair.inSync();
  clearInterval(sampler);
  coreSamples.push([Date.now(), cpuTimes()]);
  const { startMs, endMs } = pair.resyncWindow('bob');
  const before = coreSamples.filter(([time]) => time <= startMs).pop() ?? coreSamples[0];
  const after = coreSamples.find(([time]) => time >= endMs) ?? coreSamples[coreSamples.length - 1];
  const busy = busyPercent(before[1], after[1]);
  const cpuUsPerMiB = [pair.pids.get('alice'), pair.pids.get('bob')].map((pid, i) => ((cpuSeconds(pid) - cpuBefore[i]) * 1e6) / sizeMiB);
  const fullMiBps = sizeMiB / pair.resyncSeconds('bob');
  console.error(`  ${dataPathLabel(dataPath)} full resync: ${fullMiBps.toFixed(0)} MiB/s, CPU per MiB ${cpuUsPerMiB.map((us) => us.toFixed(0)).join(' + ')} us, cores ${busy.map((b) => b.toFixed(0)).join('% / ')}% (CPU: from primary --force to in sync; busy: during the resync)`);

  await pair.down('bob');
  const dirtyJob = path.join(dir, 'dirty.fio');
  fs.writeFileSync(dirtyJob, ['[global]', 'ioengine=nbd', `uri=${pair.uri('alice')}`, `size=${sizeMiB}m`,
    '[scatter]', 'rw=randwrite', 'bs=64k', `io_size=${Math.round(sizeMiB / 8)}m`, 'iodepth=8', 'randrepeat=0', ''].join('\n'));
  sh('taskset', ['-c', '0', 'fio', '--output-format=json', dirtyJob]);
  const dirtyBytes = pair.status('alice').outOfSyncBytes;
  const countersBefore = pair.status('alice').counters;
  await pair.up('bob');
  await pair.inSync();
  const countersAfter = pair.status('alice').counters;
  // Block data sent (what the target is compared with), and the frame headers on top of it.
  const sentBytes = countersAfter.resyncSentDataBytes - countersBefore.resyncSentDataBytes;
  const headerBytes = countersAfter.resyncSentBytes - countersBefore.resyncSentBytes - sentBytes;
  const receivedBytes = pair.status('bob').counters.resyncReceivedBytes;
  await pair.stop();
  return { fullMiBps, cpuUsPerMiB, busy, dirtyBytes, sentBytes, headerBytes, receivedBytes, peakRssMiB: pair.peakRssMiB };
}

// ---- report ----

const fixed = (value, digits = 0) => (Number.isFinite(value) ? value.toFixed(digits) : '-');
const verdict = (ok) => (ok ? 'met' : 'missed');

function commitText() {
  const head = spawnSync('git', ['-C', repoRoot, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' });
  if (head.status !== 0) return 'unknown';
  const dirty = spawnSync('git', ['-C', repoRoot, 'status', '--porcelain', '--untracked-files=no', '--', 'src', 'native', 'bin', 'proto'], { encoding: 'utf8' });
  return head.stdout.trim() + (dirty.stdout.trim() === '' ? '' : ' + uncommitted changes in src/native');
}

async function main() {
  const started = new Date();
  const loadAtStart = os.loadavg()[0];
  // What the machine's other work takes from each core before anything starts: the figures' noise floor.
  const idleBefore = cpuTimes();
  await sleep(2000);
  const backgroundBusy = busyPercent(idleBefore, cpuTimes());
  console.error(`background busy before the run: core 0 ${backgroundBusy[0].toFixed(0)}%, core 1 ${backgroundBusy[1].toFixed(0)}%`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'drbdts-bench-repl-'));
  cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  const pairMiB = dataPaths.length * (sizeMiB + 20);
  const mounts = { a: path.join(dir, 'node-a'), b: path.join(dir, 'node-b'), baseline: path.join(dir, 'baseline') };
  mountTmpfs(mounts.a, pairMiB + 64);
  mountTmpfs(mounts.b, Math.max(pairMiB, ddMiB) + 64);
  mountTmpfs(mounts.baseline, sizeMiB + 64);
  const net = makeNetwork();
  const labels = dataPaths.map(dataPathLabel);
  const kinds = ['baseline', ...labels];
  const samples = Object.fromEntries(kinds.map((kind) => [kind, Object.fromEntries([...fioJobs.map((job) => [job.name, []]), ['fua', []]])]));
  let peakRssMiB = 0;

  const rtt = await probeLink(net, dir, 'rtt', rttSamples);
  console.error(`veth round trip (Node.js TCP, 24 B, core 0 -> core 1): p50 ${rtt.p50Us.toFixed(1)} us, p99 ${rtt.p99Us.toFixed(1)} us`);

  if (!skipFio) {
    const targets = [await startBaseline(dir, mounts.baseline)];
    for (const [i, dataPath] of dataPaths.entries()) targets.push(await startReplicated(dir, net, mounts, dataPath, 7789 + i));
    for (const target of targets) {
      for (const job of fioJobs) runFio(job, target, dir); // warm-up, not counted
      console.error(`warm-up ${target.kind} done`);
    }
    for (let round = 0; round < rounds; round += 1) {
      for (const target of round % 2 === 0 ? targets : [...targets].reverse()) {
        for (const job of fioJobs) {
          const recorder = perfDir === null ? null : await startPerf(target.pids(), path.join(perfDir, `${target.kind}-${job.name}-r${round + 1}.data`));
          const result = runFio(job, target, dir);
          if (recorder !== null) await recorder.stop();
          samples[target.kind][job.name].push(result);
          console.error(`  r${round + 1} ${target.kind} ${job.name}: ${result[job.metric].toFixed(0)} ${job.unit}, CPU per write ${result.cpuUsPerWrite.map((us) => us.toFixed(0)).join(' + ')} us, cores ${result.busy.map((b) => b.toFixed(0)).join('% / ')}% (daemons ${result.daemonPercent.map((b) => b.toFixed(0)).join('% / ')}%, fio ${result.fioPercent.toFixed(0)}%)`);
          target.sampleRss();
        }
        samples[target.kind].fua.push(fuaLatency(target.uri));
        target.sampleRss();
      }
      console.error(`round ${round + 1}/${rounds} done`);
    }
    for (const target of targets) {
      target.sampleRss();
      peakRssMiB = Math.max(peakRssMiB, target.peakRssMiB);
      await target.stop();
    }
  }

  const resync = {};
  let limits = null;
  if (!skipResync) {
    const tcpSamples = [];
    for (let i = 0; i < 3; i += 1) tcpSamples.push((await probeLink(net, dir, 'send', tcpMiB)).MiBps);
    limits = { tmpfsMiBps: tmpfsWriteMiBps(mounts.b, net.b.core), tcpMiBps: median(tcpSamples) };
    console.error(`limits: tmpfs write ${limits.tmpfsMiBps.toFixed(0)} MiB/s (dd on core 1, median of 3), veth TCP ${tcpSamples.map((v) => v.toFixed(0)).join(', ')} MiB/s (Node.js, core 0 -> core 1)`);
    limits.limitMiBps = Math.min(limits.tmpfsMiBps, limits.tcpMiBps);
    for (const [i, dataPath] of dataPaths.entries()) {
      resync[dataPathLabel(dataPath)] = await measureResync(dir, net, mounts, dataPath, 7795 + i);
      peakRssMiB = Math.max(peakRssMiB, resync[dataPathLabel(dataPath)].peakRssMiB);
    }
  }

  // Paired figures: per round, replicated / baseline; the table shows the median of each side and of the ratios.
  const value = (kind, job, metric) => median(samples[kind][job].map(metric));
  const pairedRatio = (kind, job, metric) => median(samples[kind][job].map((sample, i) => metric(sample) / metric(samples.baseline[job][i])));
  const lines = [];
  const log = (line) => {
    console.log(line);
    lines.push(line);
  };
  const summary = { rows: [] };
  const row = (cells) => log(`| ${cells.join(' | ')} |`);
  log(`Replication measured as on two machines, protocol C vs \`drbdts serve\`: ${started.toISOString().slice(0, 16).replace('T', ' ')} UTC, `
    + `${os.cpus().length} cores (${os.cpus()[0].model.trim()}), commit ${commitText()}, ${rounds} round(s) of ${runtimeSeconds} s jobs, `
    + `${sizeMiB} MiB device, data path ${labels.join(' and ')}, load ${loadAtStart.toFixed(1)} -> ${os.loadavg()[0].toFixed(1)}, `
    + `background busy before the run core 0 ${fixed(backgroundBusy[0])}%, core 1 ${fixed(backgroundBusy[1])}%`);
  log('');
  row(['measure', 'baseline', ...labels.flatMap((label) => [`protocol C, ${label}`, 'ratio']), 'target']);
  row(Array(3 + 2 * labels.length).fill('---'));
  if (!skipFio) {
    for (const job of fioJobs) {
      const metric = (sample) => sample[job.metric];
      const cells = labels.flatMap((label) => {
        const ratio = pairedRatio(label, job.name, metric);
        summary.rows.push({ measure: job.name, dataPath: label, baseline: value('baseline', job.name, metric), replicated: value(label, job.name, metric), ratio, target: `>= ${job.bound}` });
        return [fixed(value(label, job.name, metric)), `${fixed(ratio, 2)}x ${verdict(ratio >= job.bound)}`];
      });
      row([`${job.title} (${job.unit})`, fixed(value('baseline', job.name, metric)), ...cells, `>= ${job.bound}x`]);
    }
    for (const job of fioJobs) {
      const primary = (sample) => sample.cpuUsPerWrite[0];
      const secondary = (sample) => sample.cpuUsPerWrite[1];
      const cells = labels.flatMap((label) => {
        const ratio = pairedRatio(label, job.name, primary);
        summary.rows.push({ measure: `${job.name} Primary CPU us per write`, dataPath: label, baseline: value('baseline', job.name, primary), replicated: value(label, job.name, primary), secondary: value(label, job.name, secondary), ratio, target: '<= 1.3' });
        return [`${fixed(value(label, job.name, primary))} (Secondary ${fixed(value(label, job.name, secondary))})`, `${fixed(ratio, 2)}x ${verdict(ratio <= 1.3)}`];
      });
      row([`${job.title}: Primary CPU per write (us)`, fixed(value('baseline', job.name, primary)), ...cells, '<= 1.3x']);
    }
    for (const job of fioJobs) {
      const share = (kind, metric) => `${fixed(value(kind, job.name, metric))}%`;
      const text = (kind) => {
        const core0 = `core 0 ${share(kind, (sample) => sample.busy[0])} (${kind === 'baseline' ? 'serve' : 'Primary'} ${share(kind, (sample) => sample.daemonPercent[0])}, fio ${share(kind, (sample) => sample.fioPercent)})`;
        const core1 = `core 1 ${share(kind, (sample) => sample.busy[1])}${kind === 'baseline' ? '' : ` (Secondary ${share(kind, (sample) => sample.daemonPercent[1])})`}`;
        return `${core0}, ${core1}`;
      };
      row([`${job.title}: core busy (of it: each program)`, text('baseline'), ...labels.flatMap((label) => [text(label), '']), '']);
    }
    const fua = (kind, key) => median(samples[kind].fua.map((sample) => sample[key]));
    const bound = (fua('baseline', 'p50Us') + rtt.p50Us) * 1.1;
    row(['QD1 4 KiB FUA write p50 (us)', fixed(fua('baseline', 'p50Us')),
      ...labels.flatMap((label) => [fixed(fua(label, 'p50Us')), `${fixed(fua(label, 'p50Us') / fua('baseline', 'p50Us'), 2)}x ${verdict(fua(label, 'p50Us') <= bound)}`]),
      `<= (baseline + RTT ${fixed(rtt.p50Us)}) x 1.1 = ${fixed(bound)}`]);
    row(['QD1 4 KiB FUA write p99 (us)', fixed(fua('baseline', 'p99Us')),
      ...labels.flatMap((label) => [fixed(fua(label, 'p99Us')), `${fixed(fua(label, 'p99Us') / fua('baseline', 'p99Us'), 2)}x`]), '']);
    for (const label of labels) {
      summary.rows.push({ measure: 'fua p50 us', dataPath: label, baseline: fua('baseline', 'p50Us'), replicated: fua(label, 'p50Us'), bound, target: '<= (baseline + RTT) x 1.1' });
      summary.rows.push({ measure: 'fua p99 us', dataPath: label, baseline: fua('baseline', 'p99Us'), replicated: fua(label, 'p99Us') });
    }
  }
  row(['veth round trip, Node.js TCP 24 B, p50 / p99 (us)', '', ...labels.flatMap(() => ['', '']), `${fixed(rtt.p50Us, 1)} / ${fixed(rtt.p99Us, 1)}`]);
  if (!skipResync) {
    row([`full resync of random data (MiB/s)`, `min(tmpfs write ${fixed(limits.tmpfsMiBps)}, veth TCP ${fixed(limits.tcpMiBps)}) = ${fixed(limits.limitMiBps)}`,
      ...labels.flatMap((label) => {
        const ratio = resync[label].fullMiBps / limits.limitMiBps;
        summary.rows.push({ measure: 'full resync MiB/s', dataPath: label, limit: limits.limitMiBps, replicated: resync[label].fullMiBps, ratio, target: '>= 0.9' });
        return [`${fixed(resync[label].fullMiBps)} (CPU us/MiB ${resync[label].cpuUsPerMiB.map((us) => fixed(us)).join(' + ')}; core 0 ${fixed(resync[label].busy[0])}%, core 1 ${fixed(resync[label].busy[1])}%)`,
          `${fixed(ratio, 2)}x ${verdict(ratio >= 0.9)}`];
      }), '>= 0.9x']);
    row(['bitmap resync: data bytes sent / dirty bytes', '',
      ...labels.flatMap((label) => {
        const r = resync[label];
        const ratio = r.sentBytes / r.dirtyBytes;
        summary.rows.push({ measure: 'bitmap resync sent/dirty', dataPath: label, dirtyBytes: r.dirtyBytes, sentBytes: r.sentBytes, ratio, target: '<= 1.0' });
        return [`${fixed(r.sentBytes / 1048576, 1)} of ${fixed(r.dirtyBytes / 1048576, 1)} MiB dirty (+ ${r.headerBytes} B of frame headers)`, `${fixed(ratio, 4)}x ${verdict(ratio <= 1.0)}`];
      }), '<= 1.0x']);
  }
  row(['daemon peak RSS (MiB, VmHWM)', '', ...labels.flatMap(() => ['', '']), `${fixed(peakRssMiB)} (all data paths)`]);
  const seconds = (Date.now() - started.getTime()) / 1000;
  console.error(`run took ${seconds.toFixed(0)} s`);

  if (outPath !== null) {
    fs.writeFileSync(outPath, `${JSON.stringify({
      method: 'two-machine',
      date: started.toISOString(),
      seconds,
      machine: { cores: os.cpus().length, model: os.cpus()[0].model.trim(), kernel: os.release(), load: [loadAtStart, os.loadavg()[0]], backgroundBusy },
      commit: commitText(),
      options: { rounds, runtimeSeconds, sizeMiB, dataPaths: labels, fuaWrites },
      link: { rtt, ...limits },
      samples,
      resync,
      peakRssMiB,
      summary,
      table: lines,
    }, null, 2)}\n`);
  }
}

main().then(() => cleanUp(), (error) => {
  console.error(error);
  process.exitCode = 1;
  cleanUp();
});
