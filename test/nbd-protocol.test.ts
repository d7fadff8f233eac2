// What this file proves: the NBD server answers every handshake option and every transmission request as
// doc/proto.md says, including malformed and hostile ones (error replies with the right errno, drained
// payloads, disconnects where the spec allows them), that replies come back out of order with many requests
// in flight, that the in-flight budget pauses reading (backpressure), and that DISC and close() finish
// in-flight work first. How: a real NbdServer on a unix socket in front of an in-memory device, driven by a
// raw client that writes exact bytes (test/helpers/nbd.ts) -- the real-client tests are nbd-clients.test.ts.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { MemoryDevice } from './helpers/memory-device.js';
import * as tls from 'node:tls';
import { makeCertificates, makeTempDir, NBD, RawNbdClient, startServer, type InProcessServer } from './helpers/nbd.js';
import type { NbdServerOptions } from '../src/nbd/server.js';

const sizeBytes = 8 * 1024 * 1024;
let dir: string;
let device: MemoryDevice;
let served: InProcessServer | null;
const clients: RawNbdClient[] = [];

async function serve(options: Omit<NbdServerOptions, 'device'> = {}): Promise<InProcessServer> {
  served = await startServer(dir, device, options);
  return served;
}
async function connect(): Promise<RawNbdClient> {
  const client = await RawNbdClient.connect(served!.socketPath);
  clients.push(client);
  return client;
}
async function expectClosed(client: RawNbdClient): Promise<void> {
  await expect(client.read(1, 5000)).rejects.toThrow(/closed/);
}

beforeEach(async () => {
  dir = await makeTempDir('nbd-protocol');
  device = new MemoryDevice(sizeBytes);
  served = null;
});
afterEach(async () => {
  for (const client of clients.splice(0)) client.close();
  await served?.server.close();
  await fs.promises.rm(dir, { recursive: true, force: true });
});

