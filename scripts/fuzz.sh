#!/usr/bin/env bash
# The long fuzzing runs (CI runs the same fuzzers with fewer inputs): the NBD server, the peer protocol before
# and after authentication, and the TOML config, each with at least 1,000,000 inputs from a fixed seed.
#   bash scripts/fuzz.sh [--seed N] [--only nbd|peer|config]
# Prints each fuzzer's summary line (inputs, outcomes, peak RSS) and exits non-zero on the first failure, whose
# message names the seed and the input to replay. Takes about an hour on 2 cores (the peer fuzzer most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
seed=24301
only=
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    *) echo "fuzz.sh: unknown option $1 (usage: fuzz.sh [--seed N] [--only nbd|peer|config])" >&2; exit 2 ;;
  esac
done
npm run build >/tmp/drbdts-fuzz-build.log 2>&1 || { echo "fuzz.sh: npm run build failed (log: /tmp/drbdts-fuzz-build.log)" >&2; exit 1; }
run() {
  local name=$1; shift
  [ -z "$only" ] || [ "$only" = "$name" ] || return 0
  echo "== $name fuzzer, seed $seed"
  env FUZZ_SEED="$seed" "$@" 2>&1 | grep -E 'fuzz|✓|×|FAIL|Error|passed|failed' | sed 's/\x1b\[[0-9;]*m//g'
  return "${PIPESTATUS[0]}"
}
run config env FUZZ_CONFIG_INPUTS=1000000 npx vitest run --project main test/fuzz-config.test.ts
run nbd env FUZZ_NBD_SCALE=100 npx vitest run --project main test/nbd-fuzz.test.ts
run peer env FUZZ_PEER_INPUTS=1000000 FUZZ_PEER_RAW=10000 npx vitest run --project repl-native test/fuzz-peer.test.ts
