// Process helpers shared by the macro benchmarks.
import { spawnSync } from 'node:child_process';
import * as net from 'node:net';

/** Runs a command to completion; throws with its stderr when it fails. */
export function sh(command, commandArgs, options = {}) {
  const result = spawnSync(command, commandArgs, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024, ...options });
  if (result.status !== 0) throw new Error(`${command} ${commandArgs.join(' ')}: ${result.stderr}`);
  return result.stdout;
}

/** A loopback TCP port the OS says is free now. */
export async function freePort() {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}
