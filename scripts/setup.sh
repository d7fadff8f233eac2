#!/usr/bin/env bash
# Everything drbdts needs on a fresh machine: system packages, the test VM's kit, npm dependencies (native ones built, as
# approved in package.json's allowScripts), our native addon and the TypeScript build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system.sh
# The kernel and initramfs of the test VM (the nbd kernel module this host kernel lacks): test/kernel-vm.test.ts.
bash scripts/vm/build-kit.sh
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
npm run --silent build
