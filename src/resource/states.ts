// The resource state rules, as data: which combinations of this node's role and disk, the connection and the
// peer's role and disk are valid; which operator commands each state refuses, and the refusal the operator
// reads; which disk state changes happen at all. DRBD keeps these rules in one place (drbd_state.c's
// is_valid_state and the state change checks); here the daemon asks `refusal()` before it runs a command, and
// `test/resource-states.test.ts` walks every combination: no command allowed from a valid state may lead to an
// invalid one. What is not a state (a mounted device, NBD clients holding the export) comes in as facts.
import type { ConnectionState, DiskState, RoleState } from './control.js';

export interface StateView {
  role: 'Primary' | 'Secondary';
  disk: DiskState;
  connection: ConnectionState;
  peerRole: RoleState;
  peerDisk: DiskState;
  allowTwoPrimaries: boolean;
}

/** What the rules need beyond the state: the command's flags and what holds the device. */
export interface CommandFacts {
  force?: boolean;
  discardMyData?: boolean;
  clearBitmap?: boolean;
  /** NBD clients holding this node's export. */
  nbdClients?: number;
}

export type Command =
  | 'primary' | 'secondary' | 'connect' | 'disconnect' | 'invalidate' | 'invalidate-remote' | 'verify' | 'outdate'
  | 'detach' | 'attach' | 'new-current-uuid' | 'resync-pause' | 'resync-resume';

export const COMMANDS: readonly Command[] = [
  'primary', 'secondary', 'connect', 'disconnect', 'invalidate', 'invalidate-remote', 'verify', 'outdate', 'detach',
  'attach', 'new-current-uuid', 'resync-pause', 'resync-resume',
];

export const DISK_STATES: readonly DiskState[] = ['Diskless', 'Attaching', 'Inconsistent', 'Outdated', 'DUnknown', 'Consistent', 'UpToDate'];
export const CONNECTION_STATES: readonly ConnectionState[] = ['StandAlone', 'Connecting', 'Connected', 'SyncSource', 'SyncTarget',
  'PausedSyncS', 'PausedSyncT', 'VerifyS', 'VerifyT', 'Ahead', 'Behind', 'Disconnecting'];

const syncTarget = (c: ConnectionState): boolean => c === 'SyncTarget' || c === 'PausedSyncT';
const syncSource = (c: ConnectionState): boolean => c === 'SyncSource' || c === 'PausedSyncS';
const resyncing = (c: ConnectionState): boolean => syncTarget(c) || syncSource(c);
/** Connected in the DRBD sense: the peer's state is known. */
export const connected = (c: ConnectionState): boolean => c !== 'StandAlone' && c !== 'Connecting' && c !== 'Disconnecting';
const goodData = (d: DiskState): boolean => d === 'UpToDate';

/** Why a combination is invalid, or null. */
export function invalidState(v: StateView): string | null {
  if (!connected(v.connection)) {
    if (v.peerRole !== 'Unknown' || v.peerDisk !== 'DUnknown') return 'the peer\'s state is known while not connected';
  } else if (v.peerRole === 'Unknown' || v.peerDisk === 'DUnknown') {
    return 'the peer\'s state is unknown while connected';
  }
  if (v.disk === 'DUnknown') return 'this node\'s own disk state is never DUnknown';
  if (v.disk === 'Attaching' || v.peerDisk === 'Attaching') return 'attach is one step here: no node reports Attaching';
  if (v.role === 'Primary' && v.disk !== 'UpToDate' && v.disk !== 'Diskless') {
    return `a Primary's data must be UpToDate (or served by the peer, Diskless), not ${v.disk}`;
  }
  if (v.role === 'Primary' && v.disk === 'Diskless' && connected(v.connection) && !goodData(v.peerDisk)) {
    return 'a Diskless Primary needs an UpToDate peer';
  }
  if (connected(v.connection) && v.role === 'Primary' && v.peerRole === 'Primary' && !v.allowTwoPrimaries) {
    return 'two Primaries connected without allow-two-primaries';
  }
  if (syncTarget(v.connection) && (v.role !== 'Secondary' || v.disk !== 'Inconsistent' || !goodData(v.peerDisk))) {
    return 'a SyncTarget is a Secondary with Inconsistent data and an UpToDate peer';
  }
  if (syncSource(v.connection) && (!goodData(v.disk) || v.peerDisk !== 'Inconsistent')) {
    return 'a SyncSource has UpToDate data and an Inconsistent peer';
  }
  if (v.connection === 'Ahead' && v.role !== 'Primary') return 'only a Primary pulls ahead';
  if (v.connection === 'Behind' && (v.role !== 'Secondary' || v.peerRole !== 'Primary')) {
    return 'only a Secondary is behind, and only its Primary';
  }
  // Pulling ahead is protocol A's; two Primaries need protocol C.
  if ((v.connection === 'Ahead' || v.connection === 'Behind') && v.allowTwoPrimaries) return 'Ahead/Behind with allow-two-primaries';
  if (connected(v.connection) && v.disk === 'Diskless' && v.peerDisk === 'Diskless') return 'both nodes Diskless and connected';
  return null;
}

