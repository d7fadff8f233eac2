// The node daemon behind `drbdts up`: composes Metadata, LocalDisk, ReplicatedDevice, PeerLink, NbdServer and
// the control socket, and runs the state machine (role, disk state, connection state).
//
// Connection life cycle (both nodes run the same steps, and reach mirrored decisions):
//   1. the link authenticates and the device takes the connection for acks (no shipping yet: writes on a
//      Primary still go into the bitmap);
//   2. both send NODE_STATE (UUIDs, flags, role, disk, dirty count); each runs uuids.ts decideSync;
//   3. 'none': ship writes, Connected. 'source'/'target'/'full-*': ship writes, then exchange bitmaps (after
//      shipping started, so every bit a Primary sets is either in the bitmap it sent or in a write the peer gets),
//      merge, and the target drives the resync. Split brain, unrelated data or a Primary that would become a
//      SyncTarget: the connection is dropped and the node goes StandAlone with the reason logged.
//   4. the target stays Inconsistent until its bitmap is empty, then adopts the source's UUIDs.
// An operator action that changes what the decision would be (primary --force on a fresh pair, invalidate,
// new-current-uuid --clear-bitmap) renegotiates: NODE_STATE is exchanged again on the live connection.
import assert from 'node:assert/strict';
import type { Logger } from '../util/log.js';
import { LocalDisk } from '../blockdev/local.js';
import { NbdServer } from '../nbd/server.js';
import { parseListenAddress } from '../nbd/address.js';
import { attachKernelClient, deviceInUse, type KernelAttachment } from '../nbd/kernel.js';
import { transmissionFlagsFor } from '../nbd/handshake.js';
import { Bitmap } from '../metadata/bitmap.js';
import { loadResourceConfig, peerOf, resourceMinor, type HandlerName, type ResourceConfig } from './config.js';
import { PeerDisk } from '../replication/peer-disk.js';
import { COMMANDS, connected, refusal, type Command, type StateView } from './states.js';
import { HandlerRunner, handlerVariables, type HandlerResult } from './handlers.js';
import { ControlServer, type ConnectionState, type DiskState, type ResourceStatus, type RoleState } from './control.js';
import { Metadata } from '../metadata/metadata.js';
import { decideSync, formatUuid, newUuid, type SyncDecision, type SyncView } from '../metadata/uuids.js';
import { startServiceHooks } from './service.js';
import { AutoPromoter } from './auto-promote.js';
import { ReplicatedDevice } from '../replication/device.js';
import { NativePlaneHub, replicationDataPathFromEnv, type ReplicationDataPath } from '../replication/native-plane.js';
import { FrameType } from '../replication/frame.js';
import { CHANNEL_DATA, CHANNEL_META, PeerLink, type PeerConnection } from '../replication/link.js';
import {
  Messages,
  decodeMessage,
  type NodeStateMessage,
  type StateChangeMessage,
} from '../replication/messages.js';
import {
  RateController,
  ResyncSource,
  ResyncTarget,
  VerifyInitiator,
  answerVerify,
  markDifferingBlocks,
} from '../replication/resync.js';

/** Bitmap frames carry at most this many bitmap bytes each. */
const BITMAP_FRAME_BYTES = 1024 * 1024;
/** After the local-io-error handler ran, further errors within this period do not run it again (one per burst). */
const LOCAL_IO_ERROR_QUIET_MS = 60_000;

interface Session {
  connection: PeerConnection;
  localStateSent: boolean;
  peerState: NodeStateMessage | null;
  decision: SyncDecision | null;
  /** Bitmap from the peer being received, and whether it is complete. */
  peerBitmap: Buffer | null;
  peerBitmapComplete: boolean;
  expectBitmap: boolean;
  source: ResyncSource | null;
  target: ResyncTarget | null;
  verify: VerifyInitiator | null;
  verifyPeerActive: boolean;
  peerRole: RoleState;
  peerDisk: DiskState;
  peerUuids: { current: bigint; bitmap: bigint; history: [bigint, bigint] };
  /** Set while the resync is paused (on either side). */
  resyncPaused: boolean;
  /**
   * A SyncTarget recorded the source's sync UUID (RESYNC_START). It comes on the meta socket, the bitmap on the
   * data socket, in either order: the target starts resyncing only once it has both, or a resync with nothing
   * to do could end before the sync UUID arrives, which would then make this node Inconsistent for good.
   */
  syncUuidRecorded: boolean;
  /** The before-resync-target handler runs: the resync waits for its answer (the state is SyncTarget). */
  beforeResyncTargetRunning: boolean;
  /** The peer (a protocol A Primary) pulled ahead of this node: this node is Behind until the resync. */
  peerAhead: boolean;
}

export interface AdjustResult {
  /** Keys in effect now. */
  applied: string[];
  /** Keys that take effect at the next connection (the peer must have the same). */
  nextConnect: string[];
  /** Keys that need `down` and `up`; when any, nothing was applied. */
  needsRestart: string[];
  message: string;
}

export class NodeDaemon {
  private metadata!: Metadata;
  private local!: LocalDisk;
  private device!: ReplicatedDevice;
  private link!: PeerLink;
  private nbd!: NbdServer;
  private control!: ControlServer;
  private session: Session | null = null;
  private role: 'Primary' | 'Secondary' = 'Secondary';
  private discardMyData = false;
  private readonly rate: RateController;
  private networkSentBase = 0;
  private networkReceivedBase = 0;
  private lastVerify: { doneBytes: number; totalBytes: number; outOfSyncBlocks: number } | null = null;
  /** The kernel NBD client on the node's `device`, attached while Primary. */
  private kernel: KernelAttachment | null = null;
  private downPromise: Promise<void> | null = null;
  private resolveStopped!: () => void;
  readonly stopped: Promise<void>;
  private readonly peerName: string;
  /** DRBDTS_REPL_DATA_PATH: replicated writes on native threads (default) or in JavaScript. */
  private readonly dataPath: ReplicationDataPath;
  private hub: NativePlaneHub | null = null;
  /** events2 subscribers (control connections in event mode), and what they were last told. */
  private readonly subscribers = new Set<(message: object) => boolean>();
  private publishedStateKey = '';
  private statisticsTimer: NodeJS.Timeout | null = null;
  private readonly minor: number;
  private readonly handlers: HandlerRunner;
  /** The last split brain found at connect, until a connection gets past the sync decision again. */
  private splitBrain: { detectedMs: number; reason: string } | null = null;
  /** While disconnected: the peer's disk as the fence-peer handler's answer left it (DRBD's peer-disk). */
  private fencedPeerDisk: DiskState | null = null;
  /** Counts connections, so a fence-peer answer that arrives after a reconnect and a new loss is ignored. */
  private connectionEpoch = 0;
  /** local-io-error runs once per burst of errors: not while it runs, nor again within LOCAL_IO_ERROR_QUIET_MS. */
  private localIoErrorRunning = false;
  private localIoErrorLastMs = 0;
  /** [resource] auto-promote (auto-promote.ts). */
  private autoPromoter: AutoPromoter | null = null;

  constructor(
    private config: ResourceConfig,
    private readonly nodeName: string,
    private readonly logger: Logger,
  ) {
    this.peerName = peerOf(config, nodeName).name;
    this.minor = resourceMinor(config);
    this.handlers = new HandlerRunner(config.handlers, config.handlerTimeoutMs, logger, (helper, phase, exitCode) =>
      this.broadcast({ event: 'helper', timeMs: Date.now(), helper, phase, exitCode }));
    this.dataPath = replicationDataPathFromEnv();
    // on-io-error detach: a failing write must reach the daemon before it is answered (to succeed through the
    // peer instead); the native data path answers its own errors, so such a resource stays in TypeScript.
    if (config.onIoError === 'detach') this.dataPath = 'js';
    this.rate = new RateController(
      { maxBytesPerSecond: config.resyncRateMaxBytesPerSecond, minBytesPerSecond: config.resyncRateMinBytesPerSecond },
      () => this.device.lastApplicationIoMs,
    );
    this.stopped = new Promise((resolve) => {
      this.resolveStopped = resolve;
    });
  }

  private get node() {
    return this.config.nodes[this.nodeName]!;
  }

