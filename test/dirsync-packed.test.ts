// The engine's packed-scan path (two local roots scanned by the addon, merge-joined with the archive, objects only
// for paths that differ) must decide exactly what the object path (the JavaScript walk, every path a state)
// decides. Three pairs receive the same random edits run after run: one is synced with the native scan and the
// native join of the scans with the archive table (native/src/dirsync_join.cc), one with the native scan and the
// JavaScript join over the archive as a map (DRBDTS_DIRSYNC_NATIVE_JOIN=0, the fallback), one with
// DRBDTS_DIRSYNC_NATIVE_SCAN=0. Plans, results, trees and archive contents must agree, and the packed runs must
// really have left unchanged paths out of their states.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ArchiveBuilder, archivePathFor, loadArchive, saveArchiveBuilder } from '../src/dirsync/archive/file.js';
import { startEarly } from '../src/dirsync/early.js';
import { SyncEngine, type SyncOptions, type SyncResult } from '../src/dirsync/engine.js';
import { LocalReplica } from '../src/dirsync/local.js';
import { nativeScanAvailable } from '../src/native/scan.js';
import { engineOptions, mkTemp } from './dirsync-helpers.js';
import { mulberry32 } from './helpers/prng.js';

let base: string;

beforeAll(() => {
  base = mkTemp('drbdts-dirsync-packed-');
});
afterAll(() => {
  fs.rmSync(base, { recursive: true, force: true });
});


interface Tree {
  a: string;
  b: string;
  archive: string;
}

function makeTree(name: string): Tree {
  const dir = path.join(base, name);
  const tree = { a: path.join(dir, 'a'), b: path.join(dir, 'b'), archive: path.join(dir, 'archive') };
  fs.mkdirSync(tree.a, { recursive: true });
  fs.mkdirSync(tree.b);
  return tree;
}

function options(tree: Tree, prefer: SyncOptions['prefer']): SyncOptions {
  return engineOptions(tree.archive, { prefer });
}

/** Every path under root: kind, content or link target, permission bits. */
function snapshot(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (rel: string): void => {
    for (const name of fs.readdirSync(path.join(root, rel)).sort()) {
      const p = rel === '' ? name : `${rel}/${name}`;
      const st = fs.lstatSync(path.join(root, p));
      if (st.isDirectory()) {
        out[p] = `dir ${(st.mode & 0o777).toString(8)}`;
        walk(p);
      } else if (st.isSymbolicLink()) out[p] = `link ${fs.readlinkSync(path.join(root, p))}`;
      else out[p] = `file ${(st.mode & 0o777).toString(8)} ${fs.readFileSync(path.join(root, p), 'utf8')}`;
    }
  };
  walk('');
  return out;
}

/** One random edit, applied identically to both trees (same side, same path, same content). */
function edit(random: () => number, trees: Tree[], round: number, step: number): void {
  if (random() < 0.15) {
    // A conflict: the same path changed differently on both sides (a directory below it, or a file).
    const both = Object.keys(snapshot(trees[0]!.a)).filter((p) => fs.existsSync(path.join(trees[0]!.b, p)));
    const victim = both[Math.floor(random() * both.length)];
    if (victim !== undefined) {
      // The two edits' mtimes are set, the same in every tree: --prefer newer must not depend on whether the two
      // writes of one tree fell into the same tick of the file system's clock (they did in one tree, not another).
      const aNewer = random() < 0.5;
      const base = Math.floor(Date.now() / 1000) - 60;
      for (const tree of trees) {
        for (const side of ['a', 'b'] as const) {
          const at = path.join(tree[side], victim);
          const st = fs.lstatSync(at);
          if (st.isDirectory()) fs.writeFileSync(path.join(at, `c${round}-${step}-${side}`), side);
          else if (st.isFile()) {
            fs.appendFileSync(at, `${side} ${round}\n`);
            const seconds = base + ((side === 'a') === aNewer ? 5 : 0);
            fs.utimesSync(at, seconds, seconds);
          } else if (side === 'a') fs.rmSync(at);
          else fs.writeFileSync(at + '.x', side);
        }
      }
      return;
    }
  }
  const side = random() < 0.5 ? 'a' : 'b';
  const roots = trees.map((tree) => tree[side]);
  const listing = Object.keys(snapshot(roots[0]!));
  const pick = (): string | undefined => listing[Math.floor(random() * listing.length)];
  const dirs = listing.filter((p) => fs.lstatSync(path.join(roots[0]!, p)).isDirectory());
  const dir = dirs.length > 0 && random() < 0.8 ? dirs[Math.floor(random() * dirs.length)]! : '';
  const fresh = `${dir === '' ? '' : dir + '/'}n${round}-${step}`;
  const r = random();
  const victim = pick();
  const victimKind = victim === undefined ? undefined : fs.lstatSync(path.join(roots[0]!, victim));
  for (const root of roots) {
    const at = (p: string): string => path.join(root, p);
    if (r < 0.25 || victim === undefined) {
      fs.writeFileSync(at(fresh), `new ${round} ${step}\n`);
    } else if (r < 0.35) {
      fs.mkdirSync(at(fresh));
      fs.writeFileSync(at(fresh + '/inner'), `inner ${round}\n`);
    } else if (r < 0.5 && victimKind!.isFile()) {
      fs.appendFileSync(at(victim), `more ${round} ${step}\n`);
    } else if (r < 0.6) {
      fs.rmSync(at(victim), { recursive: true, force: true });
    } else if (r < 0.7 && victimKind!.isFile()) {
      fs.renameSync(at(victim), at(fresh)); // a rename: copied locally on the other side
    } else if (r < 0.78 && !victimKind!.isSymbolicLink()) {
      fs.chmodSync(at(victim), victimKind!.isDirectory() ? 0o750 : 0o640);
    } else if (r < 0.86) {
      fs.symlinkSync(`target-${round}-${step}`, at(fresh));
    } else if (r < 0.93 && victimKind!.isFile()) {
      fs.rmSync(at(victim));
      fs.mkdirSync(at(victim)); // a file replaced by a directory
    } else {
      fs.writeFileSync(at(fresh + '.copy'), victimKind!.isFile() ? fs.readFileSync(at(victim)) : 'x'); // same content elsewhere
    }
  }
}

