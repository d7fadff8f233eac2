// `drbdts serve DISK --listen ADDR ...`: a local file or block device served over NBD in the foreground, as
// `nbdkit file` or `qemu-nbd` would. SIGTERM/SIGINT stop accepting, finish in-flight requests, flush, exit 0.

import * as fs from 'node:fs';
import { parseArgs } from 'node:util';
import { LocalDisk } from '../blockdev/local.js';
import { parseListenAddress, type ListenAddress } from '../nbd/address.js';
import { NbdServer } from '../nbd/server.js';
import { createLogger } from '../util/log.js';
import { formatBytes, parseSize } from '../util/size.js';

interface KernelModule {
  attachKernelClient(options: {
    devicePath: string; server: NbdServer; sizeBytes: number; readOnly?: boolean; flags: number; logger?: unknown;
  }): Promise<{ detach(): Promise<void> }>;
}

const help = `Usage: drbdts serve DISK --listen unix:PATH|HOST:PORT [options]

Serves DISK (a file or a block device) over NBD until SIGTERM or SIGINT.

Options:
  --listen ADDR        unix:PATH or HOST:PORT ([::1]:10809 for IPv6); repeat to listen on several
  --export NAME        export name clients ask for (default: the empty default export)
  --description TEXT   export description shown by nbdinfo
  --size SIZE          create DISK with this size when it does not exist (e.g. 1GiB)
  --read-only          refuse writes (clients see a read-only export)
  --tls-cert FILE      X.509 certificate (PEM); with --tls-key, clients must use STARTTLS (nbds://)
  --tls-key FILE       private key (PEM) for --tls-cert
  --device /dev/nbdN   also attach the kernel NBD client to this device
  -h, --help           this text

Clients: nbdinfo nbd+unix:///?socket=PATH, qemu-io -f raw nbd://HOST:PORT/NAME, fio --ioengine=nbd.
`;

export async function run(_command: string, argv: string[]): Promise<number> {
  let values: Record<string, string | boolean | string[] | undefined>;
  let positionals: string[];
  try {
    ({ values, positionals } = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        listen: { type: 'string', multiple: true },
        export: { type: 'string' },
        description: { type: 'string' },
        size: { type: 'string' },
        'read-only': { type: 'boolean' },
        'tls-cert': { type: 'string' },
        'tls-key': { type: 'string' },
        device: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (error) {
    process.stderr.write(`drbdts serve: ${(error as Error).message}\n\n${help}`);
    return 2;
  }
  if (values.help === true) {
    process.stdout.write(help);
    return 0;
  }
  const fail = (message: string): number => {
    process.stderr.write(`drbdts serve: ${message}\n`);
    return 2;
  };
  if (positionals.length !== 1) return fail(`expected one DISK argument, got ${positionals.length}; see --help`);
  const diskPath = positionals[0]!;
  const listenTexts = (values.listen as string[] | undefined) ?? [];
  if (listenTexts.length === 0) return fail('--listen unix:PATH or HOST:PORT is required');
  let addresses: ListenAddress[];
  let createSizeBytes: number | undefined;
  try {
    addresses = listenTexts.map((text) => parseListenAddress(text));
    createSizeBytes = values.size === undefined ? undefined : parseSize(values.size as string, '--size');
  } catch (error) {
    return fail((error as Error).message);
  }
  const certPath = values['tls-cert'] as string | undefined;
  const keyPath = values['tls-key'] as string | undefined;
  if ((certPath === undefined) !== (keyPath === undefined)) return fail('--tls-cert and --tls-key go together');
  const readOnly = values['read-only'] === true;
  if (createSizeBytes !== undefined && createSizeBytes === 0) return fail('--size must be more than 0 bytes');

  const logger = createLogger('serve');
  const exists = fs.existsSync(diskPath);
  if (!exists && createSizeBytes === undefined) {
    return fail(`${diskPath} does not exist; pass --size SIZE to create it`);
  }
  let disk: LocalDisk;
  try {
    disk = await LocalDisk.open(diskPath, { readOnly, ...(exists ? {} : { createSizeBytes }) });
  } catch (error) {
    return fail((error as Error).message);
  }
  if (exists && createSizeBytes !== undefined && createSizeBytes !== disk.sizeBytes) {
    logger.warn({ disk: diskPath, sizeBytes: disk.sizeBytes }, '--size ignored: DISK exists with another size');
  }

  let server: NbdServer;
  try {
    server = new NbdServer({
      device: disk,
      exportName: (values.export as string | undefined) ?? '',
      ...(values.description === undefined ? {} : { description: values.description as string }),
      readOnly,
      ...(certPath !== undefined && keyPath !== undefined ? { tls: { certPath, keyPath } } : {}),
      logger,
    });
    for (const address of addresses) await server.listen(address);
  } catch (error) {
    await disk.close();
    return fail((error as Error).message);
  }
  logger.info({ disk: diskPath, size: formatBytes(disk.sizeBytes), readOnly, addresses: server.addresses }, 'serving');

  let detachKernel: (() => Promise<void>) | null = null;
  const devicePath = values.device as string | undefined;
  if (devicePath !== undefined) {
    try {
      // Loaded only with --device: serving without the kernel client never loads its module.
      const kernelModulePath = '../nbd/kernel.js';
      const { attachKernelClient } = (await import(kernelModulePath)) as KernelModule;
      const { transmissionFlagsFor } = await import('../nbd/handshake.js');
      const attachment = await attachKernelClient({
        devicePath,
        server,
        sizeBytes: disk.sizeBytes,
        readOnly,
        flags: transmissionFlagsFor(disk, readOnly, false),
        logger,
      });
      detachKernel = () => attachment.detach();
      logger.info({ device: devicePath }, 'kernel NBD client attached');
    } catch (error) {
      await server.close();
      await disk.close();
      return fail((error as Error).message);
    }
  }

  // Signals only start the stop; a second signal while stopping exits at once (an operator insisting).
  const stopped = new Promise<string>((resolve) => {
    let signalled = false;
    const onSignal = (signal: string): void => {
      if (signalled) {
        logger.warn({ signal }, 'second signal: exiting without waiting');
        process.exit(1);
      }
      signalled = true;
      resolve(signal);
    };
    process.on('SIGTERM', () => onSignal('SIGTERM'));
    process.on('SIGINT', () => onSignal('SIGINT'));
  });
  const signal = await stopped;
  logger.info({ signal, connections: server.activeConnections }, 'stopping: finishing in-flight requests');
  if (detachKernel !== null) await detachKernel();
  await server.close();
  await disk.close();
  logger.info('stopped');
  logger.flush();
  return 0;
}