/** Who the refusal speaks of: this resource on this node ("resource r0 on node alice"), and the peer's name. */
export interface Who {
  name: string;
  peer: string;
}

interface Rule {
  /** Refused when this holds. */
  when: (v: StateView, f: CommandFacts) => boolean;
  why: (v: StateView, who: Who, f: CommandFacts) => string;
}

/**
 * The refusals of each command, in the order they are checked. The daemon adds only what depends on more than
 * the state (a mounted kernel device, the fence-peer handler's answer), and what `--force` overrides.
 */
export const RULES: Readonly<Record<Command, readonly Rule[]>> = {
  primary: [
    { when: (v) => connected(v.connection) && v.peerRole === 'Primary' && !v.allowTwoPrimaries,
      why: (v, { name, peer }) => `${name}: the peer ${peer} is Primary; demote it first (allow-two-primaries is off)` },
    { when: (v, f) => connected(v.connection) && v.peerRole === 'Primary' && f.force === true,
      why: (v, { name, peer }) => `${name}: the peer ${peer} is Primary: --force would discard the data it serves` },
    { when: (v) => connected(v.connection) && v.peerRole === 'Primary'
        && (v.connection !== 'Connected' || v.disk !== 'UpToDate' || v.peerDisk !== 'UpToDate'),
      why: (v, { name, peer }) => `${name}: a second Primary needs both disks UpToDate and the nodes Connected `
        + `(now ${v.connection}, ${v.disk}/${v.peerDisk})` },
    { when: (v) => syncTarget(v.connection),
      why: (v, { name, peer }) => `${name} is SyncTarget: wait for the resync to finish` },
    { when: (v) => v.disk === 'Diskless' && !(connected(v.connection) && goodData(v.peerDisk)),
      why: (v, { name, peer }) => `${name} is Diskless and not connected to an UpToDate peer: there is no data to serve` },
    { when: (v, f) => v.disk === 'Outdated' && f.force !== true,
      why: (v, { name, peer }) => `${name} is Outdated: refusing to be Primary with data that may be stale (connect to the peer `
        + 'to resync, or use --force only if this node\'s data is the good copy)' },
    { when: (v, f) => v.disk !== 'UpToDate' && v.disk !== 'Diskless' && v.disk !== 'Outdated' && f.force !== true,
      why: (v, { name, peer }) => `${name} is ${v.disk}: refusing to promote (use --force only if this node's data is the good copy)` },
  ],
  secondary: [
    { when: (v) => v.connection === 'Ahead',
      why: (v, { name, peer }) => `${name} pulled ahead of its peer: wait until its send queue drained and the resync started` },
    { when: (v, f) => v.role === 'Primary' && (f.nbdClients ?? 0) > 0,
      why: (v, { name }, f) => `${name}: the device is held open by ${f.nbdClients} NBD client(s); disconnect them first` },
  ],
  connect: [
    { when: (v) => v.connection !== 'StandAlone', why: (v, { name, peer }) => `${name} is already ${v.connection}` },
    { when: (v, f) => f.discardMyData === true && v.role === 'Primary',
      why: (v, { name, peer }) => `${name}: --discard-my-data on a Primary is refused; demote it first` },
  ],
  disconnect: [],
  invalidate: [
    { when: (v) => !connected(v.connection),
      why: (v, { name, peer }) => `invalidate: ${name} is not connected to ${peer} (${v.connection})` },
    { when: (v) => v.role === 'Primary', why: (v, { name, peer }) => `invalidate: ${name} is Primary; demote it first` },
    { when: (v) => resyncing(v.connection), why: () => 'invalidate: a resync is already running' },
    { when: (v) => !goodData(v.peerDisk), why: (v, { peer }) => `invalidate: the peer's disk is ${v.peerDisk}, not UpToDate: nothing to resync from` },
  ],
  'invalidate-remote': [
    { when: (v) => !connected(v.connection),
      why: (v, { name, peer }) => `invalidate-remote: ${name} is not connected to ${peer} (${v.connection})` },
    { when: (v) => v.peerRole === 'Primary', why: (v, { name, peer }) => `${name}: the peer is Primary; it cannot be invalidated` },
    { when: (v) => resyncing(v.connection), why: (v, { name, peer }) => `${name}: a resync is already running` },
    { when: (v) => !goodData(v.disk), why: (v, { name, peer }) => `${name}: this disk is ${v.disk}, not UpToDate: nothing to resync from` },
  ],
  verify: [
    { when: (v) => !connected(v.connection), why: (v, { name, peer }) => `verify: ${name} is not connected to ${peer} (${v.connection})` },
    { when: (v) => v.connection !== 'Connected', why: (v, { name, peer }) => `${name}: busy (${v.connection})` },
    { when: (v) => v.disk === 'Diskless' || v.peerDisk === 'Diskless', why: (v, { name, peer }) => `${name}: a Diskless node has nothing to verify` },
  ],
  outdate: [
    { when: (v) => v.role === 'Primary', why: (v, { name, peer }) => `${name} is Primary: refusing to outdate the data it serves (demote it first)` },
    { when: (v) => v.disk !== 'UpToDate' && v.disk !== 'Consistent' && v.disk !== 'Outdated',
      why: (v, { name, peer }) => `${name} is ${v.disk}: only good data can be outdated` },
    { when: (v) => v.disk !== 'Outdated' && connected(v.connection),
      why: (v, { name, peer }) => `${name}: refusing to be Outdated while Connected to ${peer} (disconnect first)` },
  ],
  detach: [
    { when: (v, f) => v.disk !== 'Diskless' && f.force !== true && !(connected(v.connection) && goodData(v.peerDisk)),
      why: (v, { name, peer }) => `${name}: the peer's disk is not UpToDate and connected (${connected(v.connection) ? v.peerDisk : 'not connected'}): `
        + 'detaching would leave no good data to serve; use --force to detach anyway' },
    { when: (v, f) => v.disk !== 'Diskless' && f.force === true && connected(v.connection) && !goodData(v.peerDisk),
      why: (v, { name, peer }) => `${name}: connected to a peer whose disk is ${v.peerDisk}, which cannot serve a Diskless node: `
        + 'disconnect first' },
    { when: (v) => v.disk !== 'Diskless' && resyncing(v.connection),
      why: (v, { name, peer }) => `${name}: a resync runs (${v.connection}): wait for it to end` },
  ],
  attach: [
    { when: (v) => v.disk === 'Diskless' && v.role === 'Primary',
      why: (v, { name, peer }) => `${name} is a Diskless Primary: demote it first (or fail over to the peer), then attach `
        + '(the attach resyncs this disk from the peer, which a Primary here does not do)' },
  ],
  'new-current-uuid': [
    { when: (v, f) => f.clearBitmap === true && !connected(v.connection),
      why: (v, { name, peer }) => `new-current-uuid --clear-bitmap: ${name} is not connected to ${peer} (${v.connection})` },
    { when: (v, f) => f.clearBitmap === true && resyncing(v.connection),
      why: (v, { name, peer }) => `new-current-uuid --clear-bitmap: ${name}: a resync is running (${v.connection})` },
    { when: (v, f) => f.clearBitmap === true && v.disk === 'UpToDate' && v.peerDisk === 'UpToDate',
      why: (v, { name, peer }) => `${name}: both nodes are already UpToDate` },
  ],
  'resync-pause': [
    { when: (v) => !resyncing(v.connection), why: (v, { name, peer }) => `${name}: no resync is running (${v.connection})` },
  ],
  'resync-resume': [
    { when: (v) => !resyncing(v.connection), why: (v, { name, peer }) => `${name}: no resync is running (${v.connection})` },
  ],
};

