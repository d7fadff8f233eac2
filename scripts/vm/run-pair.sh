#!/usr/bin/env bash
# Runs a command in two throwaway virtual machines at once, "alice" and "bob", joined by a private Ethernet link
# and by nothing else: each guest is booted as by scripts/vm/run.sh (Debian's stock kernel, this machine's file
# system as a read-only root with a tmpfs overlay), plus
#   - one virtio network card, cabled to the other guest's only: qemu's datagram netdev over two Unix sockets in the
#     run directory (no host network, no other guest); alice is 10.99.0.1/24, bob 10.99.0.2/24 on eth0;
#   - one virtio disk of its own, /dev/vda: a sparse file in the run directory (--disk MiB, default 320), zeros at
#     start, which outlives a reboot of the guest;
#   - a directory both guests and the host share (9p, uncached), for the two commands to meet: same path everywhere.
# The command sees DRBDTS_VM_NODE (alice or bob), DRBDTS_VM_PEER, DRBDTS_VM_ADDRESS, DRBDTS_VM_PEER_ADDRESS,
# DRBDTS_VM_DISK (/dev/vda), DRBDTS_VM_SHARED (the shared directory) and DRBDTS_VM_BOOT (1, or more after the
# guest rebooted itself: a guest that resets, as an OCFS2 node fencing itself does, boots again and runs the
# command again, with the same disk (a new qemu process: see boot_guest); so does a guest whose kernel locks up
# for a minute). A guest stops when its command exits.
#   bash scripts/vm/run-pair.sh [--memory MiB] [--cpus N] [--disk MiB] [--timeout SECONDS] [--keep DIR] -- COMMAND...
# --keep DIR: copy the shared directory and both guests' consoles to DIR at the end (for a post-mortem).
# Prints alice's output, then bob's, each line prefixed with the node's name. Exit code: 0 when both commands
# exited 0, else the first non-zero one (alice's first), 124 when a guest did not finish in time, 125 when a guest
# could not run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kit=${DRBDTS_VM_KIT:-/var/cache/drbdts/vm}
memory=1536
cpus=1
disk_mib=320
timeout=600
keep=
usage="usage: run-pair.sh [--memory MiB] [--cpus N] [--disk MiB] [--timeout S] [--keep DIR] -- COMMAND..."
while [ $# -gt 0 ]; do
  case "$1" in
    --memory) memory=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --disk) disk_mib=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "run-pair.sh: unknown option $1 ($usage)" >&2; exit 125 ;;
  esac
