#!/usr/bin/env bash
# drbdts against kernel DRBD 8.4 between two machines: two throwaway VMs (scripts/vm/run-pair.sh) joined by their
# private link, each with its own virtio disk (/dev/vda). The same fio jobs run on alice, the Primary, through
# kernel DRBD's /dev/drbd0 (protocol C, bob Secondary) and through drbdts's /dev/nbd0 (the kernel NBD client on
# alice's Primary, protocol C, bob Secondary), alternating: DRBD, drbdts, DRBD, drbdts, ... on the same disks.
#   bash bench/drbd-compare-pair.sh [--rounds N] [--runtime S] [--out FILE]
# The CPUs are emulated (TCG, one vCPU per guest; no KVM here, scripts/vm/lib.sh), so the figures measure the
# emulator as much as either implementation: JIT-compiled JavaScript is translated again each time V8
# regenerates it, kernel C once. Read them as an emulated-CPU comparison only. The one-guest comparison (both
# nodes in one kernel over loopback, with a behaviour table) is bench/drbd-compare.sh.
# Needs drbd-utils (drbdsetup-84, drbdmeta) and fio on the host: scripts/install-system.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
if [ "${1:-}" != --inside ]; then
  out=""
  args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --out) out=$2; shift 2 ;;
      --rounds|--runtime) args+=("$1" "$2"); shift 2 ;;
      *) echo "drbd-compare-pair.sh: unknown option $1" >&2; exit 2 ;;
    esac
  done
  command -v drbdmeta >/dev/null && [ -x /usr/lib/drbd/drbdsetup-84 ] && command -v fio >/dev/null || {
    echo "drbd-compare-pair.sh: drbd-utils or fio is missing (bash scripts/install-system.sh)" >&2; exit 2; }
  [ -f "$root/dist/cli/main.js" ] || { echo "drbd-compare-pair.sh: build first (npm run build)" >&2; exit 2; }
  rc=0
  result=$(bash "$root/scripts/vm/run-pair.sh" --memory 2048 --timeout 2400 -- \
    bash "$here/drbd-compare-pair.sh" --inside "${args[@]}") || rc=$?
  echo "$result"
  if [ -n "$out" ]; then echo "$result" > "$out"; fi
  exit "$rc"
fi
shift
rounds=2
runtime=10
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    *) shift ;;
  esac
done
allow_two_primaries=false
. "$root/test/vm/pair-lib.sh"
S=/usr/lib/drbd/drbdsetup-84
mkdir -p /run/lock /var/lock
# No drbd.conf in the VMs: the kernel's handler calls (drbdadm before-resync-source ...) would fail and drop the
# connection; drbdsetup drives everything, so the handler is a no-op.
echo /bin/true > /sys/module/drbd/parameters/usermode_helper

fio_run() { # device job -> "MiB/s IOPS p50us"
  local dev=$1 job=$2 extra
  case "$job" in
    seqwrite-1m-qd8) extra="--rw=write --bs=1m --iodepth=8" ;;
    randwrite-4k-qd32) extra="--rw=randwrite --bs=4k --iodepth=32" ;;
    write-4k-qd1-fua) extra="--rw=randwrite --bs=4k --iodepth=1 --fsync=1" ;;
  esac
  # shellcheck disable=SC2086
  fio --name=j --filename="$dev" --ioengine=libaio --direct=1 $extra --size=$((size_mib / 2))M --time_based=1 \
    --runtime="$runtime" --output-format=json 2>/dev/null | node -e '
    let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
      const w = JSON.parse(s.slice(s.indexOf("{"))).jobs[0].write;
      const p50 = (w.clat_ns.percentile?.["50.000000"] ?? 0) / 1000;
      console.log(`${(w.bw_bytes / 1048576).toFixed(1)} ${Math.round(w.iops)} ${Math.round(p50)}`); });'
}
jobs=(seqwrite-1m-qd8 randwrite-4k-qd32 write-4k-qd1-fua)
k_is() { [ "$($S "$1" 0 2>/dev/null)" = "$2" ]; }

