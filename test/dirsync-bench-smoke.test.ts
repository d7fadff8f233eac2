// What this file proves: the directory-sync benchmark still runs end to end -- bench/dirsync-local.mjs generates a
// tree, runs the `drbdts` executable and unison 2.52 on it (initial sync, no-change rescan, small change), checks
// every result with diff -r, and prints a complete ratio table -- so the script behind bench/README.md's dirsync
// figures cannot rot. How: its --quick mode (1,000 files, one round). Nothing here judges speed.
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { repoRoot, runOk } from './helpers/nbd.js';

describe('dirsync benchmark smoke run', () => {
  it('dirsync-local --quick produces a row for every measure against unison', async () => {
    const output = await runOk(process.execPath, [path.join(repoRoot, 'bench/dirsync-local.mjs'), '--quick', '--trees', 'big'], { timeoutMs: 110_000 });
    const rows = output.split('\n').filter((line) => line.startsWith('| big |'));
    expect(rows.map((row) => row.split('|')[2]!.trim())).toEqual([
      'initial sync', 'no-change rescan', 'small-change sync',
      'initial sync, CPU', 'no-change rescan, CPU', 'small-change sync, CPU',
      'peak RSS', 'peak RSS, rescan', 'peak RSS, small change',
    ]);
    for (const row of rows) {
      const cells = row.split('|').map((cell) => cell.trim());
      for (const cell of [cells[3]!, cells[4]!]) expect(Number.parseFloat(cell), row).toBeGreaterThan(0);
      expect(Number.isFinite(Number.parseFloat(cells[5]!)), row).toBe(true);
    }
  }, 120_000);
});
