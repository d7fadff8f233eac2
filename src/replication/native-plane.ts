// The JavaScript side of the native replication data plane (native/src/repl_plane.cc): one ReplPlane per
// replicated device, its events routed to the device (bitmap marks, quiesce) and to the peer connection whose
// native transport they concern (frames, close, drain). docs/replication.md, "The native data plane".
import { ReplEventKind, ReplPlane, type ReplEvent } from '../native/index.js';
import type { Logger } from '../util/log.js';

/** Which replication data path a daemon uses: DRBDTS_REPL_DATA_PATH=js|native (default native). */
export type ReplicationDataPath = 'js' | 'native';

export function replicationDataPathFromEnv(env: NodeJS.ProcessEnv = process.env): ReplicationDataPath {
  const value = env.DRBDTS_REPL_DATA_PATH;
  if (value === undefined || value === '' || value === 'native') return 'native';
  if (value === 'js') return 'js';
  throw new Error(`DRBDTS_REPL_DATA_PATH must be "js" or "native", got "${value}"`);
}

export class NativePlaneHub {
  readonly plane: ReplPlane;
  private readonly transports = new Map<number, (event: ReplEvent) => void>();
  /** Native writes the peer did not confirm (pairs of offset, length): set them in the bitmap, then release. */
  onMark: (ranges: number[]) => void = () => {};
  onQuiesced: () => void = () => {};
  onPeerWriteFailed: (ranges: number[], reason: string) => void = () => {};

  constructor(private readonly logger: Logger) {
    this.plane = new ReplPlane((events) => this.dispatch(events));
  }

  register(transport: number, handler: (event: ReplEvent) => void): void {
    this.transports.set(transport, handler);
  }

  unregister(transport: number): void {
    this.transports.delete(transport);
  }

  private dispatch(events: ReplEvent[]): void {
    for (const event of events) {
      try {
        switch (event.kind) {
          case ReplEventKind.Mark:
            // Marks first, release after: the writes are answered only once their blocks are in the bitmap.
            try {
              this.onMark(event.ranges ?? []);
            } finally {
              this.plane.releaseMarks(event.token!);
            }
            break;
          case ReplEventKind.Quiesced:
            this.onQuiesced();
            break;
          case ReplEventKind.PeerWriteFailed:
            this.onPeerWriteFailed(event.ranges ?? [], event.reason ?? 'unknown error');
            break;
          default:
            this.transports.get(event.transport)?.(event);
        }
      } catch (error) {
        this.logger.error({ err: error, kind: ReplEventKind[event.kind] }, 'native plane event handling failed');
      }
    }
  }
}
