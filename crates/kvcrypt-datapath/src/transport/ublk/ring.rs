//! Backing I/O of the split-phase path as io_uring SQEs, and [`QueueRing`], which submits them on
//! the ublk queue's own ring (libublk's thread-local queue io_uring) and awaits their CQEs.

use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};
use libublk::UblkUringData;
use libublk::uring_async::ublk_submit_sqe_async;

use super::request::BackingIo;

/// Which file the SQEs address: a registered (fixed) file of the ring — the queue rings, where
/// libublk registers the target's descriptor — or a plain descriptor (tests).
#[derive(Clone, Copy, Debug)]
pub(super) enum FileRef {
    Fixed(u32),
    #[cfg_attr(not(test), allow(dead_code))]
    Fd(RawFd),
}

/// Builds an opcode against `$file` (the two io_uring file types are distinct types).
macro_rules! with_file {
    ($file:expr, |$f:ident| $body:expr) => {
        match $file {
            FileRef::Fixed(i) => {
                let $f = types::Fixed(i);
                $body
            }
            FileRef::Fd(fd) => {
                let $f = types::Fd(fd);
                $body
            }
        }
    };
}

/// Length of one transfer (tag buffers are `max_io_bytes`, a u32).
fn sqe_len(buf: &[u8]) -> u32 {
    u32::try_from(buf.len()).unwrap_or(u32::MAX)
}

/// Read into `buf` at byte `off`.
pub(super) fn read_sqe(file: FileRef, buf: &mut [u8], off: u64) -> squeue::Entry {
    let (ptr, len) = (buf.as_mut_ptr(), sqe_len(buf));
    with_file!(file, |f| opcode::Read::new(f, ptr, len).offset(off).build())
}

/// Write `buf` at byte `off`; `dsync` = `RWF_DSYNC` (durable when it completes: FUA where the
/// device has it, write + flush otherwise).
pub(super) fn write_sqe(file: FileRef, buf: &[u8], off: u64, dsync: bool) -> squeue::Entry {
    let (ptr, len) = (buf.as_ptr(), sqe_len(buf));
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    with_file!(file, |f| opcode::Write::new(f, ptr, len)
        .offset(off)
        .rw_flags(flags)
        .build())
}

/// fdatasync (`IORING_OP_FSYNC` with `DATASYNC`).
pub(super) fn datasync_sqe(file: FileRef) -> squeue::Entry {
    with_file!(file, |f| opcode::Fsync::new(f)
        .flags(types::FsyncFlags::DATASYNC)
        .build())
}

/// Backing I/O on the calling queue thread's ring.
pub(super) struct QueueRing {
    file: FileRef,
}

impl QueueRing {
    pub(super) fn new(file: FileRef) -> Self {
        Self { file }
    }
}

/// Submits `sqe` on this thread's queue ring and waits for its completion.
async fn submit(sqe: squeue::Entry) -> i32 {
    // Target bit: tells libublk's event loop this CQE is ours, not a ublk command.
    ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
        .await
        .unwrap_or(-libc::EIO)
}

impl BackingIo for QueueRing {
    async fn read(&self, buf: &mut [u8], off: u64) -> i32 {
        submit(read_sqe(self.file, buf, off)).await
    }
    async fn write(&self, buf: &[u8], off: u64, dsync: bool) -> i32 {
        submit(write_sqe(self.file, buf, off, dsync)).await
    }
    async fn datasync(&self) -> i32 {
        submit(datasync_sqe(self.file)).await
    }
}
