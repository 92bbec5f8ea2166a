//! FUSE + loop transport: the plaintext volume is the single file of a FUSE filesystem (the
//! mount root *is* the file), attached to a loop device with direct I/O, so users get a real
//! block device where ublk is missing.
//!
//! Why the FUSE protocol is spoken by hand over `/dev/fuse` instead of through `fuser`: we need
//! (1) one reader thread per cloned `/dev/fuse` descriptor (`FUSE_DEV_IOC_CLONE`) so requests
//! are served in parallel without a dispatcher hop, (2) control over the read buffer layout so
//! a WRITE's payload lands page-aligned and is encrypted in place and written with `O_DIRECT`
//! without a copy, (3) `FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES`, `FUSE_ASYNC_DIO`,
//! `max_pages` = 1 MiB requests and a large `max_background`, and (4) a file as the mount root.
//! A single-file filesystem needs only ~12 opcodes, which is less code than adapting `fuser`'s
//! session loop (single-threaded, one copy per write).
//!
//! Request flow: loop (kernel) → FUSE READ/WRITE/FSYNC/FALLOCATE → the [`BlockTarget`] (in
//! production the engine) → backing store.
//! While the engine is suspended the serving threads block inside the engine, so requests wait
//! (in the kernel's FUSE queue) instead of failing.
//!
//! Two serving modes, chosen at INIT ([`FuseMode`]): FUSE-over-io_uring ([`uring`]) when the
//! kernel offers it (`/sys/module/fuse/parameters/enable_uring` = Y at mount time) — one
//! event-loop thread per CPU, many requests in flight each — else one thread per cloned
//! `/dev/fuse` descriptor, one request at a time each.
//!
//! Taking over from a dead worker ([`FuseDevice::recover`], /dev/fuse mode only): the FUSE
//! connection lives as long as some process holds an open file of its `/dev/fuse` descriptors
//! (`fuse_dev_release()` aborts it when the last one goes, and first fails the requests on that
//! descriptor's processing list with ECONNABORTED). The agent keeps duplicates of the worker's
//! descriptors ([`FuseDevice::shared_fds`]), so a worker's death releases nothing: what it had
//! read stays on the processing lists, new requests queue up, and the loop device, the FUSE
//! file and a filesystem mounted on the loop device stay as they are. A new worker given the
//! same descriptors sends `FUSE_NOTIFY_RESEND` (Linux 6.9+, offered as `FUSE_HAS_RESEND` at
//! INIT), which moves those requests back to pending, and serves them again: a sector read or
//! write re-run with XTS gives the same result, so a resent request is safe. INIT is not sent
//! again on a connection, so the new worker serves by the parameters recorded at INIT
//! ([`FuseInit`]). FUSE-over-io_uring rings die with their process and `fuse_resend()` only
//! walks the /dev/fuse processing lists, so that mode cannot be taken over.

mod proto;
mod uring;
mod uring_sys;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::engine::{ALIGN, AlignedBuf};
use crate::target::BlockTarget;

use super::loopdev::{self, LoopDevice};
use super::{TransportError, errno_of};
use proto::*;

/// Largest READ/WRITE the kernel sends (FUSE `max_write`, `max_pages` = 256).
pub const MAX_IO: usize = 1024 * 1024;

/// Bytes before a WRITE's payload in the request (in header + fuse_write_in).
const WRITE_HDR: usize = size_of::<InHeader>() + size_of::<WriteIn>();

/// The label (`lo_file_name`, shown by losetup) of the loop device serving volume `name`; the
/// agent finds a dead worker's loop device by it.
pub fn loop_label(name: &str) -> String {
    format!("kvcrypt:{name}")
}

/// What the kernel and the first worker of a connection agreed at INIT. The kernel sends INIT
/// once per connection, so a worker that takes the connection over ([`FuseDevice::recover`])
/// must serve by these; recorded in the worker's state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FuseInit {
    /// fusectl connection number (`/sys/fs/fuse/connections/N`: minor of the FUSE file's st_dev).
    pub conn: u64,
    pub minor: u32,
    pub max_write: u32,
    pub max_pages: u16,
    pub flags: u32,
    pub flags2: u32,
    /// The kernel offered `FUSE_HAS_RESEND`: it understands `FUSE_NOTIFY_RESEND`.
    pub resend: bool,
}

