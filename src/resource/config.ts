// A resource's TOML configuration: parsed with smol-toml, then validated key by key so that every error names
// the file, the key and what is wrong with it. The file is identical on both nodes; each node finds its own
// [node.NAME] section through --node, $DRBDTS_NODE or the host name. The key vocabulary follows drbd.conf(5)
// where DRBD has a name for the thing (protocol, after-sb-0pri, on-congestion, al-extents, ping-timeout...).
import { readdirSync, readFileSync } from 'node:fs';
import os from 'node:os';
import { parse as parseToml } from 'smol-toml';
import { parseSize } from '../util/size.js';
import type { AfterSb0Pri, AfterSb1Pri, AfterSb2Pri } from '../metadata/uuids.js';

export type { AfterSb0Pri, AfterSb1Pri, AfterSb2Pri };

export type Protocol = 'A' | 'B' | 'C';
export type OnCongestion = 'block' | 'pull-ahead';

export interface HostPort {
  host: string;
  port: number;
}

export interface NodeConfig {
  name: string;
  /** Replication link: this node listens here; its peer connects here. */
  address: HostPort;
  disk: string;
  metaDisk: 'internal' | string;
  /** NBD export: 'unix:PATH' or 'HOST:PORT'. */
  nbd: string;
  /** Kernel NBD device to attach (/dev/nbdN), when set. */
  device?: string;
  /** Control socket path. */
  control: string;
  /** DRBD's node-id: `node-id` in the node's section, else its position in the file (0, 1). */
  nodeId: number;
  /** Prometheus endpoint (GET /metrics), when set. */
  metrics?: HostPort;
}

export interface ResourceConfig {
  fileName: string;
  name: string;
  protocol: Protocol;
  sharedSecret: string;
  sizeBytes?: number;
  onCongestion: OnCongestion;
  allowTwoPrimaries: boolean;
  afterSb0pri: AfterSb0Pri;
  afterSb1pri: AfterSb1Pri;
  afterSb2pri: AfterSb2Pri;
  resyncRateMaxBytesPerSecond: number;
  resyncRateMinBytesPerSecond: number;
  pingIntervalMs: number;
  pingTimeoutMs: number;
  connectRetryMs: number;
  sendQueueMaxBytes: number;
  maxInFlightWrites: number;
  csumsAlg?: string;
  verifyAlg?: string;
  alExtents: number;
  /** [disk] on-io-error: pass_on returns a local EIO to the caller; detach makes the node Diskless, served by the peer. */
  onIoError: OnIoError;
  /** DRBD's device minor: `[resource] minor`, else resourceMinor() works it out. */
  minor?: number;
  /** [net] fencing: what a Primary does when it loses its peer (the fence-peer handler). */
  fencing: Fencing;
  /** [handlers]: shell commands by DRBD handler name, and how long each may run. */
  handlers: Partial<Record<HandlerName, string>>;
  handlerTimeoutMs: number;
  /** DRBD 9's auto-promote: an NBD client of a Secondary promotes it; the last one leaving demotes it. */
  autoPromote: boolean;
  nodes: Record<string, NodeConfig>;
}

export type Fencing = 'dont-care' | 'resource-only';
export const HANDLER_NAMES = ['split-brain', 'fence-peer', 'before-resync-target', 'after-resync-target',
  'local-io-error'] as const;
export type HandlerName = (typeof HANDLER_NAMES)[number];

export type OnIoError = 'pass_on' | 'detach';

export class ConfigError extends Error {
  readonly file: string;
  readonly key: string | undefined;
  constructor(file: string, key: string | undefined, problem: string) {
    super(key === undefined ? `${file}: ${problem}` : `${file}: ${key}: ${problem}`);
    this.name = 'ConfigError';
    this.file = file;
    this.key = key;
  }
}

export const DEFAULT_CONFIG_DIR = '/etc/drbdts';
export const DEFAULT_RUN_DIR = '/run/drbdts';

export function defaultConfigPath(resource: string): string {
  return `${DEFAULT_CONFIG_DIR}/${resource}.toml`;
}

const UNIX_PATH_MAX_BYTES = 107;
const AL_EXTENTS_MIN = 16; // activity-log.ts AL_EXTENTS_MIN: a 32 MiB request spans 9 extents
const AL_EXTENTS_MAX = 65534;

