//! The unsafe edge of FUSE-over-io_uring, kept in one place: entry buffers that the kernel
//! fills asynchronously, SQE pushes that hand their addresses to the kernel, and CPU pinning.
//! The event loop (`uring.rs`) is safe code on top of this.
//!
//! Ownership rule that makes the buffer accessors sound: an entry is *lent* from the moment an
//! SQE naming its buffers is pushed until the event loop reports that SQE's completion
//! ([`EntryBufs::returned`]). The kernel touches an entry's buffers only while it is lent; the
//! accessors refuse (panic) on a lent entry, so Rust references never alias kernel writes.

use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use io_uring::squeue::Entry128;
use io_uring::{IoUring, cqueue, opcode, types};

use super::proto::{
    FUSE_IO_URING_CMD_COMMIT_AND_FETCH, FUSE_IO_URING_CMD_REGISTER, UringCmdReq, UringReqHeader,
    bytes,
};

/// A ring with 128-byte SQEs (`IORING_SETUP_SQE128`, needed for `IORING_OP_URING_CMD`).
pub type Ring = IoUring<Entry128, cqueue::Entry>;

/// Creates a ring for one queue thread. `DEFER_TASKRUN` runs completions only when this
/// thread waits for them (no interrupting task work); older kernels get a plain ring.
pub fn new_ring(entries: u32) -> io::Result<Ring> {
    IoUring::<Entry128, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        .or_else(|_| {
            IoUring::<Entry128, cqueue::Entry>::builder()
                .setup_coop_taskrun()
                .build(entries)
        })
}

