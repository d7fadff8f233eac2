// Propagation: carry out the plan on the replicas (unison's transport.ml and files.ml), every change checked
// against the state the scan saw (a precondition), in phases:
//   1a. rename conflict losers kept as conflict copies (shallowest first: a moved directory takes its subtree);
//   1b. deletions and removals of a mismatched kind, deepest first (deletions whose content a local copy will
//       reuse wait until phase 3);
//   2a. directories, parents first; 2b. files and links, through a back-end: the addon's copy between two local
//       roots (native-copies.ts), copy workers (workers.ts), or several in flight on this thread (remote roots);
//   3. the deferred deletions; 4. properties only, deepest first;
// then the final stamps of the directories whose contents changed, for the archive.
import { type Detection, entryOf } from '../detect/detection.js';
import { NEW_DONE, NEW_FAILED, NEW_PLANNED, NEW_SKIPPED } from '../detect/new-paths.js';
import type { LocalReplica } from '../local.js';
import { ReplicaError, type EntryStat, type Replica } from '../replica.js';
import type { Action } from '../reconcile/reconcile.js';
import { depthOf, modeOf, other, parentOf, TIME_TOLERANCE_MS, type ProgressState, type Side, type SyncOptions } from '../types.js';
import { executeFileOp, type FileOpResult } from './fileop.js';
import { localCopier, localRoots } from '../detect/scan.js';
import { buildCopyIndex, planFileOp } from './file-plan.js';
import { runNativeCopies } from './native-copies.js';
import { CopyResults, type PropagationResults } from './results.js';
import { runInWorkers } from './workers.js';

/** Errors meaning the link to a remote root is gone or unusable: the run stops instead of failing path by path. */
const CONNECTION_FATAL = new Set(['ECONN', 'EPROTO', 'EAUTH']);
const PARALLEL_TRANSFERS = 16;
/** Below this many files the start-up of copy workers (~30 ms each) costs more than it saves. */
const WORKER_MIN_FILES = 256;

export class Propagation implements PropagationResults {
  readonly copies = new CopyResults();
  readonly newDirStats = new Map<number, EntryStat>();
  readonly finalDirStats: [Map<string, EntryStat>, Map<string, EntryStat>] = [new Map(), new Map()];
  bytesTransferred = 0;
  /** Set when the link to a remote root is lost: the rest of the plan was skipped; the run exits 3. */
  connectionLost: ReplicaError | undefined;

  constructor(
    private readonly replicas: [Replica, Replica],
    private readonly options: SyncOptions,
    private readonly detection: Detection,
  ) {}

  private replica(side: Side): Replica {
    return this.replicas[side - 1]!;
  }

