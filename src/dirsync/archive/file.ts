// The archive: the last synchronized state of every path of one replica pair, kept outside both replicas
// (default ~/.local/state/drbdts/dirsync/). It is what turns "the two sides differ" into "this side changed":
// without it every difference would be a conflict. It is written only after propagation, only with the paths
// that really synced, and atomically (temp file, fsync, rename, fsync of the directory), so a crash at any point
// leaves the previous archive or the new one.
//
// Format 2 (written since the binary form was introduced; format 1 is still read):
//   drbdts-dirsync-archive 2\n
//   {"root1": "...", "root2": "...", "entries": N}   (padded with spaces so the binary part starts 8-aligned)\n
//   N x 8 float64 LE   size, mode, mtime1, ctime1, inode1, mtime2, ctime2, inode2
//   N x 3 uint32 LE    byte lengths of path, fingerprint, link target
//   N bytes            kind: 'f' file, 'd' dir, 'l' symlink
//   UTF-8              path, fingerprint, link target of each entry, back to back
//   \nend XXH64-OF-EVERYTHING-ABOVE\n
// A run loads the whole archive before it can decide anything, so the load is on every run's critical path:
// the numbers are one typed-array view (no text to parse: 100,000 entries took 0.3 s as text lines), strings are
// decoded once each. `drbdts`-independent inspection: the header line is text, the rest is plain arrays.
// Format 1 (text, one entry per line):
//   drbdts-dirsync-archive 1
//   {"root1": "...", "root2": "...", "entries": N}
//   path \t kind \t size \t fingerprint \t mode \t linkTarget \t mtime1 \t ctime1 \t inode1 \t mtime2 \t ctime2 \t inode2
//   ...
//   end XXH64-OF-EVERYTHING-ABOVE
// Tabs, newlines and backslashes inside paths and link targets are escaped (\t \n \\).
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as pathModule from 'node:path';
import { archiveNative } from '../../native/scan.js';
import { getHasher } from '../hash.js';
import { fingerprintHex, type EntryKind } from '../replica.js';

const MAGIC = 'drbdts-dirsync-archive 1';
const MAGIC_2 = 'drbdts-dirsync-archive 2';
const NUMBER_FIELDS = 8;
const LENGTH_FIELDS = 3;
/** "\nend " + 16 hex digits + "\n" */
const TRAILER_BYTES = 22;
const LITTLE_ENDIAN = os.endianness() === 'LE';
/** Buffer's own decoders without toString's argument handling (measured 4x faster on short strings). */
const utf8Slice = (Buffer.prototype as unknown as { utf8Slice(start: number, end: number): string }).utf8Slice;
const latin1Slice = (Buffer.prototype as unknown as { latin1Slice(start: number, end: number): string }).latin1Slice;
const utf8Write = (Buffer.prototype as unknown as { utf8Write(text: string, offset: number, length: number): number }).utf8Write;

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
  const digest = await xxh64Hex(Buffer.from(first + '\0' + second));
  return { file: pathModule.join(archiveDir, `ar-${digest}`), swapped };
}

/** xxh64 as fingerprintHex writes it: natively when the addon has it (no wasm instance needed), else xxhash-wasm. */
async function xxh64Hex(bytes: Uint8Array): Promise<string> {
  const native = archiveNative();
  if (native !== undefined) return native.xxh64(bytes);
  const hasher = await getHasher();
  return fingerprintHex(hasher.h64Raw(bytes));
}

function unescapeField(value: string): string {
  return value.includes('\\') ? value.replace(/\\(.)/g, (_m, c: string) => (c === 't' ? '\t' : c === 'n' ? '\n' : c === 'r' ? '\r' : c)) : value;
}

const KINDS: Record<string, EntryKind> = { f: 'file', d: 'dir', l: 'symlink' };
const KIND_LETTER: Record<EntryKind, string> = { file: 'f', dir: 'd', symlink: 'l' };
const KINDS_BY_CODE: Record<number, EntryKind> = { 0x66: 'file', 0x64: 'dir', 0x6c: 'symlink' };
const KIND_CODE: Record<EntryKind, number> = { file: 0x66, dir: 0x64, symlink: 0x6c };

