//! The daemon's outer layer with a scripted platform: control socket through the real
//! `kvcrypt status/lock/unlock` binary, root-only refusal (directory mode and SO_PEERCRED),
//! READY=1 / STATUS= on a NOTIFY_SOCKET the test binds, SIGTERM-style shutdown closing devices.
//! (The Key Vault / worker side is covered by tests/agent_e2e.rs.)

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvcrypt::agent::config::{Config, Selector, VolumeSettings};
use kvcrypt::agent::daemon::{self, Options};
use kvcrypt::agent::ports::{
    AccessClass, AccessError, CloseFailed, HostPort, KeyPort, PlatformError, PlatformFailure,
    Rotation, RotationReport, Served, SlotRef, WorkerExit, WorkerPort,
};
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_testkit::env::is_root;

#[derive(Default)]
struct World {
    denied: bool,
    worker_key: Option<Option<u8>>,
    closed: u32,
}

struct Scripted(Mutex<World>);

impl KeyPort for Scripted {
    type Header = ();

    async fn read_header(&self, _d: &Path) -> Result<(), AccessError> {
        Ok(())
    }

    fn slots(&self, _h: &()) -> Vec<SlotRef> {
        vec![SlotRef {
            key_id: "https://t.vault.azure.net/keys/k/v1".into(),
            algorithm: "RSA-OAEP-256".into(),
            wrapped: vec![9],
            check: Some(vec![8]),
            share: None,
        }]
    }

    fn verify_key(&self, _h: &(), _k: &VolumeKey) -> Result<(), AccessError> {
        Ok(())
    }

    async fn unwrap_key(&self, _s: &SlotRef) -> Result<VolumeKey, AccessError> {
        if self.0.lock().unwrap().denied {
            Err(AccessError::new(AccessClass::Denied, "403 ForbiddenByRbac"))
        } else {
            Ok(VolumeKey::from_slice(&[0x11; 64]).unwrap())
        }
    }

    async fn check_slot(&self, _h: &(), _s: &SlotRef) -> Result<(), AccessError> {
        if self.0.lock().unwrap().denied {
            Err(AccessError::new(AccessClass::Denied, "403 ForbiddenByRbac"))
        } else {
            Ok(())
        }
    }

    async fn repair_header(&self, _d: &Path, _h: &()) -> Result<Option<String>, PlatformError> {
        Ok(None)
    }

    async fn follow_rotation(
        &self,
        _d: &Path,
        _h: &(),
        _s: &VolumeSettings,
    ) -> Result<Rotation<()>, PlatformError> {
        Ok(Rotation {
            header: None,
            report: RotationReport::default(),
        })
    }
}

impl WorkerPort for Scripted {
    async fn kill_worker(&self, _n: &str) -> Result<String, PlatformError> {
        self.0.lock().unwrap().worker_key = None;
        Ok("killed".into())
    }

    async fn spawn(
        &self,
        _s: &VolumeSettings,
        d: &Path,
        k: &VolumeKey,
        _recover: Option<u32>,
    ) -> Result<Served, PlatformError> {
        self.0.lock().unwrap().worker_key = Some(Some(k.expose()[0]));
        Ok(Served::new(d.to_owned(), "/dev/loop99".into()))
    }

    async fn adopt(&self, _n: &str) -> Option<Served> {
        None
    }

    async fn worker_status(&self, _n: &str) -> Result<serde_json::Value, PlatformError> {
        match self.0.lock().unwrap().worker_key {
            Some(_) => Ok(serde_json::json!({"reads": 3, "writes": 4})),
            None => Err(PlatformError::new(PlatformFailure::WorkerControl, "gone")),
        }
    }

    fn watch_worker(&self, _n: &str) -> WorkerExit {
        // This worker never dies on its own.
        Box::pin(std::future::pending())
    }

    async fn ublk_recoverable(&self, _id: u32) -> bool {
        false
    }

    async fn clean_dead_worker(&self, _n: &str, _s: &Served) -> String {
        String::new()
    }

    async fn suspend(&self, _n: &str) -> Result<(), PlatformError> {
        self.0.lock().unwrap().worker_key = Some(None);
        Ok(())
    }

    async fn resume(&self, _n: &str, k: &VolumeKey) -> Result<(), PlatformError> {
        self.0.lock().unwrap().worker_key = Some(Some(k.expose()[0]));
        Ok(())
    }

    async fn close(&self, _n: &str, _f: bool) -> Result<(), CloseFailed> {
        let mut w = self.0.lock().unwrap();
        w.worker_key = None;
        w.closed += 1;
        Ok(())
    }

    async fn delete_ublk_device(&self, _n: &str, _id: u32) -> Result<(), PlatformError> {
        Err(PlatformError::new(PlatformFailure::Device, "no ublk here"))
    }
}

impl HostPort for Scripted {
    type Frozen = ();

    async fn locate(&self, _s: &Selector) -> Option<PathBuf> {
        Some("/dev/fake0".into())
    }

    async fn freeze(&self, _b: &Path) {}

    async fn thaw(&self, _b: &Path, _f: Option<()>) {}

    async fn run_hook(
        &self,
        _s: &VolumeSettings,
        _b: &Path,
        _r: &str,
    ) -> Result<(), PlatformError> {
        Ok(())
    }
}

