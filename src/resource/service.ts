// What the node daemon offers the service managers around it, started once the daemon is up (runDaemon):
//   - systemd readiness: under Type=notify (NOTIFY_SOCKET set) it reports READY=1 once the replication port,
//     NBD export and control socket listen. Node has no sd_notify, so it runs systemd-notify, which as root
//     sends the message with this process's PID as sender (NotifyAccess=main would do); the shipped unit
//     says NotifyAccess=all so that a daemon run as another user is believed too.
//   - the Prometheus endpoint ([node.NAME] metrics, src/resource/metrics.ts).
import { execFile } from 'node:child_process';
import type { Logger } from '../util/log.js';
import type { ResourceConfig } from './config.js';
import type { MetricsSource } from './metrics.js';

/** What the hooks need from a running daemon. */
export type ServiceDaemon = MetricsSource;

export interface ServiceHooks {
  close(): Promise<void>;
}

const NOTIFY_TIMEOUT_MS = 5000;

/** Sends sd_notify(3) assignments through systemd-notify; a no-op outside a Type=notify unit. */
export function sdNotify(assignments: string[], logger: Logger): Promise<void> {
  const socket = process.env.NOTIFY_SOCKET;
  if (socket === undefined || socket === '') return Promise.resolve();
  return new Promise((resolve) => {
    // --pid names the daemon as the main process even where systemd could not tell it from the sender.
    execFile('systemd-notify', [`--pid=${process.pid}`, ...assignments], { timeout: NOTIFY_TIMEOUT_MS }, (error, _stdout, stderr) => {
      // Not fatal: the daemon serves either way, and systemd's start timeout reports a readiness never sent.
      if (error !== null) logger.error({ err: error, stderr }, 'systemd-notify failed: systemd will not see this daemon ready');
      resolve();
    });
  });
}

export async function startServiceHooks(daemon: ServiceDaemon, config: ResourceConfig, nodeName: string, logger: Logger): Promise<ServiceHooks> {
  const closers: Array<() => Promise<void>> = [];
  const metricsAddress = config.nodes[nodeName]?.metrics;
  if (metricsAddress !== undefined) {
    // Loaded only when configured: prom-client is not needed by a node without the endpoint.
    const { MetricsServer } = await import('./metrics.js');
    const server = new MetricsServer(daemon, config, nodeName, logger);
    const bound = await server.listen(metricsAddress);
    closers.push(() => server.close());
    logger.info({ address: `${bound.address}:${bound.port}` }, 'serving Prometheus metrics on /metrics');
  }
  const status = daemon.status();
  await sdNotify(['--ready', `--status=${config.name} on ${nodeName}: ${status.role}, ${status.disk}, ${status.connection}`], logger);
  return {
    async close(): Promise<void> {
      for (const close of closers.reverse()) await close().catch(() => {});
      closers.length = 0;
    },
  };
}
