//! A worker started by the agent (a systemd service, `Type=notify`) must not inherit the
//! service manager's per-process variables: the worker outlives the agent and is not the unit's
//! main process (systemd logged "Got notification message from PID …, but reception only
//! permitted for main PID"). Its own binary in its own test file: it sets environment
//! variables, which must not race with other tests' threads.

use kvcrypt::worker::{WorkerClient, spawn_worker};
use kvcrypt_testkit::fuse::prelude::*;

/// The `kvcrypt` binary under test.
const EXE: &str = env!("CARGO_BIN_EXE_kvcrypt");

/// What systemd hands a service's main process about itself, with plausible values.
const SERVICE_VARS: [(&str, &str); 6] = [
    ("NOTIFY_SOCKET", "/run/systemd/notify"),
    ("WATCHDOG_PID", "1"),
    ("WATCHDOG_USEC", "60000000"),
    ("LISTEN_FDS", "1"),
    ("LISTEN_PID", "1"),
    ("LISTEN_FDNAMES", "control"),
];

#[test]
fn worker_does_not_inherit_the_service_managers_variables() {
    if skip_without_fuse_loop() {
        return;
    }
    for (k, v) in SERVICE_VARS {
        // SAFETY: this binary's only test sets these before it starts any thread of its own;
        // no other thread reads the environment meanwhile.
        unsafe { std::env::set_var(k, v) };
    }
    // SAFETY: as above.
    unsafe { std::env::set_var("KVCRYPT_TEST_INHERITED", "yes") };
    let name = "t-worker-env";
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let vol = make_volume(dir.path(), 16 * MIB, &test_key(42));
    let _cleanup = Cleanup::worker(name);
    let info = spawn_worker(&worker_spec(EXE, &vol, name), &test_key(42)).expect("spawn worker");
    let environ = std::fs::read(format!("/proc/{}/environ", info.pid)).expect("worker environ");
    let names: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let k = kv.split(|b| *b == b'=').next().unwrap_or_default();
            String::from_utf8_lossy(k).into_owned()
        })
        .collect();
    WorkerClient::connect(name).unwrap().close().unwrap();
    wait_gone(info.pid);
    for (k, _) in SERVICE_VARS {
        assert!(
            !names.iter().any(|n| n == k),
            "the worker inherited {k}: {names:?}"
        );
    }
    // Only those are removed: the rest of the environment still reaches the worker.
    assert!(
        names.iter().any(|n| n == "KVCRYPT_TEST_INHERITED"),
        "{names:?}"
    );
}
