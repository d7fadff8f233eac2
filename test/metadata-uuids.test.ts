// The connect-time sync decision (src/metadata/uuids.ts): every row of DRBD's UUID table, the after-sb
// policies and --discard-my-data, and the property both nodes rely on: deciding from either side gives
// mirrored answers (source <-> target), checked over a generated set of UUID histories. Also replays the
// story of a real failover with Metadata's UUID rotation on real files.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Bitmap } from '../src/metadata/bitmap.js';
import { Metadata } from '../src/metadata/metadata.js';
import { decideSync, formatUuid, newUuid, type AfterSbPolicies, type SyncKind, type SyncView } from '../src/metadata/uuids.js';

function view(nodeName: string, current: bigint, bitmap = 0n, history: [bigint, bigint] = [0n, 0n], extra: Partial<SyncView> = {}): SyncView {
  return {
    nodeName, uuids: { current, bitmap, history }, consistent: current !== 0n, role: 'Secondary', crashedPrimary: false,
    dirtyBlocks: 0, lastPromotedMs: 0, discardMyData: false, ...extra,
  };
}

const mirror: Record<SyncKind, SyncKind> = {
  none: 'none', source: 'target', target: 'source', 'full-source': 'full-target', 'full-target': 'full-source',
  'split-brain': 'split-brain', unrelated: 'unrelated', 'wait-for-operator': 'wait-for-operator',
};

function both(a: SyncView, b: SyncView, policies?: AfterSbPolicies): SyncKind {
  const fromA = decideSync(a, b, policies);
  const fromB = decideSync(b, a, policies);
  expect(fromB.kind, `${a.nodeName}: ${fromA.reason} / ${b.nodeName}: ${fromB.reason}`).toBe(mirror[fromA.kind]);
  return fromA.kind;
}

const X = 0x1111n, Y = 0x2222n, Z = 0x3333n, W = 0x4444n;

describe('decideSync: the UUID table', () => {
  it('fresh pair waits for the operator', () => {
    expect(both(view('alice', 0n), view('bob', 0n))).toBe('wait-for-operator');
    expect(decideSync(view('alice', 0n), view('bob', 0n)).reason).toContain('primary --force');
  });
  it('one fresh side gets a full sync', () => {
    expect(both(view('alice', X), view('bob', 0n))).toBe('full-source');
  });
  it('equal current UUIDs: nothing to sync, unless a side is Inconsistent or crashed as Primary', () => {
    expect(both(view('alice', X), view('bob', X))).toBe('none');
    expect(both(view('alice', X, 0n, [0n, 0n], { consistent: false }), view('bob', X))).toBe('target');
    expect(both(view('alice', X, 0n, [0n, 0n], { crashedPrimary: true, dirtyBlocks: 9 }), view('bob', X))).toBe('source');
    // ...but not over a peer promoted meanwhile (no write yet, so no new generation): its data is in use.
    expect(both(view('alice', X, 0n, [0n, 0n], { crashedPrimary: true, dirtyBlocks: 9 }), view('bob', X, 0n, [0n, 0n], { role: 'Primary' }))).toBe('target');
    expect(both(view('alice', X, 0n, [0n, 0n], { consistent: false }), view('bob', X, 0n, [0n, 0n], { consistent: false }))).toBe('wait-for-operator');
    expect(both(view('alice', X, 0n, [0n, 0n], { dirtyBlocks: 3 }), view('bob', X, 0n, [0n, 0n], { role: 'Primary' }))).toBe('target');
  });
  it('my bitmap UUID is the peer current: I am the bitmap-based source', () => {
    expect(both(view('alice', Y, X), view('bob', X))).toBe('source');
  });
  it('my current is in the peer history: full sync, I am the target', () => {
    expect(both(view('alice', X), view('bob', Z, Y, [X, 0n]))).toBe('full-target');
  });
  it('same bitmap UUID, different current: split brain, manual by default', () => {
    const decision = decideSync(view('alice', Y, X), view('bob', Z, X));
    expect(decision.kind).toBe('split-brain');
    expect(decision.reason).toContain('--discard-my-data');
    expect(both(view('alice', Y, X), view('bob', Z, X))).toBe('split-brain');
  });
  it('nothing shared: unrelated', () => {
    const decision = decideSync(view('alice', X, Y), view('bob', Z, W));
    expect(decision.kind).toBe('unrelated');
    expect(decision.reason).toContain(formatUuid(X));
  });
});