/**
 * Load an archive. Returns an empty map when the file does not exist (first sync). `swapped` says that the archive's
 * side 1 is this run's root 2; entries are returned in this run's orientation.
 */
export async function loadArchive(file: string, swapped: boolean): Promise<Map<string, ArchiveEntry>> {
  const data = await loadArchiveData(file, swapped);
  return data instanceof ArchiveTable ? data.toMap() : data;
}

/**
 * Load an archive as the engine uses it: a format 2 file as its packed table (no object or string per entry until
 * one is asked for), a format 1 file as a map, a missing file as an empty map. Everything but the uniqueness of the
 * paths is checked here; ArchiveTable.toMap and the native join (dirsync_join.cc) check that.
 */
export async function loadArchiveData(file: string, swapped: boolean): Promise<ArchiveTable | Map<string, ArchiveEntry>> {
  let bytes: Buffer;
  try {
    bytes = fs.readFileSync(file);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return new Map();
    throw new ArchiveError(file, `cannot read archive ${file}: ${(error as Error).message}`);
  }
  const corrupt = corruptError(file);
  if (startsWith(bytes, MAGIC_2 + '\n')) return parseBinary(bytes, swapped, corrupt);
  return parseText(bytes.toString('utf8'), swapped, corrupt);
}

function corruptError(file: string): (why: string) => ArchiveError {
  return (why) =>
    new ArchiveError(
      file,
      `archive ${file} is corrupt (${why}); nothing was changed. Remove it to start over: the next run then treats ` +
        `the pair as never synced (identical files are recognised, differing ones become conflicts, nothing is deleted)`,
    );
}

function startsWith(bytes: Buffer, prefix: string): boolean {
  return bytes.length >= prefix.length && latin1Slice.call(bytes, 0, prefix.length) === prefix;
}

