// Attaches the Linux kernel NBD client (/dev/nbdN) to an NbdServer in this process, the way nbd-client does
// with the ioctl interface, but with no network in between: each connection is a socketpair whose one end goes
// to the kernel (NBD_SET_SOCK) and whose other end the server adopts in transmission phase (the kernel skips
// the handshake: the size and flags come from ioctls instead). With several connections the kernel runs one
// hardware queue per socket (multi-conn), which is safe because the server advertises CAN_MULTI_CONN only when
// one flush covers every connection. NBD_DO_IT blocks for the life of the device, on its own native thread.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { promisify } from 'node:util';
import type { Logger } from 'pino';
import { closeFd, nbdConfigure, nbdDisconnect, nbdDoIt, socketPair } from '../native/index.js';
import type { NbdServer } from './server.js';

const NBD_FLAG_HAS_FLAGS = 0x1;
const NBD_FLAG_READ_ONLY = 0x2;
const NBD_FLAG_CAN_MULTI_CONN = 0x100;
/** The kernel's blk-mq queues: one per socket. nbd-client caps connections far lower in practice. */
const CONNECTIONS_MAX = 16;
/** How long attach waits for the kernel to report the device connected before it gives up. */
const ATTACH_WAIT_MS = 5_000;
/** How long detach waits for NBD_DO_IT to return after NBD_DISCONNECT. */
const DETACH_WAIT_MS = 30_000;

export interface KernelAttachOptions {
  /** /dev/nbdN. */
  devicePath: string;
  server: NbdServer;
  sizeBytes: number;
  /** The logical block size the kernel uses: 512..4096, dividing sizeBytes. Default 4096 when it divides, else 512. */
  blockSizeBytes?: number;
  /** Sockets (and kernel hardware queues); default 1. */
  connections?: number;
  readOnly?: boolean;
  /** NBD transmission flags, as the handshake would have sent them (transmissionFlagsFor). */
  flags: number;
  /** Per-request timeout in the kernel; 0 disables it. Default 30 (the kernel's own default). */
  timeoutSeconds?: number;
  logger?: Logger;
}

export interface KernelAttachment {
  readonly devicePath: string;
  readonly connections: number;
  /** Settles when the kernel lets go of the device (detach, or every socket gone). */
  readonly finished: Promise<void>;
  /** Sends NBD_CMD_DISC through the kernel, waits for NBD_DO_IT to return, closes the descriptors. */
  detach(): Promise<void>;
}

function attachError(message: string, code?: string, cause?: unknown): Error {
  return Object.assign(new Error(message, cause === undefined ? undefined : { cause }), code ? { code } : {});
}

/**
 * The kernel's view of /dev/nbdN from sysfs: the id of the thread in NBD_DO_IT (a thread of the serving
 * process), or null when the device is free.
 */
function connectedPid(devicePath: string): number | null {
  try {
    const text = fs.readFileSync(`/sys/block/${path.basename(devicePath)}/pid`, 'utf8').trim();
    return text === '' ? null : Number(text);
  } catch {
    return null;
  }
}

/**
 * Why the block device is in use, or null when nothing holds it: a mount (its major:minor in this process's
 * mountinfo) or a holder such as device-mapper (sysfs holders/). Demoting or taking down a device in use would
 * pull it from under a filesystem, which DRBD refuses too ("Device is held open by someone"). Reads only
 * /proc and sysfs: opening the device itself from the serving process could block on its own I/O.
 */
export function deviceInUse(devicePath: string): string | null {
  let rdev: number;
  try {
    rdev = fs.statSync(devicePath).rdev;
  } catch {
    return null;
  }
  // Linux dev_t: major in bits 8-19 (and 32+), minor in bits 0-7 and 20-31; device numbers here stay small.
  const majorMinor = `${Math.floor(rdev / 256) & 0xfff}:${(rdev & 0xff) | ((Math.floor(rdev / 0x100000) & 0xfff) << 8)}`;
  try {
    for (const line of fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
      const fields = line.split(' ');
      if (fields[2] === majorMinor) return `${devicePath} is mounted at ${fields[4]!.replace(/\\040/g, ' ')}`;
    }
  } catch {
    // No /proc: nothing more to learn here.
  }
  try {
    const holders = fs.readdirSync(`/sys/block/${path.basename(devicePath)}/holders`);
    if (holders.length > 0) return `${devicePath} is held by ${holders.join(', ')}`;
  } catch {
    // No sysfs entry: not a whole disk we know.
  }
  return null;
}

