//! The FUSE+loop data path end to end through worker processes (`kvcrypt worker`, started with
//! `spawn_worker`): ext4 with checksummed files across close/reopen, fio verify, flush
//! durability across SIGKILL, and suspend/resume through the block device.

use kvcrypt::worker::{WorkerClient, WorkerError, spawn_worker};
use kvcrypt_testkit::fuse::prelude::*;

/// The `kvcrypt` binary under test.
const EXE: &str = env!("CARGO_BIN_EXE_kvcrypt");
/// The scenarios in whatever FUSE mode the kernel gives (not checked).
const WORKER: Worker = Worker {
    exe: EXE,
    uring: None,
    mode: None,
};

kvcrypt_testkit::worker_scenarios! {
    WORKER;
    ext4_files_survive_close_and_reopen_and_backing_has_no_plaintext: "t-fuse-ext4" => ext4_close_reopen,
    fio_verify_random_io_with_four_jobs: "t-fuse-fio" => fio_verify,
    suspend_under_fio_load_parks_then_completes: "t-fuse-susload" => suspend_during_fio_verify,
    sigterm_while_suspended_fails_parked_io_and_exits: "t-fuse-term" => sigterm_while_suspended_exits,
    fsynced_data_survives_sigkill_of_the_worker: "t-fuse-kill" => fsync_survives_sigkill,
    writes_wait_while_suspended_and_complete_after_resume: "t-fuse-suspend" => suspend_parks_and_resume_completes,
}

#[test]
fn a_worker_given_the_wrong_key_fails_with_its_reason() {
    if skip_without_fuse_loop() {
        return;
    }
    let name = "t-fuse-wrongkey";
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let vol = make_volume(dir.path(), 16 * MIB, &test_key(42));
    let err = spawn_worker(&worker_spec(EXE, &vol, name), &test_key(1)).unwrap_err();
    match &err {
        WorkerError::Died { log, .. } => assert!(
            log.to_lowercase().contains("key"),
            "log does not say why: {log}"
        ),
        other => panic!("expected Died, got {other}"),
    }
    assert!(
        kvcrypt::worker::read_state(name).is_none(),
        "no state left behind"
    );
    assert!(matches!(
        WorkerClient::connect(name),
        Err(WorkerError::NotOpen(_))
    ));
}

/// A worker's private mount namespace must not keep copies of other filesystems: a copy pins
/// its device (the user's `umount` succeeds, `kvcrypt close` of that volume then fails "in
/// use"). A tmpfs mounted before the worker starts stands in for another volume's filesystem.
#[test]
fn the_worker_namespace_holds_no_foreign_mount() {
    if skip_without_fuse_loop() {
        return;
    }
    let name = "t-fuse-mountns";
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    run(
        "mount",
        &["-t", "tmpfs", "kvcrypt-test", foreign.to_str().unwrap()],
    );
    let _cleanup = Cleanup {
        mounts: vec![foreign.clone()],
        names: vec![name.into()],
    };
    let vol = make_volume(dir.path(), 16 * MIB, &test_key(42));
    let info = spawn_worker(&worker_spec(EXE, &vol, name), &test_key(42)).expect("spawn worker");
    let theirs = std::fs::read_to_string(format!("/proc/{}/mountinfo", info.pid)).unwrap();
    WorkerClient::connect(name).unwrap().close().unwrap();
    wait_gone(info.pid);
    let points: Vec<&str> = theirs.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    assert!(
        !points.contains(&foreign.to_str().unwrap()),
        "the worker holds {}: {points:?}",
        foreign.display()
    );
    for needed in ["/", "/dev", "/proc", "/sys"] {
        assert!(points.contains(&needed), "{needed} missing: {points:?}");
    }
}
