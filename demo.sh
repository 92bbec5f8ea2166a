#!/usr/bin/env bash
# kvcrypt demo: installs the build dependencies (Debian/Ubuntu), builds a release binary and
# runs `kvcrypt demo` — format a scratch volume, serve it, mkfs, write, revoke the Key Vault
# permission in the bundled emulator (→ locked), restore it (→ resumed), verify the data.
# Needs root (loop device + FUSE). Usage: sudo ./demo.sh [kvcrypt demo options, e.g. --keep]
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root: sudo ./demo.sh" >&2; exit 1; }

packages=(build-essential pkg-config libclang-dev clang libssl-dev ca-certificates fuse3 util-linux e2fsprogs kmod)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "demo: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "demo: cargo not found; install the Rust toolchain first (https://rustup.rs), then re-run" >&2
  exit 1
fi
modprobe fuse 2>/dev/null || true
modprobe loop 2>/dev/null || true

echo "demo: building (release)…"
cargo build --release --bins --quiet
target="${CARGO_TARGET_DIR:-target}"
exec "$target/release/kvcrypt" demo "$@"
