//! The FUSE+loop worker scenarios (ext4 across close/reopen, fio verify, fsync + SIGKILL,
//! suspend/resume), shared by tests/fuse_worker.rs (whatever mode the kernel gives) and
//! tests/fuse_uring.rs (FUSE-over-io_uring forced on), each run through [`Worker::run`]; and
//! the library-level device round trip tests/fuse_device.rs and tests/fuse_uring.rs share.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Cleanup, Worker, cipher, wait_gone};
use crate::MIB;
use crate::data::{contains_any_chunk, pattern};
use crate::keys::test_key;
use crate::shell::run;
use crate::volume::{DATA_OFFSET, backing_file, make_volume, open_direct};
use kvcrypt_crypto::secmem::VolumeKey;

use kvcrypt::worker::{WorkerClient, WorkerError, WorkerInfo, spawn_worker};
use kvcrypt_datapath::engine::{AlignedBuf, Engine, EngineConfig};
use kvcrypt_datapath::transport::fuse::{FuseDevice, FuseMode, FuseOptions};

/// A formatted test volume (key `test_key(42)`) in a temporary directory, and a guard that
/// closes worker `name` when the scenario ends or panics.
struct Fixture {
    key: VolumeKey,
    vol: PathBuf,
    _cleanup: Cleanup,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(name: &str, size: u64) -> Fixture {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let key = test_key(42);
        let vol = make_volume(dir.path(), size, &key);
        Fixture {
            key,
            vol,
            _cleanup: Cleanup::worker(name),
            _dir: dir,
        }
    }
}

/// Starts a worker and checks the serving mode it reports.
fn spawn_checked(w: &Worker, vol: &Path, name: &str) -> WorkerInfo {
    let info = spawn_worker(&w.spec(vol, name), &test_key(42)).expect("spawn worker");
    if let Some(mode) = w.mode {
        let st = WorkerClient::connect(name).unwrap().status().unwrap();
        assert_eq!(st.fuse_mode.as_deref(), Some(mode), "worker serving mode");
        let state = kvcrypt::worker::read_state(name).expect("state file");
        assert_eq!(
            state.fuse_mode.as_deref(),
            Some(mode),
            "state file fuse_mode"
        );
    }
    info
}

