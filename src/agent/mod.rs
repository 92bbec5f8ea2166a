//! The agent daemon: boot-time unlock with retries, periodic access checks, and the
//! revoke → suspend → resume / remove state machine (docs/AGENT.md "State machine", "udev").
//!
//! Layout: `config` (the TOML file), `volume` (per-volume state machine: a pure `core` and the
//! async shell that carries out its effects over the `ports` trait), `control` (root-only JSON-line socket), `notify` (sd_notify), `freeze`
//! (FIFREEZE/FITHAW), `hook`, `discover` (finding devices), `daemon` (wiring), `reload` (SIGHUP: re-read the configuration), `opened` (volumes handed over by `kvcrypt open`), `host_platform` (the
//! production [`ports::Platform`]).

pub mod access;
pub mod backoff;
pub mod config;
pub mod control;
pub mod daemon;
pub mod discover;
pub mod fdstore;
pub mod freeze;
pub mod hook;
pub mod host_platform;
pub mod logging;
pub mod notify;
pub mod opened;
pub mod ports;
pub mod reap;
pub mod reload;
pub mod rotation;
pub mod status;
pub mod volume;
#[cfg(test)]
mod volume_tests;
