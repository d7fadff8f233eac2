#!/usr/bin/env bash
# Builds what scripts/vm/run.sh boots: Debian's stock kernel (from the linux-image-amd64 package, unpacked, not
# installed) and a small initramfs (busybox + the modules for virtio (9p, disk, network), overlayfs, ext4, nbd, loop,
# drbd (the kernel DRBD 8.4 that bench/drbd-compare runs against) and OCFS2 with its o2cb cluster stack and dlmfs
# (scripts/vm/run-pair.sh's cluster; the guest cannot modprobe: the root it sees has only this host kernel's
# modules, so init loads them all at boot). The VM's root
# is this machine's own file system, shared read-only over 9p with a tmpfs overlay on top, so the VM runs the same
# node, repository and tools as the host while having the kernel modules this host kernel lacks (nbd).
# Idempotent: does nothing when the kit for the current package version exists.
#   bash scripts/vm/build-kit.sh [KIT_DIR]    (default /var/cache/drbdts/vm)
set -euo pipefail
kit=${1:-/var/cache/drbdts/vm}
if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v depmod >/dev/null || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The kernel package the metapackage points at, e.g. linux-image-6.1.0-57-amd64.
package=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
if [ -z "$package" ]; then
  $SUDO apt-get update -qq
  package=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
fi
[ -n "$package" ] || { echo "build-kit.sh: no linux-image-amd64 package in the apt lists" >&2; exit 1; }
# The kit is remade when the kernel package, this script or the VM's init changes.
here=$(cd "$(dirname "$0")" && pwd)
stamp="$package-$(cat "$here/build-kit.sh" "$here/init" | sha256sum | cut -c1-12)"
if [ -f "$kit/$stamp.done" ]; then exit 0; fi
$SUDO mkdir -p "$kit"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
(cd "$work" && apt-get download "$package" >/dev/null 2>&1 || $SUDO apt-get download "$package" >/dev/null)
dpkg -x "$work"/"$package"_*.deb "$work/pkg"
version=${package#linux-image-}
modules="$work/pkg/lib/modules/$version"
depmod -b "$work/pkg" "$version"
# Load order: each module after its dependencies, each once.
order=$(for m in virtio_pci 9pnet_virtio 9p virtio_blk virtio_net overlay ext4 nbd loop drbd configfs ocfs2 \
    ocfs2_stack_o2cb ocfs2_dlmfs; do
  modprobe -d "$work/pkg" -S "$version" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
done | awk '!seen[$0]++')
initramfs="$work/initramfs"
mkdir -p "$initramfs"/{bin,dev,proc,sys,host,upper,newroot,run,modules}
cp /bin/busybox "$initramfs/bin/busybox"
for applet in sh mount umount mkdir insmod chroot poweroff cat echo sleep switch_root ln; do
  ln -s busybox "$initramfs/bin/$applet"
done
: > "$initramfs/modules/order"
for path in $order; do
  cp "$path" "$initramfs/modules/"
  echo "$(basename "$path")" >> "$initramfs/modules/order"
done
cp "$here/init" "$initramfs/init"
chmod 755 "$initramfs/init"
(cd "$initramfs" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.gz"
$SUDO cp "$work/pkg/boot/vmlinuz-$version" "$kit/vmlinuz"
$SUDO cp "$work/initrd.gz" "$kit/initrd.gz"
$SUDO rm -f "$kit"/*.done
$SUDO touch "$kit/$stamp.done"
echo "build-kit.sh: $kit has $package and an initramfs with $(wc -l < "$initramfs/modules/order") modules"