/// ext4 with ~200 MB of checksummed files, close, no plaintext on the backing file, reopen,
/// verify, e2fsck.
pub fn ext4_close_reopen(w: &Worker, name: &str) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let key = test_key(42);
    let vol = make_volume(dir.path(), 320 * MIB, &key);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut cleanup = Cleanup {
        mounts: vec![mnt.clone()],
        names: vec![name.into()],
    };

    let info = spawn_checked(w, &vol, name);
    let bdev = info.block_device.to_str().unwrap().to_string();
    assert!(bdev.starts_with("/dev/loop"), "{bdev}");
    assert_eq!(
        std::fs::read_link(format!("/dev/disk/by-kvcrypt/{name}")).unwrap(),
        info.block_device
    );
    // A second open of the same name or device is refused.
    let again = spawn_worker(&w.spec(&vol, name), &key).unwrap_err();
    assert!(matches!(again, WorkerError::AlreadyOpen { .. }), "{again}");
    let other = spawn_worker(&w.spec(&vol, &format!("{name}-b")), &key).unwrap_err();
    assert!(matches!(other, WorkerError::DeviceInUse { .. }), "{other}");

    run("mkfs.ext4", &["-q", "-F", &bdev]);
    run("mount", &[&bdev, mnt.to_str().unwrap()]);
    // Busy while mounted.
    let busy = WorkerClient::connect(name).unwrap().close().unwrap_err();
    assert!(
        matches!(busy, WorkerError::Refused { busy: true, .. }),
        "{busy}"
    );

    // ~200 MB of files with distinct contents, checksummed by sha256sum.
    let marker = pattern(MIB as usize, 4242);
    std::fs::write(mnt.join("marker.bin"), &marker).unwrap();
    for i in 0..50u64 {
        let mut f = std::fs::File::create(mnt.join(format!("f{i:02}.bin"))).unwrap();
        f.write_all(&pattern(4 * MIB as usize - (i as usize * 4097), i))
            .unwrap();
    }
    std::fs::create_dir(mnt.join("sub")).unwrap();
    for i in 0..200u64 {
        std::fs::write(
            mnt.join("sub").join(format!("s{i}")),
            pattern(3000 + i as usize * 13, 1000 + i),
        )
        .unwrap();
    }
    let sums = std::process::Command::new("sh")
        .arg("-c")
        .arg("find . -type f -print0 | sort -z | xargs -0 sha256sum")
        .current_dir(&mnt)
        .output()
        .unwrap();
    assert!(sums.status.success());
    let sums = String::from_utf8(sums.stdout).unwrap();
    assert_eq!(sums.lines().count(), 251);
    run("umount", &[mnt.to_str().unwrap()]);

    WorkerClient::connect(name).unwrap().close().expect("close");
    wait_gone(info.pid);
    assert!(
        !kvcrypt::worker::state_path(name).exists(),
        "state file removed on close"
    );
    assert!(
        std::fs::symlink_metadata(format!("/dev/disk/by-kvcrypt/{name}")).is_err(),
        "symlink removed"
    );

    // The raw backing file holds no 4 KiB piece of the marker file.
    let raw = std::fs::read(&vol).unwrap();
    assert!(
        !contains_any_chunk(&raw, &marker, 4096, 512),
        "plaintext found in the backing file"
    );
    drop(raw);

    // Reopen, verify every checksum, fsck clean.
    let info = spawn_checked(w, &vol, name);
    let bdev = info.block_device.to_str().unwrap().to_string();
    run("mount", &["-o", "ro", &bdev, mnt.to_str().unwrap()]);
    let mut check = std::process::Command::new("sha256sum")
        .args(["-c", "--quiet", "-"])
        .current_dir(&mnt)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(sums.as_bytes())
        .unwrap();
    assert!(
        check.wait().unwrap().success(),
        "checksums differ after reopen"
    );
    run("umount", &[mnt.to_str().unwrap()]);
    run("e2fsck", &["-fn", &bdev]);
    WorkerClient::connect(name).unwrap().close().expect("close");
    wait_gone(info.pid);
    cleanup.names.clear();
}

/// fio --verify=crc32c, four jobs at iodepth 16, mixed block sizes.
pub fn fio_verify(w: &Worker, name: &str) {
    let fx = Fixture::new(name, 300 * MIB);
    let vol = &fx.vol;
    let info = spawn_checked(w, vol, name);
    let bdev = info.block_device.to_str().unwrap().to_string();
    run_fio_verify(&bdev);
    WorkerClient::connect(name).unwrap().close().expect("close");
    wait_gone(info.pid);
}

/// fsynced data survives SIGKILL of the worker.
pub fn fsync_survives_sigkill(w: &Worker, name: &str) {
    let fx = Fixture::new(name, 64 * MIB);
    let vol = &fx.vol;
    let info = spawn_checked(w, vol, name);
    // Buffered writes into the block device's page cache, then fsync: only the flush makes
    // them durable.
    let data = pattern(8 * MIB as usize, 99);
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&info.block_device)
            .unwrap();
        f.write_all_at(&data, 3 * MIB + 4096).unwrap();
        f.sync_all().unwrap();
        // SIGKILL while the device is still open: no chance for any orderly flush.
        let _ = kvcrypt_host::process::signal(info.pid, libc::SIGKILL);
        wait_gone(info.pid);
    }
    let info = spawn_checked(w, vol, name);
    let f = open_direct(&info.block_device);
    let mut back = AlignedBuf::new(data.len());
    f.read_exact_at(&mut back, 3 * MIB + 4096).unwrap();
    assert!(back[..] == data[..], "fsynced data lost after SIGKILL");
    drop(f);
    WorkerClient::connect(name).unwrap().close().expect("close");
    wait_gone(info.pid);
}