function validate(options: KernelAttachOptions): { blockSizeBytes: number; connections: number; timeoutSeconds: number } {
  const { sizeBytes, devicePath } = options;
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
    throw attachError(`${devicePath}: size must be a positive number of bytes, got ${sizeBytes}`, 'EINVAL');
  }
  const blockSizeBytes = options.blockSizeBytes ?? (sizeBytes % 4096 === 0 ? 4096 : 512);
  if (![512, 1024, 2048, 4096].includes(blockSizeBytes)) {
    throw attachError(`${devicePath}: block size must be 512, 1024, 2048 or 4096 bytes, got ${blockSizeBytes}`, 'EINVAL');
  }
  if (sizeBytes % blockSizeBytes !== 0) {
    throw attachError(
      `${devicePath}: the kernel client needs a size that is a multiple of ${blockSizeBytes} bytes; ${sizeBytes} is not ` +
        '(expose a smaller size)',
      'EINVAL',
    );
  }
  const connections = options.connections ?? 1;
  if (!Number.isInteger(connections) || connections < 1 || connections > CONNECTIONS_MAX) {
    throw attachError(`${devicePath}: connections must be 1..${CONNECTIONS_MAX}, got ${connections}`, 'EINVAL');
  }
  if (connections > 1 && (options.flags & NBD_FLAG_CAN_MULTI_CONN) === 0) {
    // The kernel refuses several sockets unless the server promised a flush covers them all.
    throw attachError(
      `${devicePath}: ${connections} connections need the CAN_MULTI_CONN flag, which this export does not offer`,
      'EINVAL',
    );
  }
  const timeoutSeconds = options.timeoutSeconds ?? 30;
  if (!Number.isSafeInteger(timeoutSeconds) || timeoutSeconds < 0) {
    throw attachError(`${devicePath}: timeoutSeconds must be a non-negative integer, got ${timeoutSeconds}`, 'EINVAL');
  }
  return { blockSizeBytes, connections, timeoutSeconds };
}

