//! AES-256-XTS sector engine and key derivation.
//!
//! The data area of a kvcrypt volume is encrypted exactly like dm-crypt's
//! `aes-xts-plain64` with `--iv-large-sectors`: IEEE 1619 XTS-AES-256, one data unit per
//! sector, tweak = little-endian 128-bit sector number counted in units of the sector size
//! from the start of the data area. Data key = VMK[0..32], tweak key = VMK[32..64].

pub mod bench;
pub mod kdf;
/// Shamir secret sharing of the VMK (split slot policies), in secret memory.
pub mod shamir;
#[cfg(target_arch = "x86_64")]
mod vaes;
mod xts;

/// Secret memory for key material: memfd_secret pages, locked, never dumped or swapped.
pub mod secmem;

pub use xts::{CryptoError, Implementation, XtsCipher};
