#!/usr/bin/env node
// Benchmark: a big file with 1 MiB changed in the middle, synced over tcp:// by `drbdts dirsync` (real
// processes: dirsync-server on one side, the dirsync CLI on the other), through a counting TCP proxy that
// measures the bytes on the wire in each direction. Target: wire bytes at most 2% of the file.
//
//   node bench/dirsync-remote-delta.mjs [--size-mib 1024] [--changed-mib 1] [--runs 3] [--json]
//
// Setup (not measured): the same file on both sides, synced once so the archive knows it. Then, per run, a
// fresh 1 MiB of random bytes is written at a random offset around the middle of the client's copy and one
// sync run is measured: wire bytes up and down, elapsed time, and the client's and server's peak RSS.
import { spawn } from 'node:child_process';
import { createServer, connect } from 'node:net';
import { mkdtemp, mkdir, open, rm, writeFile, copyFile, readFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const index = args.indexOf(name);
  return index >= 0 ? Number(args[index + 1]) : fallback;
};
const sizeMiB = option('--size-mib', 1024);
const changedMiB = option('--changed-mib', 1);
const runs = option('--runs', 3);
const asJson = args.includes('--json');
const bin = fileURLToPath(new URL('../bin/drbdts.js', import.meta.url));

function run(command, argv, env = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(command, argv, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (data) => (stdout += data));
    child.stderr.on('data', (data) => (stderr += data));
    child.on('error', reject);
    child.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Runs drbdts under /usr/bin/time to learn its peak RSS (KiB). */
async function timedSync(argv) {
  const started = process.hrtime.bigint();
  const result = await run('/usr/bin/time', ['-f', 'RSSKB=%M', process.execPath, bin, ...argv]);
  const elapsedMs = Number(process.hrtime.bigint() - started) / 1e6;
  const rss = /RSSKB=(\d+)/.exec(result.stderr);
  return { ...result, elapsedMs, peakRssKiB: rss ? Number(rss[1]) : undefined };
}

async function startProxy(targetPort) {
  const counters = { up: 0, down: 0 };
  const server = createServer((client) => {
    const target = connect({ host: '127.0.0.1', port: targetPort });
    client.on('data', (chunk) => {
      counters.up += chunk.length;
      if (!target.write(chunk)) client.pause();
    });
    target.on('drain', () => client.resume());
    target.on('data', (chunk) => {
      counters.down += chunk.length;
      if (!client.write(chunk)) target.pause();
    });
    client.on('drain', () => target.resume());
    const end = () => {
      client.destroy();
      target.destroy();
    };
    client.on('close', end);
    target.on('close', end);
    client.on('error', () => undefined);
    target.on('error', () => undefined);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { port: server.address().port, counters, close: () => server.close() };
}

async function main() {
  const base = await mkdtemp(join(tmpdir(), 'drbdts-bench-remote-'));
  const local = join(base, 'local');
  const served = join(base, 'served');
  const archive = join(base, 'archive');
  await mkdir(local);
  await mkdir(join(served, 'replica'), { recursive: true });
  await mkdir(archive);
  const secretFile = join(base, 'secret');
  await writeFile(secretFile, randomBytes(24).toString('hex'), { mode: 0o600 });
  const sizeBytes = sizeMiB << 20;
  const changedBytes = changedMiB << 20;
  const localFile = join(local, 'disk.img');

  // Random (incompressible) content, so lz4 cannot hide anything: only the delta saves bytes.
  const handle = await open(localFile, 'w');
  for (let offset = 0; offset < sizeBytes; offset += 64 << 20) {
    await handle.write(randomBytes(Math.min(64 << 20, sizeBytes - offset)), 0, undefined, offset);
  }
  await handle.close();
  await copyFile(localFile, join(served, 'replica', 'disk.img'));

  const server = spawn(process.execPath, [bin, 'dirsync-server', '--listen', '127.0.0.1:0', '--root', served, '--secret-file', secretFile], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, DRBDTS_LOG_LEVEL: 'warn' },
  });
  const serverPort = await new Promise((resolve, reject) => {
    let text = '';
    server.stdout.on('data', (data) => {
      text += data;
      const match = /listening on .*:(\d+)/.exec(text);
      if (match) resolve(Number(match[1]));
    });
    server.on('exit', (code) => reject(new Error(`dirsync-server exited ${code}`)));
  });
  const proxy = await startProxy(serverPort);
  const syncArgs = [
    'dirsync', local, `tcp://127.0.0.1:${proxy.port}/replica`, '--batch', '--archive-dir', archive, '--secret-file', secretFile,
  ];

  const results = [];
  try {
    const initial = await timedSync(syncArgs);
    if (initial.code !== 0) throw new Error(`initial sync exited ${initial.code}: ${initial.stderr}`);
    for (let i = 0; i < runs; i++) {
      const offset = Math.floor(sizeBytes / 2 - changedBytes + Math.random() * changedBytes);
      const file = await open(localFile, 'r+');
      await file.write(randomBytes(changedBytes), 0, changedBytes, offset);
      await file.close();
      proxy.counters.up = 0;
      proxy.counters.down = 0;
      const result = await timedSync(syncArgs);
      if (result.code !== 0) throw new Error(`sync exited ${result.code}: ${result.stderr}`);
      const wireBytes = proxy.counters.up + proxy.counters.down;
      results.push({
        run: i + 1,
        upBytes: proxy.counters.up,
        downBytes: proxy.counters.down,
        wirePercentOfFile: (100 * wireBytes) / sizeBytes,
        elapsedMs: Math.round(result.elapsedMs),
        clientPeakRssMiB: result.peakRssKiB === undefined ? undefined : Math.round(result.peakRssKiB / 1024),
      });
    }
    // The two copies must be identical after the last run.
    const [a, b] = await Promise.all([readFile(localFile), readFile(join(served, 'replica', 'disk.img'))]);
    if (!a.equals(b)) throw new Error('the copies differ after the sync');
  } finally {
    proxy.close();
    server.kill('SIGTERM');
    await rm(base, { recursive: true, force: true });
  }

  const summary = { sizeMiB, changedMiB, runs: results };
  if (asJson) {
    process.stdout.write(JSON.stringify(summary) + '\n');
    return;
  }
  process.stdout.write(`dirsync over tcp://: ${sizeMiB} MiB file, ${changedMiB} MiB changed near the middle (random data)\n`);
  process.stdout.write('run  up(bytes)   down(bytes)  wire % of file  elapsed(ms)  client peak RSS (MiB)\n');
  for (const r of results) {
    process.stdout.write(
      `${String(r.run).padEnd(4)} ${String(r.upBytes).padEnd(11)} ${String(r.downBytes).padEnd(12)} ${r.wirePercentOfFile.toFixed(3).padEnd(15)} ${String(r.elapsedMs).padEnd(12)} ${r.clientPeakRssMiB}\n`,
    );
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack ?? error}\n`);
  process.exitCode = 1;
});