describe('handshake', () => {
  it('greets fixed newstyle + no zeroes and drops a client that sets unknown flags', async () => {
    await serve();
    const client = await connect();
    expect(await client.greet(0x80000003)).toBe(3);
    await expectClosed(client);
  });

  it('answers an unknown option with ERR_UNSUP and keeps the stream in sync', async () => {
    await serve();
    const client = await connect();
    await client.greet();
    client.sendOption(4242, Buffer.from('some data the server must skip'));
    const [reply] = await client.readOptionReplies();
    expect(reply!.type).toBe(NBD.REP_ERR_UNSUP);
    expect(reply!.option).toBe(4242);
    client.sendOption(NBD.OPT_GO, RawNbdClient.goData('', []));
    const replies = await client.readOptionReplies();
    expect(replies.at(-1)!.type).toBe(NBD.REP_ACK);
  });

  it('drains over-long option data with ERR_TOO_BIG, and disconnects past the hard limit', async () => {
    await serve({ limits: { optionDataMaxBytes: 1024, optionDataDisconnectBytes: 1024 * 1024 } });
    const client = await connect();
    await client.greet();
    client.sendOption(NBD.OPT_INFO, Buffer.alloc(200_000, 7));
    expect((await client.readOptionReplies())[0]!.type).toBe(NBD.REP_ERR_TOO_BIG);
    client.sendOption(NBD.OPT_LIST);
    expect((await client.readOptionReplies()).map((reply) => reply.type)).toEqual([NBD.REP_SERVER, NBD.REP_ACK]);
    // Announcing 2 MiB of option data (without sending it) is past optionDataDisconnectBytes: closed at once.
    client.sendOption(NBD.OPT_INFO, Buffer.alloc(0), 2 * 1024 * 1024);
    await expectClosed(client);
  });

  it('disconnects after too many options and on a bad option magic', async () => {
    await serve({ limits: { optionCountMax: 5 } });
    const client = await connect();
    await client.greet();
    for (let index = 0; index < 5; index += 1) {
      client.sendOption(NBD.OPT_LIST);
      await client.readOptionReplies();
    }
    client.sendOption(NBD.OPT_LIST);
    await expectClosed(client);

    const other = await connect();
    await other.greet();
    other.write(Buffer.alloc(16, 0x41));
    await expectClosed(other);
  });

  it('answers GO/INFO for an unknown export with ERR_UNKNOWN and malformed data with ERR_INVALID', async () => {
    await serve({ exportName: 'disk0', description: 'a test disk' });
    const client = await connect();
    await client.greet();
    client.sendOption(NBD.OPT_GO, RawNbdClient.goData('nope', []));
    const [unknown] = await client.readOptionReplies();
    expect(unknown!.type).toBe(NBD.REP_ERR_UNKNOWN);
    expect(unknown!.data.toString()).toContain('nope');
    const bad = RawNbdClient.goData('disk0', [1, 2]).subarray(0, 12); // count says 2, one u16 missing
    client.sendOption(NBD.OPT_INFO, bad);
    expect((await client.readOptionReplies())[0]!.type).toBe(NBD.REP_ERR_INVALID);
    client.sendOption(NBD.OPT_INFO, RawNbdClient.goData('disk0', [1, 2, 3]));
    const info = await client.readOptionReplies();
    const types = info.filter((reply) => reply.type === NBD.REP_INFO).map((reply) => reply.data.readUInt16BE(0));
    expect(types.sort()).toEqual([0, 1, 2, 3]);
    const name = info.find((reply) => reply.type === NBD.REP_INFO && reply.data.readUInt16BE(0) === 1)!;
    expect(name.data.subarray(2).toString()).toBe('disk0');
    const blockSize = info.find((reply) => reply.type === NBD.REP_INFO && reply.data.readUInt16BE(0) === 3)!;
    expect([blockSize.data.readUInt32BE(2), blockSize.data.readUInt32BE(6), blockSize.data.readUInt32BE(10)])
      .toEqual([1, 4096, 32 * 1024 * 1024]);
  });

  it('lists the export, and lists/sets base:allocation only after STRUCTURED_REPLY', async () => {
    await serve({ exportName: 'disk0' });
    const client = await connect();
    await client.greet();
    client.sendOption(NBD.OPT_LIST);
    const [server] = await client.readOptionReplies();
    expect(server!.type).toBe(NBD.REP_SERVER);
    expect(server!.data.subarray(4, 4 + server!.data.readUInt32BE(0)).toString()).toBe('disk0');
    client.sendOption(NBD.OPT_LIST_META_CONTEXT, RawNbdClient.metaContextData('disk0', []));
    expect((await client.readOptionReplies())[0]!.type).toBe(NBD.REP_ERR_INVALID);
    client.sendOption(NBD.OPT_STRUCTURED_REPLY);
    expect((await client.readOptionReplies())[0]!.type).toBe(NBD.REP_ACK);
    client.sendOption(NBD.OPT_STRUCTURED_REPLY);
    expect((await client.readOptionReplies())[0]!.type).toBe(NBD.REP_ERR_INVALID);
    client.sendOption(NBD.OPT_LIST_META_CONTEXT, RawNbdClient.metaContextData('disk0', ['base:']));
    const listed = await client.readOptionReplies();
    expect(listed[0]!.type).toBe(NBD.REP_META_CONTEXT);
    expect(listed[0]!.data.subarray(4).toString()).toBe('base:allocation');
    client.sendOption(NBD.OPT_SET_META_CONTEXT, RawNbdClient.metaContextData('disk0', ['qemu:dirty-bitmap:x', 'base:allocation']));
    const set = await client.readOptionReplies();
    expect(set.map((reply) => reply.type)).toEqual([NBD.REP_META_CONTEXT, NBD.REP_ACK]);
    expect(set[0]!.data.readUInt32BE(0)).not.toBe(0);
    client.sendOption(NBD.OPT_SET_META_CONTEXT, RawNbdClient.metaContextData('other', ['base:allocation']));
    expect((await client.readOptionReplies())[0]!.type).toBe(NBD.REP_ERR_UNKNOWN);
  });

  it('serves EXPORT_NAME (with and without zero padding) and disconnects for an unknown name', async () => {
    await serve({ exportName: 'disk0' });
    const withZeroes = await connect();
    await withZeroes.greet(1);
    withZeroes.sendOption(NBD.OPT_EXPORT_NAME, Buffer.from('disk0'));
    const reply = await withZeroes.read(134);
    expect(Number(reply.readBigUInt64BE(0))).toBe(sizeBytes);
    expect(reply.subarray(10).every((byte) => byte === 0)).toBe(true);
    withZeroes.request(NBD.CMD_READ, 0, 9n, 0, 512);
    expect((await withZeroes.readReply(512)).error).toBe(0);

    const unknown = await connect();
    await unknown.greet();
    unknown.sendOption(NBD.OPT_EXPORT_NAME, Buffer.from('nope'));
    await expectClosed(unknown);
  });

  it('takes over a stale unix socket but refuses a live one or a regular file', async () => {
    const { socketPath } = await serve();
    const second = new MemoryDevice(4096);
    const { NbdServer } = await import('../src/nbd/server.js');
    const other = new NbdServer({ device: second });
    await expect(other.listen({ kind: 'unix', path: socketPath })).rejects.toThrow(/another server is listening/);
    const file = path.join(dir, 'plain-file');
    fs.writeFileSync(file, 'keep me');
    await expect(other.listen({ kind: 'unix', path: file })).rejects.toThrow(/not a socket/);
    expect(fs.readFileSync(file, 'utf8')).toBe('keep me');
    // A socket file nobody listens on (a crashed server's) is replaced.
    const stale = path.join(dir, 'stale.sock');
    const crashed = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(stale)}, () => console.log('up'))`]);
    await new Promise((resolve) => crashed.stdout.once('data', resolve));
    crashed.kill('SIGKILL'); // a killed process leaves its socket file behind
    await new Promise((resolve) => crashed.once('exit', resolve));
    expect(fs.existsSync(stale)).toBe(true);
    await other.listen({ kind: 'unix', path: stale });
    await other.close();
  });

  it('acknowledges ABORT and closes; refuses GO with the device\'s reason', async () => {
    await serve();
    const client = await connect();
    await client.greet();
    client.sendOption(NBD.OPT_ABORT);
    expect((await client.readOptionReply()).type).toBe(NBD.REP_ACK);
    await expectClosed(client);

    device.exportRefusal = () => 'this node is Secondary';
    const refused = await connect();
    await refused.greet();
    refused.sendOption(NBD.OPT_GO, RawNbdClient.goData('', []));
    const [reply] = await refused.readOptionReplies();
    expect(reply!.type).toBe(NBD.REP_ERR_POLICY);
    expect(reply!.data.toString()).toBe('this node is Secondary');
  });
});

describe('TLS', () => {
  it('answers nothing but STARTTLS in the clear, then negotiates inside TLS', async () => {
    const { certPath, keyPath } = await makeCertificates(dir);
    await serve({ exportName: 'secret', tls: { certPath, keyPath } });
    const client = await connect();
    await client.greet();
    for (const option of [NBD.OPT_LIST, NBD.OPT_INFO, NBD.OPT_GO, NBD.OPT_STRUCTURED_REPLY, 4242]) {
      client.sendOption(option, option === NBD.OPT_LIST || option === NBD.OPT_STRUCTURED_REPLY ? Buffer.alloc(0) : RawNbdClient.goData('secret'));
      const [reply] = await client.readOptionReplies();
      expect(reply!.type, `option ${option}`).toBe(NBD.REP_ERR_TLS_REQD);
      expect(reply!.data.toString()).not.toContain('secret');
    }
    client.sendOption(NBD.OPT_STARTTLS);
    expect((await client.readOptionReply()).type).toBe(NBD.REP_ACK);
    // Continue the same TCP stream inside TLS, as libnbd does, and finish the handshake there.
    client.socket.removeAllListeners('data');
    const secure = tls.connect({ socket: client.socket, ca: fs.readFileSync(path.join(dir, 'ca-cert.pem')), servername: 'localhost' });
    await new Promise<void>((resolve, reject) => secure.once('secureConnect', resolve).once('error', reject));
    const received: Buffer[] = [];
    secure.on('data', (chunk: Buffer) => received.push(chunk));
    const readSecure = async (lengthBytes: number): Promise<Buffer> => {
      for (let wait = 0; wait < 200 && Buffer.concat(received).length < lengthBytes; wait += 1) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      const all = Buffer.concat(received);
      received.length = 0;
      received.push(all.subarray(lengthBytes));
      return all.subarray(0, lengthBytes);
    };
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(NBD.IHAVEOPT, 0);
    header.writeUInt32BE(NBD.OPT_LIST, 8);
    secure.write(header);
    const server = await readSecure(20);
    expect(server.readUInt32BE(12)).toBe(NBD.REP_SERVER);
    const name = await readSecure(server.readUInt32BE(16));
    expect(name.subarray(4).toString()).toBe('secret');
    expect((await readSecure(20)).readUInt32BE(12)).toBe(NBD.REP_ACK);
    // A second STARTTLS inside TLS is invalid.
    header.writeUInt32BE(NBD.OPT_STARTTLS, 8);
    secure.write(header);
    const again = await readSecure(20);
    expect(again.readUInt32BE(12)).toBe(NBD.REP_ERR_INVALID);
    await readSecure(again.readUInt32BE(16));
    secure.destroy();
  });

  it('drops EXPORT_NAME sent before STARTTLS', async () => {
    const { certPath, keyPath } = await makeCertificates(dir);
    await serve({ tls: { certPath, keyPath } });
    const client = await connect();
    await client.greet();
    client.sendOption(NBD.OPT_EXPORT_NAME, Buffer.alloc(0));
    await expectClosed(client);
  });
});

describe('transmission', () => {
  it('rejects out-of-range, read-only-violating, unknown and ill-flagged requests with the spec errno', async () => {
    await serve();
    const client = await connect();
    const { flags } = await client.handshake();
    expect(flags & 0x2).toBe(0);
    const checks: Array<[number, number, number, number, Buffer | undefined, number]> = [
      [NBD.CMD_READ, 0, sizeBytes - 100, 200, undefined, NBD.EINVAL],
      [NBD.CMD_WRITE, 0, sizeBytes - 100, 200, Buffer.alloc(200, 1), NBD.ENOSPC],
      [NBD.CMD_TRIM, 0, sizeBytes, 1, undefined, NBD.EINVAL],
      [NBD.CMD_WRITE_ZEROES, 0, sizeBytes - 1, 2, undefined, NBD.ENOSPC],
      [NBD.CMD_BLOCK_STATUS, 0, 0, 4096, undefined, NBD.EINVAL], // no meta context negotiated
      [NBD.CMD_READ, NBD.FLAG_DF, 0, 4096, undefined, NBD.EINVAL], // DF needs structured replies
      [NBD.CMD_READ, 0x80, 0, 4096, undefined, NBD.EINVAL], // unknown flag
      [NBD.CMD_WRITE, NBD.FLAG_NO_HOLE, 0, 16, Buffer.alloc(16), NBD.EINVAL],
      [NBD.CMD_FLUSH, 0, 10, 0, undefined, NBD.EINVAL],
      [99, 0, 0, 0, undefined, NBD.EINVAL],
      [NBD.CMD_READ, 0, 0, 0, undefined, NBD.EINVAL],
    ];
    let cookie = 1n;
    for (const [type, flags, offset, length, payload] of checks) client.request(type, flags, cookie++, offset, length, payload);
    for (let index = 0; index < checks.length; index += 1) {
      const reply = await client.readReply();
      expect(reply.error, `request ${reply.cookie}`).toBe(checks[Number(reply.cookie) - 1]![5]);
    }
    // Offset 2^64-1: in no export's range, and no overflow into a valid one.
    client.request(NBD.CMD_READ, 0, 77n, 0xffffffffffffffffn, 1);
    expect((await client.readReply()).error).toBe(NBD.EINVAL);
    // The rejected payloads were drained: a valid write and read-back still work on this connection.
    client.request(NBD.CMD_WRITE, NBD.FLAG_FUA, 0xffffffffffffffffn, 4096, 5, Buffer.from('hello'));
    const written = await client.readReply();
    expect(written.error).toBe(0);
    expect(written.cookie).toBe(0xffffffffffffffffn);
    client.request(NBD.CMD_READ, 0, 5n, 4096, 5);
    expect((await client.readReply(5)).data.toString()).toBe('hello');
    expect(device.calls.write).toBe(1);
  });

  it('refuses writes on a read-only export with EPERM and drains the payload', async () => {
    await serve({ readOnly: true });
    const client = await connect();
    const { flags } = await client.handshake();
    expect(flags & 0x2).toBe(2);
    client.request(NBD.CMD_WRITE, 0, 1n, 0, 65536, Buffer.alloc(65536, 0x25609513 & 0xff));
    client.request(NBD.CMD_TRIM, 0, 2n, 0, 4096);
    client.request(NBD.CMD_WRITE_ZEROES, 0, 3n, 0, 4096);
    client.request(NBD.CMD_READ, 0, 4n, 0, 16);
    const errors = new Map<bigint, number>();
    for (let index = 0; index < 4; index += 1) {
      const reply = await client.readReply(16);
      errors.set(reply.cookie, reply.error);
    }
    expect([...errors.entries()].sort()).toEqual([[1n, NBD.EPERM], [2n, NBD.EPERM], [3n, NBD.EPERM], [4n, 0]]);
    expect(device.calls.write + device.calls.trim + device.calls.zero).toBe(0);
  });

  it('drains an oversized WRITE with EINVAL and disconnects one beyond any limit, without touching others', async () => {
    await serve({ limits: { payloadMaxBytes: 64 * 1024, writeDisconnectBytes: 1024 * 1024 } });
    const bystander = await connect();
    await bystander.handshake();
    const client = await connect();
    await client.handshake();
    client.request(NBD.CMD_WRITE, 0, 1n, 0, 100_000, Buffer.alloc(100_000));
    expect((await client.readReply()).error).toBe(NBD.EINVAL);
    client.request(NBD.CMD_READ, 0, 2n, 0, 100_000);
    expect((await client.readReply()).error).toBe(NBD.EINVAL);
    client.request(NBD.CMD_WRITE, 0, 3n, 0, 0xffffffff); // 4 GiB announced, nothing sent
    await expectClosed(client);
    const garbage = await connect();
    await garbage.handshake();
    garbage.write(Buffer.alloc(28, 0xee)); // bad request magic
    await expectClosed(garbage);
    bystander.request(NBD.CMD_WRITE, 0, 4n, 0, 4, Buffer.from('ok!!'));
    expect((await bystander.readReply()).error).toBe(0);
    expect(device.data.subarray(0, 4).toString()).toBe('ok!!');
  });

  it('maps device failures to NBD errors, in structured chunks for READ', async () => {
    await serve();
    device.failWrites = 'ENOSPC';
    const client = await connect();
    await client.handshake({ structured: true });
    client.request(NBD.CMD_WRITE, 0, 1n, 0, 8, Buffer.alloc(8));
    const reply = await client.readReply();
    expect(reply.structured).toBe(false); // non-READ commands keep simple replies
    expect(reply.error).toBe(NBD.ENOSPC);
    client.request(NBD.CMD_READ, 0, 2n, sizeBytes, 8);
    const readError = await client.readReply();
    expect(readError.structured).toBe(true);
    expect(readError.chunkType).toBe(0x8001);
    expect(readError.chunkFlags & 1).toBe(1);
    expect(readError.error).toBe(NBD.EINVAL);
  });

  it('answers READ with one OFFSET_DATA chunk and BLOCK_STATUS with clipped base:allocation extents', async () => {
    await serve();
    device.data.write('structured', 100_000);
    await device.write(0, Buffer.alloc(8192, 1), false); // pages 0-1 allocated, the rest a hole
    const client = await connect();
    const { flags } = await client.handshake({ structured: true, baseAllocation: true });
    expect(flags & 0x80).toBe(0x80); // SEND_DF
    client.request(NBD.CMD_READ, NBD.FLAG_DF, 1n, 100_000, 10);
    const read = await client.readReply();
    expect([read.chunkType, read.chunkFlags]).toEqual([1, 1]);
    expect(Number(read.data.readBigUInt64BE(0))).toBe(100_000);
    expect(read.data.subarray(8).toString()).toBe('structured');
    client.request(NBD.CMD_BLOCK_STATUS, 0, 2n, 4096, 16384);
    const status = await client.readReply();
    expect(status.chunkType).toBe(5);
    expect(status.data.readUInt32BE(0)).toBe(1);
    const extents = [];
    for (let position = 4; position < status.data.length; position += 8) {
      extents.push([status.data.readUInt32BE(position), status.data.readUInt32BE(position + 4)]);
    }
    expect(extents).toEqual([[4096, 0], [12288, 3]]);
    client.request(NBD.CMD_BLOCK_STATUS, NBD.FLAG_REQ_ONE, 3n, 4096, 16384);
    expect((await client.readReply()).data.length).toBe(4 + 8);
  });

  it('keeps many requests in flight and replies out of order', async () => {
    await serve();
    const client = await connect();
    await client.handshake();
    let delayIndex = 0;
    // Alternate slow and fast completions so replies must overtake each other.
    const originalRead = device.read.bind(device);
    device.read = async (offset, target) => {
      const wait = (delayIndex++ % 2) === 0 ? 40 : 0;
      await new Promise((resolve) => setTimeout(resolve, wait));
      return originalRead(offset, target);
    };
    for (let index = 0; index < 64; index += 1) device.data.writeUInt32BE(index, index * 4096);
    for (let index = 0; index < 64; index += 1) client.request(NBD.CMD_READ, 0, BigInt(index), index * 4096, 4096);
    const order: number[] = [];
    for (let index = 0; index < 64; index += 1) {
      const reply = await client.readReply(4096);
      expect(reply.error).toBe(0);
      expect(reply.data.readUInt32BE(0)).toBe(Number(reply.cookie));
      order.push(Number(reply.cookie));
    }
    expect(new Set(order).size).toBe(64);
    expect(order).not.toEqual([...order].sort((a, b) => a - b));
  });

  it('stops reading a connection past its in-flight byte budget (backpressure)', async () => {
    await serve({ limits: { connectionInFlightBytesMax: 64 * 1024 } });
    device.delayMs = 20;
    const client = await connect();
    await client.handshake();
    const payload = Buffer.alloc(16 * 1024, 0xaa);
    for (let index = 0; index < 100; index += 1) client.request(NBD.CMD_WRITE, 0, BigInt(index), index * 16384, 16384, payload);
    for (let index = 0; index < 100; index += 1) expect((await client.readReply()).error).toBe(0);
    // The budget is checked before each request: at most 64 KiB / 16 KiB = 4 writes at the device at once.
    expect(device.inFlightMax).toBeLessThanOrEqual(4);
    expect(device.inFlightMax).toBeGreaterThan(1);
    expect(device.data.subarray(0, 100 * 16384).every((byte) => byte === 0xaa)).toBe(true);
  });

  it('stops reading a client that does not read its replies, then serves it all once it does', async () => {
    await serve({ limits: { connectionInFlightBytesMax: 1024 * 1024 } });
    const client = await connect();
    await client.handshake();
    client.socket.pause(); // the client reads nothing: replies pile up in the socket, then in the server
    const count = 2000;
    for (let index = 0; index < count; index += 1) client.request(NBD.CMD_READ, 0, BigInt(index), (index % 100) * 65536, 65536);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    // READ replies count against the budget until they have left: 1 MiB / 64 KiB plus what the kernel's
    // socket buffers absorbed -- far below the 2000 requests (125 MiB of replies) the client asked for.
    expect(device.calls.read).toBeLessThan(100);
    client.socket.resume();
    const seen = new Set<bigint>();
    for (let index = 0; index < count; index += 1) {
      const reply = await client.readReply(65536);
      expect(reply.error).toBe(0);
      seen.add(reply.cookie);
    }
    expect(seen.size).toBe(count);
  });

  it('shares the server-wide budget between connections', async () => {
    await serve({ limits: { serverInFlightBytesMax: 32 * 1024 } });
    device.delayMs = 20;
    const clientsHere = [await connect(), await connect(), await connect()];
    for (const client of clientsHere) await client.handshake();
    clientsHere.forEach((client, which) => {
      for (let index = 0; index < 20; index += 1) {
        client.request(NBD.CMD_WRITE, 0, BigInt(index), (which * 20 + index) * 8192, 8192, Buffer.alloc(8192, which + 1));
      }
    });
    for (const client of clientsHere) for (let index = 0; index < 20; index += 1) expect((await client.readReply()).error).toBe(0);
    // Each connection may start one request past a full budget before it pauses: 32 KiB / 8 KiB + 3.
    expect(device.inFlightMax).toBeLessThanOrEqual(7);
    expect(device.data[(2 * 20 + 19) * 8192]).toBe(3);
  });

  it('finishes in-flight writes before closing on DISC, and close() flushes after draining', async () => {
    await serve();
    device.delayMs = 50;
    const client = await connect();
    await client.handshake();
    client.request(NBD.CMD_WRITE, 0, 1n, 0, 4, Buffer.from('disc'));
    client.request(NBD.CMD_DISC, 0, 2n, 0, 0);
    expect((await client.readReply()).error).toBe(0);
    await client.closed;
    expect(device.data.subarray(0, 4).toString()).toBe('disc');

    const second = await connect();
    await second.handshake();
    second.request(NBD.CMD_WRITE, 0, 3n, 8, 5, Buffer.from('close'));
    await new Promise((resolve) => setTimeout(resolve, 10));
    const flushesBefore = device.calls.flush;
    const closing = served!.server.close();
    expect((await second.readReply()).error).toBe(0);
    await closing;
    served = null;
    expect(device.data.subarray(8, 13).toString()).toBe('close');
    expect(device.calls.flush).toBe(flushesBefore + 1);
    await second.closed;
  });

  it('serves an adopted socket in the transmission phase with simple replies (the kernel client path)', async () => {
    const { server } = await serve();
    const pairPath = path.join(dir, 'pair.sock');
    const accepted = new Promise<net.Socket>((resolve) => {
      const listener = net.createServer((socket) => {
        listener.close();
        resolve(socket);
      });
      listener.listen(pairPath);
    });
    const clientSocket = net.createConnection(pairPath);
    server.adoptTransmissionSocket(await accepted);
    expect(server.activeConnections).toBe(1);
    const reply = await new Promise<Buffer>((resolve) => {
      const chunks: Buffer[] = [];
      clientSocket.on('data', (chunk: Buffer) => {
        chunks.push(chunk);
        const all = Buffer.concat(chunks);
        if (all.length >= 16 + 16 + 3) resolve(all);
      });
      clientSocket.write(RawNbdClient.requestBytes(NBD.CMD_WRITE, 0, 1n, 0n, 3, Buffer.from('abc')));
      clientSocket.write(RawNbdClient.requestBytes(NBD.CMD_READ, 0, 2n, 0n, 3));
    });
    expect(reply.readUInt32BE(0)).toBe(NBD.SIMPLE_REPLY_MAGIC);
    expect(reply.subarray(32, 35).toString()).toBe('abc');
    clientSocket.destroy();
  });
});
