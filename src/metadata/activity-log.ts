// The activity log: the set of "hot" 4 MiB extents that may have writes in flight. A write to a cold extent
// waits until the new hot set is durable on disk, so that after a primary crash only the hot extents (at most
// maxHotExtents * 4 MiB, 4.8 GiB by default) need resync instead of the whole device. Writes to hot extents
// cost nothing here (no I/O, no allocation: they get one shared resolved promise).
//
// Batching: while one transaction is being persisted, new cold-extent writers queue up and the next
// transaction covers all of them, so N concurrent writers to N cold extents cost about two metadata writes.
// A sequential stream does not wait at all in the steady state: the transaction for the extents ahead of it
// starts while it still writes into hot ones (look-ahead, below).
//
// Eviction: the least recently used extent with no writes in flight leaves the set. Its bitmap bits must be
// on disk before the AL stops covering it (the persist callback gets the evicted extents and writes the bitmap
// first). An extent being evicted is treated as cold until the transaction completes, so no write can slip
// into an extent the on-disk AL no longer covers.
import assert from 'node:assert/strict';

export const AL_EXTENT_BYTES = 4 * 1024 * 1024;
export const AL_EXTENTS_DEFAULT = 1237;
/** A 32 MiB request spans at most 9 extents; fewer hot extents than this could never admit it. */
export const AL_EXTENTS_MIN = 16;
/**
 * Writes spanning more extents than this (big TRIM / WRITE_ZEROES, up to 4 GiB in one NBD request) are not
 * made hot extent by extent: that would flush the whole hot set out (and could never fit a small AL). The
 * transaction records them as one range instead, kept on disk until a later transaction after they end.
 */
export const AL_WIDE_SPAN_EXTENTS = 16;
/** Wide ranges in flight at once (each costs 8 bytes of the AL record); more wide writers wait. */
export const AL_WIDE_MAX = 32;
/**
 * Sequential read-ahead for the AL: when a write makes extent N hot and N-1 is hot already (a stream), the same
 * transaction also takes N+1..N+AL_PREFETCH_EXTENTS, so a sequential stream pays one metadata write per 16 MiB
 * instead of per 4 MiB (each is an O_DSYNC write, a journal commit on ext4). Random writes never prefetch.
 * The crash guarantee is unchanged: a prefetched extent is only more to resync after a crash.
 */
export const AL_PREFETCH_EXTENTS = 3;
/**
 * Look-ahead for streams, so that the read-ahead above does not stall them: a write continuing a stream (its
 * offset is where the previous write ended) past the middle of a hot extent whose successor is cold starts a
 * transaction in the background for the next AL_LOOKAHEAD_EXTENTS extents. The stream keeps writing into its hot extents
 * meanwhile; the next extent is usually hot before it gets there (one O_DSYNC write overlapped, not waited for).
 */
export const AL_LOOKAHEAD_EXTENTS = 4;

export interface ExtentRange {
  firstExtent: number;
  lastExtent: number;
}

export interface ActivityLogOptions {
  dataSizeBytes: number;
  maxHotExtents?: number;
  /** Extents found hot on disk at open (the caller has already set their bitmap bits after a crash). */
  initialHot?: readonly number[];
  /**
   * Durably records the new hot set and the wide ranges in flight. `evicted` left the hot set: their bitmap
   * bits must be on disk first.
   */
  persist(hotExtents: readonly number[], evicted: readonly number[], wideRanges: readonly ExtentRange[]): Promise<void>;
}

interface Waiter {
  firstExtent: number;
  lastExtent: number;
  wide: boolean;
  resolve: () => void;
  reject: (error: Error) => void;
}

const RESOLVED: Promise<void> = Promise.resolve();

interface HotSlot {
  refs: number;
  lastUsedTick: number;
}

