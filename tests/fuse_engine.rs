//! Engine tests: round trips, unaligned read-modify-write, bounds, on-disk ciphertext, no
//! plaintext on the backing store, suspension, discard and write-zeroes, buffered fallback.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use kvcrypt_datapath::engine::{Engine, EngineConfig, EngineError};
use kvcrypt_testkit::fuse::prelude::*;

fn engine(dir: &std::path::Path, data_len: u64, ss: u32) -> (Engine, std::path::PathBuf) {
    let path = backing_file(dir, data_len);
    let e = Engine::open(
        EngineConfig::new(&path, DATA_OFFSET, data_len, ss),
        cipher(1),
    )
    .expect("open engine");
    (e, path)
}

#[test]
fn aligned_round_trip_uses_direct_io_and_io_uring() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (e, _) = engine(dir.path(), 8 * MIB, 4096);
    assert!(e.direct_io(), "ext4-backed file must use O_DIRECT");
    assert!(e.uses_io_uring(), "this kernel has io_uring");
    // 5 MiB spans several chunks and more than one scratch window.
    let data = pattern(5 * MIB as usize, 1);
    e.write_at(4096, &data, false).unwrap();
    e.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    e.read_at(4096, &mut back).unwrap();
    assert_eq!(back, data);
    // write_at_mut on an aligned buffer (in-place encryption path).
    let mut abuf = kvcrypt_datapath::engine::AlignedBuf::new(256 * 1024);
    abuf.copy_from_slice(&pattern(256 * 1024, 2));
    let expect = abuf.to_vec();
    e.write_at_mut(6 * MIB, &mut abuf, true).unwrap();
    let mut rbuf = kvcrypt_datapath::engine::AlignedBuf::new(256 * 1024);
    e.read_at(6 * MIB, &mut rbuf).unwrap();
    assert_eq!(&rbuf[..], &expect[..]);
}

#[test]
fn unaligned_requests_match_a_memory_model() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    for ss in [512u32, 4096] {
        let len = 2 * MIB;
        let (e, _) = engine(dir.path(), len, ss);
        let mut model = vec![0u8; len as usize];
        let mut rng = pattern(4096, ss as u64);
        let mut next = |m: usize| {
            let v = u32::from_le_bytes([rng[0], rng[1], rng[2], rng[3]]) as usize % m;
            rng.rotate_left(4);
            v
        };
        for i in 0..120 {
            let off = next(len as usize - 1);
            let n = 1 + next((len as usize - off).min(100_000));
            if i % 3 == 2 {
                let mut got = vec![0u8; n];
                e.read_at(off as u64, &mut got).unwrap();
                assert_eq!(got, model[off..off + n], "read {off}+{n} (ss {ss})");
            } else {
                let d = pattern(n, i as u64 + 100);
                e.write_at(off as u64, &d, false).unwrap();
                model[off..off + n].copy_from_slice(&d);
            }
        }
        let mut all = vec![0u8; len as usize];
        e.read_at(0, &mut all).unwrap();
        assert!(
            all == model,
            "whole-device contents differ from the model (ss {ss})"
        );
        std::fs::remove_file(dir.path().join("backing.img")).unwrap();
    }
}