/// An anonymous private mapping: pages cost memory only once touched, and it is excluded from
/// core dumps (payload buffers hold plaintext).
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: anonymous mapping with no address hint; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: p is our fresh mapping of len bytes; advice failure is harmless.
        unsafe { libc::madvise(p, len, libc::MADV_DONTDUMP) };
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`; no references outlive self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Header + payload buffers of `n` ring entries. The payload of each entry starts on a page
/// boundary, so `O_DIRECT` backing I/O goes straight in and out of it.
pub struct EntryBufs {
    headers: Mapping,
    payloads: Mapping,
    payload_size: usize,
    iovs: Box<[[libc::iovec; 2]]>,
    lent: Vec<bool>,
}

impl EntryBufs {
    pub fn new(n: usize, payload_size: usize) -> io::Result<EntryBufs> {
        let payload_size = payload_size.div_ceil(4096) * 4096;
        let hsz = size_of::<UringReqHeader>();
        let headers = Mapping::new((n * hsz).max(1))?;
        let payloads = Mapping::new((n * payload_size).max(1))?;
        let iovs = (0..n)
            .map(|i| {
                [
                    libc::iovec {
                        // Offsets stay inside the mappings sized just above.
                        iov_base: headers.ptr.as_ptr().wrapping_add(i * hsz).cast(),
                        iov_len: hsz,
                    },
                    libc::iovec {
                        iov_base: payloads.ptr.as_ptr().wrapping_add(i * payload_size).cast(),
                        iov_len: payload_size,
                    },
                ]
            })
            .collect();
        Ok(EntryBufs {
            headers,
            payloads,
            payload_size,
            iovs,
            lent: vec![false; n],
        })
    }

    /// The completion of the SQE that lent entry `i` has been reaped: it is ours again.
    pub fn returned(&mut self, i: usize) {
        if let Some(l) = self.lent.get_mut(i) {
            *l = false;
        }
    }

    /// Entry `i`'s header buffer. Panics if the entry is lent to the kernel.
    pub fn header(&mut self, i: usize) -> &mut UringReqHeader {
        assert!(!self.lent[i], "ring entry {i} is owned by the kernel");
        let p = self.iovs[i][0].iov_base.cast::<UringReqHeader>();
        // SAFETY: p points into our header mapping, is aligned (mmap is page-aligned and the
        // header size is a multiple of 8) and valid for one UringReqHeader (Pod: any bytes are
        // valid). The entry is not lent, so the kernel does not write it while the returned
        // borrow (tied to &mut self) lives.
        unsafe { &mut *p }
    }

    /// Entry `i`'s payload buffer (page-aligned). Panics if the entry is lent to the kernel.
    pub fn payload(&mut self, i: usize) -> &mut [u8] {
        assert!(!self.lent[i], "ring entry {i} is owned by the kernel");
        let p = self.iovs[i][1].iov_base.cast::<u8>();
        // SAFETY: p..p+payload_size lies in our payload mapping; the entry is not lent (see
        // `header`), and entries do not overlap.
        unsafe { std::slice::from_raw_parts_mut(p, self.payload_size) }
    }

    /// FUSE_IO_URING_CMD_REGISTER for entry `i` on queue `qid`.
    pub fn push_register(
        &mut self,
        ring: &mut Ring,
        fuse_fd: RawFd,
        qid: u16,
        i: usize,
        user_data: u64,
    ) -> io::Result<()> {
        let req = UringCmdReq {
            qid,
            ..UringCmdReq::default()
        };
        let sqe = opcode::UringCmd80::new(types::Fd(fuse_fd), FUSE_IO_URING_CMD_REGISTER)
            .cmd(cmd_area(&req))
            .addr(Some(self.iovs[i].as_ptr() as u64))
            .build()
            .user_data(user_data);
        // `UringCmd80` cannot set `sqe->len`, which FUSE reads as the iovec count (2).
        let sqe = with_len(sqe, 2);
        self.lend_and_push(ring, i, &sqe)
    }

    /// FUSE_IO_URING_CMD_COMMIT_AND_FETCH: the reply is in entry `i`'s buffers.
    pub fn push_commit(
        &mut self,
        ring: &mut Ring,
        fuse_fd: RawFd,
        qid: u16,
        i: usize,
        commit_id: u64,
        user_data: u64,
    ) -> io::Result<()> {
        let req = UringCmdReq {
            commit_id,
            qid,
            ..UringCmdReq::default()
        };
        let sqe = opcode::UringCmd80::new(types::Fd(fuse_fd), FUSE_IO_URING_CMD_COMMIT_AND_FETCH)
            .cmd(cmd_area(&req))
            .build()
            .user_data(user_data);
        self.lend_and_push(ring, i, &sqe)
    }

    /// Reads `len` bytes at `offset` of `fd` into entry `i`'s payload at `at`.
    #[allow(clippy::too_many_arguments)]
    pub fn push_read(
        &mut self,
        ring: &mut Ring,
        fd: RawFd,
        i: usize,
        at: usize,
        len: usize,
        offset: u64,
        user_data: u64,
    ) -> io::Result<()> {
        let buf = self.payload(i)[at..at + len].as_mut_ptr();
        let sqe = opcode::Read::new(types::Fd(fd), buf, len as u32)
            .offset(offset)
            .build()
            .user_data(user_data);
        self.lend_and_push(ring, i, &Entry128::from(sqe))
    }

    /// Writes `len` bytes of entry `i`'s payload at `at` to `offset` of `fd`.
    #[allow(clippy::too_many_arguments)]
    pub fn push_write(
        &mut self,
        ring: &mut Ring,
        fd: RawFd,
        i: usize,
        at: usize,
        len: usize,
        offset: u64,
        user_data: u64,
    ) -> io::Result<()> {
        let buf = self.payload(i)[at..at + len].as_ptr();
        let sqe = opcode::Write::new(types::Fd(fd), buf, len as u32)
            .offset(offset)
            .build()
            .user_data(user_data);
        self.lend_and_push(ring, i, &Entry128::from(sqe))
    }

    /// `fdatasync(fd)` on behalf of entry `i` (touches no buffer, but keeps the accounting
    /// uniform: every in-flight SQE lends its entry).
    pub fn push_fdatasync(
        &mut self,
        ring: &mut Ring,
        fd: RawFd,
        i: usize,
        user_data: u64,
    ) -> io::Result<()> {
        let sqe = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(user_data);
        self.lend_and_push(ring, i, &Entry128::from(sqe))
    }

    fn lend_and_push(&mut self, ring: &mut Ring, i: usize, sqe: &Entry128) -> io::Result<()> {
        assert!(!self.lent[i], "ring entry {i} already has an SQE in flight");
        loop {
            // SAFETY: every address in the SQE points into this EntryBufs (iovec array, header,
            // payload), which stays alive and unmoved while the entry is lent: the mappings
            // are only unmapped in Drop, which leaks them instead if anything is still lent.
            let pushed = unsafe { ring.submission().push(sqe) };
            match pushed {
                Ok(()) => {
                    self.lent[i] = true;
                    return Ok(());
                }
                // Submission queue full: hand what is queued to the kernel and retry.
                Err(_full) => {
                    ring.submit()?;
                }
            }
        }
    }
}

impl Drop for EntryBufs {
    fn drop(&mut self) {
        if self.lent.iter().any(|&l| l) {
            // The kernel may still write into these buffers (an event loop that ended with
            // requests outstanding, e.g. after a ring error): never hand the pages back.
            tracing::warn!(
                bytes = self.headers.len + self.payloads.len,
                "leaking FUSE ring buffers still owned by the kernel"
            );
            std::mem::forget(std::mem::replace(&mut self.headers, dangling()));
            std::mem::forget(std::mem::replace(&mut self.payloads, dangling()));
        }
    }
}

/// A zero-length placeholder mapping (munmap of length 0 fails harmlessly with EINVAL).
fn dangling() -> Mapping {
    Mapping {
        ptr: NonNull::dangling(),
        len: 0,
    }
}

fn cmd_area(req: &UringCmdReq) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[..size_of::<UringCmdReq>()].copy_from_slice(bytes(req));
    cmd
}

/// Sets `sqe->len` (bytes 24..28 of the SQE).
fn with_len(sqe: Entry128, len: u32) -> Entry128 {
    const _: () = assert!(size_of::<Entry128>() == 128);
    // SAFETY: Entry128 is `repr(C)` around the 128-byte kernel SQE (64-byte io_uring_sqe +
    // 64-byte command tail), plain integers only, so it round-trips through a byte array.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute::<Entry128, [u8; 128]>(sqe) };
    raw[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above; every byte pattern is a valid SQE value for the type.
    unsafe { std::mem::transmute::<[u8; 128], Entry128>(raw) }
}

/// Pins the calling thread to `cpu` (FUSE routes a request to the queue of the CPU it was
/// issued on; serving it there keeps the data in that CPU's caches).
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it (CPU_SET ignores
    // out-of-range CPUs); sched_setaffinity reads size_of::<cpu_set_t>() bytes from it.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's page size (FUSE counts `max_pages` in pages).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}
