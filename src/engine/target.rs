//! The engine as a ublk [`BlockTarget`](crate::transport::ublk::BlockTarget).

use std::io;

use super::{Engine, EngineError};
use crate::transport::ublk::BlockTarget;

fn to_io(what: &str, e: EngineError) -> io::Error {
    if !matches!(e, EngineError::ShutDown) {
        tracing::error!("{what}: {e}");
    }
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
        Engine::read_at(self, offset, buf).map_err(|e| to_io("read", e))
    }
    fn write_at(&self, offset: u64, buf: &mut [u8], fua: bool) -> io::Result<()> {
        self.write_at_mut(offset, buf, fua)
            .map_err(|e| to_io("write", e))
    }
    fn flush(&self) -> io::Result<()> {
        Engine::flush(self).map_err(|e| to_io("flush", e))
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        Engine::discard(self, offset, len).map_err(|e| to_io("discard", e))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        // Encrypted zeros: correct whatever REQ_NOUNMAP says, and reveals nothing.
        Engine::write_zeroes(self, offset, len, false).map_err(|e| to_io("write zeroes", e))
    }
}
