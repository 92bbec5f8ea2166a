#!/bin/sh
# The agent recovers a crashed ublk worker in place: SIGKILL the worker the agent started (ext4
# writer in flight) → the agent notices at once (its check interval is 5 min: only its exit watch
# can), unwraps the key again and starts a new worker with --recover-dev-id: the SAME
# /dev/ublkbN under a new pid, writer finishes, md5 intact. Killed again while the vault fails
# (503): the device stays QUIESCED, a direct read started meanwhile is held and completes with the
# right bytes once the vault is back. Killed while unwrap is revoked: suspended, no new worker;
# granted + `kvcrypt unlock` → serving on the same device. SIGTERM closes it; reopen, e2fsck -fn, md5.
. /kvtest/lib.sh
. /kvtest/emu.sh
on_fail() {
  echo "--- status"; kvcrypt status --json 2>&1 | head -40
  echo "--- state files"; cat /run/kvcrypt/volumes/*.json 2>/dev/null
  echo "--- agent log"; tail -40 /tmp/cv/agent.log 2>/dev/null
  echo "--- emulator log"; tail -10 /tmp/kvemu/log; echo "--- dmesg"; dmesg | tail -20
}
stop_agent() {
  [ -n "${AGENT:-}" ] && [ -d "/proc/$AGENT" ] || return 0
  kill "$AGENT" 2>/dev/null || true
  wait_for "[ ! -d /proc/$AGENT ]" 300 || kill -9 "$AGENT" 2>/dev/null || true
}
# On failure the device may be held (dead worker, vault failing or revoked): let the agent
# recover it first, or the unmount blocks until the time limit.
trap 'rc=$?; if [ "$rc" != 0 ] && [ -n "${A:-}" ]; then { $A clear-faults; $A grant --principal "$CID" --op unwrap --key kek; kvcrypt unlock cv; } >/dev/null 2>&1 || true; fi; umount /mnt/c 2>/dev/null || true; stop_agent; kvcrypt close cv >/dev/null 2>&1 || true; emu_stop; exit $rc' EXIT
vol_field() { kvcrypt status cv --json 2>/dev/null | sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p" | head -1; }
restarts() { kvcrypt status cv --json 2>/dev/null | sed -n 's/.*"restarts": *\([0-9]*\).*/\1/p' | head -1; }
wait_state() { wait_for "[ \"\$(vol_field state)\" = $1 ]" "$2"; }
worker_pid() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' /run/kvcrypt/volumes/cv.json 2>/dev/null; }
dev_state() { command -v ublk_file_server >/dev/null && ublk_file_server --state "$1" 2>/dev/null | cut -d' ' -f1; }
# ms_since START: milliseconds from an uptime reading to now.
ms_since() { awk -v a="$1" -v b="$(up)" 'BEGIN { printf "%d", (b - a) * 1000 }'; }
emu_start
# Scenarios share the guest's /tmp: keep this one's files apart.
rm -rf /tmp/cv; mkdir -p /tmp/cv

dd if=/dev/zero of=/tmp/cv/cv.img bs=1M count=48 2>/dev/null
kvcrypt format /tmp/cv/cv.img --key-id "$KEY_ID" --label crashvm --yes >/dev/null || fail "format"
cat >> /etc/kvcrypt/kvcrypt.toml <<EOT

[agent]
check_interval = "5m"
check_jitter = 0.0
check_timeout = "10s"
hold = "10m"

[agent.unlock_retry]
initial = "500ms"
max = "2s"

[[volume]]
name = "cv"
path = "/tmp/cv/cv.img"
transport = "ublk"
queues = 2
EOT

kvcrypt agent >>/tmp/cv/agent.log 2>&1 & AGENT=$!
T "agent started (pid $AGENT)"
wait_state serving 600 || fail "agent did not reach serving"
DEV=$(vol_field block_device)
case $DEV in /dev/ublkb[0-9]*) ;; *) fail "block_device '$DEV', expected /dev/ublkbN";; esac
ID=${DEV#/dev/ublkb}
T "serving on $DEV"
mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4"
mkdir -p /mnt/c; mount -t ext4 "$DEV" /mnt/c || fail "mount"
dd if=/dev/urandom of=/tmp/cv/c1 bs=64k count=32 2>/dev/null
cp /tmp/cv/c1 /mnt/c/c1 || fail "write c1"; sync
SUM=$(md5 /tmp/cv/c1)
# The last 64 KiB of the device: never written by this small ext4, so their plaintext is stable.
SKIP=$(( $(cat /sys/block/${DEV#/dev/}/size) / 8 - 16 ))
dd if="$DEV" of=/tmp/cv/r0 bs=4k count=16 skip=$SKIP iflag=direct 2>/dev/null || fail "raw read"

# 1. SIGKILL with an ext4 writer in flight.
dd if=/dev/urandom of=/tmp/cv/c2 bs=64k count=160 2>/dev/null
( dd if=/tmp/cv/c2 of=/mnt/c/c2 bs=64k oflag=direct 2>/tmp/cv/w.err && sync; echo $? > /tmp/cv/w.rc ) & W=$!
sleep 0.3
W1=$(worker_pid); [ -n "$W1" ] && [ -d "/proc/$W1" ] || fail "no live worker pid in the state file"
K=$(up); kill -9 "$W1"
T "worker $W1 SIGKILLed (writer running: $([ -d /proc/$W ] && echo yes || echo no))"
wait_for "[ \"\$(restarts)\" = 1 ] && [ \"\$(vol_field state)\" = serving ]" 300 \
  || fail "agent did not recover the worker (state $(vol_field state), restarts $(restarts))"
T "serving again after $(ms_since "$K") ms (kill -> serving, as seen by kvcrypt status)"
NEW=$(vol_field block_device); W2=$(worker_pid)
[ "$NEW" = "$DEV" ] || fail "recovered on $NEW, expected the same $DEV"
[ -n "$W2" ] && [ "$W2" != "$W1" ] && [ -d "/proc/$W2" ] || fail "no new worker (was $W1, now '$W2')"
grep -q "worker restarted after it died: recovered $DEV in place" /tmp/cv/agent.log || fail "no recovery line in the agent log"
T "same $DEV under new worker $W2"
wait_for "[ -e /tmp/cv/w.rc ]" 600 || fail "writer did not finish after recovery"
[ "$(cat /tmp/cv/w.rc)" = 0 ] || { cat /tmp/cv/w.err; fail "writer failed across the crash"; }
echo 3 > /proc/sys/vm/drop_caches
[ "$(md5 /mnt/c/c1)" = "$SUM" ] || fail "md5 of c1 differs after recovery"
[ "$(md5 /mnt/c/c2)" = "$(md5 /tmp/cv/c2)" ] || fail "md5 of c2 (written across the crash) differs"
T "writer finished, md5 intact"

# 2. SIGKILL while the vault fails: the device holds its I/O until a worker can be started.
$A fault status --status 503 --target all >/dev/null || fail "inject 503"
W2=$(worker_pid); K=$(up); kill -9 "$W2"
T "worker $W2 SIGKILLed with the vault failing"
wait_for "[ \"\$(vol_field state)\" = unlocking ]" 100 || fail "agent did not notice (state $(vol_field state))"
T "agent: $(vol_field reason | cut -c1-100)"
( dd if="$DEV" of=/tmp/cv/r1 bs=4k count=16 skip=$SKIP iflag=direct 2>/tmp/cv/r1.err; echo $? > /tmp/cv/r1.rc ) & R=$!
sleep 2
if [ ! -d "/proc/$R" ] || [ -e /tmp/cv/r1.rc ]; then
  cmp -s /tmp/cv/r0 /tmp/cv/r1 && same=same || same=other
  fail "raw read was not held while the worker was dead (rc $(cat /tmp/cv/r1.rc 2>/dev/null), $same bytes, device $(dev_state "$ID"), state $(vol_field state))"
fi
[ "$(vol_field state)" = unlocking ] || fail "state $(vol_field state) while the vault fails"
T "raw read held while the worker is dead (device $(dev_state "$ID"))"
$A clear-faults >/dev/null || fail "clear faults"
wait_for "[ \"\$(restarts)\" = 2 ] && [ \"\$(vol_field state)\" = serving ]" 300 \
  || fail "agent did not recover after the vault came back (state $(vol_field state))"
T "serving again $(ms_since "$K") ms after the kill (vault back)"
[ "$(vol_field block_device)" = "$DEV" ] || fail "recovered on $(vol_field block_device), expected $DEV"
wait_for "[ ! -d /proc/$R ]" 300 || fail "held raw read did not finish after recovery"
[ "$(cat /tmp/cv/r1.rc)" = 0 ] || { cat /tmp/cv/r1.err; fail "held raw read failed (rc $(cat /tmp/cv/r1.rc))"; }
cmp /tmp/cv/r0 /tmp/cv/r1 || fail "held raw read returned other bytes"
T "held raw read completed with the same bytes"

# 3. SIGKILL while unwrap is revoked: suspended (device QUIESCED), no worker resurrected.
$A revoke --principal "$CID" --op unwrap --key kek >/dev/null || fail "revoke"
W3=$(worker_pid); kill -9 "$W3"
wait_state suspended 300 || fail "not suspended after a kill while revoked (state $(vol_field state))"
T "suspended: $(vol_field reason | cut -c1-100)"
sleep 3
[ "$(vol_field state)" = suspended ] || fail "state $(vol_field state) while revoked"
W4=$(worker_pid)
[ -z "$W4" ] || [ ! -d "/proc/$W4" ] || fail "a worker ($W4) runs while revoked"
[ -b "$DEV" ] || fail "$DEV vanished while suspended"
T "no worker while revoked; device $(dev_state "$ID")"
$A grant --principal "$CID" --op unwrap --key kek >/dev/null || fail "grant"
# The next periodic check is minutes away: ask now, as an operator would.
kvcrypt unlock cv >/dev/null || fail "kvcrypt unlock after grant"
wait_state serving 300 || fail "not serving after grant (state $(vol_field state))"
[ "$(vol_field block_device)" = "$DEV" ] || fail "resumed on $(vol_field block_device), expected $DEV"
echo 3 > /proc/sys/vm/drop_caches
[ "$(md5 /mnt/c/c1)" = "$SUM" ] && [ "$(md5 /mnt/c/c2)" = "$(md5 /tmp/cv/c2)" ] || fail "md5 after revoke while dead"
T "granted: serving on $DEV, md5 intact"

umount /mnt/c || fail "umount"
kill "$AGENT"
wait_for "[ ! -d /proc/$AGENT ]" 300 || fail "agent did not exit on SIGTERM"
[ ! -e "$DEV" ] || fail "$DEV still exists after the agent's SIGTERM"
DEV2=$(kvcrypt open /tmp/cv/cv.img cv --transport ublk --no-access-checks) || fail "reopen"
e2fsck -fn "$DEV2" >/tmp/cv/fsck.out 2>&1 || { cat /tmp/cv/fsck.out; fail "e2fsck -fn"; }
mount -t ext4 -o ro "$DEV2" /mnt/c || fail "mount after reopen"
[ "$(md5 /mnt/c/c1)" = "$SUM" ] && [ "$(md5 /mnt/c/c2)" = "$(md5 /tmp/cv/c2)" ] || fail "md5 after reopen"
umount /mnt/c
kvcrypt close cv || fail "close"
# The agent's own account (timestamps: death noticed → new worker serving).
awk '/serving worker died|worker restarted after|not restarting/ { gsub(/\033\[[0-9;]*m/, ""); print "GUEST-T agent log: " substr($0, 1, 230) }' /tmp/cv/agent.log
T "agent worker-crash scenario done"
