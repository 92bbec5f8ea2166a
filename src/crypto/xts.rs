//! AES-256-XTS (IEEE 1619) over whole sectors.

use aes::Aes256;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit, generic_array::GenericArray};

use crate::exit::{Exit, ExitClass};
use crate::secmem::VolumeKey;

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
}

impl ExitClass for CryptoError {
    fn exit_class(&self) -> Exit {
        Exit::Failure
    }
}

/// AES-256-XTS with the two halves of the volume key expanded once.
pub struct XtsCipher {
    data: Box<Aes256>,
    tweak: Box<Aes256>,
}

impl std::fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XtsCipher(redacted)")
    }
}

/// Multiply a tweak by x in GF(2^128) (IEEE 1619 §5.2, little-endian byte order).
fn mul_x(t: u128) -> u128 {
    let carry = t >> 127;
    (t << 1) ^ (carry * 0x87)
}

impl XtsCipher {
    /// Expands the data key (first 32 bytes of the VMK) and the tweak key (last 32 bytes).
    pub fn new(key: &VolumeKey) -> XtsCipher {
        let k = key.expose();
        XtsCipher {
            data: Box::new(Aes256::new(GenericArray::from_slice(&k[..32]))),
            tweak: Box::new(Aes256::new(GenericArray::from_slice(&k[32..]))),
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

    fn initial_tweak(&self, sector: u64) -> u128 {
        let mut t = GenericArray::clone_from_slice(&(sector as u128).to_le_bytes());
        self.tweak.encrypt_block(&mut t);
        u128::from_le_bytes(t.into())
    }

    /// Encrypts `buf` (a whole number of sectors) in place.
    pub fn encrypt_sectors(
        &self,
        buf: &mut [u8],
        first_sector: u64,
        sector_size: usize,
    ) -> Result<(), CryptoError> {
        self.process(buf, first_sector, sector_size, true)
    }

    /// Decrypts `buf` (a whole number of sectors) in place.
    pub fn decrypt_sectors(
        &self,
        buf: &mut [u8],
        first_sector: u64,
        sector_size: usize,
    ) -> Result<(), CryptoError> {
        self.process(buf, first_sector, sector_size, false)
    }

    fn process(
        &self,
        buf: &mut [u8],
        first_sector: u64,
        sector_size: usize,
        encrypt: bool,
    ) -> Result<(), CryptoError> {
        Self::check(buf, first_sector, sector_size)?;
        for (i, sector) in buf.chunks_exact_mut(sector_size).enumerate() {
            let mut t = self.initial_tweak(first_sector + i as u64);
            for block in sector.chunks_exact_mut(BLOCK) {
                let tb = t.to_le_bytes();
                for (b, k) in block.iter_mut().zip(tb.iter()) {
                    *b ^= k;
                }
                let ga = GenericArray::from_mut_slice(block);
                if encrypt {
                    self.data.encrypt_block(ga);
                } else {
                    self.data.decrypt_block(ga);
                }
                for (b, k) in block.iter_mut().zip(tb.iter()) {
                    *b ^= k;
                }
                t = mul_x(t);
            }
        }
        Ok(())
    }
}
