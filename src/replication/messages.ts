// Control messages of the peer protocol (proto/peer.proto), loaded at runtime with protobufjs. Only control
// frames go through here; data and resync payloads stay raw bytes (see frame.ts).
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';
import { FrameError } from './frame.js';

// src/replication/ and dist/replication/ are both two levels below the repository root.
const protoPath = fileURLToPath(new URL('../../proto/peer.proto', import.meta.url));
const root = protobuf.loadSync(protoPath);

function type(name: string): protobuf.Type {
  return root.lookupType(`drbdts.peer.${name}`);
}

export const Messages = {
  Hello: type('Hello'),
  HelloReply: type('HelloReply'),
  AuthResponse: type('AuthResponse'),
  AuthResult: type('AuthResult'),
  NodeState: type('NodeState'),
  StateChange: type('StateChange'),
  SyncDecision: type('SyncDecision'),
  ResyncStart: type('ResyncStart'),
  ResyncDone: type('ResyncDone'),
  VerifyDone: type('VerifyDone'),
  Command: type('Command'),
  Disconnect: type('Disconnect'),
} as const;

/**
 * The peer protocol's version, checked by both sides of the handshake; a peer speaking another one is refused
 * with versionMismatch's message. 2: online verify compares per 4 KiB block (OV_RESULT); a version-1 peer
 * would read a summary digest as a digest of the data and find every range different.
 */
export const PROTOCOL_VERSION = 2;

const versionChanges: Record<number, string> = {
  1: 'online verify per 256 KiB',
  2: 'online verify per 4 KiB block',
};

/** Why a peer speaking `peerVersion` cannot be connected to, for the logs of both nodes. */
export function versionMismatch(peer: string, peerVersion: number): string {
  const what = (version: number): string => versionChanges[version] === undefined ? '' : ` (${versionChanges[version]})`;
  return `node ${peer} speaks peer protocol version ${peerVersion}${what(peerVersion)}, this node version `
    + `${PROTOCOL_VERSION}${what(PROTOCOL_VERSION)}: run the same drbdts version on both nodes`;
}

export interface HelloMessage {
  protocolVersion: number;
  resource: string;
  node: string;
  peerNode: string;
  channel: number;
  challenge: Buffer;
  session: Buffer;
}
export interface HelloReplyMessage {
  protocolVersion: number;
  node: string;
  challenge: Buffer;
  response: Buffer;
}
export interface NodeStateMessage {
  node: string;
  sizeBytes: bigint;
  currentUuid: bigint;
  bitmapUuid: bigint;
  historyUuids: bigint[];
  role: string;
  disk: string;
  consistent: boolean;
  wasPrimary: boolean;
  crashedPrimary: boolean;
  discardMyData: boolean;
  dirtyBlocks: bigint;
  protocol: string;
  resyncInProgress: boolean;
  allowTwoPrimaries: boolean;
  lastPromotedMs: bigint;
  verifyAlg: string;
}
export interface StateChangeMessage {
  role: string;
  disk: string;
  currentUuid: bigint;
  bitmapUuid: bigint;
  historyUuids: bigint[];
  /** The sender (a protocol A Primary) pulled ahead: its writes only mark its bitmap until the queue drains. */
  ahead?: boolean;
}

/** uint64 fields travel as decimal strings into protobufjs and come back as bigint. */
function toWire(value: unknown): unknown {
  if (typeof value === 'bigint') return value.toString();
  if (Array.isArray(value)) return value.map(toWire);
  return value;
}

export function encodeMessage(messageType: protobuf.Type, value: object): Uint8Array {
  const plain: Record<string, unknown> = {};
  for (const [key, field] of Object.entries(value)) plain[key] = toWire(field);
  const error = messageType.verify(messageType.fromObject(plain));
  if (error !== null) throw new Error(`encoding ${messageType.name}: ${error}`);
  return messageType.encode(messageType.fromObject(plain)).finish();
}

export function decodeMessage<T>(messageType: protobuf.Type, body: Buffer): T {
  let message: protobuf.Message;
  try {
    message = messageType.decode(body);
  } catch (error) {
    throw new FrameError(`undecodable ${messageType.name} message: ${(error as Error).message}`);
  }
  const object = messageType.toObject(message, { longs: String, bytes: Buffer, defaults: true, arrays: true });
  for (const field of messageType.fieldsArray) {
    if (field.type === 'uint64' || field.type === 'int64') {
      const value = object[field.name];
      object[field.name] = Array.isArray(value) ? value.map((item) => BigInt(item)) : BigInt(value ?? 0);
    }
  }
  return object as T;
}