fn kvcrypt(run: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvcrypt"))
        .env("KVCRYPT_RUN_DIR", run)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn control_socket_notify_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // This test binary has a single test: the process environment is ours to set.
    // SAFETY: no other thread reads the environment concurrently at this point.
    unsafe {
        std::env::set_var("KVCRYPT_RUN_DIR", &run);
        std::env::set_var("NOTIFY_SOCKET", &notify_path);
    }
    let cfg = Config::parse(
        Path::new("test.toml"),
        "[agent]\ncheck_interval = \"200ms\"\nhold = \"1h\"\n[[volume]]\nname = \"vol1\"\npath = \"/dev/fake0\"\n\
         keys = [\"https://t.vault.azure.net/keys/k\"]\n",
    )
    .unwrap();
    let p = Arc::new(Scripted(Mutex::new(World::default())));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let p2 = p.clone();
    let agent = rt.spawn(async move { daemon::run(cfg, p2, Options::default()).await });

    // READY=1 after the initial unlock pass, with a status line.
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(msg.contains("STATUS=serving 1/1 volumes"), "{msg}");

    let sock = run.join("control.sock");
    assert_eq!(
        std::fs::metadata(&run).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // status (JSON) through the real binary.
    let out = kvcrypt(&run, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "vol1");
    assert_eq!(v[0]["state"], "serving");
    assert_eq!(v[0]["block_device"], "/dev/loop99");
    assert_eq!(v[0]["key_id"], "https://t.vault.azure.net/keys/k/v1");
    assert_eq!(v[0]["worker"]["writes"], 4);

    // lock → key wiped in the worker; human status says so; unlock → key back.
    let out = kvcrypt(&run, &["lock", "vol1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.0.lock().unwrap().worker_key, Some(None));
    let out = kvcrypt(&run, &["status", "vol1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("vol1: suspended (locked by kvcrypt lock)"),
        "{text}"
    );
    let out = kvcrypt(&run, &["unlock", "vol1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.0.lock().unwrap().worker_key, Some(Some(0x11)));

    // Unknown volume: exit code 11 (NotFound) with the configured names.
    let out = kvcrypt(&run, &["lock", "nope"]);
    assert_eq!(out.status.code(), Some(11));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vol1"));

    // Revocation seen by the periodic check.
    p.0.lock().unwrap().denied = true;
    let v = wait_state(&run, "vol1", "suspended");
    assert_eq!(v["last_error"]["class"], "denied");
    assert_eq!(p.0.lock().unwrap().worker_key, Some(None));
    // STATUS= follows state changes.
    let mut saw = false;
    for _ in 0..10 {
        let Ok(n) = notify.recv(&mut buf) else { break };
        if String::from_utf8_lossy(&buf[..n]).contains("vol1 suspended") {
            saw = true;
            break;
        }
    }
    assert!(saw, "STATUS= with the suspended volume");
    p.0.lock().unwrap().denied = false;

    if is_root() && Path::new("/usr/bin/setpriv").exists() {
        let nobody = |args: &[&str]| {
            Command::new("/usr/bin/setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(env!("CARGO_BIN_EXE_kvcrypt"))
                .env("KVCRYPT_RUN_DIR", &run)
                .args(args)
                .output()
                .unwrap()
        };
        // 1. The directory is 0700: the kernel refuses the connect.
        let out = nobody(&["status"]);
        assert_eq!(out.status.code(), Some(12), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("root-only"),
            "{out:?}"
        );
        // 2. Even if the modes are loosened, the agent checks SO_PEERCRED and refuses.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let out = nobody(&["lock", "vol1"]);
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(out.status.code(), Some(12), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("only obeys root (caller uid 65534)"),
            "{out:?}"
        );
        let v: serde_json::Value =
            serde_json::from_slice(&kvcrypt(&run, &["status", "--json"]).stdout).unwrap();
        assert_ne!(
            v[0]["manual"], true,
            "the refused lock must not have been applied"
        );
    }

    // A second agent refuses to steal the live socket.
    let cfg2 = Config::parse(Path::new("t"), "").unwrap();
    let p3 = Arc::new(Scripted(Mutex::new(World::default())));
    let second = rt.block_on(daemon::run(cfg2, p3, Options::default()));
    assert!(second.is_err());

    // Access is back: serving again. (A volume still suspended at SIGTERM is left suspended for
    // the next agent; a serving one is closed.)
    wait_state(&run, "vol1", "serving");

    // SIGTERM: clean shutdown closes the device and removes the socket.
    // The daemon (in this process) installed a handler for SIGTERM.
    kvcrypt_host::process::signal(std::process::id(), libc::SIGTERM).unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), agent)
            .await
            .expect("agent stops on SIGTERM")
            .unwrap()
            .unwrap()
    });
    assert_eq!(p.0.lock().unwrap().closed, 1);
    assert_eq!(p.0.lock().unwrap().worker_key, None);
    assert!(!sock.exists());
    let out = kvcrypt(&run, &["status"]);
    assert_eq!(out.status.code(), Some(11));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
}

/// Polls `kvcrypt status --json NAME` until the volume is in `want` (10 s at most); returns its
/// status object.
fn wait_state(run: &Path, name: &str, want: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..200 {
        let out = kvcrypt(run, &["status", "--json", name]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if v[0]["state"] == want {
            return v[0].clone();
        }
        last = v;
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{name} did not reach {want}: {last}");
}
