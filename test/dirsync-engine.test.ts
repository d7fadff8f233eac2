// Proves dirsync's safety rules beyond the scenario table, on real directories:
// - scenario 23: a file modified during the sync (on the source while it is read, on the target just before the
//   rename, injected by a wrapper replica around the real LocalReplica) fails safely: nothing torn is installed,
//   the user's edit survives, the run exits 2, and the next run picks the change up;
// - bad input through the real CLI: a missing root, a corrupt archive, an archive lock held by a live process
//   and a stale one left by a dead process, bad options, unreadable files and directories (run as user nobody,
//   since root reads everything): clear errors naming what was wrong, nothing lost;
// - the interactive prompt (answered on stdin) and --dry-run change nothing unless confirmed.
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SyncEngine } from '../src/dirsync/engine.js';
import { LocalReplica } from '../src/dirsync/local.js';
import type { ContentSource, Replica, WriteFileRequest, WriteFileResult, EntryStat } from '../src/dirsync/replica.js';
import { cliPath, dirsync, engineOptions, exists, localPair, mkTemp, read, run, snapshot, write, type Pair } from './dirsync-helpers.js';

let base: string;
let counter = 0;

beforeAll(() => {
  base = mkTemp('drbdts-dirsync-engine-');
  fs.chmodSync(base, 0o755);
});
afterAll(() => {
  fs.rmSync(base, { recursive: true, force: true });
});

function makePair(): Pair {
  return localPair(path.join(base, `e${++counter}`));
}

/** A real LocalReplica with hooks that let a test act at precise points of propagation (fault injection). */
class HookedReplica extends LocalReplica {
  onReadFile?: (path: string) => void;
  onWriteFile?: (path: string) => void;

  override async readFile(path: string, expect: EntryStat): Promise<ContentSource> {
    const source = await super.readFile(path, expect);
    this.onReadFile?.(path);
    return source;
  }

  override async writeFile(request: WriteFileRequest): Promise<WriteFileResult> {
    this.onWriteFile?.(request.path);
    return super.writeFile(request);
  }
}

async function syncWith(pair: Pair, replica1: Replica, replica2: Replica) {
  return new SyncEngine(replica1, replica2, engineOptions(pair.archive)).run();
}

describe('scenario 23: file modified during the sync', () => {
  it('source modified while being read: the path fails, nothing torn on the target, next run converges', async () => {
    const pair = makePair();
    write(pair.a, 'big.bin', Buffer.alloc(3 << 20, 1));
    write(pair.a, 'small.txt', 'v1\n');
    const first = await syncWith(pair, new LocalReplica(pair.a), new LocalReplica(pair.b));
    expect(first.exitCode).toBe(0);
    write(pair.a, 'big.bin', Buffer.alloc(3 << 20, 2));
    write(pair.a, 'small.txt', 'v2\n');
    const source = new HookedReplica(pair.a);
    source.onReadFile = (p) => {
      // The user writes again after the engine opened the file: what was read may be a mix.
      fs.appendFileSync(path.join(pair.a, p), 'late write\n');
    };
    const result = await syncWith(pair, source, new LocalReplica(pair.b));
    expect(result.exitCode).toBe(2);
    expect(result.items.filter((item) => item.status === 'failed').map((item) => item.path).sort()).toEqual(['big.bin', 'small.txt']);
    // The target still holds its old content, whole.
    expect(fs.readFileSync(path.join(pair.b, 'big.bin')).equals(Buffer.alloc(3 << 20, 1))).toBe(true);
    expect(read(pair.b, 'small.txt')).toBe('v1\n');
    expect(fs.readdirSync(pair.b).filter((name) => name.includes('drbdts-tmp'))).toEqual([]);
    const next = await syncWith(pair, new LocalReplica(pair.a), new LocalReplica(pair.b));
    expect(next.exitCode).toBe(0);
    expect(read(pair.b, 'small.txt')).toBe('v2\nlate write\n');
    expect(snapshot(pair.b)).toEqual(snapshot(pair.a));
  });

  it('target modified just before the rename: the user edit survives, the next run reports the conflict', async () => {
    const pair = makePair();
    write(pair.a, 'doc.txt', 'base\n');
    expect((await syncWith(pair, new LocalReplica(pair.a), new LocalReplica(pair.b))).exitCode).toBe(0);
    write(pair.a, 'doc.txt', 'edit on A\n');
    const target = new HookedReplica(pair.b);
    target.onWriteFile = (p) => write(pair.b, p, 'user edit on B during the sync\n');
    const result = await syncWith(pair, new LocalReplica(pair.a), target);
    expect(result.exitCode).toBe(2);
    expect(result.items.find((item) => item.path === 'doc.txt')?.error).toMatch(/changed since the scan/);
    expect(read(pair.b, 'doc.txt')).toBe('user edit on B during the sync\n');
    const next = await syncWith(pair, new LocalReplica(pair.a), new LocalReplica(pair.b));
    expect(next.exitCode).toBe(1);
    expect(next.items.find((item) => item.path === 'doc.txt')?.action).toBe('conflict');
    expect(read(pair.a, 'doc.txt')).toBe('edit on A\n');
    expect(read(pair.b, 'doc.txt')).toBe('user edit on B during the sync\n');
  });
});

