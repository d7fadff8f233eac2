#!/bin/sh
# One Pacemaker + Corosync cluster node for test/cluster-pacemaker.test.ts, run as PID 1 of the namespaces the
# test creates for it (network: `ip netns exec`; mount, UTS, IPC and PID: `unshare`): two cluster nodes on one
# machine need their own host name, /run, /dev/shm, state and log directories, since Pacemaker and Corosync
# keep sockets, shared-memory rings and state there. The drbdts agent is laid beside the system's agents in
# this node's view of /usr/lib/ocf/resource.d only. Killing this process (PID 1) kills the whole node.
#
#   pacemaker-node.sh STATE_DIR NODE_NAME OCF_ROOT_WITH_DRBDTS_AGENT COROSYNC_CONF
set -eu
state=$1
name=$2
agent_root=$3
corosync_conf=$4

hostname "$name"
mount --make-rprivate /
for dir in lib/pacemaker/cib lib/pacemaker/pengine lib/pacemaker/blackbox lib/pacemaker/cores lib/corosync \
  log/pacemaker log/cluster etc-corosync ocf-system; do
  mkdir -p "$state/$dir"
done
chown -R hacluster:haclient "$state/lib/pacemaker" "$state/log/pacemaker"
chmod 750 "$state/lib/pacemaker"/*
cp "$corosync_conf" "$state/etc-corosync/corosync.conf"
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount --bind "$state/lib/pacemaker" /var/lib/pacemaker
mount --bind "$state/lib/corosync" /var/lib/corosync
mount --bind "$state/log/pacemaker" /var/log/pacemaker
mkdir -p /var/log/cluster && mount --bind "$state/log/cluster" /var/log/cluster
mount --bind "$state/etc-corosync" /etc/corosync
# The system's agents plus ocf:drbdts:drbdts, in this node's view only.
mount --bind /usr/lib/ocf/resource.d "$state/ocf-system"
mount -t tmpfs -o mode=755 tmpfs /usr/lib/ocf/resource.d
for provider in "$state"/ocf-system/*; do
  mkdir "/usr/lib/ocf/resource.d/${provider##*/}"
  mount --bind "$provider" "/usr/lib/ocf/resource.d/${provider##*/}"
done
mkdir /usr/lib/ocf/resource.d/drbdts
mount --bind "$agent_root/resource.d/drbdts" /usr/lib/ocf/resource.d/drbdts
mkdir -p /run/lock

corosync -f > "$state/corosync.log" 2>&1 &
# pacemakerd checks that corosync answers before it starts its subdaemons.
for _ in $(seq 50); do corosync-cfgtool -s >/dev/null 2>&1 && break; sleep 0.2; done
pacemakerd -f > "$state/pacemakerd.log" 2>&1 &
echo "node $name up"
wait
