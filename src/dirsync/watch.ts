// `dirsync --watch`: sync once, then re-sync whenever either root changes. Local roots are watched with
// fs.watch (recursive: inotify on every directory); remote roots are watched by their dirsync-server, which
// streams change notices over a second connection; a root that cannot be watched is polled. Bursts of events
// (an editor saving, a build writing a thousand files, our own propagation) are coalesced: a sync starts after
// the events go quiet for `quietMs`, or at the latest `maxDelayMs` after the first one, and events that arrive
// during a sync cause exactly one more sync after it.
import { watch as fsWatch, type FSWatcher } from 'node:fs';
import { compileIgnore, TEMP_NAME_MARKER, type IgnoreMatcher } from './ignore.js';
import type { RemoteOptions } from './remote.js';

export const WATCH_QUIET_MS = 250;
export const WATCH_MAX_DELAY_MS = 2000;
export const WATCH_POLL_INTERVAL_MS = 10_000;
/** After a sync that failed fatally (peer gone, lock held), wait this long before trying again. */
export const WATCH_RETRY_MS = 5000;

export interface WatchOptions {
  roots: string[];
  ignore: string[];
  /** One full sync run; returns its exit code (0, 1, 2, 3). */
  syncOnce(): Promise<number>;
  log?: (message: string) => void;
  /** How to reach remote roots for their change stream (same as the sync's own connections). */
  remote?: RemoteOptions;
  quietMs?: number;
  /** Same as quietMs (the name docs/dirsync-interfaces.md uses). */
  debounceMs?: number;
  maxDelayMs?: number;
  pollIntervalMs?: number;
  /** Stops watching (tests); SIGINT and SIGTERM stop it too. */
  signal?: AbortSignal;
}

/** Calls `fire` once per burst of `poke`s: after `quietMs` without one, or `maxDelayMs` after the burst began. */
export class Coalescer {
  private quietTimer: NodeJS.Timeout | undefined;
  private maxTimer: NodeJS.Timeout | undefined;
  private eventCount = 0;

  constructor(
    private readonly fire: (eventCount: number) => void,
    private readonly quietMs: number,
    private readonly maxDelayMs: number,
  ) {}

  poke(): void {
    this.eventCount++;
    if (this.quietTimer !== undefined) clearTimeout(this.quietTimer);
    this.quietTimer = setTimeout(() => this.flush(), this.quietMs);
    this.maxTimer ??= setTimeout(() => this.flush(), this.maxDelayMs);
  }

  private flush(): void {
    clearTimeout(this.quietTimer);
    clearTimeout(this.maxTimer);
    this.quietTimer = undefined;
    this.maxTimer = undefined;
    const count = this.eventCount;
    this.eventCount = 0;
    if (count > 0) this.fire(count);
  }

  close(): void {
    clearTimeout(this.quietTimer);
    clearTimeout(this.maxTimer);
    this.quietTimer = undefined;
    this.maxTimer = undefined;
    this.eventCount = 0;
  }
}

/** True if a changed relative path (from a watch event) should not trigger a sync. */
export function isIgnoredChange(relativePath: string, ignore: IgnoreMatcher): boolean {
  const parts = relativePath.split('/').filter((part) => part !== '' && part !== '.');
  if (parts.some((part) => part.includes(TEMP_NAME_MARKER))) return true;
  if (ignore.empty) return false;
  for (let i = 0; i < parts.length; i++) {
    const path = parts.slice(0, i + 1).join('/');
    if (ignore.ignored(path, parts[i]!, i < parts.length - 1)) return true;
  }
  return false;
}

export interface TreeWatcher {
  close(): void;
}

/**
 * Watches a local tree; `onChange(path)` gets each relevant changed path (relative; '' when the kernel's queue
 * overflowed and anything may have changed). Throws if the tree cannot be watched (ENOSPC: inotify watches
 * exhausted; the caller falls back to polling).
 */
export function watchLocalTree(root: string, ignorePatterns: string[], onChange: (path: string) => void, onError: (error: Error) => void): TreeWatcher {
  const ignore = compileIgnore(ignorePatterns);
  const watcher: FSWatcher = fsWatch(root, { recursive: true, persistent: true }, (_event, filename) => {
    const relative = filename === null ? '' : filename.toString();
    if (relative !== '' && isIgnoredChange(relative, ignore)) return;
    onChange(relative);
  });
  watcher.on('error', onError);
  return { close: () => watcher.close() };
}

