// The ordering gate: the set of block ranges with an operation in flight. An operation that overlaps one
// admitted earlier waits until that one leaves, so overlapping writes are applied in arrival order. The primary
// admits application writes (and resync reads) here; the secondary admits the writes it receives in the order
// they came off the data socket, so both replicas apply overlapping writes in the same order and never diverge.
// Dual-primary also keeps a second gate of its own writes awaiting the peer's verdict (device.ts): entries added
// without waiting (`add`), looked up by a peer write (`overlapping`), waited for (`whenLeft`).
import assert from 'node:assert/strict';

export interface GateEntry {
  readonly start: number;
  readonly end: number;
  /** Set by the gate; resolved when the entry leaves. */
  done: Promise<void> | null;
  release: (() => void) | null;
  tag: string;
}

export class IntervalGate {
  private readonly entries = new Set<GateEntry>();
  /** Operations ever delayed by an overlap (a counter for status and tests). */
  waits = 0;

  get size(): number {
    return this.entries.size;
  }

  /**
   * Admits [offset, offset+length). Returns the entry at once when nothing in flight overlaps (the common case:
   * no promise, no allocation beyond the entry), or a promise resolving once every earlier overlap has left.
   */
  enter(offset: number, lengthBytes: number, tag = 'write'): GateEntry | Promise<GateEntry> {
    assert.ok(lengthBytes >= 0 && offset >= 0, 'gate range out of bounds');
    const end = offset + Math.max(1, lengthBytes);
    let blockers: Array<Promise<void>> | null = null;
    for (const entry of this.entries) {
      if (entry.start < end && offset < entry.end) {
        blockers ??= [];
        blockers.push(this.whenLeft(entry));
      }
    }
    const entry = this.insert(offset, end, tag);
    if (blockers === null) return entry;
    this.waits += 1;
    return Promise.all(blockers).then(() => entry);
  }

  /** Admits [offset, offset+length) when nothing in flight overlaps it; null (nothing admitted) otherwise. */
  tryEnter(offset: number, lengthBytes: number, tag = 'write'): GateEntry | null {
    const end = offset + Math.max(1, lengthBytes);
    for (const entry of this.entries) if (entry.start < end && offset < entry.end) return null;
    return this.insert(offset, end, tag);
  }

  /** Adds [offset, offset+length) whatever overlaps it: a set of ranges, not an order. */
  add(offset: number, lengthBytes: number, tag = 'write'): GateEntry {
    return this.insert(offset, offset + Math.max(1, lengthBytes), tag);
  }

  /** The entries overlapping [offset, offset+length), or null when none does (no allocation then). */
  overlapping(offset: number, lengthBytes: number): GateEntry[] | null {
    const end = offset + Math.max(1, lengthBytes);
    let found: GateEntry[] | null = null;
    for (const entry of this.entries) if (entry.start < end && offset < entry.end) (found ??= []).push(entry);
    return found;
  }

  contains(entry: GateEntry): boolean {
    return this.entries.has(entry);
  }

  private insert(start: number, end: number, tag: string): GateEntry {
    const entry: GateEntry = { start, end, done: null, release: null, tag };
    this.entries.add(entry);
    return entry;
  }

  leave(entry: GateEntry): void {
    const removed = this.entries.delete(entry);
    assert.ok(removed, 'gate entry left twice');
    entry.release?.();
  }

  /** Every entry leaves (its waiters run). */
  leaveAll(): void {
    for (const entry of [...this.entries]) this.leave(entry);
  }

  /** Resolves when every entry in the gate now has left (later entries are not waited for). */
  drain(): Promise<void> {
    const pending = [...this.entries].map((entry) => this.whenLeft(entry));
    return pending.length === 0 ? Promise.resolve() : Promise.all(pending).then(() => undefined);
  }

  /** Resolves when `entry` leaves. */
  whenLeft(entry: GateEntry): Promise<void> {
    if (entry.done === null) {
      entry.done = new Promise<void>((resolve) => {
        entry.release = resolve;
      });
    }
    return entry.done;
  }
}
