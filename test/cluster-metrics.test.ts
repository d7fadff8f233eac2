// Proves the node daemon's Prometheus endpoint with a real Prometheus server (Debian's `prometheus`): two daemons
// of a pair each serve /metrics on loopback ([node.NAME] metrics), Prometheus scrapes both every second into its
// own storage in the test's temp dir, and the test asks Prometheus's HTTP API, as a dashboard or an alert
// would, for drbd-reactor's metric names: alice Primary and bob Secondary, both Connected; with bob killed,
// alice's out-of-sync bytes grow by what it writes; once bob is back they resync to 0; alice killed and bob
// promoted, Prometheus sees bob's role turn Primary and alice's target down. The metrics key is validated like
// every other (errors name file and key), and the endpoint itself is checked for the text format.
import { spawn, type ChildProcess } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { parseResourceConfig } from '../src/resource/config.js';
import { Cluster, run, type NodeName } from './replication-cluster.js';
import { freePort, waitFor } from './replication-helpers.js';

let cluster: Cluster | null = null;
let prometheus: ChildProcess | null = null;

afterEach(async () => {
  if (prometheus !== null && prometheus.exitCode === null) {
    const exited = new Promise((resolve) => prometheus!.once('exit', resolve));
    prometheus.kill('SIGKILL');
    await exited;
  }
  prometheus = null;
  await cluster?.teardown();
  cluster = null;
});

interface Sample { metric: Record<string, string>; value: [number, string] }

async function query(port: number, promql: string): Promise<Sample[]> {
  const response = await fetch(`http://127.0.0.1:${port}/api/v1/query?query=${encodeURIComponent(promql)}`);
  const body = await response.json() as { status: string; data: { result: Sample[] }; error?: string };
  if (body.status !== 'success') throw new Error(`prometheus query ${promql}: ${body.error}`);
  return body.data.result;
}

/** The value of a query that names one series (by instance), or null while Prometheus has none. */
async function valueOf(port: number, promql: string): Promise<number | null> {
  const result = await query(port, promql);
  if (result.length > 1) throw new Error(`${promql} matched ${result.length} series`);
  return result.length === 0 ? null : Number(result[0]!.value[1]);
}

async function waitQuery(port: number, what: string, promql: string, predicate: (value: number | null) => boolean): Promise<number | null> {
  let last: number | null = null;
  try {
    await waitFor(what, async () => predicate(last = await valueOf(port, promql)), 30_000, 250);
  } catch (error) {
    throw new Error(`${(error as Error).message}: ${promql} is ${last}`);
  }
  return last;
}

