//! FUSE-over-io_uring serving (kernel 6.14+, `fuse.enable_uring=Y`): one event-loop thread per
//! CPU queue, each with its own io_uring holding `depth` FUSE ring entries. A request arrives
//! as the completion of the entry's REGISTER / COMMIT_AND_FETCH command; the thread then
//! submits the backing I/O on the same ring, straight into/out of the entry's page-aligned
//! payload buffer, and commits the reply (which also fetches the next request) once it
//! completes — many requests per thread in flight, no thread hand-offs, no copies.
//!
//! - READ: backing read into the payload → decrypt in place → commit.
//! - WRITE: encrypt the payload in place → backing write → commit.
//! - FSYNC: `IORING_OP_FSYNC` with `DATASYNC` → commit.
//! - Partial-sector READ/WRITE (loop never sends them) and the other opcodes: answered inline
//!   with the blocking engine calls.
//!
//! Suspend: the target's `encrypt`/`decrypt` report `Suspended`; such requests
//! are kept (parked), in-flight backing I/O is finished, and then the thread blocks in
//! `BlockTarget::wait_resumed` until resume (retry them) or shutdown (fail them). New requests
//! meanwhile wait in the kernel.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::target::SplitStep;
use crate::transport::errno_of;

use super::proto::*;
use super::uring_sys::{EntryBufs, Ring, new_ring, pin_to_cpu};
use super::{Ctx, MAX_IO, Reply, TransportError, meta_reply};

/// The FUSE module parameter that makes the kernel offer FUSE-over-io_uring at INIT. kvcrypt
/// never changes it (a host-wide policy); it only reports it.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// True if the kernel has FUSE-over-io_uring but it is switched off.
pub fn kernel_has_it_disabled() -> bool {
    std::fs::read_to_string(ENABLE_URING).is_ok_and(|v| v.trim() == "N")
}

/// Whether this kernel can create the rings the FUSE queues need (128-byte SQEs).
pub fn supported() -> bool {
    new_ring(2).is_ok()
}

/// `nr_cpu_ids`: FUSE expects one queue per *possible* CPU (`/sys/devices/system/cpu/possible`,
/// e.g. "0-3" or "0,2-5"), and routes nothing through the ring until all are registered.
pub fn nr_queues() -> usize {
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let max = possible
        .trim()
        .split([',', '-'])
        .filter_map(|s| s.parse::<usize>().ok())
        .max();
    match max {
        Some(m) => m + 1,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    }
}

/// Default ring entries per queue (library users; the worker passes `--queue-depth`): enough
/// for fio iodepth 32 + loop landing on one CPU. Payload buffers (1 MiB each) are lazily
/// backed, and the kernel reuses the most recently returned entry first, so resident memory
/// follows the peak number of requests in flight, not the depth.
pub fn default_depth(queues: usize) -> usize {
    (256 / queues.max(1)).clamp(16, 64)
}

