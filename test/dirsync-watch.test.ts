// --watch (src/dirsync/watch.ts): a burst of events becomes one sync; real inotify events arrive for nested new
// directories and files while our temp files and ignored names are filtered; `drbdts dirsync --watch` as a real
// process re-syncs edits from either side and coalesces a burst of 300 files into a few runs; a tcp:// root is
// watched by its dirsync-server's change stream.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, mkdir, readFile, rm, writeFile, readdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Coalescer, runWatch, watchLocalTree } from '../src/dirsync/watch.js';
import { drbdtsBin, startServerProcess, writeSecret, type ServerProcess } from './dirsync-remote-helpers.js';

let base: string;
const children: ChildProcess[] = [];
const servers: ServerProcess[] = [];

beforeAll(async () => {
  base = await mkdtemp(join(tmpdir(), 'drbdts-watch-'));
});
afterEach(async () => {
  for (const child of children.splice(0)) {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGKILL');
      await exited;
    }
  }
  for (const server of servers.splice(0)) await server.stop();
});
afterAll(async () => {
  await rm(base, { recursive: true, force: true });
});

/** Polls `check` until it returns true; generous deadline because other tests load the machine. */
async function eventually(check: () => Promise<boolean>, what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check().catch(() => false)) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

async function contentIs(path: string, expected: string): Promise<boolean> {
  return (await readFile(path, 'utf8')) === expected;
}

describe('coalescing and filtering', () => {
  // Proves a burst of 1000 pokes (synchronous, so all within the quiet period) fires once with the full count.
  it('fires once per burst', async () => {
    const fired: number[] = [];
    const coalescer = new Coalescer((count) => fired.push(count), 50, 5000);
    for (let i = 0; i < 1000; i++) coalescer.poke();
    await eventually(async () => fired.length > 0, 'the burst to fire');
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(fired).toEqual([1000]);
    coalescer.close();
  });

  // Proves real inotify events reach us for a new nested directory and file, and that temp files of our own
  // propagation and ignored names are dropped.
  it('reports real changes and filters temp files and ignored names', async () => {
    const root = join(base, 'events');
    await mkdir(root);
    const seen: string[] = [];
    const watcher = watchLocalTree(root, ['Name *.swp'], (path) => seen.push(path), (error) => {
      throw error;
    });
    try {
      await writeFile(join(root, '.x.drbdts-tmp-123-1'), 'temp');
      await writeFile(join(root, 'notes.swp'), 'editor swap');
      await mkdir(join(root, 'a', 'b'), { recursive: true });
      await eventually(async () => seen.includes('a'), 'the new directory event');
      await writeFile(join(root, 'a', 'b', 'deep.txt'), 'deep');
      await eventually(async () => seen.includes('a/b/deep.txt'), 'the nested file event');
      expect(seen.some((path) => path.includes('drbdts-tmp'))).toBe(false);
      expect(seen.some((path) => path.endsWith('.swp'))).toBe(false);
    } finally {
      watcher.close();
    }
  });
});

