// Proves that dirsync's outcomes match unison 2.52's, the reference, on the conformance scenarios: each scenario
// of dirsync-scenarios.ts is run through the real `unison -batch` (private archive dir via $UNISON) on real
// directories, and the same checks as for dirsync are applied to the trees and exit code unison leaves. A
// scenario where unison's behaviour is deliberately not followed carries `unisonDiffers` (the reason, also in
// docs/dirsync.md) and is asserted here to really differ, so the documented difference stays true.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { localPair, mkTemp, unison, type Pair } from './dirsync-helpers.js';
import { scenarios } from './dirsync-scenarios.js';

let base: string;
let counter = 0;

beforeAll(() => {
  base = mkTemp('drbdts-dirsync-unison-');
});
afterAll(() => {
  fs.rmSync(base, { recursive: true, force: true });
});

function makePair(): Pair {
  return localPair(path.join(base, `u${++counter}`));
}

describe('unison 2.52 on the same scenarios', () => {
  for (const scenario of scenarios) {
    it(`#${scenario.id} ${scenario.title}${scenario.unisonDiffers !== undefined ? ' (differs: documented)' : ''}`, async () => {
      const pair = makePair();
      if (scenario.baseline !== undefined) {
        scenario.baseline(pair);
        const baseline = await unison(pair, scenario.args?.(pair) ?? []);
        expect(baseline.code, baseline.stdout + baseline.stderr).toBe(0);
      }
      const memo = scenario.change(pair) ?? {};
      const result = await unison(pair, scenario.args?.(pair) ?? []);
      const agrees = (): void => {
        expect(result.code, result.stdout + result.stderr).toBe(scenario.code);
        scenario.check(pair, result, 'unison', memo);
      };
      if (scenario.unisonDiffers === undefined) agrees();
      else expect(agrees).toThrow();
    });
  }
});
