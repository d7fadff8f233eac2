// One pino logger factory for the whole program. Logs go to stderr so that command output (status --json,
// dirsync plans) on stdout stays clean. DRBDTS_LOG_LEVEL overrides the level (trace..fatal, silent).
import { pino, type Logger } from 'pino';

export type { Logger };

export function createLogger(name: string, level?: string): Logger {
  return pino(
    { name, level: level ?? process.env.DRBDTS_LOG_LEVEL ?? 'info', base: { pid: process.pid } },
    pino.destination({ fd: 2, sync: false }),
  );
}
