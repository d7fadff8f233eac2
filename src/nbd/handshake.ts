// The option phase of fixed newstyle NBD (nbdkit: protocol-handshake-newstyle.c). It talks to the socket only
// through HandshakeIo, so the same code runs before and after STARTTLS. Every option is answered or, where
// the spec allows it, the connection dropped; option data is bounded by NbdLimits and anything too long is
// drained without being buffered.

import type { Logger } from 'pino';
import type { BlockDevice } from '../blockdev/types.js';
import type { NbdLimits } from './limits.js';
import * as P from './protocol.js';

export interface HandshakeIo {
  /** Exactly `lengthBytes` bytes; rejects when the connection ends first. */
  read(lengthBytes: number): Promise<Buffer>;
  /** Reads and throws away `lengthBytes` bytes without holding them. */
  skip(lengthBytes: number): Promise<void>;
  write(data: Buffer): void;
  /** Called after the STARTTLS ACK is written: the rest of the handshake runs inside TLS. */
  startTls(): Promise<void>;
}

export interface ExportSettings {
  exportName: string;
  description: string | undefined;
  device: BlockDevice;
  readOnly: boolean;
  tlsConfigured: boolean;
  limits: NbdLimits;
  logger: Logger;
  /** Runs before a client is given (or told about) the export, e.g. to auto-promote a Secondary. */
  beforeExport?: () => Promise<void>;
}

export interface NegotiatedExport {
  device: BlockDevice;
  transmissionFlags: number;
  structuredReplies: boolean;
  /** The client selected base:allocation, so BLOCK_STATUS is allowed. */
  baseAllocation: boolean;
}

/** Ends the handshake without an export: the connection is closed (ABORT, a protocol violation, limits). */
export class HandshakeEnd extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'HandshakeEnd';
  }
}

export function greeting(): Buffer {
  const buffer = Buffer.alloc(P.GREETING_BYTES);
  buffer.writeBigUInt64BE(P.NBD_MAGIC, 0);
  buffer.writeBigUInt64BE(P.NBD_IHAVEOPT, 8);
  buffer.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
  return buffer;
}

/** The transmission flags for a device as this server serves it. */
export function transmissionFlagsFor(device: BlockDevice, readOnly: boolean, structuredReplies: boolean): number {
  const caps = device.capabilities();
  const writable = !readOnly && !caps.readOnly;
  let flags = P.NBD_FLAG_HAS_FLAGS;
  if (!writable) flags |= P.NBD_FLAG_READ_ONLY;
  if (caps.canFlush) flags |= P.NBD_FLAG_SEND_FLUSH;
  if (caps.canFua && writable) flags |= P.NBD_FLAG_SEND_FUA;
  if (caps.rotational) flags |= P.NBD_FLAG_ROTATIONAL;
  if (caps.canTrim && writable) flags |= P.NBD_FLAG_SEND_TRIM;
  if (caps.canZero && writable) {
    flags |= P.NBD_FLAG_SEND_WRITE_ZEROES;
    // FAST_ZERO is always answerable: either the device zeroes fast or we fail ENOTSUP at once.
    flags |= P.NBD_FLAG_SEND_FAST_ZERO;
  }
  // DF means "reply to READ in one chunk", which we always do; it only exists with structured replies.
  if (structuredReplies) flags |= P.NBD_FLAG_SEND_DF;
  if (caps.canMultiConn) flags |= P.NBD_FLAG_CAN_MULTI_CONN;
  if (caps.canCache) flags |= P.NBD_FLAG_SEND_CACHE;
  return flags;
}

export function blockSizesFor(device: BlockDevice, limits: NbdLimits): [number, number, number] {
  const caps = device.capabilities();
  const minimum = Math.max(1, caps.blockSizeMinimumBytes);
  const preferred = Math.max(minimum, caps.blockSizePreferredBytes);
  const maximum = Math.max(preferred, Math.min(caps.blockSizeMaximumBytes, limits.payloadMaxBytes));
  return [minimum, preferred, maximum];
}

