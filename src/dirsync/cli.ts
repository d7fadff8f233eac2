// `drbdts dirsync ROOT1 ROOT2 [options]` and `drbdts dirsync-server ...`.
// Exit codes as unison: 0 all synced, 1 something skipped (conflicts, or the user said no), 2 non-fatal failures
// (some paths failed and will be retried next run), 3 fatal (bad arguments, a root missing, a corrupt archive,
// the lock held, a refused deletion in batch mode).
import * as pathModule from 'node:path';
import { defaultArchiveDir } from './archive/file.js';
import { startEarly } from './early.js';
import type { PlanItem, Prefer, SyncOptions, SyncResult } from './engine.js';
import { compileIgnore } from './ignore.js';
import { ReplicaError, type Replica } from './replica.js';
// engine.js and local.js (most of dirsync's code) are imported when a sync starts: for two local roots, after
// early.ts has taken the lock and started both scans, so that their compilation overlaps the scans.

const dirsyncUsage = `Usage: drbdts dirsync ROOT1 ROOT2 [options]

A root is a local directory, tcp://HOST:PORT/PATH (drbdts dirsync-server --listen) or ssh://[USER@]HOST[:PORT]/PATH.

Options:
  --batch               propagate without asking; conflicts are skipped (exit 1)
  --prefer ROOT|newer|older
                        resolve conflicts in favour of that root (as written on the command line), or the
                        newer/older modification time (a deletion never wins by newer/older)
  --copy-on-conflict    keep the losing version of a resolved conflict as "NAME (conflict DATE)"
  --ignore PATTERN      skip paths: 'Name GLOB', 'Path GLOB', 'BelowPath GLOB', 'Regex RE' (bare = Name); repeatable
  --times               sync modification times (differences under 1 s are ignored)
  --perms / --no-perms  sync permission bits (default on, as unison)
  --always-hash         hash every file instead of trusting size+mtime+ctime+inode
  --watch               keep running, re-syncing on file-system changes
  --archive-dir DIR     where the archives live (default $XDG_STATE_HOME/drbdts/dirsync)
  --fsync               fsync every installed file before its rename (survive power loss, slower)
  --json                print the plan and result as JSON on stdout
  --dry-run             show the plan, change nothing
  --secret-file FILE    shared secret for tcp:// roots (or env DRBDTS_DIRSYNC_SECRET)
  --server-command CMD  command that runs drbdts on an ssh:// host (default: drbdts)
  --ssh-command CMD     ssh program and options for ssh:// roots (default: ssh)

Exit status: 0 all synced, 1 something skipped, 2 some paths failed, 3 fatal error.
`;

interface ParsedArgs {
  roots: string[];
  batch: boolean;
  prefer?: string;
  copyOnConflict: boolean;
  ignore: string[];
  times: boolean;
  perms: boolean;
  alwaysHash: boolean;
  watch: boolean;
  archiveDir?: string;
  fsync: boolean;
  json: boolean;
  dryRun: boolean;
  secretFile?: string;
  serverCommand?: string;
  sshCommand?: string;
  help: boolean;
}

class UsageError extends Error {}