export class ActivityLog {
  readonly dataSizeBytes: number;
  readonly maxHotExtents: number;
  readonly extentCount: number;
  /**
   * Hot extent -> its slot: writes in flight and the tick of its last use (LRU). Slots are mutated in place so
   * that the hot path (a write to a hot extent) allocates nothing and never reshapes the map.
   */
  readonly #hot = new Map<number, HotSlot>();
  #tick = 0;
  readonly #evicting = new Set<number>();
  /** Wide writes in flight, each persisted as a range before it started. */
  readonly #wide: ExtentRange[] = [];
  readonly #waiters: Waiter[] = [];
  readonly #persist: ActivityLogOptions['persist'];
  #persisting = false;
  /** Where the last write ended: a write starting here continues a stream. */
  #streamOffset = -1;
  /** Extents a stream will reach soon, for the next transaction (look-ahead; nothing waits for them). */
  #lookaheadFirst = -1;
  #lookaheadLast = -1;
  #inFlight = 0;
  #transactions = 0;

  constructor(options: ActivityLogOptions) {
    this.dataSizeBytes = options.dataSizeBytes;
    this.maxHotExtents = options.maxHotExtents ?? AL_EXTENTS_DEFAULT;
    assert.ok(this.maxHotExtents >= AL_EXTENTS_MIN, `al-extents ${this.maxHotExtents} below ${AL_EXTENTS_MIN}`);
    this.extentCount = Math.ceil(options.dataSizeBytes / AL_EXTENT_BYTES);
    this.#persist = options.persist;
    for (const extent of options.initialHot ?? []) {
      if (extent < this.extentCount && this.#hot.size < this.maxHotExtents) this.#hot.set(extent, { refs: 0, lastUsedTick: 0 });
    }
  }

  get transactions(): number {
    return this.#transactions;
  }

  static extentRange(extent: number, dataSizeBytes: number): { offsetBytes: number; lengthBytes: number } {
    const offsetBytes = extent * AL_EXTENT_BYTES;
    assert.ok(offsetBytes < dataSizeBytes, `extent ${extent} beyond the data area`);
    return { offsetBytes, lengthBytes: Math.min(AL_EXTENT_BYTES, dataSizeBytes - offsetBytes) };
  }

  hotExtents(): number[] {
    return [...this.#hot.keys()].sort((a, b) => a - b);
  }

  wideRanges(): ExtentRange[] {
    return this.#wide.map((range) => ({ ...range }));
  }

  inFlightWrites(): number {
    return this.#inFlight;
  }

  #checkRange(offsetBytes: number, lengthBytes: number): void {
    // `if` first: a template-literal message would be built on every call of the hot path.
    if (!(lengthBytes > 0 && offsetBytes >= 0 && offsetBytes + lengthBytes <= this.dataSizeBytes)) {
      assert.fail(`activity log range ${offsetBytes}+${lengthBytes} outside ${this.dataSizeBytes}`);
    }
  }

  #allHot(first: number, last: number): boolean {
    for (let extent = first; extent <= last; extent += 1) {
      if (!this.#hot.has(extent) || this.#evicting.has(extent)) return false;
    }
    return true;
  }

  #take(first: number, last: number): void {
    this.#tick += 1;
    for (let extent = first; extent <= last; extent += 1) {
      const slot = this.#hot.get(extent)!;
      slot.refs += 1;
      slot.lastUsedTick = this.#tick;
    }
    this.#inFlight += 1;
  }

