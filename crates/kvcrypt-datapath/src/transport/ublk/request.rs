//! Maps one ublk request (opcode, start sector in 512-byte units, sector count) onto a
//! [`BlockTarget`]: the checks every request gets (range, alignment, read-only, discard policy),
//! then either the blocking target calls ([`handle_request`]) or the split-phase path
//! ([`serve_request`]), where backing I/O goes through a [`BackingIo`] (the queue's own io_uring)
//! and only the crypto steps call the target. Nothing here knows about the kernel side, so it is
//! tested without ublk (tests.rs).

use std::io;

use libublk::sys;

use crate::target::{BlockTarget, SplitStep};

/// Device geometry and policy checked on every request.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    pub size: u64,
    pub sector_size: u64,
    pub read_only: bool,
    pub allow_discards: bool,
}

/// Backing I/O submitted on an event loop. Each method resolves to the CQE result (bytes or
/// -errno). The buffer must stay valid until the future resolves: callers await every future
/// they create (a queue's tag tasks are never dropped mid-request).
pub(super) trait BackingIo {
    /// Reads into `buf` at byte `off` of the backing store.
    async fn read(&self, buf: &mut [u8], off: u64) -> i32;
    /// Writes `buf` at byte `off`; with `dsync` the data is on stable storage when it resolves
    /// (`RWF_DSYNC`: FUA on devices that have it, write + flush otherwise).
    async fn write(&self, buf: &[u8], off: u64, dsync: bool) -> i32;
    /// fdatasync of the backing store (`IORING_OP_FSYNC` + `DATASYNC`).
    async fn datasync(&self) -> i32;
}

/// How many times a backing read/write that made no progress (`EAGAIN`/`EINTR`) is retried
/// before the request fails.
const RETRIES: u32 = 8;

/// What a request asks for, after the checks common to both paths.
enum Checked<'a> {
    /// Done already: complete with this result.
    Done(i32),
    Flush,
    Read(u64, &'a mut [u8]),
    Write(u64, &'a mut [u8], bool),
    Discard(u64, u64),
    WriteZeroes(u64, u64),
}

/// Decodes and checks a request. `buf` is the tag's buffer (`max_io_bytes` long).
fn check<'a>(
    geo: &Geometry,
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    buf: &'a mut [u8],
) -> Checked<'a> {
    let op = op_flags & 0xff;
    // ublk always counts in 512-byte units, whatever the logical block size.
    let offset = start_sector << 9;
    let len = u64::from(nr_sectors) << 9;
    if op == sys::UBLK_IO_OP_FLUSH {
        return Checked::Flush;
    }
    // The sector bound catches start sectors whose byte offset wraps (`<< 9` drops high bits).
    let in_bounds =
        offset.checked_add(len).is_some_and(|end| end <= geo.size) && start_sector <= u64::MAX >> 9;
    let aligned = offset.is_multiple_of(geo.sector_size) && len.is_multiple_of(geo.sector_size);
    if !in_bounds || !aligned {
        tracing::warn!(
            op,
            offset,
            len,
            "ublk: rejecting misaligned or out-of-range request"
        );
        return Checked::Done(-libc::EINVAL);
    }
    match op {
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => {
            let Some(data) = usize::try_from(len).ok().and_then(|l| buf.get_mut(..l)) else {
                return Checked::Done(-libc::EINVAL); // larger than the buffer (max_sectors)
            };
            if op == sys::UBLK_IO_OP_READ {
                Checked::Read(offset, data)
            } else if geo.read_only {
                Checked::Done(-libc::EROFS)
            } else {
                Checked::Write(offset, data, op_flags & sys::UBLK_IO_F_FUA != 0)
            }
        }
        sys::UBLK_IO_OP_DISCARD if geo.allow_discards && !geo.read_only => {
            Checked::Discard(offset, len)
        }
        sys::UBLK_IO_OP_WRITE_ZEROES if geo.allow_discards && !geo.read_only => {
            Checked::WriteZeroes(offset, len)
        }
        _ => Checked::Done(-libc::EOPNOTSUPP),
    }
}

/// Bytes transferred, as the ublk result. Always fits: requests are at most `max_io_bytes`
/// (a u32 far below i32::MAX).
fn done_bytes(data: &[u8]) -> i32 {
    i32::try_from(data.len()).unwrap_or(i32::MAX)
}

/// Serves one request with the blocking target calls; returns the ublk result (bytes for
/// read/write, 0 or -errno otherwise).
pub(super) fn handle_request<T: BlockTarget + ?Sized>(
    target: &T,
    geo: &Geometry,
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    buf: &mut [u8],
) -> i32 {
    match check(geo, op_flags, start_sector, nr_sectors, buf) {
        Checked::Done(r) => r,
        Checked::Flush => errno_result(target.flush(), 0),
        Checked::Read(off, data) => {
            let n = done_bytes(data);
            errno_result(target.read_at(off, data), n)
        }
        Checked::Write(off, data, fua) => {
            let n = done_bytes(data);
            errno_result(target.write_at(off, data, fua), n)
        }
        Checked::Discard(off, len) => errno_result(target.discard(off, len), 0),
        Checked::WriteZeroes(off, len) => errno_result(target.write_zeroes(off, len), 0),
    }
}

