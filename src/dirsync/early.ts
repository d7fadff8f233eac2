// Early start of a local-to-local run: the pair's lock is taken and both native scans and the archive load are
// started before the CLI loads the engine's modules, so that compiling those (~15 ms) overlaps the scans (~25 ms
// for 10,000 files) instead of preceding them. It imports only what that needs (archive/file.ts, the addon
// wrapper).
//
// Safety: the scans start only after the lock is held, exactly as in SyncEngine.run; the engine uses them only
// when its own view of the run agrees (same roots, same archive file, no ignore patterns, not a dry run), and
// otherwise releases this lock and does everything itself. Anything unexpected here means "no early start":
// the engine then meets the same condition and reports it as usual.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as pathModule from 'node:path';
import { archivePathFor, loadArchiveData, PairLock, type ArchiveEntry, type ArchiveTable } from './archive/file.js';
import { nativeScanAvailable, scanTree, type PackedScan } from '../native/scan.js';

export interface EarlyStart {
  /** The roots as LocalReplica resolves them (what was scanned). */
  roots: [string, string];
  /** `host:realpath` of each root, as the engine names the pair. */
  ids: [string, string];
  /** The archive directory `file` was named in. */
  archiveDir: string;
  file: string;
  swapped: boolean;
  lock: PairLock;
  scans: Promise<[PackedScan, PackedScan]>;
  archive: Promise<ArchiveTable | Map<string, ArchiveEntry>>;
}

/** Take the lock and start the scans and the archive load of two local roots; undefined when that is not
 * possible or not wanted (the caller runs the engine as usual). The caller must release `lock` if no engine
 * took the early start over (PairLock.release is idempotent). */
export async function startEarly(roots: [string, string], archiveDir: string, warn: (message: string) => void): Promise<EarlyStart | undefined> {
  if (!nativeScanAvailable()) return undefined;
  let lock: PairLock | undefined;
  try {
    const resolved: [string, string] = [pathModule.resolve(roots[0]), pathModule.resolve(roots[1])];
    const host = os.hostname();
    const ids = resolved.map((root) => {
      if (!fs.statSync(root).isDirectory()) throw new Error('not a directory');
      return `${host}:${fs.realpathSync(root)}`;
    }) as [string, string];
    if (ids[0] === ids[1]) return undefined;
    const { file, swapped } = await archivePathFor(archiveDir, ids[0], ids[1]);
    lock = PairLock.acquire(file, warn);
    const scans = Promise.all([scanTree(resolved[0]), scanTree(resolved[1])]);
    scans.catch(() => undefined); // observed by the engine, or dropped with the early start
    const archive = loadArchiveData(file, swapped);
    archive.catch(() => undefined);
    return { roots: resolved, ids, archiveDir, file, swapped, lock, scans, archive };
  } catch {
    lock?.release();
    return undefined;
  }
}