impl FuseInit {
    /// Why a new worker of this build cannot take over a connection set up with these
    /// parameters (`None`: it can). The serving code sizes its buffers by `MAX_IO` and speaks
    /// the /dev/fuse protocol only.
    pub fn why_not_recoverable(&self) -> Option<String> {
        if !self.resend {
            return Some("the kernel lacks FUSE_NOTIFY_RESEND (Linux 6.9+)".into());
        }
        if self.flags2 & FUSE_OVER_IO_URING_FLAGS2 != 0 {
            return Some(
                "the connection uses FUSE-over-io_uring, whose rings die with their worker".into(),
            );
        }
        if self.max_write != MAX_IO as u32 || self.max_pages != max_pages() {
            return Some(format!(
                "negotiated max_write {} / max_pages {} differ from this build's {} / {}",
                self.max_write,
                self.max_pages,
                MAX_IO,
                max_pages()
            ));
        }
        if self.minor > FUSE_KERNEL_MINOR_VERSION {
            return Some(format!(
                "protocol minor {} is newer than this build's",
                self.minor
            ));
        }
        None
    }
}

/// `max_pages` answered at INIT: in pages of the kernel's size, no request may exceed MAX_IO
/// (the buffers).
fn max_pages() -> u16 {
    (MAX_IO / uring_sys::page_size()).max(1) as u16
}

/// Settings of the FUSE + loop transport.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Volume name (used in the loop device's file name field and logs).
    pub name: String,
    /// Path of the regular file the FUSE filesystem is mounted on (created if missing).
    pub mountpoint: PathBuf,
    /// Serving threads in /dev/fuse mode (one cloned /dev/fuse descriptor each). The
    /// io_uring mode always runs one queue thread per CPU (FUSE's rule) plus one /dev/fuse
    /// thread for FORGET/INTERRUPT.
    pub threads: usize,
    pub read_only: bool,
    /// Ask loop for direct I/O on the FUSE file (no double caching). On by default.
    pub loop_direct_io: bool,
    /// Use FUSE-over-io_uring when the kernel offers it at INIT. On by default.
    pub io_uring: bool,
    /// Ring entries per CPU queue in io_uring mode (`None`: [`uring::default_depth`]).
    pub uring_depth: Option<usize>,
}

/// How requests reach the serving threads (decided at INIT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuseMode {
    /// FUSE-over-io_uring: one event loop per CPU queue.
    IoUring,
    /// Thread per cloned `/dev/fuse` descriptor.
    DevFuse,
}

impl FuseMode {
    /// "io_uring" / "dev_fuse" (the worker status field `fuse_mode`).
    pub fn as_str(self) -> &'static str {
        match self {
            FuseMode::IoUring => "io_uring",
            FuseMode::DevFuse => "dev_fuse",
        }
    }
}

impl FuseOptions {
    pub fn new(name: &str, mountpoint: impl Into<PathBuf>) -> FuseOptions {
        FuseOptions {
            name: name.to_string(),
            mountpoint: mountpoint.into(),
            threads: default_threads(),
            read_only: false,
            loop_direct_io: true,
            io_uring: true,
            uring_depth: None,
        }
    }
}

/// Default serving threads. Each thread handles one request at a time and does its backing
/// I/O synchronously, so the thread count is the I/O depth the backing store sees; it must
/// match what loop sends (fio iodepth 32: 8 threads gave 9K random-read IOPS, 32 threads 31K
/// on the same machine — see benches/fio-compare.sh). Idle threads only cost memory.
pub fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    (cpus * 16).clamp(32, 64)
}

/// A served FUSE + loop device. Dropping it tears everything down (best effort); use
/// [`close`](Self::close) for an orderly removal that reports errors.
pub struct FuseDevice {
    target: Arc<dyn BlockTarget>,
    loopdev: Option<LoopDevice>,
    mountpoint: PathBuf,
    mounted: bool,
    conn: u64,
    mode: FuseMode,
    threads: Vec<JoinHandle<()>>,
    /// Duplicates of every /dev/fuse descriptor a serving thread reads (/dev/fuse mode), for
    /// [`shared_fds`](Self::shared_fds).
    fds: Vec<OwnedFd>,
    init: Option<FuseInit>,
    ctx: Option<Arc<Ctx>>,
}

impl std::fmt::Debug for FuseDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseDevice")
            .field("mountpoint", &self.mountpoint)
            .field("loop", &self.loopdev)
            .finish_non_exhaustive()
    }
}

