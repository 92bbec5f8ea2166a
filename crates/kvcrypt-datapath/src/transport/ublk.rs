//! ublk transport: serves a volume's plaintext as `/dev/ublkbN` through `libublk`.
//!
//! Every device is created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`: when the
//! serving process goes away (crash, SIGKILL, suspend on kernels without `UBLK_F_QUIESCE`) the
//! device stays, goes QUIESCED and keeps its requests; a new server re-attaches with
//! [`serve`]`(.., Some(dev_id), ..)` and the kernel re-issues everything that was not completed.
//! Without REISSUE those requests fail with EIO, which ext4 turns into silent data loss (the
//! writer saw success, the data never arrives). Re-running an XTS sector write is idempotent,
//! so re-issue is safe.
//!
//! Threads: one per hardware queue (default one queue per CPU). Each runs a local executor with
//! one task per tag on the queue's own io_uring, so all tags of a queue are served concurrently:
//! backing reads/writes are submitted on that ring and only the crypto steps call the
//! [`BlockTarget`] (split-phase, see the trait). The calling thread of [`serve`] controls the
//! device and waits for a [`StopRequest`]. Files: `queue.rs` (queue thread, tag tasks, hand-over
//! fence), `request.rs` (request checks and mapping), `ring.rs` (backing I/O as io_uring SQEs
//! on the queue ring), `os.rs` (raw OS calls).

mod os;
mod queue;
mod request;
mod ring;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{UblkError, UblkFlags, sys};

use kvcrypt_exit::{Exit, ExitClass};

use crate::target::BlockTarget;

pub use os::exit_immediately;

/// The ublk control node; present when the `ublk_drv` module is loaded.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";

/// Target name recorded with the device (visible in libublk's /run/ublksrvd/N.json).
const TARGET_NAME: &str = "kvcrypt";

/// Largest request the kernel may send us (also the size of each per-tag buffer).
const DEFAULT_MAX_IO_BYTES: u32 = 512 * 1024;

/// Recovery flags, always set (see module docs).
const RECOVERY_FLAGS: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

/// How to serve the device.
#[derive(Clone, Debug)]
pub struct UblkOptions {
    /// Hardware queues; `None` = one per CPU.
    pub queues: Option<u16>,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Refuse writes (the device is marked read-only).
    pub read_only: bool,
    /// Announce discard / write-zeroes support and pass them to the target. Off by default:
    /// discards reveal which blocks are in use.
    pub allow_discards: bool,
    /// Largest request in bytes (multiple of the page size).
    pub max_io_bytes: u32,
    /// Volume identity (e.g. the header UUID) stored with the device; recovery refuses a device
    /// recorded with a different identity.
    pub volume_id: Option<String>,
    /// Directory the serving process keeps its state in (the worker's run directory): its
    /// mount stays in the server's private mount namespace, every other foreign mount goes.
    pub run_dir: Option<std::path::PathBuf>,
}

impl Default for UblkOptions {
    fn default() -> Self {
        Self {
            queues: None,
            depth: 128,
            read_only: false,
            allow_discards: false,
            max_io_bytes: DEFAULT_MAX_IO_BYTES,
            volume_id: None,
            run_dir: None,
        }
    }
}

/// What the controlling side wants [`serve`] to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopRequest {
    /// Stop and delete the device (`kvcrypt close`): the kernel flushes it first.
    Close,
    /// Hand the device over (suspend): leave it QUIESCED with pending I/O kept, so a later
    /// `serve(.., Some(dev_id), ..)` resumes it.
    Detach,
}

/// How [`serve`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeEnd {
    /// The device was stopped and deleted.
    Closed,
    /// The device is quiesced (kernel `UBLK_F_QUIESCE`) and our queues are gone; this process
    /// may wipe its keys and continue (or recover the device again later).
    Quiesced,
    /// The kernel has no `UBLK_F_QUIESCE` (6.12): no request will be completed any more, but the
    /// device only goes QUIESCED once this process exits. The caller must wipe its keys and call
    /// [`exit_immediately`] (libublk's queue teardown would hang on these kernels).
    ExitToQuiesce,
    /// Someone else stopped the device (our queues were aborted).
    StoppedExternally,
}

