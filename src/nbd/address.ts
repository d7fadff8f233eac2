// Listen addresses as operators write them: `unix:/run/x.sock`, `127.0.0.1:10809`, `[::1]:10809`, `:10809`.

export type ListenAddress =
  | { kind: 'unix'; path: string }
  | { kind: 'tcp'; host: string; port: number };

export const NBD_DEFAULT_PORT = 10809;

/** Parses a listen address; throws an Error naming the bad text and the accepted forms. */
export function parseListenAddress(text: string): ListenAddress {
  const hint = 'expected unix:PATH or HOST:PORT (for example unix:/run/drbdts/r0.sock, 127.0.0.1:10809, [::1]:10809)';
  if (text.startsWith('unix:')) {
    const path = text.slice('unix:'.length);
    if (path.length === 0) throw new Error(`listen address "${text}": the unix socket path is empty; ${hint}`);
    // Linux sun_path holds 107 bytes plus the terminator.
    if (Buffer.byteLength(path) > 107) {
      throw new Error(`listen address "${text}": unix socket paths are limited to 107 bytes`);
    }
    return { kind: 'unix', path };
  }
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]*)):(\d+)$/.exec(text);
  if (!match) throw new Error(`listen address "${text}": ${hint}`);
  const host = match[1] ?? match[2] ?? '';
  const port = Number(match[3]);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`listen address "${text}": port ${match[3]} is not between 0 and 65535`);
  }
  return { kind: 'tcp', host: host === '' ? '0.0.0.0' : host, port };
}

export function formatListenAddress(address: ListenAddress): string {
  if (address.kind === 'unix') return `unix:${address.path}`;
  return address.host.includes(':') ? `[${address.host}]:${address.port}` : `${address.host}:${address.port}`;
}
