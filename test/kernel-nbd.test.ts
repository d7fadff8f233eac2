// Proves the kernel NBD attach: where /dev/nbdN is missing, attachKernelClient and `drbdts serve --device`
// fail with an error telling the operator to load the nbd module, and refuse bad arguments before touching any
// device. Where the nbd module is loaded, the real test attaches /dev/nbdN to an NbdServer over two sockets
// (multi-conn), writes and reads through the kernel block device, checks the bytes in the backing file,
// detaches and checks the kernel let go. On a machine without /dev/nbd0 that test is skipped, with the reason
// printed; no other reason skips it.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { LocalDisk } from '../src/blockdev/local.js';
import { transmissionFlagsFor } from '../src/nbd/handshake.js';
import { attachKernelClient, type KernelAttachment } from '../src/nbd/kernel.js';
import { NbdServer } from '../src/nbd/server.js';
import { socketPair } from '../src/native/index.js';

const execFileAsync = promisify(execFile);
const MiB = 1024 * 1024;
const repoRoot = path.resolve(import.meta.dirname, '..');
const kernelClientAvailable = fs.existsSync('/dev/nbd0');
const skipReason = '/dev/nbd0 does not exist: the nbd kernel module is not loaded on this machine';

let tempDir: string;
const disks: LocalDisk[] = [];
const servers: NbdServer[] = [];
const attachments: KernelAttachment[] = [];
/** Backing files are numbered across tests (afterEach empties `disks`, so its length would repeat a name). */
let diskFileCount = 0;

beforeAll(() => {
  tempDir = fs.mkdtempSync(path.join(os.tmpdir(), 'drbdts-kernel-nbd-'));
  if (!kernelClientAvailable) process.stderr.write(`kernel-nbd.test.ts: real attach test skipped: ${skipReason}\n`);
});

afterEach(async () => {
  for (const attachment of attachments.splice(0)) await attachment.detach();
  for (const server of servers.splice(0)) await server.close();
  for (const disk of disks.splice(0)) await disk.close();
});

afterAll(() => {
  fs.rmSync(tempDir, { recursive: true, force: true });
});

async function serveFile(sizeBytes: number): Promise<{ file: string; disk: LocalDisk; server: NbdServer }> {
  const file = path.join(tempDir, `disk-${diskFileCount++}.img`);
  const disk = await LocalDisk.open(file, { createSizeBytes: sizeBytes });
  disks.push(disk);
  const server = new NbdServer({ device: disk });
  servers.push(server);
  return { file, disk, server };
}

/** A device path that certainly does not exist: /dev/nbd0 itself on machines without the module. */
function missingDevicePath(): string {
  return kernelClientAvailable ? path.join(tempDir, 'nbd-missing') : '/dev/nbd0';
}

describe('kernel NBD attach: refusals', () => {
  // The library call: a missing device names the fix; a regular file or a bad size is refused up front.
  it('fails clearly when the device is missing or unusable', async () => {
    const { disk, server } = await serveFile(4 * MiB);
    const flags = transmissionFlagsFor(disk, false, false);
    const missing = missingDevicePath();
    await expect(attachKernelClient({ devicePath: missing, server, sizeBytes: disk.sizeBytes, flags })).rejects.toThrow(
      `${missing} does not exist: load the nbd kernel module (modprobe nbd)`,
    );
    await expect(
      attachKernelClient({ devicePath: missing, server, sizeBytes: disk.sizeBytes, flags }),
    ).rejects.toMatchObject({ code: 'ENOENT' });
    const regular = path.join(tempDir, 'not-a-device');
    fs.writeFileSync(regular, 'x');
    await expect(attachKernelClient({ devicePath: regular, server, sizeBytes: disk.sizeBytes, flags })).rejects.toThrow(
      `${regular} is not a block device`,
    );
    await expect(attachKernelClient({ devicePath: missing, server, sizeBytes: 1000, flags })).rejects.toThrow(
      /multiple of 512 bytes; 1000 is not/,
    );
    await expect(
      attachKernelClient({ devicePath: missing, server, sizeBytes: disk.sizeBytes, flags, connections: 0 }),
    ).rejects.toThrow(/connections must be 1\.\.16/);
    // Nothing was adopted by the server on any of these paths.
    expect(server.activeConnections).toBe(0);
  });

  // The operator's view: `drbdts serve --device` exits non-zero with the same message on stderr.
  it('drbdts serve --device reports a missing device and exits non-zero', async () => {
    const file = path.join(tempDir, 'serve.img');
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, 4 * MiB);
    const missing = missingDevicePath();
    const socketPath = path.join(tempDir, 'serve.sock');
    const result = await execFileAsync(
      process.execPath,
      [path.join(repoRoot, 'bin/drbdts.js'), 'serve', file, '--listen', `unix:${socketPath}`, '--device', missing],
      { timeout: 60_000, env: { ...process.env, DRBDTS_LOG_LEVEL: 'silent' } },
    ).then(
      () => ({ code: 0, stderr: '' }),
      (error: { code: number; stderr: string }) => ({ code: error.code, stderr: error.stderr }),
    );
    expect(result.code).not.toBe(0);
    expect(result.stderr).toContain(`${missing} does not exist: load the nbd kernel module (modprobe nbd)`);
    // The file is untouched.
    expect(fs.statSync(file).size).toBe(4 * MiB);
  });
});

