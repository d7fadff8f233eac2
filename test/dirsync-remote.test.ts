// Remote replicas over tcp:// against a real `drbdts dirsync-server` process: every Replica call round-trips,
// content moves in full, as a delta and as a local copy with the bytes on the wire counted, lz4 shrinks
// compressible data, a wrong or missing secret and a peer speaking garbage fail with clear errors, roots cannot
// escape --root, and a connection cut (proxy) or a server killed with SIGKILL mid-transfer leaves the target
// path with its old content and no temp files.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, mkdir, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { createServer, connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { LocalReplica } from '../src/dirsync/local.js';
import { openRemoteReplica, parseRemoteUrl, type RemoteReplica } from '../src/dirsync/remote.js';
import { ReplicaError, type EntryStat } from '../src/dirsync/replica.js';
import { fingerprintOf } from '../src/dirsync/hash.js';
import { collect, drbdtsBin, startProxy, startServerProcess, writeSecret, type Proxy, type ServerProcess } from './dirsync-remote-helpers.js';

let base: string;
let serverRoot: string;
let localRoot: string;
let secretFile: string;
let server: ServerProcess;
const cleanups: Array<() => Promise<void>> = [];

beforeAll(async () => {
  base = await mkdtemp(join(tmpdir(), 'drbdts-remote-'));
  serverRoot = join(base, 'served');
  localRoot = join(base, 'local');
  await mkdir(join(serverRoot, 'tree'), { recursive: true });
  await mkdir(localRoot);
  secretFile = await writeSecret(base, 'secret', 'correct horse battery staple');
  server = await startServerProcess(serverRoot, ['--secret-file', secretFile]);
});

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

afterAll(async () => {
  await server?.stop();
  await rm(base, { recursive: true, force: true });
});

async function remote(path = 'tree', options: { port?: number; secretFile?: string; compress?: boolean } = {}): Promise<RemoteReplica> {
  const replica = await openRemoteReplica(`tcp://127.0.0.1:${options.port ?? server.port}/${path}`, {
    secretFile: options.secretFile ?? secretFile,
    ...(options.compress === undefined ? {} : { compress: options.compress }),
  });
  cleanups.push(() => replica.close());
  return replica;
}

async function expectCode(promise: Promise<unknown>, code: string, message?: RegExp): Promise<ReplicaError> {
  const error = await promise.then(
    () => undefined,
    (caught: unknown) => caught,
  );
  expect(error, `expected ${code}`).toBeInstanceOf(ReplicaError);
  expect((error as ReplicaError).code).toBe(code);
  if (message) expect((error as ReplicaError).message).toMatch(message);
  return error as ReplicaError;
}

function contentOf(data: Buffer, sizeBytes = data.length) {
  // A ContentSource built by hand, as the engine gets one from the other replica.
  return fingerprintOf(data).then((fingerprint) => ({
    sizeBytes,
    chunks: (async function* () {
      for (let offset = 0; offset < data.length; offset += 1 << 20) yield data.subarray(offset, offset + (1 << 20));
    })(),
    done: Promise.resolve({ fingerprint, statAfter: { kind: 'file', sizeBytes, mtimeMs: 1, ctimeMs: 1, inode: 1, mode: 0o644 } as EntryStat }),
    cancel: () => undefined,
  }));
}

