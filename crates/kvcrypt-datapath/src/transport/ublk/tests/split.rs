//! The split-phase (async) request path without a kernel: a fake backing store stands in for the
//! queue ring, a toy target "encrypts" with a sector-dependent XOR (so a wrong sector number or
//! offset shows up as wrong bytes). Checks the SQE-level mapping (offsets after the data offset,
//! FUA → dsync, FLUSH → datasync), in-place crypto, short transfers and retries, suspension, and
//! that several requests of one queue are in flight at the same time on one thread.

use std::cell::{Cell, RefCell};
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Poll, Waker};

use libublk::sys;

use super::super::request::{BackingIo, Geometry, serve_request};
use crate::target::{BlockTarget, SplitStep};

const DATA_OFFSET: u64 = 8192;
const SIZE: u64 = 1 << 20;

/// Toy split-phase target: plaintext byte = ciphertext byte ^ key(sector).
struct XorTarget {
    sector: u32,
    read_only: bool,
    /// Crypto calls that report `Suspended` before the key is "back".
    suspended_for: AtomicUsize,
    resumed: AtomicUsize,
    calls: Mutex<Vec<String>>,
}

impl XorTarget {
    fn new(sector: u32) -> Self {
        Self {
            sector,
            read_only: false,
            suspended_for: AtomicUsize::new(0),
            resumed: AtomicUsize::new(0),
            calls: Mutex::new(Vec::new()),
        }
    }
    fn key(&self, byte_in_volume: u64) -> u8 {
        let sector = byte_in_volume / u64::from(self.sector);
        (sector as u8).wrapping_mul(31) ^ 0xa5
    }
    fn xor(&self, offset: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= self.key(offset + i as u64);
        }
    }
    fn step(&self, what: &str, offset: u64, buf: &mut [u8]) -> Result<(), SplitStep> {
        if self
            .suspended_for
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SplitStep::Suspended);
        }
        self.calls
            .lock()
            .unwrap()
            .push(format!("{what} {offset} {}", buf.len()));
        self.xor(offset, buf);
        Ok(())
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl BlockTarget for XorTarget {
    fn size(&self) -> u64 {
        SIZE
    }
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn read_at(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
        panic!("the split-phase path must not use the blocking read");
    }
    fn write_at(&self, _: u64, _: &mut [u8], _: bool) -> io::Result<()> {
        panic!("the split-phase path must not use the blocking write");
    }
    fn flush(&self) -> io::Result<()> {
        panic!("the split-phase path flushes through the ring");
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("discard {offset} {len}"));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("zeroes {offset} {len}"));
        Ok(())
    }
    fn backing_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(-1) // not used: the tests hand serve_request a fake ring
    }
    fn backing_offset(&self, offset: u64, len: u64, write: bool) -> Result<u64, i32> {
        if write && self.read_only {
            return Err(libc::EROFS);
        }
        let _ = len; // range checks are the request layer's job (tested with the geometry)
        Ok(DATA_OFFSET + offset)
    }
    fn encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), SplitStep> {
        self.step("encrypt", offset, buf)
    }
    fn decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), SplitStep> {
        self.step("decrypt", offset, buf)
    }
    fn wait_resumed(&self, _waiting: usize) -> bool {
        self.resumed.fetch_add(1, Ordering::SeqCst);
        true
    }
}

/// Fake queue ring over an in-memory backing store.
#[derive(Default)]
struct FakeRing {
    disk: RefCell<Vec<u8>>,
    log: RefCell<Vec<String>>,
    /// Largest transfer per submission (short reads/writes).
    max_xfer: Cell<Option<usize>>,
    /// The next N submissions fail with this result.
    fail: Cell<(u32, i32)>,
    /// While set, submissions stay pending (to observe concurrency).
    hold: Cell<bool>,
    outstanding: Cell<usize>,
    max_outstanding: Cell<usize>,
    wakers: RefCell<Vec<Waker>>,
}

