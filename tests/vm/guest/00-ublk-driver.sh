#!/bin/sh
# Smoke test: the driver is loaded, the control node exists, the kvcrypt binaries run.
. /kvtest/lib.sh
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing"
cat /proc/version
kvcrypt --version
kvcrypt-kv-emulator --help >/dev/null 2>&1 || kvcrypt-kv-emulator --version || true
ip addr show lo | grep -q 'inet 127.0.0.1' || fail "loopback not up"
T "smoke ok"