/** The refusal the operator gets for `command` in this state, or null when the rules allow it. */
export function refusal(command: Command, v: StateView, who: Who, facts: CommandFacts = {}): string | null {
  for (const rule of RULES[command]) if (rule.when(v, facts)) return rule.why(v, who, facts);
  return null;
}

/**
 * What an allowed command does to the state at once (the later steps, a resync and its end, are the
 * connection's). Null: the command changes no state by itself (a no-op, or the change comes from the peer).
 */
export function effect(command: Command, v: StateView, f: CommandFacts = {}): StateView | null {
  switch (command) {
    case 'primary':
      return { ...v, role: 'Primary', disk: v.disk === 'Diskless' ? 'Diskless' : 'UpToDate' };
    case 'secondary':
      return { ...v, role: 'Secondary' };
    case 'disconnect':
      return { ...v, connection: 'StandAlone', peerRole: 'Unknown', peerDisk: 'DUnknown' };
    case 'connect':
      return { ...v, connection: 'Connecting', peerRole: 'Unknown', peerDisk: 'DUnknown' };
    case 'outdate':
      return { ...v, disk: 'Outdated' };
    case 'detach':
      // Connected to a good peer, or forced (without a peer: a Diskless node with nothing to serve).
      return v.disk === 'Diskless' ? null : { ...v, disk: 'Diskless', connection: v.connection === 'Ahead' ? 'Connected' : v.connection };
    case 'invalidate':
      return { ...v, disk: 'Inconsistent', connection: 'SyncTarget' };
    case 'invalidate-remote':
      return { ...v, connection: 'SyncSource', peerDisk: 'Inconsistent' };
    case 'verify':
      return { ...v, connection: 'VerifyS' };
    case 'new-current-uuid':
      return f.clearBitmap === true && connected(v.connection) ? { ...v, disk: 'UpToDate', peerDisk: 'UpToDate' } : null;
    case 'resync-pause':
      return { ...v, connection: syncTarget(v.connection) ? 'PausedSyncT' : 'PausedSyncS' };
    case 'resync-resume':
      return { ...v, connection: syncTarget(v.connection) ? 'SyncTarget' : 'SyncSource' };
    case 'attach':
      return null; // the disk comes back as its metadata says; the connection then decides
    default:
      return null;
  }
}

