#!/bin/sh
# The ublk transport on its own (examples/ublk_file_server: XTS over a plain file, no header or
# Key Vault): raw I/O, ext4, SIGKILL + recover with I/O in flight (raw and ext4), suspend (detach)
# + recover, close, re-add, verify, e2fsck. Proves USER_RECOVERY|REISSUE keeps every request.
. /kvtest/lib.sh
command -v ublk_file_server >/dev/null || fail "ublk_file_server not in the initramfs"
SRV=ublk_file_server
on_fail() { echo "--- server log"; tail -40 /tmp/srv.log; echo "--- dmesg"; dmesg | tail -30; }
state() { $SRV --state 0 | cut -d' ' -f1; }
start() {  # start [--recover-dev-id N]
  rm -f /tmp/ready
  $SRV /tmp/vol.img /tmp/key --queues 2 --depth 64 --ready-file /tmp/ready "$@" >>/tmp/srv.log 2>&1 &
  SPID=$!
  wait_for '[ -s /tmp/ready ]' 300 || { cat /tmp/srv.log; fail "server did not become ready"; }
  DEV=$(cut -d' ' -f1 /tmp/ready); T "server $SPID ready: $(cat /tmp/ready) state=$(state)"
}
dd if=/dev/zero of=/tmp/vol.img bs=1M count=64 2>/dev/null
dd if=/dev/urandom of=/tmp/key bs=64 count=1 2>/dev/null
dd if=/dev/urandom of=/tmp/pattern bs=1M count=16 2>/dev/null
PAT=$(md5 /tmp/pattern)
mkdir -p /tmp/src; for i in $(seq 1 24); do dd if=/dev/urandom of=/tmp/src/f$i bs=64k count=4 2>/dev/null; done
(cd /tmp/src && md5sum f* > /tmp/src.md5)

start
[ "$DEV" = /dev/ublkb0 ] || fail "expected /dev/ublkb0, got $DEV"
[ "$(cat /sys/block/ublkb0/queue/logical_block_size)" = 4096 ] || fail "logical block size not 4096"
ls /sys/block/ublkb0/mq/ | wc -l | grep -qx 2 || fail "expected 2 hw queues"

echo "--- raw write/read + no plaintext in the backing file"
dd if=/tmp/pattern of=$DEV bs=1M oflag=direct 2>/dev/null
[ "$(dd if=$DEV bs=1M count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "$PAT" ] || fail "raw readback differs"
[ "$(head -c 16777216 /tmp/vol.img | md5sum | cut -d' ' -f1)" != "$PAT" ] || fail "backing file holds plaintext"
T "raw ok"

echo "--- SIGKILL with raw direct writes in flight, recover"
dd if=/dev/zero of=$DEV bs=1M count=16 oflag=direct 2>/dev/null
dd if=/tmp/pattern of=$DEV bs=64k oflag=direct 2>/tmp/io.err & IO=$!
sleep 0.5; kill -9 $SPID; wait $SPID 2>/dev/null || true
wait_for '[ "$(state)" = QUIESCED ]' 100 || fail "device not QUIESCED after SIGKILL (state $(state))"
T "killed; state $(state); writer still running: $([ -d /proc/$IO ] && echo yes || echo no)"
start --recover-dev-id 0
[ "$DEV" = /dev/ublkb0 ] || fail "recovered a different device $DEV"
wait $IO || { cat /tmp/io.err; fail "writer failed across recovery"; }
[ "$(dd if=$DEV bs=1M count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "$PAT" ] || fail "data lost across kill+recover (raw)"
T "raw kill+recover ok"

echo "--- ext4"
mkfs.ext4 -q -F $DEV
mkdir -p /mnt/v; mount -t ext4 $DEV /mnt/v
for i in $(seq 1 8); do cp /tmp/src/f$i /mnt/v/; done; sync
echo "--- SIGKILL with ext4 direct writes in flight, recover"
( for i in $(seq 9 24); do dd if=/tmp/src/f$i of=/mnt/v/f$i bs=64k oflag=direct conv=fsync 2>/dev/null || echo "write f$i failed"; done; sync ) >/tmp/w.out 2>&1 & W=$!
sleep 0.5; kill -9 $SPID; wait $SPID 2>/dev/null || true
wait_for '[ "$(state)" = QUIESCED ]' 100 || fail "not QUIESCED after SIGKILL"
T "killed under ext4; state $(state)"
sleep 1
start --recover-dev-id 0
wait $W; cat /tmp/w.out; [ ! -s /tmp/w.out ] || fail "ext4 writer saw errors"
(cd /mnt/v && md5sum -c /tmp/src.md5 >/dev/null) || fail "ext4 files differ after kill+recover"
T "ext4 kill+recover ok"

echo "--- suspend (detach: server exits leaving the device QUIESCED), I/O waits, resume"
( dd if=/tmp/src/f1 of=/mnt/v/late bs=64k oflag=direct conv=fsync 2>/dev/null; echo "late rc=$?" ) >/tmp/late.out 2>&1 &
kill -USR1 $SPID; rc=0; wait $SPID || rc=$?; [ $rc -eq 0 ] || fail "detach exit code $rc"
wait_for '[ "$(state)" = QUIESCED ]' 100 || fail "not QUIESCED after detach"
( dd if=/tmp/src/f2 of=/mnt/v/held bs=64k oflag=direct conv=fsync 2>/dev/null; echo "held rc=$?" ) >/tmp/held.out 2>&1 & H=$!
sleep 2; [ -d /proc/$H ] || fail "I/O did not wait while suspended"
T "suspended; held writer waiting"
start --recover-dev-id 0
wait $H; cat /tmp/held.out /tmp/late.out
grep -q 'held rc=0' /tmp/held.out || fail "held write failed"
[ "$(md5 /mnt/v/held)" = "$(md5 /tmp/src/f2)" ] || fail "held write content wrong"
T "suspend/resume ok"
T "umount"
umount /mnt/v || fail "umount after recoveries"
T "e2fsck"
e2fsck -fn $DEV >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck after recoveries"; }

echo "--- close, re-add, verify"
kill -TERM $SPID; wait $SPID || fail "close exit code $?"
wait_for '[ ! -e /dev/ublkb0 ]' 50 || fail "device still present after close"
[ "$(state)" = ABSENT ] || fail "device not deleted: $(state)"
start
mount -t ext4 -o ro $DEV /mnt/v
(cd /mnt/v && md5sum -c /tmp/src.md5 >/dev/null) || fail "files differ after close+reopen"
[ "$(md5 /mnt/v/held)" = "$(md5 /tmp/src/f2)" ] || fail "held file differs after reopen"
umount /mnt/v
e2fsck -fn $DEV >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck after reopen"; }
kill -TERM $SPID; wait $SPID
T "transport scenario done"
grep -i -E "error|panic" /tmp/srv.log && echo "(server log above)" || true
