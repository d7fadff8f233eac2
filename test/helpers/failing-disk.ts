// A backing file whose writes fail with a real EIO on demand: nbdfuse exposes an nbdkit memory disk through
// nbdkit's error filter as DIR/NAME, and every write fails while the trigger file exists. The caller registers
// the returned cleanup (unmount, stop nbdfuse, remove the files).
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { run } from '../replication-cluster.js';
import { waitFor } from '../replication-helpers.js';

export interface FailingDisk {
  dir: string;
  trigger: string;
  cleanup: () => Promise<void>;
}

export async function mountFailingDisk(fileName: string, sizeBytes: number): Promise<FailingDisk> {
  const base = path.join('/tmp', `drbdts-eio-${process.pid}-${Date.now()}`);
  const dir = path.join(base, 'mnt');
  await mkdir(dir, { recursive: true });
  const trigger = path.join(base, 'trigger');
  const fuse: ChildProcess = spawn('nbdfuse', [path.join(dir, fileName), '--command', 'nbdkit', '-s', 'memory',
    `size=${sizeBytes}`, '--filter=error', 'error-pwrite-rate=1', `error-pwrite-file=${trigger}`],
  { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  fuse.stderr!.on('data', (chunk) => (stderr += chunk));
  await waitFor('the FUSE disk', () => {
    if (fuse.exitCode !== null) throw new Error(`nbdfuse exited ${fuse.exitCode}: ${stderr}`);
    return existsSync(path.join(dir, fileName));
  }, 10_000, 100);
  const cleanup = async (): Promise<void> => {
    await run('fusermount3', ['-u', dir]).catch(() => undefined);
    if (fuse.exitCode === null) fuse.kill('SIGKILL');
    await run('rm', ['-rf', base]);
  };
  return { dir, trigger, cleanup };
}
