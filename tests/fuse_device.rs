//! FUSE + loop transport driven through the library: block-device round trip, fio verify,
//! suspend/resume through the device.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use kvcrypt_datapath::engine::{AlignedBuf, Engine, EngineConfig};
use kvcrypt_datapath::transport::fuse::{FuseDevice, FuseOptions};
use kvcrypt_testkit::fuse::prelude::*;

#[test]
fn block_device_round_trip_and_ciphertext_on_disk() {
    if skip_without_fuse_loop() {
        return;
    }
    scenarios::device_round_trip("t-roundtrip", None);
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