async function parseBinary(bytes: Buffer, swapped: boolean, corrupt: (why: string) => ArchiveError): Promise<ArchiveTable> {
  const bodyEnd = bytes.length - TRAILER_BYTES;
  const trailer = bodyEnd > 0 ? latin1Slice.call(bytes, bodyEnd, bytes.length) : '';
  if (!/^\nend [0-9a-f]{16}\n$/.test(trailer)) throw corrupt('missing end marker');
  if ((await xxh64Hex(bytes.subarray(0, bodyEnd))) !== trailer.slice(5, 21)) throw corrupt('checksum mismatch');
  const headerEnd = bytes.indexOf(10, MAGIC_2.length + 1);
  let header: { entries?: unknown };
  try {
    header = JSON.parse(bytes.toString('utf8', MAGIC_2.length + 1, headerEnd)) as { entries?: unknown };
  } catch {
    throw corrupt('bad header line');
  }
  const count = header.entries;
  const numbersStart = headerEnd + 1;
  if (typeof count !== 'number' || !Number.isSafeInteger(count) || count < 0 || numbersStart % 8 !== 0) throw corrupt('bad header line');
  const lengthsStart = numbersStart + count * NUMBER_FIELDS * 8;
  const kindsStart = lengthsStart + count * LENGTH_FIELDS * 4;
  const stringsStart = kindsStart + count;
  if (stringsStart > bodyEnd) throw corrupt(`header says ${count} entries, the file is too short for them`);
  // Typed views need aligned offsets: a small file may sit at any offset of Node's buffer pool, then it is copied.
  const aligned = bytes.byteOffset % 8 === 0 ? bytes : Buffer.from(bytes);
  const numbers = new Float64Array(aligned.buffer, aligned.byteOffset + numbersStart, count * NUMBER_FIELDS);
  const lengths = new Uint32Array(aligned.buffer, aligned.byteOffset + lengthsStart, count * LENGTH_FIELDS);
  if (!LITTLE_ENDIAN) {
    Buffer.from(numbers.buffer, numbers.byteOffset, numbers.byteLength).swap64();
    Buffer.from(lengths.buffer, lengths.byteOffset, lengths.byteLength).swap32();
  }
  const kinds = new Uint8Array(aligned.buffer, aligned.byteOffset + kindsStart, count);
  const strings = aligned.subarray(stringsStart, bodyEnd);
  const stringBytes = strings.length;
  const native = archiveNative();
  if (native !== undefined) {
    const checked = native.archiveStarts(numbers, lengths, kinds, stringBytes);
    if (checked instanceof Uint32Array) return new ArchiveTable(corrupt, swapped, count, numbers, lengths, kinds, strings, checked, aligned.subarray(0, bodyEnd));
    const [code, value] = checked;
    throw corrupt(code === 1 ? `bad entry ${value + 1}` : code === 2 ? `bad number in entry ${value + 1}` : `${value} bytes after the last entry`);
  }
  // One pass over the arrays, no string made: kinds, string bounds, numbers (NaN and infinities propagate
  // through the sum, so one test covers every number of an entry). dirsyncArchiveStarts does the same natively.
  // Over its own ArrayBuffer: never a small on-heap typed array, whose data the native join could not hold.
  const starts = new Uint32Array(new ArrayBuffer((count + 1) * 4));
  let position = 0;
  for (let index = 0, n = 0, l = 0; index < count; index++, n += NUMBER_FIELDS, l += LENGTH_FIELDS) {
    const kind = kinds[index]!;
    const pathLength = lengths[l]!;
    const end = position + pathLength + lengths[l + 1]! + lengths[l + 2]!;
    if ((kind !== 0x66 && kind !== 0x64 && kind !== 0x6c) || end > stringBytes || pathLength === 0) throw corrupt(`bad entry ${index + 1}`);
    if (!Number.isFinite(numbers[n]! + numbers[n + 1]! + numbers[n + 2]! + numbers[n + 3]! + numbers[n + 4]! + numbers[n + 5]! + numbers[n + 6]! + numbers[n + 7]!)) {
      throw corrupt(`bad number in entry ${index + 1}`);
    }
    starts[index] = position;
    position = end;
  }
  starts[count] = position;
  if (position !== stringBytes) throw corrupt(`${stringBytes - position} bytes after the last entry`);
  return new ArchiveTable(corrupt, swapped, count, numbers, lengths, kinds, strings, starts, aligned.subarray(0, bodyEnd));
}

/**
 * A format 2 archive as loaded: the file's own arrays (numbers in the file's orientation), no object per entry.
 * Entries are made on demand (`entry`, `path`), all of them only by `toMap` (the fallback paths of the engine).
 */
export class ArchiveTable {
  constructor(
    private readonly corrupt: (why: string) => ArchiveError,
    /** The file's side 1 is this run's root 2. */
    readonly swapped: boolean,
    readonly count: number,
    /** NUMBER_FIELDS per entry: size, mode, the file's side 1 stamps (mtime, ctime, inode), side 2 stamps. */
    readonly numbers: Float64Array,
    /** LENGTH_FIELDS per entry: UTF-8 byte lengths of path, fingerprint, link target. */
    readonly lengths: Uint32Array,
    /** 'f', 'd' or 'l' per entry. */
    readonly kinds: Uint8Array,
    /** The strings of all entries, back to back. */
    readonly strings: Buffer,
    /** Offset of each entry's strings in `strings`, and the end (count + 1 values). */
    readonly starts: Uint32Array,
    /** Everything the checksum covers: a rewrite that produces the same bytes is skipped. */
    readonly body: Buffer,
  ) {}

  path(index: number): string {
    const start = this.starts[index]!;
    return utf8Slice.call(this.strings, start, start + this.lengths[index * LENGTH_FIELDS]!);
  }

  isFile(index: number): boolean {
    return this.kinds[index] === 0x66;
  }