  async start(): Promise<void> {
    const node = this.node;
    const peer = peerOf(this.config, this.nodeName);
    this.metadata = await Metadata.open(node.disk, node.metaDisk);
    try {
      if (this.config.sizeBytes !== undefined && this.config.sizeBytes > this.metadata.dataSizeBytes) {
        // Serving the metadata's size while the config promises more would mislead; growing needs a resize.
        throw new Error(`${this.config.fileName}: disk.size: ${this.config.sizeBytes} bytes is larger than the ` +
          `${this.metadata.dataSizeBytes} bytes this node's metadata records (set size = "${this.metadata.dataSizeBytes}" ` +
          'or leave it out; "create-md --force" would start a new, empty data generation)');
      }
      if (this.metadata.recoveredFromCrash) {
        this.logger.warn({ dirtyBytes: this.metadata.bitmap.dirtyBytes() },
          'previous run did not shut down cleanly: activity-log extents are marked out of sync');
      }
      this.local = await LocalDisk.open(node.disk, { sizeBytes: this.metadata.dataSizeBytes });
      if (this.dataPath === 'native') this.hub = new NativePlaneHub(this.logger);
      this.device = new ReplicatedDevice({
        local: this.local,
        protocol: this.config.protocol,
        bitmap: this.metadata.bitmap,
        activityLog: this.metadata.activityLog,
        onCongestion: this.config.onCongestion,
        sendQueueMaxBytes: this.config.sendQueueMaxBytes,
        maxInFlightWrites: this.config.maxInFlightWrites,
        logger: this.logger,
        describe: () => `resource ${this.config.name} on node ${this.nodeName} is ${this.role}`
          + (this.role === 'Secondary' ? `: promote it with "drbdts primary ${this.config.name}"` : ''),
        native: this.hub === null ? undefined : { hub: this.hub, allowed: () => this.nativeAllowed() },
        onLocalIoError: (what, error) => this.onLocalIoError(what, error),
      });
      this.device.onFirstUnreplicatedWrite = async () => {
        // A Primary writes without its peer: a new data generation starts (DRBD's new current UUID).
        if (this.metadata.uuids.current !== 0n) {
          await this.metadata.newCurrentUuid();
          this.logger.info({ current: formatUuid(this.metadata.uuids.current) }, 'new current UUID: writing without the peer');
        }
      };
      this.device.onAheadDrained = () => this.renegotiate('send queue drained after pulling ahead');
      this.device.onPulledAhead = () => this.sendStateChange(); // the peer shows Behind
      this.link = new PeerLink({
        resource: this.config.name,
        localNode: this.nodeName,
        peerNode: peer.name,
        sharedSecret: this.config.sharedSecret,
        listen: node.address,
        peer: peer.address,
        pingIntervalMs: this.config.pingIntervalMs,
        pingTimeoutMs: this.config.pingTimeoutMs,
        connectRetryMs: this.config.connectRetryMs,
        logger: this.logger,
        // Dual-primary writes are tracked for conflict resolution in JavaScript: such a resource keeps its
        // connection there (docs/replication.md).
        native: this.hub === null || this.config.allowTwoPrimaries ? undefined : {
          hub: this.hub,
          fileFd: () => {
            const access = this.local.directAccess();
            if (access === null) throw new Error('the local disk is closed');
            return access.fd;
          },
          sizeBytes: this.metadata.dataSizeBytes,
        },
      });
      this.link.onConnected = (connection) => this.onConnected(connection);
      this.link.onDisconnected = (reason) => this.onDisconnected(reason);
      await this.link.start().catch((error: Error) => {
        throw new Error(`cannot listen for the peer on ${node.address.host}:${node.address.port}: ${error.message}`);
      });
      this.autoPromoter = this.config.autoPromote ? new AutoPromoter({
        role: () => this.role,
        promote: () => this.handle('primary', {}),
        demote: () => this.handle('secondary', {}),
      }, this.logger) : null;
      this.nbd = new NbdServer({
        device: this.device,
        description: `drbdts resource ${this.config.name} (node ${this.nodeName})`,
        logger: this.logger,
        beforeExport: this.autoPromoter === null ? undefined : () => this.autoPromoter!.beforeExport(),
        onConnectionClosed: this.autoPromoter === null ? undefined : (remaining) => this.autoPromoter!.connectionClosed(remaining),
      });
      this.device.onNativeOpen = () => this.nbd.replicationOpened();
      await this.nbd.listen(parseListenAddress(node.nbd));
      this.control = new ControlServer(node.control, (command, args) => {
        // An operator's promotion or demotion: auto-promote no longer owns the role.
        if (command === 'primary' || command === 'secondary') this.autoPromoter?.operatorChangedRole();
        return this.handle(command, args).finally(() => this.publish());
      }, this.logger, (send) => this.subscribe(send));
      await this.control.listen();
    } catch (error) {
      await this.link?.close().catch(() => {});
      await this.nbd?.close().catch(() => {});
      await this.local?.close().catch(() => {});
      await this.metadata.close().catch(() => {});
      throw error;
    }
    this.logger.info({
      resource: this.config.name, node: this.nodeName, sizeBytes: this.metadata.dataSizeBytes,
      disk: this.diskState(), current: formatUuid(this.metadata.uuids.current), nbd: node.nbd,
      control: node.control, side: this.link.side,
    }, 'resource up');
    this.link.connect();
  }

  // ---- states ----

  private diskState(): DiskState {
    const session = this.session;
    if (session?.target !== null && session?.target !== undefined) return 'Inconsistent';
    if (this.device?.diskless === true) return 'Diskless';
    if (!this.metadata.flags.consistent || this.metadata.uuids.current === 0n) return 'Inconsistent';
    if (this.metadata.flags.outdated) return 'Outdated';
    return 'UpToDate';
  }

  private connectionState(): ConnectionState {
    const session = this.session;
    if (session === null) return this.link.state === 'StandAlone' ? 'StandAlone' : 'Connecting';
    // Until both sides have decided, the connection is not usable yet: report it as still connecting.
    if (session.decision === null) return 'Connecting';
    const kind = session.decision.kind;
    const syncing = session.expectBitmap;
    if (session.target !== null || session.beforeResyncTargetRunning
      || (syncing && (kind === 'target' || kind === 'full-target'))) {
      return session.resyncPaused ? 'PausedSyncT' : 'SyncTarget';
    }
    if (session.source !== null || (syncing && (kind === 'source' || kind === 'full-source'))) {
      return session.resyncPaused ? 'PausedSyncS' : 'SyncSource';
    }
    if (session.verify !== null) return 'VerifyS';
    if (session.verifyPeerActive) return 'VerifyT';
    // Protocol A pulled ahead of a congested peer: still connected, but writes only mark the bitmap (DRBD's Ahead).
    if (this.device.ahead) return 'Ahead';
    // The peer pulled ahead of this node: its writes reach this disk only through the resync that follows.
    if (session.peerAhead) return 'Behind';
    return 'Connected';
  }

  private syncView(): SyncView {
    return {
      nodeName: this.nodeName,
      uuids: this.metadata.uuids,
      consistent: this.metadata.flags.consistent && this.metadata.uuids.current !== 0n,
      role: this.role,
      crashedPrimary: this.metadata.flags.crashedPrimary,
      dirtyBlocks: this.metadata.bitmap.setBits(),
      lastPromotedMs: this.metadata.lastPromotedMs,
      discardMyData: this.discardMyData,
    };
  }

  /** Blocks still to transfer: the bitmap, less resync data already written here and waiting for its flush. */
  private outOfSyncBytes(): number {
    return this.metadata.bitmap.dirtyBytes() - (this.session?.target?.unflushedBytes ?? 0);
  }

  status(): ResourceStatus {
    const session = this.session;
    const connection = session?.connection ?? null;
    const resyncSide = session?.target ?? session?.source ?? null;
    let resync: ResourceStatus['resync'] = null;
    if (session !== null && resyncSide !== null) {
      const rate = resyncSide.progress.bytesPerSecond();
      // The bitmap is the truth for what is left (less what arrived and waits for its flush to clear its
      // bits); progress counts what was done in this run.
      const left = this.outOfSyncBytes();
      const done = resyncSide.progress.doneBytes;
      resync = {
        direction: session.target !== null ? 'target' : 'source',
        doneBytes: done,
        totalBytes: Math.max(done + left, resyncSide.progress.totalBytes),
        bytesPerSecond: rate,
        etaSeconds: rate > 0 ? Math.ceil(left / rate) : left === 0 ? 0 : -1,
        paused: session.resyncPaused,
      };
    }
    const verify = session?.verify ?? null;
    const counters = this.device.counters;
    const native = this.device.nativeCounters();
    return {
      name: this.config.name,
      node: this.nodeName,
      nodeId: this.node.nodeId,
      minor: this.minor,
      size: this.metadata.dataSizeBytes,
      role: this.role,
      disk: this.diskState(),
      connection: this.connectionState(),
      peer: {
        node: this.peerName,
        nodeId: this.config.nodes[this.peerName]!.nodeId,
        role: session?.peerRole ?? 'Unknown',
        disk: session?.peerDisk ?? this.fencedPeerDisk ?? 'DUnknown',
      },
      outOfSyncBytes: this.outOfSyncBytes(),
      replicationDataPath: this.dataPath,
      resync,
      verify: verify !== null
        ? { doneBytes: verify.progress.doneBytes, totalBytes: verify.progress.totalBytes,
          outOfSyncBlocks: verify.mismatchedBytes / 4096 }
        : this.lastVerify,
      protocol: this.config.protocol,
      resyncRate: { ...this.rate.settings },
      counters: {
        // What the native plane wrote and read is counted there (its threads do not touch JavaScript's counters).
        networkSentBytes: this.networkSentBase + (connection?.sentBytes ?? 0),
        networkReceivedBytes: this.networkReceivedBase + (connection?.receivedBytes ?? 0),
        diskWrittenBytes: counters.diskWrittenBytes + native.writeBytes + native.peerWriteBytes,
        diskReadBytes: counters.diskReadBytes + native.readBytes,
        resyncSentBytes: counters.resyncSentBytes,
        resyncSentDataBytes: counters.resyncSentDataBytes,
        resyncReceivedBytes: counters.resyncReceivedBytes,
        // Dual-primary conflicts: resolved here (peer writes superseded / sent back), and met by our writes.
        nativeWrites: native.writes,
        nativePeerWrites: native.peerWrites,
        conflictsSuperseded: counters.conflictsSuperseded,
        conflictsRetried: counters.conflictsRetried,
        writesSupersededByPeer: counters.writesSupersededByPeer,
        writesRetried: counters.writesRetried,
        peerWritesDelayed: counters.peerWritesDelayed,
        alWrites: this.metadata.activityLog.transactions,
        bmWrites: this.metadata.bitmapWrites,
      },
      pending: this.device.pendingLocal,
      unacked: this.device.unacked,
      splitBrain: this.splitBrain,
      lastConnectionError: this.link.lastError === null ? null
        : { message: this.link.lastError.message, at: new Date(this.link.lastError.atMs).toISOString() },
      uuids: {
        current: formatUuid(this.metadata.uuids.current),
        bitmap: formatUuid(this.metadata.uuids.bitmap),
        history: [formatUuid(this.metadata.uuids.history[0]), formatUuid(this.metadata.uuids.history[1])],
      },
    };
  }

