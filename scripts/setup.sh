#!/usr/bin/env bash
# Installs what kvcrypt needs on a fresh Debian 12 machine (as root).
#   scripts/setup.sh        everything the tests need (scripts/test.sh runs this)
#   scripts/setup.sh demo   only what building and running the demo needs (demo.sh runs this)
# Idempotent: packages already present are skipped, so a second run costs a few dpkg queries.
set -euo pipefail

packages=(
  build-essential pkg-config libclang-dev clang  # libublk generates its kernel bindings with bindgen
  libssl-dev openssl ca-certificates             # azure_identity's client-certificate support
  fuse3 util-linux e2fsprogs kmod                # FUSE + loop transport, mkfs/e2fsck
)
if [ "${1:-test}" != demo ]; then
  packages+=(
    fio jq                                                   # data-path tests and benchmarks
    qemu-system-x86 qemu-utils busybox-static cpio xz-utils  # ublk tests inside a qemu VM
    udev systemd                                             # udevadm / systemd-analyze checks
    mmdebstrap                                               # the system test's guest root filesystem
    python3 python3-venv                                     # the emulator's Python SDK test makes its own venv (pip installs the pinned SDK)
  )
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install the Rust toolchain (rustup, stable) first" >&2
  exit 1
fi
rustup component add clippy rustfmt >/dev/null 2>&1 || true
