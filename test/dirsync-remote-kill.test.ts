// Scenario 22 over tcp://: a sync between a local root and a root served by a real dirsync-server, killed with
// SIGKILL at seeded random points of a large propagation — odd seeds kill the dirsync client after a random
// delay within an undisturbed run's duration, even seeds kill the server once some files have arrived (then a
// new server is started on the same port). Both sides are written (A's edits go to B, B's new files to A) and
// the big files change in place, so the kill often lands inside a delta transfer. Afterwards every path on each
// side holds its content from before the sync or its final content (absent counting as a content), never a
// torn mix; a rerun converges to the undisturbed run's trees with no temp files left.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { mkTemp, run, snapshot, write } from './dirsync-helpers.js';
import { drbdtsBin, startServerProcess, writeSecret, type ServerProcess } from './dirsync-remote-helpers.js';
import { mulberry32, seededContent } from './helpers/prng.js';

const FILE_COUNT = 160;
const SEEDS = 8;

let base: string;
let secretFile: string;
let server: ServerProcess;
let port: number;
let before: { a: Record<string, string>; b: Record<string, string> };
let final: Record<string, string>;
let undisturbedMs = 0;



const localRoot = (): string => path.join(base, 'work', 'a');
const servedRoot = (): string => path.join(base, 'served', 'work');

function syncArgs(): string[] {
  return [
    drbdtsBin, 'dirsync', localRoot(), `tcp://127.0.0.1:${port}/work`, '--batch',
    '--archive-dir', path.join(base, 'work', 'archive'), '--secret-file', secretFile,
  ];
}

/** The whole state (local root, archive, served root) is restored from a copy before each seed. */
function saveState(name: string): void {
  for (const [from, to] of [[path.join(base, 'work'), path.join(base, `${name}-work`)], [servedRoot(), path.join(base, `${name}-served`)]] as const) {
    fs.rmSync(to, { recursive: true, force: true });
    fs.cpSync(from, to, { recursive: true, preserveTimestamps: true });
  }
}

function restoreState(name: string): void {
  for (const [from, to] of [[path.join(base, `${name}-work`), path.join(base, 'work')], [path.join(base, `${name}-served`), servedRoot()]] as const) {
    fs.rmSync(to, { recursive: true, force: true });
    fs.cpSync(from, to, { recursive: true, preserveTimestamps: true });
  }
}

async function ensureServer(): Promise<void> {
  if (server.child.exitCode === null && server.child.signalCode === null) return;
  server = await startServerProcess(path.join(base, 'served'), ['--secret-file', secretFile], {}, port);
}

beforeAll(async () => {
  base = mkTemp('drbdts-remote-kill-');
  secretFile = await writeSecret(base, 'secret', 'remote kill secret');
  fs.mkdirSync(servedRoot(), { recursive: true });
  server = await startServerProcess(path.join(base, 'served'), ['--secret-file', secretFile]);
  port = server.port;
  const random = mulberry32(4242);
  const a = localRoot();
  for (let index = 0; index < FILE_COUNT; index++) {
    // Mostly small files; every 16th is 1-2 MiB and later changes in place, so it goes as a delta.
    const size = index % 16 === 0 ? 1_000_000 + Math.floor(random() * 1_000_000) : Math.floor(random() * 60_000);
    write(a, `d${index % 5}/f${index}.bin`, seededContent(random, size));
  }
  const baseline = await run(process.execPath, syncArgs());
  expect(baseline.code, baseline.stderr).toBe(0);
  for (let index = 0; index < FILE_COUNT; index++) {
    const rel = `d${index % 5}/f${index}.bin`;
    if (index % 16 === 0) {
      // Rewrite 64 KiB in the middle of a big file.
      const file = path.join(a, rel);
      const data = fs.readFileSync(file);
      seededContent(random, 65_536).copy(data, Math.floor(data.length / 2));
      fs.writeFileSync(file, data);
    } else if (index % 6 === 1) fs.unlinkSync(path.join(a, rel));
    else if (index % 2 === 0) write(a, rel, seededContent(random, Math.floor(random() * 60_000) + 1));
  }
  for (let index = 0; index < 40; index++) write(a, `new-on-a/n${index}.bin`, seededContent(random, Math.floor(random() * 200_000)));
  for (let index = 0; index < 30; index++) write(servedRoot(), `new-on-b/m${index}.bin`, seededContent(random, Math.floor(random() * 200_000)));
  before = { a: snapshot(a), b: snapshot(servedRoot()) };
  saveState('pristine');
  const started = performance.now();
  const undisturbed = await run(process.execPath, syncArgs());
  undisturbedMs = performance.now() - started;
  expect(undisturbed.code, undisturbed.stderr).toBe(0);
  final = snapshot(localRoot());
  expect(snapshot(servedRoot())).toEqual(final);
}, 240_000);

