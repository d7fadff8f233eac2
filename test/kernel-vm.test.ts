// Proves the kernel NBD client paths for real on a machine whose kernel has no nbd module (this one): it boots a
// throwaway VM (scripts/vm/run.sh: Debian's stock kernel, this machine's file system as a read-only root with a
// tmpfs overlay, no network device) and runs test/kernel-nbd.test.ts and test/kernel-filesystem.test.ts inside,
// where /dev/nbd0 exists. It asserts the inner run passed every test and skipped none, so the attach, the
// multi-connection data path, ext3 on /dev/nbdN, SIGTERM detach and the replicated failover through the kernel
// client are all exercised. The VM's CPU is emulated, so this takes a few minutes.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { expect, it } from 'vitest';
import { repoRoot } from './replication-cluster.js';

const innerFiles = ['test/kernel-nbd.test.ts', 'test/kernel-filesystem.test.ts'];
const innerTests = 6;

it('runs the kernel NBD tests inside a VM that has the nbd module, all passing, none skipped', async () => {
  const { code, output } = await new Promise<{ code: number | null; output: string }>((resolve, reject) => {
    const child = spawn('bash', [path.join(repoRoot, 'scripts/vm/run.sh'), '--timeout', '900', '--',
      'npx', 'vitest', 'run', '--color=false', ...innerFiles], {
      cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, CI: 'true', NO_COLOR: '1' },
    });
    let text = '';
    child.stdout.on('data', (chunk) => (text += chunk));
    child.stderr.on('data', (chunk) => (text += chunk));
    child.on('error', reject);
    child.on('close', (exitCode) => resolve({ code: exitCode, output: text }));
  });
  expect(code, output).toBe(0);
  expect(output).toMatch(new RegExp(`Tests\\s+${innerTests} passed \\(${innerTests}\\)`));
  expect(output).not.toMatch(/\d+ skipped/);
  expect(output).toContain('attaches /dev/nbdN and moves data through it');
  expect(output).toContain('failover keeps the files');
}, 1_000_000);
