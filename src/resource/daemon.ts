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
import { Bitmap } from './bitmap.js';
import { peerOf, type ResourceConfig } from './config.js';
import { ControlServer, type ConnectionState, type DiskState, type ResourceStatus, type RoleState } from './control.js';
import { Metadata } from './metadata.js';
import { decideSync, formatUuid, newUuid, type SyncDecision, type SyncView } from './uuids.js';
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
} from '../replication/resync.js';

/** Bitmap frames carry at most this many bitmap bytes each. */
const BITMAP_FRAME_BYTES = 1024 * 1024;

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

  constructor(
    private readonly config: ResourceConfig,
    private readonly nodeName: string,
    private readonly logger: Logger,
  ) {
    this.peerName = peerOf(config, nodeName).name;
    this.dataPath = replicationDataPathFromEnv();
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
      });
      this.device.onFirstUnreplicatedWrite = async () => {
        // A Primary writes without its peer: a new data generation starts (DRBD's new current UUID).
        if (this.metadata.uuids.current !== 0n) {
          await this.metadata.newCurrentUuid();
          this.logger.info({ current: formatUuid(this.metadata.uuids.current) }, 'new current UUID: writing without the peer');
        }
      };
      this.device.onAheadDrained = () => this.renegotiate('send queue drained after pulling ahead');
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
      this.nbd = new NbdServer({
        device: this.device,
        description: `drbdts resource ${this.config.name} (node ${this.nodeName})`,
        logger: this.logger,
      });
      this.device.onNativeOpen = () => this.nbd.replicationOpened();
      await this.nbd.listen(parseListenAddress(node.nbd));
      this.control = new ControlServer(node.control, (command, args) => this.handle(command, args), this.logger);
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
    if (!this.metadata.flags.consistent || this.metadata.uuids.current === 0n) return 'Inconsistent';
    return 'UpToDate';
  }

  private connectionState(): ConnectionState {
    const session = this.session;
    if (session === null) return this.link.state === 'StandAlone' ? 'StandAlone' : 'Connecting';
    // Until both sides have decided, the connection is not usable yet: report it as still connecting.
    if (session.decision === null) return 'Connecting';
    const kind = session.decision.kind;
    const syncing = session.expectBitmap;
    if (session.target !== null || (syncing && (kind === 'target' || kind === 'full-target'))) {
      return session.resyncPaused ? 'PausedSyncT' : 'SyncTarget';
    }
    if (session.source !== null || (syncing && (kind === 'source' || kind === 'full-source'))) {
      return session.resyncPaused ? 'PausedSyncS' : 'SyncSource';
    }
    if (session.verify !== null) return 'VerifyS';
    if (session.verifyPeerActive) return 'VerifyT';
    // Protocol A pulled ahead of a congested peer: still connected, but writes only mark the bitmap (DRBD's Ahead).
    if (this.device.ahead) return 'Ahead';
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
      size: this.metadata.dataSizeBytes,
      role: this.role,
      disk: this.diskState(),
      connection: this.connectionState(),
      peer: {
        node: this.peerName,
        role: session?.peerRole ?? 'Unknown',
        disk: session?.peerDisk ?? 'DUnknown',
      },
      outOfSyncBytes: this.outOfSyncBytes(),
      replicationDataPath: this.dataPath,
      resync,
      verify: verify !== null
        ? { doneBytes: verify.progress.doneBytes, totalBytes: verify.progress.totalBytes,
          outOfSyncBlocks: verify.mismatchedBytes / 4096 }
        : this.lastVerify,
      protocol: this.config.protocol,
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
      lastConnectionError: this.link.lastError === null ? null
        : { message: this.link.lastError.message, at: new Date(this.link.lastError.atMs).toISOString() },
      uuids: {
        current: formatUuid(this.metadata.uuids.current),
        bitmap: formatUuid(this.metadata.uuids.bitmap),
        history: [formatUuid(this.metadata.uuids.history[0]), formatUuid(this.metadata.uuids.history[1])],
      },
    };
  }

  // ---- connection ----

  /**
   * The daemon's part of the native plane's conditions: connected, the sync decision made and no resync, bitmap
   * exchange or verify running (their I/O orders itself through the gate, which the plane bypasses).
   */
  private nativeAllowed(): boolean {
    const session = this.session;
    return session !== null && session.decision !== null && !session.expectBitmap && session.source === null
      && session.target === null && session.verify === null && !session.verifyPeerActive;
  }

  private onConnected(connection: PeerConnection): void {
    const session: Session = {
      connection, localStateSent: false, peerState: null, decision: null, peerBitmap: null,
      peerBitmapComplete: false, expectBitmap: false, source: null, target: null, verify: null,
      verifyPeerActive: false, peerRole: 'Unknown', peerDisk: 'DUnknown',
      peerUuids: { current: 0n, bitmap: 0n, history: [0n, 0n] }, resyncPaused: false, syncUuidRecorded: false,
    };
    this.session = session;
    // With allow-two-primaries, overlapping writes from both sides are resolved by the connecting node.
    this.device.attach(connection, { dualPrimary: this.config.allowTwoPrimaries, resolver: this.link.side === 'connector' });
    // Our state goes out before queued peer frames are handled, so the peer's NODE_STATE is taken as its
    // half of this exchange rather than as a request to answer.
    this.sendNodeState(session);
    connection.start((channel, type, flags, id, offset, body) => {
      try {
        this.onFrame(session, channel, type, flags, id, offset, body);
      } catch (error) {
        this.logger.error({ err: error }, 'peer frame handling failed');
        connection.close(`protocol error: ${(error as Error).message}`);
      }
    });
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
    this.logger.warn({ reason, outOfSyncBytes: this.metadata.bitmap.dirtyBytes() }, 'peer disconnected');
    this.metadata.writeBitmap().catch((error: Error) => this.logger.error({ err: error }, 'bitmap write-back failed'));
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
    });
  }

  private sendStateChange(): void {
    const session = this.session;
    if (session === null) return;
    session.connection.sendMessage(CHANNEL_META, FrameType.STATE_CHANGE, 'StateChange', {
      role: this.role, disk: this.diskState(), currentUuid: this.metadata.uuids.current,
      bitmapUuid: this.metadata.uuids.bitmap, historyUuids: [...this.metadata.uuids.history],
    });
  }

  /** Re-runs the connect-time decision on the live connection (operator actions, pull-ahead drained). */
  private renegotiate(why: string): void {
    const session = this.session;
    if (session === null) return;
    this.logger.info({ why }, 'renegotiating with the peer');
    session.decision = null;
    session.peerState = null;
    this.sendNodeState(session);
  }

  private onFrame(session: Session, channel: number, type: number, flags: number, id: number, offset: number,
    body: Buffer): void {
    if (this.session !== session) return;
    if (this.device.handleFrame(channel, type, flags, id, offset, body)) return;
    const connection = session.connection;
    switch (type) {
      case FrameType.NODE_STATE: {
        const state = decodeMessage<NodeStateMessage>(Messages.NodeState, body);
        if (!session.localStateSent) this.sendNodeState(session);
        session.localStateSent = false;
        session.peerState = state;
        session.peerRole = state.role === 'Primary' ? 'Primary' : 'Secondary';
        session.peerDisk = state.disk as DiskState;
        session.peerUuids = { current: state.currentUuid, bitmap: state.bitmapUuid,
          history: [state.historyUuids[0] ?? 0n, state.historyUuids[1] ?? 0n] };
        void this.decide(session, state).catch((error: Error) => {
          this.logger.error({ err: error }, 'sync decision failed');
          connection.close(`sync decision failed: ${error.message}`);
        });
        return;
      }
      case FrameType.STATE_CHANGE: {
        const change = decodeMessage<StateChangeMessage>(Messages.StateChange, body);
        session.peerRole = change.role === 'Primary' ? 'Primary' : 'Secondary';
        session.peerDisk = change.disk as DiskState;
        if (session.peerRole === 'Primary' && this.role === 'Primary' && !this.config.allowTwoPrimaries) {
          // Both promoted at the same moment, each seeing the other Secondary. Without conflict handling the
          // replicas could diverge under crossing writes: drop the link; the reconnect sees the split brain.
          this.logger.error('the peer became Primary while this node is Primary and allow-two-primaries is off');
          connection.close('both nodes are Primary and allow-two-primaries is off');
          return;
        }
        session.peerUuids = { current: change.currentUuid, bitmap: change.bitmapUuid,
          history: [change.historyUuids[0] ?? 0n, change.historyUuids[1] ?? 0n] };
        return;
      }
      case FrameType.BITMAP: {
        if (session.peerBitmap === null) session.peerBitmap = Buffer.alloc(this.metadata.bitmap.byteLength);
        if (offset + body.length > session.peerBitmap.length) throw new Error('peer bitmap larger than ours');
        body.copy(session.peerBitmap, offset);
        return;
      }
      case FrameType.BITMAP_END:
        session.peerBitmap ??= Buffer.alloc(this.metadata.bitmap.byteLength);
        session.peerBitmapComplete = true;
        this.maybeStartResync(session);
        return;
      case FrameType.RS_REQUEST:
        session.source ??= this.makeSource(session);
        session.source.handleRequest(flags, id, offset, body);
        return;
      case FrameType.RS_REPLY:
        session.target?.handleReply(flags, id, offset, body);
        return;
      case FrameType.RS_ACK:
        session.source?.handleAck(id, offset);
        return;
      case FrameType.RESYNC_START: {
        const start = decodeMessage<{ syncUuid: bigint }>(Messages.ResyncStart, body);
        void this.metadata.beginSyncTarget(start.syncUuid).then(() => {
          if (this.session !== session) return;
          session.syncUuidRecorded = true;
          this.maybeStartResync(session);
        }, (error: Error) => {
          this.logger.error({ err: error }, 'recording the sync UUID failed');
          connection.close(`metadata write failed: ${error.message}`);
        });
        return;
      }
      case FrameType.RESYNC_DONE:
        void this.finishAsSource(session);
        return;
      case FrameType.OV_REQUEST:
        session.verifyPeerActive = true;
        answerVerify(this.device, connection, this.config.verifyAlg ?? 'xxh64', id, offset, body);
        return;
      case FrameType.OV_REPLY:
        session.verify?.handleReply(flags, id, offset);
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
        void this.peerCommand(session, command.name, command.arg).catch((error: Error) =>
          this.logger.error({ err: error, command: command.name }, 'peer command failed'));
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
    if (this.role === 'Primary' && peer.role === 'Primary' && !this.config.allowTwoPrimaries) {
      this.refuse(session, 'both nodes are Primary and allow-two-primaries is off: demote one');
      return;
    }
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
    session.decision = decision;
    this.logger.info({ decision: decision.kind, reason: decision.reason }, 'sync decision');
    switch (decision.kind) {
      case 'none':
        this.device.startShipping();
        this.discardMyData = false;
        if (this.metadata.uuids.bitmap !== 0n) await this.metadata.clearBitmapUuid();
        return;
      case 'wait-for-operator':
        // A fresh pair: connected, both Inconsistent; writes (after primary --force) replicate.
        this.device.startShipping();
        return;
      case 'split-brain':
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
    );
  }

  private async finishAsTarget(session: Session): Promise<void> {
    if (this.session !== session) return;
    const total = session.target?.progress.doneBytes ?? 0;
    await this.metadata.adoptUuids(session.peerUuids);
    this.metadata.flags = { ...this.metadata.flags, consistent: true, wasUpToDate: true, resyncInProgress: false,
      crashedPrimary: false };
    await this.metadata.writeSuperblock();
    session.target = null;
    session.connection.sendMessage(CHANNEL_META, FrameType.RESYNC_DONE, 'ResyncDone', { bytes: BigInt(total) });
    this.sendStateChange();
    this.logger.info({ bytes: total, received: this.device.counters.resyncReceivedBytes }, 'resync finished: UpToDate');
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
        // new-current-uuid --clear-bitmap from the peer: both sides start the same generation, no sync.
        const uuid = BigInt(arg);
        this.metadata.uuids = { current: uuid, bitmap: 0n, history: [0n, 0n] };
        this.metadata.flags = { ...this.metadata.flags, consistent: true, wasUpToDate: true, resyncInProgress: false };
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
      case 'resync-rate':
        this.rate.settings = { ...this.rate.settings, maxBytesPerSecond: Number(arg) };
        return;
      default:
        this.logger.warn({ name }, 'unknown command from the peer');
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

  private async handle(command: string, args: Record<string, unknown>): Promise<unknown> {
    const name = `resource ${this.config.name} on node ${this.nodeName}`;
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
        const force = args.force === true;
        if (this.role === 'Primary') return this.status();
        const session = this.session;
        if (session !== null && session.peerRole === 'Primary') {
          if (!this.config.allowTwoPrimaries) {
            throw new Error(`${name}: the peer ${this.peerName} is Primary; demote it first (allow-two-primaries is off)`);
          }
          // Dual-primary: only a node with the same data as the Primary peer, replicating to it, may join it.
          if (force) throw new Error(`${name}: the peer ${this.peerName} is Primary: --force would discard the data it serves`);
          if (this.connectionState() !== 'Connected' || this.diskState() !== 'UpToDate' || session.peerDisk !== 'UpToDate'
            || !this.device.isShipping) {
            throw new Error(`${name}: a second Primary needs both disks UpToDate and the nodes Connected `
              + `(now ${this.connectionState()}, ${this.diskState()}/${session.peerDisk})`);
          }
        }
        if (session?.target != null) {
          throw new Error(`${name} is SyncTarget (resync ${this.status().resync?.doneBytes ?? 0} bytes done): wait for the resync to finish`);
        }
        const disk = this.diskState();
        if (disk !== 'UpToDate' && disk !== 'Consistent' && !force) {
          throw new Error(`${name} is ${disk}: refusing to promote (use --force only if this node's data is the good copy)`);
        }
        if (force && disk !== 'UpToDate') {
          // This node's data becomes the good copy: a new generation; the peer gets a full sync.
          if (this.metadata.uuids.current === 0n) this.metadata.uuids = { current: newUuid(), bitmap: 0n, history: [0n, 0n] };
          else await this.metadata.newCurrentUuid();
          this.metadata.bitmap.setAll();
          this.metadata.flags = { ...this.metadata.flags, consistent: true, wasUpToDate: true, resyncInProgress: false };
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
        if (this.role === 'Secondary') return this.status();
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
        if (this.link.state !== 'StandAlone') throw new Error(`${name} is already ${this.connectionState()}`);
        this.discardMyData = args.discardMyData === true;
        if (this.discardMyData && this.role === 'Primary') {
          this.discardMyData = false;
          throw new Error(`${name}: --discard-my-data on a Primary is refused; demote it first`);
        }
        this.link.connect();
        return this.status();
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
          this.metadata.flags = { ...this.metadata.flags, consistent: true, wasUpToDate: true, resyncInProgress: false };
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
        void verify.run().then((complete) => {
          session.verify = null;
          this.lastVerify = { doneBytes: verify.progress.doneBytes, totalBytes: verify.progress.totalBytes,
            outOfSyncBlocks: verify.mismatchedBytes / 4096 };
          if (complete && this.session === session) {
            session.connection.sendMessage(CHANNEL_META, FrameType.VERIFY_DONE, 'VerifyDone', {
              checkedBytes: BigInt(verify.progress.doneBytes), mismatchedBytes: BigInt(verify.mismatchedBytes) });
          }
          this.logger.info({ mismatchedBytes: verify.mismatchedBytes, complete }, 'online verify finished');
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

/** `drbdts up`: runs until a clean down (control `down` or SIGTERM/SIGINT). */
export async function runDaemon(config: ResourceConfig, nodeName: string, logger: Logger): Promise<void> {
  const daemon = new NodeDaemon(config, nodeName, logger);
  await daemon.start();
  const onSignal = (signal: NodeJS.Signals): void => {
    void daemon.down(signal);
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  try {
    await daemon.stopped;
  } finally {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
  }
}
