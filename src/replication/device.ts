// ReplicatedDevice: a BlockDevice over a local disk that mirrors every write to the peer with DRBD's protocols.
//
// One application write on the Primary:
//   1. a slot among maxInFlightWrites (bounded memory: past it, writes wait);
//   2. the ordering gate (gate.ts): an overlapping write in flight is waited for;
//   3. the activity log: a write to a cold 4 MiB extent waits for the AL transaction;
//   4. the DATA frame goes to the peer and the local write starts, sharing the caller's buffer (no copy);
//   5. completion: A = local done + frame taken by the kernel's socket buffer, B = local + RECV_ACK,
//      C = local + WRITE_ACK. FUA (and FLUSH) wait for the peer's durable write on every protocol.
//   6. the write stays "unacked" until WRITE_ACK: if the link breaks first, its blocks go into the bitmap and
//      the caller still gets success (the node continues StandAlone). The AL extent stays hot until then.
// The Secondary applies DATA frames through its own gate in the order they arrive, so overlapping writes land in
// the same order on both replicas. Resync (resync.ts) reads and writes through the same gates.
//
// Dual-primary (allow-two-primaries, protocol C): both nodes write, so two overlapping writes, one from each
// side, can cross on the wire and each node would apply its own first. One node resolves such conflicts (the
// link's connecting side), as in DRBD: every local write is tracked from its admission until the peer's verdict
// on it. A peer write that arrives at the resolver overlapping one of its tracked writes is not applied: the
// resolver's write counts as the later one, and the peer is told SUPERSEDED when its write lies wholly inside
// that write (it completes; the resolver's write will overwrite it on the peer), else RETRY_WRITE (the peer
// writes it again, locally and to us, after our write). On the other node a peer write overlapping its tracked
// writes waits for their verdicts and is then applied after them. The resolver's decision "is my write still
// unanswered" must see the peer's acks in the order the peer sent them relative to its data, so the other node
// sends its write acks on the data socket; the resolver's acks and verdicts stay on the meta socket, since the
// other node's waits depend on them and its data socket may be paused for flow control.
import assert from 'node:assert/strict';
import type { BlockDevice, BlockDeviceCapabilities, DirectAccess, Extent, ZeroOptions } from '../blockdev/types.js';
import { BlockDeviceError } from '../blockdev/types.js';
import type { Logger } from '../util/log.js';
import type { Bitmap } from '../metadata/bitmap.js';
import type { ActivityLog } from '../metadata/activity-log.js';
import { FrameFlag, FrameType, frameTypeName } from './frame.js';
import { PeerDisk } from './peer-disk.js';
import { IntervalGate, type GateEntry } from './gate.js';
import { receivePool } from './pool.js';
import { CHANNEL_DATA, CHANNEL_META, type PeerChannel } from './link.js';
import type { NativePlaneHub } from './native-plane.js';
import type { ReplPlaneCounters } from '../native/index.js';
import { AL_EXTENT_BYTES } from '../metadata/activity-log.js';

/** The largest read a Diskless peer may ask for (the NBD server's largest request). */
const READ_REQUEST_MAX_BYTES = 32 * 1024 * 1024;

export type ReplicationProtocol = 'A' | 'B' | 'C';

export interface ReplicatedDeviceOptions {
  local: BlockDevice;
  protocol: ReplicationProtocol;
  bitmap: Bitmap;
  activityLog?: ActivityLog;
  onCongestion: 'block' | 'pull-ahead';
  /** Bytes queued toward the peer in user space before writes wait (or pull ahead, protocol A). */
  sendQueueMaxBytes: number;
  maxInFlightWrites: number;
  logger: Logger;
  /** Text for NBD clients of a Secondary. */
  describe(): string;
  /**
   * The native data plane (DRBDTS_REPL_DATA_PATH=native), and the daemon's part of its conditions: true while no
   * resync or verify runs on the connection (the plane's writes bypass the gate those order themselves by).
   */
  native?: { hub: NativePlaneHub; allowed: () => boolean };
  /**
   * A read, write or flush of the local disk failed with EIO (the daemon's local-io-error handler). Called after
   * the failure was handled here (blocks marked out of sync, the caller answered); must not throw.
   */
  /** A local EIO; true when the node detached its disk for it (on-io-error detach): the peer's copy counts. */
  onLocalIoError?: (what: string, error: Error) => boolean | void;
}

/** Is this an I/O error of the disk (EIO), as opposed to a full disk, a permission or a programming error? */
export function isDiskIoError(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  if (code === 'EIO') return true;
  return error instanceof Error && /\bEIO\b|Input\/output error/.test(error.message);
}

export interface ReplicationCounters {
  networkSentBytes: number;
  networkReceivedBytes: number;
  diskWrittenBytes: number;
  diskReadBytes: number;
  resyncSentBytes: number;
  /** Of those, the block data (compressed where it was), without frame headers. */
  resyncSentDataBytes: number;
  resyncReceivedBytes: number;
  /** Dual-primary: peer writes this resolver discarded as superseded / sent back for a retry. */
  conflictsSuperseded: number;
  conflictsRetried: number;
  /** Dual-primary: local writes the resolver superseded / had us retry; peer writes that waited for a verdict. */
  writesSupersededByPeer: number;
  writesRetried: number;
  peerWritesDelayed: number;
}

/** Rejects a write attempt that the resolving peer asked us to make again (never reaches a caller). */
const retryRequested = new Error('the peer asked for this write again (dual-primary conflict)');

/** Ids of JavaScript's writes and barriers; the native plane's have the top bit set (repl_plane.cc). */
const SEQ_MASK = 0x7fff_ffff;

