//! The FUSE+loop scenarios with FUSE-over-io_uring switched on (`fuse.enable_uring=Y` for the
//! duration of each test, restored afterwards): the serving mode must really be io_uring, and
//! everything that holds in the /dev/fuse thread mode must hold here too — data round trip and
//! ciphertext on disk, ext4 across close/reopen, fio verify with concurrency, fsync durability
//! across SIGKILL, and suspend parking I/O until resume.

mod fuse_common;

use fuse_common::*;
use kvcrypt_datapath::transport::fuse::FuseMode;

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
    let Some(_on) = uring() else { return };
    scenarios::ext4_close_reopen("t-uring-ext4", Some("io_uring"));
}

#[test]
fn uring_fio_verify_random_io_with_four_jobs() {
    let Some(_on) = uring() else { return };
    scenarios::fio_verify("t-uring-fio", Some("io_uring"));
}

#[test]
fn uring_suspend_under_fio_load_parks_then_completes() {
    let Some(_on) = uring() else { return };
    scenarios::suspend_during_fio_verify("t-uring-susload", Some("io_uring"));
}

#[test]
fn uring_sigterm_while_suspended_fails_parked_io_and_exits() {
    let Some(_on) = uring() else { return };
    scenarios::sigterm_while_suspended_exits("t-uring-term", Some("io_uring"));
}

#[test]
fn uring_fsynced_data_survives_sigkill_of_the_worker() {
    let Some(_on) = uring() else { return };
    scenarios::fsync_survives_sigkill("t-uring-kill", Some("io_uring"));
}

#[test]
fn uring_writes_wait_while_suspended_and_complete_after_resume() {
    let Some(_on) = uring() else { return };
    scenarios::suspend_parks_and_resume_completes("t-uring-suspend", Some("io_uring"));
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
