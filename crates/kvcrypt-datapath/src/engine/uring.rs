//! Backing-store I/O for one queue: io_uring when the kernel allows it, plain `pread`/`pwrite`
//! otherwise (io_uring can be disabled by `kernel.io_uring_disabled`). All `unsafe` of the
//! engine's I/O lives here.
//!
//! Requests are split into chunks by the engine; this type lets it *submit* a chunk and keep
//! encrypting the next one while the kernel writes the previous one, then reap all completions.
//! The completion bookkeeping is a fixed array: no heap allocation per request.

use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, types};

/// Most chunks one request keeps in flight (the engine groups larger requests).
pub const MAX_INFLIGHT: usize = 32;

#[derive(Clone, Copy)]
struct Pending {
    ptr: *mut u8,
    len: usize,
    off: u64,
    write: bool,
    dsync: bool,
    /// Result of a completed op: bytes transferred or -errno. `None` while in flight.
    res: Option<i32>,
}

const EMPTY: Pending = Pending {
    ptr: std::ptr::null_mut(),
    len: 0,
    off: 0,
    write: false,
    dsync: false,
    res: None,
};

enum Backend {
    Uring(Box<IoUring>),
    Sync,
}

/// One queue's channel to the backing file descriptor.
pub struct QueueIo {
    fd: RawFd,
    backend: Backend,
    pending: [Pending; MAX_INFLIGHT],
    count: usize,
    unsubmitted: usize,
}

// SAFETY: the raw pointers in `pending` only live between `push_*` and `wait_all` within one
// engine call that holds `&mut QueueIo`; between calls the array holds no live pointers.
unsafe impl Send for QueueIo {}

impl QueueIo {
    /// `fd` must stay open for the lifetime of the returned value (the engine owns it).
    pub fn new(fd: RawFd, try_uring: bool) -> QueueIo {
        let backend = if try_uring {
            match IoUring::new(2 * MAX_INFLIGHT as u32) {
                Ok(ring) => {
                    // A registered file saves an fget/fput per op; if registration fails we
                    // simply keep using the plain descriptor.
                    Backend::Uring(Box::new(ring))
                }
                Err(_) => Backend::Sync,
            }
        } else {
            Backend::Sync
        };
        QueueIo {
            fd,
            backend,
            pending: [EMPTY; MAX_INFLIGHT],
            count: 0,
            unsubmitted: 0,
        }
    }

    pub fn uses_uring(&self) -> bool {
        matches!(self.backend, Backend::Uring(_))
    }

    /// Queues a read of `buf.len()` bytes at `off` into `buf`.
    ///
    /// The caller must keep `buf` alive and untouched until [`wait_all`](Self::wait_all) returns.
    pub fn push_read(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.push(buf.as_mut_ptr(), buf.len(), off, false, false)
    }

    /// Queues a write of `buf` at `off` (`dsync`: the data is on stable storage at completion,
    /// i.e. `RWF_DSYNC`, which becomes a FUA write on block devices).
    ///
    /// The caller must keep `buf` alive and untouched until [`wait_all`](Self::wait_all) returns.
    pub fn push_write(&mut self, buf: &[u8], off: u64, dsync: bool) -> io::Result<()> {
        self.push(buf.as_ptr() as *mut u8, buf.len(), off, true, dsync)
    }

    fn push(
        &mut self,
        ptr: *mut u8,
        len: usize,
        off: u64,
        write: bool,
        dsync: bool,
    ) -> io::Result<()> {
        if self.count == MAX_INFLIGHT {
            return Err(io::Error::other(
                "too many chunks in flight for one request",
            ));
        }
        let idx = self.count;
        self.pending[idx] = Pending {
            ptr,
            len,
            off,
            write,
            dsync,
            res: None,
        };
        self.count += 1;
        match &mut self.backend {
            Backend::Uring(ring) => {
                let fd = types::Fd(self.fd);
                let len32 = u32::try_from(len).map_err(|_| io::Error::other("chunk too large"))?;
                let entry = if write {
                    opcode::Write::new(fd, ptr, len32)
                        .offset(off)
                        .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                        .build()
                } else {
                    opcode::Read::new(fd, ptr, len32).offset(off).build()
                }
                .user_data(idx as u64);
                // SAFETY: the buffer (ptr, len) stays valid until wait_all() reaps this entry:
                // push_* callers guarantee it, and wait_all() is always called before the engine
                // returns from the request (including on error paths).
                let pushed = unsafe { ring.submission().push(&entry) };
                if pushed.is_err() {
                    ring.submit()?;
                    self.unsubmitted = 0;
                    // SAFETY: as above.
                    unsafe { ring.submission().push(&entry) }
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                }
                self.unsubmitted += 1;
            }
            Backend::Sync => {
                let res = sync_rw(self.fd, ptr, len, off, write, dsync);
                self.pending[idx].res = Some(res);
            }
        }
        Ok(())
    }

