//! The FUSE+loop data path as the tests drive it: worker specs for the built binary, guards
//! that unmount and close what a test opened, the FUSE-over-io_uring switch, and the worker
//! scenarios several test files run ([`scenarios`]).

pub mod scenarios;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use kvcrypt::worker::{WorkerClient, WorkerSpec};
use kvcrypt_crypto::XtsCipher;
use kvcrypt_datapath::transport::TransportKind;

use crate::keys::test_key;

/// An XTS cipher under `test_key(seed)`.
pub fn cipher(seed: u8) -> XtsCipher {
    XtsCipher::new(&test_key(seed))
}

/// A worker spec for tests: FUSE transport, the `kvcrypt` binary at `exe`.
pub fn worker_spec(exe: &str, device: &Path, name: &str) -> WorkerSpec {
    let mut spec = WorkerSpec::new(device, name);
    spec.transport = TransportKind::Fuse;
    spec.exe = Some(PathBuf::from(exe));
    spec
}

/// Waits (bounded) until process `pid` is gone.
pub fn wait_gone(pid: u32) {
    for _ in 0..500 {
        if !kvcrypt_host::process::pid_alive(pid) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("process {pid} did not exit");
}

/// Unmounts and closes on drop, so a failing test does not leave mounts or workers behind.
#[derive(Default)]
pub struct Cleanup {
    pub mounts: Vec<PathBuf>,
    pub names: Vec<String>,
}

impl Cleanup {
    /// Closes worker `name` on drop.
    pub fn worker(name: &str) -> Cleanup {
        Cleanup {
            mounts: vec![],
            names: vec![name.into()],
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = std::process::Command::new("umount").arg(m).output();
        }
        for n in &self.names {
            if let Ok(mut c) = WorkerClient::connect(n) {
                if c.status().map(|s| s.is_suspended()).unwrap_or(false) {
                    let _ = c.resume(&test_key(42));
                }
                let _ = c.close();
            }
        }
    }
}

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Sets the FUSE module's `enable_uring` parameter while alive (the kernel offers
/// FUSE-over-io_uring only to connections mounted meanwhile) and restores the previous value
/// on drop. Holding it also serialises the tests of one file that need it.
pub struct EnableUring {
    old: String,
    _serial: MutexGuard<'static, ()>,
}

static URING_SERIAL: Mutex<()> = Mutex::new(());

impl EnableUring {
    /// Switches FUSE-over-io_uring on; `None` (with a loud note) if this kernel has no
    /// FUSE-over-io_uring (before 6.14).
    pub fn on() -> Option<EnableUring> {
        Self::set(true)
    }

    /// Sets the parameter to Y (`true`) or N.
    pub fn set(enable: bool) -> Option<EnableUring> {
        let serial = URING_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(old) = std::fs::read_to_string(ENABLE_URING) else {
            crate::env::skip(&format!(
                "{ENABLE_URING} is missing: this kernel has no FUSE-over-io_uring"
            ));
            return None;
        };
        std::fs::write(ENABLE_URING, if enable { "Y" } else { "N" })
            .expect("set the fuse enable_uring parameter");
        Some(EnableUring {
            old: old.trim().to_string(),
            _serial: serial,
        })
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        let _ = std::fs::write(ENABLE_URING, &self.old);
    }
}

/// How a test file runs the worker scenarios: which binary, whether FUSE-over-io_uring is
/// switched on for each, and the serving mode the worker must then report.
pub struct Worker {
    /// The `kvcrypt` binary (`env!("CARGO_BIN_EXE_kvcrypt")` of the calling test).
    pub exe: &'static str,
    /// `Some(on)`: hold [`EnableUring::set`]`(on)` for the scenario (skip if the kernel has no
    /// FUSE-over-io_uring).
    pub uring: Option<bool>,
    /// The serving mode the worker must report ("io_uring" / "dev_fuse"), if checked.
    pub mode: Option<&'static str>,
}

impl Worker {
    /// Runs `scenario` for worker `name`, or skips it (said why) where root, FUSE, loop or the
    /// io_uring switch are missing.
    pub fn run(&self, name: &str, scenario: fn(&Worker, &str)) {
        if crate::env::skip_without_fuse_loop() {
            return;
        }
        let _uring = match self.uring {
            Some(on) => match EnableUring::set(on) {
                Some(guard) => Some(guard),
                None => return,
            },
            None => None,
        };
        scenario(self, name);
    }

    /// [`worker_spec`] for this binary.
    pub fn spec(&self, device: &Path, name: &str) -> WorkerSpec {
        worker_spec(self.exe, device, name)
    }
}

/// What the data-path test files (tests/fuse_*.rs, tests/worker_env.rs) use, in one import.
pub mod prelude {
    pub use super::scenarios;
    pub use super::{Cleanup, EnableUring, Worker, cipher, wait_gone, worker_spec};
    pub use crate::MIB;
    pub use crate::data::{contains_any_chunk, pattern, sha256_file};
    pub use crate::env::skip_without_fuse_loop;
    pub use crate::keys::test_key;
    pub use crate::shell::run;
    pub use crate::volume::{DATA_OFFSET, backing_file, make_volume, open_direct};
}

/// One `#[test]` per worker scenario, each run through [`Worker::run`] with its own worker
/// name: `worker_scenarios! { WORKER; test_name: "worker-name" => scenario_fn, ... }`. The tests
/// stay separate (each passes, fails or skips on its own) without writing each body out.
#[macro_export]
macro_rules! worker_scenarios {
    ($worker:expr; $($test:ident: $name:literal => $scenario:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                $worker.run($name, $crate::fuse::scenarios::$scenario);
            }
        )*
    };
}
