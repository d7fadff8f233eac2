#!/usr/bin/env bash
# The single-primary failover across two guests: run in both at once by scripts/vm/run-pair.sh
# (test/kernel-vm-cluster.test.ts). Every check that holds prints "OK <what>"; the first that does not prints
# "FAIL <why>" and exits 1.
#   1. r0 without allow-two-primaries: alice Primary with /dev/nbd0 attached, bob Secondary (refused as Primary
#      while alice is), no device on bob.
#   2. alice: mkfs.ext4 on /dev/nbd0, mount, files written and synced while a writer keeps writing; her drbdts is
#      SIGKILLed in the middle of it.
#   3. bob: sees the peer gone, promotes, e2fsck replays the journal and then finds the filesystem clean, mounts it:
#      every file alice synced before the kill is there, checksums agreeing; bob writes more.
#   4. alice lets go of her dead mount, starts drbdts again: Secondary, resynced from bob; bob unmounts and demotes,
#      both stop, the data areas hash identical.
allow_two_primaries=false
. "$(dirname "$0")/pair-lib.sh"
[ "$boot" = 1 ] || fail "unexpected boot $boot: nothing here reboots a guest"

must drbdts create-md r0
start_drbdts
wait_until "Connected" 120 is cstate Connected
[ "$node" != alice ] || must drbdts new-current-uuid r0 --clear-bitmap
wait_until "UpToDate/UpToDate" 60 is dstate UpToDate/UpToDate
meet uptodate
if [ "$node" = alice ]; then
  must drbdts primary r0
  wait_until "/dev/nbd0 attached" 30 attached
  ok "alice Primary, /dev/nbd0 attached"
  arrive primary
else
  await primary
  ! drbdts primary r0 2>/dev/null || fail "bob was promoted while alice is Primary (no allow-two-primaries)"
  is role Secondary && ! attached || fail "bob is not a Secondary without a device"
  ok "bob Secondary, promotion refused while alice is Primary"
fi

if [ "$node" = alice ]; then
  must mkfs.ext4 -q -F /dev/nbd0
  mount_r0 ext4
  mkdir -p "$mnt/tree"
  : > "$shared/manifest-alice"
  for i in $(seq 1 20); do
    head -c $(((RANDOM % 300 + 1) * 1024)) /dev/urandom > "$mnt/tree/f$i"
  done
  sync
  for i in $(seq 1 20); do record "tree/f$i" "$shared/manifest-alice"; done
  writer during "$shared/during-alice" "$shared/stop-writers" 2>/dev/null &
  writer_pid=$!
  wait_until "alice's writer under way" 60 test -s "$shared/during-alice"
  sleep 3
  kill -9 "$drbdts_pid"
  say "killed drbdts (SIGKILL) while writing"
  : > "$shared/killed"
  ok "alice's drbdts killed while writing ($(wc -l < "$shared/during-alice") files synced)"
  await promoted 300
  : > "$shared/stop-writers"
  wait "$writer_pid" || true
  # The kernel's device lost its server: the filesystem on it is gone; let go of it before drbdts comes back.
  umount "$mnt" 2>/dev/null || umount -l "$mnt"
  start_drbdts
  wait_until "Connected" 120 is cstate Connected
  wait_until "UpToDate/UpToDate after the resync" 300 is dstate UpToDate/UpToDate
  is role Secondary || fail "alice came back as $(drbdts role r0), not Secondary"
  grep -q '"resync finished: UpToDate"' "$shared/drbdts-alice.log" || fail "no resync to alice in her log"
  ok "alice back as Secondary, resynced from bob"
  arrive resynced
else
  wait_until "alice's drbdts killed" 120 test -e "$shared/killed"
  wait_until "bob to see alice gone" 60 bash -c '! [ "$(node '"$repo"'/bin/drbdts.js cstate r0)" = Connected ]'
  must drbdts primary r0
  wait_until "/dev/nbd0 attached" 30 attached
  ok "bob promoted after alice's death"
  # The journal of a filesystem that was mounted when its node died: e2fsck replays it (exit 1: "modified"),
  # then a second, read-only pass finds nothing to fix.
  set +e
  e2fsck -fy /dev/nbd0 > "$shared/e2fsck-replay.log" 2>&1
  status=$?
  set -e
  [ "$status" -le 1 ] || fail "e2fsck -fy exited $status: $(cat "$shared/e2fsck-replay.log")"
  must e2fsck -fn /dev/nbd0
  ok "e2fsck clean after the journal replay"
  mount_r0 ext4
  check_manifest "$shared/manifest-alice" "$shared/during-alice"
  ok "bob reads every file alice synced before the kill: $checked, checksums agree"
  head -c 500000 /dev/urandom > "$mnt/tree/after-failover"
  sync
  arrive promoted
  await resynced 300
  must umount "$mnt"
  must drbdts secondary r0
  wait_until "UpToDate/UpToDate" 60 is dstate UpToDate/UpToDate
  arrive demoted
fi
[ "$node" = bob ] || await demoted 120
meet down
must drbdts down r0
wait "$drbdts_pid" || true
data_hash > "$shared/hash-$node"
meet hashed
[ "$(cat "$shared/hash-alice")" = "$(cat "$shared/hash-bob")" ] || fail "data areas differ: $(cat "$shared/hash-alice") $(cat "$shared/hash-bob")"
ok "data areas identical: $(cut -c1-16 "$shared/hash-$node")"
