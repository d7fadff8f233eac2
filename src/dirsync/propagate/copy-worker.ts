// A worker thread that executes file operations between two local roots. Between local roots every operation is
// synchronous file-system work (open, read, hash, write, rename); on the main thread alone a sync of many small
// files uses one core, so propagation (workers.ts) hands slices of the work to a few of these workers. Each runs
// the very same LocalReplica code (temp file, fingerprint check, precondition re-check, rename) as the main thread
// would.
import { parentPort, workerData } from 'node:worker_threads';
import { executeFileOp, type FileOp, type FileOpResult } from './fileop.js';
import { LocalReplica } from '../local.js';
import { ReplicaError } from '../replica.js';

export interface CopyWorkerData {
  roots: [string, string];
  fsync: boolean;
}

export interface CopyWorkerRequest {
  /** `from`: the side (1 or 2) whose content is propagated to the other. */
  ops: Array<{ id: number; from: 1 | 2; op: FileOp }>;
}

export interface CopyWorkerReply {
  results: Array<{ id: number; ok: true; result: FileOpResult } | { id: number; ok: false; code: string; message: string }>;
}

const data = workerData as CopyWorkerData;
const replicas = [new LocalReplica(data.roots[0], { fsync: data.fsync }), new LocalReplica(data.roots[1], { fsync: data.fsync })] as const;

parentPort!.on('message', async (request: CopyWorkerRequest) => {
  const reply: CopyWorkerReply = { results: [] };
  for (const { id, from, op } of request.ops) {
    try {
      const source = replicas[from - 1];
      const target = replicas[2 - from];
      reply.results.push({ id, ok: true, result: await executeFileOp(op, source, target) });
    } catch (error) {
      const code = error instanceof ReplicaError ? error.code : 'EIO';
      reply.results.push({ id, ok: false, code, message: error instanceof Error ? error.message : String(error) });
    }
  }
  parentPort!.postMessage(reply);
});
