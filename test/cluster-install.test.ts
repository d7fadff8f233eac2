// Proves scripts/install.sh puts a working `drbdts` on PATH: it installs into a temporary prefix (--no-build:
// the suite's set-up has built this checkout), then runs the installed command from another directory with a
// PATH that holds only that prefix and the base system directories, as systemd units, keepalived and Pacemaker
// run it. The wrapper names the node binary, so it works even where node itself is not on that PATH. Then the
// same from a fresh clone, where install.sh itself builds the TypeScript and the native addon.
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildDist, repoRoot } from './resource-helpers.js';

const run = promisify(execFile);
let prefix: string;

beforeAll(async () => {
  await buildDist();
  prefix = await mkdtemp(path.join(tmpdir(), 'drbdts-install-'));
});

afterAll(async () => {
  await rm(prefix, { recursive: true, force: true });
});

describe('scripts/install.sh', () => {
  it('installs drbdts, its units and docs into a prefix, and the installed command runs', async () => {
    const installed = await run('bash', [path.join(repoRoot, 'scripts/install.sh'), '--prefix', prefix, '--no-build']);
    expect(installed.stdout).toContain(`installed ${prefix}/bin/drbdts`);
    const env = { PATH: `${prefix}/bin:/usr/sbin:/usr/bin:/sbin:/bin`, HOME: prefix };
    // /usr/bin holds node on this machine: prove the wrapper does not rely on PATH by hiding it too.
    const bare = { PATH: `${prefix}/bin:/nonexistent`, HOME: prefix };
    for (const environment of [env, bare]) {
      const help = await run(`${prefix}/bin/drbdts`, ['--help'], { cwd: '/', env: environment });
      expect(help.stdout).toMatch(/^Usage: drbdts COMMAND/);
    }
    const version = await run('drbdts', ['--version'], { cwd: '/', env });
    const pkg = JSON.parse(await readFile(path.join(repoRoot, 'package.json'), 'utf8')) as { version: string };
    expect(version.stdout.trim()).toBe(`drbdts ${pkg.version}`);
    // A command that loads the resource modules, not only the dispatcher: a config error names the file.
    const missing = await run('drbdts', ['status', 'r0', '--config', `${prefix}/none.toml`], { cwd: '/', env })
      .then(() => null, (error: { code: number; stderr: string }) => error);
    expect(missing?.stderr).toContain(`${prefix}/none.toml: no such file`);

    const unit = await readFile(`${prefix}/lib/systemd/system/drbdts@.service`, 'utf8');
    expect(unit).toContain(`ExecStart=${prefix}/bin/drbdts up %i`);
    expect(unit).not.toContain('/usr/local/');
    expect((await stat(`${prefix}/lib/systemd/system/drbdts-dirsync-server.service`)).isFile()).toBe(true);
    expect((await stat(`${prefix}/share/doc/drbdts/operators.md`)).isFile()).toBe(true);
  });

  it('builds and installs from a fresh clone (no dist/, no native build)', async () => {
    // A clone of this checkout's HEAD: what an operator's `git clone` gets. Its node_modules are this
    // checkout's (installing them is scripts/setup.sh's job, tested by CI itself); the build is install.sh's.
    const clone = path.join(prefix, 'clone');
    await run('git', ['clone', '-q', repoRoot, clone]);
    await symlink(path.join(repoRoot, 'node_modules'), path.join(clone, 'node_modules'));
    const target = path.join(prefix, 'fresh');
    const installed = await run('bash', [path.join(clone, 'scripts/install.sh'), '--prefix', target], { maxBuffer: 16 * 1024 * 1024 });
    expect(installed.stdout).toContain(`installed ${target}/bin/drbdts (runs ${clone} with`);
    const help = await run(`${target}/bin/drbdts`, ['--help'], { cwd: '/', env: { PATH: '/usr/bin:/bin', HOME: prefix } });
    expect(help.stdout).toMatch(/^Usage: drbdts COMMAND/);
    expect((await stat(path.join(clone, 'native/build/Release/drbdts_native.node'))).isFile()).toBe(true);
  }, 300_000);

  it('refuses a relative prefix and an unknown option', async () => {
    for (const args of [['--prefix', 'relative/dir'], ['--bogus']]) {
      const failed = await run('bash', [path.join(repoRoot, 'scripts/install.sh'), ...args, '--no-build'])
        .then(() => null, (error: { code: number; stderr: string }) => error);
      expect(failed?.code).toBe(2);
      expect(failed?.stderr).toMatch(/install\.sh: /);
    }
  });
});
