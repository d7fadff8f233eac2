// Shared helpers for the dirsync tests: temp trees, running the real CLI (`node bin/drbdts.js dirsync`) and
// unison 2.52 on them, and a dirsync-server on a loopback port for tcp:// roots.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { SyncOptions } from '../src/dirsync/engine.js';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const cliPath = path.join(repoRoot, 'bin', 'drbdts.js');

/** Options for an in-process SyncEngine run between two local roots: batch mode, unison's defaults (perms on,
 * times off), warnings dropped; `overrides` on top. */
export function engineOptions(archiveDir: string, overrides: Partial<SyncOptions> = {}): SyncOptions {
  return {
    batch: true,
    copyOnConflict: false,
    ignore: [],
    times: false,
    perms: true,
    alwaysHash: false,
    archiveDir,
    dryRun: false,
    local: [true, true],
    warn: () => undefined,
    ...overrides,
  };
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
  /** Parsed `--json` output of a dirsync run. */
  json?: {
    exitCode: number;
    items: Array<{ path: string; action: string; from?: number; status: string; transfer?: string; reason?: string; resolvedBy?: string }>;
    counts: { propagated: number; skipped: number; failed: number; equal: number };
    bytesTransferred: number;
    fatal?: string;
  };
}

export function run(command: string, args: string[], options: { env?: NodeJS.ProcessEnv; cwd?: string; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(
      command,
      args,
      { env: { ...process.env, ...options.env }, cwd: options.cwd, timeout: options.timeoutMs ?? 60_000, maxBuffer: 64 << 20 },
      (error, stdout, stderr) => {
        const code = error === null ? 0 : typeof (error as { code?: unknown }).code === 'number' ? ((error as { code: number }).code) : 99;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

export function mkTemp(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** A pair of replica directories plus an archive directory; `rootB` is how dirsync names B (path or tcp:// URL). */
export interface Pair {
  dir: string;
  a: string;
  b: string;
  archive: string;
  rootA: string;
  rootB: string;
  extraArgs: string[];
}

/** Two empty local roots, `dir`/a and `dir`/b (made, with `dir`), and the archive directory `dir`/archive. */
export function localPair(dir: string): Pair {
  const a = path.join(dir, 'a');
  const b = path.join(dir, 'b');
  fs.mkdirSync(a, { recursive: true });
  fs.mkdirSync(b);
  return { dir, a, b, archive: path.join(dir, 'archive'), rootA: a, rootB: b, extraArgs: [] };
}

export function write(root: string, rel: string, content: string | Buffer, options: { mtimeMs?: number; mode?: number } = {}): void {
  const file = path.join(root, rel);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, content);
  if (options.mode !== undefined) fs.chmodSync(file, options.mode);
  if (options.mtimeMs !== undefined) fs.utimesSync(file, new Date(options.mtimeMs), new Date(options.mtimeMs));
}

export function read(root: string, rel: string): string | null {
  try {
    return fs.readFileSync(path.join(root, rel), 'utf8');
  } catch {
    return null;
  }
}

export function exists(root: string, rel: string): boolean {
  try {
    fs.lstatSync(path.join(root, rel));
    return true;
  } catch {
    return false;
  }
}

export function lstat(root: string, rel: string): fs.Stats {
  return fs.lstatSync(path.join(root, rel));
}

/** Every path under root with its type and content (files), link target (symlinks): for whole-tree comparisons. */
export function snapshot(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (rel: string): void => {
    for (const name of fs.readdirSync(path.join(root, rel)).sort()) {
      const child = rel === '' ? name : `${rel}/${name}`;
      const st = fs.lstatSync(path.join(root, child));
      if (st.isDirectory()) {
        out[child] = `dir ${(st.mode & 0o777).toString(8)}`;
        walk(child);
      } else if (st.isSymbolicLink()) out[child] = `link ${fs.readlinkSync(path.join(root, child))}`;
      else out[child] = `file ${(st.mode & 0o777).toString(8)} ${fs.readFileSync(path.join(root, child)).toString('base64')}`;
    }
  };
  walk('');
  return out;
}

export async function dirsync(pair: Pair, args: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
  const result = await run(
    process.execPath,
    [cliPath, 'dirsync', pair.rootA, pair.rootB, '--batch', '--json', '--archive-dir', pair.archive, ...pair.extraArgs, ...args],
    { env },
  );
  try {
    result.json = JSON.parse(result.stdout) as RunResult['json'];
  } catch {
    // Fatal usage errors print no JSON; the caller asserts on code and stderr.
  }
  return result;
}

/** Translate dirsync options to unison's and run `unison A B -batch` with a private archive directory. */
export async function unison(pair: Pair, args: string[] = []): Promise<RunResult> {
  const translated: string[] = [];
  for (let index = 0; index < args.length; index++) {
    const arg = args[index]!;
    if (arg === '--prefer') {
      const value = args[++index]!;
      translated.push('-prefer', value === pair.rootA ? pair.a : value === pair.rootB ? pair.b : value);
    } else if (arg === '--times') translated.push('-times');
    else if (arg === '--copy-on-conflict') translated.push('-copyonconflict');
    else if (arg === '--ignore') translated.push('-ignore', args[++index]!);
    else if (arg === '--no-perms') translated.push('-perms', '0');
    else throw new Error(`no unison equivalent for ${arg}`);
  }
  return run('unison', [pair.a, pair.b, '-batch', '-ui', 'text', '-confirmbigdel', ...translated], {
    env: { UNISON: path.join(pair.dir, 'unison-home'), HOME: pair.dir },
  });
}

export interface DirsyncServer {
  url(rel: string): string;
  secretFile: string;
  process: ChildProcess;
  stop(): Promise<void>;
}

/** `drbdts dirsync-server --listen 127.0.0.1:0 --root ROOT`, port read from its "listening on" line. */
export async function startServer(root: string, secretFile: string): Promise<DirsyncServer> {
  const child = spawn(process.execPath, [cliPath, 'dirsync-server', '--listen', '127.0.0.1:0', '--root', root, '--secret-file', secretFile], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const port = await new Promise<number>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`dirsync-server did not start: ${stderr}`)), 20_000);
    child.stdout!.on('data', (chunk: Buffer) => {
      out += chunk.toString();
      const match = /listening on .*:(\d+)/.exec(out);
      if (match !== null) {
        clearTimeout(timer);
        resolve(Number(match[1]));
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`dirsync-server exited with ${code}: ${stderr}`));
    });
  });
  return {
    url: (rel) => `tcp://127.0.0.1:${port}/${rel}`,
    secretFile,
    process: child,
    stop: async () => {
      if (child.exitCode !== null) return;
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGKILL');
      await exited;
    },
  };
}
