// Paths new on one side only are kept packed (src/dirsync/detect/new-paths.ts): no PathState, PlanItem or Action, their
// plan and archive entries made from the scan records and the native copy's results. This proves that the packed
// path and the object path (DRBDTS_DIRSYNC_PACKED_NEW=0) give the same plan lines, the same --json output, the
// same summary and exit code, the same trees and the same archive, on a tree with nested new directories,
// symlinks, empty files, a subtree on both sides with new paths on each, a directory new on both sides whose
// modes conflict (its subtree must not be packed), and a copy that fails (a file the syncing user cannot read:
// it must stay out of the archive and be retried). The runs are real CLI runs as user nobody (so the file is
// really unreadable); the archive is compared entry by entry, in order, and each side's stamps against lstat.
// Interactive runs (the prompt gets the whole plan, declined or accepted) are compared the same way.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { archivePathFor, loadArchive } from '../src/dirsync/archive/file.js';
import { SyncEngine } from '../src/dirsync/engine.js';
import { LocalReplica } from '../src/dirsync/local.js';
import { nativeCopier, nativeScanAvailable } from '../src/native/scan.js';
import { cliPath, engineOptions, mkTemp, run, snapshot, write, type RunResult } from './dirsync-helpers.js';

let base: string;

beforeAll(() => {
  base = mkTemp('drbdts-dirsync-packed-new-');
  fs.chmodSync(base, 0o755);
});
afterAll(() => {
  fs.rmSync(base, { recursive: true, force: true });
});

interface Tree {
  dir: string;
  a: string;
  b: string;
  archive: string;
}

/** The same starting pair, made afresh under `name`, owned by nobody but for one unreadable file on A. */
function makeTree(name: string): Tree {
  const dir = path.join(base, name);
  const tree = { dir, a: path.join(dir, 'a'), b: path.join(dir, 'b'), archive: path.join(dir, 'archive') };
  fs.mkdirSync(tree.a, { recursive: true });
  fs.mkdirSync(tree.b);
  // New on A only: nested directories, empty files, symlinks (one dangling), permission bits of their own.
  write(tree.a, 'top.txt', 'top\n');
  write(tree.a, 'empty', '');
  write(tree.a, 'n1/n2/n3/deep.txt', 'deep\n');
  write(tree.a, 'n1/n2/empty-too', '');
  write(tree.a, 'n1/private.txt', 'private\n', { mode: 0o600 });
  fs.mkdirSync(path.join(tree.a, 'n1/empty-dir'));
  fs.chmodSync(path.join(tree.a, 'n1/n2'), 0o750);
  fs.symlinkSync('n1/n2', path.join(tree.a, 'link'));
  fs.symlinkSync('../nowhere', path.join(tree.a, 'n1/dangling'));
  for (let f = 0; f < 40; f++) write(tree.a, `many/f${f}.dat`, `file ${f}\n`.repeat(f));
  // A subtree on both sides: new paths below it on each side, one file equal on both.
  write(tree.a, 'shared/fromA.txt', 'from A\n');
  write(tree.a, 'shared/same.txt', 'same\n');
  write(tree.b, 'shared/same.txt', 'same\n');
  write(tree.b, 'shared/fromB.txt', 'from B\n');
  write(tree.b, 'shared/sub/x/y.txt', 'y on B\n');
  write(tree.b, 'bonly/z.txt', 'z\n');
  // New on both sides with different modes: a permissions conflict that skips its subtree.
  write(tree.a, 'moded/kid.txt', 'kid\n');
  write(tree.b, 'moded/other.txt', 'other\n');
  fs.chmodSync(path.join(tree.a, 'moded'), 0o700);
  fs.chmodSync(path.join(tree.b, 'moded'), 0o755);
  // The same name for a file on one side and a directory on the other: a conflict, its subtree not packed.
  write(tree.a, 'kindclash/inside.txt', 'inside\n');
  write(tree.b, 'kindclash', 'a file\n');
  write(tree.a, 'n1/secret.txt', 'secret\n', { mode: 0o600 });
  spawnSync('chown', ['-R', 'nobody:nogroup', dir]);
  // Unreadable by nobody: its copy fails.
  spawnSync('chown', ['root:root', path.join(tree.a, 'n1/secret.txt')]);
  return tree;
}

