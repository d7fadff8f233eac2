// What this file proves: a real kernel filesystem lives happily on a drbdts export -- the kernel's ext3
// driver issues its own mix of reads, writes, flushes and discards, and e2fsck finds the result clean after
// unmounting. How: `drbdts serve` (child process) over a sparse file; nbdfuse exposes the export as a FUSE
// file; mkfs.ext3, `mount -o loop`, files written and read back (checksums), umount, fusermount3 -u, and
// `e2fsck -fn` on the backing file itself. Needs root, /dev/fuse and loop devices (skipped with the reason
// printed when they are missing).
import { spawn, type ChildProcess } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { makeTempDir, runCommand, runOk, spawnServe, type ServeProcess } from './helpers/nbd.js';

const missing = [
  process.getuid?.() !== 0 ? 'not root' : null,
  fs.existsSync('/dev/fuse') ? null : '/dev/fuse missing',
  fs.existsSync('/dev/loop-control') ? null : '/dev/loop-control missing',
].filter((reason) => reason !== null);

let dir = '';
let serve: ServeProcess | null = null;
let fuse: ChildProcess | null = null;
let fuseDir = '';
let mountDir = '';
let mounted = false;

afterAll(async () => {
  if (mounted) await runCommand('umount', [mountDir]);
  if (fuse !== null) {
    await runCommand('fusermount3', ['-u', fuseDir]);
    fuse.kill('SIGKILL');
  }
  serve?.child.kill('SIGKILL');
  if (dir !== '') await fs.promises.rm(dir, { recursive: true, force: true });
});

describe('a kernel filesystem on an NBD export', () => {
  it('mkfs.ext3, mount -o loop, write and read files, umount, e2fsck -fn clean', async (context) => {
    if (missing.length > 0) {
      console.log(`skipped: ${missing.join(', ')}`);
      context.skip();
    }
    dir = await makeTempDir('nbd-fs');
    const disk = path.join(dir, 'disk.img');
    const socket = path.join(dir, 'nbd.sock');
    serve = await spawnServe([disk, '--size', '128MiB', '--listen', `unix:${socket}`]);

    fuseDir = path.join(dir, 'fuse');
    mountDir = path.join(dir, 'mnt');
    fs.mkdirSync(fuseDir);
    fs.mkdirSync(mountDir);
    const pidFile = path.join(dir, 'nbdfuse.pid');
    fuse = spawn('nbdfuse', ['-P', pidFile, fuseDir, `nbd+unix:///?socket=${socket}`], { stdio: 'ignore' });
    for (let wait = 0; wait < 100 && !fs.existsSync(pidFile); wait += 1) await new Promise((resolve) => setTimeout(resolve, 100));
    expect(fs.existsSync(pidFile), 'nbdfuse came up').toBe(true);
    const device = path.join(fuseDir, 'nbd');
    expect(fs.statSync(device).size).toBe(128 * 1024 * 1024);

    await runOk('mkfs.ext3', ['-q', '-F', '-E', 'discard', device], { timeoutMs: 60_000 });
    await runOk('mount', ['-o', 'loop,discard', device, mountDir]);
    mounted = true;
    const files = new Map<string, string>();
    for (let index = 0; index < 20; index += 1) {
      const data = crypto.randomBytes(1024 * (1 + index * 97));
      const name = path.join(mountDir, `file-${index}.bin`);
      fs.writeFileSync(name, data);
      files.set(name, crypto.createHash('sha256').update(data).digest('hex'));
    }
    fs.mkdirSync(path.join(mountDir, 'sub/dir'), { recursive: true });
    fs.writeFileSync(path.join(mountDir, 'sub/dir/note.txt'), 'kept across umount');
    fs.rmSync(path.join(mountDir, 'file-3.bin')); // with -o discard the kernel TRIMs the freed blocks
    files.delete(path.join(mountDir, 'file-3.bin'));
    await runOk('sync', []);
    await runOk('umount', [mountDir]);
    mounted = false;
    // Drop the loop device's and FUSE's caches: read everything back through the server.
    await runOk('mount', ['-o', 'loop,ro', device, mountDir]);
    mounted = true;
    for (const [name, hash] of files) {
      expect(crypto.createHash('sha256').update(fs.readFileSync(name)).digest('hex'), name).toBe(hash);
    }
    expect(fs.readFileSync(path.join(mountDir, 'sub/dir/note.txt'), 'utf8')).toBe('kept across umount');
    await runOk('umount', [mountDir]);
    mounted = false;
    await runOk('fusermount3', ['-u', fuseDir]);
    fuse = null;

    // Stop the server the way an operator does; then check the backing file, not the export.
    serve.child.kill('SIGTERM');
    expect((await serve.exited).code).toBe(0);
    serve = null;
    const fsck = await runCommand('e2fsck', ['-fn', disk]);
    expect(fsck.code, fsck.stdout + fsck.stderr).toBe(0);
  }, 120_000);
});