export class ReplicatedDevice implements BlockDevice {
  readonly sizeBytes: number;
  #role: 'Primary' | 'Secondary' = 'Secondary';
  /** Operator may read/write (UpToDate, or forced). */
  readonly gate = new IntervalGate();
  readonly counters: ReplicationCounters = {
    networkSentBytes: 0, networkReceivedBytes: 0, diskWrittenBytes: 0, diskReadBytes: 0,
    resyncSentBytes: 0, resyncSentDataBytes: 0, resyncReceivedBytes: 0,
    conflictsSuperseded: 0, conflictsRetried: 0, writesSupersededByPeer: 0, writesRetried: 0, peerWritesDelayed: 0,
  };
  /** Writes to the peer not acknowledged as written yet. */
  private readonly pending = new Map<number, PendingWrite>();
  private readonly barriers = new Map<number, { resolve: () => void }>();
  private connection: PeerChannel | null = null;
  /** Replicate application writes to the peer (connected, and not pulled ahead). */
  private shipping = false;
  /** Protocol A pull-ahead: the send queue overflowed; writes mark the bitmap until it drains. */
  ahead = false;
  onAheadDrained: (() => void) | null = null;
  /** Called when the send queue filled and the device pulled ahead (a state change events2 reports). */
  onPulledAhead: (() => void) | null = null;
  /** Called (once per disconnected period) before the first write that the peer does not get. */
  onFirstUnreplicatedWrite: (() => Promise<void>) | null = null;
  private unreplicatedHookDone = false;
  private nextSeq = 1;
  private nextBarrier = 1;
  private inFlight = 0;
  private slotWaiters: Array<() => void> = [];
  /**
   * Peer-side state, for barriers: writes received and not yet written, counted per epoch (the writes between
   * two barriers, as in DRBD). The last epoch is the open one; a closed epoch is retired, and its waiters run,
   * once it and every earlier one drained. Counting instead of a promise per write keeps the apply path free of
   * allocations.
   */
  private epochs: Epoch[] = [newEpoch()];
  /** Payload bytes of peer writes received and not yet written: past the limit the data socket is paused. */
  private applyingBytes = 0;
  private dataPaused = false;
  /** Last time the peer sent us application data (the resync rate controller backs off while it flows). */
  lastApplicationIoMs = 0;
  private closed = false;
  /** Dual-primary conflict handling for this connection (attach), and whether this node resolves. */
  private dualPrimary = false;
  private resolver = false;
  /** Dual-primary: this node's writes from their gate entry until the peer's verdict; the sent ones by seq. */
  private readonly tracked = new IntervalGate();
  private readonly trackedBySeq = new Map<number, GateEntry>();
  // ---- the native plane (docs/replication.md, "The native data plane") ----
  private readonly hub: NativePlaneHub | null;
  /** NBD writes are admitted natively (the Primary side). */
  private planeOpen = false;
  /** close() found native writes in flight: resolves (and unpins) once none are. */
  private planeQuiesce: { promise: Promise<void>; resolve: () => void } | null = null;
  /** Activity-log extents held hot for the open plane (a write reference each). */
  private pinned: number[] = [];
  /** Writes and flushes on JavaScript's path while a plane exists: the plane stays closed while any runs. */
  private jsOps = 0;
  /** Peer writes JavaScript applies now (received, not yet written): the native Secondary waits for none. */
  private peerWritesInFlight = 0;
  private nativeUpdateScheduled = false;
  private nativeTimer: NodeJS.Timeout | null = null;
  /** The NBD server re-arms its connections' data paths when the plane opens. */
  onNativeOpen: (() => void) | null = null;

  /**
   * `adjust`: congestion policy, send-queue bound and in-flight bound from now on; the protocol only while no
   * connection is attached (the caller checks), so no write straddles two protocols.
   */
  adjust(settings: Pick<ReplicatedDeviceOptions, 'protocol' | 'onCongestion' | 'sendQueueMaxBytes' | 'maxInFlightWrites'>): void {
    if (settings.protocol !== this.options.protocol && this.connection !== null) {
      throw new Error('the protocol changes only while disconnected');
    }
    this.options.protocol = settings.protocol;
    this.options.onCongestion = settings.onCongestion;
    this.options.sendQueueMaxBytes = settings.sendQueueMaxBytes;
    this.options.maxInFlightWrites = settings.maxInFlightWrites;
  }

  constructor(private readonly options: ReplicatedDeviceOptions) {
    this.sizeBytes = options.bitmap.dataSizeBytes;
    assert.ok(options.local.sizeBytes >= this.sizeBytes, 'local disk smaller than the data area');
    this.hub = options.native?.hub ?? null;
    if (this.hub !== null) {
      const hub = this.hub;
      hub.onMark = (ranges) => {
        for (let i = 0; i < ranges.length; i += 2) {
          if (ranges[i + 1]! > 0) this.options.bitmap.setRange(ranges[i]!, ranges[i + 1]!);
        }
      };
      hub.onQuiesced = () => this.planeQuiesce?.resolve();
      hub.onPeerWriteFailed = (ranges, reason) => {
        for (let i = 0; i < ranges.length; i += 2) {
          if (ranges[i + 1]! > 0) this.options.bitmap.setRange(ranges[i]!, ranges[i + 1]!);
        }
        this.options.logger.error({ reason, ranges }, 'replicated write failed on this node (native plane)');
        this.reportIoError('peer write', new Error(reason));
      };
      // Conditions the daemon does not announce (a resync ending, say) are picked up within this period.
      this.nativeTimer = setInterval(() => this.updateNative(), 200);
      this.nativeTimer.unref();
    }
  }

  get role(): 'Primary' | 'Secondary' {
    return this.#role;
  }

  set role(role: 'Primary' | 'Secondary') {
    this.#role = role;
    this.updateNative();
  }

  /** The native plane in use, for the NBD data path (null on the JavaScript path). */
  get nativePlane(): NativePlaneHub | null {
    return this.hub;
  }

  /** Native plane counters (zeros on the JavaScript path). */
  nativeCounters(): ReplPlaneCounters {
    return this.hub?.plane.counters() ?? { writes: 0, writeBytes: 0, peerWrites: 0, peerWriteBytes: 0, readBytes: 0 };
  }

  /** Re-evaluates the native plane's conditions soon (after the current turn's changes). */
  scheduleNativeUpdate(): void {
    if (this.hub === null || this.nativeUpdateScheduled) return;
    this.nativeUpdateScheduled = true;
    setImmediate(() => {
      this.nativeUpdateScheduled = false;
      this.updateNative();
    });
  }

  /**
   * Opens or closes the native plane (Primary) and arms or disarms the native Secondary, as the conditions
   * say. Closing is immediate for new writes; a caller that must not overlap native writes awaits closePlane().
   */
  private updateNative(): void {
    const hub = this.hub;
    if (hub === null) return;
    const connection = this.connection;
    const transport = connection?.nativeTransport ?? null;
    const base = transport !== null && connection!.closedReason === null && !this.closed && !this.dualPrimary
      && !(this.options.local instanceof PeerDisk) && this.options.native!.allowed();
    const primary = base && this.#role === 'Primary' && this.isShipping && this.options.protocol !== 'A'
      && this.jsOps === 0 && this.barriers.size === 0;
    if (primary && !this.planeOpen && this.planeQuiesce === null) {
      const pinned = this.pin();
      if (hub.plane.open(this.options.protocol as 'B' | 'C', this.options.maxInFlightWrites, pinned)) {
        this.planeOpen = true;
        this.onNativeOpen?.();
      } else {
        this.unpin();
      }
    } else if (!primary && this.planeOpen) {
      void this.closePlane();
    }
    if (transport !== null) {
      const secondary = base && this.#role === 'Secondary' && this.peerWritesInFlight === 0;
      if (secondary) transport.armSecondary(this.options.protocol, connection!.nativeForwarded ?? 0);
      else transport.disarmSecondary();
    }
  }