  isDir(index: number): boolean {
    return this.kinds[index] === 0x64;
  }

  sizeBytes(index: number): number {
    return this.numbers[index * NUMBER_FIELDS]!;
  }

  fingerprint(index: number): string {
    const start = this.starts[index]! + this.lengths[index * LENGTH_FIELDS]!;
    const length = this.lengths[index * LENGTH_FIELDS + 1]!;
    return length > 0 ? latin1Slice.call(this.strings, start, start + length) : '';
  }

  /** The entry in this run's orientation. */
  entry(index: number): ArchiveEntry {
    const n = index * NUMBER_FIELDS;
    const l = index * LENGTH_FIELDS;
    const { numbers } = this;
    const [m1, m2] = this.swapped ? [n + 5, n + 2] : [n + 2, n + 5];
    const fingerprintStart = this.starts[index]! + this.lengths[l]!;
    const linkStart = fingerprintStart + this.lengths[l + 1]!;
    const linkEnd = this.starts[index + 1]!;
    return {
      kind: KINDS_BY_CODE[this.kinds[index]!]!,
      sizeBytes: numbers[n]!,
      fingerprint: linkStart > fingerprintStart ? latin1Slice.call(this.strings, fingerprintStart, linkStart) : '',
      mode: numbers[n + 1]!,
      linkTarget: linkEnd > linkStart ? utf8Slice.call(this.strings, linkStart, linkEnd) : '',
      mtime1Ms: numbers[m1]!,
      ctime1Ms: numbers[m1 + 1]!,
      inode1: numbers[m1 + 2]!,
      mtime2Ms: numbers[m2]!,
      ctime2Ms: numbers[m2 + 1]!,
      inode2: numbers[m2 + 2]!,
    };
  }

  /** Every entry by path, in file order. */
  toMap(): Map<string, ArchiveEntry> {
    const entries = new Map<string, ArchiveEntry>();
    for (let index = 0; index < this.count; index++) entries.set(this.path(index), this.entry(index));
    if (entries.size !== this.count) throw this.duplicatePath();
    return entries;
  }

  /** The error for an archive that lists a path twice (found by toMap or the native join). */
  duplicatePath(): ArchiveError {
    return this.corrupt(`header says ${this.count} entries, found fewer distinct paths`);
  }
}

/** Entries given as objects are encoded by the builder in groups of this many: the objects are garbage as soon as
 * their group is encoded, instead of every entry of an initial sync (100,000 paths) being held until the write.
 * Small groups die young (with 4096 the pending objects outlived scavenges and were promoted: 100k initial sync
 * 222 -> 205 MiB RSS at the archive write with 512). */
const ENCODE_GROUP_ENTRIES = 512;
/** Buffers per writev call (IOV_MAX is 1024 on Linux). */
const WRITEV_BUFFERS = 1024;

type Sections = [Buffer, Buffer, Buffer, Buffer];

/**
 * The entries of a new archive, in order: runs of entries copied from the loaded table (their bytes as they are,
 * no object or string made) and entries given as objects (encoded in groups as they come). `swapped`: the
 * orientation of the file it is for (the builder encodes in it).
 */
export class ArchiveBuilder {
  private readonly parts: Array<{ table: ArchiveTable; from: number; to: number } | { encoded: Sections }> = [];
  private lastRun: { table: ArchiveTable; from: number; to: number } | undefined;
  private pending: Array<{ path: string; entry: ArchiveEntry }> = [];
  count = 0;

  constructor(readonly swapped: boolean) {}

  copy(table: ArchiveTable, index: number): void {
    this.copyRun(table, index, index + 1);
  }

  /** Copy entries from..to-1 of `table`, as `copy` of each would. */
  copyRun(table: ArchiveTable, from: number, to: number): void {
    if (to <= from) return;
    if (table.swapped !== this.swapped) throw new Error('ArchiveBuilder: a table of the other orientation');
    this.flush();
    const run = this.lastRun;
    if (run !== undefined && run.table === table && run.to === from) run.to = to;
    else {
      this.lastRun = { table, from, to };
      this.parts.push(this.lastRun);
    }
    this.count += to - from;
  }

