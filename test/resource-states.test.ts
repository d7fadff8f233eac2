// What this file proves: the state rules (src/resource/states.ts) are consistent as a whole. It walks every
// combination of role, disk, connection, peer role, peer disk and allow-two-primaries, and every command with
// and without its flags: every refusal names the node; no command the rules allow from a valid state leads to
// an invalid one; and the rules operators rely on hold across the table (one Primary without
// allow-two-primaries, no promotion of stale or resyncing data without --force, no outdate while connected).
import { describe, expect, it } from 'vitest';
import type { DiskState, RoleState } from '../src/resource/control.js';
import {
  COMMANDS, CONNECTION_STATES, DISK_STATES, connected, diskTransitionAllowed, effect, invalidState, refusal,
  type CommandFacts, type StateView,
} from '../src/resource/states.js';

function* allViews(): Generator<StateView> {
  for (const role of ['Primary', 'Secondary'] as const) {
    for (const disk of DISK_STATES) {
      for (const connection of CONNECTION_STATES) {
        for (const peerRole of ['Primary', 'Secondary', 'Unknown'] as RoleState[]) {
          for (const peerDisk of DISK_STATES as DiskState[]) {
            for (const allowTwoPrimaries of [false, true]) yield { role, disk, connection, peerRole, peerDisk, allowTwoPrimaries };
          }
        }
      }
    }
  }
}

const factSets: CommandFacts[] = [{}, { force: true }, { discardMyData: true }, { clearBitmap: true }, { nbdClients: 2 }];

describe('resource state rules', () => {
  const views = [...allViews()];
  const valid = views.filter((v) => invalidState(v) === null);

  it('the table has valid and invalid combinations of every kind', () => {
    expect(views.length).toBe(2 * 7 * 12 * 3 * 7 * 2);
    expect(valid.length).toBeGreaterThan(100);
    expect(valid.some((v) => v.role === 'Primary' && v.peerRole === 'Primary')).toBe(true);
    expect(valid.some((v) => v.role === 'Primary' && v.peerRole === 'Primary' && !v.allowTwoPrimaries)).toBe(false);
  });

  it('no command allowed from a valid state leads to an invalid one; every refusal names the node', () => {
    let checked = 0;
    const broken: string[] = [];
    for (const v of valid) {
      for (const command of COMMANDS) {
        for (const facts of factSets) {
          const refused = refusal(command, v, { name: 'r0 on node alice', peer: 'bob' }, facts);
          checked += 1;
          if (refused !== null) {
            if (!refused.includes('r0 on node alice') && !refused.startsWith(`${command}:`)) broken.push(`${command}: ${refused}`);
            continue;
          }
          const next = effect(command, v, facts);
          if (next === null) continue;
          const problem = invalidState(next);
          if (problem !== null) broken.push(`${command} ${JSON.stringify(facts)} from ${JSON.stringify(v)}: ${problem}`);
          if (!diskTransitionAllowed(v.disk, next.disk)) broken.push(`${command}: disk ${v.disk} -> ${next.disk} is not a transition`);
        }
      }
    }
    expect(checked).toBeGreaterThan(10_000);
    expect(broken.slice(0, 10)).toEqual([]);
  });

  it('the rules operators rely on hold across the whole table', () => {
    const who = { name: 'n', peer: 'p' };
    for (const v of valid) {
      const promote = refusal('primary', v, who, {});
      const forced = refusal('primary', v, who, { force: true });
      // Never a second Primary without allow-two-primaries, forced or not.
      if (connected(v.connection) && v.peerRole === 'Primary' && !v.allowTwoPrimaries) {
        expect(promote).not.toBeNull();
        expect(forced).not.toBeNull();
      }
      // Stale or incomplete data is promoted only with --force; a SyncTarget not even then.
      if (v.disk === 'Outdated' || v.disk === 'Inconsistent' || v.disk === 'Consistent') expect(promote).not.toBeNull();
      if (v.connection === 'SyncTarget' || v.connection === 'PausedSyncT') expect(forced).not.toBeNull();
      // outdate never on a Primary, never while connected (unless already Outdated: a no-op).
      if (v.role === 'Primary' || (connected(v.connection) && v.disk !== 'Outdated')) {
        expect(refusal('outdate', v, who)).not.toBeNull();
      }
      // A Secondary with NBD clients is not the issue; a Primary with clients is not demoted.
      if (v.role === 'Primary') expect(refusal('secondary', v, who, { nbdClients: 1 })).not.toBeNull();
    }
  });
});
