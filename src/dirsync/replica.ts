// The Replica interface: everything the sync engine needs from one side of a sync pair. The engine
// (update detection, reconciliation, propagation order, archive) runs in one process and talks to both
// replicas only through this interface, so a local directory, a tcp:// server and an ssh:// server are
// interchangeable. Every operation that changes the tree carries the state the engine last saw (a
// precondition), and the replica re-checks it immediately before the change: a path modified by a user
// during the sync fails with ECHANGED instead of losing that user's data.
//
// Paths are relative to the replica root, '/'-separated, never empty, never starting with '/', never
// containing '.' or '..' components (checked by assertRelativePath at every replica edge).

export type EntryKind = 'file' | 'dir' | 'symlink';

/** What lstat says about one path (symlinks are not followed). */
export interface EntryStat {
  kind: EntryKind;
  /** Files: content length. Directories and symlinks: 0. */
  sizeBytes: number;
  /** Modification time in ms since the epoch (may carry a fraction: nanosecond clocks). */
  mtimeMs: number;
  /** Status-change time, used only by the fast check (a same-size same-mtime rewrite still changes ctime). */
  ctimeMs: number;
  inode: number;
  /** Permission bits only (mode & 0o777); setuid/setgid/sticky are never synced. */
  mode: number;
  /** Symlinks only: the link's target string, synced verbatim. */
  linkTarget?: string;
}

export interface ScanEntry extends EntryStat {
  path: string;
}

/** Ignore patterns as the user wrote them (unison syntax, see ignore.ts); the replica applies them while scanning
 * so that an ignored subtree is never even read. */
export interface ScanOptions {
  ignore: string[];
}

/** Result of hashing one file: the fingerprint and the stat taken around the hash (so the archive records a stat
 * that goes with that content). null in a batch result = the path vanished or is no longer a file. */
export interface HashResult {
  /** xxh64 of the whole content, 16 lowercase hex digits (see fingerprintHex). */
  fingerprint: string;
  stat: EntryStat;
}

/** A file's content being read on the source side. Chunks are owned by the consumer once yielded (the producer
 * never reuses a yielded buffer). `done` resolves after the last chunk with the fingerprint of everything read and
 * the source's stat re-taken after reading, so the engine can tell a file modified during the transfer. */
export interface ContentSource {
  /** Expected total length of the content this source produces (full content length, also for deltas). */
  sizeBytes: number;
  chunks: AsyncIterable<Buffer>;
  done: Promise<{ fingerprint: string; statAfter: EntryStat }>;
  /** Abandon the read early (target failed); idempotent. */
  cancel(): void;
  /** Offered only by a LocalReplica source read for a consumer in the same process (propagate/fileop.ts): the consumer
   * hands a chunk back once it is written and hashed, and the producer may then reuse its buffer. */
  recycle?(chunk: Buffer): void;
}

/** The state a target path must still be in right before it is replaced: 'absent' or the stat the engine
 * scanned (kind, size, mtime, inode must match; for symlinks also the target). */
export type Precondition = 'absent' | EntryStat;

/** Where the new content of a file comes from. */
export type FileContent =
  /** All bytes, streamed. */
  | { kind: 'full'; source: ContentSource }
  /** An encoded delta (delta.ts format) against `basisPath` on the target, streamed; `source.done` gives the
   * fingerprint of the reconstructed full content. */
  | { kind: 'delta'; basisPath: string; basisStat: EntryStat; source: ContentSource }
  /** Content already present on the target side at `fromPath` with this fingerprint (renames, copies):
   * copied locally on the target, nothing sent. */
  | { kind: 'local'; fromPath: string; fromStat: EntryStat; fingerprint: string; sizeBytes: number };

export interface WriteFileRequest {
  path: string;
  precondition: Precondition;
  content: FileContent;
  /** Permission bits for the new file. */
  mode: number;
  /** Set the mtime of the new file (times sync on); otherwise the file gets the current time. */
  mtimeMs?: number;
  /** The fingerprint the written content must have, if known before the transfer (delta and local). For 'full'
   * the replica compares against `source.done`'s fingerprint. */
  expectFingerprint?: string;
  /** The source's stat as scanned: the target compares `source.done`'s statAfter with it (sameStat) before the
   * rename, so a source modified during the transfer fails with ECHANGED instead of installing torn content. */
  sourceStat?: EntryStat;
}

export interface WriteFileResult {
  fingerprint: string;
  /** lstat of the installed file, for the archive. */
  stat: EntryStat;
}

export interface SetPropsRequest {
  path: string;
  precondition: EntryStat;
  mode?: number;
  mtimeMs?: number;
}

export interface ReplicaInfo {
  /** Canonical root, for messages and for naming the archive (absolute path, or tcp://host:port/path). */
  rootId: string;
  /** Host name of the machine holding the root (archive naming, messages). */
  hostName: string;
}

/**
 * One side of a sync. Implementations: LocalReplica (local.ts), remote replicas over tcp:// and ssh:// (remote.ts,
 * which forward each call to a LocalReplica inside `dirsync-server`).
 *
 * Errors: every failure is a ReplicaError with a stable code; a remote replica re-throws the server's code and
 * message unchanged.
 */
