# Sourced by the two-guest scenarios (test/vm/*.sh), which scripts/vm/run-pair.sh runs in both guests at once:
# names, logging, checks, the meeting points of the two guests (files in the shared directory), and the drbdts
# resource r0 between them: one config, identical on both nodes (allow-two-primaries unless the scenario sets
# allow_two_primaries=false first), each node's own virtio disk as backing device, its export attached to the
# kernel NBD client /dev/nbd0 while Primary.
set -euo pipefail
node=${DRBDTS_VM_NODE:?run by scripts/vm/run-pair.sh}
peer=$DRBDTS_VM_PEER
shared=$DRBDTS_VM_SHARED
boot=$DRBDTS_VM_BOOT
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# The replicated device's size: the virtio disk (run-pair.sh --disk) less room for drbdts's internal metadata.
size_mib=${SIZE_MIB:-256}
# Dual-primary (OCFS2) unless the scenario says otherwise before sourcing this file.
allow_two_primaries=${allow_two_primaries:-true}

say() { echo "$(cut -d' ' -f1 /proc/uptime)s $node: $*"; }
# A checked step that held: the vitest test looks for each one by name.
ok() { say "OK $*"; }
fail() {
  say "FAIL $*"
  : > "$shared/failed.$node"
  [ ! -f "$shared/drbdts-$node.log" ] || { say "last lines of drbdts log:"; tail -n 20 "$shared/drbdts-$node.log"; }
  exit 1
}
# A command that fails outside of `must` ends the scenario too (set -e), named with its line.
failed_command=
trap 'failed_command="${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR
trap 'status=$?; [ "$status" = 0 ] || [ -e "$shared/failed.$node" ] || fail "$failed_command exited $status"' EXIT
# Meeting points: `arrive NAME` tells the peer this node got to NAME; `meet NAME [SECONDS]` arrives and waits for
# the peer to arrive too (or fails when the peer failed or did not come in time).
arrive() { : > "$shared/at.$1.$node"; }
await() {
  local name=$1 seconds=${2:-180} waited=0
  until [ -e "$shared/at.$name.$peer" ]; do
    [ ! -e "$shared/failed.$peer" ] || fail "waiting for $peer at $name: $peer failed"
    [ "$waited" -lt $((seconds * 5)) ] || fail "$peer did not reach $name within ${seconds}s"
    sleep 0.2
    waited=$((waited + 1))
  done
}
meet() { arrive "$1"; await "$@"; }
# Runs a command; on failure, fails the scenario with its output.
must() {
  local output
  output=$("$@" 2>&1) || fail "$* exited $?: $output"
  [ -z "$output" ] || printf '%s\n' "$output"
}
# Polls until `$@` succeeds, for at most SECONDS.
wait_until() {
  local what=$1 seconds=$2 waited=0
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ ! -e "$shared/failed.$peer" ] || fail "waiting for $what: $peer failed"
    [ "$waited" -lt $((seconds * 5)) ] || fail "$what: not within ${seconds}s"
    sleep 0.2
    waited=$((waited + 1))
  done
}

drbdts() { node "$repo/bin/drbdts.js" "$@"; }
is() { [ "$(drbdts "$1" r0 2>/dev/null)" = "$2" ]; }
attached() { [ -e /sys/block/nbd0/pid ]; }

# The node's name is the host name: drbdts and o2cb both find the local node from it.
hostname "$node"
mkdir -p /etc/drbdts /run/drbdts
cat > /etc/drbdts/r0.toml <<EOF
[resource]
name = "r0"
protocol = "C"
shared-secret = "two-guests"

[disk]
size = "${size_mib}MiB"

[net]
allow-two-primaries = $allow_two_primaries
ping-timeout = "3s"

[node.alice]
address = "10.99.0.1:7789"
disk = "/dev/vda"
nbd = "unix:/run/drbdts/r0-alice.nbd"
device = "/dev/nbd0"

[node.bob]
address = "10.99.0.2:7789"
disk = "/dev/vda"
nbd = "unix:/run/drbdts/r0-bob.nbd"
device = "/dev/nbd0"
EOF

# Starts this node's daemon in the background (its log in the shared directory), waits for its control socket.
drbdts_pid=
start_drbdts() {
  # node itself, not the drbdts function: $! must be the daemon's pid (the scenarios SIGKILL it).
  node "$repo/bin/drbdts.js" up r0 >> "$shared/drbdts-$node.log" 2>&1 &
  drbdts_pid=$!
  wait_until "drbdts up on $node" 60 drbdts role r0
}

# The data area of this node's disk (the device's size; internal metadata after it), hashed.
data_hash() { head -c "${1:-$((size_mib * 1024 * 1024))}" /dev/vda | sha256sum | cut -d' ' -f1; }

mnt=/mnt/r0
# The replicated block device: drbdts's kernel NBD client (a scenario may use kernel DRBD's /dev/drbd0 instead).
dev=/dev/nbd0
# mount_r0 FSTYPE: $dev at $mnt.
mount_r0() {
  mkdir -p "$mnt"
  must mount -t "$1" "$dev" "$mnt"
  mountpoint -q "$mnt" || fail "$mnt is not mounted"
}

# Checks every "SHA256  PATH" line of manifest files: PATH exists under the mount and has that content.
check_manifest() {
  local manifest line hash file count=0
  for manifest in "$@"; do
    while read -r hash file; do
      [ -f "$mnt/$file" ] || fail "$file (from $(basename "$manifest")) is missing"
      [ "$(sha256sum < "$mnt/$file" | cut -c1-64)" = "$hash" ] || fail "$file (from $(basename "$manifest")) has other content"
      count=$((count + 1))
    done < "$manifest"
  done
  checked=$count
}
record() { echo "$(sha256sum < "$mnt/$1" | cut -c1-64)  $1" >> "$2"; }

# A writer that runs until STOPFILE exists: each file written, fsynced, renamed into place and its directory
# fsynced before it is recorded in MANIFEST (so a recorded file is one the application was told is durable).
writer() {
  local dir=$1 manifest=$2 stop=$3 i=0
  mkdir -p "$mnt/$dir"
  while [ ! -e "$stop" ]; do
    i=$((i + 1))
    if head -c $(((RANDOM % 64 + 1) * 1024)) /dev/urandom > "$mnt/$dir/.w$i" && sync "$mnt/$dir/.w$i" \
      && mv "$mnt/$dir/.w$i" "$mnt/$dir/w$i" && sync "$mnt/$dir"; then
      record "$dir/w$i" "$manifest"
    fi
    sleep 0.1
  done
}