describe('decideSync: split-brain recovery', () => {
  const policies = (p: Partial<AfterSbPolicies>): AfterSbPolicies => ({ afterSb0pri: 'disconnect', afterSb1pri: 'disconnect', afterSb2pri: 'disconnect', ...p });
  const a = (extra: Partial<SyncView> = {}): SyncView => view('alice', Y, X, [0n, 0n], extra);
  const b = (extra: Partial<SyncView> = {}): SyncView => view('bob', Z, X, [0n, 0n], extra);

  it('--discard-my-data on one side makes it the target, and only in a split brain', () => {
    expect(both(a({ discardMyData: true }), b())).toBe('target');
    expect(both(a({ discardMyData: true }), b({ discardMyData: true }))).toBe('split-brain');
    // Not a split brain: alice is simply ahead, and stays the source despite the option.
    expect(both(view('alice', Y, X, [0n, 0n], { discardMyData: true }), view('bob', X))).toBe('source');
    // Split brain with an ancestor only in history: a full sync toward the node that discards.
    expect(both(view('alice', Y, 0n, [X, 0n], { discardMyData: true }), view('bob', Z, 0n, [X, 0n]))).toBe('full-target');
    expect(both(view('alice', Y, 0n, [X, 0n]), view('bob', Z, 0n, [X, 0n]))).toBe('split-brain');
  });
  it('after-sb-0pri policies', () => {
    expect(both(a({ dirtyBlocks: 0 }), b({ dirtyBlocks: 5 }), policies({ afterSb0pri: 'discard-zero-changes' }))).toBe('target');
    expect(both(a({ dirtyBlocks: 9 }), b({ dirtyBlocks: 5 }), policies({ afterSb0pri: 'discard-least-changes' }))).toBe('source');
    expect(both(a({ lastPromotedMs: 200 }), b({ lastPromotedMs: 100 }), policies({ afterSb0pri: 'discard-younger-primary' }))).toBe('target');
    expect(both(a({ lastPromotedMs: 200 }), b({ lastPromotedMs: 100 }), policies({ afterSb0pri: 'discard-older-primary' }))).toBe('source');
    expect(both(a(), b(), policies({ afterSb0pri: 'discard-node-bob' }))).toBe('source');
  });
  it('after-sb-1pri: discard-secondary, and consensus only when 0pri picks the Secondary', () => {
    expect(both(a({ role: 'Primary' }), b(), policies({ afterSb1pri: 'discard-secondary' }))).toBe('source');
    expect(both(a({ role: 'Primary' }), b(), policies({ afterSb1pri: 'consensus', afterSb0pri: 'discard-node-bob' }))).toBe('source');
    expect(both(a({ role: 'Primary' }), b(), policies({ afterSb1pri: 'consensus', afterSb0pri: 'discard-node-alice' }))).toBe('split-brain');
  });
  it('two Primaries never resolve automatically', () => {
    expect(both(a({ role: 'Primary' }), b({ role: 'Primary' }), policies({ afterSb0pri: 'discard-node-bob', afterSb1pri: 'discard-secondary' }))).toBe('split-brain');
  });
});

describe('decideSync: symmetry over generated histories', () => {
  it('both sides always agree', () => {
    const pool = [0n, X, Y, Z, W];
    let checked = 0;
    for (const ac of pool) for (const ab of pool) for (const ah of pool) for (const bc of pool) for (const bb of pool) for (const bh of pool) {
      for (const flags of [0, 1, 2, 3]) {
        both(
          view('alice', ac, ab, [ah, 0n], { crashedPrimary: (flags & 1) !== 0, dirtyBlocks: flags }),
          view('bob', bc, bb, [bh, 0n], { role: (flags & 2) !== 0 ? 'Primary' : 'Secondary', consistent: bc !== 0n && flags !== 3 }),
          { afterSb0pri: 'discard-least-changes', afterSb1pri: 'consensus', afterSb2pri: 'disconnect' },
        );
        checked += 1;
      }
    }
    expect(checked).toBe(5 ** 6 * 4);
  });
});

