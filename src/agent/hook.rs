//! The revocation hook: run before a revoked device is removed, bounded by a timeout.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use super::config::HookCommand;

/// Runs `hook` with KVCRYPT_NAME / KVCRYPT_DEVICE / KVCRYPT_BACKING / KVCRYPT_REASON set;
/// kills it after `timeout`.
pub async fn run_hook(
    hook: &HookCommand,
    timeout: Duration,
    name: &str,
    block_device: &Path,
    backing: Option<&Path>,
    reason: &str,
) -> Result<(), String> {
    let mut cmd = match hook {
        HookCommand::Shell(s) => {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(s);
            c
        }
        HookCommand::Argv(v) => {
            let Some((prog, args)) = v.split_first() else {
                return Err("empty hook command".into());
            };
            let mut c = tokio::process::Command::new(prog);
            c.args(args);
            c
        }
    };
    for var in crate::worker::SERVICE_MANAGER_VARS {
        cmd.env_remove(var);
    }
    cmd.env("KVCRYPT_NAME", name)
        .env("KVCRYPT_DEVICE", block_device)
        .env("KVCRYPT_REASON", reason)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(b) = backing {
        cmd.env("KVCRYPT_BACKING", b);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start hook {hook:?}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) if st.success() => {
            tracing::info!(volume = name, "volume {name}: hook finished");
            Ok(())
        }
        Ok(Ok(st)) => Err(format!("hook {hook:?} failed: {st}")),
        Ok(Err(e)) => Err(format!("waiting for hook {hook:?}: {e}")),
        Err(_) => {
            // Our own child, by handle (never by name).
            let _ = child.kill().await;
            Err(format!(
                "hook {hook:?} killed after the timeout of {}",
                humantime::format_duration(timeout)
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hook_gets_env_and_timeout_kills() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let h = HookCommand::Shell(format!(
            "echo \"$KVCRYPT_NAME $KVCRYPT_DEVICE $KVCRYPT_REASON\" > {}",
            out.display()
        ));
        run_hook(
            &h,
            Duration::from_secs(5),
            "data",
            Path::new("/dev/loop7"),
            None,
            "denied",
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "data /dev/loop7 denied\n"
        );

        let slow = HookCommand::Argv(vec!["/bin/sleep".into(), "30".into()]);
        let e = run_hook(
            &slow,
            Duration::from_millis(200),
            "d",
            Path::new("/dev/x"),
            None,
            "r",
        )
        .await
        .unwrap_err();
        assert!(e.contains("timeout"), "{e}");
        let bad = HookCommand::Shell("exit 3".into());
        let e = run_hook(
            &bad,
            Duration::from_secs(5),
            "d",
            Path::new("/dev/x"),
            None,
            "r",
        )
        .await
        .unwrap_err();
        assert!(e.contains("failed"), "{e}");
    }
}
