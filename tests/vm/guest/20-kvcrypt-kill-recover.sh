#!/bin/sh
# Kill-and-recover through kvcrypt: a writer runs on ext4 on /dev/ublkbN, the worker is SIGKILLed,
# a new worker re-attaches the QUIESCED device (same node), the writer finishes, data intact.
. /kvtest/lib.sh
. /kvtest/emu.sh
on_fail() {
  echo "--- state files"; cat /run/kvcrypt/volumes/*.json 2>/dev/null; echo "--- worker log"; tail -30 /tmp/worker.log 2>/dev/null
  echo "--- dmesg"; dmesg | tail -20
}
trap 'rc=$?; kvcrypt close vol2 >/dev/null 2>&1 || true; emu_stop; exit $rc' EXIT
state_of() { command -v ublk_file_server >/dev/null && ublk_file_server --state "$1" 2>/dev/null | cut -d' ' -f1 || echo unknown; }
worker_pid() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' /run/kvcrypt/volumes/vol2.json; }
emu_start

dd if=/dev/zero of=/tmp/vol2.img bs=1M count=80 2>/dev/null
dd if=/dev/urandom of=/tmp/vmk bs=64 count=1 2>/dev/null
kvcrypt format /tmp/vol2.img --key-id "$KEY_ID" --master-key-file /tmp/vmk --yes >/dev/null || fail "format"
DEV=$(kvcrypt open /tmp/vol2.img vol2 --transport ublk --no-access-checks --queues 2) || fail "open"
ID=${DEV#/dev/ublkb}
mkfs.ext4 -q -F "$DEV"; mkdir -p /mnt/w; mount -t ext4 "$DEV" /mnt/w
mkdir -p /tmp/src2; for i in $(seq 1 24); do dd if=/dev/urandom of=/tmp/src2/f$i bs=64k count=4 2>/dev/null; done
(cd /tmp/src2 && md5sum f* > /tmp/src2.md5)
for i in $(seq 1 4); do cp /tmp/src2/f$i /mnt/w/; done; sync
WPID=$(worker_pid); [ -n "$WPID" ] || fail "no worker pid in the state file"
T "worker $WPID serving $DEV"

# Writer with direct I/O so requests are in flight when the worker dies.
( for i in $(seq 5 24); do dd if=/tmp/src2/f$i of=/mnt/w/f$i bs=64k oflag=direct conv=fsync 2>/dev/null || echo "write f$i failed"; done; sync ) >/tmp/w2.out 2>&1 & W=$!
sleep 0.5
kill -9 "$WPID"
T "worker SIGKILLed; writer alive: $([ -d /proc/$W ] && echo yes || echo no)"
wait_for "[ ! -d /proc/$WPID ]" 50 || fail "worker did not die"
wait_for '[ "$(state_of $ID)" != LIVE ]' 100 || true
T "device state $(state_of $ID)"

# Recover: `kvcrypt open` finds the QUIESCED device of this name in the state file.
HOW=open
NEW=$(kvcrypt open /tmp/vol2.img vol2 --transport ublk --no-access-checks 2>/tmp/open.err) || HOW=failed
if [ "$HOW" = failed ]; then
  echo "kvcrypt open did not recover: $(cat /tmp/open.err)"; echo "falling back to kvcrypt worker --recover-dev-id $ID"
  HOW=worker
  rm -f /tmp/ready
  kvcrypt worker /tmp/vol2.img vol2 --transport ublk --recover-dev-id "$ID" --key-fd 3 --ready-fd 4 \
    3</tmp/vmk 4>/tmp/ready 2>/tmp/worker.log &
  wait_for '[ -s /tmp/ready ]' 300 || fail "recovering worker not ready"
  NEW=$(cat /tmp/ready)
fi
T "recovered via $HOW: $NEW (state $(state_of $ID))"
[ "$NEW" = "$DEV" ] || fail "recovery gave $NEW, expected the same $DEV"
wait $W; cat /tmp/w2.out; [ ! -s /tmp/w2.out ] || fail "writer saw errors across the kill"
(cd /mnt/w && md5sum -c /tmp/src2.md5) >/tmp/md5.out 2>&1 || { cat /tmp/md5.out; fail "data differs after kill+recover"; }
umount /mnt/w
e2fsck -fn "$DEV" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck after kill+recover"; }
kvcrypt close vol2 || fail "close after recovery"
[ ! -e "$DEV" ] || fail "$DEV still exists after close"
echo "KILL-RECOVER-PATH: $HOW"
T "kill+recover done"