/// SIGTERM while suspended with a write parked: the worker must not hang on the parked
/// request — it fails it (the device is going away), tears down and exits.
pub fn sigterm_while_suspended_exits(w: &Worker, name: &str) {
    let fx = Fixture::new(name, 64 * MIB);
    let vol = &fx.vol;
    let info = spawn_checked(w, vol, name);
    let mut c = WorkerClient::connect(name).unwrap();
    c.suspend().expect("suspend");
    let dev = info.block_device.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let f = open_direct(&dev);
        let mut b = AlignedBuf::new(64 * 1024);
        b.fill(0x3C);
        let r = f.write_all_at(&b, 2 * MIB).and_then(|()| f.sync_all());
        let _ = tx.send(r);
    });
    let mut parked = 0;
    for _ in 0..500 {
        parked = c.status().unwrap().parked;
        if parked > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(parked > 0, "the write never reached the worker");
    drop(c);
    let _ = kvcrypt_host::process::signal(info.pid, libc::SIGTERM);
    wait_gone(info.pid);
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the parked write returned after the worker exited");
    assert!(
        r.is_err(),
        "a write parked at shutdown cannot have succeeded"
    );
    assert!(
        kvcrypt::worker::read_state(name).is_none(),
        "state file removed on SIGTERM"
    );
}

/// A write parks while suspended, and completes after resume with the right key.
pub fn suspend_parks_and_resume_completes(w: &Worker, name: &str) {
    let fx = Fixture::new(name, 64 * MIB);
    let (key, vol) = (&fx.key, &fx.vol);
    let info = spawn_checked(w, vol, name);
    let mut c = WorkerClient::connect(name).unwrap();
    assert_eq!(
        c.status().unwrap().state,
        kvcrypt::worker::ServeState::Serving
    );
    c.suspend().expect("suspend");
    assert_eq!(
        c.status().unwrap().state,
        kvcrypt::worker::ServeState::Suspended
    );

    let dev = info.block_device.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let f = open_direct(&dev);
        let mut b = AlignedBuf::new(64 * 1024);
        b.fill(0x5A);
        let r = f.write_all_at(&b, 10 * MIB);
        tx.send(()).unwrap();
        r
    });
    // The write reaches the worker and parks there…
    let mut parked = 0;
    for _ in 0..500 {
        parked = c.status().unwrap().parked;
        if parked > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(parked > 0, "the write never reached the worker");
    // …and has not completed a second later.
    assert!(
        rx.recv_timeout(Duration::from_secs(1)).is_err(),
        "write completed while suspended"
    );
    // A wrong key is refused and the volume stays suspended.
    let wrong = c.resume(&test_key(7)).unwrap_err();
    assert!(matches!(wrong, WorkerError::Refused { .. }), "{wrong}");
    assert_eq!(
        c.status().unwrap().state,
        kvcrypt::worker::ServeState::Suspended
    );
    c.resume(key).expect("resume");
    rx.recv_timeout(Duration::from_secs(30))
        .expect("write completes after resume");
    writer.join().unwrap().expect("write succeeded");
    let f = open_direct(&info.block_device);
    let mut back = AlignedBuf::new(64 * 1024);
    f.read_exact_at(&mut back, 10 * MIB).unwrap();
    assert!(back.iter().all(|&b| b == 0x5A));
    drop(f);
    c.close().expect("close");
    wait_gone(info.pid);
}