function summary(result: SyncResult): unknown {
  return {
    exitCode: result.exitCode,
    counts: result.counts,
    items: result.items
      .map((item) => `${item.path} ${item.action} ${item.from ?? '-'} ${item.change1} ${item.change2} ${item.status} ${item.reason ?? ''} ${item.resolvedBy ?? ''}`)
      .sort(),
  };
}

async function archiveContent(tree: Tree): Promise<Record<string, string>> {
  const id = (root: string): string => `${os.hostname()}:${fs.realpathSync(root)}`;
  const { file, swapped } = await archivePathFor(tree.archive, id(tree.a), id(tree.b));
  const out: Record<string, string> = {};
  for (const [p, e] of await loadArchive(file, swapped)) out[p] = `${e.kind} ${e.sizeBytes} ${e.fingerprint} ${e.mode} ${e.linkTarget}`;
  return out;
}

type Mode = 'native join' | 'js join' | 'objects';

async function sync(tree: Tree, mode: Mode, prefer: SyncOptions['prefer']): Promise<{ result: SyncResult; states: number; clean: number; table: boolean }> {
  const saved = [process.env.DRBDTS_DIRSYNC_NATIVE_SCAN, process.env.DRBDTS_DIRSYNC_NATIVE_JOIN];
  if (mode === 'objects') process.env.DRBDTS_DIRSYNC_NATIVE_SCAN = '0';
  if (mode === 'js join') process.env.DRBDTS_DIRSYNC_NATIVE_JOIN = '0';
  try {
    const engine = new SyncEngine(new LocalReplica(tree.a), new LocalReplica(tree.b), options(tree, prefer));
    const result = await engine.run();
    const { detection } = engine;
    return { result, states: detection.states.size, clean: detection.cleanCount(), table: detection.flags !== undefined };
  } finally {
    for (const [name, value] of [['DRBDTS_DIRSYNC_NATIVE_SCAN', saved[0]], ['DRBDTS_DIRSYNC_NATIVE_JOIN', saved[1]]] as const) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
  }
}