for round in $(seq 1 "$rounds"); do
  # ---- kernel DRBD 8.4 on /dev/vda, alice Primary
  { yes 2>/dev/null || true; } | drbdmeta --force 0 v08 /dev/vda internal create-md >/dev/null 2>&1
  must $S new-resource r0
  must $S new-minor r0 0 0
  must $S attach 0 /dev/vda /dev/vda internal
  must $S connect r0 "ipv4:$DRBDTS_VM_ADDRESS:7788" "ipv4:$DRBDTS_VM_PEER_ADDRESS:7788" --protocol=C
  wait_until "kernel DRBD Connected" 120 k_is cstate Connected
  [ "$node" != alice ] || must $S new-current-uuid 0 --clear-bitmap
  wait_until "kernel DRBD UpToDate/UpToDate" 60 k_is dstate UpToDate/UpToDate
  meet "drbd-ready-$round"
  if [ "$node" = alice ]; then
    must $S primary 0
    for job in "${jobs[@]}"; do echo "drbd $round $job $(fio_run /dev/drbd0 "$job")" >> "$shared/results"; done
    must $S secondary 0
  fi
  meet "drbd-done-$round" 600
  must $S down r0
  meet "drbd-down-$round"
  # ---- drbdts on the same /dev/vda, alice Primary with /dev/nbd0
  must drbdts create-md r0 --force
  start_drbdts
  wait_until "drbdts Connected" 120 is cstate Connected
  [ "$node" != alice ] || must drbdts new-current-uuid r0 --clear-bitmap
  wait_until "drbdts UpToDate/UpToDate" 60 is dstate UpToDate/UpToDate
  meet "drbdts-ready-$round"
  if [ "$node" = alice ]; then
    must drbdts primary r0
    wait_until "/dev/nbd0 attached" 30 attached
    for job in "${jobs[@]}"; do echo "drbdts $round $job $(fio_run /dev/nbd0 "$job")" >> "$shared/results"; done
    must drbdts secondary r0
  fi
  meet "drbdts-done-$round" 600
  must drbdts down r0
  wait "$drbdts_pid" || true
  meet "drbdts-down-$round"
  say "round $round done"
done

[ "$node" = alice ] || exit 0
echo "## two guests (emulated CPU, 1 vCPU each, fio libaio direct=1 on alice, ${runtime} s per job, $rounds rounds alternating)"
echo
echo "| job | round | kernel DRBD C | drbdts C | drbdts / DRBD |"
echo "|---|---|---|---|---|"
for job in "${jobs[@]}"; do
  for round in $(seq 1 "$rounds"); do
    node -e '
      const [job, round, drbd, drbdts] = process.argv.slice(1).map((v, i) => i < 2 ? v : v.split(" ").map(Number));
      const fua = job.includes("fua");
      const pick = (r) => fua ? r[2] : job.includes("4k") ? r[1] : r[0];
      const unit = fua ? " us p50" : job.includes("4k") ? " IOPS" : " MiB/s";
      const ratio = (fua ? pick(drbd) / pick(drbdts) : pick(drbdts) / pick(drbd)).toFixed(2);
      console.log(`| ${job} | ${round} | ${pick(drbd)}${unit} | ${pick(drbdts)}${unit} | ${ratio} |`);
    ' "$job" "$round" "$(awk -v j="$job" -v r="$round" '$1 == "drbd" && $2 == r && $3 == j { print $4, $5, $6 }' "$shared/results")" \
      "$(awk -v j="$job" -v r="$round" '$1 == "drbdts" && $2 == r && $3 == j { print $4, $5, $6 }' "$shared/results")"
  done
done
echo
echo "(ratio: throughput drbdts / DRBD, or for the QD1 flush latency DRBD / drbdts, so below 1 is always worse)"
