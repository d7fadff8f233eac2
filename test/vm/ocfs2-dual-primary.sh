#!/usr/bin/env bash
# OCFS2 on a dual-primary drbdts resource across two guests, each with its own kernel, o2cb cluster stack and kernel
# NBD client: run in both guests at once by scripts/vm/run-pair.sh (test/kernel-vm-cluster.test.ts), following
# docs/operators.md's "Dual-primary OCFS2" recipe. Every check that holds prints "OK <what>"; the first that does not
# prints "FAIL <why>" and exits 1 (the peer then fails too, at its next meeting point).
#   1. r0 dual-primary, /dev/nbd0 attached on both; o2cb cluster of the two; mkfs.ocfs2 -N 2 once; mounted on both.
#   2. Both write into one tree at once: files of their own, disjoint blocks of one shared file, flock-ed appends to
#      one log and a flock-ed read-modify-write counter, renames (of their own files and across: each renames one of
#      the other's); each then reads everything and the checksums agree.
#   3. alice's drbdts is SIGKILLed while both write. Her guest resets itself: her OCFS2 panics at its first failed
#      journal write (errors=panic), or o2cb fences her once her heartbeat writes have failed for the timeout
#      (run-pair.sh boots her again: this script, DRBDTS_VM_BOOT=2); bob's o2hb sees her heartbeat stop, the DLM
#      recovers, bob replays her journal, and bob's writes go on on his mount.
#   4. alice (boot 2) starts drbdts again: resync from bob, UpToDate, primary, o2cb, mount; every file whose write
#      was synced before the kill and every file bob wrote meanwhile is there, checksums agreeing.
#   5. Both unmount; fsck.ocfs2 -fn is clean on each; both demote and stop; the data areas hash identical.
# BACKEND=drbd runs the same scenario on kernel DRBD 8.4 (/dev/drbd0, drbdsetup) as a control; there a kernel
# module cannot be SIGKILLed, so alice's kernel is crashed instead (sysrq c), which her node's reset comes to anyway.
. "$(dirname "$0")/pair-lib.sh"
# Iterations of 2 s before o2hb declares a node dead (o2cb's default is 31, a minute): the same on both nodes.
heartbeat_dead_threshold=${HEARTBEAT_DEAD_THRESHOLD:-11}
# Rounds of the concurrent phase: each writes a file, a block of the shared file, a flock-ed line and count.
rounds=${ROUNDS:-12}
say "boot $boot"
backend=${BACKEND:-drbdts}
S=/usr/lib/drbd/drbdsetup-84
k_is() { [ "$($S "$1" 0 2>/dev/null)" = "$2" ]; }
if [ "$backend" = drbd ]; then
  dev=/dev/drbd0
  mkdir -p /run/lock /var/lock
  # No drbd.conf here: the kernel's handler calls (drbdadm before-resync-source ...) would fail and drop the
  # connection; drbdsetup drives everything, so the handler is a no-op.
  echo /bin/true > /sys/module/drbd/parameters/usermode_helper
fi
# The resource's steps, on drbdts or kernel DRBD.
replica_connect() { # fresh: create the metadata; else attach the existing one
  if [ "$backend" = drbd ]; then
    if [ "$1" = fresh ]; then
      { yes 2>/dev/null || true; } | drbdmeta --force 0 v08 /dev/vda internal create-md >/dev/null 2>&1
    else
      # After a crash: the activity log into the bitmap first, as `drbdadm apply-al` does before attach.
      must drbdmeta 0 v08 /dev/vda internal apply-al
    fi
    must $S new-resource r0
    must $S new-minor r0 0 0
    must $S attach 0 /dev/vda /dev/vda internal
    must $S connect r0 "ipv4:$DRBDTS_VM_ADDRESS:7788" "ipv4:$DRBDTS_VM_PEER_ADDRESS:7788" --protocol=C --allow-two-primaries
    wait_until "Connected" 120 k_is cstate Connected
  else
    [ "$1" != fresh ] || must drbdts create-md r0
    start_drbdts
    wait_until "Connected" 120 is cstate Connected
  fi
}
replica_uptodate() {
  if [ "$backend" = drbd ]; then k_is dstate UpToDate/UpToDate; else is dstate UpToDate/UpToDate; fi
}
replica_primary() {
  if [ "$backend" = drbd ]; then
    must $S primary 0
  else
    must drbdts primary r0
    wait_until "/dev/nbd0 attached" 30 attached
  fi
}
replica_both_primary() {
  if [ "$backend" = drbd ]; then k_is role Primary/Primary; else
    is role Primary && [ "$(drbdts status r0 --json | node -e 'process.stdout.write(JSON.parse(require("fs").readFileSync(0)).peer.role)')" = Primary ]
  fi
}
dmesg --follow > "$shared/kernel-$node-boot$boot.log" 2>&1 &