describe.skipIf(!nativeScanAvailable())('packed scans decide as the object path does', () => {
  for (const seed of [1, 2, 3, 4, 5, 6]) {
    it(`random edits, seed ${seed}`, async () => {
      const random = mulberry32(seed);
      const packed = makeTree(`p${seed}`);
      const jsJoin = makeTree(`j${seed}`);
      const objects = makeTree(`o${seed}`);
      const trees = [packed, jsJoin, objects];
      // A starting tree on side a: 6 directories of 8 files, some of the same size and content.
      for (const tree of trees) {
        for (let d = 0; d < 6; d++) {
          fs.mkdirSync(path.join(tree.a, `d${d}`, 'sub'), { recursive: true });
          for (let f = 0; f < 8; f++) fs.writeFileSync(path.join(tree.a, `d${d}`, f % 2 ? `sub/f${f}` : `f${f}`), `content ${f % 5}\n`);
        }
        fs.symlinkSync('d0/f0', path.join(tree.a, 'link'));
      }
      let cleanSeen = 0;
      let jsCleanSeen = 0;
      let tableRuns = 0;
      let conflicts = 0;
      for (let round = 0; round < 15; round++) {
        const prefer = round % 3 === 2 ? (random() < 0.5 ? 1 : 'newer') : round % 3 === 1 ? undefined : 2;
        const p = await sync(packed, 'native join', prefer);
        const j = await sync(jsJoin, 'js join', prefer);
        const o = await sync(objects, 'objects', prefer);
        expect(j.table).toBe(false);
        expect(summary(p.result)).toEqual(summary(o.result));
        expect(summary(j.result)).toEqual(summary(o.result));
        for (const tree of [packed, jsJoin]) {
          expect(snapshot(tree.a)).toEqual(snapshot(objects.a));
          expect(snapshot(tree.b)).toEqual(snapshot(objects.b));
          expect(await archiveContent(tree)).toEqual(await archiveContent(objects));
        }
        cleanSeen += p.clean;
        jsCleanSeen += j.clean;
        if (p.table) tableRuns++;
        conflicts += p.result.items.filter((item) => item.action === 'conflict').length;
        // Edits on both sides between runs: some become conflicts.
        const edits = 1 + Math.floor(random() * 4);
        for (let step = 0; step < edits; step++) edit(random, trees, round, step);
      }
      expect(cleanSeen).toBeGreaterThan(0);
      expect(jsCleanSeen).toBe(cleanSeen);
      // Every run after the first has an archive table to join with.
      expect(tableRuns).toBe(14);
      expect(conflicts).toBeGreaterThan(0);
    });
  }

  it('an archive that lists a path twice is refused as corrupt by both joins, nothing changed', async () => {
    const tree = makeTree('duplicate');
    fs.writeFileSync(path.join(tree.a, 'one'), 'one');
    fs.writeFileSync(path.join(tree.a, 'two'), 'two');
    expect((await sync(tree, 'native join', undefined)).result.exitCode).toBe(0);
    const id = (root: string): string => `${os.hostname()}:${fs.realpathSync(root)}`;
    const roots = { root1Id: id(tree.a), root2Id: id(tree.b) };
    const { file, swapped } = await archivePathFor(tree.archive, roots.root1Id, roots.root2Id);
    const entries = await loadArchive(file, swapped);
    const builder = new ArchiveBuilder(swapped);
    for (const [p, e] of entries) builder.add(p, e);
    builder.add('two', entries.get('two')!);
    await saveArchiveBuilder(file, swapped, roots, builder);
    fs.writeFileSync(path.join(tree.a, 'three'), 'three');
    for (const mode of ['native join', 'js join'] as const) {
      const { result } = await sync(tree, mode, undefined);
      expect(result.exitCode).toBe(3);
      expect(result.fatal).toMatch(/is corrupt/);
      expect(fs.existsSync(path.join(tree.b, 'three'))).toBe(false);
    }
  });

  it('an early start (lock, scans, archive load begun by the CLI) is taken over only when it matches the run', async () => {
    const other = makeTree('early-other');
    const tree = makeTree('early');
    fs.writeFileSync(path.join(tree.a, 'f'), 'f');
    fs.writeFileSync(path.join(other.a, 'g'), 'g');
    // A mismatch (another pair): the engine releases that lock, runs on its own, and the other pair is untouched.
    const foreign = await startEarly([other.a, other.b], other.archive, () => undefined);
    expect(foreign).toBeDefined();
    expect(fs.existsSync(foreign!.file + '.lock')).toBe(true);
    const engine = new SyncEngine(new LocalReplica(tree.a), new LocalReplica(tree.b), { ...options(tree, undefined), early: foreign });
    expect((await engine.run()).exitCode).toBe(0);
    expect(fs.existsSync(foreign!.file + '.lock')).toBe(false);
    expect(fs.readFileSync(path.join(tree.b, 'f'), 'utf8')).toBe('f');
    expect(fs.existsSync(path.join(other.b, 'g'))).toBe(false);
    // A match: its lock is the run's (held during it: a second early start cannot take it), released at the end.
    fs.writeFileSync(path.join(tree.a, 'f2'), 'f2');
    const early = await startEarly([tree.a, tree.b], tree.archive, () => undefined);
    expect(early).toBeDefined();
    expect(await startEarly([tree.a, tree.b], tree.archive, () => undefined)).toBeUndefined();
    const matched = new SyncEngine(new LocalReplica(tree.a), new LocalReplica(tree.b), { ...options(tree, undefined), early });
    expect((await matched.run()).exitCode).toBe(0);
    expect(matched.detection.flags).toBeDefined();
    expect(fs.existsSync(early!.file + '.lock')).toBe(false);
    expect(fs.readFileSync(path.join(tree.b, 'f2'), 'utf8')).toBe('f2');
  });

  it('a no-change rescan makes no state at all', async () => {
    const tree = makeTree('quiet');
    for (let f = 0; f < 50; f++) fs.writeFileSync(path.join(tree.a, `f${f}`), `x${f}`);
    fs.mkdirSync(path.join(tree.a, 'dir'));
    expect((await sync(tree, 'native join', undefined)).result.exitCode).toBe(0);
    for (const mode of ['native join', 'js join'] as const) {
      const again = await sync(tree, mode, undefined);
      expect(again.result.exitCode).toBe(0);
      expect(again.result.items).toEqual([]);
      expect(again.states).toBe(0);
      expect(again.clean).toBe(51);
      expect(again.table).toBe(mode === 'native join');
    }
  });
});
