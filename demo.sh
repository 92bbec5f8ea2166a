#!/usr/bin/env bash
# kvcrypt demo: installs the build dependencies (Debian/Ubuntu), builds a release binary and
# runs `kvcrypt-demo` — format a scratch volume, serve it, mkfs, write, revoke the Key Vault
# permission in the bundled emulator (→ locked), restore it (→ resumed), verify the data.
# Needs root (loop device + FUSE). Usage (as root): ./demo.sh [kvcrypt-demo options, e.g. --keep]
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root: ./demo.sh" >&2; exit 1; }

./scripts/setup.sh demo
modprobe fuse 2>/dev/null || true
modprobe loop 2>/dev/null || true

echo "demo: building (release)…"
cargo build --release --bins --quiet
target="${CARGO_TARGET_DIR:-target}"
exec "$target/release/kvcrypt-demo" "$@"
