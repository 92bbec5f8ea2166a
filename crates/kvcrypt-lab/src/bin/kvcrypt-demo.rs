//! `kvcrypt-demo`: formats a scratch volume, serves it through a real agent, writes data,
//! revokes the key in the bundled Key Vault emulator (the volume locks), restores it (the
//! volume resumes) and checks the data. Lives apart from `kvcrypt` so the production binary
//! links no emulator. Run as root; `./demo.sh` builds and runs it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kvcrypt_exit::{Context, Exit, Failure};

#[derive(Debug, Parser)]
#[command(
    name = "kvcrypt-demo",
    version,
    about = "Run the kvcrypt demo on the bundled Key Vault emulator"
)]
struct DemoArgs {
    /// Scratch directory (default: a new temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the scratch volume in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Keep the scratch directory and emulator state afterwards.
    #[arg(long)]
    keep: bool,
    /// The `kvcrypt` binary to run (default: the one next to this program).
    #[arg(long)]
    kvcrypt: Option<PathBuf>,
}

fn kvcrypt_next_to_me() -> Result<PathBuf, Failure> {
    let me = std::env::current_exe().context("locating the kvcrypt-demo binary")?;
    let exe = me.with_file_name("kvcrypt");
    if !exe.is_file() {
        return Err(Failure::new(
            Exit::Failure,
            format!(
                "no kvcrypt binary next to {} (build it with `cargo build --release --bins`, or pass --kvcrypt PATH)",
                me.display()
            ),
        ));
    }
    Ok(exe)
}

fn main() -> ExitCode {
    let a = DemoArgs::parse();
    let res = match a.kvcrypt.map(Ok).unwrap_or_else(kvcrypt_next_to_me) {
        Ok(exe) => kvcrypt_lab::demo::run_demo(&exe, a.dir, a.size_mib, a.keep),
        Err(e) => Err(e),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvcrypt-demo: {e:#}");
            ExitCode::from(e.exit().code())
        }
    }
}