  /** Holds every hot activity-log extent for the plane (one byte per extent: 1 = the plane may write there). */
  private pin(): Buffer {
    const activityLog = this.options.activityLog;
    const extents = Math.ceil(this.sizeBytes / AL_EXTENT_BYTES);
    const pinned = Buffer.alloc(extents);
    if (activityLog === undefined) return pinned.fill(1);
    for (const extent of activityLog.hotExtents()) {
      const offset = extent * AL_EXTENT_BYTES;
      const length = Math.min(AL_EXTENT_BYTES, this.sizeBytes - offset);
      if (length > 0 && activityLog.tryBeginWrite(offset, length)) {
        pinned[extent] = 1;
        this.pinned.push(extent);
      }
    }
    return pinned;
  }

  private unpin(): void {
    const activityLog = this.options.activityLog;
    for (const extent of this.pinned) {
      const offset = extent * AL_EXTENT_BYTES;
      activityLog?.endWrite(offset, Math.min(AL_EXTENT_BYTES, this.sizeBytes - offset));
    }
    this.pinned = [];
  }

  /** Stops native admission; resolves once no native write is in flight (each acked, or marked in the bitmap). */
  closePlane(): Promise<void> {
    if (this.planeQuiesce !== null) return this.planeQuiesce.promise;
    if (!this.planeOpen) return Promise.resolve();
    this.planeOpen = false;
    if (this.hub!.plane.close()) {
      this.unpin();
      return Promise.resolve();
    }
    let resolve!: () => void;
    const promise = new Promise<void>((r) => (resolve = r));
    this.planeQuiesce = {
      promise,
      resolve: () => {
        this.planeQuiesce = null;
        this.unpin();
        resolve();
        this.scheduleNativeUpdate();
      },
    };
    return promise;
  }

  /**
   * Resync and verify I/O enters the gate only with the native plane closed and its writes done (they bypass the
   * gate); the native Secondary is disarmed at once (it writes in arrival order, one frame at a time).
   */
  enterBackground(offset: number, lengthBytes: number, tag: string): GateEntry | Promise<GateEntry> {
    if (this.hub === null) return this.gate.enter(offset, lengthBytes, tag);
    this.connection?.nativeTransport?.disarmSecondary();
    if (!this.planeOpen && this.planeQuiesce === null) return this.gate.enter(offset, lengthBytes, tag);
    return this.closePlane().then(() => this.gate.enter(offset, lengthBytes, tag));
  }

  /** Runs a write or flush on JavaScript's path: the native plane is closed (and drained) first. */
  private viaJs(run: () => Promise<void>): Promise<void> {
    this.jsOps += 1;
    if (this.planeOpen || this.planeQuiesce !== null) return this.closePlane().then(run).finally(this.jsOpDone);
    return run().finally(this.jsOpDone);
  }

  private readonly jsOpDone = (): void => {
    this.jsOps -= 1;
    if (this.jsOps === 0) this.scheduleNativeUpdate();
  };

  get protocol(): ReplicationProtocol {
    return this.options.protocol;
  }

  get local(): BlockDevice {
    return this.options.local;
  }

  get bitmap(): Bitmap {
    return this.options.bitmap;
  }

  get unacked(): number {
    return this.pending.size;
  }

  get pendingLocal(): number {
    return this.inFlight;
  }

  capabilities(): BlockDeviceCapabilities {
    const local = this.options.local.capabilities();
    return { ...local, readOnly: local.readOnly, canCache: local.canCache, canMultiConn: true };
  }

  exportRefusal(): string | null {
    if (this.role !== 'Primary') return this.options.describe();
    return null;
  }

  // ---- connection management (the daemon decides when) ----

  /**
   * Uses `connection` for peer writes and acks; application writes are shipped once startShipping() ran.
   * `dualPrimary` turns on conflict handling for writes from both sides; `resolver` says this node decides.
   */
  attach(connection: PeerChannel, conflicts: { dualPrimary: boolean; resolver: boolean } = { dualPrimary: false, resolver: false }): void {
    this.connection = connection;
    if (this.options.local instanceof PeerDisk) this.options.local.setConnection(connection);
    this.dualPrimary = conflicts.dualPrimary;
    this.resolver = conflicts.resolver;
    this.dataPaused = false;
    this.shipping = false;
    this.ahead = false;
    this.scheduleNativeUpdate();
  }

  /** The sync decision is made: from now on application writes go to the peer instead of into the bitmap. */
  startShipping(): void {
    assert.ok(this.connection !== null, 'startShipping without a connection');
    this.shipping = true;
    this.unreplicatedHookDone = false;
    this.scheduleNativeUpdate();
  }

  get attachedConnection(): PeerChannel | null {
    return this.connection;
  }

  /** The link is gone: every write the peer did not confirm goes into the bitmap; waiting callers complete. */
  detach(): void {
    this.connection = null;
    this.shipping = false;
    this.ahead = false;
    this.peerDiskless = false;
    const diskless = this.options.local instanceof PeerDisk;
    if (diskless) (this.options.local as PeerDisk).setConnection(null);
    for (const write of this.pending.values()) {
      this.options.bitmap.setRange(write.offset, write.lengthBytes);
      // Diskless, the peer's disk was the only one: what it did not confirm is on no disk at all.
      if (diskless && !write.written && write.failure === null) {
        write.failure = new BlockDeviceError('EIO', 'Diskless, and the link to the peer holding the only disk broke before it confirmed the write');
      }
      write.sent = write.received = write.written = true;
      this.settle(write);
    }
    for (const barrier of this.barriers.values()) barrier.resolve();
    this.barriers.clear();
    // No verdict will come: peer writes waiting for one go ahead (both sides' bitmaps cover what differs).
    this.tracked.leaveAll();
    this.trackedBySeq.clear();
    // Native writes in flight are marked by the plane (its transport broke too) before they are answered.
    this.updateNative();
  }

  get isShipping(): boolean {
    return this.shipping && !this.ahead;
  }

  // ---- BlockDevice ----

  async read(offset: number, target: Buffer): Promise<void> {
    this.checkRange(offset, target.length);
    const local = this.options.local;
    try {
      await local.read(offset, target);
    } catch (error) {
      // on-io-error detach: the read is asked of the peer's disk instead (the node is Diskless now).
      if (!(local instanceof PeerDisk) && this.detachedForError('read', error) && this.options.local instanceof PeerDisk) {
        await this.options.local.read(offset, target);
        return;
      }
      throw error;
    }
    this.counters.diskReadBytes += target.length;
  }

