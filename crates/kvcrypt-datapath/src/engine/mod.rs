//! Sector I/O on the backing device: maps plaintext byte ranges of the volume to ciphertext
//! sectors at the header's data offset, with AES-256-XTS per sector.
//!
//! - Backing I/O goes through io_uring with `O_DIRECT` ([`uring`]); if the backing store
//!   refuses `O_DIRECT` (tmpfs, or a logical block size larger than the volume sector) the
//!   engine falls back to buffered I/O and says so once in the log.
//! - Each concurrent caller checks out a *queue* (an io_uring plus a preallocated, aligned
//!   scratch buffer) from a small pool, so the hot path allocates nothing.
//! - Large requests are cut into [`CHUNK`]-sized pieces: a chunk is handed to the kernel as
//!   soon as it is encrypted, so encryption of the next chunk overlaps the write of this one
//!   (and decryption overlaps reads the same way).
//! - Unaligned requests (FUSE allows them) read-modify-write their edge sectors under a striped
//!   lock so two partial writes to one sector cannot lose each other's bytes.
//! - Suspension ([`gate`]): `suspend()` waits for requests in flight, flushes, and drops the
//!   expanded keys; new requests park until `resume()`.
//! - A sector whose *ciphertext* is all zeros reads back as plaintext zeros. Such a sector is
//!   either never written (a sparse new volume) or discarded (punched hole); real ciphertext is
//!   all-zero with probability 2^-4096, and the check stops at the first non-zero byte, so it
//!   costs nothing. This is what makes punch-hole discard usable for the kernel's
//!   write-zeroes requests, which loop turns into hole punching.

mod buf;
mod gate;
mod split;
mod target;
mod uring;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use buf::{ALIGN, AlignedBuf};
pub use split::SplitError;

use kvcrypt_crypto::{CryptoError, XtsCipher};
use kvcrypt_exit::{Exit, ExitClass};
use uring::{MAX_INFLIGHT, QueueIo};

/// Size of one backing I/O: big enough for full-bandwidth sequential I/O, small enough that
/// encryption of the next chunk overlaps the transfer of this one.
pub const CHUNK: usize = 128 * 1024;

/// Default size of each queue's scratch buffer (= the largest request handled in one pass).
pub const DEFAULT_MAX_IO: usize = 1024 * 1024;

/// Stripes of the read-modify-write lock (edge sectors of unaligned writes).
const RMW_STRIPES: usize = 64;

/// Where the volume's data area lives and how to treat it.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Backing block device or file (the whole kvcrypt volume, header included).
    pub backing: PathBuf,
    /// Byte offset of the data area in the backing store.
    pub data_offset: u64,
    /// Length of the data area (= size of the plaintext device) in bytes.
    pub data_length: u64,
    /// Encryption sector size (512 or 4096).
    pub sector_size: u32,
    pub read_only: bool,
    /// Pass discards to the backing store (punch hole); off by default because it reveals
    /// which blocks are in use.
    pub allow_discards: bool,
    /// Per-queue scratch buffer size (largest request handled in one pass).
    pub max_io: usize,
    /// Use io_uring for backing I/O (else pread/pwrite). On by default.
    pub io_uring: bool,
}

impl EngineConfig {
    pub fn new(
        backing: impl Into<PathBuf>,
        data_offset: u64,
        data_length: u64,
        sector_size: u32,
    ) -> Self {
        EngineConfig {
            backing: backing.into(),
            data_offset,
            data_length,
            sector_size,
            read_only: false,
            allow_discards: false,
            max_io: DEFAULT_MAX_IO,
            io_uring: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot open backing device {path}: {source} (check that it exists and is not in use)")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid volume geometry for {path}: {reason}")]
    Geometry { path: PathBuf, reason: String },
    #[error(
        "request out of range: offset {offset} + length {len} exceeds the volume's data length {data_length}"
    )]
    OutOfRange {
        offset: u64,
        len: u64,
        data_length: u64,
    },
    #[error("the volume is open read-only")]
    ReadOnly,
    #[error("discard is disabled for this volume (open it with --allow-discards)")]
    DiscardDisabled,
    #[error("I/O error on backing device {path} near byte {offset}: {source}")]
    Io {
        path: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("the device is shutting down")]
    ShutDown,
    #[error(transparent)]
    InUse(#[from] kvcrypt_host::inuse::InUseError),
}

