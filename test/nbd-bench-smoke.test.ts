// What this file proves: the NBD benchmarks still run end to end -- bench/nbd-compare.mjs drives fio against
// both `drbdts serve` and `nbdkit file` and prints a complete ratio table, and bench/nbd-micro.mjs runs its
// tinybench tasks -- so the scripts behind bench/README.md cannot rot. How: their --quick modes (tiny sizes,
// one round) on this machine. Nothing here judges speed: the figures come from full runs of bench/run.sh.
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { repoRoot, runOk } from './helpers/nbd.js';

describe('NBD benchmark smoke run', () => {
  it('nbd-compare --quick produces a ratio row for every job against nbdkit', async () => {
    const output = await runOk(process.execPath, [path.join(repoRoot, 'bench/nbd-compare.mjs'), '--quick', '--transports', 'unix',
      '--size', '32m', '--jobs', 'seqwrite-1m-qd8,seqread-1m-qd8,randwrite-4k-qd32,write-4k-qd1-flush'], { timeoutMs: 110_000 });
    const rows = output.split('\n').filter((line) => line.startsWith('| unix |'));
    expect(rows.map((row) => row.split('|')[2]!.trim().split(' ')[0])).toEqual(
      ['seqwrite-1m-qd8', 'seqread-1m-qd8', 'randwrite-4k-qd32', 'write-4k-qd1-flush']);
    for (const row of rows) {
      const ratio = Number(row.split('|')[5]!.trim().split(' ')[0]);
      expect(ratio, row).toBeGreaterThan(0);
      expect(Number.isFinite(ratio), row).toBe(true);
    }
  }, 120_000);

  it('nbd-micro --quick runs every parsing and encoding task', async () => {
    const output = await runOk(process.execPath, [path.join(repoRoot, 'bench/nbd-micro.mjs'), '--quick'], { timeoutMs: 60_000 });
    for (const task of ['WRITE 4 KiB', 'READ 4 KiB', 'FLUSH', 'WRITE 1 MiB', 'READ 1 MiB']) expect(output).toContain(task);
    expect(output).not.toMatch(/NaN/);
  }, 70_000);
});
