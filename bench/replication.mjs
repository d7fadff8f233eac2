// Replication benchmark (issue 3's performance section), every figure as a ratio measured in the same run:
//  - protocol C (two drbdts nodes over loopback) vs standalone (`drbdts serve`) on the same fio jobs,
//    alternating order every round: 1 MiB sequential writes QD8, 4 KiB random writes QD32;
//  - QD1 4 KiB FUA write latency p50 (qemu-io `write -f`, one timing per write) vs standalone + one loopback
//    round trip (measured here, Node.js both ends, as the link is);
//  - full resync throughput of random data vs min(raw backing write (dd conv=fdatasync), loopback TCP);
//  - bytes sent by a bitmap resync vs the dirty bytes;
//  - the daemons' peak RSS.
//  - CPU time per write of every daemon (utime+stime from /proc/PID/stat around each fio job).
// Usage: node bench/replication.mjs [--quick] [--rounds N] [--size 512m] [--out FILE] [--only standalone|replicated]
//        [--no-resync] [--no-fio] [--cpu-prof DIR] (the daemons run with node --cpu-prof, profiles written to DIR at their exit)
//        [--perf DIR] (perf record -g on the daemons' threads during each fio job: DIR/KIND-JOB-rROUND.data)
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, sh } from './lib/process.mjs';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/**
 * The tree is shared with engineers rebuilding dist/ while this runs for minutes: run a private snapshot of the
 * built program (dist, bin, proto, the addon; node_modules linked) so a rebuild cannot break a round half-way.
 */
function snapshotProgram() {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'drbdts-bench-program-'));
  for (const dir of ['dist', 'bin', 'proto']) fs.cpSync(path.join(repoRoot, dir), path.join(root, dir), { recursive: true });
  fs.mkdirSync(path.join(root, 'native/build/Release'), { recursive: true });
  fs.copyFileSync(path.join(repoRoot, 'native/build/Release/drbdts_native.node'), path.join(root, 'native/build/Release/drbdts_native.node'));
  fs.copyFileSync(path.join(repoRoot, 'package.json'), path.join(root, 'package.json'));
  fs.symlinkSync(path.join(repoRoot, 'node_modules'), path.join(root, 'node_modules'));
  process.on('exit', () => fs.rmSync(root, { recursive: true, force: true }));
  return root;
}
const programRoot = snapshotProgram();
const cli = path.join(programRoot, 'bin', 'drbdts.js');
const args = process.argv.slice(2);
const flag = (name) => args.includes(name);
const option = (name, fallback) => {
  const index = args.indexOf(name);
  return index >= 0 && index + 1 < args.length ? args[index + 1] : fallback;
};
const quick = flag('--quick');
const rounds = Number(option('--rounds', quick ? '1' : '3'));
const sizeText = option('--size', quick ? '128m' : '512m');
const sizeMiB = parseInt(sizeText, 10) * (sizeText.endsWith('g') ? 1024 : 1);
const runtimeSeconds = quick ? 1 : 8;
const fuaWrites = quick ? 200 : 2000;
const outPath = option('--out', null);
/** --only standalone|replicated: one side of the comparison (for investigating, not for the table). */
const only = option('--only', null);
const cpuProfDir = option('--cpu-prof', null);
/** --no-resync: only the fio and FUA rounds (for investigating). --no-fio: only the resync measures. */
const skipResync = flag('--no-resync');
const skipFio = flag('--no-fio');
const nodeArgs = cpuProfDir === null ? [] : ['--cpu-prof', `--cpu-prof-dir=${path.resolve(cpuProfDir)}`];
/** --perf DIR: `perf record -g` on the daemons around every fio job, one perf.data per job and round in DIR. */
const perfDir = option('--perf', null);

const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
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

// ---- processes ----

const children = new Set();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});

function startProcess(command, commandArgs, logFile, logLevel = 'warn') {
  const log = fs.openSync(logFile, 'a');
  const child = spawn(command, commandArgs, { stdio: ['ignore', log, log], env: { ...process.env, DRBDTS_LOG_LEVEL: logLevel } });
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}

const clockTicksPerSecond = Number(sh('getconf', ['CLK_TCK']).trim()) || 100;

