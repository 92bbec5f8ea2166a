#!/usr/bin/env bash
# fio-compare.sh — throughput of the kvcrypt FUSE+loop device against its ceiling and its peer.
#
# Rows (every one is a loop device with direct I/O and 4096-byte logical blocks, so the
# kernel-side path is the same):
#   kvcrypt  kvcrypt's FUSE+loop transport (`kvcrypt open --transport fuse`), volume formatted
#            through the bundled Key Vault emulator (loopback only).
#   ceiling  the same backing file through a plain loop device (`losetup --direct-io=on
#            --offset <data offset>`): no encryption, no FUSE — the upper bound.
#   peer     qemu-storage-daemon serving a LUKS2 aes-xts-plain64 image (qemu-img create -f luks)
#            through its FUSE export, attached to a loop device: the nearest userspace peer.
#
# Columns: fio sequential 1 MiB write/read (MB/s) and random 4 KiB read/write (IOPS), iodepth
# 32, direct I/O, io_uring, one job, time-based. Each device is filled with a sequential write
# first, so reads decrypt real ciphertext. Prints a table plus kvcrypt's ratios to ceiling and
# peer. Timing numbers belong here, never in tests.
#
# Needs root, fio, python3, losetup, qemu-storage-daemon + qemu-img (Debian: qemu-system-x86 or
# qemu-utils + qemu-system-common), and a release build:
#   cargo build --release --bins && sudo benches/fio-compare.sh
# Options (environment): SIZE_MIB (default 1024), RUNTIME (seconds per test, default 10),
#   KVCRYPT_BIN_DIR (default target/release), WORK_DIR (default: new dir under /var/tmp),
#   QUEUES (kvcrypt FUSE threads, default: kvcrypt's default), ROWS (default "kvcrypt ceiling peer"),
#   FUSE_URING (1: set /sys/module/fuse/parameters/enable_uring=Y for the kvcrypt row, so it is
#   served over FUSE-over-io_uring (kernel 6.14+), and restore the old value afterwards; 0: set
#   it to N, forcing the /dev/fuse thread mode; unset: leave it as it is).
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-1024}
RUNTIME=${RUNTIME:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${KVCRYPT_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
KV=$BIN/kvcrypt
EMU=$BIN/kvcrypt-kv-emulator
ROWS=${ROWS:-"kvcrypt ceiling peer"}
WORK=${WORK_DIR:-$(mktemp -d /var/tmp/kvcrypt-bench.XXXXXX)}
NAME=kvbench$$
mkdir -p "$WORK"

for tool in fio python3 losetup; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
[ -x "$KV" ] && [ -x "$EMU" ] || { echo "build first: cargo build --release --bins (looked in $BIN)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root (loop devices, FUSE mounts)" >&2; exit 1; }

EMU_PID= QSD_PID= LOOPS=() URING_OLD=
URING_PARAM=/sys/module/fuse/parameters/enable_uring
cleanup() {
    set +e
    [ -n "$URING_OLD" ] && echo "$URING_OLD" >"$URING_PARAM"
    "$KV" close "$NAME" >/dev/null 2>&1
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
    [ -n "$QSD_PID" ] && kill "$QSD_PID" 2>/dev/null && sleep 0.5
    [ -n "$EMU_PID" ] && kill "$EMU_PID" 2>/dev/null
    [ -z "${KEEP:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT

# run_fio DEVICE LABEL: fills the device, then the four measurements; appends JSON lines.
run_fio() {
    local dev=$1 label=$2
    fio --name=fill --filename="$dev" --direct=1 --ioengine=io_uring --rw=write --bs=1M \
        --iodepth=32 --size=100% --output-format=json >/dev/null
    local spec
    for spec in "seqwrite write 1M" "seqread read 1M" "randread randread 4k" "randwrite randwrite 4k"; do
        set -- $spec
        fio --name="$1" --filename="$dev" --direct=1 --ioengine=io_uring --rw="$2" --bs="$3" \
            --iodepth=32 --numjobs=1 --time_based --runtime="$RUNTIME" --ramp_time=1 \
            --output-format=json >"$WORK/$label-$1.json"
    done
}

# --- kvcrypt -----------------------------------------------------------------------------
setup_kvcrypt() {
    "$EMU" --port 0 --state-dir "$WORK/emu" --ready-file "$WORK/emu-ready.json" >"$WORK/emu.log" 2>&1 &
    EMU_PID=$!
    for _ in $(seq 100); do [ -s "$WORK/emu-ready.json" ] && break; sleep 0.1; done
    local port
    port=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["port"])' "$WORK/emu-ready.json")
    local admin=("$EMU" admin --url "https://127.0.0.1:$port/_admin" --state-dir "$WORK/emu")
    head -c 24 /dev/urandom | base64 >"$WORK/secret"
    local cid
    cid=$("${admin[@]}" create-principal --name bench --secret-file "$WORK/secret" |
        python3 -c 'import json,sys;print(json.load(sys.stdin)["client_id"])')
    "${admin[@]}" create-key --key kek >/dev/null
    "${admin[@]}" grant --principal "$cid" --op unwrap,wrap,get >/dev/null
    cat >"$WORK/kvcrypt.toml" <<CFG
[vault]
# The keys allowed to unlock volumes (the header does not choose the vault).
keys = ["https://benchvault.vault.azure.net/keys/kek"]
resolve = ["benchvault.vault.azure.net:443:127.0.0.1:$port", "login.microsoftonline.com:443:127.0.0.1:$port"]
ca_file = "$WORK/emu/ca.pem"

[vault.credential]
kind = "client-secret"
tenant_id = "72f988bf-0000-4000-8000-00000000e4e1"
client_id = "$cid"
secret_file = "$WORK/secret"
CFG
    truncate -s $(((SIZE_MIB + 1) * 1048576)) "$WORK/kvcrypt.img"
    "$KV" --config "$WORK/kvcrypt.toml" format "$WORK/kvcrypt.img" \
        --key-id https://benchvault.vault.azure.net/keys/kek --yes >/dev/null
}

bench_kvcrypt() {
    local q=()
    [ -n "${QUEUES:-}" ] && q=(--queues "$QUEUES")
    if [ -n "${FUSE_URING:-}" ]; then
        [ -w "$URING_PARAM" ] || { echo "FUSE_URING set but $URING_PARAM is missing (kernel < 6.14?)" >&2; exit 1; }
        URING_OLD=$(cat "$URING_PARAM")
        if [ "$FUSE_URING" = 1 ]; then echo Y >"$URING_PARAM"; else echo N >"$URING_PARAM"; fi
    fi
    local dev mode
    dev=$("$KV" --config "$WORK/kvcrypt.toml" open "$WORK/kvcrypt.img" "$NAME" --transport fuse --no-access-checks "${q[@]}")
    # The mode is fixed at mount (INIT): the parameter can go back right away.
    if [ -n "$URING_OLD" ]; then echo "$URING_OLD" >"$URING_PARAM"; URING_OLD=; fi
    mode=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1])).get("fuse_mode","?"))' \
        "/run/kvcrypt/volumes/$NAME.json" 2>/dev/null || echo "?")
    echo "kvcrypt: $dev (loop dio=$(cat /sys/block/"${dev#/dev/}"/loop/dio), fuse_mode=$mode)" >&2
    run_fio "$dev" kvcrypt
    "$KV" close "$NAME"
}