function optionReply(option: number, type: number, data?: Buffer | string): Buffer {
  const body = typeof data === 'string' ? Buffer.from(data, 'utf8') : (data ?? Buffer.alloc(0));
  const reply = Buffer.allocUnsafe(20 + body.length);
  reply.writeBigUInt64BE(P.NBD_REP_MAGIC, 0);
  reply.writeUInt32BE(option, 8);
  reply.writeUInt32BE(type, 12);
  reply.writeUInt32BE(body.length, 16);
  body.copy(reply, 20);
  return reply;
}

/** Reads a u32-length-prefixed string from option data; null when it does not fit or is too long. */
function readString(data: Buffer, position: number, stringMaxBytes: number): [string, number] | null {
  if (position + 4 > data.length) return null;
  const length = data.readUInt32BE(position);
  if (length > stringMaxBytes || position + 4 + length > data.length) return null;
  return [data.toString('utf8', position + 4, position + 4 + length), position + 4 + length];
}

/**
 * Runs the option phase after the greeting has been sent. Resolves with the export the client chose (GO or
 * EXPORT_NAME); rejects with HandshakeEnd when the connection is to be closed.
 */
export async function negotiate(
  io: HandshakeIo,
  settingsNow: () => ExportSettings,
  tlsActive: () => boolean,
): Promise<NegotiatedExport> {
  const clientFlagsBytes = await io.read(4);
  const clientFlags = clientFlagsBytes.readUInt32BE(0);
  if ((clientFlags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)) !== 0) {
    throw new HandshakeEnd(`client flags 0x${clientFlags.toString(16)} include bits the server did not offer`);
  }
  const noZeroes = (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0;
  let structuredReplies = false;
  let baseAllocation = false;
  let optionCount = 0;

  for (;;) {
    const settings = settingsNow();
    const { limits, logger } = settings;
    optionCount += 1;
    if (optionCount > limits.optionCountMax) {
      throw new HandshakeEnd(`more than ${limits.optionCountMax} options; closing`);
    }
    const header = await io.read(16);
    if (header.readBigUInt64BE(0) !== P.NBD_IHAVEOPT) throw new HandshakeEnd('bad option magic');
    const option = header.readUInt32BE(8);
    const lengthBytes = header.readUInt32BE(12);
    logger.debug({ option: P.optionName(option), lengthBytes }, 'option');

    if (lengthBytes > limits.optionDataDisconnectBytes) {
      throw new HandshakeEnd(`${P.optionName(option)} with ${lengthBytes} bytes of data; closing`);
    }
    if (lengthBytes > limits.optionDataMaxBytes) {
      if (option === P.NBD_OPT_EXPORT_NAME) throw new HandshakeEnd('EXPORT_NAME too long; closing');
      await io.skip(lengthBytes);
      io.write(optionReply(option, P.NBD_REP_ERR_TOO_BIG, `option data of ${lengthBytes} bytes is too long`));
      continue;
    }
    const data = lengthBytes === 0 ? Buffer.alloc(0) : await io.read(lengthBytes);

    // With TLS configured, nothing but STARTTLS is answered in the clear: no export names, sizes or flags leak.
    if (settings.tlsConfigured && !tlsActive() && option !== P.NBD_OPT_STARTTLS) {
      if (option === P.NBD_OPT_EXPORT_NAME || option === P.NBD_OPT_ABORT) {
        throw new HandshakeEnd(`${P.optionName(option)} before STARTTLS; closing`);
      }
      io.write(optionReply(option, P.NBD_REP_ERR_TLS_REQD, 'TLS is required: send STARTTLS first'));
      continue;
    }

    switch (option) {
      case P.NBD_OPT_EXPORT_NAME: {
        const name = data.toString('utf8');
        await prepareExport(settings, name);
        const refusal = exportRefusal(settings, name);
        if (refusal !== null) throw new HandshakeEnd(`EXPORT_NAME "${name}": ${refusal}`);
        const flags = transmissionFlagsFor(settings.device, settings.readOnly, structuredReplies);
        const reply = Buffer.alloc(noZeroes ? 10 : 134);
        reply.writeBigUInt64BE(BigInt(settings.device.sizeBytes), 0);
        reply.writeUInt16BE(flags, 8);
        io.write(reply);
        return { device: settings.device, transmissionFlags: flags, structuredReplies, baseAllocation };
      }
      case P.NBD_OPT_ABORT:
        io.write(optionReply(option, P.NBD_REP_ACK));
        throw new HandshakeEnd('client sent ABORT');
      case P.NBD_OPT_LIST: {
        if (lengthBytes !== 0) {
          io.write(optionReply(option, P.NBD_REP_ERR_INVALID, 'LIST takes no data'));
          continue;
        }
        const name = Buffer.from(settings.exportName, 'utf8');
        const description = Buffer.from(settings.description ?? '', 'utf8');
        const body = Buffer.allocUnsafe(4 + name.length + description.length);
        body.writeUInt32BE(name.length, 0);
        name.copy(body, 4);
        description.copy(body, 4 + name.length);
        io.write(optionReply(option, P.NBD_REP_SERVER, body));
        io.write(optionReply(option, P.NBD_REP_ACK));
        continue;
      }
      case P.NBD_OPT_STARTTLS: {
        if (!settings.tlsConfigured) {
          io.write(optionReply(option, P.NBD_REP_ERR_UNSUP, 'this server is not configured for TLS'));
          continue;
        }
        if (tlsActive()) {
          io.write(optionReply(option, P.NBD_REP_ERR_INVALID, 'TLS is already active'));
          continue;
        }
        if (lengthBytes !== 0) {
          io.write(optionReply(option, P.NBD_REP_ERR_INVALID, 'STARTTLS takes no data'));
          continue;
        }
        io.write(optionReply(option, P.NBD_REP_ACK));
        await io.startTls();
        // State negotiated in the clear could have been injected by a man in the middle: forget it.
        structuredReplies = false;
        baseAllocation = false;
        continue;
      }
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO: {
        const parsed = parseInfoRequest(data, limits.stringMaxBytes);
        if (parsed === null) {
          io.write(optionReply(option, P.NBD_REP_ERR_INVALID, `malformed ${P.optionName(option)} data`));
          continue;
        }
        const [name, requests] = parsed;
        await prepareExport(settings, name);
        const refusal = exportRefusal(settings, name);
        if (refusal !== null) {
          const type = refusal.startsWith('no export') ? P.NBD_REP_ERR_UNKNOWN : P.NBD_REP_ERR_POLICY;
          io.write(optionReply(option, type, refusal));
          continue;
        }
        const { device } = settings;
        const flags = transmissionFlagsFor(device, settings.readOnly, structuredReplies);
        const exportInfo = Buffer.allocUnsafe(12);
        exportInfo.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
        exportInfo.writeBigUInt64BE(BigInt(device.sizeBytes), 2);
        exportInfo.writeUInt16BE(flags, 10);
        io.write(optionReply(option, P.NBD_REP_INFO, exportInfo));
        if (requests.includes(P.NBD_INFO_NAME)) {
          const nameInfo = Buffer.concat([Buffer.from([0, P.NBD_INFO_NAME]), Buffer.from(settings.exportName, 'utf8')]);
          io.write(optionReply(option, P.NBD_REP_INFO, nameInfo));
        }
        if (requests.includes(P.NBD_INFO_DESCRIPTION) && settings.description !== undefined) {
          const descriptionInfo = Buffer.concat([
            Buffer.from([0, P.NBD_INFO_DESCRIPTION]),
            Buffer.from(settings.description, 'utf8'),
          ]);
          io.write(optionReply(option, P.NBD_REP_INFO, descriptionInfo));
        }
        // Sent unasked as well: our minimum is what the device can do, so it never constrains a client wrongly.
        const [minimum, preferred, maximum] = blockSizesFor(device, limits);
        const blockSizeInfo = Buffer.allocUnsafe(14);
        blockSizeInfo.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
        blockSizeInfo.writeUInt32BE(minimum, 2);
        blockSizeInfo.writeUInt32BE(preferred, 6);
        blockSizeInfo.writeUInt32BE(maximum, 10);
        io.write(optionReply(option, P.NBD_REP_INFO, blockSizeInfo));
        io.write(optionReply(option, P.NBD_REP_ACK));
        if (option === P.NBD_OPT_GO) {
          return { device, transmissionFlags: flags, structuredReplies, baseAllocation };
        }
        continue;
      }
      case P.NBD_OPT_STRUCTURED_REPLY: {
        if (lengthBytes !== 0) {
          io.write(optionReply(option, P.NBD_REP_ERR_INVALID, 'STRUCTURED_REPLY takes no data'));
        } else if (structuredReplies) {
          io.write(optionReply(option, P.NBD_REP_ERR_INVALID, 'structured replies are already negotiated'));
        } else {
          structuredReplies = true;
          io.write(optionReply(option, P.NBD_REP_ACK));
        }
        continue;
      }
      case P.NBD_OPT_LIST_META_CONTEXT:
      case P.NBD_OPT_SET_META_CONTEXT: {
        if (!structuredReplies) {
          io.write(optionReply(option, P.NBD_REP_ERR_INVALID, 'meta contexts need STRUCTURED_REPLY first'));
          continue;
        }
        const parsed = parseMetaContextRequest(data, limits);
        if (parsed === null) {
          io.write(optionReply(option, P.NBD_REP_ERR_INVALID, `malformed ${P.optionName(option)} data`));
          continue;
        }
        const [name, queries] = parsed;
        if (name !== settings.exportName && name !== '') {
          io.write(optionReply(option, P.NBD_REP_ERR_UNKNOWN, `no export named "${name}"`));
          continue;
        }
        const isList = option === P.NBD_OPT_LIST_META_CONTEXT;
        let matched = false;
        if (isList) {
          matched = queries.length === 0 || queries.some((query) => query === 'base:' || query === P.META_CONTEXT_BASE_ALLOCATION);
        } else {
          matched = queries.includes(P.META_CONTEXT_BASE_ALLOCATION);
          // SET replaces any earlier selection, so a SET without base:allocation turns it off.
          baseAllocation = matched;
        }
        if (matched) {
          const name = Buffer.from(P.META_CONTEXT_BASE_ALLOCATION, 'ascii');
          const body = Buffer.allocUnsafe(4 + name.length);
          body.writeUInt32BE(isList ? 0 : P.META_CONTEXT_BASE_ALLOCATION_ID, 0);
          name.copy(body, 4);
          io.write(optionReply(option, P.NBD_REP_META_CONTEXT, body));
        }
        io.write(optionReply(option, P.NBD_REP_ACK));
        continue;
      }
      default:
        io.write(optionReply(option, P.NBD_REP_ERR_UNSUP, `option ${option} is not supported`));
        continue;
    }
  }
}