  // ---- handlers ----

  /** Runs a configured handler with DRBD's variables; null when the config has none by that name. */
  private callHandler(name: HandlerName, extra: Record<string, string> = {}): Promise<HandlerResult> | null {
    const peer = this.config.nodes[this.peerName]!;
    return this.handlers.run(name, handlerVariables({
      resource: this.config.name, configFile: this.config.fileName, minor: this.minor, nodeName: this.nodeName,
      nodeId: this.node.nodeId, address: this.node.address, backingDevice: this.node.disk, peerName: this.peerName,
      peerNodeId: peer.nodeId, peerAddress: peer.address, connectionState: drbdConnectionState(this.connectionState()),
    }, extra));
  }

  /** A split brain found at connect: said so in the log and status, the split-brain handler told, StandAlone. */
  private splitBrainDetected(session: Session, decisionReason: string): void {
    // The decision names the command generically ("drbdts connect RES ..."); status and log name this resource.
    const reason = decisionReason.replace(/"drbdts ([a-z-]+) RES\b/g, `"drbdts $1 ${this.config.name}`);
    this.splitBrain = { detectedMs: Date.now(), reason };
    this.logger.error({ reason }, 'split brain detected: the nodes\' data diverged; not connecting');
    void this.callHandler('split-brain');
    this.refuse(session, reason);
  }

  /**
   * [net] fencing resource-only: a Primary that lost its peer asks the fence-peer handler to outdate it. The
   * exit code means what it means to DRBD: 3 the peer is Inconsistent, 4 it was outdated, 5 it is unreachable
   * (assumed dead: outdated, if this disk is UpToDate), 6 it is Primary itself, 7 it was fenced (STONITH).
   */
  private async fencePeer(): Promise<number | null> {
    const epoch = this.connectionEpoch;
    const upToDateNodes = (this.diskState() === 'UpToDate' ? 1 << this.node.nodeId : 0) >>> 0;
    const run = this.callHandler('fence-peer', {
      UP_TO_DATE_NODES: `0x${upToDateNodes.toString(16).toUpperCase().padStart(8, '0')}`,
    });
    if (run === null) {
      this.logger.warn('fencing is resource-only but [handlers] has no fence-peer: the peer is not fenced');
      return null;
    }
    const { exitCode } = await run;
    if (this.session !== null || this.connectionEpoch !== epoch) {
      this.logger.info({ exitCode }, 'the peer connected again while fence-peer ran: its answer is ignored');
      return null;
    }
    let peerDisk: DiskState | null = null;
    let meaning: string;
    switch (exitCode) {
      case 3:
        peerDisk = 'Inconsistent';
        meaning = 'peer is inconsistent or worse';
        break;
      case 4:
        peerDisk = 'Outdated';
        meaning = 'peer was fenced (outdated)';
        break;
      case 5:
        if (this.diskState() === 'UpToDate') {
          peerDisk = 'Outdated';
          meaning = 'peer is unreachable, assumed to be dead';
        } else {
          meaning = 'peer unreachable, doing nothing since this disk is not UpToDate';
        }
        break;
      case 6:
        meaning = 'peer is active (Primary): both nodes are Primary, a split brain unless one is demoted';
        break;
      case 7:
        peerDisk = 'Outdated';
        meaning = 'peer was stonithed';
        break;
      default:
        this.logger.error({ exitCode }, 'fence-peer handler failed (exit codes 3 to 7 have a meaning): the peer is not fenced');
        return exitCode;
    }
    const log = exitCode === 6 ? this.logger.error.bind(this.logger) : this.logger.info.bind(this.logger);
    log({ exitCode, peerDisk }, `fence-peer handler returned ${exitCode} (${meaning})`);
    if (peerDisk !== null) {
      this.fencedPeerDisk = peerDisk;
      if (peerDisk === 'Outdated') {
        this.metadata.flags = { ...this.metadata.flags, peerOutdated: true };
        await this.metadata.writeSuperblock().catch((error: Error) =>
          this.logger.error({ err: error }, 'recording the outdated peer in the metadata failed'));
      }
    }
    this.publish();
    return exitCode;
  }

  /** The local disk returned EIO: the local-io-error handler runs once per burst of errors. */
  private onLocalIoError(what: string, error: Error): boolean {
    // Already Diskless: a write still in flight on the left disk failed too (its peer copy counts, as for the
    // first one), or the peer's disk failed a read for this node (not a local disk error: nothing to call).
    if (this.device.diskless) return this.config.onIoError === 'detach';
    const detached = this.config.onIoError === 'detach';
    if (detached) this.detachDisk(`I/O error on the local disk (${what}: ${error.message})`);
    this.callLocalIoErrorHandler(what, error);
    return detached;
  }

  /**
   * Diskless (on-io-error detach, `drbdts detach`): the local disk and its metadata are left alone from now on;
   * reads are asked of the peer, writes go to the peer only. The peer records in its bitmap what this disk
   * misses (it starts a new generation for that), so an `attach` resyncs exactly that.
   */
  private detachDisk(reason: string): void {
    if (this.device.diskless) return;
    this.logger.error({ reason }, 'detaching the local disk: Diskless, served by the peer\'s disk');
    const peerDisk = new PeerDisk(this.device.sizeBytes, this.local.capabilities(), reason);
    this.device.replaceLocal(peerDisk, undefined);
    this.metadata.detachDisk();
    const failed = this.local;
    void failed.close().catch(() => {});
    this.detachedReason = reason;
    this.sendStateChange();
  }

  private detachedReason: string | null = null;

  /** `attach`: the backing disk and its metadata again, then a renegotiation resyncs what the peer changed. */
  private async attachDisk(name: string): Promise<void> {
    const node = this.node;
    let metadata: Metadata;
    let local: LocalDisk;
    // The detached metadata holds the disk's lock: it goes first (it writes nothing, being detached).
    const old = this.metadata;
    await old.close().catch(() => {});
    try {
      metadata = await Metadata.open(node.disk, node.metaDisk);
    } catch (error) {
      throw new Error(`${name}: the metadata on ${node.disk} cannot be read: ${(error as Error).message} (still Diskless)`);
    }
    try {
      local = await LocalDisk.open(node.disk, { sizeBytes: metadata.dataSizeBytes });
    } catch (error) {
      await metadata.close().catch(() => {});
      throw new Error(`${name}: ${node.disk} cannot be opened: ${(error as Error).message} (still Diskless)`);
    }
    this.metadata = metadata;
    this.local = local;
    this.device.replaceLocal(local, metadata.activityLog, metadata.bitmap);
    this.detachedReason = null;
    this.logger.info('local disk attached again');
    this.renegotiate('the local disk was attached');
    this.publish();
  }

  /** The peer is Diskless: this node's disk is the only one; the bitmap records what the peer's disk misses. */
  private async trackForDisklessPeer(): Promise<void> {
    if (this.device.diskless || this.device.peerDiskless) return;
    this.device.peerDiskless = true;
    if (this.metadata.uuids.bitmap === 0n && this.metadata.uuids.current !== 0n) {
      await this.metadata.newCurrentUuid();
      this.logger.info({ current: formatUuid(this.metadata.uuids.current) }, 'new current UUID: the peer is Diskless');
    }
  }

  private callLocalIoErrorHandler(what: string, error: Error): void {
    if (!this.handlers.has('local-io-error')) return;
    const now = Date.now();
    if (this.localIoErrorRunning || now - this.localIoErrorLastMs < LOCAL_IO_ERROR_QUIET_MS) return;
    this.localIoErrorRunning = true;
    this.localIoErrorLastMs = now;
    this.logger.error({ what, err: error }, 'I/O error on the local disk: calling the local-io-error handler');
    void this.callHandler('local-io-error')!.finally(() => {
      this.localIoErrorRunning = false;
    });
  }

  // ---- events (drbdts events2) ----

  private subscribe(send: (message: object) => boolean): () => void {
    this.subscribers.add(send);
    send({ event: 'state', timeMs: Date.now(), status: this.status() });
    // Progress and counters change without a state change: subscribers get them once a second.
    this.statisticsTimer ??= setInterval(() => this.publish(true), 1000);
    this.statisticsTimer.unref();
    return () => {
      this.subscribers.delete(send);
      if (this.subscribers.size === 0 && this.statisticsTimer !== null) {
        clearInterval(this.statisticsTimer);
        this.statisticsTimer = null;
      }
    };
  }

  private broadcast(message: object): void {
    for (const send of this.subscribers) if (!send(message)) this.subscribers.delete(send);
  }

  /**
   * Tells event subscribers the state when something they show changed (always, when `periodic`). Called after
   * every peer frame, control command, connection change and resync or verify step, synchronously: a state
   * that lasts for one of those is seen, however short.
   */
  private publish(periodic = false): void {
    if (this.subscribers.size === 0 || this.metadata === undefined || this.link === undefined) return;
    const session = this.session;
    const key = `${this.role} ${this.diskState()} ${this.connectionState()} ${session?.peerRole ?? ''} `
      + `${session?.peerDisk ?? this.fencedPeerDisk ?? ''} ${session?.resyncPaused === true} ${this.lastVerify === null}`;
    if (!periodic && key === this.publishedStateKey) return;
    this.publishedStateKey = key;
    this.broadcast({ event: 'state', timeMs: Date.now(), status: this.status() });
  }

  /** NBD figures for the metrics endpoint (metrics.ts) that the status object does not carry. */
  exportCounters(): { clients: number; nativeRequests: number } {
    return { clients: this.nbd.activeConnections, nativeRequests: this.nbd.dataPathRequests };
  }

  // ---- connection ----

  /**
   * The daemon's part of the native plane's conditions: connected, the sync decision made and no resync, bitmap
   * exchange or verify running (their I/O orders itself through the gate, which the plane bypasses).
   */
  private nativeAllowed(): boolean {
    const session = this.session;
    return session !== null && session.decision !== null && !session.expectBitmap && session.source === null
      && session.target === null && !session.beforeResyncTargetRunning && session.verify === null
      && !session.verifyPeerActive;
  }

  private onConnected(connection: PeerConnection): void {
    const session: Session = {
      connection, localStateSent: false, peerState: null, decision: null, peerBitmap: null,
      peerBitmapComplete: false, expectBitmap: false, source: null, target: null, verify: null,
      verifyPeerActive: false, peerRole: 'Unknown', peerDisk: 'DUnknown',
      peerUuids: { current: 0n, bitmap: 0n, history: [0n, 0n] }, resyncPaused: false, syncUuidRecorded: false, peerAhead: false,
      beforeResyncTargetRunning: false,
    };
    this.session = session;
    this.connectionEpoch += 1;
    this.fencedPeerDisk = null;
    // With allow-two-primaries, overlapping writes from both sides are resolved by the connecting node.
    this.device.attach(connection, { dualPrimary: this.config.allowTwoPrimaries, resolver: this.link.side === 'connector' });
    // Our state goes out before queued peer frames are handled, so the peer's NODE_STATE is taken as its
    // half of this exchange rather than as a request to answer.
    this.sendNodeState(session);
    connection.start((channel, type, flags, id, offset, body) => {
      try {
        this.onFrame(session, channel, type, flags, id, offset, body);
        this.publish();
      } catch (error) {
        this.logger.error({ err: error }, 'peer frame handling failed');
        connection.close(`protocol error: ${(error as Error).message}`);
      }
    });
    this.publish();
  }

  private onDisconnected(reason: string): void {
    const session = this.session;
    if (session === null) return;
    this.session = null;
    this.networkSentBase += session.connection.sentBytes;
    this.networkReceivedBase += session.connection.receivedBytes;
    this.device.detach();
    session.target?.stop(reason);
    session.verify?.stop(reason);
    // As in DRBD, a verify's result describes one connection: it goes with it.
    this.lastVerify = null;
    this.logger.warn({ reason, outOfSyncBytes: this.metadata.bitmap.dirtyBytes() }, 'peer disconnected');
    this.metadata.writeBitmap().catch((error: Error) => this.logger.error({ err: error }, 'bitmap write-back failed'));
    this.publish();
    // A Primary whose peer had good data must make sure that peer cannot be promoted with the old data (not
    // when going down: the peer then has every write, as after a demotion).
    if (this.role === 'Primary' && this.downPromise === null && this.config.fencing === 'resource-only'
      && (session.peerDisk === 'UpToDate' || session.peerDisk === 'Consistent')) {
      void this.fencePeer().catch((error: Error) => this.logger.error({ err: error }, 'fencing the peer failed'));
    }
  }

  private sendNodeState(session: Session): void {
    session.localStateSent = true;
    const flags = this.metadata.flags;
    session.connection.sendMessage(CHANNEL_META, FrameType.NODE_STATE, 'NodeState', {
      node: this.nodeName,
      sizeBytes: BigInt(this.metadata.dataSizeBytes),
      currentUuid: this.metadata.uuids.current,
      bitmapUuid: this.metadata.uuids.bitmap,
      historyUuids: [...this.metadata.uuids.history],
      role: this.role,
      disk: this.diskState(),
      consistent: flags.consistent && this.metadata.uuids.current !== 0n,
      wasPrimary: flags.wasPrimary,
      crashedPrimary: flags.crashedPrimary,
      discardMyData: this.discardMyData,
      dirtyBlocks: BigInt(this.metadata.bitmap.setBits()),
      protocol: this.config.protocol,
      resyncInProgress: flags.resyncInProgress,
      allowTwoPrimaries: this.config.allowTwoPrimaries,
      lastPromotedMs: BigInt(this.metadata.lastPromotedMs),
      verifyAlg: this.config.verifyAlg ?? 'xxh64',
    });
  }

  private sendStateChange(): void {
    const session = this.session;
    if (session === null) return;
    session.connection.sendMessage(CHANNEL_META, FrameType.STATE_CHANGE, 'StateChange', {
      role: this.role, disk: this.diskState(), currentUuid: this.metadata.uuids.current,
      bitmapUuid: this.metadata.uuids.bitmap, historyUuids: [...this.metadata.uuids.history],
      ahead: this.device.ahead,
    });
    this.publish();
  }

  /** Re-runs the connect-time decision on the live connection (operator actions, pull-ahead drained). */
  private renegotiate(why: string): void {
    const session = this.session;
    if (session === null) return;
    this.logger.info({ why }, 'renegotiating with the peer');
    session.decision = null;
    session.peerState = null;
    this.sendNodeState(session);
    this.publish();
  }

  private onFrame(session: Session, channel: number, type: number, flags: number, id: number, offset: number,
    body: Buffer): void {
    if (this.session !== session) return;
    if (this.device.handleFrame(channel, type, flags, id, offset, body)) return;
    const connection = session.connection;
    switch (type) {
      case FrameType.NODE_STATE: {
        const state = decodeMessage<NodeStateMessage>(Messages.NodeState, body);
        checkPeerState(state.role, state.disk);
        if (!session.localStateSent) this.sendNodeState(session);
        session.localStateSent = false;
        session.peerState = state;
        session.peerRole = state.role === 'Primary' ? 'Primary' : 'Secondary';
        session.peerDisk = state.disk as DiskState;
        session.peerAhead = false; // a renegotiation: the peer's queue drained (or the peer restarted)
        session.peerUuids = { current: state.currentUuid, bitmap: state.bitmapUuid,
          history: [state.historyUuids[0] ?? 0n, state.historyUuids[1] ?? 0n] };
        void this.decide(session, state).catch((error: Error) => {
          this.logger.error({ err: error }, 'sync decision failed');
          connection.close(`sync decision failed: ${error.message}`);
        }).finally(() => this.publish());
        return;
      }
      case FrameType.STATE_CHANGE: {
        const change = decodeMessage<StateChangeMessage>(Messages.StateChange, body);
        checkPeerState(change.role, change.disk);
        session.peerRole = change.role === 'Primary' ? 'Primary' : 'Secondary';
        session.peerDisk = change.disk as DiskState;
        session.peerAhead = change.ahead === true;
        if (change.disk === 'Diskless' && !this.device.diskless) void this.trackForDisklessPeer().then(() => this.publish());
        if (session.peerRole === 'Primary' && this.role === 'Primary' && !this.config.allowTwoPrimaries) {
          // Both promoted at the same moment, each seeing the other Secondary. Without conflict handling the
          // replicas could diverge under crossing writes: drop the link; the reconnect sees the split brain.
          this.logger.error('the peer became Primary while this node is Primary and allow-two-primaries is off: '
            + 'dropping the connection before writes from both sides make a split brain');
          connection.close('both nodes are Primary and allow-two-primaries is off (a split brain if both write)');
          return;
        }
        session.peerUuids = { current: change.currentUuid, bitmap: change.bitmapUuid,
          history: [change.historyUuids[0] ?? 0n, change.historyUuids[1] ?? 0n] };
        return;
      }
      case FrameType.BITMAP: {
        requireBitmapExchange(session, 'BITMAP');
        if (session.peerBitmap === null) session.peerBitmap = Buffer.alloc(this.metadata.bitmap.byteLength);
        if (offset + body.length > session.peerBitmap.length) throw new Error('peer bitmap larger than ours');
        body.copy(session.peerBitmap, offset);
        return;
      }
      case FrameType.BITMAP_END:
        requireBitmapExchange(session, 'BITMAP_END');
        session.peerBitmap ??= Buffer.alloc(this.metadata.bitmap.byteLength);
        session.peerBitmapComplete = true;
        this.maybeStartResync(session);
        return;
      case FrameType.RS_REQUEST:
        if (session.decision?.kind !== 'source' && session.decision?.kind !== 'full-source') {
          throw new Error(`RS_REQUEST while this node is not SyncSource (decision ${session.decision?.kind ?? 'not made yet'})`);
        }
        session.source ??= this.makeSource(session);
        session.source.handleRequest(flags, id, offset, body);
        return;
      case FrameType.RS_REPLY:
        session.target?.handleReply(flags, id, offset, body);
        return;
      case FrameType.RS_ACK:
        if (session.source === null) throw new Error('RS_ACK while this node is not SyncSource');
        session.source.handleAck(id, offset);
        return;
      case FrameType.RESYNC_START: {
        const start = decodeMessage<{ syncUuid: bigint }>(Messages.ResyncStart, body);
        // It makes this node Inconsistent: never on a Primary, never against a decision that says otherwise.
        if (this.role === 'Primary') throw new Error('RESYNC_START to a Primary, which never becomes SyncTarget');
        const kind = session.decision?.kind;
        if (kind !== undefined && kind !== 'target' && kind !== 'full-target') {
          throw new Error(`RESYNC_START while the sync decision is ${kind}`);
        }
        if (start.syncUuid === 0n) throw new Error('RESYNC_START without a sync UUID');
        void this.metadata.beginSyncTarget(start.syncUuid).then(() => {
          if (this.session !== session) return;
          session.syncUuidRecorded = true;
          this.maybeStartResync(session);
          this.publish();
        }, (error: Error) => {
          this.logger.error({ err: error }, 'recording the sync UUID failed');
          connection.close(`metadata write failed: ${error.message}`);
        });
        return;
      }
      case FrameType.RESYNC_DONE:
        // Clears this node's whole bitmap: only the end of a resync this node is the source of. (It comes on the
        // meta socket and may overtake the target's bitmap on the data socket when there was nothing to send.)
        if (session.decision?.kind !== 'source' && session.decision?.kind !== 'full-source') {
          throw new Error(`RESYNC_DONE while this node is not SyncSource (decision ${session.decision?.kind ?? 'not made yet'})`);
        }
        void this.finishAsSource(session).finally(() => this.publish());
        return;
      case FrameType.OV_REQUEST:
        // The first request of a verify by the peer: the result of an earlier one no longer stands.
        if (!session.verifyPeerActive) this.lastVerify = null;
        session.verifyPeerActive = true;
        answerVerify(this.device, connection, this.config.verifyAlg ?? 'xxh64', id, offset, body);
        return;
      case FrameType.OV_REPLY:
        session.verify?.handleReply(flags, id, offset, body);
        return;
      case FrameType.OV_RESULT:
        markDifferingBlocks(this.device, offset, id, body);
        return;
      case FrameType.VERIFY_DONE: {
        session.verifyPeerActive = false;
        const done = decodeMessage<{ checkedBytes: bigint; mismatchedBytes: bigint }>(Messages.VerifyDone, body);
        this.lastVerify = { doneBytes: Number(done.checkedBytes), totalBytes: this.metadata.dataSizeBytes,
          outOfSyncBlocks: Number(done.mismatchedBytes) / 4096 };
        this.logger.info({ mismatchedBytes: Number(done.mismatchedBytes) }, 'online verify by the peer finished');
        return;
      }
      case FrameType.COMMAND: {
        const command = decodeMessage<{ name: string; arg: string }>(Messages.Command, body);
        void this.peerCommand(session, command.name, command.arg).catch((error: Error) => {
          this.logger.error({ err: error, command: command.name }, 'peer command refused');
          connection.close(`peer command ${command.name} refused: ${error.message}`);
        });
        return;
      }
      case FrameType.DISCONNECT: {
        const message = decodeMessage<{ reason: string }>(Messages.Disconnect, body);
        this.logger.warn({ reason: message.reason }, 'peer disconnects');
        connection.close(`peer disconnected: ${message.reason}`);
        return;
      }
      default:
        throw new Error(`unexpected frame type ${type} on channel ${channel}`);
    }
  }

  private makeSource(session: Session): ResyncSource {
    return new ResyncSource({
      device: this.device, connection: session.connection, checksumAlgorithm: this.config.csumsAlg, logger: this.logger,
    });
  }

  private async decide(session: Session, peer: NodeStateMessage): Promise<void> {
    const connection = session.connection;
    if (Number(peer.sizeBytes) !== this.metadata.dataSizeBytes) {
      this.refuse(session, `peer ${peer.node} has a data size of ${peer.sizeBytes} bytes, this node ${this.metadata.dataSizeBytes}: `
        + 'recreate the smaller metadata with the same [disk] size on both nodes');
      return;
    }
    if (peer.protocol !== this.config.protocol) {
      this.refuse(session, `peer ${peer.node} uses protocol ${peer.protocol}, this node ${this.config.protocol}: the config must be identical`);
      return;
    }
    if (peer.allowTwoPrimaries !== this.config.allowTwoPrimaries) {
      this.refuse(session, `allow-two-primaries is ${this.config.allowTwoPrimaries ? 'on' : 'off'} here and `
        + `${peer.allowTwoPrimaries ? 'on' : 'off'} on ${peer.node}: the config must be identical`);
      return;
    }
    const verifyAlg = this.config.verifyAlg ?? 'xxh64';
    if (peer.verifyAlg !== verifyAlg) {
      this.refuse(session, `verify-alg is ${verifyAlg} here and ${peer.verifyAlg} on ${peer.node}: the config must be identical `
        + '(online verify compares digests)');
      return;
    }
    if (this.device.diskless || peer.disk === 'Diskless') {
      // A Diskless side has no disk to resync: the other serves it (its reads and writes) as it is.
      if (this.device.diskless && peer.disk === 'Diskless') {
        this.refuse(session, 'both nodes are Diskless: there is no disk to serve from');
        return;
      }
      const other = this.device.diskless ? peer.disk : this.diskState();
      if (other !== 'UpToDate') {
        this.refuse(session, `one node is Diskless and the other's disk is ${other}: no good data to serve`);
        return;
      }
      if (peer.disk === 'Diskless') await this.trackForDisklessPeer();
      session.decision = { kind: 'none', reason: 'a Diskless node is served by its peer\'s disk' } as SyncDecision;
      this.logger.info({ decision: 'none' }, 'sync decision: a Diskless node, served by the peer');
      this.device.startShipping();
      this.publish();
      return;
    }
    this.device.peerDiskless = false;
    const peerView: SyncView = {
      nodeName: peer.node,
      uuids: { current: peer.currentUuid, bitmap: peer.bitmapUuid,
        history: [peer.historyUuids[0] ?? 0n, peer.historyUuids[1] ?? 0n] },
      consistent: peer.consistent,
      role: peer.role === 'Primary' ? 'Primary' : 'Secondary',
      crashedPrimary: peer.crashedPrimary,
      dirtyBlocks: Number(peer.dirtyBlocks),
      lastPromotedMs: Number(peer.lastPromotedMs ?? 0n),
      discardMyData: peer.discardMyData,
    };
    const decision = decideSync(this.syncView(), peerView, {
      afterSb0pri: this.config.afterSb0pri, afterSb1pri: this.config.afterSb1pri, afterSb2pri: this.config.afterSb2pri,
    });
    if (decision.kind === 'split-brain') {
      this.splitBrainDetected(session, decision.reason);
      return;
    }
    if (this.role === 'Primary' && peer.role === 'Primary' && !this.config.allowTwoPrimaries) {
      // Both promoted, but at most one of them wrote (else the decision above is a split brain).
      this.refuse(session, 'both nodes are Primary and allow-two-primaries is off: demote one');
      return;
    }
    if (decision.kind !== 'unrelated') this.splitBrain = null;
    session.decision = decision;
    this.logger.info({ decision: decision.kind, reason: decision.reason }, 'sync decision');
    switch (decision.kind) {
      case 'none':
        this.device.startShipping();
        this.discardMyData = false;
        if (this.metadata.uuids.bitmap !== 0n) await this.metadata.clearBitmapUuid();
        if (this.metadata.flags.outdated && peer.disk === 'UpToDate' && peer.currentUuid === this.metadata.uuids.current) {
          // The same generation as an UpToDate peer, nothing to sync: this data is not outdated after all.
          this.metadata.flags = { ...this.metadata.flags, outdated: false };
          await this.metadata.writeSuperblock();
          this.sendStateChange();
        }
        return;
      case 'wait-for-operator':
        // A fresh pair: connected, both Inconsistent; writes (after primary --force) replicate.
        this.device.startShipping();
        return;
      case 'unrelated':
        this.refuse(session, decision.reason);
        return;
      case 'source':
      case 'full-source':
      case 'target':
      case 'full-target': {
        const target = decision.kind === 'target' || decision.kind === 'full-target';
        if (target && this.role === 'Primary') {
          this.refuse(session, `the decision makes this Primary a SyncTarget (${decision.reason}): demote it first`);
          return;
        }
        this.discardMyData = false;
        if (decision.kind.startsWith('full')) this.metadata.bitmap.setAll();
        if (target) {
          // Inconsistent from now until the bitmap is empty; persisted so a crash mid-resync is remembered.
          this.metadata.flags = { ...this.metadata.flags, consistent: false, resyncInProgress: true };
          await this.metadata.writeSuperblock();
        }
        this.device.startShipping();
        session.expectBitmap = true;
        this.sendBitmap(connection);
        if (!target) {
          // The sync UUID makes an interrupted resync resume from the bitmaps: the target carries it as its
          // current UUID until done, and at the next connect it equals our bitmap UUID (bitmap-based resync).
          const syncUuid = await this.metadata.beginSyncSource();
          connection.sendMessage(CHANNEL_META, FrameType.RESYNC_START, 'ResyncStart', {
            totalBytes: BigInt(this.metadata.bitmap.dirtyBytes()), full: decision.kind === 'full-source',
            checksumBased: this.config.csumsAlg !== undefined, syncUuid,
          });
          this.sendStateChange();
        }
        this.maybeStartResync(session);
        return;
      }
      default:
        assert.fail(`unhandled decision ${decision.kind}`);
    }
  }

  /**
   * `adjust`: reads the config file again and applies what a running node can take, as drbdadm adjust does:
   * resync rates and checksums, split-brain policies, fencing, handlers, timers, the secret (next connect), send
   * queue and in-flight bounds, the congestion policy, and the protocol while disconnected. What needs the node
   * restarted is named and left as it runs; nothing is half-applied.
   */
  private async adjust(name: string): Promise<AdjustResult> {
    let next: ResourceConfig;
    try {
      next = loadResourceConfig(this.config.fileName);
    } catch (error) {
      throw new Error(`${name}: ${(error as Error).message}`);
    }
    const old = this.config;
    const applied: string[] = [];
    const nextConnect: string[] = [];
    const needsRestart: string[] = [];
    const changed = (key: string, a: unknown, b: unknown): boolean => {
      const differs = JSON.stringify(a) !== JSON.stringify(b);
      return differs;
    };
    const oldNode = old.nodes[this.nodeName];
    const newNode = next.nodes[this.nodeName];
    const oldPeer = old.nodes[this.peerName];
    const newPeer = next.nodes[this.peerName];
    if (newNode === undefined || newPeer === undefined) {
      throw new Error(`${name}: ${old.fileName} no longer has the nodes ${this.nodeName} and ${this.peerName}: down, then up with the new file`);
    }
    // What only a restart changes.
    for (const [key, a, b] of [
      ['resource.name', old.name, next.name], ['disk.size', old.sizeBytes, next.sizeBytes],
      ['disk.al-extents', old.alExtents, next.alExtents], ['net.allow-two-primaries', old.allowTwoPrimaries, next.allowTwoPrimaries],
      [`node.${this.nodeName}`, oldNode, newNode], [`node.${this.peerName}`, oldPeer, newPeer],
      ['resource.minor', old.minor, next.minor],
    ] as const) {
      if (changed(key, a, b)) needsRestart.push(key);
    }
    const connected = this.session !== null;
    if (next.protocol !== old.protocol && connected) {
      throw new Error(`${name}: protocol ${old.protocol} -> ${next.protocol} changes only while disconnected `
        + `(drbdts disconnect ${old.name}, adjust, connect; on both nodes)`);
    }
    if (needsRestart.length > 0) {
      return { applied, nextConnect, needsRestart, message: `${name}: ${needsRestart.join(', ')} changed: these need `
        + `drbdts down ${old.name}, then up; nothing was applied` };
    }
    const keys: Array<[string, unknown, unknown, 'now' | 'connect']> = [
      ['resync.rate', old.resyncRateMaxBytesPerSecond, next.resyncRateMaxBytesPerSecond, 'now'],
      ['resync.min-rate', old.resyncRateMinBytesPerSecond, next.resyncRateMinBytesPerSecond, 'now'],
      ['resync.csums-alg', old.csumsAlg, next.csumsAlg, 'now'],
      ['resync.verify-alg', old.verifyAlg, next.verifyAlg, connected ? 'connect' : 'now'],
      ['net.protocol', old.protocol, next.protocol, 'now'],
      ['net.ping-interval', old.pingIntervalMs, next.pingIntervalMs, 'now'],
      ['net.ping-timeout', old.pingTimeoutMs, next.pingTimeoutMs, 'now'],
      ['net.connect-int', old.connectRetryMs, next.connectRetryMs, 'now'],
      ['net.max-buffers', old.sendQueueMaxBytes, next.sendQueueMaxBytes, 'now'],
      ['net.max-in-flight', old.maxInFlightWrites, next.maxInFlightWrites, 'now'],
      ['net.on-congestion', old.onCongestion, next.onCongestion, 'now'],
      ['net.after-sb-0pri', old.afterSb0pri, next.afterSb0pri, 'connect'],
      ['net.after-sb-1pri', old.afterSb1pri, next.afterSb1pri, 'connect'],
      ['net.after-sb-2pri', old.afterSb2pri, next.afterSb2pri, 'connect'],
      ['net.shared-secret', old.sharedSecret, next.sharedSecret, 'connect'],
      ['net.fencing', old.fencing, next.fencing, 'now'],
      ['handlers', old.handlers, next.handlers, 'now'],
      ['handlers.timeout', old.handlerTimeoutMs, next.handlerTimeoutMs, 'now'],
    ];
    this.device.adjust({ protocol: next.protocol, onCongestion: next.onCongestion,
      sendQueueMaxBytes: next.sendQueueMaxBytes, maxInFlightWrites: next.maxInFlightWrites });
    this.link.adjust({ pingIntervalMs: next.pingIntervalMs, pingTimeoutMs: next.pingTimeoutMs,
      connectRetryMs: next.connectRetryMs, sharedSecret: next.sharedSecret });
    this.rate.settings = { maxBytesPerSecond: next.resyncRateMaxBytesPerSecond, minBytesPerSecond: next.resyncRateMinBytesPerSecond };
    this.handlers.reconfigure(next.handlers, next.handlerTimeoutMs);
    this.config = next;
    for (const [key, a, b, when] of keys) {
      if (!changed(key, a, b)) continue;
      (when === 'now' ? applied : nextConnect).push(key);
    }
    this.logger.info({ applied, nextConnect }, 'configuration adjusted');
    this.publish();
    const parts = [applied.length > 0 ? `applied: ${applied.join(', ')}` : 'nothing to apply'];
    if (nextConnect.length > 0) parts.push(`at the next connect: ${nextConnect.join(', ')}`);
    return { applied, nextConnect, needsRestart, message: `${name}: ${parts.join('; ')}` };
  }

  private refuse(session: Session, reason: string): void {
    this.logger.error({ reason }, 'cannot connect to the peer: going StandAlone');
    session.connection.sendMessage(CHANNEL_META, FrameType.DISCONNECT, 'Disconnect', { reason });
    this.link.disconnect(reason, { failed: true });
  }

  private sendBitmap(connection: PeerConnection): void {
    const bytes = this.metadata.bitmap.toBuffer();
    for (let offset = 0; offset < bytes.length; offset += BITMAP_FRAME_BYTES) {
      const chunk = bytes.subarray(offset, Math.min(bytes.length, offset + BITMAP_FRAME_BYTES));
      // An all-zero chunk is skipped: the receiver starts from zeros.
      if (chunk.some((byte) => byte !== 0)) connection.send(CHANNEL_DATA, FrameType.BITMAP, 0, 0, offset, chunk);
    }
    connection.send(CHANNEL_DATA, FrameType.BITMAP_END, 0, bytes.length, 0);
  }

  private maybeStartResync(session: Session): void {
    if (!session.expectBitmap || !session.peerBitmapComplete || session.decision === null) return;
    const decided = session.decision.kind;
    if (decided === 'target' || decided === 'full-target') {
      // Each RESYNC_START is used by the one resync it announces (it may come before or after our decision).
      if (!session.syncUuidRecorded) return;
      session.syncUuidRecorded = false;
    }
    session.expectBitmap = false;
    session.peerBitmapComplete = false;
    const peerBitmap = Bitmap.fromBuffer(this.metadata.dataSizeBytes, session.peerBitmap!);
    session.peerBitmap = null;
    this.metadata.bitmap.mergeFrom(peerBitmap);
    const kind = session.decision.kind;
    const target = kind === 'target' || kind === 'full-target';
    this.logger.info({ role: target ? 'SyncTarget' : 'SyncSource', outOfSyncBytes: this.metadata.bitmap.dirtyBytes() },
      'resync starts');
    if (!target) {
      session.source = this.makeSource(session);
      this.sendStateChange();
      return;
    }
    const before = this.callHandler('before-resync-target');
    if (before === null) {
      this.startResyncTarget(session);
      return;
    }
    // As in DRBD: with the bitmaps merged, before any block is written; a failure drops the connection.
    session.beforeResyncTargetRunning = true;
    void before.then(({ exitCode }) => {
      session.beforeResyncTargetRunning = false;
      if (this.session !== session) return;
      if (exitCode !== 0) {
        this.refuse(session, `the before-resync-target handler returned ${exitCode ?? 'nothing (killed)'}: `
          + 'not starting the resync; dropping the connection');
        return;
      }
      this.startResyncTarget(session);
    }).finally(() => this.publish());
  }

  private startResyncTarget(session: Session): void {
    const resync = new ResyncTarget({
      device: this.device,
      connection: session.connection,
      rate: this.rate,
      checksumAlgorithm: this.config.csumsAlg,
      persistBitmap: () => this.metadata.writeBitmap(),
      logger: this.logger,
    });
    session.target = resync;
    resync.paused = session.resyncPaused;
    this.sendStateChange();
    void resync.run().then(
      (done) => (done ? this.finishAsTarget(session) : undefined),
      (error: Error) => {
        this.logger.error({ err: error }, 'resync failed');
        session.connection.close(`resync failed: ${error.message}`);
      },
    ).finally(() => this.publish());
  }

  private async finishAsTarget(session: Session): Promise<void> {
    if (this.session !== session) return;
    const total = session.target?.progress.doneBytes ?? 0;
    await this.metadata.adoptUuids(session.peerUuids);
    this.metadata.flags = { ...this.metadata.flags, consistent: true, wasUpToDate: true, resyncInProgress: false,
      crashedPrimary: false, outdated: false };
    await this.metadata.writeSuperblock();
    session.target = null;
    session.connection.sendMessage(CHANNEL_META, FrameType.RESYNC_DONE, 'ResyncDone', { bytes: BigInt(total) });
    this.sendStateChange();
    this.logger.info({ bytes: total, received: this.device.counters.resyncReceivedBytes }, 'resync finished: UpToDate');
    void this.callHandler('after-resync-target');
  }

  private async finishAsSource(session: Session): Promise<void> {
    if (this.session !== session) return;
    const total = session.source?.progress.doneBytes ?? 0;
    session.source = null;
    this.metadata.bitmap.clearAll();
    this.metadata.flags = { ...this.metadata.flags, crashedPrimary: false, peerOutdated: false };
    await this.metadata.clearBitmapUuid();
    await this.metadata.writeBitmap();
    this.logger.info({ bytes: total, sent: this.device.counters.resyncSentBytes }, 'resync finished: peer is UpToDate');
  }

  private async peerCommand(session: Session, name: string, arg: string): Promise<void> {
    switch (name) {
      case 'invalidate':
        await this.invalidateLocal(session);
        return;
      case 'set-uuid': {
        // new-current-uuid --clear-bitmap from the peer: both sides start the same generation, no sync. It
        // forgets this node's bitmap: only where the peer's own command would be allowed here.
        if (!/^[1-9][0-9]*$/.test(arg)) throw new Error(`set-uuid: ${JSON.stringify(arg)} is not a UUID`);
        const uuid = BigInt(arg);
        if (uuid >= 1n << 64n) throw new Error('set-uuid: the UUID does not fit 64 bits');
        if (this.role === 'Primary') throw new Error('set-uuid: this node is Primary');
        if (session.source !== null || session.target !== null) throw new Error('set-uuid: a resync is running');
        if (this.metadata.uuids.current !== 0n && this.diskState() === 'UpToDate' && session.peerDisk === 'UpToDate') {
          throw new Error('set-uuid: both nodes are already UpToDate');
        }
        this.metadata.uuids = { current: uuid, bitmap: 0n, history: [0n, 0n] };
        this.metadata.flags = { ...this.metadata.flags, consistent: true, wasUpToDate: true, resyncInProgress: false, outdated: false };
        this.metadata.bitmap.clearAll();
        await this.metadata.writeSuperblock();
        await this.metadata.writeBitmap();
        this.sendStateChange();
        return;
      }
      case 'resync-pause':
      case 'resync-resume':
        this.setPaused(session, name === 'resync-pause', false);
        return;
      case 'resync-rate': {
        const rate = Number(arg);
        if (!Number.isSafeInteger(rate) || rate <= 0) throw new Error(`resync-rate: ${JSON.stringify(arg)} is not a rate`);
        this.rate.settings = { ...this.rate.settings, maxBytesPerSecond: rate };
        return;
      }
      default:
        throw new Error(`unknown command ${JSON.stringify(name)}`);
    }
  }

  private setPaused(session: Session, paused: boolean, forward: boolean): void {
    session.resyncPaused = paused;
    if (paused) session.target?.pause();
    else session.target?.resume();
    if (forward) {
      session.connection.sendMessage(CHANNEL_META, FrameType.COMMAND, 'Command',
        { name: paused ? 'resync-pause' : 'resync-resume', arg: '' });
    }
  }

  private async invalidateLocal(session: Session): Promise<void> {
    if (this.role === 'Primary') throw new Error('invalidate: this node is Primary; demote it first');
    if (session.target !== null || session.source !== null) throw new Error('invalidate: a resync is already running');
    this.metadata.bitmap.setAll();
    this.metadata.flags = { ...this.metadata.flags, consistent: false, resyncInProgress: true };
    await this.metadata.writeSuperblock();
    await this.metadata.writeBitmap();
    this.renegotiate('invalidate: full resync from the peer');
  }

  // ---- control commands ----

  /** This node's state as the rules (states.ts) see it. */
  private stateView(): StateView {
    const session = this.session;
    const connection = this.connectionState();
    const known = session !== null && connected(connection);
    return {
      role: this.role, disk: this.diskState(), connection,
      peerRole: known ? session.peerRole : 'Unknown', peerDisk: known ? session.peerDisk : 'DUnknown',
      allowTwoPrimaries: this.config.allowTwoPrimaries,
    };
  }

  /** A command that would change nothing here is answered with the status, as DRBD's are. */
  private alreadyThere(command: string): boolean {
    const disk = this.diskState();
    return (command === 'primary' && this.role === 'Primary') || (command === 'secondary' && this.role === 'Secondary')
      || (command === 'outdate' && disk === 'Outdated') || (command === 'detach' && disk === 'Diskless')
      || (command === 'attach' && disk !== 'Diskless');
  }

  private async handle(command: string, args: Record<string, unknown>): Promise<unknown> {
    const name = `resource ${this.config.name} on node ${this.nodeName}`;
    // The state rules first (one table for all commands, states.ts); what depends on more than the state
    // (a mounted device, the fence-peer handler, a resync's progress) is checked by the command itself.
    if ((COMMANDS as readonly string[]).includes(command)) {
      if (this.alreadyThere(command)) return this.status();
      const refused = refusal(command as Command, this.stateView(), { name, peer: this.peerName }, {
        force: args.force === true, discardMyData: args.discardMyData === true, clearBitmap: args.clearBitmap === true,
        nbdClients: this.nbd.clients.filter((client) => !client.kernel).length,
      });
      if (refused !== null) throw new Error(refused);
    }
    switch (command) {
      case 'status':
        return this.status();
      case 'down': {
        // As DRBD refuses to take down a device in use: an open export would get EIO on its next request.
        const force = args.force === true;
        const inUse = this.kernel === null ? null : deviceInUse(this.kernel.devicePath);
        if (inUse !== null && !force) throw new Error(`${name}: ${inUse}: unmount it first (the device would vanish under it), or down --force`);
        const clients = this.nbd.clients.filter((client) => !client.kernel);
        if (clients.length > 0 && !force) {
          throw new Error(`${name}: the export is open by ${clients.length} NBD client(s): `
            + `${clients.map((client) => `${client.remote} (connected ${client.since})`).join(', ')}; `
            + 'disconnect them first, or down --force (their next request fails)');
        }
        void this.down(force ? 'operator (--force)' : 'operator');
        return { ok: true };
      }
      case 'primary': {
        // The state rules ran (states.ts): what is left depends on more than the state.
        const force = args.force === true;
        const session = this.session;
        if (session !== null && session.peerRole === 'Primary' && !this.device.isShipping) {
          throw new Error(`${name}: a second Primary needs the nodes replicating (now ${this.connectionState()})`);
        }
        const disk = this.diskState();
        if (session === null && this.config.fencing === 'resource-only' && !force && this.fencedPeerDisk === null) {
          // As in DRBD: promoting without knowing the peer's disk first has fence-peer make sure the peer
          // cannot be (or become) Primary with other data.
          const exitCode = await this.fencePeer();
          if (this.currentRole() === 'Primary') return this.status(); // promoted by a concurrent request meanwhile
          if (exitCode === 6) {
            throw new Error(`${name}: the fence-peer handler says the peer ${this.peerName} is Primary (exit code 6): refusing to promote`);
          }
          if (this.fencedPeerDisk === null) {
            throw new Error(`${name}: fencing is resource-only and the peer's disk is unknown; the fence-peer handler did not `
              + `outdate it (exit code ${exitCode ?? 'none'}, see the log): promote with --force only if ${this.peerName} is known to be down`);
          }
        }
        if (force && disk !== 'UpToDate' && disk !== 'Diskless') {
          // This node's data becomes the good copy: a new generation; the peer gets a full sync.
          if (this.metadata.uuids.current === 0n) this.metadata.uuids = { current: newUuid(), bitmap: 0n, history: [0n, 0n] };
          else await this.metadata.newCurrentUuid();
          this.metadata.bitmap.setAll();
          this.metadata.flags = { ...this.metadata.flags, consistent: true, wasUpToDate: true, resyncInProgress: false, outdated: false };
        }
        this.metadata.flags = { ...this.metadata.flags, wasPrimary: true };
        this.metadata.lastPromotedMs = Date.now();
        await this.metadata.writeSuperblock();
        this.role = 'Primary';
        this.device.role = 'Primary';
        if (this.node.device !== undefined) {
          try {
            this.kernel = await attachKernelClient({
              devicePath: this.node.device, server: this.nbd, sizeBytes: this.metadata.dataSizeBytes,
              flags: transmissionFlagsFor(this.device, false, false), logger: this.logger,
            });
          } catch (error) {
            this.role = 'Secondary';
            this.device.role = 'Secondary';
            throw new Error(`${name}: promoted, but attaching ${this.node.device} failed, so demoted again: ${(error as Error).message}`);
          }
        }
        this.sendStateChange();
        if (force && disk !== 'UpToDate') this.renegotiate('primary --force');
        this.logger.info('promoted to Primary');
        return this.status();
      }
      case 'secondary': {
        const inUse = this.kernel === null ? null : deviceInUse(this.kernel.devicePath);
        if (inUse !== null) throw new Error(`${name}: ${inUse}: unmount it first, then demote`);
        if (this.kernel !== null) {
          await this.kernel.detach();
          this.kernel = null;
        }
        const clients = this.nbd.activeConnections;
        if (clients > 0) throw new Error(`${name}: the device is held open by ${clients} NBD client(s); disconnect them first`);
        this.device.role = 'Secondary';
        await this.device.flush();
        this.role = 'Secondary';
        this.metadata.flags = { ...this.metadata.flags, wasPrimary: false };
        await this.metadata.writeSuperblock();
        this.sendStateChange();
        this.logger.info('demoted to Secondary');
        return this.status();
      }
      case 'connect':
        this.discardMyData = args.discardMyData === true;
        this.link.connect();
        return this.status();
      case 'adjust':
        return this.adjust(name);
      case 'detach':
        this.detachDisk('detached by the operator');
        return this.status();
      case 'attach':
        await this.attachDisk(name);
        return this.status();
      case 'outdate': {
        // As drbdsetup outdate: marks this node's data as possibly stale, so it is not promoted by mistake (what a
        // fence-peer handler on the Primary runs here). Refused where DRBD refuses it (states.ts).
        this.metadata.flags = { ...this.metadata.flags, outdated: true };
        await this.metadata.writeSuperblock();
        this.logger.warn('data outdated by the operator');
        this.sendStateChange();
        return this.status();
      }
      case 'disconnect': {
        const session = this.session;
        if (session !== null) {
          session.connection.sendMessage(CHANNEL_META, FrameType.DISCONNECT, 'Disconnect', { reason: 'operator' });
        }
        this.link.disconnect('disconnect by the operator');
        return this.status();
      }
      case 'invalidate': {
        const session = this.requireConnected(name, 'invalidate');
        await this.invalidateLocal(session);
        return this.status();
      }
      case 'invalidate-remote': {
        const session = this.requireConnected(name, 'invalidate-remote');
        if (session.peerRole === 'Primary') throw new Error(`${name}: the peer is Primary; it cannot be invalidated`);
        if (session.target !== null || session.source !== null) throw new Error(`${name}: a resync is already running`);
        session.connection.sendMessage(CHANNEL_META, FrameType.COMMAND, 'Command', { name: 'invalidate', arg: '' });
        return this.status();
      }
      case 'new-current-uuid': {
        if (args.clearBitmap === true) {
          const session = this.requireConnected(name, 'new-current-uuid --clear-bitmap');
          if (this.metadata.uuids.current !== 0n && this.diskState() === 'UpToDate' && session.peerDisk === 'UpToDate') {
            throw new Error(`${name}: both nodes are already UpToDate`);
          }
          const uuid = newUuid();
          this.metadata.uuids = { current: uuid, bitmap: 0n, history: [0n, 0n] };
          this.metadata.flags = { ...this.metadata.flags, consistent: true, wasUpToDate: true, resyncInProgress: false, outdated: false };
          this.metadata.bitmap.clearAll();
          await this.metadata.writeSuperblock();
          await this.metadata.writeBitmap();
          session.connection.sendMessage(CHANNEL_META, FrameType.COMMAND, 'Command', { name: 'set-uuid', arg: uuid.toString() });
          this.sendStateChange();
          return this.status();
        }
        await this.metadata.newCurrentUuid();
        this.sendStateChange();
        return this.status();
      }
      case 'verify': {
        const session = this.requireConnected(name, 'verify');
        if (session.target !== null || session.source !== null || session.verify !== null) {
          throw new Error(`${name}: busy (${this.connectionState()})`);
        }
        const verify = new VerifyInitiator(this.device, session.connection, this.config.verifyAlg ?? 'xxh64', this.rate);
        session.verify = verify;
        this.lastVerify = null;
        void verify.run().then((complete) => {
          session.verify = null;
          this.logger.info({ mismatchedBytes: verify.mismatchedBytes, complete }, 'online verify finished');
          if (this.session !== session) return; // the connection went, and the result with it
          this.lastVerify = { doneBytes: verify.progress.doneBytes, totalBytes: verify.progress.totalBytes,
            outOfSyncBlocks: verify.mismatchedBytes / 4096 };
          if (complete) {
            session.connection.sendMessage(CHANNEL_META, FrameType.VERIFY_DONE, 'VerifyDone', {
              checkedBytes: BigInt(verify.progress.doneBytes), mismatchedBytes: BigInt(verify.mismatchedBytes) });
          }
          this.publish();
        }, (error: Error) => {
          // A local read failed: the verify cannot go on; the peer learns of it from the closed connection.
          session.verify = null;
          this.logger.error({ err: error }, 'online verify failed');
          if (this.session === session) session.connection.close(`online verify failed: ${error.message}`);
        });
        return this.status();
      }
      case 'resync-pause':
      case 'resync-resume': {
        const session = this.session;
        if (session === null || (session.target === null && session.source === null)) {
          throw new Error(`${name}: no resync is running (${this.connectionState()})`);
        }
        this.setPaused(session, command === 'resync-pause', true);
        return this.status();
      }
      case 'resync-rate': {
        const rate = Number(args.bytesPerSecond);
        if (!Number.isFinite(rate) || rate <= 0) throw new Error(`resync rate must be a positive number of bytes/s, got ${String(args.bytesPerSecond)}`);
        this.rate.settings = { ...this.rate.settings, maxBytesPerSecond: rate };
        this.session?.connection.sendMessage(CHANNEL_META, FrameType.COMMAND, 'Command', { name: 'resync-rate', arg: String(rate) });
        return this.status();
      }
      default:
        throw new Error(`unknown control command "${command}"`);
    }
  }

  /** The role, read anew (after an await, where TypeScript's narrowing of this.role no longer holds). */
  private currentRole(): 'Primary' | 'Secondary' {
    return this.role;
  }

  private requireConnected(name: string, what: string): Session {
    const session = this.session;
    if (session === null || session.decision === null && session.peerState === null) {
      throw new Error(`${what}: ${name} is not connected to ${this.peerName} (${this.connectionState()})`);
    }
    return session;
  }

  /** Graceful down: NBD clients finish and are flushed, the peer is told, metadata is closed clean. */
  down(why: string): Promise<void> {
    this.downPromise ??= (async () => {
      this.logger.info({ why }, 'going down');
      this.handlers.stopAll();
      if (this.kernel !== null) {
        await this.kernel.detach().catch((error: Error) => this.logger.error({ err: error }, 'kernel NBD detach failed'));
        this.kernel = null;
      }
      await this.nbd.close().catch((error: Error) => this.logger.error({ err: error }, 'NBD server close failed'));
      this.device.role = 'Secondary';
      await this.device.flush().catch(() => {});
      const session = this.session;
      if (session !== null) {
        session.connection.sendMessage(CHANNEL_META, FrameType.DISCONNECT, 'Disconnect', { reason: 'peer going down' });
        await this.device.drainPeerWrites();
      }
      await this.link.close();
      await this.control.close().catch(() => {});
      if (this.role === 'Primary') this.metadata.flags = { ...this.metadata.flags, wasPrimary: true };
      await this.local.close().catch(() => {});
      await this.metadata.close();
      this.resolveStopped();
    })();
    return this.downPromise;
  }
}