export async function runWatch(watchOptions: WatchOptions): Promise<number> {
  const options = { ...watchOptions, log: watchOptions.log ?? ((message: string) => process.stderr.write(`dirsync: ${message}\n`)) };
  const quietMs = options.quietMs ?? options.debounceMs ?? WATCH_QUIET_MS;
  const maxDelayMs = options.maxDelayMs ?? WATCH_MAX_DELAY_MS;
  const pollIntervalMs = options.pollIntervalMs ?? WATCH_POLL_INTERVAL_MS;

  let lastCode = await options.syncOnce();
  if (lastCode === 3) {
    options.log('the first sync failed fatally; not watching');
    return lastCode;
  }

  let stopping = false;
  let running: Promise<void> | undefined;
  let again = false;
  let retryTimer: NodeJS.Timeout | undefined;

  const runSyncs = async (): Promise<void> => {
    do {
      again = false;
      lastCode = await options.syncOnce();
      if (lastCode === 3 && !stopping) {
        options.log(`sync failed; retrying in ${WATCH_RETRY_MS / 1000} s`);
        clearTimeout(retryTimer);
        retryTimer = setTimeout(() => trigger('retry'), WATCH_RETRY_MS);
      }
    } while (again && !stopping);
  };

  const trigger = (why: string): void => {
    if (stopping) return;
    if (running !== undefined) {
      again = true; // one more run after the current one, however many events arrive meanwhile
      return;
    }
    options.log(`${why}: syncing`);
    running = runSyncs().finally(() => {
      running = undefined;
    });
  };

  const coalescer = new Coalescer((count) => trigger(`${count} change${count === 1 ? '' : 's'} detected`), quietMs, maxDelayMs);
  const closers: Array<() => void> = [() => coalescer.close()];
  let pollNeeded = false;

  for (const root of options.roots) {
    if (/^(tcp|ssh):\/\//.test(root)) {
      try {
        const { openRemoteReplica } = await import('./remote.js');
        const replica = await openRemoteReplica(root, options.remote ?? {});
        await replica.open();
        const watcher = await replica.watchChanges(options.ignore, () => coalescer.poke(), (error) => {
          if (stopping) return;
          options.log(`change stream from ${root} ended (${error.message}); polling it every ${pollIntervalMs / 1000} s`);
          startPolling();
        });
        closers.push(() => {
          watcher.close();
          void replica.close();
        });
      } catch (error) {
        options.log(`cannot watch ${root} (${(error as Error).message}); polling it every ${pollIntervalMs / 1000} s`);
        pollNeeded = true;
      }
      continue;
    }
    try {
      const watcher = watchLocalTree(root, options.ignore, () => coalescer.poke(), (error) => {
        if (stopping) return;
        options.log(`watching ${root} failed (${error.message}); polling every ${pollIntervalMs / 1000} s`);
        startPolling();
      });
      closers.push(() => watcher.close());
    } catch (error) {
      options.log(`cannot watch ${root} (${(error as Error).message}); polling every ${pollIntervalMs / 1000} s`);
      pollNeeded = true;
    }
  }

  let pollTimer: NodeJS.Timeout | undefined;
  function startPolling(): void {
    if (pollTimer !== undefined || stopping) return;
    pollTimer = setInterval(() => trigger('poll'), pollIntervalMs);
  }
  if (pollNeeded) startPolling();
  options.log(`watching ${options.roots.join(' and ')} for changes (Ctrl-C to stop)`);

  await new Promise<void>((resolve) => {
    const stop = (): void => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      options.signal?.removeEventListener('abort', stop);
      resolve();
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
    if (options.signal !== undefined) {
      if (options.signal.aborted) stop();
      else options.signal.addEventListener('abort', stop, { once: true });
    }
  });
  stopping = true;
  clearInterval(pollTimer);
  clearTimeout(retryTimer);
  for (const close of closers) close();
  if (running !== undefined) await running;
  return lastCode;
}