  /** Tells the daemon of a failed local read, write or flush when it is an EIO (resync.ts reports its own). */
  reportIoError(what: string, error: unknown): void {
    this.detachedForError(what, error);
  }

  /** Reports a local EIO; true when the node detached its disk for it (then the peer's copy is the one that counts). */
  private detachedForError(what: string, error: unknown): boolean {
    if (this.options.onLocalIoError === undefined || !isDiskIoError(error)) return false;
    return this.options.onLocalIoError(what, error as Error) === true;
  }

  /** Diskless: the local disk is gone and the peer's serves this node (peer-disk.ts). */
  get diskless(): boolean {
    return this.options.local instanceof PeerDisk;
  }

  /**
   * Swaps the disk under the device: a PeerDisk when the node detaches (the activity log, on the failed disk, is
   * dropped with it), the reopened local disk when it attaches again (only while no write is in flight).
   */
  replaceLocal(disk: BlockDevice, activityLog: ActivityLog | undefined, bitmap?: Bitmap): void {
    this.options.local = disk;
    this.options.activityLog = activityLog;
    if (bitmap !== undefined) this.options.bitmap = bitmap;
    if (disk instanceof PeerDisk) disk.setConnection(this.connection);
    this.scheduleNativeUpdate();
  }

  /** Set on the writes a Diskless node ships: they land only on the peer's disk. */
  private disklessFlag(): number {
    return this.options.local instanceof PeerDisk ? FrameFlag.DISKLESS : 0;
  }