/// fio --verify=crc32c random writes + read-back through `bdev`: four jobs of 64 MiB each at
/// iodepth 16, mixed block sizes; asserts zero errors and that every job wrote and verified
/// all of its data.
fn run_fio_verify(bdev: &str) {
    let out = std::process::Command::new("fio")
        .args([
            "--name=verify",
            &format!("--filename={bdev}"),
            "--direct=1",
            "--ioengine=io_uring",
            "--rw=randwrite",
            "--bssplit=4k/50:16k/25:128k/25",
            "--size=64M",
            "--offset_increment=64M",
            "--numjobs=4",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_backlog=1024",
            "--do_verify=1",
            "--verify_state_save=0",
            "--group_reporting=0",
            "--output-format=json",
        ])
        .output()
        .expect("run fio");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json_start = stdout.find('{').expect("fio JSON output");
    let v: serde_json::Value = serde_json::from_str(&stdout[json_start..]).expect("parse fio JSON");
    let jobs = v["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 4);
    for j in jobs {
        assert_eq!(j["error"].as_i64(), Some(0), "fio job error: {j}");
        assert_eq!(
            j["write"]["io_bytes"].as_u64(),
            Some(64 * MIB),
            "each job wrote its 64 MiB"
        );
        assert!(
            j["read"]["io_bytes"].as_u64().unwrap_or(0) >= 64 * MIB,
            "each job verified (read back) its data"
        );
    }
}

/// Suspend while fio verify has many requests in flight, hold, resume: every request waits
/// (none fails), in-flight ones are finished without deadlock, and fio verifies all data.
pub fn suspend_during_fio_verify(w: &Worker, name: &str) {
    let fx = Fixture::new(name, 300 * MIB);
    let (key, vol) = (&fx.key, &fx.vol);
    let info = spawn_checked(w, vol, name);
    let bdev = info.block_device.to_str().unwrap().to_string();
    let stat = format!(
        "/sys/block/{}/stat",
        info.block_device.file_name().unwrap().to_str().unwrap()
    );
    let sectors_written = || {
        let s = std::fs::read_to_string(&stat).unwrap_or_default();
        s.split_whitespace()
            .nth(6)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = sectors_written();
    let fio = std::thread::spawn(move || run_fio_verify(&bdev));
    let mut c = WorkerClient::connect(name).unwrap();
    // Suspend as soon as fio's writes flow (its run takes far longer than that).
    for _ in 0..1000 {
        if sectors_written() > before || fio.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    c.suspend().expect("suspend under load");
    let mut parked = 0;
    for _ in 0..100 {
        parked = c.status().unwrap().parked;
        if parked > 0 || fio.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !fio.is_finished(),
        "fio finished although the volume is suspended"
    );
    assert!(parked > 0, "no request parked while suspended under load");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!fio.is_finished(), "fio finished while suspended");
    c.resume(key).expect("resume");
    fio.join().expect("fio verify after resume");
    c.close().expect("close");
    wait_gone(info.pid);
}

/// Serves a headerless test volume through the library (no worker process).
pub fn serve(dir: &Path, data_len: u64, name: &str) -> (FuseDevice, std::path::PathBuf) {
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

/// Block-device round trip through the library: geometry, data, XTS ciphertext at the data
/// offset, no plaintext in the backing file.
pub fn device_round_trip(name: &str, mode: Option<FuseMode>) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (dev, backing) = serve(dir.path(), 64 * MIB, name);
    if let Some(mode) = mode {
        assert_eq!(dev.mode(), mode, "FUSE serving mode");
    }
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
    let backing_file = format!(
        "/sys/block/{}/loop/backing_file",
        bdev.file_name().unwrap().to_str().unwrap()
    );
    let before = std::fs::read_to_string(&backing_file).unwrap();
    assert!(
        Path::new(before.trim()).starts_with(dir.path()),
        "served from our FUSE file: {}",
        before.trim()
    );
    dev.close(false).expect("close");
    // Detached means no longer bound to our FUSE file. Not "size 0": a test running beside
    // this one may bind the loop number just freed to its own file (seen in CI: "loop device
    // detached" failed while the other test of this binary attached the same /dev/loopN).
    let bound = std::fs::read_to_string(&backing_file).unwrap_or_default();
    assert!(
        !Path::new(bound.trim()).starts_with(dir.path()),
        "loop device still bound to our FUSE file after close: {}",
        bound.trim()
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
