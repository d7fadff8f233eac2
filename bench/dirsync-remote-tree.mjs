#!/usr/bin/env node
// Benchmark: a whole tree synced to a server over the network (loopback), drbdts tcp:// against unison 2.52's
// socket mode (`unison -socket PORT` on the server side, `socket://HOST:PORT//path` on the client: unison's own
// protocol without ssh, the fair counterpart of dirsync-server). Same generated tree, same machine, same run.
//
//   node bench/dirsync-remote-tree.mjs [--files 10000] [--mean-kib 26] [--rounds 3] [--json]
//
// Per round and tool, from scratch: initial sync (server side empty), no-change rescan, and a small change (20
// files edited, 5 created, 5 deleted on the client side). Reports medians of elapsed time and client peak RSS,
// and the ratio drbdts / unison.
import { spawn } from 'node:child_process';
import { mkdtemp, mkdir, rm, writeFile, unlink } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const index = args.indexOf(name);
  return index >= 0 ? Number(args[index + 1]) : fallback;
};
const files = option('--files', 10_000);
const meanKiB = option('--mean-kib', 26);
const rounds = option('--rounds', 3);
const asJson = args.includes('--json');
const bin = fileURLToPath(new URL('../bin/drbdts.js', import.meta.url));

function run(command, argv, env = {}) {
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    const child = spawn('/usr/bin/time', ['-f', 'RSSKB=%M', command, ...argv], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...env } });
    let stderr = '';
    child.stderr.on('data', (data) => (stderr += data));
    child.on('error', reject);
    child.on('exit', (code) => {
      const rss = /RSSKB=(\d+)/.exec(stderr);
      resolve({ code, stderr, elapsedMs: Number(process.hrtime.bigint() - started) / 1e6, peakRssKiB: rss ? Number(rss[1]) : NaN });
    });
  });
}

