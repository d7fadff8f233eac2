// NBD serving benchmark: the fio jobs of docs (../shared/reference/performance-method.md) against
// `drbdts serve` and `nbdkit file` on the same backing file, in one run, alternating server order every
// round, over a unix socket and over TCP. Reports medians and drbdts/nbdkit ratios as a markdown table.
// Usage: node bench/nbd-compare.mjs [--quick] [--rounds N] [--transports unix,tcp] [--size 1g] [--no-warmup] [--out FILE]
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, sh } from './lib/process.mjs';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const flag = (name) => args.includes(name);
const option = (name, fallback) => {
  const index = args.indexOf(name);
  return index >= 0 && index + 1 < args.length ? args[index + 1] : fallback;
};
const quick = flag('--quick');
const rounds = Number(option('--rounds', quick ? '1' : '5'));
const transports = option('--transports', 'unix,tcp').split(',');
const sizeText = option('--size', quick ? '64m' : '1g');
const runtimeSeconds = Number(option('--runtime', quick ? '1' : '8'));
const outPath = option('--out', null);
const onlyJobs = option('--jobs', null)?.split(',') ?? null;
// Steady state, as a storage server runs: each fresh server first gets the same job for a short while (256 MiB,
// or 1 s of a time-based job), unmeasured, then the measured run on the same process. Both servers get it; it
// matters for drbdts, whose JavaScript is still unoptimised during the first thousand requests (a 1 GiB sample
// of 1 MiB writes is only 1,024 of them), not for nbdkit. --no-warmup measures cold servers.
const warmup = !flag('--no-warmup') && !quick;

/** The jobs of performance-method.md. `metric` says what the table compares. */
const jobs = [
  { name: 'seqwrite-1m-qd8', lines: ['rw=write', 'bs=1m', 'iodepth=8'], metric: 'bw' },
  { name: 'seqread-1m-qd8', lines: ['rw=read', 'bs=1m', 'iodepth=8'], metric: 'bw' },
  { name: 'randwrite-4k-qd32', lines: ['rw=randwrite', 'bs=4k', 'iodepth=32', 'time_based=1', `runtime=${runtimeSeconds}`], metric: 'iops' },
  // QD1 4 KiB writes each followed by a flush: fio's nbd engine has no per-write FUA, so fsync=1 is the
  // durable-write latency the method asks for.
  { name: 'write-4k-qd1-flush', lines: ['rw=randwrite', 'bs=4k', 'iodepth=1', 'fsync=1', 'time_based=1', `runtime=${Math.max(1, Math.round(runtimeSeconds / 2))}`], metric: 'lat' },
].filter((job) => onlyJobs === null || onlyJobs.includes(job.name));


/** Waits until the server greets, then leaves politely (ABORT) so neither server logs a broken handshake. */
async function waitReady(transport, address) {
  const abort = Buffer.alloc(4 + 16);
  abort.writeUInt32BE(3, 0); // client flags: fixed newstyle, no zeroes
  abort.writeBigUInt64BE(0x49484156454f5054n, 4);
  abort.writeUInt32BE(2, 12); // NBD_OPT_ABORT, no data
  for (let attempt = 0; attempt < 200; attempt += 1) {
    const ok = await new Promise((resolve) => {
      const socket = transport === 'unix' ? net.createConnection(address) : net.createConnection(address, '127.0.0.1');
      let received = 0;
      socket.on('data', (chunk) => {
        received += chunk.length;
        if (received >= 18 && received - chunk.length < 18) socket.write(abort);
      });
      socket.once('close', () => resolve(received >= 18));
      socket.once('error', () => resolve(false));
      socket.setTimeout(2000, () => socket.destroy());
    });
    if (ok) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`server on ${address} did not come up`);
}