  add(path: string, entry: ArchiveEntry): void {
    this.pending.push({ path, entry });
    this.lastRun = undefined;
    this.count++;
    if (this.pending.length >= ENCODE_GROUP_ENTRIES) this.flush();
  }

  private flush(): void {
    if (this.pending.length === 0) return;
    this.parts.push({ encoded: encodeEntries(this.pending, this.swapped) });
    this.pending = [];
  }

  /**
   * The body's arrays (header and trailer excluded), in the file's orientation, as the buffers to write in order.
   * On a little-endian host a run copied from a table is not copied at all: its four sections are views of the
   * loaded file (writev writes them as they are).
   */
  encode(): Buffer[] {
    this.flush();
    const sections: [Buffer[], Buffer[], Buffer[], Buffer[]] = [[], [], [], []];
    const bytesOf = (array: Float64Array | Uint32Array | Uint8Array): Buffer => Buffer.from(array.buffer, array.byteOffset, array.byteLength);
    for (const part of this.parts) {
      if ('encoded' in part) {
        for (let k = 0; k < 4; k++) sections[k]!.push(part.encoded[k]!);
        continue;
      }
      const { table, from, to } = part;
      const numbers = table.numbers.subarray(from * NUMBER_FIELDS, to * NUMBER_FIELDS);
      const lengths = table.lengths.subarray(from * LENGTH_FIELDS, to * LENGTH_FIELDS);
      if (LITTLE_ENDIAN) {
        sections[0].push(bytesOf(numbers));
        sections[1].push(bytesOf(lengths));
      } else {
        // The loaded arrays were swapped to host order: copies, swapped back for the file.
        sections[0].push(Buffer.from(bytesOf(numbers)).swap64());
        sections[1].push(Buffer.from(bytesOf(lengths)).swap32());
      }
      sections[2].push(bytesOf(table.kinds.subarray(from, to)));
      sections[3].push(table.strings.subarray(table.starts[from]!, table.starts[to]!));
    }
    return sections.flat();
  }
}

/** Entries given as objects, encoded as the four sections of the body. */
function encodeEntries(entries: Array<{ path: string; entry: ArchiveEntry }>, swapped: boolean): Sections {
  const count = entries.length;
  const numbers = new Float64Array(count * NUMBER_FIELDS);
  const lengths = new Uint32Array(count * LENGTH_FIELDS);
  const kinds = Buffer.allocUnsafe(count);
  let stringBytes = 0;
  for (const { path, entry } of entries) stringBytes += (path.length + entry.fingerprint.length + entry.linkTarget.length) * 3;
  const strings = Buffer.allocUnsafe(Math.max(1, stringBytes));
  let used = 0;
  const put = (text: string): number => {
    if (text.length === 0) return 0;
    // At most 3 bytes per UTF-16 unit: the space is always there (utf8Write never writes part of a character).
    const written = utf8Write.call(strings, text, used, strings.length - used);
    used += written;
    return written;
  };
  let index = 0;
  for (const { path, entry: e } of entries) {
    const n = index * NUMBER_FIELDS;
    numbers[n] = e.sizeBytes;
    numbers[n + 1] = e.mode;
    const [s1, s2] = swapped ? [n + 5, n + 2] : [n + 2, n + 5];
    numbers[s1] = e.mtime1Ms;
    numbers[s1 + 1] = e.ctime1Ms;
    numbers[s1 + 2] = e.inode1;
    numbers[s2] = e.mtime2Ms;
    numbers[s2 + 1] = e.ctime2Ms;
    numbers[s2 + 2] = e.inode2;
    const l = index * LENGTH_FIELDS;
    lengths[l] = put(path);
    lengths[l + 1] = put(e.fingerprint);
    lengths[l + 2] = put(e.linkTarget);
    kinds[index] = KIND_CODE[e.kind];
    index++;
  }
  const numberBytes = Buffer.from(numbers.buffer, numbers.byteOffset, numbers.byteLength);
  const lengthBytes = Buffer.from(lengths.buffer, lengths.byteOffset, lengths.byteLength);
  if (!LITTLE_ENDIAN) {
    numberBytes.swap64();
    lengthBytes.swap32();
  }
  // At its exact size: a view would keep the whole worst-case (3 bytes per unit) allocation alive until the write.
  return [numberBytes, lengthBytes, kinds, Buffer.from(strings.subarray(0, used))];
}