describe('tcp:// replica calls', () => {
  // Proves each Replica operation round-trips through the server and acts on the served directory.
  it('scans, reads, writes, and changes the tree on the server', async () => {
    const dir = join(serverRoot, 'tree');
    await mkdir(join(dir, 'sub dir', 'ünïcödé'), { recursive: true });
    await writeFile(join(dir, 'sub dir', 'ünïcödé', '-leading dash.txt'), 'first');
    await symlink('sub dir/target', join(dir, 'link'));
    const replica = await remote();
    const info = await replica.open();
    expect(info.rootId).toBe(`tcp://127.0.0.1:${server.port}/tree`);

    const entries = [];
    for await (const batch of replica.scan({ ignore: [] })) entries.push(...batch.entries);
    const byPath = new Map(entries.map((entry) => [entry.path, entry]));
    expect(byPath.get('sub dir')?.kind).toBe('dir');
    expect(byPath.get('link')?.linkTarget).toBe('sub dir/target');
    const fileEntry = byPath.get('sub dir/ünïcödé/-leading dash.txt')!;
    expect(fileEntry.sizeBytes).toBe(5);

    const [hashed] = await replica.hashFiles(['sub dir/ünïcödé/-leading dash.txt']);
    expect(hashed!.fingerprint).toBe(await fingerprintOf(Buffer.from('first')));
    const source = await replica.readFile('sub dir/ünïcödé/-leading dash.txt', fileEntry);
    expect((await collect(source.chunks)).toString()).toBe('first');
    expect((await source.done).fingerprint).toBe(hashed!.fingerprint);
    expect((await replica.readRange('sub dir/ünïcödé/-leading dash.txt', 1, 3)).toString()).toBe('irs');

    // Full write of a new file, then a replacement guarded by the scanned stat.
    const data = randomBytes(3 << 20);
    const written = await replica.writeFile({ path: 'new.bin', precondition: 'absent', mode: 0o640, content: { kind: 'full', source: await contentOf(data) } });
    expect((await readFile(join(dir, 'new.bin'))).equals(data)).toBe(true);
    expect((await stat(join(dir, 'new.bin'))).mode & 0o777).toBe(0o640);
    expect(written.fingerprint).toBe(await fingerprintOf(data));

    // A stale precondition fails with the server's code; the file keeps its content.
    await expectCode(
      replica.writeFile({ path: 'new.bin', precondition: 'absent', mode: 0o644, content: { kind: 'full', source: await contentOf(Buffer.from('x')) } }),
      'ECHANGED',
    );
    expect((await readFile(join(dir, 'new.bin'))).equals(data)).toBe(true);

    const made = await replica.mkdir('made', 0o750);
    expect(made.kind).toBe('dir');
    const link = await replica.symlink('made/link', '../new.bin', 'absent');
    expect(link.linkTarget).toBe('../new.bin');
    const renamed = await replica.rename('new.bin', 'made/renamed.bin', written.stat);
    const props = await replica.setProps({ path: 'made/renamed.bin', precondition: renamed, mode: 0o600, mtimeMs: 1_000_000_000_000 });
    expect(props.mode).toBe(0o600);
    expect((await stat(join(dir, 'made', 'renamed.bin'))).mtimeMs).toBe(1_000_000_000_000);
    await replica.remove('made/link', link);
    expect(await replica.stat('made/link')).toBeNull();
    await expectCode(replica.stat('../escape'), 'EPATH');
  });

  // Proves both delta directions send about the changed megabyte only: push (signature from the server, delta
  // computed here, applied there) and pull (signature from here, delta computed on the server).
  it('moves a changed big file as a delta, both directions, counting wire bytes', async () => {
    const size = 24 << 20;
    const old = randomBytes(size);
    const next = Buffer.from(old);
    randomBytes(1 << 20).copy(next, size / 2 + 777);
    await writeFile(join(serverRoot, 'tree', 'big.img'), old);
    await writeFile(join(localRoot, 'big.img'), next);
    const local = new LocalReplica(localRoot);
    const replica = await remote('tree', { compress: false });
    await replica.open();
    const remoteStat = (await replica.stat('big.img'))!;
    const localStat = (await local.stat('big.img'))!;

    const before = replica.counters.bytesSent;
    const signature = await replica.signature('big.img', remoteStat);
    const delta = await local.delta('big.img', localStat, signature);
    await replica.writeFile({
      path: 'big.img', precondition: remoteStat, mode: 0o644, sourceStat: localStat,
      content: { kind: 'delta', basisPath: 'big.img', basisStat: remoteStat, source: delta },
    });
    const pushedBytes = replica.counters.bytesSent - before;
    expect((await readFile(join(serverRoot, 'tree', 'big.img'))).equals(next)).toBe(true);
    expect(pushedBytes).toBeGreaterThan(1 << 20);
    expect(pushedBytes).toBeLessThan((1 << 20) * 1.3);

    // Pull: the server's copy changes again; bring it here as a delta.
    const third = Buffer.from(next);
    randomBytes(1 << 20).copy(third, 4096);
    await writeFile(join(serverRoot, 'tree', 'big.img'), third);
    const remoteStat2 = (await replica.stat('big.img'))!;
    const receivedBefore = replica.counters.bytesReceived;
    const localSignature = await local.signature('big.img', localStat);
    const pulled = await replica.delta('big.img', remoteStat2, localSignature);
    await local.writeFile({
      path: 'big.img', precondition: localStat, mode: 0o644, sourceStat: remoteStat2,
      content: { kind: 'delta', basisPath: 'big.img', basisStat: localStat, source: pulled },
    });
    expect((await readFile(join(localRoot, 'big.img'))).equals(third)).toBe(true);
    expect(replica.counters.bytesReceived - receivedBefore).toBeLessThan((1 << 20) * 1.3);
  });

  // Proves a local copy on the server sends no content, and lz4 shrinks compressible content on the wire.
  it('copies existing content on the server without sending it; compresses text', async () => {
    const text = Buffer.from('The quick brown fox jumps over the lazy dog. '.repeat(200_000));
    const replica = await remote();
    await replica.open();
    let before = replica.counters.bytesSent;
    const first = await replica.writeFile({ path: 'text.txt', precondition: 'absent', mode: 0o644, content: { kind: 'full', source: await contentOf(text) } });
    const textWireBytes = replica.counters.bytesSent - before;
    expect(textWireBytes).toBeLessThan(text.length / 4);
    before = replica.counters.bytesSent;
    await replica.writeFile({
      path: 'copy.txt', precondition: 'absent', mode: 0o644,
      content: { kind: 'local', fromPath: 'text.txt', fromStat: first.stat, fingerprint: first.fingerprint, sizeBytes: text.length },
    });
    expect(replica.counters.bytesSent - before).toBeLessThan(2000);
    expect((await readFile(join(serverRoot, 'tree', 'copy.txt'))).equals(text)).toBe(true);
  });

  // Proves scenario 23 across the wire: a source file modified while it streams to the server (its stat after
  // the read differs from the scanned one) is not installed: ECHANGED, and the target keeps its old content.
  it('refuses content whose source changed during the transfer', async () => {
    const dir = join(serverRoot, 'tree');
    await writeFile(join(dir, 'moving.txt'), 'old target');
    const local = new LocalReplica(localRoot);
    await writeFile(join(localRoot, 'moving.txt'), 'x'.repeat(300_000));
    const scanned = (await local.stat('moving.txt'))!;
    const replica = await remote();
    await replica.open();
    const target = (await replica.stat('moving.txt'))!;
    const source = await local.readFile('moving.txt', scanned);
    // The user edits the source while the engine transfers it.
    await writeFile(join(localRoot, 'moving.txt'), 'y'.repeat(300_001));
    await expectCode(
      replica.writeFile({ path: 'moving.txt', precondition: target, mode: 0o644, sourceStat: scanned, content: { kind: 'full', source } }),
      'ECHANGED',
    );
    expect(await readFile(join(dir, 'moving.txt'), 'utf8')).toBe('old target');
  });

  // Proves a range bigger than one frame (16 MiB) is fetched whole, and a range past the end comes back short.
  it('reads a 20 MiB range in pieces', async () => {
    const data = randomBytes(20 << 20);
    await writeFile(join(serverRoot, 'tree', 'range.bin'), data);
    const replica = await remote();
    await replica.open();
    expect((await replica.readRange('range.bin', 0, data.length)).equals(data)).toBe(true);
    expect((await replica.readRange('range.bin', data.length - 10, 100)).equals(data.subarray(data.length - 10))).toBe(true);
  });

  // Proves tcp:// traffic is encrypted: a recognisable file body and the path name, sent through a capturing
  // proxy, appear nowhere in the captured bytes, while the server receives them intact.
  it('encrypts what crosses the network', async () => {
    const proxy = await startProxy(server.port);
    cleanups.push(() => proxy.close());
    const replica = await remote('tree', { port: proxy.port, compress: false });
    await replica.open();
    const body = Buffer.from('TOP-SECRET-PAYROLL '.repeat(5000));
    await replica.writeFile({ path: 'payroll-2026.csv', precondition: 'absent', mode: 0o600, content: { kind: 'full', source: await contentOf(body) } });
    expect((await readFile(join(serverRoot, 'tree', 'payroll-2026.csv'))).equals(body)).toBe(true);
    const seen = proxy.captured();
    expect(seen.length).toBeGreaterThan(body.length);
    expect(seen.includes(Buffer.from('TOP-SECRET-PAYROLL'))).toBe(false);
    expect(seen.includes(Buffer.from('payroll-2026'))).toBe(false);
    expect(seen.subarray(0, 17).toString()).toBe('DRBDTS-DIRSYNC/1\n'); // only the greeting is in clear
  });

  // Proves many calls multiplex on one connection: 16 concurrent writes all land intact.
  it('runs 16 transfers at once on one connection', async () => {
    const replica = await remote();
    await replica.open();
    await replica.mkdir('many', 0o755);
    const files = Array.from({ length: 16 }, (_, i) => randomBytes(300_000 + i * 50_000));
    await Promise.all(
      files.map(async (data, i) =>
        replica.writeFile({ path: `many/f${i}`, precondition: 'absent', mode: 0o644, content: { kind: 'full', source: await contentOf(data) } }),
      ),
    );
    for (let i = 0; i < files.length; i++) {
      expect((await readFile(join(serverRoot, 'tree', 'many', `f${i}`))).equals(files[i]!)).toBe(true);
    }
  });
});

