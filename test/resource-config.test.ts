// Resource configuration (src/resource/config.ts): a good file parses with every default filled in, and each kind
// of bad file (missing key, bad protocol, unknown node, bad size, typo'd key, broken TOML, one node only) fails
// with a ConfigError whose message names the file, the key and the problem. Also node-name resolution from
// --node, $DRBDTS_NODE and the host name. Parses real files written to a temp dir.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ConfigError, loadResourceConfig, parseResourceConfig, peerOf, resolveNodeName } from '../src/resource/config.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'drbdts-config-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const good = `
[resource]
name = "r0"
protocol = "C"
shared-secret = "change-me"

[disk]
size = "1GiB"

[node.alice]
address = "127.0.0.1:7789"
disk = "/var/lib/drbdts/r0-alice.img"
meta-disk = "internal"
nbd = "unix:/run/drbdts/r0-alice.nbd"

[node.bob]
address = "127.0.0.1:7790"
disk = "/var/lib/drbdts/r0-bob.img"
nbd = "127.0.0.1:10809"
device = "/dev/nbd0"
`;

function errorOf(text: string): ConfigError {
  try {
    parseResourceConfig(text, '/etc/drbdts/r0.toml');
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return error as ConfigError;
  }
  throw new Error('expected a ConfigError, the config parsed');
}

describe('parseResourceConfig', () => {
  it('parses the documented example with defaults', async () => {
    const file = path.join(dir, 'r0.toml');
    await writeFile(file, good);
    const config = loadResourceConfig(file);
    expect(config.name).toBe('r0');
    expect(config.fileName).toBe(file);
    expect(config.protocol).toBe('C');
    expect(config.sharedSecret).toBe('change-me');
    expect(config.sizeBytes).toBe(1024 ** 3);
    expect(config.onCongestion).toBe('block');
    expect(config.allowTwoPrimaries).toBe(false);
    expect(config.afterSb0pri).toBe('disconnect');
    expect(config.pingTimeoutMs).toBe(5000);
    expect(config.alExtents).toBe(1237);
    expect(config.resyncRateMaxBytesPerSecond).toBe(100 * 1024 * 1024);
    expect(config.nodes.alice).toEqual({
      name: 'alice', address: { host: '127.0.0.1', port: 7789 }, disk: '/var/lib/drbdts/r0-alice.img',
      metaDisk: 'internal', nbd: 'unix:/run/drbdts/r0-alice.nbd', device: undefined, control: '/run/drbdts/r0-alice.ctl',
      nodeId: 0,
    });
    expect(config.nodes.bob!.nodeId).toBe(1);
    expect(config.minor).toBeUndefined();
    expect(config.fencing).toBe('dont-care');
    expect(config.handlers).toEqual({});
    expect(config.handlerTimeoutMs).toBe(60_000);
    expect(config.nodes.bob!.device).toBe('/dev/nbd0');
    expect(config.nodes.bob!.metaDisk).toBe('internal');
    expect(peerOf(config, 'alice').name).toBe('bob');
  });

  it('accepts the [net] and [resync] vocabulary', () => {
    const config = parseResourceConfig(`${good.replace('protocol = "C"\n', '')}
[net]
protocol = "A"
on-congestion = "pull-ahead"
after-sb-0pri = "discard-node-bob"
after-sb-1pri = "discard-secondary"
ping-interval = "500ms"
ping-timeout = 2
max-buffers = "16MiB"
[resync]
rate = "50MiB"
min-rate = "1MiB"
csums-alg = "xxh64"
verify-alg = "sha256"
`, 'x.toml');
    expect(config.protocol).toBe('A');
    expect(config.onCongestion).toBe('pull-ahead');
    expect(config.afterSb0pri).toBe('discard-node-bob');
    expect(config.pingIntervalMs).toBe(500);
    expect(config.pingTimeoutMs).toBe(2000);
    expect(config.sendQueueMaxBytes).toBe(16 * 1024 * 1024);
    expect(config.resyncRateMaxBytesPerSecond).toBe(50 * 1024 * 1024);
    expect(config.csumsAlg).toBe('xxh64');
  });

  it('takes node ids, the minor, fencing and handlers', () => {
    const config = parseResourceConfig(`${good.replace('shared-secret = "change-me"', 'shared-secret = "change-me"\nminor = 3')
      .replace('device = "/dev/nbd0"', 'device = "/dev/nbd0"\nnode-id = 7')}
