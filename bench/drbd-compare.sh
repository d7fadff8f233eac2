#!/usr/bin/env bash
# drbdts against kernel DRBD 8.4 (Debian's stock kernel module), both in one throwaway VM (scripts/vm/run.sh):
# two DRBD resources in one kernel are each other's peer over 127.0.0.1 (drbdsetup, no drbdadm host names), and
# two drbdts nodes likewise. Everything lives in the VM's tmpfs; the VM has no network device.
#   bash bench/drbd-compare.sh [--no-perf] [--runtime S] [--out FILE]
# 1. Behaviour: the same operator scenario on both (fresh pair, forced promotion and initial sync, a second
#    Primary refused, disconnect + write + reconnect resyncing only the dirty blocks, a role switch, a split brain
#    and its resolution with --discard-my-data), the roles, connection and disk states of both nodes after each
#    step side by side, and whether they agree.
# 2. Performance (unless --no-perf): fio through the kernel block layer on both, direct I/O: the raw backing
#    device, DRBD protocol C on /dev/drbd0, `drbdts serve --device /dev/nbd0` and a drbdts protocol C Primary's
#    /dev/nbd0. The VM's CPU is emulated (TCG; KVM guests hang on this workplace's machines), so absolute figures
#    say little and even the ratios carry the emulator's bias: every instruction is translated, and JIT-compiled
#    JavaScript is translated again each time V8 regenerates it. Read them as an emulated-CPU comparison only.
# Needs drbd-utils (drbdsetup-84, drbdmeta) on the host: installed by scripts/install-system.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
if [ "${1:-}" != --inside ]; then
  out=""
  args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --out) out=$2; shift 2 ;;
      --no-perf|--runtime) args+=("$1"); if [ "$1" = --runtime ]; then args+=("$2"); shift; fi; shift ;;
      *) echo "drbd-compare.sh: unknown option $1" >&2; exit 2 ;;
    esac
  done
  command -v drbdmeta >/dev/null && [ -x /usr/lib/drbd/drbdsetup-84 ] || {
    echo "drbd-compare.sh: drbd-utils is missing (apt-get install drbd-utils, or bash scripts/install-system.sh)" >&2; exit 2; }
  [ -f "$root/dist/cli/main.js" ] || { echo "drbd-compare.sh: build first (npm run build)" >&2; exit 2; }
  rc=0
  result=$(bash "$root/scripts/vm/run.sh" --memory 3072 --cpus 2 --timeout 1500 -- bash "$here/drbd-compare.sh" --inside "${args[@]}") || rc=$?
  echo "$result"
  if [ -n "$out" ]; then echo "$result" > "$out"; fi
  exit "$rc"
fi
shift
perf=1
runtime=10
while [ $# -gt 0 ]; do
  case "$1" in
    --no-perf) perf=0; shift ;;
    --runtime) runtime=$2; shift 2 ;;
    *) shift ;;
  esac
done

S=/usr/lib/drbd/drbdsetup-84
W=$(mktemp -d /tmp/drbd-compare.XXXXXX)
mkdir -p /run/lock /var/lock 2>/dev/null || true
SIZE_MIB=128
RESYNC_RATE=${RESYNC_RATE:-16M}
# Progress goes to the VM's console, which run.sh shows if the VM times out.
log() { echo "drbd-compare: $*" > /dev/console 2>/dev/null || true; }
drbdts() { node "$root/bin/drbdts.js" "$@"; }

