# Shared helpers for guest scenarios (busybox sh). Sourced by each scenario.
set -e
up() { cut -d' ' -f1 /proc/uptime; }
T() { echo "GUEST-T $* $(up)"; }
# Scenarios may define on_fail() to print their logs.
fail() { echo "GUEST-FAIL: $*"; if command -v on_fail >/dev/null 2>&1; then on_fail; fi; exit 1; }
# wait_for COND_CMD [tenths-of-seconds]: poll until the command succeeds.
wait_for() { _i=0; while ! eval "$1" >/dev/null 2>&1; do _i=$((_i+1)); [ $_i -gt "${2:-200}" ] && return 1; sleep 0.1; done; }
md5() { md5sum "$1" | cut -d' ' -f1; }