describe('bad input: clear errors, nothing lost', () => {
  it('a root that does not exist: exit 3 naming the root, the other side untouched', async () => {
    const pair = makePair();
    write(pair.b, 'keep.txt', 'keep\n');
    const missing = path.join(pair.dir, 'no-such-dir');
    const result = await dirsync({ ...pair, rootA: missing });
    expect(result.code).toBe(3);
    expect(result.json!.fatal).toContain(missing);
    expect(result.json!.fatal).toMatch(/does not exist/);
    expect(read(pair.b, 'keep.txt')).toBe('keep\n');
  });

  it('a corrupt archive: exit 3 saying so and how to recover; removing it recovers without losing anything', async () => {
    const pair = makePair();
    write(pair.a, 'one.txt', '1\n');
    expect((await dirsync(pair)).code).toBe(0);
    const [archiveName] = fs.readdirSync(pair.archive).filter((name) => name.startsWith('ar-') && !name.includes('.'));
    const archiveFile = path.join(pair.archive, archiveName!);
    const text = fs.readFileSync(archiveFile, 'utf8');
    fs.writeFileSync(archiveFile, text.replace('one.txt', 'one.tx_'));
    fs.unlinkSync(path.join(pair.a, 'one.txt')); // would be propagated as a deletion with a good archive
    write(pair.b, 'two.txt', '2\n');
    const result = await dirsync(pair);
    expect(result.code).toBe(3);
    expect(result.json!.fatal).toMatch(/corrupt/);
    expect(result.json!.fatal).toContain(archiveFile);
    expect(read(pair.b, 'one.txt')).toBe('1\n');
    expect(exists(pair.a, 'two.txt')).toBe(false);
    fs.unlinkSync(archiveFile);
    const recovered = await dirsync(pair);
    expect(recovered.code).toBe(0);
    // Without history nothing is deleted: one.txt comes back to A, two.txt goes to A.
    expect(read(pair.a, 'one.txt')).toBe('1\n');
    expect(read(pair.a, 'two.txt')).toBe('2\n');
  });

  it('the pair lock: held by a live process -> exit 3 naming it; left by a dead process -> taken over', async () => {
    const pair = makePair();
    write(pair.a, 'f.txt', 'x\n');
    const dry = await dirsync(pair, ['--dry-run']);
    const lockFile = dry.json!.archiveFile! + '.lock';
    fs.mkdirSync(path.dirname(lockFile), { recursive: true });
    const sleeper = spawn('sleep', ['60']);
    try {
      fs.writeFileSync(lockFile, `${sleeper.pid} ${(await import('node:os')).hostname()}\n`);
      const blocked = await dirsync(pair);
      expect(blocked.code).toBe(3);
      expect(blocked.json!.fatal).toContain(`pid ${sleeper.pid}`);
      expect(exists(pair.b, 'f.txt')).toBe(false);
    } finally {
      sleeper.kill('SIGKILL');
    }
    await new Promise((resolve) => sleeper.once('exit', resolve));
    // Now the lock's owner is dead: the next run recognises the stale lock and proceeds.
    const proceeded = await dirsync(pair);
    expect(proceeded.code, proceeded.stderr).toBe(0);
    expect(proceeded.stderr).toMatch(/stale lock/);
    expect(read(pair.b, 'f.txt')).toBe('x\n');
    expect(fs.existsSync(lockFile)).toBe(false);
  });

  it('bad options: exit 3 naming the option, nothing changed', async () => {
    const pair = makePair();
    write(pair.a, 'f.txt', 'x\n');
    const cases: Array<[string[], RegExp]> = [
      [['--prefer', '/not/a/root'], /--prefer \/not\/a\/root: not one of the roots/],
      [['--frobnicate'], /unknown option --frobnicate/],
      [['--ignore', 'Regex ('], /bad ignore pattern/],
      [['--archive-dir'], /--archive-dir needs a value/],
    ];
    for (const [args, message] of cases) {
      const result = await run(process.execPath, [cliPath, 'dirsync', pair.a, pair.b, '--batch', ...args]);
      expect(result.code).toBe(3);
      expect(result.stderr).toMatch(message);
    }
    const oneRoot = await run(process.execPath, [cliPath, 'dirsync', pair.a, '--batch']);
    expect(oneRoot.code).toBe(3);
    expect(oneRoot.stderr).toMatch(/expected two roots/);
    expect(exists(pair.b, 'f.txt')).toBe(false);
  });

  it('unreadable file and unlistable directory (as user nobody): skipped with a clear error, the rest synced, nothing deleted', async () => {
    const pair = makePair();
    for (const dir of [pair.dir, pair.a, pair.b]) fs.chmodSync(dir, 0o777);
    write(pair.a, 'ok.txt', 'fine\n');
    write(pair.a, 'locked/inner.txt', 'inner\n');
    write(pair.a, 'secret.txt', 'unreadable\n', { mode: 0o644 });
    fs.chmodSync(path.join(pair.a, 'locked'), 0o777);
    spawnSync('chown', ['-R', 'nobody:nogroup', pair.dir]);
    const asNobody = (args: string[]) =>
      run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, cliPath, 'dirsync', pair.a, pair.b, '--batch', '--json', '--archive-dir', pair.archive, ...args], {
        env: { HOME: pair.dir },
      });
    const baseline = await asNobody([]);
    expect(baseline.code, baseline.stderr).toBe(0);
    expect(read(pair.b, 'locked/inner.txt')).toBe('inner\n');
    // Now A's directory cannot be listed and a new file cannot be read by the syncing user.
    spawnSync('chown', ['root:root', path.join(pair.a, 'locked'), path.join(pair.a, 'secret.txt')]);
    fs.chmodSync(path.join(pair.a, 'locked'), 0o700);
    fs.chmodSync(path.join(pair.a, 'secret.txt'), 0o600);
    write(pair.a, 'secret.txt', 'changed but unreadable\n');
    write(pair.a, 'ok.txt', 'fine, edited\n');
    const result = await asNobody([]);
    expect(result.code, result.stderr).toBe(2);
    expect(result.stderr).toMatch(/locked: cannot list directory/);
    expect(result.stderr).toMatch(/secret\.txt/);
    expect(read(pair.b, 'ok.txt')).toBe('fine, edited\n');
    // The unlistable directory is not taken as deleted.
    expect(read(pair.b, 'locked/inner.txt')).toBe('inner\n');
    expect(read(pair.b, 'secret.txt')).toBe('unreadable\n');
  });
});