/// Messages to the serving thread.
pub(crate) enum Event {
    Stop(StopRequest),
    QueueExited(u16),
    QueueFailed(u16, String),
}

/// Sends [`StopRequest`]s to a running [`serve`]. Cheap to clone.
#[derive(Clone)]
pub struct StopHandle(Sender<Event>);

impl StopHandle {
    /// Asks `serve` to stop; false if it has already returned.
    pub fn request(&self, req: StopRequest) -> bool {
        self.0.send(Event::Stop(req)).is_ok()
    }
}

/// The receiving end given to [`serve`].
pub struct StopSignal {
    rx: Receiver<Event>,
    tx: Sender<Event>,
}

/// Creates the stop channel for one [`serve`] call.
pub fn stop_channel() -> (StopHandle, StopSignal) {
    let (tx, rx) = mpsc::channel();
    (StopHandle(tx.clone()), StopSignal { rx, tx })
}

/// ublk transport errors.
#[derive(Debug, thiserror::Error)]
pub enum UblkTransportError {
    #[error(
        "ublk is not available: {UBLK_CONTROL} is missing (load the module with `modprobe ublk_drv`; \
         needs Linux 6.0+ built with CONFIG_BLK_DEV_UBLK), or use --transport fuse"
    )]
    Unavailable,
    #[error("cannot serve this volume over ublk: {0}")]
    Geometry(String),
    #[error("ublk {op} failed for {dev}: {detail}")]
    Control {
        op: &'static str,
        dev: String,
        detail: String,
    },
    #[error("ublk queue {qid} of /dev/ublkb{dev_id} failed: {detail}")]
    Queue {
        dev_id: u32,
        qid: u16,
        detail: String,
    },
    #[error("cannot recover /dev/ublkb{dev_id}: {reason}")]
    NotRecoverable { dev_id: u32, reason: String },
    #[error("cannot recover /dev/ublkb{dev_id}: it belongs to another volume ({what})")]
    Mismatch { dev_id: u32, what: String },
    /// The cause (capability, seccomp filter …) is in the message of the inner error.
    #[error("could not give the ublk server a private mount namespace: {0}")]
    Namespace(kvcrypt_host::mountinfo::NamespaceError),
}

impl ExitClass for UblkTransportError {
    fn exit_class(&self) -> Exit {
        match self {
            Self::Unavailable => Exit::Unsupported,
            Self::Geometry(_) | Self::Control { .. } | Self::Queue { .. } => Exit::Device,
            Self::NotRecoverable { .. } | Self::Mismatch { .. } => Exit::Busy,
            Self::Namespace(e) if e.is_permission() => Exit::Permission,
            Self::Namespace(_) => Exit::Failure,
        }
    }
}

type Result<T> = std::result::Result<T, UblkTransportError>;

/// Whether this kernel offers ublk (`/dev/ublk-control` exists).
pub fn ublk_available() -> bool {
    Path::new(UBLK_CONTROL).exists()
}

/// The driver's `UBLK_F_*` feature bits (`None` before Linux 6.5 or without ublk).
pub fn kernel_features() -> Option<u64> {
    if !ublk_available() {
        return None;
    }
    UblkCtrl::get_features()
}

/// Whether the driver supports in-process suspend (`UBLK_F_QUIESCE`, Linux 6.16+).
pub fn kernel_has_quiesce() -> bool {
    kernel_features().is_some_and(|f| f & sys::UBLK_F_QUIESCE as u64 != 0)
}

/// Block device node of ublk device `dev_id`.
pub fn block_device_path(dev_id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{dev_id}"))
}

/// Kernel state of a ublk device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    Dead,
    Live,
    Quiesced,
    FailIo,
    Unknown(u16),
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dead => f.write_str("DEAD"),
            Self::Live => f.write_str("LIVE"),
            Self::Quiesced => f.write_str("QUIESCED"),
            Self::FailIo => f.write_str("FAIL_IO"),
            Self::Unknown(n) => write!(f, "state {n}"),
        }
    }
}

