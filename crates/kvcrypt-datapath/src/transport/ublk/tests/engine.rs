//! The split-phase path against the real engine and a real io_uring (no ublk needed): the SQEs
//! the queue rings submit (read, RWF_DSYNC write, fdatasync) run on a private ring against the
//! engine's backing descriptor. What the async path writes must read back through the engine's
//! blocking path and vice versa (same on-disk format), never-written sectors read as zeros, and a
//! suspended engine makes requests wait until resume.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{IoUring, squeue};
use libublk::sys;

use super::super::request::{BackingIo, Geometry, serve_request};
use super::super::ring::{FileRef, datasync_sqe, read_sqe, write_sqe};
use crate::engine::{AlignedBuf, Engine, EngineConfig};
use kvcrypt_crypto::XtsCipher;
use kvcrypt_crypto::secmem::VolumeKey;

const DATA_OFFSET: u64 = 1 << 20;
const DATA_LEN: u64 = 4 << 20;

/// Runs each SQE synchronously on a private ring.
struct TestRing {
    ring: RefCell<IoUring>,
    file: FileRef,
    ops: RefCell<u32>,
}

impl TestRing {
    fn new(fd: RawFd) -> Self {
        Self {
            ring: RefCell::new(IoUring::new(8).expect("io_uring")),
            file: FileRef::Fd(fd),
            ops: RefCell::new(0),
        }
    }
    fn run(&self, sqe: squeue::Entry) -> i32 {
        *self.ops.borrow_mut() += 1;
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the buffers the SQE points at are borrowed by the caller until this returns,
        // and we wait for the completion here.
        unsafe { ring.submission().push(&sqe).expect("ring has room") };
        ring.submit_and_wait(1).expect("submit");
        ring.completion().next().expect("one completion").result()
    }
}

impl BackingIo for TestRing {
    async fn read(&self, buf: &mut [u8], off: u64) -> i32 {
        self.run(read_sqe(self.file, buf, off))
    }
    async fn write(&self, buf: &[u8], off: u64, dsync: bool) -> i32 {
        self.run(write_sqe(self.file, buf, off, dsync))
    }
    async fn datasync(&self) -> i32 {
        self.run(datasync_sqe(self.file))
    }
}

fn cipher() -> XtsCipher {
    let bytes: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(13).wrapping_add(1))
        .collect();
    XtsCipher::new(&VolumeKey::from_slice(&bytes).expect("64-byte key"))
}

fn setup(dir: &std::path::Path) -> (Arc<Engine>, std::path::PathBuf) {
    let path = dir.join("backing.img");
    let f = std::fs::File::create(&path).expect("create");
    f.set_len(DATA_OFFSET + DATA_LEN).expect("size");
    let e = Engine::open(
        EngineConfig::new(&path, DATA_OFFSET, DATA_LEN, 4096),
        cipher(),
    )
    .expect("engine");
    (Arc::new(e), path)
}

fn geo() -> Geometry {
    Geometry {
        size: DATA_LEN,
        sector_size: 4096,
        read_only: false,
        allow_discards: false,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 131 + i / 4096) as u8) ^ seed)
        .collect()
}

fn raw(path: &std::path::Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

#[test]
fn async_path_and_blocking_engine_share_one_on_disk_format() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (e, path) = setup(dir.path());
    let ring = TestRing::new(e.backing_fd().as_raw_fd());
    let g = geo();
    let plain = pattern(64 * 1024, 0x3c);

    // Async write (FUA) of 64 KiB at volume byte 128 KiB (sector 256 in 512-byte units).
    let mut buf = AlignedBuf::new(512 * 1024);
    buf[..plain.len()].copy_from_slice(&plain);
    let op = sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA;
    let r = smol::block_on(serve_request(&*e, &ring, &g, op, 256, 128, &mut buf));
    assert_eq!(r, plain.len() as i32);
    let on_disk = raw(&path, DATA_OFFSET + 128 * 1024, plain.len());
    assert_ne!(
        on_disk, plain,
        "ciphertext, not plaintext, on the backing store"
    );
    // The blocking engine decrypts what the async path wrote.
    let mut back = vec![0u8; plain.len()];
    e.read_at(128 * 1024, &mut back).unwrap();
    assert_eq!(back, plain);
    // Writing the same plaintext through the blocking engine gives the same ciphertext.
    e.write_at(128 * 1024, &plain, false).unwrap();
    assert_eq!(raw(&path, DATA_OFFSET + 128 * 1024, plain.len()), on_disk);

    // Blocking write, async read.
    let other = pattern(12288, 0x77);
    e.write_at(1 << 20, &other, false).unwrap();
    let r = smol::block_on(serve_request(
        &*e,
        &ring,
        &g,
        sys::UBLK_IO_OP_READ,
        (1 << 20) >> 9,
        24,
        &mut buf,
    ));
    assert_eq!(r, 12288);
    assert_eq!(&buf[..12288], &other[..]);

    // Never-written sectors read as zeros; a flush is an fdatasync that succeeds.
    let r = smol::block_on(serve_request(
        &*e,
        &ring,
        &g,
        sys::UBLK_IO_OP_READ,
        4096,
        8,
        &mut buf,
    ));
    assert_eq!(r, 4096);
    assert!(buf[..4096].iter().all(|&b| b == 0));
    let ops = *ring.ops.borrow();
    let r = smol::block_on(serve_request(
        &*e,
        &ring,
        &g,
        sys::UBLK_IO_OP_FLUSH,
        0,
        0,
        &mut buf,
    ));
    assert_eq!(r, 0);
    assert_eq!(*ring.ops.borrow(), ops + 1, "flush = one fsync SQE");
    // The header area before the data offset is never touched.
    assert!(raw(&path, 0, DATA_OFFSET as usize).iter().all(|&b| b == 0));
}

#[test]
fn requests_wait_while_the_engine_is_suspended() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (e, _) = setup(dir.path());
    let plain = pattern(8192, 0x11);
    e.write_at(0, &plain, false).unwrap();
    e.suspend().unwrap();
    let reader = {
        let e = e.clone();
        std::thread::spawn(move || {
            let ring = TestRing::new(e.backing_fd().as_raw_fd());
            let mut buf = AlignedBuf::new(8192);
            let r = smol::block_on(serve_request(
                &*e,
                &ring,
                &geo(),
                sys::UBLK_IO_OP_READ,
                0,
                16,
                &mut buf,
            ));
            (r, buf.to_vec())
        })
    };
    // The read parks (counted by the engine) instead of failing.
    while e.parked_requests() == 0 {
        assert!(!reader.is_finished(), "request finished while suspended");
        std::thread::yield_now();
    }
    e.resume(cipher());
    let (r, back) = reader.join().unwrap();
    assert_eq!(r, 8192);
    assert_eq!(back, plain);
}
