// Proves that a real kernel filesystem runs on drbdts through the kernel's own NBD client, the way an operator
// uses it: (1) `drbdts serve --device /dev/nbdN`: mkfs.ext3 on the block device, mount, write a large file and
// many small ones, umount, e2fsck clean, remount and read them back, SIGTERM detaches the kernel and the backing
// file holds the same filesystem (debugfs reads the file out of the image itself); (2) a replicated resource
// whose nodes attach /dev/nbdN while Primary: ext3 written on alice's /dev/nbdN, `secondary` refused while it is
// mounted, then a failover (alice secondary, bob primary) and bob's own /dev/nbdM mounts the same files, the
// replicas hash-identical. Needs the nbd kernel module: without /dev/nbd0 these tests are skipped with the
// reason printed, and test/kernel-vm.test.ts runs this file inside a VM whose kernel has the module.
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Cluster, repoRoot, run } from './replication-cluster.js';
import { waitFor } from './replication-helpers.js';

const MiB = 1024 * 1024;
const kernelClientAvailable = fs.existsSync('/dev/nbd0');
const skipReason = '/dev/nbd0 does not exist: the nbd kernel module is not loaded on this machine';
const cli = path.join(repoRoot, 'bin', 'drbdts.js');

beforeAll(() => {
  if (!kernelClientAvailable) process.stderr.write(`kernel-filesystem.test.ts: skipped: ${skipReason}\n`);
});

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup().catch(() => undefined);
});

/** A free /dev/nbdN: present and with no process serving it (sysfs has a pid file only while attached). */
function freeNbdDevices(count: number): string[] {
  const found: string[] = [];
  for (let n = 0; n < 16 && found.length < count; n++) {
    if (fs.existsSync(`/dev/nbd${n}`) && !fs.existsSync(`/sys/block/nbd${n}/pid`)) found.push(`/dev/nbd${n}`);
  }
  expect(found.length, `${count} free /dev/nbdN`).toBe(count);
  return found;
}

function attached(devicePath: string): boolean {
  return fs.existsSync(`/sys/block/${path.basename(devicePath)}/pid`);
}

async function mustRun(command: string, args: string[], timeoutMs = 120_000): Promise<string> {
  const result = await run(command, args, { timeoutMs });
  if (result.code !== 0) throw new Error(`${command} ${args.join(' ')} exited ${result.code}: ${result.stderr}${result.stdout}`);
  return result.stdout;
}

interface Tree {
  /** Path inside the filesystem -> sha256 of its content. */
  hashes: Map<string, string>;
}

/** Writes one 12 MiB file and 150 small ones in a few directories under `mountPoint`, and syncs. */
function writeTree(mountPoint: string): Tree {
  const hashes = new Map<string, string>();
  const put = (relative: string, data: Buffer) => {
    fs.mkdirSync(path.dirname(path.join(mountPoint, relative)), { recursive: true });
    fs.writeFileSync(path.join(mountPoint, relative), data);
    hashes.set(relative, createHash('sha256').update(data).digest('hex'));
  };
  put('big.bin', randomBytes(12 * MiB));
  for (let i = 0; i < 150; i++) put(`dir${i % 5}/file${i}.txt`, randomBytes(1 + ((i * 7919) % 20_000)));
  return { hashes };
}

function checkTree(mountPoint: string, tree: Tree): void {
  for (const [relative, hash] of tree.hashes) {
    const data = fs.readFileSync(path.join(mountPoint, relative));
    expect(createHash('sha256').update(data).digest('hex'), relative).toBe(hash);
  }
}

async function mount(devicePath: string, mountPoint: string): Promise<void> {
  fs.mkdirSync(mountPoint, { recursive: true });
  await mustRun('mount', ['-t', 'ext3', devicePath, mountPoint]);
  cleanups.push(() => run('umount', ['-l', mountPoint]).then(() => undefined));
}