# The recipe's o2cb part: configfs, dlmfs, the cluster description, the cluster registered with the local node
# found by host name, its heartbeat timeout.
o2cb_online() {
  mountpoint -q /sys/kernel/config || must mount -t configfs none /sys/kernel/config
  mkdir -p /dlm
  mountpoint -q /dlm || must mount -t ocfs2_dlmfs ocfs2_dlmfs /dlm
  [ "$(cat /sys/fs/ocfs2/cluster_stack)" = o2cb ] || fail "cluster stack is $(cat /sys/fs/ocfs2/cluster_stack), not o2cb"
  mkdir -p /etc/ocfs2
  cat > /etc/ocfs2/cluster.conf <<'EOF'
cluster:
	node_count = 2
	heartbeat_mode = local
	name = r0cluster

node:
	ip_port = 7777
	ip_address = 10.99.0.1
	number = 0
	name = alice
	cluster = r0cluster

node:
	ip_port = 7777
	ip_address = 10.99.0.2
	number = 1
	name = bob
	cluster = r0cluster
EOF
  must o2cb register-cluster r0cluster
  echo "$heartbeat_dead_threshold" > /sys/kernel/config/cluster/r0cluster/heartbeat/dead_threshold
  [ "$(cat /sys/kernel/config/cluster/r0cluster/node/$node/local)" = 1 ] || fail "o2cb does not take $node as the local node"
}

# The block this node writes at index K of the shared file: 64 KiB naming the node and K.
block() { yes "$1 block $2" | head -c 65536 || true; }  # yes ends on SIGPIPE

