//! Running the built `kvcrypt` binary as an operator would, and checking what it did.
//!
//! The binary's path comes from the test (`Cli::new(env!("CARGO_BIN_EXE_kvcrypt"))`): Cargo
//! tells only the integration tests and benches of the package that owns a binary where it is.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `kvcrypt` binary with a fixed `--config` (or none) and environment. No stdin, so
/// nothing can prompt; `KVCRYPT_LOG` is removed so the test's own log setting does not leak in.
#[derive(Clone, Debug)]
pub struct Cli {
    exe: PathBuf,
    config: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
}

impl Cli {
    pub fn new(exe: impl AsRef<Path>) -> Cli {
        Cli {
            exe: exe.as_ref().to_path_buf(),
            config: None,
            env: Vec::new(),
        }
    }

    /// The same binary run with `--config cfg`.
    pub fn config(&self, cfg: impl AsRef<Path>) -> Cli {
        Cli {
            config: Some(cfg.as_ref().to_path_buf()),
            ..self.clone()
        }
    }

    /// The same binary with `key=value` in its environment.
    pub fn env(&self, key: impl Into<OsString>, value: impl Into<OsString>) -> Cli {
        let mut c = self.clone();
        c.env.push((key.into(), value.into()));
        c
    }

    /// Where the binary is.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// The command for `args`, configured as above, for a test that needs more (a wrapper
    /// program, `spawn`); `run` is the usual way.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        if let Some(cfg) = &self.config {
            c.arg("--config").arg(cfg);
        }
        c.args(args)
            .env_remove("KVCRYPT_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        c
    }

    /// Runs `kvcrypt args` to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        let out = self.command(args).output().expect("run kvcrypt");
        Run::new(args.join(" "), out)
    }

    /// `header dump --json --dump-master-key --yes-i-understand dev` (needs root): the volume
    /// key as an operator would get it; see [`Run::master_key_hex`].
    pub fn dump_master_key(&self, dev: &str) -> Run {
        self.run(&[
            "header",
            "dump",
            "--json",
            "--dump-master-key",
            "--yes-i-understand",
            dev,
        ])
    }
}

/// A finished run: exit code, stdout, stderr, and the command line for messages.
#[derive(Debug)]
pub struct Run {
    pub what: String,
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    /// `output` of the command described by `what` (used in every assertion message).
    pub fn new(what: impl Into<String>, output: Output) -> Run {
        Run {
            what: what.into(),
            code: output.status.code(),
            stdout: output.stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Stdout as text.
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("`{}`: stdout is not JSON ({e}): {}", self.what, self.out()))
    }

    /// Asserts a [`Cli::dump_master_key`] run succeeded; the key's hex digits.
    #[track_caller]
    pub fn master_key_hex(&self) -> String {
        self.code(0);
        let v = self.json();
        v["master_key_hex"]
            .as_str()
            .unwrap_or_else(|| panic!("`{}`: no master_key_hex in {v}", self.what))
            .to_owned()
    }

    /// Asserts the run exited with `code`.
    #[track_caller]
    pub fn code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "`{}`: exit code\nstdout: {}\nstderr: {}",
            self.what,
            self.out(),
            self.stderr
        );
        self
    }

    /// Asserts the run succeeded; its stdout.
    #[track_caller]
    pub fn ok(&self) -> String {
        self.code(0).out()
    }

    /// Asserts stderr contains `needle`.
    #[track_caller]
    pub fn stderr_has(&self, needle: &str) -> &Run {
        assert!(
            self.stderr.contains(needle),
            "`{}`: stderr lacks {needle:?}: {}",
            self.what,
            self.stderr
        );
        self
    }

    /// Asserts the run failed with `code` and says `needle` on stderr.
    #[track_caller]
    pub fn fails(&self, code: i32, needle: &str) -> &Run {
        self.code(code).stderr_has(needle)
    }

    /// Asserts the run printed nothing at all.
    #[track_caller]
    pub fn silent(&self) -> &Run {
        assert!(
            self.stdout.is_empty() && self.stderr.is_empty(),
            "`{}`: expected no output\nstdout: {}\nstderr: {}",
            self.what,
            self.out(),
            self.stderr
        );
        self
    }
}
