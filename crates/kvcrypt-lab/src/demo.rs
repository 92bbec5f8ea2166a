//! `kvcrypt-demo`: the whole story on a scratch file with the bundled Key Vault emulator —
//! format, serve, mkfs, write, revoke → locked, restore → resumed, verify — with timings.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvcrypt_exit::{Context, Exit, Failure};

use crate::lab::{KEY_NAME, Lab, LabOptions, Revocation, VOLUME};
use kvcrypt::agent::status::VolumeState;

const WAIT: Duration = Duration::from_secs(60);

/// A step of the lab (a test harness, whose errors are plain `anyhow` ones) failed: the demo
/// failed, with the generic exit code.
fn in_lab<T>(r: anyhow::Result<T>) -> Result<T, Failure> {
    r.map_err(|e| Failure::wrap(Exit::Failure, e))
}

struct Demo {
    t0: Instant,
    lab: Lab,
    agent: Option<Child>,
    mnt: Option<PathBuf>,
    revoked: bool,
}

impl Demo {
    fn step(&self, n: u32, text: &str) {
        println!("[{:>6.2}s] {n}/8 {text}", self.t0.elapsed().as_secs_f64());
    }
    fn note(&self, text: &str) {
        println!("          {text}");
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // On any exit path: give access back so held I/O drains, unmount, stop the agent.
        if self.revoked {
            let _ = self.lab.restore(Revocation::Permission);
            let _ = self
                .lab
                .wait_state(VolumeState::Serving, Duration::from_secs(10));
        }
        if let Some(m) = self.mnt.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
        if let Some(mut a) = self.agent.take() {
            let _ = kvcrypt_host::process::signal(a.id(), libc::SIGTERM);
            let _ = a.wait();
        }
    }
}

fn run(cmd: &mut Command) -> Result<String, Failure> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        return Err(Failure::new(
            Exit::Failure,
            format!(
                "{cmd:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sha256(p: &Path) -> Result<String, Failure> {
    Ok(run(Command::new("sha256sum").arg(p))?
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Runs the demo in `dir` (kept) or a fresh temporary directory (removed unless `keep`).
pub fn run_demo(
    exe: &Path,
    dir: Option<PathBuf>,
    size_mib: u64,
    keep: bool,
) -> Result<(), Failure> {
    if !kvcrypt_host::process::running_as_root() {
        return Err(kvcrypt::cli::CliError::Permission(
            "the demo needs root for the loop device and FUSE: run kvcrypt-demo as root".into(),
        )
        .into());
    }
    // A directory the user named is never removed.
    let keep = keep || dir.is_some();
    let dir = match dir {
        Some(d) => d,
        None => tempfile_dir()?,
    };
    let res = story(exe, &dir, size_mib);
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("scratch directory kept: {}", dir.display());
    }
    res
}

fn tempfile_dir() -> Result<PathBuf, Failure> {
    let d = std::env::temp_dir().join(format!("kvcrypt-demo-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

fn story(exe: &Path, dir: &Path, size_mib: u64) -> Result<(), Failure> {
    let t0 = Instant::now();
    let opts = LabOptions {
        size_mib,
        ..Default::default()
    };
    let lab = in_lab(Lab::start(dir, exe, &opts))?;
    let mut d = Demo {
        t0,
        lab,
        agent: None,
        mnt: None,
        revoked: false,
    };
    d.step(
        1,
        &format!(
            "Key Vault emulator on 127.0.0.1:{}: key {KEY_NAME} (RSA-2048), principal {} allowed to wrap/unwrap",
            d.lab.emu.port(),
            d.lab.principal.client_id
        ),
    );

    let t = Instant::now();
    in_lab(d.lab.format())?;
    d.step(
        2,
        &format!(
            "formatted {} ({size_mib} MiB): volume key wrapped by {} ({})",
            d.lab.image.display(),
            d.lab.key_id,
            ms(t.elapsed())
        ),
    );

    let t = Instant::now();
    d.agent = Some(in_lab(d.lab.spawn_agent(None))?);
    let (st, _) = in_lab(d.lab.wait_state(VolumeState::Serving, WAIT))?;
    let bd = st
        .block_device
        .clone()
        .ok_or_else(|| Failure::new(Exit::Failure, "no device"))?;
    d.step(
        3,
        &format!(
            "agent started (check_interval 1s): volume {VOLUME} served as {bd} ({})",
            ms(t.elapsed())
        ),
    );
    d.note(&format!("key: {}", st.key_id.unwrap_or_default()));

    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&bd))?;
    run(Command::new("mount").arg(&bd).arg(&mnt))?;
    d.mnt = Some(mnt.clone());
    let data = mnt.join("data.bin");
    run(Command::new("sh").arg("-c").arg(format!(
        "head -c 16777216 /dev/urandom > {} && sync",
        data.display()
    )))?;
    let sum = sha256(&data)?;
    d.step(
        4,
        &format!(
            "ext4 on {bd} mounted at {}; wrote 16 MiB, sha256 {}…",
            mnt.display(),
            &sum[..16]
        ),
    );

    in_lab(d.lab.revoke(Revocation::Permission))?;
    d.revoked = true;
    d.step(
        5,
        "revoke: the customer removes the principal's unwrapKey permission",
    );
    let (st, waited) = in_lab(d.lab.wait_state(VolumeState::Suspended, WAIT))?;
    d.note(&format!(
        "→ locked after {}: filesystem frozen, key wiped in the worker, I/O held",
        ms(waited)
    ));
    let reason = st.reason.unwrap_or_default();
    let short: String = reason.chars().take(150).collect();
    d.note(&format!(
        "reason: {short}{}",
        if short.len() < reason.len() {
            "…"
        } else {
            ""
        }
    ));

    let mut reader = Command::new("dd")
        .arg(format!("if={bd}"))
        .args([
            "of=/dev/null",
            "bs=4096",
            "count=1",
            "skip=1000",
            "iflag=direct",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(1));
    let held = reader.try_wait()?.is_none();
    d.step(
        6,
        if held {
            "a direct read of the device is waiting (not failing) while locked"
        } else {
            "WARNING: a direct read completed while locked"
        },
    );

    let t = Instant::now();
    in_lab(d.lab.restore(Revocation::Permission))?;
    d.revoked = false;
    let (_, _) = in_lab(d.lab.wait_state(VolumeState::Serving, WAIT))?;
    let resumed = t.elapsed();
    let ok = reader.wait()?.success();
    d.step(
        7,
        &format!(
            "restore: permission granted again → resumed in place after {} (same {bd}); held read {}",
            ms(resumed),
            if ok { "completed" } else { "FAILED" }
        ),
    );

    run(Command::new("sh")
        .arg("-c")
        .arg("sync; echo 3 > /proc/sys/vm/drop_caches"))?;
    let after = sha256(&data)?;
    if after != sum {
        return Err(Failure::new(
            Exit::Failure,
            format!("data changed across revoke/restore: {sum} != {after}"),
        ));
    }
    run(Command::new("umount").arg(&mnt))?;
    d.mnt = None;
    run(Command::new("e2fsck").arg("-fn").arg(&bd))?;
    d.step(
        8,
        "verified: sha256 unchanged, e2fsck -fn clean; stopping the agent (keys wiped)",
    );
    if let Some(mut a) = d.agent.take() {
        kvcrypt_host::process::signal(a.id(), libc::SIGTERM)?;
        a.wait()?;
    }
    println!(
        "demo finished in {:.1}s: revocation locked the data, restoring access brought it back intact.",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
