// Scenario 22: the sync process killed with SIGKILL at random points of a large propagation. A baseline pair is
// synced once; then A gets edits (half of the files rewritten, some deleted, new ones, a file turned into a
// directory) and B gets new files, so both sides are written. For each seed a fresh copy of that state is synced
// by the real CLI, killed after a seeded random delay within the measured duration of an undisturbed run. Then
// every path on each side must hold its content from before the sync or its final synced content (absent
// counting as a content), never a torn mix; and a rerun must converge to the same trees as an undisturbed
// run, with no temp files left behind.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cliPath, mkTemp, run, snapshot, write } from './dirsync-helpers.js';
import { mulberry32, seededContent } from './helpers/prng.js';

const FILE_COUNT = 240;
const SEEDS = 14;

let base: string;
let before: { a: Record<string, string>; b: Record<string, string> };
let final: Record<string, string>;
let undisturbedMs = 0;



function syncArgs(dir: string): string[] {
  return [cliPath, 'dirsync', path.join(dir, 'a'), path.join(dir, 'b'), '--batch', '--archive-dir', path.join(dir, 'archive')];
}

function copyState(from: string, to: string): void {
  fs.rmSync(to, { recursive: true, force: true });
  fs.cpSync(from, to, { recursive: true, preserveTimestamps: true });
}

beforeAll(async () => {
  base = mkTemp('drbdts-dirsync-kill-');
  const random = mulberry32(42);
  // The archive is named after the roots' paths, so every run works in the same directory, restored from a copy.
  const seedDir = path.join(base, 'work');
  const a = path.join(seedDir, 'a');
  fs.mkdirSync(path.join(seedDir, 'b'), { recursive: true });
  for (let index = 0; index < FILE_COUNT; index++) {
    // Mostly small files, some large ones (up to 2 MiB) so the kill often lands inside a copy.
    const size = index % 20 === 0 ? 1_000_000 + Math.floor(random() * 1_000_000) : Math.floor(random() * 60_000);
    write(a, `d${index % 7}/f${index}.bin`, seededContent(random, size));
  }
  write(a, 'turns-into-dir', 'file for now\n');
  const baseline = await run(process.execPath, syncArgs(seedDir));
  expect(baseline.code, baseline.stderr).toBe(0);
  // The changes: on A, rewrite half the files, delete a sixth, add new ones, turn a file into a directory;
  // on B, add new files.
  for (let index = 0; index < FILE_COUNT; index++) {
    const rel = `d${index % 7}/f${index}.bin`;
    if (index % 6 === 1) fs.unlinkSync(path.join(a, rel));
    else if (index % 2 === 0) write(a, rel, seededContent(random, index % 20 === 0 ? 1_500_000 : Math.floor(random() * 60_000) + 1));
  }
  for (let index = 0; index < 40; index++) write(a, `new-on-a/n${index}.bin`, seededContent(random, Math.floor(random() * 200_000)));
  for (let index = 0; index < 30; index++) write(path.join(seedDir, 'b'), `new-on-b/m${index}.bin`, seededContent(random, Math.floor(random() * 200_000)));
  fs.unlinkSync(path.join(a, 'turns-into-dir'));
  write(a, 'turns-into-dir/inside.txt', 'now a directory\n');
  before = { a: snapshot(a), b: snapshot(path.join(seedDir, 'b')) };
  copyState(seedDir, path.join(base, 'pristine'));
  // An undisturbed run gives the final state and the duration to spread kill points over.
  const reference = seedDir;
  const started = performance.now();
  const undisturbed = await run(process.execPath, syncArgs(reference));
  undisturbedMs = performance.now() - started;
  expect(undisturbed.code, undisturbed.stderr).toBe(0);
  final = snapshot(path.join(reference, 'a'));
  expect(snapshot(path.join(reference, 'b'))).toEqual(final);
});

afterAll(() => {
  fs.rmSync(base, { recursive: true, force: true });
});

/** Run the sync and SIGKILL it after `delayMs`, or (progress mode) as soon as `progressDir` holds `entries` names. */
function killRun(dir: string, trigger: { delayMs: number } | { progressDir: string; entries: number }): Promise<string | null> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, syncArgs(dir), { stdio: 'ignore' });
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
        if (count >= trigger.entries) child.kill('SIGKILL');
      }, 1);
    }
    child.once('exit', (_code, signal) => {
      clearTimeout(timer);
      clearInterval(timer);
      resolve(signal);
    });
  });
}

describe('scenario 22: SIGKILL at random points of a large propagation', () => {
  for (let seed = 1; seed <= SEEDS; seed++) {
    it(`seed ${seed}: every path old or new, never torn; the rerun converges`, async () => {
      const dir = path.join(base, 'work');
      copyState(path.join(base, 'pristine'), dir);
      const random = mulberry32(seed * 7919);
      // Odd seeds: a kill point anywhere in the undisturbed duration (start-up, scan, hashing, propagation).
      // Even seeds: a kill once some of A's new files have arrived on B, so it lands inside the propagation.
      const trigger =
        seed % 2 === 1
          ? { delayMs: Math.floor(random() * undisturbedMs) }
          : { progressDir: path.join(dir, 'b', 'new-on-a'), entries: 1 + Math.floor(random() * 35) };
      const signal = await killRun(dir, trigger);
      const delayMs = JSON.stringify(trigger);
      // The kill lands a little after the trigger: a run that finished first must have finished everything.
      if ('entries' in trigger && signal !== 'SIGKILL') {
        expect(snapshot(path.join(dir, 'a')), `${JSON.stringify(trigger)}: not killed`).toEqual(final);
        expect(snapshot(path.join(dir, 'b')), `${JSON.stringify(trigger)}: not killed`).toEqual(final);
      }
      for (const side of ['a', 'b'] as const) {
        const now = snapshot(path.join(dir, side));
        const paths = new Set([...Object.keys(now), ...Object.keys(before[side]), ...Object.keys(final)]);
        for (const p of paths) {
          if (p.includes('.drbdts-tmp-')) continue; // a temp file of the killed run: not a synced path
          const allowed = [before[side][p], final[p]];
          // 'turns-into-dir' (a file replaced by a directory) included: the directory is swapped in with
          // renameat2(RENAME_EXCHANGE), so the path is never absent.
          expect(allowed, `${side}/${p} after a kill at ${delayMs}`).toContain(now[p]);
        }
      }
      const rerun = await run(process.execPath, syncArgs(dir));
      expect(rerun.code, rerun.stderr).toBe(0);
      expect(snapshot(path.join(dir, 'a'))).toEqual(final);
      expect(snapshot(path.join(dir, 'b'))).toEqual(final);
    });
  }
});