impl FakeRing {
    fn new() -> Self {
        let r = FakeRing::default();
        *r.disk.borrow_mut() = vec![0; (DATA_OFFSET + SIZE) as usize];
        r
    }
    /// One submission "in the kernel": counted while pending.
    async fn in_flight(&self) -> Option<i32> {
        let n = self.outstanding.get() + 1;
        self.outstanding.set(n);
        self.max_outstanding.set(self.max_outstanding.get().max(n));
        std::future::poll_fn(|cx| {
            if self.hold.get() {
                self.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        self.outstanding.set(n - 1);
        let (left, res) = self.fail.get();
        if left > 0 {
            self.fail.set((left - 1, res));
            return Some(res);
        }
        None
    }
    fn release(&self) {
        self.hold.set(false);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }
    fn xfer(&self, len: usize) -> usize {
        self.max_xfer.get().map_or(len, |m| m.min(len))
    }
    fn log(&self) -> Vec<String> {
        self.log.borrow().clone()
    }
}

impl BackingIo for FakeRing {
    async fn read(&self, buf: &mut [u8], off: u64) -> i32 {
        self.log
            .borrow_mut()
            .push(format!("read {off} {}", buf.len()));
        if let Some(r) = self.in_flight().await {
            return r;
        }
        let n = self.xfer(buf.len());
        let at = off as usize;
        buf[..n].copy_from_slice(&self.disk.borrow()[at..at + n]);
        n as i32
    }
    async fn write(&self, buf: &[u8], off: u64, dsync: bool) -> i32 {
        self.log
            .borrow_mut()
            .push(format!("write {off} {} dsync={dsync}", buf.len()));
        if let Some(r) = self.in_flight().await {
            return r;
        }
        let n = self.xfer(buf.len());
        let at = off as usize;
        self.disk.borrow_mut()[at..at + n].copy_from_slice(&buf[..n]);
        n as i32
    }
    async fn datasync(&self) -> i32 {
        self.log.borrow_mut().push("datasync".into());
        self.in_flight().await.unwrap_or(0)
    }
}

fn geo(sector: u32) -> Geometry {
    Geometry {
        size: SIZE,
        sector_size: u64::from(sector),
        read_only: false,
        allow_discards: false,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// Runs one request to completion (the fake ring never holds unless asked to).
fn run(
    t: &XorTarget,
    r: &FakeRing,
    g: &Geometry,
    op: u32,
    start: u64,
    n: u32,
    buf: &mut [u8],
) -> i32 {
    smol::block_on(serve_request(t, r, g, op, start, n, buf))
}

#[test]
fn write_encrypts_in_place_at_the_data_offset_and_read_decrypts() {
    let (t, r, g) = (XorTarget::new(4096), FakeRing::new(), geo(4096));
    let plain = pattern(8192, 3);
    let mut buf = vec![0u8; 64 * 1024];
    buf[..8192].copy_from_slice(&plain);
    // start_sector counts 512-byte units: 16 = byte 8192 of the volume.
    assert_eq!(
        run(&t, &r, &g, sys::UBLK_IO_OP_WRITE, 16, 16, &mut buf),
        8192
    );
    let mut expect = plain.clone();
    t.xor(8192, &mut expect);
    assert_ne!(expect, plain);
    let at = (DATA_OFFSET + 8192) as usize;
    assert_eq!(
        &r.disk.borrow()[at..at + 8192],
        &expect[..],
        "ciphertext on the backing store"
    );
    assert_eq!(
        &buf[..8192],
        &expect[..],
        "encrypted in place, no bounce buffer"
    );
    assert!(
        r.disk.borrow()[..at].iter().all(|&b| b == 0),
        "nothing before the range"
    );

    let mut back = vec![0xeeu8; 64 * 1024];
    assert_eq!(
        run(&t, &r, &g, sys::UBLK_IO_OP_READ, 16, 16, &mut back),
        8192
    );
    assert_eq!(&back[..8192], &plain[..]);
    assert!(
        back[8192..].iter().all(|&b| b == 0xee),
        "bytes past the request untouched"
    );
    assert_eq!(r.log(), ["write 16384 8192 dsync=false", "read 16384 8192"]);
    assert_eq!(t.calls(), ["encrypt 8192 8192", "decrypt 8192 8192"]);
}

#[test]
fn fua_writes_are_dsync_and_flush_is_a_datasync() {
    let (t, r, g) = (XorTarget::new(512), FakeRing::new(), geo(512));
    let mut buf = pattern(4096, 1);
    let op = sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA;
    assert_eq!(run(&t, &r, &g, op, 3, 2, &mut buf), 1024);
    assert_eq!(run(&t, &r, &g, sys::UBLK_IO_OP_FLUSH, 0, 0, &mut buf), 0);
    assert_eq!(
        r.log(),
        [
            format!("write {} 1024 dsync=true", DATA_OFFSET + 1536),
            "datasync".into()
        ]
    );
    // A failing flush reports its errno.
    r.fail.set((1, -libc::EIO));
    assert_eq!(
        run(&t, &r, &g, sys::UBLK_IO_OP_FLUSH, 0, 0, &mut buf),
        -libc::EIO
    );
}

#[test]
fn bad_requests_fail_before_any_backing_io() {
    let (t, r, g) = (XorTarget::new(4096), FakeRing::new(), geo(4096));
    let mut buf = vec![0u8; 8192];
    let read = sys::UBLK_IO_OP_READ;
    assert_eq!(
        run(&t, &r, &g, read, 1, 8, &mut buf),
        -libc::EINVAL,
        "misaligned start"
    );
    assert_eq!(
        run(&t, &r, &g, read, 0, 1, &mut buf),
        -libc::EINVAL,
        "partial sector"
    );
    let last = (SIZE >> 9) - 8;
    assert_eq!(
        run(&t, &r, &g, read, last, 16, &mut buf),
        -libc::EINVAL,
        "past the end"
    );
    assert_eq!(
        run(&t, &r, &g, read, 0, 32, &mut buf),
        -libc::EINVAL,
        "larger than the buffer"
    );
    // A start sector whose byte offset wraps around u64 must not alias a small offset.
    assert_eq!(
        run(&t, &r, &g, read, (1 << 55) + 8, 8, &mut buf),
        -libc::EINVAL,
        "wrapping offset"
    );
    let ro = Geometry {
        read_only: true,
        ..g
    };
    assert_eq!(
        run(&t, &r, &ro, sys::UBLK_IO_OP_WRITE, 0, 8, &mut buf),
        -libc::EROFS
    );
    assert_eq!(
        run(&t, &r, &g, sys::UBLK_IO_OP_DISCARD, 0, 8, &mut buf),
        -libc::EOPNOTSUPP
    );
    assert_eq!(
        run(&t, &r, &g, sys::UBLK_IO_OP_WRITE_SAME, 0, 8, &mut buf),
        -libc::EOPNOTSUPP
    );
    assert!(
        r.log().is_empty(),
        "no backing I/O for refused requests: {:?}",
        r.log()
    );
    assert!(t.calls().is_empty());
    // The target's own mapping can refuse too (read-only volume behind a writable geometry).
    let t_ro = XorTarget {
        read_only: true,
        ..XorTarget::new(4096)
    };
    assert_eq!(
        run(&t_ro, &r, &g, sys::UBLK_IO_OP_WRITE, 0, 8, &mut buf),
        -libc::EROFS
    );
    assert!(r.log().is_empty() && t_ro.calls().is_empty());
    // Allowed discards go to the (blocking) target call.
    let on = Geometry {
        allow_discards: true,
        ..g
    };
    assert_eq!(
        run(&t, &r, &on, sys::UBLK_IO_OP_DISCARD, 8, 16, &mut buf),
        0
    );
    assert_eq!(
        run(&t, &r, &on, sys::UBLK_IO_OP_WRITE_ZEROES, 16, 8, &mut buf),
        0
    );
    assert_eq!(t.calls(), ["discard 4096 8192", "zeroes 8192 4096"]);
}

#[test]
fn short_transfers_continue_and_transient_errors_retry() {
    let (t, r, g) = (XorTarget::new(4096), FakeRing::new(), geo(4096));
    let plain = pattern(16384, 9);
    let mut buf = plain.clone();
    r.max_xfer.set(Some(6144));
    r.fail.set((2, -libc::EAGAIN));
    assert_eq!(
        run(&t, &r, &g, sys::UBLK_IO_OP_WRITE, 0, 32, &mut buf),
        16384
    );
    let d = DATA_OFFSET;
    assert_eq!(
        r.log(),
        [
            format!("write {d} 16384 dsync=false"),
            format!("write {d} 16384 dsync=false"),
            format!("write {d} 16384 dsync=false"),
            format!("write {} 10240 dsync=false", d + 6144),
            format!("write {} 4096 dsync=false", d + 12288),
        ]
    );
    assert_eq!(
        t.calls(),
        ["encrypt 0 16384"],
        "encrypted once, however often written"
    );
    let mut back = vec![0u8; 16384];
    assert_eq!(
        run(&t, &r, &g, sys::UBLK_IO_OP_READ, 0, 32, &mut back),
        16384
    );
    assert_eq!(back, plain);

    // Persistent errors fail the request (and nothing is decrypted).
    r.log.borrow_mut().clear();
    r.fail.set((100, -libc::EAGAIN));
    assert_eq!(
        run(&t, &r, &g, sys::UBLK_IO_OP_READ, 0, 8, &mut back),
        -libc::EAGAIN
    );
    assert_eq!(r.log().len(), 9, "one try + 8 retries");
    r.fail.set((1, -libc::ENOSPC));
    assert_eq!(
        run(&t, &r, &g, sys::UBLK_IO_OP_WRITE, 0, 8, &mut back),
        -libc::ENOSPC
    );
    r.fail.set((0, 0));
    r.max_xfer.set(Some(0));
    assert_eq!(
        run(&t, &r, &g, sys::UBLK_IO_OP_READ, 0, 8, &mut back),
        -libc::EIO,
        "EOF"
    );
    assert_eq!(
        t.calls().len(),
        3,
        "no decrypt of a failed read: {:?}",
        t.calls()
    );
}

#[test]
fn a_suspended_target_makes_the_request_wait_not_fail() {
    let (t, r, g) = (XorTarget::new(4096), FakeRing::new(), geo(4096));
    let plain = pattern(4096, 5);
    let mut buf = plain.clone();
    t.suspended_for.store(2, Ordering::SeqCst);
    assert_eq!(run(&t, &r, &g, sys::UBLK_IO_OP_WRITE, 8, 8, &mut buf), 4096);
    assert_eq!(t.resumed.load(Ordering::SeqCst), 2);
    t.suspended_for.store(1, Ordering::SeqCst);
    let mut back = vec![0u8; 4096];
    assert_eq!(run(&t, &r, &g, sys::UBLK_IO_OP_READ, 8, 8, &mut back), 4096);
    assert_eq!(back, plain, "decrypted exactly once after the resume");
    assert_eq!(t.resumed.load(Ordering::SeqCst), 3);
}

#[test]
fn one_thread_keeps_many_requests_in_flight() {
    let (t, r, g) = (XorTarget::new(4096), FakeRing::new(), geo(4096));
    // Four tags' worth of plaintext, written one by one first.
    for i in 0..4u64 {
        let mut b = pattern(4096, i as u8);
        assert_eq!(
            run(&t, &r, &g, sys::UBLK_IO_OP_WRITE, i * 8, 8, &mut b),
            4096
        );
    }
    r.hold.set(true);
    let exe = smol::LocalExecutor::new();
    let results: Vec<_> = (0..4u64)
        .map(|i| {
            let (t, r, g) = (&t, &r, &g);
            exe.spawn(async move {
                let mut b = vec![0u8; 4096];
                let res = serve_request(t, r, g, sys::UBLK_IO_OP_READ, i * 8, 8, &mut b).await;
                (res, b)
            })
        })
        .collect();
    while exe.try_tick() {}
    assert_eq!(
        r.outstanding.get(),
        4,
        "all four reads submitted before any completed"
    );
    r.release();
    while exe.try_tick() {}
    for (i, task) in results.into_iter().enumerate() {
        assert!(task.is_finished());
        let (res, b) = smol::block_on(task);
        assert_eq!(res, 4096);
        assert_eq!(b, pattern(4096, i as u8), "tag {i} got its own data");
    }
    assert_eq!(r.max_outstanding.get(), 4);
}
