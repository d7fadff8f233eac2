// Proves the shipped systemd units are valid and the node daemon keeps Type=notify's promise. PID 1 here is not
// systemd, so no unit is started: `systemd-analyze verify` (systemd 252) checks the units as installed by
// scripts/install.sh into a temporary prefix (it also checks that ExecStart's command exists), and must print
// nothing at all, since it reports a mistyped value only as a warning; a unit with a mistyped Type= shows the
// check sees such mistakes. Readiness is then tested against the protocol itself: a datagram socket stands in
// for systemd's NOTIFY_SOCKET, and `drbdts up` must send READY=1 with its own PID as MAINPID only when its
// control socket already answers; `drbdts down` (the unit's ExecStop) and SIGTERM (systemd's stop signal after
// it) must end the daemon with exit status 0, which Restart=on-failure leaves stopped.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Cluster, run } from './replication-cluster.js';
import { buildDist, repoRoot } from './resource-helpers.js';

let prefix: string;
let cluster: Cluster | null = null;
const children: ChildProcess[] = [];

beforeAll(async () => {
  await buildDist();
  prefix = await mkdtemp(path.join(tmpdir(), 'drbdts-units-'));
  const installed = await run('bash', [path.join(repoRoot, 'scripts/install.sh'), '--prefix', prefix, '--no-build']);
  if (installed.code !== 0) throw new Error(`install.sh failed: ${installed.stderr}`);
});

afterEach(async () => {
  for (const child of children.splice(0)) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  await cluster?.teardown();
  cluster = null;
});

afterAll(async () => {
  await rm(prefix, { recursive: true, force: true });
});

async function verify(unitPath: string): Promise<{ code: number; output: string }> {
  const result = await run('systemd-analyze', ['verify', '--man=no', unitPath]);
  return { code: result.code, output: (result.stdout + result.stderr).trim() };
}

/** A unix datagram socket standing in for systemd's notify socket: prints each message it receives on a line. */
function notifyListener(socketPath: string): Promise<{ child: ChildProcess; messages: () => string[] }> {
  const script = `
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print("listening", flush=True)
while True:
    data = s.recv(4096)
    print(data.decode().replace("\\n", " "), flush=True)
`;
  return new Promise((resolve, reject) => {
    const child = spawn('python3', ['-c', script, socketPath], { stdio: ['ignore', 'pipe', 'inherit'] });
    children.push(child);
    let text = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => {
      text += chunk;
      if (text.startsWith('listening\n')) resolve({ child, messages: () => text.split('\n').slice(1).filter((l) => l !== '') });
    });
    child.on('error', reject);
    child.on('exit', (code) => reject(new Error(`notify listener exited ${code}`)));
  });
}

describe('systemd units', () => {
  it('pass systemd-analyze verify as installed, and the check catches a mistyped value', async () => {
    const units = path.join(prefix, 'lib/systemd/system');
    // The template as such, an instance of it, and the dirsync server.
    await writeFile(path.join(prefix, 'drbdts@r0.service'), await readFile(path.join(units, 'drbdts@.service')));
    for (const unit of [path.join(units, 'drbdts@.service'), path.join(prefix, 'drbdts@r0.service'),
      path.join(units, 'drbdts-dirsync-server.service')]) {
      const result = await verify(unit);
      expect(result, unit).toEqual({ code: 0, output: '' });
    }
    const unit = await readFile(path.join(units, 'drbdts@.service'), 'utf8');
    expect(unit).toMatch(/^Type=notify$/m);
    expect(unit).toMatch(/^ExecStop=.*\/bin\/drbdts down %i$/m);
    expect(unit).toMatch(/^Restart=on-failure$/m);
    expect(unit).toMatch(/^\[Install\]\nWantedBy=multi-user\.target$/m);
    await writeFile(path.join(prefix, 'broken@.service'), unit.replace(/^Type=notify$/m, 'Type=notfy'));
    expect((await verify(path.join(prefix, 'broken@.service'))).output).toMatch(/Failed to parse service type/);
  });

  it('drbdts up reports READY=1 to NOTIFY_SOCKET once it answers, and stops with status 0', async () => {
    cluster = new Cluster({ sizeMiB: 16 });
    await cluster.setup();
    const socketPath = path.join(cluster.dir, 'notify.sock');
    const listener = await notifyListener(socketPath);
    const daemon = await cluster.start('alice', { NOTIFY_SOCKET: socketPath });
    // cluster.start returns once `status` answers; READY=1 may trail it only by the systemd-notify call.
    const deadline = Date.now() + 10_000;
    while (!listener.messages().some((m) => m.includes('READY=1')) && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const ready = listener.messages().find((m) => m.includes('READY=1'));
    expect(ready, `messages: ${JSON.stringify(listener.messages())}`).toBeDefined();
    expect(ready).toContain(`MAINPID=${daemon.pid}`);
    expect(ready).toMatch(/STATUS=r0 on alice: Secondary, /);
    // Ready was sent after start() finished: the export listened then too. A Secondary answers the NBD
    // handshake with its refusal, which shows a live server behind the socket.
    const info = await run('nbdinfo', ['--size', cluster.nbdUri('alice')]);
    expect(info.code).not.toBe(0);
    expect(info.stderr).toMatch(/server policy prevents NBD_OPT_GO/);

    // ExecStop: `drbdts down` returns once the daemon has gone, which exits 0 (Restart=on-failure: stays down).
    const exit = new Promise<number | null>((resolve) => daemon.once('exit', (code) => resolve(code)));
    const down = await cluster.cli('alice', 'down');
    expect(down.code, down.stderr).toBe(0);
    expect(await exit).toBe(0);
    cluster.processes.delete('alice');

    // systemd's own stop (SIGTERM, after ExecStop or without it) takes the same clean path.
    const again = await cluster.start('alice', { NOTIFY_SOCKET: socketPath });
    const exitAgain = new Promise<number | null>((resolve) => again.once('exit', (code) => resolve(code)));
    again.kill('SIGTERM');
    expect(await exitAgain).toBe(0);
    cluster.processes.delete('alice');
    expect(await cluster.log('alice')).toMatch(/"why":"SIGTERM"/);
  });
});