/** Disk state changes that happen at all (what caused them), for the daemon's check and the simulator. */
export const DISK_TRANSITIONS: ReadonlyArray<readonly [DiskState, DiskState, string]> = [
  ['Inconsistent', 'UpToDate', 'primary --force, new-current-uuid --clear-bitmap, or the end of a resync into it'],
  ['UpToDate', 'Inconsistent', 'a resync into it starts (invalidate, or the peer is newer)'],
  ['Outdated', 'Inconsistent', 'a resync into it starts'],
  ['Consistent', 'Inconsistent', 'a resync into it starts'],
  ['UpToDate', 'Outdated', 'outdate, or the fence-peer handler on the peer'],
  ['Consistent', 'Outdated', 'outdate'],
  ['Outdated', 'UpToDate', 'primary --force, or a connect finding the same data on an UpToDate peer'],
  ['UpToDate', 'Diskless', 'detach, or on-io-error detach'],
  ['Outdated', 'Diskless', 'detach --force, or on-io-error detach'],
  ['Inconsistent', 'Diskless', 'detach --force, or on-io-error detach'],
  ['Consistent', 'Diskless', 'detach --force, or on-io-error detach'],
  ['Diskless', 'UpToDate', 'attach of a disk with the current data'],
  ['Diskless', 'Inconsistent', 'attach, then a resync into it'],
  ['Diskless', 'Outdated', 'attach of an outdated disk'],
  ['Consistent', 'UpToDate', 'a connect that finds it current'],
];

export function diskTransitionAllowed(from: DiskState, to: DiskState): boolean {
  return from === to || DISK_TRANSITIONS.some(([a, b]) => a === from && b === to);
}
