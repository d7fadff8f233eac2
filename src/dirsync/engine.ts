// The sync engine: update detection against the archive, reconciliation, the plan, propagation, and the archive
// commit. It sees the two roots only through the Replica interface (replica.ts), so the same code syncs local
// directories, tcp:// and ssh:// roots.
//
// One run:
//   1. open both replicas, take the pair's lock, load the archive;
//   2. scan both sides (in parallel), then hash only the files whose fast check (size, mtime, ctime, inode against
//      the archive) failed, or that are new on both sides, or that may be copied locally on the other side;
//   3. classify each path per side (unchanged, new, modified, deleted, props) and reconcile the pair into actions
//      or conflicts, in path order so that a decision on a directory governs its subtree;
//   4. check deletion safety, show the plan, ask (or, with --batch, go on);
//   5. propagate: renames of conflict losers and deletions (deepest first), directories (shallowest first), files
//      and links (bounded parallelism), deferred deletions, properties;
//   6. commit the archive with exactly the paths that synced, release the lock.
import {
  ArchiveBuilder,
  ArchiveError,
  archivePathFor,
  ArchiveTable,
  loadArchiveData,
  PairLock,
  saveArchive,
  saveArchiveBuilder,
  type ArchiveEntry,
} from './archive.js';
import type { EarlyStart } from './early.js';
import { executeFileOp, type FileOp, type FileOpResult } from './fileop.js';
import { LocalReplica, packedEntry } from './local.js';
import { NEW_DONE, NEW_FAILED, NEW_PLANNED, NEW_SKIPPED, NewPaths, packedNewEnabled } from './new-paths.js';
import {
  COPY_DONE,
  COPY_FAILURE_CODES,
  COPY_IN_FIELDS,
  COPY_OUT_FIELDS,
  nativeCopier,
  type CopyBatchResult,
  joinPacked as nativeJoin,
  problemOffsets, SCAN_DIR, SCAN_FILE, SCAN_RECORD_FIELDS, SCAN_SYMLINK, type JoinResult, type PackedScan } from '../native/scan.js';
import {
  ReplicaError,
  sameStat,
  type EntryStat,
  type Replica,
  type ReplicaErrorCode,
  type ReplicaInfo,
  type ScanEntry,
} from './replica.js';

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
  /** The plan, in path order. With packed new paths (new-paths.ts) a getter that makes the array when asked. */
  items: PlanItem[];
  /** The same items, `size` at a time, made as they are given (not part of the JSON output): printing the plan
   * of an initial sync this way never holds 100,000 PlanItems at once. */
  itemChunks?: (size: number) => Iterable<PlanItem[]>;
  counts: { propagated: number; skipped: number; failed: number; equal: number };
  bytesTransferred: number;
  fatal?: string;
  archiveFile?: string;
  /** Paths that could not be scanned or hashed (skipped, with the reason). */
  problems?: Array<{ side: Side; path: string; message: string }>;
}

interface PathState {
  path: string;
  e1: ScanEntry | undefined;
  e2: ScanEntry | undefined;
  a: ArchiveEntry | undefined;
  fp1?: string;
  fp2?: string;
  change1: ChangeKind;
  change2: ChangeKind;
  /** Inside a directory that could not be listed on that side: its state is unknown, nothing is decided. */
  unknown: boolean;
  /** Unchanged on both sides: the archive entry is kept, with refreshed stamps if they moved. */
  refresh?: boolean;
  /** The path's action, when reconcile made one (the archive is built from it). */
  action: Action | undefined;
}

interface Action {
  item: PlanItem;
  state: PathState;
  /** Side that wins (copy, delete, props). */
  from: Side;
  /** Rename the loser to this conflict name before changing the path (copy-on-conflict). */
  keepLoserAs?: string;
  /** Entry the target had at scan time (precondition), or undefined (absent). */
  target?: ScanEntry;
  /** The target holds a different kind that must be removed before the create. */
  removeTargetFirst?: boolean;
  /** After a successful propagation: the target side's final stat, and (files) the installed content's
   * fingerprint, for the archive. Fields of the action rather than maps keyed by it: one fewer hash-table entry
   * per path (every path of an initial sync has an action). */
  resultStat: EntryStat | undefined;
  resultFingerprint: string | undefined;
  /** A native copy's result instead (its row in SyncEngine.copyResults, -1 for none): numbers, not objects. */
  resultRow: number;
}

const HASH_BATCH_PATHS = 256;
const PLAN_CHUNK_ITEMS = 4096;
/** Errors meaning the link to a remote root is gone or unusable: the run stops instead of failing path by path. */
const CONNECTION_FATAL = new Set(['ECONN', 'EPROTO', 'EAUTH']);
const PARALLEL_TRANSFERS = 16;
/** Below this many files the start-up of copy workers (~30 ms each) costs more than it saves. */
const WORKER_MIN_FILES = 256;
const WORKER_SLICE_OPS = 64;
const DEFAULT_COPY_WORKERS = 3;
/** Operations per native copy job (one thread-pool hop): enough to amortise the hop, few enough to spread. */
const NATIVE_COPY_BATCH_OPS = 64;
/** A native copy's result row: the installed file's kind, size, mtimeMs, ctimeMs, inode, mode (COPY_OUT_FIELDS
 * without the status). */
const COPY_ROW_FIELDS = COPY_OUT_FIELDS - 1;
const WORKER_YOUNG_GENERATION_MB = 4;
const DEFAULT_DELTA_THRESHOLD_BYTES = 256 * 1024;
/** Modification-time differences below this are not changes (FAT, some network file systems: 1-2 s granularity). */
const TIME_TOLERANCE_MS = 1000;

/** Every field present from the start: one object shape for all paths, no property store added per path later
 * (fp1, fp2 and refresh are set on most paths after the scan). */
function newState(path: string, a: ArchiveEntry | undefined): PathState {
  return { path, e1: undefined, e2: undefined, a, fp1: undefined, fp2: undefined, change1: 'absent', change2: 'absent', unknown: false, refresh: false, action: undefined };
}

function other(side: Side): Side {
  return side === 1 ? 2 : 1;
}

function parentOf(path: string): string {
  const index = path.lastIndexOf('/');
  return index === -1 ? '' : path.slice(0, index);
}

