//! Serving commands: open, close, and the hidden per-volume worker. (Owned by the data-path work.)

use std::path::Path;

use super::{CliError, CloseArgs, OpenArgs, WorkerArgs};

fn todo_cmd(what: &str) -> anyhow::Result<()> {
    Err(CliError::Unsupported(format!("{what}: not implemented yet")).into())
}

pub fn open(_config: &Path, _a: OpenArgs) -> anyhow::Result<()> {
    todo_cmd("open")
}
pub fn close(_a: CloseArgs) -> anyhow::Result<()> {
    todo_cmd("close")
}
pub fn worker(_a: WorkerArgs) -> anyhow::Result<()> {
    todo_cmd("worker")
}
