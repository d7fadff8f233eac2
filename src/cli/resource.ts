// Operator commands for a replicated resource, in DRBD's vocabulary: `drbdts COMMAND RES [--config FILE]
// [--node NAME]`. create-md and up run here (create-md touches only local metadata; up runs the node daemon in
// the foreground); every other command is a request to the running daemon over its control socket, so the
// daemon's state machine alone decides what is allowed and says why not.
//
// Exit codes (docs/operators.md): 0 done; 1 refused or failed (the message says why); 2 bad usage; 5 a wait
// (wait-connect, wait-sync, resync --wait) timed out. A wait the state cannot end (StandAlone) is refused: 1.
import { readdir } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { ConfigError, DEFAULT_CONFIG_DIR, defaultConfigPath, loadResourceConfig, resolveNodeName, type NodeConfig, type ResourceConfig } from '../resource/config.js';
import { ControlError, sendControlRequest, subscribeControl, type ResourceStatus } from '../resource/control.js';
import { formatBytes, parseSize } from '../util/size.js';

class UsageError extends Error {}

export const EXIT_OK = 0;
export const EXIT_FAILED = 1;
export const EXIT_USAGE = 2;
export const EXIT_TIMEOUT = 5;

/** How often a wait asks the daemon for its state: short enough that a resync of a few blocks is not missed. */
const WAIT_POLL_MS = 100;

interface Options {
  resource: string;
  config?: string;
  node?: string;
  flags: Set<string>;
  rate?: number;
  intervalMs: number;
  /** --timeout for waits, in ms; null waits for ever (as DRBD's wfc-timeout 0). */
  timeoutMs: number | null;
  positional: string[];
}

// Which flags each command takes; anything else is a usage error naming the flag.
const commandFlags: Record<string, string[]> = {
  'create-md': ['force'],
  up: [],
  down: ['force'],
  primary: ['force'],
  secondary: [],
  connect: ['discard-my-data'],
  disconnect: [],
  outdate: [],
  adjust: ['json'],
  detach: ['force'],
  attach: [],
  invalidate: [],
  'invalidate-remote': [],
  'new-current-uuid': ['clear-bitmap'],
  verify: ['wait', 'json'],
  status: ['json', 'statistics', 's', 'verbose', 'v'],
  resync: ['json', 'wait', 'rate', 'interval', 'timeout'],
  'wait-connect': ['timeout', 'json'],
  'wait-sync': ['timeout', 'json'],
  'pause-sync': [],
  'resume-sync': [],
  events2: ['now', 'statistics', 's', 'interval', 'full', 'timestamps'],
  role: ['json'],
  cstate: ['json'],
  dstate: ['json'],
  'dump-md': ['json'],
  dump: ['json'],
  'get-gi': ['json'],
};

const commandHelp: Record<string, string> = {
  'create-md': 'create-md RES [--force]   write fresh metadata on this node\'s disk (creates a missing backing file\n' +
    '  of [disk] size plus metadata); refuses to overwrite existing metadata without --force',
  up: 'up RES   run the node daemon in the foreground (SIGTERM or "drbdts down RES" stops it)',
  down: 'down RES [--force]   stop the node daemon (waits until it has gone); refused while NBD clients hold the\n' +
    '  export open (--force: stop anyway, their next request fails); a node that is not up: exit 0 with a note',
  primary: 'primary RES [--force]   promote; --force makes this node\'s data the good copy (initial sync)',
  secondary: 'secondary RES   demote',
  connect: 'connect RES [--discard-my-data]   (re)connect to the peer; --discard-my-data resolves a split brain\n' +
    '  by throwing away this node\'s changes',
  disconnect: 'disconnect RES   drop the peer connection and stay StandAlone',
  adjust: 'adjust RES [--json]   apply the config file\'s changes to the running node; exit 1 naming what needs down/up',
  detach: 'detach RES [--force]   leave the local disk: Diskless, reads and writes served by the peer\'s disk (--force: even without a good peer)',
  attach: 'attach RES   take the local disk back (a Secondary): the peer resyncs what changed while Diskless',
  outdate: 'outdate RES   mark this node\'s data possibly stale (not promoted without --force; refused on a Primary or while connected)',
  invalidate: 'invalidate RES   discard this node\'s data and resync it from the peer',
  'invalidate-remote': 'invalidate-remote RES   resync the whole device to the peer',
  'new-current-uuid': 'new-current-uuid RES [--clear-bitmap]   start a new data generation; --clear-bitmap on a\n' +
    '  fresh connected pair skips the initial sync (both disks must already be identical, e.g. all zeros)',
  verify: 'verify RES [--wait] [--json]   online verify against the peer; --wait polls until it ends',
  status: 'status RES [--json] [--statistics]   roles, disk states, connection, resync progress, counters',
  resync: 'resync RES [status|pause|resume] [--rate R] [--wait [--timeout SECONDS]] [--interval SECONDS] [--json]\n' +
    '  show resync progress (a bar with rate and ETA on a terminal), pause or resume it, set its maximum rate\n' +
    '  (R is bytes per second: 50MiB, 200M); --wait waits through Connecting until the resync is done\n' +
    '  (exit 5 after --timeout, 1 if the node is or goes StandAlone)',
  'wait-connect': 'wait-connect RES [--timeout SECONDS] [--json]   wait until the node is connected to its peer\n' +
    '  (exit 0), StandAlone (exit 1: it does not try to connect) or the timeout passes (exit 5; none: wait for ever)',
  'wait-sync': 'wait-sync RES [--timeout SECONDS] [--json]   wait for the connection, then until every resync has\n' +
    '  ended and both disks are UpToDate (exit 0); StandAlone: exit 1; timeout: exit 5',
  'pause-sync': 'pause-sync RES   pause the resync',
  'resume-sync': 'resume-sync RES   resume the resync',
  role: 'role RES [--json]   print this node\'s role (Primary or Secondary), for scripts',
  cstate: 'cstate RES [--json]   print the connection state (Connected, StandAlone, SyncSource, ...), for scripts',
  dstate: 'dstate RES [--json]   print the disk states, this node\'s then the peer\'s (UpToDate/Inconsistent), for scripts',
  'dump-md': 'dump-md RES [--json]   print the on-disk metadata of a stopped node: size, generation UUIDs, flags,\n' +
    '  clean shutdown, activity-log extents, out-of-sync blocks (refused while the node is up)',
  'get-gi': 'get-gi RES [--json]   print the generation identifiers CURRENT:BITMAP:HISTORY1:HISTORY2 (hex), from the\n' +
    '  daemon, or from the on-disk metadata of a node that is not up',
  dump: 'dump RES [--json]   print the resource\'s configuration as this node reads it: every key, defaults filled in\n' +
    '  (drbdadm dump); valid TOML, the shared secret hidden',
  events2: 'events2 RES [--now] [--full] [--statistics] [--timestamps]   drbdsetup-style event lines\n' +
    '  (exists ... then change ... lines, pushed by the daemon at each change); --now prints the current state\n' +
    '  and exits; --full repeats every object on each change; --timestamps prefixes drbdsetup\'s time stamps',
};

