#!/usr/bin/env bash
# kvcrypt ublk VM test harness.
#
# Boots Debian's 6.12 cloud kernel (ublk_drv as a module, ext4 built in) under qemu TCG with a
# busybox initramfs that carries the kvcrypt binaries, and runs guest scenarios from
# tests/vm/guest/. This host has no ublk: the ublk transport is only exercised inside this VM.
#
# Usage: tests/vm/run-vm-test.sh [SCENARIO...]      (default: every tests/vm/guest/[0-9]*.sh)
#   SCENARIO is a file name from tests/vm/guest/ with or without ".sh" (e.g. 10-open-ext4).
# Environment:
#   KVCRYPT_VM_CACHE   cache/work directory (default: <repo>/target/vm-cache). Holds the kernel .deb,
#                      the unpacked kernel, the initramfs and console.log.
#   (fio is packed into the guest when a scenario uses it.)
#   KVCRYPT_VM_BINDIR  directory with prebuilt kvcrypt + kvcrypt-kv-emulator (+ optional
#                      examples/ublk_file_server) (default: build them with `cargo build --release`
#                      into $CARGO_TARGET_DIR or <repo>/target).
#   KVCRYPT_VM_KVER    kernel version, e.g. 6.12.117+deb12-cloud-amd64 (default: newest 6.12 cloud
#                      kernel in the configured apt sources).
#   SCRATCH_MB         size of the blank scratch disk the guest sees as /dev/nvme0n1 (default 160).
#   VM_TIMEOUT         seconds for the whole qemu run (default 420), TEST_TIMEOUT seconds per guest
#                      scenario (default 150), MEM (MiB, 1024), SMP (2), CPU (max,-cx16).
# Exit status: 0 only if the guest printed "GUEST-RESULT: PASS" (every scenario passed).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${KVCRYPT_VM_CACHE:-$REPO/target/vm-cache}
VM_TIMEOUT=${VM_TIMEOUT:-420}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
MEM=${MEM:-1024}
SMP=${SMP:-2}
# -cx16: with qemu 7.2 TCG about a quarter of 6.12 boots oopsed at a cmpxchg16b.
CPU=${CPU:-max,-cx16}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
now() { date +%s.%N; }
T0=$(now)
log() { echo "vm-test: $*" >&2; }
die() { echo "vm-test: ERROR: $*" >&2; exit 2; }

# ---- 0. host tools -------------------------------------------------------------------------
for t in qemu-system-x86_64 cpio gzip timeout apt-get dpkg-deb ldd; do
  command -v "$t" >/dev/null || die "missing host tool '$t' (apt-get install qemu-system-x86 cpio)"
