#!/bin/sh
# kvcrypt end to end over ublk: Key Vault emulator in the guest, `kvcrypt format`, `kvcrypt open
# --transport ublk`, ext4 with checksummed files, no plaintext in the backing file, close, reopen,
# verify, e2fsck.
. /kvtest/lib.sh
. /kvtest/emu.sh
on_fail() {
  echo "--- state files"; cat /run/kvcrypt/volumes/*.json 2>/dev/null
  echo "--- emulator log"; tail -20 /tmp/kvemu/log; echo "--- dmesg"; dmesg | tail -20
}
trap 'rc=$?; kvcrypt close vol >/dev/null 2>&1 || true; emu_stop; exit $rc' EXIT
emu_start

dd if=/dev/zero of=/tmp/vol.img bs=1M count=80 2>/dev/null
kvcrypt format /tmp/vol.img --key-id "$KEY_ID" --label vmtest --yes || fail "kvcrypt format"
T "formatted"
kvcrypt header dump /tmp/vol.img | head -20 || true

DEV=$(kvcrypt open /tmp/vol.img vol --transport ublk --no-access-checks --queues 2) || fail "kvcrypt open --transport ublk"
T "opened $DEV"
case $DEV in /dev/ublkb[0-9]*) ;; *) fail "open printed '$DEV', expected /dev/ublkbN";; esac
[ -b "$DEV" ] || fail "$DEV is not a block device"
ID=${DEV#/dev/ublkb}
grep -q "\"ublk_dev_id\": *$ID" /run/kvcrypt/volumes/vol.json || { cat /run/kvcrypt/volumes/vol.json; fail "state file lacks ublk_dev_id $ID"; }
grep -q '"transport": *"ublk"' /run/kvcrypt/volumes/vol.json || fail "state file transport is not ublk"
[ "$(cat /sys/block/ublkb$ID/queue/logical_block_size)" = 4096 ] || fail "logical block size != sector size 4096"

mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4"
mkdir -p /mnt/v; mount -t ext4 "$DEV" /mnt/v || fail "mount"
mkdir -p /tmp/src
for i in $(seq 1 12); do dd if=/dev/urandom of=/tmp/src/f$i bs=64k count=8 2>/dev/null; done
# A known plaintext pattern that must never appear in the backing file.
i=0; : > /tmp/src/marker; while [ $i -lt 2048 ]; do echo "KVCRYPT-PLAINTEXT-MARKER-0123456789abcdef-$i-padpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpadpad" >> /tmp/src/marker; i=$((i+1)); done
(cd /tmp/src && md5sum * > /tmp/src.md5)
cp /tmp/src/* /mnt/v/ || fail "copy files"
sync
T "files written ($(du -s /mnt/v | cut -f1) KiB)"
rc=0; kvcrypt close vol 2>/tmp/close.err || rc=$?
[ $rc -eq 10 ] || { cat /tmp/close.err; fail "close of a mounted device: exit $rc, expected 10 (busy)"; }
[ -b "$DEV" ] && cat /mnt/v/f1 >/dev/null || fail "device unusable after a refused close"
T "close refused while mounted: $(cat /tmp/close.err)"
umount /mnt/v || fail "umount"
kvcrypt close vol || fail "kvcrypt close"
[ ! -e "$DEV" ] || fail "$DEV still exists after close"
[ ! -e /run/kvcrypt/volumes/vol.json ] || fail "state file left after close"
T "closed"
# -F: busybox grep is ~30x faster on binary data with a fixed string. Positive control first.
grep -qF "KVCRYPT-PLAINTEXT-MARKER" /tmp/src/marker || fail "marker check is broken"
if grep -qF "KVCRYPT-PLAINTEXT-MARKER" /tmp/vol.img; then fail "plaintext marker found in the backing file"; fi
T "no plaintext in the backing file"

T "reopening"
DEV=$(kvcrypt open /tmp/vol.img vol --transport ublk --no-access-checks 2>/tmp/reopen.err) || { cat /tmp/reopen.err; fail "reopen"; }
T "reopened $DEV"
mount -t ext4 -o ro "$DEV" /mnt/v || fail "mount after reopen"
(cd /mnt/v && md5sum -c /tmp/src.md5) >/tmp/md5.out 2>&1 || { cat /tmp/md5.out; fail "checksums differ after reopen"; }
umount /mnt/v
e2fsck -fn "$DEV" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck -fn"; }
kvcrypt close vol || fail "close after verify"
T "verified and closed"