  /** The peer is Diskless: the writes it sends land only here, so this node's bitmap records them for its attach. */
  peerDiskless = false;

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    this.checkRange(offset, data.length);
    this.checkWritable();
    if (this.hub !== null) return this.viaJs(() => this.writeJs(offset, data, fua));
    return this.writeJs(offset, data, fua);
  }

  private writeJs(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.writeFast(offset, data, fua) ?? this.replicate(FrameType.DATA, offset, data.length, fua, data, 0, () =>
      this.options.local.write(offset, data, fua),
    );
  }

  /**
   * The common case of a write, without an await: a free slot, no overlap in flight, hot AL extents, room in
   * the send queue, shipping with protocol B or C. Null (nothing done) when any of that does not hold: then
   * replicate() takes the write, waiting where it must. Same steps and order as replicate(); the only promise
   * is the one returned, the rest (the pending entry and its bound callbacks) is pooled.
   */
  private writeFast(offset: number, data: Buffer, fua: boolean): Promise<void> | null {
    const connection = this.connection;
    const protocol = this.options.protocol;
    // Dual-primary writes take replicate(), which tracks them for conflict resolution.
    if (this.inFlight >= this.options.maxInFlightWrites || connection === null || !this.isShipping || protocol === 'A'
      || this.dualPrimary || data.length === 0 || connection.dataQueuedBytes >= this.options.sendQueueMaxBytes) return null;
    const entry = this.gate.tryEnter(offset, data.length);
    if (entry === null) return null;
    const activityLog = this.options.activityLog;
    if (activityLog !== undefined && !activityLog.tryBeginWrite(offset, data.length)) {
      this.gate.leave(entry);
      return null;
    }
    this.inFlight += 1;
    const seq = this.nextSeq;
    this.nextSeq = (this.nextSeq + 1) & SEQ_MASK || 1;
    const pending = PendingWrite.take(this, seq, offset, data.length, protocol === 'C' || fua, protocol === 'B',
      activityLog !== undefined, entry, true);
    const promise = new Promise<void>(pending.capture);
    this.pending.set(seq, pending);
    // No write callback: completion waits for the peer's ack, which implies the kernel took the frame.
    connection.send(CHANNEL_DATA, FrameType.DATA, (fua ? FrameFlag.FUA : 0) | this.disklessFlag(), seq, offset, data);
    this.counters.networkSentBytes += data.length + 24;
    if (connection.closedReason !== null) {
      // The link broke between the check and the send: the peer will not get it.
      this.options.bitmap.setRange(offset, data.length);
      pending.sent = pending.received = pending.written = true;
    }
    const local = this.options.local;
    if (local.writeWithCallback !== undefined) local.writeWithCallback(offset, data, fua, pending.onLocalDone);
    else local.write(offset, data, fua).then(pending.onLocalOk, pending.onLocalDone);
    return promise;
  }

  trim(offset: number, lengthBytes: number, fua: boolean): Promise<void> {
    this.checkRange(offset, lengthBytes);
    this.checkWritable();
    const run = (): Promise<void> => this.replicate(FrameType.TRIM, offset, lengthBytes, fua, null, 0, () =>
      this.options.local.trim(offset, lengthBytes, fua),
    );
    return this.hub !== null ? this.viaJs(run) : run();
  }

  async zero(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    this.checkRange(offset, lengthBytes);
    this.checkWritable();
    const flags = options.noHole ? FrameFlag.NO_HOLE : 0;
    // With FAST_ZERO only the local disk decides whether zeroing is fast; it runs first so that a refusal
    // (ENOTSUP) reaches the client before the peer zeroed anything. The peer then zeroes however it can.
    const run = (): Promise<void> => this.replicate(FrameType.ZERO, offset, lengthBytes, options.fua, null, flags, () =>
      this.options.local.zero(offset, lengthBytes, options), options.fastZero,
    );
    return this.hub !== null ? this.viaJs(run) : run();
  }

  flush(): Promise<void> {
    if (this.hub !== null) return this.viaJs(() => this.flushJs());
    return this.flushJs();
  }

  private async flushJs(): Promise<void> {
    const connection = this.isShipping ? this.connection : null;
    let barrier: Promise<void> | null = null;
    if (connection !== null) {
      const id = this.nextBarrier;
      this.nextBarrier = (this.nextBarrier + 1) & SEQ_MASK || 1;
      barrier = new Promise<void>((resolve) => this.barriers.set(id, { resolve }));
      connection.send(CHANNEL_DATA, FrameType.BARRIER, 0, id, 0);
    }
    await Promise.all([this.options.local.flush().catch((error: unknown) => {
      this.reportIoError('flush', error);
      throw error;
    }), barrier]);
  }

  /** On the native plane: the local file for the NBD data path's READs, and the plane for its WRITEs and FLUSHes. */
  directAccess(): DirectAccess | null {
    if (this.hub === null || this.closed) return null;
    const local = this.options.local.directAccess?.() ?? null;
    if (local === null) return null;
    return { fd: local.fd, replicationPlane: this.hub.plane, replicationOpen: () => this.planeOpen };
  }

  cache(offset: number, lengthBytes: number): Promise<void> {
    return this.options.local.cache(offset, lengthBytes);
  }

  blockStatus(offset: number, lengthBytes: number): Promise<Extent[]> {
    return this.options.local.blockStatus(offset, lengthBytes);
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.nativeTimer !== null) clearInterval(this.nativeTimer);
    this.nativeTimer = null;
    await this.closePlane();
    // The local disk belongs to the daemon, which closes it after the NBD server and the link.
  }

  // ---- the write path ----

  private checkRange(offset: number, lengthBytes: number): void {
    if (!(Number.isSafeInteger(offset) && offset >= 0 && lengthBytes >= 0 && offset + lengthBytes <= this.sizeBytes)) {
      throw new BlockDeviceError('EINVAL', `range ${offset}+${lengthBytes} outside the ${this.sizeBytes}-byte device`);
    }
  }

  private checkWritable(): void {
    if (this.closed) throw new BlockDeviceError('ESHUTDOWN', 'device is shutting down');
    if (this.role !== 'Primary') throw new BlockDeviceError('EPERM', this.options.describe());
  }

  private async acquireSlot(): Promise<void> {
    while (this.inFlight >= this.options.maxInFlightWrites) {
      await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
    }
    this.inFlight += 1;
  }

  private releaseSlot(): void {
    this.inFlight -= 1;
    const waiter = this.slotWaiters.shift();
    waiter?.();
  }

  private replicate(
    type: number,
    offset: number,
    lengthBytes: number,
    fua: boolean,
    payload: Buffer | null,
    extraFlags: number,
    writeLocal: () => Promise<void>,
    localFirst = false,
  ): Promise<void> {
    const attempt = this.replicateOnce(type, offset, lengthBytes, fua, payload, extraFlags, writeLocal, localFirst);
    if (!this.dualPrimary) return attempt;
    // Dual-primary: the resolving peer may ask for the write again (RETRY_WRITE); it then runs anew, after the
    // peer's conflicting write, here and on the peer.
    const again = (error: unknown): Promise<void> => {
      if (error !== retryRequested) throw error;
      this.counters.writesRetried += 1;
      return this.replicateOnce(type, offset, lengthBytes, fua, payload, extraFlags, writeLocal, localFirst).catch(again);
    };
    return attempt.catch(again);
  }

  private async replicateOnce(
    type: number,
    offset: number,
    lengthBytes: number,
    fua: boolean,
    payload: Buffer | null,
    extraFlags: number,
    writeLocal: () => Promise<void>,
    localFirst = false,
  ): Promise<void> {
    // Fast paths stay synchronous: an await costs a microtask and a promise per write.
    if (this.inFlight < this.options.maxInFlightWrites) this.inFlight += 1;
    else await this.acquireSlot();
    let entry: GateEntry | null = null;
    let alBegun = false;
    let record: GateEntry | null = null;
    const activityLog = this.options.activityLog;
    try {
      if (this.dualPrimary) {
        // Tracked from the same moment it enters the gate: a peer write arriving from now on conflicts with it.
        record = this.tracked.add(offset, lengthBytes);
      }
      const admitted = this.gate.enter(offset, lengthBytes);
      entry = admitted instanceof Promise ? await admitted : admitted;
      if (activityLog !== undefined && lengthBytes > 0) {
        try {
          await activityLog.beginWrite(offset, lengthBytes);
          alBegun = true;
        } catch (error) {
          // The activity log is on the disk: a failing one detaches it (on-io-error detach), and a Diskless node
          // needs no activity log; otherwise the write fails with the disk's error.
          if (!this.detachedForError('activity-log', error)) throw error;
        }
      }
      if (this.connection !== null && this.connection.dataQueuedBytes >= this.options.sendQueueMaxBytes) {
        await this.waitForSendQueue();
      }
      const connection = this.isShipping ? this.connection : null;
      if (connection === null) {
        // The peer will not see this write: remember its blocks for the next resync.
        if (!this.unreplicatedHookDone && this.connection === null && this.onFirstUnreplicatedWrite !== null) {
          this.unreplicatedHookDone = true;
          await this.onFirstUnreplicatedWrite();
        }
        this.options.bitmap.setRange(offset, lengthBytes);
        await writeLocal();
        this.counters.diskWrittenBytes += payload === null ? 0 : lengthBytes;
        return;
      }
      if (localFirst) {
        await writeLocal();
        writeLocal = resolvedLocal;
      }
      const protocol = this.options.protocol;
      const seq = this.nextSeq;
      this.nextSeq = (this.nextSeq + 1) & SEQ_MASK || 1;
      const pending = PendingWrite.take(this, seq, offset, lengthBytes, protocol === 'C' || fua, protocol === 'B',
        alBegun, entry, false);
      entry = null; // the pending entry leaves the gate once the local write finished
      alBegun = false; // the pending entry ends the AL write when the peer confirms
      const write = new Promise<void>(pending.capture);
      this.pending.set(seq, pending);
      if (record !== null && this.tracked.contains(record)) {
        // From now on the peer's verdict (ack, SUPERSEDED, RETRY_WRITE) for this seq ends the tracking.
        this.trackedBySeq.set(seq, record);
        record = null;
      }
      const flags = (fua ? FrameFlag.FUA : 0) | extraFlags | this.disklessFlag();
      let body = payload ?? lengthBody(lengthBytes);
      // Protocol A completes once the local write is done and the frame is queued for the peer: the payload is
      // copied (once, into a pooled buffer) so the caller may reuse its buffer at once.
      if (protocol === 'A' && payload !== null) {
        body = receivePool.take(payload.length);
        payload.copy(body);
        pending.copiedBody = body;
      }
      connection.sendWithCallback(CHANNEL_DATA, type, flags, seq, offset, body, pending.onSent);
      this.counters.networkSentBytes += body.length + 24;
      if (connection.closedReason !== null) {
        // The link broke between the check and the send: the peer will not get it.
        this.options.bitmap.setRange(offset, lengthBytes);
        pending.sent = pending.received = pending.written = true;
      }
      pending.dataWritten = payload !== null;
      writeLocal().then(pending.onLocalOk, pending.onLocalDone);
      await write;
    } finally {
      if (entry !== null) this.gate.leave(entry);
      if (alBegun) activityLog!.endWrite(offset, lengthBytes);
      // Never sent (not shipping, or failed before the send): no verdict will come for it.
      if (record !== null && this.tracked.contains(record)) this.tracked.leave(record);
      this.releaseSlot();
    }
  }

  /** Dual-primary: the write's verdict is in: peer writes waiting on it may go. */
  private verdictFor(seq: number): void {
    const record = this.trackedBySeq.get(seq);
    if (record === undefined) return;
    this.trackedBySeq.delete(seq);
    this.tracked.leave(record);
  }

  /** PendingWrite: the local write finished (error null) or failed. */
  localWriteDone(write: PendingWrite, error: Error | null): void {
    if (error === null) {
      if (write.dataWritten) this.counters.diskWrittenBytes += write.lengthBytes;
    } else {
      // The peer is sent (and may well write) what this disk failed to hold: the replicas now differ in these
      // blocks, so they go into the bitmap for the next resync, whatever the caller is told.
      this.options.bitmap.setRange(write.offset, write.lengthBytes);
      this.options.logger.error({ err: error, offset: write.offset, lengthBytes: write.lengthBytes },
        'local write failed; blocks marked out of sync');
      const connection = this.connection;
      if (this.detachedForError('write', error) && connection !== null) {
        // on-io-error detach: the node is Diskless now and the peer's copy is the one that counts; the write
        // succeeds once the peer wrote it (and fails if the link breaks first). The peer is told that this
        // disk misses these blocks (its bitmap keeps them for the attach).
        write.needWritten = true;
        const length = Buffer.alloc(4);
        length.writeUInt32BE(write.lengthBytes);
        connection.send(CHANNEL_DATA, FrameType.OUT_OF_SYNC, 0, 0, write.offset, length);
      } else {
        write.failure = error;
      }
    }
    write.localDone = true;
    // Later overlapping writes may go now: this one is on the local disk and already on the wire.
    if (write.entry !== null) {
      this.gate.leave(write.entry);
      write.entry = null;
    }
    this.settle(write);
  }

  /** Completes the caller when the protocol's condition holds; forgets the write once the peer wrote it. */
  settle(write: PendingWrite): void {
    if (!write.completed && write.localDone) {
      const peerOk = (!write.needWritten || write.written) && (!write.needReceived || write.received || write.written);
      if (peerOk) {
        write.completed = true;
        if (write.ownsSlot) this.releaseSlot();
        if (write.failure !== null) write.reject!(write.failure);
        else if (write.retry) write.reject!(retryRequested);
        else write.resolve!();
      }
    }
    if (write.completed && write.written && this.pending.get(write.seq) === write) {
      this.pending.delete(write.seq);
      if (write.alBegun) this.options.activityLog?.endWrite(write.offset, write.lengthBytes);
      // Only writeFast's entries are reused: nothing else refers to them now. replicate()'s may still get their
      // socket write callback (after a detach, say), so they are left to the GC.
      if (write.ownsSlot) PendingWrite.give(write);
    }
  }

  /** Bounded send queue: block (or, protocol A with pull-ahead, stop shipping and mark the bitmap). */
  private async waitForSendQueue(): Promise<void> {
    for (;;) {
      const connection = this.isShipping ? this.connection : null;
      if (connection === null || connection.dataQueuedBytes < this.options.sendQueueMaxBytes) return;
      if (this.options.protocol === 'A' && this.options.onCongestion === 'pull-ahead') {
        this.enterAhead(connection);
        return;
      }
      await connection.waitDataDrain();
    }
  }

  private enterAhead(connection: PeerChannel): void {
    if (this.ahead) return;
    this.ahead = true;
    this.options.logger.warn('send queue full: pulling ahead of the peer (writes mark the bitmap until it drains)');
    this.onPulledAhead?.();
    void connection.waitDataDrain().then(async () => {
      // Let the writes already sent be acknowledged, then hand over to a resync.
      while (this.pending.size > 0 && this.connection === connection) await new Promise((r) => setTimeout(r, 10));
      if (this.connection !== connection) return;
      this.ahead = false;
      this.onAheadDrained?.();
    });
  }

  // ---- frames from the peer ----

  /** Handles replication frames; returns false for frames that are not the device's. */
  handleFrame(channel: number, type: number, flags: number, id: number, offset: number, body: Buffer): boolean {
    switch (type) {
      case FrameType.DATA:
      case FrameType.TRIM:
      case FrameType.ZERO:
        // Only a Primary peer writes here, and a single-primary pair has one Primary: a write arriving at the
        // Primary is a protocol error (it costs the connection; the data here stays as it is).
        if (this.#role === 'Primary' && !this.dualPrimary) {
          throw new Error(`${frameTypeName(type)} from the peer while this node is Primary and allow-two-primaries is off`);
        }
        this.counters.networkReceivedBytes += body.length + 24;
        this.applyPeerWrite(type, flags, id, offset, body);
        return true;
      case FrameType.RECV_ACK:
      case FrameType.WRITE_ACK:
      case FrameType.NEG_ACK:
      case FrameType.SUPERSEDED:
      case FrameType.RETRY_WRITE: {
        if (type !== FrameType.RECV_ACK) this.verdictFor(id);
        const write = this.pending.get(id);
        if (write === undefined) return true; // acked after a detach/reattach: nothing waits for it
        if (type === FrameType.SUPERSEDED) {
          // The resolver kept its own overlapping write, which covers all of this one and reaches us next.
          this.counters.writesSupersededByPeer += 1;
          write.received = write.written = true;
        } else if (type === FrameType.RETRY_WRITE) {
          write.retry = true;
          write.received = write.written = true;
        } else if (type === FrameType.NEG_ACK) {
          // The peer could not write it: its copy of these blocks is stale.
          this.options.bitmap.setRange(write.offset, write.lengthBytes);
          write.received = write.written = true;
        } else if (type === FrameType.RECV_ACK) {
          write.received = true;
        } else {
          write.received = write.written = true;
        }
        this.settle(write);
        return true;
      }
      case FrameType.READ_REQUEST:
        this.serveRead(id, offset, body);
        return true;
      case FrameType.OUT_OF_SYNC: {
        const lengthBytes = body.length >= 4 ? body.readUInt32BE(0) : 0;
        if (lengthBytes === 0 || offset + lengthBytes > this.sizeBytes) throw new Error(`bad OUT_OF_SYNC ${offset}+${lengthBytes}`);
        this.options.bitmap.setRange(offset, lengthBytes);
        return true;
      }
      case FrameType.READ_REPLY:
        if (this.options.local instanceof PeerDisk) this.options.local.handleReply(flags, id, body);
        return true;
      case FrameType.BARRIER:
        void this.applyBarrier(id);
        return true;
      case FrameType.BARRIER_ACK: {
        const barrier = this.barriers.get(id);
        this.barriers.delete(id);
        barrier?.resolve();
        return true;
      }
      default:
        void channel;
        return false;
    }
  }

  /** Secondary side: apply a replicated write in arrival order, then acknowledge it. */
  /** A Diskless peer's read: from this disk, after every overlapping write it sent before (the gate). */
  private serveRead(id: number, offset: number, body: Buffer): void {
    const connection = this.connection;
    const lengthBytes = body.length >= 4 ? body.readUInt32BE(0) : 0;
    if (connection === null) return;
    if (lengthBytes === 0 || lengthBytes > READ_REQUEST_MAX_BYTES || offset + lengthBytes > this.sizeBytes) {
      throw new Error(`bad read request ${offset}+${lengthBytes} from the peer`);
    }
    const fail = (errno: number): void => {
      const code = Buffer.alloc(4);
      code.writeUInt32BE(errno);
      connection.send(CHANNEL_DATA, FrameType.READ_REPLY, FrameFlag.ERROR, id, offset, code);
    };
    if (this.options.local instanceof PeerDisk) {
      fail(5); // two Diskless nodes: no disk anywhere
      return;
    }
    const admitted = this.enterBackground(offset, lengthBytes, 'peer-read');
    void (async () => {
      const entry = admitted instanceof Promise ? await admitted : admitted;
      const data = Buffer.allocUnsafe(lengthBytes);
      try {
        await this.options.local.read(offset, data);
        this.counters.diskReadBytes += lengthBytes;
        connection.send(CHANNEL_DATA, FrameType.READ_REPLY, 0, id, offset, data);
      } catch (error) {
        this.reportIoError('read', error);
        fail(5);
      } finally {
        this.gate.leave(entry);
      }
    })();
  }

  private applyPeerWrite(type: number, flags: number, seq: number, offset: number, body: Buffer): void {
    const connection = this.connection;
    this.lastApplicationIoMs = Date.now();
    const lengthBytes = type === FrameType.DATA ? body.length : body.readUInt32BE(0);
    // A Diskless peer's write lands only here: its own disk needs it at its attach. The frame says so itself
    // (the state change saying Diskless travels on the other socket and may come later).
    if (this.peerDiskless || (flags & FrameFlag.DISKLESS) !== 0) this.options.bitmap.setRange(offset, lengthBytes);
    if (this.options.local instanceof PeerDisk) {
      // Diskless here: nothing to write to; the Primary marks the blocks for this node's attach.
      connection?.send(CHANNEL_META, FrameType.NEG_ACK, 0, seq, 0);
      return;
    }
    if (this.options.protocol === 'B' && connection !== null) {
      connection.send(CHANNEL_META, FrameType.RECV_ACK, 0, seq, 0);
    }
    let verdicts: Array<Promise<void>> | null = null;
    const overlaps = this.dualPrimary ? this.tracked.overlapping(offset, lengthBytes) : null;
    if (overlaps !== null) {
      if (this.resolver) {
        // Our overlapping write is the later one: the peer's is not applied here.
        const end = offset + Math.max(1, lengthBytes);
        const covered = overlaps.some((record) => record.start <= offset && end <= record.end);
        if (covered) this.counters.conflictsSuperseded += 1;
        else this.counters.conflictsRetried += 1;
        receivePool.release(body);
        connection?.send(CHANNEL_META, covered ? FrameType.SUPERSEDED : FrameType.RETRY_WRITE, 0, seq, 0);
        return;
      }
      verdicts = overlaps.map((record) => this.tracked.whenLeft(record));
      this.counters.peerWritesDelayed += 1;
    }
    const write = PeerWrite.take(this, type, flags, seq, offset, lengthBytes, body, connection, this.epochs[this.epochs.length - 1]!);
    write.epoch.pending += 1;
    this.peerWritesInFlight += 1;
    // Bounded memory on the Secondary: a slow local disk pauses the data socket instead of queueing without end.
    this.applyingBytes += body.length;
    if (!this.dataPaused && connection !== null && this.applyingBytes > this.options.sendQueueMaxBytes) {
      this.dataPaused = true;
      connection.pauseData();
    }
    const admitted = this.gate.enter(offset, lengthBytes, 'peer');
    if (verdicts !== null) {
      // Dual-primary, not the resolver: our overlapping writes are answered first, then this one lands on top.
      void Promise.all([admitted, ...verdicts]).then(([entry]) => write.admitted(entry as GateEntry));
    } else if (admitted instanceof Promise) void admitted.then(write.admitted);
    else write.admitted(admitted);
  }

  /** PeerWrite: its turn in the gate came; write it locally. */
  startPeerWrite(write: PeerWrite): void {
    const { type, offset, lengthBytes, body } = write;
    const fua = (write.flags & FrameFlag.FUA) !== 0;
    if (offset + lengthBytes > this.sizeBytes) {
      write.written(new Error(`peer write beyond the end (${offset}+${lengthBytes})`));
      return;
    }
    const local = this.options.local;
    try {
      if (type === FrameType.DATA) {
        if (local.writeWithCallback !== undefined) local.writeWithCallback(offset, body, fua, write.written);
        else local.write(offset, body, fua).then(write.writtenOk, write.written);
      } else if (type === FrameType.TRIM) {
        local.trim(offset, lengthBytes, fua).then(write.writtenOk, write.written);
      } else {
        local.zero(offset, lengthBytes, { fua, noHole: (write.flags & FrameFlag.NO_HOLE) !== 0, fastZero: false })
          .then(write.writtenOk, write.written);
      }
    } catch (error) {
      // A device that throws instead of rejecting; once finished (entry cleared) the error is not the write's.
      if (write.entry === null) throw error;
      write.written(error as Error);
    }
  }

  /** PeerWrite: the local write finished (error null) or failed; leave the gate, acknowledge, count it done. */
  finishPeerWrite(write: PeerWrite, error: Error | null): void {
    const { type, offset, lengthBytes, body, connection, seq, epoch } = write;
    if (error !== null) {
      this.options.bitmap.setRange(offset, lengthBytes);
      this.options.logger.error({ err: error, offset, lengthBytes }, 'replicated write failed on this node');
      this.reportIoError('peer write', error);
    } else if (type === FrameType.DATA) {
      this.counters.diskWrittenBytes += lengthBytes;
    }
    this.gate.leave(write.entry!);
    this.applyingBytes -= body.length;
    receivePool.release(body);
    PeerWrite.give(write);
    if (this.dataPaused && this.applyingBytes <= this.options.sendQueueMaxBytes / 2) {
      this.dataPaused = false;
      connection?.resumeData();
    }
    // Dual-primary: the resolver's writes are acked on the data socket, behind our own earlier data (see the top).
    const ackChannel = this.dualPrimary && !this.resolver ? CHANNEL_DATA : CHANNEL_META;
    connection?.send(ackChannel, error === null ? FrameType.WRITE_ACK : FrameType.NEG_ACK, 0, seq, 0);
    epoch.pending -= 1;
    if (epoch.pending === 0 && this.epochs[0] === epoch && this.epochs.length > 1) this.retireEpochs();
    this.peerWritesInFlight -= 1;
    if (this.peerWritesInFlight === 0) this.scheduleNativeUpdate();
  }

  /** Closes the open epoch; resolves once every write received so far is on the local disk. */
  private closeEpoch(): Promise<void> {
    const closed = this.epochs[this.epochs.length - 1]!;
    this.epochs.push(newEpoch());
    const done = new Promise<void>((resolve) => closed.waiters.push(resolve));
    this.retireEpochs();
    return done;
  }

  private retireEpochs(): void {
    while (this.epochs.length > 1 && this.epochs[0]!.pending === 0) {
      const epoch = this.epochs.shift()!;
      for (const waiter of epoch.waiters) waiter();
    }
  }

  /** Secondary side: every write received before the barrier is written, then made durable, then acked. */
  private async applyBarrier(id: number): Promise<void> {
    const connection = this.connection;
    await this.closeEpoch();
    try {
      await this.options.local.flush();
    } catch (error) {
      this.options.logger.error({ err: error }, 'flush for the peer failed');
      this.reportIoError('flush', error);
      return; // no ack: the primary's flush waits until the link drops and the bitmap covers the writes
    }
    connection?.send(CHANNEL_META, FrameType.BARRIER_ACK, 0, id, 0);
  }

  /** Waits until every peer write received so far is on the local disk. */
  async drainPeerWrites(): Promise<void> {
    await this.closeEpoch();
  }
}