if [ "$boot" = 1 ]; then
  # ---- 1. the resource, dual-primary, and OCFS2 on both ----
  replica_connect fresh
  # Both disks are new and all zeros: nothing to sync.
  if [ "$node" = alice ]; then
    if [ "$backend" = drbd ]; then must $S new-current-uuid 0 --clear-bitmap; else must drbdts new-current-uuid r0 --clear-bitmap; fi
  fi
  wait_until "UpToDate/UpToDate" 60 replica_uptodate
  meet uptodate
  replica_primary
  meet primary
  replica_both_primary || fail "not both Primary"
  ok "dual-primary, $dev attached"
  o2cb_online
  ok "o2cb cluster online"
  if [ "$node" = alice ]; then must mkfs.ocfs2 -N 2 -b 4K -C 4K -J size=8M -L r0 "$dev"; fi
  meet mkfs 300
  mount_r0 ocfs2
  meet mounted 300
  nodes=$(mounted.ocfs2 -f "$dev")
  [[ "$nodes" == *"alice, bob"* || "$nodes" == *"bob, alice"* ]] || fail "mounted.ocfs2 does not list both nodes: $nodes"
  ok "OCFS2 mounted on both"

  # ---- 2. concurrent writes into one tree ----
  mkdir -p "$mnt/tree/$node"
  manifest="$shared/manifest-$node"
  : > "$manifest"
  for i in $(seq 1 "$rounds"); do
    head -c $(((RANDOM % 200 + 1) * 1024)) /dev/urandom > "$mnt/tree/$node/f$i"
    record "tree/$node/f$i" "$manifest"
    # Disjoint 64 KiB blocks of one file: alice the even ones, bob the odd ones.
    k=$(( 2 * (i - 1) + $([ "$node" = alice ] && echo 0 || echo 1) ))
    block "$node" "$k" | dd of="$mnt/tree/shared.bin" bs=65536 seek="$k" conv=notrunc status=none
    flock "$mnt/tree/log.txt" -c "echo '$node line $i' >> '$mnt/tree/log.txt'"
    flock "$mnt/tree/counter.lock" -c "n=\$(cat '$mnt/tree/counter' 2>/dev/null || echo 0); echo \$((n + 1)) > '$mnt/tree/counter'"
  done
  head -c 100000 /dev/urandom > "$mnt/tree/$node/.incoming"
  mv "$mnt/tree/$node/.incoming" "$mnt/tree/$node/renamed"
  record "tree/$node/renamed" "$manifest"
  sync
  say "wrote $rounds rounds"
  meet written
  # Each renames one of the other's files at the same time.
  mv "$mnt/tree/$peer/f1" "$mnt/tree/f1-of-$peer-moved-by-$node"
  sync
  meet renamed
  if [ "$node" = alice ]; then
    sed -i 's|  tree/alice/f1$|  tree/f1-of-alice-moved-by-bob|' "$shared/manifest-alice"
    sed -i 's|  tree/bob/f1$|  tree/f1-of-bob-moved-by-alice|' "$shared/manifest-bob"
  fi
  meet manifests-renamed
  [ ! -e "$mnt/tree/$node/f1" ] && [ ! -e "$mnt/tree/$peer/f1" ] || fail "a renamed file is still at its old name"
  check_manifest "$shared/manifest-alice" "$shared/manifest-bob"
  [ "$checked" = $((2 * rounds + 2)) ] || fail "checked $checked files, expected $((2 * rounds + 2))"
  expected=$(for k in $(seq 0 $((2 * rounds - 1))); do block "$([ $((k % 2)) = 0 ] && echo alice || echo bob)" "$k"; done | sha256sum | cut -c1-64)
  [ "$(sha256sum < "$mnt/tree/shared.bin" | cut -c1-64)" = "$expected" ] || fail "the shared file's blocks are not both nodes' writes"
  [ "$(grep -c '^alice line [0-9]*$' "$mnt/tree/log.txt")" = "$rounds" ] \
    && [ "$(grep -c '^bob line [0-9]*$' "$mnt/tree/log.txt")" = "$rounds" ] && [ "$(wc -l < "$mnt/tree/log.txt")" = $((2 * rounds)) ] \
    || fail "the flock-ed log is not $rounds whole lines of each: $(sort "$mnt/tree/log.txt" | uniq -c | head)"
  [ "$(cat "$mnt/tree/counter")" = $((2 * rounds)) ] || fail "the flock-ed counter is $(cat "$mnt/tree/counter"), not $((2 * rounds))"
  ok "cross-read: both nodes' files, the shared file, the flock-ed log and counter agree"
  meet cross-read

  # ---- 3. alice's drbdts killed while both write ----
  writer "during/$node" "$shared/during-$node" "$shared/stop-writers" 2>/dev/null &
  writer_pid=$!
  sleep 5
  meet writing
  if [ "$node" = alice ]; then
    [ -s "$shared/during-alice" ] || fail "alice's writer wrote nothing before the kill"
    if [ "$backend" = drbd ]; then
      say "crashing the kernel (sysrq c) while writing"
      : > "$shared/killed"
      echo 1 > /proc/sys/kernel/sysrq
      echo c > /proc/sysrq-trigger
    fi
    kill -9 "$drbdts_pid"
    say "killed drbdts (SIGKILL) while writing"
    : > "$shared/killed"
    # Writes to /dev/nbd0 now fail: OCFS2 panics at its first failed journal write, or o2cb fences this node
    # once its heartbeat writes have failed for the heartbeat timeout. Boot 2 goes on. Should neither happen,
    # that is a failure.
    sleep $((heartbeat_dead_threshold * 2 + 90))
    fail "alice did not reset after her drbdts died (no OCFS2 panic, no o2cb fence)"
  fi
  # bob: the survivor. Its o2hb sees alice's heartbeat stop, its DLM recovers, it replays her journal.
  wait_until "alice's drbdts killed" 60 test -e "$shared/killed"
  replayed() { grep -q 'End replay journal (node 0' "$shared/kernel-bob-boot1.log"; }
  wait_until "OCFS2 recovery of alice on bob" 180 replayed
  grep -E 'o2hb|o2net|o2dlm|ocfs2' "$shared/kernel-bob-boot1.log" | sed 's/^/  kernel: /'
  grep -q 'o2dlm: End recovery' "$shared/kernel-bob-boot1.log" || fail "no DLM recovery on bob"
  ok "bob recovered alice's journal after her death"
  written=$(wc -l < "$shared/during-bob")
  more() { [ "$(wc -l < "$shared/during-bob")" -ge $((written + 10)) ]; }
  wait_until "bob's writes after the recovery" 120 more
  mountpoint -q "$mnt" || fail "bob's mount is gone"
  ok "bob's writes go on after the recovery ($(wc -l < "$shared/during-bob") files)"
  : > "$shared/stop-writers"
  wait "$writer_pid" || true
  arrive survived
  # alice comes back (her boot 2).
  await remounted 400
