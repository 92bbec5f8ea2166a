//! The one test-support crate of the kvcrypt workspace: what the integration tests of the root
//! package, its benches and the emulator's own tests share, so each helper is written once.
//!
//! * [`data`]: hex, base64url, deterministic byte patterns, checksums;
//! * [`keys`]: fixed and random volume keys, key-slot fixtures;
//! * [`provider`]: a stand-in key provider for unit tests of the code above the provider;
//! * [`env`]: root / CI / kernel-facility checks that decide whether a test can run here;
//! * [`volume`]: temporary image files, formatted volumes, byte-level header editing;
//! * [`emulator`]: the in-process Key Vault emulator with its TLS CA and principals, provider
//!   configs and config files that reach it, and REST shorthands ([`emulator::rest`]);
//! * [`cli`]: runs the built `kvcrypt` binary and checks exit code, stdout and stderr;
//! * [`shell`]: running commands that must succeed;
//! * [`agent`]: a running `kvcrypt agent` in a lab, with guards that stop it and its workers;
//! * [`fuse`]: FUSE+loop worker helpers and the worker scenarios several test files share;
//! * [`table`]: runs a table of cases so that each row passes or fails on its own.
//!
//! Only ever a `[dev-dependencies]` entry: it links the emulator and the lab, which the
//! production binary must not (tests/architecture.rs checks that). A library cannot see
//! `CARGO_BIN_EXE_kvcrypt` (Cargo sets it only for the package that owns the binary), so every
//! helper that runs the binary takes its path from the test.

#![forbid(unsafe_code)]

pub mod agent;
pub mod cli;
pub mod data;
pub mod emulator;
pub mod env;
pub mod fuse;
pub mod keys;
pub mod provider;
pub mod shell;
pub mod table;
pub mod volume;

/// One mebibyte, the unit of every image size in the tests.
pub const MIB: u64 = 1024 * 1024;
