// The archive: the last synchronized state of every path of one replica pair, kept outside both replicas
// (default ~/.local/state/drbdts/dirsync/). It is what turns "the two sides differ" into "this side changed":
// without it every difference would be a conflict. It is written only after propagation, only with the paths
// that really synced, and atomically (temp file, fsync, rename, fsync of the directory), so a crash at any point
// leaves the previous archive or the new one.
//
// Format (text, one entry per line, so 100,000 entries parse in tens of milliseconds and stay inspectable):
//   drbdts-dirsync-archive 1
//   {"root1": "...", "root2": "...", "entries": N}
//   path \t kind \t size \t fingerprint \t mode \t linkTarget \t mtime1 \t ctime1 \t inode1 \t mtime2 \t ctime2 \t inode2
//   ...
//   end XXH64-OF-EVERYTHING-ABOVE
// Tabs, newlines and backslashes inside paths and link targets are escaped (\t \n \\).
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as pathModule from 'node:path';
import { getHasher } from './hash.js';
import { fingerprintHex, type EntryKind } from './replica.js';

const MAGIC = 'drbdts-dirsync-archive 1';

/** What the archive knows about one path: the synced content and props, and each side's stamps for the fast check. */
export interface ArchiveEntry {
  kind: EntryKind;
  sizeBytes: number;
  /** Files: xxh64 fingerprint; '' for directories and symlinks. */
  fingerprint: string;
  mode: number;
  linkTarget: string;
  mtime1Ms: number;
  ctime1Ms: number;
  inode1: number;
  mtime2Ms: number;
  ctime2Ms: number;
  inode2: number;
}

export class ArchiveError extends Error {
  constructor(
    readonly file: string,
    message: string,
  ) {
    super(message);
    this.name = 'ArchiveError';
  }
}

export function defaultArchiveDir(): string {
  const stateHome = process.env.XDG_STATE_HOME || pathModule.join(os.homedir(), '.local', 'state');
  return pathModule.join(stateHome, 'drbdts', 'dirsync');
}

/** The archive file of a pair. The two root identities are ordered so that `a b` and `b a` share one archive. */
export async function archivePathFor(archiveDir: string, root1Id: string, root2Id: string): Promise<{ file: string; swapped: boolean }> {
  const swapped = root1Id > root2Id;
  const [first, second] = swapped ? [root2Id, root1Id] : [root1Id, root2Id];
  const hasher = await getHasher();
  const digest = fingerprintHex(hasher.h64Raw(Buffer.from(first + '\0' + second)));
  return { file: pathModule.join(archiveDir, `ar-${digest}`), swapped };
}

function escapeField(value: string): string {
  return /[\t\n\r\\]/.test(value) ? value.replace(/[\\\t\n\r]/g, (c) => (c === '\\' ? '\\\\' : c === '\t' ? '\\t' : c === '\n' ? '\\n' : '\\r')) : value;
}

function unescapeField(value: string): string {
  return value.includes('\\') ? value.replace(/\\(.)/g, (_m, c: string) => (c === 't' ? '\t' : c === 'n' ? '\n' : c === 'r' ? '\r' : c)) : value;
}

const KINDS: Record<string, EntryKind> = { f: 'file', d: 'dir', l: 'symlink' };
const KIND_LETTER: Record<EntryKind, string> = { file: 'f', dir: 'd', symlink: 'l' };

/**
 * Load an archive. Returns an empty map when the file does not exist (first sync). `swapped` says that the archive's
 * side 1 is this run's root 2; entries are returned in this run's orientation.
 */
export async function loadArchive(file: string, swapped: boolean): Promise<Map<string, ArchiveEntry>> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return new Map();
    throw new ArchiveError(file, `cannot read archive ${file}: ${(error as Error).message}`);
  }
  const corrupt = (why: string): ArchiveError =>
    new ArchiveError(
      file,
      `archive ${file} is corrupt (${why}); nothing was changed. Remove it to start over: the next run then treats ` +
        `the pair as never synced (identical files are recognised, differing ones become conflicts, nothing is deleted)`,
    );
  const endIndex = text.lastIndexOf('\nend ');
  if (!text.startsWith(MAGIC + '\n') || endIndex === -1) throw corrupt('missing header or end marker');
  const body = text.slice(0, endIndex + 1);
  const trailer = text.slice(endIndex + 5).trim();
  const hasher = await getHasher();
  if (fingerprintHex(hasher.h64Raw(Buffer.from(body))) !== trailer) throw corrupt('checksum mismatch');
  const lines = body.split('\n');
  let header: { entries?: unknown };
  try {
    header = JSON.parse(lines[1] ?? '') as { entries?: unknown };
  } catch {
    throw corrupt('bad header line');
  }
  const entries = new Map<string, ArchiveEntry>();
  // Hot on every run (100,000 lines for a big tree): fields are split once, numbers checked with one pass,
  // no closures or temporary arrays per line.
  const [m1, c1, i1, m2, c2, i2] = swapped ? [9, 10, 11, 6, 7, 8] : [6, 7, 8, 9, 10, 11];
  for (let index = 2; index < lines.length - 1; index++) {
    const fields = lines[index]!.split('\t');
    const kind = KINDS[fields[1] ?? ''];
    if (fields.length !== 12 || kind === undefined) throw corrupt(`bad entry on line ${index + 1}`);
    const entry: ArchiveEntry = {
      kind,
      sizeBytes: Number(fields[2]),
      fingerprint: fields[3]!,
      mode: Number(fields[4]),
      linkTarget: unescapeField(fields[5]!),
      mtime1Ms: Number(fields[m1]),
      ctime1Ms: Number(fields[c1]),
      inode1: Number(fields[i1]),
      mtime2Ms: Number(fields[m2]),
      ctime2Ms: Number(fields[c2]),
      inode2: Number(fields[i2]),
    };
    // NaN propagates through the sum: one check covers every numeric field.
    if (!Number.isFinite(entry.sizeBytes + entry.mode + entry.mtime1Ms + entry.ctime1Ms + entry.inode1 + entry.mtime2Ms + entry.ctime2Ms + entry.inode2)) {
      throw corrupt(`bad number on line ${index + 1}`);
    }
    entries.set(unescapeField(fields[0]!), entry);
  }
  if (header.entries !== entries.size) throw corrupt(`header says ${String(header.entries)} entries, found ${entries.size}`);
  return entries;
}