interface Epoch {
  /** Writes of this epoch received and not yet written. */
  pending: number;
  waiters: Array<() => void>;
}

function newEpoch(): Epoch {
  return { pending: 0, waiters: [] };
}

/**
 * One write received from the peer, from its arrival to its ack. Pooled, with its callbacks bound once, so
 * applying a peer write allocates no closure and, on a LocalDisk, no promise.
 */
class PeerWrite {
  private static readonly pool: PeerWrite[] = [];
  device!: ReplicatedDevice;
  type = 0;
  flags = 0;
  seq = 0;
  offset = 0;
  lengthBytes = 0;
  body!: Buffer;
  connection: PeerChannel | null = null;
  epoch!: Epoch;
  entry: GateEntry | null = null;

  static take(
    device: ReplicatedDevice, type: number, flags: number, seq: number, offset: number, lengthBytes: number,
    body: Buffer, connection: PeerChannel | null, epoch: Epoch,
  ): PeerWrite {
    const write = PeerWrite.pool.pop() ?? new PeerWrite();
    write.device = device;
    write.type = type;
    write.flags = flags;
    write.seq = seq;
    write.offset = offset;
    write.lengthBytes = lengthBytes;
    write.body = body;
    write.connection = connection;
    write.epoch = epoch;
    return write;
  }