function asNobody(tree: Tree, args: string[], env: NodeJS.ProcessEnv): Promise<RunResult> {
  return run(
    'setpriv',
    ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, cliPath, 'dirsync', tree.a, tree.b, '--archive-dir', tree.archive, ...args],
    { env: { HOME: tree.dir, ...env } },
  );
}

/** Output with the tree's own directory written as TREE and the archive's name (a hash of the roots) as ar-X:
 * the two runs use two trees. */
function normalised(tree: Tree, text: string): string {
  return text.split(tree.dir).join('TREE').replace(/\/ar-[0-9a-f]+/g, '/ar-X');
}

/**
 * The archive's entries in file order: everything but the stamps as recorded, and for each side whether the
 * recorded stamps are that side's path's lstat now (they must be: the archive describes the tree it synced).
 */
async function archiveRecords(tree: Tree): Promise<string[]> {
  const id = (root: string): string => `${os.hostname()}:${fs.realpathSync(root)}`;
  const { file, swapped } = await archivePathFor(tree.archive, id(tree.a), id(tree.b));
  const out: string[] = [];
  for (const [p, e] of await loadArchive(file, swapped)) {
    const stamps = (root: string, mtimeMs: number, ctimeMs: number, inode: number): string => {
      const st = fs.lstatSync(path.join(root, p));
      const same = st.ino === inode && st.mtimeMs === mtimeMs && st.ctimeMs === ctimeMs;
      return same ? 'stat' : `stale ${mtimeMs} ${ctimeMs} ${inode} vs ${st.mtimeMs} ${st.ctimeMs} ${st.ino}`;
    };
    out.push(`${p} ${e.kind} ${e.sizeBytes} ${e.fingerprint} ${e.mode} ${e.linkTarget} ${stamps(tree.a, e.mtime1Ms, e.ctime1Ms, e.inode1)} ${stamps(tree.b, e.mtime2Ms, e.ctime2Ms, e.inode2)}`);
  }
  return out;
}

const canRun = nativeScanAvailable() && nativeCopier() !== undefined && process.getuid?.() === 0 && spawnSync('setpriv', ['--version']).status === 0;