function parseArgs(command: string, argv: string[]): Options {
  const allowed = new Set(commandFlags[command] ?? []);
  const options: Options = { resource: '', flags: new Set(), intervalMs: 1000, timeoutMs: null, positional: [] };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i]!;
    const takeValue = (name: string): string => {
      const eq = arg.indexOf('=');
      if (eq !== -1) return arg.slice(eq + 1);
      const value = argv[i + 1];
      if (value === undefined || value.startsWith('--')) throw new UsageError(`${name} needs a value`);
      i += 1;
      return value;
    };
    const name = arg.startsWith('--') ? arg.slice(2).split('=')[0]! : arg.startsWith('-') && arg.length > 1 ? arg.slice(1) : undefined;
    if (name === undefined) {
      options.positional.push(arg);
      continue;
    }
    if (name === 'config' || name === 'c') options.config = takeValue('--config');
    else if (name === 'node') options.node = takeValue('--node');
    else if (!allowed.has(name)) {
      throw new UsageError(`"${command}" does not take ${arg}` +
        (allowed.size > 0 ? ` (it takes ${[...allowed].filter((f) => f.length > 1).map((f) => `--${f}`).join(', ')})` : ''));
    } else if (name === 'rate') {
      const text = takeValue('--rate').replace(/\/s$/i, '');
      try {
        options.rate = parseSize(text, '--rate');
      } catch {
        throw new UsageError(`--rate: "${text}" is not a rate in bytes per second (examples: 50MiB, 200M)`);
      }
      if (options.rate < 64 * 1024) throw new UsageError('--rate: the minimum is 64KiB (per second)');
    } else if (name === 'interval') {
      const seconds = Number(takeValue('--interval'));
      if (!(seconds > 0) || seconds > 3600) throw new UsageError('--interval: a number of seconds, like 1 or 0.5');
      options.intervalMs = Math.round(seconds * 1000);
    } else if (name === 'timeout') {
      const text = takeValue('--timeout');
      const seconds = Number(text);
      if (text.trim() === '' || !Number.isFinite(seconds) || seconds < 0) {
        throw new UsageError(`--timeout: "${text}" is not a number of seconds (0 waits for ever)`);
      }
      options.timeoutMs = seconds === 0 ? null : Math.round(seconds * 1000);
    } else {
      options.flags.add(name === 's' ? 'statistics' : name === 'v' ? 'verbose' : name);
    }
  }
  // Positional resource name; with --config it may be left out (the file names it), and a bare
  // `drbdts status` shows every resource in /etc/drbdts, as `drbdadm status` does.
  const looksLikeAction = command === 'resync' && ['status', 'pause', 'resume'].includes(options.positional[0] ?? '');
  const resource = looksLikeAction && options.config !== undefined ? undefined : options.positional.shift();
  if (resource !== undefined) options.resource = resource;
  else if (options.config !== undefined) options.resource = '';
  else if (command === 'status') options.resource = '*';
  else throw new UsageError(`"${command}" needs the resource name: drbdts ${commandHelp[command]?.split('\n')[0] ?? command}`);
  const extraAllowed = command === 'resync' ? 1 : 0;
  if (options.positional.length > extraAllowed) {
    throw new UsageError(`unexpected argument "${options.positional[extraAllowed]}"`);
  }
  return options;
}

interface Target {
  config: ResourceConfig;
  nodeName: string;
  node: NodeConfig;
}

/** The resource's config, checked against the name the command gave; no node needed. */
function loadConfig(options: Options): ResourceConfig {
  const file = options.config ?? defaultConfigPath(options.resource);
  const config = loadResourceConfig(file);
  if (options.resource === '') options.resource = config.name;
  if (config.name !== options.resource) {
    throw new ConfigError(file, 'resource.name', `is "${config.name}", but the command names resource "${options.resource}"`);
  }
  return config;
}

function loadTarget(options: Options): Target {
  const config = loadConfig(options);
  const nodeName = resolveNodeName(config, options.node);
  return { config, nodeName, node: config.nodes[nodeName]! };
}

async function request(target: Target, command: string, args: Record<string, unknown> = {}, timeoutMs?: number): Promise<unknown> {
  try {
    return await sendControlRequest(target.node.control, command, args, { timeoutMs });
  } catch (error) {
    if (error instanceof ControlError && error.code === 'ENODAEMON') {
      throw new ControlError('ENODAEMON',
        `resource ${target.config.name} is not up on node ${target.nodeName} (no daemon at ${target.node.control})`);
    }
    throw error;
  }
}

function out(text: string): void {
  process.stdout.write(text);
}

// ---- status rendering (drbdadm status layout) ----

function kib(bytes: number): number {
  return Math.floor(bytes / 1024);
}

function percent(done: number, total: number): string {
  return total <= 0 ? '100.00' : (Math.floor((done / total) * 10000) / 100).toFixed(2);
}

