// Every limit the NBD server enforces, in one place (as nbdkit's MAX_REQUEST_SIZE, MAX_NR_OPTIONS and
// NBD_MAX_STRING). A hostile client can make the server hold at most these many bytes, options or requests.

export interface NbdLimits {
  /** Options per connection before the handshake must end (nbdkit: MAX_NR_OPTIONS = 32). */
  optionCountMax: number;
  /**
   * Option data we will read into memory. Known options are all far smaller; a longer option is drained
   * without buffering and answered with an error (or the connection dropped past optionDataDisconnectBytes).
   */
  optionDataMaxBytes: number;
  /** Option data past which we stop draining and drop the connection (nbdkit drops > 64 MiB). */
  optionDataDisconnectBytes: number;
  /** Strings in options: export names, descriptions, meta context queries (NBD_MAX_STRING = 4096). */
  stringMaxBytes: number;
  /** Meta context queries in one LIST/SET_META_CONTEXT. */
  metaContextQueriesMax: number;
  /** The largest READ/WRITE payload, advertised as the BLOCK_SIZE maximum (32 MiB, as the spec suggests). */
  payloadMaxBytes: number;
  /**
   * A WRITE announcing more than this is not drained but disconnected (nbdkit: MAX_REQUEST_SIZE 64 MiB):
   * draining gigabytes to keep a broken client in sync is not worth the bandwidth.
   */
  writeDisconnectBytes: number;
  /** Payload bytes (write data and read replies) in flight on one connection before we stop reading it. */
  connectionInFlightBytesMax: number;
  /** Requests in flight on one connection before we stop reading it (bounds per-request bookkeeping). */
  connectionInFlightRequestsMax: number;
  /** Payload bytes in flight over all connections before every connection stops reading. */
  serverInFlightBytesMax: number;
  /** How long a client may take from accept to the end of the handshake. */
  handshakeTimeoutMs: number;
  /** Connections at once; further ones are closed on accept. */
  connectionsMax: number;
}

export const defaultLimits: NbdLimits = {
  optionCountMax: 32,
  optionDataMaxBytes: 64 * 1024,
  optionDataDisconnectBytes: 64 * 1024 * 1024,
  stringMaxBytes: 4096,
  metaContextQueriesMax: 128,
  payloadMaxBytes: 32 * 1024 * 1024,
  writeDisconnectBytes: 64 * 1024 * 1024,
  connectionInFlightBytesMax: 64 * 1024 * 1024,
  connectionInFlightRequestsMax: 256,
  serverInFlightBytesMax: 256 * 1024 * 1024,
  handshakeTimeoutMs: 60_000,
  connectionsMax: 1024,
};

export function resolveLimits(overrides: Partial<NbdLimits> | undefined): NbdLimits {
  const limits: NbdLimits = { ...defaultLimits, ...overrides };
  for (const [key, value] of Object.entries(limits)) {
    if (!Number.isSafeInteger(value) || value <= 0) {
      throw new Error(`NBD limit ${key}: ${String(value)} is not a positive whole number`);
    }
  }
  if (limits.payloadMaxBytes > limits.writeDisconnectBytes) {
    throw new Error('NBD limit payloadMaxBytes must not exceed writeDisconnectBytes');
  }
  if (limits.payloadMaxBytes > 0xffffffff) throw new Error('NBD limit payloadMaxBytes must fit in 32 bits');
  return limits;
}
