//! The FUSE+loop scenarios with FUSE-over-io_uring switched on (`fuse.enable_uring=Y` for the
//! duration of each test, restored afterwards): the serving mode must really be io_uring, and
//! everything that holds in the /dev/fuse thread mode must hold here too — data round trip and
//! ciphertext on disk, ext4 across close/reopen, fio verify with concurrency, fsync durability
//! across SIGKILL, and suspend parking I/O until resume.

use kvcrypt_datapath::transport::fuse::FuseMode;
use kvcrypt_testkit::fuse::prelude::*;

/// The worker scenarios with `enable_uring=Y` held, and the io_uring serving mode checked.
const URING: Worker = Worker {
    exe: env!("CARGO_BIN_EXE_kvcrypt"),
    uring: Some(true),
    mode: Some("io_uring"),
};

/// Root, FUSE, loop and a kernel with FUSE-over-io_uring; `None` means skip (said why).
fn uring() -> Option<EnableUring> {
    if skip_without_fuse_loop() {
        return None;
    }
    EnableUring::on()
}

#[test]
fn uring_block_device_round_trip_and_ciphertext_on_disk() {
    let Some(_on) = uring() else { return };
    scenarios::device_round_trip("t-uring-roundtrip", Some(FuseMode::IoUring));
}

#[test]
fn uring_ext4_files_survive_close_and_reopen() {
    URING.run("t-uring-ext4", scenarios::ext4_close_reopen);
}

#[test]
fn uring_fio_verify_random_io_with_four_jobs() {
    URING.run("t-uring-fio", scenarios::fio_verify);
}

#[test]
fn uring_suspend_under_fio_load_parks_then_completes() {
    URING.run("t-uring-susload", scenarios::suspend_during_fio_verify);
}

#[test]
fn uring_sigterm_while_suspended_fails_parked_io_and_exits() {
    URING.run("t-uring-term", scenarios::sigterm_while_suspended_exits);
}

#[test]
fn uring_fsynced_data_survives_sigkill_of_the_worker() {
    URING.run("t-uring-kill", scenarios::fsync_survives_sigkill);
}

#[test]
fn uring_writes_wait_while_suspended_and_complete_after_resume() {
    URING.run(
        "t-uring-suspend",
        scenarios::suspend_parks_and_resume_completes,
    );
}

#[test]
fn without_enable_uring_the_dev_fuse_threads_serve() {
    if skip_without_fuse_loop() {
        return;
    }
    let Some(_off) = EnableUring::set(false) else {
        return;
    };
    scenarios::device_round_trip("t-uring-off", Some(FuseMode::DevFuse));
}