describe('ignore patterns and conflict resolution beyond the table', () => {
  it('Path, BelowPath, Regex and Name globs with {a,b} and [..]: matching paths are untouched on both sides', async () => {
    const pair = makePair();
    write(pair.a, 'build/out.o', 'A object\n');
    write(pair.a, 'src/main.c', 'int main;\n');
    write(pair.a, 'src/main.o', 'object\n');
    write(pair.a, 'logs/2026/x.log', 'log\n');
    write(pair.a, 'notes.bak', 'bak\n');
    write(pair.a, 'notes.swp', 'swp\n');
    write(pair.a, 'keep/build/out.o', 'kept: Path matches only at the top\n');
    write(pair.a, 'data7.csv', 'digit\n');
    write(pair.b, 'build/out.o', 'B object\n');
    const result = await dirsync(pair, [
      '--ignore', 'Path build/out.o',
      '--ignore', 'BelowPath logs',
      '--ignore', 'Regex .*\\.o',
      '--ignore', 'Name notes.{bak,swp}',
      '--ignore', 'Name data[0-9].csv',
    ]);
    expect(result.code, result.stderr).toBe(0);
    expect(read(pair.b, 'src/main.c')).toBe('int main;\n');
    expect(exists(pair.b, 'src/main.o')).toBe(false);
    expect(exists(pair.b, 'logs')).toBe(false);
    expect(exists(pair.b, 'notes.bak')).toBe(false);
    expect(exists(pair.b, 'notes.swp')).toBe(false);
    expect(exists(pair.b, 'data7.csv')).toBe(false);
    expect(read(pair.b, 'build/out.o')).toBe('B object\n');
    expect(read(pair.a, 'build/out.o')).toBe('A object\n');
    // keep/build/out.o is not matched by "Path build/out.o" but by the Regex on *.o: still ignored.
    expect(exists(pair.b, 'keep/build/out.o')).toBe(false);
  });

  it('prefer the deleting root with copy-on-conflict: the deletion wins, the edit is kept as a conflict copy', async () => {
    const pair = makePair();
    write(pair.a, 'f.txt', 'old\n');
    write(pair.a, 'other.txt', 'keeps the root non-empty\n');
    expect((await dirsync(pair)).code).toBe(0);
    fs.unlinkSync(path.join(pair.a, 'f.txt'));
    write(pair.b, 'f.txt', 'edited on B\n');
    const result = await dirsync(pair, ['--prefer', pair.a, '--copy-on-conflict']);
    expect(result.code, result.stderr).toBe(0);
    expect(exists(pair.a, 'f.txt')).toBe(false);
    expect(exists(pair.b, 'f.txt')).toBe(false);
    const copies = fs.readdirSync(pair.b).filter((name) => name.startsWith('f (conflict '));
    expect(copies.length).toBe(1);
    expect(read(pair.b, copies[0]!)).toBe('edited on B\n');
    // The next run brings the conflict copy to A as an ordinary new file.
    expect((await dirsync(pair)).code).toBe(0);
    expect(read(pair.a, copies[0]!)).toBe('edited on B\n');
  });

  it('directory conflict resolved by prefer: the winner is imposed on the whole subtree, the loser kept aside', async () => {
    const pair = makePair();
    write(pair.a, 'd/one.txt', '1\n');
    write(pair.a, 'd/two.txt', '2\n');
    write(pair.a, 'top.txt', 'top\n');
    expect((await dirsync(pair)).code).toBe(0);
    fs.rmSync(path.join(pair.a, 'd'), { recursive: true });
    write(pair.b, 'd/one.txt', 'edited on B\n');
    const result = await dirsync(pair, ['--prefer', pair.b, '--copy-on-conflict']);
    expect(result.code, result.stderr).toBe(0);
    // B wins: its directory, with the edit, is restored on A.
    expect(read(pair.a, 'd/one.txt')).toBe('edited on B\n');
    expect(read(pair.a, 'd/two.txt')).toBe('2\n');
    expect(read(pair.b, 'd/one.txt')).toBe('edited on B\n');
  });
});

