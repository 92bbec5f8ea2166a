//! Memory for key material.
//!
//! Every secret (the volume master key, derived keys, expanded AES key schedules) lives in its
//! own page-backed allocation from [`pages`]: `memfd_secret(2)` pages where the kernel offers
//! them, else anonymous pages with `mlock` + `MADV_DONTDUMP`. Memory is wiped on drop, and no
//! type here prints its contents (`Debug` is redacted, there is no `Display`).
//!
//! Call [`harden_process`] early in every process that will hold keys.

mod pages;

use std::marker::PhantomData;

use pages::SecretPages;
pub use pages::{ALLOW_UNLOCKED_ENV, Backing, KeyMemoryError, check_key_memory, harden_process};

/// Overwrites (volatile) 8 KiB of stack below the caller, where temporaries of a callee that
/// handled key material (e.g. a crate's key expansion or HMAC state) may remain. Best effort:
/// call it right after such a callee returns.
#[inline(never)]
pub fn scrub_stack() {
    let mut area = [0u8; 8192];
    zeroize::Zeroize::zeroize(&mut area);
    std::hint::black_box(&area);
}

/// Length of the AES-256-XTS volume master key (two AES-256 keys).
pub const VMK_LEN: usize = 64;

/// Plain-old-data: any bit pattern (in particular all zeroes) is a valid value, and the type
/// owns no heap memory or other resources — so its bytes are the whole secret.
///
/// # Safety
/// Implement only for types that satisfy the above (integers, byte arrays, SIMD vectors and
/// `#[repr(C)]` aggregates of them).
pub unsafe trait Pod: Copy + 'static {}

// SAFETY: byte arrays are plain bytes.
unsafe impl<const N: usize> Pod for [u8; N] {}

/// A `T` stored in secret pages; wiped (and dropped) on drop; never printed.
///
/// Only `T`'s inline bytes are protected: `T` should not own heap memory.
pub struct SecretBox<T> {
    pages: SecretPages,
    _owns: PhantomData<T>,
}

impl<T> SecretBox<T> {
    const FITS: () = assert!(
        std::mem::align_of::<T>() <= 4096,
        "SecretBox needs alignment <= page size"
    );

    fn alloc() -> SecretPages {
        #[allow(clippy::let_unit_value)]
        let () = Self::FITS;
        SecretPages::new(std::mem::size_of::<T>())
    }

    /// Moves `value` into secret pages.
    ///
    /// The moved-from location (often a stack slot) may keep a copy of the bytes; for key
    /// schedules prefer [`SecretBox::zeroed`] and expanding the keys in place.
    pub fn new(value: T) -> SecretBox<T> {
        let pages = Self::alloc();
        // SAFETY: the mapping is page-aligned (alignment checked by FITS) and at least
        // size_of::<T>() bytes long; it holds no value yet.
        unsafe { pages.as_ptr().cast::<T>().write(value) };
        SecretBox {
            pages,
            _owns: PhantomData,
        }
    }

    pub fn expose(&self) -> &T {
        // SAFETY: constructors always leave an initialized, aligned T at the start of the pages.
        unsafe { &*self.pages.as_ptr().cast::<T>() }
    }

    pub fn expose_mut(&mut self) -> &mut T {
        // SAFETY: as in `expose`; `&mut self` guarantees exclusivity.
        unsafe { &mut *self.pages.as_ptr().cast::<T>() }
    }

    /// What backs this allocation (memfd_secret, locked anonymous memory, …).
    pub fn backing(&self) -> Backing {
        self.pages.backing()
    }

    /// Start address of the secret pages (for diagnostics and tests; never dereference).
    pub fn address(&self) -> usize {
        self.pages.as_ptr() as usize
    }
}

impl<T: Pod> SecretBox<T> {
    /// An all-zero `T` in secret pages, ready to be filled in place via `expose_mut`.
    pub fn zeroed() -> SecretBox<T> {
        // Fresh mappings are zero-filled, and all-zero is a valid `T` (`Pod`).
        SecretBox {
            pages: Self::alloc(),
            _owns: PhantomData,
        }
    }
}

impl<T> Drop for SecretBox<T> {
    fn drop(&mut self) {
        // SAFETY: the T is initialized and dropped exactly once; the pages are wiped and
        // unmapped afterwards by `SecretPages::drop`.
        unsafe { std::ptr::drop_in_place(self.pages.as_ptr().cast::<T>()) };
    }
}

impl<T> std::fmt::Debug for SecretBox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBox<{}>(redacted)", std::any::type_name::<T>())
    }
}

/// A fixed-size secret byte string in secret pages; wiped on drop and never printed.
pub struct SecretBytes<const N: usize> {
    inner: SecretBox<[u8; N]>,
}

impl<const N: usize> SecretBytes<N> {
    pub fn zeroed() -> Self {
        Self {
            inner: SecretBox::zeroed(),
        }
    }

    /// Copies `src` into a new secret; `None` if `src` is not exactly `N` bytes long.
    pub fn from_slice(src: &[u8]) -> Option<Self> {
        if src.len() != N {
            return None;
        }
        let mut s = Self::zeroed();
        s.expose_mut().copy_from_slice(src);
        Some(s)
    }

    pub fn expose(&self) -> &[u8; N] {
        self.inner.expose()
    }

    pub fn expose_mut(&mut self) -> &mut [u8; N] {
        self.inner.expose_mut()
    }

    /// What backs this secret (memfd_secret, locked anonymous memory, …).
    pub fn backing(&self) -> Backing {
        self.inner.backing()
    }

    /// Start address of the secret pages (for diagnostics and tests; never dereference).
    pub fn address(&self) -> usize {
        self.inner.address()
    }
}

impl<const N: usize> Clone for SecretBytes<N> {
    fn clone(&self) -> Self {
        let mut s = Self::zeroed();
        s.expose_mut().copy_from_slice(self.expose());
        s
    }
}

impl<const N: usize> std::fmt::Debug for SecretBytes<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes<{N}>(redacted)")
    }
}

/// The volume master key.
pub type VolumeKey = SecretBytes<VMK_LEN>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_slice_checks_length_and_copies() {
        assert!(VolumeKey::from_slice(&[1u8; 63]).is_none());
        let k = VolumeKey::from_slice(&[7u8; 64]).expect("64 bytes");
        assert_eq!(k.expose(), &[7u8; 64]);
        let c = k.clone();
        assert_eq!(c.expose(), k.expose());
        assert_ne!(c.address(), k.address());
    }

    #[test]
    fn debug_is_redacted() {
        let k = SecretBytes::<4>::from_slice(&[0xAB, 0xCD, 0xEF, 0x12]).expect("4 bytes");
        let s = format!("{k:?}");
        assert!(
            !s.to_lowercase().contains("ab") && !s.contains("171"),
            "{s}"
        );
        let b = SecretBox::new([0xABu8; 4]);
        assert!(!format!("{b:?}").contains("171"));
    }

    #[test]
    fn uses_memfd_secret_when_kernel_offers_it() {
        let k = VolumeKey::zeroed();
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        let addr = format!("{:x}-", k.address());
        let line = maps
            .lines()
            .find(|l| l.starts_with(&addr))
            .expect("mapping listed");
        match k.backing() {
            Backing::MemfdSecret => assert!(line.contains("secretmem"), "{line}"),
            other => {
                // Kernels without memfd_secret (or with it disabled) must still lock the page.
                assert!(!line.contains("secretmem"));
                eprintln!("memfd_secret unavailable here; backing = {other:?}");
            }
        }
    }
}
