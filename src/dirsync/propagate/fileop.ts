// One file (or symlink) propagation, as a plain-data operation so that it can run on the main thread against any
// pair of replicas, or inside a copy worker (copy-worker.ts) between two local roots. The decision of how the
// content travels (local copy on the target, delta, full) is made by file-plan.ts; this only executes it, with the
// fallback from a failed local copy to a full transfer.
import { LocalReplica } from '../local.js';
import { ReplicaError, type EntryStat, type Precondition, type Replica } from '../replica.js';

export interface FileOp {
  path: string;
  /** The source's scanned stat (kind file or symlink). */
  source: EntryStat;
  precondition: Precondition;
  mode: number;
  mtimeMs?: number;
  /** Content already on the target side: copy it there instead of transferring. */
  local?: { fromPath: string; fromStat: EntryStat; fingerprint: string };
  /** Use a delta against the target's current file (a remote side and a big enough old version). */
  delta?: boolean;
}

export interface FileOpResult {
  stat: EntryStat;
  fingerprint?: string;
  transfer: 'full' | 'delta' | 'local' | 'link';
  /** Content bytes read from the source and sent to the target ('full' only). */
  bytesSent: number;
}

export async function executeFileOp(op: FileOp, source: Replica, target: Replica): Promise<FileOpResult> {
  const { path, precondition, mode, mtimeMs } = op;
  if (op.source.kind === 'symlink') {
    const stat = await target.symlink(path, op.source.linkTarget!, precondition);
    return { stat, transfer: 'link', bytesSent: 0 };
  }
  if (op.local !== undefined) {
    try {
      const result = await target.writeFile({
        path,
        precondition,
        mode,
        mtimeMs,
        content: { kind: 'local', fromPath: op.local.fromPath, fromStat: op.local.fromStat, fingerprint: op.local.fingerprint, sizeBytes: op.source.sizeBytes },
      });
      return { stat: result.stat, fingerprint: result.fingerprint, transfer: 'local', bytesSent: 0 };
    } catch (error) {
      // The local copy's origin changed meanwhile: fall back to a transfer.
      if (!(error instanceof ReplicaError) || (error.code !== 'ECHANGED' && error.code !== 'EGONE' && error.code !== 'EHASH')) throw error;
      if (error.path === path) throw error; // the target itself changed: no fallback can help
    }
  }
  if (op.delta === true && precondition !== 'absent' && precondition.kind === 'file') {
    const signature = await target.signature(path, precondition);
    const delta = await source.delta(path, op.source, signature);
    const result = await target.writeFile({
      path,
      precondition,
      mode,
      mtimeMs,
      sourceStat: op.source,
      content: { kind: 'delta', basisPath: path, basisStat: precondition, source: delta },
    });
    return { stat: result.stat, fingerprint: result.fingerprint, transfer: 'delta', bytesSent: 0 };
  }
  // Between two local replicas the target consumes each chunk before asking for the next: the source may
  // lend pooled buffers (LocalReplica.readFile's `recycle`) instead of allocating one per file.
  const content =
    source instanceof LocalReplica && target instanceof LocalReplica
      ? await source.readFile(path, op.source, { recycle: true })
      : await source.readFile(path, op.source);
  const result = await target.writeFile({ path, precondition, mode, mtimeMs, sourceStat: op.source, content: { kind: 'full', source: content } });
  return { stat: result.stat, fingerprint: result.fingerprint, transfer: 'full', bytesSent: op.source.sizeBytes };
}
