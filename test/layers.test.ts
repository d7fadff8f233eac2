// What this file proves: every import between src/ folders points down the layers docs/architecture.md draws,
// so a reader can tell from the folders which layer owns what, and a change cannot quietly make a lower layer
// depend on a higher one (a cycle in the making). How: every relative import and dynamic import() of every
// source file is read and its folder looked up in the table below, which is the architecture picture as data.
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const src = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'src');

/** Which folders each folder may import from (besides itself). Lowest first. */
const mayImport: Record<string, readonly string[]> = {
  util: [],
  native: [],
  blockdev: ['native', 'util'],
  metadata: ['native', 'util'], // the on-disk structures: superblocks, UUIDs, bitmap, activity log
  nbd: ['blockdev', 'native', 'util'], // the NBD server knows only the BlockDevice interface
  replication: ['metadata', 'blockdev', 'native', 'util'],
  resource: ['replication', 'nbd', 'metadata', 'blockdev', 'native', 'util'], // the node daemon composes them
  cli: ['resource', 'dirsync', 'nbd', 'metadata', 'blockdev', 'native', 'util'],
  dirsync: ['native', 'util'], // stands apart from the block device
};

function sourceFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) return sourceFiles(full);
    return entry.name.endsWith('.ts') ? [full] : [];
  });
}

describe('layers', () => {
  it('every src/ folder is in the table, and every import between folders points down', () => {
    const folders = readdirSync(src, { withFileTypes: true }).filter((entry) => entry.isDirectory()).map((entry) => entry.name);
    expect(folders.sort()).toEqual(Object.keys(mayImport).sort());
    const violations: string[] = [];
    let imports = 0;
    for (const file of sourceFiles(src)) {
      const from = path.relative(src, file).split(path.sep)[0]!;
      const text = readFileSync(file, 'utf8');
      for (const match of text.matchAll(/(?:from\s+|import\s*\(\s*)'(\.{1,2}\/[^']+)'/g)) {
        const target = path.relative(src, path.resolve(path.dirname(file), match[1]!)).split(path.sep)[0]!;
        imports += 1;
        if (target === from) continue;
        if (!(mayImport[from] ?? []).includes(target)) {
          violations.push(`${path.relative(src, file)} imports ${match[1]} (${from}/ may import only ${(mayImport[from] ?? []).join(', ') || 'nothing'})`);
        }
      }
    }
    expect(imports, 'the import pattern matched the sources').toBeGreaterThan(100);
    expect(violations).toEqual([]);
  });
});
