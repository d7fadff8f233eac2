// `[resource] auto-promote = true`, as DRBD 9's auto-promote: an NBD client asking for the export of a Secondary
// promotes it first (when the promotion is allowed: UpToDate, no resync into this node, no Primary peer unless
// allow-two-primaries), and the last client leaving a node that was promoted this way demotes it again. A node
// promoted by an operator (`drbdts primary`) stays Primary. Counted are NBD connections to the export, so the
// kernel client a node with `device` attaches while Primary is one too: such a node stays Primary until
// `drbdts secondary`.
import type { Logger } from '../util/log.js';

export interface AutoPromoteTarget {
  role(): 'Primary' | 'Secondary';
  /** The daemon's `primary` and `secondary` commands: they refuse with the reason when not allowed. */
  promote(): Promise<unknown>;
  demote(): Promise<unknown>;
}

export class AutoPromoter {
  #autoPromoted = false;
  /** Promotions and demotions one at a time, in the order clients came and went. */
  #queue: Promise<void> = Promise.resolve();

  constructor(private readonly target: AutoPromoteTarget, private readonly logger: Logger) {}

  /** Before a client gets the export. A refused promotion is logged; the client then gets the usual refusal. */
  beforeExport(): Promise<void> {
    // Primary already (the kernel client attaching during a promotion lands here): nothing to wait for.
    if (this.target.role() === 'Primary') return Promise.resolve();
    return this.#enqueue(async () => {
      if (this.target.role() === 'Primary') return;
      try {
        await this.target.promote();
        this.#autoPromoted = true;
        this.logger.info('auto-promote: promoted to Primary for an NBD client');
      } catch (error) {
        this.logger.warn({ reason: (error as Error).message }, 'auto-promote: promotion refused, the client is turned away');
      }
    });
  }

  /** After a client connection closed; `remaining` are still open. */
  connectionClosed(remaining: number): void {
    if (remaining > 0 || !this.#autoPromoted) return;
    void this.#enqueue(async () => {
      if (!this.#autoPromoted || this.target.role() !== 'Primary') {
        this.#autoPromoted = false;
        return;
      }
      try {
        await this.target.demote();
        this.#autoPromoted = false;
        this.logger.info('auto-promote: the last NBD client left, demoted to Secondary');
      } catch (error) {
        // A client that connected meanwhile keeps it Primary; its own close tries again.
        this.logger.info({ reason: (error as Error).message }, 'auto-promote: staying Primary');
      }
    });
  }

  /** An operator's `primary` or `secondary`: the role is theirs from now on. */
  operatorChangedRole(): void {
    this.#autoPromoted = false;
  }

  #enqueue(step: () => Promise<void>): Promise<void> {
    const next = this.#queue.then(step);
    this.#queue = next.catch(() => {});
    return next;
  }
}