function parseArgs(argv: string[]): ParsedArgs {
  const args: ParsedArgs = {
    roots: [],
    batch: false,
    copyOnConflict: false,
    ignore: [],
    times: false,
    perms: true,
    alwaysHash: false,
    watch: false,
    fsync: false,
    json: false,
    dryRun: false,
    help: false,
  };
  const flags: Record<string, (a: ParsedArgs) => void> = {
    '--batch': (a) => (a.batch = true),
    '--copy-on-conflict': (a) => (a.copyOnConflict = true),
    '--times': (a) => (a.times = true),
    '--perms': (a) => (a.perms = true),
    '--no-perms': (a) => (a.perms = false),
    '--always-hash': (a) => (a.alwaysHash = true),
    '--watch': (a) => (a.watch = true),
    '--fsync': (a) => (a.fsync = true),
    '--json': (a) => (a.json = true),
    '--dry-run': (a) => (a.dryRun = true),
    '--help': (a) => (a.help = true),
    '-h': (a) => (a.help = true),
  };
  const valued: Record<string, (a: ParsedArgs, value: string) => void> = {
    '--prefer': (a, v) => (a.prefer = v),
    '--ignore': (a, v) => a.ignore.push(v),
    '--archive-dir': (a, v) => (a.archiveDir = v),
    '--secret-file': (a, v) => (a.secretFile = v),
    '--server-command': (a, v) => (a.serverCommand = v),
    '--ssh-command': (a, v) => (a.sshCommand = v),
  };
  let onlyRoots = false;
  for (let index = 0; index < argv.length; index++) {
    const arg = argv[index]!;
    if (onlyRoots || !arg.startsWith('-') || arg === '-') {
      args.roots.push(arg);
      continue;
    }
    if (arg === '--') {
      onlyRoots = true;
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq === -1 ? arg : arg.slice(0, eq);
    const flag = flags[name];
    if (flag !== undefined && eq === -1) {
      flag(args);
      continue;
    }
    const setter = valued[name];
    if (setter === undefined) throw new UsageError(`unknown option ${arg}`);
    const value = eq === -1 ? argv[++index] : arg.slice(eq + 1);
    if (value === undefined) throw new UsageError(`option ${name} needs a value`);
    setter(args, value);
  }
  return args;
}

// remote.ts and watch.ts (docs/dirsync-interfaces.md) are loaded only when a remote root or --watch is used,
// through these declared shapes, so a local sync never pays for loading them.
const REMOTE_MODULE = './remote.js';
const WATCH_MODULE = './watch.js';
interface RemoteModule {
  openRemoteReplica(url: string, options: { secretFile?: string; serverCommand?: string; sshCommand?: string }): Promise<Replica>;
}

function isRemote(root: string): boolean {
  return /^(tcp|ssh):\/\//.test(root);
}

async function openReplica(root: string, args: ParsedArgs): Promise<Replica> {
  if (!isRemote(root)) {
    const { LocalReplica } = await import('./local.js');
    return new LocalReplica(root, { fsync: args.fsync });
  }
  let remote: RemoteModule;
  try {
    remote = (await import(REMOTE_MODULE)) as RemoteModule;
  } catch (error) {
    throw new ReplicaError('ENOROOT', `remote roots are not available in this build: ${(error as Error).message}`);
  }
  return remote.openRemoteReplica(root, {
    secretFile: args.secretFile,
    serverCommand: args.serverCommand,
    sshCommand: args.sshCommand,
  });
}

function resolvePrefer(value: string | undefined, roots: string[]): Prefer | undefined {
  if (value === undefined) return undefined;
  if (value === 'newer' || value === 'older') return value;
  for (const side of [1, 2] as const) {
    const root = roots[side - 1]!;
    if (value === root) return side;
    if (!isRemote(root) && !isRemote(value) && pathModule.resolve(value) === pathModule.resolve(root)) return side;
  }
  throw new UsageError(`--prefer ${value}: not one of the roots (${roots.join(', ')}), "newer" or "older"`);
}

const KIND_WORD: Record<string, string> = { file: 'file', dir: 'dir', symlink: 'link' };

function describe(change: PlanItem['change1'], kind: string | undefined): string {
  switch (change) {
    case 'new':
      return `new ${KIND_WORD[kind ?? 'file']}`;
    case 'modified':
      return 'changed';
    case 'deleted':
      return 'deleted';
    case 'props':
      return 'props';
    default:
      return '';
  }
}

function arrowOf(item: PlanItem): string {
  if (item.action === 'conflict' && item.resolvedBy === undefined) return '<-?->';
  if (item.action === 'equal') return '<-=->';
  return item.from === 1 ? '---->' : '<----';
}

/** A path as printed: control characters escaped so a hostile name cannot rewrite the terminal. */
function printable(path: string): string {
  // eslint-disable-next-line no-control-regex
  return /[\x00-\x1f\x7f]/.test(path) ? JSON.stringify(path) : path;
}

export function formatPlan(items: PlanItem[]): string {
  const lines: string[] = [];
  for (const item of items) lines.push(planLine(item));
  return lines.join('\n') + (lines.length > 0 ? '\n' : '');
}

function planLine(item: PlanItem): string {
  let line = `${describe(item.change1, item.kind1).padEnd(9)} ${arrowOf(item)} ${describe(item.change2, item.kind2).padEnd(9)} ${printable(item.path)}`;
  if (item.action === 'conflict') line += `  [conflict: ${item.reason}${item.resolvedBy !== undefined ? `; resolved: ${item.resolvedBy}` : ''}]`;
  if (item.status === 'failed') line += `  [failed: ${item.error}]`;
  return line;
}

/** The plan written to stdout in pieces of PLAN_WRITE_LINES lines: an initial sync of 100,000 paths otherwise
 * holds every line and their 6 MB join at once, at the run's memory peak. */
const PLAN_WRITE_LINES = 2048;
function writePlan(result: SyncResult, onlyFailed: boolean): void {
  // The engine's chunks are made as they are written (packed new paths have no PlanItem otherwise).
  const chunks: Iterable<PlanItem[]> = result.itemChunks?.(PLAN_WRITE_LINES) ?? sliced(result.items, PLAN_WRITE_LINES);
  for (const chunk of chunks) {
    const shown = onlyFailed ? chunk.filter((item) => item.status === 'failed') : chunk;
    if (shown.length > 0) process.stdout.write(formatPlan(shown));
  }
}

function* sliced(items: PlanItem[], size: number): Generator<PlanItem[]> {
  for (let start = 0; start < items.length; start += size) yield items.slice(start, start + size);
}

function summary(result: SyncResult): string {
  const { counts } = result;
  return (
    `dirsync: ${counts.propagated} propagated, ${counts.equal} already equal, ${counts.skipped} skipped, ${counts.failed} failed` +
    (result.fatal !== undefined ? `; fatal: ${result.fatal}` : '') +
    '\n'
  );
}

async function askYesNo(question: string): Promise<boolean> {
  const { createInterface } = await import('node:readline/promises');
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    const answer = await rl.question(question);
    return /^y(es)?$/i.test(answer.trim());
  } catch {
    return false;
  } finally {
    rl.close();
  }
}