/** DRBD 9's connection state (DRBD_CSTATE): Connected whatever the replication does (SyncTarget, Ahead...). */
function drbdConnectionState(state: ConnectionState): string {
  return state === 'StandAlone' || state === 'Connecting' || state === 'Disconnecting' ? state : 'Connected';
}

/** `drbdts up`: runs until a clean down (control `down` or SIGTERM/SIGINT). */
export async function runDaemon(config: ResourceConfig, nodeName: string, logger: Logger): Promise<void> {
  const daemon = new NodeDaemon(config, nodeName, logger);
  await daemon.start();
  const onSignal = (signal: NodeJS.Signals): void => {
    void daemon.down(signal);
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  // systemd readiness and the metrics endpoint (service.ts).
  const hooks = await startServiceHooks(daemon, config, nodeName, logger).catch(async (error: unknown) => {
    await daemon.down('service hooks failed to start');
    throw error;
  });
  try {
    await daemon.stopped;
  } finally {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
    await hooks.close();
  }
}

const peerRoles: ReadonlySet<string> = new Set(['Primary', 'Secondary']);
const peerDisks: ReadonlySet<string> = new Set<DiskState>(['Diskless', 'Attaching', 'Inconsistent', 'Outdated', 'DUnknown',
  'Consistent', 'UpToDate']);

/** A peer's role and disk state are words this protocol has (a frame with others is a protocol error). */
function checkPeerState(role: string, disk: string): void {
  if (!peerRoles.has(role)) throw new Error(`the peer's role ${JSON.stringify(role)} is not Primary or Secondary`);
  if (!peerDisks.has(disk)) throw new Error(`the peer's disk state ${JSON.stringify(disk)} is not a disk state`);
}

const resyncDecisions: ReadonlySet<string> = new Set(['source', 'target', 'full-source', 'full-target']);

/**
 * The peer's bitmap comes after the handshake and before the resync it prepares: our own decision may not be made
 * yet (the peer decided first), or made and its metadata write still under way.
 */
function requireBitmapExchange(session: Session, what: string): void {
  const decision = session.decision;
  if (decision === null) return;
  if (!resyncDecisions.has(decision.kind)) throw new Error(`${what} while the sync decision is ${decision.kind}`);
  if (session.source !== null || session.target !== null) throw new Error(`${what} while the resync runs`);
}