/** Format 1 (text lines), as written before format 2. */
async function parseText(text: string, swapped: boolean, corrupt: (why: string) => ArchiveError): Promise<Map<string, ArchiveEntry>> {
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
  // Written in the map's order: the engine builds it parents-first (its scan order), which loading relies on;
  // no sort of 100,000 keys here.
  const builder = new ArchiveBuilder(swapped);
  for (const [path, entry] of entries) builder.add(path, entry);
  await saveArchiveBuilder(file, swapped, roots, builder);
}

/**
 * Write the entries of `builder` atomically (as saveArchive). When `previous` (the loaded archive) holds exactly
 * the same bytes, nothing is written and false is returned.
 */
export async function saveArchiveBuilder(
  file: string,
  swapped: boolean,
  roots: { root1Id: string; root2Id: string },
  builder: ArchiveBuilder,
  previous?: ArchiveTable,
): Promise<boolean> {
  if (builder.swapped !== swapped) throw new Error('saveArchiveBuilder: the builder encoded the other orientation');
  const [first, second] = swapped ? [roots.root2Id, roots.root1Id] : [roots.root1Id, roots.root2Id];
  let headerText = MAGIC_2 + '\n' + JSON.stringify({ root1: first, root2: second, entries: builder.count });
  const headerBytes = Buffer.byteLength(headerText) + 1;
  headerText += ' '.repeat((8 - (headerBytes % 8)) % 8) + '\n';
  const parts = [Buffer.from(headerText), ...builder.encode()];
  if (previous !== undefined && previous.swapped === swapped && sameBytes(parts, previous.body)) return false;
  // The checksum is taken over the same bytes that are written.
  const hasher = await getHasher();
  const state = hasher.create64();
  for (const part of parts) state.update(part);
  parts.push(Buffer.from('\nend ' + fingerprintHex(state.digest()) + '\n'));
  const total = parts.reduce((sum, part) => sum + part.length, 0);
  const dir = pathModule.dirname(file);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const temp = `${file}.tmp-${process.pid}`;
  const fd = fs.openSync(temp, 'w', 0o600);
  try {
    // writev takes at most IOV_MAX (1024) buffers per call: many groups and runs are written in several calls
    // rather than joined into copies.
    let written = 0;
    for (let start = 0; start < parts.length; start += WRITEV_BUFFERS) {
      const slice = parts.slice(start, start + WRITEV_BUFFERS);
      const expected = slice.reduce((sum, part) => sum + part.length, 0);
      const count = fs.writevSync(fd, slice);
      written += count;
      if (count !== expected) break;
    }
    if (written !== total) throw new ArchiveError(file, `short write of archive ${temp} (${written} of ${total} bytes)`);
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
  return true;
}

function sameBytes(parts: Buffer[], whole: Buffer): boolean {
  let offset = 0;
  for (const part of parts) {
    if (offset + part.length > whole.length || !part.equals(whole.subarray(offset, offset + part.length))) return false;
    offset += part.length;
  }
  return offset === whole.length;
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

  private released = false;

  /** Remove the lock file, once: a second call never removes a lock another run took since. */
  release(): void {
    if (this.released) return;
    this.released = true;
    try {
      fs.unlinkSync(this.file);
    } catch {
      // Already gone.
    }
  }
}
