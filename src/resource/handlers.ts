// DRBD's handlers (drbd.conf `handlers { ... }`): operator commands the daemon runs when something happens that
// a script must hear of or decide on: split-brain, fence-peer, before-resync-target, after-resync-target,
// local-io-error. Each runs as `/bin/sh -c COMMAND` with the daemon's environment plus DRBD's variables
// (DRBD_RESOURCE, DRBD_MINOR, DRBD_PEER_NODE_ID...), in its own process group so that a timeout
// ([handlers] timeout) kills the command and everything it started. Its output goes to the log line by line,
// its exit code to the log and to the caller (fence-peer's and before-resync-target's codes decide things).
import { spawn } from 'node:child_process';
import type { Logger } from '../util/log.js';
import type { HandlerName, HostPort } from './config.js';

/** Output kept per run for the log; a handler printing more is cut (the rest is counted, not kept). */
const HANDLER_OUTPUT_MAX_BYTES = 64 * 1024;
/** After the timeout's SIGTERM, this long until SIGKILL. */
const HANDLER_KILL_GRACE_MS = 2000;

export interface HandlerEnvironment {
  resource: string;
  configFile: string;
  minor: number;
  nodeName: string;
  nodeId: number;
  address: HostPort;
  backingDevice: string;
  peerName: string;
  peerNodeId: number;
  peerAddress: HostPort;
  /** The connection state when the handler starts (DRBD_CSTATE). */
  connectionState: string;
}

/** What a run ended with: the exit code, or null when it was killed (timeout) or could not start. */
export interface HandlerResult {
  exitCode: number | null;
  timedOut: boolean;
  output: string;
}

function addressFamily(address: HostPort): string {
  return address.host.includes(':') ? 'ipv6' : 'ipv4';
}

/** DRBD's handler variables (the kernel's and drbdadm's), for a two-node resource with one volume. */
export function handlerVariables(context: HandlerEnvironment, extra: Record<string, string> = {}): Record<string, string> {
  return {
    DRBD_RESOURCE: context.resource,
    DRBD_CONF: context.configFile,
    DRBD_MINOR: String(context.minor),
    DRBD_MINOR_0: String(context.minor),
    DRBD_VOLUME: '0',
    DRBD_BACKING_DEV: context.backingDevice,
    DRBD_BACKING_DEV_0: context.backingDevice,
    DRBD_NODE_ID: String(context.nodeId),
    DRBD_MY_NODE_ID: String(context.nodeId),
    [`DRBD_NODE_ID_${context.nodeId}`]: context.nodeName,
    [`DRBD_NODE_ID_${context.peerNodeId}`]: context.peerName,
    DRBD_MY_ADDRESS: context.address.host,
    DRBD_MY_AF: addressFamily(context.address),
    DRBD_PEER: context.peerName,
    DRBD_PEERS: context.peerName,
    DRBD_PEER_ADDRESS: context.peerAddress.host,
    DRBD_PEER_AF: addressFamily(context.peerAddress),
    DRBD_PEER_NODE_ID: String(context.peerNodeId),
    DRBD_CSTATE: context.connectionState,
    ...extra,
  };
}

export class HandlerRunner {
  /** Process groups of the handlers running now, for stopAll. */
  private readonly running = new Set<number>();

  constructor(
    private commands: Partial<Record<HandlerName, string>>,
    private timeoutMs: number,
    private readonly logger: Logger,
    /** Told of each call and its response (events2's call/response helper lines). */
    private readonly onEvent: (helper: HandlerName, phase: 'call' | 'response', exitCode?: number) => void = () => {},
  ) {}

  /** `adjust`: the handlers and timeout of calls from now on (running ones keep theirs). */
  reconfigure(commands: Partial<Record<HandlerName, string>>, timeoutMs: number): void {
    this.commands = commands;
    this.timeoutMs = timeoutMs;
  }

  /** The daemon goes down: running handlers get SIGTERM (their runs end as killed). */
  stopAll(): void {
    for (const pid of this.running) {
      try {
        process.kill(-pid, 'SIGTERM');
      } catch {
        // Already gone.
      }
    }
  }

  has(name: HandlerName): boolean {
    return this.commands[name] !== undefined;
  }

  /** Runs the handler `name` if configured (null if not); resolves when it has ended, never rejects. */
  run(name: HandlerName, variables: Record<string, string>): Promise<HandlerResult> | null {
    const command = this.commands[name];
    if (command === undefined) return null;
    const log = this.logger.child({ handler: name });
    log.info({ command }, `calling the ${name} handler`);
    this.onEvent(name, 'call');
    return new Promise((resolve) => {
      let output = '';
      let droppedBytes = 0;
      let timedOut = false;
      let killTimer: NodeJS.Timeout | null = null;
      const child = spawn('/bin/sh', ['-c', command], {
        env: { ...process.env, ...variables },
        stdio: ['ignore', 'pipe', 'pipe'],
        // Its own process group: the timeout kills whatever the command started, too.
        detached: true,
      });
      const collect = (chunk: Buffer): void => {
        const room = HANDLER_OUTPUT_MAX_BYTES - output.length;
        if (room > 0) output += chunk.toString('utf8', 0, Math.min(room, chunk.length));
        droppedBytes += Math.max(0, chunk.length - Math.max(0, room));
      };
      const pid = child.pid;
      if (pid !== undefined) this.running.add(pid);
      child.stdout.on('data', collect);
      child.stderr.on('data', collect);
      const killGroup = (signal: NodeJS.Signals): void => {
        try {
          if (child.pid !== undefined) process.kill(-child.pid, signal);
        } catch {
          // Already gone.
        }
      };
      const timer = setTimeout(() => {
        timedOut = true;
        log.error({ timeoutMs: this.timeoutMs }, `the ${name} handler did not finish within its timeout ([handlers] timeout): killing it`);
        killGroup('SIGTERM');
        killTimer = setTimeout(() => killGroup('SIGKILL'), HANDLER_KILL_GRACE_MS);
      }, this.timeoutMs);
      let finished = false;
      const finish = (exitCode: number | null, failure?: string): void => {
        if (finished) return;
        finished = true;
        if (pid !== undefined) this.running.delete(pid);
        clearTimeout(timer);
        if (killTimer !== null) clearTimeout(killTimer);
        for (const line of output.split('\n')) if (line.trim() !== '') log.info({ output: line }, `${name} handler output`);
        if (droppedBytes > 0) log.warn({ droppedBytes }, `${name} handler output cut after ${HANDLER_OUTPUT_MAX_BYTES} bytes`);
        if (failure !== undefined) log.error({ error: failure }, `the ${name} handler could not run`);
        else if (exitCode === 0) log.info({ exitCode }, `${name} handler exit code 0`);
        else log.warn({ exitCode, timedOut }, `${name} handler exit code ${exitCode ?? 'none (killed)'}`);
        this.onEvent(name, 'response', exitCode ?? -1);
        resolve({ exitCode, timedOut, output });
      };
      child.once('error', (error) => finish(null, error.message));
      // 'close' waits for the output pipes, which something the command left running in the background may
      // hold open: after the exit, the output gets a moment to drain, no more.
      child.once('exit', (code) => {
        const exitCode = timedOut ? null : code;
        const drained = setTimeout(() => finish(exitCode), 500);
        child.once('close', () => {
          clearTimeout(drained);
          finish(exitCode);
        });
      });
    });
  }
}
