// Proves the native replication data plane (DRBDTS_REPL_DATA_PATH=native, the default; `js` selects the
// TypeScript path) with real processes:
// (a) wire compatibility: a pair with one daemon on each path, writes replicated in both directions (native
//     Primary to js Secondary and js Primary to native Secondary, each with the native node once connecting and
//     once listening), protocol C: 4 NBD connections keep 8 requests each in flight (plain and FUA writes of
//     4 KiB to 1 MiB, write-zeroes, trims, flushes) over an 8 MiB region; the link must stay up without any
//     resync (so nothing was healed behind the test's back), the data areas hash identical, every block reads back
//     as the model allows, and the native node's counters show it used the native plane.
// (b) faults on a native pair, protocol C: 6 connections x 4 writes in flight inside 1 MiB, every write's
//     content distinct, each acknowledged write recorded per 4 KiB block (replication-block-model.ts); in the
//     middle of the stream the Secondary is SIGKILLed, then the Primary (the survivor is promoted), then the link
//     is reset by the test's proxy. The killed node restarts while writes go on, so the resync runs under load.
//     After each heal: both UpToDate, identical data areas, and every block on the Primary holds its last
//     acknowledged write or one that overlapped it in time.
// (c) `drbdts up` with an unknown DRBDTS_REPL_DATA_PATH exits non-zero naming the variable and the value, and
//     status reports the path in use (`replicationDataPath`).
// The counters (counters.nativeWrites on a Primary, counters.nativePeerWrites on a Secondary) are soft
// assertions: a failure there still lets the data checks of the whole test run.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BlockModel, WriteStream, readRegion, stampedContent, type StreamOptions } from './replication-block-model.js';
import { Cluster, repoRoot, type NodeName } from './replication-cluster.js';

type DataPath = 'native' | 'js';
const other = (node: NodeName): NodeName => (node === 'alice' ? 'bob' : 'alice');
const MiB = 1024 * 1024;
const SIZE_MIB = 32;

let cluster: Cluster | null = null;
afterEach(async () => {
  await cluster?.teardown();
  cluster = null;
});

async function withLogs<T>(c: Cluster, context: string, action: Promise<T>): Promise<T> {
  return action.catch(async (error: Error) => {
    throw new Error(`${context}: ${error.message}\nalice log tail: ${(await c.log('alice')).slice(-3000)}\n` +
      `bob log tail: ${(await c.log('bob')).slice(-3000)}`);
  });
}

/** Both Connected, UpToDate, nothing out of sync; identical data areas; the region on the Primary as the model allows. */
async function checkHealed(c: Cluster, primary: NodeName, model: BlockModel, shared: { tick: number }, context: string): Promise<void> {
  await withLogs(c, context, c.waitInSync(90_000));
  expect(await c.hashData('alice'), `${context}: replicas differ`).toBe(await c.hashData('bob'));
  const image = await readRegion(path.join(c.dir, `${primary}.nbd`), model.firstBlock, model.blocks);
  expect(model.violations(image).slice(0, 10), `${context}: blocks on the Primary ${primary}`).toEqual([]);
  model.settle(image, ++shared.tick);
}

const counter = (status: any, name: 'nativeWrites' | 'nativePeerWrites'): number | undefined => status.counters?.[name];

/** A native counter must exist in `status --json` and have grown. */
function expectGrew(growth: number | undefined, message: string): void {
  expect.soft(growth, `${message}: missing from status --json`).toBeTypeOf('number');
  if (growth !== undefined) expect.soft(growth, message).toBeGreaterThan(0);
}