// Every key each section accepts: a typo ("protcol") is an error, not a silently ignored line.
const resourceKeys = new Set(['name', 'protocol', 'shared-secret', 'minor', 'auto-promote']);
const diskKeys = new Set(['size', 'al-extents', 'on-io-error']);
const netKeys = new Set([
  'protocol', 'shared-secret', 'on-congestion', 'allow-two-primaries', 'after-sb-0pri', 'after-sb-1pri',
  'after-sb-2pri', 'ping-interval', 'ping-timeout', 'connect-int', 'max-buffers', 'max-in-flight', 'fencing',
]);
const resyncKeys = new Set(['rate', 'min-rate', 'csums-alg', 'verify-alg']);
const nodeKeys = new Set(['address', 'disk', 'meta-disk', 'nbd', 'device', 'control', 'node-id', 'metrics']);
const handlerKeys = new Set<string>([...HANDLER_NAMES, 'timeout']);
const topLevel = new Set(['resource', 'disk', 'net', 'resync', 'node', 'handlers']);

const hashAlgorithms = new Set(['xxh64', 'sha256', 'sha1', 'md5', 'crc32c', 'sha512', 'blake2b512']);

type Table = Record<string, unknown>;

function isTable(value: unknown): value is Table {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof Date);
}

class Validator {
  constructor(readonly file: string) {}

  fail(key: string | undefined, problem: string): never {
    throw new ConfigError(this.file, key, problem);
  }

  table(root: Table, section: string, allowed: Set<string>): Table {
    const value = root[section];
    if (value === undefined) return {};
    if (!isTable(value)) this.fail(`[${section}]`, 'must be a table (a [section] heading)');
    for (const key of Object.keys(value)) {
      if (!allowed.has(key)) {
        this.fail(`${section}.${key}`, `unknown key (known keys in [${section}]: ${[...allowed].join(', ')})`);
      }
    }
    return value;
  }

  string(table: Table, section: string, key: string, required: true): string;
  string(table: Table, section: string, key: string, required: false): string | undefined;
  string(table: Table, section: string, key: string, required: boolean): string | undefined {
    const value = table[key];
    if (value === undefined) {
      if (required) this.fail(`${section}.${key}`, 'missing (required)');
      return undefined;
    }
    if (typeof value !== 'string') this.fail(`${section}.${key}`, `must be a string, got ${describe(value)}`);
    if (value.length === 0) this.fail(`${section}.${key}`, 'must not be empty');
    return value;
  }

  oneOf<T extends string>(table: Table, section: string, key: string, allowed: readonly T[], fallback: T): T {
    const value = this.string(table, section, key, false);
    if (value === undefined) return fallback;
    if (!(allowed as readonly string[]).includes(value)) {
      this.fail(`${section}.${key}`, `"${value}" is not one of ${allowed.map((a) => `"${a}"`).join(', ')}`);
    }
    return value as T;
  }

  size(table: Table, section: string, key: string, fallback: number | undefined): number | undefined {
    const value = table[key];
    if (value === undefined) return fallback;
    if (typeof value !== 'string' && typeof value !== 'number') {
      this.fail(`${section}.${key}`, `must be a size like "1GiB" or a number of bytes, got ${describe(value)}`);
    }
    try {
      return parseSize(value, 'size');
    } catch {
      this.fail(`${section}.${key}`, `${describe(value)} is not a size (examples: 4096, "512MiB", "1G")`);
    }
  }

  /** Durations: a number is seconds (as DRBD's ping-timeout is in tenths, we take plain seconds); "500ms", "2s". */
  durationMs(table: Table, section: string, key: string, fallbackMs: number): number {
    const value = table[key];
    if (value === undefined) return fallbackMs;
    let ms: number | undefined;
    if (typeof value === 'number' && Number.isFinite(value) && value > 0) ms = value * 1000;
    if (typeof value === 'string') {
      const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$/.exec(value);
      if (match) ms = Number(match[1]) * (match[2] === 'ms' ? 1 : match[2] === 'm' ? 60_000 : 1000);
    }
    if (ms === undefined || !(ms > 0) || ms > 3_600_000) {
      this.fail(`${section}.${key}`, `${describe(value)} is not a duration (examples: 5, "500ms", "2s")`);
    }
    return Math.round(ms);
  }

