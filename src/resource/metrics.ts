// The node daemon's Prometheus endpoint ([node.NAME] metrics = "HOST:PORT"): GET /metrics in the text exposition
// format, rendered by prom-client from one status() snapshot per scrape. Names follow drbd-reactor's prometheus
// plugin where it has the figure (so its dashboards and alerts work unchanged), with its label sets (name,
// conn_name, peer_node_id, volume) and its enum style (one series per state, 1 for the current one). What DRBD
// has no metric for carries drbdts's own prefix: peer role and disk, resync progress, NBD clients.
//
// Units as drbd-reactor's: bytes (DRBD's KiB multiplied out), counters suffixed _total or _bytes as there.
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import type { Logger } from '../util/log.js';
import type { HostPort, ResourceConfig } from './config.js';
import type { ConnectionState, DiskState, ResourceStatus, RoleState } from './control.js';

const ROLES: readonly RoleState[] = ['Primary', 'Secondary', 'Unknown'];
const CONNECTION_STATES: readonly ConnectionState[] = [
  'StandAlone', 'Disconnecting', 'Connecting', 'Connected', 'SyncSource', 'SyncTarget', 'PausedSyncS', 'PausedSyncT',
  'VerifyS', 'VerifyT', 'Ahead',
];
const DISK_STATES: readonly DiskState[] = ['Diskless', 'Attaching', 'Inconsistent', 'Outdated', 'DUnknown', 'Consistent', 'UpToDate'];

/** What the endpoint reads from a running daemon. */
export interface MetricsSource {
  status(): ResourceStatus;
  /** NBD figures the status object does not carry. */
  exportCounters(): { clients: number; nativeRequests: number };
}

/**
 * Promotion score as Pacemaker's DRBD agent computes it (contrib/ocf/drbdts does the same): 10000 for an
 * UpToDate disk whose peer's state is known, 1000 for UpToDate with the peer unknown, 10 when only the peer is
 * UpToDate, 0 otherwise.
 */
export function promotionScore(status: ResourceStatus): number {
  if (status.disk === 'UpToDate') return status.peer.disk === 'DUnknown' ? 1000 : 10000;
  if (status.peer.disk === 'UpToDate') return 10;
  return 0;
}

/** May this node become Primary now: UpToDate, not syncing, and no Primary peer (unless two are allowed). */
export function mayPromote(status: ResourceStatus, allowTwoPrimaries: boolean): boolean {
  if (status.role === 'Primary') return false;
  if (status.disk !== 'UpToDate') return false;
  if (status.connection === 'SyncTarget' || status.connection === 'PausedSyncT') return false;
  return status.peer.role !== 'Primary' || allowTwoPrimaries;
}

export class MetricsServer {
  readonly #registry = new Registry();
  readonly #server: http.Server;
  #snapshot: { status: ResourceStatus; nbd: { clients: number; nativeRequests: number } } | null = null;

