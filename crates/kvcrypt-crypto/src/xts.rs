//! AES-256-XTS (IEEE 1619) over whole sectors: argument checks, backend choice, and the
//! portable backend built on the `aes` crate.

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit, generic_array::GenericArray};
use aes::{Aes256, Aes256Enc, Block};
use zeroize::Zeroize;

use crate::secmem::{SecretBox, VolumeKey, scrub_stack};
use kvcrypt_exit::{Exit, ExitClass};

/// AES block size; XTS works on 16-byte blocks.
const BLOCK: usize = 16;

/// Errors from the sector engine. They only describe shapes, never key or data bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("sector size {0} is not supported: it must be a non-zero multiple of 16 bytes")]
    BadSectorSize(usize),
    #[error("buffer of {len} bytes is not a whole number of {sector_size}-byte sectors")]
    PartialSector { len: usize, sector_size: usize },
    #[error("sector number overflows: first sector {first} plus {count} sectors")]
    SectorOverflow { first: u64, count: u64 },
    #[error("the {0} XTS implementation is not supported by this CPU")]
    Unsupported(Implementation),
}

impl ExitClass for CryptoError {
    fn exit_class(&self) -> Exit {
        match self {
            CryptoError::Unsupported(_) => Exit::Unsupported,
            _ => Exit::Failure,
        }
    }
}

/// Which code encrypts. All produce identical ciphertext; they differ only in speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Implementation {
    /// Hand-written VAES (256-bit AES-NI) + AVX2 kernel, 16 blocks in flight (x86_64).
    VaesAvx2,
    /// The `aes` crate (AES-NI with 8-block pipelining when available, else constant-time
    /// bitsliced software), with tweaks computed in batches.
    Portable,
}

impl Implementation {
    /// Implementations this CPU can run, fastest first.
    pub fn available() -> Vec<Implementation> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if super::vaes::available() {
            v.push(Implementation::VaesAvx2);
        }
        v.push(Implementation::Portable);
        v
    }
}

impl std::fmt::Display for Implementation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Implementation::VaesAvx2 => "vaes-avx2",
            Implementation::Portable => "portable (aes crate)",
        })
    }
}

/// Key schedules of the portable backend.
struct PortableKeys {
    data: Aes256,
    tweak: Aes256Enc,
}

enum Backend {
    #[cfg(target_arch = "x86_64")]
    Vaes(SecretBox<super::vaes::Keys>),
    Portable(SecretBox<PortableKeys>),
}

/// AES-256-XTS with both halves of the volume key expanded once, into secret memory
/// (`memfd_secret` / locked pages; see `secmem`). The schedules are wiped on drop.
///
/// Data key = VMK bytes 0..32, tweak key = VMK bytes 32..64 (as dm-crypt / LUKS2 split an
/// `aes-xts-plain64` 512-bit key). `Send + Sync`: share one instance between threads.
pub struct XtsCipher {
    backend: Backend,
}

impl std::fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "XtsCipher({}, keys redacted)", self.implementation())
    }
}

/// Tweak · x in GF(2^128) (IEEE 1619 §5.2, little-endian byte order).
#[inline(always)]
fn mul_x(t: u128) -> u128 {
    (t << 1) ^ (0u128.wrapping_sub(t >> 127) & 0x87)
}

impl XtsCipher {
    /// Expands the data key (first 32 bytes of the VMK) and the tweak key (last 32 bytes),
    /// using the fastest implementation this CPU supports.
    pub fn new(key: &VolumeKey) -> XtsCipher {
        let best = Implementation::available()[0];
        match Self::with_implementation(key, best) {
            Ok(c) => c,
            // `available()` only lists supported implementations; portable always works.
            Err(_) => Self::portable(key),
        }
    }

    /// Like [`XtsCipher::new`] with a chosen implementation (tests and benchmarks).
    pub fn with_implementation(
        key: &VolumeKey,
        implementation: Implementation,
    ) -> Result<XtsCipher, CryptoError> {
        let c = Self::expand(key, implementation);
        // The expansion's temporaries (the key halves in vector registers, spilled to its
        // frames) are below this frame now: overwrite them. Scrubbing inside the expansion
        // missed what the compiler had inlined into the calling frame — the memory scan found
        // the data key's 32 bytes in a worker's stack after a resume.
        scrub_stack();
        c
    }

    /// Kept out of line so that all its stack lies below the caller's, where
    /// [`scrub_stack`] reaches.
    #[inline(never)]
    fn expand(key: &VolumeKey, implementation: Implementation) -> Result<XtsCipher, CryptoError> {
        match implementation {
            Implementation::Portable => Ok(Self::portable(key)),
            #[cfg(target_arch = "x86_64")]
            Implementation::VaesAvx2 if super::vaes::available() => {
                let mut keys = SecretBox::<super::vaes::Keys>::zeroed();
                super::vaes::expand(key.expose(), keys.expose_mut());
                Ok(XtsCipher {
                    backend: Backend::Vaes(keys),
                })
            }
            #[allow(unreachable_patterns)]
            other => Err(CryptoError::Unsupported(other)),
        }
    }

