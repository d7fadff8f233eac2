// LocalDisk micro benchmarks (tinybench): random pread/pwrite of 4 KiB at queue depth 32 and of 1 MiB at queue
// depth 8 on a page-cache-backed file, through each I/O design LocalDisk could use. The question: what does a
// thread-pool hop per request cost, and which design keeps most of the synchronous speed without blocking the
// event loop? Besides throughput, each variant records how long the event loop went without a turn while it
// ran ("loop stall", p99 and max): a design that blocks the loop shows there, however fast it is.
//
// The machine is shared and noisy, so (as bench/README.md asks) variants alternate: each round runs every
// variant briefly, in a rotated order, and the table reports the median over rounds and each variant's median
// ratio to the one-hop-per-request baseline (fs.read/fs.write) measured in the same round.
//
//   node --import ./bench/ts-loader.mjs bench/local-disk.bench.ts [--quick] [--rounds N] [--json FILE]
//   UV_THREADPOOL_SIZE=N node --import ... to vary the pool (default 4).
// Results: bench/README.md, "LocalDisk micro benchmarks".
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createHistogram, type RecordableHistogram } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { Bench } from 'tinybench';
import { LocalDisk } from '../src/blockdev/local.js';
import { FileIoQueue } from '../src/native/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const { values: args } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    rounds: { type: 'string' },
    json: { type: 'string' },
    only: { type: 'string' },
  },
});
const quick = args.quick === true;
const rounds = Number(args.rounds ?? (quick ? 1 : 5));
if (!Number.isInteger(rounds) || rounds < 1) throw new Error(`--rounds must be a positive integer, got ${args.rounds}`);
const fileSizeBytes = quick ? 64 * MiB : 1024 * MiB;
const benchOptions = quick ? { time: 50, warmupTime: 10, iterations: 2 } : { time: 600, warmupTime: 100, iterations: 5 };

interface Workload {
  name: string;
  direction: 'read' | 'write';
  blockBytes: number;
  queueDepth: number;
  /** Operations per benchmark iteration, issued keeping queueDepth in flight. */
  operationsPerRound: number;
}

const workloads: Workload[] = [];
for (const direction of ['read', 'write'] as const) {
  workloads.push({ name: `4 KiB random ${direction}, QD32`, direction, blockBytes: 4 * KiB, queueDepth: 32, operationsPerRound: 512 });
}
for (const direction of ['read', 'write'] as const) {
  workloads.push({ name: `1 MiB random ${direction}, QD8`, direction, blockBytes: MiB, queueDepth: 8, operationsPerRound: 32 });
}

type Operation = (offset: number, buffer: Buffer) => Promise<void>;

interface Variant {
  name: string;
  read: Operation;
  write: Operation;
}

const baselineName = 'fs.read/fs.write (a hop per request)';

function makeVariants(fd: number, fileHandle: fs.promises.FileHandle, disk: LocalDisk): Variant[] {
  const batch = (batchesInFlightMax: number, batchBytesMax: number, batchOperationsSpreadMin: number): Variant => {
    const queue = new FileIoQueue(fd, { batchesInFlightMax, batchBytesMax, batchOperationsSpreadMin, nowait: false });
    const spread = batchOperationsSpreadMin >= 64 ? ', no spread' : `, spread >= ${batchOperationsSpreadMin}`;
    return {
      name: `native batch: ${batchesInFlightMax} hops, ${batchBytesMax / MiB} MiB/hop${spread}`,
      read: (offset, buffer) => queue.readAsync(offset, buffer),
      write: (offset, buffer) => queue.writeAsync(offset, buffer, false),
    };
  };
  return [
    {
      name: 'fs.promises FileHandle (a hop per request)',
      read: async (offset, buffer) => {
        await fileHandle.read(buffer, 0, buffer.length, offset);
      },
      write: async (offset, buffer) => {
        await fileHandle.write(buffer, 0, buffer.length, offset);
      },
    },
    {
      name: baselineName,
      read: (offset, buffer) =>
        new Promise((resolve, reject) =>
          fs.read(fd, buffer, 0, buffer.length, offset, (error) => (error ? reject(error) : resolve())),
        ),
      write: (offset, buffer) =>
        new Promise((resolve, reject) =>
          fs.write(fd, buffer, 0, buffer.length, offset, (error) => (error ? reject(error) : resolve())),
        ),
    },
    {
      name: 'readSync/writeSync on the loop (blocks it)',
      read: async (offset, buffer) => {
        fs.readSync(fd, buffer, 0, buffer.length, offset);
      },
      write: async (offset, buffer) => {
        fs.writeSync(fd, buffer, 0, buffer.length, offset);
      },
    },
    {
      name: 'LocalDisk (RWF_NOWAIT hits on the loop + batch 4 hops, 1 MiB/hop, spread >= 8)',
      read: (offset, buffer) => disk.read(offset, buffer),
      write: (offset, buffer) => disk.write(offset, buffer, false),
    },
    batch(2, 8 * MiB, 64),
    batch(4, 1 * MiB, 64),
    batch(4, 1 * MiB, 8),
  ].filter((variant) => args.only === undefined || variant.name.includes(args.only) || variant.name === baselineName);
}

// A heartbeat on the event loop: a setImmediate chain recording the time between its beats into the running
// variant's histogram (microseconds). Asynchronous designs let it beat between completions; synchronous I/O
// holds it off for as long as it keeps the loop (here a whole round issued from microtasks, as an NBD server
// handling one socket read's worth of requests would).
let heartbeatHistogram: RecordableHistogram | null = null;
let heartbeatLast = 0;
let heartbeatRunning = false;
function heartbeat(): void {
  const now = performance.now();
  if (heartbeatHistogram !== null) heartbeatHistogram.record(Math.max(1, Math.round((now - heartbeatLast) * 1000)));
  heartbeatLast = now;
  if (heartbeatRunning) setImmediate(heartbeat);
}

