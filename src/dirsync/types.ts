// The types every phase of a run shares (engine.ts runs the phases): the sides, the options, the plan's items and
// the run's result, and the small rules about paths and properties that more than one phase applies.
import type { EarlyStart } from './early.js';
import type { EntryStat } from './replica.js';

export type Side = 1 | 2;
export type Prefer = Side | 'newer' | 'older';

export interface SyncOptions {
  batch: boolean;
  prefer?: Prefer;
  copyOnConflict: boolean;
  ignore: string[];
  times: boolean;
  perms: boolean;
  alwaysHash: boolean;
  archiveDir: string;
  dryRun: boolean;
  /** Use delta transfer for files at least this big when the target holds an old version (only when a side is
   * remote: between two local roots a plain copy is cheaper than reading both files). */
  deltaThresholdBytes?: number;
  /** Whether each replica is local (decides delta vs full copy). */
  local: [boolean, boolean];
  /** Interactive mode: shown the plan, answers whether to propagate. */
  confirm?: (plan: PlanItem[], warnings: string[]) => Promise<boolean>;
  /** Called after each propagated item (progress display). */
  progress?: (state: ProgressState) => void;
  /** Lock, scans and archive load already started by the CLI (early.ts). The engine takes them over when they
   * match its own view of the run, otherwise it releases that lock and starts again. */
  early?: EarlyStart;
  warn: (message: string) => void;
}

export interface ProgressState {
  itemsDone: number;
  itemsTotal: number;
  bytesDone: number;
  bytesTotal: number;
}

/** How one side of a path changed since the archive. */
export type ChangeKind = 'unchanged' | 'new' | 'modified' | 'deleted' | 'props' | 'absent';

export type ActionKind = 'copy' | 'delete' | 'props' | 'conflict' | 'equal';

export interface PlanItem {
  path: string;
  action: ActionKind;
  /** Direction of propagation: the side whose state wins (copy, delete, props). */
  from?: Side;
  change1: ChangeKind;
  change2: ChangeKind;
  kind1?: EntryStat['kind'];
  kind2?: EntryStat['kind'];
  reason?: string;
  /** Resolved conflict (by --prefer). */
  resolvedBy?: string;
  status: 'planned' | 'done' | 'skipped' | 'failed';
  error?: string;
  /** Copy: how the content travelled ('full', 'delta', 'local'). */
  transfer?: 'full' | 'delta' | 'local';
}

export interface SyncResult {
  exitCode: 0 | 1 | 2 | 3;
  root1: string;
  root2: string;
  /** The plan, in path order. With packed new paths (detect/new-paths.ts) a getter that makes the array when asked. */
  items: PlanItem[];
  /** The same items, `size` at a time, made as they are given (not part of the JSON output): printing the plan
   * of an initial sync this way never holds 100,000 PlanItems at once. */
  itemChunks?: (size: number) => Iterable<PlanItem[]>;
  counts: { propagated: number; skipped: number; failed: number; equal: number };
  bytesTransferred: number;
  fatal?: string;
  archiveFile?: string;
  /** Paths that could not be scanned or hashed (skipped, with the reason). */
  problems?: Problem[];
}

/** A path that could not be scanned or hashed: not synced this run, retried by the next. */
export interface Problem {
  side: Side;
  path: string;
  message: string;
}

/** Modification-time differences below this are not changes (FAT, some network file systems: 1-2 s granularity). */
export const TIME_TOLERANCE_MS = 1000;

export function other(side: Side): Side {
  return side === 1 ? 2 : 1;
}

/** Mode as compared for props (symlink bits are meaningless on Linux). */
export function modeOf(entry: EntryStat): number {
  return entry.kind === 'symlink' ? 0 : entry.mode;
}

export function parentOf(path: string): string {
  const index = path.lastIndexOf('/');
  return index === -1 ? '' : path.slice(0, index);
}

export function depthOf(path: string): number {
  let depth = 0;
  for (let index = path.indexOf('/'); index !== -1; index = path.indexOf('/', index + 1)) depth++;
  return depth;
}

/**
 * The scans' path order (LocalReplica.scan and the addon): a directory's entries in name order (UTF-16 code units,
 * JavaScript's sort and the addon's Utf16Less), then the subtrees of its subdirectories in name order. So of two
 * paths below the same directory, a direct entry of it comes first; otherwise their first differing components
 * decide.
 */
export function comparePaths(x: string, y: string): number {
  const n = x.length < y.length ? x.length : y.length;
  let i = 0;
  while (i < n && x.charCodeAt(i) === y.charCodeAt(i)) i++;
  if (i === x.length && i === y.length) return 0;
  const start = i === 0 ? 0 : x.lastIndexOf('/', i - 1) + 1;
  const endX = x.indexOf('/', start);
  const endY = y.indexOf('/', start);
  if ((endX === -1) !== (endY === -1)) return endX === -1 ? -1 : 1;
  // Same depth below the common directory: the components' code-unit order (a prefix first).
  if (i >= (endX === -1 ? x.length : endX)) return -1;
  if (i >= (endY === -1 ? y.length : endY)) return 1;
  return x.charCodeAt(i) - y.charCodeAt(i);
}

/** DRBDTS_DIRSYNC_TRACE=1: one line per phase on stderr, time and memory (docs/dirsync.md, "Performance"). */
const TRACE = process.env.DRBDTS_DIRSYNC_TRACE === '1';
export function trace(phase: string): void {
  if (!TRACE) return;
  const m = process.memoryUsage();
  const mib = (n: number): string => (n / 1048576).toFixed(0);
  process.stderr.write(`trace ${phase} ${performance.now().toFixed(0)} ms rss ${mib(m.rss)} heapTotal ${mib(m.heapTotal)} heapUsed ${mib(m.heapUsed)} external ${mib(m.external)} arrayBuffers ${mib(m.arrayBuffers)}\n`);
}
