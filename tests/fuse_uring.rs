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

kvcrypt_testkit::worker_scenarios! {
    URING;
    uring_ext4_files_survive_close_and_reopen: "t-uring-ext4" => ext4_close_reopen,
    uring_fio_verify_random_io_with_four_jobs: "t-uring-fio" => fio_verify,
    uring_suspend_under_fio_load_parks_then_completes: "t-uring-susload" => suspend_during_fio_verify,
    uring_sigterm_while_suspended_fails_parked_io_and_exits: "t-uring-term" => sigterm_while_suspended_exits,
    uring_fsynced_data_survives_sigkill_of_the_worker: "t-uring-kill" => fsync_survives_sigkill,
    uring_writes_wait_while_suspended_and_complete_after_resume: "t-uring-suspend" => suspend_parks_and_resume_completes,
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
