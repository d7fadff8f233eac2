#!/usr/bin/env -S -u NODE_EXTRA_CA_CERTS node
// Entry point for the `drbdts` command: the compiled CLI lives in dist/ (built by `npm run build`).
//
// Node 20 reads and parses NODE_EXTRA_CA_CERTS, and with it builds its whole root certificate store, at every
// start before any JavaScript runs (36-90 ms on the machine the benchmarks run on, more than a no-change dirsync
// takes). drbdts never verifies a certificate against that store: the NBD server's TLS presents the operator's
// own certificate and asks none from clients, and dirsync's tcp:// links are TLS with a pre-shared key (no
// certificates at all). So the command starts Node without it (GNU env -S, coreutils 8.30 or later). Running
// `node bin/drbdts.js` directly keeps the variable and works the same, only slower to start.
import { main } from '../dist/cli/main.js';

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (error) => {
    process.stderr.write(`drbdts: ${error instanceof Error ? error.message : String(error)}\n`);
    process.exitCode = 3;
  },
);