export interface Replica {
  /** Check the root exists and is a directory; learn its identity. Fails with ENOROOT otherwise. */
  open(): Promise<ReplicaInfo>;

  /** Walk the tree (lstat, symlinks not followed, ignored paths skipped), yielding entries in batches. A parent
   * directory is yielded before its children. Unreadable directories are reported as errors in `problems`
   * (the engine skips that subtree, it does not treat it as deleted). */
  scan(options: ScanOptions): AsyncIterable<ScanBatch>;

  /** lstat one path; null if absent. */
  stat(path: string): Promise<EntryStat | null>;

  /** Hash several files (the engine batches the paths whose fast check failed). */
  hashFiles(paths: string[]): Promise<Array<HashResult | null>>;

  /** Read a whole file. `expect` is the scanned stat: EGONE/ECHANGED if the file no longer matches it at open. */
  readFile(path: string, expect: EntryStat): Promise<ContentSource>;

  /** Read a byte range of a file (short at end of file). */
  readRange(path: string, offsetBytes: number, lengthBytes: number): Promise<Buffer>;

  /** Block signature of `path` (the basis for a delta), encoded by delta.ts; `expect` as in readFile. */
  signature(path: string, expect: EntryStat): Promise<Buffer>;

  /** Delta of `path` (the new content, on this side) against a signature from the other side, encoded by delta.ts. */
  delta(path: string, expect: EntryStat, signature: Buffer): Promise<ContentSource>;

  /** Write new content into a temp file in the target directory, check its length and fingerprint, re-check the
   * precondition, then rename over `path`. At every moment `path` holds its old or its new content. Errors:
   * ECHANGED (precondition failed; temp removed), EHASH (content did not match), EIO... */
  writeFile(request: WriteFileRequest): Promise<WriteFileResult>;

  /** Create a directory (parent must exist; fails with ECHANGED if `path` now exists as anything). */
  mkdir(path: string, mode: number): Promise<EntryStat>;

  /**
   * Replace a file or symlink by a new, empty directory in one step (a temp directory swapped in with
   * renameat2(RENAME_EXCHANGE), then the old entry removed), after re-checking the precondition: the path is
   * never absent, whatever kills the run. Optional: without it the engine removes the file, then makes the
   * directory.
   */
  replaceWithDir?(path: string, mode: number, precondition: EntryStat): Promise<EntryStat>;

  /** Create or replace a symlink atomically (temp link + rename), after re-checking the precondition. */
  symlink(path: string, linkTarget: string, precondition: Precondition): Promise<EntryStat>;

  /** Delete a file, symlink or EMPTY directory after re-checking it still matches `precondition` (for a directory
   * only the kind is checked). The engine deletes children first. */
  remove(path: string, precondition: EntryStat): Promise<void>;

  /** Rename within the replica (keeping a conflict loser, `copy-on-conflict`); `to` must not exist. */
  rename(fromPath: string, toPath: string, precondition: EntryStat): Promise<EntryStat>;

  /** Change permission bits and/or mtime after re-checking the precondition. */
  setProps(request: SetPropsRequest): Promise<EntryStat>;

  /** Release resources (connections, server process). */
  close(): Promise<void>;
}

export interface ScanBatch {
  entries: ScanEntry[];
  /** Paths that could not be read (directory not listable, lstat failing): path and message. */
  problems: Array<{ path: string; message: string }>;
}

export type ReplicaErrorCode =
  | 'ENOROOT' // root missing or not a directory
  | 'ECHANGED' // precondition failed: the path changed since the scan
  | 'EGONE' // the path to read no longer exists
  | 'EHASH' // written content did not match the expected fingerprint or length
  | 'EPATH' // a malformed relative path (bad input, never followed)
  | 'EACCES' // permission denied
  | 'EIO' // any other I/O failure
  | 'EPROTO' // peer spoke garbage / protocol violation (remote)
  | 'EAUTH' // authentication failed (remote)
  | 'ECONN'; // connection lost (remote)

export class ReplicaError extends Error {
  constructor(
    readonly code: ReplicaErrorCode,
    message: string,
    readonly path?: string,
  ) {
    super(message);
    this.name = 'ReplicaError';
  }
}

/** Validate a relative path at a replica edge (paths from the wire are untrusted). */
export function assertRelativePath(path: string): void {
  if (
    typeof path !== 'string' ||
    path.length === 0 ||
    path.startsWith('/') ||
    path.endsWith('/') ||
    path.includes('\0') ||
    path.split('/').some((part) => part === '' || part === '.' || part === '..')
  ) {
    throw new ReplicaError('EPATH', `invalid relative path ${JSON.stringify(path)}`, String(path));
  }
}

/** Render an xxh64 digest as the fingerprint string used everywhere (archive, wire). */
export function fingerprintHex(digest: bigint): string {
  return digest.toString(16).padStart(16, '0');
}

/** Same entry state for the purposes of a precondition (ctime not compared: chmod by the engine changes it). */
export function sameStat(a: EntryStat, b: EntryStat): boolean {
  return (
    a.kind === b.kind &&
    (a.kind === 'dir' ||
      (a.sizeBytes === b.sizeBytes && a.mtimeMs === b.mtimeMs && a.inode === b.inode && a.linkTarget === b.linkTarget))
  );
}