async function freePort() {
  const server = createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

async function generateTree(root) {
  // Deterministic sizes around the mean (exponential-ish spread), 100 files per directory.
  let seed = 12345;
  const random = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
  for (let i = 0; i < files; i++) {
    const dir = join(root, `d${Math.floor(i / 100)}`);
    if (i % 100 === 0) await mkdir(dir, { recursive: true });
    const size = Math.floor(-Math.log(1 - random() * 0.999) * meanKiB * 1024);
    await writeFile(join(dir, `f${i}.dat`), randomBytes(size));
  }
}

const fileName = (root, index) => join(root, `d${Math.floor(index / 100)}`, `f${index}.dat`);

async function smallChange(root, round) {
  const step = Math.floor(files / 30);
  for (let i = 0; i < 20; i++) await writeFile(fileName(root, i * step + 7), randomBytes(4096 + round));
  for (let i = 0; i < 5; i++) await writeFile(join(root, 'd0', `new-${round}-${i}.dat`), randomBytes(8192));
  for (let i = 25; i < 30; i++) await unlink(fileName(root, i * step + 3)).catch(() => undefined);
}

function startProcess(command, argv, env, readyPattern) {
  const child = spawn(command, argv, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  return new Promise((resolve, reject) => {
    let text = '';
    const onData = (data) => {
      text += data;
      if (readyPattern.test(text)) resolve({ child, text });
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('exit', (code) => reject(new Error(`${command} exited ${code}: ${text}`)));
    if (readyPattern.source === '^') setTimeout(() => resolve({ child, text }), 500);
  });
}

async function roundFor(tool, base, round) {
  const dir = join(base, `${tool}-${round}`);
  const local = join(dir, 'local');
  const served = join(dir, 'served');
  await mkdir(join(served, 'replica'), { recursive: true });
  await mkdir(join(dir, 'state'), { recursive: true });
  // A fresh copy of the source tree per round (cp -a keeps it identical).
  await run('cp', ['-a', join(base, 'source'), local]);
  let server;
  let syncArgs;
  let command;
  const env = {};
  if (tool === 'drbdts') {
    server = await startProcess(process.execPath, [bin, 'dirsync-server', '--listen', '127.0.0.1:0', '--root', served, '--secret-file', join(base, 'secret')], { DRBDTS_LOG_LEVEL: 'warn' }, /listening on .*:\d+/);
    const port = Number(/listening on .*:(\d+)/.exec(server.text)[1]);
    command = process.execPath;
    syncArgs = [bin, 'dirsync', local, `tcp://127.0.0.1:${port}/replica`, '--batch', '--archive-dir', join(dir, 'state'), '--secret-file', join(base, 'secret')];
  } else {
    const port = await freePort();
    server = await startProcess('unison', ['-socket', String(port), '-listen', '127.0.0.1'], { UNISON: join(dir, 'server-state') }, /^/);
    command = 'unison';
    syncArgs = [local, `socket://127.0.0.1:${port}/${join(served, 'replica')}`, '-batch', '-ui', 'text', '-confirmbigdel=false'];
    env.UNISON = join(dir, 'state');
  }
  try {
    const measure = async (what) => {
      const result = await run(command, syncArgs, env);
      if (result.code !== 0) throw new Error(`${tool} ${what} exited ${result.code}: ${result.stderr.slice(-500)}`);
      return { elapsedMs: result.elapsedMs, peakRssKiB: result.peakRssKiB };
    };
    const initial = await measure('initial sync');
    const noChange = await measure('no-change rescan');
    await smallChange(local, round);
    const small = await measure('small change');
    return { initial, noChange, small };
  } finally {
    server.child.kill('SIGTERM');
    await rm(dir, { recursive: true, force: true });
  }
}

const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
};

async function main() {
  const base = await mkdtemp(join(tmpdir(), 'drbdts-bench-remote-tree-'));
  try {
    await writeFile(join(base, 'secret'), randomBytes(24).toString('hex'), { mode: 0o600 });
    await generateTree(join(base, 'source'));
    const results = { drbdts: [], unison: [] };
    for (let round = 0; round < rounds; round++) {
      // Alternate the order so neither tool always runs on a warmer cache.
      const order = round % 2 === 0 ? ['drbdts', 'unison'] : ['unison', 'drbdts'];
      for (const tool of order) results[tool].push(await roundFor(tool, base, round));
    }
    const summary = {};
    for (const phase of ['initial', 'noChange', 'small']) {
      const d = median(results.drbdts.map((r) => r[phase].elapsedMs));
      const u = median(results.unison.map((r) => r[phase].elapsedMs));
      const dr = median(results.drbdts.map((r) => r[phase].peakRssKiB));
      const ur = median(results.unison.map((r) => r[phase].peakRssKiB));
      summary[phase] = { drbdtsMs: Math.round(d), unisonMs: Math.round(u), timeRatio: d / u, drbdtsRssMiB: dr / 1024, unisonRssMiB: ur / 1024 };
    }
    if (asJson) {
      process.stdout.write(JSON.stringify({ files, meanKiB, rounds, summary, results }) + '\n');
      return;
    }
    process.stdout.write(`dirsync tcp:// vs unison socket:// on loopback: ${files} files, mean ${meanKiB} KiB, ${rounds} rounds (medians)\n`);
    process.stdout.write('phase      drbdts(ms)  unison(ms)  ratio  drbdts RSS(MiB)  unison RSS(MiB)\n');
    for (const [phase, s] of Object.entries(summary)) {
      process.stdout.write(
        `${phase.padEnd(10)} ${String(s.drbdtsMs).padEnd(11)} ${String(s.unisonMs).padEnd(11)} ${s.timeRatio.toFixed(2).padEnd(6)} ${s.drbdtsRssMiB.toFixed(0).padEnd(16)} ${s.unisonRssMiB.toFixed(0)}\n`,
      );
    }
  } finally {
    await rm(base, { recursive: true, force: true });
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack ?? error}\n`);
  process.exitCode = 1;
});
