// Proves LocalReplica.replaceWithDir, what the engine uses when a file or symlink becomes a directory: the new
// directory takes the path in one renameat2(RENAME_EXCHANGE) swap (same inode before and after the swap as
// the temp directory it was made as), the old entry is gone, no temp is left; a precondition that no longer
// holds changes nothing; and a stale temp directory of a killed run is removed by the next scan.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { LocalReplica } from '../src/dirsync/local.js';
import { ReplicaError } from '../src/dirsync/replica.js';

let root: string;
beforeEach(() => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'drbdts-replace-dir-'));
});
afterEach(() => {
  fs.rmSync(root, { recursive: true, force: true });
});

function names(): string[] {
  return fs.readdirSync(root).sort();
}

it('swaps a directory in for a file and for a symlink, leaving no temp', async () => {
  const replica = new LocalReplica(root);
  await replica.open();
  fs.writeFileSync(path.join(root, 'x'), 'old file\n');
  fs.symlinkSync('somewhere', path.join(root, 'link'));
  const fileStat = (await replica.stat('x'))!;
  const linkStat = (await replica.stat('link'))!;
  const dir = await replica.replaceWithDir('x', 0o750, fileStat);
  expect(dir.kind).toBe('dir');
  expect(fs.lstatSync(path.join(root, 'x')).isDirectory()).toBe(true);
  expect(fs.lstatSync(path.join(root, 'x')).mode & 0o777).toBe(0o750);
  expect(fs.readdirSync(path.join(root, 'x'))).toEqual([]);
  expect((await replica.replaceWithDir('link', 0o755, linkStat)).kind).toBe('dir');
  expect(names()).toEqual(['link', 'x']);
  await replica.close();
});

it('changes nothing when the file changed since the scan', async () => {
  const replica = new LocalReplica(root);
  await replica.open();
  fs.writeFileSync(path.join(root, 'x'), 'old file\n');
  const stale = (await replica.stat('x'))!;
  fs.writeFileSync(path.join(root, 'x'), 'changed meanwhile, longer\n');
  const failure = await replica.replaceWithDir('x', 0o755, stale).then(() => null, (error: unknown) => error);
  expect(failure).toBeInstanceOf(ReplicaError);
  expect((failure as ReplicaError).code).toBe('ECHANGED');
  expect(fs.readFileSync(path.join(root, 'x'), 'utf8')).toBe('changed meanwhile, longer\n');
  expect(names()).toEqual(['x']);
  await replica.close();
});

it('removes an empty temp directory a killed run left behind', async () => {
  // A pid no process can have in the temp name (2^22 + 1, above Linux's PID_MAX_LIMIT): the scan treats it as stale.
  const leftover = path.join(root, `.x.drbdts-tmp-${4194305}-1`);
  fs.mkdirSync(leftover);
  fs.writeFileSync(path.join(root, 'x'), 'file\n');
  const replica = new LocalReplica(root);
  await replica.open();
  for await (const batch of replica.scan({ ignore: [] })) void batch;
  expect(names()).toEqual(['x']);
  await replica.close();
});
