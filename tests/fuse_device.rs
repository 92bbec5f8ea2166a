//! FUSE + loop transport driven through the library: block-device round trip, fio verify,
//! suspend/resume through the device.

mod fuse_common;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use fuse_common::*;
use kvcrypt::engine::{AlignedBuf, Engine, EngineConfig};
use kvcrypt::transport::fuse::{FuseDevice, FuseOptions};

const MIB: u64 = 1 << 20;

fn serve(dir: &Path, data_len: u64, name: &str) -> (FuseDevice, std::path::PathBuf) {
    let backing = backing_file(dir, data_len);
    let engine = Engine::open(
        EngineConfig::new(&backing, DATA_OFFSET, data_len, 4096),
        cipher(3),
    )
    .expect("engine");
    let opts = FuseOptions::new(name, dir.join("mnt").join(name));
    let dev = FuseDevice::start(Arc::new(engine), &opts).expect("start FUSE+loop device");
    (dev, backing)
}

fn open_direct(dev: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open block device")
}

#[test]
fn block_device_round_trip_and_ciphertext_on_disk() {
    if skip_without_fuse_loop() {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (dev, backing) = serve(dir.path(), 64 * MIB, "t-roundtrip");
    let bdev = dev.block_device().unwrap().to_path_buf();
    assert!(bdev.to_str().unwrap().starts_with("/dev/loop"));
    assert!(
        dev.loop_direct_io(),
        "loop must do direct I/O on the FUSE file"
    );
    let size = std::fs::read_to_string(format!(
        "/sys/block/{}/size",
        bdev.file_name().unwrap().to_str().unwrap()
    ))
    .unwrap();
    assert_eq!(size.trim().parse::<u64>().unwrap() * 512, 64 * MIB);
    let lbs = std::fs::read_to_string(format!(
        "/sys/block/{}/queue/logical_block_size",
        bdev.file_name().unwrap().to_str().unwrap()
    ))
    .unwrap();
    assert_eq!(lbs.trim(), "4096");

    let f = open_direct(&bdev);
    let data = pattern(MIB as usize, 11);
    let mut buf = AlignedBuf::new(MIB as usize);
    buf.copy_from_slice(&data);
    f.write_all_at(&buf, 5 * MIB).unwrap();
    f.sync_all().unwrap();
    let mut back = AlignedBuf::new(MIB as usize);
    f.read_exact_at(&mut back, 5 * MIB).unwrap();
    assert_eq!(&back[..], &data[..]);
    drop(f);
    let mut dev = dev;
    dev.close(false).expect("close");
    assert!(
        !bdev.exists()
            || std::fs::read_to_string(format!(
                "/sys/block/{}/size",
                bdev.file_name().unwrap().to_str().unwrap()
            ))
            .map(|s| s.trim() == "0")
            .unwrap_or(true),
        "loop device detached"
    );

    let raw = std::fs::read(&backing).unwrap();
    let mut expect = data.clone();
    cipher(3)
        .encrypt_sectors(&mut expect, 5 * MIB / 4096, 4096)
        .unwrap();
    let at = (DATA_OFFSET + 5 * MIB) as usize;
    assert_eq!(
        &raw[at..at + expect.len()],
        &expect[..],
        "device bytes are XTS ciphertext at the data offset"
    );
    assert!(
        !contains_any_chunk(&raw, &data, 4096, 512),
        "plaintext leaked to the backing file"
    );
}

#[test]
fn discard_only_with_allow_discards_and_zeroout_always_reads_zero() {
    if skip_without_fuse_loop() {
        return;
    }
    for allow in [false, true] {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let backing = backing_file(dir.path(), 16 * MIB);
        let mut cfg = EngineConfig::new(&backing, DATA_OFFSET, 16 * MIB, 4096);
        cfg.allow_discards = allow;
        let engine = Engine::open(cfg, cipher(3)).unwrap();
        let name = format!("t-discard-{allow}");
        let opts = FuseOptions::new(&name, dir.path().join("mnt").join(&name));
        let mut dev = FuseDevice::start(Arc::new(engine), &opts).unwrap();
        let bdev = dev.block_device().unwrap().to_str().unwrap().to_string();
        let f = open_direct(Path::new(&bdev));
        let mut buf = AlignedBuf::new(4 * MIB as usize);
        buf.fill(0x77);
        f.write_all_at(&buf, 0).unwrap();
        f.sync_all().unwrap();

        // BLKZEROOUT: zeros either way (encrypted zeros or kernel-written zero pages).
        run("blkdiscard", &["-z", "-o", "0", "-l", "1048576", &bdev]);
        let discard = std::process::Command::new("blkdiscard")
            .args(["-o", "1048576", "-l", "1048576", &bdev])
            .output()
            .unwrap();
        // The block layer reports an unsupported discard as success, so only the data tells.
        assert!(discard.status.success(), "blkdiscard: {discard:?}");
        let mut back = AlignedBuf::new(4 * MIB as usize);
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(
            back[..MIB as usize].iter().all(|&b| b == 0),
            "zeroed range reads zero"
        );
        let second = &back[MIB as usize..2 * MIB as usize];
        if allow {
            assert!(second.iter().all(|&b| b == 0), "discarded range reads zero");
        } else {
            assert!(
                second.iter().all(|&b| b == 0x77),
                "refused discard left the data"
            );
        }
        assert!(back[2 * MIB as usize..].iter().all(|&b| b == 0x77));
        drop(f);
        dev.close(false).unwrap();
        // Discarded sectors are holes in the backing file.
        let raw = std::fs::read(&backing).unwrap();
        let d = &raw[(DATA_OFFSET + MIB) as usize..(DATA_OFFSET + MIB + 4096) as usize];
        if allow {
            assert!(
                d.iter().all(|&b| b == 0),
                "discard punched the backing file"
            );
        }
    }
}