describe('the per-block model of acknowledged writes', () => {
  // The checks below are only as good as the model: it must reject a stale block, not just accept fresh ones.
  it('allows the last acknowledged write and writes that overlapped it in time, and rejects stale or torn blocks', () => {
    const model = new BlockModel(10, 3);
    const image = (...ids: number[]): Buffer => Buffer.concat(ids.map((id, index) => (id === 0 ? Buffer.alloc(4096) : stampedContent(id, 10 + index, 1))));
    // Block 10: write 1 acknowledged (ticks 1-2), then write 2 issued (3) and acknowledged (4): 1 is stale.
    model.record(10, 1, { value: 1, issueTick: 1, endTick: 2, acked: true });
    model.record(10, 1, { value: 2, issueTick: 3, endTick: 4, acked: true });
    // Block 11: writes 3 and 4 in flight together (5-8, 6-7): either may have landed last.
    model.record(11, 1, { value: 3, issueTick: 5, endTick: 8, acked: true });
    model.record(11, 1, { value: 4, issueTick: 6, endTick: 7, acked: true });
    // Block 12: write 5 acknowledged, write 6 unanswered when its Primary died (9-10): either.
    model.record(12, 1, { value: 5, issueTick: 1, endTick: 2, acked: true });
    model.record(12, 1, { value: 6, issueTick: 9, endTick: 10, acked: false });
    expect(model.violations(image(2, 3, 5))).toEqual([]);
    expect(model.violations(image(2, 4, 6))).toEqual([]);
    expect(model.violations(image(1, 3, 5))).toHaveLength(1);
    expect(model.violations(image(0, 3, 5))).toHaveLength(1);
    const torn = image(2, 3, 5);
    torn.fill(0, 4096 + 2048, 8192);
    expect(model.violations(torn)[0]).toMatch(/block 11 .*garbage/);
    const misplaced = Buffer.concat([stampedContent(2, 10, 1), stampedContent(3, 10, 1), stampedContent(5, 12, 1)]);
    expect(model.violations(misplaced)[0]).toMatch(/block 11 .*garbage/);
    // After a check, an unanswered write seen on disk is the content to beat; one acknowledged later replaces it.
    model.settle(image(2, 3, 6), 11);
    model.record(12, 1, { value: 7, issueTick: 12, endTick: 13, acked: true });
    expect(model.violations(image(2, 3, 7))).toEqual([]);
    expect(model.violations(image(2, 3, 6))).toHaveLength(1);
    expect(model.violations(image(2, 3, 5))).toHaveLength(1);
  });
});

describe('wire compatibility between the native and the js replication data path (protocol C)', () => {
  const pairs: Record<NodeName, DataPath>[] = [{ alice: 'native', bob: 'js' }, { alice: 'js', bob: 'native' }];
  for (const paths of pairs) {
    it(`alice ${paths.alice} (connecting side), bob ${paths.bob}: writes replicate both ways, replicas identical`, async () => {
      cluster = new Cluster({
        sizeMiB: SIZE_MIB, protocol: 'C',
        env: { alice: { DRBDTS_REPL_DATA_PATH: paths.alice }, bob: { DRBDTS_REPL_DATA_PATH: paths.bob } },
      });
      await cluster.setup();
      // No initial sync: whatever the Secondary holds afterwards came through replication.
      await cluster.startSkippingSync();
      const c = cluster;
      const shared = { tick: 0, nextWriteId: 1 };
      const model = new BlockModel(1024, 2048); // 8 MiB from offset 4 MiB
      const zeroHash = createHash('sha256').update(Buffer.alloc(c.sizeBytes)).digest('hex');

      for (const primary of ['alice', 'bob'] as const) {
        const secondary = other(primary);
        const direction = `${paths[primary]} Primary ${primary} -> ${paths[secondary]} Secondary ${secondary}`;
        if (primary === 'bob') {
          expect((await c.cli('alice', 'secondary')).stderr, `${direction}: alice secondary`).toBe('');
          expect((await c.cli('bob', 'primary')).stderr, `${direction}: bob primary`).toBe('');
        }
        const before = { primary: await c.status(primary), secondary: await c.status(secondary) };
        const stream = new WriteStream({
          socketPath: path.join(c.dir, `${primary}.nbd`), seed: primary === 'alice' ? 11 : 12, connections: 4, depth: 8,
          firstBlock: model.firstBlock, blocks: model.blocks, maxBlocks: 256, largeShare: 0.04,
          fuaShare: 0.1, zeroShare: 0.04, trimShare: 0.04, flushShare: 0.03,
        }, model, shared);
        await withLogs(c, `${direction}: 2000 requests answered`, Promise.race([
          stream.acks(2000),
          new Promise((_, reject) => setTimeout(() => reject(new Error('the stream stalled')), 90_000)),
        ]));
        const result = await stream.stop();
        expect(result.errors, direction).toEqual([]);
        expect(result.deadConnections, direction).toBe(0);

        const after = { primary: await c.status(primary), secondary: await c.status(secondary) };
        // Replicated, not healed: the link never dropped, nothing was resynced, nothing is out of sync.
        expect(after.primary.connection, direction).toBe('Connected');
        expect(after.primary.outOfSyncBytes, direction).toBe(0);
        expect(after.secondary.counters.resyncReceivedBytes - before.secondary.counters.resyncReceivedBytes, `${direction}: resynced bytes`).toBe(0);
        expect(after.secondary.counters.diskWrittenBytes - before.secondary.counters.diskWrittenBytes, `${direction}: bytes the Secondary wrote`)
          .toBeGreaterThan(4 * MiB);
        await checkHealed(c, primary, model, shared, direction);
        expect(await c.hashData(primary), `${direction}: the writes left data`).not.toBe(zeroHash);

        // Which plane carried the writes.
        for (const node of ['alice', 'bob'] as const) {
          expect.soft(after[node === primary ? 'primary' : 'secondary'].replicationDataPath, `${direction}: ${node}'s status.replicationDataPath`)
            .toBe(paths[node]);
        }
        const delta = (which: 'primary' | 'secondary', name: 'nativeWrites' | 'nativePeerWrites'): number | undefined => {
          const now = counter(after[which], name);
          return now === undefined ? undefined : now - (counter(before[which], name) ?? 0);
        };
        if (paths[primary] === 'native') {
          expectGrew(delta('primary', 'nativeWrites'), `${direction}: counters.nativeWrites on the native Primary ` +
            `(counters ${JSON.stringify(after.primary.counters)})`);
        } else {
          expect.soft(delta('primary', 'nativeWrites') ?? 0, `${direction}: counters.nativeWrites on the js Primary`).toBe(0);
        }
        if (paths[secondary] === 'native') {
          expectGrew(delta('secondary', 'nativePeerWrites'), `${direction}: counters.nativePeerWrites on the native Secondary ` +
            `(counters ${JSON.stringify(after.secondary.counters)})`);
        } else {
          expect.soft(delta('secondary', 'nativePeerWrites') ?? 0, `${direction}: counters.nativePeerWrites on the js Secondary`).toBe(0);
        }
      }
    }, 300_000);
  }
});