export async function attachKernelClient(options: KernelAttachOptions): Promise<KernelAttachment> {
  const { devicePath, server, sizeBytes, logger } = options;
  const { blockSizeBytes, connections, timeoutSeconds } = validate(options);
  let flags = options.flags | NBD_FLAG_HAS_FLAGS;
  if (options.readOnly === true) flags |= NBD_FLAG_READ_ONLY;

  let stat: fs.Stats;
  try {
    stat = await fs.promises.stat(devicePath);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
      throw attachError(`${devicePath} does not exist: load the nbd kernel module (modprobe nbd)`, 'ENOENT', error);
    }
    throw attachError(`cannot use ${devicePath}: ${(error as Error).message}`, (error as NodeJS.ErrnoException).code, error);
  }
  if (!stat.isBlockDevice()) throw attachError(`${devicePath} is not a block device (expected /dev/nbdN)`, 'ENOTBLK');
  const pid = connectedPid(devicePath);
  if (pid !== null) throw attachError(`${devicePath} is already connected (thread ${pid} serves it; see /proc/${pid})`, 'EBUSY');

  let nbdFd: number;
  try {
    // A plain descriptor, not a FileHandle: NBD_DO_IT holds it on another thread for the device's lifetime.
    nbdFd = await openFd(devicePath, fs.constants.O_RDWR);
  } catch (error) {
    throw attachError(`cannot open ${devicePath}: ${(error as Error).message}`, (error as NodeJS.ErrnoException).code, error);
  }

  const kernelFds: number[] = [];
  const serverSockets: Duplex[] = [];
  let doIt: Promise<void> | null = null;
  try {
    for (let i = 0; i < connections; i++) {
      const [kernelEnd, serverEnd] = socketPair();
      kernelFds.push(kernelEnd);
      // Not reading yet (pauseOnCreate), so the server can re-create it for direct reads and the native data path.
      serverSockets.push(new net.Socket({ fd: serverEnd, readable: true, writable: true, pauseOnCreate: true } as net.SocketConstructorOpts));
    }
    nbdConfigure(nbdFd, { blockSizeBytes, sizeBytes, timeoutSeconds, flags, kernelSocketFds: kernelFds });
    // Serve before NBD_DO_IT: the kernel reads the partition table as soon as the device comes up.
    for (let i = 0; i < serverSockets.length; i++) serverSockets[i] = server.adoptTransmissionSocket(serverSockets[i]!);
    doIt = nbdDoIt(nbdFd);
    await waitUntilConnected(devicePath, doIt);
  } catch (error) {
    for (const socket of serverSockets) socket.destroy();
    if (doIt !== null) {
      try {
        nbdDisconnect(nbdFd);
      } catch {
        // The device may already be down; closing below is what matters.
      }
      await doIt.catch(() => undefined);
    }
    for (const fd of kernelFds) {
      try {
        closeFd(fd);
      } catch {
        // Already gone with a failed setup; the error below is the one that matters.
      }
    }
    await closeDescriptor(nbdFd);
    throw attachError(`cannot attach ${devicePath}: ${(error as Error).message}`, (error as NodeJS.ErrnoException).code, error);
  }
  logger?.info({ device: devicePath, sizeBytes, blockSizeBytes, connections, flags }, 'kernel NBD client attached');

  let closed = false;
  const finished = doIt.then(
    () => undefined,
    (error: unknown) => {
      logger?.warn({ device: devicePath, err: error }, 'NBD_DO_IT returned an error');
    },
  );
  // Whatever ends the attachment (detach, or the kernel dropping every socket), release the descriptors once.
  const released = finished.then(async () => {
    if (closed) return;
    closed = true;
    for (const socket of serverSockets) socket.end();
    for (const fd of kernelFds) {
      try {
        closeFd(fd);
      } catch {
        // The kernel may have shut the socket; the descriptor is gone either way.
      }
    }
    await closeDescriptor(nbdFd);
    logger?.info({ device: devicePath }, 'kernel NBD client detached');
  });

  let detaching: Promise<void> | null = null;
  return {
    devicePath,
    connections,
    finished: released,
    detach(): Promise<void> {
      detaching ??= (async () => {
        if (!closed) {
          try {
            nbdDisconnect(nbdFd);
          } catch (error) {
            // EBADF/ENOTCONN here only means the kernel already let go; anything else is worth a log line.
            logger?.warn({ device: devicePath, err: error }, 'NBD_DISCONNECT failed');
          }
        }
        let timer: NodeJS.Timeout | undefined;
        const timedOut = new Promise<boolean>((resolve) => {
          timer = setTimeout(() => resolve(true), DETACH_WAIT_MS);
        });
        const stuck = await Promise.race([released.then(() => false), timedOut]);
        clearTimeout(timer);
        if (stuck) {
          // The kernel still waits on in-flight requests; cutting the sockets makes NBD_DO_IT return.
          for (const socket of serverSockets) socket.destroy();
          await released;
        }
      })();
      return detaching;
    },
  };
}

const openFd = promisify(fs.open);
const closeFdAsync = promisify(fs.close);

async function closeDescriptor(fd: number): Promise<void> {
  try {
    await closeFdAsync(fd);
  } catch {
    // Closing is the last step of a teardown; an error here has nothing left to protect.
  }
}

/**
 * Resolves once sysfs shows the device served (/sys/block/nbdN/pid appears when NBD_DO_IT has started), or
 * rejects if NBD_DO_IT returns first (the kernel refused). Without sysfs, trusts NBD_DO_IT after the wait.
 */
async function waitUntilConnected(devicePath: string, doIt: Promise<void>): Promise<void> {
  let settled: { error: unknown } | null = null;
  doIt.then(
    () => {
      settled = { error: new Error('the kernel ended the connection at once') };
    },
    (error: unknown) => {
      settled = { error };
    },
  );
  const sysfsKnown = fs.existsSync(`/sys/block/${path.basename(devicePath)}`);
  const deadline = Date.now() + ATTACH_WAIT_MS;
  for (;;) {
    if (settled !== null) throw (settled as { error: unknown }).error;
    if (sysfsKnown && connectedPid(devicePath) !== null) return;
    if (Date.now() >= deadline) {
      if (!sysfsKnown) return;
      throw new Error(`the kernel did not report ${devicePath} connected within ${ATTACH_WAIT_MS} ms`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
