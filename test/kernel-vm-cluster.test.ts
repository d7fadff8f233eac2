// Proves drbdts under a cluster filesystem for real: two throwaway VMs (scripts/vm/run-pair.sh: Debian's stock
// kernel each, joined by a private link and nothing else, each with its own virtio disk as backing device) run one
// drbdts node each and attach its export to their kernel NBD client /dev/nbd0.
//   - test/vm/ocfs2-dual-primary.sh: OCFS2 on the dual-primary resource, mounted on both through an o2cb cluster of
//     the two kernels; concurrent writes (own files, one shared file, flock-ed appends and counter, renames) read
//     back across; alice's drbdts SIGKILLed mid-write, o2cb fences her, bob recovers her journal and writes on,
//     alice reboots, resyncs, remounts and finds every synced file; fsck.ocfs2 clean on both, replicas identical.
//   - test/vm/ext4-failover.sh: the single-primary failover: ext4 on alice, her drbdts killed, bob promotes, fsck,
//     mounts, the data is there; alice resyncs back, replicas identical.
// The scripts print "OK <step>" for every step that held and stop at the first that did not ("FAIL <why>", exit
// 1); this test demands exit 0 and every step's line from the node that checks it, so a step left out fails too.
// Nothing is skipped: without qemu, the kit or ocfs2-tools the run fails. The CPUs are emulated (TCG): the OCFS2
// scenario takes about 4 to 6 minutes, the ext4 one about 2 (more on a loaded machine).
import { spawn } from 'node:child_process';
import path from 'node:path';
import { expect, it } from 'vitest';
import { repoRoot } from './replication-cluster.js';

function runPair(script: string, timeoutSeconds: number): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('bash', [path.join(repoRoot, 'scripts/vm/run-pair.sh'), '--timeout', String(timeoutSeconds), '--',
      'bash', script], { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'], env: process.env });
    let text = '';
    child.stdout.on('data', (chunk) => (text += chunk));
    child.stderr.on('data', (chunk) => (text += chunk));
    child.on('error', reject);
    child.on('close', (exitCode) => resolve({ code: exitCode, output: text }));
  });
}

/** Each [node, step]: the node's output has "OK <step>" (the scripts' own words, a prefix of the line). */
function expectSteps(output: string, steps: [string, string][]): void {
  expect(output).not.toMatch(/: FAIL /);
  for (const [node, step] of steps) {
    const line = new RegExp(`^${node}\\| [0-9.]+s ${node}: OK ${step.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`, 'm');
    expect(output, `${node}: OK ${step}`).toMatch(line);
  }
}

it('OCFS2 on dual-primary drbdts across two VMs: concurrent writes, a node\'s drbdts killed, fenced, recovered, resynced', async () => {
  const { code, output } = await runPair('test/vm/ocfs2-dual-primary.sh', 1200);
  expect(code, output).toBe(0);
  const both = (step: string): [string, string][] => [['alice', step], ['bob', step]];
  expectSteps(output, [
    ...both('dual-primary, /dev/nbd0 attached'),
    ...both('o2cb cluster online'),
    ...both('OCFS2 mounted on both'),
    ...both('cross-read: both nodes\' files, the shared file, the flock-ed log and counter agree'),
    ['bob', 'bob recovered alice\'s journal after her death'],
    ['bob', 'bob\'s writes go on after the recovery'],
    ['alice', 'alice was fenced and rebooted'],
    ['alice', 'alice resynced from bob: UpToDate'],
    ['alice', 'alice remounted'],
    ['alice', 'alice reads every synced file'],
    ...both('fsck.ocfs2 -fn clean'),
    ...both('data areas identical'),
  ]);
  // alice ran the scenario twice: o2cb reset her guest after her drbdts died; bob never rebooted.
  expect(output).toMatch(/^alice\| [0-9.]+s alice: boot 2$/m);
  expect(output).not.toMatch(/^bob\| [0-9.]+s bob: boot 2$/m);
  expect(output).toMatch(/^bob\|\s+kernel: .*ocfs2: End replay journal \(node 0, slot 0\)/m);
}, 1_300_000);

it('the single-primary failover across two VMs: ext4 on alice, her drbdts killed, bob promotes, fscks, mounts, data there', async () => {
  const { code, output } = await runPair('test/vm/ext4-failover.sh', 600);
  expect(code, output).toBe(0);
  expectSteps(output, [
    ['alice', 'alice Primary, /dev/nbd0 attached'],
    ['bob', 'bob Secondary, promotion refused while alice is Primary'],
    ['alice', 'alice\'s drbdts killed while writing'],
    ['bob', 'bob promoted after alice\'s death'],
    ['bob', 'e2fsck clean after the journal replay'],
    ['bob', 'bob reads every file alice synced before the kill'],
    ['alice', 'alice back as Secondary, resynced from bob'],
    ['alice', 'data areas identical'],
    ['bob', 'data areas identical'],
  ]);
}, 700_000);