fn state_of(raw: u16) -> DeviceState {
    match raw as u32 {
        sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
        sys::UBLK_S_DEV_LIVE => DeviceState::Live,
        sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
        sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
        n => DeviceState::Unknown(n as u16),
    }
}

/// Current state and serving pid of ublk device `dev_id` (`None` if it does not exist).
pub fn device_state(dev_id: u32) -> Option<(DeviceState, i32)> {
    let id = i32::try_from(dev_id).ok()?;
    let ctrl = UblkCtrl::new_simple(id).ok()?;
    ctrl.read_dev_info().ok()?;
    let info = ctrl.dev_info();
    Some((state_of(info.state), info.ublksrv_pid))
}

/// Whether ublk device `dev_id` was left behind by a server that is gone (killed, crashed or
/// suspended) and can be re-attached with `serve(.., Some(dev_id), ..)`: QUIESCED, or still LIVE
/// with a dead server pid (the kernel notices the death asynchronously). `kvcrypt open` uses this
/// with the `ublk_dev_id` of a stale state file to recover instead of adding a new device.
pub fn is_recoverable(dev_id: u32) -> bool {
    match device_state(dev_id) {
        Some((DeviceState::Quiesced, _)) => true,
        Some((DeviceState::Live, pid)) => {
            !u32::try_from(pid).is_ok_and(kvcrypt_host::process::pid_alive)
        }
        _ => false,
    }
}

/// Stops and deletes ublk device `dev_id` whatever state it is in (e.g. a QUIESCED device whose
/// volume is being closed while no worker serves it). Queued requests fail with EIO.
pub fn delete_device(dev_id: u32) -> Result<()> {
    let dev = format!("/dev/ublkb{dev_id}");
    let ctrl_err = |op, e: UblkError| UblkTransportError::Control {
        op,
        dev: dev.clone(),
        detail: describe(&e),
    };
    let id = i32::try_from(dev_id)
        .map_err(|_| UblkTransportError::Geometry(format!("device id {dev_id} out of range")))?;
    let ctrl = UblkCtrl::new_simple(id).map_err(|e| ctrl_err("open", e))?;
    let _ = ctrl.kill_dev(); // may already be stopped
    ctrl.del_dev().map_err(|e| ctrl_err("delete", e))?;
    Ok(())
}

/// Human-readable form of a libublk error (its Display drops the errno).
pub(crate) fn describe(e: &UblkError) -> String {
    match e {
        UblkError::OtherError(n) | UblkError::UringIOError(n) if *n < 0 => {
            format!("{} (errno {})", io::Error::from_raw_os_error(-*n), -*n)
        }
        UblkError::IOError(io) => io.to_string(),
        other => format!("{other:?}"),
    }
}

fn ublk_params(size: u64, opts: &UblkOptions, shift: u8) -> sys::ublk_params {
    let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    if opts.read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    let mut params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: shift,
            physical_bs_shift: shift,
            io_opt_shift: shift,
            io_min_shift: shift,
            max_sectors: opts.max_io_bytes >> 9,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if opts.allow_discards && !opts.read_only {
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.discard = sys::ublk_param_discard {
            discard_granularity: 1 << shift,
            max_discard_sectors: opts.max_io_bytes >> 9,
            max_write_zeroes_sectors: opts.max_io_bytes >> 9,
            max_discard_segments: 1,
            ..Default::default()
        };
    }
    params
}

fn sector_shift(sector_size: u32) -> Result<u8> {
    match sector_size {
        512 => Ok(9),
        4096 => Ok(12),
        n => Err(UblkTransportError::Geometry(format!(
            "sector size {n} (ublk serves 512 or 4096)"
        ))),
    }
}

fn default_queues() -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    u16::try_from(cpus).unwrap_or(u16::MAX).clamp(1, 64)
}