describe('Prometheus metrics', () => {
  it('validates [node.NAME] metrics as HOST:PORT, naming file and key', () => {
    const base = (metrics: string) => `[resource]\nname = "r0"\nshared-secret = "s"\n`
      + `[node.a]\naddress = "127.0.0.1:1"\ndisk = "/d/a"\nnbd = "unix:/r/a"\n${metrics}\n`
      + `[node.b]\naddress = "127.0.0.1:2"\ndisk = "/d/b"\nnbd = "unix:/r/b"\n`;
    expect(parseResourceConfig(base('metrics = "127.0.0.1:9942"'), '/etc/drbdts/r0.toml').nodes.a!.metrics)
      .toEqual({ host: '127.0.0.1', port: 9942 });
    expect(parseResourceConfig(base(''), '/etc/drbdts/r0.toml').nodes.a!.metrics).toBeUndefined();
    expect(() => parseResourceConfig(base('metrics = "9942"'), '/etc/drbdts/r0.toml'))
      .toThrow('/etc/drbdts/r0.toml: node.a.metrics: "9942" is not HOST:PORT');
    expect(() => parseResourceConfig(base('metrics = 9942'), '/etc/drbdts/r0.toml'))
      .toThrow('/etc/drbdts/r0.toml: node.a.metrics: must be a string, got 9942');
  });

  it('a real Prometheus sees roles, connection states, out-of-sync bytes and a failover', async () => {
    cluster = new Cluster({ sizeMiB: 16 });
    const c = cluster;
    await c.setup();
    const metricsPorts: Record<NodeName, number> = { alice: await freePort(), bob: await freePort() };
    for (const file of [c.configPath('alice'), c.configPath('bob')]) {
      let text = await readFile(file, 'utf8');
      for (const node of ['alice', 'bob'] as const) {
        text = text.replace(`control = "${c.dir}/${node}.ctl"`, `control = "${c.dir}/${node}.ctl"\nmetrics = "127.0.0.1:${metricsPorts[node]}"`);
      }
      await writeFile(file, text);
    }
    await c.startPrimaryAlice();

    // The endpoint itself: text exposition format, drbd-reactor's enum style.
    const scraped = await fetch(`http://127.0.0.1:${metricsPorts.alice}/metrics`);
    expect(scraped.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    const text = await scraped.text();
    expect(text).toContain('# TYPE drbd_resource_role gauge');
    expect(text).toContain('drbd_resource_role{name="r0",drbd_resource_role="Primary"} 1');
    expect(text).toContain('drbd_connection_state{name="r0",conn_name="bob",peer_node_id="1",drbd_connection_state="Connected"} 1');
    expect(text).toMatch(/^drbd_device_read_bytes_total\{name="r0",volume="0"\} [1-9]\d*$/m); // the initial sync read it all
    expect((await fetch(`http://127.0.0.1:${metricsPorts.alice}/other`)).status).toBe(404);

    const promPort = await freePort();
    const promConfig = path.join(c.dir, 'prometheus.yml');
    await writeFile(promConfig, `global:
  scrape_interval: 1s
  scrape_timeout: 900ms
scrape_configs:
  - job_name: drbdts
    static_configs:
      - targets: ['127.0.0.1:${metricsPorts.alice}']
        labels: { node: alice }
      - targets: ['127.0.0.1:${metricsPorts.bob}']
        labels: { node: bob }
`);
    let promLog = '';
    prometheus = spawn('prometheus', [`--config.file=${promConfig}`, `--storage.tsdb.path=${path.join(c.dir, 'tsdb')}`,
      `--web.listen-address=127.0.0.1:${promPort}`], { cwd: c.dir, stdio: ['ignore', 'pipe', 'pipe'] });
    prometheus.stdout!.on('data', (chunk) => (promLog += chunk));
    prometheus.stderr!.on('data', (chunk) => (promLog += chunk));
    try {
      await waitFor('prometheus ready', async () => {
        if (prometheus!.exitCode !== null) throw new Error(`prometheus exited ${prometheus!.exitCode}`);
        return (await fetch(`http://127.0.0.1:${promPort}/-/ready`).catch(() => null))?.status === 200;
      }, 60_000, 250);
    } catch (error) {
      throw new Error(`${(error as Error).message}\n${promLog}`);
    }

    const role = (node: NodeName, value: string) => `drbd_resource_role{node="${node}",drbd_resource_role="${value}"}`;
    const oos = 'drbd_peerdevice_outofsync_bytes{node="alice"}';
    await waitQuery(promPort, 'alice Primary', role('alice', 'Primary'), (v) => v === 1);
    await waitQuery(promPort, 'bob Secondary', role('bob', 'Secondary'), (v) => v === 1);
    expect(await valueOf(promPort, role('bob', 'Primary'))).toBe(0);
    await waitQuery(promPort, 'bob Connected', 'drbd_connection_state{node="bob",drbd_connection_state="Connected"}', (v) => v === 1);
    expect(await valueOf(promPort, oos)).toBe(0);
    expect(await valueOf(promPort, 'drbdts_peerdevice_disk_state{node="alice",drbdts_peerdevice_disk_state="UpToDate"}')).toBe(1);

    // The peer down: alice's writes go into its bitmap, and Prometheus sees the out-of-sync bytes grow.
    c.kill('bob');
    await waitQuery(promPort, 'bob\'s target down', 'up{node="bob"}', (v) => v === 0);
    await waitQuery(promPort, 'alice no longer Connected', 'drbd_connection_state{node="alice",drbd_connection_state="Connected"}', (v) => v === 0);
    const write = async (offset: string) => {
      const result = await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a ${offset} 1M`, c.nbdUri('alice')]);
      expect(result.code, result.stderr).toBe(0);
    };
    await write('0');
    const first = await waitQuery(promPort, 'out-of-sync bytes after 1 MiB', oos, (v) => v !== null && v >= 1024 * 1024);
    await write('8M');
    await waitQuery(promPort, 'out-of-sync bytes growing', oos, (v) => v !== null && v >= first! + 1024 * 1024);
    await waitQuery(promPort, 'alice\'s peer disk unknown', 'drbdts_peerdevice_disk_state{node="alice",drbdts_peerdevice_disk_state="DUnknown"}', (v) => v === 1);

    // bob back: the resync brings alice's out-of-sync bytes back to 0.
    await c.start('bob');
    await waitQuery(promPort, 'resynced', oos, (v) => v === 0);
    await waitQuery(promPort, 'bob UpToDate', 'drbd_device_state{node="bob",drbd_device_state="UpToDate"}', (v) => v === 1);
    // bob's own scrape may predate the resync (his metadata said UpToDate from the start): wait for one after it.
    await waitQuery(promPort, 'bob received the resync', 'drbd_peerdevice_received_bytes{node="bob"}', (v) => v !== null && v > 0);

    // Failover: the Primary dies, bob is promoted; Prometheus sees bob's role change and alice's target gone.
    c.kill('alice');
    await c.waitState('bob', 'peer lost', (s) => s.connection !== 'Connected');
    const promoted = await c.cli('bob', 'primary');
    expect(promoted.code, promoted.stderr).toBe(0);
    await waitQuery(promPort, 'bob Primary', role('bob', 'Primary'), (v) => v === 1);
    expect(await valueOf(promPort, role('bob', 'Secondary'))).toBe(0);
    await waitQuery(promPort, 'alice\'s target down', 'up{node="alice"}', (v) => v === 0);
    // What Prometheus stored: bob was Secondary for the first part of the run, Primary now.
    expect(await valueOf(promPort, `min_over_time(${role('bob', 'Primary')}[5m])`)).toBe(0);
    expect(await valueOf(promPort, `max_over_time(${role('alice', 'Primary')}[5m])`)).toBe(1);
  });
});
