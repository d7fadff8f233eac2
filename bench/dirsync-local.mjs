// Directory sync, local to local: drbdts dirsync against unison 2.52 on the same generated trees, in the same run,
// alternating tools each round. Measures wall time of an initial sync (empty target), a no-change rescan, and a
// small-change sync (10 files edited, 1 added, 1 deleted), and each process's peak RSS (GNU time's %M).
//
//   node bench/dirsync-local.mjs [--trees big,small] [--rounds N] [--quick] [--out FILE] [--keep DIR]
//                                [--baseline DIR] [--no-extra-ca] [--first-round K]
//   trees: big = 10,000 files / ~260 MB, small = 100,000 small files; --quick = 1,000 / 2,000 files, 1 round.
//   --baseline DIR: also run DIR/bin/drbdts.js (another build, e.g. a checkout of the previous commit with its
//     dist/ and native/build) as a third tool in the same rounds, so before/after come from one run.
//   --first-round K: number the rounds from K (which tool starts a round follows its number), so that a long
//     run split into several shorter ones (one round each, under the shared lock) still alternates the tools.
//     Leave two minutes between such runs on ext4: each deletes its copies at its end, and file creation right
//     after a large deletion is slow (see where the copies are deleted below).
//   --no-extra-ca: run every tool without NODE_EXTRA_CA_CERTS. Node 20 reads that file eagerly at every start
//     (on the machine this was written on, ~38 ms of a 60 ms `node -e 0`); unison does not read it. The table
//     says which environment it was measured in. Each drbdts build runs as its executable (bin/drbdts.js), the
//     way an operator runs it; since the launcher of 2026-12-02 that starts Node without the variable anyway.
//
// Prints one markdown table (medians, ratio = dirsync / unison; a ratio below 1 means dirsync is faster) and
// writes the raw samples as JSON when --out is given.
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const cli = path.join(repo, 'bin', 'drbdts.js');

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const index = args.indexOf(name);
  return index === -1 ? fallback : args[index + 1];
};
const quick = args.includes('--quick');
const rounds = Number(option('--rounds', quick ? '1' : '3'));
const firstRound = Number(option('--first-round', '0'));
const treeNames = option('--trees', 'big,small').split(',');
const outFile = option('--out', undefined);
const baseline = option('--baseline', undefined);
const noExtraCa = args.includes('--no-extra-ca');

const TREES = {
  big: { files: quick ? 1000 : 10_000, meanBytes: 26_000, perDir: 100 },
  small: { files: quick ? 2000 : 100_000, meanBytes: 1_000, perDir: 100 },
};