  /** Propagate the plan: `actions` (reconcile) and the detection's packed new paths. */
  async run(actions: Action[]): Promise<void> {
    const work = actions.filter((action) => action.item.action !== 'equal' && (action.item.action !== 'conflict' || action.item.resolvedBy !== undefined));
    const { newPaths } = this.detection;
    const newCount = this.detection.newCount();
    if (work.length === 0 && newCount === 0) return; // nothing to propagate (a no-change run): no index of every file to build
    const progress: ProgressState = { itemsDone: 0, itemsTotal: work.length + newCount, bytesDone: 0, bytesTotal: 0 };
    for (const action of work) {
      const entry = entryOf(action.state, action.from);
      if (entry?.kind === 'file' && (action.item.action === 'copy' || action.item.action === 'conflict')) progress.bytesTotal += entry.sizeBytes;
    }
    for (let k = 0; k < newCount; k++) if (newPaths!.isFile(k)) progress.bytesTotal += newPaths!.sizeBytes(k);
    const report = (): void => {
      progress.itemsDone++;
      this.options.progress?.(progress);
    };
    const fail = (action: Action, error: unknown): void => {
      if (this.noteConnectionLoss(error)) {
        action.item.status = 'skipped';
        action.item.error = this.connectionLost!.message;
        return;
      }
      action.item.status = 'failed';
      action.item.error = error instanceof Error ? error.message : String(error);
      this.options.warn(`failed: ${action.item.path}: ${action.item.error}`);
    };
    // fail() for a packed new path: the same outcome, kept as its status and message.
    const failNew = (k: number, error: unknown): void => {
      if (this.noteConnectionLoss(error)) {
        newPaths!.status[k] = NEW_SKIPPED;
        newPaths!.errors.set(k, this.connectionLost!.message);
        return;
      }
      const message = error instanceof Error ? error.message : String(error);
      newPaths!.status[k] = NEW_FAILED;
      newPaths!.errors.set(k, message);
      this.options.warn(`failed: ${newPaths!.path(k)}: ${message}`);
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
    const { index, sources: copySources } = buildCopyIndex(work, this.detection);
    const deferredDeletes = new Set<Action>();

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
    const dirOrder: Iterable<Action | number> = newCount === 0 ? dirCreates : this.inPlanOrder(new Set(dirCreates), (k) => newPaths!.isDir(k));
    for (const next of dirOrder) {
      if (typeof next === 'number') {
        const side = newPaths!.side(next);
        try {
          this.newDirStats.set(next, await this.replica(other(side)).mkdir(newPaths!.path(next), newPaths!.mode(next)));
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
          action.resultStat = await this.replica(other(action.from)).replaceWithDir!(action.item.path, source.mode, action.target!);
          action.target = undefined;
        } else if (action.target === undefined) {
          action.resultStat = await this.replica(other(action.from)).mkdir(action.item.path, source.mode);
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
    const roots = localRoots(this.replicas);
    const copier = localCopier(this.replicas);
    // A packed new path is made only when its files can be copied natively (detect/join.ts).
    if (newCount > 0 && copier === undefined) throw new Error('dirsync: packed new paths without the native copy');
    const fsync = roots !== undefined && (this.replicas[0] as LocalReplica).fsyncFiles;
    if (copier !== undefined) {
      await runNativeCopies({
        copier,
        roots: roots!,
        replicas: this.replicas,
        fsync,
        options: this.options,
        fileWork,
        index,
        newPaths,
        results: this.copies,
        done: fileDone,
        failed: fileFailed,
        newDone: (k, sizeBytes) => {
          newPaths!.status[k] = NEW_DONE;
          progress.bytesDone += sizeBytes;
          report();
        },
        newFailed: (k, error) => {
          failNew(k, error);
          report();
        },
        transferred: (bytes) => void (this.bytesTransferred += bytes),
      });
    } else if (roots !== undefined && fileWork.length >= WORKER_MIN_FILES && process.env.DRBDTS_DIRSYNC_WORKERS !== '0') {
      const ops = fileWork.map((action) => planFileOp(action, index, this.options));
      await runInWorkers(roots, fsync, fileWork, ops, fileDone, fileFailed);
    } else {
      const ops = fileWork.map((action) => planFileOp(action, index, this.options));
      let next = 0;
      const worker = async (): Promise<void> => {
        while (next < fileWork.length && this.connectionLost === undefined) {
          const at = next++;
          const action = fileWork[at]!;
          try {
            fileDone(action, await executeFileOp(ops[at]!, this.replica(action.from), this.replica(other(action.from))));
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
    await this.recordFinalDirStats(work);
  }

  /** A failure that means the link to a remote root is gone: noted once (one message; the rest of the plan is
   * skipped, the archive keeps what synced, and the run exits 3). True while the connection is lost. */
  private noteConnectionLoss(error: unknown): boolean {
    if (this.connectionLost === undefined && error instanceof ReplicaError && CONNECTION_FATAL.has(error.code)) {
      this.connectionLost = error;
      this.options.warn(`connection to a remote root lost: ${error.message}; stopping`);
    }
    return this.connectionLost !== undefined;
  }

  /**
   * Directories whose contents changed have new mtimes on the changed side: record their final stamps now, or
   * the next run would see every such directory as touched and rewrite the archive for nothing.
   */
  private async recordFinalDirStats(work: Action[]): Promise<void> {
    const { newPaths } = this.detection;
    const newCount = this.detection.newCount();
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
      const side = other(newPaths!.side(k));
      const path = newPaths!.path(k);
      const parent = parentOf(path);
      if (parent !== '') touched[side - 1].add(parent);
      if (newPaths!.isDir(k)) touched[side - 1].add(path);
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
    for (const next of this.detection.planOrder()) {
      if (typeof next === 'number') {
        if (takeNew(next)) yield next;
      } else if (next.action !== undefined && actions.has(next.action)) yield next.action;
    }
  }

  /** A file or symlink turning into a directory, on a replica that can swap one in atomically. */
  private swapsInDir(action: Action): boolean {
    return action.removeTargetFirst === true && action.target !== undefined
      && action.target.kind !== 'dir' && entryOf(action.state, action.from)?.kind === 'dir'
      && typeof this.replica(other(action.from)).replaceWithDir === 'function';
  }

  private async applyProps(action: Action): Promise<void> {
    const source = entryOf(action.state, action.from)!;
    const target = action.target!;
    const mode = this.options.perms && modeOf(source) !== modeOf(target) ? source.mode : undefined;
    const mtimeMs =
      this.options.times && source.kind === 'file' && Math.abs(source.mtimeMs - target.mtimeMs) >= TIME_TOLERANCE_MS ? source.mtimeMs : undefined;
    if (mode === undefined && mtimeMs === undefined) {
      action.resultStat = target;
      return;
    }
    action.resultStat = await this.replica(other(action.from)).setProps({ path: action.item.path, precondition: target, mode, mtimeMs });
  }

  private recordFileResult(action: Action, result: FileOpResult): void {
    if (result.transfer !== 'link') action.item.transfer = result.transfer;
    this.bytesTransferred += result.bytesSent;
    action.resultStat = result.stat;
    if (result.fingerprint !== undefined) action.resultFingerprint = result.fingerprint;
  }
}