describe('tcp:// bad input', () => {
  // Proves a wrong secret and a missing secret are refused with messages that say what to do.
  it('refuses a wrong or missing secret', async () => {
    const wrong = await writeSecret(base, 'wrong', 'not the secret');
    await expectCode(remote('tree', { secretFile: wrong }), 'EAUTH', /wrong shared secret/);
    const saved = process.env.DRBDTS_DIRSYNC_SECRET;
    delete process.env.DRBDTS_DIRSYNC_SECRET;
    try {
      await expectCode(openRemoteReplica(`tcp://127.0.0.1:${server.port}/tree`, {}), 'EAUTH', /--secret-file/);
    } finally {
      if (saved !== undefined) process.env.DRBDTS_DIRSYNC_SECRET = saved;
    }
    await expectCode(remote('tree', { secretFile: join(base, 'no-such-file') }), 'EAUTH', /cannot read secret file/);
    // The server is still fine for a client with the right secret.
    const replica = await remote();
    expect((await replica.open()).hostName.length).toBeGreaterThan(0);
  });

  // Proves the server refuses to listen without a secret, naming the options.
  it('dirsync-server without a secret exits 3 with a clear message', () => {
    const env = { ...process.env };
    delete env.DRBDTS_DIRSYNC_SECRET;
    const result = spawnSync(process.execPath, [drbdtsBin, 'dirsync-server', '--listen', '127.0.0.1:0', '--root', base], { env, encoding: 'utf8' });
    expect(result.status).toBe(3);
    expect(result.stderr).toMatch(/shared secret.*--secret-file/);
    const bad = spawnSync(process.execPath, [drbdtsBin, 'dirsync-server', '--listen', 'nonsense', '--root', base, '--secret-file', secretFile], { encoding: 'utf8' });
    expect(bad.status).toBe(3);
    expect(bad.stderr).toMatch(/--listen: "nonsense" is not HOST:PORT/);
  });

  // Proves a client reaching something that is not a dirsync server (here: an ssh banner) fails at once with
  // EPROTO quoting what it got, and a client sending garbage to the server does not disturb the server.
  it('detects a peer speaking garbage, both ways', async () => {
    const fake = createServer((socket) => {
      socket.on('error', () => undefined);
      socket.resume(); // read (and drop) what the client sends, so its hang-up closes this socket
      socket.end('SSH-2.0-OpenSSH_9.2p1 Debian\r\n');
    });
    await new Promise<void>((resolve) => fake.listen(0, '127.0.0.1', resolve));
    cleanups.push(() => new Promise((resolve) => fake.close(() => resolve())));
    const fakePort = (fake.address() as { port: number }).port;
    await expectCode(remote('tree', { port: fakePort }), 'EPROTO', /not a drbdts dirsync peer.*SSH-2\.0/);

    const garbage = connect({ host: '127.0.0.1', port: server.port });
    await new Promise<void>((resolve) => garbage.once('connect', resolve));
    const closed = new Promise<void>((resolve) => garbage.once('close', () => resolve()));
    garbage.on('error', () => undefined);
    garbage.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
    garbage.resume();
    await closed; // the server hung up on it
    const replica = await remote();
    expect((await replica.open()).rootId).toContain('/tree');
  });

  // Proves an authenticated peer sending garbage (calls with bad paths, unknown methods, bad JSON, stray chunks,
  // malformed credit, then a bad frame header and random bytes) cannot crash the server: it answers errors or
  // drops that connection, and keeps serving others. 20 rounds, each cutting the list at a different point.
  it('survives garbage after a successful handshake (20 seeds)', async () => {
    const { createHmac } = await import('node:crypto');
    const frame = (type: number, payload: Buffer, callId = 0): Buffer => {
      const header = Buffer.alloc(12);
      header.writeUInt32BE(payload.length, 0);
      header.writeUInt32BE(callId, 4);
      header[8] = type;
      return Buffer.concat([header, payload]);
    };
    const jsonPayload = (json: unknown): Buffer => {
      const text = Buffer.from(JSON.stringify(json));
      const head = Buffer.alloc(4);
      head.writeUInt32BE(text.length, 0);
      return Buffer.concat([head, text]);
    };
    // TCP framing as wire.ts speaks it: MAGIC in clear both ways, then TLS-PSK keyed from the secret.
    const { connect: tlsConnect } = await import('node:tls');
    const psk = createHmac('sha256', 'correct horse battery staple').update('drbdts-dirsync tls-psk v1').digest();
    const secureConnect = async () => {
      const raw = connect({ host: '127.0.0.1', port: server.port });
      raw.on('error', () => undefined);
      await new Promise<void>((resolve) => raw.once('connect', resolve));
      raw.write('DRBDTS-DIRSYNC/1\n');
      await new Promise<void>((resolve) => {
        const onReadable = (): void => {
          if (raw.readableLength >= 17) {
            raw.off('readable', onReadable);
            raw.read(17);
            resolve();
          }
        };
        raw.on('readable', onReadable);
      });
      const secured = tlsConnect({
        socket: raw,
        ciphers: 'PSK-AES256-GCM-SHA384',
        minVersion: 'TLSv1.2',
        maxVersion: 'TLSv1.2',
        checkServerIdentity: () => undefined,
        pskCallback: () => ({ psk, identity: 'drbdts-dirsync/1' }),
      });
      await new Promise<void>((resolve) => secured.once('secureConnect', () => resolve()));
      return secured;
    };
    for (let seed = 1; seed <= 20; seed++) {
      const socket = await secureConnect();
      socket.on('error', () => undefined);
      let received = Buffer.alloc(0);
      socket.on('data', (chunk: Buffer) => (received = Buffer.concat([received, chunk])));
      const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
      // Wait for MAGIC (17 bytes) + the HELLO frame, then answer the challenge properly.
      for (let i = 0; i < 100 && (received.length < 29 || received.length < 29 + received.readUInt32BE(17)); i++) {
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      const helloJson = JSON.parse(received.subarray(33, 29 + received.readUInt32BE(17)).toString()) as { nonce: string };
      const clientNonce = randomBytes(32).toString('hex');
      const mac = createHmac('sha256', 'correct horse battery staple')
        .update(`drbdts-dirsync client\n${helloJson.nonce}\n${clientNonce}`)
        .digest('hex');
      socket.write(Buffer.from('DRBDTS-DIRSYNC/1\n'));
      socket.write(frame(2, jsonPayload({ nonce: clientNonce, mac })));
      const garbage = [
        frame(5, jsonPayload({ method: 'open', args: { path: 'tree' } }), 1), // a valid call first
        frame(5, jsonPayload({ method: 'stat', args: { path: '../../etc/passwd' } }), 2),
        frame(5, jsonPayload({ method: 'nonsense', args: null }), 3),
        frame(5, Buffer.from('not json at all'), 4),
        frame(8, randomBytes(100), 77), // a chunk for no stream
        frame(11, Buffer.alloc(2), 5), // a malformed credit
        // A frame header with an unknown type, then random bytes.
        Buffer.concat([Buffer.from([0, 0, 0, 8, 0, 0, 0, 1, 200, 0, 0, 0]), randomBytes(64 + seed * 37)]),
      ];
      socket.write(Buffer.concat(garbage.slice(0, 2 + (seed % 6))));
      socket.write(garbage[garbage.length - 1]!);
      await closed; // the server hangs up on the garbage
      socket.destroy();
    }
    const replica = await remote();
    expect((await replica.open()).rootId).toContain('/tree');
    expect(server.child.exitCode).toBeNull();
  });

  // Proves roots are confined to --root: "..", a symlink leading outside, and a missing root are refused.
  it('keeps roots inside --root', async () => {
    expect(() => parseRemoteUrl('tcp://127.0.0.1:1/../etc')).toThrow(/"\." or "\.\."/);
    expect(() => parseRemoteUrl('tcp://127.0.0.1/x')).toThrow(/needs a port/);
    await symlink(base, join(serverRoot, 'outside'));
    const escaping = await remote('outside');
    await expectCode(escaping.open(), 'ENOROOT', /outside the served directory/);
    const missing = await remote('does/not/exist');
    await expectCode(missing.open(), 'ENOROOT', /does not exist/);

    // A client cannot use a symlink it made inside the tree to reach outside: paths through it are refused.
    const replica = await remote();
    await replica.open();
    await replica.symlink('via-link', base, 'absent');
    await expectCode(
      replica.writeFile({ path: 'via-link/pwned.txt', precondition: 'absent', mode: 0o644, content: { kind: 'full', source: await contentOf(Buffer.from('x')) } }),
      'EPATH',
      /goes through the symlink via-link/,
    );
    await expectCode(replica.hashFiles(['via-link/secret']), 'EPATH');
    await expectCode(replica.mkdir('via-link/dir', 0o755), 'EPATH');
    expect((await readdir(base)).includes('pwned.txt')).toBe(false);
  });
});

describe('tcp:// failures mid-transfer', () => {
  async function oldContentSurvives(cutter: (proxy: Proxy) => Promise<void> | void, path: string): Promise<void> {
    const dir = join(serverRoot, 'tree');
    const old = randomBytes(1 << 20);
    await writeFile(join(dir, path), old);
    const proxy = await startProxy(server.port, 6 << 20);
    cleanups.push(() => proxy.close());
    const replica = await remote('tree', { port: proxy.port, compress: false });
    await replica.open();
    const scanned = (await replica.stat(path))!;
    const transfer = replica.writeFile({
      path, precondition: scanned, mode: 0o644, content: { kind: 'full', source: await contentOf(randomBytes(32 << 20)) },
    });
    await cutter(proxy);
    await expectCode(transfer, 'ECONN');
    expect((await readFile(join(dir, path))).equals(old)).toBe(true);
    // The server removes its temp file once it notices the connection is gone.
    for (let attempt = 0; attempt < 50; attempt++) {
      const names = await readdir(dir);
      if (!names.some((name) => name.includes('.drbdts-tmp-'))) return;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    throw new Error(`temp file left in ${dir}: ${(await readdir(dir)).join(', ')}`);
  }

  // Proves a connection broken after 6 MiB of a 32 MiB upload fails the write with ECONN; the old content stays.
  it('a cut connection leaves the old content and no temp file', async () => {
    await oldContentSurvives(() => undefined, 'cut.bin');
  });

  // Proves a black-holed path (proxy drops everything, connections stay open) is noticed by the ping timeout
  // (2 s here) instead of hanging: the pending write fails with ECONN and the old content stays.
  it('a black-holed connection times out instead of hanging', async () => {
    const dir = join(serverRoot, 'tree');
    const old = randomBytes(1 << 20);
    await writeFile(join(dir, 'holed.bin'), old);
    const proxy = await startProxy(server.port);
    cleanups.push(() => proxy.close());
    const replica = await openRemoteReplica(`tcp://127.0.0.1:${proxy.port}/tree`, { secretFile, compress: false, peerTimeoutMs: 2000 });
    cleanups.push(() => replica.close());
    await replica.open();
    const scanned = (await replica.stat('holed.bin'))!;
    proxy.blackHole();
    await expectCode(
      replica.writeFile({ path: 'holed.bin', precondition: scanned, mode: 0o644, content: { kind: 'full', source: await contentOf(randomBytes(8 << 20)) } }),
      'ECONN',
      /did not answer for 2000 ms/,
    );
    expect((await readFile(join(dir, 'holed.bin'))).equals(old)).toBe(true);
  });

  // Proves the whole CLI run survives losing its server: SIGKILL of dirsync-server while `drbdts dirsync` copies
  // 1500 files gives exit 2 (paths failed) or 3 (run aborted on the lost connection), never 0 and never a torn
  // file, and a rerun against a new server converges to identical trees with no temp files left.
  it('a sync run whose server is SIGKILLed fails safely and the rerun converges', async () => {
    const local = join(base, 'kill-local');
    const served = join(base, 'kill-served');
    await mkdir(local);
    await mkdir(join(served, 'root'), { recursive: true });
    for (let d = 0; d < 15; d++) {
      await mkdir(join(local, `d${d}`));
      for (let f = 0; f < 100; f++) await writeFile(join(local, `d${d}`, `f${f}`), randomBytes(20_000));
    }
    const victim = await startServerProcess(served, ['--secret-file', secretFile]);
    cleanups.push(() => victim.stop());
    const argv = (port: number) => [
      drbdtsBin, 'dirsync', local, `tcp://127.0.0.1:${port}/root`, '--batch', '--archive-dir', join(base, 'kill-archive'), '--secret-file', secretFile,
    ];
    const { spawn } = await import('node:child_process');
    const run = spawn(process.execPath, argv(victim.port), { stdio: ['ignore', 'ignore', 'pipe'] });
    let runStderr = '';
    run.stderr!.setEncoding('utf8').on('data', (text: string) => (runStderr = (runStderr + text).slice(-2000)));
    const exitCode = new Promise<number | null>((resolve) => run.once('exit', (code) => resolve(code)));
    // Kill the server once some files have arrived (count them, not the clock).
    for (let i = 0; i < 600; i++) {
      const dirs = await readdir(join(served, 'root')).catch(() => []);
      if (dirs.length >= 3) break;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    victim.child.kill('SIGKILL');
    expect([2, 3], runStderr).toContain(await exitCode);

    const again = await startServerProcess(served, ['--secret-file', secretFile]);
    cleanups.push(() => again.stop());
    const rerun = spawnSync(process.execPath, argv(again.port), { encoding: 'utf8', timeout: 120_000 });
    expect(rerun.status, rerun.stderr).toBe(0);
    for (let d = 0; d < 15; d++) {
      const names = await readdir(join(served, 'root', `d${d}`));
      expect(names.filter((name) => name.includes('.drbdts-tmp-'))).toEqual([]);
      expect(names.length).toBe(100);
      for (const name of names.slice(0, 5)) {
        expect((await readFile(join(served, 'root', `d${d}`, name))).equals(await readFile(join(local, `d${d}`, name)))).toBe(true);
      }
    }
  });

  // Proves a server killed with SIGKILL mid-upload leaves the old content; a new server serves the tree again.
  it('a server killed with SIGKILL leaves the old content', async () => {
    const dir = join(serverRoot, 'tree');
    const old = randomBytes(1 << 20);
    await writeFile(join(dir, 'killed.bin'), old);
    const victim = await startServerProcess(serverRoot, ['--secret-file', secretFile]);
    cleanups.push(() => victim.stop());
    const replica = await remote('tree', { port: victim.port, compress: false });
    await replica.open();
    const scanned = (await replica.stat('killed.bin'))!;
    let sent = 0;
    const data = randomBytes(64 << 20);
    const fingerprint = await fingerprintOf(data);
    const transfer = replica.writeFile({
      path: 'killed.bin', precondition: scanned, mode: 0o644,
      content: {
        kind: 'full',
        source: {
          sizeBytes: data.length,
          chunks: (async function* () {
            for (let offset = 0; offset < data.length; offset += 1 << 20) {
              sent += 1 << 20;
              if (sent === 8 << 20) victim.child.kill('SIGKILL');
              yield data.subarray(offset, offset + (1 << 20));
            }
          })(),
          done: Promise.resolve({ fingerprint, statAfter: scanned }),
          cancel: () => undefined,
        },
      },
    });
    await expectCode(transfer, 'ECONN');
    expect((await readFile(join(dir, 'killed.bin'))).equals(old)).toBe(true);
  });
});
