//! The engine as a [`BlockTarget`](crate::target::BlockTarget).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::{Engine, EngineError, SplitError};
use crate::target::{BlockTarget, SplitStep};

// Failures are logged here, once, for every transport (they only pass an errno on to the
// kernel); after shutdown every request fails by design, which is not worth a line each.
fn log(what: &str, offset: Option<u64>, e: &EngineError) {
    if matches!(e, EngineError::ShutDown) {
        return;
    }
    match offset {
        Some(o) => tracing::error!("{what} at volume offset {o}: {e}"),
        None => tracing::error!("{what}: {e}"),
    }
}

fn to_step(what: &str, offset: u64, e: SplitError) -> SplitStep {
    match e {
        SplitError::Suspended => SplitStep::Suspended,
        SplitError::Engine(e) => {
            log(what, Some(offset), &e);
            SplitStep::Errno(e.errno())
        }
    }
}

fn to_io(what: &str, offset: Option<u64>, e: EngineError) -> io::Error {
    log(what, offset, &e);
    io::Error::from_raw_os_error(e.errno())
}

impl BlockTarget for Engine {
    fn size(&self) -> u64 {
        self.data_length()
    }
    fn sector_size(&self) -> u32 {
        Engine::sector_size(self)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Engine::read_at(self, offset, buf).map_err(|e| to_io("read", Some(offset), e))
    }
    fn write_at(&self, offset: u64, buf: &mut [u8], fua: bool) -> io::Result<()> {
        self.write_at_mut(offset, buf, fua)
            .map_err(|e| to_io("write", Some(offset), e))
    }
    fn flush(&self) -> io::Result<()> {
        Engine::flush(self).map_err(|e| to_io("flush", None, e))
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        Engine::discard(self, offset, len).map_err(|e| to_io("discard", Some(offset), e))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        // Encrypted zeros: correct whatever REQ_NOUNMAP says, and reveals nothing.
        Engine::write_zeroes(self, offset, len, false)
            .map_err(|e| to_io("write zeroes", Some(offset), e))
    }
    // Split-phase: the ublk queues submit backing I/O themselves (see engine::split).
    fn backing_fd(&self) -> Option<RawFd> {
        Some(Engine::backing_fd(self).as_raw_fd())
    }
    fn backing_offset(&self, offset: u64, len: u64, write: bool) -> Result<u64, i32> {
        Engine::backing_offset(self, offset, len, write).map_err(|e| e.errno())
    }
    fn encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), SplitStep> {
        self.try_encrypt(offset, buf)
            .map_err(|e| to_step("encrypt", offset, e))
    }
    fn decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), SplitStep> {
        self.try_decrypt(offset, buf)
            .map_err(|e| to_step("decrypt", offset, e))
    }
    fn wait_resumed(&self, waiting: usize) -> bool {
        Engine::wait_resumed(self, waiting)
    }
    fn is_suspended(&self) -> bool {
        Engine::is_suspended(self)
    }
    fn shutdown(&self) {
        Engine::shutdown(self)
    }
}