function mulberry32(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Generate a tree: sizes exponentially distributed around the mean (many small files, a tail of big ones). */
function generate(root, spec, seed) {
  const random = mulberry32(seed);
  const pool = Buffer.alloc(8 << 20);
  for (let index = 0; index < pool.length; index += 4) pool.writeUInt32LE((random() * 0x100000000) >>> 0, index);
  let totalBytes = 0;
  for (let index = 0; index < spec.files; index++) {
    const dir = path.join(root, `d${Math.floor(index / spec.perDir / 10)}`, `e${Math.floor(index / spec.perDir)}`);
    if (index % spec.perDir === 0) fs.mkdirSync(dir, { recursive: true });
    const size = Math.min(pool.length - 1, Math.floor(-Math.log(1 - random()) * spec.meanBytes));
    const offset = Math.floor(random() * (pool.length - size));
    fs.writeFileSync(path.join(dir, `f${index}.dat`), pool.subarray(offset, offset + size));
    totalBytes += size;
  }
  return totalBytes;
}

/** Seconds in bash's `times` notation (`0m0.012s`). */
function timesSeconds(text) {
  const match = /^(\d+)m([\d.]+)s$/.exec(text);
  if (match === null) throw new Error(`unexpected times output "${text}"`);
  return Number(match[1]) * 60 + Number(match[2]);
}

/**
 * Run a command under GNU time: wall ms, CPU ms (user + system, robust when the machine is shared) and peak
 * RSS in KiB. The CPU comes from bash's `times` for the command (millisecond resolution): GNU time prints
 * user and system time in hundredths, so a no-change rescan of a small tree could read as 0 ms.
 */
function measure(command, commandArgs, env) {
  const started = process.hrtime.bigint();
  const fullEnv = { ...process.env, ...env };
  if (noExtraCa) delete fullEnv.NODE_EXTRA_CA_CERTS;
  const script = '"$@"; status=$?; times >&2; exit $status';
  const result = spawnSync('/usr/bin/time', ['-f', 'rss %M', 'bash', '-c', script, 'measure', command, ...commandArgs],
    { env: fullEnv, encoding: 'utf8', maxBuffer: 256 << 20 });
  const wallMs = Number(process.hrtime.bigint() - started) / 1e6;
  if (result.status !== 0) throw new Error(`${command} ${commandArgs.join(' ')} exited ${result.status}: ${result.stderr.slice(-2000)}`);
  const lines = result.stderr.trim().split('\n');
  const rss = Number(lines[lines.length - 1].split(' ')[1]);
  // `times`: the shell's own user/system line, then its children's (the command's).
  const [user, system] = lines[lines.length - 2].trim().split(/\s+/).map(timesSeconds);
  return { wallMs, cpuMs: (user + system) * 1000, rssKiB: rss };
}

function smallChange(root, spec, round) {
  for (let index = 0; index < 10; index++) {
    const file = path.join(root, 'd0', 'e0', `f${index}.dat`);
    fs.appendFileSync(file, `edit ${round}\n`);
  }
  fs.writeFileSync(path.join(root, 'd0', 'e0', `added-${round}.dat`), `added in round ${round}\n`);
  fs.rmSync(path.join(root, 'd0', 'e0', `f${10 + round}.dat`), { force: true });
}

const tools = {
  // The `drbdts` executable, as an operator runs it (its #! line decides how Node starts, see bin/drbdts.js).
  dirsync: (a, b, work) => [cli, ['dirsync', a, b, '--batch', '--archive-dir', path.join(work, 'archive')], {}],
  unison: (a, b, work) => ['unison', [a, b, '-batch', '-ui', 'text', '-terse'], { UNISON: path.join(work, 'unison-home'), HOME: work }],
};
if (baseline !== undefined) {
  const baselineCli = path.join(path.resolve(baseline), 'bin', 'drbdts.js');
  if (!fs.existsSync(baselineCli)) throw new Error(`--baseline ${baseline}: no ${baselineCli}`);
  tools.before = (a, b, work) => [baselineCli, ['dirsync', a, b, '--batch', '--archive-dir', path.join(work, 'archive')], {}];
}
const toolNames = Object.keys(tools);

function median(values) {
  const sorted = [...values].sort((x, y) => x - y);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

const base = fs.mkdtempSync(path.join(os.tmpdir(), 'drbdts-bench-dirsync-'));
const samples = [];
const finished = [];
try {
  execFileSync('unison', ['-version'], { stdio: 'ignore' });
  for (const treeName of treeNames) {
    const spec = TREES[treeName];
    if (spec === undefined) throw new Error(`unknown tree ${treeName} (big, small)`);
    const source = path.join(base, `${treeName}-source`);
    const totalBytes = generate(source, spec, 1234);
    process.stderr.write(`tree ${treeName}: ${spec.files} files, ${(totalBytes / 1e6).toFixed(0)} MB\n`);
    process.stderr.write(`  load average ${os.loadavg().map((x) => x.toFixed(2)).join(' ')} at ${new Date().toISOString()}\n`);
    for (let round = firstRound; round < firstRound + rounds; round++) {
      // Alternating: each round starts with the next tool (unison first in round 0).
      const order = toolNames.map((_, k) => toolNames[(toolNames.length - 1 + k + round) % toolNames.length]);
      for (const tool of order) {
        const work = path.join(base, `${treeName}-${tool}-${round}`);
        const a = path.join(work, 'a');
        const b = path.join(work, 'b');
        fs.mkdirSync(b, { recursive: true });
        // Each tool gets its own copy of the source (same content, warm page cache for both).
        execFileSync('cp', ['-a', source, a]);
        const [command, commandArgs, env] = tools[tool](a, b, work);
        const initial = measure(command, commandArgs, env);
        const rescan = measure(command, commandArgs, env);
        smallChange(a, spec, round);
        const change = measure(command, commandArgs, env);
        const check = spawnSync('diff', ['-r', '-q', a, b], { encoding: 'utf8' });
        if (check.status !== 0) throw new Error(`${tool}: trees differ after sync: ${check.stdout.slice(0, 500)}`);
        samples.push({ tree: treeName, tool, round, files: spec.files, totalBytes, initial, rescan, change });
        process.stderr.write(
          `  ${treeName} ${tool} round ${round}: initial ${initial.wallMs.toFixed(0)} ms (cpu ${initial.cpuMs.toFixed(0)}), ` +
            `rescan ${rescan.wallMs.toFixed(0)} ms (cpu ${rescan.cpuMs.toFixed(0)}), change ${change.wallMs.toFixed(0)} ms (cpu ${change.cpuMs.toFixed(0)}), peak RSS ${(Math.max(initial.rssKiB, rescan.rssKiB, change.rssKiB) / 1024).toFixed(0)} MiB\n`,
        );
        // Not deleted here: on this machine's ext4, creating files shortly after many were deleted is slow (the
        // inode allocator skips recently freed inodes, ext4 ialloc.c recently_deleted), so whichever tool ran
        // right after a deletion of 100,000 files paid seconds of system time for it. Every tool's copies stay
        // until the tree's rounds are over.
        finished.push(work);
      }
    }
    for (const work of finished.splice(0)) fs.rmSync(work, { recursive: true, force: true });
    process.stderr.write(`  load average ${os.loadavg().map((x) => x.toFixed(2)).join(' ')} at ${new Date().toISOString()}\n`);
  }
} finally {
  if (!args.includes('--keep')) fs.rmSync(base, { recursive: true, force: true });
}

const lines = [
  `Environment: ${noExtraCa ? 'NODE_EXTRA_CA_CERTS unset (--no-extra-ca)' : process.env.NODE_EXTRA_CA_CERTS ? 'as given (NODE_EXTRA_CA_CERTS set)' : 'as given'}`,
  '',
  baseline === undefined
    ? '| tree | measure | dirsync | unison 2.52 | ratio (target) |'
    : '| tree | measure | before | unison 2.52 | before ratio | dirsync | ratio (target) |',
  baseline === undefined ? '|---|---|---|---|---|' : '|---|---|---|---|---|---|---|',
];
for (const treeName of treeNames) {
  const of = (tool) => samples.filter((s) => s.tree === treeName && s.tool === tool);
  const row = (label, pick, unit, target) => {
    const d = median(of('dirsync').map(pick));
    const u = median(of('unison').map(pick));
    if (baseline === undefined) {
      lines.push(`| ${treeName} | ${label} | ${d.toFixed(0)} ${unit} | ${u.toFixed(0)} ${unit} | ${(d / u).toFixed(2)} (<= ${target}) |`);
      return;
    }
    const b = median(of('before').map(pick));
    lines.push(`| ${treeName} | ${label} | ${b.toFixed(0)} ${unit} | ${u.toFixed(0)} ${unit} | ${(b / u).toFixed(2)} | ${d.toFixed(0)} ${unit} | ${(d / u).toFixed(2)} (<= ${target}) |`);
  };
  row('initial sync', (s) => s.initial.wallMs, 'ms', '0.5');
  row('no-change rescan', (s) => s.rescan.wallMs, 'ms', '1.0');
  row('small-change sync', (s) => s.change.wallMs, 'ms', '1.0');
  row('initial sync, CPU', (s) => s.initial.cpuMs, 'ms', '-');
  row('no-change rescan, CPU', (s) => s.rescan.cpuMs, 'ms', '-');
  row('small-change sync, CPU', (s) => s.change.cpuMs, 'ms', '-');
  row('peak RSS', (s) => Math.max(s.initial.rssKiB, s.rescan.rssKiB, s.change.rssKiB) / 1024, 'MiB', '1.0');
  row('peak RSS, rescan', (s) => s.rescan.rssKiB / 1024, 'MiB', '-');
  row('peak RSS, small change', (s) => s.change.rssKiB / 1024, 'MiB', '-');
}
process.stdout.write(lines.join('\n') + '\n');
if (outFile !== undefined) fs.writeFileSync(outFile, JSON.stringify({ date: new Date().toISOString(), rounds, baseline, noExtraCa, samples }, null, 2));