async function syncOnce(args: ParsedArgs): Promise<number> {
  const prefer = resolvePrefer(args.prefer, args.roots);
  compileIgnore(args.ignore); // bad patterns are a usage error before anything is opened
  const replicas: Replica[] = [];
  const warn = (message: string): void => void process.stderr.write(`dirsync: ${message}\n`);
  const archiveDir = args.archiveDir ?? defaultArchiveDir();
  const early =
    !isRemote(args.roots[0]!) && !isRemote(args.roots[1]!) && args.ignore.length === 0 && !args.dryRun
      ? await startEarly([args.roots[0]!, args.roots[1]!], archiveDir, warn)
      : undefined;
  try {
    const { SyncEngine } = await import('./engine.js');
    for (const root of args.roots) replicas.push(await openReplica(root, args));
    const showProgress = process.stderr.isTTY === true && !args.json;
    let lastProgressMs = 0;
    const options: SyncOptions = {
      batch: args.batch,
      prefer,
      copyOnConflict: args.copyOnConflict,
      ignore: args.ignore,
      times: args.times,
      perms: args.perms,
      alwaysHash: args.alwaysHash,
      archiveDir,
      dryRun: args.dryRun,
      local: [!isRemote(args.roots[0]!), !isRemote(args.roots[1]!)],
      warn,
      early,
      progress: showProgress
        ? (state) => {
            const now = Date.now();
            if (now - lastProgressMs < 200 && state.itemsDone < state.itemsTotal) return;
            lastProgressMs = now;
            const mb = (bytes: number): string => (bytes / 1e6).toFixed(1);
            process.stderr.write(`\r  ${state.itemsDone}/${state.itemsTotal} items, ${mb(state.bytesDone)}/${mb(state.bytesTotal)} MB `);
            if (state.itemsDone >= state.itemsTotal) process.stderr.write('\n');
          }
        : undefined,
      confirm: args.batch
        ? undefined
        : async (plan, warnings) => {
            if (!args.json) process.stdout.write(formatPlan(plan));
            for (const warning of warnings) process.stderr.write(`dirsync: WARNING: ${warning}\n`);
            const changes = plan.filter((item) => item.action !== 'equal' && (item.action !== 'conflict' || item.resolvedBy !== undefined)).length;
            const conflicts = plan.filter((item) => item.action === 'conflict' && item.resolvedBy === undefined).length;
            return askYesNo(`Propagate ${changes} change(s)${conflicts > 0 ? ` (${conflicts} conflict(s) will be skipped)` : ''}? [y/N] `);
          },
    };
    const engine = new SyncEngine(replicas[0]!, replicas[1]!, options);
    const result = await engine.run();
    if (args.json) {
      process.stdout.write(JSON.stringify(result) + '\n');
    } else {
      writePlan(result, !(args.batch || args.dryRun || result.fatal !== undefined));
      if (result.fatal !== undefined) process.stderr.write(`drbdts dirsync: ${result.fatal}\n`);
      process.stderr.write(summary(result));
    }
    return result.exitCode;
  } finally {
    // The engine released it (or never got it, if something failed before it ran): a no-op after the first.
    early?.lock.release();
    for (const replica of replicas) await replica.close().catch(() => undefined);
  }
}

