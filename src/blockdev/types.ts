// The one interface the NBD server talks to. A local disk and a replicated device implement it, and so do
// test wrappers (fault injection, delay, statistics). Nothing here knows about NBD wire formats.
import type { ReplPlane } from '../native/index.js';

/** What a device can do; the NBD server turns this into transmission flags and BLOCK_SIZE info. */
export interface BlockDeviceCapabilities {
  readOnly: boolean;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canZero: boolean;
  /** WRITE_ZEROES with FAST_ZERO: the device can zero without falling back to writing zero buffers. */
  canFastZero: boolean;
  canCache: boolean;
  /** Safe to serve through several connections: a flush covers writes completed on every connection. */
  canMultiConn: boolean;
  canBlockStatus: boolean;
  rotational: boolean;
  blockSizeMinimumBytes: number;
  blockSizePreferredBytes: number;
  blockSizeMaximumBytes: number;
}

/** base:allocation flags, as NBD defines them. */
export const EXTENT_HOLE = 1;
export const EXTENT_ZERO = 2;

export interface Extent {
  lengthBytes: number;
  /** EXTENT_HOLE | EXTENT_ZERO, or 0 for allocated data. */
  flags: number;
}

export interface ZeroOptions {
  fua: boolean;
  /** NBD_CMD_FLAG_NO_HOLE: the zeroed range must stay allocated. */
  noHole: boolean;
  /** NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than zero slowly. */
  fastZero: boolean;
}

/**
 * The errno names a device may fail with. The NBD server maps them to NBD error numbers in one place;
 * anything else becomes EIO.
 */
export type BlockDeviceErrorCode =
  | 'EPERM'
  | 'EIO'
  | 'ENOMEM'
  | 'EINVAL'
  | 'ENOSPC'
  | 'EOVERFLOW'
  | 'ENOTSUP'
  | 'ESHUTDOWN';

export class BlockDeviceError extends Error {
  readonly code: BlockDeviceErrorCode;
  constructor(code: BlockDeviceErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BlockDeviceError';
    this.code = code;
  }
}

/**
 * A block device. Contract for every implementation:
 * - Offsets and lengths are bytes; the caller (the NBD server) has already checked bounds and flags, and the
 *   device checks again (assert inside) and fails with EINVAL/ENOSPC rather than touching memory or disk
 *   outside the range.
 * - Many operations may be in flight at once. A device must not keep a reference to a `data` or `target`
 *   buffer after the returned promise settles: the server reuses those buffers from a pool.
 * - `write` resolves when the data is written as the device's completion rule defines (for a replicated
 *   device: protocol A, B or C); with `fua` it is durable before resolving.
 * - `flush` resolves when every write that resolved before flush() was called is durable.
 */
export interface DirectAccess {
  fd: number;
  /**
   * A replicated device on the native replication plane: WRITE and FLUSH go through it (repl_plane.cc) while
   * `replicationOpen()` says it admits writes; otherwise the data path serves only READ and JavaScript the rest.
   */
  replicationPlane?: ReplPlane;
  replicationOpen?: () => boolean;
}

export interface BlockDevice {
  readonly sizeBytes: number;
  capabilities(): BlockDeviceCapabilities;

  /** Fills `target` entirely with the bytes at `offset`. */
  read(offset: number, target: Buffer): Promise<void>;
  write(offset: number, data: Buffer, fua: boolean): Promise<void>;
  /**
   * Optional: write() without a promise, for hot paths that would only turn it back into a callback. `done`
   * gets null or the error, and may run before this returns (a page-cache hit).
   */
  writeWithCallback?(offset: number, data: Buffer, fua: boolean, done: (error: Error | null) => void): void;
  flush(): Promise<void>;
  trim(offset: number, lengthBytes: number, fua: boolean): Promise<void>;
  zero(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void>;
  /** A hint to bring the range into cache; may do nothing. */
  cache(offset: number, lengthBytes: number): Promise<void>;
  /** Extents covering at least the start of the range (possibly less than all of it), in order, none empty. */
  blockStatus(offset: number, lengthBytes: number): Promise<Extent[]>;

  /**
   * Why a new client may not open this device now (a Secondary node, say), or null when it may.
   * The NBD server answers GO/EXPORT_NAME with this message as an error when it is not null.
   */
  exportRefusal?(): string | null;

  /**
   * Optional: the descriptor of a device whose read, write (with FUA: write then fdatasync) and flush are
   * exactly pread, pwrite and fdatasync on it at the same offsets, with nothing to do around them (no
   * replication, no accounting, no fault injection). The NBD server may then run those three commands on
   * native threads of its own against the descriptor, never calling read/write/flush for them; everything
   * else still comes here. null when the device cannot offer it now (closed, say).
   */
  directAccess?(): DirectAccess | null;

  close(): Promise<void>;
}