export function renderStatus(status: ResourceStatus, options: { statistics?: boolean } = {}): string {
  const lines: string[] = [];
  lines.push(`${status.name} role:${status.role}`);
  let diskLine = `  disk:${status.disk}`;
  if (options.statistics) {
    diskLine += `\n      size:${kib(status.size)} read:${kib(status.counters.diskReadBytes)} written:${kib(status.counters.diskWrittenBytes)}` +
      ` al-writes:${status.counters.alWrites} bm-writes:${status.counters.bmWrites}`;
  }
  lines.push(diskLine);
  const syncing = status.connection === 'SyncSource' || status.connection === 'SyncTarget'
    || status.connection === 'PausedSyncS' || status.connection === 'PausedSyncT'
    || status.connection === 'VerifyS' || status.connection === 'VerifyT';
  if (status.connection === 'Connected' || status.connection === 'Ahead' || syncing) {
    lines.push(`  ${status.peer.node} role:${status.peer.role}`);
    let replication = syncing || status.connection === 'Ahead' ? `    replication:${status.connection} peer-disk:${status.peer.disk}` : `    peer-disk:${status.peer.disk}`;
    if (status.resync !== null && syncing) {
      replication += ` done:${percent(status.resync.doneBytes, status.resync.totalBytes)}`;
    }
    if (status.verify) replication += ` verified:${percent(status.verify.doneBytes, status.verify.totalBytes)}`;
    lines.push(replication);
  } else {
    lines.push(`  ${status.peer.node} connection:${status.connection}`);
    // Why it is not connected, which otherwise only the log says (a wrong secret, a refused handshake...).
    if (status.lastConnectionError) lines.push(`    last-error:"${status.lastConnectionError.message}" at:${status.lastConnectionError.at}`);
  }
  if (status.splitBrain) {
    const reason = status.splitBrain.reason;
    lines.push(`    ${reason.startsWith('split brain') ? reason : `split brain: ${reason}`}`);
  }
  if (options.statistics) {
    lines.push(`      received:${kib(status.counters.networkReceivedBytes)} sent:${kib(status.counters.networkSentBytes)}` +
      ` out-of-sync:${kib(status.outOfSyncBytes)} pending:${status.pending} unacked:${status.unacked}` +
      ` resync-sent:${kib(status.counters.resyncSentBytes)} resync-received:${kib(status.counters.resyncReceivedBytes)}`);
  } else if (status.outOfSyncBytes > 0 && status.resync === null) {
    lines.push(`      out-of-sync:${kib(status.outOfSyncBytes)}`);
  }
  return `${lines.join('\n')}\n\n`;
}

