// Proves the Pacemaker resource agent (contrib/ocf/drbdts, as installed by scripts/install.sh) with
// resource-agents' ocf-tester: meta-data valid against ra-api-1.dtd and readable by nobody, validate-all,
// probes, start/stop/promote/demote each twice in a row, notify. The agent runs on node alice of a real pair whose
// other node, bob, runs as a plain daemon, so promotion happens as in a cluster: with a connected Secondary
// peer. ocf-tester does not look at the monitor codes of a promoted instance, so the test then drives the agent
// itself: monitor answers 7 stopped, 0 Secondary, 8 Primary, and validate-all names a broken setup with 6.
// test/cluster-pacemaker.test.ts runs the agent under Pacemaker itself.
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Cluster, run } from './replication-cluster.js';
import { buildDist, repoRoot } from './resource-helpers.js';

let prefix: string;
let cluster: Cluster | null = null;
let agentParameters: Record<string, string> = {};

beforeAll(async () => {
  await buildDist();
  prefix = await mkdtemp(path.join(tmpdir(), 'drbdts-ocf-'));
  // ocf-tester runs meta-data as nobody: the installed tree must be reachable for it.
  await chmod(prefix, 0o755);
  const installed = await run('bash', [path.join(repoRoot, 'scripts/install.sh'), '--prefix', prefix, '--no-build']);
  if (installed.code !== 0) throw new Error(`install.sh failed: ${installed.stderr}`);
});

afterEach(async () => {
  // The agent starts alice's daemon detached: stop it through the agent, whatever the test left.
  if (cluster !== null) await agent('stop');
  await cluster?.teardown();
  cluster = null;
});

afterAll(async () => {
  await rm(prefix, { recursive: true, force: true });
});

const agentPath = () => path.join(prefix, 'lib/ocf/resource.d/drbdts/drbdts');

/** Runs one agent action as Pacemaker's executor does: parameters as OCF_RESKEY_*, the action as argument. */
async function agent(action: string, extra: Record<string, string> = {}): Promise<{ code: number; output: string }> {
  const env: NodeJS.ProcessEnv = { ...process.env, OCF_ROOT: '/usr/lib/ocf', OCF_RESOURCE_INSTANCE: 'r0' };
  for (const [key, value] of Object.entries({ ...agentParameters, ...extra })) env[`OCF_RESKEY_${key}`] = value;
  const result = await run(agentPath(), [action], { env, timeoutMs: 120_000 });
  return { code: result.code, output: result.stdout + result.stderr };
}

/** A synced pair with alice stopped (the agent starts it) and bob up as Secondary. */
async function pairWithAliceStopped(): Promise<Cluster> {
  const c = new Cluster({ sizeMiB: 16 });
  cluster = c;
  await c.setup();
  await c.start('alice');
  await c.start('bob');
  await c.waitState('alice', 'connected', (s) => s.connection === 'Connected');
  const skipped = await c.cli('alice', 'new-current-uuid', '--clear-bitmap');
  expect(skipped.code, skipped.stderr).toBe(0);
  await c.waitInSync();
  await c.down('alice');
  agentParameters = {
    resource: 'r0', config: c.configPath('alice'), node: 'alice', drbdts: path.join(prefix, 'bin/drbdts'),
    log: path.join(c.dir, 'alice-agent.log'),
  };
  return c;
}

describe('the OCF resource agent', () => {
  it('passes ocf-tester as a promotable clone', async () => {
    await pairWithAliceStopped();
    const args = ['-n', 'r0', ...Object.entries(agentParameters).flatMap(([key, value]) => ['-o', `${key}=${value}`]), agentPath()];
    const result = await run('ocf-tester', args, { timeoutMs: 600_000 });
    const output = result.stdout + result.stderr;
    expect(output, output).toContain(`${agentPath()} passed all tests`);
    expect(result.code).toBe(0);
    // ocf-tester noted no optional action as missing but migrate and reload.
    expect(output).not.toMatch(/does not support the (notify|promote|demote) action|partially supports/);
  }, 600_000);

  it('monitor answers 7, 0 and 8 through start, promote, demote and stop; validate-all names a broken setup', async () => {
    const c = await pairWithAliceStopped();
    expect((await agent('monitor')).code).toBe(7);
    expect((await agent('start')).code).toBe(0);
    expect((await agent('monitor')).code).toBe(0);
    await c.waitState('alice', 'connected again', (s) => s.connection === 'Connected');
    expect((await agent('promote')).code).toBe(0);
    expect((await agent('monitor')).code).toBe(8);
    expect((await c.status('bob')).peer.role).toBe('Primary');
    // While alice is Primary, bob cannot be promoted: the agent on bob would keep retrying; one try shows why.
    const refused = await c.cli('bob', 'primary');
    expect(refused.stderr).toMatch(/peer alice is Primary/);
    expect((await agent('demote')).code).toBe(0);
    expect((await agent('monitor')).code).toBe(0);
    expect((await agent('stop')).code).toBe(0);
    expect((await agent('monitor')).code).toBe(7);

    const missing = await agent('validate-all', { config: path.join(c.dir, 'none.toml') });
    expect(missing.code).toBe(6);
    expect(missing.output).toMatch(/cannot read the configuration/);
    const stranger = await agent('validate-all', { node: 'carol' });
    expect(stranger.code).toBe(6);
    expect(stranger.output).toMatch(/node "carol" \(from --node\) is not in this resource/);
    const noBinary = await agent('validate-all', { drbdts: '/nonexistent/drbdts' });
    expect(noBinary.code).toBe(5);
    // A probe (interval 0) on a node without drbdts: not running here, not an error.
    expect((await agent('monitor', { drbdts: '/nonexistent/drbdts', CRM_meta_interval: '0' })).code).toBe(7);
  });
});