bench_ceiling() {
    [ -f "$WORK/kvcrypt.img" ] || setup_kvcrypt
    local dev
    dev=$(losetup --find --show --direct-io=on --sector-size 4096 --offset 1048576 \
        --sizelimit $((SIZE_MIB * 1048576)) "$WORK/kvcrypt.img")
    LOOPS+=("$dev")
    echo "ceiling: $dev (loop dio=$(cat /sys/block/"${dev#/dev/}"/loop/dio))" >&2
    run_fio "$dev" ceiling
    losetup -d "$dev"
}

bench_peer() {
    for t in qemu-storage-daemon qemu-img; do
        command -v $t >/dev/null || { echo "peer: $t missing (apt-get install qemu-system-x86 qemu-utils)" >&2; return; }
    done
    qemu-img create -q -f luks --object secret,id=sec0,data=benchpass \
        -o key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=10 \
        "$WORK/luks.img" "${SIZE_MIB}M"
    : >"$WORK/luks.fuse"
    qemu-storage-daemon --object secret,id=sec0,data=benchpass \
        --blockdev "driver=file,node-name=file0,filename=$WORK/luks.img,cache.direct=on,aio=io_uring" \
        --blockdev driver=luks,node-name=luks0,file=file0,key-secret=sec0 \
        --export "type=fuse,id=exp0,node-name=luks0,mountpoint=$WORK/luks.fuse,writable=on" \
        --pidfile "$WORK/qsd.pid" --daemonize
    QSD_PID=$(cat "$WORK/qsd.pid")
    local dev
    dev=$(losetup --find --show --direct-io=on --sector-size 4096 "$WORK/luks.fuse")
    LOOPS+=("$dev")
    echo "peer: $dev (loop dio=$(cat /sys/block/"${dev#/dev/}"/loop/dio))" >&2
    run_fio "$dev" peer
    losetup -d "$dev"
    kill "$QSD_PID"
    QSD_PID=
}

case " $ROWS " in *" kvcrypt "*|*" ceiling "*) setup_kvcrypt ;; esac
for row in $ROWS; do "bench_$row"; done

python3 - "$WORK" $ROWS <<'PY'
import json, os, sys
work, rows = sys.argv[1], sys.argv[2:]
cols = [("seqwrite", "write", "bw"), ("seqread", "read", "bw"), ("randread", "read", "iops"), ("randwrite", "write", "iops")]
heads = ["seq write MB/s", "seq read MB/s", "rand read 4k IOPS", "rand write 4k IOPS"]
res = {}
for r in rows:
    vals = []
    for name, side, kind in cols:
        p = os.path.join(work, f"{r}-{name}.json")
        if not os.path.exists(p):
            vals.append(None); continue
        j = json.load(open(p))["jobs"][0][side]
        vals.append(j["bw_bytes"] / 1e6 if kind == "bw" else j["iops"])
    res[r] = vals
fmt = lambda v: "-" if v is None else f"{v:,.0f}"
print(f"| {'device':<10} | " + " | ".join(f"{h:>18}" for h in heads) + " |")
print("|" + "-" * 12 + "|" + "|".join("-" * 20 for _ in heads) + "|")
for r in rows:
    print(f"| {r:<10} | " + " | ".join(f"{fmt(v):>18}" for v in res[r]) + " |")
if "kvcrypt" in res:
    for base in ("ceiling", "peer"):
        if base in res:
            ratio = lambda a, b: "-" if a is None or not b else f"{a / b:.2f}x"
            label = f"kv/{base}"
            print(f"| {label:<10} | " + " | ".join(f"{ratio(a, b):>18}" for a, b in zip(res["kvcrypt"], res[base])) + " |")
PY