function formatEta(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '--:--';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${String(sec).padStart(2, '0')}` : `${m}:${String(sec).padStart(2, '0')}`;
}

export function renderResyncLine(status: ResourceStatus, barWidth: number | null): string {
  const r = status.resync;
  if (r === null) {
    const state = `${status.connection}, disk:${status.disk} peer-disk:${status.peer.disk}`;
    if (status.connection === 'Connected' && status.outOfSyncBytes === 0 && status.disk === 'UpToDate' && status.peer.disk === 'UpToDate') {
      return `${status.name}: in sync with ${status.peer.node}, no resync running (${state})`;
    }
    return `${status.name}: no resync running (${state}, out-of-sync:${formatBytes(status.outOfSyncBytes)})`;
  }
  const fraction = r.totalBytes <= 0 ? 1 : Math.min(1, r.doneBytes / r.totalBytes);
  const who = r.direction === 'source' ? `to ${status.peer.node}` : `from ${status.peer.node}`;
  const state = r.paused ? 'paused' : `${formatBytes(r.bytesPerSecond)}/s ETA ${formatEta(r.etaSeconds)}`;
  const numbers = `${percent(r.doneBytes, r.totalBytes)}% ${formatBytes(r.doneBytes)}/${formatBytes(r.totalBytes)} ${state}`;
  if (barWidth === null) return `${status.name}: resync ${who} (${status.connection}) ${numbers}`;
  const filled = Math.round(fraction * barWidth);
  const bar = `${'='.repeat(Math.max(0, filled - 1))}${filled > 0 ? (filled === barWidth ? '=' : '>') : ''}${' '.repeat(barWidth - filled)}`;
  return `${status.name} ${who} [${bar}] ${numbers}`;
}

// ---- commands ----

async function createMd(options: Options): Promise<number> {
  const target = loadTarget(options);
  const { Metadata } = await import('../metadata/metadata.js');
  const metadata = await Metadata.create({
    diskPath: target.node.disk,
    metaDisk: target.node.metaDisk,
    dataSizeBytes: target.config.sizeBytes,
    force: options.flags.has('force'),
    nodeName: target.nodeName,
    resourceName: target.config.name,
    alExtents: target.config.alExtents,
  });
  const where = target.node.metaDisk === 'internal' ? `internal, at the end of ${target.node.disk}` : target.node.metaDisk;
  out(`${target.config.name} on ${target.nodeName}: new metadata (${where}): data ${formatBytes(metadata.dataSizeBytes)} ` +
    `(${metadata.dataSizeBytes} bytes), metadata ${formatBytes(metadata.metadataSizeBytes)}, ${metadata.alExtents} activity-log extents\n`);
  await metadata.close();
  return 0;
}

async function up(options: Options): Promise<number> {
  const target = loadTarget(options);
  const { createLogger } = await import('../util/log.js');
  const logger = createLogger(`${target.config.name}@${target.nodeName}`);
  // Loaded only by `up`: the other commands start without the daemon's modules.
  const daemonPath = '../resource/daemon.js';
  const daemon = (await import(daemonPath)) as {
    runDaemon(config: ResourceConfig, nodeName: string, logger: unknown): Promise<void>;
  };
  try {
    await daemon.runDaemon(target.config, target.nodeName, logger);
  } catch (error) {
    const { MetadataError } = await import('../metadata/metadata.js');
    if (error instanceof MetadataError && error.code === 'ENOMETA' && !/does not exist/.test(error.message)) {
      throw new Error(await missingMetadata(target));
    }
    throw error;
  }
  return 0;
}

async function down(options: Options): Promise<number> {
  const target = loadTarget(options);
  try {
    await request(target, 'down', { force: options.flags.has('force') });
  } catch (error) {
    // A stop action must be idempotent (init scripts, resource agents): a node that is not up is stopped.
    if (error instanceof ControlError && error.code === 'ENODAEMON') {
      out(`${target.config.name} is not up on node ${target.nodeName}: nothing to stop\n`);
      return 0;
    }
    throw error;
  }
  // Return only when the daemon has gone, so "down; up" and "down; create-md" work from scripts.
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    try {
      await sendControlRequest(target.node.control, 'status', {}, { timeoutMs: 2000 });
    } catch (error) {
      if (error instanceof ControlError && (error.code === 'ENODAEMON' || error.code === 'EPROTO')) return 0;
    }
    await sleep(100);
  }
  process.stderr.write(`drbdts: ${target.config.name} on ${target.nodeName}: the daemon accepted "down" but still runs after 60 s\n`);
  return 1;
}

async function missingMetadata(target: Target): Promise<string> {
  const { explainMissingMetadata } = await import('../metadata/metadata.js');
  return explainMissingMetadata({ diskPath: target.node.disk, metaDisk: target.node.metaDisk,
    configuredSizeBytes: target.config.sizeBytes, alExtents: target.config.alExtents, resource: target.config.name });
}

function printResult(result: unknown): void {
  if (typeof result === 'string' && result !== '') out(`${result}\n`);
  else if (typeof result === 'object' && result !== null && typeof (result as { message?: unknown }).message === 'string') {
    out(`${(result as { message: string }).message}\n`);
  }
}

/** adjust: the daemon re-reads its config file; exit 1 when something needs down/up (then nothing changed). */
async function adjust(options: Options): Promise<number> {
  const result = (await request(loadTarget(options), 'adjust')) as { message: string; needsRestart: string[] };
  if (options.flags.has('json')) out(`${JSON.stringify(result)}\n`);
  else out(`${result.message}\n`);
  return result.needsRestart.length > 0 ? 1 : 0;
}

async function simple(command: string, options: Options): Promise<number> {
  const target = loadTarget(options);
  const args: Record<string, unknown> = {};
  let wire = command;
  if (command === 'primary' || command === 'detach') args.force = options.flags.has('force');
  if (command === 'connect') args.discardMyData = options.flags.has('discard-my-data');
  if (command === 'new-current-uuid') args.clearBitmap = options.flags.has('clear-bitmap');
  if (command === 'pause-sync') wire = 'resync-pause';
  if (command === 'resume-sync') wire = 'resync-resume';
  printResult(await request(target, wire, args));
  return 0;
}

/** drbdadm's one-word queries, for scripts: `role`, `cstate`, `dstate` print one line each. */
async function query(command: 'role' | 'cstate' | 'dstate', options: Options): Promise<number> {
  const status = (await request(loadTarget(options), 'status')) as ResourceStatus;
  if (options.flags.has('json')) {
    const fields = command === 'role' ? { role: status.role }
      : command === 'cstate' ? { connection: status.connection }
        : { disk: status.disk, peerDisk: status.peer.disk };
    out(`${JSON.stringify({ resource: status.name, node: status.node, ...fields })}\n`);
    return 0;
  }
  if (command === 'role') out(`${status.role}\n`);
  else if (command === 'cstate') out(`${status.connection}\n`);
  else out(`${status.disk}/${status.peer.disk}\n`);
  return 0;
}

/** The metadata on disk, read without taking the lock; refused while a daemon runs (its state is in memory). */
async function dumpMd(options: Options): Promise<number> {
  const target = loadTarget(options);
  const running = await sendControlRequest(target.node.control, 'status', {}, { timeoutMs: 2000 }).then(() => true, () => false);
  if (running) {
    throw new Error(`${target.config.name} is up on node ${target.nodeName}: dump-md reads the metadata of a stopped ` +
      `node (the daemon's state is newer than the disk's); use "drbdts status ${target.config.name} --json"`);
  }
  const { Metadata } = await import('../metadata/metadata.js');
  const where = target.node.metaDisk === 'internal' ? target.node.disk : target.node.metaDisk;
  const snapshot = await Metadata.read(target.node.disk, target.node.metaDisk).catch((error: Error) => {
    throw new Error(`cannot read the metadata of ${where}: ${error.message}`);
  });
  if (snapshot === null) {
    throw new Error(await missingMetadata(target));
  }
  const hex = (uuid: bigint): string => uuid.toString(16).toUpperCase().padStart(16, '0');
  const outOfSyncBytes = snapshot.dirtyBlocks * 4096;
  const dump = {
    resource: snapshot.resourceName, node: snapshot.nodeName, metaDisk: target.node.metaDisk, where,
    dataSizeBytes: snapshot.dataSizeBytes, metadataSizeBytes: snapshot.metadataSizeBytes,
    uuids: { current: hex(snapshot.uuids.current), bitmap: hex(snapshot.uuids.bitmap), history: snapshot.uuids.history.map(hex) },
    flags: snapshot.flags, cleanShutdown: snapshot.cleanShutdown,
    superblock: { slot: snapshot.superblockSlot, sequence: Number(snapshot.sequence) },
    activityLog: { hotExtents: snapshot.hotExtents, wideRanges: snapshot.wideRanges },
    outOfSyncBlocks: snapshot.dirtyBlocks, outOfSyncBytes,
  };
  if (options.flags.has('json')) {
    out(`${JSON.stringify(dump, null, 2)}\n`);
    return 0;
  }
  const flagNames = Object.entries(snapshot.flags).filter(([, value]) => value).map(([name]) => name);
  const extents = snapshot.hotExtents;
  out([
    `# ${dump.resource} on ${dump.node}: metadata ${target.node.metaDisk === 'internal' ? `internal, at the end of ${where}` : `in ${where}`}`,
    `size ${formatBytes(dump.dataSizeBytes)} (${dump.dataSizeBytes} bytes), metadata ${formatBytes(dump.metadataSizeBytes)}`,
    `uuids current:${dump.uuids.current} bitmap:${dump.uuids.bitmap} history:${dump.uuids.history.join(',')}`,
    `flags ${flagNames.length === 0 ? '(none)' : flagNames.join(' ')}`,
    `shutdown ${dump.cleanShutdown ? 'clean' : 'not clean (the last run crashed or is running: its activity-log extents resync at the next up)'}`,
    `superblock slot ${dump.superblock.slot}, sequence ${dump.superblock.sequence}`,
    `activity-log ${extents.length} hot extent(s)${extents.length === 0 ? '' : `: ${extents.slice(0, 32).join(' ')}${extents.length > 32 ? ' ...' : ''}`}` +
      (snapshot.wideRanges.length > 0 ? `, ${snapshot.wideRanges.length} wide range(s)` : ''),
    `out-of-sync ${dump.outOfSyncBlocks} block(s) of 4 KiB (${formatBytes(outOfSyncBytes)})`,
  ].join('\n') + '\n');
  return 0;
}