/// Serves `target` as a ublk block device until a [`StopRequest`] arrives on `stop`.
///
/// With `recover_dev_id = None` a new device is added; with `Some(id)` the existing QUIESCED
/// device `id` (left behind by a killed or suspended server) is re-attached — same
/// `/dev/ublkbN`, held requests continue. `on_ready(block_device, dev_id)` is called once the
/// device is LIVE. Blocks the calling thread. The calling thread is first moved into a private
/// mount namespace cleared of foreign mounts (see [`kvcrypt_host::mountinfo::enter_worker_namespace`]:
/// a ublk server must not hold mounts of its own or any other device); call this from the thread that owns the
/// serving process's lifetime (the worker's main thread).
pub fn serve<T: BlockTarget>(
    target: Arc<T>,
    opts: &UblkOptions,
    recover_dev_id: Option<u32>,
    on_ready: impl FnOnce(&Path, u32),
    stop: StopSignal,
) -> Result<ServeEnd> {
    if !ublk_available() {
        return Err(UblkTransportError::Unavailable);
    }
    let shift = sector_shift(target.sector_size())?;
    let size = target.size();
    if size == 0 || !size.is_multiple_of(1u64 << shift) {
        return Err(UblkTransportError::Geometry(format!(
            "data area of {size} bytes is not a positive multiple of the {}-byte sector",
            1u64 << shift
        )));
    }
    if opts.depth == 0 || u32::from(opts.depth) > sys::UBLK_MAX_QUEUE_DEPTH {
        return Err(UblkTransportError::Geometry(format!(
            "queue depth {} (must be 1..={})",
            opts.depth,
            sys::UBLK_MAX_QUEUE_DEPTH
        )));
    }
    let page = 4096u32;
    if opts.max_io_bytes < page.max(1 << shift) || !opts.max_io_bytes.is_multiple_of(page) {
        return Err(UblkTransportError::Geometry(format!(
            "max I/O size {} (must be a multiple of {page})",
            opts.max_io_bytes
        )));
    }
    kvcrypt_host::mountinfo::enter_worker_namespace(opts.run_dir.as_deref())
        .map_err(UblkTransportError::Namespace)?;
    let features = UblkCtrl::get_features().unwrap_or(0);
    let quiesce = features & sys::UBLK_F_QUIESCE as u64 != 0;

    let ctrl = match recover_dev_id {
        None => add_ctrl(opts, quiesce)?,
        Some(id) => recover_ctrl(id, opts, size, shift)?,
    };
    let dev_id = ctrl.dev_info().dev_id;
    let dev_name = format!("/dev/ublkb{dev_id}");
    let ctrl_err = |op: &'static str, e: UblkError| UblkTransportError::Control {
        op,
        dev: dev_name.clone(),
        detail: describe(&e),
    };
    tracing::info!(
        dev_id,
        recover = recover_dev_id.is_some(),
        features = format_args!("{features:#x}"),
        flags = format_args!("{:#x}", ctrl.dev_info().flags),
        "ublk: control device ready"
    );

    let params = ublk_params(size, opts, shift);
    let target_json = serde_json::json!({ "kvcrypt": { "volume_id": opts.volume_id } });
    let mut backing_file = None;
    let dev = UblkDev::new(
        TARGET_NAME.to_string(),
        |dev: &mut UblkDev| {
            dev.set_default_params(size);
            dev.tgt.params = params;
            dev.set_target_json(target_json);
            // Split-phase targets: the queues submit backing I/O on their own rings against
            // this descriptor (registered as a fixed file in every queue ring).
            backing_file = queue::register_backing(dev, target.backing_fd());
            Ok(())
        },
        &ctrl,
    )
    .map_err(|e| ctrl_err("open char device", e))?;
    let dev = Arc::new(dev);
    tracing::info!(
        dev_id,
        split_phase = backing_file.is_some(),
        "ublk: queues serve {}",
        if backing_file.is_some() {
            "every tag concurrently (backing I/O on the queue rings)"
        } else {
            "one request at a time (blocking target)"
        }
    );

    let fence = Arc::new(queue::Fence::default());
    let geometry = request::Geometry {
        size,
        sector_size: 1 << shift,
        read_only: opts.read_only,
        allow_discards: opts.allow_discards,
    };
    let StopSignal { rx, tx } = stop;
    let nr_queues = dev.dev_info.nr_hw_queues;
    let (tid_tx, tid_rx) = mpsc::channel();
    let mut threads = Vec::with_capacity(nr_queues as usize);
    for qid in 0..nr_queues {
        let ctx = queue::QueueCtx {
            target: target.clone(),
            fence: fence.clone(),
            events: tx.clone(),
            geometry,
            backing_file,
        };
        let qdev = dev.clone();
        let tid_tx = tid_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ublk{dev_id}-q{qid}"))
            .spawn(move || {
                let _ = tid_tx.send((qid, UblkCtrl::init_queue_thread()));
                queue::run_queue(qid, &qdev, ctx);
            });
        match spawned {
            Ok(h) => threads.push(h),
            Err(e) => {
                let err = ctrl_err("spawn queue thread", UblkError::IOError(e));
                return Err(abandon(&ctrl, recover_dev_id, err, &rx, threads, dev));
            }
        }
    }
    drop(tid_tx);
    for _ in 0..nr_queues {
        let Ok((qid, tid)) = tid_rx.recv() else { break };
        ctrl.set_thread_affinity(qid, tid);
        if let Err(e) = ctrl.configure_queue(&dev, qid, tid) {
            let err = ctrl_err("configure queue", e);
            return Err(abandon(&ctrl, recover_dev_id, err, &rx, threads, dev));
        }
    }
    let started = Instant::now();
    if let Err(e) = ctrl.start_dev(&dev) {
        // A queue that failed to set up explains the failure better than start_dev's errno.
        let queue_failure = rx.try_iter().find_map(|ev| match ev {
            Event::QueueFailed(qid, detail) => Some(UblkTransportError::Queue {
                dev_id,
                qid,
                detail,
            }),
            _ => None,
        });
        let op = if recover_dev_id.is_some() {
            "end recovery"
        } else {
            "start"
        };
        let err = queue_failure.unwrap_or_else(|| ctrl_err(op, e));
        return Err(abandon(&ctrl, recover_dev_id, err, &rx, threads, dev));
    }
    let bdev = block_device_path(dev_id);
    // devtmpfs creates the node synchronously in add_disk; udev may rename it — wait briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !bdev.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::info!(
        dev_id,
        ms = started.elapsed().as_millis() as u64,
        "ublk: {} is live",
        bdev.display()
    );
    on_ready(&bdev, dev_id);

    // ---- serve until asked to stop, or until the queues go away ----
    let mut exited = 0u16;
    let mut failure: Option<UblkTransportError> = None;
    let request = loop {
        match rx.recv() {
            Ok(Event::Stop(req)) => break Some(req),
            Ok(Event::QueueExited(qid)) => {
                tracing::info!(dev_id, qid, "ublk: queue aborted by the kernel");
                exited += 1;
                if exited == nr_queues {
                    break None;
                }
            }
            Ok(Event::QueueFailed(qid, detail)) => {
                exited += 1;
                failure = Some(UblkTransportError::Queue {
                    dev_id,
                    qid,
                    detail,
                });
                break Some(StopRequest::Close);
            }
            // Unreachable while `tx` (kept in StopSignal) lives; treat as close.
            Err(_) => break Some(StopRequest::Close),
        }
    };
    drop(tx);

    let end = match request {
        None => {
            // Every queue was aborted without our asking: stopped by someone else.
            join_all(threads);
            drop(dev);
            match device_state(dev_id) {
                Some((DeviceState::Quiesced, _)) => ctrl.disown(),
                Some(_) => {
                    let _ = ctrl.del_dev();
                }
                None => {}
            }
            ServeEnd::StoppedExternally
        }
        Some(StopRequest::Close) => {
            // STOP_DEV: the kernel flushes and removes the disk (our queues keep serving while it
            // does), then aborts the queues.
            let stopped = ctrl.kill_dev();
            if !wait_queues(&rx, nr_queues - exited, Duration::from_secs(60)) {
                ctrl.disown();
                return Err(ctrl_err(
                    "stop (queues did not exit)",
                    stopped
                        .err()
                        .unwrap_or(UblkError::OtherError(-libc::ETIMEDOUT)),
                ));
            }
            join_all(threads);
            drop(dev); // closes /dev/ublkcN, which DEL_DEV waits for
            ctrl.del_dev().map_err(|e| ctrl_err("delete", e))?;
            if let Err(e) = target.flush() {
                tracing::warn!("ublk: final flush of the backing store failed: {e}");
            }
            ServeEnd::Closed
        }
        Some(StopRequest::Detach) if quiesce => {
            // Kernel quiesce: in-flight requests complete, new ones are held, our queues get
            // ABORT and unwind; QUIESCE_DEV returns once /dev/ublkcN is released.
            let waiter = std::thread::spawn(move || {
                let ctrl = UblkCtrl::new_simple(dev_id as i32)?;
                ctrl.quiesce_dev(0)
            });
            let ok = wait_queues(&rx, nr_queues - exited, Duration::from_secs(120));
            if !ok {
                ctrl.disown();
                return Err(ctrl_err(
                    "quiesce (queues did not exit)",
                    UblkError::OtherError(-libc::ETIMEDOUT),
                ));
            }
            join_all(threads);
            drop(dev);
            let res = waiter
                .join()
                .unwrap_or(Err(UblkError::OtherError(-libc::EIO)));
            ctrl.disown();
            res.map_err(|e| ctrl_err("quiesce", e))?;
            if let Err(e) = target.flush() {
                tracing::warn!("ublk: flush after quiesce failed: {e}");
            }
            ServeEnd::Quiesced
        }
        Some(StopRequest::Detach) => {
            // 6.12: fence off request completion; the process must now exit (see ServeEnd).
            fence.close_and_drain();
            if let Err(e) = target.flush() {
                tracing::warn!("ublk: flush before hand-over failed: {e}");
            }
            ctrl.disown();
            // Queue threads stay (detached) in the kernel until the process exits.
            drop(threads);
            ServeEnd::ExitToQuiesce
        }
    };
    match failure {
        Some(e) => Err(e),
        None => Ok(end),
    }
}

