#!/usr/bin/env bash
# Builds (or reuses) the system test's guest root filesystem: Debian 12 (bookworm) with systemd
# as PID 1, udev and Debian's 6.12 cloud kernel (ublk_drv as a module), made by mmdebstrap from
# the configured Debian mirror. Nothing of kvcrypt is in it: tests/system/run.py copies it and
# installs kvcrypt into the copy with `make install DESTDIR=`.
#
# Usage: tests/system/build-rootfs.sh CACHE_DIR
# Prints the path of the finished root filesystem directory (CACHE_DIR/rootfs-KEY) on stdout.
# KEY hashes this script and the kernel version, so the (~3 min, ~350 MB) build runs again only
# when one of them changes; older rootfs-* directories are removed.
set -euo pipefail
CACHE=${1:?usage: build-rootfs.sh CACHE_DIR}
mkdir -p "$CACHE"
log() { echo "build-rootfs: $*" >&2; }

PKG_RE='^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$'
newest_kver() {
  apt-cache search --names-only "$PKG_RE" | awk '{print $1}' \
    | sed 's/^linux-image-//; s/-unsigned$//' | sort -V | tail -1
}
KVER=${KVCRYPT_SYSTEM_KVER:-}
if [ -z "$KVER" ]; then
  # Reuse the kernel of a finished rootfs (no apt access needed on re-runs).
  KVER=$(cat "$CACHE"/rootfs-*/.kver 2>/dev/null | sort -V | tail -1 || true)
fi
if [ -z "$KVER" ]; then
  KVER=$(newest_kver)
  if [ -z "$KVER" ]; then apt-get update -qq || true; KVER=$(newest_kver); fi
  [ -n "$KVER" ] || { log "no linux-image-6.12.*+deb12-cloud-amd64-unsigned in the apt sources"; exit 2; }
fi

# What the guest needs: systemd + udev (the system under test), e2fsprogs/util-linux (mkfs,
# findmnt, fsfreeze), fuse3 (the FUSE transport's mount helper is not needed, but /dev/fuse
# users expect it), procps/psmisc (ps, fuser), jq (reading `kvcrypt status --json`),
# initramfs-tools (the cloud kernel has virtio_blk as a module).
PACKAGES=systemd,systemd-sysv,udev,kmod,e2fsprogs,util-linux,fuse3,procps,psmisc,jq,initramfs-tools,linux-image-$KVER-unsigned
KEY=$( { cat "$0"; echo "$KVER $PACKAGES"; } | sha256sum | cut -c1-16)
OUT=$CACHE/rootfs-$KEY
if [ -f "$OUT/.complete" ]; then
  log "cached: $OUT (kernel $KVER)"
  echo "$OUT"; exit 0
fi
command -v mmdebstrap >/dev/null || { log "mmdebstrap missing (apt-get install mmdebstrap)"; exit 2; }
log "building $OUT (kernel $KVER), a few minutes"
rm -rf "$OUT.tmp"
# The mirror of the host's own apt sources (the only one this machine may reach).
MIRROR=$(awk '/^URIs:/ && /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${MIRROR%/debian}/debian-security
mmdebstrap --mode=root --variant=minbase --include="$PACKAGES" \
  --customize-hook='echo kvsys > "$1/etc/hostname"' \
  --customize-hook='chroot "$1" passwd -d root' \
  --customize-hook='rm -f "$1"/etc/machine-id; : > "$1"/etc/machine-id' \
  bookworm "$OUT.tmp" \
  "deb $MIRROR bookworm main" \
  "deb $MIRROR bookworm-updates main" \
  "deb $SECURITY bookworm-security main" >&2
[ -f "$OUT.tmp/boot/vmlinuz-$KVER" ] && [ -f "$OUT.tmp/boot/initrd.img-$KVER" ] \
  || { log "kernel or initrd missing in $OUT.tmp/boot"; exit 2; }
grep -q '^CONFIG_BLK_DEV_UBLK=[ym]' "$OUT.tmp/boot/config-$KVER" || { log "kernel $KVER lacks ublk"; exit 2; }
# Documentation and apt lists are dead weight in an image that is copied for every run.
rm -rf "$OUT.tmp"/usr/share/doc/* "$OUT.tmp"/usr/share/man/* "$OUT.tmp"/var/lib/apt/lists/* \
  "$OUT.tmp"/var/cache/apt/*.bin
echo "$KVER" > "$OUT.tmp/.kver"
touch "$OUT.tmp/.complete"
for old in "$CACHE"/rootfs-*; do [ "$old" = "$OUT.tmp" ] || rm -rf "$old"; done
mv "$OUT.tmp" "$OUT"
log "done: $OUT ($(du -sh "$OUT" | cut -f1))"
echo "$OUT"
