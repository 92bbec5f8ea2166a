//! One ublk hardware queue: a thread with its own io_uring (libublk's per-thread queue ring) and
//! a local executor (`smol::LocalExecutor`) running one task per tag, so every tag of the queue
//! can be in flight at once.
//!
//! A tag task FETCHes a request, serves it with [`request::serve_request`] — backing reads and
//! writes are submitted on the same ring (`ublk_submit_sqe_async`) into the tag's preallocated
//! buffer, decrypted / encrypted in place — and COMMITs the result together with the next FETCH.
//! Targets without split-phase I/O ([`BlockTarget::backing_fd`] is `None`) are served with the
//! blocking calls instead (one request at a time). The executor, the ring and the tag buffers
//! are created once per queue; nothing is allocated per request.

use std::cell::Cell;
use std::future::Future;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;

use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError};

use super::Event;
use super::request::{self, Geometry};
use super::ring::{FileRef, QueueRing};
use crate::target::BlockTarget;

/// State shared between the serving thread and the queue threads.
#[derive(Default)]
pub(super) struct Fence {
    /// Set when the server is handing the device over (suspend on kernels without QUIESCE):
    /// from then on no request may be started, so that everything not yet completed is
    /// re-issued by the kernel to the next server (`UBLK_F_USER_RECOVERY_REISSUE`).
    closed: AtomicBool,
    /// Requests currently being served (from the fence check until their COMMIT is queued).
    /// Together with `closed` (both SeqCst) this lets the serving thread wait until no request
    /// can complete any more.
    busy: AtomicUsize,
}

impl Fence {
    /// Closes the fence and waits for requests already past it to finish.
    pub(super) fn close_and_drain(&self) {
        self.closed.store(true, Ordering::SeqCst);
        while self.busy.load(Ordering::SeqCst) != 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    pub(super) fn enter(&self) -> bool {
        self.busy.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.busy.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub(super) fn leave(&self) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a queue thread needs besides its queue.
pub(super) struct QueueCtx<T: BlockTarget> {
    pub target: Arc<T>,
    pub fence: Arc<Fence>,
    pub events: Sender<Event>,
    pub geometry: Geometry,
    /// Index of the target's backing descriptor among the ring's registered files (split-phase
    /// I/O), `None` for a blocking-only target.
    pub backing_file: Option<u32>,
}

/// Body of queue thread `qid`. Returns when the kernel aborts the queue (device stopped).
pub(super) fn run_queue<T: BlockTarget>(qid: u16, dev: &UblkDev, ctx: QueueCtx<T>) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
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
    // One buffer per tag, allocated once; each moves into its tag's task.
    let bufs = dev.alloc_queue_io_bufs();
    let shared = Rc::new(Shared {
        ctx: &ctx,
        ring: QueueRing::new(FileRef::Fixed(ctx.backing_file.unwrap_or(0))),
        inflight: Cell::new(0),
        max_inflight: Cell::new(0),
        qid,
    });
    let exe = smol::LocalExecutor::new();
    let mut tasks = Vec::with_capacity(bufs.len());
    for (tag, buf) in queue.tags().zip(bufs) {
        let (q, sh) = (queue.clone(), shared.clone());
        tasks.push(exe.spawn(async move {
            match tag_task(&q, tag, buf, &sh).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => {
                    tracing::error!(qid, tag, "ublk: tag task failed: {}", super::describe(&e))
                }
            }
        }));
    }
    let run_ops = || while exe.try_tick() {};
    let done = || tasks.iter().all(|t| t.is_finished());
    let res = smol::block_on(libublk::wait_and_handle_io_events(
        &queue, None, run_ops, done,
    ));
    match res {
        Ok(()) | Err(UblkError::QueueIsDown) => {}
        Err(e) => tracing::warn!(qid, "ublk: queue event loop ended: {}", super::describe(&e)),
    }
    tracing::info!(
        qid,
        max_inflight = shared.max_inflight.get(),
        "ublk: queue {qid} exits (at most {} requests were in flight at once)",
        shared.max_inflight.get()
    );
    drop(tasks);
    let _ = ctx.events.send(Event::QueueExited(qid));
}

/// What every tag task of one queue shares (single-threaded: `Cell`s, no locks).
struct Shared<'a, T: BlockTarget> {
    ctx: &'a QueueCtx<T>,
    ring: QueueRing,
    inflight: Cell<usize>,
    max_inflight: Cell<usize>,
    qid: u16,
}

impl<T: BlockTarget> Shared<'_, T> {
    fn begin(&self) {
        let n = self.inflight.get() + 1;
        self.inflight.set(n);
        if n > self.max_inflight.get() {
            self.max_inflight.set(n);
            // A log line at each new power of two: shows the queue's concurrency (the VM test
            // checks it) without a line per request.
            if n.is_power_of_two() {
                tracing::info!(
                    qid = self.qid,
                    inflight = n,
                    "ublk: queue {}: {n} requests in flight at once (new high)",
                    self.qid
                );
            }
        }
    }

    fn end(&self) {
        self.inflight.set(self.inflight.get().saturating_sub(1));
    }
}

/// One tag: FETCH, then serve + COMMIT_AND_FETCH until the queue goes down.
async fn tag_task<T: BlockTarget>(
    q: &UblkQueue<'_>,
    tag: u16,
    mut buf: IoBuf<u8>,
    sh: &Shared<'_, T>,
) -> Result<(), UblkError> {
    let ctx = sh.ctx;
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        if !ctx.fence.enter() {
            // Handing over: leave this request to the next server (the kernel re-issues it);
            // this process exits soon.
            std::future::pending::<()>().await;
        }
        let iod = q.get_iod(tag);
        let (op_flags, start_sector, nr_sectors) = (iod.op_flags, iod.start_sector, iod.nr_sectors);
        sh.begin();
        let data = buf.as_mut_slice();
        let res = if ctx.backing_file.is_some() {
            request::serve_request(
                &*ctx.target,
                &sh.ring,
                &ctx.geometry,
                op_flags,
                start_sector,
                nr_sectors,
                data,
            )
            .await
        } else {
            request::handle_request(
                &*ctx.target,
                &ctx.geometry,
                op_flags,
                start_sector,
                nr_sectors,
                data,
            )
        };
        sh.end();
        // COMMIT the result (and FETCH the next request). The fence is left as soon as the
        // command is queued on the ring, before waiting for the next request.
        let mut commit =
            std::pin::pin!(q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res));
        let mut left = false;
        std::future::poll_fn(|cx| {
            let p = commit.as_mut().poll(cx);
            if !left {
                left = true;
                ctx.fence.leave();
            }
            p
        })
        .await?;
    }
}

/// The fixed-file index a target's backing descriptor gets: right after libublk's own
/// `/dev/ublkcN` (index 0).
pub(super) fn register_backing(dev: &mut UblkDev, fd: Option<RawFd>) -> Option<u32> {
    let fd = fd?;
    let n = usize::try_from(dev.tgt.nr_fds).ok()?;
    let slot = dev.tgt.fds.get_mut(n)?;
    *slot = fd;
    dev.tgt.nr_fds += 1;
    u32::try_from(n).ok()
}
