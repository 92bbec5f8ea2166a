#!/bin/sh
# One ublk queue serves many requests at once. The volume lives on the scratch NVMe disk
# (/dev/nvme0n1, emulated: real I/O latency) when the harness provides it, else on a file.
# Raw fio randread/randwrite on that disk first (the ceiling), then `kvcrypt open --queues 1`, fio verify
# (crc32c, 2 jobs x iodepth 16, zero errors), fio randread and randwrite 4 KiB at iodepth 32
# (numbers printed as FIO-VM lines: TCG, functional only), and the worker's log must show more
# than one request in flight on queue 0 at the same time.
. /kvtest/lib.sh
. /kvtest/emu.sh
command -v fio >/dev/null || fail "fio not in the initramfs"
LOG=/run/kvcrypt/volumes/vol4.log
on_fail() {
  echo "--- worker log"; tail -30 $LOG 2>/dev/null; echo "--- fio"; tail -30 /tmp/fio.out 2>/dev/null
  echo "--- dmesg"; dmesg | tail -20
}
trap 'rc=$?; kvcrypt close vol4 >/dev/null 2>&1 || true; emu_stop; exit $rc' EXIT
iops() { sed -n "s/.*$1: IOPS=\([^,]*\),.*/\1/p" /tmp/fio.out | head -1; }
# fio_run NAME DEV RW: 4 KiB direct random I/O at iodepth 32 for 8 s, prints one FIO-VM line.
fio_run() {
  fio --name="$1" --filename="$2" --direct=1 --ioengine=libaio --rw="$3" --bs=4k --iodepth=32 \
    --size=64M --runtime=8 --time_based >/tmp/fio.out 2>&1 || fail "fio $1"
  echo "FIO-VM $1 4k iodepth 32: IOPS=$(iops "${3#rand}")"
}
emu_start

if [ -b /dev/nvme0n1 ]; then
  BACK=/dev/nvme0n1
  fio_run raw-randread $BACK randread
  fio_run raw-randwrite $BACK randwrite
  dd if=/dev/zero of=$BACK bs=1M count=4 oflag=direct 2>/dev/null
else
  BACK=/tmp/vol4.img
  dd if=/dev/zero of=$BACK bs=1M count=72 2>/dev/null
fi
T "backing store $BACK"
kvcrypt format $BACK --key-id "$KEY_ID" --yes >/dev/null || fail "format $BACK"
# The worker inherits KVCRYPT_LOG: info shows the queue's in-flight high-water marks.
DEV=$(KVCRYPT_LOG=info kvcrypt open $BACK vol4 --transport ublk --no-access-checks --queues 1) || fail "open"
ID=${DEV#/dev/ublkb}
[ "$(ls /sys/block/ublkb$ID/mq/ | wc -l)" = 1 ] || fail "expected 1 hw queue"
T "opened $DEV with one queue"

fio --name=verify --filename="$DEV" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
  --iodepth=16 --numjobs=2 --size=16M --offset_increment=16M --verify=crc32c --do_verify=1 \
  --verify_fatal=1 --group_reporting >/tmp/fio.out 2>&1 || fail "fio verify (exit $?)"
grep -q "err= 0" /tmp/fio.out || fail "fio verify reported errors"
T "fio verify crc32c: no errors"

fio_run kvcrypt-q1-randread "$DEV" randread
fio_run kvcrypt-q1-randwrite "$DEV" randwrite

# For reading the numbers: XTS speed of this (emulated) CPU bounds what one queue thread can do.
kvcrypt benchmark --seconds 1 2>/dev/null | grep '(default)' | sed 's/^/XTS-VM /' || true

# "ublk: queue 0: N requests in flight at once (new high)", logged at each new power of two.
MAX=$(sed -n 's/.*queue 0: \([0-9]*\) requests in flight at once.*/\1/p' $LOG | sort -n | tail -1)
echo "UBLK-MAX-INFLIGHT queue 0: ${MAX:-none}"
[ -n "$MAX" ] && [ "$MAX" -gt 1 ] || fail "queue 0 never had more than one request in flight (max ${MAX:-not logged})"
T "queue 0 served up to $MAX requests at once"

kvcrypt close vol4 || fail "close"
T "concurrency scenario done"