/// Serves one request on the split-phase path: READ = backing read into `buf` through `io`,
/// then decrypt in place; WRITE = encrypt `buf` in place, then backing write (FUA →
/// `RWF_DSYNC`); FLUSH = datasync through `io`. Discard / write-zeroes (rare, off by default)
/// use the blocking target calls. Returns the ublk result.
///
/// While the target is suspended the crypto step waits in [`BlockTarget::wait_resumed`] (this
/// blocks the queue thread; backing I/O of other tags stays queued in the ring meanwhile).
pub(super) async fn serve_request<T: BlockTarget + ?Sized, B: BackingIo>(
    target: &T,
    io: &B,
    geo: &Geometry,
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    buf: &mut [u8],
) -> i32 {
    match check(geo, op_flags, start_sector, nr_sectors, buf) {
        Checked::Done(r) => r,
        Checked::Flush => io.datasync().await.min(0),
        Checked::Read(off, data) => {
            let at = match target.backing_offset(off, data.len() as u64, false) {
                Ok(at) => at,
                Err(e) => return -e,
            };
            if let Err(e) = read_all(io, data, at).await {
                return e;
            }
            match crypto_step(target, || target.decrypt(off, data)) {
                Ok(()) => done_bytes(data),
                Err(e) => e,
            }
        }
        Checked::Write(off, data, fua) => {
            let at = match target.backing_offset(off, data.len() as u64, true) {
                Ok(at) => at,
                Err(e) => return -e,
            };
            if let Err(e) = crypto_step(target, || target.encrypt(off, data)) {
                return e;
            }
            match write_all(io, data, at, fua).await {
                Ok(()) => done_bytes(data),
                Err(e) => e,
            }
        }
        Checked::Discard(off, len) => errno_result(target.discard(off, len), 0),
        Checked::WriteZeroes(off, len) => errno_result(target.write_zeroes(off, len), 0),
    }
}

/// Runs a crypto step, waiting out a suspension. `Err(-errno)` on failure.
fn crypto_step<T: BlockTarget + ?Sized>(
    target: &T,
    mut step: impl FnMut() -> Result<(), SplitStep>,
) -> Result<(), i32> {
    loop {
        match step() {
            Ok(()) => return Ok(()),
            Err(SplitStep::Suspended) => {
                if !target.wait_resumed(1) {
                    return Err(-libc::ESHUTDOWN);
                }
            }
            Err(SplitStep::Errno(e)) => {
                tracing::warn!("ublk: crypto step failed: errno {e}");
                return Err(-e.max(1));
            }
        }
    }
}

/// Reads all of `buf` at `at`, continuing after short reads. `Err(-errno)` on failure.
async fn read_all<B: BackingIo>(io: &B, buf: &mut [u8], at: u64) -> Result<(), i32> {
    let (mut done, mut retries) = (0usize, 0u32);
    while done < buf.len() {
        let r = io.read(&mut buf[done..], at + done as u64).await;
        done += progress(r, &mut retries, at + done as u64, "read")?;
    }
    Ok(())
}

/// Writes all of `buf` at `at`, continuing after short writes. `Err(-errno)` on failure.
async fn write_all<B: BackingIo>(io: &B, buf: &[u8], at: u64, dsync: bool) -> Result<(), i32> {
    let (mut done, mut retries) = (0usize, 0u32);
    while done < buf.len() {
        let r = io.write(&buf[done..], at + done as u64, dsync).await;
        done += progress(r, &mut retries, at + done as u64, "write")?;
    }
    Ok(())
}

/// Interprets one backing read/write result: bytes moved, or a retry (0), or the request's
/// error. Reaching the end of the backing store early is an I/O error (the geometry was checked
/// when the volume was opened, so the store shrank underneath us).
fn progress(r: i32, retries: &mut u32, at: u64, what: &str) -> Result<usize, i32> {
    if r > 0 {
        return Ok(r as usize);
    }
    let err = if r == 0 { -libc::EIO } else { r };
    if (err == -libc::EAGAIN || err == -libc::EINTR) && *retries < RETRIES {
        *retries += 1;
        return Ok(0);
    }
    tracing::warn!(
        "ublk: backing {what} at byte {at} failed: {}",
        io::Error::from_raw_os_error(-err)
    );
    Err(err)
}

fn errno_result(r: io::Result<()>, ok: i32) -> i32 {
    match r {
        Ok(()) => ok,
        Err(e) => {
            tracing::warn!("ublk: backing I/O failed: {e}");
            -crate::transport::errno_of(&e)
        }
    }
}