describe.skipIf(!kernelClientAvailable)(`ext3 on the kernel NBD client (skipped if ${skipReason})`, () => {
  it('drbdts serve --device: mkfs.ext3, mount, write, umount, e2fsck, remount and read, SIGTERM detaches', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'drbdts-kernel-fs-'));
    cleanups.push(async () => fs.rmSync(dir, { recursive: true, force: true }));
    const [device] = freeNbdDevices(1);
    const image = path.join(dir, 'disk.img');
    const serve: ChildProcess = spawn(process.execPath, [cli, 'serve', image, '--size', '128MiB', '--listen',
      `unix:${dir}/serve.sock`, '--device', device!], { stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, DRBDTS_LOG_LEVEL: 'info' } });
    let stderr = '';
    serve.stderr!.on('data', (chunk) => (stderr += chunk));
    cleanups.push(async () => { if (serve.exitCode === null) serve.kill('SIGKILL'); });
    await waitFor(`${device} to be attached`, () => {
      if (serve.exitCode !== null) throw new Error(`serve exited ${serve.exitCode}: ${stderr}`);
      return attached(device!);
    }, 60_000, 100);
    expect(Number(fs.readFileSync(`/sys/block/${path.basename(device!)}/size`, 'utf8')) * 512).toBe(128 * MiB);

    await mustRun('mkfs.ext3', ['-q', '-F', device!]);
    const mountPoint = path.join(dir, 'mnt');
    await mount(device!, mountPoint);
    const tree = writeTree(mountPoint);
    await mustRun('umount', [mountPoint]);
    await mustRun('e2fsck', ['-fn', device!]);
    await mount(device!, mountPoint);
    checkTree(mountPoint, tree);
    await mustRun('umount', [mountPoint]);

    // SIGTERM: the kernel lets go of the device and serve exits 0 after its final flush.
    serve.kill('SIGTERM');
    const code = await new Promise<number | null>((resolve) => serve.once('exit', (exitCode) => resolve(exitCode)));
    expect(code, stderr).toBe(0);
    expect(attached(device!)).toBe(false);
    // The kernel's requests ran on the native data path (its READ/WRITE/FLUSH), as they do for any client.
    const nativeRequests = stderr.split('\n').filter((line) => line.includes('"client disconnected"'))
      .reduce((sum, line) => sum + Number((JSON.parse(line) as { nativeRequests?: number }).nativeRequests ?? 0), 0);
    expect(nativeRequests, stderr.slice(-2000)).toBeGreaterThan(100);
    // The backing file is the filesystem: clean, and its big file reads back from the image itself.
    await mustRun('e2fsck', ['-fn', image]);
    const extracted = path.join(dir, 'big.out');
    await mustRun('debugfs', ['-R', `dump /big.bin ${extracted}`, image]);
    expect(createHash('sha256').update(fs.readFileSync(extracted)).digest('hex')).toBe(tree.hashes.get('big.bin'));
  }, 300_000);

  it('a replicated resource: ext3 on the Primary\'s /dev/nbdN, secondary refused while mounted, failover keeps the files', async () => {
    const [aliceDevice, bobDevice] = freeNbdDevices(2);
    const cluster = new Cluster({ sizeMiB: 96, devices: { alice: aliceDevice!, bob: bobDevice! } });
    await cluster.setup();
    cleanups.push(() => cluster.teardown());
    await cluster.startPrimaryAlice();
    expect(attached(aliceDevice!)).toBe(true);
    expect(attached(bobDevice!)).toBe(false);

    await mustRun('mkfs.ext3', ['-q', '-F', aliceDevice!]);
    const aliceMount = path.join(cluster.dir, 'alice-mnt');
    await mount(aliceDevice!, aliceMount);
    const tree = writeTree(aliceMount);
    // DRBD refuses to demote a device that is in use; so does drbdts, and nothing changes.
    const refused = await cluster.cli('alice', 'secondary');
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(new RegExp(`${aliceDevice} is mounted`));
    expect((await cluster.status('alice')).role).toBe('Primary');
    expect(attached(aliceDevice!)).toBe(true);
    await mustRun('umount', [aliceMount]);

    const demoted = await cluster.cli('alice', 'secondary');
    expect(demoted.code, demoted.stderr).toBe(0);
    expect(attached(aliceDevice!)).toBe(false);
    const promoted = await cluster.cli('bob', 'primary');
    expect(promoted.code, promoted.stderr).toBe(0);
    expect(attached(bobDevice!)).toBe(true);
    await mustRun('e2fsck', ['-fn', bobDevice!]);
    const bobMount = path.join(cluster.dir, 'bob-mnt');
    await mount(bobDevice!, bobMount);
    checkTree(bobMount, tree);
    await mustRun('umount', [bobMount]);
    await cluster.waitInSync();
    expect(await cluster.hashData('bob')).toBe(await cluster.hashData('alice'));
  }, 300_000);
});