fn add_ctrl(opts: &UblkOptions, quiesce: bool) -> Result<UblkCtrl> {
    let mut flags = RECOVERY_FLAGS;
    if quiesce {
        flags |= sys::UBLK_F_QUIESCE as u64;
    }
    UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(-1)
        .nr_queues(opts.queues.unwrap_or_else(default_queues).max(1))
        .depth(opts.depth)
        .io_buf_bytes(opts.max_io_bytes)
        .ctrl_flags(flags)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(|e| UblkTransportError::Control {
            op: "add device",
            dev: UBLK_CONTROL.into(),
            detail: describe(&e),
        })
}

/// Checks that device `dev_id` is a QUIESCED kvcrypt device of this geometry, then starts
/// recovery (START_USER_RECOVERY) and returns a control handle for re-attaching.
fn recover_ctrl(dev_id: u32, opts: &UblkOptions, size: u64, shift: u8) -> Result<UblkCtrl> {
    let not = |reason: String| UblkTransportError::NotRecoverable { dev_id, reason };
    let id = i32::try_from(dev_id).map_err(|_| not("device id out of range".into()))?;
    let probe = UblkCtrl::new_simple(id)
        .map_err(|e| not(format!("no such ublk device ({})", describe(&e))))?;
    // The kernel notices a dead server asynchronously: give it a moment to reach QUIESCED.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        probe.read_dev_info().map_err(|e| not(describe(&e)))?;
        let info = probe.dev_info();
        match state_of(info.state) {
            DeviceState::Quiesced => break,
            DeviceState::Live
                if Instant::now() < deadline
                    && !u32::try_from(info.ublksrv_pid)
                        .is_ok_and(kvcrypt_host::process::pid_alive) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            DeviceState::Live => {
                return Err(not(format!(
                    "it is LIVE, served by pid {} (stop or kill that server first)",
                    info.ublksrv_pid
                )));
            }
            other => {
                return Err(not(format!(
                    "it is {other}, not QUIESCED (only a device left by a killed or suspended server can be recovered)"
                )));
            }
        }
    }
    let info = probe.dev_info();
    if info.flags & RECOVERY_FLAGS != RECOVERY_FLAGS {
        return Err(not(format!(
            "it was created without USER_RECOVERY|REISSUE (flags {:#x})",
            info.flags
        )));
    }
    let mut params = sys::ublk_params::default();
    probe
        .get_params(&mut params)
        .map_err(|e| not(describe(&e)))?;
    if params.basic.dev_sectors != size >> 9 || params.basic.logical_bs_shift != shift {
        return Err(UblkTransportError::Mismatch {
            dev_id,
            what: format!(
                "device has {} sectors of {} bytes, volume has {} bytes in {}-byte sectors",
                params.basic.dev_sectors,
                1u32 << params.basic.logical_bs_shift,
                size,
                1u32 << shift
            ),
        });
    }
    if let Some(want) = &opts.volume_id {
        let recorded = probe.get_target_data_from_json().and_then(|v| {
            v.pointer("/kvcrypt/volume_id")
                .and_then(|s| s.as_str())
                .map(str::to_owned)
        });
        match recorded {
            Some(have) if &have != want => {
                return Err(UblkTransportError::Mismatch {
                    dev_id,
                    what: format!("recorded volume {have}, this volume is {want}"),
                });
            }
            Some(_) => {}
            None => tracing::warn!(
                dev_id,
                "ublk: no volume id recorded for the device; recovering on geometry match only"
            ),
        }
    }
    let r = probe
        .start_user_recover()
        .map_err(|e| not(format!("START_USER_RECOVERY: {}", describe(&e))))?;
    if r < 0 {
        return Err(not(format!(
            "START_USER_RECOVERY: {}",
            describe(&UblkError::OtherError(r))
        )));
    }
    UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(id)
        .nr_queues(info.nr_hw_queues)
        .depth(info.queue_depth)
        .io_buf_bytes(info.max_io_buf_bytes)
        .ctrl_flags(RECOVERY_FLAGS)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()
        .map_err(|e| UblkTransportError::Control {
            op: "open for recovery",
            dev: format!("/dev/ublkb{dev_id}"),
            detail: describe(&e),
        })
}

