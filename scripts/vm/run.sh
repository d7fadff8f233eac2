#!/usr/bin/env bash
# Runs a command inside a throwaway virtual machine that has Debian's stock kernel (with the nbd module
# this host's kernel lacks) and this machine's file system as its root: read-only over 9p, with a tmpfs overlay,
# so the command sees the same repository, node and tools, and nothing it writes reaches the host. The VM has
# no network device at all (only its own loopback). Its output is printed; its exit code is ours.
#   bash scripts/vm/run.sh [--memory MiB] [--cpus N] [--timeout SECONDS] -- COMMAND [ARG...]
# The kit (kernel + initramfs) is built on first use by scripts/vm/build-kit.sh. The CPU is emulated (qemu's TCG;
# why not KVM: scripts/vm/lib.sh). Two VMs joined by a private link: scripts/vm/run-pair.sh.
# Exit codes: the command's, or 124 on time-out, 125 when the VM could not run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kit=${DRBDTS_VM_KIT:-/var/cache/drbdts/vm}
memory=2048
cpus=2
timeout=600
while [ $# -gt 0 ]; do
  case "$1" in
    --memory) memory=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "run.sh: unknown option $1 (usage: run.sh [--memory MiB] [--cpus N] [--timeout S] -- COMMAND...)" >&2; exit 125 ;;
  esac
done
[ $# -gt 0 ] || { echo "run.sh: no command given" >&2; exit 125; }
. "$here/lib.sh"
vm_accel_args run.sh || exit 125
bash "$here/build-kit.sh" "$kit" >&2
rundir=$(mktemp -d /tmp/drbdts-vm.XXXXXX)
trap 'rm -rf "$rundir"' EXIT
vm_write_command "$rundir" -- "$@"
vm_qemu_args "$rundir" "$memory" "$cpus"
set +e
timeout --kill-after=10 "$timeout" "${qemu_args[@]}" -nic none -no-reboot
qemu_rc=$?
set -e
if [ -f "$rundir/output" ]; then cat "$rundir/output"
elif [ -f "$rundir/rc" ]; then echo "run.sh: the command did not start inside the VM (cannot enter $(pwd) there?)" >&2
fi
if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
  echo "run.sh: the VM did not finish within ${timeout}s; its console:" >&2
  tail -n 30 "$rundir/console.log" >&2
  exit 124
fi
if [ ! -f "$rundir/rc" ]; then
  echo "run.sh: the VM stopped without running the command (qemu exit $qemu_rc); its console:" >&2
  tail -n 30 "$rundir/console.log" >&2
  exit 125
fi
exit "$(cat "$rundir/rc")"