  /** Back to the pool once nothing refers to it (its fields were read). */
  static give(write: PeerWrite): void {
    write.body = emptyBuffer;
    write.connection = null;
    write.entry = null;
    if (PeerWrite.pool.length < 4096) PeerWrite.pool.push(write);
  }

  readonly admitted = (entry: GateEntry): void => {
    this.entry = entry;
    this.device.startPeerWrite(this);
  };

  readonly written = (error: Error | null): void => {
    this.device.finishPeerWrite(this, error);
  };

  readonly writtenOk = (): void => {
    this.device.finishPeerWrite(this, null);
  };
}

const emptyBuffer = Buffer.alloc(0);

const resolvedLocal = (): Promise<void> => Promise.resolve();

function lengthBody(lengthBytes: number): Buffer {
  const body = Buffer.allocUnsafe(4);
  body.writeUInt32BE(lengthBytes, 0);
  return body;
}

/**
 * A write to the peer from its send until the peer confirmed it (and the caller was answered). Pooled, with
 * its callbacks bound once, so the write path allocates no closures.
 */
class PendingWrite {
  private static readonly pool: PendingWrite[] = [];
  device!: ReplicatedDevice;
  seq = 0;
  offset = 0;
  lengthBytes = 0;
  /** Wait for the peer's WRITE_ACK before completing (protocol C, or FUA/flush on any protocol). */
  needWritten = false;
  needReceived = false;
  localDone = false;
  /** The socket's write callback ran (replicate() only; protocol A's copy is returned then). */
  sent = false;
  received = false;
  written = false;
  /** The caller was answered (the write may still await its WRITE_ACK). */
  completed = false;
  alBegun = false;
  /** Dual-primary: the resolving peer answered RETRY_WRITE; the caller's write runs again. */
  retry = false;
  /** Payload bytes, counted as written to disk (not for TRIM and ZERO). */
  dataWritten = true;
  /** Taken by writeFast: the slot is released when the caller is answered. */
  ownsSlot = false;
  entry: GateEntry | null = null;
  /** Protocol A's copy of the payload, returned to the pool once sent. */
  copiedBody: Buffer | null = null;
  failure: Error | null = null;
  resolve: (() => void) | null = null;
  reject: ((error: Error) => void) | null = null;