describe('UUID story on real metadata', () => {
  let dir: string;
  beforeAll(async () => { dir = await mkdtemp(path.join(os.tmpdir(), 'drbdts-uuids-')); });
  afterAll(async () => { await rm(dir, { recursive: true, force: true }); });

  const asView = (name: string, md: Metadata, extra: Partial<SyncView> = {}): SyncView => ({
    nodeName: name, uuids: md.uuids, consistent: md.flags.consistent, role: 'Secondary', crashedPrimary: md.flags.crashedPrimary,
    dirtyBlocks: md.bitmap.setBits(), lastPromotedMs: md.lastPromotedMs, discardMyData: false, ...extra,
  });

  it('initial sync, disconnect with writes on the Primary, reconnect: bitmap resync from the Primary', async () => {
    const alice = await Metadata.create({ diskPath: path.join(dir, 'a.img'), metaDisk: 'internal', dataSizeBytes: 8 << 20 });
    const bob = await Metadata.create({ diskPath: path.join(dir, 'b.img'), metaDisk: 'internal', dataSizeBytes: 8 << 20 });
    expect(decideSync(asView('alice', alice), asView('bob', bob)).kind).toBe('wait-for-operator');
    // primary --force on alice: new generation, consistent; bob is fresh -> full sync to bob.
    await alice.newCurrentUuid();
    alice.flags.consistent = true;
    expect(decideSync(asView('alice', alice), asView('bob', bob)).kind).toBe('full-source');
    // Full sync done: bob adopts alice's generation; alice's bitmap UUID cleared.
    await bob.adoptUuids(alice.uuids);
    bob.flags.consistent = true;
    await alice.clearBitmapUuid();
    expect(both(asView('alice', alice), asView('bob', bob))).toBe('none');
    // Link breaks while alice is Primary: new current UUID, writes set bits.
    await alice.newCurrentUuid();
    alice.bitmap.setRange(0, 8192);
    expect(both(asView('alice', alice, { role: 'Primary' }), asView('bob', bob))).toBe('source');
    // Meanwhile bob was promoted too (split brain): both have new generations from the same ancestor.
    await bob.newCurrentUuid();
    expect(both(asView('alice', alice, { role: 'Primary' }), asView('bob', bob))).toBe('split-brain');
    expect(newUuid()).not.toBe(newUuid());
    await alice.close();
    await bob.close();
  });

  it('an interrupted full initial sync resumes from the bitmaps (sync UUID handed to the target at start)', async () => {
    const alice = await Metadata.create({ diskPath: path.join(dir, 'c.img'), metaDisk: 'internal', dataSizeBytes: 8 << 20 });
    const bob = await Metadata.create({ diskPath: path.join(dir, 'd.img'), metaDisk: 'internal', dataSizeBytes: 8 << 20 });
    await alice.newCurrentUuid(); // primary --force
    alice.flags.consistent = true;
    alice.bitmap.setAll();
    expect(decideSync(asView('alice', alice), asView('bob', bob)).kind).toBe('full-source');
    bob.bitmap.setAll();
    const syncUuid = await alice.beginSyncSource();
    await bob.beginSyncTarget(syncUuid);
    // Half of the blocks arrive (both sides clear them), then the link breaks; alice keeps writing.
    alice.bitmap.clearRange(0, 4 << 20);
    bob.bitmap.clearRange(0, 4 << 20);
    await alice.newCurrentUuid();
    alice.bitmap.setRange(0, 4096);
    // Reconnect: a bitmap-based resync of what is left plus alice's new write, not a restart.
    expect(both(asView('alice', alice, { role: 'Primary' }), asView('bob', bob))).toBe('source');
    const merged = Bitmap.fromBuffer(alice.dataSizeBytes, alice.bitmap.toBuffer());
    merged.mergeFrom(bob.bitmap);
    expect(merged.dirtyBytes()).toBe((4 << 20) + 4096);
    await alice.close();
    await bob.close();
  });
});
