//! Split-phase access to the engine for transports that run their own io_uring event loop
//! (FUSE-over-io_uring, async ublk queues): the transport submits backing I/O itself, on its
//! own ring, and calls the engine only for the parts that need the volume's geometry or key.
//!
//! - [`Engine::backing_fd`] / [`Engine::backing_offset`]: where whole, aligned sectors of the
//!   volume live in the backing store (the fd is `O_DIRECT` when [`Engine::direct_io`]).
//! - [`Engine::try_encrypt`] / [`Engine::try_decrypt`]: XTS in place, never blocking. While the
//!   volume is suspended they return [`SplitError::Suspended`]; the transport keeps the request
//!   (it waits, it never fails) and calls [`Engine::wait_resumed`] once it has nothing else in
//!   flight. A key handle is held only for the duration of one call, so a suspend never waits
//!   for an event loop that is itself waiting.
//! - Flush: `IORING_OP_FSYNC` with `DATASYNC` on [`Engine::backing_fd`] has the same effect as
//!   [`Engine::flush`].

use std::os::fd::{AsFd, BorrowedFd};

use super::{Engine, EngineError, decrypt_chunk};

/// Why a split-phase call did not run.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// The key is wiped (suspended): keep the request and retry after [`Engine::wait_resumed`].
    #[error("the volume is suspended")]
    Suspended,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl SplitError {
    /// errno for the kernel if the request must fail now (never for `Suspended`, which waits).
    pub fn errno(&self) -> i32 {
        match self {
            SplitError::Suspended => libc::EAGAIN,
            SplitError::Engine(e) => e.errno(),
        }
    }
}

impl Engine {
    /// The backing store's descriptor (opened with `O_DIRECT` when [`direct_io`](Self::direct_io)).
    pub fn backing_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Byte offset in the backing store of `len` bytes at volume `offset`. Fails unless the
    /// range is inside the volume and made of whole sectors (callers with partial sectors use
    /// the blocking [`read_at`](Self::read_at) / [`write_at`](Self::write_at)). Writes on a
    /// read-only volume fail here too.
    pub fn backing_offset(&self, offset: u64, len: u64, write: bool) -> Result<u64, EngineError> {
        if write && self.cfg.read_only {
            return Err(EngineError::ReadOnly);
        }
        let ss = self.cfg.sector_size as u64;
        let in_range = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.cfg.data_length);
        if !in_range || !offset.is_multiple_of(ss) || !len.is_multiple_of(ss) {
            return Err(EngineError::OutOfRange {
                offset,
                len,
                data_length: self.cfg.data_length,
            });
        }
        Ok(self.cfg.data_offset + offset)
    }

    /// Encrypts whole sectors of plaintext for volume `offset`, in place.
    pub fn try_encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), SplitError> {
        self.backing_offset(offset, buf.len() as u64, true)?;
        let ticket = self.gate.try_enter()?;
        let ss = self.cfg.sector_size as usize;
        ticket
            .cipher()
            .encrypt_sectors(buf, offset / ss as u64, ss)
            .map_err(|e| SplitError::Engine(e.into()))
    }

    /// Decrypts whole sectors read from the backing store for volume `offset`, in place; a
    /// sector whose ciphertext is all zeros (never written / discarded) reads as zeros.
    pub fn try_decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), SplitError> {
        self.backing_offset(offset, buf.len() as u64, false)?;
        let ticket = self.gate.try_enter()?;
        let ss = self.cfg.sector_size as usize;
        decrypt_chunk(ticket.cipher(), buf, offset / ss as u64, ss)
            .map_err(|e| SplitError::Engine(e.into()))
    }

    /// Blocks while the volume is suspended (counted in [`parked_requests`](Self::parked_requests)
    /// as `waiting` requests). True once resumed; false if the engine shuts down meanwhile
    /// (fail the waiting requests then).
    pub fn wait_resumed(&self, waiting: usize) -> bool {
        self.gate.wait_resumed(waiting)
    }
}

impl From<super::gate::Closed> for SplitError {
    fn from(c: super::gate::Closed) -> SplitError {
        match c {
            super::gate::Closed::Suspended => SplitError::Suspended,
            super::gate::Closed::ShutDown => SplitError::Engine(EngineError::ShutDown),
        }
    }
}
