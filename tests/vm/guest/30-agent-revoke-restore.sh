#!/bin/sh
# The agent on ublk: `kvcrypt agent` unlocks a [[volume]] (by path, transport ublk), ext4 on it;
# revoking unwrap in the emulator suspends it (worker exits, device QUIESCED, I/O held); granting
# it back resumes it on the SAME /dev/ublkbN, data intact and writable; after SIGKILL a new agent
# adopts the running worker (same device); SIGTERM closes it; e2fsck -fn is clean.
. /kvtest/lib.sh
. /kvtest/emu.sh
on_fail() {
  echo "--- status"; kvcrypt status --json 2>&1 | head -40
  echo "--- state files"; cat /run/kvcrypt/volumes/*.json 2>/dev/null
  echo "--- agent log"; tail -40 /tmp/agent.log 2>/dev/null
  echo "--- emulator log"; tail -10 /tmp/kvemu/log; echo "--- dmesg"; dmesg | tail -20
}
stop_agent() {
  [ -n "${AGENT:-}" ] && [ -d "/proc/$AGENT" ] || return 0
  kill "$AGENT" 2>/dev/null || true
  wait_for "[ ! -d /proc/$AGENT ]" 300 || kill -9 "$AGENT" 2>/dev/null || true
}
trap 'rc=$?; umount /mnt/a 2>/dev/null || true; stop_agent; kvcrypt close av >/dev/null 2>&1 || true; emu_stop; exit $rc' EXIT
start_agent() { kvcrypt agent >>/tmp/agent.log 2>&1 & AGENT=$!; T "agent started (pid $AGENT)"; }
# vol_field FIELD: one string field of volume "av" from `kvcrypt status --json`.
vol_field() { kvcrypt status av --json 2>/dev/null | sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p" | head -1; }
# wait_state STATE TENTHS
wait_state() { wait_for "[ \"\$(vol_field state)\" = $1 ]" "$2"; }
emu_start

dd if=/dev/zero of=/tmp/av.img bs=1M count=48 2>/dev/null
kvcrypt format /tmp/av.img --key-id "$KEY_ID" --label agentvm --yes >/dev/null || fail "format"
cat >> /etc/kvcrypt/kvcrypt.toml <<EOT

[agent]
check_interval = "1s"
check_jitter = 0.0
check_timeout = "20s"
hold = "10m"

[[volume]]
name = "av"
path = "/tmp/av.img"
transport = "ublk"
queues = 2
EOT

start_agent
wait_state serving 600 || fail "agent did not reach serving"
DEV=$(vol_field block_device)
T "serving on $DEV"
case $DEV in /dev/ublkb[0-9]*) ;; *) fail "block_device '$DEV', expected /dev/ublkbN";; esac
[ -b "$DEV" ] || fail "$DEV is not a block device"

mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4"
mkdir -p /mnt/a; mount -t ext4 "$DEV" /mnt/a || fail "mount"
dd if=/dev/urandom of=/tmp/a1 bs=64k count=32 2>/dev/null
cp /tmp/a1 /mnt/a/a1 || fail "write a1"; sync
SUM=$(md5 /tmp/a1)
[ "$(md5 /mnt/a/a1)" = "$SUM" ] || fail "md5 of a1 differs before revocation"
T "ext4 written"

# The last 64 KiB of the device: never written by this small ext4 (one block group), so unlike the
# superblock (rewritten by freeze/thaw) their plaintext is stable.
SKIP=$(( $(cat /sys/block/${DEV#/dev/}/size) / 8 - 16 ))
dd if="$DEV" of=/tmp/r0 bs=4k count=16 skip=$SKIP iflag=direct 2>/dev/null || fail "raw read before revocation"
$A revoke --principal "$CID" --op unwrap --key kek >/dev/null || fail "revoke"
T "unwrap revoked"
wait_state suspended 300 || fail "agent did not suspend after revocation (state $(vol_field state))"
T "suspended ($(vol_field reason | cut -c1-80))"
[ -b "$DEV" ] || fail "$DEV vanished while suspended"
ID=${DEV#/dev/ublkb}
command -v ublk_file_server >/dev/null && T "device state $(ublk_file_server --state "$ID" 2>/dev/null | cut -d' ' -f1)"
# A direct read of the raw device must be held (not failed) while suspended, and complete after
# the resume with the same bytes as before.
( dd if="$DEV" of=/tmp/r1 bs=4k count=16 skip=$SKIP iflag=direct 2>/tmp/r1.err; echo $? > /tmp/r1.rc ) & R=$!
sleep 1
[ -d "/proc/$R" ] && [ ! -e /tmp/r1.rc ] || fail "raw read was not held while suspended (rc $(cat /tmp/r1.rc 2>/dev/null))"
T "raw read held while suspended"
$A grant --principal "$CID" --op unwrap --key kek >/dev/null || fail "grant"
T "unwrap granted"
wait_state serving 300 || fail "agent did not resume after grant (state $(vol_field state))"
NEW=$(vol_field block_device)
T "serving again on $NEW"
[ "$NEW" = "$DEV" ] || fail "resumed on $NEW, expected the same $DEV"
wait_for "[ ! -d /proc/$R ]" 300 || fail "held raw read did not finish after resume"
[ "$(cat /tmp/r1.rc)" = 0 ] || { cat /tmp/r1.err; fail "held raw read failed (rc $(cat /tmp/r1.rc))"; }
cmp /tmp/r0 /tmp/r1 || fail "held raw read returned other bytes"
T "held raw read completed with the same bytes"
echo 3 > /proc/sys/vm/drop_caches
[ "$(md5 /mnt/a/a1)" = "$SUM" ] || fail "md5 of a1 differs after resume"
dd if=/dev/urandom of=/tmp/a2 bs=64k count=16 2>/dev/null
cp /tmp/a2 /mnt/a/a2 || fail "write after resume"; sync
[ "$(md5 /mnt/a/a2)" = "$(md5 /tmp/a2)" ] || fail "md5 of a2 differs"
T "data intact and writable after resume"

worker_pid() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' /run/kvcrypt/volumes/av.json; }
WPID=$(worker_pid); [ -n "$WPID" ] && [ -d "/proc/$WPID" ] || fail "no live worker pid in the state file"
kill -9 "$AGENT"; wait_for "[ ! -d /proc/$AGENT ]" 50 || fail "agent did not die"
T "agent SIGKILLed"
[ "$(md5 /mnt/a/a1)" = "$SUM" ] || fail "device unusable without the agent"
start_agent
wait_state serving 300 || fail "restarted agent did not adopt (state $(vol_field state))"
NEW=$(vol_field block_device)
[ "$NEW" = "$DEV" ] || fail "adopted on $NEW, expected the same $DEV"
[ "$(worker_pid)" = "$WPID" ] && [ -d "/proc/$WPID" ] || fail "worker $WPID was replaced, not adopted (now $(worker_pid))"
T "adopted $NEW (worker $WPID kept)"

umount /mnt/a || fail "umount"
kill "$AGENT"
wait_for "[ ! -d /proc/$AGENT ]" 300 || fail "agent did not exit on SIGTERM"
T "agent stopped"
[ ! -e "$DEV" ] || fail "$DEV still exists after the agent's SIGTERM"
# The device is gone: check the filesystem on a fresh open.
DEV2=$(kvcrypt open /tmp/av.img av --transport ublk --no-access-checks) || fail "reopen"
e2fsck -fn "$DEV2" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck -fn"; }
mount -t ext4 -o ro "$DEV2" /mnt/a || fail "mount after reopen"
[ "$(md5 /mnt/a/a1)" = "$SUM" ] && [ "$(md5 /mnt/a/a2)" = "$(md5 /tmp/a2)" ] || fail "md5 after reopen"
umount /mnt/a
kvcrypt close av || fail "close"
T "agent scenario done"