function depthOf(path: string): number {
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
function comparePaths(x: string, y: string): number {
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

/** Buffer's own UTF-8 decoder without toString's argument handling (as in local.ts). */
const utf8Slice = (Buffer.prototype as unknown as { utf8Slice(start: number, end: number): string }).utf8Slice;

const KIND_OF_CODE: Record<number, EntryStat['kind']> = { [SCAN_FILE]: 'file', [SCAN_DIR]: 'dir', [SCAN_SYMLINK]: 'symlink' };

/** A packed scan is not in the order comparePaths expects (never seen; the merge then falls back). */
class ScanOrderError extends Error {}

/**
 * One side's packed scan records, walked in scan order (records past SCAN_SYMLINK, the problems, are skipped):
 * `path` is the current record's path (undefined at the end), `offset` its first field. Throws ScanOrderError
 * when a path does not sort after the one before it.
 */
class ScanCursor {
  offset = -SCAN_RECORD_FIELDS;
  path: string | undefined = undefined;

  constructor(private readonly records: Float64Array, private readonly strings: Buffer) {}

  next(): void {
    const F = SCAN_RECORD_FIELDS;
    const records = this.records;
    const previous = this.path;
    this.path = undefined;
    for (this.offset += F; this.offset < records.length; this.offset += F) {
      const o = this.offset;
      const start = o === 0 ? 0 : records[o - F + 3]!;
      if (records[o]! > SCAN_SYMLINK) continue;
      this.path = utf8Slice.call(this.strings, start, records[o + 2]!);
      if (previous !== undefined && comparePaths(previous, this.path) >= 0) throw new ScanOrderError();
      return;
    }
  }
}

function conflictName(path: string, now: Date): string {
  const stamp = now.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
  const slash = path.lastIndexOf('/');
  const dir = slash === -1 ? '' : path.slice(0, slash + 1);
  const name = path.slice(slash + 1);
  const dot = name.lastIndexOf('.');
  // Keep the extension last so the copy still opens with the right program: "report (conflict 20261122T0705Z).txt".
  return dot > 0
    ? `${dir}${name.slice(0, dot)} (conflict ${stamp})${name.slice(dot)}`
    : `${dir}${name} (conflict ${stamp})`;
}

function entryOf(state: PathState, side: Side): ScanEntry | undefined {
  return side === 1 ? state.e1 : state.e2;
}

function fingerprintOf(state: PathState, side: Side): string | undefined {
  return side === 1 ? state.fp1 : state.fp2;
}

/** Mode as compared for props (symlink bits are meaningless on Linux). */
function modeOf(entry: EntryStat): number {
  return entry.kind === 'symlink' ? 0 : entry.mode;
}

/** The archive entry of a path unchanged on both sides: the same object when no stamp moved (no allocation). */
function refreshed(a: ArchiveEntry, e1: EntryStat, e2: EntryStat): ArchiveEntry {
  if (
    a.mtime1Ms === e1.mtimeMs &&
    a.ctime1Ms === e1.ctimeMs &&
    a.inode1 === e1.inode &&
    a.mtime2Ms === e2.mtimeMs &&
    a.ctime2Ms === e2.ctimeMs &&
    a.inode2 === e2.inode
  ) {
    return a;
  }
  return {
    ...a,
    mtime1Ms: e1.mtimeMs,
    ctime1Ms: e1.ctimeMs,
    inode1: e1.inode,
    mtime2Ms: e2.mtimeMs,
    ctime2Ms: e2.ctimeMs,
    inode2: e2.inode,
  };
}

function archivesEqual(before: Map<string, ArchiveEntry>, after: Map<string, ArchiveEntry>): boolean {
  if (before.size !== after.size) return false;
  for (const [path, entry] of after) {
    const old = before.get(path);
    if (old === entry) continue;
    if (
      old === undefined ||
      old.kind !== entry.kind ||
      old.sizeBytes !== entry.sizeBytes ||
      old.fingerprint !== entry.fingerprint ||
      old.mode !== entry.mode ||
      old.linkTarget !== entry.linkTarget ||
      old.mtime1Ms !== entry.mtime1Ms ||
      old.ctime1Ms !== entry.ctime1Ms ||
      old.inode1 !== entry.inode1 ||
      old.mtime2Ms !== entry.mtime2Ms ||
      old.ctime2Ms !== entry.ctime2Ms ||
      old.inode2 !== entry.inode2
    ) {
      return false;
    }
  }
  return true;
}

/** DRBDTS_DIRSYNC_TRACE=1: one line per phase on stderr, time and memory (docs/dirsync.md, "Performance"). */
const TRACE = process.env.DRBDTS_DIRSYNC_TRACE === '1';
function trace(phase: string): void {
  if (!TRACE) return;
  const m = process.memoryUsage();
  const mib = (n: number): string => (n / 1048576).toFixed(0);
  process.stderr.write(`trace ${phase} ${performance.now().toFixed(0)} ms rss ${mib(m.rss)} heapTotal ${mib(m.heapTotal)} heapUsed ${mib(m.heapUsed)} external ${mib(m.external)} arrayBuffers ${mib(m.arrayBuffers)}\n`);
}

export class SyncEngine {
  private readonly options: SyncOptions;
  private readonly replicas: [Replica, Replica];
  private infos!: [ReplicaInfo, ReplicaInfo];
  private archive = new Map<string, ArchiveEntry>();
  /** Every path, in insertion order = path order: parents before children (not necessarily string-sorted). */
  private readonly states = new Map<string, PathState>();
  private bytesTransferred = 0;
  private readonly problems: Array<{ side: Side; path: string; message: string }> = [];
  private connectionLost: ReplicaError | undefined;
  /**
   * Packed scans only: archive entries of the paths found identical to the archive on both sides (same kind,
   * size, mode, link target and all stamps, nothing changed above them). Those paths never become PathStates:
   * they cannot be part of any action, and the new archive keeps their entries as they are.
   */
  private clean: Set<ArchiveEntry> | undefined;
  /** Packed scans only: sizes of the clean files (their fingerprints are known: copy-local candidates). */
  private readonly cleanSizes = new Set<number>();
  /**
   * The loaded format 2 archive, kept as its packed table while the native join can use it (two packed scans);
   * otherwise it is turned into `archive` (a map) and this is undefined.
   */
  private table: ArchiveTable | undefined;
  /**
   * Set by the native join (table mode): per archive entry 0 = no scanned path, 1 = clean, 2 = a state's entry.
   * In table mode `archive` stays empty, `clean` undefined: the table and these flags take their place.
   */
  private flags: Uint8Array | undefined;
  private cleanInTable = 0;
  /** DRBDTS_DIRSYNC_PACKED_NEW (read once per run: a bad value is a fatal error before anything is done). */
  private packedNewWanted = true;
  /**
   * Packed scans only: the paths new on one side that never become states (new-paths.ts). A path is one when it
   * has no archive entry, is absent on the other side, is a file or a directory, is no copy-local candidate (no
   * archive file has its size), and each of its ancestors is a clean path, a directory on both sides whose
   * modes cannot conflict, or itself such a new directory of the same side: then no decision above it can govern
   * it, and its own decision is "copy from its side, target absent", a mkdir or a native copy.
   */
  private newPaths: NewPaths | undefined;
  private packedScans: [PackedScan, PackedScan] | undefined;
  /** Directories below which a new path may be packed: 0 = on both sides (safe), 1 or 2 = a packed new
   * directory of that side. A directory that is a state and not listed here is not safe; one that is neither
   * a state nor listed is clean. */
  private readonly newParents = new Map<string, number>();
  /** Sizes of the archive's files, sorted (a superset of the copy-local candidates' sizes): made at the first
   * new file that asks. */
  private archiveFileSizes: Float64Array | undefined;
  /** mkdir results of packed new directories, by their index in newPaths (directories are few). */
  private readonly newDirStats = new Map<number, EntryStat>();
  private newParentCache = '';
  private newParentCacheValue: number | undefined = undefined;

  constructor(replica1: Replica, replica2: Replica, options: SyncOptions) {
    this.replicas = [replica1, replica2];
    this.options = options;
  }

  private replica(side: Side): Replica {
    return this.replicas[side - 1]!;
  }

  async run(): Promise<SyncResult> {
    const result: SyncResult = {
      exitCode: 0,
      root1: '?',
      root2: '?',
      items: [],
      counts: { propagated: 0, skipped: 0, failed: 0, equal: 0 },
      bytesTransferred: 0,
    };
    let early = this.options.early;
    // An early start's lock is this run's from here on: released in `finally` whatever happens.
    let lock: PairLock | undefined = early?.lock;
    try {
      this.packedNewWanted = packedNewEnabled();
      this.infos = [await this.replicas[0].open(), await this.replicas[1].open()];
      result.root1 = this.infos[0].rootId;
      result.root2 = this.infos[1].rootId;
      const id1 = `${this.infos[0].hostName}:${this.infos[0].rootId}`;
      const id2 = `${this.infos[1].hostName}:${this.infos[1].rootId}`;
      if (early !== undefined && !this.earlyMatches(early, id1, id2)) {
        early.lock.release();
        lock = undefined;
        early = undefined;
      }
      if (id1 === id2) throw new ReplicaError('ENOROOT', `both roots are the same directory (${result.root1})`);
      const { file, swapped } = early ?? (await archivePathFor(this.options.archiveDir, id1, id2));
      result.archiveFile = file;
      if (!this.options.dryRun && lock === undefined) lock = PairLock.acquire(file, this.options.warn);
      // The scans start first: a local replica's scan runs on thread-pool threads (native/src/dirsync_scan.cc)
      // while this thread parses the archive; the archive is merged into the states only after both scans.
      const scanning = early !== undefined ? early.scans.then((packed) => ({ packed })) : this.scanBoth();
      scanning.catch(() => undefined); // a scan failure is observed below, never an unhandled rejection meanwhile
      let loaded: ArchiveTable | Map<string, ArchiveEntry>;
      try {
        loaded = await (early?.archive ?? loadArchiveData(file, swapped));
      } catch (error) {
        await scanning.catch(() => undefined);
        throw error;
      }
      const scanned = await scanning;
      if (loaded instanceof ArchiveTable && !Array.isArray(scanned)) this.table = loaded;
      else this.archive = loaded instanceof ArchiveTable ? loaded.toMap() : loaded;
      trace('scanned');
      const problems = Array.isArray(scanned) ? scanned : this.mergePacked(scanned.packed);
      trace('joined');
      this.mergeArchive();
      await this.detectUpdates(problems);
      trace('detected');
      const actions = this.reconcile();
      trace('reconciled');
      for (const action of actions) action.state.action = action;
      this.exposeItems(result, actions);
      const warnings = this.deletionSafety(actions);
      if (warnings.length > 0 && this.options.batch && !this.options.dryRun) {
        throw new ReplicaError('ENOROOT', warnings.join('; ') + '; refusing to propagate in batch mode (run without --batch to confirm)');
      }
      const toPropagate = actions.filter((action) => action.item.action !== 'conflict' && action.item.status === 'planned');
      let proceed = !this.options.dryRun;
      if (proceed && this.options.confirm !== undefined && (this.newCount() > 0 || toPropagate.some((a) => a.item.action !== 'equal'))) {
        proceed = await this.options.confirm(result.items, warnings);
      }
      if (proceed) {
        await this.propagate(actions);
        trace('propagated');
        // Nothing changed (the common cron case): skip building the new archive, the write and its two fsyncs.
        if (!this.archiveUnchanged(actions)) {
          const roots = { root1Id: id1, root2Id: id2 };
          if (this.flags !== undefined) {
            // Table mode: clean entries are copied as they are from the loaded file; an identical result is not written.
            await saveArchiveBuilder(file, swapped, roots, this.buildArchiveTable(swapped), this.table);
          } else if (this.archive.size === 0) {
            // No archive before (a first sync): the entries go straight to the encoder, no map of them; an empty
            // result is an unchanged (absent) archive, as archivesEqual would find.
            const builder = new ArchiveBuilder(swapped);
            this.buildArchive((path, entry) => builder.add(path, entry));
            if (builder.count > 0) await saveArchiveBuilder(file, swapped, roots, builder);
          } else {
            const newArchive = new Map<string, ArchiveEntry>();
            this.buildArchive((path, entry) => void newArchive.set(path, entry));
            if (!archivesEqual(this.archive, newArchive)) await saveArchive(file, swapped, roots, newArchive);
          }
        }
        trace('archived');
        if (this.connectionLost !== undefined) throw this.connectionLost;
      } else if (!this.options.dryRun) {
        // The user declined: everything planned is skipped (exit 1). A dry run leaves items 'planned'.
        for (const action of actions) if (action.item.status === 'planned' && action.item.action !== 'equal') action.item.status = 'skipped';
        const status = this.newPaths?.status;
        for (let k = 0; k < this.newCount(); k++) if (status![k] === NEW_PLANNED) status![k] = NEW_SKIPPED;
      }
      for (const { item } of actions) {
        if ((item.action === 'conflict' && item.resolvedBy === undefined) || item.status === 'skipped') result.counts.skipped++;
        else if (item.status === 'failed') result.counts.failed++;
        else if (item.action === 'equal') result.counts.equal++;
        else if (item.status === 'done') result.counts.propagated++;
      }
      // Packed new paths: copies, counted as their items would be.
      for (let k = 0; k < this.newCount(); k++) {
        const status = this.newPaths!.status[k];
        if (status === NEW_SKIPPED) result.counts.skipped++;
        else if (status === NEW_FAILED) result.counts.failed++;
        else if (status === NEW_DONE) result.counts.propagated++;
      }
      // Paths that could not be read at all (unlistable directories, unreadable files) are failures too: they
      // were not synced, and the next run retries them.
      result.problems = this.problems;
      result.counts.failed += this.problems.length;
      result.exitCode = result.counts.failed > 0 ? 2 : result.counts.skipped > 0 ? 1 : 0;
    } catch (error) {
      if (!(error instanceof ReplicaError) && !(error instanceof ArchiveError)) throw error;
      result.fatal = error.message;
      result.exitCode = 3;
    } finally {
      lock?.release();
      result.bytesTransferred = this.bytesTransferred;
    }
    return result;
  }

  /** Does an early start (early.ts) describe exactly the run this engine would start? */
  private earlyMatches(early: EarlyStart, id1: string, id2: string): boolean {
    const [r1, r2] = this.replicas;
    return (
      !this.options.dryRun &&
      this.options.ignore.length === 0 &&
      r1.constructor === LocalReplica &&
      r2.constructor === LocalReplica &&
      (r1 as LocalReplica).rootPath === early.roots[0] &&
      (r2 as LocalReplica).rootPath === early.roots[1] &&
      early.ids[0] === id1 &&
      early.ids[1] === id2 &&
      early.archiveDir === this.options.archiveDir
    );
  }

  // ---- scanning and update detection -------------------------------------------------------------------------

  private async scanBoth(): Promise<[Set<string>, Set<string>] | { packed: [PackedScan, PackedScan] }> {
    // Two plain local roots scanned by the addon: keep the packed results, merged with the archive later.
    const [r1, r2] = this.replicas;
    if (r1.constructor === LocalReplica && r2.constructor === LocalReplica) {
      const options = { ignore: this.options.ignore };
      const packed = await Promise.all([(r1 as LocalReplica).scanPacked(options), (r2 as LocalReplica).scanPacked(options)]);
      if (packed[0] !== undefined && packed[1] !== undefined) return { packed: packed as [PackedScan, PackedScan] };
    }
    return this.scanEntries();
  }

  private async scanEntries(): Promise<[Set<string>, Set<string>]> {
    const problems: [Set<string>, Set<string>] = [new Set(), new Set()];
    const scanSide = async (side: Side): Promise<void> => {
      for await (const batch of this.replica(side).scan({ ignore: this.options.ignore })) {
        for (const entry of batch.entries) {
          let state = this.states.get(entry.path);
          if (state === undefined) {
            state = newState(entry.path, undefined);
            this.states.set(entry.path, state);
          }
          if (side === 1) state.e1 = entry;
          else state.e2 = entry;
        }
        for (const problem of batch.problems) {
          problems[side - 1].add(problem.path);
          this.problems.push({ side, path: problem.path, message: problem.message });
          this.options.warn(`root ${side}: ${problem.path}: ${problem.message} (skipped)`);
        }
      }
    };
    await Promise.all([scanSide(1), scanSide(2)]);
    return problems;
  }

  /**
   * Merge-join the two packed scans (both in comparePaths order) with the archive. A path present on both sides
   * whose records equal its archive entry in everything the update detection looks at, and that lies under no
   * path that differs, is clean: it would be "unchanged" on both sides with no action and an identical archive
   * entry, so it gets no objects at all. Every other path becomes a PathState as scanEntries would make it.
   * With any scan problem (an unknown subtree) or --always-hash nothing is clean.
   */
  private mergePacked(packed: [PackedScan, PackedScan]): [Set<string>, Set<string>] {
    const problems: [Set<string>, Set<string>] = [new Set(), new Set()];
    const F = SCAN_RECORD_FIELDS;
    for (const side of [1, 2] as const) {
      const { strings, records } = packed[side - 1];
      const replica = this.replica(side) as LocalReplica;
      for (const o of problemOffsets(records)) {
        const textStart = o === 0 ? 0 : records[o - F + 3]!;
        const pathEnd = records[o + 2]!;
        const textEnd = records[o + 3]!;
        const path = pathEnd > textStart ? utf8Slice.call(strings, textStart, pathEnd) : '';
        const problem = replica.packedProblem(records[o]!, path, textEnd > pathEnd ? utf8Slice.call(strings, pathEnd, textEnd) : '');
        if (problem === undefined) continue;
        problems[side - 1].add(problem.path);
        this.problems.push({ side, path: problem.path, message: problem.message });
        this.options.warn(`root ${side}: ${problem.path}: ${problem.message} (skipped)`);
      }
    }
    const allowClean = problems[0].size === 0 && problems[1].size === 0 && !this.options.alwaysHash;
    this.startPackingNew(packed, allowClean);
    if (this.table !== undefined) {
      const joined = nativeJoin(packed[0], packed[1], this.table, allowClean);
      if (joined?.kind === 'duplicate') throw this.table.duplicatePath();
      if (joined?.kind === 'joined') {
        this.applyNativeJoin(packed, joined);
        return problems;
      }
      // No native join (or a scan out of order): the archive as a map, and the JavaScript join below.
      this.archive = this.table.toMap();
      this.table = undefined;
      this.startPackingNew(packed, allowClean);
      if (joined?.kind === 'order') {
        this.statePerPath(packed);
        return problems;
      }
    }
    try {
      this.joinPacked(packed, allowClean);
    } catch (error) {
      if (!(error instanceof ScanOrderError)) throw error;
      this.statePerPath(packed);
    }
    return problems;
  }

  /** Not in the expected order: join nothing, make every path a state (side 1's, then side 2's). */
  private statePerPath(packed: [PackedScan, PackedScan]): void {
    const F = SCAN_RECORD_FIELDS;
    this.states.clear();
    this.clean = undefined;
    this.cleanSizes.clear();
    this.startPackingNew(packed, false);
    for (const side of [1, 2] as const) {
      const { strings, records } = packed[side - 1];
      for (let o = 0, textStart = 0; o < records.length; textStart = records[o + 3]!, o += F) {
        if (records[o]! > SCAN_SYMLINK) continue;
        const pathEnd = records[o + 2]!;
        const textEnd = records[o + 3]!;
        const path = utf8Slice.call(strings, textStart, pathEnd);
        const entry = packedEntry(records, o, path, textEnd > pathEnd ? utf8Slice.call(strings, pathEnd, textEnd) : '');
        let state = this.states.get(path);
        if (state === undefined) {
          state = newState(path, undefined);
          this.states.set(path, state);
        }
        if (side === 1) state.e1 = entry;
        else state.e2 = entry;
      }
    }
  }

  /**
   * States for what the native join reported (paths that are not clean, in merge order), then for the archive
   * entries no scanned path has (deleted on both sides), in archive order: the states joinPacked and
   * mergeArchive would make, without a string or object for any clean path.
   */
  private applyNativeJoin(packed: [PackedScan, PackedScan], joined: Extract<JoinResult, { kind: 'joined' }>): void {
    const F = SCAN_RECORD_FIELDS;
    const table = this.table!;
    const { triples, flags } = joined;
    const packing = this.newPaths !== undefined;
    const [s1, s2] = [packed[0].strings, packed[1].strings];
    const [r1, r2] = [packed[0].records, packed[1].records];
    const pathOf = (strings: Buffer, records: Float64Array, o: number): string =>
      utf8Slice.call(strings, o === 0 ? 0 : records[o - F + 3]!, records[o + 2]!);
    const textOf = (strings: Buffer, records: Float64Array, o: number): string => {
      const pathEnd = records[o + 2]!;
      const textEnd = records[o + 3]!;
      return textEnd > pathEnd ? utf8Slice.call(strings, pathEnd, textEnd) : '';
    };
    for (let t = 0; t < triples.length; t += 3) {
      const o1 = triples[t]! * F;
      const o2 = triples[t + 1]! * F;
      const index = triples[t + 2]!;
      const path = o1 >= 0 ? pathOf(s1, r1, o1) : pathOf(s2, r2, o2);
      if (packing && index < 0 && (o1 < 0) !== (o2 < 0) && (o1 >= 0 ? this.packNew(1, r1, o1, path) : this.packNew(2, r2, o2, path))) continue;
      const state = newState(path, index >= 0 ? table.entry(index) : undefined);
      if (o1 >= 0) state.e1 = packedEntry(r1, o1, path, textOf(s1, r1, o1));
      if (o2 >= 0) state.e2 = packedEntry(r2, o2, path, textOf(s2, r2, o2));
      this.states.set(path, state);
      if (packing && state.e1 !== undefined && state.e2 !== undefined) this.noteBothSides(path, state.e1, state.e2);
    }
    let clean = 0;
    for (let index = 0; index < table.count; index++) {
      const flag = flags[index]!;
      if (flag === 1) clean++;
      else if (flag === 0) {
        const path = table.path(index);
        this.states.set(path, newState(path, table.entry(index)));
      }
    }
    this.flags = flags;
    this.cleanInTable = clean;
  }

  /** How many paths are clean (packed scans): present on both sides, identical to the archive. */
  private cleanCount(): number {
    return this.flags !== undefined ? this.cleanInTable : this.clean?.size ?? 0;
  }

  private archiveSize(): number {
    return this.flags !== undefined ? this.table!.count : this.archive.size;
  }

  /**
   * Of `sizes`, those some clean file has (copy-local candidates: their fingerprints are known). In table mode
   * one pass over the table's arrays for all the sizes asked (usually a handful of new files), no set of every size.
   */
  private cleanFileSizes(sizes: Set<number>): Set<number> {
    if (this.flags === undefined || sizes.size === 0) return this.cleanSizes;
    const found = new Set<number>();
    const { flags } = this;
    const { count, kinds, numbers } = this.table!;
    for (let index = 0; index < count; index++) {
      if (flags[index] === 1 && kinds[index] === 0x66 && sizes.has(numbers[index * 8]!)) found.add(numbers[index * 8]!);
    }
    return found;
  }

  // ---- packed new paths (new-paths.ts) ----------------------------------------------------------------------

  private newCount(): number {
    return this.newPaths?.count ?? 0;
  }

  /** Offset of packed new path `k`'s scan record in its side's records. */
  private newOffset(k: number): number {
    return this.newPaths!.records[k]! * SCAN_RECORD_FIELDS;
  }

  private newRecords(k: number): Float64Array {
    return this.packedScans![this.newPaths!.sides[k]! - 1].records;
  }

  private newPath(k: number): string {
    const { strings, records } = this.packedScans![this.newPaths!.sides[k]! - 1];
    const o = this.newOffset(k);
    return utf8Slice.call(strings, o === 0 ? 0 : records[o - SCAN_RECORD_FIELDS + 3]!, records[o + 2]!);
  }

  /** Packed new path `k` as the ScanEntry the object path would have made (for the few uses that need one). */
  private newEntry(k: number): ScanEntry {
    return packedEntry(this.newRecords(k), this.newOffset(k), this.newPath(k), '');
  }

  /**
   * Try to keep a path new on `side` only (no archive entry, the other side has nothing) as a packed new path
   * instead of a state; `o` is its record's offset. Called in path order, as its state would have been made.
   */
  private packNew(side: Side, records: Float64Array, o: number, path: string): boolean {
    const kind = records[o]!;
    if (kind !== SCAN_FILE && kind !== SCAN_DIR) return false;
    // A file of a size some archive file has may be a rename or copy of it: hashed, a state.
    if (kind === SCAN_FILE && records[o + 5]! > 0 && this.archiveHasFileSize(records[o + 5]!)) return false;
    const parent = this.newParentOf(path);
    if (parent !== 0 && parent !== side) return false;
    this.newPaths!.add(side, o / SCAN_RECORD_FIELDS, this.states.size);
    if (kind === SCAN_DIR) this.newParents.set(path, side);
    return true;
  }

  /** A state was made for a path present on both sides: a directory on both with modes that cannot conflict
   * (and a safe parent) may hold packed new paths. */
  private noteBothSides(path: string, e1: ScanEntry, e2: ScanEntry): void {
    if (e1.kind !== 'dir' || e2.kind !== 'dir' || (this.options.perms && e1.mode !== e2.mode)) return;
    if (this.newParentOf(path) === 0) this.newParents.set(path, 0);
  }

  /** What the parent of `path` allows below it: 0 (safe: clean, root, or a directory on both sides), the side of
   * a packed new directory, or -1 (a state that may govern its subtree). */
  private newParentOf(path: string): number {
    const slash = path.lastIndexOf('/');
    if (slash === -1) return 0;
    // A directory's entries come together: one lookup per directory.
    const cache = this.newParentCache;
    if (slash !== cache.length || !path.startsWith(cache)) {
      this.newParentCache = path.slice(0, slash);
      this.newParentCacheValue = undefined;
    }
    if (this.newParentCacheValue === undefined) {
      const parent = this.newParentCache;
      this.newParentCacheValue = this.newParents.get(parent) ?? (this.states.has(parent) ? -1 : 0);
    }
    return this.newParentCacheValue;
  }

  /** Set up packing for a join (or turn it off): only when the whole run can take the packed path. */
  private startPackingNew(packed: [PackedScan, PackedScan], allowed: boolean): void {
    this.newPaths = undefined;
    this.packedScans = undefined;
    this.newParents.clear();
    this.newParentCache = '';
    this.newParentCacheValue = undefined;
    // Everything a packed path skips must be known not to apply: no unknown subtree, no hash of every file, a
    // run that propagates on its own (no dry run), and native copies between two local roots for its files.
    if (!allowed || !this.packedNewWanted || this.options.dryRun || this.localCopier() === undefined) return;
    this.packedScans = packed;
    this.newPaths = new NewPaths((packed[0].records.length + packed[1].records.length) / SCAN_RECORD_FIELDS);
    this.archiveFileSizes = undefined;
  }

  /** Does some file of the archive have this size? */
  private archiveHasFileSize(size: number): boolean {
    let sizes = this.archiveFileSizes;
    if (sizes === undefined) {
      const found: number[] = [];
      if (this.table !== undefined) {
        const { count, kinds, numbers } = this.table;
        for (let index = 0; index < count; index++) if (kinds[index] === 0x66) found.push(numbers[index * 8]!);
      } else {
        for (const a of this.archive.values()) if (a.kind === 'file') found.push(a.sizeBytes);
      }
      sizes = Float64Array.from(found).sort();
      this.archiveFileSizes = sizes;
    }
    let low = 0;
    let high = sizes.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (sizes[middle]! < size) low = middle + 1;
      else high = middle;
    }
    return low < sizes.length && sizes[low] === size;
  }

  /** The plan's order: every state (whose action, if any, is an item) and packed new path (its index). */
  private *planOrder(): Generator<PathState | number> {
    const newPaths = this.newPaths;
    const count = this.newCount();
    let k = 0;
    let n = 0;
    for (const state of this.states.values()) {
      for (; k < count && newPaths!.before[k]! <= n; k++) yield k;
      yield state;
      n++;
    }
    for (; k < count; k++) yield k;
  }

  /** Packed new path `k`'s plan item, as reconcile and the propagation would have left it. */
  private newItem(k: number): PlanItem {
    const newPaths = this.newPaths!;
    const side = newPaths.sides[k] as Side;
    const kind = KIND_OF_CODE[this.newRecords(k)[this.newOffset(k)]!]!;
    const status = newPaths.status[k]!;
    const item: PlanItem = {
      path: this.newPath(k),
      action: 'copy',
      from: side,
      change1: side === 1 ? 'new' : 'absent',
      change2: side === 2 ? 'new' : 'absent',
      kind1: side === 1 ? kind : undefined,
      kind2: side === 2 ? kind : undefined,
      status: status === NEW_DONE ? 'done' : status === NEW_FAILED ? 'failed' : status === NEW_SKIPPED ? 'skipped' : 'planned',
      transfer: status === NEW_DONE && kind === 'file' ? 'full' : undefined,
    };
    const error = newPaths.errors.get(k);
    if (error !== undefined) item.error = error;
    return item;
  }

  private *itemChunks(size: number): Generator<PlanItem[]> {
    let chunk: PlanItem[] = [];
    for (const next of this.planOrder()) {
      if (typeof next === 'number') chunk.push(this.newItem(next));
      else if (next.action !== undefined) chunk.push(next.action.item);
      else continue;
      if (chunk.length >= size) {
        yield chunk;
        chunk = [];
      }
    }
    if (chunk.length > 0) yield chunk;
  }

  /** result.items and result.itemChunks: the actions' items, with packed new paths' made only when asked. */
  private exposeItems(result: SyncResult, actions: Action[]): void {
    Object.defineProperty(result, 'itemChunks', { value: (size: number) => this.itemChunks(size), enumerable: false });
    if (this.newCount() === 0) {
      result.items = actions.map((action) => action.item);
      return;
    }
    // Same key, same place in the object: JSON.stringify(result) gives the bytes it gave with an array.
    Object.defineProperty(result, 'items', {
      get: () => {
        const items: PlanItem[] = [];
        for (const chunk of this.itemChunks(PLAN_CHUNK_ITEMS)) for (const item of chunk) items.push(item);
        return items;
      },
      enumerable: true,
      configurable: true,
    });
  }

  private joinPacked(packed: [PackedScan, PackedScan], allowClean: boolean): void {
    const [s1, s2] = [packed[0].strings, packed[1].strings];
    const [r1, r2] = [packed[0].records, packed[1].records];
    const clean = new Set<ArchiveEntry>();
    this.clean = clean;
    const packing = this.newPaths !== undefined;
    // A cursor per side over its records in scan order.
    const c1 = new ScanCursor(r1, s1);
    const c2 = new ScanCursor(r2, s2);
    const text = (strings: Buffer, records: Float64Array, o: number): string => {
      const pathEnd = records[o + 2]!;
      const textEnd = records[o + 3]!;
      return textEnd > pathEnd ? utf8Slice.call(strings, pathEnd, textEnd) : '';
    };
    // Does record `o` of a side equal the archive entry in kind, size, mode, link target and that side's stamps?
    const sameAsArchive = (strings: Buffer, records: Float64Array, o: number, a: ArchiveEntry, side: Side): boolean =>
      KIND_OF_CODE[records[o]!] === a.kind &&
      records[o + 5] === a.sizeBytes &&
      records[o + 4] === a.mode &&
      records[o + 6] === (side === 1 ? a.mtime1Ms : a.mtime2Ms) &&
      records[o + 7] === (side === 1 ? a.ctime1Ms : a.ctime2Ms) &&
      records[o + 8] === (side === 1 ? a.inode1 : a.inode2) &&
      (records[o] !== SCAN_SYMLINK || text(strings, records, o) === a.linkTarget);
    // Paths that differ and whose subtrees are therefore made states too (a decision on them may govern their
    // descendants). A parent comes before its children, and a directory's entries come together: one lookup of
    // the parent per directory.
    const opened = new Set<string>();
    let lastParent = '';
    let lastParentOpened = false;
    c1.next();
    c2.next();
    while (c1.path !== undefined || c2.path !== undefined) {
      const order = c1.path === undefined ? 1 : c2.path === undefined ? -1 : comparePaths(c1.path, c2.path);
      const path = (order <= 0 ? c1.path : c2.path)!;
      const has1 = order <= 0;
      const has2 = order >= 0;
      let underOpened = false;
      if (opened.size > 0) {
        const slash = path.lastIndexOf('/');
        if (slash > 0) {
          if (slash !== lastParent.length || !path.startsWith(lastParent)) {
            lastParent = path.slice(0, slash);
            lastParentOpened = opened.has(lastParent);
          }
          underOpened = lastParentOpened;
        }
      }
      const a = has1 && has2 ? this.archive.get(path) : undefined;
      if (allowClean && !underOpened && a !== undefined && sameAsArchive(s1, r1, c1.offset, a, 1) && sameAsArchive(s2, r2, c2.offset, a, 2)) {
        clean.add(a);
        if (a.kind === 'file') this.cleanSizes.add(a.sizeBytes);
      } else if (
        !(packing && has1 !== has2 && !this.archive.has(path) && (has1 ? this.packNew(1, r1, c1.offset, path) : this.packNew(2, r2, c2.offset, path)))
      ) {
        // (A packed new path needs nothing in `opened`: nothing below it is on the other side, so nothing is clean.)
        const state = newState(path, undefined);
        if (has1) state.e1 = packedEntry(r1, c1.offset, path, text(s1, r1, c1.offset));
        if (has2) state.e2 = packedEntry(r2, c2.offset, path, text(s2, r2, c2.offset));
        this.states.set(path, state);
        if (packing && state.e1 !== undefined && state.e2 !== undefined) this.noteBothSides(path, state.e1, state.e2);
        // A directory that differs from the archive only in its stamps is "unchanged" on both sides: no decision
        // on it, nothing it could govern. Anything else keeps its subtree out of the clean set.
        const stampsOnly =
          !underOpened &&
          allowClean &&
          a?.kind === 'dir' &&
          state.e1?.kind === 'dir' &&
          state.e2?.kind === 'dir' &&
          state.e1.mode === a.mode &&
          state.e2.mode === a.mode;
        if (!stampsOnly) opened.add(path);
      }
      if (has1) c1.next();
      if (has2) c2.next();
    }
  }

  private mergeArchive(): void {
    if (this.flags !== undefined) return; // table mode: applyNativeJoin made these states
    const { clean } = this;
    for (const [path, entry] of this.archive) {
      if (clean !== undefined && clean.has(entry)) continue;
      let state = this.states.get(path);
      if (state === undefined) {
        state = newState(path, entry);
        this.states.set(path, state);
      } else state.a = entry;
    }
  }

  /** Is `path` at or under one of the problem paths (unlistable directories)? */
  private static underProblem(path: string, problems: Set<string>): boolean {
    if (problems.size === 0) return false;
    if (problems.has('.')) return true;
    for (let current = path; current !== ''; current = parentOf(current)) if (problems.has(current)) return true;
    return false;
  }

  private fastCheckPasses(entry: ScanEntry, a: ArchiveEntry, side: Side): boolean {
    if (this.options.alwaysHash) return false;
    return side === 1
      ? entry.sizeBytes === a.sizeBytes && entry.mtimeMs === a.mtime1Ms && entry.ctimeMs === a.ctime1Ms && entry.inode === a.inode1
      : entry.sizeBytes === a.sizeBytes && entry.mtimeMs === a.mtime2Ms && entry.ctimeMs === a.ctime2Ms && entry.inode === a.inode2;
  }

  private async detectUpdates(problems: [Set<string>, Set<string>]): Promise<void> {
    const toHash: [string[], string[]] = [[], []];
    // Copy-local candidates: sizes of files on each side whose fingerprint is known without hashing.
    // (Clean files, whose sizes cleanFileSizes() gives, are known on both sides too.)
    const knownSizes: [Set<number>, Set<number>] = [new Set(), new Set()];
    for (const state of this.states.values()) {
      if (SyncEngine.underProblem(state.path, problems[0]) || SyncEngine.underProblem(state.path, problems[1])) {
        state.unknown = true;
        continue;
      }
      const { a } = state;
      for (const side of [1, 2] as const) {
        const entry = entryOf(state, side);
        if (entry?.kind !== 'file') continue;
        if (a?.kind === 'file' && this.fastCheckPasses(entry, a, side)) {
          if (side === 1) state.fp1 = a.fingerprint;
          else state.fp2 = a.fingerprint;
          knownSizes[side - 1].add(entry.sizeBytes);
        } else if (a?.kind === 'file' || this.options.alwaysHash || entryOf(state, other(side))?.kind === 'file') {
          toHash[side - 1].push(state.path);
        }
      }
    }
    // New files on one side only whose size matches a known file on the other side: hash them, so that a rename
    // or copy is recognised and propagated as a local copy on the target instead of a transfer.
    const candidates: Array<{ state: PathState; side: Side; size: number }> = [];
    for (const state of this.states.values()) {
      if (state.unknown || state.a !== undefined) continue;
      for (const side of [1, 2] as const) {
        const entry = entryOf(state, side);
        if (entry?.kind === 'file' && entry.sizeBytes > 0 && entryOf(state, other(side)) === undefined) candidates.push({ state, side, size: entry.sizeBytes });
      }
    }
    if (candidates.length > 0) {
      const cleanSizes = this.cleanFileSizes(new Set(candidates.map((candidate) => candidate.size)));
      for (const { state, side, size } of candidates) {
        if (knownSizes[other(side) - 1].has(size) || cleanSizes.has(size)) toHash[side - 1].push(state.path);
      }
    }
    await Promise.all([this.hashSide(1, toHash[0]), this.hashSide(2, toHash[1])]);
    for (const state of this.states.values()) {
      if (state.unknown) continue;
      state.change1 = this.classify(state, 1);
      state.change2 = this.classify(state, 2);
    }
    // Insertion order of `states` already puts every parent before its children: each source (scan 1, scan 2,
    // archive) lists parents first, and a path first inserted by one source has its parent in that same source,
    // earlier. No sort of every path is needed (150 ms on 100,000 paths), nor a copy of the keys: the passes
    // below iterate the map itself.
  }

  private async hashSide(side: Side, paths: string[]): Promise<void> {
    const replica = this.replica(side);
    for (let start = 0; start < paths.length; start += HASH_BATCH_PATHS) {
      const batch = paths.slice(start, start + HASH_BATCH_PATHS);
      let results: Awaited<ReturnType<Replica['hashFiles']>>;
      try {
        results = await replica.hashFiles(batch);
      } catch (error) {
        // One unreadable file must not sink the batch: hash one by one, marking failures as unknown.
        results = [];
        for (const path of batch) {
          try {
            results.push((await replica.hashFiles([path]))[0] ?? null);
          } catch (inner) {
            this.options.warn(`root ${side}: ${(inner as Error).message} (skipped)`);
            this.problems.push({ side, path, message: (inner as Error).message });
            this.states.get(path)!.unknown = true;
            results.push(null);
          }
        }
        void error;
      }
      for (let index = 0; index < batch.length; index++) {
        const state = this.states.get(batch[index]!)!;
        const hashed = results[index];
        if (hashed == null) continue;
        const entry = entryOf(state, side);
        if (entry !== undefined && !sameStat(entry, hashed.stat)) {
          // Changed between scan and hash: take the newer stat so the archive pairs it with this fingerprint.
          Object.assign(entry, hashed.stat);
        }
        if (side === 1) state.fp1 = hashed.fingerprint;
        else state.fp2 = hashed.fingerprint;
      }
    }
  }

  private classify(state: PathState, side: Side): ChangeKind {
    const entry = entryOf(state, side);
    const { a } = state;
    if (a === undefined) return entry === undefined ? 'absent' : 'new';
    if (entry === undefined) return 'deleted';
    if (entry.kind !== a.kind) return 'modified';
    if (entry.kind === 'file') {
      const fp = fingerprintOf(state, side);
      if (fp !== a.fingerprint || entry.sizeBytes !== a.sizeBytes) return 'modified';
    } else if (entry.kind === 'symlink' && entry.linkTarget !== a.linkTarget) return 'modified';
    if (this.options.perms && modeOf(entry) !== (entry.kind === 'symlink' ? 0 : a.mode)) return 'props';
    if (this.options.times && entry.kind === 'file') {
      const archived = side === 1 ? a.mtime1Ms : a.mtime2Ms;
      if (Math.abs(entry.mtimeMs - archived) >= TIME_TOLERANCE_MS) return 'props';
    }
    return 'unchanged';
  }

  // ---- reconciliation ----------------------------------------------------------------------------------------

  private contentEqual(state: PathState): boolean {
    const { e1, e2 } = state;
    if (e1 === undefined || e2 === undefined || e1.kind !== e2.kind) return false;
    if (e1.kind === 'dir') return true;
    if (e1.kind === 'symlink') return e1.linkTarget === e2.linkTarget;
    return state.fp1 !== undefined && state.fp1 === state.fp2 && e1.sizeBytes === e2.sizeBytes;
  }

  private reconcile(): Action[] {
    // Sides on which a path has a changed descendant: a directory deleted on one side while something below it
    // changed on the other is a conflict on the directory (unison's behaviour), not a silent deletion.
    const changedBelow: [Set<string>, Set<string>] = [new Set(), new Set()];
    for (const state of this.states.values()) {
      for (const side of [1, 2] as const) {
        const change = side === 1 ? state.change1 : state.change2;
        if (change === 'new' || change === 'modified' || change === 'deleted' || change === 'props' || state.unknown) {
          for (let current = parentOf(state.path); current !== ''; current = parentOf(current)) {
            if (changedBelow[side - 1].has(current)) break;
            changedBelow[side - 1].add(current);
          }
        }
      }
    }
    // Decisions on a directory that govern its subtree: 'skip' (conflict or unknown), or a forced winner side.
    const governing = new Map<string, 'skip' | Side>();
    const actions: Action[] = [];
    const now = new Date();
    for (const [path, state] of this.states) {
      let governed: 'skip' | Side | undefined;
      if (governing.size > 0) {
        for (let current = parentOf(path); current !== ''; current = parentOf(current)) {
          governed = governing.get(current);
          if (governed !== undefined) break;
        }
      }
      if (governed === 'skip') {
        governing.set(path, 'skip');
        continue;
      }
      if (state.unknown) {
        governing.set(path, 'skip');
        continue;
      }
      const { change1, change2 } = state;
      const changed1 = change1 !== 'unchanged' && change1 !== 'absent';
      const changed2 = change2 !== 'unchanged' && change2 !== 'absent';
      if (governed === undefined && !changed1 && !changed2) {
        // Unchanged on both sides (the bulk of a run): no plan item, only an archive refresh of the stamps.
        state.refresh = true;
        continue;
      }
      // Every field that decideFrom and the propagation set on most paths is there from the start (undefined is
      // left out of the JSON output): a property added later moves the object's fields to a separate store,
      // ~40 bytes more per path (100,000 of them on an initial sync).
      const item: PlanItem = {
        path,
        action: 'equal',
        from: undefined,
        change1: state.change1,
        change2: state.change2,
        kind1: state.e1?.kind,
        kind2: state.e2?.kind,
        status: 'planned',
        transfer: undefined,
      };
      const action: Action = {
        item,
        state,
        from: 1,
        keepLoserAs: undefined,
        target: undefined,
        removeTargetFirst: undefined,
        resultStat: undefined,
        resultFingerprint: undefined,
        resultRow: -1,
      };
      if (governed !== undefined) {
        // Inside a conflict resolved in favour of `governed`: that side's state is imposed on the whole subtree.
        if (!this.decideFrom(action, governed)) continue;
        item.resolvedBy = 'parent';
        actions.push(action);
        continue;
      }
      let conflict: string | undefined;
      if (changed1 && changed2) {
        if (state.e1 === undefined && state.e2 === undefined) {
          item.action = 'equal'; // deleted on both sides: drop from the archive
          actions.push(action);
          continue;
        }
        if (this.contentEqual(state)) {
          const props = this.propsDecision(state);
          if (props === 'conflict') conflict = 'permissions changed differently on both sides';
          else {
            if (props !== undefined) {
              item.action = 'props';
              action.from = props;
              item.from = props;
              action.target = entryOf(state, other(props));
            }
            actions.push(action);
            continue;
          }
        } else if (state.e1 === undefined || state.e2 === undefined) conflict = 'deleted on one side, changed on the other';
        else if (state.e1.kind !== state.e2.kind) conflict = `${state.e1.kind} on one side, ${state.e2.kind} on the other`;
        else if (state.e1.kind === 'symlink') conflict = 'symbolic link retargeted differently on both sides';
        else conflict = state.a === undefined ? 'new file on both sides with different contents' : 'changed on both sides';
      } else {
        const winner: Side = changed1 ? 1 : 2;
        const loser = other(winner);
        const winnerEntry = entryOf(state, winner);
        const loserEntry = entryOf(state, loser);
        // Replacing or deleting a directory of the loser whose subtree changed there: conflict.
        if (loserEntry?.kind === 'dir' && winnerEntry?.kind !== 'dir' && changedBelow[loser - 1].has(path)) {
          conflict = `directory ${winnerEntry === undefined ? 'deleted' : 'replaced'} on one side, its contents changed on the other`;
        } else {
          if (this.decideFrom(action, winner)) actions.push(action);
          continue;
        }
      }
      // A conflict: resolve with --prefer, or skip it (with its subtree).
      item.action = 'conflict';
      item.reason = conflict;
      const winner = this.preferredSide(state);
      if (winner === undefined) {
        governing.set(path, 'skip');
        actions.push(action);
        continue;
      }
      item.resolvedBy = this.options.prefer === 'newer' || this.options.prefer === 'older' ? this.options.prefer : `root${winner}`;
      if (!this.decideFrom(action, winner)) {
        item.action = 'equal';
        actions.push(action);
        continue;
      }
      const loserEntry = entryOf(state, other(winner));
      if (this.options.copyOnConflict && loserEntry !== undefined) {
        action.keepLoserAs = conflictName(path, now);
      }
      if (entryOf(state, winner)?.kind === 'dir' || loserEntry?.kind === 'dir') governing.set(path, winner);
      actions.push(action);
    }
    return actions;
  }

  /** Props resolution between two equal contents: which side's props to propagate, or conflict. */
  private propsDecision(state: PathState): Side | 'conflict' | undefined {
    const { e1, e2, a } = state;
    if (e1 === undefined || e2 === undefined) return undefined;
    let from: Side | undefined;
    if (this.options.perms && modeOf(e1) !== modeOf(e2)) {
      const m1Changed = a === undefined || modeOf(e1) !== (e1.kind === 'symlink' ? 0 : a.mode);
      const m2Changed = a === undefined || modeOf(e2) !== (e2.kind === 'symlink' ? 0 : a.mode);
      if (m1Changed && m2Changed) return 'conflict';
      from = m1Changed ? 1 : 2;
    }
    if (from === undefined && this.options.times && e1.kind === 'file' && Math.abs(e1.mtimeMs - e2.mtimeMs) >= TIME_TOLERANCE_MS) {
      from = e1.mtimeMs > e2.mtimeMs ? 1 : 2; // both touched: the later time wins (no content at stake)
    }
    return from;
  }

  /** Fill in an action propagating `winner`'s state. Returns false when there is nothing to do. */
  private decideFrom(action: Action, winner: Side): boolean {
    const { state, item } = action;
    const winnerEntry = entryOf(state, winner);
    const loserEntry = entryOf(state, other(winner));
    action.from = winner;
    item.from = winner;
    action.target = loserEntry;
    if (winnerEntry === undefined) {
      if (loserEntry === undefined) return false;
      if (item.action !== 'conflict') item.action = 'delete';
      return true;
    }
    if (loserEntry !== undefined && winnerEntry.kind === loserEntry.kind && this.contentEqual(state)) {
      const change = winner === 1 ? state.change1 : state.change2;
      if (change === 'props' || this.propsDiffer(winnerEntry, loserEntry)) {
        if (item.action !== 'conflict') item.action = 'props';
        return true;
      }
      if (item.action !== 'conflict') item.action = 'equal';
      return true;
    }
    if (item.action !== 'conflict') item.action = 'copy';
    action.removeTargetFirst = loserEntry !== undefined && (loserEntry.kind === 'dir' || winnerEntry.kind === 'dir');
    return true;
  }

  private propsDiffer(winner: EntryStat, loser: EntryStat): boolean {
    if (this.options.perms && modeOf(winner) !== modeOf(loser)) return true;
    return this.options.times && winner.kind === 'file' && Math.abs(winner.mtimeMs - loser.mtimeMs) >= TIME_TOLERANCE_MS;
  }

  private preferredSide(state: PathState): Side | undefined {
    const { prefer } = this.options;
    if (prefer === undefined) return undefined;
    if (prefer === 1 || prefer === 2) return prefer;
    const { e1, e2 } = state;
    // newer/older never pick a deletion over an edit: the side that still has the path wins (no data lost).
    if (e1 === undefined) return 2;
    if (e2 === undefined) return 1;
    if (e1.mtimeMs === e2.mtimeMs) return undefined;
    const newer: Side = e1.mtimeMs > e2.mtimeMs ? 1 : 2;
    return prefer === 'newer' ? newer : other(newer);
  }

  // ---- deletion safety ---------------------------------------------------------------------------------------

  private deletionSafety(actions: Action[]): string[] {
    const warnings: string[] = [];
    if (this.archiveSize() === 0) return warnings;
    for (const side of [1, 2] as const) {
      const deletes = actions.filter((action) => action.item.action === 'delete' && action.from === side);
      if (deletes.length === 0) continue;
      // Emptied root: the side holds nothing any more while the archive remembers content (a missing mount, a
      // wiped disk): propagating would delete everything on the other side.
      let remaining = this.cleanCount() + (this.newPaths?.perSide[side - 1] ?? 0); // a clean path is present on both sides
      for (const state of this.states.values()) if (entryOf(state, side) !== undefined) remaining++;
      if (remaining === 0) {
        warnings.push(`root ${side} (${this.infos[side - 1].rootId}) was emptied: it would delete ${deletes.length} paths on the other side`);
      }
    }
    return warnings;
  }

  // ---- propagation -------------------------------------------------------------------------------------------

  private async propagate(actions: Action[]): Promise<void> {
    const work = actions.filter((action) => action.item.action !== 'equal' && (action.item.action !== 'conflict' || action.item.resolvedBy !== undefined));
    const newPaths = this.newPaths;
    const newCount = this.newCount();
    if (work.length === 0 && newCount === 0) return; // nothing to propagate (a no-change run): no index of every file to build
    const progress: ProgressState = { itemsDone: 0, itemsTotal: work.length + newCount, bytesDone: 0, bytesTotal: 0 };
    for (const action of work) {
      const entry = entryOf(action.state, action.from);
      if (entry?.kind === 'file' && (action.item.action === 'copy' || action.item.action === 'conflict')) progress.bytesTotal += entry.sizeBytes;
    }
    for (let k = 0; k < newCount; k++) {
      const records = this.newRecords(k);
      const o = this.newOffset(k);
      if (records[o] === SCAN_FILE) progress.bytesTotal += records[o + 5]!;
    }
    const report = (): void => {
      progress.itemsDone++;
      this.options.progress?.(progress);
    };
    const fail = (action: Action, error: unknown): void => {
      if (this.connectionLost === undefined && error instanceof ReplicaError && CONNECTION_FATAL.has(error.code)) {
        // The link to a remote root is gone: every further path would fail the same way. One message, the
        // rest of the plan is skipped, the archive keeps what synced, and the run exits 3.
        this.connectionLost = error;
        this.options.warn(`connection to a remote root lost: ${error.message}; stopping`);
      }
      if (this.connectionLost !== undefined) {
        action.item.status = 'skipped';
        action.item.error = this.connectionLost.message;
        return;
      }
      action.item.status = 'failed';
      action.item.error = error instanceof Error ? error.message : String(error);
      this.options.warn(`failed: ${action.item.path}: ${action.item.error}`);
    };
    // fail() for a packed new path: the same outcome, kept as its status and message.
    const failNew = (k: number, error: unknown): void => {
      if (this.connectionLost === undefined && error instanceof ReplicaError && CONNECTION_FATAL.has(error.code)) {
        this.connectionLost = error;
        this.options.warn(`connection to a remote root lost: ${error.message}; stopping`);
      }
      if (this.connectionLost !== undefined) {
        newPaths!.status[k] = NEW_SKIPPED;
        newPaths!.errors.set(k, this.connectionLost.message);
        return;
      }
      const message = error instanceof Error ? error.message : String(error);
      newPaths!.status[k] = NEW_FAILED;
      newPaths!.errors.set(k, message);
      this.options.warn(`failed: ${this.newPath(k)}: ${message}`);
    };
    const isCreate = (action: Action): boolean => entryOf(action.state, action.from) !== undefined;

    // Phase 1a: keep conflict losers (rename), shallowest first, so that a moved directory takes its subtree along.
    const losersMoved = new Set<string>();
    for (const action of work) {
      if (action.keepLoserAs === undefined || action.target === undefined) continue;
      try {
        await this.replica(other(action.from)).rename(action.item.path, action.keepLoserAs, action.target);
        losersMoved.add(action.item.path);
        action.target = undefined;
        action.removeTargetFirst = false;
      } catch (error) {
        fail(action, error);
      }
    }
    const movedAway = (path: string): boolean => {
      if (losersMoved.size === 0) return false;
      for (let current = parentOf(path); current !== ''; current = parentOf(current)) if (losersMoved.has(current)) return true;
      return false;
    };
    for (const action of work) {
      if (action.item.status !== 'planned' || !movedAway(action.item.path)) continue;
      // The loser's entry moved with its renamed ancestor: the path is now absent on that side.
      action.target = undefined;
      action.removeTargetFirst = false;
      if (!isCreate(action)) {
        action.item.status = 'done';
        report();
      }
    }

    // Copy-local sources: target-side files whose content will be reused; their deletion waits until after copies.
    // Only the fingerprints some copy needs are indexed (the first path holding each, in path order).
    const wanted: [Set<string>, Set<string>] = [new Set(), new Set()];
    // Their sizes too: equal content has equal size, so most clean files are passed over without a string.
    const wantedSizes = new Set<number>();
    for (const action of work) {
      if (action.item.action !== 'copy' && action.item.action !== 'conflict') continue;
      const fp = fingerprintOf(action.state, action.from);
      if (fp === undefined) continue;
      wanted[other(action.from) - 1].add(fp);
      const source = entryOf(action.state, action.from);
      if (source?.kind === 'file') wantedSizes.add(source.sizeBytes);
    }
    const targetIndex: [Map<string, PathState>, Map<string, PathState>] = [new Map(), new Map()];
    if (wanted[0].size > 0 || wanted[1].size > 0) {
      for (const state of this.states.values()) {
        if (state.unknown) continue;
        for (const side of [1, 2] as const) {
          const fp = fingerprintOf(state, side);
          if (fp === undefined || !wanted[side - 1].has(fp)) continue;
          const entry = entryOf(state, side);
          if (entry?.kind === 'file' && entry.sizeBytes > 0 && !targetIndex[side - 1].has(fp)) targetIndex[side - 1].set(fp, state);
        }
      }
      if (this.cleanCount() > 0) this.indexCleanFiles(wanted, wantedSizes, targetIndex);
    }
    const deferredDeletes = new Set<Action>();
    const copySources = new Set<string>();
    for (const action of work) {
      if (action.item.action !== 'copy' && action.item.action !== 'conflict') continue;
      const fp = fingerprintOf(action.state, action.from);
      if (fp === undefined) continue;
      const local = targetIndex[other(action.from) - 1].get(fp);
      if (local !== undefined && local.path !== action.item.path) copySources.add(`${other(action.from)}:${local.path}`);
    }

    // Phase 1b: deletions and removals of mismatched kinds, deepest first.
    const removals = work
      .filter((action) => action.item.status === 'planned' && action.target !== undefined && (!isCreate(action) || action.removeTargetFirst))
      .filter((action) => !this.swapsInDir(action))
      .sort((x, y) => depthOf(y.item.path) - depthOf(x.item.path) || (x.item.path < y.item.path ? 1 : -1));
    for (const action of removals) {
      const targetSide = other(action.from);
      if (!isCreate(action) && copySources.has(`${targetSide}:${action.item.path}`)) {
        deferredDeletes.add(action);
        continue;
      }
      try {
        await this.replica(targetSide).remove(action.item.path, action.target!);
        action.target = undefined;
        if (!isCreate(action)) {
          action.item.status = 'done';
          report();
        }
      } catch (error) {
        fail(action, error);
        report();
      }
    }

    // Phase 2a: directories, parents first (the path order puts a parent before its children).
    const creates = work.filter((action) => action.item.status === 'planned' && isCreate(action));
    // With packed new paths, the directories are created in the plan's order (a packed directory may hold
    // states, a state directory packed paths): the creates that are directories, and the packed directories.
    const dirCreates = creates.filter((action) => entryOf(action.state, action.from)!.kind === 'dir');
    const dirOrder: Iterable<Action | number> =
      newCount === 0 ? dirCreates : this.inPlanOrder(new Set(dirCreates), (k) => this.newRecords(k)[this.newOffset(k)] === SCAN_DIR);
    for (const next of dirOrder) {
      if (typeof next === 'number') {
        const side = newPaths!.sides[next] as Side;
        const path = this.newPath(next);
        try {
          this.newDirStats.set(next, await this.replica(other(side)).mkdir(path, this.newRecords(next)[this.newOffset(next) + 4]!));
          newPaths!.status[next] = NEW_DONE;
        } catch (error) {
          failNew(next, error);
        }
        report();
        continue;
      }
      const action = next;
      const source = entryOf(action.state, action.from)!;
      try {
        if (this.swapsInDir(action)) {
          // A file or symlink becomes a directory in one swap: the path is never absent (see replaceWithDir).
          const stat = await this.replica(other(action.from)).replaceWithDir!(action.item.path, source.mode, action.target!);
          action.target = undefined;
          this.setResultStat(action, stat);
        } else if (action.target === undefined) {
          const stat = await this.replica(other(action.from)).mkdir(action.item.path, source.mode);
          this.setResultStat(action, stat);
        } else {
          await this.applyProps(action);
        }
        action.item.status = 'done';
      } catch (error) {
        fail(action, error);
      }
      report();
    }

    // Phase 2b: files and symlinks. Between two local roots the addon copies files on the thread pool (more than
    // one core does the file-system work, no V8 isolate per thread); without it, copy workers when there is enough
    // work; otherwise (a remote replica multiplexes them) several in flight on this thread.
    const fileWork = creates.filter((action) => entryOf(action.state, action.from)!.kind !== 'dir');
    const fileDone = (action: Action, result: FileOpResult | undefined): void => {
      if (result !== undefined) this.recordFileResult(action, result); // else a native copy recorded its row

      action.item.status = 'done';
      progress.bytesDone += entryOf(action.state, action.from)!.sizeBytes;
      report();
    };
    const fileFailed = (action: Action, error: unknown): void => {
      fail(action, error);
      report();
    };
    const roots = this.localRoots();
    const copier = this.localCopier();
    const newDone = (k: number, sizeBytes: number): void => {
      newPaths!.status[k] = NEW_DONE;
      progress.bytesDone += sizeBytes;
      report();
    };
    const newFailed = (k: number, error: unknown): void => {
      failNew(k, error);
      report();
    };
    // A packed new path is made only when its files can be copied natively (startPackingNew).
    if (newCount > 0 && copier === undefined) throw new Error('dirsync: packed new paths without the native copy');
    if (copier !== undefined) {
      await this.runNativeCopies(copier, roots!, fileWork, targetIndex, fileDone, fileFailed, newDone, newFailed);
    } else if (roots !== undefined && fileWork.length >= WORKER_MIN_FILES && process.env.DRBDTS_DIRSYNC_WORKERS !== '0') {
      const ops = fileWork.map((action) => this.planFileOp(action, targetIndex));
      await this.runInWorkers(roots, fileWork, ops, fileDone, fileFailed);
    } else {
      const ops = fileWork.map((action) => this.planFileOp(action, targetIndex));
      let next = 0;
      const worker = async (): Promise<void> => {
        while (next < fileWork.length && this.connectionLost === undefined) {
          const index = next++;
          const action = fileWork[index]!;
          try {
            fileDone(action, await executeFileOp(ops[index]!, this.replica(action.from), this.replica(other(action.from))));
          } catch (error) {
            fileFailed(action, error);
          }
        }
      };
      await Promise.all(Array.from({ length: Math.min(PARALLEL_TRANSFERS, fileWork.length) }, worker));
    }

    // Phase 3: deletions deferred because their content was being copied locally.
    for (const action of [...deferredDeletes]) {
      try {
        await this.replica(other(action.from)).remove(action.item.path, action.target!);
        action.target = undefined;
        action.item.status = 'done';
      } catch (error) {
        fail(action, error);
      }
      report();
    }

    // Phase 4: props-only changes, deepest first (a directory's permissions may stop us writing inside it).
    const propsWork = work
      .filter((action) => action.item.status === 'planned' && action.item.action === 'props')
      .sort((x, y) => depthOf(y.item.path) - depthOf(x.item.path));
    for (const action of propsWork) {
      try {
        await this.applyProps(action);
        action.item.status = 'done';
      } catch (error) {
        fail(action, error);
      }
      report();
    }
    for (const action of work) if (action.item.status === 'planned') action.item.status = 'done';
    for (let k = 0; k < newCount; k++) if (newPaths!.status[k] === NEW_PLANNED) newPaths!.status[k] = NEW_DONE;

    // Directories whose contents changed have new mtimes on the changed side: record their final stamps now, or
    // the next run would see every such directory as touched and rewrite the archive for nothing.
    const touched: [Set<string>, Set<string>] = [new Set(), new Set()];
    for (const action of work) {
      if (action.item.status !== 'done') continue;
      const side = other(action.from);
      const parent = parentOf(action.item.path);
      if (parent !== '') touched[side - 1].add(parent);
      if (entryOf(action.state, action.from)?.kind === 'dir') touched[side - 1].add(action.item.path);
    }
    for (let k = 0; k < newCount; k++) {
      if (newPaths!.status[k] !== NEW_DONE) continue;
      const side = other(newPaths!.sides[k] as Side);
      const path = this.newPath(k);
      const parent = parentOf(path);
      if (parent !== '') touched[side - 1].add(parent);
      if (this.newRecords(k)[this.newOffset(k)] === SCAN_DIR) touched[side - 1].add(path);
    }
    for (const side of [1, 2] as const) {
      for (const dir of touched[side - 1]) {
        try {
          const stat = await this.replica(side).stat(dir);
          if (stat?.kind === 'dir') this.finalDirStats[side - 1].set(dir, stat);
        } catch {
          // Only a stamp refresh: without it the next run re-records the directory.
        }
      }
    }
  }

  /** Of the plan's order, the actions in `actions` and the packed new paths `takeNew` accepts. */
  private *inPlanOrder(actions: Set<Action>, takeNew: (k: number) => boolean): Generator<Action | number> {
    for (const next of this.planOrder()) {
      if (typeof next === 'number') {
        if (takeNew(next)) yield next;
      } else if (next.action !== undefined && actions.has(next.action)) yield next.action;
    }
  }

  /**
   * Add the clean files (packed scans) to the copy-local index: a clean file holds the archive's fingerprint and
   * stamps on both sides. Among all paths with a fingerprint the first in path order is taken, as for states.
   */
  private indexCleanFiles(
    wanted: [Set<string>, Set<string>],
    wantedSizes: Set<number>,
    targetIndex: [Map<string, PathState>, Map<string, PathState>],
  ): void {
    const add = (path: string, a: ArchiveEntry): void => {
      for (const side of [1, 2] as const) {
        if (!wanted[side - 1].has(a.fingerprint)) continue;
        const known = targetIndex[side - 1].get(a.fingerprint);
        if (known !== undefined && comparePaths(known.path, path) < 0) continue;
        const state = newState(path, a);
        state.e1 = { path, kind: 'file', sizeBytes: a.sizeBytes, mtimeMs: a.mtime1Ms, ctimeMs: a.ctime1Ms, inode: a.inode1, mode: a.mode };
        state.e2 = { path, kind: 'file', sizeBytes: a.sizeBytes, mtimeMs: a.mtime2Ms, ctimeMs: a.ctime2Ms, inode: a.inode2, mode: a.mode };
        state.fp1 = a.fingerprint;
        state.fp2 = a.fingerprint;
        targetIndex[side - 1].set(a.fingerprint, state);
      }
    };
    const { flags } = this;
    if (flags !== undefined) {
      const table = this.table!;
      const { count, kinds, numbers } = table;
      for (let index = 0; index < count; index++) {
        if (flags[index] !== 1 || kinds[index] !== 0x66) continue;
        const size = numbers[index * 8]!;
        if (size <= 0 || !wantedSizes.has(size)) continue;
        const fingerprint = table.fingerprint(index);
        if (wanted[0].has(fingerprint) || wanted[1].has(fingerprint)) add(table.path(index), table.entry(index));
      }
      return;
    }
    for (const [path, a] of this.archive) {
      if (a.kind === 'file' && a.sizeBytes > 0 && this.clean!.has(a)) add(path, a);
    }
  }

  /** Native copies' results (runNativeCopies): COPY_ROW_FIELDS numbers and 16 hex digits per row. */
  private copyResults: Float64Array | undefined;
  private copyDigests: Buffer | undefined;

  private copyResultStat(row: number): EntryStat | undefined {
    if (row < 0) return undefined;
    const r = this.copyResults!;
    const o = row * COPY_ROW_FIELDS;
    return { kind: KIND_OF_CODE[r[o]!]!, sizeBytes: r[o + 1]!, mtimeMs: r[o + 2]!, ctimeMs: r[o + 3]!, inode: r[o + 4]!, mode: r[o + 5]! };
  }

  private copyResultFingerprint(row: number): string | undefined {
    return row < 0 ? undefined : this.copyDigests!.toString('latin1', row * 16, row * 16 + 16);
  }

  /** Final stamps of directories whose contents this run changed, per side. */
  private readonly finalDirStats: [Map<string, EntryStat>, Map<string, EntryStat>] = [new Map(), new Map()];

  /** A file or symlink turning into a directory, on a replica that can swap one in atomically. */
  private swapsInDir(action: Action): boolean {
    return action.removeTargetFirst === true && action.target !== undefined
      && action.target.kind !== 'dir' && entryOf(action.state, action.from)?.kind === 'dir'
      && typeof this.replica(other(action.from)).replaceWithDir === 'function';
  }

  private setResultStat(action: Action, stat: EntryStat): void {
    action.resultStat = stat;
  }

  private async applyProps(action: Action): Promise<void> {
    const source = entryOf(action.state, action.from)!;
    const target = action.target!;
    const mode = this.options.perms && modeOf(source) !== modeOf(target) ? source.mode : undefined;
    const mtimeMs =
      this.options.times && source.kind === 'file' && Math.abs(source.mtimeMs - target.mtimeMs) >= TIME_TOLERANCE_MS ? source.mtimeMs : undefined;
    if (mode === undefined && mtimeMs === undefined) {
      this.setResultStat(action, target);
      return;
    }
    const stat = await this.replica(other(action.from)).setProps({ path: action.item.path, precondition: target, mode, mtimeMs });
    this.setResultStat(action, stat);
  }

  /** Decide how a file or link travels: a local copy on the target, a delta, or the full content. */
  private planFileOp(action: Action, targetIndex: [Map<string, PathState>, Map<string, PathState>]): FileOp {
    const sourceSide = action.from;
    const targetSide = other(sourceSide);
    const source = entryOf(action.state, sourceSide)!;
    // Keep the target's own permission bits on update when permissions are not synced.
    const mode = !this.options.perms && action.target?.kind === 'file' ? action.target.mode : source.mode;
    const op: FileOp = { path: action.item.path, source, precondition: action.target ?? 'absent', mode };
    if (this.options.times && source.kind === 'file') op.mtimeMs = source.mtimeMs;
    if (source.kind !== 'file') return op;
    const knownFingerprint = fingerprintOf(action.state, sourceSide);
    if (knownFingerprint !== undefined) {
      const local = targetIndex[targetSide - 1].get(knownFingerprint);
      const localEntry = local === undefined ? undefined : entryOf(local, targetSide);
      if (local !== undefined && localEntry !== undefined && local.path !== action.item.path) {
        op.local = { fromPath: local.path, fromStat: localEntry, fingerprint: knownFingerprint };
      }
    }
    const remote = !this.options.local[0] || !this.options.local[1];
    const threshold = this.options.deltaThresholdBytes ?? DEFAULT_DELTA_THRESHOLD_BYTES;
    if (remote && action.target?.kind === 'file' && action.target.sizeBytes >= threshold && source.sizeBytes >= threshold) op.delta = true;
    return op;
  }

  private recordFileResult(action: Action, result: FileOpResult): void {
    if (result.transfer !== 'link') action.item.transfer = result.transfer;
    this.bytesTransferred += result.bytesSent;
    action.resultStat = result.stat;
    if (result.fingerprint !== undefined) action.resultFingerprint = result.fingerprint;
  }

  /** Both roots are plain local directories: file work can run in copy workers (copy-worker.ts). */
  /** The addon's copy, when propagation between two local roots uses it (not with DRBDTS_DIRSYNC_WORKERS=0,
   * which keeps every file operation on this thread): packing new paths depends on it being there. */
  private localCopier(): ReturnType<typeof nativeCopier> {
    return this.localRoots() !== undefined && process.env.DRBDTS_DIRSYNC_WORKERS !== '0' ? nativeCopier() : undefined;
  }

  private localRoots(): [string, string] | undefined {
    const [r1, r2] = this.replicas;
    if (r1.constructor !== LocalReplica || r2.constructor !== LocalReplica) return undefined;
    return [(r1 as LocalReplica).rootPath, (r2 as LocalReplica).rootPath];
  }

  /**
   * File operations between two local roots with the addon: full-content copies of files (to an absent path or
   * over the file the scan saw) go to native/src/dirsync_copy.cc in batches of NATIVE_COPY_BATCH_OPS, at most
   * `jobs` batches on the thread pool at once; the rest (symlinks, local copies of content the target already
   * has, replacing a symlink) run here meanwhile through executeFileOp. Each operation is planned when its batch
   * is made, so no FileOp is kept for the whole list.
   */
  private async runNativeCopies(
    copier: NonNullable<ReturnType<typeof nativeCopier>>,
    roots: [string, string],
    fileWork: Action[],
    targetIndex: [Map<string, PathState>, Map<string, PathState>],
    done: (action: Action, result: FileOpResult | undefined) => void,
    failed: (action: Action, error: ReplicaError) => void,
    newDone: (k: number, sizeBytes: number) => void,
    newFailed: (k: number, error: ReplicaError) => void,
  ): Promise<void> {
    const fsync = (this.replicas[0] as LocalReplica).fsyncFiles;
    // After the states' files, the packed new files (every one a full copy to an absent path), fed to the addon
    // from their scan records: paths as the scan's bytes, numbers from the record, no object per file.
    const newPaths = this.newPaths;
    const newCount = this.newCount();
    let newFiles = 0;
    for (let k = 0; k < newCount; k++) if (this.newRecords(k)[this.newOffset(k)] === SCAN_FILE) newFiles++;
    this.copyResults = new Float64Array((fileWork.length + newFiles) * COPY_ROW_FIELDS);
    this.copyDigests = Buffer.alloc((fileWork.length + newFiles) * 16);
    let rows = 0;
    let nextNew = 0;
    const takeNewBatch = (): { from: Side; indexes: number[]; paths: Buffer; ends: Uint32Array; numbers: Float64Array } | undefined => {
      let from: Side | undefined;
      const indexes: number[] = [];
      const numbers = new Float64Array(NATIVE_COPY_BATCH_OPS * COPY_IN_FIELDS);
      const pieces: Buffer[] = [];
      const ends = new Uint32Array(NATIVE_COPY_BATCH_OPS);
      let bytes = 0;
      for (; nextNew < newCount && indexes.length < NATIVE_COPY_BATCH_OPS; nextNew++) {
        const k = nextNew;
        const records = this.newRecords(k);
        const o = this.newOffset(k);
        if (records[o] !== SCAN_FILE || newPaths!.status[k] !== NEW_PLANNED) continue;
        const side = newPaths!.sides[k] as Side;
        if (from !== undefined && side !== from) break;
        from = side;
        const { strings } = this.packedScans![side - 1];
        const start = o === 0 ? 0 : records[o - SCAN_RECORD_FIELDS + 3]!;
        const piece = strings.subarray(start, records[o + 2]!);
        pieces.push(piece);
        bytes += piece.length;
        // As planFileOp would: the source's size, mtime and inode to re-check, target absent, the source's mode
        // (no target file whose bits to keep), its mtime with --times.
        const n = indexes.length * COPY_IN_FIELDS;
        numbers[n] = records[o + 5]!;
        numbers[n + 1] = records[o + 6]!;
        numbers[n + 2] = records[o + 8]!;
        numbers[n + 7] = records[o + 4]!;
        numbers[n + 8] = this.options.times ? records[o + 6]! : NaN;
        ends[indexes.length] = bytes;
        indexes.push(k);
      }
      if (from === undefined) return undefined;
      const count = indexes.length;
      return { from, indexes, paths: Buffer.concat(pieces, bytes), ends: ends.slice(0, count), numbers: numbers.subarray(0, count * COPY_IN_FIELDS) };
    };
    const copyNewJob = async (): Promise<void> => {
      for (let batch = takeNewBatch(); batch !== undefined; batch = takeNewBatch()) {
        const { from, indexes } = batch;
        const { results, fingerprints, messages }: CopyBatchResult = await copier(roots[from - 1]!, roots[2 - from]!, batch.paths, batch.ends, batch.numbers, fsync);
        for (let j = 0; j < indexes.length; j++) {
          const k = indexes[j]!;
          const o = j * COPY_OUT_FIELDS;
          const status = results[o]!;
          if (status !== COPY_DONE) {
            newFailed(k, new ReplicaError(COPY_FAILURE_CODES[status - 1] ?? 'EIO', messages[j]!, this.newPath(k)));
            continue;
          }
          const row = rows++;
          this.copyResults!.set(results.subarray(o + 1, o + COPY_OUT_FIELDS), row * COPY_ROW_FIELDS);
          fingerprints.copy(this.copyDigests!, row * 16, j * 16, j * 16 + 16);
          newPaths!.rows[k] = row;
          const sizeBytes = batch.numbers[j * COPY_IN_FIELDS]!;
          this.bytesTransferred += sizeBytes;
          newDone(k, sizeBytes);
        }
      }
    };
    const jobs = Math.max(1, Number(process.env.DRBDTS_DIRSYNC_WORKERS ?? DEFAULT_COPY_WORKERS) || DEFAULT_COPY_WORKERS);
    const onThread: Array<{ action: Action; op: FileOp }> = [];
    let next = 0;
    let threadWaiting: (() => void) | undefined;
    /** The next batch: consecutive native operations of one direction (the rest are queued for this thread). */
    const takeBatch = (): { from: Side; actions: Action[]; paths: string[]; numbers: Float64Array } | undefined => {
      let from: Side | undefined;
      const actions: Action[] = [];
      const paths: string[] = [];
      const numbers = new Float64Array(NATIVE_COPY_BATCH_OPS * COPY_IN_FIELDS);
      for (; next < fileWork.length && actions.length < NATIVE_COPY_BATCH_OPS; next++) {
        const action = fileWork[next]!;
        if (from !== undefined && action.from !== from) break;
        const op = this.planFileOp(action, targetIndex);
        const { precondition } = op;
        if (op.source.kind !== 'file' || op.local !== undefined || op.delta === true || (precondition !== 'absent' && precondition.kind !== 'file')) {
          onThread.push({ action, op });
          threadWaiting?.();
          continue;
        }
        from = action.from;
        const n = actions.length * COPY_IN_FIELDS;
        numbers[n] = op.source.sizeBytes;
        numbers[n + 1] = op.source.mtimeMs;
        numbers[n + 2] = op.source.inode;
        if (precondition !== 'absent') {
          numbers[n + 3] = 1;
          numbers[n + 4] = precondition.sizeBytes;
          numbers[n + 5] = precondition.mtimeMs;
          numbers[n + 6] = precondition.inode;
        }
        numbers[n + 7] = op.mode;
        numbers[n + 8] = op.mtimeMs ?? NaN;
        actions.push(action);
        paths.push(op.path);
      }
      if (from === undefined) return undefined;
      return { from, actions, paths, numbers: numbers.subarray(0, actions.length * COPY_IN_FIELDS) };
    };
    const copyJob = async (): Promise<void> => {
      await copyStatesJob();
      await copyNewJob();
    };
    const copyStatesJob = async (): Promise<void> => {
      for (let batch = takeBatch(); batch !== undefined; batch = takeBatch()) {
        const { from, actions, paths } = batch;
        const ends = new Uint32Array(new ArrayBuffer(paths.length * 4));
        let bytes = 0;
        for (let k = 0; k < paths.length; k++) ends[k] = bytes += Buffer.byteLength(paths[k]!);
        const joined = Buffer.from(paths.join(''));
        const source = roots[from - 1]!;
        const target = roots[2 - from]!;
        // Every failure of an operation comes back as its status; a rejection is a bug (bad arguments) and ends the run.
        const { results, fingerprints, messages }: CopyBatchResult = await copier(source, target, joined, ends, batch.numbers, fsync);
        for (let k = 0; k < actions.length; k++) {
          const action = actions[k]!;
          const o = k * COPY_OUT_FIELDS;
          const status = results[o]!;
          if (status !== COPY_DONE) {
            failed(action, new ReplicaError(COPY_FAILURE_CODES[status - 1] ?? 'EIO', messages[k]!, action.item.path));
            continue;
          }
          // The result stays packed (an EntryStat and a fingerprint string per file were 17 MB of a 100,000-file
          // initial sync): recordPath makes them for the archive entry, one at a time.
          const row = rows++;
          this.copyResults!.set(results.subarray(o + 1, o + COPY_OUT_FIELDS), row * COPY_ROW_FIELDS);
          fingerprints.copy(this.copyDigests!, row * 16, k * 16, k * 16 + 16);
          action.resultRow = row;
          action.item.transfer = 'full';
          this.bytesTransferred += entryOf(action.state, from)!.sizeBytes;
          done(action, undefined);
        }
      }
    };
    let copying = true;
    const threadJob = async (): Promise<void> => {
      for (;;) {
        const work = onThread.shift();
        if (work === undefined) {
          if (!copying) return;
          await new Promise<void>((resolve) => (threadWaiting = resolve));
          threadWaiting = undefined;
          continue;
        }
        const { action, op } = work;
        try {
          done(action, await executeFileOp(op, this.replica(action.from), this.replica(other(action.from))));
        } catch (error) {
          failed(action, error instanceof ReplicaError ? error : new ReplicaError('EIO', String(error), action.item.path));
        }
      }
    };
    const thread = threadJob();
    try {
      await Promise.all(Array.from({ length: jobs }, copyJob));
    } finally {
      copying = false;
      threadWaiting?.();
    }
    await thread;
  }

  /**
   * Run file operations in worker threads between two local roots: slices of WORKER_SLICE_OPS, two slices
   * outstanding per worker so none idles while the main thread records results.
   */
  private async runInWorkers(
    roots: [string, string],
    fileWork: Action[],
    ops: FileOp[],
    done: (action: Action, result: FileOpResult) => void,
    failed: (action: Action, error: ReplicaError) => void,
  ): Promise<void> {
    const { Worker } = await import('node:worker_threads');
    const fsync = (this.replicas[0] as LocalReplica).fsyncFiles;
    const workerCount = Math.max(1, Math.min(Number(process.env.DRBDTS_DIRSYNC_WORKERS ?? DEFAULT_COPY_WORKERS), Math.ceil(ops.length / WORKER_SLICE_OPS)));
    let next = 0;
    const workers: Array<InstanceType<typeof Worker>> = [];
    try {
      await Promise.all(
        Array.from({ length: workerCount }, async () => {
          const worker = new Worker(new URL('./copy-worker.js', import.meta.url), {
            workerData: { roots, fsync },
            // A worker's garbage is small and short-lived (read buffers are pooled): a 4 MiB young generation
            // instead of V8's default 16-32 MiB saved 90 MiB of peak RSS on 100,000 files at the same CPU time.
            resourceLimits: { maxYoungGenerationSizeMb: WORKER_YOUNG_GENERATION_MB },
          });
          workers.push(worker);
          let outstanding = 0;
          await new Promise<void>((resolve, reject) => {
            const send = (): boolean => {
              if (next >= ops.length) return false;
              const slice: Array<{ id: number; from: Side; op: FileOp }> = [];
              for (const end = Math.min(ops.length, next + WORKER_SLICE_OPS); next < end; next++) {
                slice.push({ id: next, from: fileWork[next]!.from, op: ops[next]! });
              }
              outstanding++;
              worker.postMessage({ ops: slice });
              return true;
            };
            worker.on('message', (reply: { results: Array<{ id: number; ok: boolean; result?: FileOpResult; code?: string; message?: string }> }) => {
              outstanding--;
              for (const entry of reply.results) {
                const action = fileWork[entry.id]!;
                if (entry.ok) done(action, entry.result!);
                else failed(action, new ReplicaError((entry.code ?? 'EIO') as ReplicaErrorCode, entry.message ?? 'failed', action.item.path));
              }
              send();
              if (outstanding === 0) resolve();
            });
            worker.once('error', reject);
            worker.once('exit', (code) => {
              if (outstanding > 0) reject(new ReplicaError('EIO', `copy worker exited (${code}) with work outstanding`));
            });
            if (!send()) resolve();
            else send();
          });
        }),
      );
    } finally {
      await Promise.all(workers.map((worker) => worker.terminate()));
    }
  }

  // ---- archive -----------------------------------------------------------------------------------------------

  /** With no action at all, the new archive would be the old one unless some unchanged path's stamps moved
   * (buildArchive then keeps every other entry as it was): checked without building it. */
  private archiveUnchanged(actions: Action[]): boolean {
    if (actions.length > 0 || this.newCount() > 0) return false;
    for (const state of this.states.values()) {
      const { a, e1, e2 } = state;
      if (state.refresh !== true || a === undefined || e1 === undefined || e2 === undefined) continue;
      if (
        a.mtime1Ms !== e1.mtimeMs ||
        a.ctime1Ms !== e1.ctimeMs ||
        a.inode1 !== e1.inode ||
        a.mtime2Ms !== e2.mtimeMs ||
        a.ctime2Ms !== e2.ctimeMs ||
        a.inode2 !== e2.inode
      ) {
        return false;
      }
    }
    return true;
  }

  /** The new archive's entries, in order, given to `put` (each path once). */
  private buildArchive(put: (path: string, entry: ArchiveEntry) => void): void {
    const { clean } = this;
    if (clean === undefined) {
      // (Every path a state: nothing was packed, and every state's path is either archived or not.)
      for (const [path, state] of this.states) this.recordPath(path, state, state.action, put);
      return;
    }
    // Packed scans: the old archive's order (parents first) with clean entries kept as they are, then the paths
    // the archive did not know, in state order (parents first; a new path's parent is new or in the archive).
    for (const [path, a] of this.archive) {
      if (!clean.has(a)) {
        const state = this.states.get(path)!;
        this.recordPath(path, state, state.action, put);
        continue;
      }
      // A clean directory the propagation wrote into has new stamps on that side.
      const final1 = a.kind === 'dir' ? this.finalDirStats[0].get(path) : undefined;
      const final2 = a.kind === 'dir' ? this.finalDirStats[1].get(path) : undefined;
      if (final1 === undefined && final2 === undefined) put(path, a);
      else {
        put(
          path,
          refreshed(
            a,
            final1 ?? { kind: 'dir', sizeBytes: 0, mtimeMs: a.mtime1Ms, ctimeMs: a.ctime1Ms, inode: a.inode1, mode: a.mode },
            final2 ?? { kind: 'dir', sizeBytes: 0, mtimeMs: a.mtime2Ms, ctimeMs: a.ctime2Ms, inode: a.inode2, mode: a.mode },
          ),
        );
      }
    }
    this.recordUnarchived(put);
  }

  /**
   * buildArchive in table mode: the loaded table's order, clean entries copied from it as they are (runs of
   * bytes, no object), a clean directory the propagation wrote into with its new stamps, every other entry from
   * its state; then the paths the archive did not know, in state order.
   */
  private buildArchiveTable(swapped: boolean): ArchiveBuilder {
    const table = this.table!;
    const flags = this.flags!;
    const builder = new ArchiveBuilder(swapped);
    const put = (path: string, entry: ArchiveEntry): void => builder.add(path, entry);
    const [finals1, finals2] = this.finalDirStats;
    const dirsTouched = finals1.size > 0 || finals2.size > 0;
    const { count, kinds } = table;
    for (let index = 0; index < count; index++) {
      if (flags[index] !== 1) {
        const path = table.path(index);
        const state = this.states.get(path)!;
        this.recordPath(path, state, state.action, put);
        continue;
      }
      if (dirsTouched && kinds[index] === 0x64) {
        const path = table.path(index);
        const final1 = finals1.get(path);
        const final2 = finals2.get(path);
        if (final1 !== undefined || final2 !== undefined) {
          const a = table.entry(index);
          put(
            path,
            refreshed(
              a,
              final1 ?? { kind: 'dir', sizeBytes: 0, mtimeMs: a.mtime1Ms, ctimeMs: a.ctime1Ms, inode: a.inode1, mode: a.mode },
              final2 ?? { kind: 'dir', sizeBytes: 0, mtimeMs: a.mtime2Ms, ctimeMs: a.ctime2Ms, inode: a.inode2, mode: a.mode },
            ),
          );
          continue;
        }
      }
      // A run of clean entries (all but a few, usually) is copied as one piece; a directory whose stamps this run
      // may have moved ends a run.
      let end = index + 1;
      while (end < count && flags[end] === 1 && (!dirsTouched || kinds[end] !== 0x64)) end++;
      builder.copyRun(table, index, end);
      index = end - 1;
    }
    this.recordUnarchived(put);
    return builder;
  }

  /** The new archive's entries of the paths the old archive did not have: states and packed new paths, in the
   * plan's order (as the object path would record their states). */
  private recordUnarchived(put: (path: string, entry: ArchiveEntry) => void): void {
    if (this.newCount() === 0) {
      for (const [path, state] of this.states) if (state.a === undefined) this.recordPath(path, state, state.action, put);
      return;
    }
    for (const next of this.planOrder()) {
      if (typeof next === 'number') this.recordNew(next, put);
      else if (next.a === undefined) this.recordPath(next.path, next, next.action, put);
    }
  }

  /** The archive entry of packed new path `k`, as recordPath makes it for a copy to an absent path: only when it
   * synced (a failed or skipped path had no archive entry, and gets none). */
  private recordNew(k: number, put: (path: string, entry: ArchiveEntry) => void): void {
    const newPaths = this.newPaths!;
    if (newPaths.status[k] !== NEW_DONE) return;
    const from = newPaths.sides[k] as Side;
    const path = this.newPath(k);
    const winner: EntryStat = this.newEntry(k);
    let targetStat: EntryStat | undefined;
    let fingerprint = '';
    if (winner.kind === 'dir') targetStat = this.newDirStats.get(k);
    else {
      const row = newPaths.rows[k]!;
      targetStat = this.copyResultStat(row);
      fingerprint = this.copyResultFingerprint(row) ?? '';
      if (targetStat === undefined || fingerprint === '') throw new Error(`dirsync: ${path} was copied without a result`);
    }
    if (targetStat === undefined) throw new Error(`dirsync: ${path} was created without a result`);
    const [s1, s2] = from === 1 ? [winner, targetStat] : [targetStat, winner];
    put(path, this.syncedEntry(path, from, s1, s2, fingerprint));
  }

  /** The archive entry of a path synced to stats s1 and s2 (a directory's final stamps, when its contents changed
   * after it was created, replace its stat), with `from`'s kind, size, mode and link target. */
  private syncedEntry(path: string, from: Side | undefined, s1: EntryStat, s2: EntryStat, fingerprint: string | undefined): ArchiveEntry {
    if (s1.kind === 'dir') s1 = this.finalDirStats[0].get(path) ?? s1;
    if (s2.kind === 'dir') s2 = this.finalDirStats[1].get(path) ?? s2;
    const source = from === 2 ? s2 : s1;
    return {
      kind: source.kind,
      sizeBytes: source.kind === 'file' ? source.sizeBytes : 0,
      fingerprint: source.kind === 'file' ? fingerprint ?? '' : '',
      mode: source.mode,
      linkTarget: source.linkTarget ?? '',
      mtime1Ms: s1.mtimeMs,
      ctime1Ms: s1.ctimeMs,
      inode1: s1.inode,
      mtime2Ms: s2.mtimeMs,
      ctime2Ms: s2.ctimeMs,
      inode2: s2.inode,
    };
  }

  /** The new archive's entry of one path (a state), if it has one. */
  private recordPath(path: string, state: PathState, action: Action | undefined, put: (path: string, entry: ArchiveEntry) => void): void {
    if (action === undefined) {
      if (state.refresh === true && state.a !== undefined && state.e1 !== undefined && state.e2 !== undefined) {
        const e1 = state.e1.kind === 'dir' ? this.finalDirStats[0].get(path) ?? state.e1 : state.e1;
        const e2 = state.e2.kind === 'dir' ? this.finalDirStats[1].get(path) ?? state.e2 : state.e2;
        put(path, refreshed(state.a, e1, e2));
        return;
      }
      // Skipped (under a conflict or unknown) or nothing on either side: the archive keeps what it knew.
      if (state.a !== undefined) put(path, state.a); // keep what the archive knew
      return;
    }
    const { item } = action;
    const resolved = item.action === 'conflict' && item.resolvedBy !== undefined;
    if (item.status === 'failed' || (item.action === 'conflict' && !resolved) || item.status === 'skipped') {
      if (state.a !== undefined) put(path, state.a); // keep what the archive knew
      return;
    }
    let s1: EntryStat | undefined;
    let s2: EntryStat | undefined;
    let fingerprint: string | undefined;
    if (item.action === 'equal' && item.from === undefined) {
      s1 = state.e1;
      s2 = state.e2;
      fingerprint = state.fp1 ?? state.fp2;
      if (s1 === undefined || s2 === undefined) return; // deleted on both, or refresh of a one-sided path
      if (s1.kind === 'file' && (state.fp1 === undefined || state.fp2 === undefined || state.fp1 !== state.fp2)) {
        if (state.a !== undefined) put(path, state.a); // keep what the archive knew
        return;
      }
    } else {
      const winner = entryOf(state, action.from);
      if (winner === undefined) return; // deletion propagated: gone from both sides
      const targetStat = action.resultStat ?? this.copyResultStat(action.resultRow) ?? entryOf(state, other(action.from));
      if (targetStat === undefined) {
        if (state.a !== undefined) put(path, state.a); // keep what the archive knew
        return;
      }
      fingerprint = action.resultFingerprint ?? this.copyResultFingerprint(action.resultRow) ?? fingerprintOf(state, action.from);
      if (winner.kind === 'file' && fingerprint === undefined) {
        if (state.a !== undefined) put(path, state.a); // keep what the archive knew
        return;
      }
      [s1, s2] = action.from === 1 ? [winner, targetStat] : [targetStat, winner];
    }
    put(path, this.syncedEntry(path, item.from, s1, s2, fingerprint));
  }
}