/** CPU seconds (user + system) a process has used so far. */
function cpuSeconds(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / clockTicksPerSecond; // utime, stime (fields 14, 15)
  } catch {
    return 0;
  }
}

function rssMiB(pid) {
  try {
    const match = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Number(match[1]) / 1024 : 0;
  } catch {
    return 0;
  }
}

class Pair {
  constructor(dir, protocol) {
    this.dir = dir;
    this.protocol = protocol;
    this.config = path.join(dir, 'r0.toml');
    this.nodes = new Map();
    this.peakRssMiB = 0;
  }

  async setup({ prefillRandom = false } = {}) {
    const [pa, pb] = [await freePort(), await freePort()];
    fs.writeFileSync(this.config, `[resource]
name = "r0"
protocol = "${this.protocol}"
shared-secret = "bench"
[disk]
size = "${sizeMiB}MiB"
[net]
ping-timeout = "10s"
[resync]
rate = "20GiB"
min-rate = "20GiB"
[node.alice]
address = "127.0.0.1:${pa}"
disk = "${this.dir}/alice.img"
meta-disk = "internal"
nbd = "unix:${this.dir}/alice.nbd"
control = "${this.dir}/alice.ctl"
[node.bob]
address = "127.0.0.1:${pb}"
disk = "${this.dir}/bob.img"
meta-disk = "internal"
nbd = "unix:${this.dir}/bob.nbd"
control = "${this.dir}/bob.ctl"
`);
    for (const node of ['alice', 'bob']) {
      const image = path.join(this.dir, `${node}.img`);
      // Preallocated before create-md (which puts internal metadata at the end of the file as it is).
      // Written out (not just fallocated) so the first fio pass does not pay for converting unwritten extents,
      // in both setups alike (the standalone file is made the same way).
      sh('dd', [prefillRandom && node === 'alice' ? 'if=/dev/urandom' : 'if=/dev/zero', `of=${image}`, 'bs=1M',
        `count=${sizeMiB + 16}`, 'conv=fdatasync', 'status=none']);
      this.cli(node, 'create-md', '--force');
    }
  }

  cli(node, command, ...rest) {
    return sh('node', [cli, command, 'r0', '--config', this.config, '--node', node, ...rest]);
  }

  status(node) {
    return JSON.parse(this.cli(node, 'status', '--json'));
  }

  async up(node) {
    // info level: the resync start and end lines carry the daemon's own timestamps (see resyncSeconds).
    const child = startProcess('node', [...nodeArgs, cli, 'up', 'r0', '--config', this.config, '--node', node], path.join(this.dir, `${node}.log`), 'info');
    this.nodes.set(node, child);
    await waitFor(`${node} up`, () => {
      if (child.exitCode !== null) throw new Error(`${node} exited: ${fs.readFileSync(path.join(this.dir, `${node}.log`), 'utf8')}`);
      try {
        this.status(node);
        return true;
      } catch {
        return false;
      }
    });
  }

  sampleRss() {
    for (const child of this.nodes.values()) this.peakRssMiB = Math.max(this.peakRssMiB, rssMiB(child.pid));
  }

