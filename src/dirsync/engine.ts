// The sync engine: runs one sync of a replica pair through its phases, each a module of its own with its own
// types (docs/architecture.md, "dirsync"). It sees the two roots only through the Replica interface
// (replica.ts), so the same phases sync local directories, tcp:// and ssh:// roots.
//
// One run:
//   1. open both replicas, take the pair's lock, load the archive (archive/file.ts);
//   2. update detection (detect/): scan both sides in parallel (scan.ts), join the scans with the archive
//      (join.ts; clean paths and packed new paths need no state), hash only the files whose fast check failed,
//      or that are new on both sides, or that may be copied locally on the other side, and classify each path
//      per side (updates.ts);
//   3. reconciliation (reconcile/): decide each path's action or conflict, in path order so that a decision on a
//      directory governs its subtree (reconcile.ts); check deletion safety, show the plan, ask (or, with
//      --batch, go on) (plan.ts);
//   4. propagation (propagate/): renames of conflict losers and deletions, directories, files and links through
//      a copy back-end, deferred deletions, properties (propagate.ts);
//   5. archive (archive/build.ts): commit the archive with exactly the paths that synced; release the lock.
import { ArchiveError, archivePathFor, ArchiveTable, loadArchiveData, PairLock, type ArchiveEntry } from './archive/file.js';
import { Detection } from './detect/detection.js';
import { NEW_DONE, NEW_FAILED, NEW_PLANNED, NEW_SKIPPED, packedNewEnabled } from './detect/new-paths.js';
import { joinScans, localCopier, scanBoth } from './detect/scan.js';
import { detectUpdates } from './detect/updates.js';
import type { EarlyStart } from './early.js';
import { LocalReplica } from './local.js';
import type { Propagation } from './propagate/propagate.js';
import { deletionSafety, exposeItems, reconcile, type Action } from './reconcile/reconcile.js';
import { ReplicaError, type Replica, type ReplicaInfo } from './replica.js';
import { trace, type SyncOptions, type SyncResult } from './types.js';

export type { ActionKind, ChangeKind, PlanItem, Prefer, ProgressState, Side, SyncOptions, SyncResult } from './types.js';

export class SyncEngine {
  private readonly options: SyncOptions;
  private readonly replicas: [Replica, Replica];
  /** The run's update detection: what each later phase reads (kept after the run for tests and tracing). */
  readonly detection = new Detection();

