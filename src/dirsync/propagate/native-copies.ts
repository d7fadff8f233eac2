// The file back-end between two local roots: full-content copies go to the addon (native/src/dirsync_copy.cc)
// in batches on the thread pool, so more than one core does the file-system work with no V8 isolate per thread.
import type { NewPaths } from '../detect/new-paths.js';
import { NEW_PLANNED } from '../detect/new-paths.js';
import { entryOf } from '../detect/detection.js';
import { ReplicaError, type Replica } from '../replica.js';
import { COPY_DONE, COPY_FAILURE_CODES, COPY_IN_FIELDS, COPY_OUT_FIELDS, type CopyBatchResult, type nativeCopier } from '../../native/scan.js';
import type { Action } from '../reconcile/reconcile.js';
import { other, type Side, type SyncOptions } from '../types.js';
import { executeFileOp, type FileOp, type FileOpResult } from './fileop.js';
import { planFileOp, type CopyIndex } from './file-plan.js';
import type { CopyResults } from './results.js';

const DEFAULT_COPY_JOBS = 3;
/** Operations per native copy job (one thread-pool hop): enough to amortise the hop, few enough to spread. */
const NATIVE_COPY_BATCH_OPS = 64;

export interface NativeCopyRun {
  copier: NonNullable<ReturnType<typeof nativeCopier>>;
  roots: [string, string];
  replicas: [Replica, Replica];
  fsync: boolean;
  options: SyncOptions;
  /** The states' files and links to propagate, in plan order. */
  fileWork: Action[];
  index: CopyIndex;
  /** The packed new paths (their planned files are copied after the states' files). */
  newPaths: NewPaths | undefined;
  results: CopyResults;
  done: (action: Action, result: FileOpResult | undefined) => void;
  failed: (action: Action, error: ReplicaError) => void;
  newDone: (k: number, sizeBytes: number) => void;
  newFailed: (k: number, error: ReplicaError) => void;
  /** Bytes a native copy wrote (the result's bytesTransferred). */
  transferred: (bytes: number) => void;
}

/**
 * File operations between two local roots with the addon: full-content copies of files (to an absent path or
 * over the file the scan saw) go to the addon in batches of NATIVE_COPY_BATCH_OPS, at most `jobs` batches on the
 * thread pool at once; the rest (symlinks, local copies of content the target already has, replacing a symlink)
 * run here meanwhile through executeFileOp. Each operation is planned when its batch is made, so no FileOp is
 * kept for the whole list.
 */
export async function runNativeCopies(run: NativeCopyRun): Promise<void> {
  const { copier, roots, fileWork, newPaths, results: copyResults, fsync } = run;
  // After the states' files, the packed new files (every one a full copy to an absent path), fed to the addon
  // from their scan records: paths as the scan's bytes, numbers from the record, no object per file.
  const newCount = newPaths?.count ?? 0;
  let newFiles = 0;
  for (let k = 0; k < newCount; k++) if (newPaths!.isFile(k)) newFiles++;
  copyResults.allocate(fileWork.length + newFiles);
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
      if (!newPaths!.isFile(k) || newPaths!.status[k] !== NEW_PLANNED) continue;
      const side = newPaths!.side(k);
      if (from !== undefined && side !== from) break;
      from = side;
      const records = newPaths!.recordsOf(k);
      const o = newPaths!.offset(k);
      const piece = newPaths!.pathBytes(k);
      pieces.push(piece);
      bytes += piece.length;
      // As planFileOp would: the source's size, mtime and inode to re-check, target absent, the source's mode
      // (no target file whose bits to keep), its mtime with --times.
      const n = indexes.length * COPY_IN_FIELDS;
      numbers[n] = records[o + 5]!;
      numbers[n + 1] = records[o + 6]!;
      numbers[n + 2] = records[o + 8]!;
      numbers[n + 7] = records[o + 4]!;
      numbers[n + 8] = run.options.times ? records[o + 6]! : NaN;
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
        const status = results[j * COPY_OUT_FIELDS]!;
        if (status !== COPY_DONE) {
          run.newFailed(k, new ReplicaError(COPY_FAILURE_CODES[status - 1] ?? 'EIO', messages[j]!, newPaths!.path(k)));
          continue;
        }
        newPaths!.rows[k] = copyResults.add(results, fingerprints, j);
        const sizeBytes = batch.numbers[j * COPY_IN_FIELDS]!;
        run.transferred(sizeBytes);
        run.newDone(k, sizeBytes);
      }
    }
  };
  const jobs = Math.max(1, Number(process.env.DRBDTS_DIRSYNC_WORKERS ?? DEFAULT_COPY_JOBS) || DEFAULT_COPY_JOBS);
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
      const op = planFileOp(action, run.index, run.options);
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
        const status = results[k * COPY_OUT_FIELDS]!;
        if (status !== COPY_DONE) {
          run.failed(action, new ReplicaError(COPY_FAILURE_CODES[status - 1] ?? 'EIO', messages[k]!, action.item.path));
          continue;
        }
        // The result stays packed: the archive makes the entry from its row (results.ts).
        action.resultRow = copyResults.add(results, fingerprints, k);
        action.item.transfer = 'full';
        run.transferred(entryOf(action.state, from)!.sizeBytes);
        run.done(action, undefined);
      }
    }
  };
  const copyJob = async (): Promise<void> => {
    await copyStatesJob();
    await copyNewJob();
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
        run.done(action, await executeFileOp(op, run.replicas[action.from - 1]!, run.replicas[other(action.from) - 1]!));
      } catch (error) {
        run.failed(action, error instanceof ReplicaError ? error : new ReplicaError('EIO', String(error), action.item.path));
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
