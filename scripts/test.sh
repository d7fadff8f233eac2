#!/usr/bin/env bash
# The README's test command: set up a fresh machine, then run every test (vitest) and a short smoke run of
# the benchmarks so they cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
npx vitest run "$@"
