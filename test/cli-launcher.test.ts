// Proves the `drbdts` executable starts Node without NODE_EXTRA_CA_CERTS (bin/drbdts.js explains why: Node 20
// parses that file at every start, and drbdts verifies no certificate against the store it feeds), and that
// nothing drbdts does with TLS needs it: a dirsync over tcp:// (TLS with a pre-shared key) between two processes
// started through the executable, both with the variable pointing at a file that does not exist. Node warns at
// start about such a file, so the warning's absence shows the variable was dropped before Node started.
import { execFile } from 'node:child_process';
import { mkdtemp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { drbdtsBin, startServerProcess, writeSecret, type ServerProcess } from './dirsync-remote-helpers.js';

const run = promisify(execFile);
const badCaEnv = { ...process.env, NODE_EXTRA_CA_CERTS: '/nonexistent/drbdts-test-ca.pem' };
const caWarning = /extra certs/i;

let base: string;
let server: ServerProcess | undefined;

beforeAll(async () => {
  base = await mkdtemp(join(tmpdir(), 'drbdts-launcher-'));
});

afterAll(async () => {
  await server?.stop();
  await rm(base, { recursive: true, force: true });
});

describe('the drbdts executable', () => {
  it('starts Node without NODE_EXTRA_CA_CERTS', async () => {
    // The control: Node itself, given the same variable, warns about the missing file.
    const plain = await run(process.execPath, ['-e', '0'], { env: badCaEnv });
    expect(plain.stderr).toMatch(caWarning);
    const help = await run(drbdtsBin, ['--help'], { env: badCaEnv });
    expect(help.stdout).toMatch(/^Usage: drbdts COMMAND/);
    expect(help.stderr).not.toMatch(caWarning);
  });

  it('runs a dirsync over tcp:// (TLS-PSK) with both ends started without it', async () => {
    const local = join(base, 'local');
    const served = join(base, 'served');
    await mkdir(join(local, 'docs'), { recursive: true });
    await mkdir(join(served, 'tree'), { recursive: true });
    await writeFile(join(local, 'docs', 'a.txt'), 'alpha\n');
    await writeFile(join(local, 'b.bin'), Buffer.alloc(100_000, 7));
    const secretFile = await writeSecret(base, 'secret', 'launcher test secret');
    // The server through the executable, not `node bin/drbdts.js`: the helper spawns process.execPath, so run
    // the executable itself here.
    server = await startServerProcess(served, ['--secret-file', secretFile], { NODE_EXTRA_CA_CERTS: badCaEnv.NODE_EXTRA_CA_CERTS }, 0, drbdtsBin);
    const result = await run(
      drbdtsBin,
      ['dirsync', local, `tcp://127.0.0.1:${server.port}/tree`, '--batch', '--secret-file', secretFile, '--archive-dir', join(base, 'archive')],
      { env: badCaEnv },
    );
    expect(result.stderr).not.toMatch(caWarning);
    expect(result.stderr).toMatch(/3 propagated, 0 already equal, 0 skipped, 0 failed/);
    expect(result.stdout).toMatch(/new file +----> +docs\/a\.txt/);
    expect(await readFile(join(served, 'tree', 'docs', 'a.txt'), 'utf8')).toBe('alpha\n');
    expect((await readFile(join(served, 'tree', 'b.bin'))).equals(Buffer.alloc(100_000, 7))).toBe(true);
    expect(server.stderr()).not.toMatch(caWarning);
  });
});