impl FuseDevice {
    /// Mounts the FUSE file, starts the serving threads and attaches the loop device.
    pub fn start(
        target: Arc<dyn BlockTarget>,
        opts: &FuseOptions,
    ) -> Result<FuseDevice, TransportError> {
        let mp = opts.mountpoint.clone();
        let mount_err = |source| TransportError::Mount {
            path: mp.clone(),
            source,
        };
        if let Some(dir) = mp.parent() {
            std::fs::create_dir_all(dir).map_err(mount_err)?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        if !mp.exists() {
            File::create(&mp).map_err(mount_err)?;
        }
        let fuse = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/fuse")
            .map_err(TransportError::NoFuse)?;
        let opts_str = format!(
            "fd={},rootmode=100000,user_id=0,group_id=0",
            fuse.as_raw_fd()
        );
        let c_mp = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes())
            .map_err(|_| TransportError::Setup("mount point path contains NUL".into()))?;
        let c_opts = std::ffi::CString::new(opts_str)
            .map_err(|_| TransportError::Setup("bad mount options".into()))?;
        // SAFETY: all pointers are NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                c"kvcrypt".as_ptr(),
                c_mp.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c_opts.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(mount_err(io::Error::last_os_error()));
        }
        let mut dev = FuseDevice {
            target: target.clone(),
            loopdev: None,
            mountpoint: mp.clone(),
            mounted: true,
            conn: 0,
            mode: FuseMode::DevFuse,
            threads: Vec::new(),
            fds: Vec::new(),
            init: None,
            ctx: None,
        };