  integer(table: Table, section: string, key: string, fallback: number, min: number, max: number): number {
    const value = table[key];
    if (value === undefined) return fallback;
    if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
      this.fail(`${section}.${key}`, `must be a whole number from ${min} to ${max}, got ${describe(value)}`);
    }
    return value;
  }

  boolean(table: Table, section: string, key: string, fallback: boolean): boolean {
    const value = table[key];
    if (value === undefined) return fallback;
    if (typeof value !== 'boolean') this.fail(`${section}.${key}`, `must be true or false, got ${describe(value)}`);
    return value;
  }

  hostPort(text: string, key: string): HostPort {
    // [v6::addr]:port or host:port; the port is required because two nodes on one machine differ only in it.
    const match = /^\[([^\]]+)\]:(\d+)$/.exec(text) ?? /^([^:[\]]+):(\d+)$/.exec(text);
    if (!match) this.fail(key, `"${text}" is not HOST:PORT (example: "192.0.2.10:7789")`);
    const port = Number(match[2]);
    if (!Number.isInteger(port) || port < 1 || port > 65535) this.fail(key, `port ${match[2]} is not in 1..65535`);
    return { host: match[1]!, port };
  }
}

function describe(value: unknown): string {
  if (Array.isArray(value)) return 'an array';
  if (value instanceof Date) return 'a date';
  if (typeof value === 'string') return `"${value}"`;
  if (isTable(value)) return 'a table';
  return String(value);
}

const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

