// Helpers for the resource tests: build dist/ once (child processes run the compiled CLI and modules, as
// operators do), spawn and reap child processes, write resource configs into a temp dir.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const cliPath = path.join(repoRoot, 'bin', 'drbdts.js');

let built: Promise<void> | undefined;

/** tsc emits even when another engineer's file has a type error; only a missing output is fatal. */
export function buildDist(): Promise<void> {
  built ??= (async () => {
    await promisify(execFile)('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: repoRoot }).catch(() => undefined);
    for (const file of ['dist/cli/main.js', 'dist/metadata/metadata.js', 'dist/resource/control.js']) {
      if (!existsSync(path.join(repoRoot, file))) throw new Error(`build produced no ${file}`);
    }
  })();
  return built;
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `drbdts ARGS` to completion. */
export function runCli(args: string[], options: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cliPath, ...args], {
      cwd: repoRoot,
      env: { ...process.env, DRBDTS_LOG_LEVEL: 'warn', ...options.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => { stdout += chunk; });
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk; });
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`drbdts ${args.join(' ')} did not finish in ${options.timeoutMs ?? 60_000} ms; stderr: ${stderr}`));
    }, options.timeoutMs ?? 60_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

const children = new Set<ChildProcess>();

/** Spawns a long-running child (killed by killChildren). Resolves once `readyLine` appears on its stdout or stderr. */
export function spawnUntil(command: string, args: string[], readyPattern: RegExp, options: { env?: NodeJS.ProcessEnv; cwd?: string; timeoutMs?: number } = {}): Promise<{ child: ChildProcess; output: () => string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, {
      cwd: options.cwd ?? repoRoot,
      env: { ...process.env, ...options.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    children.add(child);
    let output = '';
    let ready = false;
    const onData = (chunk: string): void => {
      output += chunk;
      if (!ready && readyPattern.test(output)) {
        ready = true;
        clearTimeout(timer);
        resolve({ child, output: () => output });
      }
    };
    child.stdout.setEncoding('utf8').on('data', onData);
    child.stderr.setEncoding('utf8').on('data', onData);
    const timer = setTimeout(() => {
      if (!ready) reject(new Error(`${command} ${args.join(' ')} not ready in time; output: ${output}`));
    }, options.timeoutMs ?? 30_000);
    child.on('exit', (code, signal) => {
      children.delete(child);
      if (!ready) {
        clearTimeout(timer);
        reject(new Error(`${command} exited (${code ?? signal}) before ready; output: ${output}`));
      }
    });
  });
}

export function waitExit(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  }
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
}

export async function killChildren(): Promise<void> {
  const waits: Promise<unknown>[] = [];
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) {
      waits.push(waitExit(child));
      child.kill('SIGKILL');
    }
  }
  await Promise.all(waits);
  children.clear();
}

export interface TestResource {
  file: string;
  dir: string;
}

/** Writes a two-node resource config (alice, bob) whose disks and sockets live in `dir`. */
export async function writeResourceConfig(dir: string, options: { name?: string; size?: string; ports?: [number, number]; extra?: string; nbdPorts?: [number, number] } = {}): Promise<TestResource> {
  const name = options.name ?? 'r0';
  const [portA, portB] = options.ports ?? [7789, 7790];
  const nbd = (node: string, index: 0 | 1): string => (options.nbdPorts ? `127.0.0.1:${options.nbdPorts[index]}` : `unix:${dir}/${node}.nbd`);
  const text = `[resource]
name = "${name}"
protocol = "C"
shared-secret = "test-secret"

[disk]
size = "${options.size ?? '64MiB'}"

[node.alice]
address = "127.0.0.1:${portA}"
disk = "${dir}/alice.img"
nbd = "${nbd('alice', 0)}"
control = "${dir}/alice.ctl"

[node.bob]
address = "127.0.0.1:${portB}"
disk = "${dir}/bob.img"
nbd = "${nbd('bob', 1)}"
control = "${dir}/bob.ctl"
${options.extra ?? ''}`;
  const file = path.join(dir, `${name}.toml`);
  await writeFile(file, text);
  return { file, dir };
}

export async function freePort(): Promise<number> {
  const net = await import('node:net');
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as import('node:net').AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

export async function until(what: string, check: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  throw new Error(`timed out waiting for ${what}`);
}

export type NodeName = 'alice' | 'bob';

/** Two nodes of one resource driven through the real CLI, daemons as child processes. */
export class ResourcePair {
  resource!: TestResource;
  readonly daemons: Partial<Record<NodeName, ChildProcess>> = {};

  cli(node: NodeName, ...args: string[]): Promise<CliResult> {
    const [command, ...rest] = args;
    return runCli([command!, 'r0', '--config', this.resource.file, '--node', node, ...rest]);
  }

  async status(node: NodeName): Promise<import('../src/resource/control.js').ResourceStatus> {
    const result = await this.cli(node, 'status', '--json');
    if (result.code !== 0) throw new Error(`status on ${node} failed (${result.code}): ${result.stderr}`);
    return JSON.parse(result.stdout) as import('../src/resource/control.js').ResourceStatus;
  }

  async up(node: NodeName): Promise<ChildProcess> {
    const { child } = await spawnUntil(process.execPath, [cliPath, 'up', 'r0', '--config', this.resource.file, '--node', node],
      /resource up/, { env: { DRBDTS_LOG_LEVEL: 'info' } });
    this.daemons[node] = child;
    return child;
  }

  async qemuWrite(node: NodeName, pattern: number, offsetBytes: number, lengthBytes: number): Promise<void> {
    const socket = path.join(this.resource.dir, `${node}.nbd`);
    await promisify(execFile)('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} ${offsetBytes} ${lengthBytes}`, `nbd+unix:///?socket=${socket}`]);
  }
}
