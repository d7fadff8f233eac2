// Generation UUIDs and the connect-time decision of who syncs from whom (DRBD's uuid comparison table, see
// /work/shared/reference/drbd-semantics.md), with the after-split-brain recovery policies. Both nodes run
// decideSync with the arguments swapped and must reach mirrored answers, so every tie-break below depends
// only on data both sides see (the node names, the UUIDs, the bitmap counts), never on which side asks.
import { randomBytes } from 'node:crypto';

// The after-split-brain policies (drbd.conf's after-sb-0pri/1pri/2pri): configured in [net], applied here.
export type AfterSb0Pri =
  | 'disconnect'
  | 'discard-younger-primary'
  | 'discard-older-primary'
  | 'discard-zero-changes'
  | 'discard-least-changes'
  | `discard-node-${string}`;
export type AfterSb1Pri = 'disconnect' | 'consensus' | 'discard-secondary' | 'call-pri-lost-after-sb';
export type AfterSb2Pri = 'disconnect' | 'call-pri-lost-after-sb';

export type Role = 'Primary' | 'Secondary';

export interface GenerationUuids {
  current: bigint;
  bitmap: bigint;
  history: [bigint, bigint];
}

export interface SyncView {
  nodeName: string;
  uuids: GenerationUuids;
  /** The disk holds a consistent image (UpToDate, Consistent or Outdated), not a half-done resync. */
  consistent: boolean;
  role: Role;
  crashedPrimary: boolean;
  /** bitmap.setBits(): blocks changed since the nodes last agreed. */
  dirtyBlocks: number;
  lastPromotedMs: number;
  discardMyData: boolean;
}

export interface AfterSbPolicies {
  afterSb0pri: AfterSb0Pri;
  afterSb1pri: AfterSb1Pri;
  afterSb2pri: AfterSb2Pri;
}

export type SyncKind =
  | 'none'
  | 'source'
  | 'target'
  | 'full-source'
  | 'full-target'
  | 'split-brain'
  | 'unrelated'
  | 'wait-for-operator';

export interface SyncDecision {
  kind: SyncKind;
  reason: string;
}

export function newUuid(): bigint {
  for (;;) {
    const value = randomBytes(8).readBigUInt64LE(0);
    if (value !== 0n) return value;
  }
}

export function formatUuid(uuid: bigint): string {
  return uuid.toString(16).toUpperCase().padStart(16, '0');
}

const defaultPolicies: AfterSbPolicies = {
  afterSb0pri: 'disconnect',
  afterSb1pri: 'disconnect',
  afterSb2pri: 'disconnect',
};

/** Is `local` the one to lose its changes under after-sb-0pri? undefined = the policy cannot decide. */
function loserBy0pri(policy: AfterSb0Pri, local: SyncView, peer: SyncView): boolean | undefined {
  switch (policy) {
    case 'disconnect':
      return undefined;
    case 'discard-younger-primary':
    case 'discard-older-primary': {
      if (local.lastPromotedMs === peer.lastPromotedMs) return undefined;
      const localYounger = local.lastPromotedMs > peer.lastPromotedMs;
      return policy === 'discard-younger-primary' ? localYounger : !localYounger;
    }
    case 'discard-zero-changes':
      if (local.dirtyBlocks === 0 && peer.dirtyBlocks !== 0) return true;
      if (peer.dirtyBlocks === 0 && local.dirtyBlocks !== 0) return false;
      return undefined;
    case 'discard-least-changes':
      if (local.dirtyBlocks !== peer.dirtyBlocks) return local.dirtyBlocks < peer.dirtyBlocks;
      // DRBD breaks the tie by the node that would resolve conflicts; we use the node name, which both agree on.
      return local.nodeName > peer.nodeName;
    default: {
      const victim = policy.slice('discard-node-'.length);
      if (victim === local.nodeName) return true;
      if (victim === peer.nodeName) return false;
      return undefined;
    }
  }
}

