//! The `kvcrypt-kv-emulator` binary: ready line, ready file, admin subcommands, and a
//! restart on the same state directory.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_kvcrypt-kv-emulator");

/// Kills the emulator we started (by its own handle) even when an assertion fails.
struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(state: &Path) -> (Running, Value) {
    let mut child = Command::new(BIN)
        .args(["--port", "0", "--host", "kv.example.test", "--state-dir"])
        .arg(state)
        .arg("--ready-file")
        .arg(state.join("ready.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn emulator");
    let stdout = child.stdout.take().expect("stdout");
    let running = Running(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("ready line");
    let ready: Value = serde_json::from_str(&line).expect("ready line is JSON");
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("ready.json")).unwrap()).unwrap();
    assert_eq!(ready, file);
    (running, ready)
}

fn admin(ready: &Value, state: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("admin")
        .arg("--url")
        .arg(ready["admin"].as_str().unwrap())
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run admin");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[test]
fn binary_serves_and_admin_subcommands_drive_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let (emu, ready) = serve(state);
    let port = ready["port"].as_u64().unwrap();
    assert!(port > 0);
    assert_eq!(
        ready["admin"].as_str().unwrap(),
        format!("https://127.0.0.1:{port}/_admin")
    );
    assert_eq!(
        ready["ca"].as_str().unwrap(),
        state.join("ca.pem").to_str().unwrap()
    );

    let (ok, out) = admin(&ready, state, &["create-principal", "--name", "agent"]);
    assert!(ok, "{out}");
    let p: Value = serde_json::from_str(&out).unwrap();
    let id = p["client_id"].as_str().unwrap().to_string();
    assert!(p["secret"].as_str().is_some_and(|s| !s.is_empty()));
    let (ok, _) = admin(
        &ready,
        state,
        &[
            "create-key",
            "--key",
            "kek",
            "--kty",
            "oct",
            "--size",
            "256",
        ],
    );
    assert!(ok);
    let (ok, _) = admin(
        &ready,
        state,
        &["grant", "--principal", &id, "--op", "unwrap,wrap"],
    );
    assert!(ok);
    let (_, out) = admin(&ready, state, &["state"]);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        st["principals"][0]["grants"]["*"],
        serde_json::json!(["wrap", "unwrap"])
    );
    let (ok, _) = admin(
        &ready,
        state,
        &["revoke", "--principal", &id, "--op", "unwrap"],
    );
    assert!(ok);
    let (ok, _) = admin(&ready, state, &["disable-key", "--key", "kek"]);
    assert!(ok);
    let (ok, _) = admin(&ready, state, &["firewall", "on"]);
    assert!(ok);
    let (ok, _) = admin(&ready, state, &["fault", "throttle", "--count", "1"]);
    assert!(ok);
    let (ok, _) = admin(&ready, state, &["fault", "latency"]);
    assert!(!ok, "latency needs --ms");
    let (ok, _) = admin(
        &ready,
        state,
        &[
            "fault", "html", "--status", "404", "--key", "kek", "--count", "2",
        ],
    );
    assert!(ok);
    let (ok, _) = admin(&ready, state, &["fault", "empty"]);
    assert!(ok);
    let (ok, _) = admin(&ready, state, &["fault", "foreign_json", "--status", "200"]);
    assert!(!ok, "a fault status must be an error status");
    let (ok, _) = admin(
        &ready,
        state,
        &["fault", "unauthorized_no_challenge", "--target", "all"],
    );
    assert!(ok);
    let (_, out) = admin(&ready, state, &["state"]);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        st["principals"][0]["grants"]["*"],
        serde_json::json!(["wrap"])
    );
    assert_eq!(st["keys"][0]["versions"][0]["enabled"], false);
    assert_eq!(st["firewall"], true);
    assert_eq!(st["faults"][0]["kind"], "throttle");
    assert_eq!(
        st["faults"][1],
        serde_json::json!({"kind": "html", "status": 404, "key": "kek", "count": 2, "target": "vault"})
    );
    assert_eq!(st["faults"][2]["kind"], "empty");
    assert_eq!(
        st["faults"][2]["status"], 403,
        "html/empty/foreign_json default to 403"
    );
    assert_eq!(st["faults"][3]["kind"], "unauthorized_no_challenge");
    assert_eq!(st["faults"][3]["target"], "all");
    let (ok, _) = admin(&ready, state, &["delete-principal", "--principal", "nope"]);
    assert!(!ok, "unknown principal is an error");
    // A wrong admin token is refused.
    let out = Command::new(BIN)
        .args([
            "admin",
            "--url",
            ready["admin"].as_str().unwrap(),
            "--token",
            "wrong",
            "--ca",
        ])
        .arg(state.join("ca.pem"))
        .arg("state")
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The emulated clock moves forward only.
    let (ok, out) = admin(&ready, state, &["clock", "--advance", "86400"]);
    assert!(ok, "{out}");
    let clock: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(clock["offset_seconds"], 86400, "{out}");
    drop(emu);

    // Restart on the same state: principal, grants and key switches persist.
    let (_emu, ready) = serve(state);
    let (_, out) = admin(&ready, state, &["state"]);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["principals"][0]["client_id"], id.as_str());
    assert_eq!(
        st["principals"][0]["grants"]["*"],
        serde_json::json!(["wrap"])
    );
    assert_eq!(st["keys"][0]["name"], "kek");
    assert_eq!(st["firewall"], true);
    assert_eq!(
        st["faults"],
        serde_json::json!([]),
        "faults are not persisted"
    );
    let (ok, out) = admin(&ready, state, &["clock"]);
    assert!(ok, "{out}");
    let clock: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        clock["offset_seconds"], 86400,
        "the clock offset persists: {out}"
    );
}

