//! Shell completions and man pages, generated from the same clap definitions as `--help`.

use std::fs;

use clap::CommandFactory;
use kvcrypt_exit::{Context, Failure};

use super::{Cli, CompletionsArgs, ManArgs};

pub fn completions(a: CompletionsArgs) -> Result<(), Failure> {
    let mut cmd = Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "kvcrypt", &mut std::io::stdout());
    Ok(())
}

pub fn man(a: ManArgs) -> Result<(), Failure> {
    fs::create_dir_all(&a.out_dir).with_context(|| format!("creating {}", a.out_dir.display()))?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd, &a.out_dir)
        .with_context(|| format!("writing man pages to {}", a.out_dir.display()))?;
    Ok(())
}
