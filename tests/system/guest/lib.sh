# Helpers of the in-guest system checks (sourced by kvtest.sh).
# Output conventions, read by tests/system/run.py on the serial console:
#   KVTEST-RESULT <transport> <check> PASS|FAIL <detail>
#   KVTEST-TIME <transport> <name> <seconds>
#   KVHOST <request> <args>       the host acts on it (QMP hotplug); the guest waits for the effect
#   KVTEST-SHUTDOWN <kind> <phase> the next qemu exit is a requested poweroff/reboot
#   KVTEST-DONE <transport>       every phase ran

. /etc/kvtest/env
STATE_DIR=/var/lib/kvtest
VOL=data
A=(kvcrypt-kv-emulator admin --url https://127.0.0.1:443/_admin --state-dir /var/lib/kvemu)

up() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(up)" 'BEGIN { printf "%.2f", b - a }'; }
H() { echo; echo "===== KVTEST [$(up)] $* ====="; }
# Runs a command bounded (TCG is slow, nothing may hang the run), echoing it and its status.
R() { echo "+ $*"; timeout 120 "$@"; local rc=$?; echo "[rc=$rc]"; return $rc; }
pass() { echo "KVTEST-RESULT $TRANSPORT $1 PASS ${*:2}"; }
fail() { echo "KVTEST-RESULT $TRANSPORT $1 FAIL ${*:2}"; echo "$1" >> "$STATE_DIR/failures"; }
# check NAME DETAIL CONDITION: PASS if the condition (shell code, run here with these helpers)
# succeeds.
check() {
  if eval "$3"; then pass "$1" "$2"; else fail "$1" "$2"; fi
}
timing() { echo "KVTEST-TIME $TRANSPORT $1 $2"; }

# kvcrypt status of a volume as JSON (one object).
status_json() { timeout 30 kvcrypt status "$1" --json 2>/dev/null | jq -c 'if type == "array" then .[0] else . end' 2>/dev/null; }
field() { status_json "$1" | jq -r ".$2 // empty" 2>/dev/null; }
state() { field "$1" state; }
# wait_until SECONDS CMD...: polls every 0.2 s.
wait_until() {
  local secs=$1; shift
  local end; end=$(awk -v u="$(up)" -v s="$secs" 'BEGIN { print u + s }')
  while :; do
    "$@" && return 0
    awk -v u="$(up)" -v e="$end" 'BEGIN { exit !(u > e) }' && return 1
    sleep 0.2
  done
}
is_state() { [ "$(state "$1")" = "$2" ]; }
wait_state() { wait_until "$3" is_state "$1" "$2"; }
worker_pid() { jq -r '.pid // empty' "/run/kvcrypt/volumes/$1.json" 2>/dev/null; }
agent_pid() { systemctl show -p MainPID --value kvcrypt-agent; }
mount_unit() { systemd-escape -p --suffix=mount "$MNT"; }
# Mount id of $MNT (changes when it is unmounted and mounted again).
mount_id() { awk -v m="$MNT" '$5 == m { print $1 }' /proc/self/mountinfo | tail -1; }
mounted_from() { findmnt -n -o SOURCE --target "$MNT" 2>/dev/null | grep -q . && [ "$(findmnt -n -o TARGET --target "$MNT")" = "$MNT" ]; }
data_md5() { echo 3 > /proc/sys/vm/drop_caches; timeout 60 md5sum < "$MNT/testfile" | cut -d' ' -f1; }
md5_ok() { [ "$(data_md5)" = "$EXPECT_MD5" ]; }
hot_md5_ok() { [ "$(timeout 60 md5sum < /dev/disk/by-kvcrypt/hot | cut -d' ' -f1)" = "$HOT_MD5" ]; }
linked_to() { [ "$(readlink -f "/dev/disk/by-kvcrypt/$1")" = "$2" ]; }
mounted_on() { [ "$(readlink -f "$(findmnt -no SOURCE "$MNT")")" = "$1" ]; }
no_d_state() { [ -z "$(d_state)" ]; }
# A served device no longer serves: a ublk node is deleted; a loop device node stays (loop
# nodes are persistent) but has no backing file any more.
dev_gone() {
  case $1 in
    /dev/loop*) [ ! -e "/sys/block/${1#/dev/}/loop/backing_file" ] ;;
    *) [ ! -b "$1" ] ;;
  esac
}
# Processes in uninterruptible sleep (a stuck umount or I/O on a dead device shows here).
d_state() { ps -eo pid,stat,wchan:24,args | awk 'NR > 1 && $2 ~ /^D/'; }
no_hung() { [ -z "$(d_state)" ] && ! dmesg | grep -q 'blocked for more than'; }
host() { echo "KVHOST $*"; }

# A write to the filesystem that must wait while the volume is suspended (frozen, I/O held) and
# complete after resume. Started in the background; held_done tells whether it completed.
start_held_write() {
  rm -f /run/kvtest-held.done
  ( dd if=/dev/urandom of="$MNT/held-$1" bs=64k count=4 conv=fsync status=none \
      && echo ok > /run/kvtest-held.done ) &
  HELD_PID=$!
}
held_done() { [ -s /run/kvtest-held.done ]; }

dump_state() {
  echo "--- kvcrypt status"; timeout 30 kvcrypt status 2>&1
  echo "--- units"; systemctl --no-pager list-units --all 'kvcrypt*' "$(mount_unit)" 2>&1
  echo "--- journal (agent, attach)"; journalctl -b --no-pager -o short-monotonic -u kvcrypt-agent -u 'kvcrypt-attach@*' | tail -40
  echo "--- devices"; ls -l /dev/disk/by-kvcrypt/ /dev/ublkb* /dev/loop[0-9]* 2>&1 | head -20
  echo "--- D state"; d_state
}
# A new agent main process (not OLD_PID) is running and active.
new_agent_since() { local p; p=$(agent_pid); [ "$p" != 0 ] && [ "$p" != "$1" ] && systemctl is-active -q kvcrypt-agent; }
# The volume's state file names a live worker other than OLD_PID.
new_worker_since() { local p; p=$(worker_pid "$VOL"); [ -n "$p" ] && [ "$p" != "$1" ] && [ -d "/proc/$p" ]; }
