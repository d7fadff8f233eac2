// What this file proves: a node whose peer knows the shared secret and sends garbage, before and after
// authentication, loses at most connections: it never crashes, it keeps its role and disk state, nothing the
// peer sends changes the data of its UpToDate Primary, it keeps serving its NBD export, and afterwards the real
// peer connects and resyncs to an identical replica. How: bob is a real `drbdts up` process, Primary with
// known data; the fuzzer (test/fuzz/peer.ts) plays alice with the project's own PeerLink, so its frames arrive
// after a genuine handshake; between connections it checks that bob's process lives and answers `status`.
// The seed and the number of inputs come from FUZZ_SEED and FUZZ_PEER_INPUTS (CI: 20,000 frames;
// scripts/fuzz.sh runs 1,000,000); a failure names the seed to replay it.
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { Cluster, run } from './replication-cluster.js';
import { runPeerFuzz } from './fuzz/peer.js';

const seed = Number(process.env.FUZZ_SEED ?? 0x5eed);
const inputs = Number(process.env.FUZZ_PEER_INPUTS ?? 20_000);
const rawConnections = Number(process.env.FUZZ_PEER_RAW ?? 200);
const MiB = 1024 * 1024;

async function nbdHash(cluster: Cluster, node: 'alice' | 'bob', bytes: number): Promise<string> {
  // nbdcopy to stdout through a shell keeps binary data intact; hash it there.
  const hashed = await run('sh', ['-c', `nbdcopy '${cluster.nbdUri(node)}' - | head -c ${bytes} | sha256sum`], { timeoutMs: 60_000 });
  if (hashed.code !== 0) throw new Error(`reading ${node}'s export failed: ${hashed.stderr}`);
  return hashed.stdout.split(' ')[0]!;
}

describe('peer protocol fuzzing', () => {
  let cluster: Cluster | null = null;
  afterEach(async () => {
    await cluster?.teardown();
    cluster = null;
  });

  it(`a Primary survives ${inputs} garbage frames from an authenticated peer and ${rawConnections} raw connections (seed ${seed})`, async () => {
    cluster = new Cluster({ sizeMiB: 16 });
    await cluster.setup();
    const bob = await cluster.start('bob');
    const promoted = await cluster.cli('bob', 'primary', '--force');
    expect(promoted.code, promoted.stderr).toBe(0);
    const written = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 16M', cluster.nbdUri('bob')]);
    expect(written.code, written.stderr).toBe(0);
    const expected = createHash('sha256').update(Buffer.alloc(16 * MiB, 0x5a)).digest('hex');
    expect(await cluster.hashData('bob')).toBe(expected);

    const bobPort = cluster.ports.bob;
    const check = async (): Promise<void> => {
      if (bob.exitCode !== null || bob.signalCode !== null) {
        throw new Error(`bob exited (${bob.exitCode ?? bob.signalCode}) under fuzzing, seed ${seed}; log:\n${(await cluster!.log('bob')).slice(-4000)}`);
      }
    };
    const result = await runPeerFuzz({
      seed, inputs, rawConnections, resource: 'r0', secret: 'test-secret', localNode: 'alice', targetNode: 'bob',
      target: { host: '127.0.0.1', port: bobPort }, sizeBytes: 16 * MiB, check,
      connect: async () => {
        const status = await cluster!.status('bob');
        if (status.connection !== 'StandAlone') return;
        const connected = await cluster!.cli('bob', 'connect');
        if (connected.code !== 0) throw new Error(`drbdts connect on bob: ${connected.stderr}`);
      },
    });
    await check();
    console.log(`peer fuzz, seed ${seed}: ${result.framesSent} frames in ${result.connections} authenticated connections ` +
      `(${result.closedByTarget} closed by the node, ${result.operatorConnects} times StandAlone and reconnected), ${result.rawConnections} raw connections (${result.rawBytes} bytes), ` +
      `fuzzer peak RSS ${(result.peakRssBytes / MiB).toFixed(0)} MiB; by type ${JSON.stringify(result.byType)}`);
    expect(result.framesSent).toBe(inputs);
    expect(result.connections, 'garbage cost connections, and the node accepted new ones').toBeGreaterThan(1);

    // The node is as it was: Primary, UpToDate, the same data, serving its export.
    const status = await cluster.status('bob');
    expect(status.role, `seed ${seed}`).toBe('Primary');
    expect(status.disk, `seed ${seed}`).toBe('UpToDate');
    expect(await cluster.hashData('bob'), `seed ${seed}: bob's data changed`).toBe(expected);
    expect(await nbdHash(cluster, 'bob', 16 * MiB)).toBe(expected);
    // Memory stayed bounded: the daemon's peak resident set (VmHWM) after all of it.
    const peakKiB = Number(/VmHWM:\s+(\d+) kB/.exec(await readFile(`/proc/${bob.pid}/status`, 'utf8'))?.[1]);
    console.log(`peer fuzz, seed ${seed}: the node's peak RSS ${(peakKiB / 1024).toFixed(0)} MiB`);
    expect(peakKiB, "bob's peak RSS").toBeLessThan(512 * 1024);

    // The real peer connects and gets an identical replica.
    await cluster.start('alice');
    await cluster.waitInSync(60_000);
    expect(await cluster.hashData('alice')).toBe(expected);
  }, 300_000 + inputs * 5 + rawConnections * 50);
});