/// Start-up failed after queue threads exist. A new device is stopped (which aborts our queues)
/// and deleted once they are gone; a device being recovered is left as it is (still QUIESCED
/// after this process exits, so recovery can be retried). Never lets libublk's `Drop` delete the
/// device underneath live queues, which can block forever.
fn abandon(
    ctrl: &UblkCtrl,
    recover_dev_id: Option<u32>,
    err: UblkTransportError,
    rx: &Receiver<Event>,
    threads: Vec<std::thread::JoinHandle<()>>,
    dev: Arc<UblkDev>,
) -> UblkTransportError {
    ctrl.disown();
    if recover_dev_id.is_some() {
        drop(threads); // detached: blocked in the kernel until the process exits
        return err;
    }
    let _ = ctrl.kill_dev();
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        let _ = rx.recv_timeout(Duration::from_millis(50));
    }
    if threads.iter().all(|t| t.is_finished()) {
        join_all(threads);
        drop(dev);
        if let Err(e) = ctrl.del_dev() {
            tracing::warn!(
                "ublk: could not delete the half-started device: {}",
                describe(&e)
            );
        }
    } else {
        drop(threads); // detached
        tracing::warn!(
            "ublk: queues of the half-started device did not exit; it goes away with this process"
        );
    }
    err
}

/// Waits until `n` more queues report that they exited.
fn wait_queues(rx: &Receiver<Event>, mut n: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while n > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::QueueExited(_)) | Ok(Event::QueueFailed(..)) => n -= 1,
            Ok(Event::Stop(_)) => {}
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
    true
}

fn join_all(threads: Vec<std::thread::JoinHandle<()>>) {
    for t in threads {
        if t.join().is_err() {
            tracing::error!("ublk: a queue thread panicked");
        }
    }
}

#[cfg(test)]
mod tests;
