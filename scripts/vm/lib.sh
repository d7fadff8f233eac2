# Shared by scripts/vm/run.sh and scripts/vm/run-pair.sh (sourced, not run).

# The CPU is emulated: qemu's TCG, one host thread per virtual CPU. /dev/kvm exists on this workplace's machines,
# but it is PVM (pagetable-based virtualisation, "kvm-pvm" in the host's kernel log, no vmx/svm CPU flag), which runs
# only guest kernels built for PVM: `-enable-kvm -cpu host` aborts at start ("failed to set MSR 0x10a"), and
# Debian's kernel under PVM was measured about 1000 times slower than under TCG. So there is no KVM choice.
vm_accel_args() {
  case "${DRBDTS_VM_ACCEL:-tcg}" in
    tcg) accel_args=(-accel tcg,thread=multi -cpu max) ;;
    kvm)
      echo "$1: DRBDTS_VM_ACCEL=kvm is not offered: /dev/kvm here is PVM, which runs only PVM-built guest kernels;" \
        "qemu -enable-kvm -cpu host aborts with \"failed to set MSR 0x10a\" (unset DRBDTS_VM_ACCEL to use TCG)" >&2
      return 1 ;;
    *) echo "$1: DRBDTS_VM_ACCEL must be tcg (the only choice), not $DRBDTS_VM_ACCEL" >&2; return 1 ;;
  esac
}

# vm_write_command RUNDIR [NAME=VALUE...] -- COMMAND [ARG...]: what the guest's init runs (RUNDIR/cmd.sh, in the
# caller's working directory): the caller's environment, less what names this host's session, plus the NAME=VALUEs.
vm_write_command() {
  local rundir=$1
  shift
  pwd > "$rundir/cwd"
  {
    echo 'set -e'
    export -p | grep -v -E '^declare -x (PWD|OLDPWD|SHLVL|_|TERM|DISPLAY|SSH_[A-Z_]*)=' || true
    while [ "$1" != -- ]; do printf 'export %q\n' "$1"; shift; done
    shift
    printf 'exec'
    printf ' %q' "$@"
    echo
  } > "$rundir/cmd.sh"
}

# vm_qemu_args RUNDIR MEMORY CPUS [KERNEL_PARAMETER...]: the qemu command line (in qemu_args) of a guest booting the
# kit with the host's root and RUNDIR shared; the caller adds devices and the time limit.
vm_qemu_args() {
  local rundir=$1 memory=$2 cpus=$3
  shift 3
  qemu_args=(qemu-system-x86_64 "${accel_args[@]}" -m "$memory" -smp "$cpus"
    -kernel "$kit/vmlinuz" -initrd "$kit/initrd.gz"
    -append "console=ttyS0 quiet loglevel=3 panic=-1 drbdts.rundir=$rundir $*"
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
    -virtfs "local,path=$rundir,mount_tag=run,security_model=none"
    -display none -monitor none
    -chardev "file,id=console,path=$rundir/console.log,append=on" -serial chardev:console)
}