        // The first /dev/fuse thread answers INIT (sent at mount) and reports whether the
        // kernel took FUSE-over-io_uring; the other threads are started after that.
        let (init_tx, init_rx) = mpsc::channel();
        let ctx = Arc::new(Ctx {
            target: target.clone(),
            read_only: opts.read_only,
            // The io_uring mode submits backing I/O itself: only for targets that have a descriptor.
            offer_uring: opts.io_uring && uring::supported() && target.backing_fd().is_some(),
            init_done: Mutex::new(Some(init_tx)),
            resent: AtomicU64::new(0),
        });
        dev.ctx = Some(ctx.clone());
        let fuse = OwnedFd::from(fuse);
        let raw = fuse.as_raw_fd();
        let clone =
            || clone_fd(raw).map_err(|e| TransportError::Setup(format!("FUSE_DEV_IOC_CLONE: {e}")));
        dev.spawn_reader(&ctx, 0, fuse)?;
        let init = init_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| TransportError::Setup("the kernel sent no FUSE INIT".into()))?;
        let use_uring = init.is_some_and(|i| i.flags2 & FUSE_OVER_IO_URING_FLAGS2 != 0);
        dev.init = init;
        if use_uring {
            dev.mode = FuseMode::IoUring;
            let queues = uring::nr_queues();
            let depth = opts
                .uring_depth
                .unwrap_or_else(|| uring::default_depth(queues));
            let fds = (0..queues)
                .map(|_| clone())
                .collect::<Result<Vec<_>, _>>()?;
            uring::start_queues(&ctx, fds, depth, &mut dev.threads)?;
            // FORGET and INTERRUPT still come through /dev/fuse.
            dev.spawn_reader(&ctx, 1, clone()?)?;
            tracing::info!(
                fuse_mode = "io_uring",
                queues,
                depth,
                "FUSE requests served over io_uring"
            );
        } else {
            for i in 1..opts.threads.max(1) {
                dev.spawn_reader(&ctx, i, clone()?)?;
            }
            tracing::info!(
                fuse_mode = "dev_fuse",
                threads = opts.threads.max(1),
                "FUSE requests served by /dev/fuse threads"
            );
            if opts.io_uring && uring::kernel_has_it_disabled() {
                tracing::info!(
                    "this kernel has FUSE-over-io_uring, switched off: `echo Y > {}` (or the \
                     fuse.enable_uring=1 module option) before opening makes the FUSE path faster",
                    uring::ENABLE_URING
                );
            }
        }

        // Opening the file goes through the serving threads (in io_uring mode, the kernel
        // holds requests until every queue has registered).
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(&mp)
            .map_err(mount_err)?;
        dev.conn = file
            .metadata()
            .map(|m| libc::minor(m.dev()) as u64)
            .unwrap_or(0);
        if let Some(i) = dev.init.as_mut() {
            i.conn = dev.conn;
        }
        let lo = loopdev::attach(
            &file,
            target.sector_size(),
            opts.read_only,
            opts.loop_direct_io,
            &loop_label(&opts.name),
        )?;
        if opts.loop_direct_io && !lo.direct_io() {
            tracing::warn!(device = %lo.path().display(), "loop refused direct I/O on the FUSE file; using its page cache");
        }
        tracing::info!(device = %lo.path().display(), fuse_mode = dev.mode.as_str(), "FUSE+loop device ready");
        dev.loopdev = Some(lo);
        Ok(dev)
    }

    /// Serves an existing connection whose worker died: `fds` are the same open /dev/fuse files
    /// the dead worker read (held meanwhile by the agent), `init` what was agreed at its INIT,
    /// `loop_dev` the loop device bound to its FUSE file. Nothing is mounted or attached: one
    /// serving thread per descriptor, then `FUSE_NOTIFY_RESEND` makes the kernel send again
    /// every request the dead worker had read but not answered. The caller must be sure the
    /// dead worker's threads are all gone (its pidfd said so), or they could race us for them.
    pub fn recover(
        target: Arc<dyn BlockTarget>,
        opts: &FuseOptions,
        fds: Vec<OwnedFd>,
        init: FuseInit,
        loop_dev: &Path,
    ) -> Result<FuseDevice, TransportError> {
        if let Some(why) = init.why_not_recoverable() {
            return Err(TransportError::Setup(format!(
                "cannot take over the FUSE connection: {why}"
            )));
        }
        if fds.is_empty() {
            return Err(TransportError::Setup(
                "no /dev/fuse descriptors to take over".into(),
            ));
        }
        // An aborted connection reports POLLERR on its descriptors (fuse_dev_poll): nothing to
        // take over then (the dead worker's requests already failed).
        if connection_ended(&fds[0]) {
            return Err(TransportError::Setup(
                "the FUSE connection has already ended".into(),
            ));
        }
        let lo = loopdev::open_existing(loop_dev, opts.read_only, &loop_label(&opts.name))
            .map_err(|e| {
                TransportError::Setup(format!(
                    "{} is not the loop device of '{}' any more: {e}",
                    loop_dev.display(),
                    opts.name
                ))
            })?;
        let ctx = Arc::new(Ctx {
            target: target.clone(),
            read_only: opts.read_only,
            offer_uring: false,
            init_done: Mutex::new(None),
            resent: AtomicU64::new(0),
        });
        let mut dev = FuseDevice {
            target,
            loopdev: None,
            mountpoint: opts.mountpoint.clone(),
            mounted: false,
            conn: init.conn,
            mode: FuseMode::DevFuse,
            threads: Vec::new(),
            fds: Vec::new(),
            init: Some(init),
            ctx: Some(ctx.clone()),
        };
        // Resend before any thread of ours reads: fuse_resend() moves every processing list
        // back to pending, ours too. A request one of our threads was already serving would be
        // served twice at once, and its late copy could overwrite a newer write to the same
        // sectors. Before our threads start, only the dead worker's requests are there.
        notify_resend(&fds[0]).map_err(|e| {
            TransportError::Setup(format!("FUSE_NOTIFY_RESEND refused by the kernel: {e}"))
        })?;
        let n = fds.len();
        for (i, fd) in fds.into_iter().enumerate() {
            dev.spawn_reader(&ctx, i, fd)?;
        }
        tracing::info!(device = %lo.path().display(), threads = n, conn = init.conn,
            "took over the FUSE connection of {} in place; the kernel resends what the dead worker had not answered",
            lo.path().display());
        dev.loopdev = Some(lo);
        Ok(dev)
    }

    /// Duplicates of the open /dev/fuse files every serving thread reads, for whoever must
    /// keep the connection alive across this worker's death (see the module documentation).
    /// `None` when a new worker could not take the connection over anyway (io_uring mode, a
    /// kernel without FUSE_NOTIFY_RESEND): holding the files would then only keep a dead
    /// connection's I/O hanging instead of failing.
    pub fn shared_fds(&self) -> Option<(&[OwnedFd], FuseInit)> {
        let init = self.init?;
        if self.mode != FuseMode::DevFuse || init.why_not_recoverable().is_some() {
            return None;
        }
        Some((&self.fds, init))
    }

    /// What INIT agreed (`None` before INIT was answered).
    pub fn init(&self) -> Option<FuseInit> {
        self.init
    }

    /// Requests the kernel sent a second time after FUSE_NOTIFY_RESEND (taken over from a
    /// dead worker) that this device has read.
    pub fn resent_requests(&self) -> u64 {
        self.ctx
            .as_ref()
            .map_or(0, |c| c.resent.load(Ordering::Relaxed))
    }

    fn spawn_reader(
        &mut self,
        ctx: &Arc<Ctx>,
        i: usize,
        fd: OwnedFd,
    ) -> Result<(), TransportError> {
        let dup = fd
            .try_clone()
            .map_err(|e| TransportError::Setup(format!("dup of a /dev/fuse descriptor: {e}")))?;
        self.fds.push(dup);
        let ctx = ctx.clone();
        let h = std::thread::Builder::new()
            .name(format!("kvcrypt-fuse-{i}"))
            .spawn(move || serve_thread(&ctx, fd))
            .map_err(|e| TransportError::Setup(format!("spawning FUSE thread: {e}")))?;
        self.threads.push(h);
        Ok(())
    }

    /// The serving mode the kernel agreed to at INIT.
    pub fn mode(&self) -> FuseMode {
        self.mode
    }

    /// The block device users see (`/dev/loopN`).
    pub fn block_device(&self) -> Option<&Path> {
        self.loopdev.as_ref().map(|l| l.path())
    }

    /// Whether loop does direct I/O on the FUSE file.
    pub fn loop_direct_io(&self) -> bool {
        self.loopdev.as_ref().is_some_and(|l| l.direct_io())
    }

    pub fn target(&self) -> &Arc<dyn BlockTarget> {
        &self.target
    }

    /// True if something (a mount, a process) holds the block device open.
    pub fn in_use(&self) -> bool {
        self.loopdev.as_ref().is_some_and(|l| l.in_use())
    }

    /// Orderly removal: refuses while the device is in use (unless `force`), flushes, detaches
    /// the loop device, unmounts the FUSE file and stops the threads.
    /// After an error the device is still served (nothing was torn down) unless the error is
    /// from the final flush.
    pub fn close(&mut self, force: bool) -> Result<(), TransportError> {
        // udev probes a device right after it is closed or unmounted (blkid holds it for a
        // moment): only a device that stays busy for a while counts as in use.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while !force && self.in_use() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if !force && self.in_use() {
            let dev = self
                .block_device()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(TransportError::Busy(dev));
        }
        let flushed = if self.target.is_suspended() {
            Ok(())
        } else {
            self.target.flush()
        };
        self.teardown();
        flushed.map_err(TransportError::Flush)
    }

    fn teardown(&mut self) {
        // Parked requests (suspended engine) must fail now, or the threads never finish.
        if self.target.is_suspended() {
            self.target.shutdown();
        }
        // Last close of an autoclear loop device detaches it (and releases the FUSE file).
        self.loopdev = None;
        // Our own duplicates must not outlive the device (they do not keep the connection up:
        // it ends when its superblock goes, whoever holds descriptors).
        self.fds.clear();
        let serving = !self.threads.is_empty();
        if self.mounted {
            let c_mp = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()).ok();
            if let Some(c_mp) = c_mp {
                // SAFETY: NUL-terminated path; MNT_DETACH never blocks on busy mounts.
                unsafe { libc::umount2(c_mp.as_ptr(), libc::MNT_DETACH) };
            }
            self.mounted = false;
        }
        // After a lazy unmount with no users (or, for a connection taken over from a dead
        // worker, whose mount went with that worker's namespace, once loop let go of the file)
        // the connection ends and readers get ENODEV. If the kernel still has references (e.g.
        // loop detaching asynchronously, or a filesystem still mounted on a force-closed
        // device), abort the connection explicitly through fusectl where it is mounted.
        if serving {
            let abort = format!("/sys/fs/fuse/connections/{}/abort", self.conn);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while self.threads.iter().any(|t| !t.is_finished()) {
                if std::time::Instant::now() > deadline {
                    let _ = std::fs::write(&abort, "1");
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.mountpoint);
    }
}