async function prepareExport(settings: ExportSettings, name: string): Promise<void> {
  if (settings.beforeExport === undefined || (name !== '' && name !== settings.exportName)) return;
  await settings.beforeExport();
}

function exportRefusal(settings: ExportSettings, name: string): string | null {
  if (name !== '' && name !== settings.exportName) return `no export named "${name}"`;
  return settings.device.exportRefusal?.() ?? null;
}

function parseInfoRequest(data: Buffer, stringMaxBytes: number): [string, number[]] | null {
  const nameField = readString(data, 0, stringMaxBytes);
  if (nameField === null) return null;
  const [name, position] = nameField;
  if (position + 2 > data.length) return null;
  const count = data.readUInt16BE(position);
  if (position + 2 + count * 2 !== data.length) return null;
  const requests: number[] = [];
  for (let index = 0; index < count; index += 1) requests.push(data.readUInt16BE(position + 2 + index * 2));
  return [name, requests];
}

function parseMetaContextRequest(data: Buffer, limits: NbdLimits): [string, string[]] | null {
  const nameField = readString(data, 0, limits.stringMaxBytes);
  if (nameField === null) return null;
  let [name, position] = nameField;
  if (position + 4 > data.length) return null;
  const count = data.readUInt32BE(position);
  position += 4;
  if (count > limits.metaContextQueriesMax) return null;
  const queries: string[] = [];
  for (let index = 0; index < count; index += 1) {
    const query = readString(data, position, limits.stringMaxBytes);
    if (query === null) return null;
    queries.push(query[0]);
    position = query[1];
  }
  if (position !== data.length) return null;
  return [name, queries];
}