done
# busybox must be statically linked: it is the guest's only userland.
BUSYBOX=${BUSYBOX:-/bin/busybox}
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (apt-get install busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked: install busybox-static"; fi

# ---- 1. scenarios --------------------------------------------------------------------------
SCEN=()
if [ $# -eq 0 ]; then
  for f in "$HERE"/guest/[0-9]*.sh; do SCEN+=("$(basename "$f" .sh)"); done
else
  for s in "$@"; do s=${s%.sh}; [ -f "$HERE/guest/$s.sh" ] || die "no scenario $HERE/guest/$s.sh"; SCEN+=("$s"); done
fi
[ ${#SCEN[@]} -gt 0 ] || die "no scenarios"

# ---- 2. kvcrypt binaries (release) ----------------------------------------------------------
if [ -n "${KVCRYPT_VM_BINDIR:-}" ]; then
  BINDIR=$KVCRYPT_VM_BINDIR
else
  TD=${CARGO_TARGET_DIR:-$REPO/target}
  log "building release binaries (target dir $TD)"
  (cd "$REPO" && CARGO_TARGET_DIR=$TD cargo build --release --bins --example ublk_file_server --quiet) \
    || die "cargo build failed"
  BINDIR=$TD/release
fi
for b in kvcrypt kvcrypt-kv-emulator; do [ -x "$BINDIR/$b" ] || die "$BINDIR/$b not found"; done
T_BIN=$(now)

# ---- 3. guest kernel: Debian 6.12 cloud kernel from the configured apt sources --------------
# Only downloaded and unpacked under $CACHE; /boot and the host system are not touched.
PKG_RE='^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$'
newest_kver() {
  apt-cache search --names-only "$PKG_RE" | awk '{print $1}' \
    | sed 's/^linux-image-//; s/-unsigned$//' | sort -V | tail -1
}
KVER=${KVCRYPT_VM_KVER:-}
if [ -z "$KVER" ]; then
  # Prefer a kernel already unpacked in the cache (no network needed on re-runs).
  KVER=$(ls -d "$CACHE"/kernel-6.12.* 2>/dev/null | sed 's|.*/kernel-||' | sort -V | tail -1 || true)
fi
if [ -z "$KVER" ]; then
  KVER=$(newest_kver)
  if [ -z "$KVER" ]; then apt-get update -qq || true; KVER=$(newest_kver); fi
  [ -n "$KVER" ] || die "no linux-image-6.12.*+deb12-cloud-amd64-unsigned in the apt sources"
fi
KDIR=$CACHE/kernel-$KVER
if [ ! -f "$KDIR/boot/vmlinuz-$KVER" ]; then
  log "downloading linux-image-$KVER-unsigned"
  mkdir -p "$CACHE/debs"
  (cd "$CACHE/debs" && apt-get download "linux-image-$KVER-unsigned") || die "apt-get download failed"
  rm -rf "$KDIR.tmp"; mkdir -p "$KDIR.tmp"
  for d in "$CACHE"/debs/linux-image-"$KVER"-unsigned_*.deb; do dpkg-deb -x "$d" "$KDIR.tmp"; done
  rm -rf "$KDIR"; mv "$KDIR.tmp" "$KDIR"
fi
grep -q '^CONFIG_BLK_DEV_UBLK=[ym]' "$KDIR/boot/config-$KVER" || die "kernel $KVER lacks ublk"

# ---- 4. initramfs --------------------------------------------------------------------------
R=$CACHE/initramfs
rm -rf "$R"; mkdir -p "$R"/{bin,dev,proc,sys,tmp,run,mnt,lib/modules,lib64,etc,kvtest}
cp "$BUSYBOX" "$R/bin/busybox"
for m in ublk_drv; do
  f=$( { find "$KDIR/lib/modules/$KVER" "$KDIR/usr/lib/modules/$KVER" -name "$m.ko*" 2>/dev/null || true; } | head -1)
  [ -n "$f" ] || die "module $m not found in $KDIR"
  case $f in
    *.xz) xz -dc "$f" > "$R/lib/modules/$m.ko";;
    *.zst) zstd -qdc "$f" > "$R/lib/modules/$m.ko";;
    *) cp "$f" "$R/lib/modules/$m.ko";;
  esac
done
copy_libs() {  # shared libraries a dynamic ELF needs, at the same paths
  { ldd "$1" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r l; do
    [ -e "$R$l" ] && continue
    mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"
  done
}
add_bin() { cp -L "$1" "$R/bin/$(basename "$1")"; copy_libs "$1"; }
for b in mke2fs e2fsck; do add_bin "$(command -v "$b")"; done
ln -sf mke2fs "$R/bin/mkfs.ext4"
# Our binaries without debug info: the release profile keeps it (~70 MiB each), which would only
# slow down packing and booting the initramfs.
add_own_bin() {
  add_bin "$1"
  if command -v strip >/dev/null; then strip --strip-debug "$R/bin/$(basename "$1")" || true; fi
}
for b in kvcrypt kvcrypt-kv-emulator; do add_own_bin "$BINDIR/$b"; done
# Transport-only test server (examples/ublk_file_server.rs), optional.
if [ -x "$BINDIR/examples/ublk_file_server" ]; then add_own_bin "$BINDIR/examples/ublk_file_server"; fi
# fio (with its libraries) for the scenarios that need it (they fail without it).
NEED_FIO=
for s in "${SCEN[@]}"; do if grep -qw fio "$HERE/guest/$s.sh"; then NEED_FIO=1; fi; done
if [ -n "$NEED_FIO" ]; then
  command -v fio >/dev/null || die "a scenario needs fio: apt-get install fio"
  add_bin "$(command -v fio)"
fi
# libgcc_s is dlopen()ed by glibc for unwinding (panics); ldd does not list it.
for l in /lib/x86_64-linux-gnu/libgcc_s.so.1 /usr/lib/x86_64-linux-gnu/libgcc_s.so.1; do
  if [ -e "$l" ]; then mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"; break; fi
done
printf '127.0.0.1 localhost\n::1 localhost\n' > "$R/etc/hosts"
printf 'root:x:0:0:root:/:/bin/sh\n' > "$R/etc/passwd"
printf 'root:x:0:\n' > "$R/etc/group"
: > "$R/etc/mtab"
cp "$HERE/guest/lib.sh" "$HERE/guest/emu.sh" "$R/kvtest/"
for s in "${SCEN[@]}"; do cp "$HERE/guest/$s.sh" "$R/kvtest/$s.sh"; done
printf '%s\n' "${SCEN[@]}" > "$R/kvtest/scenarios"
echo "$TEST_TIMEOUT" > "$R/kvtest/test_timeout"
cp "$HERE/guest/init.sh" "$R/init"
chmod +x "$R/init" "$R"/kvtest/*.sh
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$CACHE/initrd.gz"
T_BUILT=$(now)

# ---- 5. boot -------------------------------------------------------------------------------
# TCG only: /dev/kvm on this host runs PVM guests only (a stock kernel dies with a KVM emulation
# failure). qemu is wrapped in `timeout`; the guest also limits each scenario.
LOG=$CACHE/console.log
# A blank scratch disk as an emulated NVMe device (built into the kernel): /dev/nvme0n1 gives
# scenarios a block device with real (emulated) I/O latency to serve a volume from, and to
# compare against, unlike files in the guest's RAM.
SCRATCH=$CACHE/scratch.img
boot() {
  rm -f "$SCRATCH"; truncate -s "${SCRATCH_MB:-160}M" "$SCRATCH"
  log "booting $KVER with scenarios: ${SCEN[*]} (console: $LOG)"
  set +e
  timeout --kill-after=10 "$VM_TIMEOUT" qemu-system-x86_64 \
    -accel tcg -cpu "$CPU" -m "$MEM" -smp "$SMP" \
    -nographic -no-reboot -nic none -monitor none -serial stdio \
    -drive "file=$SCRATCH,if=none,id=scratch,format=raw,cache=writeback" \
    -device nvme,serial=kvscratch,drive=scratch \
    -kernel "$KDIR/boot/vmlinuz-$KVER" -initrd "$CACHE/initrd.gz" \
    -append "console=ttyS0 panic=-1 oops=panic quiet loglevel=4" \
    </dev/null >"$LOG" 2>&1
  QRC=$?
  set -e
}
boot
# Under TCG the kernel occasionally dies while booting, before our init runs (seen about once
# in 15 boots; nothing of ours has run yet). Only that case is retried, once, and said so; a
# failure after init started is a test failure and is never retried.
if ! grep -q "GUEST-T init" "$LOG"; then
  echo "vm-test: the guest kernel did not reach init (qemu_rc=$QRC); last console lines:"
  tr -d '\r' < "$LOG" | tail -15
  cp "$LOG" "$LOG.boot-failure"
  echo "vm-test: booting once more"
  boot
fi
rm -f "$SCRATCH"
T_END=$(now)
if grep -q "GUEST-T init" "$LOG"; then tr -d '\r' < "$LOG" | sed -n '/GUEST-T init/,$p'
else tr -d '\r' < "$LOG" | tail -60; fi
secs() { awk "BEGIN{printf \"%.1f\", $2 - $1}"; }
echo "HOST-T binaries(s)=$(secs "$T0" "$T_BIN") initramfs(s)=$(secs "$T_BIN" "$T_BUILT") vm(s)=$(secs "$T_BUILT" "$T_END") qemu_rc=$QRC"
[ $QRC -ne 124 ] || echo "vm-test: qemu killed after VM_TIMEOUT=$VM_TIMEOUT s"
if tr -d '\r' < "$LOG" | grep -qx 'GUEST-RESULT: PASS'; then
  echo "vm-test: PASS"; exit 0
fi
echo "vm-test: FAIL"; exit 1