describe('native replication data plane under faults (protocol C)', () => {
  it('keeps every acknowledged overlapping write through a Secondary SIGKILL, a Primary SIGKILL and a link reset', async () => {
    cluster = new Cluster({
      sizeMiB: SIZE_MIB, protocol: 'C', proxy: true,
      env: { alice: { DRBDTS_REPL_DATA_PATH: 'native' }, bob: { DRBDTS_REPL_DATA_PATH: 'native' } },
    });
    await cluster.setup();
    await cluster.startSkippingSync();
    const c = cluster;
    const shared = { tick: 0, nextWriteId: 1 };
    const model = new BlockModel(2048, 256); // 1 MiB from offset 8 MiB: nearly every write overlaps others in flight
    let seed = 100;
    const streamOn = (node: NodeName): WriteStream => new WriteStream({
      socketPath: path.join(c.dir, `${node}.nbd`), seed: seed++, connections: 6, depth: 4,
      firstBlock: model.firstBlock, blocks: model.blocks, maxBlocks: 16, fuaShare: 0.1, flushShare: 0.02,
    } satisfies StreamOptions, model, shared);
    const acks = (stream: WriteStream, count: number, context: string): Promise<void> => withLogs(c, context, Promise.race([
      stream.acks(count),
      new Promise<void>((_, reject) => setTimeout(() => reject(new Error(`${count} acks not reached (${stream.acked})`)), 60_000)),
    ]));
    /** Both Connected: the Primary's writes went through its native plane, the Secondary applied them on its own. */
    const checkNativeCounters = async (primary: NodeName, run: () => Promise<void>, context: string): Promise<void> => {
      const before = { primary: await c.status(primary), secondary: await c.status(other(primary)) };
      await run();
      const after = { primary: await c.status(primary), secondary: await c.status(other(primary)) };
      if (after.primary.connection !== 'Connected' || after.secondary.connection !== 'Connected') return;
      const grew = (which: 'primary' | 'secondary', name: 'nativeWrites' | 'nativePeerWrites'): number | undefined => {
        const now = counter(after[which], name);
        return now === undefined ? undefined : now - (counter(before[which], name) ?? 0);
      };
      expectGrew(grew('primary', 'nativeWrites'), `${context}: counters.nativeWrites on Primary ${primary} ` +
        `(counters ${JSON.stringify(after.primary.counters)})`);
      expectGrew(grew('secondary', 'nativePeerWrites'), `${context}: counters.nativePeerWrites on Secondary ${other(primary)} ` +
        `(counters ${JSON.stringify(after.secondary.counters)})`);
    };

    // (i) SIGKILL of the Secondary mid-stream; it restarts while the Primary keeps writing (resync under load).
    let primary: NodeName = 'alice';
    let context = 'Secondary bob SIGKILLed';
    let stream = streamOn(primary);
    await checkNativeCounters(primary, () => acks(stream, 400, context), context);
    c.kill('bob');
    await acks(stream, 700, context);
    await withLogs(c, `${context}: restart`, c.start('bob'));
    await acks(stream, 1000, context);
    let result = await stream.stop();
    expect(result.errors, context).toEqual([]);
    expect(result.unanswered, context).toBe(0);
    await checkHealed(c, primary, model, shared, context);

    // (ii) SIGKILL of the Primary mid-stream: what it acknowledged must be on the survivor, promoted; the old
    // Primary restarts (its activity log resynced from the survivor) while the survivor writes.
    context = 'Primary alice SIGKILLed, bob promoted';
    stream = streamOn(primary);
    await checkNativeCounters(primary, () => acks(stream, 400, context), context);
    c.kill('alice');
    result = await withLogs(c, `${context}: the writers on the dead Primary`, stream.ended());
    expect(result.errors, context).toEqual([]);
    expect(result.acked, context).toBeGreaterThanOrEqual(400);
    await c.waitState('bob', 'to lose the dead Primary', (s) => s.connection !== 'Connected', 20_000);
    const promoted = await c.cli('bob', 'primary');
    expect(promoted.code, `${context}: promote bob: ${promoted.stderr}`).toBe(0);
    primary = 'bob';
    stream = streamOn(primary);
    await acks(stream, 300, context);
    await withLogs(c, `${context}: restart`, c.start('alice'));
    await acks(stream, 600, context);
    result = await stream.stop();
    expect(result.errors, context).toEqual([]);
    expect(result.unanswered, context).toBe(0);
    await checkHealed(c, primary, model, shared, context);

    // (iii) a link reset by the proxy mid-stream: both sides drop, reconnect and resync while the writes go on.
    context = 'link reset (Primary bob)';
    stream = streamOn(primary);
    await checkNativeCounters(primary, () => acks(stream, 400, context), context);
    const connectionsBefore = c.proxy!.connectionsSeen;
    c.proxy!.breakAll();
    await acks(stream, 700, context);
    await withLogs(c, `${context}: reconnect`, c.waitState(primary, 'to reconnect', (s) => s.connection === 'Connected'));
    expect(c.proxy!.connectionsSeen, `${context}: new connections through the proxy`).toBeGreaterThan(connectionsBefore);
    await acks(stream, 1000, context);
    result = await stream.stop();
    expect(result.errors, context).toEqual([]);
    expect(result.unanswered, context).toBe(0);
    await checkHealed(c, primary, model, shared, context);

    // Still on the native plane after all that.
    await checkNativeCounters(primary, async () => {
      const last = streamOn(primary);
      await acks(last, 300, 'after the faults');
      expect((await last.stop()).errors).toEqual([]);
    }, 'after the faults');
    await checkHealed(c, primary, model, shared, 'after the faults');
  }, 600_000);
});

