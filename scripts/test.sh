#!/usr/bin/env bash
# The README's test command: set up a fresh machine, then run every test (vitest) and a short smoke run of
# the benchmarks so they cannot rot. The files that start replicated daemons run once per replication data path
# (vitest projects repl-native and repl-js, vitest.config.ts); `--project repl-js` and the like pick one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
npx vitest run "$@"