  constructor(replica1: Replica, replica2: Replica, options: SyncOptions) {
    this.replicas = [replica1, replica2];
    this.options = options;
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
    const { options, replicas, detection } = this;
    let early = options.early;
    // An early start's lock is this run's from here on: released in `finally` whatever happens.
    let lock: PairLock | undefined = early?.lock;
    let propagation: Propagation | undefined;
    try {
      // DRBDTS_DIRSYNC_PACKED_NEW, read once per run: a bad value is a fatal error before anything is done.
      const packedNewWanted = packedNewEnabled();
      const infos: [ReplicaInfo, ReplicaInfo] = [await replicas[0].open(), await replicas[1].open()];
      result.root1 = infos[0].rootId;
      result.root2 = infos[1].rootId;
      const id1 = `${infos[0].hostName}:${infos[0].rootId}`;
      const id2 = `${infos[1].hostName}:${infos[1].rootId}`;
      if (early !== undefined && !this.earlyMatches(early, id1, id2)) {
        early.lock.release();
        lock = undefined;
        early = undefined;
      }
      if (id1 === id2) throw new ReplicaError('ENOROOT', `both roots are the same directory (${result.root1})`);
      const { file, swapped } = early ?? (await archivePathFor(options.archiveDir, id1, id2));
      result.archiveFile = file;
      if (!options.dryRun && lock === undefined) lock = PairLock.acquire(file, options.warn);

      // Update detection. The scans start first: a local replica's scan runs on thread-pool threads
      // (native/src/dirsync_scan.cc) while this thread parses the archive; the archive is joined with them only
      // after both scans.
      const scanning = early !== undefined ? early.scans.then((packed) => ({ packed })) : scanBoth(replicas, options, detection);
      scanning.catch(() => undefined); // a scan failure is observed below, never an unhandled rejection meanwhile
      let loaded: ArchiveTable | Map<string, ArchiveEntry>;
      try {
        loaded = await (early?.archive ?? loadArchiveData(file, swapped));
      } catch (error) {
        await scanning.catch(() => undefined);
        throw error;
      }
      const scanned = await scanning;
      trace('scanned');
      // Everything a packed new path skips must be known not to apply: a run that propagates on its own (no dry
      // run), with native copies between two local roots for its files (the join checks the rest).
      const packNewPaths = packedNewWanted && !options.dryRun && localCopier(replicas) !== undefined;
      const problems = joinScans(detection, scanned, loaded, { options, replicas, packNewPaths });
      trace('joined');
      await detectUpdates(detection, replicas, problems, options);
      trace('detected');

      // Reconciliation.
      const actions = reconcile(detection.states, options);
      trace('reconciled');
      exposeItems(result, actions, detection);
      const warnings = deletionSafety(actions, detection, [infos[0].rootId, infos[1].rootId]);
      if (warnings.length > 0 && options.batch && !options.dryRun) {
        throw new ReplicaError('ENOROOT', warnings.join('; ') + '; refusing to propagate in batch mode (run without --batch to confirm)');
      }
      let proceed = !options.dryRun;
      if (proceed && options.confirm !== undefined && (detection.newCount() > 0 || actions.some((a) => a.item.action !== 'equal' && a.item.action !== 'conflict' && a.item.status === 'planned'))) {
        proceed = await options.confirm(result.items, warnings);
      }

      if (proceed) {
        // Propagation, then the archive. Their modules are loaded only when there is something to propagate or to
        // record: a no-change run (the common cron case) needs neither, and Node's ESM loader costs ~0.5-1 ms of
        // CPU per module.
        if (detection.newCount() > 0 || actions.some((a) => a.item.action !== 'equal' && (a.item.action !== 'conflict' || a.item.resolvedBy !== undefined))) {
          const { Propagation } = await import('./propagate/propagate.js');
          propagation = new Propagation(replicas, options, detection);
          await propagation.run(actions);
        }
        trace('propagated');
        if (actions.length > 0 || !detection.archiveUnchanged()) {
          const { commitArchive, NOTHING_PROPAGATED } = await import('./archive/build.js');
          await commitArchive({ file, swapped, roots: { root1Id: id1, root2Id: id2 } }, detection, actions, propagation ?? NOTHING_PROPAGATED);
        }
        trace('archived');
        if (propagation?.connectionLost !== undefined) throw propagation.connectionLost;
      } else if (!options.dryRun) {
        // The user declined: everything planned is skipped (exit 1). A dry run leaves items 'planned'.
        for (const action of actions) if (action.item.status === 'planned' && action.item.action !== 'equal') action.item.status = 'skipped';
        const status = detection.newPaths?.status;
        for (let k = 0; k < detection.newCount(); k++) if (status![k] === NEW_PLANNED) status![k] = NEW_SKIPPED;
      }
      this.count(result, actions);
    } catch (error) {
      if (!(error instanceof ReplicaError) && !(error instanceof ArchiveError)) throw error;
      result.fatal = error.message;
      result.exitCode = 3;
    } finally {
      lock?.release();
      result.bytesTransferred = propagation?.bytesTransferred ?? 0;
    }
    return result;
  }

  /** The result's counts and exit code. */
  private count(result: SyncResult, actions: Action[]): void {
    const { detection } = this;
    for (const { item } of actions) {
      if ((item.action === 'conflict' && item.resolvedBy === undefined) || item.status === 'skipped') result.counts.skipped++;
      else if (item.status === 'failed') result.counts.failed++;
      else if (item.action === 'equal') result.counts.equal++;
      else if (item.status === 'done') result.counts.propagated++;
    }
    // Packed new paths: copies, counted as their items would be.
    for (let k = 0; k < detection.newCount(); k++) {
      const status = detection.newPaths!.status[k];
      if (status === NEW_SKIPPED) result.counts.skipped++;
      else if (status === NEW_FAILED) result.counts.failed++;
      else if (status === NEW_DONE) result.counts.propagated++;
    }
    // Paths that could not be read at all (unlistable directories, unreadable files) are failures too: they
    // were not synced, and the next run retries them.
    result.problems = detection.problems;
    result.counts.failed += detection.problems.length;
    result.exitCode = result.counts.failed > 0 ? 2 : result.counts.skipped > 0 ? 1 : 0;
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
}