#[test]
fn concurrent_partial_writes_to_one_sector_keep_both() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (e, _) = engine(dir.path(), MIB, 4096);
    let e = Arc::new(e);
    // 8 threads each own a 512-byte slice of the same 4 KiB sectors; RMW must not lose any.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let e = e.clone();
            std::thread::spawn(move || {
                for round in 0..20u64 {
                    for sector in 0..4u64 {
                        let d = vec![(t * 16 + round % 16) as u8; 512];
                        e.write_at(sector * 4096 + t * 512, &d, false).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut got = vec![0u8; 4 * 4096];
    e.read_at(0, &mut got).unwrap();
    for sector in 0..4usize {
        for t in 0..8usize {
            let s = &got[sector * 4096 + t * 512..sector * 4096 + (t + 1) * 512];
            assert!(
                s.iter().all(|&b| b == (t * 16 + 19 % 16) as u8),
                "sector {sector} slice {t} lost its last write"
            );
        }
    }
}

#[test]
fn out_of_range_requests_are_errors() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (e, _) = engine(dir.path(), MIB, 4096);
    let mut b = vec![0u8; 4096];
    assert!(matches!(
        e.read_at(MIB - 4095, &mut b),
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        e.write_at(MIB, &b[..1], false),
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        e.read_at(u64::MAX - 10, &mut b),
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        e.write_zeroes(0, MIB + 1, false),
        Err(EngineError::OutOfRange { .. })
    ));
    // The last byte is fine.
    e.write_at(MIB - 1, &[7], false).unwrap();
    let mut one = [0u8];
    e.read_at(MIB - 1, &mut one).unwrap();
    assert_eq!(one, [7]);
    // Geometry that does not fit the backing store is refused at open.
    let path = dir.path().join("backing.img");
    let err = Engine::open(
        EngineConfig::new(&path, DATA_OFFSET, 2 * MIB, 4096),
        cipher(1),
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::Geometry { .. }), "{err}");
    let err = Engine::open(EngineConfig::new(&path, 1000, MIB, 4096), cipher(1)).unwrap_err();
    assert!(matches!(err, EngineError::Geometry { .. }), "{err}");
}

#[test]
fn on_disk_bytes_are_xts_ciphertext_at_the_data_offset() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    for ss in [512u32, 4096] {
        let (e, path) = engine(dir.path(), MIB, ss);
        let data = pattern(64 * 1024, 9);
        let off = 3 * 4096u64;
        e.write_at(off, &data, false).unwrap();
        e.flush().unwrap();
        let raw = std::fs::read(&path).unwrap();
        // Header area untouched.
        assert!(raw[..DATA_OFFSET as usize].iter().all(|&b| b == 0xA5));
        let on_disk = &raw[(DATA_OFFSET + off) as usize..(DATA_OFFSET + off) as usize + data.len()];
        let mut expect = data.clone();
        cipher(1)
            .encrypt_sectors(&mut expect, off / ss as u64, ss as usize)
            .unwrap();
        assert_eq!(
            on_disk,
            &expect[..],
            "ciphertext (ss {ss}) differs from XtsCipher output"
        );
        // Independent implementation (xts-mode, IEEE 1619 with plain64 tweak) agrees.
        use aes::cipher::KeyInit;
        let key = test_key(1);
        let xts = xts_mode::Xts128::new(
            aes::Aes256::new_from_slice(&key.expose()[..32]).unwrap(),
            aes::Aes256::new_from_slice(&key.expose()[32..]).unwrap(),
        );
        let mut reference = data.clone();
        xts.encrypt_area(
            &mut reference,
            ss as usize,
            (off / ss as u64) as u128,
            xts_mode::get_tweak_default,
        );
        assert_eq!(
            on_disk,
            &reference[..],
            "ciphertext (ss {ss}) differs from xts-mode"
        );
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn backing_file_holds_no_plaintext() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (e, path) = engine(dir.path(), 4 * MIB, 4096);
    let data = pattern(MIB as usize, 77);
    // Unaligned on purpose: plaintext passes through the RMW path too.
    e.write_at(MIB + 123, &data, false).unwrap();
    e.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    e.read_at(MIB + 123, &mut back).unwrap();
    assert_eq!(back, data);
    let raw = std::fs::read(&path).unwrap();
    assert!(
        !contains_any_chunk(&raw, &data, 4096, 1),
        "a 4 KiB piece of plaintext is on the backing store"
    );
}

#[test]
fn read_only_refuses_writes() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = backing_file(dir.path(), MIB);
    let mut cfg = EngineConfig::new(&path, DATA_OFFSET, MIB, 4096);
    cfg.read_only = true;
    let e = Engine::open(cfg, cipher(1)).unwrap();
    assert!(matches!(
        e.write_at(0, &[0u8; 4096], false),
        Err(EngineError::ReadOnly)
    ));
    assert!(matches!(
        e.write_zeroes(0, 4096, false),
        Err(EngineError::ReadOnly)
    ));
    let mut b = vec![1u8; 4096];
    e.read_at(0, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "never-written sectors read as zeros"
    );
}

