// What propagation leaves for the archive (archive/build.ts): the target side's result of every change, where it
// is not on the action itself. Native copies' results stay packed (an EntryStat and a fingerprint string per file
// were 17 MB of a 100,000-file initial sync): a row of numbers and 16 hex digits each, made into objects one at a
// time when the archive entry is written.
import type { EntryStat } from '../replica.js';
import { COPY_OUT_FIELDS, SCAN_DIR, SCAN_FILE, SCAN_SYMLINK } from '../../native/scan.js';

/** A native copy's result row: the installed file's kind, size, mtimeMs, ctimeMs, inode, mode (COPY_OUT_FIELDS
 * without the status). */
const COPY_ROW_FIELDS = COPY_OUT_FIELDS - 1;

const KIND_OF_CODE: Record<number, EntryStat['kind']> = { [SCAN_FILE]: 'file', [SCAN_DIR]: 'dir', [SCAN_SYMLINK]: 'symlink' };

/** Native copies' results as the archive reads them: by row, -1 for none. */
export interface CopyResultRows {
  stat(row: number): EntryStat | undefined;
  fingerprint(row: number): string | undefined;
}

export class CopyResults implements CopyResultRows {
  private numbers = new Float64Array(0);
  private digests = Buffer.alloc(0);
  private rows = 0;

  /** Room for `rows` results (the native copies of one run). */
  allocate(rows: number): void {
    this.numbers = new Float64Array(rows * COPY_ROW_FIELDS);
    this.digests = Buffer.alloc(rows * 16);
    this.rows = 0;
  }

  /** Keep operation `j`'s result of a native copy batch (its out fields and its digest); returns its row. */
  add(results: Float64Array, digests: Buffer, j: number): number {
    const row = this.rows++;
    const o = j * COPY_OUT_FIELDS;
    this.numbers.set(results.subarray(o + 1, o + COPY_OUT_FIELDS), row * COPY_ROW_FIELDS);
    digests.copy(this.digests, row * 16, j * 16, j * 16 + 16);
    return row;
  }

  stat(row: number): EntryStat | undefined {
    if (row < 0) return undefined;
    const r = this.numbers;
    const o = row * COPY_ROW_FIELDS;
    return { kind: KIND_OF_CODE[r[o]!]!, sizeBytes: r[o + 1]!, mtimeMs: r[o + 2]!, ctimeMs: r[o + 3]!, inode: r[o + 4]!, mode: r[o + 5]! };
  }

  fingerprint(row: number): string | undefined {
    return row < 0 ? undefined : this.digests.toString('latin1', row * 16, row * 16 + 16);
  }
}

/** Propagation's results the archive reads besides the actions' own fields. */
export interface PropagationResults {
  /** Native copies' results (Action.resultRow, NewPaths.rows). */
  readonly copies: CopyResultRows;
  /** mkdir results of packed new directories, by their index in NewPaths (directories are few). */
  readonly newDirStats: Map<number, EntryStat>;
  /** Final stamps of directories whose contents this run changed, per side. */
  readonly finalDirStats: [Map<string, EntryStat>, Map<string, EntryStat>];
}