impl EngineError {
    /// errno to report to the kernel (FUSE reply / ublk result) for this error.
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::OutOfRange { .. } | EngineError::Geometry { .. } => libc::EINVAL,
            EngineError::ReadOnly => libc::EROFS,
            EngineError::DiscardDisabled => libc::EOPNOTSUPP,
            EngineError::Io { source, .. } | EngineError::Open { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            EngineError::Crypto(_) => libc::EIO,
            EngineError::ShutDown => libc::ESHUTDOWN,
            EngineError::InUse(_) => libc::EBUSY,
        }
    }
}

impl ExitClass for EngineError {
    fn exit_class(&self) -> Exit {
        match self {
            EngineError::InUse(e) => e.exit_class(),
            EngineError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Exit::NotFound
            }
            EngineError::Open { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Exit::Permission
            }
            _ => Exit::Device,
        }
    }
}

/// One queue's private resources.
struct Queue {
    io: QueueIo,
    scratch: AlignedBuf,
}

/// The sector engine of one served volume. Share it between transport threads (`Arc<Engine>`);
/// every method takes `&self`.
pub struct Engine {
    cfg: EngineConfig,
    file: File,
    direct: bool,
    gate: gate::Gate,
    pool: Mutex<Vec<Queue>>,
    rmw: [Mutex<()>; RMW_STRIPES],
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cfg", &self.cfg)
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

enum Src<'a> {
    Data(&'a [u8]),
    Zeros,
}

impl Engine {
    /// Opens the backing store and validates the geometry against its size.
    pub fn open(cfg: EngineConfig, cipher: XtsCipher) -> Result<Engine, EngineError> {
        let geometry = |reason: String| EngineError::Geometry {
            path: cfg.backing.clone(),
            reason,
        };
        let ss = cfg.sector_size as u64;
        if !(512..=4096).contains(&cfg.sector_size) || !cfg.sector_size.is_power_of_two() {
            return Err(geometry(format!(
                "sector size {} must be 512 or 4096",
                cfg.sector_size
            )));
        }
        if !cfg.data_offset.is_multiple_of(ss) || !cfg.data_length.is_multiple_of(ss) {
            return Err(geometry(format!(
                "data offset {} and length {} must be multiples of the sector size {ss}",
                cfg.data_offset, cfg.data_length
            )));
        }
        if cfg.max_io < CHUNK || !cfg.max_io.is_multiple_of(CHUNK) {
            return Err(geometry(format!(
                "max_io {} must be a multiple of {CHUNK}",
                cfg.max_io
            )));
        }
        let open_failed = |source: std::io::Error| open_error(&cfg.backing, source);
        let (mut file, mut direct) = match open_backing(&cfg.backing, cfg.read_only, true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                open_backing(&cfg.backing, cfg.read_only, false).map_err(open_failed)?,
                false,
            ),
            Err(source) => return Err(open_failed(source)),
        };
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| EngineError::Open {
                path: cfg.backing.clone(),
                source,
            })?;
        let end = cfg.data_offset.checked_add(cfg.data_length);
        if end.is_none_or(|end| end > size) {
            return Err(geometry(format!(
                "data area (offset {} + length {}) runs past the end of the backing store ({size} bytes)",
                cfg.data_offset, cfg.data_length
            )));
        }
        if direct && !probe_direct(&file, cfg.data_offset, cfg.sector_size as usize) {
            // O_DIRECT opened but an aligned sector read fails (logical block size larger
            // than our sector): use the page cache instead. Closed first: a block device is
            // opened O_EXCL, which a second open of our own would collide with.
            drop(file);
            file = open_backing(&cfg.backing, cfg.read_only, false).map_err(open_failed)?;
            direct = false;
        }
        claim_served(&file, &cfg.backing)?;
        if !direct {
            tracing::warn!(
                backing = %cfg.backing.display(),
                "backing store refuses O_DIRECT; using buffered I/O (flushes still reach stable storage)"
            );
        }
        let engine = Engine {
            file,
            direct,
            gate: gate::Gate::new(cipher),
            pool: Mutex::new(Vec::with_capacity(64)),
            rmw: std::array::from_fn(|_| Mutex::new(())),
            cfg,
        };
        // One queue up front, so a broken io_uring setup shows at open time in tests/logs.
        let q = engine.new_queue();
        if engine.cfg.io_uring && !q.io.uses_uring() {
            tracing::warn!("io_uring unavailable; backing I/O uses pread/pwrite");
        }
        engine.put_queue(q);
        Ok(engine)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    pub fn data_length(&self) -> u64 {
        self.cfg.data_length
    }
    pub fn sector_size(&self) -> u32 {
        self.cfg.sector_size
    }
    pub fn read_only(&self) -> bool {
        self.cfg.read_only
    }
    /// True if backing I/O bypasses the page cache.
    pub fn direct_io(&self) -> bool {
        self.direct
    }
    /// True if backing I/O goes through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        let q = self.get_queue();
        let r = q.io.uses_uring();
        self.put_queue(q);
        r
    }

    fn new_queue(&self) -> Queue {
        Queue {
            io: QueueIo::new(self.file.as_raw_fd(), self.cfg.io_uring),
            scratch: AlignedBuf::new(self.cfg.max_io),
        }
    }

    fn get_queue(&self) -> Queue {
        let q = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        q.unwrap_or_else(|| self.new_queue())
    }

    fn put_queue(&self, q: Queue) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(q);
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), EngineError> {
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.cfg.data_length => Ok(()),
            _ => Err(EngineError::OutOfRange {
                offset,
                len,
                data_length: self.cfg.data_length,
            }),
        }
    }

    fn io_err(&self, offset: u64) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
        move |source| EngineError::Io {
            path: self.cfg.backing.clone(),
            offset,
            source,
        }
    }

    /// Reads `buf.len()` plaintext bytes at `offset` of the volume.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let ticket = self.gate.enter().ok_or(EngineError::ShutDown)?;
        let cipher = ticket.cipher();
        let mut q = self.get_queue();
        let r = self.read_inner(&mut q, cipher, offset, buf);
        self.put_queue(q);
        r
    }

    fn read_inner(
        &self,
        q: &mut Queue,
        cipher: &XtsCipher,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), EngineError> {
        let ss = self.cfg.sector_size as u64;
        if offset.is_multiple_of(ss)
            && (buf.len() as u64).is_multiple_of(ss)
            && buf::is_aligned(buf.as_ptr(), ALIGN)
        {
            return self.read_sectors(&mut q.io, cipher, buf, offset);
        }
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let s0 = pos / ss * ss;
            let win_end = (end.div_ceil(ss) * ss).min(s0 + q.scratch.len() as u64);
            let n = (win_end - s0) as usize;
            self.read_sectors(&mut q.io, cipher, &mut q.scratch[..n], s0)?;
            let take = (win_end.min(end) - pos) as usize;
            let from = (pos - s0) as usize;
            let to = (pos - offset) as usize;
            buf[to..to + take].copy_from_slice(&q.scratch[from..from + take]);
            pos += take as u64;
        }
        Ok(())
    }

    /// Reads whole sectors at `offset` into the aligned `buf` and decrypts them in place.
    fn read_sectors(
        &self,
        io: &mut QueueIo,
        cipher: &XtsCipher,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), EngineError> {
        let ss = self.cfg.sector_size as usize;
        for (g, group) in buf.chunks_mut(CHUNK * MAX_INFLIGHT).enumerate() {
            let goff = offset + (g * CHUNK * MAX_INFLIGHT) as u64;
            for (i, c) in group.chunks_mut(CHUNK).enumerate() {
                if let Err(e) = io.push_read(c, self.cfg.data_offset + goff + (i * CHUNK) as u64) {
                    let _ = io.wait_all();
                    return Err(self.io_err(goff)(e));
                }
            }
            let mut result = Ok(());
            for (i, c) in group.chunks_mut(CHUNK).enumerate() {
                let coff = goff + (i * CHUNK) as u64;
                if let Err(e) = io.wait_one(i) {
                    result = Err(self.io_err(coff)(e));
                    break;
                }
                if let Err(e) = decrypt_chunk(cipher, c, coff / ss as u64, ss) {
                    result = Err(e.into());
                    break;
                }
            }
            // Reap everything before the buffers can go away (also on errors).
            let waited = io.wait_all().map_err(self.io_err(goff));
            result?;
            waited?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`. The caller's buffer is not modified.
    /// `fua`: the data is on stable storage when this returns.
    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), EngineError> {
        self.write_impl(offset, data.len(), Src::Data(data), fua)
    }

    /// Like [`write_at`](Self::write_at), but may encrypt `buf` in place (its contents are
    /// unspecified afterwards): saves a copy when `buf` is sector- and page-aligned.
    pub fn write_at_mut(&self, offset: u64, buf: &mut [u8], fua: bool) -> Result<(), EngineError> {
        let ss = self.cfg.sector_size as u64;
        if !offset.is_multiple_of(ss)
            || !(buf.len() as u64).is_multiple_of(ss)
            || !buf::is_aligned(buf.as_ptr(), ALIGN)
        {
            return self.write_at(offset, buf, fua);
        }
        if self.cfg.read_only {
            return Err(EngineError::ReadOnly);
        }
        self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let ticket = self.gate.enter().ok_or(EngineError::ShutDown)?;
        let mut q = self.get_queue();
        let r = self.write_sectors(&mut q.io, ticket.cipher(), buf, offset, fua);
        self.put_queue(q);
        r
    }

    /// Writes encrypted zeros over `len` bytes at `offset` (reveals nothing, unlike discard).
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), EngineError> {
        let len = usize::try_from(len).map_err(|_| EngineError::OutOfRange {
            offset,
            len,
            data_length: self.cfg.data_length,
        })?;
        self.write_impl(offset, len, Src::Zeros, fua)
    }

    fn write_impl(
        &self,
        offset: u64,
        len: usize,
        src: Src<'_>,
        fua: bool,
    ) -> Result<(), EngineError> {
        if self.cfg.read_only {
            return Err(EngineError::ReadOnly);
        }
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let ticket = self.gate.enter().ok_or(EngineError::ShutDown)?;
        let cipher = ticket.cipher();
        let ss = self.cfg.sector_size as u64;
        let end = offset + len as u64;
        // Partial edge sectors need read-modify-write; lock their stripes (in order).
        let head = (!offset.is_multiple_of(ss)).then(|| offset / ss);
        let tail = (!end.is_multiple_of(ss)).then(|| end / ss);
        let mut stripes = [head, tail].map(|s| s.map(|s| (s as usize) % RMW_STRIPES));
        if stripes[0] == stripes[1] {
            stripes[1] = None;
        }
        stripes.sort();
        let _guards =
            stripes.map(|s| s.map(|s| self.rmw[s].lock().unwrap_or_else(|p| p.into_inner())));

        let mut q = self.get_queue();
        let Queue { io, scratch } = &mut q;
        let mut result = Ok(());
        let mut pos = offset;
        while pos < end {
            let s0 = pos / ss * ss;
            let win_end = (end.div_ceil(ss) * ss).min(s0 + scratch.len() as u64);
            let n = (win_end - s0) as usize;
            let take = (win_end.min(end) - pos) as usize;
            let win = &mut scratch[..n];
            // Edge sectors: fetch and decrypt the current contents first (the tail sector only
            // if it is not the head sector, already fetched).
            let head = !pos.is_multiple_of(ss);
            let tail = !(pos + take as u64).is_multiple_of(ss);
            let last = n - ss as usize;
            let mut fetched = Ok(());
            if head {
                fetched = self.read_sectors(io, cipher, &mut win[..ss as usize], s0);
            }
            if fetched.is_ok() && tail && (last != 0 || !head) {
                fetched = self.read_sectors(io, cipher, &mut win[last..], s0 + last as u64);
            }
            if let Err(e) = fetched {
                result = Err(e);
                break;
            }
            let from = (pos - s0) as usize;
            match &src {
                Src::Data(d) => {
                    let at = (pos - offset) as usize;
                    win[from..from + take].copy_from_slice(&d[at..at + take]);
                }
                Src::Zeros => win[from..from + take].fill(0),
            }
            if let Err(e) = self.write_sectors(io, cipher, win, s0, fua) {
                result = Err(e);
                break;
            }
            pos += take as u64;
        }
        // Plaintext must not linger in scratch memory longer than needed? It is overwritten by
        // ciphertext in place (write_sectors encrypts the window), so nothing to wipe here.
        self.put_queue(q);
        result
    }

    /// Encrypts the aligned `buf` in place, chunk by chunk, submitting each chunk as soon as it
    /// is encrypted; returns when all chunks are written.
    fn write_sectors(
        &self,
        io: &mut QueueIo,
        cipher: &XtsCipher,
        buf: &mut [u8],
        offset: u64,
        fua: bool,
    ) -> Result<(), EngineError> {
        let ss = self.cfg.sector_size as usize;
        for (g, group) in buf.chunks_mut(CHUNK * MAX_INFLIGHT).enumerate() {
            let goff = offset + (g * CHUNK * MAX_INFLIGHT) as u64;
            let mut result = Ok(());
            for (i, c) in group.chunks_mut(CHUNK).enumerate() {
                let coff = goff + (i * CHUNK) as u64;
                if let Err(e) = cipher.encrypt_sectors(c, coff / ss as u64, ss) {
                    result = Err(e.into());
                    break;
                }
                if let Err(e) = io
                    .push_write(c, self.cfg.data_offset + coff, fua)
                    .and_then(|()| io.submit())
                {
                    result = Err(self.io_err(coff)(e));
                    break;
                }
            }
            let waited = io.wait_all().map_err(self.io_err(goff));
            result?;
            waited?;
        }
        Ok(())
    }

    /// Makes every completed write durable (fdatasync of the backing store).
    pub fn flush(&self) -> Result<(), EngineError> {
        let mut q = self.get_queue();
        let r = q.io.datasync().map_err(self.io_err(0));
        self.put_queue(q);
        r
    }

    /// Discards `len` bytes at `offset`: the range reads back as zeros afterwards. Needs
    /// `allow_discards`. Whole sectors are punched out of the backing store (files: punch hole;
    /// block devices: the kernel's zeroing discard); partial edge sectors get encrypted zeros.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        if !self.cfg.allow_discards {
            return Err(EngineError::DiscardDisabled);
        }
        if self.cfg.read_only {
            return Err(EngineError::ReadOnly);
        }
        self.check_range(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let ss = self.cfg.sector_size as u64;
        let end = offset + len;
        let a = offset.div_ceil(ss) * ss;
        let b = end / ss * ss;
        if a >= b {
            return self.write_zeroes(offset, len, false);
        }
        if offset < a {
            self.write_zeroes(offset, a - offset, false)?;
        }
        if b < end {
            self.write_zeroes(b, end - b, false)?;
        }
        let _ticket = self.gate.enter().ok_or(EngineError::ShutDown)?;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                (self.cfg.data_offset + a) as libc::off_t,
                (b - a) as libc::off_t,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                drop(_ticket);
                return self.write_zeroes(a, b - a, false);
            }
            return Err(self.io_err(a)(e));
        }
        Ok(())
    }

    /// Stops new requests (they wait), waits for those in flight, flushes the backing store,
    /// and wipes the key. Everything acknowledged before is on stable storage afterwards.
    pub fn suspend(&self) -> Result<(), EngineError> {
        self.gate.suspend(|| {
            let mut q = self.get_queue();
            let r = q.io.datasync().map_err(self.io_err(0));
            self.put_queue(q);
            r
        })
    }

    /// Installs the key again and lets parked requests proceed.
    pub fn resume(&self, cipher: XtsCipher) {
        self.gate.resume(cipher);
    }

    pub fn is_suspended(&self) -> bool {
        self.gate.is_suspended()
    }

    /// Requests currently waiting for `resume`.
    pub fn parked_requests(&self) -> usize {
        self.gate.parked()
    }

    /// Fails parked and future requests with [`EngineError::ShutDown`] (device removal).
    pub fn shutdown(&self) {
        self.gate.shutdown();
    }
}

/// Decrypts whole sectors; an all-zero ciphertext sector (never written / discarded) stays zero.
fn decrypt_chunk(
    cipher: &XtsCipher,
    buf: &mut [u8],
    first_sector: u64,
    ss: usize,
) -> Result<(), CryptoError> {
    if !buf.chunks_exact(ss).any(is_zero) {
        return cipher.decrypt_sectors(buf, first_sector, ss);
    }
    for (i, s) in buf.chunks_exact_mut(ss).enumerate() {
        if !is_zero(s) {
            cipher.decrypt_sectors(s, first_sector + i as u64, ss)?;
        }
    }
    Ok(())
}

fn is_zero(s: &[u8]) -> bool {
    // Real ciphertext has a non-zero byte in the first word with overwhelming probability, so
    // this returns on the first comparison.
    s.iter().all(|&b| b == 0)
}

/// How long opening the backing store waits out a claim that is being let go: a worker that
/// was killed or crashed with I/O in flight releases its descriptor only when the kernel has
/// torn down its io_uring, which happens asynchronously after the process is gone.
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens the backing store; a block device exclusively (`O_EXCL`), so while it is served it
/// cannot be mounted, formatted or restored over (see [`kvcrypt_host::inuse`]). `EBUSY` is retried
/// for [`CLAIM_WAIT`].
fn open_backing(path: &Path, read_only: bool, direct: bool) -> std::io::Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    if kvcrypt_host::inuse::is_block_device(path) {
        flags |= libc::O_EXCL;
    }
    let deadline = std::time::Instant::now() + CLAIM_WAIT;
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(flags)
            .open(path)
        {
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// `EBUSY` from the exclusive open means someone else holds the device: that is "in use"
/// (exit 14), not a device error.
fn open_error(path: &Path, source: std::io::Error) -> EngineError {
    if source.raw_os_error() == Some(libc::EBUSY) {
        kvcrypt_host::inuse::InUseError::Exclusive {
            path: path.to_path_buf(),
        }
        .into()
    } else {
        EngineError::Open {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Takes the shared "being served" claim ([`kvcrypt_host::inuse::claim_served`]), waiting out an
/// exclusive one for [`CLAIM_WAIT`] (a header restore finishing), then refusing.
fn claim_served(file: &File, path: &Path) -> Result<(), EngineError> {
    let deadline = std::time::Instant::now() + CLAIM_WAIT;
    loop {
        match kvcrypt_host::inuse::claim_served(file, path) {
            Err(kvcrypt_host::inuse::InUseError::BeingRewritten { .. })
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            r => return Ok(r?),
        }
    }
}

/// True if an aligned one-sector `O_DIRECT` read at the data offset works.
fn probe_direct(file: &File, data_offset: u64, ss: usize) -> bool {
    let mut b = AlignedBuf::new(ss);
    // SAFETY: reading into our own aligned buffer of at least ss bytes.
    let r = unsafe {
        libc::pread(
            file.as_raw_fd(),
            b.as_mut_ptr().cast(),
            ss,
            data_offset as libc::off_t,
        )
    };
    !(r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL))
}