# ---------------------------------------------------------------- kernel DRBD (minor 0 = A, minor 1 = B)
k_addr=(ipv4:127.0.0.1:7790 ipv4:127.0.0.1:7791)
k_setup() {
  # No drbd.conf in the VM: the kernel's handler calls (drbdadm before-resync-source ...) would fail and drop the
  # connection; drbdsetup drives everything, so the handler is a no-op.
  echo /bin/true > /sys/module/drbd/parameters/usermode_helper
  for m in 0 1; do
    truncate -s ${SIZE_MIB}M "$W/k$m.img"
    losetup "/dev/loop$m" "$W/k$m.img"
    { yes 2>/dev/null || true; } | drbdmeta --force "$m" v08 "/dev/loop$m" internal create-md >/dev/null 2>&1
    $S new-resource "r$m" >/dev/null
    $S new-minor "r$m" "$m" 0 >/dev/null
    $S attach "$m" "/dev/loop$m" "/dev/loop$m" internal >/dev/null
    # 8.4's default resync rate is 250 KiB/s (and a dynamic controller): both get a fixed $RESYNC_RATE, slow
    # enough that the state during the initial sync can be seen with this VM's slow status calls.
    $S disk-options "$m" --c-plan-ahead=0 --resync-rate="$RESYNC_RATE" >/dev/null
  done
}
# `drbdadm up` attaches and connects; drbdsetup attach alone leaves the resource StandAlone.
k_up_connect() { k_connect 0; k_connect 1; }
k_connect() { # minor [--discard-my-data]
  local m=$1; shift
  $S connect "r$m" "${k_addr[$m]}" "${k_addr[$((1 - m))]}" --protocol=C "$@" >/dev/null
}
k_disconnect() { $S disconnect "${k_addr[$1]}" "${k_addr[$((1 - $1))]}" >/dev/null; }
k_primary() { $S primary "$1" "${@:2}" >/dev/null 2>&1; }
k_secondary() { $S secondary "$1" >/dev/null 2>&1; }
k_write() { dd if=/dev/urandom of="/dev/drbd$1" bs=1M count=1 seek="$2" oflag=direct status=none; }
k_state() { # minor -> "Role Cstate Dstate"
  local role cstate dstate
  role=$($S role "$1" | cut -d/ -f1); cstate=$($S cstate "$1"); dstate=$($S dstate "$1" | cut -d/ -f1)
  echo "$role $cstate $dstate"
}
k_wait_sync() {
  for _ in $(seq 1 300); do
    if [ "$($S dstate 0)" = UpToDate/UpToDate ] && [ "$($S cstate 0)" = Connected ]; then return 0; fi
    sleep 0.2
  done
  return 1
}
k_oos_kib() { sed -n "s/.*oos:\([0-9]*\).*/\1/p" /proc/drbd | sed -n "$(( $1 + 1 ))p"; }
k_down() { for m in 0 1; do $S down "r$m" >/dev/null 2>&1 || true; losetup -d "/dev/loop$m" 2>/dev/null || true; done; }

# ---------------------------------------------------------------- drbdts (alice = A, bob = B)
t_names=(alice bob)
t_pids=()
t_setup() { # [extra device lines]
  cat > "$W/r0.toml" <<EOF
[resource]
name = "r0"
protocol = "C"
shared-secret = "compare"
[disk]
size = "${SIZE_MIB}MiB"
[net]
ping-interval = "200ms"
ping-timeout = "2s"
connect-int = "200ms"
[resync]
rate = "${RESYNC_RATE}iB"
[node.alice]
address = "127.0.0.1:7792"
disk = "$W/alice.img"
meta-disk = "internal"
nbd = "unix:$W/alice.nbd"
control = "$W/alice.ctl"
${T_DEVICE_ALICE:-}
[node.bob]
address = "127.0.0.1:7793"
disk = "$W/bob.img"
meta-disk = "internal"
nbd = "unix:$W/bob.nbd"
control = "$W/bob.ctl"
EOF
  for n in alice bob; do
    rm -f "$W/$n.img"
    drbdts create-md r0 --config "$W/r0.toml" --node "$n" >/dev/null
  done
  for n in alice bob; do
    DRBDTS_LOG_LEVEL=warn node "$root/bin/drbdts.js" up r0 --config "$W/r0.toml" --node "$n" >"$W/$n.log" 2>&1 &
    t_pids+=($!)
  done
  for n in alice bob; do
    for _ in $(seq 1 300); do t_cli "$n" status >/dev/null 2>&1 && break; sleep 0.2; done
  done
}
t_cli() { local n=$1; shift; DRBDTS_LOG_LEVEL=warn node "$root/bin/drbdts.js" "$@" r0 --config "$W/r0.toml" --node "$n"; }
t_node() { echo "${t_names[$1]}"; }
# `drbdts up` is `drbdadm up`: it connects by itself.
t_up_connect() { :; }
t_connect() { t_cli "$(t_node "$1")" connect "${@:2}" >/dev/null; }
t_disconnect() { t_cli "$(t_node "$1")" disconnect >/dev/null; }
t_primary() { t_cli "$(t_node "$1")" primary "${@:2}" >/dev/null 2>&1; }
t_secondary() { t_cli "$(t_node "$1")" secondary >/dev/null 2>&1; }
t_write() { qemu-io -f raw -c "write -P 0x5a $(( $2 ))M 1M" "nbd+unix:///?socket=$W/$(t_node "$1").nbd" >/dev/null; }
# Under the emulated CPU every node process start costs seconds: one status call per query, parsed by sed (the
# first "role" and "disk" lines of status --json are the node's own, before the peer's).
t_json() { t_cli "$(t_node "$1")" status --json 2>/dev/null; }
t_field() { sed -n "s/^ *\"$1\": \"\{0,1\}\([^\",]*\).*/\1/p" | head -1; }
t_state() { local j; j=$(t_json "$1"); echo "$(t_field role <<< "$j") $(t_field connection <<< "$j") $(t_field disk <<< "$j")"; }
t_wait_sync() {
  for _ in $(seq 1 120); do
    if [ "$(t_state 0 | cut -d' ' -f2-)" = "Connected UpToDate" ] && [ "$(t_state 1 | cut -d' ' -f2-)" = "Connected UpToDate" ]; then
      return 0
    fi
    sleep 0.5
  done
  return 1
}
t_oos_kib() { echo $(( $(t_json "$1" | t_field outOfSyncBytes) / 1024 )); }
t_down() {
  for pid in "${t_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${t_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  t_pids=()
}

