// The config fuzzer: seeded TOML texts made from a valid resource config by structured mutations (a key's value
// replaced by one of another type or out of range, keys dropped, unknown keys and sections added, sections
// duplicated or nested wrongly, node sections multiplied) and by raw ones (bytes flipped, inserted, cut), fed to
// parseResourceConfig. What must hold: every input either parses into a config whose invariants hold or is
// refused with a ConfigError naming the file; never another exception, a hang or growing memory.
import { ConfigError, parseResourceConfig, type ResourceConfig } from '../../src/resource/config.js';
import { mulberry32 } from '../helpers/prng.js';

export const BASE_CONFIG = `[resource]
name = "r0"
protocol = "C"
shared-secret = "s3cret"

[disk]
size = "64MiB"
al-extents = 1237

[net]
ping-interval = "1s"
ping-timeout = "5s"
connect-int = "1s"
max-buffers = "64MiB"
max-in-flight = 2048
allow-two-primaries = false
after-sb-0pri = "disconnect"
after-sb-1pri = "disconnect"
after-sb-2pri = "disconnect"
on-congestion = "block"

[resync]
rate = "100MiB"
min-rate = "4MiB"
csums-alg = "xxh64"
verify-alg = "xxh64"

[node.alice]
address = "127.0.0.1:7789"
disk = "/var/lib/drbdts/alice.img"
meta-disk = "internal"
nbd = "unix:/run/drbdts/r0.nbd"
control = "/run/drbdts/r0.ctl"

[node.bob]
address = "127.0.0.1:7790"
disk = "/var/lib/drbdts/bob.img"
meta-disk = "internal"
nbd = "127.0.0.1:10809"
control = "/run/drbdts/r0-bob.ctl"
`;

export interface ConfigFuzzResult {
  inputs: number;
  accepted: number;
  refused: number;
  /** Refusals per reason kind (the key or "toml"), for a sense of coverage. */
  refusedByKey: Record<string, number>;
  peakRssBytes: number;
}

const values = [
  '""', '"x"', '0', '-1', '1', '4096', '1.5', 'nan', 'inf', '-inf', 'true', 'false', '[]', '[1, 2]', '{}', '{ a = 1 }',
  '1979-05-27T07:32:00Z', '"1KiB"', '"0MiB"', '"1TiB"', '"999999999999TiB"', '"-5MiB"', '"1.5GiB"', '"5ms"', '"0s"',
  '"1h"', '"10 s"', '"abc"', '"A"', '"B"', '"D"', '"unix:"', '"unix:/x"', '"127.0.0.1:0"', '"127.0.0.1:70000"',
  '"[::1]:7789"', '"host:port"', '"relative/path"', '"/abs/path"', '"internal"', '"discard-node-bob"',
  '"pull-ahead"', '"sha256"', '"md5"', '9007199254740993', '0x7fffffff', '"\\u0000"', `"${'x'.repeat(300)}"`,
];
const keys = [
  'name', 'protocol', 'shared-secret', 'size', 'al-extents', 'ping-interval', 'ping-timeout', 'connect-int',
  'max-buffers', 'max-in-flight', 'allow-two-primaries', 'after-sb-0pri', 'after-sb-1pri', 'after-sb-2pri',
  'on-congestion', 'rate', 'min-rate', 'csums-alg', 'verify-alg', 'address', 'disk', 'meta-disk', 'nbd', 'control',
  'device', 'unknown-key', '"quoted key"',
];
const sections = ['[resource]', '[disk]', '[net]', '[resync]', '[node.alice]', '[node.bob]', '[node.carol]', '[node]',
  '[[node]]', '[node."bad name"]', '[extra]', '[node.alice.sub]', '[resource.sub]'];