/** Bytes in the largest binary unit that divides them exactly ("64MiB"), as a config file would say it. */
function exactSize(bytes: number): string {
  for (const [unit, factor] of [['TiB', 1024 ** 4], ['GiB', 1024 ** 3], ['MiB', 1024 ** 2], ['KiB', 1024]] as const) {
    if (bytes >= factor && bytes % factor === 0) return `${bytes / factor}${unit}`;
  }
  return String(bytes);
}

function durationText(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000}s` : `${ms}ms`;
}

/**
 * `dump`: the configuration as loaded, every key with its value or default, in the file's own sections. The
 * shared secret is never printed (an operator's terminal or a support ticket is no place for it).
 */
function dump(options: Options): number {
  const config = loadConfig(options);
  const hidden = '<hidden>';
  const sections: Record<string, Record<string, string | number | boolean>> = {
    resource: { name: config.name, protocol: config.protocol, 'shared-secret': hidden },
    disk: { ...(config.sizeBytes === undefined ? {} : { size: exactSize(config.sizeBytes) }), 'al-extents': config.alExtents },
    net: {
      'on-congestion': config.onCongestion, 'allow-two-primaries': config.allowTwoPrimaries,
      'after-sb-0pri': config.afterSb0pri, 'after-sb-1pri': config.afterSb1pri, 'after-sb-2pri': config.afterSb2pri,
      'ping-interval': durationText(config.pingIntervalMs), 'ping-timeout': durationText(config.pingTimeoutMs),
      'connect-int': durationText(config.connectRetryMs), 'max-buffers': exactSize(config.sendQueueMaxBytes),
      'max-in-flight': config.maxInFlightWrites,
    },
    resync: {
      rate: exactSize(config.resyncRateMaxBytesPerSecond), 'min-rate': exactSize(config.resyncRateMinBytesPerSecond),
      ...(config.csumsAlg === undefined ? {} : { 'csums-alg': config.csumsAlg }),
      'verify-alg': config.verifyAlg ?? 'xxh64',
    },
  };
  for (const node of Object.values(config.nodes)) {
    const address = node.address.host.includes(':') ? `[${node.address.host}]:${node.address.port}` : `${node.address.host}:${node.address.port}`;
    sections[`node.${node.name}`] = {
      address, disk: node.disk, 'meta-disk': node.metaDisk, nbd: node.nbd,
      ...(node.device === undefined ? {} : { device: node.device }), control: node.control,
    };
  }
  if (options.flags.has('json')) {
    out(`${JSON.stringify({ file: config.fileName, ...sections }, null, 2)}\n`);
    return 0;
  }
  const lines = [`# ${config.fileName}, as drbdts reads it (defaults filled in, the shared secret hidden)`];
  for (const [section, keys] of Object.entries(sections)) {
    lines.push('', `[${section}]`);
    for (const [key, value] of Object.entries(keys)) lines.push(`${key} = ${typeof value === 'string' ? JSON.stringify(value) : String(value)}`);
  }
  out(`${lines.join('\n')}\n`);
  return 0;
}

/**
 * get-gi: the generation UUIDs, as drbdadm get-gi prints them first (the flag bits it appends are not printed).
 * A running daemon's are newer than the disk's; a node that is not up answers from its metadata.
 */
async function getGi(options: Options): Promise<number> {
  const target = loadTarget(options);
  let uuids: { current: string; bitmap: string; history: [string, string] };
  let source: 'daemon' | 'metadata';
  try {
    const status = (await request(target, 'status')) as ResourceStatus;
    uuids = status.uuids!;
    source = 'daemon';
  } catch (error) {
    if (!(error instanceof ControlError && error.code === 'ENODAEMON')) throw error;
    const { Metadata } = await import('../metadata/metadata.js');
    const snapshot = await Metadata.read(target.node.disk, target.node.metaDisk);
    if (snapshot === null) throw new Error(await missingMetadata(target));
    const { formatUuid } = await import('../metadata/uuids.js');
    uuids = { current: formatUuid(snapshot.uuids.current), bitmap: formatUuid(snapshot.uuids.bitmap),
      history: [formatUuid(snapshot.uuids.history[0]), formatUuid(snapshot.uuids.history[1])] };
    source = 'metadata';
  }
  if (options.flags.has('json')) {
    out(`${JSON.stringify({ resource: target.config.name, node: target.nodeName, source, ...uuids })}\n`);
  } else {
    out(`${uuids.current}:${uuids.bitmap}:${uuids.history[0]}:${uuids.history[1]}\n`);
  }
  return 0;
}

