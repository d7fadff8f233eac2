// A two-node drbdts cluster for tests: real `drbdts up` processes (from the built dist/), a config written
// per test into a unique temp dir, OS-chosen ports, an optional TCP proxy of the test's own between the
// nodes, and helpers to run CLI commands, read status, SIGKILL nodes and hash the data areas.
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { TcpProxy, freePort, makeTempDir, waitFor } from './replication-helpers.js';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const cli = path.join(repoRoot, 'bin', 'drbdts.js');

export type NodeName = 'alice' | 'bob';

export interface ClusterOptions {
  protocol?: 'A' | 'B' | 'C';
  sizeMiB?: number;
  /** Put a TcpProxy between alice (the connecting side) and bob. */
  proxy?: boolean;
  extraNet?: string;
  /** Extra [disk] keys (on-io-error, say). */
  extraDisk?: string;
  extraResync?: string;
  /** Lines of a [handlers] section (none when unset). */
  handlers?: string;
  secrets?: Partial<Record<NodeName, string>>;
  /** [net] ping-timeout, default 1500ms. */
  pingTimeout?: string;
  /** [resync] rate, default 1GiB. */
  resyncRate?: string;
  /** A node's `device` key: the kernel NBD client it attaches while Primary. */
  devices?: Partial<Record<NodeName, string>>;
  /** Where a node's backing file lives (default: the cluster's temp dir), e.g. a small tmpfs to fill up. */
  diskDirs?: Partial<Record<NodeName, string>>;
  /** Extra environment of a node's daemon (over the test process's own), e.g. its DRBDTS_REPL_DATA_PATH. */
  env?: Partial<Record<NodeName, NodeJS.ProcessEnv>>;
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function run(command: string, args: string[], options: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}):
  Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env: options.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk) => (stdout += chunk));
    child.stderr.on('data', (chunk) => (stderr += chunk));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${command} ${args.join(' ')} timed out\n${stdout}\n${stderr}`));
    }, options.timeoutMs ?? 60_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? -1, stdout, stderr });
    });
  });
}

export class Cluster {
  dir = '';
  sizeBytes: number;
  ports: Record<NodeName, number> = { alice: 0, bob: 0 };
  proxy: TcpProxy | null = null;
  readonly processes = new Map<NodeName, ChildProcess>();
  private cleanupDir: (() => Promise<void>) | null = null;

  constructor(private readonly options: ClusterOptions = {}) {
    this.sizeBytes = (options.sizeMiB ?? 64) * 1024 * 1024;
  }

  async setup(): Promise<void> {
    const temp = await makeTempDir('drbdts-repl-');
    this.dir = temp.dir;
    this.cleanupDir = temp.cleanup;
    this.ports = { alice: await freePort(), bob: await freePort() };
    let bobSeenByAlice = this.ports.bob;
    let aliceSeenByBob = this.ports.alice;
    if (this.options.proxy === true) {
      this.proxy = new TcpProxy(this.ports.bob);
      bobSeenByAlice = await this.proxy.listen();
      // Both nodes dial (bob only when alice's dials keep failing): with the proxy on alice's path alone, bob's
      // direct dial would heal every partition the proxy makes. bob is told a port nobody listens on instead, so
      // all traffic goes through the proxy, as when only alice dialled.
      aliceSeenByBob = await freePort();
    }
    await writeFile(this.configPath('alice'), this.configText('alice', bobSeenByAlice, this.ports.alice));
    await writeFile(this.configPath('bob'), this.configText('bob', this.ports.bob, aliceSeenByBob));
    for (const node of ['alice', 'bob'] as const) {
      const result = await this.cli(node, 'create-md');
      if (result.code !== 0) throw new Error(`create-md ${node}: ${result.stderr}`);
    }
  }

  configPath(node: NodeName): string {
    return path.join(this.dir, `r0-${node}.toml`);
  }

  /** Each node gets its own copy: alice may be told to reach bob through the proxy (and bob not to reach alice). */
  private configText(node: NodeName, bobPort: number, alicePort: number): string {
    const secret = this.options.secrets?.[node] ?? 'test-secret';
    return `[resource]
