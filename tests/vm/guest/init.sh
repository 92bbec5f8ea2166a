#!/bin/busybox sh
# PID 1 of the kvcrypt test VM: set up a minimal system, load ublk_drv, run each scenario under a
# time limit, print one GUEST-RESULT line, power off.
/bin/busybox --install -s /bin
export PATH=/bin HOME=/ TERM=dumb
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/shm /dev/pts; mount -t tmpfs tmpfs /dev/shm; mount -t tmpfs tmpfs /run
mount -t tmpfs -o size=400m tmpfs /tmp
up() { cut -d' ' -f1 /proc/uptime; }
echo "GUEST-T init $(up)"
ip link set lo up || echo "GUEST: could not bring up lo"
insmod /lib/modules/ublk_drv.ko && echo "GUEST-T ublk_drv loaded $(up)"
TT=$(cat /kvtest/test_timeout)
fails=0; n=0
for s in $(cat /kvtest/scenarios); do
  n=$((n+1)); t0=$(up)
  echo "GUEST-SCENARIO $s START $t0 (limit ${TT}s)"
  ( cd /kvtest && timeout "$TT" sh "/kvtest/$s.sh" ); rc=$?
  t1=$(up); dt=$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")
  if [ $rc -eq 0 ]; then echo "GUEST-SCENARIO $s PASS ${dt}s"
  else fails=$((fails+1)); echo "GUEST-SCENARIO $s FAIL rc=$rc ${dt}s"; fi
done
w=$(dmesg | grep -c -E 'WARNING:|BUG:|Call Trace')
echo "GUEST: kernel warnings/traces: $w"; [ "$w" -eq 0 ] || dmesg | grep -E -A4 'WARNING:|BUG:' | head -40
if [ $fails -eq 0 ] && [ $n -gt 0 ] && [ "$w" -eq 0 ]; then echo "GUEST-RESULT: PASS"
else echo "GUEST-RESULT: FAIL ($fails of $n scenarios failed, $w kernel warnings)"; fi
echo "GUEST-T end $(up)"
sync; poweroff -f