async function statusAll(options: Options): Promise<number> {
  let files: string[];
  try {
    files = (await readdir(DEFAULT_CONFIG_DIR)).filter((name) => name.endsWith('.toml')).sort();
  } catch {
    files = [];
  }
  if (files.length === 0) {
    process.stderr.write(`drbdts status: no resources configured (no ${DEFAULT_CONFIG_DIR}/*.toml); name one: drbdts status RES --config FILE\n`);
    return 1;
  }
  let failures = 0;
  const all: ResourceStatus[] = [];
  for (const file of files) {
    try {
      const target = loadTarget({ ...options, resource: file.slice(0, -'.toml'.length), config: undefined });
      const result = (await request(target, 'status')) as ResourceStatus;
      if (options.flags.has('json')) all.push(result);
      else out(renderStatus(result, { statistics: options.flags.has('statistics') || options.flags.has('verbose') }));
    } catch (error) {
      failures += 1;
      process.stderr.write(`drbdts status: ${error instanceof Error ? error.message : String(error)}\n`);
    }
  }
  if (options.flags.has('json')) out(`${JSON.stringify(all, null, 2)}\n`);
  return failures === 0 ? 0 : 1;
}

/** For a node whose daemon is down: what its metadata says, read without locking. */
async function describeOnDisk(target: Target): Promise<string> {
  try {
    const { Metadata } = await import('../metadata/metadata.js');
    const md = await Metadata.read(target.node.disk, target.node.metaDisk);
    if (md === null) return missingMetadata(target);
    const disk = !md.flags.consistent ? 'Inconsistent' : md.flags.peerOutdated || md.flags.wasUpToDate ? 'UpToDate' : 'Consistent';
    const { formatUuid } = await import('../metadata/uuids.js');
    return `on disk: ${disk}, ${md.flags.wasPrimary ? 'was Primary' : 'was Secondary'}, generation ${formatUuid(md.uuids.current)}, ` +
      `out-of-sync ${formatBytes(md.dirtyBlocks * 4096)}, last stop ${md.cleanShutdown ? 'clean' : 'unclean (crash recovery at the next up)'}`;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
      return `its disk ${target.node.metaDisk === 'internal' ? target.node.disk : target.node.metaDisk} does not exist (run "drbdts create-md ${target.config.name}")`;
    }
    return `cannot read its metadata: ${(error as Error).message}`;
  }
}

async function status(options: Options): Promise<number> {
  if (options.resource === '*') return statusAll(options);
  const target = loadTarget(options);
  let result: ResourceStatus;
  try {
    result = (await request(target, 'status')) as ResourceStatus;
  } catch (error) {
    if (error instanceof ControlError && error.code === 'ENODAEMON') {
      throw new ControlError('ENODAEMON', `${error.message}\n  ${await describeOnDisk(target)}`);
    }
    throw error;
  }
  if (options.flags.has('json')) out(`${JSON.stringify(result, null, 2)}\n`);
  else out(renderStatus(result, { statistics: options.flags.has('statistics') || options.flags.has('verbose') }));
  return 0;
}

async function resync(options: Options): Promise<number> {
  const target = loadTarget(options);
  const action = options.positional[0] ?? 'status';
  if (!['status', 'pause', 'resume'].includes(action)) {
    throw new UsageError(`resync: unknown action "${action}" (status, pause, resume)`);
  }
  const json = options.flags.has('json');
  if (options.timeoutMs !== null && !options.flags.has('wait')) throw new UsageError('--timeout goes with --wait');
  if (options.rate !== undefined) {
    printResult(await request(target, 'resync-rate', { bytesPerSecond: options.rate }));
  }
  if (action === 'pause') printResult(await request(target, 'resync-pause'));
  if (action === 'resume') printResult(await request(target, 'resync-resume'));
  const tty = process.stdout.isTTY === true && !json;
  const barWidth = tty ? Math.max(10, Math.min(40, (process.stdout.columns ?? 80) - 70)) : null;
  const show = (s: ResourceStatus, final: boolean): void => {
    if (json) out(`${JSON.stringify({ resync: s.resync, connection: s.connection, disk: s.disk, peerDisk: s.peer.disk, outOfSyncBytes: s.outOfSyncBytes })}\n`);
    else if (tty) out(`\r\x1b[2K${renderResyncLine(s, barWidth)}${final ? '\n' : ''}`);
    else out(`${renderResyncLine(s, null)}\n`);
  };
  // Ctrl-C while a bar is drawn: end the line so the shell prompt does not land on top of it.
  if (tty) process.once('SIGINT', () => { out('\n'); process.exit(130); });
  let current = (await request(target, 'status')) as ResourceStatus;
  if (!options.flags.has('wait')) {
    show(current, true);
    return 0;
  }
  // --wait: through Connecting (a resync right after `up` starts once the peer is there) until no resync runs
  // and nothing is out of sync, as wait-sync; StandAlone ends the wait (exit 1), --timeout too (exit 5).
  const deadline = options.timeoutMs === null ? null : Date.now() + options.timeoutMs;
  let lastPlainMs = 0;
  for (;;) {
    const verdict = waitVerdict('sync', current);
    if (verdict === 'done') {
      show(current, true);
      return EXIT_OK;
    }
    if (verdict === 'refused') {
      show(current, true);
      process.stderr.write(`drbdts resync: ${refusedWait(target, current)}\n`);
      return EXIT_FAILED;
    }
    if (deadline !== null && Date.now() >= deadline) {
      show(current, true);
      process.stderr.write(`drbdts resync: ${timedOutWait(target, current, 'sync', options.timeoutMs!)}\n`);
      return EXIT_TIMEOUT;
    }
    const now = Date.now();
    // The state is asked for every WAIT_POLL_MS; a terminal or --json shows it every interval, a pipe every 10.
    if (now - lastPlainMs >= (tty || json ? options.intervalMs : options.intervalMs * 10)) {
      show(current, false);
      lastPlainMs = now;
    }
    await sleep(deadline === null ? WAIT_POLL_MS : Math.max(1, Math.min(WAIT_POLL_MS, deadline - Date.now())));
    current = (await request(target, 'status')) as ResourceStatus;
  }
}

// ---- waiting (drbdsetup wait-connect / wait-sync) ----

type WaitGoal = 'connect' | 'sync';

function isConnected(s: ResourceStatus): boolean {
  return s.connection !== 'StandAlone' && s.connection !== 'Connecting' && s.connection !== 'Disconnecting';
}