describe.skipIf(!canRun)('packed new paths decide, copy and archive as the object path does', () => {
  for (const output of ['plan', 'json'] as const) {
    for (const extra of [[], ['--times'], ['--no-perms']]) {
      it(`${output} output${extra.length > 0 ? ` with ${extra.join(' ')}` : ''}: same bytes, trees and archive; the failed copy is not archived`, async () => {
        const tag = `${output}${extra.join('')}`;
        const packed = makeTree(`packed-${tag}`);
        const objects = makeTree(`objects-${tag}`);
        const args = ['--batch', ...(output === 'json' ? ['--json'] : []), ...extra];
        for (let round = 0; round < 2; round++) {
          const p = await asNobody(packed, args, {});
          const o = await asNobody(objects, args, { DRBDTS_DIRSYNC_PACKED_NEW: '0' });
          expect(p.code, p.stderr).toBe(2);
          expect(o.code).toBe(2);
          expect(normalised(packed, p.stdout)).toBe(normalised(objects, o.stdout));
          expect(normalised(packed, p.stderr)).toBe(normalised(objects, o.stderr));
          expect(p.stderr).toMatch(round === 0 ? /failed: n1\/secret\.txt: .*EACCES/ : /root 1: open n1\/secret\.txt: EACCES.*\(skipped\)/);
          expect(snapshot(packed.a)).toEqual(snapshot(objects.a));
          expect(snapshot(packed.b)).toEqual(snapshot(objects.b));
          const records = await archiveRecords(packed);
          expect(records).toEqual(await archiveRecords(objects));
          for (const record of records) expect(record).toMatch(/ stat stat$/);
          // Synced paths are archived, the failed one is not (and is retried next round), conflicts neither.
          const archived = records.map((record) => record.split(' ')[0]);
          expect(archived).toContain('n1/n2/n3/deep.txt');
          expect(archived).toContain('shared/sub/x/y.txt');
          expect(archived).not.toContain('n1/secret.txt');
          // The modes conflict only when permissions are synced; otherwise the directory's subtree is packed.
          if (extra.includes('--no-perms')) expect(archived).toContain('moded/kid.txt');
          else expect(archived).not.toContain('moded/kid.txt');
          expect(fs.existsSync(path.join(packed.b, 'n1/secret.txt'))).toBe(false);
          if (round === 0) {
            // The second round: a no-change rescan but for the failure, and new files in directories now synced
            // (the native join with the archive table packs them too).
            for (const tree of [packed, objects]) {
              write(tree.a, 'n1/n2/later.txt', 'later\n');
              write(tree.b, 'shared/sub/later-b.txt', 'later on B\n');
              spawnSync('chown', ['nobody:nogroup', path.join(tree.a, 'n1/n2/later.txt'), path.join(tree.b, 'shared/sub/later-b.txt')]);
            }
          }
        }
      });
    }
  }

  it('interactive runs (no --batch): the same prompt, plan and outcome whether the user declines or accepts', async () => {
    const packed = makeTree('interactive-packed');
    const objects = makeTree('interactive-objects');
    const ask = (tree: Tree, answer: string, env: NodeJS.ProcessEnv) =>
      spawnSync(process.execPath, [cliPath, 'dirsync', tree.a, tree.b, '--archive-dir', tree.archive], {
        input: `${answer}\n`,
        encoding: 'utf8',
        env: { ...process.env, ...env },
      });
    for (const answer of ['n', 'y']) {
      const p = ask(packed, answer, {});
      const o = ask(objects, answer, { DRBDTS_DIRSYNC_PACKED_NEW: '0' });
      expect(p.status, p.stderr).toBe(1); // declined: skipped; accepted: the conflicts are skipped
      expect(o.status).toBe(1);
      expect(normalised(packed, p.stdout)).toBe(normalised(objects, o.stdout));
      expect(normalised(packed, p.stderr)).toBe(normalised(objects, o.stderr));
      expect(p.stderr).toMatch(/Propagate \d+ change\(s\) \(2 conflict\(s\) will be skipped\)\? \[y\/N\]/);
      expect(snapshot(packed.a)).toEqual(snapshot(objects.a));
      expect(snapshot(packed.b)).toEqual(snapshot(objects.b));
      if (answer === 'n') expect(fs.existsSync(path.join(packed.b, 'top.txt'))).toBe(false);
    }
    expect(fs.readFileSync(path.join(packed.b, 'n1/n2/n3/deep.txt'), 'utf8')).toBe('deep\n');
    expect(await archiveRecords(packed)).toEqual(await archiveRecords(objects));
  });

  it('packs what it may and no more: states only for the paths that need a decision', async () => {
    const tree = makeTree('internals');
    spawnSync('chown', ['root:root', path.join(tree.a, 'n1/secret.txt')]);
    const options = engineOptions(tree.archive);
    const engine = new SyncEngine(new LocalReplica(tree.a), new LocalReplica(tree.b), options);
    const result = await engine.run();
    expect(result.exitCode).toBe(1); // the two conflicts are skipped; as root the "unreadable" file is readable
    const internals = engine.detection;
    // States: the symlinks (not packed), the paths on both sides, the conflicts and what lies below them.
    expect([...internals.states.keys()].sort()).toEqual(
      ['kindclash', 'kindclash/inside.txt', 'link', 'moded', 'moded/kid.txt', 'moded/other.txt', 'n1/dangling', 'shared', 'shared/same.txt'].sort(),
    );
    // Items: those of 6 states (the 2 conflicts, the 2 symlinks, the shared directory and file, equal), and one
    // per packed path; the subtrees of the conflicts are skipped, without items.
    expect(internals.newCount()).toBe(result.items.length - 6);
    expect(internals.newCount()).toBeGreaterThan(50);
    expect(result.items.filter((item) => item.action === 'copy' && item.status === 'done').length).toBe(result.counts.propagated);
  });

  it('DRBDTS_DIRSYNC_PACKED_NEW other than 0 or 1: exit 3 naming it, nothing copied', async () => {
    const tree = makeTree('badswitch');
    const result = await asNobody(tree, ['--batch'], { DRBDTS_DIRSYNC_PACKED_NEW: 'yes' });
    expect(result.code).toBe(3);
    expect(result.stderr).toMatch(/DRBDTS_DIRSYNC_PACKED_NEW must be 0 or 1, got "yes"/);
    expect(fs.existsSync(path.join(tree.b, 'top.txt'))).toBe(false);
  });
});
