//! One ublk hardware queue: a thread that FETCHes requests from the kernel and maps each one onto
//! the [`BlockTarget`] (sync style: libublk's `wait_and_handle_io`, no async executor).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;

use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::sys;
use libublk::{BufDesc, UblkIORes};

use super::{BlockTarget, Event};

/// State shared between the serving thread and the queue threads.
#[derive(Default)]
pub(super) struct Fence {
    /// Set when the server is handing the device over (suspend on kernels without QUIESCE):
    /// from then on no request may be completed, so that everything not yet completed is
    /// re-issued by the kernel to the next server (`UBLK_F_USER_RECOVERY_REISSUE`).
    closed: AtomicBool,
    /// Requests currently inside a handler. Together with `closed` (both SeqCst) this lets the
    /// serving thread wait until no handler can complete a request any more.
    busy: AtomicUsize,
}

impl Fence {
    /// Closes the fence and waits for handlers already past it to finish.
    pub(super) fn close_and_drain(&self) {
        self.closed.store(true, Ordering::SeqCst);
        while self.busy.load(Ordering::SeqCst) != 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn enter(&self) -> bool {
        self.busy.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.busy.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn leave(&self) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a queue thread needs besides its queue.
pub(super) struct QueueCtx<T: BlockTarget> {
    pub target: Arc<T>,
    pub fence: Arc<Fence>,
    pub events: Sender<Event>,
    pub geometry: Geometry,
}

/// Device geometry and policy checked on every request.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    pub size: u64,
    pub sector_size: u64,
    pub read_only: bool,
    pub allow_discards: bool,
}

/// Body of queue thread `qid`. Returns when the kernel aborts the queue (device stopped).
pub(super) fn run_queue<T: BlockTarget>(qid: u16, dev: &UblkDev, ctx: QueueCtx<T>) {
    // Declared before the queue so it is dropped after it: the kernel holds these addresses.
    let mut bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            // start_dev() waits until every queue registered its buffers; report this queue as
            // failed so that wait ends (with an error) instead of hanging.
            dev.notify_buffer_registration_complete(true);
            let _ = ctx
                .events
                .send(Event::QueueFailed(qid, super::describe(&e)));
            return;
        }
    };
    let geo = ctx.geometry;
    queue.wait_and_handle_io(|q: &UblkQueue, tag: u16, _io: &UblkIOCtx| {
        if !ctx.fence.enter() {
            return; // handing over: leave the request to the next server
        }
        let iod = q.get_iod(tag);
        let (op_flags, start_sector, nr_sectors) = (iod.op_flags, iod.start_sector, iod.nr_sectors);
        let res = match bufs.get_mut(tag as usize) {
            Some(buf) => {
                let res =
                    handle_request(&*ctx.target, &geo, op_flags, start_sector, nr_sectors, buf);
                q.complete_io_cmd_unified(
                    tag,
                    BufDesc::Slice(buf.as_slice()),
                    Ok(UblkIORes::Result(res)),
                )
            }
            None => q.complete_io_cmd_unified(
                tag,
                BufDesc::Slice(&[]),
                Ok(UblkIORes::Result(-libc::EINVAL)),
            ),
        };
        if let Err(e) = res {
            tracing::error!(
                qid,
                tag,
                "ublk: completing a request failed: {}",
                super::describe(&e)
            );
        }
        ctx.fence.leave();
    });
    let _ = ctx.events.send(Event::QueueExited(qid));
}

/// Serves one request; returns the ublk result (bytes for read/write, 0 or -errno otherwise).
pub(super) fn handle_request<T: BlockTarget + ?Sized>(
    target: &T,
    geo: &Geometry,
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    buf: &mut [u8],
) -> i32 {
    let op = op_flags & 0xff;
    // ublk always counts in 512-byte units, whatever the logical block size.
    let offset = start_sector << 9;
    let len = (nr_sectors as u64) << 9;
    if op == sys::UBLK_IO_OP_FLUSH {
        return errno_result(target.flush(), 0);
    }
    let in_bounds = offset.checked_add(len).is_some_and(|end| end <= geo.size);
    let aligned = offset.is_multiple_of(geo.sector_size) && len.is_multiple_of(geo.sector_size);
    if !in_bounds || !aligned {
        tracing::warn!(
            op,
            offset,
            len,
            "ublk: rejecting misaligned or out-of-range request"
        );
        return -libc::EINVAL;
    }
    match op {
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => {
            let Some(data) = usize::try_from(len).ok().and_then(|l| buf.get_mut(..l)) else {
                return -libc::EINVAL; // larger than the buffer we announced (max_sectors)
            };
            // Bytes transferred always fit: max_io_buf_bytes is a u32 well below i32::MAX.
            let done = i32::try_from(len).unwrap_or(i32::MAX);
            if op == sys::UBLK_IO_OP_READ {
                errno_result(target.read_at(offset, data), done)
            } else if geo.read_only {
                -libc::EROFS
            } else {
                let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
                errno_result(target.write_at(offset, data, fua), done)
            }
        }
        sys::UBLK_IO_OP_DISCARD if geo.allow_discards && !geo.read_only => {
            errno_result(target.discard(offset, len), 0)
        }
        sys::UBLK_IO_OP_WRITE_ZEROES if geo.allow_discards && !geo.read_only => {
            errno_result(target.write_zeroes(offset, len), 0)
        }
        sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => -libc::EOPNOTSUPP,
        _ => -libc::EOPNOTSUPP,
    }
}

fn errno_result(r: io::Result<()>, ok: i32) -> i32 {
    match r {
        Ok(()) => ok,
        Err(e) => {
            tracing::warn!("ublk: backing I/O failed: {e}");
            -e.raw_os_error().filter(|&n| n > 0).unwrap_or(libc::EIO)
        }
    }
}
