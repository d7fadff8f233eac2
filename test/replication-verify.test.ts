// Proves that online verify works per 4 KiB block, as DRBD's does: two separate 4 KiB blocks of the Secondary's
// backing file are corrupted behind its daemon's back; `verify --wait` on the Primary reports exactly two
// blocks, both nodes show 8 KiB out of sync (not the 256 KiB ranges the summary digests cover), and the resync
// after disconnect + connect sends exactly those 8 KiB of data (random data, so lz4 cannot shrink it). Also:
// the `verified:` marker belongs to the connection it was found on: a disconnect clears it, as a new verify does.
// Nodes whose verify-alg differs do not connect.
import { afterEach, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { open, readFile, writeFile } from 'node:fs/promises';
import { Cluster } from './replication-cluster.js';

let cluster: Cluster | null = null;
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
});

const KiB = 1024;
const MiB = 1024 * KiB;

describe('online verify', () => {
  it('marks exactly the corrupted 4 KiB blocks and the resync sends only those', async () => {
    cluster = new Cluster({ sizeMiB: 16 });
    await cluster.setup();
    const aliceImage = await open(cluster.imagePath('alice'), 'r+');
    await aliceImage.write(randomBytes(16 * MiB), 0, 16 * MiB, 0);
    await aliceImage.close();
    await cluster.startPrimaryAlice();
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));

    // Two blocks in different 256 KiB verify ranges, one of them not aligned to the range's start.
    const bobImage = await open(cluster.imagePath('bob'), 'r+');
    for (const offset of [1 * MiB + 12 * KiB, 9 * MiB + 256 * KiB]) {
      await bobImage.write(Buffer.alloc(4 * KiB, 0xee), 0, 4 * KiB, offset);
    }
    await bobImage.sync();
    await bobImage.close();

    const verify = await cluster.cli('alice', 'verify', '--wait', '--json');
    expect(verify.code, verify.stderr).toBe(0);
    const lines = verify.stdout.trim().split('\n');
    const result = JSON.parse(lines[lines.length - 1]!);
    expect(result.verify.outOfSyncBlocks).toBe(2);
    expect(result.outOfSyncBytes).toBe(8 * KiB);
    // The peer marks the same two blocks (it learns them from the initiator).
    await cluster.waitState('bob', 'the same 8 KiB out of sync on bob', (s) => s.outOfSyncBytes === 8 * KiB);
    const text = await cluster.cli('alice', 'status');
    expect(text.stdout).toContain('verified:100.00');

    const before = (await cluster.status('alice')).counters;
    expect((await cluster.cli('alice', 'disconnect')).code).toBe(0);
    const disconnected = await cluster.waitState('alice', 'StandAlone', (s) => s.connection === 'StandAlone');
    // The verify result went with the connection.
    expect(disconnected.verify).toBeNull();
    expect((await cluster.cli('alice', 'status')).stdout).not.toContain('verified:');
    expect((await cluster.cli('alice', 'connect')).code).toBe(0);
    await cluster.waitInSync();
    const after = (await cluster.status('alice')).counters;
    expect(after.resyncSentDataBytes - before.resyncSentDataBytes).toBe(8 * KiB);
    expect(await cluster.hashData('alice')).toBe(await cluster.hashData('bob'));
    expect((await cluster.status('alice')).verify).toBeNull();
  });

  it('finds nothing on identical replicas, and a new verify replaces the last result (verify-alg sha256)', async () => {
    cluster = new Cluster({ sizeMiB: 8, extraResync: 'verify-alg = "sha256"' });
    await cluster.setup();
    await cluster.startSkippingSync();
    const first = await cluster.cli('alice', 'verify', '--wait');
    expect(first.code, first.stderr).toBe(0);
    expect(first.stdout).toContain('verify finished: 0 blocks out of sync');
    const bobImage = await open(cluster.imagePath('bob'), 'r+');
    await bobImage.write(Buffer.alloc(4 * KiB, 0x5a), 0, 4 * KiB, 4 * MiB);
    await bobImage.sync();
    await bobImage.close();
    // bob starts the second verify: alice's marker from the first one is gone once bob's requests arrive.
    expect((await cluster.cli('bob', 'verify')).code).toBe(0);
    const done = await cluster.waitState('bob', 'verify by bob finished', (s) =>
      s.connection === 'Connected' && s.verify !== null && s.verify.doneBytes === s.size);
    expect(done.verify.outOfSyncBlocks).toBe(1);
    const alice = await cluster.waitState('alice', 'alice sees bob\'s verify result', (s) =>
      s.verify !== null && s.verify.outOfSyncBlocks === 1);
    expect(alice.outOfSyncBytes).toBe(4 * KiB);
  });

  it('refuses to connect nodes whose verify-alg differs, saying so', async () => {
    // Verify compares digests: with different algorithms every range would differ. bob's config says sha256,
    // alice's nothing (xxh64): both go StandAlone with the reason in their logs.
    cluster = new Cluster({ sizeMiB: 8 });
    await cluster.setup();
    const bobConfig = cluster.configPath('bob');
    await writeFile(bobConfig, (await readFile(bobConfig, 'utf8')).replace('[resync]\n', '[resync]\nverify-alg = "sha256"\n'));
    await cluster.start('alice');
    await cluster.start('bob');
    await cluster.waitState('alice', 'StandAlone', (s) => s.connection === 'StandAlone');
    expect(await cluster.log('alice')).toContain('verify-alg is xxh64 here and sha256 on bob: the config must be identical');
  });
});
