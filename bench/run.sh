#!/usr/bin/env bash
# Runs the drbdts benchmarks. NBD serving: fio jobs against `drbdts serve` and `nbdkit file` on the same
# backing file, alternating, several rounds, medians and ratios (bench/nbd-compare.mjs), then the tinybench
# micro benchmarks of request parsing and reply encoding (bench/nbd-micro.mjs).
#   bash bench/run.sh            full run (1 GiB, 5 rounds, unix and TCP: about 10 minutes)
#   bash bench/run.sh --quick    smoke run for CI (64 MiB, 1 round, 1 s jobs: seconds)
# Extra arguments go to nbd-compare.mjs (--rounds N, --transports unix,tcp, --size 1g, --jobs a,b, --out FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f dist/cli/main.js ] || npm run --silent build:ts
for tool in fio nbdkit; do
  command -v "$tool" >/dev/null || { echo "bench/run.sh: $tool is missing (bash scripts/install-system.sh)" >&2; exit 1; }
done
quick=
for arg in "$@"; do [ "$arg" = --quick ] && quick=--quick; done
echo "== NBD serving: drbdts serve vs nbdkit file =="
node bench/nbd-compare.mjs "$@"
echo "== NBD request parsing and reply encoding (tinybench) =="
node bench/nbd-micro.mjs $quick