/** done: the goal is reached; refused: the state cannot reach it without an operator; wait: not yet. */
function waitVerdict(goal: WaitGoal, s: ResourceStatus): 'done' | 'refused' | 'wait' {
  if (s.connection === 'StandAlone') return 'refused';
  if (!isConnected(s)) return 'wait';
  if (goal === 'connect') return 'done';
  const synced = s.resync === null && s.outOfSyncBytes === 0 && s.disk !== 'Inconsistent' && s.peer.disk !== 'Inconsistent';
  return synced ? 'done' : 'wait';
}

function lastErrorText(s: ResourceStatus): string {
  return s.lastConnectionError ? `; last connection error: ${s.lastConnectionError.message}` : '';
}

function refusedWait(target: Target, s: ResourceStatus): string {
  return `${target.config.name} on ${target.nodeName} is StandAlone: it does not try to connect, so the wait cannot end` +
    `${lastErrorText(s)} ("drbdts connect ${target.config.name}" connects again)`;
}

function timedOutWait(target: Target, s: ResourceStatus, goal: WaitGoal, timeoutMs: number): string {
  const what = goal === 'connect' || !isConnected(s) ? 'not connected' : 'not in sync';
  return `${target.config.name} on ${target.nodeName}: ${what} after ${timeoutMs / 1000} s (${s.connection}, ` +
    `disk:${s.disk} peer-disk:${s.peer.disk}, out-of-sync:${formatBytes(s.outOfSyncBytes)})${lastErrorText(s)}`;
}

/**
 * wait-connect and wait-sync: a short poll of the control socket (WAIT_POLL_MS), so a connection or a resync that
 * lasts less than a second is still seen. Exit 0 when reached, 1 when StandAlone or the daemon stops, 5 on timeout.
 */
async function waitCommand(goal: WaitGoal, options: Options): Promise<number> {
  const target = loadTarget(options);
  const deadline = options.timeoutMs === null ? null : Date.now() + options.timeoutMs;
  const report = (s: ResourceStatus, result: string): void => {
    if (!options.flags.has('json')) return;
    out(`${JSON.stringify({ resource: s.name, node: s.node, result, connection: s.connection, disk: s.disk,
      peerDisk: s.peer.disk, outOfSyncBytes: s.outOfSyncBytes, lastConnectionError: s.lastConnectionError ?? null })}\n`);
  };
  for (;;) {
    let s: ResourceStatus;
    try {
      s = (await request(target, 'status')) as ResourceStatus;
    } catch (error) {
      if (error instanceof ControlError && error.code === 'ENODAEMON') {
        throw new ControlError('ENODAEMON', `${error.message}: nothing to wait for`);
      }
      throw error;
    }
    const verdict = waitVerdict(goal, s);
    if (verdict === 'done') {
      report(s, goal === 'connect' ? 'connected' : 'synced');
      return EXIT_OK;
    }
    if (verdict === 'refused') {
      report(s, 'refused');
      process.stderr.write(`drbdts wait-${goal}: ${refusedWait(target, s)}\n`);
      return EXIT_FAILED;
    }
    if (deadline !== null && Date.now() >= deadline) {
      report(s, 'timeout');
      process.stderr.write(`drbdts wait-${goal}: ${timedOutWait(target, s, goal, options.timeoutMs!)}\n`);
      return EXIT_TIMEOUT;
    }
    await sleep(deadline === null ? WAIT_POLL_MS : Math.max(1, Math.min(WAIT_POLL_MS, deadline - Date.now())));
  }
}

async function verify(options: Options): Promise<number> {
  const target = loadTarget(options);
  printResult(await request(target, 'verify'));
  if (!options.flags.has('wait')) return 0;
  for (;;) {
    await sleep(options.intervalMs);
    const s = (await request(target, 'status')) as ResourceStatus;
    if (s.connection !== 'VerifyS' && s.connection !== 'VerifyT') {
      const found = s.verify?.outOfSyncBlocks;
      if (options.flags.has('json')) out(`${JSON.stringify({ verify: s.verify ?? null, outOfSyncBytes: s.outOfSyncBytes })}\n`);
      else {
        const advice = s.outOfSyncBytes > 0
          ? ` (${formatBytes(s.outOfSyncBytes)} now out of sync: "drbdts disconnect ${s.name}" then "drbdts connect ${s.name}" resyncs it)`
          : '';
        out(`${s.name}: verify finished${found === undefined ? '' : `: ${found} blocks out of sync`}${advice}\n`);
      }
      return 0;
    }
  }
}

/** drbdsetup's replication states: Established while connected with nothing running, Off without a connection. */
function replicationState(s: ResourceStatus): string {
  if (s.connection === 'Connected') return 'Established';
  if (s.connection === 'StandAlone' || s.connection === 'Connecting' || s.connection === 'Disconnecting') return 'Off';
  return s.connection;
}

function eventLines(verb: string, s: ResourceStatus, statistics: boolean): string[] {
  const mayPromote = s.disk === 'UpToDate' && s.role !== 'Primary' && s.peer.role !== 'Primary' ? 'yes' : 'no';
  const peerNodeId = s.peer.nodeId ?? 1;
  const minor = s.minor ?? 0;
  const connection = s.connection === 'Connecting' || s.connection === 'StandAlone' || s.connection === 'Disconnecting'
    ? s.connection : 'Connected';
  const lines = [
    `${verb} resource name:${s.name} role:${s.role} suspended:no may_promote:${mayPromote}`,
    `${verb} device name:${s.name} volume:0 minor:${minor} disk:${s.disk}` +
      (statistics ? ` size:${kib(s.size)} read:${kib(s.counters.diskReadBytes)} written:${kib(s.counters.diskWrittenBytes)} al-writes:${s.counters.alWrites} bm-writes:${s.counters.bmWrites}` : ''),
    `${verb} connection name:${s.name} peer-node-id:${peerNodeId} conn-name:${s.peer.node} connection:${connection} role:${s.peer.role}`,
    `${verb} peer-device name:${s.name} peer-node-id:${peerNodeId} conn-name:${s.peer.node} volume:0 replication:${replicationState(s)} peer-disk:${s.peer.disk}` +
      ` resync-suspended:${s.resync?.paused ? 'user' : 'no'}` +
      (s.resync !== null ? ` done:${percent(s.resync.doneBytes, s.resync.totalBytes)}` : '') +
      (statistics ? ` received:${kib(s.counters.networkReceivedBytes)} sent:${kib(s.counters.networkSentBytes)} out-of-sync:${kib(s.outOfSyncBytes)} pending:${s.pending} unacked:${s.unacked}` : ''),
  ];
  return lines;
}