/** Keeps `queueDepth` operations in flight until `operationsPerRound` have completed. */
async function runAtDepth(workload: Workload, operation: Operation, offsets: Float64Array, buffers: Buffer[]) {
  let next = 0;
  const worker = async (slot: number): Promise<void> => {
    const buffer = buffers[slot]!;
    while (next < workload.operationsPerRound) {
      const index = next++;
      await operation(offsets[index % offsets.length]!, buffer);
    }
  };
  const workers: Promise<void>[] = [];
  for (let slot = 0; slot < workload.queueDepth; slot++) workers.push(worker(slot));
  await Promise.all(workers);
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

async function main(): Promise<void> {
  const tempDir = fs.mkdtempSync(path.join(os.tmpdir(), 'drbdts-bench-local-disk-'));
  const file = path.join(tempDir, 'disk.img');
  // Fully written first, so reads come from the page cache and writes overwrite allocated blocks.
  const chunk = Buffer.alloc(8 * MiB, 0xa5);
  const out = fs.openSync(file, 'w');
  for (let offset = 0; offset < fileSizeBytes; offset += chunk.length) fs.writeSync(out, chunk, 0, chunk.length, offset);
  // Written back before measuring, so the setup's dirty pages do not throttle the first variants' writes.
  fs.fsyncSync(out);
  fs.closeSync(out);
  const disk = await LocalDisk.open(file);
  const fileHandle = await fs.promises.open(file, 'r+');
  const variants = makeVariants(disk.fd, fileHandle, disk);
  heartbeatRunning = true;
  setImmediate(heartbeat);

  const report: Record<string, unknown>[] = [];
  console.log(
    `LocalDisk micro benchmarks: ${rounds} round(s), file ${fileSizeBytes / MiB} MiB in ${os.tmpdir()}, ` +
      `UV_THREADPOOL_SIZE=${process.env.UV_THREADPOOL_SIZE ?? '4 (default)'}, ${os.cpus().length} CPUs, node ${process.version}`,
  );
  for (const workload of workloads) {
    const offsets = new Float64Array(8192);
    const blocks = fileSizeBytes / workload.blockBytes;
    for (let i = 0; i < offsets.length; i++) offsets[i] = Math.floor(Math.random() * blocks) * workload.blockBytes;
    const buffers = Array.from({ length: workload.queueDepth }, () => Buffer.alloc(workload.blockBytes, 0x3c));
    const perVariant = new Map<string, { opsPerSecond: number[]; ratios: number[]; stalls: RecordableHistogram }>();
    for (const variant of variants) perVariant.set(variant.name, { opsPerSecond: [], ratios: [], stalls: createHistogram() });

    for (let round = 0; round < rounds; round++) {
      const bench = new Bench({ name: workload.name, ...benchOptions });
      // Rotate the order every round so that no variant always runs first or last.
      const order = variants.map((_, i) => variants[(i + round) % variants.length]!);
      for (const variant of order) {
        const operation = variant[workload.direction];
        const stalls = perVariant.get(variant.name)!.stalls;
        bench.add(variant.name, async () => {
          heartbeatHistogram = stalls;
          heartbeatLast = performance.now();
          await runAtDepth(workload, operation, offsets, buffers);
          // The stretch since the last beat: for synchronous I/O, the whole round.
          stalls.record(Math.max(1, Math.round((performance.now() - heartbeatLast) * 1000)));
          heartbeatHistogram = null;
        });
      }
      await bench.run();
      const roundOps = new Map<string, number>();
      for (const task of bench.tasks) {
        const result = task.result as { state: string; latency?: { mean: number }; error?: Error };
        if (result.latency === undefined) throw new Error(`${workload.name} / ${task.name}: ${result.state} ${result.error ?? ''}`);
        roundOps.set(task.name, workload.operationsPerRound / (result.latency.mean / 1000));
      }
      const baseline = roundOps.get(baselineName)!;
      for (const [name, opsPerSecond] of roundOps) {
        const entry = perVariant.get(name)!;
        entry.opsPerSecond.push(opsPerSecond);
        entry.ratios.push(opsPerSecond / baseline);
      }
    }

    const rows = variants.map((variant) => {
      const entry = perVariant.get(variant.name)!;
      const opsPerSecond = median(entry.opsPerSecond);
      return {
        variant: variant.name,
        kIOPS: (opsPerSecond / 1000).toFixed(1),
        'MB/s': ((opsPerSecond * workload.blockBytes) / 1e6).toFixed(0),
        'range kIOPS': `${(Math.min(...entry.opsPerSecond) / 1000).toFixed(1)}-${(Math.max(...entry.opsPerSecond) / 1000).toFixed(1)}`,
        'x baseline': median(entry.ratios).toFixed(2),
        'stall p99 ms': (entry.stalls.percentile(99) / 1000).toFixed(2),
        'stall max ms': (entry.stalls.max / 1000).toFixed(2),
      };
    });
    console.log(`\n${workload.name}`);
    console.table(rows);
    report.push({ workload: workload.name, rows });
  }

  heartbeatRunning = false;
  await fileHandle.close();
  await disk.close();
  fs.rmSync(tempDir, { recursive: true, force: true });
  if (args.json !== undefined) fs.writeFileSync(args.json, JSON.stringify({ date: new Date().toISOString(), report }, null, 2));
}

await main();