describe('drbdts dirsync --watch', () => {
  // Proves the watch loop as a user runs it: after the initial sync, an edit on either side is propagated
  // without a new command, a burst of 300 new files is coalesced into a few sync runs, and SIGTERM stops it.
  it('re-syncs changes from both sides and coalesces bursts', async () => {
    const a = join(base, 'cli-a');
    const b = join(base, 'cli-b');
    await mkdir(a);
    await mkdir(b);
    await writeFile(join(a, 'start.txt'), 'start');
    const child = spawn(
      process.execPath,
      [drbdtsBin, 'dirsync', a, b, '--batch', '--watch', '--archive-dir', join(base, 'cli-archive')],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    children.push(child);
    let stderr = '';
    child.stderr!.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    child.stdout!.resume();
    await eventually(async () => /watching/.test(stderr), 'the watch to start');
    expect(await readFile(join(b, 'start.txt'), 'utf8')).toBe('start');

    await writeFile(join(a, 'from-a.txt'), 'edit on a');
    await eventually(() => contentIs(join(b, 'from-a.txt'), 'edit on a'), 'a -> b');
    await writeFile(join(b, 'start.txt'), 'edited on b');
    await eventually(() => contentIs(join(a, 'start.txt'), 'edited on b'), 'b -> a');

    const runsBefore = (stderr.match(/: syncing/g) ?? []).length;
    await mkdir(join(b, 'burst'));
    for (let i = 0; i < 300; i++) await writeFile(join(b, 'burst', `f${i}.txt`), `file ${i}`);
    await eventually(async () => (await readdir(join(a, 'burst'))).length === 300, 'the burst to arrive');
    // Let any trailing run (events from our own propagation) finish before counting.
    await new Promise((resolve) => setTimeout(resolve, 1500));
    const burstRuns = (stderr.match(/: syncing/g) ?? []).length - runsBefore;
    expect(burstRuns).toBeGreaterThanOrEqual(1);
    expect(burstRuns).toBeLessThanOrEqual(8);

    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    child.kill('SIGTERM');
    expect(await exited).toBe(0);
  });

  // Proves `drbdts dirsync LOCAL tcp://... --watch` as a user runs it: the CLI hands its --secret-file to the
  // watcher, which follows the server's change stream (no "polling" fallback), so a file made on the server
  // arrives without any local change, and a local edit goes the other way.
  it('the CLI watches a tcp:// root through the server', async () => {
    const local = join(base, 'cli-tcp-local');
    const served = join(base, 'cli-tcp-served');
    await mkdir(local);
    await mkdir(join(served, 'root'), { recursive: true });
    const secretFile = await writeSecret(base, 'cli-watch-secret', 'cli watch secret');
    const server = await startServerProcess(served, ['--secret-file', secretFile]);
    servers.push(server);
    const child = spawn(
      process.execPath,
      [drbdtsBin, 'dirsync', local, `tcp://127.0.0.1:${server.port}/root`, '--batch', '--watch', '--archive-dir', join(base, 'cli-tcp-archive'), '--secret-file', secretFile],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    children.push(child);
    let stderr = '';
    child.stderr!.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    child.stdout!.resume();
    await eventually(async () => /watching/.test(stderr), 'the watch to start');
    expect(stderr).not.toMatch(/polling/);
    await writeFile(join(served, 'root', 'from-server.txt'), 'server side');
    await eventually(() => contentIs(join(local, 'from-server.txt'), 'server side'), 'server -> local');
    await writeFile(join(local, 'from-local.txt'), 'local side');
    await eventually(() => contentIs(join(served, 'root', 'from-local.txt'), 'local side'), 'local -> server');
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    child.kill('SIGTERM');
    expect(await exited).toBe(0);
  });

  // Proves a server with a client watching (an open change stream and inotify watches) still stops on SIGTERM,
  // exit 0, and the client is told its change stream ended.
  it('dirsync-server stops on SIGTERM while a client watches', async () => {
    const served = join(base, 'term-served');
    await mkdir(join(served, 'root'), { recursive: true });
    const secretFile = await writeSecret(base, 'term-secret', 'term secret');
    const server = await startServerProcess(served, ['--secret-file', secretFile]);
    servers.push(server);
    const { openRemoteReplica } = await import('../src/dirsync/remote.js');
    const replica = await openRemoteReplica(`tcp://127.0.0.1:${server.port}/root`, { secretFile });
    await replica.open();
    let ended: Error | undefined;
    const watcher = await replica.watchChanges([], () => undefined, (error) => (ended = error));
    try {
      const exited = new Promise<number | null>((resolve) => server.child.once('exit', (code) => resolve(code)));
      server.child.kill('SIGTERM');
      expect(await exited).toBe(0);
      await eventually(async () => ended !== undefined, 'the client to notice');
    } finally {
      watcher.close();
      await replica.close();
    }
  });

  // Proves a tcp:// root is watched through its server: a file created in the served tree (no local change at
  // all) triggers a sync that brings it here, well before the 60 s poll interval configured here.
  it('watches a tcp:// root through the server change stream', async () => {
    const local = join(base, 'tcp-local');
    const served = join(base, 'tcp-served');
    await mkdir(local);
    await mkdir(join(served, 'root'), { recursive: true });
    const secretFile = await writeSecret(base, 'watch-secret', 'watch secret');
    const server = await startServerProcess(served, ['--secret-file', secretFile]);
    servers.push(server);
    const url = `tcp://127.0.0.1:${server.port}/root`;
    const logs: string[] = [];
    const controller = new AbortController();
    const syncOnce = (): Promise<number> =>
      new Promise((resolve) => {
        const child = spawn(
          process.execPath,
          [drbdtsBin, 'dirsync', local, url, '--batch', '--archive-dir', join(base, 'tcp-archive'), '--secret-file', secretFile],
          { stdio: 'ignore' },
        );
        children.push(child);
        child.once('exit', (code) => resolve(code ?? 3));
      });
    const watching = runWatch({
      roots: [local, url],
      ignore: [],
      syncOnce,
      log: (message) => logs.push(message),
      remote: { secretFile },
      pollIntervalMs: 60_000,
      signal: controller.signal,
    });
    try {
      await eventually(async () => logs.some((line) => line.startsWith('watching')), 'the watch to start');
      expect(logs.some((line) => line.startsWith('cannot watch'))).toBe(false);
      await writeFile(join(served, 'root', 'remote-made.txt'), 'made on the server');
      await eventually(() => contentIs(join(local, 'remote-made.txt'), 'made on the server'), 'server -> local', 30_000);
    } finally {
      controller.abort();
      expect(await watching).toBe(0);
    }
  });
});