export function parseResourceConfig(text: string, fileName: string): ResourceConfig {
  const v: Validator = new Validator(fileName);
  let root: Table;
  try {
    root = parseToml(text) as Table;
  } catch (error) {
    const e = error as { message?: string; line?: number; column?: number };
    const where = e.line === undefined ? '' : ` at line ${e.line}, column ${e.column ?? 0}`;
    const first = (e.message ?? String(error)).split('\n')[0];
    throw new ConfigError(fileName, undefined, `not valid TOML${where}: ${first}`);
  }
  for (const key of Object.keys(root)) {
    if (!topLevel.has(key)) v.fail(key, `unknown section or key (known sections: ${[...topLevel].join(', ')})`);
  }
  if (!isTable(root.resource)) v.fail('[resource]', 'missing (required: name, protocol, shared-secret)');
  const resource = v.table(root, 'resource', resourceKeys);
  const disk = v.table(root, 'disk', diskKeys);
  const net = v.table(root, 'net', netKeys);
  const resync = v.table(root, 'resync', resyncKeys);
  const handlerTable = v.table(root, 'handlers', handlerKeys);

  const name = v.string(resource, 'resource', 'name', true);
  if (!NAME_PATTERN.test(name)) v.fail('resource.name', `"${name}" must be letters, digits, "_", "-", "." (max 63)`);
  // DRBD's minors go up to 2^20 - 1.
  const minor = resource.minor === undefined ? undefined : v.integer(resource, 'resource', 'minor', 0, 0, 1_048_575);

  if (resource.protocol !== undefined && net.protocol !== undefined) {
    v.fail('net.protocol', 'protocol is set in both [resource] and [net]; keep one');
  }
  const protocolSection = net.protocol !== undefined ? 'net' : 'resource';
  const protocol = v.oneOf<Protocol>(
    protocolSection === 'net' ? net : resource, protocolSection, 'protocol', ['A', 'B', 'C'], 'C',
  );
  if (resource['shared-secret'] !== undefined && net['shared-secret'] !== undefined) {
    v.fail('net.shared-secret', 'shared-secret is set in both [resource] and [net]; keep one');
  }
  const sharedSecret = net['shared-secret'] !== undefined
    ? v.string(net, 'net', 'shared-secret', true)
    : v.string(resource, 'resource', 'shared-secret', true);

  const autoPromote = v.boolean(resource, 'resource', 'auto-promote', false);

  const sizeBytes = v.size(disk, 'disk', 'size', undefined);
  if (sizeBytes !== undefined) {
    if (sizeBytes < 1024 * 1024) v.fail('disk.size', `${sizeBytes} bytes is too small (minimum 1MiB)`);
    if (sizeBytes % 4096 !== 0) v.fail('disk.size', `${sizeBytes} bytes is not a multiple of 4KiB`);
  }
  const alExtents = v.integer(disk, 'disk', 'al-extents', 1237, AL_EXTENTS_MIN, AL_EXTENTS_MAX);
  const onIoError = v.oneOf<OnIoError>(disk, 'disk', 'on-io-error', ['pass_on', 'detach'], 'pass_on');

  const onCongestion = v.oneOf<OnCongestion>(net, 'net', 'on-congestion', ['block', 'pull-ahead'], 'block');
  if (onCongestion === 'pull-ahead' && protocol !== 'A') {
    v.fail('net.on-congestion', `"pull-ahead" needs protocol A (this resource uses protocol ${protocol})`);
  }
  const allowTwoPrimaries = v.boolean(net, 'net', 'allow-two-primaries', false);
  if (allowTwoPrimaries && protocol !== 'C') {
    v.fail('net.allow-two-primaries', `needs protocol C (this resource uses protocol ${protocol})`);
  }
  const afterSb0priText = v.string(net, 'net', 'after-sb-0pri', false) ?? 'disconnect';
  const sb0 = ['disconnect', 'discard-younger-primary', 'discard-older-primary', 'discard-zero-changes',
    'discard-least-changes'];
  if (!sb0.includes(afterSb0priText) && !afterSb0priText.startsWith('discard-node-')) {
    v.fail('net.after-sb-0pri', `"${afterSb0priText}" is not one of ${sb0.map((s) => `"${s}"`).join(', ')}, "discard-node-NAME"`);
  }
  const afterSb1pri = v.oneOf<AfterSb1Pri>(net, 'net', 'after-sb-1pri',
    ['disconnect', 'consensus', 'discard-secondary', 'call-pri-lost-after-sb'], 'disconnect');
  const afterSb2pri = v.oneOf<AfterSb2Pri>(net, 'net', 'after-sb-2pri',
    ['disconnect', 'call-pri-lost-after-sb'], 'disconnect');
  const pingIntervalMs = v.durationMs(net, 'net', 'ping-interval', 1000);
  const pingTimeoutMs = v.durationMs(net, 'net', 'ping-timeout', 5000);
  if (pingTimeoutMs <= pingIntervalMs) {
    v.fail('net.ping-timeout', `${pingTimeoutMs}ms must be longer than ping-interval (${pingIntervalMs}ms)`);
  }
  const connectRetryMs = v.durationMs(net, 'net', 'connect-int', 1000);
  const sendQueueMaxBytes = v.size(net, 'net', 'max-buffers', 64 * 1024 * 1024)!;
  if (sendQueueMaxBytes < 1024 * 1024) v.fail('net.max-buffers', `${sendQueueMaxBytes} bytes is below the minimum 1MiB`);
  const maxInFlightWrites = v.integer(net, 'net', 'max-in-flight', 2048, 1, 65536);
  const fencing = v.oneOf<Fencing>(net, 'net', 'fencing', ['dont-care', 'resource-only'], 'dont-care');

  const handlers: Partial<Record<HandlerName, string>> = {};
  for (const handler of HANDLER_NAMES) {
    const command = v.string(handlerTable, 'handlers', handler, false);
    if (command !== undefined) handlers[handler] = command;
  }
  const handlerTimeoutMs = v.durationMs(handlerTable, 'handlers', 'timeout', 60_000);
  if (fencing === 'resource-only' && handlers['fence-peer'] === undefined) {
    v.fail('net.fencing', '"resource-only" needs a fence-peer command in [handlers] (it is what outdates the peer)');
  }

  const resyncRateMaxBytesPerSecond = v.size(resync, 'resync', 'rate', 100 * 1024 * 1024)!;
  const resyncRateMinBytesPerSecond = v.size(resync, 'resync', 'min-rate', 4 * 1024 * 1024)!;
  if (resyncRateMaxBytesPerSecond < 64 * 1024) v.fail('resync.rate', 'must be at least 64KiB (per second)');
  if (resyncRateMinBytesPerSecond > resyncRateMaxBytesPerSecond) {
    v.fail('resync.min-rate', `${resyncRateMinBytesPerSecond} is above resync.rate (${resyncRateMaxBytesPerSecond})`);
  }
  const csumsAlg = v.string(resync, 'resync', 'csums-alg', false);
  const verifyAlg = v.string(resync, 'resync', 'verify-alg', false);
  for (const [key, alg] of [['csums-alg', csumsAlg], ['verify-alg', verifyAlg]] as const) {
    if (alg !== undefined && !hashAlgorithms.has(alg)) {
      v.fail(`resync.${key}`, `"${alg}" is not one of ${[...hashAlgorithms].join(', ')}`);
    }
  }

  const nodeRoot = root.node;
  if (nodeRoot === undefined) v.fail('[node.NAME]', 'missing: a resource needs two [node.NAME] sections');
  if (!isTable(nodeRoot)) v.fail('node', 'must be [node.NAME] tables');
  const nodes: Record<string, NodeConfig> = {};
  const seenAddresses = new Map<string, string>();
  for (const [nodeName, value] of Object.entries(nodeRoot)) {
    const section = `node.${nodeName}`;
    if (!NAME_PATTERN.test(nodeName)) v.fail(`[${section}]`, 'node names are letters, digits, "_", "-", "."');
    if (!isTable(value)) v.fail(`[${section}]`, 'must be a table');
    const table = value;
    for (const key of Object.keys(table)) {
      if (!nodeKeys.has(key)) v.fail(`${section}.${key}`, `unknown key (known keys: ${[...nodeKeys].join(', ')})`);
    }
    const addressText = v.string(table, section, 'address', true);
    const address = v.hostPort(addressText, `${section}.address`);
    const addressKey = `${address.host}:${address.port}`;
    const other = seenAddresses.get(addressKey);
    if (other !== undefined) v.fail(`${section}.address`, `${addressKey} is also node ${other}'s address`);
    seenAddresses.set(addressKey, nodeName);
    const diskPath = v.string(table, section, 'disk', true);
    if (!diskPath.startsWith('/')) v.fail(`${section}.disk`, `"${diskPath}" must be an absolute path`);
    const metaDisk = v.string(table, section, 'meta-disk', false) ?? 'internal';
    if (metaDisk !== 'internal' && !metaDisk.startsWith('/')) {
      v.fail(`${section}.meta-disk`, `"${metaDisk}" must be "internal" or an absolute path`);
    }
    if (metaDisk === diskPath) v.fail(`${section}.meta-disk`, 'is the data disk itself; use "internal"');
    const nbd = v.string(table, section, 'nbd', true);
    if (nbd.startsWith('unix:')) {
      if (nbd.length <= 'unix:'.length) v.fail(`${section}.nbd`, '"unix:" needs a socket path');
      if (!nbd.startsWith('unix:/')) v.fail(`${section}.nbd`, `"${nbd}": the socket path must be absolute, like "unix:/run/drbdts/${name}.nbd"`);
    } else {
      v.hostPort(nbd, `${section}.nbd`);
    }
    const device = v.string(table, section, 'device', false);
    if (device !== undefined && !device.startsWith('/dev/')) {
      v.fail(`${section}.device`, `"${device}" is not a device path like /dev/nbd0`);
    }
    const control = v.string(table, section, 'control', false) ?? `${DEFAULT_RUN_DIR}/${name}-${nodeName}.ctl`;
    // Every path in the file is absolute, as disk is: a relative one would depend on where a command runs.
    if (!control.startsWith('/')) v.fail(`${section}.control`, `"${control}" must be an absolute path`);
    // sockaddr_un holds 108 bytes including the terminating NUL; a longer path fails only at bind time.
    if (Buffer.byteLength(control) > UNIX_PATH_MAX_BYTES) {
      v.fail(`${section}.control`, `socket path "${control}" is longer than ${UNIX_PATH_MAX_BYTES} bytes (a unix socket limit)`);
    }
    if (nbd.startsWith('unix:') && Buffer.byteLength(nbd.slice(5)) > UNIX_PATH_MAX_BYTES) {
      v.fail(`${section}.nbd`, `socket path "${nbd.slice(5)}" is longer than ${UNIX_PATH_MAX_BYTES} bytes (a unix socket limit)`);
    }
    // DRBD's node ids run 0..31; by default each node's position in the file.
    const nodeId = v.integer(table, section, 'node-id', Object.keys(nodes).length, 0, 31);
    const sameId = Object.values(nodes).find((other) => other.nodeId === nodeId);
    if (sameId !== undefined) v.fail(`${section}.node-id`, `${nodeId} is also node ${sameId.name}'s node-id`);
    const metricsText = v.string(table, section, 'metrics', false);
    const metrics = metricsText === undefined ? undefined : v.hostPort(metricsText, `${section}.metrics`);
    nodes[nodeName] = { name: nodeName, address, disk: diskPath, metaDisk, nbd, device, control, nodeId, metrics };
  }
  const nodeNames = Object.keys(nodes);
  if (nodeNames.length !== 2) {
    v.fail('[node.NAME]', `a resource needs exactly two nodes, found ${nodeNames.length}` +
      (nodeNames.length > 0 ? ` (${nodeNames.join(', ')})` : ''));
  }
  if (afterSb0priText.startsWith('discard-node-')) {
    const victim = afterSb0priText.slice('discard-node-'.length);
    if (!(victim in nodes)) {
      v.fail('net.after-sb-0pri', `names node "${victim}", which is not one of ${nodeNames.join(', ')}`);
    }
  }
  const [first, second] = nodeNames.map((n) => nodes[n]!);
  if (first!.control === second!.control) v.fail(`node.${second!.name}.control`, `same socket as node ${first!.name}`);

  return {
    fileName, name, protocol, sharedSecret, sizeBytes, onCongestion, allowTwoPrimaries,
    afterSb0pri: afterSb0priText as AfterSb0Pri, afterSb1pri, afterSb2pri,
    resyncRateMaxBytesPerSecond, resyncRateMinBytesPerSecond, pingIntervalMs, pingTimeoutMs, connectRetryMs,
    sendQueueMaxBytes, maxInFlightWrites, csumsAlg, verifyAlg, alExtents, onIoError, minor, fencing, handlers, handlerTimeoutMs,
    autoPromote, nodes,
  };
}

