// Ignore patterns, in unison's syntax: `Name GLOB` (the last path component), `Path GLOB` (the whole path),
// `BelowPath GLOB` (the path and everything under it), `Regex RE` (the whole path). A bare pattern without a
// keyword is taken as `Name`, the common case (`--ignore '*.tmp'`). Globs: `*` and `?` (never matching `/`),
// `[...]` classes, `{a,b}` alternatives. An ignored directory is not descended into.
import { ReplicaError } from './replica.js';

/** Marker inside the names of our own temp files; such names are never synced on either side. */
export const TEMP_NAME_MARKER = '.drbdts-tmp-';

export interface IgnoreMatcher {
  ignored(path: string, name: string, isDir: boolean): boolean;
  readonly empty: boolean;
}

function globToRegexSource(glob: string): string {
  let out = '';
  let braceDepth = 0;
  for (let index = 0; index < glob.length; index++) {
    const char = glob[index]!;
    switch (char) {
      case '*':
        out += '[^/]*';
        break;
      case '?':
        out += '[^/]';
        break;
      case '[': {
        const close = glob.indexOf(']', index + 2);
        if (close === -1) {
          out += '\\[';
          break;
        }
        let body = glob.slice(index + 1, close);
        if (body.startsWith('!')) body = '^' + body.slice(1);
        out += '[' + body.replace(/\\/g, '\\\\') + ']';
        index = close;
        break;
      }
      case '{':
        braceDepth++;
        out += '(?:';
        break;
      case '}':
        if (braceDepth > 0) {
          braceDepth--;
          out += ')';
        } else out += '\\}';
        break;
      case ',':
        out += braceDepth > 0 ? '|' : ',';
        break;
      case '\\':
        if (index + 1 < glob.length) {
          out += '\\' + glob[++index];
          break;
        }
        out += '\\\\';
        break;
      default:
        out += /[.+^$()|]/.test(char) ? '\\' + char : char;
    }
  }
  if (braceDepth !== 0) throw new Error('unbalanced { } in pattern');
  return out;
}

export function compileIgnore(patterns: string[]): IgnoreMatcher {
  const names: RegExp[] = [];
  const paths: RegExp[] = [];
  for (const pattern of patterns) {
    const match = /^(Name|Path|BelowPath|Regex)\s+(.*)$/.exec(pattern);
    const kind = match?.[1] ?? 'Name';
    const body = match?.[2] ?? pattern;
    if (body.length === 0) throw new ReplicaError('EPATH', `empty ignore pattern ${JSON.stringify(pattern)}`);
    try {
      if (kind === 'Name') names.push(new RegExp('^' + globToRegexSource(body) + '$', 'u'));
      else if (kind === 'Path') paths.push(new RegExp('^' + globToRegexSource(body) + '$', 'u'));
      else if (kind === 'BelowPath') paths.push(new RegExp('^' + globToRegexSource(body) + '(?:/.*)?$', 'su'));
      else paths.push(new RegExp('^(?:' + body + ')$', 'su'));
    } catch (error) {
      throw new ReplicaError('EPATH', `bad ignore pattern ${JSON.stringify(pattern)}: ${(error as Error).message}`);
    }
  }
  const empty = names.length === 0 && paths.length === 0;
  return {
    empty,
    ignored(path: string, name: string): boolean {
      if (empty) return false;
      for (const re of names) if (re.test(name)) return true;
      for (const re of paths) if (re.test(path)) return true;
      return false;
    },
  };
}