impl Drop for FuseDevice {
    fn drop(&mut self) {
        if self.mounted || !self.threads.is_empty() {
            self.teardown();
        }
    }
}

struct Ctx {
    target: Arc<dyn BlockTarget>,
    read_only: bool,
    /// Accept FUSE-over-io_uring if the kernel offers it.
    offer_uring: bool,
    /// Told once INIT is answered: what was agreed (`None`: INIT refused).
    init_done: Mutex<Option<mpsc::Sender<Option<FuseInit>>>>,
    /// Resent requests read (see [`FuseDevice::resent_requests`]).
    resent: AtomicU64,
}

/// Answer to a request handled without backing I/O of its own.
enum Reply {
    /// No reply expected (FORGET, INTERRUPT).
    None,
    /// Fails with this (positive) errno.
    Err(i32),
    /// Succeeds with the first n bytes of the output buffer.
    Data(usize),
}

fn clone_fd(orig: RawFd) -> io::Result<OwnedFd> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")?;
    let fd = OwnedFd::from(f);
    let mut o = orig as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the original fd) from the pointer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), FUSE_DEV_IOC_CLONE, &mut o) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Per-thread buffers, allocated once: the request buffer is laid out so that a WRITE payload
/// starts on a page boundary (request read at `ALIGN - WRITE_HDR`), and READ replies are
/// decrypted in place in an aligned reply buffer.
fn serve_thread(ctx: &Ctx, fd: OwnedFd) {
    let mut req = AlignedBuf::new(ALIGN + MAX_IO + ALIGN);
    let mut reply = AlignedBuf::new(MAX_IO);
    let raw = fd.as_raw_fd();
    loop {
        let base = ALIGN - WRITE_HDR;
        // SAFETY: reading into our own buffer, at most its remaining length.
        let n = unsafe { libc::read(raw, req[base..].as_mut_ptr().cast(), req.len() - base) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                // ENOENT: the request was interrupted before we read it. EINTR/EAGAIN: retry.
                Some(libc::ENOENT | libc::EINTR | libc::EAGAIN) => continue,
                // ENODEV: unmounted / aborted — the normal end.
                Some(libc::ENODEV) => break,
                _ => {
                    tracing::error!("reading /dev/fuse: {}", io::Error::last_os_error());
                    break;
                }
            }
        }
        let n = n as usize;
        if n < size_of::<InHeader>() {
            continue;
        }
        let msg = &mut req[base..base + n];
        let h: InHeader = read(msg);
        if h.unique & FUSE_UNIQUE_RESEND != 0 {
            ctx.resent.fetch_add(1, Ordering::Relaxed);
        }
        if h.opcode == DESTROY {
            reply_empty(raw, h.unique, 0);
            break;
        }
        handle(ctx, raw, &h, msg, &mut reply);
    }
    drop(fd);
}

