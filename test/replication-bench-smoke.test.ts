// What this file proves: the replication benchmark still runs end to end on its two-machine set-up -- tmpfs per
// node, network namespaces joined by a veth pair, pinned daemons, fio and qemu-io against both the baseline and the
// Primary, resync measures -- prints a complete table with a finite ratio in every row that has one, writes its JSON,
// and leaves no mount or namespace behind. How: its --quick mode (64 MiB device, one round of 1 s jobs). Nothing
// here judges speed: the figures come from full runs (bench/README.md, "Replication").
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, repoRoot, runOk } from './helpers/nbd.js';

const tools = ['fio', 'qemu-io', 'ip', 'taskset'];
const canRun = process.getuid?.() === 0 && tools.every((tool) => spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0);

describe('replication benchmark smoke run', () => {
  it('replication --quick produces every row, a JSON report, and cleans up', async () => {
    // scripts/install-system.sh installs these; CI runs as root. Missing ones are a failure, not a skip.
    expect(canRun, `needs root and ${tools.join(', ')}`).toBe(true);
    const dir = await makeTempDir('repl-bench-smoke');
    const outPath = path.join(dir, 'replication.json');
    const output = await runOk(process.execPath, [path.join(repoRoot, 'bench/replication.mjs'), '--quick', '--out', outPath], { timeoutMs: 110_000 });
    const rows = output.split('\n').filter((line) => line.startsWith('| ') && !line.startsWith('| measure') && !line.startsWith('| ---'));
    expect(rows.map((row) => row.split('|')[1]!.trim())).toEqual([
      '1 MiB seq write QD8 (MiB/s)',
      '4 KiB rand write QD32 (IOPS)',
      '1 MiB seq write QD8: Primary CPU per write (us)',
      '4 KiB rand write QD32: Primary CPU per write (us)',
      '1 MiB seq write QD8: core busy (of it: each program)',
      '4 KiB rand write QD32: core busy (of it: each program)',
      'QD1 4 KiB FUA write p50 (us)',
      'QD1 4 KiB FUA write p99 (us)',
      'veth round trip, Node.js TCP 24 B, p50 / p99 (us)',
      'full resync of random data (MiB/s)',
      'bitmap resync: data bytes sent / dirty bytes',
      'daemon peak RSS (MiB, VmHWM)',
    ]);
    expect(output).not.toMatch(/NaN|Infinity/);
    const report = JSON.parse(fs.readFileSync(outPath, 'utf8')) as { method: string; summary: { rows: { ratio?: number }[] } };
    expect(report.method).toBe('two-machine');
    for (const row of report.summary.rows) {
      if (row.ratio !== undefined) expect(Number.isFinite(row.ratio) && row.ratio > 0, JSON.stringify(row)).toBe(true);
    }
    expect(spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout).not.toContain('drbdts-bench-');
    expect(fs.readFileSync('/proc/mounts', 'utf8')).not.toContain('drbdts-bench-repl-');
    fs.rmSync(dir, { recursive: true, force: true });
  }, 120_000);
});