  static take(
    device: ReplicatedDevice, seq: number, offset: number, lengthBytes: number, needWritten: boolean,
    needReceived: boolean, alBegun: boolean, entry: GateEntry | null, fast: boolean,
  ): PendingWrite {
    const write = PendingWrite.pool.pop() ?? new PendingWrite();
    write.device = device;
    write.seq = seq;
    write.offset = offset;
    write.lengthBytes = lengthBytes;
    write.needWritten = needWritten;
    write.needReceived = needReceived;
    write.localDone = write.received = write.written = write.completed = false;
    write.sent = false;
    write.alBegun = alBegun;
    write.retry = false;
    write.dataWritten = true;
    write.ownsSlot = fast;
    write.entry = entry;
    write.copiedBody = null;
    write.failure = null;
    return write;
  }

  static give(write: PendingWrite): void {
    write.resolve = write.reject = null;
    write.entry = null;
    write.copiedBody = null;
    write.failure = null;
    if (PendingWrite.pool.length < 4096) PendingWrite.pool.push(write);
  }

  readonly capture = (resolve: () => void, reject: (error: Error) => void): void => {
    this.resolve = resolve;
    this.reject = reject;
  };

  readonly onLocalDone = (error: Error | null): void => {
    this.device.localWriteDone(this, error);
  };

  readonly onLocalOk = (): void => {
    this.device.localWriteDone(this, null);
  };

  /** The socket's write callback (replicate() only): the kernel took the frame. */
  readonly onSent = (): void => {
    this.sent = true;
    if (this.copiedBody !== null) {
      receivePool.release(this.copiedBody);
      this.copiedBody = null;
    }
    this.device.settle(this);
  };
}