fn handle(ctx: &Ctx, fd: RawFd, h: &InHeader, msg: &mut [u8], reply: &mut AlignedBuf) {
    let body_start = size_of::<InHeader>();
    let target = &ctx.target;
    match h.opcode {
        INIT => {
            let i: InitIn = read(&msg[body_start..]);
            if i.major != FUSE_KERNEL_VERSION {
                reply_empty(fd, h.unique, -libc::EPROTO);
                init_answered(ctx, None);
                return;
            }
            let want =
                FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES | FUSE_INIT_EXT;
            let offered = i.flags & FUSE_INIT_EXT != 0 && i.flags2 & FUSE_OVER_IO_URING_FLAGS2 != 0;
            let uring = offered && ctx.offer_uring;
            let out = InitOut {
                major: FUSE_KERNEL_VERSION,
                minor: FUSE_KERNEL_MINOR_VERSION.min(i.minor),
                max_readahead: i.max_readahead,
                flags: i.flags & want,
                max_background: 256,
                congestion_threshold: 192,
                max_write: MAX_IO as u32,
                time_gran: 1,
                max_pages: max_pages(),
                flags2: if uring { FUSE_OVER_IO_URING_FLAGS2 } else { 0 },
                ..InitOut::default()
            };
            if offered && !uring {
                tracing::info!("the kernel offers FUSE-over-io_uring but it is not used here");
            }
            // The kernel marks the connection initialised while processing this write, so
            // ring registration (which needs that) may start once it returns.
            reply_struct(fd, h.unique, &out);
            let ext = i.flags & FUSE_INIT_EXT != 0;
            init_answered(
                ctx,
                Some(FuseInit {
                    conn: 0,
                    minor: out.minor,
                    max_write: out.max_write,
                    max_pages: out.max_pages,
                    flags: out.flags,
                    flags2: out.flags2,
                    resend: ext && i.flags2 & FUSE_HAS_RESEND_FLAGS2 != 0,
                }),
            );
        }
        READ => {
            let r: ReadIn = read(&msg[body_start..]);
            let len = target.size();
            let n = if r.offset >= len {
                0
            } else {
                (r.size as u64).min(len - r.offset).min(MAX_IO as u64) as usize
            };
            if n == 0 {
                reply_empty(fd, h.unique, 0);
                return;
            }
            match target.read_at(r.offset, &mut reply[..n]) {
                Ok(()) => reply_data(fd, h.unique, &reply[..n]),
                Err(e) => reply_err(fd, h.unique, &e),
            }
        }
        WRITE => {
            let w: WriteIn = read(&msg[body_start..]);
            let size = w.size as usize;
            if msg.len() < WRITE_HDR + size {
                reply_empty(fd, h.unique, -libc::EINVAL);
                return;
            }
            if w.offset
                .checked_add(size as u64)
                .is_none_or(|end| end > target.size())
            {
                reply_empty(fd, h.unique, -libc::ENOSPC);
                return;
            }
            // The payload is page-aligned (see serve_thread): encrypted in place, no copy.
            match target.write_at(w.offset, &mut msg[WRITE_HDR..WRITE_HDR + size], false) {
                Ok(()) => reply_struct(
                    fd,
                    h.unique,
                    &WriteOut {
                        size: w.size,
                        padding: 0,
                    },
                ),
                Err(e) => reply_err(fd, h.unique, &e),
            }
        }
        _ => match meta_reply(ctx, h, &msg[body_start..], reply) {
            Reply::None => {}
            Reply::Err(errno) => reply_empty(fd, h.unique, -errno),
            Reply::Data(n) => reply_data(fd, h.unique, &reply[..n]),
        },
    }
}

