// Update detection, step 3: hash only the files whose fast check (size, mtime, ctime, inode against the archive)
// failed, that are new on both sides, or that may be copied locally on the other side; then classify each state
// per side (unchanged, new, modified, deleted, props) against its archive entry.
import type { ArchiveEntry } from '../archive/file.js';
import { sameStat, type Replica, type ScanEntry } from '../replica.js';
import { modeOf, other, parentOf, TIME_TOLERANCE_MS, type ChangeKind, type Side, type SyncOptions } from '../types.js';
import { type Detection, entryOf, fingerprintOf, type PathState } from './detection.js';
import type { ProblemPaths } from './scan.js';

const HASH_BATCH_PATHS = 256;

/** The options update detection reads. */
export type DetectOptions = Pick<SyncOptions, 'alwaysHash' | 'perms' | 'times' | 'warn'>;

/** Is `path` at or under one of the problem paths (unlistable directories)? */
function underProblem(path: string, problems: Set<string>): boolean {
  if (problems.size === 0) return false;
  if (problems.has('.')) return true;
  for (let current = path; current !== ''; current = parentOf(current)) if (problems.has(current)) return true;
  return false;
}

function fastCheckPasses(entry: ScanEntry, a: ArchiveEntry, side: Side, options: DetectOptions): boolean {
  if (options.alwaysHash) return false;
  return side === 1
    ? entry.sizeBytes === a.sizeBytes && entry.mtimeMs === a.mtime1Ms && entry.ctimeMs === a.ctime1Ms && entry.inode === a.inode1
    : entry.sizeBytes === a.sizeBytes && entry.mtimeMs === a.mtime2Ms && entry.ctimeMs === a.ctime2Ms && entry.inode === a.inode2;
}

/** Fingerprint what needs one, then classify every state (states under a problem path are marked unknown). */
export async function detectUpdates(detection: Detection, replicas: [Replica, Replica], problems: ProblemPaths, options: DetectOptions): Promise<void> {
  const { states } = detection;
  const toHash: [string[], string[]] = [[], []];
  // Copy-local candidates: sizes of files on each side whose fingerprint is known without hashing.
  // (Clean files, whose sizes cleanFileSizes() gives, are known on both sides too.)
  const knownSizes: [Set<number>, Set<number>] = [new Set(), new Set()];
  for (const state of states.values()) {
    if (underProblem(state.path, problems[0]) || underProblem(state.path, problems[1])) {
      state.unknown = true;
      continue;
    }
    const { a } = state;
    for (const side of [1, 2] as const) {
      const entry = entryOf(state, side);
      if (entry?.kind !== 'file') continue;
      if (a?.kind === 'file' && fastCheckPasses(entry, a, side, options)) {
        if (side === 1) state.fp1 = a.fingerprint;
        else state.fp2 = a.fingerprint;
        knownSizes[side - 1].add(entry.sizeBytes);
      } else if (a?.kind === 'file' || options.alwaysHash || entryOf(state, other(side))?.kind === 'file') {
        toHash[side - 1].push(state.path);
      }
    }
  }
  // New files on one side only whose size matches a known file on the other side: hash them, so that a rename
  // or copy is recognised and propagated as a local copy on the target instead of a transfer.
  const candidates: Array<{ state: PathState; side: Side; size: number }> = [];
  for (const state of states.values()) {
    if (state.unknown || state.a !== undefined) continue;
    for (const side of [1, 2] as const) {
      const entry = entryOf(state, side);
      if (entry?.kind === 'file' && entry.sizeBytes > 0 && entryOf(state, other(side)) === undefined) candidates.push({ state, side, size: entry.sizeBytes });
    }
  }
  if (candidates.length > 0) {
    const cleanSizes = detection.cleanFileSizes(new Set(candidates.map((candidate) => candidate.size)));
    for (const { state, side, size } of candidates) {
      if (knownSizes[other(side) - 1].has(size) || cleanSizes.has(size)) toHash[side - 1].push(state.path);
    }
  }
  await Promise.all([hashSide(detection, replicas[0], 1, toHash[0], options), hashSide(detection, replicas[1], 2, toHash[1], options)]);
  for (const state of states.values()) {
    if (state.unknown) continue;
    state.change1 = classify(state, 1, options);
    state.change2 = classify(state, 2, options);
  }
  // Insertion order of `states` already puts every parent before its children: each source (scan 1, scan 2,
  // archive) lists parents first, and a path first inserted by one source has its parent in that same source,
  // earlier. No sort of every path is needed (150 ms on 100,000 paths), nor a copy of the keys: the later phases
  // iterate the map itself.
}

async function hashSide(detection: Detection, replica: Replica, side: Side, paths: string[], options: DetectOptions): Promise<void> {
  const { states } = detection;
  for (let start = 0; start < paths.length; start += HASH_BATCH_PATHS) {
    const batch = paths.slice(start, start + HASH_BATCH_PATHS);
    let results: Awaited<ReturnType<Replica['hashFiles']>>;
    try {
      results = await replica.hashFiles(batch);
    } catch {
      // One unreadable file must not sink the batch: hash one by one, marking failures as unknown.
      results = [];
      for (const path of batch) {
        try {
          results.push((await replica.hashFiles([path]))[0] ?? null);
        } catch (inner) {
          options.warn(`root ${side}: ${(inner as Error).message} (skipped)`);
          detection.problems.push({ side, path, message: (inner as Error).message });
          states.get(path)!.unknown = true;
          results.push(null);
        }
      }
    }
    for (let index = 0; index < batch.length; index++) {
      const state = states.get(batch[index]!)!;
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

/** How one side of a state changed since the archive. */
export function classify(state: PathState, side: Side, options: Pick<SyncOptions, 'perms' | 'times'>): ChangeKind {
  const entry = entryOf(state, side);
  const { a } = state;
  if (a === undefined) return entry === undefined ? 'absent' : 'new';
  if (entry === undefined) return 'deleted';
  if (entry.kind !== a.kind) return 'modified';
  if (entry.kind === 'file') {
    const fp = fingerprintOf(state, side);
    if (fp !== a.fingerprint || entry.sizeBytes !== a.sizeBytes) return 'modified';
  } else if (entry.kind === 'symlink' && entry.linkTarget !== a.linkTarget) return 'modified';
  if (options.perms && modeOf(entry) !== (entry.kind === 'symlink' ? 0 : a.mode)) return 'props';
  if (options.times && entry.kind === 'file') {
    const archived = side === 1 ? a.mtime1Ms : a.mtime2Ms;
    if (Math.abs(entry.mtimeMs - archived) >= TIME_TOLERANCE_MS) return 'props';
  }
  return 'unchanged';
}