else
  # ---- 4. alice after the fence: resync from bob, primary, remount ----
  [ "$node" = alice ] && [ "$boot" = 2 ] || fail "unexpected boot $boot of $node"
  grep -E 'o2hb|o2quo|ocfs2|fencing|soft lockup' "$shared/kernel-alice-boot1.log" | tail -n 8 | sed 's/^/  previous boot kernel: /'
  ok "alice was fenced and rebooted"
  await survived 300
  replica_connect existing
  wait_until "UpToDate/UpToDate after the resync" 300 replica_uptodate
  [ "$backend" = drbd ] || grep -q '"resync finished: UpToDate"' "$shared/drbdts-alice.log" || fail "no resync to alice in her log"
  ok "alice resynced from bob: UpToDate"
  replica_primary
  o2cb_online
  mount_r0 ocfs2
  ok "alice remounted"
  # Files synced before the kill (both), what bob wrote since, and the first phase's tree.
  check_manifest "$shared/during-alice" "$shared/during-bob" "$shared/manifest-alice" "$shared/manifest-bob"
  ok "alice reads every synced file: $checked, checksums agree"
  arrive remounted
fi

# ---- 5. unmount, fsck, the replicas identical ----
meet unmount 300
must umount "$mnt"
meet unmounted
# One at a time: fsck.ocfs2 takes the volume's cluster lock.
if [ "$node" = bob ]; then await fsck-alice 300; fi
must fsck.ocfs2 -fn "$dev"
ok "fsck.ocfs2 -fn clean"
arrive "fsck-$node"
if [ "$node" = alice ]; then await fsck-bob 300; fi
if [ "$backend" = drbd ]; then
  size_bytes=$(blockdev --getsize64 /dev/drbd0)
  must $S secondary 0
  meet secondary
  wait_until "UpToDate/UpToDate, nothing out of sync" 120 replica_uptodate
  meet demoted
  must $S down r0
  data_hash "$size_bytes" > "$shared/hash-$node"
else
  must drbdts secondary r0
  meet secondary
  wait_until "UpToDate/UpToDate, nothing out of sync" 120 replica_uptodate
  meet demoted
  must drbdts down r0
  wait "$drbdts_pid" || true
  data_hash > "$shared/hash-$node"
fi
meet hashed
[ "$(cat "$shared/hash-alice")" = "$(cat "$shared/hash-bob")" ] || fail "data areas differ: $(cat "$shared/hash-alice") $(cat "$shared/hash-bob")"
ok "data areas identical: $(cut -c1-16 "$shared/hash-$node")"