# ---------------------------------------------------------------- the scenario, once per implementation
# Each step prints "step|A state|B state|note" (state = role connection disk); $1 = k or t.
scenario() {
  local i=$1
  local sa sb note
  report() { sa=$(${i}_state 0); sb=$(${i}_state 1); log "$i: $1: $sa / $sb ${2:-}"; echo "$1|$sa|$sb|${2:-}"; }
  ${i}_up_connect
  sleep 2
  report "fresh metadata, connected"
  ${i}_primary 0 --force
  sleep 0.5
  report "primary --force on A (initial sync starts)"
  ${i}_wait_sync || note="sync did not finish"
  report "initial sync done" "${note:-}"
  if ${i}_primary 1; then note="allowed"; else note="refused"; fi
  report "primary on B while A is Primary" "$note"
  ${i}_disconnect 0
  sleep 1
  ${i}_write 0 8
  sleep 0.5
  report "A disconnected, 1 MiB written on A" "A out of sync: $(${i}_oos_kib 0) KiB"
  ${i}_connect 0
  ${i}_wait_sync || true
  report "A reconnected: resynced" "A out of sync: $(${i}_oos_kib 0) KiB"
  ${i}_secondary 0
  if ${i}_primary 1; then note="allowed"; else note="refused"; fi
  sleep 0.5
  report "secondary on A, then primary on B" "$note"
  ${i}_disconnect 1
  sleep 1
  ${i}_write 1 16
  ${i}_secondary 1
  ${i}_primary 0
  ${i}_write 0 24
  ${i}_secondary 0
  ${i}_connect 1
  sleep 3
  report "split brain: both wrote while disconnected, reconnect"
  ${i}_disconnect 0 2>/dev/null || true
  ${i}_disconnect 1 2>/dev/null || true
  sleep 0.5
  ${i}_connect 1 --discard-my-data
  ${i}_connect 0
  ${i}_wait_sync || true
  sleep 0.5
  report "connect --discard-my-data on B, connect on A"
}

echo "## behaviour (kernel DRBD $(sed -n 's/^version: \([^ ]*\).*/\1/p' /proc/drbd) vs drbdts $(node -p "require('$root/package.json').version"))"
k_setup
scenario k > "$W/k.txt" 2> "$W/k.err" || true
k_down
t_setup
scenario t > "$W/t.txt" 2> "$W/t.err" || true
t_down
echo
echo "| step | kernel DRBD A | kernel DRBD B | note | drbdts A | drbdts B | note | same |"
echo "|---|---|---|---|---|---|---|---|"
# DRBD 8.4 calls the state "waiting for the peer" WFConnection; DRBD 9, and drbdts, Connecting.
normalise() { sed 's/WFConnection/Connecting/g' <<< "$1"; }
paste -d'\n' "$W/k.txt" "$W/t.txt" | while IFS='|' read -r step ka kb knote && IFS='|' read -r _ ta tb tnote; do
  same=yes
  [ "$(normalise "$ka")" = "$ta" ] && [ "$(normalise "$kb")" = "$tb" ] || same=no
  echo "| $step | $ka | $kb | $knote | $ta | $tb | $tnote | $same |"
done
[ -s "$W/k.err" ] && { echo; echo "kernel DRBD stderr:"; sed 's/^/    /' "$W/k.err"; }
[ -s "$W/t.err" ] && { echo; echo "drbdts stderr:"; sed 's/^/    /' "$W/t.err"; }

