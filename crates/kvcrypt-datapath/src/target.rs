//! The one interface between the data path's two halves: a [`BlockTarget`] is what a transport
//! serves (the engine, `Engine`, in production, simple targets in tests and examples).
//! It lives apart from both so that the engine and the transports each depend on it and not
//! on each other.

use std::io;
use std::os::fd::RawFd;

/// Why a split-phase step of a [`BlockTarget`] did not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitStep {
    /// The key is wiped (volume suspended): keep the request, call
    /// [`BlockTarget::wait_resumed`], then retry. The request waits; it never fails.
    Suspended,
    /// Fail the request with this (positive) errno.
    Errno(i32),
}

/// The block device a transport serves, with whole-sector requests. The engine (`Engine`)
/// implements it; tests and other targets may too. Methods take `&self`: every queue thread
/// calls them concurrently.
///
/// Two ways to serve reads and writes:
/// - *blocking*: [`read_at`](Self::read_at) / [`write_at`](Self::write_at) do everything; a
///   queue then handles one request at a time (its thread is inside the call);
/// - *split-phase* (when [`backing_fd`](Self::backing_fd) is `Some`): the queue submits the
///   backing I/O itself, on its own io_uring, and calls the target only for the mapping
///   ([`backing_offset`](Self::backing_offset)) and the non-blocking crypto steps
///   ([`encrypt`](Self::encrypt) / [`decrypt`](Self::decrypt)); a queue then has every tag
///   in flight at once.
pub trait BlockTarget: Send + Sync + 'static {
    /// Plaintext size in bytes (a multiple of `sector_size`).
    fn size(&self) -> u64;
    /// Encryption sector size in bytes (512 or 4096); becomes the logical and physical block size.
    fn sector_size(&self) -> u32;
    /// Reads `buf.len()` bytes of plaintext at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at `offset`; `buf` may be clobbered (encrypted in place). With `fua` the data
    /// must be on stable storage before returning.
    fn write_at(&self, offset: u64, buf: &mut [u8], fua: bool) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Discards a range (only called when discards are allowed).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes a range read back as zeros (only called when discards are allowed).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Descriptor of the backing store for split-phase I/O (`None`: only the blocking methods
    /// are available). Must stay open as long as the target lives; reads and writes on it are
    /// whole sectors into page-aligned buffers, so it may be `O_DIRECT`.
    fn backing_fd(&self) -> Option<RawFd> {
        None
    }
    /// Byte offset in the backing store of `len` bytes at device `offset` (whole sectors, in
    /// range; `write` refused on a read-only target). `Err(errno)` fails the request.
    fn backing_offset(&self, offset: u64, len: u64, write: bool) -> std::result::Result<u64, i32> {
        let _ = (offset, len, write);
        Err(libc::EOPNOTSUPP)
    }
    /// Encrypts whole sectors of plaintext for device `offset` in place, without blocking.
    fn encrypt(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), SplitStep> {
        let _ = (offset, buf);
        Err(SplitStep::Errno(libc::EOPNOTSUPP))
    }
    /// Decrypts whole sectors read from the backing store for device `offset` in place,
    /// without blocking.
    fn decrypt(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), SplitStep> {
        let _ = (offset, buf);
        Err(SplitStep::Errno(libc::EOPNOTSUPP))
    }
    /// Blocks while the target is suspended, holding `waiting` requests (counted as parked).
    /// True once the key is back; false if the target shuts down meanwhile (the waiting
    /// requests then fail).
    fn wait_resumed(&self, waiting: usize) -> bool {
        let _ = waiting;
        true
    }
    /// Whether the key is wiped right now (requests report `Suspended` or wait).
    fn is_suspended(&self) -> bool {
        false
    }
    /// Fails every waiting and later request: the device is going away while suspended.
    fn shutdown(&self) {}
}