async function runDirsync(argv: string[]): Promise<number> {
  let args: ParsedArgs;
  try {
    args = parseArgs(argv);
    if (args.help) {
      process.stdout.write(dirsyncUsage);
      return 0;
    }
    if (args.roots.length !== 2) throw new UsageError(`expected two roots, got ${args.roots.length}`);
    resolvePrefer(args.prefer, args.roots);
    compileIgnore(args.ignore);
  } catch (error) {
    if (error instanceof UsageError || error instanceof ReplicaError) {
      process.stderr.write(`drbdts dirsync: ${error.message}\n\n${dirsyncUsage}`);
      return 3;
    }
    throw error;
  }
  const runSafely = async (): Promise<number> => {
    try {
      return await syncOnce(args);
    } catch (error) {
      if (error instanceof ReplicaError || error instanceof UsageError) {
        process.stderr.write(`drbdts dirsync: ${error.message}\n`);
        return 3;
      }
      throw error;
    }
  };
  if (!args.watch) return runSafely();
  let watch: { runWatch(options: unknown): Promise<number> };
  try {
    watch = (await import(WATCH_MODULE)) as { runWatch(options: unknown): Promise<number> };
  } catch (error) {
    process.stderr.write(`drbdts dirsync: --watch is not available in this build: ${(error as Error).message}\n`);
    return 3;
  }
  return watch.runWatch({
    roots: args.roots,
    ignore: args.ignore,
    syncOnce: runSafely,
    // A remote root is watched by its server over a second connection with the same credentials.
    remote: { secretFile: args.secretFile, serverCommand: args.serverCommand, sshCommand: args.sshCommand },
    log: (message: string) => process.stderr.write(`dirsync: ${message}\n`),
  });
}

export async function run(command: string, argv: string[]): Promise<number> {
  if (command === 'dirsync-server') {
    const server = await import('./server.js');
    return server.runDirsyncServer(argv);
  }
  return runDirsync(argv);
}