  async down(node) {
    const child = this.nodes.get(node);
    if (child === undefined) return;
    this.sampleRss();
    try {
      this.cli(node, 'down');
    } catch {
      child.kill('SIGKILL');
    }
    await waitFor(`${node} down`, () => child.exitCode !== null || child.signalCode !== null, 30_000);
    this.nodes.delete(node);
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

  /** Duration of the last resync as the target logged it (polling with CLI processes would steal the CPU). */
  resyncSeconds(node) {
    const lines = fs.readFileSync(path.join(this.dir, `${node}.log`), 'utf8').split('\n');
    const time = (pattern) => {
      const line = lines.filter((text) => pattern.test(text)).pop();
      return line === undefined ? NaN : JSON.parse(line).time;
    };
    return (time(/"msg":"resync finished/) - time(/"msg":"resync starts"/)) / 1000;
  }

  uri(node) {
    return `nbd+unix:///?socket=${this.dir}/${node}.nbd`;
  }
}

// ---- measurements ----

/** perf record -g on every thread of `pids` until stop(); the daemons keep running. */
async function startPerf(pids, output) {
  fs.mkdirSync(path.dirname(output), { recursive: true });
  const child = spawn('perf', ['record', '-g', '-F', '999', '-o', output, '-p', pids.join(',')], { stdio: ['ignore', 'ignore', 'pipe'] });
  // Killed with the daemons if the run fails: a leftover perf would hold the benchmark lock's descriptor.
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

function runFio(name, lines, uri, dir) {
  const jobFile = path.join(dir, `${name}.fio`);
  const fioSize = Math.min(sizeMiB, quick ? 64 : 512);
  fs.writeFileSync(jobFile, ['[global]', 'ioengine=nbd', `uri=${uri}`, `size=${fioSize}m`, `[${name}]`, ...lines, ''].join('\n'));
  const output = sh('fio', ['--output-format=json', jobFile]);
  const report = JSON.parse(output.slice(output.indexOf('{')));
  const result = report.jobs[0];
  if (result.error !== 0) throw new Error(`fio ${name} failed: error ${result.error}`);
  return { bwMiBps: result.write.bw_bytes / (1024 * 1024), iops: result.write.iops, writes: result.write.total_ios };
}

/** p50 of QD1 4 KiB FUA writes, from qemu-io's per-command timing (ops/sec of a single op = 1/latency). */
function fuaLatencyP50us(uri) {
  const commandArgs = ['-f', 'raw'];
  for (let i = 0; i < fuaWrites; i += 1) commandArgs.push('-c', `write -f -P ${(i % 250) + 1} ${(i * 7919 % 16384) * 4096} 4k`);
  commandArgs.push(uri);
  const output = sh('qemu-io', commandArgs);
  const latencies = [...output.matchAll(/and ([\d.]+) ops\/sec/g)].map((match) => 1e6 / Number(match[1]));
  if (latencies.length < fuaWrites * 0.9) throw new Error(`qemu-io reported ${latencies.length} timings`);
  return median(latencies);
}

async function loopbackRoundTripUs() {
  const server = net.createServer((socket) => socket.on('data', (data) => socket.write(data)));
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const socket = net.connect(server.address().port, '127.0.0.1');
  socket.setNoDelay(true);
  await new Promise((resolve) => socket.once('connect', resolve));
  const samples = [];
  const message = Buffer.alloc(24);
  for (let i = 0; i < 2000; i += 1) {
    const start = process.hrtime.bigint();
    await new Promise((resolve) => {
      socket.once('data', resolve);
      socket.write(message);
    });
    samples.push(Number(process.hrtime.bigint() - start) / 1000);
  }
  socket.destroy();
  server.close();
  return median(samples);
}

async function loopbackTcpMiBps() {
  const totalBytes = (quick ? 512 : 4096) * 1024 * 1024;
  const server = net.createServer((socket) => socket.resume());
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const socket = net.connect(server.address().port, '127.0.0.1');
  await new Promise((resolve) => socket.once('connect', resolve));
  const chunk = Buffer.alloc(1024 * 1024, 1);
  const start = process.hrtime.bigint();
  let sent = 0;
  while (sent < totalBytes) {
    sent += chunk.length;
    if (!socket.write(chunk)) await new Promise((resolve) => socket.once('drain', resolve));
  }
  await new Promise((resolve) => socket.end(resolve));
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  server.close();
  return totalBytes / (1024 * 1024) / seconds;
}

function rawBackingWriteMiBps(dir) {
  const file = path.join(dir, 'dd.img');
  const count = quick ? 256 : 1024;
  const start = process.hrtime.bigint();
  sh('dd', ['if=/dev/zero', `of=${file}`, 'bs=1M', `count=${count}`, 'conv=fdatasync', 'status=none']);
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  fs.rmSync(file);
  return count / seconds;
}

async function standalone(dir) {
  const image = path.join(dir, 'standalone.img');
  sh('dd', ['if=/dev/zero', `of=${image}`, 'bs=1M', `count=${sizeMiB}`, 'conv=fdatasync', 'status=none']);
  const socket = path.join(dir, 'standalone.nbd');
  const child = startProcess('node', [...nodeArgs, cli, 'serve', image, '--listen', `unix:${socket}`], path.join(dir, 'standalone.log'));
  await waitFor('standalone server', () => fs.existsSync(socket));
  await sleep(200);
  return {
    uri: `nbd+unix:///?socket=${socket}`,
    pids: () => [child.pid],
    async stop() {
      child.kill('SIGTERM');
      await waitFor('standalone exit', () => child.exitCode !== null || child.signalCode !== null, 30_000);
      fs.rmSync(image, { force: true });
    },
  };
}

async function replicated(dir) {
  const pairDir = fs.mkdtempSync(path.join(dir, 'pair-'));
  const pair = new Pair(pairDir, 'C');
  await pair.setup();
  await pair.up('alice');
  await pair.up('bob');
  await pair.connected();
  pair.cli('alice', 'new-current-uuid', '--clear-bitmap');
  await pair.inSync();
  pair.cli('alice', 'primary');
  return {
    uri: pair.uri('alice'),
    pair,
    pids: () => [pair.nodes.get('alice').pid, pair.nodes.get('bob').pid],
    async stop() {
      pair.sampleRss();
      pair.cli('alice', 'secondary');
      await pair.down('alice');
      await pair.down('bob');
      fs.rmSync(pairDir, { recursive: true, force: true });
    },
  };
}

const fioJobs = [
  { name: 'seqwrite-1m-qd8', lines: ['rw=write', 'bs=1m', 'iodepth=8'], metric: 'bwMiBps', unit: 'MiB/s', bound: 0.9 },
  { name: 'randwrite-4k-qd32', lines: ['rw=randwrite', 'bs=4k', 'iodepth=32', 'time_based=1', `runtime=${runtimeSeconds}`], metric: 'iops', unit: 'IOPS', bound: 0.8 },
];

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'drbdts-bench-repl-'));
  const lines = [];
  const log = (line) => {
    console.log(line);
    lines.push(line);
  };
  let peakRssMiB = 0;
  try {
    const results = { standalone: {}, replicated: {} };
    for (const job of fioJobs) results.standalone[job.name] = [], results.replicated[job.name] = [];
    const cpu = { standalone: {}, replicated: {} };
    for (const job of fioJobs) cpu.standalone[job.name] = [], cpu.replicated[job.name] = [];
    results.standalone.fua = [];
    results.replicated.fua = [];
    for (let round = 0; round < (skipFio ? 0 : rounds); round += 1) {
      const order = (round % 2 === 0 ? ['standalone', 'replicated'] : ['replicated', 'standalone'])
        .filter((kind) => only === null || kind === only);
      for (const kind of order) {
        const target = kind === 'standalone' ? await standalone(dir) : await replicated(dir);
        for (const job of fioJobs) {
          const recorder = perfDir === null ? null : await startPerf(target.pids(), path.join(perfDir, `${kind}-${job.name}-r${round + 1}.data`));
          const before = target.pids().map(cpuSeconds);
          const result = runFio(job.name, job.lines, target.uri, dir);
          if (recorder !== null) await recorder.stop();
          results[kind][job.name].push(result[job.metric]);
          const used = target.pids().map((pid, i) => ((cpuSeconds(pid) - before[i]) * 1e6) / result.writes);
          cpu[kind][job.name].push(used);
          console.error(`  ${kind} ${job.name}: ${result[job.metric].toFixed(0)} ${job.unit}, CPU per write ${used.map((us) => us.toFixed(0)).join(' + ')} us`);
          target.pair?.sampleRss();
        }
        results[kind].fua.push(fuaLatencyP50us(target.uri));
        target.pair?.sampleRss();
        peakRssMiB = Math.max(peakRssMiB, target.pair?.peakRssMiB ?? 0);
        await target.stop();
        console.error(`round ${round + 1}/${rounds} ${kind} done`);
      }
    }
    const rttUs = await loopbackRoundTripUs();
    log(`Replication, protocol C vs standalone (${rounds} round(s), medians; ${sizeMiB} MiB device; ${new Date().toISOString().slice(0, 10)})`);
    log('');
    log('| measure | standalone | protocol C | ratio | target |');
    log('|---|---|---|---|---|');
    for (const job of fioJobs) {
      const s = median(results.standalone[job.name]);
      const r = median(results.replicated[job.name]);
      log(`| ${job.name} (${job.unit}) | ${s.toFixed(0)} | ${r.toFixed(0)} | ${(r / s).toFixed(2)}x | >= ${job.bound}x |`);
    }
    for (const job of fioJobs) {
      const perProcess = (kind) => {
        const samples = cpu[kind][job.name];
        if (samples.length === 0) return '-';
        return samples[0].map((_, i) => median(samples.map((sample) => sample[i])).toFixed(0)).join(' + ');
      };
      log(`| ${job.name}: daemon CPU per write (us) | ${perProcess('standalone')} | ${perProcess('replicated')} (Primary + Secondary) | | |`);
    }
    const fuaStandalone = median(results.standalone.fua);
    const fuaReplicated = median(results.replicated.fua);
    const fuaBound = (fuaStandalone + rttUs) * 1.1;
    log(`| QD1 4k FUA write p50 (us) | ${fuaStandalone.toFixed(0)} | ${fuaReplicated.toFixed(0)} | bound ${(fuaBound).toFixed(0)} = (standalone + RTT ${rttUs.toFixed(0)}) x 1.1 | ${fuaReplicated <= fuaBound ? 'met' : 'missed'} |`);

    if (skipResync) return;
    // Resync: full sync of random data, and a bitmap resync after the Secondary missed scattered writes.
    const rawMiBps = rawBackingWriteMiBps(dir);
    const tcpMiBps = await loopbackTcpMiBps();
    const limit = Math.min(rawMiBps, tcpMiBps);
    const pairDir = fs.mkdtempSync(path.join(dir, 'resync-'));
    const pair = new Pair(pairDir, 'C');
    await pair.setup({ prefillRandom: true });
    await pair.up('alice');
    await pair.up('bob');
    await pair.connected();
    const cpuBefore = [...pair.nodes.values()].map((child) => cpuSeconds(child.pid));
    pair.cli('alice', 'primary', '--force');
    await pair.inSync();
    const resyncCpu = [...pair.nodes.values()].map((child, i) => cpuSeconds(child.pid) - cpuBefore[i]);
    const resyncMiBps = sizeMiB / pair.resyncSeconds('bob');
    console.error(`  resync: ${resyncMiBps.toFixed(0)} MiB/s, CPU per MiB ${resyncCpu.map((s) => ((s * 1e6) / sizeMiB).toFixed(0)).join(' + ')} us (source + target, from primary --force to in sync)`);
    log(`| full resync of random data (MiB/s) | min(raw write ${rawMiBps.toFixed(0)}, loopback TCP ${tcpMiBps.toFixed(0)}) = ${limit.toFixed(0)} | ${resyncMiBps.toFixed(0)} | ${(resyncMiBps / limit).toFixed(2)}x | >= 0.9x |`);

    await pair.down('bob');
    const dirtySource = path.join(pairDir, 'dirty.fio');
    fs.writeFileSync(dirtySource, ['[global]', 'ioengine=nbd', `uri=${pair.uri('alice')}`, `size=${sizeMiB}m`,
      '[scatter]', 'rw=randwrite', 'bs=64k', `io_size=${Math.round(sizeMiB / 8)}m`, 'iodepth=8', 'randrepeat=0', ''].join('\n'));
    sh('fio', ['--output-format=json', dirtySource]);
    const dirtyBytes = pair.status('alice').outOfSyncBytes;
    const sentBefore = pair.status('alice').counters.resyncSentBytes;
    await pair.up('bob');
    await pair.inSync();
    const sentBytes = pair.status('alice').counters.resyncSentBytes - sentBefore;
    const receivedBytes = pair.status('bob').counters.resyncReceivedBytes;
    log(`| bitmap resync: bytes sent / dirty bytes | dirty ${(dirtyBytes / 1048576).toFixed(1)} MiB | sent ${(sentBytes / 1048576).toFixed(1)} MiB (received ${(receivedBytes / 1048576).toFixed(1)}) | ${(sentBytes / dirtyBytes).toFixed(3)}x | <= 1.05x |`);
    pair.sampleRss();
    peakRssMiB = Math.max(peakRssMiB, pair.peakRssMiB);
    pair.cli('alice', 'secondary');
    await pair.down('alice');
    await pair.down('bob');
    log(`| daemon peak RSS (MiB, VmHWM) | | ${peakRssMiB.toFixed(0)} | | < 256 |`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
    if (outPath !== null) fs.writeFileSync(outPath, lines.join('\n') + '\n');
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