/// Starts the queue threads (`fds.len()` of them, qid = index) and waits until every queue
/// has registered its entries. On error the threads already started end when the
/// connection is torn down.
pub fn start_queues(
    ctx: &Arc<Ctx>,
    fds: Vec<OwnedFd>,
    depth: usize,
    threads: &mut Vec<JoinHandle<()>>,
) -> Result<(), TransportError> {
    let mut waits = Vec::new();
    for (qid, fd) in fds.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        let ctx = ctx.clone();
        let h = std::thread::Builder::new()
            .name(format!("kvcrypt-fuse-q{qid}"))
            .spawn(move || {
                if let Err(e) = pin_to_cpu(qid) {
                    tracing::debug!("FUSE queue {qid}: not pinned to CPU {qid}: {e}");
                }
                match Queue::new(ctx, fd, qid as u16, depth) {
                    Ok(mut q) => {
                        let _ = tx.send(Ok(()));
                        q.run();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| TransportError::Setup(format!("spawning FUSE queue thread: {e}")))?;
        threads.push(h);
        waits.push((qid, rx));
    }
    for (qid, rx) in waits {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(TransportError::Setup(format!(
                    "registering FUSE io_uring queue {qid}: {e}"
                )));
            }
            Err(_) => {
                return Err(TransportError::Setup(format!(
                    "FUSE io_uring queue {qid} did not start"
                )));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Idle,
    Read,
    Write,
    Fsync,
}

/// What an entry is doing with its current request.
#[derive(Debug, Clone, Copy)]
struct Slot {
    op: Op,
    /// `fuse_in_header.unique` (echoed in the reply header).
    unique: u64,
    /// `fuse_uring_ent_in_out.commit_id` (names the request in COMMIT_AND_FETCH).
    commit_id: u64,
    /// Volume byte offset and length of a READ/WRITE; bytes of it done on the backing store.
    offset: u64,
    len: usize,
    done: usize,
    backing: u64,
}

const IDLE: Slot = Slot {
    op: Op::Idle,
    unique: 0,
    commit_id: 0,
    offset: 0,
    len: 0,
    done: 0,
    backing: 0,
};

/// user_data: entry index << 1 | (1 for backing I/O, 0 for a FUSE command).
fn ud(i: usize, io: bool) -> u64 {
    ((i as u64) << 1) | io as u64
}

struct Queue {
    ctx: Arc<Ctx>,
    ring: Ring,
    bufs: EntryBufs,
    slots: Vec<Slot>,
    fuse: OwnedFd,
    backing: RawFd,
    qid: u16,
    /// Entries registered with the kernel (not yet ended by a failed command).
    live: usize,
    /// Backing operations in flight.
    inflight: usize,
    /// Entries waiting for the key (engine suspended).
    parked: Vec<usize>,
    cqes: Vec<(u64, i32)>,
}

impl Queue {
    fn new(ctx: Arc<Ctx>, fuse: OwnedFd, qid: u16, depth: usize) -> io::Result<Queue> {
        let depth = depth.max(1);
        let mut ring = new_ring(depth.next_power_of_two() as u32)?;
        let mut bufs = EntryBufs::new(depth, MAX_IO)?;
        let fd = fuse.as_raw_fd();
        for i in 0..depth {
            bufs.push_register(&mut ring, fd, qid, i, ud(i, false))?;
        }
        ring.submit()?;
        // A refused REGISTER completes at once; an accepted one only when a request arrives.
        for cqe in ring.completion() {
            if cqe.result() < 0 {
                return Err(io::Error::from_raw_os_error(-cqe.result()));
            }
        }
        // Only offered for targets with a backing descriptor (see FuseDevice::start).
        let backing = ctx
            .target
            .backing_fd()
            .ok_or_else(|| io::Error::other("the target has no backing descriptor"))?;
        Ok(Queue {
            ctx,
            ring,
            bufs,
            slots: vec![IDLE; depth],
            fuse,
            backing,
            qid,
            live: depth,
            inflight: 0,
            parked: Vec::with_capacity(depth),
            cqes: Vec::with_capacity(2 * depth),
        })
    }

    fn run(&mut self) {
        loop {
            if !self.parked.is_empty() {
                if !self.ctx.target.is_suspended() {
                    // Resumed while other work kept us busy. Look again afterwards: a new
                    // suspend may have parked them again, with nothing left to wake us.
                    self.retry_parked();
                    continue;
                }
                if self.inflight == 0 {
                    // Nothing else will complete: let the replies queued so far go out, then
                    // wait for the key.
                    if let Err(e) = self.ring.submit() {
                        tracing::error!("FUSE queue {}: submit: {e}", self.qid);
                    }
                    if self.ctx.target.wait_resumed(self.parked.len()) {
                        self.retry_parked();
                    } else {
                        self.fail_parked();
                    }
                    continue;
                }
            }
            if self.live == 0 && self.inflight == 0 && self.parked.is_empty() {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // Completion queue overflowing: reap first.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    tracing::error!("FUSE queue {}: io_uring wait failed: {e}", self.qid);
                    break;
                }
            }
            self.cqes.clear();
            self.cqes
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for k in 0..self.cqes.len() {
                let (data, res) = self.cqes[k];
                let i = (data >> 1) as usize;
                if i >= self.slots.len() {
                    continue;
                }
                self.bufs.returned(i);
                if data & 1 == 1 {
                    self.inflight -= 1;
                    self.on_backing(i, res);
                } else {
                    self.on_request(i, res);
                }
            }
        }
        tracing::debug!("FUSE queue {} stopped", self.qid);
    }

    /// A FUSE command of entry `i` completed: a new request, or the entry's end.
    fn on_request(&mut self, i: usize, res: i32) {
        if res < 0 {
            self.live -= 1;
            if ![libc::ENOTCONN, libc::ECANCELED, libc::ENODEV].contains(&-res) {
                tracing::warn!(
                    "FUSE queue {}: ring entry ended: {}",
                    self.qid,
                    io::Error::from_raw_os_error(-res)
                );
            }
            return;
        }
        let hdr = *self.bufs.header(i);
        let h: InHeader = read(&hdr.in_out);
        self.slots[i] = Slot {
            unique: h.unique,
            commit_id: hdr.ent.commit_id,
            ..IDLE
        };
        match h.opcode {
            READ => self.start_read(i, read(&hdr.op_in)),
            WRITE => self.start_write(i, read(&hdr.op_in), hdr.ent.payload_sz as usize),
            FSYNC => {
                self.slots[i].op = Op::Fsync;
                self.submit_backing(i);
            }
            _ => {
                let ctx = self.ctx.clone();
                let r = meta_reply(&ctx, &h, &hdr.op_in, self.bufs.payload(i));
                match r {
                    Reply::Data(n) => self.commit(i, 0, n),
                    Reply::Err(errno) => self.commit(i, errno, 0),
                    Reply::None => self.commit(i, 0, 0),
                }
            }
        }
    }

    fn start_read(&mut self, i: usize, r: ReadIn) {
        let target = &self.ctx.target;
        let len = target.size();
        let n = if r.offset >= len {
            0
        } else {
            (r.size as u64).min(len - r.offset).min(MAX_IO as u64) as usize
        };
        if n == 0 {
            return self.commit(i, 0, 0);
        }
        match target.backing_offset(r.offset, n as u64, false) {
            Ok(b) => {
                let s = &mut self.slots[i];
                (s.op, s.offset, s.len, s.backing) = (Op::Read, r.offset, n, b);
                self.submit_backing(i);
            }
            // Partial sectors: the blocking engine path does read-modify-write correctly.
            Err(_) => {
                let target = self.ctx.target.clone();
                match target.read_at(r.offset, &mut self.bufs.payload(i)[..n]) {
                    Ok(()) => self.commit(i, 0, n),
                    Err(e) => self.commit(i, errno_of(&e), 0),
                }
            }
        }
    }

    fn start_write(&mut self, i: usize, w: WriteIn, payload: usize) {
        let target = self.ctx.target.clone();
        let size = w.size as usize;
        if size > payload || size > MAX_IO {
            return self.commit(i, libc::EINVAL, 0);
        }
        if w.offset
            .checked_add(size as u64)
            .is_none_or(|end| end > target.size())
        {
            return self.commit(i, libc::ENOSPC, 0);
        }
        match target.backing_offset(w.offset, size as u64, true) {
            Ok(b) => {
                let s = &mut self.slots[i];
                (s.op, s.offset, s.len, s.backing) = (Op::Write, w.offset, size, b);
                self.encrypt_and_submit(i);
            }
            Err(libc::EROFS) => {
                tracing::error!(
                    "write at volume offset {}: the volume is read-only",
                    w.offset
                );
                self.commit(i, libc::EROFS, 0)
            }
            Err(_) => match target.write_at(w.offset, &mut self.bufs.payload(i)[..size], false) {
                Ok(()) => self.commit_write(i, w.size),
                Err(e) => self.commit(i, errno_of(&e), 0),
            },
        }
    }

    fn encrypt_and_submit(&mut self, i: usize) {
        let Slot { offset, len, .. } = self.slots[i];
        let target = self.ctx.target.clone();
        match target.encrypt(offset, &mut self.bufs.payload(i)[..len]) {
            Ok(()) => self.submit_backing(i),
            Err(SplitStep::Suspended) => self.parked.push(i),
            Err(SplitStep::Errno(errno)) => self.commit(i, errno, 0),
        }
    }

    fn finish_read(&mut self, i: usize) {
        let Slot { offset, len, .. } = self.slots[i];
        let target = self.ctx.target.clone();
        match target.decrypt(offset, &mut self.bufs.payload(i)[..len]) {
            Ok(()) => self.commit(i, 0, len),
            Err(SplitStep::Suspended) => self.parked.push(i),
            Err(SplitStep::Errno(errno)) => self.commit(i, errno, 0),
        }
    }

    /// Submits (the rest of) entry `i`'s backing operation.
    fn submit_backing(&mut self, i: usize) {
        let s = self.slots[i];
        let (at, rest, off) = (s.done, s.len - s.done, s.backing + s.done as u64);
        let (ring, fd, data) = (&mut self.ring, self.backing, ud(i, true));
        let r = match s.op {
            Op::Read => self.bufs.push_read(ring, fd, i, at, rest, off, data),
            Op::Write => self.bufs.push_write(ring, fd, i, at, rest, off, data),
            Op::Fsync => self.bufs.push_fdatasync(ring, fd, i, data),
            Op::Idle => return,
        };
        match r {
            Ok(()) => self.inflight += 1,
            Err(e) => {
                tracing::error!("FUSE queue {}: submitting backing I/O: {e}", self.qid);
                self.commit(i, libc::EIO, 0);
            }
        }
    }

    fn on_backing(&mut self, i: usize, res: i32) {
        let s = self.slots[i];
        if res == -libc::EAGAIN || res == -libc::EINTR {
            return self.submit_backing(i);
        }
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            let what = match s.op {
                Op::Read => "read",
                Op::Write => "write",
                _ => "flush",
            };
            tracing::error!(
                "backing {what} for volume offset {} ({} bytes): {e}",
                s.offset,
                s.len
            );
            return self.commit(i, -res, 0);
        }
        match s.op {
            Op::Fsync => self.commit(i, 0, 0),
            Op::Read | Op::Write => {
                if res == 0 {
                    tracing::error!(
                        "backing store ended early at volume offset {}",
                        s.offset + s.done as u64
                    );
                    return self.commit(i, libc::EIO, 0);
                }
                self.slots[i].done += res as usize;
                if self.slots[i].done < s.len {
                    self.submit_backing(i);
                } else if s.op == Op::Read {
                    self.finish_read(i);
                } else {
                    self.commit_write(i, s.len as u32);
                }
            }
            Op::Idle => {}
        }
    }

    fn retry_parked(&mut self) {
        let parked = std::mem::take(&mut self.parked);
        for &i in &parked {
            match self.slots[i].op {
                Op::Read => self.finish_read(i),
                Op::Write => self.encrypt_and_submit(i),
                _ => {}
            }
        }
        // Keep the allocation for the next suspend.
        if self.parked.is_empty() {
            self.parked = parked;
            self.parked.clear();
        }
    }

    fn fail_parked(&mut self) {
        // As the engine fails requests after shutdown.
        let errno = libc::ESHUTDOWN;
        for i in std::mem::take(&mut self.parked) {
            self.commit(i, errno, 0);
        }
    }

    fn commit_write(&mut self, i: usize, size: u32) {
        let out = WriteOut { size, padding: 0 };
        let b = bytes(&out);
        self.bufs.payload(i)[..b.len()].copy_from_slice(b);
        self.commit(i, 0, b.len());
    }

    /// Replies to entry `i`'s request (`errno` 0 = success with `n` payload bytes) and fetches
    /// its next request.
    fn commit(&mut self, i: usize, errno: i32, n: usize) {
        let s = self.slots[i];
        let n = if errno == 0 { n } else { 0 };
        let out = OutHeader {
            len: (size_of::<OutHeader>() + n) as u32,
            error: -errno,
            unique: s.unique,
        };
        let hdr = self.bufs.header(i);
        hdr.in_out[..size_of::<OutHeader>()].copy_from_slice(bytes(&out));
        hdr.ent.payload_sz = n as u32;
        self.slots[i] = IDLE;
        let fd = self.fuse.as_raw_fd();
        if let Err(e) =
            self.bufs
                .push_commit(&mut self.ring, fd, self.qid, i, s.commit_id, ud(i, false))
        {
            tracing::error!("FUSE queue {}: cannot commit a reply: {e}", self.qid);
            self.live -= 1;
        }
    }
}
