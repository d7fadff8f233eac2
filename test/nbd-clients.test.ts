// What this file proves: `drbdts serve` over a real file (LocalDisk) is a complete NBD server for the real
// clients operators use -- nbdinfo sees every capability and base:allocation, qemu-io patterns survive
// unaligned offsets, nbdcopy round-trips random data over several connections, fio's crc32c verify passes
// over ioengine=nbd, TRIM leaves holes and WRITE_ZEROES reads back zeros, read-only mode refuses writes, TLS
// works with nbdinfo on nbds:// (and nothing is served in the clear), and SIGTERM finishes, flushes and exits
// 0. How: the built CLI (bin/drbdts.js) runs as a child process; the clients are the libnbd, qemu and fio
// binaries installed by scripts/install-system.sh. Requires `npm run build` first (scripts/test.sh does it).
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { makeCertificates, makeTempDir, runCommand, runOk, spawnServe, type ServeProcess } from './helpers/nbd.js';

const diskBytes = 64 * 1024 * 1024;
let dir: string;
let main: ServeProcess;
let socketPath: string;
let uri: string;
const extra: ServeProcess[] = [];

beforeAll(async () => {
  dir = await makeTempDir('nbd-clients');
  socketPath = path.join(dir, 'main.sock');
  main = await spawnServe([path.join(dir, 'disk.img'), '--size', '64MiB', '--listen', `unix:${socketPath}`,
    '--export', 'disk0', '--description', 'drbdts test disk']);
  uri = `nbd+unix:///disk0?socket=${socketPath}`;
}, 30_000);

afterEach(() => {
  for (const serve of extra.splice(0)) serve.child.kill('SIGKILL');
});

afterAll(async () => {
  main.child.kill('SIGKILL');
  await main.exited;
  await fs.promises.rm(dir, { recursive: true, force: true });
});