[ "$perf" = 1 ] || exit 0

# ---------------------------------------------------------------- performance
fio_run() { # device job -> "MiB/s IOPS p50us"
  local dev=$1 job=$2 extra
  case "$job" in
    seqwrite-1m-qd8) extra="--rw=write --bs=1m --iodepth=8" ;;
    randwrite-4k-qd32) extra="--rw=randwrite --bs=4k --iodepth=32" ;;
    write-4k-qd1-fua) extra="--rw=randwrite --bs=4k --iodepth=1 --fsync=1" ;;
  esac
  # shellcheck disable=SC2086
  fio --name=j --filename="$dev" --ioengine=libaio --direct=1 $extra --size=$((SIZE_MIB / 2))M --time_based=1 \
    --runtime="$runtime" --output-format=json 2>/dev/null | node -e '
    let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
      const w = JSON.parse(s.slice(s.indexOf("{"))).jobs[0].write;
      const p50 = (w.clat_ns.percentile?.["50.000000"] ?? 0) / 1000;
      console.log(`${(w.bw_bytes / 1048576).toFixed(1)} ${Math.round(w.iops)} ${Math.round(p50)}`); });'
}
jobs=(seqwrite-1m-qd8 randwrite-4k-qd32 write-4k-qd1-fua)
declare -A result
# Raw backing device and kernel DRBD protocol C (A Primary, initial sync skipped).
k_setup
for job in "${jobs[@]}"; do result[raw,$job]=$(fio_run /dev/loop0 "$job"); done
k_up_connect; sleep 2
$S new-current-uuid 0 --clear-bitmap >/dev/null 2>&1 || true
k_wait_sync || true
k_primary 0
for job in "${jobs[@]}"; do result[drbd,$job]=$(fio_run /dev/drbd0 "$job"); done
k_down
# drbdts standalone: serve a file on /dev/nbd0 through the kernel NBD client.
truncate -s ${SIZE_MIB}M "$W/serve.img"
node "$root/bin/drbdts.js" serve "$W/serve.img" --listen "unix:$W/serve.sock" --device /dev/nbd0 >"$W/serve.log" 2>&1 &
serve=$!
for _ in $(seq 1 300); do [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" != 0 ] && break; sleep 0.2; done
for job in "${jobs[@]}"; do result[serve,$job]=$(fio_run /dev/nbd0 "$job"); done
kill -TERM "$serve"; wait "$serve" || true
# drbdts protocol C pair, alice Primary with /dev/nbd0 attached on promotion.
rm -f "$W"/alice.* "$W"/bob.*
T_DEVICE_ALICE='device = "/dev/nbd0"' t_setup
sleep 2
t_cli alice new-current-uuid --clear-bitmap >/dev/null
t_wait_sync || true
t_primary 0
for _ in $(seq 1 300); do [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" != 0 ] && break; sleep 0.2; done
for job in "${jobs[@]}"; do result[pair,$job]=$(fio_run /dev/nbd0 "$job"); done
t_secondary 0
t_down
echo
echo "## performance (emulated CPU, fio libaio direct=1, ${runtime} s per job, $(nproc) vCPUs)"
echo
echo "| job | raw loop | kernel DRBD C | DRBD / raw | drbdts serve | drbdts C pair | pair / serve | drbdts pair / DRBD |"
echo "|---|---|---|---|---|---|---|---|"
for job in "${jobs[@]}"; do
  node -e '
    const [job, raw, drbd, serve, pair] = process.argv.slice(1).map((v, i) => i === 0 ? v : v.split(" ").map(Number));
    const fua = job.includes("fua");
    const pick = (r) => fua ? r[2] : job.includes("4k") ? r[1] : r[0];
    const unit = fua ? " us p50" : job.includes("4k") ? " IOPS" : " MiB/s";
    const ratio = (a, b) => (fua ? pick(b) / pick(a) : pick(a) / pick(b)).toFixed(2);
    console.log(`| ${job} | ${pick(raw)}${unit} | ${pick(drbd)}${unit} | ${ratio(drbd, raw)} | ${pick(serve)}${unit} | ${pick(pair)}${unit} | ${ratio(pair, serve)} | ${ratio(pair, drbd)} |`);
  ' "$job" "${result[raw,$job]}" "${result[drbd,$job]}" "${result[serve,$job]}" "${result[pair,$job]}"
done
echo
echo "(ratios: throughput a / b, or for the QD1 flush latency b / a, so below 1 is always worse)"