#[test]
fn write_zeroes_and_discard() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (e, path) = engine(dir.path(), 2 * MIB, 4096);
    let data = pattern(MIB as usize, 5);
    e.write_at(0, &data, false).unwrap();
    // Discard is off by default.
    assert!(matches!(
        e.discard(0, 8192),
        Err(EngineError::DiscardDisabled)
    ));
    // write_zeroes writes *encrypted* zeros: reads zero, disk is not zero.
    e.write_zeroes(1000, 10_000, false).unwrap();
    let mut b = vec![1u8; 20_000];
    e.read_at(0, &mut b).unwrap();
    assert_eq!(&b[..1000], &data[..1000]);
    assert!(b[1000..11_000].iter().all(|&x| x == 0));
    assert_eq!(&b[11_000..], &data[11_000..20_000]);
    let raw = std::fs::File::open(&path).unwrap();
    let mut disk = vec![0u8; 4096];
    raw.read_exact_at(&mut disk, DATA_OFFSET + 4096).unwrap();
    assert!(
        disk.iter().any(|&x| x != 0),
        "write_zeroes must not leave plaintext zeros on disk"
    );
    drop(e);

    let mut cfg = EngineConfig::new(&path, DATA_OFFSET, 2 * MIB, 4096);
    cfg.allow_discards = true;
    let e = Engine::open(cfg, cipher(1)).unwrap();
    e.discard(100, 3 * 4096).unwrap();
    let mut b = vec![1u8; 5 * 4096];
    e.read_at(0, &mut b).unwrap();
    assert_eq!(&b[..100], &data[..100]);
    assert!(
        b[100..100 + 3 * 4096].iter().all(|&x| x == 0),
        "discarded range reads as zeros"
    );
    assert_eq!(&b[100 + 3 * 4096..], &data[100 + 3 * 4096..5 * 4096]);
    // The whole sectors inside were punched out of the backing file.
    raw.read_exact_at(&mut disk, DATA_OFFSET + 4096).unwrap();
    assert!(
        disk.iter().all(|&x| x == 0),
        "inner sectors are holes after discard"
    );
}

#[test]
fn suspend_parks_requests_until_resume() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (e, path) = engine(dir.path(), MIB, 4096);
    let e = Arc::new(e);
    e.write_at(0, &[1u8; 4096], false).unwrap();
    e.suspend().unwrap();
    assert!(e.is_suspended());
    // Everything acknowledged before suspend is on disk (the suspend flushed it).
    let raw = std::fs::read(&path).unwrap();
    let mut expect = vec![1u8; 4096];
    cipher(1).encrypt_sectors(&mut expect, 0, 4096).unwrap();
    assert_eq!(
        &raw[DATA_OFFSET as usize..DATA_OFFSET as usize + 4096],
        &expect[..]
    );

    let (tx, rx) = std::sync::mpsc::channel();
    let e2 = e.clone();
    let writer = std::thread::spawn(move || {
        let r = e2.write_at(8192, &[2u8; 4096], false);
        tx.send(()).unwrap();
        r
    });
    // Wait until the request is parked, then make sure it stays parked.
    while e.parked_requests() == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        rx.recv_timeout(Duration::from_secs(1)).is_err(),
        "write completed while suspended"
    );
    e.resume(cipher(1));
    writer.join().unwrap().unwrap();
    let mut b = vec![0u8; 4096];
    e.read_at(8192, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 2));
    // Shutdown releases parked requests with an error instead of hanging.
    e.suspend().unwrap();
    let e3 = e.clone();
    let t = std::thread::spawn(move || e3.read_at(0, &mut [0u8; 512]));
    while e.parked_requests() == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    e.shutdown();
    assert!(matches!(t.join().unwrap(), Err(EngineError::ShutDown)));
}