describe('drbdts serve with real NBD clients', () => {
  it('shows every capability, base:allocation and block sizes to nbdinfo --json', async () => {
    const info = JSON.parse(await runOk('nbdinfo', ['--json', uri])) as {
      protocol: string; structured: boolean; exports: Array<Record<string, unknown>>;
    };
    expect(info.protocol).toBe('newstyle-fixed');
    expect(info.structured).toBe(true);
    const disk = info.exports[0]!;
    expect(disk['export-name']).toBe('disk0');
    expect(disk['description']).toBe('drbdts test disk');
    expect(disk['export-size']).toBe(diskBytes);
    expect(disk['contexts']).toContain('base:allocation');
    for (const flag of ['can_cache', 'can_df', 'can_fast_zero', 'can_flush', 'can_fua', 'can_multi_conn', 'can_trim', 'can_zero']) {
      expect(disk[flag], flag).toBe(true);
    }
    expect(disk['is_read_only']).toBe(false);
    expect(disk['block_size_minimum']).toBe(1);
    expect(disk['block_size_preferred']).toBe(4096);
    expect(disk['block_size_maximum']).toBe(32 * 1024 * 1024);
    const list = await runOk('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${socketPath}`]);
    expect(JSON.parse(list).exports.map((entry: { 'export-name': string }) => entry['export-name'])).toEqual(['disk0']);
  });

  it('round-trips qemu-io patterns at unaligned offsets', async () => {
    const output = await runOk('qemu-io', ['-f', 'raw', uri,
      '-c', 'write -P 0x5a 1000 100000',
      '-c', 'write -P 0xa5 777777 3333',
      '-c', 'write -P 0x11 204095 2',
      '-c', 'write -f -P 0x22 9000001 12345', // -f: FUA
      '-c', 'flush',
      '-c', 'read -P 0x5a 1000 100000',
      '-c', 'read -P 0xa5 777777 3333',
      '-c', 'read -P 0x11 204095 2',
      '-c', 'read -P 0x22 9000001 12345',
      '-c', 'read -P 0 101000 100000']);
    expect(output).not.toMatch(/Pattern verification failed|error/i);
    expect(output.match(/^read /gm)?.length).toBe(5);
  });

  it('round-trips random data with nbdcopy over four connections', async () => {
    const source = path.join(dir, 'random.bin');
    const copy = path.join(dir, 'copy.bin');
    const data = crypto.randomBytes(48 * 1024 * 1024);
    fs.writeFileSync(source, data);
    await runOk('nbdcopy', ['-C', '4', '-R', '8', source, uri], { timeoutMs: 90_000 });
    await runOk('nbdcopy', ['-C', '4', uri, copy], { timeoutMs: 90_000 });
    const back = fs.readFileSync(copy);
    expect(back.length).toBe(diskBytes);
    const hash = (buffer: Buffer): string => crypto.createHash('sha256').update(buffer).digest('hex');
    expect(hash(back.subarray(0, data.length))).toBe(hash(data));
    // And the backing file itself holds the same bytes (nothing lives only in the server's memory).
    const backing = fs.readFileSync(path.join(dir, 'disk.img'));
    expect(hash(backing.subarray(0, data.length))).toBe(hash(data));
    fs.rmSync(source);
    fs.rmSync(copy);
  }, 120_000);

  it('passes a fio crc32c verify job over ioengine=nbd', async () => {
    const job = path.join(dir, 'verify.fio');
    fs.writeFileSync(job, [
      '[global]', 'ioengine=nbd', `uri=${uri}`, 'size=32m', 'verify=crc32c', 'do_verify=1', 'verify_fatal=1', 'verify_state_save=0',
      '[randwrite-verify]', 'rw=randwrite', 'bsrange=4k-64k', 'iodepth=16', 'norandommap=0', '',
    ].join('\n'));
    const output = await runOk('fio', ['--output-format=json', job], { timeoutMs: 90_000 });
    // fio prints a line (the engine's banner) before its JSON.
    const report = JSON.parse(output.slice(output.indexOf('{'))) as { jobs: Array<{ error: number; read: { io_bytes: number }; write: { io_bytes: number } }> };
    expect(report.jobs[0]!.error).toBe(0);
    expect(report.jobs[0]!.write.io_bytes).toBe(32 * 1024 * 1024);
    expect(report.jobs[0]!.read.io_bytes).toBe(32 * 1024 * 1024); // the verify pass read everything back
  }, 120_000);

  it('leaves holes after TRIM and reads zeros after WRITE_ZEROES', async () => {
    const start = 50 * 1024 * 1024;
    await runOk('qemu-io', ['-f', 'raw', uri,
      '-c', `write -P 0x77 ${start} 4M`,
      '-c', `discard ${start} 1M`,
      '-c', `write -z -u ${start + 2 * 1024 * 1024} 1M`, // -u: no NO_HOLE, the device may unmap
      '-c', `read -P 0 ${start} 1M`,
      '-c', `read -P 0x77 ${start + 1024 * 1024} 1M`,
      '-c', `read -P 0 ${start + 2 * 1024 * 1024} 1M`,
      '-c', `read -P 0x77 ${start + 3 * 1024 * 1024} 1M`]);
    const map = JSON.parse(await runOk('nbdinfo', ['--map', '--json', uri])) as Array<{ offset: number; length: number; type: number }>;
    const typeAt = (offset: number): number => map.find((extent) => extent.offset <= offset && offset < extent.offset + extent.length)!.type;
    expect(typeAt(start) & 1).toBe(1); // trimmed: a hole
    expect(typeAt(start + 1024 * 1024)).toBe(0); // data
    expect(typeAt(start + 2 * 1024 * 1024) & 2).toBe(2); // zeroed: reads as zero
    // The hole is real in the backing file: SEEK_DATA from the trimmed range skips it.
    const stat = fs.statSync(path.join(dir, 'disk.img'));
    expect(stat.blocks * 512).toBeLessThan(diskBytes);
  });

  it('serves read-only: nbdinfo sees it and qemu-io writes fail', async () => {
    const socket = path.join(dir, 'ro.sock');
    const serve = await spawnServe([path.join(dir, 'disk.img'), '--read-only', '--listen', `unix:${socket}`]);
    extra.push(serve);
    const roUri = `nbd+unix:///?socket=${socket}`;
    const info = JSON.parse(await runOk('nbdinfo', ['--json', roUri])) as { exports: Array<Record<string, unknown>> };
    expect(info.exports[0]!['is_read_only']).toBe(true);
    expect(info.exports[0]!['can_trim']).toBe(false);
    const read = await runCommand('qemu-io', ['-f', 'raw', '-r', roUri, '-c', 'read 0 4k']);
    expect(read.code).toBe(0);
    // qemu refuses to open a read-only export for writing; the EPERM path for a client that writes anyway
    // is in nbd-protocol.test.ts.
    const refused = await runCommand('qemu-io', ['-f', 'raw', roUri, '-c', 'write 0 512']);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/Permission denied|read-only/i);
    const copied = await runCommand('nbdcopy', [path.join(dir, 'disk.img'), roUri]);
    expect(copied.code).not.toBe(0);
  });

  it('requires STARTTLS when configured and serves nbdinfo over nbds://', async () => {
    const certDir = path.join(dir, 'pki');
    fs.mkdirSync(certDir);
    const { certPath, keyPath } = await makeCertificates(certDir);
    const serve = await spawnServe([path.join(dir, 'disk.img'), '--listen', '127.0.0.1:0', '--tls-cert', certPath, '--tls-key', keyPath]);
    extra.push(serve);
    const port = serve.addresses[0]!.split(':').at(-1)!;
    const info = JSON.parse(await runOk('nbdinfo', ['--json', `nbds://127.0.0.1:${port}/?tls-certificates=${certDir}`])) as {
      TLS: boolean; exports: Array<Record<string, unknown>>;
    };
    expect(info.TLS).toBe(true);
    expect(info.exports[0]!['export-size']).toBe(diskBytes);
    const data = await runOk('qemu-io', ['--image-opts',
      `driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port=${port},file.tls-creds=tls0`,
      '--object', `tls-creds-x509,id=tls0,dir=${certDir},endpoint=client`,
      '-c', 'write -P 0x3c 0 64k', '-c', 'read -P 0x3c 0 64k']);
    expect(data).not.toMatch(/Pattern verification failed/);
    expect(data).toContain('read 65536/65536 bytes at offset 0');
    // In the clear the server answers nothing but STARTTLS: a plain client gets no export.
    const plain = await runCommand('nbdinfo', ['--json', `nbd://127.0.0.1:${port}/`]);
    expect(plain.code).not.toBe(0);
    expect(plain.stdout).not.toContain('export-size');
  }, 60_000);

  it('finishes, flushes and exits 0 on SIGTERM, removing its socket', async () => {
    const socket = path.join(dir, 'term.sock');
    const disk = path.join(dir, 'term.img');
    const serve = await spawnServe([disk, '--size', '8M', '--listen', `unix:${socket}`]);
    extra.push(serve);
    await runOk('qemu-io', ['-f', 'raw', `nbd+unix:///?socket=${socket}`, '-c', 'write -P 0x99 4096 8192']);
    serve.child.kill('SIGTERM');
    const { code } = await serve.exited;
    expect(code).toBe(0);
    expect(serve.stderr()).toContain('"msg":"stopped"');
    expect(fs.existsSync(socket)).toBe(false);
    const backing = fs.readFileSync(disk);
    expect(backing.subarray(4096, 4096 + 8192).every((byte) => byte === 0x99)).toBe(true);
  });

  it('rejects bad command lines with a message naming the problem', async () => {
    const cli = path.resolve('bin/drbdts.js');
    const missing = await runCommand(process.execPath, [cli, 'serve', path.join(dir, 'nope.img'), '--listen', `unix:${path.join(dir, 'x.sock')}`]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toContain('does not exist; pass --size');
    const badAddress = await runCommand(process.execPath, [cli, 'serve', path.join(dir, 'disk.img'), '--listen', 'localhost']);
    expect(badAddress.code).toBe(2);
    expect(badAddress.stderr).toContain('listen address "localhost"');
    const badSize = await runCommand(process.execPath, [cli, 'serve', path.join(dir, 'n.img'), '--size', '12 parsecs', '--listen', 'unix:/tmp/x']);
    expect(badSize.stderr).toContain('--size');
    const halfTls = await runCommand(process.execPath, [cli, 'serve', path.join(dir, 'disk.img'), '--listen', 'unix:/tmp/x', '--tls-cert', 'a.pem']);
    expect(halfTls.stderr).toContain('--tls-cert and --tls-key go together');
    for (const [name, value] of [['DRBDTS_NBD_DATA_PATH', 'fast'], ['DRBDTS_NBD_SPLICE', 'yes'], ['DRBDTS_NBD_DATA_PATH_THREADS', '0']]) {
      const badEnv = await runCommand(process.execPath, [cli, 'serve', path.join(dir, 'disk.img'), '--listen', `unix:${path.join(dir, 'env.sock')}`],
        { env: { ...process.env, [name!]: value } });
      expect(badEnv.code, badEnv.stderr).toBe(2);
      expect(badEnv.stderr).toContain(`${name} must be`);
    }
  });

  it('fails clearly when --device names a missing /dev/nbdN (the kernel attach itself needs the nbd module)', async (context) => {
    const devicePath = '/dev/nbd0';
    if (fs.existsSync(devicePath)) {
      // With the module loaded the attach test belongs to engineer A's kernel tests; nothing to prove here.
      console.log(`skipped: ${devicePath} exists, the missing-device error cannot be provoked`);
      context.skip();
    }
    console.log(`kernel attach not testable here: ${devicePath} does not exist (no nbd kernel module); checking the error instead`);
    const socket = path.join(dir, 'dev.sock');
    const result = await runCommand(process.execPath, [path.resolve('bin/drbdts.js'), 'serve', path.join(dir, 'disk.img'),
      '--listen', `unix:${socket}`, '--device', devicePath]);
    expect(result.code).toBe(2);
    expect(result.stderr).toContain(`${devicePath} does not exist`);
    expect(fs.existsSync(socket)).toBe(false);
  });
});