  /**
   * beginWrite's hot path without a promise: true when every extent is hot (they are referenced now, as by
   * beginWrite); false, with nothing changed, when the caller must use beginWrite.
   */
  tryBeginWrite(offsetBytes: number, lengthBytes: number): boolean {
    this.#checkRange(offsetBytes, lengthBytes);
    const first = Math.floor(offsetBytes / AL_EXTENT_BYTES);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / AL_EXTENT_BYTES);
    if (last - first + 1 > AL_WIDE_SPAN_EXTENTS || !this.#allHot(first, last)) return false;
    const continuesStream = offsetBytes === this.#streamOffset;
    this.#streamOffset = offsetBytes + lengthBytes;
    this.#take(first, last);
    if (continuesStream && !this.#persisting) this.#lookAhead(last + 1, offsetBytes + lengthBytes);
    return true;
  }

  beginWrite(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.#checkRange(offsetBytes, lengthBytes);
    const first = Math.floor(offsetBytes / AL_EXTENT_BYTES);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / AL_EXTENT_BYTES);
    if (last - first + 1 > AL_WIDE_SPAN_EXTENTS) {
      return new Promise<void>((resolve, reject) => {
        this.#waiters.push({ firstExtent: first, lastExtent: last, wide: true, resolve, reject });
        this.#schedule();
      });
    }
    const continuesStream = offsetBytes === this.#streamOffset;
    this.#streamOffset = offsetBytes + lengthBytes;
    // Hot writes never wait, not even behind a transaction in progress: the AL must cost nothing in the
    // common case. (A cold writer cannot starve: it needs one idle extent among maxHotExtents.)
    if (this.#allHot(first, last)) {
      this.#take(first, last);
      if (continuesStream && !this.#persisting) this.#lookAhead(last + 1, offsetBytes + lengthBytes);
      return RESOLVED;
    }
    return new Promise<void>((resolve, reject) => {
      this.#waiters.push({ firstExtent: first, lastExtent: last, wide: false, resolve, reject });
      this.#schedule();
    });
  }

  /**
   * A stream in a hot extent: once it is past the middle of it and `next` is cold, make `next` and a few after
   * it hot in the background (a stream within the first half of an extent costs nothing).
   */
  #lookAhead(next: number, endBytes: number): void {
    if (next >= this.extentCount || next * AL_EXTENT_BYTES - endBytes >= AL_EXTENT_BYTES / 2 || this.#hot.has(next)) return;
    this.#lookaheadFirst = next;
    this.#lookaheadLast = Math.min(this.extentCount - 1, next + AL_LOOKAHEAD_EXTENTS - 1);
    this.#schedule();
  }

  endWrite(offsetBytes: number, lengthBytes: number): void {
    this.#checkRange(offsetBytes, lengthBytes);
    const first = Math.floor(offsetBytes / AL_EXTENT_BYTES);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / AL_EXTENT_BYTES);
    if (last - first + 1 > AL_WIDE_SPAN_EXTENTS) {
      const index = this.#wide.findIndex((range) => range.firstExtent === first && range.lastExtent === last);
      assert.ok(index !== -1, `endWrite on a wide range ${first}..${last} without a beginWrite`);
      // Dropped from memory now; from the on-disk record at the next transaction (stale is safe: more resync).
      this.#wide.splice(index, 1);
      this.#inFlight -= 1;
      if (this.#waiters.length > 0) this.#schedule();
      return;
    }
    for (let extent = first; extent <= last; extent += 1) {
      const slot = this.#hot.get(extent);
      if (slot === undefined || slot.refs <= 0) assert.fail(`endWrite on extent ${extent} without a beginWrite`);
      slot.refs -= 1;
    }
    if (this.#inFlight <= 0) assert.fail('endWrite with no write in flight');
    this.#inFlight -= 1;
    if (this.#waiters.length > 0) this.#schedule();
  }

  #schedule(): void {
    if (this.#persisting) return;
    this.#persisting = true;
    queueMicrotask(() => void this.#runTransaction());
  }

  async #runTransaction(): Promise<void> {
    try {
      for (;;) {
        // Admit waiters whose extents are all hot now (another transaction made them hot).
        while (this.#waiters.length > 0) {
          const head = this.#waiters[0]!;
          if (head.wide || !this.#allHot(head.firstExtent, head.lastExtent)) break;
          this.#waiters.shift();
          this.#take(head.firstExtent, head.lastExtent);
          head.resolve();
        }
        const lookaheadFirst = this.#lookaheadFirst;
        const lookaheadLast = this.#lookaheadLast;
        this.#lookaheadFirst = this.#lookaheadLast = -1;
        if (this.#waiters.length === 0 && lookaheadFirst < 0) return;
        // Plan one transaction for as many waiters (in order) as the free room allows.
        const needed = new Set<number>();
        const reserved = new Set<number>(); // idle hot extents an admitted waiter will use: not evictable
        const admitted: Waiter[] = [];
        let idle = 0;
        for (const slot of this.#hot.values()) if (slot.refs === 0) idle += 1;
        let room = this.maxHotExtents - this.#hot.size + idle;
        let wideRoom = AL_WIDE_MAX - this.#wide.length;
        for (const waiter of this.#waiters) {
          if (waiter.wide) {
            if (wideRoom === 0) break;
            wideRoom -= 1;
            admitted.push(waiter);
            continue;
          }
          let cost = 0;
          for (let extent = waiter.firstExtent; extent <= waiter.lastExtent; extent += 1) {
            const refs = this.#hot.get(extent)?.refs;
            if (refs === undefined ? !needed.has(extent) : refs === 0 && !reserved.has(extent)) cost += 1;
          }
          if (cost > room) break;
          room -= cost;
          for (let extent = waiter.firstExtent; extent <= waiter.lastExtent; extent += 1) {
            const refs = this.#hot.get(extent)?.refs;
            if (refs === undefined) needed.add(extent);
            else if (refs === 0) reserved.add(extent);
          }
          admitted.push(waiter);
        }
        // Read-ahead for streams, in whatever room is left after the writers themselves.
        for (const waiter of admitted) {
          if (waiter.wide || room === 0) continue;
          const first = waiter.firstExtent;
          if (!needed.has(waiter.lastExtent) || first === 0) continue;
          if (!this.#hot.has(first - 1) && !needed.has(first - 1)) continue;
          for (let extent = waiter.lastExtent + 1; extent <= waiter.lastExtent + AL_PREFETCH_EXTENTS; extent += 1) {
            if (extent >= this.extentCount || room === 0) break;
            if (this.#hot.has(extent) || needed.has(extent)) continue;
            needed.add(extent);
            room -= 1;
          }
        }
        // Look-ahead for a stream, only when no writer waits for room (it must never take a writer's place).
        if (lookaheadFirst >= 0 && admitted.length === this.#waiters.length) {
          for (let extent = lookaheadFirst; extent <= lookaheadLast && room > 0; extent += 1) {
            if (this.#hot.has(extent) || needed.has(extent)) continue;
            needed.add(extent);
            room -= 1;
          }
        }
        // Least recently used first. A scan of the hot set per transaction: transactions are the rare path.
        const evictable: number[] = [];
        for (const [extent, slot] of this.#hot) if (slot.refs === 0 && !reserved.has(extent)) evictable.push(extent);
        evictable.sort((a, b) => this.#hot.get(a)!.lastUsedTick - this.#hot.get(b)!.lastUsedTick);
        // No room: endWrite() reschedules when an extent frees up. (Nothing needed: the look-ahead is hot already.)
        if (admitted.length === 0 && (this.#waiters.length > 0 || needed.size === 0)) return;
        let overflow = this.#hot.size + needed.size - this.maxHotExtents;
        const evicted: number[] = [];
        for (const extent of evictable) {
          if (overflow <= 0) break;
          evicted.push(extent);
          overflow -= 1;
        }
        assert.ok(overflow <= 0, 'activity log planned more extents than it has room for');
        for (const extent of evicted) this.#evicting.add(extent);
        const next = new Set(this.#hot.keys());
        for (const extent of evicted) next.delete(extent);
        for (const extent of needed) next.add(extent);
        const wide = this.#wide.map((range) => ({ ...range }));
        for (const waiter of admitted) {
          if (waiter.wide) wide.push({ firstExtent: waiter.firstExtent, lastExtent: waiter.lastExtent });
        }
        try {
          await this.#persist([...next].sort((a, b) => a - b), evicted, wide);
        } catch (error) {
          for (const extent of evicted) this.#evicting.delete(extent);
          const failure = new Error(`activity log write failed: ${(error as Error).message}`, { cause: error });
          for (const waiter of admitted) {
            this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
            waiter.reject(failure);
          }
          continue;
        }
        this.#transactions += 1;
        for (const extent of evicted) {
          // Nothing can have taken a reference: evicting extents count as cold for beginWrite.
          assert.equal(this.#hot.get(extent)!.refs, 0, `evicted extent ${extent} gained a writer`);
          this.#hot.delete(extent);
          this.#evicting.delete(extent);
        }
        for (const extent of needed) this.#hot.set(extent, { refs: 0, lastUsedTick: this.#tick });
        for (const waiter of admitted) {
          this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
          if (waiter.wide) {
            this.#wide.push({ firstExtent: waiter.firstExtent, lastExtent: waiter.lastExtent });
            this.#inFlight += 1;
          } else {
            this.#take(waiter.firstExtent, waiter.lastExtent);
          }
          waiter.resolve();
        }
      }
    } finally {
      this.#persisting = false;
    }
  }
}
