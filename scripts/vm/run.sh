#!/usr/bin/env bash
# Runs a command inside a throwaway KVM virtual machine that has Debian's stock kernel (with the nbd module
# this host's kernel lacks) and this machine's file system as its root: read-only over 9p, with a tmpfs overlay,
# so the command sees the same repository, node and tools, and nothing it writes reaches the host. The VM has
# no network device at all (only its own loopback). Its output is printed; its exit code is ours.
#   bash scripts/vm/run.sh [--memory MiB] [--cpus N] [--timeout SECONDS] -- COMMAND [ARG...]
# The kit (kernel + initramfs) is built on first use by scripts/vm/build-kit.sh. The CPU is emulated (qemu's TCG,
# one host thread per virtual CPU): /dev/kvm exists on this workplace's machines but a guest kernel hangs there
# right after decompression (nested virtualisation is not really offered), so KVM is opt-in: DRBDTS_VM_ACCEL=kvm.
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
accel=${DRBDTS_VM_ACCEL:-tcg}
case "$accel" in
  tcg) accel_args=(-accel tcg,thread=multi -cpu max) ;;
  kvm) accel_args=(-enable-kvm -cpu host) ;;
  *) echo "run.sh: DRBDTS_VM_ACCEL must be tcg or kvm, not $accel" >&2; exit 125 ;;
esac
bash "$here/build-kit.sh" "$kit" >&2
rundir=$(mktemp -d /tmp/drbdts-vm.XXXXXX)
trap 'rm -rf "$rundir"' EXIT
pwd > "$rundir/cwd"
{
  echo 'set -e'
  # The caller's environment, less what names this host's session.
  export -p | grep -v -E '^declare -x (PWD|OLDPWD|SHLVL|_|TERM|DISPLAY|SSH_[A-Z_]*)=' || true
  printf 'exec'
  printf ' %q' "$@"
  echo
} > "$rundir/cmd.sh"
set +e
timeout --kill-after=10 "$timeout" qemu-system-x86_64 "${accel_args[@]}" -m "$memory" -smp "$cpus" \
  -kernel "$kit/vmlinuz" -initrd "$kit/initrd.gz" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 drbdts.rundir=$rundir" \
  -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
  -virtfs "local,path=$rundir,mount_tag=run,security_model=none" \
  -nic none -display none -monitor none -serial "file:$rundir/console.log" -no-reboot
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
