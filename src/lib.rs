//! kvcrypt: block-device encryption with the volume key wrapped by a customer-held
//! Azure Key Vault / Managed HSM key. See `docs/FORMAT.md` and `README.md`.

pub mod exit;

pub mod secmem;

pub mod mountinfo;

pub mod crypto;
pub mod header;
pub mod inuse;

pub mod keys;

pub mod emulator;

pub mod engine;
pub mod transport;
pub mod worker;

pub mod agent;

pub mod cli;
