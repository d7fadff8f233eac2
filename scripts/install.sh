#!/usr/bin/env bash
# Puts `drbdts` on PATH system-wide from this checkout, plus the files the cluster integrations need:
#   PREFIX/bin/drbdts                              a wrapper that runs this checkout's bin/drbdts.js with this node
#   PREFIX/lib/systemd/system/drbdts@.service      `drbdts up RES` as a service (contrib/systemd)
#   PREFIX/lib/systemd/system/drbdts-dirsync-server.service
#   PREFIX/share/doc/drbdts/                       the docs the units point at
#   PREFIX/libexec/drbdts/vip-notify, ucarp-up, ucarp-down   keepalived/UCARP notify scripts (contrib/vip)
#   OCF_ROOT/resource.d/drbdts/drbdts              the Pacemaker resource agent ocf:drbdts:drbdts (contrib/ocf)
# The checkout stays the installation (the wrapper points into it): update with `git pull` and this script again.
#
# Usage: bash scripts/install.sh [--prefix DIR] [--ocf-root DIR] [--no-build]
#   --prefix    default /usr/local (systemd reads units from /usr/local/lib/systemd/system)
#   --ocf-root  default /usr/lib/ocf with the default prefix (where Pacemaker looks), else PREFIX/lib/ocf
#   --no-build  skip `npm ci` and `npm run build` (dist/ and native/build are already there)
set -euo pipefail
checkout="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/usr/local
ocf_root=
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --ocf-root) ocf_root="${2:?--ocf-root needs a directory}"; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$prefix" in /*) ;; *) echo "install.sh: --prefix must be an absolute path, got $prefix" >&2; exit 2 ;; esac
if [ -z "$ocf_root" ]; then
  if [ "$prefix" = /usr/local ]; then ocf_root=/usr/lib/ocf; else ocf_root="$prefix/lib/ocf"; fi
fi

node_bin="$(command -v node || true)"
[ -n "$node_bin" ] || { echo "install.sh: node is not on PATH (drbdts needs Node.js 20 or later)" >&2; exit 1; }
node_major="$("$node_bin" -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || { echo "install.sh: $node_bin is Node.js $node_major; drbdts needs 20 or later" >&2; exit 1; }

if [ "$build" = 1 ]; then
  (cd "$checkout" && { [ -d node_modules ] || npm ci --no-audit --no-fund; } && npm run --silent build)
fi
for file in dist/cli/main.js native/build/Release/drbdts_native.node; do
  [ -e "$checkout/$file" ] || { echo "install.sh: $checkout/$file is missing: run without --no-build" >&2; exit 1; }
done

# A wrapper rather than a symlink: it names the node binary, so the command works where PATH has no node
# (systemd units, cron, keepalived and Pacemaker scripts run with a minimal PATH), and it leaves out
# NODE_EXTRA_CA_CERTS as bin/drbdts.js's own shebang does (bin/drbdts.js says why).
install -d "$prefix/bin" "$prefix/lib/systemd/system" "$prefix/libexec/drbdts" "$ocf_root/resource.d/drbdts" \
  "$prefix/share/doc/drbdts"
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
cat > "$tmp" <<WRAPPER
#!/bin/sh
# Installed by $checkout/scripts/install.sh: runs that checkout's drbdts.
exec /usr/bin/env -u NODE_EXTRA_CA_CERTS '$node_bin' '$checkout/bin/drbdts.js' "\$@"
WRAPPER
install -m 0755 "$tmp" "$prefix/bin/drbdts"

# The shipped files name /usr/local/bin/drbdts; another prefix gets its own path written in.
install -m 0644 "$checkout"/docs/*.md "$checkout/README.md" "$prefix/share/doc/drbdts/"
for unit in drbdts@.service drbdts-dirsync-server.service; do
  sed "s|/usr/local/|$prefix/|g" "$checkout/contrib/systemd/$unit" > "$tmp"
  install -m 0644 "$tmp" "$prefix/lib/systemd/system/$unit"
done
for script in vip-notify ucarp-up ucarp-down; do
  sed "s|/usr/local/|$prefix/|g" "$checkout/contrib/vip/$script" > "$tmp"
  install -m 0755 "$tmp" "$prefix/libexec/drbdts/$script"
done
sed "s|/usr/local/|$prefix/|g" "$checkout/contrib/ocf/drbdts" > "$tmp"
install -m 0755 "$tmp" "$ocf_root/resource.d/drbdts/drbdts"

echo "installed $prefix/bin/drbdts (runs $checkout with $node_bin), systemd units in $prefix/lib/systemd/system,"
echo "VIP notify scripts in $prefix/libexec/drbdts and the OCF agent $ocf_root/resource.d/drbdts/drbdts"