    fn portable(key: &VolumeKey) -> XtsCipher {
        let k = key.expose();
        let keys = SecretBox::new(PortableKeys {
            data: Aes256::new(GenericArray::from_slice(&k[..32])),
            tweak: Aes256Enc::new(GenericArray::from_slice(&k[32..])),
        });
        scrub_stack();
        XtsCipher {
            backend: Backend::Portable(keys),
        }
    }

    /// Which implementation this instance uses.
    pub fn implementation(&self) -> Implementation {
        match self.backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes(_) => Implementation::VaesAvx2,
            Backend::Portable(_) => Implementation::Portable,
        }
    }

    fn check(buf: &[u8], first_sector: u64, sector_size: usize) -> Result<(), CryptoError> {
        if sector_size == 0 || !sector_size.is_multiple_of(BLOCK) {
            return Err(CryptoError::BadSectorSize(sector_size));
        }
        if !buf.len().is_multiple_of(sector_size) {
            return Err(CryptoError::PartialSector {
                len: buf.len(),
                sector_size,
            });
        }
        let count = (buf.len() / sector_size) as u64;
        if count > 0 && first_sector.checked_add(count - 1).is_none() {
            return Err(CryptoError::SectorOverflow {
                first: first_sector,
                count,
            });
        }
        Ok(())
    }

    /// Encrypts `buf` (a whole number of `sector_size`-byte sectors; sector `first_sector`
    /// first) in place. `sector_size` must be a non-zero multiple of 16.
    pub fn encrypt_sectors(
        &self,
        buf: &mut [u8],
        first_sector: u64,
        sector_size: usize,
    ) -> Result<(), CryptoError> {
        self.apply::<true>(buf, first_sector, sector_size)
    }

    /// Decrypts `buf` in place; the inverse of [`XtsCipher::encrypt_sectors`].
    pub fn decrypt_sectors(
        &self,
        buf: &mut [u8],
        first_sector: u64,
        sector_size: usize,
    ) -> Result<(), CryptoError> {
        self.apply::<false>(buf, first_sector, sector_size)
    }

    /// One direction of XTS on the selected backend (`ENCRYPT` picks the direction).
    fn apply<const ENCRYPT: bool>(
        &self,
        buf: &mut [u8],
        first_sector: u64,
        sector_size: usize,
    ) -> Result<(), CryptoError> {
        Self::check(buf, first_sector, sector_size)?;
        match &self.backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes(k) => {
                super::vaes::xts::<ENCRYPT>(k.expose(), buf, first_sector, sector_size)
            }
            Backend::Portable(k) => {
                portable_xts::<ENCRYPT>(k.expose(), buf, first_sector, sector_size)
            }
        }
        Ok(())
    }
}

/// Blocks per batch handed to `encrypt_blocks` (the `aes` crate pipelines 8 at a time).
const BATCH: usize = 32;

/// Portable XTS: per batch, compute the tweak sequence, whiten, run the block cipher over
/// the whole batch in one call (so AES-NI pipelines), whiten again.
fn portable_xts<const ENC: bool>(
    keys: &PortableKeys,
    buf: &mut [u8],
    first: u64,
    sector_size: usize,
) {
    let mut tw = [0u128; BATCH];
    let mut work = [Block::default(); BATCH];
    for (i, sector) in buf.chunks_exact_mut(sector_size).enumerate() {
        let mut t0: Block = GenericArray::from(((first + i as u64) as u128).to_le_bytes());
        keys.tweak.encrypt_block(&mut t0);
        let mut t = u128::from_le_bytes(t0.into());
        for chunk in sector.chunks_mut(BATCH * BLOCK) {
            let n = chunk.len() / BLOCK;
            for (j, b) in chunk.chunks_exact(BLOCK).enumerate() {
                tw[j] = t;
                t = mul_x(t);
                let mut v = [0u8; BLOCK];
                v.copy_from_slice(b);
                work[j] = GenericArray::from((u128::from_le_bytes(v) ^ tw[j]).to_le_bytes());
            }
            if ENC {
                keys.data.encrypt_blocks(&mut work[..n]);
            } else {
                keys.data.decrypt_blocks(&mut work[..n]);
            }
            for (j, b) in chunk.chunks_exact_mut(BLOCK).enumerate() {
                let mut v = [0u8; BLOCK];
                v.copy_from_slice(&work[j]);
                b.copy_from_slice(&(u128::from_le_bytes(v) ^ tw[j]).to_le_bytes());
            }
        }
        t.zeroize();
    }
    tw.zeroize();
    for w in work.iter_mut() {
        w.as_mut_slice().zeroize();
    }
}