function splitBrain(local: SyncView, peer: SyncView, policies: AfterSbPolicies): SyncDecision {
  const changes = `${local.nodeName} has ${local.dirtyBlocks} changed blocks, ${peer.nodeName} has ${peer.dirtyBlocks}`;
  if (local.discardMyData && peer.discardMyData) {
    return { kind: 'split-brain', reason: `split brain: both nodes were told --discard-my-data (${changes})` };
  }
  if (local.discardMyData) {
    return { kind: 'target', reason: `split brain resolved by --discard-my-data on ${local.nodeName} (${changes})` };
  }
  if (peer.discardMyData) {
    return { kind: 'source', reason: `split brain resolved by --discard-my-data on ${peer.nodeName} (${changes})` };
  }
  const primaries = (local.role === 'Primary' ? 1 : 0) + (peer.role === 'Primary' ? 1 : 0);
  const manual = `run "drbdts connect RES --discard-my-data" on the node whose changes should be thrown away`;
  if (primaries === 0) {
    const loses = loserBy0pri(policies.afterSb0pri, local, peer);
    if (loses === undefined) {
      return { kind: 'split-brain', reason: `split brain (after-sb-0pri ${policies.afterSb0pri} did not decide; ${changes}): ${manual}` };
    }
    return loses
      ? { kind: 'target', reason: `split brain resolved by after-sb-0pri ${policies.afterSb0pri}: ${local.nodeName} discards its changes (${changes})` }
      : { kind: 'source', reason: `split brain resolved by after-sb-0pri ${policies.afterSb0pri}: ${peer.nodeName} discards its changes (${changes})` };
  }
  if (primaries === 1) {
    const localIsSecondary = local.role === 'Secondary';
    const policy = policies.afterSb1pri;
    if (policy === 'discard-secondary') {
      return localIsSecondary
        ? { kind: 'target', reason: `split brain resolved by after-sb-1pri discard-secondary: ${local.nodeName} (Secondary) discards its changes (${changes})` }
        : { kind: 'source', reason: `split brain resolved by after-sb-1pri discard-secondary: ${peer.nodeName} (Secondary) discards its changes (${changes})` };
    }
    if (policy === 'consensus' || policy === 'call-pri-lost-after-sb') {
      // Accept the after-sb-0pri verdict only when it discards the Secondary: a Primary's data is in use.
      const loses = loserBy0pri(policies.afterSb0pri, local, peer);
      if (loses !== undefined && loses === localIsSecondary) {
        return loses
          ? { kind: 'target', reason: `split brain resolved by after-sb-1pri ${policy}: ${local.nodeName} (Secondary) discards its changes (${changes})` }
          : { kind: 'source', reason: `split brain resolved by after-sb-1pri ${policy}: ${peer.nodeName} (Secondary) discards its changes (${changes})` };
      }
    }
    return { kind: 'split-brain', reason: `split brain with one Primary (after-sb-1pri ${policy} did not decide; ${changes}): ${manual}` };
  }
  return { kind: 'split-brain', reason: `split brain with two Primaries (after-sb-2pri ${policies.afterSb2pri}; ${changes}): ${manual}` };
}

