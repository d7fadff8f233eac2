#!/usr/bin/env node
// Entry point for the `drbdts` command: the compiled CLI lives in dist/ (built by `npm run build`).
import { main } from '../dist/cli/main.js';

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (error) => {
    process.stderr.write(`drbdts: ${error instanceof Error ? error.message : String(error)}\n`);
    process.exitCode = 3;
  },
);