#[test]
fn refuses_non_loopback_bind() {
    let out = Command::new(BIN)
        .args(["--bind", "0.0.0.0", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only loopback"));
}

/// The library API from a plain (non-async) test: start, listen, write the CA, shut down.
#[test]
fn library_start_and_shutdown_from_plain_test() {
    use kvcrypt_kv_emulator::{Emulator, EmulatorConfig};
    let dir = tempfile::tempdir().unwrap();
    let ca_out = dir.path().join("ca-copy.pem");
    let emu = Emulator::start(EmulatorConfig {
        ca_out: Some(ca_out.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(emu.ca_pem_path(), ca_out.as_path());
    assert_eq!(std::fs::read_to_string(&ca_out).unwrap(), emu.ca_pem());
    assert!(emu.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    let port = emu.port();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert_eq!(
        emu.vault_url("v"),
        format!("https://v.vault.azure.net:{port}")
    );
    assert!(
        listens_in_this_process(port),
        "the emulator's listener is ours"
    );
    emu.shutdown();
    // Not "connect fails": once the port is free, any process (the emulator binary another
    // test here starts on port 0) may bind it. What shutdown must do is close our listener.
    assert!(
        !listens_in_this_process(port),
        "port {port} still listened on by this process after shutdown"
    );
}

/// Whether a socket of this process listens on TCP `port` (IPv4): the LISTEN rows of
/// /proc/net/tcp for that port, matched by inode against this process's descriptors.
fn listens_in_this_process(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let cols: Vec<&str> = row.split_whitespace().collect();
            let local_port = cols.get(1)?.rsplit(':').next()?;
            let listening = cols.get(3)? == &"0A";
            if !listening || u16::from_str_radix(local_port, 16).ok()? != port {
                return None;
            }
            Some(format!("socket:[{}]", cols.get(9)?))
        })
        .collect();
    std::fs::read_dir("/proc/self/fd").unwrap().any(|fd| {
        std::fs::read_link(fd.unwrap().path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}