export function loadResourceConfig(file: string): ResourceConfig {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    const problem = code === 'ENOENT' ? 'no such file (pass --config FILE)' : `cannot read: ${(error as Error).message}`;
    throw new ConfigError(file, undefined, problem);
  }
  return parseResourceConfig(text, file);
}

/** This node's name: --node, then $DRBDTS_NODE, then the host name (short or full), else a clear error. */
export function resolveNodeName(config: ResourceConfig, explicit?: string): string {
  const names = Object.keys(config.nodes);
  const check = (candidate: string, source: string): string => {
    if (!(candidate in config.nodes)) {
      throw new ConfigError(config.fileName, undefined,
        `node "${candidate}" (from ${source}) is not in this resource; its nodes are ${names.join(', ')}`);
    }
    return candidate;
  };
  if (explicit !== undefined && explicit !== '') return check(explicit, '--node');
  const fromEnv = process.env.DRBDTS_NODE;
  if (fromEnv !== undefined && fromEnv !== '') return check(fromEnv, '$DRBDTS_NODE');
  const host = os.hostname();
  for (const candidate of [host, host.split('.')[0]!]) if (candidate in config.nodes) return candidate;
  throw new ConfigError(config.fileName, undefined,
    `cannot tell which node this is: host name "${host}" is not one of ${names.join(', ')}; ` +
    'pass --node NAME or set DRBDTS_NODE');
}

/**
 * The resource's device minor, as events2 and the handlers' DRBD_MINOR show it: `[resource] minor` when set,
 * else the resource's position among the configs in /etc/drbdts (sorted by name, as `drbdts status` lists
 * them), else 0. Set it explicitly when scripts depend on it: a new config file can shift the positions.
 */
export function resourceMinor(config: ResourceConfig, configDir = DEFAULT_CONFIG_DIR): number {
  if (config.minor !== undefined) return config.minor;
  let names: string[];
  try {
    names = readdirSync(configDir).filter((file) => file.endsWith('.toml')).map((file) => file.slice(0, -5)).sort();
  } catch {
    return 0;
  }
  const index = names.indexOf(config.name);
  return index < 0 ? 0 : index;
}

/** The other node of a two-node resource. */
export function peerOf(config: ResourceConfig, nodeName: string): NodeConfig {
  const peer = Object.values(config.nodes).find((node) => node.name !== nodeName);
  if (peer === undefined || !(nodeName in config.nodes)) {
    throw new ConfigError(config.fileName, undefined, `node "${nodeName}" has no peer in this resource`);
  }
  return peer;
}