async function startServer(kind, transport, disk, dir) {
  const socketPath = path.join(dir, `${kind}.sock`);
  fs.rmSync(socketPath, { force: true });
  const port = transport === 'tcp' ? await freePort() : 0;
  let child;
  if (kind === 'nbdkit') {
    const where = transport === 'unix' ? ['-U', socketPath] : ['-i', '127.0.0.1', '-p', String(port)];
    child = spawn('nbdkit', ['-f', '--exit-with-parent', ...where, 'file', disk], { stdio: ['ignore', 'ignore', 'inherit'] });
  } else {
    const listen = transport === 'unix' ? `unix:${socketPath}` : `127.0.0.1:${port}`;
    const extra = process.env.DRBDTS_BENCH_NODE_ARGS?.split(' ').filter(Boolean) ?? [];
    child = spawn(process.execPath, [...extra, path.join(repoRoot, 'bin/drbdts.js'), 'serve', disk, '--listen', listen],
      { stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, DRBDTS_LOG_LEVEL: 'warn' } });
  }
  try {
    await waitReady(transport, transport === 'unix' ? socketPath : port);
  } catch (error) {
    child.kill('SIGKILL');
    throw error;
  }
  const uri = transport === 'unix' ? `nbd+unix:///?socket=${socketPath}` : `nbd://127.0.0.1:${port}/`;
  return {
    uri,
    pid: child.pid,
    stop: () => new Promise((resolve) => {
      child.once('exit', () => resolve());
      child.kill('SIGTERM');
    }),
  };
}

function runFio(job, uri, dir, warm = false) {
  const jobFile = path.join(dir, `${job.name}.fio`);
  const lines = warm ? job.lines.map((line) => (line.startsWith('runtime=') ? 'runtime=1' : line)) : job.lines;
  fs.writeFileSync(jobFile, ['[global]', 'ioengine=nbd', `uri=${uri}`, `size=${warm ? '256m' : sizeText}`, `[${job.name}]`, ...lines, ''].join('\n'));
  const output = sh('fio', ['--output-format=json', jobFile]);
  // fio's nbd engine prints a line before the JSON.
  const report = JSON.parse(output.slice(output.indexOf('{')));
  const result = report.jobs[0];
  if (result.error !== 0) throw new Error(`fio ${job.name} failed: error ${result.error}`);
  const side = job.lines.includes('rw=read') ? result.read : result.write;
  const percentiles = side.clat_ns?.percentile ?? {};
  return {
    ioBytes: side.io_bytes,
    bwMiBps: side.bw_bytes / (1024 * 1024),
    iops: side.iops,
    p50us: (percentiles['50.000000'] ?? 0) / 1000,
    p99us: (percentiles['99.000000'] ?? 0) / 1000,
    // With fsync=1 a write's latency is the write plus its flush: fio reports the sync separately.
    syncP50us: (result.sync?.lat_ns?.percentile?.['50.000000'] ?? 0) / 1000,
  };
}

/** CPU seconds (user + system, all threads) a process has used so far, from /proc. */
function cpuSeconds(pid) {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ = 100)
}

async function sample(kind, transport, job, disk, dir) {
  const server = await startServer(kind, transport, disk, dir);
  try {
    if (warmup) runFio(job, server.uri, dir, true);
    const cpuBefore = cpuSeconds(server.pid);
    const result = runFio(job, server.uri, dir);
    // Server CPU per GiB moved is steadier than throughput on a shared machine: it measures work, not waiting.
    result.cpuSecondsPerGiB = (cpuSeconds(server.pid) - cpuBefore) / (result.ioBytes / 2 ** 30);
    return result;
  } finally {
    await server.stop();
  }
}