afterEach(async () => {
  await ensureServer();
});

afterAll(async () => {
  await server?.stop();
  fs.rmSync(base, { recursive: true, force: true });
});

/** Runs the sync; kills the client after `delayMs`, or kills the server once `progressDir` holds `entries` names. */
function killRun(trigger: { delayMs: number } | { progressDir: string; entries: number }): Promise<number | null> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, syncArgs(), { stdio: 'ignore' });
    let timer: NodeJS.Timeout;
    if ('delayMs' in trigger) timer = setTimeout(() => child.kill('SIGKILL'), trigger.delayMs);
    else {
      timer = setInterval(() => {
        let count = 0;
        try {
          count = fs.readdirSync(trigger.progressDir).filter((name) => !name.includes('.drbdts-tmp-')).length;
        } catch {
          // Not created yet.
        }
        if (count >= trigger.entries) {
          clearInterval(timer);
          server.child.kill('SIGKILL');
        }
      }, 1);
    }
    child.once('exit', (code) => {
      clearTimeout(timer);
      clearInterval(timer);
      resolve(code);
    });
  });
}

function tempFiles(root: string): string[] {
  const found: string[] = [];
  const walk = (dir: string): void => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      if (entry.name.includes('.drbdts-tmp-')) found.push(path.join(dir, entry.name));
      else if (entry.isDirectory()) walk(path.join(dir, entry.name));
    }
  };
  walk(root);
  return found;
}

describe('scenario 22 over tcp://: SIGKILL of the client or the server at random points', () => {
  for (let seed = 1; seed <= SEEDS; seed++) {
    it(`seed ${seed}: every path old or new on both sides, never torn; the rerun converges`, async () => {
      restoreState('pristine');
      await ensureServer();
      const random = mulberry32(seed * 104_729);
      const trigger =
        seed % 2 === 1
          ? { delayMs: Math.floor(random() * undisturbedMs) }
          : { progressDir: path.join(servedRoot(), 'new-on-a'), entries: 1 + Math.floor(random() * 35) };
      const exitCode = await killRun(trigger);
      const what = JSON.stringify(trigger);
      // A killed client has no exit code; a client whose server was killed must not claim success. The kill
      // lands a little after the trigger, so a late one may find the sync already finished: a 0 is then only
      // honest if both trees really are the final state.
      if ('entries' in trigger && exitCode === 0) {
        expect(snapshot(localRoot()), `${what}: exit 0`).toEqual(final);
        expect(snapshot(servedRoot()), `${what}: exit 0`).toEqual(final);
      }
      for (const [side, root] of [['a', localRoot()], ['b', servedRoot()]] as const) {
        const now = snapshot(root);
        const paths = new Set([...Object.keys(now), ...Object.keys(before[side]), ...Object.keys(final)]);
        for (const p of paths) {
          if (p.includes('.drbdts-tmp-')) continue; // a temp file of the killed run: not a synced path
          expect([before[side][p], final[p]], `${side}/${p} after ${what}`).toContain(now[p]);
        }
      }
      await ensureServer();
      const rerun = await run(process.execPath, syncArgs());
      expect(rerun.code, `${what}: ${rerun.stderr.slice(-2000)}`).toBe(0);
      expect(snapshot(localRoot())).toEqual(final);
      expect(snapshot(servedRoot())).toEqual(final);
      expect(tempFiles(localRoot())).toEqual([]);
      expect(tempFiles(servedRoot())).toEqual([]);
    });
  }
});