name = "r0"
protocol = "${this.options.protocol ?? 'C'}"
shared-secret = "${secret}"
[disk]
size = "${this.sizeBytes / 1024 / 1024}MiB"
${this.options.extraDisk ?? ''}
[net]
ping-interval = "200ms"
ping-timeout = "${this.options.pingTimeout ?? '1500ms'}"
connect-int = "200ms"
${this.options.extraNet ?? ''}
[resync]
rate = "${this.options.resyncRate ?? '1GiB'}"
${this.options.extraResync ?? ''}
${this.options.handlers === undefined ? '' : `[handlers]\n${this.options.handlers}`}
[node.alice]
address = "127.0.0.1:${alicePort}"
disk = "${this.imagePath('alice')}"
meta-disk = "internal"
nbd = "unix:${this.dir}/alice.nbd"
control = "${this.dir}/alice.ctl"
${this.options.devices?.alice === undefined ? '' : `device = "${this.options.devices.alice}"`}
[node.bob]
address = "127.0.0.1:${bobPort}"
disk = "${this.imagePath('bob')}"
meta-disk = "internal"
nbd = "unix:${this.dir}/bob.nbd"
control = "${this.dir}/bob.ctl"
${this.options.devices?.bob === undefined ? '' : `device = "${this.options.devices.bob}"`}
`;
  }

  nbdUri(node: NodeName): string {
    return `nbd+unix:///?socket=${this.dir}/${node}.nbd`;
  }

  imagePath(node: NodeName): string {
    return path.join(this.options.diskDirs?.[node] ?? this.dir, `${node}.img`);
  }

  cli(node: NodeName, command: string, ...args: string[]): Promise<RunResult> {
    return run('node', [cli, command, 'r0', '--config', this.configPath(node), '--node', node, ...args], {
      env: { ...process.env, DRBDTS_LOG_LEVEL: 'warn' },
    });
  }

  /** Starts `drbdts up` for `node`; `env` adds to (or, with undefined values, removes from) its environment. */
  async start(node: NodeName, env: NodeJS.ProcessEnv = {}): Promise<ChildProcess> {
    const logPath = path.join(this.dir, `${node}.log`);
    const { openSync } = await import('node:fs');
    const log = openSync(logPath, 'a');
    const child = spawn('node', [cli, 'up', 'r0', '--config', this.configPath(node), '--node', node], {
      stdio: ['ignore', log, log],
      env: { ...process.env, DRBDTS_LOG_LEVEL: process.env.DRBDTS_TEST_LOG_LEVEL ?? 'info', ...this.options.env?.[node], ...env },
    });
    this.processes.set(node, child);
    await waitFor(`${node} to come up`, async () => {
      if (child.exitCode !== null) throw new Error(`${node} exited: ${await this.log(node)}`);
      if (!existsSync(path.join(this.dir, `${node}.ctl`))) return false;
      return (await this.cli(node, 'status', '--json')).code === 0;
    }, 30_000, 100);
    return child;
  }

  async log(node: NodeName): Promise<string> {
    return readFile(path.join(this.dir, `${node}.log`), 'utf8').catch(() => '');
  }

  async status(node: NodeName): Promise<any> {
    const result = await this.cli(node, 'status', '--json');
    if (result.code !== 0) throw new Error(`status ${node}: ${result.stderr}`);
    return JSON.parse(result.stdout);
  }

  async waitState(node: NodeName, what: string, predicate: (status: any) => boolean, timeoutMs = 30_000): Promise<any> {
    let last: any = null;
    try {
      await waitFor(`${node}: ${what}`, async () => {
        last = await this.status(node);
        return predicate(last);
      }, timeoutMs, 100);
    } catch (error) {
      throw new Error(`${(error as Error).message}; last status ${JSON.stringify(last)}`);
    }
    return last;
  }

  async waitInSync(timeoutMs = 60_000): Promise<void> {
    for (const node of ['alice', 'bob'] as const) {
      await this.waitState(node, 'Connected and UpToDate, nothing out of sync', (s) =>
        s.connection === 'Connected' && s.disk === 'UpToDate' && s.peer.disk === 'UpToDate' && s.outOfSyncBytes === 0,
      timeoutMs);
    }
  }

  /** Both up, alice Primary after the initial full sync. */
  async startPrimaryAlice(): Promise<void> {
    await this.start('alice');
    await this.start('bob');
    await this.waitState('alice', 'connected', (s) => s.connection === 'Connected');
    const promoted = await this.cli('alice', 'primary', '--force');
    if (promoted.code !== 0) throw new Error(`primary --force: ${promoted.stderr}`);
    await this.waitInSync();
  }

  /** Both up on fresh metadata, the initial sync skipped (new-current-uuid --clear-bitmap), alice Primary. */
  async startSkippingSync(): Promise<void> {
    await this.start('alice');
    await this.start('bob');
    await this.waitState('alice', 'connected', (s) => s.connection === 'Connected');
    const skipped = await this.cli('alice', 'new-current-uuid', '--clear-bitmap');
    if (skipped.code !== 0) throw new Error(`new-current-uuid --clear-bitmap: ${skipped.stderr}`);
    await this.waitInSync();
    const promoted = await this.cli('alice', 'primary');
    if (promoted.code !== 0) throw new Error(`primary: ${promoted.stderr}`);
  }

  kill(node: NodeName): void {
    const child = this.processes.get(node);
    child?.kill('SIGKILL');
    this.processes.delete(node);
  }

  async exited(child: ChildProcess): Promise<void> {
    if (child.exitCode !== null || child.signalCode !== null) return;
    await new Promise((resolve) => child.once('exit', resolve));
  }

  async hashData(node: NodeName): Promise<string> {
    const hash = createHash('sha256');
    const stream = createReadStream(this.imagePath(node), { start: 0, end: this.sizeBytes - 1 });
    for await (const chunk of stream) hash.update(chunk as Buffer);
    return hash.digest('hex');
  }

  async down(node: NodeName): Promise<void> {
    const child = this.processes.get(node);
    if (child === undefined) return;
    await this.cli(node, 'down');
    await Promise.race([this.exited(child), new Promise((resolve) => setTimeout(resolve, 10_000))]);
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    this.processes.delete(node);
  }

  async teardown(): Promise<void> {
    for (const [, child] of this.processes) child.kill('SIGKILL');
    for (const [, child] of this.processes) await this.exited(child);
    this.processes.clear();
    await this.proxy?.close();
    if (process.env.DRBDTS_TEST_KEEP !== '1') await this.cleanupDir?.();
  }
}
