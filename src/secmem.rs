//! Memory for key material. (Placeholder: the format/XTS work replaces the internals with
//! memfd_secret / mlock + MADV_DONTDUMP pages; the public API stays.)

use zeroize::Zeroize;

/// Length of the AES-256-XTS volume master key (two AES-256 keys).
pub const VMK_LEN: usize = 64;

/// A fixed-size secret that is zeroized on drop and never printed.
pub struct SecretBytes<const N: usize> {
    bytes: Box<[u8; N]>,
}

impl<const N: usize> SecretBytes<N> {
    pub fn zeroed() -> Self {
        Self {
            bytes: Box::new([0u8; N]),
        }
    }
    pub fn from_slice(src: &[u8]) -> Option<Self> {
        if src.len() != N {
            return None;
        }
        let mut s = Self::zeroed();
        s.bytes.copy_from_slice(src);
        Some(s)
    }
    pub fn expose(&self) -> &[u8; N] {
        &self.bytes
    }
    pub fn expose_mut(&mut self) -> &mut [u8; N] {
        &mut self.bytes
    }
}

impl<const N: usize> Drop for SecretBytes<N> {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl<const N: usize> std::fmt::Debug for SecretBytes<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes<{N}>(redacted)")
    }
}

/// The volume master key.
pub type VolumeKey = SecretBytes<VMK_LEN>;