describe('interactive mode and dry run', () => {
  async function withStdin(pair: Pair, input: string) {
    return new Promise<{ code: number; stdout: string }>((resolve) => {
      const child = spawn(process.execPath, [cliPath, 'dirsync', pair.a, pair.b, '--archive-dir', pair.archive], { stdio: ['pipe', 'pipe', 'pipe'] });
      let stdout = '';
      child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
      child.stdin.end(input);
      child.once('exit', (code) => resolve({ code: code ?? 99, stdout }));
    });
  }

  it('shows the plan with arrows and propagates only after "y"', async () => {
    const pair = makePair();
    write(pair.a, 'from-a.txt', 'A\n');
    write(pair.b, 'from-b.txt', 'B\n');
    const refused = await withStdin(pair, 'n\n');
    expect(refused.code).toBe(1);
    expect(refused.stdout).toMatch(/new file\s+---->\s+from-a\.txt/);
    expect(refused.stdout).toMatch(/<----\s+new file\s+from-b\.txt/);
    expect(exists(pair.b, 'from-a.txt')).toBe(false);
    const accepted = await withStdin(pair, 'y\n');
    expect(accepted.code).toBe(0);
    expect(read(pair.b, 'from-a.txt')).toBe('A\n');
    expect(read(pair.a, 'from-b.txt')).toBe('B\n');
  });

  it('--dry-run reports the plan and changes nothing (no archive either)', async () => {
    const pair = makePair();
    write(pair.a, 'x.txt', 'x\n');
    const result = await dirsync(pair, ['--dry-run']);
    expect(result.code).toBe(0);
    expect(result.json!.items.map((item) => item.path)).toEqual(['x.txt']);
    expect(exists(pair.b, 'x.txt')).toBe(false);
    expect(fs.existsSync(pair.archive) ? fs.readdirSync(pair.archive) : []).toEqual([]);
  });
});
