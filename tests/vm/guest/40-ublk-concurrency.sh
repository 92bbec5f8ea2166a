#!/bin/sh
# One ublk queue serves many requests at once: `kvcrypt open --queues 1`, fio verify (crc32c,
# 2 jobs x iodepth 16, zero errors), then fio randread 4 KiB at iodepth 32 and randwrite 4 KiB at
# iodepth 32 (numbers printed as FIO-VM lines: TCG, functional only), and the worker's log must
# show more than one request in flight on queue 0 at the same time.
. /kvtest/lib.sh
. /kvtest/emu.sh
command -v fio >/dev/null || fail "fio not in the initramfs"
LOG=/run/kvcrypt/volumes/vol4.log
on_fail() {
  echo "--- worker log"; tail -30 $LOG 2>/dev/null; echo "--- fio"; tail -30 /tmp/fio.out 2>/dev/null
  echo "--- dmesg"; dmesg | tail -20
}
trap 'rc=$?; kvcrypt close vol4 >/dev/null 2>&1 || true; emu_stop; exit $rc' EXIT
emu_start

dd if=/dev/zero of=/tmp/vol4.img bs=1M count=72 2>/dev/null
kvcrypt format /tmp/vol4.img --key-id "$KEY_ID" --yes >/dev/null || fail "format"
# The worker inherits KVCRYPT_LOG: info shows the queue's in-flight high-water marks.
DEV=$(KVCRYPT_LOG=info kvcrypt open /tmp/vol4.img vol4 --transport ublk --queues 1) || fail "open"
ID=${DEV#/dev/ublkb}
[ "$(ls /sys/block/ublkb$ID/mq/ | wc -l)" = 1 ] || fail "expected 1 hw queue"
T "opened $DEV with one queue"

fio --name=verify --filename="$DEV" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
  --iodepth=16 --numjobs=2 --size=16M --offset_increment=16M --verify=crc32c --do_verify=1 \
  --verify_fatal=1 --group_reporting >/tmp/fio.out 2>&1 || fail "fio verify (exit $?)"
grep -q "err= 0" /tmp/fio.out || fail "fio verify reported errors"
T "fio verify crc32c: no errors"

iops() { sed -n "s/.*$1: IOPS=\([^,]*\),.*/\1/p" /tmp/fio.out | head -1; }
fio --name=randread --filename="$DEV" --direct=1 --ioengine=libaio --rw=randread --bs=4k \
  --iodepth=32 --size=64M --runtime=8 --time_based >/tmp/fio.out 2>&1 || fail "fio randread"
echo "FIO-VM randread 4k iodepth 32 queues 1: IOPS=$(iops read)"
fio --name=randwrite --filename="$DEV" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
  --iodepth=32 --size=64M --runtime=8 --time_based >/tmp/fio.out 2>&1 || fail "fio randwrite"
echo "FIO-VM randwrite 4k iodepth 32 queues 1: IOPS=$(iops write)"

# "ublk: queue 0: N requests in flight at once (new high)", logged at each new power of two.
MAX=$(sed -n 's/.*queue 0: \([0-9]*\) requests in flight at once.*/\1/p' $LOG | sort -n | tail -1)
echo "UBLK-MAX-INFLIGHT queue 0: ${MAX:-none}"
[ -n "$MAX" ] && [ "$MAX" -gt 1 ] || fail "queue 0 never had more than one request in flight (max ${MAX:-not logged})"
T "queue 0 served up to $MAX requests at once"

kvcrypt close vol4 || fail "close"
T "concurrency scenario done"