#[test]
fn refused_o_direct_falls_back_to_buffered_io() {
    if skip_without_fuse_loop() {
        return;
    }
    // A loop device with 4096-byte logical blocks refuses 512-byte O_DIRECT I/O: the engine
    // must notice at open time and use buffered I/O for a 512-byte-sector volume.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = backing_file(dir.path(), MIB);
    let file_s = file.to_str().unwrap();
    let loopdev = run(
        "losetup",
        &["--find", "--show", "--sector-size", "4096", file_s],
    )
    .trim()
    .to_string();
    let res = std::panic::catch_unwind(|| {
        let e = Engine::open(
            EngineConfig::new(&loopdev, DATA_OFFSET, MIB, 512),
            cipher(1),
        )
        .unwrap();
        assert!(
            !e.direct_io(),
            "512-byte O_DIRECT on a 4096-byte device must fall back"
        );
        let d = pattern(100_000, 3);
        e.write_at(10, &d, true).unwrap();
        e.flush().unwrap();
        let mut b = vec![0u8; d.len()];
        e.read_at(10, &mut b).unwrap();
        assert_eq!(b, d);
    });
    run("losetup", &["-d", &loopdev]);
    res.unwrap();
}

/// The split-phase API (event-loop transports): encrypt in place, write at the mapped backing
/// offset ourselves, read it back through the blocking path (and vice versa); suspended calls
/// return `Suspended` without blocking, and `wait_resumed` releases on resume / shutdown.
#[test]
fn split_phase_api_matches_the_blocking_path() {
    use kvcrypt_datapath::engine::SplitError;
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (e, path) = engine(dir.path(), MIB, 4096);
    let e = Arc::new(e);
    let plain = pattern(8192, 7);
    let mut buf = kvcrypt_datapath::engine::AlignedBuf::new(8192);
    buf.copy_from_slice(&plain);
    e.try_encrypt(16384, &mut buf).unwrap();
    assert_ne!(&buf[..], &plain[..], "encrypted in place");
    let at = e.backing_offset(16384, 8192, true).unwrap();
    assert_eq!(at, DATA_OFFSET + 16384);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&buf, at)
        .unwrap();
    let mut back = vec![0u8; 8192];
    e.read_at(16384, &mut back).unwrap();
    assert_eq!(back, plain, "blocking read sees what the split path wrote");

    // Reverse: blocking write, raw read at the mapped offset, split decrypt.
    e.write_at(32768, &plain, false).unwrap();
    let mut raw = vec![0u8; 8192];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut raw, e.backing_offset(32768, 8192, false).unwrap())
        .unwrap();
    e.try_decrypt(32768, &mut raw).unwrap();
    assert_eq!(raw, plain);
    // Never-written sectors (all-zero ciphertext) read as zeros.
    let mut zeros = vec![0u8; 4096];
    e.try_decrypt(MIB - 4096, &mut zeros).unwrap();
    assert!(zeros.iter().all(|&b| b == 0));

    // Partial sectors and out-of-range requests are refused, not served.
    assert!(e.backing_offset(100, 4096, false).is_err());
    assert!(e.backing_offset(MIB - 4096, 8192, false).is_err());
    assert!(matches!(
        e.try_decrypt(512, &mut [0u8; 4096]),
        Err(SplitError::Engine(EngineError::OutOfRange { .. }))
    ));

    e.suspend().unwrap();
    assert!(matches!(
        e.try_encrypt(0, &mut [0u8; 4096]),
        Err(SplitError::Suspended)
    ));
    let e2 = e.clone();
    let waiter = std::thread::spawn(move || e2.wait_resumed(3));
    while e.parked_requests() != 3 {
        std::thread::sleep(Duration::from_millis(10));
    }
    e.resume(cipher(1));
    assert!(waiter.join().unwrap(), "resume releases the waiter");
    assert_eq!(e.parked_requests(), 0);
    e.try_decrypt(32768, &mut [0u8; 4096]).unwrap();
    e.suspend().unwrap();
    let e3 = e.clone();
    let waiter = std::thread::spawn(move || e3.wait_resumed(1));
    while e.parked_requests() != 1 {
        std::thread::sleep(Duration::from_millis(10));
    }
    e.shutdown();
    assert!(
        !waiter.join().unwrap(),
        "shutdown releases the waiter with false"
    );
    assert!(matches!(
        e.try_decrypt(0, &mut [0u8; 4096]),
        Err(SplitError::Engine(EngineError::ShutDown))
    ));
}
