// The file back-end between two local roots without the addon's copy: copy workers (copy-worker.ts), each
// running the same LocalReplica code as the main thread, so more than one core does the file-system work.
import { ReplicaError, type ReplicaErrorCode } from '../replica.js';
import type { Action } from '../reconcile/reconcile.js';
import type { Side } from '../types.js';
import type { FileOp, FileOpResult } from './fileop.js';

const WORKER_SLICE_OPS = 64;
const DEFAULT_COPY_WORKERS = 3;
const WORKER_YOUNG_GENERATION_MB = 4;

/**
 * Run file operations in worker threads between two local roots: slices of WORKER_SLICE_OPS, two slices
 * outstanding per worker so none idles while the main thread records results.
 */
export async function runInWorkers(
  roots: [string, string],
  fsync: boolean,
  fileWork: Action[],
  ops: FileOp[],
  done: (action: Action, result: FileOpResult) => void,
  failed: (action: Action, error: ReplicaError) => void,
): Promise<void> {
  const { Worker } = await import('node:worker_threads');
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