const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
};

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'drbdts-bench-nbd-'));
  const disk = path.join(dir, 'disk.img');
  try {
    // Real blocks, not a sparse file: both servers read and overwrite allocated data.
    const sizeMiB = Math.round(Number(sizeText.replace(/[mg]$/i, '')) * (/g$/i.test(sizeText) ? 1024 : 1));
    sh('dd', ['if=/dev/zero', `of=${disk}`, 'bs=1M', `count=${sizeMiB}`, 'conv=fdatasync', 'status=none']);
    const samples = new Map(); // key transport/job/server -> array of results
    for (let round = 0; round < rounds; round += 1) {
      for (const transport of transports) {
        for (const job of jobs) {
          // Alternate which server goes first so warm caches and drift do not favour one.
          const order = (round + jobs.indexOf(job)) % 2 === 0 ? ['drbdts', 'nbdkit'] : ['nbdkit', 'drbdts'];
          for (const kind of order) {
            const key = `${transport}/${job.name}/${kind}`;
            // A shared machine may rebuild the addon or run out of something mid-run: retry a failed sample
            // a few times rather than lose the whole run.
            for (let attempt = 1; ; attempt += 1) {
              try {
                const result = await sample(kind, transport, job, disk, dir);
                if (!samples.has(key)) samples.set(key, []);
                samples.get(key).push(result);
                process.stderr.write(`round ${round + 1}/${rounds} ${key}: ${result.bwMiBps.toFixed(0)} MiB/s, ${result.iops.toFixed(0)} IOPS, p50 ${result.p50us.toFixed(0)} us\n`);
                break;
              } catch (error) {
                if (attempt >= 3) throw error;
                process.stderr.write(`round ${round + 1}/${rounds} ${key}: attempt ${attempt} failed (${error.message.split('\n')[0]}); retrying\n`);
                await new Promise((resolve) => setTimeout(resolve, 5000));
              }
            }
          }
        }
      }
    }
    const lines = [
      `NBD serving, drbdts serve / nbdkit file, same backing file (${sizeText}), ${rounds} round(s), medians, ${warmup ? 'servers warmed up (256 MiB / 1 s of the job first)' : 'cold servers'}; ${new Date().toISOString().slice(0, 16)}Z, ${os.cpus().length} cores, node ${process.version}${quick ? ' (--quick: smoke sizes, not a measurement)' : ''}`,
      '',
      '| transport | job | drbdts | nbdkit | ratio of medians | paired ratio: median (range) of rounds | server CPU s/GiB drbdts / nbdkit |',
      '|---|---|---|---|---|---|---|',
    ];
    for (const transport of transports) {
      for (const job of jobs) {
        const ours = samples.get(`${transport}/${job.name}/drbdts`);
        const theirs = samples.get(`${transport}/${job.name}/nbdkit`);
        // Samples of one round ran back to back: their ratio cancels most of the machine's drift.
        const paired = (value) => {
          const ratios = ours.map((s, i) => value(s) / value(theirs[i]));
          return ` ${median(ratios).toFixed(2)} (${Math.min(...ratios).toFixed(2)}-${Math.max(...ratios).toFixed(2)}) |`;
        };
        const cpu = ` ${median(ours.map((s) => s.cpuSecondsPerGiB)).toFixed(2)} / ${median(theirs.map((s) => s.cpuSecondsPerGiB)).toFixed(2)} |`;
        if (job.metric === 'bw') {
          const a = median(ours.map((s) => s.bwMiBps));
          const b = median(theirs.map((s) => s.bwMiBps));
          lines.push(`| ${transport} | ${job.name} | ${a.toFixed(0)} MiB/s | ${b.toFixed(0)} MiB/s | ${(a / b).toFixed(2)} |${paired((s) => s.bwMiBps)}${cpu}`);
        } else if (job.metric === 'iops') {
          const a = median(ours.map((s) => s.iops));
          const b = median(theirs.map((s) => s.iops));
          lines.push(`| ${transport} | ${job.name} | ${(a / 1000).toFixed(1)}k IOPS | ${(b / 1000).toFixed(1)}k IOPS | ${(a / b).toFixed(2)} |${paired((s) => s.iops)}${cpu}`);
        } else {
          const a = median(ours.map((s) => s.p50us + s.syncP50us));
          const b = median(theirs.map((s) => s.p50us + s.syncP50us));
          const a99 = median(ours.map((s) => s.p99us));
          const b99 = median(theirs.map((s) => s.p99us));
          lines.push(`| ${transport} | ${job.name} (p50 write+flush; p99 write) | ${a.toFixed(0)} us; ${a99.toFixed(0)} us | ${b.toFixed(0)} us; ${b99.toFixed(0)} us | ${(b / a).toFixed(2)} (nbdkit/drbdts latency) |${paired((s) => 1 / (s.p50us + s.syncP50us))}${cpu}`);
        }
      }
    }
    const table = lines.join('\n') + '\n';
    process.stdout.write(table);
    if (outPath !== null) fs.writeFileSync(outPath, table);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((error) => {
  process.stderr.write(`nbd-compare: ${error.stack ?? error}\n`);
  process.exit(1);
});