/** drbdsetup's --timestamps prefix: local time with microseconds and the UTC offset, 2026-12-08T03:04:05.123000+01:00. */
export function eventTimestamp(timeMs: number): string {
  const date = new Date(timeMs);
  const pad = (value: number, width = 2): string => String(value).padStart(width, '0');
  const offsetMinutes = -date.getTimezoneOffset();
  const sign = offsetMinutes >= 0 ? '+' : '-';
  const offset = Math.abs(offsetMinutes);
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:` +
    `${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds() * 1000, 6)}` +
    `${sign}${pad(Math.floor(offset / 60))}:${pad(offset % 60)}`;
}

/**
 * drbdsetup events2: the daemon pushes its state over the control socket at every change (and its counters
 * once a second); each object whose line changed is printed. Handler runs come as call/response helper lines.
 */
async function events2(options: Options): Promise<number> {
  const target = loadTarget(options);
  const statistics = options.flags.has('statistics');
  const full = options.flags.has('full');
  const stamp = (timeMs: number): string => (options.flags.has('timestamps') ? `${eventTimestamp(timeMs)} ` : '');
  const print = (timeMs: number, lines: string[]): void => {
    if (lines.length > 0) out(lines.map((line) => `${stamp(timeMs)}${line}\n`).join(''));
  };
  if (options.flags.has('now')) {
    const s = (await request(target, 'status')) as ResourceStatus;
    print(Date.now(), [...eventLines('exists', s, statistics), 'exists -']);
    return 0;
  }
  let previous: string[] | null = null;
  let last: ResourceStatus | null = null;
  try {
    await subscribeControl(target.node.control, (message) => {
      const timeMs = typeof message.timeMs === 'number' ? message.timeMs : Date.now();
      if (message.event === 'helper' && last !== null) {
        const h = message as { helper?: string; phase?: string; exitCode?: number };
        const where = `name:${last.name} volume:0 minor:${last.minor ?? 0} peer-node-id:${last.peer.nodeId ?? 1}`;
        if (h.phase === 'call') print(timeMs, [`call helper ${where} helper:${h.helper}`]);
        else print(timeMs, [`response helper ${where} helper:${h.helper} status:${h.exitCode ?? -1}`]);
        return;
      }
      if (message.event !== 'state') return;
      const s = message.status as ResourceStatus;
      last = s;
      if (previous === null) {
        previous = eventLines('exists', s, statistics);
        print(timeMs, [...previous, 'exists -']);
        return;
      }
      const next = eventLines('change', s, statistics);
      // "exists" and "change" are both 6 letters: compare what follows the verb.
      const before = previous;
      const changed = next.map((line, i) => line.slice(6) !== before[i]!.slice(6));
      if (full && changed.includes(true)) print(timeMs, next);
      else print(timeMs, next.filter((_, i) => changed[i]));
      previous = next;
    });
  } catch (error) {
    if (error instanceof ControlError && error.code === 'ENODAEMON') {
      throw new ControlError('ENODAEMON',
        `resource ${target.config.name} is not up on node ${target.nodeName} (no daemon at ${target.node.control})`);
    }
    throw error;
  }
  // The daemon went down: its objects are gone.
  const s = last as ResourceStatus | null;
  const name = target.config.name;
  const peerNodeId = s?.peer.nodeId ?? 1;
  print(Date.now(), [
    `destroy peer-device name:${name} peer-node-id:${peerNodeId} conn-name:${s?.peer.node ?? ''} volume:0`,
    `destroy connection name:${name} peer-node-id:${peerNodeId} conn-name:${s?.peer.node ?? ''}`,
    `destroy device name:${name} volume:0 minor:${s?.minor ?? 0}`,
    `destroy resource name:${name}`,
  ]);
  return 0;
}

export async function run(command: string, argv: string[]): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    out(`Usage: drbdts ${commandHelp[command] ?? command}\nCommon options: --config FILE (default /etc/drbdts/RES.toml), --node NAME (default $DRBDTS_NODE, then the host name)\n`);
    return 0;
  }
  try {
    const options = parseArgs(command, argv);
    switch (command) {
      case 'create-md': return await createMd(options);
      case 'up': return await up(options);
      case 'down': return await down(options);
      case 'status': return await status(options);
      case 'resync': return await resync(options);
      case 'verify': return await verify(options);
      case 'events2': return await events2(options);
      case 'wait-connect': return await waitCommand('connect', options);
      case 'wait-sync': return await waitCommand('sync', options);
      case 'role': case 'cstate': case 'dstate': return await query(command, options);
      case 'dump-md': return await dumpMd(options);
      case 'adjust': return await adjust(options);
      case 'dump': return dump(options);
      case 'get-gi': return await getGi(options);
      case 'primary': case 'secondary': case 'connect': case 'disconnect': case 'outdate': case 'detach': case 'attach': case 'invalidate': case 'invalidate-remote':
      case 'new-current-uuid': case 'pause-sync': case 'resume-sync':
        return await simple(command, options);
      default:
        throw new UsageError(`unknown resource command "${command}"`);
    }
  } catch (error) {
    if (error instanceof UsageError) {
      process.stderr.write(`drbdts ${command}: ${error.message}\n`);
      return 2;
    }
    let message = error instanceof Error ? error.message : String(error);
    // Library messages suggest commands generically ("drbdts create-md RES"); name the actual resource.
    const resource = argv.find((arg) => !arg.startsWith('-'));
    if (resource !== undefined) message = message.replace(/"drbdts ([a-z-]+) RES\b/g, `"drbdts $1 ${resource}`);
    process.stderr.write(`drbdts ${command}: ${message}\n`);
    return 1;
  }
}
