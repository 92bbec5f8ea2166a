//! kvcrypt: block-device encryption with the volume key wrapped by a customer-held
//! Azure Key Vault / Managed HSM key. This crate is the agent, its volume workers and the
//! command line; the layers below live in their own crates (docs/ARCHITECTURE.md):
//! `kvcrypt-format` (on-disk header, no I/O), `kvcrypt-header-io` (the header on a device:
//! read, write, backup, restore), `kvcrypt-crypto` (XTS + secret memory),
//! `kvcrypt-keyvault` (the Key Vault provider), `kvcrypt-datapath` (engine + transports),
//! `kvcrypt-host` (device and mount facts), `kvcrypt-exit` (exit codes).

pub mod worker;

pub mod agent;

pub mod cli;

pub mod keyslots;