fn init_answered(ctx: &Ctx, init: Option<FuseInit>) {
    if let Some(tx) = ctx.init_done.lock().ok().and_then(|mut g| g.take()) {
        let _ = tx.send(init);
    }
}

/// `FUSE_NOTIFY_RESEND`: a notification is an out header with `unique` 0 and the code in
/// `error` (fuse_dev_do_write). A kernel that does not know the code answers EINVAL.
fn notify_resend(fd: &OwnedFd) -> io::Result<()> {
    let hdr = OutHeader {
        len: size_of::<OutHeader>() as u32,
        error: FUSE_NOTIFY_RESEND,
        unique: 0,
    };
    let b = bytes(&hdr);
    let n = rustix::io::write(fd, b)?;
    if n != b.len() {
        return Err(io::Error::other("short write"));
    }
    Ok(())
}

/// The connection behind a /dev/fuse descriptor was aborted (it polls POLLERR then).
fn connection_ended(fd: &OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut p = [PollFd::new(fd, PollFlags::IN)];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut p, Some(&zero)) {
        Ok(_) => p[0].revents().contains(PollFlags::ERR),
        Err(_) => true,
    }
}

/// Requests other than INIT, READ and WRITE, in both modes: `body` is the opcode's first
/// argument, the reply goes to the start of `out`. FSYNC and FALLOCATE block in the engine
/// (the io_uring mode submits FSYNC itself and only gets here for the rest).
fn meta_reply(ctx: &Ctx, h: &InHeader, body: &[u8], out: &mut [u8]) -> Reply {
    fn put<T: Pod>(out: &mut [u8], t: &T) -> Reply {
        let b = bytes(t);
        out[..b.len()].copy_from_slice(b);
        Reply::Data(b.len())
    }
    let target = &ctx.target;
    // The target logged the failure (crate::engine::target); the reply carries its errno.
    let target_err = |e: &io::Error| Reply::Err(errno_of(e));
    match h.opcode {
        GETATTR => put(out, &attr_out(ctx)),
        SETATTR => {
            let s: SetattrIn = read(body);
            if s.valid & FATTR_SIZE != 0 && s.size != target.size() {
                Reply::Err(libc::EPERM)
            } else {
                put(out, &attr_out(ctx))
            }
        }
        OPEN => {
            let flags = read::<OpenIn>(body).flags as i32;
            if ctx.read_only && (flags & libc::O_ACCMODE) != libc::O_RDONLY {
                return Reply::Err(libc::EROFS);
            }
            let o = OpenOut {
                fh: 1,
                open_flags: FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES,
                backing_id: 0,
            };
            put(out, &o)
        }
        FSYNC => match target.flush() {
            Ok(()) => Reply::Data(0),
            Err(e) => target_err(&e),
        },
        FALLOCATE => {
            let f: FallocateIn = read(body);
            match fallocate(target.as_ref(), &f) {
                Ok(()) => Reply::Data(0),
                Err(e) => target_err(&e),
            }
        }
        FLUSH | RELEASE => Reply::Data(0),
        STATFS => {
            let ss = target.sector_size();
            let st = StatfsOut {
                blocks: target.size() / ss as u64,
                bsize: ss,
                frsize: ss,
                namelen: 255,
                ..StatfsOut::default()
            };
            put(out, &st)
        }
        LOOKUP => Reply::Err(libc::ENOENT),
        FORGET | BATCH_FORGET | INTERRUPT => Reply::None,
        _ => Reply::Err(libc::ENOSYS),
    }
}

