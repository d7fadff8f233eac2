#!/usr/bin/env bash
# Installs the system packages drbdts and its tests need: real NBD clients (libnbd-bin, qemu-utils, fio),
# the peers we benchmark against (nbdkit, unison), filesystem tools (e2fsprogs, fuse3), openssh-server for
# dirsync's ssh:// tests, iproute2 for network namespaces, drbd-utils for the kernel DRBD comparison
# (bench/drbd-compare.sh, which runs kernel DRBD inside the test VM), ocfs2-tools for the cluster filesystem that
# test/kernel-vm-cluster.test.ts mounts on both nodes of a dual-primary resource (inside the two test VMs, which see
# this machine's file system). Idempotent: does nothing when all are present. Non-interactive (no debconf prompt).
set -euo pipefail
packages=(libnbd-bin nbdkit qemu-utils fio unison e2fsprogs fuse3 openssh-server openssl iproute2 util-linux drbd-utils ocfs2-tools)
commands=(nbdinfo nbdkit qemu-io fio unison mkfs.ext3 fusermount3 sshd openssl ip losetup drbdmeta mkfs.ocfs2)
# The cluster integrations' real programs (test/cluster-*.test.ts): systemd-analyze for the units, python3 as a
# stand-in notify socket, Prometheus scraping the metrics endpoint, keepalived and UCARP moving a VIP, and
# resource-agents' ocf-tester (which lints meta-data with xmllint) for the OCF agent, and Pacemaker with Corosync
# running it in a two-node cluster.
packages+=(systemd python3 prometheus keepalived ucarp resource-agents libxml2-utils pacemaker pacemaker-cli-utils corosync)
commands+=(systemd-analyze python3 prometheus keepalived ucarp ocf-tester xmllint crm_attribute pacemakerd corosync)
missing=0
for c in "${commands[@]}"; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || { missing=1; break; }
done
if [ "$missing" = 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