export function decideSync(local: SyncView, peer: SyncView, policies: AfterSbPolicies = defaultPolicies): SyncDecision {
  const l = local.uuids;
  const p = peer.uuids;
  const me = local.nodeName;
  const them = peer.nodeName;

  // --discard-my-data is consulted only for a split brain, as in DRBD: a node that is simply ahead stays the
  // source even if an operator typed the option on it.
  if (l.current === 0n && p.current === 0n) {
    return { kind: 'wait-for-operator', reason: 'both nodes have fresh metadata: run "primary --force" on the node with the good data (full initial sync) or "new-current-uuid --clear-bitmap" to skip the sync' };
  }
  if (l.current === 0n) return { kind: 'full-target', reason: `${me} has fresh metadata: full sync from ${them}` };
  if (p.current === 0n) return { kind: 'full-source', reason: `${them} has fresh metadata: full sync to ${them}` };

  if (l.current === p.current) {
    // Same generation. A node left Inconsistent (interrupted resync, invalidate) takes the consistent one's data.
    if (!local.consistent && peer.consistent) return { kind: 'target', reason: `same data generation; ${me} is Inconsistent: resync from ${them}` };
    if (local.consistent && !peer.consistent) return { kind: 'source', reason: `same data generation; ${them} is Inconsistent: resync to ${them}` };
    if (!local.consistent && !peer.consistent) {
      return { kind: 'wait-for-operator', reason: 'both nodes are Inconsistent: run "primary --force" on the node with the good data' };
    }
    // A primary that crashed may have written blocks its peer never got: its activity-log extents are in its
    // bitmap and are resynced from it. Unless the peer has been promoted meanwhile (without writing yet, so
    // no new generation): its data is in use, and the crashed node's extents are overwritten from it instead.
    if ((local.crashedPrimary || peer.crashedPrimary) && local.role !== peer.role) {
      return local.role === 'Primary'
        ? { kind: 'source', reason: `${them} crashed as Primary, ${me} is Primary now: resync ${them}'s activity-log extents from ${me}` }
        : { kind: 'target', reason: `${me} crashed as Primary, ${them} is Primary now: resync ${me}'s activity-log extents from ${them}` };
    }
    if (local.crashedPrimary && !peer.crashedPrimary) return { kind: 'source', reason: `${me} was a crashed Primary: resync its activity-log extents to ${them}` };
    if (peer.crashedPrimary && !local.crashedPrimary) return { kind: 'target', reason: `${them} was a crashed Primary: resync its activity-log extents from it` };
    if (local.crashedPrimary && peer.crashedPrimary) {
      return me < them
        ? { kind: 'source', reason: `both were crashed Primaries; ${me} (first by name) is the resync source` }
        : { kind: 'target', reason: `both were crashed Primaries; ${them} (first by name) is the resync source` };
    }
    if (local.dirtyBlocks > 0 || peer.dirtyBlocks > 0) {
      // Bits left over from writes in flight when the link broke, with no new generation on either side:
      // the Primary's copy is the one in use; between two Secondaries either copy will do, so pick by name.
      const total = local.dirtyBlocks + peer.dirtyBlocks;
      if (local.role === 'Primary' && peer.role !== 'Primary') return { kind: 'source', reason: `same data generation with ${total} leftover out-of-sync blocks; ${me} (Primary) is the source` };
      if (peer.role === 'Primary' && local.role !== 'Primary') return { kind: 'target', reason: `same data generation with ${total} leftover out-of-sync blocks; ${them} (Primary) is the source` };
      return me < them
        ? { kind: 'source', reason: `same data generation with ${local.dirtyBlocks + peer.dirtyBlocks} leftover out-of-sync blocks; ${me} is the source` }
        : { kind: 'target', reason: `same data generation with ${local.dirtyBlocks + peer.dirtyBlocks} leftover out-of-sync blocks; ${them} is the source` };
    }
    return { kind: 'none', reason: 'same data generation: nothing to sync' };
  }
  // Each rule is checked in both directions at once, so that odd histories where both directions match
  // (which DRBD would never produce, but a damaged disk might) give the same answer on both nodes.
  const iAmAhead = l.bitmap !== 0n && l.bitmap === p.current;
  const peerIsAhead = p.bitmap !== 0n && p.bitmap === l.current;
  if (iAmAhead && !peerIsAhead) return { kind: 'source', reason: `${me} changed the data since ${them} last had it: bitmap-based resync to ${them}` };
  if (peerIsAhead && !iAmAhead) return { kind: 'target', reason: `${them} changed the data since ${me} last had it: bitmap-based resync from ${them}` };
  if (iAmAhead && peerIsAhead) return { kind: 'split-brain', reason: `split brain: each node's bitmap UUID is the other's current UUID; ${'run "drbdts connect RES --discard-my-data" on the node to be overwritten'}` };
  if (l.bitmap !== 0n && l.bitmap === p.bitmap) return splitBrain(local, peer, policies);
  const iAmOld = p.history.includes(l.current);
  const peerIsOld = l.history.includes(p.current);
  if (iAmOld && !peerIsOld) return { kind: 'full-target', reason: `${me}'s data is an older generation of ${them}'s, too old for a bitmap: full sync from ${them}` };
  if (peerIsOld && !iAmOld) return { kind: 'full-source', reason: `${them}'s data is an older generation of ${me}'s, too old for a bitmap: full sync to ${them}` };
  const shared = [l.bitmap, ...l.history].some((uuid) => uuid !== 0n && (uuid === p.bitmap || p.history.includes(uuid)));
  if (shared) {
    if (local.discardMyData !== peer.discardMyData) {
      return local.discardMyData
        ? { kind: 'full-target', reason: `split brain (common ancestor too old for a bitmap) resolved by --discard-my-data on ${me}: full sync from ${them}` }
        : { kind: 'full-source', reason: `split brain (common ancestor too old for a bitmap) resolved by --discard-my-data on ${them}: full sync to ${them}` };
    }
    return { kind: 'split-brain', reason: `split brain: both changed the data since a common ancestor too old for a bitmap; run "drbdts connect RES --discard-my-data" on the node to be overwritten (full sync)` };
  }
  return { kind: 'unrelated', reason: `unrelated data: ${me} (${formatUuid(l.current)}) and ${them} (${formatUuid(p.current)}) share no generation; refusing to connect` };
}