/** Write the archive atomically: temp file, fsync, rename, fsync the directory. */
export async function saveArchive(
  file: string,
  swapped: boolean,
  roots: { root1Id: string; root2Id: string },
  entries: Map<string, ArchiveEntry>,
): Promise<void> {
  const [first, second] = swapped ? [roots.root2Id, roots.root1Id] : [roots.root1Id, roots.root2Id];
  const parts: string[] = [MAGIC, JSON.stringify({ root1: first, root2: second, entries: entries.size })];
  // Written in the map's order: the engine builds it parents-first (its scan order), which loading relies on;
  // no sort of 100,000 keys here.
  for (const [path, e] of entries) {
    const s1 = `${e.mtime1Ms}\t${e.ctime1Ms}\t${e.inode1}`;
    const s2 = `${e.mtime2Ms}\t${e.ctime2Ms}\t${e.inode2}`;
    parts.push(
      `${escapeField(path)}\t${KIND_LETTER[e.kind]}\t${e.sizeBytes}\t${e.fingerprint}\t${e.mode}\t${escapeField(e.linkTarget)}\t` +
        (swapped ? `${s2}\t${s1}` : `${s1}\t${s2}`),
    );
  }
  // Encoded once: the checksum is taken over the same bytes that are written.
  const body = Buffer.from(parts.join('\n') + '\n');
  const hasher = await getHasher();
  const trailer = Buffer.from('end ' + fingerprintHex(hasher.h64Raw(body)) + '\n');
  const dir = pathModule.dirname(file);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const temp = `${file}.tmp-${process.pid}`;
  const fd = fs.openSync(temp, 'w', 0o600);
  try {
    const written = fs.writevSync(fd, [body, trailer]);
    if (written !== body.length + trailer.length) throw new ArchiveError(file, `short write of archive ${temp} (${written} bytes)`);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(temp, file);
  const dirFd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(dirFd);
  } finally {
    fs.closeSync(dirFd);
  }
}

/**
 * A lock per pair so two runs cannot interleave. The lock file holds "PID HOST"; a lock whose process is dead on
 * this host is stale (a crashed run) and is taken over, with a warning.
 */
export class PairLock {
  private constructor(readonly file: string) {}

  static acquire(archiveFile: string, warn: (message: string) => void): PairLock {
    const file = archiveFile + '.lock';
    fs.mkdirSync(pathModule.dirname(file), { recursive: true, mode: 0o700 });
    const host = os.hostname();
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        const fd = fs.openSync(file, 'wx', 0o600);
        fs.writeSync(fd, `${process.pid} ${host}\n`);
        fs.closeSync(fd);
        return new PairLock(file);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EEXIST') {
          throw new ArchiveError(file, `cannot create lock ${file}: ${(error as Error).message}`);
        }
      }
      let content = '';
      try {
        content = fs.readFileSync(file, 'utf8');
      } catch {
        continue; // removed meanwhile: retry
      }
      const [pidText, lockHost] = content.trim().split(' ');
      const pid = Number(pidText);
      let alive = true;
      if (lockHost === host && Number.isInteger(pid) && pid > 0) {
        try {
          process.kill(pid, 0);
        } catch (error) {
          alive = (error as NodeJS.ErrnoException).code === 'EPERM';
        }
      } else if (content.trim() === '') {
        // A lock file with no content: its writer died between create and write.
        alive = false;
      }
      if (alive) {
        throw new ArchiveError(
          file,
          `another dirsync (pid ${pidText ?? '?'} on ${lockHost ?? '?'}) holds the lock ${file} for this pair; ` +
            `if no such process runs, remove the file`,
        );
      }
      warn(`removing stale lock ${file} of dead process ${pidText}`);
      try {
        fs.unlinkSync(file);
      } catch {
        // Another run took it over first; the next attempt sees its lock.
      }
    }
    throw new ArchiveError(file, `cannot acquire lock ${file}`);
  }

  release(): void {
    try {
      fs.unlinkSync(this.file);
    } catch {
      // Already gone.
    }
  }
}
