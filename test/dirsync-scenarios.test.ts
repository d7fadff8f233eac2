// Proves the conformance table of unison-semantics.md (scenarios 1-21, 24, 25; 22 and 23 are in
// dirsync-kill.test.ts and dirsync-engine.test.ts) against the real CLI: for each scenario, real directories are
// set up, synced once as a baseline where the scenario needs history, changed, and synced with
// `drbdts dirsync --batch --json`; the trees and the exit code are then checked. Every scenario runs with two local
// roots and with root B served by a real `drbdts dirsync-server` over tcp:// on a loopback port. Scenarios that
// end in sync are then re-run until nothing is left to do, proving the archive converges.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dirsync, mkTemp, startServer, type DirsyncServer, type Pair } from './dirsync-helpers.js';
import { scenarios } from './dirsync-scenarios.js';

type RootKind = 'local' | 'tcp';

let base: string;
let server: DirsyncServer | undefined;
let counter = 0;

beforeAll(async () => {
  base = mkTemp('drbdts-dirsync-scen-');
  const secretFile = path.join(base, 'secret');
  fs.writeFileSync(secretFile, 'scenario-test-secret-0123456789\n', { mode: 0o600 });
  fs.mkdirSync(path.join(base, 'served'));
  server = await startServer(path.join(base, 'served'), secretFile);
});

afterAll(async () => {
  await server?.stop();
  fs.rmSync(base, { recursive: true, force: true });
});

function makePair(kind: RootKind): Pair {
  const name = `s${++counter}`;
  const dir = path.join(base, name);
  fs.mkdirSync(dir);
  const a = path.join(dir, 'a');
  fs.mkdirSync(a);
  let b: string;
  let rootB: string;
  const extraArgs: string[] = [];
  if (kind === 'tcp') {
    b = path.join(base, 'served', name);
    fs.mkdirSync(b);
    rootB = server!.url(name);
    extraArgs.push('--secret-file', server!.secretFile);
  } else {
    b = path.join(dir, 'b');
    fs.mkdirSync(b);
    rootB = b;
  }
  return { dir, a, b, archive: path.join(dir, 'archive'), rootA: a, rootB, extraArgs };
}

for (const kind of ['local', 'tcp'] as const) {
  describe(`dirsync scenarios, ${kind} roots`, () => {
    for (const scenario of scenarios) {
      it(`#${scenario.id} ${scenario.title}`, async () => {
        const pair = makePair(kind);
        if (scenario.baseline !== undefined) {
          scenario.baseline(pair);
          const baseline = await dirsync(pair, scenario.args?.(pair) ?? []);
          expect(baseline.code, baseline.stderr).toBe(0);
        }
        const memo = scenario.change(pair) ?? {};
        const result = await dirsync(pair, scenario.args?.(pair) ?? []);
        expect(result.code, result.stderr + result.stdout).toBe(scenario.code);
        expect(result.json, result.stderr).toBeDefined();
        scenario.check(pair, result, 'dirsync', memo);
        if (scenario.code === 0) {
          // Converged: a further run has nothing left to propagate (a conflict copy may need one more run).
          let again = await dirsync(pair, scenario.args?.(pair) ?? []);
          if (again.json!.counts.propagated > 0) again = await dirsync(pair, scenario.args?.(pair) ?? []);
          expect(again.code, again.stderr).toBe(0);
          expect(again.json!.counts.propagated).toBe(0);
        }
      });
    }
  });
}
