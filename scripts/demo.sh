#!/usr/bin/env bash
# The README's main job, on one machine: two drbdts nodes (alice, bob) replicating a 256 MiB resource with
# protocol C over loopback. Initial full sync, random data written through NBD (nbdcopy + qemu-io) to the
# Primary, the Secondary killed with SIGKILL while the Primary keeps writing, the Secondary restarted, the resync
# of only the dirty blocks shown with `drbdts resync --wait`, and both replicas hashed and compared.
# Exits 0 only if all of that holds. DEMO_SKIP_SETUP=1 skips scripts/setup.sh (already built).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ "${DEMO_SKIP_SETUP:-0}" != 1 ]; then
  bash scripts/setup.sh
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/drbdts-demo.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  if [ "${DEMO_KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { echo "DEMO FAILED: $*" >&2; exit 1; }
drbdts() { node "$ROOT/bin/drbdts.js" "$@"; }

# Two free loopback ports for the replication link, chosen by the OS.
read -r PORT_A PORT_B < <(node -e '
  const net = require("net"); const ports = [];
  const grab = () => { const s = net.createServer().listen(0, "127.0.0.1", () => {
    ports.push(s.address().port); s.close(); if (ports.length < 2) grab(); else console.log(ports.join(" ")); }); };
  grab();')

SIZE_MIB=256
CONFIG=$WORK/r0.toml
cat > "$CONFIG" <<EOF
# Embedded demo config: identical for both nodes (as on a real pair).
[resource]
name = "r0"
protocol = "C"
shared-secret = "demo-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"

[disk]
size = "${SIZE_MIB}MiB"

[net]
ping-timeout = "2s"

[resync]
rate = "32MiB"   # slow enough that the progress of the resync is visible

[node.alice]
address = "127.0.0.1:$PORT_A"
disk = "$WORK/alice.img"
meta-disk = "internal"
nbd = "unix:$WORK/alice.nbd"
control = "$WORK/alice.ctl"

[node.bob]
address = "127.0.0.1:$PORT_B"
disk = "$WORK/bob.img"
meta-disk = "internal"
nbd = "unix:$WORK/bob.nbd"
control = "$WORK/bob.ctl"
EOF
export DRBDTS_LOG_LEVEL=${DRBDTS_LOG_LEVEL:-warn}
A=(--config "$CONFIG" --node alice)
B=(--config "$CONFIG" --node bob)

start_node() { # name -> pid in NODE_PID
  node "$ROOT/bin/drbdts.js" up r0 --config "$CONFIG" --node "$1" >>"$WORK/$1.log" 2>&1 &
  NODE_PID=$!
  PIDS+=("$NODE_PID")
  for _ in $(seq 100); do
    [ -S "$WORK/$1.ctl" ] && drbdts status r0 --config "$CONFIG" --node "$1" >/dev/null 2>&1 && return 0
    kill -0 "$NODE_PID" 2>/dev/null || { cat "$WORK/$1.log"; fail "node $1 exited"; }
    sleep 0.1
  done
  fail "node $1 did not come up"
}
wait_connected() { # node
  for _ in $(seq 300); do
    drbdts status r0 --config "$CONFIG" --node "$1" --json | grep -q '"connection": "\(Connected\|SyncSource\|SyncTarget\)"' && return 0
    sleep 0.1
  done
  fail "the nodes did not connect"
}
data_hash() { head -c $((SIZE_MIB * 1024 * 1024)) "$1" | sha256sum | cut -d' ' -f1; }

step "create metadata on both nodes (backing files are created: ${SIZE_MIB} MiB data + metadata)"
drbdts create-md r0 "${A[@]}"
drbdts create-md r0 "${B[@]}"

step "bring both nodes up; they authenticate and connect (fresh pair: both Inconsistent)"
start_node alice; ALICE=$NODE_PID
start_node bob; BOB=$NODE_PID
wait_connected alice
drbdts status r0 "${A[@]}"

step "alice becomes Primary with --force: her data is the good copy; full initial sync to bob"
drbdts primary r0 "${A[@]}" --force
drbdts resync r0 "${B[@]}" --wait
drbdts status r0 "${A[@]}"

step "write 64 MiB of random data through NBD to alice (nbdcopy), and patterns with qemu-io"
head -c $((64 * 1024 * 1024)) /dev/urandom > "$WORK/random.bin"
nbdcopy "$WORK/random.bin" "nbd+unix:///?socket=$WORK/alice.nbd"
qemu-io -f raw -c "write -P 0x5a 100M 8M" -c "write -P 0xa5 200M 4K" "nbd+unix:///?socket=$WORK/alice.nbd" | grep -v '^wrote' || true
qemu-io -f raw -c "read -P 0x5a 100M 8M" "nbd+unix:///?socket=$WORK/alice.nbd" | grep -q 'read 8388608/8388608' \
  || fail "qemu-io could not read back its pattern"
[ "$(data_hash "$WORK/alice.img")" = "$(data_hash "$WORK/bob.img")" ] || fail "replicas differ after connected writes"
echo "replicas identical after writes while connected"

step "SIGKILL bob (the Secondary); alice keeps serving and marks what bob misses"
kill -KILL "$BOB"
wait "$BOB" 2>/dev/null || true
head -c $((64 * 1024 * 1024)) /dev/urandom > "$WORK/more.bin"
nbdcopy "$WORK/more.bin" "nbd+unix:///?socket=$WORK/alice.nbd"
qemu-io -f raw -c "write -P 0x33 150M 2M" -c "write -P 0x44 250M 64K" "nbd+unix:///?socket=$WORK/alice.nbd" >/dev/null
drbdts status r0 "${A[@]}"
DIRTY=$(drbdts status r0 "${A[@]}" --json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).outOfSyncBytes))')
echo "alice: $((DIRTY / 1024)) KiB out of sync with bob"

step "restart bob: it reconnects, the UUIDs say alice is the source, only the dirty blocks are resynced"
start_node bob; BOB=$NODE_PID
wait_connected bob
drbdts resync r0 "${B[@]}" --wait
RECEIVED=$(drbdts status r0 "${B[@]}" --json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).counters.resyncReceivedBytes))')
echo "bob received $((RECEIVED / 1024)) KiB of resync traffic for $((DIRTY / 1024)) KiB out of sync (lz4 where it pays)"
[ "$RECEIVED" -le $((DIRTY + DIRTY / 20 + 65536)) ] || fail "resync sent more than the dirty blocks"
drbdts status r0 "${B[@]}"

step "verify: both data areas hashed"
drbdts secondary r0 "${A[@]}"
drbdts down r0 "${A[@]}"
drbdts down r0 "${B[@]}"
HA=$(data_hash "$WORK/alice.img"); HB=$(data_hash "$WORK/bob.img")
echo "alice: $HA"
echo "bob:   $HB"
[ "$HA" = "$HB" ] || fail "the replicas differ"
echo
echo "DEMO OK: initial sync, replicated writes, Secondary killed and resynced from the bitmap, replicas identical"