[net]
fencing = "resource-only"
[handlers]
fence-peer = "/usr/lib/drbd/crm-fence-peer.9.sh"
split-brain = "/usr/lib/drbd/notify-split-brain.sh root"
timeout = "30s"
`, 'x.toml');
    expect(config.minor).toBe(3);
    expect(config.nodes.alice!.nodeId).toBe(0);
    expect(config.nodes.bob!.nodeId).toBe(7);
    expect(config.fencing).toBe('resource-only');
    expect(config.handlers).toEqual({
      'fence-peer': '/usr/lib/drbd/crm-fence-peer.9.sh', 'split-brain': '/usr/lib/drbd/notify-split-brain.sh root',
    });
    expect(config.handlerTimeoutMs).toBe(30_000);
    expect(errorOf(`${good}\n[net]\nfencing = "resource-only"\n`).message)
      .toContain('net.fencing: "resource-only" needs a fence-peer command in [handlers]');
    expect(errorOf(`${good}\n[handlers]\npri-lost = "x"\n`).message).toContain('handlers.pri-lost: unknown key');
    expect(errorOf(good.replace('device = "/dev/nbd0"', 'device = "/dev/nbd0"\nnode-id = 0')).message)
      .toBe('/etc/drbdts/r0.toml: node.bob.node-id: 0 is also node alice\'s node-id');
    expect(errorOf(good.replace('shared-secret = "change-me"', 'shared-secret = "change-me"\nminor = -1')).message)
      .toContain('resource.minor: must be a whole number from 0 to 1048575');
  });

  it('names the file and key of a missing required key', () => {
    const error = errorOf(good.replace('shared-secret = "change-me"\n', ''));
    expect(error.message).toBe('/etc/drbdts/r0.toml: resource.shared-secret: missing (required)');
    expect(error.key).toBe('resource.shared-secret');
    expect(errorOf(good.replace('disk = "/var/lib/drbdts/r0-bob.img"\n', '')).message)
      .toBe('/etc/drbdts/r0.toml: node.bob.disk: missing (required)');
  });

  it('rejects a bad protocol', () => {
    expect(errorOf(good.replace('protocol = "C"', 'protocol = "D"')).message)
      .toBe('/etc/drbdts/r0.toml: resource.protocol: "D" is not one of "A", "B", "C"');
  });

  it('rejects a bad size', () => {
    expect(errorOf(good.replace('size = "1GiB"', 'size = "lots"')).message)
      .toBe('/etc/drbdts/r0.toml: disk.size: "lots" is not a size (examples: 4096, "512MiB", "1G")');
    expect(errorOf(good.replace('size = "1GiB"', 'size = 10000000')).message).toContain('disk.size: 10000000 bytes is not a multiple of 4KiB');
  });

  it('rejects a policy naming an unknown node', () => {
    const text = `${good}\n[net]\nafter-sb-0pri = "discard-node-carol"\n`;
    expect(errorOf(text).message).toBe('/etc/drbdts/r0.toml: net.after-sb-0pri: names node "carol", which is not one of alice, bob');
  });

  it('rejects unknown keys and sections (typos)', () => {
    expect(errorOf(good.replace('protocol = "C"', 'protcol = "C"')).message).toContain('resource.protcol: unknown key');
    expect(errorOf(`${good}\n[nett]\nx = 1\n`).message).toContain('nett: unknown section or key');
    expect(errorOf(good.replace('meta-disk = "internal"', 'metadisk = "internal"')).message).toContain('node.alice.metadisk: unknown key');
  });

  it('rejects bad addresses, relative paths, and a wrong node count', () => {
    expect(errorOf(good.replace('127.0.0.1:7789', '127.0.0.1')).message)
      .toBe('/etc/drbdts/r0.toml: node.alice.address: "127.0.0.1" is not HOST:PORT (example: "192.0.2.10:7789")');
    expect(errorOf(good.replace('127.0.0.1:7790', '127.0.0.1:7789')).message).toContain('node.bob.address: 127.0.0.1:7789 is also node alice\'s address');
    expect(errorOf(good.replace('"/var/lib/drbdts/r0-alice.img"', '"r0.img"')).message).toContain('node.alice.disk: "r0.img" must be an absolute path');
    const oneNode = good.slice(0, good.indexOf('[node.bob]'));
    expect(errorOf(oneNode).message).toBe('/etc/drbdts/r0.toml: [node.NAME]: a resource needs exactly two nodes, found 1 (alice)');
  });

  it('rejects a unix socket path too long to bind', () => {
    const long = `/run/${'x'.repeat(120)}.ctl`;
    expect(errorOf(good.replace('meta-disk = "internal"', `meta-disk = "internal"\ncontrol = "${long}"`)).message)
      .toBe(`/etc/drbdts/r0.toml: node.alice.control: socket path "${long}" is longer than 107 bytes (a unix socket limit)`);
  });

  it('rejects combinations DRBD forbids', () => {
    expect(errorOf(`${good}\n[net]\non-congestion = "pull-ahead"\n`).message).toContain('needs protocol A');
    expect(errorOf(`${good.replace('protocol = "C"', 'protocol = "B"')}\n[net]\nallow-two-primaries = true\n`).message)
      .toContain('net.allow-two-primaries: needs protocol C');
    expect(errorOf(`${good}\n[resync]\nrate = "10MiB"\nmin-rate = "20MiB"\n`).message).toContain('resync.min-rate');
  });

  it('reports broken TOML with its line', () => {
    const error = errorOf('[resource]\nname = \n');
    expect(error.message).toMatch(/^\/etc\/drbdts\/r0\.toml: not valid TOML at line 2, column \d+/);
  });

  it('reports a missing file by name', () => {
    expect(() => loadResourceConfig(path.join(dir, 'nope.toml'))).toThrow(`${path.join(dir, 'nope.toml')}: no such file`);
  });
});

describe('resolveNodeName', () => {
  const config = parseResourceConfig(good, 'r0.toml');
  it('takes --node, then $DRBDTS_NODE, and names the nodes when it cannot tell', () => {
    const saved = process.env.DRBDTS_NODE;
    try {
      process.env.DRBDTS_NODE = 'bob';
      expect(resolveNodeName(config, 'alice')).toBe('alice');
      expect(resolveNodeName(config)).toBe('bob');
      expect(() => resolveNodeName(config, 'carol')).toThrow('node "carol" (from --node) is not in this resource; its nodes are alice, bob');
      delete process.env.DRBDTS_NODE;
      if (!(os.hostname() in config.nodes)) {
        expect(() => resolveNodeName(config)).toThrow(`host name "${os.hostname()}" is not one of alice, bob; pass --node NAME or set DRBDTS_NODE`);
      }
    } finally {
      if (saved === undefined) delete process.env.DRBDTS_NODE;
      else process.env.DRBDTS_NODE = saved;
    }
  });
});
