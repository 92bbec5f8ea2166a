//! Page-aligned heap buffers for `O_DIRECT` I/O.
//!
//! `O_DIRECT` needs the memory address aligned to the backing device's logical block size; a
//! `Vec<u8>` gives no such guarantee, so these buffers come straight from the global allocator
//! with a 4096-byte alignment. They are allocated once per queue, never on the hot path.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// Alignment of every buffer: the largest logical block size we support.
pub const ALIGN: usize = 4096;

/// A zero-initialised, 4096-byte-aligned byte buffer of fixed length.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Box<[u8]>); moving it across threads
// or sharing `&AlignedBuf` (which only hands out `&[u8]`) is as safe as for Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above; `&AlignedBuf` only exposes shared reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` bytes (rounded up to a multiple of [`ALIGN`], at least one page).
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.max(ALIGN).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(len, ALIGN).expect("aligned buffer layout");
        // SAFETY: layout has a non-zero size (len >= ALIGN).
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout);
        };
        AlignedBuf { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // Scratch buffers hold plaintext between decrypt and copy-out: wipe before freeing.
        zeroize::Zeroize::zeroize(self.as_mut_slice());
        let layout = Layout::from_size_align(self.len, ALIGN).expect("aligned buffer layout");
        // SAFETY: ptr was allocated in `new` with exactly this layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// True if `p` is aligned for `O_DIRECT` with alignment `align`.
pub fn is_aligned(p: *const u8, align: usize) -> bool {
    (p as usize).is_multiple_of(align)
}