describe('DRBDTS_REPL_DATA_PATH', () => {
  it('an unknown value makes `drbdts up` exit non-zero naming the variable and the value; status shows the path in use', async () => {
    cluster = new Cluster({ sizeMiB: 8 });
    await cluster.setup();
    const c = cluster;
    const child = spawn('node', [path.join(repoRoot, 'bin', 'drbdts.js'), 'up', 'r0', '--config', c.configPath('alice'), '--node', 'alice'], {
      env: { ...process.env, DRBDTS_LOG_LEVEL: 'warn', DRBDTS_REPL_DATA_PATH: 'bogus' }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    child.stdout.resume();
    const exit = await new Promise<number | 'running'>((resolve) => {
      const timer = setTimeout(() => resolve('running'), 10_000);
      child.on('exit', (code, signal) => {
        clearTimeout(timer);
        resolve(code ?? (signal === null ? -1 : 128));
      });
    });
    if (exit === 'running') {
      child.kill('SIGKILL');
      await new Promise((resolve) => child.once('exit', resolve));
    }
    expect(exit, `drbdts up with DRBDTS_REPL_DATA_PATH=bogus: ${exit === 'running' ? 'still running after 10 s' : `exit ${exit}`}; stderr: ${stderr}`)
      .not.toBe('running');
    expect(exit).not.toBe(0);
    expect(stderr).toContain('DRBDTS_REPL_DATA_PATH');
    expect(stderr).toContain('bogus');

    // The refusal left nothing behind (lock, socket, dirty metadata): the node comes up on either path, and says which.
    for (const value of [undefined, 'js', 'native'] as const) {
      await c.start('alice', { DRBDTS_REPL_DATA_PATH: value });
      expect.soft((await c.status('alice')).replicationDataPath, `status.replicationDataPath with DRBDTS_REPL_DATA_PATH=${value ?? '(unset)'}`)
        .toBe(value ?? 'native');
      await c.down('alice');
    }
  });
});