describe('kernel NBD attach: the socketpair plumbing, with the test playing the kernel', () => {
  // What attachKernelClient does minus the ioctls: one end of a native socketpair is adopted by the server in
  // transmission phase, and the test speaks to the other end exactly as the kernel client does (28-byte
  // requests, simple 16-byte replies, no handshake). Proves the adopted socket serves WRITE, FLUSH and READ
  // and that the bytes land in the backing file, on every machine, module or not.
  it('serves raw transmission-phase requests over a socketpair', async () => {
    const { file, server } = await serveFile(4 * MiB);
    const [kernelEnd, serverEnd] = socketPair();
    server.adoptTransmissionSocket(new net.Socket({ fd: serverEnd, readable: true, writable: true }));
    const kernel = new net.Socket({ fd: kernelEnd, readable: true, writable: true });
    let received = Buffer.alloc(0);
    const waiters: (() => void)[] = [];
    kernel.on('data', (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      for (const waiter of waiters.splice(0)) waiter();
    });
    async function take(length: number): Promise<Buffer> {
      while (received.length < length) await new Promise<void>((resolve) => waiters.push(resolve));
      const taken = received.subarray(0, length);
      received = received.subarray(length);
      return taken;
    }
    function request(type: number, cookie: bigint, offset: number, length: number, payload?: Buffer): void {
      const header = Buffer.alloc(28);
      header.writeUInt32BE(0x25609513, 0);
      header.writeUInt16BE(0, 4);
      header.writeUInt16BE(type, 6);
      header.writeBigUInt64BE(cookie, 8);
      header.writeBigUInt64BE(BigInt(offset), 16);
      header.writeUInt32BE(length, 24);
      kernel.write(payload === undefined ? header : Buffer.concat([header, payload]));
    }
    async function reply(): Promise<{ error: number; cookie: bigint }> {
      const header = await take(16);
      expect(header.readUInt32BE(0)).toBe(0x67446698);
      return { error: header.readUInt32BE(4), cookie: header.readBigUInt64BE(8) };
    }
    const payload = Buffer.alloc(64 * 1024, 0x6b);
    request(1, 11n, MiB, payload.length, payload);
    expect(await reply()).toEqual({ error: 0, cookie: 11n });
    request(3, 12n, 0, 0);
    expect(await reply()).toEqual({ error: 0, cookie: 12n });
    request(0, 13n, MiB - 4096, 8192);
    expect(await reply()).toEqual({ error: 0, cookie: 13n });
    const data = await take(8192);
    expect(data.subarray(0, 4096).every((byte) => byte === 0)).toBe(true);
    expect(data.subarray(4096).every((byte) => byte === 0x6b)).toBe(true);
    // A read past the end gets EINVAL in a simple reply, as the kernel expects.
    request(0, 14n, 4 * MiB, 4096);
    expect(await reply()).toEqual({ error: 22, cookie: 14n });
    const backing = fs.readFileSync(file).subarray(MiB, MiB + payload.length);
    expect(backing.equals(payload)).toBe(true);
    kernel.destroy();
  });
});

describe('kernel NBD attach: for real', () => {
  // Attaches a free /dev/nbdN with two connections, writes 8 MiB through the kernel with dd (O_DIRECT, fsync)
  // in a child process (this process serves the device, so it must never block on it), checks the backing
  // file, reads back through the device the same way, detaches and checks sysfs shows the device free again.
  it.skipIf(!kernelClientAvailable)(`attaches /dev/nbdN and moves data through it (skipped if ${skipReason})`, async () => {
    let devicePath: string | null = null;
    for (let n = 0; n < 16 && devicePath === null; n++) {
      const candidate = `/dev/nbd${n}`;
      if (fs.existsSync(candidate) && !fs.existsSync(`/sys/block/nbd${n}/pid`)) devicePath = candidate;
    }
    expect(devicePath, 'no free /dev/nbdN').not.toBeNull();
    const { file, disk, server } = await serveFile(64 * MiB);
    const attachment = await attachKernelClient({
      devicePath: devicePath!,
      server,
      sizeBytes: disk.sizeBytes,
      connections: 2,
      flags: transmissionFlagsFor(disk, false, false),
    });
    attachments.push(attachment);
    expect(server.activeConnections).toBe(2);
    const sysfs = `/sys/block/${path.basename(devicePath!)}`;
    expect(Number(fs.readFileSync(`${sysfs}/size`, 'utf8')) * 512).toBe(64 * MiB);
    // sysfs names the thread sitting in NBD_DO_IT: one of this process's threads.
    const doItThread = Number(fs.readFileSync(`${sysfs}/pid`, 'utf8'));
    expect(fs.existsSync(`/proc/${process.pid}/task/${doItThread}`)).toBe(true);

    const payload = Buffer.alloc(8 * MiB);
    for (let i = 0; i < payload.length; i += 4) payload.writeUInt32LE(i, i);
    const payloadFile = path.join(tempDir, 'payload.bin');
    fs.writeFileSync(payloadFile, payload);
    await execFileAsync('dd', [`if=${payloadFile}`, `of=${devicePath}`, 'bs=1M', 'seek=4', 'oflag=direct', 'conv=fsync']);
    // dd's fsync sent a FLUSH through NBD after the O_DIRECT writes: the backing file has the data now.
    const backing = Buffer.alloc(payload.length);
    const backingFd = fs.openSync(file, 'r');
    fs.readSync(backingFd, backing, 0, backing.length, 4 * MiB);
    fs.closeSync(backingFd);
    expect(backing.equals(payload)).toBe(true);
    const readBack = path.join(tempDir, 'read-back.bin');
    await execFileAsync('dd', [`if=${devicePath}`, `of=${readBack}`, 'bs=1M', 'skip=4', 'count=8', 'iflag=direct']);
    expect(fs.readFileSync(readBack).equals(payload)).toBe(true);
    await attachment.detach();
    attachments.splice(attachments.indexOf(attachment), 1);
    expect(fs.existsSync(`${sysfs}/pid`)).toBe(false);
  });
});