done
[ $# -gt 0 ] || { echo "run-pair.sh: no command given ($usage)" >&2; exit 125; }
. "$here/lib.sh"
vm_accel_args run-pair.sh || exit 125
bash "$here/build-kit.sh" "$kit" >&2
top=$(mktemp -d /tmp/drbdts-pair.XXXXXX)
pids=()
cleanup() {
  # Each boot_guest, and the timeout (which passes the signal on to qemu) it runs.
  for pid in "${pids[@]}"; do pkill -TERM -P "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$top"
}
trap cleanup EXIT
mkdir -p "$top/shared"
declare -A address=([alice]=10.99.0.1 [bob]=10.99.0.2)
declare -A peer=([alice]=bob [bob]=alice)
declare -A mac=([alice]=52:54:00:99:00:01 [bob]=52:54:00:99:00:02)
deadline=$(($(date +%s) + timeout))
# Boots a guest until its command has finished: a guest that resets (a panic, o2cb's fence, the lockup watchdog)
# makes qemu exit (-no-reboot) without an rc file, and a fresh qemu boots it again with the same disk and run
# directory. A fresh process, not qemu's in-place reset: guests reset in place were seen hanging early in their
# next boot on this emulated CPU. At most 4 boots; 124 when the deadline passes.
boot_guest() {
  local node=$1 boots=0 status
  shift
  while [ ! -f "$top/$node/rc" ]; do
    boots=$((boots + 1))
    [ "$boots" -le 4 ] || { echo "run-pair.sh: $node reset $((boots - 1)) times, not booting it again" >&2; return 125; }
    local left=$((deadline - $(date +%s)))
    [ "$left" -gt 0 ] || return 124
    set +e
    timeout --kill-after=10 "$left" "$@"
    status=$?
    set -e
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then return 124; fi
    [ -f "$top/$node/rc" ] || echo "run-pair.sh: $node reset (qemu exit $status): booting it again" >&2
  done
}
for node in alice bob; do
  rundir="$top/$node"
  mkdir -p "$rundir"
  truncate -s "${disk_mib}M" "$rundir/disk.img"
  vm_write_command "$rundir" DRBDTS_VM_NODE="$node" DRBDTS_VM_PEER="${peer[$node]}" \
    DRBDTS_VM_ADDRESS="${address[$node]}" DRBDTS_VM_PEER_ADDRESS="${address[${peer[$node]}]}" \
    DRBDTS_VM_DISK=/dev/vda DRBDTS_VM_SHARED="$top/shared" -- "$@"
  # A guest whose kernel livelocks resets itself, as a node's hardware watchdog would reset it (OCFS2's I/O-error
  # path, its /dev/nbd0's server killed, must not leave a node hanging where o2cb's fence would not run). The
  # soft-lockup threshold is 2 x watchdog_thresh = 60 s: an emulated vCPU starved by a busy host for tens of
  # seconds must not count. The console (loglevel 5) keeps a panic's trace.
  vm_qemu_args "$rundir" "$memory" "$cpus" "drbdts.shared=$top/shared" "drbdts.ip=${address[$node]}/24" \
    loglevel=5 softlockup_panic=1 watchdog_thresh=30
  boot_guest "$node" "${qemu_args[@]}" -no-reboot \
    -virtfs "local,path=$top/shared,mount_tag=shared,security_model=none" \
    -drive "file=$rundir/disk.img,format=raw,if=virtio,cache=writeback" \
    -netdev "dgram,id=link,local.type=unix,local.path=$top/$node.link,remote.type=unix,remote.path=$top/${peer[$node]}.link" \
    -device "virtio-net-pci,netdev=link,mac=${mac[$node]}" &
  pids+=($!)
done
declare -A qemu_rc
set +e
wait "${pids[0]}"; qemu_rc[alice]=$?
wait "${pids[1]}"; qemu_rc[bob]=$?
set -e
pids=()
if [ -n "$keep" ]; then
  mkdir -p "$keep"
  cp -r "$top/shared/." "$keep/"
  for node in alice bob; do cp "$top/$node/console.log" "$keep/console-$node.log" 2>/dev/null || true; done
fi
result=0
for node in alice bob; do
  rundir="$top/$node"
  if [ -f "$rundir/output" ]; then sed "s/^/$node| /" "$rundir/output"; fi
done
for node in alice bob; do
  rundir="$top/$node"
  if [ "${qemu_rc[$node]}" = 124 ] || [ "${qemu_rc[$node]}" = 137 ]; then
    echo "run-pair.sh: $node did not finish within ${timeout}s; its console:" >&2
    tail -n 30 "$rundir/console.log" | sed "s/^/$node console| /" >&2
    [ "$result" != 0 ] || result=124
  elif [ ! -f "$rundir/rc" ]; then
    echo "run-pair.sh: $node stopped without finishing its command (exit ${qemu_rc[$node]}); its console:" >&2
    tail -n 30 "$rundir/console.log" | sed "s/^/$node console| /" >&2
    [ "$result" != 0 ] || result=125
  else
    rc=$(cat "$rundir/rc")
    [ "$rc" = 0 ] || echo "run-pair.sh: $node's command exited $rc (boots: $(cat "$rundir/boots"))" >&2
    [ "$result" != 0 ] || result=$rc
  fi
done
exit "$result"