  constructor(private readonly source: MetricsSource, private readonly config: ResourceConfig, nodeName: string,
    private readonly logger: Logger) {
    const peerNames = Object.keys(config.nodes);
    const peerName = peerNames.find((node) => node !== nodeName)!;
    // DRBD numbers nodes; drbdts's are numbered by their order in the configuration file, the same on both.
    const resource = { name: config.name };
    const connection = { ...resource, conn_name: peerName, peer_node_id: String(peerNames.indexOf(peerName)) };
    const peerDevice = { ...connection, volume: '0' };
    const device = { ...resource, volume: '0' };
    collectDefaultMetrics({ register: this.#registry, prefix: 'drbdts_' });

    const snapshot = () => {
      assert.ok(this.#snapshot !== null, 'metrics collected outside a scrape');
      return this.#snapshot;
    };
    const gauge = (name: string, help: string, labels: Record<string, string>, value: (s: ReturnType<typeof snapshot>) => number) =>
      new Gauge({ name, help, labelNames: Object.keys(labels), registers: [this.#registry],
        collect() { this.set(labels, value(snapshot())); } });
    const counter = (name: string, help: string, labels: Record<string, string>, value: (s: ReturnType<typeof snapshot>) => number) =>
      new Counter({ name, help, labelNames: Object.keys(labels), registers: [this.#registry],
        collect() { this.reset(); this.inc(labels, Math.max(0, value(snapshot()))); } });
    /** drbd-reactor's enum style: one series per state, labelled with the metric's own name, 1 for the current. */
    const enumGauge = <T extends string>(name: string, help: string, labels: Record<string, string>,
      states: readonly T[], current: (s: ReturnType<typeof snapshot>) => T) =>
      new Gauge({ name, help, labelNames: [...Object.keys(labels), name], registers: [this.#registry],
        collect() {
          const now = current(snapshot());
          for (const state of states) this.set({ ...labels, [name]: state }, state === now ? 1 : 0);
        } });

    // drbd-reactor's names.
    gauge('drbd_resource_resources', 'Number of resources', {}, () => 1);
    enumGauge('drbd_resource_role', 'DRBD role of the resource', resource, ROLES, (s) => s.status.role);
    gauge('drbd_resource_suspended', 'Boolean whether the resource is suspended (drbdts never suspends I/O)', resource, () => 0);
    gauge('drbd_resource_maypromote', 'Boolean whether the resource may be promoted to Primary', resource,
      (s) => Number(mayPromote(s.status, config.allowTwoPrimaries)));
    gauge('drbd_resource_promotionscore', 'The promotion score (higher is better) for the resource', resource,
      (s) => promotionScore(s.status));
    enumGauge('drbd_connection_state', 'DRBD connection state', connection, CONNECTION_STATES, (s) => s.status.connection);
    gauge('drbd_peerdevice_outofsync_bytes',
      'Number of bytes currently out of sync with this peer, according to the bitmap that DRBD has for it', peerDevice,
      (s) => s.status.outOfSyncBytes);
    counter('drbd_peerdevice_sent_bytes', 'Number of bytes sent to this peer (replication link, frames included)', peerDevice,
      (s) => s.status.counters.networkSentBytes);
    counter('drbd_peerdevice_received_bytes', 'Number of bytes received from this peer (replication link, frames included)',
      peerDevice, (s) => s.status.counters.networkReceivedBytes);
    enumGauge('drbd_device_state', 'DRBD device state', device, DISK_STATES, (s) => s.status.disk);
    gauge('drbd_device_size_bytes', 'Device size in bytes', device, (s) => s.status.size);
    gauge('drbd_device_open', 'Boolean if this device is opened (an NBD client is connected)', device, (s) => Number(s.nbd.clients > 0));
    counter('drbd_device_read_bytes_total', 'Net data read from local hard disk', device, (s) => s.status.counters.diskReadBytes);
    counter('drbd_device_written_bytes_total', 'Net data written on local disk', device, (s) => s.status.counters.diskWrittenBytes);
    counter('drbd_device_alwrites_total', 'Number of updates of the activity log area of the meta data', device,
      (s) => s.status.counters.alWrites);
    counter('drbd_device_bmwrites_total', 'Number of updates of the bitmap area of the meta data', device,
      (s) => s.status.counters.bmWrites);
    gauge('drbd_device_lowerpending', 'Number of open requests to the local I/O sub-system issued by DRBD', device,
      (s) => s.status.pending);

    // drbdts's own.
    enumGauge('drbdts_peer_role', 'Role of the peer node as last reported by it', connection, ROLES, (s) => s.status.peer.role);
    enumGauge('drbdts_peerdevice_disk_state', 'Disk state of the peer node as last reported by it', peerDevice, DISK_STATES,
      (s) => s.status.peer.disk);
    gauge('drbdts_connection_unacked_requests', 'Replicated writes sent to the peer and not yet acknowledged', connection,
      (s) => s.status.unacked);
    gauge('drbdts_resync_active', 'Boolean whether a resync runs (on either side)', peerDevice, (s) => Number(s.status.resync !== null));
    gauge('drbdts_resync_done_bytes', 'Bytes resynced in the running resync (0 when none runs)', peerDevice,
      (s) => s.status.resync?.doneBytes ?? 0);
    gauge('drbdts_resync_total_bytes', 'Bytes the running resync covers in all (0 when none runs)', peerDevice,
      (s) => s.status.resync?.totalBytes ?? 0);
    gauge('drbdts_resync_rate_bytes_per_second', 'Current rate of the running resync', peerDevice,
      (s) => s.status.resync?.bytesPerSecond ?? 0);
    counter('drbdts_resync_sent_bytes_total', 'Resync bytes sent to the peer (frames included)', peerDevice,
      (s) => s.status.counters.resyncSentBytes);
    counter('drbdts_resync_received_bytes_total', 'Resync bytes received from the peer', peerDevice,
      (s) => s.status.counters.resyncReceivedBytes);
    gauge('drbdts_nbd_clients', 'NBD clients connected to the export', device, (s) => s.nbd.clients);
    counter('drbdts_nbd_native_requests_total', 'NBD requests served on the native data path', device, (s) => s.nbd.nativeRequests);

    this.#server = http.createServer((request, response) => {
      void this.#answer(request, response);
    });
  }

  async #answer(request: http.IncomingMessage, response: http.ServerResponse): Promise<void> {
    const url = (request.url ?? '/').split('?')[0];
    if (request.method !== 'GET' && request.method !== 'HEAD') {
      response.writeHead(405, { allow: 'GET, HEAD' }).end();
      return;
    }
    if (url !== '/metrics') {
      response.writeHead(404, { 'content-type': 'text/plain' }).end(`drbdts serves /metrics only\n`);
      return;
    }
    try {
      this.#snapshot = { status: this.source.status(), nbd: this.source.exportCounters() };
      const text = await this.#registry.metrics();
      response.writeHead(200, { 'content-type': this.#registry.contentType }).end(request.method === 'HEAD' ? undefined : text);
    } catch (error) {
      this.logger.error({ err: error }, 'metrics: rendering failed');
      response.writeHead(500, { 'content-type': 'text/plain' }).end(`${(error as Error).message}\n`);
    }
  }

  listen(address: HostPort): Promise<AddressInfo> {
    return new Promise((resolve, reject) => {
      const onError = (error: Error): void => {
        reject(new Error(`${this.config.fileName}: metrics: cannot listen on ${address.host}:${address.port}: ${error.message}`));
      };
      this.#server.once('error', onError);
      this.#server.listen(address.port, address.host, () => {
        this.#server.off('error', onError);
        resolve(this.#server.address() as AddressInfo);
      });
    });
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.#server.close(() => resolve());
      this.#server.closeAllConnections();
    });
  }
}