/// fallocate from loop: `PUNCH_HOLE` is both a discard and (without REQ_NOUNMAP) a
/// write-zeroes request; the engine's discard leaves zeros, so both are served correctly.
/// Without `--allow-discards` punching is refused and the kernel falls back to writing zero
/// pages for write-zeroes. `ZERO_RANGE` writes encrypted zeros (reveals nothing).
fn fallocate(target: &dyn BlockTarget, f: &FallocateIn) -> io::Result<()> {
    let mode = f.mode as i32;
    if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
        return target.discard(f.offset, f.length);
    }
    if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
        return target.write_zeroes(f.offset, f.length);
    }
    if mode == 0 || mode == libc::FALLOC_FL_KEEP_SIZE {
        // Plain allocation: the whole volume already exists.
        return match f.offset.checked_add(f.length) {
            Some(end) if end <= target.size() => Ok(()),
            _ => {
                tracing::error!(
                    "fallocate at volume offset {}: {} bytes reach past the end of the {}-byte volume",
                    f.offset,
                    f.length,
                    target.size()
                );
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            }
        };
    }
    tracing::error!(
        "fallocate at volume offset {}: mode {mode:#x} is not supported",
        f.offset
    );
    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

fn attr_out(ctx: &Ctx) -> AttrOut {
    let size = ctx.target.size();
    AttrOut {
        attr_valid: 3600,
        attr: Attr {
            ino: ROOT_ID,
            size,
            blocks: size / 512,
            mode: libc::S_IFREG | if ctx.read_only { 0o400 } else { 0o600 },
            nlink: 1,
            blksize: ctx.target.sector_size(),
            ..Attr::default()
        },
        ..AttrOut::default()
    }
}

/// Fails a request with the target's error (the target logged it; see crate::engine::target).
fn reply_err(fd: RawFd, unique: u64, e: &io::Error) {
    reply_empty(fd, unique, -errno_of(e));
}

fn reply_empty(fd: RawFd, unique: u64, error: i32) {
    reply_iov(fd, unique, error, &[]);
}

fn reply_struct<T: Pod>(fd: RawFd, unique: u64, t: &T) {
    reply_iov(fd, unique, 0, bytes(t));
}

fn reply_data(fd: RawFd, unique: u64, data: &[u8]) {
    reply_iov(fd, unique, 0, data);
}

fn reply_iov(fd: RawFd, unique: u64, error: i32, payload: &[u8]) {
    let body = if error == 0 { payload } else { &[][..] };
    let hdr = OutHeader {
        len: (size_of::<OutHeader>() + body.len()) as u32,
        error,
        unique,
    };
    let hb = bytes(&hdr);
    let iov = [
        libc::iovec {
            iov_base: hb.as_ptr() as *mut _,
            iov_len: hb.len(),
        },
        libc::iovec {
            iov_base: body.as_ptr() as *mut _,
            iov_len: body.len(),
        },
    ];
    // SAFETY: both iovecs point into live buffers for the duration of the call.
    let r = unsafe { libc::writev(fd, iov.as_ptr(), if body.is_empty() { 1 } else { 2 }) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ENOENT: the request was interrupted/aborted meanwhile; nothing to do.
        if e.raw_os_error() != Some(libc::ENOENT) {
            tracing::debug!("FUSE reply failed: {e}");
        }
    }
}