    /// Hands queued ops to the kernel without waiting (lets the caller encrypt the next chunk).
    pub fn submit(&mut self) -> io::Result<()> {
        if let Backend::Uring(ring) = &mut self.backend
            && self.unsubmitted > 0
        {
            ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Waits until the op with index `idx` (in push order) has completed in full, retrying
    /// short transfers synchronously. Other ops may complete meanwhile.
    pub fn wait_one(&mut self, idx: usize) -> io::Result<()> {
        self.submit()?;
        while self.pending[idx].res.is_none() {
            let Backend::Uring(ring) = &mut self.backend else {
                break;
            };
            if ring.completion().is_empty() {
                match ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e),
                }
            }
            for cqe in ring.completion() {
                let i = cqe.user_data() as usize;
                if i < self.count {
                    self.pending[i].res = Some(cqe.result());
                }
            }
        }
        self.finish(idx)
    }

    /// Completes a short or failed op: the remainder is redone synchronously.
    fn finish(&mut self, idx: usize) -> io::Result<()> {
        let p = self.pending[idx];
        let mut done = match p.res {
            Some(r) if r < 0 => return Err(io::Error::from_raw_os_error(-r)),
            Some(r) => r as usize,
            None => 0,
        };
        while done < p.len {
            // SAFETY: ptr+done stays within the caller's buffer of p.len bytes.
            let r = sync_rw(
                self.fd,
                unsafe { p.ptr.add(done) },
                p.len - done,
                p.off + done as u64,
                p.write,
                p.dsync,
            );
            if r < 0 {
                return Err(io::Error::from_raw_os_error(-r));
            }
            if r == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "backing store ended early",
                ));
            }
            done += r as usize;
        }
        self.pending[idx].res = Some(p.len as i32);
        Ok(())
    }

    /// Waits for every queued op; returns the first error. Always reaps everything, so no
    /// kernel op can still point into a caller buffer after it returns.
    pub fn wait_all(&mut self) -> io::Result<()> {
        let mut first_err = None;
        let mut fatal = false;
        for i in 0..self.count {
            if fatal {
                break;
            }
            if let Err(e) = self.wait_one(i) {
                // A failing op still completed in the kernel (its CQE arrived) unless waiting
                // itself failed; in the latter case drain below.
                if self.pending[i].res.is_none() {
                    fatal = true;
                }
                first_err.get_or_insert(e);
            }
        }
        if fatal {
            self.drain();
        }
        self.count = 0;
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Last resort when waiting failed: block until the kernel has returned every entry.
    fn drain(&mut self) {
        if let Backend::Uring(ring) = &mut self.backend {
            let mut outstanding = self.pending[..self.count]
                .iter()
                .filter(|p| p.res.is_none())
                .count();
            while outstanding > 0 {
                if ring.submit_and_wait(1).is_err() && ring.completion().is_empty() {
                    std::thread::yield_now();
                }
                for cqe in ring.completion() {
                    let i = cqe.user_data() as usize;
                    if i < self.count && self.pending[i].res.is_none() {
                        self.pending[i].res = Some(cqe.result());
                        outstanding -= 1;
                    }
                }
            }
        }
    }

    /// `fdatasync` of the backing descriptor: returns once written data is on stable storage.
    pub fn datasync(&mut self) -> io::Result<()> {
        match &mut self.backend {
            Backend::Uring(ring) => {
                let entry = opcode::Fsync::new(types::Fd(self.fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(u64::MAX);
                // SAFETY: an fsync entry carries no buffer pointer.
                unsafe { ring.submission().push(&entry) }
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                loop {
                    match ring.submit_and_wait(1) {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                        Err(e) => return Err(e),
                    }
                    if let Some(cqe) = ring.completion().next() {
                        let r = cqe.result();
                        return if r < 0 {
                            Err(io::Error::from_raw_os_error(-r))
                        } else {
                            Ok(())
                        };
                    }
                }
            }
            Backend::Sync => {
                // SAFETY: fdatasync on a descriptor we own.
                if unsafe { libc::fdatasync(self.fd) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
        }
    }
}

/// One `pread`/`pwritev2` call; returns bytes transferred or -errno.
fn sync_rw(fd: RawFd, ptr: *mut u8, len: usize, off: u64, write: bool, dsync: bool) -> i32 {
    loop {
        // SAFETY: (ptr, len) is a live caller buffer (see push_*); fd is open.
        let r = unsafe {
            if write {
                let iov = libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: len,
                };
                libc::pwritev2(
                    fd,
                    &iov,
                    1,
                    off as libc::off_t,
                    if dsync { libc::RWF_DSYNC } else { 0 },
                )
            } else {
                libc::pread(fd, ptr.cast(), len, off as libc::off_t)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if e == libc::EINTR {
                continue;
            }
            return -e;
        }
        return r as i32;
    }
}
