// Update detection, step 1: scan both replicas at once. Two plain local roots are scanned by the addon into
// packed records (native/scan.ts), kept as they are for the join with the archive (join.ts); any other pair is
// scanned entry by entry into states.
import { LocalReplica } from '../local.js';
import type { Replica } from '../replica.js';
import type { PackedScan } from '../../native/scan.js';
import type { Side, SyncOptions } from '../types.js';
import type { Detection } from './detection.js';
import { newState } from './path-state.js';

/** Each side's problem paths (unlistable directories: their subtrees are unknown). */
export type ProblemPaths = [Set<string>, Set<string>];

/** A scan's outcome: packed records of both sides, or the states already made (and the problem paths). */
export type Scanned = ProblemPaths | { packed: [PackedScan, PackedScan] };

export async function scanBoth(replicas: [Replica, Replica], options: SyncOptions, detection: Detection): Promise<Scanned> {
  const [r1, r2] = replicas;
  if (r1.constructor === LocalReplica && r2.constructor === LocalReplica) {
    const scanOptions = { ignore: options.ignore };
    const packed = await Promise.all([(r1 as LocalReplica).scanPacked(scanOptions), (r2 as LocalReplica).scanPacked(scanOptions)]);
    if (packed[0] !== undefined && packed[1] !== undefined) return { packed: packed as [PackedScan, PackedScan] };
  }
  return scanEntries(replicas, options, detection);
}

/** The object path: every scanned path becomes a state, as the batches arrive. */
async function scanEntries(replicas: [Replica, Replica], options: SyncOptions, detection: Detection): Promise<ProblemPaths> {
  const problems: ProblemPaths = [new Set(), new Set()];
  const { states } = detection;
  const scanSide = async (side: Side): Promise<void> => {
    for await (const batch of replicas[side - 1]!.scan({ ignore: options.ignore })) {
      for (const entry of batch.entries) {
        let state = states.get(entry.path);
        if (state === undefined) {
          state = newState(entry.path, undefined);
          states.set(entry.path, state);
        }
        if (side === 1) state.e1 = entry;
        else state.e2 = entry;
      }
      for (const problem of batch.problems) {
        problems[side - 1].add(problem.path);
        detection.problems.push({ side, path: problem.path, message: problem.message });
        options.warn(`root ${side}: ${problem.path}: ${problem.message} (skipped)`);
      }
    }
  };
  await Promise.all([scanSide(1), scanSide(2)]);
  return problems;
}
