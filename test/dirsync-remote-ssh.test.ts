// ssh:// replicas against a real OpenSSH server started by this test on a loopback port (fresh host and user
// keys, its own sshd_config): the Replica calls and a full `drbdts dirsync LOCAL ssh://...` run go through ssh
// to `drbdts dirsync-server --stdio` on the "remote" side, and an unauthorised key or a wrong server command
// fails with ssh's own explanation in the error.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtemp, mkdir, readFile, rm, writeFile, access } from 'node:fs/promises';
import { createServer, connect } from 'node:net';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { openRemoteReplica } from '../src/dirsync/remote.js';
import { ReplicaError } from '../src/dirsync/replica.js';
import { collect, drbdtsBin } from './dirsync-remote-helpers.js';

let dir: string;
let sshd: ChildProcess | undefined;
let port: number;
let sshCommand: string;
let badKeyCommand: string;
const user = userInfo().username;
const serverCommand = `${process.execPath} ${drbdtsBin}`;

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const chosen = (server.address() as { port: number }).port;
  await new Promise((resolve) => server.close(resolve));
  return chosen;
}

async function waitForPort(target: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const socket = connect({ host: '127.0.0.1', port: target });
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`sshd did not listen on ${target}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function keygen(path: string): void {
  const result = spawnSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path], { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`ssh-keygen failed: ${result.stderr}`);
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'drbdts-ssh-'));
  keygen(join(dir, 'host_key'));
  keygen(join(dir, 'user_key'));
  keygen(join(dir, 'other_key'));
  await writeFile(join(dir, 'authorized_keys'), await readFile(join(dir, 'user_key.pub')));
  // sshd refuses to start without its privilege separation directory (normally made by the package's service).
  await mkdir('/run/sshd', { recursive: true, mode: 0o755 });
  port = await freePort();
  const config = [
    `Port ${port}`,
    'ListenAddress 127.0.0.1',
    `HostKey ${join(dir, 'host_key')}`,
    `PidFile ${join(dir, 'sshd.pid')}`,
    `AuthorizedKeysFile ${join(dir, 'authorized_keys')}`,
    'StrictModes no',
    'PubkeyAuthentication yes',
    'PasswordAuthentication no',
    'KbdInteractiveAuthentication no',
    'UsePAM no',
    'PermitRootLogin prohibit-password',
    `AllowUsers ${user}`,
    'LogLevel ERROR',
  ].join('\n');
  await writeFile(join(dir, 'sshd_config'), `${config}\n`);
  sshd = spawn('/usr/sbin/sshd', ['-D', '-e', '-f', join(dir, 'sshd_config')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let sshdErrors = '';
  sshd.stderr!.on('data', (data: Buffer) => (sshdErrors += data.toString()));
  await waitForPort(port, 10_000).catch((error: Error) => {
    throw new Error(`${error.message}: ${sshdErrors}`);
  });
  const hostKey = (await readFile(join(dir, 'host_key.pub'), 'utf8')).trim().split(' ').slice(0, 2).join(' ');
  await writeFile(join(dir, 'known_hosts'), `[127.0.0.1]:${port} ${hostKey}\n`);
  const common = `-F /dev/null -o IdentitiesOnly=yes -o UserKnownHostsFile=${join(dir, 'known_hosts')} -o StrictHostKeyChecking=yes -o BatchMode=yes -o LogLevel=ERROR`;
  sshCommand = `ssh ${common} -i ${join(dir, 'user_key')}`;
  badKeyCommand = `ssh ${common} -i ${join(dir, 'other_key')}`;
});

afterAll(async () => {
  if (sshd !== undefined && sshd.exitCode === null) {
    const exited = new Promise((resolve) => sshd!.once('exit', resolve));
    sshd.kill('SIGTERM');
    await exited;
  }
  await rm(dir, { recursive: true, force: true });
});

describe('ssh:// replicas', () => {
  // Proves the replica calls work over a real ssh connection (dirsync-server --stdio on the far side).
  it('reads and writes a tree through ssh', async () => {
    const remoteRoot = join(dir, 'remote-tree');
    await mkdir(join(remoteRoot, 'sub'), { recursive: true });
    await writeFile(join(remoteRoot, 'sub', 'hello.txt'), 'hello over ssh');
    const url = `ssh://${user}@127.0.0.1:${port}/${remoteRoot}`;
    // A secret set for tcp:// use must not get in the way of ssh (the stdio server asks for none).
    const saved = process.env.DRBDTS_DIRSYNC_SECRET;
    process.env.DRBDTS_DIRSYNC_SECRET = 'set for tcp use';
    const replica = await openRemoteReplica(url, { sshCommand, serverCommand }).finally(() => {
      if (saved === undefined) delete process.env.DRBDTS_DIRSYNC_SECRET;
      else process.env.DRBDTS_DIRSYNC_SECRET = saved;
    });
    try {
      const info = await replica.open();
      expect(info.rootId).toBe(`ssh://${user}@127.0.0.1:${port}/${remoteRoot}`);
      const entries = [];
      for await (const batch of replica.scan({ ignore: [] })) entries.push(...batch.entries);
      const file = entries.find((entry) => entry.path === 'sub/hello.txt');
      expect(file?.sizeBytes).toBe(14);
      const source = await replica.readFile('sub/hello.txt', file!);
      expect((await collect(source.chunks)).toString()).toBe('hello over ssh');
      await source.done;
      const data = randomBytes(5 << 20);
      const { fingerprintOf } = await import('../src/dirsync/hash.js');
      const fingerprint = await fingerprintOf(data);
      await replica.writeFile({
        path: 'sub/big.bin', precondition: 'absent', mode: 0o600,
        content: {
          kind: 'full',
          source: {
            sizeBytes: data.length,
            chunks: (async function* () {
              for (let offset = 0; offset < data.length; offset += 1 << 20) yield data.subarray(offset, offset + (1 << 20));
            })(),
            done: Promise.resolve({ fingerprint, statAfter: { kind: 'file', sizeBytes: data.length, mtimeMs: 0, ctimeMs: 0, inode: 0, mode: 0o600 } }),
            cancel: () => undefined,
          },
        },
      });
      expect((await readFile(join(remoteRoot, 'sub', 'big.bin'))).equals(data)).toBe(true);
    } finally {
      await replica.close();
    }
  });

  // Proves `drbdts dirsync LOCAL ssh://...` syncs both ways as a user runs it (CLI, --ssh-command,
  // --server-command), and a second run picks up an edit made on the remote side.
  it('syncs with the dirsync command over ssh', async () => {
    const local = join(dir, 'cli-local');
    const remoteRoot = join(dir, 'cli-remote');
    await mkdir(join(local, 'docs'), { recursive: true });
    await mkdir(remoteRoot);
    await writeFile(join(local, 'docs', 'a.txt'), 'from local');
    await writeFile(join(local, 'name with spaces.txt'), 'spaces');
    const url = `ssh://${user}@127.0.0.1:${port}/${remoteRoot}`;
    const argv = [
      drbdtsBin, 'dirsync', local, url, '--batch', '--archive-dir', join(dir, 'archive'),
      '--ssh-command', sshCommand, '--server-command', serverCommand,
    ];
    const first = spawnSync(process.execPath, argv, { encoding: 'utf8', timeout: 60_000 });
    expect(first.status, first.stderr).toBe(0);
    expect(await readFile(join(remoteRoot, 'docs', 'a.txt'), 'utf8')).toBe('from local');
    expect(await readFile(join(remoteRoot, 'name with spaces.txt'), 'utf8')).toBe('spaces');

    await writeFile(join(remoteRoot, 'docs', 'a.txt'), 'edited remotely');
    const second = spawnSync(process.execPath, argv, { encoding: 'utf8', timeout: 60_000 });
    expect(second.status, second.stderr).toBe(0);
    expect(await readFile(join(local, 'docs', 'a.txt'), 'utf8')).toBe('edited remotely');
  });

  // Proves failures before the protocol starts carry ssh's explanation: a key the server does not accept, and
  // a server command that does not exist on the host.
  it('reports ssh failures with what ssh said', async () => {
    const url = `ssh://${user}@127.0.0.1:${port}/${dir}`;
    const denied = await openRemoteReplica(url, { sshCommand: badKeyCommand, serverCommand }).then(
      () => undefined,
      (error: unknown) => error,
    );
    expect(denied).toBeInstanceOf(ReplicaError);
    expect((denied as ReplicaError).message).toMatch(/Permission denied/);

    const missing = await openRemoteReplica(url, { sshCommand, serverCommand: '/nonexistent/drbdts' }).then(
      () => undefined,
      (error: unknown) => error,
    );
    expect(missing).toBeInstanceOf(ReplicaError);
    expect((missing as ReplicaError).message).toMatch(/nonexistent\/drbdts.*(not found|No such file)/);
    await access(dir); // nothing happened to the tree
  });
});
