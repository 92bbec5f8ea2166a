#!/usr/bin/env bash
# The project's test command (README §Tests; .ci/run calls exactly this). Needs root: the data-path
# tests use loop devices and FUSE, the agent tests bind /run/kvcrypt, the ublk tests boot a VM.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (loop devices, FUSE, VM)" >&2; exit 1; }
./scripts/setup.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
# Release build: the crypto and data-path tests move hundreds of MB, and the VM test copies the
# release binaries into its guest.
cargo build --workspace --release --bins
cargo test --workspace --release -- --test-threads=2
