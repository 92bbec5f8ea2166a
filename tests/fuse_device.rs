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
