// The control socket (src/resource/control.ts) with real unix sockets and real processes: requests and answers
// (results, the handler's refusal message verbatim, bigint UUIDs), answers in request order on one connection,
// garbage lines answered with an error without killing the server; a stale socket file left by a SIGKILLed
// daemon (a child process) is removed on listen, while a live daemon (another child) makes listen refuse;
// a client with no daemon gets ENODAEMON.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ControlError, ControlServer, sendControlRequest } from '../src/resource/control.js';
import { buildDist, killChildren, repoRoot, spawnUntil, waitExit } from './resource-helpers.js';

let dir: string;
let n = 0;
const servers: ControlServer[] = [];
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'drbdts-ctl-'));
});
afterEach(async () => {
  await Promise.all(servers.splice(0).map((server) => server.close()));
  await killChildren();
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function socketPath(): string {
  n += 1;
  return path.join(dir, 'run', `r${n}.ctl`);
}

async function expectControlError(promise: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  try {
    await promise;
  } catch (error) {
    expect(error).toBeInstanceOf(ControlError);
    expect((error as ControlError).code).toBe(code);
    expect((error as Error).message).toMatch(message);
    return;
  }
  throw new Error(`expected ControlError ${code}`);
}

describe('ControlServer and sendControlRequest', () => {
  it('answers results and refusals, in order, and survives garbage', async () => {
    const file = socketPath();
    const server = new ControlServer(file, async (command, args) => {
      if (command === 'status') return { role: 'Secondary', uuid: 0xabcn };
      if (command === 'slow') {
        await sleep(Number(args.ms));
        return `slept ${String(args.ms)}`;
      }
      if (command === 'primary') throw new Error('refusing to promote: local disk is Inconsistent (use --force)');
      throw new Error(`unknown command "${command}"`);
    });
    servers.push(server);
    await server.listen();
    expect(((await stat(file)).mode & 0o777)).toBe(0o600);
    expect(await sendControlRequest(file, 'status')).toEqual({ role: 'Secondary', uuid: '0000000000000ABC' });
    await expectControlError(sendControlRequest(file, 'primary', { force: false }), 'EREMOTE',
      /^refusing to promote: local disk is Inconsistent \(use --force\)$/);
    // Several requests on one connection, garbage between them: answers come back in request order.
    const answers = await new Promise<string[]>((resolve, reject) => {
      const socket = net.connect(file);
      let text = '';
      socket.setEncoding('utf8');
      socket.on('data', (chunk: string) => {
        text += chunk;
        const lines = text.split('\n').filter(Boolean);
        if (lines.length === 4) {
          socket.destroy();
          resolve(lines);
        }
      });
      socket.on('error', reject);
      socket.write('{"command":"slow","args":{"ms":100}}\nthis is not json\n{"args":{}}\n{"command":"slow","args":{"ms":1}}\n');
    });
    expect(answers.map((line) => JSON.parse(line))).toEqual([
      { ok: true, result: 'slept 100' },
      { ok: false, error: 'request is not JSON' },
      { ok: false, error: 'request needs a "command" string' },
      { ok: true, result: 'slept 1' },
    ]);
    expect(await sendControlRequest(file, 'status')).toMatchObject({ role: 'Secondary' });
  });

  it('reports no daemon when nothing listens', async () => {
    await expectControlError(sendControlRequest(socketPath(), 'status'), 'ENODAEMON', /^no daemon at /);
  });

  it('times out on a daemon that never answers', async () => {
    const file = socketPath();
    const server = new ControlServer(file, () => new Promise(() => undefined));
    servers.push(server);
    await server.listen();
    await expectControlError(sendControlRequest(file, 'status', {}, { timeoutMs: 300 }), 'ETIMEDOUT', /no answer to "status"/);
  });

  it('removes a stale socket left by a SIGKILLed daemon, but refuses while a daemon lives', async () => {
    await buildDist();
    const file = socketPath();
    const script = path.join(dir, 'daemon.mjs');
    await writeFile(script, `
import { ControlServer } from ${JSON.stringify(path.join(repoRoot, 'dist/resource/control.js'))};
const server = new ControlServer(process.argv[2], async (command) => 'child answers ' + command);
await server.listen();
process.stdout.write('listening\\n');
setInterval(() => {}, 1e6);
`);
    const daemon = await spawnUntil(process.execPath, [script, file], /listening/);
    expect(await sendControlRequest(file, 'status')).toBe('child answers status');
    const rival = new ControlServer(file, async () => 'rival');
    await expectControlError(rival.listen(), 'EINUSE', /another daemon is already running on control socket/);
    expect(await sendControlRequest(file, 'status')).toBe('child answers status'); // untouched
    daemon.child.kill('SIGKILL');
    await waitExit(daemon.child);
    expect((await stat(file)).isSocket()).toBe(true); // the stale file is still there
    await expectControlError(sendControlRequest(file, 'status'), 'ENODAEMON', /no daemon/);
    const successor = new ControlServer(file, async () => 'successor');
    servers.push(successor);
    await successor.listen();
    expect(await sendControlRequest(file, 'status')).toBe('successor');
  });

  it('refuses a path that is not a socket', async () => {
    const file = socketPath();
    await rm(path.dirname(file), { recursive: true, force: true });
    await import('node:fs/promises').then((fs) => fs.mkdir(path.dirname(file), { recursive: true }));
    await writeFile(file, 'precious');
    const server = new ControlServer(file, async () => null);
    await expectControlError(server.listen(), 'EINUSE', /exists and is not a socket/);
    expect((await stat(file)).isFile()).toBe(true);
  });

  it('unlinks its socket on close', async () => {
    const file = socketPath();
    const server = new ControlServer(file, async () => 'x');
    await server.listen();
    await server.close();
    await expect(stat(file)).rejects.toMatchObject({ code: 'ENOENT' });
  });
});