/** Checks what a parsed config promises its users; returns a broken promise, or null. */
export function configInvariant(config: ResourceConfig): string | null {
  const nodes = Object.values(config.nodes);
  if (nodes.length !== 2) return `${nodes.length} nodes`;
  if (!['A', 'B', 'C'].includes(config.protocol)) return `protocol ${config.protocol}`;
  if (config.allowTwoPrimaries && config.protocol !== 'C') return 'allow-two-primaries without protocol C';
  if (config.sizeBytes !== undefined && (!Number.isSafeInteger(config.sizeBytes) || config.sizeBytes % 4096 !== 0
    || config.sizeBytes < 1024 * 1024)) return `size ${config.sizeBytes}`;
  for (const [name, value] of Object.entries({
    pingIntervalMs: config.pingIntervalMs, pingTimeoutMs: config.pingTimeoutMs, connectRetryMs: config.connectRetryMs,
    sendQueueMaxBytes: config.sendQueueMaxBytes, maxInFlightWrites: config.maxInFlightWrites,
    resyncRateMaxBytesPerSecond: config.resyncRateMaxBytesPerSecond, alExtents: config.alExtents,
  })) {
    if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) return `${name} ${value}`;
  }
  if (config.pingTimeoutMs <= config.pingIntervalMs) return 'ping-timeout not above ping-interval';
  if (config.resyncRateMinBytesPerSecond > config.resyncRateMaxBytesPerSecond) return 'min-rate above rate';
  for (const node of nodes) {
    if (typeof node.name !== 'string' || node.name === '') return 'a node without a name';
    if (!Number.isInteger(node.address.port) || node.address.port < 1 || node.address.port > 65535) {
      return `node ${node.name} port ${node.address.port}`;
    }
    if (typeof node.address.host !== 'string' || node.address.host === '') return `node ${node.name} host`;
    for (const path of [node.disk, node.control]) if (typeof path !== 'string' || path === '') return `node ${node.name} path`;
    if (typeof node.nbd !== 'string' || node.nbd === '') return `node ${node.name} nbd`;
  }
  if (typeof config.sharedSecret !== 'string' || config.sharedSecret === '') return 'empty shared secret';
  return null;
}

export function mutateConfig(random: () => number): string {
  const int = (below: number): number => Math.floor(random() * below);
  const pick = <T>(items: readonly T[]): T => items[int(items.length)]!;
  let lines = BASE_CONFIG.split('\n');
  for (let round = 0, rounds = 1 + int(4); round < rounds; round += 1) {
    const r = random();
    const at = int(lines.length);
    if (r < 0.3) {
      // A value replaced.
      const match = /^([A-Za-z0-9"_ -]+?) = /.exec(lines[at] ?? '');
      if (match !== null) lines[at] = `${match[1]} = ${pick(values)}`;
    } else if (r < 0.4) {
      lines.splice(at, 1); // a line dropped
    } else if (r < 0.55) {
      lines.splice(at, 0, `${pick(keys)} = ${pick(values)}`); // a key added (maybe a duplicate)
    } else if (r < 0.65) {
      lines.splice(at, 0, pick(sections)); // a section header added
    } else if (r < 0.7) {
      // A whole node section copied under another name (three nodes, or a node named like the other).
      const name = pick(['carol', 'alice', 'bob', 'a b', '', 'x'.repeat(70)]);
      lines.push(`[node.${JSON.stringify(name)}]`, 'address = "127.0.0.1:7791"', 'disk = "/tmp/c.img"',
        'nbd = "unix:/tmp/c.nbd"', 'control = "/tmp/c.ctl"');
    } else if (r < 0.8) {
      lines = lines.slice(0, int(lines.length)); // cut
    } else {
      // Raw: bytes flipped or inserted somewhere in the text.
      const text = lines.join('\n');
      const position = int(text.length + 1);
      const noise = String.fromCharCode(...Array.from({ length: 1 + int(6) }, () => pick([int(128), int(0x10000), 0x22, 0x5b, 0x5d, 0x3d, 0x0a, 0x23])));
      const cut = random() < 0.5 ? 1 + int(4) : 0;
      lines = (text.slice(0, position) + noise + text.slice(position + cut)).split('\n');
    }
  }
  return lines.join('\n');
}

export function runConfigFuzz(seed: number, inputs: number): ConfigFuzzResult {
  const random = mulberry32(seed);
  const result: ConfigFuzzResult = { inputs: 0, accepted: 0, refused: 0, refusedByKey: {}, peakRssBytes: 0 };
  for (let i = 0; i < inputs; i += 1) {
    const text = mutateConfig(random);
    result.inputs += 1;
    let config: ResourceConfig;
    try {
      config = parseResourceConfig(text, 'fuzz.toml');
    } catch (error) {
      if (!(error instanceof ConfigError)) {
        throw new Error(`input ${i} (seed ${seed}) threw ${(error as Error)?.name}: ${(error as Error)?.message}\n--- input ---\n${text}`);
      }
      if (!error.message.startsWith('fuzz.toml')) throw new Error(`input ${i}: the error does not name the file: ${error.message}`);
      result.refused += 1;
      const key = error.key ?? 'toml';
      result.refusedByKey[key] = (result.refusedByKey[key] ?? 0) + 1;
      continue;
    }
    const broken = configInvariant(config);
    if (broken !== null) throw new Error(`input ${i} (seed ${seed}) was accepted with ${broken}\n--- input ---\n${text}`);
    result.accepted += 1;
    if (i % 10_000 === 0) result.peakRssBytes = Math.max(result.peakRssBytes, process.memoryUsage().rss);
  }
  result.peakRssBytes = Math.max(result.peakRssBytes, process.memoryUsage().rss);
  return result;
}
